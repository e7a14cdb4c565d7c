/* A/B of the two int8 decode kernels (issue 20): vnni on int8 (blocks of 32,
 * fp16 scales) against vnni on int8row (one f32 scale per row, x per 128-k
 * group) on the 0.1B shapes at M = 1 and 8, one thread, thread CPU time
 * (CLOCK_THREAD_CPUTIME_ID: other processes on the machine do not count),
 * the two alternated call by call, median of REPS; W in cache (one copy,
 * the calls repeated) and from memory (copies cycled, > 192 MiB per format).
 * Not part of the build (docs/perf/cpu.md, "int8row against int8"):
 *   gcc -O2 -fopenmp -Isrc -Ibuild/cpu bench/quant_kernel_ab.c \
 *       build/cpu/librwkvpipe.a -lopenblas -lm -o /tmp/quant_kernel_ab
 *   OMP_NUM_THREADS=1 /tmp/quant_kernel_ab [REPS]   (default 21) */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ab_util.h"
#include "cpu/cpu_quant.h"

typedef struct {
    rp_qmatrix *c;
    int n;
} wset;

static wset make_set(rp_qtype t, const float *w, int N, int K, int copies) {
    wset s = {calloc((size_t)copies, sizeof(rp_qmatrix)), copies};
    if (!s.c) exit(1);
    for (int i = 0; i < copies; i++) {
        void *d = aligned_alloc(64, (rp_q8row_packed_bytes(N, K) + 63) / 64 * 64);
        void *sc = aligned_alloc(64, (rp_qmatrix_scale_bytes(t, N, K) + 63) / 64 * 64);
        if (!d || !sc) {
            fprintf(stderr, "quant_kernel_ab: out of memory for %d copies of %dx%d\n", copies, N, K);
            exit(1);
        }
        rp_quantize_matrix(t, d, sc, w, N, K, 0);
        s.c[i] = rp_qmatrix_make(t, N, K, d, sc);
        if (t == RP_QTYPE_Q8ROW) { /* the kernels' packed form, as the backend holds it */
            void *p = aligned_alloc(64, (rp_q8row_packed_bytes(N, K) + 63) / 64 * 64);
            if (!p) exit(1);
            rp_q8row_pack_rows(p, d, 0, N, N, K);
            memcpy(d, p, rp_q8row_packed_bytes(N, K));
            free(p);
            s.c[i].data = NULL;
            s.c[i].packed = d;
        }
    }
    return s;
}

static void free_set(wset *s) {
    for (int i = 0; i < s->n; i++) {
        free((void *)(s->c[i].data ? s->c[i].data : (const void *)s->c[i].packed));
        free((void *)(s->c[i].scales ? (const void *)s->c[i].scales : (const void *)s->c[i].row_scales));
    }
    free(s->c);
}

int main(int argc, char **argv) {
    static const int shapes[][2] = {{768, 768}, {3072, 768}, {768, 3072}, {65536, 768}};
    int reps = argc > 1 ? atoi(argv[1]) : 21;
    if (reps < 1 || reps > 400) reps = 21;
    if (!rp_qkernel_available(RP_QKERNEL_VNNI, RP_QTYPE_Q8ROW)) {
        fprintf(stderr, "quant_kernel_ab: this CPU has no AVX512_VNNI\n");
        return 1;
    }
    unsigned long long r = 1;
    for (int si = 0; si < 4; si++) {
        const int N = shapes[si][0], K = shapes[si][1];
        float *w = malloc((size_t)N * K * sizeof *w);
        if (!w) return 1;
        for (size_t i = 0; i < (size_t)N * K; i++) w[i] = lcg(&r);
        const int copies = (int)(((size_t)192 << 20) / ((size_t)N * K)) + 1;
        for (int cached = 1; cached >= 0; cached--) {
            wset a = make_set(RP_QTYPE_Q8, w, N, K, cached ? 1 : copies);
            wset b = make_set(RP_QTYPE_Q8ROW, w, N, K, cached ? 1 : copies);
            for (int M = 1; M <= 8; M += 7) {
                float *x = malloc((size_t)M * K * sizeof *x), *y = malloc((size_t)M * N * sizeof *y);
                if (!x || !y) return 1;
                for (int i = 0; i < M * K; i++) x[i] = lcg(&r);
                double ta[400], tb[400];
                const int inner = cached ? ((size_t)N * K > 4000000 ? 3 : 20) : 1;
                for (int rep = 0, it = 0; rep < reps; rep++, it += inner)
                    for (int ab = 0; ab < 2; ab++) {
                        const wset *s = ab ? &b : &a;
                        const double t0 = now();
                        for (int i = 0; i < inner; i++)
                            rp_cpu_qmatmul_kernel_decode(NULL, RP_QKERNEL_VNNI, &s->c[(it + i) % s->n], y,
                                                         x, M, 0.0f, 1);
                        (ab ? tb : ta)[rep] = (now() - t0) / inner * 1e6;
                    }
                qsort(ta, (size_t)reps, sizeof(double), cmp);
                qsort(tb, (size_t)reps, sizeof(double), cmp);
                printf("| %d x %d | %d | %s | %.1f | %.1f | %.2fx |\n", N, K, M,
                       cached ? "cache" : "memory", ta[reps / 2], tb[reps / 2],
                       ta[reps / 2] / tb[reps / 2]);
                fflush(stdout);
                free(x);
                free(y);
            }
            free_set(&a);
            free_set(&b);
        }
        free(w);
    }
    return 0;
}
