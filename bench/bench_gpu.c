/* bench_gpu: the CUDA backend (bf16 GEMMs, fp32 elsewhere) on one GPU against
 * the ceilings measured in the same run: device-to-device copy bandwidth and
 * the cuBLAS bf16 GEMM rate. Rows: step-mode decode latency at batch 1 against
 * the weight-streaming floor, decode tokens/s at batch 64 and 256, the WKV7
 * training kernels alone, and training tokens/s and MFU of a 0.4b-shaped model
 * at T = 4096. Prints one markdown table; see bench/README.md ("GPU"). */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "core/version.h"
#include "cuda_backend.h"
#include "cuda_device.h"
#include "cuda_wkv7.h"
#include "harness.h"
#include "gpu_model.h"
#include "op_profile.h"
#include "model/init.h"
#include "model/model.h"
#include "model/backward.h"
#include "optim/optim.h"
#include "core/clock.h"

/* Goals of the CUDA backend issue. */
#define GOAL_DECODE_OVER_FLOOR 1.3
#define GOAL_TRAIN_MFU 0.45

#define DECODE_MAX_BATCH 256
#define TRAIN_MAX_SEQS 16
/* The training micro-batch is sized so that activations fit in this much
 * (what an 80 GB card leaves after weights, gradients and Adam moments). */
#define TRAIN_ACTIVATION_BUDGET_BYTES (70.0 * 1073741824.0)
/* Left free for cuBLAS workspaces, op scratch and the allocator. */
#define TRAIN_RESERVE_BYTES (4.0 * 1073741824.0)
/* Floats per host tile when filling device buffers with random values: the
 * pattern repeats every tile, which no timing can see, and host time stays
 * well under a second per GiB. */
#define FILL_TILE_FLOATS ((size_t)1 << 22)
#define SEED 20250101ull

enum { ROW_CEILINGS = 1, ROW_DECODE = 2, ROW_BATCH = 4, ROW_WKV7 = 8, ROW_TRAIN = 16 };
static const struct {
    const char *name;
    unsigned bit;
} row_names[] = {{"ceilings", ROW_CEILINGS}, {"decode", ROW_DECODE}, {"batch", ROW_BATCH},
                 {"wkv7", ROW_WKV7},         {"train", ROW_TRAIN}};

typedef struct {
    int device, quick, reps, profile;
    unsigned rows;
} options;

/* --profile: the per-op tables, kept in memory and printed after the main
 * table (which stays the first table of the output). NULL without it. */
static FILE *profile_out;
static char *profile_text;
static size_t profile_text_len;

/* ---- the table, printed at the end (progress goes to stderr meanwhile) ---- */

typedef struct {
    char label[160], measured[80], bound[80], ratio[48], goal[24];
} table_row;

#define MAX_TABLE_ROWS 48
#define MAX_NOTES 16
static table_row table[MAX_TABLE_ROWS];
static int n_table;
static char notes[MAX_NOTES][RP_ERROR_MSG_LEN + 64];
static int n_notes, n_failures;

static table_row *row_add(const char *label_fmt, ...) {
    static table_row spare; /* beyond MAX_TABLE_ROWS (never: the rows are fixed) */
    table_row *r = n_table < MAX_TABLE_ROWS ? &table[n_table++] : &spare;
    memset(r, 0, sizeof *r);
    va_list ap;
    va_start(ap, label_fmt);
    vsnprintf(r->label, sizeof r->label, label_fmt, ap);
    va_end(ap);
    return r;
}

static void note_add(const char *fmt, ...) {
    if (n_notes == MAX_NOTES) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(notes[n_notes++], sizeof notes[0], fmt, ap);
    va_end(ap);
}

/* A section that could not run: one note with the message, exit status 1. */
static void section_failed(const char *section, const rp_error *err) {
    fprintf(stderr, "bench_gpu: %s: %s\n", section, err->msg);
    note_add("**%s failed**: %s", section, err->msg);
    n_failures++;
}

