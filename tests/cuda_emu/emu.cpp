// The emulated CUDA runtime (tests/cuda_emu/README.md): fibers, memory registry, streams
// (synchronous), cuBLAS GEMM.
#include "cublas_v2.h"
#include <map>
#include <set>
#include <string>
#include <vector>
#include <ucontext.h>
#include <sys/mman.h>
#include <cstdarg>
extern "C" {
#include "cuda_device.h"
#include "emu_counters.h"
}

dim3 threadIdx, blockIdx, blockDim, gridDim;

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void die(const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    fprintf(stderr, "EMU FATAL: "); vfprintf(stderr, fmt, ap); fprintf(stderr, "\n");
    va_end(ap); fflush(stdout); abort();
}
static std::set<std::string> g_warned;
static void warn_once(const std::string &key, const std::string &msg) {
    if (g_warned.insert(key).second) fprintf(stderr, "EMU WARNING: %s\n", msg.c_str());
}

// ---- memory registry ----
struct alloc_info { size_t bytes; bool device; };
static std::map<uintptr_t, alloc_info> g_allocs;
static const alloc_info *find_alloc(const void *p, uintptr_t *base) {
    uintptr_t u = (uintptr_t)p;
    auto it = g_allocs.upper_bound(u);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    if (u <= it->first + it->second.bytes) { *base = it->first; return &it->second; }  // one past end OK
    return nullptr;
}
static bool is_device(const void *p, size_t n = 0) {
    uintptr_t b; const alloc_info *a = find_alloc(p, &b);
    return a && a->device && (uintptr_t)p + n <= b + a->bytes;
}
static bool is_device_ptr(const void *p) { uintptr_t b; const alloc_info *a = find_alloc(p, &b); return a && a->device; }

static cudaError_t g_last = cudaSuccess;
// What tests/cuda_emu/emu_counters.h reports: kernel launches (cuBLAS calls
// count as one each), stream copies/memsets, and device or pinned
// allocations and frees.
static unsigned long long g_count_launches, g_count_copies, g_count_allocs;
static int g_fail_malloc_after = -1;  // EMU_FAIL_MALLOC=N: the Nth cudaMalloc from now fails

cudaError_t cudaMalloc_(void **p, size_t n) {
    if (g_fail_malloc_after == 0) { g_fail_malloc_after = -1; *p = nullptr; return g_last = cudaErrorMemoryAllocation; }
    if (g_fail_malloc_after > 0) g_fail_malloc_after--;
    g_count_allocs++;
#ifdef __SANITIZE_ADDRESS__
    size_t r = n ? n : 1;  // exact size: ASan's redzone starts right after the request
#else
    size_t r = (n + 255) / 256 * 256; if (!r) r = 256;
#endif
    void *q = nullptr; if (posix_memalign(&q, 256, r)) q = nullptr;
    if (!q) return g_last = cudaErrorMemoryAllocation;
    memset(q, 0xff, r);  // garbage: NaN as float
    g_allocs[(uintptr_t)q] = {n, true};
    *p = q; return cudaSuccess;
}
cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || !it->second.device) die("cudaFree(%p): not a device allocation", p);
    g_count_allocs++;
    memset(p, 0xfe, it->second.bytes);
    g_allocs.erase(it); free(p); return cudaSuccess;
}
cudaError_t cudaMallocHost_(void **p, size_t n) {
    void *q = aligned_alloc(256, (n + 255) / 256 * 256 + 256);
    g_count_allocs++;
    g_allocs[(uintptr_t)q] = {n, false};
    *p = q; return cudaSuccess;
}
cudaError_t cudaFreeHost(void *p) {
    if (!p) return cudaSuccess;
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || it->second.device) die("cudaFreeHost(%p): not a pinned allocation", p);
    g_count_allocs++;
    g_allocs.erase(it); free(p); return cudaSuccess;
}
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k) { return cudaMemcpyAsync(d, s, n, k, 0); }
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t) {
    if (n == 0) return cudaSuccess;
    g_count_copies++;
    bool dd = is_device(d, n), sd = is_device(s, n);
    bool ok = k == cudaMemcpyHostToDevice ? (dd && !is_device_ptr(s)) :
              k == cudaMemcpyDeviceToHost ? (sd && !is_device_ptr(d)) :
              k == cudaMemcpyDeviceToDevice ? (dd && sd) : k == cudaMemcpyDefault;
    if (!ok) die("cudaMemcpyAsync(%p, %p, %zu, kind %d): pointers do not match the kind or run past an allocation", d, s, n, (int)k);
    if ((char *)d < (char *)s + n && (char *)s < (char *)d + n) die("cudaMemcpyAsync: overlapping ranges");
    memcpy(d, s, n); return cudaSuccess;
}
cudaError_t cudaMemset(void *d, int v, size_t n) { return cudaMemsetAsync(d, v, n, 0); }
cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t) {
    if (n == 0) return cudaSuccess;
    g_count_copies++;
    if (!is_device(d, n)) die("cudaMemsetAsync(%p, %zu): not inside a device allocation", d, n);
    memset(d, v, n); return cudaSuccess;
}

