/* Position-wise forward ops of the CPU backend (semantics in backend.h):
 * embedding, layernorm, groupnorm, lerp, bias_act, value_residual,
 * key_prepare, bonus_gate, token_shift, and add (gradient accumulation).
 * OpenMP over rows, inner loops along channels written to vectorise under
 * -O3 -march=native. The CUDA twin is cuda/cuda_elementwise.cu. */
#include "config.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include "cpu/cpu_internal.h"

/* Rows handed to a thread at a time by token_shift: big enough to amortise
 * the bookkeeping, small enough to split one long sequence across threads. */
#define CPU_SHIFT_CHUNK_ROWS 32

/* ---- position-wise ---- */

/* x [R,C] = emb[tokens[r]] */
static void cpu_embedding(rp_backend *be, float *x, const float *emb, const int32_t *tokens,
                          int R, int C) {
#pragma omp parallel for num_threads(cpu_team(be, (size_t)R * C)) schedule(static)
    for (int r = 0; r < R; r++)
        memcpy(x + (size_t)r * C, emb + (size_t)tokens[r] * C, (size_t)C * sizeof(float));
}

/* Mean and 1/sqrt(biased variance + eps) of n floats. Two passes with double
 * accumulators: exact enough to agree with a double reference to ~1e-7 even
 * when |mean| >> std, and cheap next to the GEMMs around every norm. */
static inline void cpu_moments(const float *restrict x, int n, float eps, float *mean_out,
                               float *rstd_out) {
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < n; c++) sum += x[c];
    const float mean = (float)(sum / n);
    double sq = 0.0;
#pragma omp simd reduction(+ : sq)
    for (int c = 0; c < n; c++) {
        double d = (double)(x[c] - mean);
        sq += d * d;
    }
    *mean_out = mean;
    *rstd_out = (float)(1.0 / sqrt(sq / n + (double)eps));
}

/* y [R,C] = (x - mean) * rstd * weight + bias; mean/rstd [R] */
static void cpu_layernorm(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                          const float *weight, const float *bias, int R, int C, float eps) {
#pragma omp parallel for num_threads(cpu_team(be, (size_t)R * C)) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *restrict xr = x + (size_t)r * C;
        float *restrict yr = y + (size_t)r * C;
        float m, s;
        cpu_moments(xr, C, eps, &m, &s);
#pragma omp simd
        for (int c = 0; c < C; c++) yr[c] = (xr[c] - m) * s * weight[c] + bias[c];
        if (mean) mean[r] = m;
        if (rstd) rstd[r] = s;
    }
}

/* y [R,C] = GroupNorm(x; H = C/N groups) * weight + bias; mean/rstd [R,H] */
static void cpu_groupnorm(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                          const float *weight, const float *bias, int R, int C, int N,
                          float eps) {
    const int H = C / N;
#pragma omp parallel for num_threads(cpu_team(be, (size_t)R * C)) schedule(static)
    for (int r = 0; r < R; r++) {
        for (int h = 0; h < H; h++) {
            const size_t o = (size_t)r * C + (size_t)h * N;
            const float *restrict xh = x + o, *restrict wh = weight + (size_t)h * N,
                                  *restrict bh = bias + (size_t)h * N;
            float *restrict yh = y + o;
            float m, s;
            cpu_moments(xh, N, eps, &m, &s);
#pragma omp simd
            for (int j = 0; j < N; j++) yh[j] = (xh[j] - m) * s * wh[j] + bh[j];
            if (mean) mean[(size_t)r * H + h] = m;
            if (rstd) rstd[(size_t)r * H + h] = s;
        }
    }
}

/* y [R,C] = x + (prev - x) * mu, mu [C] */
static void cpu_lerp(rp_backend *be, float *y, const float *x, const float *prev,
                     const float *mu, int R, int C) {
#pragma omp parallel for num_threads(cpu_team(be, (size_t)R * C)) schedule(static)
    for (int r = 0; r < R; r++) {
        const size_t o = (size_t)r * C;
        const float *restrict xr = x + o, *restrict pr = prev + o;
        float *restrict yr = y + o;
#pragma omp simd
        for (int c = 0; c < C; c++) yr[c] = xr[c] + (pr[c] - xr[c]) * mu[c];
    }
}

/* y [R,C] = act(y + bias). One loop per activation so each vectorises alone;
 * a NULL bias reads a zero instead. */
#define CPU_BIAS_ACT_LOOP(EXPR)                                                          \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                         \
    for (int r = 0; r < R; r++) {                                                        \
        float *restrict yr = y + (size_t)r * C;                                           \
        _Pragma("omp simd")                                                               \
        for (int c = 0; c < C; c++) {                                                    \
            const float t = yr[c] + (bias ? bias[c] : 0.0f);                             \
            yr[c] = (EXPR);                                                               \
        }                                                                                 \
    }

static void cpu_bias_act(rp_backend *be, float *y, const float *bias, int R, int C,
                         rp_activation act) {
    const int nt = cpu_team(be, (size_t)R * C);
    switch (act) {
    case RP_ACT_NONE: CPU_BIAS_ACT_LOOP(t) break;
    case RP_ACT_TANH: CPU_BIAS_ACT_LOOP(cpu_tanhf(t)) break;
    case RP_ACT_SIGMOID: CPU_BIAS_ACT_LOOP(cpu_sigmoidf(t)) break;
    case RP_ACT_RELU_SQUARED: CPU_BIAS_ACT_LOOP(cpu_relu_squaredf(t)) break;
    }
}

/* v [R,C] = v + (v_first - v) * nu */
static void cpu_value_residual(rp_backend *be, float *v, const float *v_first,
                               const float *nu, int R, int C) {
#pragma omp parallel for num_threads(cpu_team(be, (size_t)R * C)) schedule(static)
    for (long i = 0; i < (long)R * C; i++) v[i] += (v_first[i] - v[i]) * nu[i];
}

