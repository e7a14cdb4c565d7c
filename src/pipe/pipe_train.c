/* Pipeline executor and pipelined forward (pipe_train.h). Every buffer is
 * backend memory; the transport moves host or device memory alike. */
#include "pipe/pipe_train.h"
#include "core/clock.h"
#include "model/lora.h"
#include "pipe/pipe_zero.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Floats per piece of a gradient all-reduce staged through host memory. */
#define REDUCE_CHUNK_FLOATS ((size_t)1 << 24)

rp_status rp_pipe_trainer_init(rp_pipe_trainer *pt, rp_model *model, rp_model *grads,
                               rp_model *adam_m, rp_model *adam_v, const rp_grid *grid,
                               rp_transport *tp, rp_schedule_kind kind, int n_micro,
                               int micro_batch_size, int ctx_len, rp_error *err) {
    return rp_pipe_trainer_init_time_chunks(pt, model, grads, adam_m, adam_v, grid, tp, kind,
                                            n_micro, micro_batch_size, ctx_len, 1, 0, err);
}

/* Floats of the stage's largest flat buffer. */
static size_t largest_buffer(const rp_model *g) {
    size_t most = g->layer_floats;
    if (g->embed_floats > most) most = g->embed_floats;
    if (g->head_floats > most) most = g->head_floats;
    return most;
}

/* Host landing buffer of the fixed-order reduce-scatter: the largest
 * gradient buffer. */
static rp_status alloc_zero_scratch(rp_pipe_trainer *pt, rp_error *err) {
    if (pt->zero_scratch) return RP_OK;
    size_t most = 0;
    for (int c = 0; c < pt->n_virtual; c++)
        if (largest_buffer(&pt->grads[c]) > most) most = largest_buffer(&pt->grads[c]);
    /* DP pieces of the largest range (n / DP rounded up): up to most + DP. */
    pt->zero_scratch = malloc(sizeof(float) * (most + (size_t)pt->dp + 1));
    if (!pt->zero_scratch)
        return rp_error_set(err, RP_ERR_NOMEM, "stage %d: the reduce-scatter buffer of %zu "
                            "floats", pt->stage, most);
    return RP_OK;
}

rp_status rp_pipe_trainer_use_zero(rp_pipe_trainer *pt, rp_zero_shard *z, rp_error *err) {
    if (pt->tune_state)
        return rp_error_set(err, RP_ERR_ARG, "--zero 1 shards the weights' moments; --tune "
                            "state trains no weights: drop --zero");
    size_t most = 0;
    for (int c = 0; c < pt->n_virtual; c++) {
        if (z[c].dp != pt->dp || (pt->grid && z[c].rank != pt->grid->replica))
            return rp_error_set(err, RP_ERR_INTERNAL, "ZeRO shard %d of %d (chunk %d) on "
                                "replica %d of %d", z[c].rank, z[c].dp, c,
                                pt->grid ? pt->grid->replica : 0, pt->dp);
        if (largest_buffer(&pt->grads[c]) > most) most = largest_buffer(&pt->grads[c]);
    }
    if (pt->dp > 1) {
        rp_status st = rp_zero_links_create(&pt->zero_links, pt->grid->data_comm, pt->model->be,
                                            pt->data_nccl, most, pt->timeout_s, err);
        if (st != RP_OK) return rp_error_prefix(err, "stage %d", pt->stage);
    }
    pt->zero = z;
    return RP_OK;
}

void rp_interleaved_chunk_layers(const int *layers, int n_stages, int n_virtual, int stage,
                                 int chunk, int *begin, int *end) {
    const int k = chunk * n_stages + stage;
    int b = 0;
    for (int i = 0; i < k && i < n_stages * n_virtual; i++) b += layers[i];
    *begin = b;
    *end = b + layers[k];
}

/* What a stash slot must hold to serve any of the stage's chunks: the most
 * layers of any chunk (a slot's activations are indexed from the running
 * chunk's first layer), the embedding's and the head's buffers if a chunk
 * has them. Only the shape is read (rp_backward_workspace_alloc). */
static rp_model slot_shape(const rp_model *models, int n_virtual) {
    rp_model shape = models[0];
    int most = 0;
    for (int c = 0; c < n_virtual; c++) {
        const int n = models[c].layer_end - models[c].layer_begin;
        if (n > most) most = n;
        shape.has_embed |= models[c].has_embed;
        shape.has_head |= models[c].has_head;
    }
    if (n_virtual > 1) {
        shape.layer_begin = 0;
        shape.layer_end = most;
    }
    return shape;
}

/* The recurrent state's geometry for chunk c (its data, sized for the
 * largest chunk, stays): a FWD starts it from zero, a BWD its gradient, so
 * nothing of one chunk's is read by another's. */
static void use_chunk_state(rp_pipe_trainer *pt, int c) {
    const rp_model *m = &pt->model[c];
    if (pt->n_virtual == 1) return;
    rp_state_geometry(&pt->state, &m->cfg, m->layer_begin, m->layer_end, pt->micro_batch_size);
    rp_state_geometry(&pt->dstate, &m->cfg, m->layer_begin, m->layer_end, pt->micro_batch_size);
}

static rp_status trainer_init(rp_pipe_trainer *pt, rp_model *models, rp_model *grads,
                              rp_model *adam_m, rp_model *adam_v, int n_virtual,
                              const rp_grid *grid, rp_transport *tp, rp_schedule_kind kind,
                              int n_micro, int micro_batch_size, int ctx_len, int n_chunks,
                              int tbptt, rp_error *err);

rp_status rp_pipe_trainer_init_time_chunks(rp_pipe_trainer *pt, rp_model *model,
                                           rp_model *grads, rp_model *adam_m, rp_model *adam_v,
                                           const rp_grid *grid, rp_transport *tp,
                                           rp_schedule_kind kind, int n_micro,
                                           int micro_batch_size, int ctx_len, int n_chunks,
                                           int tbptt, rp_error *err) {
    return trainer_init(pt, model, grads, adam_m, adam_v, 1, grid, tp, kind, n_micro,
                        micro_batch_size, ctx_len, n_chunks, tbptt, err);
}

rp_status rp_pipe_trainer_init_interleaved(rp_pipe_trainer *pt, rp_model *models,
                                           rp_model *grads, rp_model *adam_m, rp_model *adam_v,
                                           int n_virtual, const rp_grid *grid, rp_transport *tp,
                                           int n_micro, int micro_batch_size, int ctx_len,
                                           rp_error *err) {
    memset(pt, 0, sizeof *pt);
    if (n_virtual < 2)
        return rp_error_set(err, RP_ERR_INTERNAL, "interleaved executor with %d chunks",
                            n_virtual);
    if (!grid || grid->pp < 2 || !tp)
        return rp_error_set(err, RP_ERR_ARG, "--pp-schedule interleaved needs --pp 2 or more "
                            "(it interleaves chunks across stages)");
    return trainer_init(pt, models, grads, adam_m, adam_v, n_virtual, grid, tp,
                        RP_SCHEDULE_INTERLEAVED, n_micro, micro_batch_size, ctx_len, 1, 0, err);
}