static void progress(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "bench_gpu: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static const char *goal_mark(int met) { return met ? "✓" : "✗"; }

/* ---- timing: device synchronised around host clocks ---- */

typedef struct {
    double warmup_s;     /* warm-up: at least 2 calls and this long */
    double min_batch_s;  /* a timed batch has enough calls to last this long */
    int reps;            /* timed batches; the median is reported */
    double max_s;        /* a slow call gets fewer batches (at least 3) within this */
} gpu_timing;

typedef struct {
    double seconds;  /* median seconds per call; negative when a call failed */
    int reps;        /* batches actually timed */
    long calls;      /* calls per batch */
} gpu_result;

/* call enqueues one unit of work (it may synchronise itself); sync waits for
 * the device and returns non-zero when the backend recorded an error. */
typedef int (*gpu_sync_fn)(void *ctx);

static gpu_result gpu_measure(bench_call_fn call, gpu_sync_fn sync, void *ctx,
                              const gpu_timing *t) {
    gpu_result res = {-1.0, 0, 0};
    /* Warm-up: first calls pay for cuBLAS heuristics, scratch growth and
     * lazy module loading; the last call's time calibrates the batch. */
    double start = rp_now_seconds(), last = 0.0;
    int calls = 0;
    do {
        double t0 = rp_now_seconds();
        if (call(ctx) || sync(ctx)) return res;
        last = rp_now_seconds() - t0;
        calls++;
    } while (calls < 2 || rp_now_seconds() - start < t->warmup_s);
    long per_batch = last > 0.0 ? (long)(t->min_batch_s / last) + 1 : 1;
    int reps = t->reps;
    double batch_s = last * (double)per_batch;
    if (batch_s * reps > t->max_s) reps = (int)(t->max_s / batch_s);
    if (reps < 3) reps = 3;
    double *samples = malloc((size_t)reps * sizeof *samples);
    if (!samples) return res;
    for (int r = 0; r < reps; r++) {
        double t0 = rp_now_seconds();
        for (long i = 0; i < per_batch; i++)
            if (call(ctx)) goto out;
        if (sync(ctx)) goto out;
        samples[r] = (rp_now_seconds() - t0) / (double)per_batch;
    }
    res.seconds = bench_median(samples, reps);
    res.reps = reps;
    res.calls = per_batch;
out:
    free(samples);
    return res;
}

/* Backend-based sections: synchronise, then ask for the sticky error. */
typedef struct {
    rp_backend *be;
    rp_error err;
} backend_sync;

static int backend_sync_call(void *ctx) {
    backend_sync *s = ctx; /* every backend context below starts with one */
    s->be->synchronize(s->be);
    return s->be->status(s->be, &s->err) != RP_OK;
}

/* The error of a failed measurement: the backend's, or a generic one. */
static rp_status measure_error(backend_sync *s, const char *what, rp_error *err) {
    if (s->be->status(s->be, err) != RP_OK) return err->code;
    if (s->err.code != RP_OK) {
        *err = s->err;
        return err->code;
    }
    return rp_error_set(err, RP_ERR_INTERNAL, "%s: a timed call failed", what);
}

static void cell_timing(char *out, size_t size, const gpu_result *r) {
    snprintf(out, size, "%d×%ld", r->reps, r->calls);
}

/* ---- random device buffers ---- */

/* [dst, dst + n) = uniform(offset - scale, offset + scale), tiled from one
 * host tile; normalise_64 makes every aligned group of 64 unit-L2 (the
 * per-head normalised removal key of WKV7). */
static rp_status fill_backend(rp_backend *be, float *dst, size_t n, float scale, float offset,
                              int normalise_64, unsigned long long seed, rp_error *err) {
    size_t tile = n < FILL_TILE_FLOATS ? n : FILL_TILE_FLOATS;
    float *host = malloc(tile * sizeof *host);
    if (!host)
        return rp_error_set(err, RP_ERR_NOMEM, "cannot allocate a %zu-float fill tile", tile);
    bench_fill_uniform(host, tile, scale, seed);
    for (size_t i = 0; i < tile; i++) host[i] += offset;
    if (normalise_64)
        for (size_t h = 0; h + 64 <= tile; h += 64) {
            double ss = 0.0;
            for (int j = 0; j < 64; j++) ss += (double)host[h + j] * host[h + j];
            float inv = ss > 0.0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
            for (int j = 0; j < 64; j++) host[h + j] *= inv;
        }
    for (size_t at = 0; at < n; at += tile)
        be->copy_to_device(be, dst + at, host, (n - at < tile ? n - at : tile) * sizeof(float));
    free(host);
    return RP_OK;
}

/* bf16 bits of x, round to nearest even (finite inputs). */
static uint16_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- ceilings: copy bandwidth and the cuBLAS bf16 GEMM rate ---- */

typedef struct {
    cudaStream_t stream;
    cublasHandle_t cublas;
    void *src, *dst;
    size_t copy_bytes;
    uint16_t *a, *b;
    float *c;
    int n;
    const char *failed; /* what failed, for the message */
    int code;
} ceiling_ctx;

static int copy_call(void *p) {
    ceiling_ctx *c = p;
    cudaError_t rc = cudaMemcpyAsync(c->dst, c->src, c->copy_bytes, cudaMemcpyDeviceToDevice,
                                     c->stream);
    if (rc != cudaSuccess) c->failed = cudaGetErrorString(rc);
    return rc != cudaSuccess;
}

/* C [n,n] fp32 = A^T B, bf16 operands, fp32 accumulation: the operation and
 * operand layout of the backend's matmul_linear in bf16 math. */
static int gemm_call(void *p) {
    ceiling_ctx *c = p;
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t rc = cublasGemmEx(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, c->n, c->n, c->n, &one,
                                     c->a, CUDA_R_16BF, c->n, c->b, CUDA_R_16BF, c->n, &zero,
                                     c->c, CUDA_R_32F, c->n, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT);
    if (rc != CUBLAS_STATUS_SUCCESS) {
        c->failed = "cublasGemmEx";
        c->code = (int)rc;
    }
    return rc != CUBLAS_STATUS_SUCCESS;
}

static int ceiling_sync(void *p) {
    ceiling_ctx *c = p;
    cudaError_t rc = cudaStreamSynchronize(c->stream);
    if (rc != cudaSuccess) c->failed = cudaGetErrorString(rc);
    return rc != cudaSuccess;
}

/* Fills n elements of a device buffer (fp32 or bf16) with uniform values. */
static int fill_device(void *dst, size_t n, int bf16, unsigned long long seed) {
    size_t tile = n < FILL_TILE_FLOATS ? n : FILL_TILE_FLOATS;
    size_t elem = bf16 ? 2 : 4;
    float *host = malloc(tile * sizeof *host);
    uint16_t *half = bf16 ? malloc(tile * sizeof *half) : NULL;
    if (!host || (bf16 && !half)) {
        free(host);
        free(half);
        return -1;
    }
    bench_fill_uniform(host, tile, 1.0f, seed);
    if (bf16)
        for (size_t i = 0; i < tile; i++) half[i] = bf16_bits(host[i]);
    const char *src = bf16 ? (const char *)half : (const char *)host;
    int rc = 0;
    for (size_t at = 0; at < n && !rc; at += tile)
        rc = cudaMemcpy((char *)dst + at * elem, src, (n - at < tile ? n - at : tile) * elem,
                        cudaMemcpyHostToDevice) != cudaSuccess;
    free(host);
    free(half);
    return rc;
}

typedef struct {
    double copy_gbps;     /* bytes read + written per second, 1e9 */
    double gemm_tflops;
} ceilings;

static rp_status measure_ceilings(ceilings *out, const options *o, const gpu_timing *t,
                                  rp_error *err) {
    ceiling_ctx c = {0};
    c.copy_bytes = o->quick ? (size_t)256 << 20 : (size_t)1 << 30;
    c.n = o->quick ? 4096 : 8192;
    const size_t nn = (size_t)c.n * c.n;
    rp_status st = RP_OK;
    if (cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking) != cudaSuccess ||
        cublasCreate(&c.cublas) != CUBLAS_STATUS_SUCCESS ||
        cublasSetStream(c.cublas, c.stream) != CUBLAS_STATUS_SUCCESS) {
        st = rp_error_set(err, RP_ERR_INTERNAL, "cannot create a CUDA stream and cuBLAS handle");
        goto done;
    }
    if (cudaMalloc(&c.src, c.copy_bytes) != cudaSuccess ||
        cudaMalloc(&c.dst, c.copy_bytes) != cudaSuccess ||
        cudaMalloc((void **)&c.a, nn * 2) != cudaSuccess ||
        cudaMalloc((void **)&c.b, nn * 2) != cudaSuccess ||
        cudaMalloc((void **)&c.c, nn * 4) != cudaSuccess) {
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate the %zu MiB copy buffers and the "
                          "%d^3 GEMM operands", c.copy_bytes >> 20, c.n);
        goto done;
    }
    if (fill_device(c.src, c.copy_bytes / 4, 0, 11) || fill_device(c.a, nn, 1, 12) ||
        fill_device(c.b, nn, 1, 13)) {
        st = rp_error_set(err, RP_ERR_INTERNAL, "cannot fill the ceiling buffers");
        goto done;
    }
    progress("ceilings: device-to-device copy of %zu MiB...", c.copy_bytes >> 20);
    gpu_result copy = gpu_measure(copy_call, ceiling_sync, &c, t);
    if (copy.seconds <= 0.0) {
        st = rp_error_set(err, RP_ERR_INTERNAL, "cudaMemcpyAsync: %s", c.failed ? c.failed : "?");
        goto done;
    }
    progress("ceilings: cuBLAS bf16 GEMM %d^3...", c.n);
    gpu_result gemm = gpu_measure(gemm_call, ceiling_sync, &c, t);
    if (gemm.seconds <= 0.0) {
        st = rp_error_set(err, RP_ERR_INTERNAL, "%s failed (status %d)",
                          c.failed ? c.failed : "GEMM", c.code);
        goto done;
    }
    out->copy_gbps = 2.0 * (double)c.copy_bytes / copy.seconds * 1e-9;
    out->gemm_tflops = 2.0 * (double)c.n * c.n * c.n / gemm.seconds * 1e-12;
    table_row *r = row_add("device-to-device copy bandwidth (cudaMemcpyAsync %zu MiB, read + "
                           "write), GB/s", c.copy_bytes >> 20);
    snprintf(r->measured, sizeof r->measured, "%.0f", out->copy_gbps);
    snprintf(r->bound, sizeof r->bound, "ceiling");
    cell_timing(r->ratio, sizeof r->ratio, &copy);
    r = row_add("cuBLAS GEMM %d³ bf16 in, fp32 accumulate and out, TFLOP/s", c.n);
    snprintf(r->measured, sizeof r->measured, "%.1f", out->gemm_tflops);
    snprintf(r->bound, sizeof r->bound, "ceiling");
    cell_timing(r->ratio, sizeof r->ratio, &gemm);
done:
    cudaFree(c.src);
    cudaFree(c.dst);
    cudaFree(c.a);
    cudaFree(c.b);
    cudaFree(c.c);
    if (c.cublas) cublasDestroy(c.cublas);
    if (c.stream) cudaStreamDestroy(c.stream);
    cudaGetLastError();
    return st;
}

/* ---- WKV7 forward (training) + backward on random inputs ---- */

typedef struct {
    backend_sync sync;  /* first: backend_sync_call reads it */
    float *y, *r, *w, *k, *v, *kk, *a, *dy, *dr, *dw, *dk, *dv, *dkk, *da;
    float *state, *dstate, *checkpoints;
    size_t state_floats;
    rp_batch batch;
    int C, N;
    /* bf16 I/O (cuda_wkv7.h): copies of the inputs and dy, bf16 y and gradients */
    rp_wkv7_bf16 in16;
    void *dy16, *y16, *g16[6];
} wkv_ctx;

