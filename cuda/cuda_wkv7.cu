// The RWKV-7 WKV recurrence on the GPU: wkv7 (sequence mode over a ragged
// batch; decode is the case of every seq_len 1), wkv7_forward_train (the same
// plus a state checkpoint before every RP_WKV_CHUNK-th token) and
// wkv7_backward (runs each chunk forward once from its checkpoint, then walks
// it backwards, stepping the state back by inverting the update). Twins of
// the ops in src/cpu/cpu_wkv7.c. Each kernel is a template over its I/O
// types: fp32, bf16 inputs with fp32 outputs (the model in BF16 math when
// bf16 copies of all inputs exist), or bf16 throughout (the official
// kernel's dtype; cuda_wkv7.h); state, decay and sums stay fp32. TK is the
// type of the inputs training stores bf16 in place, kk, w_raw and a (backend.h
// wkv_only, gemm_only), TI that of r, k, v.
#include "cuda_internal.h"
#include "cuda_wkv7.h"
#include <mma.h>

#include <type_traits>

// Layout (the official RWKV-7 kernel's, with two threads per row): one block
// of 128 threads per (sequence, head); thread (i = tid / 2, p = tid % 2) holds
// half of state row i (value channel i) in 32 registers: the columns (key
// channels) wkv_col(jj, p), jj = 0..31. Row sums take one shuffle between the
// two halves; the per-token vectors are broadcast from shared memory. State
// and decay are fp32 throughout.
#define WKV_N 64
#define WKV_NN (WKV_N * WKV_N)
#define WKV_THREADS 128
#define WKV_HALF 32

// Backward: the longest walk of the state back by inverting the update. Each
// inverted step can grow the rounding error by 1/d <= 1.84, so the chunk's
// forward pass keeps the exact state every WKV_BACK_STEPS tokens (one tile of
// 16.25 KB for 8) and the walk restarts from it: 8 steps keep the gradients
// within ~2e-6 of exact even when every decay is the strongest (16: 1e-4).
#define WKV_BACK_STEPS 8
#define WKV_ANCHORS (RP_WKV_CHUNK / WKV_BACK_STEPS - 1)
static_assert(RP_WKV_CHUNK % WKV_BACK_STEPS == 0 && WKV_ANCHORS >= 1,
              "anchors split the checkpoint chunk evenly");

// e^-0.5: d = exp(-e^-0.5 sigmoid(w_raw)), dd/dw_raw = d (-e^-0.5) sig (1 - sig)
#define WKV_SCALE 0.6065306597126334f

// Per-token vectors in shared memory, [VEC_COUNT][64] per buffer. The forward
// uses the first five; d = decay(w_raw), a = -kk, b = kk * iclr (kernel a, b).
enum { VEC_R = 0, VEC_D, VEC_K, VEC_A, VEC_B, VEC_FORWARD_COUNT, VEC_V = VEC_FORWARD_COUNT,
       VEC_DY, VEC_COUNT };

// Column jj of half p of a row (or row jj of half p of a column): blocks of 16
// alternate between the halves ({0..15, 32..47} and {16..31, 48..63}), so the
// two threads of a pair sit 16 banks apart in the padded tile.
__device__ __forceinline__ int wkv_col(int jj, int p) {
    return (jj & 15) + 16 * p + 32 * (jj >> 4);
}

// Element (m, j) of a [64,64] tile in shared memory, rows padded to 65
// floats: a row write (thread i at (i, wkv_col(jj, p))), a column read
// (thread i at (wkv_col(mm, p), i)) and a coalesced copy (a warp on 32
// columns of one row) are all free of bank conflicts, and every address is a
// per-thread base plus a compile-time offset (no address registers per element).
#define WKV_TILE_STRIDE (WKV_N + 1)
#define WKV_TILE (WKV_N * WKV_TILE_STRIDE)
__device__ __forceinline__ int wkv_tile(int m, int j) { return m * WKV_TILE_STRIDE + j; }
// wkv_tile(wkv_col(mm, p), i) - wkv_tile(16 * p, i): a compile-time offset
// for an unrolled mm
__device__ __forceinline__ int wkv_col_offset(int mm) {
    return ((mm & 15) + 32 * (mm >> 4)) * WKV_TILE_STRIDE;
}

// Element o of an input, as fp32 (bf16 widens exactly).
__device__ __forceinline__ float wkv_in(const float *p, size_t o) { return p[o]; }
__device__ __forceinline__ float wkv_in(const __nv_bfloat16 *p, size_t o) {
    return __bfloat162float(p[o]);
}

// One token's vectors of a channel as the chunk form uses them (the FMA and
// the wmma chunked forwards): r, the decay d, k, a = -kk and b = kk * a; a
// token past the sequence's end is {0, 1, 0, 0, 0} (decay 1: no change).
struct wkv_chunk_token {
    float r, d, k, a, b;
};
template <typename TI, typename TK = TI>
__device__ __forceinline__ wkv_chunk_token wkv_chunk_token_in(const TI *r, const TK *w_raw,
                                                              const TI *k, const TK *kk,
                                                              const TK *a, size_t o) {
    const float kkv = wkv_in(kk, o);
    return wkv_chunk_token{wkv_in(r, o), rp_decayf(wkv_in(w_raw, o)), wkv_in(k, o), -kkv,
                           kkv * wkv_in(a, o)};
}

// Element o of an output <- x (bf16: rounded to nearest even, once).
__device__ __forceinline__ void wkv_out(float *p, size_t o, float x) { p[o] = x; }
__device__ __forceinline__ void wkv_out(__nv_bfloat16 *p, size_t o, float x) {
    p[o] = __float2bfloat16_rn(x);
}

__device__ __forceinline__ float4 wkv_ld4(const float *p) {
    return *reinterpret_cast<const float4 *>(p);
}

// Sum of four partial accumulators of this thread, plus the partner half's
// (a + b == b + a: both threads of the pair get the same bits).
__device__ __forceinline__ float wkv_pair_total(float a0, float a1, float a2, float a3) {
    const float part = (a0 + a1) + (a2 + a3);
    return part + __shfl_xor_sync(0xffffffffu, part, 1);
}

// This thread's half of row i of the state times a [64] vector z (S0 z for
// the chunked forward): four interleaved partial sums, then the pair's total.
__device__ __forceinline__ float wkv_half_row_dot(const float *st, const float *z, int p) {
    float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
#pragma unroll
    for (int jq = 0; jq < WKV_HALF / 4; jq++) {
        const float4 z4 = wkv_ld4(z + wkv_col(4 * jq, p));
        c0 = __fmaf_rn(st[4 * jq + 0], z4.x, c0);
        c1 = __fmaf_rn(st[4 * jq + 1], z4.y, c1);
        c2 = __fmaf_rn(st[4 * jq + 2], z4.z, c2);
        c3 = __fmaf_rn(st[4 * jq + 3], z4.w, c3);
    }
    return wkv_pair_total(c0, c1, c2, c3);
}

// tile <- g [64,64] row-major; coalesced 512-byte rows per block step.
__device__ __forceinline__ void wkv_tile_load(float *tile, const float *g) {
#pragma unroll 8
    for (int n = 0; n < WKV_NN / WKV_THREADS; n++) {
        const int f = threadIdx.x + WKV_THREADS * n;
        tile[wkv_tile(f >> 6, f & 63)] = g[f];
    }
}

// g [64,64] row-major <- tile.
__device__ __forceinline__ void wkv_tile_store(float *g, const float *tile) {
#pragma unroll 8
    for (int n = 0; n < WKV_NN / WKV_THREADS; n++) {
        const int f = threadIdx.x + WKV_THREADS * n;
        g[f] = tile[wkv_tile(f >> 6, f & 63)];
    }
}

// st [32] = this thread's half of row i of g [64,64], staged through tile so
// the global reads are coalesced. Leaves the tile free for reuse.
__device__ __forceinline__ void wkv_load_rows(float (&st)[WKV_HALF], float *tile, const float *g,
                                              int i, int p) {
    wkv_tile_load(tile, g);
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < WKV_HALF; jj++) st[jj] = tile[wkv_tile(i, wkv_col(jj, p))];
    __syncthreads();
}

// Row i's halves -> tile (the caller syncs before reading it).
__device__ __forceinline__ void wkv_put_rows(float *tile, const float (&st)[WKV_HALF], int i,
                                             int p) {
#pragma unroll
    for (int jj = 0; jj < WKV_HALF; jj++) tile[wkv_tile(i, wkv_col(jj, p))] = st[jj];
}

// g [64,64] row-major <- the rows held in registers, staged through tile.
__device__ __forceinline__ void wkv_store_rows(float *g, float *tile, const float (&st)[WKV_HALF],
                                               int i, int p) {
    __syncthreads();  // earlier readers of the tile are done
    wkv_put_rows(tile, st, i, p);
    __syncthreads();
    wkv_tile_store(g, tile);
}

// One token's inputs for the forward, channel i, split over the pair:
// p = 0 loads r (when wanted), w_raw, k; p = 1 loads kk, iclr; both load v_i.
struct wkv_fwd_in {
    float x0, x1, x2, v;
};

template <typename TI, typename TK = TI>
__device__ __forceinline__ void wkv_fwd_load(wkv_fwd_in &q, const TI *r, const TK *w_raw,
                                             const TI *k, const TI *v, const TK *kk,
                                             const TK *a, size_t o, int p) {
    if (p == 0) {
        q.x0 = r ? wkv_in(r, o) : 0.0f;
        q.x1 = wkv_in(w_raw, o);
        q.x2 = wkv_in(k, o);
    } else {
        q.x0 = wkv_in(kk, o);
        q.x1 = wkv_in(a, o);
        q.x2 = 0.0f;
    }
    q.v = wkv_in(v, o);
}

// V [VEC_FORWARD_COUNT,64] <- the token's r, d, k, a = -kk, b = kk * iclr.
__device__ __forceinline__ void wkv_fwd_stage(const wkv_fwd_in &q, float *V, int i, int p) {
    if (p == 0) {
        V[VEC_R * WKV_N + i] = q.x0;
        V[VEC_D * WKV_N + i] = rp_decayf(q.x1);
        V[VEC_K * WKV_N + i] = q.x2;
    } else {
        V[VEC_A * WKV_N + i] = -q.x0;
        V[VEC_B * WKV_N + i] = q.x0 * q.x1;
    }
}

// One token on the thread's half row st of row i:
//   sa_i = sum_j S[i,j] a_j;  S[i,j] = S[i,j] d_j + sa_i b_j + v_i k_j;
//   y_i = sum_j S[i,j] r_j  (S after the update).
// The update is spelled with explicit roundings so that the backward's
// recomputation gives the forward's bits.
template <bool WITH_Y>
__device__ __forceinline__ void wkv_forward_step(float (&st)[WKV_HALF], const float *V, float v_i,
                                                 int p, float &sa_out, float &y_out) {
    const float *R = V + VEC_R * WKV_N, *D = V + VEC_D * WKV_N, *K = V + VEC_K * WKV_N,
                *A = V + VEC_A * WKV_N, *B = V + VEC_B * WKV_N;
    float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
#pragma unroll
    for (int jq = 0; jq < WKV_HALF / 4; jq++) {
        const int j = wkv_col(4 * jq, p);
        const float4 a4 = wkv_ld4(A + j);
        c0 = __fmaf_rn(st[4 * jq + 0], a4.x, c0);
        c1 = __fmaf_rn(st[4 * jq + 1], a4.y, c1);
        c2 = __fmaf_rn(st[4 * jq + 2], a4.z, c2);
        c3 = __fmaf_rn(st[4 * jq + 3], a4.w, c3);
    }
    const float sa = wkv_pair_total(c0, c1, c2, c3);
    c0 = c1 = c2 = c3 = 0.0f;
#pragma unroll
    for (int jq = 0; jq < WKV_HALF / 4; jq++) {
        const int j = wkv_col(4 * jq, p);
        const float4 d4 = wkv_ld4(D + j), b4 = wkv_ld4(B + j), k4 = wkv_ld4(K + j);
        float *s4 = st + 4 * jq;
        s4[0] = __fmaf_rn(s4[0], d4.x, __fmaf_rn(sa, b4.x, __fmul_rn(v_i, k4.x)));
        s4[1] = __fmaf_rn(s4[1], d4.y, __fmaf_rn(sa, b4.y, __fmul_rn(v_i, k4.y)));
        s4[2] = __fmaf_rn(s4[2], d4.z, __fmaf_rn(sa, b4.z, __fmul_rn(v_i, k4.z)));
        s4[3] = __fmaf_rn(s4[3], d4.w, __fmaf_rn(sa, b4.w, __fmul_rn(v_i, k4.w)));
        if (WITH_Y) {
            const float4 r4 = wkv_ld4(R + j);
            c0 = __fmaf_rn(s4[0], r4.x, c0);
            c1 = __fmaf_rn(s4[1], r4.y, c1);
            c2 = __fmaf_rn(s4[2], r4.z, c2);
            c3 = __fmaf_rn(s4[3], r4.w, c3);
        }
    }
    sa_out = sa;
    y_out = WITH_Y ? wkv_pair_total(c0, c1, c2, c3) : 0.0f;
}

// y, r, w_raw, k, v, kk, a [R,C]; state slots [H,64,64] each (row i = value
// channel) updated in place; checkpoints [blocks,H,64,64] (TRAIN only).
// grid (n_seq, H), 128 threads. The next token's inputs are loaded while the
// current one is computed; the vectors are double-buffered, one sync a token.
template <bool TRAIN, typename TI, typename TO, typename TK = TI>
__global__ void __launch_bounds__(WKV_THREADS)
    wkv7_forward_kernel(TO *y, const TI *r, const TK *w_raw, const TI *k,
                        const TI *v, const TK *kk, const TK *a, float *state_base,
                        size_t state_stride, float *checkpoints, const int32_t *seq_len,
                        const int32_t *row_begin, const int32_t *slot,
                        const int32_t *ckpt_block, int C) {
    __shared__ __align__(16) float tile[WKV_TILE];
    __shared__ __align__(16) float vec[2 * VEC_FORWARD_COUNT * WKV_N];
    const int s = blockIdx.x, h = blockIdx.y, H = gridDim.y;
    const int i = threadIdx.x >> 1, p = threadIdx.x & 1;
    const int len = seq_len[s];
    float *state = state_base + (size_t)slot[s] * state_stride + (size_t)h * WKV_NN;
    const size_t base = (size_t)row_begin[s] * C + (size_t)h * WKV_N + i;

    // the first token's loads go out before the state's (decode: one token)
    wkv_fwd_in q = {0.0f, 0.0f, 0.0f, 0.0f};
    if (len > 0) wkv_fwd_load(q, r, w_raw, k, v, kk, a, base, p);
    float st[WKV_HALF];
    wkv_load_rows(st, tile, state, i, p);
    for (int t = 0; t < len; t++) {
        if (TRAIN && t % RP_WKV_CHUNK == 0) {
            const size_t block = (size_t)ckpt_block[s] + (size_t)(t / RP_WKV_CHUNK);
            wkv_store_rows(checkpoints + (block * H + h) * WKV_NN, tile, st, i, p);
        }
        float *V = vec + (t & 1) * VEC_FORWARD_COUNT * WKV_N;
        wkv_fwd_stage(q, V, i, p);
        const float v_i = q.v;
        if (t + 1 < len) wkv_fwd_load(q, r, w_raw, k, v, kk, a, base + (size_t)(t + 1) * C, p);
        __syncthreads();
        float sa, yi;
        wkv_forward_step<true>(st, V, v_i, p, sa, yi);
        if (p == 0) wkv_out(y, base + (size_t)t * C, yi);
    }
    wkv_store_rows(state, tile, st, i, p);
}

