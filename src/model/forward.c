/* The RWKV-7 forward pass, written once against the backend op interface:
 * embedding (+ln0), the block (time mix + channel mix) and the head, over a
 * ragged batch of sequences (sequence mode and step mode are the same code).
 * Math: docs/rwkv7.md (One layer, one token). */
#include <string.h>

#include "model/model.h"

#define RP_LN_EPS 1e-5f
#define RP_GN_EPS 64e-5f  /* GroupNorm eps of ln_x: 1e-5 * 8^2, not 1e-5 */
/* Rows up to which inference forms the six time-mix mixes in one
 * ln_shift_mix (decode batches); larger calls form one at a time in xc. */
#define RP_MIX_ROWS 64

rp_status rp_workspace_alloc(rp_workspace *ws, const rp_config *cfg, int max_rows,
                             rp_backend *be, rp_error *err) {
    memset(ws, 0, sizeof *ws);
    if (max_rows < 1)
        return rp_error_set(err, RP_ERR_ARG, "workspace rows %d must be >= 1", max_rows);
    size_t R = (size_t)max_rows, C = (size_t)cfg->n_embd;
    size_t lora = (size_t)cfg->d_decay;
    if ((size_t)cfg->d_iclr > lora) lora = cfg->d_iclr;
    if ((size_t)cfg->d_value > lora) lora = cfg->d_value;
    if ((size_t)cfg->d_gate > lora) lora = cfg->d_gate;
    /* 20 [R,C] buffers + one LoRA hidden [R,D] + FFN hidden [R,F] + the
     * decode mixes and the decode LoRA hiddens. */
    const size_t mix_rows = R < RP_MIX_ROWS ? R : RP_MIX_ROWS;
    size_t floats = R * C * 20 + R * lora + R * (size_t)cfg->dim_ffn +
                    mix_rows * C * RP_MIX_MAX + mix_rows * lora * 4;
    ws->base = be->alloc(be, floats * sizeof(float));
    if (!ws->base)
        return rp_error_set(err, RP_ERR_NOMEM,
                            "cannot allocate %zu MiB of activations for %d rows (%s backend); "
                            "use fewer rows per call", floats * sizeof(float) >> 20, max_rows,
                            be->name);
    ws->max_rows = max_rows;
    ws->bytes = floats * sizeof(float);
    float *p = ws->base;
    rp_layer_activations *s = &ws->acts;
    float **rc[] = {&ws->x,    &ws->v_first, &ws->xc,   &ws->head_rows, &ws->head_in,
                    &s->xa,    &s->prev_att, &s->r,     &s->k,         &s->v,
                    &s->w_raw, &s->a,        &s->g,     &s->nu,        &s->kk,
                    &s->y,     &s->o_gn,     &s->xf,    &s->prev_ffn,  &s->kf};
    for (size_t i = 0; i < sizeof rc / sizeof rc[0]; i++) {
        *rc[i] = p;
        p += R * C;
    }
    /* The four LoRAs run one after the other: one hidden buffer serves all. */
    s->w_hidden = s->a_hidden = s->g_hidden = s->nu_hidden = p;
    p += R * lora;
    s->ffn_hidden = p;
    p += R * (size_t)cfg->dim_ffn;
    for (int i = 0; i < RP_MIX_MAX; i++) {
        s->mix[i] = p;
        p += mix_rows * C;
    }
    s->mix_rows = (int)mix_rows;
    for (int i = 0; i < 4; i++) {
        s->lora_hidden[i] = p;
        p += mix_rows * lora;
    }
    return RP_OK;
}

void rp_workspace_free(rp_workspace *ws, rp_backend *be) {
    if (ws->base) be->free(be, ws->base);
    memset(ws, 0, sizeof *ws);
}

void rp_batch_init(rp_batch *b, int n_seq, const int *seq_len, const int *slot,
                   int *row_begin) {
    int rows = 0;
    for (int s = 0; s < n_seq; s++) {
        row_begin[s] = rows;
        rows += seq_len[s];
    }
    b->n_seq = n_seq;
    b->n_rows = rows;
    b->seq_len = seq_len;
    b->row_begin = row_begin;
    b->slot = slot;
}

static rp_status check_tokens(const rp_model *m, const int32_t *tokens, int R, rp_error *err) {
    for (int i = 0; i < R; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size)
            return rp_error_set(err, RP_ERR_ARG,
                                "token id %d at position %d is outside the vocabulary [0, %d)",
                                tokens[i], i, m->cfg.vocab_size);
    return RP_OK;
}

