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
 * dh rows of 2n, contiguous; bias NULL or 2n values added to every row of h first (the preceding product's bias,
 * so that the product need not broadcast it into its output; dh is the gradient of h + bias, which is also the
 * bias's summed over the rows). Rows are split over OpenMP threads. float32 rows (perceivers_geglu*) and bfloat16
 * ones (perceivers_geglu_bf16*: widened as loaded, computed in float32, rounded once to nearest even as stored).
 *
 * GLU, a * sigmoid(g) over the same halves (flash-attn's GatedMlp, FlashPerceiver's MLPs; perceivers_glu*), runs
 * through the same loops: PyTorch's glu takes a sigmoid and a product forward and, backward, the sigmoid again, its
 * derivative's products and the halves' concatenation.
 *
 * The tanh-approximated GELU (DeepMind's jax.nn.gelu, PyTorch's approximate="tanh"), y = x s with
 * s = (1 + tanh u) / 2 = 1 / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3), over count contiguous
 * elements (perceivers_gelu_tanh*; with a bias, count / n rows of n, bias[n] added to each first): PyTorch's own
 * loop evaluates a tanh five times slower than its exact GELU. Written through the logistic function, the value
 * keeps its relative accuracy in the negative tail (where 1 + tanh u cancels). The derivative is
 * s (1 + 2 x u' (1 - s)), 1 - s = s exp(-2u). Beyond |x| = 10 the value is x or 0 and the derivative 1 or 0 to
 * float32's precision, so x is clamped there (no overflow in x^3 or the exponential, and gelu(-inf) = 0,
 * gelu'(+-inf) = 1 and 0 where PyTorch's formula gives NaN).
 */
#include <math.h>
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

static inline vn geglu_value(vn a, vn g) { return a * g * normal_cdf(g, 0); }

/* da = d gelu(g), dg = d a gelu'(g) */
static inline void geglu_grads(vn a, vn g, vn d, vn *da, vn *dg) {
    vn pdf;
    const vn cdf = normal_cdf(g, &pdf);
    *da = d * g * cdf;
    *dg = d * a * (cdf + g * pdf);
}

/* GLU's sigmoid gate, a * s(g), s = 1 / (1 + exp(-g)): from e = exp(-|g|) (never overflowing), the larger of s and
 * 1 - s is 1 / (1 + e) and the smaller e / (1 + e), so both keep their relative accuracy in the tails. */
static inline vn sigmoid_parts(vn g, vn *smaller) {
    const vn e = nexp(-(vn)((vni)g & (int32_t)0x7fffffff));
    const vn larger = 1.0f / (1.0f + e);
    *smaller = e * larger;
    return larger;
}

static inline vn glu_value(vn a, vn g) {
    vn smaller;
    const vn larger = sigmoid_parts(g, &smaller);
    return a * nsel(g < 0.0f, smaller, larger);
}

/* da = d s(g), dg = d a s(g) (1 - s(g)) */
static inline void glu_grads(vn a, vn g, vn d, vn *da, vn *dg) {
    vn smaller;
    const vn larger = sigmoid_parts(g, &smaller);
    *da = d * nsel(g < 0.0f, smaller, larger);
    *dg = d * a * (larger * smaller);
}

/* x, plus the bias's b where there is a bias (the product's bias, added here instead of in the product). */
#define BIASED(x, b) (bias ? (x) + (b) : (x))

/* A gated activation's (GEGLU's or GLU's: VALUE and GRADS) forward and backward for one storage type T, loaded
 * and stored through LOAD/LOADN/STORE/STOREN (the N forms take a row's last, partial vector of k < NW elements). */
