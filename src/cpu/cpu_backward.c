/* Backward (training) ops of the CPU backend, installed into the vtable by
 * cpu_backward_install; semantics in backend.h. Each op's forward lives in
 * cpu_backend.c, cpu_matmul.c or cpu_recurrence.c. Parameter gradients reduce
 * over rows in row order inside one thread per channel range (or through
 * BLAS calls that never split the reduction), so they do not depend on the
 * thread count. */
#include "config.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "cpu/cpu_backend.h"

#define WKV_SCALE 0.6065306597126334f /* e^-0.5: d = exp(-e^-0.5 sigmoid(w_raw)) */
#define KK_EPS 1e-12f

static int team(rp_backend *be, size_t work) {
    return work < RP_CPU_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
}

/* [begin, end) of part `part` of `parts` over total, in multiples of 16. */
static void slice16(int total, int part, int parts, int *begin, int *end) {
    int chunk = (total + parts - 1) / parts;
    chunk = (chunk + 15) / 16 * 16;
    long b = (long)chunk * part, e = b + chunk;
    *begin = b < total ? (int)b : total;
    *end = e < total ? (int)e : total;
}

/* ---- dense ---- */

/* y = x W^T, W [N,K]: dx [M,K] += dy W; dw [N,K] += dy^T x. Threads split
 * dx's columns and dw's rows; the M reduction stays inside one sgemm. */
static void cpu_matmul_linear_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                       const float *x, const float *w, int M, int N, int K) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    int nt = team(be, (size_t)M * N * K);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int parts = omp_get_num_threads(), part = omp_get_thread_num(), b, e;
        if (dx) {
            slice16(K, part, parts, &b, &e);
            if (e > b)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, e - b, N, 1.0f, dy, N,
                            w + b, K, 1.0f, dx + b, K);
        }
        slice16(N, part, parts, &b, &e);
        if (e > b)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, e - b, K, M, 1.0f, dy + b, N, x,
                        K, 1.0f, dw + (size_t)b * K, K);
    }
}

/* y = x W, W [K,N]: dx [M,K] += dy W^T; dw [K,N] += x^T dy. */
static void cpu_matmul_lora_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                     const float *x, const float *w, int M, int N, int K) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    int nt = team(be, (size_t)M * N * K);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int parts = omp_get_num_threads(), part = omp_get_thread_num(), b, e;
        if (dx) {
            slice16(K, part, parts, &b, &e);
            if (e > b)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, e - b, N, 1.0f, dy, N,
                            w + (size_t)b * N, N, 1.0f, dx + b, K);
        }
        slice16(K, part, parts, &b, &e);
        if (e > b)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, e - b, N, M, 1.0f, x + b, K, dy,
                        N, 1.0f, dw + (size_t)b * N, N);
    }
}

/* ---- position-wise ---- */

/* demb [V,C]: row tokens[r] += dx row r, rows in order (threads own channels). */
static void cpu_embedding_backward(rp_backend *be, float *demb, const float *dx,
                                   const int32_t *tokens, int R, int C) {
    int nt = team(be, (size_t)R * C);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int b, e;
        slice16(C, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        for (int r = 0; r < R; r++) {
            float *dst = demb + (size_t)tokens[r] * C;
            const float *src = dx + (size_t)r * C;
            for (int c = b; c < e; c++) dst[c] += src[c];
        }
    }
}

/* Sum over rows of a [R,C] product into out [C] (+=), in row order. */
static void column_sums(rp_backend *be, float *out, const float *a, const float *b_or_null,
                        int R, int C) {
    int nt = team(be, (size_t)R * C);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int b, e;
        slice16(C, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        for (int c = b; c < e; c++) {
            float s = 0.0f;
            for (int r = 0; r < R; r++)
                s += a[(size_t)r * C + c] * (b_or_null ? b_or_null[(size_t)r * C + c] : 1.0f);
            out[c] += s;
        }
    }
}

/* Normalisation backward over groups of G channels (LayerNorm: G = C;
 * GroupNorm: G = N) with mean/rstd per (row, group). dx (+)= ..., the affine
 * gradients += ... ; xhat is rebuilt from x, mean, rstd. */
