/* The CPU backend, op by op, against plain double-precision references written
 * here as loops (no BLAS), on pseudo-random data with sizes that are not
 * multiples of any block size. Also: ragged batches with permuted slots,
 * prefix-then-rest and step-by-step calls equal one call, results do not
 * depend on the thread count, and the vectorised exp/sigmoid/tanh/decay
 * agree with libm. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_internal.h"
#include "cpu_test_util.h"

/* ---- fixtures and random data: tests/cpu_test_util.h ---- */


static double *new_doubles(size_t n) {
    double *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}

/* Every element within rtol * (|ref| + rms(ref)): relative where the value is
 * large, and relative to the array's magnitude where a sum cancelled to ~0. */
static void check_close(const char *what, const float *got, const double *ref, size_t n,
                        double rtol) {
    double sq = 0.0;
    for (size_t i = 0; i < n; i++) sq += ref[i] * ref[i];
    const double scale = n ? sqrt(sq / n) : 0.0;
    size_t worst = 0;
    double worst_ratio = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            fail_msg("%s: element %zu is %g (reference %.9g)", what, i, got[i], ref[i]);
        const double diff = fabs(got[i] - ref[i]);
        if (diff == 0.0) continue;
        const double ratio = diff / (rtol * (fabs(ref[i]) + scale));
        if (ratio > worst_ratio) {
            worst_ratio = ratio;
            worst = i;
        }
    }
    if (worst_ratio > 1.0)
        fail_msg("%s: element %zu = %.9g, reference %.9g: error %.3g is %.1fx the bound "
                 "(rtol %g, rms %.3g)",
                 what, worst, got[worst], ref[worst], fabs(got[worst] - ref[worst]),
                 worst_ratio, rtol, scale);
}

static void check_close_floats(const char *what, const float *got, const float *want,
                               size_t n, double rtol) {
    double *ref = new_doubles(n);
    for (size_t i = 0; i < n; i++) ref[i] = want[i];
    check_close(what, got, ref, n, rtol);
    free(ref);
}

static void check_equal_floats(const char *what, const float *got, const float *want,
                               size_t n) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0)
            fail_msg("%s: element %zu = %.9g, expected exactly %.9g", what, i, got[i],
                     want[i]);
}

static void check_all_finite(const char *what, const float *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(p[i])) fail_msg("%s: element %zu is %g", what, i, p[i]);
}

/* ---- double references (plain loops, straight from backend.h / the spec) ---- */

static double ref_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
static double ref_decay(double w_raw) {
    return exp(-0.6065306597126334 * ref_sigmoid(w_raw));
}

/* y [M,N] = x [M,K] . op(W) + beta * y; W [N,K] if out_in else [K,N] */
static void ref_matmul(double *y, const float *x, const float *w, const float *y0, int M,
                       int N, int K, float beta, int out_in) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++)
                acc += (double)x[m * K + k] *
                       (out_in ? w[(size_t)n * K + k] : w[(size_t)k * N + n]);
            y[(size_t)m * N + n] = acc + (beta != 0.0f ? beta * (double)y0[(size_t)m * N + n] : 0.0);
        }
}

static void ref_norm(double *y, double *mean, double *rstd, const float *x, const float *weight,
                     const float *bias, int n, double eps) {
    double m = 0.0, v = 0.0;
    for (int i = 0; i < n; i++) m += x[i];
    m /= n;
    for (int i = 0; i < n; i++) v += (x[i] - m) * (x[i] - m);
    v /= n;
    const double s = 1.0 / sqrt(v + eps);
    for (int i = 0; i < n; i++) y[i] = (x[i] - m) * s * weight[i] + bias[i];
    *mean = m;
    *rstd = s;
}


/* ---- lifetime and memory ---- */

static void test_create_uses_given_or_openmp_default_thread_count(void **state) {
    (void)state;
    for (int i = 0; i < N_BACKENDS; i++) {
        assert_string_equal(backends[i]->name, "cpu");
        assert_int_equal(cpu_threads(backends[i]), backend_threads[i]);
    }
    rp_error err = {0};
    rp_backend *be = rp_cpu_backend_create(0, &err);
    assert_non_null(be);
    assert_int_equal(cpu_threads(be), omp_get_max_threads());
    rp_cpu_backend_destroy(be);
    rp_cpu_backend_destroy(NULL);
}

static void test_alloc_is_zeroed_and_64_byte_aligned(void **state) {
    (void)state;
    rp_backend *be = backends[0];
    const size_t sizes[] = {0, 1, 100, 4096, 1000003};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        unsigned char *p = be->alloc(be, sizes[i]);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % 64, 0);
        for (size_t b = 0; b < sizes[i]; b++) assert_int_equal(p[b], 0);
        be->free(be, p);
    }
    float host[37], back[37];
    for (int i = 0; i < 37; i++) host[i] = (float)i - 3.5f;
    float *d0 = be->alloc(be, sizeof host), *d1 = be->alloc(be, sizeof host);
    be->copy_to_device(be, d0, host, sizeof host);
    be->copy(be, d1, d0, sizeof host);
    be->synchronize(be);
    be->copy_to_host(be, back, d1, sizeof host);
    check_equal_floats("copy round trip", back, host, 37);
    be->fill_zero(be, d1, sizeof host);
    be->copy_to_host(be, back, d1, sizeof host);
    for (int i = 0; i < 37; i++) assert_true(back[i] == 0.0f);
    be->free(be, d0);
    be->free(be, d1);
}

