/* Schedule generators: GPipe, 1F1B (PipeDream-Flush), ZB-H1 and interleaved
 * 1F1B as per-stage instruction lists (schedule.h). Pure functions of
 * (kind, P, M, v); the
 * executor in pipe_train.c and the simulator in simulate.c interpret them.
 * A new schedule is a new sched_build_* function here plus its tests. */
#include "pipe/schedule.h"

#include <stdlib.h>
#include <string.h>

static const char *const kind_names[RP_SCHEDULE_KIND_COUNT] = {"gpipe", "1f1b", "zb-h1",
                                                                 "interleaved"};

static const char *const opcode_names[RP_OP_COUNT] = {
    "RECV_ACT", "FWD", "SEND_ACT", "RECV_GRAD", "BWD", "SEND_GRAD", "REDUCE_GRADS", "OPT_STEP", "BWD_B", "BWD_W",
    "RECV_RECOMP", "RECOMP", "SEND_RECOMP"};

const char *rp_schedule_kind_name(rp_schedule_kind k) {
    return (unsigned)k < RP_SCHEDULE_KIND_COUNT ? kind_names[k] : "unknown";
}

int rp_schedule_kind_from_name(const char *name) {
    if (!name) return -1;
    for (int k = 0; k < RP_SCHEDULE_KIND_COUNT; k++)
        if (strcmp(name, kind_names[k]) == 0) return k;
    return -1;
}

const char *rp_pipe_opcode_name(rp_pipe_opcode op) {
    return (unsigned)op < RP_OP_COUNT ? opcode_names[op] : "UNKNOWN_OP";
}

/* One stage's list while it is being written; capacity is exact (see
 * sched_stage_length), so emitting never reallocates. */
typedef struct {
    rp_pipe_instr *instr;
    int n, capacity;
} sched_list;

/* Past the capacity only counts, so that rp_schedule_build reports a
 * generator whose length disagrees with sched_stage_length as a bug. */
static void sched_emit_chunk(sched_list *list, rp_pipe_opcode op, int micro_batch, int buffer,
                             int chunk) {
    if (list->n < list->capacity)
        list->instr[list->n] = (rp_pipe_instr){op, micro_batch, buffer, chunk};
    list->n++;
}

static void sched_emit(sched_list *list, rp_pipe_opcode op, int micro_batch, int buffer) {
    sched_emit_chunk(list, op, micro_batch, buffer, 0);
}

/* [RECV_ACT m] FWD m [SEND_ACT m]: the first stage reads its input from the
 * data loader, the last stage keeps its output for the loss. */
static void sched_emit_forward(sched_list *list, int stage, int n_stages, int m, int buffer) {
    if (stage > 0) sched_emit(list, RP_OP_RECV_ACT, m, buffer);
    sched_emit(list, RP_OP_FWD, m, buffer);
    if (stage < n_stages - 1) sched_emit(list, RP_OP_SEND_ACT, m, buffer);
}

/* [RECV_GRAD m] BWD m [SEND_GRAD m]: the last stage starts from its own loss,
 * the first stage has no one to send d(input) to. op: BWD, or BWD_B when
 * the weight gradients come later (BWD_W). */
static void sched_emit_backward_op(sched_list *list, int stage, int n_stages, int m, int buffer,
                                   rp_pipe_opcode op) {
    if (stage < n_stages - 1) sched_emit(list, RP_OP_RECV_GRAD, m, buffer);
    sched_emit(list, op, m, buffer);
    if (stage > 0) sched_emit(list, RP_OP_SEND_GRAD, m, buffer);
}

static void sched_emit_backward(sched_list *list, int stage, int n_stages, int m, int buffer) {
    sched_emit_backward_op(list, stage, n_stages, m, buffer, RP_OP_BWD);
}

static void sched_emit_step(sched_list *list) {
    sched_emit(list, RP_OP_REDUCE_GRADS, -1, -1);
    sched_emit(list, RP_OP_OPT_STEP, -1, -1);
}