rp_status rp_model_embed(const rp_model *m, rp_workspace *ws, const int32_t *tokens,
                         const rp_batch *batch, rp_error *err) {
    rp_backend *be = m->be;
    const int R = batch->n_rows, C = m->cfg.n_embd;
    if (!m->has_embed)
        return rp_error_set(err, RP_ERR_INTERNAL, "embed called on a stage without the embedding");
    rp_status st = check_tokens(m, tokens, R, err);
    if (st != RP_OK) return st;
    be->embedding(be, ws->head_rows, m->global.emb, tokens, R, C);
    be->layernorm(be, ws->x, NULL, NULL, ws->head_rows, m->global.ln0_weight,
                  m->global.ln0_bias, R, C, RP_LN_EPS);
    return RP_OK;
}

/* The hint for a LoRA's output y before its up GEMM (backend.h). */
enum { LORA_Y_F32, LORA_Y_GEMM_ONLY, LORA_Y_RKV_ONLY };

/* y [R,C] = act_inner(x . w1) . w2 (+ bias [C], may be NULL), keeping
 * act_inner(x . w1) in hidden [R,D]. */
static void lora_forward(rp_backend *be, float *y, float *hidden, const float *x,
                         const float *w1, const float *w2, const float *bias, int D,
                         rp_activation inner, int R, int C, int y_hint) {
    /* only GEMMs read hidden (and the activation, in place, and the backward's
     * activation backward as its y: backend.h gemm_only allows both) */
    if (be->gemm_only) be->gemm_only(be, hidden, (size_t)R * D);
    be->matmul_lora(be, hidden, x, w1, R, D, C, 0.0f);
    if (inner != RP_ACT_NONE) be->bias_act(be, hidden, NULL, R, D, inner);
    /* training's w_raw or a, read only by its bias_act in place, the WKV7
     * ops (as kk is) and a's key_prepare (backend.h gemm_only); nu, read by
     * its bias_act in place, value_residual_from and the tail, and g, read
     * by the fused groupnorm and its backward (rkv_only): bf16 on CUDA */
    if (y_hint == LORA_Y_GEMM_ONLY && be->gemm_only) be->gemm_only(be, y, (size_t)R * C);
    if (y_hint == LORA_Y_RKV_ONLY && be->rkv_only) be->rkv_only(be, y, (size_t)R * C);
    /* the bias in the GEMM where the backend can (CUDA: its epilogue) */
    if (bias && be->matmul_lora_bias) {
        be->matmul_lora_bias(be, y, hidden, w2, bias, R, C, D);
        return;
    }
    be->matmul_lora(be, y, hidden, w2, R, C, D, 0.0f);
    if (bias) be->bias_act(be, y, bias, R, C, RP_ACT_NONE);
}

/* Mix i of the time mix: formed already by ln_shift_mix or shift_mix
 * (mixes non-NULL), or now into xc. */
static const float *time_mix(rp_backend *be, const rp_layer_activations *s, float *xc,
                             float *const *mixes, int i, const float *mu, int R, int C) {
    if (mixes) return mixes[i];
    be->lerp(be, xc, s->xa, s->prev_att, mu, R, C);
    return xc;
}

static void channel_mix(const rp_model *m, rp_layer_activations *s, float *x, int layer,
                        rp_state *state, const rp_batch *batch);

/* Inference with the fused decode ops: nothing saved for a backward. */
static int decode_fusable(const rp_backend *be, const rp_layer_activations *s) {
    return be->gemv_group && be->time_mix_heads && s->lora_hidden[0] && !s->k_pre &&
           !s->v_pre && !s->og && !s->gn_mean && !s->wkv_checkpoints && !s->x_mid;
}

/* ln_shift_mix's arguments as one struct (ln_mix_gemv_group). */
static rp_ln_mix ln_mix_args(float *xa, float *prev, float *const *mix, const float *const *mu,
                             int n_mix, const float *x, const float *weight, const float *bias,
                             float *state_base, size_t state_stride, int C) {
    rp_ln_mix p;
    memset(&p, 0, sizeof p);
    p.xa = xa;
    p.prev = prev;
    for (int i = 0; i < n_mix; i++) {
        p.mix[i] = mix[i];
        p.mu[i] = mu[i];
    }
    p.n_mix = n_mix;
    p.x = x;
    p.weight = weight;
    p.bias = bias;
    p.eps = RP_LN_EPS;
    p.state_base = state_base;
    p.state_stride = state_stride;
    p.C = C;
    return p;
}

/* The time mix of a decode call from the six mixes: the same ops as the
 * unfused path below, grouped into gemv_group (r, k, v and the four LoRA
 * down-projections; then the four up-projections with their epilogues),
 * time_mix_heads and the output GEMV with its residual add. pre non-NULL:
 * ln_shift_mix was not called; it goes with the first group (the backend
 * forms the mixes inside the GEMVs: ln_mix_gemv_group). */
