/* The x86 SIMD kernels of the quantized matmul: AVX2 and AVX-512 widening
 * (W to f32, FMA with f32 x), AVX512_BF16 dot products (vdpbf16ps, x rounded
 * to bf16) and AVX512_VNNI int8 dot products (vpdpbusd, x quantized per
 * block). Each section is compiled for its ISA by a target pragma whatever
 * -march says, and runs only where cpu_features.c found that ISA. */
#include "config.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <string.h>

#include "core/dtype.h"
#include "cpu/cpu_qmatmul_kern.h"

#define AI inline __attribute__((always_inline))

/* Software prefetch for 2 or more x rows, as in cpu_matmul.c (measured
 * there: 16 KiB ahead into L2); one row is left to the hardware prefetcher. */
#define QPF_BYTES 16384
#define QPF_HINT 2

/* Rows m0.. of y for one tile: sums[j * rows + m], stored with beta. */
static AI void store_tile(float *y, const float *sums, int m0, int n, int nw, int rows, int N,
                          float beta) {
    for (int j = 0; j < nw; j++)
        for (int m = 0; m < rows; m++) {
            float *yi = y + (size_t)(m0 + m) * N + n + j;
            *yi = beta == 0.0f ? sums[j * rows + m] : sums[j * rows + m] + beta * *yi;
        }
}

/* Tiles of NW W rows x R x rows (constants, so the accumulators stay in
 * registers); the tile shape changes which rows share loads, never the
 * order of any one sum. QDRIVE's NW1 is the tile width for a single x row:
 * vnni takes 4 W rows at a time there (4 independent accumulator chains and
 * reductions in flight: 2x its one-row rate with W in cache, measured with
 * thread CPU time on the Zen 5 machine); the others keep 1 (no gain seen).
 * NW8 is the width for 8 x rows (batch-8 decode): bf16dot takes 3 W rows
 * (24 accumulators + 3 W + 1 x register: 52.5 -> 41-44 us per 512 x 768
 * call with W in cache, thread CPU time; 4 spills: 94 us), the others 2
 * (vnni keeps 3 more registers per W row: 3 rows measured no faster). */
#define QROWS(TILE, R, NW)                                                                  \
    do {                                                                                    \
        int n_ = n0;                                                                        \
        float sums_[32];                                                                    \
        for (; n_ + (NW) <= n1; n_ += (NW)) {                                               \
            TILE(sums_, w, n_, x, m, (NW), (R));                                            \
            store_tile(y, sums_, m, n_, (NW), (R), w->N, beta);                             \
        }                                                                                   \
        for (; n_ < n1; n_++) {                                                             \
            TILE(sums_, w, n_, x, m, 1, (R));                                               \
            store_tile(y, sums_, m, n_, 1, (R), w->N, beta);                                \
        }                                                                                   \
    } while (0)

#define QDRIVE(TILE, NW1, NW8) QDRIVE_MID(TILE, NW1, 4, NW8)
#define QDRIVE_MID(TILE, NW1, NW4, NW8)                                                     \
    for (int m = 0; m < M; m += 8) {                                                        \
        switch (M - m) {                                                                    \
        case 1: QROWS(TILE, 1, NW1); break;                                                 \
        case 2: QROWS(TILE, 2, NW4); break;                                                 \
        case 3: QROWS(TILE, 3, NW4); break;                                                 \
        case 4: QROWS(TILE, 4, NW4); break;                                                 \
        case 5: QROWS(TILE, 5, 2); break;                                                   \
        case 6: QROWS(TILE, 6, 2); break;                                                   \
        case 7: QROWS(TILE, 7, 2); break;                                                   \
        default: QROWS(TILE, 8, NW8); break;                                                \
        }                                                                                   \
    }

/* ================= AVX2 + FMA: widening, 8 lanes ================= */
RP_ISA_BEGIN("avx2,fma,f16c")

static AI __m256 bf16x8_f32(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static AI __m256 q8x8_f32(const int8_t *p) {
    long long v;
    memcpy(&v, p, 8);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v)));
}

/* q of W[n, k .. k + 7] from Q8ROW's packed form (two 4-byte lanes, 64 bytes apart). */
static AI __m256 q8row8_f32(const rp_qmatrix *w, int n, int k) {
    int32_t a, b;
    const uint8_t *p = w->packed + rp_q8row_pos(w->K, n, k);
    memcpy(&a, p, 4);
    memcpy(&b, p + 4 * RP_Q8ROW_PACK_ROWS, 4);
    const __m128i u = _mm_xor_si128(_mm_setr_epi32(a, b, 0, 0), _mm_set1_epi8((char)0x80));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(u));
}

static AI float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The scale of W[n, k] in a Q8 or Q8ROW matrix. */
static AI float q8_scale(const rp_qmatrix *w, int n, int k) {
    if (w->type == RP_QTYPE_Q8ROW) return w->row_scales[n];
    return _cvtsh_ss(w->scales[(size_t)n * (w->K / RP_Q8_BLOCK) + k / RP_Q8_BLOCK]);
}

