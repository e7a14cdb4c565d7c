/* Interleaved 1F1B executor (pipe_interleaved.h). As in pipe_train.c over
 * MPI: the next receive of each kind (activations, gradients) is posted as
 * soon as the previous one is in, so a neighbour's send is matched early
 * and lands while we compute; sends are asynchronous and waited for before
 * anything overwrites the stash slot they read. */
#include "pipe/pipe_interleaved.h"
#include "pipe/pipe_zero.h"

#include <stdlib.h>
#include <string.h>

void rp_interleaved_chunk_layers(const int *layers, int n_stages, int n_virtual, int stage,
                                 int chunk, int *begin, int *end) {
    const int k = chunk * n_stages + stage;
    int b = 0;
    for (int i = 0; i < k && i < n_stages * n_virtual; i++) b += layers[i];
    *begin = b;
    *end = b + layers[k];
}

static size_t largest_buffer(const rp_model *g) {
    size_t most = g->layer_floats;
    if (g->embed_floats > most) most = g->embed_floats;
    if (g->head_floats > most) most = g->head_floats;
    return most;
}

rp_status rp_pipe_interleaved_init(rp_pipe_interleaved *pi, rp_model *models, rp_model *grads,
                                   rp_model *adam_m, rp_model *adam_v, int n_virtual,
                                   const rp_grid *grid, rp_transport *tp, int n_micro,
                                   int micro_batch_size, int ctx_len, rp_error *err) {
    memset(pi, 0, sizeof *pi);
    rp_backend *be = models[0].be;
    pi->grid = grid;
    pi->tp = tp;
    pi->stage = grid ? grid->stage : 0;
    pi->n_stages = grid ? grid->pp : 1;
    pi->dp = grid ? grid->dp : 1;
    pi->n_virtual = n_virtual;
    pi->n_micro = n_micro;
    pi->micro_batch_size = micro_batch_size;
    pi->ctx_len = ctx_len;
    pi->models = models;
    pi->grads = grads;
    pi->adam_m = adam_m;
    pi->adam_v = adam_v;
    pi->timeout_s = tp ? tp->timeout_s : 0;
    pi->halt_on_nan = 1;
    if (!be->is_host_memory)
        return rp_error_set(err, RP_ERR_ARG, "--pp-schedule interleaved runs on host memory "
                            "only (the CPU backend); the %s backend's is device memory: use "
                            "1f1b or zb-h1 there", be->name);
    if (pi->n_stages < 2 || !tp)
        return rp_error_set(err, RP_ERR_ARG, "--pp-schedule interleaved needs --pp 2 or more "
                            "(it interleaves chunks across stages)");
    rp_status st = rp_schedule_build_interleaved(&pi->sched, pi->n_stages, n_micro, n_virtual,
                                                 err);
    if (st != RP_OK) return st;
    const int R = micro_batch_size * ctx_len, C = models[0].cfg.n_embd;
    /* Each chunk has slots of its own layer count: the schedule's slot ids
     * index every chunk's array (v times the slots of a shared free list;
     * docs/parallelism.md). */
    pi->n_slots = pi->sched.n_buffers[pi->stage];
    const int n_ws = n_virtual * pi->n_slots;
    pi->stash = calloc((size_t)n_ws, sizeof *pi->stash);
    pi->pending = calloc((size_t)n_ws, sizeof *pi->pending);
    pi->state = calloc((size_t)n_virtual, sizeof *pi->state);
    pi->dstate = calloc((size_t)n_virtual, sizeof *pi->dstate);
    pi->seq_len = malloc(sizeof(int) * (size_t)micro_batch_size);
    pi->slot = malloc(sizeof(int) * (size_t)micro_batch_size);
    pi->row_begin = malloc(sizeof(int) * (size_t)micro_batch_size);
    pi->landing[0] = be->alloc(be, sizeof(float) * 2 * (size_t)R * C);
    pi->landing[1] = be->alloc(be, sizeof(float) * 2 * (size_t)R * C);
    if (!pi->stash || !pi->pending || !pi->state || !pi->dstate || !pi->seq_len || !pi->slot ||
        !pi->row_begin || !pi->landing[0] || !pi->landing[1]) {
        rp_pipe_interleaved_free(pi);
        return rp_error_set(err, RP_ERR_NOMEM, "interleaved pipeline buffers for %d chunks",
                            n_virtual);
    }
    for (int c = 0; c < n_virtual; c++) {
        rp_model *m = &models[c];
        rp_backward_workspace *first = &pi->stash[c * pi->n_slots];
        for (int i = 0; i < pi->n_slots; i++)
            if ((st = i == 0 ? rp_backward_workspace_alloc(first, m, R, micro_batch_size, err)
                             : rp_backward_workspace_alloc_stash(first + i, m, R,
                                                                 micro_batch_size, first,
                                                                 err)) != RP_OK) {
                rp_pipe_interleaved_free(pi);
                return rp_error_prefix(err, "chunk %d: activation stash %d of %d", c, i + 1,
                                       pi->n_slots);
            }
        rp_state_geometry(&pi->state[c], &m->cfg, m->layer_begin, m->layer_end,
                          micro_batch_size);
        rp_state_geometry(&pi->dstate[c], &m->cfg, m->layer_begin, m->layer_end,
                          micro_batch_size);
        const size_t bytes = pi->state[c].floats_per_slot * (size_t)micro_batch_size *
                             sizeof(float);
        pi->state[c].data = be->alloc(be, bytes ? bytes : sizeof(float));
        pi->dstate[c].data = be->alloc(be, bytes ? bytes : sizeof(float));
        if (!pi->state[c].data || !pi->dstate[c].data) {
            rp_pipe_interleaved_free(pi);
            return rp_error_set(err, RP_ERR_NOMEM, "chunk %d: the recurrent state", c);
        }
    }
    /* More than 2 replicas: summed in replica order, as pipe_train.c does. */
    if (pi->dp > 2) {
        size_t most = 0;
        for (int c = 0; c < n_virtual; c++)
            if (largest_buffer(&grads[c]) > most) most = largest_buffer(&grads[c]);
        if (!(pi->scratch = malloc(sizeof(float) * (most + 1)))) {
            rp_pipe_interleaved_free(pi);
            return rp_error_set(err, RP_ERR_NOMEM, "the reduce-scatter buffer");
        }
    }
    for (int i = 0; i < micro_batch_size; i++) {
        pi->seq_len[i] = ctx_len;
        pi->slot[i] = i;
    }
    rp_batch_init(&pi->batch, micro_batch_size, pi->seq_len, pi->slot, pi->row_begin);
    return RP_OK;
}

