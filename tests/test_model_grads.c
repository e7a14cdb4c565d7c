/* Whole-model gradients against the official reference (float64 autograd of
 * RWKV-LM's rwkv_v7_demo.py / _rnn.py): mean next-token cross-entropy from a
 * zero state, and from a given mid-sequence state including the gradient
 * w.r.t. that initial state. Per tensor: ||g - ref|| / ||ref|| <= 1e-4 and
 * max |g - ref| <= 1e-4 max |ref| (+ a 1e-8 floor for tensors that are 0).
 * Also: the step's fill_zero / add round trips stay within their budget, and
 * the head's training workspace holds one logit chunk, not [rows, V]; the
 * fused training mix (shift_mix) gives the bits of the unfused ops. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "cpu/cpu_backend.h"
#include "golden_util.h"
#include "model/backward.h"

#define GRAD_TOL 1e-4

typedef struct {
    char weights[1024], golden[1024], grads[1024], grads_mid[1024];
    int available;
} paths;

static int find_paths(paths *p, const char *name, int shared_only) {
    char w[256], g[256], d[256], dm[256];
    snprintf(w, sizeof w, "%s.weights.safetensors", name);
    snprintf(g, sizeof g, "%s.golden.safetensors", name);
    snprintf(d, sizeof d, "%s.grads.safetensors", name);
    snprintf(dm, sizeof dm, "%s.grads_midstate.safetensors", name);
    if (shared_only)
        return golden_shared_path(p->weights, sizeof p->weights, w) &&
               golden_shared_path(p->golden, sizeof p->golden, g) &&
               golden_shared_path(p->grads, sizeof p->grads, d) &&
               golden_shared_path(p->grads_mid, sizeof p->grads_mid, dm);
    golden_data_path(p->weights, sizeof p->weights, w);
    golden_data_path(p->golden, sizeof p->golden, g);
    golden_data_path(p->grads, sizeof p->grads, d);
    golden_data_path(p->grads_mid, sizeof p->grads_mid, dm);
    return 1;
}

/* Norm-wise and max-wise relative errors of one tensor. */
static void compare_tensor(const char *name, const float *got, const float *ref, size_t n) {
    double diff2 = 0, ref2 = 0, max_diff = 0, max_ref = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - (double)ref[i];
        diff2 += d * d;
        ref2 += (double)ref[i] * ref[i];
        if (!(fabs(d) <= max_diff)) max_diff = fabs(d);
        if (fabs(ref[i]) > max_ref) max_ref = fabs(ref[i]);
    }
    double norm_err = ref2 > 0 ? sqrt(diff2 / ref2) : sqrt(diff2);
    int ok = max_diff <= GRAD_TOL * max_ref + 1e-8 && (ref2 == 0 || norm_err <= GRAD_TOL);
    if (!ok)
        fail_msg("gradient of %s: norm-wise relative error %.3g, max |diff| %.3g (max |ref| %.3g)",
                 name, norm_err, max_diff, max_ref);
}

/* fill_zero and add calls (and bytes) of the backend during the training
 * step: each is a round trip through memory that a first write with beta = 0
 * makes unnecessary (backend.h "first gradient writes"). */
static struct {
    void (*fill_zero)(rp_backend *be, void *dst, size_t bytes);
    void (*add)(rp_backend *be, float *y, const float *x, size_t n);
    size_t zero_calls, zero_bytes, add_calls, add_bytes;
    int rows; /* of the step */
} traffic;

static void counting_fill_zero(rp_backend *be, void *dst, size_t bytes) {
    traffic.zero_calls++;
    traffic.zero_bytes += bytes;
    traffic.fill_zero(be, dst, bytes);
}

static void counting_add(rp_backend *be, float *y, const float *x, size_t n) {
    traffic.add_calls++;
    traffic.add_bytes += n * sizeof(float);
    traffic.add(be, y, x, n);
}

