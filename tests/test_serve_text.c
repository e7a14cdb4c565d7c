/* The text side of the HTTP service (src/text/stream.c, src/serve/chat.c):
 * stop strings never reach the client and text that may start one is held back; streamed pieces
 * are valid UTF-8 and concatenate to the text of the whole generation, with
 * U+FFFD per maximal invalid subpart (Python's errors="replace"); the RWKV
 * chat prompt format and how a session continues at a turn boundary. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve/chat.h"
#include "text/stream.h"

/* Pushes `pieces` (each a token's bytes) and returns everything released,
 * the concatenation of the taken pieces; *stop_piece = index of the piece
 * that completed a stop string (-1: none). */
static char *run_stream(const char *const *stops, int n_stops, const char *const *pieces,
                        const size_t *lens, int n, int *stop_piece, size_t *out_len) {
    rp_text_stream s;
    rp_error err;
    assert_int_equal(rp_text_stream_init(&s, stops, n_stops, &err), RP_OK);
    char *all = calloc(1, 4096);
    size_t len = 0;
    *stop_piece = -1;
    for (int i = 0; i < n; i++) {
        int r = rp_text_stream_push(&s, (const uint8_t *)pieces[i], lens[i]);
        assert_true(r >= 0);
        size_t k;
        const char *t = rp_text_stream_take(&s, &k);
        memcpy(all + len, t, k);
        len += k;
        if (r == 1) {
            *stop_piece = i;
            break;
        }
    }
    rp_text_stream_finish(&s);
    size_t k;
    const char *t = rp_text_stream_take(&s, &k);
    memcpy(all + len, t, k);
    len += k;
    rp_text_stream_free(&s);
    *out_len = len;
    return all;
}

static void test_stop_string_split_over_tokens_is_not_emitted(void **state) {
    (void)state;
    const char *stops[] = {"\n\nUser:"};
    const char *pieces[] = {"Hello", " world", "\n", "\nUs", "er:", " more"};
    size_t lens[6];
    for (int i = 0; i < 6; i++) lens[i] = strlen(pieces[i]);
    int at;
    size_t n;
    char *out = run_stream(stops, 1, pieces, lens, 6, &at, &n);
    assert_int_equal(at, 4);
    assert_int_equal(n, strlen("Hello world"));
    assert_memory_equal(out, "Hello world", n);
    free(out);
}

static void test_text_that_may_start_a_stop_string_is_held_back_then_released(void **state) {
    (void)state;
    rp_text_stream s;
    rp_error err;
    const char *stops[] = {"STOP", "\n\n"};
    assert_int_equal(rp_text_stream_init(&s, stops, 2, &err), RP_OK);
    size_t k;
    assert_int_equal(rp_text_stream_push(&s, (const uint8_t *)"abcST", 5), 0);
    rp_text_stream_take(&s, &k);
    assert_int_equal(k, 3);  /* "ST" may start "STOP" */
    assert_int_equal(rp_text_stream_push(&s, (const uint8_t *)"X\n", 2), 0);
    const char *t = rp_text_stream_take(&s, &k);
    assert_int_equal(k, 3);  /* "STX" released, "\n" held */
    assert_memory_equal(t, "STX", 3);
    rp_text_stream_finish(&s);  /* the end: the held newline is text after all */
    t = rp_text_stream_take(&s, &k);
    assert_int_equal(k, 1);
    assert_memory_equal(t, "\n", 1);
    rp_text_stream_free(&s);
}

static void test_earliest_of_several_stop_strings_wins(void **state) {
    (void)state;
    const char *stops[] = {"world", "lo w"};
    const char *pieces[] = {"Hello world"};
    size_t lens[] = {11};
    int at;
    size_t n;
    char *out = run_stream(stops, 2, pieces, lens, 1, &at, &n);
    assert_int_equal(at, 0);
    assert_int_equal(n, 3);
    assert_memory_equal(out, "Hel", 3);
    free(out);
}

static void test_character_split_over_tokens_is_emitted_whole(void **state) {
    (void)state;
    rp_text_stream s;
    rp_error err;
    assert_int_equal(rp_text_stream_init(&s, NULL, 0, &err), RP_OK);
    const uint8_t smile[] = {0xF0, 0x9F, 0x98, 0x80};  /* U+1F600 */
    size_t k;
    assert_int_equal(rp_text_stream_push(&s, smile, 1), 0);
    rp_text_stream_take(&s, &k);
    assert_int_equal(k, 0);
    assert_int_equal(rp_text_stream_push(&s, smile + 1, 2), 0);
    rp_text_stream_take(&s, &k);
    assert_int_equal(k, 0);
    assert_int_equal(rp_text_stream_push(&s, smile + 3, 1), 0);
    const char *t = rp_text_stream_take(&s, &k);
    assert_int_equal(k, 4);
    assert_memory_equal(t, smile, 4);
    rp_text_stream_free(&s);
}

