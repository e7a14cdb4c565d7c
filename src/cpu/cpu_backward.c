/* Backward (training) ops of the position-wise ops, installed into the
 * vtable by cpu_backward_install (semantics in backend.h); the forward of
 * each op is in cpu_elementwise.c, written out in a comment above its
 * backward here (GEMMs: cpu_matmul.c, WKV7: cpu_wkv7.c, loss: cpu_loss.c).
 * Parameter gradients have one summation order whatever the thread count:
 * vector gradients summed over rows in row order per channel. */
#include "config.h"

#include <math.h>
#include <omp.h>

#include "cpu/cpu_internal.h"

#define KK_EPS 1e-12f    /* key_prepare: torch F.normalize's eps on the norm */

/* Channels summed at a time by one thread in column_sums loops: the
 * accumulators stay in L1 while the rows stream by. */
#define COLUMN_BLOCK 256

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

/* ---- position-wise ---- */

/* forward: x [R,C] = emb[tokens[r]]
 * backward: demb [V,C] row tokens[r] += dx row r, rows in order (threads own
 * channel slices, so repeated tokens add up in row order). */
static void cpu_embedding_backward(rp_backend *be, float *demb, const float *dx,
                                   const int32_t *tokens, int R, int C) {
    int nt = cpu_team(be, (size_t)R * C);
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
 *   dx = rstd (d - mean(d) - xhat mean(d xhat))   (accumulate: 1 +=, 0 =,
 *   2 = with the bits of += on zero: the row is zeroed in cache first)
 *   dweight += sum_r dy xhat,  dbias += sum_r dy. */
static void norm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                          const float *dy, const float *x, const float *mean, const float *rstd,
                          const float *weight, int R, int C, int G, int accumulate) {
    const int groups = C / G;
    int nt = cpu_team(be, (size_t)R * C);
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
            if (accumulate == 2)
                for (int j = 0; j < G; j++) dxg[j] = 0.0f;
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

/* forward: y [R,C] = LayerNorm(x) weight + bias (eps 1e-5); dx += (beta 1) or = (0) */
static void cpu_layernorm_backward_beta(rp_backend *be, float *dx, float *dweight, float *dbias,
                                        const float *dy, const float *x, const float *mean,
                                        const float *rstd, const float *weight, int R, int C,
                                        float beta) {
    norm_backward(be, dx, dweight, dbias, dy, x, mean, rstd, weight, R, C, C,
                  beta != 0.0f ? 1 : 2);
}

static void cpu_layernorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                   const float *dy, const float *x, const float *mean,
                                   const float *rstd, const float *weight, int R, int C) {
    cpu_layernorm_backward_beta(be, dx, dweight, dbias, dy, x, mean, rstd, weight, R, C, 1.0f);
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
    int nt = cpu_team(be, (size_t)batch->n_rows * C);
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
 * backward: dx += dy (1 - mu), dprev += dy mu (= for beta 0),
 * dmu += sum_r dy (prev - x) */
static void cpu_lerp_backward_beta(rp_backend *be, float *dx, float *dprev, float *dmu,
                                   const float *dy, const float *x, const float *prev,
                                   const float *mu, int R, int C, float beta) {
    int nt = cpu_team(be, (size_t)R * C);
    const int accumulate = beta != 0.0f;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++) {
        const size_t o = (size_t)r * C;
        const float *restrict dyr = dy + o;
        float *restrict dxr = dx + o, *restrict dpr = dprev + o;
        if (!accumulate) /* in cache just before the += (same bits as a zeroed buffer) */
            for (int c = 0; c < C; c++) dxr[c] = dpr[c] = 0.0f;
#pragma omp simd
        for (int c = 0; c < C; c++) {
            dxr[c] += dyr[c] * (1.0f - mu[c]);
            dpr[c] += dyr[c] * mu[c];
        }
    }
    COLUMN_SUMS(dmu, R, C, dy[i] * (prev[i] - x[i]))
}

/* The fused training mix backward is the ops in order (bit-identical
 * results; the CUDA kernel's twin). */
static void cpu_shift_mix_backward(rp_backend *be, float *dx, float *dprev, float *const *dmu,
                                   const float *const *dmix, const float *const *mu,
                                   int n_terms, const float *x, const float *prev,
                                   float *dstate_base, size_t state_stride,
                                   const rp_batch *batch, int C) {
    const int R = batch->n_rows;
    for (int j = 0; j < n_terms; j++)
        cpu_lerp_backward_beta(be, dx, dprev, dmu[j], dmix[j], x, prev, mu[j], R, C,
                               j ? 1.0f : 0.0f);
    cpu_token_shift_backward(be, dx, dstate_base, state_stride, dprev, batch, C);
}

static void cpu_lerp_backward(rp_backend *be, float *dx, float *dprev, float *dmu,
                              const float *dy, const float *x, const float *prev,
                              const float *mu, int R, int C) {
    cpu_lerp_backward_beta(be, dx, dprev, dmu, dy, x, prev, mu, R, C, 1.0f);
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
    int nt = cpu_team(be, n);
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
    int nt = cpu_team(be, n);
#pragma omp parallel for simd num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) {
        const float d_out = dv[i];
        dv_first[i] += d_out * nu[i];
        dnu[i] = d_out * (v_first[i] - v[i]);
        dv[i] = d_out * (1.0f - nu[i]);
    }
}