/* Runs the training step on tokens[first .. T-1] -> targets tokens[first+1 .. T]
 * from `state` and compares every parameter gradient with `grads_path`. */
static void check_gradients(const paths *p, int from_mid_state) {
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(0, &err);
    assert_non_null(be);
    rp_model model, grads;
    if (rp_model_load(&model, p->weights, 0, -1, be, &err) != RP_OK) fail_msg("%s", err.msg);
    const rp_config *cfg = &model.cfg;
    assert_int_equal(rp_model_alloc(&grads, cfg, 0, cfg->n_layer, 1, 1, be, &err), RP_OK);
    rp_model_zero(&grads);

    rp_st_file gold, ref;
    assert_int_equal(rp_st_open(&gold, p->golden, &err), RP_OK);
    assert_int_equal(rp_st_open(&ref, from_mid_state ? p->grads_mid : p->grads, &err), RP_OK);
    const rp_st_tensor *tok = rp_st_find(&gold, "tokens");
    assert_non_null(tok);
    const int T = (int)tok->numel;
    const int32_t *tokens = tok->data;
    const int first = from_mid_state ? T / 2 : 0;
    const int n = T - 1 - first;
    int32_t *inputs = malloc((size_t)n * sizeof *inputs), *targets = malloc((size_t)n * sizeof *targets);
    memcpy(inputs, tokens + first, (size_t)n * sizeof *inputs);
    memcpy(targets, tokens + first + 1, (size_t)n * sizeof *targets);

    const int L = cfg->n_layer, C = cfg->n_embd, HNN = cfg->n_head * 64 * 64;
    rp_state state, dstate;
    assert_int_equal(rp_state_alloc_host(&state, cfg, 0, L, 1, &err), RP_OK);
    assert_int_equal(rp_state_alloc_host(&dstate, cfg, 0, L, 1, &err), RP_OK);
    if (from_mid_state) {
        float *att = golden_read(&ref, "init_state.att_x_prev", NULL);
        float *ffn = golden_read(&ref, "init_state.ffn_x_prev", NULL);
        float *wkv = golden_read(&ref, "init_state.wkv", NULL);
        for (int l = 0; l < L; l++) {
            memcpy(rp_state_att_x_prev(&state, 0, l), att + (size_t)l * C, C * sizeof(float));
            memcpy(rp_state_ffn_x_prev(&state, 0, l), ffn + (size_t)l * C, C * sizeof(float));
            memcpy(rp_state_wkv(&state, 0, l), wkv + (size_t)l * HNN, HNN * sizeof(float));
        }
        free(att);
        free(ffn);
        free(wkv);
    }

    rp_backward_workspace tw;
    assert_int_equal(rp_backward_workspace_alloc(&tw, &model, n, 1, &err), RP_OK);
    int len = n, slot = 0, row_begin;
    rp_batch batch;
    rp_batch_init(&batch, 1, &len, &slot, &row_begin);
    double loss_sum;
    int n_targets;
    traffic.fill_zero = be->fill_zero;
    traffic.add = be->add;
    traffic.zero_calls = traffic.zero_bytes = traffic.add_calls = traffic.add_bytes = 0;
    traffic.rows = n;
    be->fill_zero = counting_fill_zero;
    be->add = counting_add;
    rp_status st = rp_model_train_step(&model, &grads, &tw, inputs, targets, &batch, &state,
                                       &dstate, 1.0f / n, 0.0f, &loss_sum, &n_targets, &err);
    be->fill_zero = traffic.fill_zero;
    be->add = traffic.add;
    if (st != RP_OK) fail_msg("%s", err.msg);
    assert_int_equal(n_targets, n);
    float *ref_loss = golden_read(&ref, "loss", NULL);
    double loss = loss_sum / n;
    if (fabs(loss - ref_loss[0]) > 1e-5 * fabs(ref_loss[0]))
        fail_msg("loss %.8f, reference %.8f", loss, ref_loss[0]);
    free(ref_loss);

    /* Every parameter, by official name. */
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(cfg, table);
    rp_global_layout(cfg, gtable, NULL, NULL);
    char name[256];
    for (int i = 0; i < RP_GLOBAL_N_TENSORS; i++) {
        float *got = *rp_tensor_field(&grads.global, &gtable[i]);
        float *want = golden_read(&ref, gtable[i].suffix, NULL);
        compare_tensor(gtable[i].suffix, got, want, (size_t)gtable[i].numel);
        free(want);
    }
    for (int l = 0; l < L; l++)
        for (int i = 0; i < RP_LAYER_N_TENSORS; i++) {
            rp_tensor_name(name, sizeof name, &table[i], l);
            float *got = *rp_tensor_field(&grads.layers[l], &table[i]);
            float *want = golden_read(&ref, name, NULL);
            compare_tensor(name, got, want, (size_t)table[i].numel);
            free(want);
        }
    if (from_mid_state) {
        float *att = golden_read(&ref, "grad_init_state.att_x_prev", NULL);
        float *ffn = golden_read(&ref, "grad_init_state.ffn_x_prev", NULL);
        float *wkv = golden_read(&ref, "grad_init_state.wkv", NULL);
        for (int l = 0; l < L; l++) {
            snprintf(name, sizeof name, "grad_init_state.att_x_prev[%d]", l);
            compare_tensor(name, rp_state_att_x_prev(&dstate, 0, l), att + (size_t)l * C, C);
            snprintf(name, sizeof name, "grad_init_state.ffn_x_prev[%d]", l);
            compare_tensor(name, rp_state_ffn_x_prev(&dstate, 0, l), ffn + (size_t)l * C, C);
            snprintf(name, sizeof name, "grad_init_state.wkv[%d]", l);
            compare_tensor(name, rp_state_wkv(&dstate, 0, l), wkv + (size_t)l * HNN, HNN);
        }
        free(att);
        free(ffn);
        free(wkv);
    }
    rp_backward_workspace_free(&tw, be);
    rp_state_free_host(&state);
    rp_state_free_host(&dstate);
    free(inputs);
    free(targets);
    rp_st_close(&gold);
    rp_st_close(&ref);
    rp_model_free(&grads);
    rp_model_free(&model);
    rp_cpu_backend_destroy(be);
}

