/* The pipeline executor, the only one: runs one stage's schedule
 * (schedule.h; GPipe, 1F1B, ZB-H1, time chunks, interleaved 1F1B) for one
 * optimizer step, moving activations and their gradients with the transport
 * (transport.h), stashing each micro-batch's activations from its forward
 * until its backward, reducing gradients over the data replicas and taking
 * the optimizer step with the global gradient norm. One process is the case
 * P = 1, DP = 1 of the same code (no transfers), which is why any layout
 * gives the numbers of one process: every stage runs exactly the ops one
 * process would, in the same order, on the same micro-batches.
 *
 * Interleaved 1F1B: stage s of P holds v chunks of layers, model chunks s,
 * P+s, 2P+s, ... (Megatron's layout), each an ordinary rp_model with its own
 * gradients and moments; every instruction runs on the chunk it names.
 * Activations go from model chunk k to k+1 (the last stage's chunk c to
 * stage 0's chunk c+1), gradients back. The stash slots are one pool shared
 * by the chunks, as many as the schedule's peak of (micro-batch, chunk)
 * pairs in flight on the stage (rp_schedule.n_buffers), each sized for the
 * stage's largest chunk. Host memory (the CPU backend) only.
 *
 * Also the plain pipelined forward (evaluation, logits) on an inference
 * workspace.
 *
 * Buffers are backend memory throughout (activations, landing buffers,
 * gradients); the transport moves them (a transport for device memory:
 * rp_transport_use_backend, optionally NCCL). */
#ifndef RP_PIPE_PIPE_TRAIN_H
#define RP_PIPE_PIPE_TRAIN_H

#include "model/model.h"
#include "model/backward.h"
#include "pipe/critical_path.h"
#include "pipe/grid.h"
#include "pipe/schedule.h"
#include "pipe/transport.h"
#include "optim/optim.h"
#include "optim/zero.h"

typedef struct {
    const rp_grid *grid;            /* NULL: one process */
    rp_transport *tp;               /* over grid->pipe_comm; NULL with one stage */
    int stage, n_stages, dp;
    int n_micro;                    /* micro-batches per step on this replica */
    int micro_batch_size, ctx_len;  /* each micro-batch: micro_batch_size sequences x ctx_len
                                     * tokens (micro_batch, as in the schedule, is an index) */
    rp_schedule sched;
    /* [n_virtual] each, the caller's: chunk c is model chunk c * n_stages +
     * stage (n_virtual 1: the stage's one model). */
    rp_model *model, *grads, *adam_m, *adam_v;
    int n_virtual;
    rp_backward_workspace *stash;      /* [n_stash], shared by the chunks */
    int n_stash;
    rp_transfer (*pending)[4];      /* [n_stash] sends still reading a stash slot:
                                     * 0, 1 x and v_first; 2, 3 dx and d v_first */
    rp_state state, dstate;         /* sized for the largest chunk; the running
                                     * instruction's chunk sets their geometry */
    /* Time chunks (rp_pipe_trainer_init_time_chunks): every n_chunks
     * consecutive micro-batches are the time chunks of one batch of
     * sequences; 1: each micro-batch is whole sequences. tbptt: no state
     * gradient between chunks. chunk_states [n_micro] start states, all
     * a FWD keeps of a chunk: its RECOMP recomputes the forward from it
     * (past stage 0 from the previous stage's recomputed output, received
     * into recv_recomp [2][R*C] through recomp_in), so a stage's memory
     * does not grow with the sequence beyond the start states. */
    int n_chunks, tbptt;
    float *chunk_states, *recv_recomp;
    rp_transfer recomp_in[2];
    int recomp_in_mb;               /* micro-batch posted in recomp_in, -1: none */
    /* State tuning (rp_pipe_trainer_tune_state): this stage's layers' tuned
     * initial WKV states [layers][H][N][N] (backend memory, with its AdamW
     * moments and a device copy of the gradient) start every sequence in
     * every slot; the gradient (host, summed over the slots) is d(initial
     * state) from the backward; the optimizer steps only them. */
    int tune_state;
    size_t tuned_floats;
    float *tuned, *tuned_m, *tuned_v, *tuned_grad_dev;
    float *tuned_grad, *dstate_host;
    /* LoRA tuning (model/lora.h; NULL: off): the optimizer steps only this
     * stage's adapters, from the reduced d(W') of their targets; the step's
     * grad_norm is the adapters' gradient norm. Set by the caller: one per
     * chunk ([n_virtual], each over its chunk's model). */
    struct rp_lora_s *lora;
    float *recv_act, *recv_grad;    /* backend landing buffers: x then v_first [2][R*C] */
    rp_transfer act_in[2], grad_in[2];
    int act_in_mb, grad_in_mb;      /* pair posted in act_in / grad_in (chunk * n_micro +
                                     * micro-batch), -1: none */
    int *seq_len, *slot, *row_begin;
    rp_batch batch;
    double timeout_s;               /* watchdog of the collectives (the transport's) */
    int halt_on_nan;                /* a non-finite gradient is an error (else: skip the step) */
    double busy_seconds;            /* compute time of the last step: FWD, BWD and the update */
    double update_seconds;          /* its part outside FWD/BWD: gradient zeroing, local
                                     * gradient norm, AdamW */
    double fwd_seconds;             /* its part in FWD instructions (on the last stage
                                     * these include the head's backward) */
    long steps_done;                /* rp_pipe_trainer_step calls that succeeded */
    /* Optional timeline of the last step (benchmarks): when trace is set
     * (trace_cap entries, the caller's memory), each instruction's opcode,
     * micro-batch, chunk and start/end seconds on this rank's monotonic
     * clock, for every schedule. */
    struct rp_pipe_trace_entry *trace;  /* pipe/critical_path.h */
    int trace_cap, trace_len;
    /* Zero-bubble schedules (BWD_B / BWD_W): per stash slot, the layers'
     * output gradients that the slot's BWD_W turns into weight gradients
     * (rp_backward_wsave_floats per layer); NULL for the other kinds. */
    float **wsave;
    /* Gradient all-reduce over the data replicas on device memory: NCCL, or
     * MPI through the host buffer (NULL on host memory: MPI in place). */
    rp_nccl_group *data_nccl;
    float *reduce_host;
    size_t reduce_host_floats;
    /* ZeRO-1 (rp_pipe_trainer_use_zero; NULL: off): this replica's shard of
     * the moments (the caller's; one per chunk, [n_virtual]), which OPT_STEP
     * steps instead of adam_m / adam_v. zero_scratch (host, the largest buffer's floats):
     * the fixed-order reduce-scatter's landing buffer, also used without
     * ZeRO on more than 2 replicas so both runs add in the same order. */
    rp_zero_shard *zero;
    float *zero_scratch;
    /* ZeRO-1's reduce-scatter / all-gather of backend buffers, host or
     * device (pipe_zero.h); NULL with one replica. */
    struct rp_zero_links *zero_links;
} rp_pipe_trainer;

