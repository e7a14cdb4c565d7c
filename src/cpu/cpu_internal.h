/* Private declarations shared by the CPU backend's files: the backend context
 * and its op scratch, the thread-count rule, vectorisable float math (exp,
 * sigmoid, tanh, decay) and the install function of each file:
 *   cpu_backend.c      context, vtable, memory, status, reserve (scratch)
 *   cpu_matmul.c       the four GEMM ops
 *   cpu_elementwise.c  position-wise forward ops, token_shift, add
 *   cpu_backward.c     the backward of each position-wise op
 *   cpu_wkv7.c         wkv7, wkv7_forward_train, wkv7_backward
 *   cpu_loss.c         cross_entropy, row_max, l2wrap, sum_squares, adamw
 *   cpu_decode.c       gemv_group, time_mix_heads (the fused decode ops' twins)
 *   cpu_qweights.c     low-precision weight storage (qweight_*), keyed lookup
 * Only src/cpu and the CPU op tests include this file; everyone else sees
 * struct rp_backend. */
#ifndef RP_CPU_INTERNAL_H
#define RP_CPU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu_quant.h"

typedef struct {
    int n_threads; /* exact OpenMP team size of every parallel op */
    /* Op scratch, sized by reserve (ops allocate nothing): `shared` for the
     * op running now, `per_thread` as n_threads blocks of thread_stride. */
    void *shared;
    size_t shared_bytes;
    void *per_thread;
    size_t thread_stride;
    rp_error error; /* the first op failure (sticky), reported by status */
    int decode_rows; /* set_decode_rows(RP_ROWS_DECODE): rows are independent decode tokens */
    int prefill_rows; /* set_decode_rows(RP_ROWS_PREFILL): f32 rows exact alone, any M */
    /* Low-precision weight matrices (cpu_qweights.c), sorted by key. */
    struct cpu_qweight *qweights;
    int n_qweights, cap_qweights;
    /* Their products' prepared x (cpu_quant.h), grown on first use. */
    rp_cpu_qx_workspace qx_ws;
} rp_cpu_impl;

/* cpu_qweights.c: the low-precision matrix registered under key w, or NULL
 * (cheap when none is registered). */
const void *cpu_qweight_find(const rp_backend *be, const float *w);
/* y [M,N] = x . W^T + beta y through rp_cpu_qmatmul when w is a key (1), else 0. */
int cpu_qweight_matmul(rp_backend *be, float *y, const float *x, const float *w, int M, int N,
                       int K, float beta);
/* Records a sticky error when w is a key (an op that cannot read quantized
 * weights was given one); returns 1 then. */
int cpu_qweight_refuse(rp_backend *be, const float *w, const char *op);
void cpu_qweights_install(rp_backend *be);
void cpu_qweights_free_all(rp_backend *be);

/* Below this many elements (or multiply-adds for GEMMs) an op runs on one
 * thread: forking the team costs about as much as the work. */
#define RP_CPU_PARALLEL_MIN_WORK ((size_t)1 << 15)

static inline int cpu_threads(const rp_backend *be) {
    return ((const rp_cpu_impl *)be->impl)->n_threads;
}

/* Team size for an op over `work` elements (or multiply-adds). */
static inline int cpu_team(const rp_backend *be, size_t work) {
    return work < RP_CPU_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
}

/* ---- op scratch ----
 * Bytes each op needs, used by the op and by reserve alike. */
static inline size_t cpu_key_prepare_backward_scratch(int R, int C, int N) {
    return 2 * ((size_t)R * (size_t)(C / N) + 1) * sizeof(float); /* inv, proj [R,H] */
}
static inline size_t cpu_bonus_gate_backward_scratch(int R, int C, int N) {
    return ((size_t)R * (size_t)(C / N) + 1) * sizeof(float); /* ds [R,H] */
}
static inline size_t cpu_wkv7_train_scratch(int n_seq) { /* first [n_seq+1], 3 ints/seq */
    return ((size_t)n_seq + 1) * sizeof(size_t) + 3 * ((size_t)n_seq + 1) * sizeof(int);
}
static inline size_t cpu_wkv7_backward_thread_scratch(int N) { /* one chunk's states + 11 [N] */
    return ((RP_WKV_CHUNK + 1) * (size_t)N * N + 11 * (size_t)N) * sizeof(float);
}

/* The shared scratch when it holds `bytes`; otherwise NULL after recording
 * in the context (status reports it) that `op` ran beyond the reservation,
 * and the op must return without touching its outputs. */
void *cpu_scratch(rp_backend *be, size_t bytes, const char *op);
/* The same for per-thread blocks: thread t owns [t * thread_stride, + bytes). */
char *cpu_thread_scratch(rp_backend *be, size_t bytes, const char *op);
/* The per-thread blocks grown to hold `bytes` each if they do not (the
 * decode matmul's W panels, whose size depends on K, which reserve does not
 * know: the first call of a shape allocates, later ones reuse); NULL when
 * that allocation fails (the caller has a slower path needing none). */
char *cpu_thread_scratch_at_least(rp_backend *be, size_t bytes);

/* ---- vectorisable float math ------------------------------------------------
 * glibc's expf/tanhf are scalar calls that gcc cannot vectorise without
 * -ffast-math (measured: tanhf ~11 ns/element, 9x slower than the code below
 * under -O3 -march=native). These are Cephes-style range reduction plus
 * polynomial, branch-free so that `#pragma omp simd` loops vectorise them.
 * Max relative error ~2e-7 over the clamped range. */

