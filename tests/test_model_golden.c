/* The CPU forward pass against the official RWKV-7 reference (golden files):
 * logits and final state in sequence mode, step mode, split prefix, from a
 * given mid-sequence state, and batched with sequences of different lengths;
 * and a sequence's result does not depend on its batch neighbours. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "cpu/cpu_backend.h"
#include "golden_util.h"
#include "model/model.h"

/* Issue bound: max |error| <= 1e-4 of the reference's scale. */
#define LOGIT_TOL 1e-4
#define STATE_TOL 1e-4

typedef struct {
    const char *name;
    int shared_only;  /* read from $RP_SHARED_DIR, skip when absent */
    char weights[1024], golden[1024];
    rp_backend *be;
    rp_model model;
    rp_st_file gold;
    int T, V, L, C, H;
    int32_t *tokens;
    float *logits_ref;
} fixture;

static int fixture_setup(void **state_ptr, const char *name, int shared_only) {
    fixture *fx = calloc(1, sizeof *fx);
    fx->name = name;
    fx->shared_only = shared_only;
    char wname[256], gname[256];
    snprintf(wname, sizeof wname, "%s.weights.safetensors", name);
    snprintf(gname, sizeof gname, "%s.golden.safetensors", name);
    if (shared_only) {
        if (!golden_shared_path(fx->weights, sizeof fx->weights, wname) ||
            !golden_shared_path(fx->golden, sizeof fx->golden, gname)) {
            *state_ptr = fx;  /* tests skip */
            return 0;
        }
    } else {
        golden_data_path(fx->weights, sizeof fx->weights, wname);
        golden_data_path(fx->golden, sizeof fx->golden, gname);
    }
    rp_error err;
    fx->be = rp_cpu_backend_create(0, &err);
    if (!fx->be) return -1;
    if (rp_model_load(&fx->model, fx->weights, 0, -1, fx->be, &err) != RP_OK) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    if (rp_st_open(&fx->gold, fx->golden, &err) != RP_OK) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    const rp_st_tensor *tok = rp_st_find(&fx->gold, "tokens");
    if (!tok || tok->dtype != RP_DTYPE_I32) return -1;
    fx->T = (int)tok->numel;
    fx->tokens = malloc(tok->nbytes);
    memcpy(fx->tokens, tok->data, tok->nbytes);
    fx->logits_ref = golden_read(&fx->gold, "logits", NULL);
    fx->V = fx->model.cfg.vocab_size;
    fx->L = fx->model.cfg.n_layer;
    fx->C = fx->model.cfg.n_embd;
    fx->H = fx->model.cfg.n_head;
    *state_ptr = fx;
    return 0;
}

static int setup_tiny(void **s) { return fixture_setup(s, "tiny_L2_C128_V256_s1", 0); }
static int setup_small(void **s) { return fixture_setup(s, "small_L4_C256_V1024_s2", 1); }

static int fixture_teardown(void **state_ptr) {
    fixture *fx = *state_ptr;
    if (fx->be) {
        rp_model_free(&fx->model);
        rp_st_close(&fx->gold);
        rp_cpu_backend_destroy(fx->be);
    }
    free(fx->tokens);
    free(fx->logits_ref);
    free(fx);
    return 0;
}

static fixture *get_fixture(void **state_ptr) {
    fixture *fx = *state_ptr;
    if (!fx->be) skip();
    return fx;
}

/* Runs a ragged batch through the whole model; logits [rows, V] (ALL). */
static void run_batch(fixture *fx, rp_state *st, int n_seq, const int *seq_len,
                      const int *slot, const int32_t *tokens, float *logits) {
    int row_begin[64];
    rp_batch batch;
    rp_batch_init(&batch, n_seq, seq_len, slot, row_begin);
    rp_workspace ws;
    rp_error err;
    assert_int_equal(rp_workspace_alloc(&ws, &fx->model.cfg, batch.n_rows, fx->be, &err), RP_OK);
    rp_status rc = rp_model_forward(&fx->model, &ws, tokens, &batch, st, RP_LOGITS_ALL, logits,
                                    &err);
    if (rc != RP_OK) fail_msg("%s", err.msg);
    rp_workspace_free(&ws, fx->be);
}