/* ---- dense ---- */

static void run_matmul_cases(int out_in) {
    /* Few rows take the backend's kernels (linear: M <= 8, cpu_matmul_decode's
     * 32-output panels and row blocks, K tails; LoRA: M == 1, or M <= 4 with K >= 256), more rows sgemm. The
     * small cases run on one thread; the bigger ones cross the parallel
     * threshold and split N (decode, prefill) or M (tall). */
    const int cases[][3] = {{1, 5, 7},      {1, 64, 128},   {1, 130, 7},   {3, 5, 128},
                            {3, 130, 128},  {4, 130, 300},  {5, 130, 33},  {8, 20, 300},
                            {17, 64, 7},    {17, 130, 128}, {1, 1030, 300}, {1, 3000, 33},
                            {6, 1000, 77},  {3, 1000, 260}, {200, 20, 64}, {65, 300, 129},
                            {1000, 96, 130}, {2, 2, 0},     {20, 2, 0}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int M = cases[c][0], N = cases[c][1], K = cases[c][2];
        float *x = random_floats((size_t)M * K, -1, 1);
        float *w = random_floats((size_t)N * K, -1, 1);
        float *y0 = random_floats((size_t)M * N, -1, 1);
        double *ref = new_doubles((size_t)M * N);
        float *first = NULL;
        for (int beta_i = 0; beta_i < 2; beta_i++) {
            const float beta = (float)beta_i;
            ref_matmul(ref, x, w, y0, M, N, K, beta, out_in);
            for (int b = 0; b < N_BACKENDS; b++) {
                rp_backend *be = backends[b];
                float *y = copy_floats(y0, (size_t)M * N);
                /* beta 0 must overwrite whatever is in y, NaN included */
                if (beta == 0.0f)
                    for (size_t i = 0; i < (size_t)M * N; i++) y[i] = NAN;
                if (out_in)
                    be->matmul_linear(be, y, x, w, M, N, K, beta);
                else
                    be->matmul_lora(be, y, x, w, M, N, K, beta);
                char what[128];
                snprintf(what, sizeof what, "%s M=%d N=%d K=%d beta=%g threads=%d",
                         out_in ? "matmul_linear" : "matmul_lora", M, N, K, beta,
                         backend_threads[b]);
                check_close(what, y, ref, (size_t)M * N, 1e-5);
                if (b == 0) {
                    free(first);
                    first = copy_floats(y, (size_t)M * N);
                } else if (M > N) {
                    /* rows split between threads at multiples of the BLAS
                     * kernels' row unroll: the same bits on any team */
                    check_equal_floats(what, y, first, (size_t)M * N);
                } else {
                    check_close_floats(what, y, first, (size_t)M * N, 1e-6);
                }
                free(y);
            }
        }
        free(first);
        free(x);
        free(w);
        free(y0);
        free(ref);
    }
}

static void test_matmul_linear_matches_double_reference(void **state) {
    (void)state;
    run_matmul_cases(1);
}

/* Few-row matmul_linear (cpu_matmul_decode, M <= 8): every y[m, n] is
 * bit-identical whatever M is and whatever the other rows hold, so a
 * sequence's decode does not depend on its batch neighbours. Odd N and K
 * reach the single-W-row and K-tail paths of every tile shape. */
static void test_matmul_linear_few_rows_independent_of_batch(void **state) {
    (void)state;
    const int shapes[][2] = {{7, 37}, {33, 16}, {130, 300}, {1000, 77}};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int N = shapes[c][0], K = shapes[c][1];
        float *x = random_floats((size_t)8 * K, -1, 1);
        float *w = random_floats((size_t)N * K, -1, 1);
        float *y0 = random_floats((size_t)8 * N, -1, 1);
        for (int beta_i = 0; beta_i < 2; beta_i++) {
            const float beta = (float)beta_i;
            for (int b = 0; b < N_BACKENDS; b++) {
                rp_backend *be = backends[b];
                float *alone = copy_floats(y0, (size_t)8 * N);
                for (int m = 0; m < 8; m++)
                    be->matmul_linear(be, alone + (size_t)m * N, x + (size_t)m * K, w, 1, N,
                                      K, beta);
                for (int M = 2; M <= 8; M++)
                    for (int m0 = 0; m0 + M <= 8; m0 += M) {
                        float *y = copy_floats(y0, (size_t)8 * N);
                        be->matmul_linear(be, y + (size_t)m0 * N, x + (size_t)m0 * K, w, M,
                                          N, K, beta);
                        char what[128];
                        snprintf(what, sizeof what,
                                 "matmul_linear rows %d..%d of M=%d N=%d K=%d beta=%g "
                                 "threads=%d", m0, m0 + M, M, N, K, beta,
                                 backend_threads[b]);
                        check_equal_floats(what, y + (size_t)m0 * N, alone + (size_t)m0 * N,
                                           (size_t)M * N);
                        free(y);
                    }
                free(alone);
            }
        }
        free(x);
        free(w);
        free(y0);
    }
}

/* Decode rows (set_decode_rows): a group of any M = 1..64 rows gives every
 * row the bits it gets alone on one thread, on any thread count, for both
 * weight layouts (sgemm, the kernel outside decode rows, does not). The
 * shapes cover partial 32-output panels (N % 32), K tails (K % 16), the
 * few-row kernel (M <= 2), the 12-row blocks with every remainder and the
 * AVX-512 lanes kernel (M = 30-32, 45-48, 60-64: rows in vector lanes, the
 * padding lanes dropped; seen failing with its fma split into mul + add). */
