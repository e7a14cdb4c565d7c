/* The generation engine (engine.h): the driver on rank 0 and the command
 * loop of every stage. See engine.h for the model of units and commands. */
#include <math.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pipe/transport.h"
#include "rwkvpipe.pb-c.h"
#include "serve/engine_internal.h"
#include "core/clock.h"

/* Tags on the engine's own communicator. */
enum { TAG_CMD = 1, TAG_X = 2, TAG_VFIRST = 3, TAG_RESULT = 4, TAG_STATE = 5 };

typedef Rwkvpipe__EngineCommand command;

/* A message on its way to the next stage: packed command + payload copies. */
typedef struct {
    uint8_t *packed;
    size_t packed_cap;
    float *x, *v;
    MPI_Request req[3];
    int n_req;
} outgoing;

/* The last stage's sampling state of one slot. */
typedef struct {
    rp_sampler_params sampler;
    float presence, frequency, decay;
    int32_t banned[RP_ENGINE_MAX_BANNED];
    int n_banned;
    uint64_t step;
    float *occ;          /* [V] decayed counts of the generated tokens */
    int penalized;
} slot_sampling;

/* A stored session state (this stage's layers). */
typedef struct {
    char name[RP_ENGINE_SESSION_NAME_MAX];
    float *data;         /* floats_per_slot of this stage's state */
    uint64_t tokens;     /* rank 0: tokens read */
    uint64_t last_used;  /* rank 0: LRU clock */
} session_entry;

/* A unit in the pipeline, until its result comes back from the last stage. */
typedef struct {
    uint64_t id;
    int n;
    int32_t slots[RP_ENGINE_GROUP_MAX];
} unit_record;

typedef struct {
    unit_record *r;
    int n, cap;
} unit_table;

/* A session operation asked for by a client thread (its buffers are the
 * client's: it waits until done). */
enum { CONTROL_EXPORT, CONTROL_IMPORT, CONTROL_DELETE };
typedef struct control {
    int kind;
    const char *name;
    float *out;          /* export: the whole model's state */
    const float *in;     /* import */
    uint64_t tokens;     /* export: out; import: in */
    rp_status status;
    rp_error err;
    int done;
    struct control *next;
} control;

struct rp_engine {
    const rp_model *m;
    rp_backend *be;
    rp_engine_config cfg;
    int stage, n_stages, is_last;
    MPI_Comm comm;            /* dup of the pipe communicator (MPI_COMM_NULL: one process) */
    size_t max_rows;
    rp_workspace ws;
    rp_state state;           /* [n_slots] of this stage's layers */
    float *logits_dev, *logits_host;
    /* Host landing of a unit's x / v_first when the backend's memory is not
     * host memory (GPU): MPI moves host bytes, the workspace is on the device. */
    float *land_x, *land_v;
    void *sampler_scratch;
    slot_sampling *sampling;  /* last stage: [n_slots] */
    outgoing *out;            /* ring of n_out */
    int n_out, out_next;
    session_entry *sessions;
    int n_sessions, cap_sessions;
    uint64_t clock;
    /* driver (rank 0) */
    pthread_mutex_t mu;
    pthread_cond_t wake;
    rp_job *queue_head, *queue_tail;
    int n_queued;
    rp_job **slot_job;
    uint64_t *slot_tokens;
    int units_in_flight;
    unit_table units;
    int launched_any;            /* the last step launched a unit */
    int *stage_layer_begin, *stage_layer_end;
    uint64_t next_unit_id;
    int prefer_prefill;
    int rr_cursor;               /* next slot to consider first */
    control *controls;
    int failed;                  /* stopped (error or shutdown): controls are refused (under mu) */
    pthread_t owner;             /* the main thread (rp_engine_create's caller) */
    volatile sig_atomic_t shutdown_requested;
    int shutdown_started;
    /* metrics (under mu) */
    long requests_total, tokens_generated, tokens_prefilled;
    double *busy_total, *busy_mark, *busy_frac, t_mark, tokens_rate;
    long tokens_mark;
    double t_start;
};


void rp_engine_config_defaults(rp_engine_config *c) {
    memset(c, 0, sizeof *c);
    c->n_slots = 16;
    c->prefill_chunk = 256;
    c->max_queue = 64;
    c->session_budget_bytes = (size_t)256 << 20;
    c->comm_timeout = 300;
}

const rp_config *rp_engine_config_of(const rp_engine *e) { return &e->m->cfg; }

/* ---- sessions (every stage) ---- */

static session_entry *session_find(rp_engine *e, const char *name) {
    for (int i = 0; i < e->n_sessions; i++)
        if (strcmp(e->sessions[i].name, name) == 0) return &e->sessions[i];
    return NULL;
}

/* Only the main thread changes the table, and it does so under e->mu
 * (client threads look names up under it): it reads the table without the
 * lock, and never holds the lock across MPI. */
static session_entry *session_put(rp_engine *e, const char *name) {
    session_entry *s = session_find(e, name);
    if (s) return s;
    float *data = malloc(e->state.floats_per_slot * sizeof(float));
    if (!data) return NULL;
    pthread_mutex_lock(&e->mu);
    if (e->n_sessions == e->cap_sessions) {
        int cap = e->cap_sessions ? 2 * e->cap_sessions : 16;
        session_entry *grown = realloc(e->sessions, sizeof *grown * (size_t)cap);
        if (!grown) {
            pthread_mutex_unlock(&e->mu);
            free(data);
            return NULL;
        }
        e->sessions = grown;
        e->cap_sessions = cap;
    }
    s = &e->sessions[e->n_sessions++];
    memset(s, 0, sizeof *s);
    snprintf(s->name, sizeof s->name, "%s", name);
    s->data = data;
    pthread_mutex_unlock(&e->mu);
    return s;
}

static void session_drop(rp_engine *e, const char *name) {
    pthread_mutex_lock(&e->mu);
    for (int i = 0; i < e->n_sessions; i++)
        if (strcmp(e->sessions[i].name, name) == 0) {
            free(e->sessions[i].data);
            e->sessions[i] = e->sessions[--e->n_sessions];
            break;
        }
    pthread_mutex_unlock(&e->mu);
}

static float *slot_state(rp_engine *e, int slot) {
    return e->state.data + (size_t)slot * e->state.floats_per_slot;
}

/* ---- commands ---- */

static size_t pack_command(outgoing *o, const command *c) {
    size_t n = rwkvpipe__engine_command__get_packed_size(c);
    if (n > o->packed_cap) {
        uint8_t *grown = realloc(o->packed, n);
        if (!grown) return 0;
        o->packed = grown;
        o->packed_cap = n;
    }
    rwkvpipe__engine_command__pack(c, o->packed);
    return n;
}

static rp_status wait_outgoing(rp_engine *e, outgoing *o, rp_error *err) {
    for (int i = 0; i < o->n_req; i++) {
        rp_status st = rp_comm_wait(&o->req[i], e->cfg.comm_timeout,
                                    "a command transfer to the next stage", err);
        if (st != RP_OK) return st;
    }
    o->n_req = 0;
    return RP_OK;
}

