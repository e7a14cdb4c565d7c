/* Specification of src/core/dtype.c: dtype names and sizes, bf16 rounding
 * bit-exact with torch (ties to even, NaN stays NaN), IEEE half conversions
 * (ties to even, subnormals, inf/NaN), and unaligned bulk conversions. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <string.h>

#include "core/dtype.h"

static float f32_of(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* A small deterministic generator, so failures reproduce. */
static uint32_t next_random(uint64_t *state) {
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(*state >> 32);
}

static void test_dtype_names_and_sizes_round_trip(void **state) {
    (void)state;
    static const struct { rp_dtype dtype; const char *name; size_t size; int is_float; } table[] = {
        {RP_DTYPE_F32, "F32", 4, 1}, {RP_DTYPE_F16, "F16", 2, 1}, {RP_DTYPE_BF16, "BF16", 2, 1},
        {RP_DTYPE_F64, "F64", 8, 1}, {RP_DTYPE_I32, "I32", 4, 0}, {RP_DTYPE_I64, "I64", 8, 0},
        {RP_DTYPE_U8, "U8", 1, 0},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        assert_string_equal(rp_dtype_name(table[i].dtype), table[i].name);
        rp_dtype parsed = RP_DTYPE_COUNT;
        assert_int_equal(rp_dtype_from_name(table[i].name, &parsed), 0);
        assert_int_equal(parsed, table[i].dtype);
        assert_int_equal(rp_dtype_size(table[i].dtype), table[i].size);
        assert_int_equal(rp_dtype_is_float(table[i].dtype), table[i].is_float);
    }
}

static void test_unknown_dtype_name_is_rejected(void **state) {
    (void)state;
    rp_dtype parsed = RP_DTYPE_F32;
    assert_int_equal(rp_dtype_from_name("F8_E4M3", &parsed), -1);
    assert_int_equal(rp_dtype_from_name("f32", &parsed), -1); /* names are case-sensitive */
    assert_int_equal(rp_dtype_from_name("", &parsed), -1);
    assert_int_equal(rp_dtype_from_name(NULL, &parsed), -1);
    assert_int_equal(parsed, RP_DTYPE_F32);
}

static void test_bf16_rounds_ties_to_even(void **state) {
    (void)state;
    /* Exactly half way, kept bit even: stays. */
    assert_int_equal(rp_f32_to_bf16(f32_of(0x3F808000u)), 0x3F80);
    /* Exactly half way, kept bit odd: rounds up to even. */
    assert_int_equal(rp_f32_to_bf16(f32_of(0x3F818000u)), 0x3F82);
    /* Just above / below half way. */
    assert_int_equal(rp_f32_to_bf16(f32_of(0x3F808001u)), 0x3F81);
    assert_int_equal(rp_f32_to_bf16(f32_of(0x3F807FFFu)), 0x3F80);
    /* Negative values round by magnitude. */
    assert_int_equal(rp_f32_to_bf16(f32_of(0xBF818000u)), 0xBF82);
    /* A carry out of the mantissa moves to the next binade. */
    assert_int_equal(rp_f32_to_bf16(f32_of(0x3FFFC000u)), 0x4000);
}

static void test_bf16_matches_torch_formula_on_random_bits(void **state) {
    (void)state;
    uint64_t rng = 1;
    for (int i = 0; i < 1000000; i++) {
        uint32_t u = next_random(&rng);
        if (isnan(f32_of(u))) continue;
        uint16_t want = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        assert_int_equal(rp_f32_to_bf16(f32_of(u)), want);
    }
}

static void test_bf16_is_nearest_value(void **state) {
    (void)state;
    /* Independent of the formula: the result is one of the two bf16 values
     * around x and no farther from x than the other. */
    uint64_t rng = 7;
    for (int i = 0; i < 200000; i++) {
        uint32_t u = next_random(&rng) & 0x7F7FFFFFu; /* finite, positive */
        float x = f32_of(u);
        uint16_t h = rp_f32_to_bf16(x);
        uint16_t lo = (uint16_t)(u >> 16);
        if (lo == 0x7F7F) continue; /* above it is inf, covered by the overflow test */
        assert_true(h == lo || h == lo + 1);
        double dl = fabs((double)x - (double)rp_bf16_to_f32(lo));
        double dh = fabs((double)rp_bf16_to_f32((uint16_t)(lo + 1)) - (double)x);
        if (h == lo) assert_true(dl <= dh);
        else assert_true(dh <= dl);
    }
}

static void test_bf16_overflow_and_infinity(void **state) {
    (void)state;
    assert_int_equal(rp_f32_to_bf16(INFINITY), 0x7F80);
    assert_int_equal(rp_f32_to_bf16(-INFINITY), 0xFF80);
    assert_int_equal(rp_f32_to_bf16(FLT_MAX), 0x7F80);   /* rounds up past the largest bf16 */
    assert_int_equal(rp_f32_to_bf16(-FLT_MAX), 0xFF80);
    assert_true(isinf(rp_bf16_to_f32(0x7F80)));
    assert_int_equal(rp_f32_to_bf16(-0.0f), 0x8000);
}

