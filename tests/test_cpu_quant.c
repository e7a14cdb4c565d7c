/* The quantized matmul (src/cpu/cpu_qmatmul*.c, issue 20): every kernel this
 * CPU runs against the double reference with the format's rounding (and the
 * kernel's own rounding of x), K off the vector width, beta 0 and 1, M = 1-9,
 * 64 and 512 (prefill tiles); bits independent of thread count and of how
 * many rows share a call; run-time dispatch and RP_CPU_ISA. */
#include "config.h"

#include <cblas.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "core/dtype.h"
#include "cpu/cpu_features.h"
#include "cpu/cpu_internal.h"
#include "cpu/cpu_qmatmul_kern.h"
#include "cpu/cpu_quant.h"
#include "model/config.h"
#include "model/model.h"

typedef struct {
    rp_qmatrix w;
    void *data;
    uint16_t *scales;
    uint8_t *packed; /* Q8ROW: the kernels' packed form of data (w.packed) */
    float *wf; /* the f32 matrix it was quantized from [N,K] */
} qmat;

static float frand(unsigned long long *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*s >> 40) & 0xffffff) / (float)0x1000000 * 2.0f - 1.0f;
}

/* Random W [N,K] with magnitudes varying by row and block (so Q8 scales differ). */
static void qmat_make(qmat *q, rp_qtype type, int N, int K, unsigned long long seed) {
    q->wf = malloc((size_t)N * K * sizeof(float));
    assert_non_null(q->wf);
    for (size_t i = 0; i < (size_t)N * K; i++)
        q->wf[i] = frand(&seed) * (0.05f + (float)((i / 32) % 7));
    q->data = malloc(rp_qmatrix_data_bytes(type, N, K) + 1);
    q->scales = malloc(rp_qmatrix_scale_bytes(type, N, K) + 4);
    assert_non_null(q->data);
    assert_non_null(q->scales);
    rp_quantize_matrix(type, q->data, q->scales, q->wf, N, K, 0);
    q->w = rp_qmatrix_make(type, N, K, q->data, q->scales);
    q->packed = NULL;
    if (type == RP_QTYPE_Q8ROW) {
        /* as the backend holds it: the packed form (every reader takes it first) */
        q->packed = malloc(rp_q8row_packed_bytes(N, K));
        assert_non_null(q->packed);
        rp_q8row_pack_rows(q->packed, q->data, 0, N, N, K);
        q->w.packed = q->packed;
    }
}

static void qmat_free(qmat *q) {
    free(q->packed);
    free(q->wf);
    free(q->data);
    free(q->scales);
}

static float *frand_array(size_t n, unsigned long long seed) {
    float *a = malloc(n * sizeof *a + 4);
    assert_non_null(a);
    for (size_t i = 0; i < n; i++) a[i] = frand(&seed);
    return a;
}

/* The bound for a kernel against its reference: each y element is a sum in
 * f32 of at most K/8 + 16 rounded terms per lane and tree level (8 lanes for
 * AVX2, 16 for the others, a pairwise tree), so its error is at most
 * (K/8 + 16) * 2^-24 * sum_k |w_k| |x_k| (the sum of |terms|, from the
 * dequantized W and the kernel's rounded x), plus 2^-24 |y| for beta = 1. */
static double bound_scale(int K) {
    return (K / 8 + 16) * ldexp(1.0, -24);
}

/* Checks kernel k on W [N,K] of `type`, x [M,K], beta, n_threads: every
 * element within the bound of rp_qmatmul_ref_kernel. */
static double worst_ratio; /* largest error / bound seen, printed per kernel */

static void check_kernel(rp_qkernel k, rp_qtype type, int N, int K, int M, float beta,
                         int n_threads) {
    qmat q;
    qmat_make(&q, type, N, K, 7 + (unsigned)(N * 31 + K));
    float *x = frand_array((size_t)M * K, 99 + (unsigned)M);
    float *y = frand_array((size_t)M * N, 5), *yref = malloc((size_t)M * N * sizeof(float));
    float *y0 = malloc((size_t)M * N * sizeof(float));
    float *row = malloc((size_t)K * sizeof(float) + 4);
    assert_non_null(yref);
    assert_non_null(y0);
    assert_non_null(row);
    memcpy(y0, y, (size_t)M * N * sizeof(float));
    memcpy(yref, y, (size_t)M * N * sizeof(float));
    rp_cpu_qmatmul_kernel(NULL, k, &q.w, y, x, M, beta, n_threads);
    /* Prefill (M > 8) widens W for sgemm with x as it is, except bf16dot's
     * and vnni's bf16 GEMM (x rounded to bf16; tests/test_cpu_qgemm_bf16.c). */
    rp_qkernel kref = k;
    if (M > RP_QMATMUL_DECODE_ROWS)
        kref = k == RP_QKERNEL_BF16DOT ||
                       (k == RP_QKERNEL_VNNI && rp_cpu_isa_supported(RP_CPU_ISA_AVX512BF16))
                   ? RP_QKERNEL_BF16DOT
                   : RP_QKERNEL_GENERIC;
    rp_qmatmul_ref_kernel(kref, &q.w, yref, x, M, beta);
    double worst = 0.0;
    for (int n = 0; n < N; n++) {
        rp_qmatrix_row_f32(&q.w, n, row);
        for (int m = 0; m < M; m++) {
            double mag = 0.0;
            /* |x| bounds the rounded x within a factor 1 + 2^-8 (bf16) or
             * 1 + 1/254 (int8 blocks): 1.01 covers both. */
            for (int kk = 0; kk < K; kk++) mag += fabs((double)row[kk] * x[(size_t)m * K + kk]);
            const size_t i = (size_t)m * N + n;
            const double tol = bound_scale(K) * 1.01 * mag +
                               (beta != 0.0f ? ldexp(fabs(y0[i]) + fabs(yref[i]), -24) : 0.0) +
                               1e-30;
            const double err = fabs((double)y[i] - (double)yref[i]);
            if (err / tol > worst) worst = err / tol;
            if (!(err <= tol))
                fail_msg("kernel %s %s N=%d K=%d M=%d beta=%g threads=%d: y[%d,%d]=%.9g, "
                         "reference %.9g, error %.3g > bound %.3g",
                         rp_qkernel_name(k), rp_qtype_name(type), N, K, M, beta, n_threads, m,
                         n, y[i], yref[i], err, tol);
        }
    }
    if (M <= RP_QMATMUL_DECODE_ROWS && worst > worst_ratio) worst_ratio = worst; /* the kernel itself */
    free(row);
    free(y0);
    free(yref);
    free(y);
    free(x);
    qmat_free(&q);
}

