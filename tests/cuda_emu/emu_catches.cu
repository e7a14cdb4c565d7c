// Small CUDA programs with one mistake each that a GPU punishes only sometimes
// (a missing stream sync, a pinned buffer reused too early, a race): the
// emulator must report each one. Each case also has a correct variant that
// must pass, so the checks cannot pass by rejecting everything. Compiled like
// cuda/*.cu (pre.py) over the emulated runtime; run by test_emu_catches.sh.
#include <cuda_runtime.h>
#include <mma.h>
#include <cstdio>
#include <cstring>

#define N 64
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); return 2; } } while (0)

__global__ void fill(float *p, float v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = v;
}
__global__ void twice(float *out, const float *in, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 2.0f * in[i];
}

// Each thread reads its neighbour's shared slot: needs a barrier between.
__global__ void neighbour(float *out, int fixed) {
    __shared__ float buf[N];
    buf[threadIdx.x] = (float)threadIdx.x;
    if (fixed) __syncthreads();
    out[threadIdx.x] = buf[(threadIdx.x + 1) % N];
}
// The same within one warp: __syncwarp orders the lanes.
__global__ void warp_neighbour(float *out, int fixed) {
    __shared__ float buf[32];
    buf[threadIdx.x] = (float)threadIdx.x;
    if (fixed) __syncwarp();
    out[threadIdx.x] = buf[(threadIdx.x + 1) % 32];
}
// A warp matrix product whose lanes pass different pointers (a GPU computes
// garbage, silently). Fixed: ones [16,16] x ones [16,16] = 16 everywhere.
__global__ void wmma_lanes(float *out, int fixed) {
    namespace wmma = nvcuda::wmma;
    __shared__ __align__(32) __nv_bfloat16 ones[2 * 256];
    __shared__ __align__(32) float prod[256];
    for (int e = threadIdx.x; e < 2 * 256; e += 32) ones[e] = __float2bfloat16_rn(1.0f);
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, ones + (fixed || threadIdx.x < 16 ? 0 : 256), 16);
    wmma::load_matrix_sync(fb, ones, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(prod, acc, 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = threadIdx.x; e < 256; e += 32) out[e] = prod[e];
}
// Two warps wait at different barriers.
__global__ void two_barriers(float *out, int fixed) {
    if (fixed || threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}
// The second warp returns early, the first waits at a barrier.
__global__ void early_exit(float *out, int fixed) {
    if (!fixed && threadIdx.x >= 32) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
// One thread too many writes past the end (or before the start).
__global__ void past_end(float *p, int n, int fixed) {
    int i = threadIdx.x;
    if (fixed ? i < n : i <= n) p[i] = 1.0f;
}
__global__ void before_start(float *p, int n, int fixed) {
    int i = (int)threadIdx.x - (fixed ? 0 : 1);
    if (i < n) p[i] = 1.0f;
}

// Programmatic dependent launch: out = w * x, the weights w loaded before the
// grid dependency sync (they do not depend on the kernel before), x after it;
// early: x read before the sync, the mistake PDL invites.
__global__ void pdl_scale(float *out, const float *x, const float *w, int n, int early) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float wi = i < n ? w[i] : 0.0f, xi = 0.0f;
    if (early && i < n) xi = x[i];
    cudaGridDependencySynchronize();
    if (!early && i < n) xi = x[i];
    cudaTriggerProgrammaticLaunchCompletion();
    if (i < n) out[i] = wi * xi;
}
// A PDL copy; trigger_first: its dependents may start before it waited for
// the kernel before it, so they may overlap that one too.
__global__ void pdl_copy(float *out, const float *in, int n, int trigger_first) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (trigger_first) cudaTriggerProgrammaticLaunchCompletion();
    cudaGridDependencySynchronize();
    if (!trigger_first) cudaTriggerProgrammaticLaunchCompletion();
    if (i < n) out[i] = in[i];
}

