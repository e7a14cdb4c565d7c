/* The CPU backend (fp32, the reference twin of cuda/): rp_cpu_backend_create
 * fills the rp_backend vtable; this file holds the memory ops and the
 * position-wise ops (OpenMP over rows, inner loops along channels written to
 * vectorise under -O3 -march=native). GEMMs are in cpu_matmul.c, the ops that
 * walk sequences in token order in cpu_recurrence.c. */
#include "config.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_OPENBLAS_SET_NUM_THREADS
#include <cblas.h>
#endif

#include "cpu/cpu_backend.h"
#include "cpu/cpu_wait.h"

#define CPU_ALIGN_BYTES 64

/* Team size for an op over `elements` values. */
static int cpu_team(const rp_backend *be, size_t elements) {
    return elements < RP_CPU_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
}

/* ---- memory ---- */

static void *cpu_alloc(rp_backend *be, size_t bytes) {
    (void)be;
    /* aligned_alloc wants a multiple of the alignment; 0 bytes still gets a
     * unique pointer so that callers can free it like any other. */
    size_t rounded = (bytes + CPU_ALIGN_BYTES - 1) / CPU_ALIGN_BYTES * CPU_ALIGN_BYTES;
    if (rounded < bytes) return NULL; /* overflow */
    if (rounded == 0) rounded = CPU_ALIGN_BYTES;
    void *p = aligned_alloc(CPU_ALIGN_BYTES, rounded);
    if (p) memset(p, 0, rounded);
    return p;
}

static void cpu_free(rp_backend *be, void *ptr) {
    (void)be;
    free(ptr);
}

static void cpu_copy(rp_backend *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memmove(dst, src, bytes);
}

static void cpu_fill_zero(rp_backend *be, void *dst, size_t bytes) {
    (void)be;
    if (bytes) memset(dst, 0, bytes);
}

static void cpu_synchronize(rp_backend *be) { (void)be; }

static rp_status cpu_status(rp_backend *be, rp_error *err) {
    (void)be;
    (void)err;
    return RP_OK;  /* CPU ops cannot fail once their buffers exist */
}

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
    case RP_ACT_RELU_SQUARED: CPU_BIAS_ACT_LOOP(t > 0.0f ? t * t : 0.0f) break;
    }
}

/* v [R,C] = v + (v_first - v) * nu */
static void cpu_value_residual(rp_backend *be, float *v, const float *v_first,
                               const float *nu, int R, int C) {
#pragma omp parallel for num_threads(cpu_team(be, (size_t)R * C)) schedule(static)
    for (long i = 0; i < (long)R * C; i++) v[i] += (v_first[i] - v[i]) * nu[i];
}

/* kk [R,C] = normalize_per_head(k * k_k); then k *= 1 + (a - 1) * k_a */
static void cpu_key_prepare(rp_backend *be, float *kk, float *k, const float *a,
                            const float *k_k, const float *k_a, int R, int C) {
    const int N = 64; /* RWKV-7 head size: the per-head norm groups */
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

/* ---- lifetime ---- */

rp_backend *rp_cpu_backend_create(int n_threads, rp_error *err) {
    rp_backend *be = rp_calloc(1, sizeof *be, "CPU backend", err);
    if (!be) return NULL;
    rp_cpu_impl *impl = rp_calloc(1, sizeof *impl, "CPU backend context", err);
    if (!impl) {
        free(be);
        return NULL;
    }
    impl->n_threads = n_threads > 0 ? n_threads : omp_get_max_threads();
#ifdef HAVE_OPENBLAS_SET_NUM_THREADS
    /* The backend runs one single-threaded BLAS call per OpenMP thread. */
    openblas_set_num_threads(1);
#endif
    /* Links cpu_wait.o, whose .preinit_array entry bounds the team's spin,
     * into every program that uses this backend. */
    (void)rp_cpu_wait_policy();
    be->name = "cpu";
    be->impl = impl;
    be->alloc = cpu_alloc;
    be->free = cpu_free;
    be->copy_to_device = cpu_copy;
    be->copy_to_host = cpu_copy;
    be->copy = cpu_copy;
    be->fill_zero = cpu_fill_zero;
    be->synchronize = cpu_synchronize;
    be->matmul_linear = cpu_matmul_linear;
    be->matmul_lora = cpu_matmul_lora;
    be->embedding = cpu_embedding;
    be->layernorm = cpu_layernorm;
    be->token_shift = cpu_token_shift;
    be->lerp = cpu_lerp;
    be->bias_act = cpu_bias_act;
    be->value_residual = cpu_value_residual;
    be->key_prepare = cpu_key_prepare;
    be->groupnorm = cpu_groupnorm;
    be->bonus_gate = cpu_bonus_gate;
    be->wkv7 = cpu_wkv7;
    be->add = cpu_add;
    be->status = cpu_status;
    be->register_weights = NULL;
    be->destroy = rp_cpu_backend_destroy;
    be->is_host_memory = 1;
    cpu_backward_install(be);
    return be;
}

void rp_cpu_backend_destroy(rp_backend *be) {
    if (!be) return;
    free(be->impl);
    free(be);
}