/* Expected values from Python: bytes.decode("utf-8", errors="replace"). */
static void test_invalid_bytes_become_one_replacement_per_maximal_subpart(void **state) {
    (void)state;
    struct {
        const char *in;
        size_t n;
        const char *want;
    } cases[] = {
        {"\xF0\x90" "A", 3, "\xEF\xBF\xBD" "A"},               /* truncated 4-byte: one */
        {"\xE0\x80" "A", 3, "\xEF\xBF\xBD\xEF\xBF\xBD" "A"},   /* overlong: two */
        {"\xED\xA0\x80", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* surrogate: three */
        {"\xFF" "a\xC3\xA9", 4, "\xEF\xBF\xBD" "a\xC3\xA9"},
        {"\xF4\x90\x80\x80", 4, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
        {"\xE2\x82", 2, "\xEF\xBF\xBD"},                      /* cut at the end: one */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *out = NULL;
        size_t len = 0, cap = 0;
        assert_int_equal(rp_utf8_append_sanitized(&out, &len, &cap, (const uint8_t *)cases[i].in,
                                                  cases[i].n),
                         0);
        assert_int_equal(len, strlen(cases[i].want));
        assert_memory_equal(out, cases[i].want, len);
        free(out);
    }
}

/* keep_invalid (what `rwkvpipe generate` prints): invalid bytes pass
 * through unchanged, characters still come out whole and stop strings still
 * hold back and cut. */
static void test_keep_invalid_passes_bytes_through(void **state) {
    (void)state;
    const char *stops[] = {"\xFF\xFE!"};
    rp_text_stream s;
    rp_error err;
    assert_int_equal(rp_text_stream_init(&s, stops, 1, &err), RP_OK);
    s.keep_invalid = 1;
    size_t k;
    assert_int_equal(rp_text_stream_push(&s, (const uint8_t *)"a\x80\xC3", 3), 0);
    const char *t = rp_text_stream_take(&s, &k);
    assert_int_equal(k, 2);
    assert_memory_equal(t, "a\x80", 2);
    assert_int_equal(rp_text_stream_push(&s, (const uint8_t *)"\xA9\xFF\xFE", 3), 0);
    t = rp_text_stream_take(&s, &k);
    assert_int_equal(k, 2);
    assert_memory_equal(t, "\xC3\xA9", 2);
    assert_int_equal(rp_text_stream_push(&s, (const uint8_t *)"!x", 2), 1);
    rp_text_stream_finish(&s);
    t = rp_text_stream_take(&s, &k);
    assert_int_equal(k, 0);
    rp_text_stream_free(&s);

    assert_int_equal(rp_text_stream_init(&s, NULL, 0, &err), RP_OK);
    s.keep_invalid = 1;
    assert_int_equal(rp_text_stream_push(&s, (const uint8_t *)"\xFFz\xE2\x82", 4), 0);
    rp_text_stream_finish(&s);
    t = rp_text_stream_take(&s, &k);
    assert_int_equal(k, 4);
    assert_memory_equal(t, "\xFFz\xE2\x82", 4);
    rp_text_stream_free(&s);
}

/* Streaming a byte sequence one byte at a time gives the same text as
 * sanitizing it at once: what makes SSE chunks concatenate to the
 * non-streamed answer. */
static void test_streamed_pieces_concatenate_to_the_whole_text(void **state) {
    (void)state;
    uint64_t x = 88172645463325252ull;
    for (int round = 0; round < 200; round++) {
        uint8_t bytes[64];
        int n = 1 + round % 64;
        for (int i = 0; i < n; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            /* mostly lead and continuation bytes, some ASCII */
            static const uint8_t pick[] = {0xF0, 0x90, 0x9F, 0x80, 0xBF, 0xE2, 0x82, 0xAC,
                                           0xC3, 0xA9, 'a', 0xED, 0xA0, 0xF4, 0xFF, 0xC0};
            bytes[i] = pick[x % sizeof pick];
        }
        char *whole = NULL;
        size_t wl = 0, wc = 0;
        assert_int_equal(rp_utf8_append_sanitized(&whole, &wl, &wc, bytes, (size_t)n), 0);
        const char *pieces[64];
        size_t lens[64];
        for (int i = 0; i < n; i++) pieces[i] = (const char *)bytes + i, lens[i] = 1;
        int at;
        size_t sl;
        char *streamed = run_stream(NULL, 0, pieces, lens, n, &at, &sl);
        assert_int_equal(sl, wl);
        assert_memory_equal(streamed, whole, wl);
        free(whole);
        free(streamed);
    }
}

static void test_stream_rejects_empty_and_too_many_stop_strings(void **state) {
    (void)state;
    rp_text_stream s;
    rp_error err;
    const char *empty[] = {""};
    assert_int_equal(rp_text_stream_init(&s, empty, 1, &err), RP_ERR_ARG);
    const char *many[RP_TEXT_MAX_STOPS + 1];
    for (int i = 0; i <= RP_TEXT_MAX_STOPS; i++) many[i] = "x";
    assert_int_equal(rp_text_stream_init(&s, many, RP_TEXT_MAX_STOPS + 1, &err), RP_ERR_ARG);
}

static void expect_prompt(const rp_chat_message *m, int n, const char *lead, const char *want) {
    size_t len;
    char *p = rp_chat_prompt(m, n, lead, &len);
    assert_non_null(p);
    assert_string_equal(p, want);
    assert_int_equal(len, strlen(want));
    free(p);
}

#define MSG(r, s) {r, s, sizeof(s) - 1}

static void test_chat_prompt_is_the_official_rwkv_template(void **state) {
    (void)state;
    rp_chat_message one[] = {MSG(RP_CHAT_USER, "hi")};
    expect_prompt(one, 1, "", "User: hi\n\nAssistant:");
    rp_chat_message turns[] = {MSG(RP_CHAT_SYSTEM, "  Be brief.\n"), MSG(RP_CHAT_USER, "hi"),
                               MSG(RP_CHAT_ASSISTANT, "Hello!"), MSG(RP_CHAT_USER, "2+2?")};
    expect_prompt(turns, 4, "",
                  "System: Be brief.\n\nUser: hi\n\nAssistant: Hello!\n\nUser: 2+2?\n\nAssistant:");
}

static void test_chat_blank_lines_in_content_are_collapsed(void **state) {
    (void)state;
    rp_chat_message m[] = {MSG(RP_CHAT_USER, "a\n\n\nb\nc")};
    expect_prompt(m, 1, "", "User: a\nb\nc\n\nAssistant:");
}

/* The server returns a reply without the space after "Assistant:"; sent
 * back as history it gives the bytes the model saw. */
static void test_chat_reply_round_trips_through_the_history(void **state) {
    (void)state;
    const char *generated = " I am here.";
    size_t skip = rp_chat_reply_skip(generated, strlen(generated));
    assert_int_equal(skip, 1);
    rp_chat_message m[] = {MSG(RP_CHAT_USER, "hi"), {RP_CHAT_ASSISTANT, generated + skip, 10},
                           MSG(RP_CHAT_USER, "ok")};
    expect_prompt(m, 3, "", "User: hi\n\nAssistant: I am here.\n\nUser: ok\n\nAssistant:");
    /* a reply that ended in a newline needs only one more before the next turn */
    rp_chat_message nl[] = {MSG(RP_CHAT_USER, "hi"), MSG(RP_CHAT_ASSISTANT, "x\n"),
                            MSG(RP_CHAT_USER, "ok")};
    expect_prompt(nl, 3, "", "User: hi\n\nAssistant: x\n\nUser: ok\n\nAssistant:");
}

static void test_chat_last_assistant_message_is_continued(void **state) {
    (void)state;
    rp_chat_message m[] = {MSG(RP_CHAT_USER, "hi"), MSG(RP_CHAT_ASSISTANT, "Sure, ")};
    expect_prompt(m, 2, "", "User: hi\n\nAssistant: Sure, ");
    rp_chat_message e[] = {MSG(RP_CHAT_USER, "hi"), MSG(RP_CHAT_ASSISTANT, "")};
    expect_prompt(e, 2, "", "User: hi\n\nAssistant:");
}

static void test_session_continues_at_a_turn_boundary(void **state) {
    (void)state;
    assert_string_equal(rp_chat_session_lead("", 0), "");
    assert_string_equal(rp_chat_session_lead("x", 1), "\n\n");
    assert_string_equal(rp_chat_session_lead("x\n", 2), "\n");
    assert_string_equal(rp_chat_session_lead("\n\n", 2), "");
    rp_chat_message m[] = {MSG(RP_CHAT_USER, "next")};
    expect_prompt(m, 1, "\n\n", "\n\nUser: next\n\nAssistant:");
}

static void test_role_names(void **state) {
    (void)state;
    assert_int_equal(rp_chat_role_parse("system"), RP_CHAT_SYSTEM);
    assert_int_equal(rp_chat_role_parse("user"), RP_CHAT_USER);
    assert_int_equal(rp_chat_role_parse("assistant"), RP_CHAT_ASSISTANT);
    assert_int_equal(rp_chat_role_parse("tool"), -1);
    assert_int_equal(rp_chat_role_parse("User"), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stop_string_split_over_tokens_is_not_emitted),
        cmocka_unit_test(test_text_that_may_start_a_stop_string_is_held_back_then_released),
        cmocka_unit_test(test_earliest_of_several_stop_strings_wins),
        cmocka_unit_test(test_character_split_over_tokens_is_emitted_whole),
        cmocka_unit_test(test_invalid_bytes_become_one_replacement_per_maximal_subpart),
        cmocka_unit_test(test_streamed_pieces_concatenate_to_the_whole_text),
        cmocka_unit_test(test_keep_invalid_passes_bytes_through),
        cmocka_unit_test(test_stream_rejects_empty_and_too_many_stop_strings),
        cmocka_unit_test(test_chat_prompt_is_the_official_rwkv_template),
        cmocka_unit_test(test_chat_blank_lines_in_content_are_collapsed),
        cmocka_unit_test(test_chat_reply_round_trips_through_the_history),
        cmocka_unit_test(test_chat_last_assistant_message_is_continued),
        cmocka_unit_test(test_session_continues_at_a_turn_boundary),
        cmocka_unit_test(test_role_names),
    };
    return cmocka_run_group_tests_name("serve_text", tests, NULL, NULL);
}
