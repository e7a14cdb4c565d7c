/* Training forward (keeping activations) and backward of RWKV-7 (backward.h).
 * Forward and backward of each part sit side by side; the math is docs/rwkv7.md (One layer, one token),
 * the backward follows it in reverse. Buffers named d* hold gradients. */
#include <stdlib.h>
#include <string.h>

#include "model/backward.h"

#define RP_LN_EPS 1e-5f
#define RP_GN_EPS 64e-5f

static int max_lora_rank(const rp_config *c) {
    int d = c->d_decay;
    if (c->d_iclr > d) d = c->d_iclr;
    if (c->d_value > d) d = c->d_value;
    if (c->d_gate > d) d = c->d_gate;
    return d;
}

/* Carves n floats off *cursor. */
static float *carve(float **cursor, size_t n) {
    float *p = *cursor;
    *cursor += (n + 15) & ~(size_t)15;
    return p;
}

/* groupnorm + bonus/gate fused both ways (backend.h groupnorm_bonus_gate and
 * its backward): the groupnorm output o_gn (per layer) and its gradient d_gn
 * are never stored, so the workspace has neither (3 GiB at 0.4b, 8 x 4096).
 * The forward takes the fused path on groupnorm_bonus_gate alone and the
 * backward on its backward alone: with only one of them the buffers stay. */
static int fused_gn(const rp_backend *be) {
    return be->groupnorm_bonus_gate != NULL && be->groupnorm_bonus_gate_backward != NULL;
}

/* WKV7's backward adds onto dr, dk, dv itself (wkv7_backward_beta): no
 * temporaries tmp_r, tmp_k, tmp_v. */
static int wkv_beta(const rp_backend *be) { return be->wkv7_backward_beta != NULL; }

/* A one-sequence batch of n rows: what ln_mix_again_fits is asked at
 * allocation (the CUDA backend's answer depends on the row count only; a
 * batch it answers otherwise is refused by rp_backward_workspace_check_batch). */
static int mix_again_at(rp_backend *be, int n, int C) {
    int seq_len[1] = {n}, slot[1] = {0}, row_begin[1];
    rp_batch b;
    rp_batch_init(&b, 1, seq_len, slot, row_begin);
    return rp_mix_again(be, &b, C);
}

/* Rows of xa, xf, prev_att and prev_ffn a layer keeps (issue 15, "mixes
 * formed again"). Where the backend forms the mixes again for a batch of
 * max_rows rows, the workspace is made for that path: xa and xf are stored
 * only for the batches of 1..k rows it refuses (CUDA: k = RP_GEMV_MAX_M),
 * and prev holds those k rows or, on the fused path, each sequence's first
 * row at the sequence's index ([max_seqs, C]). Else every buffer is [R,C]. */
static void ln_rows_for(rp_backend *be, int C, int max_rows, int max_seqs, int *again,
                        int *ln_rows, int *prev_rows) {
    *again = mix_again_at(be, max_rows, C);
    if (!*again) {
        *ln_rows = *prev_rows = max_rows;
        return;
    }
    int k = 0;
    while (k < max_rows && !mix_again_at(be, k + 1, C)) k++;
    *ln_rows = k;
    *prev_rows = k > max_seqs ? k : max_seqs;
}

/* The saved activations a backend may keep in bf16 only (backend.h
 * store16_fits): exactly those the model hints gemm_only / wkv_only in a
 * training forward (forward.c) on this backend, so that each is written and
 * read only as bf16 above max_rows / 2 rows. */
enum {
    RP_STORE16_FFN_HIDDEN = 1u << 0, /* gemm_only before the FFN key GEMM */
    RP_STORE16_W_RAW = 1u << 1,      /* gemm_only before the w LoRA's up GEMM (with kk) */
    RP_STORE16_KK = 1u << 2,         /* wkv_only before key_prepare */
    RP_STORE16_Y = 1u << 3,          /* wkv_only before wkv7_forward_train (fused groupnorm) */
    RP_STORE16_OG = 1u << 4,         /* gemm_only before groupnorm_bonus_gate / bonus_gate_to */
    RP_STORE16_A = 1u << 5,          /* gemm_only before the a LoRA's up GEMM (with kk) */
    RP_STORE16_R = 1u << 6,          /* rkv_only before the receptance GEMM */
    RP_STORE16_K = 1u << 7,          /* rkv_only before key_prepare_from */
    RP_STORE16_V = 1u << 8,          /* rkv_only before value_residual_from */
    RP_STORE16_K_PRE = 1u << 9,      /* rkv_only before the key GEMM */
    RP_STORE16_V_PRE = 1u << 10,     /* rkv_only before the value GEMM */
    RP_STORE16_NU = 1u << 11,        /* rkv_only before the v LoRA's up GEMM */
    RP_STORE16_G = 1u << 12          /* rkv_only before the g LoRA's up GEMM */
};
#define RP_STORE16_RKV                                                                 \
    (RP_STORE16_R | RP_STORE16_K | RP_STORE16_V | RP_STORE16_K_PRE | RP_STORE16_V_PRE | \
     RP_STORE16_NU | RP_STORE16_G)

static unsigned store16_for(rp_backend *be, int max_rows) {
    if (!be->store16_fits || !be->store16_promise || !be->store16_fits(be, max_rows)) return 0;
    unsigned s = 0;
    if (be->gemm_only) s |= RP_STORE16_FFN_HIDDEN;
    if (be->gemm_only && be->wkv_only) s |= RP_STORE16_W_RAW | RP_STORE16_A;
    if (be->wkv_only) s |= RP_STORE16_KK;
    if (fused_gn(be) && be->wkv_only) s |= RP_STORE16_Y;
    if (be->gemm_only && (be->groupnorm_bonus_gate || be->bonus_gate_to)) s |= RP_STORE16_OG;
    if (rp_rkv_only_layer(be, 1)) s |= RP_STORE16_RKV;  /* every layer but 0 */
    return s;
}

/* The bits of one layer: layer 0's r, k, v stay f32 (rp_rkv_only_layer). */
static unsigned store16_layer(const rp_backend *be, unsigned store16, int layer) {
    return rp_rkv_only_layer(be, layer) ? store16 : store16 & ~(unsigned)RP_STORE16_RKV;
}

/* Floats a buffer of n values gets: n / 2 (rounded up) when stored bf16 only. */
static size_t store16_floats(size_t n, int half) { return half ? (n + 1) / 2 : n; }

