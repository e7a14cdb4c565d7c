/* Checkpoints: SHA-256 against the FIPS 180-2 vectors; bit-exact save/load of
 * weights, Adam moments and progress; weights-only and per-stage loads from
 * sharded checkpoints; every kind of damage (flipped byte, truncation, missing
 * or garbage manifest, wrong config) reported with the file it concerns;
 * keep-last rotation and the `best` pointer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/sha256.h"
#include "cpu/cpu_backend.h"
#include "rwkvpipe.pb-c.h"
#include "train/checkpoint.h"

/* ---------------------------------------------------------------- helpers */

typedef struct {
    rp_backend *be;
    rp_config cfg;
    char root[256];     /* temporary directory, removed by teardown */
    char dir[300];      /* root/ckpt */
    rp_model w, m, v;   /* whole tiny model, filled */
    rp_train_progress progress; /* of step 100 */
    rp_optim_config optim;
    uint64_t batch, ctx;        /* samples per step, tokens per sample: progress's counters */
} fixture;

static uint64_t xorshift(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Arbitrary bit patterns, including NaN payloads, -0 and denormals: a
 * checkpoint must store bits, not values. */
static void fill_bits(float *p, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)xorshift(&seed);
        if (i % 97 == 0) bits = 0x7fc01234u;  /* quiet NaN with a payload */
        if (i % 89 == 0) bits = 0x80000000u;  /* -0 */
        if (i % 83 == 0) bits = 0x00000003u;  /* denormal */
        memcpy(&p[i], &bits, 4);
    }
}

static void fill_model_bits(rp_model *m, uint64_t seed) {
    for (int i = 0; i < m->layer_end - m->layer_begin; i++)
        fill_bits(m->layer_flat[i], m->layer_floats, seed + 7 * (uint64_t)i + 1);
    if (m->embed_flat) fill_bits(m->embed_flat, m->embed_floats, seed + 1001);
    if (m->head_flat) fill_bits(m->head_flat, m->head_floats, seed + 2002);
}

/* Compares the part of `want` that `got` owns, bit for bit. */
static void assert_model_bits_equal(const rp_model *got, const rp_model *want, const char *what) {
    for (int l = got->layer_begin; l < got->layer_end; l++)
        if (memcmp(got->layer_flat[l - got->layer_begin], want->layer_flat[l - want->layer_begin],
                   got->layer_floats * sizeof(float)) != 0)
            fail_msg("%s: layer %d differs", what, l);
    if (got->embed_flat && memcmp(got->embed_flat, want->embed_flat, got->embed_floats * 4) != 0)
        fail_msg("%s: embedding differs", what);
    if (got->head_flat && memcmp(got->head_flat, want->head_flat, got->head_floats * 4) != 0)
        fail_msg("%s: head differs", what);
}

static void expect_error(rp_status st, const rp_error *err, const char *a, const char *b) {
    if (st == RP_OK) fail_msg("expected an error containing '%s'", a);
    if (a && !strstr(err->msg, a)) fail_msg("error '%s' does not contain '%s'", err->msg, a);
    if (b && !strstr(err->msg, b)) fail_msg("error '%s' does not contain '%s'", err->msg, b);
}

static void check_ok(rp_status st, const rp_error *err) {
    if (st != RP_OK) fail_msg("unexpected error: %s", err->msg);
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    return remove(path);
}

