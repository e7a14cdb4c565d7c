/* The f32 decode kernel: y = x . W^T (W [N,K]) for decode rows, register
 * blocked like a GEMM micro-kernel and exact per row. W is read once, 32
 * output rows (a panel) at a time, transposed into a per-thread buffer
 * (pk[k][j] = W[n + j][k]); then every block of up to 12 x rows runs an
 * outer product over it: x[m][k] broadcast times the panel's k-th 32
 * weights, one accumulator vector per (row, 16 outputs), k ascending. Each
 * y[m, n] is thus one fused multiply-add chain over k = 0..K-1 from zero
 * whatever the number of rows, the block a row falls in, the panel or the
 * thread split, so a decode row's bits equal its bits alone. At 30-64 rows
 * (AVX-512) the lanes kernel computes the same chains with the rows in the
 * vector lanes instead (x transposed once, no W pack). Run-time ISA
 * choice (cpu_features.c): AVX-512, AVX2 + FMA, portable C; the x86 paths
 * and a portable build with FMA give the same bits (one fma per step). */
#include "config.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu/cpu_features.h"
#include "cpu/cpu_internal.h"
#include "cpu/cpu_matmul_decode.h"

#define PANEL CPU_DECODE_PANEL
#define AI inline __attribute__((always_inline))

/* ---- portable C ---- */

/* pk[k * PANEL + j] = W row j, column k for j < nw; zero for the rest (so
 * the kernels always run whole panels and store only nw columns). */
static void pack_generic(float *restrict pk, const float *restrict w, int nw, int K) {
    for (int j = nw; j < PANEL; j++)
        for (int k = 0; k < K; k++) pk[(size_t)k * PANEL + j] = 0.0f;
    for (int j = 0; j < nw; j++) {
        const float *restrict wr = w + (size_t)j * K;
        for (int k = 0; k < K; k++) pk[(size_t)k * PANEL + j] = wr[k];
    }
}

static AI void store_row(float *restrict ym, const float *restrict acc, int nw, float beta) {
    for (int j = 0; j < nw; j++) ym[j] = beta == 0.0f ? acc[j] : acc[j] + beta * ym[j];
}

/* y rows [0, M), columns [0, nw) of one panel (y at the panel's column). */
static void panel_generic(float *y, const float *x, const float *pk, int M, int K, int nw,
                          int N, float beta, const float *wnext) {
    (void)wnext;
    for (int m = 0; m < M; m++) {
        float acc[PANEL] = {0};
        const float *restrict xm = x + (size_t)m * K;
        for (int k = 0; k < K; k++) {
            const float xk = xm[k];
            const float *restrict pr = pk + (size_t)k * PANEL;
            for (int j = 0; j < PANEL; j++) acc[j] = cpu_fmaf(xk, pr[j], acc[j]);
        }
        store_row(y + (size_t)m * N, acc, nw, beta);
    }
}

typedef void (*pack_fn)(float *pk, const float *w, int nw, int K);
/* wnext: the next panel's W rows (32 x K floats from there, or fewer at the
 * end), which a kernel may prefetch while it computes; NULL for none. */
typedef void (*panel_fn)(float *y, const float *x, const float *pk, int M, int K, int nw, int N,
                         float beta, const float *wnext);
typedef void (*direct_fn)(float *y, const float *x, const float *w, int M, int K, int nw, int N,
                          float beta);

#if defined(__x86_64__)
#include <immintrin.h>

#include "cpu/cpu_qmatmul_kern.h" /* RP_ISA_BEGIN / RP_ISA_END */

/* How far ahead the kernels prefetch each W row they read, in floats (512
 * bytes), into L1: a panel's rows are 32 streams, more than the hardware
 * prefetcher keeps ahead. Measured at batch 1, W from DRAM, one core: none
 * +25-60% time, 512 B into L1 = the old dot-product kernel, 2 KiB or into
 * L2 +30-100%. */
#define DECODE_PF 128
#define DECODE_PF_HINT 0

