/* The CPU backend's matmul on low-precision weights (cpu_quant.h): picks a
 * kernel once from the CPU's features (cpu_features.c) and RP_CPU_ISA,
 * prepares x for it, and splits the output rows (N) over the OpenMP team.
 * Decode (M <= RP_QMATMUL_DECODE_ROWS, or decode rows of any count through
 * rp_cpu_qmatmul_decode) streams W once through a SIMD kernel;
 * prefill widens W to f32 (whole, or in fixed tiles when large) for sgemm,
 * except bf16dot's and vnni's, a bf16 GEMM (cpu_qgemm_bf16.c). */
#include "config.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "cpu/cpu_features.h"
#include "cpu/cpu_internal.h"
#include "cpu/cpu_qgemm_bf16.h"
#include "cpu/cpu_qmatmul_kern.h"

/* As cpu_matmul.c: below this many multiply-adds one thread; N slices start
 * at multiples of 16 (whole tiles, 64-byte aligned y blocks). */
#define QMATMUL_PARALLEL_MIN_WORK ((size_t)1 << 18)
#define QMATMUL_SLICE_ALIGN 16

/* Decode products (quantized x rows through the decode kernels) below this
 * many multiply-adds run on one thread. At decode the team is asleep when a
 * region starts (GOMP_SPINCOUNT=1000, cpu_wait.h, is shorter than the
 * position-wise work between two products), and a wake-up took a median
 * 54 us on the loaded 2-CPU VM (docs/perf/cpu.md, "Fork/join at decode";
 * quiet: to be measured): more than half of a 768 x 768 int8 or bf16
 * product at one row (17-25 us on one core). The 0.1B shape's
 * output matrix at batch 1 (590k) stays on one thread, its r/k/v group
 * (2M) and FFN matrices (2.4M) are split. The bits do not depend on it. */
#define QMATMUL_DECODE_PARALLEL_MIN_WORK ((size_t)1 << 20)

/* Prefill of a W too big to widen whole: W rows widened per sgemm call, about this many bytes of f32 (the
 * tile stays in L2 while sgemm reads it), and never fewer than 32 rows.
 * Tiles start at multiples of their height from row 0 whatever the team
 * size, so each sgemm call and its bits are the same on any thread count. */
#define QMATMUL_TILE_BYTES ((size_t)8 << 20)
#define QMATMUL_TILE_MIN_ROWS 32

static const char *const kernel_names[RP_QKERNEL_COUNT] = {"generic", "avx2", "avx512",
                                                           "bf16dot", "vnni"};

const char *rp_qkernel_name(rp_qkernel k) {
    return k >= 0 && k < RP_QKERNEL_COUNT ? kernel_names[k] : "?";
}

static rp_cpu_isa kernel_isa(rp_qkernel k) {
    switch (k) {
    case RP_QKERNEL_GENERIC: return RP_CPU_ISA_GENERIC;
    case RP_QKERNEL_AVX2: return RP_CPU_ISA_AVX2;
    case RP_QKERNEL_AVX512: return RP_CPU_ISA_AVX512;
    case RP_QKERNEL_BF16DOT: return RP_CPU_ISA_AVX512BF16;
    default: return RP_CPU_ISA_AVX512VNNI;
    }
}

int rp_qkernel_available(rp_qkernel k, rp_qtype type) {
    if (k < 0 || k >= RP_QKERNEL_COUNT) return 0;
    if (k == RP_QKERNEL_GENERIC) return 1;
#if RP_CPU_QKERN_X86
    if (type == RP_QTYPE_F32) return 0;
    if (k == RP_QKERNEL_BF16DOT && type != RP_QTYPE_BF16) return 0;
    if (k == RP_QKERNEL_VNNI && type != RP_QTYPE_Q8 && type != RP_QTYPE_Q8ROW) return 0;
    return rp_cpu_isa_supported(kernel_isa(k));
#else
    (void)type;
    return 0;
#endif
}

