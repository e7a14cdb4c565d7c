/* Specification of src/core/rng.c and src/model/init.c: Philox4x32-10 matches
 * the Random123 known answers, uniforms and normals have the right moments,
 * the official x070 init (docs/rwkv7.md, Initialisation) is deterministic, independent of which
 * rank initialises which part, orthogonal where it should be, and follows the
 * per-channel formulas. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "model/config.h"
#include "model/init.h"
#include "model/params.h"

/* ---- helpers ------------------------------------------------------------- */

static rp_config builtin(const char *name) {
    rp_config cfg;
    rp_error err = {0};
    assert_int_equal(rp_config_builtin(&cfg, name, 0, &err), RP_OK);
    return cfg;
}

static const rp_tensor_info *find_tensor(const rp_tensor_info *table, int count, const char *suffix) {
    for (int i = 0; i < count; i++)
        if (strcmp(table[i].suffix, suffix) == 0) return &table[i];
    fail_msg("no tensor %s in the table", suffix);
    return NULL;
}

/* One layer initialised into a fresh buffer; the caller frees it. */
static float *init_one_layer(const rp_config *cfg, int layer, uint64_t seed,
                             rp_tensor_info table[RP_LAYER_N_TENSORS], size_t *floats) {
    size_t n = rp_layer_layout(cfg, table);
    float *flat = malloc(n * sizeof(float));
    assert_non_null(flat);
    memset(flat, 0xff, n * sizeof(float)); /* NaN garbage: init must overwrite all */
    rp_error err = {0};
    assert_int_equal(rp_init_layer(flat, cfg, layer, seed, &err), RP_OK);
    if (floats) *floats = n;
    return flat;
}

/* W W^T = gain^2 I if rows <= cols, W^T W = gain^2 I otherwise, in double. */
static void assert_orthogonal(const float *w, int64_t rows, int64_t cols, double gain, const char *what) {
    const int by_rows = rows <= cols;
    const int64_t k = by_rows ? rows : cols, len = by_rows ? cols : rows;
    const double tolerance = 1e-5 * (gain * gain > 1.0 ? gain * gain : 1.0);
    double worst = 0.0;
    for (int64_t p = 0; p < k; p++) {
        for (int64_t q = p; q < k; q++) {
            double dot = 0.0;
            for (int64_t i = 0; i < len; i++) {
                double x = by_rows ? w[p * cols + i] : w[i * cols + p];
                double y = by_rows ? w[q * cols + i] : w[i * cols + q];
                dot += x * y;
            }
            double expected = p == q ? gain * gain : 0.0;
            if (fabs(dot - expected) > worst) worst = fabs(dot - expected);
        }
    }
    if (worst > tolerance)
        fail_msg("%s [%lld,%lld] gain %g: Gram matrix off by %g (tolerance %g)", what,
                 (long long)rows, (long long)cols, gain, worst, tolerance);
}

/* |got - expected| within tolerance, relative above magnitude 1 (float storage). */
static void assert_close(double got, double expected, double tolerance) {
    double scale = fabs(expected) > 1.0 ? fabs(expected) : 1.0;
    if (!(fabs(got - expected) <= tolerance * scale))
        fail_msg("got %.9g, expected %.9g (tolerance %g)", got, expected, tolerance * scale);
}

/* ---- RNG ----------------------------------------------------------------- */

