/* Request bodies -> validated generation requests (http_request.h). Every
 * field is type- and range-checked and every size is bounded before it is
 * used; a bad request is a 4xx with a message naming the field. */
#include "serve/http_request.h"
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

int rp_request_parse_generation(json_t *o, int chat, const rp_request_limits *lim,
                                rp_gen_request *r, rp_request_error *e) {
    memset(r, 0, sizeof *r);
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
    const char *model = NULL;
    if (get_string(o, "model", &model, e)) return -1;
    if (model && strcmp(model, lim->model_id) != 0)
        return rp_request_fail(e, 404, "model_not_found",
                               "model '%s' is not served here (this server has '%s')", model,
                               lim->model_id);
    long long n = 1;
    if (get_int(o, "n", 1, 1, &n, e)) return -1;
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
    } else if (chat) {
        r->stops[r->n_stops++] = "\n\n"; /* the end of a reply in the RWKV chat format */
    }
    for (int i = 0; i < r->n_stops; i++) {
        size_t len = strlen(r->stops[i]);
        if (len == 0 || len > RP_TEXT_MAX_STOP_BYTES)
            return rp_request_fail(e, 400, "invalid_value",
                                   "stop string %d has %zu bytes: expected 1 to %d", i, len,
                                   RP_TEXT_MAX_STOP_BYTES);
    }

    /* token lists: chat bans the end-of-text token, completions stop at it */
    int32_t eot = rp_tokenizer_eot_id(lim->tok);
    p->n_banned = 0;
    p->n_stop_tokens = 0;
    if (chat) p->banned[p->n_banned++] = eot;
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
        if (r < 0) {
            rp_request_fail(e, 400, "invalid_value",
                            "messages[%zu].role is '%s': expected 'system', 'user' or 'assistant'",
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
