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
#include <math.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "cuda_backend.h"
#include "cuda_wkv7.h"
#include "emu_counters.h"
#include "tiny_fixture.h"
#include "model/backward.h"
#include "model/model.h"
#include "model/state.h"
#include "optim/optim.h"

/* Launches per decode layer (one token per sequence; layer 0 the same: its
 * v_first copy is inside time_mix_heads). Measured 37 before any fusion
 * (issue 15); 36 with the value mix shared by the value GEMM and the nu
 * LoRA; 27 with ln_shift_mix (ln1 + shift + six lerps, ln2 + shift + lerp);
 * 8 with the fused decode ops: ln_shift_mix, gemv_group (r k v + LoRA
 * downs), gemv_group (LoRA ups), time_mix_heads, output GEMV, ln_shift_mix,
 * gemv_group (FFN key + relu^2), FFN value GEMV; 6 with each ln_shift_mix
 * inside the gemv_group that reads its mixes (ln_mix_gemv_group). Lower it
 * with every fusion. */
#define LAUNCH_BUDGET_PER_LAYER 6

/* fp32 -> bf16 conversion kernels (to_bf16_kernel) in one training step
 * (forward + backward, no optimizer) of the tiny 2-layer model in BF16 math,
 * rows above the GEMV limit so every GEMM is a cuBLAS call: each converts
 * the operands that are not registered weights. Measured 108 before issue
 * 15's bf16 activations (every GEMM converted its activation operands: 14
 * forward and 42 backward per layer, 12 and 36 in layer 0, 4 for the head);
 * 45 once the producers write their GEMM operands in bf16 and GEMMs share
 * conversions (rp_cuda_act16); 28 once kernels declare what they write
 * (RP_CUDA_LAUNCHED_OUT, so a copy outlives the ops between its producer and
 * its GEMMs) and the layernorm, bias + activation and bonus/gate backward
 * kernels write their output gradients in bf16 too; 19 once the a/v LoRA
 * hiddens and their gradients, read only by GEMMs (backend.h gemm_only),
 * are written by GEMMs with bf16 C in place; 17 once shift_mix writes the
 * mixes (kf too) in bf16 in place; 10 once the relu^2 FFN hidden, the w/g
 * LoRA hiddens (their GEMM writes bf16 C, the activation runs bf16 in
 * place, its backward reads bf16 y) and the head layernorm's output are
 * stored bf16 in place (gemm_only); 8 once bonus_gate_to writes og that way
 * too; 5 once key_prepare_backward and value_residual_backward write a bf16
 * copy of dk / dv (the key and value GEMM backwards' dY) in the same pass,
 * which outlives the LoRA backwards between them (RP_CUDA_ACT16_SLOTS 5);
 * 3 once the WKV7 backward writes a bf16 copy of dr and the model runs the
 * receptance GEMM backward right after it (fused mixes); 2 once the head's
 * loss kernel writes dlogits in bf16 only (the operand of its backward
 * GEMMs); 1 once d v_first's fill_zero runs before the head (it ended the
 * head layernorm backward's bf16 copy of dx, the top layer's FFN value dY);
 * 0 once attention_tail_backward writes layer 0's dv (the add of d v_first)
 * with its bf16 copy. Keep it there. */
#define TRAIN_CONVERT_BUDGET 0

/* Kernel launches (GEMMs and conversions included) of that training step.
 * The fused training mix (backend.h shift_mix, shift_mix_backward) took it
 * from 259 to 203 (the 2-layer step): per layer the token shift and seven lerps of the
 * forward became two shift_mix kernels, and the backward's six lerp
 * recomputations, seven (six in layer 0) + one lerp backwards with their
 * dmu sums and two two-kernel token shift backwards became one shift_mix
 * and two (kernel + finish) shift_mix_backward; kf is a bf16 GEMM operand
 * in place. 194 once the FFN hidden, the w/g LoRA hiddens, the head input
 * and og are bf16 in place (nine conversions fewer). 178 once each mix
 * backward and its LayerNorm's backward are one shift_mix_ln_backward
 * (kernel + finish) instead of shift_mix_backward's two and the norm's
 * dx, params and two sum_partials kernels (8 launches fewer a layer).
 * 174 once each training LayerNorm and the shift_mix that reads it are one
 * ln_shift_mix_train kernel (2 launches fewer a layer); 5 fewer again without
 * the conversions of dk and dv, and of dr (TRAIN_CONVERT_BUDGET): 169;
 * 159 once groupnorm + bonus/gate are one kernel forward (2 before) and one
 * kernel + finish backward (6 before: bonus/gate's kernel and r_k sum, the
 * groupnorm's dx, params and two sums), 5 launches fewer a layer; 157
 * without the head's dlogits conversion and the top layer's FFN dY one;
 * 142 once the backward's tail after WKV7 (key prepare, the a/w/v0 bias
 * backwards and sums, value residual or layer 0's add) is one
 * attention_tail_backward kernel + finish (test_attention_tail_exact);
 * 137 once the forward's a0, v0 and w0 bias_act passes are gone (the
 * sigmoids in key_prepare_from / value_residual_from, w0 in the w LoRA's
 * GEMM epilogue: 3 a layer but layer 0's v0). Lower it with every fusion. */
#define TRAIN_LAUNCH_BUDGET 137

/* Device copies and fills (cudaMemcpy(Async), cudaMemset(Async)) of that
 * training step. key_prepare_from / value_residual_from (backend.h) read
 * k_pre / v_pre out of place: the copies of k_pre into k (both layers) and
 * of v_pre into v (layer 1; layer 0's v has no residual) are gone, 3 fewer
 * (TRAIN_COPY_BUDGET + 3 with those entries NULL). 11 once
 * ln_shift_mix_train writes the backward's x_in and x_mid in its pass over
 * x (backend.h x_save): 2 copies a layer fewer. Lower it with every copy
 * folded into an op. */
#define TRAIN_COPY_BUDGET 11

#define MAX_ROWS 24
#define MAX_SEQS 3


/* The emulator's counters now; counter(launches) reads one of them. */
static rp_emu_counters counters_now(void) {
    rp_emu_counters c;
    rp_emu_counts(&c);
    return c;
}
#define counter(field) (counters_now().field)

static int setup_math(void **s, rp_cuda_math math) {
    *s = tiny_fixture_create(math, MAX_ROWS, MAX_SEQS, MAX_ROWS);
    return *s ? 0 : -1;
}

static int setup(void **s) { return setup_math(s, RP_CUDA_MATH_BF16); }

/* The precision tests' reference: the same tiny model in FP32 math. */
static tiny_fixture *fp32_reference(void) {
    tiny_fixture *ref = tiny_fixture_create(RP_CUDA_MATH_FP32, MAX_ROWS, MAX_SEQS, MAX_ROWS);
    assert_non_null(ref);
    return ref;
}

static int teardown(void **s) {
    tiny_fixture_destroy(*s);
    return 0;
}

/* One decode step: n_seq sequences of one token each. */
static void decode_step(tiny_fixture *f, int n_seq, int salt, float *logits) {
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

/* One training step over n_seq sequences of `len` tokens from a zero state; its loss. */
static double train_step(tiny_fixture *f, int n_seq, int len, int salt) {
    tiny_fixture_zero_state(f);
    return tiny_fixture_train_step(f, n_seq, len, salt);
}

/* Launches of one decode layer, counted around rp_model_block_forward. */
static unsigned long long layer_launches(tiny_fixture *f, int layer, int n_seq) {
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
    const unsigned long long before = counter(launches);
    rp_model_block_forward(&f->model, &f->ws, layer, &f->state, &b);
    const unsigned long long n = counter(launches) - before;
    f->be->synchronize(f->be);
    assert_int_equal(f->be->status(f->be, &err), RP_OK);
    return n;
}

static void test_decode_launch_budget(void **s) {
    tiny_fixture *f = *s;
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


/* The conversion and launch budgets of a training step, after a warm-up step. */
static void test_train_convert_budget(void **s) {
    tiny_fixture *f = *s;
    train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, 0);
    const unsigned long long before = counter(bf16_converts), launches = counter(launches);
    const unsigned long long copies = counter(copies);
    train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, 1);
    const unsigned long long n = counter(bf16_converts) - before;
    const unsigned long long n_launches = counter(launches) - launches;
    const unsigned long long n_copies = counter(copies) - copies;
    fprintf(stderr, "device copies and fills per training step: %llu (L=%d, budget %d)\n",
            n_copies, f->model.cfg.n_layer, TRAIN_COPY_BUDGET);
    assert_true(n_copies <= TRAIN_COPY_BUDGET);
    fprintf(stderr, "bf16 conversion kernels per training step: %llu (L=%d, budget %d)\n", n,
            f->model.cfg.n_layer, TRAIN_CONVERT_BUDGET);
    fprintf(stderr, "kernel launches per training step: %llu (L=%d, budget %d)\n", n_launches,
            f->model.cfg.n_layer, TRAIN_LAUNCH_BUDGET);
    assert_true(n <= TRAIN_CONVERT_BUDGET);
    assert_true(n_launches <= TRAIN_LAUNCH_BUDGET);
}

/* A LoRA down-projection GEMV (W [K,N], N = 64 columns: 2 blocks of 32
 * unsplit) runs split-K: at least 4 blocks per column tile, and the slices'
 * sum is right on every call (the tile counters reset for the next launch
 * and graph replay). Three calls with new x each, against a double sum. */
static float *to_device(rp_backend *be, const float *host, size_t n);

static void test_decode_lora_down_split(void **s) {
    tiny_fixture *f = *s;
    rp_backend *be = f->be;
    enum { M = 3, N = 64, K = 512 };
    float *hx = malloc(sizeof(float) * M * K), *hw = malloc(sizeof(float) * K * N);
    float *hy = malloc(sizeof(float) * M * N);
    assert_non_null(hx);
    assert_non_null(hw);
    assert_non_null(hy);
    uint32_t h = 777u;
#define RAND() ((h = h * 1664525u + 1013904223u), (float)(h >> 8) / 16777216.0f * 2.0f - 1.0f)
    for (int i = 0; i < K * N; i++) hw[i] = RAND() * 0.05f;
    float *x = be->alloc(be, sizeof(float) * M * K), *w = to_device(be, hw, (size_t)K * N);
    float *y = be->alloc(be, sizeof(float) * M * N);
    assert_non_null(x);
    assert_non_null(y);
    for (int call = 0; call < 3; call++) {
        for (int i = 0; i < M * K; i++) hx[i] = RAND();
        be->copy_to_device(be, x, hx, sizeof(float) * M * K);
        const rp_gemv_job job = {y, x, w, NULL, N, K, 1, 0.0f, RP_ACT_TANH};
        const unsigned long long before = counter(gemv_group_blocks);
        be->gemv_group(be, &job, 1, M);
        const unsigned long long blocks = counter(gemv_group_blocks) - before;
        be->copy_to_host(be, hy, y, sizeof(float) * M * N);
        rp_error err;
        assert_int_equal(be->status(be, &err), RP_OK);
        double worst = 0;
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) {
                double acc = 0;
                for (int k = 0; k < K; k++) acc += (double)hx[m * K + k] * hw[k * N + n];
                const double e = fabs(tanh(acc) - hy[m * N + n]);
                if (e > worst) worst = e;
            }
        printf("LoRA down GEMV M=%d N=%d K=%d call %d: %llu blocks, max |error| %.2e\n", M, N, K,
               call, blocks, worst);
        assert_true(blocks >= 4 * ((N + 31) / 32));
        assert_true(worst <= 1e-5);
    }
#undef RAND
    be->free(be, x);
    be->free(be, w);
    be->free(be, y);
    free(hx);
    free(hw);
    free(hy);
}

/* How many of n floats of a and b differ in their bits; *nonzero: how
 * many of b are not 0 (a comparison of two zero vectors proves nothing). */
static size_t count_differ(const float *a, const float *b, size_t n, size_t *nonzero) {
    size_t diff = 0;
    *nonzero = 0;
    for (size_t i = 0; i < n; i++) {
        diff += memcmp(&a[i], &b[i], sizeof(float)) != 0;
        *nonzero += b[i] != 0.0f;
    }
    return diff;
}

/* Two training steps that must agree bit for bit (an entry on / off):
 * their losses and every one of n gradients; side[] is freed. */
static void assert_steps_equal(const char *what, int rows, const double loss[2], float *side[2],
                               size_t n) {
    size_t nonzero;
    const size_t diff = count_differ(side[0], side[1], n, &nonzero);
    fprintf(stderr, "%s: %d rows, loss %.9g / %.9g, %zu gradients, %zu nonzero, %zu differ\n",
            what, rows, loss[0], loss[1], n, nonzero, diff);
    assert_true(nonzero > 1000);
    assert_true(memcmp(&loss[0], &loss[1], sizeof loss[0]) == 0);
    assert_int_equal(diff, 0);
    free(side[0]);
    free(side[1]);
}

/* A d pre that only GEMMs read (gemm_only before bias_act_backward with a
 * bias gradient) lives only in the bf16 copy its GEMMs take: the GEMMs and
 * the bias gradient give the bits of the run without the hint, and a GEMM
 * that finds the copy ended by a plain kernel launch in between refuses to
 * convert the stale f32 (a sticky error naming the hint) instead of using
 * it. */
