/* Shared between the HTTP service's files (http.c: routing, endpoints,
 * connections, the session table; http_stream.c: a generation's life after
 * submit, its JSON and SSE replies). Not part of the public interface:
 * src/cli sees only http.h. The pure formatters at the end are unit-tested
 * without a daemon (tests/test_http_stream.c). */
#ifndef RP_SERVE_HTTP_INTERNAL_H
#define RP_SERVE_HTTP_INTERNAL_H

#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "infer/engine.h"
#include "serve/http.h"
#include "infer/session_file.h"
#include "text/stream.h"

/* HTTP status codes the metrics count (http.c's counted_codes). */
#define HTTP_N_COUNTED_CODES 11

/* What the HTTP layer knows of a stored session between turns (the engine
 * holds the state itself): the last bytes of the text the state has read
 * (a chat turn continues at a blank line), and whether a request is using
 * it now (two at once would race on the stored state). */
typedef struct {
    char name[RP_ENGINE_SESSION_NAME_MAX];
    char tail[2];
    int tail_len;
    int stored;       /* a turn of ours stored it (the engine may still be storing it) */
    int busy;
    unsigned long last_use;
} http_session;

/* The logprobs of one choice being built (http_logprobs.c). */
typedef struct {
    int chat;
    json_t *tokens, *token_logprobs, *top_logprobs, *text_offset; /* completions */
    json_t *content;                                              /* chat */
    size_t offset;  /* characters of the choice's text before the next token */
} http_logprobs;

/* A generated token the reply lists with its logprob. */
typedef struct {
    int32_t id;
    rp_token_logprob lp;
} http_token_lp;

typedef struct conn_entry conn_entry;
typedef struct gen_ctx gen_ctx;

struct rp_http_server {
    struct MHD_Daemon *daemon;
    rp_engine *engine;
    const rp_tokenizer *tok;
    rp_http_config cfg;
    char *host, *api_key, *model_id;
    rp_session_dir session_dir;
    int port;
    int vocab_size;
    time_t created;
    atomic_int stopping;        /* rp_http_begin_stop: new requests get 503 */
    atomic_llong stop_begin_ms; /* when (monotonic clock; 0 = not stopping) */
    atomic_int closing;         /* rp_http_stop: generations still running give up */
    int engine_failed;          /* rp_http_fail, before closing: they give up with an error */
    char fail_message[RP_ERROR_MSG_LEN];
    char retry_after[16];       /* the Retry-After of a 503 while stopping */
    atomic_ulong next_id;
    atomic_long responses[HTTP_N_COUNTED_CODES + 1];  /* last: any other code */
    atomic_long active_connections;
    atomic_int active_generations;  /* gen_ctx alive (a stream: until its last byte is sent) */
    atomic_int active_session_requests; /* session save/load/delete until their reply is sent */
    atomic_long connections_cut;    /* closed by the request deadline */
    pthread_mutex_t conn_lock;  /* conns; held while shutting a socket down, so that
                                 * libmicrohttpd cannot close (and reuse) its fd meanwhile */
    conn_entry *conns;
    pthread_mutex_t gen_lock;   /* gens */
    gen_ctx *gens;
    /* the keeper thread: enforces the request deadline */
    pthread_t keeper;
    int keeper_started, keeper_quit;
    pthread_mutex_t keeper_mu;
    pthread_cond_t keeper_cv;
    pthread_mutex_t lock;       /* sessions[] */
    http_session *sessions;
    int n_sessions;
    unsigned long use_counter;
};

/* What every chunk and reply of one generation repeats. */
typedef struct {
    int chat;                   /* chat.completion(.chunk), else text_completion */
    char id[48];
    time_t created;
    const char *model;
} gen_head;

/* One generation. It never blocks a libmicrohttpd thread: while its job has
 * nothing new, its connection is suspended, and the job's notification hook
 * (http_gen_wake, on the engine's thread) resumes it. wake_pending keeps a
 * wake that comes between a look at the job and the suspension, so it is
 * not lost; `suspended` says whether there is a suspension to resume
 * (resuming a connection that is not suspended is undefined in
 * libmicrohttpd). */
struct gen_ctx {
    rp_http_server *srv;
    struct MHD_Connection *conn;
    gen_ctx *prev, *next;       /* srv->gens */
    pthread_mutex_t wake_mu;
    int suspended, wake_pending;
    rp_job *job;
    gen_head head;
    int stream;
    int n_prompt;
    rp_text_stream text;
    int skip_space;             /* chat: the reply's first space is the format's */
    int completion_tokens;
    int return_ids;             /* "return_token_ids": the ids of the reply */
    int32_t *ids;
    size_t n_ids, ids_cap;
    int stop_hit;
    /* logprobs ("logprobs", chat "top_logprobs") and echo */
    int want_lp, top_lp, echo;
    int32_t *prompt_ids;        /* echo: the prompt's tokens */
    char *echo_text;            /* echo: the prompt's text */
    size_t echo_len;
    int echo_sent;              /* stream: the prompt went out */
    int n_read;                 /* tokens read from the job (its logprob index) */
    http_token_lp *glp;         /* the listed tokens' logprobs */
    size_t n_glp, glp_cap, glp_sent;
    http_logprobs lp_stream;    /* stream: offsets carry over between chunks */
    /* a request of several choices (a batch of prompts, n > 1): the parent
     * holds the connection and its reply; each kid one choice and its job */
    gen_ctx *parent;
    gen_ctx **kids;
    int n_kids, n_per_prompt;
    gen_ctx *lp_source;         /* echo: the kid whose job scored this prompt (NULL: its own) */
    int submitted;              /* the engine has the job */
    int done;
    rp_finish_reason finish;
    int engine_failed;          /* ended by rp_http_fail: 503 engine_failed, not 500 */
    char error[RP_ERROR_MSG_LEN];
    char start[RP_ENGINE_SESSION_NAME_MAX];  /* the session it starts from, if any */
    double t_submit, t_first, t_last;
    /* session the job stores into (busy in the table until the end) */
    char session[RP_ENGINE_SESSION_NAME_MAX];
    char tail[2];
    int tail_len;
    /* non-stream: the whole reply */
    char *reply;
    size_t reply_len, reply_cap;
    /* stream: SSE bytes waiting to be sent */
    char *pending;
    size_t pending_len, pending_off, pending_cap;
    int sent_role, sent_done;
};