/* Every schedule here runs each micro-batch's forward and backward once per
 * stage, so the list length depends only on the stage's position. */
static int sched_stage_length(rp_schedule_kind kind, int stage, int n_stages, int n_micro,
                              int n_virtual) {
    if (kind == RP_SCHEDULE_INTERLEAVED) {
        /* model chunk c*P + s is first only for c = 0, s = 0 and last only
         * for c = v-1, s = P-1 */
        const int n_model = n_stages * n_virtual;
        int per_round = 0;
        for (int c = 0; c < n_virtual; c++) {
            const int g = c * n_stages + stage;
            per_round += 2 + (g > 0 ? 2 : 0) + (g < n_model - 1 ? 2 : 0);
        }
        return n_micro * per_round + 2;
    }
    int per_micro = 2 + (stage > 0 ? 2 : 0) + (stage < n_stages - 1 ? 2 : 0);
    if (kind == RP_SCHEDULE_ZB_H1) per_micro++;  /* the BWD_W */
    return n_micro * per_micro + 2;
}

/* GPipe: all forwards, then all backwards, both in increasing m. Every
 * micro-batch stays stashed until the backward phase, so M buffers. */
static void sched_build_gpipe(sched_list *list, int stage, int n_stages, int n_micro,
                              int *n_buffers) {
    for (int m = 0; m < n_micro; m++) sched_emit_forward(list, stage, n_stages, m, m);
    for (int m = 0; m < n_micro; m++) sched_emit_backward(list, stage, n_stages, m, m);
    sched_emit_step(list);
    *n_buffers = n_micro;
}

/* 1F1B (PipeDream-Flush): stage s runs warmup = min(P-s-1, M) forwards, so
 * that the first gradient arrives from the last stage just as its pipe is
 * full, then alternates one forward with one backward, then drains the
 * remaining backwards. At most warmup + 1 = P - s micro-batches are stashed
 * at once, so buffer m % min(M, P-s) is free again by the time m reuses it:
 * the previous holder, m - (P-s), ran its backward before forward m. */
static void sched_build_1f1b(sched_list *list, int stage, int n_stages, int n_micro,
                             int *n_buffers) {
    int warmup = n_stages - stage - 1;
    if (warmup > n_micro) warmup = n_micro;
    int slots = n_stages - stage < n_micro ? n_stages - stage : n_micro;
    int next_fwd = 0, next_bwd = 0;
    for (int i = 0; i < warmup; i++, next_fwd++)
        sched_emit_forward(list, stage, n_stages, next_fwd, next_fwd % slots);
    while (next_fwd < n_micro) {
        sched_emit_forward(list, stage, n_stages, next_fwd, next_fwd % slots);
        next_fwd++;
        sched_emit_backward(list, stage, n_stages, next_bwd, next_bwd % slots);
        next_bwd++;
    }
    for (; next_bwd < n_micro; next_bwd++)
        sched_emit_backward(list, stage, n_stages, next_bwd, next_bwd % slots);
    sched_emit_step(list);
    *n_buffers = slots;
}

/* ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B's order
 * of forwards and input-gradient backwards (BWD_B), each micro-batch's
 * weight gradients (BWD_W) after its BWD_B, in increasing m, with up to
 * `stage` of them held back: in 1F1B stage s idles during the drain while
 * the stages before it finish their backwards, about s backward slots at
 * the end; the held-back BWD_Ws fill them. A slot is held from FWD to BWD_W:
 * at most warmup + 1 + stage = P micro-batches, 1F1B's peak (stage 0's).
 * Under unit costs F = B = W the bubble is (P-1)(F+B-W) against 1F1B's
 * (P-1)(F+B+W): a third. */
