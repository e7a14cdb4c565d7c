/* A generation of the HTTP service after its job is submitted (http.c
 * validates and submits): reading the engine's tokens without blocking a
 * connection thread (suspend / resume), incremental detokenisation with stop
 * strings (src/text/stream.c), and the reply: one JSON body, or SSE chunks.
 * The JSON formatters are pure and unit-tested (tests/test_http_stream.c). */
#include "serve/http_internal.h"

#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "core/clock.h"

#define READ_BATCH 256 /* tokens taken from the engine at once */

/* ---- pure formatters -------------------------------------------------------- */

const char *http_finish_name(rp_finish_reason f) {
    switch (f) {
    case RP_FINISH_LENGTH: return "length";
    case RP_FINISH_STOP: return "stop";
    case RP_FINISH_CANCELLED: return "cancelled";
    case RP_FINISH_ERROR: return "error";
    default: return "stop";
    }
}

const char *http_error_type(int status) {
    switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 409: return "conflict_error";
    case 429: return "rate_limit_error";
    case 500: return "server_error";
    case 503: return "unavailable_error";
    default: return "invalid_request_error";
    }
}

json_t *http_error_json(int status, const char *code, const char *message) {
    json_t *msg = json_stringn(message, strlen(message));
    if (!msg) msg = json_string("(message is not valid UTF-8)");
    return json_pack("{s:{s:o,s:s,s:s}}", "error", "message", msg, "type",
                     http_error_type(status), "code", code);
}

json_t *http_json_text(const char *b, size_t n) {
    json_t *j = json_stringn(b, n);
    return j ? j : json_string("");
}

json_t *http_usage_json(int prompt_tokens, int completion_tokens, int cached_tokens) {
    return json_pack("{s:i,s:i,s:i,s:{s:i}}", "prompt_tokens", prompt_tokens,
                     "completion_tokens", completion_tokens, "total_tokens",
                     prompt_tokens + completion_tokens, "prompt_tokens_details", "cached_tokens",
                     cached_tokens);
}

static int job_cached_tokens(rp_job *job) {
    rp_job_stats st;
    memset(&st, 0, sizeof st);
    rp_job_get_stats(job, &st);
    return st.cached_tokens;
}

json_t *http_timing_json(double queue_seconds, double t_submit, double t_first, double t_last,
                         int completion_tokens) {
    double ttft = t_first > 0 ? (t_first - t_submit) * 1e3 : 0.0;
    double tps = 0.0;
    if (completion_tokens > 1 && t_last > t_first)
        tps = (completion_tokens - 1) / (t_last - t_first);
    return json_pack("{s:f,s:f,s:f}", "queue_ms", queue_seconds * 1e3, "time_to_first_token_ms",
                     ttft, "tokens_per_second", tps);
}

json_t *http_chunk_json(const gen_head *h, int with_role, const char *text, size_t len,
                        const char *finish) {
    json_t *choice;
    json_t *fin = finish ? json_string(finish) : json_null();
    if (h->chat) {
        json_t *delta = json_object();
        if (with_role) json_object_set_new(delta, "role", json_string("assistant"));
        if (len > 0 || !finish) json_object_set_new(delta, "content", http_json_text(text, len));
        choice = json_pack("{s:i,s:o,s:o}", "index", 0, "delta", delta, "finish_reason", fin);
    } else {
        choice = json_pack("{s:i,s:o,s:n,s:o}", "index", 0, "text", http_json_text(text, len),
                           "logprobs", "finish_reason", fin);
    }
    return json_pack("{s:s,s:s,s:I,s:s,s:[o]}", "id", h->id, "object",
                     h->chat ? "chat.completion.chunk" : "text_completion", "created",
                     (json_int_t)h->created, "model", h->model, "choices", choice);
}

json_t *http_reply_json(const gen_head *h, const char *text, size_t len, const char *finish,
                        json_t *usage, json_t *timing) {
    json_t *t = http_json_text(text, len);
    json_t *choice =
        h->chat ? json_pack("{s:i,s:{s:s,s:o},s:s}", "index", 0, "message", "role", "assistant",
                            "content", t, "finish_reason", finish)
                : json_pack("{s:i,s:o,s:n,s:s}", "index", 0, "text", t, "logprobs",
                            "finish_reason", finish);
    return json_pack("{s:s,s:s,s:I,s:s,s:[o],s:o,s:o}", "id", h->id, "object",
                     h->chat ? "chat.completion" : "text_completion", "created",
                     (json_int_t)h->created, "model", h->model, "choices", choice, "usage",
                     usage, "timing", timing);
}