static float read_host(const float *p) { return *(const volatile float *)p; }

// A device-to-host copy into pinned memory is read before the stream was synchronized.
static int host_read(bool fixed) {
    float *d, *h;
    cudaStream_t s;
    CK(cudaMalloc(&d, N * 4)); CK(cudaMallocHost(&h, N * 4));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    fill<<<1, N, 0, s>>>(d, 3.0f, N);
    CK(cudaMemcpyAsync(h, d, N * 4, cudaMemcpyDeviceToHost, s));
    if (fixed) CK(cudaStreamSynchronize(s));
    float v = read_host(&h[N - 1]);
    printf("h[N-1] = %g\n", v);
    return v == 3.0f ? 0 : 1;
}

// A pinned staging buffer is refilled while the copy out of it is still queued.
static int pinned_reuse(bool fixed) {
    float *d, *h, back[N];
    cudaStream_t s;
    cudaEvent_t done;
    CK(cudaMalloc(&d, N * 4)); CK(cudaMallocHost(&h, N * 4));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    for (int i = 0; i < N; i++) h[i] = 1.0f;
    CK(cudaMemcpyAsync(d, h, N * 4, cudaMemcpyHostToDevice, s));
    CK(cudaEventRecord(done, s));
    if (fixed) CK(cudaEventSynchronize(done));
    for (int i = 0; i < N; i++) h[i] = 2.0f;  // the next upload
    CK(cudaMemcpyAsync(back, d, N * 4, cudaMemcpyDeviceToHost, s));
    CK(cudaStreamSynchronize(s));
    return back[0] == 1.0f ? 0 : 1;
}

// Device memory is freed while a queued kernel still writes it.
static int free_queued(bool fixed) {
    float *d;
    cudaStream_t s;
    CK(cudaMalloc(&d, N * 4));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    fill<<<1, N, 0, s>>>(d, 1.0f, N);
    if (fixed) CK(cudaStreamSynchronize(s));
    CK(cudaFree(d));
    CK(cudaStreamSynchronize(s));
    return 0;
}

// A pinned buffer is freed while a queued copy still reads it.
static int freehost_queued(bool fixed) {
    float *d, *h;
    cudaStream_t s;
    CK(cudaMalloc(&d, N * 4)); CK(cudaMallocHost(&h, N * 4));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    memset(h, 0, N * 4);
    CK(cudaMemcpyAsync(d, h, N * 4, cudaMemcpyHostToDevice, s));
    if (fixed) CK(cudaStreamSynchronize(s));
    CK(cudaFreeHost(h));
    CK(cudaStreamSynchronize(s));
    return 0;
}

// cudaMemcpy on the legacy stream is not ordered before a kernel on a
// non-blocking stream (the tests/gpu/test_nccl.c mistake); a blocking stream,
// or an event the stream waits for, orders them.
static int legacy_order(int how /* 0 non-blocking, 1 blocking stream, 2 event */) {
    float *in, *out, host[N], back[N];
    cudaStream_t s;
    cudaEvent_t e;
    CK(cudaMalloc(&in, N * 4)); CK(cudaMalloc(&out, N * 4));
    CK(cudaStreamCreateWithFlags(&s, how == 1 ? 0 : cudaStreamNonBlocking));
    CK(cudaEventCreate(&e));
    for (int i = 0; i < N; i++) host[i] = (float)i;
    CK(cudaMemcpy(in, host, sizeof host, cudaMemcpyHostToDevice));
    if (how == 2) { CK(cudaEventRecord(e, 0)); CK(cudaStreamWaitEvent(s, e, 0)); }
    twice<<<1, N, 0, s>>>(out, in, N);
    CK(cudaMemcpyAsync(back, out, sizeof back, cudaMemcpyDeviceToHost, s));
    CK(cudaStreamSynchronize(s));
    for (int i = 0; i < N; i++)
        if (back[i] != 2.0f * (float)i) {
            fprintf(stderr, "stale input: out[%d] = %g, expected %g\n", i, back[i], 2.0f * (float)i);
            return 1;
        }
    return 0;
}