/* Preference per format, best first, measured with bench_cpu --quant on the
 * Zen 5 machine (docs/perf/cpu.md, "Quantized GEMV/GEMM"): at M = 1 every
 * AVX-512 kernel reads W at the same rate (memory-bound); at M = 8 the dot
 * product kernels are 1.5-2.5x faster than widening (which spends two
 * instructions per 16 weights per W row before the FMAs). One kernel per
 * format for every M <= RP_QMATMUL_DECODE_ROWS: a row's bits must not depend
 * on how many rows share the call. The dot kernels round x (bf16, or int8
 * blocks): RP_CPU_ISA=avx512 keeps x in f32 (the widening kernels). */
static const rp_qkernel bf16_order[] = {RP_QKERNEL_BF16DOT, RP_QKERNEL_AVX512, RP_QKERNEL_AVX2,
                                        RP_QKERNEL_GENERIC};
static const rp_qkernel q8_order[] = {RP_QKERNEL_VNNI, RP_QKERNEL_AVX512, RP_QKERNEL_AVX2,
                                      RP_QKERNEL_GENERIC};

static int env_state; /* 0: not read; 1: read, good; 2: read, bad (generic) */
static rp_cpu_isa env_isa;

rp_status rp_cpu_qmatmul_check_env(rp_error *err) {
    rp_cpu_isa isa;
    rp_status st = rp_cpu_isa_from_env(&isa, err);
    env_isa = st == RP_OK ? isa : RP_CPU_ISA_GENERIC;
    __atomic_store_n(&env_state, st == RP_OK ? 1 : 2, __ATOMIC_RELEASE);
    return st;
}

static rp_cpu_isa allowed_isa(void) {
    if (!__atomic_load_n(&env_state, __ATOMIC_ACQUIRE)) {
        rp_error err = {0};
        (void)rp_cpu_qmatmul_check_env(&err);
    }
    return env_isa;
}

rp_qkernel rp_qkernel_chosen(rp_qtype type) {
    const rp_qkernel *order = type == RP_QTYPE_Q8 || type == RP_QTYPE_Q8ROW ? q8_order : bf16_order;
    const rp_cpu_isa cap = allowed_isa();
    for (int i = 0; i < 4; i++)
        if (kernel_isa(order[i]) <= cap && rp_qkernel_available(order[i], type)) return order[i];
    return RP_QKERNEL_GENERIC;
}

/* k if it can run w: available for w's type, and for VNNI on Q8ROW the
 * packed form present (its only layout); else generic. */
static rp_qkernel usable_kernel(rp_qkernel k, const rp_qmatrix *w) {
    if (!rp_qkernel_available(k, w->type)) return RP_QKERNEL_GENERIC;
    if (k == RP_QKERNEL_VNNI && w->type == RP_QTYPE_Q8ROW && !w->packed) return RP_QKERNEL_GENERIC;
    return k;
}

static cpu_qdecode_fn decode_fn(rp_qkernel k, rp_qtype type) {
    switch (k) {
#if RP_CPU_QKERN_X86
    case RP_QKERNEL_AVX2: return cpu_qdecode_avx2;
    case RP_QKERNEL_AVX512: return cpu_qdecode_avx512;
    case RP_QKERNEL_BF16DOT: return cpu_qdecode_bf16dot;
    case RP_QKERNEL_VNNI: return type == RP_QTYPE_Q8ROW ? cpu_qdecode_vnnirow : cpu_qdecode_vnni;
#endif
    default: (void)type; return cpu_qdecode_generic;
    }
}

/* The widener for prefill tiles: the kernel's ISA (the dot-product kernels
 * widen with the AVX-512 one; their ISA implies it). */
static cpu_qwiden_fn widen_fn(rp_qkernel k) {
    switch (k) {
#if RP_CPU_QKERN_X86
    case RP_QKERNEL_AVX2: return cpu_qwiden_avx2;
    case RP_QKERNEL_AVX512:
    case RP_QKERNEL_BF16DOT:
    case RP_QKERNEL_VNNI: return cpu_qwiden_avx512;
#endif
    default: return cpu_qwiden_generic;
    }
}

