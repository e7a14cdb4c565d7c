/* Specification of src/core/safetensors.c: the reader opens the shared golden
 * weights, rejects each kind of malformed file with a message that names the
 * problem, and the writer round-trips tensors and metadata atomically (no
 * partial or temporary file is ever left behind). Files are built byte by byte
 * in a fresh mkdtemp directory per test. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/safetensors.h"
#include "fs_test_util.h"

/* ------------------------------------------------------------ fixtures */

typedef struct {
    char dir[64];
    char path[256];
} fixture;

static int setup_dir(void **state) {
    fixture *fx = calloc(1, sizeof *fx);
    if (!fx) return -1;
    strcpy(fx->dir, "/tmp/rp_test_st.XXXXXX");
    if (!mkdtemp(fx->dir)) {
        free(fx);
        return -1;
    }
    snprintf(fx->path, sizeof fx->path, "%s/model.safetensors", fx->dir);
    *state = fx;
    return 0;
}

static int teardown_dir(void **state) {
    fixture *fx = *state;
    remove_tree(fx->dir);
    free(fx);
    return 0;
}

/* Number of directory entries other than . and .. */
static void write_raw(const char *path, const void *bytes, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    if (n) assert_int_equal(fwrite(bytes, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

/* Writes a safetensors file: u64 length of header_json, the JSON as given
 * (no padding), then data_bytes bytes of data (a counting pattern). */
static void write_st(const char *path, const char *header_json, size_t data_bytes) {
    size_t hn = strlen(header_json);
    size_t total = 8 + hn + data_bytes;
    unsigned char *buf = malloc(total);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hn >> (8 * i));
    memcpy(buf + 8, header_json, hn);
    for (size_t i = 0; i < data_bytes; i++) buf[8 + hn + i] = (unsigned char)i;
    write_raw(path, buf, total);
    free(buf);
}

/* Asserts that opening path fails with code and a message containing want,
 * and that the file struct is left closed. */
static void expect_open_fails(const char *path, rp_status code, const char *want) {
    rp_st_file f;
    rp_error err;
    rp_error_clear(&err);
    rp_status st = rp_st_open(&f, path, &err);
    if (st == RP_OK) rp_st_close(&f);
    assert_int_equal(st, code);
    assert_int_equal(err.code, code);
    if (!strstr(err.msg, want)) fail_msg("message \"%s\" lacks \"%s\"", err.msg, want);
    assert_non_null(strstr(err.msg, path)); /* every message names the file */
    assert_null(f.map);
    assert_null(f.tensors);
    assert_int_equal(f.n_tensors, 0);
}

static void open_ok(rp_st_file *f, const char *path) {
    rp_error err;
    rp_error_clear(&err);
    rp_status st = rp_st_open(f, path, &err);
    if (st != RP_OK) fail_msg("rp_st_open(%s): %s", path, err.msg);
}

/* --------------------------------------------------------- golden data */

static const char *golden_path(char *buf, size_t cap, const char *file) {
    const char *shared = getenv("RP_SHARED_DIR");
    if (!shared) return NULL;
    snprintf(buf, cap, "%s/golden/rwkv7/%s", shared, file);
    return access(buf, R_OK) == 0 ? buf : NULL;
}

static void test_golden_tiny_weights_open_with_72_tensors(void **state) {
    (void)state;
    char buf[1024];
    const char *path = golden_path(buf, sizeof buf, "tiny_L2_C128_V256_s1.weights.safetensors");
    if (!path) skip();
    rp_st_file f;
    open_ok(&f, path);
    assert_int_equal(f.n_tensors, 72);
    const rp_st_tensor *emb = rp_st_find(&f, "emb.weight");
    assert_non_null(emb);
    assert_int_equal(emb->dtype, RP_DTYPE_F32);
    assert_int_equal(emb->ndim, 2);
    assert_int_equal(emb->shape[0], 256);
    assert_int_equal(emb->shape[1], 128);
    assert_int_equal(emb->numel, 256 * 128);
    assert_int_equal(emb->nbytes, 256 * 128 * 4);
    const rp_st_tensor *rk = rp_st_find(&f, "blocks.1.att.r_k");
    assert_non_null(rk);
    assert_int_equal(rk->shape[0], 2);
    assert_int_equal(rk->shape[1], 64);
    assert_null(rp_st_find(&f, "blocks.2.att.r_k"));
    /* Every tensor reads back as finite f32. */
    for (int i = 0; i < f.n_tensors; i++) {
        const rp_st_tensor *t = &f.tensors[i];
        float *x = malloc((size_t)t->numel * sizeof *x);
        assert_non_null(x);
        rp_error err;
        assert_int_equal(rp_st_read_f32(&f, t, x, t->numel, &err), RP_OK);
        for (int64_t j = 0; j < t->numel; j++) assert_true(isfinite(x[j]));
        free(x);
        if (i > 0) assert_true(strcmp(f.tensors[i - 1].name, t->name) < 0); /* sorted */
    }
    rp_st_close(&f);
}

/* Finds a stored ZIP member by name and returns a pointer to its bytes. */
static const unsigned char *zip_member(const unsigned char *zip, size_t n, const char *suffix,
                                       size_t expect_bytes) {
    size_t sl = strlen(suffix);
    for (size_t i = 0; i + 30 <= n; i++) {
        if (memcmp(zip + i, "PK\3\4", 4) != 0) continue;
        unsigned name_len = zip[i + 26] | (unsigned)zip[i + 27] << 8;
        unsigned extra_len = zip[i + 28] | (unsigned)zip[i + 29] << 8;
        unsigned method = zip[i + 8] | (unsigned)zip[i + 9] << 8;
        if (i + 30 + name_len > n || name_len < sl) continue;
        const char *name = (const char *)zip + i + 30;
        if (memcmp(name + name_len - sl, suffix, sl) != 0) continue;
        size_t data = i + 30 + name_len + extra_len;
        if (method != 0 || data + expect_bytes > n) return NULL;
        return zip + data;
    }
    return NULL;
}

static void test_bf16_of_golden_weights_matches_torch_pth_bit_for_bit(void **state) {
    (void)state;
    char b1[1024], b2[1024];
    const char *st_path = golden_path(b1, sizeof b1, "tiny_L2_C128_V256_s1.weights.safetensors");
    const char *pth_path = golden_path(b2, sizeof b2, "tiny_L2_C128_V256_s1.bf16.pth");
    if (!st_path || !pth_path) skip();
    FILE *fp = fopen(pth_path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    size_t n = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *zip = malloc(n);
    assert_non_null(zip);
    assert_int_equal(fread(zip, 1, n, fp), n);
    fclose(fp);

    rp_st_file f;
    open_ok(&f, st_path);
    /* Storage 0 is emb.weight and storage 71 head.weight (the official order). */
    static const struct { const char *member, *tensor; } pairs[] = {
        {"/data/0", "emb.weight"}, {"/data/71", "head.weight"}};
    for (size_t p = 0; p < 2; p++) {
        const rp_st_tensor *t = rp_st_find(&f, pairs[p].tensor);
        assert_non_null(t);
        const unsigned char *bf = zip_member(zip, n, pairs[p].member, (size_t)t->numel * 2);
        assert_non_null(bf);
        float *x = malloc((size_t)t->numel * sizeof *x);
        assert_non_null(x);
        rp_error err;
        assert_int_equal(rp_st_read_f32(&f, t, x, t->numel, &err), RP_OK);
        int differs_from_truncation = 0;
        for (int64_t i = 0; i < t->numel; i++) {
            uint16_t want;
            memcpy(&want, bf + 2 * i, 2);
            uint16_t got = rp_f32_to_bf16(x[i]);
            if (got != want)
                fail_msg("%s[%lld]: bf16 0x%04x, torch 0x%04x", pairs[p].tensor, (long long)i,
                         got, want);
            uint32_t u;
            memcpy(&u, &x[i], 4);
            differs_from_truncation += (u >> 16) != want;
        }
        assert_true(differs_from_truncation > t->numel / 4); /* rounding really happened */
        free(x);
    }
    rp_st_close(&f);
    free(zip);
}

/* ------------------------------------------------------ well-formed input */

static void test_empty_header_object_has_zero_tensors(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{}      ", 0);
    rp_st_file f;
    open_ok(&f, fx->path);
    assert_int_equal(f.n_tensors, 0);
    assert_int_equal(f.n_meta, 0);
    assert_null(rp_st_find(&f, "anything"));
    assert_null(rp_st_meta(&f, "anything"));
    rp_st_close(&f);
    rp_st_close(&f); /* closing twice is harmless */
}

static void test_zero_element_tensor_and_scalar_are_valid(void **state) {
    fixture *fx = *state;
    write_st(fx->path,
             "{\"empty\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[0,0]},"
             "\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}",
             4);
    rp_st_file f;
    open_ok(&f, fx->path);
    assert_int_equal(f.n_tensors, 2);
    const rp_st_tensor *e = rp_st_find(&f, "empty");
    assert_non_null(e);
    assert_int_equal(e->numel, 0);
    assert_int_equal(e->ndim, 2);
    const rp_st_tensor *s = rp_st_find(&f, "scalar");
    assert_non_null(s);
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->numel, 1);
    rp_error err;
    assert_int_equal(rp_st_read_f32(&f, e, NULL, 0, &err), RP_OK);
    rp_st_close(&f);
}

/* ---------------------------------------------------- malformed input */

static void test_empty_file_is_rejected(void **state) {
    fixture *fx = *state;
    write_raw(fx->path, "", 0);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "is empty");
}

static void test_file_shorter_than_8_bytes_is_rejected(void **state) {
    fixture *fx = *state;
    write_raw(fx->path, "\x02\0\0\0\0", 5);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "file is 5 bytes, shorter than the 8-byte");
}

