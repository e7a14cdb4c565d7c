/* Request parsing of the HTTP service (src/serve/http_request.c) on its own,
 * without a server: malformed JSON and every field's type and range get
 * their 4xx with a message naming the field; defaults (chat sampling and
 * stop, max_tokens capped at the limit); token lists deduplicated and
 * bounded; prompts as text, one-string arrays or token ids, with one
 * context-length check for all of them; session names and session file
 * names. The byte tokenizer (id = byte) makes every expected id plain. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve/http_request.h"

typedef struct {
    rp_tokenizer *tok;
    rp_request_limits lim;
} fixture;

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    rp_error err;
    assert_int_equal(rp_tokenizer_open(&f->tok, "bytes", &err), RP_OK);
    f->lim = (rp_request_limits){.model_id = "tiny",
                                 .vocab_size = 256,
                                 .default_max_tokens = 256,
                                 .max_tokens_limit = 100,
                                 .max_prompt_tokens = 8,
                                 .tok = f->tok};
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    rp_tokenizer_free(f->tok);
    free(f);
    return 0;
}

static json_t *parse(const char *body) {
    rp_request_error e;
    json_t *o = rp_request_parse_json(body, strlen(body), &e);
    if (!o) fail_msg("'%s' did not parse: %s", body, e.message);
    return o;
}

/* The generation fields of body must be refused with status and code, and
 * the message must mention `mention`. */
static void assert_refused(const fixture *f, const char *body, int chat, int status,
                           const char *code, const char *mention) {
    json_t *o = parse(body);
    rp_gen_request r;
    rp_request_error e;
    memset(&e, 0, sizeof e);
    int failed = rp_request_parse_generation(o, chat, &f->lim, &r, &e);
    if (!failed) {
        char *text = NULL;
        int32_t *ids = NULL;
        size_t text_len, n_ids;
        failed = rp_request_prompt(o, chat, "", &f->lim, &text, &text_len, &ids, &n_ids, &e);
        if (!failed) {
            free(text);
            free(ids);
        }
    }
    json_decref(o);
    if (!failed) fail_msg("%s was accepted", body);
    if (e.status != status || strcmp(e.code, code) != 0 || !strstr(e.message, mention))
        fail_msg("%s: got %d %s '%s', expected %d %s mentioning '%s'", body, e.status, e.code,
                 e.message, status, code, mention);
}

static void test_bodies_that_are_not_json_objects_are_400_invalid_json(void **state) {
    (void)state;
    const char *bad[] = {"", "{", "[]", "42", "\"text\"", "{\"a\":1,\"a\":2}", "{\"a\":1} x",
                         "{\"a\":\"\\ud800\"}", "\xff\xfe"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        rp_request_error e;
        json_t *o = rp_request_parse_json(bad[i], strlen(bad[i]), &e);
        if (o) fail_msg("'%s' parsed as an object", bad[i]);
        assert_int_equal(e.status, 400);
        assert_string_equal(e.code, "invalid_json");
    }
    rp_request_error e;
    assert_null(rp_request_parse_json(NULL, 0, &e));
    assert_non_null(strstr(e.message, "needs a JSON body"));
}

