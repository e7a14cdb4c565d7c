// The forward position-wise ops of the CUDA backend: layernorm, token_shift,
// lerp, bias_act, value_residual, key_prepare, groupnorm, bonus_gate, and the
// fused ln_shift_mix. Each is the twin of its CPU version in
// src/cpu/cpu_elementwise.c, same formulas in the same order; rp_cuda_install_elementwise
// puts them in the vtable. Row-wise ops run one block per row (layernorm,
// token_shift) or one warp per head (groupnorm, key_prepare, bonus_gate).
#include "cuda_internal.h"

#include <cstdint>

#define FULL_MASK 0xffffffffu

// Threads of the flat elementwise kernels and of the warp-per-head kernels.
#define EW_THREADS 256

// ---- helpers ----

// W consecutive floats from/to p: one float4 access when W == 4 (p 16-byte
// aligned, checked by the host before picking W = 4).
template <int W>
static __device__ __forceinline__ void load_w(float (&v)[W], const float *p) {
    if constexpr (W == 4) {
        const float4 t = *reinterpret_cast<const float4 *>(p);
        v[0] = t.x;
        v[1] = t.y;
        v[2] = t.z;
        v[3] = t.w;
    } else {
#pragma unroll
        for (int i = 0; i < W; i++) v[i] = p[i];
    }
}

template <int W>
static __device__ __forceinline__ void store_w(float *p, const float (&v)[W]) {
    if constexpr (W == 4) {
        *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int i = 0; i < W; i++) p[i] = v[i];
    }
}

// The bf16 second output of a producer kernel (rp_cuda_act16): the same
// rounding as the to_bf16 conversion it replaces, so GEMMs see the same bits.
template <int W>
static __device__ __forceinline__ void store_bf16(__nv_bfloat16 *p, const float *v) {
#pragma unroll
    for (int i = 0; i < W; i++) p[i] = __float2bfloat16(v[i]);
}

static __device__ __forceinline__ float warp_sum_float(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(FULL_MASK, v, offset);
    return __shfl_sync(FULL_MASK, v, 0);
}

// Sum of v over the block: rp_block_sum_double (cuda_internal.h).
static __device__ double block_sum_double(double v, double *shared) {
    return rp_block_sum_double(v, shared);
}

static bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// Threads of a one-block-per-row kernel over `items` vectors of a row: a
// multiple of 32 between 32 and 256 (small rows do not idle 7 warps).
static int row_threads(int items) {
    int t = (items + 31) / 32 * 32;
    return t < 32 ? 32 : (t > 256 ? 256 : t);
}

// Blocks of a grid-stride elementwise kernel over `items`, capped so that
// huge tensors loop instead of launching millions of tiny blocks.
static unsigned flat_blocks(const rp_cuda_ctx *cx, size_t items) {
    unsigned blocks = rp_cuda_blocks(items, EW_THREADS);
    const unsigned cap = (unsigned)(cx->n_sm > 0 ? cx->n_sm : 1) * 16;
    return blocks > cap ? cap : (blocks < 1 ? 1 : blocks);
}

// Blocks of a warp-per-group kernel over `groups` warps.
static unsigned warp_blocks(size_t groups) {
    return rp_cuda_blocks(groups, EW_THREADS / 32);
}

// ---- layernorm ----

// The moments of row xr [C] over the block (every thread gets them):
// rp_row_moments (cuda_internal.h), shared with ln_shift_mix_kernel and the
// decode GEMVs' LN prologue, so all give the same bits.
template <int W>
static __device__ void row_moments(const float *xr, int C, float eps, double *shared,
                                   float *mean_out, float *rstd_out) {
    rp_row_moments<W>(xr, C, eps, (int)blockDim.x, shared, mean_out, rstd_out);
}

// x [R,C] -> y [R,C], mean/rstd [R] (optional); one block per row.
// Moments as cpu_moments: mean of the floats summed in double, then the
// double sum of (x - mean)^2 with x - mean rounded to float first.
template <int W>
static __global__ void layernorm_kernel(float *y, float *mean, float *rstd, const float *x,
                                        const float *weight, const float *bias, int C,
                                        float eps, __nv_bfloat16 *y16) {
    __shared__ double shared[32];
    // PDL (decode rows: ln0, ln_out): every access after the kernel before
    // has ended; then the next kernel may launch and prefetch its weights
    rp_pdl_wait();
    rp_pdl_trigger();
    const size_t row = blockIdx.x;
    const float *xr = x + row * C;
    float *yr = y + row * C;
    const int step = blockDim.x * W;

    float m, s;
    row_moments<W>(xr, C, eps, shared, &m, &s);

    for (int c = threadIdx.x * W; c < C; c += step) {
        float v[W], w[W], b[W], out[W];
        load_w<W>(v, xr + c);
        load_w<W>(w, weight + c);
        load_w<W>(b, bias + c);
#pragma unroll
        for (int i = 0; i < W; i++) out[i] = (v[i] - m) * s * w[i] + b[i];
        if (y) store_w<W>(yr + c, out);
        if (y16) store_bf16<W>(y16 + row * C + c, out);
    }
    if (threadIdx.x == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = s;
    }
}

static void cuda_layernorm(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                           const float *weight, const float *bias, int R, int C, float eps) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || C <= 0) return;
    const bool vec = C % 4 == 0 && aligned16(y) && aligned16(x) && aligned16(weight) &&
                     aligned16(bias);
    const size_t n = (size_t)R * C;
    // A GEMM-only output (backend.h gemm_only: the head input) is written as
    // bf16 in place and no f32 (x must not overlap it: rows read x while
    // others write y). With the copies off it stays f32: only GEMMs read it,
    // and they round it to the same bits.
    const int only16 = rp_cuda_take_gemm_only(cx, y, n) && rp_cuda_store16_rows(cx, R) &&
                       !cx->act16_off && (x + n <= y || y + n <= x);
    __nv_bfloat16 *y16 =
        only16 ? (__nv_bfloat16 *)y : rp_cuda_act16_for_rows(cx, y, n, R);
    float *y32 = only16 ? NULL : y;
    if (R <= RP_GEMV_MAX_M) {  // decode rows: a programmatic dependent launch
        cudaLaunchAttribute attr[1];
        const cudaLaunchConfig_t cfg = rp_cuda_pdl_config(
            cx, dim3((unsigned)R), dim3((unsigned)row_threads(vec ? C / 4 : C)), attr);
        if (vec)
            (void)cudaLaunchKernelEx(&cfg, layernorm_kernel<4>, y32, mean, rstd, x, weight, bias,
                                     C, eps, y16);
        else
            (void)cudaLaunchKernelEx(&cfg, layernorm_kernel<1>, y32, mean, rstd, x, weight, bias,
                                     C, eps, y16);
    } else if (vec) {
        layernorm_kernel<4><<<R, row_threads(C / 4), 0, cx->stream>>>(y32, mean, rstd, x, weight,
                                                                       bias, C, eps, y16);
    } else {
        layernorm_kernel<1><<<R, row_threads(C), 0, cx->stream>>>(y32, mean, rstd, x, weight,
                                                                   bias, C, eps, y16);
    }
    RP_CUDA_LAUNCHED_OUT(cx, "layernorm", {y, n * sizeof(float)},
                         {mean, (size_t)R * sizeof(float)}, {rstd, (size_t)R * sizeof(float)});
    if (only16)
        rp_cuda_inplace_add(cx, y, n);
    else if (y16)
        rp_cuda_act16_publish(cx, y16, y, n);
}

// ---- groupnorm ----

// x [R,C] -> y [R,C], H = C/N groups per row, mean/rstd [R,H] (optional);
// one warp per (row, group), moments as in layernorm.
static __global__ void groupnorm_kernel(float *y, float *mean, float *rstd, const float *x,
                                        const float *weight, const float *bias, int R, int C,
                                        int N, float eps) {
    const int H = C / N;
    const size_t group = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (group >= (size_t)R * H) return;  // the whole warp leaves together
    const size_t row = group / H;
    const int h = (int)(group % H);
    const size_t o = row * C + (size_t)h * N;
    const float *xh = x + o, *wh = weight + (size_t)h * N, *bh = bias + (size_t)h * N;
    float *yh = y + o;

    float m, s;
    rp_warp_group_moments(xh, N, eps, lane, &m, &s);

    for (int j = lane; j < N; j += 32) yh[j] = (xh[j] - m) * s * wh[j] + bh[j];
    if (lane == 0) {
        if (mean) mean[group] = m;  // group == row * H + h
        if (rstd) rstd[group] = s;
    }
}

