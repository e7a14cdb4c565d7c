/* The interleaved 1F1B executor (docs/parallelism.md, Interleaved 1F1B):
 * stage s of P holds v chunks of layers, model chunks s, P+s, 2P+s, ...
 * (Megatron's layout), each an ordinary rp_model with its own gradients,
 * moments, recurrent state and activation stash; it runs the stage's list
 * of rp_schedule_build_interleaved, each instruction on the chunk it names.
 * Activations go from model chunk k to k+1 (the last stage's chunk c to
 * stage 0's chunk c+1), gradients back. Every layer's weight gradient is
 * summed over the micro-batches in increasing order, as 1F1B does, so the
 * weights equal those of 1F1B / one process bit for bit
 * (tests/test_interleaved.sh). Host memory (the CPU backend) only. */
#ifndef RP_PIPE_PIPE_INTERLEAVED_H
#define RP_PIPE_PIPE_INTERLEAVED_H

#include "model/backward.h"
#include "model/model.h"
#include "optim/optim.h"
#include "pipe/grid.h"
#include "pipe/pipe_train.h"
#include "pipe/schedule.h"
#include "pipe/transport.h"

typedef struct {
    const rp_grid *grid;
    rp_transport *tp;
    int stage, n_stages, dp, n_virtual, n_micro, micro_batch_size, ctx_len;
    rp_schedule sched;
    rp_model *models, *grads, *adam_m, *adam_v;  /* [n_virtual], the caller's */
    int n_slots;                                 /* stash slots per chunk */
    rp_backward_workspace *stash;                /* [n_virtual * n_slots] */
    rp_transfer (*pending)[4];                   /* sends reading a slot: x, v_first, dx, dv */
    rp_state *state, *dstate;                    /* [n_virtual] */
    float *landing[2];                           /* activations, gradients: x then
                                                  * v_first [2][R*C] each */
    rp_transfer in[2][2];                        /* the receive posted into each */
    int in_at[2];                                /* its instruction, -1: none */
    float *scratch;                              /* > 2 replicas: replica-order sums */
    int *seq_len, *slot, *row_begin;
    rp_batch batch;
    double timeout_s;
    int halt_on_nan;
} rp_pipe_interleaved;

/* Chunk c of this stage is model chunk c * n_stages + stage; layers[k]
 * (v * P counts) partitions the layers over the model chunks. */
void rp_interleaved_chunk_layers(const int *layers, int n_stages, int n_virtual, int stage,
                                 int chunk, int *begin, int *end);

/* models/grads/adam_m/adam_v: this stage's n_virtual chunk models in chunk
 * order (model chunk c*P + stage each). n_micro a multiple of the stages. */
rp_status rp_pipe_interleaved_init(rp_pipe_interleaved *pi, rp_model *models, rp_model *grads,
                                   rp_model *adam_m, rp_model *adam_v, int n_virtual,
                                   const rp_grid *grid, rp_transport *tp, int n_micro,
                                   int micro_batch_size, int ctx_len, rp_error *err);
void rp_pipe_interleaved_free(rp_pipe_interleaved *pi);

/* One optimizer step; the arguments and the result as rp_pipe_trainer_step. */
rp_status rp_pipe_interleaved_step(rp_pipe_interleaved *pi, const int32_t *inputs,
                                   const int32_t *targets, float loss_scale, float l2wrap_factor,
                                   const rp_optim_config *optim, long step,
                                   rp_pipe_step_result *res, rp_error *err);

/* Forward of one batch (evaluation): rp_pipe_forward over the chunks in
 * model order, states[c] the recurrent state of chunk c. */
rp_status rp_pipe_forward_interleaved(const rp_model *models, int n_virtual, rp_transport *tp,
                                      int stage, int n_stages, rp_workspace *ws,
                                      const int32_t *tokens, const rp_batch *batch,
                                      rp_state *states, rp_logits_mode mode, float *logits,
                                      rp_error *err);

#endif
