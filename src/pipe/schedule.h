/* Pipeline schedules as data (docs/parallelism.md). A pure function builds,
 * for every stage of a P-stage pipeline running M micro-batches in one
 * optimizer step, the list of instructions that stage executes in order. The
 * executor (src/pipe/pipe_train.c) is a switch over the opcodes, so a new
 * schedule (interleaved 1F1B, zero-bubble) is a new generator only.
 *
 * Conventions every generator keeps (the simulator checks them):
 * - Stage 0 has no RECV_ACT / SEND_GRAD, the last stage no SEND_ACT /
 *   RECV_GRAD (it computes the loss itself); with P = 1 a stage's list is
 *   FWD/BWD pairs only.
 * - Per micro-batch m on stage s, in list order: [RECV_ACT m] FWD m [SEND_ACT m],
 *   then later [RECV_GRAD m] BWD m [SEND_GRAD m].
 * - Backward passes run in increasing micro-batch order on every stage (so the
 *   gradient sums are accumulated in the same order as one process); with
 *   time chunks, in decreasing chunk order within each sequence group.
 * - `buffer` of FWD/BWD/RECV_ACT/SEND_ACT/RECV_GRAD/SEND_GRAD is the stash
 *   slot (0 .. n_buffers[s]-1) holding micro-batch m's activations from its
 *   FWD until its BWD; a slot is never reused before the BWD of its previous
 *   micro-batch. GPipe: n_buffers = M; 1F1B: n_buffers = min(M, P - s);
 *   ZB-H1: n_buffers = min(M, P) (a slot is held until the BWD_W).
 * - ZB-H1 has BWD_B m (with the RECV_GRAD / SEND_GRAD around it) where 1F1B
 *   has BWD m, in the same places, and BWD_W m later, in increasing m:
 *   stage s keeps up to s BWD_W pending, so the last stages fill their
 *   drain bubble with weight gradients (docs/parallelism.md). 
 * - Every list ends with REDUCE_GRADS then OPT_STEP (micro_batch = -1,
 *   buffer = -1).
 * - Interleaved 1F1B (virtual stages): stage s holds v chunks of layers;
 *   chunk c of stage s is model chunk c*P + s (Megatron's layout), so the
 *   conventions above hold per model chunk: chunk c of the last stage sends
 *   to chunk c+1 of stage 0. `chunk` names it in every instruction (0 for
 *   the other kinds); the stash slots belong to the stage, shared by its
 *   chunks. pipe_train.c executes them, one pool of slots for every chunk. */
#ifndef RP_PIPE_SCHEDULE_H
#define RP_PIPE_SCHEDULE_H

#include <stdio.h>

#include "core/error.h"

typedef enum {
    RP_OP_RECV_ACT = 0,  /* receive micro-batch m's activations from stage s-1 */
    RP_OP_FWD,           /* forward of stage s on micro-batch m */
    RP_OP_SEND_ACT,      /* send its output activations to stage s+1 */
    RP_OP_RECV_GRAD,     /* receive d(output) of micro-batch m from stage s+1 */
    RP_OP_BWD,           /* backward of stage s on micro-batch m */
    RP_OP_SEND_GRAD,     /* send d(input) to stage s-1 */
    RP_OP_REDUCE_GRADS,  /* all-reduce gradients over the data-parallel replicas */
    RP_OP_OPT_STEP,      /* optimizer step */
    /* Zero-bubble schedules split BWD in two: BWD_B computes d(input) (and
     * the small parameters' gradients), which the previous stage waits for;
     * BWD_W later the large matrices' weight gradients, off the critical
     * path. A micro-batch's stash slot is free only after its BWD_W. */
    RP_OP_BWD_B,
    RP_OP_BWD_W,
    /* Time chunks only: a chunk's backward needs its activations again,
     * which a stage past the first could rebuild only from its input. So
     * the previous stage, which recomputes the chunk's forward from its
     * kept start state anyway, sends the recomputed output once more
     * (same bytes as the first forward's): RECV_RECOMP m takes it (stage
     * s > 0), RECOMP m recomputes chunk m's forward into the buffer (the
     * last stage with the head's loss and backward), SEND_RECOMP m sends it
     * on. No stage keeps a chunk's input between its FWD and its BWD. */
    RP_OP_RECV_RECOMP,
    RP_OP_RECOMP,
    RP_OP_SEND_RECOMP,
    RP_OP_COUNT
} rp_pipe_opcode;

typedef struct {
    rp_pipe_opcode op;
    int micro_batch;  /* -1 for REDUCE_GRADS / OPT_STEP */
    int buffer;       /* stash slot, -1 for REDUCE_GRADS / OPT_STEP */
    int chunk;        /* interleaved: which of the stage's v chunks; else 0 */
} rp_pipe_instr;

typedef enum {
    RP_SCHEDULE_GPIPE = 0,
    RP_SCHEDULE_1F1B,
    RP_SCHEDULE_ZB_H1,  /* zero bubble ZB-H1 (Qi et al. 2023), 1F1B's memory */
    RP_SCHEDULE_INTERLEAVED,  /* interleaved 1F1B (Narayanan et al. 2021), v chunks */
    RP_SCHEDULE_KIND_COUNT
} rp_schedule_kind;

