// Embedding (forward and backward), the loss head (cross_entropy, row_max,
// l2wrap, the fused head_cross_entropy) and the optimizer ops (sum_squares, adamw) of the CUDA backend,
// installed by rp_cuda_install_loss. Twins of cpu_embedding (cpu_backend.c)
// and of the loss/optimizer section of cpu_backward.c: same formulas, same
// rounding where it is cheap to keep (adamw, l2wrap, embedding_backward are
// bitwise equal to the CPU), fixed summation orders everywhere.
#include "cuda_internal.h"

#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>

#define FULL_MASK 0xffffffffu

// Threads of the row-wise kernels (one block per row, V up to 65536+).
#define ROW_THREADS 512
// Threads of the embedding kernels.
#define EMB_THREADS 256
#define EMB_BACKWARD_THREADS 128
// sum_squares: floats per first-pass block. Fixed (never derived from the
// device) so the summation order, hence the result, is the same everywhere.
#define SUMSQ_BLOCK_FLOATS 8192
#define SUMSQ_THREADS 256
#define SUMSQ_FINAL_THREADS 1024
#define ADAMW_THREADS 256

static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// Host floats reach the device through the int32 upload slots: the upload is
// a byte copy, so the bits arrive unchanged and kernels read them as floats.
static const float *upload_floats(rp_cuda_ctx *cx, int slot, const float *host, size_t n) {
    static_assert(sizeof(float) == sizeof(int32_t), "float bits travel in int32 slots");
    return reinterpret_cast<const float *>(
        rp_cuda_upload(cx, slot, reinterpret_cast<const int32_t *>(host), n));
}

// ---- block reductions ----
// Warps reduce with shuffles, then warp 0 combines the per-warp results in
// warp order: a fixed order for a fixed blockDim (deterministic). The result
// is broadcast to every thread. blockDim.x is a multiple of 32. Each helper
// is called at most once per kernel (its shared memory is not reused).

static __device__ double block_sum_double(double s) {
    __shared__ double warp_sums[32];
    __shared__ double total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(FULL_MASK, s, off);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < n_warps ? warp_sums[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(FULL_MASK, s, off);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// Online softmax statistics: (m, s) stands for sum_i exp(z_i) = s * exp(m).
// m = -inf means "no elements yet" (s = 0).
static __device__ __forceinline__ void softmax_add(float x, float &m, double &s) {
    if (x > m) {
        s = s * exp((double)m - (double)x) + 1.0;  // exp(-inf) = 0 for the first element
        m = x;
    } else if (m != -INFINITY) {
        s += (double)expf(x - m);
    }
}

static __device__ __forceinline__ void softmax_merge(float &m, double &s, float m2, double s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) {
        m = m2;
        s = s2;
        return;
    }
    const float mx = fmaxf(m, m2);
    s = s * exp((double)m - (double)mx) + s2 * exp((double)m2 - (double)mx);
    m = mx;
}

// Block-wide reduction of a pair (a, b) with merge(a, b, a2, b2) and the
// identity (a0, b0): a tree over each warp's lanes, then over the warps'
// results in warp order, so the order depends on blockDim only; every thread
// returns with the total.
template <class A, class B, class Merge>
static __device__ void block_reduce_pair(A &a, B &b, A a0, B b0, Merge merge) {
    __shared__ A warp_a[32];
    __shared__ B warp_b[32];
    __shared__ A total_a;
    __shared__ B total_b;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        const A a2 = __shfl_down_sync(FULL_MASK, a, off);
        const B b2 = __shfl_down_sync(FULL_MASK, b, off);
        merge(a, b, a2, b2);
    }
    if (lane == 0) {
        warp_a[warp] = a;
        warp_b[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < n_warps ? warp_a[lane] : a0;
        b = lane < n_warps ? warp_b[lane] : b0;
        for (int off = 16; off > 0; off >>= 1) {
            const A a2 = __shfl_down_sync(FULL_MASK, a, off);
            const B b2 = __shfl_down_sync(FULL_MASK, b, off);
            merge(a, b, a2, b2);
        }
        if (lane == 0) {
            total_a = a;
            total_b = b;
        }
    }
    __syncthreads();
    a = total_a;
    b = total_b;
}

static __device__ void block_softmax_stats(float &m, double &s) {
    block_reduce_pair(m, s, -INFINITY, 0.0, [](float &m1, double &s1, float m2, double s2) {
        softmax_merge(m1, s1, m2, s2);
    });
}

// Arg-max with the CPU's tie rule: the first (lowest) index wins. idx ==
// INT_MAX means "no element yet".
static __device__ __forceinline__ void argmax_merge(float &v, int &idx, float v2, int idx2) {
    if (idx2 == INT_MAX) return;
    if (idx == INT_MAX || v2 > v || (v2 == v && idx2 < idx)) {
        v = v2;
        idx = idx2;
    }
}

static __device__ void block_argmax(float &v, int &idx) {
    block_reduce_pair(v, idx, -INFINITY, INT_MAX, [](float &v1, int &i1, float v2, int i2) {
        argmax_merge(v1, i1, v2, i2);
    });
}

// ---- embedding ----

// emb [V,C], tokens [R] -> x [R,C]: one block per row. vec: float4 copies
// (C % 4 == 0 and both buffers 16-byte aligned).
static __global__ void embedding_kernel(float *x, const float *emb, const int32_t *tokens,
                                        int C, int vec) {
    // PDL (decode rows): every access after the kernel before has ended;
    // then the next kernel (ln0) may launch during this one
    rp_pdl_wait();
    rp_pdl_trigger();
    const size_t r = blockIdx.x;
    const float *src = emb + (size_t)tokens[r] * C;
    float *dst = x + r * C;
    if (vec) {
        const float4 *src4 = reinterpret_cast<const float4 *>(src);
        float4 *dst4 = reinterpret_cast<float4 *>(dst);
        for (int c = threadIdx.x; c < C / 4; c += blockDim.x) dst4[c] = src4[c];
    } else {
        for (int c = threadIdx.x; c < C; c += blockDim.x) dst[c] = src[c];
    }
}

static void cuda_embedding(rp_backend *be, float *x, const float *emb, const int32_t *tokens,
                           int R, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || C <= 0) return;
    const int32_t *d_tokens = rp_cuda_upload(cx, RP_CUDA_UP_TOKENS, tokens, (size_t)R);
    if (!d_tokens) return;
    const int vec = C % 4 == 0 && aligned16(x) && aligned16(emb);
    if (R <= RP_GEMV_MAX_M) {  // decode rows: a programmatic dependent launch
        cudaLaunchAttribute attr[1];
        const cudaLaunchConfig_t cfg =
            rp_cuda_pdl_config(cx, dim3((unsigned)R), dim3(EMB_THREADS), attr);
        (void)cudaLaunchKernelEx(&cfg, embedding_kernel, x, emb, d_tokens, C, vec);
    } else {
        embedding_kernel<<<R, EMB_THREADS, 0, cx->stream>>>(x, emb, d_tokens, C, vec);
    }
    RP_CUDA_LAUNCHED(cx, "embedding");
}

