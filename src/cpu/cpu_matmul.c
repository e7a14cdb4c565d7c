/* Dense ops of the CPU backend: matmul_linear (nn.Linear, W [N,K]) and
 * matmul_lora (W [K,N]). The backend splits the output over its OpenMP threads
 * (blocks of columns, or of rows when x is the bigger operand) and each
 * thread runs its block alone: sgemm with OpenBLAS kept single-threaded for
 * many rows (training), and for a few rows and for decode and inference
 * prefill rows of any count (set_decode_rows) kernels that read W once and
 * give each row the bits it gets alone (cpu_matmul_decode.c for W [N,K]).
 * Called through the rp_backend vtable. */
#include "config.h"

#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_internal.h"
#include "cpu/cpu_matmul_decode.h"

/* Slice boundaries are multiples of this, so every slice but the last keeps
 * whole register tiles of the BLAS kernels (16 floats = one AVX-512 vector,
 * two AVX2 vectors) and its y block starts on a 64-byte boundary. */
#define CPU_MATMUL_SLICE_ALIGN 16

/* Below this many multiply-adds a product runs on one thread. A GEMV of
 * 2^16 (the tiny model's FFN, ~10 us) ran slower on two threads than on one,
 * and under contention each team fork can wait a futex wake-up for a
 * descheduled partner (docs/perf/cpu.md, "Threads under contention"); from
 * 2^18 (1 MiB of fp32 weights) the split pays. Decode of the 0.1B shape
 * (768 x 768 and up) stays parallel. */
#define CPU_MATMUL_PARALLEL_MIN_WORK ((size_t)1 << 18)

typedef enum { CPU_W_OUT_IN, CPU_W_IN_OUT } cpu_weight_layout; /* W [N,K] or W [K,N] */

/* Few rows of x: the GEMM is bound by reading W, and the kernels below read
 * it once, front to back. OpenBLAS packs W for every sgemm, and its sgemv
 * reads several rows at a time; both were measured at ~7-14 GB/s from DRAM
 * on one core where one sequential stream reaches ~24 GB/s. Where the
 * streaming kernels stop winning (measured, one core, W read from DRAM):
 * W [N,K] up to 8 rows of x (cpu_matmul_decode.c, which also beats sgemm
 * at 16-64 rows: microbenchmark, Zen 5, 768 x 768, 64 rows 176 vs 90
 * GFLOP/s); W [K,N] (LoRA) streams up to 8 rows too (below). */
static int cpu_matmul_streams(int M, int exact_rows) {
    /* Decode rows (one token of a sequence each) and inference prefill
     * rows: any M streams, so a sequence's tokens do not depend on the group
     * it decodes in, and a prompt's rows not on the chunk or on the prompts
     * prefilled beside it (RP_ROWS_PREFILL, below). */
    if (exact_rows) return 1;
    /* Up to 8 rows both layouts stream (each row's sums in a fixed order),
     * so a few rows in one call also give each row its bits alone; the
     * [K,N] layout used sgemm from 2 rows when K < 256 (a little faster for
     * the LoRA up-projections), which put batched rows 1e-6 off their solo
     * values once the [N,K] kernel's sums became single FMA chains
     * (test_model_golden: a sequence independent of its batch neighbours). */
    return M <= 8;
}

/* y[m, n0:n1] = sum_k x[m,k] W[k, n0:n1] (+ beta * y), W [K,N]: for each
 * block of STREAM_ROWS rows and STREAM_COLS columns the sums stay in
 * registers (16 AVX-512 vectors for a whole block) while the W rows stream
 * by in k order. Every y[m, n] is init + x[m,0] W[0,n] + x[m,1] W[1,n] + ...
 * in that order (a product, then an add: no contraction in C11 mode), init =
 * 0, y or beta y, whatever the block, so a row has the bits it has alone,
 * and the bits the loop that added into the whole y slice once per k had.
 * That loop ran from L2 at 64 decode rows (the LoRA up-projections' slice at
 * 2 threads is 64 x 384 floats) and was ~6% of a 64-sequence decode step;
 * this one, measured (one core, thread CPU time, min of 20, alternated,
 * loaded machine): 64 rows x 384 columns, K = 64: 111 -> 42 us; 64 rows x 32
 * columns, K = 768: 116 -> 38 us. */
