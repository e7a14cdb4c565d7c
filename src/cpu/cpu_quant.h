/* Low-precision weight matrices for CPU inference (issue 20): the storage
 * formats, the reference quantizer and matmul that define their rounding,
 * and the fast matmul the backend runs (cpu_qmatmul.c, dispatched on the
 * CPU's features at run time). A quantized matrix is always stored as
 * nn.Linear stores it, W [N,K] (N outputs, K inputs): a W [K,N] tensor is
 * transposed when it is quantized, so every kernel reads rows along K.
 * Formats (docs/perf/cpu.md has the why):
 *   BF16: uint16 [N,K], round to nearest even (torch's .to(torch.bfloat16));
 *   Q8:   int8 [N,K] in blocks of RP_Q8_BLOCK along K, each with an fp16
 *         scale (scales fp16 [N, K/RP_Q8_BLOCK]); w = q * scale, q in
 *         [-127, 127], scale = max|w| / 127 of the block (llama.cpp's Q8_0
 *         with the scales kept apart so the int8 rows stay 64-byte aligned);
 *   Q8ROW: int8 [N,K] with one f32 scale per row (scales f32 [N]); w = q *
 *         scale, q in [-127, 127], scale = max|w| / 127 of the row: 1 byte
 *         per weight instead of 1.125, and a kernel's integer dot of a whole
 *         row needs one conversion (docs/perf/cpu.md, "Accuracy": what it
 *         costs against Q8's blocks). K a multiple of RP_Q8_BLOCK too (the
 *         kernels' 32-k steps; every shape we run).
 * These functions take host memory and never allocate. */
#ifndef RP_CPU_QUANT_H
#define RP_CPU_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef enum {
    RP_QTYPE_F32 = 0,
    RP_QTYPE_BF16 = 1,
    RP_QTYPE_Q8 = 2,
    RP_QTYPE_Q8ROW = 3
} rp_qtype;

#define RP_Q8_BLOCK 32

typedef struct {
    rp_qtype type;
    int N, K;                /* rows (outputs) and columns (inputs) */
    const void *data;        /* f32 / uint16 (bf16) / int8, [N,K] row-major */
    const uint16_t *scales;  /* Q8: fp16 [N, K / RP_Q8_BLOCK]; NULL otherwise */
    const float *row_scales; /* Q8ROW: f32 [N]; NULL otherwise */
    /* Q8ROW only: W in the vnni kernel's output-major order (rp_q8row_pos),
     * or NULL. The CPU backend keeps only this form (data NULL); any
     * function here reads whichever of data / packed is set (packed first). */
    const uint8_t *packed;
} rp_qmatrix;

/* Q8ROW's packed (output-major) order: W rows in blocks of 16, each block
 * K/4 chunks of 64 bytes, chunk c's 4-byte lane j holding W[16b + j][4c ..
 * 4c + 3] as unsigned w + 128. One vpdpbusd of a chunk against 4 bytes of x
 * broadcast adds 4 k of 16 outputs, so the kernels need no horizontal sums
 * (docs/perf/cpu.md, "int8row output-major"). N is padded to a multiple of
 * 16 with zero rows (byte 128). */
#define RP_Q8ROW_PACK_ROWS 16
static inline size_t rp_q8row_pos(int K, int n, int k) {
    return (size_t)(n / RP_Q8ROW_PACK_ROWS) * RP_Q8ROW_PACK_ROWS * (size_t)K +
           (size_t)(k / 4) * 4 * RP_Q8ROW_PACK_ROWS + (size_t)(n % RP_Q8ROW_PACK_ROWS) * 4 +
           (size_t)(k % 4);
}
/* Bytes of the packed form of a [N,K] Q8ROW matrix (N rounded up to 16). */
size_t rp_q8row_packed_bytes(int N, int K);
/* Rows [row0, row0 + n_rows) of W (q, int8 row-major [n_rows, K]) into the
 * packed form; with row0 + n_rows == N the padding rows are zeroed too. */
void rp_q8row_pack_rows(uint8_t *packed, const int8_t *rows, int row0, int n_rows, int N, int K);
/* The padding rows [N, N rounded up to 16) of a packed form set to zero weight. */
void rp_q8row_pack_pad(uint8_t *packed, int N, int K);
/* Row n's q (out [K]) of a Q8 or Q8ROW matrix, from data or packed. */
void rp_qmatrix_row_q8(const rp_qmatrix *w, int n, int8_t *out);

