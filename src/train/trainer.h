/* The training loop of one process that owns the whole model (the pipeline
 * engine will split exactly these steps across stages): data (token shards or
 * an embedded synthetic task), micro-batches with gradient accumulation, the
 * official AdamW recipe with clipping and L2Wrap, periodic evaluation, metrics
 * (JSON lines) and progress reports. Called by `rwkvpipe train`. */
#ifndef RP_TRAIN_TRAINER_H
#define RP_TRAIN_TRAINER_H

#include <signal.h>
#include <stdint.h>
#include <stdio.h>

#include "model/model.h"
#include "pipe/grid.h"
#include "pipe/schedule.h"
#include "optim/optim.h"
#include "train/synthetic.h"

typedef struct {
    /* data: synthetic task name ("mqar", "copy") or shard paths */
    const char *const *data_paths;
    int n_data_paths;
    int synthetic;              /* 1: use synth below instead of shards */
    rp_synth_config synth;
    int ctx_len;
    /* Time chunks (docs/training.md, Long sequences): samples of seq_len
     * tokens (a multiple of ctx_len; 0 = ctx_len) trained as seq_len /
     * ctx_len chunks of ctx_len that carry the recurrent state, full BPTT
     * across them unless tbptt. Memory is that of ctx_len. */
    int seq_len;
    int tbptt;
    /* State tuning (docs/training.md): train only each layer's initial WKV
     * state, weights frozen; the result is written to state_out as the
     * state-tuning file the server loads (blocks.L.att.time_state [H,N,N]).
     * Evaluation starts from the tuned states. */
    int tune_state;
    const char *state_out;
    /* LoRA tuning (docs/training.md, LoRA; model/lora.h): adapters of rank
     * lora_rank, scale lora_alpha / lora_rank, on the lora_targets mask of
     * every layer, base weights frozen; written to lora_out. The model runs
     * on W + s B A, so -o writes the merged weights. */
    int tune_lora;
    int lora_rank;
    float lora_alpha;
    unsigned lora_targets;
    const char *lora_out;
    int batch_size;             /* sequences per optimizer step */
    int micro_batch_size;            /* sequences per forward/backward */
    int loss_on_answers_only;   /* synthetic tasks: loss only where the mask is set */
    int l2wrap;                 /* official L2Wrap term (default on) */
    rp_optim_config optim;      /* optim.total_steps = steps */
    long steps;                 /* length of the run (and of the LR schedule) */
    long stop_after;            /* stop (with a checkpoint) after this step; 0 = at `steps` */
    long eval_interval;         /* 0: only at the end */
    int eval_batches;
    int eval_all_windows;       /* rp_train_evaluate on shards: every window, not the split */
    long log_interval;
    uint64_t seed;              /* data order and synthetic samples */
    const char *metrics_path;   /* JSON lines, NULL = none */
    const char *save_path;      /* final weights (safetensors), NULL = none */
    const char *ckpt_dir;       /* checkpoint directory (docs/checkpoints.md), NULL = none */
    long ckpt_interval;         /* save every N steps (and at the end); 0 = only at the end */
    int keep_last;              /* keep the newest K checkpoints; 0 = all */
    const char *resume_path;    /* checkpoint to continue from (weights, moments, progress) */
    FILE *progress;             /* progress lines, NULL = quiet */
    /* Parallel runs (docs/parallelism.md). grid NULL: one process. The model
     * passed to rp_train_run is then this rank's stage slice. The global batch
     * batch_size = replicas x micro-batches x micro_batch_size. */
    const rp_grid *grid;
    rp_schedule_kind pipe_schedule;  /* GPipe or 1F1B (default) */
    /* Interleaved 1F1B (pipe_schedule RP_SCHEDULE_INTERLEAVED): this stage's
     * n_virtual chunk models in chunk order (chunk c is model chunk
     * c * pp + stage, pipe/pipe_train.h); the run trains, evaluates
     * and saves these instead of the model argument (which is chunks[0]). */
    rp_model *chunks;
    int n_virtual;
    const int *chunk_layers;  /* [n_virtual * pp] layers of each model chunk */
    double comm_timeout;        /* seconds a stage waits on a peer before failing; 0: forever */
    int halt_on_nan;            /* stop at a non-finite gradient (default); 0: skip that step */
    /* ZeRO stage (docs/parallelism.md): 1 shards the Adam moments over the
     * data replicas of each stage (optim/zero.h); 0 (default) keeps them
     * whole on every replica. Same weights either way, bit for bit. */
    int zero;
    /* A backend of host memory (is_host_memory; borrowed) for the run's host
     * copies: --zero 1's save gathers the whole fp32 weights into it on
     * replica 0 (pipe/pipe_zero.h). Required with zero; the model's backend
     * itself when that is host memory. The CLI passes the CPU backend. */
    rp_backend *host_backend;
    /* Set (to a signal number) by the caller's signal handler: the run stops
     * after the current step, on every rank at the same step, with a
     * checkpoint when ckpt_dir is set. NULL: not watched. */
    volatile sig_atomic_t *stop_signal;
} rp_train_options;

typedef struct {
    long steps_done;
    double last_loss;           /* mean loss of the last step */
    double eval_loss, eval_accuracy;
    double tokens_per_second;
    double seconds;
    long skipped_steps;         /* non-finite steps skipped (halt_on_nan off) */
    int stopped_by_signal;      /* the signal that stopped the run early, 0: none */
} rp_train_result;

void rp_train_options_defaults(rp_train_options *o);

/* One --data argument: "mqar" / "copy" select a synthetic task, anything
 * else is appended to paths (caller storage, *n_paths entries so far). */
void rp_train_options_add_data(rp_train_options *o, const char **paths, int *n_paths,
                               const char *arg);

/* Trains `model` (the whole model, or with o->grid this rank's stage) in place (allocates gradients and moments alongside). With
 * resume_path the weights, moments, step, LR position and data cursor come
 * from that checkpoint (model must be allocated with its config), and the run
 * continues exactly where it stopped: training N steps, saving, resuming and
 * training to 2N gives the same weights bit for bit as 2N steps at once.
 * With --zero 1's bf16 all-gather the model comes back with only this
 * replica's range of the GEMM matrices current in fp32 (the rest stale, or
 * its pages given back: pipe/pipe_zero.h); -o and checkpoints hold it whole. */
rp_status rp_train_run(rp_model *model, const rp_train_options *o, rp_train_result *result,
                       rp_error *err);

/* Mean loss and accuracy (arg-max == target) over the positions with a
 * target of n_batches eval batches (held-out split / eval stream); with
 * eval_all_windows on shards, over every window (n_batches is ignored).
 * *n_targets (may be NULL) receives the number of positions scored. */
rp_status rp_train_evaluate(const rp_model *model, const rp_train_options *o, int n_batches,
                            double *loss, double *accuracy, long *n_targets, rp_error *err);

#endif