/* One W row against `rows` x rows; 8 lanes over k, then the K % 8 tail in order. */
static AI void avx2_tile(float *sums, const rp_qmatrix *w, int n, const cpu_qx *x, int m0,
                         int nw, int rows) {
    const int K = w->K;
    for (int j = 0; j < nw; j++) {
        __m256 acc[8];
        for (int m = 0; m < rows; m++) acc[m] = _mm256_setzero_ps();
        int k = 0;
        if (w->type == RP_QTYPE_BF16) {
            const uint16_t *wr = (const uint16_t *)w->data + (size_t)(n + j) * K;
            for (; k + 8 <= K; k += 8) {
                const __m256 wv = bf16x8_f32(wr + k);
                for (int m = 0; m < rows; m++)
                    acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x->x + (size_t)(m0 + m) * K + k),
                                             acc[m]);
            }
        } else { /* Q8, Q8ROW: K is a multiple of 32 */
            const int8_t *wr = (const int8_t *)w->data + (size_t)(n + j) * K;
            for (; k < K; k += 8) {
                const __m256 wq = w->packed ? q8row8_f32(w, n + j, k) : q8x8_f32(wr + k);
                const __m256 wv = _mm256_mul_ps(wq, _mm256_set1_ps(q8_scale(w, n + j, k)));
                for (int m = 0; m < rows; m++)
                    acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x->x + (size_t)(m0 + m) * K + k),
                                             acc[m]);
            }
        }
        for (int m = 0; m < rows; m++) {
            float s = hsum8(acc[m]);
            const uint16_t *wr = (const uint16_t *)w->data + (size_t)(n + j) * K;
            for (int kt = k; kt < K; kt++)
                s += rp_bf16_to_f32(wr[kt]) * x->x[(size_t)(m0 + m) * K + kt];
            sums[j * rows + m] = s;
        }
    }
}

void cpu_qdecode_avx2(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                      float beta) {
    QDRIVE(avx2_tile, 1, 2)
}

void cpu_qwiden_avx2(const rp_qmatrix *w, int n0, int n1, float *out) {
    const int K = w->K;
    for (int n = n0; n < n1; n++) {
        float *o = out + (size_t)(n - n0) * K;
        int k = 0;
        if (w->type == RP_QTYPE_BF16) {
            const uint16_t *wr = (const uint16_t *)w->data + (size_t)n * K;
            for (; k + 8 <= K; k += 8) _mm256_storeu_ps(o + k, bf16x8_f32(wr + k));
            for (; k < K; k++) o[k] = rp_bf16_to_f32(wr[k]);
        } else if (w->type == RP_QTYPE_Q8) {
            const int8_t *wr = (const int8_t *)w->data + (size_t)n * K;
            const uint16_t *sr = w->scales + (size_t)n * (K / RP_Q8_BLOCK);
            for (; k < K; k += 8)
                _mm256_storeu_ps(o + k, _mm256_mul_ps(q8x8_f32(wr + k),
                                                      _mm256_set1_ps(_cvtsh_ss(sr[k / RP_Q8_BLOCK]))));
        } else {
            rp_qmatrix_row_f32(w, n, o);
        }
    }
}

RP_ISA_END

/* ================= AVX-512: widening, 16 lanes ================= */
RP_ISA_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")

static AI __m512 bf16x16_f32(const uint16_t *p, __mmask16 mk) {
    const __m256i h = _mm256_maskz_loadu_epi16(mk, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* sums[i] = the sum of v[i]'s 16 lanes, i < n: bit for bit what
 * _mm512_reduce_add_ps gives with GCC (lane i + lane i + 8, then + i + 4,
 * + i + 2, + i + 1), as one transposing tree over up to 16 vectors: each
 * step adds two shuffles of two vectors, so 16 accumulators take 15 steps
 * (45 instructions) where 16 separate reductions took 16 x 7 with 1-4
 * lanes of each add used. Written out, the order no longer depends on the
 * compiler (clang leaves _mm512_reduce_add_ps's order open). n is a
 * constant after inlining; steps on the vectors past n are not emitted. */
static AI void hsum_many(float *sums, const __m512 *v, int n) {
    const __m512 z = _mm512_setzero_ps();
    for (int i0 = 0; i0 < n; i0 += 16) {
        const int c = n - i0 < 16 ? n - i0 : 16, c1 = (c + 1) / 2, c2 = (c1 + 1) / 2;
        __m512 s1[8], s2[4], s3[2];
        for (int p = 0; p < 8; p++) { /* lanes i + 8: [a 0-3, a 4-7, b 0-3, b 4-7] */
            const __m512 a = 2 * p < c ? v[i0 + 2 * p] : z;
            const __m512 b = 2 * p + 1 < c ? v[i0 + 2 * p + 1] : z;
            s1[p] = 2 * p < c ? _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)),
                                              _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)))
                              : z;
        }
        for (int q = 0; q < 4; q++) { /* + 4: one 4-lane chunk per vector */
            const __m512 a = s1[2 * q], b = s1[2 * q + 1];
            s2[q] = 2 * q < c1 ? _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)),
                                               _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)))
                               : z;
        }
        for (int r = 0; r < 2; r++) { /* + 2: two lanes per vector */
            const __m512d a = _mm512_castps_pd(s2[2 * r]), b = _mm512_castps_pd(s2[2 * r + 1]);
            s3[r] = 2 * r < c2 ? _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                                               _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))
                               : z;
        }
        /* + 1: lane 4 (i % 4) + i / 4 holds the sum of v[i0 + i] */
        const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(3, 1, 3, 1)));
        float out[16];
        _mm512_storeu_ps(out, t);
        for (int i = 0; i < c; i++) sums[i0 + i] = out[4 * (i % 4) + i / 4];
    }
}