// ---- the per-token forward with a head's rows split over blocks ----
//
// Row i of the state evolves alone given the token's shared vectors (r, d, k,
// a, b) and its own v_i, and y_i is row i's own sum: SPLIT blocks of a
// (sequence, head) can each own WKV_N / SPLIT rows with nothing to combine
// across blocks. Each thread runs wkv_forward_step on its half row exactly as
// in wkv7_forward_kernel, so y, the state and the checkpoints are the same
// bits for every SPLIT; what a block does more is load the token's five shared
// vectors for all 64 channels (SPLIT blocks read them, L2 serves the rest).
// Used when it evens out the SMs' load (wkv_rows_split below).
template <int SPLIT>
struct wkv_rows {
    static constexpr int ROWS = WKV_N / SPLIT;       // value rows per block
    static constexpr int THREADS = 2 * ROWS;        // two per row, as above
    static constexpr int CH = WKV_N / THREADS;      // shared channels loaded per thread
    static_assert(SPLIT == 2 || SPLIT == 4, "1 is wkv7_forward_kernel; warps stay whole");
};

// One token's inputs for a split block: channels ch(c) = tid + THREADS c of
// the shared vectors, and v of the thread's row.
template <int SPLIT>
struct wkv_rows_in {
    float r[wkv_rows<SPLIT>::CH], w[wkv_rows<SPLIT>::CH], k[wkv_rows<SPLIT>::CH],
        kk[wkv_rows<SPLIT>::CH], ic[wkv_rows<SPLIT>::CH], v;
};

template <int SPLIT, typename TI, typename TK = TI>
__device__ __forceinline__ void wkv_rows_load(wkv_rows_in<SPLIT> &q, const TI *r,
                                              const TK *w_raw, const TI *k, const TI *v,
                                              const TK *kk, const TK *a, size_t head, int i) {
#pragma unroll
    for (int c = 0; c < wkv_rows<SPLIT>::CH; c++) {
        const size_t o = head + threadIdx.x + wkv_rows<SPLIT>::THREADS * c;
        q.r[c] = r ? wkv_in(r, o) : 0.0f;
        q.w[c] = wkv_in(w_raw, o);
        q.k[c] = wkv_in(k, o);
        q.kk[c] = wkv_in(kk, o);
        q.ic[c] = wkv_in(a, o);
    }
    q.v = wkv_in(v, head + i);
}

// V [VEC_FORWARD_COUNT,64] <- r, d, k, a = -kk, b = kk * iclr, as wkv_fwd_stage.
template <int SPLIT>
__device__ __forceinline__ void wkv_rows_stage(const wkv_rows_in<SPLIT> &q, float *V) {
#pragma unroll
    for (int c = 0; c < wkv_rows<SPLIT>::CH; c++) {
        const int ch = threadIdx.x + wkv_rows<SPLIT>::THREADS * c;
        V[VEC_R * WKV_N + ch] = q.r[c];
        V[VEC_D * WKV_N + ch] = rp_decayf(q.w[c]);
        V[VEC_K * WKV_N + ch] = q.k[c];
        V[VEC_A * WKV_N + ch] = -q.kk[c];
        V[VEC_B * WKV_N + ch] = q.kk[c] * q.ic[c];
    }
}

// st = this thread's half of its row (il = local row) of the block's rows
// g [ROWS,64] (row-major, contiguous), staged through tile for coalescing.
template <int SPLIT>
__device__ __forceinline__ void wkv_rows_get(float (&st)[WKV_HALF], float *tile, const float *g,
                                             int il, int p) {
#pragma unroll 8
    for (int n = 0; n < WKV_N * wkv_rows<SPLIT>::ROWS / wkv_rows<SPLIT>::THREADS; n++) {
        const int f = threadIdx.x + wkv_rows<SPLIT>::THREADS * n;
        tile[wkv_tile(f >> 6, f & 63)] = g[f];
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < WKV_HALF; jj++) st[jj] = tile[wkv_tile(il, wkv_col(jj, p))];
    __syncthreads();
}

// g [ROWS,64] <- the block's rows held in registers, staged through tile.
template <int SPLIT>
__device__ __forceinline__ void wkv_rows_put(float *g, float *tile, const float (&st)[WKV_HALF],
                                             int il, int p) {
    __syncthreads();  // earlier readers of the tile are done
    wkv_put_rows(tile, st, il, p);
    __syncthreads();
#pragma unroll 8
    for (int n = 0; n < WKV_N * wkv_rows<SPLIT>::ROWS / wkv_rows<SPLIT>::THREADS; n++) {
        const int f = threadIdx.x + wkv_rows<SPLIT>::THREADS * n;
        g[f] = tile[wkv_tile(f >> 6, f & 63)];
    }
}

// wkv7_forward_kernel's contract; grid (n_seq, H, SPLIT): block z owns the
// value rows [z ROWS, (z + 1) ROWS) of its head, 2 ROWS threads.
template <bool TRAIN, int SPLIT, typename TI, typename TO, typename TK = TI>
__global__ void __launch_bounds__(wkv_rows<SPLIT>::THREADS)
    wkv7_forward_rows_kernel(TO *y, const TI *r, const TK *w_raw, const TI *k, const TI *v,
                             const TK *kk, const TK *a, float *state_base, size_t state_stride,
                             float *checkpoints, const int32_t *seq_len,
                             const int32_t *row_begin, const int32_t *slot,
                             const int32_t *ckpt_block, int C) {
    constexpr int ROWS = wkv_rows<SPLIT>::ROWS;
    __shared__ __align__(16) float tile[ROWS * WKV_TILE_STRIDE];
    __shared__ __align__(16) float vec[2 * VEC_FORWARD_COUNT * WKV_N];
    const int s = blockIdx.x, h = blockIdx.y, H = gridDim.y;
    const int i0 = (int)blockIdx.z * ROWS;
    const int il = threadIdx.x >> 1, p = threadIdx.x & 1, i = i0 + il;
    const int len = seq_len[s];
    const size_t rows_off = (size_t)h * WKV_NN + (size_t)i0 * WKV_N;
    float *state = state_base + (size_t)slot[s] * state_stride + rows_off;
    const size_t head = (size_t)row_begin[s] * C + (size_t)h * WKV_N;

    wkv_rows_in<SPLIT> q = {};
    if (len > 0) wkv_rows_load<SPLIT>(q, r, w_raw, k, v, kk, a, head, i);
    float st[WKV_HALF];
    wkv_rows_get<SPLIT>(st, tile, state, il, p);
    for (int t = 0; t < len; t++) {
        if (TRAIN && t % RP_WKV_CHUNK == 0) {
            const size_t block = (size_t)ckpt_block[s] + (size_t)(t / RP_WKV_CHUNK);
            wkv_rows_put<SPLIT>(checkpoints + block * H * WKV_NN + rows_off, tile, st, il, p);
        }
        float *V = vec + (t & 1) * VEC_FORWARD_COUNT * WKV_N;
        wkv_rows_stage<SPLIT>(q, V);
        const float v_i = q.v;
        if (t + 1 < len)
            wkv_rows_load<SPLIT>(q, r, w_raw, k, v, kk, a, head + (size_t)(t + 1) * C, i);
        __syncthreads();
        float sa, yi;
        wkv_forward_step<true>(st, V, v_i, p, sa, yi);
        if (p == 0) wkv_out(y, head + (size_t)t * C + i, yi);
    }
    wkv_rows_put<SPLIT>(state, tile, st, il, p);
}

// ---- chunked forward (flash-linear-attention's fla/ops/rwkv7 form) ----
//
// Per chunk of L = RP_WKV_CHUNK tokens from state S0, with g_t the cumulative
// decay prod_{u<=t} d_u (per key channel; g_0 = 1 before the first token):
//   S_t = (S0 + sum_{s<=t} sa_s bh_s^T + v_s kh_s^T) diag(g_t),
//   bh_s = b_s / g_s, kh_s = k_s / g_s, at_t = a_t g_{t-1}, rt_t = r_t g_t,
// so with the L x L products Uab[s,t] = bh_s . at_t, Uak = kh_s . at_t (s < t)
// and Wrb = bh_s . rt_t, Wrk = kh_s . rt_t (s <= t), per value row i:
//   sa_t = (S0 at_t)_i + sum_{s<t} v_s,i Uak[s,t] + sa_s,i Uab[s,t]
//          (forward substitution: the UT transform (I - Uab)^-1 of fla),
//   y_t  = (S0 rt_t)_i + sum_{s<=t} sa_s,i Wrb[s,t] + v_s,i Wrk[s,t],
//   S_L  = S0 diag(g_L) + sum_s sa_s (bh_s g_L)^T + v_s (kh_s g_L)^T.
// Every term is a product of tiles ([64,64] x [64,L], [L,64] x [64,L],
// [64,L] x [L,64]): what a tensor-core mma does; here they are FMA loops.
// Overflow: fla divides by the cumulative decay, 1/g grows as 1/d^L. This
// model's decay is bounded below, d >= e^-e^-0.5 = 0.545, so over L = 16
// tokens 1/g <= 0.545^-16 = 1.6e4 and g >= 6e-5 (fp32 holds both with room;
// every product bh_s . at_t equals a ratio g_{t-1}/g_s <= 1 times b . a, so
// no term grows): no log-space or sub-chunking is needed. Tokens past the
// sequence's end are padded with d = 1 and r = k = a = b = v = 0.
#define WKV_L RP_WKV_CHUNK
#define WKV_LL (WKV_L * WKV_L)
enum { CH_R = 0, CH_D, CH_K, CH_A, CH_B, CH_V, CH_COUNT };

// 4 blocks an SM (<= 128 registers, 45 KB of shared memory each): v stays
// in shared memory, not in 16 more registers a thread.
template <bool TRAIN, typename TI, typename TO, typename TK = TI>
__global__ void __launch_bounds__(WKV_THREADS, 4)
    wkv7_chunk_forward_kernel(TO *y, const TI *r, const TK *w_raw, const TI *k, const TI *v,
                              const TK *kk, const TK *a, float *state_base, size_t state_stride,
                              float *checkpoints, const int32_t *seq_len,
                              const int32_t *row_begin, const int32_t *slot,
                              const int32_t *ckpt_block, int C) {
    __shared__ __align__(16) float tile[WKV_TILE];
    __shared__ __align__(16) float ch[CH_COUNT * WKV_L * WKV_N];  // [6][L][64]
    __shared__ __align__(16) float mm[4 * WKV_LL];                 // Uab Uak Wrb Wrk [s][t]
    __shared__ __align__(16) float gl[WKV_N];                      // g_L
    const int s = blockIdx.x, h = blockIdx.y, H = gridDim.y;
    const int i = threadIdx.x >> 1, p = threadIdx.x & 1;
    const int len = seq_len[s];
    float *state = state_base + (size_t)slot[s] * state_stride + (size_t)h * WKV_NN;
    const size_t head = (size_t)row_begin[s] * C + (size_t)h * WKV_N;
    float *R = ch + CH_R * WKV_L * WKV_N, *D = ch + CH_D * WKV_L * WKV_N,
          *K = ch + CH_K * WKV_L * WKV_N, *A = ch + CH_A * WKV_L * WKV_N,
          *B = ch + CH_B * WKV_L * WKV_N, *V = ch + CH_V * WKV_L * WKV_N;
    float *Uab = mm, *Uak = mm + WKV_LL, *Wrb = mm + 2 * WKV_LL, *Wrk = mm + 3 * WKV_LL;

    float st[WKV_HALF];
    wkv_load_rows(st, tile, state, i, p);
    for (int t0 = 0; t0 < len; t0 += WKV_L) {
        const int n = min(WKV_L, len - t0);
        if (TRAIN) {
            const size_t block = (size_t)ckpt_block[s] + (size_t)(t0 / WKV_L);
            wkv_store_rows(checkpoints + (block * H + h) * WKV_NN, tile, st, i, p);
        }
        // the chunk's vectors, coalesced: element f = token u, channel j
        for (int f = threadIdx.x; f < WKV_L * WKV_N; f += WKV_THREADS) {
            const int u = f / WKV_N, j = f % WKV_N;
            wkv_chunk_token q{0.0f, 1.0f, 0.0f, 0.0f, 0.0f};
            float vv = 0.0f;
            if (u < n) {
                const size_t o = head + (size_t)(t0 + u) * C + j;
                q = wkv_chunk_token_in(r, w_raw, k, kk, a, o);
                vv = wkv_in(v, o);
            }
            R[f] = q.r;
            D[f] = q.d;
            K[f] = q.k;
            A[f] = q.a;
            B[f] = q.b;
            V[f] = vv;
        }
        __syncthreads();
        // cumulative decays down each channel: rt, at, bh, kh in place
        if (threadIdx.x < WKV_N) {
            const int j = threadIdx.x;
            float g = 1.0f;
            for (int u = 0; u < WKV_L; u++) {
                const int f = u * WKV_N + j;
                A[f] = __fmul_rn(A[f], g);
                g = __fmul_rn(g, D[f]);
                R[f] = __fmul_rn(R[f], g);
                B[f] = __fdiv_rn(B[f], g);
                K[f] = __fdiv_rn(K[f], g);
            }
            gl[j] = g;
        }
        __syncthreads();
        // the four L x L products, 8 entries a thread
        for (int e = threadIdx.x; e < 4 * WKV_LL; e += WKV_THREADS) {
            const int which = e / WKV_LL, src = (e / WKV_L) % WKV_L, dst = e % WKV_L;
            const bool strict = which < 2;
            float acc = 0.0f;
            if (strict ? src < dst : src <= dst) {
                const float *x = (which & 1 ? K : B) + src * WKV_N;
                const float *z = (which < 2 ? A : R) + dst * WKV_N;
                float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
                for (int j = 0; j < WKV_N; j += 4) {
                    c0 = __fmaf_rn(x[j + 0], z[j + 0], c0);
                    c1 = __fmaf_rn(x[j + 1], z[j + 1], c1);
                    c2 = __fmaf_rn(x[j + 2], z[j + 2], c2);
                    c3 = __fmaf_rn(x[j + 3], z[j + 3], c3);
                }
                acc = (c0 + c1) + (c2 + c3);
            }
            mm[e] = acc;
        }
        __syncthreads();
        // row i: sa (S0 at, then the substitution), y, the new state
        float sa[WKV_L];
#pragma unroll
        for (int t = 0; t < WKV_L; t++) {
            const float *z = A + t * WKV_N;
            float x = wkv_half_row_dot(st, z, p);
            for (int u = 0; u < t; u++) {
                x = __fmaf_rn(V[u * WKV_N + i], Uak[u * WKV_L + t], x);
                x = __fmaf_rn(sa[u], Uab[u * WKV_L + t], x);
            }
            sa[t] = x;
        }
#pragma unroll
        for (int t = 0; t < WKV_L; t++) {
            const float *z = R + t * WKV_N;
            float yt = wkv_half_row_dot(st, z, p);
            for (int u = 0; u <= t; u++) {
                yt = __fmaf_rn(V[u * WKV_N + i], Wrk[u * WKV_L + t], yt);
                yt = __fmaf_rn(sa[u], Wrb[u * WKV_L + t], yt);
            }
            if (t < n && (t & 1) == p) wkv_out(y, head + (size_t)(t0 + t) * C + i, yt);
        }
        // S_L[i,j] = (S0[i,j] + sum_u sa_u bh_u,j + v_u,i kh_u,j) g_L,j
#pragma unroll
        for (int jj = 0; jj < WKV_HALF; jj++) {
            const int j = wkv_col(jj, p);
            float acc = st[jj];
#pragma unroll
            for (int u = 0; u < WKV_L; u++) {
                acc = __fmaf_rn(sa[u], B[u * WKV_N + j], acc);
                acc = __fmaf_rn(V[u * WKV_N + i], K[u * WKV_N + j], acc);
            }
            st[jj] = __fmul_rn(acc, gl[j]);
        }
        __syncthreads();  // the chunk's vectors are refilled next
    }
    wkv_store_rows(state, tile, st, i, p);
}

