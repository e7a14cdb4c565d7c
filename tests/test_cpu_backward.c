/* The CPU backend's backward (training) ops, each against central finite
 * differences of a double-precision reference forward written here as loops,
 * under a random projection loss L = sum(y * u) (u random, so every output
 * element carries a different weight). Inputs are the fp32 test data widened
 * to double; gradient buffers are pre-filled (random where the op accumulates,
 * NaN where it overwrites) to pin down the += / = semantics of backend.h.
 * Also: calling twice doubles parameter gradients, results do not depend on
 * the thread count (bitwise), wkv7_forward_train equals wkv7 and saves the
 * state at every chunk start, a sequence's backward split over two calls
 * chains through the state gradient, and cross_entropy against log-softmax. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu_test_util.h"

/* Central differences on the double reference: truncation ~h^2 ~1e-8 and
 * rounding ~1e-16 |L| / h, both far below the fp32 errors being measured. */
#define FD_STEP 1e-4

#define LN_EPS 1e-5
#define GN_EPS 64e-5

/* ---- fixtures and random data: tests/cpu_test_util.h ---- */

static void rng_seed(uint64_t seed) { rng_state = seed ? seed : 1; }


static int rng_below(int n) { return (int)rng_uniform(0, n) % n; }

static float *zero_floats(size_t n) {
    float *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}

/* Pre-fill of outputs the op must overwrite: any read of them shows up. */
static float *nan_floats(size_t n) {
    float *p = malloc((n ? n : 1) * sizeof *p);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = NAN;
    return p;
}

static double *new_doubles(size_t n) {
    double *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}

static double *to_doubles(const float *x, size_t n) {
    double *p = new_doubles(n);
    for (size_t i = 0; i < n; i++) p[i] = x[i];
    return p;
}

/* What an accumulating op added: after - before (before NULL: after). */
static double *added(const float *after, const float *before, size_t n) {
    double *p = new_doubles(n);
    for (size_t i = 0; i < n; i++) p[i] = (double)after[i] - (before ? (double)before[i] : 0.0);
    return p;
}

/* ---- checks ---- */

/* Every element within rtol * (|ref| + rms(ref)): relative where the value is
 * large, relative to the array's magnitude where it cancelled to ~0. Prints
 * the achieved level (max error in units of |ref| + rms) and frees got. */
static void check_grad(const char *what, double *got, const double *ref, size_t n, double rtol) {
    double sq = 0.0;
    for (size_t i = 0; i < n; i++) sq += ref[i] * ref[i];
    const double scale = n ? sqrt(sq / n) : 0.0;
    size_t worst = 0;
    double worst_err = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            fail_msg("%s: element %zu is %g (reference %.9g)", what, i, got[i], ref[i]);
        const double diff = fabs(got[i] - ref[i]);
        if (diff == 0.0) continue;
        const double err = diff / (fabs(ref[i]) + scale);
        if (err > worst_err) {
            worst_err = err;
            worst = i;
        }
    }
    print_message("  %-34s max rel err %.1e (bound %.0e, rms %.2g)\n", what, worst_err, rtol,
                  scale);
    if (worst_err > rtol)
        fail_msg("%s: element %zu = %.9g, reference %.9g: relative error %.3g > %g (rms %.3g)",
                 what, worst, got[worst], ref[worst], worst_err, rtol, scale);
    free(got);
}

static void check_equal_floats(const char *what, const float *got, const float *want,
                               size_t n) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0)
            fail_msg("%s: element %zu = %.9g, expected exactly %.9g", what, i, got[i],
                     want[i]);
}

/* ---- finite differences ---- */

typedef double (*loss_fn)(const void *ctx);

/* dL/dx [n] by central differences; x is one of the arrays loss reads. */
static double *fd_gradient(double *x, size_t n, loss_fn loss, const void *ctx) {
    double *g = new_doubles(n);
    for (size_t i = 0; i < n; i++) {
        const double x0 = x[i];
        x[i] = x0 + FD_STEP;
        const double plus = loss(ctx);
        x[i] = x0 - FD_STEP;
        const double minus = loss(ctx);
        x[i] = x0;
        g[i] = (plus - minus) / (2.0 * FD_STEP);
    }
    return g;
}


static int seq_of_row(const test_batch *tb, int row) {
    for (int s = tb->n_seq - 1; s >= 0; s--)
        if (row >= tb->row_begin[s]) return s;
    return 0;
}

/* The ragged batch of the recurrent ops: a 1-token sequence, one shorter than
 * a chunk, one crossing a chunk boundary and one over two; slots permuted and
 * slot 1 unused (its state and state gradient must stay as they are). */
enum { RAGGED_SEQ = 4, RAGGED_SLOTS = 5 };
static const int ragged_len[RAGGED_SEQ] = {7, 1, 20, 33};
static const int ragged_slot[RAGGED_SEQ] = {2, 4, 0, 3};

/* ================= cross-entropy ================= */

/* losses [R] = -log softmax(z)[t]; dlogits = (softmax - onehot) * scale. */
static void test_cross_entropy_matches_double_log_softmax_and_ignores_rows(void **state) {
    (void)state;
    enum { R = 6, V = 37 };
    const int32_t targets[R] = {3, -1, 0, 36, 10, -7};
    const float scale = 0.25f;
    float *logits = random_floats((size_t)R * V, -4, 4);
    for (int i = 0; i < V; i++) logits[3 * V + i] += 80.0f; /* needs the max shift */
    logits[4 * V + 10] = 30.0f;                              /* a confident row */

    double ref_loss[R], *ref_d = new_doubles((size_t)R * V);
    for (int r = 0; r < R; r++) {
        const float *z = logits + (size_t)r * V;
        if (targets[r] < 0) {
            ref_loss[r] = 0.0;
            continue;
        }
        double mx = z[0], sum = 0.0;
        for (int i = 1; i < V; i++) mx = z[i] > mx ? z[i] : mx;
        for (int i = 0; i < V; i++) sum += exp(z[i] - mx);
        const double lse = mx + log(sum);
        ref_loss[r] = lse - z[targets[r]];
        for (int i = 0; i < V; i++)
            ref_d[(size_t)r * V + i] = (exp(z[i] - lse) - (i == targets[r])) * scale;
    }

    for (int b = 0; b < N_BACKENDS; b++) {
        rp_backend *be = backends[b];
        float losses[R], *d = nan_floats((size_t)R * V);
        for (int r = 0; r < R; r++) losses[r] = NAN;
        be->cross_entropy(be, losses, d, logits, targets, R, V, scale);
        if (b == 0) {
            check_grad("cross_entropy losses", added(losses, NULL, R), ref_loss, R, 3e-6);
            check_grad("cross_entropy dlogits", added(d, NULL, (size_t)R * V), ref_d,
                       (size_t)R * V, 3e-6);
        }
        for (int r = 0; r < R; r++)
            if (targets[r] < 0) {
                assert_true(losses[r] == 0.0f);
                for (int i = 0; i < V; i++) assert_true(d[(size_t)r * V + i] == 0.0f);
            }

        /* dlogits may alias logits; without dlogits the losses stay the same */
        float *inplace = copy_floats(logits, (size_t)R * V), losses2[R], losses3[R];
        be->cross_entropy(be, losses2, inplace, inplace, targets, R, V, scale);
        check_equal_floats("cross_entropy in place", inplace, d, (size_t)R * V);
        check_equal_floats("cross_entropy in place losses", losses2, losses, R);
        be->cross_entropy(be, losses3, NULL, logits, targets, R, V, scale);
        check_equal_floats("cross_entropy losses only", losses3, losses, R);
        free(inplace);
        free(d);
    }
    free(ref_d);
    free(logits);
}

/* ================= dense ================= */

typedef struct {
    int M, N, K, lora;
    double *x, *w, *u;
} matmul_ctx;

/* L = sum(y u), y = x W^T (W [N,K]) or, lora, y = x W (W [K,N]) */
static double matmul_loss(const void *p) {
    const matmul_ctx *c = p;
    double L = 0.0;
    for (int m = 0; m < c->M; m++)
        for (int n = 0; n < c->N; n++) {
            double y = 0.0;
            for (int k = 0; k < c->K; k++)
                y += c->x[(size_t)m * c->K + k] *
                     (c->lora ? c->w[(size_t)k * c->N + n] : c->w[(size_t)n * c->K + k]);
            L += y * c->u[(size_t)m * c->N + n];
        }
    return L;
}

static void check_matmul_backward(int lora) {
    const int M = 7, N = 19, K = 37;
    const size_t nx = (size_t)M * K, nw = (size_t)N * K, ny = (size_t)M * N;
    float *x = random_floats(nx, -1, 1), *w = random_floats(nw, -1, 1);
    float *u = random_floats(ny, -1, 1);
    float *dx0 = random_floats(nx, -1, 1), *dw0 = random_floats(nw, -1, 1);
    float *dx = copy_floats(dx0, nx), *dw = copy_floats(dw0, nw), *dw_alone = copy_floats(dw0, nw);
    rp_backend *be = backends[0];
    if (lora) {
        be->matmul_lora_backward(be, dx, dw, u, x, w, M, N, K);
        be->matmul_lora_backward(be, NULL, dw_alone, u, x, w, M, N, K);
    } else {
        be->matmul_linear_backward(be, dx, dw, u, x, w, M, N, K);
        be->matmul_linear_backward(be, NULL, dw_alone, u, x, w, M, N, K);
    }
    check_equal_floats("dw without dx", dw_alone, dw, nw);

    matmul_ctx c = {M, N, K, lora, to_doubles(x, nx), to_doubles(w, nw), to_doubles(u, ny)};
    double *fd_x = fd_gradient(c.x, nx, matmul_loss, &c);
    double *fd_w = fd_gradient(c.w, nw, matmul_loss, &c);
    check_grad(lora ? "matmul_lora dx" : "matmul_linear dx", added(dx, dx0, nx), fd_x, nx, 2e-6);
    check_grad(lora ? "matmul_lora dw" : "matmul_linear dw", added(dw, dw0, nw), fd_w, nw, 2e-6);
    free(fd_x);
    free(fd_w);
    free(c.x);
    free(c.w);
    free(c.u);
    free(x);
    free(w);
    free(u);
    free(dx0);
    free(dw0);
    free(dx);
    free(dw);
    free(dw_alone);
}

