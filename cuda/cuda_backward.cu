// Backward of the position-wise ops of the CUDA backend (layernorm, groupnorm,
// token_shift, lerp, bias_act, value_residual, key_prepare, bonus_gate),
// installed by rp_cuda_install_backward. Twins of cpu_backward.c: the forward
// of each op is written above its backward, same formulas and argument order.
// Parameter gradients are deterministic: fixed row chunks, partial rows in
// scratch, rp_cuda_sum_partials (no float atomics).
#include "cuda_internal.h"

#include <cstdint>

#define FULL_MASK 0xffffffffu

// Column-reduction kernels: a block is ROW_WARPS warps; warp w takes rows
// begin + w, begin + w + ROW_WARPS, ... of its chunk, and the warps' column
// sums are added in warp order. A constant, so the summation order (hence
// the bits) depends on the shape only.
#define ROW_WARPS 8
#define ROW_WARP_THREADS (ROW_WARPS * 32)

// Threads of the one-block-per-row kernels and of the flat element-wise ones.
#define ROW_THREADS_MAX 256
#define SHIFT_THREADS 128
#define FLAT_THREADS 256

// key_prepare: torch F.normalize's eps on the norm, heads of 64 (as its forward).
#define KK_EPS 1e-12f
#define KEY_HEAD_SIZE 64

// ---- helpers ----

static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// 4 when rows of `row` floats starting at each non-NULL pointer are all
// 16-byte aligned (float4 loads), 1 otherwise. Flat kernels pass row = n.
static int vector_width(size_t row, const void *p0, const void *p1 = nullptr,
                        const void *p2 = nullptr, const void *p3 = nullptr,
                        const void *p4 = nullptr, const void *p5 = nullptr) {
    if (row % 4) return 1;
    const void *ps[6] = {p0, p1, p2, p3, p4, p5};
    for (const void *p : ps)
        if (p && !aligned16(p)) return 1;
    return 4;
}

// W consecutive floats, loaded and stored in one instruction (W = 1 or 4).
template <int W> struct vecf {
    float v[W];
};

template <int W> static __device__ __forceinline__ vecf<W> load(const float *p);
template <> __device__ __forceinline__ vecf<1> load<1>(const float *p) { return {{*p}}; }
template <> __device__ __forceinline__ vecf<4> load<4>(const float *p) {
    const float4 t = *reinterpret_cast<const float4 *>(p);
    return {{t.x, t.y, t.z, t.w}};
}

template <int W> static __device__ __forceinline__ void store(float *p, const vecf<W> &x);
template <> __device__ __forceinline__ void store<1>(float *p, const vecf<1> &x) { *p = x.v[0]; }
template <> __device__ __forceinline__ void store<4>(float *p, const vecf<4> &x) {
    *reinterpret_cast<float4 *>(p) = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
}

// Blocks of FLAT_THREADS for a grid-stride loop over n_vec items.
static unsigned flat_blocks(const rp_cuda_ctx *cx, size_t n_vec) {
    const unsigned blocks = rp_cuda_blocks(n_vec, FLAT_THREADS);
    const unsigned cap = (unsigned)(cx->n_sm > 0 ? cx->n_sm : 1) * 32;
    return blocks < cap ? blocks : cap;
}

// Butterfly sum: every lane ends with the same bits (a + b == b + a).
static __device__ __forceinline__ float warp_sum(float s) {
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL_MASK, s, off);
    return s;
}

// Sums of a and b over the block (blockDim.x a multiple of 32), returned to
// every thread; warp totals combined in warp order. Once per kernel (the
// shared memory is not reused).
static __device__ __forceinline__ void block_sum2(float &a, float &b) {
    __shared__ float warp_a[32], warp_b[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
        warp_a[warp] = a;
        warp_b[warp] = b;
    }
    __syncthreads();
    a = warp_sum(lane < n_warps ? warp_a[lane] : 0.0f);
    b = warp_sum(lane < n_warps ? warp_b[lane] : 0.0f);
}

// Rows [begin, end) of row chunk `chunk` (possibly empty: its partial is 0).
static __device__ __forceinline__ void chunk_rows(int chunk, int rows_per_chunk, int R,
                                                  int *begin, int *end) {
    const long b = (long)chunk * rows_per_chunk, e = b + rows_per_chunk;
    *begin = b < R ? (int)b : R;
    *end = e < R ? (int)e : R;
}

// The block's partial row of one accumulator: sh [ROW_WARPS, tile] holds each
// warp's column sums (the caller wrote them and synchronized); dst [n] gets
// their sum over warps in warp order.
static __device__ __forceinline__ void store_warp_sums(const float *sh, int tile, float *dst,
                                                       int n) {
    for (int l = threadIdx.x; l < n; l += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < ROW_WARPS; w++) s += sh[w * tile + l];
        dst[l] = s;
    }
}

// ---- LayerNorm / GroupNorm ----

// forward: y = (x - mean) rstd weight + bias over groups of G channels
// (LayerNorm: G = C; GroupNorm: G = N), mean/rstd [R, C/G] saved.
// backward, with xhat = (x - mean) rstd and d = dy weight, per group:
//   dx = rstd (d - mean(d) - xhat mean(d xhat))   (LayerNorm +=, GroupNorm =)
//   dweight += sum_r dy xhat,  dbias += sum_r dy.

// LayerNorm dx: one block per row. dy, x [R,C], mean/rstd [R] -> dx [R,C] += (accumulate) or =
template <int W>
__global__ static void layernorm_backward_dx_kernel(float *__restrict__ dx,
                                                    const float *__restrict__ dy,
                                                    const float *__restrict__ x,
                                                    const float *__restrict__ mean,
                                                    const float *__restrict__ rstd,
                                                    const float *__restrict__ weight, int C,
                                                    int accumulate,
                                                    __nv_bfloat16 *__restrict__ dx16) {
    const int r = blockIdx.x;
    const size_t o = (size_t)r * C;
    const float mu = mean[r], rs = rstd[r];
    float sum_d = 0.0f, sum_dxh = 0.0f;
    for (int c = threadIdx.x * W; c < C; c += blockDim.x * W) {
        const vecf<W> dyv = load<W>(dy + o + c), xv = load<W>(x + o + c), wv = load<W>(weight + c);
        for (int i = 0; i < W; i++) {
            const float d = dyv.v[i] * wv.v[i];
            sum_d += d;
            sum_dxh += d * ((xv.v[i] - mu) * rs);
        }
    }
    block_sum2(sum_d, sum_dxh);
    const float mean_d = sum_d / C, mean_dxh = sum_dxh / C;
    // second pass re-reads the row (L1/L2) rather than holding it in registers
    for (int c = threadIdx.x * W; c < C; c += blockDim.x * W) {
        const vecf<W> dyv = load<W>(dy + o + c), xv = load<W>(x + o + c), wv = load<W>(weight + c);
        vecf<W> dxv;
        if (accumulate)
            dxv = load<W>(dx + o + c);
        else
            for (int i = 0; i < W; i++) dxv.v[i] = 0.0f;
        for (int i = 0; i < W; i++)
            dxv.v[i] += rs * (dyv.v[i] * wv.v[i] - mean_d - (xv.v[i] - mu) * rs * mean_dxh);
        store<W>(dx + o + c, dxv);
        if (dx16)
            for (int i = 0; i < W; i++) dx16[o + c + i] = __float2bfloat16(dxv.v[i]);
    }
}

// GroupNorm dx: one warp per (row, group). dy, x [R,C], mean/rstd [R,H] -> dx [R,C] =
__global__ static void groupnorm_backward_dx_kernel(float *__restrict__ dx,
                                                    const float *__restrict__ dy,
                                                    const float *__restrict__ x,
                                                    const float *__restrict__ mean,
                                                    const float *__restrict__ rstd,
                                                    const float *__restrict__ weight, int R,
                                                    int C, int G) {
    const int groups = C / G, lane = threadIdx.x & 31;
    const size_t task = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (task >= (size_t)R * groups) return;  // whole warps leave together
    const int g = (int)(task % groups);
    const size_t o = (size_t)(task / groups) * C + (size_t)g * G;
    const float *wg = weight + (size_t)g * G;
    const float mu = mean[task], rs = rstd[task];
    float sum_d = 0.0f, sum_dxh = 0.0f;
    for (int j = lane; j < G; j += 32) {
        const float d = dy[o + j] * wg[j];
        sum_d += d;
        sum_dxh += d * ((x[o + j] - mu) * rs);
    }
    sum_d = warp_sum(sum_d);
    sum_dxh = warp_sum(sum_dxh);
    const float mean_d = sum_d / G, mean_dxh = sum_dxh / G;
    for (int j = lane; j < G; j += 32)
        dx[o + j] = rs * (dy[o + j] * wg[j] - mean_d - (x[o + j] - mu) * rs * mean_dxh);
}

// dweight/dbias partial rows of both norms: grid (C / (32 W), chunks).
// dy, x [R,C], mean/rstd [R, C/G] -> part_w, part_b [chunks, C] (either may be NULL)
template <int W>
__global__ static void norm_backward_params_kernel(float *__restrict__ part_w,
                                                   float *__restrict__ part_b,
                                                   const float *__restrict__ dy,
                                                   const float *__restrict__ x,
                                                   const float *__restrict__ mean,
                                                   const float *__restrict__ rstd, int R, int C,
                                                   int G, int rows_per_chunk) {
    constexpr int TILE = 32 * W;
    __shared__ float sh_w[ROW_WARPS * TILE], sh_b[ROW_WARPS * TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int col0 = blockIdx.x * TILE, c = col0 + lane * W, groups = C / G;
    int begin, end;
    chunk_rows(blockIdx.y, rows_per_chunk, R, &begin, &end);
    float acc_w[W], acc_b[W];
    int group[W];
    for (int i = 0; i < W; i++) {
        acc_w[i] = acc_b[i] = 0.0f;
        group[i] = (c + i) / G;
    }
    if (c < C) {
        for (int r = begin + warp; r < end; r += ROW_WARPS) {
            const size_t o = (size_t)r * C + c;
            const vecf<W> dyv = load<W>(dy + o), xv = load<W>(x + o);
            for (int i = 0; i < W; i++) {
                const size_t s = (size_t)r * groups + group[i];
                acc_w[i] += dyv.v[i] * ((xv.v[i] - mean[s]) * rstd[s]);
                acc_b[i] += dyv.v[i];
            }
        }
    }
    for (int i = 0; i < W; i++) {
        sh_w[warp * TILE + lane * W + i] = acc_w[i];
        sh_b[warp * TILE + lane * W + i] = acc_b[i];
    }
    __syncthreads();
    const int n = C - col0 < TILE ? C - col0 : TILE;
    float *row_w = part_w ? part_w + (size_t)blockIdx.y * C + col0 : nullptr;
    float *row_b = part_b ? part_b + (size_t)blockIdx.y * C + col0 : nullptr;
    if (row_w) store_warp_sums(sh_w, TILE, row_w, n);
    if (row_b) store_warp_sums(sh_b, TILE, row_b, n);
}

// dweight += sum_r dy xhat, dbias += sum_r dy (either may be NULL).
static void norm_backward_params(rp_cuda_ctx *cx, float *dweight, float *dbias, const float *dy,
                                 const float *x, const float *mean, const float *rstd, int R,
                                 int C, int G) {
    if (!dweight && !dbias) return;
    const int chunks = rp_cuda_row_chunks(R), rows_per_chunk = (R + chunks - 1) / chunks;
    const size_t part = (size_t)chunks * C;
    float *scratch = (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, 2 * part * sizeof(float));
    if (!scratch) return;
    float *part_w = dweight ? scratch : nullptr, *part_b = dbias ? scratch + part : nullptr;
    const int W = vector_width((size_t)C, dy, x);
    const dim3 grid(rp_cuda_blocks((size_t)C, 32 * W), chunks);
    if (W == 4)
        norm_backward_params_kernel<4><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            part_w, part_b, dy, x, mean, rstd, R, C, G, rows_per_chunk);
    else
        norm_backward_params_kernel<1><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            part_w, part_b, dy, x, mean, rstd, R, C, G, rows_per_chunk);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "norm_backward_params", {scratch, 2 * part * sizeof(float)}))
        return;
    if (dweight) rp_cuda_sum_partials(cx, dweight, part_w, chunks, (size_t)C, 1);
    if (dbias) rp_cuda_sum_partials(cx, dbias, part_b, chunks, (size_t)C, 1);
}

// forward: y [R,C] = LayerNorm(x) weight + bias; backward: dx = dx' + beta dx,
// dweight +=, dbias +=
static void cuda_layernorm_backward_beta(rp_backend *be, float *dx, float *dweight, float *dbias,
                                         const float *dy, const float *x, const float *mean,
                                         const float *rstd, const float *weight, int R, int C,
                                         float beta) {
    const int accumulate = beta != 0.0f;
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || C <= 0) return;
    const int W = vector_width((size_t)C, dx, dy, x, weight);
    int threads = (C / W + 31) / 32 * 32;
    threads = threads > ROW_THREADS_MAX ? ROW_THREADS_MAX : threads;
    // dx is the output gradient of a block's residual: the next GEMM backward's dY
    __nv_bfloat16 *dx16 = rp_cuda_act16_for_rows(cx, dx, (size_t)R * C, R);
    if (W == 4)
        layernorm_backward_dx_kernel<4><<<R, threads, 0, cx->stream>>>(
            dx, dy, x, mean, rstd, weight, C, accumulate, dx16);
    else
        layernorm_backward_dx_kernel<1><<<R, threads, 0, cx->stream>>>(
            dx, dy, x, mean, rstd, weight, C, accumulate, dx16);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "layernorm_backward", {dx, (size_t)R * C * sizeof(float)})) return;
    norm_backward_params(cx, dweight, dbias, dy, x, mean, rstd, R, C, C);
    if (dx16) rp_cuda_act16_publish(cx, dx16, dx, (size_t)R * C);
}