static int n_available(rp_qtype type) {
    int n = 0;
    for (int k = 0; k < RP_QKERNEL_COUNT; k++) n += rp_qkernel_available((rp_qkernel)k, type);
    return n;
}

static void check_all_kernels(rp_qtype type, const int *Ks, int nK) {
    static const int Ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 64, 512};
    for (int k = 0; k < RP_QKERNEL_COUNT; k++) {
        if (!rp_qkernel_available((rp_qkernel)k, type)) {
            print_message("  %s: kernel %s not for this format or CPU: not tested\n",
                          rp_qtype_name(type), rp_qkernel_name((rp_qkernel)k));
            continue;
        }
        worst_ratio = 0.0;
        for (int ki = 0; ki < nK; ki++)
            for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++)
                for (int beta = 0; beta <= 1; beta++) {
                    /* N = 37: tiles of 4 and 2 rows plus single rows. */
                    const int N = Ms[mi] >= 64 ? 45 : 37;
                    check_kernel((rp_qkernel)k, type, N, Ks[ki], Ms[mi], (float)beta, 1);
                }
        print_message("  %s kernel %s: decode rows: worst error %.3g of the bound\n", rp_qtype_name(type),
                      rp_qkernel_name((rp_qkernel)k), worst_ratio);
    }
}

static void test_bf16_kernels_match_reference(void **state) {
    (void)state;
    /* 777 and 15: not a multiple of 8, 16 or 32 (masked tails); 33: one
     * full bf16 dot step plus one element. */
    static const int Ks[] = {768, 777, 15, 33};
    assert_true(n_available(RP_QTYPE_BF16) >= 1);
    check_all_kernels(RP_QTYPE_BF16, Ks, 4);
}

static void test_q8_kernels_match_reference(void **state) {
    (void)state;
    /* Q8 needs K % 32 == 0; 96, 32, 64 and 544 end on a VNNI group of 3,
     * 1, 2 and 1 blocks (masked); 544 also has more than 16 blocks (the
     * one-row tile's second batch of scale products). */
    static const int Ks[] = {768, 96, 32, 64, 544};
    check_all_kernels(RP_QTYPE_Q8, Ks, 5);
}

static void test_q8row_kernels_match_reference(void **state) {
    (void)state;
    /* Q8ROW: K % 32 == 0; 96, 32, 64 and 544 end on an x group of 96, 32,
     * 64 and 32 k (masked); 3072 is the 0.1B FFN's input. */
    static const int Ks[] = {768, 96, 32, 64, 544, 3072};
    check_all_kernels(RP_QTYPE_Q8ROW, Ks, 6);
}

/* Every kernel gives the same bits per row however many rows share the call
 * (M = 1 vs 8) and on 1 or 2 threads; prefill the same bits on 1 and 2
 * threads, with W widened whole (M = 64: one thread runs the sgemm; M = 512:
 * rows split) and in tiles (a W over 64 MiB as f32: 16400 x 1024, 9 tiles).
 * K = 16384 and 16512: the last K whose x groups int8row's one-row kernel
 * keeps in its table, and the first that falls back to the many-row tile. */
static void test_thread_and_row_count_independence(void **state) {
    (void)state;
    static const int cases[][3] = {{4200, 1024, 8}, {4200, 1024, 64}, {4200, 1024, 512},
                                   {16400, 1024, 9}, {21, 16384, 8}, {21, 16512, 8}}; /* N, K, M */
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int t = RP_QTYPE_BF16; t <= RP_QTYPE_Q8ROW; t++) {
            const int N = cases[c][0], K = cases[c][1], M = cases[c][2];
            const rp_qtype type = (rp_qtype)t;
            qmat q;
            qmat_make(&q, type, N, K, 3);
            float *x = frand_array((size_t)M * K, 11);
            float *y1 = calloc((size_t)M * N, sizeof(float));
            float *y2 = calloc((size_t)M * N, sizeof(float));
            assert_non_null(y1);
            assert_non_null(y2);
            for (int k = 0; k < RP_QKERNEL_COUNT; k++) {
                if (!rp_qkernel_available((rp_qkernel)k, type)) continue;
                /* prefill runs the same sgemm whatever the kernel (two suffice)
                 * but bf16dot's and vnni's bf16 GEMM */
                if (M > RP_QMATMUL_DECODE_ROWS && k > RP_QKERNEL_AVX2 && k != RP_QKERNEL_BF16DOT &&
                    k != RP_QKERNEL_VNNI)
                    continue;
                rp_cpu_qmatmul_kernel(NULL, (rp_qkernel)k, &q.w, y1, x, M, 0.0f, 1);
                rp_cpu_qmatmul_kernel(NULL, (rp_qkernel)k, &q.w, y2, x, M, 0.0f, 2);
                if (memcmp(y1, y2, (size_t)M * N * sizeof(float)))
                    fail_msg("%s kernel %s N=%d K=%d M=%d: 1 and 2 threads differ",
                             rp_qtype_name(type), rp_qkernel_name((rp_qkernel)k), N, K, M);
                for (int m = 0; M == 8 && m < M; m++) {
                    rp_cpu_qmatmul_kernel(NULL, (rp_qkernel)k, &q.w, y2, x + (size_t)m * K, 1, 0.0f,
                                          2);
                    if (memcmp(y1 + (size_t)m * N, y2, (size_t)N * sizeof(float)))
                        fail_msg("%s kernel %s: row %d alone differs from row %d of 8",
                                 rp_qtype_name(type), rp_qkernel_name((rp_qkernel)k), m, m);
                }
            }
            free(y1);
            free(y2);
            free(x);
            qmat_free(&q);
        }
}