static void sched_build_zb_h1(sched_list *list, int stage, int n_stages, int n_micro,
                              int *n_buffers) {
    int warmup = n_stages - stage - 1;
    if (warmup > n_micro) warmup = n_micro;
    const int slots = n_stages < n_micro ? n_stages : n_micro;
    int next_fwd = 0, next_bwd = 0, next_w = 0;
    for (int i = 0; i < warmup; i++, next_fwd++)
        sched_emit_forward(list, stage, n_stages, next_fwd, next_fwd % slots);
    while (next_fwd < n_micro) {
        sched_emit_forward(list, stage, n_stages, next_fwd, next_fwd % slots);
        next_fwd++;
        sched_emit_backward_op(list, stage, n_stages, next_bwd, next_bwd % slots, RP_OP_BWD_B);
        next_bwd++;
        if (next_bwd - next_w > stage) {
            sched_emit(list, RP_OP_BWD_W, next_w, next_w % slots);
            next_w++;
        }
    }
    /* Drain: one BWD_W after each BWD_B fills the wait for the next
     * gradient; the held-back ones end the list. */
    for (; next_bwd < n_micro; next_bwd++) {
        sched_emit_backward_op(list, stage, n_stages, next_bwd, next_bwd % slots, RP_OP_BWD_B);
        if (next_bwd + 1 - next_w > stage) {
            sched_emit(list, RP_OP_BWD_W, next_w, next_w % slots);
            next_w++;
        }
    }
    for (; next_w < n_micro; next_w++) sched_emit(list, RP_OP_BWD_W, next_w, next_w % slots);
    sched_emit_step(list);
    *n_buffers = slots;
}

/* Interleaved 1F1B (Narayanan et al. 2021; Megatron-LM's
 * forward_backward_pipelining_with_interleaving). Step k of a stage's
 * forwards is micro-batch (k / (P*v))*P + k % P of chunk (k / P) % v: the
 * micro-batches go through in groups of P, each group through every chunk
 * before the next group starts; backwards run the same order with the
 * chunks reversed. The warm-up is Megatron's: 2 forwards per later stage
 * (each chunk's forward and the backward that answers it) plus (v-1)*P so
 * that the last stage's first backward, of chunk v-1, finds its forward
 * done; all of them when M = P. Buffers: slots are handed out in list order
 * from a free list, since a pair's slot is freed by its backward, which
 * does not come in forward order across chunks. */
static void sched_interleaved_pair(int k, int n_stages, int n_virtual, int forward, int *m,
                                   int *chunk) {
    const int group = n_stages * n_virtual;
    *m = (k / group) * n_stages + k % n_stages;
    *chunk = (k % group) / n_stages;
    if (!forward) *chunk = n_virtual - 1 - *chunk;
}

typedef struct {
    int *slot_of;   /* [v*M] slot of (chunk, m), -1 none */
    int *free_at;   /* [v*M] 1 if the slot is free */
    int peak;       /* slots used */
} sched_slots;

static int sched_slot_take(sched_slots *sl, int pair) {
    int b = 0;
    while (!sl->free_at[b]) b++;
    sl->free_at[b] = 0;
    sl->slot_of[pair] = b;
    if (b + 1 > sl->peak) sl->peak = b + 1;
    return b;
}

static void sched_interleaved_forward(sched_list *list, sched_slots *sl, int k, int stage,
                                      int n_stages, int n_virtual, int n_micro) {
    int m, c;
    sched_interleaved_pair(k, n_stages, n_virtual, 1, &m, &c);
    const int g = c * n_stages + stage, last = n_stages * n_virtual - 1;
    const int b = sched_slot_take(sl, c * n_micro + m);
    if (g > 0) sched_emit_chunk(list, RP_OP_RECV_ACT, m, b, c);
    sched_emit_chunk(list, RP_OP_FWD, m, b, c);
    if (g < last) sched_emit_chunk(list, RP_OP_SEND_ACT, m, b, c);
}

