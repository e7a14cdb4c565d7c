// The CUDA backend's context and the ops that are not kernels of their own:
// memory and copies, the sticky error, bf16 weight copies, scratch and
// uploads shared by the kernel files (the GEMMs are in cuda_matmul.cu).
// rp_cuda_backend_create fills the vtable; each cuda_*.cu installs its ops.
#include "cuda_internal.h"
#include "core/dtype.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

extern "C" const char *rp_cuda_math_name(rp_cuda_math math) {
    return math == RP_CUDA_MATH_FP32 ? "fp32" : "bf16";
}

extern "C" int rp_cuda_math_parse(const char *text) {
    if (!text) return -1;
    if (!strcmp(text, "bf16")) return RP_CUDA_MATH_BF16;
    if (!strcmp(text, "fp32")) return RP_CUDA_MATH_FP32;
    return -1;
}

// ---- errors ----

int rp_cuda_record(rp_cuda_ctx *cx, cudaError_t rc, const char *what, const char *file,
                   int line) {
    if (rc == cudaSuccess) return 1;
    if (cx->error.code == RP_OK)
        rp_error_set(&cx->error, rc == cudaErrorMemoryAllocation ? RP_ERR_NOMEM : RP_ERR_INTERNAL,
                     "CUDA device %d: %s failed (%s:%d): %s", cx->device, what, file, line,
                     cudaGetErrorString(rc));
    cudaGetLastError();  // clear a non-sticky error so the next check is about the next call
    return 0;
}

static const char *cublas_text(cublasStatus_t rc) {
    switch (rc) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "cuBLAS not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "cuBLAS could not allocate";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value (shape or leading dimension)";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "not supported on this GPU";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "kernel failed to execute";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "type/compute combination not supported";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "cuBLAS internal error";
    default: return "cuBLAS error";
    }
}

int rp_cuda_record_cublas(rp_cuda_ctx *cx, cublasStatus_t rc, const char *what, const char *file,
                          int line) {
    if (rc == CUBLAS_STATUS_SUCCESS) return 1;
    if (cx->error.code == RP_OK)
        rp_error_set(&cx->error, rc == CUBLAS_STATUS_ALLOC_FAILED ? RP_ERR_NOMEM : RP_ERR_INTERNAL,
                     "CUDA device %d: %s failed (%s:%d): %s (status %d)", cx->device, what, file,
                     line, cublas_text(rc), (int)rc);
    return 0;
}

static rp_status cuda_status(rp_backend *be, rp_error *err) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (cx->error.code == RP_OK) return RP_OK;
    if (err) *err = cx->error;
    return cx->error.code;
}

// ---- scratch and uploads ----

void *rp_cuda_scratch(rp_cuda_ctx *cx, int area, size_t bytes) {
    bytes = (bytes + 255) / 256 * 256;
    if (bytes == 0) bytes = 256;
    if (cx->scratch_bytes[area] >= bytes) return cx->scratch[area];
    // Kernels already queued may still read the old buffer.
    RP_CUDA_OK(cx, cudaStreamSynchronize(cx->stream));
    if (cx->scratch[area]) cudaFree(cx->scratch[area]);
    cx->scratch[area] = NULL;
    cx->scratch_bytes[area] = 0;
    size_t grown = bytes + bytes / 4;  // room for the next, slightly larger call
    if (!RP_CUDA_OK(cx, cudaMalloc(&cx->scratch[area], grown))) return NULL;
    cx->scratch_bytes[area] = grown;
    return cx->scratch[area];
}

// Per upload slot: a device buffer, a pinned staging buffer, a host copy of
// what was last uploaded, and an event marking the end of that upload.
// Identical consecutive uploads (the same batch for every layer of a step)
// are skipped, so the common case costs a memcmp; a changed upload copies
// through pinned memory, truly asynchronous (an upload from pageable memory
// would synchronize the stream on every call).
struct upload_slot_extra {
    int32_t *pinned;
    int32_t *last;
    size_t last_count;
    cudaEvent_t done;
    int valid;
};
static upload_slot_extra *upload_extra(rp_cuda_ctx *cx);

// Replaces the buffers of `slot` by ones of at least n ints; 0 after a
// failure (recorded). Synchronizes first: queued copies may still read them.
static int rp_cuda_upload_grow(rp_cuda_ctx *cx, int slot, size_t n) {
    upload_slot_extra *u = &upload_extra(cx)[slot];
    RP_CUDA_OK(cx, cudaStreamSynchronize(cx->stream));
    if (cx->upload[slot]) cudaFree(cx->upload[slot]);
    if (u->pinned) cudaFreeHost(u->pinned);
    free(u->last);
    cx->upload[slot] = NULL;
    u->pinned = u->last = NULL;
    cx->upload_count[slot] = 0;
    u->valid = 0;
    size_t cap = n < 1024 ? 1024 : n + n / 2;
    if (!RP_CUDA_OK(cx, cudaMalloc(&cx->upload[slot], cap * sizeof(int32_t))) ||
        !RP_CUDA_OK(cx, cudaMallocHost(&u->pinned, cap * sizeof(int32_t))))
        return 0;
    u->last = (int32_t *)malloc(cap * sizeof(int32_t));
    if (!u->last) {
        rp_cuda_record(cx, cudaErrorMemoryAllocation, "upload host copy", __FILE__, __LINE__);
        return 0;
    }
    cx->upload_count[slot] = cap;
    return 1;
}

const int32_t *rp_cuda_upload(rp_cuda_ctx *cx, int slot, const int32_t *host, size_t n) {
    if (const int32_t *staged = rp_cuda_step_input(cx, host, n)) return staged;
    upload_slot_extra *u = &upload_extra(cx)[slot];
    if (n == 0) n = 1, host = NULL;  // a valid pointer even for empty arrays
    if (u->valid && host && u->last_count == n && !memcmp(u->last, host, n * sizeof(int32_t)))
        return cx->upload[slot];
    if (cx->upload_count[slot] < n && !rp_cuda_upload_grow(cx, slot, n)) return NULL;
    // The previous copy out of the staging buffer must be done before we refill it.
    RP_CUDA_OK(cx, cudaEventSynchronize(u->done));
    if (host) memcpy(u->pinned, host, n * sizeof(int32_t));
    else memset(u->pinned, 0, n * sizeof(int32_t));
    RP_CUDA_OK(cx, cudaMemcpyAsync(cx->upload[slot], u->pinned, n * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, cx->stream));
    RP_CUDA_OK(cx, cudaEventRecord(u->done, cx->stream));
    if (host) {
        memcpy(u->last, host, n * sizeof(int32_t));
        u->last_count = n;
        u->valid = 1;
    } else {
        u->valid = 0;
    }
    return cx->upload[slot];
}

