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

/* The benchmarks' training batch: `rows` fixed pseudo-random inputs and
 * targets below vocab, and B sequences of T tokens each in slots 0..B-1
 * (seq_len, slot, row_begin: B entries each, owned by the caller). */
void bench_train_tokens(int32_t *inputs, int32_t *targets, int rows, int vocab);
void bench_train_batch(rp_batch *batch, int B, int T, int *seq_len, int *slot, int *row_begin);

/* A bench_call_fn: one step from a zero state; 1 (message on stderr) on error. */
int bench_train_call(void *ctx);

#endif
