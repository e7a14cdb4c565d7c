/* The two ops of the CPU backend that walk a ragged batch in token order and
 * carry state between calls: token_shift (the x_prev vectors) and wkv7 (the
 * [H,N,N] WKV state). Sequence s owns rows row_begin[s] .. + seq_len[s] and
 * the state slot slot[s]; calls over a prefix and then the rest equal one
 * call over the whole sequence. Called through the rp_backend vtable. */

/* Multiply-adds in this file fuse into FMAs (AM_CFLAGS' -std=c11 turns
 * contraction off): the WKV7 update is bound by floating-point throughput,
 * five operations per state element and token unfused, three fused. Before
 * every include, so the inline helpers of cpu_backend.h are built with the
 * same options and still inline. */
#pragma GCC optimize("fp-contract=fast")

#include "config.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_backend.h"

/* Rows handed to a thread at a time by token_shift: big enough to amortise
 * the bookkeeping, small enough to split one long sequence across threads. */
#define CPU_SHIFT_CHUNK_ROWS 32

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

/* Rows 0..7 of an 8 x 8 block (row stride `in`) written as its columns
 * (row stride `out`): the usual three rounds of two-input shuffles (pairs,
 * quads, halves), 24 in all, instead of 64 strided single-float stores. */
static inline __attribute__((always_inline)) void
cpu_transpose_8x8(float *restrict dst, const float *restrict src, size_t out, size_t in) {
    typedef int cpu_i8 __attribute__((vector_size(32)));
    const cpu_i8 lo_pairs = {0, 8, 1, 9, 4, 12, 5, 13}, hi_pairs = {2, 10, 3, 11, 6, 14, 7, 15};
    const cpu_i8 lo_quads = {0, 1, 8, 9, 4, 5, 12, 13}, hi_quads = {2, 3, 10, 11, 6, 7, 14, 15};
    const cpu_i8 lo_halves = {0, 1, 2, 3, 8, 9, 10, 11}, hi_halves = {4, 5, 6, 7, 12, 13, 14, 15};
    cpu_v8 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = CPU_V8_LOAD(src + i * in);
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(r[i], r[i + 1], lo_pairs);
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi_pairs);
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            u[i + h] = __builtin_shuffle(t[i + h], t[i + h + 2], lo_quads);
            u[i + h + 2] = __builtin_shuffle(t[i + h], t[i + h + 2], hi_quads);
        }
    /* u[0..3] hold columns 0, 1, 2, 3 of rows 0-3 (lanes 0-3) and columns
     * 4-7 (lanes 4-7); u[4..7] the same for rows 4-7. */
    const int col_of[4] = {0, 2, 1, 3};
    for (int q = 0; q < 4; q++) {
        CPU_V8_STORE(dst + col_of[q] * out, __builtin_shuffle(u[q], u[q + 4], lo_halves));
        CPU_V8_STORE(dst + (col_of[q] + 4) * out, __builtin_shuffle(u[q], u[q + 4], hi_halves));
    }
}

/* dst = src transposed, N x N (rows N floats apart in both). */
void cpu_wkv_transpose(float *restrict dst, const float *restrict src, int N) {
    if (N % 8 != 0) {
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++) dst[(size_t)j * N + i] = src[(size_t)i * N + j];
        return;
    }
    for (int i0 = 0; i0 < N; i0 += 8)
        for (int j0 = 0; j0 < N; j0 += 8)
            cpu_transpose_8x8(dst + (size_t)j0 * N + i0, src + (size_t)i0 * N + j0, (size_t)N,
                              (size_t)N);
}

/* The two kernels below for a vector type VT of LANES floats (cpu_v16, and
 * cpu_v8 for heads whose size is an odd multiple of 8). Lanes run over i
 * (value channels), which never mix: the N columns are cut into groups of
 * up to four vectors, and each group is one pass down the N key rows with
 * every per-lane quantity in registers and the per-key scalars broadcast.
 * Four vectors a pass because the sums are chains of dependent FMAs (4
 * cycles each): one vector alone waits on its chain.
 *
 * first_sa: sa_i = sum_j St[j,i] a_j with a = -kk, j ascending from 0 in one
 * accumulator per lane: the one summation order of sa, used here for a
 * sequence's first token and fused into the previous token's update for
 * the others.
 *
 * update: one token, St[j,i] = St[j,i] d_j + sa_i b_j + v_i k_j, then
 * y_i = sum_j St[j,i] r_j and, when has_next, the next token's
 * sa_next_i = sum_j St[j,i] a_next_j (a_next = -kk of the next token). */
