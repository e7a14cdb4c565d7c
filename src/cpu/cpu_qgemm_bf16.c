/* The prefill GEMM on bf16 and int8 weights (cpu_qgemm_bf16.h): y =
 * bf16(x) . W^T with vdpbf16ps, which multiplies 32 bf16 pairs into 16 f32
 * lanes per instruction (twice the multiply-adds of an f32 FMA). The widening path it
 * replaces for M > RP_QMATMUL_DECODE_ROWS (W to f32, then OpenBLAS sgemm)
 * runs at f32 FMA rate; this one reads W as bf16 and never widens it.
 *
 * Layout (BLIS-style): x is rounded to bf16 once per call and packed in
 * blocks of QGEMM_MR rows, each k pair (x[m][2p], x[m][2p+1]) one 32-bit
 * word, the QGEMM_MR words of a pair adjacent: the microkernel broadcasts a
 * word to all lanes. W is packed per thread in panels of QGEMM_NR rows by
 * QGEMM_KC columns, the words of a pair for QGEMM_NR consecutive n adjacent
 * (one vector load): the panel (24 KiB) stays in L1 while every row block
 * of x runs over it, and the x block (M x QGEMM_KC bf16) stays in L2 while
 * the thread's panels run. Threads split N, so each y element's summation
 * order (cpu_qgemm_bf16.h) is independent of the team. int8 W is packed the
 * same way (its q are exact in bf16) with its block scales beside. */
#include "config.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "cpu/cpu_qgemm_bf16.h"
#include "cpu/cpu_qmatmul_kern.h"

/* 8 x 48 tile: 24 accumulators + 3 W vectors + 1 broadcast of the 32 zmm
 * registers; per k pair 24 vdpbf16ps against 3 loads and 8 broadcasts. */
#define QGEMM_MR 8
#define QGEMM_NR 48
#define QGEMM_NV (QGEMM_NR / 16)
/* k per block (even): a packed W panel is QGEMM_KC * QGEMM_NR * 2 bytes. */
#define QGEMM_KC 256

static int round_up(int v, int to) { return (v + to - 1) / to * to; }

RP_ISA_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

/* Packs rows [m0, m0 + QGEMM_MR) of x (rows past M as zeros) into `a`
 * ([K2][QGEMM_MR] words, K2 = K rounded up to even / 2), each x rounded to
 * bf16 to nearest even (vcvtneps2bf16: as rp_f32_to_bf16 but for
 * denormals, which it flushes to zero and vdpbf16ps would read as zero). */
static void pack_x(uint32_t *a, const float *x, int M, int K, int m0, uint16_t *row) {
    const int K2 = (K + 1) / 2;
    for (int i = 0; i < QGEMM_MR; i++) {
        const int m = m0 + i;
        if (m >= M) {
            for (int p = 0; p < K2; p++) a[(size_t)p * QGEMM_MR + i] = 0;
            continue;
        }
        const float *xm = x + (size_t)m * K;
        for (int k = 0; k < K; k += 16) {
            const __mmask16 mk = K - k >= 16 ? (__mmask16)0xffff
                                             : (__mmask16)((1u << (K - k)) - 1);
            const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, xm + k));
            _mm256_storeu_si256((__m256i *)(row + k), (__m256i)h);
        }
        row[K] = 0; /* odd K: the last pair's upper half */
        for (int p = 0; p < K2; p++) {
            uint32_t word;
            memcpy(&word, row + 2 * p, sizeof word);
            a[(size_t)p * QGEMM_MR + i] = word;
        }
    }
}