/* Sends c (and, for a unit, rows x C of x and v_first) to the next stage. */
static rp_status forward_command(rp_engine *e, const command *c, const float *x,
                                 const float *v, size_t rows, rp_error *err) {
    if (e->is_last) return RP_OK;
    outgoing *o = &e->out[e->out_next];
    e->out_next = (e->out_next + 1) % e->n_out;
    rp_status st = wait_outgoing(e, o, err);
    if (st != RP_OK) return st;
    size_t n = pack_command(o, c);
    if (n == 0 && rwkvpipe__engine_command__get_packed_size(c) != 0)
        return rp_error_set(err, RP_ERR_NOMEM, "engine command buffer");
    const int next = e->stage + 1;
    MPI_Isend(o->packed, (int)n, MPI_BYTE, next, TAG_CMD, e->comm, &o->req[o->n_req++]);
    if (x) {
        const size_t floats = rows * (size_t)e->m->cfg.n_embd;
        e->be->copy_to_host(e->be, o->x, x, floats * sizeof(float));
        e->be->copy_to_host(e->be, o->v, v, floats * sizeof(float));
        MPI_Isend(o->x, (int)floats, MPI_FLOAT, next, TAG_X, e->comm, &o->req[o->n_req++]);
        MPI_Isend(o->v, (int)floats, MPI_FLOAT, next, TAG_VFIRST, e->comm, &o->req[o->n_req++]);
    }
    return RP_OK;
}

/* The next message with `tag` from `source`: its bytes (malloc'ed) in *buf
 * and *count. With block = 0, *buf stays NULL when none has arrived. A
 * blocking wait polls with a sleep that grows to cap_ns (long for an idle
 * stage, short where the wait is on the critical path) and, with
 * timeout_s > 0, gives up after that long with a message naming `what`. */
static rp_status receive_message(rp_engine *e, int source, int tag, int block, double timeout_s,
                                 long cap_ns, const char *what, uint8_t **buf, int *count,
                                 rp_error *err) {
    MPI_Message msg;
    MPI_Status status;
    int flag = 0;
    long sleep_ns = 1000;
    const double start = rp_now_seconds();
    *buf = NULL;
    *count = 0;
    for (;;) {
        MPI_Improbe(source, tag, e->comm, &flag, &msg, &status);
        if (flag || !block) break;
        const double waited = rp_now_seconds() - start;
        if (timeout_s > 0 && waited > timeout_s)
            return rp_error_set(err, RP_ERR_MPI, "stage %d waited %.0f s for %s; it is stuck "
                                "or dead", e->stage, waited, what);
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < cap_ns) sleep_ns *= 2;
    }
    if (!flag) return RP_OK;
    MPI_Get_count(&status, MPI_BYTE, count);
    *buf = malloc(*count > 0 ? (size_t)*count : 1);
    if (!*buf) return rp_error_set(err, RP_ERR_NOMEM, "a %d-byte engine message", *count);
    MPI_Mrecv(*buf, *count, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
    return RP_OK;
}

/* Waits for the next command from the previous stage. Idle servers wait
 * forever (no watchdog), polling at most every 0.5 ms so they cost little. */
static command *receive_command(rp_engine *e, rp_error *err) {
    uint8_t *buf;
    int count;
    if (receive_message(e, e->stage - 1, TAG_CMD, 1, 0, 500000, "a command", &buf, &count,
                        err) != RP_OK)
        return NULL;
    command *c = rwkvpipe__engine_command__unpack(NULL, (size_t)count, buf);
    free(buf);
    if (!c)
        rp_error_set(err, RP_ERR_FORMAT, "stage %d: undecodable engine command from stage %d",
                     e->stage, e->stage - 1);
    return c;
}

/* ---- sampling (last stage) ---- */

static void sampling_open(rp_engine *e, int slot, const Rwkvpipe__EngineSampling *p) {
    slot_sampling *s = &e->sampling[slot];
    s->sampler.temperature = p ? p->temperature : 1.0f;
    s->sampler.top_p = p ? p->top_p : 1.0f;
    s->sampler.top_k = p ? p->top_k : 0;
    s->sampler.seed = p ? p->seed : 0;
    s->presence = p ? p->presence_penalty : 0;
    s->frequency = p ? p->frequency_penalty : 0;
    s->decay = p ? p->penalty_decay : 1;
    s->n_banned = 0;
    for (size_t i = 0; p && i < p->n_banned && i < RP_ENGINE_MAX_BANNED; i++)
        s->banned[s->n_banned++] = p->banned[i];
    s->step = 0;
    s->penalized = s->presence != 0 || s->frequency != 0;
    if (s->penalized) memset(s->occ, 0, sizeof(float) * (size_t)e->m->cfg.vocab_size);
}

static int32_t sample_slot(rp_engine *e, int slot, float *logits) {
    slot_sampling *s = &e->sampling[slot];
    const int V = e->m->cfg.vocab_size;
    if (s->penalized)
        for (int t = 0; t < V; t++)
            if (s->occ[t] > 0) logits[t] -= s->presence + s->occ[t] * s->frequency;
    int tok = rp_sample(logits, V, &s->sampler, s->step, s->banned, s->n_banned,
                        e->sampler_scratch);
    s->step++;
    if (s->penalized && tok >= 0) {
        for (int t = 0; t < V; t++) s->occ[t] *= s->decay;
        s->occ[tok] += 1;
    }
    return tok;
}

/* ---- units ---- */

/* Runs this stage's part of a unit whose x / v_first are in the workspace
 * (or, on stage 0, embeds tokens). The last stage samples into tokens_out
 * (one per sampled entry) and returns how many. */
static rp_status run_unit(rp_engine *e, const command *c, const int32_t *tokens,
                          int32_t *slots_out, int32_t *tokens_out, int *n_sampled,
                          double *busy, rp_error *err) {
    const rp_model *m = e->m;
    rp_backend *be = e->be;
    const int n_seq = (int)c->n_slots;
    int seq_len[RP_ENGINE_GROUP_MAX], slot[RP_ENGINE_GROUP_MAX], row_begin[RP_ENGINE_GROUP_MAX];
    if (n_seq < 1 || n_seq > RP_ENGINE_GROUP_MAX || c->n_lengths != c->n_slots)
        return rp_error_set(err, RP_ERR_INTERNAL, "stage %d: unit with %d slots", e->stage, n_seq);
    for (int i = 0; i < n_seq; i++) {
        seq_len[i] = c->lengths[i];
        slot[i] = c->slots[i];
    }
    rp_batch batch;
    rp_batch_init(&batch, n_seq, seq_len, slot, row_begin);
    const double t0 = rp_now_seconds();
    rp_status st;
    if (m->has_embed && (st = rp_model_embed(m, &e->ws, tokens, &batch, err)) != RP_OK) return st;
    for (int l = m->layer_begin; l < m->layer_end; l++)
        rp_model_block_forward(m, &e->ws, l, &e->state, &batch);
    *n_sampled = 0;
    if (m->has_head) {
        int any = 0;
        for (int i = 0; i < n_seq; i++) any |= c->n_sample > (size_t)i && c->sample[i];
        if (any) {
            const int V = m->cfg.vocab_size;
            rp_model_head(m, &e->ws, &batch, RP_LOGITS_LAST, e->logits_dev);
            be->copy_to_host(be, e->logits_host, e->logits_dev, sizeof(float) * (size_t)n_seq * V);
            for (int i = 0; i < n_seq; i++) {
                if (!(c->n_sample > (size_t)i && c->sample[i])) continue;
                slots_out[*n_sampled] = slot[i];
                tokens_out[(*n_sampled)++] =
                    sample_slot(e, slot[i], e->logits_host + (size_t)i * V);
            }
        }
    }
    be->synchronize(be);
    *busy = rp_now_seconds() - t0;
    return be->status(be, err);
}

/* ---- stage side of every command ---- */

