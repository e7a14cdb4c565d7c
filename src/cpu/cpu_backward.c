/* Backward (training) ops of the CPU backend, installed into the vtable by
 * cpu_backward_install (semantics in backend.h); the forward of each op is in
 * cpu_backend.c or cpu_matmul.c, written out in a comment above its backward
 * here; WKV7 training is in cpu_backward_wkv.c. Parameter gradients have one
 * summation order whatever the thread count: GEMMs in tiles fixed by the
 * shape, vector gradients summed over rows in row order per channel. */
#include "config.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "cpu/cpu_backend.h"

#define KK_EPS 1e-12f    /* key_prepare: torch F.normalize's eps on the norm */
#define KEY_HEAD_SIZE 64 /* key_prepare normalises heads of 64, as its forward */

/* GEMM tiles of the backward: big enough to run at full sgemm speed
 * (measured 128 x 128: same GFLOP/s as one call), small enough to share a
 * [768, 768] weight gradient between 36 threads. */
#define GEMM_TILE 128

/* Channels summed at a time by one thread in column_sums loops: the
 * accumulators stay in L1 while the rows stream by. */
#define COLUMN_BLOCK 256

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

/* out [C] += sum over rows of TERM, an expression of `row`, `col` and
 * i = row * C + col, with `nt` threads (a variable of that name in scope).
 * Each thread owns whole channel slices and adds a block of channels row by
 * row into accumulators: every channel sums its rows in row order, so the
 * result does not depend on the thread count. */
#define COLUMN_SUMS(out, R, C, TERM)                                                       \
    _Pragma("omp parallel num_threads(nt) if (nt > 1)") {                                  \
        int b_, e_;                                                                        \
        slice16((C), omp_get_thread_num(), omp_get_num_threads(), &b_, &e_);               \
        float acc_[COLUMN_BLOCK];                                                          \
        for (int c0_ = b_; c0_ < e_; c0_ += COLUMN_BLOCK) {                                \
            const int c1_ = c0_ + COLUMN_BLOCK < e_ ? c0_ + COLUMN_BLOCK : e_;             \
            for (int col = c0_; col < c1_; col++) acc_[col - c0_] = 0.0f;                  \
            for (int row = 0; row < (R); row++) {                                          \
                _Pragma("omp simd") for (int col = c0_; col < c1_; col++) {                \
                    const size_t i = (size_t)row * (C) + col;                              \
                    acc_[col - c0_] += (TERM);                                             \
                }                                                                          \
            }                                                                              \
            for (int col = c0_; col < c1_; col++) (out)[col] += acc_[col - c0_];           \
        }                                                                                  \
    }

/* ---- dense ---- */

/* Cm [rows, cols] += op(A) [rows, depth] . op(B) [depth, cols] (row-major),
 * one sgemm per GEMM_TILE x GEMM_TILE tile of Cm, tiles dealt to threads.
 * The tiles depend on the shape only: OpenBLAS kernels (Haswell's, for one)
 * give an element different bits depending on the size of the block it is
 * computed in, so slicing by thread count would make gradients depend on
 * it. The depth (the reduction) is never split. */
static void gemm_accumulate_tiled(rp_backend *be, CBLAS_TRANSPOSE trans_a,
                                  CBLAS_TRANSPOSE trans_b, int rows, int cols, int depth,
                                  const float *A, int lda, const float *B, int ldb, float *Cm,
                                  int ldc) {
    const int tiles_r = (rows + GEMM_TILE - 1) / GEMM_TILE;
    const int tiles_c = (cols + GEMM_TILE - 1) / GEMM_TILE;
    const long tiles = (long)tiles_r * tiles_c;
    int nt = team(be, (size_t)rows * cols * depth);
    if (nt > tiles) nt = (int)tiles;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(dynamic, 1)
    for (long t = 0; t < tiles; t++) {
        const int r0 = (int)(t / tiles_c) * GEMM_TILE, c0 = (int)(t % tiles_c) * GEMM_TILE;
        const int nr = rows - r0 < GEMM_TILE ? rows - r0 : GEMM_TILE;
        const int nc = cols - c0 < GEMM_TILE ? cols - c0 : GEMM_TILE;
        const float *a_tile = trans_a == CblasNoTrans ? A + (size_t)r0 * lda : A + r0;
        const float *b_tile = trans_b == CblasNoTrans ? B + c0 : B + (size_t)c0 * ldb;
        cblas_sgemm(CblasRowMajor, trans_a, trans_b, nr, nc, depth, 1.0f, a_tile, lda, b_tile,
                    ldb, 1.0f, Cm + (size_t)r0 * ldc + c0, ldc);
    }
}

