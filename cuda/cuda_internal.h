// Private declarations shared by the CUDA backend's files (C++ only, nvcc).
//
// Files and the ops each installs into the rp_backend vtable:
//   cuda_backend.cu      context, memory, copies, status, register_weights, add,
//                        reserve, scratch + upload helpers
//   cuda_matmul.cu       the four GEMM ops (cuBLAS, decode GEMVs)
//   cuda_elementwise.cu  layernorm token_shift lerp bias_act value_residual
//                        key_prepare groupnorm bonus_gate            (forward)
//   cuda_backward.cu     the backward of each op above
//   cuda_wkv7.cu         wkv7 wkv7_forward_train wkv7_backward
//   cuda_loss.cu         embedding embedding_backward cross_entropy l2wrap
//                        row_max sum_squares adamw
//   cuda_decode.cu       gemv_group time_mix_heads (fused decode ops)
//   cuda_graph.cu        step_begin step_end step_reset (decode step graphs)
//
// Rules every kernel file follows:
// - All work goes on cx->stream; nothing synchronizes the device except
//   where the interface hands a result to the host (row_max, sum_squares,
//   copy_to_host, synchronize).
// - Every launch is followed by RP_CUDA_LAUNCHED(cx, "op name"); every
//   runtime call is wrapped in RP_CUDA_OK(cx, call). Errors are sticky in
//   the context (be->status reports the first) and never exit the process.
// - Parameter-gradient reductions over rows are deterministic: no float
//   atomics. Rows are split into a fixed number of chunks (independent of
//   the device), each chunk writes a partial row into scratch, and
//   rp_cuda_sum_partials adds the partials in chunk order.
// - Host arrays in the interface (rp_batch fields, tokens, targets) reach
//   kernels through rp_cuda_upload / rp_cuda_upload_batch.
#ifndef RP_CUDA_INTERNAL_H
#define RP_CUDA_INTERNAL_H

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda_backend.h"

// One registered weight range and its bf16 copy (BF16 math only).
struct rp_cuda_weights {
    const float *base;
    size_t n;
    __nv_bfloat16 *shadow;
};

// Independent device buffers for host arrays uploaded by one op. Uploads
// into the same slot reuse its buffer: stream order makes that safe.
enum rp_cuda_upload_slot {
    RP_CUDA_UP_SEQ_LEN = 0,
    RP_CUDA_UP_ROW_BEGIN,
    RP_CUDA_UP_SLOT,
    RP_CUDA_UP_CKPT_BLOCK,  // first checkpoint block of each sequence (wkv7 train)
    RP_CUDA_UP_TOKENS,      // embedding tokens, cross-entropy targets
    RP_CUDA_UP_EXTRA,       // one more array an op may need (e.g. a permutation)
    RP_CUDA_UP_EXTRA2,
    RP_CUDA_UP_COUNT
};

// Scratch areas: one per user so that an op's scratch never aliases a
// GEMM's. Contents are undefined on return; valid until the next request of
// the same area.
enum rp_cuda_scratch_area {
    RP_CUDA_SCRATCH_OP = 0,    // kernels: partial sums, temporaries
    RP_CUDA_SCRATCH_ACT16,     // RP_CUDA_ACT16_SLOTS areas: bf16 copies of activations
    // 6: key_prepare_backward's dk copy must outlive the da, dw, dv and dnu
    // copies claimed before the key GEMM backward reads it (LRU slots), and
    // a current sole copy is never taken back: the WKV7 backward's (a
    // GEMM-only dr) is current when the tail's separate ops claim theirs
    // (dk, da, dv, dnu: 5 slots ran out with rkv_only off)
    RP_CUDA_SCRATCH_COUNT = RP_CUDA_SCRATCH_ACT16 + 6
};
#define RP_CUDA_ACT16_SLOTS (RP_CUDA_SCRATCH_COUNT - RP_CUDA_SCRATCH_ACT16)
// Reclaimed sole copies whose f32 is not yet written again (rp_cuda_ctx
// act16_stale): a few shared scratch buffers in a training step; past this
// many the claim is a sticky error, never a forgotten stale range.
#define RP_CUDA_ACT16_STALE_MAX 16