rp_status rp_pipe_trainer_init(rp_pipe_trainer *pt, rp_model *model, rp_model *grads,
                               rp_model *adam_m, rp_model *adam_v, const rp_grid *grid,
                               rp_transport *tp, rp_schedule_kind kind, int n_micro,
                               int micro_batch_size, int ctx_len, rp_error *err);
/* The same for sequences of n_chunks x ctx_len tokens trained as n_chunks
 * time chunks (micro-batches) that carry the recurrent state: full BPTT
 * across chunks (tbptt 0) or truncated at each chunk (tbptt 1). n_micro
 * counts chunks (a multiple of n_chunks); the schedule is
 * rp_schedule_build_time_chunks whatever `kind`. The gradients equal those
 * of one pass over the whole sequences (tests/test_time_chunks.sh). Memory:
 * min(n_chunks, P - stage) chunks' activations plus per chunk its start
 * state; no chunk's input (the previous stage sends it again, recomputed:
 * RP_OP_RECV_RECOMP). */
rp_status rp_pipe_trainer_init_time_chunks(rp_pipe_trainer *pt, rp_model *model,
                                           rp_model *grads, rp_model *adam_m, rp_model *adam_v,
                                           const rp_grid *grid, rp_transport *tp,
                                           rp_schedule_kind kind, int n_micro,
                                           int micro_batch_size, int ctx_len, int n_chunks,
                                           int tbptt, rp_error *err);
/* Interleaved 1F1B (rp_schedule_build_interleaved): model/grads/adam_m/
 * adam_v are this stage's n_virtual >= 2 chunk models in chunk order (model
 * chunk c * P + stage each); P >= 2 stages, n_micro a multiple of P. The
 * weights equal those of 1F1B / one process bit for bit
 * (tests/test_interleaved.sh). No time chunks, state / LoRA tuning or ZeRO
 * with it (the caller refuses them). */
