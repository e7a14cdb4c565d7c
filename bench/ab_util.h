/* What the stand-alone kernel A/B programs (bench/..._ab.c, not part of the
 * build) share: thread CPU time, so other processes on a loaded machine do
 * not count; a comparator for medians; a reproducible uniform fill in
 * [-0.5, 0.5). */
#ifndef RWKVPIPE_BENCH_AB_UTIL_H
#define RWKVPIPE_BENCH_AB_UTIL_H

#include <time.h>

static inline double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline int cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static inline float lcg(unsigned long long *r) {
    *r = *r * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*r >> 40) & 0xffff) / 65536.0f - 0.5f;
}

#endif