/* Applies a non-unit command to this stage's slots and sessions. */
static rp_status apply_command(rp_engine *e, const command *c, rp_error *err) {
    const size_t fps = e->state.floats_per_slot;
    switch (c->kind) {
    case RWKVPIPE__ENGINE_COMMAND__KIND__OPEN_SLOT: {
        if (c->slot < 0 || c->slot >= e->cfg.n_slots)
            return rp_error_set(err, RP_ERR_INTERNAL, "stage %d: slot %d", e->stage, c->slot);
        float *dst = slot_state(e, c->slot);
        if (c->session && c->session[0]) {
            session_entry *s = session_find(e, c->session);
            if (!s)
                return rp_error_set(err, RP_ERR_INTERNAL, "stage %d has no state for session "
                                    "'%s'", e->stage, c->session);
            e->be->copy_to_device(e->be, dst, s->data, fps * sizeof(float));
        } else {
            e->be->fill_zero(e->be, dst, fps * sizeof(float));
        }
        if (e->is_last) sampling_open(e, c->slot, c->sampling);
        return RP_OK;
    }
    case RWKVPIPE__ENGINE_COMMAND__KIND__FREE_SLOT:
        if (c->session && c->session[0]) {
            session_entry *s = session_put(e, c->session);
            if (!s) return rp_error_set(err, RP_ERR_NOMEM, "session '%s' state", c->session);
            e->be->copy_to_host(e->be, s->data, slot_state(e, c->slot), fps * sizeof(float));
        }
        return RP_OK;
    case RWKVPIPE__ENGINE_COMMAND__KIND__DROP:
        session_drop(e, c->session);
        return RP_OK;
    case RWKVPIPE__ENGINE_COMMAND__KIND__SAVE: {
        if (e->stage == 0) return RP_OK;  /* rank 0 reads its own part directly */
        session_entry *s = session_find(e, c->session);
        /* An absent state is an empty message (rank 0 reports it). */
        MPI_Send(s ? s->data : NULL, s ? (int)fps : 0, MPI_FLOAT, 0, TAG_STATE, e->comm);
        return RP_OK;
    }
    case RWKVPIPE__ENGINE_COMMAND__KIND__LOAD: {
        if (e->stage == 0) return RP_OK;  /* rank 0 stored its part itself */
        session_entry *s = session_put(e, c->session);
        float *dst = s ? s->data : malloc(fps * sizeof(float));
        MPI_Recv(dst, (int)fps, MPI_FLOAT, 0, TAG_STATE, e->comm, MPI_STATUS_IGNORE);
        if (!s) {
            free(dst);
            return rp_error_set(err, RP_ERR_NOMEM, "session '%s' state", c->session);
        }
        return RP_OK;
    }
    default:
        return RP_OK;
    }
}

/* ---- creation ---- */

rp_status rp_engine_create(rp_engine **out, const rp_model *model, const rp_grid *grid,
                           const rp_engine_config *cfg, rp_error *err) {
    *out = NULL;
    if (cfg->n_slots < 1 || cfg->prefill_chunk < 1 || cfg->max_queue < 0)
        return rp_error_set(err, RP_ERR_ARG, "engine: slots %d and prefill chunk %d must be >= 1",
                            cfg->n_slots, cfg->prefill_chunk);
    if (grid && grid->dp != 1)
        return rp_error_set(err, RP_ERR_ARG, "serving runs one pipeline: use -np equal to --pp "
                            "(got %d ranks for %d stages)", grid->world_size, grid->pp);
    rp_engine *e = calloc(1, sizeof *e);
    if (!e) return rp_error_set(err, RP_ERR_NOMEM, "engine");
    e->m = model;
    e->be = model->be;
    e->cfg = *cfg;
    e->stage = grid ? grid->stage : 0;
    e->n_stages = grid ? grid->pp : 1;
    e->is_last = e->stage == e->n_stages - 1;
    e->comm = MPI_COMM_NULL;
    e->t_start = e->t_mark = rp_now_seconds();
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->wake, NULL);
    e->owner = pthread_self();
    const rp_config *c = &model->cfg;
    e->max_rows = (size_t)(cfg->prefill_chunk > RP_ENGINE_GROUP_MAX ? cfg->prefill_chunk
                                                                     : RP_ENGINE_GROUP_MAX);
    rp_status st = rp_workspace_alloc(&e->ws, c, (int)e->max_rows, e->be, err);
    if (st != RP_OK) {
        free(e);
        return st;
    }
    rp_state_geometry(&e->state, c, model->layer_begin, model->layer_end, cfg->n_slots);
    e->state.data = e->be->alloc(e->be, e->state.floats_per_slot * (size_t)cfg->n_slots *
                                            sizeof(float));
    e->n_out = e->n_stages + 2;
    e->out = calloc((size_t)e->n_out, sizeof *e->out);
    e->slot_job = calloc((size_t)cfg->n_slots, sizeof *e->slot_job);
    e->slot_tokens = calloc((size_t)cfg->n_slots, sizeof *e->slot_tokens);
    e->busy_total = calloc((size_t)e->n_stages, sizeof(double));
    e->busy_mark = calloc((size_t)e->n_stages, sizeof(double));
    e->busy_frac = calloc((size_t)e->n_stages, sizeof(double));
    e->stage_layer_begin = calloc((size_t)e->n_stages, sizeof(int));
    e->stage_layer_end = calloc((size_t)e->n_stages, sizeof(int));
    int ok = e->state.data && e->out && e->slot_job && e->slot_tokens && e->busy_total &&
             e->busy_mark && e->busy_frac && e->stage_layer_begin && e->stage_layer_end;
    for (int s = 0; ok && s < e->n_stages; s++) {
        e->stage_layer_begin[s] = grid ? grid->layer_begin[s] : 0;
        e->stage_layer_end[s] = grid ? grid->layer_end[s] : c->n_layer;
    }
    for (int i = 0; ok && i < e->n_out; i++) {
        e->out[i].x = malloc(e->max_rows * c->n_embd * sizeof(float));
        e->out[i].v = malloc(e->max_rows * c->n_embd * sizeof(float));
        ok = e->out[i].x && e->out[i].v;
    }
    if (ok && !e->be->is_host_memory && e->stage > 0) {
        e->land_x = malloc(e->max_rows * c->n_embd * sizeof(float));
        e->land_v = malloc(e->max_rows * c->n_embd * sizeof(float));
        ok = e->land_x && e->land_v;
    }
    if (ok && e->is_last) {
        const size_t V = (size_t)c->vocab_size;
        e->logits_dev = e->be->alloc(e->be, RP_ENGINE_GROUP_MAX * V * sizeof(float));
        e->logits_host = malloc(RP_ENGINE_GROUP_MAX * V * sizeof(float));
        e->sampler_scratch = malloc(rp_sampler_scratch_bytes(c->vocab_size));
        e->sampling = calloc((size_t)cfg->n_slots, sizeof *e->sampling);
        ok = e->logits_dev && e->logits_host && e->sampler_scratch && e->sampling;
        for (int i = 0; ok && i < cfg->n_slots; i++)
            ok = (e->sampling[i].occ = calloc(V, sizeof(float))) != NULL;
    }
    if (!ok) {
        const size_t bytes = e->state.floats_per_slot * sizeof(float);
        rp_engine_free(e);
        return rp_error_set(err, RP_ERR_NOMEM,
                            "cannot allocate the engine: %d slots of %zu bytes of state",
                            cfg->n_slots, bytes);
    }
    if (grid && grid->pp > 1 && MPI_Comm_dup(grid->pipe_comm, &e->comm) != MPI_SUCCESS) {
        rp_engine_free(e);
        return rp_error_set(err, RP_ERR_MPI, "MPI_Comm_dup for the engine failed");
    }
    if (e->comm != MPI_COMM_NULL) MPI_Comm_set_errhandler(e->comm, MPI_ERRORS_RETURN);
    *out = e;
    return RP_OK;
}

