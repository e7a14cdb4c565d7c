/* NCCL on a GPU machine, run by tests/gpu/run.sh under `mpirun -np 1`:
 * random floats go from one device buffer through NCCL's self send/receive
 * (a one-rank communicator, ncclSend and ncclRecv to itself in one group:
 * rp_nccl_group_sendrecv) into another, and must come back bit for bit;
 * a one-rank all-reduce must leave them unchanged. Under `mpirun -np 2` with
 * a GPU per rank it also runs the stage transport's NCCL link (one
 * communicator for both directions): a gradient goes back in the same group
 * as the receive of the next activation (the executor's exchange), and a
 * message out of order is an error naming both messages. Prints PASS or FAIL; exit 77 when the build
 * has no NCCL or the machine no GPU. Plain C, no cmocka. */
#include "config.h"

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipe/transport.h"

#ifndef RP_HAVE_NCCL
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    printf("SKIP: built without NCCL\n");
    MPI_Finalize();
    return 77;
}
#else
#include <cuda_runtime.h>

static int rank;

static void fill_random(float *p, size_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        p[i] = ((float)(x >> 8) / 16777216.0f) * 2.0f - 1.0f;
    }
}

/* Waits until the legacy default stream's work is done. cudaMemset and a
 * cudaMemcpy from pageable memory run on the legacy stream, and NCCL runs on
 * its own non-blocking stream (rp_nccl_group's, or the link's), which the
 * legacy stream is NOT ordered with: a memset may land after the NCCL
 * receive wrote the buffer, and cudaMemcpy from pageable memory returns once
 * the bytes are staged, before the DMA to the device is done. The NCCL
 * calls' contract (src/pipe/transport.h) leaves synchronizing the writer's
 * stream to the caller, so the test does it before every NCCL operation. */
static int legacy_stream_done(void) {
    return cudaStreamSynchronize(cudaStreamLegacy) == cudaSuccess;
}

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (!(cond)) {                                                      \
            printf("FAIL (rank %d): ", rank);                               \
            printf(__VA_ARGS__);                                            \
            printf("\n");                                                   \
            fflush(stdout);                                                 \
            MPI_Abort(MPI_COMM_WORLD, 1);                                   \
        }                                                                   \
    } while (0)

/* Self send/receive of n floats (and of a few odd sizes) plus a one-rank
 * all-reduce, on a one-rank group. */