// Backward: demb [V,C] row tokens[r] += dx row r, rows in order. Rows are
// grouped by token on the host (stable counting sort: perm lists the rows of
// each token in ascending row order, seg_start [n_seg + 1] delimits the
// tokens), so one block owns a (token, column slice) and adds its rows one
// after another: acc = demb[t][c]; acc += dx[r1][c]; acc += dx[r2][c]; ...
// the same float additions in the same order as the CPU: bitwise equal, no
// atomics. grid (n_seg, column slices of blockDim columns, float4 when vec).
static __global__ void embedding_backward_kernel(float *demb, const float *dx,
                                                 const int32_t *tokens, const int32_t *perm,
                                                 const int32_t *seg_start, int C, int vec) {
    const int begin = seg_start[blockIdx.x], end = seg_start[blockIdx.x + 1];
    const size_t t = (size_t)tokens[perm[begin]];
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (vec) {
        if (c >= C / 4) return;
        float4 *dst = reinterpret_cast<float4 *>(demb + t * C) + c;
        float4 acc = *dst;
        for (int i = begin; i < end; i++) {
            const float4 g = reinterpret_cast<const float4 *>(dx + (size_t)perm[i] * C)[c];
            acc.x += g.x;
            acc.y += g.y;
            acc.z += g.z;
            acc.w += g.w;
        }
        *dst = acc;
    } else {
        if (c >= C) return;
        float *dst = demb + t * C + c;
        float acc = *dst;
        for (int i = begin; i < end; i++) acc += dx[(size_t)perm[i] * C + c];
        *dst = acc;
    }
}

