/* Specification of the training data path (src/train/shards, tokenize, loader,
 * synthetic): shards round-trip and every kind of malformed shard is rejected
 * with a message naming the file; tokenizing in chunks gives exactly the
 * tokens of encoding each document whole (+ token 0 after each); the loader's
 * order is a seeded bijection per epoch with a disjoint eval split, disjoint
 * DP ranks and a resumable cursor; synthetic samples follow their documented
 * layouts. Files live in a fresh mkdtemp directory per test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "text/tokenizer.h"
#include "train/loader.h"
#include "train/shards.h"
#include "train/synthetic.h"
#include "train/tokenize.h"
#include "fs_test_util.h"

/* ------------------------------------------------------------ fixtures */

typedef struct {
    char dir[256];
} fixture;

static int setup_dir(void **state) {
    fixture *fx = calloc(1, sizeof *fx);
    if (!fx) return -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(fx->dir, sizeof fx->dir, "%s/rp_test_data.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(fx->dir)) {
        free(fx);
        return -1;
    }
    *state = fx;
    return 0;
}

static int teardown_dir(void **state) {
    fixture *fx = *state;
    remove_tree(fx->dir);
    free(fx);
    return 0;
}

static char *path_in(const fixture *fx, const char *name) {
    static char bufs[4][1024];
    static int next;
    char *p = bufs[next++ % 4];
    snprintf(p, sizeof bufs[0], "%s/%s", fx->dir, name);
    return p;
}

static void write_raw(const char *path, const void *bytes, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    if (n) assert_int_equal(fwrite(bytes, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

static uint8_t *read_raw(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)size + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)size, fp), (size_t)size);
    fclose(fp);
    *n = (size_t)size;
    return buf;
}

static const char *data_dir(void) {
    const char *d = getenv("RP_TEST_DATA");
    return d ? d : "tests/data";
}

static rp_tokenizer *open_tokenizer(const char *spec) {
    rp_tokenizer *tok = NULL;
    rp_error err;
    if (rp_tokenizer_open(&tok, spec, &err) != RP_OK) fail_msg("%s", err.msg);
    return tok;
}

static rp_tokenizer *open_handmade(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/vocab_handmade.txt", data_dir());
    return open_tokenizer(path);
}

/* Writes a shard of n tokens (token i = pattern(i)) with the writer. */
static void write_shard(const char *path, uint32_t kind, uint32_t n_ids, const int32_t *tokens,
                        size_t n, int end_document) {
    rp_shard_writer *w;
    rp_error err;
    if (rp_shard_writer_open(&w, path, kind, n_ids, &err) != RP_OK) fail_msg("%s", err.msg);
    if (rp_shard_writer_append(w, tokens, n, &err) != RP_OK) fail_msg("%s", err.msg);
    if (end_document && rp_shard_writer_end_document(w, &err) != RP_OK) fail_msg("%s", err.msg);
    if (rp_shard_writer_finish(w, &err) != RP_OK) fail_msg("%s", err.msg);
}

/* Growable int32 vector. */
typedef struct {
    int32_t *v;
    size_t n, cap;
} ivec;

static void ivec_push(ivec *a, const int32_t *x, size_t n) {
    if (a->n + n > a->cap) {
        a->cap = (a->n + n) * 2 + 16;
        a->v = realloc(a->v, a->cap * sizeof *a->v);
        assert_non_null(a->v);
    }
    if (n) memcpy(a->v + a->n, x, n * sizeof *x);
    a->n += n;
}

/* Every shard OUT-00000.tok, -00001.tok ... concatenated; counts shards and
 * sums their document counts. */
static ivec read_shards(const char *prefix, uint32_t *n_shards, uint64_t *n_documents) {
    ivec all = {0};
    uint32_t i = 0;
    uint64_t docs = 0;
    for (;; i++) {
        char path[2048];
        rp_tokenize_shard_path(path, sizeof path, prefix, i);
        if (access(path, F_OK) != 0) break;
        rp_shard s;
        rp_error err;
        if (rp_shard_open(&s, path, &err) != RP_OK) fail_msg("%s", err.msg);
        int32_t *buf = malloc((s.n_tokens + 1) * sizeof *buf);
        assert_int_equal(rp_shard_read(&s, 0, s.n_tokens, buf, &err), RP_OK);
        ivec_push(&all, buf, s.n_tokens);
        docs += s.n_documents;
        free(buf);
        rp_shard_close(&s);
    }
    if (n_shards) *n_shards = i;
    if (n_documents) *n_documents = docs;
    return all;
}

/* Appends encode(text) and, for a non-empty document, token 0. */
static void expect_document(ivec *want, const rp_tokenizer *tok, const void *text, size_t n) {
    int32_t *ids;
    size_t n_ids;
    rp_error err;
    if (rp_tokenizer_encode(tok, text, n, &ids, &n_ids, &err) != RP_OK) fail_msg("%s", err.msg);
    ivec_push(want, ids, n_ids);
    free(ids);
    static const int32_t eot = 0;
    if (n_ids) ivec_push(want, &eot, 1);
}

static void assert_same_tokens(const ivec *got, const ivec *want) {
    assert_int_equal(got->n, want->n);
    for (size_t i = 0; i < got->n; i++)
        if (got->v[i] != want->v[i])
            fail_msg("token %zu: got %d, want %d", i, got->v[i], want->v[i]);
}

/* Deterministic text of about n bytes built from fragments that the
 * hand-made vocab has multi-byte tokens for (and prefixes of them). */
static char *make_text(size_t n, uint32_t seed) {
    static const char *frags[] = {"abcdef", "abcd", "ab", "a", "the", " the", "then", " ",
                                  "  ", "    ", "\t\t", "\n", "it's", "\xc3\xa9t\xc3\xa9",
                                  "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e", "\xe2\x82\xac",
                                  "\"q\"", "qrs", "x\ty", "ABC", "zz", "\n\n"};
    char *s = malloc(n + 64);
    assert_non_null(s);
    size_t len = 0;
    uint32_t x = seed * 2654435761u + 1;
    while (len < n) {
        x = x * 1664525u + 1013904223u;
        const char *f = frags[(x >> 16) % (sizeof frags / sizeof frags[0])];
        size_t fl = strlen(f);
        memcpy(s + len, f, fl);
        len += fl;
    }
    s[len] = '\0';
    return s;
}

/* ============================================================== shards */