static void test_header_length_beyond_file_is_rejected(void **state) {
    fixture *fx = *state;
    unsigned char bytes[8 + 2] = {100, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_raw(fx->path, bytes, sizeof bytes);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "header length 100 runs beyond the end");
}

static void test_header_length_over_cap_is_rejected(void **state) {
    fixture *fx = *state;
    /* A sparse 101 MB file whose header claims 100 MB + 1 bytes. */
    uint64_t claimed = 100ull * 1000 * 1000 + 1;
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(claimed >> (8 * i));
    write_raw(fx->path, len, 8);
    assert_int_equal(truncate(fx->path, (off_t)(101ull * 1000 * 1000)), 0);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "exceeds the 100000000-byte limit");
}

static void test_header_not_json_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"a\": [1, 2", 0);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "header is not valid JSON");
}

static void test_header_json_not_object_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "[1, 2, 3]", 0);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "header JSON is not an object");
}

static void test_unknown_dtype_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"w\":{\"dtype\":\"F8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "tensor 'w' has unknown dtype 'F8'");
}

static void test_shape_not_array_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"w\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}}", 16);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "tensor 'w' \"shape\" is not an array");
}

static void test_negative_shape_dimension_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,-2],\"data_offsets\":[0,16]}}", 16);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "tensor 'w' shape dimension 1 is -2");
}

