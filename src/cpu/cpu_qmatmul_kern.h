/* Internal to cpu_qmatmul*.c: the per-ISA decode kernels (few rows of x, W
 * streamed once) and W-row wideners (prefill tiles). Each ISA's functions
 * live in their own file, compiled for that ISA with target pragmas, and run
 * only where cpu_features.c found it. */
#ifndef RP_CPU_QMATMUL_KERN_H
#define RP_CPU_QMATMUL_KERN_H

#include "cpu/cpu_quant.h"

/* x as the kernels read it, prepared once per call. */
typedef struct {
    const float *x;      /* [M,K] f32 */
    const uint16_t *xb;  /* BF16DOT: x rounded to bf16 [M,K] */
    const uint8_t *xu;   /* VNNI: rp_q8_quantize_x's q + 128 [M,K], cpu_qvnni_pos order */
    const float *xse;    /* VNNI: its scales, each repeated 4 times [M, K/8] */
    const float *xs;     /* VNNI: its scales, one per block [M, K/32] */
    const float *xg;     /* VNNI on Q8ROW: x's scales per group [M, cpu_qrow_groups(K)]
                          * (xu then holds q, int8, in k order) */
    const int32_t *xc;   /* VNNI on Q8ROW: -128 sum(q) per group [M, cpu_qrow_groups(K)] */
} cpu_qx;

static inline int cpu_qrow_groups(int K) {
    return (K + RP_Q8ROW_XGROUP - 1) / RP_Q8ROW_XGROUP;
}

/* y[m, n] = dot(x row m, W row n) (+ beta y) for m < M <= 8, n in [n0, n1). */
typedef void (*cpu_qdecode_fn)(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0,
                               int n1, float beta);
/* out [(n1 - n0), K] = W rows [n0, n1) widened to f32 (rp_qmatrix_row_f32's values). */
typedef void (*cpu_qwiden_fn)(const rp_qmatrix *w, int n0, int n1, float *out);

void cpu_qdecode_generic(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                         float beta);
void cpu_qwiden_generic(const rp_qmatrix *w, int n0, int n1, float *out);

#if defined(__x86_64__)
#define RP_CPU_QKERN_X86 1

/* RP_ISA_BEGIN("avx2,fma") ... RP_ISA_END: the functions between are
 * compiled for that ISA whatever -march says. clang ignores GCC's target
 * pragmas and gcc has no attribute push, so each compiler gets its own. */
#define RP_ISA_PRAGMA(p) _Pragma(#p)
#ifdef __clang__
#define RP_ISA_BEGIN(isa) \
    RP_ISA_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define RP_ISA_END RP_ISA_PRAGMA(clang attribute pop)
#else
#define RP_ISA_BEGIN(isa) RP_ISA_PRAGMA(GCC push_options) RP_ISA_PRAGMA(GCC target(isa))
#define RP_ISA_END RP_ISA_PRAGMA(GCC pop_options)
#endif
void cpu_qdecode_avx2(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                      float beta);
void cpu_qwiden_avx2(const rp_qmatrix *w, int n0, int n1, float *out);
void cpu_qdecode_avx512(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                        float beta);
void cpu_qwiden_avx512(const rp_qmatrix *w, int n0, int n1, float *out);
/* sums[i] = the 16 floats v[16 i .. 16 i + 15] added in the order every
 * AVX-512 decode kernel reduces its accumulators (lane l + lane l + 8,
 * then + l + 4, + l + 2, + l + 1: _mm512_reduce_add_ps's order with GCC),
 * i < n, through the kernels' transposing reduction; for the tests. */
void cpu_qhsum_avx512(float *sums, const float *v, int n);
void cpu_qdecode_bf16dot(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                         float beta);
/* n values of x rounded as rp_f32_to_bf16 (the same bits), for bf16dot. */
void cpu_qprep_bf16dot(uint16_t *xb, const float *x, size_t n);
void cpu_qdecode_vnni(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                      float beta);
/* One row of x as the vnni kernel reads it (cpu_qx's xu, xse and xs), the
 * bytes and scales rp_q8_quantize_x gives; K a multiple of RP_Q8_BLOCK. */
void cpu_qprep_vnni(uint8_t *xu, float *xse, float *xs, const float *x, int K);
/* Q8ROW W (its packed form: w->packed must be set) against x quantized per
 * RP_Q8ROW_XGROUP k (cpu_qx's xu, xc and xg). */
void cpu_qdecode_vnnirow(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                         float beta);
/* One row of x as cpu_qdecode_vnnirow reads it: rp_q8_quantize_x_group(..,
 * RP_Q8ROW_XGROUP)'s q in k order (xq [K]), -128 sum(q) per group (xc) and
 * the scales (xg); K a multiple of RP_Q8_BLOCK. */
void cpu_qprep_vnnirow(int8_t *xq, int32_t *xc, float *xg, const float *x, int K);
#endif

/* Where x[k] lies in the vnni kernel's xu row: per group of 4 blocks (128 k;
 * the last group holds r = 1..4 blocks), the first 16 bytes of each of its
 * blocks, then their last 16, so one 64-byte load gives each of 4 blocks 4
 * lanes and two vpdpbusd fill a lane with 8 products of one block. */
static inline size_t cpu_qvnni_pos(int K, int k) {
    const int g = k / (4 * RP_Q8_BLOCK), b = k % (4 * RP_Q8_BLOCK) / RP_Q8_BLOCK;
    const int h = k % RP_Q8_BLOCK / 16, i = k % 16, nb = K / RP_Q8_BLOCK;
    const int r = nb - 4 * g < 4 ? nb - 4 * g : 4;
    return (size_t)g * 4 * RP_Q8_BLOCK + (size_t)h * 16 * r + (size_t)b * 16 + i;
}

#endif