static void test_matmul_linear_backward_matches_finite_differences(void **state) {
    (void)state;
    check_matmul_backward(0);
}

static void test_matmul_lora_backward_matches_finite_differences(void **state) {
    (void)state;
    check_matmul_backward(1);
}

/* ================= position-wise ================= */

static void test_embedding_backward_adds_rows_in_order_for_repeated_tokens(void **state) {
    (void)state;
    enum { R = 9, C = 130, V = 6 };
    const int32_t tokens[R] = {4, 0, 4, 2, 4, 5, 0, 1, 4};
    float *dx = random_floats((size_t)R * C, -1, 1), *demb0 = random_floats((size_t)V * C, -1, 1);
    float *want = copy_floats(demb0, (size_t)V * C);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) want[(size_t)tokens[r] * C + c] += dx[(size_t)r * C + c];
    for (int b = 0; b < N_BACKENDS; b++) {
        float *demb = copy_floats(demb0, (size_t)V * C);
        backends[b]->embedding_backward(backends[b], demb, dx, tokens, R, C);
        check_equal_floats("embedding_backward", demb, want, (size_t)V * C);
        free(demb);
    }
    free(dx);
    free(demb0);
    free(want);
}

/* LayerNorm (G = C) and GroupNorm (G = N) over groups of G channels. */
typedef struct {
    int R, C, G;
    double eps, *x, *w, *b, *u;
} norm_ctx;

static double norm_loss(const void *p) {
    const norm_ctx *c = p;
    double L = 0.0;
    for (int r = 0; r < c->R; r++)
        for (int g0 = 0; g0 < c->C; g0 += c->G) {
            const double *x = c->x + (size_t)r * c->C + g0;
            double m = 0.0, v = 0.0;
            for (int i = 0; i < c->G; i++) m += x[i];
            m /= c->G;
            for (int i = 0; i < c->G; i++) v += (x[i] - m) * (x[i] - m);
            const double s = 1.0 / sqrt(v / c->G + c->eps);
            for (int i = 0; i < c->G; i++)
                L += ((x[i] - m) * s * c->w[g0 + i] + c->b[g0 + i]) *
                     c->u[(size_t)r * c->C + g0 + i];
        }
    return L;
}

static void check_norm_backward(int group) {
    const int R = 5, C = 128, N = 64, G = group ? N : C, H = C / G;
    const size_t n = (size_t)R * C;
    float *x = random_floats(n, -2, 2);
    for (int r = 0; r < R; r++) /* an offset per group: mean and var both matter */
        for (int c = 0; c < C; c++) x[(size_t)r * C + c] += 0.3f * r - 0.5f * (c / G);
    float *w = random_floats(C, 0.5, 1.5), *bias = random_floats(C, -0.5, 0.5);
    float *u = random_floats(n, -1, 1), *y = zero_floats(n);
    float *mean = zero_floats((size_t)R * H), *rstd = zero_floats((size_t)R * H);
    rp_backend *be = backends[0];
    if (group)
        be->groupnorm(be, y, mean, rstd, x, w, bias, R, C, N, (float)GN_EPS);
    else
        be->layernorm(be, y, mean, rstd, x, w, bias, R, C, (float)LN_EPS);

    /* dx: GroupNorm overwrites, LayerNorm accumulates; dweight, dbias += */
    float *dx0 = group ? NULL : random_floats(n, -1, 1);
    float *dx = group ? nan_floats(n) : copy_floats(dx0, n);
    float *dw0 = random_floats(C, -1, 1), *db0 = random_floats(C, -1, 1);
    float *dw = copy_floats(dw0, C), *db = copy_floats(db0, C);
    if (group)
        be->groupnorm_backward(be, dx, dw, db, u, x, mean, rstd, w, R, C, N);
    else
        be->layernorm_backward(be, dx, dw, db, u, x, mean, rstd, w, R, C);

    norm_ctx c = {R, C, G, group ? GN_EPS : LN_EPS, to_doubles(x, n), to_doubles(w, C),
                  to_doubles(bias, C), to_doubles(u, n)};
    double *fd_x = fd_gradient(c.x, n, norm_loss, &c);
    double *fd_w = fd_gradient(c.w, C, norm_loss, &c);
    double *fd_b = fd_gradient(c.b, C, norm_loss, &c);
    check_grad(group ? "groupnorm dx" : "layernorm dx", added(dx, dx0, n), fd_x, n, 2e-6);
    check_grad(group ? "groupnorm dweight" : "layernorm dweight", added(dw, dw0, C), fd_w, C,
               2e-6);
    check_grad(group ? "groupnorm dbias" : "layernorm dbias", added(db, db0, C), fd_b, C, 2e-6);
    free(fd_x);
    free(fd_w);
    free(fd_b);
    free(c.x);
    free(c.w);
    free(c.b);
    free(c.u);
    free(x);
    free(w);
    free(bias);
    free(u);
    free(y);
    free(mean);
    free(rstd);
    free(dx0);
    free(dx);
    free(dw0);
    free(db0);
    free(dw);
    free(db);
}

static void test_layernorm_backward_matches_finite_differences(void **state) {
    (void)state;
    check_norm_backward(0);
}

static void test_groupnorm_backward_matches_finite_differences_and_overwrites_dx(void **state) {
    (void)state;
    check_norm_backward(1);
}

/* y = x + (prev - x) mu */
typedef struct {
    int R, C;
    double *x, *prev, *mu, *u;
} lerp_ctx;

static double lerp_loss(const void *p) {
    const lerp_ctx *c = p;
    double L = 0.0;
    for (int r = 0; r < c->R; r++)
        for (int j = 0; j < c->C; j++) {
            const size_t i = (size_t)r * c->C + j;
            L += (c->x[i] + (c->prev[i] - c->x[i]) * c->mu[j]) * c->u[i];
        }
    return L;
}

static void test_lerp_backward_matches_finite_differences(void **state) {
    (void)state;
    const int R = 5, C = 128;
    const size_t n = (size_t)R * C;
    float *x = random_floats(n, -1, 1), *prev = random_floats(n, -1, 1);
    float *mu = random_floats(C, 0, 1), *u = random_floats(n, -1, 1);
    float *dx0 = random_floats(n, -1, 1), *dp0 = random_floats(n, -1, 1);
    float *dmu0 = random_floats(C, -1, 1);
    float *dx = copy_floats(dx0, n), *dp = copy_floats(dp0, n), *dmu = copy_floats(dmu0, C);
    backends[0]->lerp_backward(backends[0], dx, dp, dmu, u, x, prev, mu, R, C);

    lerp_ctx c = {R, C, to_doubles(x, n), to_doubles(prev, n), to_doubles(mu, C),
                  to_doubles(u, n)};
    double *fd_x = fd_gradient(c.x, n, lerp_loss, &c);
    double *fd_p = fd_gradient(c.prev, n, lerp_loss, &c);
    double *fd_mu = fd_gradient(c.mu, C, lerp_loss, &c);
    check_grad("lerp dx", added(dx, dx0, n), fd_x, n, 1e-6);
    check_grad("lerp dprev", added(dp, dp0, n), fd_p, n, 1e-6);
    check_grad("lerp dmu", added(dmu, dmu0, C), fd_mu, C, 1e-6);
    free(fd_x);
    free(fd_p);
    free(fd_mu);
    free(c.x);
    free(c.prev);
    free(c.mu);
    free(c.u);
    free(x);
    free(prev);
    free(mu);
    free(u);
    free(dx0);
    free(dp0);
    free(dmu0);
    free(dx);
    free(dp);
    free(dmu);
}

/* Token shift over a ragged batch: L = sum(prev u) + sum over all slots of
 * (state after) U, so that dL/d(state before) is what the op must return in
 * the slots (and an unused slot keeps U). */
typedef struct {
    const test_batch *tb;
    int C, n_slots;
    size_t stride;
    double *x, *state, *u, *U;
} shift_ctx;

static double shift_loss(const void *p) {
    const shift_ctx *c = p;
    const int C = c->C;
    double L = 0.0;
    for (int s = 0; s < c->tb->n_seq; s++) {
        const int row0 = c->tb->row_begin[s], len = c->tb->seq_len[s];
        const double *st = c->state + (size_t)c->tb->slot[s] * c->stride;
        for (int t = 0; t < len; t++)
            for (int j = 0; j < C; j++)
                L += (t == 0 ? st[j] : c->x[(size_t)(row0 + t - 1) * C + j]) *
                     c->u[(size_t)(row0 + t) * C + j];
    }
    for (int slot = 0; slot < c->n_slots; slot++) {
        const double *st = c->state + (size_t)slot * c->stride;
        for (int s = 0; s < c->tb->n_seq; s++)
            if (c->tb->slot[s] == slot)
                st = c->x + (size_t)(c->tb->row_begin[s] + c->tb->seq_len[s] - 1) * C;
        for (int j = 0; j < C; j++) L += st[j] * c->U[(size_t)slot * c->stride + j];
    }
    return L;
}

