/* The CPU backend's low-precision weight matrices (backend.h, qweight_*):
 * storage in the formats of cpu_quant.h, kept in a table sorted by the key
 * the model passes as the matrix pointer, so matmul_linear finds a matrix by
 * binary search and runs rp_cpu_qmatmul on it. Ops that cannot read these
 * formats refuse a key with a sticky error instead of reading garbage. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_internal.h"
#include "cpu/cpu_quant.h"

_Static_assert((int)RP_WEIGHTS_F32 == (int)RP_QTYPE_F32 &&
                   (int)RP_WEIGHTS_BF16 == (int)RP_QTYPE_BF16 &&
                   (int)RP_WEIGHTS_INT8 == (int)RP_QTYPE_Q8 &&
                   (int)RP_WEIGHTS_INT8ROW == (int)RP_QTYPE_Q8ROW,
               "backend.h's rp_weights_type must keep cpu_quant.h's rp_qtype values");

#define QW_ALIGN 64
#define QW_ZERO_MAX_BYTES ((size_t)1 << 20)

struct cpu_qweight {
    const float *key;
    rp_qmatrix m;
    void *data;
    uint16_t *scales;
};

static void *qw_alloc(size_t bytes) {
    size_t rounded = (bytes + QW_ALIGN - 1) / QW_ALIGN * QW_ALIGN;
    if (rounded < bytes) return NULL;
    if (rounded == 0) rounded = QW_ALIGN;
    /* Not memset: pages stay untouched (out of the RSS) until the loader
     * writes them, row by row. qweight_write fills every row. */
    return aligned_alloc(QW_ALIGN, rounded);
}

/* Index of key, or -(insertion point) - 1. */
static int qw_search(const rp_cpu_impl *impl, const float *key) {
    int lo = 0, hi = impl->n_qweights - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        const float *k = impl->qweights[mid].key;
        if (k == key) return mid;
        if ((uintptr_t)k < (uintptr_t)key) lo = mid + 1;
        else hi = mid - 1;
    }
    return -lo - 1;
}

const void *cpu_qweight_find(const rp_backend *be, const float *w) {
    const rp_cpu_impl *impl = be->impl;
    if (impl->n_qweights == 0) return NULL;
    int i = qw_search(impl, w);
    return i >= 0 ? &impl->qweights[i].m : NULL;
}

int cpu_qweight_matmul(rp_backend *be, float *y, const float *x, const float *w, int M, int N,
                       int K, float beta) {
    const rp_qmatrix *q = cpu_qweight_find(be, w);
    if (!q) return 0;
    if (q->N != N || q->K != K) {
        rp_cpu_impl *impl = be->impl;
        if (impl->error.code == RP_OK)
            rp_error_set(&impl->error, RP_ERR_INTERNAL,
                         "CPU backend: matmul_linear on a %s matrix [%d,%d] called as [%d,%d] "
                         "(the op did nothing)",
                         rp_qtype_name(q->type), q->N, q->K, N, K);
        return 1;
    }
    size_t work = (size_t)M * N * K;
    const int nt = work < RP_CPU_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
    rp_cpu_impl *impl = be->impl;
    if (impl->decode_rows)
        rp_cpu_qmatmul_decode(&impl->qx_ws, q, y, x, M, beta, nt);
    else
        rp_cpu_qmatmul(&impl->qx_ws, q, y, x, M, beta, nt);
    return 1;
}

int cpu_qweight_refuse(rp_backend *be, const float *w, const char *op) {
    const rp_qmatrix *q = cpu_qweight_find(be, w);
    if (!q) return 0;
    rp_cpu_impl *impl = be->impl;
    if (impl->error.code == RP_OK)
        rp_error_set(&impl->error, RP_ERR_ARG,
                     "CPU backend: %s was given %s weights: quantized weights are for "
                     "inference (train from an f32/bf16 file)",
                     op, rp_qtype_name(q->type));
    return 1;
}