static void cuda_layernorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                    const float *dy, const float *x, const float *mean,
                                    const float *rstd, const float *weight, int R, int C) {
    cuda_layernorm_backward_beta(be, dx, dweight, dbias, dy, x, mean, rstd, weight, R, C, 1.0f);
}

// forward: y [R,C] = GroupNorm(x; heads of N) weight + bias; backward: dx =, dweight +=, dbias +=
static void cuda_groupnorm_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                    const float *dy, const float *x, const float *mean,
                                    const float *rstd, const float *weight, int R, int C, int N) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || C <= 0 || N <= 0) return;
    const size_t warps = (size_t)R * (C / N);
    groupnorm_backward_dx_kernel<<<rp_cuda_blocks(warps, ROW_WARP_THREADS / 32), ROW_WARP_THREADS,
                                   0, cx->stream>>>(dx, dy, x, mean, rstd, weight, R, C, N);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "groupnorm_backward", {dx, (size_t)R * C * sizeof(float)})) return;
    norm_backward_params(cx, dweight, dbias, dy, x, mean, rstd, R, C, N);
}

// ---- token shift ----

// forward: prev row t = x row t-1 inside a sequence, the slot's state for
// t = 0; then the state = the last row.
// backward: dx row t += dprev row t+1, the last row += d(state after) (the
// slot on entry); then the slot = dprev of the first row (d(state before)).
// Two kernels: every slot is read by the first before the second writes any.

// dx [R,C] += dprev shifted up one row, the slot vector for each sequence's last row
template <int W>
__global__ static void token_shift_backward_dx_kernel(float *__restrict__ dx,
                                                      const float *__restrict__ dstate_base,
                                                      size_t state_stride,
                                                      const float *__restrict__ dprev,
                                                      const int32_t *__restrict__ row_begin,
                                                      const int32_t *__restrict__ seq_len,
                                                      const int32_t *__restrict__ slot,
                                                      int n_seq, int C) {
    const int r = blockIdx.x;
    const int lo = rp_seq_of_row(row_begin, n_seq, r);
    const bool last = r == row_begin[lo] + seq_len[lo] - 1;
    const float *src = last ? dstate_base + (size_t)slot[lo] * state_stride
                            : dprev + (size_t)(r + 1) * C;
    float *dxr = dx + (size_t)r * C;
    for (int c = threadIdx.x * W; c < C; c += blockDim.x * W) {
        vecf<W> d = load<W>(dxr + c);
        const vecf<W> s = load<W>(src + c);
        for (int i = 0; i < W; i++) d.v[i] += s.v[i];
        store<W>(dxr + c, d);
    }
}

// slot vector of sequence s = dprev row row_begin[s]; one block per sequence
template <int W>
__global__ static void token_shift_backward_state_kernel(float *__restrict__ dstate_base,
                                                         size_t state_stride,
                                                         const float *__restrict__ dprev,
                                                         const int32_t *__restrict__ row_begin,
                                                         const int32_t *__restrict__ slot, int C) {
    const int s = blockIdx.x;
    float *dst = dstate_base + (size_t)slot[s] * state_stride;
    const float *src = dprev + (size_t)row_begin[s] * C;
    for (int c = threadIdx.x * W; c < C; c += blockDim.x * W) store<W>(dst + c, load<W>(src + c));
}

static void cuda_token_shift_backward(rp_backend *be, float *dx, float *dstate_base,
                                      size_t state_stride, const float *dprev,
                                      const rp_batch *batch, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (batch->n_seq <= 0 || batch->n_rows <= 0 || C <= 0) return;
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    const int W = state_stride % 4 ? 1 : vector_width((size_t)C, dx, dstate_base, dprev);
    if (W == 4)
        token_shift_backward_dx_kernel<4><<<batch->n_rows, SHIFT_THREADS, 0, cx->stream>>>(
            dx, dstate_base, state_stride, dprev, b.row_begin, b.seq_len, b.slot, b.n_seq, C);
    else
        token_shift_backward_dx_kernel<1><<<batch->n_rows, SHIFT_THREADS, 0, cx->stream>>>(
            dx, dstate_base, state_stride, dprev, b.row_begin, b.seq_len, b.slot, b.n_seq, C);
    if (!RP_CUDA_LAUNCHED(cx, "token_shift_backward")) return;
    if (W == 4)
        token_shift_backward_state_kernel<4><<<b.n_seq, SHIFT_THREADS, 0, cx->stream>>>(
            dstate_base, state_stride, dprev, b.row_begin, b.slot, C);
    else
        token_shift_backward_state_kernel<1><<<b.n_seq, SHIFT_THREADS, 0, cx->stream>>>(
            dstate_base, state_stride, dprev, b.row_begin, b.slot, C);
    RP_CUDA_LAUNCHED(cx, "token_shift_backward state");
}

// ---- lerp ----

// forward: y [R,C] = x + (prev - x) mu, mu [C]
// backward: dx += dy (1 - mu), dprev += dy mu, dmu += sum_r dy (prev - x)

// grid (C / (32 W), chunks); dy, x, prev [R,C] -> dx, dprev += (or =), part_mu [chunks, C] (may be NULL)
template <int W>
__global__ static void lerp_backward_kernel(float *__restrict__ dx, float *__restrict__ dprev,
                                            float *__restrict__ part_mu,
                                            const float *__restrict__ dy,
                                            const float *__restrict__ x,
                                            const float *__restrict__ prev,
                                            const float *__restrict__ mu, int R, int C,
                                            int rows_per_chunk, int accumulate) {
    constexpr int TILE = 32 * W;
    __shared__ float sh[ROW_WARPS * TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int col0 = blockIdx.x * TILE, c = col0 + lane * W;
    int begin, end;
    chunk_rows(blockIdx.y, rows_per_chunk, R, &begin, &end);
    float acc[W];
    for (int i = 0; i < W; i++) acc[i] = 0.0f;
    if (c < C) {
        const vecf<W> m = load<W>(mu + c);
        for (int r = begin + warp; r < end; r += ROW_WARPS) {
            const size_t o = (size_t)r * C + c;
            const vecf<W> dyv = load<W>(dy + o), xv = load<W>(x + o), pv = load<W>(prev + o);
            vecf<W> dxv, dpv;
            if (accumulate) {
                dxv = load<W>(dx + o);
                dpv = load<W>(dprev + o);
            } else {
                for (int i = 0; i < W; i++) dxv.v[i] = dpv.v[i] = 0.0f;
            }
            for (int i = 0; i < W; i++) {
                dxv.v[i] += dyv.v[i] * (1.0f - m.v[i]);
                dpv.v[i] += dyv.v[i] * m.v[i];
                acc[i] += dyv.v[i] * (pv.v[i] - xv.v[i]);
            }
            store<W>(dx + o, dxv);
            store<W>(dprev + o, dpv);
        }
    }
    if (!part_mu) return;  // uniform over the grid
    for (int i = 0; i < W; i++) sh[warp * TILE + lane * W + i] = acc[i];
    __syncthreads();
    const int n = C - col0 < TILE ? C - col0 : TILE;
    store_warp_sums(sh, TILE, part_mu + (size_t)blockIdx.y * C + col0, n);
}

static void cuda_lerp_backward_beta(rp_backend *be, float *dx, float *dprev, float *dmu,
                                    const float *dy, const float *x, const float *prev,
                                    const float *mu, int R, int C, float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int accumulate = beta != 0.0f;
    if (R <= 0 || C <= 0) return;
    const int chunks = rp_cuda_row_chunks(R), rows_per_chunk = (R + chunks - 1) / chunks;
    float *part_mu = nullptr;
    if (dmu) {
        part_mu = (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP,
                                           (size_t)chunks * C * sizeof(float));
        if (!part_mu) return;
    }
    const int W = vector_width((size_t)C, dx, dprev, dy, x, prev, mu);
    const dim3 grid(rp_cuda_blocks((size_t)C, 32 * W), chunks);
    if (W == 4)
        lerp_backward_kernel<4><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            dx, dprev, part_mu, dy, x, prev, mu, R, C, rows_per_chunk, accumulate);
    else
        lerp_backward_kernel<1><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            dx, dprev, part_mu, dy, x, prev, mu, R, C, rows_per_chunk, accumulate);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "lerp_backward", {dx, (size_t)R * C * sizeof(float)}, {dprev, (size_t)R * C * sizeof(float)},
                              {part_mu, (size_t)chunks * C * sizeof(float)}))
        return;
    if (dmu) rp_cuda_sum_partials(cx, dmu, part_mu, chunks, (size_t)C, 1);
}

static void cuda_lerp_backward(rp_backend *be, float *dx, float *dprev, float *dmu,
                               const float *dy, const float *x, const float *prev,
                               const float *mu, int R, int C) {
    cuda_lerp_backward_beta(be, dx, dprev, dmu, dy, x, prev, mu, R, C, 1.0f);
}

// ---- fused training mix backward (backend.h shift_mix_backward) ----

// The gradient terms, passed by value: term j is dmix[j] with mu[j], dmu[j].
struct mix_terms {
    const float *dmix[RP_MIX_TERMS_MAX];
    const float *mu[RP_MIX_TERMS_MAX];
    float *dmu[RP_MIX_TERMS_MAX];
    unsigned bf16;  // bit j: dmix[j] holds bf16 values in place (a gemm_only GEMM output)
};

// W mix-gradient values at element o of term j, f32 or bf16 in place.
template <int W>
static __device__ __forceinline__ vecf<W> load_dmix(const mix_terms &t, int j, size_t o) {
    if (!(t.bf16 >> j & 1u)) return load<W>(t.dmix[j] + o);
    const __nv_bfloat16 *p = reinterpret_cast<const __nv_bfloat16 *>(t.dmix[j]) + o;
    vecf<W> v;
    if (W == 4) {  // one 8-byte load: o and the range start are multiples of 4
        union {
            unsigned long long raw;
            __nv_bfloat16 h[4];
        } t;
        t.raw = *reinterpret_cast<const unsigned long long *>(p);
        for (int i = 0; i < W; i++) v.v[i] = __bfloat162float(t.h[i]);
    } else {
        for (int i = 0; i < W; i++) v.v[i] = __bfloat162float(p[i]);
    }
    return v;
}

// Row r's own parts at columns c..c+W: dxo = sum_j dmix_j (1 - mu_j) and
// dp = sum_j dmix_j mu_j, the terms in order from 0 (lerp_backward_beta's
// sums), and, when acc is non-NULL, acc[j] += dmix_j (prev - x).
template <int W>
static __device__ __forceinline__ void mix_row(const mix_terms &t, int n_terms, size_t o,
                                               int c, const float *x, const float *prev,
                                               vecf<W> &dxo, vecf<W> &dp,
                                               float (*acc)[W], bool use_formed = false,
                                               vecf<W> formed = {}) {
    vecf<W> diff;
    if (acc && use_formed) {
        diff = formed;  // prev - x formed by the caller (x and prev not stored)
    } else if (acc) {
        const vecf<W> xv = load<W>(x + o), pv = load<W>(prev + o);
        for (int i = 0; i < W; i++) diff.v[i] = pv.v[i] - xv.v[i];
    }
    for (int i = 0; i < W; i++) dxo.v[i] = dp.v[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < RP_MIX_TERMS_MAX; j++) {
        if (j >= n_terms) break;
        const vecf<W> d = load_dmix<W>(t, j, o), m = load<W>(t.mu[j] + c);
        for (int i = 0; i < W; i++) {
            dxo.v[i] += d.v[i] * (1.0f - m.v[i]);
            dp.v[i] += d.v[i] * m.v[i];
            if (acc) acc[j][i] += d.v[i] * diff.v[i];
        }
    }
}

// One row of a bottom-up walk over a run of rows ending at row `last`: row
// r's d(mix input) with the token shift's d(prev) of the row below added
// (`below`, carried: the slot's d(state after) for a sequence's last row,
// recomputed from row r+1's terms for the run's last row); a sequence's
// first row stores its d(prev) to dprev; leaves row r's d(prev) in `below`.
// s: the sequence of the row above, moved down as r passes sequence starts.
template <int W>
static __device__ __forceinline__ vecf<W> mix_row_carried(
    const mix_terms &t, int n_terms, int r, int last, int c, int C, const float *x,
    const float *prev, float (*acc)[W], const float *dstate_base, size_t state_stride,
    const int32_t *row_begin, const int32_t *seq_len, const int32_t *slot, int &s,
    float *dprev, vecf<W> &below, bool use_formed = false, vecf<W> formed = {}) {
    while (s > 0 && r < row_begin[s]) s--;
    const size_t o = (size_t)r * C + c;
    vecf<W> dxo, dp;
    mix_row<W>(t, n_terms, o, c, x, prev, dxo, dp, acc, use_formed, formed);
    if (r == row_begin[s] + seq_len[s] - 1) {
        below = load<W>(dstate_base + (size_t)slot[s] * state_stride + c);
    } else if (r == last) {
        vecf<W> unused;
        mix_row<W>(t, n_terms, o + C, c, x, prev, unused, below, nullptr);
    }
    for (int i = 0; i < W; i++) dxo.v[i] += below.v[i];
    if (r == row_begin[s]) store<W>(dprev + o, dp);
    below = dp;
    return dxo;
}

