/* The schedule simulator (schedule.h): runs every stage's instruction list
 * together without MPI, timing them with abstract costs and checking the
 * conventions an executor relies on (no deadlock, forward before backward,
 * gradients only after the next stage's backward, stash slots never
 * overwritten). Interleaved schedules run per model chunk c*P + s: what
 * is sent and received, forwarded and backwarded is tracked per model
 * chunk, time and stash slots per stage. Unit tests and `rwkvpipe schedule`
 * call it. */
#include "pipe/schedule.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* Wider timelines are not drawn: nobody reads a 2000-column row. */
#define SIM_TIMELINE_MAX_COLUMNS 512
/* A deadlock message names at most this many stuck stages. */
#define SIM_DEADLOCK_MAX_NAMED 8

/* What model chunk g (stage g % P, chunk g / P; g = s without
 * interleaving) knows about micro-batch m. The arrival times live on the
 * sender's side: g+1's RECV_ACT m reads act_arrival of (g, m). */
typedef struct {
    double act_arrival;    /* SEND_ACT m done here + comm_cost */
    double grad_arrival;   /* SEND_GRAD m done here + comm_cost */
    int buffer;            /* slot m was stashed in, -1 before RECV_ACT/FWD */
    unsigned char act_received, fwd_done, act_sent;
    unsigned char grad_received, bwd_done, grad_sent;
    unsigned char split, w_done;  /* BWD_B ran (its BWD_W is due); BWD_W ran */
    /* time chunks: the recomputed forward (RECV_RECOMP, RECOMP, SEND_RECOMP) */
    double recomp_arrival;
    unsigned char recomp_received, recomp_done, recomp_sent;
} sim_micro;

/* Per model chunk: its forwards, backwards and weight gradients so far
 * (each runs in micro-batch order within a chunk). */
typedef struct {
    int n_fwd, n_bwd, n_w, n_recomp;
} sim_model_chunk;

typedef struct {
    int pc;                /* next instruction */
    double clock;          /* time the stage is free to start it */
    double busy;
    int w_due;             /* BWD_B without their BWD_W yet */
    int n_stashed, peak_stashed;
    int reduced, stepped;
    int *holder;           /* [n_buffers] micro-batch holding each slot, -1 free */
} sim_stage;

typedef struct {
    const rp_schedule *s;
    rp_sim_costs costs;
    int n_virtual;         /* v, 1 without interleaving */
    sim_stage *stages;     /* [P] */
    sim_model_chunk *chunks;  /* [v * P], model chunk g = c * P + s */
    sim_micro *micro;      /* [v * P * M] */
} sim_state;

typedef enum { SIM_RAN, SIM_WAITS, SIM_FAILED } sim_outcome;

/* micro-batch m on model chunk g */
static sim_micro *sim_at(sim_state *st, int g, int m) {
    return &st->micro[(size_t)g * st->s->n_micro + m];
}

/* "stage 2, #7 BWD m=3 buf=1" (", chunk 1" when interleaved) */
static void sim_describe(char *out, size_t size, int n_virtual, int stage, int index,
                         const rp_pipe_instr *in) {
    int len = snprintf(out, size, "stage %d, #%d %s m=%d buf=%d", stage, index,
                       rp_pipe_opcode_name(in->op), in->micro_batch, in->buffer);
    if (n_virtual > 1 && len > 0 && (size_t)len < size)
        snprintf(out + len, size - (size_t)len, " chunk=%d", in->chunk);
}

/* Sets err to "stage S, #I OP m=.. buf=..: WHY" (rp_schedule_simulate adds
 * the schedule's name in front). */
