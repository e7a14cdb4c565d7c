/* rp_model_load on malformed files and the load/save round trips.
 * Every malformed case builds its file in a fresh mkdtemp directory (a mutated
 * copy of the tiny reference weights, or raw bytes) and expects a non-OK status
 * whose message names the file and the offending tensor or value: never a
 * crash, never a model that loads with silently wrong weights. The positive
 * cases compare flat weight buffers bit for bit and logits of the 16 golden
 * tokens. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>

#include "core/dtype.h"
#include "cpu/cpu_backend.h"
#include "golden_util.h"
#include "model/model.h"
#include "model/state.h"

#define TINY_WEIGHTS "tiny_L2_C128_V256_s1.weights.safetensors"
#define TINY_GOLDEN "tiny_L2_C128_V256_s1.golden.safetensors"
#define LOGIT_TOL 1e-4

typedef struct {
    char dir[512];        /* mkdtemp directory, removed in teardown */
    char weights[1024];   /* the tiny reference weights */
    rp_st_file src;       /* ... opened, for building mutated copies */
    rp_backend *be;
    rp_model model;       /* loaded by the test; freed in teardown */
    rp_model other;
    rp_error err;
} fixture;

/* Removes dir and the plain files this test wrote into it. */
static void remove_tmp_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[1100];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (unlink(path) != 0) fprintf(stderr, "cannot remove %s: %s\n", path, strerror(errno));
    }
    closedir(d);
    if (rmdir(dir) != 0) fprintf(stderr, "cannot remove %s: %s\n", dir, strerror(errno));
}

static int teardown(void **state_ptr);

static int setup(void **state_ptr) {
    fixture *fx = calloc(1, sizeof *fx);
    *state_ptr = fx;
    const char *tmp = getenv("TMPDIR");
    snprintf(fx->dir, sizeof fx->dir, "%s/test_model_load.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(fx->dir)) {
        fprintf(stderr, "mkdtemp %s: %s\n", fx->dir, strerror(errno));
        fx->dir[0] = '\0';
        teardown(state_ptr);
        return -1;
    }
    golden_data_path(fx->weights, sizeof fx->weights, TINY_WEIGHTS);
    if (rp_st_open(&fx->src, fx->weights, &fx->err) != RP_OK ||
        !(fx->be = rp_cpu_backend_create(0, &fx->err))) {
        fprintf(stderr, "%s\n", fx->err.msg);
        teardown(state_ptr);
        return -1;
    }
    return 0;
}

static int teardown(void **state_ptr) {
    fixture *fx = *state_ptr;
    rp_model_free(&fx->model);
    rp_model_free(&fx->other);
    rp_st_close(&fx->src);
    if (fx->be) rp_cpu_backend_destroy(fx->be);
    if (fx->dir[0]) remove_tmp_dir(fx->dir);
    free(fx);
    return 0;
}

static void tmp_path(const fixture *fx, char *out, size_t size, const char *name) {
    snprintf(out, size, "%s/%s", fx->dir, name);
}

/* ---- building files ---- */

static int name_in(const char *name, const char *const *list) {
    for (; list && *list; list++)
        if (strcmp(name, *list) == 0) return 1;
    return 0;
}

/* Adds every tensor of src except those in skip (NULL-terminated) unchanged. */
static void add_all_but(rp_st_writer *w, const rp_st_file *src, const char *const *skip) {
    rp_error err;
    for (int i = 0; i < src->n_tensors; i++) {
        const rp_st_tensor *t = &src->tensors[i];
        if (name_in(t->name, skip)) continue;
        if (rp_st_writer_add(w, t->name, t->dtype, t->dtype, t->ndim, t->shape, t->data, &err) !=
            RP_OK)
            fail_msg("%s", err.msg);
    }
}

static void write_or_fail(rp_st_writer *w, const char *path) {
    rp_error err;
    if (rp_st_writer_write(w, path, &err) != RP_OK) fail_msg("%s", err.msg);
    rp_st_writer_free(w);
}

/* The tiny weights without the tensors in skip. */
static void write_copy_without(fixture *fx, const char *path, const char *const *skip) {
    rp_st_writer w;
    rp_st_writer_init(&w);
    add_all_but(&w, &fx->src, skip);
    write_or_fail(&w, path);
}