// ---- device, streams, events ----
struct rp_emu_stream { int x; };
struct rp_emu_event { int x; };
cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : (g_last = cudaErrorInvalidValue); }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    memset(p, 0, sizeof *p); strcpy(p->name, "CPU emulation of an H100"); p->major = 9; p->minor = 0;
    p->totalGlobalMem = 80ull << 30; p->multiProcessorCount = 132; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int) {
    if (a == cudaDevAttrMultiProcessorCount) { *v = getenv("EMU_SMS") ? atoi(getenv("EMU_SMS")) : 132; return cudaSuccess; }
    return g_last = cudaErrorInvalidValue; }
cudaError_t cudaRuntimeGetVersion(int *v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int *v) { *v = 13000; return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t e) {
    switch (e) { case 0: return "no error"; case 1: return "invalid argument"; case 2: return "out of memory";
    case 9: return "invalid configuration argument"; case 100: return "no CUDA-capable device"; default: return "emulated error"; } }
cudaError_t cudaGetLastError() { cudaError_t e = g_last; g_last = cudaSuccess; return e; }
cudaError_t cudaPeekAtLastError() { return g_last; }
cudaError_t cudaStreamCreate(cudaStream_t *s) { *s = new rp_emu_stream(); return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) { delete s; return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t *e) { *e = new rp_emu_event(); return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) { if (!e) die("cudaEventRecord(NULL)"); return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t e) { if (!e) die("cudaEventSynchronize(NULL)"); return cudaSuccess; }

static std::map<const void *, int> g_max_dyn;
cudaError_t rp_emu_func_set_attribute(const void *f, int attr, int v) {
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (v > 227 * 1024) return g_last = cudaErrorInvalidValue;
        g_max_dyn[f] = v;
    }
    return cudaSuccess;
}

// ---- fibers ----
enum { F_RUN, F_BAR, F_WARP, F_DONE };
struct fiber { ucontext_t ctx; char *stack; int state; dim3 tid; unsigned lin; };
static const size_t STACK = 256 * 1024;
static std::vector<fiber> g_fib;
static ucontext_t g_sched;
static int g_cur;
static int g_nthreads;
static const std::function<void()> *g_body;
static const char *g_kernel;
static std::vector<char> g_dyn;
static size_t g_dyn_bytes;
// warp exchange: double-buffered by generation
struct warp_state { unsigned gen; int arrived; uint64_t val[2][32]; unsigned mask; };
static std::vector<warp_state> g_warps;
static std::vector<unsigned> g_fib_gen;

static std::set<void *> g_poisoned;  // static __shared__ variables already poisoned in this block
void rp_emu_poison(void *p, size_t n) { if (g_poisoned.insert(p).second) memset(p, 0xff, n); }
void *rp_emu_dyn_smem() { return g_dyn_bytes ? g_dyn.data() : nullptr; }

