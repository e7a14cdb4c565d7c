// The emulated CUDA runtime (tests/cuda_emu/README.md): fibers, memory registry, streams
// (queued, run at sync points), cuBLAS GEMM.
#include "cublas_v2.h"
#include "cublasLt.h"
#include "cuda.h"
#include <map>
#include <set>
#include <string>
#include <vector>
#include <ucontext.h>
#include <sys/mman.h>
#include <cstdarg>
#include <deque>
#include <unordered_set>
#include <memory>
#include <csignal>
#include <unistd.h>
extern "C" {
#include "cuda_device.h"
#include "emu_counters.h"
}

dim3 threadIdx, blockIdx, blockDim, gridDim;

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
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
enum { RP_EMU_REDZONE = 256 };
static uintptr_t g_dev_lo, g_dev_hi;  // the device allocation a checked kernel access last hit
// The allocations hit before it (a kernel reads and writes several in turn):
// a hit here saves the registry lookup.
enum { RP_EMU_DEV_CACHE = 8 };
static uintptr_t g_dev_cache_lo[RP_EMU_DEV_CACHE], g_dev_cache_hi[RP_EMU_DEV_CACHE];
static unsigned g_dev_cache_next;
static void dev_cache_clear() {
    g_dev_lo = g_dev_hi = 0;
    for (int i = 0; i < RP_EMU_DEV_CACHE; i++) g_dev_cache_lo[i] = g_dev_cache_hi[i] = 0;
}
// Makes [lo, hi) the last hit, keeping the one before in the cache.
static void dev_cache_use(uintptr_t lo, uintptr_t hi) {
    if (g_dev_hi) {
        const unsigned i = g_dev_cache_next++ % RP_EMU_DEV_CACHE;
        g_dev_cache_lo[i] = g_dev_lo;
        g_dev_cache_hi[i] = g_dev_hi;
    }
    g_dev_lo = lo;
    g_dev_hi = hi;
}
static bool dev_cache_hit(uintptr_t a, size_t n) {
    for (int i = 0; i < RP_EMU_DEV_CACHE; i++)
        if (a >= g_dev_cache_lo[i] && a + n <= g_dev_cache_hi[i]) {
            const uintptr_t lo = g_dev_cache_lo[i], hi = g_dev_cache_hi[i];
            g_dev_cache_lo[i] = g_dev_lo;
            g_dev_cache_hi[i] = g_dev_hi;
            g_dev_lo = lo;
            g_dev_hi = hi;
            return true;
        }
    return false;
}
// Pinned (cudaMallocHost) buffers are whole pages of their own, so that while a
// queued copy uses one it can be protected: a host read of a buffer a queued
// device-to-host copy writes, or a host write to one a queued host-to-device
// copy reads, faults, and the SIGSEGV handler names the mistake.
struct pinned_use { size_t off, len; bool device_writes; };
struct alloc_info {
    size_t bytes; bool device;
    size_t redzone = 0;               // device: unused bytes before and after (outside ASan)
    size_t lead = 0;                  // device: bytes from the host block's start to the pointer
    size_t map_bytes = 0;             // pinned: the mmap'd length
    std::vector<pinned_use> pending;  // pinned: queued copies using it
    bool unguarded = false;           // pinned: a host access outside the pending ranges dropped the guard
    std::vector<char> vmm;            // cuMemAddressReserve: per 2 MiB page, 0 unmapped, 1 mapped, 2 accessible
};
static std::map<uintptr_t, alloc_info> g_allocs;
static alloc_info *find_alloc(const void *p, uintptr_t *base) {
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
static alloc_info *pinned_of(const void *p, uintptr_t *base) {
    alloc_info *a = find_alloc(p, base);
    return a && !a->device ? a : nullptr;
}
static uintptr_t base_of(const void *p) { uintptr_t b = 0; return find_alloc(p, &b) ? b : 0; }

static void pinned_protect(uintptr_t base, alloc_info &a) {
    int prot = PROT_READ | PROT_WRITE;
    if (!a.unguarded)
        for (const pinned_use &u : a.pending) prot = u.device_writes ? PROT_NONE : (prot & ~PROT_WRITE);
    if (a.pending.empty()) a.unguarded = false;
    mprotect((void *)base, a.map_bytes, prot);
}

static cudaError_t g_last = cudaSuccess;
// What tests/cuda_emu/emu_counters.h reports: kernel launches (cuBLAS calls
// count as one each), stream copies/memsets, and device or pinned
// allocations and frees.
static unsigned long long g_count_bf16_converts;  // launches of to_bf16_kernel (issue 15)
static unsigned long long g_count_gemv_group_blocks;  // blocks of gemv_group_kernel launches
static unsigned long long g_count_pdl_launches;       // launches with the PDL attribute
static unsigned long long g_count_launches, g_count_copies, g_count_allocs, g_count_graph_launches;
static unsigned long long g_device_bytes;  // cudaMalloc bytes alive (rp_emu_counters.device_bytes)
// Device bytes per launch (rp_emu_bytes_*, below): a copy or fill counts too.
static bool g_bytes_on;
static void bytes_note(uintptr_t a, size_t n, bool write);
static void bytes_launch_end(const std::string &key);
static int g_fail_malloc_after = -1;  // EMU_FAIL_MALLOC=N: the Nth cudaMalloc from now fails
// EMU_ALLOC_PAD=S (S > 0): every cudaMalloc gets a seeded 0..15 x 256 bytes
// more in front of it, so the device buffers lie at other addresses and
// distances from each other, and freed device memory is never handed out
// again (as under ASan, whose allocator places buffers elsewhere and keeps
// freed ones in quarantine; glibc gives a freed block back at once, often to
// the next buffer of the same size). Bookkeeping that keys on addresses must
// give the same launches and bits for every S; 0 (default): neither.
static uint64_t g_alloc_pad_rng;
static int g_alloc_pad_seed;
static void **g_quarantine;  // host blocks of device memory freed while padding (reachable: no leak)
static size_t g_n_quarantine, g_cap_quarantine;

// ---- streams: work is queued and runs at sync points ----
// Each stream is a queue of ops; an op may first wait for another stream to
// have completed a number of its ops (an event, or the legacy stream's
// implicit ordering with blocking streams). Nothing runs until the host
// synchronizes; then the op needed runs, and EMU_STREAM_ORDER=N (default 1;
// 0: never) lets a seeded random amount of the other streams' work run first,
// as a real device may.
struct rp_emu_stream;
struct stream_op {
    std::function<void()> run;           // empty for a pure wait / event record
    rp_emu_stream *dep = nullptr;        // wait until dep->done >= dep_seq first
    unsigned long long dep_seq = 0;
    std::vector<uintptr_t> uses;         // allocations it reads or writes
    std::string what;
    bool kernel = false;                 // a kernel launch (PDL edges join kernels only)
};
struct rp_emu_graph;
struct rp_emu_stream {
    std::deque<stream_op> q;
    unsigned long long queued = 0, done = 0;
    bool blocking = true, legacy = false;
    rp_emu_graph *capture = nullptr;     // between cudaStreamBeginCapture and EndCapture
    // Device byte ranges [lo, hi) that a PDL kernel run next on this stream
    // may not touch before cudaGridDependencySynchronize: what the kernel
    // before it wrote (and, if that one was a PDL launch that triggered its
    // dependents before its own grid sync, what its predecessor wrote).
    std::vector<std::pair<uintptr_t, uintptr_t>> pdl_hazard;
};
// A captured graph: each node queues its op again on the launch stream.
struct rp_emu_graph {
    std::vector<std::function<void(cudaStream_t)>> nodes;
    cudaError_t invalid = cudaSuccess;  // why the capture was invalidated
    std::string why;
};
struct rp_emu_graph_exec { std::vector<std::function<void(cudaStream_t)>> nodes; };
// The stream being captured (CUDA's global mode: one at a time is enough here).
static rp_emu_stream *g_capturing;
// A call CUDA forbids during a global-mode capture: the capture is
// invalidated (cudaStreamEndCapture fails) and the call fails, as on a GPU.
static cudaError_t capture_violation(const char *call, cudaError_t rc = cudaErrorStreamCaptureUnsupported);
struct rp_emu_event { rp_emu_stream *s = nullptr; unsigned long long seq = 0; };
static rp_emu_stream g_legacy_stream;
static std::vector<rp_emu_stream *> g_streams{&g_legacy_stream};
static int g_stream_order = 1;
static uint64_t g_stream_rng = 0x2545f4914f6cdd1dull;
static uint64_t stream_rand() { g_stream_rng ^= g_stream_rng << 13; g_stream_rng ^= g_stream_rng >> 7; g_stream_rng ^= g_stream_rng << 17; return g_stream_rng; }
static rp_emu_stream *stream_of(cudaStream_t s) {
    if (!s) { g_legacy_stream.legacy = true; return &g_legacy_stream; }
    return s;
}

static void push_op(rp_emu_stream *s, stream_op op) { s->q.push_back(std::move(op)); s->queued++; }
static void push_wait(rp_emu_stream *s, rp_emu_stream *on, unsigned long long seq) {
    if (on == s || on->done >= seq) return;
    stream_op w; w.dep = on; w.dep_seq = seq; w.what = "wait"; push_op(s, std::move(w));
}
// The legacy default stream waits for all blocking streams and they for it;
// non-blocking streams (cudaStreamNonBlocking) are not ordered with it.
static void enqueue(cudaStream_t st, stream_op op) {
    rp_emu_stream *s = stream_of(st);
    if (s->capture) {
        if (op.dep) { capture_violation("a cross-stream wait (cudaStreamWaitEvent)"); return; }
        auto kept = std::make_shared<stream_op>(std::move(op));
        s->capture->nodes.push_back([kept](cudaStream_t t) { enqueue(t, *kept); });
        return;
    }
    if (g_capturing && s->legacy) { capture_violation("work on the legacy stream", cudaErrorStreamCaptureImplicit); return; }
    if (s->legacy) {
        for (rp_emu_stream *o : g_streams) if (o != s && o->blocking) push_wait(s, o, o->queued);
    } else if (s->blocking) {
        push_wait(s, &g_legacy_stream, g_legacy_stream.queued);
    }
    push_op(s, std::move(op));
}
static rp_emu_stream *g_run_stream;  // the stream whose op runs now (a kernel's PDL hazards)
static void run_until(rp_emu_stream *s, unsigned long long seq) {
    while (s->done < seq) {
        stream_op op = std::move(s->q.front());
        s->q.pop_front();
        if (op.dep) run_until(op.dep, op.dep_seq);
        g_run_stream = s;
        if (op.run) op.run();
        // A copy, memset, wait or event between kernels: the next kernel
        // starts after it completed, PDL or not (a GEMM is a kernel).
        if (!op.kernel) s->pdl_hazard.clear();
        s->done++;
    }
}
// At a sync point: other streams may have progressed meanwhile.
static void wander(rp_emu_stream *except) {
    if (!g_stream_order) return;
    for (size_t i = 0; i < g_streams.size(); i++) {
        rp_emu_stream *o = g_streams[(i + stream_rand()) % g_streams.size()];
        if (o == except || o->done == o->queued) continue;
        run_until(o, o->done + stream_rand() % (o->queued - o->done + 1));
    }
}
static void sync_stream(rp_emu_stream *s) { wander(s); run_until(s, s->queued); }
static void sync_device() {
    wander(nullptr);
    for (rp_emu_stream *o : g_streams) run_until(o, o->queued);
}
// The queued op that still uses allocation `base`, if any.
static const stream_op *queued_user(uintptr_t base) {
    for (rp_emu_stream *s : g_streams)
        for (const stream_op &op : s->q)
            for (uintptr_t u : op.uses) if (u == base) return &op;
    return nullptr;
}

cudaError_t cudaMalloc_(void **p, size_t n) {
    if (g_capturing) { *p = nullptr; return capture_violation("cudaMalloc"); }
    if (g_fail_malloc_after == 0) { g_fail_malloc_after = -1; *p = nullptr; return g_last = cudaErrorMemoryAllocation; }
    if (g_fail_malloc_after > 0) g_fail_malloc_after--;
    g_count_allocs++;
#ifdef __SANITIZE_ADDRESS__
    size_t r = n ? n : 1;  // exact size: ASan's redzone starts right after the request
    size_t rz = 0;
#else
    size_t r = (n + 255) / 256 * 256; if (!r) r = 256;
    size_t rz = RP_EMU_REDZONE;  // unused bytes before and after: checked kernels report accesses there
#endif
    size_t pad = 0;
    if (g_alloc_pad_rng) {  // xorshift64: the same seed, the same layout
        g_alloc_pad_rng ^= g_alloc_pad_rng << 13; g_alloc_pad_rng ^= g_alloc_pad_rng >> 7; g_alloc_pad_rng ^= g_alloc_pad_rng << 17;
        pad = (size_t)(g_alloc_pad_rng % 16) * 256;
    }
    void *q = nullptr; if (posix_memalign(&q, 256, pad + r + 2 * rz)) q = nullptr;
    if (!q) return g_last = cudaErrorMemoryAllocation;
    memset(q, 0xff, pad + r + 2 * rz);  // garbage: NaN as float
    alloc_info a; a.bytes = n; a.device = true; a.redzone = rz; a.lead = pad + rz;
    g_allocs[(uintptr_t)q + pad + rz] = a;
    g_device_bytes += n;
    *p = (char *)q + pad + rz; return cudaSuccess;
}
cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    if (g_capturing) return capture_violation("cudaFree");
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || !it->second.device) die("cudaFree(%p): not a device allocation", p);
    if (const stream_op *op = queued_user((uintptr_t)p))
        die("cudaFree(%p) while queued work still uses it (%s): synchronize the stream first", p, op->what.c_str());
    g_count_allocs++;
    memset(p, 0xfe, it->second.bytes);
    g_device_bytes -= it->second.bytes;
    size_t lead = it->second.lead;
    dev_cache_clear();  // the checked-access cache may name it
    g_allocs.erase(it);
    if (!g_alloc_pad_rng) { free((char *)p - lead); return cudaSuccess; }
    // EMU_ALLOC_PAD: never handed out again until the padding ends
    if (g_n_quarantine == g_cap_quarantine) {
        g_cap_quarantine = g_cap_quarantine ? 2 * g_cap_quarantine : 64;
        g_quarantine = (void **)realloc(g_quarantine, g_cap_quarantine * sizeof(void *));
        if (!g_quarantine) die("cudaFree: out of host memory for the EMU_ALLOC_PAD quarantine");
    }
    g_quarantine[g_n_quarantine++] = (char *)p - lead;
    return cudaSuccess;
}
cudaError_t cudaMallocHost_(void **p, size_t n) {
    if (g_capturing) { *p = nullptr; return capture_violation("cudaMallocHost"); }
    size_t pg = (size_t)sysconf(_SC_PAGESIZE), m = (n + pg - 1) / pg * pg; if (!m) m = pg;
    void *q = mmap(nullptr, m, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (q == MAP_FAILED) { *p = nullptr; return g_last = cudaErrorMemoryAllocation; }
    g_count_allocs++;
    alloc_info a; a.bytes = n; a.device = false; a.map_bytes = m;
    g_allocs[(uintptr_t)q] = a;
    *p = q; return cudaSuccess;
}
cudaError_t cudaFreeHost(void *p) {
    if (!p) return cudaSuccess;
    if (g_capturing) return capture_violation("cudaFreeHost");
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || it->second.device) die("cudaFreeHost(%p): not a pinned allocation", p);
    if (const stream_op *op = queued_user((uintptr_t)p))
        die("cudaFreeHost(%p) while queued work still uses it (%s): synchronize the stream first", p, op->what.c_str());
    g_count_allocs++;
    munmap(p, it->second.map_bytes);
    g_allocs.erase(it); return cudaSuccess;
}