static void write_bytes(const char *path, const void *bytes, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* A raw safetensors file: u64 little-endian header length, header text
 * (exactly as given), then data_bytes bytes of data (all 0x3f). The header
 * length field is header_len_field, which may lie. */
static void write_raw_safetensors(const char *path, uint64_t header_len_field, const char *header,
                                  size_t data_bytes) {
    size_t hn = strlen(header), n = 8 + hn + data_bytes;
    unsigned char *buf = malloc(n);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(header_len_field >> (8 * i));
    memcpy(buf + 8, header, hn);
    memset(buf + 8 + hn, 0x3f, data_bytes);
    write_bytes(path, buf, n);
    free(buf);
}

static void write_raw_header(const char *path, const char *header, size_t data_bytes) {
    write_raw_safetensors(path, strlen(header), header, data_bytes);
}

/* ---- checking ---- */

/* Backend allocations made while a malformed file is loaded: validation
 * must fail from the header alone, before any weight buffer exists. */
static size_t n_backend_allocs;
static void *(*real_alloc)(rp_backend *be, size_t bytes);
static void *counting_alloc(rp_backend *be, size_t bytes) {
    n_backend_allocs++;
    return real_alloc(be, bytes);
}

/* rp_model_load must return want and a message containing the path and every
 * string in mentions (NULL-terminated), without allocating anything first;
 * the config reader that `info` and the CLI use must refuse the file too. */
static void assert_load_fails(fixture *fx, const char *path, rp_status want,
                              const char *const *mentions) {
    memset(&fx->model, 0, sizeof fx->model);
    rp_error_clear(&fx->err);
    real_alloc = fx->be->alloc;
    fx->be->alloc = counting_alloc;
    n_backend_allocs = 0;
    rp_status st = rp_model_load(&fx->model, path, 0, -1, fx->be, &fx->err);
    fx->be->alloc = real_alloc;
    if (st != RP_OK && n_backend_allocs != 0)
        fail_msg("%s: %zu backend allocations before the load failed (%s)", path,
                 n_backend_allocs, fx->err.msg);
    rp_st_file f;
    rp_error err2;
    if (st != RP_OK && rp_st_open(&f, path, &err2) == RP_OK) {
        rp_config cfg;
        rp_status st2 = rp_config_from_safetensors(&f, &cfg, NULL, &err2);
        rp_st_close(&f);
        if (st2 == RP_OK) fail_msg("%s: rp_config_from_safetensors accepts it (vocab %d)", path,
                                   cfg.vocab_size);
        assert_string_equal(err2.msg, fx->err.msg);
    }
    if (st == RP_OK) fail_msg("%s loaded, expected %s", path, rp_status_name(want));
    if (st != want)
        fail_msg("%s: status %s, expected %s (message: %s)", path, rp_status_name(st),
                 rp_status_name(want), fx->err.msg);
    if (!strstr(fx->err.msg, path)) fail_msg("message does not name the file %s: %s", path, fx->err.msg);
    for (; mentions && *mentions; mentions++)
        if (!strstr(fx->err.msg, *mentions))
            fail_msg("message does not mention '%s': %s", *mentions, fx->err.msg);
    /* A failed load leaves nothing allocated behind. */
    assert_null(fx->model.layer_flat);
    assert_null(fx->model.embed_flat);
    assert_null(fx->model.head_flat);
    print_message("  rejected as expected: %s\n", fx->err.msg);
}

static void load_or_fail(fixture *fx, rp_model *m, const char *path, int begin, int end) {
    if (rp_model_load(m, path, begin, end, fx->be, &fx->err) != RP_OK) fail_msg("%s", fx->err.msg);
}

/* Host copy of one of a model's flat buffers. */
static float *host_copy(const fixture *fx, const float *dev, size_t floats) {
    float *h = malloc(floats * sizeof(float));
    fx->be->copy_to_host(fx->be, h, dev, floats * sizeof(float));
    return h;
}

/* Index of the first float whose bits differ, or -1. */
static long first_bit_difference(const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0) return (long)i;
    return -1;
}

/* Official name of the tensor holding float `offset` of a flat buffer of the
 * given part (layer buffers: of layer `layer`), for failure messages. */
static void tensor_at(const rp_config *cfg, rp_param_part part, int layer, size_t offset,
                      char *out, size_t size) {
    rp_tensor_info table[RP_LAYER_N_TENSORS > RP_GLOBAL_N_TENSORS ? RP_LAYER_N_TENSORS
                                                                  : RP_GLOBAL_N_TENSORS];
    int n = RP_LAYER_N_TENSORS;
    if (part == RP_PART_LAYER) rp_layer_layout(cfg, table);
    else {
        rp_global_layout(cfg, table, NULL, NULL);
        n = RP_GLOBAL_N_TENSORS;
    }
    snprintf(out, size, "?");
    for (int i = 0; i < n; i++)
        if (table[i].part == part && offset >= table[i].flat_offset &&
            offset < table[i].flat_offset + (size_t)table[i].numel) {
            rp_tensor_name(out, size, &table[i], layer);
            size_t used = strlen(out);
            snprintf(out + used, size - used, "[%zu]", offset - table[i].flat_offset);
        }
}

/* Both flat buffers (of `part`, layer `layer`) hold bit-identical floats. */
static void assert_flat_identical(const fixture *fx, const rp_config *cfg, rp_param_part part,
                                  int layer, const float *a_dev, const float *b_dev,
                                  size_t floats) {
    float *a = host_copy(fx, a_dev, floats), *b = host_copy(fx, b_dev, floats);
    long i = first_bit_difference(a, b, floats);
    if (i >= 0) {
        char name[256];
        tensor_at(cfg, part, layer, (size_t)i, name, sizeof name);
        fail_msg("%s differs: %.9g vs %.9g", name, a[i], b[i]);
    }
    free(a);
    free(b);
}

/* Both models own every layer, the embedding and the head, with the same
 * config; every weight is bit-identical. */
static void assert_same_weights(const fixture *fx, const rp_model *a, const rp_model *b) {
    assert_memory_equal(&a->cfg, &b->cfg, sizeof a->cfg);
    assert_int_equal(a->layer_floats, b->layer_floats);
    for (int l = 0; l < a->cfg.n_layer; l++)
        assert_flat_identical(fx, &a->cfg, RP_PART_LAYER, l, a->layer_flat[l], b->layer_flat[l],
                              a->layer_floats);
    assert_flat_identical(fx, &a->cfg, RP_PART_EMBED, 0, a->embed_flat, b->embed_flat,
                          a->embed_floats);
    assert_flat_identical(fx, &a->cfg, RP_PART_HEAD, 0, a->head_flat, b->head_flat,
                          a->head_floats);
}