static void test_gemm_only_d_pre(void **s) {
    tiny_fixture *f = *s;
    rp_backend *be = f->be;
    enum { R = 16, C = 64, K = 32 };
    float *hy = malloc(sizeof(float) * R * C), *hdy = malloc(sizeof(float) * R * C);
    float *hx = malloc(sizeof(float) * R * K), *hw = malloc(sizeof(float) * C * K);
    assert_non_null(hy);
    assert_non_null(hdy);
    assert_non_null(hx);
    assert_non_null(hw);
    uint32_t h = 4242u;
#define RAND() ((h = h * 1664525u + 1013904223u), (float)(h >> 8) / 16777216.0f * 2.0f - 1.0f)
    for (int i = 0; i < R * C; i++) hy[i] = 0.5f + 0.45f * RAND(); /* a sigmoid's output */
    for (int i = 0; i < R * C; i++) hdy[i] = RAND();
    for (int i = 0; i < R * K; i++) hx[i] = RAND();
    for (int i = 0; i < C * K; i++) hw[i] = 0.1f * RAND();
#undef RAND
    float *y = to_device(be, hy, (size_t)R * C), *x = to_device(be, hx, (size_t)R * K);
    float *w = to_device(be, hw, (size_t)C * K), *dy = be->alloc(be, sizeof(float) * R * C);
    float *dbias = be->alloc(be, sizeof(float) * C), *dx = be->alloc(be, sizeof(float) * R * K);
    float *dw = be->alloc(be, sizeof(float) * C * K);
    assert_non_null(dy);
    assert_non_null(dbias);
    assert_non_null(dx);
    assert_non_null(dw);
    float *out[2];
    const size_t n_out = (size_t)C + R * K + C * K;
    for (int hint = 0; hint < 2; hint++) {
        be->copy_to_device(be, dy, hdy, sizeof(float) * R * C);
        be->fill_zero(be, dbias, sizeof(float) * C);
        be->fill_zero(be, dw, sizeof(float) * C * K);
        if (hint) be->gemm_only(be, dy, (size_t)R * C);
        be->bias_act_backward(be, dy, dbias, y, R, C, RP_ACT_SIGMOID);
        be->matmul_linear_backward_beta(be, dx, dw, dy, x, w, R, C, K, 0.0f);
        out[hint] = malloc(sizeof(float) * n_out);
        assert_non_null(out[hint]);
        be->copy_to_host(be, out[hint], dbias, sizeof(float) * C);
        be->copy_to_host(be, out[hint] + C, dx, sizeof(float) * R * K);
        be->copy_to_host(be, out[hint] + C + R * K, dw, sizeof(float) * C * K);
        rp_error err;
        assert_int_equal(be->status(be, &err), RP_OK);
    }
    size_t nonzero;
    const size_t diff = count_differ(out[0], out[1], n_out, &nonzero);
    fprintf(stderr, "gemm_only d pre: %zu of %zu outputs differ (%zu nonzero)\n", diff, n_out,
            nonzero);
    assert_true(nonzero > n_out / 2);
    assert_int_equal(diff, 0);
    /* the copy ended by a plain launch (sum_squares) before its GEMM */
    be->copy_to_device(be, dy, hdy, sizeof(float) * R * C);
    be->gemm_only(be, dy, (size_t)R * C);
    be->bias_act_backward(be, dy, dbias, y, R, C, RP_ACT_SIGMOID);
    (void)be->sum_squares(be, x, (size_t)R * K);
    be->matmul_linear_backward_beta(be, dx, dw, dy, x, w, R, C, K, 0.0f);
    rp_error err;
    assert_int_equal(be->status(be, &err), RP_ERR_INTERNAL);
    fprintf(stderr, "stale d pre refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "gemm_only"));
    free(out[0]);
    free(out[1]);
    free(hy);
    free(hdy);
    free(hx);
    free(hw);
    float *bufs[7] = {y, x, w, dy, dbias, dx, dw};
    for (int i = 0; i < 7; i++) be->free(be, bufs[i]);
}

/* A sole copy (a GEMM-only d pre) whose slot a later claim takes back keeps
 * its stale mark: more such d pres than the backend has copy slots (5,
 * cuda_internal.h RP_CUDA_ACT16_SLOTS; 8 here), each ended by a plain launch
 * (sum_squares), so the later claims reclaim the first ones' slots; a GEMM reading
 * the first d pre then stops with the sticky error instead of converting
 * its f32, which was never written. */
static void test_gemm_only_reclaimed_refused(void **s) {
    tiny_fixture *f = *s;
    rp_backend *be = f->be;
    enum { R = 16, C = 64, K = 32, N_DY = 8 };
    /* one host pattern for y, dy [R,C], x [R,K] and w [C,K]: the largest */
    enum { N_HOST = C * K > R * C ? C * K : R * C };
    float *hy = malloc(sizeof(float) * N_HOST);
    assert_non_null(hy);
    for (int i = 0; i < N_HOST; i++) hy[i] = 0.25f + 0.5f * (float)(i % 7) / 7.0f;
    float *y = to_device(be, hy, (size_t)R * C), *dy[N_DY];
    float *dbias = be->alloc(be, sizeof(float) * C), *x = to_device(be, hy, (size_t)R * K);
    float *w = to_device(be, hy, (size_t)C * K), *dx = be->alloc(be, sizeof(float) * R * K);
    float *dw = be->alloc(be, sizeof(float) * C * K);
    assert_non_null(dbias);
    assert_non_null(dx);
    assert_non_null(dw);
    for (int i = 0; i < N_DY; i++) dy[i] = to_device(be, hy, (size_t)R * C);
    be->fill_zero(be, dbias, sizeof(float) * C);
    rp_error err;
    for (int i = 0; i < N_DY; i++) {
        be->gemm_only(be, dy[i], (size_t)R * C);
        be->bias_act_backward(be, dy[i], dbias, y, R, C, RP_ACT_SIGMOID);
        (void)be->sum_squares(be, x, (size_t)R * K); /* a plain launch ends the copy */
        assert_int_equal(be->status(be, &err), RP_OK);
    }
    be->matmul_linear_backward_beta(be, dx, dw, dy[0], x, w, R, C, K, 0.0f);
    assert_int_equal(be->status(be, &err), RP_ERR_INTERNAL);
    fprintf(stderr, "reclaimed d pre refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "gemm_only"));
    free(hy);
    for (int i = 0; i < N_DY; i++) be->free(be, dy[i]);
    float *bufs[6] = {y, dbias, x, w, dx, dw};
    for (int i = 0; i < 6; i++) be->free(be, bufs[i]);
}

/* All of a model's gradients, copied to the host: n floats. */
static float *grads_to_host(tiny_fixture *f, size_t *n) {
    const rp_model *g = &f->grads;
    const int L = g->layer_end - g->layer_begin;
    *n = g->embed_floats + g->head_floats + (size_t)L * g->layer_floats;
    float *h = malloc(*n * sizeof(float)), *p = h;
    assert_non_null(h);
    f->be->copy_to_host(f->be, p, g->embed_flat, g->embed_floats * sizeof(float));
    p += g->embed_floats;
    f->be->copy_to_host(f->be, p, g->head_flat, g->head_floats * sizeof(float));
    p += g->head_floats;
    for (int l = 0; l < L; l++, p += g->layer_floats)
        f->be->copy_to_host(f->be, p, g->layer_flat[l], g->layer_floats * sizeof(float));
    return h;
}

static unsigned long long gn_mode_workspace(tiny_fixture *f);

/* be->gemm_only without its hint for d og (the output GEMM's dX, which the
 * fused groupnorm backward then reads f32, as the unfused ops do) */
static tiny_fixture *dog_fixture;
static void (*gemm_only_saved)(rp_backend *, const float *, size_t);
static void gemm_only_but_dog(rp_backend *be, const float *p, size_t n) {
    if (p != dog_fixture->tw.d_og) gemm_only_saved(be, p, n);
}

/* The bf16 activation copies (producer kernels' second outputs, conversions
 * shared by GEMMs) hand the GEMMs the very bits that each GEMM's own
 * conversion gave before: a training step's gradients match bit for bit with
 * the copies off. 24 rows (cuBLAS GEMMs) and 5 (GEMVs, no copies); then 24
 * rows on the chunked WKV7 kernels (min_t 0: its backward's dr copy). */
static void test_act16_exact(void **s) {
    tiny_fixture *f = *s;
    const int lens[3] = {MAX_ROWS / MAX_SEQS, 5, MAX_ROWS / MAX_SEQS};
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    for (int i = 0; i < 3; i++) {
        const int n_seq = i != 1 ? MAX_SEQS : 1;
        rp_cuda_wkv7_chunked_min_t = i == 2 ? 0 : saved_min_t;
        float *side[2];
        size_t n = 0;
        for (int on = 0; on < 2; on++) {
            rp_cuda_backend_set_act16(f->be, on);
            gn_mode_workspace(f);  /* copies off: fp32 buffers, no bf16-only ones */
            rp_model_zero(&f->grads);
            train_step(f, n_seq, lens[i], 3);
            side[on] = grads_to_host(f, &n);
        }
        size_t nonzero;
        const size_t diff = count_differ(side[0], side[1], n, &nonzero);
        fprintf(stderr, "act16 exact: %d rows, %zu gradients, %zu nonzero, %zu differ\n",
                n_seq * lens[i], n, nonzero, diff);
        assert_true(nonzero > 1000);
        assert_int_equal(diff, 0);
        free(side[0]);
        free(side[1]);
    }
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    rp_cuda_backend_set_act16(f->be, 1);
    gn_mode_workspace(f);
}

/* The backward's elementwise tail after WKV7 in one op (backend.h
 * attention_tail_backward) against the separate ops (key_prepare_backward,
 * three bias_act_backward, value_residual_backward; layer 0's add): the
 * whole training step's loss and every gradient bit for bit, at 24 rows (3
 * sequences), 5 rows (1), 24 rows on the chunked WKV7 backward (its dkk
 * bf16 in place) and 24 rows with the activation copies off (f32 d pre).
 * Kernel + finish instead of 10 launches a layer (key prepare + 2 sums, 3
 * bias ops + sums, value residual) and 8 in layer 0 (2 bias ops, the add),
 * and layer 0's dv conversion gone (the kernel writes dv's bf16 copy there
 * too, at more than RP_GEMV_MAX_M rows with the copies on): 157 -> 142
 * launches for the 2-layer step. */
static void test_attention_tail_exact(void **s) {
    tiny_fixture *f = *s;
    const rp_backend keep = *f->be;
    assert_non_null(keep.attention_tail_backward);
    /* the separate ops read f32 activations: no rkv_only on either side
     * (the fused tail's bf16 k_pre, v_pre, nu: the twin rows) */
    f->be->rkv_only = NULL;
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    for (int i = 0; i < 4; i++) {
        const int n_seq = i != 1 ? MAX_SEQS : 1, len = i != 1 ? MAX_ROWS / MAX_SEQS : 5;
        rp_cuda_wkv7_chunked_min_t = i == 2 ? 0 : saved_min_t;
        rp_cuda_backend_set_act16(f->be, i != 3);
        gn_mode_workspace(f);
        float *side[2];
        double loss[2];
        unsigned long long launches[2], converts[2];
        size_t n = 0;
        for (int on = 0; on < 2; on++) {
            f->be->attention_tail_backward = on ? keep.attention_tail_backward : NULL;
            rp_model_zero(&f->grads);
            train_step(f, n_seq, len, 3);  /* warm-up at this shape */
            rp_model_zero(&f->grads);
            const unsigned long long l0 = counter(launches), c0 = counter(bf16_converts);
            loss[on] = train_step(f, n_seq, len, 3);
            launches[on] = counter(launches) - l0;
            converts[on] = counter(bf16_converts) - c0;
            side[on] = grads_to_host(f, &n);
        }
        size_t nonzero;
        const size_t diff = count_differ(side[0], side[1], n, &nonzero);
        fprintf(stderr,
                "attention tail fused (case %d): %d rows, %zu gradients, %zu nonzero, %zu "
                "differ; launches %llu separate, %llu fused; conversions %llu, %llu\n",
                i, n_seq * len, n, nonzero, diff, launches[0], launches[1], converts[0],
                converts[1]);
        assert_true(nonzero > 1000);
        assert_true(loss[0] == loss[1]);
        assert_int_equal(diff, 0);
        /* layer 0's dv conversion: gone where GEMMs take bf16 copies (above
         * the GEMV rows, copies on) */
        assert_true(converts[0] == converts[1] + (i == 0 || i == 2));
        const unsigned long long fewer = 8ull * f->model.cfg.n_layer - 2;
        assert_true(launches[1] + fewer + (converts[0] - converts[1]) == launches[0]);
        free(side[0]);
        free(side[1]);
    }
    f->be->attention_tail_backward = keep.attention_tail_backward;
    f->be->rkv_only = keep.rkv_only;
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    rp_cuda_backend_set_act16(f->be, 1);
    gn_mode_workspace(f);
}

/* groupnorm_bonus_gate_backward with the pending wkv_only hint dropped
 * first: its dy stays f32 (the switch for test_wkv_dy16_exact). */
static void (*gn_bwd_saved)(rp_backend *, float *, float *, float *, float *, float *, float *,
                            float *, float *, const float *, const float *, const float *,
                            const float *, const float *, const float *, const float *,
                            const float *, const float *, const float *, const float *, int,
                            int, int, float);
static void gn_bwd_dy_f32(rp_backend *be, float *dy, float *dln_w, float *dln_b, float *dr,
                          float *dk, float *dv, float *dr_k, float *dg, const float *dout,
                          const float *y, const float *mean, const float *rstd,
                          const float *ln_w, const float *ln_b, const float *r, const float *k,
                          const float *v, const float *r_k, const float *g, int R, int C, int N,
                          float beta) {
    be->wkv_only(be, NULL, 0);
    gn_bwd_saved(be, dy, dln_w, dln_b, dr, dk, dv, dr_k, dg, dout, y, mean, rstd, ln_w, ln_b, r,
                 k, v, r_k, g, R, C, N, beta);
}

/* WKV7's dy stored bf16 (backward.c's wkv_only hint before
 * groupnorm_bonus_gate_backward) against f32 dy: the chunked wmma backward
 * rounds dy to bf16 for its tensor-core products anyway, so a 24-row step on
 * it (min_t 0) gives the same loss and gradients bit for bit; the step-back
 * backward (fp32 math) reads dy rounded once more, so there the gradients
 * must differ (the switch works; the cost: test_wkv16_train_precision). */
static void test_wkv_dy16_exact(void **s) {
    tiny_fixture *f = *s;
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    gn_bwd_saved = f->be->groupnorm_bonus_gate_backward;
    assert_non_null(gn_bwd_saved);
    assert_non_null(f->be->wkv_only);
    /* r, k, v in bf16 (rkv_only) come only with a bf16 dy: f32 r, k, v
     * here, on a workspace sized for them */
    void (*const rkv_only)(rp_backend *, const float *, size_t) = f->be->rkv_only;
    f->be->rkv_only = NULL;
    gn_mode_workspace(f);
    for (int chunked = 1; chunked >= 0; chunked--) {
        rp_cuda_wkv7_chunked_min_t = chunked ? 0 : 1 << 30;
        float *side[2];
        double loss[2];
        size_t n = 0;
        for (int on = 0; on < 2; on++) {
            f->be->groupnorm_bonus_gate_backward = on ? gn_bwd_saved : gn_bwd_dy_f32;
            rp_model_zero(&f->grads);
            loss[on] = train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, 5);
            side[on] = grads_to_host(f, &n);
        }
        f->be->groupnorm_bonus_gate_backward = gn_bwd_saved;
        if (chunked) {
            assert_steps_equal("wkv dy16 exact (chunked)", MAX_ROWS, loss, side, n);
        } else {
            size_t nonzero;
            const size_t diff = count_differ(side[0], side[1], n, &nonzero);
            fprintf(stderr, "wkv dy16 step-back: %d rows, %zu gradients, %zu differ\n",
                    MAX_ROWS, n, diff);
            assert_true(diff > 0);
            free(side[0]);
            free(side[1]);
        }
    }
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    f->be->rkv_only = rkv_only;
    gn_mode_workspace(f);
}

/* ln_shift_mix_train (one kernel for each training LayerNorm and the
 * shift_mix that reads it) against the two ops (the entry NULL): a BF16-math
 * training step's loss and every gradient bit for bit, over several
 * sequences (the state rows) and over one. */
static void test_ln_shift_mix_train_exact(void **s) {
    tiny_fixture *f = *s;
    void (*fused)(rp_backend *, float *, float *, float *, float *, float *, float *const *,
                  const float *const *, int, const float *, const float *, const float *, float,
                  float *, size_t, const rp_batch *, int) = f->be->ln_shift_mix_train;
    assert_non_null(fused);
    /* f32 dmix on both sides: without the entry the mixes are not formed
     * again, and the dmix stay f32 (backend.h mix_grads16) */
    const int grads16 = f->be->mix_grads16;
    f->be->mix_grads16 = 0;
    const int n_seqs[2] = {MAX_SEQS, 1}, lens[2] = {MAX_ROWS / MAX_SEQS, 13};
    for (int i = 0; i < 2; i++) {
        float *side[2];
        double loss[2];
        size_t n = 0;
        for (int on = 0; on < 2; on++) {
            f->be->ln_shift_mix_train = on ? fused : NULL;
            gn_mode_workspace(f);  /* without it xa / prev are stored: [R,C] */
            rp_model_zero(&f->grads);
            loss[on] = train_step(f, n_seqs[i], lens[i], 4);
            side[on] = grads_to_host(f, &n);
        }
        f->be->ln_shift_mix_train = fused;
        gn_mode_workspace(f);
        assert_steps_equal("ln_shift_mix_train exact", n_seqs[i] * lens[i], loss, side, n);
    }
    f->be->mix_grads16 = grads16;
}

/* Every layer's xa, xf, prev_att and prev_ffn set to NaN (the rows the
 * workspace has of them: ln_rows, prev_rows): a step that reads any of them
 * where it did not write it first loses its loss and gradients to NaN. */
static void poison_ln_outputs(tiny_fixture *f) {
    const int C = f->model.cfg.n_embd;
    const size_t n = (size_t)MAX_ROWS * C;
    float *nan_rows = malloc(n * sizeof(float));
    assert_non_null(nan_rows);
    for (size_t i = 0; i < n; i++) nan_rows[i] = NAN;
    const size_t rows[4] = {(size_t)f->tw.ln_rows, (size_t)f->tw.ln_rows,
                            (size_t)f->tw.prev_rows, (size_t)f->tw.prev_rows};
    for (int l = 0; l < f->model.cfg.n_layer; l++) {
        rp_layer_activations *a = &f->tw.layers[l];
        float *bufs[4] = {a->xa, a->xf, a->prev_att, a->prev_ffn};
        for (int i = 0; i < 4; i++)
            if (rows[i])
                f->be->copy_to_device(f->be, bufs[i], nan_rows, rows[i] * C * sizeof(float));
    }
    free(nan_rows);
}

/* xa and prev formed again (backend.h ln_mix_again_fits / ln_mix_again;
 * ln_shift_mix_train and shift_mix_ln_backward with xa NULL) against the
 * stored path (ln_mix_again_fits NULL): a BF16-math training step's loss and
 * every gradient bit for bit, with the stored buffers NaN beforehand (so the
 * new path reads no xa / xf and no prev row but the sequences' first), over
 * several sequences and one. */
static void test_mix_again_exact(void **s) {
    tiny_fixture *f = *s;
    int (*fits)(rp_backend *, const rp_batch *, int) = f->be->ln_mix_again_fits;
    assert_non_null(fits);
    assert_non_null(f->be->ln_mix_again);
    /* f32 dmix on both sides (bf16 dmix: test_mix_grads16_precision) */
    const int grads16 = f->be->mix_grads16;
    f->be->mix_grads16 = 0;
    const int n_seqs[2] = {MAX_SEQS, 1}, lens[2] = {MAX_ROWS / MAX_SEQS, 13};
    for (int i = 0; i < 2; i++) {
        float *side[2];
        double loss[2];
        size_t n = 0;
        for (int on = 0; on < 2; on++) {
            f->be->ln_mix_again_fits = on ? fits : NULL;
            gn_mode_workspace(f);  /* on: no xa / xf, prev [S,C] (+ the small batches') */
            if (on) poison_ln_outputs(f);
            rp_model_zero(&f->grads);
            loss[on] = train_step(f, n_seqs[i], lens[i], 4);
            side[on] = grads_to_host(f, &n);
        }
        f->be->ln_mix_again_fits = fits;
        gn_mode_workspace(f);
        assert_steps_equal("mix again exact", n_seqs[i] * lens[i], loss, side, n);
    }
    /* The ZB-H1 W pass (rp_backward_block_backward_w) of every layer after
     * a step, from one wsave: the stored path's weight gradients against
     * those of the formed-again path after a step that stored no xa. */
    const rp_config *cfg = &f->model.cfg;
    const size_t n_wsave = rp_backward_wsave_floats(cfg, MAX_ROWS);
    float *host = malloc(n_wsave * sizeof(float));
    assert_non_null(host);
    for (size_t j = 0; j < n_wsave; j++) host[j] = (float)((int)(j * 37 % 101) - 50) / 64.0f;
    float *wsave = f->be->alloc(f->be, n_wsave * sizeof(float));
    assert_non_null(wsave);
    f->be->copy_to_device(f->be, wsave, host, n_wsave * sizeof(float));
    free(host);
    int seq_len[MAX_SEQS], slot[MAX_SEQS], row_begin[MAX_SEQS];
    for (int q = 0; q < MAX_SEQS; q++) {
        seq_len[q] = MAX_ROWS / MAX_SEQS;
        slot[q] = q;
    }
    rp_batch b;
    rp_batch_init(&b, MAX_SEQS, seq_len, slot, row_begin);
    float *side[2];
    size_t n = 0;
    for (int on = 0; on < 2; on++) {
        f->be->ln_mix_again_fits = on ? fits : NULL;
        gn_mode_workspace(f);
        if (on) poison_ln_outputs(f);
        train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, 4);
        rp_model_zero(&f->grads);
        for (int l = 0; l < cfg->n_layer; l++)
            rp_backward_block_backward_w(&f->model, &f->grads, &f->tw, l, &b, wsave);
        f->be->synchronize(f->be);
        rp_error err;
        assert_int_equal(f->be->status(f->be, &err), RP_OK);
        side[on] = grads_to_host(f, &n);
    }
    f->be->ln_mix_again_fits = fits;
    gn_mode_workspace(f);
    size_t nonzero;
    const size_t diff = count_differ(side[0], side[1], n, &nonzero);
    fprintf(stderr, "mix again exact, W pass: %zu gradients, %zu nonzero, %zu differ\n", n,
            nonzero, diff);
    assert_true(nonzero > 1000);
    assert_int_equal(diff, 0);
    free(side[0]);
    free(side[1]);
    f->be->free(f->be, wsave);
    f->be->mix_grads16 = grads16;
}

