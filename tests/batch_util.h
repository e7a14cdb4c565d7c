/* Ragged-batch helpers shared by the CPU op tests (test_cpu_ops.c,
 * test_cpu_backward.c): build an rp_batch from lengths and slots, cut a
 * token range of every sequence into a batch of its own, and move rows
 * between the two layouts. */
#ifndef RP_TESTS_BATCH_UTIL_H
#define RP_TESTS_BATCH_UTIL_H

#include <string.h>

#include "backend.h"

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
