/* The f32 decode kernel (cpu_matmul_decode.c): y = x . W^T for decode rows,
 * W [N,K], every output summed in one order whatever the number of rows,
 * the thread count or the ISA path taken (see the .c file). */
#ifndef RP_CPU_MATMUL_DECODE_H
#define RP_CPU_MATMUL_DECODE_H

#include <stddef.h>

/* Outputs per packed panel, and the floats of one thread's pack buffer. */
#define CPU_DECODE_PANEL 32
static inline size_t cpu_matmul_decode_pack_floats(int K) {
    return (size_t)CPU_DECODE_PANEL * (size_t)K;
}

/* y[m, n] = sum_k x[m, k] W[n, k] (+ beta y[m, n]) for m < M, n in [n0, n1);
 * y, x rows N and K apart. `pack` holds cpu_matmul_decode_pack_floats(K)
 * floats (64-byte aligned) or is NULL (a slow path with the same bits). */
void cpu_matmul_decode(float *y, const float *x, const float *w, int M, int n0, int n1, int N,
                       int K, float beta, float *pack);

#endif