// One launch of a block-level kernel on the legacy stream, then a sync.
static int block_case(void (*k)(float *, int), int threads, bool fixed) {
    float *out;
    CK(cudaMalloc(&out, N * 4));
    k<<<1, threads>>>(out, fixed ? 1 : 0);
    CK(cudaDeviceSynchronize());
    CK(cudaFree(out));
    return 0;
}
static int wmma_case(bool fixed) {
    float *out, host[256];
    CK(cudaMalloc(&out, sizeof host));
    wmma_lanes<<<1, 32>>>(out, fixed ? 1 : 0);
    CK(cudaMemcpy(host, out, sizeof host, cudaMemcpyDeviceToHost));
    CK(cudaFree(out));
    for (int e = 0; e < 256; e++)
        if (host[e] != 16.0f) {
            fprintf(stderr, "wmma: element %d of ones x ones is %g, not 16\n", e, host[e]);
            return 1;
        }
    return 0;
}
static int smem_race(bool fixed) { return block_case(neighbour, N, fixed); }
static int warp_race(bool fixed) { return block_case(warp_neighbour, 32, fixed); }
static int barrier_sites(bool fixed) { return block_case(two_barriers, N, fixed); }
static int barrier_exit(bool fixed) { return block_case(early_exit, N, fixed); }
static int oob(void (*k)(float *, int, int), bool fixed) {
    float *p;
    CK(cudaMalloc(&p, N * 4));
    k<<<1, N + 1>>>(p, N, fixed ? 1 : 0);
    CK(cudaDeviceSynchronize());
    CK(cudaFree(p));
    return 0;
}
static int oob_after(bool fixed) { return oob(past_end, fixed); }
static int oob_before(bool fixed) { return oob(before_start, fixed); }

// A graph of (pinned -> device copy, kernel, device -> pinned copy) captured
// once and replayed with new inputs; the mistake happens inside the capture:
// an allocation, a host sync, or a copy from pageable memory (which a replay
// would not read again). CUDA invalidates such a capture: EndCapture fails.
static int graph_case(int mistake /* 0 cudaMalloc, 1 sync, 2 pageable copy */, bool fixed) {
    float *in, *out, *h_in, *h_out, *extra = NULL, pageable[N];
    cudaStream_t s;
    CK(cudaMalloc(&in, N * 4)); CK(cudaMalloc(&out, N * 4));
    CK(cudaMallocHost(&h_in, N * 4)); CK(cudaMallocHost(&h_out, N * 4));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    if (fixed && mistake == 0) CK(cudaMalloc(&extra, N * 4));
    for (int i = 0; i < N; i++) h_in[i] = pageable[i] = 0.0f;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    if (!fixed && mistake == 0) (void)cudaMalloc(&extra, N * 4);
    if (!fixed && mistake == 1) (void)cudaStreamSynchronize(s);
    (void)cudaMemcpyAsync(in, !fixed && mistake == 2 ? pageable : h_in, N * 4,
                          cudaMemcpyHostToDevice, s);
    twice<<<1, N, 0, s>>>(out, in, N);
    (void)cudaMemcpyAsync(h_out, out, N * 4, cudaMemcpyDeviceToHost, s);
    cudaGraph_t g;
    cudaGraphExec_t e;
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&e, g, 0));
    for (int step = 1; step <= 3; step++) {
        for (int i = 0; i < N; i++) h_in[i] = pageable[i] = (float)(step * 100 + i);
        CK(cudaGraphLaunch(e, s));
        CK(cudaStreamSynchronize(s));
        for (int i = 0; i < N; i++)
            if (h_out[i] != 2.0f * (float)(step * 100 + i)) {
                fprintf(stderr, "replay %d: out[%d] = %g\n", step, i, h_out[i]);
                return 1;
            }
    }
    CK(cudaGraphExecDestroy(e)); CK(cudaGraphDestroy(g));
    return 0;
}
static int graph_malloc(bool fixed) { return graph_case(0, fixed); }
static int graph_sync(bool fixed) { return graph_case(1, fixed); }
static int graph_pageable(bool fixed) { return graph_case(2, fixed); }

