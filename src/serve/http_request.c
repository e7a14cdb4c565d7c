/* Request bodies -> validated generation requests (http_request.h). Every
 * field is type- and range-checked and every size is bounded before it is
 * used; a bad request is a 4xx with a message naming the field. */
#include "serve/http_request.h"
#include "text/json_grammar.h"
#include "serve/chat.h"

#include "infer/session_file.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int rp_request_fail(rp_request_error *e, int status, const char *code, const char *fmt, ...) {
    e->status = status;
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

json_t *rp_request_parse_json(const char *body, size_t len, rp_request_error *e) {
    if (!body || len == 0) {
        rp_request_fail(e, 400, "invalid_json", "the request needs a JSON body");
        return NULL;
    }
    json_error_t jerr;
    json_t *o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!o) {
        rp_request_fail(e, 400, "invalid_json", "invalid JSON at line %d column %d: %s", jerr.line,
                        jerr.column, jerr.text);
        return NULL;
    }
    if (!json_is_object(o)) {
        json_decref(o);
        rp_request_fail(e, 400, "invalid_json", "the body must be a JSON object");
        return NULL;
    }
    return o;
}

int rp_session_name_valid(const char *name) {
    return rp_session_plain_name(name, RP_ENGINE_SESSION_NAME_MAX - 1);
}

/* Field getters: a missing field or JSON null leaves *out as it is. */
static int get_number(json_t *o, const char *key, double lo, double hi, double *out,
                      rp_request_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v))
        return rp_request_fail(e, 400, "invalid_type", "'%s' must be a number", key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return rp_request_fail(e, 400, "invalid_value", "'%s' is %g: expected a number in [%g, %g]",
                               key, x, lo, hi);
    *out = x;
    return 0;
}

static int get_int(json_t *o, const char *key, long long lo, long long hi, long long *out,
                   rp_request_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v))
        return rp_request_fail(e, 400, "invalid_type", "'%s' must be an integer", key);
    long long x = json_integer_value(v);
    if (x < lo || x > hi)
        return rp_request_fail(e, 400, "invalid_value",
                               "'%s' is %lld: expected an integer in [%lld, %lld]", key, x, lo, hi);
    *out = x;
    return 0;
}

static int get_bool(json_t *o, const char *key, int *out, rp_request_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v))
        return rp_request_fail(e, 400, "invalid_type", "'%s' must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

static int get_string(json_t *o, const char *key, const char **out, rp_request_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v))
        return rp_request_fail(e, 400, "invalid_type", "'%s' must be a string", key);
    *out = json_string_value(v);
    return 0;
}

static int get_token_list(json_t *o, const char *key, int vocab, int32_t *ids, int *n, int max,
                          rp_request_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_array(v))
        return rp_request_fail(e, 400, "invalid_type", "'%s' must be an array of token ids", key);
    size_t i;
    json_t *x;
    json_array_foreach(v, i, x) {
        if (!json_is_integer(x))
            return rp_request_fail(e, 400, "invalid_type", "'%s'[%zu] must be an integer token id",
                                   key, i);
        long long id = json_integer_value(x);
        if (id < 0 || id >= vocab)
            return rp_request_fail(e, 400, "invalid_value",
                                   "'%s'[%zu] is %lld: expected a token id in [0, %d)", key, i, id,
                                   vocab);
        int dup = 0;
        for (int k = 0; k < *n; k++) dup |= ids[k] == (int32_t)id;
        if (dup) continue;
        if (*n == max)
            return rp_request_fail(e, 400, "invalid_value",
                                   "'%s': at most %d token ids (with the defaults)", key, max);
        ids[(*n)++] = (int32_t)id;
    }
    return 0;
}

/* The fields a generation request may carry that this server does not
 * implement (docs/serving.md, "Request fields"). A field is refused only when
 * it asks for something: null, and the values that mean "off" (false, 0, 1,
 * "", {}, [], "none", {"type": "text"}) pass, because SDKs send those
 * defaults. Fields in neither this table nor the parser (a newer client's
 * extras such as "user", "metadata", "stream_options") are ignored. */
typedef enum {
    ASKS_SET,        /* any value but null */
    ASKS_TRUE,       /* true */
    ASKS_NONEMPTY,   /* a non-empty string, array or object */
    ASKS_ABOVE_ONE,  /* a number > 1 */
    ASKS_NOT_NONE,   /* anything but "none" */
    ASKS_NOT_TEXT    /* anything but {"type": "text"} */
} field_asks;

typedef struct {
    const char *name;
    int where;       /* 1: completions, 2: chat, 3: both */
    field_asks asks;
    const char *why;
} refused_field;

