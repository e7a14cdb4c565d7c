/* An RWKV-7 model (or the slice of it one pipeline stage owns): config, the
 * owned layers' flat weight buffers in backend memory, and the forward pass
 * written once against the backend op interface (backend.h).
 * Callers: src/cli (logits, generate, info), src/infer, tests, bench. */
#ifndef RP_MODEL_MODEL_H
#define RP_MODEL_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/params.h"
#include "model/state.h"

typedef struct {
    rp_config cfg;
    int layer_begin, layer_end;     /* owned layers [begin, end) */
    int has_embed, has_head;        /* owns emb + ln0 / ln_out + head */
    rp_backend *be;
    /* Floats of each flat buffer. With low-precision weights the layer and
     * head buffers hold the f32 tensors only (packed in table order) and the
     * quantized matrices live in the backend (qweight_*): their fields are
     * keys into qkeys, an address range that cannot be read. */
    size_t layer_floats, embed_floats, head_floats;
    float *embed_flat, *head_flat;  /* backend memory, NULL if not owned */
    float **layer_flat;             /* [n owned layers] */
    rp_global_weights global;
    rp_layer_weights *layers;       /* [n owned layers], index layer - layer_begin */
    rp_weights_type wtype;          /* format of the quantizable matrices */
    void *qkeys;                    /* PROT_NONE reservation (NULL for f32) */
    size_t qkeys_bytes;
} rp_model;

/* Allocates zeroed weights for layers [layer_begin, layer_end) (+ embed/head). */
rp_status rp_model_alloc(rp_model *m, const rp_config *cfg, int layer_begin, int layer_end,
                         int has_embed, int has_head, rp_backend *be, rp_error *err);
void rp_model_free(rp_model *m);
/* The same with the quantizable matrices (rp_tensor_quantizable) in `wtype`
 * (RP_WEIGHTS_F32: rp_model_alloc). Other formats need a backend with
 * qweight_create (the CPU backend); their storage is uninitialised until
 * written through qweight_write. */
rp_status rp_model_alloc_weights(rp_model *m, const rp_config *cfg, int layer_begin,
                                 int layer_end, int has_embed, int has_head,
                                 rp_weights_type wtype, rp_backend *be, rp_error *err);

/* Tells the backend which buffers hold weights that its GEMMs read many
 * times (the layers and the head; the embedding is only looked up), so the
 * CUDA backend keeps bf16 copies that later writes keep current. Call once
 * the buffers exist; a no-op on the CPU. Only for the model that is run,
 * never for gradient or optimizer-moment buffers of the same shape. */
void rp_model_register_weights(rp_model *m);

/* Official x070 initialisation (docs/rwkv7.md, Initialisation) from a seed; identical on every rank
 * for the tensors it owns. */
rp_status rp_model_init_official(rp_model *m, uint64_t seed, rp_error *err);

/* Which naming a weights file uses. */
typedef enum { RP_NAMING_OFFICIAL = 0, RP_NAMING_HF = 1 } rp_naming;

/* The official <-> HF/fla name map (docs/convert.md). A per_layer row names
 * the suffixes after "blocks.N." and "model.layers.N."; the others whole
 * names. kind: how the HF tensor becomes the official one. */
typedef enum { RP_HF_SAME = 0, RP_HF_RESHAPE, RP_HF_TRANSPOSE } rp_hf_kind;
typedef struct {
    const char *official, *hf;
    rp_hf_kind kind;
    int per_layer;
} rp_hf_name;
const rp_hf_name *rp_hf_names(int *n);
const char *rp_hf_kind_name(rp_hf_kind kind);

/* Reads the hyper-parameters from tensor shapes (official or HF/fla names) and
 * checks that every layer is complete and consistent. */
rp_status rp_config_from_safetensors(const rp_st_file *f, rp_config *cfg, rp_naming *naming,
                                     rp_error *err);

/* Opens path, derives the config, allocates the owned part (layer_end < 0
 * means all layers; embed/head owned when the range starts at 0 / ends at L)
 * and reads the tensors straight from the mmapped file (F32/F16/BF16). */
rp_status rp_model_load(rp_model *m, const char *path, int layer_begin, int layer_end,
                        rp_backend *be, rp_error *err);