#define CPU_WKV7_KERNELS(VT, LANES, LOAD, STORE)                                                \
    static inline __attribute__((always_inline)) void cpu_wkv7_first_sa_##LANES(               \
        float *restrict sa, const float *restrict St, const float *restrict kk, int N, int nv) { \
        for (int i0 = 0; i0 < N; i0 += nv * LANES) {                                           \
            VT acc[4];                                                                         \
            for (int q = 0; q < nv; q++) acc[q] = (VT){0};                                     \
            for (int j = 0; j < N; j++) {                                                      \
                const float *row = St + (size_t)j * N + i0;                                    \
                const float a_j = -kk[j];                                                      \
                for (int q = 0; q < nv; q++) acc[q] += LOAD(row + q * LANES) * a_j;            \
            }                                                                                  \
            for (int q = 0; q < nv; q++) STORE(sa + i0 + q * LANES, acc[q]);                   \
        }                                                                                      \
    }                                                                                          \
    static inline __attribute__((always_inline)) void cpu_wkv7_update_##LANES(                 \
        float *restrict St, float *restrict y, float *restrict sa_next,                        \
        const float *restrict sa, const float *restrict v, const float *restrict decay,        \
        const float *restrict kern_b, const float *restrict k, const float *restrict r,        \
        const float *restrict kk_next, int N, int nv, int has_next) {                          \
        for (int i0 = 0; i0 < N; i0 += nv * LANES) {                                           \
            VT sa_i[4], v_i[4], y_i[4], next_i[4];                                             \
            for (int q = 0; q < nv; q++) {                                                     \
                sa_i[q] = LOAD(sa + i0 + q * LANES);                                           \
                v_i[q] = LOAD(v + i0 + q * LANES);                                             \
                y_i[q] = next_i[q] = (VT){0};                                                  \
            }                                                                                  \
            for (int j = 0; j < N; j++) {                                                      \
                float *row = St + (size_t)j * N + i0;                                          \
                const float d_j = decay[j], b_j = kern_b[j], k_j = k[j], r_j = r[j];           \
                const float a_j = has_next ? -kk_next[j] : 0.0f;                               \
                for (int q = 0; q < nv; q++) {                                                 \
                    const VT s = LOAD(row + q * LANES) * d_j + sa_i[q] * b_j + v_i[q] * k_j;   \
                    STORE(row + q * LANES, s);                                                 \
                    y_i[q] += s * r_j;                                                         \
                    if (has_next) next_i[q] += s * a_j;                                        \
                }                                                                              \
            }                                                                                  \
            for (int q = 0; q < nv; q++) {                                                     \
                STORE(y + i0 + q * LANES, y_i[q]);                                             \
                if (has_next) STORE(sa_next + i0 + q * LANES, next_i[q]);                      \
            }                                                                                  \
        }                                                                                      \
    }

CPU_WKV7_KERNELS(cpu_v16, 16, CPU_V16_LOAD, CPU_V16_STORE)
CPU_WKV7_KERNELS(cpu_v8, 8, CPU_V8_LOAD, CPU_V8_STORE)

/* Tokens in order, for one (LANES, nv) instance; nv * LANES divides N. */
#define CPU_WKV7_RUN(LANES, nv)                                                                 \
    do {                                                                                       \
        cpu_wkv7_first_sa_##LANES(sa, St, kk, N, nv);                                          \
        for (int t = 0; t < len; t++) {                                                        \
            const size_t o = (size_t)t * C;                                                    \
            cpu_wkv7_token_vectors(decay, kern_b, w_raw + o, kk + o, a + o, N);                \
            if (t + 1 < len)                                                                   \
                cpu_wkv7_update_##LANES(St, y + o, sa_next, sa, v + o, decay, kern_b, k + o,   \
                                        r + o, kk + o + C, N, nv, 1);                          \
            else                                                                               \
                cpu_wkv7_update_##LANES(St, y + o, sa_next, sa, v + o, decay, kern_b, k + o,   \
                                        r + o, NULL, N, nv, 0);                                \
            float *swap_ = sa;                                                                 \
            sa = sa_next;                                                                      \
            sa_next = swap_;                                                                   \
        }                                                                                      \
    } while (0)

