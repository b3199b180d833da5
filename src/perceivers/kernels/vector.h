/* Vectors through the compiler's vector extensions, shared by the native kernels: 16-float vectors (one
 * AVX-512 register, two AVX2 ones: loads and stores, exp and 16 x 16 transposes) and vectors of the
 * processor's own width (vn, below: loads and stores, selection, maxima, sums and exp). */
#ifndef PERCEIVERS_VECTOR_H
#define PERCEIVERS_VECTOR_H

#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

static inline v16 vbcast(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline v16 vload(const float *p) { v16 r; memcpy(&r, p, 64); return r; }
static inline void vstore(float *p, v16 x) { memcpy(p, &x, 64); }

/* exp(x) = 2^k e^y, k = round(x log2 e), y = x - k ln2 (|y| <= ln2/2), e^y by a degree-6 series (relative
 * error below 2.4e-7 on [-60, 10]); exactly 0 below -87 (so exp(-inf) = 0, and no denormals); NaN stays
 * NaN. With AVX-512 vscalefps applies 2^k (no exponent bits, no selects); elsewhere the bits are built. */
/* Written for any float vector type (GCC broadcasts the scalars); the int vector type I is as wide. */
#define EXP_SERIES(y) \
    (1.0f + (y) * (1.0f + (y) * (0.5f + (y) * (0.16666667f + (y) * (0.041666668f + (y) * (0.0083333338f + (y) * 0.0013888889f))))))
/* x - k ln2 in two steps (Cody and Waite: ln2's leading bits times k are exact), |result| <= ln2/2 */
#define EXP_REDUCE(x, k) (((x) - (k) * 0.693359375f) - (k) * -2.12194440e-4f)
/* exp with 2^k built in the exponent bits, for a float vector type V and its int vector type I */
#define DEFINE_EXP_BITS(NAME, V, I)                                                  \
    static inline V NAME(V x0) {                                                     \
        const I low = x0 < -87.0f;                                                   \
        const V x = (V)(((I)x0 & ~low) | ((I)((V){0} - 87.0f) & low));               \
        const V t = x * 1.44269504088896341f;                                        \
        const V k = (t + 12582912.0f) - 12582912.0f; /* rounds: 1.5 * 2^23 */        \
        const V p = EXP_SERIES(EXP_REDUCE(x, k));                                    \
        const I bits = (__builtin_convertvector(k, I) + 127) << 23;                  \
        return (V)((I)(p * (V)bits) & ~low);                                         \
    }
#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16 vexp(v16 x0) {
    const __m512 low = _mm512_set1_ps(-87.0f);
    const __m512 x = _mm512_max_ps(low, (__m512)x0);  /* a NaN x0 comes through: max returns its second operand */
    const v16 t = (v16)x * vbcast(1.44269504088896341f);
    const __m512 k = _mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const v16 p = EXP_SERIES(EXP_REDUCE((v16)x, (v16)k));
    return (v16)_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask((__m512)x0, low, _CMP_NLT_UQ), (__m512)p, k);
}
#else
DEFINE_EXP_BITS(vexp, v16, i16)
#endif

/* Two-vector shuffles by constant indices: GCC 12+ and clang take them as arguments, older GCC as a vector. */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (i16){__VA_ARGS__})
#endif

/* Round d of a tile transpose: rows r (bit d clear) and r + d exchange the elements whose column index has
 * bit d set in row r and clear in row r + d, which swaps that bit of the row index with the column's. */
#define TRANSPOSE_ROUND(t, d, LO, HI)                    \
    for (int r = 0; r < 16; ++r)                         \
        if (!(r & (d))) {                                \
            const v16 a = t[r], b = t[r + (d)];          \
            t[r] = SHUFFLE(a, b, LO);                    \
            t[r + (d)] = SHUFFLE(a, b, HI);              \
        }