static rp_status qw_create(rp_backend *be, const float *key, rp_weights_type type, int N, int K,
                           rp_error *err) {
    rp_cpu_impl *impl = be->impl;
    rp_qtype qt = (rp_qtype)type;
    if ((qt != RP_QTYPE_BF16 && qt != RP_QTYPE_Q8 && qt != RP_QTYPE_Q8ROW) || N < 1 || K < 1 || !rp_qtype_fits(qt, K))
        return rp_error_set(err, RP_ERR_ARG,
                            "CPU backend: cannot store a [%d,%d] matrix as %s (int8 needs K a "
                            "multiple of %d); use --weights-dtype f32 or bf16",
                            N, K, rp_qtype_name(qt), RP_Q8_BLOCK);
    int at = qw_search(impl, key);
    if (at >= 0)
        return rp_error_set(err, RP_ERR_ARG, "CPU backend: weights key %p registered twice",
                            (const void *)key);
    at = -at - 1;
    if (impl->n_qweights == impl->cap_qweights) {
        int cap = impl->cap_qweights ? 2 * impl->cap_qweights : 64;
        struct cpu_qweight *p = realloc(impl->qweights, (size_t)cap * sizeof *p);
        if (!p) return rp_error_set(err, RP_ERR_NOMEM, "CPU backend: no memory for the weights table");
        impl->qweights = p;
        impl->cap_qweights = cap;
    }
    struct cpu_qweight q = {.key = key};
    /* Q8ROW keeps only the kernels' packed form (rows padded to 16), written
     * row by row by qw_write as the loader streams the file's rows: the
     * same peak memory as the row-major form. */
    const size_t db = qt == RP_QTYPE_Q8ROW ? rp_q8row_packed_bytes(N, K)
                                           : rp_qmatrix_data_bytes(qt, N, K);
    q.data = qw_alloc(db);
    size_t sb = rp_qmatrix_scale_bytes(qt, N, K);
    q.scales = sb ? qw_alloc(sb) : NULL;
    if (!q.data || (sb && !q.scales)) {
        free(q.data);
        free(q.scales);
        return rp_error_set(err, RP_ERR_NOMEM,
                            "CPU backend: cannot allocate %zu bytes for a [%d,%d] %s matrix",
                            db + sb, N, K, rp_qtype_name(qt));
    }
    /* Small ones (LoRA factors) zeroed: layer 0's unused v-LoRA is never
     * written by the loader (packed Q8ROW's zero weight is the byte 128;
     * its scales zeroed too, so such a row gives 0). */
    if (db <= QW_ZERO_MAX_BYTES) {
        memset(q.data, qt == RP_QTYPE_Q8ROW ? 0x80 : 0, db);
        if (qt == RP_QTYPE_Q8ROW) memset(q.scales, 0, sb);
    }
    if (qt == RP_QTYPE_Q8ROW) rp_q8row_pack_pad(q.data, N, K);
    q.m = rp_qmatrix_make(qt, N, K, qt == RP_QTYPE_Q8ROW ? NULL : q.data, q.scales);
    if (qt == RP_QTYPE_Q8ROW) q.m.packed = q.data;
    memmove(&impl->qweights[at + 1], &impl->qweights[at],
            (size_t)(impl->n_qweights - at) * sizeof *impl->qweights);
    impl->qweights[at] = q;
    impl->n_qweights++;
    return RP_OK;
}