static void sched_interleaved_backward(sched_list *list, sched_slots *sl, int k, int stage,
                                       int n_stages, int n_virtual, int n_micro) {
    int m, c;
    sched_interleaved_pair(k, n_stages, n_virtual, 0, &m, &c);
    const int g = c * n_stages + stage, last = n_stages * n_virtual - 1;
    const int b = sl->slot_of[c * n_micro + m];
    if (g < last) sched_emit_chunk(list, RP_OP_RECV_GRAD, m, b, c);
    sched_emit_chunk(list, RP_OP_BWD, m, b, c);
    if (g > 0) sched_emit_chunk(list, RP_OP_SEND_GRAD, m, b, c);
    sl->free_at[b] = 1;
}

static rp_status sched_build_interleaved(sched_list *list, int stage, int n_stages, int n_micro,
                                         int n_virtual, int *n_buffers, rp_error *err) {
    const int total = n_micro * n_virtual;
    int warmup = n_micro == n_stages ? total
                                     : (n_stages - stage - 1) * 2 + (n_virtual - 1) * n_stages;
    if (warmup > total) warmup = total;
    sched_slots sl = {0};
    sl.slot_of = rp_malloc((size_t)total * sizeof *sl.slot_of, "interleaved slots", err);
    sl.free_at = rp_malloc((size_t)total * sizeof *sl.free_at, "interleaved slots", err);
    if (!sl.slot_of || !sl.free_at) {
        free(sl.slot_of);
        free(sl.free_at);
        return RP_ERR_NOMEM;
    }
    for (int i = 0; i < total; i++) sl.slot_of[i] = -1, sl.free_at[i] = 1;
    int next_fwd = 0, next_bwd = 0;
    for (; next_fwd < warmup; next_fwd++)
        sched_interleaved_forward(list, &sl, next_fwd, stage, n_stages, n_virtual, n_micro);
    for (; next_fwd < total; next_fwd++, next_bwd++) {
        sched_interleaved_forward(list, &sl, next_fwd, stage, n_stages, n_virtual, n_micro);
        sched_interleaved_backward(list, &sl, next_bwd, stage, n_stages, n_virtual, n_micro);
    }
    for (; next_bwd < total; next_bwd++)
        sched_interleaved_backward(list, &sl, next_bwd, stage, n_stages, n_virtual, n_micro);
    sched_emit_step(list);
    *n_buffers = sl.peak;
    free(sl.slot_of);
    free(sl.free_at);
    return RP_OK;
}

/* Time chunks (schedule.h): per group of n_chunks micro-batches, the
 * forwards forward in time; then the backward phase backward in time, as
 * 1F1B over the group's chunks with RECOMP in the forward's place: stage s
 * recomputes P-s-1 chunks ahead, so the recomputed activations flow down
 * the pipe while the gradients flow up, and a chunk's slot is free again
 * (its BWD ran) before the RECOMP min(K, P-s) chunks later reuses it. */
static void sched_emit_recompute(sched_list *list, int stage, int n_stages, int m, int buffer) {
    if (stage > 0) sched_emit(list, RP_OP_RECV_RECOMP, m, buffer);
    sched_emit(list, RP_OP_RECOMP, m, buffer);
    if (stage < n_stages - 1) sched_emit(list, RP_OP_SEND_RECOMP, m, buffer);
}

static void sched_build_time_chunks(sched_list *list, int stage, int n_stages, int n_micro,
                                    int n_chunks, int *n_buffers) {
    int warmup = n_stages - stage - 1;
    if (warmup > n_chunks) warmup = n_chunks;
    const int slots = n_stages - stage < n_chunks ? n_stages - stage : n_chunks;
    for (int g = 0; g < n_micro; g += n_chunks) {
        for (int c = 0; c < n_chunks; c++) sched_emit_forward(list, stage, n_stages, g + c, 0);
        /* k-th of the phase: chunk n_chunks-1-k, slot k % slots */
        int next_r = 0, next_b = 0;
        for (; next_r < warmup; next_r++)
            sched_emit_recompute(list, stage, n_stages, g + n_chunks - 1 - next_r,
                                 next_r % slots);
        for (; next_r < n_chunks; next_r++, next_b++) {
            sched_emit_recompute(list, stage, n_stages, g + n_chunks - 1 - next_r,
                                 next_r % slots);
            sched_emit_backward(list, stage, n_stages, g + n_chunks - 1 - next_b,
                                next_b % slots);
        }
        for (; next_b < n_chunks; next_b++)
            sched_emit_backward(list, stage, n_stages, g + n_chunks - 1 - next_b,
                                next_b % slots);
    }
    sched_emit_step(list);
    *n_buffers = slots;
}