int http_sse_event(char **buf, size_t *len, size_t *cap, json_t *event) {
    char *body = event ? json_dumps(event, JSON_COMPACT) : NULL;
    json_decref(event);
    if (!body) return -1;
    /* one append: a failure leaves no half event in the stream */
    size_t n = strlen(body);
    char *framed = malloc(n + 9);
    int r = -1;
    if (framed) {
        memcpy(framed, "data: ", 6);
        memcpy(framed + 6, body, n);
        memcpy(framed + 6 + n, "\n\n", 3);
        r = rp_text_append(buf, len, cap, framed, n + 8);
    }
    free(framed);
    free(body);
    return r ? -1 : 0;
}

/* ---- the generation ------------------------------------------------------------ */

void http_gen_tail_push(gen_ctx *g, const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (g->tail_len == 2) g->tail[0] = g->tail[1], g->tail_len = 1;
        g->tail[g->tail_len++] = (char)b[i];
    }
}

void http_gen_wake(void *user) {
    gen_ctx *g = user;
    pthread_mutex_lock(&g->wake_mu);
    g->wake_pending = 1;
    if (g->suspended) {
        g->suspended = 0;
        MHD_resume_connection(g->conn);
    }
    pthread_mutex_unlock(&g->wake_mu);
}

/* From a libmicrohttpd callback that found nothing to do: suspends the
 * connection (returns 1: the callback returns and is called again once
 * resumed), or returns 0 when a wake came meanwhile (look again). */
static int gen_suspend(gen_ctx *g) {
    pthread_mutex_lock(&g->wake_mu);
    int woken = g->wake_pending;
    g->wake_pending = 0;
    if (!woken) {
        g->suspended = 1;
        MHD_suspend_connection(g->conn);
    }
    pthread_mutex_unlock(&g->wake_mu);
    return !woken;
}

/* Moves released text to the reply (or returns it for a chunk). */
static const char *take_text(gen_ctx *g, size_t *len) {
    const char *t = rp_text_stream_take(&g->text, len);
    if (g->skip_space && *len > 0) {
        g->skip_space = 0;
        if (t[0] == ' ') t++, (*len)--;
    }
    return t;
}

static void finish_job(gen_ctx *g, rp_finish_reason f) {
    g->done = 1;
    g->finish = f;
    rp_text_stream_finish(&g->text);
    if (f == RP_FINISH_ERROR) rp_job_error(g->job, g->error, sizeof g->error);
}

/* Keeps generated token `index`'s logprob for the reply (a token whose
 * logprob did not come is listed with the logprob 0 and no alternatives;
 * the engine sends it before the token, so this does not happen). */
static void gen_keep_logprob(gen_ctx *g, int index, int32_t id) {
    if (g->n_glp == g->glp_cap) {
        size_t cap = g->glp_cap ? 2 * g->glp_cap : 32;
        http_token_lp *grown = realloc(g->glp, cap * sizeof *grown);
        if (!grown) return;
        g->glp = grown;
        g->glp_cap = cap;
    }
    http_token_lp *t = &g->glp[g->n_glp++];
    t->id = id;
    if (!rp_job_logprob(g->job, index, &t->lp)) {
        memset(&t->lp, 0, sizeof t->lp);
        t->lp.token = id;
    }
}

/* Adds to l the prompt's tokens (echo with logprobs: the first has none)
 * when with_prompt, then the generated tokens not listed yet. */
static void gen_add_logprobs(gen_ctx *g, http_logprobs *l, int with_prompt) {
    const rp_tokenizer *tok = g->srv->tok;
    if (with_prompt && g->echo) {
        for (int i = 0; i < g->n_prompt && g->want_lp; i++) {
            rp_token_logprob lp;
            rp_job *src = g->lp_source ? g->lp_source->job : g->job;
            int have = i > 0 && rp_job_prompt_logprob(src, i, &lp);
            http_logprobs_add(l, tok, g->prompt_ids[i], have ? &lp : NULL, g->top_lp);
        }
        if (!g->want_lp) http_logprobs_skip_text(l, g->echo_text, g->echo_len);
    }
    for (; g->glp_sent < g->n_glp; g->glp_sent++)
        http_logprobs_add(l, tok, g->glp[g->glp_sent].id, &g->glp[g->glp_sent].lp, g->top_lp);
}