static rp_status trainer_init(rp_pipe_trainer *pt, rp_model *model, rp_model *grads,
                              rp_model *adam_m, rp_model *adam_v, int n_virtual,
                              const rp_grid *grid, rp_transport *tp, rp_schedule_kind kind,
                              int n_micro, int micro_batch_size, int ctx_len, int n_chunks,
                              int tbptt, rp_error *err) {
    memset(pt, 0, sizeof *pt);
    pt->n_virtual = n_virtual;
    pt->n_chunks = n_chunks;
    pt->tbptt = tbptt;
    rp_backend *be = model->be;
    pt->grid = grid;
    pt->tp = tp;
    pt->stage = grid ? grid->stage : 0;
    pt->n_stages = grid ? grid->pp : 1;
    pt->dp = grid ? grid->dp : 1;
    pt->n_micro = n_micro;
    pt->micro_batch_size = micro_batch_size;
    pt->ctx_len = ctx_len;
    pt->model = model;
    pt->grads = grads;
    pt->adam_m = adam_m;
    pt->adam_v = adam_v;
    pt->act_in_mb = pt->grad_in_mb = pt->recomp_in_mb = -1;
    pt->timeout_s = tp ? tp->timeout_s : 0;
    pt->halt_on_nan = 1;
    if (pt->n_stages > 1 && !tp)
        return rp_error_set(err, RP_ERR_INTERNAL, "a %d-stage pipeline needs a transport",
                            pt->n_stages);
    if (tp && !be->is_host_memory && tp->be != be)
        return rp_error_set(err, RP_ERR_INTERNAL, "stage %d: the transport moves host memory but "
                            "the %s backend's buffers are device memory "
                            "(rp_transport_use_backend)", pt->stage, be->name);
    rp_status st = n_virtual > 1 ? rp_schedule_build_interleaved(&pt->sched, pt->n_stages,
                                                                 n_micro, n_virtual, err)
                   : n_chunks > 1 ? rp_schedule_build_time_chunks(&pt->sched, pt->n_stages,
                                                                  n_micro, n_chunks, err)
                                  : rp_schedule_build(&pt->sched, kind, pt->n_stages, n_micro,
                                                      err);
    if (st != RP_OK) return st;
    const int R = micro_batch_size * ctx_len, C = model->cfg.n_embd;
    /* Time chunks: a slot per chunk between its RECOMP and its BWD,
     * min(K, P - s) of them whatever the sequence length. Interleaved: the
     * peak of (micro-batch, chunk) pairs between FWD and BWD, one pool for
     * every chunk (the schedule hands the slots out from one free list). */
    pt->n_stash = pt->sched.n_buffers[pt->stage];
    pt->stash = calloc((size_t)pt->n_stash, sizeof *pt->stash);
    pt->pending = calloc((size_t)pt->n_stash, sizeof *pt->pending);
    pt->seq_len = malloc(sizeof(int) * (size_t)micro_batch_size);
    pt->slot = malloc(sizeof(int) * (size_t)micro_batch_size);
    pt->row_begin = malloc(sizeof(int) * (size_t)micro_batch_size);
    /* Only where something arrives: activations from a previous stage,
     * gradients from a next one (interleaved: on every stage, the pipe
     * wraps from the last stage to stage 0 between chunks). */
    const size_t landing_bytes = sizeof(float) * 2 * (size_t)R * C;
    const int gets_act = pt->stage > 0 || n_virtual > 1;
    const int gets_grad = pt->stage < pt->n_stages - 1 || n_virtual > 1;
    if (gets_act) pt->recv_act = be->alloc(be, landing_bytes);
    if (gets_grad) pt->recv_grad = be->alloc(be, landing_bytes);
    if (!pt->stash || !pt->pending || !pt->seq_len || !pt->slot || !pt->row_begin ||
        (gets_act && !pt->recv_act) || (gets_grad && !pt->recv_grad)) {
        rp_pipe_trainer_free(pt);
        return rp_error_set(err, RP_ERR_NOMEM, "pipeline buffers for %d micro-batches", n_micro);
    }
    /* Slot 0 owns the scratch and head buffers; the others keep only what
     * a micro-batch needs between its forward and its backward. */
    const rp_model shape = slot_shape(model, n_virtual);
    for (int i = 0; i < pt->n_stash; i++)
        if ((st = i == 0 ? rp_backward_workspace_alloc(&pt->stash[0], &shape, R,
                                                       micro_batch_size, err)
                         : rp_backward_workspace_alloc_stash(&pt->stash[i], &shape, R,
                                                             micro_batch_size,
                                                             &pt->stash[0], err)) != RP_OK) {
            rp_pipe_trainer_free(pt);
            return rp_error_prefix(err, "activation stash %d of %d", i + 1, pt->n_stash);
        }
    if (pt->sched.kind == RP_SCHEDULE_ZB_H1 && n_chunks == 1) {
        const size_t floats = rp_backward_wsave_floats(&model->cfg, R) *
                              (size_t)(model->layer_end - model->layer_begin);
        pt->wsave = calloc((size_t)pt->n_stash, sizeof *pt->wsave);
        for (int i = 0; pt->wsave && i < pt->n_stash; i++)
            if (!(pt->wsave[i] = be->alloc(be, (floats ? floats : 1) * sizeof(float)))) break;
        if (!pt->wsave || !pt->wsave[pt->n_stash - 1]) {
            rp_pipe_trainer_free(pt);
            return rp_error_set(err, RP_ERR_NOMEM, "zb-h1: the saved output gradients of %d "
                                "stash slots (%zu floats each)", pt->n_stash, floats);
        }
    }
    rp_state_geometry(&pt->state, &shape.cfg, shape.layer_begin, shape.layer_end,
                      micro_batch_size);
    rp_state_geometry(&pt->dstate, &shape.cfg, shape.layer_begin, shape.layer_end,
                      micro_batch_size);
    size_t state_bytes = pt->state.floats_per_slot * (size_t)micro_batch_size * sizeof(float);
    if (n_virtual > 1 && state_bytes == 0) state_bytes = sizeof(float);  /* chunks of no layers */
    pt->state.data = be->alloc(be, state_bytes);
    pt->dstate.data = be->alloc(be, state_bytes);
    if (n_chunks > 1) {
        pt->chunk_states = be->alloc(be, state_bytes * (size_t)n_micro);
        if (pt->stage > 0) pt->recv_recomp = be->alloc(be, landing_bytes);
    }
    if (!pt->state.data || !pt->dstate.data ||
        (n_chunks > 1 && (!pt->chunk_states || (pt->stage > 0 && !pt->recv_recomp)))) {
        rp_pipe_trainer_free(pt);
        return rp_error_set(err, RP_ERR_NOMEM, "cannot allocate the recurrent state");
    }
    for (int i = 0; i < micro_batch_size; i++) {
        pt->seq_len[i] = ctx_len;
        pt->slot[i] = i;
    }
    rp_batch_init(&pt->batch, micro_batch_size, pt->seq_len, pt->slot, pt->row_begin);
    /* More than 2 host replicas: the gradients are summed in replica order
     * (pipe_zero.h) so that --zero 1 gives the same bits; with 2, a + b is
     * the same either way and MPI's in-place all-reduce needs no scratch. */
    if (pt->dp > 2 && be->is_host_memory && (st = alloc_zero_scratch(pt, err)) != RP_OK) {
        rp_pipe_trainer_free(pt);
        return st;
    }
    /* Device gradients are all-reduced with NCCL where it can run (one GPU
     * per replica), else through a host buffer with MPI. */
    if (pt->dp > 1 && !be->is_host_memory) {
        char why[160];
        if (rp_nccl_usable(grid->data_comm, be, why, sizeof why)) {
            if ((st = rp_nccl_group_create(&pt->data_nccl, grid->data_comm, pt->timeout_s, err)) !=
                RP_OK) {
                rp_pipe_trainer_free(pt);
                return rp_error_prefix(err, "stage %d: NCCL over the %d data replicas", pt->stage,
                                       pt->dp);
            }
        } else {
            size_t most = grads->layer_floats;
            if (grads->embed_floats > most) most = grads->embed_floats;
            if (grads->head_floats > most) most = grads->head_floats;
            pt->reduce_host_floats = most < REDUCE_CHUNK_FLOATS ? most : REDUCE_CHUNK_FLOATS;
            pt->reduce_host = malloc(sizeof(float) * (pt->reduce_host_floats + 1));
            if (!pt->reduce_host) {
                rp_pipe_trainer_free(pt);
                return rp_error_set(err, RP_ERR_NOMEM, "host buffer of the gradient all-reduce");
            }
        }
    }
    return RP_OK;
}