static const refused_field refused_fields[] = {
    {"tools", 3, ASKS_NONEMPTY, "tool calling is not supported"},
    {"functions", 3, ASKS_NONEMPTY, "function calling is not supported"},
    {"tool_choice", 3, ASKS_NOT_NONE, "tool calling is not supported"},
    {"function_call", 3, ASKS_NOT_NONE, "function calling is not supported"},
    {"best_of", 1, ASKS_ABOVE_ONE, "best_of > 1 is not supported"},
    {"suffix", 1, ASKS_NONEMPTY, "suffix (insertion) is not supported"},
    {"top_logprobs", 1, ASKS_SET, "top_logprobs is a chat field: completions take \"logprobs\": k"},
    {"audio", 2, ASKS_SET, "audio output is not supported"},
    {"prediction", 2, ASKS_SET, "predicted outputs are not supported"},
};

static int field_asks_for(json_t *v, field_asks asks) {
    if (!v || json_is_null(v)) return 0;
    switch (asks) {
    case ASKS_SET: return 1;
    case ASKS_TRUE: return !json_is_false(v);
    case ASKS_NONEMPTY:
        if (json_is_string(v)) return json_string_length(v) > 0;
        if (json_is_array(v)) return json_array_size(v) > 0;
        if (json_is_object(v)) return json_object_size(v) > 0;
        return 1;
    case ASKS_ABOVE_ONE: return !json_is_number(v) || json_number_value(v) != 1;
    case ASKS_NOT_NONE: return !(json_is_string(v) && strcmp(json_string_value(v), "none") == 0);
    case ASKS_NOT_TEXT: {
        json_t *t = json_is_object(v) ? json_object_get(v, "type") : NULL;
        return !(json_is_object(v) && json_object_size(v) == 1 && json_is_string(t) &&
                 strcmp(json_string_value(t), "text") == 0);
    }
    }
    return 1;
}

int rp_request_refused_field(json_t *o, int chat, rp_request_error *e) {
    for (size_t i = 0; i < sizeof refused_fields / sizeof refused_fields[0]; i++) {
        const refused_field *f = &refused_fields[i];
        if (!(f->where & (chat ? 2 : 1))) continue;
        if (field_asks_for(json_object_get(o, f->name), f->asks))
            return rp_request_fail(e, 400, "unsupported_field", "'%s': %s on this server",
                                   f->name, f->why);
    }
    return 0;
}

/* "model", when given, must name the served model (404 otherwise, as OpenAI). */
static int check_model(json_t *o, const rp_request_limits *lim, rp_request_error *e) {
    const char *model = NULL;
    if (get_string(o, "model", &model, e)) return -1;
    if (model && strcmp(model, lim->model_id) != 0)
        return rp_request_fail(e, 404, "model_not_found",
                               "model '%s' is not served here (this server has '%s')", model,
                               lim->model_id);
    return 0;
}

/* Completions: "logprobs": k (0..20) lists each token with its logprob and
 * the k most likely; "echo": true returns the prompt first (scored when
 * logprobs are asked). Chat: "logprobs": true, "top_logprobs": k. */
static int parse_logprobs(json_t *o, int chat, rp_gen_request *r, rp_request_error *e) {
    rp_gen_params *p = &r->params;
    long long k = -1;
    if (chat) {
        int on = 0;
        if (get_bool(o, "logprobs", &on, e)) return -1;
        if (get_int(o, "top_logprobs", 0, RP_LOGPROBS_MAX, &k, e)) return -1;
        if (k >= 0 && !on)
            return rp_request_fail(e, 400, "invalid_value",
                                   "'top_logprobs' needs \"logprobs\": true");
        p->logprobs = on;
        p->top_logprobs = k > 0 ? (int)k : 0;
        return 0;
    }
    if (get_int(o, "logprobs", 0, RP_LOGPROBS_MAX, &k, e)) return -1;
    if (get_bool(o, "echo", &r->echo, e)) return -1;
    p->logprobs = k >= 0;
    p->top_logprobs = k > 0 ? (int)k : 0;
    p->score_prompt = r->echo && p->logprobs;
    return 0;
}

/* "logit_bias": {"token id": bias in [-100, 100]}, added to the logits
 * before sampling (not to the reported logprobs). */
static int parse_logit_bias(json_t *o, const rp_request_limits *lim, rp_gen_params *p,
                            rp_request_error *e) {
    json_t *b = json_object_get(o, "logit_bias");
    p->n_bias = 0;
    if (!b || json_is_null(b)) return 0;
    if (!json_is_object(b))
        return rp_request_fail(e, 400, "invalid_type",
                               "'logit_bias' must be an object {\"token id\": bias}");
    if (json_object_size(b) > RP_ENGINE_MAX_BIAS)
        return rp_request_fail(e, 400, "invalid_value", "'logit_bias' has %zu entries: at most %d",
                               json_object_size(b), RP_ENGINE_MAX_BIAS);
    const char *key;
    json_t *v;
    json_object_foreach(b, key, v) {
        char *end = NULL;
        long id = strtol(key, &end, 10);
        if (!*key || *end || key[0] == '-' || key[0] == '+' || key[0] == ' ' || id < 0 ||
            id >= lim->vocab_size)
            return rp_request_fail(e, 400, "invalid_value",
                                   "'logit_bias' key '%.40s' is not a token id in [0, %d)", key,
                                   lim->vocab_size);
        if (!json_is_number(v))
            return rp_request_fail(e, 400, "invalid_type",
                                   "'logit_bias'['%s'] must be a number in [-100, 100]", key);
        double x = json_number_value(v);
        if (!(x >= -100 && x <= 100))
            return rp_request_fail(e, 400, "invalid_value",
                                   "'logit_bias'['%s'] is %g: expected a number in [-100, 100]",
                                   key, x);
        p->bias_ids[p->n_bias] = (int32_t)id;
        p->bias_values[p->n_bias++] = (float)x;
    }
    return 0;
}

