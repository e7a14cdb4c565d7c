/* Variable-size messages of the stage transport (src/pipe/transport_message.c)
 * under mpirun -np 2 (tests/test_transport_message.sh): the receiver learns
 * the size from the message; kinds and micro-batches are kept apart; a poll
 * with nothing there says so at once; a wait outlives the timeout only by a
 * little and names the message and the peer; and message buffers stay host
 * memory even when the transport's other buffers are device memory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "pipe/transport.h"

static int rank;
static rp_backend *cpu_be;
static rp_backend fake_device;  /* the CPU backend claiming device memory */
static long device_copies;

static void counted_copy_to_host(rp_backend *be, void *dst, const void *src, size_t bytes) {
    device_copies++;
    cpu_be->copy_to_host(be, dst, src, bytes);
}

static void open_transport(rp_transport *t, double timeout_s) {
    rp_error err;
    if (rp_transport_init(t, MPI_COMM_WORLD, timeout_s, &err) != RP_OK) fail_msg("%s", err.msg);
    rp_transport_use_backend(t, &fake_device);
    device_copies = 0;
}

/* Rank 0 sends three messages of different sizes, kinds and micro-batches,
 * in an order other than the one rank 1 takes them in. */
static void test_sizes_kinds_and_micro_batches(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    open_transport(&t, 30);
    const char a[] = "a command", b[] = "a result, longer than the command";
    const uint8_t empty = 0;
    if (rank == 0) {
        rp_transfer x[3];
        assert_int_equal(rp_transport_post_send_message(&t, b, sizeof b, 1, RP_MSG_RESULT, 0,
                                                        &x[0], &err), RP_OK);
        assert_int_equal(rp_transport_post_send_message(&t, &empty, 0, 1, RP_MSG_STATE, 3,
                                                        &x[1], &err), RP_OK);
        assert_int_equal(rp_transport_post_send_message(&t, a, sizeof a, 1, RP_MSG_CONTROL, 0,
                                                        &x[2], &err), RP_OK);
        for (int i = 0; i < 3; i++) assert_int_equal(rp_transport_wait(&t, &x[i], &err), RP_OK);
        assert_int_equal(device_copies, 0);
    } else {
        void *data;
        size_t bytes;
        int from = -1;
        assert_int_equal(rp_transport_recv_message(&t, 0, RP_MSG_CONTROL, 0, RP_MSG_WAIT, &data,
                                                   &bytes, &from, &err), RP_OK);
        assert_int_equal(bytes, sizeof a);
        assert_int_equal(from, 0);
        assert_string_equal(data, a);
        free(data);
        assert_int_equal(rp_transport_recv_message(&t, RP_TRANSPORT_ANY_PEER, RP_MSG_STATE, 3,
                                                   RP_MSG_WAIT, &data, &bytes, &from, &err),
                         RP_OK);
        assert_non_null(data);
        assert_int_equal(bytes, 0);
        free(data);
        assert_int_equal(rp_transport_recv_message(&t, 0, RP_MSG_RESULT, 0, RP_MSG_WAIT, &data,
                                                   &bytes, NULL, &err), RP_OK);
        assert_int_equal(bytes, sizeof b);
        assert_string_equal(data, b);
        free(data);
        assert_int_equal(device_copies, 0);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

/* Nothing sent: a poll returns at once with no message; a wait fails after
 * the timeout naming the message and the peer. */
static void test_poll_and_timeout(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    open_transport(&t, 0.5);
    if (rank == 1) {
        void *data = (void *)&t;
        size_t bytes = 99;
        double t0 = MPI_Wtime();
        assert_int_equal(rp_transport_recv_message(&t, 0, RP_MSG_RESULT, 0, RP_MSG_POLL, &data,
                                                   &bytes, NULL, &err), RP_OK);
        assert_null(data);
        assert_int_equal(bytes, 0);
        if (MPI_Wtime() - t0 > 0.25) fail_msg("a poll took %.2f s", MPI_Wtime() - t0);
        t0 = MPI_Wtime();
        assert_int_equal(rp_transport_recv_message(&t, 0, RP_MSG_STATE, 0, RP_MSG_WAIT, &data,
                                                   &bytes, NULL, &err), RP_ERR_MPI);
        double waited = MPI_Wtime() - t0;
        if (waited < 0.5 || waited > 1.5) fail_msg("the watchdog fired after %.2f s", waited);
        if (!strstr(err.msg, "session state from stage 0") || !strstr(err.msg, "--comm-timeout"))
            fail_msg("unexpected timeout text: %s", err.msg);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

static void test_bad_peer_and_kind_are_refused(void **state) {
    (void)state;
    rp_transport t;
    rp_error err;
    open_transport(&t, 30);
    rp_transfer x;
    void *data;
    size_t bytes;
    char c = 0;
    assert_int_equal(rp_transport_post_send_message(&t, &c, 1, rank, RP_MSG_CONTROL, 0, &x,
                                                    &err), RP_ERR_INTERNAL);
    assert_int_equal(rp_transport_post_send_message(&t, &c, 1, RP_TRANSPORT_ANY_PEER,
                                                    RP_MSG_CONTROL, 0, &x, &err),
                     RP_ERR_INTERNAL);
    assert_int_equal(rp_transport_recv_message(&t, 5, RP_MSG_CONTROL, 0, RP_MSG_POLL, &data,
                                               &bytes, NULL, &err), RP_ERR_INTERNAL);
    assert_int_equal(rp_transport_recv_message(&t, 1 - rank, RP_MSG_KIND_COUNT, 0, RP_MSG_POLL,
                                               &data, &bytes, NULL, &err), RP_ERR_INTERNAL);
    rp_transport_free(&t);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size != 2) {
        if (rank == 0) fprintf(stderr, "run under mpirun -np 2 (tests/test_transport_message.sh)\n");
        MPI_Finalize();
        return 77;
    }
    rp_error err;
    if (!(cpu_be = rp_cpu_backend_create(1, &err))) {
        fprintf(stderr, "%s\n", err.msg);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    fake_device = *cpu_be;
    fake_device.is_host_memory = 0;
    fake_device.copy_to_host = counted_copy_to_host;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes_kinds_and_micro_batches),
        cmocka_unit_test(test_poll_and_timeout),
        cmocka_unit_test(test_bad_peer_and_kind_are_refused),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    rp_cpu_backend_destroy(cpu_be);
    MPI_Finalize();
    return failed ? 1 : 0;
}