/* ... and a second prefetch per W row and 16-k block, one 16-row group
 * ahead (the group after this one, the next panel's first after a panel's
 * last; past the matrix's end it is harmless), into L2 (prefetcht1): the
 * hardware prefetcher and the 512-byte lead restart at every group of 16
 * short streams (K = 768: 48 lines a row), so the first lines of each group
 * missed to DRAM. Measured on the loaded 2-core Zen 5, thread CPU time,
 * min of reps, alternated with the kernel without it: batch 1 65536 x 768
 * 15.3-15.9 -> 9.9-10.9 ms, 768 x 768 154-177 -> 97-117 us, 3072 x 768
 * 659-691 -> 387-458 us, 768 x 3072 503-506 -> 375-410 us; into L1
 * (prefetcht0) it was 1.25x slower than without. The pack (3+ rows) takes
 * the same lead: 16 rows 3072 x 768 1.35-1.48 -> 1.17-1.45 ms, 64 rows
 * 3.45-3.49 -> 3.22-3.35 ms (768 x 3072: within the noise). */
#define DECODE_AHEAD_HINT 2

/* ================= AVX2 + FMA: 8 lanes, blocks of 6 rows x 16 outputs ===== */
RP_ISA_BEGIN("avx2,fma")

static AI void rows_avx2(float *y, const float *x, const float *pk, const int R, int K, int nw,
                         int N, float beta) {
    for (int h = 0; h < PANEL; h += 16) {
        __m256 a0[6], a1[6];
        for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_ps();
        for (int k = 0; k < K; k++) {
            const __m256 w0 = _mm256_loadu_ps(pk + (size_t)k * PANEL + h);
            const __m256 w1 = _mm256_loadu_ps(pk + (size_t)k * PANEL + h + 8);
            for (int r = 0; r < R; r++) {
                const __m256 xb = _mm256_broadcast_ss(x + (size_t)r * K + k);
                a0[r] = _mm256_fmadd_ps(xb, w0, a0[r]);
                a1[r] = _mm256_fmadd_ps(xb, w1, a1[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            float acc[16];
            _mm256_storeu_ps(acc, a0[r]);
            _mm256_storeu_ps(acc + 8, a1[r]);
            const int cols = nw - h < 16 ? nw - h : 16;
            if (cols > 0) store_row(y + (size_t)r * N + h, acc, cols, beta);
        }
    }
}

static void panel_avx2(float *y, const float *x, const float *pk, int M, int K, int nw, int N,
                       float beta, const float *wnext) {
    (void)wnext;
    for (int m = 0; m < M; m += 6) {
        float *ym = y + (size_t)m * N;
        const float *xm = x + (size_t)m * K;
        switch (M - m) {
        case 1: rows_avx2(ym, xm, pk, 1, K, nw, N, beta); break;
        case 2: rows_avx2(ym, xm, pk, 2, K, nw, N, beta); break;
        case 3: rows_avx2(ym, xm, pk, 3, K, nw, N, beta); break;
        case 4: rows_avx2(ym, xm, pk, 4, K, nw, N, beta); break;
        case 5: rows_avx2(ym, xm, pk, 5, K, nw, N, beta); break;
        default: rows_avx2(ym, xm, pk, 6, K, nw, N, beta); break;
        }
    }
}

static void pack_avx2(float *pk, const float *w, int nw, int K) { pack_generic(pk, w, nw, K); }

RP_ISA_END

/* ================= AVX-512: blocks of 12 rows x 32 outputs ================= */
RP_ISA_BEGIN("avx2,fma,avx512f")

/* A 16 x 16 block transposed in place: in-lane unpacks of floats, then of
 * float pairs, then two rounds of 128-bit lane shuffles (64 cheap shuffles;
 * vpermt2ps rounds were ~3x slower on Zen 5 and made batch 1 pack-bound). */
static AI void transpose16(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
#define PD(v) _mm512_castps_pd(v)
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(PD(t[4 * i]), PD(t[4 * i + 2])));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(PD(t[4 * i]), PD(t[4 * i + 2])));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(PD(t[4 * i + 1]), PD(t[4 * i + 3])));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(PD(t[4 * i + 1]), PD(t[4 * i + 3])));
    }