static sim_outcome sim_fail(const sim_state *st, rp_error *err, int stage, int index,
                            const rp_pipe_instr *in, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static sim_outcome sim_fail(const sim_state *st, rp_error *err, int stage, int index,
                            const rp_pipe_instr *in, const char *fmt, ...) {
    char where[128], why[RP_ERROR_MSG_LEN / 2];
    sim_describe(where, sizeof where, st->n_virtual, stage, index, in);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    rp_error_set(err, RP_ERR_INTERNAL, "%s: %s", where, why);
    return SIM_FAILED;
}

/* The model chunk an instruction of a stage runs on (chunk checked first). */
static int sim_model(const sim_state *st, int stage, const rp_pipe_instr *in) {
    return in->chunk * st->s->n_stages + stage;
}

/* Slot b becomes m's (at its RECV_ACT or FWD, whichever comes first); the
 * slot must be free, or already m's. */
static sim_outcome sim_claim_buffer(sim_state *st, int stage, int index, const rp_pipe_instr *in,
                                    rp_error *err) {
    sim_micro *mb = sim_at(st, sim_model(st, stage, in), in->micro_batch);
    sim_stage *sg = &st->stages[stage];
    if (mb->buffer >= 0) {
        if (mb->buffer != in->buffer)
            return sim_fail(st, err, stage, index, in,
                            "micro-batch %d was received into buffer %d, not %d",
                            in->micro_batch, mb->buffer, in->buffer);
        return SIM_RAN;
    }
    int other = sg->holder[in->buffer];
    if (other >= 0)
        return sim_fail(st, err, stage, index, in,
                        "overwrites buffer %d while micro-batch %d still holds it "
                        "(its BWD has not run yet)",
                        in->buffer, other);
    sg->holder[in->buffer] = in->micro_batch;
    mb->buffer = in->buffer;
    return SIM_RAN;
}

/* Sends, receives and the backward must name the slot the forward used. */
static sim_outcome sim_check_buffer(sim_state *st, int stage, int index, const rp_pipe_instr *in,
                                    rp_error *err) {
    const sim_micro *mb = sim_at(st, sim_model(st, stage, in), in->micro_batch);
    if (mb->buffer != in->buffer)
        return sim_fail(st, err, stage, index, in, "micro-batch %d is stashed in buffer %d, not %d",
                        in->micro_batch, mb->buffer, in->buffer);
    return SIM_RAN;
}

/* The micro-batch the k-th backward of a stage must be: k itself, or with
 * time chunks the chunks of each group last first (schedule.h). */
static int sim_next_backward(const rp_schedule *s, int k) {
    const int K = s->n_chunks > 1 ? s->n_chunks : 1;
    return (k / K) * K + (K - 1 - k % K);
}

/* Time of a compute op under the costs (BWD_B and BWD_W split bwd_cost). */
static double sim_op_cost(const rp_sim_costs *c, rp_pipe_opcode op) {
    const double w = c->bwd_w_cost > 0 ? c->bwd_w_cost : 0.5 * c->bwd_cost;
    switch (op) {
    case RP_OP_FWD: return c->fwd_cost;
    case RP_OP_BWD: return c->bwd_cost;
    case RP_OP_BWD_B: return c->bwd_cost - w;
    case RP_OP_BWD_W: return w;
    case RP_OP_RECOMP: return c->fwd_cost;
    default: return 0;
    }
}

/* Time chunks: RECV_ACT, FWD and SEND_ACT compute in a slot without
 * holding it (the FWD keeps only the chunk's start state), so the slot must
 * not hold a recomputed chunk waiting for its BWD. */
static sim_outcome sim_forward_slot(sim_state *st, int stage, int index, const rp_pipe_instr *in,
                                    rp_error *err) {
    if (st->s->n_chunks <= 1) return sim_claim_buffer(st, stage, index, in, err);
    const int other = st->stages[stage].holder[in->buffer];
    if (other >= 0)
        return sim_fail(st, err, stage, index, in,
                        "forwards in buffer %d while time chunk %d's recomputed activations "
                        "wait there for its BWD", in->buffer, other);
    return SIM_RAN;
}

/* RECV_RECOMP / RECOMP / SEND_RECOMP (time chunks only): the recomputed
 * forward of chunk m, in the backward order, after its FWD (whose start
 * state it starts from); it holds its slot until the chunk's BWD. */
static sim_outcome sim_recompute(sim_state *st, int stage, int index, const rp_pipe_instr *in,
                                 double *start, rp_error *err) {
    const rp_schedule *s = st->s;
    sim_stage *sg = &st->stages[stage];
    const int g = sim_model(st, stage, in), last = s->n_stages * st->n_virtual - 1;
    const int m = in->micro_batch;
    sim_micro *mb = sim_at(st, g, m);
    sim_model_chunk *ch = &st->chunks[g];
    sim_outcome o;
    if (s->n_chunks <= 1)
        return sim_fail(st, err, stage, index, in,
                        "recomputation belongs to time-chunk schedules (n_chunks %d)",
                        s->n_chunks);
    switch (in->op) {
    case RP_OP_RECV_RECOMP: {
        if (g == 0)
            return sim_fail(st, err, stage, index, in,
                            "stage 0 recomputes from the data, it has no stage to receive from");
        if (mb->recomp_received)
            return sim_fail(st, err, stage, index, in,
                            "recomputed activations of micro-batch %d received twice", m);
        if (mb->recomp_done)
            return sim_fail(st, err, stage, index, in, "comes after RECOMP of micro-batch %d", m);
        const sim_micro *from = sim_at(st, g - 1, m);
        if (!from->recomp_sent) return SIM_WAITS;
        if ((o = sim_claim_buffer(st, stage, index, in, err)) != SIM_RAN) return o;
        *start = sg->clock;
        sg->clock = fmax(sg->clock, from->recomp_arrival);
        mb->recomp_received = 1;
        return SIM_RAN;
    }
    case RP_OP_RECOMP:
        if (mb->recomp_done)
            return sim_fail(st, err, stage, index, in, "micro-batch %d recomputed twice", m);
        if (!mb->fwd_done)
            return sim_fail(st, err, stage, index, in,
                            "runs before FWD of micro-batch %d (no start state kept yet)", m);
        if (g > 0 && !mb->recomp_received)
            return sim_fail(st, err, stage, index, in,
                            "runs before RECV_RECOMP of micro-batch %d (no input)", m);
        if (m != sim_next_backward(s, ch->n_recomp))
            return sim_fail(st, err, stage, index, in,
                            "time chunks recompute in the backward order (last chunk first): "
                            "expected micro-batch %d next", sim_next_backward(s, ch->n_recomp));
        if ((o = sim_claim_buffer(st, stage, index, in, err)) != SIM_RAN) return o;
        *start = sg->clock;
        sg->clock += sim_op_cost(&st->costs, in->op);
        sg->busy += sim_op_cost(&st->costs, in->op);
        mb->recomp_done = 1;
        ch->n_recomp++;
        if (++sg->n_stashed > sg->peak_stashed) sg->peak_stashed = sg->n_stashed;
        return SIM_RAN;
    default:  /* RP_OP_SEND_RECOMP */
        if (g == last)
            return sim_fail(st, err, stage, index, in,
                            "the last stage computes the loss, it has no stage to send to");
        if (!mb->recomp_done)
            return sim_fail(st, err, stage, index, in, "runs before RECOMP of micro-batch %d", m);
        if (mb->recomp_sent)
            return sim_fail(st, err, stage, index, in,
                            "recomputed activations of micro-batch %d sent twice", m);
        if ((o = sim_check_buffer(st, stage, index, in, err)) != SIM_RAN) return o;
        *start = sg->clock;
        mb->recomp_arrival = sg->clock + st->costs.comm_cost;
        mb->recomp_sent = 1;
        return SIM_RAN;
    }
}

/* Runs instruction pc of a stage if it can run now. SIM_WAITS only for a
 * RECV whose matching SEND has not happened; everything else that breaks a
 * convention fails at once. */
static sim_outcome sim_step(sim_state *st, int stage, double *start, rp_error *err) {
    const rp_schedule *s = st->s;
    sim_stage *sg = &st->stages[stage];
    const int index = sg->pc;
    const rp_pipe_instr *in = &s->instr[stage][index];
    const int last = s->n_stages * st->n_virtual - 1, m = in->micro_batch;

    if ((unsigned)in->op >= RP_OP_COUNT)
        return sim_fail(st, err, stage, index, in, "opcode %d is not one of schedule.h's",
                        (int)in->op);
    if (sg->stepped)
        return sim_fail(st, err, stage, index, in,
                        "comes after OPT_STEP: every list ends with REDUCE_GRADS, OPT_STEP");
    if (sg->reduced && in->op != RP_OP_OPT_STEP)
        return sim_fail(st, err, stage, index, in,
                        "comes after REDUCE_GRADS: only OPT_STEP may follow it");
    if (in->op == RP_OP_REDUCE_GRADS || in->op == RP_OP_OPT_STEP) {
        if (m != -1 || in->buffer != -1)
            return sim_fail(st, err, stage, index, in, "expected micro-batch -1 and buffer -1");
    } else {
        if (m < 0 || m >= s->n_micro)
            return sim_fail(st, err, stage, index, in, "micro-batch %d outside 0..%d", m,
                            s->n_micro - 1);
        if (in->chunk < 0 || in->chunk >= st->n_virtual)
            return sim_fail(st, err, stage, index, in, "chunk %d outside 0..%d (%d per stage)",
                            in->chunk, st->n_virtual - 1, st->n_virtual);
        if (in->buffer < 0 || in->buffer >= s->n_buffers[stage])
            return sim_fail(st, err, stage, index, in,
                            "buffer %d outside 0..%d (the stage has %d buffers)", in->buffer,
                            s->n_buffers[stage] - 1, s->n_buffers[stage]);
    }
    /* g: the model chunk; the first and last ends are g = 0 and g = last */
    const int g = in->op == RP_OP_REDUCE_GRADS || in->op == RP_OP_OPT_STEP
                      ? stage : sim_model(st, stage, in);
    sim_micro *mb = m >= 0 ? sim_at(st, g, m) : NULL;
    sim_model_chunk *ch = &st->chunks[g];
    sim_outcome o;

    switch (in->op) {
    case RP_OP_RECV_ACT: {
        if (g == 0)
            return sim_fail(st, err, stage, index, in,
                            "stage 0 reads its input from the data, it has no stage to receive from");
        if (mb->act_received)
            return sim_fail(st, err, stage, index, in, "activations of micro-batch %d received twice",
                            m);
        if (mb->fwd_done)
            return sim_fail(st, err, stage, index, in, "comes after FWD of micro-batch %d", m);
        const sim_micro *from = sim_at(st, g - 1, m);
        if (!from->act_sent) return SIM_WAITS;
        if ((o = sim_forward_slot(st, stage, index, in, err)) != SIM_RAN) return o;
        *start = sg->clock;
        sg->clock = fmax(sg->clock, from->act_arrival);
        mb->act_received = 1;
        return SIM_RAN;
    }
    case RP_OP_FWD:
        if (mb->fwd_done)
            return sim_fail(st, err, stage, index, in, "micro-batch %d forwarded twice", m);
        if (g > 0 && !mb->act_received)
            return sim_fail(st, err, stage, index, in,
                            "runs before RECV_ACT of micro-batch %d (no input yet)", m);
        if (s->n_chunks > 1 && m != ch->n_fwd)
            return sim_fail(st, err, stage, index, in,
                            "time chunks run their forwards in time order (chunk c starts from "
                            "the state chunk c-1 left): expected micro-batch %d next",
                            ch->n_fwd);
        if ((o = sim_forward_slot(st, stage, index, in, err)) != SIM_RAN) return o;
        *start = sg->clock;
        sg->clock += st->costs.fwd_cost;
        sg->busy += st->costs.fwd_cost;
        mb->fwd_done = 1;
        ch->n_fwd++;
        /* time chunks stash at RECOMP: a FWD keeps only the start state */
        if (s->n_chunks <= 1 && ++sg->n_stashed > sg->peak_stashed)
            sg->peak_stashed = sg->n_stashed;
        return SIM_RAN;
    case RP_OP_SEND_ACT:
        if (g == last)
            return sim_fail(st, err, stage, index, in,
                            "the last stage computes the loss, it has no stage to send to");
        if (!mb->fwd_done)
            return sim_fail(st, err, stage, index, in, "runs before FWD of micro-batch %d", m);
        if (mb->act_sent)
            return sim_fail(st, err, stage, index, in, "activations of micro-batch %d sent twice", m);
        if ((o = s->n_chunks > 1 ? sim_forward_slot(st, stage, index, in, err)
                                 : sim_check_buffer(st, stage, index, in, err)) != SIM_RAN)
            return o;
        /* sends are asynchronous: the stage goes on at once, the data lands
         * comm_cost later */
        *start = sg->clock;
        mb->act_arrival = sg->clock + st->costs.comm_cost;
        mb->act_sent = 1;
        return SIM_RAN;
    case RP_OP_RECV_GRAD: {
        if (g == last)
            return sim_fail(st, err, stage, index, in,
                            "the last stage starts the backward from its own loss, "
                            "it has no stage to receive gradients from");
        if (mb->grad_received)
            return sim_fail(st, err, stage, index, in, "gradients of micro-batch %d received twice",
                            m);
        if (!mb->fwd_done)
            return sim_fail(st, err, stage, index, in,
                            "receives gradients of micro-batch %d before its FWD", m);
        const sim_micro *from = sim_at(st, g + 1, m);
        if (!from->grad_sent) return SIM_WAITS;
        if ((o = sim_check_buffer(st, stage, index, in, err)) != SIM_RAN) return o;
        *start = sg->clock;
        sg->clock = fmax(sg->clock, from->grad_arrival);
        mb->grad_received = 1;
        return SIM_RAN;
    }
    case RP_OP_BWD:
    case RP_OP_BWD_B:
        if (mb->bwd_done)
            return sim_fail(st, err, stage, index, in, "micro-batch %d backwarded twice", m);
        if (!mb->fwd_done)
            return sim_fail(st, err, stage, index, in, "runs before FWD of micro-batch %d", m);
        if (g < last && !mb->grad_received)
            return sim_fail(st, err, stage, index, in,
                            "runs before RECV_GRAD of micro-batch %d, i.e. before stage %d's "
                            "BWD of it",
                            m, (g + 1) % s->n_stages);
        if (m != sim_next_backward(s, ch->n_bwd))
            return sim_fail(st, err, stage, index, in,
                            s->n_chunks > 1
                                ? "time chunks run their backwards last chunk first (chunk c "
                                  "needs d(state) from chunk c+1): expected micro-batch %d next"
                                : "backwards must run in increasing micro-batch order: expected "
                                  "micro-batch %d next",
                            sim_next_backward(s, ch->n_bwd));
        if (s->n_chunks > 1 && !mb->recomp_done)
            return sim_fail(st, err, stage, index, in,
                            "runs before RECOMP of time chunk %d (its activations are not "
                            "there)", m);
        if ((o = sim_check_buffer(st, stage, index, in, err)) != SIM_RAN) return o;
        *start = sg->clock;
        sg->clock += sim_op_cost(&st->costs, in->op);
        sg->busy += sim_op_cost(&st->costs, in->op);
        mb->bwd_done = 1;
        ch->n_bwd++;
        if (in->op == RP_OP_BWD_B) {
            /* The slot keeps what BWD_W needs. */
            mb->split = 1;
            sg->w_due++;
            return SIM_RAN;
        }
        sg->n_stashed--;
        sg->holder[in->buffer] = -1;
        return SIM_RAN;
    case RP_OP_BWD_W:
        if (!mb->split)
            return sim_fail(st, err, stage, index, in,
                            "runs before BWD_B of micro-batch %d (no input gradient yet)", m);
        if (mb->w_done)
            return sim_fail(st, err, stage, index, in, "weight gradients of micro-batch %d twice", m);
        if (m != ch->n_w)
            return sim_fail(st, err, stage, index, in,
                            "weight gradients must be summed in increasing micro-batch order "
                            "(the order of one process): expected micro-batch %d next", ch->n_w);
        if ((o = sim_check_buffer(st, stage, index, in, err)) != SIM_RAN) return o;
        *start = sg->clock;
        sg->clock += sim_op_cost(&st->costs, in->op);
        sg->busy += sim_op_cost(&st->costs, in->op);
        mb->w_done = 1;
        ch->n_w++;
        sg->w_due--;
        sg->n_stashed--;
        sg->holder[in->buffer] = -1;
        return SIM_RAN;
    case RP_OP_RECV_RECOMP:
    case RP_OP_RECOMP:
    case RP_OP_SEND_RECOMP:
        return sim_recompute(st, stage, index, in, start, err);
    case RP_OP_SEND_GRAD:
        if (g == 0)
            return sim_fail(st, err, stage, index, in,
                            "stage 0 has no previous stage to send gradients to");
        if (!mb->bwd_done)
            return sim_fail(st, err, stage, index, in, "runs before BWD of micro-batch %d", m);
        if (mb->grad_sent)
            return sim_fail(st, err, stage, index, in, "gradients of micro-batch %d sent twice", m);
        if ((o = sim_check_buffer(st, stage, index, in, err)) != SIM_RAN) return o;
        *start = sg->clock;
        mb->grad_arrival = sg->clock + st->costs.comm_cost;
        mb->grad_sent = 1;
        return SIM_RAN;
    case RP_OP_REDUCE_GRADS:
        for (int c = 0; c < st->n_virtual; c++) {
            ch = &st->chunks[c * s->n_stages + stage];
            if (ch->n_fwd == s->n_micro && ch->n_bwd == s->n_micro) continue;
            if (st->n_virtual > 1)
                return sim_fail(st, err, stage, index, in,
                                "after %d forwards and %d backwards of chunk %d: every one of "
                                "the %d micro-batches needs both on every chunk first",
                                ch->n_fwd, ch->n_bwd, c, s->n_micro);
            return sim_fail(st, err, stage, index, in,
                            "after %d forwards and %d backwards: every one of the %d "
                            "micro-batches needs both first",
                            ch->n_fwd, ch->n_bwd, s->n_micro);
        }
        if (sg->w_due)
            return sim_fail(st, err, stage, index, in,
                            "%d micro-batches ran BWD_B without their BWD_W", sg->w_due);
        *start = sg->clock;
        sg->reduced = 1;
        return SIM_RAN;
    case RP_OP_OPT_STEP:
        if (!sg->reduced)
            return sim_fail(st, err, stage, index, in, "runs before REDUCE_GRADS");
        *start = sg->clock;
        sg->stepped = 1;
        return SIM_RAN;
    case RP_OP_COUNT: break;
    }
    return sim_fail(st, err, stage, index, in, "opcode %d is not one of schedule.h's", (int)in->op);
}

/* "deadlock: ...; stage 1 waits at #5 RECV_GRAD m=0 buf=0 (stage 2 has not
 * sent it); ..." for the first few stuck stages. */
static rp_status sim_report_deadlock(sim_state *st, rp_error *err) {
    const rp_schedule *s = st->s;
    char msg[RP_ERROR_MSG_LEN];
    size_t len = 0;
    int named = 0, stuck = 0;
    len += (size_t)snprintf(msg, sizeof msg,
                            "%s schedule deadlocks: no stage can run its next instruction",
                            rp_schedule_kind_name(s->kind));
    for (int stage = 0; stage < s->n_stages; stage++) {
        const sim_stage *sg = &st->stages[stage];
        if (sg->pc >= s->n_instr[stage]) continue;
        stuck++;
        if (named >= SIM_DEADLOCK_MAX_NAMED || len >= sizeof msg) continue;
        const rp_pipe_instr *in = &s->instr[stage][sg->pc];
        /* the peer is the neighbouring model chunk (interleaved: the last
         * stage's chunk c sends to stage 0's chunk c+1) */
        const int g = in->chunk * s->n_stages + stage;
        const int down = in->op == RP_OP_RECV_ACT || in->op == RP_OP_RECV_RECOMP;
        int peer = down ? g - 1 : g + 1;
        const char *what = in->op == RP_OP_RECV_ACT      ? "SEND_ACT"
                           : in->op == RP_OP_RECV_RECOMP ? "SEND_RECOMP"
                                                         : "SEND_GRAD";
        char where[128], chunk[32] = "";
        sim_describe(where, sizeof where, st->n_virtual, stage, sg->pc, in);
        if (st->n_virtual > 1) snprintf(chunk, sizeof chunk, " (chunk %d)", peer / s->n_stages);
        len += (size_t)snprintf(msg + len, sizeof msg - len,
                                "; %s waits for stage %d's%s %s of micro-batch %d", where,
                                peer % s->n_stages, chunk, what, in->micro_batch);
        named++;
    }
    if (stuck > named && len < sizeof msg)
        snprintf(msg + len, sizeof msg - len, "; and %d more stuck stages", stuck - named);
    return rp_error_set(err, RP_ERR_INTERNAL, "%s", msg);
}

static rp_status sim_check_schedule(const rp_schedule *s, const rp_sim_costs *c, rp_error *err) {
    if (!s || !s->n_instr || !s->instr || !s->n_buffers)
        return rp_error_set(err, RP_ERR_ARG, "simulate: the schedule is empty (not built?)");
    if (s->n_stages < 1 || s->n_stages > RP_SCHEDULE_MAX_STAGES)
        return rp_error_set(err, RP_ERR_ARG, "simulate: pipeline of %d stages: expected 1..%d",
                            s->n_stages, RP_SCHEDULE_MAX_STAGES);
    if (s->n_micro < 1 || s->n_micro > RP_SCHEDULE_MAX_MICRO)
        return rp_error_set(err, RP_ERR_ARG, "simulate: %d micro-batches: expected 1..%d",
                            s->n_micro, RP_SCHEDULE_MAX_MICRO);
    if (s->n_virtual < 0 || s->n_virtual > RP_SCHEDULE_MAX_VIRTUAL ||
        (s->n_virtual > 1 && s->n_chunks > 1))
        return rp_error_set(err, RP_ERR_ARG, "simulate: %d virtual stages with %d time chunks: "
                            "expected 1..%d virtual stages, and time chunks only with one",
                            s->n_virtual, s->n_chunks, RP_SCHEDULE_MAX_VIRTUAL);
    for (int stage = 0; stage < s->n_stages; stage++) {
        if (s->n_instr[stage] < 0 || (s->n_instr[stage] > 0 && !s->instr[stage]))
            return rp_error_set(err, RP_ERR_ARG, "simulate: stage %d has a broken list (%d instructions)",
                                stage, s->n_instr[stage]);
        if (s->n_buffers[stage] < 1 || s->n_buffers[stage] > RP_SCHEDULE_MAX_MICRO)
            return rp_error_set(err, RP_ERR_ARG, "simulate: stage %d has %d buffers: expected 1..%d",
                                stage, s->n_buffers[stage], RP_SCHEDULE_MAX_MICRO);
    }
    if (!(c->bwd_w_cost >= 0) || !(c->bwd_w_cost < c->bwd_cost))
        return rp_error_set(err, RP_ERR_ARG, "simulate: BWD_W cost %g of a backward of %g: "
                            "expected 0 (half) or between 0 and the backward's",
                            c->bwd_w_cost, c->bwd_cost);
    if (!(c->fwd_cost > 0) || !(c->bwd_cost > 0) || !(c->comm_cost >= 0) ||
        !isfinite(c->fwd_cost) || !isfinite(c->bwd_cost) || !isfinite(c->comm_cost))
        return rp_error_set(err, RP_ERR_ARG,
                            "simulate: costs fwd %g, bwd %g, comm %g: expected fwd, bwd > 0 "
                            "and comm >= 0, all finite",
                            c->fwd_cost, c->bwd_cost, c->comm_cost);
    return RP_OK;
}

rp_status rp_schedule_simulate(const rp_schedule *s, const rp_sim_costs *costs, rp_sim_result *r,
                               rp_error *err) {
    memset(r, 0, sizeof *r);
    const rp_sim_costs unit = {1.0, 1.0, 0.0, 0.0};
    if (!costs) costs = &unit;
    rp_status status = sim_check_schedule(s, costs, err);
    if (status != RP_OK) return status;

    const int n_stages = s->n_stages;
    const int n_virtual = s->n_virtual > 1 ? s->n_virtual : 1;
    const size_t n_model = (size_t)n_stages * (size_t)n_virtual;
    sim_state st = {.s = s, .costs = *costs, .n_virtual = n_virtual};
    r->costs = *costs;
    status = RP_ERR_NOMEM;
    st.stages = rp_calloc((size_t)n_stages, sizeof *st.stages, "simulator stages", err);
    st.chunks = rp_calloc(n_model, sizeof *st.chunks, "simulator model chunks", err);
    st.micro = rp_calloc(n_model * (size_t)s->n_micro, sizeof *st.micro,
                         "simulator micro-batch states", err);
    r->busy = rp_calloc((size_t)n_stages, sizeof *r->busy, "simulated busy times", err);
    r->peak_stashed = rp_calloc((size_t)n_stages, sizeof *r->peak_stashed, "simulated peaks", err);
    r->start = rp_calloc((size_t)n_stages, sizeof *r->start, "simulated timeline", err);
    if (!st.stages || !st.chunks || !st.micro || !r->busy || !r->peak_stashed || !r->start) goto done;
    for (size_t i = 0; i < n_model * (size_t)s->n_micro; i++) st.micro[i].buffer = -1;
    for (int stage = 0; stage < n_stages; stage++) {
        int nb = s->n_buffers[stage];
        st.stages[stage].holder = rp_malloc((size_t)nb * sizeof(int), "simulator buffers", err);
        r->start[stage] = rp_calloc((size_t)s->n_instr[stage], sizeof(double),
                                    "simulated timeline", err);
        if (!st.stages[stage].holder || !r->start[stage]) goto done;
        for (int b = 0; b < nb; b++) st.stages[stage].holder[b] = -1;
    }

    /* Sweep the stages, running each as far as it can, until all are done or
     * a sweep moves none (deadlock). The times do not depend on the sweep
     * order: a stage's clock is a function of its own list and of the
     * arrival times of what it receives. */
    for (;;) {
        int progress = 0, unfinished = 0;
        for (int stage = 0; stage < n_stages; stage++) {
            sim_stage *sg = &st.stages[stage];
            while (sg->pc < s->n_instr[stage]) {
                sim_outcome o = sim_step(&st, stage, &r->start[stage][sg->pc], err);
                if (o == SIM_FAILED) {
                    status = RP_ERR_INTERNAL;
                    if (err) rp_error_prefix(err, "%s schedule", rp_schedule_kind_name(s->kind));
                    goto done;
                }
                if (o == SIM_WAITS) break;
                sg->pc++;
                progress = 1;
            }
            if (sg->pc < s->n_instr[stage]) unfinished++;
        }
        if (!unfinished) break;
        if (!progress) {
            status = sim_report_deadlock(&st, err);
            goto done;
        }
    }

    double busy_total = 0;
    for (int stage = 0; stage < n_stages; stage++) {
        const sim_stage *sg = &st.stages[stage];
        if (!sg->stepped) {
            status = rp_error_set(err, RP_ERR_INTERNAL,
                                  "%s schedule, stage %d: the list (%d instructions) does not "
                                  "end with REDUCE_GRADS, OPT_STEP",
                                  rp_schedule_kind_name(s->kind), stage, s->n_instr[stage]);
            goto done;
        }
        r->busy[stage] = sg->busy;
        r->peak_stashed[stage] = sg->peak_stashed;
        busy_total += sg->busy;
        if (sg->clock > r->makespan) r->makespan = sg->clock;
    }
    r->bubble_fraction = 1.0 - busy_total / (n_stages * r->makespan);
    status = RP_OK;

done:
    if (st.stages)
        for (int stage = 0; stage < n_stages; stage++) free(st.stages[stage].holder);
    free(st.stages);
    free(st.chunks);
    free(st.micro);
    if (status != RP_OK) rp_sim_result_free(r, n_stages);
    return status;
}

void rp_sim_result_free(rp_sim_result *r, int n_stages) {
    if (!r) return;
    if (r->start)
        for (int stage = 0; stage < n_stages; stage++) free(r->start[stage]);
    free(r->start);
    free(r->busy);
    free(r->peak_stashed);
    memset(r, 0, sizeof *r);
}

static int sim_digits(int v) {
    int d = 1;
    while (v >= 10) v /= 10, d++;
    return d;
}

static int sim_gcd(int a, int b) {
    while (b) {
        int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

void rp_schedule_print_timeline(const rp_schedule *s, const rp_sim_result *r, FILE *out) {
    const int n_stages = s->n_stages, n_micro = s->n_micro;
    const rp_sim_costs *c = &r->costs;
    /* One column per time unit; shorter compute ops get a finer column so
     * that every FWD and BWD shows. A cell is the compute op running at the
     * column's midpoint. */
    double unit = fmin(1.0, fmin(c->fwd_cost, c->bwd_cost));
    for (int stage = 0; stage < n_stages; stage++)
        for (int i = 0; i < s->n_instr[stage]; i++)
            if (s->instr[stage][i].op == RP_OP_BWD_B || s->instr[stage][i].op == RP_OP_BWD_W) {
                unit = fmin(unit, fmin(sim_op_cost(c, RP_OP_BWD_B), sim_op_cost(c, RP_OP_BWD_W)));
                stage = n_stages;
                break;
            }
    long n_columns = (long)ceil(r->makespan / unit - 1e-9);
    const int n_virtual = s->n_virtual > 1 ? s->n_virtual : 1;
    /* "F3", or "F3.1" for micro-batch 3 on chunk 1 when interleaved */
    int cell = 1 + sim_digits(n_micro - 1) + (n_virtual > 1 ? 1 + sim_digits(n_virtual - 1) : 0);

    if (n_columns > SIM_TIMELINE_MAX_COLUMNS) {
        fprintf(out, "timeline: %ld columns, too wide to draw (limit %d)\n", n_columns,
                SIM_TIMELINE_MAX_COLUMNS);
    } else {
        fprintf(out, "timeline (one column per %g time unit%s; Fm forward, Bm backward (BWD or "
                     "BWD_B), Wm weight gradients of micro-batch m%s%s, . idle):\n", unit, unit == 1.0 ? "" : "s",
                n_virtual > 1 ? ", Fm.c on chunk c" : "",
                s->n_chunks > 1 ? ", Rm recomputed forward of time chunk m" : "");
        int label = sim_digits(n_stages - 1);
        /* ruler: a time label every `every` columns, where it fits */
        long every = 1;
        static const int steps[] = {1, 2, 5, 10, 20, 50, 100, 200, 500};
        for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
            every = steps[i];
            if (sim_digits((int)n_columns) + 1 <= every * (cell + 1)) break;
        }
        fprintf(out, "%*s t", 6 + label, "");
        for (long col = 0; col < n_columns; col += every)
            /* the last label unpadded: no line ends in blanks */
            fprintf(out, " %-*g", col + every < n_columns ? (int)(every * (cell + 1) - 1) : 0,
                    col * unit);
        fprintf(out, "\n");

        int *row = malloc((size_t)(n_columns > 0 ? n_columns : 1) * sizeof *row);
        if (!row) {
            fprintf(out, "(no memory to draw the timeline)\n");
        } else {
            for (int stage = 0; stage < n_stages; stage++) {
                for (long col = 0; col < n_columns; col++) row[col] = -1;
                for (int i = 0; i < s->n_instr[stage]; i++) {
                    const rp_pipe_instr *in = &s->instr[stage][i];
                    if (sim_op_cost(c, in->op) <= 0) continue;
                    double t0 = r->start[stage][i];
                    double t1 = t0 + sim_op_cost(c, in->op);
                    long lo = (long)ceil(t0 / unit - 0.5 - 1e-9);
                    long hi = (long)ceil(t1 / unit - 0.5 - 1e-9) - 1;
                    for (long col = lo < 0 ? 0 : lo; col <= hi && col < n_columns; col++)
                        row[col] = i;
                }
                fprintf(out, "stage %*d |", label, stage);
                for (long col = 0; col < n_columns; col++) {
                    char text[16] = ".";
                    if (row[col] >= 0) {
                        const rp_pipe_instr *in = &s->instr[stage][row[col]];
                        int n = snprintf(text, sizeof text, "%c%d",
                                 in->op == RP_OP_FWD      ? 'F'
                                 : in->op == RP_OP_RECOMP ? 'R'
                                 : in->op == RP_OP_BWD_W  ? 'W'
                                                          : 'B',
                                 in->micro_batch);
                        if (n_virtual > 1 && n > 0 && (size_t)n < sizeof text)
                            snprintf(text + n, sizeof text - (size_t)n, ".%d", in->chunk);
                    }
                    /* no padding after the last cell: rows end without blanks */
                    fprintf(out, " %-*s", col + 1 < n_columns ? cell : 0, text);
                }
                fprintf(out, "\n");
            }
            free(row);
        }
    }

    /* Time chunks: per sequence group F, RECOMP and BWD per chunk and a
     * fill and drain of P-1 each for the forwards and for the backward
     * phase (one group; groups overlap a little). */
    const int chunked = s->n_chunks > 1;
    int num = chunked ? 2 * (n_stages - 1) : n_stages - 1;
    int den = chunked ? 3 * s->n_chunks + 2 * (n_stages - 1)
                      : n_virtual * n_micro + n_stages - 1;
    const int g = sim_gcd(num, den);
    fprintf(out, "makespan %g time units; bubble fraction %.4f; theory %s = %d/%d = %.4f%s\n",
            r->makespan, r->bubble_fraction,
            chunked ? "2(P-1)/(3K+2(P-1)) per sequence of K chunks"
            : n_virtual > 1 ? "(P-1)/(v*M+P-1)" : "(P-1)/(M+P-1)",
            num / (g ? g : 1), den / (g ? g : 1),
            (double)num / den, c->comm_cost > 0 ? " (for comm cost 0)" : "");
    for (int stage = 0; stage < n_stages; stage++)
        fprintf(out, "stage %d: busy %g (%.1f%%), peak stash %d, buffers %d\n", stage,
                r->busy[stage], r->makespan > 0 ? 100.0 * r->busy[stage] / r->makespan : 0.0,
                r->peak_stashed[stage], s->n_buffers[stage]);
}
