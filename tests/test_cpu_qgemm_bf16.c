/* The bf16 prefill GEMM (src/cpu/cpu_qgemm_bf16.c, issue 20) on bf16 and
 * int8 weights: against the double reference with W's format and x rounded
 * to bf16, at M, N, K off its tiles (8 rows, 48 outputs, 256 k, odd K); the
 * same bits on 1-3 threads and for a row wherever it falls in x; the
 * dispatch (rp_cpu_qmatmul runs it for M > 8 from bf16dot and from vnni
 * where the CPU has AVX512_BF16, and the widening sgemm path, x in f32,
 * where RP_CPU_ISA caps the level below them). */
#include "config.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cpu/cpu_features.h"
#include "cpu/cpu_qgemm_bf16.h"
#include "cpu/cpu_quant.h"

#if defined(__x86_64__)

static float frand(unsigned long long *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*s >> 40) & 0xffffff) / (float)0x1000000 * 2.0f - 1.0f;
}

static float *frand_array(size_t n, unsigned long long seed, float scale_per_32) {
    float *a = malloc(n * sizeof *a + 4);
    assert_non_null(a);
    for (size_t i = 0; i < n; i++)
        a[i] = frand(&seed) * (scale_per_32 > 0.0f ? 0.05f + scale_per_32 * (float)((i / 32) % 7)
                                                   : 1.0f);
    return a;
}

typedef struct {
    rp_qmatrix w;
    void *data;
    uint16_t *scales;
} bmat;

/* W [N,K] of `type` (bf16 or int8) from random f32 whose magnitude varies
 * by block of 32 (so int8 scales differ). */
static void bmat_make(bmat *b, rp_qtype type, int N, int K, unsigned long long seed) {
    float *wf = frand_array((size_t)N * K, seed, 1.0f);
    b->data = malloc(rp_qmatrix_data_bytes(type, N, K) + 2);
    b->scales = malloc(rp_qmatrix_scale_bytes(type, N, K) + 2);
    assert_non_null(b->data);
    assert_non_null(b->scales);
    rp_quantize_matrix(type, b->data, b->scales, wf, N, K, 0);
    free(wf);
    b->w = (rp_qmatrix){.type = type, .N = N, .K = K, .data = b->data,
                        .scales = type == RP_QTYPE_Q8 ? b->scales : NULL};
}

static void bmat_free(bmat *b) {
    free(b->data);
    free(b->scales);
}

static int have_bf16(void) {
    if (rp_cpu_isa_supported(RP_CPU_ISA_AVX512BF16)) return 1;
    print_message("  this CPU has no AVX512_BF16: the bf16 GEMM is not tested\n");
    return 0;
}

/* y within the bound of the reference with x rounded to bf16: the GEMM sums
 * each element in one f32 lane, sequentially over k (vdpbf16ps adds two
 * exact bf16 products per step, at most two roundings) and the K blocks
 * into y: at most K + K/256 + 2 roundings, each of a partial sum no larger
 * than sum_k |w_k x_k| (mag), so |error| <= (K + 16) 2^-24 mag (+ 2^-24 |y|
 * for beta = 1); int8 adds a scale multiply per block of 32 and sums the
 * blocks: K/16 more. 1.01: mag is taken with the unrounded x. */
static double bound_k(rp_qtype type, int K) {
    return (K + 16 + (type == RP_QTYPE_Q8 ? K / 16 : 0)) * ldexp(1.0, -24);
}

static void check_shape(rp_qtype type, int M, int N, int K, float beta) {
    bmat b;
    bmat_make(&b, type, N, K, 17 + (unsigned)(N * 7 + K));
    float *x = frand_array((size_t)M * K, 3 + (unsigned)M, 0.0f);
    float *y = frand_array((size_t)M * N, 5, 0.0f);
    float *y0 = malloc((size_t)M * N * sizeof *y0), *yref = malloc((size_t)M * N * sizeof *yref);
    float *row = malloc((size_t)K * sizeof *row + 4);
    assert_non_null(y0);
    assert_non_null(yref);
    assert_non_null(row);
    memcpy(y0, y, (size_t)M * N * sizeof *y);
    memcpy(yref, y, (size_t)M * N * sizeof *y);
    assert_int_equal(cpu_qgemm_bf16(&b.w, y, x, M, beta, 1), 0);
    rp_qmatmul_ref_kernel(RP_QKERNEL_BF16DOT, &b.w, yref, x, M, beta);
    for (int n = 0; n < N; n++) {
        rp_qmatrix_row_f32(&b.w, n, row);
        for (int m = 0; m < M; m++) {
            double mag = 0.0;
            for (int k = 0; k < K; k++) mag += fabs((double)row[k] * x[(size_t)m * K + k]);
            const size_t i = (size_t)m * N + n;
            const double tol = bound_k(type, K) * 1.01 * mag +
                               (beta != 0.0f ? ldexp(fabs(y0[i]) + fabs(yref[i]), -24) : 0.0) +
                               1e-30;
            const double err = fabs((double)y[i] - (double)yref[i]);
            if (!(err <= tol))
                fail_msg("bf16 GEMM %s M=%d N=%d K=%d beta=%g: y[%d,%d]=%.9g, reference %.9g, "
                         "error %.3g > bound %.3g",
                         rp_qtype_name(type), M, N, K, beta, m, n, y[i], yref[i], err, tol);
        }
    }
    free(row);
    free(yref);
    free(y0);
    free(y);
    free(x);
    bmat_free(&b);
}