static void test_too_many_dimensions_are_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path,
             "{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "has 9 dimensions; at most 8");
}

static void test_shape_element_count_overflow_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path,
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
             "\"data_offsets\":[0,0]}}",
             0);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "more elements than fit in 64 bits");
}

static void test_data_offsets_out_of_range_are_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}", 16);
    expect_open_fails(fx->path, RP_ERR_FORMAT,
                      "tensor 'w' data_offsets [8, 24] run past the 16-byte data section");
}

static void test_data_offsets_reversed_are_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,0]}}", 16);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "tensor 'w' data_offsets [16, 0] are reversed");
}

static void test_data_offsets_malformed_are_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0]}}", 16);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "tensor 'w' \"data_offsets\" is missing or malformed");
}

static void test_overlapping_tensors_are_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path,
             "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
             "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[12,28]}}",
             28);
    expect_open_fails(fx->path, RP_ERR_FORMAT,
                      "tensors 'a' data_offsets [0, 16] and 'b' [12, 28] overlap");
}

static void test_byte_size_not_matching_shape_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,12]}}", 16);
    expect_open_fails(fx->path, RP_ERR_FORMAT,
                      "tensor 'w' data_offsets [0, 12] span 12 bytes; expected 16 for F32 shape [4]");
}

static void test_duplicate_tensor_name_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path,
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
             "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
             8);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "duplicate key");
}

static void test_non_string_metadata_value_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"__metadata__\":{\"format\":\"pt\",\"step\":5}}", 0);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "\"__metadata__\" value of 'step' is not a string");
}

static void test_metadata_not_object_is_rejected(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"__metadata__\":[\"pt\"]}", 0);
    expect_open_fails(fx->path, RP_ERR_FORMAT, "\"__metadata__\" is not a JSON object");
}