/* forward: y [M,N] = x [M,K] . W^T, W [N,K]
 * backward: dx [M,K] += dy . W (dx optional); dw [N,K] += dy^T . x */
static void cpu_matmul_linear_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                       const float *x, const float *w, int M, int N, int K) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    if (dx) gemm_accumulate_tiled(be, CblasNoTrans, CblasNoTrans, M, K, N, dy, N, w, K, dx, K);
    gemm_accumulate_tiled(be, CblasTrans, CblasNoTrans, N, K, M, dy, N, x, K, dw, K);
}

/* forward: y [M,N] = x [M,K] . W, W [K,N] (LoRA factor)
 * backward: dx [M,K] += dy . W^T (dx optional); dw [K,N] += x^T . dy */
static void cpu_matmul_lora_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                     const float *x, const float *w, int M, int N, int K) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    if (dx) gemm_accumulate_tiled(be, CblasNoTrans, CblasTrans, M, K, N, dy, N, w, N, dx, K);
    gemm_accumulate_tiled(be, CblasTrans, CblasNoTrans, K, N, M, x, K, dy, N, dw, N);
}

/* ---- position-wise ---- */

/* forward: x [R,C] = emb[tokens[r]]
 * backward: demb [V,C] row tokens[r] += dx row r, rows in order (threads own
 * channel slices, so repeated tokens add up in row order). */
static void cpu_embedding_backward(rp_backend *be, float *demb, const float *dx,
                                   const int32_t *tokens, int R, int C) {
    int nt = team(be, (size_t)R * C);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int b, e;
        slice16(C, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        for (int r = 0; r < R; r++) {
            float *restrict dst = demb + (size_t)tokens[r] * C;
            const float *restrict src = dx + (size_t)r * C;
#pragma omp simd
            for (int c = b; c < e; c++) dst[c] += src[c];
        }
    }
}

/* forward: y = (x - mean) rstd weight + bias over groups of G channels
 * (LayerNorm: G = C; GroupNorm: G = N), mean/rstd [R, C/G] saved.
 * backward, with xhat = (x - mean) rstd and d = dy weight, per group:
 *   dx = rstd (d - mean(d) - xhat mean(d xhat))   (+= or =, see accumulate)
 *   dweight += sum_r dy xhat,  dbias += sum_r dy. */
static void norm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                          const float *dy, const float *x, const float *mean, const float *rstd,
                          const float *weight, int R, int C, int G, int accumulate) {
    const int groups = C / G;
    int nt = team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++) {
        for (int g = 0; g < groups; g++) {
            const size_t o = (size_t)r * C + (size_t)g * G;
            const float *restrict dyg = dy + o, *restrict xg = x + o, *restrict wg = weight + g * G;
            float *restrict dxg = dx + o;
            const float mu = mean[(size_t)r * groups + g], rs = rstd[(size_t)r * groups + g];
            float sum_d = 0.0f, sum_dxh = 0.0f;
#pragma omp simd reduction(+ : sum_d, sum_dxh)
            for (int j = 0; j < G; j++) {
                const float d = dyg[j] * wg[j];
                sum_d += d;
                sum_dxh += d * ((xg[j] - mu) * rs);
            }
            const float mean_d = sum_d / G, mean_dxh = sum_dxh / G;
            if (accumulate) {
#pragma omp simd
                for (int j = 0; j < G; j++)
                    dxg[j] += rs * (dyg[j] * wg[j] - mean_d - (xg[j] - mu) * rs * mean_dxh);
            } else {
#pragma omp simd
                for (int j = 0; j < G; j++)
                    dxg[j] = rs * (dyg[j] * wg[j] - mean_d - (xg[j] - mu) * rs * mean_dxh);
            }
        }
    }
    COLUMN_SUMS(dweight, R, C,
                dy[i] * ((x[i] - mean[(size_t)row * groups + col / G]) *
                         rstd[(size_t)row * groups + col / G]))
    COLUMN_SUMS(dbias, R, C, dy[i])
}