static void check_self(size_t n, double *gbps) {
    rp_error err;
    rp_nccl_group *g;
    CHECK(rp_nccl_group_create(&g, MPI_COMM_SELF, 60, &err) == RP_OK, "%s", err.msg);
    float *host = malloc(n * sizeof(float)), *back = malloc(n * sizeof(float));
    void *src, *dst;
    CHECK(host && back, "host buffers");
    CHECK(cudaMalloc(&src, n * sizeof(float)) == cudaSuccess &&
              cudaMalloc(&dst, n * sizeof(float)) == cudaSuccess, "cudaMalloc");
    fill_random(host, n, 7);
    CHECK(cudaMemcpy(src, host, n * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess,
          "upload");
    const size_t sizes[] = {1, 4, 4097, n * sizeof(float)};
    for (int k = 0; k < 4; k++) {
        CHECK(cudaMemset(dst, 0xff, n * sizeof(float)) == cudaSuccess, "cudaMemset");
        CHECK(legacy_stream_done(), "upload and memset before NCCL");
        double t0 = MPI_Wtime();
        CHECK(rp_nccl_group_sendrecv(g, src, dst, sizes[k], 0, &err) == RP_OK, "%s", err.msg);
        double t = MPI_Wtime() - t0;
        if (k == 3) *gbps = (double)sizes[k] / t / 1e9;
        CHECK(cudaMemcpy(back, dst, n * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess,
              "download");
        CHECK(!memcmp(back, host, sizes[k]), "self send/recv of %zu bytes changed the data",
              sizes[k]);
        if (sizes[k] < n * sizeof(float))
            CHECK(((unsigned char *)back)[sizes[k]] == 0xff, "wrote past %zu bytes", sizes[k]);
    }
    CHECK(rp_nccl_group_allreduce_sum(g, dst, n, "a one-rank all-reduce", &err) == RP_OK, "%s",
          err.msg);
    CHECK(cudaMemcpy(back, dst, n * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess,
          "download");
    CHECK(!memcmp(back, host, n * sizeof(float)), "a one-rank all-reduce changed the data");
    rp_nccl_group_free(g);
    cudaFree(src);
    cudaFree(dst);
    free(host);
    free(back);
}

/* Just enough of a backend for the transport: its stream and status. */
static cudaStream_t compute;
static void bare_synchronize(rp_backend *be) { cudaStreamSynchronize(compute); }
static rp_status bare_status(rp_backend *be, rp_error *err) {
    cudaError_t e = cudaPeekAtLastError();
    return e == cudaSuccess ? RP_OK
                            : rp_error_set(err, RP_ERR_INTERNAL, "CUDA: %s", cudaGetErrorString(e));
}

/* Two stages on two GPUs: stage 1 posts the receive of the activations of
 * micro-batch 0 and the send of the gradients of micro-batch 7 in one group,
 * then waits for the send; stage 0 receives those gradients before it sends
 * anything. Both directions share the link's stream: posted apart, the
 * gradient would wait behind the activation receive forever (the mock NCCL
 * test, tests/test_nccl_mock.sh, shows that hang); in one group they
 * progress together. */
static void check_links(size_t n) {
    rp_error err;
    rp_backend be;
    memset(&be, 0, sizeof be);
    be.name = "cuda (bare)";
    be.is_host_memory = 0;
    be.synchronize = bare_synchronize;
    be.status = bare_status;
    CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking) == cudaSuccess, "stream");
    char why[160];
    if (!rp_nccl_usable(MPI_COMM_WORLD, &be, why, sizeof why)) {
        if (rank == 0) printf("note: two-rank link check skipped: %s\n", why);
        return;
    }
    rp_transport t;
    CHECK(rp_transport_init(&t, MPI_COMM_WORLD, 20, &err) == RP_OK, "%s", err.msg);
    CHECK(rp_transport_enable_nccl(&t, &be, &err) == RP_OK, "%s", err.msg);
    float *host = malloc(n * sizeof(float)), *back = malloc(n * sizeof(float));
    void *act, *grad;
    CHECK(cudaMalloc(&act, n * sizeof(float)) == cudaSuccess &&
              cudaMalloc(&grad, n * sizeof(float)) == cudaSuccess, "cudaMalloc");
    const size_t bytes = n * sizeof(float);
    rp_transfer x, y;
    if (rank == 1) {
        fill_random(host, n, 11);
        CHECK(cudaMemcpy(grad, host, bytes, cudaMemcpyHostToDevice) == cudaSuccess, "upload");
        CHECK(legacy_stream_done(), "upload before NCCL");
        rp_transport_group_begin(&t);
        CHECK(rp_transport_post_recv(&t, act, bytes, 0, RP_MSG_ACT, 0, &x, &err) == RP_OK, "%s",
              err.msg);
        CHECK(rp_transport_post_send(&t, grad, bytes, 0, RP_MSG_GRAD, 7, &y, &err) == RP_OK,
              "%s", err.msg);
        CHECK(rp_transport_group_end(&t, &err) == RP_OK, "%s", err.msg);
        CHECK(rp_transport_wait(&t, &y, &err) == RP_OK, "gradient behind activations: %s",
              err.msg);
        CHECK(rp_transport_wait(&t, &x, &err) == RP_OK, "%s", err.msg);
        fill_random(host, n, 13);
        CHECK(cudaMemcpy(back, act, bytes, cudaMemcpyDeviceToHost) == cudaSuccess, "download");
        CHECK(!memcmp(back, host, bytes), "the activations arrived changed");
        /* Expects micro-batch 1, stage 0 sends micro-batch 2. */
        CHECK(rp_transport_recv(&t, act, bytes, 0, RP_MSG_ACT, 1, &err) == RP_ERR_INTERNAL,
              "a message out of order was taken");
        CHECK(strstr(err.msg, "micro-batch 2") && strstr(err.msg, "micro-batch 1"),
              "unexpected text: %s", err.msg);
    } else {
        CHECK(rp_transport_recv(&t, grad, bytes, 1, RP_MSG_GRAD, 7, &err) == RP_OK, "%s",
              err.msg);
        fill_random(host, n, 11);
        CHECK(cudaMemcpy(back, grad, bytes, cudaMemcpyDeviceToHost) == cudaSuccess, "download");
        CHECK(!memcmp(back, host, bytes), "the gradients arrived changed");
        fill_random(host, n, 13);
        CHECK(cudaMemcpy(act, host, bytes, cudaMemcpyHostToDevice) == cudaSuccess, "upload");
        CHECK(legacy_stream_done(), "upload before NCCL");
        CHECK(rp_transport_send(&t, act, bytes, 1, RP_MSG_ACT, 0, &err) == RP_OK, "%s", err.msg);
        CHECK(rp_transport_send(&t, act, bytes, 1, RP_MSG_ACT, 2, &err) == RP_OK, "%s", err.msg);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
    cudaFree(act);
    cudaFree(grad);
    free(host);
    free(back);
    if (rank == 0) printf("two-rank NCCL link: a gradient and an activation receive in one "
                          "group; a message out of order is refused\n");
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        if (rank == 0) printf("SKIP: no CUDA device\n");
        MPI_Finalize();
        return 77;
    }
    CHECK(cudaSetDevice(rank % count) == cudaSuccess, "cudaSetDevice");
    const size_t n = ((size_t)1 << 22) + 3;  /* 16 MiB and a bit: not a round size */
    double gbps = 0;
    check_self(n, &gbps);
    if (size == 2) check_links(n);
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0)
        printf("PASS: NCCL self send/recv of %zu bytes bit for bit (%.1f GB/s), odd sizes, "
               "one-rank all-reduce\n", n * sizeof(float), gbps);
    MPI_Finalize();
    return 0;
}
#endif
