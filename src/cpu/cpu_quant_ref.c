/* The low-precision weight formats' definition (cpu_quant.h): names, sizes,
 * the quantizer and a double-precision reference matmul. Portable C with no
 * CPU-specific code: the fast kernels live in cpu_qmatmul.c and are tested
 * against this file. */
#include "config.h"

#include <math.h>
#include <string.h>

#include "core/dtype.h"
#include "cpu/cpu_quant.h"

const char *rp_qtype_name(rp_qtype type) {
    switch (type) {
    case RP_QTYPE_F32: return "f32";
    case RP_QTYPE_BF16: return "bf16";
    case RP_QTYPE_Q8: return "int8";
    case RP_QTYPE_Q8ROW: return "int8row";
    }
    return "?";
}

int rp_qtype_from_name(const char *name, rp_qtype *out) {
    if (!strcmp(name, "f32") || !strcmp(name, "fp32")) *out = RP_QTYPE_F32;
    else if (!strcmp(name, "bf16")) *out = RP_QTYPE_BF16;
    else if (!strcmp(name, "int8") || !strcmp(name, "q8")) *out = RP_QTYPE_Q8;
    else if (!strcmp(name, "int8row")) *out = RP_QTYPE_Q8ROW;
    else return -1;
    return 0;
}

int rp_qtype_fits(rp_qtype type, int K) {
    return (type != RP_QTYPE_Q8 && type != RP_QTYPE_Q8ROW) || (K > 0 && K % RP_Q8_BLOCK == 0);
}

size_t rp_qmatrix_data_bytes(rp_qtype type, int N, int K) {
    size_t n = (size_t)N * (size_t)K;
    switch (type) {
    case RP_QTYPE_F32: return n * 4;
    case RP_QTYPE_BF16: return n * 2;
    case RP_QTYPE_Q8:
    case RP_QTYPE_Q8ROW: return n;
    }
    return 0;
}

size_t rp_qmatrix_scale_bytes(rp_qtype type, int N, int K) {
    if (type == RP_QTYPE_Q8ROW) return (size_t)N * sizeof(float);
    return type == RP_QTYPE_Q8 ? (size_t)N * (size_t)(K / RP_Q8_BLOCK) * sizeof(uint16_t) : 0;
}

rp_qmatrix rp_qmatrix_make(rp_qtype type, int N, int K, const void *data, const void *scales) {
    return (rp_qmatrix){.type = type, .N = N, .K = K, .data = data,
                        .scales = type == RP_QTYPE_Q8 ? scales : NULL,
                        .row_scales = type == RP_QTYPE_Q8ROW ? scales : NULL};
}

static float weight_at(const float *w, int n, int k, int N, int K, int w_in_out) {
    return w_in_out ? w[(size_t)k * N + n] : w[(size_t)n * K + k];
}

/* int8 q of v / scale, scale the stored one (so q * scale is the nearest). */
static int8_t q8_round(float v, float scale) {
    float q = scale > 0.0f ? nearbyintf(v / scale) : 0.0f;
    if (q > 127.0f) q = 127.0f;
    if (q < -127.0f) q = -127.0f;
    return (int8_t)q;
}

void rp_quantize_matrix(rp_qtype type, void *data, void *scales_out, const float *w, int N, int K,
                        int w_in_out) {
    uint16_t *scales = scales_out;
    for (int n = 0; n < N; n++) {
        if (type == RP_QTYPE_F32) {
            float *row = (float *)data + (size_t)n * K;
            for (int k = 0; k < K; k++) row[k] = weight_at(w, n, k, N, K, w_in_out);
        } else if (type == RP_QTYPE_BF16) {
            uint16_t *row = (uint16_t *)data + (size_t)n * K;
            for (int k = 0; k < K; k++) row[k] = rp_f32_to_bf16(weight_at(w, n, k, N, K, w_in_out));
        } else if (type == RP_QTYPE_Q8ROW) {
            int8_t *row = (int8_t *)data + (size_t)n * K;
            float amax = 0.0f;
            for (int k = 0; k < K; k++) {
                float a = fabsf(weight_at(w, n, k, N, K, w_in_out));
                if (a > amax) amax = a;
            }
            const float scale = amax / 127.0f; /* f32: stored as it is */
            ((float *)scales_out)[n] = scale;
            for (int k = 0; k < K; k++) row[k] = q8_round(weight_at(w, n, k, N, K, w_in_out), scale);
        } else {
            int8_t *row = (int8_t *)data + (size_t)n * K;
            for (int b = 0; b < K / RP_Q8_BLOCK; b++) {
                float amax = 0.0f;
                for (int i = 0; i < RP_Q8_BLOCK; i++) {
                    float a = fabsf(weight_at(w, n, b * RP_Q8_BLOCK + i, N, K, w_in_out));
                    if (a > amax) amax = a;
                }
                /* The stored (fp16) scale is the one the values are divided
                 * by, so dequantizing gives the nearest q * scale. */
                uint16_t scale_h = rp_f32_to_f16(amax / 127.0f);
                float scale = rp_f16_to_f32(scale_h);
                scales[(size_t)n * (K / RP_Q8_BLOCK) + b] = scale_h;
                for (int i = 0; i < RP_Q8_BLOCK; i++)
                    row[b * RP_Q8_BLOCK + i] =
                        q8_round(weight_at(w, n, b * RP_Q8_BLOCK + i, N, K, w_in_out), scale);
            }
        }
    }
}