/* Decode rows (rp_cpu_qmatmul_kernel_decode): M = 9..64 rows run the
 * streaming kernel 8 rows at a time inside tiles of W, so every row has the
 * bits it gets alone on one thread, on 1, 2 or 3 threads, for every kernel
 * (the prefill path, widened W + sgemm, does not give them). */
static void test_decode_rows_of_any_count_equal_each_row_alone(void **state) {
    (void)state;
    /* K = 576: 18 blocks, a last VNNI group of 2 after the one-row tile's
     * first 16 scale products */
    static const int cases[][2] = {{300, 256}, {1040, 96}, {60, 576}}; /* N, K */
    const int MAXM = 64;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int t = RP_QTYPE_BF16; t <= RP_QTYPE_Q8ROW; t++) {
            const int N = cases[c][0], K = cases[c][1];
            const rp_qtype type = (rp_qtype)t;
            qmat q;
            qmat_make(&q, type, N, K, 5);
            float *x = frand_array((size_t)MAXM * K, 17);
            float *y0 = frand_array((size_t)MAXM * N, 23);
            float *alone = malloc((size_t)MAXM * N * sizeof(float));
            float *y = malloc((size_t)MAXM * N * sizeof(float));
            assert_non_null(alone);
            assert_non_null(y);
            for (int k = 0; k < RP_QKERNEL_COUNT; k++) {
                if (!rp_qkernel_available((rp_qkernel)k, type)) continue;
                for (int beta_i = 0; beta_i < 2; beta_i++) {
                    const float beta = (float)beta_i;
                    memcpy(alone, y0, (size_t)MAXM * N * sizeof(float));
                    for (int m = 0; m < MAXM; m++)
                        rp_cpu_qmatmul_kernel(NULL, (rp_qkernel)k, &q.w, alone + (size_t)m * N,
                                              x + (size_t)m * K, 1, beta, 1);
                    for (int M = 9; M <= MAXM; M += M < 20 ? 1 : 11)
                        for (int nt = 1; nt <= 3; nt++) {
                            memcpy(y, y0, (size_t)MAXM * N * sizeof(float));
                            rp_cpu_qmatmul_kernel_decode(NULL, (rp_qkernel)k, &q.w, y, x, M, beta,
                                                         nt);
                            for (size_t i = 0; i < (size_t)M * N; i++)
                                if (memcmp(&y[i], &alone[i], sizeof(float)))
                                    fail_msg("%s kernel %s decode rows M=%d N=%d K=%d beta=%g "
                                             "threads=%d: y[%zu] = %.9g, alone %.9g",
                                             rp_qtype_name(type),
                                             rp_qkernel_name((rp_qkernel)k), M, N, K, beta, nt,
                                             i, y[i], alone[i]);
                        }
                }
            }
            free(alone);
            free(y);
            free(y0);
            free(x);
            qmat_free(&q);
        }
}

/* The vnni kernel's vector quantization of x (cpu_qprep_vnni) gives the
 * bytes and scales of the scalar rp_q8_quantize_x, in the kernel's order
 * (cpu_qvnni_pos; 7 blocks: a whole group and a last one of 3): random
 * rows, a zero block, ties at .5 (round to even), a denormal block and a
 * lone large value (everything else rounds to 0). */
static void test_vnni_x_quantization_matches_scalar(void **state) {
    (void)state;
#if RP_CPU_QKERN_X86
    if (!rp_qkernel_available(RP_QKERNEL_VNNI, RP_QTYPE_Q8)) skip();
    enum { K = 7 * RP_Q8_BLOCK };
    float *x = frand_array(K, 29);
    for (int i = 0; i < 32; i++) x[32 + i] = 0.0f;
    for (int i = 0; i < 32; i++) x[64 + i] = (float)(i % 2 ? -i : i) + (i < 31 ? 0.5f : 0.0f);
    x[64 + 31] = -127.0f;                                 /* scale 1: the others are ties */
    for (int i = 0; i < 32; i++) x[96 + i] = 1e-40f * (float)(i - 16);  /* denormals */
    x[128] = 1e30f;
    int8_t xq[K];
    float scales[K / RP_Q8_BLOCK];
    uint8_t xu[K];
    float xse[K / 8], xs[K / RP_Q8_BLOCK];
    rp_q8_quantize_x(xq, scales, x, K);
    memset(xu, 0, sizeof xu);
    cpu_qprep_vnni(xu, xse, xs, x, K);
    unsigned char seen[K] = {0};
    for (int i = 0; i < K; i++) {
        const size_t p = cpu_qvnni_pos(K, i);
        assert_true(p < K && !seen[p]); /* a permutation of [0, K) */
        seen[p] = 1;
        if (xu[p] != (uint8_t)(xq[i] + 128))
            fail_msg("x[%d] = %.9g: vector q %d, scalar %d", i, x[i], xu[p] - 128, xq[i]);
    }
    for (int i = 0; i < K / 8; i++)
        if (memcmp(&xse[i], &scales[i / 4], sizeof(float)))
            fail_msg("block %d: vector scale %.9g, scalar %.9g", i / 4, xse[i], scales[i / 4]);
    if (memcmp(xs, scales, sizeof xs)) fail_msg("the per-block scales differ");
    free(x);
#else
    skip();
#endif
}

