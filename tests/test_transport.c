/* The stage-to-stage transport under mpirun -np 2 (run by
 * tests/test_transport.sh): with two stages the previous and the next stage
 * are the same peer, so activations and gradients of several micro-batches
 * share one link and must be told apart by tag whatever the order they are
 * sent and received in; a message of the wrong size is an error naming both
 * sizes; a wait that outlives the timeout fails with a message naming the
 * transfer instead of hanging.
 *
 * Every transport test runs twice: on host memory, and on "device" memory -
 * the CPU backend with is_host_memory = 0, so that every transfer goes
 * through the host staging of the MPI fallback for GPUs (counted copies prove
 * it). The executor then trains a tiny model on both and must agree bit for
 * bit, over two stages and over two data replicas. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/cpu_backend.h"
#include "model/model.h"
#include "pipe/grid.h"
#include "pipe/pipe_train.h"
#include "pipe/transport.h"
#include "optim/optim.h"

static int rank;

/* ---- a CPU backend that claims device memory ---- */

static rp_backend *cpu_be;       /* the real one */
static rp_backend fake_device;   /* a copy with is_host_memory = 0 */
static long to_host_copies, to_device_copies;

static void counted_copy_to_host(rp_backend *be, void *dst, const void *src, size_t bytes) {
    to_host_copies++;
    cpu_be->copy_to_host(cpu_be, dst, src, bytes);
}

static void counted_copy_to_device(rp_backend *be, void *dst, const void *src, size_t bytes) {
    to_device_copies++;
    cpu_be->copy_to_device(cpu_be, dst, src, bytes);
}

/* What a test runs on: *state of the cmocka test. */
typedef struct {
    const char *name;
    rp_backend **be;  /* NULL: host memory */
} memory_mode;

static memory_mode host_mode = {"host", NULL};
static rp_backend *fake_device_ptr = &fake_device;
static memory_mode device_mode = {"device (staged)", &fake_device_ptr};

static rp_backend *mode_backend(void **state) {
    const memory_mode *mode = *state;
    return mode->be ? *mode->be : NULL;
}

static void open_transport(rp_transport *t, void **state, double timeout_s) {
    rp_error err;
    if (rp_transport_init(t, MPI_COMM_WORLD, timeout_s, &err) != RP_OK) fail_msg("%s", err.msg);
    rp_transport_use_backend(t, mode_backend(state));
    to_host_copies = to_device_copies = 0;
}

/* Host transfers never stage; device transfers always do. */
static void assert_staging(const rp_transport *t, void **state, long sends, long receives) {
    if (!mode_backend(state)) {
        assert_int_equal(t->n_staging, 0);
        assert_int_equal(to_host_copies + to_device_copies, 0);
    } else {
        assert_int_equal(to_host_copies, sends);
        assert_int_equal(to_device_copies, receives);
        for (int i = 0; i < t->n_staging; i++)
            if (t->staging[i].busy) fail_msg("staging buffer %d still busy", i);
    }
}

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
    open_transport(&t, state, 30);
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
    assert_staging(&t, state, 2 * M, 2 * M);
    /* One staging buffer per transfer in flight, no more. */
    assert_true(t.n_staging <= 4 * M);
    free(out);
    free(in);
    rp_transport_free(&t);
}

/* Rank 0 sends 100 floats where rank 1 expects 200, then 300 where it
 * expects 200: both are errors naming the sizes, and the link still works. */
