/* Cross-attention of a few queries over an image grid whose keys are [pixels, position features]
 * after a LayerNorm, attended in the context's own space (see perceivers/kernels/grid.py for the
 * algebra). Per query row r and pixel n = (i, j) of the grid:
 *
 *   score(r, n) = sum_c U[r, c] P[c, n] + U[r, D] P[D + 1, n] + P[D, n] * (AY[r, i] + AX[r, j])
 *
 * where the planes P hold, per pixel, the D data channels times 1/sigma_n, 1/sigma_n and
 * mu_n/sigma_n (LayerNorm statistics of the whole feature vector, computed by the caller). The
 * position features enter only through the per-axis tables AY and AX, so a score costs D + 2
 * multiply-adds instead of one per context channel. The kernel keeps a running (online) softmax
 * per row: m (its reference maximum), S = sum exp(score - m), ACC[c] = sum exp(.) P[c] for the data
 * planes and the mu/sigma plane, TY[i] = sum_j exp(.) / sigma and TX[j] = sum_i exp(.) / sigma; the
 * caller turns these into the attention output. Rows i0..i1 of the grid are processed per call, so a
 * large image is given in chunks of rows and the state carries over.
 *
 * Plain C with loops the compiler vectorises; query rows are split over OpenMP threads (built with
 * -fopenmp, it shares the libgomp that PyTorch loads, so torch.set_num_threads applies); two row
 * buffers per thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for x <= ~TAU, vectorisable: 2^k by exponent bits, exp on |f| <= ln2/2 by a degree-6 series
 * (relative error ~2e-7, float32 rounding level). */
static inline float exp_approx(float x) {
    /* x = max(x, -87) (NaN kept) by bits: written as a conditional, GCC turned it into a branch for AVX2
     * targets and left the loops around it scalar */
    const int32_t low = -(int32_t)(x < -87.0f), floor_bits = (int32_t)0xc2ae0000;  /* -87.0f */
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits = (floor_bits & low) | (bits & ~low);
    memcpy(&x, &bits, sizeof x);
    float t = x * 1.44269504088896341f;
    float k = (t + 12582912.0f) - 12582912.0f;  /* rounds to an integer (1.5 * 2^23), in vectors on any target */
    float y = (x - k * 0.693359375f) - k * -2.12194440e-4f;  /* x - k ln2 in two steps, as vector.h's vreduce */
    float p = 1.0f + y * (1.0f + y * (0.5f + y * (0.16666667f + y * (0.041666668f + y * (0.0083333338f + y * 0.0013888889f)))));
    bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Rescale a row's state only when its maximum grows by more than TAU (exp(TAU) ~ 2.2e4 keeps every
 * sum far from float32 overflow), so rescaling is rare. */
#define TAU 10.0f

/* Calls ROW(d) with d a literal for 1-4 data channels (the channel loops then unroll), D otherwise. */
#define BY_CHANNELS(D, ROW)            \
    switch (D) {                       \
        case 1: ROW(1); break;         \
        case 2: ROW(2); break;         \
        case 3: ROW(3); break;         \
        case 4: ROW(4); break;         \
        default: ROW(D); break;        \
    }

/* acc[c] += sum_j w[j] P[c, off + j] over the D data planes of one image row. */
static inline __attribute__((always_inline)) void accumulate_planes(
    const int64_t D, int64_t width, int64_t off, int64_t plane, const float *P, const float *w, double *acc
) {
    for (int64_t c = 0; c < D; ++c) {
        const float *pc = P + c * plane + off;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < width; ++j) dot += w[j] * pc[j];
        acc[c] += dot;
    }
}

/* One query row over grid rows i0..i1; D is a compile-time constant where inlined from the switch
 * below (so the channel loops unroll into the vector loops), a variable otherwise. */
