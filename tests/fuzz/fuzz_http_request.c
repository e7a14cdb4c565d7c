/* libFuzzer target: the HTTP service's request parsing
 * (src/serve/http_request.c), the first code every client byte reaches
 * after libmicrohttpd. Input = a request body: it is parsed as JSON and, as
 * the server does, read as a completion, a chat completion and a session
 * file request, with small limits so the length checks are reached. Any
 * accepted request must satisfy what the engine relies on. */
#include <stdlib.h>
#include <string.h>

#include "serve/http_request.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static rp_tokenizer *tok;
    if (!tok) {
        rp_error err;
        if (rp_tokenizer_open(&tok, "bytes", &err) != RP_OK) abort();
    }
    const rp_request_limits lim = {.model_id = "fuzz",
                                   .vocab_size = 300, /* padding ids past the tokenizer's 256 */
                                   .default_max_tokens = 256,
                                   .max_tokens_limit = 64,
                                   .max_prompt_tokens = 512,
                                   .tok = tok};
    rp_request_error e;
    json_t *o = rp_request_parse_json((const char *)data, size, &e);
    if (!o) {
        if (e.status != 400) abort();
        return 0;
    }
    for (int chat = 0; chat < 2; chat++) {
        rp_gen_request r;
        if (rp_request_parse_generation(o, chat, &lim, &r, &e) != 0) {
            if (e.status < 400 || e.status > 500) abort();
            continue;
        }
        rp_error err;
        if (rp_gen_params_validate(&r.params, lim.vocab_size, &err) != RP_OK) abort();
        if (r.params.max_tokens < 0 || r.params.max_tokens > lim.max_tokens_limit) abort();
        for (int i = 0; i < r.n_stops; i++)
            if (!r.stops[i] || strlen(r.stops[i]) == 0 || strlen(r.stops[i]) > RP_TEXT_MAX_STOP_BYTES)
                abort();
        if (r.session && !rp_session_name_valid(r.session)) abort();
        char *text;
        int32_t *ids;
        size_t text_len, n_ids;
        if (rp_request_prompt(o, chat, chat ? "\n\n" : "", &lim, &text, &text_len, &ids, &n_ids,
                              &e) != 0) {
            if (e.status < 400 || e.status > 500) abort();
            continue;
        }
        if (n_ids == 0 || n_ids > (size_t)lim.max_prompt_tokens) abort();
        for (size_t i = 0; i < n_ids; i++)
            if (ids[i] < 0 || ids[i] >= lim.vocab_size) abort();
        free(text);
        free(ids);
    }
    const char *name;
    if (rp_request_session_file(o, &name, &e) == 0 && !name) abort();
    json_decref(o);
    return 0;
}