static void alloc_like(fixture *f, rp_model *m, int begin, int end, int embed, int head) {
    rp_error err;
    check_ok(rp_model_alloc(m, &f->cfg, begin, end, embed, head, f->be, &err), &err);
}

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    rp_error err;
    const char *tmp = getenv("TMPDIR");
    snprintf(f->root, sizeof f->root, "%s/rp_ckpt_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(f->root)) return -1;
    snprintf(f->dir, sizeof f->dir, "%s/ckpt", f->root);
    f->be = rp_cpu_backend_create(1, &err);
    if (!f->be) return -1;
    if (rp_config_builtin(&f->cfg, "tiny", 0, &err) != RP_OK) return -1;
    alloc_like(f, &f->w, 0, f->cfg.n_layer, 1, 1);
    alloc_like(f, &f->m, 0, f->cfg.n_layer, 1, 1);
    alloc_like(f, &f->v, 0, f->cfg.n_layer, 1, 1);
    fill_model_bits(&f->w, 42);  /* arbitrary bits: faster than the official init, and harder */
    fill_model_bits(&f->m, 1234);
    fill_model_bits(&f->v, 5678);
    f->batch = 12;
    f->ctx = 1000003;
    f->progress = (rp_train_progress){.step = 100,
                                      .tokens_seen = 100 * f->batch * f->ctx,
                                      .seed = 0xffffffffffffffffull,
                                      .data_epoch = 3,
                                      .data_index = 17,
                                      .data_samples = 100 * f->batch,
                                      .data_n_windows = 999,
                                      .lr_step = 100};
    rp_optim_defaults(&f->optim);
    f->optim.total_steps = 1000;
    f->optim.lr_init = 6e-4f;
    f->optim.lr_final = 6e-5f;
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    rp_model_free(&f->w);
    rp_model_free(&f->m);
    rp_model_free(&f->v);
    rp_cpu_backend_destroy(f->be);
    nftw(f->root, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static rp_ckpt_contents contents_of(fixture *f, uint64_t step, int with_moments, int keep_last) {
    rp_ckpt_contents c = {0};
    c.weights = &f->w;
    c.adam_m = with_moments ? &f->m : NULL;
    c.adam_v = with_moments ? &f->v : NULL;
    c.progress = f->progress;
    c.progress.step = step;
    c.progress.lr_step = step;
    c.progress.data_samples = step * f->batch;
    c.progress.tokens_seen = step * f->batch * f->ctx;
    c.optim = &f->optim;
    c.keep_last = keep_last;
    return c;
}

static void save_step(fixture *f, uint64_t step, int with_moments, int keep_last) {
    rp_error err;
    rp_ckpt_contents c = contents_of(f, step, with_moments, keep_last);
    check_ok(rp_ckpt_save(f->dir, &c, &err), &err);
}

static void step_path(char *out, size_t size, const fixture *f, uint64_t step, const char *file) {
    char name[64];
    rp_ckpt_step_name(name, sizeof name, step);
    if (file) snprintf(out, size, "%s/%s/%s", f->dir, name, file);
    else snprintf(out, size, "%s/%s", f->dir, name);
}

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, n, fp), n);
    fclose(fp);
}

/* ---------------------------------------------------------------- sha256 */