static void test_matches_reference_on_odd_shapes(void **state) {
    (void)state;
    if (!have_bf16()) return;
    /* M: one row block plus 1, 17, 64; N: under, at and over the 48-wide
     * panel and two panels plus one; K: 1 and 2 (one pair), 15 and 33 (odd:
     * half a last pair), 256/257/513 (K blocks and a 1-k tail block), 777. */
    static const int Ms[] = {9, 17, 64};
    static const int Ns[] = {1, 47, 48, 97};
    static const int Ks[] = {1, 2, 15, 33, 256, 257, 513, 777};
    /* int8: K a multiple of 32; 288 = a 256-k block and one of 32 */
    static const int Ks8[] = {32, 64, 288, 768};
    for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof Ns[0]; ni++)
            for (int beta = 0; beta <= 1; beta++) {
                for (size_t ki = 0; ki < sizeof Ks / sizeof Ks[0]; ki++)
                    check_shape(RP_QTYPE_BF16, Ms[mi], Ns[ni], Ks[ki], (float)beta);
                for (size_t ki = 0; ki < sizeof Ks8 / sizeof Ks8[0]; ki++)
                    check_shape(RP_QTYPE_Q8, Ms[mi], Ns[ni], Ks8[ki], (float)beta);
            }
}

/* The same bits on 1, 2 and 3 threads, and for rows computed in calls of
 * other sizes at other places in x (every row's sum order is its own). */
static void test_thread_and_row_position_independence(void **state) {
    (void)state;
    if (!have_bf16()) return;
    static const int shapes[][3] = {{100, 770, 777}, {37, 3072, 768}, {20, 768, 3072}};
    for (size_t s = 0; s < 2 * (sizeof shapes / sizeof shapes[0]); s++) {
        const rp_qtype type = s % 2 ? RP_QTYPE_Q8 : RP_QTYPE_BF16;
        const int M = shapes[s / 2][0], N = shapes[s / 2][1], K = shapes[s / 2][2];
        if (!rp_qtype_fits(type, K)) continue;
        bmat b;
        bmat_make(&b, type, N, K, 29);
        float *x = frand_array((size_t)M * K, 31, 0.0f);
        float *y1 = malloc((size_t)M * N * sizeof *y1), *y2 = malloc((size_t)M * N * sizeof *y2);
        assert_non_null(y1);
        assert_non_null(y2);
        assert_int_equal(cpu_qgemm_bf16(&b.w, y1, x, M, 0.0f, 1), 0);
        for (int t = 2; t <= 3; t++) {
            memset(y2, 0xff, (size_t)M * N * sizeof *y2); /* NaN: an element left unwritten shows */
            assert_int_equal(cpu_qgemm_bf16(&b.w, y2, x, M, 0.0f, t), 0);
            if (memcmp(y1, y2, (size_t)M * N * sizeof *y1))
                fail_msg("bf16 GEMM %s M=%d N=%d K=%d: 1 and %d threads differ",
                         rp_qtype_name(type), M, N, K, t);
        }
        /* rows [m0, m0 + 9): a call of 9 rows whose block boundaries fall
         * elsewhere in those rows than in the full call */
        for (int m0 = 1; m0 + 9 <= M; m0 += 11) {
            assert_int_equal(cpu_qgemm_bf16(&b.w, y2, x + (size_t)m0 * K, 9, 0.0f, 2), 0);
            if (memcmp(y1 + (size_t)m0 * N, y2, (size_t)9 * N * sizeof *y1))
                fail_msg("bf16 GEMM %s M=%d N=%d K=%d: rows %d..%d differ alone",
                         rp_qtype_name(type), M, N, K, m0, m0 + 8);
        }
        free(y1);
        free(y2);
        free(x);
        bmat_free(&b);
    }
}