// ---- VMM (cuda.h): a reservation is PROT_NONE host pages registered as one
// device allocation; a page is readable and writable only while it is
// mapped (cuMemMap) and made accessible (cuMemSetAccess). cuMemUnmap drops
// its contents and protects it again, so any later access faults and the
// SIGSEGV handler names it.
enum { RP_EMU_VMM_PAGE = 2 << 20 };
static std::map<unsigned long long, size_t> g_vmm_handles;  // cuMemCreate handles alive: their bytes
static unsigned long long g_vmm_next = 1;
static alloc_info *vmm_of(CUdeviceptr p, size_t size, uintptr_t *base, const char *fn) {
    alloc_info *a = find_alloc((const void *)p, base);
    if (!a || a->vmm.empty() || (p - *base) % RP_EMU_VMM_PAGE || size % RP_EMU_VMM_PAGE || !size ||
        p + size > *base + a->bytes)
        die("%s(%#llx, %zu): not whole %d-byte pages of a cuMemAddressReserve range", fn, p, size,
            RP_EMU_VMM_PAGE);
    return a;
}
CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *, CUmemAllocationGranularity_flags) {
    *g = RP_EMU_VMM_PAGE;
    return CUDA_SUCCESS;
}
CUresult cuMemAddressReserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr, unsigned long long flags) {
    if (!size || size % RP_EMU_VMM_PAGE || (align && RP_EMU_VMM_PAGE % align) || addr || flags)
        return CUDA_ERROR_INVALID_VALUE;
    // Over-reserve, then trim to a page-aligned range.
    char *q = (char *)mmap(nullptr, size + RP_EMU_VMM_PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (q == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char *b = (char *)(((uintptr_t)q + RP_EMU_VMM_PAGE - 1) / RP_EMU_VMM_PAGE * RP_EMU_VMM_PAGE);
    if (b > q) munmap(q, (size_t)(b - q));
    if (b + size < q + size + RP_EMU_VMM_PAGE) munmap(b + size, (size_t)(q + size + RP_EMU_VMM_PAGE - (b + size)));
    alloc_info a; a.bytes = size; a.device = true; a.map_bytes = size;
    a.vmm.assign(size / RP_EMU_VMM_PAGE, 0);
    g_allocs[(uintptr_t)b] = a;
    *p = (CUdeviceptr)(uintptr_t)b;
    return CUDA_SUCCESS;
}
CUresult cuMemAddressFree(CUdeviceptr p, size_t size) {
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || it->second.vmm.empty() || it->second.bytes != size)
        die("cuMemAddressFree(%#llx, %zu): not a whole cuMemAddressReserve range", p, size);
    for (char m : it->second.vmm)
        if (m) die("cuMemAddressFree(%#llx): a page is still mapped: cuMemUnmap it first", p);
    munmap((void *)p, size);
    dev_cache_clear();
    g_allocs.erase(it);
    return CUDA_SUCCESS;
}
CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop, unsigned long long flags) {
    if (!size || size % RP_EMU_VMM_PAGE || flags || !prop || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
        prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return CUDA_ERROR_INVALID_VALUE;
    g_count_allocs++;
    *h = g_vmm_next++;
    g_vmm_handles[*h] = size;
    return CUDA_SUCCESS;
}
CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
    // The memory stays while a mapping holds it (as CUDA's).
    return g_vmm_handles.erase(h) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
CUresult cuMemMap(CUdeviceptr p, size_t size, size_t offset, CUmemGenericAllocationHandle h, unsigned long long flags) {
    uintptr_t base;
    alloc_info *a = vmm_of(p, size, &base, "cuMemMap");
    auto it = g_vmm_handles.find(h);
    if (it == g_vmm_handles.end() || it->second != size || offset || flags) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = (p - base) / RP_EMU_VMM_PAGE; i < (p - base + size) / RP_EMU_VMM_PAGE; i++) {
        if (a->vmm[i]) die("cuMemMap(%#llx): page %zu is already mapped", p, i);
        a->vmm[i] = 1;
    }
    return CUDA_SUCCESS;  // still PROT_NONE: no access before cuMemSetAccess
}
CUresult cuMemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc *d, size_t count) {
    uintptr_t base;
    alloc_info *a = vmm_of(p, size, &base, "cuMemSetAccess");
    if (count != 1 || d->flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = (p - base) / RP_EMU_VMM_PAGE; i < (p - base + size) / RP_EMU_VMM_PAGE; i++) {
        if (!a->vmm[i]) die("cuMemSetAccess(%#llx): page %zu is not mapped", p, i);
        if (a->vmm[i] == 1) {
            char *pg = (char *)base + i * RP_EMU_VMM_PAGE;
            mprotect(pg, RP_EMU_VMM_PAGE, PROT_READ | PROT_WRITE);
            memset(pg, 0xff, RP_EMU_VMM_PAGE);  // garbage: NaN as float
            a->vmm[i] = 2;
        }
    }
    return CUDA_SUCCESS;
}
CUresult cuMemUnmap(CUdeviceptr p, size_t size) {
    uintptr_t base;
    alloc_info *a = vmm_of(p, size, &base, "cuMemUnmap");
    if (const stream_op *op = queued_user(base))
        die("cuMemUnmap(%#llx) while queued work still uses the range (%s): synchronize the stream first", p,
            op->what.c_str());
    for (size_t i = (p - base) / RP_EMU_VMM_PAGE; i < (p - base + size) / RP_EMU_VMM_PAGE; i++) {
        if (!a->vmm[i]) die("cuMemUnmap(%#llx): page %zu is not mapped", p, i);
        a->vmm[i] = 0;
    }
    g_count_allocs++;
    madvise((void *)p, size, MADV_DONTNEED);
    mprotect((void *)p, size, PROT_NONE);
    return CUDA_SUCCESS;
}
cudaError_t cudaGetDriverEntryPointByVersion(const char *symbol, void **fn, unsigned, unsigned long long,
                                             cudaDriverEntryPointQueryResult *status) {
    static const struct { const char *name; void *fn; } known[] = {
        {"cuMemGetAllocationGranularity", (void *)cuMemGetAllocationGranularity},
        {"cuMemAddressReserve", (void *)cuMemAddressReserve}, {"cuMemAddressFree", (void *)cuMemAddressFree},
        {"cuMemCreate", (void *)cuMemCreate}, {"cuMemRelease", (void *)cuMemRelease},
        {"cuMemMap", (void *)cuMemMap}, {"cuMemUnmap", (void *)cuMemUnmap},
        {"cuMemSetAccess", (void *)cuMemSetAccess}};
    *fn = nullptr;
    for (const auto &k : known)
        if (strcmp(k.name, symbol) == 0) *fn = k.fn;
    if (status) *status = *fn ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
    return cudaSuccess;
}