static inline __attribute__((always_inline)) void attend_row(
    const int64_t D, int64_t height, int64_t width, int64_t i0, int64_t i1, int64_t plane,
    const float *u, const float *ay, const float *ax, const float *P,
    float *m_io, double *sum_io, double *acc, float *ty, float *tx, float *s, float *e
) {
    float m = *m_io;
    double sum = *sum_io;
    const float g = u[D];
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t off = (i - i0) * width;
        const float *inv = P + D * plane + off, *mu = P + (D + 1) * plane + off;
        const float a = ay[i];
        float rowmax = -INFINITY;
#pragma omp simd reduction(max : rowmax)
        for (int64_t j = 0; j < width; ++j) {
            float v = inv[j] * (a + ax[j]) + g * mu[j];
            for (int64_t c = 0; c < D; ++c) v += u[c] * P[c * plane + off + j];
            s[j] = v;
            rowmax = v > rowmax ? v : rowmax;
        }
        if (rowmax > m + TAU || m == -INFINITY) {
            if (m != -INFINITY) {
                const float f = expf(m - rowmax);
                sum *= f;
                for (int64_t c = 0; c <= D; ++c) acc[c] *= f;
                for (int64_t k = 0; k < height; ++k) ty[k] *= f;
#pragma omp simd
                for (int64_t j = 0; j < width; ++j) tx[j] *= f;
            }
            m = rowmax;
        }
        float rowsum = 0.0f, rowinv = 0.0f, rowmu = 0.0f;
#pragma omp simd reduction(+ : rowsum, rowinv, rowmu)
        for (int64_t j = 0; j < width; ++j) {
            const float ej = exp_approx(s[j] - m);
            const float er = ej * inv[j];
            e[j] = ej;
            rowsum += ej;
            rowinv += er;
            rowmu += ej * mu[j];
            tx[j] += er;
        }
        sum += rowsum;
        ty[i] += rowinv;
        acc[D] += rowmu;
        accumulate_planes(D, width, off, plane, P, e, acc);
    }
    *m_io = m;
    *sum_io = sum;
}

int perceivers_grid_attention(
    int64_t batch, int64_t rows, int64_t height, int64_t width, int64_t channels, int64_t i0, int64_t i1,
    const float *U,   /* [batch, rows, channels + 1] */
    const float *AY,  /* [batch, rows, height] */
    const float *AX,  /* [batch, rows, width] */
    const float *P,   /* [batch, channels + 2, (i1 - i0) * width] */
    float *M,         /* [batch, rows] running maximum (start at -inf) */
    double *S,        /* [batch, rows] running sum (start at 0) */
    double *ACC,      /* [batch, rows, channels + 1] */
    float *TY,        /* [batch, rows, height] */
    float *TX         /* [batch, rows, width] */
) {
    const int64_t D = channels, plane = (i1 - i0) * width;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)width);
        float *e = (float *)malloc(sizeof(float) * (size_t)width);
        if (!s || !e) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < batch * rows; ++r) {
            if (failed) continue;
            const float *Pb = P + (r / rows) * (D + 2) * plane;
#define ROW(DD) attend_row(DD, height, width, i0, i1, plane, U + r * (D + 1), AY + r * height, AX + r * width, \
                           Pb, M + r, S + r, ACC + r * (D + 1), TY + r * height, TX + r * width, s, e)
            BY_CHANNELS(D, ROW);
#undef ROW
        }
        free(s);
        free(e);
    }
    return failed;
}

/* Backward pass of one query row over grid rows i0..i1: with the row's final log-sum-exp (lse), the
 * probabilities p = exp(score - lse) are rebuilt from the same planes; a second set of coefficients
 * (V, BY, BX: the upstream gradient times gamma, mapped like the query) gives t = v.xhat_n per pixel,
 * and the weights w = p (t - c) (c: the row's v.xhat mean) are accumulated like the forward's
 * exponentials: ACC[c] += sum w P[c], ACC[D] += sum w mu/sigma, TY[i] / TX[j] += sum w / sigma. */
