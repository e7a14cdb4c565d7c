/* One timed training step (forward, backward, AdamW) for the benchmarks
 * that time training: bench_train (against the sgemm ceiling) and
 * bench_contention (alone and beside busy processes). They fill a
 * bench_train_ctx and hand bench_train_call to the harness. */
#ifndef RP_BENCH_TRAIN_STEP_H
#define RP_BENCH_TRAIN_STEP_H

#include "model/backward.h"
#include "optim/optim.h"

typedef struct {
    rp_model *model, *grads, *m, *v;
    rp_backward_workspace *tw;
    rp_state *state;
    rp_batch *batch;
    int32_t *inputs, *targets;
    rp_optim_config *optim;
    long step;
    const char *who;  /* names the benchmark in an error message */
} bench_train_ctx;

/* A bench_call_fn: one step from a zero state; 1 (message on stderr) on error. */
int bench_train_call(void *ctx);

#endif