static rp_status schedule_build(rp_schedule *s, rp_schedule_kind kind, int n_stages, int n_micro,
                                int n_chunks, int n_virtual, rp_error *err) {
    memset(s, 0, sizeof *s);
    if ((unsigned)kind >= RP_SCHEDULE_KIND_COUNT)
        return rp_error_set(err, RP_ERR_ARG, "schedule kind %d unknown: expected gpipe, 1f1b, "
                            "zb-h1 or interleaved", (int)kind);
    if (n_stages < 1)
        return rp_error_set(err, RP_ERR_ARG, "pipeline of %d stages: need >= 1", n_stages);
    if (n_stages > RP_SCHEDULE_MAX_STAGES)
        return rp_error_set(err, RP_ERR_ARG, "pipeline of %d stages: at most %d supported",
                            n_stages, RP_SCHEDULE_MAX_STAGES);
    if (n_micro < 1)
        return rp_error_set(err, RP_ERR_ARG, "%s schedule with %d micro-batches: need >= 1",
                            kind_names[kind], n_micro);
    if (n_micro > RP_SCHEDULE_MAX_MICRO)
        return rp_error_set(err, RP_ERR_ARG,
                            "%s schedule with %d micro-batches: at most %d per optimizer step",
                            kind_names[kind], n_micro, RP_SCHEDULE_MAX_MICRO);

    if (n_chunks < 1 || n_micro % n_chunks != 0)
        return rp_error_set(err, RP_ERR_ARG, "%d micro-batches are not whole sequences of %d "
                            "time chunks", n_micro, n_chunks);
    if (kind == RP_SCHEDULE_INTERLEAVED) {
        if (n_virtual < 2 || n_virtual > RP_SCHEDULE_MAX_VIRTUAL)
            return rp_error_set(err, RP_ERR_ARG, "interleaved schedule with %d virtual stages: "
                                "need 2..%d chunks per stage (one chunk is 1f1b)",
                                n_virtual, RP_SCHEDULE_MAX_VIRTUAL);
        if (n_stages < 2)
            return rp_error_set(err, RP_ERR_ARG, "interleaved schedule on %d stage: need >= 2 "
                                "stages to interleave (use 1f1b)", n_stages);
        if (n_micro % n_stages != 0)
            return rp_error_set(err, RP_ERR_ARG, "interleaved schedule with %d micro-batches on "
                                "%d stages: the micro-batches must be a multiple of the stages "
                                "(as in Megatron-LM), e.g. %d", n_micro, n_stages,
                                (n_micro / n_stages + 1) * n_stages);
        if ((long long)n_micro * n_virtual > RP_SCHEDULE_MAX_MICRO)
            return rp_error_set(err, RP_ERR_ARG, "interleaved schedule with %d micro-batches x %d "
                                "virtual stages: at most %d pairs per optimizer step",
                                n_micro, n_virtual, RP_SCHEDULE_MAX_MICRO);
    } else if (n_virtual != 1) {
        return rp_error_set(err, RP_ERR_ARG, "%s schedule with %d virtual stages: only "
                            "interleaved has more than one", kind_names[kind], n_virtual);
    }
    s->kind = kind;
    s->n_virtual = n_virtual;
    s->n_chunks = n_chunks;
    s->n_stages = n_stages;
    s->n_micro = n_micro;
    s->n_instr = rp_calloc((size_t)n_stages, sizeof *s->n_instr, "schedule list lengths", err);
    s->instr = rp_calloc((size_t)n_stages, sizeof *s->instr, "schedule lists", err);
    s->n_buffers = rp_calloc((size_t)n_stages, sizeof *s->n_buffers, "schedule buffer counts", err);
    rp_status status = RP_ERR_NOMEM;
    if (!s->n_instr || !s->instr || !s->n_buffers) goto fail;

    for (int stage = 0; stage < n_stages; stage++) {
        sched_list list = {0};
        /* time chunks: FWD, RECOMP and BWD per chunk, each with its RECV/SEND */
        list.capacity = n_chunks > 1
                            ? n_micro * (3 + 3 * (stage > 0) + 3 * (stage < n_stages - 1)) + 2
                            : sched_stage_length(kind, stage, n_stages, n_micro, n_virtual);
        list.instr = rp_malloc((size_t)list.capacity * sizeof *list.instr, "schedule list", err);
        if (!list.instr) goto fail;
        s->instr[stage] = list.instr;
        if (n_chunks > 1) {
            sched_build_time_chunks(&list, stage, n_stages, n_micro, n_chunks,
                                    &s->n_buffers[stage]);
        } else switch (kind) {
        case RP_SCHEDULE_GPIPE:
            sched_build_gpipe(&list, stage, n_stages, n_micro, &s->n_buffers[stage]);
            break;
        case RP_SCHEDULE_1F1B:
            sched_build_1f1b(&list, stage, n_stages, n_micro, &s->n_buffers[stage]);
            break;
        case RP_SCHEDULE_ZB_H1:
            sched_build_zb_h1(&list, stage, n_stages, n_micro, &s->n_buffers[stage]);
            break;
        case RP_SCHEDULE_INTERLEAVED:
            status = sched_build_interleaved(&list, stage, n_stages, n_micro, n_virtual,
                                             &s->n_buffers[stage], err);
            if (status != RP_OK) goto fail;
            status = RP_ERR_NOMEM;
            break;
        case RP_SCHEDULE_KIND_COUNT: break;
        }
        if (list.n != list.capacity) {
            status = rp_error_set(err, RP_ERR_INTERNAL,
                         "%s schedule, stage %d of %d: %d instructions written, %d expected",
                         kind_names[kind], stage, n_stages, list.n, list.capacity);
            goto fail;
        }
        s->n_instr[stage] = list.n;
    }
    return RP_OK;

fail:
    rp_schedule_free(s);
    return status;
}