static void cuda_embedding_backward(rp_backend *be, float *demb, const float *dx,
                                    const int32_t *tokens, int R, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || C <= 0) return;
    int32_t max_token = 0;
    for (int r = 0; r < R; r++) {
        if (tokens[r] < 0) {
            rp_cuda_record(cx, cudaErrorInvalidValue, "embedding_backward: negative token id",
                           __FILE__, __LINE__);
            return;
        }
        if (tokens[r] > max_token) max_token = tokens[r];
    }
    // One host buffer: next [max_token + 1] (counting sort cursors), perm [R],
    // seg_start [R + 1].
    const size_t n_buckets = (size_t)max_token + 1;
    int32_t *buf = (int32_t *)calloc(n_buckets + 2 * (size_t)R + 1, sizeof(int32_t));
    if (!buf) {
        rp_cuda_record(cx, cudaErrorMemoryAllocation, "embedding_backward: host sort buffer",
                       __FILE__, __LINE__);
        return;
    }
    int32_t *next = buf, *perm = buf + n_buckets, *seg_start = perm + R;
    for (int r = 0; r < R; r++) next[tokens[r]]++;
    int n_seg = 0, pos = 0;
    for (size_t t = 0; t < n_buckets; t++) {
        const int count = next[t];
        next[t] = pos;
        if (count > 0) seg_start[n_seg++] = pos;
        pos += count;
    }
    seg_start[n_seg] = R;
    for (int r = 0; r < R; r++) perm[next[tokens[r]]++] = r;  // stable: rows ascend per token

    const int32_t *d_tokens = rp_cuda_upload(cx, RP_CUDA_UP_TOKENS, tokens, (size_t)R);
    const int32_t *d_perm = rp_cuda_upload(cx, RP_CUDA_UP_EXTRA, perm, (size_t)R);
    const int32_t *d_seg = rp_cuda_upload(cx, RP_CUDA_UP_EXTRA2, seg_start, (size_t)n_seg + 1);
    free(buf);  // uploads copy from pageable memory before returning
    if (!d_tokens || !d_perm || !d_seg) return;

    const int vec = C % 4 == 0 && aligned16(demb) && aligned16(dx);
    const int columns = vec ? C / 4 : C;
    dim3 grid((unsigned)n_seg, rp_cuda_blocks((size_t)columns, EMB_BACKWARD_THREADS));
    embedding_backward_kernel<<<grid, EMB_BACKWARD_THREADS, 0, cx->stream>>>(
        demb, dx, d_tokens, d_perm, d_seg, C, vec);
    RP_CUDA_LAUNCHED(cx, "embedding_backward");
}

// ---- loss ----

// logits [R,V], targets [R] -> losses [R], dlogits [R,V] (may alias logits):
// one block per row.
// forward:  loss = lse - z[t], lse = max + log(sum_i exp(z_i - max))
// backward: d_i = exp(z_i - lse) * scale, then d[t] -= scale
// Rows with t < 0: loss 0, d row 0. The sum is kept in double as on the CPU;
// an online softmax (running max, sum rescaled when the max grows) gets it
// in one pass over the row, and the write pass reads the row once more.
static __global__ void __launch_bounds__(ROW_THREADS)
    cross_entropy_kernel(float *losses, float *dlogits, const float *logits,
                         const int32_t *targets, int V, float scale, int vec) {
    const size_t r = blockIdx.x;
    const float *z = logits + r * V;  // not restrict: dlogits may alias logits
    float *d = dlogits ? dlogits + r * V : nullptr;
    const int t = targets[r];
    if (t < 0) {
        if (threadIdx.x == 0) losses[r] = 0.0f;
        if (!d) return;
        if (vec) {
            float4 *d4 = reinterpret_cast<float4 *>(d);
            for (int i = threadIdx.x; i < V / 4; i += blockDim.x)
                d4[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        } else {
            for (int i = threadIdx.x; i < V; i += blockDim.x) d[i] = 0.0f;
        }
        return;
    }
    const float zt = z[t];
    float m = -INFINITY;
    double s = 0.0;
    if (vec) {
        const float4 *z4 = reinterpret_cast<const float4 *>(z);
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            const float4 q = z4[i];
            softmax_add(q.x, m, s);
            softmax_add(q.y, m, s);
            softmax_add(q.z, m, s);
            softmax_add(q.w, m, s);
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) softmax_add(z[i], m, s);
    }
    // The reduction's barriers also order every read of z (and zt) above
    // before the writes below, which may land on the same memory.
    block_softmax_stats(m, s);
    const float lse = m + (float)log(s);
    if (threadIdx.x == 0) losses[r] = lse - zt;
    if (!d) return;
    // __fmul_rn / __fsub_rn: no fused multiply-add, the CPU's two roundings.
    if (vec) {
        const float4 *z4 = reinterpret_cast<const float4 *>(z);
        float4 *d4 = reinterpret_cast<float4 *>(d);
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            const float4 q = z4[i];
            float4 p;
            p.x = __fmul_rn(expf(q.x - lse), scale);
            p.y = __fmul_rn(expf(q.y - lse), scale);
            p.z = __fmul_rn(expf(q.z - lse), scale);
            p.w = __fmul_rn(expf(q.w - lse), scale);
            if ((t >> 2) == i) {
                const int k = t & 3;
                if (k == 0) p.x = __fsub_rn(p.x, scale);
                if (k == 1) p.y = __fsub_rn(p.y, scale);
                if (k == 2) p.z = __fsub_rn(p.z, scale);
                if (k == 3) p.w = __fsub_rn(p.w, scale);
            }
            d4[i] = p;
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float p = __fmul_rn(expf(z[i] - lse), scale);
            if (i == t) p = __fsub_rn(p, scale);
            d[i] = p;
        }
    }
}

