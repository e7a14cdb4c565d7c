/* The transport's collectives and gathers (transport_collective.c) under
 * mpirun -np 2 and -np 3 (tests/test_transport_collective.sh): broadcast,
 * gather, all-reduce and slice gathers deliver the right bytes, slices are
 * never confused with stage-to-stage transfers, a slice of the wrong size is
 * an error, and a rank that never joins makes the others fail within the
 * timeout with a message naming the operation and the peer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipe/transport.h"

static int rank, size;

static void open_transport(rp_transport *t, double timeout_s) {
    rp_error err;
    if (rp_transport_init(t, MPI_COMM_WORLD, timeout_s, &err) != RP_OK) fail_msg("%s", err.msg);
}

static void test_bcast_from_every_root(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    open_transport(&t, 30);
    for (int root = 0; root < size; root++) {
        int v[1000];
        for (int i = 0; i < 1000; i++) v[i] = rank == root ? root * 10000 + i : -1;
        assert_int_equal(rp_transport_bcast(&t, v, sizeof v, root, "the test data", &err), RP_OK);
        for (int i = 0; i < 1000; i++) assert_int_equal(v[i], root * 10000 + i);
    }
    rp_transport_free(&t);
}

static void test_gather_fixed_size(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    open_transport(&t, 30);
    const int root = size - 1;
    double mine[3] = {rank, rank * 2.5, -rank};
    double all[3 * 8];
    memset(all, 0, sizeof all);
    assert_int_equal(rp_transport_gather(&t, mine, all, sizeof mine, root, "the reports", &err),
                     RP_OK);
    if (rank == root)
        for (int r = 0; r < size; r++) {
            assert_true(all[3 * r] == r);
            assert_true(all[3 * r + 1] == r * 2.5);
            assert_true(all[3 * r + 2] == -r);
        }
    rp_transport_free(&t);
}

static void test_allreduce_sum_and_max(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    open_transport(&t, 30);
    int v[2] = {rank + 1, 10 * rank};
    assert_int_equal(rp_transport_allreduce_int(&t, v, 2, RP_REDUCE_SUM, "the sum", &err), RP_OK);
    assert_int_equal(v[0], size * (size + 1) / 2);
    assert_int_equal(v[1], 10 * size * (size - 1) / 2);
    int m = rank == 1 ? 75 : rank;
    assert_int_equal(rp_transport_allreduce_int(&t, &m, 1, RP_REDUCE_MAX, "the max", &err), RP_OK);
    assert_int_equal(m, 75);
    double d[2] = {0.5 * rank, 1.0};
    assert_int_equal(rp_transport_allreduce_double(&t, d, 2, RP_REDUCE_SUM, "the sum", &err),
                     RP_OK);
    assert_true(d[0] == 0.5 * size * (size - 1) / 2);
    assert_true(d[1] == size);
    rp_transport_free(&t);
}

/* Every rank sends two slices to rank 0 and, to rank 0 too, an activation
 * transfer of the same size sent BEFORE them: rank 0 takes the slices first
 * and each lands where it belongs, in order. */