static void test_every_field_is_type_and_range_checked(void **state) {
    const fixture *f = *state;
    assert_refused(f, "{\"prompt\":\"a\",\"temperature\":\"hot\"}", 0, 400, "invalid_type",
                   "'temperature' must be a number");
    assert_refused(f, "{\"prompt\":\"a\",\"temperature\":101}", 0, 400, "invalid_value",
                   "'temperature' is 101");
    assert_refused(f, "{\"prompt\":\"a\",\"top_p\":1.5}", 0, 400, "invalid_value", "'top_p'");
    assert_refused(f, "{\"prompt\":\"a\",\"top_k\":1.5}", 0, 400, "invalid_type",
                   "'top_k' must be an integer");
    assert_refused(f, "{\"prompt\":\"a\",\"seed\":-1}", 0, 400, "invalid_value", "'seed'");
    assert_refused(f, "{\"prompt\":\"a\",\"stream\":1}", 0, 400, "invalid_type",
                   "'stream' must be true or false");
    assert_refused(f, "{\"prompt\":\"a\",\"n\":65}", 0, 400, "invalid_value", "'n' is 65");
    assert_refused(f, "{\"prompt\":\"a\",\"n\":0}", 0, 400, "invalid_value", "'n' is 0");
    assert_refused(f, "{\"prompt\":\"a\",\"max_tokens\":-1}", 0, 400, "invalid_value",
                   "must not be negative");
    assert_refused(f, "{\"prompt\":\"a\",\"max_tokens\":101}", 0, 400, "max_tokens_too_large",
                   "at most 100");
    assert_refused(f, "{\"prompt\":\"a\",\"max_tokens\":1e3}", 0, 400, "invalid_type",
                   "'max_tokens' must be an integer");
    assert_refused(f, "{\"prompt\":\"a\",\"model\":\"other\"}", 0, 404, "model_not_found",
                   "'other' is not served here");
    assert_refused(f, "{\"prompt\":\"a\",\"penalty_decay\":2}", 0, 400, "invalid_value",
                   "'penalty_decay'");
    assert_refused(f, "{\"prompt\":\"a\",\"session\":\".hidden\"}", 0, 400, "invalid_value",
                   "'session' must be");
    assert_refused(f, "{\"prompt\":\"a\",\"session\":\"a/b\"}", 0, 400, "invalid_value",
                   "'session' must be");
    assert_refused(f, "{\"prompt\":\"a\",\"initial_state\":\"\"}", 0, 400, "invalid_value",
                   "'initial_state'");
}

static void test_stop_strings_are_bounded(void **state) {
    const fixture *f = *state;
    assert_refused(f, "{\"prompt\":\"a\",\"stop\":\"\"}", 0, 400, "invalid_value",
                   "stop string 0 has 0 bytes");
    assert_refused(f, "{\"prompt\":\"a\",\"stop\":[\"x\",3]}", 0, 400, "invalid_type",
                   "'stop'[1] must be a string");
    assert_refused(f, "{\"prompt\":\"a\",\"stop\":{}}", 0, 400, "invalid_type",
                   "'stop' must be a string or an array");
    char body[512] = "{\"prompt\":\"a\",\"stop\":[";
    for (int i = 0; i <= RP_TEXT_MAX_STOPS; i++) strcat(body, i ? ",\"s\"" : "\"s\"");
    strcat(body, "]}");
    assert_refused(f, body, 0, 400, "invalid_value", "at most");
}

static void test_token_lists_are_checked_deduplicated_and_bounded(void **state) {
    const fixture *f = *state;
    assert_refused(f, "{\"prompt\":\"a\",\"ban_token_ids\":[256]}", 0, 400, "invalid_value",
                   "'ban_token_ids'[0] is 256");
    assert_refused(f, "{\"prompt\":\"a\",\"stop_token_ids\":[\"1\"]}", 0, 400, "invalid_type",
                   "'stop_token_ids'[0]");
    assert_refused(f, "{\"prompt\":\"a\",\"ban_token_ids\":5}", 0, 400, "invalid_type",
                   "'ban_token_ids' must be an array");
    json_t *o = parse("{\"prompt\":\"a\",\"ban_token_ids\":[7,7,7,9]}");
    rp_gen_request r;
    rp_request_error e;
    assert_int_equal(rp_request_parse_generation(o, 0, &f->lim, &r, &e), 0);
    assert_int_equal(r.params.n_banned, 2);
    assert_int_equal(r.params.banned[0], 7);
    assert_int_equal(r.params.banned[1], 9);
    /* completions stop at the end-of-text token unless it is banned */
    assert_int_equal(r.params.n_stop_tokens, 1);
    assert_int_equal(r.params.stop_tokens[0], 0);
    json_decref(o);
    /* 65 distinct banned ids: over the engine's limit */
    char body[1024] = "{\"prompt\":\"a\",\"ban_token_ids\":[";
    for (int i = 1; i <= RP_ENGINE_MAX_BANNED + 1; i++) {
        char id[8];
        snprintf(id, sizeof id, i > 1 ? ",%d" : "%d", i);
        strcat(body, id);
    }
    strcat(body, "]}");
    assert_refused(f, body, 0, 400, "invalid_value", "at most");
}