int rp_cuda_upload_batch(rp_cuda_ctx *cx, const rp_batch *batch, rp_cuda_batch *out) {
    if (rp_cuda_step_batch(cx, batch, out)) return 1;
    const int n = batch->n_seq;
    memset(out, 0, sizeof *out);
    out->n_seq = n;
    out->n_rows = batch->n_rows;
    int32_t *blocks = (int32_t *)malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    if (!blocks) {
        rp_cuda_record(cx, cudaErrorMemoryAllocation, "batch upload", __FILE__, __LINE__);
        return 0;
    }
    int32_t at = 0;
    for (int s = 0; s < n; s++) {
        blocks[s] = at;
        at += (batch->seq_len[s] + RP_WKV_CHUNK - 1) / RP_WKV_CHUNK;
        if (batch->seq_len[s] > out->max_seq_len) out->max_seq_len = batch->seq_len[s];
    }
    static_assert(sizeof(int) == sizeof(int32_t), "rp_batch arrays are int");
    out->seq_len = rp_cuda_upload(cx, RP_CUDA_UP_SEQ_LEN, (const int32_t *)batch->seq_len, n);
    out->row_begin = rp_cuda_upload(cx, RP_CUDA_UP_ROW_BEGIN, (const int32_t *)batch->row_begin, n);
    out->slot = rp_cuda_upload(cx, RP_CUDA_UP_SLOT, (const int32_t *)batch->slot, n);
    out->ckpt_block = rp_cuda_upload(cx, RP_CUDA_UP_CKPT_BLOCK, blocks, n);
    free(blocks);
    return out->seq_len && out->row_begin && out->slot && out->ckpt_block;
}

// out[c] (+)= sum_p partials[p n + c], p ascending
__global__ void sum_partials_kernel(float *out, const float *partials, int n_parts, size_t n,
                                    int accumulate) {
    size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    float s = 0.0f;
    for (int p = 0; p < n_parts; p++) s += partials[(size_t)p * n + c];
    out[c] = accumulate ? out[c] + s : s;
}

void rp_cuda_sum_partials(rp_cuda_ctx *cx, float *out, const float *partials, int n_parts,
                          size_t n, int accumulate) {
    if (n == 0) return;
    sum_partials_kernel<<<rp_cuda_blocks(n, 256), 256, 0, cx->stream>>>(out, partials, n_parts, n,
                                                                         accumulate);
    RP_CUDA_LAUNCHED_OUT(cx, "sum_partials", {out, n * sizeof(float)});
}

// ---- bf16 copies ----

// dst [n] = bf16(src [n]), 4 per thread where aligned
__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride) dst[i] = __float2bfloat16(src[i]);
}

void rp_cuda_to_bf16(rp_cuda_ctx *cx, __nv_bfloat16 *dst, const float *src, size_t n) {
    if (n == 0) return;
    unsigned blocks = rp_cuda_blocks(n, 256);
    const unsigned cap = (unsigned)cx->n_sm * 16;
    if (blocks > cap) blocks = cap;
    to_bf16_kernel<<<blocks, 256, 0, cx->stream>>>(dst, src, n);
    // not RP_CUDA_LAUNCHED: it writes only bf16, the activation copies stay valid
    rp_cuda_record(cx, cudaGetLastError(), "to_bf16", __FILE__, __LINE__);
}

// ---- bf16 activation copies (rp_cuda_act16) ----

__nv_bfloat16 *rp_cuda_act16_claim(rp_cuda_ctx *cx, const float *p, size_t n,
                                   const __nv_bfloat16 *keep) {
    if (cx->math != RP_CUDA_MATH_BF16 || n == 0) return NULL;
    // Every slot grows to the largest copy yet, so that after a warm-up step
    // at the largest shapes no slot allocates, whichever slot a copy gets.
    if (n > cx->act16_max) cx->act16_max = n;
    // Least recently used, but a sole copy (publish_sole) only when every
    // slot holds one: its f32 is stale, the copy is its only value. Never a
    // slot this op already claimed (its kernel has not run: no launch since),
    // which would hand one buffer out for two copies.
    int pick = -1;
    for (int i = 0; i < RP_CUDA_ACT16_SLOTS; i++) {
        const rp_cuda_act16 *a = &cx->act16[i];
        if (a->buf && a->buf == keep) continue;
        if (a->buf && !a->p && a->claim_seq == cx->seq && a->used) continue;
        if (a->p == p) {  // a new copy of the same activation replaces the old one
            pick = i;
            break;
        }
        if (pick < 0) {
            pick = i;
            continue;
        }
        const rp_cuda_act16 *b = &cx->act16[pick];
        const int a_sole = a->p && a->sole, b_sole = b->p && b->sole;
        if (a_sole != b_sole ? b_sole : a->used < b->used) pick = i;
    }
    if (pick < 0) {
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda: one op asked for more bf16 activation copies than the %d "
                         "slots (RP_CUDA_ACT16_SLOTS, cuda_internal.h)",
                         RP_CUDA_ACT16_SLOTS);
        return NULL;
    }
    rp_cuda_act16 *a = &cx->act16[pick];
    if (a->p && a->sole && a->p != p) {
        if (a->seq == cx->seq) {  // still valid: its GEMMs may be queued after this
            if (cx->error.code == RP_OK)
                rp_error_set(&cx->error, RP_ERR_INTERNAL,
                             "cuda: every bf16 activation copy slot holds the only copy of a "
                             "GEMM-only output (%zu floats); drop a gemm_only hint before a "
                             "bias_act_backward with a bias gradient",
                             a->n);
            return NULL;
        }
        // ended by a launch: its f32 stays stale; keep that mark past the
        // slot so that a GEMM converting it later is still refused
        // (rp_cuda_act16_stale)
        if (cx->n_act16_stale == RP_CUDA_ACT16_STALE_MAX) {
            if (cx->error.code == RP_OK)
                rp_error_set(&cx->error, RP_ERR_INTERNAL,
                             "cuda: %d GEMM-only outputs lost their only (bf16) copy and were "
                             "not written again; drop a gemm_only hint or raise "
                             "RP_CUDA_ACT16_STALE_MAX (cuda_internal.h)",
                             RP_CUDA_ACT16_STALE_MAX);
            return NULL;
        }
        cx->act16_stale[cx->n_act16_stale].p = a->p;
        cx->act16_stale[cx->n_act16_stale++].n = a->n;
    }
    void *buf = rp_cuda_scratch(cx, RP_CUDA_SCRATCH_ACT16 + pick,
                                cx->act16_max * sizeof(__nv_bfloat16));
    a->p = NULL;
    a->sole = 0;
    if (!buf) return NULL;
    a->buf = (__nv_bfloat16 *)buf;
    a->used = ++cx->clock;
    a->claim_seq = cx->seq;
    return a->buf;
}