/* out[c] = column c of the 16 x 16 words r[0..15] (r[i] word c): two
 * rounds of in-lane interleaves, then the 4 x 4 transpose of 128-bit lanes. */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int k = 0; k < 8; k++) {
        a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    /* b[4k + c] lane L: word 4L + c of rows 4k..4k+3 */
    for (int k = 0; k < 4; k++) {
        b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
        b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
        b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
        b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i u0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
        const __m512i u1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
        const __m512i u2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
        const __m512i u3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(u0, u2, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(u1, u3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
    }
}

/* Packs W rows [n0, n0 + nv) (nv <= QGEMM_NR; the rest zeros), k pairs
 * [p0, p0 + np), into b [np][QGEMM_NR] words: 16 x 16 word blocks by
 * transpose (a scalar copy costs a load and a store per word, a third of
 * the GEMM's time at M = 64), the edges and odd K's last k word by word. */
static void pack_w(uint32_t *b, const uint16_t *w, int K, int n0, int nv, int p0, int np) {
    if (nv < QGEMM_NR) memset(b, 0, (size_t)np * QGEMM_NR * sizeof *b);
    const int full = K / 2 - p0 < np ? K / 2 - p0 : np; /* pairs with both halves in W */
    const int jv = nv / 16 * 16, pv = full / 16 * 16;
    for (int j0 = 0; j0 < jv; j0 += 16)
        for (int p = 0; p < pv; p += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = _mm512_loadu_si512(
                    (const void *)(w + (size_t)(n0 + j0 + i) * K + 2 * (size_t)(p0 + p)));
            transpose16(r);
            for (int c = 0; c < 16; c++)
                _mm512_store_si512((void *)(b + (size_t)(p + c) * QGEMM_NR + j0), r[c]);
        }
    for (int j = 0; j < nv; j++) {
        const uint16_t *wr = w + (size_t)(n0 + j) * K + 2 * (size_t)p0;
        for (int p = j < jv ? pv : 0; p < full; p++) {
            uint32_t word;
            memcpy(&word, wr + 2 * p, sizeof word);
            b[(size_t)p * QGEMM_NR + j] = word;
        }
        if (full < np) b[(size_t)full * QGEMM_NR + j] = wr[2 * full]; /* odd K's last k */
    }
}

/* Rows [0, mv) x columns [0, nv) of a tile's accumulators c into y (at the
 * tile's corner, row stride ldy): y = c (+ beta y) on the first K block,
 * y += c on the others. Inlined so c stays in registers. */
static inline __attribute__((always_inline)) void store_tile(float *y, int ldy,
                                                             __m512 c[][QGEMM_NV], int mv,
                                                             int nv, int first, float beta) {
    const __m512 betav = _mm512_set1_ps(beta);
    for (int v = 0; v < QGEMM_NV; v++) {
        const int left = nv - 16 * v;
        if (left <= 0) break;
        const __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        for (int i = 0; i < mv; i++) {
            float *yi = y + (size_t)i * ldy + 16 * v;
            __m512 r = c[i][v];
            if (!first)
                r = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, yi), r);
            else if (beta != 0.0f)
                r = _mm512_fmadd_ps(betav, _mm512_maskz_loadu_ps(mk, yi), r);
            _mm512_mask_storeu_ps(yi, mk, r);
        }
    }
}

/* y rows [0, mv) x columns [0, nv) of the tile (y at its corner, row stride
 * ldy) from np k pairs of packed a and b: y = acc (+ beta y) on the first K
 * block, y += acc on the others. */
static void kernel_8x48(const uint32_t *a, const uint32_t *b, int np, float *y, int ldy, int mv,
                        int nv, int first, float beta) {
    __m512 c[QGEMM_MR][QGEMM_NV];
    for (int i = 0; i < QGEMM_MR; i++)
        for (int v = 0; v < QGEMM_NV; v++) c[i][v] = _mm512_setzero_ps();
    for (int p = 0; p < np; p++) {
        __m512bh bv[QGEMM_NV];
        for (int v = 0; v < QGEMM_NV; v++)
            bv[v] = (__m512bh)_mm512_load_si512((const void *)(b + (size_t)p * QGEMM_NR + 16 * v));
        for (int i = 0; i < QGEMM_MR; i++) {
            const __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[(size_t)p * QGEMM_MR + i]);
            for (int v = 0; v < QGEMM_NV; v++) c[i][v] = _mm512_dpbf16_ps(c[i][v], av, bv[v]);
        }
    }
    store_tile(y, ldy, c, mv, nv, first, beta);
}