void rp_q8_quantize_x_group(int8_t *xq, float *scales, const float *x, int K, int G) {
    for (int b = 0; b * G < K; b++) {
        const float *xb = x + (size_t)b * G;
        const int n = K - b * G < G ? K - b * G : G;
        float amax = 0.0f;
        for (int i = 0; i < n; i++) {
            const float a = xb[i] < 0.0f ? -xb[i] : xb[i];
            if (a > amax) amax = a;
        }
        const float scale = amax / 127.0f;
        scales[b] = scale;
        for (int i = 0; i < n; i++) {
            float q = scale > 0.0f ? nearbyintf(xb[i] / scale) : 0.0f;
            q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
            xq[(size_t)b * G + i] = (int8_t)q;
        }
    }
}

void rp_q8_quantize_x(int8_t *xq, float *scales, const float *x, int K) {
    rp_q8_quantize_x_group(xq, scales, x, K, RP_Q8_BLOCK);
}

/* The bytes of x's prepared form for kernel k (cpu_qx), rounded up to a
 * cache line so that several fit one after another in a workspace. */
static size_t prep_bytes(rp_qkernel k, rp_qtype type, int M, int K) {
    size_t b = 0;
    if (k == RP_QKERNEL_BF16DOT) b = (size_t)M * K * sizeof(uint16_t);
#if RP_CPU_QKERN_X86
    else if (k == RP_QKERNEL_VNNI && type == RP_QTYPE_Q8ROW)
        b = (size_t)M * K + (size_t)M * cpu_qrow_groups(K) * (sizeof(float) + sizeof(int32_t));
    else if (k == RP_QKERNEL_VNNI)
        b = (size_t)M * K / 2 + (size_t)M * K + (size_t)M * (K / RP_Q8_BLOCK) * sizeof(float);
#else
    (void)type;
#endif
    return (b + 63) / 64 * 64;
}

/* Points px at x and, for the dot kernels, at its prepared form in mem
 * (prep_bytes(k, type, M, K) bytes), still to be filled (prep_fill). */
static void prep_layout(rp_qkernel k, rp_qtype type, cpu_qx *px, char *mem, const float *x, int M,
                        int K) {
    *px = (cpu_qx){.x = x};
    if (k == RP_QKERNEL_BF16DOT) {
        px->xb = (const uint16_t *)mem;
#if RP_CPU_QKERN_X86
    } else if (k == RP_QKERNEL_VNNI && type == RP_QTYPE_Q8ROW) {
        /* xu: [M, K] bytes, xg: [M, groups] floats, xc: [M, groups] int32 */
        px->xu = (const uint8_t *)mem;
        px->xg = (const float *)(mem + (size_t)M * K);
        px->xc = (const int32_t *)(mem + (size_t)M * K + (size_t)M * cpu_qrow_groups(K) * sizeof(float));
    } else if (k == RP_QKERNEL_VNNI) {
        /* xse: [M, K/8] floats (M * K / 2 bytes), xu: [M, K] bytes, xs:
         * [M, K/32] floats */
        px->xse = (const float *)mem;
        px->xu = (const uint8_t *)(mem + (size_t)M * K / 2);
        px->xs = (const float *)(mem + (size_t)M * K / 2 + (size_t)M * K);
#endif
    } else {
        (void)mem, (void)M, (void)K, (void)type;
    }
}

/* Fills columns [k0, k1) of every row of px's prepared x from px->x: k0 a
 * multiple of QX_FILL_ALIGN, k1 too or K. vnni's layout is local to groups
 * of 4 blocks (128 k: cpu_qvnni_pos), so a part from a group boundary has
 * the bytes the whole row has there; rows quantized as rp_q8_quantize_x
 * (cpu_qprep_vnni: its vector twin, on the kernel's own ISA). */
