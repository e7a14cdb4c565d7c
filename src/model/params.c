/* Parameter tables: official names, shapes, flat offsets, init kind and
 * optimizer group of every RWKV-7 tensor (params.h). */
#include "model/params.h"

#include <stdio.h>
#include <string.h>

typedef enum { SH_C, SH_11C, SH_CD, SH_DC, SH_HN, SH_CC, SH_FC, SH_CF, SH_VC } shape_kind;

typedef struct {
    const char *suffix;
    size_t field_offset;
    shape_kind shape;
    int rank_index; /* which LoRA rank for SH_CD / SH_DC: 0 w, 1 a, 2 v, 3 g */
    rp_init_kind init;
} layer_entry;

#define LF(field) offsetof(rp_layer_weights, field)

/* Order = the official training model's state_dict order within a block. */
static const layer_entry layer_entries[RP_LAYER_N_TENSORS] = {
    {"ln1.weight", LF(ln1_weight), SH_C, 0, RP_INIT_ONES},
    {"ln1.bias", LF(ln1_bias), SH_C, 0, RP_INIT_ZEROS},
    {"ln2.weight", LF(ln2_weight), SH_C, 0, RP_INIT_ONES},
    {"ln2.bias", LF(ln2_bias), SH_C, 0, RP_INIT_ZEROS},
    {"att.x_r", LF(x_r), SH_11C, 0, RP_INIT_X_R},
    {"att.x_w", LF(x_w), SH_11C, 0, RP_INIT_X_W},
    {"att.x_k", LF(x_k), SH_11C, 0, RP_INIT_X_K},
    {"att.x_v", LF(x_v), SH_11C, 0, RP_INIT_X_V},
    {"att.x_a", LF(x_a), SH_11C, 0, RP_INIT_X_A},
    {"att.x_g", LF(x_g), SH_11C, 0, RP_INIT_X_G},
    {"att.w1", LF(w1), SH_CD, 0, RP_INIT_ZEROS},
    {"att.w2", LF(w2), SH_DC, 0, RP_INIT_LORA2},
    {"att.w0", LF(w0), SH_11C, 0, RP_INIT_W0},
    {"att.a1", LF(a1), SH_CD, 1, RP_INIT_ZEROS},
    {"att.a2", LF(a2), SH_DC, 1, RP_INIT_LORA2},
    {"att.a0", LF(a0), SH_11C, 0, RP_INIT_A0},
    {"att.v1", LF(v1), SH_CD, 2, RP_INIT_ZEROS},
    {"att.v2", LF(v2), SH_DC, 2, RP_INIT_LORA2},
    {"att.v0", LF(v0), SH_11C, 0, RP_INIT_V0},
    {"att.g1", LF(g1), SH_CD, 3, RP_INIT_ZEROS},
    {"att.g2", LF(g2), SH_DC, 3, RP_INIT_LORA2},
    {"att.k_k", LF(k_k), SH_11C, 0, RP_INIT_K_K},
    {"att.k_a", LF(k_a), SH_11C, 0, RP_INIT_K_A},
    {"att.r_k", LF(r_k), SH_HN, 0, RP_INIT_R_K},
    {"att.receptance.weight", LF(receptance), SH_CC, 0, RP_INIT_ORTHO_1},
    {"att.key.weight", LF(key), SH_CC, 0, RP_INIT_ORTHO_01},
    {"att.value.weight", LF(value), SH_CC, 0, RP_INIT_ORTHO_1},
    {"att.output.weight", LF(output), SH_CC, 0, RP_INIT_ZEROS},
    {"att.ln_x.weight", LF(ln_x_weight), SH_C, 0, RP_INIT_LN_X},
    {"att.ln_x.bias", LF(ln_x_bias), SH_C, 0, RP_INIT_ZEROS},
    {"ffn.x_k", LF(ffn_x_k), SH_11C, 0, RP_INIT_FFN_X_K},
    {"ffn.key.weight", LF(ffn_key), SH_FC, 0, RP_INIT_ORTHO_1},
    {"ffn.value.weight", LF(ffn_value), SH_CF, 0, RP_INIT_ZEROS},
};

static void fill_shape(rp_tensor_info *t, shape_kind kind, int rank, const rp_config *c) {
    int64_t C = c->n_embd, F = c->dim_ffn, V = c->vocab_size;
    switch (kind) {
    case SH_C: t->ndim = 1; t->shape[0] = C; break;
    case SH_11C: t->ndim = 3; t->shape[0] = 1; t->shape[1] = 1; t->shape[2] = C; break;
    case SH_CD: t->ndim = 2; t->shape[0] = C; t->shape[1] = rank; break;
    case SH_DC: t->ndim = 2; t->shape[0] = rank; t->shape[1] = C; break;
    case SH_HN: t->ndim = 2; t->shape[0] = c->n_head; t->shape[1] = c->head_size; break;
    case SH_CC: t->ndim = 2; t->shape[0] = C; t->shape[1] = C; break;
    case SH_FC: t->ndim = 2; t->shape[0] = F; t->shape[1] = C; break;
    case SH_CF: t->ndim = 2; t->shape[0] = C; t->shape[1] = F; break;
    case SH_VC: t->ndim = 2; t->shape[0] = V; t->shape[1] = C; break;
    }
    t->numel = 1;
    for (int d = 0; d < t->ndim; d++) t->numel *= t->shape[d];
}

