/* op_profile: a backend that times every op of another (see op_profile.h). */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "op_profile.h"
#include "core/clock.h"

#define PROFILE(be) ((op_profile *)(be))
#define INNER(be) (PROFILE(be)->inner)

static void profile_add(op_profile *p, const char *name, double seconds) {
    for (int i = 0; i < p->n_entries; i++)
        if (!strcmp(p->entries[i].name, name)) {
            p->entries[i].seconds += seconds;
            p->entries[i].calls++;
            return;
        }
    if (p->n_entries == OP_PROFILE_MAX_ENTRIES) {
        p->dropped_calls++;
        return;
    }
    op_profile_entry *e = &p->entries[p->n_entries++];
    snprintf(e->name, sizeof e->name, "%s", name);
    e->seconds = seconds;
    e->calls = 1;
}

/* The op between two synchronisations of the inner backend. */
#define TIMED(NAME, CALL)                                                                  \
    do {                                                                                   \
        op_profile *p_ = PROFILE(be);                                                      \
        p_->inner->synchronize(p_->inner);                                                 \
        const double t0_ = rp_now_seconds();                                                \
        CALL;                                                                              \
        p_->inner->synchronize(p_->inner);                                                 \
        profile_add(p_, NAME, rp_now_seconds() - t0_);                                      \
    } while (0)

/* Matmuls under one name per shape: "matmul_linear N=768 K=3072". */
#define TIMED_SHAPE(OP, N, K, CALL)                                                        \
    do {                                                                                   \
        char name_[64];                                                                    \
        snprintf(name_, sizeof name_, "%s N=%d K=%d", OP, N, K);                           \
        TIMED(name_, CALL);                                                                \
    } while (0)

/* ---- memory: allocation, status and registration pass through ---- */

static void w_destroy(rp_backend *be) { (void)be; }
static void *w_alloc(rp_backend *be, size_t bytes) { return INNER(be)->alloc(INNER(be), bytes); }
static void w_free(rp_backend *be, void *ptr) { INNER(be)->free(INNER(be), ptr); }
static void w_synchronize(rp_backend *be) { INNER(be)->synchronize(INNER(be)); }
static rp_status w_status(rp_backend *be, rp_error *err) {
    return INNER(be)->status(INNER(be), err);
}
static void w_register_weights(rp_backend *be, const float *w, size_t n) {
    INNER(be)->register_weights(INNER(be), w, n);
}
static void w_copy_to_device(rp_backend *be, void *dst, const void *src, size_t bytes) {
    TIMED("copy_to_device", INNER(be)->copy_to_device(INNER(be), dst, src, bytes));
}
static void w_copy_to_host(rp_backend *be, void *dst, const void *src, size_t bytes) {
    TIMED("copy_to_host", INNER(be)->copy_to_host(INNER(be), dst, src, bytes));
}
static void w_copy(rp_backend *be, void *dst, const void *src, size_t bytes) {
    TIMED("copy", INNER(be)->copy(INNER(be), dst, src, bytes));
}
static void w_fill_zero(rp_backend *be, void *dst, size_t bytes) {
    TIMED("fill_zero", INNER(be)->fill_zero(INNER(be), dst, bytes));
}
static void w_add(rp_backend *be, float *y, const float *x, size_t n) {
    TIMED("add", INNER(be)->add(INNER(be), y, x, n));
}

/* ---- forward ---- */

