/* The official RWKV-7 (x070) optimizer recipe (docs/rwkv7.md, Optimizer recipe): AdamW with betas
 * (0.9, 0.99), eps 1e-18, decoupled weight decay on 2-D ".weight" matrices
 * only, att.w0 at 2x the learning rate; warmup then cosine from lr_init to
 * lr_final (or linear / constant); global-norm gradient clipping. Moments and
 * master weights are fp32 rp_models with the weights' layout. */
#ifndef RP_OPTIM_OPTIM_H
#define RP_OPTIM_OPTIM_H

#include "model/model.h"

typedef enum { RP_LR_COSINE = 0, RP_LR_LINEAR, RP_LR_CONSTANT } rp_lr_schedule;

typedef struct {
    float lr_init, lr_final;
    long warmup_steps, total_steps;
    rp_lr_schedule schedule;
    float beta1, beta2, eps;
    float weight_decay;
    float grad_clip;          /* max global norm; 0 = no clipping */
} rp_optim_config;

/* lr 6e-4 -> 6e-5 cosine, warmup 10, betas (0.9, 0.99), eps 1e-18, weight
 * decay 0 (the official default), clip 1.0; total_steps is the caller's. */
void rp_optim_defaults(rp_optim_config *c);
rp_status rp_optim_validate(const rp_optim_config *c, rp_error *err);
const char *rp_lr_schedule_name(rp_lr_schedule s);
int rp_lr_schedule_from_name(const char *name);  /* -1 if unknown */

/* Learning rate of step (0-based), RWKV-LM trainer.py: warmup multiplies by
 * 0.01 + 0.99 step / warmup; cosine: f = lr_final / lr_init, progress =
 * (step - warmup) / (total - warmup) in [0, 1], lr = lr_init ((0.5 + f/2) +
 * (0.5 - f/2) cos(pi progress)); linear interpolates lr_init -> lr_final. */
double rp_lr_at(const rp_optim_config *c, long step);

/* Sum of squares of every owned gradient tensor (fixed order). */
double rp_grad_sum_squares(const rp_model *grads);
/* torch.nn.utils.clip_grad_norm_: scale = max_norm / (norm + 1e-6) when that
 * is below 1, else 1. */
float rp_clip_scale(double grad_norm, float max_norm);

/* One AdamW step (step is 0-based; bias corrections use step + 1) for every
 * owned tensor, with its group's learning rate and decay; gradients are
 * multiplied by grad_scale first (clipping). */
/* AdamW on the elements [lo, hi) of one flat buffer's tensors of `part`
 * (table: its layout); m and v hold [lo, hi) only (ZeRO-1's shards; a whole
 * buffer is lo 0, hi SIZE_MAX). */
void rp_optim_step_range(rp_backend *be, float *w, const float *g, float *m, float *v,
                         size_t lo, size_t hi, const rp_tensor_info *table, int n, int part,
                         const rp_optim_config *c, float lr, float grad_scale, float bc1,
                         float bc2);

void rp_optim_step(rp_model *weights, const rp_model *grads, rp_model *adam_m, rp_model *adam_v,
                   const rp_optim_config *c, long step, float grad_scale);

#endif