/* vnni on Q8ROW gives each output exactly its documented order (cpu_quant.h,
 * rp_qmatmul_ref_q8row): acc = fmaf((float)dot_g, xscale_g, acc) over the
 * 128-k groups in k order, then acc * wscale, + beta y: bit for bit, for 1
 * to 8 rows (each row-count's tile), N not a multiple of 16 (the packed
 * form's padding), last groups of 32-96 k, 1 and 2 threads. */
static void test_vnnirow_exact_order(void **state) {
    (void)state;
    if (!rp_qkernel_available(RP_QKERNEL_VNNI, RP_QTYPE_Q8ROW)) skip();
    static const int cases[][2] = {{37, 768}, {50, 96}, {16, 32}, {33, 544}, {70, 3072}}; /* N, K */
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int N = cases[c][0], K = cases[c][1], ng = (K + RP_Q8ROW_XGROUP - 1) / RP_Q8ROW_XGROUP;
        qmat q;
        qmat_make(&q, RP_QTYPE_Q8ROW, N, K, 41 + (unsigned)c);
        float *x = frand_array((size_t)8 * K, 43);
        float *y0 = frand_array((size_t)8 * N, 47);
        float *y = malloc((size_t)8 * N * sizeof(float));
        int8_t *xq = malloc((size_t)K);
        float *xs = malloc((size_t)ng * sizeof(float));
        assert_non_null(y);
        assert_non_null(xq);
        assert_non_null(xs);
        for (int M = 1; M <= 8; M++)
            for (int beta_i = 0; beta_i < 2; beta_i++)
                for (int nt = 1; nt <= 2; nt++) {
                    memcpy(y, y0, (size_t)8 * N * sizeof(float));
                    rp_cpu_qmatmul_kernel_decode(NULL, RP_QKERNEL_VNNI, &q.w, y, x, M,
                                                 (float)beta_i, nt);
                    for (int m = 0; m < M; m++) {
                        rp_q8_quantize_x_group(xq, xs, x + (size_t)m * K, K, RP_Q8ROW_XGROUP);
                        for (int n = 0; n < N; n++) {
                            const int8_t *wr = (const int8_t *)q.data + (size_t)n * K;
                            float acc = 0.0f;
                            for (int g = 0; g < ng; g++) {
                                int32_t d = 0;
                                for (int k = g * RP_Q8ROW_XGROUP; k < K && k < (g + 1) * RP_Q8ROW_XGROUP; k++)
                                    d += (int32_t)wr[k] * xq[k];
                                acc = fmaf((float)d, xs[g], acc);
                            }
                            acc *= q.w.row_scales[n];
                            const size_t i = (size_t)m * N + n;
                            if (beta_i) acc = acc + y0[i];
                            if (memcmp(&acc, &y[i], sizeof acc))
                                fail_msg("N=%d K=%d M=%d beta=%d threads=%d: y[%d,%d] = %.9g, "
                                         "the documented order %.9g",
                                         N, K, M, beta_i, nt, m, n, y[i], acc);
                        }
                    }
                }
        free(xs);
        free(xq);
        free(y);
        free(y0);
        free(x);
        qmat_free(&q);
    }
}

/* The same for Q8ROW's x (cpu_qprep_vnnirow against rp_q8_quantize_x_group
 * with 128-k groups): K = 224, a whole group and a last one of 96, the
 * same special values (a lone 1e30 zeroes the rest of the second group). */
static void test_vnnirow_x_quantization_matches_scalar(void **state) {
    (void)state;
#if RP_CPU_QKERN_X86
    if (!rp_qkernel_available(RP_QKERNEL_VNNI, RP_QTYPE_Q8ROW)) skip();
    enum { K = 7 * RP_Q8_BLOCK, G = 2 };
    float *x = frand_array(K, 31);
    for (int i = 0; i < 32; i++) x[32 + i] = 0.0f;
    for (int i = 0; i < 32; i++) x[64 + i] = (float)(i % 2 ? -i : i) + (i < 31 ? 0.5f : 0.0f);
    x[64 + 31] = -127.0f;
    for (int i = 0; i < 32; i++) x[96 + i] = 1e-40f * (float)(i - 16);
    x[160] = 1e30f;
    int8_t xq[K], xv[K];
    float scales[G], xg[G];
    int32_t xc[G];
    rp_q8_quantize_x_group(xq, scales, x, K, RP_Q8ROW_XGROUP);
    cpu_qprep_vnnirow(xv, xc, xg, x, K);
    for (int i = 0; i < K; i++)
        if (xv[i] != xq[i]) fail_msg("x[%d] = %.9g: vector q %d, scalar %d", i, x[i], xv[i], xq[i]);
    if (memcmp(xg, scales, sizeof xg)) fail_msg("the per-group scales differ");
    for (int g = 0; g < G; g++) {
        int32_t sum = 0;
        for (int i = g * RP_Q8ROW_XGROUP; i < K && i < (g + 1) * RP_Q8ROW_XGROUP; i++) sum += xq[i];
        if (xc[g] != -128 * sum) fail_msg("group %d: -128 sum(q) %d, scalar %d", g, xc[g], -128 * sum);
    }
    free(x);
#else
    skip();
#endif
}

/* The decode kernels' reduction of their 16-lane accumulators (a
 * transposing tree over up to 16 at once, cpu_qhsum_avx512) adds in
 * _mm512_reduce_add_ps's order (GCC's: lane l + lane l + 8, + l + 4,
 * + l + 2, + l + 1), written out here in scalar f32: the order every
 * int8 and bf16 decode output has had, so the bits stay those of the
 * earlier kernels. Values of mixed sign and magnitude (2^-20 to 2^20), so
 * another order gives other bits; n = 1-40 (the tree's padding and its
 * blocks of 16). */