#define DEFINE_GATED(NAME, VALUE, GRADS, SUFFIX, T, LOAD, LOADN, STORE, STOREN)                                   \
    void perceivers_##NAME##SUFFIX(int64_t rows, int64_t n, int64_t ld, const T *h, const T *bias, T *out) {      \
        _Pragma("omp parallel for schedule(static)")                                                              \
        for (int64_t r = 0; r < rows; ++r) {                                                                      \
            const T *a = h + r * ld, *g = a + n;                                                                  \
            T *o = out + r * n;                                                                                   \
            int64_t i = 0;                                                                                        \
            for (; i + NW <= n; i += NW)                                                                          \
                STORE(o + i, VALUE(BIASED(LOAD(a + i), LOAD(bias + i)), BIASED(LOAD(g + i), LOAD(bias + n + i))));\
            if (i < n) {                                                                                          \
                const int64_t k = n - i;                                                                          \
                STOREN(o + i, VALUE(BIASED(LOADN(a + i, k), LOADN(bias + i, k)),                                 \
                                    BIASED(LOADN(g + i, k), LOADN(bias + n + i, k))), k);                         \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    void perceivers_##NAME##SUFFIX##_backward(int64_t rows, int64_t n, int64_t ld, const T *h, const T *bias,     \
                                              const T *dout, T *dh) {                                             \
        _Pragma("omp parallel for schedule(static)")                                                              \
        for (int64_t r = 0; r < rows; ++r) {                                                                      \
            const T *a = h + r * ld, *g = a + n, *d = dout + r * n;                                               \
            T *da = dh + r * 2 * n, *dg = da + n;                                                                 \
            vn ra, rg;                                                                                            \
            int64_t i = 0;                                                                                        \
            for (; i + NW <= n; i += NW) {                                                                        \
                GRADS(BIASED(LOAD(a + i), LOAD(bias + i)), BIASED(LOAD(g + i), LOAD(bias + n + i)),               \
                      LOAD(d + i), &ra, &rg);                                                                     \
                STORE(da + i, ra);                                                                                \
                STORE(dg + i, rg);                                                                                \
            }                                                                                                     \
            if (i < n) {                                                                                          \
                const int64_t k = n - i;                                                                          \
                GRADS(BIASED(LOADN(a + i, k), LOADN(bias + i, k)),                                                \
                      BIASED(LOADN(g + i, k), LOADN(bias + n + i, k)), LOADN(d + i, k), &ra, &rg);                \
                STOREN(da + i, ra, k);                                                                            \
                STOREN(dg + i, rg, k);                                                                            \
            }                                                                                                     \
        }                                                                                                         \
    }

DEFINE_GATED(geglu, geglu_value, geglu_grads, , float, nload, nloadn, nstore, nstoren)
DEFINE_GATED(glu, glu_value, glu_grads, , float, nload, nloadn, nstore, nstoren)
/* bfloat16 rows (uint16_t): widened to float32 as they are loaded, computed in float32, rounded once as stored */
DEFINE_GATED(geglu, geglu_value, geglu_grads, _bf16, uint16_t, nload_bf16, nloadn_bf16, nstore_bf16, nstoren_bf16)
DEFINE_GATED(glu, glu_value, glu_grads, _bf16, uint16_t, nload_bf16, nloadn_bf16, nstore_bf16, nstoren_bf16)

/* tanh GELU: the logistic s = 1 / (1 + e), e = exp(-2u), of c, the input clamped to [-10, 10] (NaN passes);
 * with du given, also c and u'(c) for the derivative. */
static inline vn gelu_tanh_logistic(vn x, vn *e, vn *c_out, vn *du) {
    const vn c = nsel(x > 10.0f, nbcast(10.0f), nsel(x < -10.0f, nbcast(-10.0f), x));
    const vn c2 = c * c;
    const vn u = 0.79788456080286536f * c * (1.0f + 0.044715f * c2);
    if (du) {
        *du = 0.79788456080286536f * (1.0f + 0.134145f * c2);
        *c_out = c;
    }
    *e = nexp(-2.0f * u);
    return 1.0f / (1.0f + *e);
}

static inline vn gelu_tanh_value(vn x) {
    vn e;
    const vn s = gelu_tanh_logistic(x, &e, 0, 0);
    return nsel(x < -10.0f, nbcast(0.0f), x * s);
}

/* d gelu(x) */
static inline vn gelu_tanh_grad(vn x, vn d) {
    vn e, c, du;
    const vn s = gelu_tanh_logistic(x, &e, &c, &du);
    return nsel(x < -10.0f, nbcast(0.0f), d * s * (1.0f + 2.0f * c * du * (e * s)));
}

/* count elements, in blocks of GELU_BLOCK over OpenMP threads; with a bias, rows of n (bias[n] added to each) over
 * the threads */
#define GELU_BLOCK 4096
#define DEFINE_GELU_TANH(SUFFIX, T, LOAD, LOADN, STORE, STOREN)                                                   \
    void perceivers_gelu_tanh##SUFFIX(int64_t count, int64_t n, const T *x, const T *bias, T *out) {              \
        const int64_t span = bias ? n : GELU_BLOCK;                                                               \
        _Pragma("omp parallel for schedule(static)")                                                              \
        for (int64_t b = 0; b < count; b += span) {                                                               \
            const int64_t end = b + span < count ? b + span : count;                                              \
            int64_t i = b;                                                                                        \
            for (; i + NW <= end; i += NW)                                                                        \
                STORE(out + i, gelu_tanh_value(BIASED(LOAD(x + i), LOAD(bias + i - b))));                         \
            if (i < end)                                                                                          \
                STOREN(out + i, gelu_tanh_value(BIASED(LOADN(x + i, end - i), LOADN(bias + i - b, end - i))),     \
                       end - i);                                                                                  \
        }                                                                                                         \
    }                                                                                                             \
    void perceivers_gelu_tanh##SUFFIX##_backward(int64_t count, int64_t n, const T *x, const T *bias,             \
                                                 const T *dout, T *dx) {                                          \
        const int64_t span = bias ? n : GELU_BLOCK;                                                               \
        _Pragma("omp parallel for schedule(static)")                                                              \
        for (int64_t b = 0; b < count; b += span) {                                                               \
            const int64_t end = b + span < count ? b + span : count;                                              \
            int64_t i = b;                                                                                        \
            for (; i + NW <= end; i += NW)                                                                        \
                STORE(dx + i, gelu_tanh_grad(BIASED(LOAD(x + i), LOAD(bias + i - b)), LOAD(dout + i)));           \
            if (i < end)                                                                                          \
                STOREN(dx + i, gelu_tanh_grad(BIASED(LOADN(x + i, end - i), LOADN(bias + i - b, end - i)),        \
                                              LOADN(dout + i, end - i)), end - i);                                \
        }                                                                                                         \
    }

