/* Attention softmax(q k^T * scale + bias) v for float32 heads up to 256 channels wide (multiples of 16),
 * forward and backward, fused as flash attention is: per block of QB queries the keys go by in blocks of
 * KB, the scores stay in the first-level cache, the softmax runs online (a running maximum and sum), and
 * the backward recomputes the probabilities from the rows' log-sum-exp.
 *
 * The score tiles are kept transposed, [key][query row]: a vector holds NW query rows of one key, so a
 * tile is computed from the block's queries transposed (QB x d, copied once per block) and the keys read
 * in place, row by row, and the softmax's maxima and sums over keys are vertical operations. The products
 * are register-tiled micro-kernels and the softmax runs in vectors of the processor's width (vector.h's
 * vn: NW = 16 floats with AVX-512, 8 elsewhere), written with the compiler's vector extensions, so the
 * same code builds wherever GCC or Clang does. (perceivers loads it only with AVX-512: built for AVX2 it
 * is about as fast as SDPA, see kernels/__init__.py.)
 *
 * Layouts (elements, not bytes): a tensor T with rows per (b, h) is addressed T + b*s[0] + h*s[1] +
 * row*s[2] + channel, its channels contiguous; batch and head strides may be 0 (keys shared by every
 * head). bias (or NULL) is additive per key, [N] per (b, h) at b*s[0] + h*s[1] (-inf on masked keys).
 * A row whose keys are all masked returns zeros. Work is split over OpenMP threads: (b, h, group of query
 * blocks) in the forward, (b, h) in the backward.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_common.h"

static inline const float *at(const float *t, const int64_t *s, int64_t b, int64_t h, int64_t row) {
    return t + b * s[0] + h * s[1] + row * s[2];
}

/* The micro-kernels' register tiles, in vectors of the processor's width (vector.h's vn: NW floats): with
 * AVX-512's 32 registers 8 keys or rows by two vectors (16 accumulators), with AVX2's 16 registers of 8
 * floats 2 keys by QB / NW = 4 vectors (scores) and 4 keys or rows by three vectors, then two (the
 * products: the NW == 8 loops below). */
#define QV (QB / NW)    /* vectors per row of a score tile */
#if NW == 16
#define SKT 8           /* scores: keys per tile */
#define PT 8            /* rows_times / cols_times: rows or keys per tile */
#else
#define SKT 2
#define PT 4
#endif

/* st[j][r] = sum_c aT[c][r] x[j0 + j][c] (+ bias[j0 + j]) for the block's keys j < KB, rows r < QB; keys
 * at or past n are -inf. aT: [d][QB]; x: key rows of stride ld. */
static inline __attribute__((always_inline)) void scores(
    int64_t d, const float *aT, const float *x, int64_t ld, int64_t j0, int64_t n, const float *bias,
    float st[KB][QB]
) {
    for (int64_t jt = 0; jt < KB; jt += SKT) {
        if (j0 + jt >= n) {
            for (int64_t t = 0; t < SKT; ++t)
                for (int q = 0; q < QV; ++q) nstore(st[jt + t] + q * NW, nbcast(-INFINITY));
            continue;
        }
        const float *row[SKT];
        for (int t = 0; t < SKT; ++t) row[t] = x + (j0 + jt + t < n ? j0 + jt + t : j0) * ld;
        vn acc[SKT][QV];
        for (int t = 0; t < SKT; ++t)
            for (int q = 0; q < QV; ++q) acc[t][q] = nbcast(0.0f);
        for (int64_t c = 0; c < d; ++c) {
            vn a[QV];
            for (int q = 0; q < QV; ++q) a[q] = nload(aT + c * QB + q * NW);
            for (int t = 0; t < SKT; ++t) {
                const vn kv = nbcast(row[t][c]);
                for (int q = 0; q < QV; ++q) acc[t][q] += kv * a[q];
            }
        }
        for (int t = 0; t < SKT; ++t) {
            const int64_t j = j0 + jt + t;
            const vn add = nbcast(j >= n ? -INFINITY : (bias ? bias[j] : 0.0f));
            for (int q = 0; q < QV; ++q) nstore(st[jt + t] + q * NW, acc[t][q] + add);
        }
    }
}