static struct sigaction g_old_segv;  // e.g. ASan's: faults that are not ours go back to it
static void fault_handler(int sig, siginfo_t *si, void *uc_) {
    uintptr_t base;
    if (const alloc_info *v = find_alloc(si->si_addr, &base); v && !v->vmm.empty())
        die("access to %p (byte %zu of a %zu-byte cuMemAddressReserve range): its page is not mapped "
            "and accessible (cuMemUnmap gave it back, or cuMemMap/cuMemSetAccess were not called)",
            si->si_addr, (size_t)((uintptr_t)si->si_addr - base), v->bytes);
    alloc_info *a = pinned_of(si->si_addr, &base);
    if (!a || a->pending.empty() || a->unguarded) { sigaction(sig, &g_old_segv, nullptr); return; }  // not ours: faults again there
    bool write = false;
#if defined(__x86_64__) && defined(REG_ERR)
    write = (((ucontext_t *)uc_)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
    (void)uc_;
#endif
    size_t off = (uintptr_t)si->si_addr - base;
    for (const pinned_use &u : a->pending) {
        if (off < u.off || off >= u.off + u.len) continue;
        if (u.device_writes)
            die("host %s of pinned memory %p (byte %zu of a %zu-byte cudaMallocHost buffer) while a queued "
                "device-to-host copy still writes it: synchronize (cudaStreamSynchronize, cudaEventSynchronize) before using it",
                write ? "write" : "read", si->si_addr, off, a->bytes);
        if (write)
            die("host write to pinned memory %p (byte %zu of a %zu-byte cudaMallocHost buffer) while a queued "
                "host-to-device copy still reads it: wait for the copy (cudaEventSynchronize) before refilling the buffer",
                si->si_addr, off, a->bytes);
    }
    // Outside every queued copy's range (legal): drop the guard on this buffer.
    a->unguarded = true;
    mprotect((void *)base, a->map_bytes, PROT_READ | PROT_WRITE);
}

enum copy_dir { C_H2H, C_H2D, C_D2H, C_D2D };
static copy_dir check_copy(void *d, const void *s, size_t n, cudaMemcpyKind k, const char *fn) {
    bool dd = is_device(d, n), sd = is_device(s, n);
    bool ok = k == cudaMemcpyHostToDevice ? (dd && !is_device_ptr(s)) :
              k == cudaMemcpyDeviceToHost ? (sd && !is_device_ptr(d)) :
              k == cudaMemcpyDeviceToDevice ? (dd && sd) :
              k == cudaMemcpyHostToHost ? (!is_device_ptr(d) && !is_device_ptr(s)) : k == cudaMemcpyDefault;
    if (!ok) die("%s(%p, %p, %zu, kind %d): pointers do not match the kind or run past an allocation", fn, d, s, n, (int)k);
    if ((char *)d < (char *)s + n && (char *)s < (char *)d + n) die("%s: overlapping ranges", fn);
    if (k == cudaMemcpyDefault) {
        if (is_device_ptr(d) != dd || is_device_ptr(s) != sd) die("%s(%p, %p, %zu): runs past an allocation", fn, d, s, n);
        return dd ? (sd ? C_D2D : C_H2D) : (sd ? C_D2H : C_H2H);
    }
    return k == cudaMemcpyHostToDevice ? C_H2D : k == cudaMemcpyDeviceToHost ? C_D2H : k == cudaMemcpyDeviceToDevice ? C_D2D : C_H2H;
}
// Queues a copy on `st`; a pageable source is staged now (the documented
// behaviour), a pageable destination holds garbage until the copy ran, and a
// pinned buffer is guarded while the copy is queued.
static void queue_copy(void *d, const void *s, size_t n, copy_dir dir, cudaStream_t st, const char *fn) {
    if (rp_emu_graph *g = stream_of(st)->capture) {
        // A graph's copy reads its source at each launch: only pinned host
        // memory keeps that promise (CUDA refuses pageable copies in capture).
        uintptr_t pb;
        if ((dir == C_H2D && !pinned_of(s, &pb)) || (dir == C_D2H && !pinned_of(d, &pb))) {
            capture_violation("a copy from or to pageable host memory");
            return;
        }
        g->nodes.push_back([d, s, n, dir, fn](cudaStream_t t) { queue_copy(d, s, n, dir, t, fn); });
        return;
    }
    stream_op op;
    char what[160]; snprintf(what, sizeof what, "%s of %zu bytes %p -> %p", fn, n, s, d); op.what = what;
    uintptr_t pb = 0;
    alloc_info *pin = dir == C_H2D ? pinned_of(s, &pb) : dir == C_D2H ? pinned_of(d, &pb) : nullptr;
    if (dir != C_H2D) op.uses.push_back(base_of(s));
    if (dir != C_D2H) op.uses.push_back(base_of(d));
    if (pin) {
        op.uses.push_back(pb);
        size_t off = (uintptr_t)(dir == C_H2D ? s : d) - pb;
        pin->pending.push_back({off, n, dir == C_D2H});
        pinned_protect(pb, *pin);
        op.run = [d, s, n, pb, off] {
            alloc_info &a = g_allocs.at(pb);
            mprotect((void *)pb, a.map_bytes, PROT_READ | PROT_WRITE);
            memcpy(d, s, n);
            for (size_t i = 0; i < a.pending.size(); i++)
                if (a.pending[i].off == off && a.pending[i].len == n) { a.pending.erase(a.pending.begin() + i); break; }
            pinned_protect(pb, a);
        };
    } else if (dir == C_H2D) {
        auto staged = std::make_shared<std::vector<char>>((const char *)s, (const char *)s + n);
        op.run = [d, staged] { memcpy(d, staged->data(), staged->size()); };
    } else {
        if (dir == C_D2H) memset(d, 0xff, n);  // undefined until the copy ran: NaN if read early
        op.run = [d, s, n] { memcpy(d, s, n); };
    }
    op.run = [run = std::move(op.run), d, s, n, dir] {
        run();
        if (!g_bytes_on) return;
        if (dir != C_H2D) bytes_note((uintptr_t)s, n, false);
        if (dir != C_D2H) bytes_note((uintptr_t)d, n, true);
        bytes_launch_end(dir == C_H2D ? "cudaMemcpy H2D" : dir == C_D2H ? "cudaMemcpy D2H" : "cudaMemcpy D2D");
    };
    enqueue(st, std::move(op));
}
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
    if (n == 0) return cudaSuccess;
    g_count_copies++;
    copy_dir dir = check_copy(d, s, n, k, "cudaMemcpyAsync");
    if (dir == C_H2H) { memcpy(d, s, n); return cudaSuccess; }
    queue_copy(d, s, n, dir, st, "cudaMemcpyAsync");
    return cudaSuccess;
}
// cudaMemcpy on the legacy stream, with the documented host synchronization:
// from pageable memory the stream is synchronized first and the call returns
// once the source was staged; from pinned memory and to host memory it
// returns when the copy is done; device to device it does not wait.
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k) {
    if (n == 0) return cudaSuccess;
    if (g_capturing) return capture_violation("cudaMemcpy (synchronous)");
    g_count_copies++;
    copy_dir dir = check_copy(d, s, n, k, "cudaMemcpy");
    uintptr_t pb;
    if (dir == C_H2H) { sync_stream(&g_legacy_stream); memcpy(d, s, n); return cudaSuccess; }
    bool pageable_src = dir == C_H2D && !pinned_of(s, &pb);
    if (pageable_src) sync_stream(stream_of(0));
    queue_copy(d, s, n, dir, 0, "cudaMemcpy");
    if (dir == C_D2H || (dir == C_H2D && !pageable_src)) sync_stream(stream_of(0));
    return cudaSuccess;
}
cudaError_t cudaMemset(void *d, int v, size_t n) { return cudaMemsetAsync(d, v, n, 0); }
cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t st) {
    if (n == 0) return cudaSuccess;
    g_count_copies++;
    if (!is_device(d, n)) die("cudaMemsetAsync(%p, %zu): not inside a device allocation", d, n);
    stream_op op;
    op.run = [d, v, n] {
        memset(d, v, n);
        if (g_bytes_on) { bytes_note((uintptr_t)d, n, true); bytes_launch_end("cudaMemset"); }
    };
    op.uses.push_back(base_of(d));
    op.what = "cudaMemsetAsync";
    enqueue(st, std::move(op));
    return cudaSuccess;
}