static void test_matmul_decode_rows_of_any_count_equal_each_row_alone(void **state) {
    (void)state;
    const int shapes[][2] = {{7, 37}, {33, 16}, {130, 300}, {1000, 77}, {64, 768}, {48, 3}};
    const int MAXM = 64;
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int N = shapes[c][0], K = shapes[c][1], NK = N > K ? N : K;
        float *x = random_floats((size_t)MAXM * NK, -1, 1);
        float *w = random_floats((size_t)N * K, -1, 1);
        float *y0 = random_floats((size_t)MAXM * NK, -1, 1);
        for (int lora = 0; lora < 2; lora++)
            for (int beta_i = 0; beta_i < 2; beta_i++) {
                const float beta = (float)beta_i;
                /* lora: W read as [K2, N2] = [N, K]: y [M, K] = x [M, N] . W */
                const int Nout = lora ? K : N, Kin = lora ? N : K;
                rp_backend *one = backends[0];
                float *alone = copy_floats(y0, (size_t)MAXM * Nout);
                for (int m = 0; m < MAXM; m++) {
                    if (lora)
                        one->matmul_lora(one, alone + (size_t)m * Nout, x + (size_t)m * Kin, w,
                                         1, Nout, Kin, beta);
                    else
                        one->matmul_linear(one, alone + (size_t)m * Nout, x + (size_t)m * Kin,
                                           w, 1, Nout, Kin, beta);
                }
                for (int b = 0; b < N_BACKENDS; b++) {
                    rp_backend *be = backends[b];
                    for (int M = 1; M <= MAXM; M++) {
                        float *y = copy_floats(y0, (size_t)MAXM * Nout);
                        be->set_decode_rows(be, 1);
                        if (lora)
                            be->matmul_lora(be, y, x, w, M, Nout, Kin, beta);
                        else
                            be->matmul_linear(be, y, x, w, M, Nout, Kin, beta);
                        be->set_decode_rows(be, 0);
                        char what[128];
                        snprintf(what, sizeof what,
                                 "decode rows: %s M=%d N=%d K=%d beta=%g threads=%d",
                                 lora ? "matmul_lora" : "matmul_linear", M, Nout, Kin, beta,
                                 backend_threads[b]);
                        check_equal_floats(what, y, alone, (size_t)M * Nout);
                        free(y);
                    }
                }
                free(alone);
            }
        free(x);
        free(w);
        free(y0);
    }
}

/* A decode product wide enough that its columns are dealt to the team in
 * pieces (cpu_matmul.c, CPU_MATMUL_DEAL_MIN_N: the 0.1B head) gives the bits
 * of one thread on any thread count: every piece computed once, each element
 * one chain over k wherever a piece ends. N is no multiple of 16 or 24 (a
 * short last piece and lanes chunk), K has a tail; the row counts take the
 * few-row, panel and lanes kernels. */
static void test_matmul_decode_rows_dealt_columns_equal_one_thread(void **state) {
    (void)state;
    const int N = 16384 + 27, K = 40, rows[] = {1, 7, 58, 64}, MAXM = 64;
    float *x = random_floats((size_t)MAXM * K, -1, 1);
    float *w = random_floats((size_t)N * K, -1, 1);
    float *y0 = random_floats((size_t)MAXM * N, -1, 1);
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        for (int beta_i = 0; beta_i < 2; beta_i++) {
            const int M = rows[i];
            const float beta = (float)beta_i;
            float *want = copy_floats(y0, (size_t)M * N);
            backends[0]->set_decode_rows(backends[0], 1);
            backends[0]->matmul_linear(backends[0], want, x, w, M, N, K, beta);
            backends[0]->set_decode_rows(backends[0], 0);
            for (int b = 1; b < N_BACKENDS; b++) {
                rp_backend *be = backends[b];
                float *y = copy_floats(y0, (size_t)M * N);
                be->set_decode_rows(be, 1);
                be->matmul_linear(be, y, x, w, M, N, K, beta);
                be->set_decode_rows(be, 0);
                char what[128];
                snprintf(what, sizeof what, "dealt columns: M=%d N=%d K=%d beta=%g threads=%d",
                         M, N, K, beta, backend_threads[b]);
                check_equal_floats(what, y, want, (size_t)M * N);
                free(y);
            }
            free(want);
        }
    free(x);
    free(w);
    free(y0);
}

static void test_matmul_lora_matches_double_reference(void **state) {
    (void)state;
    run_matmul_cases(0);
}

/* ---- position-wise ---- */

static void test_embedding_gathers_token_rows(void **state) {
    (void)state;
    const int V = 11, C = 130, R = 17;
    float *emb = random_floats((size_t)V * C, -1, 1);
    int32_t tokens[17];
    for (int r = 0; r < R; r++) tokens[r] = (int32_t)((r * 7 + 3) % V);
    for (int b = 0; b < N_BACKENDS; b++) {
        float *x = random_floats((size_t)R * C, -1, 1);
        backends[b]->embedding(backends[b], x, emb, tokens, R, C);
        for (int r = 0; r < R; r++)
            check_equal_floats("embedding row", x + (size_t)r * C, emb + (size_t)tokens[r] * C, C);
        free(x);
    }
    free(emb);
}