static void round_trip(const fixture *fx, uint32_t kind, uint32_t n_ids, int bytes_per_token) {
    const char *path = path_in(fx, "a.tok");
    enum { N = 3000 };
    int32_t tokens[N];
    for (int i = 0; i < N; i++) tokens[i] = (int32_t)((i * 7919u + 3) % n_ids);
    tokens[5] = (int32_t)n_ids - 1; /* the largest id survives */
    write_shard(path, kind, n_ids, tokens, N, 1);
    assert_int_equal(count_entries(fx->dir), 1); /* no temporary file left */

    size_t raw_n;
    uint8_t *raw = read_raw(path, &raw_n);
    assert_int_equal(raw_n, 64 + (size_t)(N + 1) * bytes_per_token);
    assert_memory_equal(raw, "RWKVTOK1", 8);
    assert_int_equal(raw[8], 1);                     /* version, little-endian */
    assert_int_equal(raw[12], kind);                 /* tokenizer kind */
    assert_int_equal(raw[16] | raw[17] << 8 | raw[18] << 16, n_ids);
    assert_int_equal(raw[20], bytes_per_token == 2 ? 0 : 1);
    assert_int_equal(raw[24] | raw[25] << 8, N + 1); /* n_tokens */
    assert_int_equal(raw[32], 1);                    /* n_documents */
    for (int i = 40; i < 64; i++) assert_int_equal(raw[i], 0);
    free(raw);

    rp_shard s;
    rp_error err;
    if (rp_shard_open(&s, path, &err) != RP_OK) fail_msg("%s", err.msg);
    assert_int_equal(s.version, 1);
    assert_int_equal(s.tokenizer_kind, kind);
    assert_int_equal(s.n_ids, n_ids);
    assert_int_equal(s.bytes_per_token, bytes_per_token);
    assert_int_equal(s.n_tokens, N + 1);
    assert_int_equal(s.n_documents, 1);
    int32_t back[N + 1];
    assert_int_equal(rp_shard_read(&s, 0, N + 1, back, &err), RP_OK);
    assert_memory_equal(back, tokens, sizeof tokens);
    assert_int_equal(back[N], 0);
    int32_t one;
    assert_int_equal(rp_shard_read(&s, 5, 1, &one, &err), RP_OK);
    assert_int_equal(one, n_ids - 1);
    assert_int_equal(rp_shard_read(&s, N, 2, back, &err), RP_ERR_ARG); /* past the end */
    rp_shard_close(&s);
}

static void test_shard_round_trip_u16_for_vocab_up_to_65536(void **state) {
    round_trip(*state, RP_SHARD_TOKENIZER_BYTES, 256, 2);
    round_trip(*state, RP_SHARD_TOKENIZER_WORLD, 65536, 2);
}

static void test_shard_round_trip_u32_for_larger_vocab(void **state) {
    round_trip(*state, RP_SHARD_TOKENIZER_WORLD, 70000, 4);
}

static void test_shard_writer_rejects_token_outside_vocab_and_abort_leaves_nothing(void **state) {
    fixture *fx = *state;
    rp_shard_writer *w;
    rp_error err;
    assert_int_equal(rp_shard_writer_open(&w, path_in(fx, "a.tok"), 0, 256, &err), RP_OK);
    int32_t bad[3] = {1, 256, 2};
    assert_int_equal(rp_shard_writer_append(w, bad, 3, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "token 256 at input position 1"));
    rp_shard_writer_abort(w);
    assert_int_equal(count_entries(fx->dir), 0);
}

/* A valid 10-token u16 shard (vocab 256) as bytes, for mutation. */
static uint8_t *valid_shard_bytes(const fixture *fx, size_t *n) {
    int32_t tokens[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    write_shard(path_in(fx, "valid.tok"), 0, 256, tokens, 10, 0);
    uint8_t *raw = read_raw(path_in(fx, "valid.tok"), n);
    unlink(path_in(fx, "valid.tok"));
    return raw;
}

static void expect_open_fails(const char *path, rp_status code, const char *want) {
    rp_shard s;
    rp_error err;
    rp_error_clear(&err);
    rp_status st = rp_shard_open(&s, path, &err);
    if (st == RP_OK) rp_shard_close(&s);
    assert_int_equal(st, code);
    if (!strstr(err.msg, want)) fail_msg("message \"%s\" lacks \"%s\"", err.msg, want);
    assert_non_null(strstr(err.msg, path)); /* every message names the file */
    assert_int_equal(s.fd, -1);                /* nothing left open */
    assert_null(s.path);
}

static void test_shard_with_bad_magic_is_rejected(void **state) {
    fixture *fx = *state;
    size_t n;
    uint8_t *raw = valid_shard_bytes(fx, &n);
    memcpy(raw, "GPT2TOK!", 8);
    write_raw(path_in(fx, "bad.tok"), raw, n);
    expect_open_fails(path_in(fx, "bad.tok"), RP_ERR_FORMAT, "not a token shard (magic is \"GPT2TOK!\"");
    free(raw);
}

static void test_shard_with_unknown_version_is_rejected(void **state) {
    fixture *fx = *state;
    size_t n;
    uint8_t *raw = valid_shard_bytes(fx, &n);
    raw[8] = 2;
    write_raw(path_in(fx, "bad.tok"), raw, n);
    expect_open_fails(path_in(fx, "bad.tok"), RP_ERR_FORMAT, "version 2 is not supported");
    free(raw);
}

static void test_truncated_shard_is_rejected(void **state) {
    fixture *fx = *state;
    size_t n;
    uint8_t *raw = valid_shard_bytes(fx, &n);
    write_raw(path_in(fx, "bad.tok"), raw, n - 3);
    expect_open_fails(path_in(fx, "bad.tok"), RP_ERR_FORMAT, "truncated");
    expect_open_fails(path_in(fx, "bad.tok"), RP_ERR_FORMAT, "3 missing");
    write_raw(path_in(fx, "short.tok"), raw, 40); /* not even a header */
    expect_open_fails(path_in(fx, "short.tok"), RP_ERR_FORMAT, "shorter than the 64-byte");
    write_raw(path_in(fx, "empty.tok"), raw, 0);
    expect_open_fails(path_in(fx, "empty.tok"), RP_ERR_FORMAT, "truncated: 0 bytes");
    free(raw);
}

/* A shard cut short after it was opened (a re-tokenize into the same
 * directory, a full disk): reads past the new end fail with both sizes and
 * the byte range instead of a SIGBUS; what is still there reads fine. */
static void test_shard_truncated_while_open_fails_the_read_with_both_sizes(void **state) {
    fixture *fx = *state;
    enum { N = 10000 };
    int32_t *tokens = malloc(N * sizeof *tokens);
    for (int i = 0; i < N; i++) tokens[i] = i % 251;
    const char *path = path_in(fx, "cut.tok");
    write_shard(path, 0, 256, tokens, N, 0);
    rp_shard s;
    rp_error err;
    if (rp_shard_open(&s, path, &err) != RP_OK) fail_msg("%s", err.msg);
    assert_int_equal(s.file_bytes, 64 + 2 * N);
    assert_int_equal(truncate(path, 100), 0);

    int32_t back[100];
    assert_int_equal(rp_shard_read(&s, 0, 18, back, &err), RP_OK); /* bytes [64, 100) */
    assert_memory_equal(back, tokens, 18 * sizeof *back);
    rp_error_clear(&err);
    assert_int_equal(rp_shard_read(&s, 5000, 100, back, &err), RP_ERR_IO);
    char want[1200];
    snprintf(want, sizeof want,
             "shard %s was truncated to 100 bytes while training (it had %d)", path, 64 + 2 * N);
    if (!strstr(err.msg, want)) fail_msg("message \"%s\" lacks \"%s\"", err.msg, want);
    assert_non_null(strstr(err.msg, "bytes [10064, 10264)"));

    /* Through the loader, as the trainer reads: every window past byte 100. */
    rp_shard_close(&s);
    write_shard(path, 0, 256, tokens, N, 0);
    rp_loader *l;
    if (rp_loader_open(&l, &path, 1, 99, 1, 0.01, &err) != RP_OK) fail_msg("%s", err.msg);
    assert_int_equal(truncate(path, 64), 0);
    int32_t batch[4 * 100];
    rp_error_clear(&err);
    assert_int_equal(rp_loader_next_batch(l, 4, batch, NULL, 0, 1, &err), RP_ERR_IO);
    assert_non_null(strstr(err.msg, "was truncated to 64 bytes while training"));
    assert_non_null(strstr(err.msg, path));
    rp_loader_free(l);
    free(tokens);
}

/* Validated at open, so a token rewritten afterwards must still not reach
 * the embedding lookup. */
static void test_shard_token_overwritten_while_open_is_refused(void **state) {
    fixture *fx = *state;
    int32_t tokens[40];
    for (int i = 0; i < 40; i++) tokens[i] = i;
    const char *path = path_in(fx, "over.tok");
    write_shard(path, 0, 256, tokens, 40, 0);
    rp_shard s;
    rp_error err;
    if (rp_shard_open(&s, path, &err) != RP_OK) fail_msg("%s", err.msg);
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    assert_int_equal(fseek(f, 64 + 2 * 7, SEEK_SET), 0);
    assert_int_equal(fwrite("\xff\xff", 1, 2, f), 2); /* token 7 -> 65535 */
    assert_int_equal(fclose(f), 0);
    int32_t back[40];
    assert_int_equal(rp_shard_read(&s, 0, 7, back, &err), RP_OK);
    rp_error_clear(&err);
    assert_int_equal(rp_shard_read(&s, 0, 40, back, &err), RP_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "token 65535 at position 7 is outside the vocabulary [0, 256)"));
    rp_shard_close(&s);
}