static void cuda_groupnorm(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                           const float *weight, const float *bias, int R, int C, int N,
                           float eps) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || N <= 0 || C < N) return;
    const size_t groups = (size_t)R * (C / N);
    groupnorm_kernel<<<warp_blocks(groups), EW_THREADS, 0, cx->stream>>>(y, mean, rstd, x, weight,
                                                                         bias, R, C, N, eps);
    RP_CUDA_LAUNCHED_OUT(cx, "groupnorm", {y, (size_t)R * C * sizeof(float)},
                         {mean, groups * sizeof(float)}, {rstd, groups * sizeof(float)});
}

// ---- token shift ----

// prev [R,C] row r = x row r-1 inside its sequence; for the first row of
// sequence s the slot's state vector, which then becomes x of the sequence's
// last row. One block per row. The thread that reads a state element for the
// first row is the one that overwrites it, so the old value is always read
// first (slots of different sequences are distinct).
template <int W>
static __global__ void token_shift_kernel(float *prev, const float *x, float *state_base,
                                          size_t state_stride, const int32_t *seq_len,
                                          const int32_t *row_begin, const int32_t *slot,
                                          int n_seq, int C) {
    const int r = blockIdx.x;
    const int lo = rp_seq_of_row(row_begin, n_seq, r);
    const int begin = row_begin[lo], len = seq_len[lo];
    if (r < begin || r >= begin + len) return;  // not a row of any sequence
    float *pr = prev + (size_t)r * C;
    const int step = blockDim.x * W;
    if (r > begin) {
        const float *xr = x + (size_t)(r - 1) * C;
        for (int c = threadIdx.x * W; c < C; c += step) {
            float v[W];
            load_w<W>(v, xr + c);
            store_w<W>(pr + c, v);
        }
        return;
    }
    float *st = state_base + (size_t)slot[lo] * state_stride;
    const float *last = x + (size_t)(begin + len - 1) * C;
    for (int c = threadIdx.x * W; c < C; c += step) {
        float old[W], fresh[W];
        load_w<W>(old, st + c);
        store_w<W>(pr + c, old);
        load_w<W>(fresh, last + c);
        store_w<W>(st + c, fresh);
    }
}

static void cuda_token_shift(rp_backend *be, float *prev, const float *x, float *state_base,
                             size_t state_stride, const rp_batch *batch, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int R = batch->n_rows;
    if (R <= 0 || batch->n_seq <= 0 || C <= 0) return;
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    const bool vec = C % 4 == 0 && state_stride % 4 == 0 && aligned16(prev) && aligned16(x) &&
                     aligned16(state_base);
    if (vec)
        token_shift_kernel<4><<<R, row_threads(C / 4), 0, cx->stream>>>(
            prev, x, state_base, state_stride, b.seq_len, b.row_begin, b.slot, b.n_seq, C);
    else
        token_shift_kernel<1><<<R, row_threads(C), 0, cx->stream>>>(
            prev, x, state_base, state_stride, b.seq_len, b.row_begin, b.slot, b.n_seq, C);
    RP_CUDA_LAUNCHED(cx, "token_shift");
}

// ---- lerp ----

// y [R,C] = x + (prev - x) * mu, mu [C]; flat over n = R*C (y may be x).
template <int W>
static __global__ void lerp_kernel(float *y, const float *x, const float *prev, const float *mu,
                                   size_t n, int C, __nv_bfloat16 *y16) {
    const size_t step = (size_t)gridDim.x * blockDim.x * W;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W; i < n; i += step) {
        float xv[W], pv[W], mv[W], out[W];
        load_w<W>(xv, x + i);
        load_w<W>(pv, prev + i);
        load_w<W>(mv, mu + i % C);
#pragma unroll
        for (int k = 0; k < W; k++) out[k] = xv[k] + (pv[k] - xv[k]) * mv[k];
        store_w<W>(y + i, out);
        if (y16) store_bf16<W>(y16 + i, out);
    }
}

static void cuda_lerp(rp_backend *be, float *y, const float *x, const float *prev,
                      const float *mu, int R, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || C <= 0) return;
    const size_t n = (size_t)R * C;
    const bool vec = C % 4 == 0 && aligned16(y) && aligned16(x) && aligned16(prev) &&
                     aligned16(mu);
    __nv_bfloat16 *y16 = rp_cuda_act16_for_rows(cx, y, n, R);
    if (vec)
        lerp_kernel<4><<<flat_blocks(cx, n / 4), EW_THREADS, 0, cx->stream>>>(y, x, prev, mu, n,
                                                                              C, y16);
    else
        lerp_kernel<1><<<flat_blocks(cx, n), EW_THREADS, 0, cx->stream>>>(y, x, prev, mu, n, C,
                                                                          y16);
    RP_CUDA_LAUNCHED_OUT(cx, "lerp", {y, n * sizeof(float)});
    if (y16) rp_cuda_act16_publish(cx, y16, y, n);
}

// ---- fused decode mix: layernorm + token shift + lerps ----

// Up to RP_MIX_MAX output/mu pointers, passed by value.
struct mix_ptrs {
    float *mix[RP_MIX_MAX];
    const float *mu[RP_MIX_MAX];
};

// Step mode only (every sequence one row, so row r is sequence r): one block
// per row computes the layernorm exactly as layernorm_kernel (same moments,
// same block size, hence the same bits), swaps the row with its slot's state
// vector (token shift: the old state is prev, xa the new state) and forms
// the n_mix lerps, all without leaving the block. Each thread reads a state
// element before it overwrites it, as in token_shift_kernel.
template <int W>
static __global__ void ln_shift_mix_kernel(float *xa, float *prev, mix_ptrs mp, int n_mix,
                                           const float *x, const float *weight,
                                           const float *bias, float eps, float *state_base,
                                           size_t state_stride, const int32_t *slot, int C) {
    __shared__ double shared[32];
    const size_t row = blockIdx.x;
    const float *xr = x + row * C;
    const size_t o = row * C;
    float *st = state_base + (size_t)slot[row] * state_stride;
    const int step = blockDim.x * W;

    float m, s;
    row_moments<W>(xr, C, eps, shared, &m, &s);

    for (int c = threadIdx.x * W; c < C; c += step) {
        float v[W], w[W], b[W], a[W], old[W];
        load_w<W>(v, xr + c);
        load_w<W>(w, weight + c);
        load_w<W>(b, bias + c);
#pragma unroll
        for (int i = 0; i < W; i++) a[i] = rp_ln_value(v[i], m, s, w[i], b[i]);
        store_w<W>(xa + o + c, a);
        load_w<W>(old, st + c);
        store_w<W>(prev + o + c, old);
        store_w<W>(st + c, a);
        // unrolled to RP_MIX_MAX so mp stays in parameter space (indexed
        // by a loop variable it went to a 96-byte stack frame)
#pragma unroll
        for (int k = 0; k < RP_MIX_MAX; k++) {
            if (k >= n_mix) break;
            float mu[W], out[W];
            load_w<W>(mu, mp.mu[k] + c);
#pragma unroll
            for (int i = 0; i < W; i++) out[i] = rp_mix_value(a[i], old[i], mu[i]);
            store_w<W>(mp.mix[k] + o + c, out);
        }
    }
}

// The vector width (4 or 1) and block size (*threads) ln_shift_mix_kernel
// runs with for these arguments: the LN moments' summation order, which the
// decode GEMVs' LN prologue (cuda_decode.cu) repeats for the same bits.
int rp_cuda_ln_shift_mix_shape(const float *xa, const float *prev, const float *const *mix,
                               const float *const *mu, int n_mix, const float *x,
                               const float *weight, const float *bias, const float *state_base,
                               size_t state_stride, int C, int *threads) {
    bool vec = C % 4 == 0 && state_stride % 4 == 0 && aligned16(xa) && aligned16(prev) &&
               aligned16(x) && aligned16(weight) && aligned16(bias) && aligned16(state_base);
    for (int i = 0; i < n_mix; i++) vec = vec && aligned16(mix[i]) && aligned16(mu[i]);
    *threads = row_threads(vec ? C / 4 : C);
    return vec ? 4 : 1;
}