static void test_layernorm_matches_double_reference_and_saves_stats(void **state) {
    (void)state;
    const int shapes[][2] = {{1, 5}, {3, 130}, {17, 768}, {50, 1000}};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int R = shapes[c][0], C = shapes[c][1];
        /* a mean far from zero relative to the spread: one-pass variance fails */
        float *x = random_floats((size_t)R * C, 2.0, 4.0);
        float *weight = random_floats(C, 0.5, 1.5), *bias = random_floats(C, -0.5, 0.5);
        double *ref = new_doubles((size_t)R * C), *ref_mean = new_doubles(R),
               *ref_rstd = new_doubles(R);
        for (int r = 0; r < R; r++)
            ref_norm(ref + (size_t)r * C, &ref_mean[r], &ref_rstd[r], x + (size_t)r * C,
                     weight, bias, C, 1e-5);
        for (int b = 0; b < N_BACKENDS; b++) {
            rp_backend *be = backends[b];
            float *y = random_floats((size_t)R * C, -1, 1);
            float *mean = random_floats(R, -1, 1), *rstd = random_floats(R, -1, 1);
            be->layernorm(be, y, mean, rstd, x, weight, bias, R, C, 1e-5f);
            check_close("layernorm y", y, ref, (size_t)R * C, 1e-5);
            check_close("layernorm mean", mean, ref_mean, R, 1e-6);
            check_close("layernorm rstd", rstd, ref_rstd, R, 1e-5);
            float *y2 = random_floats((size_t)R * C, -1, 1);
            be->layernorm(be, y2, NULL, NULL, x, weight, bias, R, C, 1e-5f);
            check_equal_floats("layernorm without stats", y2, y, (size_t)R * C);
            free(y);
            free(y2);
            free(mean);
            free(rstd);
        }
        free(x);
        free(weight);
        free(bias);
        free(ref);
        free(ref_mean);
        free(ref_rstd);
    }
}

static void test_groupnorm_matches_double_reference_per_head(void **state) {
    (void)state;
    const int shapes[][3] = {{1, 64, 64}, {3, 40, 8}, {17, 192, 64}, {40, 1024, 64}};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int R = shapes[c][0], C = shapes[c][1], N = shapes[c][2], H = C / N;
        float *x = random_floats((size_t)R * C, -3.0, 5.0);
        float *weight = random_floats(C, 0.5, 1.5), *bias = random_floats(C, -0.5, 0.5);
        double *ref = new_doubles((size_t)R * C), *ref_mean = new_doubles((size_t)R * H),
               *ref_rstd = new_doubles((size_t)R * H);
        for (int r = 0; r < R; r++)
            for (int h = 0; h < H; h++) {
                size_t o = (size_t)r * C + (size_t)h * N;
                ref_norm(ref + o, &ref_mean[r * H + h], &ref_rstd[r * H + h], x + o,
                         weight + h * N, bias + h * N, N, 64e-5);
            }
        for (int b = 0; b < N_BACKENDS; b++) {
            rp_backend *be = backends[b];
            float *y = random_floats((size_t)R * C, -1, 1);
            float *mean = random_floats((size_t)R * H, -1, 1);
            float *rstd = random_floats((size_t)R * H, -1, 1);
            be->groupnorm(be, y, mean, rstd, x, weight, bias, R, C, N, 64e-5f);
            check_close("groupnorm y", y, ref, (size_t)R * C, 1e-5);
            check_close("groupnorm mean", mean, ref_mean, (size_t)R * H, 1e-6);
            check_close("groupnorm rstd", rstd, ref_rstd, (size_t)R * H, 1e-5);
            float *y2 = random_floats((size_t)R * C, -1, 1);
            be->groupnorm(be, y2, NULL, NULL, x, weight, bias, R, C, N, 64e-5f);
            check_equal_floats("groupnorm without stats", y2, y, (size_t)R * C);
            free(y);
            free(y2);
            free(mean);
            free(rstd);
        }
        free(x);
        free(weight);
        free(bias);
        free(ref);
        free(ref_mean);
        free(ref_rstd);
    }
}

static void test_lerp_and_value_residual_match_reference(void **state) {
    (void)state;
    const int shapes[][2] = {{1, 5}, {17, 130}, {64, 1000}};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int R = shapes[c][0], C = shapes[c][1];
        const size_t n = (size_t)R * C;
        float *x = random_floats(n, -2, 2), *prev = random_floats(n, -2, 2);
        float *mu = random_floats(C, 0, 1), *nu = random_floats(n, 0, 1);
        double *ref_lerp = new_doubles(n), *ref_vres = new_doubles(n);
        for (int r = 0; r < R; r++)
            for (int i = 0; i < C; i++) {
                size_t o = (size_t)r * C + i;
                ref_lerp[o] = x[o] + ((double)prev[o] - x[o]) * mu[i];
                ref_vres[o] = x[o] + ((double)prev[o] - x[o]) * nu[o];
            }
        for (int b = 0; b < N_BACKENDS; b++) {
            rp_backend *be = backends[b];
            float *y = random_floats(n, -1, 1);
            be->lerp(be, y, x, prev, mu, R, C);
            check_close("lerp", y, ref_lerp, n, 1e-6);
            /* value_residual works in place: v = x, v_first = prev */
            memcpy(y, x, n * sizeof *y);
            be->value_residual(be, y, prev, nu, R, C);
            check_close("value_residual", y, ref_vres, n, 1e-6);
            free(y);
        }
        free(x);
        free(prev);
        free(mu);
        free(nu);
        free(ref_lerp);
        free(ref_vres);
    }
}