// grid (C / (32 W), chunks). Warp w of a chunk takes a contiguous run of its
// rows, last row first, carrying d(prev) of the row below: dx row r = its
// own part + d(prev) of row r+1 (the slot's d(state after) for a sequence's
// last row; recomputed from row r+1's terms for the run's first row). The
// d(prev) of each sequence's first row goes to dprev for the finish kernel
// (the slots are read here, written there). part_mu [n_terms, chunks, C].
template <int W>
__global__ static void shift_mix_backward_kernel(
    float *__restrict__ dx, float *__restrict__ dprev, float *__restrict__ part_mu,
    mix_terms t, int n_terms, const float *__restrict__ x, const float *__restrict__ prev,
    const float *__restrict__ dstate_base, size_t state_stride,
    const int32_t *__restrict__ row_begin, const int32_t *__restrict__ seq_len,
    const int32_t *__restrict__ slot, int n_seq, int R, int C, int rows_per_chunk) {
    constexpr int TILE = 32 * W;
    __shared__ float sh[ROW_WARPS * TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int col0 = blockIdx.x * TILE, c = col0 + lane * W;
    int begin, end;
    chunk_rows(blockIdx.y, rows_per_chunk, R, &begin, &end);
    const int per = (end - begin + ROW_WARPS - 1) / ROW_WARPS;
    const int wb = begin + warp * per < end ? begin + warp * per : end;
    const int we = wb + per < end ? wb + per : end;
    float acc[RP_MIX_TERMS_MAX][W];
#pragma unroll
    for (int j = 0; j < RP_MIX_TERMS_MAX; j++)
        for (int i = 0; i < W; i++) acc[j][i] = 0.0f;
    if (c < C && wb < we) {
        int s = rp_seq_of_row(row_begin, n_seq, we - 1);
        vecf<W> below;  // d(prev) of row r + 1
        for (int r = we - 1; r >= wb; r--)
            store<W>(dx + (size_t)r * C + c,
                     mix_row_carried<W>(t, n_terms, r, we - 1, c, C, x, prev, acc, dstate_base,
                                        state_stride, row_begin, seq_len, slot, s, dprev, below));
    }
    const int n = C - col0 < TILE ? C - col0 : TILE;
    for (int j = 0; j < n_terms; j++) {
        for (int i = 0; i < W; i++) sh[warp * TILE + lane * W + i] = acc[j][i];
        __syncthreads();
        store_warp_sums(sh, TILE, part_mu + ((size_t)j * gridDim.y + blockIdx.y) * C + col0, n);
        __syncthreads();
    }
}

// Per column: dmu[j] += the sum of term j's chunk partials (in chunk order,
// terms in order: a dmu of two terms gets them one after the other), then,
// when n_parts = n_terms + 2 (shift_mix_ln_backward), dweight and dbias the
// same way; then each sequence's slot = d(prev) of its first row.
// part [n_parts, chunks, C].
__global__ static void shift_mix_finish_kernel(mix_terms t, int n_terms, int n_parts,
                                               float *dweight, float *dbias,
                                               const float *__restrict__ part, int chunks,
                                               float *__restrict__ dstate_base,
                                               size_t state_stride,
                                               const float *__restrict__ dprev,
                                               const int32_t *__restrict__ row_begin,
                                               const int32_t *__restrict__ slot, int n_seq,
                                               int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int j = 0; j < n_parts; j++) {
        float *dst = j < n_terms ? t.dmu[j] : (j == n_terms ? dweight : dbias);
        float sum = 0.0f;
        for (int p = 0; p < chunks; p++) sum += part[((size_t)j * chunks + p) * C + c];
        if (dst) dst[c] += sum;
    }
    for (int s = 0; s < n_seq; s++)
        dstate_base[(size_t)slot[s] * state_stride + c] = dprev[(size_t)row_begin[s] * C + c];
}

static void cuda_shift_mix_backward(rp_backend *be, float *dx, float *dprev, float *const *dmu,
                                    const float *const *dmix, const float *const *mu,
                                    int n_terms, const float *x, const float *prev,
                                    float *dstate_base, size_t state_stride,
                                    const rp_batch *batch, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int R = batch->n_rows;
    if (R <= 0 || batch->n_seq <= 0 || C <= 0) return;
    if (n_terms < 1 || n_terms > RP_MIX_TERMS_MAX) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "shift_mix_backward: n_terms outside [1, RP_MIX_TERMS_MAX]", __FILE__,
                       __LINE__);
        return;
    }
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    const int chunks = rp_cuda_row_chunks(R), rows_per_chunk = (R + chunks - 1) / chunks;
    const size_t part_floats = (size_t)n_terms * chunks * C;
    float *part_mu = (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, part_floats * sizeof(float));
    if (!part_mu) return;
    mix_terms t = {};
    int W = state_stride % 4 ? 1 : vector_width((size_t)C, dx, dprev, x, prev, dstate_base);
    for (int j = 0; j < n_terms; j++) {
        t.dmix[j] = dmix[j];
        t.mu[j] = mu[j];
        t.dmu[j] = dmu[j];
        if (vector_width((size_t)C, dmix[j], mu[j]) != 4) W = 1;
    }
    const dim3 grid(rp_cuda_blocks((size_t)C, 32 * W), chunks);
    if (W == 4)
        shift_mix_backward_kernel<4><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            dx, dprev, part_mu, t, n_terms, x, prev, dstate_base, state_stride, b.row_begin,
            b.seq_len, b.slot, b.n_seq, R, C, rows_per_chunk);
    else
        shift_mix_backward_kernel<1><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            dx, dprev, part_mu, t, n_terms, x, prev, dstate_base, state_stride, b.row_begin,
            b.seq_len, b.slot, b.n_seq, R, C, rows_per_chunk);
    const size_t rc = (size_t)R * C * sizeof(float);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "shift_mix_backward", {dx, rc}, {dprev, rc},
                              {part_mu, part_floats * sizeof(float)}))
        return;
    shift_mix_finish_kernel<<<rp_cuda_blocks((size_t)C, 256), 256, 0, cx->stream>>>(
        t, n_terms, n_terms, nullptr, nullptr, part_mu, chunks, dstate_base, state_stride, dprev, b.row_begin, b.slot,
        b.n_seq, C);
    RP_CUDA_LAUNCHED(cx, "shift_mix_backward finish");
}

// ---- fused mix + LayerNorm backward (backend.h shift_mix_ln_backward) ----

// The LayerNorm input's gradient is the mix backward's dx (dxa), a row-local
// function of the mix gradients apart from the token shift, so one pass over
// a block's rows forms dxa row by row and runs the norm's backward on it: the
// [R,C] dxa is never stored or read back, nor is x read a second time for
// the norm's parameters. A block of C / 4 threads takes a row chunk, each
// thread 4 consecutive columns for all its rows (the row sums need every
// column, the parameter sums stay in the thread's registers). At most 512
// threads (C <= 2048): the kernel holds ~126 registers a thread, and 512
// such threads fill an SM's 64K registers.
#define MIX_LN_COLS 4
#define MIX_LN_THREADS_MAX 512
#define MIX_LN_MAX_C (MIX_LN_THREADS_MAX * MIX_LN_COLS)

// block_sum2 for use inside a loop: the same arithmetic (hence bits), the
// shared warp totals guarded against the previous call's readers.
static __device__ __forceinline__ void block_sum2_loop(float &a, float &b, float *sh_a,
                                                       float *sh_b) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();
    if (lane == 0) {
        sh_a[warp] = a;
        sh_b[warp] = b;
    }
    __syncthreads();
    a = warp_sum(lane < n_warps ? sh_a[lane] : 0.0f);
    b = warp_sum(lane < n_warps ? sh_b[lane] : 0.0f);
}

// grid chunks, block C / 4. Rows of the chunk last first, carrying d(prev)
// of the row below as shift_mix_backward_kernel does (same per-element
// arithmetic); then layernorm_backward_dx_kernel's arithmetic on the row
// (the same bits for C = 1024, where that kernel also gives each of 256
// threads one float4). part [(n_terms + 2), chunks, C]: the terms' dmu
// partials, then dweight's, then dbias's.
__global__ static void __launch_bounds__(MIX_LN_THREADS_MAX) shift_mix_ln_backward_kernel(
    float *__restrict__ dx, __nv_bfloat16 *__restrict__ dx16, float *__restrict__ dprev,
    float *__restrict__ part, mix_terms t, int n_terms, const float *__restrict__ xa,
    const float *__restrict__ prev, const float *__restrict__ dstate_base, size_t state_stride,
    const float *__restrict__ x, const float *__restrict__ mean, const float *__restrict__ rstd,
    const float *__restrict__ weight, const float *__restrict__ bias,
    const int32_t *__restrict__ row_begin, const int32_t *__restrict__ seq_len,
    const int32_t *__restrict__ slot, int n_seq, int R, int C, int rows_per_chunk) {
    constexpr int W = MIX_LN_COLS;
    __shared__ float sh_a[32], sh_b[32];
    const int c = threadIdx.x * W;
    int begin, end;
    chunk_rows(blockIdx.x, rows_per_chunk, R, &begin, &end);
    float acc[RP_MIX_TERMS_MAX][W], acc_w[W], acc_b[W];
#pragma unroll
    for (int j = 0; j < RP_MIX_TERMS_MAX; j++)
        for (int i = 0; i < W; i++) acc[j][i] = 0.0f;
    for (int i = 0; i < W; i++) acc_w[i] = acc_b[i] = 0.0f;
    const vecf<W> wv = load<W>(weight + c);
    if (begin < end) {  // uniform over the block: every thread meets the syncs
        int s = rp_seq_of_row(row_begin, n_seq, end - 1);
        vecf<W> below;  // d(prev) of row r + 1
        for (int r = end - 1; r >= begin; r--) {
            const size_t o = (size_t)r * C + c;
            const float mu = mean[r], rs = rstd[r];
            const vecf<W> xv = load<W>(x + o);
            // xa NULL: the row's norm output and its prev formed again as
            // ln_shift_mix_train_kernel formed them (rp_ln_value, the same
            // bits); prev holds sequences' first rows only, [n_seq, C]
            vecf<W> formed = {};
            if (!xa) {
                while (s > 0 && r < row_begin[s]) s--;
                const vecf<W> bv = load<W>(bias + c);
                vecf<W> pv;
                if (r == row_begin[s]) {
                    pv = load<W>(prev + (size_t)s * C + c);
                } else {
                    const float mu2 = mean[r - 1], rs2 = rstd[r - 1];
                    const vecf<W> x2 = load<W>(x + o - C);
                    for (int i = 0; i < W; i++)
                        pv.v[i] = rp_ln_value(x2.v[i], mu2, rs2, wv.v[i], bv.v[i]);
                }
                for (int i = 0; i < W; i++)
                    formed.v[i] = pv.v[i] - rp_ln_value(xv.v[i], mu, rs, wv.v[i], bv.v[i]);
            }
            const vecf<W> dxa = mix_row_carried<W>(t, n_terms, r, end - 1, c, C, xa, prev, acc,
                                                   dstate_base, state_stride, row_begin, seq_len,
                                                   slot, s, dprev, below, !xa, formed);
            // LayerNorm backward of row r with dy = dxa
            float sum_d = 0.0f, sum_dxh = 0.0f;
            for (int i = 0; i < W; i++) {
                const float d = dxa.v[i] * wv.v[i];
                sum_d += d;
                sum_dxh += d * ((xv.v[i] - mu) * rs);
            }
            block_sum2_loop(sum_d, sum_dxh, sh_a, sh_b);
            const float mean_d = sum_d / C, mean_dxh = sum_dxh / C;
            vecf<W> dxv = load<W>(dx + o);
            for (int i = 0; i < W; i++) {
                dxv.v[i] += rs * (dxa.v[i] * wv.v[i] - mean_d - (xv.v[i] - mu) * rs * mean_dxh);
                acc_w[i] += dxa.v[i] * ((xv.v[i] - mu) * rs);
                acc_b[i] += dxa.v[i];
            }
            store<W>(dx + o, dxv);
            if (dx16)
                for (int i = 0; i < W; i++) dx16[o + i] = __float2bfloat16(dxv.v[i]);
        }
    }
    const size_t stride = (size_t)gridDim.x * C, row = (size_t)blockIdx.x * C + c;
    for (int j = 0; j < n_terms; j++) {
        vecf<W> v;
        for (int i = 0; i < W; i++) v.v[i] = acc[j][i];
        store<W>(part + j * stride + row, v);
    }
    vecf<W> vw, vb;
    for (int i = 0; i < W; i++) {
        vw.v[i] = acc_w[i];
        vb.v[i] = acc_b[i];
    }
    store<W>(part + n_terms * stride + row, vw);
    store<W>(part + (n_terms + 1) * stride + row, vb);
}