/* How rp_model_load_as runs. */
typedef struct {
    int wtype;        /* rp_weights_type to hold the quantizable matrices in, or -1: the
                       * file's own (int8 for files with I8 tensors, bf16 for files
                       * `rwkvpipe quantize --type bf16` wrote, else f32) */
    int for_training; /* refuse int8 files and any format but f32 */
} rp_load_options;

/* rp_model_load (which is this with wtype -1) converting each tensor as it
 * streams from the file: F32/F16/BF16 tensors and int8 ones (I8 [N,K] +
 * F16 "<name>.scales" [N, K/32], or int8row's F32 [N, 1]; docs/formats.md)
 * into wtype. */
rp_status rp_model_load_as(rp_model *m, const char *path, int layer_begin, int layer_end,
                           const rp_load_options *opt, rp_backend *be, rp_error *err);

/* The format rp_model_load_as picks for wtype -1 (see above). */
rp_weights_type rp_file_weights_type(const rp_st_file *f);

/* Writes every owned tensor under its official name (dtype F32, F16 or BF16),
 * atomically (temp name, fsync, rename). f32 models only (a bf16/int8 model
 * is refused: `rwkvpipe quantize` writes those from the f32 file). */
rp_status rp_model_save(const rp_model *m, const char *path, rp_dtype dtype, rp_error *err);

/* ---- forward ---- */

/* What a block keeps for its backward pass (src/model/backward.c), [R, ...]
 * buffers. The inference workspace binds the same struct to scratch memory
 * and leaves the buffers marked "train" NULL: the block then runs in place and
 * saves nothing. The LoRA hidden buffers may share memory in inference. */
typedef struct {
    float *x_in;                    /* train: residual stream entering the block */
    float *xa, *ln1_mean, *ln1_rstd; /* ln1 output; mean/rstd [R]: train */
    float *prev_att;                /* token-shifted xa */
    float *r;
    float *k_pre, *v_pre;           /* train: k and v before key_prepare / value residual */
    float *k, *v;                   /* k after k_a, v after the value residual */
    float *w_raw, *w_hidden;        /* decay pre-activation; tanh(xw w1) [R,Dw] */
    float *a, *a_hidden;            /* in-context rate (sigmoid output); xa a1 [R,Da] */
    float *g, *g_hidden;            /* gate; sigmoid(xg g1) [R,Dg] */
    float *nu, *nu_hidden;          /* value-residual gate (sigmoid output); xv v1 [R,Dv] */
    float *kk, *y;                  /* normalised removal key; wkv output */
    float *gn_mean, *gn_rstd;       /* train: [R,H] */
    float *o_gn, *og;               /* groupnorm output; og (train) = after bonus and gate */
    float *x_mid;                   /* train: residual stream after the time mix */
    float *xf, *ln2_mean, *ln2_rstd; /* ln2 output; mean/rstd: train */
    float *prev_ffn, *kf, *ffn_hidden;
    float *wkv_checkpoints;         /* train: state every RP_WKV_CHUNK tokens */
    /* Inference: the six time-mix mixes (r k v w a g) of calls of up to
     * mix_rows rows, formed by one ln_shift_mix; 0 rows: one xc at a time. */
    float *mix[RP_MIX_MAX];
    int mix_rows;
    /* Train, when the backend has shift_mix: the six time-mix mixes (r k v
     * w a g) formed by one shift_mix, in the backward workspace's shared
     * scratch (every layer points at the same buffers: they live only
     * during one block's forward or backward). NULL: one xc at a time. */
    float *tmix[RP_MIX_MAX];
    /* Inference: the hidden rows of the four LoRAs (w a g nu), mix_rows x D
     * each, apart so that one gemv_group forms them all (NULL: no fusion). */
    float *lora_hidden[4];
} rp_layer_activations;

/* Training with the backend's fused LN + mix ops on a shape it takes: ln1 /
 * ln2 leave xa (xf) and prev unstored (only each sequence's first prev row)
 * and the backward forms them again from the norm's input x and its saved
 * mean / rstd (issue 15, docs/gpu.md "mixes formed again"). The forward,
 * the backward and the W pass decide alike from this. */
static inline int rp_mix_again(rp_backend *be, const rp_batch *batch, int C) {
    return be->shift_mix && be->ln_shift_mix_train && be->shift_mix_backward &&
           be->shift_mix_ln_backward && be->ln_mix_again && be->ln_mix_again_fits &&
           be->ln_mix_again_fits(be, batch, C);
}