// Decode calls of at most this many rows use the GEMV kernels, which read
// fp32 activations directly; above it every GEMM is a bf16 cuBLAS call.
#define RP_GEMV_MAX_M 8

// A bf16 copy of the fp32 activation p [n] (BF16 math; issue 15). The kernel
// that writes p writes the copy in the same pass, or the first GEMM that
// reads p converts it once; the GEMMs that read p then take the copy, with
// no conversion kernel. The backend cannot see which memory a kernel
// writes, so a copy stays valid only while `seq` equals the context's: every
// kernel launch (RP_CUDA_LAUNCHED), copy, fill, allocation and free moves
// seq on; GEMMs do not, and forget the copies their output overlaps.
struct rp_cuda_act16 {
    const float *p;  // NULL: empty or being written
    size_t n;
    unsigned long long seq, used;
    __nv_bfloat16 *buf;
    int sole;  // 1: p's f32 memory does not hold the values (rp_cuda_act16_publish_sole)
    // seq at the last claim: with p NULL and seq unmoved since, the op being
    // set up holds this slot (its kernel will write it): never claimed twice
    unsigned long long claim_seq;
};

// A training activation sized for bf16-only storage (backend.h
// store16_promise): n elements in cap floats.
struct rp_cuda_store16 {
    const float *p;
    size_t n, cap;
};

struct rp_cuda_ctx {
    int device;
    rp_cuda_math math;
    int n_sm;
    cudaStream_t stream;
    cublasHandle_t cublas;
    // cuBLASLt, for the GEMMs with a bias epilogue (cuda_matmul.cu); NULL
    // when its set-up failed: those GEMMs then run as cuBLAS + bias_act
    cublasLtHandle_t lt;
    // First error (sticky): code != RP_OK once anything failed.
    rp_error error;
    void *scratch[RP_CUDA_SCRATCH_COUNT];
    size_t scratch_bytes[RP_CUDA_SCRATCH_COUNT];
    int32_t *upload[RP_CUDA_UP_COUNT];
    size_t upload_count[RP_CUDA_UP_COUNT];
    rp_cuda_weights *weights;
    int n_weights, cap_weights;
    rp_cuda_act16 act16[RP_CUDA_ACT16_SLOTS];
    size_t act16_max;             // largest copy asked for: every slot grows to it
    int act16_off;                // rp_cuda_backend_set_act16(be, 0): no sharing
    unsigned long long seq, clock;  // see rp_cuda_act16
    // The f32 ranges of sole copies (rp_cuda_act16_publish_sole) whose slot
    // a claim took back: their f32 is still stale until something writes
    // them (rp_cuda_act16_forget), so rp_cuda_act16_stale keeps refusing a
    // GEMM that would convert them.
    struct { const float *p; size_t n; } act16_stale[RP_CUDA_ACT16_STALE_MAX];
    int n_act16_stale;
    struct rp_cuda_step *step;  // decode step graphs (cuda_graph.cu); NULL until used
    // GEMM-only outputs (backend.h gemm_only): the pending hints, the
    // newest first (two: the WKV7 backward takes dw_raw's and dr's), and
    // the f32 ranges whose memory holds their bf16 values in place (the
    // first half of the range) until something writes them again.
    const float *gemm_only_p[2];
    size_t gemm_only_n[2];
    // WKV7-only outputs (backend.h wkv_only): the pending hint, taken by
    // key_prepare (kk) or the WKV7 backward (dkk)
    const float *wkv_only_p;
    size_t wkv_only_n;
    // r, k, v, k_pre, v_pre, nu (backend.h rkv_only): the pending hint,
    // taken by matmul_linear / matmul_lora (r, k_pre, v_pre, nu),
    // key_prepare_from (k) or value_residual_from (v)
    const float *rkv_only_p;
    size_t rkv_only_n;
    // dr, dk, dv (backend.h drkv_only): the pending hint, taken by
    // groupnorm_bonus_gate_backward
    const float *drkv_only_p[3];
    size_t drkv_only_n;
    struct rp_cuda_inplace *inplace;
    int n_inplace, cap_inplace;
    // Buffers the training workspace sized for bf16-only storage (backend.h
    // store16_promise): p [n elements] holds cap floats; an f32 access past
    // p + cap is refused (rp_cuda_store16_fits).
    struct rp_cuda_store16 *store16;
    int n_store16, cap_store16;
    float *dec_part;            // gemv_group split-K partial sums (cuda_decode.cu)
    unsigned *dec_count;        // and its tile counters; NULL until used
    // Decode rows (backend.h set_decode_rows; cuda_decode.cu): the matmuls
    // that cuda_decode.cu wraps, and whether the rows now are decode rows.
    void (*dec_base_linear)(rp_backend *, float *, const float *, const float *, int, int, int,
                            float);
    void (*dec_base_lora)(rp_backend *, float *, const float *, const float *, int, int, int,
                          float);
    int decode_rows;
    int pdl;  // programmatic dependent launch of the decode kernels: 0 undecided, 1 off, 2 on
};