/* Q8 (int8 blocks of RP_Q8_BLOCK k, fp16 scale each; Q8ROW: each block
 * takes its row's f32 scale, the same tile): q in [-127, 127] is
 * exact in bf16, so W is packed as pack_w packs bf16, from q, and the
 * scales apart: sw [np / 16][QGEMM_NR] floats, one per block and output
 * (zeros past nv). K is a multiple of 32, so np is a multiple of 16 pairs. */
static void pack_w_q8(uint32_t *b, float *sw, const rp_qmatrix *w, int n0, int nv, int p0,
                      int np) {
    const int K = w->K, nb = K / RP_Q8_BLOCK;
    const int8_t *q = (const int8_t *)w->data;
    if (nv < QGEMM_NR) {
        memset(b, 0, (size_t)np * QGEMM_NR * sizeof *b);
        memset(sw, 0, (size_t)(np / 16) * QGEMM_NR * sizeof *sw);
    }
    for (int j = 0; j < nv; j++)
        for (int bl = 0; bl < np / 16; bl++)
            sw[bl * QGEMM_NR + j] =
                w->type == RP_QTYPE_Q8ROW ? w->row_scales[n0 + j]
                                          : _cvtsh_ss(w->scales[(size_t)(n0 + j) * nb + p0 / 16 + bl]);
    const int jv = nv / 16 * 16;
    for (int j0 = 0; j0 < jv; j0 += 16) {
        if (w->packed && (n0 + j0) % RP_Q8ROW_PACK_ROWS == 0) {
            /* 16 rows of Q8ROW's packed form: a chunk is already 16 rows x 4
             * k, so each k pair comes out by shifts, no transpose; bf16 of
             * an integer |q| <= 127 is its f32's high half (exact) */
            const __m512i flip = _mm512_set1_epi8((char)0x80), hi = _mm512_set1_epi32((int)0xffff0000u);
            for (int p = 0; p < np; p += 16)
                for (int u = 0; u < 8; u++) {
                    const __m512i v = _mm512_xor_si512(
                        _mm512_loadu_si512(w->packed + rp_q8row_pos(K, n0 + j0, 2 * (p0 + p) + 4 * u)),
                        flip);
                    __m512i e[4];
                    for (int i = 0; i < 4; i++)
                        e[i] = _mm512_castps_si512(_mm512_cvtepi32_ps(
                            _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * i), 24)));
                    for (int h = 0; h < 2; h++)
                        _mm512_store_si512((void *)(b + (size_t)(p + 2 * u + h) * QGEMM_NR + j0),
                                           _mm512_or_si512(_mm512_srli_epi32(e[2 * h], 16),
                                                           _mm512_and_si512(e[2 * h + 1], hi)));
                }
            continue;
        }
        for (int p = 0; p < np; p += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                __m128i q0, q1;
                if (w->packed) {
                    /* Q8ROW's packed form: the row's 32 k are 8 4-byte lanes, 64 bytes apart */
                    const int *src = (const int *)(const void *)(
                        w->packed + rp_q8row_pos(K, n0 + j0 + i, 2 * (p0 + p)));
                    const __m256i g = _mm256_xor_si256(
                        _mm256_i32gather_epi32(src, _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112), 4),
                        _mm256_set1_epi8((char)0x80));
                    q0 = _mm256_castsi256_si128(g);
                    q1 = _mm256_extracti128_si256(g, 1);
                } else {
                    const int8_t *src = q + (size_t)(n0 + j0 + i) * K + 2 * (size_t)(p0 + p);
                    q0 = _mm_loadu_si128((const __m128i *)src);
                    q1 = _mm_loadu_si128((const __m128i *)(src + 16));
                }
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
                r[i] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo); /* exact: |q| <= 127 */
            }
            transpose16(r);
            for (int c = 0; c < 16; c++)
                _mm512_store_si512((void *)(b + (size_t)(p + c) * QGEMM_NR + j0), r[c]);
        }
    }
    for (int j = jv; j < nv; j++) {
        const int8_t *src = w->packed ? NULL : q + (size_t)(n0 + j) * K + 2 * (size_t)p0;
        for (int p = 0; p < np; p++) {
            const int k = 2 * (p0 + p);
            const int8_t q_lo = src ? src[2 * p] : (int8_t)(w->packed[rp_q8row_pos(K, n0 + j, k)] ^ 0x80);
            const int8_t q_hi =
                src ? src[2 * p + 1] : (int8_t)(w->packed[rp_q8row_pos(K, n0 + j, k + 1)] ^ 0x80);
            const uint32_t lo = rp_f32_to_bf16((float)q_lo);
            const uint32_t hi = rp_f32_to_bf16((float)q_hi);
            b[(size_t)p * QGEMM_NR + j] = lo | hi << 16;
        }
    }
}