// ---- chunked forward on tensor cores (BF16 math) ----
//
// The chunk form above with its tile products on bf16 wmma (16x16x16, fp32
// accumulate; operands rounded to bf16 once, where they are staged):
//   the four L x L products Uab Uak Wrb Wrk (warp w: product w, 4 mma),
//   S0 at^T and S0 rt^T [64,L] (warp w: rows 16w..16w+15, 8 mma),
//   S_L = S0 + sa^T bh + v^T kh [64,64] (warp w: rows 16w.., 8 mma; S0 is
//   the fp32 accumulator, exact), then times g_L per column.
// The substitution for sa (sequential in t) and y's in-chunk sums (2 L^2 a
// row) stay FMA on the fp32 products. Accuracy: the bf16 operands carry a
// relative error of 2^-9 each (the twin test measures what it does to y and
// the state: docs/gpu.md). fp32 math keeps wkv7_chunk_forward_kernel.
#define WKV_MMA 16            // the wmma tile: 16 x 16 x 16
#define WKV_MMA_S0_LD 72      // bf16 S0 rows: ldm a multiple of 8, 16-row blocks 32-byte aligned
#define WKV_MMA_ST_LD 68      // fp32 state rows: ldm a multiple of 4, 16-row blocks 32-byte aligned
enum { CHM_AT = 0, CHM_RT, CHM_BH, CHM_KH, CHM_V, CHM_SA, CHM_COUNT };
static_assert(WKV_L == WKV_MMA && WKV_THREADS / 32 * WKV_MMA == WKV_N,
              "one wmma tile a chunk, one warp per 16 state rows");
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, WKV_MMA, WKV_MMA, WKV_MMA, float>
    wkv_acc_frag;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, WKV_MMA, WKV_MMA, WKV_MMA, __nv_bfloat16,
                               nvcuda::wmma::row_major>
    wkv_a_row_frag;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, WKV_MMA, WKV_MMA, WKV_MMA, __nv_bfloat16,
                               nvcuda::wmma::col_major>
    wkv_a_col_frag;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, WKV_MMA, WKV_MMA, WKV_MMA, __nv_bfloat16,
                               nvcuda::wmma::row_major>
    wkv_b_row_frag;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, WKV_MMA, WKV_MMA, WKV_MMA, __nv_bfloat16,
                               nvcuda::wmma::col_major>
    wkv_b_col_frag;

// The chunk's vectors as bf16 operands [L][64]: thread j < 64 walks channel
// j down the chunk (the cumulative decay is sequential in u; a warp's loads
// are 32 consecutive channels) and writes at, rt, bh, kh and g_L; threads
// 64.. load v (fp32 for the substitution, bf16 for the state update).
template <typename TI, typename TK = TI>
__device__ __forceinline__ void wkv_mma_stage(__nv_bfloat16 *vh, float *vf, float *gl,
                                              const TI *r, const TK *w_raw, const TI *k,
                                              const TI *v, const TK *kk, const TK *a,
                                              size_t head, int C, int t0, int n) {
    if (threadIdx.x < WKV_N) {
        const int j = threadIdx.x;
        float g = 1.0f;
        for (int u = 0; u < WKV_L; u++) {
            wkv_chunk_token q{0.0f, 1.0f, 0.0f, 0.0f, 0.0f};
            if (u < n) q = wkv_chunk_token_in(r, w_raw, k, kk, a, head + (size_t)(t0 + u) * C + j);
            const int f = u * WKV_N + j;
            vh[CHM_AT * WKV_L * WKV_N + f] = __float2bfloat16_rn(__fmul_rn(q.a, g));
            g = __fmul_rn(g, q.d);
            vh[CHM_RT * WKV_L * WKV_N + f] = __float2bfloat16_rn(__fmul_rn(q.r, g));
            vh[CHM_BH * WKV_L * WKV_N + f] = __float2bfloat16_rn(__fdiv_rn(q.b, g));
            vh[CHM_KH * WKV_L * WKV_N + f] = __float2bfloat16_rn(__fdiv_rn(q.k, g));
        }
        gl[j] = g;
    } else {
        const int j = threadIdx.x - WKV_N;
        for (int u = 0; u < WKV_L; u++) {
            const int f = u * WKV_N + j;
            const float vv = u < n ? wkv_in(v, head + (size_t)(t0 + u) * C + j) : 0.0f;
            vf[f] = vv;
            vh[CHM_V * WKV_L * WKV_N + f] = __float2bfloat16_rn(vv);
        }
    }
}

// Warp w: the L x L product w into mm + w L^2 ([s][t] = x_s . z_t; x = bh
// or kh, z = at or rt), and rows 16w.. of S0 at^T and S0 rt^T into z2
// ([2][64][L]). Entries the substitution does not read (s >= t, s > t) are
// computed and ignored.
__device__ __forceinline__ void wkv_mma_products(float *mm, float *z2, const __nv_bfloat16 *vh,
                                                 const __nv_bfloat16 *s0h, int w) {
    namespace wmma = nvcuda::wmma;
    const __nv_bfloat16 *At = vh + CHM_AT * WKV_L * WKV_N, *Rt = vh + CHM_RT * WKV_L * WKV_N;
    const __nv_bfloat16 *X = vh + ((w & 1) ? CHM_KH : CHM_BH) * WKV_L * WKV_N;
    const __nv_bfloat16 *Z = w < 2 ? At : Rt;
    wkv_acc_frag uu, za, zr;
    wmma::fill_fragment(uu, 0.0f);
    wmma::fill_fragment(za, 0.0f);
    wmma::fill_fragment(zr, 0.0f);
#pragma unroll
    for (int kq = 0; kq < WKV_N / WKV_MMA; kq++) {
        wkv_a_row_frag x, s0;
        wkv_b_col_frag z, at, rt;
        wmma::load_matrix_sync(x, X + WKV_MMA * kq, WKV_N);
        wmma::load_matrix_sync(z, Z + WKV_MMA * kq, WKV_N);
        wmma::mma_sync(uu, x, z, uu);
        wmma::load_matrix_sync(s0, s0h + WKV_MMA * w * WKV_MMA_S0_LD + WKV_MMA * kq, WKV_MMA_S0_LD);
        wmma::load_matrix_sync(at, At + WKV_MMA * kq, WKV_N);
        wmma::load_matrix_sync(rt, Rt + WKV_MMA * kq, WKV_N);
        wmma::mma_sync(za, s0, at, za);
        wmma::mma_sync(zr, s0, rt, zr);
    }
    wmma::store_matrix_sync(mm + w * WKV_LL, uu, WKV_L, wmma::mem_row_major);
    wmma::store_matrix_sync(z2 + WKV_MMA * w * WKV_L, za, WKV_L, wmma::mem_row_major);
    wmma::store_matrix_sync(z2 + WKV_N * WKV_L + WKV_MMA * w * WKV_L, zr, WKV_L,
                            wmma::mem_row_major);
}

// Warp w: rows 16w.. of the state tile (S0, fp32, stride WKV_MMA_ST_LD) +=
// sa^T bh + v^T kh.
__device__ __forceinline__ void wkv_mma_state(float *tile, const __nv_bfloat16 *vh, int w) {
    namespace wmma = nvcuda::wmma;
    wkv_a_col_frag sa, vv;
    wmma::load_matrix_sync(sa, vh + CHM_SA * WKV_L * WKV_N + WKV_MMA * w, WKV_N);
    wmma::load_matrix_sync(vv, vh + CHM_V * WKV_L * WKV_N + WKV_MMA * w, WKV_N);
#pragma unroll
    for (int nb = 0; nb < WKV_N / WKV_MMA; nb++) {
        float *out = tile + WKV_MMA * w * WKV_MMA_ST_LD + WKV_MMA * nb;
        wkv_acc_frag acc;
        wkv_b_row_frag bh, kh;
        wmma::load_matrix_sync(acc, out, WKV_MMA_ST_LD, wmma::mem_row_major);
        wmma::load_matrix_sync(bh, vh + CHM_BH * WKV_L * WKV_N + WKV_MMA * nb, WKV_N);
        wmma::load_matrix_sync(kh, vh + CHM_KH * WKV_L * WKV_N + WKV_MMA * nb, WKV_N);
        wmma::mma_sync(acc, sa, bh, acc);
        wmma::mma_sync(acc, vv, kh, acc);
        wmma::store_matrix_sync(out, acc, WKV_MMA_ST_LD, wmma::mem_row_major);
    }
}

// Same arguments and results as wkv7_chunk_forward_kernel (to the bf16
// operands' rounding). 47 KB of static shared memory.
template <bool TRAIN, typename TI, typename TO, typename TK = TI>
__global__ void __launch_bounds__(WKV_THREADS, 4)
    wkv7_chunk_forward_mma_kernel(TO *y, const TI *r, const TK *w_raw, const TI *k, const TI *v,
                                  const TK *kk, const TK *a, float *state_base,
                                  size_t state_stride, float *checkpoints,
                                  const int32_t *seq_len, const int32_t *row_begin,
                                  const int32_t *slot, const int32_t *ckpt_block, int C) {
    // state staging (stride 65 for wkv_load_rows / wkv_store_rows, 68 for
    // the update's accumulators); between them S0 at^T and S0 rt^T
    __shared__ __align__(32) float tile[WKV_N * WKV_MMA_ST_LD];
    __shared__ __align__(32) __nv_bfloat16 s0h[WKV_N * WKV_MMA_S0_LD];    // S0, bf16
    __shared__ __align__(32) __nv_bfloat16 vh[CHM_COUNT * WKV_L * WKV_N];  // [6][L][64]
    __shared__ __align__(32) float mm[4 * WKV_LL];                         // Uab Uak Wrb Wrk
    __shared__ __align__(32) float vf[WKV_L * WKV_N];                      // v, fp32
    __shared__ __align__(16) float gl[WKV_N];                              // g_L
    const int s = blockIdx.x, h = blockIdx.y, H = gridDim.y;
    const int i = threadIdx.x >> 1, p = threadIdx.x & 1, w = threadIdx.x >> 5;
    const int len = seq_len[s];
    float *state = state_base + (size_t)slot[s] * state_stride + (size_t)h * WKV_NN;
    const size_t head = (size_t)row_begin[s] * C + (size_t)h * WKV_N;
    const float *Uab = mm, *Uak = mm + WKV_LL, *Wrb = mm + 2 * WKV_LL, *Wrk = mm + 3 * WKV_LL;
    const float *ZA = tile, *ZR = tile + WKV_N * WKV_L;

    float st[WKV_HALF];
    wkv_load_rows(st, tile, state, i, p);
    for (int t0 = 0; t0 < len; t0 += WKV_L) {
        const int n = min(WKV_L, len - t0);
        if (TRAIN) {
            const size_t block = (size_t)ckpt_block[s] + (size_t)(t0 / WKV_L);
            wkv_store_rows(checkpoints + (block * H + h) * WKV_NN, tile, st, i, p);
        }
#pragma unroll
        for (int jj = 0; jj < WKV_HALF; jj++)
            s0h[i * WKV_MMA_S0_LD + wkv_col(jj, p)] = __float2bfloat16_rn(st[jj]);
        wkv_mma_stage(vh, vf, gl, r, w_raw, k, v, kk, a, head, C, t0, n);
        __syncthreads();  // (TRAIN: the checkpoint's reads of the tile are done too)
        wkv_mma_products(mm, tile, vh, s0h, w);
        __syncthreads();
        // row i: sa (S0 at, then the substitution), y
        float sa[WKV_L];
#pragma unroll
        for (int t = 0; t < WKV_L; t++) {
            float x = ZA[i * WKV_L + t];
            for (int u = 0; u < t; u++) {
                x = __fmaf_rn(vf[u * WKV_N + i], Uak[u * WKV_L + t], x);
                x = __fmaf_rn(sa[u], Uab[u * WKV_L + t], x);
            }
            sa[t] = x;
            if (p == 0) vh[CHM_SA * WKV_L * WKV_N + t * WKV_N + i] = __float2bfloat16_rn(x);
        }
#pragma unroll
        for (int t = 0; t < WKV_L; t++) {
            float yt = ZR[i * WKV_L + t];
            for (int u = 0; u <= t; u++) {
                yt = __fmaf_rn(vf[u * WKV_N + i], Wrk[u * WKV_L + t], yt);
                yt = __fmaf_rn(sa[u], Wrb[u * WKV_L + t], yt);
            }
            if (t < n && (t & 1) == p) wkv_out(y, head + (size_t)(t0 + t) * C + i, yt);
        }
        __syncthreads();  // ZA, ZR read: the tile takes S0 for the update
#pragma unroll
        for (int jj = 0; jj < WKV_HALF; jj++) tile[i * WKV_MMA_ST_LD + wkv_col(jj, p)] = st[jj];
        __syncthreads();
        wkv_mma_state(tile, vh, w);
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < WKV_HALF; jj++) {
            const int j = wkv_col(jj, p);
            st[jj] = __fmul_rn(tile[i * WKV_MMA_ST_LD + j], gl[j]);
        }
        __syncthreads();  // the tile and the vectors are refilled next
    }
    wkv_store_rows(state, tile, st, i, p);
}