// ---- device, streams, events ----
cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : (g_last = cudaErrorInvalidValue); }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    memset(p, 0, sizeof *p); strcpy(p->name, "CPU emulation of an H100"); p->major = 9; p->minor = 0;
    p->totalGlobalMem = 80ull << 30; p->multiProcessorCount = 132; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int) {
    if (a == cudaDevAttrMultiProcessorCount) { *v = getenv("EMU_SMS") ? atoi(getenv("EMU_SMS")) : 132; return cudaSuccess; }
    if (a == cudaDevAttrComputeCapabilityMajor) { *v = 9; return cudaSuccess; }
    return g_last = cudaErrorInvalidValue; }
cudaError_t cudaRuntimeGetVersion(int *v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int *v) { *v = 13000; return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t e) {
    switch (e) { case 0: return "no error"; case 1: return "invalid argument"; case 2: return "out of memory";
    case 9: return "invalid configuration argument"; case 100: return "no CUDA-capable device";
    case 600: return "device not ready"; case 900: return "operation not permitted when stream is capturing";
    case 901: return "operation failed due to a previous error during capture";
    case 906: return "operation would make the legacy stream depend on a capturing blocking stream"; default: return "emulated error"; } }
cudaError_t cudaGetLastError() { cudaError_t e = g_last; g_last = cudaSuccess; return e; }
cudaError_t cudaPeekAtLastError() { return g_last; }
cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f) {
    rp_emu_stream *n = new rp_emu_stream();
    n->blocking = !(f & cudaStreamNonBlocking);
    g_streams.push_back(n);
    *s = n; return cudaSuccess;
}
// The stream's queued work still completes; the object stays allocated since
// queued waits of other streams may name it.
/* A destroyed stream is kept, not deleted: other streams' queued waits
 * (stream_op::dep) and events (rp_emu_event::s) may still point at it. Kept
 * in a list that is never destroyed (a static vector's destructor would run
 * before LeakSanitizer's exit check and orphan them), one per backend the
 * process made. */
static std::vector<rp_emu_stream *> *const g_destroyed_streams = new std::vector<rp_emu_stream *>;
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (!s) return g_last = cudaErrorInvalidValue;
    run_until(s, s->queued);
    g_streams.erase(std::remove(g_streams.begin(), g_streams.end(), s), g_streams.end());
    g_destroyed_streams->push_back(s);
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (g_capturing) return capture_violation("cudaStreamSynchronize");
    sync_stream(stream_of(s)); return cudaSuccess;
}
cudaError_t cudaStreamQuery(cudaStream_t s) {
    if (g_capturing) return capture_violation("cudaStreamQuery");
    rp_emu_stream *x = stream_of(s); return x->done == x->queued ? cudaSuccess : cudaErrorNotReady;
}
cudaError_t cudaDeviceSynchronize() {
    if (g_capturing) return capture_violation("cudaDeviceSynchronize");
    sync_device(); return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t *e) { *e = new rp_emu_event(); return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t st) {
    if (!e) die("cudaEventRecord(NULL)");
    stream_op op; op.what = "cudaEventRecord";
    enqueue(st, std::move(op));
    if (stream_of(st)->capture) { e->s = nullptr; return cudaSuccess; }  // a node of the graph
    e->s = stream_of(st); e->seq = e->s->queued;
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (!e) die("cudaEventSynchronize(NULL)");
    if (g_capturing) return capture_violation("cudaEventSynchronize");
    if (e->s) { wander(e->s); run_until(e->s, e->seq); }
    return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
    if (g_capturing) return capture_violation("cudaEventQuery");
    return !e->s || e->s->done >= e->seq ? cudaSuccess : cudaErrorNotReady; }
cudaError_t cudaStreamWaitEvent(cudaStream_t st, cudaEvent_t e, unsigned) {
    if (!e) die("cudaStreamWaitEvent(NULL event)");
    if (!e->s) return cudaSuccess;  // never recorded: nothing to wait for
    stream_op op; op.dep = e->s; op.dep_seq = e->seq; op.what = "cudaStreamWaitEvent";
    enqueue(st, std::move(op));
    return cudaSuccess;
}

// ---- graphs ----
static cudaError_t capture_violation(const char *call, cudaError_t rc) {
    rp_emu_graph *g = g_capturing ? g_capturing->capture : nullptr;
    if (g && g->invalid == cudaSuccess) {
        g->invalid = rc;
        g->why = call;
        fprintf(stderr, "EMU: %s during stream capture: the capture is invalidated (CUDA error %d)\n", call, rc);
    }
    return g_last = rc;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t st, cudaStreamCaptureMode) {
    rp_emu_stream *s = stream_of(st);
    if (s->legacy || g_capturing) return g_last = cudaErrorStreamCaptureUnsupported;
    s->capture = new rp_emu_graph();
    g_capturing = s;
    return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t st, cudaStreamCaptureStatus *out) {
    rp_emu_stream *s = stream_of(st);
    *out = !s->capture ? cudaStreamCaptureStatusNone
         : s->capture->invalid ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t st, cudaGraph_t *out) {
    rp_emu_stream *s = stream_of(st);
    *out = nullptr;
    if (!s->capture) return g_last = cudaErrorInvalidValue;
    rp_emu_graph *g = s->capture;
    s->capture = nullptr;
    g_capturing = nullptr;
    if (g->invalid) { delete g; return g_last = cudaErrorStreamCaptureInvalidated; }
    *out = g;
    return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *out, cudaGraph_t g, unsigned long long) {
    if (!g) return g_last = cudaErrorInvalidValue;
    if (g_capturing) return capture_violation("cudaGraphInstantiate");
    *out = new rp_emu_graph_exec{g->nodes};
    return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t st) {
    if (!e) return g_last = cudaErrorInvalidValue;
    if (stream_of(st)->capture) return capture_violation("cudaGraphLaunch into a capture");
    g_count_graph_launches++;
    for (auto &node : e->nodes) node(st);
    return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) { delete e; return cudaSuccess; }
cudaError_t cudaGraphDestroy(cudaGraph_t g) { delete g; return cudaSuccess; }

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
// A context switch is what the emulator does most (every __syncthreads and
// warp op of every thread: ~450 million in the full twin test). glibc's
// swapcontext makes a sigprocmask system call each time, which was 60% of the
// emulator's time; on x86-64 the fibers switch with the few instructions
// below instead (callee-saved registers, MXCSR and x87 control word, stack
// pointer), and elsewhere with swapcontext.
#if defined(__x86_64__) && !defined(RP_EMU_UCONTEXT)
#define RP_EMU_FAST_SWITCH 1
extern "C" void rp_emu_ctx_switch(void **save_sp, void *load_sp);
extern "C" void rp_emu_fiber_start();
asm(".text\n"
    ".globl rp_emu_ctx_switch\n"
    ".type rp_emu_ctx_switch, @function\n"
    "rp_emu_ctx_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size rp_emu_ctx_switch, .-rp_emu_ctx_switch\n");
#endif
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#endif

struct fiber {
#ifdef RP_EMU_FAST_SWITCH
    void *sp;
#else
    ucontext_t ctx;
#endif
    char *stack; int state; dim3 tid; unsigned lin; const char *bar_file; int bar_line;
    bool dep_synced; /* called cudaGridDependencySynchronize */
    void *asan_fake_stack;
};
static const size_t STACK = 256 * 1024;
// Every fiber's stack lies in one reserved range, so that a checked access
// can tell a thread's locals from device memory with one comparison.
enum { RP_EMU_MAX_FIBERS = 1024 };  // CUDA's threads per block
static char *g_stacks;
static std::vector<fiber> g_fib;
#ifdef RP_EMU_FAST_SWITCH
static void *g_sched_sp;
#else
static ucontext_t g_sched;
#endif
#ifdef __SANITIZE_ADDRESS__
static const void *g_sched_stack_bottom;
static size_t g_sched_stack_size;
#endif
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
static void smem_region_add(void *p, size_t n, const char *name);
void rp_emu_poison(void *p, size_t n, const char *name) {
    if (!g_poisoned.insert(p).second) return;
    memset(p, 0xff, n);
    smem_region_add(p, n, name);
}
void *rp_emu_dyn_smem() { return g_dyn_bytes ? g_dyn.data() : nullptr; }

// ASan is told of every stack switch (its fake stacks and the bounds of the
// stack it checks); the scheduler runs on the thread's own stack.
static void fiber_to_sched(bool exiting) {
    fiber &f = g_fib[g_cur];
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f.asan_fake_stack, g_sched_stack_bottom,
                                   g_sched_stack_size);
#endif
    (void)exiting;
#ifdef RP_EMU_FAST_SWITCH
    rp_emu_ctx_switch(&f.sp, g_sched_sp);
#else
    swapcontext(&f.ctx, &g_sched);