#undef PD
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

static void pack_avx512(float *restrict pk, const float *restrict w, int nw, int K) {
    const int K16 = K / 16 * 16;
    for (int g = 0; g < PANEL; g += 16) {
        const float *wg = w + (size_t)g * K;
        for (int k = 0; k < K16; k += 16) {
            __m512 v[16];
            for (int j = 0; j < 16; j++) {
                if (g + j < nw) {
                    __builtin_prefetch(wg + (size_t)j * K + k + DECODE_PF, 0, DECODE_PF_HINT);
                    __builtin_prefetch(wg + (size_t)(16 + j) * K + k, 0, DECODE_AHEAD_HINT);
                    v[j] = _mm512_loadu_ps(wg + (size_t)j * K + k);
                } else {
                    v[j] = _mm512_setzero_ps();
                }
            }
            transpose16(v);
            for (int t = 0; t < 16; t++) _mm512_storeu_ps(pk + (size_t)(k + t) * PANEL + g, v[t]);
        }
        for (int k = K16; k < K; k++)
            for (int j = 0; j < 16; j++)
                pk[(size_t)k * PANEL + g + j] = g + j < nw ? wg[(size_t)j * K + k] : 0.0f;
    }
}

static AI void rows_avx512(float *y, const float *x, const float *pk, const int R, int K,
                           int nw, int N, float beta, const float *wnext) {
    __m512 a0[12], a1[12];
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        if (wnext) { /* 2 of the next panel's 2K lines per k: all of it */
            __builtin_prefetch(wnext + (size_t)k * PANEL, 0, DECODE_AHEAD_HINT);
            __builtin_prefetch(wnext + (size_t)k * PANEL + 16, 0, DECODE_AHEAD_HINT);
        }
        const __m512 w0 = _mm512_loadu_ps(pk + (size_t)k * PANEL);
        const __m512 w1 = _mm512_loadu_ps(pk + (size_t)k * PANEL + 16);
        for (int r = 0; r < R; r++) {
            const __m512 xb = _mm512_set1_ps(x[(size_t)r * K + k]);
            a0[r] = _mm512_fmadd_ps(xb, w0, a0[r]);
            a1[r] = _mm512_fmadd_ps(xb, w1, a1[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        float *yr = y + (size_t)r * N;
        if (nw == PANEL && beta == 0.0f) {
            _mm512_storeu_ps(yr, a0[r]);
            _mm512_storeu_ps(yr + 16, a1[r]);
        } else {
            float acc[PANEL];
            _mm512_storeu_ps(acc, a0[r]);
            _mm512_storeu_ps(acc + 16, a1[r]);
            store_row(yr, acc, nw, beta);
        }
    }
}

/* Few rows: the panel's 16 x 16 blocks are transposed in registers and used
 * at once (no pack buffer to write and read back), for rows [0, R). The
 * same fma chains as rows_avx512, so the same bits. */
static AI void direct_avx512(float *y, const float *x, const float *w, const int R, int K,
                             int nw, int N, float beta) {
    const int K16 = K / 16 * 16;
    __m512 acc[2][4];
    for (int g = 0; g < 2; g++)
        for (int r = 0; r < R; r++) acc[g][r] = _mm512_setzero_ps();
    /* One group of 16 W rows at a time: with both groups in flight, 32 rows
     * whose stride is a multiple of 4 KiB (K = 3072) shared L1 sets and the
     * prefetched lines were evicted before use (batch 1 +55% time). */
    for (int g = 0; g < 2; g++)
        for (int k = 0; k < K16; k += 16) {
            const float *wg = w + (size_t)g * 16 * K;
            __m512 v[16];
            for (int j = 0; j < 16; j++) {
                __builtin_prefetch(wg + (size_t)j * K + k + DECODE_PF, 0, DECODE_PF_HINT);
                __builtin_prefetch(wg + (size_t)(16 + j) * K + k, 0, DECODE_AHEAD_HINT);
                v[j] = g * 16 + j < nw ? _mm512_loadu_ps(wg + (size_t)j * K + k)
                                       : _mm512_setzero_ps();
            }
            transpose16(v);
            for (int t = 0; t < 16; t++)
                for (int r = 0; r < R; r++)
                    acc[g][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[(size_t)r * K + k + t]), v[t],
                                                acc[g][r]);
        }
    for (int k = K16; k < K; k++)
        for (int g = 0; g < 2; g++) {
            float col[16];
            for (int j = 0; j < 16; j++)
                col[j] = g * 16 + j < nw ? w[(size_t)(g * 16 + j) * K + k] : 0.0f;
            const __m512 v = _mm512_loadu_ps(col);
            for (int r = 0; r < R; r++)
                acc[g][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[(size_t)r * K + k]), v, acc[g][r]);
        }
    for (int r = 0; r < R; r++) {
        float out[PANEL];
        _mm512_storeu_ps(out, acc[0][r]);
        _mm512_storeu_ps(out + 16, acc[1][r]);
        store_row(y + (size_t)r * N, out, nw, beta);
    }
}

