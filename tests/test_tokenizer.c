/* Tokenizer tests: the byte tokenizer, the World vocab parser (a hand-made
 * vocab in tests/data/vocab_handmade.txt with encodings worked out by hand,
 * and every malformed-line case), the official test vectors when
 * $RP_SHARED_DIR/vocab is present, and the streaming UTF-8 keeper. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"
#include "text/tokenizer.h"

/* ---- helpers ------------------------------------------------------------- */

static const char *data_dir(void) {
    const char *d = getenv("RP_TEST_DATA");
    return d ? d : "tests/data";
}

static rp_tokenizer *open_handmade(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/vocab_handmade.txt", data_dir());
    rp_tokenizer *tok = NULL;
    rp_error err = {0};
    rp_status st = rp_tokenizer_open(&tok, path, &err);
    if (st != RP_OK) fail_msg("%s", err.msg);
    return tok;
}

/* Encodes text and checks the ids, then decodes them back to the same bytes. */
static void expect_ids(const rp_tokenizer *tok, const char *text, size_t n, const int32_t *want, size_t n_want) {
    int32_t *ids = NULL;
    size_t n_ids = 0;
    rp_error err = {0};
    assert_int_equal(rp_tokenizer_encode(tok, (const uint8_t *)text, n, &ids, &n_ids, &err), RP_OK);
    if (n_ids != n_want || (n_want > 0 && memcmp(ids, want, n_want * sizeof *want) != 0)) {
        char got[1024] = "", exp[1024] = "";
        for (size_t i = 0; i < n_ids && strlen(got) < 1000; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), " %d", ids[i]);
        for (size_t i = 0; i < n_want && strlen(exp) < 1000; i++)
            snprintf(exp + strlen(exp), sizeof exp - strlen(exp), " %d", want[i]);
        free(ids);
        fail_msg("encoding of %zu bytes: got [%s ] expected [%s ]", n, got, exp);
    }
    uint8_t *bytes = NULL;
    size_t n_bytes = 0;
    assert_int_equal(rp_tokenizer_decode(tok, ids, n_ids, &bytes, &n_bytes, &err), RP_OK);
    assert_int_equal(n_bytes, n);
    assert_memory_equal(bytes, text, n);
    assert_int_equal(bytes[n], 0);
    free(bytes);
    free(ids);
}

#define EXPECT(tok, text, ...)                                                           \
    do {                                                                                 \
        const int32_t want_[] = {__VA_ARGS__};                                           \
        expect_ids(tok, text, sizeof(text) - 1, want_, sizeof want_ / sizeof want_[0]); \
    } while (0)

/* Deterministic pseudo-random bytes (xorshift), all 256 values likely. */
static void fill_random(uint8_t *buf, size_t n, uint64_t seed) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = (uint8_t)(x >> 24);
    }
}

static void expect_round_trip(const rp_tokenizer *tok, const uint8_t *buf, size_t n) {
    int32_t *ids = NULL;
    size_t n_ids = 0;
    uint8_t *back = NULL;
    size_t n_back = 0;
    rp_error err = {0};
    assert_int_equal(rp_tokenizer_encode(tok, buf, n, &ids, &n_ids, &err), RP_OK);
    for (size_t i = 0; i < n_ids; i++) {
        assert_true(ids[i] >= 0 && ids[i] < rp_tokenizer_n_ids(tok));
        if (strcmp(rp_tokenizer_kind(tok), "world") == 0) assert_int_not_equal(ids[i], 0);
    }
    assert_int_equal(rp_tokenizer_decode(tok, ids, n_ids, &back, &n_back, &err), RP_OK);
    assert_int_equal(n_back, n);
    assert_memory_equal(back, buf, n);
    free(back);
    free(ids);
}

