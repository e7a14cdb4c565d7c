/* The CUDA backend's decode launch budget and its no-allocation-after-warm-up
 * rule, counted in the emulated CUDA runtime (tests/cuda_emu/README.md): a
 * decode step of the tiny 2-layer C=128 model (head size 64) must stay within
 * LAUNCH_BUDGET_PER_LAYER kernel launches per layer (each cuBLAS GEMM counts
 * as one), and once warmed up, decode and training steps allocate nothing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "cuda_backend.h"
#include "emu_counters.h"
#include "model/backward.h"
#include "model/model.h"
#include "model/state.h"

/* Launches per decode layer (batch of one token, layers after the first,
 * which also run the value-residual LoRA). Measured 37 before any fusion
 * (issue 15); 36 with the value mix shared by the value GEMM and the nu
 * LoRA. The goal is <= 10: lower it with every fusion. */
#define LAUNCH_BUDGET_PER_LAYER 36

#define MAX_ROWS 24
#define MAX_SEQS 3

typedef struct {
    rp_backend *be;
    rp_model model, grads;
    rp_workspace ws;
    rp_backward_workspace tw;
    rp_state state;
} fixture;

static unsigned long long launches_now(void) {
    rp_emu_counters c;
    rp_emu_counts(&c);
    return c.launches;
}
static unsigned long long allocs_now(void) {
    rp_emu_counters c;
    rp_emu_counts(&c);
    return c.allocs;
}

static int setup(void **s) {
    fixture *f = calloc(1, sizeof *f);
    rp_error err;
    f->be = rp_cuda_backend_create(0, RP_CUDA_MATH_BF16, &err);
    if (!f->be) {
        fprintf(stderr, "backend: %s\n", err.msg);
        return -1;
    }
    const char *data = getenv("RP_TEST_DATA");
    char path[4096];
    snprintf(path, sizeof path, "%s/tiny_L2_C128_V256_s1.weights.safetensors",
             data ? data : "tests/data");
    if (rp_model_load(&f->model, path, 0, -1, f->be, &err) != RP_OK) {
        fprintf(stderr, "%s: %s\n", path, err.msg);
        return -1;
    }
    rp_model_register_weights(&f->model);
    const rp_config *cfg = &f->model.cfg;
    const int L = cfg->n_layer;
    if (rp_model_alloc(&f->grads, cfg, 0, L, 1, 1, f->be, &err) != RP_OK ||
        rp_workspace_alloc(&f->ws, cfg, MAX_ROWS, f->be, &err) != RP_OK ||
        rp_backward_workspace_alloc(&f->tw, &f->model, MAX_ROWS, MAX_SEQS, &err) != RP_OK) {
        fprintf(stderr, "alloc: %s\n", err.msg);
        return -1;
    }
    rp_model_zero(&f->grads);
    rp_state_geometry(&f->state, cfg, 0, L, MAX_SEQS);
    f->state.data = f->be->alloc(f->be, f->state.floats_per_slot * MAX_SEQS * sizeof(float));
    if (!f->state.data) return -1;
    *s = f;
    return 0;
}

static int teardown(void **s) {
    fixture *f = *s;
    f->be->free(f->be, f->state.data);
    rp_backward_workspace_free(&f->tw, f->be);
    rp_workspace_free(&f->ws, f->be);
    rp_model_free(&f->grads);
    rp_model_free(&f->model);
    f->be->destroy(f->be);
    free(f);
    return 0;
}

/* One decode step: n_seq sequences of one token each. */
static void decode_step(fixture *f, int n_seq, int salt, float *logits) {
    int seq_len[MAX_SEQS], slot[MAX_SEQS], row_begin[MAX_SEQS];
    int32_t tokens[MAX_SEQS];
    for (int s = 0; s < n_seq; s++) {
        seq_len[s] = 1;
        slot[s] = s;
        tokens[s] = (int32_t)((salt * 7 + s * 13) % f->model.cfg.vocab_size);
    }
    rp_batch b;
    rp_batch_init(&b, n_seq, seq_len, slot, row_begin);
    rp_error err;
    assert_int_equal(rp_model_forward(&f->model, &f->ws, tokens, &b, &f->state, RP_LOGITS_LAST,
                                      logits, &err), RP_OK);
    f->be->synchronize(f->be);
    assert_int_equal(f->be->status(f->be, &err), RP_OK);
}

/* One training step over n_seq sequences of `len` tokens. */
static void train_step(fixture *f, int n_seq, int len, int salt) {
    int seq_len[MAX_SEQS], slot[MAX_SEQS], row_begin[MAX_SEQS];
    int32_t inputs[MAX_ROWS], targets[MAX_ROWS];
    for (int s = 0; s < n_seq; s++) {
        seq_len[s] = len;
        slot[s] = s;
    }
    for (int r = 0; r < n_seq * len; r++) {
        inputs[r] = (int32_t)((salt * 31 + r * 17) % f->model.cfg.vocab_size);
        targets[r] = (int32_t)((salt * 5 + r * 3 + 1) % f->model.cfg.vocab_size);
    }
    rp_batch b;
    rp_batch_init(&b, n_seq, seq_len, slot, row_begin);
    f->be->fill_zero(f->be, f->state.data, f->state.floats_per_slot * MAX_SEQS * sizeof(float));
    double loss = 0;
    int n_targets = 0;
    rp_error err;
    assert_int_equal(rp_model_train_step(&f->model, &f->grads, &f->tw, inputs, targets, &b,
                                         &f->state, NULL, 1.0f / (float)(n_seq * len), 0.0f,
                                         &loss, &n_targets, &err), RP_OK);
    f->be->synchronize(f->be);
    assert_int_equal(f->be->status(f->be, &err), RP_OK);
    assert_int_equal(n_targets, n_seq * len);
    assert_true(loss > 0);
}