static void norm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                          const float *dy, const float *x, const float *mean, const float *rstd,
                          const float *weight, int R, int C, int G, int accumulate) {
    const int groups = C / G;
    int nt = team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++) {
        for (int g = 0; g < groups; g++) {
            const size_t o = (size_t)r * C + (size_t)g * G;
            const float mu = mean[(size_t)r * groups + g], rs = rstd[(size_t)r * groups + g];
            float sum_d = 0.0f, sum_dx = 0.0f;
            for (int i = 0; i < G; i++) {
                float d = dy[o + i] * weight[g * G + i];
                float xh = (x[o + i] - mu) * rs;
                sum_d += d;
                sum_dx += d * xh;
            }
            const float mean_d = sum_d / G, mean_dx = sum_dx / G;
            for (int i = 0; i < G; i++) {
                float d = dy[o + i] * weight[g * G + i];
                float xh = (x[o + i] - mu) * rs;
                float v = rs * (d - mean_d - xh * mean_dx);
                dx[o + i] = accumulate ? dx[o + i] + v : v;
            }
        }
    }
    /* Affine gradients: dweight += sum_r dy xhat, dbias += sum_r dy. */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int b, e;
        slice16(C, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        for (int c = b; c < e; c++) {
            const int g = c / G;
            float sw = 0.0f, sb = 0.0f;
            for (int r = 0; r < R; r++) {
                const size_t o = (size_t)r * C + c;
                float xh = (x[o] - mean[(size_t)r * groups + g]) * rstd[(size_t)r * groups + g];
                sw += dy[o] * xh;
                sb += dy[o];
            }
            dweight[c] += sw;
            dbias[c] += sb;
        }
    }
}

static void cpu_layernorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                   const float *dy, const float *x, const float *mean,
                                   const float *rstd, const float *weight, int R, int C) {
    norm_backward(be, dx, dweight, dbias, dy, x, mean, rstd, weight, R, C, C, 1);
}

static void cpu_groupnorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                   const float *dy, const float *x, const float *mean,
                                   const float *rstd, const float *weight, int R, int C, int N) {
    norm_backward(be, dx, dweight, dbias, dy, x, mean, rstd, weight, R, C, N, 0);
}

static void cpu_token_shift_backward(rp_backend *be, float *dx, float *dstate_base,
                                     size_t state_stride, const float *dprev,
                                     const rp_batch *batch, int C) {
    for (int s = 0; s < batch->n_seq; s++) {
        const int first = batch->row_begin[s], len = batch->seq_len[s];
        float *dstate = dstate_base + (size_t)batch->slot[s] * state_stride;
        float *dx_last = dx + (size_t)(first + len - 1) * C;
        for (int c = 0; c < C; c++) dx_last[c] += dstate[c];  /* the state after = last row */
        for (int r = first + 1; r < first + len; r++)
            for (int c = 0; c < C; c++) dx[(size_t)(r - 1) * C + c] += dprev[(size_t)r * C + c];
        for (int c = 0; c < C; c++) dstate[c] = dprev[(size_t)first * C + c];
    }
}

static void cpu_lerp_backward(rp_backend *be, float *dx, float *dprev, float *dmu,
                              const float *dy, const float *x, const float *prev,
                              const float *mu, int R, int C) {
    int nt = team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            const size_t i = (size_t)r * C + c;
            dx[i] += dy[i] * (1.0f - mu[c]);
            dprev[i] += dy[i] * mu[c];
        }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int b, e;
        slice16(C, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        for (int c = b; c < e; c++) {
            float s = 0.0f;
            for (int r = 0; r < R; r++) {
                const size_t i = (size_t)r * C + c;
                s += dy[i] * (prev[i] - x[i]);
            }
            dmu[c] += s;
        }
    }
}

static void cpu_bias_act_backward(rp_backend *be, float *dy, float *dbias, const float *y, int R,
                                  int C, rp_activation act) {
    int nt = team(be, (size_t)R * C);
    if (act != RP_ACT_NONE) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (size_t i = 0; i < (size_t)R * C; i++) {
            float yi = y[i], d;
            switch (act) {
            case RP_ACT_TANH: d = 1.0f - yi * yi; break;
            case RP_ACT_SIGMOID: d = yi * (1.0f - yi); break;
            case RP_ACT_RELU_SQUARED: d = 2.0f * sqrtf(yi); break;  /* y = relu(p)^2 */
            default: d = 1.0f; break;
            }
            dy[i] *= d;
        }
    }
    if (dbias) column_sums(be, dbias, dy, NULL, R, C);
}

