/* The HTTP service of `rwkvpipe serve` on rank 0 (docs/serving.md):
 * OpenAI-compatible completions and chat completions
 * (JSON or Server-Sent Events), models, health, Prometheus metrics and
 * session save/load/delete, over libmicrohttpd, in front of the generation
 * engine (src/infer/engine.h). src/cli/cmd_serve.c starts it before running
 * the engine on the main thread and stops it after the engine returns.
 *
 * Threads: libmicrohttpd's event loop (epoll) on a small pool of threads
 * (http_threads); connections do not hold a thread. No handler ever waits
 * for the engine: a generation's connection is suspended while its job has
 * nothing to send, and resumed by the job's notification hook
 * (rp_job_set_notify) when tokens come or the job ends. Idle connections
 * time out (connection_timeout_s), a request must arrive whole within
 * request_timeout_s, and one client address may hold at most
 * max_connections_per_client connections, so slow or idle clients cannot
 * lock others out. A client that goes away is found when a write to it
 * fails (its job is then cancelled); end of input after a complete request
 * is not a disconnect (a half-closed client still gets its reply).
 * Session save/load/delete still wait for the engine's main thread (a state
 * copy or a file write) on a pool thread. */
#ifndef RP_SERVE_HTTP_H
#define RP_SERVE_HTTP_H

#include <stddef.h>

#include "core/error.h"
#include "text/tokenizer.h"
#include "infer/engine.h"

typedef struct {
    const char *host;          /* address to bind (default "127.0.0.1"; "::1", "0.0.0.0" ...) */
    int port;                  /* default 8000; 0 = any free port (see rp_http_port) */
    const char *api_key;       /* NULL or "": no authentication */
    const char *model_id;      /* the name of the served model (/v1/models, "model") */
    const char *session_dir;   /* session files live in it, created 0700 if missing
                                  (default "sessions"; src/infer/session_file.h) */
    int session_overwrite;     /* a save may replace a file that is not a session file */
    int max_session_files;     /* session files the directory may hold (default 1000; 0 = no
                                  cap): what clients can put on the disk */
    size_t max_body_bytes;     /* request body limit, 413 above (default 1 MiB) */
    int max_prompt_tokens;     /* 400 above (default 16384) */
    int max_tokens_limit;      /* max_tokens above it is a 400 (default 4096) */
    int default_max_tokens;    /* when a request gives none (default 256) */
    int max_connections;       /* open connections at once (default 256) */
    int max_connections_per_client; /* per client address; 0 = no cap; -1 = default:
                                     * max_connections / 4 (at least 1) */
    int connection_timeout_s;  /* an idle connection is closed after it (default 30; 0 = never) */
    int request_timeout_s;     /* headers and body must arrive within it (default 60; 0 = no
                                * deadline), counted from the connection's start or its
                                * previous reply */
    int http_threads;          /* libmicrohttpd's event-loop threads (default 4) */
    double drain_seconds;      /* after rp_http_begin_stop: keep answering 503 this long
                                * (default 5; see rp_http_drain) */
    /* Server errors, and one line per request when log_requests is set
     * (NULL: none). Called from connection threads; no newline in line. */
    void (*log)(void *user, const char *line);
    int log_requests;
    void *log_user;
} rp_http_config;

void rp_http_config_defaults(rp_http_config *c);

typedef struct rp_http_server rp_http_server;

/* Binds and starts serving (connection threads start now; generations wait
 * for the engine's main loop). The engine and tokenizer must outlive the
 * server. Fails with the address in the message (e.g. port in use). */
rp_status rp_http_start(rp_http_server **out, rp_engine *engine, const rp_tokenizer *tok,
                        const rp_http_config *cfg, rp_error *err);
/* The port actually bound (the chosen one when cfg->port was 0). */
int rp_http_port(const rp_http_server *s);
/* From now on every new request gets 503 with Retry-After (/health says
 * "stopping") and replies close their connection; records when, for the
 * drain. Async-signal-safe (a flag and the monotonic clock). */
void rp_http_begin_stop(rp_http_server *s);
/* Keeps the server listening, answering 503, until drain_seconds after
 * rp_http_begin_stop, and until the generations in flight have sent their
 * last bytes (at most drain_seconds + 5 s after it): clients and load
 * balancers learn that this server is going instead of finding it gone. */
void rp_http_drain(rp_http_server *s);
/* Stops accepting, ends what is left (generations still running are
 * cancelled and get their final bytes), closes every connection, frees.
 * Call after rp_engine_shutdown's jobs have ended (rp_engine_run returned). */
void rp_http_stop(rp_http_server *s);
/* The engine failed (a stage died or timed out): rp_http_stop then ends the
 * generations still running with an error carrying MESSAGE (a stream gets
 * an engine_failed error event, a reply 503), not as cancelled, so that a
 * client does not take a broken reply for a finished one. Call before it. */
void rp_http_fail(rp_http_server *s, const char *message);

#endif
