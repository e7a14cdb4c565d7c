/* Structured-output recogniser and token masks (src/text/json_grammar.c, json_mask.c): JSON
 * documents accepted and rejected byte by byte (escapes, \u, numbers, the depth limit), each
 * schema feature, unsupported keywords, and masks over the byte tokenizer and (when
 * $RP_SHARED_DIR/vocab is there) the World vocabulary, checked against feeding every token. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/json_grammar.h"
#include "text/json_mask.h"

/* 1: the whole text is accepted and complete; 0: a byte is refused or it is not complete;
 * returns through *refused the offset of the refused byte (-1 if none). */
static int accepts(const rp_json_grammar *g, const char *text, int *refused, rp_json_result *why) {
    rp_json_state s;
    rp_json_start(g, &s);
    if (refused) *refused = -1;
    for (size_t i = 0; text[i]; i++) {
        rp_json_result r = rp_json_feed(g, &s, (uint8_t)text[i]);
        if (r != RP_JSON_OK) {
            if (refused) *refused = (int)i;
            if (why) *why = r;
            return 0;
        }
    }
    return rp_json_complete(g, &s);
}

static rp_json_grammar *schema(const char *text) {
    rp_json_grammar *g = NULL;
    rp_error err = {0};
    if (rp_json_grammar_schema(&g, text, strlen(text), &err) != RP_OK) fail_msg("%s: %s", text, err.msg);
    return g;
}

static void test_any_object(void **state) {
    (void)state;
    rp_json_grammar *g = NULL;
    assert_int_equal(rp_json_grammar_object(&g, NULL), RP_OK);
    static const char *good[] = {
        "{}", " {}", "{\"a\":1}", "{\"a\": -0.5e+3, \"b\": [true, false, null]}",
        "{\"s\":\"x\\\"y\\\\z\\/\\b\\f\\n\\r\\t\"}", "{\"u\":\"\\u00e9\\u4E2d\"}",
        "{\"n\":[0, -0, 12, 1.25, 1e5, 1E-2, 3.0e+10]}", "{\"k\":{\"a\":{\"b\":[[], {}]}}}",
        "{\"utf8\":\"caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80\"}", "{\"\":\"\"}", NULL};
    for (int i = 0; good[i]; i++) {
        int at;
        if (!accepts(g, good[i], &at, NULL)) fail_msg("refused %s at %d", good[i], at);
    }
    static const char *bad[] = {
        "[]", "1", "\"x\"", "{a:1}", "{\"a\":01}", "{\"a\":1.}", "{\"a\":.5}", "{\"a\":-}",
        "{\"a\":1e}", "{\"a\":tru}", "{\"a\":True}", "{\"a\":1,}", "{,}", "{\"a\" 1}",
        "{\"a\":[1,]}", "{\"a\":\"\\x\"}", "{\"a\":\"\\u12G4\"}", "{\"a\":\"\\ud800\"}",
        "{\"a\":\"\x01\"}", "{\"a\":\"\xc0\xaf\"}", "{\"a\":\"\xed\xa0\x80\"}", "{\"a\":\"\xff\"}",
        "{} ", "{}{}", "{\"a\":1", "{\"a\":[1}", "{\"a\":\"x}", "{\"a\":nul}", "{\"a\":+1}",
        "{\"a\":1         }", NULL};
    for (int i = 0; bad[i]; i++)
        if (accepts(g, bad[i], NULL, NULL)) fail_msg("accepted %s", bad[i]);
    /* A prefix of a good document is alive but not complete. */
    rp_json_state s;
    rp_json_start(g, &s);
    for (const char *p = "{\"a\":12"; *p; p++) assert_int_equal(rp_json_feed(g, &s, (uint8_t)*p), RP_JSON_OK);
    assert_false(rp_json_complete(g, &s));
    rp_json_grammar_free(g);
}