void rp_pipe_interleaved_free(rp_pipe_interleaved *pi) {
    rp_backend *be = pi->models ? pi->models[0].be : NULL;
    for (int c = 0; pi->stash && c < pi->n_virtual; c++)
        for (int i = pi->n_slots - 1; i >= 0; i--)  /* slot 0 last: the others borrow it */
            rp_backward_workspace_free(&pi->stash[c * pi->n_slots + i], be);
    for (int c = 0; be && c < pi->n_virtual; c++) {
        if (pi->state && pi->state[c].data) be->free(be, pi->state[c].data);
        if (pi->dstate && pi->dstate[c].data) be->free(be, pi->dstate[c].data);
    }
    for (int i = 0; i < 2; i++)
        if (be && pi->landing[i]) be->free(be, pi->landing[i]);
    free(pi->stash);
    free(pi->pending);
    free(pi->state);
    free(pi->dstate);
    free(pi->seq_len);
    free(pi->slot);
    free(pi->row_begin);
    free(pi->scratch);
    rp_schedule_free(&pi->sched);
    memset(pi, 0, sizeof *pi);
}

enum { PENDING_ACT = 1, PENDING_GRAD = 2, PENDING_ALL = 3 };

static rp_status wait_pending(rp_pipe_interleaved *pi, int ws, int which, rp_error *err) {
    for (int k = 0; k < 4; k++) {
        if (!(which & (k < 2 ? PENDING_ACT : PENDING_GRAD))) continue;
        rp_status st = rp_transport_wait(pi->tp, &pi->pending[ws][k], err);
        if (st != RP_OK) return st;
    }
    return RP_OK;
}

