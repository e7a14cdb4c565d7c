/* The two ops of the CPU backend that walk a ragged batch in token order and
 * carry state between calls: token_shift (the x_prev vectors) and wkv7 (the
 * [H,N,N] WKV state). Sequence s owns rows row_begin[s] .. + seq_len[s] and
 * the state slot slot[s]; calls over a prefix and then the rest equal one
 * call over the whole sequence. Called through the rp_backend vtable. */

#include "config.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_backend.h"

/* Rows handed to a thread at a time by token_shift: big enough to amortise
 * the bookkeeping, small enough to split one long sequence across threads. */
#define CPU_SHIFT_CHUNK_ROWS 32

/* Per-token decay and kernel vectors of one head live on the stack up to
 * this head size; larger heads take the slow path that recomputes them. */
#define CPU_WKV_MAX_N 256

/* Runs of at least this many tokens take the key-major kernel (the state
 * transposed in and out: ~0.4 us per head of 64, for ~0.2 us saved per token
 * and head), shorter ones (decode) the value-major one. Same bits either way. */
#define CPU_WKV_KEYMAJOR_MIN_LEN 4

/* prev [R,C]: row r = x row r-1 within a sequence, the slot's state vector for
 * the sequence's first row; then the state vector = the sequence's last row.
 * All of prev is written before any state vector changes: a sequence's first
 * row reads the state from before this call, whatever order threads run in. */
void cpu_token_shift(rp_backend *be, float *prev, const float *x, float *state_base,
                     size_t state_stride, const rp_batch *batch, int C) {
    const size_t row_bytes = (size_t)C * sizeof(float);
    int nt = (size_t)batch->n_rows * C < RP_CPU_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = omp_get_thread_num(), nthr = omp_get_num_threads();
        /* Chunks of rows of all sequences, dealt round-robin: one long
         * sequence and many length-1 sequences both spread over the team. */
        long chunk = 0;
        for (int s = 0; s < batch->n_seq; s++) {
            const int len = batch->seq_len[s];
            const size_t row0 = (size_t)batch->row_begin[s];
            for (int t0 = 0; t0 < len; t0 += CPU_SHIFT_CHUNK_ROWS, chunk++) {
                if (chunk % nthr != tid) continue;
                int t1 = t0 + CPU_SHIFT_CHUNK_ROWS < len ? t0 + CPU_SHIFT_CHUNK_ROWS : len;
                int t = t0;
                if (t == 0) {
                    memcpy(prev + row0 * C, state_base + (size_t)batch->slot[s] * state_stride,
                           row_bytes);
                    t = 1;
                }
                if (t1 > t)
                    memcpy(prev + (row0 + t) * C, x + (row0 + t - 1) * C,
                           (size_t)(t1 - t) * row_bytes);
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int s = 0; s < batch->n_seq; s++) {
            size_t last = (size_t)batch->row_begin[s] + batch->seq_len[s] - 1;
            memcpy(state_base + (size_t)batch->slot[s] * state_stride, x + last * C, row_bytes);
        }
    }
}

/* The per-key vectors of one token: d = decay(w_raw), a = -kk, b = kk * iclr. */
static inline __attribute__((always_inline)) void
cpu_wkv7_token_vectors(float *restrict decay, float *restrict kern_a, float *restrict kern_b,
                       const float *restrict w_raw, const float *restrict kk,
                       const float *restrict a, int N) {
#pragma omp simd
    for (int j = 0; j < N; j++) {
        decay[j] = cpu_decayf(w_raw[j]);
        kern_a[j] = -kk[j];
        kern_b[j] = kk[j] * a[j];
    }
}