static void test_defaults_of_completions_and_chat(void **state) {
    const fixture *f = *state;
    json_t *o = parse("{\"prompt\":\"a\"}");
    rp_gen_request r;
    rp_request_error e;
    assert_int_equal(rp_request_parse_generation(o, 0, &f->lim, &r, &e), 0);
    assert_int_equal(r.params.max_tokens, 100); /* the default 256, capped at the limit */
    assert_int_equal(r.n_stops, 0);
    assert_false(r.seed_given);
    assert_null(r.session);
    json_decref(o);

    o = parse("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"seed\":5,"
              "\"top_p\":0,\"session\":\"s1\"}");
    assert_int_equal(rp_request_parse_generation(o, 1, &f->lim, &r, &e), 0);
    assert_int_equal(r.n_stops, 1);
    assert_string_equal(r.stops[0], "\n\n");
    assert_true(r.seed_given);
    assert_int_equal(r.params.sampler.seed, 5);
    assert_true(r.params.sampler.top_p > 0 && r.params.sampler.top_p < 1e-6); /* 0 = greedy-ish */
    assert_float_equal(r.params.presence_penalty, 0.5, 1e-6);
    assert_string_equal(r.session, "s1");
    /* chat bans the end-of-text token instead of stopping at it */
    assert_int_equal(r.params.n_banned, 1);
    assert_int_equal(r.params.banned[0], 0);
    json_decref(o);
}

static void test_prompts_as_text_one_string_array_or_ids(void **state) {
    const fixture *f = *state;
    const char *bodies[] = {"{\"prompt\":\"hey\"}", "{\"prompt\":[\"hey\"]}",
                            "{\"prompt\":[104,101,121]}"};
    for (int i = 0; i < 3; i++) {
        json_t *o = parse(bodies[i]);
        char *text;
        int32_t *ids;
        size_t text_len, n_ids;
        rp_request_error e;
        assert_int_equal(rp_request_prompt(o, 0, "", &f->lim, &text, &text_len, &ids, &n_ids, &e),
                         0);
        assert_int_equal(text_len, 3);
        assert_memory_equal(text, "hey", 3);
        assert_int_equal(n_ids, 3);
        assert_int_equal(ids[0], 'h');
        assert_int_equal(ids[2], 'y');
        free(text);
        free(ids);
        json_decref(o);
    }
}

static void test_bad_prompts_are_refused_with_one_length_check(void **state) {
    const fixture *f = *state;
    assert_refused(f, "{}", 0, 400, "missing_field", "'prompt' is required");
    assert_refused(f, "{\"prompt\":\"\"}", 0, 400, "invalid_value", "the prompt is empty");
    assert_refused(f, "{\"prompt\":[]}", 0, 400, "invalid_value", "the prompt is empty");
    assert_refused(f, "{\"prompt\":7}", 0, 400, "invalid_type", "'prompt' must be");
    assert_refused(f, "{\"prompt\":[1,256]}", 0, 400, "invalid_value", "'prompt'[1]");
    assert_refused(f, "{\"prompt\":[1,\"a\"]}", 0, 400, "invalid_value", "'prompt'[1]");
    /* 9 tokens against a limit of 8: text and ids alike */
    assert_refused(f, "{\"prompt\":\"123456789\"}", 0, 400, "context_length_exceeded",
                   "has 9 tokens");
    assert_refused(f, "{\"prompt\":[1,2,3,4,5,6,7,8,9]}", 0, 400, "context_length_exceeded",
                   "has 9 tokens");
    /* the chat format's own text counts too */
    assert_refused(f, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 1, 400,
                   "context_length_exceeded", "tokens");
}