/* The mixes' gradients stored bf16 (backend.h mix_grads16: the dmix GEMMs
 * write bf16 in place, shift_mix_ln_backward reads it) against f32 dmix and
 * against FP32 math: the cost of that rounding, which must stay small next
 * to BF16 math's own. Its bits are test_act16_exact's (copies off: the same
 * values rounded in f32). */
static double rel_l2(const float *a, const float *b, size_t n);
static void test_mix_grads16_precision(void **s) {
    tiny_fixture *f = *s;
    tiny_fixture *ref = fp32_reference();
    assert_int_equal(f->be->mix_grads16, 1);
    float *g[3];
    double loss[3];
    size_t n = 0;
    for (int side = 0; side < 3; side++) { /* bf16 dmix, f32 dmix, FP32 math */
        tiny_fixture *x = side == 2 ? ref : f;
        f->be->mix_grads16 = side == 0;
        rp_model_zero(&x->grads);
        loss[side] = train_step(x, MAX_SEQS, MAX_ROWS / MAX_SEQS, 7);
        g[side] = grads_to_host(x, &n);
    }
    f->be->mix_grads16 = 1;
    const double with = rel_l2(g[0], g[2], n), without = rel_l2(g[1], g[2], n);
    const double cost = rel_l2(g[0], g[1], n);
    fprintf(stderr,
            "mix grads16: gradients vs FP32 math rel %.3e (bf16 dmix) %.3e (f32 dmix), "
            "bf16 vs f32 dmix %.3e; loss %.9g %.9g fp32 %.9g\n",
            with, without, cost, loss[0], loss[1], loss[2]);
    assert_true(cost > 0);
    assert_true(with <= 1.25 * without + 1e-3);
    assert_true(memcmp(&loss[0], &loss[1], sizeof loss[0]) == 0); /* the forward is the same */
    for (int side = 0; side < 3; side++) free(g[side]);
    tiny_fixture_destroy(ref);
}

/* The head's logits in bf16 (backend.h head_logits16: the logits GEMM writes
 * bf16 in place, the loss kernel reads it with fp32 softmax statistics and
 * writes the bf16 dlogits over it) against the fp32-logits step in BF16 math
 * and against FP32 math: the per-row losses and every gradient. The switch
 * must change the bits (the bf16 path ran); the cost, printed, must stay
 * small next to BF16 math's own (docs/gpu.md Precision). Its bits are
 * test_act16_exact's (copies off: the same values rounded in f32). */
static void test_head_logits16_precision(void **s) {
    tiny_fixture *f = *s;
    tiny_fixture *ref = fp32_reference();
    assert_int_equal(f->be->head_logits16, 1);
    assert_int_equal(ref->be->head_logits16, 0);
    float *g[3], rows[3][MAX_ROWS];
    double loss[3];
    size_t n = 0;
    for (int side = 0; side < 3; side++) { /* bf16 logits, f32 logits, FP32 math */
        tiny_fixture *x = side == 2 ? ref : f;
        f->be->head_logits16 = side == 0;
        rp_model_zero(&x->grads);
        loss[side] = train_step(x, MAX_SEQS, MAX_ROWS / MAX_SEQS, 11);
        x->be->copy_to_host(x->be, rows[side], x->tw.losses, sizeof rows[side]);
        g[side] = grads_to_host(x, &n);
    }
    f->be->head_logits16 = 1;
    /* per-row losses: the largest relative difference */
    double loss_rel = 0, loss_rel_ref = 0;
    for (int r = 0; r < MAX_ROWS; r++) {
        const double d16 = fabs((double)rows[0][r] - rows[1][r]) / fabs((double)rows[1][r]);
        const double d32 = fabs((double)rows[1][r] - rows[2][r]) / fabs((double)rows[2][r]);
        if (d16 > loss_rel) loss_rel = d16;
        if (d32 > loss_rel_ref) loss_rel_ref = d32;
    }
    /* gradients: the largest difference over the largest magnitude, all and
     * the head block (head weight, ln_out) alone, and the relative L2 error */
    const rp_model *gm = &f->grads;
    double max_d = 0, max_b = 0, head_d = 0, head_b = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)g[0][i] - g[1][i]), b = fabs((double)g[1][i]);
        if (d > max_d) max_d = d;
        if (b > max_b) max_b = b;
        if (i >= gm->embed_floats && i < gm->embed_floats + gm->head_floats) {
            if (d > head_d) head_d = d;
            if (b > head_b) head_b = b;
        }
    }
    const double grad_max_rel = max_d / max_b, head_max_rel = head_d / head_b;
    const double cost = rel_l2(g[0], g[1], n);
    const double with = rel_l2(g[0], g[2], n), without = rel_l2(g[1], g[2], n);
    fprintf(stderr,
            "head logits16: bf16 vs f32 logits: row loss max rel %.3e (f32 logits vs FP32 "
            "math %.3e), loss %.9g vs %.9g (rel %.3e); gradients max |diff| / max |g| %.3e "
            "(head block %.3e), rel L2 %.3e; vs FP32 math rel L2 %.3e (bf16 logits) %.3e "
            "(f32 logits)\n",
            loss_rel, loss_rel_ref, loss[0], loss[1], fabs(loss[0] - loss[1]) / fabs(loss[1]),
            grad_max_rel, head_max_rel, cost, with, without);
    assert_true(cost > 0);                                  /* the bf16 path ran */
    assert_true(loss_rel <= 4e-3);                          /* docs/gpu.md Precision */
    assert_true(grad_max_rel <= 2e-2 && head_max_rel <= 2e-2);
    assert_true(with <= 1.5 * without + 1e-3);              /* small next to BF16 math's own */
    for (int side = 0; side < 3; side++) free(g[side]);
    tiny_fixture_destroy(ref);
}

/* The training workspace allocated again for the backend's entries as they
 * are now (it holds o_gn and d_gn only without the fused groupnorm +
 * bonus/gate); the emulator's device bytes it takes. */
static unsigned long long gn_mode_workspace(tiny_fixture *f) {
    rp_error err;
    rp_backward_workspace_free(&f->tw, f->be);
    const unsigned long long before = counter(device_bytes);
    assert_int_equal(rp_backward_workspace_alloc(&f->tw, &f->model, MAX_ROWS, MAX_SEQS, &err),
                     RP_OK);
    return counter(device_bytes) - before;
}

/* A training step of one sequence of `rows` tokens (<= MAX_ROWS) on f's
 * workspace must be refused with RP_ERR_ARG (a workspace that no longer
 * matches the backend's entries), before any op runs. */
static void assert_step_refused(tiny_fixture *f, int rows) {
    int seq_len[1] = {rows}, slot[1] = {0}, row_begin[1];
    int32_t inputs[MAX_ROWS] = {0}, targets[MAX_ROWS] = {0};
    rp_batch b;
    rp_batch_init(&b, 1, seq_len, slot, row_begin);
    rp_error err;
    assert_int_equal(rp_model_train_step(&f->model, &f->grads, &f->tw, inputs, targets, &b,
                                         &f->state, NULL, 0.25f, 0.0f, NULL, NULL, &err),
                     RP_ERR_ARG);
    fprintf(stderr, "refused: %s\n", err.msg);
}

/* A workspace allocated with the fused groupnorm + bonus/gate has no o_gn /
 * d_gn: a step on a backend whose entries were switched off since refuses
 * (RP_ERR_ARG) instead of running ops on missing buffers. */
static void test_gn_fused_workspace_refused(void **s) {
    tiny_fixture *f = *s;
    const rp_backend keep = *f->be;
    assert_true(f->tw.gn_fused);
    f->be->groupnorm_bonus_gate_backward = NULL;
    assert_step_refused(f, 4);
    f->be->groupnorm_bonus_gate_backward = keep.groupnorm_bonus_gate_backward;
    rp_error err;
    assert_int_equal(f->be->status(f->be, &err), RP_OK);
}

/* Rows the CUDA backend stores xa / prev for (ln_mix_again_fits refuses a
 * batch of at most RP_GEMV_MAX_M rows, cuda/cuda_internal.h). */
#define CUDA_LN_STORED_ROWS 8

/* A workspace made for the mixes formed again (issue 15) keeps xa and xf
 * only for the batches the backend stores them for (<= 8 rows) and
 * prev_att / prev_ffn for those rows or the sequences' first rows
 * ([max(8, S), C]): smaller than the stored path's workspace
 * (ln_mix_again_fits NULL) by exactly 4 [R - 8, C] buffers a layer. A batch
 * of 8 rows (stored path) still trains on it; with the entry switched off
 * since, a step is refused (RP_ERR_ARG). */
static void test_mix_again_workspace_bytes(void **s) {
    tiny_fixture *f = *s;
    int (*fits)(rp_backend *, const rp_batch *, int) = f->be->ln_mix_again_fits;
    assert_non_null(fits);
    const int L = f->model.cfg.n_layer, C = f->model.cfg.n_embd;
    f->be->ln_mix_again_fits = NULL;
    const unsigned long long stored = gn_mode_workspace(f);
    assert_false(f->tw.mix_again);
    assert_int_equal(f->tw.ln_rows, MAX_ROWS);
    f->be->ln_mix_again_fits = fits;
    const unsigned long long again = gn_mode_workspace(f);
    assert_true(f->tw.mix_again);
    assert_int_equal(f->tw.ln_rows, CUDA_LN_STORED_ROWS);
    assert_int_equal(f->tw.prev_rows, CUDA_LN_STORED_ROWS > MAX_SEQS ? CUDA_LN_STORED_ROWS
                                                                     : MAX_SEQS);
    const unsigned long long removed =
        (unsigned long long)L * 4 * (MAX_ROWS - CUDA_LN_STORED_ROWS) * C * sizeof(float);
    fprintf(stderr, "mix again workspace: %llu bytes stored path, %llu formed again (%llu "
            "fewer, expected %llu)\n", stored, again, stored - again, removed);
    assert_true(again < stored);
    assert_int_equal(stored - again, removed);
    train_step(f, 1, CUDA_LN_STORED_ROWS, 2);       /* xa / prev stored, in the small buffers */
    train_step(f, 2, CUDA_LN_STORED_ROWS / 2, 3);
    train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, 4); /* formed again */
    f->be->ln_mix_again_fits = NULL;
    assert_step_refused(f, MAX_ROWS);
    f->be->ln_mix_again_fits = fits;
    rp_error err;
    assert_int_equal(f->be->status(f->be, &err), RP_OK);
}