/* The message id of micro-batch mb arriving at model chunk k: chunk k's
 * activations and its output gradient differ from every other chunk's. */
static int msg_id(const rp_pipe_interleaved *pi, int k, int mb) { return k * pi->n_micro + mb; }

/* Posts the receive of the first RECV of kind op after position i into its
 * landing buffer (none left: nothing). */
static rp_status post_next_recv(rp_pipe_interleaved *pi, int i, rp_pipe_opcode op,
                                rp_error *err) {
    const int is_act = op == RP_OP_RECV_ACT, P = pi->n_stages, s = pi->stage;
    const rp_pipe_instr *list = pi->sched.instr[s];
    const int n = pi->sched.n_instr[s];
    int j = i + 1;
    while (j < n && list[j].op != op) j++;
    pi->in_at[!is_act] = -1;
    if (j >= n) return RP_OK;
    const size_t rc = (size_t)pi->micro_batch_size * pi->ctx_len * pi->models[0].cfg.n_embd;
    const int peer = (s + (is_act ? P - 1 : 1)) % P, id = msg_id(pi, list[j].chunk * P + s,
                                                                 list[j].micro_batch);
    float *buf = pi->landing[!is_act];
    rp_transfer *x = pi->in[!is_act];
    rp_status st = rp_transport_post_recv(pi->tp, buf, rc * sizeof(float), peer,
                                          is_act ? RP_MSG_ACT : RP_MSG_GRAD, id, &x[0], err);
    if (st == RP_OK)
        st = rp_transport_post_recv(pi->tp, buf + rc, rc * sizeof(float), peer,
                                    is_act ? RP_MSG_ACT_VFIRST : RP_MSG_GRAD_VFIRST, id, &x[1],
                                    err);
    if (st == RP_OK) pi->in_at[!is_act] = j;
    return st;
}

static rp_status reduce_buffer(rp_pipe_interleaved *pi, float *p, size_t n, rp_error *err) {
    if (!p || !n) return RP_OK;
    if (pi->scratch) {
        rp_status st = rp_zero_reduce_scatter(pi->grid->data_comm, p, n, pi->scratch,
                                              pi->timeout_s, err);
        return st != RP_OK ? st : rp_zero_allgather(pi->grid->data_comm, p, n, pi->timeout_s,
                                                    err);
    }
    return rp_pipe_allreduce_floats(pi->grid->data_comm, pi->stage, p, n, pi->timeout_s, err);
}

static rp_status reduce_grads(rp_pipe_interleaved *pi, rp_error *err) {
    rp_status st = RP_OK;
    for (int c = 0; c < pi->n_virtual && st == RP_OK; c++) {
        rp_model *g = &pi->grads[c];
        if ((st = reduce_buffer(pi, g->embed_flat, g->embed_floats, err)) == RP_OK)
            st = reduce_buffer(pi, g->head_flat, g->head_floats, err);
        for (int i = 0; i < g->layer_end - g->layer_begin && st == RP_OK; i++)
            st = reduce_buffer(pi, g->layer_flat[i], g->layer_floats, err);
    }
    return st;
}