static void test_bf16_nan_stays_quiet_nan(void **state) {
    (void)state;
    /* A payload only in the low 16 bits would round to inf if NaN were not
     * special-cased; torch gives its canonical quiet NaN. */
    uint32_t nans[] = {0x7F800001u, 0x7FC00000u, 0xFFFFFFFFu, 0x7F80FFFFu, 0xFF800001u};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
        uint16_t h = rp_f32_to_bf16(f32_of(nans[i]));
        assert_int_equal(h, 0x7FC0);
        assert_true(isnan(rp_bf16_to_f32(h)));
    }
}

static void test_bf16_widening_is_exact_for_every_value(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = rp_bf16_to_f32((uint16_t)h);
        assert_int_equal(bits_of(f), h << 16);
        if (!isnan(f)) assert_int_equal(rp_f32_to_bf16(f), h);
    }
}

static void test_f16_every_value_round_trips(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = rp_f16_to_f32((uint16_t)h);
        uint16_t back = rp_f32_to_f16(f);
        if (isnan(f)) {
            assert_int_equal(back & 0x7C00, 0x7C00);
            assert_true((back & 0x03FF) != 0);
        } else {
            assert_int_equal(back, h);
        }
    }
}

static void test_f16_known_values(void **state) {
    (void)state;
    assert_int_equal(rp_f32_to_f16(1.0f), 0x3C00);
    assert_int_equal(rp_f32_to_f16(-2.0f), 0xC000);
    assert_int_equal(rp_f32_to_f16(0.0f), 0x0000);
    assert_int_equal(rp_f32_to_f16(-0.0f), 0x8000);
    assert_int_equal(rp_f32_to_f16(65504.0f), 0x7BFF);           /* largest half */
    assert_true(rp_f16_to_f32(0x7BFF) == 65504.0f);
    assert_true(rp_f16_to_f32(0x3555) == 0x1.554p-2f);
}

static void test_f16_rounds_ties_to_even(void **state) {
    (void)state;
    /* 1 + 2^-11 is half way between 0x3C00 and 0x3C01: even wins. */
    assert_int_equal(rp_f32_to_f16(1.0f + 0x1p-11f), 0x3C00);
    /* 1 + 3*2^-11 is half way between 0x3C01 and 0x3C02. */
    assert_int_equal(rp_f32_to_f16(1.0f + 0x3p-11f), 0x3C02);
    assert_int_equal(rp_f32_to_f16(1.0f + 0x1p-11f + 0x1p-20f), 0x3C01);
    /* Carry across the binade: largest mantissa rounds up to 2.0. */
    assert_int_equal(rp_f32_to_f16(2.0f - 0x1p-12f), 0x4000);
}

static void test_f16_overflow_goes_to_infinity(void **state) {
    (void)state;
    /* 65520 is half way between 65504 and 65536 (= inf): ties to even -> inf. */
    assert_int_equal(rp_f32_to_f16(65519.0f), 0x7BFF);
    assert_int_equal(rp_f32_to_f16(65520.0f), 0x7C00);
    assert_int_equal(rp_f32_to_f16(1e10f), 0x7C00);
    assert_int_equal(rp_f32_to_f16(-1e10f), 0xFC00);
    assert_int_equal(rp_f32_to_f16(INFINITY), 0x7C00);
    assert_int_equal(rp_f32_to_f16(-INFINITY), 0xFC00);
    assert_true(isinf(rp_f16_to_f32(0x7C00)) && rp_f16_to_f32(0x7C00) > 0);
    assert_true(isinf(rp_f16_to_f32(0xFC00)) && rp_f16_to_f32(0xFC00) < 0);
}

static void test_f16_nan_stays_nan(void **state) {
    (void)state;
    uint32_t nans[] = {0x7FC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
        uint16_t h = rp_f32_to_f16(f32_of(nans[i]));
        assert_int_equal(h & 0x7E00, 0x7E00); /* quiet */
        assert_true(isnan(rp_f16_to_f32(h)));
    }
    assert_true(isnan(rp_f16_to_f32(0x7C01)));
    assert_true(isnan(rp_f16_to_f32(0xFE00)));
}