/* hsum_many over acc[j][m], j < nw, m < rows, into sums[j * rows + m]. */
#define HSUM_TILE(sums, acc, nw, rows)                                                      \
    do {                                                                                    \
        __m512 v_[32];                                                                      \
        for (int j_ = 0; j_ < (nw); j_++)                                                   \
            for (int m_ = 0; m_ < (rows); m_++) v_[j_ * (rows) + m_] = (acc)[j_][m_];        \
        hsum_many((sums), v_, (nw) * (rows));                                               \
    } while (0)

static AI __m512 q8x16_f32(const int8_t *p, float scale) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(scale));
}

/* W[n, k .. k + 15] * scale from Q8ROW's packed form (four 4-byte lanes, 64 bytes apart). */
static AI __m512 q8row16_f32(const rp_qmatrix *w, int n, int k, float scale) {
    const int *p = (const int *)(const void *)(w->packed + rp_q8row_pos(w->K, n, k));
    const __m128i b = _mm_xor_si128(_mm_i32gather_epi32(p, _mm_setr_epi32(0, 16, 32, 48), 4),
                                    _mm_set1_epi8((char)0x80));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(scale));
}

/* sums[j * rows + m] = dot(W row n + j, x row m0 + m): one 16-lane f32
 * accumulator over k (the last step masked), then hsum_many (the order of
 * _mm512_reduce_add_ps). Q8 weights are widened to q * scale (exactly the
 * format's value). */
static AI void avx512_tile(float *sums, const rp_qmatrix *w, int n, const cpu_qx *x, int m0,
                           int nw, int rows) {
    const int K = w->K;
    const float *xm = x->x + (size_t)m0 * K;
    __m512 acc[4][8];
    for (int j = 0; j < nw; j++)
        for (int m = 0; m < rows; m++) acc[j][m] = _mm512_setzero_ps();
    if (w->type == RP_QTYPE_BF16) {
        const uint16_t *wt = (const uint16_t *)w->data + (size_t)n * K;
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            if (rows > 1)
                for (int j = 0; j < nw; j += 2)
                    __builtin_prefetch((const char *)(wt + (size_t)nw * k) + 32 * j + QPF_BYTES,
                                       0, QPF_HINT);
            __m512 wv[4];
            for (int j = 0; j < nw; j++) wv[j] = bf16x16_f32(wt + (size_t)j * K + k, 0xffff);
            for (int m = 0; m < rows; m++) {
                const __m512 xv = _mm512_loadu_ps(xm + (size_t)m * K + k);
                for (int j = 0; j < nw; j++) acc[j][m] = _mm512_fmadd_ps(wv[j], xv, acc[j][m]);
            }
        }
        if (k < K) {
            const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
            __m512 wv[4];
            for (int j = 0; j < nw; j++) wv[j] = bf16x16_f32(wt + (size_t)j * K + k, mk);
            for (int m = 0; m < rows; m++) {
                const __m512 xv = _mm512_maskz_loadu_ps(mk, xm + (size_t)m * K + k);
                for (int j = 0; j < nw; j++) acc[j][m] = _mm512_fmadd_ps(wv[j], xv, acc[j][m]);
            }
        }
    } else { /* Q8, Q8ROW: K is a multiple of 32 */
        const int8_t *wt = w->packed ? NULL : (const int8_t *)w->data + (size_t)n * K;
        for (int k = 0; k < K; k += RP_Q8_BLOCK) {
            if (rows > 1 && wt)
                for (int j = 0; j < nw; j += 2)
                    __builtin_prefetch((const char *)(wt + (size_t)nw * k) + 64 * (j / 2) +
                                           QPF_BYTES / 2, 0, QPF_HINT);
            __m512 wv[4][2];
            for (int j = 0; j < nw; j++) {
                const float s = q8_scale(w, n + j, k);
                if (w->packed) {
                    wv[j][0] = q8row16_f32(w, n + j, k, s);
                    wv[j][1] = q8row16_f32(w, n + j, k + 16, s);
                } else {
                    wv[j][0] = q8x16_f32(wt + (size_t)j * K + k, s);
                    wv[j][1] = q8x16_f32(wt + (size_t)j * K + k + 16, s);
                }
            }
            for (int m = 0; m < rows; m++) {
                const __m512 x0 = _mm512_loadu_ps(xm + (size_t)m * K + k);
                const __m512 x1 = _mm512_loadu_ps(xm + (size_t)m * K + k + 16);
                for (int j = 0; j < nw; j++) {
                    acc[j][m] = _mm512_fmadd_ps(wv[j][0], x0, acc[j][m]);
                    acc[j][m] = _mm512_fmadd_ps(wv[j][1], x1, acc[j][m]);
                }
            }
        }
    }
    HSUM_TILE(sums, acc, nw, rows);
}

