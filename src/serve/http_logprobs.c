/* The logprobs of a choice, in OpenAI's shapes (docs/serving.md, Logprobs):
 * completions {tokens, token_logprobs, top_logprobs, text_offset}, chat
 * {content: [{token, logprob, bytes, top_logprobs}]}. Pure (a tokenizer and
 * numbers in, JSON out): unit-tested in tests/test_http_stream.c. */
#include "serve/http_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EOT_TEXT "<|endoftext|>"

/* Is b[0..n) whole UTF-8 characters (no overlong forms, surrogates or
 * values past U+10FFFF)? */
static int utf8_whole(const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n;) {
        const uint8_t c = b[i];
        size_t k;
        if (c < 0x80) k = 0;
        else if (c >= 0xC2 && c <= 0xDF) k = 1;
        else if ((c & 0xF0) == 0xE0) k = 2;
        else if (c >= 0xF0 && c <= 0xF4) k = 3;
        else return 0;
        if (k > n - 1 - i) return 0;
        for (size_t j = 1; j <= k; j++)
            if ((b[i + j] & 0xC0) != 0x80) return 0;
        if (k == 2 && ((c == 0xE0 && b[i + 1] < 0xA0) || (c == 0xED && b[i + 1] >= 0xA0))) return 0;
        if (k == 3 && ((c == 0xF0 && b[i + 1] < 0x90) || (c == 0xF4 && b[i + 1] >= 0x90))) return 0;
        i += k + 1;
    }
    return 1;
}

json_t *http_token_string(const rp_tokenizer *tok, int32_t id) {
    if (id == rp_tokenizer_eot_id(tok)) return json_string(EOT_TEXT);
    size_t n = 0;
    const uint8_t *b = rp_tokenizer_token_bytes(tok, id, &n);
    if (!b) n = 0;
    if (utf8_whole(b, n)) return json_stringn((const char *)b, n);
    /* part of a character: spelled byte by byte, as OpenAI spells such tokens */
    char *s = malloc(6 + 4 * n + 1);
    if (!s) return json_string("");
    size_t o = (size_t)sprintf(s, "bytes:");
    for (size_t i = 0; i < n; i++) o += (size_t)sprintf(s + o, "\\x%02x", b[i]);
    json_t *j = json_stringn(s, o);
    free(s);
    return j ? j : json_string("");
}

static json_t *token_bytes_json(const rp_tokenizer *tok, int32_t id) {
    size_t n = 0;
    const uint8_t *b = NULL;
    if (id == rp_tokenizer_eot_id(tok)) b = (const uint8_t *)EOT_TEXT, n = sizeof EOT_TEXT - 1;
    else b = rp_tokenizer_token_bytes(tok, id, &n);
    json_t *a = json_array();
    for (size_t i = 0; a && b && i < n; i++) json_array_append_new(a, json_integer(b[i]));
    return a;
}

/* Characters (UTF-8 lead bytes and invalid bytes) in b[0..n). */
static size_t utf8_chars(const uint8_t *b, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += (b[i] & 0xC0) != 0x80;
    return c;
}

void http_logprobs_init(http_logprobs *l, int chat) {
    memset(l, 0, sizeof *l);
    l->chat = chat;
}

void http_logprobs_free(http_logprobs *l) {
    json_decref(l->tokens);
    json_decref(l->token_logprobs);
    json_decref(l->top_logprobs);
    json_decref(l->text_offset);
    json_decref(l->content);
    l->tokens = l->token_logprobs = l->top_logprobs = l->text_offset = l->content = NULL;
}

int http_logprobs_add(http_logprobs *l, const rp_tokenizer *tok, int32_t id,
                      const rp_token_logprob *lp, int top) {
    size_t n = 0;
    const uint8_t *b = rp_tokenizer_token_bytes(tok, id, &n);
    if (!b || id == rp_tokenizer_eot_id(tok)) n = 0;
    if (top > (lp ? lp->n_top : 0)) top = lp ? lp->n_top : 0;
    if (l->chat) {
        if (!l->content && !(l->content = json_array())) return -1;
        json_t *tops = json_array();
        for (int i = 0; tops && i < top; i++)
            json_array_append_new(tops, json_pack("{s:o,s:f,s:o}", "token",
                                                  http_token_string(tok, lp->top_ids[i]),
                                                  "logprob", (double)lp->top_logprobs[i], "bytes",
                                                  token_bytes_json(tok, lp->top_ids[i])));
        json_t *e = json_pack("{s:o,s:f,s:o,s:o}", "token", http_token_string(tok, id), "logprob",
                              lp ? (double)lp->logprob : 0.0, "bytes", token_bytes_json(tok, id),
                              "top_logprobs", tops);
        return e ? json_array_append_new(l->content, e) : -1;
    }
    if (!l->tokens) {
        l->tokens = json_array();
        l->token_logprobs = json_array();
        l->top_logprobs = json_array();
        l->text_offset = json_array();
        if (!l->tokens || !l->token_logprobs || !l->top_logprobs || !l->text_offset) return -1;
    }
    json_t *tops = json_null();
    if (lp) {
        tops = json_object();
        /* two tokens may spell the same text: the more likely one is kept */
        for (int i = 0; tops && i < top; i++) {
            json_t *k = http_token_string(tok, lp->top_ids[i]);
            const char *key = json_string_value(k);
            if (key && !json_object_get(tops, key))
                json_object_set_new(tops, key, json_real(lp->top_logprobs[i]));
            json_decref(k);
        }
    }
    json_array_append_new(l->tokens, http_token_string(tok, id));
    json_array_append_new(l->token_logprobs, lp ? json_real(lp->logprob) : json_null());
    json_array_append_new(l->top_logprobs, tops);
    json_array_append_new(l->text_offset, json_integer((json_int_t)l->offset));
    l->offset += utf8_chars(b, n);
    return 0;
}

void http_logprobs_skip_text(http_logprobs *l, const char *text, size_t n) {
    l->offset += utf8_chars((const uint8_t *)text, n);
}

json_t *http_logprobs_take(http_logprobs *l) {
    json_t *o;
    if (l->chat) {
        o = json_pack("{s:o}", "content", l->content ? l->content : json_array());
        l->content = NULL;
    } else {
        o = json_pack("{s:o,s:o,s:o,s:o}", "tokens", l->tokens ? l->tokens : json_array(),
                      "token_logprobs", l->token_logprobs ? l->token_logprobs : json_array(),
                      "top_logprobs", l->top_logprobs ? l->top_logprobs : json_array(),
                      "text_offset", l->text_offset ? l->text_offset : json_array());
        l->tokens = l->token_logprobs = l->top_logprobs = l->text_offset = NULL;
    }
    return o;
}