static void test_sha256_matches_fips_180_2_vectors(void **state) {
    char hex[RP_SHA256_HEX_LEN + 1];
    rp_sha256_hex("", 0, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    rp_sha256_hex("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    rp_sha256_hex(two_blocks, strlen(two_blocks), hex);
    assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    /* One million 'a', fed in uneven pieces across block boundaries. */
    char *a = malloc(1000000);
    memset(a, 'a', 1000000);
    rp_sha256 s;
    uint8_t digest[RP_SHA256_DIGEST_BYTES];
    rp_sha256_init(&s);
    for (size_t done = 0, piece = 1; done < 1000000; piece = piece * 3 % 1000 + 1) {
        size_t n = 1000000 - done < piece ? 1000000 - done : piece;
        rp_sha256_update(&s, a + done, n);
        done += n;
    }
    rp_sha256_final(&s, digest);
    rp_sha256_digest_to_hex(digest, hex);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(a);
}

static void test_sha256_of_a_file_equals_sha256_of_its_bytes(void **state) {
    fixture *f = *state;
    char path[400], want[RP_SHA256_HEX_LEN + 1], got[RP_SHA256_HEX_LEN + 1];
    snprintf(path, sizeof path, "%s/blob", f->root);
    size_t n = 3 * (1 << 20) + 17;  /* crosses the reader's 1 MiB chunks */
    unsigned char *data = malloc(n);
    for (size_t i = 0; i < n; i++) data[i] = (unsigned char)(i * 131 + (i >> 9));
    write_bytes(path, data, n);
    rp_sha256_hex(data, n, want);
    uint64_t bytes = 0;
    rp_error err;
    check_ok(rp_sha256_file(path, got, &bytes, &err), &err);
    assert_string_equal(got, want);
    assert_int_equal(bytes, n);
    free(data);
}

/* ---------------------------------------------------------------- round trips */

static void test_save_then_load_restores_weights_moments_and_progress_bit_for_bit(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 100, 1, 0);
    char path[512];
    const char *files[] = {"manifest.pb", "weights.safetensors", "adam_m.safetensors",
                           "adam_v.safetensors"};
    for (size_t i = 0; i < 4; i++) {
        step_path(path, sizeof path, f, 100, files[i]);
        if (!exists(path)) fail_msg("%s was not written", path);
    }

    rp_model w, m, v;
    alloc_like(f, &w, 0, f->cfg.n_layer, 1, 1);
    alloc_like(f, &m, 0, f->cfg.n_layer, 1, 1);
    alloc_like(f, &v, 0, f->cfg.n_layer, 1, 1);
    rp_train_progress p;
    check_ok(rp_ckpt_load(f->dir, &w, &m, &v, &p, &err), &err);  /* via `latest` */
    assert_model_bits_equal(&w, &f->w, "weights");
    assert_model_bits_equal(&m, &f->m, "adam_m");
    assert_model_bits_equal(&v, &f->v, "adam_v");
    rp_train_progress want = f->progress;
    assert_memory_equal(&p, &want, sizeof p);

    rp_ckpt_info info;
    check_ok(rp_ckpt_read_info(f->dir, &info, &err), &err);
    step_path(path, sizeof path, f, 100, NULL);
    assert_string_equal(info.step_dir, path);
    assert_memory_equal(&info.cfg, &f->cfg, sizeof f->cfg);
    assert_int_equal(info.has_moments, 1);
    assert_int_equal(info.has_optim, 1);
    assert_memory_equal(&info.optim, &f->optim, sizeof f->optim);
    assert_memory_equal(&info.progress, &want, sizeof want);
    check_ok(rp_ckpt_verify(path, &err), &err);
    rp_model_free(&w);
    rp_model_free(&m);
    rp_model_free(&v);
}

static void test_weights_only_load_reads_no_optimizer_file(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 7, 1, 0);
    /* Damage the moments: a weights-only load never reads them. */
    char path[512];
    step_path(path, sizeof path, f, 7, "adam_m.safetensors");
    assert_int_equal(truncate(path, 100), 0);
    rp_model w;
    alloc_like(f, &w, 0, f->cfg.n_layer, 1, 1);
    rp_train_progress p;
    check_ok(rp_ckpt_load(f->dir, &w, NULL, NULL, &p, &err), &err);
    assert_model_bits_equal(&w, &f->w, "weights");
    assert_int_equal(p.step, 7);
    rp_model_free(&w);
}

static void test_weights_only_checkpoint_cannot_resume_training(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 5, 0, 0);
    rp_model w, m, v;
    alloc_like(f, &w, 0, f->cfg.n_layer, 1, 1);
    alloc_like(f, &m, 0, f->cfg.n_layer, 1, 1);
    alloc_like(f, &v, 0, f->cfg.n_layer, 1, 1);
    check_ok(rp_ckpt_load(f->dir, &w, NULL, NULL, NULL, &err), &err);
    expect_error(rp_ckpt_load(f->dir, &w, &m, &v, NULL, &err), &err, "no adam_m files", NULL);
    rp_model_free(&w);
    rp_model_free(&m);
    rp_model_free(&v);
}

/* Two pipeline stages each write the shards of their layers; the whole model
 * and a differently split stage load from them by tensor name. */