/* The per-layer [R,C] buffers that may be bf16 only, with their bits. */
static unsigned store16_bit(const rp_layer_activations *a, float **slot) {
    if (slot == &a->w_raw) return RP_STORE16_W_RAW;
    if (slot == &a->kk) return RP_STORE16_KK;
    if (slot == &a->y) return RP_STORE16_Y;
    if (slot == &a->og) return RP_STORE16_OG;
    if (slot == &a->a) return RP_STORE16_A;
    if (slot == &a->r) return RP_STORE16_R;
    if (slot == &a->k) return RP_STORE16_K;
    if (slot == &a->v) return RP_STORE16_V;
    if (slot == &a->k_pre) return RP_STORE16_K_PRE;
    if (slot == &a->v_pre) return RP_STORE16_V_PRE;
    if (slot == &a->nu) return RP_STORE16_NU;
    if (slot == &a->g) return RP_STORE16_G;
    return 0;
}

static int bit_count(unsigned s) {
    int n = 0;
    for (; s; s &= s - 1) n++;
    return n;
}

static size_t layer_activation_floats(const rp_config *c, size_t R, size_t blocks, int gn_fused,
                                      size_t ln_rows, size_t prev_rows, unsigned store16) {
    size_t C = c->n_embd, H = c->n_head, pad = 16;
    const int n16 = bit_count(store16 & ~(unsigned)RP_STORE16_FFN_HIDDEN);
    return (size_t)(16 - gn_fused - n16) * (R * C + pad) +
           (size_t)n16 * (store16_floats(R * C, 1) + pad) + 2 * (ln_rows * C + pad) +
           2 * (prev_rows * C + pad) + 4 * (R + pad) + 2 * (R * H + pad) +
           R * (size_t)(c->d_decay + c->d_iclr + c->d_gate + c->d_value) + 4 * pad +
           store16_floats(R * (size_t)c->dim_ffn, (store16 & RP_STORE16_FFN_HIDDEN) != 0) + pad +
           blocks * H * 64 * 64 + pad;
}

static void bind_layer_activations(rp_layer_activations *a, float *base, const rp_config *c,
                                   size_t R, size_t blocks, int gn_fused, size_t ln_rows,
                                   size_t prev_rows, unsigned store16) {
    size_t C = c->n_embd, H = c->n_head;
    float *p = base;
    float **rc[] = {&a->x_in, &a->xa,   &a->prev_att, &a->r,     &a->k_pre, &a->k,  &a->v_pre,
                    &a->v,    &a->w_raw, &a->a,       &a->g,     &a->nu,    &a->kk, &a->y,
                    &a->og,   &a->x_mid, &a->xf,      &a->prev_ffn, &a->kf};
    for (size_t i = 0; i < sizeof rc / sizeof rc[0]; i++) {
        size_t rows = R;
        if (rc[i] == &a->xa || rc[i] == &a->xf) rows = ln_rows;
        if (rc[i] == &a->prev_att || rc[i] == &a->prev_ffn) rows = prev_rows;
        *rc[i] = rows ? carve(&p, store16_floats(rows * C, (store16 & store16_bit(a, rc[i])) != 0))
                      : NULL;
    }
    a->o_gn = gn_fused ? NULL : carve(&p, R * C);
    a->ln1_mean = carve(&p, R);
    a->ln1_rstd = carve(&p, R);
    a->ln2_mean = carve(&p, R);
    a->ln2_rstd = carve(&p, R);
    a->gn_mean = carve(&p, R * H);
    a->gn_rstd = carve(&p, R * H);
    a->w_hidden = carve(&p, R * c->d_decay);
    a->a_hidden = carve(&p, R * c->d_iclr);
    a->g_hidden = carve(&p, R * c->d_gate);
    a->nu_hidden = carve(&p, R * c->d_value);
    a->ffn_hidden = carve(&p, store16_floats(R * c->dim_ffn,
                                             (store16 & RP_STORE16_FFN_HIDDEN) != 0));
    a->wkv_checkpoints = carve(&p, blocks * H * 64 * 64);
}

/* The per-layer saved activations of tw (layer_begin/end set); 0 on failure. */
static int alloc_layer_activations(rp_backward_workspace *tw, const rp_model *m, size_t R,
                                   int max_seqs, size_t blocks, rp_error *err) {
    const int n_layers = m->layer_end - m->layer_begin;
    tw->layers = rp_calloc((size_t)n_layers + 1, sizeof *tw->layers, "activations", err);
    tw->layer_blocks = rp_calloc((size_t)n_layers + 1, sizeof(float *), "activations", err);
    if (!tw->layers || !tw->layer_blocks) return 0;
    const int gn_fused = fused_gn(m->be);
    ln_rows_for(m->be, m->cfg.n_embd, (int)R, max_seqs, &tw->mix_again, &tw->ln_rows,
                &tw->prev_rows);
    tw->store16 = store16_for(m->be, (int)R);
    for (int i = 0; i < n_layers; i++) {
        const unsigned store16 = store16_layer(m->be, tw->store16, m->layer_begin + i);
        const size_t per_layer =
            layer_activation_floats(&m->cfg, R, blocks, gn_fused, (size_t)tw->ln_rows,
                                    (size_t)tw->prev_rows, store16);
        tw->layer_blocks[i] = m->be->alloc(m->be, per_layer * sizeof(float));
        if (!tw->layer_blocks[i]) return 0;
        rp_layer_activations *a = &tw->layers[i];
        bind_layer_activations(a, tw->layer_blocks[i], &m->cfg, R, blocks, gn_fused,
                               (size_t)tw->ln_rows, (size_t)tw->prev_rows, store16);
        /* the backend refuses any f32 access past the half-sized buffers */
        const size_t RC = R * m->cfg.n_embd, RF = R * m->cfg.dim_ffn;
        float **const half[12] = {&a->w_raw, &a->kk, &a->y,     &a->og,    &a->a,  &a->r,
                                  &a->k,     &a->v,  &a->k_pre, &a->v_pre, &a->nu, &a->g};
        for (int j = 0; j < 12; j++)
            if (store16 & store16_bit(a, half[j]))
                m->be->store16_promise(m->be, *half[j], RC, store16_floats(RC, 1));
        if (store16 & RP_STORE16_FFN_HIDDEN)
            m->be->store16_promise(m->be, a->ffn_hidden, RF, store16_floats(RF, 1));
    }
    return 1;
}

/* The fused training mix (backend.h shift_mix) needs both ops. */
static int fused_mix(const rp_backend *be) {
    return be->shift_mix != NULL && be->shift_mix_backward != NULL;
}

/* Every layer forms its time-mix mixes in the workspace's shared buffers. */
static void bind_train_mixes(rp_backward_workspace *tw) {
    for (int i = 0; i < tw->layer_end - tw->layer_begin; i++)
        for (int j = 0; j < RP_MIX_MAX; j++) tw->layers[i].tmix[j] = tw->mix[j];
}