#define STREAM_ROWS 8
#define STREAM_COLS 32
static inline __attribute__((always_inline)) void
cpu_stream_block(float *restrict y, const float *restrict x, const float *restrict w, int m0,
                 int c0, const int rows, const int cols, int N, int K, float beta) {
    float acc[STREAM_ROWS][STREAM_COLS];
    for (int r = 0; r < rows; r++) {
        const float *yr = y + (size_t)(m0 + r) * N + c0;
        for (int n = 0; n < cols; n++)
            acc[r][n] = beta == 0.0f ? 0.0f : beta == 1.0f ? yr[n] : yr[n] * beta;
    }
    for (int k = 0; k < K; k++) {
        const float *restrict wk = w + (size_t)k * N + c0;
        for (int r = 0; r < rows; r++) {
            const float xk = x[(size_t)(m0 + r) * K + k];
#pragma omp simd
            for (int n = 0; n < cols; n++) acc[r][n] += xk * wk[n];
        }
    }
    for (int r = 0; r < rows; r++)
        memcpy(y + (size_t)(m0 + r) * N + c0, acc[r], (size_t)cols * sizeof(float));
}

/* The same sums with the y slice in L1 (W rows read in order, whole): the
 * faster form below a whole block of rows (batch 1: blocks of 32 columns
 * read W in 128-byte pieces with an N-float stride, and the whole model
 * decoded ~7% slower per token at 1 thread, quiet, alternated). */