void rp_engine_free(rp_engine *e) {
    if (!e) return;
    for (int i = 0; e->out && i < e->n_out; i++) {
        free(e->out[i].packed);
        free(e->out[i].x);
        free(e->out[i].v);
    }
    free(e->out);
    free(e->land_x);
    free(e->land_v);
    if (e->state.data) e->be->free(e->be, e->state.data);
    if (e->logits_dev) e->be->free(e->be, e->logits_dev);
    free(e->logits_host);
    free(e->sampler_scratch);
    for (int i = 0; e->sampling && i < e->cfg.n_slots; i++) free(e->sampling[i].occ);
    free(e->sampling);
    for (int i = 0; i < e->n_sessions; i++) free(e->sessions[i].data);
    free(e->sessions);
    for (int i = 0; e->slot_job && i < e->cfg.n_slots; i++)
        if (e->slot_job[i]) rp_job_release(e->slot_job[i]);
    free(e->slot_job);
    free(e->slot_tokens);
    while (e->queue_head) {
        rp_job *j = e->queue_head;
        e->queue_head = j->next;
        rp_job_release(j);
    }
    free(e->busy_total);
    free(e->busy_mark);
    free(e->busy_frac);
    free(e->stage_layer_begin);
    free(e->stage_layer_end);
    free(e->units.r);
    rp_workspace_free(&e->ws, e->be);
    if (e->comm != MPI_COMM_NULL) MPI_Comm_free(&e->comm);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->wake);
    free(e);
}

/* ---- the stage loop (ranks other than 0) ---- */

static rp_status send_result(rp_engine *e, const Rwkvpipe__EngineResult *r, rp_error *err) {
    size_t n = rwkvpipe__engine_result__get_packed_size(r);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) return rp_error_set(err, RP_ERR_NOMEM, "engine result");
    rwkvpipe__engine_result__pack(r, buf);
    int rc = MPI_Send(buf, (int)n, MPI_BYTE, 0, TAG_RESULT, e->comm);
    free(buf);
    return rc == MPI_SUCCESS ? RP_OK
                             : rp_error_set(err, RP_ERR_MPI, "stage %d: sending a result to rank "
                                            "0 failed", e->stage);
}

static rp_status stage_loop(rp_engine *e, rp_error *err) {
    const int C = e->m->cfg.n_embd;
    for (;;) {
        command *c = receive_command(e, err);
        if (!c) return RP_ERR_FORMAT;
        rp_status st = RP_OK;
        if (c->kind == RWKVPIPE__ENGINE_COMMAND__KIND__UNIT) {
            size_t rows = 0;
            for (size_t i = 0; i < c->n_lengths; i++) rows += (size_t)c->lengths[i];
            if (rows == 0 || rows > e->max_rows) {
                st = rp_error_set(err, RP_ERR_INTERNAL, "stage %d: unit of %zu rows", e->stage,
                                  rows);
            } else {
                MPI_Request rq[2];
                const int host = e->be->is_host_memory;
                float *x = host ? e->ws.x : e->land_x, *v = host ? e->ws.v_first : e->land_v;
                MPI_Irecv(x, (int)(rows * C), MPI_FLOAT, e->stage - 1, TAG_X, e->comm, &rq[0]);
                MPI_Irecv(v, (int)(rows * C), MPI_FLOAT, e->stage - 1, TAG_VFIRST, e->comm,
                          &rq[1]);
                for (int k = 0; k < 2 && st == RP_OK; k++)
                    st = rp_comm_wait(&rq[k], e->cfg.comm_timeout, "a unit's activations from "
                                      "the previous stage", err);
                if (st == RP_OK && !host) {
                    e->be->copy_to_device(e->be, e->ws.x, x, rows * C * sizeof(float));
                    e->be->copy_to_device(e->be, e->ws.v_first, v, rows * C * sizeof(float));
                }
            }
            int32_t slots[RP_ENGINE_GROUP_MAX], tokens[RP_ENGINE_GROUP_MAX];
            int n_sampled = 0;
            double busy = 0;
            if (st == RP_OK)
                st = run_unit(e, c, NULL, slots, tokens, &n_sampled, &busy, err);
            if (st == RP_OK) {
                /* This stage's compute time joins the list the unit carries. */
                double times[RP_GRID_MAX_STAGES < 64 ? RP_GRID_MAX_STAGES : 64];
                size_t nt = c->n_busy_seconds < 63 ? c->n_busy_seconds : 63;
                memcpy(times, c->busy_seconds, nt * sizeof(double));
                times[nt++] = busy;
                if (e->is_last) {
                    Rwkvpipe__EngineResult r = RWKVPIPE__ENGINE_RESULT__INIT;
                    r.unit_id = c->unit_id;
                    r.n_slots = r.n_tokens = (size_t)n_sampled;
                    r.slots = slots;
                    r.tokens = tokens;
                    r.n_busy_seconds = nt;
                    r.busy_seconds = times;
                    st = send_result(e, &r, err);
                } else {
                    double *old = c->busy_seconds;
                    size_t old_n = c->n_busy_seconds;
                    c->busy_seconds = times;
                    c->n_busy_seconds = nt;
                    st = forward_command(e, c, e->ws.x, e->ws.v_first, rows, err);
                    c->busy_seconds = old;
                    c->n_busy_seconds = old_n;
                }
            }
        } else if (c->kind == RWKVPIPE__ENGINE_COMMAND__KIND__SHUTDOWN) {
            st = forward_command(e, c, NULL, NULL, 0, err);
            for (int i = 0; st == RP_OK && i < e->n_out; i++) st = wait_outgoing(e, &e->out[i], err);
            if (st == RP_OK && e->is_last) {
                Rwkvpipe__EngineResult r = RWKVPIPE__ENGINE_RESULT__INIT;
                r.shutdown_ack = 1;
                st = send_result(e, &r, err);
            }
            rwkvpipe__engine_command__free_unpacked(c, NULL);
            return st;
        } else {
            st = apply_command(e, c, err);
            if (st == RP_OK) st = forward_command(e, c, NULL, NULL, 0, err);
        }
        rwkvpipe__engine_command__free_unpacked(c, NULL);
        if (st != RP_OK) return st;
    }
}

/* ---- the driver (rank 0) ---- */

rp_status rp_engine_submit(rp_engine *e, rp_job *job, rp_error *err) {
    rp_status st = rp_gen_params_validate(&job->params, e->m->cfg.vocab_size, err);
    if (st != RP_OK) return st;
    for (int i = 0; i < job->n_prompt; i++)
        if (job->prompt[i] < 0 || job->prompt[i] >= e->m->cfg.vocab_size)
            return rp_error_set(err, RP_ERR_ARG, "prompt token %d at position %d is outside the "
                                "vocabulary [0, %d)", job->prompt[i], i, e->m->cfg.vocab_size);
    pthread_mutex_lock(&e->mu);
    if (e->shutdown_requested) {
        pthread_mutex_unlock(&e->mu);
        return rp_error_set(err, RP_ERR_UNAVAILABLE, "the server is shutting down");
    }
    if (e->n_queued >= e->cfg.max_queue) {
        int q = e->n_queued;
        pthread_mutex_unlock(&e->mu);
        return rp_error_set(err, RP_ERR_BUSY, "%d requests are already waiting for a slot; try "
                            "again later", q);
    }
    rp_job_retain(job);
    job->t_submit = rp_now_seconds();
    job->next = NULL;
    if (e->queue_tail) e->queue_tail->next = job;
    else e->queue_head = job;
    e->queue_tail = job;
    e->n_queued++;
    e->requests_total++;
    pthread_cond_broadcast(&e->wake);
    pthread_mutex_unlock(&e->mu);
    return RP_OK;
}

