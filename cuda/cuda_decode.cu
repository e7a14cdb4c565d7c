// The fused decode ops of the CUDA backend (twins in src/cpu/cpu_decode.c):
// gemv_group (several independent GEMVs with bias + activation epilogues in
// one launch) and time_mix_heads (value residual, key prepare, the WKV7 step,
// group norm and bonus/gate of one (sequence, head) in one block). Each
// reproduces the separate kernels' arithmetic in the same order (the same
// bits in the emulator), so the fusion changes launches, not results.
#include "cuda_internal.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#define DEC_FULL_MASK 0xffffffffu
#define DEC_THREADS 256
// Rows a lane accumulates at once (the unfused decode GEMVs' RP_GEMV_MAX_M):
// a launch walks its rows in blocks of DEC_MAX_M, each row's sum in the
// same order whatever the block or the launch's row count, so a decode row
// gets the bits it gets alone (backend.h, set_decode_rows).
#define DEC_MAX_M 8
// Rows of one gemv_group launch (the engine's CUDA decode group); more rows
// run as several launches of this many. W is read from DRAM once per launch:
// the later row blocks of a block find its W rows in L1/L2.
#define DEC_LAUNCH_ROWS 64
// Weight loads each lane has in flight before it accumulates them.
#define DEC_LOADS 4
// Split-K of the W [K,N] GEMVs with few columns (LoRA down-projections: N =
// 32-256, 1-8 blocks of 32 columns, each thread summing K/8 rows): up to
// DEC_SPLIT_MAX slices of at least DEC_SPLIT_MIN_K rows, one block each; the
// block that finishes a column tile last adds the slices' partial sums in
// slice order (deterministic, whichever block comes last).
#define DEC_SPLIT_MAX 8
#define DEC_SPLIT_MIN_K 64
#define DEC_SPLIT_MAX_TILES 8
// Partial sums of one launch: every job at its largest split.
#define DEC_PART_FLOATS (RP_GEMV_JOBS_MAX * DEC_SPLIT_MAX * DEC_LAUNCH_ROWS * 32 * DEC_SPLIT_MAX_TILES)
#define DEC_COUNTERS (RP_GEMV_JOBS_MAX * DEC_SPLIT_MAX_TILES)
// The LN prologue's count of blocks done with the old token-shift state:
// the counter after the split-K ones.
#define DEC_LN_COUNTER DEC_COUNTERS
// Most rows times C of the LN prologue: it keeps three such arrays in
// dynamic shared memory (96 KiB at most; two blocks fit an H100 SM's 227).
#define DEC_LN_MAX_FLOATS 8192

// ---- gemv_group ----

struct dec_job {
    float *y;
    const float *x;
    const void *w;       // bf16 copy or fp32 weights
    const float *bias;
    int N, K;
    int in_out;          // 1: W [K,N] (LoRA), 0: W [N,K]
    int w_bf16;
    int vec;             // out_in only: rows of W 16-byte aligned (vector loads)
    int act;             // rp_activation
    const float *mu;     // gemv_group_ln_kernel: the mu of the mix that x is
    int epilogue;        // bias or act set: act(y + bias) after the sum
    float beta;
    int block_begin;     // first block of this job in the grid
    int tiles;           // in_out: blocks of 32 columns
    int split, k_slice;  // in_out: K slices (1: none) of k_slice rows
    float *part;         // split > 1: [split, M, N] partial sums
    unsigned *count;     // split > 1: [tiles] slices done (0 between launches)
};

struct dec_jobs {
    dec_job job[RP_GEMV_JOBS_MAX];
    int n_jobs;
    int M;
};

static __device__ __forceinline__ float dec_to_float(float v) { return v; }
static __device__ __forceinline__ float dec_to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

// act(t) exactly as bias_act_kernel forms it.
static __device__ __forceinline__ float dec_activate(int act, float t) {
    switch (act) {
    case RP_ACT_TANH: return tanhf(t);
    case RP_ACT_SIGMOID: return rp_sigmoidf(t);
    case RP_ACT_RELU_SQUARED: return t > 0.0f ? t * t : 0.0f;
    default: return t;
    }
}

// y = sum (+ beta y), then act(y + bias) when the job has an epilogue: the
// matmul's store followed by bias_act's, without the round trip.
static __device__ __forceinline__ void dec_store(const dec_job &j, int m, int n, float v) {
    float *out = j.y + (size_t)m * j.N + n;
    v = j.beta == 0.0f ? v : v + j.beta * *out;
    if (j.epilogue) v = dec_activate(j.act, v + (j.bias ? j.bias[n] : 0.0f));
    *out = v;
}