static void test_token_shift_backward_matches_finite_differences_over_ragged_batch(void **state) {
    (void)state;
    const int C = 128;
    const size_t stride = (size_t)C + 16; /* the slot's other state follows */
    test_batch tb;
    make_batch(&tb, RAGGED_SEQ, ragged_len, ragged_slot);
    const int R = tb.batch.n_rows;
    const size_t n = (size_t)R * C, n_state = RAGGED_SLOTS * stride;
    float *x = random_floats(n, -1, 1), *state0 = random_floats(n_state, -1, 1);
    float *u = random_floats(n, -1, 1), *U = random_floats(n_state, -1, 1);
    float *dx0 = random_floats(n, -1, 1);

    shift_ctx c = {&tb, C, RAGGED_SLOTS, stride, to_doubles(x, n), to_doubles(state0, n_state),
                   to_doubles(u, n), to_doubles(U, n_state)};
    double *fd_x = fd_gradient(c.x, n, shift_loss, &c);
    double *fd_state = fd_gradient(c.state, n_state, shift_loss, &c);
    float *dx_one = NULL, *dstate_one = NULL;
    for (int b = 0; b < N_BACKENDS; b++) {
        float *dx = copy_floats(dx0, n), *dstate = copy_floats(U, n_state);
        backends[b]->token_shift_backward(backends[b], dx, dstate, stride, u, &tb.batch, C);
        if (b > 0) { /* the same bits whatever the thread count */
            check_equal_floats("token_shift dx, threads", dx, dx_one, n);
            check_equal_floats("token_shift dstate, threads", dstate, dstate_one, n_state);
            free(dx);
            free(dstate);
            continue;
        }
        check_grad("token_shift dx", added(dx, dx0, n), fd_x, n, 1e-6);
        /* d(state before) in the C channels of every slot, the rest untouched */
        double *got = new_doubles(n_state);
        for (size_t i = 0; i < n_state; i++) got[i] = dstate[i];
        for (int slot = 0; slot < RAGGED_SLOTS; slot++)
            for (size_t j = C; j < stride; j++) {
                const size_t i = slot * stride + j;
                assert_true(memcmp(&dstate[i], &U[i], sizeof(float)) == 0);
                got[i] = fd_state[i] = 0.0;
            }
        check_grad("token_shift dstate", got, fd_state, n_state, 1e-6);
        dx_one = dx;
        dstate_one = dstate;
    }
    free(dx_one);
    free(dstate_one);
    free(fd_x);
    free(fd_state);
    free(c.x);
    free(c.state);
    free(c.u);
    free(c.U);
    free(x);
    free(state0);
    free(u);
    free(U);
    free(dx0);
}

/* y = act(pre + bias) */
typedef struct {
    int R, C;
    rp_activation act;
    double *pre, *bias, *u;
} bias_act_ctx;

static double ref_act(rp_activation act, double t) {
    switch (act) {
    case RP_ACT_TANH: return tanh(t);
    case RP_ACT_SIGMOID: return 1.0 / (1.0 + exp(-t));
    case RP_ACT_RELU_SQUARED: return t > 0.0 ? t * t : 0.0;
    case RP_ACT_NONE: break;
    }
    return t;
}

static double bias_act_loss(const void *p) {
    const bias_act_ctx *c = p;
    double L = 0.0;
    for (int r = 0; r < c->R; r++)
        for (int j = 0; j < c->C; j++) {
            const size_t i = (size_t)r * c->C + j;
            L += ref_act(c->act, c->pre[i] + c->bias[j]) * c->u[i];
        }
    return L;
}

static void test_bias_act_backward_matches_finite_differences_for_every_activation(
    void **state) {
    (void)state;
    const int R = 5, C = 128;
    const size_t n = (size_t)R * C;
    const rp_activation acts[] = {RP_ACT_NONE, RP_ACT_TANH, RP_ACT_SIGMOID,
                                  RP_ACT_RELU_SQUARED};
    const char *names[] = {"bias_act none", "bias_act tanh", "bias_act sigmoid",
                           "bias_act relu^2"};
    for (int ai = 0; ai < 4; ai++) {
        float *pre = random_floats(n, -2.5, 2.5), *bias = random_floats(C, -0.5, 0.5);
        float *u = random_floats(n, -1, 1), *db0 = random_floats(C, -1, 1);
        float *y = copy_floats(pre, n);
        rp_backend *be = backends[0];
        be->bias_act(be, y, bias, R, C, acts[ai]);
        float *dy = copy_floats(u, n), *db = copy_floats(db0, C);
        be->bias_act_backward(be, dy, db, y, R, C, acts[ai]);
        float *dy_alone = copy_floats(u, n); /* dbias is optional */
        be->bias_act_backward(be, dy_alone, NULL, y, R, C, acts[ai]);
        check_equal_floats("bias_act_backward without dbias", dy_alone, dy, n);

        bias_act_ctx c = {R, C, acts[ai], to_doubles(pre, n), to_doubles(bias, C),
                          to_doubles(u, n)};
        double *fd_pre = fd_gradient(c.pre, n, bias_act_loss, &c);
        double *fd_b = fd_gradient(c.bias, C, bias_act_loss, &c);
        char what[64];
        snprintf(what, sizeof what, "%s d(pre)", names[ai]);
        check_grad(what, added(dy, NULL, n), fd_pre, n, 2e-6);
        snprintf(what, sizeof what, "%s dbias", names[ai]);
        check_grad(what, added(db, db0, C), fd_b, C, 2e-6);
        free(fd_pre);
        free(fd_b);
        free(c.pre);
        free(c.bias);
        free(c.u);
        free(pre);
        free(bias);
        free(u);
        free(db0);
        free(y);
        free(dy);
        free(db);
        free(dy_alone);
    }
}

/* v_out = v + (v_first - v) nu */
typedef struct {
    size_t n;
    double *v, *vf, *nu, *u;
} residual_ctx;

static double residual_loss(const void *p) {
    const residual_ctx *c = p;
    double L = 0.0;
    for (size_t i = 0; i < c->n; i++) L += (c->v[i] + (c->vf[i] - c->v[i]) * c->nu[i]) * c->u[i];
    return L;
}

static void test_value_residual_backward_matches_finite_differences(void **state) {
    (void)state;
    const int R = 5, C = 128;
    const size_t n = (size_t)R * C;
    float *v = random_floats(n, -1, 1), *vf = random_floats(n, -1, 1);
    float *nu = random_floats(n, 0, 1), *u = random_floats(n, -1, 1);
    float *dvf0 = random_floats(n, -1, 1);
    float *dv = copy_floats(u, n), *dvf = copy_floats(dvf0, n), *dnu = nan_floats(n);
    backends[0]->value_residual_backward(backends[0], dv, dvf, dnu, v, vf, nu, R, C);

    residual_ctx c = {n, to_doubles(v, n), to_doubles(vf, n), to_doubles(nu, n),
                      to_doubles(u, n)};
    double *fd_v = fd_gradient(c.v, n, residual_loss, &c);
    double *fd_vf = fd_gradient(c.vf, n, residual_loss, &c);
    double *fd_nu = fd_gradient(c.nu, n, residual_loss, &c);
    check_grad("value_residual dv", added(dv, NULL, n), fd_v, n, 1e-6);
    check_grad("value_residual dv_first", added(dvf, dvf0, n), fd_vf, n, 1e-6);
    check_grad("value_residual dnu", added(dnu, NULL, n), fd_nu, n, 1e-6);
    free(fd_v);
    free(fd_vf);
    free(fd_nu);
    free(c.v);
    free(c.vf);
    free(c.nu);
    free(c.u);
    free(v);
    free(vf);
    free(nu);
    free(u);
    free(dvf0);
    free(dv);
    free(dvf);
    free(dnu);
}

/* kk = normalize_per_head(k k_k) (torch: / max(norm, 1e-12)),
 * k_out = k (1 + (a - 1) k_a); L = sum(kk u_kk) + sum(k_out u_k). */
typedef struct {
    int R, C, N;
    double *k, *a, *k_k, *k_a, *u_kk, *u_k;
} key_ctx;

static double key_loss(const void *p) {
    const key_ctx *c = p;
    const int N = c->N;
    double L = 0.0;
    for (int r = 0; r < c->R; r++)
        for (int h0 = 0; h0 < c->C; h0 += N) {
            const size_t o = (size_t)r * c->C + h0;
            double n2 = 0.0;
            for (int j = 0; j < N; j++) n2 += pow(c->k[o + j] * c->k_k[h0 + j], 2);
            const double norm = fmax(sqrt(n2), 1e-12);
            for (int j = 0; j < N; j++) {
                const size_t i = o + j;
                L += c->k[i] * c->k_k[h0 + j] / norm * c->u_kk[i];
                L += c->k[i] * (1.0 + (c->a[i] - 1.0) * c->k_a[h0 + j]) * c->u_k[i];
            }
        }
    return L;
}

/* Row 1, head 0 is zero: the norm is clamped to 1e-12 there, kk = u / 1e-12
 * is linear in k around 0 and its gradient is u_kk k_k / 1e-12 (torch). */
static void check_key_prepare_backward(int R, int C, int N) {
    const size_t n = (size_t)R * C;
    float *k = random_floats(n, -1, 1), *a = random_floats(n, 0, 1);
    for (int j = 0; j < N; j++) k[C + j] = 0.0f;
    float *k_k = random_floats(C, 0.5, 1.5), *k_a = random_floats(C, 0.5, 1.5);
    float *u_kk = random_floats(n, -1, 1), *u_k = random_floats(n, -1, 1);
    float *da0 = random_floats(n, -1, 1), *dkk_k0 = random_floats(C, -1, 1);
    float *dka0 = random_floats(C, -1, 1);
    float *dk = copy_floats(u_k, n), *da = copy_floats(da0, n);
    float *dkk_k = copy_floats(dkk_k0, C), *dka = copy_floats(dka0, C);
    backends[0]->key_prepare_backward(backends[0], dk, da, dkk_k, dka, u_kk, k, a, k_k, k_a, R,
                                      C, N);

    key_ctx c = {R, C, N, to_doubles(k, n), to_doubles(a, n), to_doubles(k_k, C),
                 to_doubles(k_a, C), to_doubles(u_kk, n), to_doubles(u_k, n)};
    double *fd_k = fd_gradient(c.k, n, key_loss, &c);
    /* Central differences step out of the |u| < 1e-12 region: the clamped
     * branch is checked against its closed form instead. */
    for (int j = 0; j < N; j++) {
        const size_t i = (size_t)C + j;
        fd_k[i] = c.u_k[i] * (1.0 + (c.a[i] - 1.0) * c.k_a[j]) + c.u_kk[i] * c.k_k[j] / 1e-12;
    }
    double *fd_a = fd_gradient(c.a, n, key_loss, &c);
    double *fd_kk = fd_gradient(c.k_k, C, key_loss, &c);
    double *fd_ka = fd_gradient(c.k_a, C, key_loss, &c);
    /* the clamped head is ~1e12 times the others: checked on its own */
    double *got_k = added(dk, NULL, n), *got_zero = new_doubles(N), *ref_zero = new_doubles(N);
    for (int j = 0; j < N; j++) {
        got_zero[j] = got_k[C + j];
        ref_zero[j] = fd_k[C + j];
        got_k[C + j] = fd_k[C + j] = 0.0;
    }
    check_grad("key_prepare dk", got_k, fd_k, n, 2e-6);
    check_grad("key_prepare dk (clamped norm)", got_zero, ref_zero, N, 1e-6);
    check_grad("key_prepare da", added(da, da0, n), fd_a, n, 1e-6);
    check_grad("key_prepare dk_k", added(dkk_k, dkk_k0, C), fd_kk, C, 2e-6);
    check_grad("key_prepare dk_a", added(dka, dka0, C), fd_ka, C, 1e-6);
    free(ref_zero);
    free(fd_k);
    free(fd_a);
    free(fd_kk);
    free(fd_ka);
    free(c.k);
    free(c.a);
    free(c.k_k);
    free(c.k_a);
    free(c.u_kk);
    free(c.u_k);
    free(k);
    free(a);
    free(k_k);
    free(k_a);
    free(u_kk);
    free(u_k);
    free(da0);
    free(dkk_k0);
    free(dka0);
    free(dk);
    free(da);
    free(dkk_k);
    free(dka);
}

