/* Attention softmax(q k^T * scale + bias) v for bfloat16 heads up to 256 channels wide (multiples of 16),
 * forward and backward: the algorithm of attention.c (blocks of QB queries, keys in blocks of KB, scores
 * transposed [key][query row] in the first-level cache, online softmax, probabilities recomputed from the
 * rows' log-sum-exp in the backward) with the products as AVX512-BF16 dot products (vdpbf16ps: per float32
 * lane, two bfloat16 products added to it), twice the float32 FMA's multiply-adds per instruction.
 *
 * A dot product pairs two consecutive elements of the sum, so each product's operands are laid out in
 * pairs along its reduction axis: the queries (and output gradients) transposed as [d/2][QB][2] (the two
 * channels of a pair next to each other, per query row), the values (and keys) of a key block as
 * [KB/2][d][2], the probabilities and score gradients as [KB/2][QB][2] or, for the products that sum over
 * query rows, [KB][QB] (rows r, r+1 adjacent). Keys in the scores and values in dO V^T are read in place:
 * a pair of their channels is one 32-bit broadcast. Scores, softmax and accumulators are float32; the
 * probabilities and score gradients are rounded to bfloat16 for their products (as GPU flash attention
 * does), the queries are taken as they are and the scale applied to the float32 scores.
 *
 * Layouts (elements): as attention.c, q, k, v, out and dout rows of bfloat16 with their channels
 * contiguous, bias (or NULL) float32 [N] per (b, h), lse and delta float32 [B, H, M]. Gradients are
 * written as float32. Built only where the compiler targets AVX512-BF16 (perceivers_attention_bf16_supported
 * says which); elsewhere the entry points return 1.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_common.h"

int perceivers_attention_bf16_supported(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__
#include <immintrin.h>

typedef uint16_t bf16;

static inline float from_bf16(bf16 h) { const uint32_t u = (uint32_t)h << 16; float x; memcpy(&x, &u, 4); return x; }
static inline bf16 to_bf16(float x) {  /* round to nearest even, as PyTorch */
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline __m512bh pairs(const bf16 *p) { return (__m512bh)_mm512_loadu_si512(p); }  /* 16 pairs */
static inline __m512bh pair_bcast(const bf16 *p) { int32_t x; memcpy(&x, p, 4); return (__m512bh)_mm512_set1_epi32(x); }
static inline v16 dot(v16 acc, __m512bh a, __m512bh b) { return (v16)_mm512_dpbf16_ps((__m512)acc, a, b); }
/* 16 floats rounded to bfloat16 into p[0..15]. */
static inline void store_bf16(bf16 *p, v16 x) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh((__m512)x)); }
/* Two vectors rounded to bfloat16 and interleaved into p[0..31]: a[0], b[0], a[1], b[1], ... */
static inline void store_pairs(bf16 *p, v16 a, v16 b) {
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    _mm512_storeu_si512(p, _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a)));
}

static inline const bf16 *at(const bf16 *t, const int64_t *s, int64_t b, int64_t h, int64_t row) {
    return t + b * s[0] + h * s[1] + row * s[2];
}

/* st[j][r] = scale * sum_c a[c][r] x[j0 + j][c] (+ bias[j0 + j]) for the block's keys j < KB, rows r < QB;
 * keys at or past n are -inf. a: [d/2][QB][2]; x: key rows of stride ld. */
static inline __attribute__((always_inline)) void scores(
    int64_t d, const bf16 *a, const bf16 *x, int64_t ld, int64_t j0, int64_t n, const float *bias, float scale,
    float st[KB][QB]
) {
    for (int64_t jt = 0; jt < KB; jt += KT) {
        if (j0 + jt >= n) {
            for (int64_t t = 0; t < KT; ++t) { vstore(st[jt + t], vbcast(-INFINITY)); vstore(st[jt + t] + 16, vbcast(-INFINITY)); }
            continue;
        }
        const bf16 *row[KT];
        for (int t = 0; t < KT; ++t) row[t] = x + (j0 + jt + t < n ? j0 + jt + t : j0) * ld;
        v16 acc[KT][2];
        for (int t = 0; t < KT; ++t) acc[t][0] = acc[t][1] = vbcast(0.0f);
        for (int64_t c = 0; c < d; c += 2) {
            const __m512bh a0 = pairs(a + c * QB), a1 = pairs(a + c * QB + 32);
            for (int t = 0; t < KT; ++t) {
                const __m512bh kv = pair_bcast(row[t] + c);
                acc[t][0] = dot(acc[t][0], a0, kv);
                acc[t][1] = dot(acc[t][1], a1, kv);
            }
        }
        for (int t = 0; t < KT; ++t) {
            const int64_t j = j0 + jt + t;
            const v16 add = vbcast(j >= n ? -INFINITY : (bias ? bias[j] : 0.0f));
            vstore(st[jt + t], acc[t][0] * vbcast(scale) + add);
            vstore(st[jt + t] + 16, acc[t][1] * vbcast(scale) + add);
        }
    }
}