static double ref_activation(double t, rp_activation act) {
    switch (act) {
    case RP_ACT_NONE: return t;
    case RP_ACT_TANH: return tanh(t);
    case RP_ACT_SIGMOID: return ref_sigmoid(t);
    case RP_ACT_RELU_SQUARED: return t > 0 ? t * t : 0.0;
    }
    return NAN;
}

static void test_bias_act_matches_reference_for_every_activation(void **state) {
    (void)state;
    const rp_activation acts[] = {RP_ACT_NONE, RP_ACT_TANH, RP_ACT_SIGMOID,
                                  RP_ACT_RELU_SQUARED};
    const int shapes[][2] = {{1, 7}, {17, 130}, {64, 1000}};
    for (size_t a = 0; a < 4; a++)
        for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++)
            for (int with_bias = 0; with_bias < 2; with_bias++) {
                const int R = shapes[c][0], C = shapes[c][1];
                const size_t n = (size_t)R * C;
                /* mostly O(1) values; every 5th tiny (tanh's cancellation-prone
                 * range), every 7th large (saturation, exp clamping) */
                float *y0 = random_floats(n, -4, 4);
                for (size_t i = 0; i < n; i += 5) y0[i] *= 1e-4f;
                for (size_t i = 3; i < n; i += 7) y0[i] *= 25.0f;
                float *bias = with_bias ? random_floats(C, -1, 1) : NULL;
                double *ref = new_doubles(n);
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < C; i++) {
                        size_t o = (size_t)r * C + i;
                        ref[o] = ref_activation((double)y0[o] + (bias ? bias[i] : 0.0), acts[a]);
                    }
                for (int b = 0; b < N_BACKENDS; b++) {
                    float *y = copy_floats(y0, n);
                    backends[b]->bias_act(backends[b], y, bias, R, C, acts[a]);
                    char what[96];
                    snprintf(what, sizeof what, "bias_act act=%d R=%d C=%d bias=%d",
                             (int)acts[a], R, C, with_bias);
                    check_close(what, y, ref, n, 1e-5);
                    free(y);
                }
                free(y0);
                free(bias);
                free(ref);
            }
}

static void test_fast_exp_sigmoid_tanh_decay_agree_with_libm(void **state) {
    (void)state;
    double worst[4] = {0};
    for (double x = -86.0; x <= 87.0; x += 0.0037) {
        float xf = (float)x;
        double e = exp((double)xf);
        worst[0] = fmax(worst[0], fabs(cpu_expf(xf) - e) / e);
    }
    for (double x = -80.0; x <= 80.0; x += 0.0011) {
        float xf = (float)x;
        double s = ref_sigmoid(xf), t = tanh((double)xf), d = ref_decay(xf);
        worst[1] = fmax(worst[1], fabs(cpu_sigmoidf(xf) - s) / s);
        worst[2] = fmax(worst[2], fabs(cpu_tanhf(xf) - t) / fmax(fabs(t), 1e-30));
        worst[3] = fmax(worst[3], fabs(cpu_decayf(xf) - d) / d);
    }
    for (double x = 1e-8; x < 1.0; x *= 1.01) { /* tanh near 0: relative accuracy */
        float xf = (float)x;
        worst[2] = fmax(worst[2], fabs(cpu_tanhf(xf) - tanh((double)xf)) / tanh((double)xf));
        worst[2] = fmax(worst[2], fabs(cpu_tanhf(-xf) + tanh((double)xf)) / tanh((double)xf));
    }
    const char *names[4] = {"exp", "sigmoid", "tanh", "decay"};
    for (int i = 0; i < 4; i++)
        if (!(worst[i] < 1e-6)) fail_msg("cpu_%sf: max relative error %.3g", names[i], worst[i]);
    /* clamped ends stay finite and ordered */
    assert_true(cpu_expf(-1000.0f) >= 0.0f && cpu_expf(-1000.0f) < 1e-37f);
    assert_true(isfinite(cpu_expf(1000.0f)) && cpu_expf(1000.0f) > 1e38f);
    assert_true(cpu_sigmoidf(-1000.0f) < 1e-37f && cpu_sigmoidf(1000.0f) == 1.0f);
    assert_true(cpu_tanhf(-1000.0f) == -1.0f && cpu_tanhf(1000.0f) == 1.0f);
}

static void ref_key_prepare(double *kk, double *k_out, const float *k, const float *a,
                            const float *k_k, const float *k_a, int R, int C, int N) {
    for (int r = 0; r < R; r++) {
        for (int h = 0; h < C / N; h++) {
            double sq = 0.0;
            for (int j = 0; j < N; j++) {
                int c = h * N + j;
                double t = (double)k[r * C + c] * k_k[c];
                kk[r * C + c] = t;
                sq += t * t;
            }
            double norm = fmax(sqrt(sq), 1e-12);
            for (int j = 0; j < N; j++) kk[r * C + h * N + j] /= norm;
        }
        for (int c = 0; c < C; c++)
            k_out[r * C + c] = k[r * C + c] * (1.0 + ((double)a[r * C + c] - 1.0) * k_a[c]);
    }
}

/* Heads of 64 (every RWKV-7 model) and of other sizes, including ones that
 * are not a multiple of the 8-float vectors. */