static void test_shard_with_token_outside_vocab_is_rejected_at_its_position(void **state) {
    fixture *fx = *state;
    size_t n;
    uint8_t *raw = valid_shard_bytes(fx, &n);
    raw[64 + 2 * 7] = 0x00; /* token 7 := 256 */
    raw[64 + 2 * 7 + 1] = 0x01;
    write_raw(path_in(fx, "bad.tok"), raw, n);
    expect_open_fails(path_in(fx, "bad.tok"), RP_ERR_FORMAT,
                      "token 256 at position 7 (byte offset 78) is outside the vocabulary [0, 256)");
    free(raw);
}

static void test_shard_with_size_mismatch_is_rejected(void **state) {
    fixture *fx = *state;
    size_t n;
    uint8_t *raw = valid_shard_bytes(fx, &n);
    raw = realloc(raw, n + 4);
    memset(raw + n, 0, 4);
    write_raw(path_in(fx, "long.tok"), raw, n + 4); /* trailing bytes */
    expect_open_fails(path_in(fx, "long.tok"), RP_ERR_FORMAT, "size mismatch");
    expect_open_fails(path_in(fx, "long.tok"), RP_ERR_FORMAT, "4 too many");
    raw[24] = 9; /* header claims 9 tokens, file holds 10 */
    write_raw(path_in(fx, "count.tok"), raw, n);
    expect_open_fails(path_in(fx, "count.tok"), RP_ERR_FORMAT, "header says 9 tokens");
    free(raw);
}

static void test_shard_with_bad_header_fields_is_rejected(void **state) {
    fixture *fx = *state;
    size_t n;
    uint8_t *raw = valid_shard_bytes(fx, &n);
    raw[20] = 7; /* dtype */
    write_raw(path_in(fx, "dtype.tok"), raw, n);
    expect_open_fails(path_in(fx, "dtype.tok"), RP_ERR_FORMAT, "token dtype 7");
    raw[20] = 0;
    raw[12] = 5; /* tokenizer kind */
    write_raw(path_in(fx, "kind.tok"), raw, n);
    expect_open_fails(path_in(fx, "kind.tok"), RP_ERR_FORMAT, "tokenizer kind 5");
    raw[12] = 0;
    raw[50] = 1; /* reserved */
    write_raw(path_in(fx, "reserved.tok"), raw, n);
    expect_open_fails(path_in(fx, "reserved.tok"), RP_ERR_FORMAT, "reserved header byte 50");
    raw[50] = 0;
    raw[18] = 2; /* n_ids = 256 + 2^17 > 65536 with u16 tokens */
    write_raw(path_in(fx, "ids.tok"), raw, n);
    expect_open_fails(path_in(fx, "ids.tok"), RP_ERR_FORMAT, "cannot be stored as u16");
    free(raw);
}

/* ============================================================ tokenize */

static void test_text_file_tokenizes_as_one_document_whatever_the_chunk_size(void **state) {
    fixture *fx = *state;
    rp_tokenizer *tokenizers[2] = {open_tokenizer("bytes"), open_handmade()};
    char *text = make_text(20000, 1);
    const char *in = path_in(fx, "corpus.txt");
    write_raw(in, text, strlen(text));
    static const size_t chunks[] = {1, 2, 3, 5, 8, 64, 1000, 0};
    for (int k = 0; k < 2; k++) {
        ivec want = {0};
        expect_document(&want, tokenizers[k], text, strlen(text));
        for (size_t c = 0; c < sizeof chunks / sizeof chunks[0]; c++) {
            char prefix[1024];
            snprintf(prefix, sizeof prefix, "%s/out_%d_%zu", fx->dir, k, c);
            rp_tokenize_options opt = {.chunk_bytes = chunks[c]};
            rp_tokenize_stats st;
            rp_error err;
            if (rp_tokenize_file(in, RP_INPUT_AUTO, tokenizers[k], prefix, &opt, &st, &err) != RP_OK)
                fail_msg("%s", err.msg);
            assert_int_equal(st.files, 1);
            assert_int_equal(st.documents, 1);
            assert_int_equal(st.tokens, want.n);
            assert_int_equal(st.bytes, strlen(text));
            uint32_t shards;
            ivec got = read_shards(prefix, &shards, NULL);
            assert_int_equal(shards, 1);
            assert_same_tokens(&got, &want);
            free(got.v);
        }
        free(want.v);
        rp_tokenizer_free(tokenizers[k]);
    }
    free(text);
}

typedef struct {
    int calls;
    uint64_t last_done, total, max_step;
} progress_log;