static void test_key_prepare_backward_matches_finite_differences_and_clamped_norm(
    void **state) {
    (void)state;
    check_key_prepare_backward(5, 128, 64);
}

/* Heads of other sizes (the op takes N like its siblings). */
static void test_key_prepare_backward_matches_finite_differences_for_any_head_size(
    void **state) {
    (void)state;
    check_key_prepare_backward(4, 96, 32);
    check_key_prepare_backward(3, 36, 12);
}

/* An op called beyond what reserve prepared does nothing, and status
 * reports it (no malloc, no abort inside an op); after reserve it runs. */
static void test_op_beyond_reserve_reports_error_and_reserve_fixes_it(void **state) {
    (void)state;
    rp_error err = {0};
    rp_backend *be = rp_cpu_backend_create(2, &err);
    assert_non_null(be);
    const int R = 3, C = 128, N = 64;
    const size_t n = (size_t)R * C;
    float *o = random_floats(n, -1, 1), *r = random_floats(n, -1, 1);
    float *k = random_floats(n, -1, 1), *v = random_floats(n, -1, 1);
    float *g = random_floats(n, -1, 1), *u = random_floats(n, -1, 1);
    float *r_k = random_floats(C, -1, 1);
    float *d_o = calloc(n, sizeof(float)), *dr = calloc(n, sizeof(float));
    float *dk = calloc(n, sizeof(float)), *dv = calloc(n, sizeof(float));
    float *dg = calloc(n, sizeof(float)), *drk = calloc(C, sizeof(float));
    assert_int_equal(be->status(be, &err), RP_OK);
    be->bonus_gate_backward(be, d_o, dr, dk, dv, drk, dg, u, o, r, k, v, r_k, g, R, C, N);
    assert_int_equal(be->status(be, &err), RP_ERR_INTERNAL);
    assert_non_null(strstr(err.msg, "bonus_gate_backward"));
    assert_non_null(strstr(err.msg, "reserve"));
    for (size_t i = 0; i < n; i++) assert_true(d_o[i] == 0.0f && dg[i] == 0.0f);
    /* bad shapes are refused */
    rp_error e2 = {0};
    assert_int_equal(be->reserve(be, 0, 1, C, N, &e2), RP_ERR_ARG);
    assert_int_equal(be->reserve(be, R, 1, C, N, &e2), RP_OK);
    be->bonus_gate_backward(be, d_o, dr, dk, dv, drk, dg, u, o, r, k, v, r_k, g, R, C, N);
    float *want = random_floats(n, 0, 0);
    backends[0]->bonus_gate_backward(backends[0], want, dr, dk, dv, drk, dg, u, o, r, k, v, r_k,
                                     g, R, C, N);
    check_equal_floats("bonus_gate_backward d_o after reserve", d_o, want, n);
    free(want);
    rp_cpu_backend_destroy(be);
    free(o), free(r), free(k), free(v), free(g), free(u), free(r_k);
    free(d_o), free(dr), free(dk), free(dv), free(dg), free(drk);
}

/* out = (o + (sum_j r_j k_j r_k[h,j]) v_h) g */
typedef struct {
    int R, C, N;
    double *o, *r, *k, *v, *r_k, *g, *u;
} bonus_ctx;

static double bonus_loss(const void *p) {
    const bonus_ctx *c = p;
    double L = 0.0;
    for (int row = 0; row < c->R; row++)
        for (int h0 = 0; h0 < c->C; h0 += c->N) {
            const size_t o = (size_t)row * c->C + h0;
            double s = 0.0;
            for (int j = 0; j < c->N; j++) s += c->r[o + j] * c->k[o + j] * c->r_k[h0 + j];
            for (int j = 0; j < c->N; j++)
                L += (c->o[o + j] + s * c->v[o + j]) * c->g[o + j] * c->u[o + j];
        }
    return L;
}

static void test_bonus_gate_backward_matches_finite_differences(void **state) {
    (void)state;
    const int R = 5, C = 128, N = 64;
    const size_t n = (size_t)R * C;
    float *o = random_floats(n, -1, 1), *r = random_floats(n, -1, 1);
    float *k = random_floats(n, -1, 1), *v = random_floats(n, -1, 1);
    float *r_k = random_floats(C, -1, 1), *g = random_floats(n, -1, 1);
    float *u = random_floats(n, -1, 1);
    float *dr0 = random_floats(n, -1, 1), *dk0 = random_floats(n, -1, 1);
    float *dv0 = random_floats(n, -1, 1), *drk0 = random_floats(C, -1, 1);
    float *d_o = nan_floats(n), *dg = nan_floats(n), *dr = copy_floats(dr0, n);
    float *dk = copy_floats(dk0, n), *dv = copy_floats(dv0, n), *drk = copy_floats(drk0, C);
    backends[0]->bonus_gate_backward(backends[0], d_o, dr, dk, dv, drk, dg, u, o, r, k, v, r_k, g,
                                     R, C, N);

    bonus_ctx c = {R, C, N, to_doubles(o, n), to_doubles(r, n), to_doubles(k, n),
                   to_doubles(v, n), to_doubles(r_k, C), to_doubles(g, n), to_doubles(u, n)};
    double *fd_o = fd_gradient(c.o, n, bonus_loss, &c);
    double *fd_r = fd_gradient(c.r, n, bonus_loss, &c);
    double *fd_k = fd_gradient(c.k, n, bonus_loss, &c);
    double *fd_v = fd_gradient(c.v, n, bonus_loss, &c);
    double *fd_rk = fd_gradient(c.r_k, C, bonus_loss, &c);
    double *fd_g = fd_gradient(c.g, n, bonus_loss, &c);
    check_grad("bonus_gate d_o", added(d_o, NULL, n), fd_o, n, 1e-6);
    check_grad("bonus_gate dr", added(dr, dr0, n), fd_r, n, 5e-6);
    check_grad("bonus_gate dk", added(dk, dk0, n), fd_k, n, 5e-6);
    check_grad("bonus_gate dv", added(dv, dv0, n), fd_v, n, 5e-6);
    check_grad("bonus_gate dr_k", added(drk, drk0, C), fd_rk, C, 5e-6);
    check_grad("bonus_gate dg", added(dg, NULL, n), fd_g, n, 5e-6);
    double *fds[] = {fd_o, fd_r, fd_k, fd_v, fd_rk, fd_g, c.o, c.r, c.k, c.v, c.r_k, c.g, c.u};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) free(fds[i]);
    float *fs[] = {o, r, k, v, r_k, g, u, dr0, dk0, dv0, drk0, d_o, dg, dr, dk, dv, drk};
    for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++) free(fs[i]);
}

/* ================= parameter gradients: accumulation and threads ================= */

/* Every backward op on one set of inputs big enough for the whole team to
 * run (R C >= 32768; GEMMs of several 128 x 128 tiles), `calls` times into
 * the same gradient buffers. Outputs that accumulate are marked; the others
 * (overwritten, or in place from a fresh copy of the input gradient each
 * call) come from the last call. */
enum { BIG_R = 300, BIG_C = 192, BIG_N = 64, BIG_V = 40, MM_N = 160, MM_K = 144 };
enum { MAX_OUTPUTS = 40 };

typedef struct {
    const char *name;
    float *p;
    size_t n;
    int accumulates, is_param;
} op_output;

typedef struct {
    op_output out[MAX_OUTPUTS];
    int n;
} op_outputs;

static float *new_output(op_outputs *o, const char *name, size_t n, int accumulates,
                         int is_param) {
    assert_true(o->n < MAX_OUTPUTS);
    o->out[o->n] = (op_output){name, zero_floats(n), n, accumulates, is_param};
    return o->out[o->n++].p;
}

static void free_outputs(op_outputs *o) {
    for (int i = 0; i < o->n; i++) free(o->out[i].p);
    o->n = 0;
}

