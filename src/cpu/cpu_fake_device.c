/* A test backend: the CPU backend's arithmetic on memory the host cannot
 * touch. alloc hands out addresses inside a large PROT_NONE reservation (any
 * host load or store through them is a SIGSEGV) and keeps the real buffer
 * from the CPU backend elsewhere; every op translates its backend-memory
 * arguments back (interior pointers included) and calls the CPU op, so results
 * are bit-identical to the CPU backend. Selected by src/cli (test hook
 * RWKVPIPE_TEST_FAKE_DEVICE=1) and by tests/test_fake_device.sh. */
#include "config.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cpu/cpu_backend.h"
#include "cpu/cpu_fake_device.h"

/* Fake allocations start on a page and are followed by at least one unused
 * page, so the end pointer of one buffer never equals the start of the next
 * (an end pointer with a zero size is a legal argument). Fake addresses are
 * never reused: a stale pointer to a freed buffer is caught too. */
#define FAKE_PAGE ((uintptr_t)4096)

typedef struct {
    uintptr_t fake;  /* start of the fake range */
    size_t bytes;    /* as asked by alloc */
    void *real;      /* the CPU backend's buffer */
} fake_block;

typedef struct {
    rp_backend *cpu;        /* the wrapped CPU backend */
    char *reserve;          /* PROT_NONE reservation the fake addresses live in */
    size_t reserve_bytes;
    size_t next;            /* offset of the next fake block in reserve */
    fake_block *blocks;     /* sorted by fake (allocation order, since next only grows) */
    size_t n_blocks, cap_blocks;
    pthread_mutex_t lock;   /* the table: serve may allocate from several threads */
} fake_impl;

static fake_impl *fake_of(rp_backend *be) { return (fake_impl *)be->impl; }

/* A pointer that is no live backend buffer is a bug in the calling code,
 * which this backend exists to find: it stops at once with the address,
 * where a real device would fault or corrupt memory. The only exit in
 * library code, and only in this test backend (never in production). */
static void fake_die(const char *what, const void *p, size_t bytes) {
    fprintf(stderr, "fake-device: %s: %p (+%zu bytes) is not inside any live backend buffer\n",
            what, p, bytes);
    abort();
}

/* The block holding [p, p + bytes) (p may be the end of a buffer when
 * bytes == 0), or -1. Caller holds the lock. */
static long fake_find(const fake_impl *f, uintptr_t p, size_t bytes) {
    size_t lo = 0, hi = f->n_blocks;
    while (lo < hi) {  /* first block with fake > p */
        size_t mid = lo + (hi - lo) / 2;
        if (f->blocks[mid].fake > p) hi = mid;
        else lo = mid + 1;
    }
    if (lo == 0) return -1;
    const fake_block *b = &f->blocks[lo - 1];
    const size_t offset = p - b->fake;
    if (offset > b->bytes || bytes > b->bytes - offset) return -1;
    return (long)(lo - 1);
}

/* Real address of backend pointer p, checking that [p, p + bytes) lies in one
 * live buffer. NULL (optional arguments) stays NULL. */
static void *fake_real(rp_backend *be, const void *p, size_t bytes, const char *what) {
    if (!p) return NULL;
    fake_impl *f = fake_of(be);
    pthread_mutex_lock(&f->lock);
    const long i = fake_find(f, (uintptr_t)p, bytes);
    void *real = i < 0 ? NULL : (char *)f->blocks[i].real + ((uintptr_t)p - f->blocks[i].fake);
    pthread_mutex_unlock(&f->lock);
    if (i < 0) fake_die(what, p, bytes);
    return real;
}

/* Shorthands inside the op wrappers: F = float pointer, V = any, with the op
 * name in the message. */
#define F(p) ((float *)fake_real(be, (p), 0, __func__))
#define V(p, n) fake_real(be, (p), (n), __func__)
#define CPU (fake_of(be)->cpu)

/* ---- memory ---- */