/* o[r][c] += sum_{j < 2 np} w[j/2][r][j%2] x[j/2][c][j%2]: o QB rows of d floats; w [KB/2][QB][2]; x [np][d][2]. */
static inline __attribute__((always_inline)) void rows_times(int64_t d, const bf16 *w, int64_t np, const bf16 *x, float *o) {
    for (int r0 = 0; r0 < QB; r0 += 8) {
        int64_t c0 = 0;
        for (; c0 + 32 <= d; c0 += 32) {
            v16 acc[8][2];
            for (int r = 0; r < 8; ++r) { acc[r][0] = vload(o + (r0 + r) * d + c0); acc[r][1] = vload(o + (r0 + r) * d + c0 + 16); }
            for (int64_t p = 0; p < np; ++p) {
                const __m512bh x0 = pairs(x + (p * d + c0) * 2), x1 = pairs(x + (p * d + c0 + 16) * 2);
                for (int r = 0; r < 8; ++r) {
                    const __m512bh ww = pair_bcast(w + (p * QB + r0 + r) * 2);
                    acc[r][0] = dot(acc[r][0], ww, x0);
                    acc[r][1] = dot(acc[r][1], ww, x1);
                }
            }
            for (int r = 0; r < 8; ++r) { vstore(o + (r0 + r) * d + c0, acc[r][0]); vstore(o + (r0 + r) * d + c0 + 16, acc[r][1]); }
        }
        for (; c0 < d; c0 += 16) {
            v16 acc[8];
            for (int r = 0; r < 8; ++r) acc[r] = vload(o + (r0 + r) * d + c0);
            for (int64_t p = 0; p < np; ++p) {
                const __m512bh x0 = pairs(x + (p * d + c0) * 2);
                for (int r = 0; r < 8; ++r) acc[r] = dot(acc[r], pair_bcast(w + (p * QB + r0 + r) * 2), x0);
            }
            for (int r = 0; r < 8; ++r) vstore(o + (r0 + r) * d + c0, acc[r]);
        }
    }
}

/* o[j][c] += sum_{r < QB} w[j][r] a[r/2][c][r%2] for j < nj: w [KB][QB]; a [QB/2][d][2]; o rows of d floats.
 * Rows of w past nj are read (within the block) and not stored. */
static inline __attribute__((always_inline)) void cols_times(int64_t d, const bf16 *w, int64_t nj, const bf16 *a, float *o) {
    for (int64_t j0 = 0; j0 < nj; j0 += 8) {
        const int nt = nj - j0 < 8 ? (int)(nj - j0) : 8;
        int64_t c0 = 0;
        for (; c0 + 32 <= d; c0 += 32) {
            v16 acc[8][2];
            for (int j = 0; j < 8; ++j) {
                acc[j][0] = j < nt ? vload(o + (j0 + j) * d + c0) : vbcast(0.0f);
                acc[j][1] = j < nt ? vload(o + (j0 + j) * d + c0 + 16) : vbcast(0.0f);
            }
            for (int r = 0; r < QB; r += 2) {
                const __m512bh x0 = pairs(a + (r / 2 * d + c0) * 2), x1 = pairs(a + (r / 2 * d + c0 + 16) * 2);
                for (int j = 0; j < 8; ++j) {
                    const __m512bh ww = pair_bcast(w + (j0 + j) * QB + r);
                    acc[j][0] = dot(acc[j][0], ww, x0);
                    acc[j][1] = dot(acc[j][1], ww, x1);
                }
            }
            for (int j = 0; j < nt; ++j) { vstore(o + (j0 + j) * d + c0, acc[j][0]); vstore(o + (j0 + j) * d + c0 + 16, acc[j][1]); }
        }
        for (; c0 < d; c0 += 16) {
            v16 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = j < nt ? vload(o + (j0 + j) * d + c0) : vbcast(0.0f);
            for (int r = 0; r < QB; r += 2) {
                const __m512bh x0 = pairs(a + (r / 2 * d + c0) * 2);
                for (int j = 0; j < 8; ++j) acc[j] = dot(acc[j], pair_bcast(w + (j0 + j) * QB + r), x0);
            }
            for (int j = 0; j < nt; ++j) vstore(o + (j0 + j) * d + c0, acc[j]);
        }
    }
}