rp_status rp_pipe_trainer_init_interleaved(rp_pipe_trainer *pt, rp_model *models,
                                           rp_model *grads, rp_model *adam_m, rp_model *adam_v,
                                           int n_virtual, const rp_grid *grid, rp_transport *tp,
                                           int n_micro, int micro_batch_size, int ctx_len,
                                           rp_error *err);
/* Chunk c of stage s is model chunk c * n_stages + s; layers[k] (v * P
 * counts) partitions the layers over the model chunks. */
void rp_interleaved_chunk_layers(const int *layers, int n_stages, int n_virtual, int stage,
                                 int chunk, int *begin, int *end);
/* Turns on state tuning (after init): the tuned states start at zero (the
 * official init; write pt->tuned to start elsewhere). The weights stay as
 * they are; the step's grad_norm is the tuned states' gradient norm. */
rp_status rp_pipe_trainer_tune_state(rp_pipe_trainer *pt, rp_error *err);
void rp_pipe_trainer_free(rp_pipe_trainer *pt);
/* Turns on ZeRO-1 (after init; host or device memory, NCCL where the
 * gradients' all-reduce would use it): gradients are reduce-scattered, AdamW runs
 * on z's ranges (z: this replica's shard, rp_zero_shard_init with the grid's
 * dp and replica; interleaved: n_virtual shards, one per chunk, each made
 * from that chunk's gradients), the updated ranges are all-gathered. The
 * weights equal those of the unsharded run bit for bit (tests/test_zero.sh,
 * tests/test_interleaved.sh). */
rp_status rp_pipe_trainer_use_zero(rp_pipe_trainer *pt, rp_zero_shard *z, rp_error *err);

typedef struct {
    double loss_sum;    /* summed over every target of the global batch (all replicas) */
    double grad_norm;   /* global, before clipping */
    int skipped;        /* the gradient was not finite and the update was skipped */
} rp_pipe_step_result;

/* Sums n floats of host memory over comm (the data replicas) in place, in
 * pieces MPI's int counts can address; stage names the caller in errors. */
rp_status rp_pipe_allreduce_floats(MPI_Comm comm, int stage, float *p, size_t n,
                                   double timeout_s, rp_error *err);
/* The global gradient norm from this stage's sum of squares (summed over
 * the stages on pipe_comm); a NaN or inf norm is an error with halt_on_nan,
 * else *skip = 1 (the executor's OPT_STEP). */
rp_status rp_pipe_global_grad_norm(MPI_Comm pipe_comm, int n_stages, double sumsq,
                                   double timeout_s, const rp_transport *tp, int halt_on_nan,
                                   long step, double *norm, int *skip, rp_error *err);
/* One optimizer step. inputs / targets: [n_micro][micro_batch_size * ctx_len] of
 * this replica (targets < 0 take no loss); loss_scale = 1 / targets in the
 * global batch. A non-finite gradient norm (NaN or inf loss) leaves the
 * weights and moments untouched on every rank, and is an RP_ERR_DIVERGED
 * error with halt_on_nan, else res->skipped = 1. optim NULL: gradients only
 * (`logits --grads`): the step ends with pt->grads summed over the replicas,
 * no norm is taken and the weights stay (adam_m / adam_v may be NULL). */
rp_status rp_pipe_trainer_step(rp_pipe_trainer *pt, const int32_t *inputs,
                               const int32_t *targets, float loss_scale, float l2wrap_factor,
                               const rp_optim_config *optim, long step, rp_pipe_step_result *res,
                               rp_error *err);

/* Forward of one batch through the pipeline on an inference workspace: stage 0
 * embeds `tokens`, each stage runs its layers on `state` (its layers), the
 * last stage writes logits (mode) into `logits` (backend memory). tp NULL
 * with one stage; with a backend whose memory is not host memory, tp must
 * have been given it (rp_transport_use_backend). Collective over the pipe. */
rp_status rp_pipe_forward(const rp_model *m, rp_transport *tp, int stage, int n_stages,
                          rp_workspace *ws, const int32_t *tokens, const rp_batch *batch,
                          rp_state *state, rp_logits_mode mode, float *logits, rp_error *err);

/* Forward of one batch (evaluation) over interleaved chunks: rp_pipe_forward
 * over the stage's chunks in model order, states[c] the recurrent state of
 * chunk c. */
rp_status rp_pipe_forward_interleaved(const rp_model *models, int n_virtual, rp_transport *tp,
                                      int stage, int n_stages, rp_workspace *ws,
                                      const int32_t *tokens, const rp_batch *batch,
                                      rp_state *states, rp_logits_mode mode, float *logits,
                                      rp_error *err);

#endif
