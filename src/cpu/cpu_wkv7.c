/* WKV7 on the CPU backend: the forward (wkv7) over a ragged batch, carrying
 * the [H,N,N] state of each slot between calls (a prefix and then the rest
 * equal one call over the whole sequence), and for training
 * wkv7_forward_train (a state checkpoint before every RP_WKV_CHUNK-th token)
 * and wkv7_backward, which recomputes each chunk's states from its
 * checkpoint through cpu_wkv7 itself (bit-identical to inference) and walks
 * them backwards. The CUDA twin is cuda/cuda_wkv7.cu. */
#include "config.h"

#include <omp.h>
#include <string.h>

#include "cpu/cpu_internal.h"

/* Per-token decay and kernel vectors of one head live on the stack up to
 * this head size; larger heads take the slow path that recomputes them. */
#define CPU_WKV_MAX_N 256

/* Runs of at least this many tokens take the key-major kernel (the state
 * transposed in and out: ~0.4 us per head of 64, for ~0.2 us saved per token
 * and head), shorter ones (decode) the value-major one. Same bits either way. */
#define CPU_WKV_KEYMAJOR_MIN_LEN 4

/* The key-major kernel's transposed state lives on the stack (16 KiB; ops
 * allocate nothing); bigger heads take the value-major kernel whatever the
 * run length (the same bits, only slower). */