static void cuda_cross_entropy(rp_backend *be, float *losses, float *dlogits, const float *logits,
                               const int32_t *targets, int R, int V, float scale) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || V <= 0) return;
    const int32_t *d_targets = rp_cuda_upload(cx, RP_CUDA_UP_TOKENS, targets, (size_t)R);
    if (!d_targets) return;
    const int vec = V % 4 == 0 && aligned16(logits) && (!dlogits || aligned16(dlogits));
    cross_entropy_kernel<<<R, ROW_THREADS, 0, cx->stream>>>(losses, dlogits, logits, d_targets, V,
                                                            scale, vec);
    RP_CUDA_LAUNCHED(cx, "cross_entropy");
}

// x [R,V] -> row_max [R], argmax [R] (first index on ties): one block per row.
static __global__ void __launch_bounds__(ROW_THREADS)
    row_max_kernel(float *row_max, int32_t *argmax, const float *x, int V, int vec) {
    const size_t r = blockIdx.x;
    const float *z = x + r * V;
    // Each thread visits its indices in ascending order and keeps a strict >,
    // so within a thread the first maximum stays; the merge prefers the lower
    // index on ties.
    float v = -INFINITY;
    int idx = INT_MAX;
    if (vec) {
        const float4 *z4 = reinterpret_cast<const float4 *>(z);
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            const float4 q = z4[i];
            if (idx == INT_MAX || q.x > v) v = q.x, idx = 4 * i;
            if (q.y > v) v = q.y, idx = 4 * i + 1;
            if (q.z > v) v = q.z, idx = 4 * i + 2;
            if (q.w > v) v = q.w, idx = 4 * i + 3;
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x)
            if (idx == INT_MAX || z[i] > v) v = z[i], idx = i;
    }
    block_argmax(v, idx);
    if (threadIdx.x == 0) {
        row_max[r] = v;
        argmax[r] = idx;
    }
}

static void cuda_row_max(rp_backend *be, float *row_max, int32_t *argmax, const float *x, int R,
                         int V) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || V <= 0) return;
    // Host outputs: zeros unless the device results arrive, so a failed op
    // never hands l2wrap an out-of-range arg-max.
    memset(row_max, 0, (size_t)R * sizeof(float));
    memset(argmax, 0, (size_t)R * sizeof(int32_t));
    float *d_max = (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, (size_t)R * 2 * sizeof(float));
    if (!d_max) return;
    int32_t *d_arg = reinterpret_cast<int32_t *>(d_max + R);
    const int vec = V % 4 == 0 && aligned16(x);
    row_max_kernel<<<R, ROW_THREADS, 0, cx->stream>>>(d_max, d_arg, x, V, vec);
    if (!RP_CUDA_LAUNCHED(cx, "row_max")) return;
    RP_CUDA_OK(cx, cudaMemcpyAsync(row_max, d_max, (size_t)R * sizeof(float),
                                   cudaMemcpyDeviceToHost, cx->stream));
    RP_CUDA_OK(cx, cudaMemcpyAsync(argmax, d_arg, (size_t)R * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, cx->stream));
    RP_CUDA_OK(cx, cudaStreamSynchronize(cx->stream));
}

// dlogits [R,V]: one thread per row adds factor * row_max at the row's
// arg-max, for rows with target >= 0. __fmul_rn keeps the CPU's rounding
// (no fused multiply-add): bitwise equal.
static __global__ void l2wrap_kernel(float *dlogits, const float *row_max,
                                     const int32_t *argmax, const int32_t *targets, int R, int V,
                                     float factor) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R || targets[r] < 0) return;
    float *p = dlogits + (size_t)r * V + argmax[r];
    *p = __fadd_rn(*p, __fmul_rn(factor, row_max[r]));
}