static inline rp_cuda_ctx *rp_cuda_of(rp_backend *be) { return (rp_cuda_ctx *)be->impl; }

// The vector width (4 or 1) and block size of ln_shift_mix_kernel for these
// arguments (cuda_elementwise.cu), for the decode GEMVs' LN prologue.
int rp_cuda_ln_shift_mix_shape(const float *xa, const float *prev, const float *const *mix,
                               const float *const *mu, int n_mix, const float *x,
                               const float *weight, const float *bias, const float *state_base,
                               size_t state_stride, int C, int *threads);

// Programmatic dependent launch (Hopper, docs/gpu.md "(issue 15) PDL"): the
// decode kernels are launched with cudaLaunchKernelEx and the programmatic
// stream serialization attribute, so a kernel may start while the one before
// it on the stream still runs. Such a kernel issues only L2 prefetches of its
// weights (which nothing before it writes) until rp_pdl_wait, then calls
// rp_pdl_trigger to let the next one start. Off with RWKVPIPE_CUDA_PDL=0, on
// devices before sm_90 and for code built for them (cuda_decode.cu).
cudaLaunchConfig_t rp_cuda_pdl_config(rp_cuda_ctx *cx, dim3 grid, dim3 block,
                                      cudaLaunchAttribute *attr /* [1] */);