static void cuda_ln_shift_mix(rp_backend *be, float *xa, float *prev, float *const *mix,
                              const float *const *mu, int n_mix, const float *x,
                              const float *weight, const float *bias, float eps,
                              float *state_base, size_t state_stride, const rp_batch *batch,
                              int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int R = batch->n_rows;
    if (R <= 0 || batch->n_seq <= 0 || C <= 0) return;
    if (n_mix < 0 || n_mix > RP_MIX_MAX) {
        rp_cuda_record(cx, cudaErrorInvalidValue, "ln_shift_mix: n_mix above RP_MIX_MAX",
                       __FILE__, __LINE__);
        return;
    }
    if (batch->n_seq != R) {  // a sequence of several rows: the three ops
        cuda_layernorm(be, xa, NULL, NULL, x, weight, bias, R, C, eps);
        cuda_token_shift(be, prev, xa, state_base, state_stride, batch, C);
        for (int i = 0; i < n_mix; i++) cuda_lerp(be, mix[i], xa, prev, mu[i], R, C);
        return;
    }
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    mix_ptrs mp = {};
    for (int i = 0; i < n_mix; i++) {
        mp.mix[i] = mix[i];
        mp.mu[i] = mu[i];
    }
    int threads = 0;
    if (rp_cuda_ln_shift_mix_shape(xa, prev, mix, mu, n_mix, x, weight, bias, state_base,
                                   state_stride, C, &threads) == 4)
        ln_shift_mix_kernel<4><<<R, threads, 0, cx->stream>>>(
            xa, prev, mp, n_mix, x, weight, bias, eps, state_base, state_stride, b.slot, C);
    else
        ln_shift_mix_kernel<1><<<R, threads, 0, cx->stream>>>(
            xa, prev, mp, n_mix, x, weight, bias, eps, state_base, state_stride, b.slot, C);
    RP_CUDA_LAUNCHED(cx, "ln_shift_mix");
}

// ---- fused training mix: token shift + lerps (backend.h shift_mix) ----

// The n_mix lerps x + (prev - x) * mu of one W-wide column group at row
// offset o, written as bf16 in place (the GEMM operand) or as f32. Inlined
// with the loop unrolled, so mp stays in parameter space.
template <int W>
static __device__ __forceinline__ void store_mixes(const mix_ptrs &mp, int n_mix, const float *xv,
                                                   const float *pv, size_t o, int c, int bf16) {
#pragma unroll
    for (int k = 0; k < RP_MIX_MAX; k++) {
        if (k >= n_mix) break;
        float mu[W], out[W];
        load_w<W>(mu, mp.mu[k] + c);
#pragma unroll
        for (int i = 0; i < W; i++) out[i] = xv[i] + (pv[i] - xv[i]) * mu[i];
        if (bf16)
            store_bf16<W>(reinterpret_cast<__nv_bfloat16 *>(mp.mix[k]) + o + c, out);
        else
            store_w<W>(mp.mix[k] + o + c, out);
    }
}


// One block per row: prev of the row (the row above inside its sequence, the
// slot's state for a first row, which then takes the sequence's last row, as
// token_shift_kernel; or read from prev when shift is 0) and the n_mix
// lerps, x and prev read once for all of them. bf16: the mixes are written
// as bf16 in place (the first half of each mix's [R,C] floats, the rounding
// of the conversion kernel), the GEMM operand the matmuls find, and no f32.
template <int W>
static __global__ void shift_mix_kernel(float *prev, mix_ptrs mp, int n_mix, const float *x,
                                        float *state_base, size_t state_stride,
                                        const int32_t *seq_len, const int32_t *row_begin,
                                        const int32_t *slot, int n_seq, int shift, int bf16,
                                        int C) {
    const int r = blockIdx.x;
    const size_t o = (size_t)r * C;
    const float *src = prev + o;  // shift 0: prev is an input
    float *st = nullptr;
    const float *last = nullptr;
    if (shift) {
        const int lo = rp_seq_of_row(row_begin, n_seq, r);
        const int begin = row_begin[lo], len = seq_len[lo];
        if (r < begin || r >= begin + len) return;  // not a row of any sequence
        if (r > begin) {
            src = x + o - C;
        } else {
            st = state_base + (size_t)slot[lo] * state_stride;
            src = st;
            last = x + (size_t)(begin + len - 1) * C;
        }
    }
    const int step = blockDim.x * W;
    for (int c = threadIdx.x * W; c < C; c += step) {
        float xv[W], pv[W];
        load_w<W>(xv, x + o + c);
        load_w<W>(pv, src + c);  // a state element is read before it is overwritten below
        if (shift) store_w<W>(prev + o + c, pv);
        if (st) {
            float fresh[W];
            load_w<W>(fresh, last + c);
            store_w<W>(st + c, fresh);
        }
        store_mixes<W>(mp, n_mix, xv, pv, o, c, bf16);
    }
}

static void cuda_shift_mix(rp_backend *be, float *prev, float *const *mix, const float *const *mu,
                           int n_mix, const float *x, float *state_base, size_t state_stride,
                           const rp_batch *batch, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int R = batch->n_rows;
    if (R <= 0 || batch->n_seq <= 0 || C <= 0) return;
    if (n_mix < 0 || n_mix > RP_MIX_MAX) {
        rp_cuda_record(cx, cudaErrorInvalidValue, "shift_mix: n_mix above RP_MIX_MAX", __FILE__,
                       __LINE__);
        return;
    }
    rp_cuda_batch b = {};
    if (state_base && !rp_cuda_upload_batch(cx, batch, &b)) return;
    mix_ptrs mp = {};
    bool vec = C % 4 == 0 && state_stride % 4 == 0 && aligned16(prev) && aligned16(x) &&
               aligned16(state_base);
    for (int i = 0; i < n_mix; i++) {
        mp.mix[i] = mix[i];
        mp.mu[i] = mu[i];
        vec = vec && aligned16(mix[i]) && aligned16(mu[i]);
    }
    // bf16 in place where the matmuls run bf16 GEMMs on these rows (above
    // the decode GEMVs' rows, which read f32)
    const int bf16 = rp_cuda_store16_rows(cx, R) && !cx->act16_off;
    const int shift = state_base != nullptr;
    if (vec)
        shift_mix_kernel<4><<<R, row_threads(C / 4), 0, cx->stream>>>(
            prev, mp, n_mix, x, state_base, state_stride, b.seq_len, b.row_begin, b.slot,
            b.n_seq, shift, bf16, C);
    else
        shift_mix_kernel<1><<<R, row_threads(C), 0, cx->stream>>>(
            prev, mp, n_mix, x, state_base, state_stride, b.seq_len, b.row_begin, b.slot,
            b.n_seq, shift, bf16, C);
    const size_t n = (size_t)R * C, bytes = n * sizeof(float);
    if (shift) {
        // it writes the state slots too: every copy ends, as in token_shift
        if (!RP_CUDA_LAUNCHED(cx, "shift_mix")) return;
        rp_cuda_act16_forget(cx, prev, bytes);  // RP_CUDA_LAUNCHED keeps bf16 ranges
        for (int i = 0; i < n_mix; i++) rp_cuda_act16_forget(cx, mix[i], bytes);
    } else {
        // only the mixes: the other copies stay valid (the backward's dx for
        // the output GEMM, the gate's dg)
        float *o[RP_MIX_MAX] = {};
        for (int i = 0; i < n_mix; i++) o[i] = mix[i];
        const size_t b[RP_MIX_MAX] = {o[0] ? bytes : 0, o[1] ? bytes : 0, o[2] ? bytes : 0,
                                      o[3] ? bytes : 0, o[4] ? bytes : 0, o[5] ? bytes : 0};
        if (!RP_CUDA_LAUNCHED_OUT(cx, "shift_mix", {o[0], b[0]}, {o[1], b[1]}, {o[2], b[2]},
                                  {o[3], b[3]}, {o[4], b[4]}, {o[5], b[5]}))
            return;
    }
    if (bf16)
        for (int i = 0; i < n_mix; i++) rp_cuda_inplace_add(cx, mix[i], n);
}

// ---- fused training LN + mix: layernorm + shift_mix (backend.h ln_shift_mix_train) ----

