/* The official optimizer recipe: AdamW against a double-precision reference,
 * parameter groups, the LR schedule of RWKV-LM's trainer, global-norm
 * clipping, deterministic sums of squares and the L2Wrap gradient term;
 * ZeRO-1's shards: their AdamW steps together are rp_optim_step's bits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_backend.h"
#include "model/params.h"
#include "optim/optim.h"
#include "optim/zero.h"

static uint32_t lcg(uint32_t *s) { return *s = *s * 1664525u + 1013904223u; }
static float frand(uint32_t *s) { return (lcg(s) >> 8) * (1.0f / 16777216.0f) * 2.0f - 1.0f; }

static void test_adamw_matches_double_reference(void **state) {
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(2, &err);
    const size_t n = 100003;
    float *p = malloc(n * 4), *g = malloc(n * 4), *m = calloc(n, 4), *v = calloc(n, 4);
    double *pd = malloc(n * 8), *md = calloc(n, 8), *vd = calloc(n, 8);
    uint32_t seed = 7;
    for (size_t i = 0; i < n; i++) pd[i] = p[i] = frand(&seed);
    const double lr = 1e-3, b1 = 0.9, b2 = 0.99, eps = 1e-18, wd = 0.1, scale = 0.5;
    for (int step = 1; step <= 5; step++) {
        for (size_t i = 0; i < n; i++) g[i] = frand(&seed);
        double bc1 = 1 - pow(b1, step), bc2 = 1 - pow(b2, step);
        be->adamw(be, p, g, m, v, n, (float)lr, (float)b1, (float)b2, (float)eps, (float)wd,
                  (float)scale, (float)bc1, (float)bc2);
        for (size_t i = 0; i < n; i++) {
            double gi = (double)g[i] * scale;
            md[i] = b1 * md[i] + (1 - b1) * gi;
            vd[i] = b2 * vd[i] + (1 - b2) * gi * gi;
            pd[i] -= lr * ((md[i] / bc1) / (sqrt(vd[i] / bc2) + eps) + wd * pd[i]);
        }
    }
    double max_err = 0;
    for (size_t i = 0; i < n; i++) max_err = fmax(max_err, fabs(p[i] - pd[i]));
    if (max_err > 1e-6) fail_msg("AdamW differs from the reference by %g", max_err);
    free(p); free(g); free(m); free(v); free(pd); free(md); free(vd);
    rp_cpu_backend_destroy(be);
}

static void test_official_parameter_groups(void **state) {
    rp_config cfg;
    rp_error err;
    assert_int_equal(rp_config_builtin(&cfg, "tiny", 0, &err), RP_OK);
    rp_tensor_info t[RP_LAYER_N_TENSORS], g[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(&cfg, t);
    rp_global_layout(&cfg, g, NULL, NULL);
    const char *decayed[] = {"att.receptance.weight", "att.key.weight", "att.value.weight",
                             "att.output.weight", "ffn.key.weight", "ffn.value.weight"};
    for (int i = 0; i < RP_LAYER_N_TENSORS; i++) {
        int want = 0;
        for (size_t j = 0; j < sizeof decayed / sizeof decayed[0]; j++)
            want |= strcmp(t[i].suffix, decayed[j]) == 0;
        if (t[i].weight_decay != want) fail_msg("%s: weight decay %d, expected %d", t[i].suffix, t[i].weight_decay, want);
        float lr = strcmp(t[i].suffix, "att.w0") == 0 ? 2.0f : 1.0f;
        if (t[i].lr_scale != lr) fail_msg("%s: lr scale %g, expected %g", t[i].suffix, t[i].lr_scale, lr);
    }
    for (int i = 0; i < RP_GLOBAL_N_TENSORS; i++) {
        int want = strcmp(g[i].suffix, "emb.weight") == 0 || strcmp(g[i].suffix, "head.weight") == 0;
        if (g[i].weight_decay != want) fail_msg("%s: weight decay %d", g[i].suffix, g[i].weight_decay);
    }
}

static void test_lr_schedule_follows_rwkv_lm(void **state) {
    rp_optim_config c;
    rp_optim_defaults(&c);
    c.lr_init = 6e-4f;
    c.lr_final = 6e-5f;
    c.warmup_steps = 10;
    c.total_steps = 110;
    /* warmup multiplies by 0.01 + 0.99 step / warmup on top of the schedule */
    assert_float_equal(rp_lr_at(&c, 0), 6e-4 * 0.01, 1e-12);
    assert_float_equal(rp_lr_at(&c, 5), 6e-4 * (0.01 + 0.99 * 0.5), 1e-12);
    assert_float_equal(rp_lr_at(&c, 10), 6e-4, 1e-9);
    /* mid-cosine: progress 0.5 -> (0.5 + f/2) lr_init */
    assert_float_equal(rp_lr_at(&c, 60), 6e-4 * (0.5 + 0.05), 1e-9);
    assert_float_equal(rp_lr_at(&c, 110), 6e-5, 1e-9);
    assert_float_equal(rp_lr_at(&c, 500), 6e-5, 1e-9);
    c.schedule = RP_LR_LINEAR;
    assert_float_equal(rp_lr_at(&c, 60), 6e-4 + (6e-5 - 6e-4) * 0.5, 1e-9);
    c.schedule = RP_LR_CONSTANT;
    assert_float_equal(rp_lr_at(&c, 60), 6e-4, 1e-9);
}