static void direct_rows_avx512(float *y, const float *x, const float *w, int M, int K, int nw,
                               int N, float beta) {
    for (int m = 0; m < M; m += 4) {
        float *ym = y + (size_t)m * N;
        const float *xm = x + (size_t)m * K;
        switch (M - m) {
        case 1: direct_avx512(ym, xm, w, 1, K, nw, N, beta); break;
        case 2: direct_avx512(ym, xm, w, 2, K, nw, N, beta); break;
        case 3: direct_avx512(ym, xm, w, 3, K, nw, N, beta); break;
        default: direct_avx512(ym, xm, w, 4, K, nw, N, beta); break;
        }
    }
}

/* ---- many rows: the rows in the vector lanes ----
 * From a few dozen rows the panel kernel's pack (W transposed, per 32
 * outputs, every call) is a large share of the time (perf of bench_engine:
 * 20% of the 16-sequence run, 8% of the 64-sequence run). Here x is
 * transposed instead, once per call (xt[k][m], M x K floats against N x K):
 * a vector holds 16 rows' x at one k, W[n][k] is broadcast straight from W
 * (row-major, read in order), and acc(16 rows, n) = fma(x(16 rows, k), W[n][k],
 * acc): for each y[m, n] the same fused multiply-add chain over k = 0..K-1
 * from zero as the panel kernel's, so the same bits. Tiles: RZ vectors of
 * rows (16 RZ rows) x NC outputs, RZ x NC = 24 accumulators, per k RZ loads
 * and NC broadcasts for 24 FMAs. Rows past M are zero lanes, computed and
 * dropped. */

/* Outputs per chunk: a chunk's W rows (24 x K) are read from memory once
 * per call; 24 is a multiple of every tile's NC (12, 8, 6). */
#define LANES_CHUNK 24

/* xt[k * mp + m] = x[m][k] for m < M, zero for m in [M, mp) (mp: M rounded up
 * to 16). */
static void transpose_x_avx512(float *restrict xt, const float *restrict x, int M, int mp,
                               int K) {
    const int K16 = K / 16 * 16;
    for (int m0 = 0; m0 < mp; m0 += 16) {
        for (int k = 0; k < K16; k += 16) {
            __m512 v[16];
            for (int j = 0; j < 16; j++)
                v[j] = m0 + j < M ? _mm512_loadu_ps(x + (size_t)(m0 + j) * K + k)
                                  : _mm512_setzero_ps();
            transpose16(v);
            for (int t = 0; t < 16; t++) _mm512_storeu_ps(xt + (size_t)(k + t) * mp + m0, v[t]);
        }
        for (int k = K16; k < K; k++)
            for (int j = 0; j < 16; j++)
                xt[(size_t)k * mp + m0 + j] = m0 + j < M ? x[(size_t)(m0 + j) * K + k] : 0.0f;
    }
}