// One block per row r: x_save = x (the backward's x_in / x_mid, NULL: none),
// the row's layernorm (xa, mean, rstd) as layernorm_kernel
// computes it, then shift_mix_kernel's shift and lerps from it, without
// reading xa back. The shift's value is a layernorm output too, formed here
// again from x: the row above's inside its sequence, and for a sequence's
// first row the old state (read before it is overwritten) while the state
// takes the layernorm of the sequence's last row. Every layernorm value comes
// from rp_row_moments with layernorm_kernel's W and block size and from
// rp_ln_value, so all are the bits layernorm_kernel writes. A row outside
// every sequence gets its layernorm only (as the two kernels leave it).
template <int W>
static __global__ void ln_shift_mix_train_kernel(float *x_save, float *xa, float *mean, float *rstd,
                                                 float *prev, mix_ptrs mp, int n_mix,
                                                 const float *x, const float *weight,
                                                 const float *bias, float eps,
                                                 float *state_base, size_t state_stride,
                                                 const int32_t *seq_len,
                                                 const int32_t *row_begin, const int32_t *slot,
                                                 int n_seq, int bf16, int C) {
    __shared__ double shared[32];
    const int r = blockIdx.x;
    const size_t o = (size_t)r * C;
    const int lo = rp_seq_of_row(row_begin, n_seq, r);
    const int begin = row_begin[lo], len = seq_len[lo];
    const bool in_seq = r >= begin && r < begin + len;  // the same for the whole block
    const bool first = r == begin;
    // the other row whose layernorm this block needs: the row above, or the
    // sequence's last row (the new state) for its first row
    const size_t o2 = first ? (size_t)(begin + len - 1) * C : o - C;
    float *st = in_seq && first ? state_base + (size_t)slot[lo] * state_stride : nullptr;
    // prev's row: r's with xa; without, the first rows only, at their
    // sequence's index (prev [n_seq, C])
    float *prev_row = xa ? prev + o : st ? prev + (size_t)lo * C : nullptr;

    float m, s, m2 = 0.0f, s2 = 0.0f;
    row_moments<W>(x + o, C, eps, shared, &m, &s);
    if (in_seq) row_moments<W>(x + o2, C, eps, shared, &m2, &s2);
    if (threadIdx.x == 0) {
        if (mean) mean[r] = m;
        if (rstd) rstd[r] = s;
    }
    const int step = blockDim.x * W;
    for (int c = threadIdx.x * W; c < C; c += step) {
        float v[W], w[W], b[W], xv[W];
        load_w<W>(v, x + o + c);
        load_w<W>(w, weight + c);
        load_w<W>(b, bias + c);
        if (x_save) store_w<W>(x_save + o + c, v);
#pragma unroll
        for (int i = 0; i < W; i++) xv[i] = rp_ln_value(v[i], m, s, w[i], b[i]);
        if (xa) store_w<W>(xa + o + c, xv);
        if (!in_seq) continue;
        float v2[W], ln2[W], pv[W];
        load_w<W>(v2, x + o2 + c);
#pragma unroll
        for (int i = 0; i < W; i++) ln2[i] = rp_ln_value(v2[i], m2, s2, w[i], b[i]);
        if (st) {
            load_w<W>(pv, st + c);  // the old state, read before it is overwritten
            store_w<W>(st + c, ln2);
        } else {
#pragma unroll
            for (int i = 0; i < W; i++) pv[i] = ln2[i];
        }
        if (prev_row) store_w<W>(prev_row + c, pv);
        store_mixes<W>(mp, n_mix, xv, pv, o, c, bf16);
    }
}

// ln_mix_again: one block per row, the mixes of ln_shift_mix_train_kernel
// formed again from x and the saved mean / rstd (rp_ln_value of the same
// operands: the same bits), a sequence's first row's prev read from prev.
template <int W>
static __global__ void ln_mix_again_kernel(mix_ptrs mp, int n_mix, const float *prev,
                                           const float *x, const float *mean, const float *rstd,
                                           const float *weight, const float *bias,
                                           const int32_t *seq_len, const int32_t *row_begin,
                                           int n_seq, int bf16, int C) {
    const int r = blockIdx.x;
    const size_t o = (size_t)r * C;
    const int lo = rp_seq_of_row(row_begin, n_seq, r);
    const int begin = row_begin[lo], len = seq_len[lo];
    if (r < begin || r >= begin + len) return;  // not a row of any sequence
    const bool first = r == begin;
    const float m = mean[r], s = rstd[r];
    const float m2 = first ? 0.0f : mean[r - 1], s2 = first ? 0.0f : rstd[r - 1];
    const int step = blockDim.x * W;
    for (int c = threadIdx.x * W; c < C; c += step) {
        float v[W], w[W], b[W], xv[W], pv[W];
        load_w<W>(v, x + o + c);
        load_w<W>(w, weight + c);
        load_w<W>(b, bias + c);
#pragma unroll
        for (int i = 0; i < W; i++) xv[i] = rp_ln_value(v[i], m, s, w[i], b[i]);
        if (first) {
            load_w<W>(pv, prev + (size_t)lo * C + c);  // [n_seq, C]: the first rows
        } else {
            float v2[W];
            load_w<W>(v2, x + o - C + c);
#pragma unroll
            for (int i = 0; i < W; i++) pv[i] = rp_ln_value(v2[i], m2, s2, w[i], b[i]);
        }
        store_mixes<W>(mp, n_mix, xv, pv, o, c, bf16);
    }
}

// ln_shift_mix_train_kernel's shapes (float4, aligned, above the GEMV rows)
// and the fused mix + LN backward's (cuda_backward.cu: whole warps of float4
// columns, C <= 2048): there xa and prev need not be stored.
static int cuda_ln_mix_again_fits(rp_backend *be, const rp_batch *batch, int C) {
    (void)be;
    return batch->n_rows > RP_GEMV_MAX_M && C % 128 == 0 && C <= 2048;
}

static void cuda_ln_mix_again(rp_backend *be, float *const *mix, const float *const *mu,
                              int n_mix, const float *prev, const float *x, const float *mean,
                              const float *rstd, const float *weight, const float *bias,
                              const rp_batch *batch, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int R = batch->n_rows;
    if (R <= 0 || batch->n_seq <= 0 || C <= 0) return;
    bool vec = C % 4 == 0 && aligned16(prev) && aligned16(x) && aligned16(weight) &&
               aligned16(bias);
    mix_ptrs mp = {};
    for (int i = 0; i < n_mix && i < RP_MIX_MAX; i++) {
        mp.mix[i] = mix[i];
        mp.mu[i] = mu[i];
        vec = vec && aligned16(mix[i]) && aligned16(mu[i]);
    }
    if (n_mix < 0 || n_mix > RP_MIX_MAX || !vec || !cuda_ln_mix_again_fits(be, batch, C)) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "ln_mix_again: n_mix above RP_MIX_MAX, unaligned, or a shape "
                       "ln_mix_again_fits refuses (the caller must store xa instead)",
                       __FILE__, __LINE__);
        return;
    }
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    const int bf16 = cx->math == RP_CUDA_MATH_BF16 && !cx->act16_off;
    ln_mix_again_kernel<4><<<R, row_threads(C / 4), 0, cx->stream>>>(
        mp, n_mix, prev, x, mean, rstd, weight, bias, b.seq_len, b.row_begin, b.n_seq, bf16, C);
    // only the mixes: the other copies stay valid (as shift_mix without a state)
    const size_t n = (size_t)R * C, bytes = n * sizeof(float);
    float *o[RP_MIX_MAX] = {};
    for (int i = 0; i < n_mix; i++) o[i] = mix[i];
    const size_t sz[RP_MIX_MAX] = {o[0] ? bytes : 0, o[1] ? bytes : 0, o[2] ? bytes : 0,
                                   o[3] ? bytes : 0, o[4] ? bytes : 0, o[5] ? bytes : 0};
    if (!RP_CUDA_LAUNCHED_OUT(cx, "ln_mix_again", {o[0], sz[0]}, {o[1], sz[1]}, {o[2], sz[2]},
                              {o[3], sz[3]}, {o[4], sz[4]}, {o[5], sz[5]}))
        return;
    if (bf16)
        for (int i = 0; i < n_mix; i++) rp_cuda_inplace_add(cx, mix[i], n);
}

