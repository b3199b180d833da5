/* 16-float vectors (one AVX-512 register, two AVX2 ones) through the compiler's vector extensions, shared
 * by the native kernels: loads and stores, selection, maximum and exp. */
#ifndef PERCEIVERS_VECTOR_H
#define PERCEIVERS_VECTOR_H

#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

static inline v16 vbcast(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline v16 vload(const float *p) { v16 r; memcpy(&r, p, 64); return r; }
static inline void vstore(float *p, v16 x) { memcpy(p, &x, 64); }
static inline v16 vsel(i16 m, v16 a, v16 b) {
    i16 ai, bi, r;
    v16 o;
    memcpy(&ai, &a, 64);
    memcpy(&bi, &b, 64);
    r = (ai & m) | (bi & ~m);
    memcpy(&o, &r, 64);
    return o;
}
/* The larger of a and b, NaN where either is (as PyTorch's max), so that a NaN score reaches the output. */
static inline v16 vmax(v16 a, v16 b) { return vsel((a > b) | (a != a), a, b); }
static inline int any(i16 m) { for (int i = 0; i < 16; ++i) if (m[i]) return 1; return 0; }

/* exp(x) by 2^k (exponent bits) times a degree-6 series on |f| <= ln2/2 (relative error ~2e-7); exactly 0
 * below -87, so exp(-inf) = 0; NaN stays NaN. */
static inline v16 vexp(v16 x0) {
    const v16 x = vsel(x0 < vbcast(-87.0f), vbcast(-87.0f), x0);
    const v16 t = x * vbcast(1.44269504088896341f);
    const v16 magic = vbcast(12582912.0f);  /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const v16 k = (t + magic) - magic;
    const v16 y = (t - k) * vbcast(0.69314718055994531f);
    const v16 p = vbcast(1.0f) + y * (vbcast(1.0f) + y * (vbcast(0.5f) + y * (vbcast(0.16666667f) + y * (
        vbcast(0.041666668f) + y * (vbcast(0.0083333338f) + y * vbcast(0.0013888889f))))));
    const i16 bits = (__builtin_convertvector(k, i16) + 127) << 23;
    v16 s;
    memcpy(&s, &bits, 64);
    return vsel(x0 < vbcast(-87.0f), vbcast(0.0f), p * s);
}

#endif