static void w_matmul_linear(rp_backend *be, float *y, const float *x, const float *w, int M,
                            int N, int K, float beta) {
    TIMED_SHAPE("matmul_linear", N, K,
                INNER(be)->matmul_linear(INNER(be), y, x, w, M, N, K, beta));
}
static void w_matmul_lora(rp_backend *be, float *y, const float *x, const float *w, int M,
                          int N, int K, float beta) {
    TIMED_SHAPE("matmul_lora", N, K, INNER(be)->matmul_lora(INNER(be), y, x, w, M, N, K, beta));
}
static void w_embedding(rp_backend *be, float *x, const float *emb, const int32_t *tokens, int R,
                        int C) {
    TIMED("embedding", INNER(be)->embedding(INNER(be), x, emb, tokens, R, C));
}
static void w_layernorm(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                        const float *weight, const float *bias, int R, int C, float eps) {
    TIMED("layernorm",
          INNER(be)->layernorm(INNER(be), y, mean, rstd, x, weight, bias, R, C, eps));
}
static void w_token_shift(rp_backend *be, float *prev, const float *x, float *state_base,
                          size_t state_stride, const rp_batch *batch, int C) {
    TIMED("token_shift",
          INNER(be)->token_shift(INNER(be), prev, x, state_base, state_stride, batch, C));
}
static void w_lerp(rp_backend *be, float *y, const float *x, const float *prev, const float *mu,
                   int R, int C) {
    TIMED("lerp", INNER(be)->lerp(INNER(be), y, x, prev, mu, R, C));
}
static void w_bias_act(rp_backend *be, float *y, const float *bias, int R, int C,
                       rp_activation act) {
    TIMED("bias_act", INNER(be)->bias_act(INNER(be), y, bias, R, C, act));
}
static void w_value_residual(rp_backend *be, float *v, const float *v_first, const float *nu,
                             int R, int C) {
    TIMED("value_residual", INNER(be)->value_residual(INNER(be), v, v_first, nu, R, C));
}
static void w_key_prepare(rp_backend *be, float *kk, float *k, const float *a, const float *k_k,
                          const float *k_a, int R, int C, int N) {
    TIMED("key_prepare", INNER(be)->key_prepare(INNER(be), kk, k, a, k_k, k_a, R, C, N));
}
static void w_groupnorm(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                        const float *weight, const float *bias, int R, int C, int N, float eps) {
    TIMED("groupnorm",
          INNER(be)->groupnorm(INNER(be), y, mean, rstd, x, weight, bias, R, C, N, eps));
}
static void w_bonus_gate(rp_backend *be, float *out, const float *r, const float *k,
                         const float *v, const float *r_k, const float *g, int R, int C, int N) {
    TIMED("bonus_gate", INNER(be)->bonus_gate(INNER(be), out, r, k, v, r_k, g, R, C, N));
}
static void w_wkv7(rp_backend *be, float *y, const float *r, const float *w_raw, const float *k,
                   const float *v, const float *kk, const float *a, float *state_base,
                   size_t state_stride, const rp_batch *batch, int C, int N) {
    TIMED("wkv7", INNER(be)->wkv7(INNER(be), y, r, w_raw, k, v, kk, a, state_base,
                                  state_stride, batch, C, N));
}

/* ---- backward ---- */