static int wkv_call(void *p) {
    wkv_ctx *c = p;
    rp_backend *be = c->sync.be;
    const size_t stride = (size_t)c->C * c->N; /* one slot = H heads of N x N */
    /* Every sequence starts from the zero state, as in training. */
    be->fill_zero(be, c->state, c->state_floats * sizeof(float));
    be->fill_zero(be, c->dstate, c->state_floats * sizeof(float));
    be->wkv7_forward_train(be, c->y, c->r, c->w, c->k, c->v, c->kk, c->a, c->state, stride,
                           c->checkpoints, &c->batch, c->C, c->N);
    be->wkv7_backward(be, c->dr, c->dw, c->dk, c->dv, c->dkk, c->da, c->dstate, stride, c->dy,
                      c->r, c->w, c->k, c->v, c->kk, c->a, c->checkpoints, &c->batch, c->C, c->N);
    return 0;
}

/* The forward alone (the backward's time is the pair's minus this). */
static int wkv_fwd_call(void *p) {
    wkv_ctx *c = p;
    rp_backend *be = c->sync.be;
    const size_t stride = (size_t)c->C * c->N;
    be->fill_zero(be, c->state, c->state_floats * sizeof(float));
    be->wkv7_forward_train(be, c->y, c->r, c->w, c->k, c->v, c->kk, c->a, c->state, stride,
                           c->checkpoints, &c->batch, c->C, c->N);
    return 0;
}

/* The same pair with bf16 inputs, y and gradients (the official kernel's
 * dtypes); state, checkpoints and sums fp32. */
static int wkv16_call(void *p) {
    wkv_ctx *c = p;
    rp_backend *be = c->sync.be;
    const size_t stride = (size_t)c->C * c->N;
    be->fill_zero(be, c->state, c->state_floats * sizeof(float));
    be->fill_zero(be, c->dstate, c->state_floats * sizeof(float));
    rp_cuda_wkv7_forward_train_bf16(be, c->y16, 1, &c->in16, c->state, stride, c->checkpoints,
                                    &c->batch, c->C, c->N);
    rp_cuda_wkv7_backward_bf16(be, c->g16, 1, c->dstate, stride, c->dy16, &c->in16,
                               c->checkpoints, &c->batch, c->C, c->N, 0.0f);
    return 0;
}

static int wkv16_fwd_call(void *p) {
    wkv_ctx *c = p;
    rp_backend *be = c->sync.be;
    const size_t stride = (size_t)c->C * c->N;
    be->fill_zero(be, c->state, c->state_floats * sizeof(float));
    rp_cuda_wkv7_forward_train_bf16(be, c->y16, 1, &c->in16, c->state, stride, c->checkpoints,
                                    &c->batch, c->C, c->N);
    return 0;
}

/* The forward on the per-token kernel (the chunked one is the default at
 * this T): which of the two a GPU favours, and from which T. */
static int wkv_fwd_token_call(void *p) {
    const int saved = rp_cuda_wkv7_chunked_min_t;
    rp_cuda_wkv7_chunked_min_t = INT_MAX;
    wkv_fwd_call(p);
    rp_cuda_wkv7_chunked_min_t = saved;
    return 0;
}

/* The pair on the per-token forward and the step-back backward (CUDA
 * cores): what fp32 math runs, against the chunked kernels BF16 math runs. */
static int wkv_token_pair_call(void *p) {
    const int saved = rp_cuda_wkv7_chunked_min_t;
    rp_cuda_wkv7_chunked_min_t = INT_MAX;
    wkv_call(p);
    rp_cuda_wkv7_chunked_min_t = saved;
    return 0;
}

/* bf16 I/O rows: copies of the fp32 inputs, then forward and pair timed. */
static rp_status measure_wkv7_bf16(wkv_ctx *c, const gpu_timing *t, int B, int T, int C,
                                   size_t rc, rp_error *err) {
    rp_backend *be = c->sync.be;
    void **bufs[] = {(void **)&c->in16.r,  (void **)&c->in16.w_raw, (void **)&c->in16.k,
                     (void **)&c->in16.v,  (void **)&c->in16.kk,    (void **)&c->in16.a,
                     &c->dy16,             &c->y16,                 &c->g16[0],
                     &c->g16[1],           &c->g16[2],              &c->g16[3],
                     &c->g16[4],           &c->g16[5]};
    const float *src[] = {c->r, c->w, c->k, c->v, c->kk, c->a, c->dy};
    const int n_bufs = (int)(sizeof bufs / sizeof bufs[0]), n_src = 7;
    rp_status st = RP_OK;
    for (int i = 0; i < n_bufs && st == RP_OK; i++)
        if (!(*bufs[i] = be->alloc(be, rc * 2)))
            st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate [%d x %d, %d] bf16 wkv7 buffers",
                              B, T, C);
    for (int i = 0; i < n_src && st == RP_OK; i++)
        if (!rp_cuda_bf16_from_f32(be, *bufs[i], src[i], rc))
            st = measure_error(&c->sync, "wkv7 bf16 copies", err);
    gpu_result fwd = {0}, pair = {0};
    if (st == RP_OK) {
        progress("wkv7: bf16 I/O forward_train alone...");
        fwd = gpu_measure(wkv16_fwd_call, backend_sync_call, c, t);
        if (fwd.seconds <= 0.0) st = measure_error(&c->sync, "wkv7 bf16 forward_train", err);
    }
    if (st == RP_OK) {
        progress("wkv7: bf16 I/O forward_train + backward...");
        pair = gpu_measure(wkv16_call, backend_sync_call, c, t);
        if (pair.seconds <= 0.0) st = measure_error(&c->sync, "wkv7 bf16", err);
    }
    if (st == RP_OK) {
        table_row *f = row_add("wkv7 bf16 I/O forward_train, B=%d T=%d C=%d, ms", B, T, C);
        snprintf(f->measured, sizeof f->measured, "%.2f", fwd.seconds * 1e3);
        cell_timing(f->ratio, sizeof f->ratio, &fwd);
        table_row *r = row_add("wkv7 bf16 I/O forward_train + backward (the official "
                               "kernel's dtype), B=%d T=%d C=%d, ms", B, T, C);
        snprintf(r->measured, sizeof r->measured, "%.2f", pair.seconds * 1e3);
        snprintf(r->bound, sizeof r->bound, "official kernel ~7 ms (estimate)");
        cell_timing(r->ratio, sizeof r->ratio, &pair);
    }
    for (int i = 0; i < n_bufs; i++) be->free(be, *bufs[i]);
    return st;
}

/* At the official RWKV-7 kernel's benchmark shape (batch 8, T 4096, model
 * width 4096, head 64; that kernel takes bf16 r, w, k, v, a, b and returns
 * bf16 y and gradients), printed so the same card can time it beside these
 * rows: fp32 I/O (what the model passes without bf16 copies) and bf16 I/O
 * (the official kernel's own dtypes). */