/* Where the request body keeps the compact text of its response_format schema, so that
 * params.grammar_schema points into the JSON object like the request's other strings. */
#define SCHEMA_TEXT_KEY " rwkvpipe.schema_text"

/* "response_format": {"type": "text"} (none), {"type": "json_object"}, or {"type":
 * "json_schema", "json_schema": {"name", "schema", "strict"}}. The schema is compiled here
 * once so that an unsupported keyword is a 400 naming it. */
static int parse_response_format(json_t *o, rp_gen_params *p, rp_request_error *e) {
    json_t *rf = json_object_get(o, "response_format");
    p->grammar = RP_GRAMMAR_NONE;
    p->grammar_schema = NULL;
    if (!rf || json_is_null(rf)) return 0;
    json_t *type = json_object_get(rf, "type");
    if (!json_is_object(rf) || !json_is_string(type))
        return rp_request_fail(e, 400, "invalid_type", "'response_format' must be an object with "
                               "a \"type\": \"text\", \"json_object\" or \"json_schema\"");
    const char *t = json_string_value(type);
    if (strcmp(t, "text") == 0) return 0;
    if (strcmp(t, "json_object") == 0) {
        p->grammar = RP_GRAMMAR_JSON_OBJECT;
        return 0;
    }
    if (strcmp(t, "json_schema") != 0)
        return rp_request_fail(e, 400, "invalid_value", "'response_format'.type '%.40s' is not "
                               "one of text, json_object, json_schema", t);
    json_t *js = json_object_get(rf, "json_schema");
    json_t *schema = json_is_object(js) ? json_object_get(js, "schema") : NULL;
    if (!json_is_object(schema))
        return rp_request_fail(e, 400, "invalid_value", "'response_format': type json_schema "
                               "needs \"json_schema\": {\"name\": ..., \"schema\": {...}}");
    char *text = json_dumps(schema, JSON_COMPACT);
    if (!text) return rp_request_fail(e, 500, "internal", "out of memory");
    rp_json_grammar *g = NULL;
    rp_error err = {0};
    rp_status st = rp_json_grammar_schema(&g, text, strlen(text), &err);
    rp_json_grammar_free(g);
    int set = st == RP_OK ? json_object_set_new(o, SCHEMA_TEXT_KEY, json_string(text)) : 0;
    free(text);
    if (st != RP_OK)
        return rp_request_fail(e, 400, "unsupported_schema", "'response_format': %s", err.msg);
    if (set) return rp_request_fail(e, 500, "internal", "out of memory");
    p->grammar = RP_GRAMMAR_JSON_SCHEMA;
    p->grammar_schema = json_string_value(json_object_get(o, SCHEMA_TEXT_KEY));
    return 0;
}