/* One tile of PT output rows by V vectors from column c0: o[r][c] += sum_{j < nj} w[j][r0 + r] x[j][c];
 * o rows of stride ldo, x rows of stride ldx. */
#define ROWS_TILE(V)                                                                                  \
    do {                                                                                              \
        vn acc[PT][V];                                                                                \
        for (int r = 0; r < PT; ++r)                                                                  \
            for (int u = 0; u < V; ++u) acc[r][u] = nload(o + (r0 + r) * d + c0 + u * NW);           \
        for (int64_t j = 0; j < nj; ++j) {                                                            \
            vn xv[V];                                                                                 \
            for (int u = 0; u < V; ++u) xv[u] = nload(x + j * ld + c0 + u * NW);                      \
            for (int r = 0; r < PT; ++r) {                                                            \
                const vn ww = nbcast(w[j][r0 + r]);                                                   \
                for (int u = 0; u < V; ++u) acc[r][u] += ww * xv[u];                                  \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < PT; ++r)                                                                  \
            for (int u = 0; u < V; ++u) nstore(o + (r0 + r) * d + c0 + u * NW, acc[r][u]);           \
    } while (0)

/* o[r][c] += sum_{j < nj} w[j][r] x[j][c]; o: QB rows of d (d % 16 == 0); x rows of stride ld. */
static inline __attribute__((always_inline)) void rows_times(
    int64_t d, float w[KB][QB], int64_t nj, const float *x, int64_t ld, float *o
) {
    for (int r0 = 0; r0 < QB; r0 += PT) {
        int64_t c0 = 0;
#if NW == 8
        for (; c0 + 3 * NW <= d; c0 += 3 * NW) ROWS_TILE(3);
#endif
        for (; c0 + 2 * NW <= d; c0 += 2 * NW) ROWS_TILE(2);
        for (; c0 < d; c0 += NW) ROWS_TILE(1);
    }
}

/* One tile of `keys` output rows (<= PT) by V vectors from column c0: o[j0 + j][c] += sum_{r < QB} w[j0 + j][r] a[r][c]. */
#define COLS_TILE(keys, V)                                                                            \
    do {                                                                                              \
        vn acc[PT][V];                                                                                \
        for (int j = 0; j < keys; ++j)                                                                \
            for (int u = 0; u < V; ++u) acc[j][u] = nload(o + (j0 + j) * ld + c0 + u * NW);          \
        for (int r = 0; r < QB; ++r) {                                                                \
            vn av[V];                                                                                 \
            for (int u = 0; u < V; ++u) av[u] = nload(a + r * d + c0 + u * NW);                      \
            for (int j = 0; j < keys; ++j) {                                                          \
                const vn ww = nbcast(w[j0 + j][r]);                                                   \
                for (int u = 0; u < V; ++u) acc[j][u] += ww * av[u];                                  \
            }                                                                                         \
        }                                                                                             \
        for (int j = 0; j < keys; ++j)                                                                \
            for (int u = 0; u < V; ++u) nstore(o + (j0 + j) * ld + c0 + u * NW, acc[j][u]);           \
    } while (0)

/* o[j][c] += sum_{r < QB} w[j][r] a[r][c] for j < nj; a: QB rows of d; o rows of stride ld. */
static inline __attribute__((always_inline)) void cols_times(
    int64_t d, float w[KB][QB], int64_t nj, const float *a, float *o, int64_t ld
) {
    int64_t j0 = 0;
    for (; j0 + PT <= nj; j0 += PT) {
        int64_t c0 = 0;
#if NW == 8
        for (; c0 + 3 * NW <= d; c0 += 3 * NW) COLS_TILE(PT, 3);
#endif
        for (; c0 + 2 * NW <= d; c0 += 2 * NW) COLS_TILE(PT, 2);
        for (; c0 < d; c0 += NW) COLS_TILE(PT, 1);
    }
    for (; j0 < nj; ++j0)
        for (int64_t c0 = 0; c0 < d; c0 += NW) COLS_TILE(1, 1);
}

/* A block's rows of t (QB x d, zero-padded past `rows`), times `mul`, into rows [QB][d] and/or transposed
 * [d][QB] (either may be NULL), 16 x 16 tiles at a time. */
static void load_rows(const float *t, const int64_t *s, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t d,
                      float mul, float *out_rows, float *out_t) {
    for (int64_t r0 = 0; r0 < QB; r0 += 16)
        for (int64_t c0 = 0; c0 < d; c0 += 16) {
            v16 tile[16];
            for (int64_t r = 0; r < 16; ++r)
                tile[r] = r0 + r < rows ? vload(at(t, s, b, h, i0 + r0 + r) + c0) * vbcast(mul) : vbcast(0.0f);
            if (out_rows)
                for (int64_t r = 0; r < 16; ++r) vstore(out_rows + (r0 + r) * d + c0, tile[r]);
            if (out_t) {
                tile_transpose(tile);
                for (int64_t c = 0; c < 16; ++c) vstore(out_t + (c0 + c) * QB + r0, tile[c]);
            }
        }
}

/* The forward state of one block of query rows. */
typedef struct {
    float qt[MAXD * QB] __attribute__((aligned(64)));   /* queries times scale, transposed */
    float o[QB * MAXD] __attribute__((aligned(64)));    /* unnormalised output rows */
    float st[KB][QB] __attribute__((aligned(64)));      /* scores, then probabilities, of one key block */
    float m[QB] __attribute__((aligned(64)));           /* each row's reference maximum */
    float l[QB] __attribute__((aligned(64)));           /* each row's sum of exp(score - m) */
    float f[QB] __attribute__((aligned(64)));
} Rows;

/* One key block for one query block: online softmax update and o += P V. */
static inline void forward_block(Rows *x, int64_t dk, int64_t dv, const float *k, int64_t ldk, const float *v,
                                 int64_t ldv, int64_t j0, int64_t n, const float *bias) {
    const int64_t nj = n - j0 < KB ? n - j0 : KB;
    scores(dk, x->qt, k, ldk, j0, n, bias, x->st);
    for (int part = 0; part < QV; ++part) {
        const vn base = softmax_reference(x->st, nj, part, x->m, x->l, x->f, x->o, dv);
        vn sum = nbcast(0.0f);
        for (int64_t j = 0; j < nj; ++j) {
            const vn e = nexp(nload(x->st[j] + NW * part) - base);  /* masked keys: exp(-inf) = 0 */
            sum += e;
            nstore(x->st[j] + NW * part, e);
        }
        nstore(x->l + NW * part, nload(x->l + NW * part) + sum);
    }
    rows_times(dv, x->st, nj, v + j0 * ldv, ldv, x->o);
}

/* dims: B, H, M, N, dk, dv. strides: q[3], k[3], v[3], bias[2], out[3]. lse [B, H, M] or NULL.
 * Returns 1 for unsupported widths, 2 when a thread's buffers cannot be allocated. */
int perceivers_attention(const int64_t *dims, const int64_t *st, float scale, const float *q, const float *k,
                         const float *v, const float *bias, float *out, float *lse) {
    const int64_t B = dims[0], H = dims[1], M = dims[2], N = dims[3], dk = dims[4], dv = dims[5];
    const int64_t *sq = st, *sk = st + 3, *sv = st + 6, *sb = st + 9, *so = st + 11;
    if (dk > MAXD || dv > MAXD || dk % 16 || dv % 16 || N < 1) return 1;
    const int64_t mb = (M + QB - 1) / QB;
    const int64_t group = forward_group(B, H, mb, N * (dk + dv) * (int64_t)sizeof(float));
    const int64_t per = (mb + group - 1) / group, jobs = B * H * per;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        Rows *w = aligned_alloc(64, group * sizeof(Rows));
        if (!w) failed = 1;
#pragma omp for schedule(static)
        for (int64_t job = 0; job < jobs; ++job) {
            if (!w) continue;
            const int64_t bh = job / per, b = bh / H, h = bh % H, first = job % per * group;
            const int64_t blocks = mb - first < group ? mb - first : group;
            const float *kb = at(k, sk, b, h, 0), *vb = at(v, sv, b, h, 0);
            const float *bb = bias ? bias + b * sb[0] + h * sb[1] : NULL;
            for (int64_t g = 0; g < blocks; ++g) {
                Rows *x = w + g;
                const int64_t i0 = (first + g) * QB;
                load_rows(q, sq, b, h, i0, M - i0 < QB ? M - i0 : QB, dk, scale, NULL, x->qt);
                memset(x->o, 0, sizeof(float) * QB * dv);
                for (int r = 0; r < QB; ++r) { x->m[r] = -INFINITY; x->l[r] = 0.0f; }
            }
            for (int64_t j0 = 0; j0 < N; j0 += KB)
                for (int64_t g = 0; g < blocks; ++g) forward_block(w + g, dk, dv, kb, sk[2], vb, sv[2], j0, N, bb);
            for (int64_t g = 0; g < blocks; ++g) {
                const Rows *x = w + g;
                const int64_t i0 = (first + g) * QB, rows = M - i0 < QB ? M - i0 : QB;
                for (int64_t r = 0; r < rows; ++r) {
                    const float inv = x->l[r] > 0.0f ? 1.0f / x->l[r] : 0.0f;
                    float *orow = out + b * so[0] + h * so[1] + (i0 + r) * so[2];
                    for (int64_t c = 0; c < dv; ++c) orow[c] = x->o[r * dv + c] * inv;
                    if (lse) lse[bh * M + i0 + r] = x->m[r] + logf(x->l[r]);
                }
            }
        }
        free(w);
    }
    return failed ? 2 : 0;
}