/* Compares one slot's state with golden "<prefix>.att_x_prev/.wkv/.ffn_x_prev". */
static void assert_state_matches(fixture *fx, const rp_state *st, int slot, const char *prefix) {
    char name[128];
    const int C = fx->C, HNN = fx->H * 64 * 64;
    snprintf(name, sizeof name, "%s.att_x_prev", prefix);
    float *att = golden_read(&fx->gold, name, NULL);
    snprintf(name, sizeof name, "%s.ffn_x_prev", prefix);
    float *ffn = golden_read(&fx->gold, name, NULL);
    snprintf(name, sizeof name, "%s.wkv", prefix);
    float *wkv = golden_read(&fx->gold, name, NULL);
    for (int l = 0; l < fx->L; l++) {
        double e_att = golden_rel_err(rp_state_att_x_prev(st, slot, l), att + (size_t)l * C, C);
        double e_ffn = golden_rel_err(rp_state_ffn_x_prev(st, slot, l), ffn + (size_t)l * C, C);
        double e_wkv = golden_rel_err(rp_state_wkv(st, slot, l), wkv + (size_t)l * HNN, HNN);
        if (e_att > STATE_TOL || e_ffn > STATE_TOL || e_wkv > STATE_TOL)
            fail_msg("%s %s layer %d: relative error att %.3g ffn %.3g wkv %.3g", fx->name,
                     prefix, l, e_att, e_ffn, e_wkv);
    }
    free(att);
    free(ffn);
    free(wkv);
}

static void load_state(fixture *fx, rp_state *st, int slot, const char *prefix) {
    char name[128];
    const int C = fx->C, HNN = fx->H * 64 * 64;
    snprintf(name, sizeof name, "%s.att_x_prev", prefix);
    float *att = golden_read(&fx->gold, name, NULL);
    snprintf(name, sizeof name, "%s.ffn_x_prev", prefix);
    float *ffn = golden_read(&fx->gold, name, NULL);
    snprintf(name, sizeof name, "%s.wkv", prefix);
    float *wkv = golden_read(&fx->gold, name, NULL);
    for (int l = 0; l < fx->L; l++) {
        memcpy(rp_state_att_x_prev(st, slot, l), att + (size_t)l * C, C * sizeof(float));
        memcpy(rp_state_ffn_x_prev(st, slot, l), ffn + (size_t)l * C, C * sizeof(float));
        memcpy(rp_state_wkv(st, slot, l), wkv + (size_t)l * HNN, HNN * sizeof(float));
    }
    free(att);
    free(ffn);
    free(wkv);
}

static void assert_logits_match(fixture *fx, const float *got, int first_row, int n_rows,
                                const char *what) {
    const float *ref = fx->logits_ref + (size_t)first_row * fx->V;
    double e = golden_rel_err(got, ref, (size_t)n_rows * fx->V);
    if (e > LOGIT_TOL)
        fail_msg("%s %s: logits relative error %.3g > %.1g", fx->name, what, e, LOGIT_TOL);
    for (int t = 0; t < n_rows; t++)
        assert_int_equal(golden_argmax(got + (size_t)t * fx->V, fx->V),
                         golden_argmax(ref + (size_t)t * fx->V, fx->V));
}

static rp_state new_state(fixture *fx, int n_slots) {
    rp_state st;
    rp_error err;
    assert_int_equal(rp_state_alloc_host(&st, &fx->model.cfg, 0, fx->L, n_slots, &err), RP_OK);
    return st;
}

