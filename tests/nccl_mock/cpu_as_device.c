/* The mock NCCL build's stand-in for the fake-device backend: with
 * RWKVPIPE_TEST_FAKE_DEVICE=1 the rwkvpipe_nccl_mock binary runs on the CPU
 * backend marked is_host_memory = 0, so the stage transport moves "device"
 * buffers through NCCL (the mock), whose copies are then plain host memory.
 * Defining this symbol keeps cpu_fake_device.o out of the link.
 *
 * RWKVPIPE_TEST_BF16_WEIGHTS=1 adds the CUDA backend's bf16 weight-copy
 * contract (backend.h register_weights / refresh_weights; cuda_backend.cu,
 * bf16 math): a registered range keeps a bf16-rounded copy; the GEMM ops
 * that read weights (matmul_linear, matmul_lora and their backwards,
 * head_cross_entropy)
 * read that copy instead of the fp32 weights; copies, fills and AdamW
 * through the backend keep it current (as cuda_copy, cuda_fill_zero and the
 * adamw kernel do), while the mock NCCL's writes do not: only
 * refresh_weights (or registering again) makes them current, or ZeRO-1's
 * bf16 all-gather receiving into them (weight_copy exposes the bf16). So a stale
 * copy after ZeRO-1's all-gather changes the losses, which the test sees.
 * Only the weight operand is rounded (CUDA also rounds activations): the
 * contract under test is the copies' freshness, not bf16 GEMM bits. At
 * destroy it prints how many floats each path converted (stderr), so the
 * test can tell a ranged refresh from a whole-stage re-registration. One
 * backend per process in this mode (the test binary trains).
 *
 * Sparse buffers (backend.h alloc_sparse / release_range, as CUDA's VMM
 * mapping): anonymous mmap pages; a page given back is dropped
 * (MADV_DONTNEED) and made PROT_NONE, so any later read or write of it -
 * ZeRO-1 reading the stale fp32 it gave back - kills the rank with SIGSEGV.
 * At destroy each rank prints the bytes it gave back. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/dtype.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_fake_device.h"

typedef struct {
    const float *base;
    size_t n;
    uint16_t *copy;  /* bf16 of [base, base + n), as CUDA's shadow */
} bf16_range;

static struct {
    int on;
    rp_backend cpu;  /* the CPU backend's own ops, before wrapping */
    bf16_range *r;
    int n, cap;
    unsigned long long by_register, by_refresh, by_write;
    float *operand;  /* a GEMM's weight operand decoded from its copy */
    size_t operand_n;
} bf;

/* Converts the part of [lo, lo + n) inside registered ranges; returns floats. */
static size_t convert(const float *lo, size_t n) {
    const float *hi = lo + n;
    size_t done = 0;
    for (int i = 0; i < bf.n; i++) {
        const bf16_range *w = &bf.r[i];
        const float *b = lo > w->base ? lo : w->base;
        const float *e = hi < w->base + w->n ? hi : w->base + w->n;
        for (const float *p = b; p < e; p++) w->copy[p - w->base] = rp_f32_to_bf16(*p);
        if (b < e) done += (size_t)(e - b);
    }
    return done;
}

/* What a GEMM reads for weight operand w [n]: its copy when registered
 * (decoded into bf.operand; one weight operand per op), else w. */
static const float *gemm_operand(const float *w, size_t n) {
    for (int i = 0; i < bf.n; i++)
        if (w >= bf.r[i].base && w + n <= bf.r[i].base + bf.r[i].n) {
            if (n > bf.operand_n) {
                float *grown = realloc(bf.operand, sizeof(float) * n);
                if (!grown) {
                    fprintf(stderr, "cpu_as_device.c: no memory for a GEMM operand of %zu "
                            "floats (RWKVPIPE_TEST_BF16_WEIGHTS=1)\n", n);
                    abort();
                }
                bf.operand = grown;
                bf.operand_n = n;
            }
            const uint16_t *c = bf.r[i].copy + (w - bf.r[i].base);
            for (size_t k = 0; k < n; k++) bf.operand[k] = rp_bf16_to_f32(c[k]);
            return bf.operand;
        }
    return w;
}