static void cuda_shift_mix_ln_backward(rp_backend *be, float *dx, float *dweight, float *dbias,
                                       float *dxa, float *dprev, float *const *dmu,
                                       const float *const *dmix, const float *const *mu,
                                       int n_terms, const float *xa, const float *prev,
                                       float *dstate_base, size_t state_stride, const float *x,
                                       const float *mean, const float *rstd,
                                       const float *weight, const float *bias,
                                       const rp_batch *batch, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int R = batch->n_rows;
    if (R <= 0 || batch->n_seq <= 0 || C <= 0) return;
    if (n_terms < 1 || n_terms > RP_MIX_TERMS_MAX || (!xa && !bias)) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "shift_mix_ln_backward: n_terms outside [1, RP_MIX_TERMS_MAX]", __FILE__,
                       __LINE__);
        return;
    }
    // The fused kernel needs whole warps of float4 columns and aligned rows;
    // any other shape runs the two ops (the same results, by definition).
    int fits = C % (32 * MIX_LN_COLS) == 0 && C <= MIX_LN_MAX_C && state_stride % 4 == 0 &&
               vector_width((size_t)C, dx, dprev, xa, prev, dstate_base, x) == 4 &&
               vector_width((size_t)C, weight, bias) == 4;
    for (int j = 0; j < n_terms; j++)
        if (vector_width((size_t)C, dmix[j], mu[j]) != 4) fits = 0;
    if (!fits && !xa) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "shift_mix_ln_backward: xa NULL on a shape the fused kernel does not "
                       "take (ln_mix_again_fits must refuse it; store xa there)",
                       __FILE__, __LINE__);
        return;
    }
    for (int j = 0; j < n_terms && !fits; j++) {
        const rp_cuda_inplace *ip = rp_cuda_inplace_at(cx, dmix[j], (size_t)R * C);
        if (ip && !ip->f32) {
            rp_cuda_record(cx, cudaErrorInvalidValue,
                           "shift_mix_ln_backward: a bf16 in-place dmix on a shape the fused "
                           "kernel does not take (hint dmix only where ln_mix_again_fits)",
                           __FILE__, __LINE__);
            return;
        }
    }
    if (!fits) {
        cuda_shift_mix_backward(be, dxa, dprev, dmu, dmix, mu, n_terms, xa, prev, dstate_base,
                                state_stride, batch, C);
        cuda_layernorm_backward(be, dx, dweight, dbias, dxa, x, mean, rstd, weight, R, C);
        return;
    }
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    const int chunks = rp_cuda_row_chunks(R), rows_per_chunk = (R + chunks - 1) / chunks;
    const size_t part_floats = (size_t)(n_terms + 2) * chunks * C;
    float *part = (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, part_floats * sizeof(float));
    if (!part) return;
    mix_terms t = {};
    for (int j = 0; j < n_terms; j++) {
        t.dmix[j] = dmix[j];
        t.mu[j] = mu[j];
        t.dmu[j] = dmu[j];
        // a gemm_only GEMM's output (backend.h mix_grads16): its bf16 in
        // place, or with the copies off its f32 rounded values
        const rp_cuda_inplace *ip = rp_cuda_inplace_at(cx, dmix[j], (size_t)R * C);
        if (ip && !ip->f32) t.bf16 |= 1u << j;
    }
    // dx is the output gradient of a block's residual: the next GEMM backward's dY
    __nv_bfloat16 *dx16 = rp_cuda_act16_for_rows(cx, dx, (size_t)R * C, R);
    shift_mix_ln_backward_kernel<<<chunks, C / MIX_LN_COLS, 0, cx->stream>>>(
        dx, dx16, dprev, part, t, n_terms, xa, prev, dstate_base, state_stride, x, mean, rstd,
        weight, bias, b.row_begin, b.seq_len, b.slot, b.n_seq, R, C, rows_per_chunk);
    const size_t rc = (size_t)R * C * sizeof(float);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "shift_mix_ln_backward", {dx, rc}, {dprev, rc},
                              {part, part_floats * sizeof(float)}))
        return;
    shift_mix_finish_kernel<<<rp_cuda_blocks((size_t)C, 256), 256, 0, cx->stream>>>(
        t, n_terms, n_terms + 2, dweight, dbias, part, chunks, dstate_base, state_stride, dprev, b.row_begin,
        b.slot, b.n_seq, C);
    if (!RP_CUDA_LAUNCHED(cx, "shift_mix_ln_backward finish")) return;
    if (dx16) rp_cuda_act16_publish(cx, dx16, dx, (size_t)R * C);
}

// ---- bias + activation ----

// forward: y [R,C] = act(pre + bias)
// backward, act' from the output y: tanh 1 - y^2, sigmoid y (1 - y),
// relu^2 2 sqrt(y) (= 2 relu(t)), none 1: dy *= act' in place (= d pre);
// dbias += sum_r d pre (optional).
static __device__ __forceinline__ float act_derivative(int act, float y) {
    switch (act) {
    case RP_ACT_TANH: return 1.0f - y * y;
    case RP_ACT_SIGMOID: return y * (1.0f - y);
    case RP_ACT_RELU_SQUARED: return 2.0f * sqrtf(y);
    default: return 1.0f;
    }
}

static __device__ __forceinline__ float y_at(const float *y, size_t i) { return y[i]; }
static __device__ __forceinline__ float y_at(const __nv_bfloat16 *y, size_t i) {
    return __bfloat162float(y[i]);
}

// no bias: dy [n] *= act'(y), grid-stride over vectors of W; dy16 (optional)
// gets bf16(dy), the operand of the GEMM backward that follows (rp_cuda_act16).
// YT bf16: y is a GEMM-only output stored bf16 in place (rp_cuda_inplace).
template <int W, typename YT>
__global__ static void bias_act_backward_kernel(float *__restrict__ dy,
                                                const YT *__restrict__ y, size_t n, int act,
                                                __nv_bfloat16 *__restrict__ dy16) {
    const size_t stride = (size_t)gridDim.x * blockDim.x * W;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W; i < n; i += stride) {
        vecf<W> d = load<W>(dy + i);
        for (int j = 0; j < W; j++) d.v[j] *= act_derivative(act, y_at(y, i + j));
        store<W>(dy + i, d);
        if (dy16)
            for (int j = 0; j < W; j++) dy16[i + j] = __float2bfloat16(d.v[j]);
    }
}

// The same on a bf16 in-place dy (a GEMM-only gradient, rp_cuda_inplace: the
// GEMM backward before wrote it bf16, the GEMM backward after reads it):
// dy read and written as bf16 in place, each element by its own thread (W =
// 8: one 16-byte access); f32 math inside, the product rounded once. No f32
// dy exists, so no bf16 copy either.
template <int W, typename YT>
__global__ static void bias_act_backward16_kernel(__nv_bfloat16 *__restrict__ dy,
                                                  const YT *__restrict__ y, size_t n, int act) {
    const size_t stride = (size_t)gridDim.x * blockDim.x * W;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W; i < n; i += stride) {
        union {
            uint4 raw;
            __nv_bfloat16 h[8];
        } t;
        if constexpr (W == 8) {
            t.raw = *reinterpret_cast<const uint4 *>(dy + i);
        } else {
            t.h[0] = dy[i];
        }
#pragma unroll
        for (int j = 0; j < W; j++)
            t.h[j] = __float2bfloat16(__bfloat162float(t.h[j]) *
                                      act_derivative(act, y_at(y, i + j)));
        if constexpr (W == 8) {
            *reinterpret_cast<uint4 *>(dy + i) = t.raw;
        } else {
            dy[i] = t.h[0];
        }
    }
}

// dy [n] *= act'(y) (+ its bf16 copy dy16 when non-NULL) on the flat grid:
// y read as bf16 where it is stored so in place (y16), else as fp32; float4
// lanes where dy and y allow.
static void launch_bias_act_backward(rp_cuda_ctx *cx, float *dy, const float *y,
                                     const __nv_bfloat16 *y16, size_t n, int act,
                                     __nv_bfloat16 *dy16) {
    const int W = vector_width(n, dy, y);
    const unsigned blocks = flat_blocks(cx, n / W);
    if (y16 && W == 4)
        bias_act_backward_kernel<4, __nv_bfloat16>
            <<<blocks, FLAT_THREADS, 0, cx->stream>>>(dy, y16, n, act, dy16);
    else if (y16)
        bias_act_backward_kernel<1, __nv_bfloat16>
            <<<blocks, FLAT_THREADS, 0, cx->stream>>>(dy, y16, n, act, dy16);
    else if (W == 4)
        bias_act_backward_kernel<4, float><<<blocks, FLAT_THREADS, 0, cx->stream>>>(
            dy, y, n, act, dy16);
    else
        bias_act_backward_kernel<1, float><<<blocks, FLAT_THREADS, 0, cx->stream>>>(
            dy, y, n, act, dy16);
}

// dy [n] a GEMM-only gradient in place (ip): bf16 in, bf16 out; with the
// copies off its f32 twin (rounded values in, d pre rounded to bf16 values
// the same way), so copies on and off give the same bits.
static void bias_act_backward_inplace(rp_cuda_ctx *cx, const rp_cuda_inplace *ip, float *dy,
                                      const float *y, size_t n, int act) {
    const __nv_bfloat16 *y16 = rp_cuda_inplace_find(cx, y, n);
    if (!y16 && !rp_cuda_store16_fits(cx, y, n, "bias_act_backward (y)")) return;
    if (ip->f32) {
        launch_bias_act_backward(cx, dy, y, y16, n, act, nullptr);
        if (!RP_CUDA_LAUNCHED_OUT(cx, "bias_act_backward", {dy, n * sizeof(float)})) return;
        rp_cuda_round_bf16(cx, dy, n);
        rp_cuda_inplace_add(cx, dy, n, 1);
        return;
    }
    __nv_bfloat16 *d16 = (__nv_bfloat16 *)dy;
    const int vec = n % 8 == 0 && aligned16(dy);
    const unsigned blocks = flat_blocks(cx, vec ? n / 8 : n);
    if (y16 && vec)
        bias_act_backward16_kernel<8, __nv_bfloat16>
            <<<blocks, FLAT_THREADS, 0, cx->stream>>>(d16, y16, n, act);
    else if (y16)
        bias_act_backward16_kernel<1, __nv_bfloat16>
            <<<blocks, FLAT_THREADS, 0, cx->stream>>>(d16, y16, n, act);
    else if (vec)
        bias_act_backward16_kernel<8, float><<<blocks, FLAT_THREADS, 0, cx->stream>>>(d16, y, n,
                                                                                       act);
    else
        bias_act_backward16_kernel<1, float><<<blocks, FLAT_THREADS, 0, cx->stream>>>(d16, y, n,
                                                                                       act);
    // writes only inside its own range, which stays in place
    RP_CUDA_LAUNCHED_OUT(cx, "bias_act_backward (bf16)", {NULL, 0});
}

// with bias: grid (C / (32 W), chunks); dy [R,C] *= act'(y), part_b [chunks, C] = sums of d pre;
// store_f32 0: d pre goes to dy16 only (a GEMM-only d pre), dy is only read;
// YT bf16: y stored bf16 in place (training's a for the a0 bias, rp_cuda_inplace);
// dy_in16 (RP_ACT_NONE only, dy16 NULL): dy is read as these bf16 values
// instead (dy stored bf16 in place), in the same order, so the bias sums
// are those of the f32 path over the same rounded values
template <int W, typename YT>
__global__ static void bias_act_backward_bias_kernel(float *__restrict__ dy,
                                                     float *__restrict__ part_b,
                                                     const YT *__restrict__ y, int R, int C,
                                                     int act, int rows_per_chunk,
                                                     __nv_bfloat16 *__restrict__ dy16,
                                                     int store_f32,
                                                     const __nv_bfloat16 *__restrict__ dy_in16) {
    constexpr int TILE = 32 * W;
    __shared__ float sh[ROW_WARPS * TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int col0 = blockIdx.x * TILE, c = col0 + lane * W;
    int begin, end;
    chunk_rows(blockIdx.y, rows_per_chunk, R, &begin, &end);
    float acc[W];
    for (int i = 0; i < W; i++) acc[i] = 0.0f;
    if (c < C) {
        for (int r = begin + warp; r < end; r += ROW_WARPS) {
            const size_t o = (size_t)r * C + c;
            vecf<W> d;
            if (dy_in16)
                for (int i = 0; i < W; i++) d.v[i] = __bfloat162float(dy_in16[o + i]);
            else
                d = load<W>(dy + o);
            if (act != RP_ACT_NONE) {
                for (int i = 0; i < W; i++) d.v[i] *= act_derivative(act, y_at(y, o + i));
                if (store_f32) store<W>(dy + o, d);
            }
            if (dy16)
                for (int i = 0; i < W; i++) dy16[o + i] = __float2bfloat16(d.v[i]);
            for (int i = 0; i < W; i++) acc[i] += d.v[i];
        }
    }
    for (int i = 0; i < W; i++) sh[warp * TILE + lane * W + i] = acc[i];
    __syncthreads();
    const int n = C - col0 < TILE ? C - col0 : TILE;
    store_warp_sums(sh, TILE, part_b + (size_t)blockIdx.y * C + col0, n);
}

static void cuda_bias_act_backward(rp_backend *be, float *dy, float *dbias, const float *y, int R,
                                   int C, rp_activation act) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || C <= 0) return;
    if (!dbias) {
        if (act == RP_ACT_NONE) return;  // d pre = dy
        const size_t n = (size_t)R * C;
        const rp_cuda_inplace *ip = rp_cuda_inplace_at(cx, dy, n);
        if (ip) {
            bias_act_backward_inplace(cx, ip, dy, y, n, (int)act);
            return;
        }
        __nv_bfloat16 *dy16 = rp_cuda_act16_for_rows(cx, dy, n, R);
        // y stored bf16 in place (a GEMM-only output): read as bf16, so
        // act' comes from bf16(y) (docs/gpu.md "Precision")
        const __nv_bfloat16 *y16 = rp_cuda_inplace_find(cx, y, n);
        if ((!y16 && !rp_cuda_store16_fits(cx, y, n, "bias_act_backward (y)")) ||
            !rp_cuda_store16_fits(cx, dy, n, "bias_act_backward (dy)"))
            return;
        launch_bias_act_backward(cx, dy, y, y16, n, act, dy16);
        RP_CUDA_LAUNCHED_OUT(cx, "bias_act_backward", {dy, n * sizeof(float)});
        if (dy16) rp_cuda_act16_publish(cx, dy16, dy, n);
        return;
    }
    // y stored bf16 in place (training's a, the a0 bias: its LoRA up GEMM
    // under gemm_only): act' from bf16(y), as without a bias
    const __nv_bfloat16 *y16 =
        act != RP_ACT_NONE ? rp_cuda_inplace_find(cx, y, (size_t)R * C) : nullptr;
    if (act != RP_ACT_NONE && !y16 &&
        !rp_cuda_store16_fits(cx, y, (size_t)R * C, "bias_act_backward (y)"))
        return;
    // d pre = dy stored bf16 in place (RP_ACT_NONE: the WKV7 backward wrote
    // dw_raw so under a gemm_only hint): the bias sums read the bf16 values;
    // nothing is written, the GEMMs read dy in place
    const rp_cuda_inplace *dy_ip = rp_cuda_inplace_at(cx, dy, (size_t)R * C);
    const __nv_bfloat16 *dy_in16 = dy_ip && !dy_ip->f32 && act == RP_ACT_NONE
                                       ? reinterpret_cast<const __nv_bfloat16 *>(dy)
                                       : nullptr;
    if (dy_ip && !dy_in16) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda bias_act_backward: dy is a GEMM-only gradient stored bf16 "
                         "(gemm_only) but a bias gradient was asked; drop the gemm_only "
                         "hint before the GEMM that writes dy");
        return;
    }
    // d pre GEMM-only (backend.h gemm_only before this op: the LoRA up's
    // backward GEMMs alone read it): written only as the bf16 copy those
    // GEMMs take, no f32 (rp_cuda_act16_publish_sole). The bias partials
    // sum the f32 d pre either way, so the bits do not change. A bf16
    // in-place dy consumes the hint and stays as it is.
    const int gemm_only = rp_cuda_take_gemm_only(cx, dy, (size_t)R * C);
    const int chunks = rp_cuda_row_chunks(R), rows_per_chunk = (R + chunks - 1) / chunks;
    float *part_b =
        (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, (size_t)chunks * C * sizeof(float));
    if (!part_b) return;
    // dy_in16 is read element by element, so 4 columns a lane need no
    // alignment (bf16 x 4: 8-byte rows)
    const int W = dy_in16 ? (C % 4 == 0 ? 4 : 1) : vector_width((size_t)C, dy, y);
    const dim3 grid(rp_cuda_blocks((size_t)C, 32 * W), chunks);
    // d pre is the dY of the LoRA up-projection's backward GEMMs (already
    // bf16 when dy_in16: no copy)
    __nv_bfloat16 *dy16 = dy_in16 ? nullptr : rp_cuda_act16_for_rows(cx, dy, (size_t)R * C, R);
    const int sole = gemm_only && dy16 && act != RP_ACT_NONE;
    if (W == 4 && y16)
        bias_act_backward_bias_kernel<4, __nv_bfloat16><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            dy, part_b, y16, R, C, (int)act, rows_per_chunk, dy16, !sole, dy_in16);
    else if (y16)
        bias_act_backward_bias_kernel<1, __nv_bfloat16><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            dy, part_b, y16, R, C, (int)act, rows_per_chunk, dy16, !sole, dy_in16);
    else if (W == 4)
        bias_act_backward_bias_kernel<4, float><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            dy, part_b, y, R, C, (int)act, rows_per_chunk, dy16, !sole, dy_in16);
    else
        bias_act_backward_bias_kernel<1, float><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(
            dy, part_b, y, R, C, (int)act, rows_per_chunk, dy16, !sole, dy_in16);
    // a bf16 in-place dy is only read (0 bytes: no range)
    const size_t dy_bytes = dy_in16 ? 0 : (size_t)R * C * sizeof(float);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "bias_act_backward", {dy, dy_bytes},
                              {part_b, (size_t)chunks * C * sizeof(float)}))
        return;
    rp_cuda_sum_partials(cx, dbias, part_b, chunks, (size_t)C, 1);
    if (sole)
        rp_cuda_act16_publish_sole(cx, dy16, dy, (size_t)R * C);
    else if (dy16)
        rp_cuda_act16_publish(cx, dy16, dy, (size_t)R * C);
}