/* Rows [0, 16 RZ) x outputs [0, NC) at w (W's row of the first output),
 * into `tile` (rows LANES_CHUNK floats apart, at the first output's
 * column). Outputs past nw read W's last row of the tile (in bounds) and
 * are dropped later. Each W line is prefetched into L1 DECODE_PF floats
 * ahead, and the line LANES_CHUNK rows further (the next chunk's) into L2
 * (past W's end it is harmless). Loaded-machine A/Bs of other leads (2 or
 * 4 chunks ahead, 256 B or 1 KiB, prefetcht0) were within the noise. */
static AI void lanes_avx512(float *tile, const float *xt, const float *w, const int RZ,
                            const int NC, int mp, int nw, int K) {
    __m512 acc[4][12];
    const float *wr[12];
    for (int c = 0; c < NC; c++) wr[c] = w + (size_t)(c < nw ? c : nw - 1) * K;
    for (int r = 0; r < RZ; r++)
        for (int c = 0; c < NC; c++) acc[r][c] = _mm512_setzero_ps();
    const float *xk = xt;
    for (int k = 0; k < K; k++, xk += mp) {
        if ((k & 15) == 0)
            for (int c = 0; c < NC; c++) {
                __builtin_prefetch(wr[c] + k + DECODE_PF, 0, DECODE_PF_HINT);
                __builtin_prefetch(w + (size_t)(LANES_CHUNK + c) * K + k, 0, DECODE_AHEAD_HINT);
            }
        __m512 xv[4];
        for (int r = 0; r < RZ; r++) xv[r] = _mm512_loadu_ps(xk + 16 * r);
        for (int c = 0; c < NC; c++) {
            const __m512 wb = _mm512_set1_ps(wr[c][k]);
            for (int r = 0; r < RZ; r++) acc[r][c] = _mm512_fmadd_ps(xv[r], wb, acc[r][c]);
        }
    }
    for (int r = 0; r < RZ; r++)
        for (int c = 0; c < NC; c++) {
            float out[16];
            _mm512_storeu_ps(out, acc[r][c]);
            for (int l = 0; l < 16; l++) tile[(16 * r + l) * LANES_CHUNK + c] = out[l];
        }
}

/* M rows (mp: M rounded up to 16, 32 to 64) x outputs [n0, n1), by chunks
 * of LANES_CHUNK outputs, each chunk's W read from memory once. */
static void lanes_rows_avx512(float *y, const float *x, const float *w, int M, int n0, int n1,
                              int N, int K, float beta, float *xt) {
    const int mp = (M + 15) / 16 * 16, rz = mp / 16, nc = 24 / rz;
    transpose_x_avx512(xt, x, M, mp, K);
    /* The chunk's sums, then copied to y a row at a time: written straight
     * to y, 16 rows N floats apart (N = 3072, 65536: a multiple of 4 KiB)
     * fell in one L1 set at every column (3072 x 768 at 64 rows ran at
     * 0.94x the panel kernel instead of 1.11x). */
    float tile[64 * LANES_CHUNK] __attribute__((aligned(64)));
    for (int n = n0; n < n1; n += LANES_CHUNK) {
        const int cw = n1 - n < LANES_CHUNK ? n1 - n : LANES_CHUNK;
        for (int c = 0; c < cw; c += nc) {
            const int nw = cw - c < nc ? cw - c : nc;
            const float *wc = w + (size_t)(n + c) * K;
            switch (rz) {
            case 2: lanes_avx512(tile + c, xt, wc, 2, 12, mp, nw, K); break;
            case 3: lanes_avx512(tile + c, xt, wc, 3, 8, mp, nw, K); break;
            default: lanes_avx512(tile + c, xt, wc, 4, 6, mp, nw, K); break;
            }
        }
        for (int m = 0; m < M; m++)
            store_row(y + (size_t)m * N + n, tile + m * LANES_CHUNK, cw, beta);
    }
}

/* The first row block also prefetches the next panel's W (contiguous: 32
 * rows of K) into L2, so its pack reads L2 while this panel computes
 * instead of stalling on DRAM between panels (a perf profile of 64-row
 * decode had pack_avx512 at 0.56x the time of panel_avx512). */