static void decode_time_mix(const rp_model *m, rp_layer_activations *s, float *x,
                            float *v_first, int layer, rp_state *state, const rp_batch *batch,
                            const rp_ln_mix *pre) {
    rp_backend *be = m->be;
    const rp_config *c = &m->cfg;
    const rp_layer_weights *w = &m->layers[layer - m->layer_begin];
    const int R = batch->n_rows, C = c->n_embd;
    float *const *mix = s->mix;
    float *const *h = s->lora_hidden;  /* w a g nu */
    rp_gemv_job down[7] = {
        {s->r, mix[0], w->receptance, NULL, C, C, 0, 0.0f, RP_ACT_NONE},
        {s->k, mix[1], w->key, NULL, C, C, 0, 0.0f, RP_ACT_NONE},
        {s->v, mix[2], w->value, NULL, C, C, 0, 0.0f, RP_ACT_NONE},
        {h[0], mix[3], w->w1, NULL, c->d_decay, C, 1, 0.0f, RP_ACT_TANH},
        {h[1], mix[4], w->a1, NULL, c->d_iclr, C, 1, 0.0f, RP_ACT_NONE},
        {h[2], mix[5], w->g1, NULL, c->d_gate, C, 1, 0.0f, RP_ACT_SIGMOID},
        {h[3], mix[2], w->v1, NULL, c->d_value, C, 1, 0.0f, RP_ACT_NONE},
    };
    rp_gemv_job up[4] = {
        {s->w_raw, h[0], w->w2, w->w0, C, c->d_decay, 1, 0.0f, RP_ACT_NONE},
        {s->a, h[1], w->a2, w->a0, C, c->d_iclr, 1, 0.0f, RP_ACT_SIGMOID},
        {s->g, h[2], w->g2, NULL, C, c->d_gate, 1, 0.0f, RP_ACT_NONE},
        {s->nu, h[3], w->v2, w->v0, C, c->d_value, 1, 0.0f, RP_ACT_SIGMOID},
    };
    const int has_nu = layer != 0;  /* layer 0's v is v_first: no value residual */
    if (pre)
        be->ln_mix_gemv_group(be, pre, batch, down, has_nu ? 7 : 6);
    else
        be->gemv_group(be, down, has_nu ? 7 : 6, R);
    be->gemv_group(be, up, has_nu ? 4 : 3, R);
    const rp_time_mix_heads args = {
        s->o_gn, s->y, s->kk, s->k, s->v, v_first, has_nu ? s->nu : NULL, s->r, s->w_raw,
        s->a, s->g, w->k_k, w->k_a, w->r_k, w->ln_x_weight, w->ln_x_bias, RP_GN_EPS,
        rp_state_wkv(state, 0, layer), state->floats_per_slot, C, c->head_size};
    be->time_mix_heads(be, &args, batch);
    be->matmul_linear(be, x, s->o_gn, w->output, R, C, C, 1.0f);  /* x += og Wo^T */
}