void rp_cuda_act16_publish(rp_cuda_ctx *cx, const __nv_bfloat16 *buf, const float *p, size_t n) {
    for (int i = 0; i < RP_CUDA_ACT16_SLOTS; i++) {
        rp_cuda_act16 *a = &cx->act16[i];
        if (a->buf != buf) continue;
        a->p = p;
        a->n = n;
        a->seq = cx->seq;
        a->sole = 0;
        return;
    }
}

void rp_cuda_act16_publish_sole(rp_cuda_ctx *cx, const __nv_bfloat16 *buf, const float *p,
                                size_t n) {
    rp_cuda_act16_publish(cx, buf, p, n);
    for (int i = 0; i < RP_CUDA_ACT16_SLOTS; i++)
        if (cx->act16[i].buf == buf) cx->act16[i].sole = 1;
}

int rp_cuda_act16_stale(const rp_cuda_ctx *cx, const float *p, size_t n) {
    for (int i = 0; i < RP_CUDA_ACT16_SLOTS; i++) {
        const rp_cuda_act16 *a = &cx->act16[i];
        if (a->p && a->sole && a->p < p + n && p < a->p + a->n) return 1;
    }
    for (int i = 0; i < cx->n_act16_stale; i++) {
        const float *b = cx->act16_stale[i].p;
        if (b < p + n && p < b + cx->act16_stale[i].n) return 1;
    }
    return 0;
}

const __nv_bfloat16 *rp_cuda_act16_find(rp_cuda_ctx *cx, const float *p, size_t n) {
    if (cx->math != RP_CUDA_MATH_BF16 || cx->act16_off) return NULL;
    for (int i = 0; i < RP_CUDA_ACT16_SLOTS; i++) {
        rp_cuda_act16 *a = &cx->act16[i];
        if (a->p != p || a->n != n || a->seq != cx->seq) continue;
        a->used = ++cx->clock;
        return a->buf;
    }
    return NULL;
}

void rp_cuda_act16_forget(rp_cuda_ctx *cx, const void *p, size_t bytes) {
    const char *b = (const char *)p, *e = b + bytes;
    for (int i = 0; i < cx->n_inplace;) {
        // a bf16 range holds its n values in its first n x 2 bytes (a buffer
        // sized for bf16-only storage ends there, store16_promise)
        const size_t esize = cx->inplace[i].f32 ? sizeof(float) : sizeof(__nv_bfloat16);
        const char *ib = (const char *)cx->inplace[i].p, *ie = ib + cx->inplace[i].n * esize;
        if (ib < e && b < ie)
            cx->inplace[i] = cx->inplace[--cx->n_inplace];
        else
            i++;
    }
    for (int i = 0; i < RP_CUDA_ACT16_SLOTS; i++) {
        rp_cuda_act16 *a = &cx->act16[i];
        if (!a->p) continue;
        const char *ab = (const char *)a->p, *ae = ab + a->n * sizeof(float);
        if (ab < e && b < ae) a->p = NULL;
    }
    for (int i = 0; i < cx->n_act16_stale;) {  // written again: its f32 is current
        const char *sb = (const char *)cx->act16_stale[i].p;
        const char *se = sb + cx->act16_stale[i].n * sizeof(float);
        if (sb < e && b < se)
            cx->act16_stale[i] = cx->act16_stale[--cx->n_act16_stale];
        else
            i++;
    }
}

const __nv_bfloat16 *rp_cuda_inplace_find(rp_cuda_ctx *cx, const float *x, size_t n) {
    for (int i = 0; i < cx->n_inplace; i++) {
        const rp_cuda_inplace *r = &cx->inplace[i];
        if (!r->f32 && x >= r->p && x < r->end && x + n <= r->p + r->n)
            return (const __nv_bfloat16 *)r->p + (x - r->p);
    }
    return NULL;
}

int rp_cuda_rkv16(rp_cuda_ctx *cx, const char *op, const float *r, const float *k,
                  const float *v, const float *g, size_t n, const __nv_bfloat16 **rkv16) {
    const float *const in[4] = {r, k, v, g};
    const int count = g ? 4 : 3;
    int found = 0;
    rkv16[3] = NULL;
    for (int i = 0; i < count; i++) {
        rkv16[i] = n > 0 ? rp_cuda_inplace_find(cx, in[i], n) : NULL;
        found += rkv16[i] != NULL;
    }
    if (found == count) return 1;
    if (found) {
        const char *const bf16 = "bf16 in place", *const f32 = "f32";
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda %s: r is stored %s, k %s, v %s%s%s; the kernels take them in "
                         "one type: hint all of them rkv_only or none",
                         op, rkv16[0] ? bf16 : f32, rkv16[1] ? bf16 : f32,
                         rkv16[2] ? bf16 : f32, g ? " and g " : "",
                         g ? (rkv16[3] ? bf16 : f32) : "");
        return -1;
    }
    // f32 inputs are read whole: not past a bf16-only buffer
    for (int i = 0; i < count; i++)
        if (n > 0 && !rp_cuda_store16_fits(cx, in[i], n, op)) return -1;
    return 0;
}

// Room for one more of the n records in the host array *a of *cap
// (doubling, from first); 0 when it cannot grow (nothing changed).
template <typename T>
static int grow_records(T **a, int *cap, int n, int first) {
    if (n < *cap) return 1;
    const int grown_cap = *cap ? 2 * *cap : first;
    T *grown = (T *)realloc(*a, (size_t)grown_cap * sizeof(T));
    if (!grown) return 0;
    *a = grown;
    *cap = grown_cap;
    return 1;
}

