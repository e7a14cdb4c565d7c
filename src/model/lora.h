/* LoRA adapters on a model's linear layers (docs/training.md, LoRA):
 * W' = W + (alpha / r) B A with A [r,K], B [N,r], trained with the base
 * frozen, saved apart (blocks.L.<target>.lora_A / lora_B), merged into a
 * model at load (serve --lora, merge-lora). Training runs the model on W'
 * formed with backend ops each step, so the adapters' gradients follow
 * from d(W') exactly: dA = s B^T dW', dB = s dW' A^T (s = alpha / r). */
#ifndef RP_MODEL_LORA_H
#define RP_MODEL_LORA_H

#include <stdint.h>
#include <stdio.h>

#include "model/model.h"

/* The linear layers an adapter may sit on. */
typedef enum {
    RP_LORA_ATT_RECEPTANCE = 0, RP_LORA_ATT_KEY, RP_LORA_ATT_VALUE, RP_LORA_ATT_OUTPUT,
    RP_LORA_FFN_KEY, RP_LORA_FFN_VALUE, RP_LORA_N_TARGETS
} rp_lora_target;

#define RP_LORA_DEFAULT_TARGETS                                                        \
    ((1u << RP_LORA_ATT_RECEPTANCE) | (1u << RP_LORA_ATT_KEY) | (1u << RP_LORA_ATT_VALUE) | \
     (1u << RP_LORA_ATT_OUTPUT))

/* "att.key" etc.; the weight is "blocks.L.<name>.weight". */
const char *rp_lora_target_name(int target);
/* Comma list ("att.key,ffn.value") -> bit mask; RP_ERR_ARG naming the bad item. */
rp_status rp_lora_parse_targets(const char *list, unsigned *mask, rp_error *err);
/* The mask as a comma list (buffer of >= 96 bytes). */
void rp_lora_format_targets(unsigned mask, char *out, size_t size);

typedef struct {
    int layer, target, N, K;
    float *w;            /* the model's weight buffer: holds W' while training */
    float *base;         /* the frozen W (backend memory) */
    float *A, *B;        /* into params */
    float *dA, *dB;      /* into grads */
    float *sB;           /* s B [N,r], formed by rp_lora_apply */
} rp_lora_adapter;

typedef struct rp_lora_s {
    int rank;
    float alpha;
    unsigned targets;
    rp_model *model;
    int n;                     /* adapters: owned layers x targets, layer-major */
    rp_lora_adapter *ad;
    size_t floats;             /* adapter parameters of this model part */
    size_t floats_per_layer;
    float *params, *grads, *adam_m, *adam_v;  /* backend, [floats] each: A then B per adapter */
    float *zero, *tmp, *svec;  /* scratch: [max N x r] twice, [r] of s */
    float *w_scratch;          /* [max N x K]: W' formed here, then copied into the model */
} rp_lora;

/* Adapters of rank r on the targets of every owned layer of m (an f32
 * model): A Kaiming-uniform (bound 1/sqrt(K), as peft), drawn from seed
 * per tensor name so any pipeline layout draws the same numbers; B zero;
 * the base weights are copied aside. */
rp_status rp_lora_init(rp_lora *lo, rp_model *m, int rank, float alpha, unsigned targets,
                       uint64_t seed, rp_error *err);
void rp_lora_free(rp_lora *lo);
/* W' = W + s B A into the model's weights (backend ops). */
void rp_lora_apply(rp_lora *lo);
/* The adapters' gradients from the model gradients (d W' of the targets,
 * in grads): lo->grads = (dA, dB). Returns their sum of squares. */
double rp_lora_grads(rp_lora *lo, const rp_model *grads);
/* The base weights back into the model (a checkpoint stores them, not W');
 * rp_lora_apply forms W' again, bit for bit the same. */
void rp_lora_unapply(rp_lora *lo);
/* The model's weights become the base (after a checkpoint load into it). */
void rp_lora_rebase(rp_lora *lo);
/* "rank=R alpha=A targets=LIST": what a checkpoint must match to resume. */
void rp_lora_describe(const rp_lora *lo, char *out, size_t size);
/* One AdamW step on the adapters (moments in lo), then rp_lora_apply. */
void rp_lora_step(rp_lora *lo, float lr, float beta1, float beta2, float eps,
                  float weight_decay, float grad_scale, long step);
/* This part's adapter parameters to host memory, layer-major: per layer,
 * per target in enum order, A [r,K] then B [N,r] (floats_per_layer each). */
void rp_lora_to_host(const rp_lora *lo, float *host);
void rp_lora_from_host(rp_lora *lo, const float *host);
/* Writes an adapter file for every layer of cfg from host parameters
 * (layer-major as rp_lora_to_host, n_layer layers), atomically. */
rp_status rp_lora_save(const rp_config *cfg, int rank, float alpha, unsigned targets,
                       const float *host, const char *path, rp_error *err);

/* Adds an adapter file into m's owned layers (f32 weights): W += s B A on
 * the host, in double. Checks the file: its metadata, every tensor name,
 * every shape against the model. progress (may be NULL) is called after
 * each merged matrix. */
typedef void (*rp_lora_progress_fn)(void *ctx, const char *name, int done, int total);
rp_status rp_lora_merge_file(rp_model *m, const char *path, rp_lora_progress_fn progress,
                             void *ctx, rp_error *err);

#endif