/* Runs a command on stage 0 and sends it down the pipe. */
static rp_status issue(rp_engine *e, const command *c, rp_error *err) {
    rp_status st = apply_command(e, c, err);
    if (st == RP_OK && e->n_stages > 1) st = forward_command(e, c, NULL, NULL, 0, err);
    return st;
}

static void make_sampling(Rwkvpipe__EngineSampling *s, const rp_gen_params *p) {
    rwkvpipe__engine_sampling__init(s);
    s->temperature = p->sampler.temperature;
    s->top_p = p->sampler.top_p;
    s->top_k = p->sampler.top_k;
    s->seed = p->sampler.seed;
    s->presence_penalty = p->presence_penalty;
    s->frequency_penalty = p->frequency_penalty;
    s->penalty_decay = p->penalty_decay;
    s->n_banned = (size_t)p->n_banned;
    s->banned = (int32_t *)p->banned;
}

/* Frees slot (stashing its state under the job's store_session if asked).
 * Without e->mu: the table functions take it for their changes. */
static rp_status close_slot(rp_engine *e, int slot, int stash, rp_error *err) {
    rp_job *j = e->slot_job[slot];
    command c = RWKVPIPE__ENGINE_COMMAND__INIT;
    c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__FREE_SLOT;
    c.slot = slot;
    c.session = stash ? j->store_session : (char *)"";
    rp_status st = issue(e, &c, err);
    if (st == RP_OK && stash) {
        session_entry *s = session_find(e, j->store_session);
        pthread_mutex_lock(&e->mu);
        if (s) {
            s->tokens = e->slot_tokens[slot];
            s->last_used = ++e->clock;
        }
        pthread_mutex_unlock(&e->mu);
        /* LRU under the byte budget (whole-model bytes per session). */
        const size_t per = e->state.floats_per_layer * (size_t)e->m->cfg.n_layer * sizeof(float);
        while (st == RP_OK && e->n_sessions > 1 &&
               (size_t)e->n_sessions * per > e->cfg.session_budget_bytes) {
            int lru = -1;
            for (int i = 0; i < e->n_sessions; i++)
                if (strcmp(e->sessions[i].name, j->store_session) != 0 &&
                    (lru < 0 || e->sessions[i].last_used < e->sessions[lru].last_used))
                    lru = i;
            if (lru < 0) break;
            command d = RWKVPIPE__ENGINE_COMMAND__INIT;
            d.kind = RWKVPIPE__ENGINE_COMMAND__KIND__DROP;
            char name[RP_ENGINE_SESSION_NAME_MAX];
            snprintf(name, sizeof name, "%s", e->sessions[lru].name);
            d.session = name;
            st = issue(e, &d, err);
        }
    }
    if (j->has_deferred) rp_job_finish(j, j->deferred, NULL);
    e->slot_job[slot] = NULL;
    rp_job_release(j);
    return st;
}

/* The job is over: a job that stores its session reports its end only once
 * the session is stored (close_slot), so a client that continues or saves it
 * right after the reply finds it. */
static void job_end(rp_job *j, rp_finish_reason reason) {
    j->closing = 1;
    if (j->store_session[0]) {
        j->has_deferred = 1;
        j->deferred = reason;
    } else {
        rp_job_finish(j, reason, NULL);
    }
}

static int is_stop_token(const rp_job *j, int32_t t) {
    for (int i = 0; i < j->params.n_stop_tokens; i++)
        if (j->params.stop_tokens[i] == t) return 1;
    return 0;
}

/* A sampled token for slot: emit it, or finish the job. */
static void deliver(rp_engine *e, int slot, int32_t tok) {
    rp_job *j = e->slot_job[slot];
    if (!j || j->closing) return;
    if (tok < 0) {
        rp_job_finish(j, RP_FINISH_ERROR, rp_sample_failure_message(tok, (uint64_t)j->n_generated));
        j->closing = 1;
        return;
    }
    if (is_stop_token(j, tok)) {
        job_end(j, RP_FINISH_STOP);
        return;
    }
    rp_job_push_token(j, tok);
    pthread_mutex_lock(&e->mu);
    e->tokens_generated++;
    pthread_mutex_unlock(&e->mu);
    j->n_generated++;
    j->has_pending = 1;
    j->pending = tok;
    if (j->n_generated >= j->params.max_tokens) job_end(j, RP_FINISH_LENGTH);
}

static void account_busy(rp_engine *e, const double *busy, size_t n) {
    pthread_mutex_lock(&e->mu);
    for (size_t s = 0; s < n && s < (size_t)e->n_stages; s++) e->busy_total[s] += busy[s];
    pthread_mutex_unlock(&e->mu);
}

static void finish_unit(rp_engine *e, const int32_t *unit_slots, int n_unit, const int32_t *slots,
                        const int32_t *tokens, int n_sampled) {
    for (int i = 0; i < n_unit; i++)
        if (e->slot_job[unit_slots[i]]) e->slot_job[unit_slots[i]]->in_flight = 0;
    for (int i = 0; i < n_sampled; i++) deliver(e, slots[i], tokens[i]);
}

static rp_status collect_results(rp_engine *e, int block, rp_error *err);

/* Builds and launches the next unit, if any work is ready. Returns 1 if one
 * was launched. */
static int launch_unit(rp_engine *e, unit_record *rec, rp_status *st, rp_error *err) {
    const int S = e->cfg.n_slots;
    int32_t slots[RP_ENGINE_GROUP_MAX], lengths[RP_ENGINE_GROUP_MAX];
    protobuf_c_boolean sample[RP_ENGINE_GROUP_MAX];
    int32_t tokens_buf[RP_ENGINE_GROUP_MAX];
    const int32_t *tokens = NULL;
    int n = 0;
    /* Candidates: decode-ready slots, and a slot still prefilling. */
    int prefill_slot = -1;
    /* Round robin from where the last unit stopped: with more ready slots
     * than fit in a group, the low-numbered ones must not always win. */
    const int start = e->rr_cursor;
    for (int i = 0; i < S; i++) {
        const int s = (start + i) % S;
        rp_job *j = e->slot_job[s];
        if (!j || j->in_flight) continue;
        if (j->prefilled < j->n_prompt && !j->closing) {
            if (prefill_slot < 0) prefill_slot = s;
        } else if (j->has_pending && (!j->closing || j->store_session[0]) &&
                   !(j->closing && rp_job_cancel_state(j) == 1)) {
            if (n < RP_ENGINE_GROUP_MAX) {
                slots[n] = s;
                lengths[n] = 1;
                sample[n] = !j->closing;
                tokens_buf[n] = j->pending;
                n++;
            }
        }
    }
    /* Alternate between prefill and decode so neither starves the other. */
    int do_prefill = prefill_slot >= 0 && (n == 0 || e->prefer_prefill);
    if (!do_prefill && n == 0) return 0;
    e->prefer_prefill = !do_prefill;
    e->rr_cursor = ((do_prefill ? prefill_slot : slots[n - 1]) + 1) % S;
    command c = RWKVPIPE__ENGINE_COMMAND__INIT;
    c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__UNIT;
    c.unit_id = ++e->next_unit_id;
    if (do_prefill) {
        rp_job *j = e->slot_job[prefill_slot];
        int len = j->n_prompt - j->prefilled;
        if (len > e->cfg.prefill_chunk) len = e->cfg.prefill_chunk;
        slots[0] = prefill_slot;
        lengths[0] = len;
        /* The last chunk's last row gives the first token (unless max 0). */
        sample[0] = j->prefilled + len == j->n_prompt && j->params.max_tokens > 0;
        tokens = j->prompt + j->prefilled;
        j->prefilled += len;
        n = 1;
        pthread_mutex_lock(&e->mu);
        e->tokens_prefilled += len;
        pthread_mutex_unlock(&e->mu);
    } else {
        tokens = tokens_buf;
    }
    for (int i = 0; i < n; i++) {
        rp_job *j = e->slot_job[slots[i]];
        j->in_flight = 1;
        if (!do_prefill) j->has_pending = 0;
        e->slot_tokens[slots[i]] += (uint64_t)lengths[i];
    }
    c.n_slots = c.n_lengths = c.n_sample = (size_t)n;
    c.slots = slots;
    c.lengths = lengths;
    c.sample = sample;
    int32_t s_out[RP_ENGINE_GROUP_MAX], t_out[RP_ENGINE_GROUP_MAX];
    int n_sampled = 0;
    double busy = 0;
    *st = run_unit(e, &c, tokens, s_out, t_out, &n_sampled, &busy, err);
    if (*st != RP_OK) return 0;
    if (e->n_stages == 1) {
        account_busy(e, &busy, 1);
        finish_unit(e, slots, n, s_out, t_out, n_sampled);
        return 1;
    }
    size_t rows = 0;
    for (int i = 0; i < n; i++) rows += (size_t)lengths[i];
    c.n_busy_seconds = 1;
    c.busy_seconds = &busy;
    rec->id = c.unit_id;
    rec->n = n;
    memcpy(rec->slots, slots, sizeof(int32_t) * (size_t)n);
    *st = forward_command(e, &c, e->ws.x, e->ws.v_first, rows, err);
    if (*st != RP_OK) return 0;
    e->units_in_flight++;
    return 1;
}