static void test_philox_matches_random123_known_answers(void **state) {
    (void)state;
    /* Random123 kat_vectors, philox4x32 10 rounds; our words are
     * ctr = {lo, lo >> 32, hi, hi >> 32}, key = {key, key >> 32}. */
    static const struct {
        uint64_t counter_hi, counter_lo, key;
        uint32_t expected[4];
    } kat[] = {
        {0, 0, 0, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
        {UINT64_MAX, UINT64_MAX, UINT64_MAX, {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
        {0x0370734413198a2eull, 0x85a308d3243f6a88ull, 0x299f31d0a4093822ull,
         {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    };
    for (size_t i = 0; i < sizeof kat / sizeof kat[0]; i++) {
        uint32_t out[4];
        rp_philox4x32(kat[i].key, kat[i].counter_hi, kat[i].counter_lo, out);
        for (int w = 0; w < 4; w++) assert_int_equal(out[w], kat[i].expected[w]);
    }
}

static void test_uniform_in_unit_interval_with_mean_half_variance_one_twelfth(void **state) {
    (void)state;
    const int n = 100000;
    const uint64_t key = rp_rng_key(1, "uniform test");
    double sum = 0, sum_sq = 0, sum64 = 0, sum64_sq = 0;
    for (int i = 0; i < n; i++) {
        float u = rp_rng_uniform(key, (uint64_t)i);
        double d = rp_rng_uniform_f64(key, (uint64_t)i);
        assert_true(u >= 0.0f && u < 1.0f);
        assert_true(d >= 0.0 && d < 1.0);
        sum += u;
        sum_sq += (double)u * u;
        sum64 += d;
        sum64_sq += d * d;
    }
    /* Standard error of the mean is 0.29/sqrt(1e5) ~ 1e-3; allow 5 sigma. */
    double mean = sum / n, var = sum_sq / n - mean * mean;
    double mean64 = sum64 / n, var64 = sum64_sq / n - mean64 * mean64;
    assert_true(fabs(mean - 0.5) < 5e-3);
    assert_true(fabs(var - 1.0 / 12.0) < 2e-3);
    assert_true(fabs(mean64 - 0.5) < 5e-3);
    assert_true(fabs(var64 - 1.0 / 12.0) < 2e-3);
    /* A value is a pure function of (key, index). */
    assert_true(rp_rng_uniform(key, 12345) == rp_rng_uniform(key, 12345));
    assert_true(rp_rng_uniform_f64(key, 7) != rp_rng_uniform_f64(key, 8));
}

static void test_normal_has_mean_zero_variance_one(void **state) {
    (void)state;
    const int n = 100000;
    const uint64_t key = rp_rng_key(2, "normal test");
    double sum = 0, sum_sq = 0, sum_4 = 0;
    for (int i = 0; i < n; i++) {
        double x = rp_rng_normal(key, (uint64_t)i);
        assert_true(isfinite(x));
        sum += x;
        sum_sq += x * x;
        sum_4 += x * x * x * x;
    }
    double mean = sum / n, var = sum_sq / n - mean * mean;
    assert_true(fabs(mean) < 0.02);       /* ~6 standard errors */
    assert_true(fabs(var - 1.0) < 0.03);  /* ~7 standard errors */
    assert_true(fabs(sum_4 / n - 3.0) < 0.15); /* Gaussian kurtosis */
}

static void test_stream_key_depends_on_seed_and_name(void **state) {
    (void)state;
    uint64_t k = rp_rng_key(42, "blocks.0.att.key.weight");
    assert_true(k == rp_rng_key(42, "blocks.0.att.key.weight"));
    assert_true(k != rp_rng_key(43, "blocks.0.att.key.weight"));
    assert_true(k != rp_rng_key(42, "blocks.1.att.key.weight"));
    assert_true(rp_rng_key(0, "") != rp_rng_key(1, ""));
}

/* ---- determinism and partition independence ------------------------------ */

static void test_same_seed_gives_identical_bytes_other_seed_differs(void **state) {
    (void)state;
    rp_config cfg = builtin("tiny");
    rp_tensor_info table[RP_LAYER_N_TENSORS];
    size_t floats;
    for (int layer = 0; layer < cfg.n_layer; layer++) {
        float *a = init_one_layer(&cfg, layer, 1234, table, &floats);
        float *b = init_one_layer(&cfg, layer, 1234, table, NULL);
        float *c = init_one_layer(&cfg, layer, 1235, table, NULL);
        assert_memory_equal(a, b, floats * sizeof(float));
        const rp_tensor_info *r = find_tensor(table, RP_LAYER_N_TENSORS, "att.receptance.weight");
        assert_memory_not_equal(a + r->flat_offset, c + r->flat_offset, r->numel * sizeof(float));
        free(a);
        free(b);
        free(c);
    }
    size_t embed_floats, head_floats;
    rp_tensor_info gtable[RP_GLOBAL_N_TENSORS];
    rp_global_layout(&cfg, gtable, &embed_floats, &head_floats);
    float *embed[3], *head[3];
    const uint64_t seeds[3] = {1234, 1234, 1235};
    for (int i = 0; i < 3; i++) {
        embed[i] = malloc(embed_floats * sizeof(float));
        head[i] = malloc(head_floats * sizeof(float));
        rp_error err = {0};
        assert_int_equal(rp_init_global(embed[i], head[i], &cfg, seeds[i], &err), RP_OK);
    }
    assert_memory_equal(embed[0], embed[1], embed_floats * sizeof(float));
    assert_memory_equal(head[0], head[1], head_floats * sizeof(float));
    assert_memory_not_equal(embed[0], embed[2], embed_floats * sizeof(float));
    assert_memory_not_equal(head[0], head[2], head_floats * sizeof(float));
    for (int i = 0; i < 3; i++) {
        free(embed[i]);
        free(head[i]);
    }
}

static void test_layer_init_alone_equals_same_layer_of_full_init(void **state) {
    (void)state;
    rp_config cfg = builtin("small"); /* 4 layers */
    rp_tensor_info table[RP_LAYER_N_TENSORS];
    size_t floats = rp_layer_layout(&cfg, table);
    float *full = malloc((size_t)cfg.n_layer * floats * sizeof(float));
    assert_non_null(full);
    rp_error err = {0};
    for (int layer = 0; layer < cfg.n_layer; layer++)
        assert_int_equal(rp_init_layer(full + (size_t)layer * floats, &cfg, layer, 99, &err), RP_OK);
    float *alone = init_one_layer(&cfg, 3, 99, table, NULL);
    assert_memory_equal(alone, full + 3 * floats, floats * sizeof(float));
    /* Each layer has its own streams: layer 2's matrices are not layer 3's. */
    const rp_tensor_info *k = find_tensor(table, RP_LAYER_N_TENSORS, "ffn.key.weight");
    assert_memory_not_equal(full + 2 * floats + k->flat_offset, full + 3 * floats + k->flat_offset,
                            k->numel * sizeof(float));
    free(alone);
    free(full);
}

static void test_global_init_of_one_part_equals_that_part_of_full_init(void **state) {
    (void)state;
    rp_config cfg = builtin("tiny");
    rp_tensor_info gtable[RP_GLOBAL_N_TENSORS];
    size_t embed_floats, head_floats;
    rp_global_layout(&cfg, gtable, &embed_floats, &head_floats);
    float *embed_full = malloc(embed_floats * sizeof(float));
    float *head_full = malloc(head_floats * sizeof(float));
    float *embed_only = malloc(embed_floats * sizeof(float));
    float *head_only = malloc(head_floats * sizeof(float));
    memset(embed_only, 0xff, embed_floats * sizeof(float));
    memset(head_only, 0xff, head_floats * sizeof(float));
    rp_error err = {0};
    assert_int_equal(rp_init_global(embed_full, head_full, &cfg, 7, &err), RP_OK);
    assert_int_equal(rp_init_global(NULL, head_only, &cfg, 7, &err), RP_OK);   /* last stage */
    assert_int_equal(rp_init_global(embed_only, NULL, &cfg, 7, &err), RP_OK);  /* first stage */
    assert_memory_equal(head_only, head_full, head_floats * sizeof(float));
    assert_memory_equal(embed_only, embed_full, embed_floats * sizeof(float));
    assert_int_equal(rp_init_global(NULL, NULL, &cfg, 7, &err), RP_OK); /* middle stage */
    free(embed_full);
    free(head_full);
    free(embed_only);
    free(head_only);
}

/* ---- orthogonal matrices --------------------------------------------------- */

static void test_orthogonal_tensors_have_orthonormal_rows_or_columns_times_gain(void **state) {
    (void)state;
    rp_config cfg = builtin("tiny"); /* C 128, F 512, V 256 */
    rp_tensor_info table[RP_LAYER_N_TENSORS];
    float *flat = init_one_layer(&cfg, 1, 5, table, NULL);
    static const struct { const char *suffix; double gain; } cases[] = {
        {"att.receptance.weight", 1.0}, {"att.value.weight", 1.0}, {"att.key.weight", 0.1},
        {"ffn.key.weight", 1.0},        {"att.w2", 0.1},           {"att.a2", 0.1},
        {"att.v2", 0.1},                {"att.g2", 0.1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const rp_tensor_info *t = find_tensor(table, RP_LAYER_N_TENSORS, cases[i].suffix);
        assert_orthogonal(flat + t->flat_offset, t->shape[0], t->shape[1], cases[i].gain, t->suffix);
    }
    free(flat);

    rp_tensor_info gtable[RP_GLOBAL_N_TENSORS];
    size_t head_floats;
    rp_global_layout(&cfg, gtable, NULL, &head_floats);
    float *head = malloc(head_floats * sizeof(float));
    rp_error err = {0};
    assert_int_equal(rp_init_global(NULL, head, &cfg, 5, &err), RP_OK);
    const rp_tensor_info *h = find_tensor(gtable, RP_GLOBAL_N_TENSORS, "head.weight");
    assert_true(h->shape[0] > h->shape[1]); /* V > C: columns orthogonal */
    assert_orthogonal(head + h->flat_offset, h->shape[0], h->shape[1],
                      0.5 * sqrt((double)cfg.vocab_size / cfg.n_embd), "head.weight");
    free(head);
}

static void test_lora2_with_fewer_rows_than_columns_has_rows_of_norm_one_tenth(void **state) {
    (void)state;
    rp_config cfg = builtin("tiny");
    rp_tensor_info table[RP_LAYER_N_TENSORS];
    float *flat = init_one_layer(&cfg, 0, 11, table, NULL);
    const rp_tensor_info *w2 = find_tensor(table, RP_LAYER_N_TENSORS, "att.w2");
    assert_true(w2->shape[0] < w2->shape[1]);
    for (int64_t r = 0; r < w2->shape[0]; r++) {
        double norm_sq = 0;
        for (int64_t c = 0; c < w2->shape[1]; c++) {
            double x = flat[w2->flat_offset + r * w2->shape[1] + c];
            norm_sq += x * x;
        }
        assert_true(fabs(sqrt(norm_sq) - 0.1) < 1e-6);
    }
    free(flat);
}

static void test_orthogonal_works_for_tiny_and_odd_shapes(void **state) {
    (void)state;
    static const int64_t shapes[][2] = {{1, 1}, {1, 5}, {5, 1}, {3, 7}, {7, 3}, {2, 2}, {33, 64}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int64_t rows = shapes[i][0], cols = shapes[i][1];
        float *w = malloc((size_t)(rows * cols) * sizeof(float));
        rp_error err = {0};
        assert_int_equal(rp_init_orthogonal(w, rows, cols, 0.5, rp_rng_key(3, "odd"), "odd", &err), RP_OK);
        assert_orthogonal(w, rows, cols, 0.5, "odd shape");
        free(w);
    }
    float w;
    rp_error err = {0};
    assert_int_equal(rp_init_orthogonal(&w, 0, 3, 1.0, 1, "empty", &err), RP_ERR_SHAPE);
    assert_non_null(strstr(err.msg, "empty"));
}

/* ---- formulas of docs/rwkv7.md (Initialisation) ------------------------- */

static float value_at(const float *flat, const rp_tensor_info *table, const char *suffix, int n) {
    return flat[find_tensor(table, RP_LAYER_N_TENSORS, suffix)->flat_offset + (size_t)n];
}

static void test_channel_formulas_match_spec_at_sample_points(void **state) {
    (void)state;
    rp_config cfg = builtin("small"); /* L 4, C 256 */
    const int L = cfg.n_layer, C = cfg.n_embd;
    const double tol = 1e-6;
    rp_tensor_info table[RP_LAYER_N_TENSORS];

    /* Values worked out by hand for layer 0 (r0 = 0, r1 = 1). */
    float *l0 = init_one_layer(&cfg, 0, 1, table, NULL);
    assert_close(value_at(l0, table, "att.x_r", 0), 1.0, tol);       /* 1 - 0^0.2 */
    assert_close(value_at(l0, table, "att.w0", 0), -8.0, tol);       /* -6 + 0.5 - 2.5 */
    assert_close(value_at(l0, table, "att.w0", C - 1), 3.0, tol);    /* 0 + 0.5 + 2.5 */
    assert_close(value_at(l0, table, "att.a0", 0), -0.69, tol);      /* -0.19 - 0.3 - 0.2 */
    assert_close(value_at(l0, table, "att.v0", 0), 0.93, tol);       /* 0.73 + 0.2 */
    assert_close(value_at(l0, table, "att.k_k", C - 1), 0.66, tol);  /* 0.71 - 0.05 */
    assert_close(value_at(l0, table, "ffn.x_k", C / 2), 0.5, tol);   /* 1 - (1/2)^1 */
    assert_close(value_at(l0, table, "att.ln_x.weight", 0), pow(0.25, 0.7), tol);
    free(l0);

    /* The general formulas at a few (layer, channel) points. */
    static const int points[][2] = {{1, 37}, {2, 100}, {3, 255}, {2, 1}};
    for (size_t i = 0; i < sizeof points / sizeof points[0]; i++) {
        const int l = points[i][0], n = points[i][1];
        float *flat = init_one_layer(&cfg, l, 1, table, NULL);
        const double r0 = (double)l / (L - 1), r1 = 1.0 - (double)l / L, p = (double)n / C;
        const double lin = (double)n / (C - 1) - 0.5;
        const double z = ((n % 64) - 31.5) / 31.5, zig = z * fabs(z);
        const double www = -6.0 + 6.0 * pow((double)n / (C - 1), 1.0 + pow(r0, 0.3));
        assert_close(value_at(flat, table, "att.x_r", n), 1.0 - pow(p, 0.2 * r1), tol);
        assert_close(value_at(flat, table, "att.x_w", n), 1.0 - pow(p, 0.9 * r1), tol);
        assert_close(value_at(flat, table, "att.x_k", n), 1.0 - pow(p, 0.7 * r1), tol);
        assert_close(value_at(flat, table, "att.x_v", n), 1.0 - pow(p, 0.7 * r1), tol);
        assert_close(value_at(flat, table, "att.x_a", n), 1.0 - pow(p, 0.9 * r1), tol);
        assert_close(value_at(flat, table, "att.x_g", n), 1.0 - pow(p, 0.2 * r1), tol);
        assert_close(value_at(flat, table, "att.w0", n), www + 0.5 + 2.5 * zig, tol);
        assert_close(value_at(flat, table, "att.a0", n), -0.19 + 0.3 * zig + 0.4 * lin, tol);
        assert_close(value_at(flat, table, "att.v0", n), 0.73 - 0.4 * lin, tol);
        assert_close(value_at(flat, table, "att.k_k", n), 0.71 - 0.1 * lin, tol);
        assert_close(value_at(flat, table, "ffn.x_k", n), 1.0 - pow(p, pow(r1, 4)), tol);
        assert_close(value_at(flat, table, "att.ln_x.weight", n), pow((l + 1.0) / L, 0.7), tol);
        free(flat);
    }
}

static void test_constant_tensors_hold_their_constants(void **state) {
    (void)state;
    rp_config cfg = builtin("tiny");
    rp_tensor_info table[RP_LAYER_N_TENSORS];
    const int last = cfg.n_layer - 1;
    float *flat = init_one_layer(&cfg, last, 3, table, NULL);
    static const struct { const char *suffix; float value; } cases[] = {
        {"att.r_k", -0.04f},          {"att.k_a", 1.02f},          {"att.output.weight", 0.0f},
        {"ffn.value.weight", 0.0f},   {"att.w1", 0.0f},            {"att.a1", 0.0f},
        {"att.v1", 0.0f},             {"att.g1", 0.0f},            {"ln1.weight", 1.0f},
        {"ln1.bias", 0.0f},           {"ln2.weight", 1.0f},        {"ln2.bias", 0.0f},
        {"att.ln_x.weight", 1.0f},    {"att.ln_x.bias", 0.0f}, /* (L/L)^0.7 at the last layer */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const rp_tensor_info *t = find_tensor(table, RP_LAYER_N_TENSORS, cases[i].suffix);
        for (int64_t j = 0; j < t->numel; j++)
            if (flat[t->flat_offset + j] != cases[i].value)
                fail_msg("%s[%lld] = %g, expected %g", t->suffix, (long long)j,
                         flat[t->flat_offset + j], cases[i].value);
    }
    free(flat);

    rp_tensor_info gtable[RP_GLOBAL_N_TENSORS];
    size_t embed_floats, head_floats;
    rp_global_layout(&cfg, gtable, &embed_floats, &head_floats);
    float *embed = malloc(embed_floats * sizeof(float)), *head = malloc(head_floats * sizeof(float));
    rp_error err = {0};
    assert_int_equal(rp_init_global(embed, head, &cfg, 3, &err), RP_OK);
    for (int n = 0; n < cfg.n_embd; n++) {
        assert_true(embed[find_tensor(gtable, RP_GLOBAL_N_TENSORS, "blocks.0.ln0.weight")->flat_offset + n] == 1.0f);
        assert_true(embed[find_tensor(gtable, RP_GLOBAL_N_TENSORS, "blocks.0.ln0.bias")->flat_offset + n] == 0.0f);
        assert_true(head[find_tensor(gtable, RP_GLOBAL_N_TENSORS, "ln_out.weight")->flat_offset + n] == 1.0f);
        assert_true(head[find_tensor(gtable, RP_GLOBAL_N_TENSORS, "ln_out.bias")->flat_offset + n] == 0.0f);
    }
    free(embed);
    free(head);
}

static void test_embedding_is_small_uniform_noise(void **state) {
    (void)state;
    rp_config cfg = builtin("tiny");
    rp_tensor_info gtable[RP_GLOBAL_N_TENSORS];
    size_t embed_floats;
    rp_global_layout(&cfg, gtable, &embed_floats, NULL);
    float *embed = malloc(embed_floats * sizeof(float));
    rp_error err = {0};
    assert_int_equal(rp_init_global(embed, NULL, &cfg, 8, &err), RP_OK);
    const rp_tensor_info *e = find_tensor(gtable, RP_GLOBAL_N_TENSORS, "emb.weight");
    const float *x = embed + e->flat_offset;
    double lo = 1, hi = -1, sum = 0;
    for (int64_t i = 0; i < e->numel; i++) {
        assert_true(x[i] >= -1e-4f && x[i] <= 1e-4f);
        lo = fmin(lo, x[i]);
        hi = fmax(hi, x[i]);
        sum += x[i];
    }
    assert_true(hi - lo > 1.9e-4); /* spread over the whole interval, not constant */
    assert_true(fabs(sum / (double)e->numel) < 2e-6);
    free(embed);
}

/* ---- errors --------------------------------------------------------------- */

static void test_bad_layer_index_is_rejected_with_its_value(void **state) {
    (void)state;
    rp_config cfg = builtin("tiny");
    float dummy;
    rp_error err = {0};
    assert_int_equal(rp_init_layer(&dummy, &cfg, cfg.n_layer, 1, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "layer 2"));
    assert_int_equal(rp_init_layer(NULL, &cfg, 0, 1, &err), RP_ERR_ARG);
    rp_config bad = cfg;
    bad.n_embd = 100;
    assert_int_equal(rp_init_layer(&dummy, &bad, 0, 1, &err), RP_ERR_SHAPE);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_philox_matches_random123_known_answers),
        cmocka_unit_test(test_uniform_in_unit_interval_with_mean_half_variance_one_twelfth),
        cmocka_unit_test(test_normal_has_mean_zero_variance_one),
        cmocka_unit_test(test_stream_key_depends_on_seed_and_name),
        cmocka_unit_test(test_same_seed_gives_identical_bytes_other_seed_differs),
        cmocka_unit_test(test_layer_init_alone_equals_same_layer_of_full_init),
        cmocka_unit_test(test_global_init_of_one_part_equals_that_part_of_full_init),
        cmocka_unit_test(test_orthogonal_tensors_have_orthonormal_rows_or_columns_times_gain),
        cmocka_unit_test(test_lora2_with_fewer_rows_than_columns_has_rows_of_norm_one_tenth),
        cmocka_unit_test(test_orthogonal_works_for_tiny_and_odd_shapes),
        cmocka_unit_test(test_channel_formulas_match_spec_at_sample_points),
        cmocka_unit_test(test_constant_tensors_hold_their_constants),
        cmocka_unit_test(test_embedding_is_small_uniform_noise),
        cmocka_unit_test(test_bad_layer_index_is_rejected_with_its_value),
    };
    return cmocka_run_group_tests_name("init", tests, NULL, NULL);
}