// PDL (cudaLaunchKernelEx with programmatic stream serialization).
// early_read: the dependent reads its predecessor's output before
// cudaGridDependencySynchronize. chain: a middle kernel triggers its
// dependents before its own sync, so the last one may overlap the first and
// must not load the first one's output (as its "weights") before its sync.
static int pdl_case(int mistake /* 0 early read, 1 trigger chain */, bool fixed) {
    float *x, *w, *y, *out, host[N];
    cudaStream_t s;
    CK(cudaMalloc(&x, N * 4)); CK(cudaMalloc(&w, N * 4));
    CK(cudaMalloc(&y, N * 4)); CK(cudaMalloc(&out, N * 4));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(1); cfg.blockDim = dim3(N); cfg.stream = s; cfg.attrs = attr; cfg.numAttrs = 1;
    fill<<<1, N, 0, s>>>(w, 2.0f, N);
    fill<<<1, N, 0, s>>>(x, 3.0f, N);
    float want = 6.0f;
    if (mistake == 0) {
        CK(cudaLaunchKernelEx(&cfg, pdl_scale, out, (const float *)x, (const float *)w, N, fixed ? 0 : 1));
    } else {
        CK(cudaLaunchKernelEx(&cfg, pdl_copy, out, (const float *)x, N, fixed ? 0 : 1));  // out = x
        CK(cudaLaunchKernelEx(&cfg, pdl_scale, y, (const float *)out, (const float *)x, N, 0));  // y = x * out
        want = 9.0f;
    }
    CK(cudaMemcpyAsync(host, mistake == 0 ? out : y, sizeof host, cudaMemcpyDeviceToHost, s));
    CK(cudaStreamSynchronize(s));
    for (int i = 0; i < N; i++)
        if (host[i] != want) { fprintf(stderr, "pdl: out[%d] = %g, expected %g\n", i, host[i], want); return 1; }
    return 0;
}
static int pdl_early_read(bool fixed) { return pdl_case(0, fixed); }
static int pdl_trigger_chain(bool fixed) { return pdl_case(1, fixed); }

struct named_case { const char *name; int (*run)(bool fixed); };
static int legacy_case(bool fixed) { return legacy_order(fixed ? 1 : 0); }
static int legacy_event(bool fixed) { return legacy_order(fixed ? 2 : 0); }
static const named_case cases[] = {
    {"host_read", host_read}, {"pinned_reuse", pinned_reuse}, {"free_queued", free_queued},
    {"freehost_queued", freehost_queued}, {"legacy_order", legacy_case}, {"legacy_event", legacy_event},
    {"smem_race", smem_race}, {"warp_race", warp_race}, {"barrier_sites", barrier_sites},
    {"barrier_exit", barrier_exit}, {"oob_after", oob_after}, {"oob_before", oob_before},
    {"graph_malloc", graph_malloc}, {"graph_sync", graph_sync}, {"graph_pageable", graph_pageable},
    {"wmma_lanes", wmma_case}, {"pdl_early_read", pdl_early_read}, {"pdl_trigger_chain", pdl_trigger_chain},
};

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[2], "bad") && strcmp(argv[2], "fixed"))) {
        fprintf(stderr, "usage: emu_catches CASE bad|fixed\n");
        return 2;
    }
    for (const named_case &c : cases)
        if (!strcmp(c.name, argv[1])) return c.run(!strcmp(argv[2], "fixed"));
    fprintf(stderr, "emu_catches: unknown case '%s'\n", argv[1]);
    return 2;
}