typedef struct {
    rp_schedule_kind kind;
    int n_stages, n_micro;
    int *n_instr;            /* [n_stages] */
    rp_pipe_instr **instr;   /* [n_stages][n_instr[s]] */
    int *n_buffers;          /* [n_stages] stash slots each stage needs */
    /* Time chunks (rp_schedule_build_time_chunks): every n_chunks consecutive
     * micro-batches are the consecutive time chunks of one batch of
     * sequences; 1 otherwise. */
    int n_chunks;
    /* Interleaved: v chunks of layers per stage; 1 for the other kinds (0
     * is read as 1, for schedules filled in by hand). */
    int n_virtual;
} rp_schedule;

/* n_stages >= 1, 1 <= n_micro <= RP_SCHEDULE_MAX_MICRO. */
#define RP_SCHEDULE_MAX_MICRO 4096
/* Also n_stages <= RP_SCHEDULE_MAX_STAGES: far beyond any real pipeline, and
 * it bounds the lists' and the simulator's memory (both grow as P x M). */
#define RP_SCHEDULE_MAX_STAGES 1024
/* kind RP_SCHEDULE_INTERLEAVED needs rp_schedule_build_interleaved. */
rp_status rp_schedule_build(rp_schedule *s, rp_schedule_kind kind, int n_stages, int n_micro,
                            rp_error *err);
/* Megatron's interleaved 1F1B: n_stages >= 2, 2 <= n_virtual <=
 * RP_SCHEDULE_MAX_VIRTUAL, n_micro a multiple of n_stages. Stage s runs
 * the v*M (micro-batch, chunk) pairs in the order k = 0, 1, ...: micro-batch
 * (k / (P*v))*P + k % P, chunk (k / P) % v for forwards and v-1 minus that
 * for backwards; (P-s-1)*2 + (v-1)*P forwards of warm-up (all of them when
 * M = P), then one forward one backward, then the remaining backwards.
 * Under unit costs the bubble is (P-1)/(v*M+P-1). */
#define RP_SCHEDULE_MAX_VIRTUAL 64
rp_status rp_schedule_build_interleaved(rp_schedule *s, int n_stages, int n_micro, int n_virtual,
                                        rp_error *err);
/* Time chunks (docs/training.md, Long sequences): micro-batch m is chunk
 * m % n_chunks of sequence group m / n_chunks (n_micro a multiple of
 * n_chunks). Chunk c starts from the recurrent state chunk c-1 left on the
 * same stage, and its backward needs d(state) from chunk c+1's backward on
 * the same stage, so per group every stage runs the forwards in increasing
 * chunk order, then the backwards in DECREASING chunk order (the BPTT
 * order); groups follow each other. Stage s forwards chunk c while stage s+1
 * forwards chunk c-1, and backwards chunk c while s+1 backwards chunk c-1.
 * `buffer` is m itself (n_buffers = n_micro): what a stage keeps of a chunk
 * between its FWD and BWD is its start state (and, past stage 0, its input);
 * the executor recomputes the chunk's activations in its BWD. */
rp_status rp_schedule_build_time_chunks(rp_schedule *s, int n_stages, int n_micro, int n_chunks,
                                        rp_error *err);
void rp_schedule_free(rp_schedule *s);

const char *rp_schedule_kind_name(rp_schedule_kind k);  /* "gpipe", "1f1b", "zb-h1", "interleaved" */
int rp_schedule_kind_from_name(const char *name);       /* -1 if unknown */
const char *rp_pipe_opcode_name(rp_pipe_opcode op);     /* "RECV_ACT", ... */

/* ---- simulator (no MPI) ----
 * Runs all stages' lists together: a stage advances while its next
 * instruction can run (a RECV needs the matching SEND to have happened on the
 * neighbour; sends are asynchronous), compute ops (FWD/BWD) take the given
 * time units, communication takes comm_cost, REDUCE_GRADS/OPT_STEP take 0
 * here. Reports a deadlock (no stage can move while some list is unfinished)
 * as an error naming each stuck stage and instruction. */
typedef struct {
    double fwd_cost, bwd_cost, comm_cost;  /* unit costs: 1, 1, 0 */
    /* The part of bwd_cost that BWD_W takes (BWD_B the rest); 0: half. */
    double bwd_w_cost;
} rp_sim_costs;

typedef struct {
    double makespan;            /* time at which the last stage finishes */
    double *busy;               /* [n_stages] compute time of each stage */
    double bubble_fraction;     /* 1 - sum(busy) / (n_stages * makespan) */
    int *peak_stashed;          /* [n_stages] max micro-batches between FWD and BWD
                                 * (interleaved: (micro-batch, chunk) pairs) */
    /* Timeline for printing: per stage, the start time of each instruction. */
    double **start;             /* [n_stages][n_instr[s]] */
    rp_sim_costs costs;         /* the costs simulated (durations for the timeline) */
} rp_sim_result;

rp_status rp_schedule_simulate(const rp_schedule *s, const rp_sim_costs *costs,
                               rp_sim_result *r, rp_error *err);
void rp_sim_result_free(rp_sim_result *r, int n_stages);

/* Draws the simulated timeline as text, one row per stage, one column per
 * time unit ("F3" / "B3" cells, "F3.1" with chunk 1 when interleaved, "."
 * idle), then the bubble fraction next to the theory (P-1)/(M+P-1), or
 * (P-1)/(v*M+P-1) when interleaved, and each stage's peak stash. */
void rp_schedule_print_timeline(const rp_schedule *s, const rp_sim_result *r, FILE *out);

#endif