static inline __attribute__((always_inline)) void backward_row(
    const int64_t D, int64_t width, int64_t i0, int64_t i1, int64_t plane,
    const float *u, const float *ay, const float *ax, const float *v, const float *by, const float *bx,
    float lse, float cr, const float *P, double *acc, float *ty, float *tx, float *w
) {
    const float g = u[D], gv = v[D];
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t off = (i - i0) * width;
        const float *inv = P + D * plane + off, *mu = P + (D + 1) * plane + off;
        const float a = ay[i], b = by[i];
        float rowinv = 0.0f, rowmu = 0.0f;
#pragma omp simd reduction(+ : rowinv, rowmu)
        for (int64_t j = 0; j < width; ++j) {
            float sc = inv[j] * (a + ax[j]) + g * mu[j];
            float t = inv[j] * (b + bx[j]) + gv * mu[j];
            for (int64_t c = 0; c < D; ++c) {
                const float pc = P[c * plane + off + j];
                sc += u[c] * pc;
                t += v[c] * pc;
            }
            const float wj = exp_approx(sc - lse) * (t - cr);
            const float wr = wj * inv[j];
            w[j] = wj;
            rowinv += wr;
            rowmu += wj * mu[j];
            tx[j] += wr;
        }
        ty[i] += rowinv;
        acc[D] += rowmu;
        accumulate_planes(D, width, off, plane, P, w, acc);
    }
}

int perceivers_grid_attention_backward(
    int64_t batch, int64_t rows, int64_t height, int64_t width, int64_t channels, int64_t i0, int64_t i1,
    const float *U, const float *AY, const float *AX,   /* as the forward */
    const float *V, const float *BY, const float *BX,   /* the same shapes, for the gradient */
    const float *LSE, const float *CR,                  /* [batch, rows] */
    const float *P, double *ACC, float *TY, float *TX
) {
    const int64_t D = channels, plane = (i1 - i0) * width;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *w = (float *)malloc(sizeof(float) * (size_t)width);
        if (!w) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < batch * rows; ++r) {
            if (failed) continue;
            const float *Pb = P + (r / rows) * (D + 2) * plane;
#define ROW(DD) backward_row(DD, width, i0, i1, plane, U + r * (D + 1), AY + r * height, AX + r * width, \
                             V + r * (D + 1), BY + r * height, BX + r * width, LSE[r], CR[r], Pb, \
                             ACC + r * (D + 1), TY + r * height, TX + r * width, w)
            BY_CHANNELS(D, ROW);
#undef ROW
        }
        free(w);
    }
    return failed;
}

/* The kernel's pixel planes for rows i0..i0 + pixels/width of every sample: LayerNorm statistics of
 * [data, T_h[i] + T_w[j]] from the data and the per-axis sums (sum_h, sum_w) and sums of squares
 * (sq_h, sq_w) of the position tables (disjoint channels), in double precision; then data/sigma,
 * 1/sigma and mu/sigma per pixel. Sample b's data starts at data + b * batch_stride, [pixels, channels]
 * contiguous; planes are [batch, channels + 2, pixels]. */
void perceivers_grid_planes(
    int64_t batch, int64_t pixels, int64_t width, int64_t channels, int64_t total_channels, int64_t i0,
    const float *data, int64_t batch_stride, const double *sum_h, const double *sq_h, const double *sum_w,
    const double *sq_w, double eps, float *planes
) {
    const int64_t D = channels;
    const double inv_c = 1.0 / (double)total_channels;
#pragma omp parallel for schedule(static)
    for (int64_t bn = 0; bn < batch * pixels; ++bn) {
        const int64_t b = bn / pixels, n = bn % pixels;
        const int64_t i = i0 + n / width, j = n % width;
        const float *x = data + b * batch_stride + n * D;
        float *out = planes + b * (D + 2) * pixels;
        double t = sum_h[i] + sum_w[j], q = sq_h[i] + sq_w[j];
        for (int64_t c = 0; c < D; ++c) {
            t += x[c];
            q += (double)x[c] * x[c];
        }
        const double mu = t * inv_c;
        double var = q * inv_c - mu * mu;
        var = var < 0.0 ? 0.0 : var;
        const double inv = 1.0 / sqrt(var + eps);
        for (int64_t c = 0; c < D; ++c) out[c * pixels + n] = (float)(x[c] * inv);
        out[D * pixels + n] = (float)inv;
        out[(D + 1) * pixels + n] = (float)(mu * inv);
    }
}