static float reduce16_model(const float *a) {
    float t3[8], t6[4];
    for (int i = 0; i < 8; i++) t3[i] = a[i + 8] + a[i];
    for (int i = 0; i < 4; i++) t6[i] = t3[i + 4] + t3[i];
    return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}

static void test_kernel_reduction_order(void **state) {
    (void)state;
#if RP_CPU_QKERN_X86
    if (!rp_qkernel_available(RP_QKERNEL_AVX512, RP_QTYPE_BF16)) skip();
    enum { NMAX = 40 };
    float *v = frand_array(16 * NMAX, 51), *mag = frand_array(16 * NMAX, 53);
    for (int i = 0; i < 16 * NMAX; i++) v[i] = ldexpf(v[i], (int)(mag[i] * 20.0f));
    int differ = 0; /* how many sums another order (sequential) would change */
    for (int n = 1; n <= NMAX; n++) {
        float sums[NMAX];
        cpu_qhsum_avx512(sums, v, n);
        for (int i = 0; i < n; i++) {
            const float want = reduce16_model(v + 16 * i);
            if (memcmp(&sums[i], &want, sizeof want))
                fail_msg("n %d, vector %d: tree %.9g, reduce order %.9g", n, i, sums[i], want);
            float seq = 0.0f;
            for (int l = 0; l < 16; l++) seq += v[16 * i + l];
            differ += n == NMAX && seq != want;
        }
    }
    assert_true(differ > NMAX / 4); /* the data can tell orders apart */
    free(v);
    free(mag);
#else
    skip();
#endif
}

/* bf16dot's vector rounding of x (cpu_qprep_bf16dot) gives rp_f32_to_bf16's
 * bits: random values, ties (even and odd kept bit), the largest finite
 * values (round to inf), infinities, NaNs with small payloads, denormals,
 * and a tail off the 16 lanes. */
static void test_bf16dot_x_rounding_matches_scalar(void **state) {
    (void)state;
#if RP_CPU_QKERN_X86
    if (!rp_qkernel_available(RP_QKERNEL_BF16DOT, RP_QTYPE_BF16)) skip();
    enum { n = 16 * 9 + 5 };
    static const uint32_t special[] = {0x3F808000u, 0x3F818000u, 0x3F80FFFFu, 0x7F7FFFFFu,
                                       0xFF7FFFFFu, 0x7F800000u, 0xFF800000u, 0x7F800001u,
                                       0xFFC00001u, 0x7FBFFFFFu, 0x00000001u, 0x807FFFFFu,
                                       0x00008000u, 0x00018000u, 0x80000000u, 0x00000000u};
    float *x = frand_array(n, 43);
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) {
        memcpy(&x[i], &special[i], sizeof(float));
        memcpy(&x[n - 1 - i], &special[i], sizeof(float)); /* also in the scalar tail */
    }
    uint16_t xb[n];
    cpu_qprep_bf16dot(xb, x, n);
    for (int i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        if (xb[i] != rp_f32_to_bf16(x[i]))
            fail_msg("x[%d] bits 0x%08x: vector 0x%04x, scalar 0x%04x", i, u, xb[i],
                     rp_f32_to_bf16(x[i]));
    }
    free(x);
#else
    skip();
#endif
}

/* rp_cpu_qmatmul_decode_group (a quantized gemv_group in one parallel
 * region) gives each job the bits of its own rp_cpu_qmatmul_decode call on
 * one thread: mixed formats and shapes (N off the 16-row slices, N smaller
 * than a team's slices), beta 0 and 1, M = 1, 3, 8 and 20 decode rows, 1-3
 * threads. The first job is large enough (1.07M multiply-adds per row) that
 * even M = 1 crosses cpu_qmatmul.c's decode threshold (2^20) and is split. */
static void test_decode_group_equals_each_job(void **state) {
    (void)state;
    static const int shapes[][3] = {{RP_QTYPE_Q8, 1044, 1024}, {RP_QTYPE_BF16, 64, 256},
                                    {RP_QTYPE_BF16, 300, 40}, {RP_QTYPE_Q8, 16, 96},
                                    {RP_QTYPE_BF16, 7, 256}, {RP_QTYPE_Q8ROW, 200, 544},
                                    {RP_QTYPE_Q8ROW, 1044, 1024}};
    enum { J = 7, MAXM = 20, MAXN = 1044, MAXK = 1024 };
    qmat q[J];
    rp_qgroup_job jobs[J];
    float *x = frand_array((size_t)MAXM * MAXK, 31);
    float *y0 = frand_array((size_t)J * MAXM * MAXN, 37);
    float *alone = malloc((size_t)J * MAXM * MAXN * sizeof(float));
    float *y = malloc((size_t)J * MAXM * MAXN * sizeof(float));
    assert_non_null(alone);
    assert_non_null(y);
    for (int j = 0; j < J; j++)
        qmat_make(&q[j], (rp_qtype)shapes[j][0], shapes[j][1], shapes[j][2], 41 + j);
    static const int Ms[] = {1, 3, 8, 20};
    /* One workspace for every group call, as the backend keeps one: it
     * grows with M and is reused (the lone calls prepare x per call). */
    rp_cpu_qx_workspace ws = {0};
    for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++)
        for (int nt = 1; nt <= 3; nt++) {
            const int M = Ms[mi];
            memcpy(alone, y0, (size_t)J * MAXM * MAXN * sizeof(float));
            memcpy(y, y0, (size_t)J * MAXM * MAXN * sizeof(float));
            for (int j = 0; j < J; j++) {
                const size_t off = (size_t)j * MAXM * MAXN;
                const float beta = (float)(j % 2);
                rp_cpu_qmatmul_decode(NULL, &q[j].w, alone + off, x, M, beta, 1);
                jobs[j] = (rp_qgroup_job){&q[j].w, y + off, x, beta};
            }
            rp_cpu_qmatmul_decode_group(&ws, jobs, J, M, nt);
            for (size_t i = 0; i < (size_t)J * MAXM * MAXN; i++)
                if (memcmp(&y[i], &alone[i], sizeof(float)))
                    fail_msg("group M=%d threads=%d: job %zu y[%zu] = %.9g, alone %.9g", M, nt,
                             i / (MAXM * MAXN), i % (MAXM * MAXN), y[i], alone[i]);
        }
    rp_cpu_qx_workspace_free(&ws);
    for (int j = 0; j < J; j++) qmat_free(&q[j]);
    free(alone);
    free(y);
    free(y0);
    free(x);
}