int rp_request_parse_generation(json_t *o, int chat, const rp_request_limits *lim,
                                rp_gen_request *r, rp_request_error *e) {
    memset(r, 0, sizeof *r);
    if (rp_request_refused_field(o, chat, e)) return -1;
    rp_gen_params *p = &r->params;
    rp_gen_params_defaults(p);
    p->max_tokens = lim->default_max_tokens < lim->max_tokens_limit ? lim->default_max_tokens
                                                                    : lim->max_tokens_limit;
    if (chat) {
        /* the official chat demo's sampling (docs/rwkv7.md, Sampling) */
        p->sampler.top_p = 0.3f;
        p->presence_penalty = 0.5f;
        p->frequency_penalty = 0.5f;
        p->penalty_decay = 0.996f;
    }
    if (check_model(o, lim, e)) return -1;
    long long n = 1;
    if (get_int(o, "n", 1, RP_REQUEST_MAX_CHOICES, &n, e)) return -1;
    r->n = (int)n;
    long long max_tokens = p->max_tokens;
    json_t *mt = json_object_get(o, chat && json_object_get(o, "max_completion_tokens")
                                        ? "max_completion_tokens"
                                        : "max_tokens");
    if (mt && !json_is_null(mt)) {
        if (!json_is_integer(mt))
            return rp_request_fail(e, 400, "invalid_type", "'max_tokens' must be an integer");
        max_tokens = json_integer_value(mt);
        if (max_tokens < 0)
            return rp_request_fail(e, 400, "invalid_value", "'max_tokens' must not be negative");
        if (max_tokens > lim->max_tokens_limit)
            return rp_request_fail(e, 400, "max_tokens_too_large",
                                   "'max_tokens' is %lld: this server allows at most %d",
                                   max_tokens, lim->max_tokens_limit);
    }
    p->max_tokens = (int)max_tokens;
    double t = p->sampler.temperature, tp = p->sampler.top_p, pp = p->presence_penalty,
           fp = p->frequency_penalty, pd = p->penalty_decay;
    long long tk = p->sampler.top_k, seed = -1;
    if (get_number(o, "temperature", 0, 100, &t, e) || get_number(o, "top_p", 0, 1, &tp, e) ||
        get_int(o, "top_k", 0, 1 << 30, &tk, e) ||
        get_number(o, "presence_penalty", -100, 100, &pp, e) ||
        get_number(o, "frequency_penalty", -100, 100, &fp, e) ||
        get_number(o, "penalty_decay", 0, 1, &pd, e) ||
        get_int(o, "seed", 0, INT64_MAX, &seed, e) || get_bool(o, "stream", &r->stream, e) ||
        get_bool(o, "return_token_ids", &r->return_ids, e) ||
        get_string(o, "session", &r->session, e) ||
        get_string(o, "initial_state", &r->initial_state, e))
        return -1;
    if (tp == 0) tp = 1e-9; /* OpenAI clients send 0 for "most likely only" */
    p->sampler.temperature = (float)t;
    p->sampler.top_p = (float)tp;
    p->sampler.top_k = (int)tk;
    r->seed_given = seed >= 0;
    p->sampler.seed = seed >= 0 ? (uint64_t)seed : 0;
    p->presence_penalty = (float)pp;
    p->frequency_penalty = (float)fp;
    p->penalty_decay = (float)pd;
    if (r->session && !rp_session_name_valid(r->session))
        return rp_request_fail(
            e, 400, "invalid_value",
            "'session' must be 1 to %d letters, digits, '_', '-' or '.' (not first)",
            RP_ENGINE_SESSION_NAME_MAX - 1);
    if (r->initial_state && !rp_session_name_valid(r->initial_state))
        return rp_request_fail(e, 400, "invalid_value",
                               "'initial_state' is not a valid session name");

    if (parse_response_format(o, p, e)) return -1;

    /* stop strings */
    json_t *stop = json_object_get(o, "stop");
    if (stop && !json_is_null(stop)) {
        if (json_is_string(stop)) {
            r->stops[r->n_stops++] = json_string_value(stop);
        } else if (json_is_array(stop)) {
            size_t i;
            json_t *x;
            json_array_foreach(stop, i, x) {
                if (!json_is_string(x))
                    return rp_request_fail(e, 400, "invalid_type", "'stop'[%zu] must be a string",
                                           i);
                if (r->n_stops == RP_TEXT_MAX_STOPS)
                    return rp_request_fail(e, 400, "invalid_value", "'stop': at most %d strings",
                                           RP_TEXT_MAX_STOPS);
                r->stops[r->n_stops++] = json_string_value(x);
            }
        } else {
            return rp_request_fail(e, 400, "invalid_type",
                                   "'stop' must be a string or an array of strings");
        }
    } else if (chat && !p->grammar) {
        /* the end of a reply in the RWKV chat format (a JSON reply ends at its last byte, and
         * may hold a blank line between its tokens) */
        r->stops[r->n_stops++] = "\n\n";
    }
    for (int i = 0; i < r->n_stops; i++) {
        size_t len = strlen(r->stops[i]);
        if (len == 0 || len > RP_TEXT_MAX_STOP_BYTES)
            return rp_request_fail(e, 400, "invalid_value",
                                   "stop string %d has %zu bytes: expected 1 to %d", i, len,
                                   RP_TEXT_MAX_STOP_BYTES);
    }

    /* token lists: chat bans the end-of-text token, completions stop at it (and so does a
     * chat reply with a response_format: the token ends the document) */
    int32_t eot = rp_tokenizer_eot_id(lim->tok);
    p->n_banned = 0;
    p->n_stop_tokens = 0;
    if (chat && !p->grammar) p->banned[p->n_banned++] = eot;
    if (get_token_list(o, "ban_token_ids", lim->vocab_size, p->banned, &p->n_banned,
                       RP_ENGINE_MAX_BANNED, e))
        return -1;
    int eot_banned = 0;
    for (int i = 0; i < p->n_banned; i++) eot_banned |= p->banned[i] == eot;
    if (!eot_banned) p->stop_tokens[p->n_stop_tokens++] = eot;
    if (get_token_list(o, "stop_token_ids", lim->vocab_size, p->stop_tokens, &p->n_stop_tokens,
                       RP_ENGINE_MAX_STOP_TOKENS, e))
        return -1;
    /* A stop string that is one token stops in the engine: exact, and its
     * state is not one token past the reply. Text matching still catches it
     * when it is spelled with other tokens. */
    for (int i = 0; i < r->n_stops && p->n_stop_tokens < RP_ENGINE_MAX_STOP_TOKENS; i++) {
        int32_t *ids = NULL;
        size_t n_ids = 0;
        if (rp_tokenizer_encode(lim->tok, (const uint8_t *)r->stops[i], strlen(r->stops[i]), &ids,
                                &n_ids, NULL) == RP_OK &&
            n_ids == 1 && ids[0] < lim->vocab_size) {
            int known = 0;
            for (int k = 0; k < p->n_stop_tokens; k++) known |= p->stop_tokens[k] == ids[0];
            for (int k = 0; k < p->n_banned; k++) known |= p->banned[k] == ids[0];
            if (!known) p->stop_tokens[p->n_stop_tokens++] = ids[0];
        }
        free(ids);
    }
    if (parse_logprobs(o, chat, r, e) || parse_logit_bias(o, lim, p, e)) return -1;
    rp_error err;
    if (rp_gen_params_validate(p, lim->vocab_size, &err) != RP_OK)
        return rp_request_fail(e, 400, "invalid_value", "%s", err.msg);
    return 0;
}