#define CPU_WKV_KEYMAJOR_MAX_N 64

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
 * token gives bit-identical results.
 * next (or NULL): the [N,N] state this thread will most likely run after
 * this one. At decode the states are cold (the step's streamed weights
 * evicted them) and the first pass over S waited on each line (~40% of the
 * kernel's time at batch 8, perf); its rows are prefetched here, one row
 * per row of the update pass, so the next head's loads overlap this one's
 * arithmetic. Only loads are moved: the bits are the same. */
static void cpu_wkv7_head_v8(float *restrict S, float *restrict y, const float *restrict r,
                             const float *restrict w_raw, const float *restrict k,
                             const float *restrict v, const float *restrict kk,
                             const float *restrict a, int len, int C, int N,
                             const float *next) {
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
            if (next && t == len - 1)
                for (int q = 0; q < N; q += 16) __builtin_prefetch(next + (size_t)i * N + q, 1, 3);
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
    float St[CPU_WKV_KEYMAJOR_MAX_N * CPU_WKV_KEYMAJOR_MAX_N];
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

/* Rows x C x N below which the inference WKV7 runs on one thread (why: the
 * comment in cpu_wkv7). */
#define CPU_WKV_PARALLEL_MIN_WORK ((size_t)1 << 18)

/* The state of unit u (sequence u / H, head u % H), or NULL past the last:
 * with dynamic scheduling a thread's next unit is about nt further on. */
static const float *unit_state(const float *state_base, size_t state_stride,
                               const rp_batch *batch, int H, int N, long u, long units) {
    if (u >= units) return NULL;
    const int s = (int)(u / H), h = (int)(u % H);
    return state_base + (size_t)batch->slot[s] * state_stride + (size_t)h * N * N;
}

static void cpu_wkv7(rp_backend *be, float *y, const float *r, const float *w_raw,
              const float *k, const float *v, const float *kk, const float *a,
              float *state_base, size_t state_stride, const rp_batch *batch, int C,
              int N) {
    const int H = C / N;
    const long units = (long)batch->n_seq * H;
    const int vector_path = N % 8 == 0 && N <= CPU_WKV_MAX_N;
    /* ~0.75 us per token and head of 64 (one core). At decode the team is
     * asleep when the region starts (the position-wise ops before it outlast
     * the bounded spin, cpu_wait.h), and waking it took a median 54 us on
     * the loaded 2-CPU VM (docs/perf/cpu.md, "Fork/join at decode"): more
     * than one token of the 0.1B shape (12 heads, ~9 us) takes alone. From 2^18 (5+ tokens of
     * 768 channels, ~40 us) the split pays. Units are independent, so the
     * bits do not depend on it. */
    int nt = (size_t)batch->n_rows * C * N < CPU_WKV_PARALLEL_MIN_WORK || units < 2
                 ? 1
                 : cpu_threads(be);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (long u = 0; u < units; u++) {
        const int s = (int)(u / H), h = (int)(u % H);
        const size_t o = (size_t)batch->row_begin[s] * C + (size_t)h * N;
        float *S = state_base + (size_t)batch->slot[s] * state_stride + (size_t)h * N * N;
        if (vector_path && N <= CPU_WKV_KEYMAJOR_MAX_N &&
            batch->seq_len[s] >= CPU_WKV_KEYMAJOR_MIN_LEN)
            cpu_wkv7_head_keymajor(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                                   batch->seq_len[s], C, N);
        else if (vector_path)
            cpu_wkv7_head_v8(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                             batch->seq_len[s], C, N, unit_state(state_base, state_stride,
                                                                 batch, H, N, u + nt, units));
        else
            cpu_wkv7_head_any(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                              batch->seq_len[s], C, N);
    }
}

/* ---- training: forward with checkpoints, backward ---- */

#define WKV_SCALE 0.6065306597126334f /* e^-0.5: d = exp(-e^-0.5 sigmoid(w_raw)) */

/* Per (sequence, head) with state S [N,N] (row i = value, column j = key):
 *   d = exp(-e^-0.5 sigmoid(w_raw)), a = -kk, b = kk * iclr,
 *   sa_i = sum_j S[i,j] a_j;  S'[i,j] = S[i,j] d_j + sa_i b_j + v_i k_j;
 *   y_i = sum_j S'[i,j] r_j. */

/* Team for n_rows tokens of C channels: one token of one head is ~N^2
 * multiply-adds, so a few rows of a few heads are worth the fork. */
static int wkv_team(rp_backend *be, const rp_batch *batch, int C) {
    return (size_t)batch->n_rows * C * 8 < RP_CPU_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
}

/* first [n_seq + 1]: the first checkpoint block of every sequence
 * (rp_wkv_checkpoint_offset is a prefix sum; this is it for all s at once). */
static void checkpoint_blocks(size_t *first, const rp_batch *batch) {
    first[0] = 0;
    for (int s = 0; s < batch->n_seq; s++)
        first[s + 1] = first[s] + (size_t)(batch->seq_len[s] + RP_WKV_CHUNK - 1) / RP_WKV_CHUNK;
}

/* y, state [R,C] -> y [R,C], state; checkpoints [blocks, H, N, N].
 * In rounds of one chunk: copy the state of every sequence still running
 * into its checkpoint, then cpu_wkv7 over the next <= RP_WKV_CHUNK tokens
 * of each (a sequence fed in pieces gives the same bits as in one call). */
static void cpu_wkv7_forward_train(rp_backend *be, float *y, const float *r, const float *w_raw,
                                   const float *k, const float *v, const float *kk,
                                   const float *a, float *state_base, size_t state_stride,
                                   float *checkpoints, const rp_batch *batch, int C, int N) {
    const int n_seq = batch->n_seq, H = C / N;
    const size_t NN = (size_t)N * N, HNN = (size_t)H * NN;
    size_t *first = cpu_scratch(be, cpu_wkv7_train_scratch(n_seq), "wkv7_forward_train");
    if (!first) return;
    checkpoint_blocks(first, batch);
    int *part = (int *)(first + n_seq + 1); /* len, begin, slot of each sequence */
    int *len = part, *begin = part + n_seq, *slot = part + 2 * n_seq;
    int max_len = 0;
    for (int s = 0; s < n_seq; s++)
        if (batch->seq_len[s] > max_len) max_len = batch->seq_len[s];
    const int nt = wkv_team(be, batch, C);
    for (int t0 = 0; t0 < max_len; t0 += RP_WKV_CHUNK) {
        int n = 0, rows = 0;
        for (int s = 0; s < n_seq; s++) {
            const int rest = batch->seq_len[s] - t0;
            if (rest <= 0) continue;
            len[n] = rest < RP_WKV_CHUNK ? rest : RP_WKV_CHUNK;
            begin[n] = batch->row_begin[s] + t0;
            slot[n] = batch->slot[s];
            rows += len[n];
            n++;
        }
        /* checkpoint copies, one head per iteration */
#pragma omp parallel for collapse(2) num_threads(nt) if (nt > 1) schedule(static)
        for (int s = 0; s < n_seq; s++)
            for (int h = 0; h < H; h++) {
                if (batch->seq_len[s] <= t0) continue;
                memcpy(checkpoints + (first[s] + (size_t)(t0 / RP_WKV_CHUNK)) * HNN + h * NN,
                       state_base + (size_t)batch->slot[s] * state_stride + h * NN,
                       NN * sizeof(float));
            }
        const rp_batch round = {n, rows, len, begin, slot};
        cpu_wkv7(be, y, r, w_raw, k, v, kk, a, state_base, state_stride, &round, C, N);
    }
}

/* One token of one head: S (in place) <- the token's update, through cpu_wkv7
 * on a one-token, one-head batch (for a single token the row stride C does
 * not matter, so C = N selects the head). y_scratch [N] gets y. */
static void wkv_step(rp_backend *be, float *S, float *y_scratch, const float *r,
                     const float *w_raw, const float *k, const float *v, const float *kk,
                     const float *a, int N) {
    static const int one = 1, zero = 0;
    const rp_batch token = {1, 1, &one, &zero, &zero};
    cpu_wkv7(be, y_scratch, r, w_raw, k, v, kk, a, S, 0, &token, N, N);
}

/* Per-thread scratch: the states of one chunk and the per-token vectors. */
typedef struct {
    float *states;                   /* [RP_WKV_CHUNK + 1, N, N]: S before token t0 + u */
    float *decay, *kern_a, *kern_b;  /* [N] each: d, a = -kk, b = kk iclr */
    float *sa, *dsa;                 /* [N] each: per row of S */
    float *acc_r, *acc_k, *acc_b, *acc_d, *acc_a; /* [N] each: column sums */
    float *y;                        /* [N]: the recomputed output, unused */
} wkv_scratch;

enum { WKV_SCRATCH_VECTORS = 11 };

/* Carves the scratch out of one thread's block of
 * cpu_wkv7_backward_thread_scratch(N) bytes. */
static void wkv_scratch_carve(wkv_scratch *w, float *block, int N) {
    w->states = block;
    float *vec = block + (RP_WKV_CHUNK + 1) * (size_t)N * N;
    float **slots[WKV_SCRATCH_VECTORS] = {&w->decay, &w->kern_a, &w->kern_b, &w->sa,
                                          &w->dsa,   &w->acc_r,  &w->acc_k,  &w->acc_b,
                                          &w->acc_d, &w->acc_a,  &w->y};
    for (int i = 0; i < WKV_SCRATCH_VECTORS; i++) *slots[i] = vec + (size_t)i * N;
}

/* Backward of one token of one head. dS [N,N] holds d(state after the token)
 * from the later tokens and the final-state gradient; on return it holds
 * d(state before). Sp / St: the states before / after the token. Inputs and
 * gradients point at the head's channels of the token's row.
 *
 * With G = dS + dy r^T (the full gradient of S_t):
 *   dr_j = sum_i St[i,j] dy_i          dv_i = sum_j G[i,j] k_j
 *   dk_j = sum_i G[i,j] v_i            dsa_i = sum_j G[i,j] b_j
 *   db_j = sum_i G[i,j] sa_i           dd_j = sum_i G[i,j] Sp[i,j]
 *   da_j (kernel a) = sum_i dsa_i Sp[i,j]
 *   d(S before)[i,j] = G[i,j] d_j + dsa_i a_j
 * then a = -kk, b = kk * iclr and d = d(w_raw) give dkk, diclr, dw_raw.
 * Two passes: along rows for the row sums (sa, dv, dsa), then down strips
 * of 8 columns with the five column sums in registers (as N-vectors they
 * would be loaded and stored once per row). */
static void wkv_token_backward(wkv_scratch *w, float *restrict dS, const float *restrict Sp,
                               const float *restrict St, const float *restrict dy,
                               const float *restrict r, const float *restrict w_raw,
                               const float *restrict k, const float *restrict v,
                               const float *restrict kk, const float *restrict iclr,
                               float *restrict dr, float *restrict dw_raw, float *restrict dk,
                               float *restrict dv, float *restrict dkk, float *restrict diclr,
                               int N, int accumulate) {
    float *restrict decay = w->decay, *restrict ka = w->kern_a, *restrict kb = w->kern_b;
    float *restrict sa = w->sa, *restrict dsa = w->dsa;
    float *restrict acc_r = w->acc_r, *restrict acc_k = w->acc_k, *restrict acc_b = w->acc_b,
                    *restrict acc_d = w->acc_d, *restrict acc_a = w->acc_a;
#pragma omp simd
    for (int j = 0; j < N; j++) {
        decay[j] = cpu_decayf(w_raw[j]);
        ka[j] = -kk[j];
        kb[j] = kk[j] * iclr[j];
    }
    for (int i = 0; i < N; i++) {
        float *restrict G = dS + (size_t)i * N;
        const float *restrict Spi = Sp + (size_t)i * N;
        const float dy_i = dy[i];
        float sa_i = 0.0f, dv_i = 0.0f, dsa_i = 0.0f;
#pragma omp simd reduction(+ : sa_i, dv_i, dsa_i)
        for (int j = 0; j < N; j++) {
            const float g = G[j] + dy_i * r[j];
            G[j] = g;
            sa_i += Spi[j] * ka[j];
            dv_i += g * k[j];
            dsa_i += g * kb[j];
        }
        sa[i] = sa_i;
        dsa[i] = dsa_i;
        dv[i] = accumulate ? dv[i] + dv_i : dv_i;
    }
    const int strips = N / 8 * 8;
    for (int j0 = 0; j0 < strips; j0 += 8) {
        cpu_v8 ar = {0}, ak = {0}, ab = {0}, ad = {0}, aa = {0};
        const cpu_v8 dec = CPU_V8_LOAD(decay + j0), kav = CPU_V8_LOAD(ka + j0);
        for (int i = 0; i < N; i++) {
            const size_t q = (size_t)i * N + j0;
            const cpu_v8 g = CPU_V8_LOAD(dS + q), sp = CPU_V8_LOAD(Sp + q);
            ar += dy[i] * CPU_V8_LOAD(St + q);
            ak += g * v[i];
            ab += g * sa[i];
            ad += g * sp;
            aa += dsa[i] * sp;
            CPU_V8_STORE(dS + q, g * dec + dsa[i] * kav);
        }
        CPU_V8_STORE(acc_r + j0, ar);
        CPU_V8_STORE(acc_k + j0, ak);
        CPU_V8_STORE(acc_b + j0, ab);
        CPU_V8_STORE(acc_d + j0, ad);
        CPU_V8_STORE(acc_a + j0, aa);
    }
    for (int j = strips; j < N; j++) { /* heads of a size not a multiple of 8 */
        float ar = 0.0f, ak = 0.0f, ab = 0.0f, ad = 0.0f, aa = 0.0f;
        for (int i = 0; i < N; i++) {
            const size_t q = (size_t)i * N + j;
            const float g = dS[q];
            ar += dy[i] * St[q];
            ak += g * v[i];
            ab += g * sa[i];
            ad += g * Sp[q];
            aa += dsa[i] * Sp[q];
            dS[q] = g * decay[j] + dsa[i] * ka[j];
        }
        acc_r[j] = ar;
        acc_k[j] = ak;
        acc_b[j] = ab;
        acc_d[j] = ad;
        acc_a[j] = aa;
    }
#pragma omp simd
    for (int j = 0; j < N; j++) {
        const float sig = cpu_sigmoidf(w_raw[j]);
        dr[j] = accumulate ? dr[j] + acc_r[j] : acc_r[j];
        dk[j] = accumulate ? dk[j] + acc_k[j] : acc_k[j];
        /* dd/dw_raw = d (-e^-0.5) sig (1 - sig) */
        dw_raw[j] = acc_d[j] * decay[j] * (-WKV_SCALE) * sig * (1.0f - sig);
        /* a = -kk and b = kk iclr both depend on kk */
        dkk[j] = acc_b[j] * iclr[j] - acc_a[j];
        diclr[j] = acc_b[j] * kk[j];
    }
}

/* Backward of wkv7_forward_train: threads own whole (sequence, head) units,
 * so every result has one summation order whatever the thread count. beta 1
 * adds dr, dk and dv onto the buffers (one rounding, as add would), 0
 * overwrites them. */
static void cpu_wkv7_backward_beta(rp_backend *be, float *dr, float *dw_raw, float *dk,
                                   float *dv, float *dkk, float *da, float *dstate_base,
                                   size_t state_stride, const float *dy, const float *r,
                                   const float *w_raw, const float *k, const float *v,
                                   const float *kk, const float *a, const float *checkpoints,
                                   const rp_batch *batch, int C, int N, float beta) {
    const int accumulate = beta != 0.0f;
    const int H = C / N;
    const size_t NN = (size_t)N * N, HNN = (size_t)H * NN;
    const long units = (long)batch->n_seq * H;
    size_t *first = cpu_scratch(be, ((size_t)batch->n_seq + 1) * sizeof *first,
                                "wkv7_backward");
    char *per_thread = cpu_thread_scratch(be, cpu_wkv7_backward_thread_scratch(N),
                                          "wkv7_backward");
    if (!first || !per_thread) return;
    checkpoint_blocks(first, batch);
    const size_t stride = ((rp_cpu_impl *)be->impl)->thread_stride;
    int nt = wkv_team(be, batch, C);
    if (units < nt) nt = units > 0 ? (int)units : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        wkv_scratch w; /* ~280 KB per thread at N = 64 */
        wkv_scratch_carve(&w, (float *)(per_thread + (size_t)omp_get_thread_num() * stride), N);
#pragma omp for schedule(dynamic, 1)
        for (long unit = 0; unit < units; unit++) {
            const int s = (int)(unit / H), h = (int)(unit % H), len = batch->seq_len[s];
            float *dS = dstate_base + (size_t)batch->slot[s] * state_stride + (size_t)h * NN;
            const float *ckpt = checkpoints + first[s] * HNN + (size_t)h * NN;
            for (int c = (len - 1) / RP_WKV_CHUNK; c >= 0; c--) {
                const int t0 = c * RP_WKV_CHUNK;
                const int t1 = t0 + RP_WKV_CHUNK < len ? t0 + RP_WKV_CHUNK : len;
                memcpy(w.states, ckpt + (size_t)c * HNN, NN * sizeof(float));
                for (int t = t0; t < t1; t++) {
                    const size_t o = (size_t)(batch->row_begin[s] + t) * C + (size_t)h * N;
                    float *next = w.states + (size_t)(t - t0 + 1) * NN;
                    memcpy(next, next - NN, NN * sizeof(float));
                    wkv_step(be, next, w.y, r + o, w_raw + o, k + o, v + o, kk + o, a + o, N);
                }
                for (int t = t1 - 1; t >= t0; t--) {
                    const size_t o = (size_t)(batch->row_begin[s] + t) * C + (size_t)h * N;
                    const float *Sp = w.states + (size_t)(t - t0) * NN;
                    wkv_token_backward(&w, dS, Sp, Sp + NN, dy + o, r + o, w_raw + o, k + o,
                                       v + o, kk + o, a + o, dr + o, dw_raw + o, dk + o, dv + o,
                                       dkk + o, da + o, N, accumulate);
                }
            }
        }
    }
}

static void cpu_wkv7_backward(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                              float *dkk, float *da, float *dstate_base, size_t state_stride,
                              const float *dy, const float *r, const float *w_raw, const float *k,
                              const float *v, const float *kk, const float *a,
                              const float *checkpoints, const rp_batch *batch, int C, int N) {
    cpu_wkv7_backward_beta(be, dr, dw_raw, dk, dv, dkk, da, dstate_base, state_stride, dy, r,
                           w_raw, k, v, kk, a, checkpoints, batch, C, N, 0.0f);
}

void cpu_wkv7_install(rp_backend *be) {
    be->wkv7 = cpu_wkv7;
    be->wkv7_forward_train = cpu_wkv7_forward_train;
    be->wkv7_backward = cpu_wkv7_backward;
    be->wkv7_backward_beta = cpu_wkv7_backward_beta;
}