/* The CPU backend's gemv_chain on two quantized matrices (the decode FFN:
 * key with relu^2, then value reading it with beta 1, in one parallel
 * region: rp_cpu_qmatmul_decode_chain) gives both outputs the bits of
 * gemv_group one job at a time on a 1-thread backend: int8, int8row, bf16
 * and mixed pairs, M = 1, 3, 8 and 20 decode rows, backends of 1-3 threads. F = 1056
 * is 8 whole vnni groups of 128 k and one of 1 block (int8row's x: 8 groups
 * of 128 and one of 32; the x of the second
 * product is prepared by column slices: a slice must start on a group), and
 * 2 x 541k multiply-adds per row cross the 2^20 threshold, so M = 1 splits. */
static void chain_keys(rp_backend *be, const float *wk, const float *wv, rp_weights_type tk,
                       rp_weights_type tv, int C, int F) {
    rp_error err = {0};
    assert_int_equal(be->qweight_create(be, wk, tk, F, C, &err), RP_OK);
    be->qweight_write(be, wk, 0, F, wk, 1, NULL);
    assert_int_equal(be->qweight_create(be, wv, tv, C, F, &err), RP_OK);
    be->qweight_write(be, wv, 0, C, wv, 1, NULL);
}

static void test_decode_chain_equals_each_job(void **state) {
    (void)state;
    enum { C = 512, F = 1056, MAXM = 20 };
    static const rp_weights_type pairs[][2] = {{RP_WEIGHTS_INT8, RP_WEIGHTS_INT8},
                                               {RP_WEIGHTS_BF16, RP_WEIGHTS_BF16},
                                               {RP_WEIGHTS_INT8, RP_WEIGHTS_BF16},
                                               {RP_WEIGHTS_BF16, RP_WEIGHTS_INT8},
                                               {RP_WEIGHTS_INT8ROW, RP_WEIGHTS_INT8ROW},
                                               {RP_WEIGHTS_INT8ROW, RP_WEIGHTS_INT8},
                                               {RP_WEIGHTS_BF16, RP_WEIGHTS_INT8ROW}};
    static const int Ms[] = {1, 3, 8, 20};
    rp_error err = {0};
    float *wk = frand_array((size_t)F * C, 51), *wv = frand_array((size_t)C * F, 53);
    for (size_t i = 0; i < (size_t)F * C; i++) wk[i] *= 0.1f; /* hidden of a few units */
    float *x = frand_array((size_t)MAXM * C, 55), *res = frand_array((size_t)MAXM * C, 57);
    float *h_ref = malloc((size_t)MAXM * F * sizeof(float)), *h = malloc((size_t)MAXM * F * sizeof(float));
    float *y_ref = malloc((size_t)MAXM * C * sizeof(float)), *y = malloc((size_t)MAXM * C * sizeof(float));
    assert_true(h_ref && h && y_ref && y);
    for (size_t p = 0; p < sizeof pairs / sizeof pairs[0]; p++) {
        rp_backend *one = rp_cpu_backend_create(1, &err);
        assert_non_null(one);
        chain_keys(one, wk, wv, pairs[p][0], pairs[p][1], C, F);
        one->set_decode_rows(one, 1);
        for (int nt = 1; nt <= 3; nt++) {
            rp_backend *be = rp_cpu_backend_create(nt, &err);
            assert_non_null(be);
            chain_keys(be, wk, wv, pairs[p][0], pairs[p][1], C, F);
            be->set_decode_rows(be, 1);
            for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++) {
                const int M = Ms[mi];
                rp_gemv_job ref[2] = {{h_ref, x, wk, NULL, F, C, 0, 0.0f, RP_ACT_RELU_SQUARED},
                                      {y_ref, h_ref, wv, NULL, C, F, 0, 1.0f, RP_ACT_NONE}};
                rp_gemv_job jobs[2] = {{h, x, wk, NULL, F, C, 0, 0.0f, RP_ACT_RELU_SQUARED},
                                       {y, h, wv, NULL, C, F, 0, 1.0f, RP_ACT_NONE}};
                memcpy(y_ref, res, (size_t)M * C * sizeof(float));
                memcpy(y, res, (size_t)M * C * sizeof(float));
                one->gemv_group(one, &ref[0], 1, M);
                one->gemv_group(one, &ref[1], 1, M);
                assert_non_null(be->gemv_chain);
                be->gemv_chain(be, jobs, 2, M);
                assert_int_equal(be->status(be, &err), RP_OK);
                int zeros = 0;
                for (size_t i = 0; i < (size_t)M * F; i++) {
                    zeros += h_ref[i] == 0.0f;
                    if (memcmp(&h[i], &h_ref[i], sizeof(float)))
                        fail_msg("pair %zu threads=%d M=%d: hidden[%zu] = %.9g, one by one %.9g",
                                 p, nt, M, i, h[i], h_ref[i]);
                }
                assert_true(zeros > M * F / 4); /* relu^2 did cut the negative half */
                for (size_t i = 0; i < (size_t)M * C; i++)
                    if (memcmp(&y[i], &y_ref[i], sizeof(float)))
                        fail_msg("pair %zu threads=%d M=%d: y[%zu] = %.9g, one by one %.9g", p,
                                 nt, M, i, y[i], y_ref[i]);
            }
            be->destroy(be);
        }
        one->destroy(one);
    }
    free(wk);
    free(wv);
    free(x);
    free(res);
    free(h_ref);
    free(h);
    free(y_ref);
    free(y);
}