static void cuda_l2wrap(rp_backend *be, float *dlogits, const float *row_max,
                        const int32_t *argmax, const int32_t *targets, int R, int V,
                        float factor) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || V <= 0) return;
    const int32_t *d_targets = rp_cuda_upload(cx, RP_CUDA_UP_TOKENS, targets, (size_t)R);
    const int32_t *d_argmax = rp_cuda_upload(cx, RP_CUDA_UP_EXTRA, argmax, (size_t)R);
    const float *d_max = upload_floats(cx, RP_CUDA_UP_EXTRA2, row_max, (size_t)R);
    if (!d_targets || !d_argmax || !d_max) return;
    l2wrap_kernel<<<rp_cuda_blocks((size_t)R, 256), 256, 0, cx->stream>>>(
        dlogits, d_max, d_argmax, d_targets, R, V, factor);
    RP_CUDA_LAUNCHED(cx, "l2wrap");
}

// ---- optimizer ----

// x [n] -> partials [ceil(n / SUMSQ_BLOCK_FLOATS)]: block b sums the squares
// of its SUMSQ_BLOCK_FLOATS floats in double (float * float is exact in
// double, as on the CPU).
static __global__ void __launch_bounds__(SUMSQ_THREADS)
    sum_squares_partial_kernel(double *partials, const float *x, size_t n) {
    const size_t begin = (size_t)blockIdx.x * SUMSQ_BLOCK_FLOATS;
    const size_t end = begin + SUMSQ_BLOCK_FLOATS < n ? begin + SUMSQ_BLOCK_FLOATS : n;
    double s = 0.0;
#pragma unroll 4
    for (size_t i = begin + threadIdx.x; i < end; i += SUMSQ_THREADS) {
        const double xi = (double)x[i];
        s += xi * xi;
    }
    s = block_sum_double(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// partials [n_parts] -> total [1]: one block, fixed order.
static __global__ void __launch_bounds__(SUMSQ_FINAL_THREADS)
    sum_squares_final_kernel(double *total, const double *partials, size_t n_parts) {
    double s = 0.0;
    for (size_t i = threadIdx.x; i < n_parts; i += SUMSQ_FINAL_THREADS) s += partials[i];
    s = block_sum_double(s);
    if (threadIdx.x == 0) *total = s;
}

static double cuda_sum_squares(rp_backend *be, const float *x, size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (n == 0) return 0.0;
    const size_t n_parts = (n + SUMSQ_BLOCK_FLOATS - 1) / SUMSQ_BLOCK_FLOATS;
    double *d = (double *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, (n_parts + 1) * sizeof(double));
    if (!d) return 0.0;
    double *d_total = d + n_parts;
    sum_squares_partial_kernel<<<(unsigned)n_parts, SUMSQ_THREADS, 0, cx->stream>>>(d, x, n);
    if (!RP_CUDA_LAUNCHED(cx, "sum_squares partials")) return 0.0;
    sum_squares_final_kernel<<<1, SUMSQ_FINAL_THREADS, 0, cx->stream>>>(d_total, d, n_parts);
    if (!RP_CUDA_LAUNCHED(cx, "sum_squares total")) return 0.0;
    double result = 0.0;
    if (!RP_CUDA_OK(cx, cudaMemcpyAsync(&result, d_total, sizeof(double), cudaMemcpyDeviceToHost,
                                        cx->stream)))
        return 0.0;
    if (!RP_CUDA_OK(cx, cudaStreamSynchronize(cx->stream))) return 0.0;
    return result;
}

// param, grad, m, v [n], elementwise (DeepSpeed FusedAdam, adam_w_mode):
// g = grad * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g g;
// p -= lr * ((m / bc1) / (sqrt(v / bc2) + eps) + wd * p), with 1/bc passed in.
// Every operation rounded on its own (__f*_rn: no fused multiply-adds) in the
// CPU's order: bitwise equal to cpu_adamw. shadow (may be NULL): the bf16
// copy of param the GEMMs read, rewritten in the same pass.
// Element i (adamw_kernel, adamw_multi_kernel: one body, the same bits).
static __device__ __forceinline__ void adamw_element(float *param, const float *grad, float *m,
                                                     float *v, __nv_bfloat16 *shadow, size_t i,
                                                     float lr, float beta1, float beta2,
                                                     float eps, float weight_decay,
                                                     float grad_scale, float inv_bc1,
                                                     float inv_bc2) {
    const float g = __fmul_rn(grad[i], grad_scale);
    const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(1.0f - beta1, g));
    const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(1.0f - beta2, g), g));
    m[i] = mi;
    v[i] = vi;
    const float p = param[i];
    const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(vi, inv_bc2)), eps);
    const float update = __fadd_rn(__fdiv_rn(__fmul_rn(mi, inv_bc1), denom),
                                   __fmul_rn(weight_decay, p));
    const float p_new = __fsub_rn(p, __fmul_rn(lr, update));
    param[i] = p_new;
    if (shadow) shadow[i] = __float2bfloat16_rn(p_new);
}

