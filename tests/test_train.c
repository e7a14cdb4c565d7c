/* The training loop: it learns (loss falls on the copy task), it is
 * deterministic (same seed, same weights bit for bit, whatever the thread
 * count), and gradient accumulation over micro-batches equals one big batch
 * up to rounding. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_backend.h"
#include "train/trainer.h"

static rp_backend *backend(void) {
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(0, &err);
    assert_non_null(be);
    return be;
}

static void new_model(rp_model *m, rp_backend *be) {
    rp_config cfg;
    rp_error err;
    assert_int_equal(rp_config_builtin(&cfg, "tiny", 0, &err), RP_OK);
    cfg.n_layer = 1;
    assert_int_equal(rp_model_alloc(m, &cfg, 0, 1, 1, 1, be, &err), RP_OK);
    assert_int_equal(rp_model_init_official(m, 3, &err), RP_OK);
}

static void small_options(rp_train_options *o, rp_synth_task task, rp_backend *be) {
    rp_train_options_defaults(o);
    o->host_backend = be;  /* the model's backend is host memory */
    o->synth.task = task;
    o->ctx_len = 16;
    o->batch_size = 4;
    o->micro_batch_size = 4;
    o->steps = 4;
    o->eval_interval = 0;
    o->eval_batches = 1;
    o->optim.lr_init = 3e-3f;
    o->optim.lr_final = 3e-4f;
    o->optim.warmup_steps = 0;
}

/* max |a - b| / max |b| over every owned weight. */
static double weights_rel_diff(const rp_model *a, const rp_model *b) {
    double max_diff = 0, max_ref = 0;
    for (size_t i = 0; i < a->layer_floats; i++) {
        max_diff = fmax(max_diff, fabs(a->layer_flat[0][i] - b->layer_flat[0][i]));
        max_ref = fmax(max_ref, fabs(b->layer_flat[0][i]));
    }
    for (size_t i = 0; i < a->head_floats; i++) {
        max_diff = fmax(max_diff, fabs(a->head_flat[i] - b->head_flat[i]));
        max_ref = fmax(max_ref, fabs(b->head_flat[i]));
    }
    return max_diff / max_ref;
}

/* Every owned weight of a equals b's, byte for byte. */
static void assert_same_weights(const rp_model *a, const rp_model *b) {
    assert_memory_equal(a->layer_flat[0], b->layer_flat[0], a->layer_floats * sizeof(float));
    assert_memory_equal(a->embed_flat, b->embed_flat, a->embed_floats * sizeof(float));
    assert_memory_equal(a->head_flat, b->head_flat, a->head_floats * sizeof(float));
}

static void test_same_seed_gives_identical_weights(void **state) {
    rp_backend *be = backend();
    rp_model a, b;
    new_model(&a, be);
    new_model(&b, be);
    rp_train_options o;
    small_options(&o, RP_SYNTH_COPY, be);
    rp_error err;
    assert_int_equal(rp_train_run(&a, &o, NULL, &err), RP_OK);
    assert_int_equal(rp_train_run(&b, &o, NULL, &err), RP_OK);
    assert_same_weights(&a, &b);
    rp_model_free(&a);
    rp_model_free(&b);
    rp_cpu_backend_destroy(be);
}

/* The thread count does not change a run: rows are split between threads
 * only at multiples of the BLAS kernels' row unroll, the backward tiles by
 * shape. Every GEMM of this run has more rows (8 x 128) than columns (the
 * FFN's 512 at most), as training usually does; a matmul with fewer rows
 * than columns splits its columns and may differ in the last bits
 * (docs/parallelism.md, "Threads"). */
static void test_thread_count_does_not_change_weights(void **state) {
    rp_error err;
    rp_model runs[3];
    const int threads[3] = {1, 2, 3};
    rp_backend *bes[3];
    for (int i = 0; i < 3; i++) {
        bes[i] = rp_cpu_backend_create(threads[i], &err);
        assert_non_null(bes[i]);
        new_model(&runs[i], bes[i]);
        rp_train_options o;
        small_options(&o, RP_SYNTH_MQAR, bes[i]);
        o.ctx_len = 128;
        o.batch_size = o.micro_batch_size = 8;
        o.steps = 2;
        if (rp_train_run(&runs[i], &o, NULL, &err) != RP_OK) fail_msg("%s", err.msg);
    }
    for (int i = 1; i < 3; i++) assert_same_weights(&runs[i], &runs[0]);
    for (int i = 0; i < 3; i++) {
        rp_model_free(&runs[i]);
        rp_cpu_backend_destroy(bes[i]);
    }
}

static void test_micro_batches_equal_one_batch(void **state) {
    rp_backend *be = backend();
    rp_model a, b;
    new_model(&a, be);
    new_model(&b, be);
    rp_train_options o;
    small_options(&o, RP_SYNTH_COPY, be);
    rp_error err;
    assert_int_equal(rp_train_run(&a, &o, NULL, &err), RP_OK);
    o.micro_batch_size = 2;
    assert_int_equal(rp_train_run(&b, &o, NULL, &err), RP_OK);
    double d = weights_rel_diff(&b, &a);
    if (d > 1e-4) fail_msg("micro-batch 2 x 2 differs from batch 4 by %g", d);
    /* ... and training did change the weights (Adam moves each by ~lr a step). */
    rp_model fresh;
    new_model(&fresh, be);
    double max_change = 0;
    for (size_t i = 0; i < a.head_floats; i++)
        max_change = fmax(max_change, fabs(a.head_flat[i] - fresh.head_flat[i]));
    if (max_change < 1e-3) fail_msg("4 steps at lr 3e-3 moved the head by only %g", max_change);
    rp_model_free(&a);
    rp_model_free(&b);
    rp_model_free(&fresh);
    rp_cpu_backend_destroy(be);
}