// W [N,K]: a warp per output column (8 a block), lanes over K as the
// unfused gemv_out_in_kernel (same per-lane order and shuffle tree), with
// DEC_LOADS 16-byte loads issued before any is used; rows in blocks of
// DEC_MAX_M, each block summing exactly as a launch of its rows alone.
template <typename WT>
static __device__ void dec_out_in(const dec_job &j, const float *x_all, int M_all, int blk) {
    const int lane = threadIdx.x & 31, n = blk * (DEC_THREADS / 32) + (threadIdx.x >> 5);
    if (n >= j.N) return;  // the whole warp leaves together
    const int K = j.K;
    const WT *wn = (const WT *)j.w + (size_t)n * K;
#pragma unroll 1
    for (int m0 = 0; m0 < M_all; m0 += DEC_MAX_M) {
        const int M = M_all - m0 < DEC_MAX_M ? M_all - m0 : DEC_MAX_M;
        const float *x = x_all + (size_t)m0 * K;
        float acc[DEC_MAX_M];
#pragma unroll
        for (int m = 0; m < DEC_MAX_M; m++) acc[m] = 0.0f;
        if (j.vec) {
            constexpr int V = 16 / sizeof(WT);
            union chunk_t {
                uint4 raw;
                WT v[V];
            };
            for (int k0 = lane * V; k0 < K; k0 += DEC_LOADS * 32 * V) {
                chunk_t c[DEC_LOADS];
#pragma unroll
                for (int u = 0; u < DEC_LOADS; u++) {
                    const int k = k0 + u * 32 * V;
                    if (k < K) c[u].raw = *reinterpret_cast<const uint4 *>(wn + k);
                }
#pragma unroll
                for (int u = 0; u < DEC_LOADS; u++) {
                    const int k = k0 + u * 32 * V;
                    if (k >= K) break;
#pragma unroll
                    for (int q = 0; q < V; q++) {
                        const float wf = dec_to_float(c[u].v[q]);
#pragma unroll
                        for (int m = 0; m < DEC_MAX_M; m++)
                            if (m < M) acc[m] += wf * x[(size_t)m * K + k + q];
                    }
                }
            }
        } else {
            for (int k0 = lane; k0 < K; k0 += DEC_LOADS * 32) {
                float wv[DEC_LOADS];
#pragma unroll
                for (int u = 0; u < DEC_LOADS; u++) {
                    const int k = k0 + u * 32;
                    wv[u] = k < K ? dec_to_float(wn[k]) : 0.0f;
                }
#pragma unroll
                for (int u = 0; u < DEC_LOADS; u++) {
                    const int k = k0 + u * 32;
                    if (k >= K) break;
#pragma unroll
                    for (int m = 0; m < DEC_MAX_M; m++)
                        if (m < M) acc[m] += wv[u] * x[(size_t)m * K + k];
                }
            }
        }
#pragma unroll
        for (int m = 0; m < DEC_MAX_M; m++) {
            if (m >= M) break;
            float v = acc[m];
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(DEC_FULL_MASK, v, off);
            if (lane == 0) dec_store(j, m0 + m, n, v);
        }
    }
}

// W [K,N]: 32 columns a block, the K sum over 8 thread rows added in row
// order through shared memory, as the unfused gemv_in_out_kernel; each
// thread has DEC_LOADS rows of W in flight; rows in blocks of DEC_MAX_M.
// With split > 1 the block sums rows [s k_slice, (s + 1) k_slice) only and
// the tile's last block adds the slices (in slice order, for every row).
template <typename WT>
static __device__ void dec_in_out(const dec_job &j, const float *x_all, int M_all, int blk,
                                  float (*part)[DEC_MAX_M][32], int *last) {
    const int tile = blk % j.tiles, slice = blk / j.tiles;
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5, n = tile * 32 + tx;
    const int N = j.N, k_begin = slice * j.k_slice;
    const int k_end = j.K < k_begin + j.k_slice ? j.K : k_begin + j.k_slice;
    const WT *w = (const WT *)j.w;
#pragma unroll 1
    for (int m0 = 0; m0 < M_all; m0 += DEC_MAX_M) {
        const int M = M_all - m0 < DEC_MAX_M ? M_all - m0 : DEC_MAX_M;
        const float *x = x_all + (size_t)m0 * j.K;
        float acc[DEC_MAX_M];
#pragma unroll
        for (int m = 0; m < DEC_MAX_M; m++) acc[m] = 0.0f;
        if (n < N)
            for (int k0 = k_begin + ty; k0 < k_end; k0 += DEC_LOADS * 8) {
                float wv[DEC_LOADS];
#pragma unroll
                for (int u = 0; u < DEC_LOADS; u++) {
                    const int k = k0 + u * 8;
                    wv[u] = k < k_end ? dec_to_float(w[(size_t)k * N + n]) : 0.0f;
                }
#pragma unroll
                for (int u = 0; u < DEC_LOADS; u++) {
                    const int k = k0 + u * 8;
                    if (k >= k_end) break;
#pragma unroll
                    for (int m = 0; m < DEC_MAX_M; m++)
                        if (m < M) acc[m] += x[(size_t)m * j.K + k] * wv[u];
                }
            }
        if (m0 > 0) __syncthreads();  // row 0 read the last row block's partials
#pragma unroll
        for (int m = 0; m < DEC_MAX_M; m++) part[ty][m][tx] = acc[m];
        __syncthreads();
        if (ty == 0 && n < N)
            for (int m = 0; m < M; m++) {
                float v = 0.0f;
                for (int r = 0; r < 8; r++) v += part[r][m][tx];
                if (j.split == 1)
                    dec_store(j, m0 + m, n, v);
                else
                    j.part[((size_t)slice * M_all + m0 + m) * N + n] = v;
            }
    }
    if (j.split == 1) return;
    __threadfence();  // the partials are visible before the count says so
    __syncthreads();
    if (threadIdx.x == 0) last[0] = atomicAdd(j.count + tile, 1u) == (unsigned)j.split - 1;
    __syncthreads();
    if (!last[0]) return;  // the same for the whole block
    if (ty == 0 && n < N) {
        const volatile float *pv = j.part;  // other blocks' writes: not through L1
        for (int m = 0; m < M_all; m++) {
            float v = 0.0f;
            for (int sl = 0; sl < j.split; sl++) v += pv[((size_t)sl * M_all + m) * N + n];
            dec_store(j, m, n, v);
        }
    }
    if (threadIdx.x == 0) j.count[tile] = 0u;  // ready for the next launch (or graph replay)
}