/* Random bytes (mostly invalid UTF-8) plus a run of text-like bytes. */
static void round_trip_mixed(const rp_tokenizer *tok) {
    enum { N = 20000 };
    uint8_t *buf = malloc(N);
    assert_non_null(buf);
    fill_random(buf, N, 7);
    const char *text = "abcdef abcde the then \xf0\x9f\x98\x80 \xe2\x82 \xc3\xa9t\xc3\xa9 \\x \xff\xfe\x80";
    memcpy(buf + 100, text, strlen(text));
    for (size_t len = 0; len <= 64; len++) expect_round_trip(tok, buf, len);
    expect_round_trip(tok, buf, N);
    free(buf);
}

/* ---- bytes tokenizer ----------------------------------------------------- */

static void test_bytes_tokenizer_id_is_byte_value(void **state) {
    (void)state;
    rp_tokenizer *tok = NULL;
    rp_error err = {0};
    assert_int_equal(rp_tokenizer_open(&tok, "bytes", &err), RP_OK);
    assert_string_equal(rp_tokenizer_kind(tok), "bytes");
    assert_int_equal(rp_tokenizer_n_ids(tok), 256);
    assert_int_equal(rp_tokenizer_eot_id(tok), 0);
    EXPECT(tok, "Az\xff", 'A', 'z', 255);
    size_t len = 0;
    const uint8_t *b = rp_tokenizer_token_bytes(tok, 200, &len);
    assert_non_null(b);
    assert_int_equal(len, 1);
    assert_int_equal(b[0], 200);
    assert_null(rp_tokenizer_token_bytes(tok, 256, &len));
    assert_int_equal(len, 0);
    rp_tokenizer_free(tok);
}

static void test_bytes_tokenizer_round_trips_arbitrary_bytes(void **state) {
    (void)state;
    rp_tokenizer *tok = NULL;
    rp_error err = {0};
    assert_int_equal(rp_tokenizer_open(&tok, "bytes", &err), RP_OK);
    round_trip_mixed(tok);
    rp_tokenizer_free(tok);
}

static void test_bytes_tokenizer_decode_rejects_out_of_range_with_position(void **state) {
    (void)state;
    rp_tokenizer *tok = NULL;
    rp_error err = {0};
    assert_int_equal(rp_tokenizer_open(&tok, "bytes", &err), RP_OK);
    const int32_t ids[] = {65, 66, 256};
    uint8_t *bytes = (uint8_t *)"sentinel";
    size_t n = 99;
    assert_int_equal(rp_tokenizer_decode(tok, ids, 3, &bytes, &n, &err), RP_ERR_ARG);
    assert_null(bytes);
    assert_non_null(strstr(err.msg, "256"));
    assert_non_null(strstr(err.msg, "position 2"));
    const int32_t negative[] = {-1};
    assert_int_equal(rp_tokenizer_decode(tok, negative, 1, &bytes, &n, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "position 0"));
    rp_tokenizer_free(tok);
}

/* ---- hand-made World vocab ----------------------------------------------- */

