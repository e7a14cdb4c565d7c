// The CUDA backend's four GEMM ops (the CPU twin is src/cpu/cpu_matmul.c):
// matmul_linear and matmul_lora forward (cuBLAS, or the decode GEMV kernels
// for a few rows) and their backward, fp32 or bf16 math with fp32
// accumulation. Installed by rp_cuda_install_matmul.
#include "cuda_internal.h"

#include <cstdint>

// ---- GEMMs ----
//
// The interface is row-major; cuBLAS is column-major. A row-major [r, c]
// matrix is the column-major [c, r] matrix of its transpose, so every
// row-major product Y = A B is computed as the column-major Y^T = B^T A^T
// with the operands swapped. Each op below states that mapping once.

// One column-major GEMM: C [m,n] = op(A) op(B) + beta C, fp32 C. In BF16
// math each operand is its registered weight copy, the bf16 copy its
// producer wrote (rp_cuda_act16), or is converted once into an activation
// copy that the next GEMMs on it reuse; fp32 accumulation either way.
static const __nv_bfloat16 *bf16_operand(rp_cuda_ctx *cx, const float *X, size_t n,
                                         const __nv_bfloat16 *keep) {
    const __nv_bfloat16 *x16 = rp_cuda_weight_shadow(cx, X, n);
    if (!x16) x16 = rp_cuda_inplace_find(cx, X, n);
    if (!x16) x16 = rp_cuda_act16_find(cx, X, n);
    if (x16) return x16;
    if (rp_cuda_act16_stale(cx, X, n)) {  // its only values were in a copy that ended
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda GEMM: operand (%zu floats) is a GEMM-only output whose f32 was "
                         "never written and whose bf16 copy ended (a kernel ran between its "
                         "producer and this GEMM); drop its gemm_only hint",
                         n);
        return NULL;
    }
    if (!rp_cuda_store16_fits(cx, X, n, "GEMM operand")) return NULL;
    __nv_bfloat16 *t = rp_cuda_act16_claim(cx, X, n, keep);
    if (!t) return NULL;
    rp_cuda_to_bf16(cx, t, X, n);
    rp_cuda_act16_publish(cx, t, X, n);
    return t;
}

static int take_gemm_only(rp_cuda_ctx *cx, const float *C, size_t elems) {
    return rp_cuda_take_gemm_only(cx, C, elems);
}

// A forward GEMM's y [M,N] written bf16 in place (C16 below): a GEMM-only
// one, or an rkv_only one (training's r, k_pre, v_pre, nu) above
// RP_GEMV_MAX_M rows, where its readers (key_prepare_from,
// value_residual_from, WKV7, the fused groupnorm, the tail) all take it so;
// at fewer rows all of them stay f32 alike. Both hints are consumed.
static int take_c16(rp_cuda_ctx *cx, const float *y, int M, int N) {
    const size_t n = (size_t)(M > 0 ? M : 0) * (N > 0 ? N : 0);
    const int gemm_only = take_gemm_only(cx, y, n);
    const int rkv_only = rp_cuda_take_rkv_only(cx, y, n) && rp_cuda_store16_rows(cx, M);
    return gemm_only || rkv_only;
}

static __global__ void round_bf16_kernel(float *p, size_t n) {
    const size_t step = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
        p[i] = __bfloat162float(__float2bfloat16(p[i]));
}

void rp_cuda_round_bf16(rp_cuda_ctx *cx, float *p, size_t n) {
    if (n == 0) return;
    const size_t blocks = rp_cuda_blocks(n, 256);
    round_bf16_kernel<<<(unsigned)(blocks < 4096 ? blocks : 4096), 256, 0, cx->stream>>>(p, n);
    RP_CUDA_LAUNCHED_OUT(cx, "round_bf16", {p, n * sizeof(float)});
}

