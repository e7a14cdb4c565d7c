/* The shared benchmark harness (harness.h): timing, machine description,
 * noise gauge, memory-bandwidth and sgemm ceilings, markdown rows. No model
 * code here, so a ceiling never depends on the thing it bounds. */
#include "config.h"

#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "core/clock.h"

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bench_median(double *values, int n) {
    if (n <= 0) return 0.0;
    qsort(values, (size_t)n, sizeof *values, compare_doubles);
    return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

long bench_calls_per_batch(bench_call_fn fn, void *ctx, double warmup_s, double min_batch_s) {
    /* The warm-up also calibrates: first calls fault pages in, so this
     * overestimates the call time and errs towards shorter batches, never
     * zero calls. */
    double t0 = rp_now_seconds(), elapsed;
    long calls = 0;
    do {
        if (fn(ctx)) return -1;
        calls++;
        elapsed = rp_now_seconds() - t0;
    } while (elapsed < warmup_s);
    double per_call = elapsed / (double)calls;
    return per_call > 0.0 ? (long)(min_batch_s / per_call) + 1 : 1;
}

double bench_batch_seconds(bench_call_fn fn, void *ctx, long calls) {
    double t0 = rp_now_seconds();
    for (long i = 0; i < calls; i++)
        if (fn(ctx)) return -1.0;
    return (rp_now_seconds() - t0) / (double)calls;
}

double bench_seconds_per_call(bench_call_fn fn, void *ctx, const bench_timing *t) {
    long batch = bench_calls_per_batch(fn, ctx, t->warmup_s, t->min_batch_s);
    if (batch < 0) return -1.0;
    int repeats = t->repeats < 1 ? 1 : t->repeats > BENCH_MAX_REPEATS ? BENCH_MAX_REPEATS
                                                                        : t->repeats;
    double samples[BENCH_MAX_REPEATS];
    for (int r = 0; r < repeats; r++)
        if ((samples[r] = bench_batch_seconds(fn, ctx, batch)) < 0.0) return -1.0;
    return bench_median(samples, repeats);
}

/* First "model name" line of /proc/cpuinfo (what lscpu shows). */
static void cpu_model_name(char *out, size_t size) {
    snprintf(out, size, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0) continue;
        const char *colon = strchr(line, ':');
        if (!colon) continue;
        colon++;
        while (*colon == ' ' || *colon == '\t') colon++;
        snprintf(out, size, "%s", colon);
        out[strcspn(out, "\n")] = '\0';
        break;
    }
    fclose(f);
}

void bench_print_machine(FILE *out, const char *title) {
    char model[256], date[64] = "unknown", load[128] = "unknown";
    cpu_model_name(model, sizeof model);
    time_t now = time(NULL);
    struct tm tm_now;
    if (localtime_r(&now, &tm_now)) strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S %Z", &tm_now);
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fgets(load, sizeof load, f)) load[strcspn(load, "\n")] = '\0';
        fclose(f);
    }
    const char *coretype = getenv("OPENBLAS_CORETYPE");
    fprintf(out, "## %s\n\n", title);
    fprintf(out, "- machine: %s, %ld online CPUs (OpenMP sees %d)\n", model,
            sysconf(_SC_NPROCESSORS_ONLN), omp_get_num_procs());
    fprintf(out, "- date: %s; load average at start: %s\n", date, load);
    fprintf(out, "- OPENBLAS_CORETYPE=%s\n", coretype ? coretype : "(unset)");
#ifdef HAVE_OPENBLAS_GET_CONFIG
    /* openblas_get_corename is as old as openblas_get_config; configure
     * checks only the latter. The core name shows what OPENBLAS_CORETYPE
     * actually selected. */
    fprintf(out, "- OpenBLAS: %s (core %s)\n", openblas_get_config(), openblas_get_corename());
#else
    fprintf(out, "- BLAS: not OpenBLAS (no openblas_get_config)\n");
#endif
}

/* ---- noise gauge ---- */

void bench_cpu_sample_take(bench_cpu_sample *s) {
    memset(s, 0, sizeof *s);
    unsigned long long v[8] = {0};
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return;
    /* cpu user nice system idle iowait irq softirq steal */
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                   &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n != 8) return;
    s->machine_busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    s->machine_total = s->machine_busy + v[3] + v[4];
    /* utime and stime are fields 14 and 15; the command name (field 2) may
     * contain spaces, so count from the last ')'. */
    char line[1024];
    f = fopen("/proc/self/stat", "r");
    if (!f) return;
    char *ok = fgets(line, sizeof line, f);
    fclose(f);
    const char *p = ok ? strrchr(line, ')') : NULL;
    unsigned long long utime, stime;
    if (!p || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime,
                     &stime) != 2)
        return;
    s->self = utime + stime;
    s->valid = 1;
}

double bench_cpu_other_fraction(const bench_cpu_sample *a, const bench_cpu_sample *b) {
    if (!a->valid || !b->valid || b->machine_total <= a->machine_total) return -1.0;
    double busy = (double)(b->machine_busy - a->machine_busy);
    double self = (double)(b->self - a->self);
    double other = (busy - self) / (double)(b->machine_total - a->machine_total);
    return other < 0.0 ? 0.0 : other > 1.0 ? 1.0 : other;
}

/* ---- ceiling 1: memory bandwidth ---- */

/* Each thread sums its static share in blocks of BENCH_SUM_LANES independent
 * partial sums, which gcc turns into several vector accumulators: one
 * accumulator would be bound by the add latency, not by memory. */
#define BENCH_SUM_LANES 64

