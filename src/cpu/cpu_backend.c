/* The CPU backend (fp32, the reference twin of cuda/): its context, the
 * vtable that rp_cpu_backend_create fills (each cpu_*.c installs its ops),
 * the memory ops, and the op scratch that reserve sizes ahead of a step so
 * that no op allocates. The CUDA twin is cuda/cuda_backend.cu. */
#include "config.h"

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_OPENBLAS_SET_NUM_THREADS
#include <cblas.h>
#endif

#include "cpu/cpu_backend.h"
#include "cpu/cpu_internal.h"
#include "cpu/cpu_quant.h"
#include "cpu/cpu_wait.h"

#define CPU_ALIGN_BYTES 64

/* Sequences per engine decode group (be->decode_group), measured with
 * bench_engine on the 0.1B shape (docs/perf/serving.md). */
#define CPU_DECODE_GROUP 64

/* ---- memory ---- */

static void *cpu_alloc(rp_backend *be, size_t bytes) {
    (void)be;
    /* aligned_alloc wants a multiple of the alignment; 0 bytes still gets a
     * unique pointer so that callers can free it like any other. */
    size_t rounded = (bytes + CPU_ALIGN_BYTES - 1) / CPU_ALIGN_BYTES * CPU_ALIGN_BYTES;
    if (rounded < bytes) return NULL; /* overflow */
    if (rounded == 0) rounded = CPU_ALIGN_BYTES;
    void *p = aligned_alloc(CPU_ALIGN_BYTES, rounded);
    if (p) memset(p, 0, rounded);
    return p;
}

static void cpu_free(rp_backend *be, void *ptr) {
    (void)be;
    free(ptr);
}

static void cpu_copy(rp_backend *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memmove(dst, src, bytes);
}

static void cpu_fill_zero(rp_backend *be, void *dst, size_t bytes) {
    (void)be;
    if (bytes) memset(dst, 0, bytes);
}

static void cpu_synchronize(rp_backend *be) { (void)be; }

/* The only way a CPU op fails is a call beyond the scratch that reserve
 * prepared (a programming error: the op did nothing). */
static rp_status cpu_status(rp_backend *be, rp_error *err) {
    const rp_cpu_impl *impl = be->impl;
    if (impl->error.code == RP_OK) return RP_OK;
    if (err) *err = impl->error;
    return impl->error.code;
}

/* ---- scratch ---- */

/* Replaces *block by a zeroed one of `want` bytes unless it already has
 * that many; the old block is freed only once the new one exists, so a
 * failed reserve leaves the earlier reservation usable. */
static int cpu_grow(void **block, size_t *have, size_t want) {
    if (want <= *have) return 1;
    void *p = cpu_alloc(NULL, want);
    if (!p) return 0;
    free(*block);
    *block = p;
    *have = want;
    return 1;
}

static rp_status cpu_reserve(rp_backend *be, int rows, int seqs, int C, int N, rp_error *err) {
    rp_cpu_impl *impl = be->impl;
    if (rows < 1 || seqs < 1 || N < 1 || C < N)
        return rp_error_set(err, RP_ERR_ARG,
                            "CPU backend scratch for %d rows in %d sequences, C=%d, N=%d: "
                            "need rows >= 1, sequences >= 1 and 1 <= N <= C",
                            rows, seqs, C, N);
    size_t shared = cpu_key_prepare_backward_scratch(rows, C, N);
    const size_t bonus = cpu_bonus_gate_backward_scratch(rows, C, N);
    const size_t wkv = cpu_wkv7_train_scratch(seqs);
    shared = bonus > shared ? bonus : shared;
    shared = wkv > shared ? wkv : shared;
    const size_t one = cpu_wkv7_backward_thread_scratch(N);
    const size_t stride = (one + CPU_ALIGN_BYTES - 1) / CPU_ALIGN_BYTES * CPU_ALIGN_BYTES;
    const size_t threads = (size_t)impl->n_threads;
    int ok = stride <= SIZE_MAX / threads && cpu_grow(&impl->shared, &impl->shared_bytes, shared);
    if (ok && stride > impl->thread_stride) {
        size_t have = impl->thread_stride * threads;
        ok = cpu_grow(&impl->per_thread, &have, stride * threads);
        if (ok) impl->thread_stride = stride;
    }
    if (!ok)
        return rp_error_set(err, RP_ERR_NOMEM,
                            "CPU backend: cannot allocate op scratch for %d rows in %d "
                            "sequences (C=%d, N=%d): %zu bytes shared + %zu per thread x %d "
                            "threads; use fewer rows per micro-batch or fewer threads",
                            rows, seqs, C, N, shared, stride, impl->n_threads);
    return RP_OK;
}