size_t rp_q8row_packed_bytes(int N, int K) {
    const size_t rows = ((size_t)N + RP_Q8ROW_PACK_ROWS - 1) / RP_Q8ROW_PACK_ROWS * RP_Q8ROW_PACK_ROWS;
    return rows * (size_t)K;
}

void rp_q8row_pack_pad(uint8_t *packed, int N, int K) {
    const int padded = (N + RP_Q8ROW_PACK_ROWS - 1) / RP_Q8ROW_PACK_ROWS * RP_Q8ROW_PACK_ROWS;
    for (int n = N; n < padded; n++)
        for (int k = 0; k < K; k += 4) memset(packed + rp_q8row_pos(K, n, k), 0x80, 4);
}

void rp_q8row_pack_rows(uint8_t *packed, const int8_t *rows, int row0, int n_rows, int N, int K) {
    /* K is a multiple of 32: each row's 4 k of a chunk are one 4-byte lane */
    for (int r = 0; r < n_rows; r++) {
        const int8_t *src = rows + (size_t)r * K;
        for (int k = 0; k < K; k += 4) {
            uint8_t *d = packed + rp_q8row_pos(K, row0 + r, k);
            for (int i = 0; i < 4; i++) d[i] = (uint8_t)src[k + i] ^ 0x80;
        }
    }
    if (row0 + n_rows == N) rp_q8row_pack_pad(packed, N, K);
}

void rp_qmatrix_row_q8(const rp_qmatrix *w, int n, int8_t *out) {
    const int K = w->K;
    if (w->type == RP_QTYPE_Q8ROW && w->packed) {
        for (int k = 0; k < K; k += 4) {
            const uint8_t *p = w->packed + rp_q8row_pos(K, n, k);
            for (int i = 0; i < 4; i++) out[k + i] = (int8_t)(p[i] ^ 0x80);
        }
    } else {
        memcpy(out, (const int8_t *)w->data + (size_t)n * K, (size_t)K);
    }
}

void rp_qmatrix_row_f32(const rp_qmatrix *w, int n, float *out) {
    const int K = w->K;
    if (w->type == RP_QTYPE_F32) {
        memcpy(out, (const float *)w->data + (size_t)n * K, (size_t)K * sizeof(float));
    } else if (w->type == RP_QTYPE_BF16) {
        const uint16_t *row = (const uint16_t *)w->data + (size_t)n * K;
        for (int k = 0; k < K; k++) out[k] = rp_bf16_to_f32(row[k]);
    } else if (w->type == RP_QTYPE_Q8ROW && w->packed) {
        for (int k = 0; k < K; k += 4) { /* K % 32 == 0: one 4-byte lane per 4 k */
            const uint8_t *p = w->packed + rp_q8row_pos(K, n, k);
            for (int i = 0; i < 4; i++) out[k + i] = (float)(int8_t)(p[i] ^ 0x80) * w->row_scales[n];
        }
    } else if (w->type == RP_QTYPE_Q8ROW) {
        const int8_t *row = (const int8_t *)w->data + (size_t)n * K;
        for (int k = 0; k < K; k++) out[k] = (float)row[k] * w->row_scales[n];
    } else {
        const int8_t *row = (const int8_t *)w->data + (size_t)n * K;
        const uint16_t *s = w->scales + (size_t)n * (K / RP_Q8_BLOCK);
        for (int k = 0; k < K; k++) out[k] = (float)row[k] * rp_f16_to_f32(s[k / RP_Q8_BLOCK]);
    }
}

void rp_qmatmul_ref(const rp_qmatrix *w, float *y, const float *x, int M, float beta) {
    const int N = w->N, K = w->K;
    float row[K > 0 ? K : 1];
    for (int n = 0; n < N; n++) {
        rp_qmatrix_row_f32(w, n, row);
        for (int m = 0; m < M; m++) {
            double s = 0.0;
            for (int k = 0; k < K; k++) s += (double)row[k] * (double)x[(size_t)m * K + k];
            float *yi = y + (size_t)m * N + n;
            *yi = beta == 0.0f ? (float)s : (float)(s + (double)beta * (double)*yi);
        }
    }
}