int bench_memory_read_call(void *memory_read) {
    bench_memory_read *c = memory_read;
    const size_t blocks = c->floats / BENCH_SUM_LANES;
    float total = 0.0f;
#pragma omp parallel for num_threads(c->threads) schedule(static) reduction(+ : total)
    for (size_t b = 0; b < blocks; b += 64) {
        float lanes[BENCH_SUM_LANES] = {0};
        size_t end = b + 64 < blocks ? b + 64 : blocks;
        for (size_t blk = b; blk < end; blk++) {
            const float *p = c->buf + blk * BENCH_SUM_LANES;
#pragma omp simd
            for (int j = 0; j < BENCH_SUM_LANES; j++) lanes[j] += p[j];
        }
        for (int j = 0; j < BENCH_SUM_LANES; j++) total += lanes[j];
    }
    c->sink = total;
    return 0;
}

void bench_fill_parallel(float *buf, size_t floats, int threads) {
    const size_t blocks = floats / BENCH_SUM_LANES;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t b = 0; b < blocks; b += 64) {
        size_t end = (b + 64 < blocks ? b + 64 : blocks) * BENCH_SUM_LANES;
        /* Every page different, like weights. A pattern that repeats every
         * page lets a hypervisor merge the pages (KSM), and such a buffer
         * was seen reading at 20 GB/s beside a random one at 25. */
        for (size_t i = b * BENCH_SUM_LANES; i < end; i++)
            buf[i] = (float)((i * 0x9E3779B97F4A7C15ull) >> 40) * (1.0f / 16777216.0f);
    }
    for (size_t i = blocks * BENCH_SUM_LANES; i < floats; i++) buf[i] = 0.0f;
}

double bench_memory_read_bytes(const bench_memory_read *m) {
    return (double)(m->floats / BENCH_SUM_LANES * BENCH_SUM_LANES * sizeof(float));
}

/* ---- ceiling 2: sgemm ---- */

#define BENCH_SLICE_ALIGN 16 /* as CPU_MATMUL_SLICE_ALIGN in src/cpu/cpu_matmul.c */

struct bench_sgemm {
    int M, N, K, threads;
    float *x, *w, *y;
};

int bench_sgemm_call(void *opaque) {
    bench_sgemm *c = opaque;
#pragma omp parallel num_threads(c->threads)
    {
        int parts = omp_get_num_threads(), part = omp_get_thread_num();
        int chunk = (c->N + parts - 1) / parts;
        chunk = (chunk + BENCH_SLICE_ALIGN - 1) / BENCH_SLICE_ALIGN * BENCH_SLICE_ALIGN;
        int n0 = chunk * part < c->N ? chunk * part : c->N;
        int n1 = n0 + chunk < c->N ? n0 + chunk : c->N;
        if (n1 > n0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c->M, n1 - n0, c->K, 1.0f,
                        c->x, c->K, c->w + (size_t)n0 * c->K, c->K, 0.0f, c->y + n0, c->N);
    }
    return 0;
}

bench_sgemm *bench_sgemm_create(int M, int N, int K, int threads) {
#ifdef HAVE_OPENBLAS_SET_NUM_THREADS
    openblas_set_num_threads(1);
#endif
    bench_sgemm *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    *c = (bench_sgemm){.M = M, .N = N, .K = K, .threads = threads};
    c->x = malloc((size_t)M * K * sizeof(float));
    c->w = malloc((size_t)N * K * sizeof(float));
    c->y = malloc((size_t)M * N * sizeof(float));
    if (!c->x || !c->w || !c->y) {
        bench_sgemm_free(c);
        return NULL;
    }
    bench_fill_uniform(c->x, (size_t)M * K, 1.0f, 1);
    bench_fill_uniform(c->w, (size_t)N * K, 0.02f, 2);
    return c;
}

double bench_sgemm_flops(const bench_sgemm *s) { return 2.0 * s->M * s->N * (double)s->K; }

void bench_sgemm_free(bench_sgemm *s) {
    if (!s) return;
    free(s->x);
    free(s->w);
    free(s->y);
    free(s);
}

double bench_sgemm_gflops(int M, int N, int K, int threads, const bench_timing *t) {
    bench_sgemm *c = bench_sgemm_create(M, N, K, threads);
    if (!c) return -1.0;
    double s = bench_seconds_per_call(bench_sgemm_call, c, t);
    double gflops = s > 0.0 ? bench_sgemm_flops(c) / s * 1e-9 : -1.0;
    bench_sgemm_free(c);
    return gflops;
}

void bench_fill_uniform(float *p, size_t n, float scale, unsigned long long seed) {
    unsigned long long s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        /* top 24 bits: exactly representable, uniform in [0, 1) */
        float u = (float)(s >> 40) * (1.0f / 16777216.0f);
        p[i] = (2.0f * u - 1.0f) * scale;
    }
}

/* ---- markdown ---- */

void bench_table_header(FILE *out, const char *first, const char *const *columns,
                        int n_columns) {
    fprintf(out, "| %s |", first);
    for (int i = 0; i < n_columns; i++) fprintf(out, " %s |", columns[i]);
    fprintf(out, "\n|---|");
    for (int i = 0; i < n_columns; i++) fprintf(out, "---:|");
    fprintf(out, "\n");
}

void bench_table_row(FILE *out, const char *label, const char *const *cells, int n_cells) {
    fprintf(out, "| %s |", label);
    for (int i = 0; i < n_cells; i++) fprintf(out, " %s |", cells[i]);
    fprintf(out, "\n");
    fflush(out);
}