static void log_progress(uint64_t done, uint64_t total, uint64_t tokens, void *user) {
    (void)tokens;
    progress_log *p = user;
    assert_true(done >= p->last_done);
    assert_true(done <= total);
    if (done - p->last_done > p->max_step) p->max_step = done - p->last_done;
    p->last_done = done;
    p->total = total;
    p->calls++;
}

static void test_file_larger_than_the_chunk_is_streamed_chunk_by_chunk(void **state) {
    fixture *fx = *state;
    rp_tokenizer *tok = open_handmade();
    char *text = make_text(300000, 2);
    const char *in = path_in(fx, "big.txt");
    write_raw(in, text, strlen(text));
    progress_log log = {0};
    rp_tokenize_options opt = {.chunk_bytes = 4096, .progress = log_progress, .progress_user = &log};
    rp_error err;
    if (rp_tokenize_file(in, RP_INPUT_TEXT, tok, path_in(fx, "big"), &opt, NULL, &err) != RP_OK)
        fail_msg("%s", err.msg);
    /* Reads of one chunk at a time, reported as they go. */
    assert_true(log.calls >= 300000 / 4096);
    assert_true(log.max_step <= 4096);
    assert_int_equal(log.last_done, strlen(text));
    assert_int_equal(log.total, strlen(text));
    ivec want = {0};
    expect_document(&want, tok, text, strlen(text));
    ivec got = read_shards(path_in(fx, "big"), NULL, NULL);
    assert_same_tokens(&got, &want);
    free(got.v);
    free(want.v);
    free(text);
    rp_tokenizer_free(tok);
}

static const char *jsonl_corpus =
    "{\"text\": \"the abcdef then\", \"id\": 1}\n"
    "\n"
    "{\"meta\": {\"x\": [1, 2]}, \"text\": \"\\u00e9t\\u00e9 \\\"q\\\"\\n\\ttab\"}\r\n"
    "   \n"
    "{\"text\": \"\"}\n"
    "{\"text\": \"\\u65e5\\u672c\\u8a9e it's\"}";

static void test_jsonl_gives_one_document_per_line_text(void **state) {
    fixture *fx = *state;
    rp_tokenizer *tok = open_handmade();
    const char *in = path_in(fx, "docs.jsonl");
    write_raw(in, jsonl_corpus, strlen(jsonl_corpus));
    static const char *docs[] = {"the abcdef then", "\xc3\xa9t\xc3\xa9 \"q\"\n\ttab", "",
                                 "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e it's"};
    ivec want = {0};
    for (int i = 0; i < 4; i++) expect_document(&want, tok, docs[i], strlen(docs[i]));
    static const size_t chunks[] = {3, 17, 0};
    for (size_t c = 0; c < 3; c++) {
        char prefix[1024];
        snprintf(prefix, sizeof prefix, "%s/j%zu", fx->dir, c);
        rp_tokenize_options opt = {.chunk_bytes = chunks[c]};
        rp_tokenize_stats st;
        rp_error err;
        if (rp_tokenize_file(in, RP_INPUT_AUTO, tok, prefix, &opt, &st, &err) != RP_OK)
            fail_msg("%s", err.msg);
        assert_int_equal(st.documents, 3); /* the empty text is skipped */
        uint64_t docs_in_headers;
        ivec got = read_shards(prefix, NULL, &docs_in_headers);
        assert_int_equal(docs_in_headers, 3);
        assert_same_tokens(&got, &want);
        free(got.v);
    }
    free(want.v);
    rp_tokenizer_free(tok);
}

static void expect_jsonl_error(const fixture *fx, const char *content, const char *want) {
    rp_tokenizer *tok = open_tokenizer("bytes");
    const char *in = path_in(fx, "bad.jsonl");
    write_raw(in, content, strlen(content));
    rp_tokenize_options opt = {.chunk_bytes = 8};
    rp_error err;
    assert_int_equal(rp_tokenize_file(in, RP_INPUT_AUTO, tok, path_in(fx, "bad"), &opt, NULL, &err),
                     RP_ERR_FORMAT);
    if (!strstr(err.msg, want)) fail_msg("message \"%s\" lacks \"%s\"", err.msg, want);
    /* Nothing written: no shard and no temporary file beside the input. */
    assert_int_equal(count_entries(fx->dir), 1);
    unlink(in);
    rp_tokenizer_free(tok);
}