/* forward: u = k k_k per head of N, kk = u / max(|u|, 1e-12) (torch
 * F.normalize), k_out = k (1 + (a - 1) k_a).
 * backward, with inv = 1 / max(|u|, eps): where |u| > eps, d kk / d u =
 * (I - kk kk^T) inv, so du = (dkk - u proj) inv with proj = (u . dkk) inv^2;
 * where the norm is clamped kk = u / eps is linear: du = dkk inv (proj = 0).
 *   dk = dk_out (1 + (a - 1) k_a) + du k_k (in place), da += dk_out k k_a,
 *   dk_k += sum_r du k,  dk_a += sum_r dk_out k (a - 1). */
static inline __attribute__((always_inline)) void
key_prepare_backward_heads(rp_backend *be, float *dk, float *da, float *dk_k, float *dk_a,
                           const float *dkk, const float *k, const float *a, const float *k_k,
                           const float *k_a, int R, int C, int N) {
    const int H = C / N;
    float *inv = cpu_scratch(be, cpu_key_prepare_backward_scratch(R, C, N),
                             "key_prepare_backward"); /* [R,H] twice */
    if (!inv) return;
    float *proj = inv + (size_t)R * H + 1;
    int nt = cpu_team(be, (size_t)R * C);
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
}

/* Heads of N; N = 64 (every real model) inlined with a constant trip count. */
static void cpu_key_prepare_backward(rp_backend *be, float *dk, float *da, float *dk_k,
                                     float *dk_a, const float *dkk, const float *k,
                                     const float *a, const float *k_k, const float *k_a, int R,
                                     int C, int N) {
    if (N == 64)
        key_prepare_backward_heads(be, dk, da, dk_k, dk_a, dkk, k, a, k_k, k_a, R, C, 64);
    else
        key_prepare_backward_heads(be, dk, da, dk_k, dk_a, dkk, k, a, k_k, k_a, R, C, N);
}

/* forward: out [R,C] = (o + s_h v) g with s_h = sum_j r_j k_j r_k[h,j] per head
 * backward, with dz = dout g and ds_h = sum_i dz_i v_i:
 *   d_o = dz, dg = dout (o + s v) (both overwrite), dv += dz s,
 *   dr += ds k r_k, dk += ds r r_k, dr_k [H,N] += sum_rows ds r k.
 * With beta 0, dv, dr and dk are overwritten: the head's slice is zeroed
 * in cache just before the same += loops, which keeps the bits of the +=
 * on a zeroed buffer (an "accumulate ? d : 0" inside the loops let the
 * compiler vectorise the two cases' reductions differently). */
static void cpu_bonus_gate_backward_beta(rp_backend *be, float *d_o, float *dr, float *dk,
                                         float *dv, float *dr_k, float *dg, const float *dout,
                                         const float *o, const float *r, const float *k,
                                         const float *v, const float *r_k, const float *g, int R,
                                         int C, int N, float beta) {
    const int H = C / N;
    const int accumulate = beta != 0.0f;
    float *ds = cpu_scratch(be, cpu_bonus_gate_backward_scratch(R, C, N),
                            "bonus_gate_backward");
    if (!ds) return;
    int nt = cpu_team(be, (size_t)R * C);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int row = 0; row < R; row++)
        for (int h = 0; h < H; h++) {
            const size_t q = (size_t)row * C + (size_t)h * N;
            const float *restrict rh = r + q, *restrict kh = k + q, *restrict vh = v + q,
                                  *restrict oh = o + q, *restrict gh = g + q,
                                  *restrict douth = dout + q, *restrict rkh = r_k + h * N;
            float *restrict d_oh = d_o + q, *restrict dgh = dg + q, *restrict dvh = dv + q,
                            *restrict drh = dr + q, *restrict dkh = dk + q;
            if (!accumulate)
                for (int j = 0; j < N; j++) dvh[j] = drh[j] = dkh[j] = 0.0f;
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
}

static void cpu_bonus_gate_backward(rp_backend *be, float *d_o, float *dr, float *dk, float *dv,
                                    float *dr_k, float *dg, const float *dout, const float *o,
                                    const float *r, const float *k, const float *v,
                                    const float *r_k, const float *g, int R, int C, int N) {
    cpu_bonus_gate_backward_beta(be, d_o, dr, dk, dv, dr_k, dg, dout, o, r, k, v, r_k, g, R, C,
                                 N, 1.0f);
}

void cpu_backward_install(rp_backend *be) {
    be->embedding_backward = cpu_embedding_backward;
    be->layernorm_backward = cpu_layernorm_backward;
    be->token_shift_backward = cpu_token_shift_backward;
    be->lerp_backward = cpu_lerp_backward;
    be->shift_mix_backward = cpu_shift_mix_backward;
    be->bias_act_backward = cpu_bias_act_backward;
    be->value_residual_backward = cpu_value_residual_backward;
    be->key_prepare_backward = cpu_key_prepare_backward;
    be->groupnorm_backward = cpu_groupnorm_backward;
    be->bonus_gate_backward = cpu_bonus_gate_backward;
    be->layernorm_backward_beta = cpu_layernorm_backward_beta;
    be->lerp_backward_beta = cpu_lerp_backward_beta;
    be->bonus_gate_backward_beta = cpu_bonus_gate_backward_beta;
}
