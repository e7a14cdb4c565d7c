/* Dense ops of the CPU backend: matmul_linear (nn.Linear, W [N,K]) and
 * matmul_lora (W [K,N]). The backend splits the output over its OpenMP threads
 * (blocks of columns, or of rows when x is the bigger operand) and each
 * thread runs its block alone: sgemm with OpenBLAS kept single-threaded for
 * many rows (prefill, training), a kernel that streams W once for a few rows
 * (decode), where the GEMM is bound by reading the weights from memory.
 * Called through the rp_backend vtable. */
#include "config.h"

#include <cblas.h>
#include <omp.h>
#include <string.h>

#include "cpu/cpu_backend.h"

/* Slice boundaries are multiples of this, so every slice but the last keeps
 * whole register tiles of the BLAS kernels (16 floats = one AVX-512 vector,
 * two AVX2 vectors) and its y block starts on a 64-byte boundary. */
#define CPU_MATMUL_SLICE_ALIGN 16

typedef enum { CPU_W_OUT_IN, CPU_W_IN_OUT } cpu_weight_layout; /* W [N,K] or W [K,N] */

/* Few rows of x: the GEMM is bound by reading W, and the kernels below read
 * it once, front to back. OpenBLAS packs W for every sgemm, and its sgemv
 * reads several rows at a time; both were measured at ~7-14 GB/s from DRAM
 * on one core where one sequential stream reaches ~24 GB/s. Where the
 * streaming kernels stop winning (measured, one core, W read from DRAM):
 * W [N,K] up to 8 rows of x; W [K,N] (LoRA) 1 row, or up to 4 when K is
 * large (short K, long N rows lose to sgemm's register blocking). */
static int cpu_matmul_streams(cpu_weight_layout layout, int M, int K) {
    if (layout == CPU_W_OUT_IN) return M <= 8;
    return M == 1 || (M <= 4 && K >= 256);
}

/* sums[m] = dot(w [K], x row m) for m < rows <= 4, x rows K apart. Two
 * accumulators per row hide the add latency; `rows` is a constant at every
 * call so the accumulators live in registers. The order of the additions
 * depends on K only. */
static inline __attribute__((always_inline)) void
cpu_dot_rows(float *restrict sums, const float *restrict w, const float *restrict x, int rows,
             int K) {
    cpu_v8 acc[4][2];
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = (cpu_v8){0};
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        const cpu_v8 w0 = CPU_V8_LOAD(w + k), w1 = CPU_V8_LOAD(w + k + 8);
        for (int m = 0; m < rows; m++) {
            acc[m][0] += w0 * CPU_V8_LOAD(x + (size_t)m * K + k);
            acc[m][1] += w1 * CPU_V8_LOAD(x + (size_t)m * K + k + 8);
        }
    }
    for (int m = 0; m < rows; m++) {
        const cpu_v8 total = acc[m][0] + acc[m][1];
        float s = cpu_v8_sum(&total);
        for (int kt = k; kt < K; kt++) s += w[kt] * x[(size_t)m * K + kt];
        sums[m] = s;
    }
}

/* y[m, n] = dot(x row m, W row n) (+ beta * y) for n in [n0, n1), W [N,K].
 * Each W row is read once from memory, front to back: one sequential stream
 * per thread is what reaches full bandwidth here (several interleaved row
 * streams measured ~40% slower). Up to four x rows per pass over the W row;
 * further passes re-read it from L1. */
static void cpu_stream_out_in(float *restrict y, const float *restrict x,
                              const float *restrict w, int M, int n0, int n1, int N, int K,
                              float beta) {
    for (int n = n0; n < n1; n++) {
        const float *wn = w + (size_t)n * K;
        for (int m = 0; m < M; m += 4) {
            float sums[4];
            const float *xm = x + (size_t)m * K;
            switch (M - m) {
            case 1: cpu_dot_rows(sums, wn, xm, 1, K); break;
            case 2: cpu_dot_rows(sums, wn, xm, 2, K); break;
            case 3: cpu_dot_rows(sums, wn, xm, 3, K); break;
            default: cpu_dot_rows(sums, wn, xm, 4, K); break;
            }
            for (int i = 0; i < 4 && m + i < M; i++) {
                float *yi = y + (size_t)(m + i) * N + n;
                *yi = beta == 0.0f ? sums[i] : sums[i] + beta * *yi;
            }
        }
    }
}

