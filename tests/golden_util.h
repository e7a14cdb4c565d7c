/* Helpers shared by the model tests: locate reference files, read golden
 * tensors as f32, and compare arrays by max |a - b| / max |ref|. */
#ifndef RP_TESTS_GOLDEN_UTIL_H
#define RP_TESTS_GOLDEN_UTIL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/safetensors.h"

/* $RP_TEST_DATA/name, or tests/data/name relative to the source dir. */
static inline void golden_data_path(char *out, size_t size, const char *name) {
    const char *dir = getenv("RP_TEST_DATA");
    snprintf(out, size, "%s/%s", dir ? dir : "tests/data", name);
}

/* $RP_SHARED_DIR/golden/rwkv7/name; returns 0 if the file is not there. */
static inline int golden_shared_path(char *out, size_t size, const char *name) {
    const char *dir = getenv("RP_SHARED_DIR");
    if (!dir) return 0;
    snprintf(out, size, "%s/golden/rwkv7/%s", dir, name);
    return access(out, R_OK) == 0;
}

/* Reads a float tensor as a malloc'ed f32 array (aborts the test on error). */
static inline float *golden_read(const rp_st_file *f, const char *name, int64_t *numel) {
    const rp_st_tensor *t = rp_st_find(f, name);
    if (!t) {
        fprintf(stderr, "%s: missing golden tensor %s\n", f->path, name);
        abort();
    }
    float *out = malloc((size_t)t->numel * sizeof(float));
    rp_error err;
    if (rp_st_read_f32(f, t, out, t->numel, &err) != RP_OK) {
        fprintf(stderr, "%s\n", err.msg);
        abort();
    }
    if (numel) *numel = t->numel;
    return out;
}

/* max |got - ref| / max |ref| over n elements (max |ref| floored at 1e-30). */
static inline double golden_rel_err(const float *got, const float *ref, size_t n) {
    double max_diff = 0, max_ref = 1e-30;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        if (!(d <= max_diff)) max_diff = d;  /* NaN propagates as a failure */
        if (fabs(ref[i]) > max_ref) max_ref = fabs(ref[i]);
    }
    return max_diff / max_ref;
}

static inline int golden_argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

#endif