static __global__ void adamw_kernel(float *param, const float *grad, float *m, float *v,
                                    __nv_bfloat16 *shadow, size_t n, float lr, float beta1,
                                    float beta2, float eps, float weight_decay, float grad_scale,
                                    float inv_bc1, float inv_bc2) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    adamw_element(param, grad, m, v, shadow, i, lr, beta1, beta2, eps, weight_decay, grad_scale,
                  inv_bc1, inv_bc2);
}

// adamw_multi's tensors, passed by value (__grid_constant__: indexed in the
// parameter space, no copy to a stack frame). Tensor k owns the blocks
// [block_end[k - 1], block_end[k]), ADAMW_THREADS elements each.
struct adamw_table {
    float *param[RP_ADAMW_MULTI_MAX];
    const float *grad[RP_ADAMW_MULTI_MAX];
    float *m[RP_ADAMW_MULTI_MAX], *v[RP_ADAMW_MULTI_MAX];
    __nv_bfloat16 *shadow[RP_ADAMW_MULTI_MAX];
    size_t n[RP_ADAMW_MULTI_MAX];
    float lr[RP_ADAMW_MULTI_MAX], weight_decay[RP_ADAMW_MULTI_MAX];
    unsigned block_end[RP_ADAMW_MULTI_MAX];
    int count;
};

// The blocks of all the tensors in one grid: a block finds its tensor, then
// its element is adamw_kernel's.
static __global__ void adamw_multi_kernel(const __grid_constant__ adamw_table t, float beta1,
                                          float beta2, float eps, float grad_scale,
                                          float inv_bc1, float inv_bc2) {
    int k = 0;
    while (k + 1 < t.count && blockIdx.x >= t.block_end[k]) k++;
    const unsigned first = k ? t.block_end[k - 1] : 0u;
    const size_t i = (size_t)(blockIdx.x - first) * blockDim.x + threadIdx.x;
    if (i >= t.n[k]) return;
    adamw_element(t.param[k], t.grad[k], t.m[k], t.v[k], t.shadow[k], i, t.lr[k], beta1, beta2,
                  eps, t.weight_decay[k], grad_scale, inv_bc1, inv_bc2);
}

static void cuda_adamw(rp_backend *be, float *param, const float *grad, float *m, float *v,
                       size_t n, float lr, float beta1, float beta2, float eps,
                       float weight_decay, float grad_scale, float bias_correction1,
                       float bias_correction2) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (n == 0) return;
    const float inv_bc1 = 1.0f / bias_correction1, inv_bc2 = 1.0f / bias_correction2;
    __nv_bfloat16 *shadow = rp_cuda_weight_shadow(cx, param, n);
    adamw_kernel<<<rp_cuda_blocks(n, ADAMW_THREADS), ADAMW_THREADS, 0, cx->stream>>>(
        param, grad, m, v, shadow, n, lr, beta1, beta2, eps, weight_decay, grad_scale, inv_bc1,
        inv_bc2);
    RP_CUDA_LAUNCHED(cx, "adamw");
}

static void cuda_adamw_multi(rp_backend *be, const rp_adamw_tensor *tensors, int n_tensors,
                             float beta1, float beta2, float eps, float grad_scale,
                             float bias_correction1, float bias_correction2) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (n_tensors < 1 || n_tensors > RP_ADAMW_MULTI_MAX) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "adamw_multi: tensor count outside 1..RP_ADAMW_MULTI_MAX", __FILE__,
                       __LINE__);
        return;
    }
    adamw_table t;
    memset(&t, 0, sizeof t);
    size_t blocks = 0;
    for (int k = 0; k < n_tensors; k++) {
        const rp_adamw_tensor *a = &tensors[k];
        t.param[k] = a->param;
        t.grad[k] = a->grad;
        t.m[k] = a->m;
        t.v[k] = a->v;
        t.shadow[k] = rp_cuda_weight_shadow(cx, a->param, a->n);
        t.n[k] = a->n;
        t.lr[k] = a->lr;
        t.weight_decay[k] = a->weight_decay;
        blocks += rp_cuda_blocks(a->n, ADAMW_THREADS);
        if (blocks > 0x7fffffffu) {  // the grid's x limit
            rp_cuda_record(cx, cudaErrorInvalidValue,
                           "adamw_multi: more than 2^31 - 1 blocks; pass fewer tensors",
                           __FILE__, __LINE__);
            return;
        }
        t.block_end[k] = (unsigned)blocks;
    }
    t.count = n_tensors;
    if (blocks == 0) return;
    adamw_multi_kernel<<<(unsigned)blocks, ADAMW_THREADS, 0, cx->stream>>>(
        t, beta1, beta2, eps, grad_scale, 1.0f / bias_correction1, 1.0f / bias_correction2);
    RP_CUDA_LAUNCHED(cx, "adamw_multi");
}