static void fiber_entry() {
    (*g_body)();
    g_fib[g_cur].state = F_DONE;
    swapcontext(&g_fib[g_cur].ctx, &g_sched);
}
static void yield_to_sched() { swapcontext(&g_fib[g_cur].ctx, &g_sched); }

void __syncthreads() {
    g_fib[g_cur].state = F_BAR;
    yield_to_sched();
}

void rp_emu_warp_exchange(uint64_t in, unsigned mask, uint64_t *all) {
    const fiber &f = g_fib[g_cur];
    unsigned w = f.lin >> 5, lane = f.lin & 31;
    warp_state &ws = g_warps[w];
    unsigned lanes = std::min(32, g_nthreads - (int)(w * 32));
    unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    if ((mask & full) != mask) die("%s: warp op mask %08x names lanes that do not exist (block of %d threads)", g_kernel, mask, g_nthreads);
    if (!(mask >> lane & 1)) die("%s: lane %u calls a warp op with mask %08x that excludes it", g_kernel, lane, mask);
    if (mask != 0xffffffffu) warn_once(std::string("mask") + g_kernel, std::string(g_kernel) + ": warp op with a partial mask");
    for (unsigned l = 0; l < 32; l++)
        if ((mask >> l & 1) && g_fib[w * 32 + l].state == F_DONE)
            die("%s: warp op (mask %08x) while lane %u of warp %u has exited (block %u,%u thread %u)", g_kernel, mask, l, w, blockIdx.x, blockIdx.y, f.lin);
    unsigned gen = ws.gen;
    if (ws.arrived == 0) ws.mask = mask;
    else if (ws.mask != mask) die("%s: lanes of one warp disagree on the mask (%08x vs %08x)", g_kernel, ws.mask, mask);
    ws.val[gen & 1][lane] = in;
    int need = __builtin_popcount(mask);
    if (++ws.arrived == need) {
        ws.arrived = 0; ws.gen++;
        for (unsigned l = 0; l < 32; l++)
            if ((mask >> l & 1) && l != lane) {
                fiber &o = g_fib[w * 32 + l];
                if (o.state != F_WARP) die("%s: warp release finds lane %u not waiting", g_kernel, l);
                o.state = F_RUN;
            }
    } else {
        g_fib[g_cur].state = F_WARP;
        g_fib_gen[g_cur] = gen;
        yield_to_sched();
        if (ws.gen == gen) die("%s: woke before the warp op completed", g_kernel);
    }
    memcpy(all, ws.val[gen & 1], sizeof(uint64_t) * 32);
}

static unsigned long long g_launches, g_switches;
static int g_order = 0;  // 0 forward, 1 reverse, 2 pseudo-random
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

void rp_emu_check_ptr(const char *k, int i, const void *p) {
    if (!p) return;
    if (!is_device_ptr(p)) die("%s: argument %d (%p) is not device memory", k, i, p);
}