static void test_sharded_checkpoint_loads_into_any_layer_split(void **state) {
    fixture *f = *state;
    rp_error err;
    int L = f->cfg.n_layer;  /* 2 */
    rp_model stage_w[2], stage_m[2], stage_v[2];
    const int begin[2] = {0, 1}, end[2] = {1, L};
    for (int s = 0; s < 2; s++) {
        alloc_like(f, &stage_w[s], begin[s], end[s], s == 0, s == 1);
        alloc_like(f, &stage_m[s], begin[s], end[s], s == 0, s == 1);
        alloc_like(f, &stage_v[s], begin[s], end[s], s == 0, s == 1);
        const rp_model *src[3] = {&f->w, &f->m, &f->v};
        rp_model *dst[3] = {&stage_w[s], &stage_m[s], &stage_v[s]};
        for (int r = 0; r < 3; r++) {
            for (int l = begin[s]; l < end[s]; l++)
                memcpy(dst[r]->layer_flat[l - begin[s]], src[r]->layer_flat[l],
                       src[r]->layer_floats * 4);
            if (dst[r]->embed_flat)
                memcpy(dst[r]->embed_flat, src[r]->embed_flat, src[r]->embed_floats * 4);
            if (dst[r]->head_flat)
                memcpy(dst[r]->head_flat, src[r]->head_flat, src[r]->head_floats * 4);
        }
    }
    char step_dir[RP_CKPT_PATH_MAX];
    check_ok(rp_ckpt_begin(f->dir, 300, step_dir, sizeof step_dir, &err), &err);
    rp_ckpt_file files[2 * RP_CKPT_ROLES];
    int n_files = 0;
    for (int s = 0; s < 2; s++) {
        rp_ckpt_contents c = {0};
        c.weights = &stage_w[s];
        c.adam_m = &stage_m[s];
        c.adam_v = &stage_v[s];
        int n;
        check_ok(rp_ckpt_write_shard(step_dir, &c, s, 2, files + n_files, &n, &err), &err);
        assert_int_equal(n, 3);
        n_files += n;
    }
    assert_string_equal(files[0].name, "weights-00000-of-00002.safetensors");
    assert_string_equal(files[5].name, "adam_v-00001-of-00002.safetensors");

    /* Committing only stage 0's files leaves layer 1 uncovered. */
    rp_ckpt_contents c = contents_of(f, 300, 1, 0);
    expect_error(rp_ckpt_commit(f->dir, &c, files, 3, &err), &err, "layer 1", NULL);
    check_ok(rp_ckpt_commit(f->dir, &c, files, n_files, &err), &err);

    rp_model w, m, v;
    alloc_like(f, &w, 0, L, 1, 1);
    alloc_like(f, &m, 0, L, 1, 1);
    alloc_like(f, &v, 0, L, 1, 1);
    check_ok(rp_ckpt_load(f->dir, &w, &m, &v, NULL, &err), &err);
    assert_model_bits_equal(&w, &f->w, "weights");
    assert_model_bits_equal(&m, &f->m, "adam_m");
    assert_model_bits_equal(&v, &f->v, "adam_v");

    /* And the other way: a stage owning layer 1 + head from a one-file save. */
    save_step(f, 400, 1, 0);
    rp_model sw, sm;
    alloc_like(f, &sw, 1, L, 0, 1);
    alloc_like(f, &sm, 1, L, 0, 1);
    check_ok(rp_ckpt_load(f->dir, &sw, &sm, NULL, NULL, &err), &err);
    assert_model_bits_equal(&sw, &f->w, "stage weights");
    assert_model_bits_equal(&sm, &f->m, "stage adam_m");

    rp_model_free(&sw);
    rp_model_free(&sm);
    rp_model_free(&w);
    rp_model_free(&m);
    rp_model_free(&v);
    for (int s = 0; s < 2; s++) {
        rp_model_free(&stage_w[s]);
        rp_model_free(&stage_m[s]);
        rp_model_free(&stage_v[s]);
    }
}

/* ---------------------------------------------------------------- damage */

static void test_flipped_byte_is_reported_with_the_file_name(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 100, 1, 0);
    char path[512];
    step_path(path, sizeof path, f, 100, "adam_m.safetensors");
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    fseek(fp, 5000, SEEK_SET);
    int byte = fgetc(fp);
    fseek(fp, 5000, SEEK_SET);
    fputc(byte ^ 0x10, fp);
    fclose(fp);
    rp_model w, m, v;
    alloc_like(f, &w, 0, f->cfg.n_layer, 1, 1);
    alloc_like(f, &m, 0, f->cfg.n_layer, 1, 1);
    alloc_like(f, &v, 0, f->cfg.n_layer, 1, 1);
    rp_status st = rp_ckpt_load(f->dir, &w, &m, &v, NULL, &err);
    expect_error(st, &err, "step-00000100/adam_m.safetensors: sha256 mismatch",
                 "corrupted or truncated");
    expect_error(rp_ckpt_verify(f->dir, &err), &err, "adam_m.safetensors: sha256 mismatch", NULL);
    rp_model_free(&w);
    rp_model_free(&m);
    rp_model_free(&v);
}