#define TRANSPOSE_LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define TRANSPOSE_HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define TRANSPOSE_LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define TRANSPOSE_HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define TRANSPOSE_LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define TRANSPOSE_HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define TRANSPOSE_LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define TRANSPOSE_HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31

/* A 16 x 16 tile transposed in registers: four rounds of two-vector shuffles. */
static inline void tile_transpose(v16 t[16]) {
    TRANSPOSE_ROUND(t, 1, TRANSPOSE_LO1, TRANSPOSE_HI1)
    TRANSPOSE_ROUND(t, 2, TRANSPOSE_LO2, TRANSPOSE_HI2)
    TRANSPOSE_ROUND(t, 4, TRANSPOSE_LO4, TRANSPOSE_HI4)
    TRANSPOSE_ROUND(t, 8, TRANSPOSE_LO8, TRANSPOSE_HI8)
}

/* Vectors of the processor's own width, for loops that keep a dozen accumulators in registers (the grid,
 * attention and GEGLU kernels): vn holds NW floats, 16 with AVX-512 (a v16), 8 elsewhere (one AVX2 register; a v16 takes two
 * there, and sixteen registers do not hold such a loop's accumulators). */
#if defined(__AVX512F__)
#define NW 16
typedef v16 vn;
typedef i16 vni;
#define nexp vexp
#else
#define NW 8
typedef float vn __attribute__((vector_size(32)));
typedef int32_t vni __attribute__((vector_size(32)));
DEFINE_EXP_BITS(nexp, vn, vni)
#endif
typedef double vnd __attribute__((vector_size(NW * 8)));

/* (Not `(vn){0} + x`: without -ffast-math the compiler must keep that addition, as -0 + 0 = +0, and it costs
 * the broadcast its memory operand.) */
#if NW == 16
static inline vn nbcast(float x) { return vbcast(x); }
#else
static inline vn nbcast(float x) { return (vn){x, x, x, x, x, x, x, x}; }
#endif
static inline vn nload(const float *p) { vn r; memcpy(&r, p, sizeof r); return r; }
static inline void nstore(float *p, vn x) { memcpy(p, &x, sizeof x); }
/* The first n floats (n < NW) at p, zeros after; and their store: masked moves where there are some. */
#if defined(__AVX512F__)
static inline vn nloadn(const float *p, int64_t n) { return (vn)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline void nstoren(float *p, vn x, int64_t n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)x); }
#elif defined(__AVX2__)
#include <immintrin.h>
static inline __m256i nfirst(int64_t n) { return (__m256i)((vni){0, 1, 2, 3, 4, 5, 6, 7} < (int32_t)n); }
static inline vn nloadn(const float *p, int64_t n) { return (vn)_mm256_maskload_ps(p, nfirst(n)); }
static inline void nstoren(float *p, vn x, int64_t n) { _mm256_maskstore_ps(p, nfirst(n), (__m256)x); }
#else
static inline vn nloadn(const float *p, int64_t n) { vn r = {0}; memcpy(&r, p, (size_t)n * sizeof(float)); return r; }
static inline void nstoren(float *p, vn x, int64_t n) { memcpy(p, &x, (size_t)n * sizeof(float)); }
#endif
/* bfloat16 storage (uint16_t, the upper half of a float's bits): NW of them widened to floats (exactly), and
 * floats rounded to them to nearest even as PyTorch rounds (a NaN stays a quiet NaN); the first n (n < NW) alike. */
typedef uint16_t nbf __attribute__((vector_size(NW * 2)));
typedef uint32_t vnu __attribute__((vector_size(NW * 4)));
#if NW == 16  /* one vpmovzxwd (GCC splits the conversion below in halves, 4 shuffles, where it prefers 256 bits) */
static inline vn nwiden_bf16(nbf h) { return (vn)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16); }
#else
static inline vn nwiden_bf16(nbf h) { return (vn)(__builtin_convertvector(h, vnu) << 16); }
#endif
static inline nbf nround_bf16_bits(vn x) {
    const vnu u = (vnu)x, nan = (vnu)(x != x);
    const vnu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return __builtin_convertvector((rounded & ~nan) | (((u >> 16) | 0x40u) & nan), nbf);
}
#if defined(__AVX512BF16__) && NW == 16
/* One instruction, same rule, except that it flushes subnormal floats to zero (PyTorch rounds them like the
 * others: a softmax's far tail): a vector holding one is rounded in integers instead. */