DEFINE_GELU_TANH(, float, nload, nloadn, nstore, nstoren)
DEFINE_GELU_TANH(_bf16, uint16_t, nload_bf16, nloadn_bf16, nstore_bf16, nstoren_bf16)

/* Softmax over rows of n contiguous elements (perceivers_softmax*), out = exp(x - max) / sum, in three passes
 * over a row: its maximum, the exponentials and their sum (float32 lanes), the scaling by 1 / sum. The
 * exponentials are taken of x - max + SOFTMAX_SHIFT, which leaves their ratios alone but keeps those that
 * underflow below e^-87 (exp's range, vector.h) until the scaling, whose product rounds them to the subnormal
 * probabilities PyTorch gives (down to e^-103); the sum stays far from overflowing. A NaN, a +inf
 * or a row of -inf gives a row of NaN, as in PyTorch. bfloat16 rows keep their exponentials in a float32 buffer
 * per thread (rows of at most SOFTMAX_BUF elements; longer ones compute them again in the third pass), so the
 * result is rounded once. Rows are split over OpenMP threads from SOFTMAX_SERIAL elements on. (The backward,
 * p (d - sum(d p)), is PyTorch's: as fast.) */
#define SOFTMAX_BUF 4096
#define SOFTMAX_SHIFT 20.0f
#define SOFTMAX_SERIAL 16384 /* elements: smaller calls stay on the calling thread */
#define DEFINE_SOFTMAX(SUFFIX, T, LOAD, LOADN, STORE, STOREN, KEEP)                                              \
    void perceivers_softmax##SUFFIX(int64_t rows, int64_t n, const T *x, T *out) {                                \
        _Pragma("omp parallel for schedule(static) if (rows * n >= SOFTMAX_SERIAL)")                              \
        for (int64_t r = 0; r < rows; ++r) {                                                                      \
            const T *xr = x + r * n;                                                                              \
            T *o = out + r * n;                                                                                   \
            float buf[KEEP ? SOFTMAX_BUF : 1];                                                                    \
            float *e = KEEP && n <= SOFTMAX_BUF ? buf : 0;                                                        \
            vn m = nbcast(-INFINITY);                                                                             \
            int64_t i = 0;                                                                                        \
            for (; i + NW <= n; i += NW) m = nmax(m, LOAD(xr + i));                                               \
            if (i < n) m = nmax(m, ntail(LOADN(xr + i, n - i), n - i, -INFINITY));                                \
            const vn top = nbcast(nhmax(m) - SOFTMAX_SHIFT);                                                      \
            vn s = nbcast(0.0f);                                                                                  \
            for (i = 0; i + NW <= n; i += NW) {                                                                   \
                const vn v = nexp(LOAD(xr + i) - top);                                                            \
                s += v;                                                                                           \
                if (e) nstore(e + i, v); else if (!KEEP) STORE(o + i, v);                                         \
            }                                                                                                     \
            if (i < n) {                                                                                          \
                const vn v = ntail(nexp(LOADN(xr + i, n - i) - top), n - i, 0.0f);                                \
                s += v;                                                                                           \
                if (e) nstoren(e + i, v, n - i); else if (!KEEP) STOREN(o + i, v, n - i);                         \
            }                                                                                                     \
            const vn inv = nbcast(1.0f / nhsum(s));                                                               \
            for (i = 0; i + NW <= n; i += NW)                                                                     \
                STORE(o + i, (e ? nload(e + i) : KEEP ? nexp(LOAD(xr + i) - top) : LOAD(o + i)) * inv);           \
            if (i < n)                                                                                            \
                STOREN(o + i, (e ? nloadn(e + i, n - i) : KEEP ? nexp(LOADN(xr + i, n - i) - top)                 \
                               : LOADN(o + i, n - i)) * inv, n - i);                                              \
        }                                                                                                         \
    }

DEFINE_SOFTMAX(, float, nload, nloadn, nstore, nstoren, 0)
DEFINE_SOFTMAX(_bf16, uint16_t, nload_bf16, nloadn_bf16, nstore_bf16, nstoren_bf16, 1)