/* The Q8 tile, 4 rows x 48 (rows i0.. of an 8-row block of a): per block of
 * 16 k pairs, a dot product from zero, then times the block's scale into
 * the running sum (one FMA): 12 + 12 accumulators, 3 W vectors, 1 broadcast.
 * Stored as kernel_8x48 stores. */
static void kernel_q8_4x48(const uint32_t *a, int i0, const uint32_t *b, const float *sw, int np,
                           float *y, int ldy, int mv, int nv, int first, float beta) {
    __m512 c[4][QGEMM_NV];
    for (int i = 0; i < 4; i++)
        for (int v = 0; v < QGEMM_NV; v++) c[i][v] = _mm512_setzero_ps();
    for (int bl = 0; bl < np / 16; bl++) {
        __m512 d[4][QGEMM_NV];
        for (int i = 0; i < 4; i++)
            for (int v = 0; v < QGEMM_NV; v++) d[i][v] = _mm512_setzero_ps();
        for (int p = 16 * bl; p < 16 * bl + 16; p++) {
            __m512bh bv[QGEMM_NV];
            for (int v = 0; v < QGEMM_NV; v++)
                bv[v] = (__m512bh)_mm512_load_si512(
                    (const void *)(b + (size_t)p * QGEMM_NR + 16 * v));
            for (int i = 0; i < 4; i++) {
                const __m512bh av =
                    (__m512bh)_mm512_set1_epi32((int)a[(size_t)p * QGEMM_MR + i0 + i]);
                for (int v = 0; v < QGEMM_NV; v++) d[i][v] = _mm512_dpbf16_ps(d[i][v], av, bv[v]);
            }
        }
        for (int v = 0; v < QGEMM_NV; v++) {
            const __m512 s = _mm512_load_ps(sw + bl * QGEMM_NR + 16 * v);
            for (int i = 0; i < 4; i++) c[i][v] = _mm512_fmadd_ps(d[i][v], s, c[i][v]);
        }
    }
    store_tile(y, ldy, c, mv, nv, first, beta);
}

/* One thread's share: row blocks [rb0, rb1) of x packed into `a`, then
 * (after the team's barrier) W rows [n0, n1) through panels in `bbuf`. */