static inline nbf nround_bf16(vn x) {
    const __m512 a = _mm512_abs_ps((__m512)x);
    if (_mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(a, _mm512_set1_ps(1.17549435e-38f), _CMP_LT_OQ), a,
                                _mm512_setzero_ps(), _CMP_GT_OQ))
        return nround_bf16_bits(x);
    return (nbf)_mm512_cvtneps_pbh((__m512)x);
}
#else
#define nround_bf16 nround_bf16_bits
#endif
static inline vn nload_bf16(const uint16_t *p) { nbf h; memcpy(&h, p, sizeof h); return nwiden_bf16(h); }
static inline vn nloadn_bf16(const uint16_t *p, int64_t n) { nbf h = {0}; memcpy(&h, p, (size_t)n * 2); return nwiden_bf16(h); }
static inline void nstore_bf16(uint16_t *p, vn x) { const nbf h = nround_bf16(x); memcpy(p, &h, sizeof h); }
static inline void nstoren_bf16(uint16_t *p, vn x, int64_t n) { const nbf h = nround_bf16(x); memcpy(p, &h, (size_t)n * 2); }
/* x with its lanes from n on set to fill. */
static inline vn ntail(vn x, int64_t n, float fill) { for (int64_t l = n; l < NW; ++l) x[l] = fill; return x; }
/* a where m is set, b elsewhere. */
static inline vn nsel(vni m, vn a, vn b) { return (vn)(((vni)a & m) | ((vni)b & ~m)); }
/* The larger of a and b; b where either is NaN (maxps's rule). */
#if defined(__AVX512F__)
static inline vn nmax(vn a, vn b) { return (vn)_mm512_max_ps((__m512)a, (__m512)b); }
#elif defined(__AVX2__)
static inline vn nmax(vn a, vn b) { return (vn)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vn nmax(vn a, vn b) { return nsel(a > b, a, b); }
#endif
/* The larger of a and b, NaN where either is (as PyTorch's max, unlike nmax). */
static inline vn nmaxnan(vn a, vn b) { return nsel((a > b) | (a != a), a, b); }
/* Whether any lane of m is set. */
#if defined(__AVX512F__)
static inline int nany(vni m) { return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0; }
#elif defined(__AVX2__)
static inline int nany(vni m) { return _mm256_movemask_ps((__m256)m) != 0; }
#else
static inline int nany(vni m) { for (int l = 0; l < NW; ++l) if (m[l]) return 1; return 0; }
#endif
/* Sum and maximum of the lanes, in halving steps (upper half onto lower: the intrinsics' order too); the sum of
 * double lanes. */
#if defined(__AVX512F__)
static inline float nhsum(vn x) { return _mm512_reduce_add_ps((__m512)x); }
static inline float nhmax(vn x) { return _mm512_reduce_max_ps((__m512)x); }
#else
static inline float nhsum(vn x) {
    float t[NW];
    memcpy(t, &x, sizeof t);
    for (int w = NW / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) t[l] += t[l + w];
    return t[0];
}
static inline float nhmax(vn x) {
    float t[NW];
    memcpy(t, &x, sizeof t);
    for (int w = NW / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) t[l] = t[l] > t[l + w] ? t[l] : t[l + w];
    return t[0];
}
#endif
static inline vnd nwiden(vn x) { return __builtin_convertvector(x, vnd); }
static inline double ndsum(vnd x) {
    double t = 0.0;
    for (int l = 0; l < NW; ++l) t += x[l];
    return t;
}

#endif