// The block's slice of W into L2 before the grid dependency sync (PDL):
// weights do not depend on the kernel before, and a prefetch reads no value,
// so this overlaps that kernel's tail with this one's weight stream. W [N,K]:
// each warp's row n, lanes over its 128-byte lines; W [K,N]: each thread
// row's 32 columns, from the lane at a line start (or lane 0).
static __device__ void dec_prefetch(const dec_job &j, int blk) {
    const size_t esize = j.w_bf16 ? 2 : 4;
    const char *w = (const char *)j.w;
    if (!j.in_out) {
        const int lane = threadIdx.x & 31, n = blk * (DEC_THREADS / 32) + (threadIdx.x >> 5);
        if (n >= j.N) return;
        const uintptr_t lo = (uintptr_t)(w + (size_t)n * j.K * esize);
        const uintptr_t hi = lo + (size_t)j.K * esize;
        for (uintptr_t a = (lo & ~(uintptr_t)127) + (uintptr_t)lane * 128; a < hi; a += 32 * 128)
            rp_prefetch_l2((const void *)a);
        return;
    }
    const int tile = blk % j.tiles, slice = blk / j.tiles;
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5, n = tile * 32 + tx;
    if (n >= j.N) return;
    const int k_begin = slice * j.k_slice;
    const int k_end = j.K < k_begin + j.k_slice ? j.K : k_begin + j.k_slice;
    for (int k = k_begin + ty; k < k_end; k += 8) {
        const char *a = w + ((size_t)k * j.N + n) * esize;
        if (tx == 0 || (uintptr_t)a % 128 == 0) rp_prefetch_l2(a);
    }
}

// The job whose blocks hold (virtual) block vb: the last whose block_begin
// is <= vb (the same for the whole block, so the barrier in dec_in_out is
// reached by every thread or none).
static __device__ int dec_job_at(const dec_jobs &jobs, int vb) {
    int ji = 0;
    while (ji + 1 < jobs.n_jobs && jobs.job[ji + 1].block_begin <= vb) ji++;
    return ji;
}

// The block's GEMV of job j from x_all [M, K] (global or shared memory).
static __device__ void dec_gemv(const dec_job &j, const float *x_all, int M, int blk,
                                float (*part)[DEC_MAX_M][32], int *last) {
    if (j.in_out) {
        if (j.w_bf16)
            dec_in_out<__nv_bfloat16>(j, x_all, M, blk, part, last);
        else
            dec_in_out<float>(j, x_all, M, blk, part, last);
    } else {
        if (j.w_bf16)
            dec_out_in<__nv_bfloat16>(j, x_all, M, blk);
        else
            dec_out_in<float>(j, x_all, M, blk);
    }
}

// __launch_bounds__(.., 2): with the row-block loop ptxas picked 80 registers
// and spilled 4 bytes; 2 blocks/SM (128 registers) keep it spill-free.
// One grid over all jobs (dec_job_at).
static __global__ void __launch_bounds__(DEC_THREADS, 2) gemv_group_kernel(dec_jobs jobs) {
    __shared__ float part[8][DEC_MAX_M][32];
    __shared__ int last[1];
    const dec_job &j = jobs.job[dec_job_at(jobs, (int)blockIdx.x)];
    const int blk = (int)blockIdx.x - j.block_begin;
    dec_prefetch(j, blk);
    // x, y (beta), the split-K partials and counts: the kernels before wrote them.
    rp_pdl_wait();
    rp_pdl_trigger();
    dec_gemv(j, j.x, jobs.M, blk, part, last);
}

// ---- gemv_group with the LN prologue (ln_mix_gemv_group) ----

// ln_shift_mix's inputs, step mode (row r is sequence r).
struct dec_ln {
    const float *x, *weight, *bias;
    float eps;
    float *state_base;
    size_t state_stride;
    const int32_t *slot;
    int C;
    int w4, threads;   // ln_shift_mix_kernel's vector width and block size (its sum order)
    int total;         // blocks of the jobs (dec_fill); the grid runs them in contiguous runs
    unsigned *count;   // blocks done reading the old state (0 between launches)
};