/* kk [R,C] = normalize_per_head(k * k_k), heads of N; then
 * k *= 1 + (a - 1) * k_a. Inlined into cpu_key_prepare twice, so that the
 * usual N = 64 compiles with a constant trip count. */
static inline __attribute__((always_inline)) void
cpu_key_prepare_heads(rp_backend *be, float *kk, float *k, const float *a, const float *k_k,
                      const float *k_a, int R, int C, int N) {
    const int H = C / N;
#pragma omp parallel for num_threads(cpu_team(be, (size_t)R * C)) schedule(static)
    for (int r = 0; r < R; r++) {
        for (int h = 0; h < H; h++) {
            const size_t o = (size_t)r * C + (size_t)h * N;
            const float *restrict kkw = k_k + (size_t)h * N;
            const float *restrict kh = k + o;
            float *restrict kkh = kk + o;
            float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
            for (int j = 0; j < N; j++) {
                const float t = kh[j] * kkw[j];
                kkh[j] = t;
                sq += t * t;
            }
            /* torch F.normalize: divide by max(||x||, 1e-12), so a zero head
             * stays zero instead of becoming 0/0. */
            const float norm = sqrtf(sq);
            const float inv = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
#pragma omp simd
            for (int j = 0; j < N; j++) kkh[j] *= inv;
        }
        const size_t o = (size_t)r * C;
        float *restrict kr = k + o;
        const float *restrict ar = a + o;
#pragma omp simd
        for (int c = 0; c < C; c++) kr[c] *= 1.0f + (ar[c] - 1.0f) * k_a[c];
    }
}

static void cpu_key_prepare(rp_backend *be, float *kk, float *k, const float *a,
                            const float *k_k, const float *k_a, int R, int C, int N) {
    if (N == 64)
        cpu_key_prepare_heads(be, kk, k, a, k_k, k_a, R, C, 64);
    else
        cpu_key_prepare_heads(be, kk, k, a, k_k, k_a, R, C, N);
}

/* out [R,C] = (out + (sum_j r_j k_j r_k[h,j]) * v_h) * g, per head */
static void cpu_bonus_gate(rp_backend *be, float *out, const float *r, const float *k,
                           const float *v, const float *r_k, const float *g, int R, int C,
                           int N) {
    const int H = C / N;
#pragma omp parallel for num_threads(cpu_team(be, (size_t)R * C)) schedule(static)
    for (int row = 0; row < R; row++) {
        for (int h = 0; h < H; h++) {
            const size_t o = (size_t)row * C + (size_t)h * N;
            const float *restrict rh = r + o, *restrict kh = k + o, *restrict vh = v + o,
                                  *restrict gh = g + o, *restrict rkh = r_k + (size_t)h * N;
            float *restrict oh = out + o;
            float bonus = 0.0f;
#pragma omp simd reduction(+ : bonus)
            for (int j = 0; j < N; j++) bonus += rh[j] * kh[j] * rkh[j];
#pragma omp simd
            for (int j = 0; j < N; j++) oh[j] = (oh[j] + bonus * vh[j]) * gh[j];
        }
    }
}

/* y [n] += x [n] */
static void cpu_add(rp_backend *be, float *y, const float *x, size_t n) {
    int nt = n < RP_CPU_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
#pragma omp parallel for simd num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

/* prev [R,C]: row r = x row r-1 within a sequence, the slot's state vector for
 * the sequence's first row; then the state vector = the sequence's last row.
 * All of prev is written before any state vector changes: a sequence's first
 * row reads the state from before this call, whatever order threads run in. */
static void cpu_token_shift(rp_backend *be, float *prev, const float *x,
                            float *state_base, size_t state_stride, const rp_batch *batch, int C) {
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

/* The fused decode mix is the three ops in order (bit-identical results). */
static void cpu_ln_shift_mix(rp_backend *be, float *xa, float *prev, float *const *mix,
                             const float *const *mu, int n_mix, const float *x,
                             const float *weight, const float *bias, float eps,
                             float *state_base, size_t state_stride, const rp_batch *batch,
                             int C) {
    const int R = batch->n_rows;
    cpu_layernorm(be, xa, NULL, NULL, x, weight, bias, R, C, eps);
    cpu_token_shift(be, prev, xa, state_base, state_stride, batch, C);
    for (int i = 0; i < n_mix; i++) cpu_lerp(be, mix[i], xa, prev, mu[i], R, C);
}

/* The fused training mix is the ops in order (bit-identical results; the
 * CUDA kernel's twin). state_base NULL: prev is an input. */
static void cpu_shift_mix(rp_backend *be, float *prev, float *const *mix,
                          const float *const *mu, int n_mix, const float *x,
                          float *state_base, size_t state_stride, const rp_batch *batch,
                          int C) {
    const int R = batch->n_rows;
    if (state_base) cpu_token_shift(be, prev, x, state_base, state_stride, batch, C);
    for (int i = 0; i < n_mix; i++) cpu_lerp(be, mix[i], x, prev, mu[i], R, C);
}

void cpu_elementwise_install(rp_backend *be) {
    be->shift_mix = cpu_shift_mix;
    be->ln_shift_mix = cpu_ln_shift_mix;
    be->add = cpu_add;
    be->embedding = cpu_embedding;
    be->layernorm = cpu_layernorm;
    be->token_shift = cpu_token_shift;
    be->lerp = cpu_lerp;
    be->bias_act = cpu_bias_act;
    be->value_residual = cpu_value_residual;
    be->key_prepare = cpu_key_prepare;
    be->groupnorm = cpu_groupnorm;
    be->bonus_gate = cpu_bonus_gate;
}