static rp_status collect_results(rp_engine *e, int block, rp_error *err) {
    unit_table *t = &e->units;
    while (e->units_in_flight > 0) {
        uint8_t *buf;
        int count;
        char what[96];
        snprintf(what, sizeof what, "a result from the last stage %d (--comm-timeout)",
                 e->n_stages - 1);
        rp_status st = receive_message(e, e->n_stages - 1, TAG_RESULT, block,
                                       e->cfg.comm_timeout, 50000, what, &buf, &count, err);
        if (st != RP_OK) return st;
        if (!buf) return RP_OK;
        Rwkvpipe__EngineResult *r = rwkvpipe__engine_result__unpack(NULL, (size_t)count, buf);
        free(buf);
        if (!r) return rp_error_set(err, RP_ERR_FORMAT, "rank 0: undecodable engine result");
        int found = -1;
        for (int i = 0; i < t->n; i++)
            if (t->r[i].id == r->unit_id) found = i;
        if (found < 0) {
            rwkvpipe__engine_result__free_unpacked(r, NULL);
            return rp_error_set(err, RP_ERR_INTERNAL, "rank 0: result for unknown unit %llu",
                                (unsigned long long)r->unit_id);
        }
        account_busy(e, r->busy_seconds, r->n_busy_seconds);
        finish_unit(e, t->r[found].slots, t->r[found].n, r->slots, r->tokens, (int)r->n_slots);
        t->r[found] = t->r[--t->n];
        e->units_in_flight--;
        rwkvpipe__engine_result__free_unpacked(r, NULL);
        block = 0;
    }
    return RP_OK;
}

static rp_status run_controls(rp_engine *e, rp_error *err);
static rp_status do_control(rp_engine *e, control *c, rp_error *err);
static void fail_controls(rp_engine *e, rp_status st, const char *why);

int rp_engine_step(rp_engine *e, rp_error *err, rp_status *status) {
    *status = RP_OK;
    rp_status st = RP_OK;
    const int S = e->cfg.n_slots;
    unit_table *t = &e->units;
    if (e->stage != 0) {
        *status = rp_error_set(err, RP_ERR_INTERNAL, "rp_engine_step runs on rank 0");
        return 0;
    }
    /* Shutdown: cancel everything queued or running. */
    if (e->shutdown_requested && !e->shutdown_started) {
        e->shutdown_started = 1;
        pthread_mutex_lock(&e->mu);
        while (e->queue_head) {
            rp_job *j = e->queue_head;
            e->queue_head = j->next;
            rp_job_finish(j, RP_FINISH_CANCELLED, NULL);
            rp_job_release(j);
        }
        e->queue_tail = NULL;
        e->n_queued = 0;
        pthread_mutex_unlock(&e->mu);
        for (int s = 0; s < S; s++)
            if (e->slot_job[s]) rp_job_cancel(e->slot_job[s]);
    }
    /* Session operations need an empty pipeline. */
    pthread_mutex_lock(&e->mu);
    int controls_waiting = e->controls != NULL;
    pthread_mutex_unlock(&e->mu);
    if (controls_waiting && e->units_in_flight == 0) {
        if ((st = run_controls(e, err)) != RP_OK) goto fail;
    }
    /* Admission: queued jobs take free slots. */
    for (int s = 0; s < S && !controls_waiting; s++) {
        if (e->slot_job[s]) continue;
        pthread_mutex_lock(&e->mu);
        rp_job *j = e->queue_head;
        if (j) {
            e->queue_head = j->next;
            if (!e->queue_head) e->queue_tail = NULL;
            e->n_queued--;
        }
        int known = j && (!j->start_session[0] || session_find(e, j->start_session));
        if (j && known && j->start_session[0]) session_find(e, j->start_session)->last_used = ++e->clock;
        /* A job still closing may be about to store the session this one
         * starts from (a chat's next turn right after the previous one): wait. */
        int pending_store = 0;
        for (int k = 0; j && !known && k < S; k++)
            pending_store |= e->slot_job[k] && e->slot_job[k]->closing &&
                             strcmp(e->slot_job[k]->store_session, j->start_session) == 0;
        if (pending_store) {
            j->next = e->queue_head;
            e->queue_head = j;
            if (!e->queue_tail) e->queue_tail = j;
            e->n_queued++;
            j = NULL;
        }
        pthread_mutex_unlock(&e->mu);
        if (!j) break;
        if (rp_job_cancel_state(j)) {
            rp_job_finish(j, RP_FINISH_CANCELLED, NULL);
            rp_job_release(j);
            s--;
            continue;
        }
        if (!known) {
            char msg[256];
            snprintf(msg, sizeof msg, "unknown session '%s'", j->start_session);
            rp_job_finish(j, RP_FINISH_ERROR, msg);
            rp_job_release(j);
            s--;
            continue;
        }
        Rwkvpipe__EngineSampling sampling;
        make_sampling(&sampling, &j->params);
        command c = RWKVPIPE__ENGINE_COMMAND__INIT;
        c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__OPEN_SLOT;
        c.slot = s;
        c.session = j->start_session;
        c.sampling = &sampling;
        session_entry *from = j->start_session[0] ? session_find(e, j->start_session) : NULL;
        e->slot_tokens[s] = from ? from->tokens : 0;
        st = issue(e, &c, err);
        if (st != RP_OK) goto fail;
        pthread_mutex_lock(&j->mu);
        j->t_slot = rp_now_seconds();
        j->session_continued = from != NULL;
        pthread_mutex_unlock(&j->mu);
        j->slot = s;
        e->slot_job[s] = j;
    }
    /* Cancelled and finished jobs give their slot back. */
    for (int s = 0; s < S; s++) {
        rp_job *j = e->slot_job[s];
        if (!j || j->in_flight) continue;
        int cancel = rp_job_cancel_state(j);
        if (!j->closing && cancel == 1) {
            rp_job_finish(j, RP_FINISH_CANCELLED, NULL);
            j->closing = 1;
        } else if (!j->closing && cancel == 2) {
            job_end(j, RP_FINISH_STOP);
        }
        if (!j->closing && j->prefilled == j->n_prompt && j->params.max_tokens == 0)
            job_end(j, RP_FINISH_LENGTH);
        if (!j->closing) continue;
        /* A job that keeps its session first reads its last emitted token. */
        const int stash = j->store_session[0] && cancel != 1 && j->prefilled == j->n_prompt;
        if (stash && j->has_pending) continue;
        st = close_slot(e, s, stash, err);
        if (st != RP_OK) goto fail;
    }
    /* Keep up to P units in flight. */
    e->launched_any = 0;
    /* At most P launches per step, so admissions and cancels interleave
     * (with one stage every unit completes inside launch_unit). */
    for (int launches = 0; e->units_in_flight < e->n_stages && launches < e->n_stages;
         launches++) {
        if (t->n == t->cap) {
            int cap = t->cap ? 2 * t->cap : 8;
            unit_record *grown = realloc(t->r, sizeof *grown * (size_t)cap);
            if (!grown) {
                st = rp_error_set(err, RP_ERR_NOMEM, "unit table");
                goto fail;
            }
            t->r = grown;
            t->cap = cap;
        }
        int launched = launch_unit(e, &t->r[t->n], &st, err);
        if (st != RP_OK) goto fail;
        if (!launched) break;
        e->launched_any = 1;
        if (e->n_stages > 1) t->n++;
        if ((st = collect_results(e, 0, err)) != RP_OK) goto fail;
    }
    if (e->n_stages > 1 && (st = collect_results(e, 0, err)) != RP_OK) goto fail;
    pthread_mutex_lock(&e->mu);
    int busy = e->n_queued > 0 || e->controls != NULL;
    pthread_mutex_unlock(&e->mu);
    for (int s = 0; s < S; s++) busy |= e->slot_job[s] != NULL;
    return busy || e->units_in_flight > 0;
fail:
    fail_controls(e, RP_ERR_MPI, err ? err->msg : rp_status_name(st));
    *status = st;
    return 0;
}