static void test_handmade_vocab_loads_every_literal_form(void **state) {
    (void)state;
    rp_tokenizer *tok = open_handmade();
    assert_string_equal(rp_tokenizer_kind(tok), "world");
    assert_int_equal(rp_tokenizer_n_ids(tok), 283);
    assert_int_equal(rp_tokenizer_eot_id(tok), 0);
    /* Single bytes are id = byte + 1, whatever the literal form on the line:
     * '\0' octal, '\a'..'\r', '\033', '\x1F', "'", '\\', b'Z', b'\310', b'\xFF'. */
    for (int b = 0; b < 256; b++) {
        size_t len = 0;
        const uint8_t *bytes = rp_tokenizer_token_bytes(tok, b + 1, &len);
        assert_non_null(bytes);
        assert_int_equal(len, 1);
        assert_int_equal(bytes[0], b);
    }
    struct {
        int32_t id;
        const char *bytes;
        size_t len;
    } multi[] = {
        {261, "\\n", 2},                      /* '\\n': backslash, n */
        {262, "\xc3\xa9", 2},                 /* '\xe9' in a str is U+00E9, UTF-8 encoded */
        {263, "\xe2\x82", 2},                 /* b'\xe2\x82' raw bytes */
        {264, "\xe2\x82\xac", 3},             /* '\u20ac' */
        {265, "\xf0\x9f\x98\x80", 4},         /* '\U0001F600' */
        {269, "\"q\"", 3},                    /* "\"q\"" */
        {270, "ABC", 3},                      /* '\101\102C' octal */
        {271, "\xc3\xa9t\xc3\xa9", 5},        /* raw UTF-8 'été' */
        {273, "x\ty", 3},                     /* b'x\ty' */
        {279, "\\x", 2},                      /* b'\\x' */
        {280, "\0\0", 2},                     /* '\x00\x00' */
        {282, "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e", 9}, /* '\u65e5\u672c\u8a9e' */
    };
    for (size_t i = 0; i < sizeof multi / sizeof multi[0]; i++) {
        size_t len = 0;
        const uint8_t *bytes = rp_tokenizer_token_bytes(tok, multi[i].id, &len);
        assert_non_null(bytes);
        assert_int_equal(len, multi[i].len);
        assert_memory_equal(bytes, multi[i].bytes, len);
    }
    size_t len = 7;
    assert_null(rp_tokenizer_token_bytes(tok, 0, &len)); /* end of text has no bytes */
    assert_int_equal(len, 0);
    assert_null(rp_tokenizer_token_bytes(tok, 283, &len));
    assert_null(rp_tokenizer_token_bytes(tok, -5, &len));
    rp_tokenizer_free(tok);
}

/* Ids below: a single byte c is c + 1 ('a' 98, 'c' 100, 'e' 102, 'n' 111,
 * 'q' 114, 'r' 115, 'x' 121, 'A' 66, 'D' 69, ' ' 33, '\t' 10, NUL 1). */
static void test_handmade_vocab_takes_longest_match(void **state) {
    (void)state;
    rp_tokenizer *tok = open_handmade();
    expect_ids(tok, "", 0, NULL, 0);
    EXPECT(tok, "ab", 257);
    EXPECT(tok, "abcdef", 259);
    EXPECT(tok, "abcdefab", 259, 257);
    EXPECT(tok, "aab", 98, 257);
    EXPECT(tok, "then", 277);
    EXPECT(tok, "the", 275);
    /* ' the' wins over ' ' + 'then' : greedy is left to right, not fewest tokens */
    EXPECT(tok, " then the", 276, 111, 276);
    EXPECT(tok, "it's", 260);
    EXPECT(tok, "ABC", 270);
    EXPECT(tok, "ABD", 278, 69);
    EXPECT(tok, "\t\t\t", 266, 10);
    EXPECT(tok, "     ", 268, 33);
    EXPECT(tok, "   ", 267, 33);
    EXPECT(tok, "\"q\"", 269);
    EXPECT(tok, "\\n\n", 261, 11);
    EXPECT(tok, "\\x", 279);
    EXPECT(tok, "x\ty", 273);
    EXPECT(tok, "\0\0\0", 280, 1);
    EXPECT(tok, "\xc3\xa9t\xc3\xa9\xc3\xa9", 271, 262);
    EXPECT(tok, "\xe2\x82\xac", 264);
    EXPECT(tok, "\xf0\x9f\x98\x80", 265);
    EXPECT(tok, "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e", 282);
    EXPECT(tok, "\xe6\x97\xa5\xe6\x9c\xac", 281);
    /* 日本人: 人 = e4 ba ba has no token of its own */
    EXPECT(tok, "\xe6\x97\xa5\xe6\x9c\xac\xe4\xba\xba", 281, 229, 187, 187);
    rp_tokenizer_free(tok);
}