// ---- value residual ----

// forward: v_out [R,C] = v + (v_first - v) nu
// backward: dv = dv_out (1 - nu) in place, dv_first += dv_out nu,
// dnu = dv_out (v_first - v) (overwrite)

// [n] element-wise, grid-stride over vectors of W; dv16 (may be NULL): a
// bf16 copy of the new dv, the value GEMM backward's dY (rp_cuda_act16)
template <int W>
__global__ static void value_residual_backward_kernel(float *__restrict__ dv,
                                                      float *__restrict__ dv_first,
                                                      float *__restrict__ dnu,
                                                      const float *__restrict__ v,
                                                      const float *__restrict__ v_first,
                                                      const float *__restrict__ nu, size_t n,
                                                      __nv_bfloat16 *__restrict__ dv16) {
    const size_t stride = (size_t)gridDim.x * blockDim.x * W;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W; i < n; i += stride) {
        const vecf<W> d_out = load<W>(dv + i), vv = load<W>(v + i), fv = load<W>(v_first + i),
                      nv = load<W>(nu + i);
        vecf<W> df = load<W>(dv_first + i), dn, d;
        for (int j = 0; j < W; j++) {
            df.v[j] += d_out.v[j] * nv.v[j];
            dn.v[j] = d_out.v[j] * (fv.v[j] - vv.v[j]);
            d.v[j] = d_out.v[j] * (1.0f - nv.v[j]);
        }
        store<W>(dv_first + i, df);
        store<W>(dnu + i, dn);
        store<W>(dv + i, d);
        if (dv16)
            for (int j = 0; j < W; j++) dv16[i + j] = __float2bfloat16(d.v[j]);
    }
}

static void cuda_value_residual_backward(rp_backend *be, float *dv, float *dv_first, float *dnu,
                                         const float *v, const float *v_first, const float *nu,
                                         int R, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || C <= 0) return;
    const size_t n = (size_t)R * C;
    const int W = vector_width(n, dv, dv_first, dnu, v, v_first, nu);
    const unsigned blocks = flat_blocks(cx, n / W);
    // d v_pre is the value GEMM backward's dY: its bf16 copy in the same
    // pass, so that GEMM converts nothing (the conversion's bits)
    __nv_bfloat16 *dv16 = rp_cuda_act16_for_rows(cx, dv, n, R);
    if (W == 4)
        value_residual_backward_kernel<4><<<blocks, FLAT_THREADS, 0, cx->stream>>>(
            dv, dv_first, dnu, v, v_first, nu, n, dv16);
    else
        value_residual_backward_kernel<1><<<blocks, FLAT_THREADS, 0, cx->stream>>>(
            dv, dv_first, dnu, v, v_first, nu, n, dv16);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "value_residual_backward", {dv, n * sizeof(float)},
                              {dv_first, n * sizeof(float)}, {dnu, n * sizeof(float)}))
        return;
    if (dv16) rp_cuda_act16_publish(cx, dv16, dv, n);
}

// ---- key prepare ----

// forward: u = k k_k per head of 64, kk = u / max(|u|, 1e-12) (torch
// F.normalize), k_out = k (1 + (a - 1) k_a).
// backward, with inv = 1 / max(|u|, eps): where |u| > eps, d kk / d u =
// (I - kk kk^T) inv, so du = (dkk - u proj) inv with proj = (u . dkk) inv^2;
// where the norm is clamped kk = u / eps is linear: du = dkk inv (proj = 0).
//   dk = dk_out (1 + (a - 1) k_a) + du k_k (in place), da += dk_out k k_a,
//   dk_k += sum_r du k,  dk_a += sum_r dk_out k (a - 1).

// grid (H, chunks): one warp per (row, head), lane owns channels lane and lane + 32.
// dkk, k, a, dk (in: d k_out) [R,C] -> dk (d k), da +=, part_kk, part_ka [chunks, C] (may be NULL);
// TK: dkk's type (bf16: the WKV7 backward's dkk in place, backend.h wkv_only).
// dk16 (may be NULL): a bf16 copy of the new dk, the key GEMM backward's dY.
__device__ __forceinline__ float key_in(const float *p) { return *p; }
__device__ __forceinline__ float key_in(const __nv_bfloat16 *p) { return __bfloat162float(*p); }

// key_prepare_backward's per-(row, head) normalization terms, shared by it
// and attention_tail_backward (the same expressions, so the same bits): the
// lane's k and dkk values, 1 / max(|k k_k|, eps) and the projection
// (dkk . u) iv^2 of dkk on u = k k_k (0 below eps, as torch F.normalize).
template <int E, typename TA, typename TK>
__device__ __forceinline__ void key_norm_backward_row(const TA *k, const TK *dkk, size_t o,
                                                      const float *kkw, float *kv, float *dkkv,
                                                      float *iv, float *pj) {
    float n2 = 0.0f, dot = 0.0f;
    for (int e = 0; e < E; e++) {
        kv[e] = key_in(k + o + 32 * e);
        dkkv[e] = key_in(dkk + o + 32 * e);
        const float u = kv[e] * kkw[e];
        n2 += u * u;
        dot += u * dkkv[e];
    }
    n2 = warp_sum(n2);
    dot = warp_sum(dot);
    const float norm = sqrtf(n2);
    *iv = 1.0f / (norm > KK_EPS ? norm : KK_EPS);
    *pj = norm > KK_EPS ? dot * *iv * *iv : 0.0f;
}

// TA: a's type (bf16: training's a in place, backend.h gemm_only).
template <typename TK, typename TA>
__global__ static void key_prepare_backward_kernel(float *__restrict__ dk, float *__restrict__ da,
                                                   float *__restrict__ part_kk,
                                                   float *__restrict__ part_ka,
                                                   const TK *__restrict__ dkk,
                                                   const float *__restrict__ k,
                                                   const TA *__restrict__ a,
                                                   const float *__restrict__ k_k,
                                                   const float *__restrict__ k_a, int R, int C,
                                                   int rows_per_chunk,
                                                   __nv_bfloat16 *__restrict__ dk16) {
    constexpr int E = KEY_HEAD_SIZE / 32;
    __shared__ float sh_kk[ROW_WARPS * KEY_HEAD_SIZE], sh_ka[ROW_WARPS * KEY_HEAD_SIZE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int col0 = blockIdx.x * KEY_HEAD_SIZE;
    int begin, end;
    chunk_rows(blockIdx.y, rows_per_chunk, R, &begin, &end);
    float kkw[E], kaw[E], acc_kk[E], acc_ka[E];
    for (int e = 0; e < E; e++) {
        kkw[e] = k_k[col0 + lane + 32 * e];
        kaw[e] = k_a[col0 + lane + 32 * e];
        acc_kk[e] = acc_ka[e] = 0.0f;
    }
    for (int r = begin + warp; r < end; r += ROW_WARPS) {
        const size_t o = (size_t)r * C + col0 + lane;
        float kv[E], dkkv[E], iv, pj;
        key_norm_backward_row<E>(k, dkk, o, kkw, kv, dkkv, &iv, &pj);
        for (int e = 0; e < E; e++) {
            const size_t i = o + 32 * e;
            const float d_out = dk[i], av = key_in(a + i);
            const float du = (dkkv[e] - kv[e] * kkw[e] * pj) * iv;
            acc_kk[e] += du * kv[e];
            acc_ka[e] += d_out * kv[e] * (av - 1.0f);
            da[i] += d_out * kv[e] * kaw[e];
            const float dki = d_out * (1.0f + (av - 1.0f) * kaw[e]) + du * kkw[e];
            dk[i] = dki;
            if (dk16) dk16[i] = __float2bfloat16(dki);
        }
    }
    for (int e = 0; e < E; e++) {
        sh_kk[warp * KEY_HEAD_SIZE + lane + 32 * e] = acc_kk[e];
        sh_ka[warp * KEY_HEAD_SIZE + lane + 32 * e] = acc_ka[e];
    }
    __syncthreads();
    const size_t out = (size_t)blockIdx.y * C + col0;
    if (part_kk) store_warp_sums(sh_kk, KEY_HEAD_SIZE, part_kk + out, KEY_HEAD_SIZE);
    if (part_ka) store_warp_sums(sh_ka, KEY_HEAD_SIZE, part_ka + out, KEY_HEAD_SIZE);
}

static void cuda_key_prepare_backward(rp_backend *be, float *dk, float *da, float *dk_k,
                                      float *dk_a, const float *dkk, const float *k,
                                      const float *a, const float *k_k, const float *k_a, int R,
                                      int C, int N) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (N != KEY_HEAD_SIZE) {
        rp_cuda_record(cx, cudaErrorInvalidValue, "key_prepare_backward (head size not 64)",
                       __FILE__, __LINE__);
        return;
    }
    if (R <= 0 || C <= 0) return;
    if (C % KEY_HEAD_SIZE) {
        rp_cuda_record(cx, cudaErrorInvalidValue, "key_prepare_backward (C not a multiple of 64)",
                       __FILE__, __LINE__);
        return;
    }
    const int chunks = rp_cuda_row_chunks(R), rows_per_chunk = (R + chunks - 1) / chunks;
    const size_t part = (size_t)chunks * C;
    float *part_kk = nullptr, *part_ka = nullptr;
    if (dk_k || dk_a) {
        float *scratch =
            (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, 2 * part * sizeof(float));
        if (!scratch) return;
        part_kk = dk_k ? scratch : nullptr;
        part_ka = dk_a ? scratch + part : nullptr;
    }
    const dim3 grid(C / KEY_HEAD_SIZE, chunks);
    // dkk in bf16 in place when the WKV7 backward wrote it so (wkv_only)
    const __nv_bfloat16 *dkk16 = rp_cuda_inplace_find(cx, dkk, (size_t)R * C);
    // d k_pre is the key GEMM backward's dY: its bf16 copy in the same pass
    // (rp_cuda_act16; it outlives the LoRA backwards between them, see
    // RP_CUDA_ACT16_SLOTS)
    __nv_bfloat16 *dk16 = rp_cuda_act16_for_rows(cx, dk, (size_t)R * C, R);
    // a in bf16 in place (training's, key_prepare read it so too)
    const __nv_bfloat16 *a16 = rp_cuda_inplace_find(cx, a, (size_t)R * C);
    if (!a16 && !rp_cuda_store16_fits(cx, a, (size_t)R * C, "key_prepare_backward (a)")) return;
    if (dkk16 && a16)
        key_prepare_backward_kernel<__nv_bfloat16, __nv_bfloat16>
            <<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(dk, da, part_kk, part_ka, dkk16, k, a16,
                                                        k_k, k_a, R, C, rows_per_chunk, dk16);
    else if (dkk16)
        key_prepare_backward_kernel<__nv_bfloat16, float>
            <<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(dk, da, part_kk, part_ka, dkk16, k, a,
                                                        k_k, k_a, R, C, rows_per_chunk, dk16);
    else if (a16)
        key_prepare_backward_kernel<float, __nv_bfloat16>
            <<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(dk, da, part_kk, part_ka, dkk, k, a16,
                                                        k_k, k_a, R, C, rows_per_chunk, dk16);
    else
        key_prepare_backward_kernel<float, float>
            <<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(dk, da, part_kk, part_ka, dkk, k, a,
                                                        k_k, k_a, R, C, rows_per_chunk, dk16);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "key_prepare_backward", {dk, (size_t)R * C * sizeof(float)}, {da, (size_t)R * C * sizeof(float)},
                              {part_kk, part * sizeof(float)}, {part_ka, part * sizeof(float)}))
        return;
    // dkk's one reader has read it: drop its in-place record, so that no
    // later reader of that memory takes it for bf16 values
    if (dkk16) rp_cuda_act16_forget(cx, dkk, (size_t)R * C * sizeof(float));
    if (dk_k) rp_cuda_sum_partials(cx, dk_k, part_kk, chunks, (size_t)C, 1);
    if (dk_a) rp_cuda_sum_partials(cx, dk_a, part_ka, chunks, (size_t)C, 1);
    if (dk16) rp_cuda_act16_publish(cx, dk16, dk, (size_t)R * C);
}

