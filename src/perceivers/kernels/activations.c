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
 * Layout: h rows of stride ld (>= 2n), a = h[r][0:n], g = h[r][n:2n]; out and dout rows of n, contiguous;
 * dh rows of 2n, contiguous. Rows are split over OpenMP threads.
 */
#include <stdint.h>

#include "vector.h"

/* Phi(g) and, when pdf is not NULL, phi(g). */
static inline v16 normal_cdf(v16 g, v16 *pdf) {
    const v16 x = vmax(g, -g) * vbcast(0.70710678118654752f);
    const v16 t = vbcast(1.0f) / (vbcast(1.0f) + vbcast(0.47047f) * x);
    const v16 erfcx = vbcast(1.32765572e-05f) + t * (vbcast(0.265081465f) + t * (vbcast(0.269518316f) + t * (
        vbcast(0.208987519f) + t * (vbcast(0.290709823f) + t * (vbcast(-0.212598056f) + t * (vbcast(0.579746127f) +
        t * (vbcast(-0.656029165f) + t * (vbcast(0.309931487f) + t * vbcast(-0.0553608276f)))))))));
    const v16 e = vexp(vbcast(-0.5f) * g * g);
    const v16 q = vbcast(0.5f) * erfcx * e;
    if (pdf) *pdf = e * vbcast(0.39894228040143268f);
    return vsel(g >= vbcast(0.0f), vbcast(1.0f) - q, q);
}

/* Up to 16 floats from p (k of them; the rest 0), and back. */
static inline v16 vload_n(const float *p, int64_t k) { v16 r = vbcast(0.0f); memcpy(&r, p, 4 * k); return r; }
static inline void vstore_n(float *p, v16 x, int64_t k) { memcpy(p, &x, 4 * k); }

/* One vector of rows' elements: out = a gelu(g); with d (dout) given, da and dg instead. */
static inline __attribute__((always_inline)) void geglu16(const float *a, const float *g, const float *d, float *o,
                                                        float *da, float *dg, int64_t k) {
    const int full = k == 16;  /* the row's last vector may be partial: copied through a padded one */
    const v16 gv = full ? vload(g) : vload_n(g, k), av = full ? vload(a) : vload_n(a, k);
    if (!d) {
        const v16 r = av * gv * normal_cdf(gv, 0);
        if (full) vstore(o, r); else vstore_n(o, r, k);
        return;
    }
    const v16 dv = full ? vload(d) : vload_n(d, k);
    v16 pdf;
    const v16 cdf = normal_cdf(gv, &pdf), ra = dv * gv * cdf, rg = dv * av * (cdf + gv * pdf);
    if (full) { vstore(da, ra); vstore(dg, rg); } else { vstore_n(da, ra, k); vstore_n(dg, rg, k); }
}

static void geglu(int64_t rows, int64_t n, int64_t ld, const float *h, const float *dout, float *out, float *dh) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *a = h + r * ld, *g = a + n, *d = dout ? dout + r * n : 0;
        float *o = out ? out + r * n : 0, *da = dh ? dh + r * 2 * n : 0, *dg = da ? da + n : 0;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16)
            geglu16(a + i, g + i, d ? d + i : 0, o ? o + i : 0, da ? da + i : 0, dg ? dg + i : 0, 16);
        if (i < n) geglu16(a + i, g + i, d ? d + i : 0, o ? o + i : 0, da ? da + i : 0, dg ? dg + i : 0, n - i);
    }
}

void perceivers_geglu(int64_t rows, int64_t n, int64_t ld, const float *h, float *out) {
    geglu(rows, n, ld, h, 0, out, 0);
}

void perceivers_geglu_backward(int64_t rows, int64_t n, int64_t ld, const float *h, const float *dout, float *dh) {
    geglu(rows, n, ld, h, dout, 0, dh);
}