static void w_matmul_linear_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                     const float *x, const float *w, int M, int N, int K) {
    TIMED_SHAPE("matmul_linear_backward", N, K,
                INNER(be)->matmul_linear_backward(INNER(be), dx, dw, dy, x, w, M, N, K));
}
static void w_matmul_lora_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                   const float *x, const float *w, int M, int N, int K) {
    TIMED_SHAPE("matmul_lora_backward", N, K,
                INNER(be)->matmul_lora_backward(INNER(be), dx, dw, dy, x, w, M, N, K));
}
static void w_embedding_backward(rp_backend *be, float *demb, const float *dx,
                                 const int32_t *tokens, int R, int C) {
    TIMED("embedding_backward",
          INNER(be)->embedding_backward(INNER(be), demb, dx, tokens, R, C));
}
static void w_layernorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                 const float *dy, const float *x, const float *mean,
                                 const float *rstd, const float *weight, int R, int C) {
    TIMED("layernorm_backward", INNER(be)->layernorm_backward(INNER(be), dx, dweight, dbias, dy,
                                                              x, mean, rstd, weight, R, C));
}
static void w_token_shift_backward(rp_backend *be, float *dx, float *dstate_base,
                                   size_t state_stride, const float *dprev,
                                   const rp_batch *batch, int C) {
    TIMED("token_shift_backward",
          INNER(be)->token_shift_backward(INNER(be), dx, dstate_base, state_stride, dprev,
                                          batch, C));
}
static void w_lerp_backward(rp_backend *be, float *dx, float *dprev, float *dmu, const float *dy,
                            const float *x, const float *prev, const float *mu, int R, int C) {
    TIMED("lerp_backward",
          INNER(be)->lerp_backward(INNER(be), dx, dprev, dmu, dy, x, prev, mu, R, C));
}
static void w_bias_act_backward(rp_backend *be, float *dy, float *dbias, const float *y, int R,
                                int C, rp_activation act) {
    TIMED("bias_act_backward", INNER(be)->bias_act_backward(INNER(be), dy, dbias, y, R, C, act));
}
static void w_value_residual_backward(rp_backend *be, float *dv, float *dv_first, float *dnu,
                                      const float *v, const float *v_first, const float *nu,
                                      int R, int C) {
    TIMED("value_residual_backward",
          INNER(be)->value_residual_backward(INNER(be), dv, dv_first, dnu, v, v_first, nu, R, C));
}
static void w_key_prepare_backward(rp_backend *be, float *dk, float *da, float *dk_k,
                                   float *dk_a, const float *dkk, const float *k, const float *a,
                                   const float *k_k, const float *k_a, int R, int C, int N) {
    TIMED("key_prepare_backward",
          INNER(be)->key_prepare_backward(INNER(be), dk, da, dk_k, dk_a, dkk, k, a, k_k, k_a, R,
                                          C, N));
}
static void w_groupnorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                 const float *dy, const float *x, const float *mean,
                                 const float *rstd, const float *weight, int R, int C, int N) {
    TIMED("groupnorm_backward", INNER(be)->groupnorm_backward(INNER(be), dx, dweight, dbias, dy,
                                                              x, mean, rstd, weight, R, C, N));
}
static void w_bonus_gate_backward(rp_backend *be, float *d_o, float *dr, float *dk, float *dv,
                                  float *dr_k, float *dg, const float *dout, const float *o,
                                  const float *r, const float *k, const float *v,
                                  const float *r_k, const float *g, int R, int C, int N) {
    TIMED("bonus_gate_backward",
          INNER(be)->bonus_gate_backward(INNER(be), d_o, dr, dk, dv, dr_k, dg, dout, o, r, k, v,
                                         r_k, g, R, C, N));
}
static void w_wkv7_forward_train(rp_backend *be, float *y, const float *r, const float *w_raw,
                                 const float *k, const float *v, const float *kk, const float *a,
                                 float *state_base, size_t state_stride, float *checkpoints,
                                 const rp_batch *batch, int C, int N) {
    TIMED("wkv7_forward_train",
          INNER(be)->wkv7_forward_train(INNER(be), y, r, w_raw, k, v, kk, a, state_base,
                                        state_stride, checkpoints, batch, C, N));
}
static void w_wkv7_backward(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                            float *dkk, float *da, float *dstate_base, size_t state_stride,
                            const float *dy, const float *r, const float *w_raw, const float *k,
                            const float *v, const float *kk, const float *a,
                            const float *checkpoints, const rp_batch *batch, int C, int N) {
    TIMED("wkv7_backward",
          INNER(be)->wkv7_backward(INNER(be), dr, dw_raw, dk, dv, dkk, da, dstate_base,
                                   state_stride, dy, r, w_raw, k, v, kk, a, checkpoints, batch,
                                   C, N));
}
static void w_wkv7_backward_beta(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                                 float *dkk, float *da, float *dstate_base, size_t state_stride,
                                 const float *dy, const float *r, const float *w_raw,
                                 const float *k, const float *v, const float *kk, const float *a,
                                 const float *checkpoints, const rp_batch *batch, int C, int N,
                                 float beta) {
    TIMED("wkv7_backward",
          INNER(be)->wkv7_backward_beta(INNER(be), dr, dw_raw, dk, dv, dkk, da, dstate_base,
                                        state_stride, dy, r, w_raw, k, v, kk, a, checkpoints,
                                        batch, C, N, beta));
}

/* ---- loss and optimizer ---- */

static void w_cross_entropy(rp_backend *be, float *losses, float *dlogits, const float *logits,
                            const int32_t *targets, int R, int V, float scale) {
    TIMED("cross_entropy",
          INNER(be)->cross_entropy(INNER(be), losses, dlogits, logits, targets, R, V, scale));
}
static void w_l2wrap(rp_backend *be, float *dlogits, const float *row_max, const int32_t *argmax,
                     const int32_t *targets, int R, int V, float factor) {
    TIMED("l2wrap",
          INNER(be)->l2wrap(INNER(be), dlogits, row_max, argmax, targets, R, V, factor));
}
static void w_row_max(rp_backend *be, float *row_max, int32_t *argmax, const float *x, int R,
                      int V) {
    TIMED("row_max", INNER(be)->row_max(INNER(be), row_max, argmax, x, R, V));
}
static rp_status w_reserve(rp_backend *be, int rows, int seqs, int C, int N, rp_error *err) {
    return INNER(be)->reserve(INNER(be), rows, seqs, C, N, err);
}
static double w_sum_squares(rp_backend *be, const float *x, size_t n) {
    double result = 0.0;
    TIMED("sum_squares", result = INNER(be)->sum_squares(INNER(be), x, n));
    return result;
}
static void w_adamw(rp_backend *be, float *param, const float *grad, float *m, float *v,
                    size_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                    float grad_scale, float bias_correction1, float bias_correction2) {
    TIMED("adamw", INNER(be)->adamw(INNER(be), param, grad, m, v, n, lr, beta1, beta2, eps,
                                    weight_decay, grad_scale, bias_correction1,
                                    bias_correction2));
}