// ---- the attention tail after WKV7 (backend.h attention_tail_backward) ----

// Element i of a gradient that is f32, or bf16 in place when as16 (a
// runtime choice: backend.h drkv_only's dr, dk, dv; no instantiation).
__device__ __forceinline__ float grad_get(const float *p, size_t i, int as16) {
    return as16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16 *>(p)[i]) : p[i];
}
__device__ __forceinline__ void grad_put(float *p, size_t i, float x, int as16) {
    if (as16)
        reinterpret_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16(x);
    else
        p[i] = x;
}

// key_prepare_backward, bias_act_backward on d pre of a (sigmoid), w (none)
// and nu (sigmoid) with their bias sums, and value_residual_backward (layer
// 0: dv += dv_first) in one pass over [R,C]: each element with the same
// expressions as those kernels, every partial sum over the same rows in the
// same (chunk, warp, row) order, so the same bits; [R,C] read and written
// once instead of by five kernels that re-read what the one before wrote.
// grid (H, chunks), one warp per (row, head) as key_prepare_backward_kernel.
// TK dkk, TA the activations k, v, v_first, nu, TB a (bf16 in place with kk
// and w_raw in training, while k, v still f32), TF v_first when it is f32
// beside bf16 k, v, nu (training: k_pre, v_pre, nu rkv_only / gemm_only,
// v_first f32: it crosses stages), TG da, TW dw_raw: float, or
// bf16 stored in place (rkv_only / gemm_only outputs, rp_cuda_inplace; in
// training both, as the WKV7 backward writes them). A bf16 da gets
// d pre in place (its LoRA GEMMs read it there); a float one its copy
// c16.da (sole: no f32 unless store_da), as a gemm_only d pre. dw_raw is
// its own d pre: a bf16 one is left where it is for its GEMMs.
struct tail_copies {
    __nv_bfloat16 *dk, *da, *dw, *dv, *dnu;  // each may be NULL
};
#define TAIL_PARTS 5  // k_k, k_a, a0, w0, v0
__device__ __forceinline__ void tail_store(float *p, float x) { *p = x; }
__device__ __forceinline__ void tail_store(__nv_bfloat16 *p, float x) {
    *p = __float2bfloat16(x);
}
template <typename TK, typename TA, typename TB, typename TG, typename TW, typename TF = TA>
__global__ static void attention_tail_backward_kernel(
    float *__restrict__ dk, TG *__restrict__ da, const TW *__restrict__ dw,
    float *__restrict__ dv, float *__restrict__ dv_first, float *__restrict__ dnu,
    float *__restrict__ part, const TK *__restrict__ dkk, const TA *__restrict__ k,
    const TB *__restrict__ a, const TA *__restrict__ v, const TF *__restrict__ v_first,
    const TA *__restrict__ nu, const float *__restrict__ k_k, const float *__restrict__ k_a,
    int R, int C, int rows_per_chunk, tail_copies c16, int store_da, int store_dnu,
    int store_dkv, int dkv16) {
    constexpr int E = KEY_HEAD_SIZE / 32, T = KEY_HEAD_SIZE;
    __shared__ float sh[TAIL_PARTS][ROW_WARPS * T];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int col0 = blockIdx.x * T;
    int begin, end;
    chunk_rows(blockIdx.y, rows_per_chunk, R, &begin, &end);
    float kkw[E], kaw[E], acc[TAIL_PARTS][E];
    for (int e = 0; e < E; e++) {
        kkw[e] = k_k[col0 + lane + 32 * e];
        kaw[e] = k_a[col0 + lane + 32 * e];
        for (int j = 0; j < TAIL_PARTS; j++) acc[j][e] = 0.0f;
    }
    for (int r = begin + warp; r < end; r += ROW_WARPS) {
        const size_t o = (size_t)r * C + col0 + lane;
        float kv[E], dkkv[E], iv, pj;
        key_norm_backward_row<E>(k, dkk, o, kkw, kv, dkkv, &iv, &pj);
        for (int e = 0; e < E; e++) {
            const size_t i = o + 32 * e;
            // key_prepare_backward
            const float d_out = grad_get(dk, i, dkv16), av = key_in(a + i);
            const float du = (dkkv[e] - kv[e] * kkw[e] * pj) * iv;
            acc[0][e] += du * kv[e];
            acc[1][e] += d_out * kv[e] * (av - 1.0f);
            float dai = key_in(da + i);
            dai += d_out * kv[e] * kaw[e];
            const float dki = d_out * (1.0f + (av - 1.0f) * kaw[e]) + du * kkw[e];
            if (store_dkv || dkv16) grad_put(dk, i, dki, dkv16);
            if (c16.dk) c16.dk[i] = __float2bfloat16(dki);
            // bias_act_backward of a (sigmoid, act' from the output a)
            dai *= act_derivative(RP_ACT_SIGMOID, av);
            acc[2][e] += dai;
            if (c16.da) c16.da[i] = __float2bfloat16(dai);
            if (store_da) tail_store(da + i, dai);
            // bias_act_backward of w (none): d pre = dw_raw
            const float dwi = key_in(dw + i);
            acc[3][e] += dwi;
            if (c16.dw) c16.dw[i] = __float2bfloat16(dwi);
            float dvi;
            if (nu) {
                // value_residual_backward, then bias_act_backward of nu (sigmoid)
                const float dvo = grad_get(dv, i, dkv16), vv = key_in(v + i),
                            fv = key_in(v_first + i),
                            nv = key_in(nu + i);
                float df = dv_first[i], dn;
                df += dvo * nv;
                dn = dvo * (fv - vv);
                dvi = dvo * (1.0f - nv);
                dv_first[i] = df;
                dn *= act_derivative(RP_ACT_SIGMOID, nv);
                acc[4][e] += dn;
                if (c16.dnu) c16.dnu[i] = __float2bfloat16(dn);
                if (store_dnu) dnu[i] = dn;
            } else {  // layer 0: v is v_first, add(dv, dv_first)
                dvi = grad_get(dv, i, dkv16);
                dvi += dv_first[i];
            }
            if (store_dkv || dkv16) grad_put(dv, i, dvi, dkv16);
            if (c16.dv) c16.dv[i] = __float2bfloat16(dvi);
        }
    }
    for (int j = 0; j < TAIL_PARTS; j++)
        for (int e = 0; e < E; e++) sh[j][warp * T + lane + 32 * e] = acc[j][e];
    __syncthreads();
    const size_t stride = (size_t)gridDim.y * C, out = (size_t)blockIdx.y * C + col0;
    for (int j = 0; j < TAIL_PARTS; j++) store_warp_sums(sh[j], T, part + j * stride + out, T);
}

// out_j [C] += sum over chunks of part [j][chunks, C], chunks ascending, for
// each non-NULL out_j: rp_cuda_sum_partials' sums (the same bits), one launch.
struct tail_sums {
    float *out[TAIL_PARTS];
};
__global__ static void attention_tail_finish_kernel(tail_sums t, const float *__restrict__ part,
                                                    int chunks, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int j = 0; j < TAIL_PARTS; j++) {
        if (!t.out[j]) continue;
        const float *pj = part + (size_t)j * chunks * C;
        float s = 0.0f;
        for (int p = 0; p < chunks; p++) s += pj[(size_t)p * C + c];
        t.out[j][c] = t.out[j][c] + s;
    }
}

static void cuda_attention_tail_backward(rp_backend *be, float *dk, float *da, float *dw_raw,
                                         float *dv, float *dv_first, float *dnu, float *dk_k,
                                         float *dk_a, float *da0, float *dw0, float *dv0,
                                         const float *dkk, const float *k, const float *a,
                                         const float *v, const float *v_first,
                                         const float *nu, const float *k_k, const float *k_a,
                                         int R, int C, int N, int dkv_gemm_only) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (N != KEY_HEAD_SIZE || (C > 0 && C % KEY_HEAD_SIZE)) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "attention_tail_backward (head size not 64 or C not a multiple of 64)",
                       __FILE__, __LINE__);
        return;
    }
    if (R <= 0 || C <= 0) return;
    const size_t n = (size_t)R * C, nb = n * sizeof(float);
    // each input in the type its producer left it: the activations but a
    // all f32 or all bf16 in place (a bf16 with them, or alone: training
    // stores a with kk and w_raw), da and dw_raw likewise; a mix (or an f32
    // rounded in-place record, copies off) runs the separate ops
    const __nv_bfloat16 *dkk16 = rp_cuda_inplace_find(cx, dkk, n);
    const __nv_bfloat16 *act16[5] = {rp_cuda_inplace_find(cx, k, n),
                                     rp_cuda_inplace_find(cx, a, n),
                                     nu ? rp_cuda_inplace_find(cx, v, n) : nullptr,
                                     nu ? rp_cuda_inplace_find(cx, v_first, n) : nullptr,
                                     nu ? rp_cuda_inplace_find(cx, nu, n) : nullptr};
    const int n_act = nu ? 4 : 1;  // k, v, v_first, nu: a apart
    const __nv_bfloat16 *a16 = act16[1];
    int n_act16 = 0;
    for (int j = 0; j < 5; j++) n_act16 += j != 1 && act16[j] != nullptr;
    // training's layout past layer 0: k, v, nu bf16 in place, v_first f32
    // (it crosses pipeline stages as f32); its own instantiation, with
    // dkk, da and dw_raw bf16 as training has them
    const bool f32_first = nu && n_act16 == 3 && !act16[3];
    // da and dw_raw: both f32, both bf16 in place (the WKV7 backward wrote
    // them so under the training step's rkv_only and gemm_only hints), or
    // dw_raw alone bf16
    const rp_cuda_inplace *ip_da = rp_cuda_inplace_at(cx, da, n);
    const rp_cuda_inplace *ip_dw = rp_cuda_inplace_at(cx, dw_raw, n);
    const int grads16 = ip_da && ip_dw, dw16 = ip_dw != nullptr;
    // dk and dv bf16 in place (the WKV7 backward left them so under the
    // model's drkv_only hint): read and written in place, each element by
    // its one thread, for the key and value GEMMs alone (dkv_gemm_only);
    // only in training's layout past layer 0 (f32_first). With the copies
    // off they are f32 records (rounded values): the separate ops below.
    const float *const dkv[2] = {dk, dv};
    const int dkv_set = rp_cuda_inplace_set(cx, dkv, 2, n), dkv16 = dkv_set == RP_INPLACE_BF16;
    if (dkv_set == RP_INPLACE_MIXED) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda attention_tail_backward: dk and dv are in place in mixed "
                         "storage; the tail takes them in one (hint drkv_only for all of dr, "
                         "dk, dv or none)");
        return;
    }
    if (dkv16 && !(f32_first && dkv_gemm_only && dkk16 && grads16)) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda attention_tail_backward: dk and dv are bf16 in place, which "
                         "only training's layout past layer 0 takes (k, v, nu, dkk, da, dw_raw "
                         "bf16, v_first f32) with dkv_gemm_only %d; hint drkv_only only there",
                         dkv_gemm_only);
        return;
    }
    if ((n_act16 != 0 && n_act16 != n_act && !f32_first) || (n_act16 && !a16) ||
        (f32_first && !(dkk16 && grads16)) || (ip_da && !ip_dw) ||
        (ip_da && ip_da->f32) || (ip_dw && ip_dw->f32) ||
        (nu && rp_cuda_inplace_at(cx, dnu, n))) {
        // the separate ops read k, v, v_first, nu as f32 only
        if (n_act16) {
            if (cx->error.code == RP_OK)
                rp_error_set(&cx->error, RP_ERR_INTERNAL,
                             "cuda attention_tail_backward: %d of k, v, v_first, nu are bf16 in "
                             "place in a layout the fused kernel does not take (dkk %s, a %s, "
                             "da %s, dw_raw %s); hint them as training does, or not at all",
                             n_act16, dkk16 ? "bf16" : "f32", a16 ? "bf16" : "f32",
                             ip_da ? "bf16" : "f32", ip_dw ? "bf16" : "f32");
            return;
        }
        rp_attention_tail_backward_separate(be, dk, da, dw_raw, dv, dv_first, dnu, dk_k, dk_a,
                                            da0, dw0, dv0, dkk, k, a, v, v_first, nu, k_k, k_a,
                                            R, C, N, dkv_gemm_only);
        return;
    }
    const int chunks = rp_cuda_row_chunks(R), rows_per_chunk = (R + chunks - 1) / chunks;
    const size_t part_floats = (size_t)TAIL_PARTS * chunks * C;
    float *part = (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, part_floats * sizeof(float));
    if (!part) return;
    // the bf16 operands of the GEMM backwards that follow, in the same pass:
    // d k_pre and d v_pre (their C x C GEMMs), d pre of a, w, nu (their
    // LoRAs'; a and nu's only store, as after a gemm_only hint); five slots
    // (RP_CUDA_ACT16_SLOTS), each claim the newest, so all distinct
    tail_copies c16 = {};
    if (!dkv16) c16.dk = rp_cuda_act16_for_rows(cx, dk, n, R);
    if (!grads16) c16.da = rp_cuda_act16_for_rows(cx, da, n, R);
    if (!dw16) c16.dw = rp_cuda_act16_for_rows(cx, dw_raw, n, R);
    if (!dkv16) c16.dv = rp_cuda_act16_for_rows(cx, dv, n, R);
    if (nu) c16.dnu = rp_cuda_act16_for_rows(cx, dnu, n, R);
    if (cx->error.code != RP_OK) return;
    const int store_da = grads16 || !c16.da, store_dnu = !c16.dnu;
    // GEMM-only dk and dv (the caller's dkv_gemm_only): their bf16 copies
    // alone, no f32 (sole copies: an f32 reader would be refused)
    const int store_dkv = !(dkv_gemm_only && c16.dk && c16.dv);
    const dim3 grid(C / KEY_HEAD_SIZE, chunks);