void rp_cuda_inplace_add(rp_cuda_ctx *cx, const float *p, size_t n, int f32) {
    if (!grow_records(&cx->inplace, &cx->cap_inplace, cx->n_inplace, 16)) {
        // cannot record it: a sticky error, the step's results are void
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_NOMEM,
                         "cuda: out of host memory recording a bf16 GEMM output");
        return;
    }
    const float *end = p + n;
    for (int i = 0; i < cx->n_store16; i++) {
        const rp_cuda_store16 *b = &cx->store16[i];
        if (p >= b->p && p < b->p + b->cap && b->p + b->cap < end) end = b->p + b->cap;
    }
    cx->inplace[cx->n_inplace++] = {p, n, f32, end};
}

int rp_cuda_store16_fits(rp_cuda_ctx *cx, const float *p, size_t n, const char *op) {
    for (int i = 0; i < cx->n_store16; i++) {
        const rp_cuda_store16 *b = &cx->store16[i];
        // an access that starts inside the buffer's cap floats (past them
        // lies the next buffer) and ends past them
        if (p < b->p || p >= b->p + b->cap || p + n <= b->p + b->cap) continue;
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_INTERNAL,
                         "cuda %s: an f32 access of %zu floats at offset %td of a training "
                         "activation sized for bf16-only storage (%zu elements in %zu floats, "
                         "backend.h store16_promise) would run past its buffer; the bf16 "
                         "storage was switched off (copies off, rp_cuda_backend_set_act16) or "
                         "the hint was dropped: reallocate the training workspace",
                         op, n, p - b->p, b->n, b->cap);
        return 0;
    }
    return 1;
}

void rp_cuda_store16_drop(rp_cuda_ctx *cx, const void *p, size_t bytes) {
    const char *lo = (const char *)p, *hi = lo + bytes;
    for (int i = 0; i < cx->n_store16;) {
        const char *b = (const char *)cx->store16[i].p;
        if (b >= lo && b < hi)
            cx->store16[i] = cx->store16[--cx->n_store16];
        else
            i++;
    }
}

// Memory freed, or newly handed out where a freed buffer was: every record
// of the range goes (bf16 activation copies, in-place ranges, stale marks,
// bf16-only sizes), whichever allocator (cuda_alloc, the sparse buffers) it
// came from.
static void forget_memory(rp_cuda_ctx *cx, const void *p, size_t bytes) {
    rp_cuda_act16_forget(cx, p, bytes);
    rp_cuda_store16_drop(cx, p, bytes);
}

// backend.h store16_fits: every hinted training activation (FFN hidden,
// w_raw, kk, y, og, a, r, k, v, k_pre, v_pre, nu) is written bf16 in place
// where rp_cuda_store16_rows says, with the copies on; at most RP_GEMV_MAX_M
// rows it is f32, which fits half a buffer of at least 2 x RP_GEMV_MAX_M rows.
static int cuda_store16_fits(rp_backend *be, int max_rows) {
    const rp_cuda_ctx *cx = rp_cuda_of(be);
    return cx->math == RP_CUDA_MATH_BF16 && !cx->act16_off && max_rows >= 2 * RP_GEMV_MAX_M;
}

static void cuda_store16_promise(rp_backend *be, const float *p, size_t n, size_t cap) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!grow_records(&cx->store16, &cx->cap_store16, cx->n_store16, 64)) {
        // unrecorded, an overrun could go unrefused: the step is void
        if (cx->error.code == RP_OK)
            rp_error_set(&cx->error, RP_ERR_NOMEM,
                         "cuda: out of host memory recording a bf16-only activation");
        return;
    }
    cx->store16[cx->n_store16++] = {p, n, cap};
}

static void cuda_gemm_only(rp_backend *be, const float *p, size_t n) {
    rp_cuda_hint_gemm_only(rp_cuda_of(be), p, n);
}

static void cuda_wkv_only(rp_backend *be, const float *p, size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    cx->wkv_only_p = p;
    cx->wkv_only_n = n;
}

static void cuda_rkv_only(rp_backend *be, const float *p, size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    cx->rkv_only_p = p;
    cx->rkv_only_n = n;
}

static void cuda_drkv_only(rp_backend *be, const float *dr, const float *dk, const float *dv,
                           size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    cx->drkv_only_p[0] = dr;
    cx->drkv_only_p[1] = dk;
    cx->drkv_only_p[2] = dv;
    cx->drkv_only_n = n;
}

int rp_cuda_launched_out(rp_cuda_ctx *cx, const char *name, const char *file, int line,
                         std::initializer_list<rp_cuda_out> outs) {
    for (const rp_cuda_out &o : outs)
        if (o.p && o.bytes) rp_cuda_act16_forget(cx, o.p, o.bytes);
    return rp_cuda_record(cx, cudaGetLastError(), name, file, line);
}

__nv_bfloat16 *rp_cuda_weight_shadow(rp_cuda_ctx *cx, const float *p, size_t n) {
    if (cx->math != RP_CUDA_MATH_BF16) return NULL;
    for (int i = 0; i < cx->n_weights; i++) {
        const rp_cuda_weights *w = &cx->weights[i];
        if (p >= w->base && p + n <= w->base + w->n) return w->shadow + (p - w->base);
    }
    return NULL;
}

// After a write of [dst, dst + bytes) through the backend: refresh the part
// of any bf16 copy it overlaps.
static void refresh_shadows(rp_cuda_ctx *cx, const void *dst, size_t bytes) {
    const float *lo = (const float *)dst, *hi = (const float *)((const char *)dst + bytes);
    for (int i = 0; i < cx->n_weights; i++) {
        const rp_cuda_weights *w = &cx->weights[i];
        const float *b = lo > w->base ? lo : w->base;
        const float *e = hi < w->base + w->n ? hi : w->base + w->n;
        if (b < e) rp_cuda_to_bf16(cx, w->shadow + (b - w->base), b, (size_t)(e - b));
    }
}

