/* The HTTP service (see http.h for the threading and docs/serving.md for the
 * API): routing, connection limits and deadlines, the endpoints, the session
 * table, and the submit of one engine job per generation request; sizes are
 * checked before a body is read. Bodies are parsed and validated by
 * http_request.c; a submitted generation is pumped and answered (JSON or
 * SSE) by http_stream.c. */
#include "serve/http.h"
#include "serve/http_internal.h"
#include "serve/chat.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "serve/http_request.h"
#include "infer/session_file.h"
#include "text/stream.h"
#include "core/clock.h"

#define KEEPER_PERIOD_MS 200    /* how often request deadlines are checked */
#define STOP_FINISH_SECONDS 5.0 /* rp_http_stop: what generations get to send their last bytes */
#define MAX_SESSION_ENTRIES 4096

/* HTTP status codes the metrics count. */
static const int counted_codes[] = {200, 400, 401, 404, 405, 409, 413, 429, 500, 503, 507};
#define N_COUNTED_CODES ((int)(sizeof counted_codes / sizeof counted_codes[0]))
_Static_assert(N_COUNTED_CODES == HTTP_N_COUNTED_CODES, "http_internal.h counts the codes");

/* One open connection, for the request deadline (request_timeout_s). */
struct conn_entry {
    struct conn_entry *prev, *next;
    int fd;
    double request_start;  /* the connection's start, or the end of its previous reply */
    int receiving;         /* its request has not fully arrived */
    int cut;               /* shut down for missing the deadline */
};

/* Log lines quote what clients send (paths, names, messages naming them):
 * every byte outside printable ASCII becomes \xHH and a backslash becomes
 * \\, so a client can neither forge a line (CR LF) nor reach the terminal
 * (ESC). */
static void log_escaped(rp_http_server *s, const char *line) {
    char out[4 * 1024 + 1];
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)line; *p && o + 5 < sizeof out; p++) {
        if (*p == '\\') {
            out[o++] = '\\';
            out[o++] = '\\';
        } else if (*p >= 0x20 && *p <= 0x7e) {
            out[o++] = (char)*p;
        } else {
            o += (size_t)snprintf(out + o, sizeof out - o, "\\x%02x", *p);
        }
    }
    out[o] = '\0';
    s->cfg.log(s->cfg.log_user, out);
}

void http_log_line(rp_http_server *s, const char *fmt, ...) {
    if (!s->cfg.log) return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    log_escaped(s, line);
}

static void mhd_logger(void *cls, const char *fmt, va_list ap) {
    rp_http_server *s = cls;
    if (!s->cfg.log) return;
    char line[1024];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
    log_escaped(s, line);
}

void rp_http_config_defaults(rp_http_config *c) {
    memset(c, 0, sizeof *c);
    c->host = "127.0.0.1";
    c->port = 8000;
    c->model_id = "rwkv";
    c->session_dir = "sessions";
    c->max_session_files = 1000;
    c->max_body_bytes = (size_t)1 << 20;
    c->max_prompt_tokens = 16384;
    c->max_tokens_limit = 4096;
    c->default_max_tokens = 256;
    c->max_connections = 256;
    c->max_connections_per_client = -1;
    c->connection_timeout_s = 30;
    c->request_timeout_s = 60;
    c->http_threads = 4;
    c->drain_seconds = 5;
}

/* ---- responses ------------------------------------------------------------ */

void http_count_response(rp_http_server *s, int status) {
    int i = 0;
    while (i < N_COUNTED_CODES && counted_codes[i] != status) i++;
    atomic_fetch_add(&s->responses[i], 1);
}

/* Seconds a client refused with 429 should wait (docs/serving.md): one
 * second per full round of slots that the waiting jobs need before a new
 * one would start, at least 1, at most 60. Rough on purpose: job lengths
 * are unknown, and the client retries anyway. */
static int http_busy_retry_after(rp_http_server *s) {
    rp_engine_metrics m;
    rp_engine_get_metrics(s->engine, &m);
    int slots = m.slots_total > 0 ? m.slots_total : 1;
    int secs = 1 + rp_engine_waiting(s->engine) / slots;
    return secs > 60 ? 60 : secs;
}

static enum MHD_Result send_text(rp_http_server *s, struct MHD_Connection *conn, int status,
                                 const char *content_type, char *body, size_t len) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    if (status == 401) MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    if (status == 429) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", http_busy_retry_after(s));
        MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, ra);
    }
    if (atomic_load(&s->stopping)) {
        /* draining: the client should go elsewhere (or come back later) */
        if (status == 503) MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, s->retry_after);
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
    }
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    http_count_response(s, status);
    return ret;
}

/* Takes ownership of json. */
enum MHD_Result http_send_json(rp_http_server *s, struct MHD_Connection *conn, int status,
                               json_t *json) {
    char *body = json ? json_dumps(json, JSON_COMPACT) : NULL;
    json_decref(json);
    if (!body) {
        body = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\","
                      "\"code\":\"internal\"}}");
        status = 500;
        if (!body) return MHD_NO;
    }
    size_t len = strlen(body);
    /* a trailing newline is friendlier to curl users */
    char *grown = realloc(body, len + 2);
    if (grown) {
        body = grown;
        body[len++] = '\n';
        body[len] = '\0';
    }
    return send_text(s, conn, status, "application/json", body, len);
}

enum MHD_Result http_send_error(rp_http_server *s, struct MHD_Connection *conn, int status,
                                const char *code, const char *fmt, ...) {
    char message[RP_ERROR_MSG_LEN + 256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    return http_send_json(s, conn, status, http_error_json(status, code, message));
}

/* ---- sessions table --------------------------------------------------------- */

/* Call with s->lock held. Creates the entry when create is set. */
static http_session *session_find(rp_http_server *s, const char *name, int create) {
    for (int i = 0; i < s->n_sessions; i++)
        if (strcmp(s->sessions[i].name, name) == 0) return &s->sessions[i];
    if (!create) return NULL;
    if (s->n_sessions == MAX_SESSION_ENTRIES) {
        /* forget the least recently used idle entry (the engine may keep the
         * state: it then continues at a turn boundary, the default) */
        int victim = -1;
        for (int i = 0; i < s->n_sessions; i++)
            if (!s->sessions[i].busy &&
                (victim < 0 || s->sessions[i].last_use < s->sessions[victim].last_use))
                victim = i;
        if (victim < 0) return NULL;
        s->sessions[victim] = s->sessions[--s->n_sessions];
    }
    http_session *e = &s->sessions[s->n_sessions++];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    return e;
}

/* Is a request using the session now (its stored state may change)? */
static int session_busy(rp_http_server *s, const char *name) {
    pthread_mutex_lock(&s->lock);
    http_session *se = session_find(s, name, 0);
    int busy = se && se->busy;
    pthread_mutex_unlock(&s->lock);
    return busy;
}

static void session_forget(rp_http_server *s, const char *name) {
    pthread_mutex_lock(&s->lock);
    http_session *e = session_find(s, name, 0);
    if (e) *e = s->sessions[--s->n_sessions];
    pthread_mutex_unlock(&s->lock);
}

void http_session_end_turn(rp_http_server *s, const char *name, const char tail[2], int tail_len,
                           int stored) {
    pthread_mutex_lock(&s->lock);
    http_session *e = session_find(s, name, 1);
    if (e) {
        e->busy = 0;
        e->last_use = ++s->use_counter;
        if (stored) {
            memcpy(e->tail, tail, sizeof e->tail);
            e->tail_len = tail_len;
            e->stored = 1;
        }
    }
    pthread_mutex_unlock(&s->lock);
}

/* ---- requests ------------------------------------------------------------- */

enum route {
    ROUTE_NONE,
    ROUTE_COMPLETIONS,
    ROUTE_CHAT,
    ROUTE_MODELS,
    ROUTE_MODEL,         /* GET /v1/models/{id} */
    ROUTE_TOKENIZER_INFO,
    ROUTE_TOKENIZE,
    ROUTE_DETOKENIZE,
    ROUTE_HEALTH,
    ROUTE_METRICS,
    ROUTE_SESSION_SAVE,
    ROUTE_SESSION_LOAD,
    ROUTE_SESSION,       /* DELETE / GET /v1/sessions/{name} */
};

typedef struct {
    rp_http_server *srv;
    enum route route;
    char session[RP_ENGINE_SESSION_NAME_MAX];
    char *body;
    size_t body_len, body_cap;
    int body_too_large;
    int answered;
    gen_ctx *gen;               /* its generation in flight (http_stream.c) */
    double t_start;
    int started;                /* on_request has seen the request */
    int bad_target;             /* the raw target encodes a control character */
    int session_request;        /* counted in active_session_requests */
    const char *method;
    char path[128];             /* the target as sent (percent-encoded), for the log */
} request_ctx;

static rp_request_limits request_limits(const rp_http_server *s) {
    return (rp_request_limits){.model_id = s->model_id,
                               .vocab_size = s->vocab_size,
                               .default_max_tokens = s->cfg.default_max_tokens,
                               .max_tokens_limit = s->cfg.max_tokens_limit,
                               .max_prompt_tokens = s->cfg.max_prompt_tokens,
                               .tok = s->tok};
}

static uint64_t random_seed(rp_http_server *s) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t z = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^
                 (atomic_fetch_add(&s->next_id, 1) * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) >> 1;  /* JSON-friendly: below 2^63 */
}