void cpu_qdecode_avx512(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                        float beta) {
    QDRIVE(avx512_tile, 1, 2)
}

void cpu_qhsum_avx512(float *sums, const float *v, int n) {
    for (int i0 = 0; i0 < n; i0 += 32) {
        const int c = n - i0 < 32 ? n - i0 : 32;
        __m512 a[32];
        for (int i = 0; i < c; i++) a[i] = _mm512_loadu_ps(v + 16 * (size_t)(i0 + i));
        hsum_many(sums + i0, a, c);
    }
}

void cpu_qwiden_avx512(const rp_qmatrix *w, int n0, int n1, float *out) {
    const int K = w->K;
    for (int n = n0; n < n1; n++) {
        float *o = out + (size_t)(n - n0) * K;
        if (w->type == RP_QTYPE_BF16) {
            const uint16_t *wr = (const uint16_t *)w->data + (size_t)n * K;
            int k = 0;
            for (; k + 16 <= K; k += 16) _mm512_storeu_ps(o + k, bf16x16_f32(wr + k, 0xffff));
            if (k < K) {
                const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
                _mm512_mask_storeu_ps(o + k, mk, bf16x16_f32(wr + k, mk));
            }
        } else if (w->type == RP_QTYPE_Q8) {
            const int8_t *wr = (const int8_t *)w->data + (size_t)n * K;
            const uint16_t *sr = w->scales + (size_t)n * (K / RP_Q8_BLOCK);
            for (int k = 0; k < K; k += 16)
                _mm512_storeu_ps(o + k, q8x16_f32(wr + k, _cvtsh_ss(sr[k / RP_Q8_BLOCK])));
        } else {
            rp_qmatrix_row_f32(w, n, o);
        }
    }
}

RP_ISA_END

/* ================= AVX512_BF16: vdpbf16ps, x rounded to bf16 ================= */
RP_ISA_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

/* Each lane sums pairs of bf16 products (32 k per step, the last masked to
 * zeros), then hsum_many (_mm512_reduce_add_ps's order). */
static AI void bf16dot_tile(float *sums, const rp_qmatrix *w, int n, const cpu_qx *x, int m0,
                            int nw, int rows) {
    const int K = w->K;
    const uint16_t *wt = (const uint16_t *)w->data + (size_t)n * K;
    const uint16_t *xm = x->xb + (size_t)m0 * K;
    __m512 acc[4][8];
    for (int j = 0; j < nw; j++)
        for (int m = 0; m < rows; m++) acc[j][m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        const __mmask32 mk = K - k >= 32 ? (__mmask32)0xffffffffu
                                         : (__mmask32)((1u << (K - k)) - 1);
        if (rows > 1)
            for (int j = 0; j < nw; j++)
                __builtin_prefetch((const char *)(wt + (size_t)nw * k) + 64 * j + QPF_BYTES, 0,
                                   QPF_HINT);
        __m512i wv[4];
        for (int j = 0; j < nw; j++) wv[j] = _mm512_maskz_loadu_epi16(mk, wt + (size_t)j * K + k);
        for (int m = 0; m < rows; m++) {
            const __m512i xv = _mm512_maskz_loadu_epi16(mk, xm + (size_t)m * K + k);
            for (int j = 0; j < nw; j++)
                acc[j][m] = _mm512_dpbf16_ps(acc[j][m], (__m512bh)wv[j], (__m512bh)xv);
        }
    }
    HSUM_TILE(sums, acc, nw, rows);
}

void cpu_qdecode_bf16dot(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                         float beta) {
    QDRIVE(bf16dot_tile, 1, 3)
}

/* rp_f32_to_bf16 on 16 lanes (the same integer rounding: + 0x7FFF + the
 * lowest kept bit, NaN to 0x7FC0), so the same bits. Not vcvtneps2bf16,
 * which flushes denormal inputs to zero. The scalar calls took 1-5% of a
 * decode step (every bf16dot product rounds its x: LoRA factors, and every
 * matrix of a bf16 model). */
void cpu_qprep_bf16dot(uint16_t *xb, const float *x, size_t n) {
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    const __m512i qnan = _mm512_set1_epi32(0x7FC0);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(x + i));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias), odd), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
        r = _mm512_mask_mov_epi32(r, nan, qnan);
        _mm256_storeu_si256((__m256i *)(xb + i), _mm512_cvtepi32_epi16(r));
    }
    for (; i < n; i++) xb[i] = rp_f32_to_bf16(x[i]);
}

RP_ISA_END