void rp_block_forward(const rp_model *m, rp_layer_activations *s, float *x, float *v_first,
                      float *xc, int layer, rp_state *state, const rp_batch *batch) {
    rp_backend *be = m->be;
    const rp_config *c = &m->cfg;
    const rp_layer_weights *w = &m->layers[layer - m->layer_begin];
    const int R = batch->n_rows, C = c->n_embd, N = c->head_size;
    const size_t rc_bytes = (size_t)R * C * sizeof(float);

    /* ---- time mix ---- */
    /* Inference of few rows: ln1, the token shift and all six mixes in one op. */
    const int fused = be->ln_shift_mix && !s->ln1_mean && !s->x_in && R <= s->mix_rows;
    /* Training with the backend's fused mix: the shift and all six mixes in
     * one op, into the workspace's shared mix buffers. */
    const int train_fused = !fused && be->shift_mix && s->tmix[0];
    /* the backward's saved x_in: written by ln_shift_mix_train in its pass
     * over x where it runs, else copied */
    if (s->x_in && !(train_fused && be->ln_shift_mix_train)) be->copy(be, s->x_in, x, rc_bytes);
    const float *mu[RP_MIX_MAX] = {w->x_r, w->x_k, w->x_v, w->x_w, w->x_a, w->x_g};
    if (fused && decode_fusable(be, s) && be->ln_mix_gemv_group) {
        const rp_ln_mix pre = ln_mix_args(s->xa, s->prev_att, s->mix, mu, RP_MIX_MAX, x,
                                          w->ln1_weight, w->ln1_bias,
                                          rp_state_att_x_prev(state, 0, layer),
                                          state->floats_per_slot, C);
        decode_time_mix(m, s, x, v_first, layer, state, batch, &pre);
        channel_mix(m, s, x, layer, state, batch);
        return;
    }
    if (fused) {
        be->ln_shift_mix(be, s->xa, s->prev_att, s->mix, mu, RP_MIX_MAX, x, w->ln1_weight,
                         w->ln1_bias, RP_LN_EPS, rp_state_att_x_prev(state, 0, layer),
                         state->floats_per_slot, batch, C);
    } else if (train_fused && be->ln_shift_mix_train) {
        /* ln1 and the fused mix in one op (xa is not read back) */
        float *xa = rp_mix_again(be, batch, C) ? NULL : s->xa;  /* NULL: formed again */
        be->ln_shift_mix_train(be, s->x_in, xa, s->ln1_mean, s->ln1_rstd, s->prev_att, s->tmix,
                               mu, RP_MIX_MAX, x, w->ln1_weight, w->ln1_bias, RP_LN_EPS,
                               rp_state_att_x_prev(state, 0, layer), state->floats_per_slot,
                               batch, C);
    } else {
        be->layernorm(be, s->xa, s->ln1_mean, s->ln1_rstd, x, w->ln1_weight, w->ln1_bias, R,
                      C, RP_LN_EPS);
        if (train_fused)
            be->shift_mix(be, s->prev_att, s->tmix, mu, RP_MIX_MAX, s->xa,
                          rp_state_att_x_prev(state, 0, layer), state->floats_per_slot, batch,
                          C);
        else
            be->token_shift(be, s->prev_att, s->xa, rp_state_att_x_prev(state, 0, layer),
                            state->floats_per_slot, batch, C);
    }
    if (fused && decode_fusable(be, s)) {
        decode_time_mix(m, s, x, v_first, layer, state, batch, NULL);
        channel_mix(m, s, x, layer, state, batch);
        return;
    }
    /* Each mix x_c = xa + (prev - xa) mu_c is formed just before its consumer
     * (one buffer; the backward recomputes them), unless fused. */
    float *const *mixes = fused ? s->mix : train_fused ? s->tmix : NULL;
    float *k_out = s->k_pre ? s->k_pre : s->k;
    float *v_out = s->v_pre ? s->v_pre : s->v;
    /* training: r, k, v read only by the WKV7 ops and the fused groupnorm
     * (bf16 on CUDA, as kk, w_raw, a and y; k, v written out of k_pre, v_pre),
     * k_pre and v_pre only by key_prepare_from, value_residual_from and the
     * backward's attention_tail_backward (rkv_only too), nu likewise (its
     * LoRA's up GEMM under rkv_only, the sigmoid in place) */
    const int rkv_only = s->wkv_checkpoints && s->og && s->k_pre && s->v_pre &&
                         rp_rkv_only_layer(be, layer);
    const float *xm = time_mix(be, s, xc, mixes, 0, w->x_r, R, C);
    if (rkv_only) be->rkv_only(be, s->r, (size_t)R * C);
    be->matmul_linear(be, s->r, xm, w->receptance, R, C, C, 0.0f);
    xm = time_mix(be, s, xc, mixes, 1, w->x_k, R, C);
    if (rkv_only) be->rkv_only(be, k_out, (size_t)R * C);
    be->matmul_linear(be, k_out, xm, w->key, R, C, C, 0.0f);
    xm = time_mix(be, s, xc, mixes, 2, w->x_v, R, C);
    if (rkv_only) be->rkv_only(be, v_out, (size_t)R * C);
    be->matmul_linear(be, v_out, xm, w->value, R, C, C, 0.0f);
    /* nu = sigmoid(v0 + xv v1 v2) while xm still holds xv (one lerp less);
     * value_residual_from applies the sigmoid itself where it runs (nu read
     * once, not three times) */
    const int v_from = layer != 0 && s->v_pre && be->value_residual_from;
    if (layer != 0) {
        lora_forward(be, s->nu, s->nu_hidden, xm, w->v1, w->v2, NULL, c->d_value, RP_ACT_NONE, R,
                     C, rkv_only ? LORA_Y_RKV_ONLY : LORA_Y_F32);
        if (!v_from) be->bias_act(be, s->nu, w->v0, R, C, RP_ACT_SIGMOID);
    }
    /* w_raw = w0 + tanh(xw w1) w2 (w0 in the up GEMM's epilogue where the
     * backend has one); the decay exp(-e^-0.5 sigmoid(w_raw)) is formed
     * inside wkv7, in fp32, as the official kernels do. */
    xm = time_mix(be, s, xc, mixes, 3, w->x_w, R, C);
    lora_forward(be, s->w_raw, s->w_hidden, xm, w->w1, w->w2, w->w0, c->d_decay, RP_ACT_TANH, R,
                 C, s->wkv_checkpoints && be->wkv_only ? LORA_Y_GEMM_ONLY : LORA_Y_F32);
    /* a = sigmoid(a0 + xa a1 a2); in training read only by its sigmoid in
     * place (key_prepare_from's, where it runs), key_prepare, the WKV7 ops,
     * key_prepare_backward and the a0 bias_act_backward as its y (bf16 on
     * CUDA, with kk and w_raw) */
    const int k_from = s->k_pre && be->key_prepare_from;
    xm = time_mix(be, s, xc, mixes, 4, w->x_a, R, C);
    lora_forward(be, s->a, s->a_hidden, xm, w->a1, w->a2, NULL, c->d_iclr, RP_ACT_NONE, R, C,
                 s->wkv_checkpoints && be->wkv_only ? LORA_Y_GEMM_ONLY : LORA_Y_F32);
    if (!k_from) be->bias_act(be, s->a, w->a0, R, C, RP_ACT_SIGMOID);
    /* g = sigmoid(xg g1) g2, no activation after g2; in training read only by
     * the fused groupnorm and its backward (rkv_only, with r, k, v) */
    xm = time_mix(be, s, xc, mixes, 5, w->x_g, R, C);
    lora_forward(be, s->g, s->g_hidden, xm, w->g1, w->g2, NULL, c->d_gate, RP_ACT_SIGMOID, R, C,
                 rkv_only ? LORA_Y_RKV_ONLY : LORA_Y_F32);
    /* Value residual: layer 0's v is v_first for every later layer.
     * Training keeps v_pre and k_pre for the backward: the ops read them
     * out of place where the backend can (no copy), else copy first. */
    if (v_from) {
        if (rkv_only) be->rkv_only(be, s->v, (size_t)R * C);
        be->value_residual_from(be, s->v, s->v_pre, v_first, s->nu, w->v0, R, C);
    } else {
        if (s->v_pre) be->copy(be, s->v, s->v_pre, rc_bytes);
        if (layer == 0)
            be->copy(be, v_first, s->v, rc_bytes);
        else
            be->value_residual(be, s->v, v_first, s->nu, R, C);
    }
    /* kk is normalised before k is modified by k_a. */
    if (s->k_pre && !k_from) be->copy(be, s->k, s->k_pre, rc_bytes);
    /* training: only the WKV7 forward and backward read kk (bf16 on CUDA) */
    if (s->wkv_checkpoints && be->wkv_only) be->wkv_only(be, s->kk, (size_t)R * C);
    if (rkv_only) be->rkv_only(be, s->k, (size_t)R * C);
    if (k_from)
        be->key_prepare_from(be, s->kk, s->k, s->k_pre, s->a, w->a0, w->k_k, w->k_a, R, C, N);
    else
        be->key_prepare(be, s->kk, s->k, s->a, w->k_k, w->k_a, R, C, N);
    /* training, groupnorm fused both ways: only groupnorm_bonus_gate and its
     * backward read y (bf16 on CUDA) */
    if (s->wkv_checkpoints && s->og && be->groupnorm_bonus_gate &&
        be->groupnorm_bonus_gate_backward && be->wkv_only)
        be->wkv_only(be, s->y, (size_t)R * C);
    if (s->wkv_checkpoints)
        be->wkv7_forward_train(be, s->y, s->r, s->w_raw, s->k, s->v, s->kk, s->a,
                               rp_state_wkv(state, 0, layer), state->floats_per_slot,
                               s->wkv_checkpoints, batch, C, N);
    else
        be->wkv7(be, s->y, s->r, s->w_raw, s->k, s->v, s->kk, s->a,
                 rp_state_wkv(state, 0, layer), state->floats_per_slot, batch, C, N);
    float *og = s->og ? s->og : s->o_gn;
    if (s->og && be->groupnorm_bonus_gate) {
        /* training, fused: the groupnorm output is never stored (the backward
         * recomputes it from y, gn_mean, gn_rstd); only the output GEMM and
         * its weight gradient read og */
        if (be->gemm_only) be->gemm_only(be, og, (size_t)R * C);
        be->groupnorm_bonus_gate(be, og, s->gn_mean, s->gn_rstd, s->y, w->ln_x_weight,
                                 w->ln_x_bias, s->r, s->k, s->v, w->r_k, s->g, R, C, N,
                                 RP_GN_EPS);
    } else if (s->og && be->bonus_gate_to) {
        be->groupnorm(be, s->o_gn, s->gn_mean, s->gn_rstd, s->y, w->ln_x_weight, w->ln_x_bias,
                      R, C, N, RP_GN_EPS);
        /* training: only the output GEMM and its weight gradient read og */
        if (be->gemm_only) be->gemm_only(be, og, (size_t)R * C);
        be->bonus_gate_to(be, og, s->o_gn, s->r, s->k, s->v, w->r_k, s->g, R, C, N);
    } else {
        be->groupnorm(be, s->o_gn, s->gn_mean, s->gn_rstd, s->y, w->ln_x_weight, w->ln_x_bias,
                      R, C, N, RP_GN_EPS);
        if (s->og) be->copy(be, og, s->o_gn, rc_bytes);
        be->bonus_gate(be, og, s->r, s->k, s->v, w->r_k, s->g, R, C, N);
    }
    be->matmul_linear(be, x, og, w->output, R, C, C, 1.0f);  /* x += og Wo^T */

    /* ---- channel mix ---- */
    channel_mix(m, s, x, layer, state, batch);
}

