/* The HTTP service of `rwkvpipe serve` on rank 0 (DESIGN.md section 6,
 * docs/serving.md): OpenAI-compatible completions and chat completions
 * (JSON or Server-Sent Events), models, health, Prometheus metrics and
 * session save/load/delete, over libmicrohttpd, in front of the generation
 * engine (src/serve/engine.h). src/cli/cmd_serve.c starts it before running
 * the engine on the main thread and stops it after the engine returns.
 *
 * Threads: one libmicrohttpd thread per connection. The engine's client API
 * is blocking (rp_job_read waits for tokens with a timeout), so a handler
 * simply waits for its job in its own thread: a non-streamed request blocks
 * in its handler, a streamed one in the response's content callback, and both
 * poll the socket while they wait so a client that goes away cancels its job
 * (its slot is freed) without waiting for the next token. The number of
 * connections is capped (max_connections), so threads stay bounded; the
 * engine's queue limit answers 429 before that. */
#ifndef RP_SERVE_HTTP_H
#define RP_SERVE_HTTP_H

#include <stddef.h>

#include "core/error.h"
#include "infer/tokenizer.h"
#include "serve/engine.h"

typedef struct {
    const char *host;          /* address to bind (default "127.0.0.1"; "::1", "0.0.0.0" ...) */
    int port;                  /* default 8000; 0 = any free port (see rp_http_port) */
    const char *api_key;       /* NULL or "": no authentication */
    const char *model_id;      /* the name of the served model (/v1/models, "model") */
    const char *session_dir;   /* session files live in it, created 0700 if missing
                                  (default "sessions"; src/serve/session_file.h) */
    int session_overwrite;     /* a save may replace a file that is not a session file */
    size_t max_body_bytes;     /* request body limit, 413 above (default 1 MiB) */
    int max_prompt_tokens;     /* 400 above (default 16384) */
    int max_tokens_limit;      /* max_tokens above it is a 400 (default 4096) */
    int default_max_tokens;    /* when a request gives none (default 256) */
    int max_connections;       /* open connections (threads) at once (default 256) */
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
/* From now on new requests get 503 and waiting generations give up soon
 * after their job; async-signal-safe (only sets a flag). */
void rp_http_begin_stop(rp_http_server *s);
/* Stops accepting, waits for every connection thread (their jobs must have
 * ended or been cancelled: call after rp_engine_shutdown), frees. */
void rp_http_stop(rp_http_server *s);

#endif