rp_status rp_pipe_trainer_tune_state(rp_pipe_trainer *pt, rp_error *err) {
    rp_backend *be = pt->model->be;
    const rp_config *c = &pt->model->cfg;
    const size_t hnn = (size_t)c->n_head * c->head_size * c->head_size;
    /* Interleaved: every chunk's layers, chunk after chunk (tuned_offset). */
    size_t n = 0;
    for (int ch = 0; ch < pt->n_virtual; ch++)
        n += hnn * (size_t)(pt->model[ch].layer_end - pt->model[ch].layer_begin);
    const size_t bytes = (n ? n : 1) * sizeof(float);
    pt->tuned_floats = n;
    pt->tuned = be->alloc(be, bytes);
    pt->tuned_m = be->alloc(be, bytes);
    pt->tuned_v = be->alloc(be, bytes);
    pt->tuned_grad_dev = be->alloc(be, bytes);
    pt->tuned_grad = calloc(n ? n : 1, sizeof(float));
    pt->dstate_host = malloc(pt->dstate.floats_per_slot * (size_t)pt->micro_batch_size *
                             sizeof(float));
    if (!pt->tuned || !pt->tuned_m || !pt->tuned_v || !pt->tuned_grad_dev || !pt->tuned_grad ||
        !pt->dstate_host)
        return rp_error_set(err, RP_ERR_NOMEM, "cannot allocate the tuned states of %zu floats",
                            n);
    be->fill_zero(be, pt->tuned, bytes);
    be->fill_zero(be, pt->tuned_m, bytes);
    be->fill_zero(be, pt->tuned_v, bytes);
    pt->tune_state = 1;
    return RP_OK;
}

/* Where chunk c's layers start in the tuned states (and their gradient):
 * the chunks' layers one after the other, [layers][H][N][N]. */
static size_t tuned_offset(const rp_pipe_trainer *pt, int c) {
    const rp_config *cfg = &pt->model->cfg;
    size_t layers = 0;
    for (int k = 0; k < c; k++)
        layers += (size_t)(pt->model[k].layer_end - pt->model[k].layer_begin);
    return layers * (size_t)cfg->n_head * cfg->head_size * cfg->head_size;
}

/* Every slot's state at the start of a sequence: zero, or with state tuning
 * the tuned WKV states of chunk c (token shifts zero, as the official state
 * tuning); pt->state has chunk c's geometry (use_chunk_state). */
static void start_state(rp_pipe_trainer *pt, int c) {
    rp_backend *be = pt->model->be;
    be->fill_zero(be, pt->state.data,
                  pt->state.floats_per_slot * (size_t)pt->micro_batch_size * sizeof(float));
    if (!pt->tune_state) return;
    const size_t hnn = (size_t)pt->state.n_head * pt->state.head_size * pt->state.head_size;
    const float *tuned = pt->tuned + tuned_offset(pt, c);
    for (int b = 0; b < pt->micro_batch_size; b++)
        for (int l = pt->state.layer_begin; l < pt->state.layer_end; l++)
            be->copy(be, rp_state_wkv(&pt->state, b, l),
                     tuned + (size_t)(l - pt->state.layer_begin) * hnn, hnn * sizeof(float));
}

/* State tuning: adds d(initial WKV state) of every slot (pt->dstate after a
 * sequence's first backward, chunk c's geometry) to the tuned states'
 * gradient. */
static void accumulate_tuned_grad(rp_pipe_trainer *pt, int c) {
    rp_backend *be = pt->model->be;
    const rp_state *d = &pt->dstate;
    const size_t hnn = (size_t)d->n_head * d->head_size * d->head_size;
    be->copy_to_host(be, pt->dstate_host, d->data,
                     d->floats_per_slot * (size_t)pt->micro_batch_size * sizeof(float));
    rp_state host = *d;
    host.data = pt->dstate_host;
    float *grad = pt->tuned_grad + tuned_offset(pt, c);
    for (int b = 0; b < pt->micro_batch_size; b++)
        for (int l = d->layer_begin; l < d->layer_end; l++) {
            const float *src = rp_state_wkv(&host, b, l);
            float *dst = grad + (size_t)(l - d->layer_begin) * hnn;
            for (size_t i = 0; i < hnn; i++) dst[i] += src[i];
        }
}

void rp_pipe_trainer_free(rp_pipe_trainer *pt) {
    rp_backend *be = pt->model ? pt->model->be : NULL;
    float *tuned_dev[] = {pt->tuned, pt->tuned_m, pt->tuned_v, pt->tuned_grad_dev};
    for (int i = 0; i < 4; i++)
        if (be && tuned_dev[i]) be->free(be, tuned_dev[i]);
    free(pt->tuned_grad);
    free(pt->dstate_host);
    /* Slot 0 last: the others borrow its scratch. */
    for (int i = pt->n_stash - 1; pt->stash && i >= 0; i--)
        rp_backward_workspace_free(&pt->stash[i], be);
    if (be && pt->state.data) be->free(be, pt->state.data);
    if (be && pt->dstate.data) be->free(be, pt->dstate.data);
    if (be && pt->chunk_states) be->free(be, pt->chunk_states);
    if (be && pt->recv_recomp) be->free(be, pt->recv_recomp);
    for (int i = 0; pt->wsave && i < pt->n_stash; i++)
        if (be && pt->wsave[i]) be->free(be, pt->wsave[i]);
    free(pt->wsave);
    free(pt->stash);
    free(pt->pending);
    free(pt->seq_len);
    free(pt->slot);
    free(pt->row_begin);
    if (be && pt->recv_act) be->free(be, pt->recv_act);
    if (be && pt->recv_grad) be->free(be, pt->recv_grad);
    rp_nccl_group_free(pt->data_nccl);
    free(pt->reduce_host);
    free(pt->zero_scratch);
    rp_zero_links_free(pt->zero_links);
    rp_schedule_free(&pt->sched);
    memset(pt, 0, sizeof *pt);
}

/* Finds the next instruction with opcode op after position i, or -1. */
static int next_op(const rp_pipe_instr *list, int n, int i, rp_pipe_opcode op) {
    for (int j = i + 1; j < n; j++)
        if (list[j].op == op) return j;
    return -1;
}

/* The message id of micro-batch mb arriving at model chunk k: the
 * micro-batch itself with one chunk per stage; interleaved, chunk k's
 * activations and its output gradient differ from every other chunk's. */
static int msg_id(const rp_pipe_trainer *pt, int k, int mb) {
    return pt->n_virtual > 1 ? k * pt->n_micro + mb : mb;
}

/* What a landing buffer holds: (chunk, micro-batch) as one number. */
static int pair_of(const rp_pipe_trainer *pt, const rp_pipe_instr *in) {
    return in->chunk * pt->n_micro + in->micro_batch;
}

/* Posts the receive (x and v_first) of the micro-batch a RECV instruction
 * names; inside a transport group when the caller opened one. A time
 * chunk's recomputed activations (RECV_RECOMP) travel as activations, with
 * the same tags as its first forward's, after them: a link delivers
 * same-tag messages in order, and a stage posts the RECV_RECOMP of a chunk
 * only after its RECV_ACT completed (recv_recomp). */
static rp_status post_recv(rp_pipe_trainer *pt, const rp_pipe_instr *in, rp_error *err) {
    const size_t rc = (size_t)pt->micro_batch_size * pt->ctx_len * pt->model->cfg.n_embd;
    const int is_act = in->op != RP_OP_RECV_GRAD, recomp = in->op == RP_OP_RECV_RECOMP;
    float *buf = recomp ? pt->recv_recomp : is_act ? pt->recv_act : pt->recv_grad;
    rp_transfer *x = recomp ? pt->recomp_in : is_act ? pt->act_in : pt->grad_in;
    const int P = pt->n_stages, peer = (pt->stage + (is_act ? P - 1 : 1)) % P;
    const int id = msg_id(pt, in->chunk * P + pt->stage, in->micro_batch);
    rp_status st = rp_transport_post_recv(pt->tp, buf, rc * sizeof(float), peer,
                                          is_act ? RP_MSG_ACT : RP_MSG_GRAD, id, &x[0], err);
    if (st == RP_OK)
        st = rp_transport_post_recv(pt->tp, buf + rc, rc * sizeof(float), peer,
                                    is_act ? RP_MSG_ACT_VFIRST : RP_MSG_GRAD_VFIRST, id, &x[1],
                                    err);
    if (recomp) pt->recomp_in_mb = in->micro_batch;
    else if (is_act) pt->act_in_mb = pair_of(pt, in);
    else pt->grad_in_mb = pair_of(pt, in);
    return st;
}