/* Keeps the first failure only (as a device's sticky error). */
static void cpu_scratch_fail(rp_backend *be, const char *op, size_t need, size_t have) {
    rp_cpu_impl *impl = be->impl;
    if (impl->error.code != RP_OK) return;
    rp_error_set(&impl->error, RP_ERR_INTERNAL,
                 "CPU backend: %s needs %zu bytes of scratch but reserve prepared %zu; call "
                 "rp_backend.reserve with the batch's shapes first (the op did nothing)",
                 op, need, have);
}

void *cpu_scratch(rp_backend *be, size_t bytes, const char *op) {
    rp_cpu_impl *impl = be->impl;
    if (bytes <= impl->shared_bytes) return impl->shared;
    cpu_scratch_fail(be, op, bytes, impl->shared_bytes);
    return NULL;
}

char *cpu_thread_scratch(rp_backend *be, size_t bytes, const char *op) {
    rp_cpu_impl *impl = be->impl;
    if (bytes <= impl->thread_stride) return impl->per_thread;
    cpu_scratch_fail(be, op, bytes, impl->thread_stride);
    return NULL;
}

char *cpu_thread_scratch_at_least(rp_backend *be, size_t bytes) {
    rp_cpu_impl *impl = be->impl;
    const size_t stride = (bytes + CPU_ALIGN_BYTES - 1) / CPU_ALIGN_BYTES * CPU_ALIGN_BYTES;
    const size_t threads = (size_t)impl->n_threads;
    if (stride > impl->thread_stride) {
        size_t have = impl->thread_stride * threads;
        if (stride > SIZE_MAX / threads || !cpu_grow(&impl->per_thread, &have, stride * threads))
            return NULL;
        impl->thread_stride = stride;
    }
    return impl->per_thread;
}

/* ---- lifetime ---- */

rp_backend *rp_cpu_backend_create(int n_threads, rp_error *err) {
    /* A bad RP_CPU_ISA is the user's to fix before any work starts (the
     * quantized kernels, which read it, have no way to report it). */
    if (rp_cpu_qmatmul_check_env(err) != RP_OK) return NULL;
    rp_backend *be = rp_calloc(1, sizeof *be, "CPU backend", err);
    if (!be) return NULL;
    rp_cpu_impl *impl = rp_calloc(1, sizeof *impl, "CPU backend context", err);
    if (!impl) {
        free(be);
        return NULL;
    }
    impl->n_threads = n_threads > 0 ? n_threads : omp_get_max_threads();
#ifdef HAVE_OPENBLAS_SET_NUM_THREADS
    /* The backend runs one single-threaded BLAS call per OpenMP thread. */
    openblas_set_num_threads(1);
#endif
    /* Links cpu_wait.o, whose .preinit_array entry bounds the team's spin,
     * into every program that uses this backend. */
    (void)rp_cpu_wait_policy();
    be->name = "cpu";
    be->impl = impl;
    be->alloc = cpu_alloc;
    be->free = cpu_free;
    be->copy_to_device = cpu_copy;
    be->copy_to_host = cpu_copy;
    be->copy = cpu_copy;
    be->fill_zero = cpu_fill_zero;
    be->synchronize = cpu_synchronize;
    be->status = cpu_status;
    be->reserve = cpu_reserve;
    be->register_weights = NULL;
    be->destroy = rp_cpu_backend_destroy;
    be->is_host_memory = 1;
    /* Engine decode groups (backend.h): decode rows stream W once for any
     * count (cpu_matmul.c), so a bigger group costs little more per step
     * (bench_engine, docs/perf/serving.md). */
    be->decode_group = CPU_DECODE_GROUP;
    cpu_matmul_install(be);
    cpu_elementwise_install(be);
    cpu_backward_install(be);
    cpu_wkv7_install(be);
    cpu_loss_install(be);
    cpu_decode_install(be);
    cpu_qweights_install(be);
    return be;
}

void rp_cpu_backend_destroy(rp_backend *be) {
    if (!be) return;
    rp_cpu_impl *impl = be->impl;
    cpu_qweights_free_all(be);
    rp_cpu_qx_workspace_free(&impl->qx_ws);
    free(impl->shared);
    free(impl->per_thread);
    free(impl);
    free(be);
}