// gemv_group_kernel after ln_shift_mix, in one launch of at most one block
// per SM (each block runs a contiguous run of the group's blocks, so the LN
// prologue is paid once per SM, not once per 8 columns). Every block forms
// the layernorm of the rows (moments summed as ln_shift_mix_kernel sums
// them: rp_row_moments with its block size, the same bits) and keeps it and
// the old token-shift state in shared memory; the block that counts last,
// when every block has read the old state, stores the new one. Each job's
// mix is formed from those when the run reaches the job. The W prefetch of
// the whole run still comes before the grid dependency sync. Nothing else
// reads xa, prev or the mixes, so they are never stored.
static __global__ void __launch_bounds__(DEC_THREADS, 2)
    gemv_group_ln_kernel(dec_jobs jobs, dec_ln ln) {
    __shared__ float part[8][DEC_MAX_M][32];
    __shared__ int last[1], state_last[1];
    __shared__ double red[32];
    extern __shared__ float dyn[];  // [3, M, C]: LN output, old state, the current mix
    const int C = ln.C, M = jobs.M;
    const size_t RC = (size_t)M * C;
    float *ln_out = dyn, *old = dyn + RC, *xs = dyn + 2 * RC;
    const int vb_begin = (int)((long long)blockIdx.x * ln.total / gridDim.x);
    const int vb_end = (int)((long long)(blockIdx.x + 1) * ln.total / gridDim.x);
    for (int vb = vb_begin; vb < vb_end; vb++) {
        const dec_job &j = jobs.job[dec_job_at(jobs, vb)];
        dec_prefetch(j, vb - j.block_begin);
    }
    // x (the residual stream) and the state: the kernels before wrote them.
    rp_pdl_wait();
    rp_pdl_trigger();
    for (int r = 0; r < M; r++) {
        const float *xr = ln.x + (size_t)r * C;
        const float *st = ln.state_base + (size_t)ln.slot[r] * ln.state_stride;
        float m, s;
        if (ln.w4)
            rp_row_moments<4>(xr, C, ln.eps, ln.threads, red, &m, &s);
        else
            rp_row_moments<1>(xr, C, ln.eps, ln.threads, red, &m, &s);
        for (int c = threadIdx.x; c < C; c += DEC_THREADS) {
            ln_out[(size_t)r * C + c] = rp_ln_value(xr[c], m, s, ln.weight[c], ln.bias[c]);
            old[(size_t)r * C + c] = st[c];
        }
    }
    __syncthreads();  // the old state read by the whole block
    if (threadIdx.x == 0) state_last[0] = atomicAdd(ln.count, 1u) == gridDim.x - 1;
    __syncthreads();
    if (state_last[0]) {  // the same for the whole block
        for (int r = 0; r < M; r++) {
            float *st = ln.state_base + (size_t)ln.slot[r] * ln.state_stride;
            for (int c = threadIdx.x; c < C; c += DEC_THREADS) st[c] = ln_out[(size_t)r * C + c];
        }
        if (threadIdx.x == 0) ln.count[0] = 0u;  // ready for the next launch (or graph replay)
    }
    const float *mu = nullptr;
    for (int vb = vb_begin; vb < vb_end; vb++) {
        const dec_job &j = jobs.job[dec_job_at(jobs, vb)];
        // the last run's GEMV is done with xs and part (dec_out_in has no barrier)
        __syncthreads();
        if (j.mu != mu) {
            mu = j.mu;
            for (size_t e = threadIdx.x; e < RC; e += DEC_THREADS)
                xs[e] = rp_mix_value(ln_out[e], old[e], mu[e % C]);
            __syncthreads();
        }
        dec_gemv(j, xs, M, vb - j.block_begin, part, last);
    }
}

// The split-K partials and tile counters: allocated once (the first decode
// step is eager, so never inside a graph capture), fixed size, counters
// zeroed once and reset by the kernel. 0 after a failure (recorded).
static int dec_split_buffers(rp_cuda_ctx *cx) {
    if (cx->dec_part) return 1;
    float *part = nullptr;
    unsigned *count = nullptr;
    if (!RP_CUDA_OK(cx, cudaMalloc((void **)&part, DEC_PART_FLOATS * sizeof(float)))) return 0;
    if (!RP_CUDA_OK(cx, cudaMalloc((void **)&count, (DEC_COUNTERS + 1) * sizeof(unsigned)))) {
        cudaFree(part);
        return 0;
    }
    if (!RP_CUDA_OK(cx, cudaMemsetAsync(count, 0, (DEC_COUNTERS + 1) * sizeof(unsigned), cx->stream))) {
        cudaFree(part);
        cudaFree(count);
        return 0;
    }
    // the LN prologue's shared memory (gemv_group_ln_kernel): past the 48 KiB default
    if (!RP_CUDA_OK(cx, cudaFuncSetAttribute(gemv_group_ln_kernel,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)(3 * DEC_LN_MAX_FLOATS * sizeof(float))))) {
        cudaFree(part);
        cudaFree(count);
        return 0;
    }
    cx->dec_part = part;
    cx->dec_count = count;
    return 1;
}