/* The receive (x and v_first) of a RECV instruction as one transport group. */
static rp_status post_recv_group(rp_pipe_trainer *pt, const rp_pipe_instr *in, rp_error *err) {
    rp_transport_group_begin(pt->tp);
    rp_status st = post_recv(pt, in, err);
    rp_status end = rp_transport_group_end(pt->tp, st == RP_OK ? err : NULL);
    return st != RP_OK ? st : end;
}

/* Posts the sends (x and v_first) of a SEND instruction from its stash
 * slot; with exchange, also the receive of the instruction after it, from
 * the same neighbour, all in one transport group. */
static rp_status post_send(rp_pipe_trainer *pt, const rp_pipe_instr *in,
                           const rp_pipe_instr *exchange, rp_error *err) {
    const size_t rc_bytes =
        (size_t)pt->micro_batch_size * pt->ctx_len * pt->model->cfg.n_embd * sizeof(float);
    const int is_act = in->op != RP_OP_SEND_GRAD;  /* SEND_ACT, SEND_RECOMP */
    rp_backward_workspace *tw = &pt->stash[in->buffer];
    rp_transfer *x = &pt->pending[in->buffer][is_act ? 0 : 2];
    const int P = pt->n_stages, peer = (pt->stage + (is_act ? 1 : P - 1)) % P;
    const int id = msg_id(pt, in->chunk * P + pt->stage + (is_act ? 1 : -1), in->micro_batch);
    rp_transport_group_begin(pt->tp);
    rp_status st = rp_transport_post_send(pt->tp, is_act ? tw->x : tw->dx, rc_bytes, peer,
                                          is_act ? RP_MSG_ACT : RP_MSG_GRAD, id, &x[0], err);
    if (st == RP_OK)
        st = rp_transport_post_send(pt->tp, is_act ? tw->v_first : tw->dv_first, rc_bytes, peer,
                                    is_act ? RP_MSG_ACT_VFIRST : RP_MSG_GRAD_VFIRST, id, &x[1],
                                    err);
    if (st == RP_OK && exchange) st = post_recv(pt, exchange, err);
    rp_status end = rp_transport_group_end(pt->tp, st == RP_OK ? err : NULL);
    return st != RP_OK ? st : end;
}

/* With grouped exchanges (NCCL), the receive a SEND at i shares a group
 * with: the next instruction when it receives from the same neighbour
 * (1F1B's steady state: SEND_ACT m + RECV_GRAD b with stage s+1, SEND_GRAD
 * b + RECV_ACT m+1 with stage s-1, which the neighbour issues as its own
 * matching pair), else none. */
static const rp_pipe_instr *exchange_of(const rp_pipe_instr *list, int n, int i) {
    /* ZB-H1's BWD_W between the two does not change 1F1B's pairs. */
    int j = i + 1;
    while (j < n && list[j].op == RP_OP_BWD_W) j++;
    if (j >= n) return NULL;
    const rp_pipe_opcode next = list[j].op;
    if (list[i].op == RP_OP_SEND_ACT && next == RP_OP_RECV_GRAD) return &list[j];
    if (list[i].op == RP_OP_SEND_GRAD && next == RP_OP_RECV_ACT) return &list[j];
    /* time chunks' backward phase: 1F1B with RECOMP for FWD */
    if (list[i].op == RP_OP_SEND_RECOMP && next == RP_OP_RECV_GRAD) return &list[j];
    if (list[i].op == RP_OP_SEND_GRAD && next == RP_OP_RECV_RECOMP) return &list[j];
    return NULL;
}

/* Sends that read a stash slot's buffers must finish before something
 * overwrites them; only those: a gradient send still in flight need not
 * delay the next forward into the slot (measured: that wait put the
 * previous stage's polling on the critical path). */
enum { PENDING_ACT = 1, PENDING_GRAD = 2, PENDING_ALL = 3 };

static rp_status wait_pending(rp_pipe_trainer *pt, int buffer, int which, rp_error *err) {
    for (int k = 0; k < 4; k++) {
        if (!(which & (k < 2 ? PENDING_ACT : PENDING_GRAD))) continue;
        rp_status st = rp_transport_wait(pt->tp, &pt->pending[buffer][k], err);
        if (st != RP_OK) return st;
    }
    return RP_OK;
}

/* p [n] (host memory) = its sum over the data replicas, in place. */
rp_status rp_pipe_allreduce_floats(MPI_Comm comm, int stage, float *p, size_t n,
                                   double timeout_s, rp_error *err) {
    /* MPI counts are ints: large tensors go in pieces. */
    for (size_t at = 0; at < n; at += (size_t)1 << 30) {
        size_t len = n - at < ((size_t)1 << 30) ? n - at : (size_t)1 << 30;
        MPI_Request req;
        if (MPI_Iallreduce(MPI_IN_PLACE, p + at, (int)len, MPI_FLOAT, MPI_SUM, comm, &req) !=
            MPI_SUCCESS) {
            int dp = 0;
            MPI_Comm_size(comm, &dp);
            return rp_error_set(err, RP_ERR_MPI,
                                "stage %d: all-reducing gradients over %d replicas failed",
                                stage, dp);
        }
        rp_status st = rp_comm_wait(&req, timeout_s, "the gradient all-reduce over the "
                                    "data replicas", err);
        if (st != RP_OK) return st;
    }
    return RP_OK;
}

static rp_status allreduce_host(rp_pipe_trainer *pt, float *p, size_t n, rp_error *err) {
    return rp_pipe_allreduce_floats(pt->grid->data_comm, pt->stage, p, n, pt->timeout_s, err);
}

static rp_status reduce_chunk_grads(rp_pipe_trainer *pt, rp_model *g, rp_error *err) {
    rp_backend *be = pt->model->be;
    float *bufs[3] = {g->embed_flat, g->head_flat, NULL};
    size_t sizes[3] = {g->embed_floats, g->head_floats, 0};
    /* The backward's kernels are done (BWD synchronized); this is cheap. */
    be->synchronize(be);
    for (int i = 0; i < g->layer_end - g->layer_begin + 2; i++) {
        float *p = i < 2 ? bufs[i] : g->layer_flat[i - 2];
        size_t n = i < 2 ? sizes[i] : g->layer_floats;
        if (!p) continue;
        rp_status st = RP_OK;
        if (pt->zero_links) {
            /* ZeRO-1: sums in replica order (pipe_zero.h), my range only. */
            st = rp_zero_links_reduce_scatter(pt->zero_links, p, n, err);
        } else if (pt->data_nccl) {
            st = rp_nccl_group_allreduce_sum(pt->data_nccl, p, n, "the gradient all-reduce over "
                                             "the data replicas", err);
        } else if (pt->reduce_host) {
            /* Device memory without NCCL: through the host buffer in pieces. */
            for (size_t at = 0; at < n && st == RP_OK; at += pt->reduce_host_floats) {
                size_t len = n - at < pt->reduce_host_floats ? n - at : pt->reduce_host_floats;
                be->copy_to_host(be, pt->reduce_host, p + at, len * sizeof(float));
                if ((st = allreduce_host(pt, pt->reduce_host, len, err)) == RP_OK)
                    be->copy_to_device(be, p + at, pt->reduce_host, len * sizeof(float));
            }
        } else if (pt->zero_scratch) {
            /* Sums in replica order (pipe_zero.h); ZeRO keeps its range only. */
            st = rp_zero_reduce_scatter(pt->grid->data_comm, p, n, pt->zero_scratch,
                                        pt->timeout_s, err);
            if (st == RP_OK && !pt->zero)
                st = rp_zero_allgather(pt->grid->data_comm, p, n, pt->timeout_s, err);
        } else {
            st = allreduce_host(pt, p, n, err);
        }
        if (st != RP_OK) return st;
    }
    return be->status(be, err);
}

