/* A/B of the f32 decode kernel (issue 14, docs/perf/serving.md "The decode
 * kernel at 32-64 rows"): cpu_matmul_decode of this tree against an older
 * copy of cpu_matmul_decode.c built with its entry point renamed, on the
 * 0.1B shapes at 1-256 rows, one thread, W evicted before every call (96 MiB
 * written, as in decode where the layers' weights do not fit the caches)
 * and x read back into cache (as in decode, where the op before wrote it),
 * thread CPU time (CLOCK_THREAD_CPUTIME_ID: other processes on the machine
 * do not count), the two alternated call by call (which goes first
 * alternates too), min and median of REPS.
 * It also checks that both give the same bits. Not part of the build:
 *   mkdir -p /tmp/decode_old/cpu
 *   git show c7c85ed:src/cpu/cpu_matmul_decode.c > /tmp/decode_old/decode_old.c
 *   git show c7c85ed:src/cpu/cpu_matmul_decode.h > /tmp/decode_old/cpu/cpu_matmul_decode.h
 *   gcc -std=c11 -O3 -march=native -fno-math-errno -DHAVE_CONFIG_H -I/tmp/decode_old \
 *       -Isrc -Ibuild/cpu -Dcpu_matmul_decode=cpu_matmul_decode_old \
 *       -c /tmp/decode_old/decode_old.c -o /tmp/decode_old.o
 *   gcc -std=c11 -O2 -march=native -fopenmp -Isrc -Ibuild/cpu bench/decode_kernel_ab.c \
 *       /tmp/decode_old.o build/cpu/librwkvpipe.a -lopenblas -lm -o /tmp/decode_kernel_ab
 *   /tmp/decode_kernel_ab [REPS [evict|warm [N]]]   (default 7, evict; warm: W
 *   not evicted; N: only the shape with that N) */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ab_util.h"
#include "cpu/cpu_matmul_decode.h"

void cpu_matmul_decode_old(float *y, const float *x, const float *w, int M, int n0, int n1,
                           int N, int K, float beta, float *pack);

static void *xalloc(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) {
        fprintf(stderr, "decode_kernel_ab: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

#define EVICT_BYTES ((size_t)96 << 20)

static volatile float sink;

int main(int argc, char **argv) {
    const int reps = argc > 1 ? atoi(argv[1]) : 7;
    const int warm = argc > 2 && !strcmp(argv[2], "warm"); /* W left in cache */
    const int only_n = argc > 3 ? atoi(argv[3]) : 0;            /* one shape: its N */
    if (reps < 1) {
        fprintf(stderr, "decode_kernel_ab: REPS must be >= 1, got %s\n", argv[1]);
        return 2;
    }
    static const int shapes[][2] = {{768, 768}, {3072, 768}, {768, 3072}, {65536, 768}};
    static const int rows[] = {1, 8, 16, 24, 32, 48, 58, 64, 128, 256};
    const int n_rows = (int)(sizeof rows / sizeof rows[0]);
    const int maxm = 256;
    char *evict = xalloc(EVICT_BYTES);
    printf("| N x K | rows | old ms (min / median) | new ms (min / median) | old GFLOP/s | "
           "new GFLOP/s | new / old speed |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int N = shapes[s][0], K = shapes[s][1];
        if (only_n > 0 && N != only_n) continue;
        float *w = xalloc((size_t)N * K * sizeof(float));
        float *x = xalloc((size_t)maxm * K * sizeof(float));
        float *y0 = xalloc((size_t)maxm * N * sizeof(float));
        float *y1 = xalloc((size_t)maxm * N * sizeof(float));
        size_t pack_floats = cpu_matmul_decode_pack_floats(1, K);
        for (int ri = 0; ri < n_rows; ri++) {
            const size_t f = cpu_matmul_decode_pack_floats(rows[ri], K);
            pack_floats = f > pack_floats ? f : pack_floats;
        }
        float *pack = xalloc(pack_floats * sizeof(float));
        unsigned long long r = 12345 + s;
        for (size_t i = 0; i < (size_t)N * K; i++) w[i] = lcg(&r);
        for (size_t i = 0; i < (size_t)maxm * K; i++) x[i] = lcg(&r);
        for (int ri = 0; ri < n_rows; ri++) {
            const int M = rows[ri];
            if (M > 64 && N == 65536 && reps > 3) continue; /* the head: minutes */
            double t_old[64], t_new[64];
            const int n = reps < 64 ? reps : 64;
            for (int i = 0; i < n; i++)
                for (int half = 0; half < 2; half++) {
                    const int which = half ^ (i & 1); /* who goes first alternates */
                    if (!warm) memset(evict, i + half, EVICT_BYTES);
                    /* x back in cache, as in decode (the op before wrote it) */
                    for (size_t j = 0; j < (size_t)M * K; j += 16) sink += x[j];
                    float *y = which ? y1 : y0;
                    const double t0 = now();
                    if (which)
                        cpu_matmul_decode(y, x, w, M, 0, N, N, K, 0.0f, pack, pack_floats);
                    else
                        cpu_matmul_decode_old(y, x, w, M, 0, N, N, K, 0.0f, pack);
                    (which ? t_new : t_old)[i] = now() - t0;
                }
            if (memcmp(y0, y1, (size_t)M * N * sizeof(float))) {
                fprintf(stderr, "decode_kernel_ab: %d x %d at %d rows: old and new bits differ\n",
                        N, K, M);
                return 1;
            }
            qsort(t_old, (size_t)n, sizeof(double), cmp);
            qsort(t_new, (size_t)n, sizeof(double), cmp);
            const double flop = 2.0 * M * N * K;
            printf("| %d x %d | %d | %.3f / %.3f | %.3f / %.3f | %.1f | %.1f | %.2fx |\n", N, K, M,
                   1e3 * t_old[0], 1e3 * t_old[n / 2], 1e3 * t_new[0], 1e3 * t_new[n / 2],
                   flop / t_old[0] / 1e9, flop / t_new[0] / 1e9, t_old[0] / t_new[0]);
            fflush(stdout);
        }
        free(w);
        free(x);
        free(y0);
        free(y1);
        free(pack);
    }
    free(evict);
    return 0;
}