/* Training: a layer's r, k, v, k_pre, v_pre, nu and g are hinted rkv_only
 * (backend.h; bf16 on CUDA) where the backend has every op that reads them
 * in bf16 (the tail after WKV7 among them: the separate ops read f32) and
 * every hint that puts WKV7's other inputs and the groupnorm's y and dy in
 * bf16 beside them. Layer 0 keeps f32: its v is copied into v_first, which
 * every later layer reads (its g stays f32 too: the kernels take r, k, v
 * and g in one type). The forward hints, and the training workspace sizes
 * them at half, alike from this (issue 15). */
static inline int rp_rkv_only_layer(const rp_backend *be, int layer) {
    return layer != 0 && be->rkv_only && be->wkv_only && be->gemm_only &&
           be->key_prepare_from && be->value_residual_from && be->groupnorm_bonus_gate &&
           be->groupnorm_bonus_gate_backward && be->attention_tail_backward;
}

/* Inference buffers for up to max_rows rows (tokens of all sequences in one
 * call). Backend memory, owned by the caller through this struct. */
typedef struct {
    int max_rows;
    size_t bytes;
    float *base;
    float *x, *v_first;   /* residual stream; layer 0's value, used by every layer */
    float *xc;            /* one token-shift mix at a time */
    rp_layer_activations acts;
    float *head_rows, *head_in;
} rp_workspace;

rp_status rp_workspace_alloc(rp_workspace *ws, const rp_config *cfg, int max_rows,
                             rp_backend *be, rp_error *err);
void rp_workspace_free(rp_workspace *ws, rp_backend *be);

/* Fills row_begin (caller storage, n_seq ints) and n_rows of a ragged batch. */
void rp_batch_init(rp_batch *b, int n_seq, const int *seq_len, const int *slot,
                   int *row_begin);

/* ws->x [R,C] = ln0(emb[tokens]). tokens (host) must be < vocab_size. */
rp_status rp_model_embed(const rp_model *m, rp_workspace *ws, const int32_t *tokens,
                         const rp_batch *batch, rp_error *err);
/* One block on ws->x (and ws->v_first, set by layer 0), updating the state of
 * every sequence for that layer. */
void rp_model_block_forward(const rp_model *m, rp_workspace *ws, int layer,
                            rp_state *state, const rp_batch *batch);
/* The block itself, written once for inference and training: x and v_first
 * [R,C] in/out, xc [R,C] scratch; s receives what the backward needs (its
 * train-only buffers may be NULL). With s->wkv_checkpoints set it keeps the
 * WKV checkpoints too. */
void rp_block_forward(const rp_model *m, rp_layer_activations *s, float *x, float *v_first,
                      float *xc, int layer, rp_state *state, const rp_batch *batch);

typedef enum {
    RP_LOGITS_NONE = 0,  /* no head */
    RP_LOGITS_ALL,       /* logits [R, V] for every row */
    RP_LOGITS_LAST       /* logits [n_seq, V] for the last row of each sequence */
} rp_logits_mode;

/* Whether a prefill's rows get the bits they get alone whatever the rows
 * beside them (backend.h, RP_ROWS_PREFILL: every matrix f32 and a backend
 * with set_decode_rows), so that several prompts can share one forward. */
int rp_model_prefill_rows_exact(const rp_model *m);

/* logits (backend memory) = head(ln_out(rows of ws->x)). */
void rp_model_head(const rp_model *m, rp_workspace *ws, const rp_batch *batch,
                   rp_logits_mode mode, float *logits);

/* This stage's part of one step: embed (when the model has the embedding;
 * tokens NULL otherwise), its layers, and the last row's logits of each
 * sequence when logits is not NULL and the model has the head. A decode
 * step (every seq_len 1) runs through the backend's step graph when it has
 * one (backend.h, step_begin): the same ops, replayed without host work.
 * Tokens must be < vocab_size. */
rp_status rp_model_step(const rp_model *m, rp_workspace *ws, const int32_t *tokens,
                        const rp_batch *batch, rp_state *state, float *logits, rp_error *err);

/* Whole forward for a model that owns every layer: embed, blocks, head.
 * Sequence mode (seq_len > 1) and step mode (all seq_len == 1) are the same
 * call; batch->n_rows must be <= ws->max_rows. */
rp_status rp_model_forward(const rp_model *m, rp_workspace *ws, const int32_t *tokens,
                           const rp_batch *batch, rp_state *state, rp_logits_mode mode,
                           float *logits, rp_error *err);

#endif