static void test_tiny_gradients_match_reference(void **s) {
    paths p;
    find_paths(&p, "tiny_L2_C128_V256_s1", 0);
    check_gradients(&p, 0);
}

static void test_tiny_gradients_from_mid_state_match_reference(void **s) {
    paths p;
    find_paths(&p, "tiny_L2_C128_V256_s1", 0);
    check_gradients(&p, 1);
}

/* The tiny model (L=2, C=128) on 1 sequence of R rows: the only round trips
 * left are d(v_first) zeroed once at the head (it collects from every
 * layer) and layer 0's d(v_first) add: wkv7_backward_beta adds its dr, dk,
 * dv onto bonus_gate's (3 adds per layer before). Before the first writes
 * took beta = 0 it was 44 fill_zero calls (44 R C floats). */
static void test_tiny_training_step_has_no_zero_fill_round_trips(void **s) {
    (void)s;
    paths p;
    find_paths(&p, "tiny_L2_C128_V256_s1", 0);
    check_gradients(&p, 1);
    const size_t L = 2, C = 128;
    const size_t row_bytes = C * sizeof(float), R = (size_t)traffic.rows;
    printf("training step, %zu rows: %zu fill_zero (%zu bytes), %zu add (%zu bytes)\n", R,
           traffic.zero_calls, traffic.zero_bytes, traffic.add_calls, traffic.add_bytes);
    if (traffic.zero_calls > 1 || traffic.zero_bytes > R * row_bytes)
        fail_msg("%zu fill_zero calls (%zu bytes) in a training step: at most 1 (%zu bytes)",
                 traffic.zero_calls, traffic.zero_bytes, R * row_bytes);
    if (traffic.add_calls > 1)
        fail_msg("%zu add calls in a training step (L = %zu): at most 1", traffic.add_calls, L);
}