// C16: C is a GEMM-only output (take_gemm_only): in BF16 math with beta 0 and
// the activation copies on, the GEMM writes bf16 C in place (cuBLAS rounds
// its fp32 sum once, the bits the conversion kernel would give) and no f32 C.
// With the copies off it writes f32 C and rounds it to bf16 values in place
// (the exactness twin: an activation that reads C sees the same values).
static void gemm(rp_cuda_ctx *cx, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                 const float *A, int lda, size_t a_elems, const float *B, int ldb, size_t b_elems,
                 float beta, float *C, int ldc, int c16 = 0) {
    const float alpha = 1.0f;
    // f32 C (every path but the bf16 in-place one) may not overrun a
    // half-sized bf16-only buffer
    const int c16_inplace = cx->math == RP_CUDA_MATH_BF16 && c16 && beta == 0.0f && ldc == m &&
                            !cx->act16_off;
    if (!c16_inplace && !rp_cuda_store16_fits(cx, C, (size_t)(n - 1) * ldc + m, "GEMM output"))
        return;
    if (cx->math == RP_CUDA_MATH_FP32) {
        RP_CUBLAS_OK(cx, cublasGemmEx(cx->cublas, ta, tb, m, n, k, &alpha, A, CUDA_R_32F, lda, B,
                                      CUDA_R_32F, ldb, &beta, C, CUDA_R_32F, ldc,
                                      CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
        return;
    }
    const __nv_bfloat16 *a16 = bf16_operand(cx, A, a_elems, NULL);
    if (!a16) return;
    const __nv_bfloat16 *b16 = bf16_operand(cx, B, b_elems, a16);
    if (!b16) return;
    if (c16 && beta == 0.0f && ldc == m && !cx->act16_off) {
        RP_CUBLAS_OK(cx, cublasGemmEx(cx->cublas, ta, tb, m, n, k, &alpha, a16, CUDA_R_16BF, lda,
                                      b16, CUDA_R_16BF, ldb, &beta, C, CUDA_R_16BF, ldc,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        rp_cuda_act16_forget(cx, C, (size_t)m * n * sizeof(__nv_bfloat16));  // what it wrote
        rp_cuda_inplace_add(cx, C, (size_t)m * n);
        return;
    }
    RP_CUBLAS_OK(cx, cublasGemmEx(cx->cublas, ta, tb, m, n, k, &alpha, a16, CUDA_R_16BF, lda, b16,
                                  CUDA_R_16BF, ldb, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
    rp_cuda_act16_forget(cx, C, ((size_t)(n - 1) * ldc + m) * sizeof(float));
    if (c16 && beta == 0.0f && ldc == m) {  // copies off: the f32 twin of bf16 C
        rp_cuda_round_bf16(cx, C, (size_t)m * n);
        rp_cuda_inplace_add(cx, C, (size_t)m * n, 1);
    }
}

// ---- decode GEMVs ----
//
// A decode step multiplies each weight matrix by at most a few rows (one per
// sequence of the group). A GEMM library call then costs a launch to round x
// to bf16 plus a GEMM tuned for large M; these kernels read each weight once
// (bf16 copy when registered, else fp32) straight against the fp32 rows,
// with fp32 accumulation, in one launch.
static __device__ __forceinline__ float weight_to_float(float v) { return v; }
static __device__ __forceinline__ float weight_to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

// y [M,N] = x [M,K] W^T + beta y, W [N,K]: a warp per output column n; with
// vec, each lane loads 16 bytes of W's row at a time (row 16-byte aligned).
// __launch_bounds__: the launch's block (cudaLaunchKernelEx; ptxas_report.sh reads it).
template <typename WT>
__global__ void __launch_bounds__(256) gemv_out_in_kernel(float *y, const float *x, const WT *w, int M, int N, int K,
                                   float beta, int vec) {
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (n >= N) return;  // n is the same for the whole warp: it leaves together
    const WT *wn = w + (size_t)n * K;
    // PDL (cuda_internal.h): W's row into L2 while the kernel before ends,
    // then x and y, which it may write, after the grid dependency sync.
    {
        const uintptr_t lo = (uintptr_t)wn, hi = lo + (size_t)K * sizeof(WT);
        for (uintptr_t a = (lo & ~(uintptr_t)127) + (uintptr_t)lane * 128; a < hi; a += 32 * 128)
            rp_prefetch_l2((const void *)a);
    }
    rp_pdl_wait();
    rp_pdl_trigger();
    float acc[RP_GEMV_MAX_M];
#pragma unroll
    for (int m = 0; m < RP_GEMV_MAX_M; m++) acc[m] = 0.0f;
    if (vec) {
        constexpr int V = 16 / sizeof(WT);  // 4 fp32 or 8 bf16 per load
        for (int k = lane * V; k < K; k += 32 * V) {
            union {
                uint4 raw;
                WT v[V];
            } chunk;
            chunk.raw = *reinterpret_cast<const uint4 *>(wn + k);
#pragma unroll
            for (int j = 0; j < V; j++) {
                const float wf = weight_to_float(chunk.v[j]);
#pragma unroll
                for (int m = 0; m < RP_GEMV_MAX_M; m++)
                    if (m < M) acc[m] += wf * x[(size_t)m * K + k + j];
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            const float wf = weight_to_float(wn[k]);
#pragma unroll
            for (int m = 0; m < RP_GEMV_MAX_M; m++)
                if (m < M) acc[m] += wf * x[(size_t)m * K + k];
        }
    }
#pragma unroll
    for (int m = 0; m < RP_GEMV_MAX_M; m++) {
        if (m >= M) break;
        float v = acc[m];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) {
            float *out = y + (size_t)m * N + n;
            *out = beta == 0.0f ? v : v + beta * *out;
        }
    }
}

// y [M,N] = x [M,K] W + beta y, W [K,N]: 32 columns per block, the K sum
// split over 8 thread rows and added in row order through shared memory.
template <typename WT>
__global__ void __launch_bounds__(256) gemv_in_out_kernel(float *y, const float *x, const WT *w, int M, int N, int K,
                                   float beta) {
    __shared__ float part[8][RP_GEMV_MAX_M][32];
    const int tx = threadIdx.x, ty = threadIdx.y, n = blockIdx.x * 32 + tx;
    if (n < N)  // PDL: this thread's W rows into L2 before the grid dependency sync
        for (int k = ty; k < K; k += 8) {
            const WT *a = w + (size_t)k * N + n;
            if (tx == 0 || (uintptr_t)a % 128 == 0) rp_prefetch_l2(a);
        }
    rp_pdl_wait();
    rp_pdl_trigger();
    float acc[RP_GEMV_MAX_M];
#pragma unroll
    for (int m = 0; m < RP_GEMV_MAX_M; m++) acc[m] = 0.0f;
    if (n < N)
        for (int k = ty; k < K; k += 8) {
            const float wf = weight_to_float(w[(size_t)k * N + n]);
#pragma unroll
            for (int m = 0; m < RP_GEMV_MAX_M; m++)
                if (m < M) acc[m] += x[(size_t)m * K + k] * wf;
        }
#pragma unroll
    for (int m = 0; m < RP_GEMV_MAX_M; m++) part[ty][m][tx] = acc[m];
    __syncthreads();
    if (ty == 0 && n < N)
        for (int m = 0; m < M; m++) {
            float v = 0.0f;
            for (int r = 0; r < 8; r++) v += part[r][m][tx];
            float *out = y + (size_t)m * N + n;
            *out = beta == 0.0f ? v : v + beta * *out;
        }
}

// The decode path of the two forward GEMM ops; in_out: W [K,N] (LoRA), else W [N,K].
static void gemv(rp_cuda_ctx *cx, int in_out, float *y, const float *x, const float *w, int M,
                 int N, int K, float beta) {
    if (!rp_cuda_store16_fits(cx, y, (size_t)M * N, "GEMV output") ||
        !rp_cuda_store16_fits(cx, x, (size_t)M * K, "GEMV input"))
        return;
    const __nv_bfloat16 *w16 = rp_cuda_weight_shadow(cx, w, (size_t)N * K);
    cudaLaunchAttribute attr[1];
    // A launch error is also the last error, which RP_CUDA_LAUNCHED records.
    if (in_out) {
        const cudaLaunchConfig_t cfg =
            rp_cuda_pdl_config(cx, dim3((unsigned)((N + 31) / 32)), dim3(32, 8), attr);
        if (w16)
            (void)cudaLaunchKernelEx(&cfg, gemv_in_out_kernel<__nv_bfloat16>, y, x, w16, M, N, K,
                                     beta);
        else
            (void)cudaLaunchKernelEx(&cfg, gemv_in_out_kernel<float>, y, x, w, M, N, K, beta);
        RP_CUDA_LAUNCHED(cx, "gemv_in_out");
        rp_cuda_act16_forget(cx, y, (size_t)M * N * sizeof(float));  // y: f32 again
        return;
    }
    // 8 warps of 32 per block
    const cudaLaunchConfig_t cfg =
        rp_cuda_pdl_config(cx, dim3((unsigned)((N + 7) / 8)), dim3(256), attr);
    if (w16) {
        const int vec = (uintptr_t)w16 % 16 == 0 && (size_t)K * sizeof(__nv_bfloat16) % 16 == 0;
        (void)cudaLaunchKernelEx(&cfg, gemv_out_in_kernel<__nv_bfloat16>, y, x, w16, M, N, K, beta,
                                 vec);
    } else {
        const int vec = (uintptr_t)w % 16 == 0 && (size_t)K * sizeof(float) % 16 == 0;
        (void)cudaLaunchKernelEx(&cfg, gemv_out_in_kernel<float>, y, x, w, M, N, K, beta, vec);
    }
    RP_CUDA_LAUNCHED(cx, "gemv_out_in");
    rp_cuda_act16_forget(cx, y, (size_t)M * N * sizeof(float));  // y: f32 again
}

// y [M,N] = x [M,K] W^T + beta y, W [N,K]:  y^T [N,M] = W [N,K] x^T [K,M]
static void cuda_matmul_linear(rp_backend *be, float *y, const float *x, const float *w, int M,
                               int N, int K, float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int c16 = take_c16(cx, y, M, N);
    if (M <= 0 || N <= 0 || K <= 0) return;
    // (a bf16 in-place x, e.g. the last row chunk of the head input, goes to cuBLAS)
    if (M <= RP_GEMV_MAX_M && !rp_cuda_inplace_find(cx, x, (size_t)M * K))
        return gemv(cx, 0, y, x, w, M, N, K, beta);
    gemm(cx, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, w, K, (size_t)N * K, x, K, (size_t)M * K, beta, y,
         N, c16);
}

// y [M,N] = x [M,K] W + beta y, W [K,N]:  y^T [N,M] = W^T [N,K] x^T [K,M]
// (c16: y's hint, taken by the op)
static void lora_gemm(rp_cuda_ctx *cx, float *y, const float *x, const float *w, int M, int N,
                      int K, float beta, int c16) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    if (M <= RP_GEMV_MAX_M && !rp_cuda_inplace_find(cx, x, (size_t)M * K))
        return gemv(cx, 1, y, x, w, M, N, K, beta);
    gemm(cx, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, w, N, (size_t)K * N, x, K, (size_t)M * K, beta, y,
         N, c16);
}

static void cuda_matmul_lora(rp_backend *be, float *y, const float *x, const float *w, int M,
                             int N, int K, float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    lora_gemm(cx, y, x, w, M, N, K, beta, take_c16(cx, y, M, N));
}

// ---- a GEMM with a bias epilogue (cuBLASLt; issue 15) ----

// D [m,n] (bf16, column-major, ld ldd) = op(A) op(B) + bias16 [m] on every
// column: bf16 A and B, fp32 compute, the bias added to the fp32 sum before
// the one rounding to bf16; no workspace (nothing to allocate mid-step).
// 0 when cuBLASLt is not set up, has no such algorithm or refuses the call
// (nothing queued): the caller runs its fallback.
static int lt_gemm_bias16(rp_cuda_ctx *cx, cublasOperation_t ta, cublasOperation_t tb, int m,
                          int n, int k, const __nv_bfloat16 *a16, int lda,
                          const __nv_bfloat16 *b16, int ldb, __nv_bfloat16 *d16, int ldd,
                          const __nv_bfloat16 *bias16) {
    if (!cx->lt) return 0;
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    const int32_t op_a = ta, op_b = tb, bias_type = CUDA_R_16BF;
    const uint32_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const uint64_t workspace = 0;
    const cublasStatus_t ok = CUBLAS_STATUS_SUCCESS;
    bool good =
        cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == ok &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a) == ok &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b) == ok &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                       sizeof epilogue) == ok &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias16,
                                       sizeof bias16) == ok &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                       sizeof bias_type) == ok &&
        cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, ta == CUBLAS_OP_N ? m : k,
                                   ta == CUBLAS_OP_N ? k : m, lda) == ok &&
        cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, tb == CUBLAS_OP_N ? k : n,
                                   tb == CUBLAS_OP_N ? n : k, ldb) == ok &&
        cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, m, n, ldd) == ok &&
        cublasLtMatmulPreferenceCreate(&pref) == ok &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &workspace, sizeof workspace) == ok;
    cublasLtMatmulHeuristicResult_t found;
    int n_found = 0;
    good = good &&
           cublasLtMatmulAlgoGetHeuristic(cx->lt, op, la, lb, ld, ld, pref, 1, &found,
                                          &n_found) == ok &&
           n_found > 0;
    const float alpha = 1.0f, beta = 0.0f;
    good = good && cublasLtMatmul(cx->lt, op, &alpha, a16, la, b16, lb, &beta, d16, ld, d16, ld,
                                  &found.algo, nullptr, 0, cx->stream) == ok;
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
    return good;
}