static void test_truncated_file_is_reported_with_the_file_name(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 100, 1, 0);
    char path[512];
    step_path(path, sizeof path, f, 100, "weights.safetensors");
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(truncate(path, sb.st_size - 4), 0);
    rp_model w;
    alloc_like(f, &w, 0, f->cfg.n_layer, 1, 1);
    expect_error(rp_ckpt_load(f->dir, &w, NULL, NULL, NULL, &err), &err,
                 "weights.safetensors", "truncated");
    /* Deleted outright: named as missing. */
    assert_int_equal(unlink(path), 0);
    expect_error(rp_ckpt_load(f->dir, &w, NULL, NULL, NULL, &err), &err,
                 "weights.safetensors", "missing");
    rp_model_free(&w);
}

static void test_step_directory_without_manifest_is_incomplete(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 100, 0, 0);
    char step_dir[512], manifest[512];
    step_path(step_dir, sizeof step_dir, f, 100, NULL);
    step_path(manifest, sizeof manifest, f, 100, "manifest.pb");
    assert_int_equal(unlink(manifest), 0);
    rp_model w;
    alloc_like(f, &w, 0, f->cfg.n_layer, 1, 1);
    expect_error(rp_ckpt_load(step_dir, &w, NULL, NULL, NULL, &err), &err,
                 "incomplete checkpoint (no manifest.pb)", "interrupted while being written");
    /* Through `latest` too. */
    expect_error(rp_ckpt_load(f->dir, &w, NULL, NULL, NULL, &err), &err,
                 "step-00000100: incomplete checkpoint", NULL);
    rp_model_free(&w);
}

static void test_interrupted_save_leaves_the_previous_checkpoint_current(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 100, 0, 0);
    /* A save of step 200 that died after writing its weights: shard files,
     * no manifest, `latest` untouched. */
    char step_dir[RP_CKPT_PATH_MAX];
    check_ok(rp_ckpt_begin(f->dir, 200, step_dir, sizeof step_dir, &err), &err);
    rp_ckpt_contents c = contents_of(f, 200, 0, 0);
    rp_ckpt_file files[RP_CKPT_ROLES];
    int n;
    check_ok(rp_ckpt_write_shard(step_dir, &c, 0, 1, files, &n, &err), &err);
    rp_ckpt_info info;
    check_ok(rp_ckpt_read_info(f->dir, &info, &err), &err);
    assert_int_equal(info.progress.step, 100);
    /* The next complete save (keep all) removes the interrupted older one. */
    save_step(f, 300, 0, 0);
    assert_false(exists(step_dir));
    char path[512];
    step_path(path, sizeof path, f, 100, "manifest.pb");
    assert_true(exists(path));
}

static void test_garbage_manifest_is_rejected(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 100, 0, 0);
    char manifest[512];
    step_path(manifest, sizeof manifest, f, 100, "manifest.pb");
    rp_model w;
    alloc_like(f, &w, 0, f->cfg.n_layer, 1, 1);
    /* Not protobuf: a field tag with wire type 7 (invalid), then junk. */
    unsigned char junk[64];
    for (int i = 0; i < 64; i++) junk[i] = (unsigned char)(0xff - 3 * i);
    junk[0] = 0x0f;
    write_bytes(manifest, junk, sizeof junk);
    expect_error(rp_ckpt_load(f->dir, &w, NULL, NULL, NULL, &err), &err, "manifest.pb",
                 "protobuf");
    /* Valid protobuf, but not a manifest (empty message: no format version). */
    write_bytes(manifest, "", 0);
    expect_error(rp_ckpt_load(f->dir, &w, NULL, NULL, NULL, &err), &err, "manifest.pb",
                 "format_version");
    rp_model_free(&w);
}

static void test_config_mismatch_is_rejected(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 100, 0, 0);
    rp_config other;
    check_ok(rp_config_builtin(&other, "tiny", 512, &err), &err);
    rp_model w;
    check_ok(rp_model_alloc(&w, &other, 0, other.n_layer, 1, 1, f->be, &err), &err);
    expect_error(rp_ckpt_load(f->dir, &w, NULL, NULL, NULL, &err), &err,
                 "model config", "V256");
    rp_model_free(&w);
}