static void test_depth_limit(void **state) {
    (void)state;
    rp_json_grammar *g = NULL;
    assert_int_equal(rp_json_grammar_object(&g, NULL), RP_OK);
    char doc[200] = "{\"a\":";
    size_t n = strlen(doc);
    for (int i = 0; i < 40; i++) doc[n++] = '[';
    doc[n] = 0;
    rp_json_result why = RP_JSON_OK;
    int at = -1;
    assert_false(accepts(g, doc, &at, &why));
    assert_int_equal(why, RP_JSON_TOO_DEEP);
    assert_int_equal(at, 5 + RP_JSON_MAX_DEPTH - 1); /* the object is frame 1 */
    rp_json_grammar_free(g);
    /* A schema nesting too deep is refused when compiled, with a message saying so. */
    char sch[4096] = "";
    for (int i = 0; i < 40; i++) strcat(sch, "{\"type\":\"array\",\"items\":");
    strcat(sch, "{\"type\":\"null\"}");
    for (int i = 0; i < 40; i++) strcat(sch, "}");
    rp_error err = {0};
    assert_int_not_equal(rp_json_grammar_schema(&g, sch, strlen(sch), &err), RP_OK);
    assert_non_null(strstr(err.msg, "nests deeper"));
    rp_json_grammar_free(g);
}

static void test_schema_features(void **state) {
    (void)state;
    rp_json_grammar *g = schema(
        "{\"type\":\"object\",\"properties\":{"
        "\"name\":{\"type\":\"string\",\"minLength\":1,\"maxLength\":3},"
        "\"age\":{\"type\":\"integer\"},"
        "\"kind\":{\"enum\":[\"cat\",\"dog\",1,12,null]},"
        "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"boolean\"},\"minItems\":1,\"maxItems\":2},"
        "\"pos\":{\"$ref\":\"#/$defs/point\"},"
        "\"v\":{\"const\":\"k\"},"
        "\"opt\":{\"anyOf\":[{\"type\":\"number\"},{\"type\":\"null\"},{\"type\":\"string\"}]}},"
        "\"required\":[\"name\",\"age\",\"kind\",\"tags\"],\"additionalProperties\":false,"
        "\"$defs\":{\"point\":{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"number\"}},"
        "\"required\":[\"x\"]}}}");
    static const char *good[] = {
        "{\"name\":\"ab\",\"age\":-3,\"kind\":\"cat\",\"tags\":[true]}",
        "{\"name\":\"\xc3\xa9\\n\",\"age\":0,\"kind\":12,\"tags\":[true,false],\"pos\":{\"x\":1.5}}",
        "{\"name\":\"abc\",\"age\":7,\"kind\":1,\"tags\":[false],\"v\":\"k\",\"opt\":null}",
        "{\"name\":\"a\",\"age\":7,\"kind\":null,\"tags\":[false],\"opt\":\"x\"}",
        "{ \"name\" : \"a\" , \"age\" : 7 , \"kind\" : \"dog\" , \"tags\" : [ true ] , \"opt\" : 2 }",
        NULL};
    for (int i = 0; good[i]; i++) {
        int at;
        if (!accepts(g, good[i], &at, NULL)) fail_msg("refused %s at %d", good[i], at);
    }
    static const char *bad[] = {
        "{\"name\":\"\",\"age\":1,\"kind\":1,\"tags\":[true]}",          /* minLength */
        "{\"name\":\"abcd\",\"age\":1,\"kind\":1,\"tags\":[true]}",      /* maxLength */
        "{\"name\":\"a\",\"age\":1.5,\"kind\":1,\"tags\":[true]}",        /* integer */
        "{\"name\":\"a\",\"age\":1e2,\"kind\":1,\"tags\":[true]}",
        "{\"name\":\"a\",\"age\":1,\"kind\":\"cow\",\"tags\":[true]}",    /* enum */
        "{\"name\":\"a\",\"age\":1,\"kind\":123,\"tags\":[true]}",
        "{\"name\":\"a\",\"age\":1,\"kind\":1,\"tags\":[]}",              /* minItems */
        "{\"name\":\"a\",\"age\":1,\"kind\":1,\"tags\":[true,true,true]}",/* maxItems */
        "{\"name\":\"a\",\"age\":1,\"kind\":1,\"tags\":[1]}",             /* items */
        "{\"name\":\"a\",\"age\":1,\"kind\":1}",                          /* required */
        "{\"age\":1,\"name\":\"a\",\"kind\":1,\"tags\":[true]}",          /* order */
        "{\"name\":\"a\",\"age\":1,\"kind\":1,\"tags\":[true],\"zz\":1}", /* additional */
        "{\"name\":\"a\",\"age\":1,\"kind\":1,\"tags\":[true],\"pos\":{}}", /* $ref's required */
        "{\"name\":\"a\",\"age\":1,\"kind\":1,\"tags\":[true],\"v\":\"q\"}", /* const */
        "{\"name\":\"a\",\"age\":1,\"kind\":1,\"tags\":[true],\"opt\":true}", /* anyOf */
        NULL};
    for (int i = 0; bad[i]; i++)
        if (accepts(g, bad[i], NULL, NULL)) fail_msg("accepted %s", bad[i]);
    rp_json_grammar_free(g);

    /* Recursion through definitions, type lists, top-level scalars end only at the end. */
    g = schema("{\"$ref\":\"#/definitions/t\",\"definitions\":{\"t\":{\"type\":\"object\","
               "\"properties\":{\"c\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/definitions/t\"}}}}}}");
    assert_true(accepts(g, "{\"c\":[{},{\"c\":[{\"c\":[]}]}]}", NULL, NULL));
    assert_false(accepts(g, "{\"c\":[1]}", NULL, NULL));
    rp_json_grammar_free(g);
    g = schema("{\"type\":[\"integer\",\"null\"]}");
    assert_true(accepts(g, "42", NULL, NULL));
    assert_true(accepts(g, "null", NULL, NULL));
    assert_false(accepts(g, "4.2", NULL, NULL));
    rp_json_grammar_free(g);
}