/* backend.h weight_copy: the bf16 copy of [w, w + n) inside one range. */
static void *bf_weight_copy(rp_backend *be, const float *w, size_t n) {
    (void)be;
    for (int i = 0; i < bf.n; i++)
        if (w >= bf.r[i].base && w + n <= bf.r[i].base + bf.r[i].n)
            return bf.r[i].copy + (w - bf.r[i].base);
    return NULL;
}

static void bf_register_weights(rp_backend *be, const float *w, size_t n) {
    (void)be;
    if (!w || !n) return;
    for (int i = 0; i < bf.n; i++)
        if (bf.r[i].base == w && bf.r[i].n == n) {
            bf.by_register += convert(w, n);
            return;
        }
    if (bf.n == bf.cap) {
        const int cap = bf.cap ? 2 * bf.cap : 64;
        bf16_range *grown = realloc(bf.r, sizeof *grown * (size_t)cap);
        if (!grown) return;  /* as CUDA without room: the GEMMs read fp32 */
        bf.r = grown;
        bf.cap = cap;
    }
    uint16_t *copy = malloc(sizeof(uint16_t) * n);
    if (!copy) return;
    bf.r[bf.n++] = (bf16_range){w, n, copy};
    bf.by_register += convert(w, n);
}

static void bf_refresh_weights(rp_backend *be, const float *w, size_t n) {
    (void)be;
    if (w && n) bf.by_refresh += convert(w, n);
}

/* Drops the bf16 copy of buffer p (freed), if it has one. */
static void bf_forget(const void *p) {
    for (int i = 0; p && i < bf.n; i++)
        if (bf.r[i].base == p) {
            free(bf.r[i].copy);
            bf.r[i] = bf.r[--bf.n];
            break;
        }
}

static void bf_free(rp_backend *be, void *p) {
    bf_forget(p);
    bf.cpu.free(be, p);
}

static void bf_copy_to_device(rp_backend *be, void *dst, const void *src, size_t bytes) {
    bf.cpu.copy_to_device(be, dst, src, bytes);
    bf.by_write += convert(dst, bytes / sizeof(float));
}

static void bf_copy(rp_backend *be, void *dst, const void *src, size_t bytes) {
    bf.cpu.copy(be, dst, src, bytes);
    bf.by_write += convert(dst, bytes / sizeof(float));
}

static void bf_fill_zero(rp_backend *be, void *dst, size_t bytes) {
    bf.cpu.fill_zero(be, dst, bytes);
    bf.by_write += convert(dst, bytes / sizeof(float));
}

static void bf_adamw(rp_backend *be, float *param, const float *grad, float *m, float *v,
                     size_t n, float lr, float beta1, float beta2, float eps, float wd,
                     float grad_scale, float bc1, float bc2) {
    bf.cpu.adamw(be, param, grad, m, v, n, lr, beta1, beta2, eps, wd, grad_scale, bc1, bc2);
    bf.by_write += convert(param, n);
}

static void bf_matmul_linear(rp_backend *be, float *y, const float *x, const float *w, int M,
                             int N, int K, float beta) {
    bf.cpu.matmul_linear(be, y, x, gemm_operand(w, (size_t)N * K), M, N, K, beta);
}

static void bf_matmul_linear_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                      const float *x, const float *w, int M, int N, int K) {
    bf.cpu.matmul_linear_backward(be, dx, dw, dy, x, gemm_operand(w, (size_t)N * K), M, N, K);
}

static void bf_matmul_linear_backward_beta(rp_backend *be, float *dx, float *dw,
                                           const float *dy, const float *x, const float *w,
                                           int M, int N, int K, float beta) {
    bf.cpu.matmul_linear_backward_beta(be, dx, dw, dy, x, gemm_operand(w, (size_t)N * K), M, N,
                                       K, beta);
}