// y [n] (f32, row-major [.., N]) = bf16(y + bias16 [i % N]) as f32: the
// copies-off twin of the bias epilogue (the same fp32 add, the same one
// rounding).
static __global__ void bias_round_kernel(float *y, const __nv_bfloat16 *bias16, size_t n,
                                         int N) {
    const size_t step = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
        y[i] = __bfloat162float(__float2bfloat16(y[i] + __bfloat162float(bias16[i % N])));
}

// y [M,N] = x [M,K] W + bias [N] (backend.h matmul_lora_bias). A bf16 y
// (gemm_only, BF16 math, above GEMV rows) with a registered bias gets the
// bias in cuBLASLt's epilogue (the bias's bf16 copy: one rounding of y);
// with the copies off the same values in f32 (bias_round_kernel). Anything
// else, or cuBLASLt without an algorithm: matmul_lora then bias_act, their
// bits.
static void cuda_matmul_lora_bias(rp_backend *be, float *y, const float *x, const float *w,
                                  const float *bias, int M, int N, int K) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int c16 = take_c16(cx, y, M, N);
    if (M <= 0 || N <= 0 || K <= 0) return;
    const size_t n = (size_t)M * N;
    const __nv_bfloat16 *bias16 =
        c16 && M > RP_GEMV_MAX_M && cx->math == RP_CUDA_MATH_BF16
            ? rp_cuda_weight_shadow(cx, bias, (size_t)N)
            : nullptr;
    if (bias16 && !cx->act16_off) {
        const __nv_bfloat16 *w16 = bf16_operand(cx, w, (size_t)K * N, NULL);
        const __nv_bfloat16 *x16 = w16 ? bf16_operand(cx, x, (size_t)M * K, w16) : nullptr;
        if (!x16) return;  // a sticky error is recorded
        if (lt_gemm_bias16(cx, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, w16, N, x16, K,
                           reinterpret_cast<__nv_bfloat16 *>(y), N, bias16)) {
            rp_cuda_act16_forget(cx, y, n * sizeof(__nv_bfloat16));  // what it wrote
            rp_cuda_inplace_add(cx, y, n);
            return;
        }
    } else if (bias16) {
        gemm(cx, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, w, N, (size_t)K * N, x, K, (size_t)M * K, 0.0f,
             y, N, 0);
        if (cx->error.code != RP_OK) return;
        const size_t blocks = rp_cuda_blocks(n, 256);
        bias_round_kernel<<<(unsigned)(blocks < 4096 ? blocks : 4096), 256, 0, cx->stream>>>(
            y, bias16, n, N);
        if (!RP_CUDA_LAUNCHED_OUT(cx, "bias_round", {y, n * sizeof(float)})) return;
        rp_cuda_inplace_add(cx, y, n, 1);
        return;
    }
    lora_gemm(cx, y, x, w, M, N, K, 0.0f, c16);
    be->bias_act(be, y, bias, M, N, RP_ACT_NONE);
}