static rp_status measure_wkv7(const options *o, const ceilings *bound, const gpu_timing *t,
                              rp_error *err) {
    const int B = o->quick ? 2 : 8, T = o->quick ? 1024 : 4096, C = o->quick ? 1024 : 4096;
    const int N = RP_HEAD_SIZE;
    rp_backend *be = rp_cuda_backend_create(o->device, RP_CUDA_MATH_BF16, err);
    if (!be) return err->code;
    wkv_ctx c = {.sync = {.be = be}, .C = C, .N = N};
    int seq_len[8], slot[8], row_begin[8];
    for (int s = 0; s < B; s++) {
        seq_len[s] = T;
        slot[s] = s;
    }
    rp_batch_init(&c.batch, B, seq_len, slot, row_begin);
    const size_t rc = (size_t)B * T * C;
    const size_t blocks = rp_wkv_checkpoint_offset(&c.batch, B);
    c.state_floats = (size_t)B * C * N;
    float **bufs[] = {&c.y, &c.r, &c.w, &c.k, &c.v, &c.kk, &c.a, &c.dy,
                      &c.dr, &c.dw, &c.dk, &c.dv, &c.dkk, &c.da};
    const int n_bufs = (int)(sizeof bufs / sizeof bufs[0]);
    rp_status st = RP_OK;
    progress("wkv7: allocating %.1f GB and filling random inputs (B=%d T=%d C=%d)...",
             (double)(n_bufs * rc + blocks * C * N + 2 * c.state_floats) * 4e-9, B, T, C);
    for (int i = 0; i < n_bufs && st == RP_OK; i++)
        if (!(*bufs[i] = be->alloc(be, rc * sizeof(float))))
            st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate [%d x %d, %d] wkv7 buffers",
                              B, T, C);
    if (st == RP_OK && (!(c.state = be->alloc(be, c.state_floats * sizeof(float))) ||
                        !(c.dstate = be->alloc(be, c.state_floats * sizeof(float))) ||
                        !(c.checkpoints = be->alloc(be, blocks * C * N * sizeof(float)))))
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate %zu wkv7 checkpoint blocks", blocks);
    /* r, k, v, dy of order 1; w_raw spans the decay's range (the decay
     * exp(-e^-0.5 sigmoid(w_raw)) stays in (0.54, 1)); a in [0, 1) like the
     * sigmoid output it is; kk unit per head like the normalised key. */
    if (st == RP_OK) st = fill_backend(be, c.r, rc, 1.0f, 0.0f, 0, 21, err);
    if (st == RP_OK) st = fill_backend(be, c.w, rc, 3.0f, 0.0f, 0, 22, err);
    if (st == RP_OK) st = fill_backend(be, c.k, rc, 0.5f, 0.0f, 0, 23, err);
    if (st == RP_OK) st = fill_backend(be, c.v, rc, 1.0f, 0.0f, 0, 24, err);
    if (st == RP_OK) st = fill_backend(be, c.kk, rc, 1.0f, 0.0f, 1, 25, err);
    if (st == RP_OK) st = fill_backend(be, c.a, rc, 0.5f, 0.5f, 0, 26, err);
    if (st == RP_OK) st = fill_backend(be, c.dy, rc, 1.0f, 0.0f, 0, 27, err);
    gpu_result fwd = {0}, tok = {0};
    if (st == RP_OK) {
        progress("wkv7: forward_train alone...");
        fwd = gpu_measure(wkv_fwd_call, backend_sync_call, &c, t);
        if (fwd.seconds <= 0.0) st = measure_error(&c.sync, "wkv7 forward_train", err);
    }
    if (st == RP_OK) {
        progress("wkv7: forward_train on the per-token kernel...");
        tok = gpu_measure(wkv_fwd_token_call, backend_sync_call, &c, t);
        if (tok.seconds <= 0.0) {
            st = measure_error(&c.sync, "wkv7 forward_train (per token)", err);
        } else {
            table_row *f = row_add("wkv7 forward_train per-token kernel, B=%d T=%d C=%d, ms",
                                   B, T, C);
            snprintf(f->measured, sizeof f->measured, "%.2f", tok.seconds * 1e3);
            snprintf(f->bound, sizeof f->bound, "chunked: %.2f ms", fwd.seconds * 1e3);
            cell_timing(f->ratio, sizeof f->ratio, &tok);
        }
    }
    if (st == RP_OK) {
        progress("wkv7: forward_train + backward...");
        gpu_result res = gpu_measure(wkv_call, backend_sync_call, &c, t);
        if (res.seconds <= 0.0) {
            st = measure_error(&c.sync, "wkv7", err);
        } else {
            double model_fwd, model_bwd;
            gpu_model_wkv7(B, T, C, &model_fwd, &model_bwd);
            progress("wkv7: shape B=%d T=%d C=%d H=%d head %d, fp32 I/O, then bf16 I/O (the "
                     "official kernel's benchmark: the same B, T, C, head, bf16 I/O)", B, T, C,
                     C / N, N);
            table_row *f = row_add("wkv7 forward_train, B=%d T=%d C=%d, ms", B, T, C);
            snprintf(f->measured, sizeof f->measured, "%.2f", fwd.seconds * 1e3);
            snprintf(f->bound, sizeof f->bound, "%.2f ms (wave model)", model_fwd * 1e3);
            cell_timing(f->ratio, sizeof f->ratio, &fwd);
            f = row_add("wkv7 backward (pair - forward), B=%d T=%d C=%d, ms", B, T, C);
            snprintf(f->measured, sizeof f->measured, "%.2f", (res.seconds - fwd.seconds) * 1e3);
            snprintf(f->bound, sizeof f->bound, "%.2f ms (wave model)", model_bwd * 1e3);
            /* Bytes an ideal pair of kernels moves, in [R,C] units: forward
             * reads 6 inputs, writes y and the checkpoints (N/16 = 4 units);
             * backward reads dy, the 6 inputs and the checkpoints and writes
             * 6 gradients. */
            const double units = (6 + 1 + 4) + (1 + 6 + 4 + 6);
            const double bytes = units * (double)rc * sizeof(float);
            const double gbps = bytes / res.seconds * 1e-9;
            table_row *r = row_add("wkv7 forward_train + backward, B=%d T=%d C=%d, ms", B, T, C);
            snprintf(r->measured, sizeof r->measured, "%.2f", res.seconds * 1e3);
            if (bound->copy_gbps > 0.0)
                snprintf(r->bound, sizeof r->bound, "%.2f ms at copy bandwidth",
                         bytes / (bound->copy_gbps * 1e9) * 1e3);
            cell_timing(r->ratio, sizeof r->ratio, &res);
            progress("wkv7: per-token forward + step-back backward...");
            gpu_result old = gpu_measure(wkv_token_pair_call, backend_sync_call, &c, t);
            if (old.seconds <= 0.0) {
                st = measure_error(&c.sync, "wkv7 (per-token + step-back)", err);
            } else {
                table_row *b = row_add("wkv7 backward, step-back kernel (pair - per-token "
                                       "forward), B=%d T=%d C=%d, ms", B, T, C);
                snprintf(b->measured, sizeof b->measured, "%.2f",
                         (old.seconds - tok.seconds) * 1e3);
                snprintf(b->bound, sizeof b->bound, "chunked mma: %.2f ms",
                         (res.seconds - fwd.seconds) * 1e3);
                cell_timing(b->ratio, sizeof b->ratio, &old);
            }
            r = row_add("wkv7 effective bandwidth (%.0f [R,C] fp32 tensors moved), GB/s", units);
            snprintf(r->measured, sizeof r->measured, "%.0f", gbps);
            if (bound->copy_gbps > 0.0) {
                snprintf(r->bound, sizeof r->bound, "%.0f (copy)", bound->copy_gbps);
                snprintf(r->ratio, sizeof r->ratio, "%.0f%%", 100.0 * gbps / bound->copy_gbps);
            }
        }
    }
    if (st == RP_OK) st = measure_wkv7_bf16(&c, t, B, T, C, rc, err);
    for (int i = 0; i < n_bufs; i++) be->free(be, *bufs[i]);
    be->free(be, c.state);
    be->free(be, c.dstate);
    be->free(be, c.checkpoints);
    rp_cuda_backend_destroy(be);
    return st;
}

/* ---- models ---- */

/* Weights for cfg on be. The official init (init.h) of one layer, L/2,
 * copied into every layer: the orthogonal inits are QRs in double on the
 * host, seconds per layer, and every layer costs the same to run whatever
 * its values. Matrices the official init leaves at zero (att.output,
 * ffn.value, the first LoRA factors) get small uniform noise so no GEMM
 * reads zeros. Embedding part from the official init (cheap); the head
 * uniform with the official orthogonal head's per-entry standard deviation
 * (0.5 / sqrt(C)), since its QR of a V x C matrix would outlast the
 * benchmark. Registered for the backend's bf16 copies. */
