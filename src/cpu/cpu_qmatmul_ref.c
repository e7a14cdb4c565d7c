/* The double-precision reference of each quantized kernel (cpu_quant.h):
 * rp_qmatmul_ref with x rounded the way the kernel rounds it, so a test can
 * bound a kernel's own summation error apart from its input rounding. */
#include "config.h"

#include <stdlib.h>

#include "core/dtype.h"
#include "cpu/cpu_quant.h"

void rp_qmatmul_ref_q8row(const rp_qmatrix *w, float *y, const float *x, int M, float beta,
                          int G) {
    const int N = w->N, K = w->K, ng = (K + G - 1) / G;
    int8_t *xq = malloc((size_t)K + 1), *wr = malloc((size_t)K + 1);
    float *xs = malloc((size_t)(ng + 1) * sizeof *xs);
    if (!xq || !xs || !wr) abort(); /* test-only path: cannot report */
    for (int m = 0; m < M; m++) {
        rp_q8_quantize_x_group(xq, xs, x + (size_t)m * K, K, G);
        for (int n = 0; n < N; n++) {
            rp_qmatrix_row_q8(w, n, wr);
            double s = 0.0;
            for (int g = 0; g < ng; g++) {
                long d = 0;
                for (int i = g * G; i < K && i < (g + 1) * G; i++) d += (long)wr[i] * xq[i];
                s += (double)d * xs[g];
            }
            s *= w->row_scales[n];
            float *yi = y + (size_t)m * N + n;
            *yi = beta == 0.0f ? (float)s : (float)(s + (double)beta * (double)*yi);
        }
    }
    free(xq);
    free(wr);
    free(xs);
}

void rp_qmatmul_ref_kernel(rp_qkernel k, const rp_qmatrix *w, float *y, const float *x, int M,
                           float beta) {
    const int K = w->K;
    if (k == RP_QKERNEL_BF16DOT) {
        float *xr = malloc((size_t)M * K * sizeof *xr + 1);
        if (!xr) abort(); /* test-only path: cannot report */
        for (size_t i = 0; i < (size_t)M * K; i++) xr[i] = rp_bf16_to_f32(rp_f32_to_bf16(x[i]));
        rp_qmatmul_ref(w, y, xr, M, beta);
        free(xr);
    } else if (k == RP_QKERNEL_VNNI && w->type == RP_QTYPE_Q8ROW) {
        rp_qmatmul_ref_q8row(w, y, x, M, beta, RP_Q8ROW_XGROUP);
    } else if (k == RP_QKERNEL_VNNI && w->type == RP_QTYPE_Q8) {
        /* x = q * scale exactly in double: the reference of q . q' * s * s'. */
        const int N = w->N, nb = K / RP_Q8_BLOCK;
        int8_t *xq = malloc((size_t)K + 1);
        float *xs = malloc((size_t)(nb + 1) * sizeof *xs);
        if (!xq || !xs) abort();
        for (int m = 0; m < M; m++) {
            rp_q8_quantize_x(xq, xs, x + (size_t)m * K, K);
            for (int n = 0; n < N; n++) {
                const int8_t *wr = (const int8_t *)w->data + (size_t)n * K;
                double s = 0.0;
                for (int b = 0; b < nb; b++) {
                    long d = 0;
                    for (int i = 0; i < RP_Q8_BLOCK; i++)
                        d += (long)wr[b * RP_Q8_BLOCK + i] * xq[b * RP_Q8_BLOCK + i];
                    s += (double)d * rp_f16_to_f32(w->scales[(size_t)n * nb + b]) * xs[b];
                }
                float *yi = y + (size_t)m * N + n;
                *yi = beta == 0.0f ? (float)s : (float)(s + (double)beta * (double)*yi);
            }
        }
        free(xq);
        free(xs);
    } else {
        rp_qmatmul_ref(w, y, x, M, beta);
    }
}