static void test_clip_scale_like_torch(void **state) {
    assert_float_equal(rp_clip_scale(0.5, 1.0f), 1.0f, 0);
    assert_float_equal(rp_clip_scale(4.0, 1.0f), 1.0 / (4.0 + 1e-6), 1e-7);
    assert_float_equal(rp_clip_scale(4.0, 0.0f), 1.0f, 0);
}

static void test_sum_squares_independent_of_threads(void **state) {
    rp_error err;
    rp_backend *one = rp_cpu_backend_create(1, &err), *two = rp_cpu_backend_create(2, &err);
    const size_t n = 1000003;
    float *x = malloc(n * 4);
    uint32_t seed = 3;
    double ref = 0;
    for (size_t i = 0; i < n; i++) {
        x[i] = frand(&seed);
        ref += (double)x[i] * x[i];
    }
    double a = one->sum_squares(one, x, n), b = two->sum_squares(two, x, n);
    assert_memory_equal(&a, &b, sizeof a);
    assert_float_equal(a, ref, 1e-9 * ref);
    free(x);
    rp_cpu_backend_destroy(one);
    rp_cpu_backend_destroy(two);
}

static void test_l2wrap_adds_to_the_argmax_only(void **state) {
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(1, &err);
    const int R = 3, V = 5;
    float logits[15] = {0, 3, 1, 3, -1, /* tie: first max */ 2, 1, 0, -1, -2, 1, 1, 1, 1, 9};
    float d[15] = {0};
    float mx[3];
    int32_t am[3], targets[3] = {0, -1, 2};
    be->row_max(be, mx, am, logits, R, V);
    assert_int_equal(am[0], 1);
    assert_int_equal(am[2], 4);
    be->l2wrap(be, d, mx, am, targets, R, V, 0.5f);
    for (int i = 0; i < 15; i++) {
        float want = i == 1 ? 1.5f : i == 14 ? 4.5f : 0.0f;  /* row 1 has no target */
        assert_float_equal(d[i], want, 0);
    }
    rp_cpu_backend_destroy(be);
}

/* Fills every owned buffer of m with seeded values. */
static void fill_model(rp_model *m, uint32_t seed) {
    size_t n;
    float *p;
    for (int i = 0; (p = rp_zero_buffer(m, i, &n)); i++)
        for (size_t k = 0; k < n; k++) p[k] = frand(&seed);
}

/* The DP shards' ranges tile every buffer, and stepping each shard with its
 * own moments (3 steps, weight decay on, clipping scale 0.3) gives the
 * weights and moments of rp_optim_step on the whole buffers, bit for bit;
 * the partial sums of squares in replica order are the same for any view. */
