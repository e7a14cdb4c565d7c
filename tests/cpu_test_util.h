/* Helpers shared by the CPU op tests (test_cpu_ops.c, test_cpu_backward.c):
 * one backend per thread count, seeded random data, and ragged batches (build
 * an rp_batch from lengths and slots, cut a token range of every sequence
 * into a batch of its own, move rows between the two layouts). Include after
 * cmocka.h. */
#ifndef RP_TESTS_CPU_TEST_UTIL_H
#define RP_TESTS_CPU_TEST_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu_backend.h"

/* ---- fixtures: one backend per thread count ---- */

enum { N_BACKENDS = 3 };
static const int backend_threads[N_BACKENDS] = {1, 2, 3};
static rp_backend *backends[N_BACKENDS];

static inline int setup_backends(void **state) {
    (void)state;
    for (int i = 0; i < N_BACKENDS; i++) {
        rp_error err = {0};
        backends[i] = rp_cpu_backend_create(backend_threads[i], &err);
        if (!backends[i]) {
            fprintf(stderr, "rp_cpu_backend_create(%d): %s\n", backend_threads[i], err.msg);
            return -1;
        }
        /* Op scratch for every shape the op tests use: heads of 64 (the
         * per-thread WKV blocks) and of 4 (the most heads per row). */
        if (backends[i]->reserve(backends[i], 1024, 64, 512, 64, &err) != RP_OK ||
            backends[i]->reserve(backends[i], 1024, 64, 512, 4, &err) != RP_OK) {
            fprintf(stderr, "reserve: %s\n", err.msg);
            return -1;
        }
    }
    return 0;
}

static inline int teardown_backends(void **state) {
    (void)state;
    for (int i = 0; i < N_BACKENDS; i++) rp_cpu_backend_destroy(backends[i]);
    return 0;
}

/* ---- data ---- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static inline double rng_uniform(double lo, double hi) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t bits = (rng_state * 0x2545F4914F6CDD1Dull) >> 11;
    return lo + (hi - lo) * ((double)bits / 9007199254740992.0);
}

static inline float *random_floats(size_t n, double lo, double hi) {
    float *p = malloc((n ? n : 1) * sizeof *p);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = (float)rng_uniform(lo, hi);
    return p;
}

static inline float *copy_floats(const float *src, size_t n) {
    float *p = malloc((n ? n : 1) * sizeof *p);
    assert_non_null(p);
    memcpy(p, src, n * sizeof *p);
    return p;
}

/* ---- a ragged batch ---- */

typedef struct {
    int n_seq;
    int seq_len[8], row_begin[8], slot[8];
    rp_batch batch;
} test_batch;

static inline void make_batch(test_batch *tb, int n_seq, const int *len, const int *slot) {
    tb->n_seq = n_seq;
    int rows = 0;
    for (int s = 0; s < n_seq; s++) {
        tb->seq_len[s] = len[s];
        tb->row_begin[s] = rows;
        tb->slot[s] = slot[s];
        rows += len[s];
    }
    tb->batch = (rp_batch){.n_seq = n_seq, .n_rows = rows, .seq_len = tb->seq_len,
                           .row_begin = tb->row_begin, .slot = tb->slot};
}

/* Rows [t0, t1) of every sequence of `full` (clipped to its length) as a
 * batch of its own over compacted rows; *src_row maps each new row back. */
static inline void sub_batch(test_batch *out, const test_batch *full, int t0, int t1, int *src_row) {
    int len[8], slot[8], n = 0, rows = 0;
    for (int s = 0; s < full->n_seq; s++) {
        int e = t1 < full->seq_len[s] ? t1 : full->seq_len[s];
        if (e <= t0) continue;
        len[n] = e - t0;
        slot[n] = full->slot[s];
        for (int t = t0; t < e; t++) src_row[rows++] = full->row_begin[s] + t;
        n++;
    }
    make_batch(out, n, len, slot);
}

static inline void gather_rows(float *dst, const float *src, const int *src_row, int rows, int C) {
    for (int r = 0; r < rows; r++)
        memcpy(dst + (size_t)r * C, src + (size_t)src_row[r] * C, (size_t)C * sizeof(float));
}

static inline void scatter_rows(float *dst, const float *src, const int *src_row, int rows, int C) {
    for (int r = 0; r < rows; r++)
        memcpy(dst + (size_t)src_row[r] * C, src + (size_t)r * C, (size_t)C * sizeof(float));
}

#endif