static void cuda_ln_shift_mix_train(rp_backend *be, float *x_save, float *xa, float *mean,
                                    float *rstd, float *prev, float *const *mix,
                                    const float *const *mu, int n_mix, const float *x,
                                    const float *weight, const float *bias, float eps,
                                    float *state_base, size_t state_stride,
                                    const rp_batch *batch, int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int R = batch->n_rows;
    if (R <= 0 || batch->n_seq <= 0 || C <= 0) return;
    if (n_mix < 0 || n_mix > RP_MIX_MAX || !state_base) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "ln_shift_mix_train: n_mix above RP_MIX_MAX or no state_base", __FILE__,
                       __LINE__);
        return;
    }
    // One kernel only where layernorm_kernel and shift_mix_kernel would both
    // run float4 (the moments' order is the vector width's), on bf16 GEMM
    // rows (the decode rows' GEMVs read f32 mixes): else the two ops, which
    // are the definition.
    bool vec = C % 4 == 0 && state_stride % 4 == 0 && aligned16(xa) && aligned16(prev) &&
               aligned16(x) && aligned16(weight) && aligned16(bias) &&
               aligned16(state_base) && aligned16(x_save);
    mix_ptrs mp = {};
    for (int i = 0; i < n_mix; i++) {
        mp.mix[i] = mix[i];
        mp.mu[i] = mu[i];
        vec = vec && aligned16(mix[i]) && aligned16(mu[i]);
    }
    const size_t n = (size_t)R * C, bytes = n * sizeof(float);
    const bool overlap = (xa && !(x + n <= xa || xa + n <= x)) ||
                         (x_save && !(x + n <= x_save || x_save + n <= x));
    if (!xa && (!vec || !cuda_ln_mix_again_fits(be, batch, C))) {
        rp_cuda_record(cx, cudaErrorInvalidValue,
                       "ln_shift_mix_train: xa NULL on a shape ln_mix_again_fits refuses "
                       "(store xa there)",
                       __FILE__, __LINE__);
        return;
    }
    if (!vec || overlap || R <= RP_GEMV_MAX_M) {
        if (x_save) be->copy(be, x_save, x, bytes);
        cuda_layernorm(be, xa, mean, rstd, x, weight, bias, R, C, eps);
        cuda_shift_mix(be, prev, mix, mu, n_mix, xa, state_base, state_stride, batch, C);
        return;
    }
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    const int bf16 = cx->math == RP_CUDA_MATH_BF16 && !cx->act16_off;
    ln_shift_mix_train_kernel<4><<<R, row_threads(C / 4), 0, cx->stream>>>(
        x_save, xa, mean, rstd, prev, mp, n_mix, x, weight, bias, eps, state_base,
        state_stride, b.seq_len, b.row_begin, b.slot, b.n_seq, bf16, C);
    // it writes the state slots too: every copy ends, as in shift_mix
    if (!RP_CUDA_LAUNCHED(cx, "ln_shift_mix_train")) return;
    if (xa) rp_cuda_act16_forget(cx, xa, bytes);  // RP_CUDA_LAUNCHED keeps bf16 ranges
    // x_save as copy leaves it (an activation: no weight shadow to refresh)
    if (x_save) rp_cuda_act16_forget(cx, x_save, bytes);
    if (mean) rp_cuda_act16_forget(cx, mean, (size_t)R * sizeof(float));
    if (rstd) rp_cuda_act16_forget(cx, rstd, (size_t)R * sizeof(float));
    // without xa prev is [n_seq, C] (the sequences' first rows)
    rp_cuda_act16_forget(cx, prev, xa ? bytes : (size_t)batch->n_seq * C * sizeof(float));
    for (int i = 0; i < n_mix; i++) rp_cuda_act16_forget(cx, mix[i], bytes);
    if (bf16)
        for (int i = 0; i < n_mix; i++) rp_cuda_inplace_add(cx, mix[i], n);
}

// ---- bias + activation ----

template <int ACT>
static __device__ __forceinline__ float activate(float t) {
    if constexpr (ACT == RP_ACT_TANH) return tanhf(t);
    else if constexpr (ACT == RP_ACT_SIGMOID) return rp_sigmoidf(t);
    else if constexpr (ACT == RP_ACT_RELU_SQUARED) return t > 0.0f ? t * t : 0.0f;
    else return t;
}

// y [R,C] = act(y + bias), bias [C] or NULL (reads as zero); flat over R*C.
template <int ACT, int W>
static __global__ void bias_act_kernel(float *y, const float *bias, size_t n, int C,
                                       __nv_bfloat16 *y16) {
    const size_t step = (size_t)gridDim.x * blockDim.x * W;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W; i < n; i += step) {
        float v[W], b[W];
        load_w<W>(v, y + i);
        if (bias) {
            load_w<W>(b, bias + i % C);
        } else {
#pragma unroll
            for (int k = 0; k < W; k++) b[k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = activate<ACT>(v[k] + b[k]);
        store_w<W>(y + i, v);
        if (y16) store_bf16<W>(y16 + i, v);
    }
}

// The same on a bf16 in-place y (a GEMM-only output, rp_cuda_inplace): y
// is read and written as bf16, each element by its own thread (W = 8: one
// 16-byte access). f32 math inside; the output rounded once.
template <int ACT, int W>
static __global__ void bias_act16_kernel(__nv_bfloat16 *y, const float *bias, size_t n, int C) {
    const size_t step = (size_t)gridDim.x * blockDim.x * W;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W; i < n; i += step) {
        union {
            uint4 raw;
            __nv_bfloat16 h[8];
        } t;
        if constexpr (W == 8) {
            t.raw = *reinterpret_cast<const uint4 *>(y + i);
        } else {
            t.h[0] = y[i];
        }
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float b = bias ? bias[(i + k) % C] : 0.0f;
            t.h[k] = __float2bfloat16(activate<ACT>(__bfloat162float(t.h[k]) + b));
        }
        if constexpr (W == 8) {
            *reinterpret_cast<uint4 *>(y + i) = t.raw;
        } else {
            y[i] = t.h[0];
        }
    }
}

// y16 == (bf16 *)y: y is a bf16 in-place range (no f32 read or written).
template <int ACT>
static void bias_act16_launch(rp_cuda_ctx *cx, __nv_bfloat16 *y, const float *bias, size_t n,
                              int C) {
    if (n % 8 == 0 && aligned16(y))
        bias_act16_kernel<ACT, 8><<<flat_blocks(cx, n / 8), EW_THREADS, 0, cx->stream>>>(
            y, bias, n, C);
    else
        bias_act16_kernel<ACT, 1><<<flat_blocks(cx, n), EW_THREADS, 0, cx->stream>>>(y, bias, n,
                                                                                     C);
}

template <int ACT>
static void bias_act_launch(rp_cuda_ctx *cx, float *y, const float *bias, size_t n, int C,
                            __nv_bfloat16 *y16) {
    const bool vec = C % 4 == 0 && aligned16(y) && (!bias || aligned16(bias));
    if (vec)
        bias_act_kernel<ACT, 4><<<flat_blocks(cx, n / 4), EW_THREADS, 0, cx->stream>>>(
            y, bias, n, C, y16);
    else
        bias_act_kernel<ACT, 1><<<flat_blocks(cx, n), EW_THREADS, 0, cx->stream>>>(y, bias, n, C,
                                                                                   y16);
}

static void cuda_bias_act(rp_backend *be, float *y, const float *bias, int R, int C,
                          rp_activation act) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || C <= 0) return;
    const size_t n = (size_t)R * C;
    if (act != RP_ACT_NONE && act != RP_ACT_TANH && act != RP_ACT_SIGMOID &&
        act != RP_ACT_RELU_SQUARED)
        return;  // no such activation: nothing launched
    // y a GEMM-only output (gemm_only before the GEMM that wrote it): bf16
    // in, bf16 out in place; with the copies off, its f32 twin (rounded
    // values in, the output rounded the same way).
    const rp_cuda_inplace *ip = rp_cuda_inplace_at(cx, y, n);
    if (ip && !ip->f32) {
        __nv_bfloat16 *y16 = (__nv_bfloat16 *)y;
        switch (act) {
        case RP_ACT_NONE: bias_act16_launch<RP_ACT_NONE>(cx, y16, bias, n, C); break;
        case RP_ACT_TANH: bias_act16_launch<RP_ACT_TANH>(cx, y16, bias, n, C); break;
        case RP_ACT_SIGMOID: bias_act16_launch<RP_ACT_SIGMOID>(cx, y16, bias, n, C); break;
        default: bias_act16_launch<RP_ACT_RELU_SQUARED>(cx, y16, bias, n, C); break;
        }
        // writes only inside its own range, which stays in place
        RP_CUDA_LAUNCHED_OUT(cx, "bias_act (bf16)", {NULL, 0});
        return;
    }
    if (!rp_cuda_store16_fits(cx, y, n, "bias_act")) return;
    if (ip) {
        switch (act) {
        case RP_ACT_NONE: bias_act_launch<RP_ACT_NONE>(cx, y, bias, n, C, NULL); break;
        case RP_ACT_TANH: bias_act_launch<RP_ACT_TANH>(cx, y, bias, n, C, NULL); break;
        case RP_ACT_SIGMOID: bias_act_launch<RP_ACT_SIGMOID>(cx, y, bias, n, C, NULL); break;
        default: bias_act_launch<RP_ACT_RELU_SQUARED>(cx, y, bias, n, C, NULL); break;
        }
        if (!RP_CUDA_LAUNCHED_OUT(cx, "bias_act", {y, n * sizeof(float)})) return;
        rp_cuda_round_bf16(cx, y, n);
        rp_cuda_inplace_add(cx, y, n, 1);
        return;
    }
    // The bf16 copy is for a GEMM that reads y next. An output with a bias
    // (the w0, a0, v0 LoRA outputs) is read by the WKV7, key_prepare and
    // value_residual kernels only: no copy (2 bytes an element saved; a
    // GEMM that did read it would convert it, with the same bits).
    __nv_bfloat16 *y16 = bias ? NULL : rp_cuda_act16_for_rows(cx, y, n, R);
    switch (act) {
    case RP_ACT_NONE: bias_act_launch<RP_ACT_NONE>(cx, y, bias, n, C, y16); break;
    case RP_ACT_TANH: bias_act_launch<RP_ACT_TANH>(cx, y, bias, n, C, y16); break;
    case RP_ACT_SIGMOID: bias_act_launch<RP_ACT_SIGMOID>(cx, y, bias, n, C, y16); break;
    default: bias_act_launch<RP_ACT_RELU_SQUARED>(cx, y, bias, n, C, y16); break;
    }
    RP_CUDA_LAUNCHED_OUT(cx, "bias_act", {y, n * sizeof(float)});
    if (y16) rp_cuda_act16_publish(cx, y16, y, n);
}