#define QX_FILL_ALIGN (4 * RP_Q8_BLOCK)
static void prep_fill(rp_qkernel k, const cpu_qx *px, int M, int K, int k0, int k1) {
    _Static_assert(QX_FILL_ALIGN % RP_Q8ROW_XGROUP == 0, "a fill part is whole x groups");
    if (k1 <= k0) return;
    for (int m = 0; m < M; m++) {
        const float *x = px->x + (size_t)m * K;
        if (k == RP_QKERNEL_BF16DOT) {
            uint16_t *xb = (uint16_t *)px->xb + (size_t)m * K;
#if RP_CPU_QKERN_X86
            cpu_qprep_bf16dot(xb + k0, x + k0, (size_t)(k1 - k0)); /* the kernel's ISA has AVX-512F/BW */
#else
            for (int i = k0; i < k1; i++) xb[i] = rp_f32_to_bf16(x[i]);
#endif
#if RP_CPU_QKERN_X86
        } else if (k == RP_QKERNEL_VNNI && px->xg) {
            const size_t g0 = (size_t)m * cpu_qrow_groups(K) + k0 / RP_Q8ROW_XGROUP;
            cpu_qprep_vnnirow((int8_t *)px->xu + (size_t)m * K + k0, (int32_t *)px->xc + g0,
                              (float *)px->xg + g0, x + k0, k1 - k0);
        } else if (k == RP_QKERNEL_VNNI) {
            cpu_qprep_vnni((uint8_t *)px->xu + (size_t)m * K + k0,
                           (float *)px->xse + (size_t)m * (K / 8) + k0 / 8,
                           (float *)px->xs + (size_t)m * (K / RP_Q8_BLOCK) + k0 / RP_Q8_BLOCK,
                           x + k0, k1 - k0);
#endif
        }
    }
}

void rp_cpu_qx_workspace_free(rp_cpu_qx_workspace *ws) {
    if (!ws) return;
    free(ws->mem);
    *ws = (rp_cpu_qx_workspace){0};
}

/* bytes (a multiple of 64) of the caller's workspace (cpu_quant.h), or
 * NULL if it cannot grow to that; its old contents are not kept. */
static char *qx_workspace(rp_cpu_qx_workspace *ws, size_t bytes) {
    if (bytes <= ws->cap) return ws->mem;
    char *mem = aligned_alloc(64, bytes);
    if (!mem) return NULL;
    free(ws->mem);
    ws->mem = mem;
    ws->cap = bytes;
    return mem;
}

/* x in the form kernel k reads (cpu_qx), in workspace ws: 0 on success, -1
 * if it cannot be allocated. */
static int prepare_x(rp_cpu_qx_workspace *ws, rp_qkernel k, rp_qtype type, cpu_qx *px,
                     const float *x, int M, int K) {
    const size_t bytes = prep_bytes(k, type, M, K);
    char *mem = bytes ? qx_workspace(ws, bytes) : NULL;
    if (bytes && !mem) return -1;
    prep_layout(k, type, px, mem, x, M, K);
    prep_fill(k, px, M, K, 0, K);
    return 0;
}

static void slice(int total, int part, int parts, int align, int *begin, int *end) {
    int chunk = (total + parts - 1) / parts;
    chunk = (chunk + align - 1) / align * align;
    long b = (long)chunk * part, e = b + chunk;
    *begin = b < total ? (int)b : total;
    *end = e < total ? (int)e : total;
}

static int tile_rows(int K) {
    size_t rows = QMATMUL_TILE_BYTES / ((size_t)K * sizeof(float));
    rows = rows / QMATMUL_SLICE_ALIGN * QMATMUL_SLICE_ALIGN;
    return rows < QMATMUL_TILE_MIN_ROWS ? QMATMUL_TILE_MIN_ROWS : rows > 4096 ? 4096 : (int)rows;
}

/* Prefill rows [n0, n1) (whole tiles from a multiple of `tr`): each tile of
 * W rows widened into `tile`, then one sgemm. */
static void prefill_block(cpu_qwiden_fn widen, const rp_qmatrix *w, float *y, const float *x,
                          int M, int n0, int n1, float beta, int tr, float *tile) {
    const int N = w->N, K = w->K;
    for (int n = n0; n < n1; n += tr) {
        const int rows = n1 - n < tr ? n1 - n : tr;
        widen(w, n, n + rows, tile);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, rows, K, 1.0f, x, K, tile, K,
                    beta, y + n, N);
    }
}

