/* The emulator tests' tiny-model fixture (tiny_fixture.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cmocka.h>

#include "tiny_fixture.h"

tiny_fixture *tiny_fixture_create(rp_cuda_math math, int max_rows, int max_seqs,
                                  int forward_rows) {
    assert_true(max_rows <= TINY_FIXTURE_MAX_ROWS && max_seqs <= TINY_FIXTURE_MAX_SEQS);
    tiny_fixture *f = calloc(1, sizeof *f);
    rp_error err;
    f->max_seqs = max_seqs;
    f->be = rp_cuda_backend_create(0, math, &err);
    if (!f->be) {
        fprintf(stderr, "backend: %s\n", err.msg);
        return NULL;
    }
    const char *data = getenv("RP_TEST_DATA");
    char path[4096];
    snprintf(path, sizeof path, "%s/tiny_L2_C128_V256_s1.weights.safetensors",
             data ? data : "tests/data");
    if (rp_model_load(&f->model, path, 0, -1, f->be, &err) != RP_OK) {
        fprintf(stderr, "%s: %s\n", path, err.msg);
        return NULL;
    }
    rp_model_register_weights(&f->model);
    const rp_config *cfg = &f->model.cfg;
    const int L = cfg->n_layer;
    if (rp_model_alloc(&f->grads, cfg, 0, L, 1, 1, f->be, &err) != RP_OK ||
        (forward_rows > 0 &&
         rp_workspace_alloc(&f->ws, cfg, forward_rows, f->be, &err) != RP_OK) ||
        rp_backward_workspace_alloc(&f->tw, &f->model, max_rows, max_seqs, &err) != RP_OK) {
        fprintf(stderr, "alloc: %s\n", err.msg);
        return NULL;
    }
    rp_model_zero(&f->grads);
    rp_state_geometry(&f->state, cfg, 0, L, max_seqs);
    f->state.data = f->be->alloc(f->be, f->state.floats_per_slot * max_seqs * sizeof(float));
    if (!f->state.data) return NULL;
    return f;
}

void tiny_fixture_destroy(tiny_fixture *f) {
    f->be->free(f->be, f->state.data);
    rp_backward_workspace_free(&f->tw, f->be);
    rp_workspace_free(&f->ws, f->be);
    rp_model_free(&f->grads);
    rp_model_free(&f->model);
    f->be->destroy(f->be);
    free(f);
}

void tiny_fixture_zero_state(tiny_fixture *f) {
    f->be->fill_zero(f->be, f->state.data,
                     f->state.floats_per_slot * f->max_seqs * sizeof(float));
}

double tiny_fixture_train_step(tiny_fixture *f, int n_seq, int len, int salt) {
    int seq_len[TINY_FIXTURE_MAX_SEQS], slot[TINY_FIXTURE_MAX_SEQS],
        row_begin[TINY_FIXTURE_MAX_SEQS];
    int32_t inputs[TINY_FIXTURE_MAX_ROWS], targets[TINY_FIXTURE_MAX_ROWS];
    assert_true(n_seq <= f->max_seqs && n_seq * len <= TINY_FIXTURE_MAX_ROWS);
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
    double loss = 0;
    int n_targets = 0;
    rp_error err;
    assert_int_equal(rp_model_train_step(&f->model, &f->grads, &f->tw, inputs, targets, &b,
                                         &f->state, NULL, 1.0f / (float)(n_seq * len), 0.0f,
                                         &loss, &n_targets, &err), RP_OK);
    f->be->synchronize(f->be);
    const rp_status st = f->be->status(f->be, &err);
    if (st != RP_OK) fprintf(stderr, "train step of %d x %d rows: %s\n", n_seq, len, err.msg);
    assert_int_equal(st, RP_OK);
    assert_int_equal(n_targets, n_seq * len);
    assert_true(loss > 0);
    return loss;
}