/* One head of one sequence, tokens in order, state S [N,N] updated in place:
 *   sa_i = sum_j S[i,j] a_j,  S[i,j] = S[i,j] d_j + sa_i b_j + v_i k_j,
 *   y_i = sum_j S[i,j] r_j    with a = -kk, b = kk * a_iclr, d = decay(w_raw).
 * Row i of S is contiguous, so both sums run along j in explicit vectors
 * (N a multiple of 8, N <= CPU_WKV_MAX_N: every real RWKV-7 head). All sa_i
 * are computed before any row is updated, so no row waits for its own sum
 * (measured ~10% faster than row by row). The inputs point at the head's
 * first channel of the sequence's first row; rows are C floats apart. The
 * summation order depends on N only: a sequence fed in pieces or token by
 * token gives bit-identical results. */
static void cpu_wkv7_head_v8(float *restrict S, float *restrict y, const float *restrict r,
                             const float *restrict w_raw, const float *restrict k,
                             const float *restrict v, const float *restrict kk,
                             const float *restrict a, int len, int C, int N) {
    float decay[CPU_WKV_MAX_N], kern_a[CPU_WKV_MAX_N], kern_b[CPU_WKV_MAX_N],
        sa[CPU_WKV_MAX_N];
    for (int t = 0; t < len; t++) {
        const size_t o = (size_t)t * C;
        const float *rt = r + o, *kt = k + o, *vt = v + o;
        cpu_wkv7_token_vectors(decay, kern_a, kern_b, w_raw + o, kk + o, a + o, N);
        for (int i = 0; i < N; i++) {
            const float *Si = S + (size_t)i * N;
            cpu_v8 acc0 = {0}, acc1 = {0}; /* two independent add chains */
            int j = 0;
            for (; j + 16 <= N; j += 16) {
                acc0 += CPU_V8_LOAD(Si + j) * CPU_V8_LOAD(kern_a + j);
                acc1 += CPU_V8_LOAD(Si + j + 8) * CPU_V8_LOAD(kern_a + j + 8);
            }
            if (j < N) acc0 += CPU_V8_LOAD(Si + j) * CPU_V8_LOAD(kern_a + j);
            const cpu_v8 total = acc0 + acc1;
            sa[i] = cpu_v8_sum(&total);
        }
        for (int i = 0; i < N; i++) {
            float *Si = S + (size_t)i * N;
            const float sa_i = sa[i], v_i = vt[i];
            cpu_v8 y0 = {0}, y1 = {0};
            int j = 0;
            for (; j + 16 <= N; j += 16) {
                cpu_v8 s0 = CPU_V8_LOAD(Si + j) * CPU_V8_LOAD(decay + j) +
                            sa_i * CPU_V8_LOAD(kern_b + j) + v_i * CPU_V8_LOAD(kt + j);
                cpu_v8 s1 = CPU_V8_LOAD(Si + j + 8) * CPU_V8_LOAD(decay + j + 8) +
                            sa_i * CPU_V8_LOAD(kern_b + j + 8) + v_i * CPU_V8_LOAD(kt + j + 8);
                CPU_V8_STORE(Si + j, s0);
                CPU_V8_STORE(Si + j + 8, s1);
                y0 += s0 * CPU_V8_LOAD(rt + j);
                y1 += s1 * CPU_V8_LOAD(rt + j + 8);
            }
            if (j < N) {
                cpu_v8 s0 = CPU_V8_LOAD(Si + j) * CPU_V8_LOAD(decay + j) +
                            sa_i * CPU_V8_LOAD(kern_b + j) + v_i * CPU_V8_LOAD(kt + j);
                CPU_V8_STORE(Si + j, s0);
                y0 += s0 * CPU_V8_LOAD(rt + j);
            }
            const cpu_v8 total = y0 + y1;
            y[o + i] = cpu_v8_sum(&total);
        }
    }
}