rp_status rp_backward_workspace_alloc(rp_backward_workspace *tw, const rp_model *m, int max_rows,
                                      int max_seqs, rp_error *err) {
    memset(tw, 0, sizeof *tw);
    rp_backend *be = m->be;
    const rp_config *c = &m->cfg;
    if (max_rows < 1 || max_seqs < 1 || max_seqs > max_rows)
        return rp_error_set(err, RP_ERR_ARG, "training workspace for %d rows in %d sequences: "
                            "need 1 <= sequences <= rows", max_rows, max_seqs);
    size_t R = (size_t)max_rows, C = c->n_embd, pad = 16;
    size_t blocks = R / RP_WKV_CHUNK + (size_t)max_seqs;
    int n_layers = m->layer_end - m->layer_begin;
    tw->max_rows = max_rows;
    tw->max_seqs = max_seqs;
    tw->n_embd = c->n_embd;
    tw->layer_begin = m->layer_begin;
    tw->layer_end = m->layer_end;
    tw->gn_fused = fused_gn(be);
    tw->wkv_beta = wkv_beta(be);
    if (!alloc_layer_activations(tw, m, R, max_seqs, blocks, err)) goto nomem;
    /* Shared buffers: stream, embed/head activations, backward scratch. */
    /* + the fused mix's six mixes and six more mix gradients (dxc is the seventh) */
    const int n_fused = fused_mix(be) ? RP_MIX_MAX + RP_MIX_TERMS_MAX - 1 : 0;
    const int n_unfused = (tw->gn_fused ? 0 : 1) + (tw->wkv_beta ? 0 : 3);
    size_t n_rc = 2 + 18 + (size_t)n_unfused + (size_t)n_fused + (m->has_embed ? 1 : 0) + (m->has_head ? 2 : 0);
    /* The head's logits one row chunk at a time, sized by the backend's
     * budget (backend.h head_ce_chunk_floats): at V = 65536 the CPU's 1024
     * rows (256 MiB), CUDA's 4096 (1 GiB), instead of R x V floats. */
    const int chunk = rp_head_ce_chunk_rows_for(be, max_rows, c->vocab_size);
    size_t floats = n_rc * (R * C + pad) + 6 * (R + pad) + R * (size_t)max_lora_rank(c) + pad +
                    R * (size_t)c->dim_ffn + pad +
                    (m->has_head ? rp_head_ce_scratch_floats(chunk, c->vocab_size) + pad : 0);
    tw->scratch_base = be->alloc(be, floats * sizeof(float));
    if (!tw->scratch_base) goto nomem;
    float *p = tw->scratch_base;
    float **rc[] = {&tw->x,   &tw->v_first, &tw->dx,   &tw->dv_first, &tw->dprev, &tw->dxa,
                    &tw->dxc, &tw->xc,      &tw->dr,   &tw->dk,       &tw->dv,    &tw->dkk,
                    &tw->da,  &tw->dw_raw,  &tw->dg,   &tw->dnu,      &tw->d_og,  &tw->dy};
    for (size_t i = 0; i < sizeof rc / sizeof rc[0]; i++) *rc[i] = carve(&p, R * C);
    if (!tw->gn_fused) tw->d_gn = carve(&p, R * C);
    if (!tw->wkv_beta) {
        tw->tmp_r = carve(&p, R * C);
        tw->tmp_k = carve(&p, R * C);
        tw->tmp_v = carve(&p, R * C);
    }
    if (n_fused) {
        for (int j = 0; j < RP_MIX_MAX; j++) tw->mix[j] = carve(&p, R * C);
        tw->dmix[0] = tw->dxc;
        for (int j = 1; j < RP_MIX_TERMS_MAX; j++) tw->dmix[j] = carve(&p, R * C);
        bind_train_mixes(tw);
    }
    tw->d_lora = carve(&p, R * max_lora_rank(c));
    tw->d_ffn = carve(&p, R * c->dim_ffn);
    if (m->has_embed) {
        tw->emb_rows = carve(&p, R * C);
        tw->ln0_mean = carve(&p, R);
        tw->ln0_rstd = carve(&p, R);
    }
    if (m->has_head) {
        tw->x_final = carve(&p, R * C);
        tw->head_in = carve(&p, R * C);
        tw->lnout_mean = carve(&p, R);
        tw->lnout_rstd = carve(&p, R);
        tw->losses = carve(&p, R);
        tw->head_scratch = carve(&p, rp_head_ce_scratch_floats(chunk, c->vocab_size));
        tw->head_chunk_rows = chunk;
        tw->host_base = malloc(R * sizeof(float));
        if (!tw->host_base) goto nomem;
        tw->host_losses = tw->host_base;
    }
    /* The backend's own op scratch for these shapes (ops allocate nothing). */
    rp_status st = be->reserve(be, max_rows, max_seqs, c->n_embd, c->head_size, err);
    if (st != RP_OK) {
        rp_backward_workspace_free(tw, be);
        return st;
    }
    return RP_OK;
nomem:
    rp_backward_workspace_free(tw, be);
    return rp_error_set(err, RP_ERR_NOMEM,
                        "cannot allocate training activations for %d rows x %d layers (C=%d)",
                        max_rows, n_layers, c->n_embd);
}

rp_status rp_backward_workspace_alloc_stash(rp_backward_workspace *tw, const rp_model *m,
                                            int max_rows, int max_seqs,
                                            const rp_backward_workspace *share, rp_error *err) {
    memset(tw, 0, sizeof *tw);
    rp_backend *be = m->be;
    const rp_config *c = &m->cfg;
    if (max_rows < 1 || max_seqs < 1 || max_seqs > max_rows || max_rows > share->max_rows ||
        max_seqs > share->max_seqs)
        return rp_error_set(err, RP_ERR_ARG, "stash slot for %d rows in %d sequences does not fit "
                            "the shared workspace", max_rows, max_seqs);
    /* Everything shared first, then this slot's own buffers on top. */
    *tw = *share;
    tw->scratch_base = NULL;
    tw->host_base = NULL;
    tw->layers = NULL;
    tw->layer_blocks = NULL;
    size_t R = (size_t)max_rows, C = c->n_embd, pad = 16;
    size_t blocks = R / RP_WKV_CHUNK + (size_t)max_seqs;
    int n_layers = m->layer_end - m->layer_begin;
    if (!alloc_layer_activations(tw, m, R, max_seqs, blocks, err)) goto nomem;
    if (tw->mix[0]) bind_train_mixes(tw);  /* the shared mixes of `share` */
    size_t floats = 5 * (R * C + pad) + 2 * (R + pad);
    tw->own_base = be->alloc(be, floats * sizeof(float));
    if (!tw->own_base) goto nomem;
    float *p = tw->own_base;
    tw->x = carve(&p, R * C);
    tw->v_first = carve(&p, R * C);
    tw->dx = carve(&p, R * C);
    tw->dv_first = carve(&p, R * C);
    if (m->has_embed) {
        tw->emb_rows = carve(&p, R * C);
        tw->ln0_mean = carve(&p, R);
        tw->ln0_rstd = carve(&p, R);
    }
    return RP_OK;
nomem:
    rp_backward_workspace_free(tw, be);
    return rp_error_set(err, RP_ERR_NOMEM,
                        "cannot allocate a stash slot for %d rows x %d layers (C=%d)", max_rows,
                        n_layers, c->n_embd);
}