static void test_missing_file_is_an_io_error(void **state) {
    fixture *fx = *state;
    expect_open_fails(fx->path, RP_ERR_IO, "cannot open: No such file or directory");
}

static void test_directory_is_not_a_safetensors_file(void **state) {
    fixture *fx = *state;
    expect_open_fails(fx->dir, RP_ERR_IO, "not a regular file");
}

static void test_reading_i32_tensor_as_f32_is_refused(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"tokens\":{\"dtype\":\"I32\",\"shape\":[3],\"data_offsets\":[0,12]}}", 12);
    rp_st_file f;
    open_ok(&f, fx->path);
    const rp_st_tensor *t = rp_st_find(&f, "tokens");
    assert_non_null(t);
    assert_int_equal(t->dtype, RP_DTYPE_I32);
    float x[3];
    rp_error err;
    assert_int_equal(rp_st_read_f32(&f, t, x, 3, &err), RP_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "tensor 'tokens' has dtype I32; expected a float dtype"));
    assert_non_null(strstr(err.msg, fx->path));
    rp_st_close(&f);
}

static void test_expected_element_count_mismatch_is_refused(void **state) {
    fixture *fx = *state;
    write_st(fx->path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}", 24);
    rp_st_file f;
    open_ok(&f, fx->path);
    float x[6];
    rp_error err;
    assert_int_equal(rp_st_read_f32(&f, rp_st_find(&f, "w"), x, 5, &err), RP_ERR_SHAPE);
    assert_non_null(strstr(err.msg, "tensor 'w' has 6 elements, expected 5"));
    assert_non_null(strstr(err.msg, fx->path));
    rp_st_close(&f);
}

/* -------------------------------------------------------------- writer */

static void test_writer_round_trips_dtypes_shapes_and_metadata(void **state) {
    fixture *fx = *state;
    const float a[6] = {1.0f, -2.0f, 3.5f, 0.1f, 1e-8f, 65504.0f};
    const float b[4] = {1.00390625f, 1.01171875f, -3.0f, 1e30f}; /* bf16 ties and a big one */
    const float h[3] = {0.5f, 0x1p-24f, -1.0009765625f};
    const int32_t ids[5] = {0, 1, -7, 255, 1 << 30};
    const float scalar = 42.0f;
    int64_t sa[2] = {2, 3}, sb[1] = {4}, sh[3] = {1, 3, 1}, si[1] = {5}, se[2] = {0, 7};

    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_error err;
    rp_error_clear(&err);
    assert_int_equal(rp_st_writer_add(&w, "z.first", RP_DTYPE_F32, RP_DTYPE_F32, 2, sa, a, &err), RP_OK);
    assert_int_equal(rp_st_writer_add(&w, "b.bf16", RP_DTYPE_BF16, RP_DTYPE_F32, 1, sb, b, &err), RP_OK);
    assert_int_equal(rp_st_writer_add(&w, "h.f16", RP_DTYPE_F16, RP_DTYPE_F32, 3, sh, h, &err), RP_OK);
    assert_int_equal(rp_st_writer_add(&w, "d.f64", RP_DTYPE_F64, RP_DTYPE_F32, 2, sa, a, &err), RP_OK);
    assert_int_equal(rp_st_writer_add(&w, "tokens", RP_DTYPE_I32, RP_DTYPE_I32, 1, si, ids, &err), RP_OK);
    assert_int_equal(rp_st_writer_add(&w, "scalar", RP_DTYPE_F32, RP_DTYPE_F32, 0, NULL, &scalar, &err), RP_OK);
    assert_int_equal(rp_st_writer_add(&w, "empty", RP_DTYPE_BF16, RP_DTYPE_F32, 2, se, NULL, &err), RP_OK);
    assert_int_equal(rp_st_writer_add_meta(&w, "format", "pt", &err), RP_OK);
    assert_int_equal(rp_st_writer_add_meta(&w, "note", "quote \" and \xc3\xa9", &err), RP_OK);
    if (rp_st_writer_write(&w, fx->path, &err) != RP_OK) fail_msg("%s", err.msg);
    rp_st_writer_free(&w);

    rp_st_file f;
    open_ok(&f, fx->path);
    assert_int_equal(f.n_tensors, 7);
    assert_string_equal(rp_st_meta(&f, "format"), "pt");
    assert_string_equal(rp_st_meta(&f, "note"), "quote \" and \xc3\xa9");
    assert_null(rp_st_meta(&f, "missing"));

    float x[6];
    const rp_st_tensor *t = rp_st_find(&f, "z.first");
    assert_int_equal(t->dtype, RP_DTYPE_F32);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 2);
    assert_int_equal(t->shape[1], 3);
    assert_int_equal(rp_st_read_f32(&f, t, x, 6, &err), RP_OK);
    assert_memory_equal(x, a, sizeof a);

    t = rp_st_find(&f, "b.bf16");
    assert_int_equal(t->dtype, RP_DTYPE_BF16);
    assert_int_equal(t->nbytes, 8);
    assert_int_equal(rp_st_read_f32(&f, t, x, 4, &err), RP_OK);
    assert_true(x[0] == 1.0f);        /* tie 0x3F808000 stays even */
    assert_true(x[1] == 1.015625f);   /* tie 0x3F818000 rounds up to even */
    assert_true(x[2] == -3.0f);
    assert_true(x[3] == rp_bf16_to_f32(rp_f32_to_bf16(1e30f)));

    t = rp_st_find(&f, "h.f16");
    assert_int_equal(t->dtype, RP_DTYPE_F16);
    assert_int_equal(t->ndim, 3);
    assert_int_equal(rp_st_read_f32(&f, t, x, 3, &err), RP_OK);
    assert_true(x[0] == 0.5f);
    assert_true(x[1] == 0x1p-24f);    /* subnormal survives */
    assert_true(x[2] == -1.0009765625f);

    t = rp_st_find(&f, "d.f64");
    assert_int_equal(t->dtype, RP_DTYPE_F64);
    assert_int_equal(t->nbytes, 48);
    assert_int_equal(rp_st_read_f32(&f, t, x, 6, &err), RP_OK);
    assert_memory_equal(x, a, sizeof a);

    t = rp_st_find(&f, "tokens");
    assert_int_equal(t->dtype, RP_DTYPE_I32);
    assert_memory_equal(t->data, ids, sizeof ids);

    t = rp_st_find(&f, "scalar");
    assert_int_equal(t->ndim, 0);
    assert_int_equal(rp_st_read_f32(&f, t, x, 1, &err), RP_OK);
    assert_true(x[0] == 42.0f);

    t = rp_st_find(&f, "empty");
    assert_int_equal(t->numel, 0);
    assert_int_equal(t->shape[1], 7);
    rp_st_close(&f);
}