static void panel_avx512(float *y, const float *x, const float *pk, int M, int K, int nw,
                         int N, float beta, const float *wnext) {
    for (int m = 0; m < M; m += 12) {
        float *ym = y + (size_t)m * N;
        const float *xm = x + (size_t)m * K;
        const float *pf = m == 0 ? wnext : NULL;
        switch (M - m) {
        case 1: rows_avx512(ym, xm, pk, 1, K, nw, N, beta, pf); break;
        case 2: rows_avx512(ym, xm, pk, 2, K, nw, N, beta, pf); break;
        case 3: rows_avx512(ym, xm, pk, 3, K, nw, N, beta, pf); break;
        case 4: rows_avx512(ym, xm, pk, 4, K, nw, N, beta, pf); break;
        case 5: rows_avx512(ym, xm, pk, 5, K, nw, N, beta, pf); break;
        case 6: rows_avx512(ym, xm, pk, 6, K, nw, N, beta, pf); break;
        case 7: rows_avx512(ym, xm, pk, 7, K, nw, N, beta, pf); break;
        case 8: rows_avx512(ym, xm, pk, 8, K, nw, N, beta, pf); break;
        case 9: rows_avx512(ym, xm, pk, 9, K, nw, N, beta, pf); break;
        case 10: rows_avx512(ym, xm, pk, 10, K, nw, N, beta, pf); break;
        case 11: rows_avx512(ym, xm, pk, 11, K, nw, N, beta, pf); break;
        default: rows_avx512(ym, xm, pk, 12, K, nw, N, beta, pf); break;
        }
    }
}

RP_ISA_END
#endif /* __x86_64__ */

/* Up to this K the panel kernels prefetch the next panel's W: two panels
 * (2 x 32 x K floats) then stay within half of L2. Measured (loaded 2-core
 * Zen 5, thread CPU time, min of 3, alternated): 16 rows 3072 x 768
 * 1.16-1.28 -> 0.99-1.18 ms, 64 rows 3.25-3.32 -> 3.12-3.19 ms, 64 rows
 * 65536 x 768 72.6-73.2 -> 70.1-71.0 ms; at K = 3072 (768 KiB of panels)
 * 64 rows went 3.37-3.42 -> 3.43-3.52 ms, so it stops there. */
#define DECODE_NEXT_PANEL_MAX_K 2048

/* The kernels for the CPU's ISA (capped by RP_CPU_ISA), chosen once;
 * `direct` (W transposed in registers, no pack buffer) where the ISA has one. */
typedef void (*lanes_fn)(float *y, const float *x, const float *w, int M, int n0, int n1, int N,
                         int K, float beta, float *xt);
typedef struct {
    pack_fn pack;
    panel_fn panel;
    direct_fn direct;
    lanes_fn lanes; /* rows in the vector lanes (NULL: none for this ISA) */
} decode_kernels;

/* Up to this many rows the direct kernel runs (when there is one): at batch
 * 1 writing and re-reading the pack buffer cost ~25% (W from DRAM, one core,
 * Zen 5); from a few rows the pack is shared and the 12-row blocks win. */
#ifndef CPU_DECODE_DIRECT_MAX_ROWS
#define CPU_DECODE_DIRECT_MAX_ROWS 2
#endif

static decode_kernels chosen;
static int chosen_set;

static decode_kernels choose(void) {
    if (__atomic_load_n(&chosen_set, __ATOMIC_ACQUIRE)) return chosen;
    rp_cpu_isa isa;
    rp_error err = {0};
    if (rp_cpu_isa_from_env(&isa, &err) != RP_OK) isa = RP_CPU_ISA_GENERIC;
    decode_kernels k = {pack_generic, panel_generic, NULL, NULL};
#if defined(__x86_64__)
    if (isa >= RP_CPU_ISA_AVX512)
        k = (decode_kernels){pack_avx512, panel_avx512, direct_rows_avx512, lanes_rows_avx512};
    else if (isa >= RP_CPU_ISA_AVX2)
        k = (decode_kernels){pack_avx2, panel_avx2, NULL, NULL};
#endif
    /* Racing threads compute the same choice: any store wins. */
    chosen = k;
    __atomic_store_n(&chosen_set, 1, __ATOMIC_RELEASE);
    return k;
}

