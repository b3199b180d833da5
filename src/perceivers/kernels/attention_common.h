/* What the float32 and bfloat16 attention kernels (attention.c, attention_bf16.c) share: the block sizes,
 * the forward's split of query blocks into jobs, the online softmax's float32 bookkeeping and the
 * backward's per-row statistics. Both keep a block's scores transposed, st[key][query row]. */
#ifndef PERCEIVERS_ATTENTION_COMMON_H
#define PERCEIVERS_ATTENTION_COMMON_H

#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "vector.h"

#define QB 32           /* query rows per block: two vectors */
#define KB 128          /* keys per block */
#define KT 8            /* keys per micro-tile */
#define TAU 10.0f       /* a row's reference maximum moves only when a score exceeds it by this */
#define MAXD 256        /* widest head */
#define GROUP 2         /* forward: query blocks that go through the keys together */
#define WIDE_GROUP 4    /* the same where a head's keys and values exceed STREAM_BYTES */
#define STREAM_BYTES (3 << 20)
#define CACHED_BYTES (8 << 20)  /* backward: bytes of query blocks one thread keeps loaded (backward_slots) */

/* Forward: query blocks per job, GROUP (WIDE_GROUP where a head's keys and values, kv_bytes, stream from
 * beyond the second-level cache and each pass over them costs more) or fewer where there would be too few
 * jobs for the threads. */
static inline int64_t forward_group(int64_t B, int64_t H, int64_t mb, int64_t kv_bytes) {
    int64_t group = kv_bytes > STREAM_BYTES ? WIDE_GROUP : GROUP;
    while (group > 1 && B * H * ((mb + group - 1) / group) < 4 * (int64_t)omp_get_max_threads()) group /= 2;
    return group;
}

/* Online softmax, one part (NW rows: vector.h's vn, 16 with AVX-512, 8 with AVX2) of a block against its
 * next nj keys' scores st: where a row's maximum moved past its reference m by more than TAU (or was
 * -inf), its sum l and output rows o (dv wide) are rescaled and m moves; f receives the factors. Returns
 * what the scores' exponentials are taken against (m, 0 for a row with no key yet, so masked keys give
 * exp(-inf) = 0). */
static inline vn softmax_reference(float st[KB][QB], int64_t nj, int part, float *m, float *l, float *f,
                                   float *o, int64_t dv) {
    const int r0 = NW * part;
    vn bm = nload(st[0] + r0);
    for (int64_t j = 1; j < nj; ++j) bm = nmaxnan(bm, nload(st[j] + r0));
    const vn mo = nload(m + r0), ninf = nbcast(-INFINITY);
    const vni need = (bm > mo + TAU) | ((mo == ninf) & (bm > ninf));
    if (nany(need)) {  /* rows whose maximum moved: rescale their sum and output */
        const vn nm = nsel(need, bm, mo);
        const vn fac = nsel(need, nexp(mo - nm), nbcast(1.0f));
        nstore(l + r0, nload(l + r0) * fac);
        nstore(m + r0, nm);
        nstore(f + r0, fac);
        for (int r = r0; r < r0 + NW; ++r)
            if (f[r] != 1.0f)
                for (int64_t c = 0; c < dv; ++c) o[r * dv + c] *= f[r];
    }
    const vn mm = nload(m + r0);
    return nsel(mm == ninf, nbcast(0.0f), mm);
}

/* Backward: query blocks one thread keeps loaded, `bytes` each: all mb of them when the keys go outside
 * (every key block meets every query block) and they fit in CACHED_BYTES, else one, reloaded as needed. */
static inline int64_t backward_slots(int64_t M, int64_t N, int64_t mb, int64_t bytes) {
    return N > M && mb * bytes <= CACHED_BYTES ? mb : 1;
}

/* Backward: a query block's log-sum-exp and delta rows (rows i0.. of head bh, `rows` of them) into
 * out_lse / out_delta [QB]; padding rows and rows with no key get +inf, so their probabilities are 0. */
static inline void load_row_stats(const float *lse, const float *delta, int64_t bh, int64_t M, int64_t i0,
                                  int64_t rows, float *out_lse, float *out_delta) {
    for (int r = 0; r < QB; ++r) { out_lse[r] = INFINITY; out_delta[r] = 0.0f; }
    for (int64_t r = 0; r < rows; ++r) {
        const float x = lse[bh * M + i0 + r];
        out_lse[r] = x == -INFINITY ? INFINITY : x;
        out_delta[r] = delta[bh * M + i0 + r];
    }
}

#endif