void rp_backward_workspace_free(rp_backward_workspace *tw, rp_backend *be) {
    if (tw->layer_blocks)
        for (int i = 0; i < tw->layer_end - tw->layer_begin; i++)
            if (tw->layer_blocks[i]) be->free(be, tw->layer_blocks[i]);
    if (tw->scratch_base) be->free(be, tw->scratch_base);
    if (tw->own_base) be->free(be, tw->own_base);
    if (tw->dstate_data) be->free(be, tw->dstate_data);
    free(tw->host_base);
    free(tw->layer_blocks);
    free(tw->layers);
    memset(tw, 0, sizeof *tw);
}

void rp_model_zero(rp_model *g) {
    rp_backend *be = g->be;
    for (int i = 0; i < g->layer_end - g->layer_begin; i++)
        be->fill_zero(be, g->layer_flat[i], g->layer_floats * sizeof(float));
    if (g->embed_flat) be->fill_zero(be, g->embed_flat, g->embed_floats * sizeof(float));
    if (g->head_flat) be->fill_zero(be, g->head_flat, g->head_floats * sizeof(float));
}

/* ---- embedding ---- */

rp_status rp_backward_embed_forward(const rp_model *m, rp_backward_workspace *tw,
                                    const int32_t *tokens, const rp_batch *batch, rp_error *err) {
    rp_backend *be = m->be;
    const int R = batch->n_rows, C = m->cfg.n_embd;
    if (!m->has_embed) return rp_error_set(err, RP_ERR_INTERNAL, "stage has no embedding");
    for (int i = 0; i < R; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size)
            return rp_error_set(err, RP_ERR_ARG,
                                "token id %d at position %d is outside the vocabulary [0, %d)",
                                tokens[i], i, m->cfg.vocab_size);
    be->embedding(be, tw->emb_rows, m->global.emb, tokens, R, C);
    be->layernorm(be, tw->x, tw->ln0_mean, tw->ln0_rstd, tw->emb_rows, m->global.ln0_weight,
                  m->global.ln0_bias, R, C, RP_LN_EPS);
    return RP_OK;
}

void rp_backward_embed_backward(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                                const int32_t *tokens, const rp_batch *batch) {
    rp_backend *be = m->be;
    const int R = batch->n_rows, C = m->cfg.n_embd;
    be->layernorm_backward_beta(be, tw->dxa, grads->global.ln0_weight, grads->global.ln0_bias,
                                tw->dx, tw->emb_rows, tw->ln0_mean, tw->ln0_rstd,
                                m->global.ln0_weight, R, C, 0.0f);
    be->embedding_backward(be, grads->global.emb, tw->dxa, tokens, R, C);
}

/* ---- LoRA: y = act(x w1) w2 ---- */

/* dy [R,C] (d of the LoRA output) -> dw1, dw2 += ..., dx [R,C] overwritten.
 * d_hidden is GEMM-only (backend.h gemm_only): the up GEMM's dX, the
 * activation's backward in place (no bias gradient), the down GEMM's dY. */
static void lora_backward(rp_backend *be, float *dx, float *dw1, float *dw2, float *d_hidden,
                          const float *dy, const float *x, const float *hidden,
                          const float *w1, const float *w2, int D, rp_activation inner, int R,
                          int C, int dx16) {
    if (be->gemm_only) be->gemm_only(be, d_hidden, (size_t)R * D);
    be->matmul_lora_backward_beta(be, d_hidden, dw2, dy, hidden, w2, R, C, D, 0.0f);
    if (inner != RP_ACT_NONE) be->bias_act_backward(be, d_hidden, NULL, hidden, R, D, inner);
    /* dx16: dx is a mix gradient only shift_mix_ln_backward reads (bf16) */
    if (dx16) be->gemm_only(be, dx, (size_t)R * C);
    be->matmul_lora_backward_beta(be, dx, dw1, d_hidden, x, w1, R, D, C, 0.0f);
}

/* ---- block ---- */

void rp_backward_block_forward(const rp_model *m, rp_backward_workspace *tw, int layer,
                               rp_state *state, const rp_batch *batch) {
    rp_block_forward(m, &tw->layers[layer - m->layer_begin], tw->x, tw->v_first, tw->xc, layer,
                     state, batch);
}

/* One of the six token-shift mixes of the time mix: recompute x_c into tw->xc
 * (for the weight gradient), run its consumer's backward into tw->dxc, then
 * fold d(x_c) into dxa / dprev / dmu; beta 0 for the first of the six. */
static void mix_backward(rp_backend *be, rp_backward_workspace *tw, const rp_layer_activations *s,
                         const float *mu, float *dmu, int R, int C, float beta) {
    be->lerp_backward_beta(be, tw->dxa, tw->dprev, dmu, tw->dxc, s->xa, s->prev_att, mu, R, C,
                           beta);
}

size_t rp_backward_wsave_floats(const rp_config *c, int rows) {
    return (size_t)rows * (5 * (size_t)c->n_embd + (size_t)c->dim_ffn);
}

/* The layout of one layer's saved output gradients for BWD_W. */
typedef struct {
    float *dx_out, *d_ffn, *dx_mid, *dv, *dk, *dr;
} wsave_parts;

static wsave_parts wsave_bind(float *base, const rp_config *c, int R) {
    const size_t rc = (size_t)R * c->n_embd;
    wsave_parts p;
    p.dx_out = base;
    p.d_ffn = base + rc;
    p.dx_mid = p.d_ffn + (size_t)R * c->dim_ffn;
    p.dv = p.dx_mid + rc;
    p.dk = p.dv + rc;
    p.dr = p.dk + rc;
    return p;
}

/* wsave NULL: the whole backward. Else the input-gradient part (BWD_B):
 * the six large matrices' GEMMs compute d(input) only (dw NULL) and their
 * output gradients are copied into wsave for rp_backward_block_backward_w;
 * every other gradient is accumulated here as in the whole backward. */