// ---- value residual ----

// v [R,C] = v_in + (v_first - v_in) * nu, nu [R,C] (per token, as the CPU
// reads it); v_in == v: in place. TV: v's type (bf16: training's v, read by
// WKV7 and the fused groupnorm only, out of v_pre; backend.h rkv_only); TI:
// v_in's and nu's (bf16: training's v_pre and nu in place, their GEMMs
// under rkv_only / gemm_only); v_first f32.
template <int W>
static __device__ __forceinline__ void store_w(__nv_bfloat16 *p, const float (&v)[W]) {
    store_bf16<W>(p, v);
}
template <int W>
static __device__ __forceinline__ void load_w(float (&v)[W], const __nv_bfloat16 *p) {
#pragma unroll
    for (int i = 0; i < W; i++) v[i] = __bfloat162float(p[i]);
}
// v0 [C] (NULL: none): nu holds the pre-activation in bf16 in place; each
// thread first makes its elements sigmoid(nu + v0) rounded to bf16 and
// writes them back (bias_act16_kernel's expression: the same bits), then
// uses the rounded values.
template <int W, typename TV = float, typename TI = float>
static __global__ void value_residual_kernel(TV *v, const TI *v_in, const float *v_first,
                                             TI *nu, size_t n, const float *v0, int C) {
    const size_t step = (size_t)gridDim.x * blockDim.x * W;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W; i < n; i += step) {
        float vv[W], fv[W], nv[W];
        load_w<W>(vv, v_in + i);
        load_w<W>(fv, v_first + i);
        load_w<W>(nv, nu + i);
        if constexpr (sizeof(TI) == sizeof(__nv_bfloat16)) {
            if (v0) {
#pragma unroll
                for (int k = 0; k < W; k++) {
                    const __nv_bfloat16 h =
                        __float2bfloat16(activate<RP_ACT_SIGMOID>(nv[k] + v0[(i + k) % C]));
                    nu[i + k] = h;
                    nv[k] = __bfloat162float(h);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < W; k++) vv[k] = vv[k] + (fv[k] - vv[k]) * nv[k];
        store_w<W>(v + i, vv);
    }
}

// value_residual_kernel float4-wide where every pointer allows (vec), else
// one element a thread.
template <typename TV, typename TI>
static void value_residual_launch(rp_cuda_ctx *cx, bool vec, TV *v, const TI *v_in,
                                  const float *v_first, TI *nu, size_t n,
                                  const float *v0 = nullptr, int C = 1) {
    if (vec)
        value_residual_kernel<4, TV, TI><<<flat_blocks(cx, n / 4), EW_THREADS, 0, cx->stream>>>(
            v, v_in, v_first, nu, n, v0, C);
    else
        value_residual_kernel<1, TV, TI><<<flat_blocks(cx, n), EW_THREADS, 0, cx->stream>>>(
            v, v_in, v_first, nu, n, v0, C);
}

// v = v_in + (v_first - v_in) nu (backend.h value_residual_from: training's
// copy of v_pre into v folded in; v_in == v: the in-place op).
static void cuda_value_residual_from(rp_backend *be, float *v, const float *v_in,
                                     const float *v_first, float *nu, const float *v0, int R,
                                     int C) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const size_t n = (size_t)(R > 0 ? R : 0) * (C > 0 ? C : 0);
    // nu's sigmoid (v0): in this kernel's pass where nu is bf16 in place
    // (training), else bias_act first; the same bits either way
    if (v0 && n > 0 && !rp_cuda_inplace_find(cx, nu, n)) {
        cuda_bias_act(be, nu, v0, R, C, RP_ACT_SIGMOID);
        v0 = nullptr;
    }
    // An rkv_only v (WKV7 and the fused groupnorm its only readers) out of
    // v_pre: bf16 in place; with the copies off f32 rounded after. In place
    // (v_in == v) a bf16 v would overwrite v_in's unread floats.
    const int only = rp_cuda_take_rkv_only(cx, v, n) && rp_cuda_store16_rows(cx, R) && v != v_in;
    const int v16 = only && !cx->act16_off;
    if (n == 0) return;
    // v_in (v_pre) and nu in bf16 in place (their GEMMs under rkv_only):
    // read so together, and only for a bf16 v (training hints
    // the three together); a mix is a caller's error
    const __nv_bfloat16 *v_in16 = v != v_in ? rp_cuda_inplace_find(cx, v_in, n) : NULL;
    const __nv_bfloat16 *nu16 = rp_cuda_inplace_find(cx, nu, n);
    if (!v_in16 != !nu16 || (v_in16 && !v16)) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda value_residual: v_in is stored %s, nu %s, v %s; the kernel "
                         "takes v_in and nu bf16 together, and only for a bf16 v (hint v_pre, "
                         "nu and v rkv_only together)",
                         v_in16 ? "bf16 in place" : "f32", nu16 ? "bf16 in place" : "f32",
                         v16 ? "rkv_only" : "f32");
        return;
    }
    if (!v16 && !rp_cuda_store16_fits(cx, v, n, "value_residual")) return;
    if (!v_in16 && (!rp_cuda_store16_fits(cx, v_in, n, "value_residual (v_in)") ||
                    !rp_cuda_store16_fits(cx, nu, n, "value_residual (nu)")))
        return;
    const bool vec = n % 4 == 0 && aligned16(v) && aligned16(v_in) && aligned16(v_first) &&
                     aligned16(nu);
    __nv_bfloat16 *const vb = (__nv_bfloat16 *)v;
    if (v_in16)
        value_residual_launch(cx, vec, vb, v_in16, v_first, (__nv_bfloat16 *)nu16, n, v0, C);
    else if (v16)
        value_residual_launch(cx, vec, vb, v_in, v_first, nu, n);
    else
        value_residual_launch(cx, vec, v, v_in, v_first, nu, n);
    // nu (v0) is written only inside its own in-place range, which stays
    RP_CUDA_LAUNCHED_OUT(cx, "value_residual",
                         {v, n * (v16 ? sizeof(__nv_bfloat16) : sizeof(float))});
    rp_cuda_store16_done(cx, v, n, only, v16);
}

static void cuda_value_residual(rp_backend *be, float *v, const float *v_first, const float *nu,
                                int R, int C) {
    cuda_value_residual_from(be, v, v, v_first, (float *)nu, NULL, R, C);
}

// ---- key prepare ----

// The head size the key_prepare kernel handles (lane j owns channels j and
// j + 32); the op rejects any other N with a recorded error.
#define KEY_HEAD 64

__device__ __forceinline__ void key_store(float *p, float x) { *p = x; }
__device__ __forceinline__ void key_store(__nv_bfloat16 *p, float x) { *p = __float2bfloat16(x); }

// kk [R,C] = k * k_k normalised per 64-channel head (divided by
// max(||.||, 1e-12), torch F.normalize); then k *= 1 + (a - 1) * k_a in
// place. One warp per (row, head), lane j owns channels j and j + 32 and
// reads its k before writing it. A partial last head (C % 64 != 0, never in
// a real model) gets no kk, only the k update, as on the CPU. TK: kk's type
// (bf16: a WKV7-only kk in place, rounded once); TA: a's (bf16: training's a
// in place, its LoRA up GEMM under gemm_only).
// k_in: the k read (k itself in place, or k_pre: key_prepare_from). TKO:
// k's type (bf16: training's k, read by WKV7 and the fused groupnorm only,
// in place out of k_pre; backend.h rkv_only), TKI k_in's (bf16: training's
// k_pre, its GEMM's output in place under rkv_only).
__device__ __forceinline__ float key_load(const float *p) { return *p; }
__device__ __forceinline__ float key_load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
// a0 [C] (NULL: none): a holds the pre-activation in bf16 in place (TA);
// lane j first makes its elements sigmoid(a + a0) rounded to bf16 and
// writes them back (bias_act16_kernel's expression: the same bits).
template <typename TA>
__device__ __forceinline__ float key_a(TA *p, const float *a0, int c) {
    if constexpr (sizeof(TA) == sizeof(__nv_bfloat16)) {
        if (a0) {
            const __nv_bfloat16 h =
                __float2bfloat16(activate<RP_ACT_SIGMOID>(__bfloat162float(*p) + a0[c]));
            *p = h;
            return __bfloat162float(h);
        }
    }
    return key_load(p);
}
template <typename TK, typename TA, typename TKO = float, typename TKI = float>
static __global__ void key_prepare_kernel(TK *kk, TKO *k, const TKI *k_in, TA *a,
                                          const float *k_k, const float *k_a, int R, int C,
                                          const float *a0) {
    const int groups = (C + KEY_HEAD - 1) / KEY_HEAD;
    const size_t group = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (group >= (size_t)R * groups) return;  // the whole warp leaves together
    const size_t row = group / groups;
    const int h = (int)(group % groups);
    const int c0 = h * KEY_HEAD + lane, c1 = c0 + 32;
    TKO *kr = k + row * C;
    const TKI *kir = k_in + row * C;
    TA *ar = a + row * C;

    if (h < C / KEY_HEAD) {
        TK *kkr = kk + row * C;
        const float t0 = key_load(kir + c0) * k_k[c0], t1 = key_load(kir + c1) * k_k[c1];
        const float sq = warp_sum_float(t0 * t0 + t1 * t1);
        const float norm = sqrtf(sq);
        const float inv = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
        key_store(kkr + c0, t0 * inv);
        key_store(kkr + c1, t1 * inv);
    }
    if (c0 < C)
        key_store(kr + c0, key_load(kir + c0) * (1.0f + (key_a(ar + c0, a0, c0) - 1.0f) * k_a[c0]));
    if (c1 < C)
        key_store(kr + c1, key_load(kir + c1) * (1.0f + (key_a(ar + c1, a0, c1) - 1.0f) * k_a[c1]));
}