// One gemv_group launch of M <= DEC_LAUNCH_ROWS rows starting at row m0 of
// every job; split_ok 0: no split-K (the bits of the unfused GEMVs, for
// matmul_linear / matmul_lora of decode rows).
// The kernel arguments of one launch (dec_launch); returns its blocks.
static int dec_fill(rp_cuda_ctx *cx, const rp_gemv_job *jobs, int n_jobs, int m0, int M,
                    int split_ok, dec_jobs &p) {
    p.n_jobs = n_jobs;
    p.M = M;
    int blocks = 0;
    size_t part_at = 0;
    for (int i = 0; i < n_jobs; i++) {
        const rp_gemv_job *g = &jobs[i];
        dec_job &d = p.job[i];
        const __nv_bfloat16 *w16 = rp_cuda_weight_shadow(cx, g->w, (size_t)g->N * g->K);
        d.y = g->y + (size_t)m0 * g->N;
        d.x = g->x + (size_t)m0 * g->K;
        d.w = w16 ? (const void *)w16 : (const void *)g->w;
        d.w_bf16 = w16 != nullptr;
        d.bias = g->bias;
        d.N = g->N;
        d.K = g->K;
        d.in_out = g->w_in_out;
        const size_t esize = w16 ? sizeof(__nv_bfloat16) : sizeof(float);
        d.vec = (uintptr_t)d.w % 16 == 0 && (size_t)g->K * esize % 16 == 0;
        d.act = (int)g->act;
        d.mu = nullptr;
        d.epilogue = g->bias || g->act != RP_ACT_NONE;
        d.beta = g->beta;
        d.block_begin = blocks;
        d.tiles = (g->N + 31) / 32;
        d.split = 1;
        d.k_slice = g->K;
        d.part = nullptr;
        d.count = nullptr;
        // The split depends on the shape only, never on M: a row's bits too.
        if (split_ok && g->w_in_out && d.tiles <= DEC_SPLIT_MAX_TILES &&
            g->K >= 2 * DEC_SPLIT_MIN_K && dec_split_buffers(cx)) {
            int split = g->K / DEC_SPLIT_MIN_K;
            split = split > DEC_SPLIT_MAX ? DEC_SPLIT_MAX : split;
            d.k_slice = (g->K + split - 1) / split;
            d.k_slice = (d.k_slice + 7) / 8 * 8;  // each thread row starts on its own row
            d.split = (g->K + d.k_slice - 1) / d.k_slice;
            d.part = cx->dec_part + part_at;
            d.count = cx->dec_count + i * DEC_SPLIT_MAX_TILES;
            part_at += (size_t)d.split * M * g->N;
        }
        blocks += g->w_in_out ? d.tiles * d.split
                              : (g->N + DEC_THREADS / 32 - 1) / (DEC_THREADS / 32);
    }
    return blocks;
}

static void dec_launch(rp_cuda_ctx *cx, const rp_gemv_job *jobs, int n_jobs, int m0, int M,
                       int split_ok) {
    dec_jobs p;
    const int blocks = dec_fill(cx, jobs, n_jobs, m0, M, split_ok, p);
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = rp_cuda_pdl_config(cx, dim3((unsigned)blocks), dim3(DEC_THREADS), attr);
    // A launch error is also the last error, which RP_CUDA_LAUNCHED records.
    (void)cudaLaunchKernelEx(&cfg, gemv_group_kernel, p);
    RP_CUDA_LAUNCHED(cx, "gemv_group");
}

// Rows above DEC_LAUNCH_ROWS as several launches: each row's bits the same.
static void dec_run(rp_cuda_ctx *cx, const rp_gemv_job *jobs, int n_jobs, int M, int split_ok) {
    for (int m0 = 0; m0 < M; m0 += DEC_LAUNCH_ROWS)
        dec_launch(cx, jobs, n_jobs, m0, M - m0 < DEC_LAUNCH_ROWS ? M - m0 : DEC_LAUNCH_ROWS,
                   split_ok);
}

static void cuda_gemv_group(rp_backend *be, const rp_gemv_job *jobs, int n_jobs, int M) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (n_jobs <= 0 || M <= 0) return;
    if (n_jobs > RP_GEMV_JOBS_MAX) {
        rp_cuda_record(cx, cudaErrorInvalidValue, "gemv_group (more than RP_GEMV_JOBS_MAX jobs)",
                       __FILE__, __LINE__);
        return;
    }
    int fused = 1;
    for (int i = 0; i < n_jobs; i++)
        if (jobs[i].N <= 0 || jobs[i].K <= 0) fused = 0;
    if (!fused) {  // the separate ops, as the CPU twin
        for (int i = 0; i < n_jobs; i++) {
            const rp_gemv_job *g = &jobs[i];
            if (g->w_in_out)
                be->matmul_lora(be, g->y, g->x, g->w, M, g->N, g->K, g->beta);
            else
                be->matmul_linear(be, g->y, g->x, g->w, M, g->N, g->K, g->beta);
            if (g->bias || g->act != RP_ACT_NONE) be->bias_act(be, g->y, g->bias, M, g->N, g->act);
        }
        return;
    }
    dec_run(cx, jobs, n_jobs, M, 1);
}

// pre's mix that job x is, or -1.
static int dec_mix_of(const rp_ln_mix *pre, const float *x) {
    for (int i = 0; i < pre->n_mix; i++)
        if (pre->mix[i] == x) return i;
    return -1;
}

