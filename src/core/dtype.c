/* Element types of tensor files and the f32 <-> f16/bf16/f64 conversions.
 * Called by the safetensors reader/writer, the converters and the backends.
 * Every conversion works on bits (memcpy, never pointer casts), so source
 * buffers may be unaligned, and rounding is bit-exact with torch. */
#include "core/dtype.h"

#include <string.h>

/* Files are little-endian and buffers are copied as-is on the fast paths. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "rwkvpipe assumes a little-endian host (safetensors data is little-endian)"
#endif

static const char *const dtype_names[RP_DTYPE_COUNT] = {
    [RP_DTYPE_F32] = "F32", [RP_DTYPE_F16] = "F16", [RP_DTYPE_BF16] = "BF16",
    [RP_DTYPE_F64] = "F64", [RP_DTYPE_I32] = "I32", [RP_DTYPE_I64] = "I64",
    [RP_DTYPE_U8] = "U8",  [RP_DTYPE_I8] = "I8",
};

static const size_t dtype_sizes[RP_DTYPE_COUNT] = {
    [RP_DTYPE_F32] = 4, [RP_DTYPE_F16] = 2, [RP_DTYPE_BF16] = 2, [RP_DTYPE_F64] = 8,
    [RP_DTYPE_I32] = 4, [RP_DTYPE_I64] = 8, [RP_DTYPE_U8] = 1,
    [RP_DTYPE_I8] = 1,
};

const char *rp_dtype_name(rp_dtype dtype) {
    if ((unsigned)dtype >= RP_DTYPE_COUNT) return "?";
    return dtype_names[dtype];
}

int rp_dtype_from_name(const char *name, rp_dtype *out) {
    if (!name) return -1;
    for (int i = 0; i < RP_DTYPE_COUNT; i++) {
        if (strcmp(name, dtype_names[i]) == 0) {
            if (out) *out = (rp_dtype)i;
            return 0;
        }
    }
    return -1;
}

size_t rp_dtype_size(rp_dtype dtype) {
    if ((unsigned)dtype >= RP_DTYPE_COUNT) return 0;
    return dtype_sizes[dtype];
}

int rp_dtype_is_float(rp_dtype dtype) {
    return dtype == RP_DTYPE_F32 || dtype == RP_DTYPE_F16 || dtype == RP_DTYPE_BF16 ||
           dtype == RP_DTYPE_F64;
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float rp_bf16_to_f32(uint16_t h) {
    return f32_from_bits((uint32_t)h << 16);
}

uint16_t rp_f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    /* torch (c10::detail::round_to_nearest_even) maps every NaN to the
     * canonical quiet NaN 0x7FC0; rounding the bits would turn a NaN with a
     * small payload into inf. */
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    /* Adding 0x7FFF plus the lowest kept bit rounds ties to even; a carry out
     * of the mantissa bumps the exponent, and the largest finite values round
     * to inf, as in IEEE. */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

float rp_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    if (exponent == 0x1F) /* inf, or NaN with its payload kept */
        return f32_from_bits(sign | 0x7F800000u | (mantissa << 13));
    if (exponent == 0) {
        if (mantissa == 0) return f32_from_bits(sign);
        /* Subnormal: mantissa * 2^-24 is exact in f32. */
        float magnitude = (float)mantissa * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    }
    return f32_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/* Shifts value right by shift bits, rounding to nearest, ties to even. */
static uint32_t shift_right_round_even(uint32_t value, int shift) {
    uint32_t kept = value >> shift;
    uint32_t rest = value & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (kept & 1u))) kept++;
    return kept;
}

uint16_t rp_f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    int32_t exponent = (int32_t)((u >> 23) & 0xFFu);
    uint32_t mantissa = u & 0x7FFFFFu;

    if (exponent == 0xFF) {
        if (mantissa == 0) return sign | 0x7C00u;
        /* NaN: keep the top payload bits and force the quiet bit, so a
         * payload living only in the low bits does not become inf. */
        return (uint16_t)(sign | 0x7E00u | (mantissa >> 13));
    }
    int32_t half_exponent = exponent - 127 + 15;
    if (half_exponent >= 31) return sign | 0x7C00u; /* overflow -> inf */
    if (half_exponent <= 0) {
        /* f16 subnormal (or zero): value = m * 2^-24 with
         * m = (1.mantissa * 2^23) >> (14 - half_exponent). Below 2^-25 (shift
         * > 24) everything rounds to zero; exactly 2^-25 ties to even (zero). */
        int shift = 14 - half_exponent;
        if (shift > 24) return sign;
        uint32_t m = shift_right_round_even(mantissa | 0x800000u, shift);
        return (uint16_t)(sign | m); /* m == 0x400 is the smallest normal: fine */
    }
    /* Normal: the rounding carry may run into the exponent and up to inf,
     * which is the IEEE result. */
    uint32_t bits = ((uint32_t)half_exponent << 10) | (mantissa >> 13);
    uint32_t rest = mantissa & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (bits & 1u))) bits++;
    return (uint16_t)(sign | bits);
}

void rp_convert_to_f32(float *dst, const void *src, rp_dtype src_dtype, size_t n) {
    const unsigned char *s = src;
    switch (src_dtype) {
    case RP_DTYPE_F32:
        if (n) memcpy(dst, src, n * sizeof(float));
        return;
    case RP_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = rp_f16_to_f32(h);
        }
        return;
    case RP_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = rp_bf16_to_f32(h);
        }
        return;
    case RP_DTYPE_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, s + 8 * i, 8);
            dst[i] = (float)d;
        }
        return;
    /* Integer types are not "float-like"; converting them by value is still
     * the least surprising thing to do if a caller passes one. */
    case RP_DTYPE_I32:
        for (size_t i = 0; i < n; i++) {
            int32_t v;
            memcpy(&v, s + 4 * i, 4);
            dst[i] = (float)v;
        }
        return;
    case RP_DTYPE_I64:
        for (size_t i = 0; i < n; i++) {
            int64_t v;
            memcpy(&v, s + 8 * i, 8);
            dst[i] = (float)v;
        }
        return;
    case RP_DTYPE_U8:
        for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
        return;
    case RP_DTYPE_I8:
        for (size_t i = 0; i < n; i++) dst[i] = (float)(int8_t)s[i];
        return;
    case RP_DTYPE_COUNT:
        break;
    }
}

void rp_convert_from_f32(void *dst, rp_dtype dst_dtype, const float *src, size_t n) {
    unsigned char *d = dst;
    switch (dst_dtype) {
    case RP_DTYPE_F32:
        if (n) memcpy(dst, src, n * sizeof(float));
        return;
    case RP_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = rp_f32_to_f16(src[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        return;
    case RP_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = rp_f32_to_bf16(src[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        return;
    case RP_DTYPE_F64:
        for (size_t i = 0; i < n; i++) {
            double v = (double)src[i];
            memcpy(d + 8 * i, &v, 8);
        }
        return;
    default: /* not a float type: callers (the writer) never ask for one */
        return;
    }
}