static void channel_mix(const rp_model *m, rp_layer_activations *s, float *x, int layer,
                        rp_state *state, const rp_batch *batch) {
    rp_backend *be = m->be;
    const rp_layer_weights *w = &m->layers[layer - m->layer_begin];
    const int R = batch->n_rows, C = m->cfg.n_embd, F = m->cfg.dim_ffn;
    if (be->ln_mix_gemv_group && be->ln_shift_mix && !be->gemv_chain && be->gemv_group &&
        !s->ln2_mean && !s->x_mid && R <= s->mix_rows) {
        /* ln2, the shift and the key mix inside the key GEMV (one op), then the value */
        const float *mu[1] = {w->ffn_x_k};
        const rp_ln_mix pre = ln_mix_args(s->xf, s->prev_ffn, &s->kf, mu, 1, x, w->ln2_weight,
                                          w->ln2_bias, rp_state_ffn_x_prev(state, 0, layer),
                                          state->floats_per_slot, C);
        const rp_gemv_job key = {s->ffn_hidden, s->kf, w->ffn_key, NULL, F, C, 0, 0.0f,
                                 RP_ACT_RELU_SQUARED};
        be->ln_mix_gemv_group(be, &pre, batch, &key, 1);
        be->matmul_linear(be, x, s->ffn_hidden, w->ffn_value, R, C, F, 1.0f);
        return;
    }
    if (be->ln_shift_mix && !s->ln2_mean && !s->x_mid) {
        const float *mu[1] = {w->ffn_x_k};
        be->ln_shift_mix(be, s->xf, s->prev_ffn, &s->kf, mu, 1, x, w->ln2_weight, w->ln2_bias,
                         RP_LN_EPS, rp_state_ffn_x_prev(state, 0, layer),
                         state->floats_per_slot, batch, C);
    } else if (be->shift_mix && be->ln_shift_mix_train) {
        /* x_mid saved, ln2 and the fused key mix in one op (xf is not read back) */
        const float *mu[1] = {w->ffn_x_k};
        float *xf = rp_mix_again(be, batch, C) ? NULL : s->xf;  /* NULL: formed again */
        be->ln_shift_mix_train(be, s->x_mid, xf, s->ln2_mean, s->ln2_rstd, s->prev_ffn, &s->kf,
                               mu, 1, x, w->ln2_weight, w->ln2_bias, RP_LN_EPS,
                               rp_state_ffn_x_prev(state, 0, layer), state->floats_per_slot,
                               batch, C);
    } else {
        /* the backward's saved x_mid (ln_shift_mix_train above writes it) */
        if (s->x_mid) be->copy(be, s->x_mid, x, (size_t)R * C * sizeof(float));
        be->layernorm(be, s->xf, s->ln2_mean, s->ln2_rstd, x, w->ln2_weight, w->ln2_bias, R,
                      C, RP_LN_EPS);
        if (be->shift_mix) {
            const float *mu[1] = {w->ffn_x_k};
            be->shift_mix(be, s->prev_ffn, &s->kf, mu, 1, s->xf,
                          rp_state_ffn_x_prev(state, 0, layer), state->floats_per_slot, batch,
                          C);
        } else {
            be->token_shift(be, s->prev_ffn, s->xf, rp_state_ffn_x_prev(state, 0, layer),
                            state->floats_per_slot, batch, C);
            be->lerp(be, s->kf, s->xf, s->prev_ffn, w->ffn_x_k, R, C);
        }
    }
    if (be->gemv_chain && R <= s->mix_rows && !s->ln2_mean) {
        /* key with relu^2 then value, as below; one parallel region on a
         * quantized CPU model instead of two (docs/perf/cpu.md) */
        const rp_gemv_job ffn[2] = {
            {s->ffn_hidden, s->kf, w->ffn_key, NULL, F, C, 0, 0.0f, RP_ACT_RELU_SQUARED},
            {x, s->ffn_hidden, w->ffn_value, NULL, C, F, 0, 1.0f, RP_ACT_NONE}};
        be->gemv_chain(be, ffn, 2, R);
        return;
    }
    if (be->gemv_group && R <= s->mix_rows && !s->ln2_mean) {
        /* The same two ops as one job (the CUDA GEMV applies relu^2 in its epilogue). */
        const rp_gemv_job key = {s->ffn_hidden, s->kf, w->ffn_key, NULL, F, C, 0, 0.0f,
                                 RP_ACT_RELU_SQUARED};
        be->gemv_group(be, &key, 1, R);
    } else {
        /* relu^2(k) is read by the value GEMMs and the relu^2 backward only */
        if (be->gemm_only) be->gemm_only(be, s->ffn_hidden, (size_t)R * F);
        be->matmul_linear(be, s->ffn_hidden, s->kf, w->ffn_key, R, F, C, 0.0f);
        be->bias_act(be, s->ffn_hidden, NULL, R, F, RP_ACT_RELU_SQUARED);
    }
    be->matmul_linear(be, x, s->ffn_hidden, w->ffn_value, R, C, F, 1.0f);
}