/* Reads what the engine generated (waiting up to timeout_ms) and feeds the
 * text stream. Returns 1 once the generation is over (g->done). A stop
 * string ends it at once; a job that stores a session is still drained to
 * its end so the table knows what its state has read, and so the stored
 * state exists before the reply completes. */
static int gen_pump(gen_ctx *g, int timeout_ms) {
    if (g->n_kids) {
        /* several choices: over when every one is (the first failure
         * names its choice) */
        int all = 1;
        for (int i = 0; i < g->n_kids; i++) {
            gen_ctx *k = g->kids[i];
            if (!k->done) gen_pump(k, 0);
            all &= k->done;
            if (k->done && k->finish == RP_FINISH_ERROR && g->finish != RP_FINISH_ERROR) {
                g->finish = RP_FINISH_ERROR;
                g->engine_failed = k->engine_failed;
                snprintf(g->error, sizeof g->error, "choice %d: %.900s", i, k->error);
            }
        }
        if (all) g->done = 1;
        if (all && g->finish != RP_FINISH_ERROR) g->finish = RP_FINISH_STOP;
        return all;
    }
    int32_t ids[READ_BATCH];
    for (;;) {
        rp_finish_reason f = RP_FINISH_NONE;
        int n = rp_job_read(g->job, ids, READ_BATCH, timeout_ms, &f);
        if (n > 0 && g->t_first == 0) g->t_first = rp_now_seconds();
        for (int i = 0; i < n; i++) {
            size_t len;
            const uint8_t *b = rp_tokenizer_token_bytes(g->srv->tok, ids[i], &len);
            if (!b) len = 0;
            if (g->session[0]) http_gen_tail_push(g, b, len);
            const int index = g->n_read++;
            if (g->stop_hit) continue;
            if (g->want_lp) gen_keep_logprob(g, index, ids[i]);
            g->completion_tokens++;
            g->t_last = rp_now_seconds();
            if (g->return_ids) {
                if (g->n_ids == g->ids_cap) {
                    size_t cap = g->ids_cap ? 2 * g->ids_cap : 64;
                    int32_t *grown = realloc(g->ids, cap * sizeof *grown);
                    if (grown) g->ids = grown, g->ids_cap = cap;
                }
                if (g->n_ids < g->ids_cap) g->ids[g->n_ids++] = ids[i];
            }
            int r = rp_text_stream_push(&g->text, b ? b : (const uint8_t *)"", len);
            if (r == 1) {
                g->stop_hit = 1;
                rp_job_stop(g->job);
                if (!g->session[0]) {
                    finish_job(g, RP_FINISH_STOP);
                    return 1;
                }
            }
        }
        if (f != RP_FINISH_NONE) {
            /* The end-of-text token that stopped it is listed (not in the
             * text), as OpenAI does: clients that drop the last entry
             * (lm-evaluation-harness) rely on it. */
            rp_token_logprob lp;
            if (g->want_lp && f == RP_FINISH_STOP && !g->stop_hit &&
                rp_job_logprob(g->job, g->n_read, &lp) &&
                lp.token == rp_tokenizer_eot_id(g->srv->tok))
                gen_keep_logprob(g, g->n_read, lp.token);
            /* Every token is read (rp_job_read reports the end only then),
             * maybe with these last ones: over now, as the job's hook will
             * not call again. A session turn ends only once the engine has
             * stored the session. */
            finish_job(g, g->stop_hit ? RP_FINISH_STOP : f);
            return 1;
        }
        if (n < READ_BATCH) return 0;
        timeout_ms = 0;  /* more may be waiting: take it now */
    }
}

/* Should a generation give up on its job? Only when the server closes: a
 * client that went away is found by a failed write (on_completed cancels
 * the job), and one that only closed its sending side still gets its reply. */