rp_status rp_engine_run(rp_engine *e, rp_error *err) {
    if (e->stage != 0) return stage_loop(e, err);
    for (;;) {
        rp_status st;
        int active = rp_engine_step(e, err, &st);
        if (st != RP_OK) return st;
        if (e->shutdown_requested && !active) break;
        if (!active) {
            /* Idle: sleep until a client submits (or 20 ms pass). */
            pthread_mutex_lock(&e->mu);
            if (!e->queue_head && !e->controls && !e->shutdown_requested) {
                struct timespec until;
                clock_gettime(CLOCK_REALTIME, &until);
                until.tv_nsec += 20000000L;
                if (until.tv_nsec >= 1000000000L) {
                    until.tv_sec++;
                    until.tv_nsec -= 1000000000L;
                }
                pthread_cond_timedwait(&e->wake, &e->mu, &until);
            }
            pthread_mutex_unlock(&e->mu);
        } else if (e->units_in_flight > 0 &&
                   (e->units_in_flight >= e->n_stages || !e->launched_any)) {
            /* The pipe is full, or nothing else can start before a result
             * comes back: wait for it instead of spinning. */
            rp_status cst = collect_results(e, 1, err);
            if (cst != RP_OK) {
                fail_controls(e, RP_ERR_MPI, err ? err->msg : rp_status_name(cst));
                return cst;
            }
        }
    }
    /* A control queued after the last step is answered, not left waiting. */
    fail_controls(e, RP_ERR_UNAVAILABLE, "the server is shutting down");
    /* Every stage stops; the last one acknowledges, so none is left behind. */
    if (e->n_stages > 1) {
        command c = RWKVPIPE__ENGINE_COMMAND__INIT;
        c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__SHUTDOWN;
        rp_status st = forward_command(e, &c, NULL, NULL, 0, err);
        for (int i = 0; st == RP_OK && i < e->n_out; i++) st = wait_outgoing(e, &e->out[i], err);
        if (st != RP_OK) return st;
        uint8_t *buf;
        int count;
        if ((st = receive_message(e, e->n_stages - 1, TAG_RESULT, 1, 30, 1000000,
                                  "the last stage's shutdown acknowledgement", &buf, &count,
                                  err)) != RP_OK)
            return st;
        free(buf);
    }
    return RP_OK;
}

void rp_engine_shutdown(rp_engine *e) {
    e->shutdown_requested = 1;
    /* No lock here (async-signal-safe); the idle wait wakes within 20 ms. */
}

/* ---- session operations (client threads ask, the main thread does) ---- */

/* The main thread does c; a client thread queues it and waits. Client
 * threads do their file I/O themselves, before or after: the engine moves
 * states between its table, the stages and the caller's buffer only. */
static rp_status ask_control(rp_engine *e, control *c, rp_error *err) {
    if (!c->name || !c->name[0] || strlen(c->name) >= RP_ENGINE_SESSION_NAME_MAX)
        return rp_error_set(err, RP_ERR_ARG, "a session name has 1 to %d characters",
                            RP_ENGINE_SESSION_NAME_MAX - 1);
    if (pthread_equal(pthread_self(), e->owner)) {
        /* Called from the main thread itself (tests, tools): empty the
         * pipeline, then do it here. */
        rp_status st = RP_OK;
        while (st == RP_OK && e->units_in_flight > 0) st = collect_results(e, 1, err);
        if (st == RP_OK) st = do_control(e, c, err);
        if (st != RP_OK) return st;
        if (c->status != RP_OK && err) *err = c->err;
        return c->status;
    }
    pthread_mutex_lock(&e->mu);
    if (e->shutdown_requested || e->failed) {
        pthread_mutex_unlock(&e->mu);
        return rp_error_set(err, RP_ERR_UNAVAILABLE, "the server is shutting down");
    }
    control **tail = &e->controls;
    while (*tail) tail = &(*tail)->next;
    c->next = NULL;
    *tail = c;
    pthread_cond_broadcast(&e->wake);
    while (!c->done) pthread_cond_wait(&e->wake, &e->mu);
    pthread_mutex_unlock(&e->mu);
    if (c->status != RP_OK && err) *err = c->err;
    return c->status;
}

size_t rp_engine_session_floats(const rp_engine *e) {
    return e->state.floats_per_layer * (size_t)e->m->cfg.n_layer;
}

rp_status rp_engine_session_export(rp_engine *e, const char *name, float *out, uint64_t *tokens,
                                   rp_error *err) {
    control c = {.kind = CONTROL_EXPORT, .name = name, .out = out};
    rp_status st = ask_control(e, &c, err);
    if (st == RP_OK && tokens) *tokens = c.tokens;
    return st;
}

rp_status rp_engine_session_import(rp_engine *e, const char *name, const float *state,
                                   uint64_t tokens, rp_error *err) {
    control c = {.kind = CONTROL_IMPORT, .name = name, .in = state, .tokens = tokens};
    return ask_control(e, &c, err);
}

rp_status rp_engine_session_delete(rp_engine *e, const char *name, rp_error *err) {
    control c = {.kind = CONTROL_DELETE, .name = name};
    return ask_control(e, &c, err);
}