static void qw_write(rp_backend *be, const float *key, int row0, int n_rows, const void *src,
                     int src_is_f32, const uint16_t *scales) {
    rp_cpu_impl *impl = be->impl;
    int i = impl->n_qweights ? qw_search(impl, key) : -1;
    if (i < 0 || row0 < 0 || n_rows < 0 || row0 + n_rows > impl->qweights[i].m.N) {
        if (impl->error.code == RP_OK)
            rp_error_set(&impl->error, RP_ERR_INTERNAL,
                         "CPU backend: qweight_write of rows [%d, %d) on an unknown key or "
                         "past the matrix (nothing written)", row0, row0 + n_rows);
        return;
    }
    struct cpu_qweight *q = &impl->qweights[i];
    const int K = q->m.K;
    const size_t row_bytes = rp_qmatrix_data_bytes(q->m.type, 1, K);
    const size_t row_scales = rp_qmatrix_scale_bytes(q->m.type, 1, K) / sizeof(uint16_t);
    char *data = (char *)q->data + (size_t)row0 * row_bytes;
    uint16_t *sc = q->scales ? q->scales + (size_t)row0 * row_scales : NULL;
    if (q->m.type == RP_QTYPE_Q8ROW) {
        float *rs = (float *)q->scales + row0;
        if (src_is_f32) { /* one row at a time through a row-major row */
            int8_t *row = malloc((size_t)K);
            if (!row) {
                if (impl->error.code == RP_OK)
                    rp_error_set(&impl->error, RP_ERR_NOMEM,
                                 "CPU backend: no memory for a %d-byte row in qweight_write", K);
                return;
            }
            for (int r = 0; r < n_rows; r++) {
                rp_quantize_matrix(RP_QTYPE_Q8ROW, row, rs + r, (const float *)src + (size_t)r * K, 1, K, 0);
                rp_q8row_pack_rows(q->data, row, row0 + r, 1, q->m.N, K);
            }
            free(row);
            return;
        }
        rp_q8row_pack_rows(q->data, (const int8_t *)src, row0, n_rows, q->m.N, K);
        if (scales) memcpy(rs, scales, (size_t)n_rows * sizeof(float));
        return;
    }
    if (src_is_f32) {
        rp_quantize_matrix(q->m.type, data, sc, src, n_rows, K, 0);
        return;
    }
    memcpy(data, src, (size_t)n_rows * row_bytes);
    if (sc && scales) memcpy(sc, scales, (size_t)n_rows * row_scales * sizeof(uint16_t));
}

static void qw_destroy(rp_backend *be, const float *key) {
    rp_cpu_impl *impl = be->impl;
    int i = impl->n_qweights ? qw_search(impl, key) : -1;
    if (i < 0) return;
    free(impl->qweights[i].data);
    free(impl->qweights[i].scales);
    memmove(&impl->qweights[i], &impl->qweights[i + 1],
            (size_t)(impl->n_qweights - i - 1) * sizeof *impl->qweights);
    impl->n_qweights--;
}

void cpu_qweights_free_all(rp_backend *be) {
    rp_cpu_impl *impl = be->impl;
    for (int i = 0; i < impl->n_qweights; i++) {
        free(impl->qweights[i].data);
        free(impl->qweights[i].scales);
    }
    free(impl->qweights);
    impl->qweights = NULL;
    impl->n_qweights = impl->cap_qweights = 0;
}

/* matmul_lora on a backend matrix: the LoRA factors of a bf16/int8 model
 * (rp_tensor_lora_lowp) are bf16 or int8 matrices stored transposed, [N,K] for the
 * op's W [K,N], so the quantized kernel runs them as matmul_linear runs the
 * big matrices; f32 factors go to the op installed before (cpu_matmul.c).
 * Every CPU backend installs the same function, so one pointer serves all. */
typedef void (*lora_fn)(rp_backend *, float *, const float *, const float *, int, int, int, float);
static lora_fn f32_matmul_lora;

static void qw_matmul_lora(rp_backend *be, float *y, const float *x, const float *w, int M, int N,
                           int K, float beta) {
    if (cpu_qweight_matmul(be, y, x, w, M, N, K, beta)) return;
    __atomic_load_n(&f32_matmul_lora, __ATOMIC_ACQUIRE)(be, y, x, w, M, N, K, beta);
}

void cpu_qweights_install(rp_backend *be) {
    if (be->matmul_lora != qw_matmul_lora) {
        __atomic_store_n(&f32_matmul_lora, be->matmul_lora, __ATOMIC_RELEASE);
        be->matmul_lora = qw_matmul_lora;
    }
    be->qweight_create = qw_create;
    be->qweight_write = qw_write;
    be->qweight_destroy = qw_destroy;
}