/* ---- long runs: the same recurrence on a key-major copy of the state ----
 * cpu_wkv7_head_v8's sums run along a state row (over j), each ending in a
 * horizontal reduction of a vector, about half of the recurrence's time in
 * prefill. On St[j][i] = S[i][j] the value channels i
 * lie across the lanes and the sums become vertical adds with the key
 * scalars broadcast. To give bit-identical results (a sequence fed in
 * pieces, token by token, or in one call must not change a bit, whichever
 * kernel runs each piece), each lane keeps 16 partial sums, one per j mod
 * 16, added in ascending j, and combines them in the tree cpu_wkv7_head_v8
 * ends with: its two 8-lane accumulators hold, lane l, the j = l and
 * j = l + 8 (mod 16) sums, then (0+4)+(2+6) + (1+5)+(3+7) of their sum.
 * Every product and sum rounds as there (no FP contraction in this file:
 * the recurrence gives the same bits as before this kernel existed, so a
 * training run or a generation does not change). Measured on C=768, one
 * core: 0.92 us per token and head against 1.02 (a kernel free to sum in
 * its own order, with FMAs, did 0.53, but the decode path would then need
 * the transposes too: +4% on a batch-8 decode step). */

/* The tree of cpu_wkv7_head_v8 over 16 partial sums (p[m]: j = m mod 16). */
#define CPU_WKV_TREE(VT, p)                                                                 \
    ({                                                                                      \
        VT t_[8], s_[4];                                                                    \
        for (int l_ = 0; l_ < 8; l_++) t_[l_] = (p)[l_] + (p)[l_ + 8];                      \
        for (int q_ = 0; q_ < 4; q_++) s_[q_] = t_[q_] + t_[q_ + 4];                        \
        (s_[0] + s_[2]) + (s_[1] + s_[3]);                                                  \
    })

/* Key row j of the block: the state update, then its term of y into p[m]. */
#define CPU_WKV7_UPDATE(VT, LOAD, STORE, j, m)                                              \
    do {                                                                                    \
        float *row_ = St + (size_t)(j) * N + i0;                                            \
        const VT s_ = LOAD(row_) * decay[j] + sa * kern_b[j] + v_i * k[j];                  \
        STORE(row_, s_);                                                                    \
        p[m] += s_ * r[j];                                                                  \
    } while (0)

/* One token over a block of LANES value channels at i0, for VT of LANES
 * floats (cpu_v16, or cpu_v8 for heads of an odd multiple of 8): sa, then
 * the update with y. The j loop goes in steps of 16 so that p[m] is a
 * register; a tail of 8 (N % 16 == 8) lands in p[0..7], as in the tail of
 * cpu_wkv7_head_v8. */
#define CPU_WKV7_KEYMAJOR_TOKEN(VT, LANES, LOAD, STORE)                                     \
    static inline __attribute__((always_inline)) void cpu_wkv7_keymajor_token_##LANES(      \
        float *restrict St, float *restrict y, const float *restrict v,                    \
        const float *restrict decay, const float *restrict kern_a,                         \
        const float *restrict kern_b, const float *restrict k, const float *restrict r,    \
        int i0, int N) {                                                                    \
        VT p[16];                                                                           \
        for (int m = 0; m < 16; m++) p[m] = (VT){0};                                        \
        int j0 = 0;                                                                         \
        for (; j0 + 16 <= N; j0 += 16)                                                      \
            _Pragma("GCC unroll 16") for (int m = 0; m < 16; m++)                           \
                p[m] += LOAD(St + (size_t)(j0 + m) * N + i0) * kern_a[j0 + m];              \
        for (int m = 0; j0 + m < N; m++)                                                    \
            p[m] += LOAD(St + (size_t)(j0 + m) * N + i0) * kern_a[j0 + m];                  \
        const VT sa = CPU_WKV_TREE(VT, p), v_i = LOAD(v + i0);                              \
        for (int m = 0; m < 16; m++) p[m] = (VT){0};                                        \
        for (j0 = 0; j0 + 16 <= N; j0 += 16)                                                \
            _Pragma("GCC unroll 16") for (int m = 0; m < 16; m++)                           \
                CPU_WKV7_UPDATE(VT, LOAD, STORE, j0 + m, m);                                \
        for (int m = 0; j0 + m < N; m++) CPU_WKV7_UPDATE(VT, LOAD, STORE, j0 + m, m);       \
        STORE(y + i0, CPU_WKV_TREE(VT, p));                                                 \
    }