static void test_chat_messages_are_checked(void **state) {
    fixture *f = *state;
    f->lim.max_prompt_tokens = 1000;
    assert_refused(f, "{}", 1, 400, "missing_field", "'messages' is required");
    assert_refused(f, "{\"messages\":[]}", 1, 400, "invalid_type", "non-empty array");
    assert_refused(f, "{\"messages\":[3]}", 1, 400, "invalid_type", "messages[0] must be an object");
    assert_refused(f, "{\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}", 1, 400,
                   "invalid_value", "messages[0].role is 'robot'");
    assert_refused(f, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\"}]}]}",
                   1, 400, "invalid_type", "messages[0].content[0]");
    assert_refused(f, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", 1, 400,
                   "invalid_type", "messages[0].content must be");
    /* text parts are joined; the prompt is the RWKV chat format */
    json_t *o = parse("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
                      "\"text\":\"Hel\"},{\"type\":\"text\",\"text\":\"lo\"}]}]}");
    char *text;
    int32_t *ids;
    size_t text_len, n_ids;
    rp_request_error e;
    assert_int_equal(rp_request_prompt(o, 1, "", &f->lim, &text, &text_len, &ids, &n_ids, &e), 0);
    assert_string_equal(text, "User: Hello\n\nAssistant:");
    assert_int_equal(n_ids, text_len);
    free(text);
    free(ids);
    json_decref(o);
}

/* Every field this server does not implement is a 400 naming it when it
 * asks for something, never a silent 200; its "off" values pass. */
static void test_unimplemented_fields_are_400_naming_them(void **state) {
    fixture *f = *state;
    f->lim.max_prompt_tokens = 1000;
    static const struct {
        int chat;
        const char *field, *json;
    } asks[] = {
        {0, "tools", "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]"},
        {1, "tools", "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]"},
        {1, "tool_choice", "\"auto\""},
        {1, "tool_choice", "{\"type\":\"function\",\"function\":{\"name\":\"f\"}}"},
        {1, "functions", "[{\"name\":\"f\"}]"},
        {0, "best_of", "2"},
        {0, "suffix", "\"end\""},
        {0, "top_logprobs", "2"},
    };
    for (size_t i = 0; i < sizeof asks / sizeof asks[0]; i++) {
        char body[512], mention[64];
        snprintf(body, sizeof body, "{%s,\"%s\":%s}",
                 asks[i].chat ? "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]"
                              : "\"prompt\":\"a\"",
                 asks[i].field, asks[i].json);
        snprintf(mention, sizeof mention, "'%s'", asks[i].field);
        assert_refused(f, body, asks[i].chat, 400, "unsupported_field", mention);
    }
    /* the defaults SDKs send, and unknown extras, are accepted */
    const char *fine[] = {
        "{\"prompt\":\"a\",\"tools\":[],\"logit_bias\":{},\"best_of\":1,\"suffix\":null,"
        "\"echo\":false,\"n\":1,\"logprobs\":null,\"response_format\":{\"type\":\"text\"},"
        "\"user\":\"u\",\"stream_options\":{\"include_usage\":true}}",
        "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tool_choice\":\"none\","
        "\"logprobs\":false,\"top_logprobs\":null,\"suffix\":\"ignored in chat\"}",
    };
    for (size_t i = 0; i < 2; i++) {
        json_t *o = parse(fine[i]);
        rp_gen_request r;
        rp_request_error e;
        if (rp_request_parse_generation(o, (int)i, &f->lim, &r, &e) != 0)
            fail_msg("%s refused: %s", fine[i], e.message);
        json_decref(o);
    }
}

/* response_format: json_object and json_schema reach the engine's parameters (the schema as
 * compact text that lives with the request), a chat reply with one ends at the end-of-text
 * token instead of banning it, and a schema this server cannot follow is a 400 naming the
 * keyword. */