static int gen_should_abort(gen_ctx *g) { return atomic_load(&g->srv->closing); }

/* Gives up on the job as the server closes: cancelled when it stops on
 * request, an error naming the failure when the engine failed (rp_http_fail). */
static void gen_abort(gen_ctx *g) {
    if (g->n_kids) {
        for (int i = 0; i < g->n_kids; i++)
            if (!g->kids[i]->done) gen_abort(g->kids[i]);
        gen_pump(g, 0);
        return;
    }
    rp_job_cancel(g->job);
    finish_job(g, RP_FINISH_CANCELLED);
    if (!g->srv->engine_failed) return;
    g->finish = RP_FINISH_ERROR;
    g->engine_failed = 1;
    snprintf(g->error, sizeof g->error, "%s", g->srv->fail_message);
}

gen_ctx *http_gen_new(rp_http_server *s, struct MHD_Connection *conn) {
    gen_ctx *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->srv = s;
    g->conn = conn;
    g->head.model = s->model_id;
    pthread_mutex_init(&g->wake_mu, NULL);
    atomic_fetch_add(&s->active_generations, 1);
    pthread_mutex_lock(&s->gen_lock);
    g->next = s->gens;
    if (s->gens) s->gens->prev = g;
    s->gens = g;
    pthread_mutex_unlock(&s->gen_lock);
    return g;
}

gen_ctx *http_gen_kid(gen_ctx *parent) {
    gen_ctx *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->srv = parent->srv;
    g->conn = parent->conn;
    g->parent = parent;
    g->head = parent->head;
    pthread_mutex_init(&g->wake_mu, NULL);
    return g;
}

void http_gen_free(gen_ctx *g) {
    if (!g) return;
    rp_http_server *s = g->srv;
    for (int i = 0; i < g->n_kids; i++) http_gen_free(g->kids[i]);
    free(g->kids);
    if (g->job) {
        rp_job_set_notify(g->job, NULL, NULL);  /* waits for a call in progress */
        if (g->submitted && !g->done) rp_job_cancel(g->job);
        rp_job_release(g->job);
    }
    if (!g->parent) {
        pthread_mutex_lock(&s->gen_lock);
        if (g->prev) g->prev->next = g->next;
        else s->gens = g->next;
        if (g->next) g->next->prev = g->prev;
        pthread_mutex_unlock(&s->gen_lock);
    }
    pthread_mutex_destroy(&g->wake_mu);
    /* Only a finished turn stores its state (it has then read every token
     * it emitted, stop strings and what followed them included); a
     * refused, cancelled or failed one leaves the stored state as it was. */
    if (g->session[0])
        http_session_end_turn(s, g->session, g->tail, g->tail_len,
                              g->submitted && g->done &&
                                  (g->finish == RP_FINISH_STOP || g->finish == RP_FINISH_LENGTH));
    rp_text_stream_free(&g->text);
    free(g->reply);
    free(g->pending);
    free(g->ids);
    free(g->glp);
    free(g->prompt_ids);
    free(g->echo_text);
    http_logprobs_free(&g->lp_stream);
    const int counted = !g->parent;
    free(g);
    if (counted) atomic_fetch_sub(&s->active_generations, 1);
}

static json_t *ids_json(const gen_ctx *g) {
    json_t *a = json_array();
    for (size_t i = 0; a && i < g->n_ids; i++) json_array_append_new(a, json_integer(g->ids[i]));
    return a;
}

static json_t *gen_timing_json(gen_ctx *g) {
    if (g->n_kids) g = g->kids[0];
    rp_job_stats st;
    memset(&st, 0, sizeof st);
    rp_job_get_stats(g->job, &st);
    return http_timing_json(st.queue_seconds, g->t_submit, g->t_first, g->t_last,
                            g->completion_tokens);
}

/* ---- SSE ------------------------------------------------------------------- */

static void sse_append(gen_ctx *g, json_t *event) {
    http_sse_event(&g->pending, &g->pending_len, &g->pending_cap, event);
}

static void sse_produce_one(gen_ctx *out, gen_ctx *g, int index);

/* Usage of a request of several choices: each prompt's tokens once, every
 * choice's generated tokens. */
