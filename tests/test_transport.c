/* The stage-to-stage transport under mpirun -np 2 (run by
 * tests/test_transport.sh): with two stages the previous and the next stage
 * are the same peer, so activations and gradients of several micro-batches
 * share one link and must be told apart by tag whatever the order they are
 * sent and received in; a message of the wrong size is an error naming both
 * sizes; a wait that outlives the timeout fails with a message naming the
 * transfer instead of hanging. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipe/transport.h"

static int rank;

static void fill(float *p, size_t n, float base) {
    for (size_t i = 0; i < n; i++) p[i] = base + (float)i * 1e-3f;
}

static void assert_filled(const float *p, size_t n, float base) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != base + (float)i * 1e-3f)
            fail_msg("rank %d: element %zu is %g, expected %g (messages confused)", rank, i,
                     p[i], base + (float)i * 1e-3f);
}

/* Both ranks send activations and gradients of micro-batches 0..3 to each
 * other in one order and post the receives in the opposite order. */
static void test_kinds_and_micro_batches_never_confused(void **state) {
    rp_transport t;
    rp_error err;
    assert_int_equal(rp_transport_init(&t, MPI_COMM_WORLD, 30, &err), RP_OK);
    const int peer = 1 - rank, M = 4;
    const size_t n = 5000;  /* above the eager limit: a rendezvous protocol */
    float *out = malloc(sizeof(float) * n * 2 * M), *in = malloc(sizeof(float) * n * 2 * M);
    rp_transfer sends[8], recvs[8];
    for (int m = 0; m < M; m++) {
        fill(out + (size_t)(2 * m) * n, n, 100.0f * rank + 10.0f * m + 1);      /* activations */
        fill(out + (size_t)(2 * m + 1) * n, n, 100.0f * rank + 10.0f * m + 2);  /* gradients */
    }
    /* Receives: gradients first, newest micro-batch first. */
    for (int m = M - 1, k = 0; m >= 0; m--, k++) {
        assert_int_equal(rp_transport_post_recv(&t, in + (size_t)(2 * m + 1) * n, n * 4, peer,
                                                RP_MSG_GRAD, m, &recvs[k], &err), RP_OK);
        assert_int_equal(rp_transport_post_recv(&t, in + (size_t)(2 * m) * n, n * 4, peer,
                                                RP_MSG_ACT, m, &recvs[M + k], &err), RP_OK);
    }
    /* Sends: activations first, oldest first. */
    for (int m = 0; m < M; m++) {
        assert_int_equal(rp_transport_post_send(&t, out + (size_t)(2 * m) * n, n * 4, peer,
                                                RP_MSG_ACT, m, &sends[m], &err), RP_OK);
        assert_int_equal(rp_transport_post_send(&t, out + (size_t)(2 * m + 1) * n, n * 4, peer,
                                                RP_MSG_GRAD, m, &sends[M + m], &err), RP_OK);
    }
    for (int k = 0; k < 2 * M; k++) {
        if (rp_transport_wait(&t, &recvs[k], &err) != RP_OK) fail_msg("%s", err.msg);
        if (rp_transport_wait(&t, &sends[k], &err) != RP_OK) fail_msg("%s", err.msg);
    }
    for (int m = 0; m < M; m++) {
        assert_filled(in + (size_t)(2 * m) * n, n, 100.0f * peer + 10.0f * m + 1);
        assert_filled(in + (size_t)(2 * m + 1) * n, n, 100.0f * peer + 10.0f * m + 2);
    }
    free(out);
    free(in);
    rp_transport_free(&t);
}

/* Rank 0 sends 100 floats where rank 1 expects 200, then 300 where it
 * expects 200: both are errors naming the sizes, and the link still works. */
static void test_wrong_size_is_an_error(void **state) {
    rp_transport t;
    rp_error err;
    assert_int_equal(rp_transport_init(&t, MPI_COMM_WORLD, 30, &err), RP_OK);
    float buf[300] = {0};
    if (rank == 0) {
        assert_int_equal(rp_transport_send(&t, buf, 100 * 4, 1, RP_MSG_ACT, 3, &err), RP_OK);
        assert_int_equal(rp_transport_send(&t, buf, 300 * 4, 1, RP_MSG_ACT, 4, &err), RP_OK);
        fill(buf, 200, 7);
        assert_int_equal(rp_transport_send(&t, buf, 200 * 4, 1, RP_MSG_ACT, 5, &err), RP_OK);
    } else {
        assert_int_equal(rp_transport_recv(&t, buf, 200 * 4, 0, RP_MSG_ACT, 3, &err), RP_ERR_MPI);
        if (!strstr(err.msg, "hold 400 bytes, expected 800") || !strstr(err.msg, "micro-batch 3"))
            fail_msg("short message: unexpected error text: %s", err.msg);
        assert_int_equal(rp_transport_recv(&t, buf, 200 * 4, 0, RP_MSG_ACT, 4, &err), RP_ERR_MPI);
        if (!strstr(err.msg, "larger than the 800 bytes expected"))
            fail_msg("long message: unexpected error text: %s", err.msg);
        assert_int_equal(rp_transport_recv(&t, buf, 200 * 4, 0, RP_MSG_ACT, 5, &err), RP_OK);
        assert_filled(buf, 200, 7);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

/* Rank 1 waits for gradients rank 0 never sends: after the timeout the wait
 * fails with a message naming the transfer, within a second of it. */
static void test_timeout_names_the_transfer(void **state) {
    rp_transport t;
    rp_error err;
    assert_int_equal(rp_transport_init(&t, MPI_COMM_WORLD, 0.5, &err), RP_OK);
    if (rank == 1) {
        float buf[16];
        double t0 = MPI_Wtime();
        assert_int_equal(rp_transport_recv(&t, buf, sizeof buf, 0, RP_MSG_GRAD, 7, &err),
                         RP_ERR_MPI);
        double waited = MPI_Wtime() - t0;
        if (waited < 0.5 || waited > 1.5) fail_msg("the watchdog fired after %.2f s", waited);
        if (!strstr(err.msg, "activation gradients of micro-batch 7 from stage 0") ||
            !strstr(err.msg, "--comm-timeout"))
            fail_msg("unexpected timeout text: %s", err.msg);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

static void test_bad_peer_is_refused(void **state) {
    rp_transport t;
    rp_error err;
    assert_int_equal(rp_transport_init(&t, MPI_COMM_WORLD, 30, &err), RP_OK);
    rp_transfer x;
    float buf[4];
    assert_int_not_equal(rp_transport_post_send(&t, buf, 16, rank, RP_MSG_ACT, 0, &x, &err), RP_OK);
    assert_int_not_equal(rp_transport_post_recv(&t, buf, 16, 5, RP_MSG_ACT, 0, &x, &err), RP_OK);
    rp_transport_free(&t);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size != 2) {
        if (rank == 0) fprintf(stderr, "run under mpirun -np 2 (tests/test_transport.sh)\n");
        MPI_Finalize();
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kinds_and_micro_batches_never_confused),
        cmocka_unit_test(test_wrong_size_is_an_error),
        cmocka_unit_test(test_timeout_names_the_transfer),
        cmocka_unit_test(test_bad_peer_is_refused),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    /* One rank's failure fails the job (mpirun reports the non-zero exit). */
    MPI_Finalize();
    return failed ? 1 : 0;
}