static void block_backward(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                           int layer, rp_state *dstate, const rp_batch *batch, float *wsave) {
    rp_backend *be = m->be;
    const rp_config *c = &m->cfg;
    const int li = layer - m->layer_begin;
    const rp_layer_weights *w = &m->layers[li];
    rp_layer_weights *gw = &grads->layers[li];
    const rp_layer_activations *s = &tw->layers[li];
    const int R = batch->n_rows, C = c->n_embd, N = c->head_size, F = c->dim_ffn;
    float *datt = rp_state_att_x_prev(dstate, 0, layer);
    float *dwkv = rp_state_wkv(dstate, 0, layer);
    float *dffn = rp_state_ffn_x_prev(dstate, 0, layer);
    const size_t dstride = dstate->floats_per_slot;

    const size_t rc_bytes = (size_t)R * C * sizeof(float);
    const wsave_parts ws = wsave ? wsave_bind(wsave, c, R) : (wsave_parts){0};
    /* ---- channel mix: x_out = x_mid + Wv relu(Wk kf)^2; tw->dx = d x_out ---- */
    /* Each first write of a scratch gradient in the step overwrites (beta 0):
     * no fill_zero before it. */
    if (wsave) be->copy(be, ws.dx_out, tw->dx, rc_bytes);
    /* d_ffn is GEMM-only (the value GEMM's dX, relu^2's backward in place,
     * the key GEMM's dY), except that BWD_B copies it for BWD_W */
    if (!wsave && be->gemm_only) be->gemm_only(be, tw->d_ffn, (size_t)R * F);
    be->matmul_linear_backward_beta(be, tw->d_ffn, wsave ? NULL : gw->ffn_value, tw->dx,
                                    s->ffn_hidden, w->ffn_value, R, C, F, 0.0f);
    be->bias_act_backward(be, tw->d_ffn, NULL, s->ffn_hidden, R, F, RP_ACT_RELU_SQUARED);
    if (wsave) be->copy(be, ws.d_ffn, tw->d_ffn, (size_t)R * F * sizeof(float));
    /* the key mix's gradient: bf16 in place where shift_mix_ln_backward
     * forms xf again and reads bf16 dmix (mixes formed again, issue 15) */
    if (rp_mix_again(be, batch, C) && be->mix_grads16 && be->gemm_only)
        be->gemm_only(be, tw->dxc, (size_t)R * C);
    be->matmul_linear_backward_beta(be, tw->dxc, wsave ? NULL : gw->ffn_key, tw->d_ffn, s->kf,
                                    w->ffn_key, R, F, C, 0.0f);
    /* the mix's backward and ln2's: one op when the backend fuses them (the
     * d(ln2 out) is then never stored) */
    float *dmu_k[1] = {gw->ffn_x_k};
    const float *dmix_k[1] = {tw->dxc}, *mu_k[1] = {w->ffn_x_k};
    if (be->shift_mix_backward && be->shift_mix_ln_backward) {
        /* xf NULL: formed again from x_mid (the forward did not store it) */
        const float *xf = rp_mix_again(be, batch, C) ? NULL : s->xf;
        be->shift_mix_ln_backward(be, tw->dx, gw->ln2_weight, gw->ln2_bias, tw->dxa, tw->dprev,
                                  dmu_k, dmix_k, mu_k, 1, xf, s->prev_ffn, dffn, dstride,
                                  s->x_mid, s->ln2_mean, s->ln2_rstd, w->ln2_weight,
                                  w->ln2_bias, batch, C);
    } else {
        if (be->shift_mix_backward) {
            be->shift_mix_backward(be, tw->dxa, tw->dprev, dmu_k, dmix_k, mu_k, 1, s->xf,
                                   s->prev_ffn, dffn, dstride, batch, C);
        } else {
            be->lerp_backward_beta(be, tw->dxa, tw->dprev, gw->ffn_x_k, tw->dxc, s->xf,
                                   s->prev_ffn, w->ffn_x_k, R, C, 0.0f);
            be->token_shift_backward(be, tw->dxa, dffn, dstride, tw->dprev, batch, C);
        }
        be->layernorm_backward(be, tw->dx, gw->ln2_weight, gw->ln2_bias, tw->dxa, s->x_mid,
                               s->ln2_mean, s->ln2_rstd, w->ln2_weight, R, C);
    }

    /* ---- time mix: x_mid = x_in + Wo og; tw->dx = d x_mid ---- */
    /* With the backend's fused mix (tw->mix set) the six mixes are formed
     * again in one op, each use's gradient goes to its own dmix[j] and one
     * op folds them all into dxa, dprev, the dmu and the state gradient at
     * the end, in the order the unfused path folds them (g a w v(nu) v k r)
     * - the same bits. Else each mix is formed in xc just before its use and
     * folded right after it. */
    const int fused = tw->mix[0] != NULL;
    const float *mu[RP_MIX_MAX] = {w->x_r, w->x_k, w->x_v, w->x_w, w->x_a, w->x_g};
    float *gmu[RP_MIX_MAX] = {gw->x_r, gw->x_k, gw->x_v, gw->x_w, gw->x_a, gw->x_g};
    const float *term_mu[RP_MIX_TERMS_MAX];
    float *term_dmu[RP_MIX_TERMS_MAX];
    int n_terms = 0;
    /* (before bonus/gate's backward: its bf16 copy of dg, below, stays a
     * GEMM operand) */
    const int again = fused && rp_mix_again(be, batch, C);
    if (again)
        be->ln_mix_again(be, tw->mix, mu, RP_MIX_MAX, s->prev_att, s->x_in, s->ln1_mean,
                         s->ln1_rstd, w->ln1_weight, w->ln1_bias, batch, C);
    else if (fused)
        be->shift_mix(be, s->prev_att, tw->mix, mu, RP_MIX_MAX, s->xa, NULL, 0, batch, C);
    if (wsave) be->copy(be, ws.dx_mid, tw->dx, rc_bytes);
    /* fused: groupnorm's backward too (its input's gradient dy, its
     * parameters'), from y, gn_mean, gn_rstd: d_gn and o_gn never stored */
    const int gn_fused = be->groupnorm_bonus_gate_backward != NULL;
    /* d og: the fused groupnorm backward alone reads it (backend.h
     * gemm_only; bf16 in place on CUDA) */
    if (gn_fused && be->gemm_only) be->gemm_only(be, tw->d_og, (size_t)R * C);
    be->matmul_linear_backward_beta(be, tw->d_og, wsave ? NULL : gw->output, tw->dx, s->og,
                                    w->output, R, C, C, 0.0f);
    /* its dy is read by the WKV7 backward alone (bf16 on CUDA), its dg by
     * the gate LoRA's backward GEMMs alone (below) */
    if (gn_fused && be->wkv_only) be->wkv_only(be, tw->dy, (size_t)R * C);
    if (gn_fused && be->gemm_only) be->gemm_only(be, tw->dg, (size_t)R * C);
    /* its dr, dk, dv: the WKV7 backward adds onto them, then only dr's GEMM
     * and the fused tail (dk, dv; its new dk, dv their GEMMs alone) read
     * them, unless the W pass copies them (bf16 in place on CUDA, where r,
     * k, v are: past layer 0) */
    if (gn_fused && !wsave && be->drkv_only && wkv_beta(be) && be->attention_tail_backward &&
        rp_rkv_only_layer(be, layer))
        be->drkv_only(be, tw->dr, tw->dk, tw->dv, (size_t)R * C);
    if (gn_fused)
        be->groupnorm_bonus_gate_backward(be, tw->dy, gw->ln_x_weight, gw->ln_x_bias, tw->dr,
                                          tw->dk, tw->dv, gw->r_k, tw->dg, tw->d_og, s->y,
                                          s->gn_mean, s->gn_rstd, w->ln_x_weight, w->ln_x_bias,
                                          s->r, s->k, s->v, w->r_k, s->g, R, C, N, 0.0f);
    else
        be->bonus_gate_backward_beta(be, tw->d_gn, tw->dr, tw->dk, tw->dv, gw->r_k, tw->dg,
                                     tw->d_og, s->o_gn, s->r, s->k, s->v, w->r_k, s->g, R, C, N,
                                     0.0f);
    /* The mix of slot i as a GEMM operand, and where its use's gradient goes. */
#define MIX_X(i) (fused ? tw->mix[i] : (be->lerp(be, tw->xc, s->xa, s->prev_att, mu[i], R, C), tw->xc))
#define MIX_DX() (fused ? tw->dmix[n_terms] : tw->dxc)
    /* each term's gradient is one GEMM's output (beta 0), read only by
     * shift_mix_ln_backward: bf16 in place where that op forms xa again */
    const int d16 = again && be->mix_grads16 && be->gemm_only;
#define MIX_DX16(slot) (d16 ? be->gemm_only(be, tw->dmix[slot], (size_t)R * C) : (void)0)
#define MIX_FOLD(i, beta)                                                                 \
    do {                                                                                  \
        if (fused) {                                                                      \
            term_mu[n_terms] = mu[i];                                                     \
            term_dmu[n_terms++] = gmu[i];                                                 \
        } else {                                                                          \
            mix_backward(be, tw, s, mu[i], gmu[i], R, C, beta);                           \
        }                                                                                 \
    } while (0)
    /* gate: g = sigmoid(xg g1) g2; its mix is the first write of dxa and dprev.
     * Right after bonus/gate, which wrote dg: a GPU backend's bf16 copy of dg
     * (its GEMMs' operand) is still valid here; no op below reads dxa, dprev
     * or the gate's gradients before the other mixes add to them. */
    const float *xm = MIX_X(5);
    lora_backward(be, MIX_DX(), gw->g1, gw->g2, tw->d_lora, tw->dg, xm, s->g_hidden, w->g1,
                  w->g2, c->d_gate, RP_ACT_SIGMOID, R, C, d16);
    MIX_FOLD(5, 0.0f);
    if (!gn_fused)
        be->groupnorm_backward(be, tw->dy, gw->ln_x_weight, gw->ln_x_bias, tw->d_gn, s->y,
                               s->gn_mean, s->gn_rstd, w->ln_x_weight, R, C, N);
    /* WKV7's dr, dk, dv add onto bonus_gate's: in the op (beta 1) when the
     * backend can, else through temporaries (same bits either way) */
    /* only key_prepare_backward reads dkk (bf16 on CUDA) */
    if (be->wkv_only) be->wkv_only(be, tw->dkk, (size_t)R * C);
    /* dw_raw: w0's bias_act_backward (RP_ACT_NONE: it only sums the bias
     * gradient) and the w LoRA's GEMMs alone read it, so the WKV7 backward
     * may write it as their operand (bf16 on CUDA); the hint before the
     * bias_act_backward below stays (that op consumes it either way) */
    if (be->gemm_only) be->gemm_only(be, tw->dw_raw, (size_t)R * C);
    /* dr, complete after this op, is read only by the receptance GEMM
     * backward right after it where the mixes are fused (below), unless the
     * W pass copies it: GEMM-only too (the op takes both hints) */
    if (fused && !wsave && be->gemm_only && be->wkv7_backward_beta)
        be->gemm_only(be, tw->dr, (size_t)R * C);
    /* da: the fused tail alone reads it, and writes a's d pre over it in
     * place (bf16 on CUDA, as dw_raw) */
    if (be->attention_tail_backward && be->rkv_only && be->wkv7_backward_beta)
        be->rkv_only(be, tw->da, (size_t)R * C);
    if (be->wkv7_backward_beta) {
        be->wkv7_backward_beta(be, tw->dr, tw->dw_raw, tw->dk, tw->dv, tw->dkk, tw->da, dwkv,
                               dstride, tw->dy, s->r, s->w_raw, s->k, s->v, s->kk, s->a,
                               s->wkv_checkpoints, batch, C, N, 1.0f);
    } else {
        be->wkv7_backward(be, tw->tmp_r, tw->dw_raw, tw->tmp_k, tw->tmp_v, tw->dkk, tw->da,
                          dwkv, dstride, tw->dy, s->r, s->w_raw, s->k, s->v, s->kk, s->a,
                          s->wkv_checkpoints, batch, C, N);
        be->add(be, tw->dr, tw->tmp_r, (size_t)R * C);
        be->add(be, tw->dk, tw->tmp_k, (size_t)R * C);
        be->add(be, tw->dv, tw->tmp_v, (size_t)R * C);
    }
    /* With the mixes fused, the receptance GEMM backward runs here, right
     * after the op that completes dr (a GPU backend's bf16 copy of dr, its
     * dY, is valid here and not after the LoRA backwards); its d mix goes to
     * the term slot it has below (g a w [nu] v k r), so the fold and the
     * bits are those of the late GEMM. BWD_B copies dr below as before. */
    const int r_early = fused;
    if (r_early) MIX_DX16(n_terms + 4 + (layer != 0));
    if (r_early)
        be->matmul_linear_backward_beta(be, tw->dmix[n_terms + 4 + (layer != 0)],
                                        wsave ? NULL : gw->receptance, tw->dr, tw->mix[0],
                                        w->receptance, R, C, C, 0.0f);
    /* the elementwise tail (key prepare, the three biases' activations, the
     * value residual) in one pass when the backend fuses it, else as its
     * separate ops: the same bits. Here, before the a, w and v LoRAs'
     * backwards, which read its d pre (da, dw_raw, dnu: GEMM-only from here
     * on) and write nothing it reads or writes. dk and dv are GEMM-only too
     * (their GEMM backwards' dY) unless the W pass copies them below. */
    rp_attention_tail_backward_fn *tail = be->attention_tail_backward
                                              ? be->attention_tail_backward
                                              : rp_attention_tail_backward_separate;
    tail(be, tw->dk, tw->da, tw->dw_raw, tw->dv, tw->dv_first, tw->dnu, gw->k_k, gw->k_a,
         gw->a0, gw->w0, gw->v0, tw->dkk, s->k_pre, s->a, s->v_pre, tw->v_first,
         layer == 0 ? NULL : s->nu, w->k_k, w->k_a, R, C, N, wsave == NULL);
    /* a = sigmoid(a0 + xa a1 a2) */
    xm = MIX_X(4);
    lora_backward(be, MIX_DX(), gw->a1, gw->a2, tw->d_lora, tw->da, xm, s->a_hidden, w->a1,
                  w->a2, c->d_iclr, RP_ACT_NONE, R, C, d16);
    MIX_FOLD(4, 1.0f);
    /* w_raw = w0 + tanh(xw w1) w2 */
    xm = MIX_X(3);
    lora_backward(be, MIX_DX(), gw->w1, gw->w2, tw->d_lora, tw->dw_raw, xm, s->w_hidden,
                  w->w1, w->w2, c->d_decay, RP_ACT_TANH, R, C, d16);
    MIX_FOLD(3, 1.0f);
    /* value residual: v = v_pre + (v_first - v_pre) nu (layer > 0); layer 0's
     * v is v_first, which collected gradient from every later layer. */
    xm = MIX_X(2);
    if (layer != 0) {
        lora_backward(be, MIX_DX(), gw->v1, gw->v2, tw->d_lora, tw->dnu, xm, s->nu_hidden,
                      w->v1, w->v2, c->d_value, RP_ACT_NONE, R, C, d16);
        MIX_FOLD(2, 1.0f);
    }
    /* r, k, v projections */
    if (wsave) {
        be->copy(be, ws.dv, tw->dv, rc_bytes);
        be->copy(be, ws.dk, tw->dk, rc_bytes);
        be->copy(be, ws.dr, tw->dr, rc_bytes);
    }
    MIX_DX16(n_terms);
    be->matmul_linear_backward_beta(be, MIX_DX(), wsave ? NULL : gw->value, tw->dv, xm,
                                    w->value, R, C, C, 0.0f);
    MIX_FOLD(2, 1.0f);
    xm = MIX_X(1);
    MIX_DX16(n_terms);
    be->matmul_linear_backward_beta(be, MIX_DX(), wsave ? NULL : gw->key, tw->dk, xm, w->key,
                                    R, C, C, 0.0f);
    MIX_FOLD(1, 1.0f);
    if (!r_early) {
        xm = MIX_X(0);
        MIX_DX16(n_terms);
        be->matmul_linear_backward_beta(be, MIX_DX(), wsave ? NULL : gw->receptance, tw->dr, xm,
                                        w->receptance, R, C, C, 0.0f);
    }
    MIX_FOLD(0, 1.0f);
#undef MIX_X
#undef MIX_DX
#undef MIX_DX16
#undef MIX_FOLD
    /* token shift (with every mix's fold, when fused) and ln1, in one op
     * when the backend fuses the mix's backward with ln1's */
    if (fused && be->shift_mix_ln_backward) {
        be->shift_mix_ln_backward(be, tw->dx, gw->ln1_weight, gw->ln1_bias, tw->dxa, tw->dprev,
                                  term_dmu, (const float *const *)tw->dmix, term_mu, n_terms,
                                  again ? NULL : s->xa, s->prev_att, datt, dstride, s->x_in,
                                  s->ln1_mean, s->ln1_rstd, w->ln1_weight, w->ln1_bias, batch,
                                  C);
        return;
    }
    if (fused)
        be->shift_mix_backward(be, tw->dxa, tw->dprev, term_dmu, (const float *const *)tw->dmix,
                               term_mu, n_terms, s->xa, s->prev_att, datt, dstride, batch, C);
    else
        be->token_shift_backward(be, tw->dxa, datt, dstride, tw->dprev, batch, C);
    be->layernorm_backward(be, tw->dx, gw->ln1_weight, gw->ln1_bias, tw->dxa, s->x_in,
                           s->ln1_mean, s->ln1_rstd, w->ln1_weight, R, C);
}

