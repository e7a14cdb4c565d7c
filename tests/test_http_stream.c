/* What the HTTP service sends for a generation (src/serve/http_stream.c),
 * without a daemon or an engine: the exact JSON of SSE chunks and of whole
 * replies for completions and chat, finish-reason names, usage and timing,
 * error objects by status, and the SSE framing. Clients parse these bytes,
 * so the expected strings are the wire format (docs/serving.md). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve/http_internal.h"

/* Compares json's compact text (key order as sent) with want; frees json. */
static void assert_json(json_t *json, const char *want) {
    assert_non_null(json);
    char *got = json_dumps(json, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(json);
    assert_non_null(got);
    if (strcmp(got, want) != 0) fail_msg("got %s, want %s", got, want);
    free(got);
}

static const gen_head chat_head = {.chat = 1, .id = "chatcmpl-1", .created = 1700000000,
                                   .model = "tiny"};
static const gen_head completion_head = {.chat = 0, .id = "cmpl-2", .created = 1700000001,
                                         .model = "tiny"};

static void test_finish_reasons_have_their_openai_names(void **state) {
    (void)state;
    assert_string_equal(http_finish_name(RP_FINISH_LENGTH), "length");
    assert_string_equal(http_finish_name(RP_FINISH_STOP), "stop");
    assert_string_equal(http_finish_name(RP_FINISH_CANCELLED), "cancelled");
    assert_string_equal(http_finish_name(RP_FINISH_ERROR), "error");
    assert_string_equal(http_finish_name(RP_FINISH_NONE), "stop");
}

static void test_error_objects_name_a_type_per_status(void **state) {
    (void)state;
    assert_json(http_error_json(404, "session_not_found", "session 'a' does not exist"),
                "{\"error\":{\"message\":\"session 'a' does not exist\","
                "\"type\":\"not_found_error\",\"code\":\"session_not_found\"}}");
    const struct {
        int status;
        const char *type;
    } types[] = {{400, "invalid_request_error"}, {401, "authentication_error"},
                 {404, "not_found_error"},       {405, "invalid_request_error"},
                 {409, "conflict_error"},        {413, "invalid_request_error"},
                 {429, "rate_limit_error"},      {500, "server_error"},
                 {503, "unavailable_error"},     {507, "invalid_request_error"}};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        assert_string_equal(http_error_type(types[i].status), types[i].type);
    /* a message quoting bytes that are not UTF-8 is replaced, never dropped */
    assert_json(http_error_json(400, "invalid_value", "bad \xff name"),
                "{\"error\":{\"message\":\"(message is not valid UTF-8)\","
                "\"type\":\"invalid_request_error\",\"code\":\"invalid_value\"}}");
}

static void test_usage_adds_prompt_and_completion_tokens(void **state) {
    (void)state;
    assert_json(http_usage_json(19, 48, 0),
                "{\"prompt_tokens\":19,\"completion_tokens\":48,\"total_tokens\":67,"
                "\"prompt_tokens_details\":{\"cached_tokens\":0}}");
    assert_json(http_usage_json(3, 0, 2),
                "{\"prompt_tokens\":3,\"completion_tokens\":0,\"total_tokens\":3,"
                "\"prompt_tokens_details\":{\"cached_tokens\":2}}");
}

static void test_timing_counts_from_submit_and_after_the_first_token(void **state) {
    (void)state;
    /* submitted at 10 s, first token at 10.5 s, fifth at 12.5 s: 4 tokens in 2 s */
    json_t *t = http_timing_json(0.25, 10.0, 10.5, 12.5, 5);
    assert_non_null(t);
    assert_int_equal(json_object_size(t), 3);
    assert_float_equal(json_real_value(json_object_get(t, "queue_ms")), 250.0, 1e-9);
    assert_float_equal(json_real_value(json_object_get(t, "time_to_first_token_ms")), 500.0, 1e-9);
    assert_float_equal(json_real_value(json_object_get(t, "tokens_per_second")), 2.0, 1e-9);
    json_decref(t);
    /* no token yet, or only one: no rate, no time to first token */
    t = http_timing_json(0, 10.0, 0, 0, 0);
    assert_float_equal(json_real_value(json_object_get(t, "time_to_first_token_ms")), 0, 0);
    assert_float_equal(json_real_value(json_object_get(t, "tokens_per_second")), 0, 0);
    json_decref(t);
    t = http_timing_json(0, 10.0, 10.5, 10.5, 1);
    assert_float_equal(json_real_value(json_object_get(t, "tokens_per_second")), 0, 0);
    json_decref(t);
}

static void test_chat_chunks_carry_the_role_once_and_no_content_when_last(void **state) {
    (void)state;
    assert_json(http_chunk_json(&chat_head, 1, "", 0, NULL),
                "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","
                "\"created\":1700000000,\"model\":\"tiny\",\"choices\":[{\"index\":0,"
                "\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}");
    assert_json(http_chunk_json(&chat_head, 0, "Hi there", 2, NULL),
                "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","
                "\"created\":1700000000,\"model\":\"tiny\",\"choices\":[{\"index\":0,"
                "\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}");
    assert_json(http_chunk_json(&chat_head, 0, "", 0, "length"),
                "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","
                "\"created\":1700000000,\"model\":\"tiny\",\"choices\":[{\"index\":0,"
                "\"delta\":{},\"finish_reason\":\"length\"}]}");
    assert_json(http_chunk_json(&chat_head, 0, "!", 1, "stop"),
                "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","
                "\"created\":1700000000,\"model\":\"tiny\",\"choices\":[{\"index\":0,"
                "\"delta\":{\"content\":\"!\"},\"finish_reason\":\"stop\"}]}");
}

static void test_completion_chunks_carry_text_and_null_logprobs(void **state) {
    (void)state;
    assert_json(http_chunk_json(&completion_head, 0, "ab", 2, NULL),
                "{\"id\":\"cmpl-2\",\"object\":\"text_completion\",\"created\":1700000001,"
                "\"model\":\"tiny\",\"choices\":[{\"index\":0,\"text\":\"ab\","
                "\"logprobs\":null,\"finish_reason\":null}]}");
    /* with_role means nothing to a completion */
    assert_json(http_chunk_json(&completion_head, 1, "", 0, "cancelled"),
                "{\"id\":\"cmpl-2\",\"object\":\"text_completion\",\"created\":1700000001,"
                "\"model\":\"tiny\",\"choices\":[{\"index\":0,\"text\":\"\","
                "\"logprobs\":null,\"finish_reason\":\"cancelled\"}]}");
}

static void test_whole_replies_of_chat_and_completions(void **state) {
    (void)state;
    assert_json(http_reply_json(&chat_head, "Hello", 5, "length", http_usage_json(6, 3, 4),
                                json_pack("{s:i}", "t", 1)),
                "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"created\":1700000000,"
                "\"model\":\"tiny\",\"choices\":[{\"index\":0,\"message\":{\"role\":"
                "\"assistant\",\"content\":\"Hello\"},\"finish_reason\":\"length\"}],"
                "\"usage\":{\"prompt_tokens\":6,\"completion_tokens\":3,\"total_tokens\":9,"
                "\"prompt_tokens_details\":{\"cached_tokens\":4}},"
                "\"timing\":{\"t\":1}}");
    assert_json(http_reply_json(&completion_head, " fox", 4, "stop", http_usage_json(2, 1, 0),
                                json_object()),
                "{\"id\":\"cmpl-2\",\"object\":\"text_completion\",\"created\":1700000001,"
                "\"model\":\"tiny\",\"choices\":[{\"index\":0,\"text\":\" fox\","
                "\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":2,"
                "\"completion_tokens\":1,\"total_tokens\":3,\"prompt_tokens_details\":"
                "{\"cached_tokens\":0}},\"timing\":{}}");
}

static void test_text_that_is_not_utf8_becomes_empty_not_a_failure(void **state) {
    (void)state;
    assert_json(http_json_text("a\0b", 3), "\"a\\u0000b\"");
    assert_json(http_json_text("\xe2\x82", 2), "\"\"");
    assert_json(http_chunk_json(&completion_head, 0, "\xc3", 1, NULL),
                "{\"id\":\"cmpl-2\",\"object\":\"text_completion\",\"created\":1700000001,"
                "\"model\":\"tiny\",\"choices\":[{\"index\":0,\"text\":\"\","
                "\"logprobs\":null,\"finish_reason\":null}]}");
}

static void test_sse_events_are_framed_and_a_failure_appends_nothing(void **state) {
    (void)state;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    assert_int_equal(http_sse_event(&buf, &len, &cap, json_pack("{s:i}", "a", 1)), 0);
    assert_int_equal(http_sse_event(&buf, &len, &cap, json_pack("{s:s}", "b", "x y")), 0);
    const char *want = "data: {\"a\":1}\n\ndata: {\"b\":\"x y\"}\n\n";
    assert_int_equal(len, strlen(want));
    assert_string_equal(buf, want);
    /* an event that could not be built (NULL) is refused, the stream unchanged */
    assert_int_equal(http_sse_event(&buf, &len, &cap, NULL), -1);
    assert_int_equal(len, strlen(want));
    assert_string_equal(buf, want);
    free(buf);
}

/* A logprob of token with the given alternatives (most likely first). */
static rp_token_logprob lp_of(int32_t token, float logprob, int n_top, const int32_t *ids,
                              const float *lps) {
    rp_token_logprob lp;
    memset(&lp, 0, sizeof lp);
    lp.token = token;
    lp.logprob = logprob;
    lp.n_top = n_top;
    for (int i = 0; i < n_top; i++) lp.top_ids[i] = ids[i], lp.top_logprobs[i] = lps[i];
    return lp;
}

static void test_completion_logprobs_have_openais_shape(void **state) {
    (void)state;
    rp_tokenizer *tok;
    rp_error err;
    assert_int_equal(rp_tokenizer_open(&tok, "bytes", &err), RP_OK);
    http_logprobs l;
    http_logprobs_init(&l, 0);
    /* echo: the first prompt token has no logprob; 'é' (2 bytes, 2 tokens)
     * is one character of text_offset; the end-of-text token is spelled */
    const int32_t top_b[] = {'b', 'c'};
    const float lp_b[] = {-0.25f, -1.5f};
    rp_token_logprob b = lp_of('b', -0.25f, 2, top_b, lp_b);
    const int32_t top_e[] = {0xA9};
    const float lp_e[] = {-0.5f};
    rp_token_logprob e1 = lp_of(0xC3, -2.0f, 0, NULL, NULL), e2 = lp_of(0xA9, -0.5f, 1, top_e, lp_e);
    rp_token_logprob eot = lp_of(0, -0.125f, 0, NULL, NULL);
    assert_int_equal(http_logprobs_add(&l, tok, 'a', NULL, 2), 0);
    assert_int_equal(http_logprobs_add(&l, tok, 'b', &b, 2), 0);
    assert_int_equal(http_logprobs_add(&l, tok, 0xC3, &e1, 2), 0);
    assert_int_equal(http_logprobs_add(&l, tok, 0xA9, &e2, 2), 0);
    assert_int_equal(http_logprobs_add(&l, tok, 0, &eot, 2), 0);
    assert_json(http_logprobs_take(&l),
                "{\"tokens\":[\"a\",\"b\",\"bytes:\\\\xc3\",\"bytes:\\\\xa9\",\"<|endoftext|>\"],"
                "\"token_logprobs\":[null,-0.25,-2.0,-0.5,-0.125],"
                "\"top_logprobs\":[null,{\"b\":-0.25,\"c\":-1.5},{},{\"bytes:\\\\xa9\":-0.5},{}],"
                "\"text_offset\":[0,1,2,3,3]}");
    /* a stream's next chunk continues the offsets; k = 1 keeps one alternative */
    assert_int_equal(http_logprobs_add(&l, tok, 'b', &b, 1), 0);
    assert_json(http_logprobs_take(&l),
                "{\"tokens\":[\"b\"],\"token_logprobs\":[-0.25],\"top_logprobs\":[{\"b\":-0.25}],"
                "\"text_offset\":[3]}");
    http_logprobs_free(&l);
    rp_tokenizer_free(tok);
}

static void test_chat_logprobs_have_openais_shape(void **state) {
    (void)state;
    rp_tokenizer *tok;
    rp_error err;
    assert_int_equal(rp_tokenizer_open(&tok, "bytes", &err), RP_OK);
    http_logprobs l;
    http_logprobs_init(&l, 1);
    const int32_t top[] = {'H', 'h'};
    const float lps[] = {-0.5f, -1.0f};
    rp_token_logprob h = lp_of('H', -0.5f, 2, top, lps);
    assert_int_equal(http_logprobs_add(&l, tok, 'H', &h, 2), 0);
    assert_json(http_logprobs_take(&l),
                "{\"content\":[{\"token\":\"H\",\"logprob\":-0.5,\"bytes\":[72],"
                "\"top_logprobs\":[{\"token\":\"H\",\"logprob\":-0.5,\"bytes\":[72]},"
                "{\"token\":\"h\",\"logprob\":-1.0,\"bytes\":[104]}]}]}");
    assert_json(http_logprobs_take(&l), "{\"content\":[]}");
    http_logprobs_free(&l);
    rp_tokenizer_free(tok);
}

static void test_token_strings_spell_partial_characters_as_bytes(void **state) {
    (void)state;
    rp_tokenizer *tok;
    rp_error err;
    assert_int_equal(rp_tokenizer_open(&tok, "bytes", &err), RP_OK);
    assert_json(http_token_string(tok, 'x'), "\"x\"");
    assert_json(http_token_string(tok, 0xFF), "\"bytes:\\\\xff\"");
    assert_json(http_token_string(tok, 0), "\"<|endoftext|>\"");
    rp_tokenizer_free(tok);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_finish_reasons_have_their_openai_names),
        cmocka_unit_test(test_error_objects_name_a_type_per_status),
        cmocka_unit_test(test_usage_adds_prompt_and_completion_tokens),
        cmocka_unit_test(test_timing_counts_from_submit_and_after_the_first_token),
        cmocka_unit_test(test_chat_chunks_carry_the_role_once_and_no_content_when_last),
        cmocka_unit_test(test_completion_chunks_carry_text_and_null_logprobs),
        cmocka_unit_test(test_whole_replies_of_chat_and_completions),
        cmocka_unit_test(test_text_that_is_not_utf8_becomes_empty_not_a_failure),
        cmocka_unit_test(test_sse_events_are_framed_and_a_failure_appends_nothing),
        cmocka_unit_test(test_completion_logprobs_have_openais_shape),
        cmocka_unit_test(test_chat_logprobs_have_openais_shape),
        cmocka_unit_test(test_token_strings_spell_partial_characters_as_bytes),
    };
    return cmocka_run_group_tests_name("http_stream", tests, NULL, NULL);
}
