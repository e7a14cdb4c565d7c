/* Sampler tests: greedy and banned ids, top-k/top-p limits, reproducibility of
 * the (seed, step) draw, and empirical frequencies against the distribution
 * docs/rwkv7.md (Sampling) defines (top-p -> top-k -> p^(1/T) renormalised). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "infer/sampler.h"
#include "core/clock.h"
#include "sampler_reference.h"

static void *scratch_for(int n_vocab) {
    void *s = malloc(rp_sampler_scratch_bytes(n_vocab));
    assert_non_null(s);
    return s;
}

static rp_sampler_params params(float temperature, float top_p, int top_k, uint64_t seed) {
    rp_sampler_params p = {temperature, top_p, top_k, seed};
    rp_error err = {0};
    if (rp_sampler_validate(&p, &err) != RP_OK) fail_msg("%s", err.msg);
    return p;
}

/* Logits of a 4-token distribution with probabilities 0.1, 0.2, 0.3, 0.4,
 * shifted by a constant the softmax must cancel. */
static void four_token_logits(float logits[4]) {
    const double p[4] = {0.1, 0.2, 0.3, 0.4};
    for (int i = 0; i < 4; i++) logits[i] = (float)(log(p[i]) + 30.0);
}

/* Draws n samples (steps 0..n-1) and checks every token's frequency is within
 * 5 sigma of want[] (tokens with want 0 must never appear). */
static void expect_frequencies(const float *logits, int n_vocab, rp_sampler_params p, const double *want, int n) {
    void *scratch = scratch_for(n_vocab);
    int *count = calloc((size_t)n_vocab, sizeof *count);
    assert_non_null(count);
    for (int step = 0; step < n; step++) {
        int id = rp_sample(logits, n_vocab, &p, (uint64_t)step, NULL, 0, scratch);
        assert_true(id >= 0 && id < n_vocab);
        count[id]++;
    }
    for (int i = 0; i < n_vocab; i++) {
        double expected = want[i] * n;
        double sigma = sqrt(n * want[i] * (1.0 - want[i]));
        if (want[i] == 0.0) {
            if (count[i] != 0) fail_msg("token %d drawn %d times, expected never", i, count[i]);
        } else if (fabs(count[i] - expected) > 5.0 * sigma) {
            fail_msg("token %d drawn %d times in %d, expected %.1f +- %.1f (T %g top_p %g top_k %d)", i, count[i],
                     n, expected, sigma, (double)p.temperature, (double)p.top_p, p.top_k);
        }
    }
    free(count);
    free(scratch);
}

static void test_defaults_follow_the_rwkv_package(void **state) {
    (void)state;
    rp_sampler_params p;
    rp_sampler_defaults(&p);
    assert_true(p.temperature == 1.0f);
    assert_true(p.top_p == 0.85f);
    assert_int_equal(p.top_k, 0);
    assert_int_equal(p.seed, 42);
    assert_int_equal(rp_sampler_validate(&p, NULL), RP_OK);
    assert_int_equal(rp_sampler_scratch_bytes(10), 10 * (2 * sizeof(float) + sizeof(int)));
}

static void test_greedy_picks_argmax_lowest_id_on_ties(void **state) {
    (void)state;
    const float logits[6] = {0.5f, 3.0f, -1.0f, 7.0f, 7.0f, 2.0f};
    void *scratch = scratch_for(6);
    rp_sampler_params p = params(0.0f, 0.85f, 0, 1);
    for (uint64_t step = 0; step < 50; step++) assert_int_equal(rp_sample(logits, 6, &p, step, NULL, 0, scratch), 3);
    free(scratch);
}

