/* The f32 decode kernel (cpu_matmul_decode.c): y = x . W^T for decode rows,
 * W [N,K], every output summed in one order whatever the number of rows,
 * the thread count or the ISA path taken (see the .c file). */
#ifndef RP_CPU_MATMUL_DECODE_H
#define RP_CPU_MATMUL_DECODE_H

#include <stddef.h>

/* Outputs per packed panel. */
#define CPU_DECODE_PANEL 32

/* The most floats of x transposed for the lanes kernel (AVX-512, 30-64
 * rows: x transposed once per call instead of W per panel; the .c file). */
#ifndef CPU_DECODE_LANES_MAX_FLOATS
#define CPU_DECODE_LANES_MAX_FLOATS ((size_t)192 * 1024) /* 768 KiB */
#endif

/* The floats of one thread's buffer for an M-row product of depth K: the
 * panel buffer, or x transposed where M rows take the lanes kernel. */
size_t cpu_matmul_decode_pack_floats(int M, int K);

/* y[m, n] = sum_k x[m, k] W[n, k] (+ beta y[m, n]) for m < M, n in [n0, n1);
 * y, x rows N and K apart. `pack` holds pack_floats floats (64-byte aligned;
 * at least cpu_matmul_decode_pack_floats(1, K)) or is NULL (a slow path
 * with the same bits); with fewer than cpu_matmul_decode_pack_floats(M, K)
 * the panel kernel runs (the same bits). */
void cpu_matmul_decode(float *y, const float *x, const float *w, int M, int n0, int n1, int N,
                       int K, float beta, float *pack, size_t pack_floats);

#endif