static void cuda_register_weights(rp_backend *be, const float *w, size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    rp_cuda_step_drop(cx);  // graphs bake in the bf16 copies' addresses
    if (cx->math != RP_CUDA_MATH_BF16 || !w || n == 0) return;
    for (int i = 0; i < cx->n_weights; i++)
        if (cx->weights[i].base == w && cx->weights[i].n == n) {
            rp_cuda_to_bf16(cx, cx->weights[i].shadow, w, n);
            return;
        }
    if (!grow_records(&cx->weights, &cx->cap_weights, cx->n_weights, 64)) {
        rp_cuda_record(cx, cudaErrorMemoryAllocation, "register_weights", __FILE__, __LINE__);
        return;
    }
    __nv_bfloat16 *shadow = NULL;
    // Without room for the copy the GEMMs convert the weights per call:
    // slower, still right, so this is not an error.
    if (cudaMalloc(&shadow, n * sizeof(__nv_bfloat16)) != cudaSuccess) {
        cudaGetLastError();
        return;
    }
    cx->weights[cx->n_weights++] = {w, n, shadow};
    rp_cuda_to_bf16(cx, shadow, w, n);
}

// [w, w + n) was written outside the backend (ZeRO-1's NCCL all-gather of
// the other replicas' ranges): convert that range of the bf16 copies only.
// The copies stay where they are, so no step graph is dropped.
static void cuda_refresh_weights(rp_backend *be, const float *w, size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!w || n == 0) return;
    refresh_shadows(cx, w, n * sizeof(float));
}

// The bf16 copy of [w, w + n) (inside one registered weight), for ZeRO-1's
// bf16 all-gather to receive into and send from; NULL without one.
static void *cuda_weight_copy(rp_backend *be, const float *w, size_t n) {
    return rp_cuda_weight_shadow(rp_cuda_of(be), w, n);
}

// ---- memory ----

static int alloc_record(rp_cuda_ctx *cx, void *p, size_t bytes);
static size_t alloc_forget_record(rp_cuda_ctx *cx, const void *p);

static void *cuda_alloc(rp_backend *be, size_t bytes) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    void *p = NULL;
    size_t rounded = (bytes + 255) / 256 * 256;
    if (rounded == 0) rounded = 256;
    cx->seq++;  // new memory may sit where a copied activation was
    if (cudaMalloc(&p, rounded) != cudaSuccess) {
        cudaGetLastError();  // out of memory is the caller's to report (NULL)
        return NULL;
    }
    if (!RP_CUDA_OK(cx, cudaMemsetAsync(p, 0, rounded, cx->stream))) {
        cudaFree(p);
        return NULL;
    }
    forget_memory(cx, p, rounded);  // an old buffer's records at this address
    if (!alloc_record(cx, p, rounded)) {  // out of host memory: the caller reports NULL
        cudaFree(p);
        return NULL;
    }
    return p;
}

static int sparse_free(rp_cuda_ctx *cx, void *ptr);

static void cuda_free(rp_backend *be, void *ptr) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!ptr) return;
    cx->seq++;
    // Queued kernels may still read the weight's bf16 shadow: wait first.
    RP_CUDA_OK(cx, cudaStreamSynchronize(cx->stream));
    // A step graph may bake in this buffer; a later one at the same address
    // would match its key.
    rp_cuda_step_drop(cx);
    for (int i = 0; i < cx->n_weights; i++)
        if (cx->weights[i].base == ptr) {
            RP_CUDA_OK(cx, cudaFree(cx->weights[i].shadow));
            cx->weights[i] = cx->weights[--cx->n_weights];
            break;
        }
    // The copies, in-place ranges and stale marks of the freed range go
    // with it. Left behind, a sole copy's dead slot would be taken last by
    // every claim (one slot fewer) and its stale mark would hold a place,
    // until a later buffer happened to land on the same address: the slot
    // choice, and so the conversions a step runs, would depend on where
    // the allocator puts buffers (test_gn_bonus_fused_exact's padded layout).
    const size_t bytes = alloc_forget_record(cx, ptr);
    if (bytes) forget_memory(cx, ptr, bytes);
    if (!sparse_free(cx, ptr)) RP_CUDA_OK(cx, cudaFree(ptr));
}

static void cuda_copy_to_device(rp_backend *be, void *dst, const void *host_src, size_t bytes) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!bytes) return;
    // From pageable memory this returns once the source was staged, so the
    // caller may reuse host_src right away (the interface promises that).
    cx->seq++;  // the copies of activations it overwrites are stale
    RP_CUDA_OK(cx, cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, cx->stream));
    rp_cuda_act16_forget(cx, dst, bytes);
    refresh_shadows(cx, dst, bytes);
}

static void cuda_copy_to_host(rp_backend *be, void *host_dst, const void *src, size_t bytes) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!bytes) return;
    RP_CUDA_OK(cx, cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, cx->stream));
    RP_CUDA_OK(cx, cudaStreamSynchronize(cx->stream));
}

static void cuda_copy(rp_backend *be, void *dst, const void *src, size_t bytes) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!bytes || dst == src) return;
    cx->seq++;  // the copies of activations it overwrites are stale
    RP_CUDA_OK(cx, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cx->stream));
    rp_cuda_act16_forget(cx, dst, bytes);
    refresh_shadows(cx, dst, bytes);
}

static void cuda_fill_zero(rp_backend *be, void *dst, size_t bytes) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!bytes) return;
    cx->seq++;  // the copies of activations it overwrites are stale
    RP_CUDA_OK(cx, cudaMemsetAsync(dst, 0, bytes, cx->stream));
    rp_cuda_act16_forget(cx, dst, bytes);
    refresh_shadows(cx, dst, bytes);
}

static void cuda_synchronize(rp_backend *be) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    RP_CUDA_OK(cx, cudaStreamSynchronize(cx->stream));
}

// y [n] += x [n]
__global__ void add_kernel(float *y, const float *x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride) y[i] += x[i];
}

static void cuda_add(rp_backend *be, float *y, const float *x, size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!n) return;
    unsigned blocks = rp_cuda_blocks(n, 256);
    const unsigned cap = (unsigned)cx->n_sm * 16;
    if (blocks > cap) blocks = cap;
    add_kernel<<<blocks, 256, 0, cx->stream>>>(y, x, n);
    RP_CUDA_LAUNCHED_OUT(cx, "add", {y, n * sizeof(float)});
}