static void cpu_value_residual_backward(rp_backend *be, float *dv, float *dv_first, float *dnu,
                                        const float *v, const float *v_first, const float *nu,
                                        int R, int C) {
    int nt = team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < (size_t)R * C; i++) {
        const float d_out = dv[i];
        dv_first[i] += d_out * nu[i];
        dnu[i] = d_out * (v_first[i] - v[i]);
        dv[i] = d_out * (1.0f - nu[i]);
    }
}

/* kk = u / max(|u|, eps) per head with u = k k_k (torch F.normalize);
 * k_out = k (1 + (a - 1) k_a). Heads of 64, as the forward. */
static void cpu_key_prepare_backward(rp_backend *be, float *dk, float *da, float *dk_k,
                                     float *dk_a, const float *dkk, const float *k,
                                     const float *a, const float *k_k, const float *k_a, int R,
                                     int C) {
    const int N = 64, H = C / N;
    /* Per-row terms of the two parameter gradients, summed over rows below. */
    float *du = malloc((size_t)R * C * sizeof(float));
    float *g_ka = malloc((size_t)R * C * sizeof(float));
    int nt = team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++)
        for (int h = 0; h < H; h++) {
            const size_t o = (size_t)r * C + (size_t)h * N;
            const float *kkw = k_k + h * N;
            float n2 = 0.0f;
            for (int j = 0; j < N; j++) {
                float u = k[o + j] * kkw[j];
                n2 += u * u;
            }
            const float norm = sqrtf(n2);
            if (norm > KK_EPS) {
                /* d(u/|u|) = (dkk - kk (kk . dkk)) / |u| */
                float dot = 0.0f;
                for (int j = 0; j < N; j++) dot += dkk[o + j] * k[o + j] * kkw[j];
                dot /= norm;
                for (int j = 0; j < N; j++) {
                    float kkj = k[o + j] * kkw[j] / norm;
                    du[o + j] = (dkk[o + j] - kkj * dot) / norm;
                }
            } else {
                for (int j = 0; j < N; j++) du[o + j] = dkk[o + j] / KK_EPS;
            }
            for (int j = 0; j < N; j++) {
                const size_t i = o + j;
                const int c = h * N + j;
                const float d_out = dk[i];
                da[i] += d_out * k[i] * k_a[c];
                g_ka[i] = d_out * k[i] * (a[i] - 1.0f);
                dk[i] = d_out * (1.0f + (a[i] - 1.0f) * k_a[c]) + du[i] * kkw[j];
            }
        }
    column_sums(be, dk_k, du, k, R, C);
    column_sums(be, dk_a, g_ka, NULL, R, C);
    free(du);
    free(g_ka);
}

/* out = (o + s_h v) g with s_h = sum_j r_j k_j r_k[h,j] per head. */
static void cpu_bonus_gate_backward(rp_backend *be, float *d_o, float *dr, float *dk, float *dv,
                                    float *dr_k, float *dg, const float *dout, const float *o,
                                    const float *r, const float *k, const float *v,
                                    const float *r_k, const float *g, int R, int C, int N) {
    const int H = C / N;
    float *ds = malloc((size_t)R * H * sizeof(float));
    int nt = team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r_ = 0; r_ < R; r_++)
        for (int h = 0; h < H; h++) {
            const size_t o0 = (size_t)r_ * C + (size_t)h * N;
            const float *rk = r_k + h * N;
            float s = 0.0f;
            for (int j = 0; j < N; j++) s += r[o0 + j] * k[o0 + j] * rk[j];
            float dsum = 0.0f;
            for (int i = 0; i < N; i++) {
                const size_t q = o0 + i;
                const float dz = dout[q] * g[q];
                dg[q] = dout[q] * (o[q] + s * v[q]);
                d_o[q] = dz;
                dv[q] += dz * s;
                dsum += dz * v[q];
            }
            ds[(size_t)r_ * H + h] = dsum;
            for (int j = 0; j < N; j++) {
                dr[o0 + j] += dsum * k[o0 + j] * rk[j];
                dk[o0 + j] += dsum * r[o0 + j] * rk[j];
            }
        }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int b, e;
        slice16(C, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        for (int c = b; c < e; c++) {
            const int h = c / N;
            float acc = 0.0f;
            for (int r_ = 0; r_ < R; r_++) {
                const size_t q = (size_t)r_ * C + c;
                acc += ds[(size_t)r_ * H + h] * r[q] * k[q];
            }
            dr_k[c] += acc;
        }
    }
    free(ds);
}

