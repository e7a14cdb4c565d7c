/* Request bodies of the HTTP service -> validated generation requests.
 * Pure: a body, the server's limits and its tokenizer in; a request or a
 * 4xx/5xx error (status, code, message) out. No server, engine, socket or
 * lock, so the parsing is unit-tested (tests/test_http_request.c) and fuzzed
 * (tests/fuzz/fuzz_http_request.c) on its own; src/serve/http.c calls it. */
#ifndef RP_SERVE_HTTP_REQUEST_H
#define RP_SERVE_HTTP_REQUEST_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "text/tokenizer.h"
#include "infer/engine.h"
#include "text/stream.h"

#define RP_REQUEST_MAX_MESSAGES 4096
#define RP_REQUEST_MAX_CHOICES 64   /* prompts x n of one request */

/* What a request may ask of this server. */
typedef struct {
    const char *model_id;   /* a request's "model" must be this (or absent) */
    int vocab_size;         /* token ids are in [0, vocab_size) */
    int default_max_tokens; /* when a request gives none (capped at max_tokens_limit) */
    int max_tokens_limit;
    int max_prompt_tokens;
    const rp_tokenizer *tok;
} rp_request_limits;

/* A problem with a request: the HTTP status, a short code for clients to
 * switch on ("invalid_type", ...) and a message naming the field. */
typedef struct {
    int status;
    const char *code;
    char message[RP_ERROR_MSG_LEN + 256];
} rp_request_error;

/* Sets e and returns -1. */
int rp_request_fail(rp_request_error *e, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The body as a JSON object (duplicate keys refused). NULL with e set
 * (400 invalid_json) otherwise; the caller json_decref's the result. */
json_t *rp_request_parse_json(const char *body, size_t len, rp_request_error *e);

/* A field of a generation request that this server does not implement,
 * used (docs/serving.md, "Request fields"): 400 "unsupported_field" naming
 * it. Returns 0 when none; -1 with e set. rp_request_parse_generation calls
 * it first. */
int rp_request_refused_field(json_t *o, int chat, rp_request_error *e);

/* The fields of a generation request common to both endpoints. Strings
 * point into the JSON object the request was parsed from. */
typedef struct {
    rp_gen_params params;
    int seed_given; /* "seed" was sent; else params.sampler.seed is 0: the caller
                     * draws one */
    const char *stops[RP_TEXT_MAX_STOPS];
    int n_stops;
    int stream, return_ids;
    int echo;       /* completions: the reply's text (and logprobs) start with the prompt */
    int n;          /* choices per prompt (1..RP_REQUEST_MAX_CHOICES) */
    const char *session, *initial_state; /* NULL when absent; valid session names */
} rp_gen_request;

/* Sampling, limits, stop strings and tokens, sessions of a completion
 * (chat = 0) or chat completion (chat = 1) request. Chat gets the official
 * chat demo's sampling and "\n\n" as its stop unless the request says
 * otherwise. Returns 0, or -1 with e set. */
int rp_request_parse_generation(json_t *o, int chat, const rp_request_limits *lim,
                                rp_gen_request *r, rp_request_error *e);

/* The prompt of a request as text and as token ids, both owned by the
 * caller (free): chat: "messages" in the RWKV chat format, after `lead`
 * (what continues a stored session; "" otherwise); completions: "prompt",
 * a string, a one-string array, or an array of token ids (taken as they
 * are; *text is then their decoded bytes, "" when they spell nothing).
 * Refuses an empty prompt, one over lim->max_prompt_tokens and ids outside
 * the vocabulary. Returns 0, or -1 with e set and nothing to free. */
int rp_request_prompt(json_t *o, int chat, const char *lead, const rp_request_limits *lim,
                      char **text, size_t *text_len, int32_t **ids, size_t *n_ids,
                      rp_request_error *e);

/* The prompts of a completion request: "prompt" as one prompt (a string,
 * a one-string array, an array of token ids) or a batch (an array of
 * strings and / or arrays of token ids: one choice each, in order). Each is
 * checked as rp_request_prompt checks one; an error names the prompt
 * ("prompt 2 of the batch: ..."). Free with rp_request_prompts_free. */
typedef struct {
    int n;
    char **texts;
    size_t *text_lens;
    int32_t **ids;
    size_t *n_ids;
} rp_request_prompt_list;
int rp_request_prompts(json_t *o, const rp_request_limits *lim, rp_request_prompt_list *out,
                       rp_request_error *e);
void rp_request_prompts_free(rp_request_prompt_list *l);

/* The tokenizer endpoints, in the shapes of vLLM that lm-evaluation-harness's
 * RemoteTokenizer reads (docs/serving.md). The end-of-text token's text:
 * "<|endoftext|>" (the World vocabulary's token 0 has no bytes, the byte
 * tokenizer's is the byte 0, which JSON text cannot carry), which /tokenize
 * reads back as that token. */
const char *rp_request_eot_text(const rp_tokenizer *tok, size_t *len);
/* POST /tokenize {"prompt": text, "add_special_tokens": bool, "model"}: the
 * ids (malloc'ed, also for zero tokens). 0, or -1 with e set. */
int rp_request_tokenize(json_t *o, const rp_request_limits *lim, int32_t **ids, size_t *n_ids,
                        rp_request_error *e);
/* POST /detokenize {"tokens": [ids]}: the text (malloc'ed, NUL-terminated);
 * ids in the model's vocabulary that spell nothing (padding) add nothing. */
int rp_request_detokenize(json_t *o, const rp_request_limits *lim, char **text, size_t *len,
                          rp_request_error *e);

/* The body of POST /v1/sessions/NAME/{save,load}: {"path": "FILE.state"},
 * a plain file name in the session directory (rp_session_file_name_valid).
 * *name points into o. Returns 0, or -1 with e set. */
int rp_request_session_file(json_t *o, const char **name, rp_request_error *e);

/* A session name: 1 to RP_ENGINE_SESSION_NAME_MAX - 1 letters, digits,
 * '_', '-' or '.', not starting with '.'. */
int rp_session_name_valid(const char *name);

#endif
