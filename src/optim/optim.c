/* AdamW, LR schedule and clipping of the official recipe (optim.h). */
#include "optim/optim.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

void rp_optim_defaults(rp_optim_config *c) {
    memset(c, 0, sizeof *c);
    c->lr_init = 6e-4f;
    c->lr_final = 6e-5f;
    c->warmup_steps = 10;
    c->total_steps = 1000;
    c->schedule = RP_LR_COSINE;
    c->beta1 = 0.9f;
    c->beta2 = 0.99f;
    c->eps = 1e-18f;
    c->weight_decay = 0.0f;
    c->grad_clip = 1.0f;
}

static const char *schedule_names[] = {"cosine", "linear", "constant"};

const char *rp_lr_schedule_name(rp_lr_schedule s) { return schedule_names[s]; }

int rp_lr_schedule_from_name(const char *name) {
    for (int i = 0; i < 3; i++)
        if (strcmp(name, schedule_names[i]) == 0) return i;
    return -1;
}

rp_status rp_optim_validate(const rp_optim_config *c, rp_error *err) {
    if (!(c->lr_init > 0) || !(c->lr_final >= 0) || !isfinite(c->lr_init) || !isfinite(c->lr_final))
        return rp_error_set(err, RP_ERR_ARG, "learning rates must be finite, lr_init > 0 and "
                            "lr_final >= 0 (got %g and %g)", c->lr_init, c->lr_final);
    if (c->total_steps < 1 || c->warmup_steps < 0)
        return rp_error_set(err, RP_ERR_ARG, "steps %ld must be >= 1 and warmup %ld >= 0",
                            c->total_steps, c->warmup_steps);
    if (!(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1) || !(c->eps > 0))
        return rp_error_set(err, RP_ERR_ARG, "Adam betas must be in [0, 1) and eps > 0 "
                            "(got %g, %g, %g)", c->beta1, c->beta2, c->eps);
    if (!(c->weight_decay >= 0) || !(c->grad_clip >= 0))
        return rp_error_set(err, RP_ERR_ARG, "weight decay %g and gradient clip %g must be >= 0",
                            c->weight_decay, c->grad_clip);
    return RP_OK;
}

double rp_lr_at(const rp_optim_config *c, long step) {
    double lr;
    double span = (double)(c->total_steps - c->warmup_steps);
    double progress = span > 0 ? (double)(step - c->warmup_steps) / span : 1.0;
    if (progress < 0) progress = 0;
    if (progress > 1) progress = 1;
    switch (c->schedule) {
    case RP_LR_COSINE: {
        double f = (double)c->lr_final / c->lr_init;
        lr = c->lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * cos(M_PI * progress));
        break;
    }
    case RP_LR_LINEAR: lr = c->lr_init + (c->lr_final - c->lr_init) * progress; break;
    default: lr = c->lr_init; break;
    }
    if (step < c->warmup_steps) lr *= 0.01 + 0.99 * (double)step / c->warmup_steps;
    return lr;
}

/* Calls fn on every owned tensor of the three parallel models. */
static double for_each_buffer(const rp_model *g, double (*fn)(rp_backend *, const float *, size_t)) {
    double total = 0.0;
    rp_backend *be = g->be;
    for (int i = 0; i < g->layer_end - g->layer_begin; i++)
        total += fn(be, g->layer_flat[i], g->layer_floats);
    if (g->embed_flat) total += fn(be, g->embed_flat, g->embed_floats);
    if (g->head_flat) total += fn(be, g->head_flat, g->head_floats);
    return total;
}

double rp_grad_sum_squares(const rp_model *grads) {
    /* Padding between tensors holds zeros: summing whole buffers is exact. */
    return for_each_buffer(grads, grads->be->sum_squares);
}

float rp_clip_scale(double grad_norm, float max_norm) {
    if (max_norm <= 0) return 1.0f;
    double coef = max_norm / (grad_norm + 1e-6);
    return coef < 1.0 ? (float)coef : 1.0f;
}