static rp_status model_build(rp_model *m, const rp_config *cfg, rp_backend *be, rp_error *err) {
    rp_status st = rp_model_alloc(m, cfg, 0, cfg->n_layer, 1, 1, be, err);
    if (st != RP_OK) return st;
    size_t staging = m->layer_floats;
    if (m->embed_floats > staging) staging = m->embed_floats;
    if (m->head_floats > staging) staging = m->head_floats;
    float *host = malloc(staging * sizeof *host);
    if (!host)
        return rp_error_set(err, RP_ERR_NOMEM, "cannot allocate a %zu-float init buffer", staging);
    st = rp_init_layer(host, cfg, cfg->n_layer / 2, SEED, err);
    if (st == RP_OK) {
        rp_tensor_info layer_table[RP_LAYER_N_TENSORS];
        rp_layer_layout(cfg, layer_table);
        for (int i = 0; i < RP_LAYER_N_TENSORS; i++) {
            const rp_tensor_info *ti = &layer_table[i];
            if (ti->init != RP_INIT_ZEROS || ti->ndim != 2) continue;
            double fan = (double)(ti->shape[0] > ti->shape[1] ? ti->shape[0] : ti->shape[1]);
            bench_fill_uniform(host + ti->flat_offset, (size_t)ti->numel,
                               (float)(0.5 / sqrt(fan)), SEED + 100 + (unsigned)i);
        }
        for (int l = 0; l < cfg->n_layer; l++)
            be->copy_to_device(be, m->layer_flat[l], host, m->layer_floats * sizeof(float));
        st = rp_init_global(host, NULL, cfg, SEED, err);
    }
    if (st == RP_OK) {
        be->copy_to_device(be, m->embed_flat, host, m->embed_floats * sizeof(float));
        rp_tensor_info global_table[RP_GLOBAL_N_TENSORS];
        size_t embed_floats, head_floats;
        rp_global_layout(cfg, global_table, &embed_floats, &head_floats);
        memset(host, 0, m->head_floats * sizeof(float));
        for (int i = 0; i < RP_GLOBAL_N_TENSORS; i++) {
            const rp_tensor_info *ti = &global_table[i];
            if (ti->part != RP_PART_HEAD) continue;
            float *x = host + ti->flat_offset;
            if (ti->init == RP_INIT_ONES)
                for (int64_t j = 0; j < ti->numel; j++) x[j] = 1.0f;
            else if (ti->init == RP_INIT_HEAD)
                bench_fill_uniform(x, (size_t)ti->numel,
                                   (float)(sqrt(3.0) * 0.5 / sqrt((double)cfg->n_embd)), SEED + 1);
        }
        be->copy_to_device(be, m->head_flat, host, m->head_floats * sizeof(float));
        rp_model_register_weights(m);
        be->synchronize(be);
        st = be->status(be, err);
    }
    free(host);
    return st;
}

/* ---- decode: step mode through rp_model_forward ---- */

typedef struct {
    backend_sync sync;  /* first: backend_sync_call reads it */
    const rp_model *model;
    rp_workspace *ws;
    rp_state *state;
    float *logits;
    int32_t tokens[DECODE_MAX_BATCH];
    int seq_len[DECODE_MAX_BATCH], slot[DECODE_MAX_BATCH], row_begin[DECODE_MAX_BATCH];
    rp_batch batch;
    unsigned long long rng;
} decode_ctx;

/* One decode step of every sequence, synchronised: a decode loop needs the
 * logits before it can pick the next token, so the step's latency includes
 * whatever launch overhead the GPU does not hide. */
static int decode_call(void *p) {
    decode_ctx *c = p;
    for (int i = 0; i < c->batch.n_rows; i++) {
        c->rng = c->rng * 6364136223846793005ull + 1442695040888963407ull;
        c->tokens[i] = (int32_t)((c->rng >> 33) % (unsigned long long)c->model->cfg.vocab_size);
    }
    if (rp_model_forward(c->model, c->ws, c->tokens, &c->batch, c->state, RP_LOGITS_LAST,
                         c->logits, &c->sync.err) != RP_OK)
        return 1;
    return backend_sync_call(c);
}

/* Seconds per step at batch n_seq (fresh state), after checking that the
 * logits of the last step are finite. */
static rp_status decode_measure(const rp_model *m, rp_workspace *ws, rp_state *state,
                                float *logits, int n_seq, const gpu_timing *t, gpu_result *out,
                                rp_error *err) {
    rp_backend *be = m->be;
    decode_ctx *c = calloc(1, sizeof *c);
    if (!c) return rp_error_set(err, RP_ERR_NOMEM, "decode context");
    c->sync.be = be;
    c->model = m;
    c->ws = ws;
    c->state = state;
    c->logits = logits;
    c->rng = 12345;
    for (int s = 0; s < n_seq; s++) {
        c->seq_len[s] = 1;
        c->slot[s] = s;
    }
    rp_batch_init(&c->batch, n_seq, c->seq_len, c->slot, c->row_begin);
    be->fill_zero(be, state->data, state->floats_per_slot * (size_t)n_seq * sizeof(float));
    *out = gpu_measure(decode_call, backend_sync_call, c, t);
    rp_status st = RP_OK;
    if (out->seconds <= 0.0) st = measure_error(&c->sync, "decode", err);
    const size_t n = (size_t)n_seq * m->cfg.vocab_size;
    float *host = st == RP_OK ? malloc(n * sizeof *host) : NULL;
    if (st == RP_OK && !host) st = rp_error_set(err, RP_ERR_NOMEM, "logits check buffer");
    if (st == RP_OK) {
        be->copy_to_host(be, host, logits, n * sizeof(float));
        st = be->status(be, err);
        for (size_t i = 0; st == RP_OK && i < n; i++)
            if (!isfinite(host[i]))
                st = rp_error_set(err, RP_ERR_INTERNAL,
                                  "logit %zu of the batch-%d decode step is %g: the backend "
                                  "computed garbage, timings are meaningless", i, n_seq, host[i]);
    }
    free(host);
    free(c);
    return st;
}

/* --profile of a batch-1 decode step: 3 untimed steps, then 20 through an
 * op_profile wrapper of the model's backend. */
static rp_status profile_decode(const rp_model *m, rp_workspace *ws, rp_state *state,
                                float *logits, const char *config, double unprofiled_ms,
                                rp_error *err) {
    decode_ctx *c = calloc(1, sizeof *c);
    op_profile *prof = malloc(sizeof *prof);
    if (!c || !prof) {
        free(c);
        free(prof);
        return rp_error_set(err, RP_ERR_NOMEM, "decode profile");
    }
    op_profile_wrap(prof, m->be);
    rp_model view = *m;
    view.be = &prof->be;
    c->sync.be = &prof->be;
    c->model = &view;
    c->ws = ws;
    c->state = state;
    c->logits = logits;
    c->rng = 777;
    c->seq_len[0] = 1;
    rp_batch_init(&c->batch, 1, c->seq_len, c->slot, c->row_begin);
    int failed = 0;
    for (int i = 0; i < 23 && !failed; i++) {
        if (i == 3) op_profile_reset(prof);
        failed = decode_call(c);
    }
    rp_status st = RP_OK;
    if (failed) {
        st = measure_error(&c->sync, "decode profile", err);
    } else {
        char title[96];
        snprintf(title, sizeof title, "Per-op time: decode %s, batch 1", config);
        op_profile_print(profile_out, prof, title, 20, unprofiled_ms);
    }
    free(prof);
    free(c);
    return st;
}

typedef struct {
    const char *config;
    int decode_b1;     /* row: batch-1 latency */
    int batches[2];    /* rows: batched decode (0 = none) */
} decode_plan;

