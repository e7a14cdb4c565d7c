/* LoRA adapters (model/lora.h) on the tiny model: the adapters' gradients
 * against central differences of the whole model's loss (per tensor, along
 * the gradient and along a random direction), with a scale alpha/r of 3 so
 * that a backward without it fails; W' equals W x + s B (A x) and the base
 * stays bit for bit; an adapter file merges into a fresh model to the same
 * weights and logits; a file for another shape is refused by name. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/rng.h"
#include "cpu/cpu_backend.h"
#include "golden_util.h"
#include "model/backward.h"
#include "model/lora.h"

#define T_TOKENS 24
#define RANK 2
#define ALPHA 6.0f /* s = 3 */

typedef struct {
    rp_backend *be;
    rp_model model, grads;
    rp_backward_workspace tw;
    rp_state state;
    int32_t inputs[T_TOKENS], targets[T_TOKENS];
    int seq_len, slot, row_begin;
    rp_batch batch;
} fixture;

static void fixture_open(fixture *f) {
    rp_error err;
    char path[1024];
    golden_data_path(path, sizeof path, "tiny_L2_C128_V256_s1.weights.safetensors");
    f->be = rp_cpu_backend_create(1, &err);
    assert_non_null(f->be);
    if (rp_model_load(&f->model, path, 0, -1, f->be, &err) != RP_OK) fail_msg("%s", err.msg);
    const rp_config *c = &f->model.cfg;
    assert_int_equal(rp_model_alloc(&f->grads, c, 0, c->n_layer, 1, 1, f->be, &err), RP_OK);
    assert_int_equal(rp_backward_workspace_alloc(&f->tw, &f->model, T_TOKENS, 1, &err), RP_OK);
    assert_int_equal(rp_state_alloc_host(&f->state, c, 0, c->n_layer, 1, &err), RP_OK);
    for (int i = 0; i < T_TOKENS; i++) {
        f->inputs[i] = (int32_t)(rp_rng_uniform(7, (uint64_t)i) * c->vocab_size);
        f->targets[i] = (int32_t)(rp_rng_uniform(8, (uint64_t)i) * c->vocab_size);
    }
    f->seq_len = T_TOKENS;
    f->slot = 0;
    rp_batch_init(&f->batch, 1, &f->seq_len, &f->slot, &f->row_begin);
}

static void fixture_close(fixture *f) {
    rp_state_free_host(&f->state);
    rp_backward_workspace_free(&f->tw, f->be);
    rp_model_free(&f->grads);
    rp_model_free(&f->model);
    rp_backend_destroy(f->be);
}

/* Mean cross-entropy of the fixed sequence from a zero state; the model
 * gradients (of that mean) land in f->grads. */