static void *fake_alloc(rp_backend *be, size_t bytes) {
    fake_impl *f = fake_of(be);
    const size_t span = (bytes + FAKE_PAGE - 1) / FAKE_PAGE * FAKE_PAGE + FAKE_PAGE;
    if (span < bytes) return NULL;  /* overflow */
    void *real = CPU->alloc(CPU, bytes);
    if (!real) return NULL;
    pthread_mutex_lock(&f->lock);
    void *fake = NULL;
    if (span <= f->reserve_bytes - f->next) {
        if (f->n_blocks == f->cap_blocks) {
            size_t cap = f->cap_blocks ? 2 * f->cap_blocks : 256;
            fake_block *grown = realloc(f->blocks, cap * sizeof *grown);
            if (grown) {
                f->blocks = grown;
                f->cap_blocks = cap;
            }
        }
        if (f->n_blocks < f->cap_blocks) {
            fake = f->reserve + f->next;
            f->next += span;
            f->blocks[f->n_blocks++] = (fake_block){(uintptr_t)fake, bytes, real};
        }
    }
    pthread_mutex_unlock(&f->lock);
    if (!fake) CPU->free(CPU, real);
    return fake;
}

static void fake_free(rp_backend *be, void *ptr) {
    if (!ptr) return;
    fake_impl *f = fake_of(be);
    pthread_mutex_lock(&f->lock);
    const long i = fake_find(f, (uintptr_t)ptr, 0);
    void *real = NULL;
    if (i >= 0 && f->blocks[i].fake == (uintptr_t)ptr) {
        real = f->blocks[i].real;
        memmove(&f->blocks[i], &f->blocks[i + 1], (f->n_blocks - (size_t)i - 1) * sizeof *f->blocks);
        f->n_blocks--;
    }
    pthread_mutex_unlock(&f->lock);
    if (!real) fake_die("free (not the start of a live buffer)", ptr, 0);
    CPU->free(CPU, real);
}

static void fake_copy_to_device(rp_backend *be, void *dst, const void *host_src, size_t bytes) {
    if (bytes) CPU->copy_to_device(CPU, V(dst, bytes), host_src, bytes);
}

static void fake_copy_to_host(rp_backend *be, void *host_dst, const void *src, size_t bytes) {
    if (bytes) CPU->copy_to_host(CPU, host_dst, V(src, bytes), bytes);
}

static void fake_copy(rp_backend *be, void *dst, const void *src, size_t bytes) {
    if (bytes) CPU->copy(CPU, V(dst, bytes), V(src, bytes), bytes);
}

static void fake_fill_zero(rp_backend *be, void *dst, size_t bytes) {
    if (bytes) CPU->fill_zero(CPU, V(dst, bytes), bytes);
}

static void fake_synchronize(rp_backend *be) { CPU->synchronize(CPU); }

static void fake_add(rp_backend *be, float *y, const float *x, size_t n) {
    CPU->add(CPU, V(y, n * sizeof(float)), V(x, n * sizeof(float)), n);
}

static rp_status fake_status(rp_backend *be, rp_error *err) { return CPU->status(CPU, err); }

static rp_status fake_reserve(rp_backend *be, int rows, int seqs, int C, int N, rp_error *err) {
    return CPU->reserve(CPU, rows, seqs, C, N, err);
}

/* ---- dense and position-wise ---- */

static void fake_matmul_linear(rp_backend *be, float *y, const float *x, const float *w, int M,
                               int N, int K, float beta) {
    CPU->matmul_linear(CPU, F(y), F(x), F(w), M, N, K, beta);
}

static void fake_matmul_lora(rp_backend *be, float *y, const float *x, const float *w, int M,
                             int N, int K, float beta) {
    CPU->matmul_lora(CPU, F(y), F(x), F(w), M, N, K, beta);
}

static void fake_set_decode_rows(rp_backend *be, int on) {
    CPU->set_decode_rows(CPU, on);
}

/* tokens: host memory */
static void fake_embedding(rp_backend *be, float *x, const float *emb, const int32_t *tokens,
                           int R, int C) {
    CPU->embedding(CPU, F(x), F(emb), tokens, R, C);
}

static void fake_layernorm(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                           const float *weight, const float *bias, int R, int C, float eps) {
    CPU->layernorm(CPU, F(y), F(mean), F(rstd), F(x), F(weight), F(bias), R, C, eps);
}

/* batch: host memory */
static void fake_token_shift(rp_backend *be, float *prev, const float *x, float *state_base,
                             size_t state_stride, const rp_batch *batch, int C) {
    CPU->token_shift(CPU, F(prev), F(x), F(state_base), state_stride, batch, C);
}

static void fake_lerp(rp_backend *be, float *y, const float *x, const float *prev,
                      const float *mu, int R, int C) {
    CPU->lerp(CPU, F(y), F(x), F(prev), F(mu), R, C);
}