/* Prefill of a W up to QMATMUL_WIDE_MAX_BYTES as f32 (every layer matrix
 * of the models we run; not the 0.1B head): the team widens all of W once
 * into one buffer, then splits the rows of x as cpu_matmul.c splits a tall
 * product, one sgemm over all of N per thread. Tiles of W (prefill_block)
 * would repack x for every tile, and fixed tiles split N unevenly; fp32's
 * own prefill (one sgemm per thread) is the speed to match. Row slices
 * start at multiples of 24 and hold >= 64 rows and 2^21 multiply-adds, or
 * one thread runs the sgemm: the conditions under which OpenBLAS gives a
 * row the same bits wherever it falls (cpu_matmul.c). 0 when W is too big
 * or the buffer cannot be allocated (the caller tiles instead). */
#define QMATMUL_WIDE_MAX_BYTES ((size_t)64 << 20)
#define QMATMUL_ROW_SLICE_ALIGN 24
#define QMATMUL_MIN_ROW_SLICE_ROWS 64
#define QMATMUL_MIN_ROW_SLICE_WORK ((size_t)1 << 21)

static int prefill_whole(rp_qkernel k, const rp_qmatrix *w, float *y, const float *x, int M,
                         float beta, int nt) {
    const int N = w->N, K = w->K;
    const size_t bytes = (size_t)N * K * sizeof(float);
    if (bytes > QMATMUL_WIDE_MAX_BYTES) return 0;
    float *wf = malloc(bytes);
    if (!wf) return 0;
    int row_parts = nt;
    for (int part = 0; part < nt; part++) {
        int b, e;
        slice(M, part, nt, QMATMUL_ROW_SLICE_ALIGN, &b, &e);
        if (e > b && (e - b < QMATMUL_MIN_ROW_SLICE_ROWS ||
                      (size_t)(e - b) * N * K < QMATMUL_MIN_ROW_SLICE_WORK))
            row_parts = 1;
    }
    const cpu_qwiden_fn widen = widen_fn(k);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int parts = omp_get_num_threads(), part = omp_get_thread_num();
        int b, e;
        slice(N, part, parts, QMATMUL_SLICE_ALIGN, &b, &e);
        if (e > b) widen(w, b, e, wf + (size_t)b * K);
#pragma omp barrier
        if (part < row_parts) {
            slice(M, part, row_parts < parts ? row_parts : parts, QMATMUL_ROW_SLICE_ALIGN, &b, &e);
            if (e > b)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, e - b, N, K, 1.0f,
                            x + (size_t)b * K, K, wf, K, beta, y + (size_t)b * N, N);
        }
    }
    free(wf);
    return 1;
}

/* Decode rows above 8: W rows taken in tiles of about this many bytes of
 * f32-equivalent (a multiple of 16 rows, >= 16), every 8-row block of x run
 * over a tile while it is in cache: W is read from memory once, and each y
 * element keeps the kernel's one summation order (cpu_matmul.c does the same). */
#define QMATMUL_DECODE_TILE_BYTES ((size_t)64 << 10)

/* Output rows [b, e) of a decode product with x prepared (px): M <= 8 in
 * one pass over W; more rows (decode rows, or prefill that could not
 * allocate its tile) in tiles of W, 8 x rows at a time over each. */