/* Logits [T, V] of the golden tokens from a zero state (malloc'ed). */
static float *golden_token_logits(const fixture *fx, const rp_model *m, int *T_out) {
    char path[1024];
    golden_data_path(path, sizeof path, TINY_GOLDEN);
    rp_st_file gold;
    rp_error err;
    if (rp_st_open(&gold, path, &err) != RP_OK) fail_msg("%s", err.msg);
    const rp_st_tensor *tok = rp_st_find(&gold, "tokens");
    assert_non_null(tok);
    int T = (int)tok->numel, V = m->cfg.vocab_size;
    int32_t *tokens = malloc(tok->nbytes);
    memcpy(tokens, tok->data, tok->nbytes);
    rp_st_close(&gold);

    rp_state st;
    assert_int_equal(rp_state_alloc_host(&st, &m->cfg, 0, m->cfg.n_layer, 1, &err), RP_OK);
    rp_workspace ws;
    assert_int_equal(rp_workspace_alloc(&ws, &m->cfg, T, fx->be, &err), RP_OK);
    int slot = 0, row_begin;
    rp_batch batch;
    rp_batch_init(&batch, 1, &T, &slot, &row_begin);
    float *logits = malloc((size_t)T * V * sizeof(float));
    if (rp_model_forward(m, &ws, tokens, &batch, &st, RP_LOGITS_ALL, logits, &err) != RP_OK)
        fail_msg("%s", err.msg);
    rp_workspace_free(&ws, fx->be);
    rp_state_free_host(&st);
    free(tokens);
    *T_out = T;
    return logits;
}

static void assert_same_logits(const fixture *fx, const rp_model *a, const rp_model *b) {
    int T;
    float *la = golden_token_logits(fx, a, &T), *lb = golden_token_logits(fx, b, &T);
    size_t n = (size_t)T * a->cfg.vocab_size;
    long i = first_bit_difference(la, lb, n);
    if (i >= 0) fail_msg("logit %ld differs: %.9g vs %.9g", i, la[i], lb[i]);
    free(la);
    free(lb);
}

/* ================================================= malformed files */

