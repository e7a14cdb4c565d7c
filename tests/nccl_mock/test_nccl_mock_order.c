/* Two ranks exchange activations and gradients over the NCCL links of the
 * stage transport built against the mock NCCL (README.md), the way 1F1B's
 * steady state does: rank 0 sends activations and receives gradients, rank 1
 * the other way. Modes:
 *   grouped: each rank's send and receive in one rp_transport_group_begin/
 *            end (the executor's way): must pass in every mock mode;
 *   early:   each rank posts its receive first on its own, then its send (the
 *            executor's way before grouped exchanges): under the serial mock
 *            both kernels wait for each other, and the --comm-timeout
 *            watchdog must end it naming the transfer; with
 *            RP_NCCL_MOCK=concurrent it passes.
 * Usage: mpirun -np 2 test_nccl_mock_order grouped|early TIMEOUT_S
 * Exit 0: exchanged and checked; 1: a transport error (printed). */
#include "config.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_fake_device.h"
#include "pipe/transport.h"

#define N 1000

static int fail(const char *what, const rp_error *err, int rank) {
    fprintf(stderr, "rank %d: %s: %s\n", rank, what, err->msg);
    fflush(stderr);
    /* Transfers stuck in the mock cannot be finalised: end the job. */
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc != 3 || size != 2 || (strcmp(argv[1], "grouped") && strcmp(argv[1], "early"))) {
        if (rank == 0) fprintf(stderr, "usage: mpirun -np 2 %s grouped|early TIMEOUT_S\n", argv[0]);
        MPI_Finalize();
        return 2;
    }
    const int grouped = strcmp(argv[1], "grouped") == 0;
    rp_error err = {0};
    rp_backend *be = rp_fake_device_backend_create(1, &err);
    rp_transport t;
    if (!be) return fail("backend", &err, rank);
    if (rp_transport_init(&t, MPI_COMM_WORLD, atof(argv[2]), &err) != RP_OK)
        return fail("rp_transport_init", &err, rank);
    if (rp_transport_enable_nccl(&t, be, &err) != RP_OK)
        return fail("rp_transport_enable_nccl", &err, rank);
    float host[N];
    float *out = be->alloc(be, sizeof host), *in = be->alloc(be, sizeof host);
    for (int i = 0; i < N; i++) host[i] = (float)(rank * 10000 + i);
    be->copy_to_device(be, out, host, sizeof host);
    /* Rank 0 is stage 0 (sends activations to 1), rank 1 sends gradients to 0. */
    const int peer = 1 - rank;
    const rp_msg_kind send_kind = rank == 0 ? RP_MSG_ACT : RP_MSG_GRAD;
    const rp_msg_kind recv_kind = rank == 0 ? RP_MSG_GRAD : RP_MSG_ACT;
    for (int mb = 0; mb < 3; mb++) {
        rp_transfer xs, xr;
        rp_status st;
        if (grouped) {
            rp_transport_group_begin(&t);
            st = rp_transport_post_send(&t, out, sizeof host, peer, send_kind, mb, &xs, &err);
            if (st == RP_OK)
                st = rp_transport_post_recv(&t, in, sizeof host, peer, recv_kind, mb, &xr, &err);
            rp_status end = rp_transport_group_end(&t, st == RP_OK ? &err : NULL);
            if (st == RP_OK) st = end;
        } else {
            st = rp_transport_post_recv(&t, in, sizeof host, peer, recv_kind, mb, &xr, &err);
            if (st == RP_OK)
                st = rp_transport_post_send(&t, out, sizeof host, peer, send_kind, mb, &xs, &err);
        }
        if (st != RP_OK) return fail("post", &err, rank);
        if (rp_transport_wait(&t, &xr, &err) != RP_OK || rp_transport_wait(&t, &xs, &err) != RP_OK)
            return fail("wait", &err, rank);
        be->copy_to_host(be, host, in, sizeof host);
        for (int i = 0; i < N; i++)
            if (host[i] != (float)(peer * 10000 + i)) {
                fprintf(stderr, "rank %d: micro-batch %d: element %d is %g, expected %d\n", rank,
                        mb, i, (double)host[i], peer * 10000 + i);
                MPI_Abort(MPI_COMM_WORLD, 1);
            }
        for (int i = 0; i < N; i++) host[i] = (float)(rank * 10000 + i);
    }
    printf("rank %d: 3 exchanges (%s) checked\n", rank, argv[1]);
    be->free(be, out);
    be->free(be, in);
    rp_transport_free(&t);
    rp_backend_destroy(be);
    MPI_Finalize();
    return 0;
}