static void run_every_backward(rp_backend *be, int calls, op_outputs *o) {
    const int R = BIG_R, C = BIG_C, N = BIG_N, H = C / N;
    const size_t n = (size_t)R * C;
    rng_seed(20240601);
    o->n = 0;
    float *x = random_floats(n, -2, 2), *prev = random_floats(n, -2, 2);
    float *u = random_floats(n, -1, 1), *w_c = random_floats(C, 0.5, 1.5);
    float *b_c = random_floats(C, -0.5, 0.5), *mu = random_floats(C, 0, 1);
    float *a = random_floats(n, 0, 1), *v = random_floats(n, -1, 1);
    float *g = random_floats(n, -1, 1), *r = random_floats(n, -1, 1);
    float *mm_w = random_floats((size_t)MM_N * MM_K, -1, 1);
    float *mm_x = random_floats((size_t)R * MM_K, -1, 1);
    float *mm_dy = random_floats((size_t)R * MM_N, -1, 1);
    int32_t tokens[BIG_R];
    for (int i = 0; i < R; i++) tokens[i] = (int32_t)rng_below(BIG_V);
    float *y = zero_floats(n), *mean = zero_floats((size_t)R * H);
    float *rstd = zero_floats((size_t)R * H);
    float *act_y = copy_floats(x, n);
    be->bias_act(be, act_y, b_c, R, C, RP_ACT_TANH);

    float *lin_dx = new_output(o, "matmul_linear dx", (size_t)R * MM_K, 1, 0);
    float *lin_dw = new_output(o, "matmul_linear dw", (size_t)MM_N * MM_K, 1, 1);
    float *lora_dx = new_output(o, "matmul_lora dx", (size_t)R * MM_K, 1, 0);
    float *lora_dw = new_output(o, "matmul_lora dw", (size_t)MM_K * MM_N, 1, 1);
    float *demb = new_output(o, "embedding demb", (size_t)BIG_V * C, 1, 1);
    float *ln_dx = new_output(o, "layernorm dx", n, 1, 0);
    float *ln_dw = new_output(o, "layernorm dweight", C, 1, 1);
    float *ln_db = new_output(o, "layernorm dbias", C, 1, 1);
    float *gn_dx = new_output(o, "groupnorm dx", n, 0, 0);
    float *gn_dw = new_output(o, "groupnorm dweight", C, 1, 1);
    float *gn_db = new_output(o, "groupnorm dbias", C, 1, 1);
    float *lerp_dx = new_output(o, "lerp dx", n, 1, 0);
    float *lerp_dp = new_output(o, "lerp dprev", n, 1, 0);
    float *lerp_dmu = new_output(o, "lerp dmu", C, 1, 1);
    float *act_dy = new_output(o, "bias_act d(pre)", n, 0, 0);
    float *act_db = new_output(o, "bias_act dbias", C, 1, 1);
    float *vr_dv = new_output(o, "value_residual dv", n, 0, 0);
    float *vr_dvf = new_output(o, "value_residual dv_first", n, 1, 0);
    float *vr_dnu = new_output(o, "value_residual dnu", n, 0, 0);
    float *kp_dk = new_output(o, "key_prepare dk", n, 0, 0);
    float *kp_da = new_output(o, "key_prepare da", n, 1, 0);
    float *kp_dkk = new_output(o, "key_prepare dk_k", C, 1, 1);
    float *kp_dka = new_output(o, "key_prepare dk_a", C, 1, 1);
    float *bg_do = new_output(o, "bonus_gate d_o", n, 0, 0);
    float *bg_dr = new_output(o, "bonus_gate dr", n, 1, 0);
    float *bg_dk = new_output(o, "bonus_gate dk", n, 1, 0);
    float *bg_dv = new_output(o, "bonus_gate dv", n, 1, 0);
    float *bg_drk = new_output(o, "bonus_gate dr_k", C, 1, 1);
    float *bg_dg = new_output(o, "bonus_gate dg", n, 0, 0);

    for (int call = 0; call < calls; call++) {
        be->matmul_linear_backward(be, lin_dx, lin_dw, mm_dy, mm_x, mm_w, R, MM_N, MM_K);
        be->matmul_lora_backward(be, lora_dx, lora_dw, mm_dy, mm_x, mm_w, R, MM_N, MM_K);
        be->embedding_backward(be, demb, x, tokens, R, C);
        be->layernorm(be, y, mean, rstd, x, w_c, b_c, R, C, (float)LN_EPS);
        be->layernorm_backward(be, ln_dx, ln_dw, ln_db, u, x, mean, rstd, w_c, R, C);
        be->groupnorm(be, y, mean, rstd, x, w_c, b_c, R, C, N, (float)GN_EPS);
        be->groupnorm_backward(be, gn_dx, gn_dw, gn_db, u, x, mean, rstd, w_c, R, C, N);
        be->lerp_backward(be, lerp_dx, lerp_dp, lerp_dmu, u, x, prev, mu, R, C);
        memcpy(act_dy, u, n * sizeof(float));
        be->bias_act_backward(be, act_dy, act_db, act_y, R, C, RP_ACT_TANH);
        memcpy(vr_dv, u, n * sizeof(float));
        be->value_residual_backward(be, vr_dv, vr_dvf, vr_dnu, x, prev, a, R, C);
        memcpy(kp_dk, u, n * sizeof(float));
        be->key_prepare_backward(be, kp_dk, kp_da, kp_dkk, kp_dka, g, x, a, w_c, mu, R, C, N);
        be->bonus_gate_backward(be, bg_do, bg_dr, bg_dk, bg_dv, bg_drk, bg_dg, u, x, r, prev, v,
                                b_c, g, R, C, N);
    }
    float *fs[] = {x, prev, u, w_c, b_c, mu, a, v, g, r, mm_w, mm_x, mm_dy, y, mean, rstd, act_y};
    for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++) free(fs[i]);
}

static void test_calling_twice_doubles_accumulated_gradients(void **state) {
    (void)state;
    op_outputs once, twice;
    run_every_backward(backends[1], 1, &once);
    run_every_backward(backends[1], 2, &twice);
    for (int i = 0; i < once.n; i++) {
        const op_output *a = &once.out[i], *b = &twice.out[i];
        if (!a->accumulates) {
            check_equal_floats(a->name, b->p, a->p, a->n);
            continue;
        }
        double *want = new_doubles(a->n);
        for (size_t j = 0; j < a->n; j++) want[j] = 2.0 * a->p[j];
        char what[64];
        snprintf(what, sizeof what, "%s (twice)", a->name);
        check_grad(what, added(b->p, NULL, b->n), want, a->n, 1e-6);
        free(want);
    }
    free_outputs(&once);
    free_outputs(&twice);
}

static void test_gradients_do_not_depend_on_thread_count(void **state) {
    (void)state;
    op_outputs one, many;
    run_every_backward(backends[0], 1, &one);
    for (int b = 1; b < N_BACKENDS; b++) {
        run_every_backward(backends[b], 1, &many);
        for (int i = 0; i < one.n; i++) {
            char what[80];
            snprintf(what, sizeof what, "%s, %d threads vs 1", one.out[i].name, backend_threads[b]);
            check_equal_floats(what, many.out[i].p, one.out[i].p, one.out[i].n);
        }
        free_outputs(&many);
    }
    free_outputs(&one);
}

/* ================= WKV7 ================= */

static double ref_decay(double w_raw) {
    return exp(-0.6065306597126334 * (1.0 / (1.0 + exp(-w_raw))));
}

typedef struct {
    int C, N;
    size_t n, n_state, stride;
    float *r, *w, *k, *v, *kk, *a, *state0;
} wkv_inputs;

/* Realistic ranges: kk unit-norm per head, a (in-context rate) in (0, 1),
 * decays 0.55 .. 0.99; a non-zero initial state in every slot (and in the
 * padding after it, which must stay untouched). */
static void wkv_inputs_make(wkv_inputs *in, int R, int C, int N, int n_slots) {
    in->C = C;
    in->N = N;
    in->n = (size_t)R * C;
    in->stride = (size_t)C * N + 40;
    in->n_state = (size_t)n_slots * in->stride;
    in->r = random_floats(in->n, -1, 1);
    in->w = random_floats(in->n, -4, 2);
    in->k = random_floats(in->n, -1, 1);
    in->v = random_floats(in->n, -1, 1);
    in->kk = random_floats(in->n, -1, 1);
    in->a = random_floats(in->n, 0, 1);
    in->state0 = random_floats(in->n_state, -0.5, 0.5);
    for (size_t h0 = 0; h0 < in->n; h0 += N) {
        float n2 = 0.0f;
        for (int j = 0; j < N; j++) n2 += in->kk[h0 + j] * in->kk[h0 + j];
        for (int j = 0; j < N; j++) in->kk[h0 + j] /= sqrtf(n2);
    }
}

static void wkv_inputs_free(wkv_inputs *in) {
    float *fs[] = {in->r, in->w, in->k, in->v, in->kk, in->a, in->state0};
    for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++) free(fs[i]);
}

/* The double reference as doubles, plus the loss weights: L = sum(y u) +
 * sum over every slot of (state after) U. */
typedef struct {
    const test_batch *tb;
    int C, N;
    size_t stride;
    double *in[6]; /* r, w_raw, k, v, kk, a */
    double *state, *u, *U;
} wkv_ctx;

/* The part of L that one head of one sequence owns: a perturbation of its
 * inputs or initial state changes nothing else. */
static double wkv_unit_loss(const wkv_ctx *c, int s, int h) {
    const int C = c->C, N = c->N;
    const size_t off = (size_t)c->tb->slot[s] * c->stride + (size_t)h * N * N;
    double *S = new_doubles((size_t)N * N), d[256], L = 0.0;
    memcpy(S, c->state + off, (size_t)N * N * sizeof(double));
    for (int t = 0; t < c->tb->seq_len[s]; t++) {
        const size_t o = (size_t)(c->tb->row_begin[s] + t) * C + (size_t)h * N;
        const double *r = c->in[0] + o, *w = c->in[1] + o, *k = c->in[2] + o, *v = c->in[3] + o,
                     *kk = c->in[4] + o, *a = c->in[5] + o;
        for (int j = 0; j < N; j++) d[j] = ref_decay(w[j]);
        for (int i = 0; i < N; i++) {
            double *Si = S + (size_t)i * N, sa = 0.0, y = 0.0;
            for (int j = 0; j < N; j++) sa -= Si[j] * kk[j];
            for (int j = 0; j < N; j++) {
                Si[j] = Si[j] * d[j] + sa * kk[j] * a[j] + v[i] * k[j];
                y += Si[j] * r[j];
            }
            L += y * c->u[o + i];
        }
    }
    for (size_t i = 0; i < (size_t)N * N; i++) L += S[i] * c->U[off + i];
    free(S);
    return L;
}

static double wkv_fd(const wkv_ctx *c, double *x, size_t i, int s, int h) {
    const double x0 = x[i];
    x[i] = x0 + FD_STEP;
    const double plus = wkv_unit_loss(c, s, h);
    x[i] = x0 - FD_STEP;
    const double minus = wkv_unit_loss(c, s, h);
    x[i] = x0;
    return (plus - minus) / (2.0 * FD_STEP);
}

/* Training forward then backward on be, gradient buffers pre-filled with NaN
 * (all overwritten), dstate pre-filled with U. */