static rp_status measure_decode(const rp_model *m, const char *config, const decode_plan *plan,
                                const ceilings *bound, const gpu_timing *t, rp_error *err) {
    rp_backend *be = m->be;
    const rp_config *cfg = &m->cfg;
    int max_batch = 1;
    for (int i = 0; i < 2; i++)
        if (plan->batches[i] > max_batch) max_batch = plan->batches[i];
    rp_workspace ws;
    rp_state state;
    rp_state_geometry(&state, cfg, 0, cfg->n_layer, max_batch);
    rp_status st = rp_workspace_alloc(&ws, cfg, max_batch, be, err);
    if (st != RP_OK) return st;
    state.data = be->alloc(be, state.floats_per_slot * (size_t)max_batch * sizeof(float));
    float *logits = be->alloc(be, (size_t)max_batch * cfg->vocab_size * sizeof(float));
    if (!state.data || !logits)
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate decode state and logits for %d "
                          "sequences", max_batch);
    /* Batch 1 reads every weight once per token: bf16 copies of the
     * non-embedding parameters and the head (the embedding row is noise). */
    const double bytes = 2.0 * ((double)rp_config_param_count_non_embedding(cfg) +
                                (double)cfg->vocab_size * cfg->n_embd);
    gpu_result b1 = {0};
    if (st == RP_OK) {
        progress("decode %s: batch 1...", config);
        st = decode_measure(m, &ws, &state, logits, 1, t, &b1, err);
    }
    if (st == RP_OK && plan->decode_b1) {
        const double floor_s = bound->copy_gbps > 0.0 ? bytes / (bound->copy_gbps * 1e9) : -1.0;
        table_row *r = row_add("decode %s (L%d C%d), batch 1, ms per token (%.2f GB of bf16 "
                               "weights per token)", config, cfg->n_layer, cfg->n_embd,
                               bytes * 1e-9);
        snprintf(r->measured, sizeof r->measured, "%.3f (%.0f tokens/s)", b1.seconds * 1e3,
                 1.0 / b1.seconds);
        if (floor_s > 0.0) {
            double ratio = b1.seconds / floor_s;
            snprintf(r->bound, sizeof r->bound, "%.3f floor", floor_s * 1e3);
            snprintf(r->ratio, sizeof r->ratio, "%.2fx %s", ratio,
                     goal_mark(ratio <= GOAL_DECODE_OVER_FLOOR));
        }
        snprintf(r->goal, sizeof r->goal, "≤ %.1fx", GOAL_DECODE_OVER_FLOOR);
        if (profile_out) {
            progress("decode %s: batch 1, per-op profile...", config);
            st = profile_decode(m, &ws, &state, logits, config, b1.seconds * 1e3, err);
        }
    }
    for (int i = 0; i < 2 && st == RP_OK; i++) {
        const int B = plan->batches[i];
        if (!B) continue;
        progress("decode %s: batch %d...", config, B);
        gpu_result res;
        st = decode_measure(m, &ws, &state, logits, B, t, &res, err);
        if (st != RP_OK) break;
        table_row *r = row_add("decode %s, batch %d, tokens/s", config, B);
        snprintf(r->measured, sizeof r->measured, "%.0f", B / res.seconds);
        snprintf(r->bound, sizeof r->bound, "batch 1: %.0f", 1.0 / b1.seconds);
        snprintf(r->ratio, sizeof r->ratio, "%.1fx batch 1", B * b1.seconds / res.seconds);
    }
    be->free(be, logits);
    be->free(be, state.data);
    rp_workspace_free(&ws, be);
    return st;
}

/* ---- training: full optimizer steps through the train API ---- */

typedef struct {
    backend_sync sync;  /* first: backend_sync_call reads it */
    rp_model *model, *grads, *adam_m, *adam_v;
    rp_backward_workspace *tw;
    rp_state *state, *dstate;
    rp_batch *batch;
    int32_t *inputs, *targets;
    rp_optim_config *optim;
    long step;
    double loss, first_loss; /* mean cross-entropy of the last and the first step */
} train_ctx;

static int train_call(void *p) {
    train_ctx *c = p;
    rp_backend *be = c->sync.be;
    const size_t state_bytes =
        c->state->floats_per_slot * (size_t)c->state->n_slots * sizeof(float);
    rp_model_zero(c->grads);
    be->fill_zero(be, c->state->data, state_bytes);
    be->fill_zero(be, c->dstate->data, state_bytes);
    int n_targets = 0;
    const float scale = 1.0f / (float)c->batch->n_rows;
    if (rp_model_train_step(c->model, c->grads, c->tw, c->inputs, c->targets, c->batch, c->state,
                            c->dstate, scale, 1e-4f * scale, &c->loss, &n_targets,
                            &c->sync.err) != RP_OK)
        return 1;
    c->loss /= n_targets > 0 ? n_targets : 1;
    if (c->step == 0) c->first_loss = c->loss;
    double norm = sqrt(rp_grad_sum_squares(c->grads));
    rp_optim_step(c->model, c->grads, c->adam_m, c->adam_v, c->optim, c->step++,
                  rp_clip_scale(norm, c->optim->grad_clip));
    return 0;
}

/* Device bytes per token of a training micro-batch: what
 * rp_backward_workspace_alloc carves per row (src/model/backward.c: 20 [R,C]
 * buffers, the LoRA and FFN hiddens and the WKV checkpoints per layer; 27
 * [R,C], the FFN and LoRA scratch and the logits shared) plus the backend's
 * bf16 copies of the largest GEMM operands (logits gradient [R,V], FFN hidden
 * [R,F]) with their 1.25 growth margin. An estimate; the run prints the
 * measured use next to it. */
static double train_bytes_per_row(const rp_config *c) {
    const double C = c->n_embd, H = c->n_head, F = c->dim_ffn, V = c->vocab_size;
    const double ranks = c->d_decay + c->d_iclr + c->d_value + c->d_gate;
    int max_rank = c->d_decay;
    if (c->d_iclr > max_rank) max_rank = c->d_iclr;
    if (c->d_value > max_rank) max_rank = c->d_value;
    if (c->d_gate > max_rank) max_rank = c->d_gate;
    const double per_layer = 20 * C + 4 + 2 * H + ranks + F + H * 64 * 64 / RP_WKV_CHUNK;
    const double shared = 27 * C + 6 + max_rank + F + V;
    return 4.0 * (c->n_layer * per_layer + shared) + 2.0 * 1.25 * (V + F);
}

static double gib(double bytes) { return bytes / 1073741824.0; }