// key_prepare reading k_in (backend.h key_prepare_from: training's copy of
// k_pre into k folded in; k_in == k: the in-place op).
static void cuda_key_prepare_from(rp_backend *be, float *kk, float *k, const float *k_in,
                                  float *a, const float *a0, const float *k_k, const float *k_a,
                                  int R, int C, int N) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (N != KEY_HEAD) {
        rp_cuda_record(cx, cudaErrorInvalidValue, "key_prepare (head size not 64)", __FILE__,
                       __LINE__);
        return;
    }
    if (R <= 0 || C <= 0) return;
    const size_t groups = (size_t)R * ((C + KEY_HEAD - 1) / KEY_HEAD), n = (size_t)R * C;
    // a's sigmoid (a0): in this kernel's pass where a is bf16 in place
    // (training), else bias_act first; the same bits either way
    if (a0 && !rp_cuda_inplace_find(cx, a, n)) {
        cuda_bias_act(be, a, a0, R, C, RP_ACT_SIGMOID);
        a0 = nullptr;
    }
    // A WKV7-only kk (backend.h wkv_only) is written in bf16 in place, no
    // f32 (half the bytes; the WKV7 kernels widen it). With the copies off it
    // stays f32, rounded to bf16 after, so both give the WKV7 kernels the
    // same values (test_act16_exact).
    const int only = rp_cuda_take_wkv_only(cx, kk, n) && rp_cuda_store16_rows(cx, R);
    const int only16 = only && !cx->act16_off;
    if (!only16 && !rp_cuda_store16_fits(cx, kk, n, "key_prepare")) return;
    // a in bf16 in place (training: its LoRA up GEMM under gemm_only, the
    // a0 sigmoid in place) is read so; its f32 memory holds no values
    __nv_bfloat16 *a16 = (__nv_bfloat16 *)rp_cuda_inplace_find(cx, a, n);
    if (!a16 && !rp_cuda_store16_fits(cx, a, n, "key_prepare (a)")) return;
    // An rkv_only k (WKV7 and the fused groupnorm its only readers) out of
    // k_pre: bf16 in place, with kk and a so (training hints the three
    // together: one instantiation); with the copies off f32 rounded after.
    // In place (k_in == k) a bf16 k would overwrite k_in's unread floats.
    const int k_only = rp_cuda_take_rkv_only(cx, k, n) && rp_cuda_store16_rows(cx, R) && k != k_in;
    const int k16 = k_only && !cx->act16_off;
    // k_in (k_pre) in bf16 in place: its GEMM took an rkv_only hint; read
    // so only with k, kk and a bf16 (training hints them together)
    const __nv_bfloat16 *k_in16 = k != k_in ? rp_cuda_inplace_find(cx, k_in, n) : NULL;
    if ((k16 && !(only16 && a16)) || (k_in16 && !k16)) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda key_prepare: k_in is stored %s, k is %s, kk %s, a %s; the "
                         "kernels take a bf16 k only with kk wkv_only and a in bf16, a bf16 "
                         "k_in only with a bf16 k (hint k_pre and k rkv_only together)",
                         k_in16 ? "bf16 in place" : "f32", k16 ? "rkv_only" : "f32",
                         only16 ? "wkv_only" : "f32", a16 ? "bf16 in place" : "f32");
        return;
    }
    if (!k16 && !rp_cuda_store16_fits(cx, k, n, "key_prepare (k)")) return;
    if (!k_in16 && !rp_cuda_store16_fits(cx, k_in, n, "key_prepare (k_in)")) return;
    const unsigned blocks = warp_blocks(groups);
    __nv_bfloat16 *const kk16 = (__nv_bfloat16 *)kk;
    if (k_in16)
        key_prepare_kernel<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>
            <<<blocks, EW_THREADS, 0, cx->stream>>>(kk16, (__nv_bfloat16 *)k, k_in16, a16, k_k,
                                                   k_a, R, C, a0);
    else if (k16)
        key_prepare_kernel<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>
            <<<blocks, EW_THREADS, 0, cx->stream>>>(kk16, (__nv_bfloat16 *)k, k_in, a16, k_k,
                                                   k_a, R, C, a0);
    else if (only16 && a16)
        key_prepare_kernel<__nv_bfloat16, __nv_bfloat16>
            <<<blocks, EW_THREADS, 0, cx->stream>>>(kk16, k, k_in, a16, k_k, k_a, R, C, a0);
    else if (only16)
        key_prepare_kernel<__nv_bfloat16, float>
            <<<blocks, EW_THREADS, 0, cx->stream>>>(kk16, k, k_in, a, k_k, k_a, R, C, nullptr);
    else if (a16)
        key_prepare_kernel<float, __nv_bfloat16>
            <<<blocks, EW_THREADS, 0, cx->stream>>>(kk, k, k_in, a16, k_k, k_a, R, C, a0);
    else
        key_prepare_kernel<float, float>
            <<<blocks, EW_THREADS, 0, cx->stream>>>(kk, k, k_in, a, k_k, k_a, R, C, nullptr);
    RP_CUDA_LAUNCHED_OUT(cx, "key_prepare", {kk, n * (only16 ? sizeof(__nv_bfloat16) : sizeof(float))},
                         {k, n * (k16 ? sizeof(__nv_bfloat16) : sizeof(float))});
    rp_cuda_store16_done(cx, kk, n, only, only16);
    rp_cuda_store16_done(cx, k, n, k_only, k16);
}

static void cuda_key_prepare(rp_backend *be, float *kk, float *k, const float *a,
                             const float *k_k, const float *k_a, int R, int C, int N) {
    cuda_key_prepare_from(be, kk, k, k, (float *)a, NULL, k_k, k_a, R, C, N);
}

// ---- bonus + gate ----

// out [R,C] = (in + (sum_j r_j k_j r_k[h,j]) * v_h) * g per head h of N
// channels, r_k [H,N]; one warp per (row, head). in may be out; out NULL:
// only out16 (a bf16 in-place output, which then must not overlap in).
static __global__ void bonus_gate_kernel(float *out, const float *in, const float *r,
                                         const float *k, const float *v, const float *r_k,
                                         const float *g, int R, int C, int N,
                                         __nv_bfloat16 *out16) {
    const int H = C / N;
    const size_t group = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (group >= (size_t)R * H) return;  // the whole warp leaves together
    const size_t row = group / H;
    const int h = (int)(group % H);
    const size_t o = row * C + (size_t)h * N;
    const float *rh = r + o, *kh = k + o, *vh = v + o, *gh = g + o, *rkh = r_k + (size_t)h * N;
    const float *ih = in + o;

    float bonus = 0.0f;
    for (int j = lane; j < N; j += 32) bonus += rh[j] * kh[j] * rkh[j];
    bonus = warp_sum_float(bonus);
    for (int j = lane; j < N; j += 32) {
        const float o_j = (ih[j] + bonus * vh[j]) * gh[j];
        if (out) out[o + j] = o_j;
        if (out16) out16[o + j] = __float2bfloat16(o_j);
    }
}