/* ---- WKV7 with checkpoints ----
 * Per (sequence, head) with state S [N,N] (row i = value, column j = key):
 *   d = exp(-e^-0.5 sigmoid(w_raw)), a = -kk, b = kk * iclr,
 *   sa_i = sum_j S[i,j] a_j;  S'[i,j] = S[i,j] d_j + sa_i b_j + v_i k_j;
 *   y_i = sum_j S'[i,j] r_j.
 * The training forward stores S before every RP_WKV_CHUNK-th token; the
 * backward recomputes a chunk's states from its checkpoint with the same
 * update (bit-identical) and walks it backwards. */

typedef struct {
    float d[256], aa[256], bb[256];
} wkv_step_coeffs;

static void wkv_coeffs(wkv_step_coeffs *q, const float *w_raw, const float *kk, const float *iclr,
                       int N) {
    for (int j = 0; j < N; j++) {
        q->d[j] = cpu_decayf(w_raw[j]);
        q->aa[j] = -kk[j];
        q->bb[j] = kk[j] * iclr[j];
    }
}

/* S (in place) <- one token; y (optional) = S' r. */
static void wkv_update(float *S, const wkv_step_coeffs *q, const float *k, const float *v,
                       const float *r, float *y, int N) {
    for (int i = 0; i < N; i++) {
        float *row = S + (size_t)i * N;
        float sa = 0.0f;
        for (int j = 0; j < N; j++) sa += row[j] * q->aa[j];
        float acc = 0.0f;
        for (int j = 0; j < N; j++) {
            row[j] = row[j] * q->d[j] + sa * q->bb[j] + v[i] * k[j];
            acc += row[j] * r[j];
        }
        if (y) y[i] = acc;
    }
}

static void cpu_wkv7_forward_train(rp_backend *be, float *y, const float *r, const float *w_raw,
                                   const float *k, const float *v, const float *kk,
                                   const float *a, float *state_base, size_t state_stride,
                                   float *checkpoints, const rp_batch *batch, int C, int N) {
    const int H = C / N;
    const size_t HNN = (size_t)H * N * N;
    int nt = team(be, (size_t)batch->n_rows * C * 8);
#pragma omp parallel for collapse(2) num_threads(nt) if (nt > 1) schedule(dynamic, 1)
    for (int s = 0; s < batch->n_seq; s++)
        for (int h = 0; h < H; h++) {
            float *S = state_base + (size_t)batch->slot[s] * state_stride + (size_t)h * N * N;
            float *ckpt = checkpoints + rp_wkv_checkpoint_offset(batch, s) * HNN + (size_t)h * N * N;
            wkv_step_coeffs q;
            for (int t = 0; t < batch->seq_len[s]; t++) {
                if (t % RP_WKV_CHUNK == 0)
                    memcpy(ckpt + (size_t)(t / RP_WKV_CHUNK) * HNN, S, (size_t)N * N * sizeof(float));
                const size_t o = (size_t)(batch->row_begin[s] + t) * C + (size_t)h * N;
                wkv_coeffs(&q, w_raw + o, kk + o, a + o, N);
                wkv_update(S, &q, k + o, v + o, r + o, y + o, N);
            }
        }
}