/* mix, mu: host arrays of device pointers; batch: host memory */
static void fake_shift_mix(rp_backend *be, float *prev, float *const *mix, const float *const *mu,
                           int n_mix, const float *x, float *state_base, size_t state_stride,
                           const rp_batch *batch, int C) {
    float *rmix[RP_MIX_MAX];
    const float *rmu[RP_MIX_MAX];
    for (int i = 0; i < n_mix && i < RP_MIX_MAX; i++) {
        rmix[i] = F(mix[i]);
        rmu[i] = F(mu[i]);
    }
    CPU->shift_mix(CPU, F(prev), rmix, rmu, n_mix, F(x), F(state_base), state_stride, batch, C);
}

static void fake_bias_act(rp_backend *be, float *y, const float *bias, int R, int C,
                          rp_activation act) {
    CPU->bias_act(CPU, F(y), F(bias), R, C, act);
}

static void fake_value_residual(rp_backend *be, float *v, const float *v_first, const float *nu,
                                int R, int C) {
    CPU->value_residual(CPU, F(v), F(v_first), F(nu), R, C);
}

static void fake_key_prepare(rp_backend *be, float *kk, float *k, const float *a,
                             const float *k_k, const float *k_a, int R, int C, int N) {
    CPU->key_prepare(CPU, F(kk), F(k), F(a), F(k_k), F(k_a), R, C, N);
}

static void fake_groupnorm(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                           const float *weight, const float *bias, int R, int C, int N,
                           float eps) {
    CPU->groupnorm(CPU, F(y), F(mean), F(rstd), F(x), F(weight), F(bias), R, C, N, eps);
}

static void fake_bonus_gate(rp_backend *be, float *out, const float *r, const float *k,
                            const float *v, const float *r_k, const float *g, int R, int C,
                            int N) {
    CPU->bonus_gate(CPU, F(out), F(r), F(k), F(v), F(r_k), F(g), R, C, N);
}

static void fake_wkv7(rp_backend *be, float *y, const float *r, const float *w_raw,
                      const float *k, const float *v, const float *kk, const float *a,
                      float *state_base, size_t state_stride, const rp_batch *batch, int C,
                      int N) {
    CPU->wkv7(CPU, F(y), F(r), F(w_raw), F(k), F(v), F(kk), F(a), F(state_base), state_stride,
              batch, C, N);
}

/* ---- backward ---- */

static void fake_matmul_linear_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                        const float *x, const float *w, int M, int N, int K) {
    CPU->matmul_linear_backward(CPU, F(dx), F(dw), F(dy), F(x), F(w), M, N, K);
}

static void fake_matmul_lora_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                      const float *x, const float *w, int M, int N, int K) {
    CPU->matmul_lora_backward(CPU, F(dx), F(dw), F(dy), F(x), F(w), M, N, K);
}

/* tokens: host memory */
static void fake_embedding_backward(rp_backend *be, float *demb, const float *dx,
                                    const int32_t *tokens, int R, int C) {
    CPU->embedding_backward(CPU, F(demb), F(dx), tokens, R, C);
}

static void fake_layernorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                    const float *dy, const float *x, const float *mean,
                                    const float *rstd, const float *weight, int R, int C) {
    CPU->layernorm_backward(CPU, F(dx), F(dweight), F(dbias), F(dy), F(x), F(mean), F(rstd),
                            F(weight), R, C);
}

/* batch: host memory */
static void fake_token_shift_backward(rp_backend *be, float *dx, float *dstate_base,
                                      size_t state_stride, const float *dprev,
                                      const rp_batch *batch, int C) {
    CPU->token_shift_backward(CPU, F(dx), F(dstate_base), state_stride, F(dprev), batch, C);
}

/* dmu, dmix, mu: host arrays of device pointers; batch: host memory */
static void fake_shift_mix_backward(rp_backend *be, float *dx, float *dprev, float *const *dmu,
                                    const float *const *dmix, const float *const *mu,
                                    int n_terms, const float *x, const float *prev,
                                    float *dstate_base, size_t state_stride,
                                    const rp_batch *batch, int C) {
    float *rdmu[RP_MIX_TERMS_MAX];
    const float *rdmix[RP_MIX_TERMS_MAX], *rmu[RP_MIX_TERMS_MAX];
    for (int j = 0; j < n_terms && j < RP_MIX_TERMS_MAX; j++) {
        rdmu[j] = F(dmu[j]);
        rdmix[j] = F(dmix[j]);
        rmu[j] = F(mu[j]);
    }
    CPU->shift_mix_backward(CPU, F(dx), F(dprev), rdmu, rdmix, rmu, n_terms, F(x), F(prev),
                            F(dstate_base), state_stride, batch, C);
}