static void test_response_format_is_parsed(void **state) {
    fixture *f = *state;
    f->lim.max_prompt_tokens = 1000;
    json_t *o = parse("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                      "\"response_format\":{\"type\":\"json_object\"}}");
    rp_gen_request r;
    rp_request_error e;
    if (rp_request_parse_generation(o, 1, &f->lim, &r, &e) != 0) fail_msg("%s", e.message);
    assert_int_equal(r.params.grammar, RP_GRAMMAR_JSON_OBJECT);
    assert_int_equal(r.params.n_banned, 0);
    assert_int_equal(r.params.n_stop_tokens, 1);
    assert_int_equal(r.params.stop_tokens[0], rp_tokenizer_eot_id(f->lim.tok));
    assert_int_equal(r.n_stops, 0); /* no "\n\n": it may sit between a document's tokens */
    json_decref(o);
    o = parse("{\"prompt\":\"a\",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":"
              "{\"name\":\"p\",\"strict\":true,\"schema\":{\"type\":\"object\",\"properties\":"
              "{\"a\":{\"type\":\"integer\"}},\"required\":[\"a\"]}}}}");
    if (rp_request_parse_generation(o, 0, &f->lim, &r, &e) != 0) fail_msg("%s", e.message);
    assert_int_equal(r.params.grammar, RP_GRAMMAR_JSON_SCHEMA);
    assert_string_equal(r.params.grammar_schema,
                        "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}},"
                        "\"required\":[\"a\"]}");
    json_decref(o);
    o = parse("{\"prompt\":\"a\",\"response_format\":{\"type\":\"text\"}}");
    if (rp_request_parse_generation(o, 0, &f->lim, &r, &e) != 0) fail_msg("%s", e.message);
    assert_int_equal(r.params.grammar, RP_GRAMMAR_NONE);
    json_decref(o);
    assert_refused(f, "{\"prompt\":\"a\",\"response_format\":{\"type\":\"json_schema\","
                      "\"json_schema\":{\"name\":\"p\",\"schema\":{\"type\":\"string\",\"pattern\":\"x\"}}}}",
                   0, 400, "unsupported_schema", "\"pattern\" is not supported");
    assert_refused(f, "{\"prompt\":\"a\",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{}}}",
                   0, 400, "invalid_value", "needs \"json_schema\"");
    assert_refused(f, "{\"prompt\":\"a\",\"response_format\":{\"type\":\"xml\"}}", 0, 400,
                   "invalid_value", "'xml'");
    assert_refused(f, "{\"prompt\":\"a\",\"response_format\":\"json\"}", 0, 400, "invalid_type",
                   "'response_format'");
}

/* logprobs / echo (completions), logprobs / top_logprobs (chat) and
 * logit_bias reach the engine's parameters; bad values name the field. */
static void test_logprobs_echo_and_logit_bias_are_parsed(void **state) {
    fixture *f = *state;
    f->lim.max_prompt_tokens = 1000;
    json_t *o = parse("{\"prompt\":\"a\",\"logprobs\":3,\"echo\":true,"
                      "\"logit_bias\":{\"65\":-100,\"7\":2.5}}");
    rp_gen_request r;
    rp_request_error e;
    assert_int_equal(rp_request_parse_generation(o, 0, &f->lim, &r, &e), 0);
    assert_true(r.params.logprobs && r.params.score_prompt && r.echo);
    assert_int_equal(r.params.top_logprobs, 3);
    assert_int_equal(r.params.n_bias, 2);
    int seen = 0;
    for (int i = 0; i < 2; i++) {
        if (r.params.bias_ids[i] == 65) seen += r.params.bias_values[i] == -100.0f;
        if (r.params.bias_ids[i] == 7) seen += r.params.bias_values[i] == 2.5f;
    }
    assert_int_equal(seen, 2);
    json_decref(o);
    /* echo alone returns the prompt without scoring it; logprobs 0: no alternatives */
    o = parse("{\"prompt\":\"a\",\"echo\":true,\"logprobs\":null}");
    assert_int_equal(rp_request_parse_generation(o, 0, &f->lim, &r, &e), 0);
    assert_true(r.echo && !r.params.logprobs && !r.params.score_prompt);
    json_decref(o);
    o = parse("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,"
              "\"top_logprobs\":20}");
    assert_int_equal(rp_request_parse_generation(o, 1, &f->lim, &r, &e), 0);
    assert_true(r.params.logprobs && !r.params.score_prompt);
    assert_int_equal(r.params.top_logprobs, 20);
    json_decref(o);
    assert_refused(f, "{\"prompt\":\"a\",\"logprobs\":21}", 0, 400, "invalid_value", "'logprobs'");
    assert_refused(f, "{\"prompt\":\"a\",\"logprobs\":true}", 0, 400, "invalid_type",
                   "'logprobs'");
    assert_refused(f, "{\"prompt\":\"a\",\"echo\":1}", 0, 400, "invalid_type", "'echo'");
    assert_refused(f, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                      "\"top_logprobs\":2}", 1, 400, "invalid_value", "'top_logprobs'");
    assert_refused(f, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                      "\"logprobs\":true,\"top_logprobs\":21}", 1, 400, "invalid_value",
                   "'top_logprobs'");
    assert_refused(f, "{\"prompt\":\"a\",\"logit_bias\":{\"256\":1}}", 0, 400, "invalid_value",
                   "'256'");
    assert_refused(f, "{\"prompt\":\"a\",\"logit_bias\":{\"1x\":1}}", 0, 400, "invalid_value",
                   "'1x'");
    assert_refused(f, "{\"prompt\":\"a\",\"logit_bias\":{\"5\":-100.5}}", 0, 400,
                   "invalid_value", "'logit_bias'['5'] is -100.5");
    assert_refused(f, "{\"prompt\":\"a\",\"logit_bias\":{\"5\":true}}", 0, 400, "invalid_type",
                   "'logit_bias'['5']");
    assert_refused(f, "{\"prompt\":\"a\",\"logit_bias\":[1]}", 0, 400, "invalid_type",
                   "'logit_bias'");
}