/* ---------------------------------------------------------------- rotation */

static void test_keep_last_keeps_the_newest_k(void **state) {
    fixture *f = *state;
    for (uint64_t step = 10; step <= 50; step += 10) save_step(f, step, 0, 2);
    char path[512];
    for (uint64_t step = 10; step <= 50; step += 10) {
        step_path(path, sizeof path, f, step, NULL);
        int want = step >= 40;
        if (exists(path) != want)
            fail_msg("step %llu: %s, expected %s", (unsigned long long)step,
                     exists(path) ? "kept" : "deleted", want ? "kept" : "deleted");
    }
    rp_ckpt_info info;
    rp_error err;
    check_ok(rp_ckpt_read_info(f->dir, &info, &err), &err);
    assert_int_equal(info.progress.step, 50);
}

static void test_best_is_never_deleted(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 10, 0, 1);
    char best[512];
    step_path(best, sizeof best, f, 10, NULL);
    check_ok(rp_ckpt_mark_best(f->dir, best, &err), &err);
    for (uint64_t step = 20; step <= 40; step += 10) save_step(f, step, 0, 1);
    char path[512];
    step_path(path, sizeof path, f, 20, NULL);
    assert_false(exists(path));
    step_path(path, sizeof path, f, 30, NULL);
    assert_false(exists(path));
    step_path(path, sizeof path, f, 40, NULL);
    assert_true(exists(path));
    assert_true(exists(best));
    rp_model w;
    alloc_like(f, &w, 0, f->cfg.n_layer, 1, 1);
    rp_train_progress p;
    check_ok(rp_ckpt_load(best, &w, NULL, NULL, &p, &err), &err);
    assert_int_equal(p.step, 10);
    /* Only complete step directories can be best. */
    expect_error(rp_ckpt_mark_best(f->dir, "step-00000020", &err), &err, "not a complete", NULL);
    expect_error(rp_ckpt_mark_best(f->dir, "weights", &err), &err, "not a step directory", NULL);
    rp_model_free(&w);
}

static void test_saving_a_step_again_replaces_it(void **state) {
    fixture *f = *state;
    rp_error err;
    save_step(f, 100, 1, 0);
    f->ctx = 77;
    save_step(f, 100, 0, 0);  /* weights only now: the old moments must go */
    char path[512];
    step_path(path, sizeof path, f, 100, "adam_m.safetensors");
    assert_false(exists(path));
    rp_ckpt_info info;
    check_ok(rp_ckpt_read_info(f->dir, &info, &err), &err);
    assert_int_equal(info.progress.tokens_seen, 100 * 12 * 77);
    assert_int_equal(info.has_moments, 0);
}

/* Decodes step 100's manifest, lets edit change it, encodes it back (with
 * the project's own protobuf-c types: a valid manifest, only the values
 * are wrong). */
static void edit_manifest(fixture *f, void (*edit)(Rwkvpipe__CheckpointManifest *)) {
    char path[512];
    step_path(path, sizeof path, f, 100, "manifest.pb");
    FILE *in = fopen(path, "rb");
    assert_non_null(in);
    static uint8_t buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, in);
    fclose(in);
    Rwkvpipe__CheckpointManifest *man = rwkvpipe__checkpoint_manifest__unpack(NULL, n, buf);
    assert_non_null(man);
    edit(man);
    size_t packed = rwkvpipe__checkpoint_manifest__pack(man, buf);
    rwkvpipe__checkpoint_manifest__free_unpacked(man, NULL);
    write_bytes(path, buf, packed);
}

static void set_step_max(Rwkvpipe__CheckpointManifest *m) { m->step = UINT64_MAX; }
static void set_lr_step_max(Rwkvpipe__CheckpointManifest *m) { m->lr_schedule_step = UINT64_MAX; }
static void set_tokens_max(Rwkvpipe__CheckpointManifest *m) { m->tokens_seen = UINT64_MAX; }
static void set_tokens_zero(Rwkvpipe__CheckpointManifest *m) { m->tokens_seen = 0; }
static void set_samples_below_step(Rwkvpipe__CheckpointManifest *m) { m->data->samples = 99; }
static void set_index_past_windows(Rwkvpipe__CheckpointManifest *m) { m->data->index = 1000; }