static void test_handmade_vocab_falls_back_from_dead_ends(void **state) {
    (void)state;
    rp_tokenizer *tok = open_handmade();
    /* The trie walk for "abcde" reaches abcde (a prefix of abcdef) and must
     * return to the last complete token abcd. */
    EXPECT(tok, "abcde", 258, 102);
    EXPECT(tok, "abcdex", 258, 102, 121);
    EXPECT(tok, "abc", 257, 100);
    EXPECT(tok, "thex", 275, 121);
    /* "qr" begins qrs but is not a token: fall back to the single byte. */
    EXPECT(tok, "qrx", 114, 115, 121);
    EXPECT(tok, "qrs", 274);
    /* e2 82 begins € and is itself a b'' token; e2 82 x stops there. */
    EXPECT(tok, "\xe2\x82x", 263, 121);
    /* f0 9f 98 is a dead end below 😀: b'\xf0\x9f' then the byte 0x98. */
    EXPECT(tok, "\xf0\x9f\x98", 272, 153);
    /* a str '\xe9' token is c3 a9, so the raw byte e9 is its single byte */
    EXPECT(tok, "\xe9", 234);
    rp_tokenizer_free(tok);
}

static void test_handmade_vocab_round_trips_arbitrary_bytes(void **state) {
    (void)state;
    rp_tokenizer *tok = open_handmade();
    round_trip_mixed(tok);
    rp_tokenizer_free(tok);
}

static void test_world_decode_rejects_end_of_text_and_out_of_range(void **state) {
    (void)state;
    rp_tokenizer *tok = open_handmade();
    rp_error err = {0};
    uint8_t *bytes = NULL;
    size_t n = 0;
    const int32_t eot[] = {98, 0};
    assert_int_equal(rp_tokenizer_decode(tok, eot, 2, &bytes, &n, &err), RP_ERR_ARG);
    assert_null(bytes);
    assert_non_null(strstr(err.msg, "position 1"));
    const int32_t big[] = {98, 99, 257, 283};
    assert_int_equal(rp_tokenizer_decode(tok, big, 4, &bytes, &n, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "283"));
    assert_non_null(strstr(err.msg, "position 3"));
    rp_tokenizer_free(tok);
}

/* ---- malformed vocab files ----------------------------------------------- */

/* Writes two good lines followed by bad_line (line 3) and more good lines,
 * opens it, and checks the error names "<file>:3:" and the expected words. */
static void expect_vocab_rejected_at(const char *content, int line, const char *words) {
    char path[] = "/tmp/rp_test_vocab_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t len = strlen(content);
    assert_int_equal(write(fd, content, len), (ssize_t)len);
    close(fd);
    rp_tokenizer *tok = (rp_tokenizer *)&fd; /* garbage: open must reset it to NULL */
    rp_error err = {0};
    rp_status st = rp_tokenizer_open(&tok, path, &err);
    unlink(path);
    if (st == RP_OK) {
        rp_tokenizer_free(tok);
        fail_msg("vocab accepted, expected an error at line %d with '%s'", line, words);
    }
    assert_int_equal(st, RP_ERR_FORMAT);
    assert_null(tok);
    char where[4200];
    snprintf(where, sizeof where, "%s:%d: ", path, line);
    if (strncmp(err.msg, where, strlen(where)) != 0 || !strstr(err.msg, words))
        fail_msg("message '%s' should start with '%s' and contain '%s'", err.msg, where, words);
}

#define GOOD2 "1 'a' 1\n2 b'\\xff' 1\n"

static void test_vocab_rejects_bad_id(void **state) {
    (void)state;
    expect_vocab_rejected_at(GOOD2 "x3 'c' 1\n4 'd' 1\n", 3, "bad id 'x3'");
    expect_vocab_rejected_at(GOOD2 "0 'c' 1\n", 3, "bad id '0'");
    expect_vocab_rejected_at(GOOD2 "-3 'c' 1\n", 3, "bad id '-3'");
    expect_vocab_rejected_at(GOOD2 "99999999999 'c' 1\n", 3, "bad id");
}

static void test_vocab_rejects_duplicate_id(void **state) {
    (void)state;
    expect_vocab_rejected_at(GOOD2 "1 'c' 1\n", 3, "duplicate id 1 (first defined on line 1)");
}

static void test_vocab_rejects_duplicate_token_bytes(void **state) {
    (void)state;
    expect_vocab_rejected_at(GOOD2 "3 b'a' 1\n", 3, "same bytes as token 1");
}

