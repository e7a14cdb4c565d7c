/* Plain elementwise helpers of the CPU backend that training needs beside
 * the forward ops (gradient accumulation). */
#include <omp.h>

#include "cpu/cpu_backend.h"

/* y [n] += x [n] */
void cpu_add(rp_backend *be, float *y, const float *x, size_t n) {
    int nt = n < RP_CPU_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
#pragma omp parallel for simd num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}