static void test_config_comes_from_tensor_shapes(void **s) {
    fixture *fx = get_fixture(s);
    char json_name[256];
    snprintf(json_name, sizeof json_name, "%s", fx->name);
    const rp_config *c = &fx->model.cfg;
    if (strcmp(fx->name, "tiny_L2_C128_V256_s1") == 0) {
        assert_int_equal(c->n_layer, 2);
        assert_int_equal(c->n_embd, 128);
        assert_int_equal(c->vocab_size, 256);
        assert_int_equal(c->dim_ffn, 512);
        assert_int_equal(c->d_decay, 16);
        assert_int_equal(c->d_iclr, 24);
        assert_int_equal(c->d_value, 8);
        assert_int_equal(c->d_gate, 32);
    } else {
        assert_int_equal(c->n_layer, 4);
        assert_int_equal(c->n_embd, 256);
        assert_int_equal(c->vocab_size, 1024);
        assert_int_equal(c->d_gate, 64);
    }
    assert_int_equal(c->n_head * 64, c->n_embd);
}

static void test_sequence_mode_matches_reference(void **s) {
    fixture *fx = get_fixture(s);
    rp_state st = new_state(fx, 1);
    float *logits = malloc((size_t)fx->T * fx->V * sizeof(float));
    int len = fx->T, slot = 0;
    run_batch(fx, &st, 1, &len, &slot, fx->tokens, logits);
    assert_logits_match(fx, logits, 0, fx->T, "sequence mode");
    assert_state_matches(fx, &st, 0, "state");
    free(logits);
    rp_state_free_host(&st);
}

static void test_step_mode_matches_reference(void **s) {
    fixture *fx = get_fixture(s);
    rp_state st = new_state(fx, 1);
    float *logits = malloc((size_t)fx->T * fx->V * sizeof(float));
    int one = 1, slot = 0;
    for (int t = 0; t < fx->T; t++)
        run_batch(fx, &st, 1, &one, &slot, fx->tokens + t, logits + (size_t)t * fx->V);
    assert_logits_match(fx, logits, 0, fx->T, "step mode");
    assert_state_matches(fx, &st, 0, "state");
    free(logits);
    rp_state_free_host(&st);
}

static void test_sequence_prefix_then_steps_equals_reference(void **s) {
    fixture *fx = get_fixture(s);
    rp_state st = new_state(fx, 1);
    float *logits = malloc((size_t)fx->T * fx->V * sizeof(float));
    int half = fx->T / 2, one = 1, slot = 0;
    run_batch(fx, &st, 1, &half, &slot, fx->tokens, logits);
    assert_state_matches(fx, &st, 0, "mid_state");
    for (int t = half; t < fx->T; t++)
        run_batch(fx, &st, 1, &one, &slot, fx->tokens + t, logits + (size_t)t * fx->V);
    assert_logits_match(fx, logits, 0, fx->T, "prefix + steps");
    assert_state_matches(fx, &st, 0, "state");
    free(logits);
    rp_state_free_host(&st);
}

static void test_continuing_from_reference_mid_state(void **s) {
    fixture *fx = get_fixture(s);
    rp_state st = new_state(fx, 1);
    load_state(fx, &st, 0, "mid_state");
    int half = fx->T / 2, rest = fx->T - half, slot = 0;
    float *logits = malloc((size_t)rest * fx->V * sizeof(float));
    run_batch(fx, &st, 1, &rest, &slot, fx->tokens + half, logits);
    assert_logits_match(fx, logits, half, rest, "from mid_state");
    assert_state_matches(fx, &st, 0, "state");
    free(logits);
    rp_state_free_host(&st);
}

/* Three sequences of different lengths in one call, in permuted state slots:
 * each one's logits equal the reference rows of its prefix. */
static void test_ragged_batch_matches_reference(void **s) {
    fixture *fx = get_fixture(s);
    const int n_seq = 3;
    int len[3] = {fx->T, fx->T / 2, 3};
    int slot[3] = {2, 0, 1};
    rp_state st = new_state(fx, 3);
    int rows = len[0] + len[1] + len[2];
    int32_t *tokens = malloc((size_t)rows * sizeof(int32_t));
    int r = 0;
    for (int q = 0; q < n_seq; q++)
        for (int t = 0; t < len[q]; t++) tokens[r++] = fx->tokens[t];
    float *logits = malloc((size_t)rows * fx->V * sizeof(float));
    run_batch(fx, &st, n_seq, len, slot, tokens, logits);
    r = 0;
    for (int q = 0; q < n_seq; q++) {
        assert_logits_match(fx, logits + (size_t)r * fx->V, 0, len[q], "ragged batch");
        r += len[q];
    }
    assert_state_matches(fx, &st, 2, "state");
    assert_state_matches(fx, &st, 0, "mid_state");
    free(tokens);
    free(logits);
    rp_state_free_host(&st);
}