int rp_engine_session_exists(rp_engine *e, const char *name) {
    pthread_mutex_lock(&e->mu);
    int found = session_find(e, name) != NULL;
    pthread_mutex_unlock(&e->mu);
    return found;
}

/* One control, on the main thread with the pipeline empty and e->mu not
 * held. c->status / c->err: the answer for the client (an unknown session,
 * a stage without the state). The return value: a failure of the engine
 * itself (a transfer to or from a stage), which ends rp_engine_run. */
static rp_status do_control(rp_engine *e, control *c, rp_error *err) {
    const size_t fpl = e->state.floats_per_layer, fps = e->state.floats_per_slot;
    session_entry *s = session_find(e, c->name);
    command cmd = RWKVPIPE__ENGINE_COMMAND__INIT;
    cmd.session = (char *)c->name;
    c->status = RP_OK;
    if (c->kind != CONTROL_IMPORT && !s) {
        c->status = rp_error_set(&c->err, RP_ERR_ARG, "unknown session '%s'", c->name);
        return RP_OK;
    }
    if (c->kind == CONTROL_DELETE) {
        cmd.kind = RWKVPIPE__ENGINE_COMMAND__KIND__DROP;
        return issue(e, &cmd, err);
    }
    rp_status st = RP_OK;
    if (c->kind == CONTROL_EXPORT) {
        /* Stage 0's part, then each stage's, in layer order. */
        memcpy(c->out, s->data, fps * sizeof(float));
        c->tokens = s->tokens;
        if (e->n_stages == 1) return RP_OK;
        cmd.kind = RWKVPIPE__ENGINE_COMMAND__KIND__SAVE;
        st = forward_command(e, &cmd, NULL, NULL, 0, err);
        for (int stage = 1; st == RP_OK && stage < e->n_stages; stage++) {
            const int begin = e->stage_layer_begin[stage], end = e->stage_layer_end[stage];
            const size_t want = (size_t)(end - begin) * fpl * sizeof(float);
            char what[64];
            snprintf(what, sizeof what, "stage %d's part of a session state", stage);
            uint8_t *buf;
            int count;
            st = receive_message(e, stage, TAG_STATE, 1, e->cfg.comm_timeout, 50000, what, &buf,
                                 &count, err);
            if (st != RP_OK) break;
            if ((size_t)count == want)
                memcpy(c->out + (size_t)begin * fpl, buf, want);
            else if (c->status == RP_OK)
                c->status = rp_error_set(&c->err, RP_ERR_INTERNAL, "stage %d sent %d bytes of "
                                         "session '%s', expected %zu", stage, count, c->name,
                                         want);
            free(buf);
        }
        return st;
    }
    /* Import: stage 0 keeps its layers, each other stage gets its own. */
    if (!s) s = session_put(e, c->name);
    if (!s) {
        c->status = rp_error_set(&c->err, RP_ERR_NOMEM, "session '%s' state", c->name);
        return RP_OK;
    }
    memcpy(s->data, c->in, fps * sizeof(float));
    pthread_mutex_lock(&e->mu);
    s->tokens = c->tokens;
    s->last_used = ++e->clock;
    pthread_mutex_unlock(&e->mu);
    if (e->n_stages == 1) return RP_OK;
    cmd.kind = RWKVPIPE__ENGINE_COMMAND__KIND__LOAD;
    st = forward_command(e, &cmd, NULL, NULL, 0, err);
    for (int stage = 1; st == RP_OK && stage < e->n_stages; stage++) {
        const int begin = e->stage_layer_begin[stage], end = e->stage_layer_end[stage];
        MPI_Request rq;
        if (MPI_Isend(c->in + (size_t)begin * fpl, (int)((size_t)(end - begin) * fpl), MPI_FLOAT,
                      stage, TAG_STATE, e->comm, &rq) != MPI_SUCCESS)
            return rp_error_set(err, RP_ERR_MPI, "rank 0: sending a session state to stage %d "
                                "failed", stage);
        char what[64];
        snprintf(what, sizeof what, "stage %d's part of a session state (sent)", stage);
        st = rp_comm_wait(&rq, e->cfg.comm_timeout, what, err);
    }
    return st;
}

static rp_status run_controls(rp_engine *e, rp_error *err) {
    for (;;) {
        pthread_mutex_lock(&e->mu);
        control *c = e->controls;
        if (c) e->controls = c->next;
        pthread_mutex_unlock(&e->mu);
        if (!c) return RP_OK;
        rp_status st = do_control(e, c, err);
        if (st != RP_OK) {
            /* RP_ERR_MPI: the client learns the engine failed (HTTP 503
             * engine_failed), not that the server is stopping on request */
            c->status = RP_ERR_MPI;
            snprintf(c->err.msg, sizeof c->err.msg, "the engine failed: %.900s",
                     err ? err->msg : rp_status_name(st));
            c->err.code = RP_ERR_MPI;
        }
        /* c belongs to the waiting thread: not touched after done. */
        pthread_mutex_lock(&e->mu);
        c->done = 1;
        pthread_cond_broadcast(&e->wake);
        pthread_mutex_unlock(&e->mu);
        if (st != RP_OK) return st;
    }
}

/* The engine stops (an error, or shutdown): every waiting control is
 * answered, and later ones are refused, so no client thread waits forever. */
/* Answers every queued control: st is RP_ERR_UNAVAILABLE after a requested
 * shutdown, RP_ERR_MPI when the engine failed. */
static void fail_controls(rp_engine *e, rp_status st, const char *why) {
    pthread_mutex_lock(&e->mu);
    e->failed = 1;
    while (e->controls) {
        control *c = e->controls;
        e->controls = c->next;
        c->status = rp_error_set(&c->err, st, "the engine %s: %s",
                                 st == RP_ERR_UNAVAILABLE ? "stopped" : "failed", why);
        c->done = 1;
    }
    pthread_cond_broadcast(&e->wake);
    pthread_mutex_unlock(&e->mu);
}

void rp_engine_get_metrics(rp_engine *e, rp_engine_metrics *m) {
    memset(m, 0, sizeof *m);
    pthread_mutex_lock(&e->mu);
    const double now = rp_now_seconds();
    m->requests_total = e->requests_total;
    m->requests_queued = e->n_queued;
    m->tokens_generated = e->tokens_generated;
    m->tokens_prefilled = e->tokens_prefilled;
    m->slots_total = e->cfg.n_slots;
    m->n_stages = e->n_stages;
    m->sessions_stored = e->n_sessions;
    m->uptime_seconds = now - e->t_start;
    /* Rates over the time since the previous reading, once at least 1 s
     * has passed (a faster scraper sees the last values). */
    const double dt = now - e->t_mark;
    if (dt >= 1.0) {
        for (int s = 0; s < e->n_stages; s++) {
            e->busy_frac[s] = (e->busy_total[s] - e->busy_mark[s]) / dt;
            e->busy_mark[s] = e->busy_total[s];
        }
        e->tokens_rate = (double)(e->tokens_generated - e->tokens_mark) / dt;
        e->tokens_mark = e->tokens_generated;
        e->t_mark = now;
    }
    m->tokens_per_second = e->tokens_rate;
    for (int s = 0; s < e->n_stages && s < 64; s++) m->stage_busy[s] = e->busy_frac[s];
    pthread_mutex_unlock(&e->mu);
    /* Slots are the main thread's: a racy read is fine for a gauge. */
    for (int s = 0; s < e->cfg.n_slots; s++) m->slots_active += e->slot_job[s] != NULL;
    m->requests_active = m->slots_active;
}