static void cpu_stream_slice(float *restrict y, const float *restrict x,
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

static void cpu_stream_in_out(float *restrict y, const float *restrict x,
                              const float *restrict w, int M, int n0, int n1, int N, int K,
                              float beta) {
    if (M < STREAM_ROWS) {
        cpu_stream_slice(y, x, w, M, n0, n1, N, K, beta);
        return;
    }
    for (int m0 = 0; m0 < M; m0 += STREAM_ROWS) {
        const int rows = M - m0 < STREAM_ROWS ? M - m0 : STREAM_ROWS;
        for (int c0 = n0; c0 < n1; c0 += STREAM_COLS) {
            const int cols = n1 - c0 < STREAM_COLS ? n1 - c0 : STREAM_COLS;
            /* whole blocks with constant trip counts: the sums in registers */
            if (rows == STREAM_ROWS && cols == STREAM_COLS)
                cpu_stream_block(y, x, w, m0, c0, STREAM_ROWS, STREAM_COLS, N, K, beta);
            else
                cpu_stream_block(y, x, w, m0, c0, rows, cols, N, K, beta);
        }
    }
}

/* The decode kernel runs at most this many rows per pass over W: a panel
 * of W is multiplied by every row of the block, so the block's x (256 x K
 * floats: 768 KiB at K = 768) is re-read once per 32 columns; beyond L2 it
 * would stream from memory every panel. Pack cost per row is already small
 * at 256 (measured 768 x 768: 101 GFLOP/s at 256 rows, 104 at 512). */
#define CPU_STREAM_ROW_BLOCK 256

/* Rows [0, m) and columns [n0, n1) of y = x . op(W) + beta * y, with y and x
 * pointing at the block's first row (row strides N and K). `stream` is the
 * whole product's choice (cpu_matmul_streams of all its rows), not the
 * block's: a short last row slice must not switch kernels, or its rows
 * would get other bits than on another team size. */
static void cpu_matmul_block(float *y, const float *x, const float *w, int m, int n0, int n1,
                             int N, int K, float beta, cpu_weight_layout layout, int stream,
                             float *pack, size_t pack_floats) {
    if (stream) {
        if (layout == CPU_W_OUT_IN)
            /* Row blocks: each panel re-reads the block's x, which must stay
             * in L2 (bits are per row, whatever the block). */
            for (int r = 0; r < m; r += CPU_STREAM_ROW_BLOCK)
                cpu_matmul_decode(y + (size_t)r * N, x + (size_t)r * K, w,
                                  m - r < CPU_STREAM_ROW_BLOCK ? m - r : CPU_STREAM_ROW_BLOCK,
                                  n0, n1, N, K, beta, pack, pack_floats);
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

/* Row slices (the sgemm's rows of x and y) start at multiples of this.
 * OpenBLAS computes a row with different last bits depending on where it
 * falls in a call unless the call starts at a multiple of its kernel's row
 * grouping (measured, M=2048 N=128 K=128: Haswell's kernels give identical
 * rows for splits at multiples of 12, not at 1024 or 512; SkylakeX's at
 * every split of 64 rows or more), so with 24 (= 2 x 12, a multiple of
 * every smaller unroll) a row's bits do not depend on the thread count.
 * Column splits change them on Haswell's kernels whatever the alignment. */
#define CPU_MATMUL_ROW_SLICE_ALIGN 24

/* ... and every row slice must be big enough that the BLAS takes the kernel
 * it takes for the whole product: OpenBLAS's SkylakeX build sends small
 * products (measured: under ~64 rows at N=20 K=64) to a small-matrix kernel
 * with other bits. A tall product that cannot give each thread this much
 * runs as one call (a small one: under 2^21 multiply-adds a thread). */
#define CPU_MATMUL_MIN_ROW_SLICE_ROWS 64
#define CPU_MATMUL_MIN_ROW_SLICE_WORK ((size_t)1 << 21) /* multiply-adds */

/* [begin, end) of part `part` of `parts` over `total`, boundaries rounded up to
 * `align`; trailing parts may be empty. */
static void cpu_slice(int total, int part, int parts, int align, int *begin, int *end) {
    int chunk = (total + parts - 1) / parts;
    chunk = (chunk + align - 1) / align * align;
    long b = (long)chunk * part, e = b + chunk;
    *begin = b < total ? (int)b : total;
    *end = e < total ? (int)e : total;
}

/* Whether every non-empty row slice of an M-row product over `parts`
 * threads reaches CPU_MATMUL_MIN_ROW_SLICE_ROWS and _WORK. */
static int cpu_row_slices_are_big(int M, int N, int K, int parts) {
    for (int part = 0; part < parts; part++) {
        int b, e;
        cpu_slice(M, part, parts, CPU_MATMUL_ROW_SLICE_ALIGN, &b, &e);
        if (e > b && (e - b < CPU_MATMUL_MIN_ROW_SLICE_ROWS ||
                      (size_t)(e - b) * N * K < CPU_MATMUL_MIN_ROW_SLICE_WORK))
            return 0;
    }
    return 1;
}

static void cpu_matmul(rp_backend *be, float *y, const float *x, const float *w, int M,
                       int N, int K, float beta, cpu_weight_layout layout) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* BLAS rejects lda = 0; the product is empty */
        for (size_t i = 0; i < (size_t)M * N; i++) y[i] = beta == 0.0f ? 0.0f : beta * y[i];
        return;
    }
    size_t work = (size_t)M * N * K;
    int nt = work < CPU_MATMUL_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
    /* Splitting N makes every thread pack all of x, splitting M all of W:
     * duplicate the smaller operand. Decode (small M) always splits N. The
     * choice depends on the shape only, and a tall product is split into
     * rows or not at all, so its bits do not depend on the team size. */
    const int split_rows = M > N;
    const rp_cpu_impl *impl = be->impl;
    const int stream = cpu_matmul_streams(M, impl->decode_rows || impl->prefill_rows);
    /* (Streamed rows are independent of the slicing: only sgemm's need it.) */
    if (split_rows && !stream && !cpu_row_slices_are_big(M, N, K, nt)) nt = 1;
    /* The decode kernel's per-thread panel buffers, in the backend's
     * per-thread scratch: an allocation per call (384 KiB a thread at
     * K = 3072, past malloc's mmap threshold) cost page faults and zeroing
     * on every matmul. NULL if it cannot grow: the kernel then reads W
     * directly, slower, same bits. */
    char *packs = NULL;
    size_t pack_stride = 0, pack_floats = 0;
    if (stream && layout == CPU_W_OUT_IN && nt <= ((const rp_cpu_impl *)be->impl)->n_threads) {
        /* Sized for the first row block (a thread's rows where rows split):
         * a smaller block that needs more falls back to the panel kernel,
         * the same bits. */
        pack_floats = cpu_matmul_decode_pack_floats(
            M < CPU_STREAM_ROW_BLOCK ? M : CPU_STREAM_ROW_BLOCK, K);
        packs = cpu_thread_scratch_at_least(be, pack_floats * sizeof(float));
        pack_stride = ((const rp_cpu_impl *)be->impl)->thread_stride;
        if (!packs) pack_floats = 0;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int parts = omp_get_num_threads(), part = omp_get_thread_num(), b, e;
        float *pack = packs ? (float *)(packs + (size_t)part * pack_stride) : NULL;
        if (split_rows) {
            cpu_slice(M, part, parts, CPU_MATMUL_ROW_SLICE_ALIGN, &b, &e);
            if (e > b)
                cpu_matmul_block(y + (size_t)b * N, x + (size_t)b * K, w, e - b, 0, N, N, K,
                                 beta, layout, stream, pack, pack_floats);
        } else {
            cpu_slice(N, part, parts, CPU_MATMUL_SLICE_ALIGN, &b, &e);
            if (e > b)
                cpu_matmul_block(y, x, w, M, b, e, N, K, beta, layout, stream, pack,
                                 pack_floats);
        }
    }
}

static void cpu_matmul_linear(rp_backend *be, float *y, const float *x, const float *w, int M,
                       int N, int K, float beta) {
    /* A low-precision matrix (bf16/int8 weights, cpu_qweights.c). */
    if (cpu_qweight_matmul(be, y, x, w, M, N, K, beta)) return;
    cpu_matmul(be, y, x, w, M, N, K, beta, CPU_W_OUT_IN);
}

static void cpu_matmul_lora(rp_backend *be, float *y, const float *x, const float *w, int M,
                     int N, int K, float beta) {
    if (cpu_qweight_refuse(be, w, "matmul_lora")) return;
    cpu_matmul(be, y, x, w, M, N, K, beta, CPU_W_IN_OUT);
}

/* ---- backward (training) ---- */

/* GEMM tiles of the backward: big enough to run at full sgemm speed
 * (measured 128 x 128: same GFLOP/s as one call), small enough to share a
 * [768, 768] weight gradient between 36 threads. */
#define GEMM_TILE 128

/* Cm [rows, cols] = op(A) [rows, depth] . op(B) [depth, cols] + beta Cm (row-major),
 * one sgemm per GEMM_TILE x GEMM_TILE tile of Cm, tiles dealt to threads.
 * The tiles depend on the shape only: OpenBLAS kernels (Haswell's, for one)
 * give an element different bits depending on the size of the block it is
 * computed in, so slicing by thread count would make gradients depend on
 * it. The depth (the reduction) is never split. */
static void gemm_accumulate_tiled(rp_backend *be, CBLAS_TRANSPOSE trans_a,
                                  CBLAS_TRANSPOSE trans_b, int rows, int cols, int depth,
                                  const float *A, int lda, const float *B, int ldb, float *Cm,
                                  int ldc, float beta) {
    const int tiles_r = (rows + GEMM_TILE - 1) / GEMM_TILE;
    const int tiles_c = (cols + GEMM_TILE - 1) / GEMM_TILE;
    const long tiles = (long)tiles_r * tiles_c;
    int nt = cpu_team(be, (size_t)rows * cols * depth);
    if (nt > tiles) nt = (int)tiles;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(dynamic, 1)
    for (long t = 0; t < tiles; t++) {
        const int r0 = (int)(t / tiles_c) * GEMM_TILE, c0 = (int)(t % tiles_c) * GEMM_TILE;
        const int nr = rows - r0 < GEMM_TILE ? rows - r0 : GEMM_TILE;
        const int nc = cols - c0 < GEMM_TILE ? cols - c0 : GEMM_TILE;
        const float *a_tile = trans_a == CblasNoTrans ? A + (size_t)r0 * lda : A + r0;
        const float *b_tile = trans_b == CblasNoTrans ? B + c0 : B + (size_t)c0 * ldb;
        cblas_sgemm(CblasRowMajor, trans_a, trans_b, nr, nc, depth, 1.0f, a_tile, lda, b_tile,
                    ldb, beta, Cm + (size_t)r0 * ldc + c0, ldc);
    }
}

/* forward: y [M,N] = x [M,K] . W^T, W [N,K]
 * backward: dx [M,K] = dy . W + beta dx (dx optional); dw [N,K] += dy^T . x (dw
 * optional: a zero-bubble schedule adds it later with dx NULL).
 * beta 0 gives the bits of beta 1 on a zeroed dx: sgemm scales C by beta
 * before it adds the product, and 0 + p = p. */
static void cpu_matmul_linear_backward_beta(rp_backend *be, float *dx, float *dw, const float *dy,
                                            const float *x, const float *w, int M, int N, int K,
                                            float beta) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    if (cpu_qweight_refuse(be, w, "matmul_linear_backward")) return;
    if (dx)
        gemm_accumulate_tiled(be, CblasNoTrans, CblasNoTrans, M, K, N, dy, N, w, K, dx, K, beta);
    if (dw)
        gemm_accumulate_tiled(be, CblasTrans, CblasNoTrans, N, K, M, dy, N, x, K, dw, K, 1.0f);
}