/* Step mode with a batch: sequence 0 runs the reference tokens while its
 * neighbours run other tokens from other states; sequence 0 must not notice. */
static void test_sequence_independent_of_batch_neighbours(void **s) {
    fixture *fx = get_fixture(s);
    const int B = 4;
    rp_state alone = new_state(fx, 1), batched = new_state(fx, B);
    /* Give the neighbours a non-zero history first. */
    load_state(fx, &batched, 1, "mid_state");
    load_state(fx, &batched, 3, "state");
    float *logits_alone = malloc((size_t)fx->V * sizeof(float));
    float *logits_batch = malloc((size_t)B * fx->V * sizeof(float));
    int one[4] = {1, 1, 1, 1}, slot0 = 0, slots[4] = {0, 1, 2, 3};
    for (int t = 0; t < fx->T; t++) {
        run_batch(fx, &alone, 1, one, &slot0, fx->tokens + t, logits_alone);
        int32_t tok[4] = {fx->tokens[t], (t * 7 + 3) % fx->V, (t * 13 + 1) % fx->V,
                          fx->tokens[fx->T - 1 - t]};
        run_batch(fx, &batched, B, one, slots, tok, logits_batch);
        double e = golden_rel_err(logits_batch, logits_alone, fx->V);
        if (e > 1e-6) fail_msg("step %d: batched logits differ from alone by %.3g", t, e);
        assert_int_equal(golden_argmax(logits_batch, fx->V), golden_argmax(logits_alone, fx->V));
    }
    double e = golden_rel_err(batched.data, alone.data, alone.floats_per_slot);
    if (e > 1e-6) fail_msg("batched state differs from alone by %.3g", e);
    free(logits_alone);
    free(logits_batch);
    rp_state_free_host(&alone);
    rp_state_free_host(&batched);
}

/* Bit for bit (memcmp), with the first differing float in the message. */
static void assert_same_bits(const float *got, const float *want, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0)
            fail_msg("%s: float %zu is %.9g, alone in one call %.9g", what, i, got[i], want[i]);
}

/* Inference prefill rows are exact rows (backend.h, RP_ROWS_PREFILL): a
 * prompt read in one call, in chunks, beside other prompts (from other
 * states) or token by token gives every row's logits and the final state
 * the same bits, which is what lets the engine prefill several prompts in
 * one pass and `generate`, `serve` and a prefix-cache resume split a prompt
 * differently. */