/* One block of query rows as the backward reads them. */
typedef struct {
    float *qs, *qt;           /* queries times scale, plain [QB][dk] and transposed [dk][QB] */
    float *go, *gt;           /* output gradient, plain [QB][dv] and transposed [dv][QB] */
    float *lse, *delta;       /* the rows' statistics [QB] */
} Block;

/* Bytes of one Block's arrays for widths dk, dv (each array a multiple of 64 bytes). */
static inline int64_t block_bytes(int64_t dk, int64_t dv) {
    return (int64_t)sizeof(float) * QB * (2 * (dk + dv) + 2);
}

/* Lay a Block's arrays out from mem (64-byte aligned, block_bytes long). */
static inline Block block_at(char *mem, int64_t dk, int64_t dv) {
    Block x;
    x.qs = (float *)mem; x.qt = x.qs + QB * dk; x.go = x.qt + QB * dk; x.gt = x.go + QB * dv;
    x.lse = x.gt + QB * dv; x.delta = x.lse + QB;
    return x;
}

/* Load query block i0 (`rows` rows) of head (b, h) into x. */
static void load_block(const Block *x, const float *q, const int64_t *sq, const float *dout, const int64_t *sd,
                       const float *lse, const float *delta, float scale, int64_t b, int64_t h, int64_t bh,
                       int64_t M, int64_t i0, int64_t rows, int64_t dk, int64_t dv) {
    load_rows(q, sq, b, h, i0, rows, dk, scale, x->qs, x->qt);
    load_rows(dout, sd, b, h, i0, rows, dv, 1.0f, x->go, x->gt);
    load_row_stats(lse, delta, bh, M, i0, rows, x->lse, x->delta);
}