/* Text of a chat message's content: a string or [{"type":"text","text":...}]. */
static int message_content(json_t *msg, size_t i, char **out, size_t *len, rp_request_error *e) {
    json_t *c = json_object_get(msg, "content");
    *out = NULL;
    *len = 0;
    if (!c || json_is_null(c)) return 0;
    if (json_is_string(c)) {
        *out = strndup(json_string_value(c), json_string_length(c));
        *len = json_string_length(c);
        return *out ? 0 : rp_request_fail(e, 500, "internal", "out of memory");
    }
    if (!json_is_array(c))
        return rp_request_fail(e, 400, "invalid_type",
                               "messages[%zu].content must be a string or an array "
                               "of text parts",
                               i);
    /* Parts are checked, then joined with one allocation. */
    size_t total = 0, k;
    json_t *part;
    json_array_foreach(c, k, part) {
        json_t *type = json_object_get(part, "type"), *text = json_object_get(part, "text");
        if (!json_is_object(part) || !json_is_string(type) ||
            strcmp(json_string_value(type), "text") != 0 || !json_is_string(text))
            return rp_request_fail(e, 400, "invalid_type",
                                   "messages[%zu].content[%zu] must be {\"type\": \"text\", "
                                   "\"text\": ...}",
                                   i, k);
        total += json_string_length(text);
    }
    *out = malloc(total + 1);
    if (!*out) return rp_request_fail(e, 500, "internal", "out of memory");
    json_array_foreach(c, k, part) {
        json_t *text = json_object_get(part, "text");
        memcpy(*out + *len, json_string_value(text), json_string_length(text));
        *len += json_string_length(text);
    }
    (*out)[*len] = '\0';
    return 0;
}