static void test_wrong_size_is_an_error(void **state) {
    rp_transport t;
    rp_error err;
    open_transport(&t, state, 30);
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
        /* Only the message of the right size reaches the buffer. */
        assert_staging(&t, state, 0, 1);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

/* Rank 1 waits for gradients rank 0 never sends: after the timeout the wait
 * fails with a message naming the transfer, within a second of it. */
static void test_timeout_names_the_transfer(void **state) {
    rp_transport t;
    rp_error err;
    open_transport(&t, state, 0.5);
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
        assert_staging(&t, state, 0, 0);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rp_transport_free(&t);
}

/* MPI_Test as the transport calls it (this definition wins over the MPI
 * library's at link time): PMPI_Test, or, once stuck_in_mpi is set, a call
 * that never returns, as Open MPI's handling of a failed TCP write to a dead
 * peer did (tests/test_cluster_slurm.sh, the node-death check). */
static volatile int stuck_in_mpi;

int MPI_Test(MPI_Request *request, int *flag, MPI_Status *status) {
    while (stuck_in_mpi) {
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
    }
    return PMPI_Test(request, flag, status);
}

/* --stuck-mpi (two ranks; test_transport.sh): a wait whose MPI_Test never
 * returns must still end the process, through the guard, with status 1 and
 * a message naming the transfer, timeout + RP_COMM_GUARD_GRACE_S after it
 * began. Returning from here is the failure. */
static int run_stuck_mpi(void) {
    rp_transport t;
    rp_error err;
    if (rp_transport_init(&t, MPI_COMM_WORLD, 1.0, &err) != RP_OK) {
        fprintf(stderr, "%s\n", err.msg);
        return 2;
    }
    if (rank == 0) {
        /* Sends nothing; mpirun ends it when rank 1 exits. */
        struct timespec ts = {60, 0};
        nanosleep(&ts, NULL);
        return 0;
    }
    float buf[16];
    rp_transfer x;
    if (rp_transport_post_recv(&t, buf, sizeof buf, 0, RP_MSG_GRAD, 3, &x, &err) != RP_OK) {
        fprintf(stderr, "%s\n", err.msg);
        return 2;
    }
    stuck_in_mpi = 1;
    rp_transport_wait(&t, &x, &err);
    fprintf(stderr, "the wait returned from a stuck MPI_Test: %s\n", err.msg);
    return 2;
}

static void test_bad_peer_is_refused(void **state) {
    rp_transport t;
    rp_error err;
    open_transport(&t, state, 30);
    rp_transfer x;
    float buf[4];
    assert_int_not_equal(rp_transport_post_send(&t, buf, 16, rank, RP_MSG_ACT, 0, &x, &err), RP_OK);
    assert_int_not_equal(rp_transport_post_recv(&t, buf, 16, 5, RP_MSG_ACT, 0, &x, &err), RP_OK);
    rp_transport_free(&t);
}

/* Without NCCL in the build, or on host memory, NCCL says why it is not used
 * (the same answer on every rank) and the transport stays on MPI. */
static void test_nccl_refused_on_host_memory(void **state) {
    char why[160] = "";
    assert_int_equal(rp_nccl_usable(MPI_COMM_WORLD, cpu_be, why, sizeof why), 0);
    assert_true(why[0] != 0);
    rp_transport t;
    rp_error err;
    open_transport(&t, state, 30);
    assert_int_not_equal(rp_transport_enable_nccl(&t, cpu_be, &err), RP_OK);
    assert_int_equal(rp_transport_nccl_active(&t), 0);
    rp_transport_free(&t);
}

/* ---- the executor on host and on (pretend) device memory ---- */

typedef struct {
    double loss[2], norm[2];
    float *weights;   /* every owned weight after the steps, in a fixed order */
    size_t n_weights;
    float *logits;    /* last stage: rp_pipe_forward's logits afterwards */
    size_t n_logits;
} run_result;

static void append(run_result *r, rp_backend *be, const float *p, size_t n) {
    if (!p) return;
    r->weights = realloc(r->weights, sizeof(float) * (r->n_weights + n));
    be->copy_to_host(be, r->weights + r->n_weights, p, n * sizeof(float));
    r->n_weights += n;
}

/* Two optimizer steps of a tiny model on the pp x (2 / pp) grid, then one
 * pipelined forward, on backend be. */
static void train_tiny(int pp, rp_schedule_kind kind, rp_backend *be, run_result *out) {
    rp_error err;
    rp_config cfg;
    if (rp_config_builtin(&cfg, "tiny", 0, &err) != RP_OK) fail_msg("%s", err.msg);
    int layers[2] = {1, 1};
    if (pp == 1) layers[0] = cfg.n_layer;
    rp_grid grid;
    if (rp_grid_create(&grid, MPI_COMM_WORLD, pp, layers, &err) != RP_OK) fail_msg("%s", err.msg);
    const int s = grid.stage, last = s == pp - 1;
    rp_model model, grads, adam_m, adam_v;
    const int lb = grid.layer_begin[s], le = grid.layer_end[s];
    if (rp_model_alloc(&model, &cfg, lb, le, s == 0, last, be, &err) != RP_OK ||
        rp_model_alloc(&grads, &cfg, lb, le, s == 0, last, be, &err) != RP_OK ||
        rp_model_alloc(&adam_m, &cfg, lb, le, s == 0, last, be, &err) != RP_OK ||
        rp_model_alloc(&adam_v, &cfg, lb, le, s == 0, last, be, &err) != RP_OK ||
        rp_model_init_official(&model, 7, &err) != RP_OK)
        fail_msg("%s", err.msg);
    rp_transport t, *tp = NULL;
    if (pp > 1) {
        if (rp_transport_init(&t, grid.pipe_comm, 30, &err) != RP_OK) fail_msg("%s", err.msg);
        rp_transport_use_backend(&t, be);
        tp = &t;
    }
    const int M = 4, seqs = 2, T = 16, R = seqs * T;
    rp_pipe_trainer pt;
    if (rp_pipe_trainer_init(&pt, &model, &grads, &adam_m, &adam_v, &grid, tp, kind, M, seqs, T,
                             &err) != RP_OK)
        fail_msg("%s", err.msg);
    rp_optim_config optim;
    rp_optim_defaults(&optim);
    optim.total_steps = 2;
    optim.warmup_steps = 0;
    int32_t *inputs = malloc(sizeof(int32_t) * (size_t)M * R);
    int32_t *targets = malloc(sizeof(int32_t) * (size_t)M * R);
    for (long step = 0; step < 2; step++) {
        /* Each replica its own tokens, the same on both runs. */
        uint32_t x = 12345u + 977u * (uint32_t)grid.replica + 31u * (uint32_t)step;
        for (int i = 0; i < M * R; i++) {
            x = x * 1664525u + 1013904223u;
            inputs[i] = (int32_t)((x >> 8) % (uint32_t)cfg.vocab_size);
            targets[i] = i % 5 == 0 ? -1 : (int32_t)((x >> 16) % (uint32_t)cfg.vocab_size);
        }
        rp_pipe_step_result res;
        if (rp_pipe_trainer_step(&pt, inputs, targets, 1.0f / (float)(2 * M * R), 0.0f, &optim,
                                 step, &res, &err) != RP_OK)
            fail_msg("rank %d: %s", rank, err.msg);
        out->loss[step] = res.loss_sum;
        out->norm[step] = res.grad_norm;
    }
    append(out, be, model.embed_flat, model.has_embed ? model.embed_floats : 0);
    append(out, be, model.head_flat, model.has_head ? model.head_floats : 0);
    for (int l = lb; l < le; l++) append(out, be, model.layer_flat[l - lb], model.layer_floats);
    /* The pipelined forward of the first micro-batch's tokens. */
    rp_workspace ws;
    rp_state state;
    if (rp_workspace_alloc(&ws, &cfg, R, be, &err) != RP_OK) fail_msg("%s", err.msg);
    rp_state_geometry(&state, &cfg, lb, le, seqs);
    state.data = be->alloc(be, state.floats_per_slot * (size_t)seqs * sizeof(float));
    out->n_logits = last ? (size_t)R * cfg.vocab_size : 0;
    float *logits_dev = last ? be->alloc(be, out->n_logits * sizeof(float)) : NULL;
    if (rp_pipe_forward(&model, tp, s, pp, &ws, inputs, &pt.batch, &state, RP_LOGITS_ALL,
                        logits_dev, &err) != RP_OK)
        fail_msg("rank %d: %s", rank, err.msg);
    if (last) {
        out->logits = malloc(out->n_logits * sizeof(float));
        be->copy_to_host(be, out->logits, logits_dev, out->n_logits * sizeof(float));
        be->free(be, logits_dev);
    }
    be->free(be, state.data);
    rp_workspace_free(&ws, be);
    free(inputs);
    free(targets);
    rp_pipe_trainer_free(&pt);
    if (tp) rp_transport_free(tp);
    rp_model_free(&model);
    rp_model_free(&grads);
    rp_model_free(&adam_m);
    rp_model_free(&adam_v);
    rp_grid_free(&grid);
}

static void assert_same_runs(const run_result *a, const run_result *b) {
    for (int i = 0; i < 2; i++)
        if (a->loss[i] != b->loss[i] || a->norm[i] != b->norm[i])
            fail_msg("rank %d, step %d: loss %.17g / %.17g, norm %.17g / %.17g", rank, i + 1,
                     a->loss[i], b->loss[i], a->norm[i], b->norm[i]);
    assert_int_equal(a->n_weights, b->n_weights);
    assert_true(a->n_weights > 0);
    if (memcmp(a->weights, b->weights, a->n_weights * sizeof(float)))
        fail_msg("rank %d: the weights differ", rank);
    assert_int_equal(a->n_logits, b->n_logits);
    if (a->n_logits && memcmp(a->logits, b->logits, a->n_logits * sizeof(float)))
        fail_msg("rank %d: the logits differ", rank);
}

static void run_free(run_result *r) {
    free(r->weights);
    free(r->logits);
}

static void check_executor(int pp, rp_schedule_kind kind) {
    run_result host = {0}, device = {0};
    train_tiny(pp, kind, cpu_be, &host);
    to_host_copies = to_device_copies = 0;
    train_tiny(pp, kind, &fake_device, &device);
    /* Activations and gradients (pp 2) or gradients (dp 2) went through
     * host staging. */
    assert_true(to_host_copies > 0 && to_device_copies > 0);
    assert_true(host.loss[0] > 0);
    assert_same_runs(&host, &device);
    run_free(&host);
    run_free(&device);
}

static void test_executor_two_stages_same_bits_on_device_memory(void **state) {
    check_executor(2, RP_SCHEDULE_1F1B);
    check_executor(2, RP_SCHEDULE_GPIPE);
}

static void test_executor_two_replicas_same_bits_on_device_memory(void **state) {
    check_executor(1, RP_SCHEDULE_1F1B);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc > 1 && strcmp(argv[1], "--stuck-mpi") == 0) return run_stuck_mpi();
    if (size != 2) {
        if (rank == 0) fprintf(stderr, "run under mpirun -np 2 (tests/test_transport.sh)\n");
        MPI_Finalize();
        return 77;
    }
    rp_error err;
    if (!(cpu_be = rp_cpu_backend_create(1, &err))) {
        fprintf(stderr, "%s\n", err.msg);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    fake_device = *cpu_be;
    fake_device.name = "cpu-as-device";
    fake_device.is_host_memory = 0;
    fake_device.copy_to_host = counted_copy_to_host;
    fake_device.copy_to_device = counted_copy_to_device;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_prestate(test_kinds_and_micro_batches_never_confused, &host_mode),
        cmocka_unit_test_prestate(test_wrong_size_is_an_error, &host_mode),
        cmocka_unit_test_prestate(test_timeout_names_the_transfer, &host_mode),
        cmocka_unit_test_prestate(test_bad_peer_is_refused, &host_mode),
        cmocka_unit_test_prestate(test_kinds_and_micro_batches_never_confused, &device_mode),
        cmocka_unit_test_prestate(test_wrong_size_is_an_error, &device_mode),
        cmocka_unit_test_prestate(test_timeout_names_the_transfer, &device_mode),
        cmocka_unit_test_prestate(test_bad_peer_is_refused, &device_mode),
        cmocka_unit_test_prestate(test_nccl_refused_on_host_memory, &device_mode),
        cmocka_unit_test(test_executor_two_stages_same_bits_on_device_memory),
        cmocka_unit_test(test_executor_two_replicas_same_bits_on_device_memory),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    rp_backend_destroy(cpu_be);
    /* One rank's failure fails the job (mpirun reports the non-zero exit). */
    MPI_Finalize();
    return failed ? 1 : 0;
}