/* Rows j0.. of x (`nj` of them, stride ld) paired along rows, [nj/2][d][2] (a key block's keys or
 * values, a query block's rows), the odd last row's partner zero. */
static void pair_rows(const bf16 *x, int64_t ld, int64_t j0, int64_t nj, int64_t d, bf16 *out) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t j = 0; j < nj; j += 2) {
        const bf16 *r0 = x + (j0 + j) * ld, *r1 = j + 1 < nj ? r0 + ld : NULL;
        bf16 *o = out + j / 2 * 2 * d;
        for (int64_t c = 0; c < d; c += 32) {
            const __mmask32 m = d - c >= 32 ? 0xffffffffu : 0xffffu;
            const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + c);
            const __m512i bb = r1 ? _mm512_maskz_loadu_epi16(m, r1 + c) : _mm512_setzero_si512();
            _mm512_storeu_si512(o + 2 * c, _mm512_permutex2var_epi16(a, lo, bb));
            if (d - c >= 32) _mm512_storeu_si512(o + 2 * c + 32, _mm512_permutex2var_epi16(a, hi, bb));
        }
    }
}

/* Rows i0.. of t (`rows` of them, zero past that) paired along channels, [d/2][QB][2], and/or along rows,
 * [QB/2][d][2] (either may be NULL). */
static void load_rows(const bf16 *t, const int64_t *s, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t d,
                      bf16 *by_channel, bf16 *by_row) {
    if (by_channel) {
        memset(by_channel, 0, sizeof(bf16) * QB * d);
        for (int64_t r = 0; r < rows; ++r) {
            const bf16 *src = at(t, s, b, h, i0 + r);
            for (int64_t c = 0; c < d; c += 2) memcpy(by_channel + (c * QB + 2 * r), src + c, 4);
        }
    }
    if (by_row) {
        const int64_t pairs_used = (rows + 1) / 2;
        pair_rows(at(t, s, b, h, 0), s[2], i0, rows, d, by_row);
        memset(by_row + pairs_used * 2 * d, 0, sizeof(bf16) * (QB / 2 - pairs_used) * 2 * d);
    }
}

/* The forward state of one block of query rows. */
typedef struct {
    bf16 qt[MAXD * QB] __attribute__((aligned(64)));       /* queries paired along channels, [d/2][QB][2] */
    float o[QB * MAXD] __attribute__((aligned(64)));       /* unnormalised output rows */
    float st[KB][QB] __attribute__((aligned(64)));         /* scores of one key block */
    bf16 p[KB * QB] __attribute__((aligned(64)));          /* its probabilities, [KB/2][QB][2] */
    float m[QB] __attribute__((aligned(64)));              /* each row's reference maximum */
    float l[QB] __attribute__((aligned(64)));              /* each row's sum of exp(score - m) */
    float f[QB] __attribute__((aligned(64)));
} Rows;

/* One key block for one query block: online softmax update and o += P V (vp: the block's values paired). */
static inline void forward_block(Rows *x, int64_t dk, int64_t dv, const bf16 *k, int64_t ldk, const bf16 *vp,
                                 int64_t j0, int64_t n, const float *bias, float scale) {
    const int64_t nj = n - j0 < KB ? n - j0 : KB;
    scores(dk, x->qt, k, ldk, j0, n, bias, scale, x->st);
    for (int half = 0; half < 2; ++half) {
        const v16 base = softmax_reference(x->st, nj, half, x->m, x->l, x->f, x->o, dv);
        v16 sum = vbcast(0.0f);
        for (int64_t j = 0; j < nj; j += 2) {  /* masked keys: exp(-inf) = 0; past nj: a zero pair */
            const v16 e0 = vexp(vload(x->st[j] + 16 * half) - base);
            const v16 e1 = j + 1 < nj ? vexp(vload(x->st[j + 1] + 16 * half) - base) : vbcast(0.0f);
            sum += e0 + e1;
            store_pairs(x->p + (j / 2 * QB + 16 * half) * 2, e0, e1);
        }
        vstore(x->l + 16 * half, vload(x->l + 16 * half) + sum);
    }
    rows_times(dv, x->p, (nj + 1) / 2, vp, x->o);
}