static void test_bad_jsonl_line_fails_with_its_line_number_and_writes_nothing(void **state) {
    fixture *fx = *state;
    char want[1200];
    snprintf(want, sizeof want, "%s:4: invalid JSON", path_in(fx, "bad.jsonl"));
    expect_jsonl_error(fx, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n\n{\"text\": \"c\"\n{\"text\": \"d\"}\n",
                       want);
    snprintf(want, sizeof want, "%s:2: expected an object with a \"text\" string, but the object "
             "has no \"text\" field", path_in(fx, "bad.jsonl"));
    expect_jsonl_error(fx, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n", want);
    snprintf(want, sizeof want, "%s:1: expected an object with a \"text\" string, but its \"text\" "
             "field is not a string", path_in(fx, "bad.jsonl"));
    expect_jsonl_error(fx, "{\"text\": 5}\n", want);
    snprintf(want, sizeof want, "%s:3: expected an object", path_in(fx, "bad.jsonl"));
    expect_jsonl_error(fx, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n[\"c\"]", want);
}

static void test_shards_rotate_at_the_token_limit_and_inputs_concatenate(void **state) {
    fixture *fx = *state;
    rp_tokenizer *tok = open_handmade();
    char *a = make_text(3000, 3), *b = make_text(2000, 4);
    write_raw(path_in(fx, "a.txt"), a, strlen(a));
    write_raw(path_in(fx, "b.txt"), b, strlen(b));
    write_raw(path_in(fx, "c.jsonl"), jsonl_corpus, strlen(jsonl_corpus));
    ivec want = {0};
    expect_document(&want, tok, a, strlen(a));
    expect_document(&want, tok, b, strlen(b));
    static const char *docs[] = {"the abcdef then", "\xc3\xa9t\xc3\xa9 \"q\"\n\ttab",
                                 "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e it's"};
    for (int i = 0; i < 3; i++) expect_document(&want, tok, docs[i], strlen(docs[i]));

    rp_tokenize_run *run;
    rp_tokenize_options opt = {.shard_tokens = 100, .chunk_bytes = 50};
    rp_error err;
    const char *prefix = path_in(fx, "corpus");
    assert_int_equal(rp_tokenize_begin(&run, prefix, tok, &opt, &err), RP_OK);
    assert_int_equal(rp_tokenize_add_file(run, path_in(fx, "a.txt"), RP_INPUT_AUTO, &err), RP_OK);
    assert_int_equal(rp_tokenize_add_file(run, path_in(fx, "b.txt"), RP_INPUT_AUTO, &err), RP_OK);
    assert_int_equal(rp_tokenize_add_file(run, path_in(fx, "c.jsonl"), RP_INPUT_AUTO, &err), RP_OK);
    /* Nothing is visible under the final names before finishing. */
    char first[2048];
    assert_int_not_equal(access(rp_tokenize_shard_path(first, sizeof first, prefix, 0), F_OK), 0);
    rp_tokenize_stats st;
    assert_int_equal(rp_tokenize_finish(run, &st, &err), RP_OK);
    assert_int_equal(st.files, 3);
    assert_int_equal(st.documents, 5);
    assert_int_equal(st.shards, (want.n + 99) / 100);
    uint32_t shards;
    uint64_t docs_in_headers;
    ivec got = read_shards(prefix, &shards, &docs_in_headers);
    assert_int_equal(shards, st.shards);
    assert_int_equal(docs_in_headers, 5);
    assert_same_tokens(&got, &want);
    for (uint32_t i = 0; i + 1 < shards; i++) { /* full shards but the last */
        rp_shard s;
        char path[2048];
        assert_int_equal(rp_shard_open(&s, rp_tokenize_shard_path(path, sizeof path, prefix, i), &err), RP_OK);
        assert_int_equal(s.n_tokens, 100);
        rp_shard_close(&s);
    }
    assert_int_equal(count_entries(fx->dir), 3 + (int)shards); /* no temporary files */
    free(got.v);
    free(want.v);
    free(a);
    free(b);
    rp_tokenizer_free(tok);
}

static void test_existing_shards_are_kept_unless_overwrite_which_removes_stale_ones(void **state) {
    fixture *fx = *state;
    rp_tokenizer *tok = open_tokenizer("bytes");
    char *text = make_text(1000, 5);
    write_raw(path_in(fx, "in.txt"), text, strlen(text));
    const char *prefix = path_in(fx, "out");
    rp_tokenize_options opt = {.shard_tokens = 100};
    rp_tokenize_stats st;
    rp_error err;
    assert_int_equal(rp_tokenize_file(path_in(fx, "in.txt"), 0, tok, prefix, &opt, &st, &err), RP_OK);
    uint32_t old_shards = st.shards;
    assert_true(old_shards > 3);
    assert_int_equal(rp_tokenize_file(path_in(fx, "in.txt"), 0, tok, prefix, &opt, &st, &err),
                     RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "out-00000.tok already exists"));
    opt.shard_tokens = 400;
    opt.overwrite = 1;
    assert_int_equal(rp_tokenize_file(path_in(fx, "in.txt"), 0, tok, prefix, &opt, &st, &err), RP_OK);
    assert_int_equal(st.removed_stale, old_shards - st.shards);
    assert_int_equal(count_entries(fx->dir), 1 + (int)st.shards);
    free(text);
    rp_tokenizer_free(tok);
}

/* With the official World vocab (when $RP_SHARED_DIR/vocab is present): the
 * official test vectors, tokenized as JSONL, give their ids + 0 separators,
 * and their concatenation as one text file gives the whole encoding in tiny
 * chunks (World tokens are up to ~128 bytes). */
static void test_world_vocab_matches_official_vectors_through_tokenize(void **state) {
    fixture *fx = *state;
    const char *shared = getenv("RP_SHARED_DIR");
    char vocab[2048], cases[2048];
    snprintf(vocab, sizeof vocab, "%s/vocab/rwkv_vocab_v20230424.txt", shared ? shared : "");
    snprintf(cases, sizeof cases, "%s/vocab/world_tokenizer_cases.jsonl", shared ? shared : "");
    if (!shared || access(vocab, R_OK) != 0 || access(cases, R_OK) != 0) {
        skip();
        return;
    }
    rp_tokenizer *tok = open_tokenizer(vocab);
    size_t n;
    uint8_t *raw = read_raw(cases, &n);
    raw[n] = '\0';
    ivec want = {0};
    char *all_text = calloc(1, n + 1);
    size_t all_len = 0;
    char *save = NULL;
    for (char *line = strtok_r((char *)raw, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        json_error_t jerr;
        json_t *root = json_loads(line, JSON_ALLOW_NUL, &jerr);
        assert_non_null(root);
        json_t *ids = json_object_get(root, "ids");
        for (size_t i = 0; i < json_array_size(ids); i++) {
            int32_t id = (int32_t)json_integer_value(json_array_get(ids, i));
            ivec_push(&want, &id, 1);
        }
        static const int32_t eot = 0;
        if (json_array_size(ids)) ivec_push(&want, &eot, 1);
        json_t *text = json_object_get(root, "text");
        memcpy(all_text + all_len, json_string_value(text), json_string_length(text));
        all_len += json_string_length(text);
        json_decref(root);
    }
    rp_tokenize_options opt = {.chunk_bytes = 37};
    rp_error err;
    if (rp_tokenize_file(cases, RP_INPUT_AUTO, tok, path_in(fx, "w"), &opt, NULL, &err) != RP_OK)
        fail_msg("%s", err.msg);
    ivec got = read_shards(path_in(fx, "w"), NULL, NULL);
    assert_same_tokens(&got, &want);
    free(got.v);
    free(want.v);

    write_raw(path_in(fx, "all.txt"), all_text, all_len);
    ivec whole = {0};
    expect_document(&whole, tok, all_text, all_len);
    if (rp_tokenize_file(path_in(fx, "all.txt"), RP_INPUT_AUTO, tok, path_in(fx, "t"), &opt, NULL,
                         &err) != RP_OK)
        fail_msg("%s", err.msg);
    got = read_shards(path_in(fx, "t"), NULL, NULL);
    assert_same_tokens(&got, &whole);
    free(got.v);
    free(whole.v);
    free(all_text);
    free(raw);
    rp_tokenizer_free(tok);
}

/* ============================================================== loader */

static void test_permutation_is_a_bijection(void **state) {
    (void)state;
    static const uint64_t sizes[] = {1, 2, 3, 4, 5, 7, 16, 17, 100, 255, 256, 257, 1000, 4097, 65537};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        uint64_t n = sizes[k];
        uint8_t *seen = calloc(n, 1);
        for (uint64_t key = 0; key < 3; key++) {
            memset(seen, 0, n);
            uint64_t fixed = 0;
            for (uint64_t i = 0; i < n; i++) {
                uint64_t p = rp_permute_index(n, key * 0x1234567ull + 11, i);
                if (p >= n) fail_msg("n=%llu: %llu -> %llu out of range", (unsigned long long)n,
                                     (unsigned long long)i, (unsigned long long)p);
                if (seen[p]) fail_msg("n=%llu: %llu hit twice", (unsigned long long)n,
                                      (unsigned long long)p);
                seen[p] = 1;
                fixed += p == i;
            }
            if (n >= 100) assert_true(fixed < n / 10); /* it does shuffle */
        }
        free(seen);
    }
    /* Different keys give different orders. */
    int differ = 0;
    for (uint64_t i = 0; i < 1000; i++) differ += rp_permute_index(1000, 1, i) != rp_permute_index(1000, 2, i);
    assert_true(differ > 900);
}

/* Three shards whose token at position i is (shard * 50 + i) % 256 — and
 * lengths that leave a partial window at each end. */
static void make_loader_corpus(const fixture *fx, const char *sub, const size_t *lengths, int n) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", fx->dir, sub);
    mkdir(dir, 0755);
    for (int s = 0; s < n; s++) {
        int32_t *tokens = malloc(lengths[s] * sizeof *tokens);
        for (size_t i = 0; i < lengths[s]; i++) tokens[i] = (int32_t)((s * 50 + i) % 256);
        char path[1100];
        snprintf(path, sizeof path, "%s/part-%05d.tok", dir, s);
        write_shard(path, 0, 256, tokens, lengths[s], 0);
        free(tokens);
    }
}

static rp_loader *open_loader(const fixture *fx, const char *sub, int ctx, uint64_t seed, double eval) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", fx->dir, sub);
    const char *paths[1] = {dir};
    rp_loader *l;
    rp_error err;
    if (rp_loader_open(&l, paths, 1, ctx, seed, eval, &err) != RP_OK) fail_msg("%s", err.msg);
    return l;
}