// One launch of gemv_group_ln_kernel when every sequence has one row, the
// rows' mixes fit in shared memory and every job reads a mix of C floats a
// row; else the two ops.
static void cuda_ln_mix_gemv_group(rp_backend *be, const rp_ln_mix *pre, const rp_batch *batch,
                                   const rp_gemv_job *jobs, int n_jobs) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int R = batch->n_rows, C = pre->C;
    int fused = R > 0 && batch->n_seq == R && R <= DEC_MAX_M && C > 0 &&
                (size_t)R * C <= DEC_LN_MAX_FLOATS && n_jobs > 0 &&
                n_jobs <= RP_GEMV_JOBS_MAX && pre->n_mix > 0 && pre->n_mix <= RP_MIX_MAX;
    for (int i = 0; i < n_jobs && fused; i++)
        if (jobs[i].N <= 0 || jobs[i].K != C || dec_mix_of(pre, jobs[i].x) < 0) fused = 0;
    if (!fused || !dec_split_buffers(cx)) {
        be->ln_shift_mix(be, pre->xa, pre->prev, pre->mix, pre->mu, pre->n_mix, pre->x,
                         pre->weight, pre->bias, pre->eps, pre->state_base, pre->state_stride,
                         batch, C);
        be->gemv_group(be, jobs, n_jobs, R);
        return;
    }
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    dec_jobs p;
    const int blocks = dec_fill(cx, jobs, n_jobs, 0, R, 1, p);
    for (int i = 0; i < n_jobs; i++) p.job[i].mu = pre->mu[dec_mix_of(pre, jobs[i].x)];
    dec_ln ln;
    memset(&ln, 0, sizeof ln);
    ln.x = pre->x;
    ln.weight = pre->weight;
    ln.bias = pre->bias;
    ln.eps = pre->eps;
    ln.state_base = pre->state_base;
    ln.state_stride = pre->state_stride;
    ln.slot = b.slot;
    ln.C = C;
    ln.w4 = rp_cuda_ln_shift_mix_shape(pre->xa, pre->prev, pre->mix, pre->mu, pre->n_mix,
                                       pre->x, pre->weight, pre->bias, pre->state_base,
                                       pre->state_stride, C, &ln.threads) == 4;
    ln.count = cx->dec_count + DEC_LN_COUNTER;
    ln.total = blocks;
    const int sms = cx->n_sm > 0 ? cx->n_sm : 1;
    const int grid = blocks < sms ? blocks : sms;
    cudaLaunchAttribute attr[1];
    cudaLaunchConfig_t cfg = rp_cuda_pdl_config(cx, dim3((unsigned)grid), dim3(DEC_THREADS), attr);
    cfg.dynamicSmemBytes = 3 * (size_t)R * C * sizeof(float);
    (void)cudaLaunchKernelEx(&cfg, gemv_group_ln_kernel, p, ln);
    RP_CUDA_LAUNCHED(cx, "gemv_group_ln");
}

// ---- decode rows (backend.h: set_decode_rows) ----

// Decode rows above RP_GEMV_MAX_M go through the GEMV kernel instead of
// cuBLAS, whose bits for a row may depend on M; up to RP_GEMV_MAX_M rows the
// unfused GEMVs (cuda_matmul.cu) run, which sum in the same order as
// gemv_group without split-K. Prefill and training keep cuBLAS.
static void dec_matmul(rp_backend *be, int in_out, float *y, const float *x, const float *w,
                       int M, int N, int K, float beta) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!cx->decode_rows || M <= RP_GEMV_MAX_M || N <= 0 || K <= 0) {
        (in_out ? cx->dec_base_lora : cx->dec_base_linear)(be, y, x, w, M, N, K, beta);
        return;
    }
    const rp_gemv_job job = {y, x, w, NULL, N, K, in_out, beta, RP_ACT_NONE};
    dec_run(cx, &job, 1, M, 0);
}

static void cuda_dec_matmul_linear(rp_backend *be, float *y, const float *x, const float *w,
                                   int M, int N, int K, float beta) {
    dec_matmul(be, 0, y, x, w, M, N, K, beta);
}

static void cuda_dec_matmul_lora(rp_backend *be, float *y, const float *x, const float *w, int M,
                                 int N, int K, float beta) {
    dec_matmul(be, 1, y, x, w, M, N, K, beta);
}

static void cuda_set_decode_rows(rp_backend *be, int on) { rp_cuda_of(be)->decode_rows = on; }

// ---- time_mix_heads ----

#define DEC_N 64
#define DEC_HEAD_THREADS 128

// The WKV7 kernels' column order of half p of a state row (cuda_wkv7.cu's
// wkv_col): the pair's sums then add in the same order as wkv7's.
static __device__ __forceinline__ int dec_col(int jj, int p) {
    return (jj & 15) + 16 * p + 32 * (jj >> 4);
}

static __device__ __forceinline__ float dec_warp_sum_float(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(DEC_FULL_MASK, v, off);
    return __shfl_sync(DEC_FULL_MASK, v, 0);
}

static __device__ __forceinline__ float dec_pair_total(float a0, float a1, float a2, float a3) {
    const float part = (a0 + a1) + (a2 + a3);
    return part + __shfl_xor_sync(DEC_FULL_MASK, part, 1);
}