/* Whether the chosen kernels fuse (then the no-buffer path must too). */
static int chosen_fuses(const decode_kernels *k) {
#if defined(__FMA__) || defined(__aarch64__)
    (void)k;
    return 1;
#else
    return k->panel != panel_generic;
#endif
}

/* The floats of x transposed if M rows of K take the lanes kernel (where
 * the ISA has one), else 0. Rows are rounded up to 16 (mp, 32 to 64: one
 * tile of 2-4 vectors of rows); the padding lanes are computed and
 * dropped, so only rows that waste at most 1/16 of the lanes take it (one
 * core, thread CPU time, W from memory, the 0.1B shapes: 64 rows 1.03-1.18x
 * the panel kernel, 48 rows 1.05-1.26x, 32 rows 1.05-1.20x; 56 and 58 rows
 * (8 and 6 lanes of 64 idle) 0.91-1.12x, 24 rows 0.85-0.99x; one vector of
 * rows against 24 W rows (16 rows) 0.25-0.61x; 96-256 rows, by tiles of 64,
 * 0.95-1.06x: the panel kernel keeps those). x transposed must fit
 * CPU_DECODE_LANES_MAX_FLOATS: it is re-read for every 24 outputs, from L2. */
static size_t lanes_floats(int M, int K) {
    const size_t mp = ((size_t)M + 15) / 16 * 16;
    if (mp < 32 || mp > 64 || (mp - (size_t)M) * 16 > mp ||
        mp * (size_t)K > CPU_DECODE_LANES_MAX_FLOATS)
        return 0;
    return mp * (size_t)K;
}

size_t cpu_matmul_decode_pack_floats(int M, int K) {
    const size_t panel = (size_t)CPU_DECODE_PANEL * (size_t)K, lanes = lanes_floats(M, K);
    return lanes > panel ? lanes : panel;
}

void cpu_matmul_decode(float *y, const float *x, const float *w, int M, int n0, int n1, int N,
                       int K, float beta, float *pack, size_t pack_floats) {
    const decode_kernels kern = choose();
    const size_t lanes = kern.lanes && pack ? lanes_floats(M, K) : 0;
    if (lanes > 0 && lanes <= pack_floats) {
        kern.lanes(y, x, w, M, n0, n1, N, K, beta, pack);
        return;
    }
    if (kern.direct && (M <= CPU_DECODE_DIRECT_MAX_ROWS || !pack)) {
        for (int n = n0; n < n1; n += PANEL) {
            const int nw = n1 - n < PANEL ? n1 - n : PANEL;
            kern.direct(y + n, x, w + (size_t)n * K, M, K, nw, N, beta);
        }
        return;
    }
    if (!pack) { /* no buffer: the same chains, read from W directly */
        const int fused = chosen_fuses(&kern);
        for (int m = 0; m < M; m++)
            for (int n = n0; n < n1; n++) {
                const float *xm = x + (size_t)m * K, *wn = w + (size_t)n * K;
                float acc = 0.0f;
                for (int k = 0; k < K; k++)
                    acc = fused ? fmaf(xm[k], wn[k], acc) : xm[k] * wn[k] + acc;
                float *yi = y + (size_t)m * N + n;
                *yi = beta == 0.0f ? acc : acc + beta * *yi;
            }
        return;
    }
    for (int n = n0; n < n1; n += PANEL) {
        const int nw = n1 - n < PANEL ? n1 - n : PANEL;
        kern.pack(pack, w + (size_t)n * K, nw, K);
        const float *wnext =
            n + PANEL < n1 && K <= DECODE_NEXT_PANEL_MAX_K ? w + (size_t)(n + PANEL) * K : NULL;
        kern.panel(y + n, x, pack, M, K, nw, N, beta, wnext);
    }
}