// Backward: advances st over tokens [from, to) of the sequence (no y), keeps
// sa_i(u) in sa_buf[u - from][i] and the state before token from + n *
// WKV_BACK_STEPS (n >= 1) in anchors[n - 1]. Same step code as the forward,
// so the states and sa are the forward's bits. Callers sync before and after.
template <typename TI, typename TK = TI>
__device__ __forceinline__ void wkv_recompute(float (&st)[WKV_HALF], const TK *w_raw,
                                              const TI *k, const TI *v, const TK *kk,
                                              const TK *a, size_t base, int C, int from,
                                              int to, float *sa_buf, float *anchors, float *vec,
                                              int i, int p) {
    wkv_fwd_in q = {0.0f, 0.0f, 0.0f, 0.0f};
    if (from < to) wkv_fwd_load(q, (const TI *)nullptr, w_raw, k, v, kk, a, base + (size_t)from * C, p);
    for (int u = from; u < to; u++) {
        float *V = vec + (u & 1) * VEC_COUNT * WKV_N;
        wkv_fwd_stage(q, V, i, p);
        const float v_i = q.v;
        if (u + 1 < to) wkv_fwd_load(q, (const TI *)nullptr, w_raw, k, v, kk, a, base + (size_t)(u + 1) * C, p);
        if (u > from && (u - from) % WKV_BACK_STEPS == 0)
            wkv_put_rows(anchors + ((u - from) / WKV_BACK_STEPS - 1) * WKV_TILE, st, i, p);
        __syncthreads();
        float sa, unused;
        wkv_forward_step<false>(st, V, v_i, p, sa, unused);
        if (p == 0) sa_buf[(u - from) * WKV_N + i] = sa;
    }
}

// One token's inputs for the backward step, channel i, split over the pair:
// p = 0: r, w_raw, k, v; p = 1: kk, iclr, dy.
struct wkv_bwd_in {
    float x0, x1, x2, x3;
};

template <typename TI, typename TK = TI, typename TY = TI>
__device__ __forceinline__ void wkv_bwd_load(wkv_bwd_in &q, const TY *dy, const TI *r,
                                             const TK *w_raw, const TI *k, const TI *v,
                                             const TK *kk, const TK *a, size_t o, int p) {
    if (p == 0) {
        q.x0 = wkv_in(r, o);
        q.x1 = wkv_in(w_raw, o);
        q.x2 = wkv_in(k, o);
        q.x3 = wkv_in(v, o);
    } else {
        q.x0 = wkv_in(kk, o);
        q.x1 = wkv_in(a, o);
        q.x2 = wkv_in(dy, o);
        q.x3 = 0.0f;
    }
}

__device__ __forceinline__ void wkv_bwd_stage(const wkv_bwd_in &q, float *V, int i, int p) {
    if (p == 0) {
        V[VEC_R * WKV_N + i] = q.x0;
        V[VEC_D * WKV_N + i] = rp_decayf(q.x1);
        V[VEC_K * WKV_N + i] = q.x2;
        V[VEC_V * WKV_N + i] = q.x3;
    } else {
        V[VEC_A * WKV_N + i] = -q.x0;
        V[VEC_B * WKV_N + i] = q.x0 * q.x1;
        V[VEC_DY * WKV_N + i] = q.x2;
    }
}

// dr, dk, dv [R,C] (accumulate != 0: +=, one rounding as add's; else
// overwrite), dw_raw, dkk, da [R,C] (overwrite), dstate slots [H,64,64] (in:
// d final state, out: d initial state), dy and the forward's inputs [R,C],
// checkpoints [blocks,H,64,64] from wkv7_forward_train.
// grid (n_seq, H), 128 threads, static shared memory (~41 KB).
//
// Per token t, with Sp / St the states before / after it and G = dS + dy r^T
// (dS: the gradient of St from later tokens and the final state):
//   dr_j = sum_i St[i,j] dy_i      dv_i = sum_j G[i,j] k_j
//   dk_j = sum_i G[i,j] v_i        dsa_i = sum_j G[i,j] b_j
//   db_j = sum_i G[i,j] sa_i       dd_j = sum_i G[i,j] Sp[i,j]
//   da_j (kernel a) = sum_i dsa_i Sp[i,j]
//   d(S before)[i,j] = G[i,j] d_j + dsa_i a_j
// then dkk = db iclr - da, diclr = db kk, dw_raw = dd d (-e^-0.5) sig (1 - sig).
// Row sums need rows of G, column sums columns: thread (i, p) keeps half of
// row i (Grow) and half of column i (Gcol) of G in registers. Both views are
// updated with the same explicitly rounded operations on the same operands,
// so they stay bit-identical copies of one matrix.
//
// The states: each chunk of RP_WKV_CHUNK tokens (last first) is run forward
// ONCE from its checkpoint, keeping only sa of its tokens (4 KB of shared
// memory), which gives the state after the chunk; the walk back then steps
// the state back a token at a time by inverting the update,
//   Sp[i,j] = (St[i,j] - (sa_i b_j + v_i k_j)) / d_j,
// as the official RWKV-7 training kernel does. The decay is bounded below
// (d >= e^-e^-0.5 = 0.545), so the division is well conditioned, and the walk
// restarts from an exact state (kept by the forward pass) every
// WKV_BACK_STEPS tokens. Thread (i, p) owns half of column i of the state
// (scol: in the shared tile the chunk's forward pass leaves it in, or in the
// anchor once the walk restarts from it; no other thread touches it, so it
// needs no barrier), so dr, dd and da are sums over its own elements. In
// registers it would take 32 more per thread: 160 with Grow and Gcol, 3
// blocks per SM instead of 4 (<= 128 registers). Cost:
// 1x forward recompute (the previous design kept states in shared memory
// tiles and recomputed each chunk 2.5x).
// bf16 gradients (TO, or dkk's TD): 3 blocks an SM, the 16-bit stores need a few
// registers more than 128 (ptxas spilled 20 bytes at 4).
template <typename TI, typename TO, typename TK = TI, typename TD = TO, typename TY = TI>
__global__ void __launch_bounds__(WKV_THREADS,
                                  sizeof(TO) == sizeof(float) && sizeof(TD) == sizeof(float) ? 4 : 3)
    wkv7_backward_kernel(TO *dr, TO *dw_raw, TO *dk, TO *dv, TD *dkk, TO *da,
                         float *dstate_base, size_t state_stride, const TY *dy,
                         const TI *r, const TK *w_raw, const TI *k, const TI *v,
                         const TK *kk, const TK *a, const float *checkpoints,
                         const int32_t *seq_len, const int32_t *row_begin, const int32_t *slot,
                         const int32_t *ckpt_block, int C, int accumulate,
                         __nv_bfloat16 *dr16, __nv_bfloat16 *dw16, __nv_bfloat16 *da16,
                         int store_dr) {
    __shared__ __align__(16) float tile[WKV_TILE];
    __shared__ __align__(16) float anchors[WKV_ANCHORS * WKV_TILE];
    __shared__ __align__(16) float vec[2 * VEC_COUNT * WKV_N];
    __shared__ __align__(16) float sa_buf[RP_WKV_CHUNK * WKV_N];
    __shared__ __align__(16) float dsa_buf[WKV_N];
    const int s = blockIdx.x, h = blockIdx.y, H = gridDim.y;
    const int i = threadIdx.x >> 1, p = threadIdx.x & 1;
    const int len = seq_len[s];
    const size_t HNN = (size_t)H * WKV_NN;
    const float *ckpt = checkpoints + (size_t)ckpt_block[s] * HNN + (size_t)h * WKV_NN;
    float *dS = dstate_base + (size_t)slot[s] * state_stride + (size_t)h * WKV_NN;
    const size_t base = (size_t)row_begin[s] * C + (size_t)h * WKV_N + i;
    const int n_chunks = (len + RP_WKV_CHUNK - 1) / RP_WKV_CHUNK;

    // G = d(final state), row i and column i
    float Grow[WKV_HALF], Gcol[WKV_HALF];
    wkv_tile_load(tile, dS);
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < WKV_HALF; jj++) {
        Grow[jj] = tile[wkv_tile(i, wkv_col(jj, p))];
        Gcol[jj] = tile[wkv_tile(wkv_col(jj, p), i)];
    }
    __syncthreads();

    for (int c = n_chunks - 1; c >= 0; c--) {
        const int t0 = c * RP_WKV_CHUNK;
        const int t1 = min(t0 + RP_WKV_CHUNK, len);
        {
            // the chunk forward from its checkpoint: sa -> sa_buf, the state
            // after the chunk -> the tile, read down column i as scol
            float st[WKV_HALF];
            wkv_load_rows(st, tile, ckpt + (size_t)c * HNN, i, p);
            wkv_recompute(st, w_raw, k, v, kk, a, base, C, t0, t1, sa_buf, anchors, vec, i, p);
            __syncthreads();
            wkv_put_rows(tile, st, i, p);
            __syncthreads();
        }
        // scol[wkv_col_offset(mm)] = element (wkv_col(mm, p), i) of the tile
        float *scol = tile + wkv_tile(16 * p, i);

        wkv_bwd_in q = {0.0f, 0.0f, 0.0f, 0.0f};
        wkv_bwd_load(q, dy, r, w_raw, k, v, kk, a, base + (size_t)(t1 - 1) * C, p);
        for (int u = t1 - 1; u >= t0; u--) {
            const size_t o = base + (size_t)u * C;
            float *V = vec + (u & 1) * VEC_COUNT * WKV_N;
            wkv_bwd_stage(q, V, i, p);
            const float own0 = q.x0, own1 = q.x1;  // p 0: r, w_raw; p 1: kk, iclr
            __syncthreads();
            const float *R = V + VEC_R * WKV_N, *D = V + VEC_D * WKV_N, *K = V + VEC_K * WKV_N,
                        *A = V + VEC_A * WKV_N, *B = V + VEC_B * WKV_N, *VV = V + VEC_V * WKV_N,
                        *DY = V + VEC_DY * WKV_N;
            const float *SA = sa_buf + (u - t0) * WKV_N;
            const float r_i = R[i], d_i = D[i], a_i = A[i], dy_i = DY[i];
            const float k_i = K[i], b_i = B[i];

            // G = dS + dy r^T; then dv_i, dsa_i along row i, dk_i, db_i down
            // column i; dr_i down column i of St. Two passes (the row view,
            // then the column view: independent sums, the same bits as one
            // loop) so that fewer accumulators and vectors are live at once
            // beside the 64 registers of Grow and Gcol.
            float v0 = 0.0f, v1 = 0.0f, v2 = 0.0f, v3 = 0.0f;  // dv
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;  // dsa
#pragma unroll
            for (int jq = 0; jq < WKV_HALF / 4; jq++) {
                const int j = wkv_col(4 * jq, p);  // column of Grow
                const float4 r4 = wkv_ld4(R + j), k4 = wkv_ld4(K + j), b4 = wkv_ld4(B + j);
                float *gr = Grow + 4 * jq;
                gr[0] = __fmaf_rn(dy_i, r4.x, gr[0]);
                gr[1] = __fmaf_rn(dy_i, r4.y, gr[1]);
                gr[2] = __fmaf_rn(dy_i, r4.z, gr[2]);
                gr[3] = __fmaf_rn(dy_i, r4.w, gr[3]);
                v0 = __fmaf_rn(gr[0], k4.x, v0);
                v1 = __fmaf_rn(gr[1], k4.y, v1);
                v2 = __fmaf_rn(gr[2], k4.z, v2);
                v3 = __fmaf_rn(gr[3], k4.w, v3);
                s0 = __fmaf_rn(gr[0], b4.x, s0);
                s1 = __fmaf_rn(gr[1], b4.y, s1);
                s2 = __fmaf_rn(gr[2], b4.z, s2);
                s3 = __fmaf_rn(gr[3], b4.w, s3);
            }
            const float dv_i = wkv_pair_total(v0, v1, v2, v3);
            const float dsa_i = wkv_pair_total(s0, s1, s2, s3);
            if (p == 0) dsa_buf[i] = dsa_i;
            float k0 = 0.0f, k1 = 0.0f, k2 = 0.0f, k3 = 0.0f;  // dk
            float b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;  // db
            float e0 = 0.0f, e1 = 0.0f, e2 = 0.0f, e3 = 0.0f;  // dr
#pragma unroll
            for (int jq = 0; jq < WKV_HALF / 4; jq++) {
                const int j = wkv_col(4 * jq, p);  // row of Gcol
                const float4 dy4 = wkv_ld4(DY + j), vv4 = wkv_ld4(VV + j), sa4 = wkv_ld4(SA + j);
                float *gc = Gcol + 4 * jq;
                const float *sc = scol;
                e0 = __fmaf_rn(sc[wkv_col_offset(4 * jq + 0)], dy4.x, e0);
                e1 = __fmaf_rn(sc[wkv_col_offset(4 * jq + 1)], dy4.y, e1);
                e2 = __fmaf_rn(sc[wkv_col_offset(4 * jq + 2)], dy4.z, e2);
                e3 = __fmaf_rn(sc[wkv_col_offset(4 * jq + 3)], dy4.w, e3);
                gc[0] = __fmaf_rn(dy4.x, r_i, gc[0]);
                gc[1] = __fmaf_rn(dy4.y, r_i, gc[1]);
                gc[2] = __fmaf_rn(dy4.z, r_i, gc[2]);
                gc[3] = __fmaf_rn(dy4.w, r_i, gc[3]);
                k0 = __fmaf_rn(gc[0], vv4.x, k0);
                k1 = __fmaf_rn(gc[1], vv4.y, k1);
                k2 = __fmaf_rn(gc[2], vv4.z, k2);
                k3 = __fmaf_rn(gc[3], vv4.w, k3);
                b0 = __fmaf_rn(gc[0], sa4.x, b0);
                b1 = __fmaf_rn(gc[1], sa4.y, b1);
                b2 = __fmaf_rn(gc[2], sa4.z, b2);
                b3 = __fmaf_rn(gc[3], sa4.w, b3);
            }
            const float dk_i = wkv_pair_total(k0, k1, k2, k3);
            const float db_i = wkv_pair_total(b0, b1, b2, b3);
            const float dr_i = wkv_pair_total(e0, e1, e2, e3);
            // what is final now goes out now (fewer live registers below):
            // p 0 keeps w_raw for dw_raw, p 1 db iclr for dkk
            float keep;
            if (p == 0) {
                wkv_out(dv, o, accumulate ? wkv_in(dv, o) + dv_i : dv_i);
                wkv_out(dk, o, accumulate ? wkv_in(dk, o) + dk_i : dk_i);
                keep = own1;
            } else {
                const float dr_o = accumulate ? wkv_in(dr, o) + dr_i : dr_i;
                if (store_dr) wkv_out(dr, o, dr_o);
                if (dr16) dr16[o] = __float2bfloat16(dr_o);
                if (da16)
                    da16[o] = __float2bfloat16(db_i * own0);
                else
                    wkv_out(da, o, db_i * own0);
                keep = db_i * own1;
            }
            __syncthreads();

            // step column i back to Sp (or take it from an anchor), then dd_i
            // and da_i down it
            const int back = u - t0;
            const bool anchored = back > 0 && back % WKV_BACK_STEPS == 0;
            if (anchored)  // the walk goes on in the anchor (each is used once)
                scol = anchors + (back / WKV_BACK_STEPS - 1) * WKV_TILE + wkv_tile(16 * p, i);
            const float inv_d = __fdiv_rn(1.0f, d_i);
            float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;  // dd
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;  // da (kernel a)
#pragma unroll
            for (int mq = 0; mq < WKV_HALF / 4; mq++) {
                const int m = wkv_col(4 * mq, p);
                const float4 dsa4 = wkv_ld4(dsa_buf + m), sa4 = wkv_ld4(SA + m),
                             vv4 = wkv_ld4(VV + m);
                const float *gc = Gcol + 4 * mq;
                float sc[4];
#pragma unroll
                for (int e = 0; e < 4; e++) sc[e] = scol[wkv_col_offset(4 * mq + e)];
                if (!anchored) {
                    sc[0] = __fmul_rn(__fsub_rn(sc[0], __fmaf_rn(sa4.x, b_i, __fmul_rn(vv4.x, k_i))), inv_d);
                    sc[1] = __fmul_rn(__fsub_rn(sc[1], __fmaf_rn(sa4.y, b_i, __fmul_rn(vv4.y, k_i))), inv_d);
                    sc[2] = __fmul_rn(__fsub_rn(sc[2], __fmaf_rn(sa4.z, b_i, __fmul_rn(vv4.z, k_i))), inv_d);
                    sc[3] = __fmul_rn(__fsub_rn(sc[3], __fmaf_rn(sa4.w, b_i, __fmul_rn(vv4.w, k_i))), inv_d);
#pragma unroll
                    for (int e = 0; e < 4; e++) scol[wkv_col_offset(4 * mq + e)] = sc[e];
                }
                d0 = __fmaf_rn(gc[0], sc[0], d0);
                d1 = __fmaf_rn(gc[1], sc[1], d1);
                d2 = __fmaf_rn(gc[2], sc[2], d2);
                d3 = __fmaf_rn(gc[3], sc[3], d3);
                a0 = __fmaf_rn(dsa4.x, sc[0], a0);
                a1 = __fmaf_rn(dsa4.y, sc[1], a1);
                a2 = __fmaf_rn(dsa4.z, sc[2], a2);
                a3 = __fmaf_rn(dsa4.w, sc[3], a3);
            }
            const float dd_i = wkv_pair_total(d0, d1, d2, d3);
            const float da_i = wkv_pair_total(a0, a1, a2, a3);
            // the previous token's loads go out now, not before the passes
            // above: their registers would not fit beside the sums there
            if (u > t0) wkv_bwd_load(q, dy, r, w_raw, k, v, kk, a, o - (size_t)C, p);

            // d(S before) = G diag(d) + dsa a^T, in both views
#pragma unroll
            for (int jq = 0; jq < WKV_HALF / 4; jq++) {
                const int j = wkv_col(4 * jq, p);
                const float4 d4 = wkv_ld4(D + j), a4 = wkv_ld4(A + j), dsa4 = wkv_ld4(dsa_buf + j);
                float *gr = Grow + 4 * jq, *gc = Gcol + 4 * jq;
                gr[0] = __fmaf_rn(gr[0], d4.x, __fmul_rn(dsa_i, a4.x));
                gr[1] = __fmaf_rn(gr[1], d4.y, __fmul_rn(dsa_i, a4.y));
                gr[2] = __fmaf_rn(gr[2], d4.z, __fmul_rn(dsa_i, a4.z));
                gr[3] = __fmaf_rn(gr[3], d4.w, __fmul_rn(dsa_i, a4.w));
                gc[0] = __fmaf_rn(gc[0], d_i, __fmul_rn(dsa4.x, a_i));
                gc[1] = __fmaf_rn(gc[1], d_i, __fmul_rn(dsa4.y, a_i));
                gc[2] = __fmaf_rn(gc[2], d_i, __fmul_rn(dsa4.z, a_i));
                gc[3] = __fmaf_rn(gc[3], d_i, __fmul_rn(dsa4.w, a_i));
            }

            if (p == 0) {
                const float sig = rp_sigmoidf(keep);
                const float dw_o = dd_i * d_i * (-WKV_SCALE) * sig * (1.0f - sig);
                if (dw16)
                    dw16[o] = __float2bfloat16(dw_o);
                else
                    wkv_out(dw_raw, o, dw_o);
            } else {
                wkv_out(dkk, o, keep - da_i);
            }
        }
        __syncthreads();  // the tile and sa_buf are refilled next
    }

    // d(initial state) = G, rows back to the slot
    wkv_store_rows(dS, tile, Grow, i, p);
}