#define TAIL_LAUNCH_F(TK, TA, TB, TG, TW, TF)                                               \
    attention_tail_backward_kernel<TK, TA, TB, TG, TW, TF><<<grid, ROW_WARP_THREADS, 0,   \
                                                            cx->stream>>>(                  \
            dk, (TG *)da, (const TW *)(dw16 ? (const void *)ip_dw->p : (const void *)dw_raw), \
            dv, dv_first, dnu, part, dkk16 ? (const TK *)dkk16 : (const TK *)dkk,             \
            n_act16 ? (const TA *)act16[0] : (const TA *)k,                                   \
            a16 ? (const TB *)a16 : (const TB *)a,                                            \
            n_act16 ? (const TA *)act16[2] : (const TA *)v,                                   \
            act16[3] ? (const TF *)act16[3] : (const TF *)v_first,                            \
            n_act16 ? (const TA *)act16[4] : (const TA *)nu, k_k, k_a, R, C, rows_per_chunk,  \
            c16, store_da, store_dnu, store_dkv, dkv16)
#define TAIL_LAUNCH(TK, TA, TB, TG, TW) TAIL_LAUNCH_F(TK, TA, TB, TG, TW, TA)
#define TAIL_TG(TK, TA, TB)                                        \
    do {                                                           \
        if (grads16)                                               \
            TAIL_LAUNCH(TK, TA, TB, __nv_bfloat16, __nv_bfloat16); \
        else if (dw16)                                             \
            TAIL_LAUNCH(TK, TA, TB, float, __nv_bfloat16);         \
        else                                                       \
            TAIL_LAUNCH(TK, TA, TB, float, float);                 \
    } while (0)
#define TAIL_TA(TK)                                     \
    do {                                                \
        if (n_act16)                                    \
            TAIL_TG(TK, __nv_bfloat16, __nv_bfloat16);  \
        else if (a16)                                   \
            TAIL_TG(TK, float, __nv_bfloat16);          \
        else                                            \
            TAIL_TG(TK, float, float);                  \
    } while (0)
    if (f32_first)
        TAIL_LAUNCH_F(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16,
                      float);
    else if (dkk16)
        TAIL_TA(__nv_bfloat16);
    else
        TAIL_TA(float);
#undef TAIL_TA
#undef TAIL_TG
#undef TAIL_LAUNCH
#undef TAIL_LAUNCH_F
    // dw_raw is only read (its d pre is itself): its records stay
    if (!RP_CUDA_LAUNCHED_OUT(cx, "attention_tail_backward", {dk, nb}, {da, nb}, {dv, nb},
                              {dv_first, nb}, {nu ? dnu : nullptr, nu ? nb : 0},
                              {part, part_floats * sizeof(float)}))
        return;
    // dkk's one reader has read it (as key_prepare_backward)
    if (dkk16) rp_cuda_act16_forget(cx, dkk, nb);
    tail_sums t = {{dk_k, dk_a, da0, dw0, nu ? dv0 : nullptr}};
    attention_tail_finish_kernel<<<rp_cuda_blocks((size_t)C, 256), 256, 0, cx->stream>>>(
        t, part, chunks, C);
    const size_t cb = (size_t)C * sizeof(float);
    if (!RP_CUDA_LAUNCHED_OUT(cx, "attention_tail_backward finish", {dk_k, cb}, {dk_a, cb},
                              {da0, cb}, {dw0, cb}, {nu ? dv0 : nullptr, nu ? cb : 0}))
        return;
    if (grads16) rp_cuda_inplace_add(cx, da, n);  // d pre in place, as da came
    if (dkv16) rp_cuda_inplace_add(cx, dk, n);    // the GEMMs' dY in place, as they came
    if (dkv16) rp_cuda_inplace_add(cx, dv, n);
    if (c16.dk) rp_cuda_act16_publish_as(cx, c16.dk, dk, n, store_dkv);
    if (c16.da) rp_cuda_act16_publish_sole(cx, c16.da, da, n);
    if (c16.dw) rp_cuda_act16_publish(cx, c16.dw, dw_raw, n);
    if (c16.dv) rp_cuda_act16_publish_as(cx, c16.dv, dv, n, store_dkv);
    if (c16.dnu) rp_cuda_act16_publish_sole(cx, c16.dnu, dnu, n);
}

// ---- bonus + gate ----

// forward: out [R,C] = (o + s_h v) g with s_h = sum_j r_j k_j r_k[h,j] per head
// backward, with dz = dout g and ds_h = sum_i dz_i v_i:
//   d_o = dz, dg = dout (o + s v) (both overwrite), dv += dz s,
//   dr += ds k r_k, dk += ds r r_k, dr_k [H,N] += sum_rows ds r k.

// One warp's (row, head) of the bonus: the lane's r, k, v at q + 32 e and
// the head's s = sum_j r_j k_j r_k[h,j] (warp_sum: every lane gets it).
// r, k, v: f32, or bf16 in place (TR: training's rkv_only r, k, v).
template <int E, typename TR>
static __device__ __forceinline__ float bonus_row(const TR *__restrict__ r,
                                                  const TR *__restrict__ k,
                                                  const TR *__restrict__ v, size_t q,
                                                  const float *rkw, float *rv, float *kv,
                                                  float *vv) {
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < E; e++) {
        rv[e] = rp_ldf(r + q + 32 * e);
        kv[e] = rp_ldf(k + q + 32 * e);
        vv[e] = rp_ldf(v + q + 32 * e);
        s += rv[e] * kv[e] * rkw[e];
    }
    return warp_sum(s);
}

// grid (H, chunks): one warp per (row, head) of N = 32 E, lane owns channels lane + 32 e.
// -> d_o, dg =; dr, dk, dv += (accumulate) or =; part_rk [chunks, C] (may be NULL)
template <int E>
__global__ static void bonus_gate_backward_kernel(
    float *__restrict__ d_o, float *__restrict__ dr, float *__restrict__ dk,
    float *__restrict__ dv, float *__restrict__ part_rk, float *__restrict__ dg,
    const float *__restrict__ dout, const float *__restrict__ o, const float *__restrict__ r,
    const float *__restrict__ k, const float *__restrict__ v, const float *__restrict__ r_k,
    const float *__restrict__ g, int R, int C, int rows_per_chunk, int accumulate,
    __nv_bfloat16 *__restrict__ dg16) {
    constexpr int N = 32 * E;
    __shared__ float sh[ROW_WARPS * N];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int col0 = blockIdx.x * N;
    int begin, end;
    chunk_rows(blockIdx.y, rows_per_chunk, R, &begin, &end);
    float rkw[E], acc[E];
    for (int e = 0; e < E; e++) {
        rkw[e] = r_k[col0 + lane + 32 * e];
        acc[e] = 0.0f;
    }
    for (int row = begin + warp; row < end; row += ROW_WARPS) {
        const size_t q = (size_t)row * C + col0 + lane;
        float rv[E], kv[E], vv[E];
        const float s = bonus_row<E, float>(r, k, v, q, rkw, rv, kv, vv);
        float dsum = 0.0f;
        for (int e = 0; e < E; e++) {
            const size_t i = q + 32 * e;
            const float dout_i = dout[i], dz = dout_i * g[i];
            const float dgi = dout_i * (o[i] + s * vv[e]);
            dg[i] = dgi;
            if (dg16) dg16[i] = __float2bfloat16(dgi);
            d_o[i] = dz;
            dv[i] = (accumulate ? dv[i] : 0.0f) + dz * s;
            dsum += dz * vv[e];
        }
        dsum = warp_sum(dsum);
        for (int e = 0; e < E; e++) {
            const size_t i = q + 32 * e;
            dr[i] = (accumulate ? dr[i] : 0.0f) + dsum * kv[e] * rkw[e];
            dk[i] = (accumulate ? dk[i] : 0.0f) + dsum * rv[e] * rkw[e];
            acc[e] += dsum * rv[e] * kv[e];
        }
    }
    if (!part_rk) return;  // uniform over the grid
    for (int e = 0; e < E; e++) sh[warp * N + lane + 32 * e] = acc[e];
    __syncthreads();
    store_warp_sums(sh, N, part_rk + (size_t)blockIdx.y * C + col0, N);
}

static void cuda_bonus_gate_backward_beta(rp_backend *be, float *d_o, float *dr, float *dk,
                                          float *dv, float *dr_k, float *dg, const float *dout,
                                          const float *o, const float *r, const float *k,
                                          const float *v, const float *r_k, const float *g, int R,
                                          int C, int N, float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int accumulate = beta != 0.0f;
    if (R <= 0 || C <= 0 || N <= 0) return;
    // A warp holds a head in registers: N = 32, 64, 96 or 128 (RWKV-7: 64).
    if (N % 32 || N > 128 || C % N) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "bonus_gate_backward (head size must be 32, 64, 96 or 128 and divide C)",
                       __FILE__, __LINE__);
        return;
    }
    const int chunks = rp_cuda_row_chunks(R), rows_per_chunk = (R + chunks - 1) / chunks;
    float *part_rk = nullptr;
    if (dr_k) {
        part_rk =
            (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, (size_t)chunks * C * sizeof(float));
        if (!part_rk) return;
    }
    const dim3 grid(C / N, chunks);
    // dg is the dY of the gate LoRA's backward GEMMs
    __nv_bfloat16 *dg16 = rp_cuda_act16_for_rows(cx, dg, (size_t)R * C, R);
#define BONUS_GATE_LAUNCH(E)                                                                    \
    bonus_gate_backward_kernel<E><<<grid, ROW_WARP_THREADS, 0, cx->stream>>>(                   \
        d_o, dr, dk, dv, part_rk, dg, dout, o, r, k, v, r_k, g, R, C, rows_per_chunk, \
        accumulate, dg16)
    switch (N / 32) {
    case 1: BONUS_GATE_LAUNCH(1); break;
    case 2: BONUS_GATE_LAUNCH(2); break;
    case 3: BONUS_GATE_LAUNCH(3); break;
    default: BONUS_GATE_LAUNCH(4); break;
    }
#undef BONUS_GATE_LAUNCH
    if (!RP_CUDA_LAUNCHED_OUT(cx, "bonus_gate_backward", {d_o, (size_t)R * C * sizeof(float)}, {dr, (size_t)R * C * sizeof(float)},
                              {dk, (size_t)R * C * sizeof(float)}, {dv, (size_t)R * C * sizeof(float)}, {dg, (size_t)R * C * sizeof(float)},
                              {part_rk, (size_t)chunks * C * sizeof(float)}))
        return;
    if (dr_k) rp_cuda_sum_partials(cx, dr_k, part_rk, chunks, (size_t)C, 1);
    if (dg16) rp_cuda_act16_publish(cx, dg16, dg, (size_t)R * C);
}

static void cuda_bonus_gate_backward(rp_backend *be, float *d_o, float *dr, float *dk, float *dv,
                                     float *dr_k, float *dg, const float *dout, const float *o,
                                     const float *r, const float *k, const float *v,
                                     const float *r_k, const float *g, int R, int C, int N) {
    cuda_bonus_gate_backward_beta(be, d_o, dr, dk, dv, dr_k, dg, dout, o, r, k, v, r_k, g, R, C,
                                  N, 1.0f);
}

// ---- groupnorm + bonus + gate, fused (backend.h groupnorm_bonus_gate_backward) ----

// bonus_gate_backward_kernel then groupnorm_backward_dx_kernel and
// norm_backward_params_kernel on its d_o, in one pass: the groupnorm output
// o is recomputed from y, mean, rstd (the forward's formula), and d_o stays
// in registers. Grid (H, chunks) of ROW_WARPS warps, one warp per (row,
// head), rows assigned as in both unfused kernels, so every sum runs in the
// same order: the same bits. y: f32, or bf16 in place (TY) when WKV7 stored
// it so. part [3, chunks, C]: the dr_k, dln_w, dln_b partial rows (NULL: no
// parameter gradients). dy: f32, or bf16 in place (TDY: the WKV7 backward,
// its one reader, takes it so; backend.h wkv_only). r, k, v and the gate g:
// f32, or bf16 in place (TR: backend.h rkv_only).
__device__ __forceinline__ void gn_dy_store(float *p, float x) { *p = x; }
__device__ __forceinline__ void gn_dy_store(__nv_bfloat16 *p, float x) {
    *p = __float2bfloat16(x);
}