/* Floats the workspace takes off a buffer of n values stored bf16 only. */
static unsigned long long store16_saved(unsigned long long n) { return n - (n + 1) / 2; }

/* backend.h store16_fits / store16_promise: the CUDA backend (BF16 math,
 * copies on, >= 16 rows) keeps the FFN hidden, w_raw, kk, WKV7's y, og and
 * a in bf16 only, and r, k, v, k_pre, v_pre, nu, g in every layer but 0
 * (rp_rkv_only_layer), so the workspace sizes them at half their fp32
 * floats: exactly 5 [R,C] / 2 + [R,F] / 2 floats a layer fewer, and 7 [R,C]
 * / 2 more in layers 1 on. Steps of 24 rows
 * (bf16 storage), 8 and 5 rows (f32 storage in the first half) train on the
 * smaller workspace with the loss and gradients of the fp32-sized one, bit
 * for bit. With the copies off (f32 storage) a step is refused by the
 * workspace check, and the ops run past that check refuse too (sticky
 * error naming the buffer), writing nothing past the half. */
static void test_store16_workspace(void **s) {
    tiny_fixture *f = *s;
    const rp_backend keep = *f->be;
    const unsigned long long L = (unsigned long long)f->model.cfg.n_layer,
                             RC = (unsigned long long)MAX_ROWS * f->model.cfg.n_embd,
                             RF = (unsigned long long)MAX_ROWS * f->model.cfg.dim_ffn;
    const int shape[3][2] = {{MAX_SEQS, MAX_ROWS / MAX_SEQS}, {1, 8}, {1, 5}};
    float *g[2][3];
    double loss[2][3];
    unsigned long long bytes[2];
    size_t n = 0;
    for (int half = 0; half < 2; half++) {
        f->be->store16_fits = half ? keep.store16_fits : NULL;
        bytes[half] = gn_mode_workspace(f);
        assert_int_equal(f->tw.store16, half ? 8191u : 0u);
        for (int i = 0; i < 3; i++) {
            rp_model_zero(&f->grads);
            loss[half][i] = train_step(f, shape[i][0], shape[i][1], 11 + i);
            g[half][i] = grads_to_host(f, &n);
        }
    }
    const unsigned long long removed =
        (L * (5 * store16_saved(RC) + store16_saved(RF)) + (L - 1) * 7 * store16_saved(RC)) * 4;
    fprintf(stderr, "store16 workspace: %llu bytes fp32-sized, %llu bf16-only (%llu fewer, "
            "expected %llu)\n", bytes[0], bytes[1], bytes[0] - bytes[1], removed);
    assert_int_equal(bytes[0] - bytes[1], removed);
    for (int i = 0; i < 3; i++) {
        size_t nonzero;
        const size_t diff = count_differ(g[0][i], g[1][i], n, &nonzero);
        fprintf(stderr, "store16 %d x %d rows: loss %.9g / %.9g, %zu nonzero, %zu differ\n",
                shape[i][0], shape[i][1], loss[0][i], loss[1][i], nonzero, diff);
        assert_true(loss[0][i] == loss[1][i]);
        assert_true(nonzero > 1000);
        assert_int_equal(diff, 0);
        free(g[0][i]);
        free(g[1][i]);
    }
    rp_error err;
    assert_int_equal(f->be->status(f->be, &err), RP_OK);
    /* copies off: kk, y, og, w_raw, a, r, k, v, k_pre, v_pre, nu, g and the FFN
     * hidden would be f32 */
    rp_cuda_backend_set_act16(f->be, 0);
    assert_step_refused(f, MAX_ROWS);
    int seq_len[1] = {MAX_ROWS}, slot[1] = {0}, row_begin[1];
    int32_t inputs[MAX_ROWS] = {0};
    rp_batch b;
    rp_batch_init(&b, 1, seq_len, slot, row_begin);
    assert_int_equal(rp_backward_embed_forward(&f->model, &f->tw, inputs, &b, &err), RP_OK);
    rp_backward_block_forward(&f->model, &f->tw, 0, &f->state, &b);
    f->be->synchronize(f->be);
    assert_int_equal(f->be->status(f->be, &err), RP_ERR_INTERNAL);
    fprintf(stderr, "ops refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "bf16-only storage"));
    rp_cuda_backend_set_act16(f->be, 1);
}

/* A backend alloc that only adds up sizes (no memory: the pointers are
 * never dereferenced), for the 0.4b byte count below. */
static unsigned long long counted_bytes;
static void *counting_alloc(rp_backend *be, size_t bytes) {
    (void)be;
    void *p = (void *)(uintptr_t)(((unsigned long long)1 << 44) + counted_bytes);
    counted_bytes += (bytes + 255) / 256 * 256;
    return p;
}
static void counting_free(rp_backend *be, void *p) { (void)be, (void)p; }
static void counting_promise(rp_backend *be, const float *p, size_t n, size_t cap) {
    (void)be, (void)p, (void)n, (void)cap;
}
static rp_status counting_reserve(rp_backend *be, int rows, int seqs, int C, int N,
                                  rp_error *err) {
    (void)be, (void)rows, (void)seqs, (void)C, (void)N, (void)err;
    return RP_OK;
}

/* Bytes one training workspace asks of this backend (the CUDA one, its
 * entries as they are) for the whole 0.4b model at 8 x 4096 rows. */
static unsigned long long workspace_bytes_04b(rp_backend *be, const rp_config *c) {
    rp_model m;
    memset(&m, 0, sizeof m);
    rp_error err;
    assert_int_equal(rp_model_alloc(&m, c, 0, c->n_layer, 1, 1, be, &err), RP_OK);
    counted_bytes = 0;
    rp_backward_workspace tw;
    assert_int_equal(rp_backward_workspace_alloc(&tw, &m, 8 * 4096, 8, &err), RP_OK);
    const unsigned long long bytes = counted_bytes;
    /* the head's row chunk is the CUDA backend's (backend.h
     * head_ce_chunk_floats): 4096 rows, 8 chunks, not the CPU's 1024 (32) */
    assert_int_equal(tw.head_chunk_rows, 4096);
    rp_backward_workspace_free(&tw, be);
    rp_model_free(&m);
    return bytes;
}

/* docs/gpu.md "Device bytes the workspace asks for at 0.4b": the training
 * workspace of the 0.4b model at 8 x 4096 rows on one process, with the
 * stored path's xa / xf / prev (ln_mix_again_fits NULL: what every shape got
 * before) and made for the mixes formed again, and the weights, gradients
 * and AdamW m, v beside it (4 fp32 copies of every parameter), against an
 * 80 GB H100. The difference is exactly 4 [R - 8, C] buffers a layer. */
static void test_workspace_bytes_04b(void **s) {
    tiny_fixture *f = *s;
    rp_backend keep = *f->be;
    rp_config c;
    rp_error err;
    assert_int_equal(rp_config_builtin(&c, "0.4b", 0, &err), RP_OK);
    f->be->alloc = counting_alloc;
    f->be->free = counting_free;
    f->be->reserve = counting_reserve;
    f->be->store16_promise = counting_promise;  /* the pointers are not device memory */
    rp_model m;
    counted_bytes = 0;
    assert_int_equal(rp_model_alloc(&m, &c, 0, c.n_layer, 1, 1, f->be, &err), RP_OK);
    const unsigned long long params = counted_bytes / sizeof(float);
    rp_model_free(&m);
    f->be->ln_mix_again_fits = NULL;
    f->be->store16_fits = NULL;
    const unsigned long long stored = workspace_bytes_04b(f->be, &c);
    f->be->ln_mix_again_fits = keep.ln_mix_again_fits;
    const unsigned long long again = workspace_bytes_04b(f->be, &c);
    /* and og, kk, w_raw, y, a, FFN hidden bf16 only, r, k, v, k_pre, v_pre,
     * nu, g past layer 0 */
    f->be->store16_fits = keep.store16_fits;
    const unsigned long long half = workspace_bytes_04b(f->be, &c);
    *f->be = keep;
    const unsigned long long R = 8 * 4096, removed =
        (unsigned long long)c.n_layer * 4 * (R - CUDA_LN_STORED_ROWS) * c.n_embd * sizeof(float);
    const double gib = 1024.0 * 1024.0 * 1024.0, h100 = 80e9;
    const unsigned long long state = params * 16;  /* weights, grads, AdamW m and v: fp32 */
    fprintf(stderr,
            "0.4b 8 x 4096 workspace: %.2f GiB stored path, %.2f GiB formed again (%.2f GiB "
            "fewer); %llu params x 16 B = %.2f GiB; total %.2f GiB = %.1f GB of 80 GB "
            "(%.1f GB left)\n",
            stored / gib, again / gib, (stored - again) / gib, params, state / gib,
            (again + state) / gib, (again + state) / 1e9, (h100 - (double)(again + state)) / 1e9);
    assert_int_equal(stored - again, removed);
    const unsigned long long RC = R * c.n_embd, RF = R * c.dim_ffn,
                             removed16 = ((unsigned long long)c.n_layer *
                                              (5 * store16_saved(RC) + store16_saved(RF)) +
                                          (c.n_layer - 1ull) * 7 * store16_saved(RC)) * 4;
    fprintf(stderr,
            "0.4b 8 x 4096 workspace, activations bf16 only: %.2f GiB -> %.2f GiB (%.2f GiB "
            "fewer); total %.2f GiB = %.1f GB of 80 GB (%.1f GB left)\n",
            again / gib, half / gib, (again - half) / gib, (half + state) / gib,
            (half + state) / 1e9, (h100 - (double)(half + state)) / 1e9);
    assert_int_equal(again - half, removed16);
    assert_true(half + state < h100);
    /* of which the head's logits scratch: one row chunk (backend.h
     * rp_head_ce_scratch_floats), f32-sized so that either logits mode runs */
    const unsigned long long head = rp_head_ce_scratch_floats(4096, c.vocab_size) * sizeof(float);
    fprintf(stderr, "0.4b 8 x 4096 head logits scratch: %d rows x %d, %.2f GiB\n", 4096,
            c.vocab_size, head / gib);
}

/* groupnorm + bonus/gate fused (backend.h groupnorm_bonus_gate and its
 * backward): a training step's gradients bit for bit those of the unfused
 * ops (both entries NULL), with exactly 5 launches fewer a layer (so the
 * fused ops ran, and no GEMM operand lost its bf16 copy). 24 rows and 5.
 * This build does not contract a*b+c; under contraction dy may differ in
 * the last bits (docs/gpu.md).
 *
 * Each mode reallocates the workspace. Both are run in two device memory
 * layouts: the emulator's plain one (glibc hands the freed workspace back at
 * the same address) and a padded one that never reuses freed memory (as
 * ASan's allocator does; rp_emu_set_alloc_pad). Every count must be the same
 * in both: the bf16 activation copies' bookkeeping must not key on where
 * buffers lie. Before cuda_free forgot the records of the memory it frees,
 * the padded layout kept dead sole-copy slots of the freed workspace, which
 * a claim takes last, so the fused step converted 2 GEMM operands more
 * (159 launches vs 157; 215 vs 214 unfused at 5 rows). */
static void test_gn_bonus_fused_exact(void **s) {
    tiny_fixture *f = *s;
    const rp_backend keep = *f->be;
    /* forward.c stores WKV7's y in bf16 (wkv_only) only for the fused
     * groupnorm: without the hint both sides read the same f32 y; likewise
     * d og (gemm_only: bf16 for the fused backward alone) */
    f->be->wkv_only = NULL;
    dog_fixture = f;
    gemm_only_saved = keep.gemm_only;
    f->be->gemm_only = gemm_only_but_dog;
    const int lens[2] = {MAX_ROWS / MAX_SEQS, 5};
    unsigned long long seen[2][2];  /* [case][fused], from the plain layout */
    const int pad_was = rp_emu_set_alloc_pad(0);
    for (int layout = 0; layout < 2; layout++) {
        rp_emu_set_alloc_pad(layout ? 7 : 0);
        for (int i = 0; i < 2; i++) {
            const int n_seq = i == 0 ? MAX_SEQS : 1;
            float *side[2];
            unsigned long long launches[2];
            size_t n = 0;
            unsigned long long ws_bytes[2];
            for (int fused = 0; fused < 2; fused++) {
                f->be->groupnorm_bonus_gate = fused ? keep.groupnorm_bonus_gate : NULL;
                f->be->groupnorm_bonus_gate_backward =
                    fused ? keep.groupnorm_bonus_gate_backward : NULL;
                ws_bytes[fused] = gn_mode_workspace(f);
                rp_model_zero(&f->grads);
                const unsigned long long before = counter(launches);
                train_step(f, n_seq, lens[i], 3);
                launches[fused] = counter(launches) - before;
                side[fused] = grads_to_host(f, &n);
            }
            size_t nonzero;
            const size_t diff = count_differ(side[0], side[1], n, &nonzero);
            fprintf(stderr,
                    "gn+bonus fused (%s layout): %d rows, %zu gradients, %zu nonzero, %zu "
                    "differ; launches %llu unfused, %llu fused\n",
                    layout ? "padded" : "plain", n_seq * lens[i], n, nonzero, diff,
                    launches[0], launches[1]);
            assert_true(nonzero > 1000);
            assert_int_equal(diff, 0);
            /* 5 launches a layer fewer (test_train_convert_budget holds a
             * fused step to TRAIN_LAUNCH_BUDGET, the count it measures) */
            assert_true(launches[1] + 5ull * f->model.cfg.n_layer == launches[0]);
            if (layout == 0) {
                seen[i][0] = launches[0];
                seen[i][1] = launches[1];
            } else {  /* the same launches wherever the buffers lie */
                assert_true(launches[0] == seen[i][0]);
                assert_true(launches[1] == seen[i][1]);
            }
            /* fused, the workspace has no o_gn per layer and no d_gn */
            const unsigned long long rc =
                (unsigned long long)MAX_ROWS * f->model.cfg.n_embd * 4;
            fprintf(stderr, "gn+bonus fused: workspace %llu bytes unfused, %llu fused\n",
                    ws_bytes[0], ws_bytes[1]);
            assert_true(ws_bytes[1] + (f->model.cfg.n_layer + 1ull) * rc <= ws_bytes[0]);
            free(side[0]);
            free(side[1]);
        }
    }
    f->be->groupnorm_bonus_gate = keep.groupnorm_bonus_gate;
    f->be->groupnorm_bonus_gate_backward = keep.groupnorm_bonus_gate_backward;
    f->be->wkv_only = keep.wkv_only;
    f->be->gemm_only = keep.gemm_only;
    gn_mode_workspace(f);
    rp_emu_set_alloc_pad(pad_was);
}

/* The flats of model m (layers, embed, head), copied to the host: n floats. */
static float *flats_to_host(rp_backend *be, const rp_model *g, size_t *n) {
    const int L = g->layer_end - g->layer_begin;
    *n = g->embed_floats + g->head_floats + (size_t)L * g->layer_floats;
    float *h = malloc(*n * sizeof(float)), *p = h;
    assert_non_null(h);
    be->copy_to_host(be, p, g->embed_flat, g->embed_floats * sizeof(float));
    p += g->embed_floats;
    be->copy_to_host(be, p, g->head_flat, g->head_floats * sizeof(float));
    p += g->head_floats;
    for (int l = 0; l < L; l++, p += g->layer_floats)
        be->copy_to_host(be, p, g->layer_flat[l], g->layer_floats * sizeof(float));
    return h;
}

/* adamw_multi (one launch per up to RP_ADAMW_MULTI_MAX tensors) against
 * adamw per tensor (the entry NULL): two models loaded alike take three
 * optimizer steps on the same gradients, one each way; weights, m and v bit
 * for bit, then a training step on each (its GEMMs read the bf16 weight
 * copies adamw rewrites) gives the same loss and gradients. A step's
 * launches: one per buffer (L layers, embed, head) instead of one per
 * tensor. */
static void test_adamw_multi_exact(void **s) {
    tiny_fixture *f = *s;
    rp_backend *be = f->be;
    void (*multi)(rp_backend *, const rp_adamw_tensor *, int, float, float, float, float, float,
                  float) = be->adamw_multi;
    assert_non_null(multi);
    const rp_config *cfg = &f->model.cfg;
    const int L = cfg->n_layer;
    rp_model w[2], m[2], v[2];
    rp_error err;
    char path[4096];
    const char *data = getenv("RP_TEST_DATA");
    snprintf(path, sizeof path, "%s/tiny_L2_C128_V256_s1.weights.safetensors",
             data ? data : "tests/data");
    rp_model_zero(&f->grads);
    train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, 5);
    rp_optim_config oc;
    rp_optim_defaults(&oc);
    oc.lr_init = oc.lr_final = 1e-2f;
    oc.weight_decay = 0.1f;
    oc.warmup_steps = 0;
    unsigned long long launches[2];
    float *side_w[2], *side_m[2], *side_v[2], *side_g[2];
    double loss[2];
    size_t n = 0;
    for (int on = 0; on < 2; on++) {
        assert_int_equal(rp_model_load(&w[on], path, 0, -1, be, &err), RP_OK);
        rp_model_register_weights(&w[on]);
        assert_int_equal(rp_model_alloc(&m[on], cfg, 0, L, 1, 1, be, &err), RP_OK);
        assert_int_equal(rp_model_alloc(&v[on], cfg, 0, L, 1, 1, be, &err), RP_OK);
        rp_model_zero(&m[on]);
        rp_model_zero(&v[on]);
        be->adamw_multi = on ? multi : NULL;
        const unsigned long long before = counter(launches);
        for (long step = 0; step < 3; step++)
            rp_optim_step(&w[on], &f->grads, &m[on], &v[on], &oc, step, 0.5f);
        launches[on] = counter(launches) - before;
        assert_int_equal(be->status(be, &err), RP_OK);
    }
    be->adamw_multi = multi;
    for (int on = 0; on < 2; on++) {
        side_w[on] = flats_to_host(be, &w[on], &n);
        side_m[on] = flats_to_host(be, &m[on], &n);
        side_v[on] = flats_to_host(be, &v[on], &n);
    }
    size_t nz;
    const size_t dw = count_differ(side_w[0], side_w[1], n, &nz);
    const size_t dm = count_differ(side_m[0], side_m[1], n, &nz);
    const size_t dv = count_differ(side_v[0], side_v[1], n, &nz);
    float *orig = flats_to_host(be, &f->model, &n);
    const size_t changed = count_differ(side_w[1], orig, n, &nz);
    free(orig);
    for (int on = 0; on < 2; on++) {
        rp_model keep = f->model;
        f->model = w[on];
        rp_model_zero(&f->grads);
        loss[on] = train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, 6);
        f->model = keep;
        side_g[on] = grads_to_host(f, &n);
    }
    const size_t dg = count_differ(side_g[0], side_g[1], n, &nz);
    fprintf(stderr, "adamw_multi: %zu floats, %zu changed by the steps; differ: weights %zu, "
                    "m %zu, v %zu, later gradients %zu; loss %.9g / %.9g; launches %llu per "
                    "tensor, %llu multi (3 steps)\n",
            n, changed, dw, dm, dv, dg, loss[0], loss[1], launches[0], launches[1]);
    assert_true(changed > n / 2);
    assert_int_equal(dw, 0);
    assert_int_equal(dm, 0);
    assert_int_equal(dv, 0);
    assert_int_equal(dg, 0);
    assert_true(memcmp(&loss[0], &loss[1], sizeof loss[0]) == 0);
    assert_true(launches[1] == 3ull * (L + 2));
    assert_true(launches[0] > 10 * launches[1]);
    for (int on = 0; on < 2; on++) {
        free(side_w[on]);
        free(side_m[on]);
        free(side_v[on]);
        free(side_g[on]);
        rp_model_free(&w[on]);
        rp_model_free(&m[on]);
        rp_model_free(&v[on]);
    }
}