static json_t *multi_usage_json(gen_ctx *g) {
    int prompt = 0, completion = 0, cached = 0;
    for (int i = 0; i < g->n_kids; i++) {
        if (i % g->n_per_prompt == 0) {
            prompt += g->kids[i]->n_prompt;
            cached += job_cached_tokens(g->kids[i]->job);
        }
        completion += g->kids[i]->completion_tokens;
    }
    return http_usage_json(prompt, completion, cached);
}

/* Fills g->pending with the events the job (or each choice's) has ready
 * (never waits). Several choices: each one's chunks carry its index and its
 * finish_reason; a last chunk with no choices has the usage. */
static void sse_produce(gen_ctx *g) {
    if (!g->n_kids) {
        sse_produce_one(g, g, 0);
        return;
    }
    int all = 1;
    for (int i = 0; i < g->n_kids && !g->sent_done; i++) {
        gen_ctx *k = g->kids[i];
        if (!k->sent_done) sse_produce_one(g, k, i);
        all &= k->sent_done;
    }
    if (g->sent_done) return; /* a choice failed: its error ended the stream */
    if (!all) return;
    json_t *last = http_chunk_json(&g->head, 0, "", 0, "stop");
    json_array_clear(json_object_get(last, "choices"));
    json_object_set_new(last, "usage", multi_usage_json(g));
    json_object_set_new(last, "timing", gen_timing_json(g));
    sse_append(g, last);
    rp_text_append(&g->pending, &g->pending_len, &g->pending_cap, "data: [DONE]\n\n", 14);
    g->sent_done = 1;
    g->done = 1;
}

/* Sets a chunk's choice index. */
static json_t *chunk_index(json_t *chunk, int index) {
    json_object_set_new(json_array_get(json_object_get(chunk, "choices"), 0), "index",
                        json_integer(index));
    return chunk;
}

/* The events of one choice g (index) into out's buffer. */
static void sse_produce_one(gen_ctx *out, gen_ctx *g, int index) {
    const int multi = out != g;
    int done = g->done ? 1 : gen_pump(g, 0);
    size_t len;
    const char *t = take_text(g, &len);
    /* echo: the prompt goes first, once the engine has scored it (it has
     * when the first token or the end comes) */
    const int echo_now = g->echo && !g->echo_sent && (g->n_read > 0 || done);
    char *joined = NULL;
    if (echo_now) {
        joined = malloc(g->echo_len + len + 1);
        if (joined) {
            memcpy(joined, g->echo_text, g->echo_len);
            memcpy(joined + g->echo_len, t, len);
            t = joined;
            len += g->echo_len;
        }
    }
    if (len > 0 || echo_now || (g->head.chat && !g->sent_role)) {
        json_t *chunk = http_chunk_json(&g->head, g->head.chat && !g->sent_role, t, len, NULL);
        if (g->want_lp || echo_now) {
            gen_add_logprobs(g, &g->lp_stream, echo_now);
            if (g->want_lp)
                json_object_set_new(json_array_get(json_object_get(chunk, "choices"), 0),
                                    "logprobs", http_logprobs_take(&g->lp_stream));
        }
        g->echo_sent |= echo_now;
        sse_append(out, chunk_index(chunk, index));
        g->sent_role = 1;
    }
    free(joined);
    if (!done) return;
    if (g->finish == RP_FINISH_ERROR) {
        char msg[RP_ERROR_MSG_LEN + 32];
        if (multi) snprintf(msg, sizeof msg, "choice %d: %s", index, g->error);
        else snprintf(msg, sizeof msg, "%s", g->error);
        sse_append(out, g->engine_failed ? http_error_json(503, "engine_failed", msg)
                                         : http_error_json(500, "generation_failed", msg));
    } else if (multi) {
        json_t *last = http_chunk_json(&g->head, g->head.chat && !g->sent_role, "", 0,
                                       http_finish_name(g->finish));
        g->sent_role = 1;
        json_t *choice = json_array_get(json_object_get(last, "choices"), 0);
        if (g->return_ids) json_object_set_new(choice, "token_ids", ids_json(g));
        if (g->want_lp) {
            gen_add_logprobs(g, &g->lp_stream, 0);
            json_object_set_new(choice, "logprobs", http_logprobs_take(&g->lp_stream));
        }
        sse_append(out, chunk_index(last, index));
        g->sent_done = 1;
        return;
    } else {
        json_t *last = http_chunk_json(&g->head, g->head.chat && !g->sent_role, "", 0,
                                       http_finish_name(g->finish));
        g->sent_role = 1;
        if (g->return_ids)
            json_object_set_new(json_array_get(json_object_get(last, "choices"), 0), "token_ids",
                                ids_json(g));
        if (g->want_lp) {
            gen_add_logprobs(g, &g->lp_stream, 0);
            json_object_set_new(json_array_get(json_object_get(last, "choices"), 0), "logprobs",
                                http_logprobs_take(&g->lp_stream));
        }
        json_object_set_new(last, "usage", http_usage_json(g->n_prompt, g->completion_tokens, job_cached_tokens(g->job)));
        json_object_set_new(last, "timing", gen_timing_json(g));
        if (g->session[0]) json_object_set_new(last, "session", json_string(g->session));
        sse_append(g, last);
    }
    rp_text_append(&out->pending, &out->pending_len, &out->pending_cap, "data: [DONE]\n\n", 14);
    out->sent_done = 1;
    g->sent_done = 1;
}