static double loss_and_grads(fixture *f) {
    rp_error err;
    rp_model_zero(&f->grads);
    memset(f->state.data, 0, f->state.floats_per_slot * sizeof(float));
    double sum = 0;
    int n = 0;
    if (rp_model_train_step(&f->model, &f->grads, &f->tw, f->inputs, f->targets, &f->batch,
                            &f->state, NULL, 1.0f / T_TOKENS, 0.0f, &sum, &n, &err) != RP_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(n, T_TOKENS);
    return sum / T_TOKENS;
}

/* Random B (B starts at zero, which would leave dA = 0 and test nothing). */
static void randomize_b(rp_lora *lo, float *host) {
    rp_lora_to_host(lo, host);
    size_t off = 0;
    for (int i = 0; i < lo->n; i++) {
        const rp_lora_adapter *a = &lo->ad[i];
        off += (size_t)RANK * a->K;
        for (size_t k = 0; k < (size_t)a->N * RANK; k++)
            host[off + k] = 0.05f * (2 * rp_rng_uniform(11, off + k) - 1);
        off += (size_t)a->N * RANK;
    }
    rp_lora_from_host(lo, host);
}

static void test_adapter_gradients(void **state) {
    (void)state;
    fixture f;
    fixture_open(&f);
    rp_lora lo;
    rp_error err;
    if (rp_lora_init(&lo, &f.model, RANK, ALPHA, (1u << RP_LORA_N_TARGETS) - 1, 5, &err) != RP_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(lo.n, 2 * RP_LORA_N_TARGETS);
    float *p0 = malloc(lo.floats * sizeof(float)), *p = malloc(lo.floats * sizeof(float));
    float *g = malloc(lo.floats * sizeof(float));
    randomize_b(&lo, p0);
    loss_and_grads(&f);
    rp_lora_grads(&lo, &f.grads);
    f.be->copy_to_host(f.be, g, lo.grads, lo.floats * sizeof(float));
    /* Per tensor (each A, each B): the directional derivative along its own
     * gradient and along a random +-1 direction, by central differences. */
    size_t off = 0;
    for (int i = 0; i < lo.n; i++) {
        const rp_lora_adapter *a = &lo.ad[i];
        for (int part = 0; part < 2; part++) {
            const size_t n = part == 0 ? (size_t)RANK * a->K : (size_t)a->N * RANK;
            for (int dir = 0; dir < 2; dir++) {
                double gnorm = 0, ana = 0, dnorm = 0;
                for (size_t k = 0; k < n; k++) gnorm += (double)g[off + k] * g[off + k];
                gnorm = sqrt(gnorm);
                assert_true(gnorm > 0);
                double d[2];
                const double h = 2e-3;
                for (int sgn = 0; sgn < 2; sgn++) {
                    memcpy(p, p0, lo.floats * sizeof(float));
                    ana = 0;
                    dnorm = 0;
                    for (size_t k = 0; k < n; k++) {
                        const double u = dir == 0 ? g[off + k] / gnorm
                                                  : (rp_rng_uniform(13, off + k) < 0.5f ? -1 : 1);
                        ana += u * g[off + k];
                        dnorm += u * u;
                        p[off + k] = (float)(p0[off + k] + (sgn ? -h : h) * u);
                    }
                    rp_lora_from_host(&lo, p);
                    d[sgn] = loss_and_grads(&f);
                }
                const double num = (d[0] - d[1]) / (2 * h);
                const double tol = 2e-2 * gnorm * sqrt(dnorm) + 1e-5;
                if (fabs(num - ana) > tol)
                    fail_msg("blocks.%d.%s.lora_%c, direction %s: central differences %.6g, "
                             "gradient %.6g (tolerance %.3g)", a->layer,
                             rp_lora_target_name(a->target), part ? 'B' : 'A',
                             dir ? "random" : "gradient", num, ana, tol);
            }
            off += n;
        }
    }
    rp_lora_free(&lo);
    free(p0);
    free(p);
    free(g);
    fixture_close(&f);
}

/* W' x = W x + s B (A x) for a random x, after a step; the base unchanged. */
static void test_merged_weight_and_frozen_base(void **state) {
    (void)state;
    fixture f;
    fixture_open(&f);
    const rp_config *c = &f.model.cfg;
    const size_t CC = (size_t)c->n_embd * c->n_embd;
    float *w_before = malloc(CC * sizeof(float));
    memcpy(w_before, f.model.layers[1].output, CC * sizeof(float));
    rp_lora lo;
    rp_error err;
    if (rp_lora_init(&lo, &f.model, RANK, ALPHA, RP_LORA_DEFAULT_TARGETS, 5, &err) != RP_OK)
        fail_msg("%s", err.msg);
    float *host = malloc(lo.floats * sizeof(float));
    randomize_b(&lo, host);
    loss_and_grads(&f);
    rp_lora_grads(&lo, &f.grads);
    rp_lora_step(&lo, 1e-2f, 0.9f, 0.99f, 1e-18f, 0.0f, 1.0f, 0);
    const rp_lora_adapter *a = NULL;
    for (int i = 0; i < lo.n; i++)
        if (lo.ad[i].layer == 1 && lo.ad[i].target == RP_LORA_ATT_OUTPUT) a = &lo.ad[i];
    assert_non_null(a);
    assert_memory_equal(a->base, w_before, CC * sizeof(float));
    const int C = c->n_embd;
    float x[128], y[128];
    assert_true(C <= 128);
    for (int k = 0; k < C; k++) x[k] = 2 * rp_rng_uniform(17, (uint64_t)k) - 1;
    f.be->matmul_linear(f.be, y, x, f.model.layers[1].output, 1, C, C, 0.0f);
    double ax[RANK] = {0};
    for (int j = 0; j < RANK; j++)
        for (int k = 0; k < C; k++) ax[j] += (double)a->A[(size_t)j * C + k] * x[k];
    double max_diff = 0, moved = 0;
    for (int n = 0; n < C; n++) {
        double wx = 0, bax = 0;
        for (int k = 0; k < C; k++) wx += (double)w_before[(size_t)n * C + k] * x[k];
        for (int j = 0; j < RANK; j++) bax += (double)a->B[(size_t)n * RANK + j] * ax[j];
        const double want = wx + (ALPHA / RANK) * bax;
        if (fabs(y[n] - want) > max_diff) max_diff = fabs(y[n] - want);
        moved += fabs(want - wx);
    }
    assert_true(moved > 1e-3);
    if (max_diff > 1e-5) fail_msg("W' x differs from W x + s B A x by %.3g", max_diff);
    rp_lora_free(&lo);
    free(host);
    free(w_before);
    fixture_close(&f);
}

/* The saved adapters merged into a fresh model give W' and its logits. */
static void test_save_and_merge(void **state) {
    (void)state;
    fixture f, g;
    fixture_open(&f);
    fixture_open(&g);
    const rp_config *c = &f.model.cfg;
    rp_lora lo;
    rp_error err;
    const unsigned targets = (1u << RP_LORA_N_TARGETS) - 1;
    if (rp_lora_init(&lo, &f.model, RANK, ALPHA, targets, 5, &err) != RP_OK)
        fail_msg("%s", err.msg);
    float *host = malloc(lo.floats * sizeof(float));
    randomize_b(&lo, host);
    rp_lora_to_host(&lo, host);
    char path[] = "/tmp/rp_test_lora_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    if (rp_lora_save(c, RANK, ALPHA, targets, host, path, &err) != RP_OK) fail_msg("%s", err.msg);
    if (rp_lora_merge_file(&g.model, path, NULL, NULL, &err) != RP_OK) fail_msg("%s", err.msg);
    for (int l = 0; l < c->n_layer; l++) {
        const float *wf = f.model.layer_flat[l], *wg = g.model.layer_flat[l];
        double max_diff = 0;
        for (size_t i = 0; i < f.model.layer_floats; i++)
            if (fabs(wf[i] - wg[i]) > max_diff) max_diff = fabs(wf[i] - wg[i]);
        if (max_diff > 1e-6) fail_msg("layer %d: merged weights differ by %.3g", l, max_diff);
    }
    /* Logits of the two models on the same tokens. */
    rp_workspace ws;
    const int V = c->vocab_size;
    float *lf = malloc((size_t)T_TOKENS * V * sizeof(float));
    float *lg = malloc((size_t)T_TOKENS * V * sizeof(float));
    assert_int_equal(rp_workspace_alloc(&ws, c, T_TOKENS, f.be, &err), RP_OK);
    memset(f.state.data, 0, f.state.floats_per_slot * sizeof(float));
    assert_int_equal(rp_model_forward(&f.model, &ws, f.inputs, &f.batch, &f.state, RP_LOGITS_ALL,
                                      lf, &err), RP_OK);
    memset(f.state.data, 0, f.state.floats_per_slot * sizeof(float));
    assert_int_equal(rp_model_forward(&g.model, &ws, f.inputs, &f.batch, &f.state, RP_LOGITS_ALL,
                                      lg, &err), RP_OK);
    double max_diff = 0;
    for (size_t i = 0; i < (size_t)T_TOKENS * V; i++)
        if (fabs(lf[i] - lg[i]) > max_diff) max_diff = fabs(lf[i] - lg[i]);
    if (max_diff > 1e-5) fail_msg("merged logits differ by %.3g", max_diff);
    rp_workspace_free(&ws, f.be);

    /* An adapter of another shape (dim_ffn) is refused, naming the tensor. */
    rp_config other = *c;
    other.dim_ffn = c->dim_ffn * 2;
    float *big = calloc((size_t)c->n_layer * RANK * (c->n_embd + other.dim_ffn), sizeof(float));
    assert_int_equal(rp_lora_save(&other, RANK, ALPHA, 1u << RP_LORA_FFN_KEY, big, path, &err),
                     RP_OK);
    assert_int_equal(rp_lora_merge_file(&g.model, path, NULL, NULL, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "blocks.0.ffn.key.lora_B"));
    assert_non_null(strstr(err.msg, "another model"));
    /* A weights file is not an adapter file. */
    char wpath[1024];
    golden_data_path(wpath, sizeof wpath, "tiny_L2_C128_V256_s1.weights.safetensors");
    assert_int_equal(rp_lora_merge_file(&g.model, wpath, NULL, NULL, &err), RP_ERR_FORMAT);
    unlink(path);
    free(big);
    free(lf);
    free(lg);
    free(host);
    rp_lora_free(&lo);
    fixture_close(&g);
    fixture_close(&f);
}

static void test_parse_targets(void **state) {
    (void)state;
    unsigned m;
    rp_error err;
    assert_int_equal(rp_lora_parse_targets("att.key,ffn.value", &m, &err), RP_OK);
    assert_int_equal(m, (1u << RP_LORA_ATT_KEY) | (1u << RP_LORA_FFN_VALUE));
    assert_int_equal(rp_lora_parse_targets("att.key,att.gate", &m, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "att.gate"));
    char buf[96];
    rp_lora_format_targets(RP_LORA_DEFAULT_TARGETS, buf, sizeof buf);
    assert_string_equal(buf, "att.receptance,att.key,att.value,att.output");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_targets),
        cmocka_unit_test(test_adapter_gradients),
        cmocka_unit_test(test_merged_weight_and_frozen_base),
        cmocka_unit_test(test_save_and_merge),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
