/* A float32 matrix transposed into a contiguous one: 16 x 16 tiles transposed in registers (four rounds
 * of two-vector shuffles, each exchanging one bit of the row index with the same bit of the column
 * index), in 64 x 64 blocks split over OpenMP threads.
 *
 * src: rows x cols with row stride ld (channels contiguous); dst: cols x rows, contiguous.
 */
#include <stdint.h>

#include "vector.h"

#define TILE 16
#define BLOCK 64

/* Two-vector shuffles by constant indices: GCC 12+ and clang take them as arguments, older GCC as a vector. */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (i16){__VA_ARGS__})
#endif

/* Round d: rows r (bit d clear) and r + d exchange the elements whose column index has bit d set in
 * row r and clear in row r + d, which swaps that bit of the row index with the same bit of the column's. */
#define ROUND(t, d, LO, HI)                              \
    for (int r = 0; r < TILE; ++r)                       \
        if (!(r & (d))) {                                \
            const v16 a = t[r], b = t[r + (d)];          \
            t[r] = SHUFFLE(a, b, LO);                    \
            t[r + (d)] = SHUFFLE(a, b, HI);              \
        }
#define LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31

static inline void tile_transpose(v16 t[TILE]) {
    ROUND(t, 1, LO1, HI1)
    ROUND(t, 2, LO2, HI2)
    ROUND(t, 4, LO4, HI4)
    ROUND(t, 8, LO8, HI8)
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