static void test_banned_ids_are_never_chosen(void **state) {
    (void)state;
    /* the ban hits the most likely tokens, under greedy and sampling */
    const float logits[5] = {9.0f, 1.0f, 1.0f, 8.0f, 1.0f};
    const int32_t banned[2] = {0, 3};
    void *scratch = scratch_for(5);
    rp_sampler_params greedy = params(0.0f, 1.0f, 0, 1);
    assert_int_equal(rp_sample(logits, 5, &greedy, 0, banned, 2, scratch), 1);
    rp_sampler_params wide = params(1.5f, 1.0f, 0, 3);
    int seen[5] = {0};
    for (uint64_t step = 0; step < 3000; step++) {
        int id = rp_sample(logits, 5, &wide, step, banned, 2, scratch);
        assert_true(id == 1 || id == 2 || id == 4);
        seen[id]++;
    }
    assert_true(seen[1] > 0 && seen[2] > 0 && seen[4] > 0);
    /* everything banned: no token can be drawn */
    const int32_t all[5] = {0, 1, 2, 3, 4};
    assert_int_equal(rp_sample(logits, 5, &wide, 0, all, 5, scratch), -1);
    free(scratch);
}

static void test_top_k_1_and_tiny_top_p_equal_greedy(void **state) {
    (void)state;
    enum { V = 1000 };
    float *logits = malloc(V * sizeof *logits);
    assert_non_null(logits);
    for (int i = 0; i < V; i++) logits[i] = (float)((i * 7919) % 1009) / 100.0f; /* max at a scattered id */
    void *scratch = scratch_for(V);
    rp_sampler_params greedy = params(0.0f, 1.0f, 0, 5);
    int argmax = rp_sample(logits, V, &greedy, 0, NULL, 0, scratch);
    for (int i = 0; i < V; i++) assert_true(logits[i] <= logits[argmax]);
    rp_sampler_params top1 = params(1.0f, 1.0f, 1, 5);
    rp_sampler_params tiny_p = params(2.0f, 1e-6f, 0, 5);
    for (uint64_t step = 0; step < 500; step++) {
        assert_int_equal(rp_sample(logits, V, &top1, step, NULL, 0, scratch), argmax);
        assert_int_equal(rp_sample(logits, V, &tiny_p, step, NULL, 0, scratch), argmax);
    }
    free(scratch);
    free(logits);
}

static void test_same_seed_repeats_and_different_seed_differs(void **state) {
    (void)state;
    enum { V = 64, STEPS = 200 };
    float logits[V];
    for (int i = 0; i < V; i++) logits[i] = 0.05f * (float)i;
    void *scratch = scratch_for(V);
    rp_sampler_params a = params(1.0f, 1.0f, 0, 1234), b = params(1.0f, 1.0f, 0, 1235);
    int first[STEPS], again[STEPS], other[STEPS];
    for (int s = 0; s < STEPS; s++) first[s] = rp_sample(logits, V, &a, (uint64_t)s, NULL, 0, scratch);
    /* the draw depends on (seed, step) only: replay in reverse order */
    for (int s = STEPS - 1; s >= 0; s--) again[s] = rp_sample(logits, V, &a, (uint64_t)s, NULL, 0, scratch);
    for (int s = 0; s < STEPS; s++) other[s] = rp_sample(logits, V, &b, (uint64_t)s, NULL, 0, scratch);
    assert_memory_equal(first, again, sizeof first);
    int differ = 0;
    for (int s = 0; s < STEPS; s++) differ += first[s] != other[s];
    assert_true(differ > STEPS / 2); /* two independent draws from 64 tokens rarely agree */
    free(scratch);
}

static void test_frequencies_match_softmax_at_temperature_1(void **state) {
    (void)state;
    float logits[4];
    four_token_logits(logits);
    const double want[4] = {0.1, 0.2, 0.3, 0.4};
    expect_frequencies(logits, 4, params(1.0f, 1.0f, 0, 11), want, 20000);
}

