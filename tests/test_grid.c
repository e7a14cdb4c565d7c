/* The layer partition over pipeline stages (pipe/grid.h): the balanced split
 * gives every stage at least one layer, covers every layer exactly once for
 * any P from 1 to n_layer, and is optimal for its cost model (checked against
 * brute force), also with the head weighed by its decode cost (serving);
 * an explicit --stage-layers list is refused when it does not
 * cover every layer exactly once. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <float.h>
#include <string.h>

#include "pipe/grid.h"

static int decode_costs; /* 1: the head weighs its decode cost (rp_partition_balanced_decode) */

static double stage_cost(const rp_config *c, const int *layers, int P, int s) {
    const double head = decode_costs ? rp_partition_head_decode_cost(c) : rp_partition_head_cost(c);
    return layers[s] * rp_partition_layer_cost(c) + (s == P - 1 ? head : 0);
}

static double max_cost(const rp_config *c, const int *layers, int P) {
    double worst = 0;
    for (int s = 0; s < P; s++)
        if (stage_cost(c, layers, P, s) > worst) worst = stage_cost(c, layers, P, s);
    return worst;
}

/* Smallest max stage cost over every split of L layers into P non-empty stages. */
static double brute_force(const rp_config *c, int *layers, int s, int P, int left) {
    if (s == P - 1) {
        layers[s] = left;
        return max_cost(c, layers, P);
    }
    double best = DBL_MAX;
    for (int k = 1; k <= left - (P - 1 - s); k++) {
        layers[s] = k;
        double v = brute_force(c, layers, s + 1, P, left - k);
        if (v < best) best = v;
    }
    return best;
}

static void test_balanced_covers_every_layer_and_is_optimal(void **state) {
    const char *shapes[] = {"L12-C768-V65536", "L12-C256-V256", "L7-C128-V50000", "tiny"};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        rp_config cfg;
        rp_error err;
        assert_int_equal(rp_config_builtin(&cfg, shapes[i], 0, &err), RP_OK);
        for (int P = 1; P <= cfg.n_layer; P++) {
            int layers[64], scratch[64];
            assert_int_equal(rp_partition_balanced(&cfg, P, layers, &err), RP_OK);
            int total = 0;
            for (int s = 0; s < P; s++) {
                if (layers[s] < 1) fail_msg("%s P=%d: stage %d has no layer", shapes[i], P, s);
                total += layers[s];
            }
            assert_int_equal(total, cfg.n_layer);
            double best = brute_force(&cfg, scratch, 0, P, cfg.n_layer);
            if (max_cost(&cfg, layers, P) > best * (1 + 1e-12))
                fail_msg("%s P=%d: split costs %g, the best split %g", shapes[i], P,
                         max_cost(&cfg, layers, P), best);
        }
        int layers[64];
        assert_int_equal(rp_partition_balanced(&cfg, cfg.n_layer + 1, layers, &err), RP_ERR_ARG);
        assert_int_equal(rp_partition_balanced(&cfg, 0, layers, &err), RP_ERR_ARG);
    }
}

static void test_large_vocab_head_gets_fewer_layers(void **state) {
    rp_config cfg;
    rp_error err;
    /* The head of a 65536-token vocabulary costs ~13 blocks of C=768. */
    assert_int_equal(rp_config_builtin(&cfg, "L24-C768-V65536", 0, &err), RP_OK);
    int layers[4];
    assert_int_equal(rp_partition_balanced(&cfg, 4, layers, &err), RP_OK);
    if (!(layers[3] < layers[0]))
        fail_msg("last stage (head) got %d layers, first %d", layers[3], layers[0]);
}

/* Serving: the decode partition is optimal for the decode cost (head plus
 * sampling of every vocabulary id) and gives the last stage fewer layers
 * than the training partition where the choice is free. */
static void test_decode_partition_weighs_sampling(void **state) {
    (void)state;
    const char *shapes[] = {"L12-C768-V65536", "L24-C768-V65536", "L7-C128-V50000", "tiny"};
    rp_error err;
    decode_costs = 1;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        rp_config cfg;
        assert_int_equal(rp_config_builtin(&cfg, shapes[i], 0, &err), RP_OK);
        for (int P = 1; P <= cfg.n_layer && P <= 6; P++) {
            int layers[64], scratch[64], total = 0;
            assert_int_equal(rp_partition_balanced_decode(&cfg, P, layers, &err), RP_OK);
            for (int s = 0; s < P; s++) {
                if (layers[s] < 1) fail_msg("%s P=%d: stage %d has no layer", shapes[i], P, s);
                total += layers[s];
            }
            assert_int_equal(total, cfg.n_layer);
            const double best = brute_force(&cfg, scratch, 0, P, cfg.n_layer);
            if (max_cost(&cfg, layers, P) > best * (1 + 1e-12))
                fail_msg("%s P=%d decode: split costs %g, the best split %g", shapes[i], P,
                         max_cost(&cfg, layers, P), best);
        }
    }
    decode_costs = 0;
    rp_config cfg;
    assert_int_equal(rp_config_builtin(&cfg, "L24-C768-V65536", 0, &err), RP_OK);
    int train[2], decode[2];
    assert_int_equal(rp_partition_balanced(&cfg, 2, train, &err), RP_OK);
    assert_int_equal(rp_partition_balanced_decode(&cfg, 2, decode, &err), RP_OK);
    if (!(decode[1] < train[1]))
        fail_msg("L24-C768-V65536 on 2 stages: the last stage holds %d layers for decode, "
                 "%d for training", decode[1], train[1]);
    assert_true(rp_partition_head_decode_cost(&cfg) >
                rp_partition_head_cost(&cfg) + 100.0 * cfg.vocab_size);
}

static void test_explicit_list(void **state) {
    rp_config cfg;
    rp_error err;
    assert_int_equal(rp_config_builtin(&cfg, "L12-C256-V256", 0, &err), RP_OK);
    int layers[8];
    assert_int_equal(rp_partition_parse("4,4,3,1", &cfg, 4, layers, &err), RP_OK);
    assert_int_equal(layers[0], 4);
    assert_int_equal(layers[3], 1);
    struct { const char *text; int P; const char *msg; } bad[] = {
        {"4,4,3", 4, "gives 3 stages but the pipeline has 4"},
        {"4,4,3,2", 4, "covers 13 layers but the model has 12"},
        {"4,4,2,1", 4, "covers 11 layers but the model has 12"},
        {"4,4,4,0", 4, "stage 3 has no layer"},
        {"4,4,x,0", 4, "item 3 is not a layer count"},
        {"6,6", 1, "more than the 1 pipeline stages"},
        {"6;6", 2, "unexpected ';'"},
        {"", 2, "gives 0 stages"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(rp_partition_parse(bad[i].text, &cfg, bad[i].P, layers, &err),
                         RP_ERR_ARG);
        if (!strstr(err.msg, bad[i].msg))
            fail_msg("'%s': message '%s' lacks '%s'", bad[i].text, err.msg, bad[i].msg);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_balanced_covers_every_layer_and_is_optimal),
        cmocka_unit_test(test_large_vocab_head_gets_fewer_layers),
        cmocka_unit_test(test_decode_partition_weighs_sampling),
        cmocka_unit_test(test_explicit_list),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