static void test_schema_errors(void **state) {
    (void)state;
    static const struct { const char *schema, *want; } cases[] = {
        {"{\"type\":\"string\",\"pattern\":\"^a\"}", "\"pattern\" is not supported"},
        {"{\"type\":\"string\",\"format\":\"date\"}", "\"format\" is not supported"},
        {"{\"type\":\"number\",\"minimum\":1}", "\"minimum\" is not supported"},
        {"{\"type\":\"object\",\"properties\":{\"a\":{\"not\":{}}}}", "\"not\" is not supported"},
        {"{\"$ref\":\"#/$defs/missing\"}", "names no definition"},
        {"{\"$ref\":\"http://x/y\"}", "is not supported"},
        {"{\"anyOf\":[{\"type\":\"object\"},{\"type\":\"object\"}]}", "both start with '{'"},
        {"{\"type\":\"object\",\"properties\":{\"a\":{}},\"required\":[\"b\"]}", "\"b\" is not in"},
        {"{\"type\":\"thing\"}", "unknown type"},
        {"{\"type\":\"object\",\"properties\":{\"a\":{}},\"additionalProperties\":true}", "additionalProperties"},
        {"{not json", "not valid JSON"},
        {NULL, NULL}};
    for (int i = 0; cases[i].schema; i++) {
        rp_json_grammar *g = NULL;
        rp_error err = {0};
        rp_status st = rp_json_grammar_schema(&g, cases[i].schema, strlen(cases[i].schema), &err);
        if (st == RP_OK) fail_msg("compiled %s", cases[i].schema);
        assert_null(g);
        if (!strstr(err.msg, cases[i].want)) fail_msg("%s: message \"%s\" lacks \"%s\"", cases[i].schema, err.msg, cases[i].want);
    }
}

/* The mask at a state equals "each token's bytes fed to a copy of the state are accepted",
 * plus the end token exactly when the document is complete. */
static void check_masks(const rp_tokenizer *tok, const rp_json_grammar *g, const char *prefixes[]) {
    rp_token_trie *t = NULL;
    assert_int_equal(rp_token_trie_build(&t, tok, NULL), RP_OK);
    const int V = rp_token_trie_n_ids(t) + 3; /* a padded model vocab: the extra ids never allowed */
    const int32_t end = 0;
    rp_json_mask *m = NULL;
    assert_int_equal(rp_json_mask_create(&m, g, t, V, &end, 1, 4, NULL), RP_OK);
    for (int p = 0; prefixes[p]; p++) {
        rp_json_state s;
        rp_json_start(g, &s);
        for (const char *c = prefixes[p]; *c; c++) assert_int_equal(rp_json_feed(g, &s, (uint8_t)*c), RP_JSON_OK);
        const uint64_t *bits = rp_json_mask_get(m, &s);
        int n_allowed = 0;
        for (int id = 0; id < V; id++) {
            int want;
            if (id == end && rp_json_complete(g, &s)) want = 1;
            else {
                rp_json_state c = s;
                want = id < rp_token_trie_n_ids(t) && rp_json_feed_token(g, t, &c, id) == RP_JSON_OK;
            }
            int got = (int)((bits[id >> 6] >> (id & 63)) & 1);
            if (got != want) fail_msg("prefix %s: token %d allowed %d, expected %d", prefixes[p], id, got, want);
            n_allowed += got;
        }
        assert_true(n_allowed > 0);
        /* The second lookup of the same state is a cache hit. */
        long walks0, walks1, lookups;
        rp_json_mask_counts(m, &walks0, &lookups);
        assert_ptr_equal(rp_json_mask_get(m, &s), bits);
        rp_json_mask_counts(m, &walks1, &lookups);
        assert_int_equal(walks1, walks0);
    }
    rp_json_mask_free(m);
    rp_token_trie_free(t);
}