static void test_temperature_raises_probabilities_to_1_over_t(void **state) {
    (void)state;
    float logits[4];
    four_token_logits(logits);
    /* T = 0.5: p^2 = .01 .04 .09 .16, sum .30 */
    const double sharp[4] = {0.01 / 0.3, 0.04 / 0.3, 0.09 / 0.3, 0.16 / 0.3};
    expect_frequencies(logits, 4, params(0.5f, 1.0f, 0, 12), sharp, 20000);
    /* T = 2: sqrt(p) */
    double flat[4], sum = 0.0;
    for (int i = 0; i < 4; i++) sum += flat[i] = sqrt(0.1 * (i + 1));
    for (int i = 0; i < 4; i++) flat[i] /= sum;
    expect_frequencies(logits, 4, params(2.0f, 1.0f, 0, 13), flat, 20000);
}

static void test_top_p_keeps_smallest_prefix_reaching_p(void **state) {
    (void)state;
    float logits[4];
    four_token_logits(logits);
    /* top_p 0.6: .4 alone is short, .4 + .3 reaches it -> {3, 2} renormalised */
    const double want[4] = {0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0};
    expect_frequencies(logits, 4, params(1.0f, 0.6f, 0, 14), want, 20000);
    /* top_p 0.75 needs .4 + .3 + .2 */
    const double want3[4] = {0.0, 2.0 / 9.0, 3.0 / 9.0, 4.0 / 9.0};
    expect_frequencies(logits, 4, params(1.0f, 0.75f, 0, 15), want3, 20000);
}

static void test_temperature_applies_after_top_p(void **state) {
    (void)state;
    float logits[4];
    four_token_logits(logits);
    /* top_p 0.6 keeps {.3, .4}; then T = 0.5 squares them: .09 / .25, .16 / .25 */
    const double want[4] = {0.0, 0.0, 0.36, 0.64};
    expect_frequencies(logits, 4, params(0.5f, 0.6f, 0, 16), want, 20000);
}

static const float *ref_logits;
static int compare_logit_desc(const void *a, const void *b) {
    float x = ref_logits[*(const int *)a], y = ref_logits[*(const int *)b];
    return (x < y) - (x > y);
}

static void test_top_p_on_a_large_vocab_matches_a_reference_nucleus(void **state) {
    (void)state;
    /* 2000 tokens with a long tail: the nucleus for top_p 0.5 is computed here
     * by sorting everything in double precision; the sampler (which sorts only
     * likely candidates) must draw exactly from it, in proportion. */
    enum { V = 2000 };
    float *logits = malloc(V * sizeof *logits);
    int *order = malloc(V * sizeof *order);
    double *want = calloc(V, sizeof *want);
    assert_true(logits && order && want);
    for (int i = 0; i < V; i++) {
        logits[i] = (float)(-0.004 * ((i * 7919) % V)); /* distinct values, max at id 0 */
        order[i] = i;
    }
    double z = 0.0;
    for (int i = 0; i < V; i++) z += exp((double)logits[i]);
    ref_logits = logits;
    qsort(order, V, sizeof *order, compare_logit_desc);
    double cumulative = 0.0, kept = 0.0;
    int n_kept = 0;
    while (cumulative < 0.5) {
        double pi = exp((double)logits[order[n_kept]]) / z;
        cumulative += pi;
        want[order[n_kept++]] = pi;
        kept += pi;
    }
    for (int i = 0; i < V; i++) want[i] /= kept;
    assert_true(n_kept > 100 && n_kept < V / 2);
    expect_frequencies(logits, V, params(1.0f, 0.5f, 0, 22), want, 40000);
    free(want);
    free(order);
    free(logits);
}

