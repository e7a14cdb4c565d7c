/* The two ops of the CPU backend that walk a ragged batch in token order and
 * carry state between calls: token_shift (the x_prev vectors) and wkv7 (the
 * [H,N,N] WKV state). Sequence s owns rows row_begin[s] .. + seq_len[s] and
 * the state slot slot[s]; calls over a prefix and then the rest equal one
 * call over the whole sequence. Called through the rp_backend vtable. */
#include "config.h"

#include <omp.h>
#include <string.h>

#include "cpu/cpu_backend.h"

/* Rows handed to a thread at a time by token_shift: big enough to amortise
 * the bookkeeping, small enough to split one long sequence across threads. */
#define CPU_SHIFT_CHUNK_ROWS 32

/* Per-token decay and kernel vectors of one head live on the stack up to
 * this head size; larger heads take the slow path that recomputes them. */
#define CPU_WKV_MAX_N 256

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
        const float *rt = r + o, *kt = k + o, *vt = v + o, *wt = w_raw + o, *kkt = kk + o,
                    *at = a + o;
#pragma omp simd
        for (int j = 0; j < N; j++) {
            decay[j] = cpu_decayf(wt[j]);
            kern_a[j] = -kkt[j];
            kern_b[j] = kkt[j] * at[j];
        }
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
        if (vector_path)
            cpu_wkv7_head_v8(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                             batch->seq_len[s], C, N);
        else
            cpu_wkv7_head_any(S, y + o, r + o, w_raw + o, k + o, v + o, kk + o, a + o,
                              batch->seq_len[s], C, N);
    }
}