/* Every chunk's gradients summed over the data replicas, in chunk order. */
static rp_status reduce_grads(rp_pipe_trainer *pt, rp_error *err) {
    rp_status st = RP_OK;
    for (int c = 0; c < pt->n_virtual && st == RP_OK && pt->dp > 1; c++)
        st = reduce_chunk_grads(pt, &pt->grads[c], err);
    return st;
}

/* --zero 1: every replica's updated ranges to every replica, chunk by chunk. */
static rp_status allgather_weights(rp_pipe_trainer *pt, rp_error *err) {
    if (pt->dp <= 1) return RP_OK;
    size_t n;
    float *w;
    rp_status st = RP_OK;
    for (int c = 0; c < pt->n_virtual && st == RP_OK; c++) {
        for (int i = 0; st == RP_OK && (w = rp_zero_buffer(&pt->model[c], i, &n)); i++)
            st = rp_zero_links_allgather(pt->zero_links, w, n, err);
        /* NCCL wrote the other ranges behind the backend: its bf16 copies
         * of the weights (CUDA) are made again from the fp32 master weights. */
        if (st == RP_OK && rp_zero_links_bypass_backend(pt->zero_links))
            rp_model_register_weights(&pt->model[c]);
    }
    return st;
}

/* --zero 1 over the data replicas: the squared gradient norm from each
 * replica's ranges. The unsharded run adds, chunk by chunk, the replicas'
 * range partials in replica order; so does this, from every replica's
 * per-chunk partials (one all-gather), so both give the same double. */
static rp_status zero_sum_squares(rp_pipe_trainer *pt, double *sumsq, rp_error *err) {
    const int V = pt->n_virtual, dp = pt->dp;
    if (V == 1)
        return rp_zero_sum_partials(pt->grid->data_comm,
                                    rp_zero_partial_sum_squares(pt->grads, dp, pt->zero->rank),
                                    sumsq, pt->timeout_s, err);
    static const char what[] = "the gradient-norm gather over the data replicas (--zero 1, "
                               "interleaved)";
    double *mine = malloc(sizeof(double) * (size_t)V);
    double *all = malloc(sizeof(double) * (size_t)V * (size_t)dp);
    rp_status st = RP_OK;
    if (!mine || !all) st = rp_error_set(err, RP_ERR_NOMEM, "%s: %d x %d partials", what, dp, V);
    for (int c = 0; st == RP_OK && c < V; c++)
        mine[c] = rp_zero_partial_sum_squares(&pt->grads[c], dp, pt->zero[c].rank);
    MPI_Request req;
    if (st == RP_OK && MPI_Iallgather(mine, V, MPI_DOUBLE, all, V, MPI_DOUBLE,
                                      pt->grid->data_comm, &req) != MPI_SUCCESS)
        st = rp_error_set(err, RP_ERR_MPI, "stage %d: %s could not start", pt->stage, what);
    if (st == RP_OK) st = rp_comm_wait(&req, pt->timeout_s, what, err);
    if (st == RP_OK) {
        double s = 0;
        for (int c = 0; c < V; c++)
            for (int d = 0; d < dp; d++) s += all[(size_t)d * V + c];
        *sumsq = s;
    }
    free(mine);
    free(all);
    return st;
}

/* Zeroes the gradients, timed as part of the step's update. */
static void zero_grads(rp_pipe_trainer *pt) {
    rp_backend *be = pt->model->be;
    const double t0 = rp_now_seconds();
    for (int c = 0; c < pt->n_virtual; c++) rp_model_zero(&pt->grads[c]);
    be->synchronize(be);
    pt->update_seconds += rp_now_seconds() - t0;
}

/* Layer l's saved output gradients in stash slot b (zb-h1). */
static float *wsave_of(const rp_pipe_trainer *pt, int b, int l) {
    return pt->wsave[b] + rp_backward_wsave_floats(&pt->model->cfg, pt->micro_batch_size *
                                                                        pt->ctx_len) *
                              (size_t)(l - pt->model->layer_begin);
}

/* A time chunk's forward in tw: its input (embedding, or the x and v_first
 * its RECV_ACT / RECV_RECOMP put in tw), from its start state. first: the
 * FWD, which takes the state the previous chunk left in pt->state (zero for
 * a group's first chunk) and keeps a copy; else the RECOMP from that copy. */
static rp_status chunk_forward(rp_pipe_trainer *pt, rp_backward_workspace *tw,
                               const int32_t *inputs, int mb, int first, rp_error *err) {
    rp_model *m = pt->model;
    rp_backend *be = m->be;
    const size_t R = (size_t)pt->micro_batch_size * pt->ctx_len;
    const size_t state_bytes =
        pt->state.floats_per_slot * (size_t)pt->micro_batch_size * sizeof(float);
    float *kept = pt->chunk_states + (size_t)mb * (state_bytes / sizeof(float));
    if (first) {
        if (mb % pt->n_chunks == 0) start_state(pt, 0);
        be->copy(be, kept, pt->state.data, state_bytes);
    } else {
        be->copy(be, pt->state.data, kept, state_bytes);
    }
    if (m->has_embed) {
        rp_status st = rp_backward_embed_forward(m, tw, inputs + (size_t)mb * R, &pt->batch, err);
        if (st != RP_OK) return st;
    }
    for (int l = m->layer_begin; l < m->layer_end; l++)
        rp_backward_block_forward(m, tw, l, &pt->state, &pt->batch);
    return RP_OK;
}

/* RECV_RECOMP at list[i]: a time chunk's recomputed input (x, v_first)
 * from the previous stage into tw. Posted here unless already posted;
 * early (while the stage computes) only for the next chunk of the same
 * group, whose RECV_ACT has completed: its tags are those of that chunk's
 * first forward, so a receive posted before that RECV_ACT could take the
 * first forward's message. */
static rp_status recv_recomp(rp_pipe_trainer *pt, const rp_pipe_instr *list, int n, int i,
                             int grouped, rp_backward_workspace *tw, rp_error *err) {
    rp_backend *be = pt->model->be;
    const rp_pipe_instr *in = &list[i];
    const size_t rc = (size_t)pt->micro_batch_size * pt->ctx_len * pt->model->cfg.n_embd;
    rp_status st;
    if (pt->recomp_in_mb != in->micro_batch &&
        (st = grouped ? post_recv_group(pt, in, err) : post_recv(pt, in, err)) != RP_OK)
        return st;
    if ((st = rp_transport_wait(pt->tp, &pt->recomp_in[0], err)) != RP_OK ||
        (st = rp_transport_wait(pt->tp, &pt->recomp_in[1], err)) != RP_OK ||
        (st = wait_pending(pt, in->buffer, PENDING_ACT, err)) != RP_OK)
        return st;
    be->copy(be, tw->x, pt->recv_recomp, rc * sizeof(float));
    be->copy(be, tw->v_first, pt->recv_recomp + rc, rc * sizeof(float));
    pt->recomp_in_mb = -1;
    const int j = grouped ? -1 : next_op(list, n, i, RP_OP_RECV_RECOMP);
    if (j >= 0 && list[j].micro_batch / pt->n_chunks == in->micro_batch / pt->n_chunks)
        return post_recv(pt, &list[j], err);
    return RP_OK;
}

/* The global gradient norm from this stage's sum of squares, summed over
 * the stages (every rank gets the same), and what a NaN or inf norm means:
 * an error with halt_on_nan, else *skip = 1 (every rank skips the step).
 * tp only names the other ranks in a timeout's message (may be NULL). */