static void test_vocab_rejects_unterminated_literal(void **state) {
    (void)state;
    expect_vocab_rejected_at(GOOD2 "3 'abc 3\n", 3, "unterminated literal");
    expect_vocab_rejected_at(GOOD2 "3 'ab\\' 3\n", 3, "unterminated literal");
    expect_vocab_rejected_at(GOOD2 "3 \"ab' 2\n", 3, "unterminated literal");
}

static void test_vocab_rejects_bad_escape(void **state) {
    (void)state;
    expect_vocab_rejected_at(GOOD2 "3 '\\q' 1\n", 3, "bad escape \\q");
    expect_vocab_rejected_at(GOOD2 "3 '\\xZ1' 1\n", 3, "bad escape \\x");
    expect_vocab_rejected_at(GOOD2 "3 '\\u12' 1\n", 3, "bad escape \\u");
    expect_vocab_rejected_at(GOOD2 "3 b'\\u1234' 1\n", 3, "bad escape \\u");
    expect_vocab_rejected_at(GOOD2 "3 '\\ud800' 3\n", 3, "not encodable");
    expect_vocab_rejected_at(GOOD2 "3 '\\U00110000' 4\n", 3, "not encodable");
}

static void test_vocab_rejects_length_mismatch(void **state) {
    (void)state;
    expect_vocab_rejected_at(GOOD2 "3 'ab' 3\n", 3, "byte length 3 does not match literal (2 bytes)");
    /* a str \xe9 is two bytes in UTF-8, not one */
    expect_vocab_rejected_at(GOOD2 "3 '\\xe9' 1\n", 3, "byte length 1 does not match literal (2 bytes)");
    expect_vocab_rejected_at(GOOD2 "3 'ab' 2x\n", 3, "bad byte length '2x'");
}

static void test_vocab_rejects_missing_fields(void **state) {
    (void)state;
    expect_vocab_rejected_at(GOOD2 "3 'c'\n", 3, "missing fields");
    expect_vocab_rejected_at(GOOD2 "3\n", 3, "missing fields");
    expect_vocab_rejected_at(GOOD2 "\n4 'd' 1\n", 3, "missing fields");
    expect_vocab_rejected_at(GOOD2 "3  1\n", 3, "literal must start");
}

static void test_vocab_rejects_malformed_literals(void **state) {
    (void)state;
    expect_vocab_rejected_at(GOOD2 "3 'a'b' 3\n", 3, "after the closing");
    expect_vocab_rejected_at(GOOD2 "3 b'\xc3\xa9' 2\n", 3, "non-ASCII byte 0xc3");
    expect_vocab_rejected_at(GOOD2 "3 '\xff' 1\n", 3, "invalid UTF-8");
    expect_vocab_rejected_at(GOOD2 "3 '' 0\n", 3, "empty token");
    expect_vocab_rejected_at(GOOD2 "3 r'a' 1\n", 3, "literal must start");
}

static void test_vocab_missing_file_is_io_error(void **state) {
    (void)state;
    rp_tokenizer *tok = NULL;
    rp_error err = {0};
    assert_int_equal(rp_tokenizer_open(&tok, "/nonexistent/vocab.txt", &err), RP_ERR_IO);
    assert_null(tok);
    assert_non_null(strstr(err.msg, "/nonexistent/vocab.txt"));
}

static void test_vocab_accepts_crlf_and_no_final_newline(void **state) {
    (void)state;
    char path[] = "/tmp/rp_test_vocab_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *content = "1 'a' 1\r\n5 ' b' 2\r\n3 'b' 1";
    assert_int_equal(write(fd, content, strlen(content)), (ssize_t)strlen(content));
    close(fd);
    rp_tokenizer *tok = NULL;
    rp_error err = {0};
    rp_status st = rp_tokenizer_open(&tok, path, &err);
    unlink(path);
    if (st != RP_OK) fail_msg("%s", err.msg);
    assert_int_equal(rp_tokenizer_n_ids(tok), 6); /* max id + 1, gaps allowed */
    assert_null(rp_tokenizer_token_bytes(tok, 2, NULL));
    EXPECT(tok, "a bb", 1, 5, 3);
    /* no single-byte token for 'z': an error naming the byte and offset */
    int32_t *ids = NULL;
    size_t n_ids = 0;
    assert_int_equal(rp_tokenizer_encode(tok, (const uint8_t *)"abz", 3, &ids, &n_ids, &err), RP_ERR_ARG);
    assert_null(ids);
    assert_non_null(strstr(err.msg, "0x7a at offset 2"));
    rp_tokenizer_free(tok);
}