CPU_WKV7_KEYMAJOR_TOKEN(cpu_v16, 16, CPU_V16_LOAD, CPU_V16_STORE)
CPU_WKV7_KEYMAJOR_TOKEN(cpu_v8, 8, CPU_V8_LOAD, CPU_V8_STORE)

/* GCC's __builtin_shuffle takes the lane indices as a vector; clang (which
 * builds the fuzz targets, launch/fuzz) has only __builtin_shufflevector with
 * constant indices. Same lanes either way. */
#if defined(__clang__)
#define CPU_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int cpu_i8 __attribute__((vector_size(32)));
#define CPU_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, (cpu_i8){__VA_ARGS__})
#endif
#define CPU_LO_PAIRS 0, 8, 1, 9, 4, 12, 5, 13
#define CPU_HI_PAIRS 2, 10, 3, 11, 6, 14, 7, 15
#define CPU_LO_QUADS 0, 1, 8, 9, 4, 5, 12, 13
#define CPU_HI_QUADS 2, 3, 10, 11, 6, 7, 14, 15
#define CPU_LO_HALVES 0, 1, 2, 3, 8, 9, 10, 11
#define CPU_HI_HALVES 4, 5, 6, 7, 12, 13, 14, 15

/* Rows 0..7 of an 8 x 8 block (row stride `in`) written as its columns
 * (row stride `out`): the usual three rounds of two-input shuffles (pairs,
 * quads, halves), 24 in all, instead of 64 strided single-float stores. */
static inline __attribute__((always_inline)) void
cpu_transpose_8x8(float *restrict dst, const float *restrict src, size_t out, size_t in) {
    cpu_v8 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = CPU_V8_LOAD(src + i * in);
    for (int i = 0; i < 8; i += 2) {
        t[i] = CPU_SHUFFLE8(r[i], r[i + 1], CPU_LO_PAIRS);
        t[i + 1] = CPU_SHUFFLE8(r[i], r[i + 1], CPU_HI_PAIRS);
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            u[i + h] = CPU_SHUFFLE8(t[i + h], t[i + h + 2], CPU_LO_QUADS);
            u[i + h + 2] = CPU_SHUFFLE8(t[i + h], t[i + h + 2], CPU_HI_QUADS);
        }
    /* u[0..3] hold columns 0, 1, 2, 3 of rows 0-3 (lanes 0-3) and columns
     * 4-7 (lanes 4-7); u[4..7] the same for rows 4-7. */
    const int col_of[4] = {0, 2, 1, 3};
    for (int q = 0; q < 4; q++) {
        CPU_V8_STORE(dst + col_of[q] * out, CPU_SHUFFLE8(u[q], u[q + 4], CPU_LO_HALVES));
        CPU_V8_STORE(dst + (col_of[q] + 4) * out, CPU_SHUFFLE8(u[q], u[q + 4], CPU_HI_HALVES));
    }
}

/* dst = src transposed, N x N (rows N floats apart in both), N % 8 == 0. */
static void cpu_wkv_transpose(float *restrict dst, const float *restrict src, int N) {
    for (int i0 = 0; i0 < N; i0 += 8)
        for (int j0 = 0; j0 < N; j0 += 8)
            cpu_transpose_8x8(dst + (size_t)j0 * N + i0, src + (size_t)i0 * N + j0, (size_t)N,
                              (size_t)N);
}

/* cpu_wkv7_head_v8's contract and results, for runs long enough to pay
 * for transposing the state in and out (~0.4 us per head of 64). */
