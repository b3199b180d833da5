/* Attention softmax(q k^T * scale + bias) v for float32 heads up to 256 channels wide (multiples of 16),
 * forward and backward, fused as flash attention is: per block of QB queries the keys go by in blocks of
 * KB, the scores stay in the first-level cache, the softmax runs online (a running maximum and sum), and
 * the backward recomputes the probabilities from the rows' log-sum-exp. The products are register-tiled
 * micro-kernels written with the compiler's vector extensions (16 floats: one AVX-512 register, two
 * AVX2 ones), so the same code builds wherever GCC or Clang does.
 *
 * Layouts (elements, not bytes): a tensor T with rows per (b, h) is addressed T + b*s[0] + h*s[1] +
 * row*s[2] + channel, its channels contiguous; head strides may be 0 (keys shared by every head). The
 * keys and values also come transposed and zero-padded to Np = N rounded up to KB: kT / vT [d][Np] per
 * (b, h) at b*s[0] + h*s[1]. bias (or NULL) is additive per key, [Np] per (b, h) at b*s[0] + h*s[1]
 * (-inf on masked keys and on the padding). Every row must keep a key; a row with none returns zeros.
 * Work is split over OpenMP threads: (b, h, query block) in the forward, (b, h) in the backward.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

#define QB 16           /* query rows per block */
#define KB 64           /* keys per block */
#define NV (KB / 16)    /* vectors per block of scores */
#define TAU 10.0f       /* a row's reference maximum moves only when a score exceeds it by this */
#define MAXD 256        /* widest head */