/* ---- official World vocab and test vectors -------------------------------- */

static int shared_path(char *out, size_t size, const char *file) {
    const char *dir = getenv("RP_SHARED_DIR");
    if (!dir) return 0;
    snprintf(out, size, "%s/vocab/%s", dir, file);
    return access(out, R_OK) == 0;
}

static void test_world_vocab_matches_official_test_vectors(void **state) {
    (void)state;
    char vocab_path[4096], cases_path[4096];
    if (!shared_path(vocab_path, sizeof vocab_path, "rwkv_vocab_v20230424.txt") ||
        !shared_path(cases_path, sizeof cases_path, "world_tokenizer_cases.jsonl")) {
        skip();
        return;
    }
    rp_tokenizer *tok = NULL;
    rp_error err = {0};
    if (rp_tokenizer_open(&tok, vocab_path, &err) != RP_OK) fail_msg("%s", err.msg);
    assert_int_equal(rp_tokenizer_n_ids(tok), 65530);
    size_t len = 0;
    const uint8_t *b = rp_tokenizer_token_bytes(tok, 65529, &len); /* 128 spaces */
    assert_non_null(b);
    assert_int_equal(len, 128);
    assert_null(rp_tokenizer_token_bytes(tok, 0, &len));

    FILE *f = fopen(cases_path, "r");
    assert_non_null(f);
    char *line = NULL;
    size_t cap = 0;
    int line_no = 0;
    while (getline(&line, &cap, f) > 0) {
        line_no++;
        json_error_t jerr;
        json_t *rec = json_loads(line, JSON_ALLOW_NUL, &jerr);
        if (!rec) fail_msg("%s:%d: %s", cases_path, line_no, jerr.text);
        json_t *text = json_object_get(rec, "text"), *want = json_object_get(rec, "ids");
        assert_true(json_is_string(text) && json_is_array(want));
        const uint8_t *bytes = (const uint8_t *)json_string_value(text);
        size_t n = json_string_length(text);
        size_t n_want = json_array_size(want);
        int32_t *ids = NULL;
        size_t n_ids = 0;
        assert_int_equal(rp_tokenizer_encode(tok, bytes, n, &ids, &n_ids, &err), RP_OK);
        int same = n_ids == n_want;
        for (size_t i = 0; same && i < n_ids; i++) same = ids[i] == json_integer_value(json_array_get(want, i));
        if (!same) fail_msg("%s:%d: encoding differs (%zu ids, expected %zu)", cases_path, line_no, n_ids, n_want);
        uint8_t *back = NULL;
        size_t n_back = 0;
        assert_int_equal(rp_tokenizer_decode(tok, ids, n_ids, &back, &n_back, &err), RP_OK);
        assert_int_equal(n_back, n);
        assert_memory_equal(back, bytes, n);
        free(back);
        free(ids);
        json_decref(rec);
    }
    free(line);
    fclose(f);
    assert_int_equal(line_no, 73);
    rp_tokenizer_free(tok);
}