/* Official optimizer groups (docs/rwkv7.md, Optimizer recipe): weight decay on 2-D ".weight" tensors,
 * 2x learning rate for att.w0. */
static void fill_optimizer_group(rp_tensor_info *t) {
    size_t n = strlen(t->suffix);
    t->weight_decay = t->ndim == 2 && n > 7 && strcmp(t->suffix + n - 7, ".weight") == 0;
    t->lr_scale = strcmp(t->suffix, "att.w0") == 0 ? 2.0f : 1.0f;
}

size_t rp_layer_layout(const rp_config *cfg, rp_tensor_info table[RP_LAYER_N_TENSORS]) {
    const int ranks[4] = {cfg->d_decay, cfg->d_iclr, cfg->d_value, cfg->d_gate};
    size_t offset = 0;
    for (int i = 0; i < RP_LAYER_N_TENSORS; i++) {
        const layer_entry *e = &layer_entries[i];
        rp_tensor_info *t = &table[i];
        memset(t, 0, sizeof *t);
        t->suffix = e->suffix;
        t->part = RP_PART_LAYER;
        t->field_offset = e->field_offset;
        fill_shape(t, e->shape, ranks[e->rank_index], cfg);
        t->flat_offset = offset;
        t->init = e->init;
        fill_optimizer_group(t);
        /* Keep every tensor 64-byte aligned inside the flat buffer. */
        offset += ((size_t)t->numel + 15) & ~(size_t)15;
    }
    return offset;
}

#define GF(field) offsetof(rp_global_weights, field)

void rp_global_layout(const rp_config *cfg, rp_tensor_info table[RP_GLOBAL_N_TENSORS],
                      size_t *embed_floats, size_t *head_floats) {
    static const struct {
        const char *name;
        rp_param_part part;
        size_t field;
        shape_kind shape;
        rp_init_kind init;
    } entries[RP_GLOBAL_N_TENSORS] = {
        {"emb.weight", RP_PART_EMBED, GF(emb), SH_VC, RP_INIT_EMB},
        {"blocks.0.ln0.weight", RP_PART_EMBED, GF(ln0_weight), SH_C, RP_INIT_ONES},
        {"blocks.0.ln0.bias", RP_PART_EMBED, GF(ln0_bias), SH_C, RP_INIT_ZEROS},
        {"ln_out.weight", RP_PART_HEAD, GF(ln_out_weight), SH_C, RP_INIT_ONES},
        {"ln_out.bias", RP_PART_HEAD, GF(ln_out_bias), SH_C, RP_INIT_ZEROS},
        {"head.weight", RP_PART_HEAD, GF(head), SH_VC, RP_INIT_HEAD},
    };
    size_t offsets[2] = {0, 0};
    for (int i = 0; i < RP_GLOBAL_N_TENSORS; i++) {
        rp_tensor_info *t = &table[i];
        memset(t, 0, sizeof *t);
        t->suffix = entries[i].name;
        t->part = entries[i].part;
        t->field_offset = entries[i].field;
        fill_shape(t, entries[i].shape, 0, cfg);
        t->flat_offset = offsets[t->part];
        t->init = entries[i].init;
        fill_optimizer_group(t);
        offsets[t->part] += ((size_t)t->numel + 15) & ~(size_t)15;
    }
    if (embed_floats) *embed_floats = offsets[RP_PART_EMBED];
    if (head_floats) *head_floats = offsets[RP_PART_HEAD];
}

float **rp_tensor_field(void *weights, const rp_tensor_info *info) {
    return (float **)((char *)weights + info->field_offset);
}

void rp_layer_bind(rp_layer_weights *w, float *flat, const rp_config *cfg) {
    rp_tensor_info table[RP_LAYER_N_TENSORS];
    rp_layer_layout(cfg, table);
    for (int i = 0; i < RP_LAYER_N_TENSORS; i++)
        *rp_tensor_field(w, &table[i]) = flat ? flat + table[i].flat_offset : NULL;
}

void rp_global_bind(rp_global_weights *w, float *embed_flat, float *head_flat,
                    const rp_config *cfg) {
    rp_tensor_info table[RP_GLOBAL_N_TENSORS];
    rp_global_layout(cfg, table, NULL, NULL);
    for (int i = 0; i < RP_GLOBAL_N_TENSORS; i++) {
        float *base = table[i].part == RP_PART_EMBED ? embed_flat : head_flat;
        *rp_tensor_field(w, &table[i]) = base ? base + table[i].flat_offset : NULL;
    }
}

void rp_tensor_name(char *out, size_t out_size, const rp_tensor_info *info, int layer) {
    if (info->part == RP_PART_LAYER)
        snprintf(out, out_size, "blocks.%d.%s", layer, info->suffix);
    else
        snprintf(out, out_size, "%s", info->suffix);
}

int rp_tensor_lora_lowp(const char *suffix) {
    static const char *const names[] = {"att.w1", "att.w2", "att.a1", "att.a2",
                                         "att.v1", "att.v2", "att.g1", "att.g2"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(suffix, names[i]) == 0) return 1;
    return 0;
}

int rp_tensor_quantizable(const char *suffix) {
    static const char *const names[] = {"att.receptance.weight", "att.key.weight",
                                         "att.value.weight",      "att.output.weight",
                                         "ffn.key.weight",        "ffn.value.weight",
                                         "head.weight"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(suffix, names[i]) == 0) return 1;
    return 0;
}