void op_profile_wrap(op_profile *p, rp_backend *inner) {
    memset(p, 0, sizeof *p);
    p->inner = inner;
    p->be = *inner;
    rp_backend *b = &p->be;
    b->destroy = w_destroy; /* the inner backend belongs to the caller */
    b->alloc = w_alloc;
    b->free = w_free;
    b->copy_to_device = w_copy_to_device;
    b->copy_to_host = w_copy_to_host;
    b->copy = w_copy;
    b->fill_zero = w_fill_zero;
    b->synchronize = w_synchronize;
    b->add = w_add;
    b->status = w_status;
    b->reserve = w_reserve;
    b->register_weights = inner->register_weights ? w_register_weights : NULL; /* optional */
    b->matmul_linear = w_matmul_linear;
    b->matmul_lora = w_matmul_lora;
    b->embedding = w_embedding;
    b->layernorm = w_layernorm;
    b->token_shift = w_token_shift;
    b->lerp = w_lerp;
    b->bias_act = w_bias_act;
    b->value_residual = w_value_residual;
    b->key_prepare = w_key_prepare;
    b->groupnorm = w_groupnorm;
    b->bonus_gate = w_bonus_gate;
    b->wkv7 = w_wkv7;
    b->matmul_linear_backward = w_matmul_linear_backward;
    b->matmul_lora_backward = w_matmul_lora_backward;
    b->embedding_backward = w_embedding_backward;
    b->layernorm_backward = w_layernorm_backward;
    b->token_shift_backward = w_token_shift_backward;
    b->lerp_backward = w_lerp_backward;
    b->bias_act_backward = w_bias_act_backward;
    b->value_residual_backward = w_value_residual_backward;
    b->key_prepare_backward = w_key_prepare_backward;
    b->groupnorm_backward = w_groupnorm_backward;
    b->bonus_gate_backward = w_bonus_gate_backward;
    b->wkv7_forward_train = w_wkv7_forward_train;
    b->wkv7_backward = w_wkv7_backward;
    b->wkv7_backward_beta = inner->wkv7_backward_beta ? w_wkv7_backward_beta : NULL; /* optional */
    b->cross_entropy = w_cross_entropy;
    b->l2wrap = w_l2wrap;
    b->row_max = w_row_max;
    b->sum_squares = w_sum_squares;
    b->adamw = w_adamw;
}

void op_profile_reset(op_profile *p) {
    p->n_entries = 0;
    p->dropped_calls = 0;
}

static int by_seconds_descending(const void *a, const void *b) {
    const op_profile_entry *x = a, *y = b;
    return (x->seconds < y->seconds) - (x->seconds > y->seconds);
}

void op_profile_print(FILE *out, const op_profile *p, const char *title, long units,
                      double unprofiled_ms) {
    op_profile_entry sorted[OP_PROFILE_MAX_ENTRIES];
    memcpy(sorted, p->entries, sizeof(op_profile_entry) * (size_t)p->n_entries);
    qsort(sorted, (size_t)p->n_entries, sizeof sorted[0], by_seconds_descending);
    double total = 0.0;
    long calls = 0;
    for (int i = 0; i < p->n_entries; i++) {
        total += sorted[i].seconds;
        calls += sorted[i].calls;
    }
    if (units < 1) units = 1;
    fprintf(out, "\n#### %s\n\n", title);
    fprintf(out, "- %ld units profiled; per unit: %.3f ms in %.1f op calls (each between two "
            "synchronisations of the %s backend)",
            units, 1e3 * total / units, (double)calls / units, p->inner->name);
    if (unprofiled_ms > 0) fprintf(out, "; unprofiled: %.3f ms", unprofiled_ms);
    fprintf(out, "\n");
    if (p->dropped_calls)
        fprintf(out, "- %ld calls of ops beyond the table's %d names were not timed\n",
                p->dropped_calls, OP_PROFILE_MAX_ENTRIES);
    fprintf(out, "\n| op | calls per unit | ms per unit | us per call | share |\n"
                 "|---|---:|---:|---:|---:|\n");
    for (int i = 0; i < p->n_entries; i++)
        fprintf(out, "| %s | %.1f | %.3f | %.1f | %.1f%% |\n", sorted[i].name,
                (double)sorted[i].calls / units, 1e3 * sorted[i].seconds / units,
                1e6 * sorted[i].seconds / sorted[i].calls,
                total > 0 ? 100.0 * sorted[i].seconds / total : 0.0);
    fflush(out);
}