static void test_f16_subnormals(void **state) {
    (void)state;
    assert_int_equal(rp_f32_to_f16(0x1p-24f), 0x0001);          /* smallest subnormal */
    assert_int_equal(rp_f32_to_f16(0x3FFp-24f), 0x03FF);        /* largest subnormal */
    assert_int_equal(rp_f32_to_f16(0x1p-14f), 0x0400);          /* smallest normal */
    assert_int_equal(rp_f32_to_f16(-0x5p-24f), 0x8005);
    assert_true(rp_f16_to_f32(0x0001) == 0x1p-24f);
    assert_true(rp_f16_to_f32(0x03FF) == 0x3FFp-24f);
    assert_true(rp_f16_to_f32(0x8001) == -0x1p-24f);
    /* Ties at subnormal precision go to even. */
    assert_int_equal(rp_f32_to_f16(0x1p-25f), 0x0000);          /* half of the smallest: 0 */
    assert_int_equal(rp_f32_to_f16(0x3p-25f), 0x0002);          /* 1.5 ulp -> 2 */
    assert_int_equal(rp_f32_to_f16(0x5p-25f), 0x0002);          /* 2.5 ulp -> 2 */
    assert_int_equal(rp_f32_to_f16(0x1p-25f * 1.0000001f), 0x0001);
    /* Rounding up out of the subnormals gives the smallest normal. */
    assert_int_equal(rp_f32_to_f16(0x7FFp-25f), 0x0400);
    /* Far below: signed zero; f32 subnormals too. */
    assert_int_equal(rp_f32_to_f16(1e-30f), 0x0000);
    assert_int_equal(rp_f32_to_f16(-1e-30f), 0x8000);
    assert_int_equal(rp_f32_to_f16(f32_of(0x00000001u)), 0x0000);
}

#if defined(__FLT16_MAX__)
static void test_f16_matches_compiler_float16(void **state) {
    (void)state;
    /* The compiler's _Float16 conversion is an independent IEEE reference. */
    uint64_t rng = 3;
    for (int i = 0; i < 1000000; i++) {
        uint32_t u = next_random(&rng);
        /* Concentrate on the interesting exponents (f16 range and just beyond). */
        if (i & 1) u = (u & 0x807FFFFFu) | ((uint32_t)(100 + (u >> 23) % 50) << 23);
        float x = f32_of(u);
        if (isnan(x)) continue;
        _Float16 ref = (_Float16)x;
        uint16_t want;
        memcpy(&want, &ref, sizeof want);
        assert_int_equal(rp_f32_to_f16(x), want);
    }
}
#endif

static void test_bulk_conversions_accept_unaligned_buffers(void **state) {
    (void)state;
    const float src[5] = {1.0f, -2.5f, 0x1p-24f, 65504.0f, 3.140625f};
    unsigned char raw[1 + 5 * 8];
    float back[5];
    rp_dtype kinds[] = {RP_DTYPE_F32, RP_DTYPE_F16, RP_DTYPE_BF16, RP_DTYPE_F64};
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        memset(raw, 0xAB, sizeof raw);
        rp_convert_from_f32(raw + 1, kinds[k], src, 5);            /* odd address */
        rp_convert_to_f32(back, raw + 1, kinds[k], 5);
        for (int i = 0; i < 5; i++) {
            float want = src[i];
            if (kinds[k] == RP_DTYPE_F16) want = rp_f16_to_f32(rp_f32_to_f16(src[i]));
            if (kinds[k] == RP_DTYPE_BF16) want = rp_bf16_to_f32(rp_f32_to_bf16(src[i]));
            assert_true(bits_of(back[i]) == bits_of(want));
        }
        size_t end = 1 + 5 * rp_dtype_size(kinds[k]);
        assert_int_equal(raw[0], 0xAB);                  /* nothing written before */
        if (end < sizeof raw) assert_int_equal(raw[end], 0xAB); /* nor after */
    }
}

static void test_bulk_bf16_is_little_endian(void **state) {
    (void)state;
    const float one = 1.0f;
    unsigned char raw[2];
    rp_convert_from_f32(raw, RP_DTYPE_BF16, &one, 1);
    assert_int_equal(raw[0], 0x80);
    assert_int_equal(raw[1], 0x3F);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_names_and_sizes_round_trip),
        cmocka_unit_test(test_unknown_dtype_name_is_rejected),
        cmocka_unit_test(test_bf16_rounds_ties_to_even),
        cmocka_unit_test(test_bf16_matches_torch_formula_on_random_bits),
        cmocka_unit_test(test_bf16_is_nearest_value),
        cmocka_unit_test(test_bf16_overflow_and_infinity),
        cmocka_unit_test(test_bf16_nan_stays_quiet_nan),
        cmocka_unit_test(test_bf16_widening_is_exact_for_every_value),
        cmocka_unit_test(test_f16_every_value_round_trips),
        cmocka_unit_test(test_f16_known_values),
        cmocka_unit_test(test_f16_rounds_ties_to_even),
        cmocka_unit_test(test_f16_overflow_goes_to_infinity),
        cmocka_unit_test(test_f16_nan_stays_nan),
        cmocka_unit_test(test_f16_subnormals),
#if defined(__FLT16_MAX__)
        cmocka_unit_test(test_f16_matches_compiler_float16),
#endif
        cmocka_unit_test(test_bulk_conversions_accept_unaligned_buffers),
        cmocka_unit_test(test_bulk_bf16_is_little_endian),
    };
    return cmocka_run_group_tests_name("dtype", tests, NULL, NULL);
}