/* ||a - b|| / ||b|| over n values, in double. */
static double rel_l2(const float *a, const float *b, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        r += (double)b[i] * b[i];
    }
    return r > 0 ? sqrt(d / r) : sqrt(d);
}

/* The precision of kk, dkk, y and w_raw in bf16 in place (backend.h
 * wkv_only; forward.c hints w_raw gemm_only with it): a BF16-math training
 * step's loss and gradients with the hint and without it (wkv_only NULL: kk,
 * dkk, y and w_raw f32), each against the same step in FP32 math,
 * on the per-token WKV7 kernels and on the chunked ones (min_t 0). The hint
 * must change the bits (the bf16 path ran) and cost little next to BF16
 * math's own error (docs/gpu.md Precision). */
/* A storage hint's three sides of one 24-row training step: the BF16-math
 * step with the backend's hint entry *hook (side 0), without it (1: NULL,
 * the workspace reallocated for f32 storage) and the same step in FP32
 * math on ref (2); each side's loss and gradients (n floats, caller frees). */
typedef void storage_hint_fn(rp_backend *, const float *, size_t);
static void hint_sides(tiny_fixture *f, tiny_fixture *ref, storage_hint_fn **hook,
                       float *g[3], double loss[3], size_t *n) {
    storage_hint_fn *const hint = *hook;
    for (int side = 0; side < 3; side++) {
        tiny_fixture *x = side == 2 ? ref : f;
        *hook = side == 1 ? NULL : hint;
        if (side < 2) gn_mode_workspace(f);  /* buffers sized for that storage */
        rp_model_zero(&x->grads);
        loss[side] = train_step(x, MAX_SEQS, MAX_ROWS / MAX_SEQS, 7);
        g[side] = grads_to_host(x, n);
    }
    *hook = hint;
    gn_mode_workspace(f);
}

static void test_wkv16_train_precision(void **s) {
    tiny_fixture *f = *s;
    tiny_fixture *ref = fp32_reference();
    assert_non_null(f->be->wkv_only);
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    for (int chunked = 0; chunked < 2; chunked++) {
        rp_cuda_wkv7_chunked_min_t = chunked ? 0 : saved_min_t;
        float *g[3];
        double loss[3];
        size_t n = 0;
        /* no hint: kk, y, w_raw (and r, k, v: rp_rkv_only_layer) f32 */
        hint_sides(f, ref, &f->be->wkv_only, g, loss, &n);
        const double with = rel_l2(g[0], g[2], n), without = rel_l2(g[1], g[2], n);
        const double cost = rel_l2(g[0], g[1], n);
        fprintf(stderr,
                "wkv16 %s: gradients vs FP32 math rel %.3e (kk/dkk/y/dy/w_raw/a bf16) %.3e "
                "(f32), bf16 vs f32 kk/dkk/y/dy/w_raw/a %.3e; loss %.9g %.9g fp32 %.9g\n",
                chunked ? "chunked" : "per-token", with, without, cost, loss[0], loss[1],
                loss[2]);
        assert_true(cost > 0);
        assert_true(with <= 3e-2);
        assert_true(with <= 1.25 * without + 1e-3);
        assert_true(fabs(loss[0] - loss[2]) <= 1e-2 * loss[2]);
        for (int side = 0; side < 3; side++) free(g[side]);
    }
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    tiny_fixture_destroy(ref);
}

/* wkv7_backward_beta with backward.c's gemm_only hint for dw_raw dropped
 * first and the one for dr kept: dw_raw written f32 and rounded to bf16
 * only by w0's bias_act_backward for the GEMMs, as before the WKV7 backward
 * took the hint (the switch for test_wkv_dw16_precision). dr's copy stays
 * sole, so the tail's five copies (rkv_only off: dk, da, dw_raw, dv, dnu)
 * take every slot but dr's: a claim that handed one slot out twice in one
 * op (before rp_cuda_act16::claim_seq) corrupted dk here. */
static void (*wkv_bwd_saved)(rp_backend *, float *, float *, float *, float *, float *, float *,
                             float *, size_t, const float *, const float *, const float *,
                             const float *, const float *, const float *, const float *,
                             const float *, const rp_batch *, int, int, float);
static void wkv_bwd_dw_f32(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                           float *dkk, float *da, float *dstate_base, size_t state_stride,
                           const float *dy, const float *r, const float *w_raw, const float *k,
                           const float *v, const float *kk, const float *a,
                           const float *checkpoints, const rp_batch *batch, int C, int N,
                           float beta) {
    /* the pending hints: dw_raw's, and dr's beside it (backward.c); the
     * backend keeps the two newest, so two empty ones drop both */
    be->gemm_only(be, NULL, 0);
    be->gemm_only(be, NULL, 0); /* the backend keeps the two newest: both dropped */
    be->gemm_only(be, NULL, 0);
    be->gemm_only(be, dr, (size_t)batch->n_rows * C);
    wkv_bwd_saved(be, dr, dw_raw, dk, dv, dkk, da, dstate_base, state_stride, dy, r, w_raw, k,
                  v, kk, a, checkpoints, batch, C, N, beta);
}

/* dw_raw stored bf16 in place by the WKV7 backward (backward.c's gemm_only
 * hint before it) against f32 dw_raw: the w LoRA's GEMMs read bf16(dw_raw)
 * either way, so a BF16-math step keeps its loss and every gradient bit for
 * bit except w0's, which bias_act_backward now sums from the bf16 values:
 * that one must change (the bf16 path ran) by a small relative error, and
 * the whole step against FP32 math must stay as good. Per-token and chunked
 * WKV7 kernels (min_t 0). */
static void test_wkv_dw16_precision(void **s) {
    tiny_fixture *f = *s;
    tiny_fixture *ref = fp32_reference();
    assert_non_null(f->be->gemm_only);
    wkv_bwd_saved = f->be->wkv7_backward_beta;
    assert_non_null(wkv_bwd_saved);
    /* the fused tail takes bf16 k_pre, v_pre, nu (rkv_only) with a bf16
     * dw_raw only: f32 activations here, on a workspace sized for them */
    void (*const rkv_only)(rp_backend *, const float *, size_t) = f->be->rkv_only;
    f->be->rkv_only = NULL;
    gn_mode_workspace(f);
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    const rp_model *gm = &f->grads;
    const int L = gm->layer_end - gm->layer_begin, C = f->model.cfg.n_embd;
    for (int chunked = 0; chunked < 2; chunked++) {
        rp_cuda_wkv7_chunked_min_t = chunked ? 0 : saved_min_t;
        float *g[3];
        double loss[3];
        size_t n = 0;
        for (int side = 0; side < 3; side++) { /* bf16 dw_raw, f32 dw_raw, FP32 math */
            tiny_fixture *x = side == 2 ? ref : f;
            f->be->wkv7_backward_beta = side == 1 ? wkv_bwd_dw_f32 : wkv_bwd_saved;
            rp_model_zero(&x->grads);
            loss[side] = train_step(x, MAX_SEQS, MAX_ROWS / MAX_SEQS, 7);
            g[side] = grads_to_host(x, &n);
        }
        f->be->wkv7_backward_beta = wkv_bwd_saved;
        /* w0's entries: C floats in each layer's block */
        unsigned char *is_w0 = calloc(n, 1);
        assert_non_null(is_w0);
        for (int l = 0; l < L; l++) {
            const size_t at = gm->embed_floats + gm->head_floats + (size_t)l * gm->layer_floats +
                              (size_t)(gm->layers[l].w0 - gm->layer_flat[l]);
            memset(is_w0 + at, 1, (size_t)C);
        }
        size_t other_differ = 0, w0_differ = 0;
        double d2 = 0, r2 = 0;
        for (size_t i = 0; i < n; i++) {
            if (!is_w0[i]) {
                other_differ += memcmp(&g[0][i], &g[1][i], sizeof(float)) != 0;
                continue;
            }
            w0_differ += g[0][i] != g[1][i];
            d2 += ((double)g[0][i] - g[1][i]) * ((double)g[0][i] - g[1][i]);
            r2 += (double)g[1][i] * g[1][i];
        }
        const double w0_rel = r2 > 0 ? sqrt(d2 / r2) : sqrt(d2);
        const double with = rel_l2(g[0], g[2], n), without = rel_l2(g[1], g[2], n);
        fprintf(stderr,
                "wkv dw16 %s: w0 gradient bf16 vs f32 dw_raw rel %.3e (%zu of %d differ), "
                "other gradients differing %zu of %zu; all vs FP32 math rel %.3e (bf16 "
                "dw_raw) %.3e (f32); loss %.9g %.9g\n",
                chunked ? "chunked" : "per-token", w0_rel, w0_differ, L * C, other_differ,
                n - (size_t)L * C, with, without, loss[0], loss[1]);
        assert_true(loss[0] == loss[1]);
        assert_int_equal(other_differ, 0);
        assert_true(w0_differ > 0);
        assert_true(w0_rel <= 1e-2);
        assert_true(with <= 1.01 * without + 1e-4);
        free(is_w0);
        for (int side = 0; side < 3; side++) free(g[side]);
    }
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    f->be->rkv_only = rkv_only;
    gn_mode_workspace(f);
    tiny_fixture_destroy(ref);
}

/* r, k, v (k_pre, v_pre, nu) and g stored bf16 in place (forward.c's
 * rkv_only hints, every layer but 0), and WKV7's da (backward.c's, every
 * layer), against all of them f32: WKV7, the fused groupnorm and the tail,
 * their only readers, then read the rounded values. A BF16-math step must
 * change (the bf16 path ran: the loss and gradients differ), by a small
 * relative error, and against FP32 math stay about as good as with them
 * f32; the official training kernel takes r, k, v in bf16 too. Per-token
 * and chunked WKV7 kernels (min_t 0). */
/* The checks of a switch's three sides (on, off, FP32 math: g, loss, n
 * gradients each; frees g): the gradients differ (the switch works), stay
 * within rel 1e-2 of each other, and are no further from FP32 math on than
 * off (1.10x + 1e-4); with check_loss the loss within 1% of FP32's. */