void rp_emu_run(const char *kernel, const void *fn, const rp_emu_cfg &cfg, const std::function<void()> &body) {
    const dim3 g = cfg.grid, b = cfg.block;
    size_t nthreads = (size_t)b.x * b.y * b.z;
    auto bad = [&](const char *why) {
        fprintf(stderr, "EMU LAUNCH ERROR: %s <<<(%u,%u,%u),(%u,%u,%u),%zu>>>: %s\n", kernel, g.x, g.y, g.z, b.x, b.y, b.z, cfg.shmem, why);
        g_last = cudaErrorInvalidConfiguration;
    };
    if (g.x == 0 || g.y == 0 || g.z == 0 || nthreads == 0) return bad("empty grid or block");
    if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) return bad("grid too large");
    if (b.x > 1024 || b.y > 1024 || b.z > 64 || nthreads > 1024) return bad("block too large");
    size_t maxdyn = 48 * 1024;
    auto it = g_max_dyn.find(fn);
    if (it != g_max_dyn.end()) maxdyn = it->second;
    if (cfg.shmem > maxdyn) return bad("dynamic shared memory above the allowed maximum (cudaFuncSetAttribute)");
    g_launches++;
    g_count_launches++;
    g_kernel = kernel;
    g_body = &body;
    g_nthreads = (int)nthreads;
    blockDim = b; gridDim = g;
    if (g_fib.size() < nthreads) {
        size_t old = g_fib.size();
        g_fib.resize(nthreads);
        for (size_t t = old; t < nthreads; t++)
            g_fib[t].stack = (char *)mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        g_fib_gen.resize(nthreads);
    }
    g_warps.assign((nthreads + 31) / 32, warp_state{});
    g_dyn_bytes = cfg.shmem;
    g_dyn.assign(cfg.shmem + 16, (char)0xff);
    std::vector<int> order(nthreads);
    for (unsigned bz = 0; bz < g.z; bz++)
    for (unsigned by = 0; by < g.y; by++)
    for (unsigned bx = 0; bx < g.x; bx++) {
        blockIdx = dim3(bx, by, bz);
        memset(g_dyn.data(), 0xff, g_dyn.size());
        g_poisoned.clear();
        for (size_t t = 0; t < nthreads; t++) {
            fiber &f = g_fib[t];
            f.lin = (unsigned)t;
            f.tid = dim3((unsigned)(t % b.x), (unsigned)(t / b.x % b.y), (unsigned)(t / ((size_t)b.x * b.y)));
            f.state = F_RUN;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack; f.ctx.uc_stack.ss_size = STACK; f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_entry, 0);
            order[t] = (int)t;
        }
        for (;;) {
            if (g_order == 1) std::reverse(order.begin(), order.end());
            else if (g_order == 2) for (size_t t = nthreads - 1; t > 0; t--) { g_rng ^= g_rng << 13; g_rng ^= g_rng >> 7; g_rng ^= g_rng << 17; std::swap(order[t], order[g_rng % (t + 1)]); }
            bool ran = true;
            while (ran) {
                ran = false;
                for (size_t i = 0; i < nthreads; i++) {
                    int t = order[i];
                    if (g_fib[t].state != F_RUN) continue;
                    g_cur = t; threadIdx = g_fib[t].tid;
                    g_switches++;
                    swapcontext(&g_sched, &g_fib[t].ctx);
                    ran = true;
                }
            }
            size_t done = 0, bar = 0, warp = 0;
            for (size_t t = 0; t < nthreads; t++) {
                int s = g_fib[t].state;
                done += s == F_DONE; bar += s == F_BAR; warp += s == F_WARP;
            }
            if (done == nthreads) break;
            if (warp) die("%s block (%u,%u): deadlock: %zu threads wait in a warp op, %zu at __syncthreads, %zu exited", kernel, bx, by, warp, bar, done);
            if (done) warn_once(std::string("exitbar") + kernel, std::string(kernel) + ": __syncthreads reached while some threads of the block have exited (UB before sm_70 semantics; fine on sm_90 in practice)");
            for (size_t t = 0; t < nthreads; t++) if (g_fib[t].state == F_BAR) g_fib[t].state = F_RUN;
        }
    }
    g_body = nullptr;
}