static const char *mask_prefixes[] = {"", "{", "{\"", "{\"name\":\"a", "{\"name\":\"abc",
                                      "{\"name\":\"a\",\"age\":1", "{\"name\":\"a\",\"age\":12,\"kind\":1",
                                      "{\"name\":\"a\",\"age\":12,\"kind\":\"cat\",\"tags\":[true]", NULL};
static const char *mask_schema =
    "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":3},"
    "\"age\":{\"type\":\"integer\"},\"kind\":{\"enum\":[\"cat\",1,12]},"
    "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"boolean\"},\"maxItems\":2}},"
    "\"required\":[\"name\",\"age\",\"kind\",\"tags\"]}";

static void test_masks_bytes(void **state) {
    (void)state;
    rp_tokenizer *tok = NULL;
    assert_int_equal(rp_tokenizer_open(&tok, "bytes", NULL), RP_OK);
    rp_json_grammar *g = schema(mask_schema);
    check_masks(tok, g, mask_prefixes);
    /* Complete: only the end token is left, so it is forced. */
    rp_token_trie *t = NULL;
    assert_int_equal(rp_token_trie_build(&t, tok, NULL), RP_OK);
    rp_json_mask *m = NULL;
    int32_t end = 0;
    assert_int_equal(rp_json_mask_create(&m, g, t, 256, &end, 1, 2, NULL), RP_OK);
    rp_json_state s;
    rp_json_start(g, &s);
    const char *doc = "{\"name\":\"a\",\"age\":1,\"kind\":1,\"tags\":[]}";
    for (const char *c = doc; *c; c++) assert_int_equal(rp_json_feed(g, &s, (uint8_t)*c), RP_JSON_OK);
    const uint64_t *bits = rp_json_mask_get(m, &s);
    assert_int_equal(bits[0], 1);
    for (int w = 1; w < 4; w++) assert_int_equal(bits[w], 0);
    rp_json_mask_free(m);
    rp_token_trie_free(t);
    rp_json_grammar_free(g);
    rp_json_grammar *obj = NULL;
    assert_int_equal(rp_json_grammar_object(&obj, NULL), RP_OK);
    check_masks(tok, obj, (const char *[]){"", "{\"a\":[1, {\"b\":\"x", "{\"a\":-0.", NULL});
    rp_json_grammar_free(obj);
    rp_tokenizer_free(tok);
}

static void test_masks_world(void **state) {
    (void)state;
    const char *dir = getenv("RP_SHARED_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/vocab/rwkv_vocab_v20230424.txt", dir ? dir : "../shared");
    FILE *f = fopen(path, "rb");
    if (!f) {
        print_message("skipping the World vocab masks: %s is not there\n", path);
        skip();
    }
    fclose(f);
    rp_tokenizer *tok = NULL;
    rp_error err = {0};
    if (rp_tokenizer_open(&tok, path, &err) != RP_OK) fail_msg("%s", err.msg);
    rp_json_grammar *g = schema(mask_schema);
    check_masks(tok, g, mask_prefixes);
    rp_json_grammar_free(g);
    rp_tokenizer_free(tok);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_any_object),      cmocka_unit_test(test_depth_limit),
        cmocka_unit_test(test_schema_features), cmocka_unit_test(test_schema_errors),
        cmocka_unit_test(test_masks_bytes),     cmocka_unit_test(test_masks_world),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