static void test_zero_shards_equal_the_whole_step(void **state) {
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(2, &err);
    rp_config cfg;
    assert_int_equal(rp_config_builtin(&cfg, "tiny", 0, &err), RP_OK);
    rp_optim_config oc;
    rp_optim_defaults(&oc);
    oc.weight_decay = 0.1f;
    for (int dp = 1; dp <= 3; dp++) {
        rp_model w_ref, w, g, m, v, m2, v2;
        assert_int_equal(rp_model_alloc(&w_ref, &cfg, 0, cfg.n_layer, 1, 1, be, &err), RP_OK);
        assert_int_equal(rp_model_alloc(&w, &cfg, 0, cfg.n_layer, 1, 1, be, &err), RP_OK);
        assert_int_equal(rp_model_alloc(&g, &cfg, 0, cfg.n_layer, 1, 1, be, &err), RP_OK);
        assert_int_equal(rp_model_alloc(&m, &cfg, 0, cfg.n_layer, 1, 1, be, &err), RP_OK);
        assert_int_equal(rp_model_alloc(&v, &cfg, 0, cfg.n_layer, 1, 1, be, &err), RP_OK);
        assert_int_equal(rp_model_alloc(&m2, &cfg, 0, cfg.n_layer, 1, 1, be, &err), RP_OK);
        assert_int_equal(rp_model_alloc(&v2, &cfg, 0, cfg.n_layer, 1, 1, be, &err), RP_OK);
        fill_model(&w_ref, 11);
        fill_model(&w, 11);
        rp_zero_shard z[3];
        size_t covered = 0, total = 0, n;
        for (int r = 0; r < dp; r++) {
            assert_int_equal(rp_zero_shard_init(&z[r], &w, dp, r, &err), RP_OK);
            covered += z[r].shard_floats;
        }
        for (int i = 0; rp_zero_buffer(&w, i, &n); i++) total += n;
        assert_int_equal(covered, total);
        for (long step = 0; step < 3; step++) {
            fill_model(&g, 100 + (uint32_t)step);
            rp_optim_step(&w_ref, &g, &m, &v, &oc, step, 0.3f);
            for (int r = 0; r < dp; r++) rp_zero_optim_step(&z[r], &w, &g, &oc, step, 0.3f);
        }
        float *a, *b;
        for (int i = 0; (a = rp_zero_buffer(&w_ref, i, &n)); i++) {
            b = rp_zero_buffer(&w, i, &n);
            if (memcmp(a, b, n * sizeof(float)) != 0)
                fail_msg("DP %d: buffer %d's weights differ from the unsharded step", dp, i);
        }
        for (int r = 0; r < dp; r++) rp_zero_put(&z[r], &m2, &v2);
        for (int i = 0; (a = rp_zero_buffer(&m, i, &n)); i++) {
            assert_memory_equal(a, rp_zero_buffer(&m2, i, &n), n * sizeof(float));
            assert_memory_equal(rp_zero_buffer(&v, i, &n), rp_zero_buffer(&v2, i, &n),
                                n * sizeof(float));
        }
        /* take is put's inverse: a shard reloaded from whole moments. */
        rp_zero_shard again;
        assert_int_equal(rp_zero_shard_init(&again, &w, dp, dp - 1, &err), RP_OK);
        rp_zero_take(&again, &m, &v);
        for (int i = 0; i < again.n_buf; i++)
            assert_memory_equal(again.m[i], z[dp - 1].m[i], again.count[i] * sizeof(float));
        rp_zero_shard_free(&again);
        double parts = 0;
        for (int d = 0; d < dp; d++) parts += rp_zero_partial_sum_squares(&g, dp, d);
        assert_true(fabs(parts - rp_grad_sum_squares(&g)) <= 1e-12 * parts);
        for (int r = 0; r < dp; r++) rp_zero_shard_free(&z[r]);
        rp_model_free(&w_ref);
        rp_model_free(&w);
        rp_model_free(&g);
        rp_model_free(&m);
        rp_model_free(&v);
        rp_model_free(&m2);
        rp_model_free(&v2);
    }
    rp_backend_destroy(be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adamw_matches_double_reference),
        cmocka_unit_test(test_official_parameter_groups),
        cmocka_unit_test(test_lr_schedule_follows_rwkv_lm),
        cmocka_unit_test(test_clip_scale_like_torch),
        cmocka_unit_test(test_sum_squares_independent_of_threads),
        cmocka_unit_test(test_l2wrap_adds_to_the_argmax_only),
        cmocka_unit_test(test_zero_shards_equal_the_whole_step),
    };
    return cmocka_run_group_tests_name("optim", tests, NULL, NULL);
}