static rp_status measure_train(rp_model *m, const char *config, int T, const ceilings *bound,
                               const gpu_timing *t, rp_error *err) {
    rp_backend *be = m->be;
    const rp_config *cfg = &m->cfg;
    rp_model grads, adam_m, adam_v;
    rp_backward_workspace tw;
    rp_state state, dstate;
    memset(&tw, 0, sizeof tw);
    memset(&grads, 0, sizeof grads);
    memset(&adam_m, 0, sizeof adam_m);
    memset(&adam_v, 0, sizeof adam_v);
    state.data = dstate.data = NULL;
    int32_t *inputs = NULL, *targets = NULL;
    progress("train %s: gradients and Adam moments...", config);
    rp_status st = rp_model_alloc(&grads, cfg, 0, cfg->n_layer, 1, 1, be, err);
    if (st == RP_OK) st = rp_model_alloc(&adam_m, cfg, 0, cfg->n_layer, 1, 1, be, err);
    if (st == RP_OK) st = rp_model_alloc(&adam_v, cfg, 0, cfg->n_layer, 1, 1, be, err);
    if (st == RP_OK) {
        be->synchronize(be);
        st = be->status(be, err);
    }
    if (st != RP_OK) goto done;

    /* The micro-batch: as many T-token sequences as fit the activation
     * budget in what is free now. */
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        cudaGetLastError();
        st = rp_error_set(err, RP_ERR_INTERNAL, "cudaMemGetInfo failed");
        goto done;
    }
    const double used_before = (double)(total_b - free_b);
    const double per_seq = train_bytes_per_row(cfg) * T;
    double budget = (double)free_b - TRAIN_RESERVE_BYTES;
    if (budget > TRAIN_ACTIVATION_BUDGET_BYTES) budget = TRAIN_ACTIVATION_BUDGET_BYTES;
    int B = budget > 0.0 ? (int)(budget / per_seq) : 0;
    if (B > TRAIN_MAX_SEQS) B = TRAIN_MAX_SEQS;
    if (B < 1) {
        st = rp_error_set(err, RP_ERR_NOMEM, "one %d-token sequence needs about %.1f GiB of "
                          "activations; %.1f GiB of %.1f GiB are free after the weights, "
                          "gradients and Adam moments", T, gib(per_seq), gib((double)free_b),
                          gib((double)total_b));
        goto done;
    }
    const int R = B * T;
    progress("train %s: micro-batch %d x %d tokens, about %.1f GiB of activations "
             "(%.1f GiB in use before)...", config, B, T, gib(per_seq * B), gib(used_before));
    st = rp_backward_workspace_alloc(&tw, m, R, B, err);
    rp_state_geometry(&state, cfg, 0, cfg->n_layer, B);
    dstate = state;
    const size_t state_bytes = state.floats_per_slot * (size_t)B * sizeof(float);
    if (st == RP_OK && (!(state.data = be->alloc(be, state_bytes)) ||
                        !(dstate.data = be->alloc(be, state_bytes))))
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate the state of %d sequences", B);
    inputs = malloc((size_t)R * sizeof *inputs);
    targets = malloc((size_t)R * sizeof *targets);
    if (st == RP_OK && (!inputs || !targets))
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate %d tokens", R);
    if (st != RP_OK) goto done;
    unsigned long long rng = 777;
    for (int i = 0; i < R; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        inputs[i] = (int32_t)((rng >> 33) % (unsigned long long)cfg->vocab_size);
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        targets[i] = (int32_t)((rng >> 33) % (unsigned long long)cfg->vocab_size);
    }
    int seq_len[TRAIN_MAX_SEQS], slot[TRAIN_MAX_SEQS], row_begin[TRAIN_MAX_SEQS];
    for (int s = 0; s < B; s++) {
        seq_len[s] = T;
        slot[s] = s;
    }
    rp_batch batch;
    rp_batch_init(&batch, B, seq_len, slot, row_begin);
    rp_optim_config optim;
    rp_optim_defaults(&optim);
    optim.total_steps = 1000;
    train_ctx c = {.sync = {.be = be}, .model = m, .grads = &grads, .adam_m = &adam_m,
                   .adam_v = &adam_v, .tw = &tw, .state = &state, .dstate = &dstate,
                   .batch = &batch, .inputs = inputs, .targets = targets, .optim = &optim};
    progress("train %s: optimizer steps...", config);
    gpu_result res = gpu_measure(train_call, backend_sync_call, &c, t);
    if (res.seconds <= 0.0) {
        st = measure_error(&c.sync, "train", err);
        goto done;
    }
    if (!isfinite(c.loss)) {
        st = rp_error_set(err, RP_ERR_DIVERGED, "training loss is %g after %ld steps: the backend "
                          "computed garbage, timings are meaningless", c.loss, c.step);
        goto done;
    }
    size_t free_after = 0;
    if (cudaMemGetInfo(&free_after, &total_b) != cudaSuccess) {
        cudaGetLastError();
        free_after = 0;
    }
    /* FLOPs per token: 6 per weight that takes part in a matmul (all but
     * the embedding lookup); the WKV recurrence is not counted. */
    const double matmul_params = (double)rp_config_param_count_non_embedding(cfg) +
                                 (double)cfg->vocab_size * cfg->n_embd;
    const double tokens_per_s = R / res.seconds;
    table_row *r = row_add("train %s (L%d C%d V%d) T=%d, micro-batch %d × %d tokens, "
                           "tokens/s", config, cfg->n_layer, cfg->n_embd, cfg->vocab_size, T,
                           B, T);
    snprintf(r->measured, sizeof r->measured, "%.0f (%.0f ms per step)", tokens_per_s,
             res.seconds * 1e3);
    cell_timing(r->ratio, sizeof r->ratio, &res);
    r = row_add("train MFU: 6 × %.0f M matmul params × tokens/s / GEMM ceiling",
                matmul_params * 1e-6);
    const double tflops = 6.0 * matmul_params * tokens_per_s * 1e-12;
    snprintf(r->measured, sizeof r->measured, "%.1f TFLOP/s", tflops);
    if (bound->gemm_tflops > 0.0) {
        double mfu = tflops / bound->gemm_tflops;
        snprintf(r->bound, sizeof r->bound, "%.1f TFLOP/s", bound->gemm_tflops);
        snprintf(r->ratio, sizeof r->ratio, "%.1f%% %s", 100.0 * mfu,
                 goal_mark(mfu >= GOAL_TRAIN_MFU));
    }
    snprintf(r->goal, sizeof r->goal, "≥ %.0f%%", 100.0 * GOAL_TRAIN_MFU);
    r = row_add("train device memory in use (cudaMemGetInfo), GiB");
    if (free_after > 0)
        snprintf(r->measured, sizeof r->measured, "%.1f", gib((double)(total_b - free_after)));
    snprintf(r->bound, sizeof r->bound, "%.1f estimated", gib(used_before + per_seq * B));
    snprintf(r->ratio, sizeof r->ratio, "of %.1f", gib((double)total_b));
    /* Every step trains on the same random batch, so the loss falls from
     * about ln V as the model memorises it: a sign the steps really learn. */
    note_add("training loss on one random batch: %.3f at the first step (ln V = %.3f), %.3f "
             "after %ld steps", c.first_loss, log((double)cfg->vocab_size), c.loss, c.step);
    if (profile_out) {
        /* Two more steps through an op_profile wrapper of the backend. */
        progress("train %s: per-op profile of 2 steps...", config);
        op_profile *prof = malloc(sizeof *prof);
        if (!prof) {
            st = rp_error_set(err, RP_ERR_NOMEM, "train profile");
            goto done;
        }
        op_profile_wrap(prof, be);
        rp_model view = *m;
        view.be = &prof->be;
        train_ctx pc = c;
        pc.sync.be = &prof->be;
        pc.model = &view;
        int failed = 0;
        for (int i = 0; i < 2 && !failed; i++) failed = train_call(&pc) || backend_sync_call(&pc);
        if (failed) {
            st = measure_error(&pc.sync, "train profile", err);
        } else {
            char title[128];
            snprintf(title, sizeof title, "Per-op time: train %s, one step of %d × %d tokens "
                     "(forward, backward, AdamW)", config, B, T);
            op_profile_print(profile_out, prof, title, 2, res.seconds * 1e3);
        }
        free(prof);
    }
done:
    free(inputs);
    free(targets);
    be->free(be, state.data);
    be->free(be, dstate.data);
    if (tw.layers || tw.scratch_base) rp_backward_workspace_free(&tw, be);
    rp_model_free(&grads);
    rp_model_free(&adam_m);
    rp_model_free(&adam_v);
    return st;
}

/* One model shape: build it on a fresh backend (so one section's scratch
 * and any sticky error stay with it), run its decode rows and, for the
 * training shape, the training rows. */
static void run_model(const options *o, const decode_plan *plan, int train_T,
                      const ceilings *bound, const gpu_timing *decode_t,
                      const gpu_timing *train_t) {
    rp_error err = {0};
    char section[64];
    snprintf(section, sizeof section, "model %s", plan->config);
    rp_config cfg;
    if (rp_config_builtin(&cfg, plan->config, 0, &err) != RP_OK) {
        section_failed(section, &err);
        return;
    }
    rp_backend *be = rp_cuda_backend_create(o->device, RP_CUDA_MATH_BF16, &err);
    if (!be) {
        section_failed(section, &err);
        return;
    }
    rp_model m;
    progress("%s: official init of one layer, %.2f B parameters to the device...", section,
             rp_config_param_count(&cfg) * 1e-9);
    if (model_build(&m, &cfg, be, &err) != RP_OK) {
        section_failed(section, &err);
    } else {
        if (plan->decode_b1 || plan->batches[0] || plan->batches[1]) {
            snprintf(section, sizeof section, "decode %s", plan->config);
            if (measure_decode(&m, plan->config, plan, bound, decode_t, &err) != RP_OK)
                section_failed(section, &err);
        }
        if (train_T > 0) {
            snprintf(section, sizeof section, "train %s", plan->config);
            if (measure_train(&m, plan->config, train_T, bound, train_t, &err) != RP_OK)
                section_failed(section, &err);
        }
    }
    rp_model_free(&m);
    rp_cuda_backend_destroy(be);
}

/* ---- options ---- */

static int parse_rows(const char *list, unsigned *out) {
    unsigned rows = 0;
    const char *p = list;
    while (*p) {
        size_t len = strcspn(p, ",");
        unsigned bit = 0;
        for (size_t i = 0; i < sizeof row_names / sizeof row_names[0]; i++)
            if (strlen(row_names[i].name) == len && !strncmp(p, row_names[i].name, len))
                bit = row_names[i].bit;
        if (!bit) return -1;
        rows |= bit;
        p += len;
        if (*p == ',') p++;
    }
    *out = rows;
    return rows ? 0 : -1;
}