static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    gen_ctx *g = cls;
    (void)pos;
    for (;;) {
        if (g->pending_off < g->pending_len) {
            size_t n = g->pending_len - g->pending_off;
            if (n > max) n = max;
            memcpy(buf, g->pending + g->pending_off, n);
            g->pending_off += n;
            if (g->pending_off == g->pending_len) g->pending_off = g->pending_len = 0;
            return (ssize_t)n;
        }
        if (g->sent_done) return MHD_CONTENT_READER_END_OF_STREAM;
        if (!g->done && gen_should_abort(g)) gen_abort(g);
        sse_produce(g);
        if (g->pending_len > 0 || g->sent_done) continue;
        /* nothing to send: 0 with the connection suspended until the job's
         * hook resumes it (libmicrohttpd then calls again) */
        if (gen_suspend(g)) return 0;
    }
}

enum MHD_Result http_gen_stream(gen_ctx **slot, struct MHD_Connection *conn) {
    gen_ctx *g = *slot;
    rp_http_server *s = g->srv;
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, sse_reader, g, NULL);
    if (!resp) {
        *slot = NULL;
        http_gen_free(g);
        return http_send_error(s, conn, 500, "internal", "cannot create the response");
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    enum MHD_Result r = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    http_count_response(s, 200);
    return r;
}

/* ---- one JSON reply ---------------------------------------------------------- */

/* The choice object of kid k (its text, with echo the prompt's first; its
 * finish_reason, token_ids, logprobs). */
static json_t *choice_json(gen_ctx *k, int index) {
    char *text = malloc(k->echo_len + k->reply_len + 1);
    if (!text) return NULL;
    if (k->echo) memcpy(text, k->echo_text, k->echo_len);
    size_t len = k->echo ? k->echo_len : 0;
    if (k->reply_len) memcpy(text + len, k->reply, k->reply_len);
    len += k->reply_len;
    json_t *resp = http_reply_json(&k->head, text, len, http_finish_name(k->finish), json_object(),
                                   json_object());
    free(text);
    json_t *choice = json_array_get(json_object_get(resp, "choices"), 0);
    if (!choice) {
        json_decref(resp);
        return NULL;
    }
    json_incref(choice);
    json_decref(resp);
    json_object_set_new(choice, "index", json_integer(index));
    if (k->return_ids) json_object_set_new(choice, "token_ids", ids_json(k));
    if (k->want_lp) {
        http_logprobs l;
        http_logprobs_init(&l, k->head.chat);
        gen_add_logprobs(k, &l, 1);
        json_object_set_new(choice, "logprobs", http_logprobs_take(&l));
        http_logprobs_free(&l);
    }
    return choice;
}

/* The reply of several choices: index = prompt * n + j, as OpenAI orders
 * them; a failed choice fails the request, naming it. */