static void check_sides(const char *what, float *g[3], const double loss[3], size_t n,
                        int check_loss) {
    size_t nonzero;
    const size_t differ = count_differ(g[0], g[1], n, &nonzero);
    const double rel = rel_l2(g[0], g[1], n);
    const double with = rel_l2(g[0], g[2], n), without = rel_l2(g[1], g[2], n);
    fprintf(stderr,
            "%s: gradients on vs off rel %.3e (%zu of %zu differ); all vs FP32 math rel %.3e "
            "(on) %.3e (off); loss %.9g %.9g (FP32 %.9g)\n",
            what, rel, differ, n, with, without, loss[0], loss[1], loss[2]);
    assert_true(differ > 0);
    assert_true(rel <= 1e-2);
    assert_true(with <= 1.10 * without + 1e-4);
    if (check_loss) assert_true(fabs(loss[0] - loss[2]) <= 1e-2 * loss[2]);
    for (int side = 0; side < 3; side++) free(g[side]);
}

static void test_rkv16_precision(void **s) {
    tiny_fixture *f = *s;
    tiny_fixture *ref = fp32_reference();
    assert_non_null(f->be->rkv_only);
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    for (int chunked = 0; chunked < 2; chunked++) {
        rp_cuda_wkv7_chunked_min_t = chunked ? 0 : saved_min_t;
        float *g[3];
        double loss[3];
        size_t n = 0;
        hint_sides(f, ref, &f->be->rkv_only, g, loss, &n); /* bf16 r k v, f32, FP32 math */
        check_sides(chunked ? "rkv16 (r, k, v, g, da bf16) chunked"
                            : "rkv16 (r, k, v, g, da bf16) per-token",
                    g, loss, n, 0);
    }
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    tiny_fixture_destroy(ref);
}

/* A switch's three sides of the 24-row training step: the backend with it
 * on (side 0), off (1), and FP32 math on ref (2); check_sides, the loss
 * too. */
typedef void switch_fn(rp_backend *be, int on);
static void switch_precision(tiny_fixture *f, tiny_fixture *ref, switch_fn *set, const char *what) {
    float *g[3];
    double loss[3];
    size_t n = 0;
    for (int side = 0; side < 3; side++) {
        tiny_fixture *x = side == 2 ? ref : f;
        set(f->be, side != 1);
        rp_model_zero(&x->grads);
        loss[side] = train_step(x, MAX_SEQS, MAX_ROWS / MAX_SEQS, 7);
        g[side] = grads_to_host(x, &n);
    }
    set(f->be, 1);
    check_sides(what, g, loss, n, 1);
}

/* dr, dk, dv in bf16 in place from the groupnorm backward through WKV7 and
 * the fused tail (backward.c's drkv_only hint) against f32 (the hook NULL):
 * two more roundings of dk and dv, one of dr, on the step-back and the
 * chunked WKV7 backward. */
static void (*drkv_hook)(rp_backend *, const float *, const float *, const float *, size_t);
static void drkv_switch(rp_backend *be, int on) { be->drkv_only = on ? drkv_hook : NULL; }
static void test_drkv16_precision(void **s) {
    tiny_fixture *f = *s;
    tiny_fixture *ref = fp32_reference();
    drkv_hook = f->be->drkv_only;
    assert_non_null(drkv_hook);
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    rp_cuda_wkv7_chunked_min_t = 1 << 30;
    switch_precision(f, ref, drkv_switch, "drkv16 step-back");
    rp_cuda_wkv7_chunked_min_t = 0;
    switch_precision(f, ref, drkv_switch, "drkv16 chunked");
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    tiny_fixture_destroy(ref);
}

/* d og (the output GEMM's dX) bf16 in place for the fused groupnorm
 * backward, its one reader (backward.c's gemm_only hint), against f32 (that
 * hint alone dropped). */
static void dog_switch(rp_backend *be, int on) {
    be->gemm_only = on ? gemm_only_saved : gemm_only_but_dog;
}
static void test_dog16_precision(void **s) {
    tiny_fixture *f = *s;
    tiny_fixture *ref = fp32_reference();
    dog_fixture = f;
    gemm_only_saved = f->be->gemm_only;
    assert_non_null(gemm_only_saved);
    switch_precision(f, ref, dog_switch, "dog16");
    tiny_fixture_destroy(ref);
}

/* w0 in the w LoRA's up GEMM epilogue (matmul_lora_bias: cuBLASLt, the
 * bias's bf16 copy, one rounding of w_raw) against the GEMM then bias_act
 * (the entry NULL: two roundings, w0 in f32). */
static void (*lora_bias_hook)(rp_backend *, float *, const float *, const float *,
                              const float *, int, int, int);
static void w0_switch(rp_backend *be, int on) {
    be->matmul_lora_bias = on ? lora_bias_hook : NULL;
}
static void test_w0_epilogue_precision(void **s) {
    tiny_fixture *f = *s;
    tiny_fixture *ref = fp32_reference();
    lora_bias_hook = f->be->matmul_lora_bias;
    assert_non_null(lora_bias_hook);
    switch_precision(f, ref, w0_switch, "w0 epilogue");
    tiny_fixture_destroy(ref);
}

/* The drkv_only hint where r, k, v are f32 (not rkv_only): the groupnorm
 * backward refuses it with a sticky error naming the hint, writes nothing
 * bf16, and the step reports the failure. */
static void test_drkv16_needs_rkv16(void **s) {
    tiny_fixture *f = *s;
    rp_backend *be = f->be;
    const int R = MAX_ROWS, C = f->model.cfg.n_embd, N = f->model.cfg.head_size;
    const size_t n = (size_t)R * C;
    float *buf = be->alloc(be, 16 * n * sizeof(float));
    assert_non_null(buf);
    be->fill_zero(be, buf, 16 * n * sizeof(float));
    float *stat = be->alloc(be, 2 * (size_t)R * (C / N) * sizeof(float) + 4 * C * sizeof(float));
    assert_non_null(stat);
    be->fill_zero(be, stat, 2 * (size_t)R * (C / N) * sizeof(float) + 4 * C * sizeof(float));
    float *dr = buf, *dk = buf + n, *dv = buf + 2 * n;
    float *mean = stat, *rstd = stat + (size_t)R * (C / N), *w = rstd + (size_t)R * (C / N);
    be->drkv_only(be, dr, dk, dv, n);
    be->groupnorm_bonus_gate_backward(be, buf + 3 * n, NULL, NULL, dr, dk, dv, NULL, buf + 4 * n,
                                      buf + 5 * n, buf + 6 * n, mean, rstd, w, w + C,
                                      buf + 7 * n, buf + 8 * n, buf + 9 * n, w + 2 * C,
                                      buf + 10 * n, R, C, N, 0.0f);
    be->synchronize(be);
    rp_error err;
    assert_int_not_equal(be->status(be, &err), RP_OK);
    fprintf(stderr, "drkv16 without rkv16: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "drkv_only"));
    be->free(be, buf);
    be->free(be, stat);
}

/* After one decode step and one training step at the largest shapes, more
 * steps of those shapes or smaller allocate and free nothing. */
static void test_no_allocation_after_warm_up(void **s) {
    tiny_fixture *f = *s;
    float *logits = f->be->alloc(f->be, (size_t)MAX_SEQS * f->model.cfg.vocab_size * sizeof(float));
    assert_non_null(logits);
    decode_step(f, MAX_SEQS, 0, logits);
    train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, 0);
    const unsigned long long before = counter(allocs), graphs = counter(graph_launches);
    for (int i = 1; i <= 3; i++) {
        decode_step(f, 1 + i % MAX_SEQS, i, logits);
        train_step(f, 1 + i % MAX_SEQS, MAX_ROWS / MAX_SEQS - i, i);
        train_step(f, MAX_SEQS, MAX_ROWS / MAX_SEQS, i);
    }
    decode_step(f, MAX_SEQS, 4, logits); /* a replayed step graph */
    const unsigned long long n = counter(allocs) - before;
    printf("allocations/frees after warm-up: %llu (%llu decode step graph launches)\n", n,
           counter(graph_launches) - graphs);
    assert_int_equal(n, 0);
    assert_true(counter(graph_launches) - graphs >= 2);
    f->be->free(f->be, logits);
}

/* reserve() sizes the host-array uploads for its rows, so that an op's first
 * call with more rows than any before (embedding_backward's permutation,
 * mid-step, with a pipelined receive posted) does not regrow a buffer. */
static void test_reserve_sizes_uploads(void **s) {
    tiny_fixture *f = *s;
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
    const unsigned long long before = counter(allocs);
    be->embedding(be, x, demb, tokens, R, C);
    be->embedding_backward(be, demb, dx, tokens, R, C);
    be->synchronize(be);
    assert_int_equal(be->status(be, &err), RP_OK);
    const unsigned long long n = counter(allocs) - before;
    printf("allocations/frees in embedding + embedding_backward of %d rows: %llu\n", R, n);
    assert_int_equal(n, 0);
    free(tokens);
    be->free(be, x);
    be->free(be, dx);
    be->free(be, demb);
}

/* ---- ln_shift_mix: the CUDA kernel against the CPU twin (three ops) ---- */

static float *to_device(rp_backend *be, const float *host, size_t n) {
    float *d = be->alloc(be, n * sizeof(float));
    assert_non_null(d);
    be->copy_to_device(be, d, host, n * sizeof(float));
    return d;
}

