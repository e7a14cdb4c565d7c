/* The decode WKV7 of a batch as a decode step meets it: B sequences, one
 * token each, through the CPU backend's wkv7 op on every layer's state in
 * turn (0.1B: 12 layers, C 768, heads of 64), with the caches flushed
 * before each step (a 96 MiB buffer rewritten, as the step's streamed
 * weights do) and without ("cache": the same layer's state again). Prints
 * the median thread CPU time (CLOCK_THREAD_CPUTIME_ID) of the 12 calls,
 * and a checksum of y and the states so two builds can be compared.
 * Not part of the build (docs/perf/cpu.md, "int8row batch 8"):
 *   gcc -O2 -fopenmp -Isrc -Ibuild/cpu bench/wkv_decode_ab.c \
 *       build/cpu/librwkvpipe.a -lopenblas -lm -o /tmp/wkv_decode_ab
 *   OMP_NUM_THREADS=1 /tmp/wkv_decode_ab [B [REPS]]   (default 8 31) */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ab_util.h"
#include "cpu/cpu_backend.h"

enum { LAYERS = 12, C = 768, N = 64, H = C / N };

static float *fill(size_t n, unsigned long long *r, float scale) {
    float *p = malloc(n * sizeof *p);
    if (!p) {
        fprintf(stderr, "wkv_decode_ab: out of memory (%zu floats)\n", n);
        exit(1);
    }
    for (size_t i = 0; i < n; i++) p[i] = scale * lcg(r);
    return p;
}

int main(int argc, char **argv) {
    const int B = argc > 1 ? atoi(argv[1]) : 8;
    int reps = argc > 2 ? atoi(argv[2]) : 31;
    if (B < 1 || B > 64 || reps < 1 || reps > 1000) {
        fprintf(stderr, "wkv_decode_ab: B 1-64, REPS 1-1000\n");
        return 1;
    }
    rp_error err = {0};
    rp_backend *be = rp_cpu_backend_create(1, &err);
    if (!be) {
        fprintf(stderr, "wkv_decode_ab: no CPU backend\n");
        return 1;
    }
    unsigned long long r = 7;
    const size_t rows = (size_t)B * C, stride = (size_t)H * N * N;
    float *in[LAYERS][6];
    for (int l = 0; l < LAYERS; l++)
        for (int i = 0; i < 6; i++) in[l][i] = fill(rows, &r, i == 4 ? 0.1f : 1.0f);
    float *state = fill(stride * B * LAYERS, &r, 0.1f), *y = fill(rows, &r, 0.0f);
    const size_t flush_n = ((size_t)96 << 20) / sizeof(float);
    float *flush = fill(flush_n, &r, 1.0f);
    int seq_len[64], row_begin[64], slot[64];
    for (int s = 0; s < B; s++) seq_len[s] = 1, row_begin[s] = s, slot[s] = s;
    const rp_batch batch = {B, B, seq_len, row_begin, slot};
    double t[2][1000];
    double sum = 0.0;
    for (int rep = 0; rep < reps; rep++)
        for (int cached = 0; cached < 2; cached++) {
            if (!cached)
                for (size_t i = 0; i < flush_n; i += 16) flush[i] += 1.0f;
            double total = 0.0;
            for (int l = 0; l < LAYERS; l++) {
                float *const *a = in[cached ? 0 : l];
                float *st = state + stride * B * (cached ? 0 : l);
                const double t0 = now();
                be->wkv7(be, y, a[0], a[1], a[2], a[3], a[4], a[5], st, stride, &batch, C, N);
                total += now() - t0;
                for (size_t i = 0; i < rows; i++) sum += y[i];
            }
            t[cached][rep] = total * 1e6;
        }
    for (size_t i = 0; i < stride * B * LAYERS; i++) sum += state[i];
    for (int c = 0; c < 2; c++) qsort(t[c], (size_t)reps, sizeof(double), cmp);
    printf("B %d, 12 layers: memory %.1f us, cache %.1f us (medians of %d); checksum %.9g\n", B,
           t[0][reps / 2], t[1][reps / 2], reps, sum);
    rp_backend_destroy(be);
    return 0;
}
