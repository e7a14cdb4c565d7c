/* Parameter layout: one flat f32 buffer per layer plus one for the global
 * tensors (embedding, ln0, ln_out, head), each with a struct of named pointers
 * into it (llm.c style). A table maps every pointer to its official RWKV-LM
 * name and shape, so loading, saving, init and sharding are loops over the
 * table. Pointers may be host or device memory; this file never dereferences. */
#ifndef RP_MODEL_PARAMS_H
#define RP_MODEL_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "model/config.h"

/* Every layer has the same layout. blocks.0.att.v0/v1/v2 exist in layer 0 too
 * (official training code creates them) but the forward pass never reads them. */
typedef struct {
    float *ln1_weight, *ln1_bias;   /* [C] */
    float *ln2_weight, *ln2_bias;   /* [C] */
    float *x_r, *x_w, *x_k, *x_v, *x_a, *x_g; /* [1,1,C] token-shift lerp */
    float *w0, *w1, *w2;            /* [1,1,C] [C,Dw] [Dw,C] decay */
    float *a0, *a1, *a2;            /* [1,1,C] [C,Da] [Da,C] in-context rate */
    float *v0, *v1, *v2;            /* [1,1,C] [C,Dv] [Dv,C] value residual */
    float *g1, *g2;                 /* [C,Dg] [Dg,C] output gate */
    float *k_k, *k_a;               /* [1,1,C] */
    float *r_k;                     /* [H,N] */
    float *receptance, *key, *value, *output; /* [C,C] nn.Linear [out,in] */
    float *ln_x_weight, *ln_x_bias; /* [C] GroupNorm(H) affine */
    float *ffn_x_k;                 /* [1,1,C] */
    float *ffn_key;                 /* [F,C] */
    float *ffn_value;               /* [C,F] */
} rp_layer_weights;

typedef struct {
    float *emb;                     /* [V,C]  emb.weight */
    float *ln0_weight, *ln0_bias;   /* [C]    blocks.0.ln0.* */
    float *ln_out_weight, *ln_out_bias; /* [C] ln_out.* */
    float *head;                    /* [V,C]  head.weight */
} rp_global_weights;

/* Which part of the model a tensor belongs to; a pipeline stage owns the
 * embedding part if it is first and the head part if it is last. */
typedef enum { RP_PART_EMBED = 0, RP_PART_HEAD = 1, RP_PART_LAYER = 2 } rp_param_part;

/* How a tensor is initialised (docs/rwkv7.md, Initialisation); the init code switches on it. */
typedef enum {
    RP_INIT_ONES, RP_INIT_ZEROS, RP_INIT_X_R, RP_INIT_X_W, RP_INIT_X_K, RP_INIT_X_V,
    RP_INIT_X_A, RP_INIT_X_G, RP_INIT_W0, RP_INIT_A0, RP_INIT_V0, RP_INIT_K_K,
    RP_INIT_K_A, RP_INIT_R_K, RP_INIT_LORA2, RP_INIT_ORTHO_1, RP_INIT_ORTHO_01,
    RP_INIT_LN_X, RP_INIT_FFN_X_K, RP_INIT_EMB, RP_INIT_HEAD
} rp_init_kind;

typedef struct {
    const char *suffix;   /* official name without "blocks.{l}." for layer tensors */
    rp_param_part part;
    size_t field_offset;  /* offsetof(rp_layer_weights or rp_global_weights, field) */
    int ndim;
    int64_t shape[3];
    int64_t numel;
    size_t flat_offset;   /* in floats, within the layer's or the part's flat buffer */
    rp_init_kind init;
    int weight_decay;     /* official recipe: 2-D ".weight" matrices only */
    float lr_scale;       /* 2.0 for att.w0, 1.0 otherwise */
} rp_tensor_info;

#define RP_LAYER_N_TENSORS 33
#define RP_GLOBAL_N_TENSORS 6

/* Fills the layer table for cfg; returns the floats per layer. */
size_t rp_layer_layout(const rp_config *cfg, rp_tensor_info table[RP_LAYER_N_TENSORS]);
/* Fills the global table; embed part = emb, ln0; head part = ln_out, head.
 * *embed_floats and *head_floats receive each part's flat size. */
void rp_global_layout(const rp_config *cfg, rp_tensor_info table[RP_GLOBAL_N_TENSORS],
                      size_t *embed_floats, size_t *head_floats);

/* Points every field at flat + flat_offset. */
void rp_layer_bind(rp_layer_weights *w, float *flat, const rp_config *cfg);
/* embed_flat and head_flat may be NULL for a stage that does not own them. */
void rp_global_bind(rp_global_weights *w, float *embed_flat, float *head_flat,
                    const rp_config *cfg);

/* Pointer to the field described by info inside w (rp_layer_weights* or
 * rp_global_weights*). */
float **rp_tensor_field(void *weights, const rp_tensor_info *info);

/* Whether a tensor is one of the nn.Linear matrices that bf16/int8 models
 * keep in the low-precision format (docs/perf/cpu.md has the table): the
 * time mix's receptance/key/value/output, the channel mix's key/value and the
 * head. The LoRA factors go to bf16 or int8 (rp_tensor_lora_lowp); everything else
 * (embedding, norms, vectors) stays f32. */
int rp_tensor_quantizable(const char *suffix);
/* Whether a tensor is a LoRA factor (W [K,N], the small [C,r] and [r,C]
 * of the decay/a/v/g LoRAs) that bf16 models keep in bf16 and int8 models
 * in int8 blocks (bf16 in both formats' files; docs/perf/cpu.md, "Which
 * tensors are quantized"). */
int rp_tensor_lora_lowp(const char *suffix);

/* "blocks.{layer}.{suffix}" for layer tensors, the suffix itself otherwise. */
void rp_tensor_name(char *out, size_t out_size, const rp_tensor_info *info, int layer);

#endif