// forward y = x W^T, W [N,K]
// dx [M,K] = dy [M,N] W + beta dx:  dx^T [K,M] = W^T [K,N] dy^T [N,M]
// dw [N,K] += dy^T x [M,K]:         dw^T [K,N] = x^T [K,M] dy [M,N]
// dX and dW are separate GEMMs, so a schedule may run dW later.
static void cuda_matmul_linear_backward_beta(rp_backend *be, float *dx, float *dw,
                                             const float *dy, const float *x, const float *w,
                                             int M, int N, int K, float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int c16 = take_gemm_only(cx, dx, (size_t)M * K);
    if (M <= 0 || N <= 0 || K <= 0) return;
    if (dx)
        gemm(cx, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, w, K, (size_t)N * K, dy, N, (size_t)M * N,
             beta, dx, K, c16);
    if (dw)
        gemm(cx, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, x, K, (size_t)M * K, dy, N, (size_t)M * N,
             1.0f, dw, K);
}

static void cuda_matmul_linear_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                        const float *x, const float *w, int M, int N, int K) {
    cuda_matmul_linear_backward_beta(be, dx, dw, dy, x, w, M, N, K, 1.0f);
}

// forward y = x W, W [K,N]
// dx [M,K] = dy [M,N] W^T + beta dx:  dx^T [K,M] = W [K,N] dy^T [N,M]
// dw [K,N] += x^T dy:                 dw^T [N,K] = dy^T [N,M] x [M,K]
static void cuda_matmul_lora_backward_beta(rp_backend *be, float *dx, float *dw, const float *dy,
                                           const float *x, const float *w, int M, int N, int K,
                                           float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int c16 = take_gemm_only(cx, dx, (size_t)M * K);
    if (M <= 0 || N <= 0 || K <= 0) return;
    if (dx)
        gemm(cx, CUBLAS_OP_T, CUBLAS_OP_N, K, M, N, w, N, (size_t)K * N, dy, N, (size_t)M * N,
             beta, dx, K, c16);
    gemm(cx, CUBLAS_OP_N, CUBLAS_OP_T, N, K, M, dy, N, (size_t)M * N, x, K, (size_t)M * K, 1.0f,
         dw, N);
}

static void cuda_matmul_lora_backward(rp_backend *be, float *dx, float *dw, const float *dy,
                                      const float *x, const float *w, int M, int N, int K) {
    cuda_matmul_lora_backward_beta(be, dx, dw, dy, x, w, M, N, K, 1.0f);
}

void rp_cuda_install_matmul(rp_backend *be) {
    be->matmul_linear = cuda_matmul_linear;
    be->matmul_lora = cuda_matmul_lora;
    be->matmul_lora_bias = cuda_matmul_lora_bias;
    be->matmul_linear_backward = cuda_matmul_linear_backward;
    be->matmul_lora_backward = cuda_matmul_lora_backward;
    be->matmul_linear_backward_beta = cuda_matmul_linear_backward_beta;
    be->matmul_lora_backward_beta = cuda_matmul_lora_backward_beta;
}