/* The LoRA factors' GEMMs read their copies too (CUDA's bf16_operand), so
 * the all-gather's fp32 pieces (LoRA factors, norms) need refresh_weights. */
static void bf_matmul_lora(rp_backend *be, float *y, const float *x, const float *w, int M,
                           int N, int K, float beta) {
    bf.cpu.matmul_lora(be, y, x, gemm_operand(w, (size_t)K * N), M, N, K, beta);
}

static void bf_matmul_lora_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                    const float *x, const float *w, int M, int N, int K) {
    bf.cpu.matmul_lora_backward(be, dx, dw, dy, x, gemm_operand(w, (size_t)K * N), M, N, K);
}

static void bf_matmul_lora_backward_beta(rp_backend *be, float *dx, float *dw, const float *dy,
                                         const float *x, const float *w, int M, int N, int K,
                                         float beta) {
    bf.cpu.matmul_lora_backward_beta(be, dx, dw, dy, x, gemm_operand(w, (size_t)K * N), M, N,
                                     K, beta);
}

static void bf_head_cross_entropy(rp_backend *be, float *losses, float *dx, float *dhead,
                                  float *scratch, const float *x, const float *head,
                                  const int32_t *targets, int R, int C, int V, float scale,
                                  float l2wrap_factor, int chunk_rows) {
    bf.cpu.head_cross_entropy(be, losses, dx, dhead, scratch, x,
                              gemm_operand(head, (size_t)V * C), targets, R, C, V, scale,
                              l2wrap_factor, chunk_rows);
}

static void bf_destroy(rp_backend *be) {
    fprintf(stderr, "bf16 weight copies: %llu floats converted by register_weights, %llu by "
            "refresh_weights, %llu by writes through the backend\n", bf.by_register,
            bf.by_refresh, bf.by_write);
    for (int i = 0; i < bf.n; i++) free(bf.r[i].copy);
    free(bf.r);
    free(bf.operand);
    bf.operand = NULL;
    bf.operand_n = 0;
    bf.r = NULL;
    bf.n = bf.cap = 0;
    bf.cpu.destroy(be);
}

/* Wraps the CPU backend's ops (see the top of the file). */
static rp_status bf16_weights_install(rp_backend *be, rp_error *err) {
    if (bf.on)
        return rp_error_set(err, RP_ERR_ARG, "RWKVPIPE_TEST_BF16_WEIGHTS=1 holds one backend "
                            "per process (cpu_as_device.c); this run made a second one");
    bf.on = 1;
    bf.cpu = *be;
    be->name = "cpu-as-device, bf16 weight copies (mock NCCL test build)";
    be->destroy = bf_destroy;
    be->free = bf_free;
    be->copy_to_device = bf_copy_to_device;
    be->copy = bf_copy;
    be->fill_zero = bf_fill_zero;
    be->register_weights = bf_register_weights;
    be->refresh_weights = bf_refresh_weights;
    be->weight_copy = bf_weight_copy;
    be->adamw = bf_adamw;
    be->matmul_linear = bf_matmul_linear;
    be->matmul_linear_backward = bf_matmul_linear_backward;
    be->matmul_lora = bf_matmul_lora;
    be->matmul_lora_backward = bf_matmul_lora_backward;
    /* Optional ops stay absent where the CPU backend has none. */
    if (be->matmul_linear_backward_beta)
        be->matmul_linear_backward_beta = bf_matmul_linear_backward_beta;
    if (be->head_cross_entropy) be->head_cross_entropy = bf_head_cross_entropy;
    if (be->matmul_lora_backward_beta)
        be->matmul_lora_backward_beta = bf_matmul_lora_backward_beta;
    return RP_OK;
}

/* ---- sparse buffers ---- */

typedef struct {
    char *base;
    size_t bytes;  /* mapped: a whole number of pages */
} sparse_buf;

