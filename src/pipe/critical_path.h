/* The executor's efficiency from its own trace: every instruction of one
 * step on every stage with its measured start and end; the critical path is
 * the longest path through the schedule's dependency graph (program order on
 * each stage, SEND -> RECV between neighbours, the stages' OPT_STEP
 * all-reduce), each instruction weighted by its measured work. Interleaved
 * traces: chunk c's RECV_ACT on stage s waits for chunk c's SEND_ACT on
 * stage s-1, on stage 0 for chunk c-1's on the last stage; RECV_GRAD the
 * reverse (chunk c's on stage s+1, on the last stage chunk c+1's on stage 0). */
#ifndef RP_PIPE_CRITICAL_PATH_H
#define RP_PIPE_CRITICAL_PATH_H

#include "core/error.h"

/* One executed instruction: opcode (rp_pipe_opcode), micro-batch (-1 for
 * REDUCE_GRADS / OPT_STEP), start and end in seconds on a clock every stage
 * shares (CLOCK_MONOTONIC of one host), and the stage's chunk it ran on
 * (interleaved; 0 for the other schedules). */
struct rp_pipe_trace_entry {
    int op, micro_batch;
    double start_s, end_s;
    int chunk;
};

/* Weights, so that waiting is never counted as work: a RECV weighs only
 * what it took after the matching SEND ended (end - max(start, send end)),
 * an OPT_STEP with P > 1 only what it took after the last stage reached it
 * (its gradient-norm all-reduce waits for every stage); everything else its
 * measured duration. Each weight is then a part of the instruction's own
 * interval that starts after every predecessor ended, so on one host
 * critical <= span always, and span / critical measures the executor's
 * overhead (transfers, polling latency, bookkeeping), whatever the machine's
 * speed did to the compute in that step.
 * trace[s] [len[s]] is stage s's trace in program order. On return
 * *critical_s = the longest path, *span_s = last end - first start over all
 * stages. An error names a RECV without its SEND (a trace that is not one
 * step of one schedule). */
rp_status rp_pipe_critical_path(const struct rp_pipe_trace_entry *const *trace, const int *len,
                                int n_stages, double *critical_s, double *span_s,
                                rp_error *err);

#endif