typedef struct {
    float *d[6]; /* dr, dw_raw, dk, dv, dkk, da */
    float *dstate, *y, *state;
} wkv_grads;

static void wkv_run(rp_backend *be, const wkv_inputs *in, const test_batch *tb, const float *u,
                    const float *U, wkv_grads *g) {
    const size_t blocks = rp_wkv_checkpoint_offset(&tb->batch, tb->n_seq);
    float *ckpt = nan_floats(blocks * (size_t)in->C * in->N);
    g->y = nan_floats(in->n);
    g->state = copy_floats(in->state0, in->n_state);
    be->wkv7_forward_train(be, g->y, in->r, in->w, in->k, in->v, in->kk, in->a, g->state,
                           in->stride, ckpt, &tb->batch, in->C, in->N);
    for (int i = 0; i < 6; i++) g->d[i] = nan_floats(in->n);
    g->dstate = copy_floats(U, in->n_state);
    be->wkv7_backward(be, g->d[0], g->d[1], g->d[2], g->d[3], g->d[4], g->d[5], g->dstate,
                      in->stride, u, in->r, in->w, in->k, in->v, in->kk, in->a, ckpt, &tb->batch,
                      in->C, in->N);
    free(ckpt);
}

static void wkv_grads_free(wkv_grads *g) {
    for (int i = 0; i < 6; i++) free(g->d[i]);
    free(g->dstate);
    free(g->y);
    free(g->state);
}

static void test_wkv7_forward_train_equals_wkv7_and_checkpoints_chunk_starts(void **state) {
    (void)state;
    const int C = 128, N = 64, lens[] = {20, 1, 33, 16, 17}, slots[] = {3, 0, 4, 1, 2};
    test_batch tb;
    make_batch(&tb, 5, lens, slots);
    wkv_inputs in;
    wkv_inputs_make(&in, tb.batch.n_rows, C, N, 5);
    const size_t HNN = (size_t)C * N, blocks = rp_wkv_checkpoint_offset(&tb.batch, tb.n_seq);
    assert_int_equal(blocks, 2 + 1 + 3 + 1 + 2);
    for (int b = 0; b < N_BACKENDS; b++) {
        rp_backend *be = backends[b];
        float *y = nan_floats(in.n), *st = copy_floats(in.state0, in.n_state);
        be->wkv7(be, y, in.r, in.w, in.k, in.v, in.kk, in.a, st, in.stride, &tb.batch, C, N);
        /* one guard block after the last checkpoint must stay NaN */
        float *y2 = nan_floats(in.n), *st2 = copy_floats(in.state0, in.n_state);
        float *ckpt = nan_floats((blocks + 1) * HNN);
        be->wkv7_forward_train(be, y2, in.r, in.w, in.k, in.v, in.kk, in.a, st2, in.stride, ckpt,
                               &tb.batch, C, N);
        check_equal_floats("wkv7_forward_train y", y2, y, in.n);
        check_equal_floats("wkv7_forward_train state", st2, st, in.n_state);
        for (size_t i = 0; i < HNN; i++) assert_true(isnan(ckpt[blocks * HNN + i]));

        /* checkpoint c of sequence s = the state after its first 16 c tokens */
        for (int s = 0; s < tb.n_seq; s++)
            for (int c = 0; c * RP_WKV_CHUNK < tb.seq_len[s]; c++) {
                float *want = copy_floats(in.state0, in.n_state), *yp = nan_floats(in.n);
                if (c > 0) {
                    const int len = c * RP_WKV_CHUNK, begin = tb.row_begin[s], slot = tb.slot[s];
                    const rp_batch prefix = {1, len, &len, &begin, &slot};
                    be->wkv7(be, yp, in.r, in.w, in.k, in.v, in.kk, in.a, want, in.stride,
                             &prefix, C, N);
                }
                const float *got = ckpt + (rp_wkv_checkpoint_offset(&tb.batch, s) + c) * HNN;
                check_equal_floats("wkv7 checkpoint", got, want + tb.slot[s] * in.stride, HNN);
                free(want);
                free(yp);
            }
        free(y);
        free(st);
        free(y2);
        free(st2);
        free(ckpt);
    }
    wkv_inputs_free(&in);
}

/* Gradients of every input and of the initial state, checked at every row
 * (one random channel each) and at random places; state gradients at random
 * entries of every used slot; the unused slot and the padding keep U. */
static void check_wkv7_backward(int C, int N) {
    const int H = C / N, SAMPLES = 150;
    test_batch tb;
    make_batch(&tb, RAGGED_SEQ, ragged_len, ragged_slot);
    const int R = tb.batch.n_rows;
    wkv_inputs in;
    wkv_inputs_make(&in, R, C, N, RAGGED_SLOTS);
    float *u = random_floats(in.n, -1, 1), *U = random_floats(in.n_state, -1, 1);

    wkv_grads g[N_BACKENDS];
    for (int b = 0; b < N_BACKENDS; b++) wkv_run(backends[b], &in, &tb, u, U, &g[b]);
    for (int b = 1; b < N_BACKENDS; b++) { /* threads own whole (sequence, head) units */
        for (int i = 0; i < 6; i++)
            check_equal_floats("wkv7_backward threads", g[b].d[i], g[0].d[i], in.n);
        check_equal_floats("wkv7_backward threads dstate", g[b].dstate, g[0].dstate, in.n_state);
    }

    const float *fin[6] = {in.r, in.w, in.k, in.v, in.kk, in.a};
    wkv_ctx c = {&tb, C, N, in.stride, {0}, to_doubles(in.state0, in.n_state),
                 to_doubles(u, in.n), to_doubles(U, in.n_state)};
    for (int i = 0; i < 6; i++) c.in[i] = to_doubles(fin[i], in.n);
    const char *names[6] = {"wkv7 dr", "wkv7 dw_raw", "wkv7 dk", "wkv7 dv", "wkv7 dkk", "wkv7 da"};
    const char *odd_names[6] = {"wkv7 dr, odd N", "wkv7 dw_raw, odd N", "wkv7 dk, odd N",
                                "wkv7 dv, odd N", "wkv7 dkk, odd N",    "wkv7 da, odd N"};
    double *got = new_doubles(SAMPLES), *ref = new_doubles(SAMPLES);
    for (int t = 0; t < 6; t++) {
        for (int i = 0; i < SAMPLES; i++) {
            const int row = i < R ? i : rng_below(R), ch = rng_below(C);
            const size_t idx = (size_t)row * C + ch;
            got[i] = g[0].d[t][idx];
            ref[i] = wkv_fd(&c, c.in[t], idx, seq_of_row(&tb, row), ch / N);
        }
        check_grad(N == 64 ? names[t] : odd_names[t], got, ref, SAMPLES, 1e-5);
        got = new_doubles(SAMPLES);
    }
    for (int i = 0; i < SAMPLES; i++) {
        const int s = rng_below(tb.n_seq), h = rng_below(H);
        const size_t idx = (size_t)tb.slot[s] * in.stride + (size_t)h * N * N +
                           (size_t)rng_below(N * N);
        got[i] = g[0].dstate[idx];
        ref[i] = wkv_fd(&c, c.state, idx, s, h);
    }
    check_grad(N == 64 ? "wkv7 d(initial state)" : "wkv7 d(initial state), odd N", got, ref,
               SAMPLES, 1e-5);
    free(ref);
    const size_t HNN = (size_t)H * N * N;
    for (int slot = 0; slot < RAGGED_SLOTS; slot++) {
        const size_t from = slot == 1 ? 0 : HNN; /* slot 1 is unused */
        check_equal_floats("wkv7 dstate untouched", g[0].dstate + slot * in.stride + from,
                           U + slot * in.stride + from, in.stride - from);
    }
    for (int i = 0; i < 6; i++) free(c.in[i]);
    free(c.state);
    free(c.u);
    free(c.U);
    for (int b = 0; b < N_BACKENDS; b++) wkv_grads_free(&g[b]);
    free(u);
    free(U);
    wkv_inputs_free(&in);
}

static void test_wkv7_backward_matches_finite_differences_over_ragged_batch(void **state) {
    (void)state;
    check_wkv7_backward(128, 64);
}

/* Heads of 12: 8-column strips plus a scalar tail in the backward, the
 * forward's generic path in the recomputation. */
static void test_wkv7_backward_matches_finite_differences_for_any_head_size(void **state) {
    (void)state;
    check_wkv7_backward(36, 12);
}

/* Training a long sequence in windows: the forward of window 2 starts from
 * the state window 1 left, and the backward of window 1 starts from the
 * state gradient window 2 returned. Splits off and on a chunk boundary. */