/* Sets RP_CPU_ISA (NULL: unset) and rereads it as the backend does. */
static void set_isa(const char *isa) {
    if (isa) setenv("RP_CPU_ISA", isa, 1);
    else unsetenv("RP_CPU_ISA");
    rp_error err = {0};
    assert_int_equal(rp_cpu_qmatmul_check_env(&err), RP_OK);
}

/* rp_cpu_qmatmul's prefill is this GEMM where the CPU has AVX512_BF16;
 * with RP_CPU_ISA below avx512bf16 it is the widening path (x kept f32):
 * within the f32-x reference's bound and bit-equal to the named kernel. */
static void check_dispatch(rp_qtype type, rp_qkernel fast) {
    const int M = 33, N = 100, K = 320;
    bmat b;
    bmat_make(&b, type, N, K, 41);
    float *x = frand_array((size_t)M * K, 43, 0.0f);
    float *y = malloc((size_t)M * N * sizeof *y), *yk = malloc((size_t)M * N * sizeof *yk);
    float *yref = malloc((size_t)M * N * sizeof *yref), *row = malloc((size_t)K * sizeof *row);
    assert_non_null(row);
    assert_non_null(y);
    assert_non_null(yk);
    assert_non_null(yref);
    if (rp_cpu_isa_supported(RP_CPU_ISA_AVX512BF16)) {
        set_isa(NULL);
        assert_int_equal(rp_qkernel_chosen(type), fast);
        rp_cpu_qmatmul(NULL, &b.w, y, x, M, 0.0f, 2);
        assert_int_equal(cpu_qgemm_bf16(&b.w, yk, x, M, 0.0f, 1), 0);
        assert_memory_equal(y, yk, (size_t)M * N * sizeof *y);
    }
    rp_qmatmul_ref(&b.w, yref, x, M, 0.0f);
    static const char *const lower[] = {"avx512", "avx2", "generic"};
    for (int i = 0; i < 3; i++) {
        rp_cpu_isa isa;
        assert_int_equal(rp_cpu_isa_parse(lower[i], &isa), 0);
        if (!rp_cpu_isa_supported(isa)) continue;
        set_isa(lower[i]);
        const rp_qkernel k = rp_qkernel_chosen(type);
        assert_true(k != fast);
        rp_cpu_qmatmul(NULL, &b.w, y, x, M, 0.0f, 2);
        rp_cpu_qmatmul_kernel(NULL, k, &b.w, yk, x, M, 0.0f, 1);
        assert_memory_equal(y, yk, (size_t)M * N * sizeof *y);
        /* x unrounded: the sequential f32 sum's bound around the f32-x reference */
        for (int n = 0; n < N; n++) {
            rp_qmatrix_row_f32(&b.w, n, row);
            for (int m = 0; m < M; m++) {
                double mag = 0.0;
                for (int kk = 0; kk < K; kk++) mag += fabs((double)row[kk] * x[(size_t)m * K + kk]);
                const size_t j = (size_t)m * N + n;
                if (!(fabs((double)y[j] - yref[j]) <= bound_k(type, K) * mag + 1e-30))
                    fail_msg("%s, RP_CPU_ISA=%s: y[%d,%d]=%.9g, f32-x reference %.9g",
                             rp_qtype_name(type), lower[i], m, n, y[j], yref[j]);
            }
        }
    }
    set_isa(NULL);
    free(row);
    free(yref);
    free(yk);
    free(y);
    free(x);
    bmat_free(&b);
}

static void test_dispatch(void **state) {
    (void)state;
    check_dispatch(RP_QTYPE_BF16, RP_QKERNEL_BF16DOT);
    /* int8 runs the GEMM from vnni, where the CPU has both VNNI and BF16 */
    if (!rp_cpu_isa_supported(RP_CPU_ISA_AVX512VNNI)) return;
    check_dispatch(RP_QTYPE_Q8, RP_QKERNEL_VNNI);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_reference_on_odd_shapes),
        cmocka_unit_test(test_thread_and_row_position_independence),
        cmocka_unit_test(test_dispatch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else
int main(void) {
    printf("1..0 # SKIP: the bf16 GEMM is x86-64 only\n");
    return 77;
}
#endif