// ---- fused head + loss (head_cross_entropy) ----

// One row chunk's logits z [rows,V] -> losses [rows] and d z:
// cross_entropy_kernel's loss and gradient with L2Wrap folded in. T: the
// logits' storage, f32 or bf16 (the logits GEMM wrote bf16 in place,
// backend.h head_logits16); the softmax statistics are fp32 / double either
// way. d z goes in place into z (rounded once to bf16 when T is bf16), or
// with f32 z and d16 non-NULL only to d16 [rows,V] in bf16 (the operand of
// the head's backward GEMMs, which read nothing else of it): z is then only
// read. Each bf16 d z is the conversion kernel's rounding of the f32 value.
// When factor > 0 the row's max and arg-max (first index on ties) come from
// the same pass as the softmax statistics, and the thread writing d[argmax]
// adds factor * max there: no row_max kernel, no host round trip, no l2wrap
// kernel. __fmul_rn / __fsub_rn / __fadd_rn: the CPU's roundings, in the
// CPU's order (softmax * scale, - scale at the target, + the L2Wrap term).
static __device__ __forceinline__ float logit_to_float(float v) { return v; }
static __device__ __forceinline__ float logit_to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
}
static __device__ __forceinline__ void logit_store(float *p, float v) { *p = v; }
static __device__ __forceinline__ void logit_store(__nv_bfloat16 *p, float v) {
    *p = __float2bfloat16(v);
}
template <typename T>
__global__ void __launch_bounds__(ROW_THREADS)
    head_ce_kernel(float *losses, T *logits, const int32_t *targets, int V, float scale,
                   float factor, __nv_bfloat16 *d16) {
    const size_t r = blockIdx.x;
    T *z = logits + r * V;
    __nv_bfloat16 *z16 = d16 ? d16 + r * V : nullptr;
    const int t = targets[r];
    if (t < 0) {
        if (threadIdx.x == 0) losses[r] = 0.0f;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            if (z16)
                z16[i] = __float2bfloat16(0.0f);
            else
                logit_store(z + i, 0.0f);
        }
        return;
    }
    const float zt = logit_to_float(z[t]);
    float m = -INFINITY, best = -INFINITY;
    double s = 0.0;
    int best_i = INT_MAX;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float q = logit_to_float(z[i]);
        softmax_add(q, m, s);
        if (best_i == INT_MAX || q > best) best = q, best_i = i;  // ascending i: first max stays
    }
    // The reductions' barriers order every read of z above before the writes.
    block_softmax_stats(m, s);
    if (factor > 0) block_argmax(best, best_i);  // uniform over the block
    const float lse = m + (float)log(s);
    if (threadIdx.x == 0) losses[r] = lse - zt;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float p = __fmul_rn(expf(logit_to_float(z[i]) - lse), scale);
        if (i == t) p = __fsub_rn(p, scale);
        if (factor > 0 && i == best_i) p = __fadd_rn(p, __fmul_rn(factor, best));
        if (z16)
            z16[i] = __float2bfloat16(p);
        else
            logit_store(z + i, p);
    }
}