// Sizes every host-array upload slot for `rows` rows and `seqs` sequences up
// front: a slot that grew mid-step (embedding_backward's permutation of a
// long batch) would synchronize and reallocate while a pipelined receive is
// posted. Kernel scratch (rp_cuda_scratch) still grows on first use, so the
// first step at a shape is the warm-up.
static rp_status cuda_reserve(rp_backend *be, int rows, int seqs, int C, int N, rp_error *err) {
    (void)C, (void)N;
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (rows < 1 || seqs < 1)
        return rp_error_set(err, RP_ERR_ARG, "reserve: rows %d and seqs %d must be >= 1", rows,
                            seqs);
    // Row arrays (tokens, targets, permutation, segment starts: rows + 1)
    // and per-sequence arrays (seq_len, row_begin, slot, checkpoint blocks).
    const size_t need_rows = (size_t)rows + 1, need_seqs = (size_t)seqs;
    for (int slot = 0; slot < RP_CUDA_UP_COUNT; slot++) {
        const size_t n = slot >= RP_CUDA_UP_TOKENS ? need_rows : need_seqs;
        if (cx->upload_count[slot] >= n) continue;
        if (!rp_cuda_upload_grow(cx, slot, n)) {
            if (err) *err = cx->error;
            return cx->error.code != RP_OK ? cx->error.code : RP_ERR_NOMEM;
        }
    }
    return RP_OK;
}

// ---- lifetime ----

// ---- sparse buffers (backend.h alloc_sparse / release_range; ZeRO-1) ----
// The VMM driver API: a buffer is an address range reserved whole with one
// physical allocation of the granularity (2 MiB on current GPUs) mapped per
// page, so one page can be unmapped alone and its memory goes back to the
// device. The driver entry points come through the runtime
// (cudaGetDriverEntryPointByVersion, CUDA 12.5), so nothing links -lcuda.
// The emulator (tests/cuda_emu) emulates these calls over host pages;
// older toolkits leave the entries NULL: ZeRO-1 then keeps the fp32 whole.
#if defined(RP_EMU_VMM) || (defined(CUDART_VERSION) && CUDART_VERSION >= 12050)
#define RP_CUDA_VMM 1
#include <cuda.h>

struct sparse_vmm {
    decltype(&cuMemGetAllocationGranularity) granularity;
    decltype(&cuMemAddressReserve) reserve;
    decltype(&cuMemAddressFree) address_free;
    decltype(&cuMemCreate) create;
    decltype(&cuMemRelease) release;
    decltype(&cuMemMap) map;
    decltype(&cuMemUnmap) unmap;
    decltype(&cuMemSetAccess) set_access;
};

struct sparse_buf {
    CUdeviceptr base;
    size_t bytes;            // reserved: a whole number of pages
    unsigned char *mapped;   // [bytes / page]: 1 while the page is backed
};
#endif

// The upload slots' host-side extras and the sparse buffers live right
// after the context.
// A live cuda_alloc buffer: cuda_free gets only the pointer, and must forget
// the records (bf16 activation copies, in-place ranges, stale marks) of the
// whole range it frees.
struct alloc_rec {
    void *p;
    size_t bytes;
};

struct rp_cuda_ctx_full {
    rp_cuda_ctx cx;
    upload_slot_extra extra[RP_CUDA_UP_COUNT];
    alloc_rec *allocs;
    int n_allocs, cap_allocs;
#ifdef RP_CUDA_VMM
    sparse_vmm vmm;
    size_t page;
    sparse_buf *sparse;
    int n_sparse, cap_sparse;
#endif
};

static upload_slot_extra *upload_extra(rp_cuda_ctx *cx) {
    return ((rp_cuda_ctx_full *)cx)->extra;
}

// 0 when the host array cannot grow (nothing recorded).
static int alloc_record(rp_cuda_ctx *cx, void *p, size_t bytes) {
    rp_cuda_ctx_full *f = (rp_cuda_ctx_full *)cx;
    if (!grow_records(&f->allocs, &f->cap_allocs, f->n_allocs, 64)) return 0;
    f->allocs[f->n_allocs++] = {p, bytes};
    return 1;
}

// The bytes of cuda_alloc buffer p, dropped from the record; 0 when p is
// not one (a sparse buffer, which sparse_free forgets itself).
static size_t alloc_forget_record(rp_cuda_ctx *cx, const void *p) {
    rp_cuda_ctx_full *f = (rp_cuda_ctx_full *)cx;
    for (int i = 0; i < f->n_allocs; i++)
        if (f->allocs[i].p == p) {
            const size_t bytes = f->allocs[i].bytes;
            f->allocs[i] = f->allocs[--f->n_allocs];
            return bytes;
        }
    return 0;
}

#ifdef RP_CUDA_VMM
static int vmm_ok(rp_cuda_ctx *cx, CUresult r, const char *what, int line) {
    if (r == CUDA_SUCCESS) return 1;
    char text[96];
    snprintf(text, sizeof text, "%s (CUresult %d)", what, (int)r);
    rp_cuda_record(cx, cudaErrorMemoryAllocation, text, __FILE__, line);
    return 0;
}

static CUmemAllocationProp vmm_prop(int device) {
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    return prop;
}

// Unmaps the backed pages of b and frees its address range.
static void sparse_drop(rp_cuda_ctx_full *f, sparse_buf *b) {
    for (size_t i = 0; i < b->bytes / f->page; i++)
        if (b->mapped[i]) vmm_ok(&f->cx, f->vmm.unmap(b->base + i * f->page, f->page),
                                 "cuMemUnmap", __LINE__);
    if (b->base) vmm_ok(&f->cx, f->vmm.address_free(b->base, b->bytes), "cuMemAddressFree",
                        __LINE__);
    free(b->mapped);
}

static void *cuda_alloc_sparse(rp_backend *be, size_t bytes) {
    rp_cuda_ctx_full *f = (rp_cuda_ctx_full *)rp_cuda_of(be);
    rp_cuda_ctx *cx = &f->cx;
    const size_t page = f->page, n = (bytes ? bytes + page - 1 : page) / page;
    if (!grow_records(&f->sparse, &f->cap_sparse, f->n_sparse, 64)) return NULL;
    sparse_buf b = {0, n * page, (unsigned char *)calloc(n, 1)};
    if (!b.mapped) return NULL;
    // Out of memory is the caller's to report (NULL), as cuda_alloc's.
    const CUmemAllocationProp prop = vmm_prop(cx->device);
    int ok = f->vmm.reserve(&b.base, b.bytes, page, 0, 0) == CUDA_SUCCESS;
    for (size_t i = 0; ok && i < n; i++) {
        CUmemGenericAllocationHandle h;
        ok = f->vmm.create(&h, page, &prop, 0) == CUDA_SUCCESS;
        if (!ok) break;
        ok = f->vmm.map(b.base + i * page, page, 0, h, 0) == CUDA_SUCCESS;
        f->vmm.release(h);  // the mapping keeps the memory until cuMemUnmap
        b.mapped[i] = (unsigned char)ok;
    }
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    ok = ok && f->vmm.set_access(b.base, b.bytes, &access, 1) == CUDA_SUCCESS;
    void *p = (void *)b.base;
    if (ok) ok = RP_CUDA_OK(cx, cudaMemsetAsync(p, 0, b.bytes, cx->stream));
    if (!ok) {
        sparse_drop(f, &b);
        return NULL;
    }
    cx->seq++;  // new memory may sit where a copied activation was
    forget_memory(cx, p, b.bytes);
    f->sparse[f->n_sparse++] = b;
    return p;
}