static char *chat_prompt_from(json_t *o, const char *lead, size_t *len, rp_request_error *e) {
    json_t *msgs = json_object_get(o, "messages");
    if (!msgs) return rp_request_fail(e, 400, "missing_field", "'messages' is required"), NULL;
    if (!json_is_array(msgs) || json_array_size(msgs) == 0)
        return rp_request_fail(e, 400, "invalid_type", "'messages' must be a non-empty array"),
               NULL;
    size_t n = json_array_size(msgs);
    if (n > RP_REQUEST_MAX_MESSAGES)
        return rp_request_fail(e, 400, "invalid_value", "%zu messages: at most %d", n,
                               RP_REQUEST_MAX_MESSAGES),
               NULL;
    rp_chat_message *m = calloc(n, sizeof *m);
    char **texts = calloc(n, sizeof *texts);
    char *prompt = NULL;
    if (!m || !texts) {
        rp_request_fail(e, 500, "internal", "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *msg = json_array_get(msgs, i);
        if (!json_is_object(msg)) {
            rp_request_fail(e, 400, "invalid_type", "messages[%zu] must be an object", i);
            goto done;
        }
        json_t *role = json_object_get(msg, "role");
        if (!json_is_string(role)) {
            rp_request_fail(e, 400, "invalid_type", "messages[%zu].role must be a string", i);
            goto done;
        }
        int r = rp_chat_role_parse(json_string_value(role));
        if (r < 0 && (strcmp(json_string_value(role), "tool") == 0 ||
                      strcmp(json_string_value(role), "function") == 0)) {
            rp_request_fail(e, 400, "unsupported_field",
                            "messages[%zu].role is '%s': tool calling is not supported on this "
                            "server",
                            i, json_string_value(role));
            goto done;
        }
        if (r < 0) {
            rp_request_fail(e, 400, "invalid_value",
                            "messages[%zu].role is '%s': expected 'system', 'developer', 'user' "
                            "or 'assistant'",
                            i, json_string_value(role));
            goto done;
        }
        size_t cl;
        if (message_content(msg, i, &texts[i], &cl, e)) goto done;
        m[i] = (rp_chat_message){(rp_chat_role)r, texts[i], cl};
    }
    prompt = rp_chat_prompt(m, (int)n, lead, len);
    if (!prompt) rp_request_fail(e, 500, "internal", "out of memory");
done:
    if (texts)
        for (size_t i = 0; i < n; i++) free(texts[i]);
    free(texts);
    free(m);
    return prompt;
}

/* "prompt" of a completion: a string (or one string in an array), or an
 * array of token ids. */
static int completion_prompt(json_t *o, const rp_request_limits *lim, char **text, size_t *text_len,
                             int32_t **ids, size_t *n_ids, rp_request_error *e) {
    json_t *pj = json_object_get(o, "prompt");
    if (json_is_array(pj) && json_array_size(pj) == 1 && json_is_string(json_array_get(pj, 0)))
        pj = json_array_get(pj, 0);
    if (!pj || json_is_null(pj))
        return rp_request_fail(e, 400, "missing_field", "'prompt' is required");
    if (json_is_string(pj)) {
        *text_len = json_string_length(pj);
        *text = malloc(*text_len + 1);
        if (!*text) return rp_request_fail(e, 500, "internal", "out of memory");
        memcpy(*text, json_string_value(pj), *text_len + 1);
        return 0;
    }
    if (!json_is_array(pj))
        return rp_request_fail(e, 400, "invalid_type",
                               "'prompt' must be a string or an array of token ids");
    /* token ids (the OpenAI API allows them): taken as they are */
    *n_ids = json_array_size(pj);
    *ids = malloc((*n_ids ? *n_ids : 1) * sizeof **ids);
    if (!*ids) return rp_request_fail(e, 500, "internal", "out of memory");
    for (size_t i = 0; i < *n_ids; i++) {
        json_t *x = json_array_get(pj, i);
        if (!json_is_integer(x) || json_integer_value(x) < 0 ||
            json_integer_value(x) >= lim->vocab_size)
            return rp_request_fail(e, 400, "invalid_value",
                                   "'prompt'[%zu] must be a token id in [0, %d) (or give one "
                                   "string)",
                                   i, lim->vocab_size);
        (*ids)[i] = (int32_t)json_integer_value(x);
    }
    /* the text those ids stand for (the session table needs its end) */
    uint8_t *bytes = NULL;
    size_t n_bytes = 0;
    if (*n_ids > 0 &&
        rp_tokenizer_decode(lim->tok, *ids, *n_ids, &bytes, &n_bytes, NULL) == RP_OK) {
        *text = (char *)bytes;
        *text_len = n_bytes;
        return 0;
    }
    free(bytes);
    *text = strdup(""); /* ids the tokenizer cannot spell (padding) */
    *text_len = 0;
    return *text ? 0 : rp_request_fail(e, 500, "internal", "out of memory");
}

int rp_request_prompt(json_t *o, int chat, const char *lead, const rp_request_limits *lim,
                      char **text, size_t *text_len, int32_t **ids, size_t *n_ids,
                      rp_request_error *e) {
    *text = NULL;
    *text_len = 0;
    *ids = NULL;
    *n_ids = 0;
    int r = 0;
    if (chat) {
        *text = chat_prompt_from(o, lead ? lead : "", text_len, e);
        if (!*text) r = -1;
    } else {
        r = completion_prompt(o, lim, text, text_len, ids, n_ids, e);
    }
    if (r == 0 && *text_len == 0 && *n_ids == 0)
        r = rp_request_fail(e, 400, "invalid_value", "the prompt is empty");
    rp_error err;
    if (r == 0 && !*ids &&
        rp_tokenizer_encode(lim->tok, (const uint8_t *)*text, *text_len, ids, n_ids, &err) != RP_OK)
        r = rp_request_fail(e, 400, "invalid_value", "cannot tokenize the prompt: %s", err.msg);
    /* The one prompt-length check, for text, token ids and chat alike: here
     * the token count is first known (after tokenizing) together with the
     * server's limit, with nothing to undo yet. Nothing after it checks the
     * length again: http.c submits what this returns, and the engine takes
     * a prompt of any length (an RWKV state has no context window; the limit
     * only bounds what one request may cost). */
    if (r == 0 && *n_ids > (size_t)lim->max_prompt_tokens)
        r = rp_request_fail(e, 400, "context_length_exceeded",
                            "the prompt has %zu tokens: this server allows at most %d", *n_ids,
                            lim->max_prompt_tokens);
    for (size_t i = 0; r == 0 && i < *n_ids; i++)
        if ((*ids)[i] < 0 || (*ids)[i] >= lim->vocab_size)
            r = rp_request_fail(e, 400, "invalid_value",
                                "prompt token %d is outside the model's vocabulary", (*ids)[i]);
    if (r != 0) {
        free(*text);
        free(*ids);
        *text = NULL;
        *ids = NULL;
        *text_len = *n_ids = 0;
    }
    return r;
}

void rp_request_prompts_free(rp_request_prompt_list *l) {
    for (int i = 0; i < l->n; i++) {
        if (l->texts) free(l->texts[i]);
        if (l->ids) free(l->ids[i]);
    }
    free(l->texts);
    free(l->text_lens);
    free(l->ids);
    free(l->n_ids);
    memset(l, 0, sizeof *l);
}

int rp_request_prompts(json_t *o, const rp_request_limits *lim, rp_request_prompt_list *out,
                       rp_request_error *e) {
    memset(out, 0, sizeof *out);
    json_t *pj = json_object_get(o, "prompt");
    json_t *first = json_is_array(pj) ? json_array_get(pj, 0) : NULL;
    /* a batch: an array of strings and / or token-id arrays (more than one
     * string, or any token-id array) */
    const int batch = json_is_array(pj) && json_array_size(pj) > 0 &&
                      (json_is_array(first) || (json_is_string(first) && json_array_size(pj) > 1));
    const size_t n = batch ? json_array_size(pj) : 1;
    if (n > RP_REQUEST_MAX_CHOICES)
        return rp_request_fail(e, 400, "invalid_value", "'prompt' has %zu prompts: at most %d",
                               n, RP_REQUEST_MAX_CHOICES);
    out->texts = calloc(n, sizeof *out->texts);
    out->text_lens = calloc(n, sizeof *out->text_lens);
    out->ids = calloc(n, sizeof *out->ids);
    out->n_ids = calloc(n, sizeof *out->n_ids);
    if (!out->texts || !out->text_lens || !out->ids || !out->n_ids) {
        rp_request_prompts_free(out);
        return rp_request_fail(e, 500, "internal", "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        json_t *one = o;
        if (batch) {
            json_t *x = json_array_get(pj, i);
            if (!json_is_string(x) && !json_is_array(x)) {
                rp_request_prompts_free(out);
                return rp_request_fail(e, 400, "invalid_type",
                                       "'prompt'[%zu] must be a string or an array of token ids "
                                       "(a batch of prompts)", i);
            }
            one = json_pack("{s:O}", "prompt", x);
            if (!one) {
                rp_request_prompts_free(out);
                return rp_request_fail(e, 500, "internal", "out of memory");
            }
        }
        int r = rp_request_prompt(one, 0, "", lim, &out->texts[i], &out->text_lens[i],
                                  &out->ids[i], &out->n_ids[i], e);
        if (batch) json_decref(one);
        out->n = (int)i + (r == 0);
        if (r != 0) {
            rp_request_prompts_free(out);
            if (batch) {
                char m[sizeof e->message];
                snprintf(m, sizeof m, "%s", e->message);
                snprintf(e->message, sizeof e->message, "prompt %zu of the batch: %.*s", i,
                         (int)(sizeof e->message - 48), m);
            }
            return -1;
        }
    }
    return 0;
}

int rp_request_session_file(json_t *o, const char **name, rp_request_error *e) {
    *name = NULL;
    if (!o)
        return rp_request_fail(e, 400, "missing_field",
                               "the body must be {\"path\": \"NAME.state\"}");
    if (get_string(o, "path", name, e)) return -1;
    if (!*name || !**name) return rp_request_fail(e, 400, "missing_field", "'path' is required");
    if (!rp_session_file_name_valid(*name))
        return rp_request_fail(e, 400, "invalid_value",
                               "'path' must be a file name in the session directory: 1 to %d "
                               "letters, digits, '_', '-' or '.', not starting with '.', ending "
                               "in \"%s\" (no '/')",
                               RP_SESSION_FILE_NAME_MAX, RP_SESSION_FILE_SUFFIX);
    return 0;
}

/* ---- tokenizer endpoints (lm-evaluation-harness's RemoteTokenizer) ---- */

#define EOT_TEXT "<|endoftext|>"

const char *rp_request_eot_text(const rp_tokenizer *tok, size_t *len) {
    (void)tok; /* the byte tokenizer's token 0 is the byte 0, which JSON text cannot carry */
    *len = sizeof EOT_TEXT - 1;
    return EOT_TEXT;
}

/* Appends the ids of n bytes of text to *ids (capacity *cap). */
static int append_encoded(const rp_request_limits *lim, const char *text, size_t n, int32_t **ids,
                          size_t *n_ids, size_t *cap, rp_request_error *e) {
    if (n == 0) return 0;
    int32_t *part = NULL;
    size_t n_part = 0;
    rp_error err;
    if (rp_tokenizer_encode(lim->tok, (const uint8_t *)text, n, &part, &n_part, &err) != RP_OK)
        return rp_request_fail(e, 400, "invalid_value", "cannot tokenize 'prompt': %s", err.msg);
    if (*n_ids + n_part > *cap) {
        size_t c = (*n_ids + n_part) * 2;
        int32_t *grown = realloc(*ids, c * sizeof *grown);
        if (!grown) {
            free(part);
            return rp_request_fail(e, 500, "internal", "out of memory");
        }
        *ids = grown;
        *cap = c;
    }
    memcpy(*ids + *n_ids, part, n_part * sizeof *part);
    *n_ids += n_part;
    free(part);
    return 0;
}

int rp_request_tokenize(json_t *o, const rp_request_limits *lim, int32_t **ids, size_t *n_ids,
                        rp_request_error *e) {
    *ids = NULL;
    *n_ids = 0;
    if (check_model(o, lim, e)) return -1;
    json_t *p = json_object_get(o, "prompt");
    if (!p || json_is_null(p))
        return rp_request_fail(e, 400, "missing_field", "'prompt' is required (a string)");
    if (!json_is_string(p)) return rp_request_fail(e, 400, "invalid_type", "'prompt' must be a string");
    int add_special = 0;
    if (get_bool(o, "add_special_tokens", &add_special, e)) return -1;
    /* RWKV adds no special tokens, so add_special_tokens changes nothing. The
     * end-of-text token is spelled EOT_TEXT (as Hugging Face tokenizers spell
     * special tokens); the encoder never produces it. */
    const char *text = json_string_value(p);
    size_t len = json_string_length(p), eot_len, cap = 0;
    const char *eot = rp_request_eot_text(lim->tok, &eot_len);
    size_t start = 0;
    for (size_t i = 0; i + eot_len <= len;) {
        if (memcmp(text + i, eot, eot_len) != 0) {
            i++;
            continue;
        }
        if (append_encoded(lim, text + start, i - start, ids, n_ids, &cap, e)) goto fail;
        int32_t id = rp_tokenizer_eot_id(lim->tok);
        if (*n_ids + 1 > cap) {
            size_t c = (*n_ids + 1) * 2;
            int32_t *grown = realloc(*ids, c * sizeof *grown);
            if (!grown) {
                rp_request_fail(e, 500, "internal", "out of memory");
                goto fail;
            }
            *ids = grown;
            cap = c;
        }
        (*ids)[(*n_ids)++] = id;
        i += eot_len;
        start = i;
    }
    if (append_encoded(lim, text + start, len - start, ids, n_ids, &cap, e)) goto fail;
    if (!*ids) *ids = malloc(sizeof **ids); /* an empty prompt: zero tokens, a valid pointer */
    if (!*ids) return rp_request_fail(e, 500, "internal", "out of memory");
    return 0;
fail:
    free(*ids);
    *ids = NULL;
    *n_ids = 0;
    return -1;
}

int rp_request_detokenize(json_t *o, const rp_request_limits *lim, char **text, size_t *len,
                          rp_request_error *e) {
    *text = NULL;
    *len = 0;
    json_t *t = json_object_get(o, "tokens");
    if (!t || json_is_null(t))
        return rp_request_fail(e, 400, "missing_field", "'tokens' is required (an array of token ids)");
    if (!json_is_array(t))
        return rp_request_fail(e, 400, "invalid_type", "'tokens' must be an array of token ids");
    size_t i, total = 0, eot_len;
    json_t *x;
    const char *eot = rp_request_eot_text(lim->tok, &eot_len);
    int32_t eot_id = rp_tokenizer_eot_id(lim->tok);
    json_array_foreach(t, i, x) {
        if (!json_is_integer(x) || json_integer_value(x) < 0 ||
            json_integer_value(x) >= lim->vocab_size)
            return rp_request_fail(e, 400, "invalid_value",
                                   "'tokens'[%zu] must be a token id in [0, %d)", i,
                                   lim->vocab_size);
        size_t n = 0;
        int32_t id = (int32_t)json_integer_value(x);
        if (id == eot_id) n = eot_len;
        else rp_tokenizer_token_bytes(lim->tok, id, &n); /* padding ids spell nothing */
        total += n;
    }
    *text = malloc(total + 1);
    if (!*text) return rp_request_fail(e, 500, "internal", "out of memory");
    json_array_foreach(t, i, x) {
        size_t n = 0;
        int32_t id = (int32_t)json_integer_value(x);
        const char *b = id == eot_id ? eot : (const char *)rp_tokenizer_token_bytes(lim->tok, id, &n);
        if (id == eot_id) n = eot_len;
        if (b) memcpy(*text + *len, b, n);
        *len += b ? n : 0;
    }
    (*text)[*len] = '\0';
    return 0;
}