/* Launches of one decode layer, counted around rp_model_block_forward. */
static unsigned long long layer_launches(fixture *f, int layer, int n_seq) {
    int seq_len[MAX_SEQS], slot[MAX_SEQS], row_begin[MAX_SEQS];
    int32_t tokens[MAX_SEQS];
    for (int s = 0; s < n_seq; s++) {
        seq_len[s] = 1;
        slot[s] = s;
        tokens[s] = (int32_t)(s + 1);
    }
    rp_batch b;
    rp_batch_init(&b, n_seq, seq_len, slot, row_begin);
    rp_error err;
    assert_int_equal(rp_model_embed(&f->model, &f->ws, tokens, &b, &err), RP_OK);
    for (int l = 0; l < layer; l++) rp_model_block_forward(&f->model, &f->ws, l, &f->state, &b);
    const unsigned long long before = launches_now();
    rp_model_block_forward(&f->model, &f->ws, layer, &f->state, &b);
    const unsigned long long n = launches_now() - before;
    f->be->synchronize(f->be);
    assert_int_equal(f->be->status(f->be, &err), RP_OK);
    return n;
}

static void test_decode_launch_budget(void **s) {
    fixture *f = *s;
    float *logits = f->be->alloc(f->be, (size_t)MAX_SEQS * f->model.cfg.vocab_size * sizeof(float));
    assert_non_null(logits);
    decode_step(f, 1, 0, logits); /* warm-up */
    for (int n_seq = 1; n_seq <= 2; n_seq++) {
        unsigned long long worst = 0;
        for (int l = 0; l < f->model.cfg.n_layer; l++) {
            unsigned long long n = layer_launches(f, l, n_seq);
            printf("decode batch %d layer %d: %llu launches (budget %d)\n", n_seq, l, n,
                   LAUNCH_BUDGET_PER_LAYER);
            if (n > worst) worst = n;
        }
        assert_true(worst <= LAUNCH_BUDGET_PER_LAYER);
    }
    f->be->free(f->be, logits);
}

/* After one decode step and one training step at the largest shapes, more
 * steps of those shapes or smaller allocate and free nothing. */
static void test_no_allocation_after_warm_up(void **s) {
    fixture *f = *s;
    float *logits = f->be->alloc(f->be, (size_t)MAX_SEQS * f->model.cfg.vocab_size * sizeof(float));
    assert_non_null(logits);
    decode_step(f, MAX_SEQS, 0, logits);
    train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, 0);
    const unsigned long long before = allocs_now();
    for (int i = 1; i <= 3; i++) {
        decode_step(f, 1 + i % MAX_SEQS, i, logits);
        train_step(f, 1 + i % MAX_SEQS, MAX_ROWS / MAX_SEQS - i, i);
        train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, i);
    }
    const unsigned long long n = allocs_now() - before;
    printf("allocations/frees after warm-up: %llu\n", n);
    assert_int_equal(n, 0);
    f->be->free(f->be, logits);
}

/* reserve() sizes the host-array uploads for its rows, so that an op's first
 * call with more rows than any before (embedding_backward's permutation,
 * mid-step, with a pipelined receive posted) does not regrow a buffer. */
static void test_reserve_sizes_uploads(void **s) {
    fixture *f = *s;
    rp_backend *be = f->be;
    enum { R = 3000, C = 8, V = 16 };
    rp_error err;
    assert_int_equal(be->reserve(be, R, 4, C, 64, &err), RP_OK);
    float *demb = be->alloc(be, (size_t)V * C * sizeof(float));
    float *dx = be->alloc(be, (size_t)R * C * sizeof(float));
    float *x = be->alloc(be, (size_t)R * C * sizeof(float));
    int32_t *tokens = malloc(R * sizeof *tokens);
    assert_non_null(demb);
    assert_non_null(dx);
    assert_non_null(x);
    assert_non_null(tokens);
    for (int r = 0; r < R; r++) tokens[r] = (int32_t)(r * 7 % V);
    const unsigned long long before = allocs_now();
    be->embedding(be, x, demb, tokens, R, C);
    be->embedding_backward(be, demb, dx, tokens, R, C);
    be->synchronize(be);
    assert_int_equal(be->status(be, &err), RP_OK);
    const unsigned long long n = allocs_now() - before;
    printf("allocations/frees in embedding + embedding_backward of %d rows: %llu\n", R, n);
    assert_int_equal(n, 0);
    free(tokens);
    be->free(be, x);
    be->free(be, dx);
    be->free(be, demb);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_decode_launch_budget, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_allocation_after_warm_up, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reserve_sizes_uploads, setup, teardown),
    };
    return cmocka_run_group_tests_name("cuda_budget", tests, NULL, NULL);
}