static const size_t corpus_lengths[3] = {1000, 37, 2345};

static void test_windows_are_ctx_plus_one_tokens_within_one_shard(void **state) {
    fixture *fx = *state;
    make_loader_corpus(fx, "c", corpus_lengths, 3);
    const int ctx = 16;
    rp_loader *l = open_loader(fx, "c", ctx, 1, 0.0);
    /* (n - 1) / ctx windows per shard: 62 + 2 + 146. */
    assert_int_equal(rp_loader_n_windows(l), 62 + 2 + 146);
    assert_int_equal(rp_loader_n_eval(l), 0);
    assert_int_equal(rp_loader_n_tokens(l), 1000 + 37 + 2345);
    assert_int_equal(rp_loader_n_shards(l), 3);
    assert_string_equal(rp_loader_tokenizer(l), "bytes");
    assert_int_equal(rp_loader_n_ids(l), 256);
    int32_t win[17];
    rp_error err;
    struct { uint64_t w; int shard; uint64_t start; } cases[] = {
        {0, 0, 0}, {61, 0, 976}, {62, 1, 0}, {63, 1, 16}, {64, 2, 0}, {209, 2, 145 * 16}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        assert_int_equal(rp_loader_window(l, cases[k].w, win, &err), RP_OK);
        for (int t = 0; t <= ctx; t++)
            assert_int_equal(win[t], (int32_t)((cases[k].shard * 50 + cases[k].start + t) % 256));
    }
    assert_int_equal(rp_loader_window(l, 210, win, &err), RP_ERR_ARG);
    rp_loader_free(l);
}

/* Window ids of the next n global samples (one rank). */
static uint64_t *draw_ids(rp_loader *l, int batch, int steps) {
    int ctx = rp_loader_ctx_len(l);
    uint64_t *ids = malloc((size_t)batch * steps * sizeof *ids);
    int32_t *tokens = malloc((size_t)batch * (ctx + 1) * sizeof *tokens);
    rp_error err;
    for (int s = 0; s < steps; s++) {
        if (rp_loader_next_batch(l, batch, tokens, ids + (size_t)s * batch, 0, 1, &err) != RP_OK)
            fail_msg("%s", err.msg);
        for (int b = 0; b < batch; b++) { /* tokens are the window's */
            int32_t want[64];
            assert_int_equal(rp_loader_window(l, ids[(size_t)s * batch + b], want, &err), RP_OK);
            assert_memory_equal(tokens + (size_t)b * (ctx + 1), want, (ctx + 1) * sizeof *want);
        }
    }
    free(tokens);
    return ids;
}

static void test_same_seed_gives_same_order_and_another_seed_another(void **state) {
    fixture *fx = *state;
    make_loader_corpus(fx, "c", corpus_lengths, 3);
    rp_loader *a = open_loader(fx, "c", 16, 7, 0.05), *b = open_loader(fx, "c", 16, 7, 0.05),
              *c = open_loader(fx, "c", 16, 8, 0.05);
    uint64_t *ia = draw_ids(a, 4, 100), *ib = draw_ids(b, 4, 100), *ic = draw_ids(c, 4, 100);
    assert_memory_equal(ia, ib, 400 * sizeof *ia);
    int differ = 0;
    for (int i = 0; i < 400; i++) differ += ia[i] != ic[i];
    assert_true(differ > 300);
    free(ia);
    free(ib);
    free(ic);
    rp_loader_free(a);
    rp_loader_free(b);
    rp_loader_free(c);
}

static void test_each_epoch_visits_every_train_window_once_and_no_eval_window(void **state) {
    fixture *fx = *state;
    make_loader_corpus(fx, "c", corpus_lengths, 3);
    rp_loader *l = open_loader(fx, "c", 16, 3, 0.1);
    uint64_t n = rp_loader_n_windows(l), n_train = rp_loader_n_train(l);
    assert_int_equal(n_train + rp_loader_n_eval(l), n);
    /* Eval is about 10% and listed in window order. */
    assert_true(rp_loader_n_eval(l) >= 5 && rp_loader_n_eval(l) <= 45);
    rp_error err;
    uint8_t *is_eval = calloc(n, 1);
    int32_t win[17];
    for (uint64_t j = 0; j < rp_loader_n_eval(l); j++) {
        uint64_t w;
        assert_int_equal(rp_loader_eval_window(l, j, win, &w, &err), RP_OK);
        assert_true(rp_loader_is_eval(l, w));
        if (j) assert_true(w > 0);
        is_eval[w] = 1;
    }
    assert_int_equal(rp_loader_eval_window(l, rp_loader_n_eval(l), win, NULL, &err), RP_ERR_ARG);
    uint64_t *order[2];
    for (int epoch = 0; epoch < 2; epoch++) {
        order[epoch] = draw_ids(l, 1, (int)n_train);
        uint8_t *seen = calloc(n, 1);
        for (uint64_t i = 0; i < n_train; i++) {
            uint64_t w = order[epoch][i];
            assert_false(is_eval[w]);
            assert_false(seen[w]);
            seen[w] = 1;
        }
        free(seen);
        rp_loader_position pos;
        rp_loader_get_position(l, &pos);
        assert_int_equal(pos.samples, (epoch + 1) * n_train);
    }
    int differ = 0; /* each epoch has its own order */
    for (uint64_t i = 0; i < n_train; i++) differ += order[0][i] != order[1][i];
    assert_true(differ > (int)n_train / 2);
    free(order[0]);
    free(order[1]);
    free(is_eval);
    rp_loader_free(l);
}

static void test_tiny_eval_fraction_still_holds_out_one_window(void **state) {
    fixture *fx = *state;
    size_t lengths[1] = {100};
    make_loader_corpus(fx, "small", lengths, 1);
    rp_loader *l = open_loader(fx, "small", 16, 1, 1e-9); /* 6 windows */
    assert_int_equal(rp_loader_n_windows(l), 6);
    assert_int_equal(rp_loader_n_eval(l), 1);
    assert_int_equal(rp_loader_n_train(l), 5);
    rp_loader_free(l);
    l = open_loader(fx, "small", 16, 1, 0.999999); /* and keeps one for training */
    assert_int_equal(rp_loader_n_train(l), 1);
    rp_loader_free(l);
}