static void test_missing_tensor_is_named(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "missing_key.safetensors");
    const char *skip[] = {"blocks.1.att.key.weight", NULL};
    write_copy_without(fx, path, skip);
    const char *mentions[] = {"blocks.1.att.key.weight", "missing", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

/* Layer 0's value LoRA (att.v0/v1/v2) may be absent; its value projection,
 * whose name shares the "att.v" prefix, may not. */
static void test_missing_layer0_value_projection_is_named(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "missing_value_0.safetensors");
    const char *skip[] = {"blocks.0.att.value.weight", NULL};
    write_copy_without(fx, path, skip);
    const char *mentions[] = {"blocks.0.att.value.weight", "missing", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

static void test_shape_mismatch_names_tensor_and_both_shapes(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "key_C_by_C_minus_1.safetensors");
    const char *skip[] = {"blocks.1.att.key.weight", NULL};
    const rp_st_tensor *key = rp_st_find(&fx->src, "blocks.1.att.key.weight");
    assert_non_null(key);
    const int64_t C = key->shape[0];
    /* [C, C-1]: every row loses its last column, so the data is self-consistent. */
    float *narrow = malloc((size_t)(C * (C - 1)) * sizeof(float));
    const float *full = key->data;
    for (int64_t r = 0; r < C; r++)
        for (int64_t c = 0; c < C - 1; c++) memcpy(&narrow[r * (C - 1) + c], &full[r * C + c], 4);
    rp_st_writer w;
    rp_st_writer_init(&w);
    add_all_but(&w, &fx->src, skip);
    int64_t shape[2] = {C, C - 1};
    assert_int_equal(rp_st_writer_add(&w, "blocks.1.att.key.weight", RP_DTYPE_F32, RP_DTYPE_F32, 2,
                                      shape, narrow, &fx->err),
                     RP_OK);
    write_or_fail(&w, path);
    free(narrow);
    const char *mentions[] = {"blocks.1.att.key.weight", "[128,127]", "[128,128]", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

/* A copy of the tiny model's header, with `change`'s shape (and dtype)
 * replaced and `skip` left out, over a sparse data section of the size the
 * header claims: only the header is real, so a file that claims gigabytes
 * costs nothing on disk. */
static void write_sparse_like_tiny(fixture *fx, const char *path, const char *change,
                                   int64_t rows, int64_t cols, const char *dtype,
                                   const char *skip) {
    size_t cap = 1 << 16, n = 0;
    char *h = malloc(cap);
    uint64_t offset = 0;
    n += (size_t)snprintf(h + n, cap - n, "{");
    for (int i = 0; i < fx->src.n_tensors; i++) {
        const rp_st_tensor *t = &fx->src.tensors[i];
        if (skip && strcmp(t->name, skip) == 0) continue;
        char shape[128];
        uint64_t bytes;
        const char *dt = rp_dtype_name(t->dtype);
        if (change && strcmp(t->name, change) == 0) {
            snprintf(shape, sizeof shape, "%lld,%lld", (long long)rows, (long long)cols);
            dt = dtype;
            bytes = (uint64_t)rows * (uint64_t)cols * (strcmp(dtype, "U8") == 0 ? 1 : 4);
        } else {
            int k = 0;
            shape[0] = '\0';
            for (int d = 0; d < t->ndim; d++)
                k += snprintf(shape + k, sizeof shape - (size_t)k, "%s%lld", d ? "," : "",
                              (long long)t->shape[d]);
            bytes = t->nbytes;
        }
        n += (size_t)snprintf(h + n, cap - n,
                              "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%s],\"data_offsets\":[%llu,%llu]}",
                              n > 1 ? "," : "", t->name, dt, shape, (unsigned long long)offset,
                              (unsigned long long)(offset + bytes));
        offset += bytes;
        assert_true(n < cap - 256);
    }
    n += (size_t)snprintf(h + n, cap - n, "}");
    FILE *out = fopen(path, "wb");
    assert_non_null(out);
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)n >> (8 * i));
    assert_int_equal(fwrite(len, 1, 8, out), 8);
    assert_int_equal(fwrite(h, 1, n, out), n);
    assert_int_equal(fclose(out), 0);
    if (truncate(path, (off_t)(8 + n + offset)) != 0)
        fail_msg("cannot make %s sparse %llu bytes: %s", path,
                 (unsigned long long)(8 + n + offset), strerror(errno));
    free(h);
}

/* The finding: a 2 MB sparse file whose embedding claims vocab 2^24 made
 * `logits` allocate 22 GB for 72 s before noticing head.weight is missing. */
static void test_huge_embedding_without_head_fails_before_allocating(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "vocab_2e24_no_head.safetensors");
    write_sparse_like_tiny(fx, path, "emb.weight", 1 << 24, 128, "F32", "head.weight");
    const char *mentions[] = {"missing tensor 'head.weight'", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

/* The vocabulary comes from emb; a head of another vocabulary is refused
 * before anything is allocated from emb's shape. */
static void test_head_of_another_vocabulary_fails_before_allocating(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "head_255.safetensors");
    write_sparse_like_tiny(fx, path, "head.weight", 255, 128, "F32", NULL);
    const char *mentions[] = {"'head.weight' has shape [255,128], expected [256,128]", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

/* (int)(2^32 + 256) is 256: the dimension is range-checked as int64 first. */
static void test_dimension_of_2_to_32_plus_256_is_refused_not_truncated(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "vocab_2e32_plus_256.safetensors");
    write_sparse_like_tiny(fx, path, "emb.weight", (1ll << 32) + 256, 128, "U8", NULL);
    const char *mentions[] = {"'emb.weight' has dimension 0 = 4294967552",
                              "vocab_size would be 4294967552: out of range [1, 16777216]", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

/* A LoRA rank, an FFN width or a layer's tensor may be wrong in any layer,
 * not only in the ones the config is read from. */
static void test_wrong_shape_in_a_later_layer_fails_before_allocating(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "ffn_value_1.safetensors");
    write_sparse_like_tiny(fx, path, "blocks.1.ffn.value.weight", 128, 256, "F32", NULL);
    const char *mentions[] = {"'blocks.1.ffn.value.weight' has shape [128,256], expected [128,512]",
                              NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

/* I32 has the size of F32: a loader that ignored dtype would reinterpret the
 * integers as floats and load a model that is silently wrong. */
static void test_integer_dtype_weight_is_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "key_i32.safetensors");
    const char *skip[] = {"blocks.1.att.key.weight", NULL};
    const rp_st_tensor *key = rp_st_find(&fx->src, "blocks.1.att.key.weight");
    int32_t *ints = malloc((size_t)key->numel * sizeof(int32_t));
    for (int64_t i = 0; i < key->numel; i++) ints[i] = (int32_t)(i % 7) - 3;
    rp_st_writer w;
    rp_st_writer_init(&w);
    add_all_but(&w, &fx->src, skip);
    assert_int_equal(rp_st_writer_add(&w, "blocks.1.att.key.weight", RP_DTYPE_I32, RP_DTYPE_I32,
                                      key->ndim, key->shape, ints, &fx->err),
                     RP_OK);
    write_or_fail(&w, path);
    free(ints);
    const char *mentions[] = {"blocks.1.att.key.weight", "I32", NULL};
    assert_load_fails(fx, path, RP_ERR_FORMAT, mentions);
}

static void test_tensor_of_a_layer_beyond_the_count_is_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "stray_layer5.safetensors");
    const rp_st_tensor *bias = rp_st_find(&fx->src, "blocks.1.ln1.bias");
    rp_st_writer w;
    rp_st_writer_init(&w);
    add_all_but(&w, &fx->src, NULL);
    assert_int_equal(rp_st_writer_add(&w, "blocks.5.ln1.bias", RP_DTYPE_F32, RP_DTYPE_F32,
                                      bias->ndim, bias->shape, bias->data, &fx->err),
                     RP_OK);
    write_or_fail(&w, path);
    const char *mentions[] = {"blocks.5.ln1.bias", "layer", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

/* Layers are counted by blocks.{l}.ln1.weight: without layer 0's, the other
 * layer-0 and layer-1 tensors must not be read as a smaller model. */
static void test_layer_without_its_ln1_weight_is_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "no_block0_ln1.safetensors");
    const char *skip[] = {"blocks.0.ln1.weight", NULL};
    write_copy_without(fx, path, skip);
    const char *mentions[] = {"blocks.0.ln1.weight", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

/* The same hole in the last layer: layer 1 loses ln1.weight but keeps the rest. */
static void test_last_layer_without_its_ln1_weight_is_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "no_block1_ln1.safetensors");
    const char *skip[] = {"blocks.1.ln1.weight", NULL};
    write_copy_without(fx, path, skip);
    const char *mentions[] = {"blocks.1.", "layer", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

static void test_truncated_file_is_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "half.safetensors");
    size_t n = fx->src.map_bytes / 2;
    write_bytes(path, fx->src.map, n);
    const char *mentions[] = {"data_offsets", "truncated", NULL};
    assert_load_fails(fx, path, RP_ERR_FORMAT, mentions);
}

static void test_header_length_beyond_the_file_is_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "long_header.safetensors");
    const char *header = "{\"emb.weight\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    write_raw_safetensors(path, 1000000, header, 4);
    const char *mentions[] = {"header length 1000000", NULL};
    assert_load_fails(fx, path, RP_ERR_FORMAT, mentions);
}