/* Inference rows are exact rows (backend.h, set_decode_rows): every row of
 * a prefill gets the bits it gets alone through the f32 matrices, whatever
 * the chunk it is read in or the prompts prefilled beside it, so
 * `generate`, `serve`, `eval`, pipeline stages and a prefix-cache resume
 * agree bit for bit however they split a prompt. No threshold on the row
 * count: the CPU's decode kernel beats single-threaded sgemm from 8 to at
 * least 512 rows on the 0.1B shapes (docs/perf/serving.md), and it takes
 * longer inputs in blocks of rows. Training calls the blocks directly and
 * keeps sgemm. */
static int rows_begin(const rp_model *m, int mode) {
    if (!m->be->set_decode_rows) return 0;
    m->be->set_decode_rows(m->be, mode);
    return 1;
}

static void rows_end(const rp_model *m, int on) {
    if (on) m->be->set_decode_rows(m->be, 0);
}

/* Decode rows when every sequence has one row, prefill rows otherwise. */
static int rows_mode(const rp_batch *batch) {
    for (int s = 0; s < batch->n_seq; s++)
        if (batch->seq_len[s] != 1) return RP_ROWS_PREFILL;
    return RP_ROWS_DECODE;
}

/* (Inference callers only: training runs rp_block_forward with its saved
 * activations and keeps sgemm.) */