static size_t alloc_bytes;
static void *(*real_alloc)(rp_backend *be, size_t bytes);
static void *counting_alloc(rp_backend *be, size_t bytes) {
    alloc_bytes += bytes;
    return real_alloc(be, bytes);
}

/* The training workspace of a head stage with the 0.1B vocabulary (V =
 * 65536; L1 C64 keeps the rest small) for 4096 rows holds no [rows, V]
 * logits (1 GiB): the fused head needs one chunk of rp_head_ce_chunk_rows
 * rows (256 MiB). */
static void test_head_workspace_holds_one_logit_chunk_not_rows_by_vocab(void **s) {
    (void)s;
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(1, &err);
    assert_non_null(be);
    rp_config c;
    assert_int_equal(rp_config_builtin(&c, "L1-C64-V65536", 0, &err), RP_OK);
    rp_model m;
    assert_int_equal(rp_model_alloc(&m, &c, c.n_layer - 1, c.n_layer, 0, 1, be, &err), RP_OK);
    const int R = 4096;
    real_alloc = be->alloc;
    be->alloc = counting_alloc;
    alloc_bytes = 0;
    rp_backward_workspace tw;
    rp_status st = rp_backward_workspace_alloc(&tw, &m, R, 8, &err);
    be->alloc = real_alloc;
    assert_int_equal(st, RP_OK);
    const size_t logits = (size_t)R * c.vocab_size * sizeof(float);
    const size_t chunk = rp_head_ce_scratch_floats(rp_head_ce_chunk_rows(R, c.vocab_size),
                                                   c.vocab_size) * sizeof(float);
    printf("workspace %zu MiB for %d rows (the [R, V] logits alone: %zu MiB, one chunk %zu MiB)\n",
           alloc_bytes >> 20, R, logits >> 20, chunk >> 20);
    assert_int_equal(tw.head_chunk_rows, 1024);
    if (alloc_bytes >= logits)
        fail_msg("training workspace of %zu bytes: no smaller than [%d, %d] logits", alloc_bytes,
                 R, c.vocab_size);
    rp_backward_workspace_free(&tw, be);
    rp_model_free(&m);
    rp_cpu_backend_destroy(be);
}

/* One training step of the tiny model on two sequences (slots 1 and 0) from
 * a non-zero state and d(final state); fused 0 runs with the backend's
 * shift_mix / shift_mix_backward removed (the unfused ops). Returns the
 * gradients, d(initial state) and final state, concatenated (malloc'd). */