struct dec_heads {
    rp_time_mix_heads a;
    const int32_t *row_begin, *slot;
};

// Per-token vectors of the head in shared memory.
enum { HV_R = 0, HV_D, HV_K, HV_A, HV_B, HV_V, HV_Y, HV_COUNT };

// grid (n_seq, H), 128 threads; every sequence has one row. Warp 0 does the
// per-channel work (lane j owns channels j and j + 32, as the warp-per-head
// kernels); the WKV step uses all threads as wkv7_forward_kernel: thread
// (i = tid / 2, p = tid % 2) holds half of state row i.
static __global__ void __launch_bounds__(DEC_HEAD_THREADS) time_mix_heads_kernel(dec_heads q) {
    __shared__ __align__(16) float vec[HV_COUNT * DEC_N];
    const rp_time_mix_heads &a = q.a;
    const int s = blockIdx.x, h = blockIdx.y, C = a.C;
    // Everything it reads but the parameters comes from the kernels before
    // (PDL: only the launch overlaps their tail).
    rp_pdl_wait();
    rp_pdl_trigger();
    const size_t o = (size_t)q.row_begin[s] * C + (size_t)h * DEC_N;
    const int hc = h * DEC_N;  // first channel of the head in [C] vectors
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        const int c[2] = {lane, lane + 32};
        float t[2];
        // value residual (layer 0: v is v_first)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            float vv = a.v[o + c[u]];
            if (a.nu) {
                vv = vv + (a.v_first[o + c[u]] - vv) * a.nu[o + c[u]];
                a.v[o + c[u]] = vv;
            } else {
                a.v_first[o + c[u]] = vv;
            }
            vec[HV_V * DEC_N + c[u]] = vv;
            t[u] = a.k[o + c[u]] * a.k_k[hc + c[u]];
        }
        // key prepare
        const float sq = dec_warp_sum_float(t[0] * t[0] + t[1] * t[1]);
        const float norm = sqrtf(sq);
        const float inv = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const size_t e = o + c[u];
            const float kk = t[u] * inv, iclr = a.a[e];
            a.kk[e] = kk;
            float kv = a.k[e];
            kv *= 1.0f + (iclr - 1.0f) * a.k_a[hc + c[u]];
            a.k[e] = kv;
            vec[HV_R * DEC_N + c[u]] = a.r[e];
            vec[HV_D * DEC_N + c[u]] = rp_decayf(a.w_raw[e]);
            vec[HV_K * DEC_N + c[u]] = kv;
            vec[HV_A * DEC_N + c[u]] = -kk;
            vec[HV_B * DEC_N + c[u]] = kk * iclr;
        }
    }
    // the WKV7 step: S = S diag(d) + (S a) b^T + v k^T, y = S r
    const int i = threadIdx.x >> 1, p = threadIdx.x & 1;
    float *state = a.state_base + (size_t)q.slot[s] * a.state_stride + (size_t)h * DEC_N * DEC_N +
                   (size_t)i * DEC_N;
    float st[DEC_N / 2];
#pragma unroll
    for (int jj = 0; jj < DEC_N / 2; jj++) st[jj] = state[dec_col(jj, p)];
    __syncthreads();
    const float *R = vec + HV_R * DEC_N, *D = vec + HV_D * DEC_N, *K = vec + HV_K * DEC_N,
                *A = vec + HV_A * DEC_N, *B = vec + HV_B * DEC_N;
    const float v_i = vec[HV_V * DEC_N + i];
    float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
#pragma unroll
    for (int jq = 0; jq < DEC_N / 8; jq++) {
        const int j = dec_col(4 * jq, p);
        c0 = __fmaf_rn(st[4 * jq + 0], A[j + 0], c0);
        c1 = __fmaf_rn(st[4 * jq + 1], A[j + 1], c1);
        c2 = __fmaf_rn(st[4 * jq + 2], A[j + 2], c2);
        c3 = __fmaf_rn(st[4 * jq + 3], A[j + 3], c3);
    }
    const float sa = dec_pair_total(c0, c1, c2, c3);
    c0 = c1 = c2 = c3 = 0.0f;
#pragma unroll
    for (int jq = 0; jq < DEC_N / 8; jq++) {
        const int j = dec_col(4 * jq, p);
        float *s4 = st + 4 * jq;
#pragma unroll
        for (int e = 0; e < 4; e++)
            s4[e] = __fmaf_rn(s4[e], D[j + e], __fmaf_rn(sa, B[j + e], __fmul_rn(v_i, K[j + e])));
        c0 = __fmaf_rn(s4[0], R[j + 0], c0);
        c1 = __fmaf_rn(s4[1], R[j + 1], c1);
        c2 = __fmaf_rn(s4[2], R[j + 2], c2);
        c3 = __fmaf_rn(s4[3], R[j + 3], c3);
    }
    const float yi = dec_pair_total(c0, c1, c2, c3);
