/* GEGLU, a * gelu(g) over the two halves [a, g] of each row, forward and backward in one pass each (the
 * PyTorch path takes a gelu, a product and, in the backward, a gelu derivative, two products and the
 * concatenation of the two halves' gradients, each a pass over memory of its own).
 *
 * The exact gelu(g) = g Phi(g), with the normal distribution's tail Q = Phi(-|g|) = 0.5 erfc(x),
 * x = |g| / sqrt 2, written as 0.5 erfcx(x) exp(-x^2): erfcx(x) = exp(x^2) erfc(x) is smooth and slowly
 * varying, fitted here by a degree-9 polynomial in t = 1 / (1 + 0.47047 x) (least squares in relative
 * error on [0, 9.4]: 1.4e-8 in float64, about 3e-7 evaluated in float32). So Phi keeps its relative
 * accuracy far into the negative tail, where 1 + erf(x) loses it. The backward's gelu'(g) = Phi(g) +
 * g phi(g) reuses the same exponential (phi(g) = exp(-g^2 / 2) / sqrt(2 pi)).
 *
 * Written in vectors of the processor's width (vector.h's vn: 16 floats with AVX-512, 8 with AVX2), so the
 * polynomial's terms stay in registers either way; a row's last, partial vector is loaded and stored
 * masked.
 *
 * Layout: h rows of stride ld (>= 2n), a = h[r][0:n], g = h[r][n:2n]; out and dout rows of n, contiguous;
 * dh rows of 2n, contiguous. Rows are split over OpenMP threads.
 */
#include <stdint.h>

#include "vector.h"

/* Phi(g) and, when pdf is not NULL, phi(g). */
static inline vn normal_cdf(vn g, vn *pdf) {
    const vni sign = (vni)g & (int32_t)0x80000000;
    const vn x = (vn)((vni)g ^ sign) * 0.70710678118654752f;  /* |g| / sqrt 2 */
    const vn t = 1.0f / (1.0f + 0.47047f * x);
    const vn erfcx = 1.32765572e-05f + t * (0.265081465f + t * (0.269518316f + t * (0.208987519f + t * (
        0.290709823f + t * (-0.212598056f + t * (0.579746127f + t * (-0.656029165f + t * (0.309931487f +
        t * -0.0553608276f))))))));
    const vn e = nexp(-0.5f * g * g);
    const vn q = 0.5f * erfcx * e;
    if (pdf) *pdf = e * 0.39894228040143268f;
    return nsel(g < 0.0f, q, 1.0f - q);  /* Phi = Q below 0, 1 - Q above */
}

/* One vector of rows' elements (k of them, k <= NW): out = a gelu(g); with d (dout) given, da and dg instead. */
static inline __attribute__((always_inline)) void geglu_vector(const float *a, const float *g, const float *d,
                                                             float *o, float *da, float *dg, int64_t k) {
    const int full = k == NW;
    const vn gv = full ? nload(g) : nloadn(g, k), av = full ? nload(a) : nloadn(a, k);
    if (!d) {
        const vn r = av * gv * normal_cdf(gv, 0);
        if (full) nstore(o, r); else nstoren(o, r, k);
        return;
    }
    const vn dv = full ? nload(d) : nloadn(d, k);
    vn pdf;
    const vn cdf = normal_cdf(gv, &pdf), ra = dv * gv * cdf, rg = dv * av * (cdf + gv * pdf);
    if (full) { nstore(da, ra); nstore(dg, rg); } else { nstoren(da, ra, k); nstoren(dg, rg, k); }
}

static void geglu(int64_t rows, int64_t n, int64_t ld, const float *h, const float *dout, float *out, float *dh) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *a = h + r * ld, *g = a + n, *d = dout ? dout + r * n : 0;
        float *o = out ? out + r * n : 0, *da = dh ? dh + r * 2 * n : 0, *dg = da ? da + n : 0;
        int64_t i = 0;
        for (; i + NW <= n; i += NW)
            geglu_vector(a + i, g + i, d ? d + i : 0, o ? o + i : 0, da ? da + i : 0, dg ? dg + i : 0, NW);
        if (i < n) geglu_vector(a + i, g + i, d ? d + i : 0, o ? o + i : 0, da ? da + i : 0, dg ? dg + i : 0, n - i);
    }
}

void perceivers_geglu(int64_t rows, int64_t n, int64_t ld, const float *h, float *out) {
    geglu(rows, n, ld, h, 0, out, 0);
}

void perceivers_geglu_backward(int64_t rows, int64_t n, int64_t ld, const float *h, const float *dout, float *dh) {
    geglu(rows, n, ld, h, dout, 0, dh);
}