/* How a bf16/int8 model stores its LoRA factors (src/model/model.c,
 * lora_storage): transposed [N,K]; an int8 model in int8 blocks along K
 * where K is a whole number of them (a decay rank of 48: w1 [C,48] is
 * stored [48,C], int8; w2 [48,C] is stored [C,48], bf16), a bf16 model in
 * bf16; the big matrices in the model's format. */
static rp_qtype stored_type(rp_backend *be, const float *key, int N, int K) {
    const rp_qmatrix *q = cpu_qweight_find(be, key);
    assert_non_null(q);
    assert_int_equal(q->N, N);
    assert_int_equal(q->K, K);
    return q->type;
}

static void test_lora_factor_storage(void **state) {
    (void)state;
    rp_error err = {0};
    rp_config cfg;
    assert_int_equal(rp_config_builtin(&cfg, "tiny", 0, &err), RP_OK);
    cfg.d_decay = 48;
    const int C = cfg.n_embd;
    rp_backend *be = rp_cpu_backend_create(1, &err);
    assert_non_null(be);
    for (int t = RP_WEIGHTS_BF16; t <= RP_WEIGHTS_INT8ROW; t++) {
        rp_model m;
        assert_int_equal(rp_model_alloc_weights(&m, &cfg, 0, cfg.n_layer, 1, 1,
                                                (rp_weights_type)t, be, &err),
                         RP_OK);
        const rp_layer_weights *w = &m.layers[1];
        /* an int8/int8row model's factors in its own int8 format */
        const rp_qtype big = t == RP_WEIGHTS_BF16 ? RP_QTYPE_BF16 : (rp_qtype)t;
        assert_int_equal(stored_type(be, w->ffn_key, cfg.dim_ffn, C), big);
        assert_int_equal(stored_type(be, w->w1, 48, C), big);
        assert_int_equal(stored_type(be, w->w2, C, 48), RP_QTYPE_BF16);
        assert_int_equal(stored_type(be, w->a1, cfg.d_iclr, C), big);
        assert_int_equal(stored_type(be, w->a2, C, cfg.d_iclr), big);
        assert_int_equal(stored_type(be, w->g2, C, cfg.d_gate), big);
        rp_model_free(&m);
    }
    be->destroy(be);
}

static void test_isa_env(void **state) {
    (void)state;
    rp_error err = {0};
    const rp_cpu_isa best = rp_cpu_isa_detect();
    unsetenv("RP_CPU_ISA");
    assert_int_equal(rp_cpu_qmatmul_check_env(&err), RP_OK);
    print_message("  this CPU: %s; chosen kernels: bf16 %s, int8 %s\n", rp_cpu_isa_name(best),
                  rp_qkernel_name(rp_qkernel_chosen(RP_QTYPE_BF16)),
                  rp_qkernel_name(rp_qkernel_chosen(RP_QTYPE_Q8)));
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2"))
        assert_true(best >= RP_CPU_ISA_AVX512);
    if (__builtin_cpu_supports("avx512vnni") && best >= RP_CPU_ISA_AVX512) {
        assert_int_equal(rp_qkernel_chosen(RP_QTYPE_Q8), RP_QKERNEL_VNNI);
        assert_int_equal(rp_qkernel_chosen(RP_QTYPE_Q8ROW), RP_QKERNEL_VNNI);
    }
    if (rp_cpu_isa_supported(RP_CPU_ISA_AVX512BF16))
        assert_int_equal(rp_qkernel_chosen(RP_QTYPE_BF16), RP_QKERNEL_BF16DOT);
#endif

    setenv("RP_CPU_ISA", "avx9", 1);
    assert_int_equal(rp_cpu_qmatmul_check_env(&err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "'avx9'"));
    assert_non_null(strstr(err.msg, RP_CPU_ISA_CHOICES));
    /* a bad value runs the portable kernel, never a guess */
    assert_int_equal(rp_qkernel_chosen(RP_QTYPE_BF16), RP_QKERNEL_GENERIC);

    for (int i = RP_CPU_ISA_GENERIC; i <= RP_CPU_ISA_AVX512VNNI; i++) {
        setenv("RP_CPU_ISA", rp_cpu_isa_name((rp_cpu_isa)i), 1);
        rp_status st = rp_cpu_qmatmul_check_env(&err);
        if (!rp_cpu_isa_supported((rp_cpu_isa)i)) {
            assert_int_equal(st, RP_ERR_ARG);
            assert_non_null(strstr(err.msg, "does not have it"));
            continue;
        }
        assert_int_equal(st, RP_OK);
        for (int t = RP_QTYPE_BF16; t <= RP_QTYPE_Q8ROW; t++) {
            const rp_qkernel k = rp_qkernel_chosen((rp_qtype)t);
            assert_true(rp_qkernel_available(k, (rp_qtype)t));
            if (i == RP_CPU_ISA_GENERIC) assert_int_equal(k, RP_QKERNEL_GENERIC);
            if (i == RP_CPU_ISA_AVX2) assert_true(k <= RP_QKERNEL_AVX2);
            if (i == RP_CPU_ISA_AVX512) assert_true(k <= RP_QKERNEL_AVX512);
        }
    }

    /* Forced generic: rp_cpu_qmatmul itself runs it and agrees with the
     * reference (and with the best kernel within both bounds). */
    setenv("RP_CPU_ISA", "generic", 1);
    assert_int_equal(rp_cpu_qmatmul_check_env(&err), RP_OK);
    const int N = 40, K = 256, M = 3;
    for (int t = RP_QTYPE_BF16; t <= RP_QTYPE_Q8ROW; t++) {
        qmat q;
        qmat_make(&q, (rp_qtype)t, N, K, 17);
        float *x = frand_array((size_t)M * K, 4);
        float y[M * N], yg[M * N], yr[M * N];
        rp_cpu_qmatmul(NULL, &q.w, y, x, M, 0.0f, 1);
        rp_cpu_qmatmul_kernel(NULL, RP_QKERNEL_GENERIC, &q.w, yg, x, M, 0.0f, 1);
        rp_qmatmul_ref(&q.w, yr, x, M, 0.0f);
        assert_memory_equal(y, yg, sizeof y);
        for (int i = 0; i < M * N; i++) assert_true(fabsf(y[i] - yr[i]) <= 1e-4f * (1.0f + fabsf(yr[i])));
        free(x);
        qmat_free(&q);
    }
    unsetenv("RP_CPU_ISA");
    assert_int_equal(rp_cpu_qmatmul_check_env(&err), RP_OK);
}