void rp_optim_step_range(rp_backend *be, float *w, const float *g, float *m, float *v,
                         size_t lo, size_t hi, const rp_tensor_info *table, int n, int part,
                         const rp_optim_config *c, float lr, float grad_scale, float bc1,
                         float bc2) {
    /* With adamw_multi (a GPU backend), the tensors go in batches of up to
     * RP_ADAMW_MULTI_MAX: one launch each instead of one per tensor. */
    rp_adamw_tensor batch[RP_ADAMW_MULTI_MAX];
    int n_batch = 0;
    for (int i = 0; i < n; i++) {
        const rp_tensor_info *t = &table[i];
        if ((int)t->part != part) continue;
        size_t a = t->flat_offset, e = t->flat_offset + (size_t)t->numel;
        if (a < lo) a = lo;
        if (e > hi) e = hi;
        if (a >= e) continue;
        /* m and v hold [lo, hi) only: index them from lo. */
        const float tlr = lr * t->lr_scale, wd = t->weight_decay ? c->weight_decay : 0.0f;
        if (!be->adamw_multi) {
            be->adamw(be, w + a, g + a, m + (a - lo), v + (a - lo), e - a, tlr, c->beta1,
                      c->beta2, c->eps, wd, grad_scale, bc1, bc2);
            continue;
        }
        batch[n_batch++] = (rp_adamw_tensor){w + a, g + a, m + (a - lo), v + (a - lo), e - a,
                                             tlr, wd};
        if (n_batch == RP_ADAMW_MULTI_MAX) {
            be->adamw_multi(be, batch, n_batch, c->beta1, c->beta2, c->eps, grad_scale, bc1, bc2);
            n_batch = 0;
        }
    }
    if (n_batch) be->adamw_multi(be, batch, n_batch, c->beta1, c->beta2, c->eps, grad_scale, bc1, bc2);
}

/* A whole buffer: its tensors of this part, moments laid out like it. */
static void step_part(rp_backend *be, float *w, const float *g, float *m, float *v,
                      const rp_tensor_info *table, int n, int part, const rp_optim_config *c,
                      float lr, float grad_scale, float bc1, float bc2) {
    rp_optim_step_range(be, w, g, m, v, 0, SIZE_MAX, table, n, part, c, lr, grad_scale, bc1,
                        bc2);
}

void rp_optim_step(rp_model *weights, const rp_model *grads, rp_model *adam_m, rp_model *adam_v,
                   const rp_optim_config *c, long step, float grad_scale) {
    rp_backend *be = weights->be;
    const float lr = (float)rp_lr_at(c, step);
    const float bc1 = (float)(1.0 - pow(c->beta1, (double)(step + 1)));
    const float bc2 = (float)(1.0 - pow(c->beta2, (double)(step + 1)));
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(&weights->cfg, table);
    rp_global_layout(&weights->cfg, gtable, NULL, NULL);
    for (int i = 0; i < weights->layer_end - weights->layer_begin; i++)
        step_part(be, weights->layer_flat[i], grads->layer_flat[i], adam_m->layer_flat[i],
                  adam_v->layer_flat[i], table, RP_LAYER_N_TENSORS, RP_PART_LAYER, c, lr,
                  grad_scale, bc1, bc2);
    if (weights->embed_flat)
        step_part(be, weights->embed_flat, grads->embed_flat, adam_m->embed_flat,
                  adam_v->embed_flat, gtable, RP_GLOBAL_N_TENSORS, RP_PART_EMBED, c, lr,
                  grad_scale, bc1, bc2);
    if (weights->head_flat)
        step_part(be, weights->head_flat, grads->head_flat, adam_m->head_flat, adam_v->head_flat,
                  gtable, RP_GLOBAL_N_TENSORS, RP_PART_HEAD, c, lr, grad_scale, bc1, bc2);
}