static void test_writer_header_is_padded_and_in_insertion_order(void **state) {
    fixture *fx = *state;
    const float v[3] = {1, 2, 3};
    int64_t s1[1] = {1}, s3[1] = {3};
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_error err;
    assert_int_equal(rp_st_writer_add(&w, "zeta", RP_DTYPE_F32, RP_DTYPE_F32, 1, s3, v, &err), RP_OK);
    assert_int_equal(rp_st_writer_add(&w, "alpha", RP_DTYPE_F32, RP_DTYPE_F32, 1, s1, v, &err), RP_OK);
    assert_int_equal(rp_st_writer_add_meta(&w, "k", "v", &err), RP_OK);
    assert_int_equal(rp_st_writer_write(&w, fx->path, &err), RP_OK);
    rp_st_writer_free(&w);

    FILE *fp = fopen(fx->path, "rb");
    assert_non_null(fp);
    unsigned char buf[4096];
    size_t n = fread(buf, 1, sizeof buf, fp);
    fclose(fp);
    uint64_t hn = 0;
    for (int i = 7; i >= 0; i--) hn = hn << 8 | buf[i];
    assert_int_equal(hn % 8, 0);
    assert_int_equal(n, 8 + hn + 16);
    char *header = strndup((const char *)buf + 8, (size_t)hn);
    assert_non_null(header);
    char *zeta = strstr(header, "\"zeta\""), *alpha = strstr(header, "\"alpha\"");
    assert_non_null(zeta);
    assert_non_null(alpha);
    assert_true(zeta < alpha);
    assert_non_null(strstr(header, "\"data_offsets\":[0,12]"));
    assert_non_null(strstr(header, "\"data_offsets\":[12,16]"));
    size_t len = strlen(header);
    assert_true(header[len - 1] == '}' || header[len - 1] == ' ');
    free(header);
    /* Data in insertion order: zeta's 1,2,3 then alpha's 1. */
    float data[4];
    memcpy(data, buf + 8 + hn, sizeof data);
    assert_true(data[0] == 1 && data[1] == 2 && data[2] == 3 && data[3] == 1);
}