// ---- chunked backward on tensor cores (BF16 math) ----
//
// The chunk form of the forward above, differentiated (fla's rwkv7 chunked
// backward, checked in fp64 against the per-token backward: docs/gpu.md
// "Chunked backward"). Per chunk, last first, from its checkpoint S0 and the
// gradient dSL of the state after it, with the [64,L] views (value rows i or
// key rows j, token columns) SA, V, dY, At, Rt, Bh, Kh of the forward's
// notation and dSLg = dSL diag(g_L):
//   SA  = (S0 At + V Uak) (I - Uab)^-1          (recomputed: substitution)
//   dSA = dY Wrb^T + dSLg Bh,   dP = dSA (I - Uab)^-T (back substitution)
//   dV  = dY Wrk^T + dSLg Kh + dP Uak^T
//   dS0 = dSLg + dY Rt^T + dP At^T              (carried to the chunk before)
//   dUab = SA^T dP, dUak = V^T dP (s < t), dWrb = SA^T dY, dWrk = V^T dY (s <= t)
//   dRt = S0^T dY + Bh dWrb + Kh dWrk,   dAt = S0^T dP + Bh dUab + Kh dUak
//   dBh = At dUab^T + Rt dWrb^T + dSLg^T SA,   dKh = At dUak^T + Rt dWrk^T + dSLg^T V
// then per channel j and token u (fp32, CUDA cores): dr = dRt g_u, kernel
// da = dAt g_{u-1}, db = dBh / g_u, dk = dKh / g_u and the decay's
// gradient through the cumulative decays, dd_u = (sum_{t>=u} dg_t g_t) / d_u with
// dg_t g_t = dRt rt - dBh bh - dKh kh + dAt_{t+1} at_{t+1} (+ for t = L-1:
// sum_i dSLg[i,j] S_L[i,j] / g_L = sum_i dSLg S0 + sum_s bh dSLg^T SA + kh dSLg^T V).
// The tile products run on bf16 wmma (16x16x16, fp32 accumulate; operands
// rounded once); the substitutions, dP Uak^T and the chain stay fp32 FMA;
// dS is carried from chunk to chunk in fp32 (the accumulator of dS0). No
// float atomics: every sum has one owner and a fixed order. 2 blocks an SM
// (95 KB of dynamic shared memory). fp32 math keeps wkv7_backward_kernel.
enum { CHB_DY = CHM_COUNT, CHB_DP, CHB_COUNT };
// Shared memory, in floats (each offset a multiple of 8: wmma's 32 bytes).
enum {
    WKB_DSF = 0,                                   // dS, fp32 [64][68]
    WKB_S0H = WKB_DSF + WKV_N * WKV_MMA_ST_LD,     // S0, bf16 [64][72]
    WKB_DSH = WKB_S0H + WKV_N * WKV_MMA_S0_LD / 2, // dSLg, bf16 [64][72]
    WKB_VH = WKB_DSH + WKV_N * WKV_MMA_S0_LD / 2,  // [CHB_COUNT][L][64] bf16
    WKB_VF = WKB_VH + CHB_COUNT * WKV_L * WKV_N / 2,  // v, fp32 [L][64]
    WKB_GL = WKB_VF + WKV_L * WKV_N,               // g_L [64]
    WKB_U = WKB_GL + WKV_N,                        // Uab Uak Wrb Wrk, fp32 [4][L][L]
    WKB_UB = WKB_U + 4 * WKV_LL,                   // the same, masked, bf16
    WKB_DU = WKB_UB + 2 * WKV_LL,                  // dUab dUak dWrb dWrk, fp32
    WKB_DUB = WKB_DU + 4 * WKV_LL,                 // the same, masked, bf16
    WKB_ZA = WKB_DUB + 2 * WKV_LL,                 // S0 At, then dBh's rest [64][L]
    WKB_DSA = WKB_ZA + WKV_N * WKV_L,              // dSA, then dKh's rest [64][L]
    WKB_DV = WKB_DSA + WKV_N * WKV_L,              // dY Wrk^T + dSLg Kh [64][L]
    WKB_RT = WKB_DV + WKV_N * WKV_L,               // dRt [64 key][L]
    WKB_AT = WKB_RT + WKV_N * WKV_L,               // dAt
    WKB_M1 = WKB_AT + WKV_N * WKV_L,               // dSLg^T SA
    WKB_M2 = WKB_M1 + WKV_N * WKV_L,               // dSLg^T V
    WKB_FLOATS = WKB_M2 + WKV_N * WKV_L
};
// + 32: the kernel rounds the dynamic shared memory's base up to 32 bytes
// (the emulator's buffer is only 16-byte aligned)
#define WKB_BYTES (WKB_FLOATS * sizeof(float) + 32)

// Warp w: product X^T Y of two [L][64] arrays over the 64 channels into
// out ([L][L], row major), then its bf16 copy with the entries the chunk
// form does not use (s >= t when strict, else s > t) zeroed.
__device__ __forceinline__ void wkv_mmb_ll(float *out, __nv_bfloat16 *outb,
                                           const __nv_bfloat16 *X, const __nv_bfloat16 *Y,
                                           bool strict) {
    namespace wmma = nvcuda::wmma;
    wkv_acc_frag acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kq = 0; kq < WKV_N / WKV_MMA; kq++) {
        wkv_a_row_frag x;
        wkv_b_col_frag y;
        wmma::load_matrix_sync(x, X + WKV_MMA * kq, WKV_N);
        wmma::load_matrix_sync(y, Y + WKV_MMA * kq, WKV_N);
        wmma::mma_sync(acc, x, y, acc);
    }
    wmma::store_matrix_sync(out, acc, WKV_L, wmma::mem_row_major);
    __syncwarp();
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < WKV_LL / 32; m++) {
        const int e = lane + 32 * m, s = e / WKV_L, t = e % WKV_L;
        outb[e] = __float2bfloat16_rn((strict ? s < t : s <= t) ? out[e] : 0.0f);
    }
}

// Warp w: rows 16w.. of M^T Y into out ([64][L], ld L): M a [64][72] bf16
// tile (S0 or dSLg, rows i), Y an [L][64] array (rows i as columns).
__device__ __forceinline__ void wkv_mmb_tn(float *out, const __nv_bfloat16 *M,
                                           const __nv_bfloat16 *Y, int w) {
    namespace wmma = nvcuda::wmma;
    wkv_acc_frag acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kq = 0; kq < WKV_N / WKV_MMA; kq++) {
        wkv_a_col_frag m;
        wkv_b_col_frag y;
        wmma::load_matrix_sync(m, M + WKV_MMA * w + WKV_MMA * kq * WKV_MMA_S0_LD, WKV_MMA_S0_LD);
        wmma::load_matrix_sync(y, Y + WKV_MMA * kq, WKV_N);
        wmma::mma_sync(acc, m, y, acc);
    }
    wmma::store_matrix_sync(out + WKV_MMA * w * WKV_L, acc, WKV_L, wmma::mem_row_major);
}

// Warp w: rows 16w.. of dY W^T + dSLg X into out ([64][L]): W an [L][L]
// masked bf16 product (Wrb or Wrk), X = Bh or Kh.
__device__ __forceinline__ void wkv_mmb_dsa(float *out, const __nv_bfloat16 *DY,
                                            const __nv_bfloat16 *Wb, const __nv_bfloat16 *dsh,
                                            const __nv_bfloat16 *X, int w) {
    namespace wmma = nvcuda::wmma;
    wkv_acc_frag acc;
    wmma::fill_fragment(acc, 0.0f);
    wkv_a_col_frag dyf;
    wkv_b_col_frag wt;
    wmma::load_matrix_sync(dyf, DY + WKV_MMA * w, WKV_N);
    wmma::load_matrix_sync(wt, Wb, WKV_L);
    wmma::mma_sync(acc, dyf, wt, acc);
#pragma unroll
    for (int kq = 0; kq < WKV_N / WKV_MMA; kq++) {
        wkv_a_row_frag d;
        wkv_b_col_frag x;
        wmma::load_matrix_sync(d, dsh + WKV_MMA * w * WKV_MMA_S0_LD + WKV_MMA * kq, WKV_MMA_S0_LD);
        wmma::load_matrix_sync(x, X + WKV_MMA * kq, WKV_N);
        wmma::mma_sync(acc, d, x, acc);
    }
    wmma::store_matrix_sync(out + WKV_MMA * w * WKV_L, acc, WKV_L, wmma::mem_row_major);
}

// Warp w: rows 16w.. (key channels) of out (+)= X1 Y1 + X2 Y2 ([64][L]):
// X1, X2 [L][64] arrays as [64 key][L], Y1, Y2 masked [L][L] bf16 products,
// transposed when TRANS; out starts from its stored value when ACC.
template <bool ACC, bool TRANS>
__device__ __forceinline__ void wkv_mmb_kl(float *out, const __nv_bfloat16 *X1,
                                           const __nv_bfloat16 *Y1, const __nv_bfloat16 *X2,
                                           const __nv_bfloat16 *Y2, int w) {
    namespace wmma = nvcuda::wmma;
    typedef typename std::conditional<TRANS, wkv_b_col_frag, wkv_b_row_frag>::type yfrag;
    float *o = out + WKV_MMA * w * WKV_L;
    wkv_acc_frag acc;
    if (ACC) wmma::load_matrix_sync(acc, o, WKV_L, wmma::mem_row_major);
    else wmma::fill_fragment(acc, 0.0f);
    wkv_a_col_frag x;
    yfrag y;
    wmma::load_matrix_sync(x, X1 + WKV_MMA * w, WKV_N);
    wmma::load_matrix_sync(y, Y1, WKV_L);
    wmma::mma_sync(acc, x, y, acc);
    wmma::load_matrix_sync(x, X2 + WKV_MMA * w, WKV_N);
    wmma::load_matrix_sync(y, Y2, WKV_L);
    wmma::mma_sync(acc, x, y, acc);
    wmma::store_matrix_sync(o, acc, WKV_L, wmma::mem_row_major);
}