/* The seed of choice j of a prompt (n > 1): the request's seed + j (mod
 * 2^63), so choice j repeats with the same seed; without a seed, a fresh one. */
static uint64_t choice_seed(rp_http_server *s, const rp_gen_request *gr, int j) {
    if (!gr->seed_given) return j == 0 ? gr->params.sampler.seed : random_seed(s);
    return (gr->params.sampler.seed + (uint64_t)j) & 0x7FFFFFFFFFFFFFFFull;
}

/* A request of several choices (a batch of prompts and / or n > 1): one job
 * per choice, all in the engine at once as separate requests would be;
 * choice i = prompt i / n, the prompt's choice i % n. Takes pl. */
static int start_multi(rp_http_server *s, struct MHD_Connection *conn, int chat,
                       rp_gen_request *gr, rp_request_prompt_list *pl, gen_ctx **out,
                       rp_request_error *e) {
    const int n_kids = pl->n * gr->n;
    if (n_kids > RP_REQUEST_MAX_CHOICES) {
        rp_request_prompts_free(pl);
        return rp_request_fail(e, 400, "invalid_value", "%d prompts x n %d = %d choices: at most %d",
                               pl->n, gr->n, n_kids, RP_REQUEST_MAX_CHOICES);
    }
    if (gr->session) {
        rp_request_prompts_free(pl);
        return rp_request_fail(e, 400, "invalid_value",
                               "'session' takes one prompt and n = 1 (a session holds one "
                               "state); use 'initial_state' to start several choices from it");
    }
    if (gr->initial_state && !rp_engine_session_exists(s->engine, gr->initial_state)) {
        rp_request_prompts_free(pl);
        return rp_request_fail(e, 404, "session_not_found", "initial state '%s' does not exist",
                               gr->initial_state);
    }
    gen_ctx *g = http_gen_new(s, conn);
    if (!g || !(g->kids = calloc((size_t)n_kids, sizeof *g->kids))) {
        http_gen_free(g);
        rp_request_prompts_free(pl);
        return rp_request_fail(e, 500, "internal", "out of memory");
    }
    g->head.chat = chat;
    g->stream = gr->stream;
    g->n_per_prompt = gr->n;
    g->head.created = time(NULL);
    snprintf(g->head.id, sizeof g->head.id, "%s-%lx%06lx", chat ? "chatcmpl" : "cmpl",
             (unsigned long)g->head.created, (unsigned long)atomic_fetch_add(&s->next_id, 1));
    rp_error err;
    int r = 0;
    for (int i = 0; i < n_kids && r == 0; i++) {
        const int p = i / gr->n, j = i % gr->n;
        gen_ctx *k = http_gen_kid(g);
        if (!k) {
            r = rp_request_fail(e, 500, "internal", "out of memory");
            break;
        }
        g->kids[g->n_kids++] = k;
        k->stream = gr->stream;
        k->skip_space = chat;
        k->return_ids = gr->return_ids;
        k->n_prompt = (int)pl->n_ids[p];
        k->want_lp = gr->params.logprobs;
        k->top_lp = gr->params.top_logprobs;
        http_logprobs_init(&k->lp_stream, chat);
        rp_gen_params params = gr->params;
        params.sampler.seed = choice_seed(s, gr, j);
        /* the prompt is scored once, by its first choice */
        params.score_prompt = gr->params.score_prompt && j == 0;
        if (gr->echo) {
            k->echo = 1;
            k->lp_source = j == 0 ? NULL : g->kids[i - j];
            k->echo_len = pl->text_lens[p];
            k->echo_text = malloc(k->echo_len + 1);
            k->prompt_ids = malloc((pl->n_ids[p] ? pl->n_ids[p] : 1) * sizeof *k->prompt_ids);
            if (!k->echo_text || !k->prompt_ids) {
                r = rp_request_fail(e, 500, "internal", "out of memory");
                break;
            }
            memcpy(k->echo_text, pl->texts[p], k->echo_len + 1);
            memcpy(k->prompt_ids, pl->ids[p], pl->n_ids[p] * sizeof *pl->ids[p]);
        }
        if (rp_text_stream_init(&k->text, gr->stops, gr->n_stops, &err) != RP_OK) {
            r = rp_request_fail(e, 400, "invalid_value", "%s", err.msg);
            break;
        }
        k->job = rp_job_create(pl->ids[p], (int)pl->n_ids[p], &params, gr->initial_state, NULL,
                               &err);
        if (!k->job) {
            r = rp_request_fail(e, 400, "invalid_value", "prompt %d: %s", p, err.msg);
            break;
        }
        rp_job_set_notify(k->job, http_gen_wake, g); /* a choice's news wakes the request */
        /* n > 1: the prompt is read once, by the prompt's first choice */
        if (j > 0) rp_job_share_prompt(k->job, g->kids[i - j]->job);
    }
    if (r == 0) {
        /* All choices in one call: queued together, they read a shared
         * prompt once (rp_engine_submit_all). */
        rp_job *jobs[RP_REQUEST_MAX_CHOICES];
        for (int i = 0; i < g->n_kids; i++) {
            jobs[i] = g->kids[i]->job;
            g->kids[i]->t_submit = g->t_submit = rp_now_seconds();
        }
        rp_status st = atomic_load(&s->stopping)
                           ? rp_error_set(&err, RP_ERR_UNAVAILABLE, "the server is shutting down")
                           : rp_engine_submit_all(s->engine, jobs, g->n_kids, &err);
        if (st != RP_OK) {
            if (atomic_load(&s->stopping) || st == RP_ERR_UNAVAILABLE)
                r = rp_request_fail(e, 503, "shutting_down", "the server is shutting down");
            else if (st == RP_ERR_BUSY)
                r = rp_request_fail(e, 429, "too_many_requests", "%d choices: %s", n_kids,
                                    err.msg);
            else
                r = rp_request_fail(e, 503, "engine_unavailable", "%s", err.msg);
        } else {
            for (int i = 0; i < g->n_kids; i++) g->kids[i]->submitted = 1;
        }
    }
    rp_request_prompts_free(pl);
    if (r != 0) {
        http_gen_free(g); /* cancels the choices already submitted */
        return -1;
    }
    g->submitted = 1;
    *out = g;
    return 0;
}