static void test_writer_converts_large_tensor_in_chunks(void **state) {
    fixture *fx = *state;
    const int64_t n = 300001; /* several conversion chunks plus a ragged tail */
    float *src = malloc((size_t)n * sizeof *src);
    float *back = malloc((size_t)n * sizeof *back);
    assert_non_null(src);
    assert_non_null(back);
    uint32_t r = 12345;
    for (int64_t i = 0; i < n; i++) {
        r = r * 1664525u + 1013904223u;
        src[i] = ((float)(r >> 8) / 16777216.0f - 0.5f) * 1000.0f;
    }
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_error err;
    assert_int_equal(rp_st_writer_add(&w, "big", RP_DTYPE_BF16, RP_DTYPE_F32, 1, &n, src, &err), RP_OK);
    assert_int_equal(rp_st_writer_write(&w, fx->path, &err), RP_OK);
    rp_st_writer_free(&w);
    rp_st_file f;
    open_ok(&f, fx->path);
    const rp_st_tensor *t = rp_st_find(&f, "big");
    assert_int_equal(rp_st_read_f32(&f, t, back, n, &err), RP_OK);
    for (int64_t i = 0; i < n; i++)
        if (back[i] != rp_bf16_to_f32(rp_f32_to_bf16(src[i])))
            fail_msg("element %lld differs", (long long)i);
    rp_st_close(&f);
    free(src);
    free(back);
}

static void test_successful_write_leaves_no_temporary_file(void **state) {
    fixture *fx = *state;
    const float v[2] = {1, 2};
    int64_t s[1] = {2};
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_error err;
    assert_int_equal(rp_st_writer_add(&w, "v", RP_DTYPE_F32, RP_DTYPE_F32, 1, s, v, &err), RP_OK);
    assert_int_equal(rp_st_writer_write(&w, fx->path, &err), RP_OK);
    /* Writing again replaces the file in place. */
    assert_int_equal(rp_st_writer_write(&w, fx->path, &err), RP_OK);
    rp_st_writer_free(&w);
    assert_int_equal(count_entries(fx->dir), 1);
    assert_int_equal(access(fx->path, R_OK), 0);
}

static void test_write_into_missing_directory_fails_cleanly(void **state) {
    fixture *fx = *state;
    char path[512];
    snprintf(path, sizeof path, "%s/no/such/dir/out.safetensors", fx->dir);
    const float v[1] = {1};
    int64_t s[1] = {1};
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_error err;
    rp_error_clear(&err);
    assert_int_equal(rp_st_writer_add(&w, "v", RP_DTYPE_F32, RP_DTYPE_F32, 1, s, v, &err), RP_OK);
    assert_int_equal(rp_st_writer_write(&w, path, &err), RP_ERR_IO);
    rp_st_writer_free(&w);
    assert_non_null(strstr(err.msg, path));
    assert_non_null(strstr(err.msg, "No such file or directory"));
    assert_int_equal(count_entries(fx->dir), 0);
}

static void test_write_onto_a_directory_fails_and_removes_temporary(void **state) {
    fixture *fx = *state;
    /* The temp file is created and written, then rename() fails: it must go. */
    assert_int_equal(mkdir(fx->path, 0755), 0);
    const float v[1] = {1};
    int64_t s[1] = {1};
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_error err;
    assert_int_equal(rp_st_writer_add(&w, "v", RP_DTYPE_F32, RP_DTYPE_F32, 1, s, v, &err), RP_OK);
    assert_int_equal(rp_st_writer_write(&w, fx->path, &err), RP_ERR_IO);
    rp_st_writer_free(&w);
    assert_non_null(strstr(err.msg, "cannot rename temporary file"));
    assert_int_equal(count_entries(fx->dir), 1); /* only the directory we made */
}

static void test_writer_rejects_duplicate_name(void **state) {
    (void)state;
    const float v[1] = {1};
    int64_t s[1] = {1};
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_error err;
    assert_int_equal(rp_st_writer_add(&w, "v", RP_DTYPE_F32, RP_DTYPE_F32, 1, s, v, &err), RP_OK);
    assert_int_equal(rp_st_writer_add(&w, "v", RP_DTYPE_F32, RP_DTYPE_F32, 1, s, v, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "tensor 'v' added twice"));
    assert_int_equal(rp_st_writer_add_meta(&w, "k", "1", &err), RP_OK);
    assert_int_equal(rp_st_writer_add_meta(&w, "k", "2", &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "metadata key 'k' added twice"));
    rp_st_writer_free(&w);
}