/* "prompt" as a batch: strings and token-id arrays, one prompt each, in
 * order; a bad one is named. One string in an array is one prompt. */
static void test_batched_prompts_are_read_in_order(void **state) {
    fixture *f = *state;
    f->lim.max_prompt_tokens = 1000;
    json_t *o = parse("{\"prompt\":[\"ab\",[1,2,3],\"c\"]}");
    rp_request_prompt_list l;
    rp_request_error e;
    assert_int_equal(rp_request_prompts(o, &f->lim, &l, &e), 0);
    assert_int_equal(l.n, 3);
    assert_int_equal(l.n_ids[0], 2);
    assert_int_equal(l.n_ids[1], 3);
    assert_int_equal(l.ids[1][2], 3);
    assert_int_equal(l.n_ids[2], 1);
    assert_memory_equal(l.texts[2], "c", 2);
    rp_request_prompts_free(&l);
    json_decref(o);
    const char *one[] = {"{\"prompt\":[\"ab\"]}", "{\"prompt\":[1,2]}", "{\"prompt\":\"ab\"}",
                         "{\"prompt\":[[1,2]]}"};
    for (int i = 0; i < 4; i++) {
        o = parse(one[i]);
        assert_int_equal(rp_request_prompts(o, &f->lim, &l, &e), 0);
        assert_int_equal(l.n, 1);
        assert_int_equal(l.n_ids[0], 2);
        rp_request_prompts_free(&l);
        json_decref(o);
    }
    const struct {
        const char *body, *mention;
    } bad[] = {{"{\"prompt\":[\"ab\",[1,999]]}", "prompt 1 of the batch"},
               {"{\"prompt\":[\"ab\",\"\"]}", "prompt 1 of the batch: the prompt is empty"},
               {"{\"prompt\":[[1],{}]}", "'prompt'[1] must be a string or an array"},
               {"{\"prompt\":[]}", "the prompt is empty"}};
    for (int i = 0; i < 4; i++) {
        o = parse(bad[i].body);
        if (rp_request_prompts(o, &f->lim, &l, &e) == 0) fail_msg("%s accepted", bad[i].body);
        if (e.status != 400 || !strstr(e.message, bad[i].mention))
            fail_msg("%s: %d '%s', expected a 400 mentioning '%s'", bad[i].body, e.status,
                     e.message, bad[i].mention);
        json_decref(o);
    }
}