/* A bf16/int8 model's LoRA factors (W [K,N], rp_tensor_lora_lowp) are bf16
 * backend matrices stored transposed ([N,K]): the CPU backend's matmul_lora
 * runs them through the quantized kernel, the bits of rp_cpu_qmatmul on the
 * same bf16 rows, for decode (M <= 8) and prefill rows; an f32 W [K,N]
 * still goes to the f32 op. */
static void test_matmul_lora_on_bf16_factor(void **state) {
    (void)state;
    rp_error err = {0};
    rp_backend *be = rp_cpu_backend_create(2, &err);
    assert_non_null(be);
    const int K = 768, N = 64; /* a decay LoRA's down factor at C = 768 */
    float *w = frand_array((size_t)K * N, 11), *wt = malloc((size_t)N * K * sizeof(float));
    assert_non_null(wt);
    for (int k = 0; k < K; k++)
        for (int n = 0; n < N; n++) wt[(size_t)n * K + k] = w[(size_t)k * N + n];
    const float *key = wt; /* any address but w (the f32 W below) */
    assert_int_equal(be->qweight_create(be, key, RP_WEIGHTS_BF16, N, K, &err), RP_OK);
    be->qweight_write(be, key, 0, N, wt, 1, NULL);
    uint16_t *qb = malloc((size_t)N * K * sizeof(uint16_t));
    assert_non_null(qb);
    rp_quantize_matrix(RP_QTYPE_BF16, qb, NULL, wt, N, K, 0);
    const rp_qmatrix qm = {.type = RP_QTYPE_BF16, .N = N, .K = K, .data = qb};
    const int Ms[] = {1, 8, 40};
    for (size_t i = 0; i < sizeof Ms / sizeof Ms[0]; i++) {
        const int M = Ms[i];
        float *x = frand_array((size_t)M * K, 3 + (unsigned)M);
        float *y = calloc((size_t)M * N, sizeof(float)), *yq = calloc((size_t)M * N, sizeof(float));
        assert_non_null(y);
        assert_non_null(yq);
        be->matmul_lora(be, y, x, key, M, N, K, 0.0f);
        assert_int_equal(be->status(be, &err), RP_OK);
        rp_cpu_qmatmul(NULL, &qm, yq, x, M, 0.0f, 2);
        assert_memory_equal(y, yq, (size_t)M * N * sizeof(float));
        /* f32 W [K,N] (not registered): the f32 op, near the bf16 result. */
        be->matmul_lora(be, yq, x, w, 1, N, K, 0.0f);
        assert_int_equal(be->status(be, &err), RP_OK);
        /* bf16 W and x: each product within 2^-8 relative, 2^-7 for slack. */
        for (int n = 0; n < N; n++) {
            double mag = 0.0;
            for (int k = 0; k < K; k++) mag += fabs((double)w[(size_t)k * N + n] * x[k]);
            if (!(fabs((double)yq[n] - y[n]) <= ldexp(mag, -7)))
                fail_msg("M=%d n=%d: f32 W gives %g, bf16 %g (bound %g)", M, n, yq[n], y[n],
                         ldexp(mag, -7));
        }
        free(x);
        free(y);
        free(yq);
    }
    be->qweight_destroy(be, key);
    be->destroy(be);
    free(qb);
    free(wt);
    free(w);
}

int main(void) {
    openblas_set_num_threads(1); /* as the CPU backend runs it: one BLAS thread per team member */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_kernels_match_reference),
        cmocka_unit_test(test_q8_kernels_match_reference),
        cmocka_unit_test(test_q8row_kernels_match_reference),
        cmocka_unit_test(test_thread_and_row_count_independence),
        cmocka_unit_test(test_decode_rows_of_any_count_equal_each_row_alone),
        cmocka_unit_test(test_vnni_x_quantization_matches_scalar),
        cmocka_unit_test(test_vnnirow_exact_order),
        cmocka_unit_test(test_vnnirow_x_quantization_matches_scalar),
        cmocka_unit_test(test_bf16dot_x_rounding_matches_scalar),
        cmocka_unit_test(test_kernel_reduction_order),
        cmocka_unit_test(test_decode_group_equals_each_job),
        cmocka_unit_test(test_decode_chain_equals_each_job),
        cmocka_unit_test(test_lora_factor_storage),
        cmocka_unit_test(test_isa_env),
        cmocka_unit_test(test_matmul_lora_on_bf16_factor),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
