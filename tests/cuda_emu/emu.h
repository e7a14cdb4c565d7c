// CPU emulation of the CUDA runtime, cuBLAS and device code used by rwkvpipe's
// cuda/*.cu. Each CUDA thread is a ucontext fiber; blocks run one after another;
// __syncthreads and warp shuffles are scheduling points.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <algorithm>

// cuda/*.cu compiled over this emulator (device-side PDL calls are emulated).
#define RP_CUDA_EMU 1
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static_assert(sizeof(float4) == 16, "");

// ---- bf16 ----
struct __nv_bfloat16 { unsigned short x; };
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = (unsigned short)((u >> 16) | 0x40); return r; }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.x = (unsigned short)(u >> 16);
    return r;
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
static inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = (uint32_t)b.x << 16; float f; memcpy(&f, &u, 4); return f; }

// ---- intrinsics ----
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }

// CUDA's global min/max overloads (mixed signedness goes unsigned like CUDA's).
template <class A, class B> static inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type T; return (T)a > (T)b ? (T)a : (T)b; }
template <class A, class B> static inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type T; return (T)a < (T)b ? (T)a : (T)b; }

// ---- scheduling points ----
// The call site identifies the barrier: threads of a block waiting at
// different __syncthreads are reported (barrier divergence).
void rp_emu_syncthreads(const char *file, int line);
#define __syncthreads() rp_emu_syncthreads(__FILE__, __LINE__)
void rp_emu_warp_exchange(uint64_t in, unsigned mask, uint64_t *all /* [32] out */);
void *rp_emu_dyn_smem();
void rp_emu_poison(void *p, size_t n, const char *name = "__shared__");
template <class T> static inline uint64_t rp_emu_pack(T v) { static_assert(sizeof(T) <= 8, ""); uint64_t u = 0; memcpy(&u, &v, sizeof v); return u; }
template <class T> static inline T rp_emu_unpack(uint64_t u) { T v; memcpy(&v, &u, sizeof v); return v; }
static inline unsigned rp_emu_lane() { return (threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y) & 31; }
template <class T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    uint64_t all[32]; rp_emu_warp_exchange(rp_emu_pack(v), mask, all);
    unsigned lane = rp_emu_lane(); unsigned base = lane & ~(unsigned)(width - 1);
    return rp_emu_unpack<T>(all[base + ((unsigned)src & (unsigned)(width - 1))]);
}
template <class T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    uint64_t all[32]; rp_emu_warp_exchange(rp_emu_pack(v), mask, all);
    unsigned lane = rp_emu_lane(); unsigned w = lane & (unsigned)(width - 1);
    return w + d < (unsigned)width ? rp_emu_unpack<T>(all[lane + d]) : v;
}
template <class T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    uint64_t all[32]; rp_emu_warp_exchange(rp_emu_pack(v), mask, all);
    unsigned lane = rp_emu_lane(); unsigned w = lane & (unsigned)(width - 1);
    return w >= d ? rp_emu_unpack<T>(all[lane - d]) : v;
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    uint64_t all[32]; rp_emu_warp_exchange(rp_emu_pack(v), mask, all);
    unsigned lane = rp_emu_lane(); unsigned src = lane ^ (unsigned)m;
    if ((src & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) return v;
    return rp_emu_unpack<T>(all[src]);
}
// wmma (mma.h): function f's arguments (a, b) must be the same on all 32
// lanes of the warp (a warp exchange); a bad pointer or ldm is fatal.
void rp_emu_wmma_agree(const char *f, uint64_t a, uint64_t b);
[[noreturn]] void rp_emu_wmma_fail(const char *f, uint64_t ptr, unsigned ldm);
static inline void __syncwarp(unsigned mask = 0xffffffffu) { uint64_t all[32]; rp_emu_warp_exchange(0, mask, all); }
// Blocks run one after another, so an atomic needs no more than a plain
// read-modify-write; __threadfence has nothing to order.
static inline unsigned atomicAdd(unsigned *p, unsigned v) { unsigned o = *p; *p = o + v; return o; }
static inline void __threadfence(void) {}

// ---- runtime ----
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2,
       cudaErrorInvalidConfiguration = 9, cudaErrorNoDevice = 100, cudaErrorNotReady = 600,
       cudaErrorLaunchFailure = 719, cudaErrorStreamCaptureUnsupported = 900,
       cudaErrorStreamCaptureInvalidated = 901, cudaErrorStreamCaptureImplicit = 906 };
typedef struct rp_emu_stream *cudaStream_t;
typedef struct rp_emu_event *cudaEvent_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                      cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
                         cudaFuncAttributePreferredSharedMemoryCarveout = 9 };
enum { cudaSharedmemCarveoutMaxShared = 100, cudaSharedmemCarveoutDefault = -1 };
#define cudaStreamNonBlocking 0x01
#define cudaEventDisableTiming 0x02
struct cudaDeviceProp { char name[256]; int major, minor; size_t totalGlobalMem; int multiProcessorCount; };
// The driver's VMM calls (cuda.h, emulated): cuda_backend.cu's sparse
// buffers compile and run here as with a CUDA 12.5+ toolkit.
#define RP_EMU_VMM 1
enum cudaDriverEntryPointQueryResult { cudaDriverEntryPointSuccess = 0, cudaDriverEntryPointSymbolNotFound = 1,
                                       cudaDriverEntryPointVersionNotSufficent = 2 };
enum { cudaEnableDefault = 0 };
cudaError_t cudaGetDriverEntryPointByVersion(const char *symbol, void **fn, unsigned cuda_version,
                                             unsigned long long flags,
                                             cudaDriverEntryPointQueryResult *status = nullptr);

cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d);
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d);
cudaError_t cudaRuntimeGetVersion(int *v);
cudaError_t cudaDriverGetVersion(int *v);
const char *cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaMalloc_(void **p, size_t n);
template <class T> static inline cudaError_t cudaMalloc(T **p, size_t n) { return cudaMalloc_((void **)p, n); }
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocHost_(void **p, size_t n);
template <class T> static inline cudaError_t cudaMallocHost(T **p, size_t n) { return cudaMallocHost_((void **)p, n); }
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k);
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t st = 0);
cudaError_t cudaMemset(void *d, int v, size_t n);
cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t st = 0);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned f);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaStreamQuery(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
// Graphs: stream capture records the ops queued on the stream and a launch
// queues them again; a host sync, allocation, free, pageable copy or
// legacy-stream work during a capture invalidates it (as CUDA's global mode).
typedef struct rp_emu_graph *cudaGraph_t;
typedef struct rp_emu_graph_exec *cudaGraphExec_t;
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal = 0, cudaStreamCaptureModeThreadLocal = 1,
                             cudaStreamCaptureModeRelaxed = 2 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1,
                               cudaStreamCaptureStatusInvalidated = 2 };
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *st);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *e, cudaGraph_t g, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e);
cudaError_t cudaGraphDestroy(cudaGraph_t g);
cudaError_t rp_emu_func_set_attribute(const void *f, int attr, int value);
// The kernels' compiled architecture: the emulator stands for sm_90 code.
struct cudaFuncAttributes { int ptxVersion, binaryVersion; };
template <class F> static inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, F) {
    a->ptxVersion = a->binaryVersion = 90; return cudaSuccess; }

// ---- programmatic dependent launch (sm_90) ----
enum cudaLaunchAttributeID { cudaLaunchAttributeIgnore = 0, cudaLaunchAttributeProgrammaticStreamSerialization = 6 };
union cudaLaunchAttributeValue { char pad[64]; int programmaticStreamSerializationAllowed; };
struct cudaLaunchAttribute { cudaLaunchAttributeID id; char pad[4]; cudaLaunchAttributeValue val; };
struct cudaLaunchConfig_t { dim3 gridDim; dim3 blockDim; size_t dynamicSmemBytes; cudaStream_t stream;
                            cudaLaunchAttribute *attrs; unsigned int numAttrs; };
// Device side: the calling thread waits until the preceding kernel of a PDL
// launch completed, its writes visible (a no-op in other launches); the
// trigger lets the next PDL kernel start once every block called it or exited.
void cudaGridDependencySynchronize();
void cudaTriggerProgrammaticLaunchCompletion();
template <class F> static inline cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute a, int v) {
    return rp_emu_func_set_attribute((const void *)f, (int)a, v); }

// ---- launch ----
// pdl: launched with cudaLaunchAttributeProgrammaticStreamSerialization (via
// cudaLaunchKernelEx): the kernel may start before its predecessor on the
// stream finished, so until a thread calls cudaGridDependencySynchronize it
// must not touch what that predecessor writes (checked, see emu.cpp).
struct rp_emu_cfg { dim3 grid, block; size_t shmem; cudaStream_t stream; bool pdl; };
static inline rp_emu_cfg rp_emu_config(dim3 g, dim3 b, size_t sh = 0, cudaStream_t s = 0) { return {g, b, sh, s, false}; }
// Checks a pointer argument and notes its allocation as used by the launch
// being queued (cudaFree of it before the launch ran is an error).
void rp_emu_check_ptr(const char *kernel, int arg, const void *p);
// Checks the configuration and queues the launch on cfg.stream; it runs at a
// sync point (tests/cuda_emu/README.md), so the arguments are held by value.
void rp_emu_run(const char *kernel, const void *fn, const rp_emu_cfg &cfg, std::function<void()> body);
template <class T> static inline void rp_emu_arg(const char *k, int i, const T &v) {
    if constexpr (std::is_pointer<T>::value) rp_emu_check_ptr(k, i, (const void *)v);
}
template <class... P, class... A>
static void rp_emu_launch(const char *name, rp_emu_cfg cfg, void (*fn)(P...), A &&...a) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
    auto args = std::make_shared<std::tuple<typename std::decay<P>::type...>>(std::forward<A>(a)...);
    int i = 0;
    std::apply([&](const auto &...v) { (rp_emu_arg(name, i++, v), ...); }, *args);
    rp_emu_run(name, (const void *)fn, cfg, [fn, args] { std::apply(fn, *args); });
}
// pre.py rewrites cudaLaunchKernelEx(cfg, kernel, args) into this call, with
// the kernel's name: the launch checks and counters see it as <<<>>> would.
cudaError_t rp_emu_launch_ex_cfg(const char *name, const cudaLaunchConfig_t *c, rp_emu_cfg *out);
template <class... P, class... A>
static inline cudaError_t rp_emu_launch_ex(const cudaLaunchConfig_t *c, const char *name, void (*fn)(P...), A &&...a) {
    rp_emu_cfg cfg;
    if (rp_emu_launch_ex_cfg(name, c, &cfg) != cudaSuccess) return cudaPeekAtLastError();
    rp_emu_launch(name, cfg, fn, std::forward<A>(a)...);
    return cudaPeekAtLastError();
}
template <class... P, class... A>
static inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t *c, void (*fn)(P...), A &&...a) {
    return rp_emu_launch_ex(c, "cudaLaunchKernelEx", fn, std::forward<A>(a)...);
}