/* dims: B, H, M, N, dk, dv. strides: q[3], k[3], v[3], bias[2], out[3]. lse [B, H, M] or NULL.
 * Returns 1 for unsupported widths (or no AVX512-BF16), 2 when a thread's buffers cannot be allocated. */
int perceivers_attention_bf16(const int64_t *dims, const int64_t *st, float scale, const bf16 *q, const bf16 *k,
                              const bf16 *v, const float *bias, bf16 *out, float *lse) {
    const int64_t B = dims[0], H = dims[1], M = dims[2], N = dims[3], dk = dims[4], dv = dims[5];
    const int64_t *sq = st, *sk = st + 3, *sv = st + 6, *sb = st + 9, *so = st + 11;
    if (dk > MAXD || dv > MAXD || dk % 16 || dv % 16 || N < 1) return 1;
    const int64_t mb = (M + QB - 1) / QB;
    const int64_t group = forward_group(B, H, mb, N * (dk + dv) * (int64_t)sizeof(bf16));
    const int64_t per = (mb + group - 1) / group, jobs = B * H * per;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        Rows *w = aligned_alloc(64, group * sizeof(Rows));
        bf16 *vp = aligned_alloc(64, sizeof(bf16) * KB * MAXD);
        if (!w || !vp) failed = 1;
#pragma omp for schedule(static)
        for (int64_t job = 0; job < jobs; ++job) {
            if (!w || !vp) continue;
            const int64_t bh = job / per, b = bh / H, h = bh % H, first = job % per * group;
            const int64_t blocks = mb - first < group ? mb - first : group;
            const bf16 *kb = at(k, sk, b, h, 0), *vb = at(v, sv, b, h, 0);
            const float *bb = bias ? bias + b * sb[0] + h * sb[1] : NULL;
            for (int64_t g = 0; g < blocks; ++g) {
                Rows *x = w + g;
                const int64_t i0 = (first + g) * QB;
                load_rows(q, sq, b, h, i0, M - i0 < QB ? M - i0 : QB, dk, x->qt, NULL);
                memset(x->o, 0, sizeof(float) * QB * dv);
                for (int r = 0; r < QB; ++r) { x->m[r] = -INFINITY; x->l[r] = 0.0f; }
            }
            for (int64_t j0 = 0; j0 < N; j0 += KB) {
                pair_rows(vb, sv[2], j0, N - j0 < KB ? N - j0 : KB, dv, vp);
                for (int64_t g = 0; g < blocks; ++g) forward_block(w + g, dk, dv, kb, sk[2], vp, j0, N, bb, scale);
            }
            for (int64_t g = 0; g < blocks; ++g) {
                const Rows *x = w + g;
                const int64_t i0 = (first + g) * QB, rows = M - i0 < QB ? M - i0 : QB;
                for (int64_t r = 0; r < rows; ++r) {
                    const float inv = x->l[r] > 0.0f ? 1.0f / x->l[r] : 0.0f;
                    bf16 *orow = out + b * so[0] + h * so[1] + (i0 + r) * so[2];
                    for (int64_t c = 0; c < dv; c += 16) store_bf16(orow + c, vload(x->o + r * dv + c) * vbcast(inv));
                    if (lse) lse[bh * M + i0 + r] = x->m[r] + logf(x->l[r]);
                }
            }
        }
        free(w);
        free(vp);
    }
    return failed ? 2 : 0;
}

/* One block of query rows as the backward reads them (paired copies of its queries and output gradient). */
typedef struct {
    bf16 *qc, *qr, *gc, *gr;  /* queries paired along channels and along rows; the gradient likewise */
    float *lse, *delta;       /* the rows' statistics [QB] */
} Block;