static void test_bad_json_header_is_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "bad_json.safetensors");
    write_raw_header(path, "{\"emb.weight\": {\"dtype\": \"F32\", \"shape\": [1], ", 4);
    const char *mentions[] = {"JSON", NULL};
    assert_load_fails(fx, path, RP_ERR_FORMAT, mentions);
}

static void test_offsets_past_the_data_are_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "offsets_out_of_range.safetensors");
    /* 16 bytes promised, 8 present. */
    write_raw_header(path,
                     "{\"emb.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}",
                     8);
    const char *mentions[] = {"emb.weight", "data_offsets", "[0, 16]", NULL};
    assert_load_fails(fx, path, RP_ERR_FORMAT, mentions);
}

static void test_overlapping_offsets_are_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "overlap.safetensors");
    write_raw_header(path,
                     "{\"emb.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                     "\"head.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[8,24]}}",
                     24);
    const char *mentions[] = {"emb.weight", "head.weight", "overlap", NULL};
    assert_load_fails(fx, path, RP_ERR_FORMAT, mentions);
}

/* A valid safetensors file that is not a model: the golden logits file. */
static void test_file_without_embedding_is_not_a_model(void **s) {
    fixture *fx = *s;
    char path[1100], golden[1024];
    tmp_path(fx, path, sizeof path, "golden_copy.safetensors");
    golden_data_path(golden, sizeof golden, TINY_GOLDEN);
    rp_st_file g;
    if (rp_st_open(&g, golden, &fx->err) != RP_OK) fail_msg("%s", fx->err.msg);
    rp_st_writer w;
    rp_st_writer_init(&w);
    add_all_but(&w, &g, NULL);
    write_or_fail(&w, path);
    rp_st_close(&g);
    const char *mentions[] = {"emb.weight", "not an RWKV-7 model", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

static void test_nonexistent_path_is_an_io_error(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "does_not_exist.safetensors");
    assert_load_fails(fx, path, RP_ERR_IO, NULL);
}

/* ================================================= round trips */

static void test_f32_save_then_load_is_bit_identical(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "saved_f32.safetensors");
    load_or_fail(fx, &fx->model, fx->weights, 0, -1);
    if (rp_model_save(&fx->model, path, RP_DTYPE_F32, &fx->err) != RP_OK) fail_msg("%s", fx->err.msg);
    load_or_fail(fx, &fx->other, path, 0, -1);
    assert_same_weights(fx, &fx->model, &fx->other);
    assert_same_logits(fx, &fx->model, &fx->other);
}

/* The saved model still computes the reference logits (not merely the same
 * as the model it came from). */
static void test_f32_saved_model_matches_reference_logits(void **s) {
    fixture *fx = *s;
    char path[1100], golden[1024];
    tmp_path(fx, path, sizeof path, "saved_f32.safetensors");
    load_or_fail(fx, &fx->model, fx->weights, 0, -1);
    if (rp_model_save(&fx->model, path, RP_DTYPE_F32, &fx->err) != RP_OK) fail_msg("%s", fx->err.msg);
    load_or_fail(fx, &fx->other, path, 0, -1);
    int T;
    float *logits = golden_token_logits(fx, &fx->other, &T);
    golden_data_path(golden, sizeof golden, TINY_GOLDEN);
    rp_st_file g;
    if (rp_st_open(&g, golden, &fx->err) != RP_OK) fail_msg("%s", fx->err.msg);
    float *ref = golden_read(&g, "logits", NULL);
    double e = golden_rel_err(logits, ref, (size_t)T * fx->other.cfg.vocab_size);
    if (e > LOGIT_TOL) fail_msg("saved model: logits relative error %.3g > %.1g", e, LOGIT_TOL);
    free(ref);
    free(logits);
    rp_st_close(&g);
}

static void round_to_bf16(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = rp_bf16_to_f32(rp_f32_to_bf16(x[i]));
}

static void assert_flat_is_bf16_of(const fixture *fx, const rp_config *cfg, rp_param_part part,
                                   int layer, const float *loaded_dev, const float *orig_dev,
                                   size_t floats) {
    float *orig = host_copy(fx, orig_dev, floats), *got = host_copy(fx, loaded_dev, floats);
    float *want = host_copy(fx, orig_dev, floats);
    round_to_bf16(want, floats);
    long i = first_bit_difference(got, want, floats);
    if (i >= 0) {
        char name[256];
        tensor_at(cfg, part, layer, (size_t)i, name, sizeof name);
        fail_msg("%s is %.9g, expected bf16(%.9g) = %.9g", name, got[i], orig[i], want[i]);
    }
    free(orig);
    free(want);
    free(got);
}

static void test_bf16_save_then_load_equals_weights_rounded_to_bf16(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "saved_bf16.safetensors");
    load_or_fail(fx, &fx->model, fx->weights, 0, -1);
    if (rp_model_save(&fx->model, path, RP_DTYPE_BF16, &fx->err) != RP_OK)
        fail_msg("%s", fx->err.msg);
    /* Stored as BF16, every tensor. */
    rp_st_file saved;
    if (rp_st_open(&saved, path, &fx->err) != RP_OK) fail_msg("%s", fx->err.msg);
    for (int i = 0; i < saved.n_tensors; i++)
        if (saved.tensors[i].dtype != RP_DTYPE_BF16)
            fail_msg("%s stored as %s", saved.tensors[i].name,
                     rp_dtype_name(saved.tensors[i].dtype));
    assert_int_equal(saved.n_tensors, fx->src.n_tensors);
    rp_st_close(&saved);

    load_or_fail(fx, &fx->other, path, 0, -1);
    const rp_model *a = &fx->model, *b = &fx->other;
    assert_memory_equal(&a->cfg, &b->cfg, sizeof a->cfg);
    for (int l = 0; l < a->cfg.n_layer; l++)
        assert_flat_is_bf16_of(fx, &a->cfg, RP_PART_LAYER, l, b->layer_flat[l], a->layer_flat[l],
                               a->layer_floats);
    assert_flat_is_bf16_of(fx, &a->cfg, RP_PART_EMBED, 0, b->embed_flat, a->embed_flat,
                           a->embed_floats);
    assert_flat_is_bf16_of(fx, &a->cfg, RP_PART_HEAD, 0, b->head_flat, a->head_flat,
                           a->head_floats);
}