#endif
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_finish_switch_fiber(g_fib[g_cur].asan_fake_stack, nullptr, nullptr);
#endif
}
static void sched_to_fiber(int t) {
    fiber &f = g_fib[t];
#ifdef __SANITIZE_ADDRESS__
    void *fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, STACK);
#endif
#ifdef RP_EMU_FAST_SWITCH
    rp_emu_ctx_switch(&g_sched_sp, f.sp);
#else
    swapcontext(&g_sched, &f.ctx);
#endif
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}
static void fiber_entry() {
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
    (*g_body)();
    g_fib[g_cur].state = F_DONE;
    fiber_to_sched(true);
    die("a finished fiber was resumed");
}
#ifdef RP_EMU_FAST_SWITCH
extern "C" void rp_emu_fiber_start() { fiber_entry(); }
// A new fiber's stack as rp_emu_ctx_switch leaves one: MXCSR and x87 control
// word, six callee-saved registers, then the address it returns to, placed so
// that rp_emu_fiber_start begins as if called (%rsp + 8 aligned to 16).
static void fiber_prepare(fiber &f) {
    uint64_t *top = (uint64_t *)(((uintptr_t)(f.stack + STACK)) & ~(uintptr_t)15);
    uint64_t *sp = top - 1;
    *sp = 0;  /* rp_emu_fiber_start's own return address: none */
    *--sp = (uint64_t)(uintptr_t)rp_emu_fiber_start;  /* at top - 16 */
    for (int r = 0; r < 6; r++) *--sp = 0;
    uint32_t csr[2];
    __asm__ volatile("stmxcsr %0" : "=m"(csr[0]));
    __asm__ volatile("fnstcw %0" : "=m"(*(uint16_t *)&csr[1]));
    *(uint16_t *)((char *)&csr[1] + 2) = 0;
    --sp;
    memcpy(sp, csr, 8);
    f.sp = sp;
}
#else
static void fiber_prepare(fiber &f) {
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack; f.ctx.uc_stack.ss_size = STACK; f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
}
#endif
static void yield_to_sched() { fiber_to_sched(false); }