/* ================= AVX512_VNNI: vpdpbusd on int8 blocks ================= */
RP_ISA_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

/* 128 k (a group of 4 blocks) per step: x is laid out per group as the 16
 * first bytes of each block, then their 16 last (cpu_qvnni_pos), and W's
 * two 64-byte loads are shuffled (128-bit lanes) into the same order, so
 * lanes 4i..4i+3 hold block i of the group and two vpdpbusd sum 8
 * products of one block into each lane. vpdpbusd multiplies unsigned by
 * signed bytes, so x enters as q + 128 and 128 * sum(w) (computed once per
 * W row and group, shared by the tile's x rows) is taken off by starting
 * each sum from its negative: the block dots are exact in int32. Each
 * lane's int32 goes to f32 (exact) and is added times (w scale * x scale)
 * into a 16-lane f32 accumulator (one FMA per group), then hsum_many
 * (_mm512_reduce_add_ps's order). A last group of r < 4 blocks is masked
 * (its missing lanes add 0 * 0). Per (W row, x row) pair and 128 k: 2 vpdpbusd,
 * a conversion, a multiply and an FMA (with 64-k steps of 2 blocks x 8
 * lanes it was 8 instructions). */
#define VG (4 * RP_Q8_BLOCK)

/* The masks of group g of a row of nb blocks: r blocks in it. */
typedef struct {
    int r;
    __mmask64 w0, w1, half; /* W bytes 0-63 and 64-127; one 16r-byte half of x */
    __mmask16 lanes;        /* 4r lanes */
    __mmask8 blocks;        /* r scales */
} vnni_masks;

static AI vnni_masks vnni_group_masks(int nb, int g) {
    vnni_masks v;
    v.r = nb - g < 4 ? nb - g : 4;
    v.w0 = v.r >= 2 ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
    v.w1 = v.r == 4 ? ~(__mmask64)0 : v.r == 3 ? (__mmask64)0xffffffffu : 0;
    v.half = v.r == 4 ? ~(__mmask64)0 : ((__mmask64)1 << (16 * v.r)) - 1;
    v.lanes = (__mmask16)((1u << (4 * v.r)) - 1);
    v.blocks = (__mmask8)((1u << v.r) - 1);
    return v;
}

/* W row bytes [k, k + 128) of a group as the two halves x has (wa: the
 * first 16 bytes of each block, wb: the last 16). */
static AI void vnni_load_w(__m512i *wa, __m512i *wb, const int8_t *p, const vnni_masks *v) {
    const __m512i w0 = _mm512_maskz_loadu_epi8(v->w0, p);
    const __m512i w1 = _mm512_maskz_loadu_epi8(v->w1, p + 64);
    *wa = _mm512_shuffle_i64x2(w0, w1, _MM_SHUFFLE(2, 0, 2, 0));
    *wb = _mm512_shuffle_i64x2(w0, w1, _MM_SHUFFLE(3, 1, 3, 1));
}

static AI void vnni_tile(float *sums, const rp_qmatrix *w, int n, const cpu_qx *x, int m0,
                         int nw, int rows) {
    const int K = w->K, nb = K / RP_Q8_BLOCK;
    const int8_t *wt = (const int8_t *)w->data + (size_t)n * K;
    const uint8_t *xm = x->xu + (size_t)m0 * K;
    const float *xs = x->xse + (size_t)m0 * (K / 8);
    const uint16_t *st = w->scales + (size_t)n * nb;
    const __m512i c128 = _mm512_set1_epi8((char)0x80);
    const __m512i idx4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[4][8];
    for (int j = 0; j < nw; j++)
        for (int m = 0; m < rows; m++) acc[j][m] = _mm512_setzero_ps();
    for (int g = 0; g < nb; g += 4) {
        const vnni_masks v = vnni_group_masks(nb, g);
        const int k = g * RP_Q8_BLOCK;
        for (int j = 0; j < nw; j++) {
            __builtin_prefetch((const char *)(wt + (size_t)nw * k) + 128 * j + QPF_BYTES / 2, 0,
                               QPF_HINT);
            __builtin_prefetch((const char *)(wt + (size_t)nw * k) + 128 * j + 64 + QPF_BYTES / 2,
                               0, QPF_HINT);
        }
        __m512i wa[4], wb[4], cw[4];
        __m512 sw[4];
        for (int j = 0; j < nw; j++) {
            vnni_load_w(&wa[j], &wb[j], wt + (size_t)j * K + k, &v);
            /* -128 sum(w): the start of every x row's vpdpbusd (exact in int32) */
            cw[j] = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, wa[j]),
                                    c128, wb[j]));
            const __m128i h = _mm_maskz_loadu_epi16(v.blocks, st + (size_t)j * nb + g);
            sw[j] = _mm512_permutexvar_ps(idx4, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
        }
        for (int m = 0; m < rows; m++) {
            const uint8_t *xg = xm + (size_t)m * K + k;
            const __m512i xa = _mm512_maskz_loadu_epi8(v.half, xg);
            const __m512i xb = _mm512_maskz_loadu_epi8(v.half, xg + 16 * v.r);
            const __m512 sx = _mm512_maskz_loadu_ps(v.lanes, xs + (size_t)m * (K / 8) + g * 4);
            for (int j = 0; j < nw; j++) {
                const __m512i d =
                    _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(cw[j], xa, wa[j]), xb, wb[j]);
                acc[j][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw[j], sx),
                                            acc[j][m]);
            }
        }
    }
    HSUM_TILE(sums, acc, nw, rows);
}