/* y[m, n0:n1] = sum_k x[m,k] W[k, n0:n1] (+ beta * y), W [K,N]: W rows are
 * streamed in order and added into the y slice, which stays in L1. */
static void cpu_stream_in_out(float *restrict y, const float *restrict x,
                              const float *restrict w, int M, int n0, int n1, int N, int K,
                              float beta) {
    const int width = n1 - n0;
    for (int m = 0; m < M; m++) {
        float *restrict ym = y + (size_t)m * N + n0;
        if (beta == 0.0f)
            memset(ym, 0, (size_t)width * sizeof *ym);
        else if (beta != 1.0f)
            for (int n = 0; n < width; n++) ym[n] *= beta;
    }
    for (int k = 0; k < K; k++) {
        const float *restrict wk = w + (size_t)k * N + n0;
        for (int m = 0; m < M; m++) {
            float *restrict ym = y + (size_t)m * N + n0;
            const float xk = x[(size_t)m * K + k];
#pragma omp simd
            for (int n = 0; n < width; n++) ym[n] += xk * wk[n];
        }
    }
}

/* Rows [0, m) and columns [n0, n1) of y = x . op(W) + beta * y, with y and x
 * pointing at the block's first row (row strides N and K). */
static void cpu_matmul_block(float *y, const float *x, const float *w, int m, int n0, int n1,
                             int N, int K, float beta, cpu_weight_layout layout) {
    if (cpu_matmul_streams(layout, m, K)) {
        if (layout == CPU_W_OUT_IN)
            cpu_stream_out_in(y, x, w, m, n0, n1, N, K, beta);
        else
            cpu_stream_in_out(y, x, w, m, n0, n1, N, K, beta);
    } else if (layout == CPU_W_OUT_IN) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n1 - n0, K, 1.0f, x, K,
                    w + (size_t)n0 * K, K, beta, y + n0, N);
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n1 - n0, K, 1.0f, x, K,
                    w + n0, N, beta, y + n0, N);
    }
}

/* [begin, end) of part `part` of `parts` over `total`, boundaries rounded up to
 * CPU_MATMUL_SLICE_ALIGN; trailing parts may be empty. */
static void cpu_slice(int total, int part, int parts, int *begin, int *end) {
    int chunk = (total + parts - 1) / parts;
    chunk = (chunk + CPU_MATMUL_SLICE_ALIGN - 1) / CPU_MATMUL_SLICE_ALIGN *
            CPU_MATMUL_SLICE_ALIGN;
    long b = (long)chunk * part, e = b + chunk;
    *begin = b < total ? (int)b : total;
    *end = e < total ? (int)e : total;
}

static void cpu_matmul(rp_backend *be, float *y, const float *x, const float *w, int M,
                       int N, int K, float beta, cpu_weight_layout layout) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* BLAS rejects lda = 0; the product is empty */
        for (size_t i = 0; i < (size_t)M * N; i++) y[i] = beta == 0.0f ? 0.0f : beta * y[i];
        return;
    }
    size_t work = (size_t)M * N * K;
    int nt = work < RP_CPU_PARALLEL_MIN_WORK * 2 ? 1 : cpu_threads(be);
    /* Splitting N makes every thread pack all of x, splitting M all of W:
     * duplicate the smaller operand. Decode (small M) always splits N. */
    int split_rows = M >= 4 * CPU_MATMUL_SLICE_ALIGN * nt && M > N;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int parts = omp_get_num_threads(), part = omp_get_thread_num(), b, e;
        if (split_rows) {
            cpu_slice(M, part, parts, &b, &e);
            if (e > b)
                cpu_matmul_block(y + (size_t)b * N, x + (size_t)b * K, w, e - b, 0, N, N, K,
                                 beta, layout);
        } else {
            cpu_slice(N, part, parts, &b, &e);
            if (e > b) cpu_matmul_block(y, x, w, M, b, e, N, K, beta, layout);
        }
    }
}

void cpu_matmul_linear(rp_backend *be, float *y, const float *x, const float *w, int M,
                       int N, int K, float beta) {
    cpu_matmul(be, y, x, w, M, N, K, beta, CPU_W_OUT_IN);
}

void cpu_matmul_lora(rp_backend *be, float *y, const float *x, const float *w, int M,
                     int N, int K, float beta) {
    cpu_matmul(be, y, x, w, M, N, K, beta, CPU_W_IN_OUT);
}