/* Validates and submits a generation; on success *out is a running job. */
static int start_generation(rp_http_server *s, request_ctx *rc, struct MHD_Connection *conn,
                            json_t *o, gen_ctx **out, rp_request_error *e) {
    const int chat = rc->route == ROUTE_CHAT;
    const rp_request_limits limits = request_limits(s);
    rp_gen_request gr;
    if (rp_request_parse_generation(o, chat, &limits, &gr, e)) return -1;
    if (!gr.seed_given) gr.params.sampler.seed = random_seed(s);
    /* completions: one prompt or a batch; several choices in all take
     * start_multi, one the path below (which also serves sessions) */
    rp_request_prompt_list pl;
    memset(&pl, 0, sizeof pl);
    if (!chat && rp_request_prompts(o, &limits, &pl, e)) return -1;
    if (chat && gr.n > 1) {
        pl.texts = calloc(1, sizeof *pl.texts);
        pl.text_lens = calloc(1, sizeof *pl.text_lens);
        pl.ids = calloc(1, sizeof *pl.ids);
        pl.n_ids = calloc(1, sizeof *pl.n_ids);
        if (!pl.texts || !pl.text_lens || !pl.ids || !pl.n_ids) {
            rp_request_prompts_free(&pl);
            return rp_request_fail(e, 500, "internal", "out of memory");
        }
        if (rp_request_prompt(o, 1, "", &limits, &pl.texts[0], &pl.text_lens[0], &pl.ids[0],
                              &pl.n_ids[0], e)) {
            rp_request_prompts_free(&pl);
            return -1;
        }
        pl.n = 1;
    }
    if (pl.n > 1 || gr.n > 1) return start_multi(s, conn, chat, &gr, &pl, out, e);

    /* sessions: continue `session` when it exists, else start from
     * `initial_state` (which must exist) or from zero; store into `session` */
    const char *start = NULL;
    char lead[3] = "";
    int locked = 0;
    if (gr.session) {
        pthread_mutex_lock(&s->lock);
        http_session *se = session_find(s, gr.session, 1);
        if (!se) {
            pthread_mutex_unlock(&s->lock);
            rp_request_prompts_free(&pl);
            return rp_request_fail(e, 503, "too_many_sessions", "too many sessions in use at once");
        }
        if (se->busy) {
            pthread_mutex_unlock(&s->lock);
            rp_request_prompts_free(&pl);
            return rp_request_fail(e, 409, "session_busy",
                                   "session '%s' is in use by another request", gr.session);
        }
        se->busy = 1;
        locked = 1;
        /* A turn that just finished may still be storing its state: the
         * engine makes a job that starts from it wait for that. */
        if (se->stored || rp_engine_session_exists(s->engine, gr.session)) {
            start = gr.session;
            snprintf(lead, sizeof lead, "%s", rp_chat_session_lead(se->tail, (size_t)se->tail_len));
        } else {
            se->tail_len = 0;
        }
        pthread_mutex_unlock(&s->lock);
    }
    gen_ctx *g = NULL;
    char *prompt = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0, prompt_len = 0;
    rp_error err;
    if (!start && gr.initial_state) {
        if (!rp_engine_session_exists(s->engine, gr.initial_state)) {
            rp_request_fail(e, 404, "session_not_found",
                            "initial state '%s' does not exist (load it with "
                            "POST /v1/sessions/%s/load)", gr.initial_state, gr.initial_state);
            goto fail_out;
        }
        start = gr.initial_state;
    }
    /* refuses a prompt over --max-prompt-tokens (the only length check:
     * see rp_request_prompt) */
    if (!chat) {
        /* the one prompt rp_request_prompts read */
        prompt = pl.texts[0];
        prompt_len = pl.text_lens[0];
        ids = pl.ids[0];
        n_ids = pl.n_ids[0];
        pl.texts[0] = NULL;
        pl.ids[0] = NULL;
        rp_request_prompts_free(&pl);
    } else if (rp_request_prompt(o, chat, start == gr.session ? lead : "", &limits, &prompt,
                                 &prompt_len, &ids, &n_ids, e)) {
        goto fail_out;
    }
    g = http_gen_new(s, conn);
    if (!g) {
        rp_request_fail(e, 500, "internal", "out of memory");
        goto fail_out;
    }
    g->head.chat = chat;
    g->stream = gr.stream;
    g->skip_space = chat;
    g->return_ids = gr.return_ids;
    g->n_prompt = (int)n_ids;
    g->want_lp = gr.params.logprobs;
    g->top_lp = gr.params.top_logprobs;
    http_logprobs_init(&g->lp_stream, chat);
    if (gr.echo) {
        /* the reply starts with the prompt: its text, and its tokens when scored */
        g->echo = 1;
        g->echo_text = malloc(prompt_len + 1);
        g->echo_len = prompt_len;
        g->prompt_ids = malloc(n_ids * sizeof *g->prompt_ids);
        if (g->echo_text) memcpy(g->echo_text, prompt, prompt_len + 1);
        if (!g->prompt_ids || !g->echo_text) {
            rp_request_fail(e, 500, "internal", "out of memory");
            goto fail_out;
        }
        memcpy(g->prompt_ids, ids, n_ids * sizeof *ids);
    }
    g->head.created = time(NULL);
    snprintf(g->head.id, sizeof g->head.id, "%s-%lx%06lx", chat ? "chatcmpl" : "cmpl",
             (unsigned long)g->head.created, (unsigned long)atomic_fetch_add(&s->next_id, 1));
    if (rp_text_stream_init(&g->text, gr.stops, gr.n_stops, &err) != RP_OK) {
        rp_request_fail(e, 400, "invalid_value", "%s", err.msg);
        goto fail_out;
    }
    if (gr.session) {
        snprintf(g->session, sizeof g->session, "%s", gr.session);
        locked = 0;  /* http_gen_free unlocks */
        /* what the state will have read: the prompt, then each token */
        g->tail_len = 0;
        if (start == gr.session) {
            pthread_mutex_lock(&s->lock);
            http_session *se = session_find(s, gr.session, 0);
            if (se) memcpy(g->tail, se->tail, 2), g->tail_len = se->tail_len;
            pthread_mutex_unlock(&s->lock);
        }
        http_gen_tail_push(g, (const uint8_t *)prompt, prompt_len);
    }
    if (start) snprintf(g->start, sizeof g->start, "%s", start);
    g->job = rp_job_create(ids, (int)n_ids, &gr.params, start, gr.session, &err);
    if (!g->job) {
        rp_request_fail(e, 400, "invalid_value", "%s", err.msg);
        goto fail_out;
    }
    rp_job_set_notify(g->job, http_gen_wake, g);  /* before the engine can produce */
    g->t_submit = rp_now_seconds();
    if (atomic_load(&s->stopping)) {
        rp_request_fail(e, 503, "shutting_down", "the server is shutting down");
        goto fail_out;
    }
    rp_status st = rp_engine_submit(s->engine, g->job, &err);
    if (st != RP_OK) {
        if (atomic_load(&s->stopping) || st == RP_ERR_UNAVAILABLE)
            rp_request_fail(e, 503, "shutting_down", "the server is shutting down");
        else if (st == RP_ERR_BUSY)
            rp_request_fail(e, 429, "too_many_requests", "%s", err.msg);
        else if (start && !rp_engine_session_exists(s->engine, start))
            rp_request_fail(e, 404, "session_not_found", "%s", err.msg);
        else
            rp_request_fail(e, 503, "engine_unavailable", "%s", err.msg);
        goto fail_out;
    }
    g->submitted = 1;
    free(prompt);
    free(ids);
    *out = g;
    return 0;
fail_out:
    rp_request_prompts_free(&pl);
    if (g) {
        http_gen_free(g);  /* not submitted: the session keeps what it had */
    } else if (locked) {
        pthread_mutex_lock(&s->lock);
        http_session *se = session_find(s, gr.session, 0);
        if (se) se->busy = 0;
        pthread_mutex_unlock(&s->lock);
    }
    free(prompt);
    free(ids);
    return -1;
}