static void decode_slice(cpu_qdecode_fn decode, const rp_qmatrix *w, float *y, const cpu_qx *px,
                         int M, float beta, int b, int e) {
    const int N = w->N, K = w->K;
    int tile = (int)(QMATMUL_DECODE_TILE_BYTES / ((size_t)K * sizeof(float))) / 16 * 16;
    if (tile < 16) tile = 16;
    if (M <= RP_QMATMUL_DECODE_ROWS) tile = N; /* one pass over W */
    for (int t0 = b; t0 < e; t0 += tile) {
        const int t1 = e - t0 < tile ? e : t0 + tile;
        for (int m = 0; m < M; m += RP_QMATMUL_DECODE_ROWS) {
            const int rows = M - m < RP_QMATMUL_DECODE_ROWS ? M - m : RP_QMATMUL_DECODE_ROWS;
            cpu_qx pm = *px;
            pm.x = px->x + (size_t)m * K;
            if (pm.xb) pm.xb += (size_t)m * K;
            if (pm.xu) pm.xu += (size_t)m * K;
            if (pm.xse) pm.xse += (size_t)m * (K / 8);
            if (pm.xs) pm.xs += (size_t)m * (K / RP_Q8_BLOCK);
            if (pm.xg) pm.xg += (size_t)m * cpu_qrow_groups(K);
            if (pm.xc) pm.xc += (size_t)m * cpu_qrow_groups(K);
            decode(w, y + (size_t)m * N, &pm, rows, t0, t1, beta);
        }
    }
}

static void qmatmul(rp_cpu_qx_workspace *ws, rp_qkernel k, const rp_qmatrix *w, float *y,
                    const float *x, int M, float beta, int n_threads, int decode_rows) {
    const int N = w->N, K = w->K;
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (size_t i = 0; i < (size_t)M * N; i++) y[i] = beta == 0.0f ? 0.0f : beta * y[i];
        return;
    }
    k = usable_kernel(k, w);
    const size_t work = (size_t)M * N * K;
    const int prefill = M > RP_QMATMUL_DECODE_ROWS && !decode_rows;
    const size_t min_work = prefill ? QMATMUL_PARALLEL_MIN_WORK : QMATMUL_DECODE_PARALLEL_MIN_WORK;
    int nt = work < min_work || n_threads < 1 ? 1 : n_threads;
    if (prefill) {
#if RP_CPU_QKERN_X86
        /* bf16dot's and vnni's prefill: x rounded to bf16, W read at the
         * vdpbf16ps rate (cpu_qgemm_bf16.c; vnni's needs AVX512_BF16 too,
         * which a CPU with VNNI need not have); sgemm below otherwise. */
        if ((k == RP_QKERNEL_BF16DOT ||
             (k == RP_QKERNEL_VNNI && rp_cpu_isa_supported(RP_CPU_ISA_AVX512BF16))) &&
            cpu_qgemm_bf16(w, y, x, M, beta, nt) == 0)
            return;
#endif
        if (prefill_whole(k, w, y, x, M, beta, nt)) return;
        const int tr = tile_rows(K);
        const int tiles = (N + tr - 1) / tr;
        if (nt > tiles) nt = tiles;
        const cpu_qwiden_fn widen = widen_fn(k);
        int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
        {
            int b, e;
            slice(N, omp_get_thread_num(), omp_get_num_threads(), tr, &b, &e);
            if (e > b) {
                float *tile = malloc((size_t)tr * K * sizeof *tile);
                if (tile) prefill_block(widen, w, y, x, M, b, e, beta, tr, tile);
                else failed = 1;
                free(tile);
            }
        }
        if (!failed) return;
        k = RP_QKERNEL_GENERIC; /* no memory for a tile: the decode kernel, slow but right */
    }
    cpu_qx px;
    if (prepare_x(ws, k, w->type, &px, x, M, K)) {
        k = RP_QKERNEL_GENERIC; /* widening kernels read x as it is */
        px = (cpu_qx){.x = x};
    }
    const cpu_qdecode_fn decode = decode_fn(k, w->type);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int b, e;
        slice(N, omp_get_thread_num(), omp_get_num_threads(), QMATMUL_SLICE_ALIGN, &b, &e);
        decode_slice(decode, w, y, &px, M, beta, b, e);
    }
}

/* qmatmul on the caller's workspace, or on one of this call's (ws NULL). */
static void qmatmul_ws(rp_cpu_qx_workspace *ws, rp_qkernel k, const rp_qmatrix *w, float *y,
                       const float *x, int M, float beta, int n_threads, int decode_rows) {
    rp_cpu_qx_workspace own = {0};
    qmatmul(ws ? ws : &own, k, w, y, x, M, beta, n_threads, decode_rows);
    rp_cpu_qx_workspace_free(&own);
}