static void test_dp_ranks_take_disjoint_interleaved_slices_of_the_global_order(void **state) {
    fixture *fx = *state;
    make_loader_corpus(fx, "c", corpus_lengths, 3);
    const int R = 3, B = 5, steps = 20;
    rp_loader *global = open_loader(fx, "c", 16, 11, 0.02);
    uint64_t *all = draw_ids(global, B * R, steps);
    int32_t tokens[5 * 17];
    uint64_t ids[5];
    rp_error err;
    for (int r = 0; r < R; r++) {
        rp_loader *l = open_loader(fx, "c", 16, 11, 0.02);
        for (int s = 0; s < steps; s++) {
            assert_int_equal(rp_loader_next_batch(l, B, tokens, ids, r, R, &err), RP_OK);
            for (int b = 0; b < B; b++) /* rank r's b-th = global sample b*R + r */
                assert_int_equal(ids[b], all[(size_t)s * B * R + (size_t)b * R + r]);
        }
        rp_loader_position pos;
        rp_loader_get_position(l, &pos);
        assert_int_equal(pos.samples, (uint64_t)steps * B * R); /* same cursor on every rank */
        rp_loader_free(l);
    }
    /* Within one epoch the ranks' samples are disjoint (the global ones are). */
    uint64_t n = rp_loader_n_windows(global);
    uint8_t *seen = calloc(n, 1);
    uint64_t in_epoch = rp_loader_n_train(global) < (uint64_t)steps * B * R
                            ? rp_loader_n_train(global) : (uint64_t)steps * B * R;
    for (uint64_t i = 0; i < in_epoch; i++) {
        assert_false(seen[all[i]]);
        seen[all[i]] = 1;
    }
    free(seen);
    assert_int_equal(rp_loader_next_batch(global, B, tokens, ids, 3, 3, &err), RP_ERR_ARG);
    free(all);
    rp_loader_free(global);
}

static void test_restored_position_continues_identically(void **state) {
    fixture *fx = *state;
    make_loader_corpus(fx, "c", corpus_lengths, 3);
    rp_loader *a = open_loader(fx, "c", 16, 5, 0.01);
    free(draw_ids(a, 7, 31)); /* past the first epoch (217 > 207 train windows) */
    rp_loader_position saved;
    rp_loader_get_position(a, &saved);
    assert_int_equal(saved.epoch, 1);
    uint64_t *after = draw_ids(a, 7, 40);

    rp_loader *b = open_loader(fx, "c", 16, 5, 0.01);
    rp_error err;
    rp_loader_position copy = saved; /* what a checkpoint stores */
    assert_int_equal(rp_loader_set_position(b, &copy, &err), RP_OK);
    uint64_t *resumed = draw_ids(b, 7, 40);
    assert_memory_equal(after, resumed, 280 * sizeof *after);

    /* A position from other shards or ctx_len is refused. */
    rp_loader *c = open_loader(fx, "c", 32, 5, 0.01);
    assert_int_equal(rp_loader_set_position(c, &saved, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "same shards and ctx_len"));
    free(after);
    free(resumed);
    rp_loader_free(a);
    rp_loader_free(b);
    rp_loader_free(c);
}

static void test_loader_rejects_mixed_tokenizers_and_empty_inputs(void **state) {
    fixture *fx = *state;
    int32_t tokens[100] = {0};
    mkdir(path_in(fx, "mixed"), 0755);
    write_shard(path_in(fx, "mixed/a.tok"), 0, 256, tokens, 100, 0);
    write_shard(path_in(fx, "mixed/b.tok"), 1, 65530, tokens, 100, 0);
    const char *paths[1] = {path_in(fx, "mixed")};
    rp_loader *l;
    rp_error err;
    assert_int_equal(rp_loader_open(&l, paths, 1, 16, 1, 0.01, &err), RP_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "same tokenizer"));
    mkdir(path_in(fx, "none"), 0755);
    paths[0] = path_in(fx, "none");
    assert_int_equal(rp_loader_open(&l, paths, 1, 16, 1, 0.01, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "no *.tok"));
    paths[0] = path_in(fx, "mixed/a.tok");
    assert_int_equal(rp_loader_open(&l, paths, 1, 100, 1, 0.01, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "smaller ctx_len"));
    assert_int_equal(rp_loader_open(&l, paths, 1, 16, 1, 1.0, &err), RP_ERR_ARG);
}

/* =========================================================== synthetic */

static void test_mqar_queries_are_answered_by_the_value_paired_earlier(void **state) {
    (void)state;
    rp_synth_config cfg = {.task = RP_SYNTH_MQAR, .vocab_size = 256, .ctx_len = 64};
    rp_error err;
    assert_int_equal(rp_synth_resolve(&cfg, &err), RP_OK);
    assert_int_equal(cfg.n_pairs, 16);
    assert_int_equal(cfg.n_queries, 16);
    const int n = cfg.n_pairs, K = (256 - 2) / 2;
    int32_t tokens[65];
    uint8_t mask[64];
    for (uint64_t s = 0; s < 500; s++) {
        rp_synth_sample(&cfg, 42, RP_SYNTH_TRAIN, s, tokens, mask);
        int key_used[256] = {0}, queried[256] = {0};
        for (int i = 0; i < n; i++) {
            int32_t k = tokens[2 * i], v = tokens[2 * i + 1];
            assert_true(k >= 2 && k < 2 + K);
            assert_true(v >= 2 + K && v < 256);
            assert_false(key_used[k]); /* distinct keys */
            key_used[k] = 1;
        }
        int answers = 0;
        for (int t = 0; t < 64; t++) {
            if (t >= 2 * n && t < 2 * n + 2 * cfg.n_queries && (t - 2 * n) % 2 == 0) {
                assert_int_equal(mask[t], 1);
                int32_t q = tokens[t];
                assert_true(key_used[q]);
                assert_false(queried[q]); /* each key asked at most once */
                queried[q] = 1;
                int pair = -1;
                for (int i = 0; i < n; i++) if (tokens[2 * i] == q) pair = i;
                assert_int_equal(tokens[t + 1], tokens[2 * pair + 1]); /* target = its value */
                answers++;
            } else {
                assert_int_equal(mask[t], 0);
            }
        }
        assert_int_equal(answers, cfg.n_queries);
        for (int t = 2 * n + 2 * cfg.n_queries; t <= 64; t++) assert_int_equal(tokens[t], 0);
    }
}