/* "developer" is the system role; "tool" and "function" name tool calling. */
static void test_developer_is_system_and_tool_roles_are_refused(void **state) {
    fixture *f = *state;
    f->lim.max_prompt_tokens = 1000;
    assert_refused(f, "{\"messages\":[{\"role\":\"tool\",\"content\":\"x\"}]}", 1, 400,
                   "unsupported_field", "messages[0].role is 'tool'");
    assert_refused(f, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},"
                      "{\"role\":\"function\",\"content\":\"x\"}]}",
                   1, 400, "unsupported_field", "messages[1].role is 'function'");
    const char *bodies[] = {
        "{\"messages\":[{\"role\":\"developer\",\"content\":\"Be brief.\"},"
        "{\"role\":\"user\",\"content\":\"hi\"}]}",
        "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
        "{\"role\":\"user\",\"content\":\"hi\"}]}",
    };
    char *texts[2];
    for (int i = 0; i < 2; i++) {
        json_t *o = parse(bodies[i]);
        int32_t *ids;
        size_t text_len, n_ids;
        rp_request_error e;
        if (rp_request_prompt(o, 1, "", &f->lim, &texts[i], &text_len, &ids, &n_ids, &e) != 0)
            fail_msg("%s refused: %s", bodies[i], e.message);
        free(ids);
        json_decref(o);
    }
    assert_string_equal(texts[0], texts[1]);
    assert_non_null(strstr(texts[0], "System: Be brief."));
    free(texts[0]);
    free(texts[1]);
}

/* /tokenize and /detokenize (lm-eval's RemoteTokenizer): ids of the text,
 * the text of ids; the end-of-text token round-trips through its text. */
static void test_tokenize_and_detokenize(void **state) {
    const fixture *f = *state;
    json_t *o = parse("{\"prompt\":\"hi!\",\"add_special_tokens\":false}");
    int32_t *ids;
    size_t n;
    rp_request_error e;
    assert_int_equal(rp_request_tokenize(o, &f->lim, &ids, &n, &e), 0);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 'h');
    assert_int_equal(ids[2], '!');
    free(ids);
    json_decref(o);
    o = parse("{\"prompt\":\"\"}");
    assert_int_equal(rp_request_tokenize(o, &f->lim, &ids, &n, &e), 0);
    assert_int_equal(n, 0);
    free(ids);
    json_decref(o);
    const char *bad[] = {"{}", "{\"prompt\":3}", "{\"prompt\":\"a\",\"model\":\"other\"}"};
    const int status[] = {400, 400, 404};
    for (int i = 0; i < 3; i++) {
        o = parse(bad[i]);
        if (rp_request_tokenize(o, &f->lim, &ids, &n, &e) == 0) fail_msg("%s accepted", bad[i]);
        assert_int_equal(e.status, status[i]);
        json_decref(o);
    }
    char *text;
    o = parse("{\"tokens\":[104,105,33]}");
    assert_int_equal(rp_request_detokenize(o, &f->lim, &text, &n, &e), 0);
    assert_string_equal(text, "hi!");
    free(text);
    json_decref(o);
    const char *bad_d[] = {"{}", "{\"tokens\":\"hi\"}", "{\"tokens\":[256]}", "{\"tokens\":[-1]}"};
    for (int i = 0; i < 4; i++) {
        o = parse(bad_d[i]);
        if (rp_request_detokenize(o, &f->lim, &text, &n, &e) == 0) fail_msg("%s accepted", bad_d[i]);
        assert_int_equal(e.status, 400);
        json_decref(o);
    }
    /* the end of text is spelled <|endoftext|> (the byte 0 cannot be JSON text) */
    size_t eot_len;
    const char *eot = rp_request_eot_text(f->tok, &eot_len);
    assert_string_equal(eot, "<|endoftext|>");
    o = parse("{\"prompt\":\"a<|endoftext|>\"}");
    assert_int_equal(rp_request_tokenize(o, &f->lim, &ids, &n, &e), 0);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 'a');
    assert_int_equal(ids[1], 0);
    free(ids);
    json_decref(o);
    o = parse("{\"tokens\":[0,97]}");
    assert_int_equal(rp_request_detokenize(o, &f->lim, &text, &n, &e), 0);
    assert_string_equal(text, "<|endoftext|>a");
    free(text);
    json_decref(o);

    /* The World vocabulary: token 0 has no bytes; "<|endoftext|>" stands for it. */
    const char *dir = getenv("RP_SHARED_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/vocab/rwkv_vocab_v20230424.txt", dir ? dir : "");
    rp_tokenizer *world;
    rp_error err;
    if (!dir || rp_tokenizer_open(&world, path, &err) != RP_OK) {
        printf("skip: the World vocabulary (RP_SHARED_DIR)\n");
        return;
    }
    rp_request_limits lim = f->lim;
    lim.tok = world;
    lim.vocab_size = 65536;
    eot = rp_request_eot_text(world, &eot_len);
    assert_string_equal(eot, "<|endoftext|>");
    o = parse("{\"prompt\":\"<|endoftext|>Hello<|endoftext|>\"}");
    assert_int_equal(rp_request_tokenize(o, &lim, &ids, &n, &e), 0);
    json_decref(o);
    assert_true(n >= 3);
    assert_int_equal(ids[0], 0);
    assert_int_equal(ids[n - 1], 0);
    json_t *back = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(back, json_integer(ids[i]));
    json_array_append_new(back, json_integer(65533)); /* padding: spells nothing */
    free(ids);
    o = json_pack("{s:o}", "tokens", back);
    assert_int_equal(rp_request_detokenize(o, &lim, &text, &n, &e), 0);
    assert_string_equal(text, "<|endoftext|>Hello<|endoftext|>");
    free(text);
    json_decref(o);
    rp_tokenizer_free(world);
}