// Waits for the kernel before (a no-op in a launch without the attribute).
static __device__ __forceinline__ void rp_pdl_wait(void) {
#if defined(RP_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
    cudaGridDependencySynchronize();
#endif
}
// The next PDL kernel may start once every block called this or exited.
static __device__ __forceinline__ void rp_pdl_trigger(void) {
#if defined(RP_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
    cudaTriggerProgrammaticLaunchCompletion();
#endif
}
// Brings the 128-byte line holding p into L2: no value is read, so it is
// safe before rp_pdl_wait whatever the kernel before writes.
static __device__ __forceinline__ void rp_prefetch_l2(const void *p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

// Records the first failure (call text, file, line, CUDA's message) in
// cx->error. Returns 1 when rc is cudaSuccess.
int rp_cuda_record(rp_cuda_ctx *cx, cudaError_t rc, const char *what, const char *file, int line);
int rp_cuda_record_cublas(rp_cuda_ctx *cx, cublasStatus_t rc, const char *what, const char *file,
                          int line);
#define RP_CUDA_OK(cx, call) rp_cuda_record((cx), (call), #call, __FILE__, __LINE__)
#define RP_CUBLAS_OK(cx, call) rp_cuda_record_cublas((cx), (call), #call, __FILE__, __LINE__)
// After a kernel launch: records a launch error and, since the kernel may
// write any memory, ends the validity of every bf16 activation copy.
#define RP_CUDA_LAUNCHED(cx, name) \
    (++(cx)->seq, rp_cuda_record((cx), cudaGetLastError(), name, __FILE__, __LINE__))

// A range of device memory that a kernel writes (p NULL: none).
struct rp_cuda_out {
    const void *p;
    size_t bytes;
};
// After a kernel launch whose every write lies in the listed ranges: records
// a launch error and forgets only the activation copies those ranges
// overlap, as a GEMM does, so the copies of the other activations stay valid
// across it (a producer's copy then reaches a GEMM several ops later). A
// kernel that may write anywhere else must use RP_CUDA_LAUNCHED; a missing
// range would hand a GEMM stale bits, which test_act16_exact catches.
int rp_cuda_launched_out(rp_cuda_ctx *cx, const char *name, const char *file, int line,
                         std::initializer_list<rp_cuda_out> outs);
#define RP_CUDA_LAUNCHED_OUT(cx, name, ...) \
    rp_cuda_launched_out((cx), (name), __FILE__, __LINE__, {__VA_ARGS__})

// Device scratch of at least `bytes` (256-byte aligned) in area `area`;
// NULL after an allocation failure (recorded). Growing synchronizes the
// stream first (in-flight kernels may still read the old buffer).
void *rp_cuda_scratch(rp_cuda_ctx *cx, int area, size_t bytes);

// Copies n host ints to the device buffer of `slot` (stream-ordered, from
// pageable memory: the host array may change once this returns) and returns
// the device pointer; NULL after a failure (recorded).
const int32_t *rp_cuda_upload(rp_cuda_ctx *cx, int slot, const int32_t *host, size_t n);

// Device copies of a batch's arrays (plus the wkv checkpoint block offsets).
struct rp_cuda_batch {
    int n_seq;
    int n_rows;
    const int32_t *seq_len;
    const int32_t *row_begin;
    const int32_t *slot;
    const int32_t *ckpt_block;  // rp_wkv_checkpoint_offset(batch, s) for each s
    int max_seq_len;
};
// ok = 0 after a failure (recorded).
int rp_cuda_upload_batch(rp_cuda_ctx *cx, const rp_batch *batch, rp_cuda_batch *out);

// Decode step graphs (cuda_graph.cu). Inside a step (its warm-up or its
// capture) the step's host inputs are already on the device: the device
// copy of `host` when it is the step's token array of n ints (NULL
// otherwise), and the batch's arrays (1 when `batch` is the step's).
// rp_cuda_upload and rp_cuda_upload_batch ask these first.
const int32_t *rp_cuda_step_input(rp_cuda_ctx *cx, const int32_t *host, size_t n);
int rp_cuda_step_batch(rp_cuda_ctx *cx, const rp_batch *batch, rp_cuda_batch *out);
// Drops every captured graph (the memory or weights they bake in changed).
void rp_cuda_step_drop(rp_cuda_ctx *cx);
void rp_cuda_step_destroy(rp_cuda_ctx *cx);

// out[c] (+)= sum over p = 0..n_parts-1, in that order, of partials[p * n + c]
// (accumulate: 1 adds to out, 0 overwrites). The deterministic second pass of
// every parameter-gradient reduction.
void rp_cuda_sum_partials(rp_cuda_ctx *cx, float *out, const float *partials, int n_parts,
                          size_t n, int accumulate);

// Number of row chunks a reduction over R rows uses: fixed by R alone (never
// by the device), so results are the same on every GPU.
static inline int rp_cuda_row_chunks(int R) {
    int chunks = (R + 63) / 64;
    return chunks < 1 ? 1 : (chunks > 256 ? 256 : chunks);
}

// bf16 copy of [p, p + n) when p lies in a registered weight range and the
// math is BF16 (pointer into the copy at the same offset); NULL otherwise.
__nv_bfloat16 *rp_cuda_weight_shadow(rp_cuda_ctx *cx, const float *p, size_t n);

// A bf16 buffer for the copy of p [n] that the next launch writes (NULL
// in FP32 math, for n = 0 or after a failure); never the buffer `keep`.
// Publish it after the launch.
__nv_bfloat16 *rp_cuda_act16_claim(rp_cuda_ctx *cx, const float *p, size_t n,
                                   const __nv_bfloat16 *keep);
// Claim for a producer kernel's output of `rows` rows: NULL when its
// consumers are GEMV kernels (decode), which read the fp32 rows.
static inline __nv_bfloat16 *rp_cuda_act16_for_rows(rp_cuda_ctx *cx, const float *p, size_t n,
                                                    int rows) {
    return rows > RP_GEMV_MAX_M && !cx->act16_off ? rp_cuda_act16_claim(cx, p, n, NULL) : NULL;
}
// The claimed buf now holds bf16(p [n]), as of the last launch.
void rp_cuda_act16_publish(rp_cuda_ctx *cx, const __nv_bfloat16 *buf, const float *p, size_t n);
// The same for a copy that is the only store of p [n]'s values: the
// producer wrote no f32 (its output is GEMM-only, backend.h gemm_only), so
// p's f32 memory is stale until something writes p again. Until then a
// claim takes that slot only when every slot holds such a copy, and never
// while the copy is still valid (a sticky error: its GEMMs may not have read
// it yet); a GEMM that would convert p instead (the copy ended by a launch)
// is a sticky error too, never a GEMM on the stale f32.
void rp_cuda_act16_publish_sole(rp_cuda_ctx *cx, const __nv_bfloat16 *buf, const float *p,
                                size_t n);
// rp_cuda_act16_publish, or _sole when the op did not write p's f32
// (f32_written 0: a GEMM-only output kept in its copy alone).
static inline void rp_cuda_act16_publish_as(rp_cuda_ctx *cx, const __nv_bfloat16 *buf,
                                            const float *p, size_t n, int f32_written) {
    if (f32_written)
        rp_cuda_act16_publish(cx, buf, p, n);
    else
        rp_cuda_act16_publish_sole(cx, buf, p, n);
}
// 1 when [p, p + n) overlaps the f32 of a sole copy (see above), whether
// its slot still holds it or a claim took the slot back.
int rp_cuda_act16_stale(const rp_cuda_ctx *cx, const float *p, size_t n);
// The valid bf16 copy of exactly p [n], or NULL.
const __nv_bfloat16 *rp_cuda_act16_find(rp_cuda_ctx *cx, const float *p, size_t n);
// Forget the copies of activations that overlap [p, p + bytes) (a GEMM wrote it).
void rp_cuda_act16_forget(rp_cuda_ctx *cx, const void *p, size_t bytes);

// GEMM-only outputs. An in-place range p [n] holds bf16(value) of element
// i at ((bf16 *)p)[i]; only GEMMs read it (the model promised it through
// gemm_only), and only an overlapping write ends it: GEMM outputs,
// RP_CUDA_LAUNCHED_OUT ranges, copies, fills and allocations forget it
// (rp_cuda_act16_forget). A kernel launched with plain RP_CUDA_LAUNCHED must
// not write such a range (none does: the model writes them with GEMMs only).
//
// With the copies off (rp_cuda_backend_set_act16(be, 0), the exactness
// twin) such an output stays f32 but every value is rounded to bf16 (f32 =
// 1): the ops that read it (bias_act, bias_act_backward) then compute from
// the same values, so copies on and off give the same bits.
struct rp_cuda_inplace {
    const float *p;
    size_t n;
    int f32;  // 1: f32 storage of bf16-rounded values (copies off)
    // No lookup starts at or past end: p + n, or the end of p's buffer when
    // the workspace sized it for bf16 only (store16: cap floats), since the
    // next buffer starts there and a lookup of it is not one of p's rows.
    const float *end;
};
// The bf16 values of x [n] when x lies inside an in-place range; NULL otherwise.
const __nv_bfloat16 *rp_cuda_inplace_find(rp_cuda_ctx *cx, const float *x, size_t n);
// r, k, v [n] (and the gate g, where not NULL: the fused groupnorm's) as
// their readers take them: 1 with rkv16 [4] their bf16 values in place (all
// rkv_only), 0 when all are f32 (checked against bf16-only buffers), -1
// with an error recorded for a mix.
int rp_cuda_rkv16(rp_cuda_ctx *cx, const char *op, const float *r, const float *k,
                  const float *v, const float *g, size_t n, const __nv_bfloat16 **rkv16);
// p [n] now holds its bf16 values in place (as of the GEMM just queued);
// f32: it holds them as rounded f32 values instead.
void rp_cuda_inplace_add(rp_cuda_ctx *cx, const float *p, size_t n, int f32 = 0);
// 1 unless an f32 access of [p, p + n) starts inside the cap floats of a
// bf16-only buffer (backend.h store16_promise) and runs past them; else 0 and a
// sticky error naming op: the caller launches nothing (an f32 write there
// would overrun the half-sized buffer).
int rp_cuda_store16_fits(rp_cuda_ctx *cx, const float *p, size_t n, const char *op);
// Drops the bf16-only records inside [p, p + bytes) (memory freed or new).
void rp_cuda_store16_drop(rp_cuda_ctx *cx, const void *p, size_t bytes);
// The in-place range that is exactly p [n], or NULL.
static inline const rp_cuda_inplace *rp_cuda_inplace_at(const rp_cuda_ctx *cx, const float *p,
                                                        size_t n) {
    for (int i = 0; i < cx->n_inplace; i++)
        if (cx->inplace[i].p == p && cx->inplace[i].n == n) return &cx->inplace[i];
    return NULL;
}
// How the outputs p[0 .. count) [n each] are stored as one set (the
// gradients an op reads and writes in one storage, backend.h drkv_only):
// RP_INPLACE_NONE none has an in-place record, _BF16 all hold bf16 in
// place, _F32 all hold rounded f32 (the copies off), _MIXED anything else.
enum { RP_INPLACE_NONE, RP_INPLACE_BF16, RP_INPLACE_F32, RP_INPLACE_MIXED };
static inline int rp_cuda_inplace_set(const rp_cuda_ctx *cx, const float *const *p, int count,
                                      size_t n) {
    int bf16 = 0, f32 = 0;
    for (int i = 0; i < count; i++) {
        const rp_cuda_inplace *ip = n > 0 ? rp_cuda_inplace_at(cx, p[i], n) : NULL;
        bf16 += ip && !ip->f32;
        f32 += ip && ip->f32;
    }
    return bf16 == count ? RP_INPLACE_BF16
           : f32 == count ? RP_INPLACE_F32
           : bf16 + f32 == 0 ? RP_INPLACE_NONE
                             : RP_INPLACE_MIXED;
}
// The pending gemm_only hint (backend.h), taken by the op that writes next
// (a matmul op, or layernorm): 1 when its output p [n] is that hint's.
static inline int rp_cuda_take_gemm_only(rp_cuda_ctx *cx, const float *p, size_t n) {
    int hit = 0;
    for (int i = 0; i < 2; i++) {
        hit |= cx->gemm_only_p[i] == p && cx->gemm_only_n[i] == n;
        cx->gemm_only_p[i] = NULL;
        cx->gemm_only_n[i] = 0;
    }
    return hit;
}
// The same for an op with two hinted outputs (the WKV7 backward's dw_raw and
// dr): *hit_a and *hit_b, every pending hint consumed.
static inline void rp_cuda_take_gemm_only2(rp_cuda_ctx *cx, const float *a, const float *b,
                                           size_t n, int *hit_a, int *hit_b) {
    *hit_a = *hit_b = 0;
    for (int i = 0; i < 2; i++) {
        *hit_a |= cx->gemm_only_p[i] == a && cx->gemm_only_n[i] == n;
        *hit_b |= cx->gemm_only_p[i] == b && cx->gemm_only_n[i] == n;
        cx->gemm_only_p[i] = NULL;
        cx->gemm_only_n[i] = 0;
    }
}
// A gemm_only hint (backend.h) for p [n]: the two newest stay pending.
static inline void rp_cuda_hint_gemm_only(rp_cuda_ctx *cx, const float *p, size_t n) {
    cx->gemm_only_p[1] = cx->gemm_only_p[0];
    cx->gemm_only_n[1] = cx->gemm_only_n[0];
    cx->gemm_only_p[0] = p;
    cx->gemm_only_n[0] = n;
}
// The pending wkv_only hint (backend.h), taken by key_prepare or the WKV7
// backward: 1 when its kk / dkk p [n] is that hint's.
static inline int rp_cuda_take_wkv_only(rp_cuda_ctx *cx, const float *p, size_t n) {
    const int hit = cx->wkv_only_p == p && cx->wkv_only_n == n;
    cx->wkv_only_p = NULL;
    cx->wkv_only_n = 0;
    return hit;
}
// The pending rkv_only hint (backend.h), taken by matmul_linear,
// matmul_lora, key_prepare_from or value_residual_from: 1 when its output
// p [n] is that hint's (stored as rp_cuda_store16_rows says).
static inline int rp_cuda_take_rkv_only(rp_cuda_ctx *cx, const float *p, size_t n) {
    const int hit = cx->rkv_only_p == p && cx->rkv_only_n == n;
    cx->rkv_only_p = NULL;
    cx->rkv_only_n = 0;
    return hit;
}
// The pending drkv_only hint (backend.h), taken by
// groupnorm_bonus_gate_backward: 1 when its dr, dk, dv [n] are that hint's.
static inline int rp_cuda_take_drkv_only(rp_cuda_ctx *cx, const float *dr, const float *dk,
                                         const float *dv, size_t n) {
    const int hit = cx->drkv_only_p[0] == dr && cx->drkv_only_p[1] == dk &&
                    cx->drkv_only_p[2] == dv && cx->drkv_only_n == n && n > 0;
    cx->drkv_only_p[0] = cx->drkv_only_p[1] = cx->drkv_only_p[2] = NULL;
    cx->drkv_only_n = 0;
    return hit;
}
// f32 p [n] = bf16(p [n]) as f32, in place (the copies-off twin of a bf16
// in-place output; declares its write, which forgets p's records).
void rp_cuda_round_bf16(rp_cuda_ctx *cx, float *p, size_t n);
// Where a hinted training output (backend.h gemm_only, wkv_only, rkv_only)
// is stored bf16 only: BF16 math above RP_GEMV_MAX_M rows (fewer rows stay
// f32, which fits half of a buffer sized for bf16 only: cuda_store16_fits);
// with the copies off it is f32 rounded to bf16 instead (below).
static inline int rp_cuda_store16_rows(const rp_cuda_ctx *cx, long rows) {
    return cx->math == RP_CUDA_MATH_BF16 && rows > RP_GEMV_MAX_M;
}
// After the launch that wrote a hinted output p [n] (hinted: the hint taken
// and rp_cuda_store16_rows): in_place, p holds its bf16 values in place;
// else, hinted (the copies off), its f32 values are rounded to bf16, the
// same values for its readers; unhinted, nothing to do.
static inline void rp_cuda_store16_done(rp_cuda_ctx *cx, float *p, size_t n, int hinted,
                                        int in_place) {
    if (in_place)
        rp_cuda_inplace_add(cx, p, n);
    else if (hinted)
        rp_cuda_round_bf16(cx, p, n);
}

// dst [n] = bf16(src [n]) on the stream (writes no fp32 memory, so it keeps
// the activation copies valid).
void rp_cuda_to_bf16(rp_cuda_ctx *cx, __nv_bfloat16 *dst, const float *src, size_t n);

// Blocks of `threads` covering n items.
static inline unsigned rp_cuda_blocks(size_t n, int threads) {
    return (unsigned)((n + (size_t)threads - 1) / (size_t)threads);
}

// Each file installs its ops (and only those) into the vtable.
void rp_cuda_install_matmul(rp_backend *be);
void rp_cuda_install_elementwise(rp_backend *be);
void rp_cuda_install_backward(rp_backend *be);
void rp_cuda_install_wkv7(rp_backend *be);
void rp_cuda_install_loss(rp_backend *be);
void rp_cuda_install_decode(rp_backend *be);
void rp_cuda_install_graph(rp_backend *be);

// The sequence holding row r of a batch: the last s with row_begin[s] <= r
// (row_begin ascends; n_seq >= 1). The caller checks r < row_begin[s] +
// seq_len[s] where rows may lie between sequences.
__device__ __forceinline__ int rp_seq_of_row(const int32_t *row_begin, int n_seq, int r) {
    int lo = 0, hi = n_seq - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (row_begin[mid] <= r)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// Device math shared by kernels: the same formulas as src/cpu (accurate
// expf, not __expf: the twin tests hold fp32 kernels to 1e-5).
__device__ __forceinline__ float rp_sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
// WKV7 decay from its pre-activation: exp(-e^-0.5 * sigmoid(w_raw)).
__device__ __forceinline__ float rp_decayf(float w_raw) {
    return expf(-0.6065306597126334f * rp_sigmoidf(w_raw));
}

// Sums a full warp's v into lane 0 in a fixed tree order, then hands lane 0's
// value to every lane: a butterfly (shfl_xor) would sum in a different order
// in each lane, and lanes could disagree in the last bit.
__device__ __forceinline__ double rp_warp_sum_double(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return __shfl_sync(0xffffffffu, v, 0);
}

// Group-norm moments of one head x [n], computed by one full warp (`lane` =
// its lane): mean and 1/sqrt(var + eps), sums in double. groupnorm_kernel
// (training, prefill) and time_mix_heads_kernel (decode) both call it, so
// both paths normalise a head bit for bit alike.
// x may be bf16 (a WKV7 output stored so): each value widened to float
// first, then the same sums (float x: the same code as before).
__device__ __forceinline__ float rp_ldf(const float *p) { return *p; }
__device__ __forceinline__ float rp_ldf(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
template <typename T>
__device__ __forceinline__ void rp_warp_group_moments(const T *x, int n, float eps, int lane,
                                                      float *mean, float *rstd) {
    double sum = 0.0;
    for (int j = lane; j < n; j += 32) sum += (double)rp_ldf(x + j);
    sum = rp_warp_sum_double(sum);
    const float m = (float)(sum / n);
    double sq = 0.0;
    for (int j = lane; j < n; j += 32) {
        const double d = (double)(rp_ldf(x + j) - m);
        sq += d * d;
    }
    sq = rp_warp_sum_double(sq);
    *mean = m;
    *rstd = (float)(1.0 / sqrt(sq / n + (double)eps));
}

// Sum of v over the block (blockDim.x a multiple of 32), the same value in
// every thread: each warp reduces the per-warp partials in the same order.
// `shared` [32] may be reused by the next call (the first barrier guards it).
__device__ __forceinline__ double rp_block_sum_double(double v, double *shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = rp_warp_sum_double(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    return rp_warp_sum_double(lane < n_warps ? shared[lane] : 0.0);
}

// Layernorm moments of row xr [C] as cpu_moments (the mean of the floats
// summed in double, then the double sum of (x - mean)^2 with x - mean rounded
// to float first), summed as a block of `threads` threads would: thread t
// takes W floats at t W, t W + threads W, ...; threads from `threads` up to
// blockDim.x add 0 (exact), so a bigger block gets the same bits. Every
// thread gets them. layernorm_kernel, ln_shift_mix_kernel and the decode
// GEMVs' LN prologue (cuda_decode.cu) all call it.
template <int W>
__device__ __forceinline__ void rp_row_moments(const float *xr, int C, float eps, int threads, double *shared,
                               float *mean_out, float *rstd_out) {
    const int step = threads * W;
    const int c0 = (int)threadIdx.x < threads ? (int)threadIdx.x * W : C;
    double sum = 0.0;
    for (int c = c0; c < C; c += step)
#pragma unroll
        for (int i = 0; i < W; i++) sum += (double)xr[c + i];
    sum = rp_block_sum_double(sum, shared);
    const float m = (float)(sum / C);
    double sq = 0.0;
    for (int c = c0; c < C; c += step)
#pragma unroll
        for (int i = 0; i < W; i++) {
            const double d = (double)(xr[c + i] - m);
            sq += d * d;
        }
    sq = rp_block_sum_double(sq, shared);
    *mean_out = m;
    *rstd_out = (float)(1.0 / sqrt(sq / C + (double)eps));
}

// The layernorm output of one element, then its lerp with the token-shift
// value: one expression each for ln_shift_mix_kernel and the fused decode
// GEMVs, so nvcc contracts them alike (the same bits).
__device__ __forceinline__ float rp_ln_value(float v, float m, float s, float w, float b) {
    return (v - m) * s * w + b;
}
__device__ __forceinline__ float rp_mix_value(float a, float old, float mu) {
    return a + (old - a) * mu;
}

#endif