void rp_backward_block_backward(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                                int layer, rp_state *dstate, const rp_batch *batch) {
    block_backward(m, grads, tw, layer, dstate, batch, NULL);
}

void rp_backward_block_backward_b(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                                  int layer, rp_state *dstate, const rp_batch *batch,
                                  float *wsave) {
    block_backward(m, grads, tw, layer, dstate, batch, wsave);
}

/* The same GEMM calls as the whole backward's, with dx NULL: each weight
 * gradient gets the same bits added in the same order of micro-batches. */
void rp_backward_block_backward_w(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                                  int layer, const rp_batch *batch, const float *wsave) {
    rp_backend *be = m->be;
    const rp_config *c = &m->cfg;
    const int li = layer - m->layer_begin;
    const rp_layer_weights *w = &m->layers[li];
    rp_layer_weights *gw = &grads->layers[li];
    const rp_layer_activations *s = &tw->layers[li];
    const int R = batch->n_rows, C = c->n_embd, F = c->dim_ffn;
    const wsave_parts ws = wsave_bind((float *)wsave, c, R);
    be->matmul_linear_backward_beta(be, NULL, gw->ffn_value, ws.dx_out, s->ffn_hidden,
                                    w->ffn_value, R, C, F, 0.0f);
    be->matmul_linear_backward_beta(be, NULL, gw->ffn_key, ws.d_ffn, s->kf, w->ffn_key, R, F, C,
                                    0.0f);
    be->matmul_linear_backward_beta(be, NULL, gw->output, ws.dx_mid, s->og, w->output, R, C, C,
                                    0.0f);
    /* v, k, r mixes: lerps of the stored xa, or (xa not stored) formed again
     * in one op into the workspace's mix buffers, the same bits */
    const float *xv = tw->xc, *xk = tw->xc, *xr = tw->xc;
    const int again = tw->mix[0] && rp_mix_again(be, batch, C);
    if (again) {
        const float *mu3[3] = {w->x_v, w->x_k, w->x_r};
        be->ln_mix_again(be, tw->mix, mu3, 3, s->prev_att, s->x_in, s->ln1_mean, s->ln1_rstd,
                         w->ln1_weight, w->ln1_bias, batch, C);
        xv = tw->mix[0];
        xk = tw->mix[1];
        xr = tw->mix[2];
    }
    if (!again) be->lerp(be, tw->xc, s->xa, s->prev_att, w->x_v, R, C);
    be->matmul_linear_backward_beta(be, NULL, gw->value, ws.dv, xv, w->value, R, C, C, 0.0f);
    if (!again) be->lerp(be, tw->xc, s->xa, s->prev_att, w->x_k, R, C);
    be->matmul_linear_backward_beta(be, NULL, gw->key, ws.dk, xk, w->key, R, C, C, 0.0f);
    if (!again) be->lerp(be, tw->xc, s->xa, s->prev_att, w->x_r, R, C);
    be->matmul_linear_backward_beta(be, NULL, gw->receptance, ws.dr, xr, w->receptance, R, C,
                                    C, 0.0f);
}