// Same arguments and results as wkv7_backward_kernel (to the bf16 operands'
// rounding). grid (n_seq, H), 128 threads, WKB_BYTES of dynamic shared memory.
template <typename TI, typename TO, typename TK = TI, typename TD = TO, typename TY = TI>
__global__ void __launch_bounds__(WKV_THREADS, 2)
    wkv7_chunk_backward_mma_kernel(TO *dr, TO *dw_raw, TO *dk, TO *dv, TD *dkk, TO *da,
                                   float *dstate_base, size_t state_stride, const TY *dy,
                                   const TI *r, const TK *w_raw, const TI *k, const TI *v,
                                   const TK *kk, const TK *a, const float *checkpoints,
                                   const int32_t *seq_len, const int32_t *row_begin,
                                   const int32_t *slot, const int32_t *ckpt_block, int C,
                                   int accumulate, __nv_bfloat16 *dr16,
                                   __nv_bfloat16 *dw16, __nv_bfloat16 *da16, int store_dr) {
    namespace wmma = nvcuda::wmma;
    extern __shared__ __align__(32) float wkv_smem_raw[];
    // an offset from the shared array (not a cast-back integer) keeps the
    // accesses in the shared state space; 0 on a GPU
    const unsigned misalign = (unsigned)(reinterpret_cast<uintptr_t>(wkv_smem_raw) & 31u);
    float *wkv_smem = wkv_smem_raw + ((32u - misalign) & 31u) / sizeof(float);
    float *dsf = wkv_smem + WKB_DSF, *vf = wkv_smem + WKB_VF, *gl = wkv_smem + WKB_GL;
    float *U = wkv_smem + WKB_U, *dU = wkv_smem + WKB_DU;
    float *ZA = wkv_smem + WKB_ZA, *dSA = wkv_smem + WKB_DSA, *dVp = wkv_smem + WKB_DV;
    float *dRt = wkv_smem + WKB_RT, *dAt = wkv_smem + WKB_AT, *M1 = wkv_smem + WKB_M1,
          *M2 = wkv_smem + WKB_M2;
    float *dBr = ZA, *dKr = dSA;  // free again once the substitutions ran
    __nv_bfloat16 *s0h = reinterpret_cast<__nv_bfloat16 *>(wkv_smem + WKB_S0H);
    __nv_bfloat16 *dsh = reinterpret_cast<__nv_bfloat16 *>(wkv_smem + WKB_DSH);
    __nv_bfloat16 *vh = reinterpret_cast<__nv_bfloat16 *>(wkv_smem + WKB_VH);
    __nv_bfloat16 *Ub = reinterpret_cast<__nv_bfloat16 *>(wkv_smem + WKB_UB);
    __nv_bfloat16 *dUb = reinterpret_cast<__nv_bfloat16 *>(wkv_smem + WKB_DUB);
    __nv_bfloat16 *ATh = vh + CHM_AT * WKV_L * WKV_N, *RTh = vh + CHM_RT * WKV_L * WKV_N,
                  *BHh = vh + CHM_BH * WKV_L * WKV_N, *KHh = vh + CHM_KH * WKV_L * WKV_N,
                  *Vh = vh + CHM_V * WKV_L * WKV_N, *SAh = vh + CHM_SA * WKV_L * WKV_N,
                  *DYh = vh + CHB_DY * WKV_L * WKV_N, *DPh = vh + CHB_DP * WKV_L * WKV_N;
    const float *Uab = U, *Uak = U + WKV_LL;
    const int s = blockIdx.x, h = blockIdx.y, H = gridDim.y;
    const int i = threadIdx.x >> 1, p = threadIdx.x & 1, w = threadIdx.x >> 5;
    const int len = seq_len[s];
    const size_t HNN = (size_t)H * WKV_NN;
    const float *ckpt = checkpoints + (size_t)ckpt_block[s] * HNN + (size_t)h * WKV_NN;
    float *dS = dstate_base + (size_t)slot[s] * state_stride + (size_t)h * WKV_NN;
    const size_t head = (size_t)row_begin[s] * C + (size_t)h * WKV_N;
    const int n_chunks = (len + WKV_L - 1) / WKV_L;

    for (int f = threadIdx.x; f < WKV_NN; f += WKV_THREADS)
        dsf[(f >> 6) * WKV_MMA_ST_LD + (f & 63)] = dS[f];
    for (int c = n_chunks - 1; c >= 0; c--) {
        const int t0 = c * WKV_L, n = min(WKV_L, len - t0);
        const float *S0 = ckpt + (size_t)c * HNN;
        // the chunk's operands (the forward's staging, plus dy) and S0
        wkv_mma_stage(vh, vf, gl, r, w_raw, k, v, kk, a, head, C, t0, n);
        if (threadIdx.x >= WKV_N) {
            const int j = threadIdx.x - WKV_N;
            for (int u = 0; u < WKV_L; u++)
                DYh[u * WKV_N + j] = __float2bfloat16_rn(
                    u < n ? wkv_in(dy, head + (size_t)(t0 + u) * C + j) : 0.0f);
        }
        for (int f = threadIdx.x; f < WKV_NN; f += WKV_THREADS)
            s0h[(f >> 6) * WKV_MMA_S0_LD + (f & 63)] = __float2bfloat16_rn(S0[f]);
        __syncthreads();
        // Uab Uak Wrb Wrk (warp w: product w) and S0 At; dSLg = dSL g_L
        wkv_mmb_ll(U + w * WKV_LL, Ub + w * WKV_LL, (w & 1) ? KHh : BHh, w < 2 ? ATh : RTh, w < 2);
        {
            wkv_acc_frag za;
            wmma::fill_fragment(za, 0.0f);
#pragma unroll
            for (int kq = 0; kq < WKV_N / WKV_MMA; kq++) {
                wkv_a_row_frag s0;
                wkv_b_col_frag at;
                wmma::load_matrix_sync(s0, s0h + WKV_MMA * w * WKV_MMA_S0_LD + WKV_MMA * kq,
                                       WKV_MMA_S0_LD);
                wmma::load_matrix_sync(at, ATh + WKV_MMA * kq, WKV_N);
                wmma::mma_sync(za, s0, at, za);
            }
            wmma::store_matrix_sync(ZA + WKV_MMA * w * WKV_L, za, WKV_L, wmma::mem_row_major);
        }
        for (int f = threadIdx.x; f < WKV_NN; f += WKV_THREADS) {
            const int o = (f >> 6) * WKV_MMA_ST_LD + (f & 63);
            const float x = __fmul_rn(dsf[o], gl[f & 63]);
            dsf[o] = x;
            dsh[(f >> 6) * WKV_MMA_S0_LD + (f & 63)] = __float2bfloat16_rn(x);
        }
        __syncthreads();
        // row i (warp w holds rows 16w..): SA by forward substitution (the
        // forward's bits), dSA and dY Wrk^T + dSLg Kh, then dP by back
        // substitution and dv
        {
            float sa[WKV_L];
#pragma unroll
            for (int t = 0; t < WKV_L; t++) {
                float x = ZA[i * WKV_L + t];
#pragma unroll
                for (int u = 0; u < t; u++) {
                    x = __fmaf_rn(vf[u * WKV_N + i], Uak[u * WKV_L + t], x);
                    x = __fmaf_rn(sa[u], Uab[u * WKV_L + t], x);
                }
                sa[t] = x;
                if (p == 0) SAh[t * WKV_N + i] = __float2bfloat16_rn(x);
            }
        }
        wkv_mmb_dsa(dSA, DYh, Ub + 2 * WKV_LL, dsh, BHh, w);
        wkv_mmb_dsa(dVp, DYh, Ub + 3 * WKV_LL, dsh, KHh, w);
        // sum_i dSLg[i,j] S0[i,j] (channel j: the chain below)
        float e_s0 = 0.0f;
        if (threadIdx.x < WKV_N)
            for (int m = 0; m < WKV_N; m++)
                e_s0 = __fmaf_rn(dsf[m * WKV_MMA_ST_LD + threadIdx.x], S0[m * WKV_N + threadIdx.x],
                                 e_s0);
        __syncwarp();
        {
            float dp[WKV_L];
#pragma unroll
            for (int t = WKV_L - 1; t >= 0; t--) {
                float x = dSA[i * WKV_L + t];
#pragma unroll
                for (int u = t + 1; u < WKV_L; u++) x = __fmaf_rn(Uab[t * WKV_L + u], dp[u], x);
                dp[t] = x;
                if (p == 0) DPh[t * WKV_N + i] = __float2bfloat16_rn(x);
            }
#pragma unroll
            for (int t = 0; t < WKV_L; t++) {
                if ((t & 1) != p || t >= n) continue;
                float x = dVp[i * WKV_L + t];
#pragma unroll
                for (int u = t + 1; u < WKV_L; u++) x = __fmaf_rn(dp[u], Uak[t * WKV_L + u], x);
                const size_t o = head + (size_t)(t0 + t) * C + i;
                wkv_out(dv, o, accumulate ? wkv_in(dv, o) + x : x);
            }
        }
        __syncthreads();
        // dS0 = dSLg + dY Rt^T + dP At^T (rows 16w, in place); the L x L
        // gradients (warp w: one); S0^T dY, S0^T dP, dSLg^T SA, dSLg^T V
        {
            wkv_a_col_frag dyf, dpf;
            wmma::load_matrix_sync(dyf, DYh + WKV_MMA * w, WKV_N);
            wmma::load_matrix_sync(dpf, DPh + WKV_MMA * w, WKV_N);
#pragma unroll
            for (int nb = 0; nb < WKV_N / WKV_MMA; nb++) {
                float *o = dsf + WKV_MMA * w * WKV_MMA_ST_LD + WKV_MMA * nb;
                wkv_acc_frag acc;
                wkv_b_row_frag rt, at;
                wmma::load_matrix_sync(acc, o, WKV_MMA_ST_LD, wmma::mem_row_major);
                wmma::load_matrix_sync(rt, RTh + WKV_MMA * nb, WKV_N);
                wmma::load_matrix_sync(at, ATh + WKV_MMA * nb, WKV_N);
                wmma::mma_sync(acc, dyf, rt, acc);
                wmma::mma_sync(acc, dpf, at, acc);
                wmma::store_matrix_sync(o, acc, WKV_MMA_ST_LD, wmma::mem_row_major);
            }
        }
        wkv_mmb_ll(dU + w * WKV_LL, dUb + w * WKV_LL, (w & 1) ? Vh : SAh, w < 2 ? DPh : DYh, w < 2);
        wkv_mmb_tn(dRt, s0h, DYh, w);
        wkv_mmb_tn(dAt, s0h, DPh, w);
        wkv_mmb_tn(M1, dsh, SAh, w);
        wkv_mmb_tn(M2, dsh, Vh, w);
        __syncthreads();
        // dRt, dAt += the L x L terms; dBh, dKh's rest
        const __nv_bfloat16 *dUab = dUb, *dUak = dUb + WKV_LL, *dWrb = dUb + 2 * WKV_LL,
                            *dWrk = dUb + 3 * WKV_LL;
        wkv_mmb_kl<true, false>(dRt, BHh, dWrb, KHh, dWrk, w);
        wkv_mmb_kl<true, false>(dAt, BHh, dUab, KHh, dUak, w);
        wkv_mmb_kl<false, true>(dBr, ATh, dUab, RTh, dWrb, w);
        wkv_mmb_kl<false, true>(dKr, ATh, dUak, RTh, dWrk, w);
        __syncthreads();
        // channel j: the gradients of r, k, kernel a and b, and of the decay
        // through the cumulative decays (fp32, the staging's roundings)
        if (threadIdx.x < WKV_N) {
            const int j = threadIdx.x;
            float g[WKV_L];
            float e_last = e_s0;  // sum_i dSL[i,j] S_L[i,j]
            float gg = 1.0f;
#pragma unroll
            for (int u = 0; u < WKV_L; u++) {
                const size_t o = head + (size_t)(t0 + u) * C + j;
                wkv_chunk_token q{0.0f, 1.0f, 0.0f, 0.0f, 0.0f};
                if (u < n) q = wkv_chunk_token_in(r, w_raw, k, kk, a, o);
                gg = __fmul_rn(gg, q.d);
                g[u] = gg;
                e_last = __fmaf_rn(__fdiv_rn(q.b, gg), M1[j * WKV_L + u], e_last);
                e_last = __fmaf_rn(__fdiv_rn(q.k, gg), M2[j * WKV_L + u], e_last);
            }
            float scan = 0.0f, carry = 0.0f;  // carry: dAt_{u+1} a_{u+1}
#pragma unroll
            for (int u = WKV_L - 1; u >= 0; u--) {
                const size_t o = head + (size_t)(t0 + u) * C + j;
                wkv_chunk_token q{0.0f, 1.0f, 0.0f, 0.0f, 0.0f};
                float wr = 0.0f, kkv = 0.0f, iclr = 0.0f;
                if (u < n) {
                    q = wkv_chunk_token_in(r, w_raw, k, kk, a, o);
                    wr = wkv_in(w_raw, o);
                    kkv = wkv_in(kk, o);
                    iclr = wkv_in(a, o);
                }
                const float gu = g[u], gp = u > 0 ? g[u - 1] : 1.0f;
                const float drt = dRt[j * WKV_L + u], dat = dAt[j * WKV_L + u];
                const float dbh = dBr[j * WKV_L + u] + M1[j * WKV_L + u];
                const float dkh = dKr[j * WKV_L + u] + M2[j * WKV_L + u];
                const float bh = __fdiv_rn(q.b, gu), kh = __fdiv_rn(q.k, gu);
                float dgg = drt * (q.r * gu) - dbh * bh - dkh * kh + carry * gu;
                if (u == WKV_L - 1) dgg += e_last;
                scan += dgg;
                carry = dat * q.a;
                if (u >= n) continue;
                const float dd = scan / q.d;
                const float dr_ = drt * gu, da_k = dat * gp, db_k = dbh / gu, dk_ = dkh / gu;
                const float sig = rp_sigmoidf(wr);
                const float dr_o = accumulate ? wkv_in(dr, o) + dr_ : dr_;
                if (store_dr) wkv_out(dr, o, dr_o);
                if (dr16) dr16[o] = __float2bfloat16(dr_o);
                wkv_out(dk, o, accumulate ? wkv_in(dk, o) + dk_ : dk_);
                const float dw_o = dd * q.d * (-WKV_SCALE) * sig * (1.0f - sig);
                if (dw16)
                    dw16[o] = __float2bfloat16(dw_o);
                else
                    wkv_out(dw_raw, o, dw_o);
                wkv_out(dkk, o, db_k * iclr - da_k);
                if (da16)
                    da16[o] = __float2bfloat16(db_k * kkv);
                else
                    wkv_out(da, o, db_k * kkv);
            }
        }
        __syncthreads();  // the operands and products are refilled next
    }
    for (int f = threadIdx.x; f < WKV_NN; f += WKV_THREADS)
        dS[f] = dsf[(f >> 6) * WKV_MMA_ST_LD + (f & 63)];
}