static void test_world_vocab_round_trips_and_encodes_1mb_quickly(void **state) {
    (void)state;
    char vocab_path[4096], cases_path[4096];
    if (!shared_path(vocab_path, sizeof vocab_path, "rwkv_vocab_v20230424.txt") ||
        !shared_path(cases_path, sizeof cases_path, "world_tokenizer_cases.jsonl")) {
        skip();
        return;
    }
    rp_tokenizer *tok = NULL;
    rp_error err = {0};
    if (rp_tokenizer_open(&tok, vocab_path, &err) != RP_OK) fail_msg("%s", err.msg);
    round_trip_mixed(tok);

    /* 1 MiB of realistic mixed text: the test vector file itself, repeated. */
    FILE *f = fopen(cases_path, "rb");
    assert_non_null(f);
    enum { MIB = 1 << 20 };
    uint8_t *text = malloc(MIB);
    assert_non_null(text);
    size_t got = fread(text, 1, MIB, f);
    fclose(f);
    assert_true(got > 0);
    for (size_t i = got; i < MIB; i++) text[i] = text[i - got];
    const double t0 = rp_now_seconds();
    int32_t *ids = NULL;
    size_t n_ids = 0;
    assert_int_equal(rp_tokenizer_encode(tok, text, MIB, &ids, &n_ids, &err), RP_OK);
    const double seconds = rp_now_seconds() - t0;
    /* Typically ~20 ms; the bound leaves room for sanitizers and a busy machine. */
    if (seconds > 2.0) fail_msg("encoding 1 MiB took %.3f s", seconds);
    assert_true(n_ids > MIB / 8 && n_ids < MIB);
    uint8_t *back = NULL;
    size_t n_back = 0;
    assert_int_equal(rp_tokenizer_decode(tok, ids, n_ids, &back, &n_back, &err), RP_OK);
    assert_int_equal(n_back, (size_t)MIB);
    assert_memory_equal(back, text, MIB);
    free(back);
    free(ids);
    free(text);
    rp_tokenizer_free(tok);
}

/* ---- streaming UTF-8 ------------------------------------------------------ */

static size_t push(rp_utf8_stream *s, const char *bytes, size_t n) {
    size_t ready = 99;
    rp_error err = {0};
    assert_int_equal(rp_utf8_stream_push(s, (const uint8_t *)bytes, n, &ready, &err), RP_OK);
    return ready;
}

static void test_stream_holds_emoji_split_over_tokens_until_complete(void **state) {
    (void)state;
    rp_tokenizer *tok = open_handmade();
    /* 😀 after "a" encodes as the dead end b'\xf0\x9f' + 0x98 + 0x80 in the
     * hand-made vocab; decode token by token. */
    const int32_t ids[] = {98, 272, 153, 129, 98};
    const size_t want_ready[] = {1, 0, 0, 4, 1};
    rp_utf8_stream s;
    rp_utf8_stream_init(&s);
    uint8_t out[16];
    size_t n_out = 0;
    for (size_t i = 0; i < 5; i++) {
        size_t len = 0;
        const uint8_t *b = rp_tokenizer_token_bytes(tok, ids[i], &len);
        assert_non_null(b);
        size_t ready = push(&s, (const char *)b, len);
        assert_int_equal(ready, want_ready[i]);
        memcpy(out + n_out, rp_utf8_stream_data(&s), ready);
        n_out += ready;
        rp_utf8_stream_consume(&s, ready);
    }
    assert_int_equal(rp_utf8_stream_finish(&s), 0);
    assert_int_equal(n_out, 6);
    assert_memory_equal(out, "a\xf0\x9f\x98\x80" "a", 6);
    rp_utf8_stream_free(&s);
    rp_tokenizer_free(tok);
}

static void test_stream_releases_nothing_until_each_character_completes(void **state) {
    (void)state;
    rp_utf8_stream s;
    rp_utf8_stream_init(&s);
    const char *emoji = "\xf0\x9f\x98\x80";
    assert_int_equal(push(&s, "hi", 2), 2);
    assert_int_equal(push(&s, emoji, 1), 2);     /* held: f0 */
    assert_int_equal(push(&s, emoji + 1, 1), 2); /* held: f0 9f */
    assert_int_equal(push(&s, emoji + 2, 1), 2); /* held: f0 9f 98 */
    assert_int_equal(push(&s, emoji + 3, 1), 6);
    assert_memory_equal(rp_utf8_stream_data(&s), "hi\xf0\x9f\x98\x80", 6);
    rp_utf8_stream_consume(&s, 6);
    assert_int_equal(push(&s, "\xe2\x82", 2), 0);
    assert_int_equal(push(&s, "\xac", 1), 3);
    rp_utf8_stream_consume(&s, 1); /* partial consume keeps the rest ready */
    assert_int_equal(push(&s, "", 0), 2);
    assert_memory_equal(rp_utf8_stream_data(&s), "\x82\xac", 2);
    rp_utf8_stream_consume(&s, 2);
    rp_utf8_stream_free(&s);
}