rp_status rp_pipe_global_grad_norm(MPI_Comm pipe_comm, int n_stages, double sumsq,
                                   double timeout_s, const rp_transport *tp, int halt_on_nan,
                                   long step, double *norm, int *skip, rp_error *err) {
    *skip = 0;
    if (n_stages > 1) {
        MPI_Request req;
        MPI_Iallreduce(MPI_IN_PLACE, &sumsq, 1, MPI_DOUBLE, MPI_SUM, pipe_comm, &req);
        char others[192] = "", what[256];
        snprintf(what, sizeof what, "the gradient-norm all-reduce over the stages%s",
                 tp ? rp_transport_others_where(tp, others, sizeof others) : "");
        rp_status st = rp_comm_wait(&req, timeout_s, what, err);
        if (st != RP_OK) return st;
    }
    *norm = sqrt(sumsq);
    if (isfinite(*norm)) return RP_OK;
    if (halt_on_nan)
        return rp_error_set(err, RP_ERR_DIVERGED,
                            "step %ld: the gradient norm is %g (NaN or inf loss): training "
                            "diverged; lower --lr, or resume from the last checkpoint "
                            "(--no-halt-on-nan skips such steps)", step + 1, *norm);
    *skip = 1;
    return RP_OK;
}

/* RECOMP: time chunk mb's forward again, from its kept start state, into
 * tw (bit for bit the FWD's: the same ops on the same bytes), the head's
 * loss and backward with it on the last stage. */
static rp_status recompute(rp_pipe_trainer *pt, rp_backward_workspace *tw, const int32_t *inputs,
                           const int32_t *targets, int mb, float loss_scale, float l2wrap_factor,
                           double *local_loss, rp_error *err) {
    rp_model *m = pt->model;
    rp_backend *be = m->be;
    const size_t R = (size_t)pt->micro_batch_size * pt->ctx_len;
    rp_status st = wait_pending(pt, (int)(tw - pt->stash), m->has_head ? PENDING_ALL : PENDING_ACT,
                                err);
    if (st != RP_OK) return st;
    const double t0 = rp_now_seconds();
    if ((st = chunk_forward(pt, tw, inputs, mb, 0, err)) != RP_OK) return st;
    if (m->has_head)
        *local_loss += rp_backward_head(m, pt->grads, tw, targets + (size_t)mb * R, &pt->batch,
                                        loss_scale, l2wrap_factor);
    be->synchronize(be);
    pt->busy_seconds += rp_now_seconds() - t0;
    if ((st = be->status(be, err)) != RP_OK)
        rp_error_prefix(err, "stage %d: recomputed forward of time chunk %d", pt->stage, mb);
    return st;
}