/* vnni_tile for one x row, the same sums in the same order: the products
 * w scale * x scale of 16 blocks are formed with one fp16 conversion and
 * one multiply (the same f32 products) and each group takes its four with
 * one permute. The correction is taken from x instead of W (the same exact
 * int32: sum (w + 128) q - 128 sum(q) = sum w q, with W's bytes flipped to
 * w + 128 and x's back to q), so it is formed once per group for all W
 * rows of the tile, and each W row costs two xors instead of two vpdpbusd
 * and a subtraction (the M = 1 kernel was bound by instructions). */
static AI void vnni_tile1(float *sums, const rp_qmatrix *w, int n, const cpu_qx *x, int m0,
                          int nw) {
    const int K = w->K, nb = K / RP_Q8_BLOCK;
    const int8_t *wt = (const int8_t *)w->data + (size_t)n * K;
    const uint8_t *xm = x->xu + (size_t)m0 * K;
    const float *xs = x->xs + (size_t)m0 * nb;
    const uint16_t *st = w->scales + (size_t)n * nb;
    const __m512i c128 = _mm512_set1_epi8((char)0x80);
    const __m512i idx4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i four = _mm512_set1_epi32(4);
    __m512 acc[4];
    for (int j = 0; j < nw; j++) acc[j] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        /* products of blocks b0 .. b0 + 15 (masked past the last block) */
        const __mmask16 mb = nb - b0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nb - b0)) - 1);
        const __m512 sx = _mm512_maskz_loadu_ps(mb, xs + b0);
        __m512 p[4];
        for (int j = 0; j < nw; j++)
            p[j] = _mm512_mul_ps(
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mb, st + (size_t)j * nb + b0)), sx);
        __m512i idx = idx4;
        const int gend = b0 + 16 < nb ? b0 + 16 : nb;
        for (int g = b0; g < gend; g += 4) {
            const vnni_masks v = vnni_group_masks(nb, g);
            const int k = g * RP_Q8_BLOCK;
            for (int j = 0; j < nw; j++) {
                __builtin_prefetch((const char *)(wt + (size_t)nw * k) + 128 * j + QPF_BYTES / 2,
                                   0, QPF_HINT);
                __builtin_prefetch(
                    (const char *)(wt + (size_t)nw * k) + 128 * j + 64 + QPF_BYTES / 2, 0,
                    QPF_HINT);
            }
            /* q (signed) and -128 sum(q) per lane; masked bytes stay 0 */
            const __m512i xa = _mm512_maskz_xor_epi32(
                (__mmask16)v.lanes, _mm512_maskz_loadu_epi8(v.half, xm + k), c128);
            const __m512i xb = _mm512_maskz_xor_epi32(
                (__mmask16)v.lanes, _mm512_maskz_loadu_epi8(v.half, xm + k + 16 * v.r), c128);
            const __m512i cx = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, xa), c128,
                                    xb));
            for (int j = 0; j < nw; j++) {
                __m512i wa, wb;
                vnni_load_w(&wa, &wb, wt + (size_t)j * K + k, &v);
                const __m512i d = _mm512_dpbusd_epi32(
                    _mm512_dpbusd_epi32(cx, _mm512_xor_si512(wa, c128), xa),
                    _mm512_xor_si512(wb, c128), xb);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(idx, p[j]),
                                         acc[j]);
            }
            idx = _mm512_add_epi32(idx, four);
        }
    }
    hsum_many(sums, acc, nw);
}

/* vnni_tile, with vnni_tile1 for one x row (rows is a constant after inlining). */
static AI void vnni_tile_any(float *sums, const rp_qmatrix *w, int n, const cpu_qx *x, int m0,
                             int nw, int rows) {
    if (rows == 1) vnni_tile1(sums, w, n, x, m0, nw);
    else vnni_tile(sums, w, n, x, m0, nw, rows);
}

/* 2-4 x rows take 3 W rows (4 W rows' wa, wb, cw and sw and 16
 * accumulators would not fit the 32 registers). */
void cpu_qdecode_vnni(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                      float beta) {
    QDRIVE_MID(vnni_tile_any, 4, 3, 2)
}

/* rp_q8_quantize_x on 16 lanes, written as the kernel reads it (q + 128 and
 * the scales repeated 4 times): the same IEEE operations per element (max of
 * |x| skipping NaN as the scalar compare does, one f32 division, round to
 * nearest even, clamp), so the same bytes (in cpu_qvnni_pos's order); the
 * scalar loop took ~4 us of a 20-50 us product at K = 768 (and its
 * divisions do not vectorise). */
