/* bench_cpu --quant: the quantized GEMV/GEMM kernels (src/cpu/cpu_qmatmul*.c)
 * on the 0.1B model's matmul shapes at M = 1, 8 and 512, against fp32
 * (the backend's matmul_linear) and the weight-bandwidth floor, all measured
 * in the same run. Each product cycles through copies of W that together
 * exceed the last-level cache, so W comes from memory as in decode. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu_quant_table.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_features.h"
#include "cpu/cpu_quant.h"
#include "harness.h"

/* W copies per format: at least this many bytes (the L3 here is 32 MiB). */
#define QBENCH_CYCLE_BYTES ((size_t)192 << 20)
#define QBENCH_BANDWIDTH_BYTES ((size_t)1 << 30)
#define QBENCH_GOAL_OVER_FLOOR 1.15

typedef struct {
    rp_backend *be;
    int fp32;          /* the backend's matmul_linear on f32 W */
    rp_qkernel kernel; /* otherwise */
    const rp_qmatrix *copies;
    int n_copies, next;
    float *y;
    const float *x;
    int M, threads;
    rp_cpu_qx_workspace *ws; /* x's prepared form, kept across calls as the backend keeps it */
} qcall;

static int qcall_run(void *opaque) {
    qcall *c = opaque;
    const rp_qmatrix *w = &c->copies[c->next++ % c->n_copies];
    if (c->fp32)
        c->be->matmul_linear(c->be, c->y, c->x, w->data, c->M, w->N, w->K, 0.0f);
    else
        rp_cpu_qmatmul_kernel(c->ws, c->kernel, w, c->y, c->x, c->M, 0.0f, c->threads);
    return 0;
}

typedef struct {
    rp_qtype type;
    rp_qmatrix *copies;
    void *data;
    void *scales;
    int n;
    size_t bytes; /* of one copy, data + scales */
} qset;

static int qset_make(qset *s, rp_qtype type, const float *w, int N, int K) {
    /* Q8ROW: each copy is the kernels' packed form, as the backend holds it */
    const int packed = type == RP_QTYPE_Q8ROW;
    const size_t db = packed ? rp_q8row_packed_bytes(N, K) : rp_qmatrix_data_bytes(type, N, K),
                 sb = rp_qmatrix_scale_bytes(type, N, K);
    s->type = type;
    s->bytes = db + sb;
    s->n = (int)((QBENCH_CYCLE_BYTES + s->bytes - 1) / s->bytes);
    s->copies = calloc((size_t)s->n, sizeof *s->copies);
    s->data = malloc(db * s->n);
    s->scales = sb ? malloc(sb * s->n) : NULL;
    if (!s->copies || !s->data || (sb && !s->scales)) return -1;
    if (packed) {
        int8_t *rows = malloc(rp_qmatrix_data_bytes(type, N, K));
        if (!rows) return -1;
        rp_quantize_matrix(type, rows, s->scales, w, N, K, 0);
        rp_q8row_pack_rows(s->data, rows, 0, N, N, K);
        free(rows);
    } else {
        rp_quantize_matrix(type, s->data, s->scales, w, N, K, 0);
    }
    for (int i = 0; i < s->n; i++) {
        char *d = (char *)s->data + db * i;
        char *sc = sb ? (char *)s->scales + sb * i : NULL;
        if (i) {
            memcpy(d, s->data, db);
            if (sb) memcpy(sc, s->scales, sb);
        }
        s->copies[i] = rp_qmatrix_make(type, N, K, packed ? NULL : d, sc);
        if (packed) s->copies[i].packed = (const uint8_t *)d;
    }
    return 0;
}

static void qset_free(qset *s) {
    free(s->copies);
    free(s->data);
    free(s->scales);
}

