/* Cross-attention of a few queries over an image grid whose keys are [pixels, position features]
 * after a LayerNorm, attended in the context's own space (see perceivers/layers/grid_attention.py for
 * the algebra). Per query row r and pixel n = (i, j) of the grid:
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
 * The reference maximum is lazy: a grid row is scored and summed in one pass against the current m,
 * and only a row whose maximum exceeds m + TAU (the first rows, mostly) is summed again after
 * rescaling the state to it. Sums run in vectors of the processor's width (vector.h's vn) and go to
 * per-lane doubles once per grid row, so a row costs one horizontal sum (TY) and one maximum.
 * Query rows are split over OpenMP threads (built with -fopenmp, it shares the libgomp that PyTorch
 * loads, so torch.set_num_threads applies); one row buffer per thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector.h"

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

/* Up to NW floats (n of them) from p: the whole vector where n == NW, so full steps compile to plain loads. */
static inline __attribute__((always_inline)) vn load(const float *p, int64_t n) {
    return n == NW ? nload(p) : nloadn(p, n);
}

/* One query's scores for pixels j..j+n of a grid row: sum_c w[c] P[c] + P[D] (a + along[j]) + w[D] P[D + 1],
 * with w, a, along the query's coefficients (U, AY, AX) or the gradient's (V, BY, BX). */
static inline __attribute__((always_inline)) vn scores(
    const int64_t D, const float *P, int64_t plane, int64_t off, int64_t j, int64_t n, const vn *w, vn a,
    const float *along
) {
    const float *at = P + off + j;
    vn v = load(at + D * plane, n) * (a + load(along + j, n)) + w[D] * load(at + (D + 1) * plane, n);
    for (int64_t c = 0; c < D; ++c) v += w[c] * load(at + c * plane, n);
    return v;
}

/* Pixels j..j+n of a grid row, summed for one query against the reference m: the per-lane sums of
 * e = exp(score - m) times each data plane, the mu/sigma plane and 1 (part[0..D+1]), of e/sigma (row),
 * the scores' maximum (top), and e/sigma per pixel into s. Lanes past the row's end add nothing. */
static inline __attribute__((always_inline)) void forward_step(
    const int64_t D, const float *P, int64_t plane, int64_t off, int64_t j, int64_t n, const vn *w, vn a,
    const float *ax, vn m, vn *part, vn *row, vn *top, float *s
) {
    vn v = scores(D, P, plane, off, j, n, w, a, ax);
    if (n < NW) v = ntail(v, n, -INFINITY);
    *top = nmax(*top, v);
    const float *at = P + off + j;
    const vn e = nexp(v - m), er = e * load(at + D * plane, n);
    *row += er;
    part[D] += e * load(at + (D + 1) * plane, n);
    part[D + 1] += e;
    for (int64_t c = 0; c < D; ++c) part[c] += e * load(at + c * plane, n);
    nstore(s + j, er);
}

/* One query row over grid rows i0..i1; D is a compile-time constant where inlined from the switch
 * below (so the channel loops unroll), a variable otherwise. */
static inline __attribute__((always_inline)) void attend_row(
    const int64_t D, int64_t height, int64_t width, int64_t i0, int64_t i1, int64_t plane,
    const float *u, const float *ay, const float *ax, const float *P,
    float *m_io, double *sum_io, double *acc, float *ty, float *tx, float *s
) {
    float m = *m_io;
    vn w[D + 1];
    vnd total[D + 2];  /* per-lane sums of e P[c] (c <= D) and of e, in double */
    for (int64_t c = 0; c <= D; ++c) w[c] = nbcast(u[c]);
    for (int64_t c = 0; c < D + 2; ++c) total[c] = (vnd){0};
    for (int64_t c = 0; c <= D; ++c) total[c][0] = acc[c];
    total[D + 1][0] = *sum_io;
    const int64_t full = width - width % NW;
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t off = (i - i0) * width;
        const vn a = nbcast(ay[i]);
        for (;;) {  /* at most twice; the first row always twice, as nothing passes m = -inf by TAU */
            const vn vm = nbcast(m);
            vn part[D + 2], row = nbcast(0.0f), top = nbcast(-INFINITY);
            for (int64_t c = 0; c < D + 2; ++c) part[c] = nbcast(0.0f);
            for (int64_t j = 0; j < full; j += NW) forward_step(D, P, plane, off, j, NW, w, a, ax, vm, part, &row, &top, s);
            if (full < width) forward_step(D, P, plane, off, full, width - full, w, a, ax, vm, part, &row, &top, s);
            const float rowmax = nhmax(top);
            if (rowmax > m + TAU) {  /* rescale the state to the row's maximum and sum the row again */
                const float f = expf(m - rowmax);  /* 0 from m = -inf, where the state is still all zeros */
                for (int64_t c = 0; c < D + 2; ++c) total[c] *= (double)f;
                for (int64_t k = 0; k < height; ++k) ty[k] *= f;
                for (int64_t k = 0; k < width; ++k) tx[k] *= f;
                m = rowmax;
                continue;
            }
            ty[i] += nhsum(row);
            for (int64_t c = 0; c < D + 2; ++c) total[c] += nwiden(part[c]);
#pragma omp simd
            for (int64_t k = 0; k < width; ++k) tx[k] += s[k];
            break;
        }
    }
    for (int64_t c = 0; c <= D; ++c) acc[c] = ndsum(total[c]);
    *sum_io = ndsum(total[D + 1]);
    *m_io = m;
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
        float *s = (float *)malloc(sizeof(float) * (size_t)(width + NW));
        if (!s) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < batch * rows; ++r) {
            if (failed) continue;
            const float *Pb = P + (r / rows) * (D + 2) * plane;
#define ROW(DD) attend_row(DD, height, width, i0, i1, plane, U + r * (D + 1), AY + r * height, AX + r * width, \
                           Pb, M + r, S + r, ACC + r * (D + 1), TY + r * height, TX + r * width, s)
            BY_CHANNELS(D, ROW);