// Per row chunk: the logits GEMM into the scratch, the fused loss kernel,
// then dx rows (beta 0) and dhead (+=) from the chunk's gradient: the [R,V]
// logits never exist, and the targets are uploaded once for all chunks.
//
// BF16 math with head_logits16 (the default) and more than RP_GEMV_MAX_M
// rows: the logits GEMM is hinted GEMM-only (backend.h gemm_only), so
// cuBLAS writes the chunk's logits in bf16 in place in the scratch (an
// in-place range, cuda_internal.h), the loss kernel reads them there and
// writes the bf16 dlogits over them, and the two backward GEMMs read that
// range as their operand: half the logits bytes written and read, no f32
// logits, no activation copy slot. The kernel's launch names only the
// losses as its output, so the in-place record (now the dlogits) stays for
// the GEMMs. With the copies off (the exactness twin) the GEMM writes the
// same values rounded in f32 instead, and the f32 path below reads them.
//
// Otherwise (f32 logits: FP32 math, head_logits16 0, copies off) with the
// copies on the loss kernel writes the chunk's dlogits as bf16 only, into an
// activation copy slot (rp_cuda_act16) published for the scratch, so its
// GEMMs convert nothing and no f32 dlogits is written: the scratch's f32
// still holds the logits, which nothing reads (the record is dropped after
// the two GEMMs; the next chunk's logits GEMM overwrites the scratch). The
// copy is a sole one (rp_cuda_act16_publish_sole: a conversion of x for the
// dW GEMM claims another slot, and a GEMM that would convert the stale f32
// is a sticky error); the two GEMMs run one at a time, each finding the copy
// itself.
static void cuda_head_cross_entropy(rp_backend *be, float *losses, float *dx, float *dhead,
                                    float *scratch, const float *x, const float *head,
                                    const int32_t *targets, int R, int C, int V, float scale,
                                    float l2wrap_factor, int chunk_rows) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || V <= 0 || C <= 0 || chunk_rows <= 0) return;
    const int32_t *d_targets = rp_cuda_upload(cx, RP_CUDA_UP_TOKENS, targets, (size_t)R);
    if (!d_targets) return;
    for (int r0 = 0; r0 < R; r0 += chunk_rows) {
        const int rows = R - r0 < chunk_rows ? R - r0 : chunk_rows;
        const size_t n = (size_t)rows * V;
        const float *xc = x + (size_t)r0 * C;
        const int logits16 =
            cx->math == RP_CUDA_MATH_BF16 && be->head_logits16 && rows > RP_GEMV_MAX_M;
        if (logits16) {  // backend.h gemm_only, whether the model's tests installed it or not
            rp_cuda_hint_gemm_only(cx, scratch, n);
        }
        be->matmul_linear(be, scratch, xc, head, rows, V, C, 0.0f);
        if (logits16 && !cx->act16_off) {
            head_ce_kernel<__nv_bfloat16><<<rows, ROW_THREADS, 0, cx->stream>>>(
                losses + r0, (__nv_bfloat16 *)scratch, d_targets + r0, V, scale, l2wrap_factor,
                nullptr);
            if (!RP_CUDA_LAUNCHED_OUT(cx, "head_cross_entropy (bf16 logits)",
                                      {losses + r0, (size_t)rows * sizeof(float)}))
                return;
            be->matmul_linear_backward_beta(be, dx + (size_t)r0 * C, dhead, scratch, xc, head,
                                            rows, V, C, 0.0f);
            rp_cuda_act16_forget(cx, scratch, n * sizeof(__nv_bfloat16));
            if (cx->error.code != RP_OK) return;
            continue;
        }
        __nv_bfloat16 *d16 = rp_cuda_act16_for_rows(cx, scratch, n, rows);
        head_ce_kernel<float><<<rows, ROW_THREADS, 0, cx->stream>>>(
            losses + r0, scratch, d_targets + r0, V, scale, l2wrap_factor, d16);
        if (!d16) {
            if (!RP_CUDA_LAUNCHED_OUT(cx, "head_cross_entropy",
                                      {losses + r0, (size_t)rows * sizeof(float)},
                                      {scratch, n * sizeof(float)}))
                return;
            be->matmul_linear_backward_beta(be, dx + (size_t)r0 * C, dhead, scratch, xc, head,
                                            rows, V, C, 0.0f);
            continue;
        }
        if (!RP_CUDA_LAUNCHED_OUT(cx, "head_cross_entropy (bf16 dlogits)",
                                  {losses + r0, (size_t)rows * sizeof(float)}))
            return;
        rp_cuda_act16_publish_sole(cx, d16, scratch, n);
        // a GEMM that finds the copy lost refuses the stale f32 logits
        // (rp_cuda_act16_stale: a sticky error), whether its slot was
        // reclaimed or not
        for (int part = 0; part < 2; part++)
            be->matmul_linear_backward_beta(be, part ? NULL : dx + (size_t)r0 * C,
                                            part ? dhead : NULL, scratch, xc, head, rows, V, C,
                                            0.0f);
        rp_cuda_act16_forget(cx, scratch, n * sizeof(float));
        if (cx->error.code != RP_OK) return;
    }
}

void rp_cuda_install_loss(rp_backend *be) {
    be->embedding = cuda_embedding;
    be->embedding_backward = cuda_embedding_backward;
    be->cross_entropy = cuda_cross_entropy;
    be->l2wrap = cuda_l2wrap;
    be->row_max = cuda_row_max;
    be->head_cross_entropy = cuda_head_cross_entropy;
    be->sum_squares = cuda_sum_squares;
    be->adamw = cuda_adamw;
    be->adamw_multi = cuda_adamw_multi;
}