static void test_key_prepare_normalises_per_head_and_zero_head_stays_finite(void **state) {
    (void)state;
    const int shapes[][3] = {{1, 64, 64}, {3, 192, 64}, {40, 1024, 64},
                             {3, 96, 32}, {5, 36, 12}, {17, 256, 16}};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int R = shapes[c][0], C = shapes[c][1], N = shapes[c][2];
        const size_t n = (size_t)R * C;
        float *k0 = random_floats(n, -2, 2), *a = random_floats(n, 0, 1);
        float *k_k = random_floats(C, 0.5, 1.5), *k_a = random_floats(C, 0, 1);
        /* the last head of row 0 is all zeros: F.normalize clamps its norm */
        for (int j = C - N; j < C; j++) k0[j] = 0.0f;
        double *ref_kk = new_doubles(n), *ref_k = new_doubles(n);
        ref_key_prepare(ref_kk, ref_k, k0, a, k_k, k_a, R, C, N);
        for (int b = 0; b < N_BACKENDS; b++) {
            float *k = copy_floats(k0, n), *kk = random_floats(n, -1, 1);
            backends[b]->key_prepare(backends[b], kk, k, a, k_k, k_a, R, C, N);
            check_all_finite("key_prepare kk", kk, n);
            check_close("key_prepare kk", kk, ref_kk, n, 1e-5);
            check_close("key_prepare k", k, ref_k, n, 1e-6);
            for (int j = C - N; j < C; j++) assert_true(kk[j] == 0.0f);
            free(k);
            free(kk);
        }
        free(k0);
        free(a);
        free(k_k);
        free(k_a);
        free(ref_kk);
        free(ref_k);
    }
}

static void test_bonus_gate_matches_reference(void **state) {
    (void)state;
    const int shapes[][3] = {{1, 64, 64}, {3, 40, 8}, {17, 192, 64}, {40, 1024, 64}};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int R = shapes[c][0], C = shapes[c][1], N = shapes[c][2];
        const size_t n = (size_t)R * C;
        float *out0 = random_floats(n, -1, 1), *r = random_floats(n, -1, 1);
        float *k = random_floats(n, -1, 1), *v = random_floats(n, -1, 1);
        float *g = random_floats(n, -1, 1), *r_k = random_floats(C, -1, 1);
        double *ref = new_doubles(n);
        for (int row = 0; row < R; row++)
            for (int h = 0; h < C / N; h++) {
                size_t o = (size_t)row * C + (size_t)h * N;
                double bonus = 0.0;
                for (int j = 0; j < N; j++) bonus += (double)r[o + j] * k[o + j] * r_k[h * N + j];
                for (int j = 0; j < N; j++)
                    ref[o + j] = ((double)out0[o + j] + bonus * v[o + j]) * g[o + j];
            }
        for (int b = 0; b < N_BACKENDS; b++) {
            float *out = copy_floats(out0, n);
            backends[b]->bonus_gate(backends[b], out, r, k, v, r_k, g, R, C, N);
            check_close("bonus_gate", out, ref, n, 1e-5);
            free(out);
        }
        free(out0);
        free(r);
        free(k);
        free(v);
        free(g);
        free(r_k);
        free(ref);
    }
}

/* ---- token shift ---- */

/* Three sequences of lengths 1, 5, 17 in slots 2, 0, 1 of a padded state. */
static const int ragged_len[3] = {1, 5, 17};
static const int ragged_slot[3] = {2, 0, 1};
enum { RAGGED_SEQ = 3, RAGGED_SLOTS = 3, RAGGED_ROWS = 23 };

static void test_token_shift_ragged_batch_prefix_and_steps_equal_one_call(void **state) {
    (void)state;
    const int Cs[] = {5, 130, 2000};
    for (size_t ci = 0; ci < sizeof Cs / sizeof Cs[0]; ci++) {
        const int C = Cs[ci];
        const size_t stride = (size_t)C + 7; /* the slot's other state follows */
        test_batch tb;
        make_batch(&tb, RAGGED_SEQ, ragged_len, ragged_slot);
        const size_t n = (size_t)RAGGED_ROWS * C, n_state = RAGGED_SLOTS * stride;
        float *x = random_floats(n, -1, 1), *state0 = random_floats(n_state, -1, 1);

        /* reference: prev from the old state / previous row, new state = last row */
        float *ref_prev = malloc(n * sizeof(float)), *ref_state = copy_floats(state0, n_state);
        for (int s = 0; s < RAGGED_SEQ; s++) {
            const int row0 = tb.row_begin[s];
            for (int t = 0; t < tb.seq_len[s]; t++) {
                const float *src = t == 0 ? state0 + tb.slot[s] * stride
                                          : x + (size_t)(row0 + t - 1) * C;
                memcpy(ref_prev + (size_t)(row0 + t) * C, src, (size_t)C * sizeof(float));
            }
            memcpy(ref_state + tb.slot[s] * stride,
                   x + (size_t)(row0 + tb.seq_len[s] - 1) * C, (size_t)C * sizeof(float));
        }

        for (int b = 0; b < N_BACKENDS; b++) {
            rp_backend *be = backends[b];
            /* one call */
            float *prev = random_floats(n, -1, 1), *st = copy_floats(state0, n_state);
            be->token_shift(be, prev, x, st, stride, &tb.batch, C);
            check_equal_floats("token_shift prev", prev, ref_prev, n);
            check_equal_floats("token_shift state", st, ref_state, n_state);

            /* prefix of 3 tokens, then the rest */
            float *prev2 = random_floats(n, -1, 1), *st2 = copy_floats(state0, n_state);
            int src_row[RAGGED_ROWS];
            float *xs = malloc(n * sizeof(float)), *ps = malloc(n * sizeof(float));
            const int cuts[][2] = {{0, 3}, {3, 1000}};
            for (int part = 0; part < 2; part++) {
                test_batch part_b;
                sub_batch(&part_b, &tb, cuts[part][0], cuts[part][1], src_row);
                gather_rows(xs, x, src_row, part_b.batch.n_rows, C);
                be->token_shift(be, ps, xs, st2, stride, &part_b.batch, C);
                scatter_rows(prev2, ps, src_row, part_b.batch.n_rows, C);
            }
            check_equal_floats("token_shift prefix+rest prev", prev2, ref_prev, n);
            check_equal_floats("token_shift prefix+rest state", st2, ref_state, n_state);

            /* step by step: a batch of length-1 sequences per position */
            memcpy(st2, state0, n_state * sizeof(float));
            for (int t = 0; t < 17; t++) {
                test_batch step;
                sub_batch(&step, &tb, t, t + 1, src_row);
                gather_rows(xs, x, src_row, step.batch.n_rows, C);
                be->token_shift(be, ps, xs, st2, stride, &step.batch, C);
                scatter_rows(prev2, ps, src_row, step.batch.n_rows, C);
            }
            check_equal_floats("token_shift steps prev", prev2, ref_prev, n);
            check_equal_floats("token_shift steps state", st2, ref_state, n_state);
            free(prev);
            free(st);
            free(prev2);
            free(st2);
            free(xs);
            free(ps);
        }
        free(x);
        free(state0);
        free(ref_prev);
        free(ref_state);
    }
}