/* Every loader (resume, info, weights-only) reads the manifest through the
 * same check; the message names the manifest and the value. */
static void expect_refused(fixture *f, void (*edit)(Rwkvpipe__CheckpointManifest *),
                           const char *a, const char *b) {
    rp_error err;
    save_step(f, 100, 1, 0);
    edit_manifest(f, edit);
    rp_ckpt_info info;
    expect_error(rp_ckpt_read_info(f->dir, &info, &err), &err, a, b);
    assert_non_null(strstr(err.msg, "step-00000100/manifest.pb"));
    rp_model w;
    alloc_like(f, &w, 0, f->cfg.n_layer, 1, 1);
    expect_error(rp_ckpt_load(f->dir, &w, NULL, NULL, NULL, &err), &err, a, b);
    rp_model_free(&w);
}

static void test_manifest_step_2_to_64_minus_1_is_refused(void **state) {
    expect_refused(*state, set_step_max, "step 18446744073709551615 is out of range [0, 2^40",
                   "corrupt or was edited");
}

static void test_manifest_counters_out_of_range_or_inconsistent_are_refused(void **state) {
    fixture *f = *state;
    expect_refused(f, set_lr_step_max, "LR schedule step 18446744073709551615 is out of range",
                   NULL);
    expect_refused(f, set_tokens_max, "18446744073709551615 tokens seen in 1200 samples", NULL);
    expect_refused(f, set_tokens_zero, "step 100 with 1200 samples and 0 tokens seen", NULL);
    expect_refused(f, set_samples_below_step, "99 samples drawn in 100 steps", NULL);
    expect_refused(f, set_index_past_windows, "data position index 1000", "999 windows");
}

/* ---------------------------------------------------------------- describe */

static void test_describe_prints_the_manifest(void **state) {
    fixture *f = *state;
    rp_error err;
    rp_ckpt_contents c = contents_of(f, 123, 1, 0);
    const char *keys[] = {"run"}, *values[] = {"unit-test"};
    c.extra_keys = keys;
    c.extra_values = values;
    c.n_extra = 1;
    check_ok(rp_ckpt_save(f->dir, &c, &err), &err);
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    check_ok(rp_ckpt_describe(f->dir, out, &err), &err);
    fclose(out);
    const char *want[] = {"step-00000123", "step         123", "L2 C128", "weights.safetensors",
                          "adam_v.safetensors", "epoch 3, index 17", "cosine", "run = unit-test",
                          "ok\n"};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (!strstr(text, want[i])) fail_msg("'%s' missing from:\n%s", want[i], text);
    free(text);
    expect_error(rp_ckpt_describe(f->root, stdout, &err), &err, "not a checkpoint", NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_matches_fips_180_2_vectors),
        cmocka_unit_test_setup_teardown(test_sha256_of_a_file_equals_sha256_of_its_bytes, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(
            test_save_then_load_restores_weights_moments_and_progress_bit_for_bit, setup,
            teardown),
        cmocka_unit_test_setup_teardown(test_weights_only_load_reads_no_optimizer_file, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_weights_only_checkpoint_cannot_resume_training,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_sharded_checkpoint_loads_into_any_layer_split, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_flipped_byte_is_reported_with_the_file_name, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_truncated_file_is_reported_with_the_file_name, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_step_directory_without_manifest_is_incomplete, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(
            test_interrupted_save_leaves_the_previous_checkpoint_current, setup, teardown),
        cmocka_unit_test_setup_teardown(test_garbage_manifest_is_rejected, setup, teardown),
        cmocka_unit_test_setup_teardown(test_manifest_step_2_to_64_minus_1_is_refused, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(
            test_manifest_counters_out_of_range_or_inconsistent_are_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_config_mismatch_is_rejected, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keep_last_keeps_the_newest_k, setup, teardown),
        cmocka_unit_test_setup_teardown(test_best_is_never_deleted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_saving_a_step_again_replaces_it, setup, teardown),
        cmocka_unit_test_setup_teardown(test_describe_prints_the_manifest, setup, teardown),
    };
    return cmocka_run_group_tests_name("checkpoint", tests, NULL, NULL);
}