static void fake_lerp_backward(rp_backend *be, float *dx, float *dprev, float *dmu,
                               const float *dy, const float *x, const float *prev,
                               const float *mu, int R, int C) {
    CPU->lerp_backward(CPU, F(dx), F(dprev), F(dmu), F(dy), F(x), F(prev), F(mu), R, C);
}

static void fake_bias_act_backward(rp_backend *be, float *dy, float *dbias, const float *y,
                                   int R, int C, rp_activation act) {
    CPU->bias_act_backward(CPU, F(dy), F(dbias), F(y), R, C, act);
}

static void fake_value_residual_backward(rp_backend *be, float *dv, float *dv_first, float *dnu,
                                         const float *v, const float *v_first, const float *nu,
                                         int R, int C) {
    CPU->value_residual_backward(CPU, F(dv), F(dv_first), F(dnu), F(v), F(v_first), F(nu), R,
                                 C);
}

static void fake_key_prepare_backward(rp_backend *be, float *dk, float *da, float *dk_k,
                                      float *dk_a, const float *dkk, const float *k,
                                      const float *a, const float *k_k, const float *k_a, int R,
                                      int C, int N) {
    CPU->key_prepare_backward(CPU, F(dk), F(da), F(dk_k), F(dk_a), F(dkk), F(k), F(a), F(k_k),
                              F(k_a), R, C, N);
}

static void fake_groupnorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                    const float *dy, const float *x, const float *mean,
                                    const float *rstd, const float *weight, int R, int C,
                                    int N) {
    CPU->groupnorm_backward(CPU, F(dx), F(dweight), F(dbias), F(dy), F(x), F(mean), F(rstd),
                            F(weight), R, C, N);
}

static void fake_bonus_gate_backward(rp_backend *be, float *d_o, float *dr, float *dk,
                                     float *dv, float *dr_k, float *dg, const float *dout,
                                     const float *o, const float *r, const float *k,
                                     const float *v, const float *r_k, const float *g, int R,
                                     int C, int N) {
    CPU->bonus_gate_backward(CPU, F(d_o), F(dr), F(dk), F(dv), F(dr_k), F(dg), F(dout), F(o),
                             F(r), F(k), F(v), F(r_k), F(g), R, C, N);
}

/* first gradient writes (backend.h) */
static void fake_matmul_linear_backward_beta(rp_backend *be, float *dx, float *dw, const float *dy,
                                             const float *x, const float *w, int M, int N, int K,
                                             float beta) {
    CPU->matmul_linear_backward_beta(CPU, F(dx), F(dw), F(dy), F(x), F(w), M, N, K, beta);
}

static void fake_matmul_lora_backward_beta(rp_backend *be, float *dx, float *dw, const float *dy,
                                           const float *x, const float *w, int M, int N, int K,
                                           float beta) {
    CPU->matmul_lora_backward_beta(CPU, F(dx), F(dw), F(dy), F(x), F(w), M, N, K, beta);
}

static void fake_layernorm_backward_beta(rp_backend *be, float *dx, float *dweight, float *dbias,
                                         const float *dy, const float *x, const float *mean,
                                         const float *rstd, const float *weight, int R, int C,
                                         float beta) {
    CPU->layernorm_backward_beta(CPU, F(dx), F(dweight), F(dbias), F(dy), F(x), F(mean),
                                 F(rstd), F(weight), R, C, beta);
}

static void fake_lerp_backward_beta(rp_backend *be, float *dx, float *dprev, float *dmu,
                                    const float *dy, const float *x, const float *prev,
                                    const float *mu, int R, int C, float beta) {
    CPU->lerp_backward_beta(CPU, F(dx), F(dprev), F(dmu), F(dy), F(x), F(prev), F(mu), R, C,
                            beta);
}

static void fake_bonus_gate_backward_beta(rp_backend *be, float *d_o, float *dr, float *dk,
                                          float *dv, float *dr_k, float *dg, const float *dout,
                                          const float *o, const float *r, const float *k,
                                          const float *v, const float *r_k, const float *g,
                                          int R, int C, int N, float beta) {
    CPU->bonus_gate_backward_beta(CPU, F(d_o), F(dr), F(dk), F(dv), F(dr_k), F(dg), F(dout),
                                  F(o), F(r), F(k), F(v), F(r_k), F(g), R, C, N, beta);
}