void rp_cpu_qmatmul_kernel(rp_cpu_qx_workspace *ws, rp_qkernel k, const rp_qmatrix *w, float *y,
                           const float *x, int M, float beta, int n_threads) {
    qmatmul_ws(ws, k, w, y, x, M, beta, n_threads, 0);
}

void rp_cpu_qmatmul_kernel_decode(rp_cpu_qx_workspace *ws, rp_qkernel k, const rp_qmatrix *w,
                                  float *y, const float *x, int M, float beta, int n_threads) {
    qmatmul_ws(ws, k, w, y, x, M, beta, n_threads, 1);
}

void rp_cpu_qmatmul(rp_cpu_qx_workspace *ws, const rp_qmatrix *w, float *y, const float *x,
                    int M, float beta, int n_threads) {
    rp_cpu_qmatmul_kernel(ws, rp_qkernel_chosen(w->type), w, y, x, M, beta, n_threads);
}

void rp_cpu_qmatmul_decode(rp_cpu_qx_workspace *ws, const rp_qmatrix *w, float *y,
                           const float *x, int M, float beta, int n_threads) {
    rp_cpu_qmatmul_kernel_decode(ws, rp_qkernel_chosen(w->type), w, y, x, M, beta, n_threads);
}

/* The kernel a job's matrix runs with (rp_qkernel_chosen, or generic). */
static rp_qkernel job_kernel(const rp_qmatrix *w) {
    return usable_kernel(rp_qkernel_chosen(w->type), w);
}

/* One OpenMP region for a group of independent decode products (a quantized
 * model's gemv_group: r, k, v and the LoRA factors of a layer), instead of
 * one fork/join per product: at decode every region costs a wake-up of the
 * team (docs/perf/cpu.md), more than the smaller products take. Each job's
 * x is prepared once as rp_cpu_qmatmul_decode prepares it, and each thread
 * runs its 16-row slice of every job with the same kernel, so every y
 * element has the bits rp_cpu_qmatmul_decode gives it, on any team size. */
void rp_cpu_qmatmul_decode_group(rp_cpu_qx_workspace *ws, const rp_qgroup_job *jobs, int n_jobs,
                                 int M, int n_threads) {
    if (n_jobs <= 0 || M <= 0) return;
    rp_cpu_qx_workspace own = {0};
    if (!ws) ws = &own;
    cpu_qx px[RP_QGROUP_MAX];
    rp_qkernel kern[RP_QGROUP_MAX];
    cpu_qdecode_fn fn[RP_QGROUP_MAX];
    size_t off[RP_QGROUP_MAX + 1] = {0};
    int simple = n_jobs <= RP_QGROUP_MAX;
    for (int j = 0; j < n_jobs && simple; j++) {
        simple = jobs[j].w->N > 0 && jobs[j].w->K > 0;
        if (!simple) break;
        kern[j] = job_kernel(jobs[j].w);
        off[j + 1] = off[j] + prep_bytes(kern[j], jobs[j].w->type, M, jobs[j].w->K);
    }
    char *mem = simple && off[n_jobs] ? qx_workspace(ws, off[n_jobs]) : NULL;
    if (!simple || (off[n_jobs] && !mem)) {
        /* Empty shapes, too many jobs, or no memory for the x's: one call
         * each (the same bits; rp_cpu_qmatmul_decode handles each case). */
        for (int j = 0; j < n_jobs; j++)
            rp_cpu_qmatmul_decode(ws, jobs[j].w, jobs[j].y, jobs[j].x, M, jobs[j].beta, n_threads);
        rp_cpu_qx_workspace_free(&own);
        return;
    }
    size_t work = 0;
    for (int j = 0; j < n_jobs; j++) {
        const rp_qmatrix *w = jobs[j].w;
        prep_layout(kern[j], w->type, &px[j], mem + off[j], jobs[j].x, M, w->K);
        prep_fill(kern[j], &px[j], M, w->K, 0, w->K);
        fn[j] = decode_fn(kern[j], jobs[j].w->type);
        work += (size_t)M * w->N * w->K;
    }
    const int nt = work < QMATMUL_DECODE_PARALLEL_MIN_WORK || n_threads < 1 ? 1 : n_threads;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int part = omp_get_thread_num(), parts = omp_get_num_threads();
        for (int j = 0; j < n_jobs; j++) {
            int b, e;
            slice(jobs[j].w->N, part, parts, QMATMUL_SLICE_ALIGN, &b, &e);
            decode_slice(fn[j], jobs[j].w, jobs[j].y, &px[j], M, jobs[j].beta, b, e);
        }
    }
    rp_cpu_qx_workspace_free(&own);
}