static inline v16 vbcast(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline v16 vload(const float *p) { v16 r; memcpy(&r, p, 64); return r; }
static inline void vstore(float *p, v16 x) { memcpy(p, &x, 64); }
static inline v16 vsel(i16 m, v16 a, v16 b) {
    i16 ai, bi, r;
    v16 o;
    memcpy(&ai, &a, 64); memcpy(&bi, &b, 64);
    r = (ai & m) | (bi & ~m);
    memcpy(&o, &r, 64);
    return o;
}
static inline v16 vmax(v16 a, v16 b) { return vsel(a > b, a, b); }

/* exp(x), 0 below -87 (so exp(-inf) is exactly 0) */
static inline v16 vexp(v16 x0) {
    v16 x = vmax(x0, vbcast(-87.0f));
    v16 t = x * vbcast(1.44269504088896341f);
    v16 magic = vbcast(12582912.0f);
    v16 k = (t + magic) - magic;
    v16 y = (t - k) * vbcast(0.69314718055994531f);
    v16 p = vbcast(1.0f) + y * (vbcast(1.0f) + y * (vbcast(0.5f) + y * (vbcast(0.16666667f) + y * (vbcast(0.041666668f) + y * (vbcast(0.0083333338f) + y * vbcast(0.0013888889f))))));
    i16 bits = (__builtin_convertvector(k, i16) + 127) << 23;
    v16 s;
    memcpy(&s, &bits, 64);
    return vsel(x0 < vbcast(-87.0f), vbcast(0.0f), p * s);
}

static inline float hmax(v16 x) { float m = x[0]; for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m; return m; }
static inline float hsum(v16 x) { float s = 0; for (int i = 0; i < 16; ++i) s += x[i]; return s; }
static inline int64_t Np(int64_t n) { return (n + KB - 1) / KB * KB; }

/* s[r][j] = sum_c a[r][c] bT[c][j0 + j] (+ bias[j0 + j]) for r < QB; lanes j >= n - j0 get -inf. a: QB rows of d. */
static inline __attribute__((always_inline)) void scores(
    int64_t d, const float *a, const float *bT, int64_t ldb, int64_t j0, int64_t n, const float *bias, float s[QB][KB]
) {
    for (int r0 = 0; r0 < QB; r0 += 4) {
        v16 acc[4][NV];
        for (int r = 0; r < 4; ++r) for (int u = 0; u < NV; ++u) acc[r][u] = vbcast(0);
        for (int64_t c = 0; c < d; ++c) {
            const float *bc = bT + c * ldb + j0;
            v16 bv[NV];
            for (int u = 0; u < NV; ++u) bv[u] = vload(bc + 16 * u);
            for (int r = 0; r < 4; ++r) {
                v16 x = vbcast(a[(r0 + r) * d + c]);
                for (int u = 0; u < NV; ++u) acc[r][u] += x * bv[u];
            }
        }
        if (bias) {
            for (int u = 0; u < NV; ++u) {
                v16 bb = vload(bias + j0 + 16 * u);
                for (int r = 0; r < 4; ++r) acc[r][u] += bb;
            }
        }
        for (int r = 0; r < 4; ++r) for (int u = 0; u < NV; ++u) vstore(&s[r0 + r][16 * u], acc[r][u]);
    }
    if (j0 + KB > n)
        for (int r = 0; r < QB; ++r) for (int64_t j = n - j0; j < KB; ++j) s[r][j] = -INFINITY;
}

/* o[r][c] += sum_{j < nj} w[r][j] b[j][c]; o: QB rows of d (d % 16 == 0), b rows of ldb. */
static inline __attribute__((always_inline)) void rows_times(
    int64_t d, float w[QB][KB], int64_t nj, const float *b, int64_t ldb, float *o
) {
    for (int r0 = 0; r0 < QB; r0 += 8) {
        int64_t c0 = 0;
        for (; c0 + 32 <= d; c0 += 32) {
            v16 acc[8][2];
            for (int r = 0; r < 8; ++r) { acc[r][0] = vload(o + (r0 + r) * d + c0); acc[r][1] = vload(o + (r0 + r) * d + c0 + 16); }
            for (int64_t j = 0; j < nj; ++j) {
                const float *bj = b + j * ldb + c0;
                v16 x0 = vload(bj), x1 = vload(bj + 16);
                for (int r = 0; r < 8; ++r) { v16 ww = vbcast(w[r0 + r][j]); acc[r][0] += ww * x0; acc[r][1] += ww * x1; }
            }
            for (int r = 0; r < 8; ++r) { vstore(o + (r0 + r) * d + c0, acc[r][0]); vstore(o + (r0 + r) * d + c0 + 16, acc[r][1]); }
        }
        for (; c0 < d; c0 += 16) {
            v16 acc[8];
            for (int r = 0; r < 8; ++r) acc[r] = vload(o + (r0 + r) * d + c0);
            for (int64_t j = 0; j < nj; ++j) {
                v16 x0 = vload(b + j * ldb + c0);
                for (int r = 0; r < 8; ++r) acc[r] += vbcast(w[r0 + r][j]) * x0;
            }
            for (int r = 0; r < 8; ++r) vstore(o + (r0 + r) * d + c0, acc[r]);
        }
    }
}

/* o[j][c] += sum_{r < QB} w[r][j] a[r][c] for j < nj; a: QB rows of d; o rows of ldo. */
static inline __attribute__((always_inline)) void cols_times(
    int64_t d, float w[QB][KB], int64_t nj, const float *a, float *o, int64_t ldo
) {
    int64_t j0 = 0;
    for (; j0 + 8 <= nj; j0 += 8) {
        int64_t c0 = 0;
        for (; c0 + 32 <= d; c0 += 32) {
            v16 acc[8][2];
            for (int j = 0; j < 8; ++j) { acc[j][0] = vload(o + (j0 + j) * ldo + c0); acc[j][1] = vload(o + (j0 + j) * ldo + c0 + 16); }
            for (int r = 0; r < QB; ++r) {
                v16 x0 = vload(a + r * d + c0), x1 = vload(a + r * d + c0 + 16);
                for (int j = 0; j < 8; ++j) { v16 ww = vbcast(w[r][j0 + j]); acc[j][0] += ww * x0; acc[j][1] += ww * x1; }
            }
            for (int j = 0; j < 8; ++j) { vstore(o + (j0 + j) * ldo + c0, acc[j][0]); vstore(o + (j0 + j) * ldo + c0 + 16, acc[j][1]); }
        }
        for (; c0 < d; c0 += 16) {
            v16 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = vload(o + (j0 + j) * ldo + c0);
            for (int r = 0; r < QB; ++r) {
                v16 x0 = vload(a + r * d + c0);
                for (int j = 0; j < 8; ++j) acc[j] += vbcast(w[r][j0 + j]) * x0;
            }
            for (int j = 0; j < 8; ++j) vstore(o + (j0 + j) * ldo + c0, acc[j]);
        }
    }
    for (; j0 < nj; ++j0) {
        float *oj = o + j0 * ldo;
        for (int64_t c0 = 0; c0 < d; c0 += 16) {
            v16 acc = vload(oj + c0);
            for (int r = 0; r < QB; ++r) acc += vbcast(w[r][j0]) * vload(a + r * d + c0);
            vstore(oj + c0, acc);
        }
    }
}


static inline const float *at(const float *t, const int64_t *s, int64_t b, int64_t h, int64_t row) {
    return t + b * s[0] + h * s[1] + row * s[2];
}

/* The forward state of one block of query rows: scaled queries, output accumulator, scores, running
 * maximum and sum. */
typedef struct {
    float qs[QB * MAXD] __attribute__((aligned(64))), o[QB * MAXD] __attribute__((aligned(64)));
    float s[QB][KB] __attribute__((aligned(64)));
    float m[QB], l[QB];
} Rows;

/* Up to GROUP query blocks go through the keys together, so each key block is read once for all of them. */
#define GROUP 4

/* dims: B, H, M, N, dk, dv. strides: q[3], kT[2], v[3], bias[2], out[3]. lse [B, H, M] or NULL.
 * Returns 1 for unsupported widths, 2 when a thread's buffers cannot be allocated. */
int perceivers_attention(const int64_t *dims, const int64_t *st, float scale, const float *q, const float *kT,
                         const float *v, const float *bias, float *out, float *lse) {
    const int64_t B = dims[0], H = dims[1], M = dims[2], N = dims[3], dk = dims[4], dv = dims[5];
    const int64_t *sq = st, *skt = st + 3, *sv = st + 5, *sb = st + 8, *so = st + 10;
    if (dk > MAXD || dv > MAXD || dk % 16 || dv % 16 || N < 1) return 1;
    const int64_t mb = (M + QB - 1) / QB;
    int64_t group = GROUP;  /* fewer blocks per job where there would be too few jobs for the threads */
    while (group > 1 && B * H * ((mb + group - 1) / group) < 4 * (int64_t)omp_get_max_threads()) group /= 2;
    const int64_t per = (mb + group - 1) / group, jobs = B * H * per;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        Rows *w = aligned_alloc(64, GROUP * sizeof(Rows));
        if (!w) failed = 1;
#pragma omp for schedule(static)
        for (int64_t job = 0; job < jobs; ++job) {
            if (!w) continue;
            const int64_t bh = job / per, b = bh / H, h = bh % H, first = job % per * group;
            const int64_t blocks = mb - first < group ? mb - first : group;
            const float *kb = kT + b * skt[0] + h * skt[1], *vb = at(v, sv, b, h, 0);
            const float *bb = bias ? bias + b * sb[0] + h * sb[1] : NULL;
            for (int64_t g = 0; g < blocks; ++g) {
                Rows *x = w + g;
                const int64_t i0 = (first + g) * QB, rows = M - i0 < QB ? M - i0 : QB;
                memset(x->qs, 0, sizeof(float) * QB * dk);
                memset(x->o, 0, sizeof(float) * QB * dv);
                for (int r = 0; r < QB; ++r) { x->m[r] = -INFINITY; x->l[r] = 0; }
                for (int64_t r = 0; r < rows; ++r) {
                    const float *qr = at(q, sq, b, h, i0 + r);
                    for (int64_t c = 0; c < dk; ++c) x->qs[r * dk + c] = qr[c] * scale;
                }
            }
            for (int64_t j0 = 0; j0 < N; j0 += KB) {
                for (int64_t g = 0; g < blocks; ++g) {
                    Rows *x = w + g;
                    scores(dk, x->qs, kb, Np(N), j0, N, bb, x->s);
                    for (int r = 0; r < QB; ++r) {
                        v16 mx = vload(x->s[r]);
                        for (int u = 1; u < NV; ++u) mx = vmax(mx, vload(&x->s[r][16 * u]));
                        const float bm = hmax(mx);
                        if (bm > x->m[r] + TAU || (x->m[r] == -INFINITY && bm > -INFINITY)) {
                            const float f = x->m[r] == -INFINITY ? 0.0f : expf(x->m[r] - bm);
                            x->l[r] *= f;
                            for (int64_t c = 0; c < dv; ++c) x->o[r * dv + c] *= f;
                            x->m[r] = bm;
                        }
                        if (x->m[r] == -INFINITY) {  /* every key so far masked: they weigh nothing */
                            memset(x->s[r], 0, sizeof x->s[r]);
                            continue;
                        }
                        v16 sum = vbcast(0.0f), mm = vbcast(x->m[r]);
                        for (int u = 0; u < NV; ++u) {
                            v16 e = vexp(vload(&x->s[r][16 * u]) - mm);
                            sum += e;
                            vstore(&x->s[r][16 * u], e);
                        }
                        x->l[r] += hsum(sum);
                    }
                    rows_times(dv, x->s, N - j0 < KB ? N - j0 : KB, vb + j0 * sv[2], sv[2], x->o);
                }
            }
            for (int64_t g = 0; g < blocks; ++g) {
                Rows *x = w + g;
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

/* One query block against one key block of the backward: P and dS recomputed, dV += P^T dO,
 * dK += dS^T (q scale) into the key block's rows, and (dq not NULL) dQ += dS K into the query block's rows. */
typedef struct {
    float qs[QB * MAXD] __attribute__((aligned(64))), go[QB * MAXD] __attribute__((aligned(64)));
    float g[QB * MAXD] __attribute__((aligned(64)));
    float p[QB][KB] __attribute__((aligned(64))), ds[QB][KB] __attribute__((aligned(64)));
    float lr[QB], dr[QB];
} Block;

/* dims: B, H, M, N, dk, dv. strides: q[3], k[3], kT[2], vT[2], bias[2], dout[3]. lse, delta [B, H, M]
 * (delta = rowsum(dout * out)). Writes dq [B, H, M, dk], dk [B, H, N, dk], dv [B, H, N, dv] (contiguous;
 * NULL: not computed); returns 2 when a thread's buffers cannot be allocated. Per (b, h) the loop over block pairs runs with the longer side outside, so the
 * gradient that accumulates over the inner side (dK, dV per key block, or dQ per query block) stays cached. */
int perceivers_attention_backward(const int64_t *dims, const int64_t *st, float scale, const float *q,
                                  const float *k, const float *kT, const float *vT, const float *bias,
                                  const float *dout, const float *lse, const float *delta, float *dq, float *dk_out,
                                  float *dv_out) {
    const int64_t B = dims[0], H = dims[1], M = dims[2], N = dims[3], dk = dims[4], dv = dims[5];
    const int64_t *sq = st, *sk = st + 3, *skt = st + 6, *svt = st + 8, *sb = st + 10, *sd = st + 12;
    if (dk > MAXD || dv > MAXD || dk % 16 || dv % 16 || N < 1) return 1;
    const int64_t mb = (M + QB - 1) / QB, nb = (N + KB - 1) / KB;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        Block *w = aligned_alloc(64, sizeof(Block));
        if (!w) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            if (!w) continue;
            const int64_t b = bh / H, h = bh % H;
            const float *kb = kT + b * skt[0] + h * skt[1], *vtb = vT + b * svt[0] + h * svt[1];
            const float *krows = at(k, sk, b, h, 0);
            const float *bb = bias ? bias + b * sb[0] + h * sb[1] : NULL;
            float *dkb = dk_out ? dk_out + bh * N * dk : NULL, *dvb = dv_out ? dv_out + bh * N * dv : NULL;
            float *dqb = dq ? dq + bh * M * dk : NULL;
            if (dkb) memset(dkb, 0, sizeof(float) * N * dk);
            if (dvb) memset(dvb, 0, sizeof(float) * N * dv);
            if (dqb) memset(dqb, 0, sizeof(float) * M * dk);
            const int keys_outside = N > M;
            const int64_t outer = keys_outside ? nb : mb, inner = keys_outside ? mb : nb;
            int64_t loaded = -1;
            for (int64_t a = 0; a < outer; ++a) {
                for (int64_t c = 0; c < inner; ++c) {
                    const int64_t ib = keys_outside ? c : a, j0 = (keys_outside ? a : c) * KB;
                    const int64_t i0 = ib * QB, rows = M - i0 < QB ? M - i0 : QB, nj = N - j0 < KB ? N - j0 : KB;
                    if (ib != loaded) {  /* the query block's rows, zero-padded to QB */
                        memset(w->qs, 0, sizeof(float) * QB * dk);
                        memset(w->go, 0, sizeof(float) * QB * dv);
                        for (int r = 0; r < QB; ++r) { w->lr[r] = INFINITY; w->dr[r] = 0.0f; }  /* padding: p = 0 */
                        for (int64_t r = 0; r < rows; ++r) {
                            const float x = lse[bh * M + i0 + r];
                            w->lr[r] = x == -INFINITY ? INFINITY : x;  /* a row with no key: no gradient */
                            w->dr[r] = delta[bh * M + i0 + r];
                            const float *qr = at(q, sq, b, h, i0 + r), *gr = at(dout, sd, b, h, i0 + r);
                            for (int64_t x2 = 0; x2 < dk; ++x2) w->qs[r * dk + x2] = qr[x2] * scale;
                            memcpy(w->go + r * dv, gr, sizeof(float) * dv);
                        }
                        loaded = ib;
                    }
                    scores(dk, w->qs, kb, Np(N), j0, N, bb, w->p);
                    scores(dv, w->go, vtb, Np(N), j0, N, NULL, w->ds);
                    for (int r = 0; r < QB; ++r) {
                        const v16 lv = vbcast(w->lr[r]), dl = vbcast(w->dr[r]);
                        for (int u = 0; u < NV; ++u) {
                            const v16 pe = vexp(vload(&w->p[r][16 * u]) - lv);
                            vstore(&w->p[r][16 * u], pe);
                            vstore(&w->ds[r][16 * u], pe * (vload(&w->ds[r][16 * u]) - dl));
                        }
                    }
                    if (dvb) cols_times(dv, w->p, nj, w->go, dvb + j0 * dv, dv);    /* dV += P^T dO */
                    if (dkb) cols_times(dk, w->ds, nj, w->qs, dkb + j0 * dk, dk);   /* dK += dS^T (q scale) */
                    if (dqb) {                                                       /* dQ += dS K */
                        memset(w->g, 0, sizeof(float) * QB * dk);
                        memcpy(w->g, dqb + i0 * dk, sizeof(float) * rows * dk);
                        rows_times(dk, w->ds, nj, krows + j0 * sk[2], sk[2], w->g);
                        memcpy(dqb + i0 * dk, w->g, sizeof(float) * rows * dk);
                    }
                }
            }
            if (dqb)
                for (int64_t i = 0; i < M * dk; ++i) dqb[i] *= scale;
        }
        free(w);
    }
    return failed ? 2 : 0;
}