void rp_model_block_forward(const rp_model *m, rp_workspace *ws, int layer, rp_state *state,
                            const rp_batch *batch) {
    const int on = rows_begin(m, rows_mode(batch));
    rp_block_forward(m, &ws->acts, ws->x, ws->v_first, ws->xc, layer, state, batch);
    rows_end(m, on);
}

int rp_model_prefill_rows_exact(const rp_model *m) {
    return m->be->set_decode_rows != NULL && m->wtype == RP_WEIGHTS_F32;
}

static void model_head(const rp_model *m, rp_workspace *ws, const rp_batch *batch,
                       rp_logits_mode mode, float *logits) {
    rp_backend *be = m->be;
    const int C = m->cfg.n_embd, V = m->cfg.vocab_size;
    const float *rows = ws->x;
    int n_rows = batch->n_rows;
    if (mode == RP_LOGITS_NONE) return;
    /* A decode batch (row s is sequence s's only row) is its own gather: no
     * copies (one graph node per sequence less). */
    int gathered = mode == RP_LOGITS_LAST;
    for (int s = 0; gathered && s < batch->n_seq; s++)
        gathered = batch->seq_len[s] == 1 && batch->row_begin[s] == s;
    if (mode == RP_LOGITS_LAST && !gathered) {
        /* Gather each sequence's last row so the V x C head runs once per sequence. */
        for (int s = 0; s < batch->n_seq; s++) {
            int last = batch->row_begin[s] + batch->seq_len[s] - 1;
            be->copy(be, ws->head_rows + (size_t)s * C, ws->x + (size_t)last * C,
                     C * sizeof(float));
        }
        rows = ws->head_rows;
    }
    if (mode == RP_LOGITS_LAST) n_rows = batch->n_seq;
    be->layernorm(be, ws->head_in, NULL, NULL, rows, m->global.ln_out_weight,
                  m->global.ln_out_bias, n_rows, C, RP_LN_EPS);
    be->matmul_linear(be, logits, ws->head_in, m->global.head, n_rows, V, C, 0.0f);
}

void rp_model_head(const rp_model *m, rp_workspace *ws, const rp_batch *batch,
                   rp_logits_mode mode, float *logits) {
    const int on = rows_begin(m, rows_mode(batch));
    model_head(m, ws, batch, mode, logits);
    rows_end(m, on);
}