static void test_top_p_keeps_ties_at_the_cut(void **state) {
    (void)state;
    /* uniform over 4: the cumulative sum reaches 0.3 at the second token, and
     * the other two tie with it, so all four stay */
    const float logits[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    const double want[4] = {0.25, 0.25, 0.25, 0.25};
    expect_frequencies(logits, 4, params(1.0f, 0.3f, 0, 17), want, 20000);
}

static void test_top_k_keeps_k_most_likely(void **state) {
    (void)state;
    float logits[4];
    four_token_logits(logits);
    const double want[4] = {0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0};
    expect_frequencies(logits, 4, params(1.0f, 1.0f, 2, 18), want, 20000);
    /* with top-p too, the tighter limit wins */
    const double one[4] = {0.0, 0.0, 0.0, 1.0};
    expect_frequencies(logits, 4, params(1.0f, 0.6f, 1, 19), one, 2000);
}

static void test_small_temperature_does_not_underflow(void **state) {
    (void)state;
    /* p^(1/T) with T = 0.01 is 1e-100-ish in fp32 for every token; the
     * sampler must still return the most likely one, not fail */
    enum { V = 50000 };
    float *logits = calloc(V, sizeof *logits);
    assert_non_null(logits);
    logits[777] = 1.0f;
    void *scratch = scratch_for(V);
    rp_sampler_params p = params(0.01f, 1.0f, 0, 20);
    for (uint64_t step = 0; step < 20; step++) assert_int_equal(rp_sample(logits, V, &p, step, NULL, 0, scratch), 777);
    free(scratch);
    free(logits);
}

static void test_nan_logits_are_never_chosen(void **state) {
    (void)state;
    const float logits[3] = {NAN, 0.0f, 0.0f};
    void *scratch = scratch_for(3);
    rp_sampler_params p = params(1.0f, 1.0f, 0, 21);
    for (uint64_t step = 0; step < 200; step++) {
        int id = rp_sample(logits, 3, &p, step, NULL, 0, scratch);
        assert_true(id == 1 || id == 2);
    }
    rp_sampler_params greedy = params(0.0f, 1.0f, 0, 21);
    assert_int_equal(rp_sample(logits, 3, &greedy, 0, NULL, 0, scratch), 1);
    free(scratch);
}

/* NaN weights or a NaN session state give all-NaN logits: the message must
 * say the logits are not finite, how many, at which token, and what to
 * check, not that every token is banned. */
static void test_all_nan_logits_say_not_finite_not_banned(void **state) {
    (void)state;
    const float nan_logits[4] = {NAN, NAN, NAN, NAN};
    void *scratch = scratch_for(4);
    rp_sampler_params p = params(1.0f, 0.85f, 0, 3), greedy = params(0.0f, 1.0f, 0, 3);
    int r = rp_sample(nan_logits, 4, &p, 0, NULL, 0, scratch);
    assert_int_equal(r, RP_SAMPLE_NOT_FINITE - 4);
    assert_int_equal(rp_sample(nan_logits, 4, &greedy, 0, NULL, 0, scratch), r);
    rp_error err = {0};
    assert_int_equal(rp_sample_failure(r, 7, &err), RP_ERR_FORMAT);
    assert_string_equal(err.msg,
                        "the logits are not finite at generated token 7 (4 NaN or infinite "
                        "values, none left to sample from): the model produced NaN/inf; check "
                        "the model file or the session state");
    assert_string_equal(rp_sample_failure_message(r, 7), err.msg);

    /* One id banned, the others NaN or -inf: still the logits' fault. */
    const float mixed[4] = {1.0f, NAN, -INFINITY, NAN};
    const int32_t ban0[1] = {0};
    r = rp_sample(mixed, 4, &p, 0, ban0, 1, scratch);
    assert_int_equal(r, RP_SAMPLE_NOT_FINITE - 3);
    assert_non_null(strstr(rp_sample_failure_message(r, 0), "(3 NaN or infinite values"));

    /* Every id banned, finite logits: the banned list is the reason. */
    const float fine[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    const int32_t all[4] = {3, 2, 1, 0};
    r = rp_sample(fine, 4, &p, 0, all, 4, scratch);
    assert_int_equal(r, RP_SAMPLE_NONE);
    assert_int_equal(rp_sample_failure(r, 2, &err), RP_ERR_ARG);
    assert_string_equal(err.msg, "every token is banned at generated token 2: nothing can be sampled");
    free(scratch);
}

static void expect_invalid(rp_sampler_params p, const char *words) {
    rp_error err = {0};
    assert_int_equal(rp_sampler_validate(&p, &err), RP_ERR_ARG);
    if (!strstr(err.msg, words)) fail_msg("message '%s' should mention '%s'", err.msg, words);
    const float logits[2] = {0.0f, 1.0f};
    void *scratch = scratch_for(2);
    assert_int_equal(rp_sample(logits, 2, &p, 0, NULL, 0, scratch), -1);
    free(scratch);
}

static void test_invalid_params_are_rejected(void **state) {
    (void)state;
    expect_invalid((rp_sampler_params){-0.5f, 0.85f, 0, 1}, "temperature -0.5");
    expect_invalid((rp_sampler_params){NAN, 0.85f, 0, 1}, "temperature nan");
    expect_invalid((rp_sampler_params){INFINITY, 0.85f, 0, 1}, "temperature inf");
    expect_invalid((rp_sampler_params){1.0f, 0.0f, 0, 1}, "top_p 0");
    expect_invalid((rp_sampler_params){1.0f, -0.1f, 0, 1}, "top_p -0.1");
    expect_invalid((rp_sampler_params){1.0f, 1.5f, 0, 1}, "top_p 1.5");
    expect_invalid((rp_sampler_params){1.0f, NAN, 0, 1}, "top_p nan");
    expect_invalid((rp_sampler_params){1.0f, 0.85f, -1, 1}, "top_k -1");
}

/* Deterministic pseudo-random numbers for the distributions (not the sampler's RNG). */
static uint64_t mix_state = 0x9E3779B97F4A7C15ull;
static double next_unit(void) {
    mix_state ^= mix_state << 13;
    mix_state ^= mix_state >> 7;
    mix_state ^= mix_state << 17;
    return (double)(mix_state >> 11) / 9007199254740992.0;
}

/* Top-p and top-k by partial selection draw the SAME token as the sorted
 * reference (the sampler before it, kept in tests/sampler_reference.h) for the
 * same (seed, step), over random distributions of every kind: flat (the case
 * that sorted all 65536 ids), peaked, Zipf-like, many ties, few distinct
 * values, with -inf and banned ids, at several top_p, top_k and temperatures. */
static void test_partial_top_p_draws_the_reference_token(void **state) {
    (void)state;
    static const int vocabs[] = {2, 7, 256, 1000, 65536};
    static const float top_ps[] = {1e-9f, 0.1f, 0.3f, 0.5f, 0.85f, 0.95f, 0.999f, 1.0f};
    static const int top_ks[] = {0, 0, 1, 3, 50};
    static const float temps[] = {1.0f, 0.7f, 1.5f};
    const int max_v = 65536;
    float *logits = malloc(sizeof(float) * max_v);
    void *s_new = scratch_for(max_v), *s_ref = scratch_for(max_v);
    assert_non_null(logits);
    long compared = 0, differ = 0;
    double t_new = 0, t_ref = 0;
    for (int trial = 0; trial < 300; trial++) {
        const int V = vocabs[trial % 5];
        const int kind = (trial / 5) % 6;
        for (int i = 0; i < V; i++) {
            double u = next_unit();
            switch (kind) {
            case 0: logits[i] = 0.0f; break;                                   /* flat */
            case 1: logits[i] = (float)(u * 1e-3); break;                      /* nearly flat */
            case 2: logits[i] = (float)(8.0 * u * u * u); break;               /* a few peaks */
            case 3: logits[i] = (float)(-1.1 * log((double)(i + 1)) + u * 0.1); break; /* Zipf */
            case 4: logits[i] = (float)floor(u * 4); break;                    /* many ties */
            default: logits[i] = (float)(u * 20 - 10); break;                 /* wide */
            }
        }
        if (V > 10 && trial % 7 == 0) logits[V / 3] = -INFINITY;
        int32_t banned[2] = {V - 1, 0};
        const int n_banned = V > 2 && trial % 4 == 0 ? 2 : 0;
        for (int c = 0; c < 3; c++) {
            rp_sampler_params p = params(temps[(trial + c) % 3], top_ps[(trial / 30 + c) % 8],
                                         top_ks[(trial + 2 * c) % 5], (uint64_t)trial * 31 + (uint64_t)c);
            for (uint64_t step = 0; step < 2; step++) {
                double t0 = rp_now_seconds();
                int a = rp_sample(logits, V, &p, step, banned, n_banned, s_new);
                double t1 = rp_now_seconds();
                int b = ref_sample(logits, V, &p, step, banned, n_banned, s_ref);
                double t2 = rp_now_seconds();
                t_new += t1 - t0;
                t_ref += t2 - t1;
                compared++;
                if (a != b) {
                    differ++;
                    print_error("V %d kind %d T %g top_p %g top_k %d seed %llu step %llu: %d != %d\n", V,
                                kind, (double)p.temperature, (double)p.top_p, p.top_k,
                                (unsigned long long)p.seed, (unsigned long long)step, a, b);
                }
            }
        }
    }
    print_message("%ld draws compared; partial selection %.1f ms, sorted reference %.1f ms in all\n",
                  compared, t_new * 1e3, t_ref * 1e3);
    assert_int_equal(differ, 0);
    free(logits);
    free(s_new);
    free(s_ref);
}

/* A flat distribution over 65536 ids at top_p 0.85: the case the sort was slow in. */
static void test_partial_top_p_is_faster_on_a_flat_vocab(void **state) {
    (void)state;
    const int V = 65536;
    float *logits = calloc(V, sizeof(float));
    void *s_new = scratch_for(V), *s_ref = scratch_for(V);
    for (int i = 0; i < V; i++) logits[i] = (float)(next_unit() * 0.01);
    rp_sampler_params p = params(1.0f, 0.85f, 0, 3);
    double best_new = 1e9, best_ref = 1e9;
    for (int r = 0; r < 5; r++) {
        double t0 = rp_now_seconds();
        int a = rp_sample(logits, V, &p, (uint64_t)r, NULL, 0, s_new);
        double t1 = rp_now_seconds();
        int b = ref_sample(logits, V, &p, (uint64_t)r, NULL, 0, s_ref);
        double t2 = rp_now_seconds();
        assert_int_equal(a, b);
        if (t1 - t0 < best_new) best_new = t1 - t0;
        if (t2 - t1 < best_ref) best_ref = t2 - t1;
    }
    print_message("V 65536 flat, top_p 0.85: partial %.3f ms, sorted %.3f ms (best of 5)\n",
                  best_new * 1e3, best_ref * 1e3);
    free(logits);
    free(s_new);
    free(s_ref);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_follow_the_rwkv_package),
        cmocka_unit_test(test_greedy_picks_argmax_lowest_id_on_ties),
        cmocka_unit_test(test_banned_ids_are_never_chosen),
        cmocka_unit_test(test_top_k_1_and_tiny_top_p_equal_greedy),
        cmocka_unit_test(test_same_seed_repeats_and_different_seed_differs),
        cmocka_unit_test(test_frequencies_match_softmax_at_temperature_1),
        cmocka_unit_test(test_temperature_raises_probabilities_to_1_over_t),
        cmocka_unit_test(test_top_p_keeps_smallest_prefix_reaching_p),
        cmocka_unit_test(test_temperature_applies_after_top_p),
        cmocka_unit_test(test_top_p_on_a_large_vocab_matches_a_reference_nucleus),
        cmocka_unit_test(test_top_p_keeps_ties_at_the_cut),
        cmocka_unit_test(test_top_k_keeps_k_most_likely),
        cmocka_unit_test(test_small_temperature_does_not_underflow),
        cmocka_unit_test(test_nan_logits_are_never_chosen),
        cmocka_unit_test(test_all_nan_logits_say_not_finite_not_banned),
        cmocka_unit_test(test_invalid_params_are_rejected),
        cmocka_unit_test(test_partial_top_p_draws_the_reference_token),
        cmocka_unit_test(test_partial_top_p_is_faster_on_a_flat_vocab),
    };
    return cmocka_run_group_tests_name("sampler", tests, NULL, NULL);
}