static void cpu_matmul_linear_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                       const float *x, const float *w, int M, int N, int K) {
    cpu_matmul_linear_backward_beta(be, dx, dw, dy, x, w, M, N, K, 1.0f);
}

/* forward: y [M,N] = x [M,K] . W, W [K,N] (LoRA factor)
 * backward: dx [M,K] = dy . W^T + beta dx (dx optional); dw [K,N] += x^T . dy */
static void cpu_matmul_lora_backward_beta(rp_backend *be, float *dx, float *dw, const float *dy,
                                          const float *x, const float *w, int M, int N, int K,
                                          float beta) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    if (cpu_qweight_refuse(be, w, "matmul_lora_backward")) return;
    if (dx)
        gemm_accumulate_tiled(be, CblasNoTrans, CblasTrans, M, K, N, dy, N, w, N, dx, K, beta);
    gemm_accumulate_tiled(be, CblasTrans, CblasNoTrans, K, N, M, x, K, dy, N, dw, N, 1.0f);
}

static void cpu_matmul_lora_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                     const float *x, const float *w, int M, int N, int K) {
    cpu_matmul_lora_backward_beta(be, dx, dw, dy, x, w, M, N, K, 1.0f);
}

/* RP_ROWS_DECODE: every matrix, f32 or low-precision, streams (the
 * low-precision kernels read decode_rows). RP_ROWS_PREFILL: the f32
 * matrices stream for any M (the decode kernel beats single-threaded sgemm
 * from 8 to at least 512 rows on the 0.1B shapes: docs/perf/serving.md,
 * "Prefill rows through the decode kernel"); low-precision matrices keep
 * their prefill kernels (bf16-rounded x), so their bits are unchanged. */
static void cpu_set_decode_rows(rp_backend *be, int on) {
    rp_cpu_impl *impl = be->impl;
    impl->decode_rows = on == RP_ROWS_DECODE;
    impl->prefill_rows = on == RP_ROWS_PREFILL;
}

void cpu_matmul_install(rp_backend *be) {
    be->set_decode_rows = cpu_set_decode_rows;
    be->matmul_linear = cpu_matmul_linear;
    be->matmul_lora = cpu_matmul_lora;
    be->matmul_linear_backward = cpu_matmul_linear_backward;
    be->matmul_lora_backward = cpu_matmul_lora_backward;
    be->matmul_linear_backward_beta = cpu_matmul_linear_backward_beta;
    be->matmul_lora_backward_beta = cpu_matmul_lora_backward_beta;
}