/* The per-key scalars of a token: d = decay(w_raw), b = kk * a_iclr. */
static inline __attribute__((always_inline)) void
cpu_wkv7_token_vectors(float *restrict decay, float *restrict kern_b, const float *restrict w_raw,
                       const float *restrict kk, const float *restrict a, int N) {
#pragma omp simd
    for (int j = 0; j < N; j++) {
        decay[j] = cpu_decayf(w_raw[j]);
        kern_b[j] = kk[j] * a[j];
    }
}

/* One head of one sequence, tokens in order, on a key-major state
 * St [N,N] (St[j,i] = S[i,j]; see cpu_wkv_transpose) updated in place:
 *   sa_i = sum_j S[i,j] a_j,  S[i,j] = S[i,j] d_j + sa_i b_j + v_i k_j,
 *   y_i = sum_j S[i,j] r_j    with a = -kk, b = kk * a_iclr, d = decay(w_raw).
 * Key-major because both sums run over j: with i across the vector lanes
 * they are vertical multiply-adds with j broadcast, no horizontal
 * reductions (those cost ~2.7x the time in the value-major kernel this
 * replaced), and the next token's sa rides along the update pass. N a
 * multiple of 8, N <= CPU_WKV_MAX_N. The inputs point at the head's first
 * channel of the sequence's first row; rows are C floats apart. Every sum
 * has one order whatever len is: a sequence fed in pieces or token by token
 * gives bit-identical results. */
void cpu_wkv7_head_keymajor(float *restrict St, float *restrict y, const float *restrict r,
                            const float *restrict w_raw, const float *restrict k,
                            const float *restrict v, const float *restrict kk,
                            const float *restrict a, int len, int C, int N) {
    float decay[CPU_WKV_MAX_N], kern_b[CPU_WKV_MAX_N], sa_buf[2][CPU_WKV_MAX_N];
    float *sa = sa_buf[0], *sa_next = sa_buf[1];
    if (len <= 0) return;
    if (N % 64 == 0)
        CPU_WKV7_RUN(16, 4);
    else if (N % 32 == 0)
        CPU_WKV7_RUN(16, 2);
    else if (N % 16 == 0)
        CPU_WKV7_RUN(16, 1);
    else
        CPU_WKV7_RUN(8, 1);
}

/* The state in its official value-major layout: transposed into a
 * key-major copy for the run and back (~0.4 us per head of 64, what a
 * single decode token pays on top of the kernel; a 512-token prefill
 * amortises it). */
static void cpu_wkv7_head_transposed(float *restrict S, float *restrict y, const float *restrict r,
                             const float *restrict w_raw, const float *restrict k,
                             const float *restrict v, const float *restrict kk,
                             const float *restrict a, int len, int C, int N) {
    float local[64 * 64];
    float *St = N <= 64 ? local : malloc((size_t)N * N * sizeof *St);
    if (!St) abort(); /* N <= 256: at most 256 KiB */
    cpu_wkv_transpose(St, S, N);
    cpu_wkv7_head_keymajor(St, y, r, w_raw, k, v, kk, a, len, C, N);
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
    const int vector_path = cpu_wkv7_keymajor_ok(N);
    /* 0.5-1.3 us per token and head of 64 (one core, long or one-token
     * runs): one decode token of 8 heads or more is already worth forking
     * the team for. */
    int nt = (size_t)batch->n_rows * C * N < RP_CPU_PARALLEL_MIN_WORK || units < 2
                 ? 1
                 : cpu_threads(be);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (long u = 0; u < units; u++) {
        const int s = (int)(u / H), h = (int)(u % H);
        const size_t o = (size_t)batch->row_begin[s] * C + (size_t)h * N;
        float *S = state_base + (size_t)batch->slot[s] * state_stride + (size_t)h * N * N;
        if (vector_path)
            cpu_wkv7_head_transposed(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                             batch->seq_len[s], C, N);
        else
            cpu_wkv7_head_any(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                              batch->seq_len[s], C, N);
    }
}