/* forward: y [R,C] = LayerNorm(x) weight + bias (eps 1e-5); dx += */
static void cpu_layernorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                   const float *dy, const float *x, const float *mean,
                                   const float *rstd, const float *weight, int R, int C) {
    norm_backward(be, dx, dweight, dbias, dy, x, mean, rstd, weight, R, C, C, 1);
}

/* forward: y [R,C] = GroupNorm(x; heads of N) weight + bias; dx overwritten */
static void cpu_groupnorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                   const float *dy, const float *x, const float *mean,
                                   const float *rstd, const float *weight, int R, int C, int N) {
    norm_backward(be, dx, dweight, dbias, dy, x, mean, rstd, weight, R, C, N, 0);
}

/* forward: prev row t = x row t-1 inside a sequence, the slot's state for
 * t = 0; then the state = the last row.
 * backward: dx row t += dprev row t+1, the last row += d(state after) (the
 * slot on entry); then the slot = dprev of the first row (d(state before)).
 * All slots are read before any is written, as the forward. */
static void cpu_token_shift_backward(rp_backend *be, float *dx, float *dstate_base,
                                     size_t state_stride, const float *dprev,
                                     const rp_batch *batch, int C) {
    int nt = team(be, (size_t)batch->n_rows * C);
    if (nt > batch->n_seq) nt = batch->n_seq > 0 ? batch->n_seq : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < batch->n_seq; s++) {
            const size_t first = (size_t)batch->row_begin[s], len = (size_t)batch->seq_len[s];
            const float *restrict dstate = dstate_base + (size_t)batch->slot[s] * state_stride;
            for (size_t r = first; r < first + len; r++) {
                float *restrict dxr = dx + r * C;
                const float *restrict src = r + 1 < first + len ? dprev + (r + 1) * C : dstate;
#pragma omp simd
                for (int c = 0; c < C; c++) dxr[c] += src[c];
            }
        }
#pragma omp for schedule(static)
        for (int s = 0; s < batch->n_seq; s++) {
            float *restrict dstate = dstate_base + (size_t)batch->slot[s] * state_stride;
            const float *restrict src = dprev + (size_t)batch->row_begin[s] * C;
            for (int c = 0; c < C; c++) dstate[c] = src[c];
        }
    }
}

/* forward: y [R,C] = x + (prev - x) mu, mu [C]
 * backward: dx += dy (1 - mu), dprev += dy mu, dmu += sum_r dy (prev - x) */
static void cpu_lerp_backward(rp_backend *be, float *dx, float *dprev, float *dmu,
                              const float *dy, const float *x, const float *prev,
                              const float *mu, int R, int C) {
    int nt = team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++) {
        const size_t o = (size_t)r * C;
        const float *restrict dyr = dy + o;
        float *restrict dxr = dx + o, *restrict dpr = dprev + o;
#pragma omp simd
        for (int c = 0; c < C; c++) {
            dxr[c] += dyr[c] * (1.0f - mu[c]);
            dpr[c] += dyr[c] * mu[c];
        }
    }
    COLUMN_SUMS(dmu, R, C, dy[i] * (prev[i] - x[i]))
}

/* forward: y [R,C] = act(pre + bias)
 * backward, act' from the output y: tanh 1 - y^2, sigmoid y (1 - y),
 * relu^2 2 sqrt(y) (= 2 relu(t)), none 1: dy *= act' in place (= d pre);
 * dbias += sum_r d pre (optional). One loop per activation, to vectorise. */
#define BIAS_ACT_BACKWARD_LOOP(DERIV)                                                     \
    _Pragma("omp parallel for simd num_threads(nt) if (nt > 1) schedule(static)")          \
    for (size_t i = 0; i < n; i++) {                                                      \
        const float yi = y[i];                                                             \
        dy[i] *= (DERIV);                                                                  \
    }

