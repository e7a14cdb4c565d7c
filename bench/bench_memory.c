/* bench_memory: does a buffer's read rate depend on where it lies? Allocates
 * N buffers one after another in one process, the same size, through the CPU
 * backend's allocator (as model weights are), fills each with different
 * random data, then reads them round-robin and prints each buffer's median
 * rate. On a machine whose memory is uniform every row is the same within
 * noise; where they are not, a bandwidth ceiling measured on a buffer of its
 * own does not bound a decode step that streams other memory, which is why
 * bench_cpu takes its decode floor from the weights' own buffers. */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "harness.h"
#include "core/clock.h"

#define BENCH_MEMORY_MAX_BUFFERS 64

static void usage(FILE *out) {
    fprintf(out,
            "usage: bench_memory [--buffers N] [--mib M] [--threads T] [--rounds R]\n"
            "\n"
            "Reads N buffers of M MiB each (allocated one after another by the CPU\n"
            "backend, each filled with its own random data) round-robin, R rounds,\n"
            "and prints one markdown table: each buffer's median read rate, GB/s.\n"
            "\n"
            "  --buffers N   how many buffers (default 6, at most %d)\n"
            "  --mib M       size of each, MiB (default 256; keep it well above the L3)\n"
            "  --threads T   OpenMP threads for the sum (default 1)\n"
            "  --rounds R    read rounds (default 7, at most %d)\n"
            "  --help        this text\n",
            BENCH_MEMORY_MAX_BUFFERS, BENCH_MAX_REPEATS);
}

/* A positive integer option no larger than max, or -1. */
static long parse_count(const char *s, long max) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 1 || v > max) return -1;
    return v;
}

int main(int argc, char **argv) {
    long n_buffers = 6, mib = 256, threads = 1, rounds = 7;
    for (int i = 1; i < argc; i++) {
        long *target = NULL, max = 0;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--buffers")) {
            target = &n_buffers, max = BENCH_MEMORY_MAX_BUFFERS;
        } else if (!strcmp(argv[i], "--mib")) {
            target = &mib, max = 1 << 16;
        } else if (!strcmp(argv[i], "--threads")) {
            target = &threads, max = 1024;
        } else if (!strcmp(argv[i], "--rounds")) {
            target = &rounds, max = BENCH_MAX_REPEATS;
        } else {
            fprintf(stderr, "bench_memory: unknown option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
        if (i + 1 >= argc || (*target = parse_count(argv[i + 1], max)) < 0) {
            fprintf(stderr, "bench_memory: %s needs an integer in [1, %ld]\n", argv[i], max);
            return 2;
        }
        i++;
    }

    rp_error err = {0};
    rp_backend *be = rp_cpu_backend_create((int)threads, &err);
    if (!be) {
        fprintf(stderr, "bench_memory: CPU backend: %s\n", err.msg);
        return 1;
    }
    const size_t floats = (size_t)mib << 18; /* MiB / sizeof(float) */
    bench_memory_read reads[BENCH_MEMORY_MAX_BUFFERS];
    fprintf(stderr, "bench_memory: allocating and filling %ld x %ld MiB...\n", n_buffers, mib);
    for (long b = 0; b < n_buffers; b++) {
        float *buf = be->alloc(be, floats * sizeof(float));
        if (!buf) {
            fprintf(stderr, "bench_memory: cannot allocate buffer %ld of %ld MiB: use a smaller "
                            "--mib or fewer --buffers\n", b, mib);
            return 1;
        }
        bench_fill_uniform(buf, floats, 1.0f, 1000 + (unsigned long long)b);
        reads[b] = (bench_memory_read){.buf = buf, .floats = floats, .threads = (int)threads};
    }

    double gbps[BENCH_MEMORY_MAX_BUFFERS][BENCH_MAX_REPEATS];
    for (long b = 0; b < n_buffers; b++) bench_memory_read_call(&reads[b]); /* warm-up */
    for (long r = 0; r < rounds; r++)
        for (long b = 0; b < n_buffers; b++) {
            double t0 = rp_now_seconds();
            bench_memory_read_call(&reads[b]);
            gbps[b][r] = bench_memory_read_bytes(&reads[b]) / (rp_now_seconds() - t0) * 1e-9;
        }

    bench_print_machine(stdout, "bench_memory: read rate of same-sized buffers, by allocation order");
    printf("- %ld buffers of %ld MiB allocated one after another (CPU backend allocator), each "
           "filled with its own random data, read round-robin: %ld rounds, %ld thread(s), "
           "medians\n\n", n_buffers, mib, rounds, threads);
    printf("| buffer (allocation order) | read GB/s | min | max |\n|---:|---:|---:|---:|\n");
    for (long b = 0; b < n_buffers; b++) {
        double lo = gbps[b][0], hi = gbps[b][0];
        for (long r = 1; r < rounds; r++) {
            lo = gbps[b][r] < lo ? gbps[b][r] : lo;
            hi = gbps[b][r] > hi ? gbps[b][r] : hi;
        }
        printf("| %ld | %.1f | %.1f | %.1f |\n", b, bench_median(gbps[b], (int)rounds), lo, hi);
    }
    for (long b = 0; b < n_buffers; b++) be->free(be, (void *)reads[b].buf);
    rp_cpu_backend_destroy(be);
    return 0;
}