/* Fused multiply-add where the CPU has one; elsewhere (a --disable-native
 * build) fmaf would be a libm call ~40x slower than the multiply and add it
 * replaces, so use those (last-bit differences only). */
#if defined(__FMA__) || defined(__aarch64__)
#define cpu_fmaf(a, b, c) __builtin_fmaf((a), (b), (c))
#else
static inline float cpu_fmaf(float a, float b, float c) { return a * b + c; }
#endif

/* exp(x) for x clamped to [-87, 88]: below, results are ~1.6e-38 instead of
 * underflowing; above, ~1.65e38 instead of overflowing. Every caller (sigmoid,
 * tanh, decay) saturates long before either end matters. */
static inline float cpu_expf(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    /* x = n ln2 + r, |r| <= ln2/2; ln2 split in a high part exact in float
     * and a low correction (Cody-Waite) so r keeps full precision. */
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = cpu_fmaf(n, -0.693359375f, x);
    r = cpu_fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = cpu_fmaf(p, r, 1.3981999507e-3f);
    p = cpu_fmaf(p, r, 8.3334519073e-3f);
    p = cpu_fmaf(p, r, 4.1665795894e-2f);
    p = cpu_fmaf(p, r, 1.6666665459e-1f);
    p = cpu_fmaf(p, r, 5.0000001201e-1f);
    p = cpu_fmaf(p, r * r, r + 1.0f);
    /* NaN in gives NaN out through p; the exponent must not convert NaN to
     * an integer (undefined behaviour), so it uses 0 then. */
    n = n == n ? n : 0.0f;
    union { int32_t i; float f; } scale; /* 2^n built in the exponent field */
    scale.i = ((int32_t)n + 127) * (1 << 23);
    return p * scale.f;
}

static inline float cpu_sigmoidf(float x) { return 1.0f / (1.0f + cpu_expf(-x)); }
/* relu(t)^2: cpu_bias_act's and the quantized decode FFN chain's one
 * expression (the chain promises the bits of bias_act). */
static inline float cpu_relu_squaredf(float t) { return t > 0.0f ? t * t : 0.0f; }

/* tanh: an odd polynomial for |x| < 0.625, where 1 - 2/(e^2x + 1) would lose
 * relative precision to cancellation, and the exp form outside. */
static inline float cpu_tanhf(float x) {
    float ax = x < 0.0f ? -x : x;
    float z = x * x;
    float p = -5.70498872745e-3f;
    p = cpu_fmaf(p, z, 2.06390887954e-2f);
    p = cpu_fmaf(p, z, -5.37397155531e-2f);
    p = cpu_fmaf(p, z, 1.33314422036e-1f);
    p = cpu_fmaf(p, z, -3.33332819422e-1f);
    float small = cpu_fmaf(p * z, x, x);
    float big = 1.0f - 2.0f / (cpu_expf(2.0f * ax) + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax < 0.625f ? small : big;
}

/* RWKV-7 decay d = exp(-e^-0.5 * sigmoid(w_raw)), in (0.545, 1). */
static inline float cpu_decayf(float w_raw) {
    return cpu_expf(-0.6065306597126334f * cpu_sigmoidf(w_raw));
}

/* ---- explicit vectors ------------------------------------------------------
 * For dot products: after an `omp simd reduction` loop gcc adds the lanes one
 * by one through the stack, which dominated short (64-long) dot products.
 * Eight floats in a generic GCC vector are one AVX2 register (half an
 * AVX-512 one, which Zen 4 splits in two anyway); gcc lowers them on targets
 * without 256-bit vectors. Loads and stores go through an unaligned,
 * may_alias twin type (as GCC's own __m256_u): any float pointer works.
 * Macros and pointer arguments rather than vectors passed by value, which
 * draw ABI notes (-Wpsabi) when building without -march flags. */
typedef float cpu_v8 __attribute__((vector_size(32)));
typedef float cpu_v8_unaligned __attribute__((vector_size(32), aligned(4), may_alias));

#define CPU_V8_LOAD(p) ((cpu_v8)(*(const cpu_v8_unaligned *)(p)))
#define CPU_V8_STORE(p, v) (*(cpu_v8_unaligned *)(p) = (v))

/* 16 floats: one AVX-512 register (two AVX2 ones where gcc has no 512-bit
 * vectors). Same unaligned, may_alias load twin as cpu_v8. */
typedef float cpu_v16 __attribute__((vector_size(64)));
typedef float cpu_v16_unaligned __attribute__((vector_size(64), aligned(4), may_alias));
#define CPU_V16_LOAD(p) ((cpu_v16)(*(const cpu_v16_unaligned *)(p)))
#define CPU_V16_STORE(p, v) (*(cpu_v16_unaligned *)(p) = (v))

/* Sum of the lanes as a tree, (0+4)+(2+6) + (1+5)+(3+7): a fixed order and
 * a short dependency chain (one vector add of the halves, then scalars). */
static inline float cpu_v8_sum(const cpu_v8 *v) {
    typedef float cpu_v4 __attribute__((vector_size(16)));
    cpu_v4 lo, hi;
    memcpy(&lo, v, sizeof lo);
    memcpy(&hi, (const char *)v + sizeof lo, sizeof hi);
    const cpu_v4 s = lo + hi;
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* ---- each file installs its ops (and only those) into the vtable ---- */
void cpu_matmul_install(rp_backend *be);
void cpu_elementwise_install(rp_backend *be);
void cpu_backward_install(rp_backend *be);
void cpu_wkv7_install(rp_backend *be);
void cpu_loss_install(rp_backend *be);
void cpu_decode_install(rp_backend *be);

#endif