static void cpu_bias_act_backward(rp_backend *be, float *dy, float *dbias, const float *y, int R,
                                  int C, rp_activation act) {
    const size_t n = (size_t)R * C;
    int nt = team(be, n);
    switch (act) {
    case RP_ACT_NONE: break;
    case RP_ACT_TANH: BIAS_ACT_BACKWARD_LOOP(1.0f - yi * yi) break;
    case RP_ACT_SIGMOID: BIAS_ACT_BACKWARD_LOOP(yi * (1.0f - yi)) break;
    case RP_ACT_RELU_SQUARED: BIAS_ACT_BACKWARD_LOOP(2.0f * sqrtf(yi)) break;
    }
    if (dbias) {
        COLUMN_SUMS(dbias, R, C, dy[i])
    }
}

/* forward: v_out [R,C] = v + (v_first - v) nu
 * backward: dv = dv_out (1 - nu) in place, dv_first += dv_out nu,
 * dnu = dv_out (v_first - v) (overwrite) */
static void cpu_value_residual_backward(rp_backend *be, float *dv, float *dv_first, float *dnu,
                                        const float *v, const float *v_first, const float *nu,
                                        int R, int C) {
    const size_t n = (size_t)R * C;
    int nt = team(be, n);
#pragma omp parallel for simd num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) {
        const float d_out = dv[i];
        dv_first[i] += d_out * nu[i];
        dnu[i] = d_out * (v_first[i] - v[i]);
        dv[i] = d_out * (1.0f - nu[i]);
    }
}

/* forward: u = k k_k per head of 64, kk = u / max(|u|, 1e-12) (torch
 * F.normalize), k_out = k (1 + (a - 1) k_a).
 * backward, with inv = 1 / max(|u|, eps): where |u| > eps, d kk / d u =
 * (I - kk kk^T) inv, so du = (dkk - u proj) inv with proj = (u . dkk) inv^2;
 * where the norm is clamped kk = u / eps is linear: du = dkk inv (proj = 0).
 *   dk = dk_out (1 + (a - 1) k_a) + du k_k (in place), da += dk_out k k_a,
 *   dk_k += sum_r du k,  dk_a += sum_r dk_out k (a - 1). */
static void cpu_key_prepare_backward(rp_backend *be, float *dk, float *da, float *dk_k,
                                     float *dk_a, const float *dkk, const float *k,
                                     const float *a, const float *k_k, const float *k_a, int R,
                                     int C) {
    const int N = KEY_HEAD_SIZE, H = C / N;
    float *inv = malloc(2 * ((size_t)R * H + 1) * sizeof(float)); /* [R,H] twice */
    if (!inv) abort();
    float *proj = inv + (size_t)R * H + 1;
    int nt = team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++)
        for (int h = 0; h < H; h++) {
            const size_t o = (size_t)r * C + (size_t)h * N;
            const float *restrict kh = k + o, *restrict dkkh = dkk + o, *restrict kkw = k_k + h * N;
            float n2 = 0.0f, dot = 0.0f;
#pragma omp simd reduction(+ : n2, dot)
            for (int j = 0; j < N; j++) {
                const float u = kh[j] * kkw[j];
                n2 += u * u;
                dot += u * dkkh[j];
            }
            const float norm = sqrtf(n2);
            const float iv = 1.0f / (norm > KK_EPS ? norm : KK_EPS);
            inv[(size_t)r * H + h] = iv;
            proj[(size_t)r * H + h] = norm > KK_EPS ? dot * iv * iv : 0.0f;
        }
    /* parameter gradients first: they read dk_out, which dk replaces below */
    COLUMN_SUMS(dk_k, R, C,
                (dkk[i] - k[i] * k_k[col] * proj[(size_t)row * H + col / N]) *
                    inv[(size_t)row * H + col / N] * k[i])
    COLUMN_SUMS(dk_a, R, C, dk[i] * k[i] * (a[i] - 1.0f))
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++)
        for (int h = 0; h < H; h++) {
            const size_t o = (size_t)r * C + (size_t)h * N;
            const float iv = inv[(size_t)r * H + h], pj = proj[(size_t)r * H + h];
            const float *restrict kh = k + o, *restrict dkkh = dkk + o, *restrict ah = a + o,
                                  *restrict kkw = k_k + h * N, *restrict kaw = k_a + h * N;
            float *restrict dkh = dk + o, *restrict dah = da + o;
#pragma omp simd
            for (int j = 0; j < N; j++) {
                const float d_out = dkh[j];
                const float du = (dkkh[j] - kh[j] * kkw[j] * pj) * iv;
                dah[j] += d_out * kh[j] * kaw[j];
                dkh[j] = d_out * (1.0f + (ah[j] - 1.0f) * kaw[j]) + du * kkw[j];
            }
        }
    free(inv);
}