static sparse_buf *sparse_find(rp_cuda_ctx_full *f, const void *p) {
    const CUdeviceptr a = (CUdeviceptr)p;
    for (int i = 0; i < f->n_sparse; i++)
        if (a >= f->sparse[i].base && a < f->sparse[i].base + f->sparse[i].bytes)
            return &f->sparse[i];
    return NULL;
}

static size_t cuda_release_range(rp_backend *be, void *p, size_t bytes) {
    rp_cuda_ctx_full *f = (rp_cuda_ctx_full *)rp_cuda_of(be);
    rp_cuda_ctx *cx = &f->cx;
    sparse_buf *b = sparse_find(f, p);
    if (!b || (CUdeviceptr)p + bytes > b->base + b->bytes) {
        rp_cuda_record(cx, cudaErrorInvalidValue, "release_range outside an alloc_sparse buffer",
                       __FILE__, __LINE__);
        return 0;
    }
    const size_t page = f->page, off = (size_t)((CUdeviceptr)p - b->base);
    const size_t lo = (off + page - 1) / page, hi = (off + bytes) / page;
    // Queued kernels may still use the pages; a step graph bakes them in.
    RP_CUDA_OK(cx, cudaStreamSynchronize(cx->stream));
    rp_cuda_step_drop(cx);
    size_t given = 0;
    for (size_t i = lo; i < hi; i++)
        if (b->mapped[i] &&
            vmm_ok(cx, f->vmm.unmap(b->base + i * page, page), "cuMemUnmap", __LINE__)) {
            b->mapped[i] = 0;
            given += page;
        }
    return given;
}

static int sparse_free(rp_cuda_ctx *cx, void *ptr) {
    rp_cuda_ctx_full *f = (rp_cuda_ctx_full *)cx;
    sparse_buf *b = sparse_find(f, ptr);
    if (!b) return 0;
    forget_memory(cx, ptr, b->bytes);  // as cuda_free does for a plain buffer
    sparse_drop(f, b);
    *b = f->sparse[--f->n_sparse];
    return 1;
}

// The entry points and the granularity; without them the entries stay NULL.
static void sparse_install(rp_backend *be) {
    rp_cuda_ctx_full *f = (rp_cuda_ctx_full *)rp_cuda_of(be);
    const struct {
        const char *name;
        void **fn;
    } need[] = {
        {"cuMemGetAllocationGranularity", (void **)&f->vmm.granularity},
        {"cuMemAddressReserve", (void **)&f->vmm.reserve},
        {"cuMemAddressFree", (void **)&f->vmm.address_free},
        {"cuMemCreate", (void **)&f->vmm.create},
        {"cuMemRelease", (void **)&f->vmm.release},
        {"cuMemMap", (void **)&f->vmm.map},
        {"cuMemUnmap", (void **)&f->vmm.unmap},
        {"cuMemSetAccess", (void **)&f->vmm.set_access},
    };
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) {
        cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
        if (cudaGetDriverEntryPointByVersion(need[i].name, need[i].fn, 12000, cudaEnableDefault,
                                             &found) != cudaSuccess ||
            found != cudaDriverEntryPointSuccess || !*need[i].fn) {
            cudaGetLastError();
            return;
        }
    }
    const CUmemAllocationProp prop = vmm_prop(f->cx.device);
    size_t page = 0;
    if (f->vmm.granularity(&page, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) != CUDA_SUCCESS ||
        page == 0 || (page & (page - 1)) != 0)
        return;
    f->page = page;
    be->sparse_page = page;
    be->alloc_sparse = cuda_alloc_sparse;
    be->release_range = cuda_release_range;
}

static void sparse_destroy(rp_cuda_ctx *cx) {
    rp_cuda_ctx_full *f = (rp_cuda_ctx_full *)cx;
    for (int i = 0; i < f->n_sparse; i++) sparse_drop(f, &f->sparse[i]);
    free(f->sparse);
}
#else
static int sparse_free(rp_cuda_ctx *, void *) { return 0; }
static void sparse_install(rp_backend *) {}
static void sparse_destroy(rp_cuda_ctx *) {}
#endif

static void cuda_destroy(rp_backend *be);