static struct {
    void (*free)(rp_backend *be, void *p);  /* the wrapped backend's */
    void (*destroy)(rp_backend *be);
    sparse_buf *a;
    int n, cap;
    unsigned long long given_back;
} sp;

static void *sp_alloc_sparse(rp_backend *be, size_t bytes) {
    const size_t page = be->sparse_page;
    const size_t mapped = (bytes ? bytes + page - 1 : page) / page * page;
    if (sp.n == sp.cap) {
        const int cap = sp.cap ? 2 * sp.cap : 64;
        sparse_buf *grown = realloc(sp.a, sizeof *grown * (size_t)cap);
        if (!grown) return NULL;
        sp.a = grown;
        sp.cap = cap;
    }
    void *p = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    sp.a[sp.n++] = (sparse_buf){p, mapped};
    return p;  /* anonymous pages read as zeros */
}

static int sp_find(const void *p) {
    for (int i = 0; i < sp.n; i++)
        if ((const char *)p >= sp.a[i].base && (const char *)p < sp.a[i].base + sp.a[i].bytes)
            return i;
    return -1;
}

static size_t sp_release_range(rp_backend *be, void *p, size_t bytes) {
    const size_t page = be->sparse_page;
    const int i = sp_find(p);
    if (i < 0 || (char *)p + bytes > sp.a[i].base + sp.a[i].bytes) {
        fprintf(stderr, "cpu_as_device.c: release_range(%p, %zu bytes) is not inside one "
                "alloc_sparse buffer\n", p, bytes);
        abort();
    }
    const uintptr_t lo = ((uintptr_t)p + page - 1) / page * page;
    const uintptr_t hi = ((uintptr_t)p + bytes) / page * page;
    if (lo >= hi) return 0;
    if (madvise((void *)lo, hi - lo, MADV_DONTNEED) != 0 ||
        mprotect((void *)lo, hi - lo, PROT_NONE) != 0) {
        perror("cpu_as_device.c: release_range (madvise / mprotect)");
        abort();
    }
    sp.given_back += hi - lo;
    return hi - lo;
}

static void sp_free(rp_backend *be, void *p) {
    const int i = p ? sp_find(p) : -1;
    if (i < 0) {
        sp.free(be, p);
        return;
    }
    if (bf.on) bf_forget(p);
    munmap(sp.a[i].base, sp.a[i].bytes);
    sp.a[i] = sp.a[--sp.n];
}

static void sp_destroy(rp_backend *be) {
    if (sp.given_back)
        fprintf(stderr, "sparse buffers: %llu bytes given back (%zu-byte pages)\n",
                sp.given_back, be->sparse_page);
    for (int i = 0; i < sp.n; i++) munmap(sp.a[i].base, sp.a[i].bytes);
    free(sp.a);
    void (*destroy)(rp_backend *) = sp.destroy;
    memset(&sp, 0, sizeof sp);
    destroy(be);
}

rp_backend *rp_fake_device_backend_create(int n_threads, rp_error *err) {
    rp_backend *be = rp_cpu_backend_create(n_threads, err);
    if (!be) return NULL;
    be->is_host_memory = 0;
    be->name = "cpu-as-device (mock NCCL test build)";
    const char *bf16 = getenv("RWKVPIPE_TEST_BF16_WEIGHTS");
    if (bf16 && strcmp(bf16, "1") == 0 && bf16_weights_install(be, err) != RP_OK) {
        rp_backend_destroy(be);
        return NULL;
    }
    const long page = sysconf(_SC_PAGESIZE);
    if (page > 0 && !sp.destroy) {
        sp.free = be->free;
        sp.destroy = be->destroy;
        be->sparse_page = (size_t)page;
        be->alloc_sparse = sp_alloc_sparse;
        be->release_range = sp_release_range;
        be->free = sp_free;
        be->destroy = sp_destroy;
    }
    return be;
}