static void cpu_wkv7_backward(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                              float *dkk, float *da, float *dstate_base, size_t state_stride,
                              const float *dy, const float *r, const float *w_raw, const float *k,
                              const float *v, const float *kk, const float *a,
                              const float *checkpoints, const rp_batch *batch, int C, int N) {
    const int H = C / N;
    const size_t NN = (size_t)N * N, HNN = (size_t)H * NN;
    int nt = team(be, (size_t)batch->n_rows * C * 8);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        /* states[u] = S before token t0 + u of the chunk, u = 0 .. CHUNK. */
        float *states = malloc((RP_WKV_CHUNK + 1) * NN * sizeof(float));
        float *dsa = malloc((size_t)N * sizeof(float));
        float *sa = malloc((size_t)N * sizeof(float));
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int s = 0; s < batch->n_seq; s++)
            for (int h = 0; h < H; h++) {
                float *dS = dstate_base + (size_t)batch->slot[s] * state_stride + (size_t)h * NN;
                const float *ckpt =
                    checkpoints + rp_wkv_checkpoint_offset(batch, s) * HNN + (size_t)h * NN;
                const int len = batch->seq_len[s];
                const int n_chunks = (len + RP_WKV_CHUNK - 1) / RP_WKV_CHUNK;
                wkv_step_coeffs q;
                for (int c = n_chunks - 1; c >= 0; c--) {
                    const int t0 = c * RP_WKV_CHUNK;
                    const int t1 = t0 + RP_WKV_CHUNK < len ? t0 + RP_WKV_CHUNK : len;
                    memcpy(states, ckpt + (size_t)c * HNN, NN * sizeof(float));
                    for (int t = t0; t < t1; t++) {
                        const size_t o = (size_t)(batch->row_begin[s] + t) * C + (size_t)h * N;
                        float *next = states + (size_t)(t - t0 + 1) * NN;
                        memcpy(next, next - NN, NN * sizeof(float));
                        wkv_coeffs(&q, w_raw + o, kk + o, a + o, N);
                        wkv_update(next, &q, k + o, v + o, r + o, NULL, N);
                    }
                    for (int t = t1 - 1; t >= t0; t--) {
                        const size_t o = (size_t)(batch->row_begin[s] + t) * C + (size_t)h * N;
                        const float *Sp = states + (size_t)(t - t0) * NN;
                        const float *St = Sp + NN;
                        wkv_coeffs(&q, w_raw + o, kk + o, a + o, N);
                        /* dS <- d S_t: add the output's gradient dy_i r_j. */
                        for (int i = 0; i < N; i++)
                            for (int j = 0; j < N; j++) dS[i * N + j] += dy[o + i] * r[o + j];
                        for (int j = 0; j < N; j++) {
                            float acc = 0.0f;
                            for (int i = 0; i < N; i++) acc += St[i * N + j] * dy[o + i];
                            dr[o + j] = acc;
                        }
                        for (int i = 0; i < N; i++) {
                            float sa_i = 0.0f, acc_v = 0.0f, acc_sa = 0.0f;
                            for (int j = 0; j < N; j++) {
                                sa_i += Sp[i * N + j] * q.aa[j];
                                acc_v += dS[i * N + j] * k[o + j];
                                acc_sa += dS[i * N + j] * q.bb[j];
                            }
                            sa[i] = sa_i;
                            dv[o + i] = acc_v;
                            dsa[i] = acc_sa;
                        }
                        for (int j = 0; j < N; j++) {
                            float acc_k = 0.0f, acc_b = 0.0f, acc_d = 0.0f, acc_a = 0.0f;
                            for (int i = 0; i < N; i++) {
                                const float g = dS[i * N + j];
                                acc_k += g * v[o + i];
                                acc_b += g * sa[i];
                                acc_d += g * Sp[i * N + j];
                                acc_a += dsa[i] * Sp[i * N + j];
                            }
                            dk[o + j] = acc_k;
                            /* d = exp(-e^-0.5 sigmoid(w)): dd/dw = d (-e^-0.5) sig (1 - sig) */
                            const float sig = 1.0f / (1.0f + expf(-w_raw[o + j]));
                            dw_raw[o + j] = acc_d * q.d[j] * (-WKV_SCALE) * sig * (1.0f - sig);
                            /* a = -kk, b = kk * iclr */
                            dkk[o + j] = -acc_a + acc_b * a[o + j];
                            da[o + j] = acc_b * kk[o + j];
                        }
                        /* dS <- d S_{t-1} = dS_t d_j + dsa_i a_j */
                        for (int i = 0; i < N; i++)
                            for (int j = 0; j < N; j++)
                                dS[i * N + j] = dS[i * N + j] * q.d[j] + dsa[i] * q.aa[j];
                    }
                }
            }
        free(sa);
        free(dsa);
        free(states);
    }
}

