/* A float32 matrix transposed into a contiguous one: 16 x 16 tiles transposed in registers (four rounds
 * of two-vector shuffles, each exchanging one bit of the row index with the same bit of the column
 * index), in 64 x 64 blocks split over OpenMP threads.
 *
 * src: rows x cols with row stride ld (channels contiguous); dst: cols x rows, contiguous.
 */
#include <stdint.h>
#include <string.h>

#include "vector.h"

#define TILE 16
#define BLOCK 64

/* Round with distance d: rows r (bit d clear) and r + d exchange the column halves whose bit d differs. */
#define ROUND(t, d, lo0, lo1, lo2, lo3, lo4, lo5, lo6, lo7, lo8, lo9, lo10, lo11, lo12, lo13, lo14, lo15,  \
              hi0, hi1, hi2, hi3, hi4, hi5, hi6, hi7, hi8, hi9, hi10, hi11, hi12, hi13, hi14, hi15)           \
    for (int r = 0; r < TILE; ++r)                                                                          \
        if (!(r & (d))) {                                                                                   \
            const v16 a = t[r], b = t[r + (d)];                                                             \
            t[r] = __builtin_shufflevector(a, b, lo0, lo1, lo2, lo3, lo4, lo5, lo6, lo7, lo8, lo9, lo10,    \
                                           lo11, lo12, lo13, lo14, lo15);                                   \
            t[r + (d)] = __builtin_shufflevector(a, b, hi0, hi1, hi2, hi3, hi4, hi5, hi6, hi7, hi8, hi9,    \
                                                 hi10, hi11, hi12, hi13, hi14, hi15);                       \
        }

static inline void tile_transpose(v16 t[TILE]) {
    ROUND(t, 1, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30,
          1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31)
    ROUND(t, 2, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29,
          2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31)
    ROUND(t, 4, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27,
          4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31)
    ROUND(t, 8, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23,
          8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31)
}

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