/* ---- http.c: replies, log, the session table ---- */

void http_count_response(rp_http_server *s, int status);
/* Takes ownership of json. */
enum MHD_Result http_send_json(rp_http_server *s, struct MHD_Connection *conn, int status,
                               json_t *json);
enum MHD_Result http_send_error(rp_http_server *s, struct MHD_Connection *conn, int status,
                                const char *code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
void http_log_line(rp_http_server *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A generation's end for the session it stored into: not busy any more;
 * when the turn finished (stored = 1), the tail of what its state read. */
void http_session_end_turn(rp_http_server *s, const char *name, const char tail[2], int tail_len,
                           int stored);

/* ---- http_stream.c: a generation ---- */

/* A new generation on conn, counted in active_generations; NULL when out
 * of memory. */
gen_ctx *http_gen_new(rp_http_server *s, struct MHD_Connection *conn);
/* A choice of parent's request (not counted or listed on its own; its
 * job's hook wakes the parent); NULL when out of memory. */
gen_ctx *http_gen_kid(gen_ctx *parent);
/* Cancels its job if submitted and unfinished, ends its session turn,
 * frees. NULL is ignored. */
void http_gen_free(gen_ctx *g);
/* The job's hook (rp_job_set_notify) and rp_http_stop: look again. */
void http_gen_wake(void *user);
/* What the session's state will have read: appends bytes to g->tail. */
void http_gen_tail_push(gen_ctx *g, const uint8_t *b, size_t n);
/* A non-streamed generation, from on_request (first and each time it is
 * resumed): queues the reply once the job has ended, then frees g and sets
 * *slot to NULL; else suspends the connection. */
enum MHD_Result http_gen_reply(gen_ctx **slot, struct MHD_Connection *conn);
/* A streamed one: queues the SSE response, whose reader pumps the job.
 * *slot keeps g until the request completes (on_completed frees it); on
 * failure g is freed, *slot is NULL and a 500 is queued. */
enum MHD_Result http_gen_stream(gen_ctx **slot, struct MHD_Connection *conn);

/* ---- http_stream.c: pure formatters (no server, no job) ---- */

/* "length", "stop", "cancelled", "error" (RP_FINISH_NONE: "stop"). */
const char *http_finish_name(rp_finish_reason f);
/* The "type" of an error object for an HTTP status. */
const char *http_error_type(int status);
/* {"error": {"message", "type", "code"}}; a message that is not UTF-8 is
 * replaced by a note saying so. */
json_t *http_error_json(int status, const char *code, const char *message);
/* A JSON string from bytes that should be valid UTF-8 ("" when not). */
json_t *http_json_text(const char *b, size_t n);
/* OpenAI's usage object; cached_tokens (prompt tokens the prefix cache
 * resumed) goes in prompt_tokens_details as OpenAI reports its own cache. */
json_t *http_usage_json(int prompt_tokens, int completion_tokens, int cached_tokens);
/* queue_ms, time_to_first_token_ms (0 before a first token) and
 * tokens_per_second (the tokens after the first over the time since it). */
json_t *http_timing_json(double queue_seconds, double t_submit, double t_first, double t_last,
                         int completion_tokens);
/* One SSE chunk: chat: a delta with the role when with_role, and the
 * content unless it is the last (finish set) and empty; completions: the
 * text. finish NULL: finish_reason null. */
json_t *http_chunk_json(const gen_head *h, int with_role, const char *text, size_t len,
                        const char *finish);
/* A whole non-streamed reply (takes ownership of usage and timing). */
json_t *http_reply_json(const gen_head *h, const char *text, size_t len, const char *finish,
                        json_t *usage, json_t *timing);
/* ---- http_logprobs.c ---- */

/* A token's text: its bytes when they are whole UTF-8 characters, else
 * "bytes:\xNN..." (OpenAI's spelling); the end-of-text token "<|endoftext|>". */
json_t *http_token_string(const rp_tokenizer *tok, int32_t id);
void http_logprobs_init(http_logprobs *l, int chat);
void http_logprobs_free(http_logprobs *l);
/* Appends token id with its logprob (NULL: null, the first prompt token)
 * and up to top alternatives; completions' text_offset counts characters
 * (code points) of the choice's text. Returns 0, or -1 out of memory. */
int http_logprobs_add(http_logprobs *l, const rp_tokenizer *tok, int32_t id,
                      const rp_token_logprob *lp, int top);
/* The choice's text has n more bytes that no listed token spells. */
void http_logprobs_skip_text(http_logprobs *l, const char *text, size_t n);
/* The logprobs object so far (l keeps its offset and starts a new one). */
json_t *http_logprobs_take(http_logprobs *l);

/* Appends "data: JSON\n\n" to the buffer (takes ownership of event; NULL
 * is a failure). Returns 0, or -1 with the buffer as it was. */
int http_sse_event(char **buf, size_t *len, size_t *cap, json_t *event);

#endif