static void cpu_wkv7_head_keymajor(float *restrict S, float *restrict y, const float *restrict r,
                                   const float *restrict w_raw, const float *restrict k,
                                   const float *restrict v, const float *restrict kk,
                                   const float *restrict a, int len, int C, int N) {
    float local[64 * 64];
    float *St = N <= 64 ? local : malloc((size_t)N * N * sizeof *St);
    if (!St) abort(); /* N <= CPU_WKV_MAX_N: at most 256 KiB */
    float decay[CPU_WKV_MAX_N], kern_a[CPU_WKV_MAX_N], kern_b[CPU_WKV_MAX_N];
    /* The state is usually cold (streamed weights evicted it) and the
     * transpose reads it eight rows at a time: ask for every line first. */
    for (size_t q = 0; q < (size_t)N * N; q += 16) __builtin_prefetch(S + q, 1, 3);
    cpu_wkv_transpose(St, S, N);
    for (int t = 0; t < len; t++) {
        const size_t o = (size_t)t * C;
        cpu_wkv7_token_vectors(decay, kern_a, kern_b, w_raw + o, kk + o, a + o, N);
        if (N % 16 == 0)
            for (int i0 = 0; i0 < N; i0 += 16)
                cpu_wkv7_keymajor_token_16(St, y + o, v + o, decay, kern_a, kern_b, k + o,
                                           r + o, i0, N);
        else
            for (int i0 = 0; i0 < N; i0 += 8)
                cpu_wkv7_keymajor_token_8(St, y + o, v + o, decay, kern_a, kern_b, k + o,
                                          r + o, i0, N);
    }
    cpu_wkv_transpose(S, St, N);
    if (St != local) free(St);
}

/* The same recurrence for any head size, decay recomputed inside the loops
 * (no per-token buffers): slow, kept for odd shapes only. */
static void cpu_wkv7_head_any(float *restrict S, float *restrict y, const float *restrict r,
                              const float *restrict w_raw, const float *restrict k,
                              const float *restrict v, const float *restrict kk,
                              const float *restrict a, int len, int C, int N) {
    for (int t = 0; t < len; t++) {
        const size_t o = (size_t)t * C;
        const float *rt = r + o, *kt = k + o, *vt = v + o, *wt = w_raw + o, *kkt = kk + o,
                    *at = a + o;
        for (int i = 0; i < N; i++) {
            float *restrict Si = S + (size_t)i * N;
            float sa = 0.0f;
#pragma omp simd reduction(+ : sa)
            for (int j = 0; j < N; j++) sa -= Si[j] * kkt[j];
            const float vi = vt[i];
            float yi = 0.0f;
#pragma omp simd reduction(+ : yi)
            for (int j = 0; j < N; j++) {
                float s = Si[j] * cpu_decayf(wt[j]) + sa * (kkt[j] * at[j]) + vi * kt[j];
                Si[j] = s;
                yi += s * rt[j];
            }
            y[o + i] = yi;
        }
    }
}

void cpu_wkv7(rp_backend *be, float *y, const float *r, const float *w_raw,
              const float *k, const float *v, const float *kk, const float *a,
              float *state_base, size_t state_stride, const rp_batch *batch, int C,
              int N) {
    const int H = C / N;
    const long units = (long)batch->n_seq * H;
    const int vector_path = N % 8 == 0 && N <= CPU_WKV_MAX_N;
    /* ~0.75 us per token and head of 64 (one core): one decode token of 8
     * heads or more is already worth forking the team for. */
    int nt = (size_t)batch->n_rows * C * N < RP_CPU_PARALLEL_MIN_WORK || units < 2
                 ? 1
                 : cpu_threads(be);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (long u = 0; u < units; u++) {
        const int s = (int)(u / H), h = (int)(u % H);
        const size_t o = (size_t)batch->row_begin[s] * C + (size_t)h * N;
        float *S = state_base + (size_t)batch->slot[s] * state_stride + (size_t)h * N * N;
        if (vector_path && batch->seq_len[s] >= CPU_WKV_KEYMAJOR_MIN_LEN)
            cpu_wkv7_head_keymajor(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                                   batch->seq_len[s], C, N);
        else if (vector_path)
            cpu_wkv7_head_v8(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                             batch->seq_len[s], C, N);
        else
            cpu_wkv7_head_any(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                              batch->seq_len[s], C, N);
    }
}