static enum MHD_Result handle_generation(rp_http_server *s, request_ctx *rc,
                                         struct MHD_Connection *conn, json_t *o) {
    rp_request_error e;
    gen_ctx *g = NULL;
    if (start_generation(s, rc, conn, o, &g, &e))
        return http_send_error(s, conn, e.status, e.code, "%s", e.message);
    rc->gen = g;  /* freed (and cancelled if unfinished) when the request completes */
    return g->stream ? http_gen_stream(&rc->gen, conn) : http_gen_reply(&rc->gen, conn);
}

/* ---- other endpoints -------------------------------------------------------- */

static json_t *model_object(rp_http_server *s) {
    const rp_config *c = rp_engine_config_of(s->engine);
    return json_pack("{s:s,s:s,s:I,s:s,s:i,s:i,s:i,s:i,s:s}", "id", s->model_id, "object",
                     "model", "created", (json_int_t)s->created, "owned_by", "rwkvpipe",
                     "n_layer", c->n_layer, "n_embd", c->n_embd, "n_head", c->n_head,
                     "vocab_size", c->vocab_size, "tokenizer", rp_tokenizer_kind(s->tok));
}

static enum MHD_Result handle_models(rp_http_server *s, struct MHD_Connection *conn) {
    return http_send_json(s, conn, 200,
                          json_pack("{s:s,s:[o]}", "object", "list", "data", model_object(s)));
}

/* GET /v1/models/{id}: the model object, as OpenAI's retrieve. */
static enum MHD_Result handle_model(rp_http_server *s, struct MHD_Connection *conn,
                                    const char *id) {
    if (strcmp(id, s->model_id) != 0)
        return http_send_error(s, conn, 404, "model_not_found",
                               "model '%.200s' is not served here (this server has '%s')", id,
                               s->model_id);
    return http_send_json(s, conn, 200, model_object(s));
}

/* ---- tokenizer endpoints: the shapes of vLLM's, which lm-evaluation-harness's
 * RemoteTokenizer (tokenizer_backend=remote) reads ---- */

static enum MHD_Result handle_tokenizer_info(rp_http_server *s, struct MHD_Connection *conn) {
    size_t eot_len;
    const char *eot = rp_request_eot_text(s->tok, &eot_len);
    json_t *info = json_pack("{s:s,s:s%,s:i,s:n,s:n,s:i,s:i,s:I}", "tokenizer_class",
                             rp_tokenizer_kind(s->tok), "eos_token", eot, eot_len, "eos_token_id",
                             rp_tokenizer_eot_id(s->tok), "bos_token", "pad_token",
                             "vocab_size", s->vocab_size, "model_max_length",
                             s->cfg.max_prompt_tokens, "max_model_len",
                             (json_int_t)s->cfg.max_prompt_tokens);
    return http_send_json(s, conn, 200, info);
}

static enum MHD_Result handle_tokenizer(rp_http_server *s, struct MHD_Connection *conn,
                                        int tokenize, json_t *o) {
    const rp_request_limits limits = request_limits(s);
    rp_request_error e;
    if (tokenize) {
        int32_t *ids;
        size_t n;
        if (rp_request_tokenize(o, &limits, &ids, &n, &e))
            return http_send_error(s, conn, e.status, e.code, "%s", e.message);
        json_t *arr = json_array();
        for (size_t i = 0; arr && i < n; i++) json_array_append_new(arr, json_integer(ids[i]));
        free(ids);
        return http_send_json(s, conn, 200,
                              json_pack("{s:I,s:i,s:o}", "count", (json_int_t)n, "max_model_len",
                                        s->cfg.max_prompt_tokens, "tokens", arr));
    }
    char *text;
    size_t len;
    if (rp_request_detokenize(o, &limits, &text, &len, &e))
        return http_send_error(s, conn, e.status, e.code, "%s", e.message);
    json_t *reply = json_pack("{s:s%}", "prompt", text, len);
    free(text);
    /* bytes that are not UTF-8 (half a character): jansson refuses them */
    if (!reply)
        return http_send_error(s, conn, 400, "invalid_value",
                               "these tokens do not spell UTF-8 text (part of a character)");
    return http_send_json(s, conn, 200, reply);
}

static enum MHD_Result handle_health(rp_http_server *s, struct MHD_Connection *conn) {
    rp_engine_metrics m;
    memset(&m, 0, sizeof m);
    rp_engine_get_metrics(s->engine, &m);
    int stopping = atomic_load(&s->stopping);
    return http_send_json(s, conn, stopping ? 503 : 200,
                          json_pack("{s:s,s:i,s:i,s:I,s:I,s:i,s:f}", "status",
                                    stopping ? "stopping" : "ok", "slots_total", m.slots_total,
                                    "slots_active", m.slots_active, "requests_active",
                                    (json_int_t)m.requests_active, "requests_queued",
                                    (json_int_t)m.requests_queued, "stages", m.n_stages,
                                    "uptime_seconds", m.uptime_seconds));
}

typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} text_buf;

static void tb_printf(text_buf *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(text_buf *t, const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof line) n = sizeof line - 1;
    if (rp_text_append(&t->buf, &t->len, &t->cap, line, (size_t)n)) t->failed = 1;
}

