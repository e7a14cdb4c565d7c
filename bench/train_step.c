/* One timed training step for the benchmarks (train_step.h). */
#include "bench/train_step.h"

#include <stdio.h>

void bench_train_tokens(int32_t *inputs, int32_t *targets, int rows, int vocab) {
    for (int i = 0; i < rows; i++) {
        inputs[i] = (i * 7919 + 13) % vocab;
        targets[i] = (i * 104729 + 7) % vocab;
    }
}

void bench_train_batch(rp_batch *batch, int B, int T, int *seq_len, int *slot, int *row_begin) {
    for (int s = 0; s < B; s++) {
        seq_len[s] = T;
        slot[s] = s;
    }
    rp_batch_init(batch, B, seq_len, slot, row_begin);
}

int bench_train_call(void *p) {
    bench_train_ctx *c = p;
    rp_error err;
    rp_backend *be = c->model->be;
    rp_model_zero(c->grads);
    be->fill_zero(be, c->state->data,
                  c->state->floats_per_slot * c->state->n_slots * sizeof(float));
    double loss;
    int n;
    if (rp_model_train_step(c->model, c->grads, c->tw, c->inputs, c->targets, c->batch, c->state,
                            NULL, 1.0f / c->batch->n_rows, 1e-4f / c->batch->n_rows, &loss, &n,
                            &err) != RP_OK) {
        fprintf(stderr, "%s: %s\n", c->who ? c->who : "bench", err.msg);
        return 1;
    }
    double norm = rp_grad_sum_squares(c->grads);
    rp_optim_step(c->model, c->grads, c->m, c->v, c->optim, c->step++,
                  rp_clip_scale(norm, c->optim->grad_clip));
    return 0;
}