static void cuda_bonus_gate(rp_backend *be, float *out, const float *r, const float *k,
                            const float *v, const float *r_k, const float *g, int R, int C,
                            int N) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (R <= 0 || N <= 0 || C < N) return;
    const size_t groups = (size_t)R * (C / N);
    __nv_bfloat16 *out16 = rp_cuda_act16_for_rows(cx, out, (size_t)R * C, R);
    bonus_gate_kernel<<<warp_blocks(groups), EW_THREADS, 0, cx->stream>>>(out, out, r, k, v, r_k,
                                                                          g, R, C, N, out16);
    RP_CUDA_LAUNCHED_OUT(cx, "bonus_gate", {out, (size_t)R * C * sizeof(float)});
    if (out16) rp_cuda_act16_publish(cx, out16, out, (size_t)R * C);
}

// out = bonus_gate of o, out of place. A GEMM-only out (gemm_only hint, BF16
// math, above the GEMV rows, copies on) is written in bf16 in place only:
// the bits a conversion of the f32 result gives, so nothing changes.
static void cuda_bonus_gate_to(rp_backend *be, float *out, const float *o, const float *r,
                               const float *k, const float *v, const float *r_k, const float *g,
                               int R, int C, int N) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const size_t n = (size_t)R * C;
    const int only16 = rp_cuda_take_gemm_only(cx, out, n) && rp_cuda_store16_rows(cx, R) &&
                       !cx->act16_off;
    if (R <= 0 || N <= 0 || C < N) return;
    const size_t groups = (size_t)R * (C / N);
    if (!only16 && !rp_cuda_store16_fits(cx, out, n, "bonus_gate_to")) return;
    __nv_bfloat16 *out16 = only16 ? (__nv_bfloat16 *)out : rp_cuda_act16_for_rows(cx, out, n, R);
    bonus_gate_kernel<<<warp_blocks(groups), EW_THREADS, 0, cx->stream>>>(
        only16 ? NULL : out, o, r, k, v, r_k, g, R, C, N, out16);
    RP_CUDA_LAUNCHED_OUT(cx, "bonus_gate",
                         {out, n * (only16 ? sizeof(__nv_bfloat16) : sizeof(float))});
    if (only16)
        rp_cuda_inplace_add(cx, out, n);
    else if (out16)
        rp_cuda_act16_publish(cx, out16, out, n);
}

// ---- groupnorm + bonus + gate, fused (backend.h groupnorm_bonus_gate) ----

// out [R,C] = bonus_gate(groupnorm(y)), one warp per (row, head): the
// groupnorm output stays in registers (never stored, the backward recomputes
// it from y, mean, rstd). The same formulas in the same order as
// groupnorm_kernel then bonus_gate_kernel, so the same bits. y is the WKV7
// output: f32, or bf16 in place (TY) when WKV7 stored it so; r, k, v and
// the gate g likewise (TR: backend.h rkv_only). out NULL: only out16 (a
// GEMM-only og in bf16 in place).
template <typename TY, typename TR = float>
static __global__ void groupnorm_bonus_gate_kernel(float *out, __nv_bfloat16 *out16, float *mean,
                                                   float *rstd, const TY *y,
                                                   const float *weight, const float *bias,
                                                   const TR *r, const TR *k, const TR *v,
                                                   const float *r_k, const TR *g, int R,
                                                   int C, int N, float eps) {
    const int H = C / N;
    const size_t group = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (group >= (size_t)R * H) return;  // the whole warp leaves together
    const size_t row = group / H;
    const int h = (int)(group % H);
    const size_t o = row * C + (size_t)h * N;
    const TY *yh = y + o;
    const float *wh = weight + (size_t)h * N, *bh = bias + (size_t)h * N;
    const TR *rh = r + o, *kh = k + o, *vh = v + o, *gh = g + o;
    const float *rkh = r_k + (size_t)h * N;

    float m, s;
    rp_warp_group_moments(yh, N, eps, lane, &m, &s);
    float bonus = 0.0f;
    for (int j = lane; j < N; j += 32) bonus += rp_ldf(rh + j) * rp_ldf(kh + j) * rkh[j];
    bonus = warp_sum_float(bonus);
    for (int j = lane; j < N; j += 32) {
        const float gn = (rp_ldf(yh + j) - m) * s * wh[j] + bh[j];
        const float o_j = (gn + bonus * rp_ldf(vh + j)) * rp_ldf(gh + j);
        if (out) out[o + j] = o_j;
        if (out16) out16[o + j] = __float2bfloat16(o_j);
    }
    if (lane == 0) {
        if (mean) mean[group] = m;  // group == row * H + h
        if (rstd) rstd[group] = s;
    }
}

// groupnorm(y) into a temporary + bonus_gate_to(out), in one pass: reads y,
// r, k, v, g once, writes out (bf16 in place under a gemm_only hint, as
// bonus_gate_to) and mean/rstd [R,H].
static void cuda_groupnorm_bonus_gate(rp_backend *be, float *out, float *mean, float *rstd,
                                      const float *y, const float *weight, const float *bias,
                                      const float *r, const float *k, const float *v,
                                      const float *r_k, const float *g, int R, int C, int N,
                                      float eps) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const size_t n = (size_t)R * C;
    const int only16 = rp_cuda_take_gemm_only(cx, out, n) && rp_cuda_store16_rows(cx, R) &&
                       !cx->act16_off;
    if (R <= 0 || N <= 0 || C < N) return;
    const size_t groups = (size_t)R * (C / N);
    __nv_bfloat16 *out16 = only16 ? (__nv_bfloat16 *)out : rp_cuda_act16_for_rows(cx, out, n, R);
    float *out32 = only16 ? NULL : out;
    // y in bf16 in place when the WKV7 forward stored it so
    const __nv_bfloat16 *y16 = rp_cuda_inplace_find(cx, y, n);
    if ((!only16 && !rp_cuda_store16_fits(cx, out, n, "groupnorm_bonus_gate")) ||
        (!y16 && !rp_cuda_store16_fits(cx, y, n, "groupnorm_bonus_gate (y)")))
        return;
    // r, k, v and g in bf16 in place (rkv_only) only with y so: training
    // hints the five together, one instantiation; anything else is an error
    const __nv_bfloat16 *rkv16[4];
    const int n_rkv16 = rp_cuda_rkv16(cx, "groupnorm_bonus_gate", r, k, v, g, n, rkv16);
    if (n_rkv16 < 0) return;
    if (n_rkv16 && !y16) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda groupnorm_bonus_gate: r, k, v and g are bf16 in place but y is "
                         "f32; hint them rkv_only only where y is wkv_only");
        return;
    }
    if (n_rkv16)
        groupnorm_bonus_gate_kernel<__nv_bfloat16, __nv_bfloat16>
            <<<warp_blocks(groups), EW_THREADS, 0, cx->stream>>>(
                out32, out16, mean, rstd, y16, weight, bias, rkv16[0], rkv16[1], rkv16[2], r_k,
                rkv16[3], R, C, N, eps);
    else if (y16)
        groupnorm_bonus_gate_kernel<__nv_bfloat16><<<warp_blocks(groups), EW_THREADS, 0,
                                                     cx->stream>>>(
            out32, out16, mean, rstd, y16, weight, bias, r, k, v, r_k, g, R, C, N, eps);
    else
        groupnorm_bonus_gate_kernel<float><<<warp_blocks(groups), EW_THREADS, 0, cx->stream>>>(
            out32, out16, mean, rstd, y, weight, bias, r, k, v, r_k, g, R, C, N, eps);
    RP_CUDA_LAUNCHED_OUT(cx, "groupnorm_bonus_gate",
                         {out, n * (only16 ? sizeof(__nv_bfloat16) : sizeof(float))},
                         {mean, groups * sizeof(float)}, {rstd, groups * sizeof(float)});
    if (only16)
        rp_cuda_inplace_add(cx, out, n);
    else if (out16)
        rp_cuda_act16_publish(cx, out16, out, n);
}

// ---- install ----

void rp_cuda_install_elementwise(rp_backend *be) {
    be->layernorm = cuda_layernorm;
    be->token_shift = cuda_token_shift;
    be->lerp = cuda_lerp;
    be->ln_shift_mix = cuda_ln_shift_mix;
    be->shift_mix = cuda_shift_mix;
    be->ln_shift_mix_train = cuda_ln_shift_mix_train;
    be->ln_mix_again_fits = cuda_ln_mix_again_fits;
    be->ln_mix_again = cuda_ln_mix_again;
    be->bias_act = cuda_bias_act;
    be->value_residual = cuda_value_residual;
    be->key_prepare = cuda_key_prepare;
    be->value_residual_from = cuda_value_residual_from;
    be->key_prepare_from = cuda_key_prepare_from;
    be->groupnorm = cuda_groupnorm;
    be->bonus_gate = cuda_bonus_gate;
    be->bonus_gate_to = cuda_bonus_gate_to;
    be->groupnorm_bonus_gate = cuda_groupnorm_bonus_gate;
}