/* Bytes of one Block's arrays for widths dk, dv (each array a multiple of 64 bytes). */
static inline int64_t block_bytes(int64_t dk, int64_t dv) {
    return (int64_t)sizeof(bf16) * QB * 2 * (dk + dv) + (int64_t)sizeof(float) * QB * 2;
}

/* Lay a Block's arrays out from mem (64-byte aligned, block_bytes long). */
static inline Block block_at(char *mem, int64_t dk, int64_t dv) {
    Block x;
    x.qc = (bf16 *)mem; x.qr = x.qc + QB * dk; x.gc = x.qr + QB * dk; x.gr = x.gc + QB * dv;
    x.lse = (float *)(x.gr + QB * dv); x.delta = x.lse + QB;
    return x;
}

/* Load query block i0 (`rows` rows) of head (b, h) into x (the row-paired copies only where needed). */
static void load_block(const Block *x, const bf16 *q, const int64_t *sq, const bf16 *dout, const int64_t *sd,
                       const float *lse, const float *delta, int64_t b, int64_t h, int64_t bh, int64_t M, int64_t i0,
                       int64_t rows, int64_t dk, int64_t dv, int by_row_q, int by_row_g) {
    load_rows(q, sq, b, h, i0, rows, dk, x->qc, by_row_q ? x->qr : NULL);
    load_rows(dout, sd, b, h, i0, rows, dv, x->gc, by_row_g ? x->gr : NULL);
    load_row_stats(lse, delta, bh, M, i0, rows, x->lse, x->delta);
}

/* The backward's per-thread buffers for one (query block, key block) pair; the query block's own rows are a Block. */
typedef struct {
    bf16 kp[KB * MAXD] __attribute__((aligned(64)));   /* the key block paired along keys */
    float g[QB * MAXD] __attribute__((aligned(64)));   /* query gradient being accumulated */
    float p[KB][QB] __attribute__((aligned(64)));      /* probabilities of one key block */
    float ds[KB][QB] __attribute__((aligned(64)));     /* score gradients of one key block */
    bf16 pk[KB * QB] __attribute__((aligned(64)));     /* probabilities, [KB][QB] */
    bf16 dk[KB * QB] __attribute__((aligned(64)));     /* score gradients, [KB][QB] */
    bf16 dp[KB * QB] __attribute__((aligned(64)));     /* score gradients, [KB/2][QB][2] */
} Grads;

/* dims: B, H, M, N, dk, dv. strides: q[3], k[3], v[3], bias[2], dout[3]. lse, delta [B, H, M]
 * (delta = rowsum(dout * out)). Writes float32 dq [B, H, M, dk], dk [B, H, N, dk], dv [B, H, N, dv]
 * (contiguous; NULL: not computed); returns 2 when a thread's buffers cannot be allocated. As attention.c,
 * per (b, h) the longer side of the block pairs goes outside. */