static void usage(FILE *out) {
    fprintf(out,
            "usage: bench_gpu [--device N] [--quick] [--only ROWS] [--reps N] [--profile]\n"
            "       bench_gpu --model-only\n"
            "\n"
            "The CUDA backend (bf16 math) on one GPU against ceilings measured in the same\n"
            "run (device-to-device copy bandwidth, cuBLAS bf16 GEMM rate): decode latency at\n"
            "batch 1 for 0.1b/0.4b/1.5b shapes against the weight-streaming floor, decode\n"
            "tokens/s at batch 64 and 256, WKV7 forward+backward at B=8 T=4096 C=4096, and\n"
            "training tokens/s and MFU of a 0.4b shape at T=4096. Random weights (the\n"
            "official init of one layer, copied to every layer). One markdown table on\n"
            "stdout, progress on stderr; about 2-3 minutes on an H100.\n"
            "\n"
            "  --device N    CUDA device index (default 0)\n"
            "  --quick       small sizes and few repetitions (smoke test, ~30 s)\n"
            "  --only ROWS   comma-separated subset of: ceilings, decode, batch, wkv7, train\n"
            "                (the ceilings are always measured: every ratio needs them)\n"
            "  --reps N      timed repetitions per measurement, median reported (default 20,\n"
            "                --quick 5)\n"
            "  --profile     after the table, the time of every backend op in a batch-1\n"
            "                decode step of each shape and in a training step\n"
            "                (bench/op_profile.h: each op between two synchronisations)\n"
            "  --model-only  no GPU: print the analytic H100 model instead (bytes, FLOPs,\n"
            "                launches and predicted time per kernel of a decode and a\n"
            "                training step; bench/gpu_model.c)\n"
            "  --help        this text\n"
            "\n"
            "Exit status: 0, 77 when no CUDA device is visible, 2 on a bad option, 1 when a\n"
            "section failed (its message is under the table).\n");
}

int main(int argc, char **argv) {
    options o = {.device = 0, .quick = 0, .reps = 0,
                 .rows = ROW_CEILINGS | ROW_DECODE | ROW_BATCH | ROW_WKV7 | ROW_TRAIN};
    for (int i = 1; i < argc; i++) {
        char *end;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--quick")) {
            o.quick = 1;
        } else if (!strcmp(argv[i], "--profile")) {
            o.profile = 1;
        } else if (!strcmp(argv[i], "--model-only")) {
            return gpu_model_print(stdout);
        } else if (!strcmp(argv[i], "--device") && i + 1 < argc) {
            errno = 0;
            long v = strtol(argv[++i], &end, 10);
            if (*end || errno || v < 0 || v > 1024) {
                fprintf(stderr, "bench_gpu: --device '%s': expected a device index >= 0\n",
                        argv[i]);
                return 2;
            }
            o.device = (int)v;
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            errno = 0;
            long v = strtol(argv[++i], &end, 10);
            if (*end || errno || v < 3 || v > 10000) {
                fprintf(stderr, "bench_gpu: --reps '%s': expected an integer in [3, 10000]\n",
                        argv[i]);
                return 2;
            }
            o.reps = (int)v;
        } else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            if (parse_rows(argv[++i], &o.rows)) {
                fprintf(stderr, "bench_gpu: --only '%s': expected a comma-separated list of "
                        "ceilings, decode, batch, wkv7, train\n", argv[i]);
                return 2;
            }
        } else {
            fprintf(stderr, "bench_gpu: unknown or incomplete option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (!o.reps) o.reps = o.quick ? 5 : 20;

    const int n_devices = rp_cuda_device_count();
    if (n_devices == 0) {
        fprintf(stderr, "bench_gpu: no CUDA device is visible; nothing to measure (skipped)\n");
        return 77;
    }
    char text[256];
    if (o.device >= n_devices) {
        fprintf(stderr, "bench_gpu: --device %d: only %d CUDA device(s) visible\n", o.device,
                n_devices);
        return 2;
    }
    if (rp_cuda_device_select(o.device, text, sizeof text)) {
        fprintf(stderr, "bench_gpu: cannot use CUDA device %d: %s\n", o.device, text);
        return 1;
    }

    /* Short calls are batched to >= min_batch_s between synchronisations;
     * a training step is one call per batch. max_s bounds a slow backend. */
    const gpu_timing ceiling_t = {0.3, 0.05, o.reps, o.quick ? 5.0 : 20.0};
    const gpu_timing decode_t = {o.quick ? 0.1 : 0.3, 0.05, o.reps, o.quick ? 5.0 : 20.0};
    const gpu_timing wkv_t = {0.0, 0.05, o.reps, o.quick ? 5.0 : 30.0};
    const gpu_timing train_t = {0.0, 0.0, o.reps, o.quick ? 10.0 : 60.0};

    bench_print_machine(stdout, "bench_gpu: RWKV-7 on the CUDA backend (bf16 math)");
    rp_cuda_device_describe(o.device, text, sizeof text);
    printf("- GPU %d: %s\n", o.device, text);
    rp_cuda_versions(text, sizeof text);
    printf("- %s; build: %s\n", text, rp_build_description());
    fflush(stdout);

    if (o.profile && !(profile_out = open_memstream(&profile_text, &profile_text_len))) {
        fprintf(stderr, "bench_gpu: --profile: cannot open a memory stream\n");
        return 1;
    }
    ceilings bound = {-1.0, -1.0};
    rp_error err = {0};
    if (measure_ceilings(&bound, &o, &ceiling_t, &err) != RP_OK) section_failed("ceilings", &err);

    if (o.rows & ROW_WKV7) {
        if (measure_wkv7(&o, &bound, &wkv_t, &err) != RP_OK) section_failed("wkv7", &err);
    }

    /* Decode shapes, smallest first; the training shape (0.4b, --quick 0.1b)
     * reuses its decode model. */
    const int do_b1 = (o.rows & ROW_DECODE) != 0, do_batch = (o.rows & ROW_BATCH) != 0;
    const decode_plan full_plans[] = {
        {"0.1b", do_b1, {do_batch ? 64 : 0, do_batch ? 256 : 0}},
        {"0.4b", do_b1, {do_batch ? 64 : 0, do_batch ? 256 : 0}},
        {"1.5b", do_b1, {0, 0}},
    };
    const decode_plan quick_plans[] = {{"0.1b", do_b1, {do_batch ? 64 : 0, 0}}};
    const decode_plan *plans = o.quick ? quick_plans : full_plans;
    const int n_plans = o.quick ? 1 : 3;
    const char *train_config = o.quick ? "0.1b" : "0.4b";
    const int train_T = o.quick ? 1024 : 4096;
    for (int i = 0; i < n_plans; i++) {
        const int train_here = (o.rows & ROW_TRAIN) && !strcmp(plans[i].config, train_config);
        if (!plans[i].decode_b1 && !plans[i].batches[0] && !plans[i].batches[1] && !train_here)
            continue;
        run_model(&o, &plans[i], train_here ? train_T : 0, &bound, &decode_t, &train_t);
    }

    printf("- weights: the official init (src/model/init.h, seed %llu) of layer L/2 copied to "
           "every layer, its zero matrices replaced by uniform noise, head uniform with the "
           "official head's standard deviation; GEMMs read the backend's bf16 copies\n",
           SEED);
    printf("- timing: warm-up, then the median of %d batches (fewer, at least 3, when one call "
           "is slow: the timing column says batches × calls per batch), device synchronised "
           "around host clocks; decode steps are synchronised one by one%s\n\n",
           o.reps, o.quick ? "; --quick: small sizes, noisy" : "");
    const char *columns[4] = {"measured", "bound (same run)", "ratio / timing", "goal"};
    bench_table_header(stdout, "metric", columns, 4);
    for (int i = 0; i < n_table; i++) {
        const table_row *r = &table[i];
        const char *cells[4] = {r->measured, r->bound, r->ratio, r->goal};
        bench_table_row(stdout, r->label, cells, 4);
    }
    if (n_notes) printf("\n");
    for (int i = 0; i < n_notes; i++) printf("- %s\n", notes[i]);
    if (profile_out) {
        fclose(profile_out);
        printf("\n### Per-op time (--profile)\n%s", profile_text ? profile_text : "");
        free(profile_text);
    }
    return n_failures ? 1 : 0;
}
