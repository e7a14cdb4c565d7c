/* Element types of tensor files and the conversions between them.
 * bf16 <- f32 rounds to nearest, ties to even (torch's .to(torch.bfloat16));
 * bf16 -> f32 and f16 -> f32 are exact widenings. */
#ifndef RP_CORE_DTYPE_H
#define RP_CORE_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    RP_DTYPE_F32 = 0,
    RP_DTYPE_F16,
    RP_DTYPE_BF16,
    RP_DTYPE_F64,
    RP_DTYPE_I32,
    RP_DTYPE_I64,
    RP_DTYPE_U8,
    RP_DTYPE_I8,      /* int8 weights of quantized files (docs/formats.md) */
    RP_DTYPE_COUNT
} rp_dtype;

/* "F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8": the safetensors spellings. */
const char *rp_dtype_name(rp_dtype dtype);
/* Returns 0 and sets *out for a known safetensors name, -1 otherwise. */
int rp_dtype_from_name(const char *name, rp_dtype *out);
size_t rp_dtype_size(rp_dtype dtype);
/* 1 for F32/F16/BF16/F64 (convertible to float), 0 otherwise. */
int rp_dtype_is_float(rp_dtype dtype);

float rp_bf16_to_f32(uint16_t h);
uint16_t rp_f32_to_bf16(float f);   /* round to nearest even; NaN stays NaN */
float rp_f16_to_f32(uint16_t h);
uint16_t rp_f32_to_f16(float f);    /* round to nearest even, overflow -> inf */

/* Converts n elements of a float-like dtype at src (any alignment, little-endian)
 * to f32 at dst. src and dst must not overlap. */
void rp_convert_to_f32(float *dst, const void *src, rp_dtype src_dtype, size_t n);
/* Converts n f32 values to dst_dtype (F32, F16, BF16 or F64). */
void rp_convert_from_f32(void *dst, rp_dtype dst_dtype, const float *src, size_t n);

#ifdef __cplusplus
}
#endif

#endif