/* Copy samples of 8 symbols in a 32-token window end in padding: with the
 * loss on every token, 40 steps must learn at least that structure. */
static void test_loss_falls_on_the_copy_task(void **state) {
    rp_backend *be = backend();
    rp_model m;
    new_model(&m, be);
    rp_train_options o;
    small_options(&o, RP_SYNTH_COPY, be);
    o.ctx_len = 32;
    o.synth.copy_len = 8;
    o.loss_on_answers_only = 0;
    o.steps = 40;
    o.batch_size = o.micro_batch_size = 8;
    rp_error err;
    double loss0, acc0, loss1, acc1;
    assert_int_equal(rp_train_evaluate(&m, &o, 2, &loss0, &acc0, NULL, &err), RP_OK);
    rp_train_result res;
    assert_int_equal(rp_train_run(&m, &o, &res, &err), RP_OK);
    assert_int_equal(rp_train_evaluate(&m, &o, 2, &loss1, &acc1, NULL, &err), RP_OK);
    if (!(loss1 < loss0 - 0.5)) fail_msg("eval loss %.4f -> %.4f: did not fall", loss0, loss1);
    assert_true(isfinite(res.last_loss));
    rp_model_free(&m);
    rp_cpu_backend_destroy(be);
}

/* Train 8 steps at once, or 4 steps + checkpoint + resume + 4 steps: the
 * same weights bit for bit (moments, step, LR position and data cursor all
 * come back). Both data kinds: synthetic here, shards in test_cli.sh. */
static void test_resume_from_checkpoint_is_bit_exact(void **state) {
    rp_backend *be = backend();
    rp_model straight, resumed;
    new_model(&straight, be);
    new_model(&resumed, be);
    rp_train_options o;
    small_options(&o, RP_SYNTH_MQAR, be);
    o.steps = 8;
    o.optim.warmup_steps = 2;
    rp_error err;
    assert_int_equal(rp_train_run(&straight, &o, NULL, &err), RP_OK);

    char dir[] = "/tmp/test_train_ckpt.XXXXXX";
    assert_non_null(mkdtemp(dir));
    o.ckpt_dir = dir;
    o.stop_after = 4;
    rp_train_result res;
    if (rp_train_run(&resumed, &o, &res, &err) != RP_OK) fail_msg("%s", err.msg);
    assert_int_equal(res.steps_done, 4);
    /* A fresh model: everything must come from the checkpoint. */
    rp_model_free(&resumed);
    new_model(&resumed, be);
    o.stop_after = 0;
    o.resume_path = dir;
    if (rp_train_run(&resumed, &o, &res, &err) != RP_OK) fail_msg("%s", err.msg);
    assert_int_equal(res.steps_done, 8);
    assert_same_weights(&resumed, &straight);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    rp_model_free(&straight);
    rp_model_free(&resumed);
    rp_cpu_backend_destroy(be);
}

static void test_batch_must_be_a_multiple_of_micro_batch_size(void **state) {
    rp_backend *be = backend();
    rp_model m;
    new_model(&m, be);
    rp_train_options o;
    small_options(&o, RP_SYNTH_MQAR, be);
    o.micro_batch_size = 3;
    rp_error err;
    assert_int_equal(rp_train_run(&m, &o, NULL, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "micro-batch"));
    rp_model_free(&m);
    rp_cpu_backend_destroy(be);
}

/* --zero 1's save gathers into host memory that the caller provides: a
 * run without it is refused before any work, not at its first save. */
static void test_zero_needs_a_host_backend(void **state) {
    rp_backend *be = backend();
    rp_model m;
    new_model(&m, be);
    rp_train_options o;
    small_options(&o, RP_SYNTH_MQAR, be);
    o.zero = 1;
    o.host_backend = NULL;
    rp_error err;
    assert_int_equal(rp_train_run(&m, &o, NULL, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "host_backend"));
    o.host_backend = be;
    o.steps = 1;
    if (rp_train_run(&m, &o, NULL, &err) != RP_OK) fail_msg("%s", err.msg);
    rp_model_free(&m);
    rp_cpu_backend_destroy(be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_seed_gives_identical_weights),
        cmocka_unit_test(test_thread_count_does_not_change_weights),
        cmocka_unit_test(test_micro_batches_equal_one_batch),
        cmocka_unit_test(test_loss_falls_on_the_copy_task),
        cmocka_unit_test(test_resume_from_checkpoint_is_bit_exact),
        cmocka_unit_test(test_batch_must_be_a_multiple_of_micro_batch_size),
        cmocka_unit_test(test_zero_needs_a_host_backend),
    };
    return cmocka_run_group_tests_name("train", tests, NULL, NULL);
}