extern "C" rp_backend *rp_cuda_backend_create(int device, rp_cuda_math math, rp_error *err) {
    int count = 0;
    cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess || count == 0) {
        cudaGetLastError();
        rp_error_set(err, RP_ERR_ARG, "no CUDA device is visible (%s); run on a GPU node or use "
                     "--device cpu", rc != cudaSuccess ? cudaGetErrorString(rc) : "0 devices");
        return NULL;
    }
    if (device < 0 || device >= count) {
        rp_error_set(err, RP_ERR_ARG, "CUDA device %d does not exist (%d visible)", device, count);
        return NULL;
    }
    rp_backend *be = (rp_backend *)calloc(1, sizeof *be);
    rp_cuda_ctx_full *full = (rp_cuda_ctx_full *)calloc(1, sizeof *full);
    if (!be || !full) {
        free(be);
        free(full);
        rp_error_set(err, RP_ERR_NOMEM, "CUDA backend context");
        return NULL;
    }
    rp_cuda_ctx *cx = &full->cx;
    cx->device = device;
    cx->math = math;
    be->name = "cuda";
    be->impl = cx;
    be->destroy = cuda_destroy;
    const char *step = NULL;
    if ((rc = cudaSetDevice(device)) != cudaSuccess) step = "cudaSetDevice";
    else if ((rc = cudaDeviceGetAttribute(&cx->n_sm, cudaDevAttrMultiProcessorCount, device)) !=
             cudaSuccess)
        step = "cudaDeviceGetAttribute";
    else if ((rc = cudaStreamCreateWithFlags(&cx->stream, cudaStreamNonBlocking)) != cudaSuccess)
        step = "cudaStreamCreate";
    for (int s = 0; !step && s < RP_CUDA_UP_COUNT; s++)
        if ((rc = cudaEventCreateWithFlags(&full->extra[s].done, cudaEventDisableTiming)) !=
            cudaSuccess)
            step = "cudaEventCreate";
    if (step) {
        rp_error_set(err, RP_ERR_INTERNAL, "CUDA device %d: %s: %s", device, step,
                     cudaGetErrorString(rc));
        cudaGetLastError();
        cuda_destroy(be);
        return NULL;
    }
    cublasStatus_t bs = cublasCreate(&cx->cublas);
    if (bs == CUBLAS_STATUS_SUCCESS) bs = cublasSetStream(cx->cublas, cx->stream);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        rp_error_set(err, RP_ERR_INTERNAL, "CUDA device %d: cuBLAS set-up failed: %s", device,
                     cublas_text(bs));
        cuda_destroy(be);
        return NULL;
    }
    if (cublasLtCreate(&cx->lt) != CUBLAS_STATUS_SUCCESS) cx->lt = NULL;  // cuBLAS + bias_act
    be->is_host_memory = 0;
    be->mix_grads16 = 1;
    /* The head's row chunk from a 1 GiB logits scratch (4096 rows at V =
     * 65536: 8 chunks at 8 x 4096 rows instead of the CPU's 32), so its dW
     * GEMM reads and writes the fp32 [V, C] gradient 8 times, not 32; in
     * BF16 math its logits are bf16 (half of that scratch; cuda_loss.cu). */
    be->head_ce_chunk_floats = RP_HEAD_CE_CHUNK_FLOATS_CUDA;
    be->head_logits16 = math == RP_CUDA_MATH_BF16;
    /* Engine decode groups (backend.h): 64, one gemv_group launch and one
     * step graph per group; decode rows of any count never reach cuBLAS
     * (cuda_decode.cu), so a row has the bits it has alone, as the engine
     * promises a sequence the same tokens alone or in a group. */
    be->decode_group = 64;
    be->alloc = cuda_alloc;
    be->free = cuda_free;
    be->copy_to_device = cuda_copy_to_device;
    be->copy_to_host = cuda_copy_to_host;
    be->copy = cuda_copy;
    be->fill_zero = cuda_fill_zero;
    be->gemm_only = cuda_gemm_only;
    be->wkv_only = cuda_wkv_only;
    be->rkv_only = cuda_rkv_only;
    be->drkv_only = cuda_drkv_only;
    be->store16_fits = cuda_store16_fits;
    be->store16_promise = cuda_store16_promise;
    be->synchronize = cuda_synchronize;
    be->add = cuda_add;
    be->status = cuda_status;
    be->reserve = cuda_reserve;
    be->register_weights = cuda_register_weights;
    be->refresh_weights = cuda_refresh_weights;
    be->weight_copy = cuda_weight_copy;
    sparse_install(be);
    rp_cuda_install_matmul(be);
    rp_cuda_install_elementwise(be);
    rp_cuda_install_backward(be);
    rp_cuda_install_wkv7(be);
    rp_cuda_install_loss(be);
    rp_cuda_install_decode(be);
    rp_cuda_install_graph(be);
    return be;
}

static void cuda_destroy(rp_backend *be) {
    if (!be) return;
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (cx) {
        if (cx->stream) cudaStreamSynchronize(cx->stream);
        rp_cuda_step_destroy(cx);
        for (int i = 0; i < cx->n_weights; i++) cudaFree(cx->weights[i].shadow);
        free(cx->weights);
        sparse_destroy(cx);
        free(cx->inplace);
        free(cx->store16);
        free(((rp_cuda_ctx_full *)cx)->allocs);
        if (cx->dec_part) cudaFree(cx->dec_part);
        if (cx->dec_count) cudaFree(cx->dec_count);
        for (int a = 0; a < RP_CUDA_SCRATCH_COUNT; a++)
            if (cx->scratch[a]) cudaFree(cx->scratch[a]);
        upload_slot_extra *extra = upload_extra(cx);
        for (int s = 0; s < RP_CUDA_UP_COUNT; s++) {
            if (cx->upload[s]) cudaFree(cx->upload[s]);
            if (extra[s].pinned) cudaFreeHost(extra[s].pinned);
            if (extra[s].done) cudaEventDestroy(extra[s].done);
            free(extra[s].last);
        }
        if (cx->lt) cublasLtDestroy(cx->lt);
        if (cx->cublas) cublasDestroy(cx->cublas);
        if (cx->stream) cudaStreamDestroy(cx->stream);
        free(cx);  // the rp_cuda_ctx_full starts with cx
    }
    free(be);
}

extern "C" void rp_cuda_backend_destroy(rp_backend *be) { cuda_destroy(be); }

extern "C" int rp_cuda_backend_device(const rp_backend *be) {
    return ((const rp_cuda_ctx *)be->impl)->device;
}

extern "C" rp_cuda_math rp_cuda_backend_math(const rp_backend *be) {
    return ((const rp_cuda_ctx *)be->impl)->math;
}

extern "C" void rp_cuda_backend_set_act16(rp_backend *be, int on) {
    rp_cuda_of(be)->act16_off = !on;
}

extern "C" int rp_cuda_backend_store_bf16_inplace(rp_backend *be, float *p, size_t n) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    if (!n) return 1;
    float *host = (float *)malloc(n * sizeof(float));
    uint16_t *host16 = (uint16_t *)malloc(n * sizeof(uint16_t));
    int ok = host && host16;
    if (ok) {
        cuda_copy_to_host(be, host, p, n * sizeof(float));
        rp_convert_from_f32(host16, RP_DTYPE_BF16, host, n);  // round to nearest even
        cuda_copy_to_device(be, p, host16, n * sizeof(uint16_t));
        rp_cuda_act16_forget(cx, p, n * sizeof(float));
        rp_cuda_inplace_add(cx, p, n);
        cuda_synchronize(be);
    }
    free(host);
    free(host16);
    return ok && cx->error.code == RP_OK;
}