/* relu(t)^2 of rows [M] x columns [c0, c1) of y [M, N], with
 * cpu_bias_act's expression (a NULL bias adds 0.0f) and so its bits. */
static void relu_squared_cols(float *y, int M, int N, int c0, int c1) {
    for (int m = 0; m < M; m++) {
        float *restrict yr = y + (size_t)m * N;
#pragma omp simd
        for (int c = c0; c < c1; c++) {
            const float t = yr[c] + 0.0f;
            yr[c] = cpu_relu_squaredf(t);
        }
    }
}

/* The FFN of a decode step in one OpenMP region: hidden = first (with
 * relu^2 when relu_squared), then second reading it, with a barrier
 * between them instead of a second fork/join (each region start wakes a
 * sleeping team: ~55 us on the 2-CPU VM, docs/perf/cpu.md). Each thread
 * computes its slice of the first product (128-row slices, whole vnni
 * groups of the second's K), applies relu^2 to it and prepares the
 * second's x over those same columns, so after the barrier x is whole.
 * Every element has the bits of rp_cpu_qmatmul_decode(first), bias_act
 * relu^2, rp_cpu_qmatmul_decode(second), on any team size. */
int rp_cpu_qmatmul_decode_chain(rp_cpu_qx_workspace *ws, const rp_qgroup_job *first,
                                int relu_squared, const rp_qgroup_job *second, int M,
                                int n_threads) {
    const rp_qmatrix *w0 = first->w, *w1 = second->w;
    if (M <= 0 || w0->N <= 0 || w0->K <= 0 || w1->N <= 0 || w1->K != w0->N ||
        second->x != first->y)
        return 0;
    const rp_qkernel k0 = job_kernel(w0), k1 = job_kernel(w1);
    const size_t off1 = prep_bytes(k0, w0->type, M, w0->K),
                 bytes = off1 + prep_bytes(k1, w1->type, M, w1->K);
    rp_cpu_qx_workspace own = {0};
    char *mem = bytes ? qx_workspace(ws ? ws : &own, bytes) : NULL;
    if (bytes && !mem) return 0;
    cpu_qx px0, px1;
    prep_layout(k0, w0->type, &px0, mem, first->x, M, w0->K);
    prep_fill(k0, &px0, M, w0->K, 0, w0->K);
    prep_layout(k1, w1->type, &px1, mem + off1, second->x, M, w1->K);
    const cpu_qdecode_fn fn0 = decode_fn(k0, w0->type), fn1 = decode_fn(k1, w1->type);
    const size_t work = (size_t)M * w0->N * w0->K + (size_t)M * w1->N * w1->K;
    const int nt = work < QMATMUL_DECODE_PARALLEL_MIN_WORK || n_threads < 1 ? 1 : n_threads;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int part = omp_get_thread_num(), parts = omp_get_num_threads();
        int b, e;
        slice(w0->N, part, parts, QX_FILL_ALIGN, &b, &e);
        decode_slice(fn0, w0, first->y, &px0, M, first->beta, b, e);
        if (relu_squared) relu_squared_cols(first->y, M, w0->N, b, e);
        prep_fill(k1, &px1, M, w1->K, b, e);
#pragma omp barrier
        slice(w1->N, part, parts, QMATMUL_SLICE_ALIGN, &b, &e);
        decode_slice(fn1, w1, second->y, &px1, M, second->beta, b, e);
    }
    rp_cpu_qx_workspace_free(&own);
    return 1;
}