int bench_cpu_quant(const int *threads, int n_counts, int quick) {
    static const int shapes[4][2] = {{768, 768}, {3072, 768}, {768, 3072}, {65536, 768}};
    static const int Ms[3] = {1, 8, 512};
    const bench_timing t = quick ? (bench_timing){0.02, 0.1, 3} : (bench_timing){0.1, 0.3, 5};
    rp_error err = {0};
    if (rp_cpu_qmatmul_check_env(&err) != RP_OK) {
        fprintf(stderr, "bench_cpu: %s\n", err.msg);
        return 1;
    }
    bench_print_machine(stdout, "bench_cpu --quant: quantized GEMV/GEMM (cpu_qmatmul) vs fp32 "
                                "matmul_linear, 0.1B shapes");
    printf("- ISA: %s (RP_CPU_ISA caps it); kernels chosen: bf16 %s, int8 and int8row %s; W cycled over "
           "copies of >= %zu MiB per format (from memory, as in decode); medians of %d rounds"
           "%s\n",
           rp_cpu_isa_name(rp_cpu_isa_detect()), rp_qkernel_name(rp_qkernel_chosen(RP_QTYPE_BF16)),
           rp_qkernel_name(rp_qkernel_chosen(RP_QTYPE_Q8)), QBENCH_CYCLE_BYTES >> 20, t.repeats,
           quick ? "; --quick: noisy" : "");
    printf("- floor: weight bytes (int8: + fp16 scales; int8row: + f32 row scales) / read bandwidth of a %zu MiB buffer "
           "on the same threads; goal at M = 1: time / floor <= %.2f\n\n",
           QBENCH_BANDWIDTH_BYTES >> 20, QBENCH_GOAL_OVER_FLOOR);

    int max_threads = 1;
    for (int i = 0; i < n_counts; i++) max_threads = threads[i] > max_threads ? threads[i] : max_threads;
    const size_t bw_floats = QBENCH_BANDWIDTH_BYTES / sizeof(float);
    float *bw = malloc(QBENCH_BANDWIDTH_BYTES);
    if (!bw) {
        fprintf(stderr, "bench_cpu: cannot allocate the bandwidth buffer\n");
        return 1;
    }
    bench_fill_parallel(bw, bw_floats, max_threads);
    double gbps[16];
    for (int ti = 0; ti < n_counts; ti++) {
        bench_memory_read mr = {.buf = bw, .floats = bw_floats, .threads = threads[ti]};
        const double s = bench_seconds_per_call(bench_memory_read_call, &mr, &t);
        gbps[ti] = bench_memory_read_bytes(&mr) / s * 1e-9;
        printf("- read bandwidth, %d thread%s: %.1f GB/s\n", threads[ti],
               threads[ti] == 1 ? "" : "s", gbps[ti]);
    }
    free(bw);
    printf("\n| W (N x K) | M | threads | format: kernel | ms/call | weight GB/s | GFLOP/s | "
           "fp32 time / time | time / floor |\n|---|---|---|---|---|---|---|---|---|\n");

    const int max_M = 512;
    for (int si = 0; si < 4; si++) {
        const int N = shapes[si][0], K = shapes[si][1];
        float *wf = malloc((size_t)N * K * sizeof *wf);
        float *x = malloc((size_t)max_M * K * sizeof *x);
        float *y = malloc((size_t)max_M * N * sizeof *y);
        qset sets[4] = {{0}}; /* by rp_qtype: f32, bf16, int8, int8row */
        if (!wf || !x || !y) {
            fprintf(stderr, "bench_cpu: cannot allocate %dx%d operands\n", N, K);
            return 1;
        }
        bench_fill_uniform(wf, (size_t)N * K, 0.02f, 7 + si);
        bench_fill_uniform(x, (size_t)max_M * K, 1.0f, 9);
        fprintf(stderr, "bench_cpu: quantized %dx%d...\n", N, K);
        for (int f = 0; f < 4; f++)
            if (qset_make(&sets[f], (rp_qtype)f, wf, N, K)) {
                fprintf(stderr, "bench_cpu: cannot allocate the %dx%d weight copies\n", N, K);
                return 1;
            }
        for (int mi = 0; mi < 3; mi++) {
            const int M = Ms[mi];
            if (M > 8 && N > 8192) continue; /* the head runs on the last row only */
            for (int ti = 0; ti < n_counts; ti++) {
                rp_backend *be = rp_cpu_backend_create(threads[ti], &err);
                if (!be) {
                    fprintf(stderr, "bench_cpu: %s\n", err.msg);
                    return 1;
                }
                double fp32_s = -1.0;
                rp_cpu_qx_workspace ws = {0};
                for (int f = 0; f < 4; f++)
                    for (int k = 0; k < RP_QKERNEL_COUNT; k++) {
                        if (f == RP_QTYPE_F32 ? k != 0 : !rp_qkernel_available((rp_qkernel)k, (rp_qtype)f))
                            continue;
                        /* generic: the fallback, not a contender; prefill runs
                         * the same sgemm tiles whatever the kernel: the chosen one */
                        if (f != RP_QTYPE_F32 && k == RP_QKERNEL_GENERIC) continue;
                        if (f != RP_QTYPE_F32 && M > 8 && k != (int)rp_qkernel_chosen((rp_qtype)f))
                            continue;
                        qcall c = {.be = be, .fp32 = f == RP_QTYPE_F32, .kernel = (rp_qkernel)k,
                                   .copies = sets[f].copies, .n_copies = sets[f].n, .y = y,
                                   .x = x, .M = M, .threads = threads[ti], .ws = &ws};
                        const double s = bench_seconds_per_call(qcall_run, &c, &t);
                        if (f == RP_QTYPE_F32) fp32_s = s;
                        const double bytes = (double)sets[f].bytes;
                        const double floor_s = bytes / (gbps[ti] * 1e9);
                        char name[48];
                        snprintf(name, sizeof name, "%s: %s%s", rp_qtype_name((rp_qtype)f),
                                 f == RP_QTYPE_F32 ? "matmul_linear" : rp_qkernel_name((rp_qkernel)k),
                                 f != RP_QTYPE_F32 && k == (int)rp_qkernel_chosen((rp_qtype)f) ? " (chosen)" : "");
                        char ratio[32] = "";
                        if (M == 1 && f != RP_QTYPE_F32)
                            snprintf(ratio, sizeof ratio, "%.2f %s", s / floor_s,
                                     s / floor_s <= QBENCH_GOAL_OVER_FLOOR ? "✓" : "✗");
                        else
                            snprintf(ratio, sizeof ratio, "%.2f", s / floor_s);
                        printf("| %d x %d | %d | %d | %s | %.3f | %.1f | %.1f | %.2f | %s |\n", N, K,
                               M, threads[ti], name, s * 1e3, bytes / s * 1e-9,
                               2.0 * M * N * K / s * 1e-9, fp32_s / s, ratio);
                        fflush(stdout);
                    }
                rp_cpu_qx_workspace_free(&ws);
                rp_cpu_backend_destroy(be);
            }
        }
        for (int f = 0; f < 4; f++) qset_free(&sets[f]);
        free(wf);
        free(x);
        free(y);
    }
    return 0;
}