static void metric(text_buf *t, const char *name, const char *type, const char *help) {
    tb_printf(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static enum MHD_Result handle_metrics(rp_http_server *s, struct MHD_Connection *conn) {
    rp_engine_metrics m;
    memset(&m, 0, sizeof m);
    rp_engine_get_metrics(s->engine, &m);
    text_buf t = {0};
    metric(&t, "rwkvpipe_requests_total", "counter", "Generation jobs submitted to the engine.");
    tb_printf(&t, "rwkvpipe_requests_total %ld\n", m.requests_total);
    metric(&t, "rwkvpipe_requests_active", "gauge", "Jobs generating in a slot now.");
    tb_printf(&t, "rwkvpipe_requests_active %ld\n", m.requests_active);
    metric(&t, "rwkvpipe_requests_queued", "gauge", "Jobs waiting for a slot.");
    tb_printf(&t, "rwkvpipe_requests_queued %ld\n", m.requests_queued);
    metric(&t, "rwkvpipe_tokens_generated_total", "counter", "Tokens sampled.");
    tb_printf(&t, "rwkvpipe_tokens_generated_total %ld\n", m.tokens_generated);
    metric(&t, "rwkvpipe_tokens_prefilled_total", "counter", "Prompt tokens read.");
    tb_printf(&t, "rwkvpipe_tokens_prefilled_total %ld\n", m.tokens_prefilled);
    metric(&t, "rwkvpipe_tokens_per_second", "gauge", "Tokens generated per second, last ~10 s.");
    tb_printf(&t, "rwkvpipe_tokens_per_second %.6g\n", m.tokens_per_second);
    metric(&t, "rwkvpipe_slots_total", "gauge", "Generation slots (concurrent jobs).");
    tb_printf(&t, "rwkvpipe_slots_total %d\n", m.slots_total);
    metric(&t, "rwkvpipe_slots_active", "gauge", "Slots holding a job.");
    tb_printf(&t, "rwkvpipe_slots_active %d\n", m.slots_active);
    metric(&t, "rwkvpipe_stages", "gauge", "Pipeline stages.");
    tb_printf(&t, "rwkvpipe_stages %d\n", m.n_stages);
    metric(&t, "rwkvpipe_stage_busy_ratio", "gauge",
           "Fraction of the last ~10 s each stage spent computing.");
    int n_stages = m.n_stages;
    int max_stages = (int)(sizeof m.stage_busy / sizeof m.stage_busy[0]);
    if (n_stages > max_stages) n_stages = max_stages;
    for (int i = 0; i < n_stages; i++)
        tb_printf(&t, "rwkvpipe_stage_busy_ratio{stage=\"%d\"} %.6g\n", i, m.stage_busy[i]);
    metric(&t, "rwkvpipe_sessions_stored", "gauge", "Session states kept in memory.");
    tb_printf(&t, "rwkvpipe_sessions_stored %ld\n", m.sessions_stored);
    metric(&t, "rwkvpipe_prefix_cache_hits_total", "counter",
           "Requests that resumed from a cached prompt prefix's state.");
    tb_printf(&t, "rwkvpipe_prefix_cache_hits_total %ld\n", m.prefix_cache_hits);
    metric(&t, "rwkvpipe_prefix_cache_tokens_saved_total", "counter",
           "Prompt tokens not read thanks to the prefix cache.");
    tb_printf(&t, "rwkvpipe_prefix_cache_tokens_saved_total %ld\n", m.prefix_cache_tokens_saved);
    metric(&t, "rwkvpipe_prefix_cache_bytes", "gauge",
           "Memory of the prefix cache's states (whole model) and keys.");
    tb_printf(&t, "rwkvpipe_prefix_cache_bytes %zu\n", m.prefix_cache_bytes);
    metric(&t, "rwkvpipe_uptime_seconds", "gauge", "Seconds since the engine started.");
    tb_printf(&t, "rwkvpipe_uptime_seconds %.3f\n", m.uptime_seconds);
    metric(&t, "rwkvpipe_http_connections", "gauge", "Open HTTP connections.");
    tb_printf(&t, "rwkvpipe_http_connections %ld\n", atomic_load(&s->active_connections));
    metric(&t, "rwkvpipe_http_request_timeouts_total", "counter",
           "Connections closed because their request did not arrive within --request-timeout.");
    tb_printf(&t, "rwkvpipe_http_request_timeouts_total %ld\n", atomic_load(&s->connections_cut));
    metric(&t, "rwkvpipe_http_responses_total", "counter", "HTTP responses by status code.");
    for (int i = 0; i < N_COUNTED_CODES; i++)
        tb_printf(&t, "rwkvpipe_http_responses_total{code=\"%d\"} %ld\n", counted_codes[i],
                  atomic_load(&s->responses[i]));
    tb_printf(&t, "rwkvpipe_http_responses_total{code=\"other\"} %ld\n",
              atomic_load(&s->responses[N_COUNTED_CODES]));
    if (t.failed || !t.buf) {
        free(t.buf);
        return http_send_error(s, conn, 500, "internal", "out of memory");
    }
    return send_text(s, conn, 200, "text/plain; version=0.0.4; charset=utf-8", t.buf, t.len);
}

/* An engine-side failure of a session operation. */
static enum MHD_Result session_failure(rp_http_server *s, struct MHD_Connection *conn,
                                       const char *name, rp_status st, const rp_error *err) {
    if (st == RP_ERR_ARG && !rp_engine_session_exists(s->engine, name))
        return http_send_error(s, conn, 404, "session_not_found", "%s", err->msg);
    if (st == RP_ERR_UNAVAILABLE)
        return http_send_error(s, conn, 503, "shutting_down", "%s", err->msg);
    if (st == RP_ERR_MPI) return http_send_error(s, conn, 503, "engine_failed", "%s", err->msg);
    if (st == RP_ERR_ARG) return http_send_error(s, conn, 400, "invalid_value", "%s", err->msg);
    return http_send_error(s, conn, 500, "internal", "%s", err->msg);
}

static enum MHD_Result handle_session(rp_http_server *s, request_ctx *rc,
                                      struct MHD_Connection *conn, const char *method, json_t *o) {
    const char *name = rc->session;
    rp_request_error e;
    rp_error err;
    if (rc->route == ROUTE_SESSION) {
        int exists = rp_engine_session_exists(s->engine, name);
        if (strcmp(method, "GET") == 0) {
            if (!exists)
                return http_send_error(s, conn, 404, "session_not_found",
                                       "session '%s' does not exist", name);
            return http_send_json(s, conn, 200,
                                  json_pack("{s:s,s:b}", "session", name, "exists", 1));
        }
        if (!exists)
            return http_send_error(s, conn, 404, "session_not_found",
                                   "session '%s' does not exist", name);
        if (session_busy(s, name))
            return http_send_error(s, conn, 409, "session_busy",
                                   "session '%s' is in use by a request", name);
        rp_status st = rp_engine_session_delete(s->engine, name, &err);
        if (st != RP_OK) return session_failure(s, conn, name, st, &err);
        session_forget(s, name);
        return http_send_json(s, conn, 200, json_pack("{s:s,s:b}", "session", name, "deleted", 1));
    }
    const int saving = rc->route == ROUTE_SESSION_SAVE;
    if (saving && !rp_engine_session_exists(s->engine, name))
        return http_send_error(s, conn, 404, "session_not_found", "session '%s' does not exist",
                               name);
    const char *file = NULL;
    if (rp_request_session_file(o, &file, &e))
        return http_send_error(s, conn, e.status, e.code, "%s", e.message);
    if (!saving) {
        if (session_busy(s, name))
            return http_send_error(s, conn, 409, "session_busy",
                                   "session '%s' is in use by a request", name);
    }
    /* The file is read and written here, on this connection's thread: the
     * engine only hands the state over (a slow or strange file never holds
     * it up). */
    const rp_config *cfg = rp_engine_config_of(s->engine);
    float *state = malloc(rp_engine_session_floats(s->engine) * sizeof(float));
    if (!state)
        return http_send_error(s, conn, 500, "internal", "out of memory for a session state");
    uint64_t tokens = 0;
    rp_status st;
    if (saving) {
        st = rp_engine_session_export(s->engine, name, state, &tokens, &err);
        if (st != RP_OK) {
            free(state);
            return session_failure(s, conn, name, st, &err);
        }
        st = rp_session_file_save(&s->session_dir, file, cfg, tokens, state, &err);
        free(state);
        if (st != RP_OK && s->cfg.log_requests)
            http_log_line(s, "%s %s: %s", rc->method, rc->path, err.msg);
        if (st == RP_ERR_ARG) return http_send_error(s, conn, 409, "file_exists", "%s", err.msg);
        if (st == RP_ERR_BUSY)
            return http_send_error(s, conn, 507, "too_many_session_files", "%s", err.msg);
        if (st != RP_OK) return http_send_error(s, conn, 500, "io_error", "%s", err.msg);
        return http_send_json(s, conn, 200,
                              json_pack("{s:s,s:s,s:b}", "session", name, "path", file, "saved",
                                        1));
    }
    rp_error detail;
    st = rp_session_file_load(&s->session_dir, file, cfg, &tokens, state, &err, &detail);
    if (st != RP_OK) {
        free(state);
        /* The client's message never quotes the file; the log has it all. */
        if (s->cfg.log_requests) http_log_line(s, "%s %s: %s", rc->method, rc->path, detail.msg);
        return http_send_error(s, conn, 400, st == RP_ERR_IO ? "io_error" : "invalid_value",
                               "%s", err.msg);
    }
    st = rp_engine_session_import(s->engine, name, state, tokens, &err);
    free(state);
    if (st != RP_OK) return session_failure(s, conn, name, st, &err);
    session_forget(s, name);  /* a loaded state continues at a turn boundary */
    return http_send_json(s, conn, 200,
                          json_pack("{s:s,s:s,s:b}", "session", name, "path", file, "loaded", 1));
}

/* ---- routing ---------------------------------------------------------------- */

static enum route route_of(const char *url, char *session, size_t session_size) {
    if (strcmp(url, "/v1/completions") == 0) return ROUTE_COMPLETIONS;
    if (strcmp(url, "/v1/chat/completions") == 0) return ROUTE_CHAT;
    if (strcmp(url, "/v1/models") == 0) return ROUTE_MODELS;
    if (strncmp(url, "/v1/models/", 11) == 0 && url[11]) return ROUTE_MODEL;
    if (strcmp(url, "/health") == 0 || strcmp(url, "/v1/health") == 0) return ROUTE_HEALTH;
    if (strcmp(url, "/tokenizer_info") == 0) return ROUTE_TOKENIZER_INFO;
    if (strcmp(url, "/tokenize") == 0) return ROUTE_TOKENIZE;
    if (strcmp(url, "/detokenize") == 0) return ROUTE_DETOKENIZE;
    if (strcmp(url, "/metrics") == 0) return ROUTE_METRICS;
    static const char prefix[] = "/v1/sessions/";
    if (strncmp(url, prefix, sizeof prefix - 1) == 0) {
        const char *name = url + sizeof prefix - 1;
        const char *slash = strchr(name, '/');
        size_t n = slash ? (size_t)(slash - name) : strlen(name);
        if (n == 0 || n >= session_size) return ROUTE_NONE;
        memcpy(session, name, n);
        session[n] = '\0';
        if (!slash) return ROUTE_SESSION;
        if (strcmp(slash, "/save") == 0) return ROUTE_SESSION_SAVE;
        if (strcmp(slash, "/load") == 0) return ROUTE_SESSION_LOAD;
    }
    return ROUTE_NONE;
}

static const char *route_method(enum route r, const char *method) {
    switch (r) {
    case ROUTE_COMPLETIONS:
    case ROUTE_CHAT:
    case ROUTE_SESSION_SAVE:
    case ROUTE_SESSION_LOAD:
    case ROUTE_TOKENIZE:
    case ROUTE_DETOKENIZE: return "POST";
    case ROUTE_SESSION: return strcmp(method, "GET") == 0 ? "GET" : "DELETE";
    default: return "GET";
    }
}

static int route_has_body(enum route r) {
    return r == ROUTE_COMPLETIONS || r == ROUTE_CHAT || r == ROUTE_SESSION_SAVE ||
           r == ROUTE_SESSION_LOAD || r == ROUTE_TOKENIZE || r == ROUTE_DETOKENIZE;
}

static int authorized(rp_http_server *s, struct MHD_Connection *conn) {
    if (!s->api_key) return 1;
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return 0;
    h += 7;
    while (*h == ' ') h++;
    size_t a = strlen(h), b = strlen(s->api_key);
    /* constant time in the key's length */
    unsigned diff = (unsigned)(a ^ b);
    for (size_t i = 0; i < b; i++) diff |= (unsigned char)s->api_key[i] ^ (unsigned char)(i < a ? h[i] : 0);
    return diff == 0;
}

/* ---- connections: the request deadline ---------------------------------------- */

static conn_entry *conn_of(struct MHD_Connection *conn) {
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

/* The request has arrived (or is answered early): no deadline until the
 * reply ends. */
static void conn_request_arrived(rp_http_server *s, struct MHD_Connection *conn) {
    conn_entry *c = conn_of(conn);
    if (!c) return;
    pthread_mutex_lock(&s->conn_lock);
    c->receiving = 0;
    pthread_mutex_unlock(&s->conn_lock);
}

/* A reply has ended: the next request on the connection has
 * request_timeout_s from now to arrive (the idle timeout is usually shorter). */
static void conn_request_next(rp_http_server *s, struct MHD_Connection *conn) {
    conn_entry *c = conn_of(conn);
    if (!c) return;
    pthread_mutex_lock(&s->conn_lock);
    c->receiving = 1;
    c->request_start = rp_now_seconds();
    pthread_mutex_unlock(&s->conn_lock);
}

/* libmicrohttpd's idle timeout does not stop a client that sends a byte now
 * and then (slowloris): a connection whose request is not whole after
 * request_timeout_s is shut down; libmicrohttpd then reads end of input and
 * closes it. */
static void cut_late_requests(rp_http_server *s) {
    if (s->cfg.request_timeout_s <= 0) return;
    const double now = rp_now_seconds();
    int n = 0;
    pthread_mutex_lock(&s->conn_lock);
    for (conn_entry *c = s->conns; c; c = c->next)
        if (c->receiving && !c->cut && now - c->request_start > s->cfg.request_timeout_s) {
            shutdown(c->fd, SHUT_RDWR);
            c->cut = 1;
            n++;
        }
    pthread_mutex_unlock(&s->conn_lock);
    if (n > 0) {
        atomic_fetch_add(&s->connections_cut, n);
        http_log_line(s, "closed %d connection%s whose request did not arrive within %d s "
                      "(--request-timeout)", n, n == 1 ? "" : "s", s->cfg.request_timeout_s);
    }
}

static void *keeper_main(void *arg) {
    rp_http_server *s = arg;
    pthread_mutex_lock(&s->keeper_mu);
    while (!s->keeper_quit) {
        pthread_mutex_unlock(&s->keeper_mu);
        cut_late_requests(s);
        pthread_mutex_lock(&s->keeper_mu);
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += KEEPER_PERIOD_MS * 1000000L;
        if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
        if (!s->keeper_quit) pthread_cond_timedwait(&s->keeper_cv, &s->keeper_mu, &until);
    }
    pthread_mutex_unlock(&s->keeper_mu);
    return NULL;
}

static int has_control_char(const char *text) {
    for (const unsigned char *p = (const unsigned char *)text; *p; p++)
        if (*p < 0x20 || *p == 0x7f) return 1;
    return 0;
}

static int hex_digit(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A raw request target with a control byte, or one percent-encoded. */
static int target_has_control(const char *uri) {
    for (const unsigned char *p = (const unsigned char *)uri; *p; p++) {
        if (*p < 0x20 || *p == 0x7f) return 1;
        if (*p == '%') {
            int hi = hex_digit(p[1]), lo = hi < 0 ? -1 : hex_digit(p[2]);
            if (lo >= 0 && (hi * 16 + lo < 0x20 || hi * 16 + lo == 0x7f)) return 1;
        }
    }
    return 0;
}

static request_ctx *request_ctx_new(rp_http_server *s, const char *target) {
    request_ctx *rc = calloc(1, sizeof *rc);
    if (!rc) return NULL;
    rc->srv = s;
    rc->t_start = rp_now_seconds();
    rc->method = "OTHER";
    snprintf(rc->path, sizeof rc->path, "%s", target);
    return rc;
}

/* libmicrohttpd calls this with the request target as sent, before it
 * decodes it (the access handler sees only the decoded path, where %00 has
 * already ended the string); what it returns is the request's context. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn) {
    (void)conn;
    request_ctx *rc = request_ctx_new(cls, uri);
    if (rc) rc->bad_target = target_has_control(uri);
    return rc;
}

/* An answer given before the body is read (the body is then discarded): the
 * request counts as arrived, so its deadline no longer runs. */
static enum MHD_Result answer_early(rp_http_server *s, request_ctx *rc,
                                    struct MHD_Connection *conn, int status, const char *code,
                                    const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static enum MHD_Result answer_early(rp_http_server *s, request_ctx *rc,
                                    struct MHD_Connection *conn, int status, const char *code,
                                    const char *fmt, ...) {
    char message[RP_ERROR_MSG_LEN + 256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    rc->answered = 1;
    conn_request_arrived(s, conn);
    return http_send_error(s, conn, status, code, "%s", message);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
    rp_http_server *s = cls;
    (void)version;
    request_ctx *rc = *con_cls;
    if (!rc) {
        /* on_uri made none (out of memory): a context without the raw target */
        rc = request_ctx_new(s, url);
        if (!rc) return MHD_NO;
        *con_cls = rc;
    }
    if (!rc->started) {
        rc->started = 1;
        rc->method = strcmp(method, "GET") == 0 ? "GET" : strcmp(method, "POST") == 0 ? "POST"
                     : strcmp(method, "DELETE") == 0                                 ? "DELETE"
                                                                                     : "OTHER";
        /* Routes compare C strings: a decoded %00 would cut the path short
         * (/v1/sessions/a%00b/save acting on "a"). */
        if (rc->bad_target || has_control_char(url))
            return answer_early(s, rc, conn, 400, "invalid_path", "the request path encodes a "
                                "control character (%%00-%%1F or %%7F): refused");
        rc->route = route_of(url, rc->session, sizeof rc->session);
        /* answers that need no body are given now; the body is then not read */
        if (atomic_load(&s->stopping) && rc->route != ROUTE_HEALTH && rc->route != ROUTE_METRICS)
            return answer_early(s, rc, conn, 503, "shutting_down", "the server is shutting down");
        if (rc->route == ROUTE_NONE)
            return answer_early(s, rc, conn, 404, "not_found",
                                "no endpoint %s %s (see docs/serving.md)", method, url);
        if (strcmp(method, route_method(rc->route, method)) != 0 &&
            !(rc->route == ROUTE_SESSION && strcmp(method, "GET") == 0))
            return answer_early(s, rc, conn, 405, "method_not_allowed", "%s needs %s, not %s", url,
                                route_method(rc->route, method), method);
        if (rc->route != ROUTE_HEALTH && !authorized(s, conn))
            return answer_early(s, rc, conn, 401, "invalid_api_key",
                                "missing or wrong API key: send 'Authorization: Bearer KEY'");
        if ((rc->route == ROUTE_SESSION || rc->route == ROUTE_SESSION_SAVE ||
             rc->route == ROUTE_SESSION_LOAD) &&
            !rp_session_name_valid(rc->session))
            return answer_early(s, rc, conn, 400, "invalid_value",
                                "session names are 1 to %d letters, digits, '_', '-' or '.' (not "
                                "first)", RP_ENGINE_SESSION_NAME_MAX - 1);
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl) {
            char *end;
            errno = 0;
            unsigned long long n = strtoull(cl, &end, 10);
            if (errno || *end || n > s->cfg.max_body_bytes)
                return answer_early(s, rc, conn, 413, "body_too_large",
                                    "the request body has %s bytes: this server accepts at most "
                                    "%zu", cl, s->cfg.max_body_bytes);
        }
        return MHD_YES;
    }
    if (rc->gen && !rc->gen->stream) return http_gen_reply(&rc->gen, conn);  /* resumed */
    if (rc->answered) {
        *upload_data_size = 0;  /* discard */
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        if (route_has_body(rc->route) && !rc->body_too_large) {
            if (rc->body_len + *upload_data_size > s->cfg.max_body_bytes) {
                rc->body_too_large = 1;
                free(rc->body);
                rc->body = NULL;
                rc->body_len = rc->body_cap = 0;
            } else if (rp_text_append(&rc->body, &rc->body_len, &rc->body_cap, upload_data,
                                    *upload_data_size)) {
                return MHD_NO;
            }
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    /* the whole request is here */
    rc->answered = 1;
    conn_request_arrived(s, conn);
    if (rc->body_too_large)
        return http_send_error(s, conn, 413, "body_too_large",
                               "the request body is larger than %zu bytes", s->cfg.max_body_bytes);
    if (atomic_load(&s->stopping) && rc->route != ROUTE_HEALTH && rc->route != ROUTE_METRICS)
        return http_send_error(s, conn, 503, "shutting_down", "the server is shutting down");
    switch (rc->route) {
    case ROUTE_MODELS: return handle_models(s, conn);
    case ROUTE_MODEL: return handle_model(s, conn, url + 11);
    case ROUTE_TOKENIZER_INFO: return handle_tokenizer_info(s, conn);
    case ROUTE_HEALTH: return handle_health(s, conn);
    case ROUTE_METRICS: return handle_metrics(s, conn);
    default: break;
    }
    json_t *o = NULL;
    if (route_has_body(rc->route)) {
        rp_request_error e;
        o = rp_request_parse_json(rc->body, rc->body_len, &e);
        if (!o) return http_send_error(s, conn, e.status, e.code, "%s", e.message);
    }
    enum MHD_Result r;
    if (rc->route == ROUTE_COMPLETIONS || rc->route == ROUTE_CHAT)
        r = handle_generation(s, rc, conn, o);
    else if (rc->route == ROUTE_TOKENIZE || rc->route == ROUTE_DETOKENIZE)
        r = handle_tokenizer(s, conn, rc->route == ROUTE_TOKENIZE, o);
    else {
        /* counted until its reply is sent (on_completed): a stop after an
         * engine failure lets the failure reach the client first */
        rc->session_request = 1;
        atomic_fetch_add(&s->active_session_requests, 1);
        r = handle_session(s, rc, conn, method, o);
    }
    json_decref(o);
    return r;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    rp_http_server *s = cls;
    request_ctx *rc = *con_cls;
    conn_request_next(s, conn);
    if (!rc) return;
    if (rc->gen) {
        /* the connection ended before the reply did (a write failed: the
         * client went away, or the server closed): its job is cancelled */
        if (!rc->gen->done)
            http_log_line(s, "%s %s: client gone, job cancelled", rc->method, rc->path);
        http_gen_free(rc->gen);
    }
    if (rc->session_request) atomic_fetch_sub(&s->active_session_requests, 1);
    if (s->cfg.log && toe != MHD_REQUEST_TERMINATED_COMPLETED_OK &&
        toe != MHD_REQUEST_TERMINATED_CLIENT_ABORT)
        http_log_line(s, "%s %s: connection ended early (%d)", rc->method, rc->path, (int)toe);
    else if (s->cfg.log_requests)
        http_log_line(s, "%s %s %.1f ms", rc->method, rc->path,
                      (rp_now_seconds() - rc->t_start) * 1e3);
    free(rc->body);
    free(rc);
    *con_cls = NULL;
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
    rp_http_server *s = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        atomic_fetch_add(&s->active_connections, 1);
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        conn_entry *c = ci ? calloc(1, sizeof *c) : NULL;
        if (!c) return;  /* no deadline for it; the idle timeout still holds */
        c->fd = ci->connect_fd;
        c->request_start = rp_now_seconds();
        c->receiving = 1;
        pthread_mutex_lock(&s->conn_lock);
        c->next = s->conns;
        if (s->conns) s->conns->prev = c;
        s->conns = c;
        pthread_mutex_unlock(&s->conn_lock);
        *socket_context = c;
        return;
    }
    atomic_fetch_sub(&s->active_connections, 1);
    conn_entry *c = *socket_context;
    if (!c) return;
    /* before libmicrohttpd closes the fd: cut_late_requests no longer sees it */
    pthread_mutex_lock(&s->conn_lock);
    if (c->prev) c->prev->next = c->next;
    else s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    pthread_mutex_unlock(&s->conn_lock);
    free(c);
    *socket_context = NULL;
}

/* ---- server ----------------------------------------------------------------- */

rp_status rp_http_start(rp_http_server **out, rp_engine *engine, const rp_tokenizer *tok,
                        const rp_http_config *cfg, rp_error *err) {
    *out = NULL;
    if (cfg->port < 0 || cfg->port > 65535)
        return rp_error_set(err, RP_ERR_ARG, "port %d: expected 0 to 65535", cfg->port);
    if (cfg->max_prompt_tokens < 1 || cfg->max_tokens_limit < 0 || cfg->default_max_tokens < 0 ||
        cfg->max_body_bytes < 16 || cfg->max_connections < 1 ||
        cfg->max_connections_per_client < -1 || cfg->connection_timeout_s < 0 ||
        cfg->request_timeout_s < 0 || cfg->http_threads < 1 || !(cfg->drain_seconds >= 0))
        return rp_error_set(err, RP_ERR_ARG, "HTTP limits must be positive");
    rp_http_server *s = calloc(1, sizeof *s);
    if (!s) return rp_error_set(err, RP_ERR_NOMEM, "HTTP server: out of memory");
    s->engine = engine;
    s->tok = tok;
    s->cfg = *cfg;
    s->host = strdup(cfg->host ? cfg->host : "127.0.0.1");
    s->api_key = cfg->api_key && *cfg->api_key ? strdup(cfg->api_key) : NULL;
    s->model_id = strdup(cfg->model_id ? cfg->model_id : "rwkv");
    s->sessions = calloc(MAX_SESSION_ENTRIES, sizeof *s->sessions);
    s->created = time(NULL);
    s->vocab_size = rp_engine_config_of(engine)->vocab_size;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->conn_lock, NULL);
    pthread_mutex_init(&s->gen_lock, NULL);
    pthread_mutex_init(&s->keeper_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->keeper_cv, &ca);
    pthread_condattr_destroy(&ca);
    /* whole seconds, at least 1 (RFC 9110) */
    snprintf(s->retry_after, sizeof s->retry_after, "%d",
             cfg->drain_seconds < 1 ? 1 : (int)(cfg->drain_seconds + 0.999));
    if (!s->host || !s->model_id || !s->sessions ||
        (cfg->api_key && *cfg->api_key && !s->api_key)) {
        rp_http_stop(s);
        return rp_error_set(err, RP_ERR_NOMEM, "HTTP server: out of memory");
    }
    rp_status dir_st = rp_session_dir_init(
        &s->session_dir, cfg->session_dir && *cfg->session_dir ? cfg->session_dir : "sessions",
        cfg->session_overwrite, cfg->max_session_files, err);
    if (dir_st != RP_OK) {
        rp_http_stop(s);
        return dir_st;
    }
    json_object_seed(0);  /* before any thread builds JSON objects */

    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char port_text[16];
    snprintf(port_text, sizeof port_text, "%d", cfg->port);
    int gai = getaddrinfo(s->host, port_text, &hints, &ai);
    if (gai != 0 || !ai) {
        rp_error_set(err, RP_ERR_ARG, "--host %s: cannot resolve the address: %s", s->host,
                     gai_strerror(gai));
        rp_http_stop(s);
        return RP_ERR_ARG;
    }
    /* Event-driven: a few threads serve every connection; a generation
     * suspends its connection while it waits (see gen_suspend). */
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ITC |
                     MHD_USE_ERROR_LOG;
    flags |= MHD_is_feature_supported(MHD_FEATURE_EPOLL) == MHD_YES ? MHD_USE_EPOLL : MHD_USE_POLL;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    unsigned threads = (unsigned)(cfg->http_threads < cfg->max_connections ? cfg->http_threads
                                                                           : cfg->max_connections);
    int per_client = cfg->max_connections_per_client;
    if (per_client < 0) per_client = cfg->max_connections / 4 > 0 ? cfg->max_connections / 4 : 1;
    s->daemon = MHD_start_daemon(
        flags, (uint16_t)cfg->port, NULL, NULL, on_request, s, MHD_OPTION_EXTERNAL_LOGGER,
        mhd_logger, s, MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_NOTIFY_COMPLETED,
        on_completed, s, MHD_OPTION_NOTIFY_CONNECTION, on_connection, s,
        MHD_OPTION_URI_LOG_CALLBACK, on_uri, s,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)cfg->max_connections,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)per_client,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->connection_timeout_s,
        MHD_OPTION_THREAD_POOL_SIZE, threads, MHD_OPTION_END);
    int bind_errno = errno;
    freeaddrinfo(ai);
    if (!s->daemon) {
        rp_error_set(err, RP_ERR_IO, "cannot listen on %s port %d: %s", s->host, cfg->port,
                     bind_errno ? strerror(bind_errno) : "libmicrohttpd failed to start");
        rp_http_stop(s);
        return RP_ERR_IO;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : cfg->port;
    int pe = pthread_create(&s->keeper, NULL, keeper_main, s);
    if (pe != 0) {
        rp_error_set(err, RP_ERR_IO, "HTTP server: cannot start a thread: %s", strerror(pe));
        rp_http_stop(s);
        return RP_ERR_IO;
    }
    s->keeper_started = 1;
    *out = s;
    return RP_OK;
}

int rp_http_port(const rp_http_server *s) { return s->port; }

void rp_http_begin_stop(rp_http_server *s) {
    if (!s) return;
    long long zero = 0;
    const long long now_ms = (long long)(rp_now_seconds() * 1e3);  /* async-signal-safe */
    atomic_compare_exchange_strong(&s->stop_begin_ms, &zero, now_ms + 1);
    atomic_store(&s->stopping, 1);
}

void rp_http_drain(rp_http_server *s) {
    if (!s || !s->daemon) return;
    rp_http_begin_stop(s);
    const double begin = (double)atomic_load(&s->stop_begin_ms);
    const double until = begin + s->cfg.drain_seconds * 1e3;
    for (;;) {
        double now = rp_now_seconds() * 1e3;
        if (now >= until + STOP_FINISH_SECONDS * 1e3) break;
        if (now >= until && atomic_load(&s->active_generations) == 0) break;
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
}

void rp_http_fail(rp_http_server *s, const char *message) {
    if (!s) return;
    snprintf(s->fail_message, sizeof s->fail_message, "%s", message ? message : "the engine failed");
    s->engine_failed = 1;  /* read by the generations only once closing is set */
}

void rp_http_stop(rp_http_server *s) {
    if (!s) return;
    rp_http_begin_stop(s);
    atomic_store(&s->closing, 1);
    if (s->daemon) {
        /* No new connections; generations still in flight give up (they
         * are cancelled, a stream gets its last event) and send their last
         * bytes: stopping the daemon closes every socket, and it must find
         * no connection suspended. */
        MHD_socket listener = MHD_quiesce_daemon(s->daemon);
        pthread_mutex_lock(&s->gen_lock);
        for (gen_ctx *g = s->gens; g; g = g->next) http_gen_wake(g);
        pthread_mutex_unlock(&s->gen_lock);
        const double until = rp_now_seconds() + STOP_FINISH_SECONDS;
        while ((atomic_load(&s->active_generations) > 0 ||
                atomic_load(&s->active_session_requests) > 0) &&
               rp_now_seconds() < until) {
            struct timespec ts = {0, 10000000};
            nanosleep(&ts, NULL);
        }
        MHD_stop_daemon(s->daemon);
        if (listener != MHD_INVALID_SOCKET) close(listener);
    }
    if (s->keeper_started) {
        pthread_mutex_lock(&s->keeper_mu);
        s->keeper_quit = 1;
        pthread_cond_signal(&s->keeper_cv);
        pthread_mutex_unlock(&s->keeper_mu);
        pthread_join(s->keeper, NULL);
    }
    pthread_cond_destroy(&s->keeper_cv);
    pthread_mutex_destroy(&s->keeper_mu);
    pthread_mutex_destroy(&s->gen_lock);
    pthread_mutex_destroy(&s->conn_lock);
    pthread_mutex_destroy(&s->lock);
    free(s->sessions);
    free(s->host);
    free(s->api_key);
    free(s->model_id);
    rp_session_dir_free(&s->session_dir);
    free(s);
}