static void test_session_file_bodies(void **state) {
    (void)state;
    const char *good = "{\"path\":\"chat-1.state\"}";
    const char *bad[] = {"{}", "{\"path\":\"\"}", "{\"path\":3}", "{\"path\":\"../x.state\"}",
                         "{\"path\":\"a/b.state\"}", "{\"path\":\".h.state\"}",
                         "{\"path\":\"model.safetensors\"}"};
    rp_request_error e;
    const char *name;
    json_t *o = parse(good);
    assert_int_equal(rp_request_session_file(o, &name, &e), 0);
    assert_string_equal(name, "chat-1.state");
    json_decref(o);
    assert_int_equal(rp_request_session_file(NULL, &name, &e), -1);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        o = parse(bad[i]);
        if (rp_request_session_file(o, &name, &e) == 0) fail_msg("%s was accepted", bad[i]);
        assert_int_equal(e.status, 400);
        json_decref(o);
    }
}

static void test_session_names(void **state) {
    (void)state;
    assert_true(rp_session_name_valid("chat_1-a.b"));
    assert_false(rp_session_name_valid(""));
    assert_false(rp_session_name_valid(".x"));
    assert_false(rp_session_name_valid("a b"));
    assert_false(rp_session_name_valid("a/b"));
    assert_false(rp_session_name_valid("a\x01"));
    char longest[RP_ENGINE_SESSION_NAME_MAX + 1];
    memset(longest, 'a', sizeof longest);
    longest[RP_ENGINE_SESSION_NAME_MAX - 1] = '\0';
    assert_true(rp_session_name_valid(longest));
    longest[RP_ENGINE_SESSION_NAME_MAX - 1] = 'a';
    longest[RP_ENGINE_SESSION_NAME_MAX] = '\0';
    assert_false(rp_session_name_valid(longest));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_bodies_that_are_not_json_objects_are_400_invalid_json, setup, teardown),
        cmocka_unit_test_setup_teardown(test_every_field_is_type_and_range_checked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_strings_are_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_token_lists_are_checked_deduplicated_and_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_defaults_of_completions_and_chat, setup, teardown),
        cmocka_unit_test_setup_teardown(test_prompts_as_text_one_string_array_or_ids, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_prompts_are_refused_with_one_length_check, setup, teardown),
        cmocka_unit_test_setup_teardown(test_chat_messages_are_checked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_response_format_is_parsed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_logprobs_echo_and_logit_bias_are_parsed, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_batched_prompts_are_read_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unimplemented_fields_are_400_naming_them, setup, teardown),
        cmocka_unit_test_setup_teardown(test_developer_is_system_and_tool_roles_are_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tokenize_and_detokenize, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_file_bodies, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_names, setup, teardown),
    };
    return cmocka_run_group_tests_name("http_request", tests, NULL, NULL);
}