/* ---- HF/fla names (docs/rwkv7.md, HF names): the names from the shared table (rp_hf_names,
 * which tests/test_convert.sh checks against the converter's), the shapes as
 * fla files store them ---- */

typedef enum { HF_SAME, HF_SQUEEZE, HF_TRANSPOSE } hf_transform;

/* att.v0, att.v1, att.v2 (not att.value.weight, which shares the prefix). */
static int is_value_lora(const char *suffix) {
    return strcmp(suffix, "att.v0") == 0 || strcmp(suffix, "att.v1") == 0 ||
           strcmp(suffix, "att.v2") == 0;
}

/* fla keeps x_{r,w,k,v,a,g} [1,1,C] and squeezes the other [1,1,C] vectors. */
static hf_transform fla_layout(const rp_hf_name *r) {
    if (r->kind == RP_HF_TRANSPOSE) return HF_TRANSPOSE;
    if (r->kind == RP_HF_SAME || strncmp(r->official, "att.x_", 6) == 0) return HF_SAME;
    return HF_SQUEEZE;
}

/* HF name and transform of an official name; 0 when the tensor is dropped
 * (blocks.0.att.v0/v1/v2: layer 0 has no v_lora in fla). */
static int hf_name_of(const char *official, char *out, size_t size, hf_transform *how) {
    int n;
    const rp_hf_name *map = rp_hf_names(&n);
    for (int i = 0; i < n; i++)
        if (!map[i].per_layer && strcmp(official, map[i].official) == 0) {
            snprintf(out, size, "%s", map[i].hf);
            *how = fla_layout(&map[i]);
            return 1;
        }
    int layer, used = 0;
    if (sscanf(official, "blocks.%d.%n", &layer, &used) != 1 || used == 0)
        fail_msg("unexpected tensor %s in the tiny weights", official);
    const char *suffix = official + used;
    for (int i = 0; i < n; i++)
        if (map[i].per_layer && strcmp(suffix, map[i].official) == 0) {
            if (layer == 0 && is_value_lora(suffix)) return 0;
            snprintf(out, size, "model.layers.%d.%s", layer, map[i].hf);
            *how = fla_layout(&map[i]);
            return 1;
        }
    fail_msg("no HF name for %s", official);
    return 0;
}

/* Writes the tiny weights under HF/fla names; the transposed and squeezed
 * copies are kept in bufs until the write. The HF tensor named
 * wrongly_transposed (if any) is written transposed against the spec. */
static void write_hf_copy(fixture *fx, const char *path, const char *wrongly_transposed) {
    rp_st_writer w;
    rp_st_writer_init(&w);
    float **bufs = calloc((size_t)fx->src.n_tensors, sizeof *bufs);
    char name[256];
    int n_written = 0;
    for (int i = 0; i < fx->src.n_tensors; i++) {
        const rp_st_tensor *t = &fx->src.tensors[i];
        assert_int_equal(t->dtype, RP_DTYPE_F32);
        hf_transform how;
        if (!hf_name_of(t->name, name, sizeof name, &how)) continue;
        int64_t shape[RP_ST_MAX_DIMS];
        int ndim = t->ndim;
        memcpy(shape, t->shape, sizeof shape);
        const void *data = t->data;
        if (how == HF_SQUEEZE) {
            assert_int_equal(t->ndim, 3);
            ndim = 1;
            shape[0] = t->numel;
        }
        if (wrongly_transposed && strcmp(name, wrongly_transposed) == 0)
            how = how == HF_TRANSPOSE ? HF_SAME : HF_TRANSPOSE;
        if (how == HF_TRANSPOSE) {
            assert_int_equal(t->ndim, 2);
            int64_t rows = t->shape[0], cols = t->shape[1];
            float *src = malloc((size_t)t->numel * sizeof(float));
            memcpy(src, t->data, t->nbytes);  /* the mapping may be unaligned */
            bufs[i] = malloc((size_t)t->numel * sizeof(float));
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = 0; c < cols; c++) bufs[i][c * rows + r] = src[r * cols + c];
            free(src);
            shape[0] = cols;
            shape[1] = rows;
            data = bufs[i];
        }
        if (rp_st_writer_add(&w, name, RP_DTYPE_F32, RP_DTYPE_F32, ndim, shape, data, &fx->err) !=
            RP_OK)
            fail_msg("%s", fx->err.msg);
        n_written++;
    }
    assert_int_equal(n_written, fx->src.n_tensors - 3);  /* blocks.0.att.v0/v1/v2 dropped */
    write_or_fail(&w, path);
    for (int i = 0; i < fx->src.n_tensors; i++) free(bufs[i]);
    free(bufs);
}

/* Layer 0's v0/v1/v2 are absent in HF files; they are never read by the
 * forward pass, so compare everything else bit for bit and zero those out. */