/* ---- wkv7 ---- */

typedef struct {
    int C, N;
    size_t stride; /* floats between slots: the [H,N,N] state plus padding */
    float *r, *w, *k, *v, *kk, *a, *state0;
} wkv_inputs;

static void wkv_inputs_make(wkv_inputs *in, int C, int N, int rows) {
    const size_t n = (size_t)rows * C;
    in->C = C;
    in->N = N;
    in->stride = (size_t)C * N + 13;
    in->r = random_floats(n, -1, 1);
    in->w = random_floats(n, -4, 3);
    in->k = random_floats(n, -1, 1);
    in->v = random_floats(n, -1, 1);
    in->a = random_floats(n, 0, 1);
    in->kk = random_floats(n, -1, 1);
    for (int r = 0; r < rows; r++) /* unit removal key per head, as key_prepare makes */
        for (int h = 0; h < C / N; h++) {
            float *p = in->kk + (size_t)r * C + (size_t)h * N;
            double sq = 0.0;
            for (int j = 0; j < N; j++) sq += (double)p[j] * p[j];
            for (int j = 0; j < N; j++) p[j] = (float)(p[j] / sqrt(sq));
        }
    in->state0 = random_floats(RAGGED_SLOTS * in->stride, -0.5, 0.5);
}

static void wkv_inputs_free(wkv_inputs *in) {
    free(in->r);
    free(in->w);
    free(in->k);
    free(in->v);
    free(in->a);
    free(in->kk);
    free(in->state0);
}

/* The spec's recurrence in double, one (sequence, head) at a time. */
static void ref_wkv7(double *y, double *state, const wkv_inputs *in, const test_batch *tb) {
    const int C = in->C, N = in->N;
    double *sa = new_doubles(N);
    for (int s = 0; s < tb->n_seq; s++)
        for (int h = 0; h < C / N; h++) {
            double *S = state + tb->slot[s] * in->stride + (size_t)h * N * N;
            for (int t = 0; t < tb->seq_len[s]; t++) {
                const size_t o = (size_t)(tb->row_begin[s] + t) * C + (size_t)h * N;
                for (int i = 0; i < N; i++) {
                    sa[i] = 0.0;
                    for (int j = 0; j < N; j++) sa[i] += S[i * N + j] * -(double)in->kk[o + j];
                }
                for (int i = 0; i < N; i++) {
                    double yi = 0.0;
                    for (int j = 0; j < N; j++) {
                        double b = (double)in->kk[o + j] * in->a[o + j];
                        S[i * N + j] = S[i * N + j] * ref_decay(in->w[o + j]) + sa[i] * b +
                                       (double)in->v[o + i] * in->k[o + j];
                        yi += S[i * N + j] * in->r[o + j];
                    }
                    y[o + i] = yi;
                }
            }
        }
    free(sa);
}

/* Runs wkv7 over the rows of `part` (a sub-batch of the ragged batch). */
static void run_wkv_part(rp_backend *be, float *y, float *st, const wkv_inputs *in,
                         const test_batch *part, const int *src_row) {
    const int rows = part->batch.n_rows, C = in->C;
    const size_t n = (size_t)rows * C;
    float *buf[7];
    const float *src[6] = {in->r, in->w, in->k, in->v, in->kk, in->a};
    for (int i = 0; i < 7; i++) {
        buf[i] = malloc(n * sizeof(float));
        assert_non_null(buf[i]);
        if (i < 6) gather_rows(buf[i], src[i], src_row, rows, C);
    }
    be->wkv7(be, buf[6], buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], st, in->stride,
             &part->batch, C, in->N);
    scatter_rows(y, buf[6], src_row, rows, C);
    for (int i = 0; i < 7; i++) free(buf[i]);
}

