/* The CPU backend's matmul on low-precision weights (cpu_quant.h). This
 * first version widens one weight row at a time to f32 and sums in a fixed
 * order: correct and thread-count independent, not yet fast (the SIMD
 * kernels with run-time dispatch replace its inner loop). */
#include "config.h"

#include <omp.h>
#include <stdlib.h>

#include "cpu/cpu_quant.h"

void rp_cpu_qmatmul(const rp_qmatrix *w, float *y, const float *x, int M, float beta,
                    int n_threads) {
    const int N = w->N, K = w->K;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        float row[K > 0 ? K : 1];
        rp_qmatrix_row_f32(w, n, row);
        for (int m = 0; m < M; m++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += row[k] * x[(size_t)m * K + k];
            float *yi = y + (size_t)m * N + n;
            *yi = beta == 0.0f ? s : s + beta * *yi;
        }
    }
}