/* "f32", "bf16", "int8", "int8row". */
const char *rp_qtype_name(rp_qtype type);
/* 0 and *out for "f32"/"fp32", "bf16", "int8"/"q8", "int8row"; -1 otherwise. */
int rp_qtype_from_name(const char *name, rp_qtype *out);
/* Whether a [N,K] matrix can be stored as `type` (Q8, Q8ROW need K % RP_Q8_BLOCK == 0). */
int rp_qtype_fits(rp_qtype type, int K);
/* Bytes of data and of scales for a [N,K] matrix of `type`. */
size_t rp_qmatrix_data_bytes(rp_qtype type, int N, int K);
size_t rp_qmatrix_scale_bytes(rp_qtype type, int N, int K);

/* Quantizes w [N,K] (w_in_out 0) or w [K,N] (w_in_out 1, transposed on the
 * way) into data/scales sized by the functions above (scales: Q8's fp16
 * [N, K/32] or Q8ROW's f32 [N]). The rounding here IS the format: the
 * kernels and the tests take it from this function. */
void rp_quantize_matrix(rp_qtype type, void *data, void *scales, const float *w, int N, int K,
                        int w_in_out);
/* The rp_qmatrix of data/scales as rp_quantize_matrix fills them. */
rp_qmatrix rp_qmatrix_make(rp_qtype type, int N, int K, const void *data, const void *scales);
/* Row n of W widened to f32 (out [K]): exactly the values the format holds. */
void rp_qmatrix_row_f32(const rp_qmatrix *w, int n, float *out);

/* Reference: y [M,N] = x [M,K] . dequant(W)^T + beta * y with products and
 * sums in double, rounded to f32 once. Slow; the tests' ground truth. */
void rp_qmatmul_ref(const rp_qmatrix *w, float *y, const float *x, int M, float beta);

/* The prepared x of the products below (x rounded to bf16 or quantized
 * per block, for the dot kernels): one buffer that grows to the largest
 * call and is kept, so that a decode step (~50 products a token) does not
 * allocate. The caller owns it: the CPU backend keeps one in its context
 * (cpu_internal.h), freed with the backend. Zeroed = empty; one call at a
 * time uses it (the call's OpenMP team reads it). Every product takes one
 * as ws; NULL: a buffer for that call only. */
typedef struct {
    char *mem;
    size_t cap;
} rp_cpu_qx_workspace;
void rp_cpu_qx_workspace_free(rp_cpu_qx_workspace *ws);

/* The backend's kernel (cpu_qmatmul.c): y [M,N] = x [M,K] . W^T + beta * y,
 * beta 0 or 1, on n_threads OpenMP threads. Each y element has one summation
 * order whatever n_threads and M (results are thread-count independent). */
void rp_cpu_qmatmul(rp_cpu_qx_workspace *ws, const rp_qmatrix *w, float *y, const float *x,
                    int M, float beta, int n_threads);

/* ---- kernels by name (cpu_qmatmul.c): tests, benchmarks, RP_CPU_ISA ----
 * Every kernel gives each y element one summation order whatever n_threads
 * and whichever M <= RP_QMATMUL_DECODE_ROWS rows share the call; above that
 * (prefill) bf16dot and vnni run a bf16 GEMM (x rounded to bf16, vnni's only
 * where the CPU has AVX512_BF16: cpu_qgemm_bf16.c), the others widen blocks
 * of W to f32 and run sgemm on them. */
#define RP_QMATMUL_DECODE_ROWS 8

typedef enum {
    RP_QKERNEL_GENERIC = 0,  /* portable C, W widened to f32 */
    RP_QKERNEL_AVX2 = 1,     /* W widened to f32, FMA with f32 x */
    RP_QKERNEL_AVX512 = 2,   /* the same on 16 lanes */
    RP_QKERNEL_BF16DOT = 3,  /* BF16 only: x rounded to bf16 per call, vdpbf16ps */
    RP_QKERNEL_VNNI = 4,     /* Q8 only: x quantized per block (rp_q8_quantize_x), vpdpbusd */
    RP_QKERNEL_COUNT = 5
} rp_qkernel;

const char *rp_qkernel_name(rp_qkernel k);
/* Whether kernel k handles `type` and runs on this CPU (ignores RP_CPU_ISA). */
int rp_qkernel_available(rp_qkernel k, rp_qtype type);
/* The kernel rp_cpu_qmatmul runs for `type`: the measured best (docs/perf/
 * cpu.md) among those RP_CPU_ISA allows; generic where RP_CPU_ISA is bad. */
rp_qkernel rp_qkernel_chosen(rp_qtype type);
/* Reads RP_CPU_ISA now: an error naming the value and the choices when it
 * is unknown or this CPU lacks it. Call it where errors can be reported
 * (backend creation): rp_cpu_qmatmul cannot. */