static void test_prefill_rows_independent_of_chunks_and_neighbours(void **s) {
    fixture *fx = get_fixture(s);
    const int T = fx->T, V = fx->V;
    assert_true(T >= 4);
    rp_state alone = new_state(fx, 1), chunked = new_state(fx, 1), steps = new_state(fx, 1);
    rp_state batched = new_state(fx, 3);
    float *ref = malloc((size_t)T * V * sizeof(float));
    float *got = malloc((size_t)3 * T * V * sizeof(float));
    int slot0 = 0, one = 1;
    run_batch(fx, &alone, 1, &T, &slot0, fx->tokens, ref);

    const int chunk[3] = {T / 3, 1, T - T / 3 - 1};
    for (int c = 0, pos = 0; c < 3; pos += chunk[c++])
        run_batch(fx, &chunked, 1, &chunk[c], &slot0, fx->tokens + pos, got + (size_t)pos * V);
    assert_same_bits(got, ref, (size_t)T * V, "chunked prompt logits");
    assert_same_bits(chunked.data, alone.data, alone.floats_per_slot, "chunked prompt state");

    for (int t = 0; t < T; t++)
        run_batch(fx, &steps, 1, &one, &slot0, fx->tokens + t, got + (size_t)t * V);
    assert_same_bits(got, ref, (size_t)T * V, "token-by-token logits");
    assert_same_bits(steps.data, alone.data, alone.floats_per_slot, "token-by-token state");

    /* The prompt second of three, in slot 1; neighbours from other states. */
    load_state(fx, &batched, 0, "mid_state");
    load_state(fx, &batched, 2, "state");
    int len[3] = {5, T, T / 2}, slot[3] = {2, 1, 0};
    int32_t *tokens = malloc((size_t)(5 + T + T / 2) * sizeof(int32_t));
    for (int t = 0; t < 5; t++) tokens[t] = (t * 7 + 3) % V;
    memcpy(tokens + 5, fx->tokens, (size_t)T * sizeof(int32_t));
    for (int t = 0; t < T / 2; t++) tokens[5 + T + t] = fx->tokens[T - 1 - t];
    run_batch(fx, &batched, 3, len, slot, tokens, got);
    assert_same_bits(got + (size_t)5 * V, ref, (size_t)T * V, "batched prompt logits");
    assert_same_bits(batched.data + batched.floats_per_slot, alone.data, alone.floats_per_slot,
                     "batched prompt state");
    free(tokens);
    free(ref);
    free(got);
    rp_state_free_host(&alone);
    rp_state_free_host(&chunked);
    rp_state_free_host(&steps);
    rp_state_free_host(&batched);
}

static void test_out_of_range_token_is_rejected(void **s) {
    fixture *fx = get_fixture(s);
    rp_state st = new_state(fx, 1);
    int32_t bad[2] = {1, fx->V};
    int len = 2, slot = 0, row_begin[1];
    rp_batch batch;
    rp_batch_init(&batch, 1, &len, &slot, row_begin);
    rp_workspace ws;
    rp_error err;
    assert_int_equal(rp_workspace_alloc(&ws, &fx->model.cfg, 2, fx->be, &err), RP_OK);
    float *logits = malloc(2 * (size_t)fx->V * sizeof(float));
    assert_int_equal(rp_model_forward(&fx->model, &ws, bad, &batch, &st, RP_LOGITS_ALL, logits, &err),
                     RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "outside the vocabulary"));
    free(logits);
    rp_workspace_free(&ws, fx->be);
    rp_state_free_host(&st);
}

#define MODEL_TESTS(setup)                                                                    \
    cmocka_unit_test_prestate_setup_teardown(test_config_comes_from_tensor_shapes, setup,    \
                                             fixture_teardown, NULL),                         \
    cmocka_unit_test_prestate_setup_teardown(test_sequence_mode_matches_reference, setup,    \
                                             fixture_teardown, NULL),                         \
    cmocka_unit_test_prestate_setup_teardown(test_step_mode_matches_reference, setup,        \
                                             fixture_teardown, NULL),                         \
    cmocka_unit_test_prestate_setup_teardown(test_sequence_prefix_then_steps_equals_reference, \
                                             setup, fixture_teardown, NULL),                  \
    cmocka_unit_test_prestate_setup_teardown(test_continuing_from_reference_mid_state, setup, \
                                             fixture_teardown, NULL),                         \
    cmocka_unit_test_prestate_setup_teardown(test_ragged_batch_matches_reference, setup,     \
                                             fixture_teardown, NULL),                         \
    cmocka_unit_test_prestate_setup_teardown(test_sequence_independent_of_batch_neighbours,  \
                                             setup, fixture_teardown, NULL),                  \
    cmocka_unit_test_prestate_setup_teardown(                                                \
        test_prefill_rows_independent_of_chunks_and_neighbours, setup, fixture_teardown, NULL), \
    cmocka_unit_test_prestate_setup_teardown(test_out_of_range_token_is_rejected, setup,     \
                                             fixture_teardown, NULL)

int main(void) {
    const struct CMUnitTest tests[] = {MODEL_TESTS(setup_tiny), MODEL_TESTS(setup_small)};
    return cmocka_run_group_tests_name("model_golden", tests, NULL, NULL);
}