static void test_stream_passes_invalid_bytes_through(void **state) {
    (void)state;
    rp_utf8_stream s;
    rp_utf8_stream_init(&s);
    assert_int_equal(push(&s, "\xff", 1), 1);         /* never valid */
    assert_int_equal(push(&s, "\x80", 1), 2);         /* lone continuation */
    assert_int_equal(push(&s, "\xc0\xaf", 2), 4);     /* overlong lead c0 */
    assert_int_equal(push(&s, "\xf0" "A", 2), 6);     /* f0 cut short by 'A' */
    assert_int_equal(push(&s, "\xed\xa0\x80", 3), 9); /* surrogate: ed a0 never valid */
    assert_int_equal(push(&s, "\xe2\x82", 2), 9);     /* valid prefix: held */
    assert_int_equal(push(&s, "\xe2", 1), 11);        /* e2 82 cut short by e2: released */
    assert_memory_equal(rp_utf8_stream_data(&s), "\xff\x80\xc0\xaf\xf0" "A\xed\xa0\x80\xe2\x82", 11);
    /* the final e2 is a valid prefix, released only by finish() */
    rp_utf8_stream_consume(&s, 11);
    assert_int_equal(push(&s, "", 0), 0);
    assert_int_equal(rp_utf8_stream_finish(&s), 1);
    assert_int_equal(rp_utf8_stream_data(&s)[0], 0xe2);
    rp_utf8_stream_consume(&s, 1);
    assert_int_equal(rp_utf8_stream_finish(&s), 0);
    rp_utf8_stream_free(&s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bytes_tokenizer_id_is_byte_value),
        cmocka_unit_test(test_bytes_tokenizer_round_trips_arbitrary_bytes),
        cmocka_unit_test(test_bytes_tokenizer_decode_rejects_out_of_range_with_position),
        cmocka_unit_test(test_handmade_vocab_loads_every_literal_form),
        cmocka_unit_test(test_handmade_vocab_takes_longest_match),
        cmocka_unit_test(test_handmade_vocab_falls_back_from_dead_ends),
        cmocka_unit_test(test_handmade_vocab_round_trips_arbitrary_bytes),
        cmocka_unit_test(test_world_decode_rejects_end_of_text_and_out_of_range),
        cmocka_unit_test(test_vocab_rejects_bad_id),
        cmocka_unit_test(test_vocab_rejects_duplicate_id),
        cmocka_unit_test(test_vocab_rejects_duplicate_token_bytes),
        cmocka_unit_test(test_vocab_rejects_unterminated_literal),
        cmocka_unit_test(test_vocab_rejects_bad_escape),
        cmocka_unit_test(test_vocab_rejects_length_mismatch),
        cmocka_unit_test(test_vocab_rejects_missing_fields),
        cmocka_unit_test(test_vocab_rejects_malformed_literals),
        cmocka_unit_test(test_vocab_missing_file_is_io_error),
        cmocka_unit_test(test_vocab_accepts_crlf_and_no_final_newline),
        cmocka_unit_test(test_world_vocab_matches_official_test_vectors),
        cmocka_unit_test(test_world_vocab_round_trips_and_encodes_1mb_quickly),
        cmocka_unit_test(test_stream_holds_emoji_split_over_tokens_until_complete),
        cmocka_unit_test(test_stream_releases_nothing_until_each_character_completes),
        cmocka_unit_test(test_stream_passes_invalid_bytes_through),
    };
    return cmocka_run_group_tests_name("tokenizer", tests, NULL, NULL);
}