static void gemm_part(const rp_qmatrix *w, float *y, const float *x, int M, float beta,
                      uint32_t *a, uint32_t *bbuf, float *sw, uint16_t *row, int rb0, int rb1,
                      int n0, int n1) {
    const int N = w->N, K = w->K, K2 = (K + 1) / 2;
    for (int rb = rb0; rb < rb1; rb++)
        pack_x(a + (size_t)rb * K2 * QGEMM_MR, x, M, K, rb * QGEMM_MR, row);
#pragma omp barrier
    const int KC2 = QGEMM_KC / 2;
    for (int p0 = 0; p0 < K2; p0 += KC2) {
        const int np = K2 - p0 < KC2 ? K2 - p0 : KC2;
        for (int n = n0; n < n1; n += QGEMM_NR) {
            const int nv = n1 - n < QGEMM_NR ? n1 - n : QGEMM_NR;
            const int q8 = w->type == RP_QTYPE_Q8 || w->type == RP_QTYPE_Q8ROW;
            if (q8) pack_w_q8(bbuf, sw, w, n, nv, p0, np);
            else pack_w(bbuf, (const uint16_t *)w->data, K, n, nv, p0, np);
            for (int m = 0; m < M; m += QGEMM_MR) {
                const uint32_t *ap = a + ((size_t)(m / QGEMM_MR) * K2 + p0) * QGEMM_MR;
                const int mv = M - m < QGEMM_MR ? M - m : QGEMM_MR;
                float *ym = y + (size_t)m * N + n;
                if (!q8) {
                    kernel_8x48(ap, bbuf, np, ym, N, mv, nv, p0 == 0, beta);
                    continue;
                }
                kernel_q8_4x48(ap, 0, bbuf, sw, np, ym, N, mv < 4 ? mv : 4, nv, p0 == 0, beta);
                if (mv > 4)
                    kernel_q8_4x48(ap, 4, bbuf, sw, np, ym + (size_t)4 * N, N, mv - 4, nv,
                                   p0 == 0, beta);
            }
        }
    }
}

RP_ISA_END

static void slice(int total, int part, int parts, int align, int *begin, int *end) {
    int chunk = (total + parts - 1) / parts;
    chunk = round_up(chunk, align);
    const long b = (long)chunk * part, e = b + chunk;
    *begin = b < total ? (int)b : total;
    *end = e < total ? (int)e : total;
}

int cpu_qgemm_bf16(const rp_qmatrix *w, float *y, const float *x, int M, float beta,
                   int n_threads) {
    const int N = w->N, K = w->K, K2 = (K + 1) / 2;
    const int blocks = (M + QGEMM_MR - 1) / QGEMM_MR;
    int nt = n_threads < 1 ? 1 : n_threads;
    const int panels = (N + QGEMM_NR - 1) / QGEMM_NR;
    if (nt > panels) nt = panels;
    const size_t a_bytes = (size_t)blocks * K2 * QGEMM_MR * sizeof(uint32_t);
    const size_t b_bytes = (size_t)(QGEMM_KC / 2) * QGEMM_NR * sizeof(uint32_t);
    const size_t row_bytes = (size_t)round_up(K + 32, 32) * sizeof(uint16_t);
    const size_t sw_bytes = (size_t)(QGEMM_KC / 32) * QGEMM_NR * sizeof(float);
    uint32_t *a = aligned_alloc(64, (a_bytes + 63) / 64 * 64);
    char *per_thread = aligned_alloc(64, (size_t)nt * (b_bytes + sw_bytes + row_bytes));
    if (!a || !per_thread) {
        free(a);
        free(per_thread);
        return -1;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int parts = omp_get_num_threads(), part = omp_get_thread_num();
        char *mine = per_thread + (size_t)part * (b_bytes + sw_bytes + row_bytes);
        int rb0, rb1, n0, n1;
        slice(blocks, part, parts, 1, &rb0, &rb1);
        slice(N, part, parts, QGEMM_NR, &n0, &n1);
        gemm_part(w, y, x, M, beta, a, (uint32_t *)mine, (float *)(mine + b_bytes),
                  (uint16_t *)(mine + b_bytes + sw_bytes), rb0, rb1, n0, n1);
    }
    free(a);
    free(per_thread);
    return 0;
}

#endif