void rp_emu_syncthreads(const char *file, int line) {
    g_fib[g_cur].bar_file = file; g_fib[g_cur].bar_line = line;
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

// A warp matrix function is warp-collective: every lane must call it with
// the same arguments, or a GPU computes garbage (no error).
void rp_emu_wmma_agree(const char *f, uint64_t a, uint64_t b) {
    uint64_t all_a[32], all_b[32];
    rp_emu_warp_exchange(a, 0xffffffffu, all_a);
    rp_emu_warp_exchange(b, 0xffffffffu, all_b);
    for (unsigned l = 1; l < 32; l++)
        if (all_a[l] != all_a[0] || all_b[l] != all_b[0])
            die("%s: %s called by the lanes of warp %u with different arguments (lane 0: %#llx %#llx, "
                "lane %u: %#llx %#llx; block %u,%u): every lane must pass the same ones",
                g_kernel, f, g_fib[g_cur].lin >> 5, (unsigned long long)all_a[0],
                (unsigned long long)all_b[0], l, (unsigned long long)all_a[l],
                (unsigned long long)all_b[l], blockIdx.x, blockIdx.y);
}

void rp_emu_wmma_fail(const char *f, uint64_t ptr, unsigned ldm) {
    die("%s: %s with pointer %#llx, ldm %u: the pointer must be 256-bit aligned and ldm a multiple "
        "of 8 (16-bit elements) or 4 (float)", g_kernel, f, (unsigned long long)ptr, ldm);
}

// ---- barrier divergence ----
// All threads of a block that have not exited must wait at the same
// __syncthreads; threads that exited while others wait at one are reported
// too (the programming guide leaves it undefined).
static void check_barrier(const char *kernel, size_t done, size_t bar) {
    const fiber *first = nullptr;
    for (int t = 0; t < g_nthreads; t++) {
        const fiber &f = g_fib[t];
        if (f.state != F_BAR) continue;
        if (!first) { first = &f; continue; }
        if (f.bar_line != first->bar_line || strcmp(f.bar_file, first->bar_file))
            die("%s block (%u,%u,%u): barrier divergence: thread (%u,%u,%u) waits at __syncthreads %s:%d while thread (%u,%u,%u) waits at %s:%d",
                kernel, blockIdx.x, blockIdx.y, blockIdx.z, first->tid.x, first->tid.y, first->tid.z, first->bar_file, first->bar_line,
                f.tid.x, f.tid.y, f.tid.z, f.bar_file, f.bar_line);
    }
    if (done && first)
        die("%s block (%u,%u,%u): barrier divergence: %zu threads wait at __syncthreads %s:%d while %zu threads of the block have exited",
            kernel, blockIdx.x, blockIdx.y, blockIdx.z, bar, first->bar_file, first->bar_line, done);
}

// ---- checked kernel accesses: shared-memory races, out of bounds ----
// The kernel translation units are compiled with -fsanitize=thread and linked
// without its runtime (mk/cuda_emu.am): GCC then calls __tsan_readN /
// __tsan_writeN before each load and store, and these hooks check the ones a
// kernel makes. Shared memory: per byte, the last writer and the readers in
// the current barrier interval; two threads touching a byte, one writing, is
// a race unless both are lanes of one warp with a warp op (shuffle,
// __syncwarp) between. Device memory: an access that is not inside its
// allocation but within REDZONE bytes of one is out of bounds.
static bool g_in_kernel;
static uint32_t g_interval = 1;  // stamp of the current barrier interval
struct smem_rec { uint32_t stamp; int16_t w, r, rwarp; uint32_t we, re; };
struct smem_region { uintptr_t lo, hi; const char *name; smem_rec *shadow; };
static std::vector<smem_region> g_smem;
static std::map<uintptr_t, std::vector<smem_rec>> g_shadow_store;  // reused across blocks
static const size_t REDZONE = RP_EMU_REDZONE;

static void smem_region_add(void *p, size_t n, const char *name) {
    std::vector<smem_rec> &sh = g_shadow_store[(uintptr_t)p];
    if (sh.size() < n) sh.assign(n, smem_rec{0, -1, -1, -1, 0, 0});
    g_smem.push_back({(uintptr_t)p, (uintptr_t)p + n, name, sh.data()});
}
static void smem_block_start() {
    g_smem.clear();
    g_interval++;
    if (g_dyn_bytes) smem_region_add(g_dyn.data(), g_dyn_bytes, "extern __shared__ (dynamic)");
}
static void __attribute__((noreturn)) smem_race(const smem_region &r, uintptr_t a, bool write, int other, bool other_wrote) {
    const fiber &me = g_fib[g_cur];
    char them[64];
    if (other >= 0) snprintf(them, sizeof them, "thread (%u,%u,%u)", g_fib[other].tid.x, g_fib[other].tid.y, g_fib[other].tid.z);
    else snprintf(them, sizeof them, "other threads");
    die("%s block (%u,%u,%u): shared-memory race on %s byte %zu: thread (%u,%u,%u) %s it and %s %s it since the last __syncthreads "
        "(no barrier, or warp op within one warp, between)", g_kernel, blockIdx.x, blockIdx.y, blockIdx.z, r.name, (size_t)(a - r.lo),
        me.tid.x, me.tid.y, me.tid.z, write ? "writes" : "reads", them, other_wrote ? "wrote" : "read");
}
static void smem_access(const smem_region &r, uintptr_t a, size_t n, bool write) {
    if (a + n > r.hi)
        die("%s block (%u,%u,%u) thread (%u,%u,%u): %zu-byte access at byte %zu of %s (%zu bytes): out of bounds",
            g_kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, n, (size_t)(a - r.lo), r.name, (size_t)(r.hi - r.lo));
    const int t = g_cur, w = t >> 5;
    const uint32_t e = g_warps[w].gen;
    auto ordered = [&](int u, uint32_t ue) { return u == t || ((u >> 5) == w && ue < e); };
    for (size_t i = 0; i < n; i++) {
        smem_rec &s = r.shadow[a - r.lo + i];
        if (s.stamp != g_interval) s = smem_rec{g_interval, -1, -1, -1, 0, 0};
        if (s.w >= 0 && !ordered(s.w, s.we)) smem_race(r, a + i, write, s.w, true);
        if (write) {
            if (s.r >= 0 && !ordered(s.r, s.re)) smem_race(r, a + i, write, s.r, false);
            if (s.r == -2 && !(s.rwarp == w && s.re < e)) smem_race(r, a + i, write, -1, false);
            s.w = (int16_t)t; s.we = e; s.r = -1;
        } else if (s.r == -1 || s.r == t) {
            s.r = (int16_t)t; s.re = e; s.rwarp = (int16_t)w;
        } else {
            if (s.rwarp != w) s.rwarp = -1;
            s.r = -2; s.re = std::max(s.re, e);
        }
    }
}
static void dev_access(uintptr_t a, size_t n, bool write) {
    auto it = g_allocs.upper_bound(a);
    if (it != g_allocs.begin()) {
        auto p = std::prev(it);
        uintptr_t lo = p->first, hi = lo + p->second.bytes;
        if (a >= lo && a + n <= hi && p->second.device) { dev_cache_use(lo, hi); return; }
        if (a >= lo && a < hi + REDZONE) {
            if (!p->second.device)
                die("%s block (%u,%u,%u) thread (%u,%u,%u): %s pinned host memory %p (byte %zu of a cudaMallocHost buffer): not device memory",
                    g_kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, write ? "writes" : "reads", (void *)a, (size_t)(a - lo));
            die("%s block (%u,%u,%u) thread (%u,%u,%u): out-of-bounds %s of %zu bytes at %p: byte %zu of a %zu-byte device allocation",
                g_kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, write ? "write" : "read", n, (void *)a, (size_t)(a - lo), p->second.bytes);
        }
    }
    if (it != g_allocs.end() && it->second.device && a + n > it->first - REDZONE)
        die("%s block (%u,%u,%u) thread (%u,%u,%u): out-of-bounds %s of %zu bytes at %p: %zu bytes before a %zu-byte device allocation",
            g_kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, write ? "write" : "read", n, (void *)a, (size_t)(it->first - a), it->second.bytes);
}
static void pdl_access(uintptr_t a, size_t n, bool write);
static bool g_pdl_track;  // the running kernel checks PDL hazards or records its writes
static bool g_pdl_seen;   // a PDL launch was queued: kernels record the device bytes they write
// ---- device bytes per kernel (emu_counters.h rp_emu_bytes_*) ----
// Off by default. When a test switches it on, every launch (kernel, cuBLAS
// GEMM, device copy or fill) notes the distinct 32-byte sectors of device
// memory it reads and writes, as DRAM moves them: a sector read twice by a
// launch counts once (the second read is an L2 hit, which the analytic model
// prices apart or not at all), a sector read and written counts in both.
// The sets are per launch; the sums are kept per key (the kernel's name as
// pre.py passed it, a GEMM's shape and types, the copy's kind) in the order
// first seen. Needs the checked accesses: not in the sanitizer build.
enum { RP_EMU_SECTOR = 32 };
struct bytes_row { std::string key; unsigned long long launches = 0, read = 0, written = 0; };
static std::vector<bytes_row> g_bytes_rows;
static std::map<std::string, size_t> g_bytes_index;
static std::unordered_set<uintptr_t> g_sectors_read, g_sectors_written;
static uintptr_t g_last_read_sector = UINTPTR_MAX, g_last_written_sector = UINTPTR_MAX;
static void bytes_note(uintptr_t a, size_t n, bool write) {
    const uintptr_t s0 = a / RP_EMU_SECTOR, s1 = (a + n - 1) / RP_EMU_SECTOR;
    uintptr_t &last = write ? g_last_written_sector : g_last_read_sector;
    if (s0 == s1 && s0 == last) return;  // the common case: the same sector again
    std::unordered_set<uintptr_t> &set = write ? g_sectors_written : g_sectors_read;
    for (uintptr_t s = s0; s <= s1; s++) set.insert(s);
    last = s1;
}
static void bytes_launch_end(const std::string &key) {
    auto it = g_bytes_index.find(key);
    if (it == g_bytes_index.end()) {
        it = g_bytes_index.emplace(key, g_bytes_rows.size()).first;
        g_bytes_rows.push_back(bytes_row());
        g_bytes_rows.back().key = key;
    }
    bytes_row &r = g_bytes_rows[it->second];
    r.launches++;
    r.read += (unsigned long long)g_sectors_read.size() * RP_EMU_SECTOR;
    r.written += (unsigned long long)g_sectors_written.size() * RP_EMU_SECTOR;
    g_sectors_read.clear();
    g_sectors_written.clear();
    g_last_read_sector = g_last_written_sector = UINTPTR_MAX;
}
// A column-major matrix of rows x cols elements of es bytes, leading dimension ld.
static void bytes_note_matrix(const void *p, int rows, int cols, int ld, size_t es, bool write) {
    for (int j = 0; j < cols; j++) bytes_note((uintptr_t)p + (size_t)j * ld * es, (size_t)rows * es, write);
}
extern "C" int rp_emu_bytes_enable(int on) {
#ifdef __SANITIZE_ADDRESS__
    (void)on;
    return 0;  // the sanitizer build has no checked accesses to count
#else
    g_bytes_on = on != 0;
    g_bytes_rows.clear();
    g_bytes_index.clear();
    g_sectors_read.clear();
    g_sectors_written.clear();
    g_last_read_sector = g_last_written_sector = UINTPTR_MAX;
    return 1;
#endif
}
extern "C" int rp_emu_bytes_rows(void) { return (int)g_bytes_rows.size(); }
extern "C" int rp_emu_bytes_row(int i, rp_emu_bytes *out) {
    if (i < 0 || (size_t)i >= g_bytes_rows.size()) return 0;
    const bytes_row &r = g_bytes_rows[(size_t)i];
    out->key = r.key.c_str();
    out->launches = r.launches;
    out->bytes_read = r.read;
    out->bytes_written = r.written;
    return 1;
}

static inline void check_access(const void *p, size_t n, bool write) {
    if (!g_in_kernel) return;
    uintptr_t a = (uintptr_t)p;
    if (a - (uintptr_t)g_stacks < RP_EMU_MAX_FIBERS * STACK) return;  // a thread's locals
    for (const smem_region &r : g_smem)
        if (a >= r.lo && a < r.hi) { smem_access(r, a, n, write); return; }
    if (!(a >= g_dev_lo && a + n <= g_dev_hi) && !dev_cache_hit(a, n)) {
        dev_access(a, n, write);
        if (!(a >= g_dev_lo && a + n <= g_dev_hi)) return;  // not device memory (a fiber's stack)
    }
    if (g_bytes_on) bytes_note(a, n, write);
    if (g_pdl_track) pdl_access(a, n, write);
}

// ---- programmatic dependent launch ----
// A kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization
// may start while the kernel before it on the stream still runs (once every
// block of that one called cudaTriggerProgrammaticLaunchCompletion or
// exited); only cudaGridDependencySynchronize waits for it to complete with
// its writes visible. Blocks here run one after another, so instead of
// running the dependent early the emulator keeps, per stream, the device
// bytes the kernel before wrote (pdl_hazard), and a thread of a PDL kernel
// that reads or writes one of them before its cudaGridDependencySynchronize
// is reported: on a GPU it would read stale data (or race), sometimes.
// Only with the checked accesses (not in the sanitizer build).
typedef std::vector<std::pair<uintptr_t, uintptr_t>> byte_ranges;
static const byte_ranges *g_pdl_hazard;  // the running PDL kernel's, else null
static byte_ranges g_pdl_writes;         // device bytes the running kernel wrote
// A block releases the next PDL kernel when a thread of it triggers or when
// it exits; it does so before the kernel before it completed when a thread
// triggered before its own grid sync, or when no thread of it waited at all.
static bool g_blk_triggered_early, g_blk_synced;
static bool g_pdl_all_early;  // every block so far released early
static void merge_ranges(byte_ranges &r) {
    std::sort(r.begin(), r.end());
    size_t k = 0;
    for (size_t i = 0; i < r.size(); i++) {
        if (k && r[i].first <= r[k - 1].second) r[k - 1].second = std::max(r[k - 1].second, r[i].second);
        else r[k++] = r[i];
    }
    r.resize(k);
}
static bool ranges_hit(const byte_ranges &r, uintptr_t a, size_t n) {
    auto it = std::upper_bound(r.begin(), r.end(), std::make_pair(a, UINTPTR_MAX));
    if (it != r.end() && it->first < a + n) return true;       // a range starting inside [a, a+n)
    return it != r.begin() && std::prev(it)->second > a;        // the range starting at or before a
}
static void pdl_access(uintptr_t a, size_t n, bool write) {
    if (g_pdl_hazard && !g_fib[g_cur].dep_synced && ranges_hit(*g_pdl_hazard, a, n)) {
        uintptr_t base = 0; const alloc_info *al = find_alloc((void *)a, &base);
        die("%s block (%u,%u,%u) thread (%u,%u,%u): %s of %zu bytes at %p (byte %zu of a %zu-byte device allocation) "
            "that a kernel it may overlap writes, before cudaGridDependencySynchronize: in a programmatic dependent launch "
            "(PDL) it may run alongside the kernel before it on the stream (and earlier ones if that one triggered before "
            "its own sync); wait with cudaGridDependencySynchronize() first",
            g_kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, write ? "write" : "read", n,
            (void *)a, (size_t)(a - base), al ? al->bytes : (size_t)0);
    }
    if (write && g_pdl_seen) {
        if (!g_pdl_writes.empty() && a >= g_pdl_writes.back().first && a <= g_pdl_writes.back().second)
            g_pdl_writes.back().second = std::max(g_pdl_writes.back().second, a + n);
        else
            g_pdl_writes.push_back({a, a + n});
    }
}
static void pdl_kernel_start(bool pdl) {
    rp_emu_stream *s = g_run_stream;
    g_pdl_hazard = pdl && s && !s->pdl_hazard.empty() ? &s->pdl_hazard : nullptr;
    g_pdl_writes.clear();
    g_pdl_all_early = true;
    g_pdl_track = g_pdl_hazard || g_pdl_seen;
}
static void pdl_block_start() { g_blk_triggered_early = g_blk_synced = false; }
static void pdl_block_end() { g_pdl_all_early = g_pdl_all_early && (g_blk_triggered_early || !g_blk_synced); }
static void pdl_kernel_end(bool pdl) {
    rp_emu_stream *s = g_run_stream;
    g_pdl_track = false;
    g_pdl_hazard = nullptr;
    if (!s) return;
    merge_ranges(g_pdl_writes);
    // Dependents of a PDL kernel whose every block released them before the
    // kernel before it completed may overlap that one too: its hazards carry over.
    if (!(pdl && g_pdl_all_early)) s->pdl_hazard.clear();
    s->pdl_hazard.insert(s->pdl_hazard.end(), g_pdl_writes.begin(), g_pdl_writes.end());
    merge_ranges(s->pdl_hazard);
    g_pdl_writes.clear();
}
void cudaGridDependencySynchronize() {
    if (!g_in_kernel) die("cudaGridDependencySynchronize outside a kernel");
    g_fib[g_cur].dep_synced = true;
    g_blk_synced = true;
}
void cudaTriggerProgrammaticLaunchCompletion() {
    if (!g_in_kernel) die("cudaTriggerProgrammaticLaunchCompletion outside a kernel");
    if (!g_fib[g_cur].dep_synced) g_blk_triggered_early = true;
}
cudaError_t rp_emu_launch_ex_cfg(const char *name, const cudaLaunchConfig_t *c, rp_emu_cfg *out) {
    if (!c || (c->numAttrs && !c->attrs)) die("cudaLaunchKernelEx(%s): no config or attributes", name);
    *out = rp_emu_config(c->gridDim, c->blockDim, c->dynamicSmemBytes, c->stream);
    for (unsigned i = 0; i < c->numAttrs; i++) {
        const cudaLaunchAttribute &at = c->attrs[i];
        if (at.id == cudaLaunchAttributeProgrammaticStreamSerialization)
            out->pdl = at.val.programmaticStreamSerializationAllowed != 0;
        else if (at.id != cudaLaunchAttributeIgnore) {
            fprintf(stderr, "EMU LAUNCH ERROR: cudaLaunchKernelEx(%s): launch attribute %d not emulated\n", name, (int)at.id);
            return g_last = cudaErrorInvalidValue;
        }
    }
    return cudaSuccess;
}
// The instrumentation's entry points (GCC's -fsanitize=thread ABI).
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void *) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void **, void *) {}
void __tsan_vptr_read(void **) {}
#define RP_EMU_HOOKS(N) \
    void __tsan_read##N(void *p) { check_access(p, N, false); } \
    void __tsan_write##N(void *p) { check_access(p, N, true); } \
    void __tsan_unaligned_read##N(void *p) { check_access(p, N, false); } \
    void __tsan_unaligned_write##N(void *p) { check_access(p, N, true); } \
    void __tsan_volatile_read##N(void *p) { check_access(p, N, false); } \
    void __tsan_volatile_write##N(void *p) { check_access(p, N, true); }