static void fake_wkv7_forward_train(rp_backend *be, float *y, const float *r,
                                    const float *w_raw, const float *k, const float *v,
                                    const float *kk, const float *a, float *state_base,
                                    size_t state_stride, float *checkpoints,
                                    const rp_batch *batch, int C, int N) {
    CPU->wkv7_forward_train(CPU, F(y), F(r), F(w_raw), F(k), F(v), F(kk), F(a), F(state_base),
                            state_stride, F(checkpoints), batch, C, N);
}

static void fake_wkv7_backward(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                               float *dkk, float *da, float *dstate_base, size_t state_stride,
                               const float *dy, const float *r, const float *w_raw,
                               const float *k, const float *v, const float *kk, const float *a,
                               const float *checkpoints, const rp_batch *batch, int C, int N) {
    CPU->wkv7_backward(CPU, F(dr), F(dw_raw), F(dk), F(dv), F(dkk), F(da), F(dstate_base),
                       state_stride, F(dy), F(r), F(w_raw), F(k), F(v), F(kk), F(a),
                       F(checkpoints), batch, C, N);
}

static void fake_wkv7_backward_beta(rp_backend *be, float *dr, float *dw_raw, float *dk,
                                    float *dv, float *dkk, float *da, float *dstate_base,
                                    size_t state_stride, const float *dy, const float *r,
                                    const float *w_raw, const float *k, const float *v,
                                    const float *kk, const float *a, const float *checkpoints,
                                    const rp_batch *batch, int C, int N, float beta) {
    CPU->wkv7_backward_beta(CPU, F(dr), F(dw_raw), F(dk), F(dv), F(dkk), F(da),
                            F(dstate_base), state_stride, F(dy), F(r), F(w_raw), F(k), F(v),
                            F(kk), F(a), F(checkpoints), batch, C, N, beta);
}

/* targets: host memory */
static void fake_cross_entropy(rp_backend *be, float *losses, float *dlogits,
                               const float *logits, const int32_t *targets, int R, int V,
                               float scale) {
    CPU->cross_entropy(CPU, F(losses), F(dlogits), F(logits), targets, R, V, scale);
}

/* targets: host memory; the CPU op runs its own ops on the real buffers */
static void fake_head_cross_entropy(rp_backend *be, float *losses, float *dx, float *dhead,
                                    float *scratch, const float *x, const float *head,
                                    const int32_t *targets, int R, int C, int V, float scale,
                                    float l2wrap_factor, int chunk_rows) {
    CPU->head_cross_entropy(CPU, F(losses), F(dx), F(dhead), F(scratch), F(x), F(head), targets,
                            R, C, V, scale, l2wrap_factor, chunk_rows);
}

/* row_max, argmax, targets: host memory */
static void fake_l2wrap(rp_backend *be, float *dlogits, const float *row_max,
                        const int32_t *argmax, const int32_t *targets, int R, int V,
                        float factor) {
    CPU->l2wrap(CPU, F(dlogits), row_max, argmax, targets, R, V, factor);
}

/* row_max, argmax: host outputs */
static void fake_row_max(rp_backend *be, float *row_max, int32_t *argmax, const float *x, int R,
                         int V) {
    CPU->row_max(CPU, row_max, argmax, F(x), R, V);
}

/* ---- optimizer ---- */

static double fake_sum_squares(rp_backend *be, const float *x, size_t n) {
    return CPU->sum_squares(CPU, V(x, n * sizeof(float)), n);
}

static void fake_adamw(rp_backend *be, float *param, const float *grad, float *m, float *v,
                       size_t n, float lr, float beta1, float beta2, float eps,
                       float weight_decay, float grad_scale, float bias_correction1,
                       float bias_correction2) {
    const size_t bytes = n * sizeof(float);
    CPU->adamw(CPU, V(param, bytes), V(grad, bytes), V(m, bytes), V(v, bytes), n, lr, beta1,
               beta2, eps, weight_decay, grad_scale, bias_correction1, bias_correction2);
}

/* ---- create / destroy ---- */

static void fake_destroy(rp_backend *be) {
    if (!be) return;
    fake_impl *f = fake_of(be);
    if (f) {
        /* buffers the caller forgot to free */
        for (size_t i = 0; i < f->n_blocks; i++) f->cpu->free(f->cpu, f->blocks[i].real);
        free(f->blocks);
        if (f->reserve) munmap(f->reserve, f->reserve_bytes);
        rp_backend_destroy(f->cpu);
        pthread_mutex_destroy(&f->lock);
        free(f);
    }
    free(be);
}