static enum MHD_Result reply_multi(gen_ctx *g, struct MHD_Connection *conn) {
    rp_http_server *s = g->srv;
    if (g->finish == RP_FINISH_ERROR)
        return http_send_error(s, conn, g->engine_failed ? 503 : 500,
                               g->engine_failed ? "engine_failed" : "generation_failed", "%s",
                               g->error);
    json_t *choices = json_array();
    for (int i = 0; choices && i < g->n_kids; i++) {
        json_t *c = choice_json(g->kids[i], i);
        if (!c || json_array_append_new(choices, c)) {
            json_decref(choices);
            choices = NULL;
        }
    }
    if (!choices) return http_send_error(s, conn, 500, "internal", "out of memory");
    json_t *resp = json_pack("{s:s,s:s,s:I,s:s,s:o,s:o,s:o}", "id", g->head.id, "object",
                             g->head.chat ? "chat.completion" : "text_completion", "created",
                             (json_int_t)g->head.created, "model", g->head.model, "choices",
                             choices, "usage", multi_usage_json(g), "timing",
                             gen_timing_json(g));
    return http_send_json(s, conn, 200, resp);
}

static enum MHD_Result reply_done(gen_ctx *g, struct MHD_Connection *conn) {
    rp_http_server *s = g->srv;
    if (g->n_kids) return reply_multi(g, conn);
    size_t len;
    const char *t = take_text(g, &len);
    rp_text_append(&g->reply, &g->reply_len, &g->reply_cap, t, len);
    if (g->finish == RP_FINISH_ERROR && g->start[0] && g->completion_tokens == 0 &&
        !rp_engine_session_exists(s->engine, g->start))
        return http_send_error(s, conn, 404, "session_not_found", "%s", g->error);
    if (g->finish == RP_FINISH_ERROR && g->engine_failed)
        return http_send_error(s, conn, 503, "engine_failed", "%s", g->error);
    if (g->finish == RP_FINISH_ERROR)
        return http_send_error(s, conn, 500, "generation_failed", "%s", g->error);
    if (g->echo) {
        /* the prompt's text first */
        char *joined = malloc(g->echo_len + g->reply_len + 1);
        if (!joined) return http_send_error(s, conn, 500, "internal", "out of memory");
        memcpy(joined, g->echo_text, g->echo_len);
        if (g->reply_len) memcpy(joined + g->echo_len, g->reply, g->reply_len);
        free(g->reply);
        g->reply = joined;
        g->reply_len += g->echo_len;
        g->reply_cap = g->reply_len + 1;
        g->reply[g->reply_len] = '\0';
    }
    json_t *resp = http_reply_json(&g->head, g->reply ? g->reply : "", g->reply_len,
                                   http_finish_name(g->finish),
                                   http_usage_json(g->n_prompt, g->completion_tokens, job_cached_tokens(g->job)),
                                   gen_timing_json(g));
    if (resp && g->session[0]) json_object_set_new(resp, "session", json_string(g->session));
    json_t *choice = json_array_get(json_object_get(resp, "choices"), 0);
    if (choice && g->return_ids) json_object_set_new(choice, "token_ids", ids_json(g));
    if (choice && g->want_lp) {
        http_logprobs l;
        http_logprobs_init(&l, g->head.chat);
        gen_add_logprobs(g, &l, 1);
        json_object_set_new(choice, "logprobs", http_logprobs_take(&l));
        http_logprobs_free(&l);
    }
    return http_send_json(s, conn, 200, resp);
}

enum MHD_Result http_gen_reply(gen_ctx **slot, struct MHD_Connection *conn) {
    gen_ctx *g = *slot;
    for (;;) {
        if (!g->done && gen_should_abort(g)) gen_abort(g);
        if (!g->done) gen_pump(g, 0);
        for (int i = 0; i < (g->n_kids ? g->n_kids : 1); i++) {
            gen_ctx *k = g->n_kids ? g->kids[i] : g;
            size_t len;
            const char *t = take_text(k, &len);
            if (len && rp_text_append(&k->reply, &k->reply_len, &k->reply_cap, t, len)) {
                rp_job_cancel(k->job);
                finish_job(k, RP_FINISH_ERROR);
                snprintf(k->error, sizeof k->error, "out of memory for the reply");
                if (g->n_kids) gen_pump(g, 0);
            }
        }
        if (g->done) break;
        if (gen_suspend(g)) return MHD_YES;
    }
    *slot = NULL;
    enum MHD_Result r = reply_done(g, conn);
    http_gen_free(g);
    return r;
}