static void test_mqar_with_fewer_queries_and_padding(void **state) {
    (void)state;
    rp_synth_config cfg = {.task = RP_SYNTH_MQAR, .vocab_size = 10, .ctx_len = 20, .n_pairs = 4,
                           .n_queries = 2};
    rp_error err;
    assert_int_equal(rp_synth_resolve(&cfg, &err), RP_OK);
    int32_t tokens[21];
    uint8_t mask[20];
    rp_synth_sample(&cfg, 1, RP_SYNTH_EVAL, 9, tokens, mask);
    int n_mask = 0;
    for (int t = 0; t < 20; t++) n_mask += mask[t];
    assert_int_equal(n_mask, 2);
    assert_int_equal(mask[8], 1);
    assert_int_equal(mask[10], 1);
    for (int t = 12; t <= 20; t++) assert_int_equal(tokens[t], RP_SYNTH_PAD);
    /* Layouts that cannot fit are refused, naming the field. */
    rp_synth_config big = {.task = RP_SYNTH_MQAR, .vocab_size = 10, .ctx_len = 64, .n_pairs = 5};
    assert_int_equal(rp_synth_resolve(&big, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "gives 4 keys"));
    rp_synth_config full = {.task = RP_SYNTH_MQAR, .vocab_size = 256, .ctx_len = 16, .n_pairs = 8};
    assert_int_equal(rp_synth_resolve(&full, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "no room for a query"));
}

static void test_copy_task_repeats_the_string_after_the_separator(void **state) {
    (void)state;
    rp_synth_config cfg = {.task = RP_SYNTH_COPY, .vocab_size = 50, .ctx_len = 33};
    rp_error err;
    assert_int_equal(rp_synth_resolve(&cfg, &err), RP_OK);
    const int L = cfg.copy_len;
    assert_int_equal(L, 16);
    int32_t tokens[34];
    uint8_t mask[33];
    for (uint64_t s = 0; s < 200; s++) {
        rp_synth_sample(&cfg, 3, RP_SYNTH_TRAIN, s, tokens, mask);
        for (int i = 0; i < L; i++) {
            assert_true(tokens[i] >= 2 && tokens[i] < 50);
            assert_int_equal(tokens[L + 1 + i], tokens[i]);
        }
        assert_int_equal(tokens[L], RP_SYNTH_SEPARATOR);
        assert_int_equal(tokens[33], RP_SYNTH_PAD);
        for (int t = 0; t < 33; t++) assert_int_equal(mask[t], t >= L && t < 2 * L);
    }
    cfg.copy_len = 17;
    assert_int_equal(rp_synth_resolve(&cfg, &err), RP_ERR_ARG);
}

static void test_synthetic_samples_are_a_function_of_seed_split_and_index(void **state) {
    (void)state;
    rp_synth_config cfgs[2] = {{.task = RP_SYNTH_MQAR, .vocab_size = 256, .ctx_len = 64},
                               {.task = RP_SYNTH_COPY, .vocab_size = 256, .ctx_len = 64}};
    rp_error err;
    for (int k = 0; k < 2; k++) {
        rp_synth_config *cfg = &cfgs[k];
        assert_int_equal(rp_synth_resolve(cfg, &err), RP_OK);
        int32_t a[65], b[65];
        uint8_t ma[64], mb[64];
        rp_synth_sample(cfg, 7, RP_SYNTH_TRAIN, 12345, a, ma);
        rp_synth_sample(cfg, 7, RP_SYNTH_TRAIN, 12345, b, mb);
        assert_memory_equal(a, b, sizeof a);
        assert_memory_equal(ma, mb, sizeof ma);
        rp_synth_sample(cfg, 7, RP_SYNTH_TRAIN, 12346, b, NULL);
        assert_memory_not_equal(a, b, sizeof a);
        rp_synth_sample(cfg, 8, RP_SYNTH_TRAIN, 12345, b, NULL);
        assert_memory_not_equal(a, b, sizeof a);
        rp_synth_sample(cfg, 7, RP_SYNTH_EVAL, 12345, b, NULL);
        assert_memory_not_equal(a, b, sizeof a);

        /* Batches: rank r's b-th sample is global sample cursor + b*R + r. */
        int32_t batch[3 * 65];
        uint8_t masks[3 * 64];
        uint64_t cursor = 100;
        assert_int_equal(rp_synth_next_batch(cfg, 7, RP_SYNTH_TRAIN, &cursor, 3, 1, 4, batch, masks,
                                             &err), RP_OK);
        assert_int_equal(cursor, 112);
        for (int i = 0; i < 3; i++) {
            rp_synth_sample(cfg, 7, RP_SYNTH_TRAIN, 100 + (uint64_t)i * 4 + 1, a, ma);
            assert_memory_equal(batch + i * 65, a, sizeof a);
            assert_memory_equal(masks + i * 64, ma, sizeof ma);
        }
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup_dir, teardown_dir)
        T(test_shard_round_trip_u16_for_vocab_up_to_65536),
        T(test_shard_round_trip_u32_for_larger_vocab),
        T(test_shard_writer_rejects_token_outside_vocab_and_abort_leaves_nothing),
        T(test_shard_with_bad_magic_is_rejected),
        T(test_shard_with_unknown_version_is_rejected),
        T(test_truncated_shard_is_rejected),
        T(test_shard_truncated_while_open_fails_the_read_with_both_sizes),
        T(test_shard_token_overwritten_while_open_is_refused),
        T(test_shard_with_token_outside_vocab_is_rejected_at_its_position),
        T(test_shard_with_size_mismatch_is_rejected),
        T(test_shard_with_bad_header_fields_is_rejected),
        T(test_text_file_tokenizes_as_one_document_whatever_the_chunk_size),
        T(test_file_larger_than_the_chunk_is_streamed_chunk_by_chunk),
        T(test_jsonl_gives_one_document_per_line_text),
        T(test_bad_jsonl_line_fails_with_its_line_number_and_writes_nothing),
        T(test_shards_rotate_at_the_token_limit_and_inputs_concatenate),
        T(test_existing_shards_are_kept_unless_overwrite_which_removes_stale_ones),
        T(test_world_vocab_matches_official_vectors_through_tokenize),
        cmocka_unit_test(test_permutation_is_a_bijection),
        T(test_windows_are_ctx_plus_one_tokens_within_one_shard),
        T(test_same_seed_gives_same_order_and_another_seed_another),
        T(test_each_epoch_visits_every_train_window_once_and_no_eval_window),
        T(test_tiny_eval_fraction_still_holds_out_one_window),
        T(test_dp_ranks_take_disjoint_interleaved_slices_of_the_global_order),
        T(test_restored_position_continues_identically),
        T(test_loader_rejects_mixed_tokenizers_and_empty_inputs),
        cmocka_unit_test(test_mqar_queries_are_answered_by_the_value_paired_earlier),
        cmocka_unit_test(test_mqar_with_fewer_queries_and_padding),
        cmocka_unit_test(test_copy_task_repeats_the_string_after_the_separator),
        cmocka_unit_test(test_synthetic_samples_are_a_function_of_seed_split_and_index),
#undef T
    };
    return cmocka_run_group_tests_name("train_data", tests, NULL, NULL);
}
