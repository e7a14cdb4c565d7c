/* The harness every bench/ program shares (STYLE 5, nccl-tests style): a
 * monotonic clock, median-of-repeats timing, the machine description, and the
 * CPU ceilings (streaming read bandwidth, BLAS sgemm) measured in the same run
 * as the benchmark they bound, plus markdown table rows. Each benchmark is one
 * short file that prints one table. Callers: bench/bench_cpu.c. */
#ifndef RP_BENCH_HARNESS_H
#define RP_BENCH_HARNESS_H

#include <stddef.h>
#include <stdio.h>

/* How long to measure: warm up for warmup_s (at least one call), then time
 * `repeats` batches of calls, each batch at least min_batch_s long. */
typedef struct {
    double warmup_s;
    double min_batch_s;
    int repeats;
} bench_timing;

#define BENCH_MAX_REPEATS 32

/* One call of the thing measured; returns 0 on success, non-zero to abort. */
typedef int (*bench_call_fn)(void *ctx);

/* Median of n values (sorts them in place). */
double bench_median(double *values, int n);

/* Median seconds per call of fn under timing t; negative if a call failed. */
double bench_seconds_per_call(bench_call_fn fn, void *ctx, const bench_timing *t);

/* The two halves of bench_seconds_per_call, for benchmarks that interleave
 * batches of several measurements so that a ceiling and the thing it bounds,
 * taken seconds apart, drift together (memory bandwidth of a shared host
 * moves by tens of percent between runs). Calls per batch after warming up
 * (negative if a call failed), then seconds per call of one batch. */
long bench_calls_per_batch(bench_call_fn fn, void *ctx, double warmup_s, double min_batch_s);
double bench_batch_seconds(bench_call_fn fn, void *ctx, long calls);

/* Header lines: title, CPU model name, online CPUs, date, load average,
 * OPENBLAS_CORETYPE and the OpenBLAS build string. */
void bench_print_machine(FILE *out, const char *title);

/* Noise gauge: CPU time of the whole machine and of this process (clock
 * ticks from /proc/stat and /proc/self/stat). Another job on a small machine
 * halves a 2-thread number without any other sign, so every column reports
 * how much of the machine other processes used while it was measured. */
typedef struct {
    unsigned long long machine_busy, machine_total, self;
    int valid;
} bench_cpu_sample;

void bench_cpu_sample_take(bench_cpu_sample *s);
/* Share of all CPUs' time used by other processes between a and b, in [0, 1];
 * negative when /proc is not readable. */
double bench_cpu_other_fraction(const bench_cpu_sample *a, const bench_cpu_sample *b);

/* Ceiling 1, memory bandwidth: one call of bench_memory_read_call is an
 * OpenMP sum over `floats` floats of buf on `threads` threads; GB/s =
 * bench_memory_read_bytes / seconds * 1e-9. buf must be much larger than the
 * last-level cache and first-touched by the same team (bench_fill_parallel).
 * A call function rather than a "measure GB/s" helper so that benchmarks can
 * interleave it with what it bounds (bench_calls_per_batch). */
typedef struct {
    const float *buf;
    size_t floats;
    int threads;
    volatile float sink; /* keeps the sum observable */
} bench_memory_read;
int bench_memory_read_call(void *memory_read);
double bench_memory_read_bytes(const bench_memory_read *m);
/* buf[i] = deterministic values in [0, 1), no two pages alike, written by
 * `threads` threads with the same static schedule as the read, so pages land
 * near their reader. */
void bench_fill_parallel(float *buf, size_t floats, int threads);

/* Ceiling 2, BLAS: GFLOP/s of y [M,N] = x [M,K] . W^T, W [N,K] (nn.Linear, as
 * the backend's matmul_linear calls it), with one single-threaded cblas_sgemm
 * per OpenMP thread on disjoint 16-aligned column slices (the backend's own
 * split; Debian's OpenBLAS uses one core whatever OPENBLAS_NUM_THREADS says).
 * Negative when the operands cannot be allocated. */
double bench_sgemm_gflops(int M, int N, int K, int threads, const bench_timing *t);
/* The same GEMM as a call function, to interleave with what it bounds:
 * bench_sgemm_create allocates and fills the operands (NULL when it cannot),
 * bench_sgemm_call runs one product, bench_sgemm_flops is 2 M N K. */
typedef struct bench_sgemm bench_sgemm;
bench_sgemm *bench_sgemm_create(int M, int N, int K, int threads);
int bench_sgemm_call(void *sgemm);
double bench_sgemm_flops(const bench_sgemm *s);
void bench_sgemm_free(bench_sgemm *s);

/* Uniform floats in [-scale, scale) from a 64-bit LCG (Knuth MMIX constants);
 * fast enough to fill hundreds of MB of weights in well under a second. */
void bench_fill_uniform(float *p, size_t n, float scale, unsigned long long seed);

/* Markdown table: a header row with the first column's title and one column
 * per value, then rows of preformatted cells. */
void bench_table_header(FILE *out, const char *first, const char *const *columns,
                        int n_columns);
void bench_table_row(FILE *out, const char *label, const char *const *cells, int n_cells);

#endif