static void test_writer_rejects_unsupported_conversion(void **state) {
    (void)state;
    const float v[1] = {1};
    int64_t s[1] = {1};
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_error err;
    assert_int_equal(rp_st_writer_add(&w, "v", RP_DTYPE_I32, RP_DTYPE_F32, 1, s, v, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "cannot store F32 memory as I32"));
    assert_int_equal(rp_st_writer_add(&w, "v", RP_DTYPE_F32, RP_DTYPE_BF16, 1, s, v, &err), RP_ERR_ARG);
    assert_int_equal(w.n_entries, 0);
    rp_st_writer_free(&w);
}

static void test_writer_rejects_bad_shape_and_reserved_name(void **state) {
    (void)state;
    const float v[1] = {1};
    int64_t neg[2] = {2, -1};
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_error err;
    assert_int_equal(rp_st_writer_add(&w, "v", RP_DTYPE_F32, RP_DTYPE_F32, 2, neg, v, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "tensor 'v': shape dimension 1 is -1"));
    assert_int_equal(rp_st_writer_add(&w, "v", RP_DTYPE_F32, RP_DTYPE_F32, 9, neg, v, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "9 dimensions"));
    assert_int_equal(rp_st_writer_add(&w, "__metadata__", RP_DTYPE_F32, RP_DTYPE_F32, 0, NULL, v, &err),
                     RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "reserved"));
    assert_int_equal(rp_st_writer_add(&w, "bad\xff", RP_DTYPE_F32, RP_DTYPE_F32, 0, NULL, v, &err),
                     RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "not valid UTF-8"));
    assert_int_equal(w.n_entries, 0);
    rp_st_writer_free(&w);
}

#define FX(test) cmocka_unit_test_setup_teardown(test, setup_dir, teardown_dir)

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_tiny_weights_open_with_72_tensors),
        cmocka_unit_test(test_bf16_of_golden_weights_matches_torch_pth_bit_for_bit),
        FX(test_empty_header_object_has_zero_tensors),
        FX(test_zero_element_tensor_and_scalar_are_valid),
        FX(test_empty_file_is_rejected),
        FX(test_file_shorter_than_8_bytes_is_rejected),
        FX(test_header_length_beyond_file_is_rejected),
        FX(test_header_length_over_cap_is_rejected),
        FX(test_header_not_json_is_rejected),
        FX(test_header_json_not_object_is_rejected),
        FX(test_unknown_dtype_is_rejected),
        FX(test_shape_not_array_is_rejected),
        FX(test_negative_shape_dimension_is_rejected),
        FX(test_too_many_dimensions_are_rejected),
        FX(test_shape_element_count_overflow_is_rejected),
        FX(test_data_offsets_out_of_range_are_rejected),
        FX(test_data_offsets_reversed_are_rejected),
        FX(test_data_offsets_malformed_are_rejected),
        FX(test_overlapping_tensors_are_rejected),
        FX(test_byte_size_not_matching_shape_is_rejected),
        FX(test_duplicate_tensor_name_is_rejected),
        FX(test_non_string_metadata_value_is_rejected),
        FX(test_metadata_not_object_is_rejected),
        FX(test_missing_file_is_an_io_error),
        FX(test_directory_is_not_a_safetensors_file),
        FX(test_reading_i32_tensor_as_f32_is_refused),
        FX(test_expected_element_count_mismatch_is_refused),
        FX(test_writer_round_trips_dtypes_shapes_and_metadata),
        FX(test_writer_header_is_padded_and_in_insertion_order),
        FX(test_writer_converts_large_tensor_in_chunks),
        FX(test_successful_write_leaves_no_temporary_file),
        FX(test_write_into_missing_directory_fails_cleanly),
        FX(test_write_onto_a_directory_fails_and_removes_temporary),
        cmocka_unit_test(test_writer_rejects_duplicate_name),
        cmocka_unit_test(test_writer_rejects_unsupported_conversion),
        cmocka_unit_test(test_writer_rejects_bad_shape_and_reserved_name),
    };
    return cmocka_run_group_tests_name("safetensors", tests, NULL, NULL);
}