/* forward: out [R,C] = (o + s_h v) g with s_h = sum_j r_j k_j r_k[h,j] per head
 * backward, with dz = dout g and ds_h = sum_i dz_i v_i:
 *   d_o = dz, dg = dout (o + s v) (both overwrite), dv += dz s,
 *   dr += ds k r_k, dk += ds r r_k, dr_k [H,N] += sum_rows ds r k. */
static void cpu_bonus_gate_backward(rp_backend *be, float *d_o, float *dr, float *dk, float *dv,
                                    float *dr_k, float *dg, const float *dout, const float *o,
                                    const float *r, const float *k, const float *v,
                                    const float *r_k, const float *g, int R, int C, int N) {
    const int H = C / N;
    float *ds = malloc(((size_t)R * H + 1) * sizeof(float));
    if (!ds) abort();
    int nt = team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int row = 0; row < R; row++)
        for (int h = 0; h < H; h++) {
            const size_t q = (size_t)row * C + (size_t)h * N;
            const float *restrict rh = r + q, *restrict kh = k + q, *restrict vh = v + q,
                                  *restrict oh = o + q, *restrict gh = g + q,
                                  *restrict douth = dout + q, *restrict rkh = r_k + h * N;
            float *restrict d_oh = d_o + q, *restrict dgh = dg + q, *restrict dvh = dv + q,
                            *restrict drh = dr + q, *restrict dkh = dk + q;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int j = 0; j < N; j++) s += rh[j] * kh[j] * rkh[j];
            float dsum = 0.0f;
#pragma omp simd reduction(+ : dsum)
            for (int j = 0; j < N; j++) {
                const float dz = douth[j] * gh[j];
                dgh[j] = douth[j] * (oh[j] + s * vh[j]);
                d_oh[j] = dz;
                dvh[j] += dz * s;
                dsum += dz * vh[j];
            }
            ds[(size_t)row * H + h] = dsum;
#pragma omp simd
            for (int j = 0; j < N; j++) {
                drh[j] += dsum * kh[j] * rkh[j];
                dkh[j] += dsum * rh[j] * rkh[j];
            }
        }
    COLUMN_SUMS(dr_k, R, C, ds[(size_t)row * H + col / N] * r[i] * k[i])
    free(ds);
}

/* ---- loss and optimizer ---- */

/* forward and backward at once: losses [R] = logsumexp(z) - z[target],
 * dlogits = (softmax(z) - onehot(target)) scale; rows with target < 0 give
 * 0 and 0. Exponentials by the vectorised cpu_expf (over a 65536-token
 * vocabulary libm's exp was most of the op's time), their sum in double. */
static void cpu_cross_entropy(rp_backend *be, float *losses, float *dlogits, const float *logits,
                              const int32_t *targets, int R, int V, float scale) {
    int nt = team(be, (size_t)R * V);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *z = logits + (size_t)r * V;
        float *d = dlogits ? dlogits + (size_t)r * V : NULL; /* may alias z */
        const int t = targets[r];
        if (t < 0) {
            losses[r] = 0.0f;
            if (d)
                for (int i = 0; i < V; i++) d[i] = 0.0f;
            continue;
        }
        float mx = z[0];
#pragma omp simd reduction(max : mx)
        for (int i = 1; i < V; i++) mx = z[i] > mx ? z[i] : mx;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < V; i++) sum += (double)cpu_expf(z[i] - mx);
        const float lse = mx + (float)log(sum);
        losses[r] = lse - z[t];
        if (d) {
#pragma omp simd
            for (int i = 0; i < V; i++) d[i] = cpu_expf(z[i] - lse) * scale;
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

/* cpu_backward_wkv.c */
void cpu_backward_wkv_install(rp_backend *be);

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
    cpu_backward_wkv_install(be); /* wkv7_forward_train, wkv7_backward */
    be->cross_entropy = cpu_cross_entropy;
}