rp_status rp_pipe_trainer_step(rp_pipe_trainer *pt, const int32_t *inputs,
                               const int32_t *targets, float loss_scale, float l2wrap_factor,
                               const rp_optim_config *optim, long step, rp_pipe_step_result *res,
                               rp_error *err) {
    rp_model *m = pt->model;
    rp_backend *be = m->be;
    const int R = pt->micro_batch_size * pt->ctx_len, C = m->cfg.n_embd;
    const size_t rc = (size_t)R * C, rc_bytes = rc * sizeof(float);
    const rp_pipe_instr *list = pt->sched.instr[pt->stage];
    const int n = pt->sched.n_instr[pt->stage];
    const int last = pt->stage == pt->n_stages - 1;
    double local_loss = 0, grad_norm = 0;
    int skipped = 0;
    rp_status st = RP_OK;
    /* The stashes were sized for the backend's fused entries at init; one
     * switched off since would run on buffers that were never allocated. */
    for (int i = 0; i < pt->n_stash; i++)
        if ((st = rp_backward_workspace_check(&pt->stash[i], be, err)) != RP_OK)
            return rp_error_prefix(err, "activation stash %d of %d", i + 1, pt->n_stash);
    pt->busy_seconds = pt->update_seconds = pt->fwd_seconds = 0;
    /* The first step runs its device transfers over MPI: the CUDA backend
     * sizes its scratch buffers during it, and freeing the old ones
     * (cudaFree) waits for the whole device, so with an NCCL receive posted
     * early and waiting for its peer two stages could wait for each other.
     * From the second step on nothing is freed inside a step. */
    const int nccl_warmup = pt->tp && pt->steps_done == 0 && rp_transport_nccl_active(pt->tp);
    if (nccl_warmup) rp_transport_pause_nccl(pt->tp, 1);
    /* Over MPI a receive is posted as early as possible: the next one of its
     * kind as soon as the previous is in, so it lands while we compute. Over
     * NCCL a receive blocks its link's stream until matched, and NCCL does
     * not promise to progress two links at once: a receive posted early on
     * one link ahead of a send its neighbour waits for hangs both stages
     * (tests/test_nccl_mock.sh shows it). There each exchange of the
     * schedule is one group instead, posted where the schedule reaches it. */
    const int grouped = pt->tp && rp_transport_nccl_active(pt->tp);
    pt->act_in_mb = pt->grad_in_mb = -1;
    /* Zeroing the gradients is compute of the step. A stage that gets
     * gradients from the next one first accumulates into them in its first
     * BWD, after a receive it usually waits for: it zeroes there, off the
     * path of its forwards (the last stage's FWD accumulates the head's, and
     * a lone stage has no receive: they zero now). */
    if (pt->tune_state) memset(pt->tuned_grad, 0, pt->tuned_floats * sizeof(float));
    /* (Interleaved: the head's chunk runs before the first receive.) */
    int zero_pending = next_op(list, n, -1, RP_OP_RECV_GRAD) >= 0 && !m->has_head &&
                       pt->n_virtual == 1;
    if (!zero_pending) zero_grads(pt);
    /* The first receive of each kind is posted before any compute. */
    int j;
    if (!grouped && (j = next_op(list, n, -1, RP_OP_RECV_ACT)) >= 0 &&
        (st = post_recv(pt, &list[j], err)))
        return st;
    if (!grouped && (j = next_op(list, n, -1, RP_OP_RECV_GRAD)) >= 0 &&
        (st = post_recv(pt, &list[j], err)))
        return st;

    const int chunked = pt->n_chunks > 1;
    pt->trace_len = 0;
    for (int i = 0; i < n && st == RP_OK; i++) {
        const rp_pipe_instr *in = &list[i];
        const int mb = in->micro_batch;
        rp_backward_workspace *tw = in->buffer >= 0 ? &pt->stash[in->buffer] : NULL;
        /* The instruction's chunk: its layers, gradients and state. */
        rp_model *cm = &m[in->chunk], *cg = &pt->grads[in->chunk];
        if (pt->trace && pt->trace_len < pt->trace_cap)
            pt->trace[pt->trace_len] =
                (struct rp_pipe_trace_entry){in->op, mb, rp_now_seconds(), 0, in->chunk};
        switch (in->op) {
        case RP_OP_RECV_ACT:
        case RP_OP_RECV_GRAD: {
            const int is_act = in->op == RP_OP_RECV_ACT;
            rp_transfer *x = is_act ? pt->act_in : pt->grad_in;
            if (!is_act && zero_pending) {
                zero_grads(pt);
                zero_pending = 0;
            }
            if ((is_act ? pt->act_in_mb : pt->grad_in_mb) != pair_of(pt, in)) {
                if (!grouped) {
                    st = rp_error_set(err, RP_ERR_INTERNAL, "stage %d: receive of micro-batch "
                                      "%d chunk %d was not posted", pt->stage, mb, in->chunk);
                    break;
                }
                if ((st = post_recv_group(pt, in, err)) != RP_OK) break;
            }
            if ((st = rp_transport_wait(pt->tp, &x[0], err)) != RP_OK ||
                (st = rp_transport_wait(pt->tp, &x[1], err)) != RP_OK ||
                (st = wait_pending(pt, in->buffer, is_act ? PENDING_ACT : PENDING_GRAD, err)) !=
                    RP_OK)
                break;
            const float *buf = is_act ? pt->recv_act : pt->recv_grad;
            be->copy(be, is_act ? tw->x : tw->dx, buf, rc_bytes);
            be->copy(be, is_act ? tw->v_first : tw->dv_first, buf + rc, rc_bytes);
            if (is_act) pt->act_in_mb = -1;
            else pt->grad_in_mb = -1;
            /* Overlap: the next micro-batch's receive is in flight while we compute. */
            if (!grouped && (j = next_op(list, n, i, in->op)) >= 0)
                st = post_recv(pt, &list[j], err);
            break;
        }
        case RP_OP_FWD: {
            /* The last stage's forward also writes dx (the head's backward). */
            if ((st = wait_pending(pt, in->buffer, cm->has_head ? PENDING_ALL : PENDING_ACT,
                                   err)) != RP_OK)
                break;
            use_chunk_state(pt, in->chunk);
            const double t0 = rp_now_seconds();
            if (chunked) {
                st = chunk_forward(pt, tw, inputs, mb, 1, err);
                be->synchronize(be);
                const double dt = rp_now_seconds() - t0;
                pt->busy_seconds += dt;
                pt->fwd_seconds += dt;
                if (st == RP_OK && (st = be->status(be, err)) != RP_OK)
                    rp_error_prefix(err, "stage %d: forward of time chunk %d", pt->stage, mb);
                break;
            }
            start_state(pt, in->chunk);
            if (cm->has_embed &&
                (st = rp_backward_embed_forward(cm, tw, inputs + (size_t)mb * R, &pt->batch,
                                                err)) != RP_OK)
                break;
            for (int l = cm->layer_begin; l < cm->layer_end; l++)
                rp_backward_block_forward(cm, tw, l, &pt->state, &pt->batch);
            if (cm->has_head) {
                /* The head's backward right away (one fused op): only d x
                 * is kept until this micro-batch's BWD, never its logits. */
                local_loss += rp_backward_head(cm, cg, tw, targets + (size_t)mb * R,
                                               &pt->batch, loss_scale, l2wrap_factor);
            }
            be->synchronize(be);
            const double dt = rp_now_seconds() - t0;
            pt->busy_seconds += dt;
            pt->fwd_seconds += dt;
            if ((st = be->status(be, err)) != RP_OK)
                rp_error_prefix(err, "stage %d chunk %d: forward of micro-batch %d", pt->stage,
                                in->chunk, mb);
            break;
        }
        case RP_OP_SEND_ACT:
        case RP_OP_SEND_GRAD:
        case RP_OP_SEND_RECOMP:
            st = post_send(pt, in, grouped ? exchange_of(list, n, i) : NULL, err);
            break;
        case RP_OP_RECV_RECOMP:
            st = recv_recomp(pt, list, n, i, grouped, tw, err);
            break;
        case RP_OP_RECOMP:
            st = recompute(pt, tw, inputs, targets, mb, loss_scale, l2wrap_factor, &local_loss,
                           err);
            break;
        case RP_OP_BWD:
        case RP_OP_BWD_B: {
            if ((st = wait_pending(pt, in->buffer, PENDING_ALL, err)) != RP_OK) break;
            if (in->op == RP_OP_BWD_B && !pt->wsave) {
                st = rp_error_set(err, RP_ERR_INTERNAL, "stage %d: BWD_B without the zb-h1 "
                                  "buffers", pt->stage);
                break;
            }
            use_chunk_state(pt, in->chunk);
            const double t0 = rp_now_seconds();
            /* Time chunks: the chunk's RECOMP left its activations in tw.
             * Each sequence ends with the micro-batch: d(final state) = 0.
             * A time chunk other than the last instead keeps the d(start
             * state) the backward of the chunk after it left here, unless
             * --tbptt truncates it. */
            if (!chunked || pt->tbptt || mb % pt->n_chunks == pt->n_chunks - 1)
                be->fill_zero(be, pt->dstate.data, pt->dstate.floats_per_slot *
                                                       (size_t)pt->micro_batch_size *
                                                       sizeof(float));  /* this chunk's */
            for (int l = cm->layer_end - 1; l >= cm->layer_begin; l--) {
                if (in->op == RP_OP_BWD_B)
                    rp_backward_block_backward_b(cm, cg, tw, l, &pt->dstate, &pt->batch,
                                                 wsave_of(pt, in->buffer, l));
                else
                    rp_backward_block_backward(cm, cg, tw, l, &pt->dstate, &pt->batch);
            }
            if (pt->tune_state && (!chunked || mb % pt->n_chunks == 0))
                accumulate_tuned_grad(pt, in->chunk);
            if (cm->has_embed)
                rp_backward_embed_backward(cm, cg, tw, inputs + (size_t)mb * R, &pt->batch);
            be->synchronize(be);
            pt->busy_seconds += rp_now_seconds() - t0;
            if ((st = be->status(be, err)) != RP_OK)
                rp_error_prefix(err, "stage %d chunk %d: backward of micro-batch %d", pt->stage,
                                in->chunk, mb);
            break;
        }
        case RP_OP_BWD_W: {
            if (!pt->wsave) {
                st = rp_error_set(err, RP_ERR_INTERNAL, "stage %d: BWD_W without the zb-h1 "
                                  "buffers", pt->stage);
                break;
            }
            const double t0 = rp_now_seconds();
            for (int l = m->layer_end - 1; l >= m->layer_begin; l--)
                rp_backward_block_backward_w(m, pt->grads, tw, l, &pt->batch,
                                             wsave_of(pt, in->buffer, l));
            be->synchronize(be);
            pt->busy_seconds += rp_now_seconds() - t0;
            if ((st = be->status(be, err)) != RP_OK)
                rp_error_prefix(err, "stage %d: weight gradients of micro-batch %d", pt->stage,
                                mb);
            break;
        }
        case RP_OP_REDUCE_GRADS:
            for (int b = 0; b < pt->n_stash && st == RP_OK; b++)
                st = wait_pending(pt, b, PENDING_ALL, err);
            if (st == RP_OK) st = reduce_grads(pt, err);
            if (st == RP_OK && pt->tune_state && pt->dp > 1)
                st = allreduce_host(pt, pt->tuned_grad, pt->tuned_floats, err);
            break;
        case RP_OP_OPT_STEP: {
            if (!optim) break;  /* gradients only: the weights stay */
            double t0 = rp_now_seconds();
            double sumsq = 0;
            if (pt->lora)
                for (int c = 0; c < pt->n_virtual; c++)
                    sumsq += rp_lora_grads(&pt->lora[c], &pt->grads[c]);
            else if (pt->tune_state)
                for (size_t k = 0; k < pt->tuned_floats; k++)
                    sumsq += (double)pt->tuned_grad[k] * pt->tuned_grad[k];
            else if (pt->dp == 1 || !pt->zero)
                /* Chunk by chunk; over replicas the replicas' ranges in
                 * replica order, as --zero 1 adds them. */
                for (int c = 0; c < pt->n_virtual; c++) {
                    if (pt->dp == 1)
                        sumsq += rp_grad_sum_squares(&pt->grads[c]);
                    else
                        for (int d = 0; d < pt->dp; d++)
                            sumsq += rp_zero_partial_sum_squares(&pt->grads[c], pt->dp, d);
                }
            pt->update_seconds += rp_now_seconds() - t0;
            if (pt->zero && pt->dp > 1 && (st = zero_sum_squares(pt, &sumsq, err)) != RP_OK)
                break;
            if ((st = rp_pipe_global_grad_norm(pt->grid ? pt->grid->pipe_comm : MPI_COMM_NULL,
                                               pt->n_stages, sumsq,
                                               pt->timeout_s, pt->tp, pt->halt_on_nan, step,
                                               &grad_norm, &skipped, err)) != RP_OK ||
                skipped)
                break;
            t0 = rp_now_seconds();
            if (pt->lora) {
                /* Only the adapters move; W' is formed again from them. */
                for (int c = 0; c < pt->n_virtual; c++)
                    rp_lora_step(&pt->lora[c], (float)rp_lr_at(optim, step), optim->beta1,
                                 optim->beta2, optim->eps, optim->weight_decay,
                                 rp_clip_scale(grad_norm, optim->grad_clip), step);
            } else if (pt->tune_state) {
                /* Only the tuned states move (AdamW, no weight decay). */
                be->copy_to_device(be, pt->tuned_grad_dev, pt->tuned_grad,
                                   pt->tuned_floats * sizeof(float));
                be->adamw(be, pt->tuned, pt->tuned_grad_dev, pt->tuned_m, pt->tuned_v,
                          pt->tuned_floats, (float)rp_lr_at(optim, step), optim->beta1,
                          optim->beta2, optim->eps, 0.0f,
                          rp_clip_scale(grad_norm, optim->grad_clip),
                          (float)(1.0 - pow(optim->beta1, (double)(step + 1))),
                          (float)(1.0 - pow(optim->beta2, (double)(step + 1))));
            } else if (pt->zero) {
                for (int c = 0; c < pt->n_virtual; c++)
                    rp_zero_optim_step(&pt->zero[c], &m[c], &pt->grads[c], optim, step,
                                       rp_clip_scale(grad_norm, optim->grad_clip));
                pt->update_seconds += rp_now_seconds() - t0;
                st = allgather_weights(pt, err);
                t0 = rp_now_seconds();
            } else {
                for (int c = 0; c < pt->n_virtual; c++)
                    rp_optim_step(&m[c], &pt->grads[c], &pt->adam_m[c], &pt->adam_v[c], optim,
                                  step, rp_clip_scale(grad_norm, optim->grad_clip));
            }
            be->synchronize(be);
            pt->update_seconds += rp_now_seconds() - t0;
            break;
        }
        default:
            st = rp_error_set(err, RP_ERR_INTERNAL, "stage %d: unknown opcode %d", pt->stage,
                              (int)in->op);
        }
        if (pt->trace && pt->trace_len < pt->trace_cap)
            pt->trace[pt->trace_len++].end_s = rp_now_seconds();
    }
    if (st != RP_OK) return st;
    pt->busy_seconds += pt->update_seconds;
    if ((st = be->status(be, err)) != RP_OK)
        return rp_error_prefix(err, "stage %d: optimizer step", pt->stage);
    /* The loss lives on the last stage of each replica: sum over replicas,
     * then hand it to every stage (rank 0 logs it). */
    double loss = last ? local_loss : 0;
    if (pt->grid) {
        MPI_Request req;
        if (pt->dp > 1) {
            MPI_Iallreduce(MPI_IN_PLACE, &loss, 1, MPI_DOUBLE, MPI_SUM, pt->grid->data_comm,
                           &req);
            if ((st = rp_comm_wait(&req, pt->timeout_s, "the loss all-reduce", err)) != RP_OK)
                return st;
        }
        if (pt->n_stages > 1) {
            MPI_Ibcast(&loss, 1, MPI_DOUBLE, pt->n_stages - 1, pt->grid->pipe_comm, &req);
            char where[96], what[160];
            snprintf(what, sizeof what, "the loss from the last stage%s",
                     pt->tp ? rp_transport_peer_where(pt->tp, pt->n_stages - 1, where, sizeof where)
                            : "");
            if ((st = rp_comm_wait(&req, pt->timeout_s, what, err)) != RP_OK) return st;
        }
    }
    res->loss_sum = loss;
    res->grad_norm = grad_norm;
    res->skipped = skipped;
    if (nccl_warmup) rp_transport_pause_nccl(pt->tp, 0);
    pt->steps_done++;
    return RP_OK;
}

