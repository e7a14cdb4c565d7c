/* Sessions of the generation engine (engine.h): the table of stored states
 * every stage keeps for its own layers, and the session operations (export,
 * import, delete) that client threads ask for and the main thread does with
 * the pipeline empty, moving each stage's part through the transport. No
 * lock is held across a transfer: other threads' calls never wait for one. */
#include <stdlib.h>
#include <string.h>

#include "infer/engine_internal.h"

rp_status (*rp_engine_control_test_hook)(rp_engine *e, rp_error *err) = NULL;

/* ---- the table (every stage) ---- */

rp_engine_session *rp_engine_session_find(rp_engine *e, const char *name) {
    for (int i = 0; i < e->n_sessions; i++)
        if (strcmp(e->sessions[i].name, name) == 0) return &e->sessions[i];
    return NULL;
}

/* Only the main thread changes the table, and it does so under e->mu
 * (client threads look names up under it): it reads the table without the
 * lock, and never holds the lock across a transfer. */
rp_engine_session *rp_engine_session_put(rp_engine *e, const char *name) {
    rp_engine_session *s = rp_engine_session_find(e, name);
    if (s) return s;
    float *data = malloc(e->state.floats_per_slot * sizeof(float));
    if (!data) return NULL;
    pthread_mutex_lock(&e->mu);
    if (e->n_sessions == e->cap_sessions) {
        int cap = e->cap_sessions ? 2 * e->cap_sessions : 16;
        rp_engine_session *grown = realloc(e->sessions, sizeof *grown * (size_t)cap);
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

void rp_engine_session_drop(rp_engine *e, const char *name) {
    pthread_mutex_lock(&e->mu);
    for (int i = 0; i < e->n_sessions; i++)
        if (strcmp(e->sessions[i].name, name) == 0) {
            free(e->sessions[i].data);
            e->sessions[i] = e->sessions[--e->n_sessions];
            break;
        }
    pthread_mutex_unlock(&e->mu);
}

/* ---- session operations (client threads ask, the main thread does) ---- */

static rp_status do_control(rp_engine *e, rp_control *c, rp_error *err);

/* The main thread does c; a client thread queues it and waits. Client
 * threads do their file I/O themselves, before or after: the engine moves
 * states between its table, the stages and the caller's buffer only. */
static rp_status ask_control(rp_engine *e, rp_control *c, rp_error *err) {
    if (!c->name || !c->name[0] || strlen(c->name) >= RP_ENGINE_SESSION_NAME_MAX)
        return rp_error_set(err, RP_ERR_ARG, "a session name has 1 to %d characters",
                            RP_ENGINE_SESSION_NAME_MAX - 1);
    if (pthread_equal(pthread_self(), e->owner)) {
        /* Called from the main thread itself (tests, tools): empty the
         * pipeline, then do it here. */
        rp_status st = RP_OK;
        while (st == RP_OK && e->units_in_flight > 0) st = rp_engine_collect(e, 1, err);
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
    rp_control **tail = &e->controls;
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
    rp_control c = {.kind = RP_CONTROL_EXPORT, .name = name, .out = out};
    rp_status st = ask_control(e, &c, err);
    if (st == RP_OK && tokens) *tokens = c.tokens;
    return st;
}

rp_status rp_engine_session_import(rp_engine *e, const char *name, const float *state,
                                   uint64_t tokens, rp_error *err) {
    rp_control c = {.kind = RP_CONTROL_IMPORT, .name = name, .in = state, .tokens = tokens};
    return ask_control(e, &c, err);
}

rp_status rp_engine_session_delete(rp_engine *e, const char *name, rp_error *err) {
    rp_control c = {.kind = RP_CONTROL_DELETE, .name = name};
    return ask_control(e, &c, err);
}

int rp_engine_session_exists(rp_engine *e, const char *name) {
    pthread_mutex_lock(&e->mu);
    int found = rp_engine_session_find(e, name) != NULL;
    pthread_mutex_unlock(&e->mu);
    return found;
}

/* Export on rank 0: stage 0's part, then each stage's, in layer order. */
static rp_status export_state(rp_engine *e, rp_control *c, const rp_engine_session *s,
                              rp_error *err) {
    const size_t fpl = e->state.floats_per_layer, fps = e->state.floats_per_slot;
    memcpy(c->out, s->data, fps * sizeof(float));
    c->tokens = s->tokens;
    if (e->n_stages == 1) return RP_OK;
    rp_engine_command cmd = RWKVPIPE__ENGINE_COMMAND__INIT;
    cmd.session = (char *)c->name;
    cmd.kind = RWKVPIPE__ENGINE_COMMAND__KIND__SAVE;
    rp_status st = rp_engine_forward(e, &cmd, NULL, NULL, 0, err);
    for (int stage = 1; st == RP_OK && stage < e->n_stages; stage++) {
        const int begin = e->stage_layer_begin[stage], end = e->stage_layer_end[stage];
        const size_t want = (size_t)(end - begin) * fpl * sizeof(float);
        void *buf;
        size_t count;
        st = rp_transport_recv_message(&e->tp, stage, RP_MSG_STATE, 0, RP_MSG_WAIT, &buf, &count,
                                       NULL, err);
        if (st != RP_OK) break;
        if (count == want)
            memcpy(c->out + (size_t)begin * fpl, buf, want);
        else if (c->status == RP_OK)
            c->status = rp_error_set(&c->err, RP_ERR_INTERNAL, "stage %d sent %zu bytes of "
                                     "session '%s', expected %zu", stage, count, c->name, want);
        free(buf);
    }
    return st;
}

/* Import on rank 0: stage 0 keeps its layers, each other stage gets its own. */
static rp_status import_state(rp_engine *e, rp_control *c, rp_engine_session *s, rp_error *err) {
    const size_t fpl = e->state.floats_per_layer, fps = e->state.floats_per_slot;
    if (!s) s = rp_engine_session_put(e, c->name);
    if (!s) {
        c->status = rp_error_set(&c->err, RP_ERR_NOMEM, "session '%s' state", c->name);
        return RP_OK;
    }
    memcpy(s->data, c->in, fps * sizeof(float));
    pthread_mutex_lock(&e->mu);
    s->tokens = c->tokens;
    s->last_used = ++e->clock;
    s->version = ++e->session_versions;
    pthread_mutex_unlock(&e->mu);
    if (e->n_stages == 1) return RP_OK;
    rp_engine_command cmd = RWKVPIPE__ENGINE_COMMAND__INIT;
    cmd.session = (char *)c->name;
    cmd.kind = RWKVPIPE__ENGINE_COMMAND__KIND__LOAD;
    rp_status st = rp_engine_forward(e, &cmd, NULL, NULL, 0, err);
    for (int stage = 1; st == RP_OK && stage < e->n_stages; stage++) {
        const int begin = e->stage_layer_begin[stage], end = e->stage_layer_end[stage];
        rp_transfer x;
        st = rp_transport_post_send_message(&e->tp, c->in + (size_t)begin * fpl,
                                            (size_t)(end - begin) * fpl * sizeof(float), stage,
                                            RP_MSG_STATE, 0, &x, err);
        if (st == RP_OK) st = rp_transport_wait(&e->tp, &x, err);
    }
    return st;
}

/* One control, on the main thread with the pipeline empty and e->mu not
 * held. c->status / c->err: the answer for the client (an unknown session,
 * a stage without the state). The return value: a failure of the engine
 * itself (a transfer to or from a stage), which ends rp_engine_run. */
static rp_status do_control(rp_engine *e, rp_control *c, rp_error *err) {
    c->status = RP_OK;
    if (rp_engine_control_test_hook) {
        rp_status st = rp_engine_control_test_hook(e, err);
        if (st != RP_OK) return st;
    }
    rp_engine_session *s = rp_engine_session_find(e, c->name);
    if (c->kind != RP_CONTROL_IMPORT && !s) {
        c->status = rp_error_set(&c->err, RP_ERR_ARG, "unknown session '%s'", c->name);
        return RP_OK;
    }
    switch (c->kind) {
    case RP_CONTROL_DELETE: {
        rp_engine_command cmd = RWKVPIPE__ENGINE_COMMAND__INIT;
        cmd.session = (char *)c->name;
        cmd.kind = RWKVPIPE__ENGINE_COMMAND__KIND__DROP;
        return rp_engine_issue(e, &cmd, err);
    }
    case RP_CONTROL_EXPORT: return export_state(e, c, s, err);
    case RP_CONTROL_IMPORT: return import_state(e, c, s, err);
    }
    return rp_error_set(err, RP_ERR_INTERNAL, "session operation of kind %d", (int)c->kind);
}

rp_status rp_engine_run_controls(rp_engine *e, rp_error *err) {
    for (;;) {
        /* The lock only to take the next one off the queue and to hand the
         * answer back: never across do_control's transfers. */
        pthread_mutex_lock(&e->mu);
        rp_control *c = e->controls;
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
void rp_engine_fail_controls(rp_engine *e, rp_engine_stop_reason why, const char *message) {
    const rp_status st = why == RP_ENGINE_STOP_SHUTDOWN ? RP_ERR_UNAVAILABLE : RP_ERR_MPI;
    pthread_mutex_lock(&e->mu);
    e->failed = 1;
    while (e->controls) {
        rp_control *c = e->controls;
        e->controls = c->next;
        c->status = rp_error_set(&c->err, st, "the engine %s: %s",
                                 why == RP_ENGINE_STOP_SHUTDOWN ? "stopped" : "failed", message);
        c->done = 1;
    }
    pthread_cond_broadcast(&e->wake);
    pthread_mutex_unlock(&e->mu);
}