/* ---- head + loss ---- */

double rp_backward_head(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                        const int32_t *targets, const rp_batch *batch, float loss_scale,
                        float l2wrap_factor) {
    rp_backend *be = m->be;
    const int R = batch->n_rows, C = m->cfg.n_embd, V = m->cfg.vocab_size;
    be->copy(be, tw->x_final, tw->x, (size_t)R * C * sizeof(float));
    /* only the head's GEMMs read head_in (its layernorm backward reads x_final) */
    if (be->gemm_only) be->gemm_only(be, tw->head_in, (size_t)R * C);
    be->layernorm(be, tw->head_in, tw->lnout_mean, tw->lnout_rstd, tw->x,
                  m->global.ln_out_weight, m->global.ln_out_bias, R, C, RP_LN_EPS);
    /* d v_first's zeros first: on a GPU backend a fill ends the bf16 copies
     * of activations, and the layernorm backward's copy of dx below is the
     * top layer's first GEMM operand */
    be->fill_zero(be, tw->dv_first, (size_t)R * C * sizeof(float));
    /* losses, d(head_in) into dxa (overwrite), d head += */
    be->head_cross_entropy(be, tw->losses, tw->dxa, grads->global.head, tw->head_scratch,
                           tw->head_in, m->global.head, targets, R, C, V, loss_scale,
                           l2wrap_factor, tw->head_chunk_rows);
    be->layernorm_backward_beta(be, tw->dx, grads->global.ln_out_weight,
                                grads->global.ln_out_bias, tw->dxa, tw->x_final, tw->lnout_mean,
                                tw->lnout_rstd, m->global.ln_out_weight, R, C, 0.0f);
    /* Host buffer from the workspace: nothing allocated per micro-batch. */
    float *losses = tw->host_losses;
    be->copy_to_host(be, losses, tw->losses, (size_t)R * sizeof(float));
    double sum = 0;
    for (int i = 0; i < R; i++)
        if (targets[i] >= 0) sum += losses[i];
    return sum;
}

