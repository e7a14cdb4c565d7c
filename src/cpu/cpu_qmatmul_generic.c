/* The portable decode kernel and widener of the quantized matmul (any CPU,
 * any format): W row widened by the format's own definition, then 16
 * partial sums over k, the same order the AVX-512 widening kernel uses.
 * Compiled with the library's flags (no ISA pragma). */
#include "config.h"

#include "cpu/cpu_qmatmul_kern.h"

#define LANES 16

void cpu_qwiden_generic(const rp_qmatrix *w, int n0, int n1, float *out) {
    for (int n = n0; n < n1; n++) rp_qmatrix_row_f32(w, n, out + (size_t)(n - n0) * w->K);
}

void cpu_qdecode_generic(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                         float beta) {
    const int N = w->N, K = w->K;
    float row[K > 0 ? K : 1];
    for (int n = n0; n < n1; n++) {
        rp_qmatrix_row_f32(w, n, row);
        for (int m = 0; m < M; m++) {
            const float *xm = x->x + (size_t)m * K;
            float acc[LANES] = {0};
            int k = 0;
            for (; k + LANES <= K; k += LANES)
                for (int l = 0; l < LANES; l++) acc[l] += row[k + l] * xm[k + l];
            for (int l = 0; k + l < K; l++) acc[l] += row[k + l] * xm[k + l];
            for (int width = LANES / 2; width > 0; width /= 2)
                for (int l = 0; l < width; l++) acc[l] += acc[l + width];
            float *yi = y + (size_t)m * N + n;
            *yi = beta == 0.0f ? acc[0] : acc[0] + beta * *yi;
        }
    }
}