static float *fused_mix_step(const paths *p, int fused, size_t *n_out) {
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(0, &err);
    assert_non_null(be);
    assert_non_null(be->shift_mix);
    if (!fused) be->shift_mix = NULL, be->shift_mix_backward = NULL;
    rp_model model, grads;
    if (rp_model_load(&model, p->weights, 0, -1, be, &err) != RP_OK) fail_msg("%s", err.msg);
    const rp_config *cfg = &model.cfg;
    const int L = cfg->n_layer;
    assert_int_equal(rp_model_alloc(&grads, cfg, 0, L, 1, 1, be, &err), RP_OK);
    rp_model_zero(&grads);
    int32_t tokens[40];
    for (int i = 0; i < 40; i++) tokens[i] = (i * 37 + 11) % cfg->vocab_size;
    int len[2] = {23, 16}, slot[2] = {1, 0}, row_begin[2];
    rp_batch batch;
    rp_batch_init(&batch, 2, len, slot, row_begin);
    rp_state state, dstate;
    assert_int_equal(rp_state_alloc_host(&state, cfg, 0, L, 2, &err), RP_OK);
    assert_int_equal(rp_state_alloc_host(&dstate, cfg, 0, L, 2, &err), RP_OK);
    const size_t sf = state.floats_per_slot * 2;
    for (size_t i = 0; i < sf; i++) {
        state.data[i] = 0.01f * (float)((i * 7919) % 201) - 1.0f;
        dstate.data[i] = 1e-3f * (float)((i * 104729) % 97) - 0.05f;
    }
    rp_backward_workspace tw;
    assert_int_equal(rp_backward_workspace_alloc(&tw, &model, 39, 2, &err), RP_OK);
    assert_int_equal(tw.mix[0] != NULL, fused);
    double loss;
    if (rp_model_train_step(&model, &grads, &tw, tokens, tokens + 1, &batch, &state, &dstate,
                            1.0f / 39, 0.0f, &loss, NULL, &err) != RP_OK)
        fail_msg("%s", err.msg);
    const size_t n = (size_t)L * grads.layer_floats + grads.embed_floats + grads.head_floats +
                     2 * sf;
    float *out = malloc(n * sizeof *out), *q = out;
    assert_non_null(out);
    for (int l = 0; l < L; l++, q += grads.layer_floats)
        memcpy(q, grads.layer_flat[l], grads.layer_floats * sizeof *q);
    memcpy(q, grads.embed_flat, grads.embed_floats * sizeof *q);
    q += grads.embed_floats;
    memcpy(q, grads.head_flat, grads.head_floats * sizeof *q);
    q += grads.head_floats;
    memcpy(q, dstate.data, sf * sizeof *q);
    memcpy(q + sf, state.data, sf * sizeof *q);
    *n_out = n;
    rp_backward_workspace_free(&tw, be);
    rp_state_free_host(&state);
    rp_state_free_host(&dstate);
    rp_model_free(&grads);
    rp_model_free(&model);
    rp_cpu_backend_destroy(be);
    return out;
}

/* The fused training mix (backend.h shift_mix, shift_mix_backward) gives the
 * bits of the unfused ops: every gradient, d(initial state), final state. */
static void test_fused_mix_gives_the_unfused_bits(void **s) {
    (void)s;
    paths p;
    find_paths(&p, "tiny_L2_C128_V256_s1", 0);
    size_t n0, n1;
    float *plain = fused_mix_step(&p, 0, &n0), *fused = fused_mix_step(&p, 1, &n1);
    assert_int_equal(n0, n1);
    size_t diff = 0, first = n0;
    for (size_t i = 0; i < n0; i++)
        if (memcmp(&plain[i], &fused[i], sizeof(float)) != 0 && diff++ == 0) first = i;
    if (diff)
        fail_msg("fused mix: %zu of %zu floats differ from the unfused ops (first at %zu: %.9g "
                 "vs %.9g)", diff, n0, first, fused[first], plain[first]);
    free(plain);
    free(fused);
}

static void test_small_gradients_match_reference(void **s) {
    paths p;
    if (!find_paths(&p, "small_L4_C256_V1024_s2", 1)) skip();
    check_gradients(&p, 0);
}

static void test_small_gradients_from_mid_state_match_reference(void **s) {
    paths p;
    if (!find_paths(&p, "small_L4_C256_V1024_s2", 1)) skip();
    check_gradients(&p, 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_gradients_match_reference),
        cmocka_unit_test(test_tiny_gradients_from_mid_state_match_reference),
        cmocka_unit_test(test_tiny_training_step_has_no_zero_fill_round_trips),
        cmocka_unit_test(test_head_workspace_holds_one_logit_chunk_not_rows_by_vocab),
        cmocka_unit_test(test_fused_mix_gives_the_unfused_bits),
        cmocka_unit_test(test_small_gradients_match_reference),
        cmocka_unit_test(test_small_gradients_from_mid_state_match_reference),
    };
    return cmocka_run_group_tests_name("model_grads", tests, NULL, NULL);
}