static void test_wkv7_and_token_shift_backward_chain_across_calls(void **state) {
    (void)state;
    const int C = 128, N = 64, lens[] = {20, 9, 33}, slots[] = {1, 2, 0};
    const int splits[] = {11, 16};
    test_batch tb;
    make_batch(&tb, 3, lens, slots);
    const int R = tb.batch.n_rows;
    wkv_inputs in;
    wkv_inputs_make(&in, R, C, N, 3);
    float *u = random_floats(in.n, -1, 1), *U = random_floats(in.n_state, -1, 1);
    rp_backend *be = backends[1];
    wkv_grads whole;
    wkv_run(be, &in, &tb, u, U, &whole);

    const size_t shift_stride = (size_t)C + 3, n_shift = 3 * shift_stride;
    float *dprev = random_floats(in.n, -1, 1), *dsh_U = random_floats(n_shift, -1, 1);
    float *dx_whole = zero_floats(in.n), *dsh_whole = copy_floats(dsh_U, n_shift);
    be->token_shift_backward(be, dx_whole, dsh_whole, shift_stride, dprev, &tb.batch, C);

    for (size_t si = 0; si < sizeof splits / sizeof splits[0]; si++) {
        test_batch part[2];
        int rows[2][64];
        sub_batch(&part[0], &tb, 0, splits[si], rows[0]);
        sub_batch(&part[1], &tb, splits[si], 1000, rows[1]);
        float *pin[2][6], *ckpt[2], *d[6], *pu[2];
        float *st = copy_floats(in.state0, in.n_state), *y = nan_floats(in.n);
        const float *fin[6] = {in.r, in.w, in.k, in.v, in.kk, in.a};
        for (int p = 0; p < 2; p++) {
            const int pr = part[p].batch.n_rows;
            for (int i = 0; i < 6; i++) {
                pin[p][i] = malloc((size_t)pr * C * sizeof(float));
                gather_rows(pin[p][i], fin[i], rows[p], pr, C);
            }
            pu[p] = malloc((size_t)pr * C * sizeof(float));
            gather_rows(pu[p], u, rows[p], pr, C);
            ckpt[p] = nan_floats(rp_wkv_checkpoint_offset(&part[p].batch, part[p].n_seq) *
                                 (size_t)C * N);
            float *py = nan_floats((size_t)pr * C);
            be->wkv7_forward_train(be, py, pin[p][0], pin[p][1], pin[p][2], pin[p][3], pin[p][4],
                                   pin[p][5], st, in.stride, ckpt[p], &part[p].batch, C, N);
            scatter_rows(y, py, rows[p], pr, C);
            free(py);
        }
        check_equal_floats("wkv7 windows y", y, whole.y, in.n);
        check_equal_floats("wkv7 windows state", st, whole.state, in.n_state);

        float *dstate = copy_floats(U, in.n_state);
        for (int i = 0; i < 6; i++) d[i] = nan_floats(in.n);
        for (int p = 1; p >= 0; p--) {
            const int pr = part[p].batch.n_rows;
            float *pd[6];
            for (int i = 0; i < 6; i++) pd[i] = nan_floats((size_t)pr * C);
            be->wkv7_backward(be, pd[0], pd[1], pd[2], pd[3], pd[4], pd[5], dstate, in.stride,
                              pu[p], pin[p][0], pin[p][1], pin[p][2], pin[p][3], pin[p][4],
                              pin[p][5], ckpt[p], &part[p].batch, C, N);
            for (int i = 0; i < 6; i++) {
                scatter_rows(d[i], pd[i], rows[p], pr, C);
                free(pd[i]);
            }
        }
        for (int i = 0; i < 6; i++)
            check_equal_floats("wkv7 windows gradient", d[i], whole.d[i], in.n);
        check_equal_floats("wkv7 windows d(initial state)", dstate, whole.dstate, in.n_state);

        /* token shift the same way */
        float *dx = zero_floats(in.n), *dsh = copy_floats(dsh_U, n_shift);
        for (int p = 1; p >= 0; p--) {
            const int pr = part[p].batch.n_rows;
            float *pdx = zero_floats((size_t)pr * C), *pdp = malloc((size_t)pr * C * sizeof(float));
            gather_rows(pdp, dprev, rows[p], pr, C);
            be->token_shift_backward(be, pdx, dsh, shift_stride, pdp, &part[p].batch, C);
            scatter_rows(dx, pdx, rows[p], pr, C); /* rows of a window are its own */
            free(pdx);
            free(pdp);
        }
        check_equal_floats("token_shift windows dx", dx, dx_whole, in.n);
        check_equal_floats("token_shift windows dstate", dsh, dsh_whole, n_shift);

        free(dx);
        free(dsh);
        free(dstate);
        for (int i = 0; i < 6; i++) free(d[i]);
        for (int p = 0; p < 2; p++) {
            for (int i = 0; i < 6; i++) free(pin[p][i]);
            free(pu[p]);
            free(ckpt[p]);
        }
        free(st);
        free(y);
    }
    free(dprev);
    free(dsh_U);
    free(dx_whole);
    free(dsh_whole);
    wkv_grads_free(&whole);
    free(u);
    free(U);
    wkv_inputs_free(&in);
}

/* wkv7_backward_beta 1 replaces wkv7_backward into temporaries + three adds
 * (backward.c before): dr, dk, dv = start + wkv7_backward's, bit for bit;
 * dw_raw, dkk, da and the state gradient as wkv7_backward's; beta 0 is
 * wkv7_backward. Every thread count, N = 64 and a head size of 12. */
static void check_wkv7_backward_beta(int C, int N) {
    test_batch tb;
    make_batch(&tb, RAGGED_SEQ, ragged_len, ragged_slot);
    wkv_inputs in;
    wkv_inputs_make(&in, tb.batch.n_rows, C, N, RAGGED_SLOTS);
    float *u = random_floats(in.n, -1, 1), *U = random_floats(in.n_state, -1, 1);
    float *start = random_floats(in.n, -1, 1), *sum = malloc(in.n * sizeof(float));
    const size_t blocks = rp_wkv_checkpoint_offset(&tb.batch, tb.n_seq);
    for (int b = 0; b < N_BACKENDS; b++) {
        rp_backend *be = backends[b];
        wkv_grads ref;
        wkv_run(be, &in, &tb, u, U, &ref); /* wkv7_backward: overwrites */
        float *ckpt = nan_floats(blocks * (size_t)C * N), *y = nan_floats(in.n);
        float *st = copy_floats(in.state0, in.n_state);
        be->wkv7_forward_train(be, y, in.r, in.w, in.k, in.v, in.kk, in.a, st, in.stride, ckpt,
                               &tb.batch, C, N);
        for (int beta = 0; beta <= 1; beta++) {
            float *d[6], *dstate = copy_floats(U, in.n_state);
            for (int i = 0; i < 6; i++)
                d[i] = (beta && (i == 0 || i == 2 || i == 3)) ? copy_floats(start, in.n)
                                                              : nan_floats(in.n);
            be->wkv7_backward_beta(be, d[0], d[1], d[2], d[3], d[4], d[5], dstate, in.stride, u,
                                   in.r, in.w, in.k, in.v, in.kk, in.a, ckpt, &tb.batch, C, N,
                                   (float)beta);
            for (int i = 0; i < 6; i++) {
                const float *want = ref.d[i];
                if (beta && (i == 0 || i == 2 || i == 3)) {
                    for (size_t e = 0; e < in.n; e++) sum[e] = start[e] + ref.d[i][e];
                    want = sum;
                }
                check_equal_floats(beta ? "wkv7_backward_beta 1" : "wkv7_backward_beta 0", d[i],
                                   want, in.n);
                free(d[i]);
            }
            check_equal_floats("wkv7_backward_beta dstate", dstate, ref.dstate, in.n_state);
            free(dstate);
        }
        free(ckpt);
        free(y);
        free(st);
        wkv_grads_free(&ref);
    }
    free(u);
    free(U);
    free(start);
    free(sum);
    wkv_inputs_free(&in);
}

static void test_wkv7_backward_beta_adds_as_wkv7_backward_then_add(void **state) {
    (void)state;
    check_wkv7_backward_beta(128, 64);
    check_wkv7_backward_beta(36, 12);
}

/* The _beta ops (backend.h "first gradient writes"): beta 0 on a NaN-filled
 * buffer gives exactly the bits of the accumulating op on a zeroed buffer
 * (what backward.c did before: fill_zero, then +=), parameter gradients
 * included, at small and model-sized shapes and every thread count; beta 1
 * is the accumulating op. */