rp_status rp_model_forward(const rp_model *m, rp_workspace *ws, const int32_t *tokens,
                           const rp_batch *batch, rp_state *state, rp_logits_mode mode,
                           float *logits, rp_error *err) {
    if (!m->has_embed || !m->has_head || m->layer_begin != 0 ||
        m->layer_end != m->cfg.n_layer)
        return rp_error_set(err, RP_ERR_INTERNAL,
                            "rp_model_forward needs the whole model; this one owns layers "
                            "[%d, %d) of %d", m->layer_begin, m->layer_end, m->cfg.n_layer);
    if (batch->n_rows > ws->max_rows)
        return rp_error_set(err, RP_ERR_ARG, "batch has %d rows but the workspace holds %d",
                            batch->n_rows, ws->max_rows);
    if (state->layer_begin != m->layer_begin || state->layer_end != m->layer_end ||
        state->n_embd != m->cfg.n_embd)
        return rp_error_set(err, RP_ERR_ARG,
                            "state covers layers [%d, %d) with C=%d; the model needs [%d, %d) "
                            "with C=%d", state->layer_begin, state->layer_end, state->n_embd,
                            m->layer_begin, m->layer_end, m->cfg.n_embd);
    for (int s = 0; s < batch->n_seq; s++) {
        if (batch->seq_len[s] < 1)
            return rp_error_set(err, RP_ERR_ARG, "sequence %d has length %d; must be >= 1", s,
                                batch->seq_len[s]);
        if (batch->slot[s] < 0 || batch->slot[s] >= state->n_slots)
            return rp_error_set(err, RP_ERR_ARG, "sequence %d uses state slot %d of %d", s,
                                batch->slot[s], state->n_slots);
    }
    if (mode == RP_LOGITS_LAST || mode == RP_LOGITS_NONE)
        return rp_model_step(m, ws, tokens, batch, state, mode == RP_LOGITS_LAST ? logits : NULL,
                             err);
    rp_status st = rp_model_embed(m, ws, tokens, batch, err);
    if (st != RP_OK) return st;
    for (int l = m->layer_begin; l < m->layer_end; l++)
        rp_model_block_forward(m, ws, l, state, batch);
    rp_model_head(m, ws, batch, mode, logits);
    return RP_OK;
}

/* What a decode step's graph bakes in: every device pointer its ops use
 * (weights through the model, activations, state, logits) and the batch
 * size (row layout: row s is sequence s). Slots and tokens are inputs. */
typedef struct {
    const rp_model *m;
    const rp_workspace *ws;
    const float *state;
    const float *logits;
    int n_seq, layer_begin, layer_end, has_tokens;
} step_key;

rp_status rp_model_step(const rp_model *m, rp_workspace *ws, const int32_t *tokens,
                        const rp_batch *batch, rp_state *state, float *logits, rp_error *err) {
    rp_backend *be = m->be;
    int decode = be->step_begin != NULL && batch->n_rows <= ws->acts.mix_rows;
    for (int s = 0; decode && s < batch->n_seq; s++) decode = batch->seq_len[s] == 1;
    if (m->has_embed) {
        rp_status st = check_tokens(m, tokens, batch->n_rows, err);
        if (st != RP_OK) return st;
    } else {
        tokens = NULL;
    }
    if (!m->has_head) logits = NULL;
    /* One row per sequence: the rows are decode tokens, each to be computed
     * as it would be alone (backend.h, set_decode_rows); prefill rows too
     * (rows_begin). */
    const int decode_rows = rows_begin(m, rows_mode(batch));
    int replayed = 0;
    if (decode) {
        step_key key;
        memset(&key, 0, sizeof key);  /* padding too: the backend compares bytes */
        key.m = m;
        key.ws = ws;
        key.state = state->data;
        key.logits = logits;
        key.n_seq = batch->n_seq;
        key.layer_begin = m->layer_begin;
        key.layer_end = m->layer_end;
        key.has_tokens = tokens != NULL;
        replayed = be->step_begin(be, &key, sizeof key, tokens, batch);
    }
    if (!replayed) {
        if (tokens) {
            rp_status st = rp_model_embed(m, ws, tokens, batch, err);
            if (st != RP_OK) {
                if (decode) be->step_end(be);
                rows_end(m, decode_rows);
                return st;
            }
        }
        for (int l = m->layer_begin; l < m->layer_end; l++)
            rp_block_forward(m, &ws->acts, ws->x, ws->v_first, ws->xc, l, state, batch);
        if (logits) model_head(m, ws, batch, RP_LOGITS_LAST, logits);
    }
    if (decode) be->step_end(be);
    rows_end(m, decode_rows);
    return RP_OK;
}
