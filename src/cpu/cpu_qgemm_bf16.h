/* Internal to cpu_qmatmul.c: the prefill GEMM on bf16 and int8 weights with
 * AVX512_BF16 dot products (vdpbf16ps), x rounded to bf16 once per call. */
#ifndef RP_CPU_QGEMM_BF16_H
#define RP_CPU_QGEMM_BF16_H

#include "cpu/cpu_quant.h"

#if defined(__x86_64__)
/* y [M,N] = bf16(x) [M,K] . W^T + beta * y for W of type RP_QTYPE_BF16 or
 * RP_QTYPE_Q8 / RP_QTYPE_Q8ROW (q is exact in bf16; each 32-k block's dot
 * product is multiplied by its scale, Q8ROW's the row's), on n_threads OpenMP threads splitting N. Each y element is
 * summed in one order that depends only on K (pairs of k in order inside
 * blocks of 256 k, blocks added to y in order): the same bits whatever M,
 * the row's place in x and n_threads. Call it only where cpu_features.c
 * found AVX512_BF16. 0 on success; -1 (y untouched) when its buffers cannot
 * be allocated: the caller then runs another path. */
int cpu_qgemm_bf16(const rp_qmatrix *w, float *y, const float *x, int M, float beta,
                   int n_threads);
#endif

#endif