static void cpu_cross_entropy(rp_backend *be, float *losses, float *dlogits, const float *logits,
                              const int32_t *targets, int R, int V, float scale) {
    int nt = team(be, (size_t)R * V);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *z = logits + (size_t)r * V;
        const int t = targets[r];
        if (t < 0) {
            losses[r] = 0.0f;
            if (dlogits)
                for (int i = 0; i < V; i++) dlogits[(size_t)r * V + i] = 0.0f;
            continue;
        }
        float mx = z[0];
        for (int i = 1; i < V; i++) mx = z[i] > mx ? z[i] : mx;
        double sum = 0.0;
        for (int i = 0; i < V; i++) sum += exp((double)z[i] - mx);
        const float lse = mx + (float)log(sum);
        losses[r] = lse - z[t];
        if (dlogits) {
            float *d = dlogits + (size_t)r * V;
            for (int i = 0; i < V; i++) d[i] = expf(z[i] - lse) * scale;  /* may alias z */
            d[t] -= scale;
        }
    }
}

static void cpu_row_max(rp_backend *be, float *row_max, int32_t *argmax, const float *x, int R,
                        int V) {
    int nt = team(be, (size_t)R * V);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *z = x + (size_t)r * V;
        int best = 0;
        for (int i = 1; i < V; i++)
            if (z[i] > z[best]) best = i;
        row_max[r] = z[best];
        argmax[r] = best;
    }
}

static void cpu_l2wrap(rp_backend *be, float *dlogits, const float *row_max, const int32_t *argmax,
                       const int32_t *targets, int R, int V, float factor) {
    for (int r = 0; r < R; r++)
        if (targets[r] >= 0) dlogits[(size_t)r * V + argmax[r]] += factor * row_max[r];
}

/* Fixed blocks summed in block order: the same bits for any thread count. */
static double cpu_sum_squares(rp_backend *be, const float *x, size_t n) {
    const size_t block = 4096, n_blocks = (n + block - 1) / block;
    double *partial = malloc((n_blocks ? n_blocks : 1) * sizeof(double));
    int nt = team(be, n);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (size_t b = 0; b < n_blocks; b++) {
        double s = 0.0;
        const size_t end = (b + 1) * block < n ? (b + 1) * block : n;
        for (size_t i = b * block; i < end; i++) s += (double)x[i] * x[i];
        partial[b] = s;
    }
    double total = 0.0;
    for (size_t b = 0; b < n_blocks; b++) total += partial[b];
    free(partial);
    return total;
}

static void cpu_adamw(rp_backend *be, float *param, const float *grad, float *m, float *v,
                      size_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                      float grad_scale, float bias_correction1, float bias_correction2) {
    const float inv_bc1 = 1.0f / bias_correction1, inv_bc2 = 1.0f / bias_correction2;
    int nt = team(be, n);
#pragma omp parallel for simd num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) {
        const float g = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps) + weight_decay * param[i];
        param[i] -= lr * update;
    }
}

void cpu_backward_install(rp_backend *be) {
    be->row_max = cpu_row_max;
    be->l2wrap = cpu_l2wrap;
    be->sum_squares = cpu_sum_squares;
    be->adamw = cpu_adamw;
    be->matmul_linear_backward = cpu_matmul_linear_backward;
    be->matmul_lora_backward = cpu_matmul_lora_backward;
    be->embedding_backward = cpu_embedding_backward;
    be->layernorm_backward = cpu_layernorm_backward;
    be->token_shift_backward = cpu_token_shift_backward;
    be->lerp_backward = cpu_lerp_backward;
    be->bias_act_backward = cpu_bias_act_backward;
    be->value_residual_backward = cpu_value_residual_backward;
    be->key_prepare_backward = cpu_key_prepare_backward;
    be->groupnorm_backward = cpu_groupnorm_backward;
    be->bonus_gate_backward = cpu_bonus_gate_backward;
    be->wkv7_forward_train = cpu_wkv7_forward_train;
    be->wkv7_backward = cpu_wkv7_backward;
    be->cross_entropy = cpu_cross_entropy;
}