rp_status rp_pipe_forward(const rp_model *m, rp_transport *tp, int stage, int n_stages,
                          rp_workspace *ws, const int32_t *tokens, const rp_batch *batch,
                          rp_state *state, rp_logits_mode mode, float *logits, rp_error *err) {
    rp_backend *be = m->be;
    const size_t bytes = (size_t)batch->n_rows * m->cfg.n_embd * sizeof(float);
    rp_status st;
    if (batch->n_rows > ws->max_rows)
        return rp_error_set(err, RP_ERR_ARG, "batch has %d rows but the workspace holds %d",
                            batch->n_rows, ws->max_rows);
    if (n_stages > 1 && (!tp || (!be->is_host_memory && tp->be != be)))
        return rp_error_set(err, RP_ERR_INTERNAL, "stage %d of %d: %s", stage, n_stages,
                            !tp ? "no transport" : "the transport moves host memory but the "
                            "backend's is device memory (rp_transport_use_backend)");
    if (m->has_embed) {
        if ((st = rp_model_embed(m, ws, tokens, batch, err)) != RP_OK) return st;
    } else if ((st = rp_transport_recv(tp, ws->x, bytes, stage - 1, RP_MSG_ACT, 0, err)) !=
                   RP_OK ||
               (st = rp_transport_recv(tp, ws->v_first, bytes, stage - 1, RP_MSG_ACT_VFIRST, 0,
                                       err)) != RP_OK) {
        return st;
    }
    for (int l = m->layer_begin; l < m->layer_end; l++)
        rp_model_block_forward(m, ws, l, state, batch);
    if (m->has_head) {
        rp_model_head(m, ws, batch, mode, logits);
        return RP_OK;
    }
    if (stage + 1 >= n_stages)
        return rp_error_set(err, RP_ERR_INTERNAL, "stage %d of %d has no head", stage, n_stages);
    be->synchronize(be);
    if ((st = be->status(be, err)) != RP_OK)
        return rp_error_prefix(err, "stage %d: forward", stage);
    if ((st = rp_transport_send(tp, ws->x, bytes, stage + 1, RP_MSG_ACT, 0, err)) == RP_OK)
        st = rp_transport_send(tp, ws->v_first, bytes, stage + 1, RP_MSG_ACT_VFIRST, 0, err);
    return st;
}

rp_status rp_pipe_forward_interleaved(const rp_model *models, int n_virtual, rp_transport *tp,
                                      int stage, int n_stages, rp_workspace *ws,
                                      const int32_t *tokens, const rp_batch *batch,
                                      rp_state *states, rp_logits_mode mode, float *logits,
                                      rp_error *err) {
    rp_status st = RP_OK;
    for (int c = 0; c < n_virtual && st == RP_OK; c++) {
        const rp_model *m = &models[c];
        const size_t bytes = (size_t)batch->n_rows * m->cfg.n_embd * sizeof(float);
        const int k = c * n_stages + stage;
        if (m->has_embed) {
            st = rp_model_embed(m, ws, tokens, batch, err);
        } else {
            const int from = (stage + n_stages - 1) % n_stages;
            if ((st = rp_transport_recv(tp, ws->x, bytes, from, RP_MSG_ACT, k, err)) == RP_OK)
                st = rp_transport_recv(tp, ws->v_first, bytes, from, RP_MSG_ACT_VFIRST, k, err);
        }
        if (st != RP_OK) break;
        for (int l = m->layer_begin; l < m->layer_end; l++)
            rp_model_block_forward(m, ws, l, &states[c], batch);
        if (m->has_head) {
            rp_model_head(m, ws, batch, mode, logits);
            break;
        }
        m->be->synchronize(m->be);
        if ((st = m->be->status(m->be, err)) != RP_OK) break;
        const int to = (stage + 1) % n_stages;
        if ((st = rp_transport_send(tp, ws->x, bytes, to, RP_MSG_ACT, k + 1, err)) == RP_OK)
            st = rp_transport_send(tp, ws->v_first, bytes, to, RP_MSG_ACT_VFIRST, k + 1, err);
    }
    return st;
}