static void test_wkv7_ragged_batch_matches_double_reference(void **state) {
    (void)state;
    /* Two heads of 64 and three of 24 (an odd number of 8-float vectors) take
     * the vector kernel; heads of 12 (not a multiple of 8) and one of 300
     * (beyond the per-token buffers) the generic one. */
    const int shapes[][2] = {{128, 64}, {72, 24}, {36, 12}, {300, 300}};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int C = shapes[c][0], N = shapes[c][1];
        test_batch tb;
        make_batch(&tb, RAGGED_SEQ, ragged_len, ragged_slot);
        wkv_inputs in;
        wkv_inputs_make(&in, C, N, RAGGED_ROWS);
        const size_t n = (size_t)RAGGED_ROWS * C, n_state = RAGGED_SLOTS * in.stride;
        double *ref_y = new_doubles(n), *ref_state = new_doubles(n_state);
        for (size_t i = 0; i < n_state; i++) ref_state[i] = in.state0[i];
        ref_wkv7(ref_y, ref_state, &in, &tb);
        float *first_y = NULL, *first_state = NULL;
        for (int b = 0; b < N_BACKENDS; b++) {
            rp_backend *be = backends[b];
            float *y = random_floats(n, -1, 1), *st = copy_floats(in.state0, n_state);
            be->wkv7(be, y, in.r, in.w, in.k, in.v, in.kk, in.a, st, in.stride, &tb.batch, C, N);
            char what[96];
            snprintf(what, sizeof what, "wkv7 C=%d N=%d threads=%d", C, N, backend_threads[b]);
            check_close(what, y, ref_y, n, 1e-5);
            check_close(what, st, ref_state, n_state, 1e-5);
            if (b == 0) {
                first_y = copy_floats(y, n);
                first_state = copy_floats(st, n_state);
            } else {
                check_close_floats(what, y, first_y, n, 1e-6);
                check_close_floats(what, st, first_state, n_state, 1e-6);
            }
            free(y);
            free(st);
        }
        free(first_y);
        free(first_state);
        free(ref_y);
        free(ref_state);
        wkv_inputs_free(&in);
    }
}

static void test_wkv7_prefix_then_rest_and_steps_equal_one_call(void **state) {
    (void)state;
    const int C = 128, N = 64;
    test_batch tb;
    make_batch(&tb, RAGGED_SEQ, ragged_len, ragged_slot);
    wkv_inputs in;
    wkv_inputs_make(&in, C, N, RAGGED_ROWS);
    const size_t n = (size_t)RAGGED_ROWS * C, n_state = RAGGED_SLOTS * in.stride;
    int src_row[RAGGED_ROWS];
    for (int b = 0; b < N_BACKENDS; b++) {
        rp_backend *be = backends[b];
        float *y = random_floats(n, -1, 1), *st = copy_floats(in.state0, n_state);
        be->wkv7(be, y, in.r, in.w, in.k, in.v, in.kk, in.a, st, in.stride, &tb.batch, C, N);

        /* prefix of 4 tokens (the length-1 sequence ends in it), then the rest */
        float *y2 = random_floats(n, -1, 1), *st2 = copy_floats(in.state0, n_state);
        const int cuts[][2] = {{0, 4}, {4, 1000}};
        for (int part = 0; part < 2; part++) {
            test_batch part_b;
            sub_batch(&part_b, &tb, cuts[part][0], cuts[part][1], src_row);
            run_wkv_part(be, y2, st2, &in, &part_b, src_row);
        }
        check_equal_floats("wkv7 prefix+rest y", y2, y, n);
        check_equal_floats("wkv7 prefix+rest state", st2, st, n_state);

        /* step mode: every call is a batch of length-1 sequences */
        memcpy(st2, in.state0, n_state * sizeof(float));
        for (int t = 0; t < 17; t++) {
            test_batch step;
            sub_batch(&step, &tb, t, t + 1, src_row);
            run_wkv_part(be, y2, st2, &in, &step, src_row);
        }
        check_equal_floats("wkv7 steps y", y2, y, n);
        check_equal_floats("wkv7 steps state", st2, st, n_state);
        free(y);
        free(st);
        free(y2);
        free(st2);
    }
    wkv_inputs_free(&in);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_uses_given_or_openmp_default_thread_count),
        cmocka_unit_test(test_alloc_is_zeroed_and_64_byte_aligned),
        cmocka_unit_test(test_matmul_linear_matches_double_reference),
        cmocka_unit_test(test_matmul_linear_few_rows_independent_of_batch),
        cmocka_unit_test(test_matmul_decode_rows_of_any_count_equal_each_row_alone),
        cmocka_unit_test(test_matmul_decode_rows_dealt_columns_equal_one_thread),
        cmocka_unit_test(test_matmul_lora_matches_double_reference),
        cmocka_unit_test(test_embedding_gathers_token_rows),
        cmocka_unit_test(test_layernorm_matches_double_reference_and_saves_stats),
        cmocka_unit_test(test_groupnorm_matches_double_reference_per_head),
        cmocka_unit_test(test_lerp_and_value_residual_match_reference),
        cmocka_unit_test(test_bias_act_matches_reference_for_every_activation),
        cmocka_unit_test(test_fast_exp_sigmoid_tanh_decay_agree_with_libm),
        cmocka_unit_test(test_key_prepare_normalises_per_head_and_zero_head_stays_finite),
        cmocka_unit_test(test_bonus_gate_matches_reference),
        cmocka_unit_test(test_token_shift_ragged_batch_prefix_and_steps_equal_one_call),
        cmocka_unit_test(test_wkv7_ragged_batch_matches_double_reference),
        cmocka_unit_test(test_wkv7_prefix_then_rest_and_steps_equal_one_call),
    };
    return cmocka_run_group_tests_name("cpu_ops", tests, setup_backends, teardown_backends);
}