static double rel_err(const float *got, const float *want, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        den += (double)want[i] * want[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* One call on both backends with the same inputs; every output compared. */
static void mix_case(rp_backend *gpu, rp_backend *cpu, int n_seq, const int *seq_len,
                     const int *slot, int n_mix, int C) {
    int row_begin[8];
    rp_batch b;
    rp_batch_init(&b, n_seq, seq_len, slot, row_begin);
    const int R = b.n_rows, n_slots = 4;
    const size_t stride = (size_t)C + 8, rc = (size_t)R * C;
    float *x = malloc(rc * sizeof *x), *wb = malloc(2 * C * sizeof *wb);
    float *mu = malloc((size_t)RP_MIX_MAX * C * sizeof *mu);
    float *state = malloc(n_slots * stride * sizeof *state);
    float *got = malloc((n_slots * stride + rc) * sizeof *got);
    uint32_t h = 12345u;
#define RAND() ((h = h * 1664525u + 1013904223u), (float)(h >> 8) / 16777216.0f * 2.0f - 1.0f)
    for (size_t i = 0; i < rc; i++) x[i] = 3.0f * RAND() + 0.5f;
    for (int i = 0; i < 2 * C; i++) wb[i] = RAND();
    for (int i = 0; i < RP_MIX_MAX * C; i++) mu[i] = 0.5f + 0.5f * RAND();
    for (size_t i = 0; i < n_slots * stride; i++) state[i] = RAND();
#undef RAND
    float *out[2][2 + RP_MIX_MAX], *st[2];
    rp_backend *side[2] = {cpu, gpu};
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side[g];
        float *dx = to_device(be, x, rc), *dwb = to_device(be, wb, 2 * (size_t)C);
        float *dmu = to_device(be, mu, (size_t)RP_MIX_MAX * C);
        st[g] = to_device(be, state, n_slots * stride);
        const float *mus[RP_MIX_MAX];
        for (int i = 0; i < 2 + n_mix; i++) {
            out[g][i] = be->alloc(be, rc * sizeof(float));
            assert_non_null(out[g][i]);
        }
        for (int i = 0; i < n_mix; i++) mus[i] = dmu + (size_t)i * C;
        be->ln_shift_mix(be, out[g][0], out[g][1], out[g] + 2, mus, n_mix, dx, dwb, dwb + C,
                         1e-5f, st[g], stride, &b, C);
        be->synchronize(be);
        rp_error err;
        assert_int_equal(be->status(be, &err), RP_OK);
        be->free(be, dx);
        be->free(be, dwb);
        be->free(be, dmu);
    }
    float *want = malloc((n_slots * stride + rc) * sizeof *want);
    for (int i = 0; i < 2 + n_mix; i++) {
        cpu->copy_to_host(cpu, want, out[0][i], rc * sizeof(float));
        gpu->copy_to_host(gpu, got, out[1][i], rc * sizeof(float));
        const double e = rel_err(got, want, rc);
        printf("ln_shift_mix R=%d n_seq=%d output %d: rel %.2e\n", R, n_seq, i, e);
        assert_true(e <= 1e-6);
    }
    cpu->copy_to_host(cpu, want, st[0], n_slots * stride * sizeof(float));
    gpu->copy_to_host(gpu, got, st[1], n_slots * stride * sizeof(float));
    const double e = rel_err(got, want, n_slots * stride);
    printf("ln_shift_mix R=%d n_seq=%d state: rel %.2e\n", R, n_seq, e);
    assert_true(e <= 1e-6);
    for (int g = 0; g < 2; g++) {
        for (int i = 0; i < 2 + n_mix; i++) side[g]->free(side[g], out[g][i]);
        side[g]->free(side[g], st[g]);
    }
    free(want);
    free(got);
    free(state);
    free(mu);
    free(wb);
    free(x);
}

static void test_ln_shift_mix_twin(void **s) {
    tiny_fixture *f = *s;
    rp_error err;
    rp_backend *cpu = rp_cpu_backend_create(1, &err);
    assert_non_null(cpu);
    const int one[3] = {1, 1, 1}, slots[3] = {2, 0, 3}, ragged[3] = {2, 1, 3};
    mix_case(f->be, cpu, 3, one, slots, RP_MIX_MAX, 128);  /* step mode: the fused kernel */
    mix_case(f->be, cpu, 2, one, slots, 1, 36);            /* unaligned width, scalar path */
    mix_case(f->be, cpu, 3, ragged, slots, 3, 128);        /* prefill: the three ops */
    cpu->destroy(cpu);
}

/* ---- whole-model decode: CUDA (fused) against the CPU and the unfused CUDA path ---- */

typedef struct {
    rp_backend *be;
    rp_model model;
    rp_workspace ws;
    rp_state state;
} decode_side;

static void side_open_sized(decode_side *d, rp_backend *be, int rows, int slots) {
    rp_error err;
    const char *data = getenv("RP_TEST_DATA");
    char path[4096];
    snprintf(path, sizeof path, "%s/tiny_L2_C128_V256_s1.weights.safetensors",
             data ? data : "tests/data");
    d->be = be;
    assert_int_equal(rp_model_load(&d->model, path, 0, -1, be, &err), RP_OK);
    rp_model_register_weights(&d->model);
    assert_int_equal(rp_workspace_alloc(&d->ws, &d->model.cfg, rows, be, &err), RP_OK);
    rp_state_geometry(&d->state, &d->model.cfg, 0, d->model.cfg.n_layer, slots);
    d->state.data = be->alloc(be, d->state.floats_per_slot * slots * sizeof(float));
    assert_non_null(d->state.data);
}

static void side_open(decode_side *d, rp_backend *be) { side_open_sized(d, be, MAX_ROWS, MAX_SEQS); }

static void side_close(decode_side *d) {
    d->be->free(d->be, d->state.data);
    rp_workspace_free(&d->ws, d->be);
    rp_model_free(&d->model);
    d->be->destroy(d->be);
}

/* One step of n_seq one-token sequences in slots 2, 0, 1; logits and the
 * whole state back to the host. */
static void side_step(decode_side *d, int n_seq, int step, float *logits, float *state) {
    static const int slots[MAX_SEQS] = {2, 0, 1};
    int seq_len[MAX_SEQS], row_begin[MAX_SEQS];
    int32_t tokens[MAX_SEQS];
    for (int s = 0; s < n_seq; s++) {
        seq_len[s] = 1;
        tokens[s] = (int32_t)((step * 37 + s * 101 + 5) % d->model.cfg.vocab_size);
    }
    rp_batch b;
    rp_batch_init(&b, n_seq, seq_len, slots, row_begin);
    const size_t V = (size_t)d->model.cfg.vocab_size;
    float *dl = d->be->alloc(d->be, (size_t)n_seq * V * sizeof(float));
    assert_non_null(dl);
    rp_error err;
    assert_int_equal(rp_model_forward(&d->model, &d->ws, tokens, &b, &d->state, RP_LOGITS_LAST,
                                      dl, &err), RP_OK);
    d->be->copy_to_host(d->be, logits, dl, (size_t)n_seq * V * sizeof(float));
    d->be->copy_to_host(d->be, state, d->state.data,
                        d->state.floats_per_slot * MAX_SEQS * sizeof(float));
    assert_int_equal(d->be->status(d->be, &err), RP_OK);
    d->be->free(d->be, dl);
}

/* Six decode steps (batches of 3, 1 and 2 sequences) of the tiny model on
 * three sides: the CPU backend, the CUDA backend (fp32 math) with the fused
 * decode ops, and the same without them (gemv_group and time_mix_heads
 * NULL: the model runs the separate ops). Logits and every state slot stay
 * within the twin tolerance of the CPU, and fused == unfused on CUDA. */
static void test_decode_model_twin(void **s) {
    (void)s;
    rp_error err;
    decode_side side[3];
    side_open(&side[0], rp_cpu_backend_create(1, &err));
    side_open(&side[1], rp_cuda_backend_create(0, RP_CUDA_MATH_FP32, &err));
    side_open(&side[2], rp_cuda_backend_create(0, RP_CUDA_MATH_FP32, &err));
    assert_non_null(side[1].be->gemv_group);
    assert_non_null(side[1].be->time_mix_heads);
    side[2].be->gemv_group = NULL;
    side[2].be->time_mix_heads = NULL;
    const size_t V = (size_t)side[0].model.cfg.vocab_size;
    const size_t sf = side[0].state.floats_per_slot * MAX_SEQS;
    float *logits[3], *state[3];
    for (int i = 0; i < 3; i++) {
        logits[i] = malloc(MAX_SEQS * V * sizeof(float));
        state[i] = malloc(sf * sizeof(float));
        assert_non_null(logits[i]);
        assert_non_null(state[i]);
    }
    static const int n_seq[6] = {3, 3, 1, 2, 3, 3};
    for (int step = 0; step < 6; step++) {
        unsigned long long launched[3];
        for (int i = 0; i < 3; i++) {
            const unsigned long long before = counter(launches);
            side_step(&side[i], n_seq[step], step, logits[i], state[i]);
            launched[i] = counter(launches) - before;
        }
        /* the fused side really ran the fused ops */
        assert_true(launched[1] + 2 * 6 * side[0].model.cfg.n_layer <= launched[2]);
        const size_t nl = (size_t)n_seq[step] * V;
        const double el = rel_err(logits[1], logits[0], nl), es = rel_err(state[1], state[0], sf);
        const double fl = rel_err(logits[1], logits[2], nl), fs = rel_err(state[1], state[2], sf);
        printf("decode step %d (%d seqs): CUDA vs CPU logits %.2e state %.2e; fused vs unfused "
               "logits %.2e state %.2e\n", step, n_seq[step], el, es, fl, fs);
        assert_true(el <= 1e-5);
        assert_true(es <= 1e-5);
        assert_true(fl <= 1e-6);
        assert_true(fs <= 1e-6);
    }
    for (int i = 0; i < 3; i++) {
        free(logits[i]);
        free(state[i]);
        side_close(&side[i]);
    }
}

/* Decode steps (batches of 3, 1 and 2 sequences) of the tiny model on the
 * CUDA backend with ln_mix_gemv_group (each ln_shift_mix inside the GEMV
 * launch that reads its mixes) and without it (ln_shift_mix then
 * gemv_group), in fp32 and bf16 math, and on a device of 3 SMs (EMU_SMS:
 * the fused kernel's blocks then run several GEMV blocks of several jobs
 * each): logits and the whole state equal bit for bit, and the fused side
 * launches two kernels a layer fewer. */
static void test_decode_ln_mix_exact(void **s) {
    (void)s;
    static const rp_cuda_math maths[3] = {RP_CUDA_MATH_FP32, RP_CUDA_MATH_BF16,
                                          RP_CUDA_MATH_FP32};
    static const char *const sms[3] = {NULL, NULL, "3"};
    for (int mi = 0; mi < 3; mi++) {
        rp_error err;
        decode_side side[2];
        if (sms[mi]) setenv("EMU_SMS", sms[mi], 1);
        side_open(&side[0], rp_cuda_backend_create(0, maths[mi], &err));
        side_open(&side[1], rp_cuda_backend_create(0, maths[mi], &err));
        unsetenv("EMU_SMS");
        assert_non_null(side[0].be->ln_mix_gemv_group);
        side[1].be->ln_mix_gemv_group = NULL;
        const size_t V = (size_t)side[0].model.cfg.vocab_size;
        const size_t sf = side[0].state.floats_per_slot * MAX_SEQS;
        float *logits[2], *state[2];
        for (int i = 0; i < 2; i++) {
            logits[i] = malloc(MAX_SEQS * V * sizeof(float));
            state[i] = malloc(sf * sizeof(float));
            assert_non_null(logits[i]);
            assert_non_null(state[i]);
        }
        static const int n_seq[6] = {3, 3, 1, 2, 3, 1};
        for (int step = 0; step < 6; step++) {
            unsigned long long launched[2];
            for (int i = 0; i < 2; i++) {
                const unsigned long long before = counter(launches);
                side_step(&side[i], n_seq[step], step, logits[i], state[i]);
                launched[i] = counter(launches) - before;
            }
            const int same_logits =
                !memcmp(logits[0], logits[1], (size_t)n_seq[step] * V * sizeof(float));
            const int same_state = !memcmp(state[0], state[1], sf * sizeof(float));
            printf("%s math, %s SMs, decode step %d (%d seqs): %llu launches fused, %llu "
                   "not; logits %s, state %s\n", maths[mi] == RP_CUDA_MATH_BF16 ? "bf16" : "fp32",
                   sms[mi] ? sms[mi] : "132", step, n_seq[step],
                   launched[0], launched[1], same_logits ? "equal" : "DIFFER",
                   same_state ? "equal" : "DIFFER");
            assert_true(same_logits);
            assert_true(same_state);
            assert_true(launched[0] + 2 * (unsigned long long)side[0].model.cfg.n_layer ==
                        launched[1]);
        }
        for (int i = 0; i < 2; i++) {
            free(logits[i]);
            free(state[i]);
            side_close(&side[i]);
        }
    }
}

/* ---- decode step graphs: replay == eager, bit for bit ---- */

/* One decode step of n_seq sequences into the fixed logits buffer dl (a
 * graph bakes it in); slots and tokens change every step. */
static void graph_step(decode_side *d, float *dl, int n_seq, int step, float *logits,
                       float *state) {
    static const int slot_sets[4][MAX_SEQS] = {{2, 0, 1}, {0, 1, 2}, {1, 2, 0}, {2, 1, 0}};
    int seq_len[MAX_SEQS], row_begin[MAX_SEQS];
    int32_t tokens[MAX_SEQS];
    for (int s = 0; s < n_seq; s++) {
        seq_len[s] = 1;
        tokens[s] = (int32_t)((step * 53 + s * 29 + 3) % d->model.cfg.vocab_size);
    }
    rp_batch b;
    rp_batch_init(&b, n_seq, seq_len, slot_sets[step % 4], row_begin);
    const size_t V = (size_t)d->model.cfg.vocab_size;
    rp_error err;
    assert_int_equal(rp_model_forward(&d->model, &d->ws, tokens, &b, &d->state, RP_LOGITS_LAST,
                                      dl, &err), RP_OK);
    d->be->copy_to_host(d->be, logits, dl, (size_t)n_seq * V * sizeof(float));
    d->be->copy_to_host(d->be, state, d->state.data,
                        d->state.floats_per_slot * MAX_SEQS * sizeof(float));
    if (d->be->status(d->be, &err) != RP_OK) fprintf(stderr, "status: %s\n", err.msg);
    assert_int_equal(d->be->status(d->be, &err), RP_OK);
}

/* Each side's device logits [MAX_SEQS, V] and host copies of the logits
 * and of sf state floats, for the graph tests. */
static void sides_buffers(decode_side side[2], size_t V, size_t sf, float *dl[2],
                          float *logits[2], float *state[2]) {
    for (int i = 0; i < 2; i++) {
        dl[i] = side[i].be->alloc(side[i].be, MAX_SEQS * V * sizeof(float));
        logits[i] = malloc(MAX_SEQS * V * sizeof(float));
        state[i] = malloc(sf * sizeof(float));
        assert_non_null(dl[i]);
        assert_non_null(logits[i]);
        assert_non_null(state[i]);
    }
}

static void sides_close(decode_side side[2], float *dl[2], float *logits[2], float *state[2]) {
    for (int i = 0; i < 2; i++) {
        side[i].be->free(side[i].be, dl[i]);
        free(logits[i]);
        free(state[i]);
        side_close(&side[i]);
    }
}

/* Decode steps of the tiny model at batch 1 and 3, with the slot set and
 * tokens changing every step, on the CUDA backend with step graphs and
 * with them off (step_begin NULL: op by op). Logits and the whole state are
 * equal bit for bit; from the third step of a batch size on (warm-up,
 * capture, then replays) a step is one graph launch and no kernel launch. */
static void test_decode_graph_replay(void **s) {
    (void)s;
    rp_error err;
    decode_side side[2];
    side_open(&side[0], rp_cuda_backend_create(0, RP_CUDA_MATH_BF16, &err));
    side_open(&side[1], rp_cuda_backend_create(0, RP_CUDA_MATH_BF16, &err));
    assert_non_null(side[0].be->step_begin);
    side[1].be->step_begin = NULL;
    const size_t V = (size_t)side[0].model.cfg.vocab_size;
    const size_t sf = side[0].state.floats_per_slot * MAX_SEQS;
    float *dl[2], *logits[2], *state[2];
    sides_buffers(side, V, sf, dl, logits, state);
    static const int batch[2] = {1, 3};
    int step = 0;
    for (int bi = 0; bi < 2; bi++)
        for (int k = 0; k < 4; k++, step++) {
            const unsigned long long l0 = counter(launches), g0 = counter(graph_launches);
            graph_step(&side[0], dl[0], batch[bi], step, logits[0], state[0]);
            const unsigned long long launched = counter(launches) - l0,
                                     graphs = counter(graph_launches) - g0;
            graph_step(&side[1], dl[1], batch[bi], step, logits[1], state[1]);
            const int same_logits =
                !memcmp(logits[0], logits[1], (size_t)batch[bi] * V * sizeof(float));
            const int same_state = !memcmp(state[0], state[1], sf * sizeof(float));
            printf("decode batch %d step %d: %llu kernel launches, %llu graph launches; graph "
                   "== eager: logits %s, state %s\n", batch[bi], k, launched, graphs,
                   same_logits ? "yes" : "NO", same_state ? "yes" : "NO");
            assert_true(same_logits);
            assert_true(same_state);
            if (k == 0) assert_int_equal(graphs, 0);     /* warm-up: op by op */
            if (k >= 1) assert_int_equal(graphs, 1);     /* captured, then replayed */
            if (k >= 2) assert_int_equal(launched, 0);
        }
    sides_close(side, dl, logits, state);
}

/* Programmatic dependent launch (issue 15, docs/gpu.md "(issue 15) PDL"):
 * decode steps at batch 1 and 3 with the decode kernels launched with PDL
 * (the default) and with RWKVPIPE_CUDA_PDL=0 (read at a backend's first
 * decode launch), both as step graphs: logits and state bit for bit, PDL
 * launches only in the first, and the graphs replay as before. Throughout,
 * the emulator reports a PDL kernel that touches what a kernel it may
 * overlap writes before its cudaGridDependencySynchronize. */
static void test_decode_graph_pdl(void **s) {
    (void)s;
    rp_error err;
    decode_side side[2];
    unsetenv("RWKVPIPE_CUDA_PDL");
    side_open(&side[0], rp_cuda_backend_create(0, RP_CUDA_MATH_BF16, &err));
    side_open(&side[1], rp_cuda_backend_create(0, RP_CUDA_MATH_BF16, &err));
    const size_t V = (size_t)side[0].model.cfg.vocab_size;
    const size_t sf = side[0].state.floats_per_slot * MAX_SEQS;
    float *dl[2], *logits[2], *state[2];
    sides_buffers(side, V, sf, dl, logits, state);
    static const int batch[2] = {1, 3};
    int step = 0;
    for (int bi = 0; bi < 2; bi++)
        for (int k = 0; k < 4; k++, step++) {
            unsigned long long pdl[2], launched[2], graphs[2];
            for (int i = 0; i < 2; i++) {
                if (i == 1 && step == 0) setenv("RWKVPIPE_CUDA_PDL", "0", 1);
                const unsigned long long p0 = counter(pdl_launches), l0 = counter(launches),
                                         g0 = counter(graph_launches);
                graph_step(&side[i], dl[i], batch[bi], step, logits[i], state[i]);
                pdl[i] = counter(pdl_launches) - p0;
                launched[i] = counter(launches) - l0;
                graphs[i] = counter(graph_launches) - g0;
                unsetenv("RWKVPIPE_CUDA_PDL");
            }
            const int same_logits =
                !memcmp(logits[0], logits[1], (size_t)batch[bi] * V * sizeof(float));
            const int same_state = !memcmp(state[0], state[1], sf * sizeof(float));
            printf("decode batch %d step %d: PDL launches %llu (of %llu), with "
                   "RWKVPIPE_CUDA_PDL=0 %llu (of %llu); logits %s, state %s\n",
                   batch[bi], k, pdl[0], launched[0], pdl[1], launched[1],
                   same_logits ? "equal" : "DIFFER", same_state ? "equal" : "DIFFER");
            assert_true(same_logits);
            assert_true(same_state);
            assert_int_equal(pdl[1], 0);
            if (k < 2) assert_true(pdl[0] > 0);  /* eager and captured steps launch */
            /* every kernel of the eager step is a PDL launch (the embedding,
             * ln0 and ln_out too since issue 15) */
            if (k == 0) assert_int_equal(pdl[0], launched[0]);
            for (int i = 0; i < 2; i++) {
                if (k >= 1) assert_int_equal(graphs[i], 1);
                if (k >= 2) assert_int_equal(launched[i], 0);
            }
        }
    sides_close(side, dl, logits, state);
}

/* An op that synchronizes the host inside the step: the capture fails and
 * status says so (a regression that would stall every decode step). */
static void (*real_layernorm)(rp_backend *, float *, float *, float *, const float *,
                              const float *, const float *, int, int, float);
static void syncing_layernorm(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                              const float *w, const float *b, int R, int C, float eps) {
    be->synchronize(be);
    real_layernorm(be, y, mean, rstd, x, w, b, R, C, eps);
}

static void test_decode_graph_refuses_sync(void **s) {
    (void)s;
    rp_error err;
    decode_side d;
    side_open(&d, rp_cuda_backend_create(0, RP_CUDA_MATH_FP32, &err));
    real_layernorm = d.be->layernorm;
    d.be->layernorm = syncing_layernorm;
    const size_t V = (size_t)d.model.cfg.vocab_size;
    float *dl = d.be->alloc(d.be, MAX_SEQS * V * sizeof(float));
    assert_non_null(dl);
    int seq_len[1] = {1}, slot[1] = {0}, row_begin[1];
    int32_t tokens[1] = {7};
    rp_batch b;
    rp_batch_init(&b, 1, seq_len, slot, row_begin);
    for (int step = 0; step < 2; step++)
        assert_int_equal(rp_model_forward(&d.model, &d.ws, tokens, &b, &d.state, RP_LOGITS_LAST,
                                          dl, &err), RP_OK);
    d.be->synchronize(d.be);
    assert_int_not_equal(d.be->status(d.be, &err), RP_OK);
    printf("a host sync inside the captured step: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "cudaStreamSynchronize"));
    d.be->layernorm = real_layernorm;
    d.be->free(d.be, dl);
    side_close(&d);
}

/* The decode GEMVs alone: 64 rows in one gemv_group call (an [N,K] job and
 * a split-K [K,N] job with epilogues) and matmul_linear / matmul_lora of 64
 * decode rows (set_decode_rows) give each row the bits it gets as a call of
 * that row alone. Fails if a row's sum order depends on M (cuBLAS above 8
 * rows, or row blocks summed differently). */
static void test_decode_rows_gemv_alone(void **s) {
    tiny_fixture *f = *s;
    rp_backend *be = f->be;
    enum { M = 64, N = 96, K = 512, NL = 64 };
    uint32_t h = 4242u;
#define RAND() ((h = h * 1664525u + 1013904223u), (float)(h >> 8) / 16777216.0f * 2.0f - 1.0f)
    float *hx = malloc(sizeof(float) * M * K), *hw = malloc(sizeof(float) * N * K);
    float *hl = malloc(sizeof(float) * K * NL), *hb = malloc(sizeof(float) * N);
    float *all = malloc(sizeof(float) * M * N * 4), *one = malloc(sizeof(float) * M * N * 4);
    assert_non_null(hx);
    assert_non_null(all);
    assert_non_null(one);
    for (int i = 0; i < M * K; i++) hx[i] = RAND();
    for (int i = 0; i < N * K; i++) hw[i] = RAND() * 0.05f;
    for (int i = 0; i < K * NL; i++) hl[i] = RAND() * 0.05f;
    for (int i = 0; i < N; i++) hb[i] = RAND();
    float *x = to_device(be, hx, (size_t)M * K), *w = to_device(be, hw, (size_t)N * K);
    float *wl = to_device(be, hl, (size_t)K * NL), *b = to_device(be, hb, N);
    float *y = be->alloc(be, sizeof(float) * M * N * 4);
    assert_non_null(y);
    /* out 0: gemv_group [N,K] + bias + tanh; 1: gemv_group [K,N] split-K + sigmoid;
     * 2: matmul_linear; 3: matmul_lora (decode rows) */
    for (int pass = 0; pass < 2; pass++) {
        float *dst = pass ? one : all;
        be->fill_zero(be, y, sizeof(float) * M * N * 4);
        for (int r0 = 0; r0 < M; r0 += pass ? 1 : M) {
            const int rows = pass ? 1 : M;
            const float *xr = x + (size_t)r0 * K;
            float *y0 = y + (size_t)r0 * N, *y1 = y + (size_t)M * N + (size_t)r0 * NL;
            float *y2 = y + (size_t)2 * M * N + (size_t)r0 * N;
            float *y3 = y + (size_t)3 * M * N + (size_t)r0 * NL;
            const rp_gemv_job jobs[2] = {{y0, xr, w, b, N, K, 0, 0.0f, RP_ACT_TANH},
                                         {y1, xr, wl, NULL, NL, K, 1, 0.0f, RP_ACT_SIGMOID}};
            be->gemv_group(be, jobs, 2, rows);
            be->set_decode_rows(be, 1);
            be->matmul_linear(be, y2, xr, w, rows, N, K, 0.0f);
            be->matmul_lora(be, y3, xr, wl, rows, NL, K, 0.0f);
            be->set_decode_rows(be, 0);
        }
        be->copy_to_host(be, dst, y, sizeof(float) * M * N * 4);
        rp_error err;
        assert_int_equal(be->status(be, &err), RP_OK);
    }
    int diff[4] = {0, 0, 0, 0};
    for (int o = 0; o < 4; o++) {
        const int n = o % 2 ? NL : N;
        for (int r = 0; r < M; r++)
            diff[o] += memcmp(all + (size_t)o * M * N + (size_t)r * n,
                              one + (size_t)o * M * N + (size_t)r * n, sizeof(float) * n) != 0;
    }
    printf("64 decode rows vs each alone, rows different: gemv_group [N,K] %d, [K,N] split-K %d, "
           "matmul_linear %d, matmul_lora %d\n", diff[0], diff[1], diff[2], diff[3]);
    for (int o = 0; o < 4; o++) assert_int_equal(diff[o], 0);
#undef RAND
    be->free(be, x);
    be->free(be, w);
    be->free(be, wl);
    be->free(be, b);
    be->free(be, y);
    free(hx);
    free(hw);
    free(hl);
    free(hb);
    free(all);
    free(one);
}

/* ---- decode groups: a row's bits do not depend on the group ---- */

#define GROUP_MAX 64

/* One decode step of the sequences first..first+n-1 (slot s, tokens of
 * sequence s) from a zero state, as one group of n; logits [n, V] and the
 * state to the host. */
static void group_steps(decode_side *d, float *dl, int first, int n, float *logits,
                        float *state) {
    const size_t V = (size_t)d->model.cfg.vocab_size, spf = d->state.floats_per_slot;
    int seq_len[GROUP_MAX], slot[GROUP_MAX], row_begin[GROUP_MAX];
    int32_t tokens[GROUP_MAX];
    d->be->fill_zero(d->be, d->state.data, spf * GROUP_MAX * sizeof(float));
    rp_error err;
    for (int step = 0; step < 1; step++) {
        for (int s = 0; s < n; s++) {
            seq_len[s] = 1;
            slot[s] = first + s;
            tokens[s] = (int32_t)(((first + s) * 37 + step * 101 + 5) % (int)V);
        }
        rp_batch b;
        rp_batch_init(&b, n, seq_len, slot, row_begin);
        assert_int_equal(rp_model_forward(&d->model, &d->ws, tokens, &b, &d->state,
                                          RP_LOGITS_LAST, dl, &err), RP_OK);
    }
    d->be->copy_to_host(d->be, logits, dl, (size_t)n * V * sizeof(float));
    d->be->copy_to_host(d->be, state, d->state.data, spf * GROUP_MAX * sizeof(float));
    if (d->be->status(d->be, &err) != RP_OK) fprintf(stderr, "status: %s\n", err.msg);
    assert_int_equal(d->be->status(d->be, &err), RP_OK);
}

/* Sequences 0..16 decoded one step alone and in groups of 9 and 17 (BF16
 * math, step graphs on, a backend sized for groups of 64): every sequence's
 * logits and state slot are the same bits in a group as alone, as the engine
 * promises (decode_group 64). Fails if any GEMM of a decode row sums in an
 * order that depends on the group's row count (cuBLAS above 8 rows did: its
 * rows took the bf16 path). 17 rows fill two of the GEMV's 8-row blocks and
 * start a third; test_decode_rows_gemv_alone takes the kernels to 64 rows
 * (the emulator needs minutes for 64 model steps alone). */
static void test_decode_group_rows_alone(void **s) {
    (void)s;
    rp_error err;
    decode_side d;
    side_open_sized(&d, rp_cuda_backend_create(0, RP_CUDA_MATH_BF16, &err), GROUP_MAX,
                    GROUP_MAX);
    assert_true(d.be->decode_group >= GROUP_MAX);
    const size_t V = (size_t)d.model.cfg.vocab_size, spf = d.state.floats_per_slot;
    float *dl = d.be->alloc(d.be, GROUP_MAX * V * sizeof(float));
    float *alone = malloc(GROUP_MAX * V * sizeof(float)), *alone_state = malloc(GROUP_MAX * spf * sizeof(float));
    float *lg = malloc(GROUP_MAX * V * sizeof(float)), *st = malloc(GROUP_MAX * spf * sizeof(float));
    float *one_state = malloc(GROUP_MAX * spf * sizeof(float));
    assert_non_null(dl);
    assert_non_null(alone);
    assert_non_null(alone_state);
    assert_non_null(lg);
    assert_non_null(st);
    assert_non_null(one_state);
    enum { TESTED = 17 };
    for (int q = 0; q < TESTED; q++) {
        group_steps(&d, dl, q, 1, alone + q * V, one_state);
        memcpy(alone_state + q * spf, one_state + q * spf, spf * sizeof(float));
    }
    static const int groups[2] = {9, TESTED};
    for (int gi = 0; gi < 2; gi++) {
        const int n = groups[gi];
        const unsigned long long l0 = counter(launches);
        group_steps(&d, dl, 0, n, lg, st);
        const unsigned long long launched = counter(launches) - l0;
        int rows_diff = 0, slots_diff = 0;
        for (int q = 0; q < n; q++) {
            rows_diff += memcmp(lg + q * V, alone + q * V, V * sizeof(float)) != 0;
            slots_diff += memcmp(st + q * spf, alone_state + q * spf, spf * sizeof(float)) != 0;
        }
        printf("decode group of %d: %llu launches; rows different from alone: "
               "%d logits, %d state slots\n", n, launched, rows_diff, slots_diff);
        assert_int_equal(rows_diff, 0);
        assert_int_equal(slots_diff, 0);
    }
    d.be->free(d.be, dl);
    free(alone);
    free(alone_state);
    free(lg);
    free(st);
    free(one_state);
    side_close(&d);
}

/* Sparse buffers (backend.h alloc_sparse / release_range; ZeRO-1 gives back
 * the other replicas' fp32 matrix pages with them): zeroed, page-aligned;
 * release_range gives back exactly the whole pages inside the range; the
 * other pages keep their contents and work as GEMM weights (the bf16 copy
 * of a registered buffer); free() frees it (the emulated cuMemAddressFree
 * dies if a page is still mapped). A read of a page given back faults in
 * the emulator (cuMemUnmap protects it), not tested here: it ends the run. */
static void test_sparse_buffers(void **s) {
    (void)s;
    rp_error err;
    rp_backend *be = rp_cuda_backend_create(0, RP_CUDA_MATH_BF16, &err);
    assert_non_null(be);
    const size_t page = be->sparse_page;
    assert_true(page >= 4096 && (page & (page - 1)) == 0);
    assert_non_null(be->alloc_sparse);
    assert_non_null(be->release_range);
    const size_t n = (3 * page + 400) / sizeof(float);  /* 4 pages, the last one partly */
    float *w = be->alloc_sparse(be, n * sizeof(float));
    assert_non_null(w);
    assert_int_equal((uintptr_t)w % page, 0);
    float *host = malloc(n * sizeof(float));
    assert_non_null(host);
    be->copy_to_host(be, host, w, n * sizeof(float));
    for (size_t i = 0; i < n; i++) assert_true(host[i] == 0.0f);
    for (size_t i = 0; i < n; i++) host[i] = (float)(i % 64) * 0.25f;
    be->copy_to_device(be, w, host, n * sizeof(float));
    be->register_weights(be, w, n);
    assert_non_null(be->weight_copy(be, w, n));
    /* [100 bytes, 2 pages + 150 bytes): only page 1 lies inside whole. */
    assert_int_equal(be->release_range(be, (char *)w + 100, 2 * page + 50), page);
    assert_int_equal(be->release_range(be, w, page), page);           /* page 0 */
    assert_int_equal(be->release_range(be, w, page), 0);              /* already given back */
    assert_int_equal(be->release_range(be, (char *)w + 2 * page, 100), 0);  /* no whole page */
    /* Pages 2 and 3 kept their contents, and a GEMM reads their copy. */
    const size_t at = 2 * page / sizeof(float), kept = n - at;
    float *back = malloc(kept * sizeof(float));
    assert_non_null(back);
    be->copy_to_host(be, back, w + at, kept * sizeof(float));
    assert_memory_equal(back, host + at, kept * sizeof(float));
    const int K = 64, N = 64;
    float *x = be->alloc(be, sizeof(float) * K), *y = be->alloc(be, sizeof(float) * N);
    assert_non_null(x);
    assert_non_null(y);
    float ones[64], got[64];
    for (int i = 0; i < K; i++) ones[i] = 1.0f;
    be->copy_to_device(be, x, ones, sizeof ones);
    be->matmul_linear(be, y, x, w + at, 1, N, K, 0.0f);
    be->copy_to_host(be, got, y, sizeof got);
    for (int r = 0; r < N; r++) {
        double sum = 0;  /* the bf16 of each weight: these quarters are exact in bf16 */
        for (int k = 0; k < K; k++) sum += host[at + (size_t)r * K + k];
        assert_true(fabs(got[r] - sum) <= 1e-3 * (fabs(sum) + 1));
    }
    assert_int_equal(be->status(be, &err), RP_OK);
    be->free(be, x);
    be->free(be, y);
    be->free(be, w);
    assert_null(be->weight_copy(be, w + at, kept));  /* forgotten with the buffer */
    assert_int_equal(be->status(be, &err), RP_OK);
    free(host);
    free(back);
    rp_backend_destroy(be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_decode_launch_budget, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_allocation_after_warm_up, setup, teardown),
        cmocka_unit_test_setup_teardown(test_train_convert_budget, setup, teardown),
        cmocka_unit_test_setup_teardown(test_act16_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wkv_dy16_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rkv16_precision, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ln_shift_mix_train_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mix_again_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mix_again_workspace_bytes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_workspace_bytes_04b, setup, teardown),
        cmocka_unit_test_setup_teardown(test_store16_workspace, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mix_grads16_precision, setup, teardown),
        cmocka_unit_test_setup_teardown(test_head_logits16_precision, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gn_bonus_fused_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_attention_tail_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gn_fused_workspace_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gemm_only_reclaimed_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_adamw_multi_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gemm_only_d_pre, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wkv16_train_precision, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wkv_dw16_precision, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drkv16_precision, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drkv16_needs_rkv16, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dog16_precision, setup, teardown),
        cmocka_unit_test_setup_teardown(test_w0_epilogue_precision, setup, teardown),
        cmocka_unit_test_setup_teardown(test_decode_lora_down_split, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reserve_sizes_uploads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ln_shift_mix_twin, setup, teardown),
        cmocka_unit_test(test_decode_model_twin),
        cmocka_unit_test(test_decode_ln_mix_exact),
        cmocka_unit_test(test_decode_graph_replay),
        cmocka_unit_test(test_decode_graph_refuses_sync),
        cmocka_unit_test(test_decode_graph_pdl),
        cmocka_unit_test_setup_teardown(test_decode_rows_gemv_alone, setup, teardown),
        cmocka_unit_test(test_decode_group_rows_alone),
        cmocka_unit_test(test_sparse_buffers),
    };
    /* RP_TEST_FILTER=test_decode_graph* runs only those (each test is slow). */
    if (getenv("RP_TEST_FILTER")) cmocka_set_test_filter(getenv("RP_TEST_FILTER"));
    return cmocka_run_group_tests_name("cuda_budget", tests, NULL, NULL);
}