RP_EMU_HOOKS(1) RP_EMU_HOOKS(2) RP_EMU_HOOKS(4) RP_EMU_HOOKS(8) RP_EMU_HOOKS(16)
void __tsan_read_range(void *p, unsigned long n) { check_access(p, n, false); }
void __tsan_write_range(void *p, unsigned long n) { check_access(p, n, true); }
// Atomics appear only in host-side library code (shared_ptr counts), never on device memory here.
#define RP_EMU_ATOMICS(N, T) \
    T __tsan_atomic##N##_load(const volatile T *a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
    void __tsan_atomic##N##_store(volatile T *a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_exchange(volatile T *a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_add(volatile T *a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_sub(volatile T *a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_and(volatile T *a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_or(volatile T *a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_xor(volatile T *a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
    int __tsan_atomic##N##_compare_exchange_strong(volatile T *a, T *c, T v, int, int) { \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); } \
    int __tsan_atomic##N##_compare_exchange_weak(volatile T *a, T *c, T v, int, int) { \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_compare_exchange_val(volatile T *a, T c, T v, int, int) { \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return c; }
RP_EMU_ATOMICS(8, uint8_t) RP_EMU_ATOMICS(16, uint16_t) RP_EMU_ATOMICS(32, uint32_t) RP_EMU_ATOMICS(64, uint64_t)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}

static unsigned long long g_launches, g_switches;
static int g_order = 0;  // 0 forward, 1 reverse, 2 pseudo-random
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static std::vector<uintptr_t> g_launch_uses;  // allocations of the launch being queued
void rp_emu_check_ptr(const char *k, int i, const void *p) {
    if (!p) return;
    if (!is_device_ptr(p)) die("%s: argument %d (%p) is not device memory", k, i, p);
    g_launch_uses.push_back(base_of(p));
}

static void run_kernel(const char *kernel, const rp_emu_cfg &cfg, const std::function<void()> &body);
void rp_emu_run(const char *kernel, const void *fn, const rp_emu_cfg &cfg, std::function<void()> body) {
    const dim3 g = cfg.grid, b = cfg.block;
    size_t nthreads = (size_t)b.x * b.y * b.z;
    auto bad = [&](const char *why) {
        fprintf(stderr, "EMU LAUNCH ERROR: %s <<<(%u,%u,%u),(%u,%u,%u),%zu>>>: %s\n", kernel, g.x, g.y, g.z, b.x, b.y, b.z, cfg.shmem, why);
        g_last = cudaErrorInvalidConfiguration;
        g_launch_uses.clear();
    };
    if (g.x == 0 || g.y == 0 || g.z == 0 || nthreads == 0) return bad("empty grid or block");
    if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) return bad("grid too large");
    if (b.x > 1024 || b.y > 1024 || b.z > 64 || nthreads > 1024) return bad("block too large");
    size_t maxdyn = 48 * 1024;
    auto it = g_max_dyn.find(fn);
    if (it != g_max_dyn.end()) maxdyn = it->second;
    if (cfg.shmem > maxdyn) return bad("dynamic shared memory above the allowed maximum (cudaFuncSetAttribute)");
    g_count_launches++;
    if (!strcmp(kernel, "to_bf16_kernel")) g_count_bf16_converts++;
    if (!strcmp(kernel, "gemv_group_kernel")) g_count_gemv_group_blocks += (unsigned long long)g.x * g.y * g.z;
    stream_op op;
    op.what = std::string("kernel ") + kernel;
    op.kernel = true;
    g_pdl_seen = g_pdl_seen || cfg.pdl;
    g_count_pdl_launches += cfg.pdl;
    op.uses.swap(g_launch_uses);
    op.run = [kernel, cfg, body = std::move(body)] { run_kernel(kernel, cfg, body); };
    enqueue(cfg.stream, std::move(op));
}

static void run_kernel(const char *kernel, const rp_emu_cfg &cfg, const std::function<void()> &body) {
    const dim3 g = cfg.grid, b = cfg.block;
    size_t nthreads = (size_t)b.x * b.y * b.z;
    g_launches++;
    g_kernel = kernel;
    g_body = &body;
    g_in_kernel = true;
    pdl_kernel_start(cfg.pdl);
    g_nthreads = (int)nthreads;
    blockDim = b; gridDim = g;
    if (g_fib.size() < nthreads) {
        size_t old = g_fib.size();
        g_fib.resize(nthreads);
        if (nthreads > RP_EMU_MAX_FIBERS) die("%s: %zu threads per block (at most %d)", kernel, nthreads, (int)RP_EMU_MAX_FIBERS);
        if (!g_stacks) {
            void *m = mmap(nullptr, RP_EMU_MAX_FIBERS * STACK, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) die("mmap of %zu bytes of fiber stacks: %s", RP_EMU_MAX_FIBERS * STACK, strerror(errno));
            g_stacks = (char *)m;
        }
        for (size_t t = old; t < nthreads; t++) g_fib[t].stack = g_stacks + t * STACK;
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
        smem_block_start();
        pdl_block_start();
        for (size_t t = 0; t < nthreads; t++) {
            fiber &f = g_fib[t];
            f.lin = (unsigned)t;
            f.tid = dim3((unsigned)(t % b.x), (unsigned)(t / b.x % b.y), (unsigned)(t / ((size_t)b.x * b.y)));
            f.state = F_RUN;
            f.dep_synced = false;
            f.asan_fake_stack = nullptr;
            fiber_prepare(f);
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
                    sched_to_fiber(t);
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
            check_barrier(kernel, done, bar);
            for (size_t t = 0; t < nthreads; t++) if (g_fib[t].state == F_BAR) g_fib[t].state = F_RUN;
            g_interval++;  // a new barrier interval for the race log
        }
        pdl_block_end();
    }
    g_body = nullptr;
    g_in_kernel = false;
    pdl_kernel_end(cfg.pdl);
    if (g_bytes_on) bytes_launch_end(kernel);
}

// ---- cuBLAS ----
struct rp_emu_cublas { cudaStream_t stream = nullptr; };