// ---- ops ----

// Batches whose longest sequence has at least this many tokens run the
// chunked forward (decode and short calls keep the per-token kernel, whose
// chunk set-up would be wasted on them). A guess until a GPU times both
// (bench_gpu --only wkv7 prints each); tests set it (cuda_wkv7.h).
int rp_cuda_wkv7_chunked_min_t = 64;

// Empty batches return quietly; a head size other than 64 is an error (the
// kernels hold state rows of exactly 64 in registers).
static int wkv_launchable(rp_cuda_ctx *cx, const char *op, const rp_batch *batch, int C, int N) {
    if (batch->n_seq <= 0 || C <= 0) return 0;
    if (N != WKV_N || C % WKV_N != 0) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_SHAPE,
                         "%s: the CUDA WKV7 kernels need heads of %d channels (N = %d, C = %d)",
                         op, WKV_N, N, C);
        return 0;
    }
    return 1;
}

// The bf16 copies of the n-float activations ps[0..count) (BF16 math), all
// or none: the kernels read every input but kk in one type. A copy is a
// producer's (rp_cuda_act16) or the activation itself in place (kk:
// backend.h wkv_only).
static bool wkv_find16(rp_cuda_ctx *cx, const float *const *ps, const __nv_bfloat16 **out,
                       int count, size_t n) {
    if (cx->math != RP_CUDA_MATH_BF16) return false;
    for (int i = 0; i < count; i++) {
        if (!ps[i]) return false;
        out[i] = rp_cuda_act16_find(cx, ps[i], n);
        if (!out[i]) out[i] = rp_cuda_inplace_find(cx, ps[i], n);
        if (!out[i]) return false;
    }
    return true;
}

int rp_cuda_wkv7_rows_split = 0;

// The row split of the per-token forward for a grid of `heads` blocks (one
// per (sequence, head)) on n_sm SMs. The busiest SM runs ceil(heads S / n_sm)
// blocks of 1/S head each; the wave model (bench/gpu_model.c) charges it
// max(latency, issue) a token, and one head's issue (~208 cycles) is about
// half the latency (~400): below 2 heads on the busiest SM a split cannot
// help. From there the split with the least load on the busiest SM wins,
// ties keeping fewer blocks (each block loads the token's shared vectors).
static int wkv_rows_split(long heads, int n_sm) {
    if (rp_cuda_wkv7_rows_split > 0) return rp_cuda_wkv7_rows_split;
    if (n_sm <= 0) return 1;
    const long load1 = (heads + n_sm - 1) / n_sm;
    if (load1 < 2) return 1;
    int best = 1;
    double best_load = (double)load1;
    for (int split = 2; split <= 4; split *= 2) {
        const double load = (double)((heads * split + n_sm - 1) / n_sm) / split;
        if (load < best_load) {
            best = split;
            best_load = load;
        }
    }
    return best;
}

template <bool TRAIN, typename TI, typename TO, typename TK>
static void wkv_token_forward_launch(rp_cuda_ctx *cx, dim3 grid, TO *y, const TI *r,
                                     const TK *w_raw, const TI *k, const TI *v, const TK *kk,
                                     const TK *a, float *state_base, size_t state_stride,
                                     float *checkpoints, const rp_cuda_batch *b, int C) {
    const int split = wkv_rows_split((long)grid.x * grid.y, cx->n_sm);
    if (split == 2) {
        dim3 g2(grid.x, grid.y, 2);
        wkv7_forward_rows_kernel<TRAIN, 2, TI, TO, TK><<<g2, wkv_rows<2>::THREADS, 0, cx->stream>>>(
            y, r, w_raw, k, v, kk, a, state_base, state_stride, checkpoints, b->seq_len,
            b->row_begin, b->slot, b->ckpt_block, C);
    } else if (split == 4) {
        dim3 g4(grid.x, grid.y, 4);
        wkv7_forward_rows_kernel<TRAIN, 4, TI, TO, TK><<<g4, wkv_rows<4>::THREADS, 0, cx->stream>>>(
            y, r, w_raw, k, v, kk, a, state_base, state_stride, checkpoints, b->seq_len,
            b->row_begin, b->slot, b->ckpt_block, C);
    } else {
        wkv7_forward_kernel<TRAIN, TI, TO, TK><<<grid, WKV_THREADS, 0, cx->stream>>>(
            y, r, w_raw, k, v, kk, a, state_base, state_stride, checkpoints, b->seq_len,
            b->row_begin, b->slot, b->ckpt_block, C);
    }
}

template <bool TRAIN, typename TI, typename TO, typename TK>
static void wkv_forward_launch(rp_cuda_ctx *cx, const char *op, TO *y, const TI *r,
                               const TK *w_raw, const TI *k, const TI *v, const TK *kk,
                               const TK *a, float *state_base, size_t state_stride,
                               float *checkpoints, const rp_batch *batch, int C, int N) {
    if (!wkv_launchable(cx, op, batch, C, N)) return;
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    dim3 grid((unsigned)batch->n_seq, (unsigned)(C / WKV_N));
    if (b.max_seq_len >= rp_cuda_wkv7_chunked_min_t && cx->math == RP_CUDA_MATH_BF16)
        wkv7_chunk_forward_mma_kernel<TRAIN, TI, TO, TK><<<grid, WKV_THREADS, 0, cx->stream>>>(
            y, r, w_raw, k, v, kk, a, state_base, state_stride, checkpoints, b.seq_len,
            b.row_begin, b.slot, b.ckpt_block, C);
    else if (b.max_seq_len >= rp_cuda_wkv7_chunked_min_t)
        wkv7_chunk_forward_kernel<TRAIN, TI, TO, TK><<<grid, WKV_THREADS, 0, cx->stream>>>(
            y, r, w_raw, k, v, kk, a, state_base, state_stride, checkpoints, b.seq_len,
            b.row_begin, b.slot, b.ckpt_block, C);
    else
        wkv_token_forward_launch<TRAIN>(cx, grid, y, r, w_raw, k, v, kk, a, state_base,
                                        state_stride, checkpoints, &b, C);
    RP_CUDA_LAUNCHED(cx, op);
}

// kk, w_raw and a are bf16 in place all or none (one template type TK):
// training hints them under the same conditions (BF16 math, more rows than
// a GEMV takes, the copies on). A part of them is a caller's error, reported.
static bool wkv_only_set(rp_cuda_ctx *cx, const char *op, const __nv_bfloat16 *kk16,
                          const __nv_bfloat16 *w16, const __nv_bfloat16 *a16) {
    if (!kk16 == !w16 && !kk16 == !a16) return true;
    if (cx->error.code == RP_OK)
        rp_error_set(&cx->error, RP_ERR_INTERNAL,
                     "cuda %s: kk is stored %s, w_raw %s and a %s; the kernels take kk, "
                     "w_raw and a in one type: hint all three (wkv_only for kk, gemm_only "
                     "for the w and a LoRAs' up GEMMs) or none",
                     op, kk16 ? "bf16 in place" : "f32", w16 ? "bf16 in place" : "f32",
                     a16 ? "bf16 in place" : "f32");
    return false;
}

// Without all six (seven) inputs in bf16, r, k and v must be f32: the
// mixed paths take them in one type with f32 r, k, v (an rkv_only set
// without kk, w_raw, a (and dy) in bf16 is a caller's error, reported).
static bool wkv_rkv_f32(rp_cuda_ctx *cx, const char *op, const float *r, const float *k,
                        const float *v, size_t n) {
    const __nv_bfloat16 *rkv16[4];
    const int got = rp_cuda_rkv16(cx, op, r, k, v, NULL, n, rkv16);
    if (got == 1 && cx->error.code == RP_OK)
        rp_error_set(&cx->error, RP_ERR_INTERNAL,
                     "cuda %s: r, k, v are bf16 in place (rkv_only) but kk, w_raw, a or dy "
                     "are not: hint r, k, v only with the other WKV7 inputs in bf16",
                     op);
    return got == 0;
}

// Forward (TRAIN: with checkpoints) from the fp32 activations, or from
// their bf16 copies when every one exists (y stays fp32: group norm reads it).
template <bool TRAIN>
static void wkv_forward_op(rp_backend *be, const char *op, float *y, const float *r,
                           const float *w_raw, const float *k, const float *v, const float *kk,
                           const float *a, float *state_base, size_t state_stride,
                           float *checkpoints, const rp_batch *batch, int C, int N) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const float *in[6] = {r, w_raw, k, v, kk, a};
    const __nv_bfloat16 *in16[6];
    const size_t n = (size_t)batch->n_rows * C;
    // kk in bf16 in place (key_prepare took a wkv_only hint) must be read so
    // even when the other inputs are f32: its f32 memory holds no values
    // w_raw likewise (the w LoRA's up GEMM and bias_act wrote it in bf16 in
    // place: forward.c's gemm_only hint in training); the two come together
    const __nv_bfloat16 *kk16 = n > 0 ? rp_cuda_inplace_find(cx, kk, n) : nullptr;
    const __nv_bfloat16 *w16 = n > 0 ? rp_cuda_inplace_find(cx, w_raw, n) : nullptr;
    // a likewise (the a LoRA's up GEMM and the a0 sigmoid in place)
    const __nv_bfloat16 *a16 = n > 0 ? rp_cuda_inplace_find(cx, a, n) : nullptr;
    const bool all16 = n > 0 && wkv_find16(cx, in, in16, 6, n);
    // A training y that only groupnorm_bonus_gate and its backward read
    // (backend.h wkv_only) is written in bf16 in place, no f32, when the
    // inputs come in bf16 (kk with them); else, and with the copies off, f32
    // rounded to bf16 after: the same values for the fused groupnorm.
    const int only = TRAIN && rp_cuda_take_wkv_only(cx, y, n) &&
                     rp_cuda_store16_rows(cx, batch->n_rows);
    const int y16 = only && !cx->act16_off && (all16 || kk16);
    __nv_bfloat16 *yb = (__nv_bfloat16 *)y;
    if (!y16 && n > 0 && !rp_cuda_store16_fits(cx, y, n, op)) return;
    // f32 kk / w_raw / a are read whole: not past a bf16-only buffer either
    if (n > 0 && !all16 && ((!kk16 && !rp_cuda_store16_fits(cx, kk, n, op)) ||
                            (!w16 && !rp_cuda_store16_fits(cx, w_raw, n, op)) ||
                            (!a16 && !rp_cuda_store16_fits(cx, a, n, op)) ||
                            !wkv_rkv_f32(cx, op, r, k, v, n)))
        return;
    if (all16 && y16)
        wkv_forward_launch<TRAIN>(cx, op, yb, in16[0], in16[1], in16[2], in16[3], in16[4],
                                  in16[5], state_base, state_stride, checkpoints, batch, C, N);
    else if (all16)
        wkv_forward_launch<TRAIN>(cx, op, y, in16[0], in16[1], in16[2], in16[3], in16[4],
                                  in16[5], state_base, state_stride, checkpoints, batch, C, N);
    else if (!wkv_only_set(cx, op, kk16, w16, a16))
        return;
    else if (kk16 && y16)
        wkv_forward_launch<TRAIN>(cx, op, yb, r, w16, k, v, kk16, a16, state_base,
                                  state_stride, checkpoints, batch, C, N);
    else if (kk16)
        wkv_forward_launch<TRAIN>(cx, op, y, r, w16, k, v, kk16, a16, state_base, state_stride,
                                  checkpoints, batch, C, N);
    else
        wkv_forward_launch<TRAIN>(cx, op, y, r, w_raw, k, v, kk, a, state_base, state_stride,
                                  checkpoints, batch, C, N);
    // the kernel wrote y (plain RP_CUDA_LAUNCHED): no earlier record of it
    // may stand, in place or copy (an earlier step's bf16 y among them)
    if (n > 0) rp_cuda_act16_forget(cx, y, n * (y16 ? sizeof(__nv_bfloat16) : sizeof(float)));
    rp_cuda_store16_done(cx, y, n, only, y16);
}

static void cuda_wkv7(rp_backend *be, float *y, const float *r, const float *w_raw,
                      const float *k, const float *v, const float *kk, const float *a,
                      float *state_base, size_t state_stride, const rp_batch *batch, int C,
                      int N) {
    wkv_forward_op<false>(be, "wkv7", y, r, w_raw, k, v, kk, a, state_base, state_stride,
                          nullptr, batch, C, N);
}

static void cuda_wkv7_forward_train(rp_backend *be, float *y, const float *r, const float *w_raw,
                                    const float *k, const float *v, const float *kk,
                                    const float *a, float *state_base, size_t state_stride,
                                    float *checkpoints, const rp_batch *batch, int C, int N) {
    wkv_forward_op<true>(be, "wkv7_forward_train", y, r, w_raw, k, v, kk, a, state_base,
                         state_stride, checkpoints, batch, C, N);
}

// g = {dr, dw_raw, dk, dv, dkk, da}: dkk of type TD (g[4] cast), kk, w_raw
// and a (in[4], in[1], in[5] cast) of type TK, dy TY, the rest TO and TI.
// dr16 (may be NULL): a bf16 copy of the new dr, the receptance GEMM
// backward's dY (rp_cuda_act16). dw16 (may be NULL): dw_raw written as bf16
// there instead of TO (in place: a GEMM-only dw_raw, backend.h gemm_only),
// da16 likewise for da (in place: an rkv_only da, the fused tail's alone);
// store_dr 0: no f32 dr, its copy dr16 alone (a GEMM-only dr); runtime
// choices, so that they cost no instantiation.
template <typename TI, typename TO, typename TK = TI, typename TD = TO, typename TY = TI>
static void wkv_backward_launch(rp_cuda_ctx *cx, TO *const *g, float *dstate_base,
                                size_t state_stride, const TY *dy, const TI *const *in,
                                const float *checkpoints, const rp_batch *batch, int C, int N,
                                float beta, __nv_bfloat16 *dr16 = nullptr,
                                __nv_bfloat16 *dw16 = nullptr, __nv_bfloat16 *da16 = nullptr,
                                int store_dr = 1) {
    TD *dkk = (TD *)g[4];
    const TK *kk = (const TK *)in[4], *w_raw = (const TK *)in[1], *a = (const TK *)in[5];
    if (!wkv_launchable(cx, "wkv7_backward", batch, C, N)) return;
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    dim3 grid((unsigned)batch->n_seq, (unsigned)(C / WKV_N));
    // BF16 math from the chunked forward's length on: the chunk products on
    // tensor cores (95 KB of shared memory: past the 48 KB default)
    if (b.max_seq_len >= rp_cuda_wkv7_chunked_min_t && cx->math == RP_CUDA_MATH_BF16) {
        if (!RP_CUDA_OK(cx, cudaFuncSetAttribute(wkv7_chunk_backward_mma_kernel<TI, TO, TK, TD, TY>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 (int)WKB_BYTES)))
            return;
        wkv7_chunk_backward_mma_kernel<TI, TO, TK, TD, TY><<<grid, WKV_THREADS, WKB_BYTES, cx->stream>>>(
            g[0], g[1], g[2], g[3], dkk, g[5], dstate_base, state_stride, dy, in[0], w_raw,
            in[2], in[3], kk, a, checkpoints, b.seq_len, b.row_begin, b.slot,
            b.ckpt_block, C, beta != 0.0f, dr16, dw16, da16, store_dr);
    } else {
        wkv7_backward_kernel<TI, TO, TK, TD, TY><<<grid, WKV_THREADS, 0, cx->stream>>>(
            g[0], g[1], g[2], g[3], dkk, g[5], dstate_base, state_stride, dy, in[0], w_raw,
            in[2], in[3], kk, a, checkpoints, b.seq_len, b.row_begin, b.slot,
            b.ckpt_block, C, beta != 0.0f, dr16, dw16, da16, store_dr);
    }
    RP_CUDA_LAUNCHED(cx, "wkv7_backward");
}