static void test_beta_zero_overwrites_with_the_bits_of_accumulating_on_zero(void **state) {
    (void)state;
    const int shapes[][3] = {{5, 8, 8}, {64, 64, 64}, {128, 64, 256}, {300, 96, 32}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int R = shapes[si][0], C = shapes[si][1], F = shapes[si][2];
        const int N = C % 32 == 0 ? 32 : C;
        const size_t rc = (size_t)R * C, rf = (size_t)R * F;
        for (int bi = 0; bi < N_BACKENDS; bi++) {
            rp_backend *be = backends[bi];
            rng_seed(77 + si);
            float *dy = random_floats(rf > rc ? rf : rc, -1, 1), *x = random_floats(rf, -1, 1);
            float *w = random_floats((size_t)F * C, -0.5, 0.5), *mu = random_floats(C, 0, 1);
            float *xa = random_floats(rc, -1, 1), *prev = random_floats(rc, -1, 1);
            float *mean = random_floats(R, -0.2, 0.2), *rstd = random_floats(R, 0.5, 2);
            float *r = random_floats(rc, -1, 1), *k = random_floats(rc, -1, 1),
                  *v = random_floats(rc, -1, 1), *g = random_floats(rc, -1, 1),
                  *o = random_floats(rc, -1, 1), *r_k = random_floats(C, -1, 1);
            /* [2] outputs: [0] beta 0 on NaN, [1] accumulate on zero */
            float *dx[2], *dp[2], *dw[2], *dv2[2], *dk2[2], *dmu[2], *db[2], *d_o[2], *dg[2];
            for (int m = 0; m < 2; m++) {
                dx[m] = m ? zero_floats(rf > rc ? rf : rc) : nan_floats(rf > rc ? rf : rc);
                dp[m] = m ? zero_floats(rc) : nan_floats(rc);
                dv2[m] = m ? zero_floats(rc) : nan_floats(rc);
                dk2[m] = m ? zero_floats(rc) : nan_floats(rc);
                dw[m] = zero_floats((size_t)F * C);
                dmu[m] = zero_floats(C);
                db[m] = zero_floats(C);
                d_o[m] = zero_floats(rc);
                dg[m] = zero_floats(rc);
            }
            /* linear: y [R,F] = x [R,C] W^T, W [F,C] */
            be->matmul_linear_backward_beta(be, dx[0], dw[0], dy, xa, w, R, F, C, 0.0f);
            be->matmul_linear_backward(be, dx[1], dw[1], dy, xa, w, R, F, C);
            check_equal_floats("matmul_linear_backward_beta dx", dx[0], dx[1], rc);
            check_equal_floats("matmul_linear_backward_beta dw", dw[0], dw[1], (size_t)F * C);
            /* lora: y [R,C] = x [R,F] W, W [F,C] */
            for (int m = 0; m < 2; m++) {
                for (size_t i = 0; i < rf; i++) dx[m][i] = m ? 0.0f : NAN;
                memset(dw[m], 0, (size_t)F * C * sizeof(float));
            }
            be->matmul_lora_backward_beta(be, dx[0], dw[0], dy, x, w, R, C, F, 0.0f);
            be->matmul_lora_backward(be, dx[1], dw[1], dy, x, w, R, C, F);
            check_equal_floats("matmul_lora_backward_beta dx", dx[0], dx[1], rf);
            check_equal_floats("matmul_lora_backward_beta dw", dw[0], dw[1], (size_t)F * C);
            /* layernorm */
            for (int m = 0; m < 2; m++)
                for (size_t i = 0; i < rc; i++) dx[m][i] = m ? 0.0f : NAN;
            be->layernorm_backward_beta(be, dx[0], dmu[0], db[0], dy, xa, mean, rstd, mu, R, C,
                                        0.0f);
            be->layernorm_backward(be, dx[1], dmu[1], db[1], dy, xa, mean, rstd, mu, R, C);
            check_equal_floats("layernorm_backward_beta dx", dx[0], dx[1], rc);
            check_equal_floats("layernorm_backward_beta dweight", dmu[0], dmu[1], C);
            check_equal_floats("layernorm_backward_beta dbias", db[0], db[1], C);
            /* lerp */
            for (int m = 0; m < 2; m++)
                for (size_t i = 0; i < rc; i++) dx[m][i] = m ? 0.0f : NAN;
            be->lerp_backward_beta(be, dx[0], dp[0], dmu[0], dy, xa, prev, mu, R, C, 0.0f);
            be->lerp_backward(be, dx[1], dp[1], dmu[1], dy, xa, prev, mu, R, C);
            check_equal_floats("lerp_backward_beta dx", dx[0], dx[1], rc);
            check_equal_floats("lerp_backward_beta dprev", dp[0], dp[1], rc);
            check_equal_floats("lerp_backward_beta dmu", dmu[0], dmu[1], C);
            /* bonus_gate: dr, dk, dv */
            for (int m = 0; m < 2; m++) {
                for (size_t i = 0; i < rc; i++) dx[m][i] = m ? 0.0f : NAN;
                memset(dmu[m], 0, C * sizeof(float));
            }
            be->bonus_gate_backward_beta(be, d_o[0], dx[0], dk2[0], dv2[0], dmu[0], dg[0], dy, o,
                                         r, k, v, r_k, g, R, C, N, 0.0f);
            be->bonus_gate_backward(be, d_o[1], dx[1], dk2[1], dv2[1], dmu[1], dg[1], dy, o, r, k,
                                    v, r_k, g, R, C, N);
            check_equal_floats("bonus_gate_backward_beta dr", dx[0], dx[1], rc);
            check_equal_floats("bonus_gate_backward_beta dk", dk2[0], dk2[1], rc);
            check_equal_floats("bonus_gate_backward_beta dv", dv2[0], dv2[1], rc);
            check_equal_floats("bonus_gate_backward_beta dr_k", dmu[0], dmu[1], C);
            check_equal_floats("bonus_gate_backward_beta d_o", d_o[0], d_o[1], rc);
            check_equal_floats("bonus_gate_backward_beta dg", dg[0], dg[1], rc);
            for (int m = 0; m < 2; m++) {
                float *fm[] = {dx[m], dp[m], dw[m], dv2[m], dk2[m], dmu[m], db[m], d_o[m], dg[m]};
                for (size_t i = 0; i < sizeof fm / sizeof fm[0]; i++) free(fm[i]);
            }
            float *fs[] = {dy, x, w, mu, xa, prev, mean, rstd, r, k, v, g, o, r_k};
            for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++) free(fs[i]);
        }
    }
}

/* head_cross_entropy (the fused head) against the unfused ops on the whole
 * batch: matmul_linear, row_max, cross_entropy, l2wrap, then
 * matmul_linear_backward. One chunk: the same bits (dhead accumulating onto
 * random values); chunks of 37 and 128 rows (the logits never whole):
 * losses and dx within 1e-6, ignored rows included; dhead, whose fp32 sum
 * over rows is split by chunk, within 1e-5 (9 chunks measured 1.3e-6), from
 * zero (a sum onto values ~1000x larger than each part would hide the op's
 * rounding under its own). */
static void test_head_cross_entropy_equals_unfused_ops_in_any_chunking(void **state) {
    (void)state;
    const int R = 300, C = 48, V = 517;
    rp_backend *be = backends[1];
    rng_seed(91);
    float *x = random_floats((size_t)R * C, -1, 1), *head = random_floats((size_t)V * C, -1, 1);
    int32_t *targets = malloc(R * sizeof *targets);
    assert_non_null(targets);
    for (int r = 0; r < R; r++) targets[r] = r % 7 == 3 ? -1 : rng_below(V);
    for (int wrap = 0; wrap < 2; wrap++) {
        const float scale = 1.0f / R, factor = wrap ? 1e-4f / R : 0.0f;
        /* reference: the unfused ops */
        float *logits = zero_floats((size_t)R * V), *ref_loss = zero_floats(R);
        float *ref_dx = nan_floats((size_t)R * C), *ref_dhead = random_floats((size_t)V * C, -1, 1);
        float *dhead0 = copy_floats(ref_dhead, (size_t)V * C);
        float *row_max = zero_floats(R);
        int32_t *argmax = calloc(R, sizeof *argmax);
        be->matmul_linear(be, logits, x, head, R, V, C, 0.0f);
        if (factor > 0) be->row_max(be, row_max, argmax, logits, R, V);
        be->cross_entropy(be, ref_loss, logits, logits, targets, R, V, scale);
        if (factor > 0) be->l2wrap(be, logits, row_max, argmax, targets, R, V, factor);
        be->matmul_linear_backward_beta(be, ref_dx, ref_dhead, logits, x, head, R, V, C, 0.0f);
        float *zero_dhead = zero_floats((size_t)V * C), *unused_dx = zero_floats((size_t)R * C);
        be->matmul_linear_backward_beta(be, unused_dx, zero_dhead, logits, x, head, R, V, C, 0.0f);
        double *ref_dhead_from_zero = to_doubles(zero_dhead, (size_t)V * C);
        free(zero_dhead);
        free(unused_dx);
        const int chunks[] = {R, 37, 128};
        for (size_t ci = 0; ci < sizeof chunks / sizeof chunks[0]; ci++) {
            const int chunk = chunks[ci];
            float *scratch = nan_floats(rp_head_ce_scratch_floats(chunk, V));
            float *loss = nan_floats(R), *dx = nan_floats((size_t)R * C);
            float *dhead = chunk == R ? copy_floats(dhead0, (size_t)V * C)
                                      : zero_floats((size_t)V * C);
            be->head_cross_entropy(be, loss, dx, dhead, scratch, x, head, targets, R, C, V, scale,
                                   factor, chunk);
            if (chunk == R) {
                check_equal_floats("head_cross_entropy losses (one chunk)", loss, ref_loss, R);
                check_equal_floats("head_cross_entropy dx (one chunk)", dx, ref_dx,
                                   (size_t)R * C);
                check_equal_floats("head_cross_entropy dhead (one chunk)", dhead, ref_dhead,
                                   (size_t)V * C);
            } else {
                char what[96];
                snprintf(what, sizeof what, "head_cross_entropy losses (chunks of %d)", chunk);
                check_grad(what, to_doubles(loss, R), to_doubles(ref_loss, R), R, 1e-6);
                snprintf(what, sizeof what, "head_cross_entropy dx (chunks of %d)", chunk);
                check_grad(what, to_doubles(dx, (size_t)R * C), to_doubles(ref_dx, (size_t)R * C),
                           (size_t)R * C, 1e-6);
                snprintf(what, sizeof what, "head_cross_entropy dhead (chunks of %d)", chunk);
                check_grad(what, to_doubles(dhead, (size_t)V * C), ref_dhead_from_zero,
                           (size_t)V * C, 1e-5);
            }
            free(scratch);
            free(loss);
            free(dx);
            free(dhead);
        }
        free(ref_dhead_from_zero);
        free(logits);
        free(ref_loss);
        free(ref_dx);
        free(ref_dhead);
        free(dhead0);
        free(row_max);
        free(argmax);
    }
    free(x);
    free(head);
    free(targets);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cross_entropy_matches_double_log_softmax_and_ignores_rows),
        cmocka_unit_test(test_matmul_linear_backward_matches_finite_differences),
        cmocka_unit_test(test_matmul_lora_backward_matches_finite_differences),
        cmocka_unit_test(test_embedding_backward_adds_rows_in_order_for_repeated_tokens),
        cmocka_unit_test(test_layernorm_backward_matches_finite_differences),
        cmocka_unit_test(test_lerp_backward_matches_finite_differences),
        cmocka_unit_test(test_token_shift_backward_matches_finite_differences_over_ragged_batch),
        cmocka_unit_test(test_bias_act_backward_matches_finite_differences_for_every_activation),
        cmocka_unit_test(test_value_residual_backward_matches_finite_differences),
        cmocka_unit_test(test_key_prepare_backward_matches_finite_differences_and_clamped_norm),
        cmocka_unit_test(test_key_prepare_backward_matches_finite_differences_for_any_head_size),
        cmocka_unit_test(test_op_beyond_reserve_reports_error_and_reserve_fixes_it),
        cmocka_unit_test(test_groupnorm_backward_matches_finite_differences_and_overwrites_dx),
        cmocka_unit_test(test_bonus_gate_backward_matches_finite_differences),
        cmocka_unit_test(test_calling_twice_doubles_accumulated_gradients),
        cmocka_unit_test(test_gradients_do_not_depend_on_thread_count),
        cmocka_unit_test(test_wkv7_forward_train_equals_wkv7_and_checkpoints_chunk_starts),
        cmocka_unit_test(test_wkv7_backward_matches_finite_differences_over_ragged_batch),
        cmocka_unit_test(test_wkv7_backward_matches_finite_differences_for_any_head_size),
        cmocka_unit_test(test_wkv7_and_token_shift_backward_chain_across_calls),
        cmocka_unit_test(test_wkv7_backward_beta_adds_as_wkv7_backward_then_add),
        cmocka_unit_test(test_beta_zero_overwrites_with_the_bits_of_accumulating_on_zero),
        cmocka_unit_test(test_head_cross_entropy_equals_unfused_ops_in_any_chunking),
    };
    return cmocka_run_group_tests_name("cpu_backward", tests, setup_backends, teardown_backends);
}