void cpu_qprep_vnni(uint8_t *xu, float *xse, float *xs, const float *x, int K) {
    const __m512 lim = _mm512_set1_ps(127.0f);
    const int nb = K / RP_Q8_BLOCK;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * RP_Q8_BLOCK;
        const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        /* max_ps returns its second operand when either is NaN */
        __m512 amax = _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps());
        amax = _mm512_max_ps(_mm512_abs_ps(x1), amax);
        const float scale = _mm512_reduce_max_ps(amax) / 127.0f;
        __m128i q0 = _mm_set1_epi8((char)0x80), q1 = q0;
        if (scale > 0.0f) {
            const __m512 sv = _mm512_set1_ps(scale);
            const __m512 r0 = _mm512_roundscale_ps(_mm512_div_ps(x0, sv),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512 r1 = _mm512_roundscale_ps(_mm512_div_ps(x1, sv),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i c0 = _mm512_cvtps_epi32(
                _mm512_min_ps(_mm512_max_ps(r0, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim));
            const __m512i c1 = _mm512_cvtps_epi32(
                _mm512_min_ps(_mm512_max_ps(r1, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim));
            q0 = _mm512_cvtepi32_epi8(_mm512_add_epi32(c0, _mm512_set1_epi32(128)));
            q1 = _mm512_cvtepi32_epi8(_mm512_add_epi32(c1, _mm512_set1_epi32(128)));
        }
        /* cpu_qvnni_pos's order: first halves of the group's blocks, then last */
        const int g = b / 4 * 4, r = nb - g < 4 ? nb - g : 4;
        uint8_t *xg = xu + (size_t)g * RP_Q8_BLOCK + 16 * (b - g);
        _mm_storeu_si128((__m128i *)xg, q0);
        _mm_storeu_si128((__m128i *)(xg + 16 * r), q1);
        _mm_storeu_ps(xse + b * 4, _mm_set1_ps(scale));
        xs[b] = scale;
    }
}

/* Q8ROW (one f32 scale per W row) against x quantized per 128-k group, W
 * in the packed output-major order (cpu_quant.h, rp_q8row_pos): a block of
 * 16 W rows is read chunk by chunk (64 bytes: 4 k of 16 rows, as w + 128),
 * and each chunk goes through one vpdpbusd per x row against that row's 4
 * bytes of q broadcast (the signed operand), so one instruction adds 64
 * products into 16 int32 outputs and the W load is shared by the x rows.
 * Per 128-k group and x row: 32 vpdpbusd from -128 sum(q) of the group (the
 * w + 128 correction: the int32 is the exact dot_g), one conversion and
 * one FMA with the group's x scale into 16 f32 outputs; the row scales at
 * the end, no horizontal sums. Each output is
 *   acc = fmaf((float)dot_g, xscale_g, acc) for g in k order, then acc * wscale
 * whatever the tile: the int32 chains (CH per x row, to keep several
 * vpdpbusd in flight) are exact and summed in int32, so the bits depend
 * neither on M, the chain count nor the rows a thread takes. Against the
 * former row-major tile: 8 x rows 0.67-0.78x the time, 1 row the same from
 * memory (docs/perf/cpu.md, "int8row output-major"). */
#define VROW_CHUNK 64
/* W bytes ahead of the chunk being read: one x row streams W at memory
 * speed and 16 KiB into L1 was the best of 4-32 KiB and L1/L2 in the
 * microbench; more rows are bound by the dot products (8 KiB into L2). */
#define VROW1_PF_BYTES 16384
#define VROW1_PF_HINT 3
#define VROW_PF_BYTES 8192

/* y rows m0 .. m0 + R - 1, the 16 outputs of the block at W row nb (a
 * multiple of 16) kept where `keep` says (n0 <= n < n1). */
static AI void vrow_block(const rp_qmatrix *w, float *y, const cpu_qx *x, int m0, int R, int CH,
                          int nb, __mmask16 keep, float beta) {
    const int K = w->K, N = w->N, ng = cpu_qrow_groups(K);
    const uint8_t *wp = w->packed + (size_t)nb * K;
    const int8_t *xq = (const int8_t *)x->xu + (size_t)m0 * K;
    const int32_t *xc = x->xc + (size_t)m0 * ng;
    const float *xg = x->xg + (size_t)m0 * ng;
    __m512 f[8];
    for (int m = 0; m < R; m++) f[m] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const int k0 = g * VG, chunks = (K - k0 < VG ? K - k0 : VG) / 4; /* a multiple of 8 */
        const uint8_t *p = wp + (size_t)k0 * RP_Q8ROW_PACK_ROWS;
        __m512i a[8][4];
        for (int m = 0; m < R; m++) {
            a[m][0] = _mm512_set1_epi32(xc[(size_t)m * ng + g]);
            for (int i = 1; i < CH; i++) a[m][i] = _mm512_setzero_si512();
        }
        for (int c = 0; c < chunks; c += CH)
            for (int i = 0; i < CH; i++) {
                const uint8_t *pc = p + (size_t)(c + i) * VROW_CHUNK;
                if (R == 1) __builtin_prefetch(pc + VROW1_PF_BYTES, 0, VROW1_PF_HINT);
                else __builtin_prefetch(pc + VROW_PF_BYTES, 0, QPF_HINT);
                const __m512i wv = _mm512_loadu_si512(pc);
                for (int m = 0; m < R; m++) {
                    int32_t x4;
                    memcpy(&x4, xq + (size_t)m * K + k0 + 4 * (c + i), 4);
                    a[m][i] = _mm512_dpbusd_epi32(a[m][i], wv, _mm512_set1_epi32(x4));
                }
            }
        for (int m = 0; m < R; m++) {
            __m512i d = a[m][0];
            for (int i = 1; i < CH; i++) d = _mm512_add_epi32(d, a[m][i]);
            f[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xg[(size_t)m * ng + g]),
                                   f[m]);
        }
    }
    const __m512 rs = _mm512_maskz_loadu_ps(keep, w->row_scales + nb);
    for (int m = 0; m < R; m++) {
        float *yp = y + (size_t)(m0 + m) * N + nb;
        __m512 v = _mm512_mul_ps(f[m], rs);
        /* store_tile's y + beta * y_old (beta 0 or 1) */
        if (beta != 0.0f)
            v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(keep, yp)));
        _mm512_mask_storeu_ps(yp, keep, v);
    }
}