static void cuda_wkv7_backward_beta(rp_backend *be, float *dr, float *dw_raw, float *dk,
                                    float *dv, float *dkk, float *da, float *dstate_base,
                                    size_t state_stride, const float *dy, const float *r,
                                    const float *w_raw, const float *k, const float *v,
                                    const float *kk, const float *a, const float *checkpoints,
                                    const rp_batch *batch, int C, int N, float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    float *const g[6] = {dr, dw_raw, dk, dv, dkk, da};
    const float *in[7] = {r, w_raw, k, v, kk, a, dy};
    const __nv_bfloat16 *in16[7];
    const size_t n = (size_t)batch->n_rows * C;
    // A WKV7-only dkk (backend.h wkv_only: key_prepare_backward alone reads
    // it) is written in bf16 in place, no f32; with the copies off it stays
    // f32, rounded to bf16 after, the same values for key_prepare_backward.
    // kk in bf16 in place (key_prepare's) is read so whatever the rest.
    const int only = rp_cuda_take_wkv_only(cx, dkk, n) && rp_cuda_store16_rows(cx, batch->n_rows);
    const int dkk16 = only && !cx->act16_off;
    // A GEMM-only dw_raw (backend.h gemm_only before this op: w0's
    // bias_act_backward sums its bias gradient from it, then the w LoRA's
    // GEMMs read it as dY) likewise: bf16 in place, no f32 write (and no f32
    // read and bf16 copy in bias_act_backward); copies off: f32 rounded to
    // bf16 after, the same values for both readers.
    // dr GEMM-only too (gemm_only: the receptance GEMM backward right after
    // this op reads it as its dY, nothing else): its bf16 copy alone, below
    int dw_hint, dr_hint;
    rp_cuda_take_gemm_only2(cx, dw_raw, dr, n, &dw_hint, &dr_hint);
    const int dw_only = dw_hint && rp_cuda_store16_rows(cx, batch->n_rows);
    __nv_bfloat16 *dw16 =
        dw_only && !cx->act16_off ? reinterpret_cast<__nv_bfloat16 *>(dw_raw) : nullptr;
    // An rkv_only da (backend.h: the fused attention_tail_backward alone
    // reads it, and writes the d pre of a over it in place) likewise: bf16
    // in place, no f32 write and read; copies off: f32 rounded to bf16.
    const int da_only =
        rp_cuda_take_rkv_only(cx, da, n) && rp_cuda_store16_rows(cx, batch->n_rows);
    __nv_bfloat16 *da16 =
        da_only && !cx->act16_off ? reinterpret_cast<__nv_bfloat16 *>(da) : nullptr;
    const __nv_bfloat16 *kk16 = n > 0 ? rp_cuda_inplace_find(cx, kk, n) : nullptr;
    const __nv_bfloat16 *w16 = n > 0 ? rp_cuda_inplace_find(cx, w_raw, n) : nullptr;
    const __nv_bfloat16 *a16 = n > 0 ? rp_cuda_inplace_find(cx, a, n) : nullptr;
    const bool all16 = n > 0 && wkv_find16(cx, in, in16, 7, n);
    if (!all16 && !wkv_only_set(cx, "wkv7_backward", kk16, w16, a16)) return;
    // f32 kk / w_raw / a are read whole: not past a bf16-only buffer
    if (n > 0 && !all16 && ((!kk16 && !rp_cuda_store16_fits(cx, kk, n, "wkv7_backward")) ||
                            (!w16 && !rp_cuda_store16_fits(cx, w_raw, n, "wkv7_backward")) ||
                            (!a16 && !rp_cuda_store16_fits(cx, a, n, "wkv7_backward")) ||
                            !wkv_rkv_f32(cx, "wkv7_backward", r, k, v, n)))
        return;
    // dy in bf16 in place: groupnorm_bonus_gate_backward wrote it so under
    // the model's wkv_only hint (this op alone reads it). Training hints kk,
    // dkk and dy under the same conditions, so only that set gets its own
    // instantiation; a bf16 dy with kk or dkk f32 is a caller's error.
    const __nv_bfloat16 *dy16 = n > 0 ? rp_cuda_inplace_find(cx, dy, n) : nullptr;
    if (!all16 && dy16 && !(kk16 && dkk16)) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda wkv7_backward: dy is stored bf16 in place but %s is f32; hint "
                         "dy (wkv_only before groupnorm_bonus_gate_backward) only where kk "
                         "and dkk are wkv_only too",
                         kk16 ? "dkk" : "kk");
        return;
    }
    // dr, dk, dv bf16 in place: groupnorm_bonus_gate_backward wrote them so
    // under the model's drkv_only hint; this op adds onto them in place
    // (each element read and written by one thread) and leaves them so for
    // their GEMMs (dr) and the fused tail (dk, dv). Only training's full
    // set takes that instantiation (all bf16: it is bench_gpu's bf16 I/O
    // one); with the copies off they are f32 rounded to bf16, rounded again
    // after this op, the same values.
    float *const chain[3] = {dr, dk, dv};
    const int chain_set = rp_cuda_inplace_set(cx, chain, 3, n);
    const int n_chain = chain_set != RP_INPLACE_NONE, chain16 = chain_set == RP_INPLACE_BF16;
    if (chain_set == RP_INPLACE_MIXED ||
        (chain16 && !(all16 && dkk16 && dw16 && da16 && beta != 0.0f))) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda wkv7_backward: dr, dk, dv are %s, but this op adds onto bf16 "
                         "ones only all three, with beta 1, r k v kk w_raw a dy bf16 and dkk, "
                         "dw_raw, da hinted as training hints them (r k v %s, dkk %s, dw_raw "
                         "%s, da %s, beta %g); hint drkv_only only there",
                         chain16 ? "bf16 in place" : "in place in mixed storage",
                         all16 ? "bf16" : "f32", dkk16 ? "bf16" : "f32",
                         dw16 ? "bf16" : "f32", da16 ? "bf16" : "f32", (double)beta);
        return;
    }
    // dr (complete once this op added its part) is the receptance GEMM
    // backward's dY: its bf16 copy in the same pass (the model runs that
    // GEMM right after this op when it fuses the mixes), unless in place
    __nv_bfloat16 *dr16 =
        n > 0 && !n_chain ? rp_cuda_act16_for_rows(cx, dr, n, batch->n_rows) : nullptr;
    // a GEMM-only dr: that copy alone (sole: an f32 reader is refused)
    const int store_dr = !(dr_hint && dr16);
    if (chain16) {
        __nv_bfloat16 *g16[6];
        for (int j = 0; j < 6; j++) g16[j] = reinterpret_cast<__nv_bfloat16 *>(g[j]);
        wkv_backward_launch(cx, g16, dstate_base, state_stride, in16[6], in16, checkpoints,
                            batch, C, N, beta);
    } else if (all16) {
        if (dkk16)
            wkv_backward_launch<__nv_bfloat16, float, __nv_bfloat16, __nv_bfloat16>(
                cx, g, dstate_base, state_stride, in16[6], in16, checkpoints, batch, C, N, beta,
                dr16, dw16, da16, store_dr);
        else
            wkv_backward_launch(cx, g, dstate_base, state_stride, in16[6], in16, checkpoints,
                                batch, C, N, beta, dr16, dw16, da16, store_dr);
    } else {
        const float *in32[6] = {r, w16 ? (const float *)w16 : w_raw, k, v,
                                kk16 ? (const float *)kk16 : kk, a16 ? (const float *)a16 : a};
        if (dy16)
            wkv_backward_launch<float, float, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(
                cx, g, dstate_base, state_stride, dy16, in32, checkpoints, batch, C, N, beta,
                dr16, dw16, da16, store_dr);
        else if (kk16 && dkk16)
            wkv_backward_launch<float, float, __nv_bfloat16, __nv_bfloat16>(
                cx, g, dstate_base, state_stride, dy, in32, checkpoints, batch, C, N, beta,
                dr16, dw16, da16, store_dr);
        else if (kk16)
            wkv_backward_launch<float, float, __nv_bfloat16, float>(
                cx, g, dstate_base, state_stride, dy, in32, checkpoints, batch, C, N, beta,
                dr16, dw16, da16, store_dr);
        else if (dkk16)
            wkv_backward_launch<float, float, float, __nv_bfloat16>(
                cx, g, dstate_base, state_stride, dy, in32, checkpoints, batch, C, N, beta,
                dr16, dw16, da16, store_dr);
        else
            wkv_backward_launch(cx, g, dstate_base, state_stride, dy, in32, checkpoints, batch,
                                C, N, beta, dr16, dw16, da16, store_dr);
    }
    // the kernel wrote dkk (plain RP_CUDA_LAUNCHED): no earlier record of it
    // may stand, in place or copy
    if (n > 0) rp_cuda_act16_forget(cx, dkk, n * sizeof(float));
    if (n > 0) rp_cuda_act16_forget(cx, dw_raw, n * sizeof(float));
    rp_cuda_store16_done(cx, dw_raw, n, dw_only, dw16 != nullptr);
    if (n > 0) rp_cuda_act16_forget(cx, da, n * sizeof(float));
    rp_cuda_store16_done(cx, da, n, da_only, da16 != nullptr);
    // dy's one reader has read it: drop its in-place record, so that no
    // later reader of that memory takes it for bf16 values
    if (dy16) rp_cuda_act16_forget(cx, dy, n * sizeof(float));
    rp_cuda_store16_done(cx, dkk, n, only, dkk16);
    for (int j = 0; n_chain && j < 3; j++) {
        float *const p = chain[j];
        rp_cuda_act16_forget(cx, p, n * sizeof(float));
        rp_cuda_store16_done(cx, p, n, 1, chain16);
        if (!chain16) rp_cuda_inplace_add(cx, p, n, 1);  // copies off: rounded f32
    }
    if (dr16 && cx->error.code == RP_OK) rp_cuda_act16_publish_as(cx, dr16, dr, n, store_dr);
}

static void cuda_wkv7_backward(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                               float *dkk, float *da, float *dstate_base, size_t state_stride,
                               const float *dy, const float *r, const float *w_raw,
                               const float *k, const float *v, const float *kk, const float *a,
                               const float *checkpoints, const rp_batch *batch, int C, int N) {
    cuda_wkv7_backward_beta(be, dr, dw_raw, dk, dv, dkk, da, dstate_base, state_stride, dy, r,
                            w_raw, k, v, kk, a, checkpoints, batch, C, N, 0.0f);
}

// ---- bf16 I/O entry points (cuda_wkv7.h) ----

typedef const __nv_bfloat16 *wkv_cb16;

int rp_cuda_wkv7_forward_train_bf16(rp_backend *be, void *y, int y_bf16, const rp_wkv7_bf16 *in,
                                    float *state_base, size_t state_stride, float *checkpoints,
                                    const rp_batch *batch, int C, int N) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    wkv_cb16 r = (wkv_cb16)in->r, w = (wkv_cb16)in->w_raw, k = (wkv_cb16)in->k,
             v = (wkv_cb16)in->v, kk = (wkv_cb16)in->kk, a = (wkv_cb16)in->a;
    if (y_bf16)
        wkv_forward_launch<true>(cx, "wkv7_forward_train", (__nv_bfloat16 *)y, r, w, k, v, kk, a,
                                 state_base, state_stride, checkpoints, batch, C, N);
    else
        wkv_forward_launch<true>(cx, "wkv7_forward_train", (float *)y, r, w, k, v, kk, a,
                                 state_base, state_stride, checkpoints, batch, C, N);
    return cx->error.code == RP_OK;
}

int rp_cuda_wkv7_backward_bf16(rp_backend *be, void *const grads[6], int grads_bf16,
                               float *dstate_base, size_t state_stride, const void *dy,
                               const rp_wkv7_bf16 *in, const float *checkpoints,
                               const rp_batch *batch, int C, int N, float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    wkv_cb16 in16[6] = {(wkv_cb16)in->r,  (wkv_cb16)in->w_raw, (wkv_cb16)in->k,
                        (wkv_cb16)in->v,  (wkv_cb16)in->kk,    (wkv_cb16)in->a};
    if (grads_bf16) {
        __nv_bfloat16 *g[6];
        for (int i = 0; i < 6; i++) g[i] = (__nv_bfloat16 *)grads[i];
        wkv_backward_launch(cx, g, dstate_base, state_stride, (wkv_cb16)dy, in16, checkpoints,
                            batch, C, N, beta);
    } else {
        float *g[6];
        for (int i = 0; i < 6; i++) g[i] = (float *)grads[i];
        wkv_backward_launch(cx, g, dstate_base, state_stride, (wkv_cb16)dy, in16, checkpoints,
                            batch, C, N, beta);
    }
    return cx->error.code == RP_OK;
}

__global__ void wkv_from_bf16_kernel(float *dst, const __nv_bfloat16 *src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

int rp_cuda_bf16_from_f32(rp_backend *be, void *dst, const float *src, size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    rp_cuda_to_bf16(cx, (__nv_bfloat16 *)dst, src, n);
    return cx->error.code == RP_OK;
}

int rp_cuda_f32_from_bf16(rp_backend *be, float *dst, const void *src, size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (n == 0) return cx->error.code == RP_OK;
    unsigned blocks = rp_cuda_blocks(n, 256);
    const unsigned cap = (unsigned)cx->n_sm * 16;
    if (blocks > cap) blocks = cap;
    wkv_from_bf16_kernel<<<blocks, 256, 0, cx->stream>>>(dst, (const __nv_bfloat16 *)src, n);
    RP_CUDA_LAUNCHED(cx, "from_bf16");
    return cx->error.code == RP_OK;
}

void rp_cuda_install_wkv7(rp_backend *be) {
    be->wkv7 = cuda_wkv7;
    be->wkv7_forward_train = cuda_wkv7_forward_train;
    be->wkv7_backward = cuda_wkv7_backward;
    be->wkv7_backward_beta = cuda_wkv7_backward_beta;
}
