/* Longest path through one traced pipeline step (critical_path.h): a
 * topological sweep like the simulator's, every stage advancing while its
 * next instruction's cross-stage predecessor is already finished. */
#include "pipe/critical_path.h"
#include "pipe/schedule.h"

#include <stdlib.h>

/* The SEND on the neighbour that a RECV waits for, or -1. */
static int find_send(const struct rp_pipe_trace_entry *t, int n, int op, int m, int chunk) {
    for (int i = 0; i < n; i++)
        if (t[i].op == op && t[i].micro_batch == m && t[i].chunk == chunk) return i;
    return -1;
}

/* The stage and chunk whose SEND a RECV on (s, chunk) waits for: the
 * previous model chunk for activations, the next one for gradients; model
 * chunk c * P + s wraps from the last stage to stage 0 (interleaved), and
 * past either end of the model there is none (*from = -1). */
static void sender_of(int op, int s, int chunk, int n_stages, int *from, int *from_chunk) {
    const int k = chunk * n_stages + s + (op == RP_OP_RECV_GRAD ? 1 : -1);
    *from = k < 0 ? -1 : k % n_stages;
    *from_chunk = k < 0 ? -1 : k / n_stages;
}

static int find_op(const struct rp_pipe_trace_entry *t, int n, int op) {
    for (int i = 0; i < n; i++)
        if (t[i].op == op) return i;
    return -1;
}

rp_status rp_pipe_critical_path(const struct rp_pipe_trace_entry *const *trace, const int *len,
                                int n_stages, double *critical_s, double *span_s,
                                rp_error *err) {
    *critical_s = *span_s = 0;
    if (n_stages < 1) return rp_error_set(err, RP_ERR_ARG, "critical path of %d stages", n_stages);
    size_t total = 0;
    for (int s = 0; s < n_stages; s++) total += (size_t)(len[s] > 0 ? len[s] : 0);
    /* finish[s][i]: the longest path ending with instruction i of stage s. */
    double **finish = calloc((size_t)n_stages, sizeof *finish);
    int *pc = calloc((size_t)n_stages, sizeof *pc);
    rp_status st = RP_OK;
    if (!finish || !pc) {
        st = rp_error_set(err, RP_ERR_NOMEM, "critical path of %zu instructions", total);
        goto done;
    }
    for (int s = 0; s < n_stages; s++)
        if (len[s] > 0 && !(finish[s] = calloc((size_t)len[s], sizeof **finish))) {
            st = rp_error_set(err, RP_ERR_NOMEM, "critical path of %zu instructions", total);
            goto done;
        }
    double first = 0, last = 0;
    int any = 0;
    for (int s = 0; s < n_stages; s++)
        for (int i = 0; i < len[s]; i++) {
            if (!any || trace[s][i].start_s < first) first = trace[s][i].start_s;
            if (!any || trace[s][i].end_s > last) last = trace[s][i].end_s;
            any = 1;
        }
    double longest = 0;
    for (size_t done_count = 0; done_count < total;) {
        int moved = 0;
        for (int s = 0; s < n_stages; s++) {
            while (pc[s] < len[s]) {
                const int i = pc[s];
                const struct rp_pipe_trace_entry *e = &trace[s][i];
                double ready = i > 0 ? finish[s][i - 1] : 0;
                double work_from = e->start_s;  /* the weight is end - work_from */
                if (e->op == RP_OP_RECV_ACT || e->op == RP_OP_RECV_GRAD ||
                    e->op == RP_OP_RECV_RECOMP) {
                    int from, from_chunk;
                    sender_of(e->op, s, e->chunk, n_stages, &from, &from_chunk);
                    const int send_op = e->op == RP_OP_RECV_ACT      ? RP_OP_SEND_ACT
                                        : e->op == RP_OP_RECV_RECOMP ? RP_OP_SEND_RECOMP
                                                                     : RP_OP_SEND_GRAD;
                    const int j = from >= 0 && from < n_stages
                                      ? find_send(trace[from], len[from], send_op,
                                                  e->micro_batch, from_chunk)
                                      : -1;
                    if (j < 0) {
                        st = rp_error_set(err, RP_ERR_ARG,
                                          "trace: stage %d, #%d %s of micro-batch %d chunk %d "
                                          "has no matching %s on stage %d chunk %d", s, i,
                                          rp_pipe_opcode_name((rp_pipe_opcode)e->op),
                                          e->micro_batch, e->chunk,
                                          rp_pipe_opcode_name((rp_pipe_opcode)send_op), from,
                                          from_chunk);
                        goto done;
                    }
                    if (pc[from] <= j) break;  /* the send is not on a path yet */
                    if (finish[from][j] > ready) ready = finish[from][j];
                    if (trace[from][j].end_s > work_from) work_from = trace[from][j].end_s;
                } else if (e->op == RP_OP_OPT_STEP && n_stages > 1) {
                    /* The all-reduce: every stage's OPT_STEP has begun. */
                    int wait = 0;
                    for (int o = 0; o < n_stages && !wait; o++) {
                        if (o == s) continue;
                        const int j = find_op(trace[o], len[o], RP_OP_OPT_STEP);
                        if (j < 0) continue;  /* a stage that stopped early */
                        if (pc[o] < j) {
                            wait = 1;
                            break;
                        }
                        const double before = j > 0 ? finish[o][j - 1] : 0;
                        if (before > ready) ready = before;
                        if (trace[o][j].start_s > work_from) work_from = trace[o][j].start_s;
                    }
                    if (wait) break;
                }
                double w = e->end_s - work_from;
                finish[s][i] = ready + (w > 0 ? w : 0);
                if (finish[s][i] > longest) longest = finish[s][i];
                pc[s]++;
                done_count++;
                moved = 1;
            }
        }
        if (!moved) {
            st = rp_error_set(err, RP_ERR_ARG, "trace: the stages wait for each other (a RECV "
                              "before its SEND on both sides): not one step of a schedule");
            goto done;
        }
    }
    *critical_s = longest;
    *span_s = any ? last - first : 0;
done:
    if (finish)
        for (int s = 0; s < n_stages; s++) free(finish[s]);
    free(finish);
    free(pc);
    return st;
}