#undef ROW
        }
        free(s);
    }
    return failed;
}

/* Pixels j..j+n of a grid row in the backward: the weights w = p (t - cr), p = exp(score - lse) and
 * t = the gradient's score, summed per lane times each data plane and the mu/sigma plane (part), over
 * sigma (row), and w/sigma added to TX. */
static inline __attribute__((always_inline)) void backward_step(
    const int64_t D, const float *P, int64_t plane, int64_t off, int64_t j, int64_t n, const vn *u, vn a,
    const float *ax, const vn *v, vn b, const float *bx, vn lse, vn cr, vn *part, vn *row, float *tx
) {
    vn wt = nexp(scores(D, P, plane, off, j, n, u, a, ax) - lse) * (scores(D, P, plane, off, j, n, v, b, bx) - cr);
    if (n < NW) wt = ntail(wt, n, 0.0f);
    const float *at = P + off + j;
    const vn wr = wt * load(at + D * plane, n);
    *row += wr;
    part[D] += wt * load(at + (D + 1) * plane, n);
    for (int64_t c = 0; c < D; ++c) part[c] += wt * load(at + c * plane, n);
    if (n == NW) nstore(tx + j, nload(tx + j) + wr);
    else nstoren(tx + j, nloadn(tx + j, n) + wr, n);
}

/* Backward pass of one query row over grid rows i0..i1: with the row's final log-sum-exp (lse), the
 * probabilities p = exp(score - lse) are rebuilt from the same planes; a second set of coefficients
 * (V, BY, BX: the upstream gradient times gamma, mapped like the query) gives t = v.xhat_n per pixel,
 * and the weights w = p (t - c) (c: the row's v.xhat mean) are accumulated like the forward's
 * exponentials: ACC[c] += sum w P[c], ACC[D] += sum w mu/sigma, TY[i] / TX[j] += sum w / sigma. */
static inline __attribute__((always_inline)) void backward_row(
    const int64_t D, int64_t width, int64_t i0, int64_t i1, int64_t plane,
    const float *u, const float *ay, const float *ax, const float *v, const float *by, const float *bx,
    float lse, float cr, const float *P, double *acc, float *ty, float *tx
) {
    vn wu[D + 1], wv[D + 1];
    vnd total[D + 1];
    for (int64_t c = 0; c <= D; ++c) {
        wu[c] = nbcast(u[c]);
        wv[c] = nbcast(v[c]);
        total[c] = (vnd){0};
        total[c][0] = acc[c];
    }
    const vn vl = nbcast(lse), vc = nbcast(cr);
    const int64_t full = width - width % NW;
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t off = (i - i0) * width;
        const vn a = nbcast(ay[i]), b = nbcast(by[i]);
        vn part[D + 1], row = nbcast(0.0f);
        for (int64_t c = 0; c <= D; ++c) part[c] = nbcast(0.0f);
        for (int64_t j = 0; j < full; j += NW)
            backward_step(D, P, plane, off, j, NW, wu, a, ax, wv, b, bx, vl, vc, part, &row, tx);
        if (full < width)
            backward_step(D, P, plane, off, full, width - full, wu, a, ax, wv, b, bx, vl, vc, part, &row, tx);
        ty[i] += nhsum(row);
        for (int64_t c = 0; c <= D; ++c) total[c] += nwiden(part[c]);
    }
    for (int64_t c = 0; c <= D; ++c) acc[c] = ndsum(total[c]);
}

int perceivers_grid_attention_backward(
    int64_t batch, int64_t rows, int64_t height, int64_t width, int64_t channels, int64_t i0, int64_t i1,
    const float *U, const float *AY, const float *AX,   /* as the forward */
    const float *V, const float *BY, const float *BX,   /* the same shapes, for the gradient */
    const float *LSE, const float *CR,                  /* [batch, rows] */
    const float *P, double *ACC, float *TY, float *TX
) {
    const int64_t D = channels, plane = (i1 - i0) * width;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < batch * rows; ++r) {
        const float *Pb = P + (r / rows) * (D + 2) * plane;
#define ROW(DD) backward_row(DD, width, i0, i1, plane, U + r * (D + 1), AY + r * height, AX + r * width, \
                             V + r * (D + 1), BY + r * height, BX + r * width, LSE[r], CR[r], Pb, \
                             ACC + r * (D + 1), TY + r * height, TX + r * width)
        BY_CHANNELS(D, ROW);
#undef ROW
    }
    return 0;
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