rp_status rp_backward_workspace_check(const rp_backward_workspace *tw, const rp_backend *be,
                                      rp_error *err) {
    if (tw->gn_fused && !fused_gn(be))
        return rp_error_set(err, RP_ERR_ARG,
                            "the training workspace was allocated for fused groupnorm + "
                            "bonus/gate (no o_gn, d_gn) but the backend now lacks "
                            "groupnorm_bonus_gate or its backward: reallocate the workspace");
    if (tw->wkv_beta && !wkv_beta(be))
        return rp_error_set(err, RP_ERR_ARG,
                            "the training workspace was allocated for wkv7_backward_beta (no "
                            "tmp_r, tmp_k, tmp_v) but the backend now lacks it: reallocate "
                            "the workspace");
    if (tw->store16 && (store16_for((rp_backend *)be, tw->max_rows) & tw->store16) != tw->store16)
        return rp_error_set(err, RP_ERR_ARG,
                            "the training workspace was allocated with activations stored in "
                            "bf16 only (half-sized buffers, backend.h store16_fits) but the "
                            "backend no longer promises that storage for %d rows (bf16 copies "
                            "switched off?): reallocate the workspace",
                            tw->max_rows);
    if (tw->mix_again && !mix_again_at((rp_backend *)be, tw->max_rows, tw->n_embd))
        return rp_error_set(err, RP_ERR_ARG,
                            "the training workspace was allocated for the mixes formed again "
                            "(xa, xf stored for batches of up to %d rows only) but the backend "
                            "now does not form them for %d rows: reallocate the workspace",
                            tw->ln_rows, tw->max_rows);
    return RP_OK;
}

rp_status rp_backward_workspace_check_batch(const rp_backward_workspace *tw, rp_backend *be,
                                            const rp_batch *batch, rp_error *err) {
    if (batch->n_rows > tw->max_rows || batch->n_seq > tw->max_seqs)
        return rp_error_set(err, RP_ERR_ARG,
                            "batch of %d rows in %d sequences exceeds the training workspace "
                            "(%d rows, %d sequences)", batch->n_rows, batch->n_seq, tw->max_rows,
                            tw->max_seqs);
    if (!rp_mix_again(be, batch, tw->n_embd) && batch->n_rows > tw->ln_rows)
        return rp_error_set(err, RP_ERR_ARG,
                            "batch of %d rows in %d sequences: the backend stores xa / prev "
                            "for it, but the training workspace keeps them for at most %d rows "
                            "(allocated for the mixes formed again): reallocate the workspace "
                            "for this backend or use batches the backend forms again",
                            batch->n_rows, batch->n_seq, tw->ln_rows);
    return RP_OK;
}

rp_status rp_model_train_step(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                              const int32_t *inputs, const int32_t *targets,
                              const rp_batch *batch, rp_state *state, rp_state *dstate,
                              float loss_scale, float l2wrap_factor, double *loss_sum,
                              int *n_targets, rp_error *err) {
    if (!m->has_embed || !m->has_head || m->layer_begin != 0 || m->layer_end != m->cfg.n_layer)
        return rp_error_set(err, RP_ERR_INTERNAL, "rp_model_train_step needs the whole model");
    rp_status fits = rp_backward_workspace_check(tw, m->be, err);
    if (fits == RP_OK) fits = rp_backward_workspace_check_batch(tw, m->be, batch, err);
    if (fits != RP_OK) return fits;
    rp_state local_dstate = {0};
    if (!dstate) {
        /* The sequences end here: d(final state) = 0, d(initial) is dropped. */
        rp_state_geometry(&local_dstate, &m->cfg, m->layer_begin, m->layer_end, state->n_slots);
        const size_t floats = local_dstate.floats_per_slot * (size_t)state->n_slots;
        /* The workspace keeps it: a backend allocation every step would be a
         * device malloc/free (and a synchronize) inside each CUDA step. */
        if (tw->dstate_floats < floats) {
            if (tw->dstate_data) m->be->free(m->be, tw->dstate_data);
            tw->dstate_floats = 0;
            tw->dstate_data = m->be->alloc(m->be, floats * sizeof(float));
            if (!tw->dstate_data)
                return rp_error_set(err, RP_ERR_NOMEM, "cannot allocate the state gradient");
            tw->dstate_floats = floats;
        } else {
            m->be->fill_zero(m->be, tw->dstate_data, floats * sizeof(float));
        }
        local_dstate.data = tw->dstate_data;
        dstate = &local_dstate;
    }
    rp_status st = rp_backward_embed_forward(m, tw, inputs, batch, err);
    if (st == RP_OK) {
        for (int l = m->layer_begin; l < m->layer_end; l++)
            rp_backward_block_forward(m, tw, l, state, batch);
        int n = 0;
        for (int i = 0; i < batch->n_rows; i++) n += targets[i] >= 0;
        double sum = rp_backward_head(m, grads, tw, targets, batch, loss_scale, l2wrap_factor);
        if (loss_sum) *loss_sum = sum;
        if (n_targets) *n_targets = n;
        for (int l = m->layer_end - 1; l >= m->layer_begin; l--)
            rp_backward_block_backward(m, grads, tw, l, dstate, batch);
        rp_backward_embed_backward(m, grads, tw, inputs, batch);
    }
    return st;
}
