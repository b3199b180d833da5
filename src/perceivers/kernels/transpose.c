/* A float32 matrix transposed into a contiguous one: 16 x 16 tiles transposed in registers (four rounds
 * of two-vector shuffles, each exchanging one bit of the row index with the same bit of the column
 * index, vector.h), in 64 x 64 blocks split over OpenMP threads.
 *
 * src: rows x cols with row stride ld (channels contiguous); dst: cols x rows, contiguous.
 */
#include <stdint.h>

#include "vector.h"

#define TILE 16
#define BLOCK 64

void perceivers_transpose(int64_t rows, int64_t cols, int64_t ld, const float *src, float *dst) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t c0 = 0; c0 < cols; c0 += BLOCK)
        for (int64_t r0 = 0; r0 < rows; r0 += BLOCK)
            for (int64_t c = c0; c < c0 + BLOCK && c < cols; c += TILE)
                for (int64_t r = r0; r < r0 + BLOCK && r < rows; r += TILE) {
                    const int64_t rn = rows - r < TILE ? rows - r : TILE, cn = cols - c < TILE ? cols - c : TILE;
                    if (rn < TILE || cn < TILE) {  /* the matrix's edge */
                        for (int64_t j = 0; j < cn; ++j)
                            for (int64_t i = 0; i < rn; ++i) dst[(c + j) * rows + r + i] = src[(r + i) * ld + c + j];
                        continue;
                    }
                    v16 t[TILE];
                    for (int i = 0; i < TILE; ++i) t[i] = vload(src + (r + i) * ld + c);
                    tile_transpose(t);
                    for (int j = 0; j < TILE; ++j) vstore(dst + (c + j) * rows + r, t[j]);
                }
}