int perceivers_attention_bf16_backward(const int64_t *dims, const int64_t *st, float scale, const bf16 *q,
                                       const bf16 *k, const bf16 *v, const float *bias, const bf16 *dout,
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
            const bf16 *kb = at(k, sk, b, h, 0), *vb = at(v, sv, b, h, 0);
            const float *bb = bias ? bias + b * sb[0] + h * sb[1] : NULL;
            float *dkb = dk_out ? dk_out + bh * N * dk : NULL, *dvb = dv_out ? dv_out + bh * N * dv : NULL;
            float *dqb = dq ? dq + bh * M * dk : NULL;
            if (dkb) memset(dkb, 0, sizeof(float) * N * dk);
            if (dvb) memset(dvb, 0, sizeof(float) * N * dv);
            if (dqb) memset(dqb, 0, sizeof(float) * M * dk);
            const int64_t outer = keys_outside ? nb : mb, inner = keys_outside ? mb : nb;
            int64_t loaded = -1, paired = -1;
            if (slots > 1)
                for (int64_t ib = 0; ib < mb; ++ib) {
                    const Block x = block_at(blocks + ib * bytes, dk, dv);
                    const int64_t i0 = ib * QB, rows = M - i0 < QB ? M - i0 : QB;
                    load_block(&x, q, sq, dout, sd, lse, delta, b, h, bh, M, i0, rows, dk, dv, dkb != NULL, dvb != NULL);
                }
            for (int64_t a = 0; a < outer; ++a) {
                for (int64_t c = 0; c < inner; ++c) {
                    const int64_t ib = keys_outside ? c : a, j0 = (keys_outside ? a : c) * KB;
                    const int64_t i0 = ib * QB, rows = M - i0 < QB ? M - i0 : QB, nj = N - j0 < KB ? N - j0 : KB;
                    const Block x = block_at(blocks + (slots > 1 ? ib : 0) * bytes, dk, dv);
                    if (slots == 1 && ib != loaded) {
                        load_block(&x, q, sq, dout, sd, lse, delta, b, h, bh, M, i0, rows, dk, dv, dkb != NULL, dvb != NULL);
                        loaded = ib;
                    }
                    if (dqb && j0 != paired) { pair_rows(kb, sk[2], j0, nj, dk, w->kp); paired = j0; }
                    scores(dk, x.qc, kb, sk[2], j0, N, bb, scale, w->p);
                    scores(dv, x.gc, vb, sv[2], j0, N, NULL, 1.0f, w->ds);
                    for (int64_t j = 0; j < nj; j += 2)
                        for (int half = 0; half < 2; ++half) {
                            const v16 l = vload(x.lse + 16 * half), dl = vload(x.delta + 16 * half);
                            const v16 p0 = vexp(vload(w->p[j] + 16 * half) - l);
                            const v16 g0 = p0 * (vload(w->ds[j] + 16 * half) - dl);
                            const v16 p1 = j + 1 < nj ? vexp(vload(w->p[j + 1] + 16 * half) - l) : vbcast(0.0f);
                            const v16 g1 = j + 1 < nj ? p1 * (vload(w->ds[j + 1] + 16 * half) - dl) : vbcast(0.0f);
                            store_bf16(w->pk + j * QB + 16 * half, p0);
                            store_bf16(w->pk + (j + 1) * QB + 16 * half, p1);
                            store_bf16(w->dk + j * QB + 16 * half, g0);
                            store_bf16(w->dk + (j + 1) * QB + 16 * half, g1);
                            store_pairs(w->dp + (j / 2 * QB + 16 * half) * 2, g0, g1);
                        }
                    if (dvb) cols_times(dv, w->pk, nj, x.gr, dvb + j0 * dv);   /* dV += P^T dO */
                    if (dkb) cols_times(dk, w->dk, nj, x.qr, dkb + j0 * dk);   /* dK += dS^T Q (scale later) */
                    if (dqb && rows == QB) {                                     /* dQ += dS K */
                        rows_times(dk, w->dp, (nj + 1) / 2, w->kp, dqb + i0 * dk);
                    } else if (dqb) {                                            /* a partial block: via a copy */
                        memset(w->g, 0, sizeof(float) * QB * dk);
                        memcpy(w->g, dqb + i0 * dk, sizeof(float) * rows * dk);
                        rows_times(dk, w->dp, (nj + 1) / 2, w->kp, w->g);
                        memcpy(dqb + i0 * dk, w->g, sizeof(float) * rows * dk);
                    }
                }
            }
            if (dqb)
                for (int64_t i = 0; i < M * dk; ++i) dqb[i] *= scale;
            if (dkb)
                for (int64_t i = 0; i < N * dk; ++i) dkb[i] *= scale;
        }
        free(w);
        free(blocks);
    }
    return failed ? 2 : 0;
}

#else  /* no AVX512-BF16 */

int perceivers_attention_bf16(const int64_t *dims, const int64_t *st, float scale, const void *q, const void *k,
                              const void *v, const float *bias, void *out, float *lse) {
    (void)dims; (void)st; (void)scale; (void)q; (void)k; (void)v; (void)bias; (void)out; (void)lse;
    return 1;
}

int perceivers_attention_bf16_backward(const int64_t *dims, const int64_t *st, float scale, const void *q,
                                       const void *k, const void *v, const float *bias, const void *dout,
                                       const float *lse, const float *delta, float *dq, float *dk_out, float *dv_out) {
    (void)dims; (void)st; (void)scale; (void)q; (void)k; (void)v; (void)bias; (void)dout; (void)lse; (void)delta;
    (void)dq; (void)dk_out; (void)dv_out;
    return 1;
}

#endif