static void zero_layer0_value_lora(const fixture *fx, rp_model *m) {
    rp_layer_weights *w = &m->layers[0];
    const rp_config *c = &m->cfg;
    fx->be->fill_zero(fx->be, w->v0, (size_t)c->n_embd * sizeof(float));
    fx->be->fill_zero(fx->be, w->v1, (size_t)c->n_embd * c->d_value * sizeof(float));
    fx->be->fill_zero(fx->be, w->v2, (size_t)c->n_embd * c->d_value * sizeof(float));
}

static void test_hf_named_copy_loads_to_the_same_weights_and_logits(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "hf_names.safetensors");
    write_hf_copy(fx, path, NULL);
    rp_st_file hf;
    if (rp_st_open(&hf, path, &fx->err) != RP_OK) fail_msg("%s", fx->err.msg);
    rp_config cfg;
    rp_naming naming;
    if (rp_config_from_safetensors(&hf, &cfg, &naming, &fx->err) != RP_OK)
        fail_msg("%s", fx->err.msg);
    assert_int_equal(naming, RP_NAMING_HF);
    rp_st_close(&hf);

    load_or_fail(fx, &fx->model, fx->weights, 0, -1);
    load_or_fail(fx, &fx->other, path, 0, -1);
    /* Weights first: a difference then names the tensor. The logits are
     * compared before zeroing, so the unused tensors provably do not matter. */
    rp_model *official = &fx->model, *hf_model = &fx->other;
    float *v_lora_saved[3];
    rp_layer_weights *w0 = &official->layers[0];
    size_t v_floats[3] = {(size_t)official->cfg.n_embd,
                          (size_t)official->cfg.n_embd * official->cfg.d_value,
                          (size_t)official->cfg.n_embd * official->cfg.d_value};
    float *v_dev[3] = {w0->v0, w0->v1, w0->v2};
    for (int i = 0; i < 3; i++) v_lora_saved[i] = host_copy(fx, v_dev[i], v_floats[i]);
    zero_layer0_value_lora(fx, official);
    zero_layer0_value_lora(fx, hf_model);
    assert_same_weights(fx, official, hf_model);
    for (int i = 0; i < 3; i++) {
        fx->be->copy_to_device(fx->be, v_dev[i], v_lora_saved[i], v_floats[i] * sizeof(float));
        free(v_lora_saved[i]);
    }
    assert_same_logits(fx, official, hf_model);
}

/* HF keeps r_k as [H,N] (docs/rwkv7.md, HF names): the same numbers stored [N,H] are a
 * different matrix, not a reshape, and must not load. */
static void test_hf_r_k_stored_transposed_is_rejected(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "hf_r_k_transposed.safetensors");
    write_hf_copy(fx, path, "model.layers.1.attn.r_k");
    const char *mentions[] = {"model.layers.1.attn.r_k", "[64,2]", NULL};
    assert_load_fails(fx, path, RP_ERR_SHAPE, mentions);
}

static void test_official_file_without_layer0_value_lora_loads(void **s) {
    fixture *fx = *s;
    char path[1100];
    tmp_path(fx, path, sizeof path, "no_v_lora_0.safetensors");
    const char *skip[] = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2", NULL};
    write_copy_without(fx, path, skip);
    load_or_fail(fx, &fx->model, fx->weights, 0, -1);
    load_or_fail(fx, &fx->other, path, 0, -1);
    assert_memory_equal(&fx->model.cfg, &fx->other.cfg, sizeof fx->model.cfg);
    assert_same_logits(fx, &fx->model, &fx->other);
    zero_layer0_value_lora(fx, &fx->model);
    assert_same_weights(fx, &fx->model, &fx->other);
}

/* ---- layer ranges (pipeline stages) ---- */

/* [1, 2) of a 2-layer model: layer 1 only, no embedding; it ends at L, so it
 * owns the head (model.h: "embed/head owned when the range starts at 0 / ends
 * at L"). */
static void test_layer_range_loads_only_the_owned_layers(void **s) {
    fixture *fx = *s;
    load_or_fail(fx, &fx->model, fx->weights, 0, -1);
    load_or_fail(fx, &fx->other, fx->weights, 1, 2);
    const rp_model *full = &fx->model, *stage = &fx->other;
    assert_int_equal(stage->cfg.n_layer, 2);
    assert_int_equal(stage->layer_begin, 1);
    assert_int_equal(stage->layer_end, 2);
    assert_false(stage->has_embed);
    assert_null(stage->embed_flat);
    assert_null(stage->global.emb);
    assert_true(stage->has_head);
    assert_flat_identical(fx, &full->cfg, RP_PART_LAYER, 1, stage->layer_flat[0],
                          full->layer_flat[1], full->layer_floats);
    assert_flat_identical(fx, &full->cfg, RP_PART_HEAD, 0, stage->head_flat, full->head_flat,
                          full->head_floats);
}

/* [0, 1): the first stage owns layer 0 and the embedding, not the head. */
static void test_first_stage_owns_embedding_not_head(void **s) {
    fixture *fx = *s;
    load_or_fail(fx, &fx->model, fx->weights, 0, -1);
    load_or_fail(fx, &fx->other, fx->weights, 0, 1);
    const rp_model *full = &fx->model, *stage = &fx->other;
    assert_int_equal(stage->layer_begin, 0);
    assert_int_equal(stage->layer_end, 1);
    assert_true(stage->has_embed);
    assert_false(stage->has_head);
    assert_null(stage->head_flat);
    assert_null(stage->global.head);
    assert_flat_identical(fx, &full->cfg, RP_PART_LAYER, 0, stage->layer_flat[0],
                          full->layer_flat[0], full->layer_floats);
    assert_flat_identical(fx, &full->cfg, RP_PART_EMBED, 0, stage->embed_flat, full->embed_flat,
                          full->embed_floats);
}