static void test_slices_in_order_and_apart_from_transfers(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    open_transport(&t, 30);
    enum { N = 64 };
    float a[N], b[N], act[N];
    for (int i = 0; i < N; i++) {
        a[i] = rank * 1000 + i;
        b[i] = -(rank * 1000 + i);
        act[i] = 0.25f;
    }
    if (rank != 0) {
        assert_int_equal(rp_transport_send(&t, act, sizeof act, 0, RP_MSG_ACT, 0, &err), RP_OK);
        assert_int_equal(rp_transport_gather_slice(&t, rank, NULL, a, sizeof a, "slice a", &err),
                         RP_OK);
        assert_int_equal(rp_transport_gather_slice(&t, rank, NULL, b, sizeof b, "slice b", &err),
                         RP_OK);
    } else {
        float *got = calloc((size_t)size * 2 * N, sizeof(float));
        for (int r = 0; r < size; r++) {
            assert_int_equal(rp_transport_gather_slice(&t, r, got + (size_t)r * 2 * N,
                                                       r == 0 ? a : NULL, sizeof a, "slice a",
                                                       &err), RP_OK);
            assert_int_equal(rp_transport_gather_slice(&t, r, got + (size_t)r * 2 * N + N,
                                                       r == 0 ? b : NULL, sizeof b, "slice b",
                                                       &err), RP_OK);
        }
        for (int r = 0; r < size; r++)
            for (int i = 0; i < N; i++) {
                assert_true(got[(size_t)r * 2 * N + i] == r * 1000 + i);
                assert_true(got[(size_t)r * 2 * N + N + i] == -(r * 1000 + i));
            }
        float in[N];
        for (int r = 1; r < size; r++) {
            assert_int_equal(rp_transport_recv(&t, in, sizeof in, r, RP_MSG_ACT, 0, &err), RP_OK);
            assert_true(in[0] == 0.25f && in[N - 1] == 0.25f);
        }
        free(got);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

/* Rank 1 sends 32 floats; rank 0 expects 16, then 64: both are errors that
 * say the stages disagree. */
static void test_slice_of_wrong_size_is_an_error(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    open_transport(&t, 30);
    float buf[64] = {0};
    if (rank == 1) {
        for (int k = 0; k < 2; k++)
            assert_int_equal(rp_transport_gather_slice(&t, 1, NULL, buf, 32 * sizeof(float),
                                                       "test slice", &err), RP_OK);
    } else if (rank == 0) {
        assert_int_equal(rp_transport_gather_slice(&t, 1, buf, NULL, 16 * sizeof(float),
                                                   "test slice", &err), RP_ERR_MPI);
        if (!strstr(err.msg, "stage 1's test slice is larger than expected"))
            fail_msg("unexpected text: %s", err.msg);
        assert_int_equal(rp_transport_gather_slice(&t, 1, buf, NULL, 64 * sizeof(float),
                                                   "test slice", &err), RP_ERR_MPI);
        if (!strstr(err.msg, "holds 128 bytes, expected 256"))
            fail_msg("unexpected text: %s", err.msg);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

/* The last rank joins each operation 2.5 s late; with a 1 s watchdog the
 * others fail after about 1 s naming what they waited for and whom. The
 * late rank then completes the operation (no watchdog), so the
 * communicator is clean for the next one. Buffers are static: a timed-out
 * collective may still write them. */
static void assert_timed_out(rp_status st, const rp_error *err, double t0, const char *want) {
    const double waited = MPI_Wtime() - t0;
    assert_int_equal(st, RP_ERR_MPI);
    if (waited < 1.0 || waited > 2.8) fail_msg("the watchdog fired after %.2f s", waited);
    if (!strstr(err->msg, want) || !strstr(err->msg, " s (--comm-timeout) for "))
        fail_msg("expected '%s' in: %s", want, err->msg);
}

static void test_a_rank_that_never_joins_times_out(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    const int late = size - 1;
    open_transport(&t, rank == late ? 0 : 1.0);
    static int v[4], g[8], send1[1];
    static float slice[16];
    static char want[160];
    double t0;
    rp_status st;

    /* all-reduce */
    if (rank == late) sleep(3);
    t0 = MPI_Wtime();
    st = rp_transport_allreduce_int(&t, v, 4, RP_REDUCE_MAX, "the stop request", &err);
    if (rank != late) {
        /* It names the other stages' ranks and nodes (one node here). */
        char host[64] = "";
        gethostname(host, sizeof host - 1);
        snprintf(want, sizeof want, "for the stop request (all-reduce over %d stages) (the other "
                 "stages: stage %d (rank %d on %s)", size, rank == 0 ? 1 : 0, rank == 0 ? 1 : 0,
                 host);
        assert_timed_out(st, &err, t0, want);
    } else {
        assert_int_equal(st, RP_OK);
    }
    MPI_Barrier(MPI_COMM_WORLD);

    /* broadcast from the late rank */
    if (rank == late) sleep(3);
    t0 = MPI_Wtime();
    st = rp_transport_bcast(&t, v, sizeof v, late, "the checkpoint start", &err);
    if (rank != late) {
        char host[64] = "";
        gethostname(host, sizeof host - 1);
        snprintf(want, sizeof want, "for the checkpoint start (broadcast from stage %d) (rank %d "
                 "on %s)", late, late, host);
        assert_timed_out(st, &err, t0, want);
    }
    MPI_Barrier(MPI_COMM_WORLD);

    /* gather to rank 0 */
    if (rank == late) sleep(3);
    t0 = MPI_Wtime();
    st = rp_transport_gather(&t, send1, g, sizeof send1, 0, "the shard reports", &err);
    if (rank == 0) assert_timed_out(st, &err, t0, "for the shard reports (gather to stage 0)");
    MPI_Barrier(MPI_COMM_WORLD);

    /* a slice from the late rank */
    if (rank == late) sleep(3);
    t0 = MPI_Wtime();
    st = rp_transport_gather_slice(&t, late, rank == 0 ? slice : NULL, rank == late ? slice : NULL,
                                   sizeof slice, "logits", &err);
    if (rank == 0) {
        snprintf(want, sizeof want, "for stage %d's logits; no reply: that rank stopped or died",
                 late);
        assert_timed_out(st, &err, t0, want);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

/* A world transport that calls itself "rank N" names its peers ranks. */
static void test_rank_naming(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    open_transport(&t, 1.0);
    snprintf(t.what_buf, sizeof t.what_buf, "rank %d", t.rank);
    static int v[1];
    if (rank == 0) {
        double t0 = MPI_Wtime();
        rp_status st = rp_transport_gather_slice(&t, 1, v, NULL, sizeof v, "report", &err);
        assert_timed_out(st, &err, t0, "for rank 1's report");
        assert_true(strncmp(err.msg, "rank 0 waited ", 14) == 0);
    }
    if (rank == 1) {
        sleep(3);
        assert_int_equal(rp_transport_gather_slice(&t, 1, NULL, v, sizeof v, "report", &err),
                         RP_OK);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size < 2 || size > 8) {
        if (rank == 0) fprintf(stderr, "run under mpirun -np 2..8 "
                               "(tests/test_transport_collective.sh)\n");
        MPI_Finalize();
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bcast_from_every_root),
        cmocka_unit_test(test_gather_fixed_size),
        cmocka_unit_test(test_allreduce_sum_and_max),
        cmocka_unit_test(test_slices_in_order_and_apart_from_transfers),
        cmocka_unit_test(test_slice_of_wrong_size_is_an_error),
        cmocka_unit_test(test_a_rank_that_never_joins_times_out),
        cmocka_unit_test(test_rank_naming),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return failed ? 1 : 0;
}