cublasStatus_t cublasCreate(cublasHandle_t *h) { *h = new rp_emu_cublas(); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasDestroy(cublasHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) { if (!h) return CUBLAS_STATUS_NOT_INITIALIZED; h->stream = s; return CUBLAS_STATUS_SUCCESS; }

static float load_el(const void *p, cudaDataType t, size_t i) {
    return t == CUDA_R_32F ? ((const float *)p)[i] : __bfloat162float(((const __nv_bfloat16 *)p)[i]);
}
// One GEMM in stream order (cublasGemmEx, cublasLtMatmul): column-major C
// [m,n] = alpha op(A) op(B) + beta C, the sums in double, rounded to fp32;
// bias16 (cuBLASLt's bias epilogue, bf16 C only): + bias16[row] in fp32
// before the rounding to bf16.
static cublasStatus_t emu_gemm(const char *what, cudaStream_t stream, cublasOperation_t ta,
                               cublasOperation_t tb, int m, int n, int k, const void *alpha_,
                               const void *A, cudaDataType at, int lda, const void *B,
                               cudaDataType bt, int ldb, const void *beta_, void *C_,
                               cudaDataType ct, int ldc, cublasComputeType_t compute,
                               const __nv_bfloat16 *bias16) {
    g_count_launches++;
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (ta == CUBLAS_OP_C || tb == CUBLAS_OP_C) return CUBLAS_STATUS_INVALID_VALUE;
    int arows = ta == CUBLAS_OP_N ? m : k, acols = ta == CUBLAS_OP_N ? k : m;
    int brows = tb == CUBLAS_OP_N ? k : n, bcols = tb == CUBLAS_OP_N ? n : k;
    if (lda < std::max(1, arows) || ldb < std::max(1, brows) || ldc < std::max(1, m)) {
        fprintf(stderr, "EMU %s: bad leading dimension m%d n%d k%d lda%d ldb%d ldc%d\n", what, m, n, k, lda, ldb, ldc);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // bf16 C only with bf16 A and B (cuBLAS's CUDA_R_16BF x3 + COMPUTE_32F combination)
    if (ct != CUDA_R_32F && !(ct == CUDA_R_16BF && at == CUDA_R_16BF)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (at != bt) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (at == CUDA_R_32F && !(compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC || compute == CUBLAS_COMPUTE_32F_FAST_TF32)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (at == CUDA_R_16BF && compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    size_t es = at == CUDA_R_32F ? 4 : 2;
    if (k > 0) {
        if (!is_device(A, ((size_t)(acols - 1) * lda + arows) * es)) die("%s: A %p (%dx%d, lda %d) outside device memory", what, A, arows, acols, lda);
        if (!is_device(B, ((size_t)(bcols - 1) * ldb + brows) * es)) die("%s: B %p (%dx%d, ldb %d) outside device memory", what, B, brows, bcols, ldb);
    }
    const size_t ces = ct == CUDA_R_32F ? 4 : 2;
    if (!is_device(C_, ((size_t)(n - 1) * ldc + m) * ces)) die("%s: C outside device memory", what);
    if (bias16 && (ct != CUDA_R_16BF || !is_device(bias16, (size_t)m * 2)))
        die("%s: bias %p (%d bf16) outside device memory or C not bf16", what, (const void *)bias16, m);
    // Host pointer mode: alpha and beta are read now; the GEMM runs in stream order.
    const float alpha = *(const float *)alpha_, beta = *(const float *)beta_;
    stream_op op;
    op.what = what;
    op.uses = {base_of(A), base_of(B), base_of(C_)};
    if (bias16) op.uses.push_back(base_of(bias16));
    op.kernel = true;  // a GEMM kernel: a PDL kernel after it may overlap its writes of C
    op.run = [=] {
    if (g_run_stream) {
        const uintptr_t c0 = (uintptr_t)C_;
        g_run_stream->pdl_hazard.assign(1, {c0, c0 + ((size_t)(n - 1) * ldc + m) * ces});
    }
    if (g_bytes_on) {
        bytes_note_matrix(A, arows, acols, lda, es, false);
        bytes_note_matrix(B, brows, bcols, ldb, es, false);
        if (beta != 0.0f) bytes_note_matrix(C_, m, n, ldc, ces, false);
        if (bias16) bytes_note_matrix(bias16, m, 1, m, 2, false);
        bytes_note_matrix(C_, m, n, ldc, ces, true);
        char key[160];
        snprintf(key, sizeof key, "%s %c%c m%d n%d k%d %s%s->%s%s%s", what, ta == CUBLAS_OP_N ? 'N' : 'T',
                 tb == CUBLAS_OP_N ? 'N' : 'T', m, n, k, at == CUDA_R_32F ? "f32" : "bf16",
                 bt == CUDA_R_32F ? "f32" : "bf16", ct == CUDA_R_32F ? "f32" : "bf16", beta != 0.0f ? " +C" : "",
                 bias16 ? " +bias" : "");
        bytes_launch_end(key);
    }
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
            const size_t ci = (size_t)j * ldc + i;
            if (ct == CUDA_R_16BF) {  // the fp32 result rounded once more to bf16 (RNE)
                __nv_bfloat16 *c16 = (__nv_bfloat16 *)C_;
                float f = beta == 0.0f ? (float)(alpha * s)
                                       : (float)(alpha * s + (double)beta * __bfloat162float(c16[ci]));
                if (bias16) f = f + __bfloat162float(bias16[i]);  // fp32, as the epilogue adds it
                c16[ci] = __float2bfloat16(f);
                continue;
            }
            float &c = C[ci];
            c = beta == 0.0f ? (float)(alpha * s) : (float)(alpha * s + (double)beta * c);
        }
    };
    enqueue(stream, std::move(op));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B,
                            cudaDataType bt, int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    return emu_gemm("cublasGemmEx", h->stream, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc,
                    compute, nullptr);
}

// ---- cuBLASLt (tests/cuda_emu/cublasLt.h): one GEMM, DEFAULT or BIAS epilogue ----
struct rp_emu_lt { int unused; };
struct rp_emu_lt_desc {
    cublasComputeType_t compute;
    cudaDataType scale;
    int32_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
    uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void *bias = nullptr;
    int32_t bias_type = -1;  // -1: D's type
};
struct rp_emu_lt_layout { cudaDataType type; uint64_t rows, cols; int64_t ld; };
struct rp_emu_lt_pref { uint64_t workspace = 0; };
cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) { *h = new rp_emu_lt(); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType_t scale) {
    *d = new rp_emu_lt_desc();
    (*d)->compute = compute;
    (*d)->scale = scale;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { delete d; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t bytes) {
    if (!d || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: if (bytes != 4) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->ta, buf, 4); break;
    case CUBLASLT_MATMUL_DESC_TRANSB: if (bytes != 4) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->tb, buf, 4); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: if (bytes != 4) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->epilogue, buf, 4); break;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: if (bytes != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->bias, buf, bytes); break;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: if (bytes != 4) return CUBLAS_STATUS_INVALID_VALUE; memcpy(&d->bias_type, buf, 4); break;
    default: return CUBLAS_STATUS_INVALID_VALUE;
    }
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    *l = new rp_emu_lt_layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) { delete l; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) { *p = new rp_emu_lt_pref(); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) { delete p; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void *buf, size_t bytes) {
    if (!p || !buf || attr != CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES || bytes != 8) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(&p->workspace, buf, 8);
    return CUBLAS_STATUS_SUCCESS;
}
// What the emulator runs: bf16 A, B and C = D (in place), fp32 compute and
// scale, DEFAULT or BIAS (bf16 bias, 2-byte aligned) epilogue; anything else
// has no algorithm (0 results), as a real heuristic can answer.
static bool lt_supported(const rp_emu_lt_desc *op, const rp_emu_lt_layout *a, const rp_emu_lt_layout *b,
                         const rp_emu_lt_layout *c, const rp_emu_lt_layout *d) {
    if (!op || !a || !b || !c || !d) return false;
    if (op->compute != CUBLAS_COMPUTE_32F || op->scale != CUDA_R_32F) return false;
    if (a->type != CUDA_R_16BF || b->type != CUDA_R_16BF || c->type != CUDA_R_16BF || d->type != CUDA_R_16BF) return false;
    if (c->rows != d->rows || c->cols != d->cols || c->ld != d->ld) return false;
    if (op->epilogue == CUBLASLT_EPILOGUE_BIAS)
        return op->bias && (op->bias_type == -1 || op->bias_type == CUDA_R_16BF) && (uintptr_t)op->bias % 2 == 0;
    return op->epilogue == CUBLASLT_EPILOGUE_DEFAULT;
}
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref,
                                              int requested, cublasLtMatmulHeuristicResult_t results[], int *returned) {
    if (!h || !pref || requested < 1 || !results || !returned) return CUBLAS_STATUS_INVALID_VALUE;
    *returned = 0;
    if (!lt_supported(op, a, b, c, d)) return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(&results[0], 0, sizeof results[0]);
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t op, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t a, const void *B, cublasLtMatrixLayout_t b, const void *beta,
                              const void *C, cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t *algo, void *, size_t, cudaStream_t stream) {
    if (!h || !algo) return CUBLAS_STATUS_INVALID_VALUE;
    if (!lt_supported(op, a, b, c, d) || C != D) return CUBLAS_STATUS_NOT_SUPPORTED;
    const int m = (int)d->rows, n = (int)d->cols;
    const int k = (int)(op->ta == CUBLAS_OP_N ? a->cols : a->rows);
    if ((int)(op->tb == CUBLAS_OP_N ? b->rows : b->cols) != k ||
        (int)(op->ta == CUBLAS_OP_N ? a->rows : a->cols) != m || (int)(op->tb == CUBLAS_OP_N ? b->cols : b->rows) != n)
        return CUBLAS_STATUS_INVALID_VALUE;
    return emu_gemm("cublasLtMatmul", stream, (cublasOperation_t)op->ta, (cublasOperation_t)op->tb, m, n, k, alpha,
                    A, CUDA_R_16BF, (int)a->ld, B, CUDA_R_16BF, (int)b->ld, beta, D, CUDA_R_16BF, (int)d->ld,
                    op->compute, op->epilogue == CUBLASLT_EPILOGUE_BIAS ? (const __nv_bfloat16 *)op->bias : nullptr);
}

extern "C" int rp_emu_set_alloc_pad(int seed) {
    const int was = g_alloc_pad_seed;
    g_alloc_pad_seed = seed > 0 ? seed : 0;
    g_alloc_pad_rng = seed > 0 ? (uint64_t)seed * 0x9e3779b97f4a7c15ull : 0;
    if (g_alloc_pad_rng) return was;
    for (size_t i = 0; i < g_n_quarantine; i++) free(g_quarantine[i]);
    g_n_quarantine = 0;
    return was;
}
extern "C" void rp_emu_counts(rp_emu_counters *out) {
    out->launches = g_count_launches;
    out->copies = g_count_copies;
    out->allocs = g_count_allocs;
    out->bf16_converts = g_count_bf16_converts;
    out->graph_launches = g_count_graph_launches;
    out->gemv_group_blocks = g_count_gemv_group_blocks;
    out->pdl_launches = g_count_pdl_launches;
    out->device_bytes = g_device_bytes;
}

// ---- cuda_device.cu replacement ----
extern "C" int rp_cuda_device_count(void) { return 1; }
extern "C" void rp_cuda_device_describe(int index, char *out, size_t out_size) { snprintf(out, out_size, "device %d: CPU emulation (sm_90)", index); }
extern "C" int rp_cuda_device_select(int index, char *, size_t) { return index == 0 ? 0 : 1; }
extern "C" void rp_cuda_versions(char *out, size_t out_size) { snprintf(out, out_size, "CUDA emulation"); }

__attribute__((constructor)) static void emu_init() {
    if (getenv("EMU_ORDER")) g_order = atoi(getenv("EMU_ORDER"));
    if (getenv("EMU_STREAM_ORDER")) {
        g_stream_order = atoi(getenv("EMU_STREAM_ORDER"));
        g_stream_rng ^= (uint64_t)g_stream_order * 0x9e3779b97f4a7c15ull;
    }
    struct sigaction sa; memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_handler; sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, &g_old_segv);
    if (getenv("EMU_FAIL_MALLOC")) g_fail_malloc_after = atoi(getenv("EMU_FAIL_MALLOC"));
    if (getenv("EMU_ALLOC_PAD")) rp_emu_set_alloc_pad(atoi(getenv("EMU_ALLOC_PAD")));
}
__attribute__((destructor)) static void emu_fini() {
    fprintf(stderr, "EMU: %llu launches, %llu fiber switches\n", g_launches, g_switches);
}