/* The backward's per-thread buffers for one (query block, key block) pair; the query block's own rows are a Block. */
typedef struct {
    float g[QB * MAXD] __attribute__((aligned(64)));    /* query gradient being accumulated */
    float p[KB][QB] __attribute__((aligned(64)));       /* probabilities of one key block */
    float ds[KB][QB] __attribute__((aligned(64)));      /* score gradients of one key block */
} Grads;

/* dims: B, H, M, N, dk, dv. strides: q[3], k[3], v[3], bias[2], dout[3]. lse, delta [B, H, M]
 * (delta = rowsum(dout * out)). Writes dq [B, H, M, dk], dk [B, H, N, dk], dv [B, H, N, dv] (contiguous;
 * NULL: not computed); returns 2 when a thread's buffers cannot be allocated. Per (b, h) the loop over
 * block pairs runs with the longer side outside, so the gradient that accumulates over the inner side (dK
 * and dV of a key block, or dQ of a query block) stays cached. */
int perceivers_attention_backward(const int64_t *dims, const int64_t *st, float scale, const float *q,
                                  const float *k, const float *v, const float *bias, const float *dout,
                                  const float *lse, const float *delta, float *dq, float *dk_out, float *dv_out) {
    const int64_t B = dims[0], H = dims[1], M = dims[2], N = dims[3], dk = dims[4], dv = dims[5];
    const int64_t *sq = st, *sk = st + 3, *sv = st + 6, *sb = st + 9, *sd = st + 11;
    if (dk > MAXD || dv > MAXD || dk % 16 || dv % 16 || N < 1) return 1;
    const int64_t mb = (M + QB - 1) / QB, nb = (N + KB - 1) / KB;
    const int keys_outside = N > M;
    const int64_t bytes = block_bytes(dk, dv);  /* one query block's loaded rows */
    const int64_t slots = backward_slots(M, N, mb, bytes);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        Grads *w = aligned_alloc(64, sizeof(Grads));
        char *blocks = aligned_alloc(64, slots * bytes);
        if (!w || !blocks) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            if (!w || !blocks) continue;
            const int64_t b = bh / H, h = bh % H;
            const float *kb = at(k, sk, b, h, 0), *vb = at(v, sv, b, h, 0);
            const float *bb = bias ? bias + b * sb[0] + h * sb[1] : NULL;
            float *dkb = dk_out ? dk_out + bh * N * dk : NULL, *dvb = dv_out ? dv_out + bh * N * dv : NULL;
            float *dqb = dq ? dq + bh * M * dk : NULL;
            if (dkb) memset(dkb, 0, sizeof(float) * N * dk);
            if (dvb) memset(dvb, 0, sizeof(float) * N * dv);
            if (dqb) memset(dqb, 0, sizeof(float) * M * dk);
            const int64_t outer = keys_outside ? nb : mb, inner = keys_outside ? mb : nb;
            int64_t loaded = -1;
            if (slots > 1)
                for (int64_t ib = 0; ib < mb; ++ib) {
                    const Block x = block_at(blocks + ib * bytes, dk, dv);
                    const int64_t i0 = ib * QB, rows = M - i0 < QB ? M - i0 : QB;
                    load_block(&x, q, sq, dout, sd, lse, delta, scale, b, h, bh, M, i0, rows, dk, dv);
                }
            for (int64_t a = 0; a < outer; ++a) {
                for (int64_t c = 0; c < inner; ++c) {
                    const int64_t ib = keys_outside ? c : a, j0 = (keys_outside ? a : c) * KB;
                    const int64_t i0 = ib * QB, rows = M - i0 < QB ? M - i0 : QB, nj = N - j0 < KB ? N - j0 : KB;
                    const Block x = block_at(blocks + (slots > 1 ? ib : 0) * bytes, dk, dv);
                    if (slots == 1 && ib != loaded) {
                        load_block(&x, q, sq, dout, sd, lse, delta, scale, b, h, bh, M, i0, rows, dk, dv);
                        loaded = ib;
                    }
                    scores(dk, x.qt, kb, sk[2], j0, N, bb, w->p);
                    scores(dv, x.gt, vb, sv[2], j0, N, NULL, w->ds);
                    for (int64_t j = 0; j < nj; ++j)
                        for (int r0 = 0; r0 < QB; r0 += NW) {
                            const vn pe = nexp(nload(w->p[j] + r0) - nload(x.lse + r0));
                            nstore(w->p[j] + r0, pe);
                            nstore(w->ds[j] + r0, pe * (nload(w->ds[j] + r0) - nload(x.delta + r0)));
                        }
                    if (dvb) cols_times(dv, w->p, nj, x.go, dvb + j0 * dv, dv);    /* dV += P^T dO */
                    if (dkb) cols_times(dk, w->ds, nj, x.qs, dkb + j0 * dk, dk);   /* dK += dS^T (q scale) */
                    if (dqb && rows == QB) {                                        /* dQ += dS K */
                        rows_times(dk, w->ds, nj, kb + j0 * sk[2], sk[2], dqb + i0 * dk);
                    } else if (dqb) {                                /* the last, partial block: padded */
                        memset(w->g, 0, sizeof(float) * QB * dk);
                        memcpy(w->g, dqb + i0 * dk, sizeof(float) * rows * dk);
                        rows_times(dk, w->ds, nj, kb + j0 * sk[2], sk[2], w->g);
                        memcpy(dqb + i0 * dk, w->g, sizeof(float) * rows * dk);
                    }
                }
            }
            if (dqb)
                for (int64_t i = 0; i < M * dk; ++i) dqb[i] *= scale;
        }
        free(w);
        free(blocks);
    }
    return failed ? 2 : 0;
}