// ---- cuBLAS ----
struct rp_emu_cublas { int x; };
cublasStatus_t cublasCreate(cublasHandle_t *h) { *h = new rp_emu_cublas(); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasDestroy(cublasHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }

static float load_el(const void *p, cudaDataType t, size_t i) {
    return t == CUDA_R_32F ? ((const float *)p)[i] : __bfloat162float(((const __nv_bfloat16 *)p)[i]);
}
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha_, const void *A, cudaDataType at, int lda, const void *B,
                            cudaDataType bt, int ldb, const void *beta_, void *C_, cudaDataType ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    g_count_launches++;
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (ta == CUBLAS_OP_C || tb == CUBLAS_OP_C) return CUBLAS_STATUS_INVALID_VALUE;
    int arows = ta == CUBLAS_OP_N ? m : k, acols = ta == CUBLAS_OP_N ? k : m;
    int brows = tb == CUBLAS_OP_N ? k : n, bcols = tb == CUBLAS_OP_N ? n : k;
    if (lda < std::max(1, arows) || ldb < std::max(1, brows) || ldc < std::max(1, m)) {
        fprintf(stderr, "EMU cublasGemmEx: bad leading dimension m%d n%d k%d lda%d ldb%d ldc%d\n", m, n, k, lda, ldb, ldc);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (ct != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (at != bt) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (at == CUDA_R_32F && !(compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC || compute == CUBLAS_COMPUTE_32F_FAST_TF32)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (at == CUDA_R_16BF && compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    size_t es = at == CUDA_R_32F ? 4 : 2;
    if (k > 0) {
        if (!is_device(A, ((size_t)(acols - 1) * lda + arows) * es)) die("cublasGemmEx: A %p (%dx%d, lda %d) outside device memory", A, arows, acols, lda);
        if (!is_device(B, ((size_t)(bcols - 1) * ldb + brows) * es)) die("cublasGemmEx: B %p (%dx%d, ldb %d) outside device memory", B, brows, bcols, ldb);
    }
    if (!is_device(C_, ((size_t)(n - 1) * ldc + m) * 4)) die("cublasGemmEx: C outside device memory");
    const float alpha = *(const float *)alpha_, beta = *(const float *)beta_;
    float *C = (float *)C_;
    std::vector<float> Am((size_t)m * k), Bm((size_t)n * k);  // Am[i][l] = op(A)(i,l); Bm[j][l] = op(B)(l,j)
    for (int i = 0; i < m; i++)
        for (int l = 0; l < k; l++)
            Am[(size_t)i * k + l] = load_el(A, at, ta == CUBLAS_OP_N ? (size_t)l * lda + i : (size_t)i * lda + l);
    for (int j = 0; j < n; j++)
        for (int l = 0; l < k; l++)
            Bm[(size_t)j * k + l] = load_el(B, bt, tb == CUBLAS_OP_N ? (size_t)j * ldb + l : (size_t)l * ldb + j);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            const float *a = &Am[(size_t)i * k], *bb = &Bm[(size_t)j * k];
            double s = 0;
            for (int l = 0; l < k; l++) s += (double)a[l] * bb[l];
            float &c = C[(size_t)j * ldc + i];
            c = beta == 0.0f ? (float)(alpha * s) : (float)(alpha * s + (double)beta * c);
        }
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" void rp_emu_counts(rp_emu_counters *out) {
    out->launches = g_count_launches;
    out->copies = g_count_copies;
    out->allocs = g_count_allocs;
}

// ---- cuda_device.cu replacement ----
extern "C" int rp_cuda_device_count(void) { return 1; }
extern "C" void rp_cuda_device_describe(int index, char *out, size_t out_size) { snprintf(out, out_size, "device %d: CPU emulation (sm_90)", index); }
extern "C" int rp_cuda_device_select(int index, char *, size_t) { return index == 0 ? 0 : 1; }
extern "C" void rp_cuda_versions(char *out, size_t out_size) { snprintf(out, out_size, "CUDA emulation"); }

__attribute__((constructor)) static void emu_init() {
    if (getenv("EMU_ORDER")) g_order = atoi(getenv("EMU_ORDER"));
    if (getenv("EMU_FAIL_MALLOC")) g_fail_malloc_after = atoi(getenv("EMU_FAIL_MALLOC"));
}
__attribute__((destructor)) static void emu_fini() {
    fprintf(stderr, "EMU: %llu launches, %llu fiber switches\n", g_launches, g_switches);
}