rp_backend *rp_fake_device_backend_create(int n_threads, rp_error *err) {
    rp_backend *be = rp_calloc(1, sizeof *be, "fake-device backend", err);
    if (!be) return NULL;
    fake_impl *f = rp_calloc(1, sizeof *f, "fake-device backend context", err);
    if (!f) {
        free(be);
        return NULL;
    }
    pthread_mutex_init(&f->lock, NULL);
    be->impl = f;
    be->destroy = fake_destroy;
    /* Address space only: PROT_NONE with MAP_NORESERVE commits no memory.
     * Smaller sizes for systems that limit the address space. */
    for (size_t gib = 1024; gib >= 16 && !f->reserve; gib /= 4) {
        void *p = mmap(NULL, gib << 30, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p != MAP_FAILED) {
            f->reserve = p;
            f->reserve_bytes = gib << 30;
        }
    }
    if (!f->reserve) {
        rp_error_set(err, RP_ERR_NOMEM, "fake-device backend: cannot reserve address space");
        fake_destroy(be);
        return NULL;
    }
    /* The first page stays unused, so no fake pointer equals the reservation's start. */
    f->next = FAKE_PAGE;
    if (!(f->cpu = rp_cpu_backend_create(n_threads, err))) {
        fake_destroy(be);
        return NULL;
    }

    be->name = "fake-device";
    be->is_host_memory = 0;
    be->decode_group = CPU->decode_group; /* the CPU backend's arithmetic, its groups */
    be->alloc = fake_alloc;
    be->free = fake_free;
    be->copy_to_device = fake_copy_to_device;
    be->copy_to_host = fake_copy_to_host;
    be->copy = fake_copy;
    be->fill_zero = fake_fill_zero;
    be->synchronize = fake_synchronize;
    be->add = fake_add;
    be->status = fake_status;
    be->reserve = fake_reserve;
    be->register_weights = NULL;
    be->refresh_weights = NULL;
    be->weight_copy = NULL;
    be->matmul_linear = fake_matmul_linear;
    be->matmul_lora = fake_matmul_lora;
    be->set_decode_rows = fake_set_decode_rows;
    be->embedding = fake_embedding;
    be->layernorm = fake_layernorm;
    be->token_shift = fake_token_shift;
    be->lerp = fake_lerp;
    be->shift_mix = fake_shift_mix;
    be->bias_act = fake_bias_act;
    be->value_residual = fake_value_residual;
    be->key_prepare = fake_key_prepare;
    be->groupnorm = fake_groupnorm;
    be->bonus_gate = fake_bonus_gate;
    be->wkv7 = fake_wkv7;
    be->matmul_linear_backward = fake_matmul_linear_backward;
    be->matmul_lora_backward = fake_matmul_lora_backward;
    be->embedding_backward = fake_embedding_backward;
    be->layernorm_backward = fake_layernorm_backward;
    be->token_shift_backward = fake_token_shift_backward;
    be->lerp_backward = fake_lerp_backward;
    be->shift_mix_backward = fake_shift_mix_backward;
    be->bias_act_backward = fake_bias_act_backward;
    be->value_residual_backward = fake_value_residual_backward;
    be->key_prepare_backward = fake_key_prepare_backward;
    be->groupnorm_backward = fake_groupnorm_backward;
    be->bonus_gate_backward = fake_bonus_gate_backward;
    be->matmul_linear_backward_beta = fake_matmul_linear_backward_beta;
    be->matmul_lora_backward_beta = fake_matmul_lora_backward_beta;
    be->layernorm_backward_beta = fake_layernorm_backward_beta;
    be->lerp_backward_beta = fake_lerp_backward_beta;
    be->bonus_gate_backward_beta = fake_bonus_gate_backward_beta;
    be->wkv7_forward_train = fake_wkv7_forward_train;
    be->wkv7_backward = fake_wkv7_backward;
    be->wkv7_backward_beta = fake_wkv7_backward_beta;
    be->cross_entropy = fake_cross_entropy;
    be->l2wrap = fake_l2wrap;
    be->head_cross_entropy = fake_head_cross_entropy;
    be->row_max = fake_row_max;
    be->sum_squares = fake_sum_squares;
    be->adamw = fake_adamw;
    return be;
}