template <int E, typename TY, typename TDY, typename TR = float>
__global__ static void groupnorm_bonus_gate_backward_kernel(
    TDY *__restrict__ dy, float *__restrict__ dr, float *__restrict__ dk,
    float *__restrict__ dv, float *__restrict__ part, float *__restrict__ dg,
    __nv_bfloat16 *__restrict__ dg16, const float *__restrict__ dout, const TY *__restrict__ y,
    const float *__restrict__ mean, const float *__restrict__ rstd,
    const float *__restrict__ ln_w, const float *__restrict__ ln_b,
    const TR *__restrict__ r, const TR *__restrict__ k, const TR *__restrict__ v,
    const float *__restrict__ r_k, const TR *__restrict__ g, int R, int C, int chunks,
    int rows_per_chunk, int accumulate, int drkv16, int dout16) {
    constexpr int N = 32 * E;
    __shared__ float sh[3][ROW_WARPS * N];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, H = C / N;
    const int h = blockIdx.x, col0 = h * N;
    int begin, end;
    chunk_rows(blockIdx.y, rows_per_chunk, R, &begin, &end);
    float rkw[E], lw[E], lb[E], acc_rk[E], acc_w[E], acc_b[E];
    for (int e = 0; e < E; e++) {
        const int c = col0 + lane + 32 * e;
        rkw[e] = r_k[c];
        lw[e] = ln_w[c];
        lb[e] = ln_b[c];
        acc_rk[e] = acc_w[e] = acc_b[e] = 0.0f;
    }
    for (int row = begin + warp; row < end; row += ROW_WARPS) {
        const size_t q = (size_t)row * C + col0 + lane, task = (size_t)row * H + h;
        const float mu = mean[task], rs = rstd[task];
        float rv[E], kv[E], vv[E], xh[E], dz[E];
        const float s = bonus_row<E, TR>(r, k, v, q, rkw, rv, kv, vv);
        float dsum = 0.0f;
        for (int e = 0; e < E; e++) {
            const size_t i = q + 32 * e;
            xh[e] = (rp_ldf(y + i) - mu) * rs;
            const float o = xh[e] * lw[e] + lb[e];  // the forward's groupnorm output
            const float dout_i = grad_get(dout, i, dout16);
            dz[e] = dout_i * rp_ldf(g + i);
            const float dgi = dout_i * (o + s * vv[e]);
            if (dg) dg[i] = dgi;  // NULL: a GEMM-only dg, its copy alone
            if (dg16) dg16[i] = __float2bfloat16(dgi);
            // drkv16: first writes (beta 0), bf16 in place
            grad_put(dv, i, (accumulate ? dv[i] : 0.0f) + dz[e] * s, drkv16);
            dsum += dz[e] * vv[e];
        }
        dsum = warp_sum(dsum);
        float sum_d = 0.0f, sum_dxh = 0.0f;
        for (int e = 0; e < E; e++) {
            const size_t i = q + 32 * e;
            grad_put(dr, i, (accumulate ? dr[i] : 0.0f) + dsum * kv[e] * rkw[e], drkv16);
            grad_put(dk, i, (accumulate ? dk[i] : 0.0f) + dsum * rv[e] * rkw[e], drkv16);
            acc_rk[e] += dsum * rv[e] * kv[e];
            const float d = dz[e] * lw[e];
            sum_d += d;
            sum_dxh += d * xh[e];
            acc_w[e] += dz[e] * xh[e];
            acc_b[e] += dz[e];
        }
        sum_d = warp_sum(sum_d);
        sum_dxh = warp_sum(sum_dxh);
        const float mean_d = sum_d / N, mean_dxh = sum_dxh / N;
        for (int e = 0; e < E; e++)
            gn_dy_store(dy + q + 32 * e, rs * (dz[e] * lw[e] - mean_d - xh[e] * mean_dxh));
    }
    if (!part) return;  // uniform over the grid
    for (int e = 0; e < E; e++) {
        const int l = warp * N + lane + 32 * e;
        sh[0][l] = acc_rk[e];
        sh[1][l] = acc_w[e];
        sh[2][l] = acc_b[e];
    }
    __syncthreads();
    for (int j = 0; j < 3; j++)
        store_warp_sums(sh[j], N, part + ((size_t)j * chunks + blockIdx.y) * C + col0, N);
}

// dr_k, dln_w, dln_b [C] += the sums of their partial rows in chunk order
// (rp_cuda_sum_partials' arithmetic, hence bits), one launch for the three.
__global__ static void groupnorm_bonus_gate_finish_kernel(float *dr_k, float *dln_w,
                                                          float *dln_b,
                                                          const float *__restrict__ part,
                                                          int chunks, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float *const dst[3] = {dr_k, dln_w, dln_b};
    for (int j = 0; j < 3; j++) {
        if (!dst[j]) continue;
        float sum = 0.0f;
        for (int p = 0; p < chunks; p++) sum += part[((size_t)j * chunks + p) * C + c];
        dst[j][c] = dst[j][c] + sum;
    }
}

static void cuda_groupnorm_bonus_gate_backward(
    rp_backend *be, float *dy, float *dln_w, float *dln_b, float *dr, float *dk, float *dv,
    float *dr_k, float *dg, const float *dout, const float *y, const float *mean,
    const float *rstd, const float *ln_w, const float *ln_b, const float *r, const float *k,
    const float *v, const float *r_k, const float *g, int R, int C, int N, float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int accumulate = beta != 0.0f;
    if (R <= 0 || C <= 0 || N <= 0) return;
    // A warp holds a head in registers: N = 32, 64, 96 or 128 (RWKV-7: 64).
    if (N % 32 || N > 128 || C % N) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "groupnorm_bonus_gate_backward (head size must be 32, 64, 96 or 128 "
                       "and divide C)",
                       __FILE__, __LINE__);
        return;
    }
    const size_t n = (size_t)R * C;
    const int chunks = rp_cuda_row_chunks(R), rows_per_chunk = (R + chunks - 1) / chunks;
    const size_t part_floats = (size_t)3 * chunks * C;
    float *part = nullptr;
    if (dr_k || dln_w || dln_b) {
        part = (float *)rp_cuda_scratch(cx, RP_CUDA_SCRATCH_OP, part_floats * sizeof(float));
        if (!part) return;
    }
    const dim3 grid(C / N, chunks);
    // dg is the dY of the gate LoRA's backward GEMMs; GEMM-only (a
    // gemm_only hint: nothing else reads it) it is written as that copy
    // alone, a sole copy, no f32
    const int dg_hint = rp_cuda_take_gemm_only(cx, dg, n);
    __nv_bfloat16 *dg16 = rp_cuda_act16_for_rows(cx, dg, n, R);
    float *dg32 = dg_hint && dg16 ? nullptr : dg;
    // y in bf16 in place when the WKV7 forward stored it so
    const __nv_bfloat16 *y16 = rp_cuda_inplace_find(cx, y, n);
    if (!y16 && !rp_cuda_store16_fits(cx, y, n, "groupnorm_bonus_gate_backward (y)")) return;
    // A dy that only the WKV7 backward reads (backend.h wkv_only) is written
    // in bf16 in place, no f32 (BF16 math, above GEMV rows, copies on); with
    // the copies off f32 rounded to bf16 after: the same values for WKV7.
    const int only = rp_cuda_take_wkv_only(cx, dy, n) && rp_cuda_store16_rows(cx, R);
    const int dy16 = only && !cx->act16_off;
    __nv_bfloat16 *dyb = (__nv_bfloat16 *)dy;
    // r, k, v and g in bf16 in place (rkv_only) only with y and dy so:
    // training hints the six together, one instantiation; anything else is
    // an error
    const __nv_bfloat16 *rkv16[4];
    const int n_rkv16 =
        rp_cuda_rkv16(cx, "groupnorm_bonus_gate_backward", r, k, v, g, n, rkv16);
    if (n_rkv16 < 0) return;
    if (n_rkv16 && !(y16 && dy16)) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda groupnorm_bonus_gate_backward: r, k, v and g are bf16 in place "
                         "but %s is f32; hint them rkv_only only where y and dy are wkv_only",
                         y16 ? "dy" : "y");
        return;
    }
    // dr, dk, dv that only the WKV7 backward adds onto, then only their
    // GEMMs and the fused tail read (backend.h drkv_only): first written in
    // bf16 in place, no f32 (BF16 math, above GEMV rows, copies on; the WKV7
    // backward takes them so only with r, k, v bf16, as training hints
    // them); with the copies off f32 rounded to bf16 after, the same values
    const int drkv_only = rp_cuda_take_drkv_only(cx, dr, dk, dv, n) && !accumulate &&
                          rp_cuda_store16_rows(cx, R);
    const int drkv16 = drkv_only && !cx->act16_off;
    // dout (d og) bf16 in place: the output GEMM's dx under the model's
    // gemm_only hint (this op its one reader); read so at no instantiation
    const __nv_bfloat16 *dout16 = rp_cuda_inplace_find(cx, dout, n);
    if (drkv16 && !n_rkv16) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda groupnorm_bonus_gate_backward: dr, dk, dv hinted drkv_only but "
                         "r, k, v are f32; hint them drkv_only only where r, k, v are "
                         "rkv_only");
        return;
    }
#define GN_BONUS_LAUNCH(E, TY, YP, TDY, DYP, TR, R4)                                            \
    groupnorm_bonus_gate_backward_kernel<E, TY, TDY, TR><<<grid, ROW_WARP_THREADS, 0,            \
                                                           cx->stream>>>(                       \
        DYP, dr, dk, dv, part, dg32, dg16, dout, YP, mean, rstd, ln_w, ln_b, R4[0], R4[1], R4[2], \
        r_k, R4[3], R, C, chunks, rows_per_chunk, accumulate, drkv16, dout16 != nullptr)
#define GN_BONUS_SWITCH(TY, YP, TDY, DYP, TR, R4)                                               \
    switch (N / 32) {                                                                           \
    case 1: GN_BONUS_LAUNCH(1, TY, YP, TDY, DYP, TR, R4); break;                                \
    case 2: GN_BONUS_LAUNCH(2, TY, YP, TDY, DYP, TR, R4); break;                                \
    case 3: GN_BONUS_LAUNCH(3, TY, YP, TDY, DYP, TR, R4); break;                                \
    default: GN_BONUS_LAUNCH(4, TY, YP, TDY, DYP, TR, R4); break;                               \
    }
    const float *rkv[4] = {r, k, v, g};
    if (n_rkv16) {
        GN_BONUS_SWITCH(__nv_bfloat16, y16, __nv_bfloat16, dyb, __nv_bfloat16, rkv16)
    } else if (y16 && dy16) {
        GN_BONUS_SWITCH(__nv_bfloat16, y16, __nv_bfloat16, dyb, float, rkv)
    } else if (y16) {
        GN_BONUS_SWITCH(__nv_bfloat16, y16, float, dy, float, rkv)
    } else if (dy16) {
        GN_BONUS_SWITCH(float, y, __nv_bfloat16, dyb, float, rkv)
    } else {
        GN_BONUS_SWITCH(float, y, float, dy, float, rkv)
    }
#undef GN_BONUS_SWITCH
#undef GN_BONUS_LAUNCH
    if (!RP_CUDA_LAUNCHED_OUT(cx, "groupnorm_bonus_gate_backward", {dy, n * sizeof(float)},
                              {dr, n * sizeof(float)}, {dk, n * sizeof(float)},
                              {dv, n * sizeof(float)}, {dg, n * sizeof(float)},
                              {part, part_floats * sizeof(float)}))
        return;
    if (part) {
        groupnorm_bonus_gate_finish_kernel<<<rp_cuda_blocks((size_t)C, 256), 256, 0,
                                             cx->stream>>>(dr_k, dln_w, dln_b, part, chunks, C);
        if (!RP_CUDA_LAUNCHED_OUT(cx, "groupnorm_bonus_gate_backward finish",
                                  {dr_k, (size_t)C * sizeof(float)},
                                  {dln_w, (size_t)C * sizeof(float)},
                                  {dln_b, (size_t)C * sizeof(float)}))
            return;
    }
    // dout's one reader has read it: drop its in-place record, so that no
    // later reader of that memory takes it for bf16 values
    if (dout16) rp_cuda_act16_forget(cx, dout, n * sizeof(float));
    // after RP_CUDA_LAUNCHED_OUT, which forgot dy's earlier records
    rp_cuda_store16_done(cx, dy, n, only, dy16);
    // copies off: the rounded f32 of the three is recorded (f32 in place),
    // so that the WKV7 backward rounds its sums as it would store bf16
    float *const drkv[3] = {dr, dk, dv};
    for (int j = 0; drkv_only && j < 3; j++) {
        rp_cuda_store16_done(cx, drkv[j], n, 1, drkv16);
        if (!drkv16) rp_cuda_inplace_add(cx, drkv[j], n, 1);
    }
    if (dg16) rp_cuda_act16_publish_as(cx, dg16, dg, n, dg32 != nullptr);
}

void rp_cuda_install_backward(rp_backend *be) {
    be->layernorm_backward = cuda_layernorm_backward;
    be->groupnorm_backward = cuda_groupnorm_backward;
    be->token_shift_backward = cuda_token_shift_backward;
    be->lerp_backward = cuda_lerp_backward;
    be->shift_mix_backward = cuda_shift_mix_backward;
    be->shift_mix_ln_backward = cuda_shift_mix_ln_backward;
    be->bias_act_backward = cuda_bias_act_backward;
    be->value_residual_backward = cuda_value_residual_backward;
    be->key_prepare_backward = cuda_key_prepare_backward;
    be->attention_tail_backward = cuda_attention_tail_backward;
    be->bonus_gate_backward = cuda_bonus_gate_backward;
    be->layernorm_backward_beta = cuda_layernorm_backward_beta;
    be->lerp_backward_beta = cuda_lerp_backward_beta;
    be->bonus_gate_backward_beta = cuda_bonus_gate_backward_beta;
    be->groupnorm_bonus_gate_backward = cuda_groupnorm_bonus_gate_backward;
}