rp_status rp_schedule_build(rp_schedule *s, rp_schedule_kind kind, int n_stages, int n_micro,
                            rp_error *err) {
    if (kind == RP_SCHEDULE_INTERLEAVED) {
        memset(s, 0, sizeof *s);
        return rp_error_set(err, RP_ERR_ARG, "interleaved schedule: needs its number of virtual "
                            "stages (rp_schedule_build_interleaved)");
    }
    return schedule_build(s, kind, n_stages, n_micro, 1, 1, err);
}

rp_status rp_schedule_build_interleaved(rp_schedule *s, int n_stages, int n_micro, int n_virtual,
                                        rp_error *err) {
    return schedule_build(s, RP_SCHEDULE_INTERLEAVED, n_stages, n_micro, 1, n_virtual, err);
}

rp_status rp_schedule_build_time_chunks(rp_schedule *s, int n_stages, int n_micro, int n_chunks,
                                        rp_error *err) {
    return schedule_build(s, RP_SCHEDULE_GPIPE, n_stages, n_micro, n_chunks, 1, err);
}

void rp_schedule_free(rp_schedule *s) {
    if (!s) return;
    if (s->instr)
        for (int stage = 0; stage < s->n_stages; stage++) free(s->instr[stage]);
    free(s->instr);
    free(s->n_instr);
    free(s->n_buffers);
    memset(s, 0, sizeof *s);
}