/* Rows m0 .. m0 + R - 1 over outputs [n0, n1). */
static AI void vrow_rows(const rp_qmatrix *w, float *y, const cpu_qx *x, int m0, int R, int CH,
                         int n0, int n1, float beta) {
    for (int nb = n0 / RP_Q8ROW_PACK_ROWS * RP_Q8ROW_PACK_ROWS; nb < n1; nb += RP_Q8ROW_PACK_ROWS) {
        const int lo = n0 > nb ? n0 - nb : 0, hi = n1 - nb < 16 ? n1 - nb : 16;
        const __mmask16 keep = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
        vrow_block(w, y, x, m0, R, CH, nb, keep, beta);
    }
}

/* Chains per x row: 1 row 4, 2 rows 4, 3-4 rows 2, more 1 (8+ vpdpbusd in
 * flight; 8 rows: 8 int32 + 8 f32 accumulators). */
void cpu_qdecode_vnnirow(const rp_qmatrix *w, float *y, const cpu_qx *x, int M, int n0, int n1,
                         float beta) {
    for (int m = 0; m < M; m += 8) {
        switch (M - m) {
        case 1: vrow_rows(w, y, x, m, 1, 4, n0, n1, beta); break;
        case 2: vrow_rows(w, y, x, m, 2, 4, n0, n1, beta); break;
        case 3: vrow_rows(w, y, x, m, 3, 2, n0, n1, beta); break;
        case 4: vrow_rows(w, y, x, m, 4, 2, n0, n1, beta); break;
        case 5: vrow_rows(w, y, x, m, 5, 1, n0, n1, beta); break;
        case 6: vrow_rows(w, y, x, m, 6, 1, n0, n1, beta); break;
        case 7: vrow_rows(w, y, x, m, 7, 1, n0, n1, beta); break;
        default: vrow_rows(w, y, x, m, 8, 1, n0, n1, beta); break;
        }
    }
}

/* rp_q8_quantize_x_group(.., RP_Q8ROW_XGROUP) on 16 lanes: the same IEEE
 * operations per element as cpu_qprep_vnni (so the same bytes), q in k
 * order, and -128 sum(q) per group (vrow_block's start). */
void cpu_qprep_vnnirow(int8_t *xq, int32_t *xc, float *xg, const float *x, int K) {
    const __m512 lim = _mm512_set1_ps(127.0f);
    for (int g = 0; g * VG < K; g++) {
        const int k0 = g * VG, nv = (K - k0 < VG ? K - k0 : VG) / 16;
        __m512 xv[VG / 16];
        __m512 amax = _mm512_setzero_ps();
        for (int i = 0; i < nv; i++) {
            xv[i] = _mm512_loadu_ps(x + k0 + 16 * i);
            amax = _mm512_max_ps(_mm512_abs_ps(xv[i]), amax);
        }
        const float scale = _mm512_reduce_max_ps(amax) / 127.0f;
        xg[g] = scale;
        const __m512 sv = _mm512_set1_ps(scale);
        __m512i sum = _mm512_setzero_si512();
        for (int i = 0; i < nv; i++) {
            __m128i q = _mm_setzero_si128();
            if (scale > 0.0f) {
                const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(xv[i], sv),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m512i c = _mm512_cvtps_epi32(
                    _mm512_min_ps(_mm512_max_ps(r, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim));
                sum = _mm512_add_epi32(sum, c);
                q = _mm512_cvtepi32_epi8(c);
            }
            _mm_storeu_si128((__m128i *)(xq + k0 + 16 * i), q);
        }
        xc[g] = -128 * _mm512_reduce_add_epi32(sum);
    }
}

RP_ISA_END

#endif /* __x86_64__ */