rp_status rp_pipe_interleaved_step(rp_pipe_interleaved *pi, const int32_t *inputs,
                                   const int32_t *targets, float loss_scale, float l2wrap_factor,
                                   const rp_optim_config *optim, long step,
                                   rp_pipe_step_result *res, rp_error *err) {
    const int P = pi->n_stages, s = pi->stage;
    const int R = pi->micro_batch_size * pi->ctx_len;
    const size_t rc = (size_t)R * pi->models[0].cfg.n_embd, rc_bytes = rc * sizeof(float);
    const rp_pipe_instr *list = pi->sched.instr[s];
    const int n = pi->sched.n_instr[s];
    double local_loss = 0, grad_norm = 0;
    int skipped = 0;
    rp_status st = RP_OK;
    for (int c = 0; c < pi->n_virtual; c++) rp_model_zero(&pi->grads[c]);
    if ((st = post_next_recv(pi, -1, RP_OP_RECV_ACT, err)) != RP_OK ||
        (st = post_next_recv(pi, -1, RP_OP_RECV_GRAD, err)) != RP_OK)
        return st;
    for (int i = 0; i < n && st == RP_OK; i++) {
        const rp_pipe_instr *in = &list[i];
        const int c = in->chunk, mb = in->micro_batch, k = c * P + s;
        rp_model *m = in->buffer >= 0 ? &pi->models[c] : NULL;
        rp_backend *be = pi->models[0].be;
        const int ws = c * pi->n_slots + in->buffer;
        rp_backward_workspace *tw = in->buffer >= 0 ? &pi->stash[ws] : NULL;
        rp_state *state = &pi->state[c], *dstate = &pi->dstate[c];
        const size_t state_bytes =
            state->floats_per_slot * (size_t)pi->micro_batch_size * sizeof(float);
        switch (in->op) {
        case RP_OP_RECV_ACT:
        case RP_OP_RECV_GRAD: {
            const int is_act = in->op == RP_OP_RECV_ACT;
            rp_transfer *x = pi->in[!is_act];
            if (pi->in_at[!is_act] != i) {
                st = rp_error_set(err, RP_ERR_INTERNAL, "stage %d: the receive of micro-batch "
                                  "%d chunk %d was not posted", s, mb, c);
                break;
            }
            if ((st = rp_transport_wait(pi->tp, &x[0], err)) != RP_OK ||
                (st = rp_transport_wait(pi->tp, &x[1], err)) != RP_OK ||
                (st = wait_pending(pi, ws, is_act ? PENDING_ACT : PENDING_GRAD, err)) != RP_OK)
                break;
            const float *buf = pi->landing[!is_act];
            be->copy(be, is_act ? tw->x : tw->dx, buf, rc_bytes);
            be->copy(be, is_act ? tw->v_first : tw->dv_first, buf + rc, rc_bytes);
            /* The next one lands while we compute. */
            st = post_next_recv(pi, i, in->op, err);
            break;
        }
        case RP_OP_SEND_ACT:
        case RP_OP_SEND_GRAD: {
            const int is_act = in->op == RP_OP_SEND_ACT;
            const int peer = (s + (is_act ? 1 : P - 1)) % P;
            rp_transfer *x = &pi->pending[ws][is_act ? 0 : 2];
            const int to = is_act ? k + 1 : k - 1;
            if ((st = rp_transport_post_send(pi->tp, is_act ? tw->x : tw->dx, rc_bytes, peer,
                                             is_act ? RP_MSG_ACT : RP_MSG_GRAD,
                                             msg_id(pi, to, mb), &x[0], err)) == RP_OK)
                st = rp_transport_post_send(pi->tp, is_act ? tw->v_first : tw->dv_first,
                                            rc_bytes, peer,
                                            is_act ? RP_MSG_ACT_VFIRST : RP_MSG_GRAD_VFIRST,
                                            msg_id(pi, to, mb), &x[1], err);
            break;
        }
        case RP_OP_FWD:
            if ((st = wait_pending(pi, ws, m->has_head ? PENDING_ALL : PENDING_ACT, err)) !=
                RP_OK)
                break;
            be->fill_zero(be, state->data, state_bytes);
            if (m->has_embed &&
                (st = rp_backward_embed_forward(m, tw, inputs + (size_t)mb * R, &pi->batch,
                                                err)) != RP_OK)
                break;
            for (int l = m->layer_begin; l < m->layer_end; l++)
                rp_backward_block_forward(m, tw, l, state, &pi->batch);
            /* The head's backward right away, as pipe_train.c: the head's
             * gradient sums in forward (= micro-batch) order. */
            if (m->has_head)
                local_loss += rp_backward_head(m, &pi->grads[c], tw, targets + (size_t)mb * R,
                                               &pi->batch, loss_scale, l2wrap_factor);
            if ((st = be->status(be, err)) != RP_OK)
                rp_error_prefix(err, "stage %d chunk %d: forward of micro-batch %d", s, c, mb);
            break;
        case RP_OP_BWD:
            if ((st = wait_pending(pi, ws, PENDING_ALL, err)) != RP_OK) break;
            be->fill_zero(be, dstate->data, state_bytes);
            for (int l = m->layer_end - 1; l >= m->layer_begin; l--)
                rp_backward_block_backward(m, &pi->grads[c], tw, l, dstate, &pi->batch);
            if (m->has_embed)
                rp_backward_embed_backward(m, &pi->grads[c], tw, inputs + (size_t)mb * R,
                                           &pi->batch);
            if ((st = be->status(be, err)) != RP_OK)
                rp_error_prefix(err, "stage %d chunk %d: backward of micro-batch %d", s, c, mb);
            break;
        case RP_OP_REDUCE_GRADS:
            for (int b = 0; b < pi->n_virtual * pi->n_slots && st == RP_OK; b++)
                st = wait_pending(pi, b, PENDING_ALL, err);
            if (st == RP_OK && pi->dp > 1) st = reduce_grads(pi, err);
            break;
        case RP_OP_OPT_STEP: {
            if (!optim) break;
            double sumsq = 0;
            for (int ch = 0; ch < pi->n_virtual; ch++) {
                if (pi->dp == 1)
                    sumsq += rp_grad_sum_squares(&pi->grads[ch]);
                else
                    for (int d = 0; d < pi->dp; d++)
                        sumsq += rp_zero_partial_sum_squares(&pi->grads[ch], pi->dp, d);
            }
            if ((st = rp_pipe_global_grad_norm(pi->grid->pipe_comm, pi->n_stages, sumsq,
                                               pi->timeout_s, pi->tp, pi->halt_on_nan, step,
                                               &grad_norm, &skipped, err)) != RP_OK ||
                skipped)
                break;
            for (int ch = 0; ch < pi->n_virtual; ch++)
                rp_optim_step(&pi->models[ch], &pi->grads[ch], &pi->adam_m[ch], &pi->adam_v[ch],
                              optim, step, rp_clip_scale(grad_norm, optim->grad_clip));
            be->synchronize(be);
            st = be->status(be, err);
            break;
        }
        default:
            st = rp_error_set(err, RP_ERR_INTERNAL, "stage %d: opcode %s in an interleaved "
                              "list", s, rp_pipe_opcode_name(in->op));
        }
    }
    if (st != RP_OK) return st;
    /* The loss lives on the last stage: sum over replicas, then to every stage. */
    double loss = s == P - 1 ? local_loss : 0;
    MPI_Request req;
    if (pi->dp > 1) {
        MPI_Iallreduce(MPI_IN_PLACE, &loss, 1, MPI_DOUBLE, MPI_SUM, pi->grid->data_comm, &req);
        if ((st = rp_comm_wait(&req, pi->timeout_s, "the loss all-reduce", err)) != RP_OK)
            return st;
    }
    MPI_Ibcast(&loss, 1, MPI_DOUBLE, P - 1, pi->grid->pipe_comm, &req);
    if ((st = rp_comm_wait(&req, pi->timeout_s, "the loss from the last stage", err)) != RP_OK)
        return st;
    res->loss_sum = loss;
    res->grad_norm = grad_norm;
    res->skipped = skipped;
    return RP_OK;
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