static void test_layer_range_outside_the_model_is_rejected(void **s) {
    fixture *fx = *s;
    rp_status st = rp_model_load(&fx->model, fx->weights, 1, 3, fx->be, &fx->err);
    assert_int_equal(st, RP_ERR_ARG);
    assert_non_null(strstr(fx->err.msg, "[1, 3)"));
}

/* The state export is the flat per-slot layout read as [L,C] / [L,H,N,N]
 * tensors with the config's head size (32 here, so a hard-coded 64 fails),
 * and import is its exact inverse. */
static void test_state_export_and_import_use_the_config_head_size(void **s) {
    fixture *fx = *s;
    rp_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.n_layer = 2;
    cfg.n_embd = 64;
    cfg.n_head = 2;
    cfg.head_size = 32;
    rp_state st, back;
    assert_int_equal(rp_state_alloc_host(&st, &cfg, 0, 2, 2, &fx->err), RP_OK);
    assert_int_equal(rp_state_alloc_host(&back, &cfg, 0, 2, 2, &fx->err), RP_OK);
    assert_int_equal(st.floats_per_layer, 2 * 64 + 2 * 32 * 32);
    for (size_t i = 0; i < 2 * st.floats_per_slot; i++) st.data[i] = (float)i;
    rp_state_tensors t;
    assert_int_equal(rp_state_tensors_alloc(&t, &cfg, &fx->err), RP_OK);
    const int64_t lc[2] = {2, 64}, wkv[4] = {2, 2, 32, 32};
    assert_memory_equal(t.shape_lc, lc, sizeof lc);
    assert_memory_equal(t.shape_wkv, wkv, sizeof wkv);
    rp_state_export(&st, 1, &t);
    const float base = (float)st.floats_per_slot; /* slot 1 starts here */
    const float per_layer = (float)st.floats_per_layer;
    /* Layer 1: att_x_prev first, then wkv [H][N][N], then ffn_x_prev. */
    assert_true(t.att_x_prev[64 + 5] == base + per_layer + 5);
    assert_true(t.wkv[2 * 32 * 32 + 1 * 32 * 32 + 3 * 32 + 7] ==
                base + per_layer + 64 + 1 * 32 * 32 + 3 * 32 + 7);
    assert_true(t.ffn_x_prev[64 + 63] == base + 2 * per_layer - 1);
    rp_state_import(&back, 1, &t);
    assert_memory_equal(back.data + st.floats_per_slot, st.data + st.floats_per_slot,
                        st.floats_per_slot * sizeof(float));
    for (size_t i = 0; i < st.floats_per_slot; i++) assert_true(back.data[i] == 0.0f);
    /* Written and read back under the three names and shapes. */
    char path[1100];
    snprintf(path, sizeof path, "%s/state.safetensors", fx->dir);
    rp_st_writer w;
    rp_st_writer_init(&w);
    assert_int_equal(rp_state_tensors_add(&t, &w, &fx->err), RP_OK);
    assert_int_equal(rp_st_writer_write(&w, path, &fx->err), RP_OK);
    rp_st_writer_free(&w);
    rp_st_file f;
    assert_int_equal(rp_st_open(&f, path, &fx->err), RP_OK);
    const rp_st_tensor *tw = rp_st_find(&f, RP_STATE_WKV);
    assert_non_null(tw);
    assert_int_equal(tw->ndim, 4);
    assert_int_equal(tw->shape[2], 32);
    assert_non_null(rp_st_find(&f, RP_STATE_ATT_X_PREV));
    assert_non_null(rp_st_find(&f, RP_STATE_FFN_X_PREV));
    rp_st_close(&f);
    unlink(path);
    rp_state_tensors_free(&t);
    rp_state_free_host(&st);
    rp_state_free_host(&back);
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void) {
    const struct CMUnitTest tests[] = {
        T(test_missing_tensor_is_named),
        T(test_missing_layer0_value_projection_is_named),
        T(test_shape_mismatch_names_tensor_and_both_shapes),
        T(test_integer_dtype_weight_is_rejected),
        T(test_huge_embedding_without_head_fails_before_allocating),
        T(test_head_of_another_vocabulary_fails_before_allocating),
        T(test_dimension_of_2_to_32_plus_256_is_refused_not_truncated),
        T(test_wrong_shape_in_a_later_layer_fails_before_allocating),
        T(test_tensor_of_a_layer_beyond_the_count_is_rejected),
        T(test_layer_without_its_ln1_weight_is_rejected),
        T(test_last_layer_without_its_ln1_weight_is_rejected),
        T(test_truncated_file_is_rejected),
        T(test_header_length_beyond_the_file_is_rejected),
        T(test_bad_json_header_is_rejected),
        T(test_offsets_past_the_data_are_rejected),
        T(test_overlapping_offsets_are_rejected),
        T(test_file_without_embedding_is_not_a_model),
        T(test_nonexistent_path_is_an_io_error),
        T(test_f32_save_then_load_is_bit_identical),
        T(test_f32_saved_model_matches_reference_logits),
        T(test_bf16_save_then_load_equals_weights_rounded_to_bf16),
        T(test_hf_named_copy_loads_to_the_same_weights_and_logits),
        T(test_hf_r_k_stored_transposed_is_rejected),
        T(test_official_file_without_layer0_value_lora_loads),
        T(test_layer_range_loads_only_the_owned_layers),
        T(test_first_stage_owns_embedding_not_head),
        T(test_layer_range_outside_the_model_is_rejected),
        T(test_state_export_and_import_use_the_config_head_size),
    };
    return cmocka_run_group_tests_name("model_load", tests, NULL, NULL);
}