rp_status rp_cpu_qmatmul_check_env(rp_error *err);
/* rp_cpu_qmatmul with kernel k (which must be available for w->type; VNNI
 * on Q8ROW reads only w->packed: without it the call runs generic). */
void rp_cpu_qmatmul_kernel(rp_cpu_qx_workspace *ws, rp_qkernel k, const rp_qmatrix *w, float *y,
                           const float *x, int M, float beta, int n_threads);
/* Decode rows (backend.h, set_decode_rows): every M runs the streaming
 * kernel, 8 rows at a time inside tiles of W, so each row gets the bits it
 * gets alone (never the prefill sgemm). */
void rp_cpu_qmatmul_decode(rp_cpu_qx_workspace *ws, const rp_qmatrix *w, float *y,
                           const float *x, int M, float beta, int n_threads);
/* Independent decode products (outputs overlap no input) run as one
 * OpenMP region: y of each job exactly as rp_cpu_qmatmul_decode(w, y, x, M,
 * beta, n_threads) gives it, for any n_threads. At most RP_QGROUP_MAX jobs
 * go in one region (more run one call each). */
#define RP_QGROUP_MAX 8
typedef struct {
    const rp_qmatrix *w;
    float *y;
    const float *x;
    float beta;
} rp_qgroup_job;
void rp_cpu_qmatmul_decode_group(rp_cpu_qx_workspace *ws, const rp_qgroup_job *jobs, int n_jobs,
                                 int M, int n_threads);
/* Two dependent decode products in one OpenMP region (a decode FFN):
 * first, then relu^2 on first->y when relu_squared (cpu_bias_act's bits),
 * then second, which must read first's output (second->x == first->y,
 * second K == first N). The same bits as those three calls one by one, for
 * any n_threads. 1 if done; 0 (nothing done) when the shapes do not chain
 * or x's workspace cannot be allocated: the caller runs them one by one. */
int rp_cpu_qmatmul_decode_chain(rp_cpu_qx_workspace *ws, const rp_qgroup_job *first,
                                int relu_squared, const rp_qgroup_job *second, int M,
                                int n_threads);
/* rp_cpu_qmatmul_decode with kernel k (which must be available for w->type). */
void rp_cpu_qmatmul_kernel_decode(rp_cpu_qx_workspace *ws, rp_qkernel k, const rp_qmatrix *w,
                                  float *y, const float *x, int M, float beta, int n_threads);

/* How the VNNI kernel rounds x, per row and per block of RP_Q8_BLOCK:
 * scale = max|x| / 127 (f32), q = nearbyint(x / scale) in [-127, 127]
 * (0 where the block is all zero). xq [K], scales [K / RP_Q8_BLOCK]. */
void rp_q8_quantize_x(int8_t *xq, float *scales, const float *x, int K);
/* The same rounding per group of G k (the last group holds what is left):
 * scales [ceil(K / G)]. G = RP_Q8_BLOCK is rp_q8_quantize_x. */
void rp_q8_quantize_x_group(int8_t *xq, float *scales, const float *x, int K, int G);
/* Reference of a Q8ROW matrix against x quantized per group of G k
 * (rp_q8_quantize_x_group): y = wscale * sum over groups of xscale_g *
 * (exact integer dot of the group), in double, rounded to f32 once
 * (+ beta y in double). The vnni kernel's own order (what a test checks
 * bit for bit): acc = fmaf((float)dot_g, xscale_g, acc) for g in k order
 * from 0, then acc * wscale (+ beta y). */
void rp_qmatmul_ref_q8row(const rp_qmatrix *w, float *y, const float *x, int M, float beta,
                          int G);
/* The vnni kernel on Q8ROW quantizes x per group of RP_Q8ROW_XGROUP k (the
 * last group holds K % 128 when K is not a multiple): the int32 dot of a
 * whole group is converted once (docs/perf/cpu.md, "Accuracy": x per 32-k
 * block, 128-k group and row measured). */
#define RP_Q8ROW_XGROUP 128
/* rp_qmatmul_ref with x rounded as kernel k rounds it (bf16 for BF16DOT,
 * rp_q8_quantize_x for VNNI on Q8, rp_qmatmul_ref_q8row with
 * RP_Q8ROW_XGROUP for VNNI on Q8ROW; unrounded otherwise): the kernel's
 * ground truth. */
void rp_qmatmul_ref_kernel(rp_qkernel k, const rp_qmatrix *w, float *y, const float *x, int M,
                           float beta);

#endif