#pragma unroll
    for (int jj = 0; jj < DEC_N / 2; jj++) state[dec_col(jj, p)] = st[jj];
    if (p == 0) {
        vec[HV_Y * DEC_N + i] = yi;
        a.y[o + i] = yi;
    }
    __syncthreads();
    if (threadIdx.x >= 32) return;
    // group norm of the head (as groupnorm_kernel), then bonus and gate (as bonus_gate_kernel)
    const int lane = threadIdx.x;
    const float *Y = vec + HV_Y * DEC_N;
    float m, rs;
    rp_warp_group_moments(Y, DEC_N, a.gn_eps, lane, &m, &rs);
    float bonus = 0.0f;
    for (int j = lane; j < DEC_N; j += 32) bonus += R[j] * K[j] * a.r_k[hc + j];
    bonus = dec_warp_sum_float(bonus);
    for (int j = lane; j < DEC_N; j += 32) {
        const float gn = (Y[j] - m) * rs * a.ln_x_weight[hc + j] + a.ln_x_bias[hc + j];
        a.out[o + j] = (gn + bonus * vec[HV_V * DEC_N + j]) * a.g[o + j];
    }
}

static void cuda_time_mix_heads(rp_backend *be, const rp_time_mix_heads *a,
                                const rp_batch *batch) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (batch->n_seq <= 0 || a->C <= 0) return;
    int step = a->N == DEC_N && a->C % DEC_N == 0;
    for (int s = 0; s < batch->n_seq && step; s++)
        if (batch->seq_len[s] != 1) step = 0;
    if (!step) {  // the separate ops, as the CPU twin
        const int R = batch->n_rows, C = a->C, N = a->N;
        if (a->nu)
            be->value_residual(be, a->v, a->v_first, a->nu, R, C);
        else
            be->copy(be, a->v_first, a->v, (size_t)R * C * sizeof(float));
        be->key_prepare(be, a->kk, a->k, a->a, a->k_k, a->k_a, R, C, N);
        be->wkv7(be, a->y, a->r, a->w_raw, a->k, a->v, a->kk, a->a, a->state_base,
                 a->state_stride, batch, C, N);
        be->groupnorm(be, a->out, NULL, NULL, a->y, a->ln_x_weight, a->ln_x_bias, R, C, N,
                      a->gn_eps);
        be->bonus_gate(be, a->out, a->r, a->k, a->v, a->r_k, a->g, R, C, N);
        return;
    }
    rp_cuda_batch b;
    if (!rp_cuda_upload_batch(cx, batch, &b)) return;
    dec_heads q;
    q.a = *a;
    q.row_begin = b.row_begin;
    q.slot = b.slot;
    const dim3 grid((unsigned)batch->n_seq, (unsigned)(a->C / DEC_N));
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = rp_cuda_pdl_config(cx, grid, dim3(DEC_HEAD_THREADS), attr);
    (void)cudaLaunchKernelEx(&cfg, time_mix_heads_kernel, q);
    RP_CUDA_LAUNCHED(cx, "time_mix_heads");
}

// ---- programmatic dependent launch (cuda_internal.h) ----

// On unless RWKVPIPE_CUDA_PDL=0, on an sm_90+ device with CUDA 12.3+ (stream
// capture keeps programmatic edges in the step graphs) and kernels compiled
// for sm_90+ (rp_pdl_wait is compiled out below that, and a PDL launch of a
// kernel without it would race). Decided once per context, at its first
// decode launch (the eager warm-up step, never inside a capture).
static int dec_pdl_on(rp_cuda_ctx *cx) {
    if (cx->pdl) return cx->pdl == 2;
    const char *env = getenv("RWKVPIPE_CUDA_PDL");
    int on = !(env && !strcmp(env, "0"));
    int major = 0, runtime = 0, driver = 0;
    cudaFuncAttributes fa;
    memset(&fa, 0, sizeof fa);
    if (on && (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cx->device) !=
                   cudaSuccess ||
               cudaRuntimeGetVersion(&runtime) != cudaSuccess ||
               cudaDriverGetVersion(&driver) != cudaSuccess ||
               cudaFuncGetAttributes(&fa, gemv_group_kernel) != cudaSuccess)) {
        cudaGetLastError();  // a failed query only turns PDL off
        on = 0;
    }
    if (major < 9 || runtime < 12030 || driver < 12030 || fa.ptxVersion < 90) on = 0;
    cx->pdl = on ? 2 : 1;
    return on;
}

cudaLaunchConfig_t rp_cuda_pdl_config(rp_cuda_ctx *cx, dim3 grid, dim3 block,
                                      cudaLaunchAttribute *attr) {
    cudaLaunchConfig_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = 0;
    cfg.stream = cx->stream;
    memset(attr, 0, sizeof *attr);
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = dec_pdl_on(cx) ? 1 : 0;
    return cfg;
}

// After rp_cuda_install_matmul: wraps its matmul_linear / matmul_lora.
void rp_cuda_install_decode(rp_backend *be) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    cx->dec_base_linear = be->matmul_linear;
    cx->dec_base_lora = be->matmul_lora;
    be->matmul_linear = cuda_dec_matmul_linear;
    be->matmul_lora = cuda_dec_matmul_lora;
    be->set_decode_rows = cuda_set_decode_rows;
    be->gemv_group = cuda_gemv_group;
    be->ln_mix_gemv_group = cuda_ln_mix_gemv_group;
    be->time_mix_heads = cuda_time_mix_heads;
}
