/* The CUDA backend (the .cu files in cuda/): every op of src/backend.h on one GPU, on one
 * stream, with cuBLAS GEMMs and fused kernels. C linkage so src/ can call it.
 *
 * Precision. Buffers at the interface are fp32, as on the CPU. In BF16 math
 * (the default) GEMM operands are bf16 with fp32 accumulation and fp32
 * output: weights registered with register_weights keep a bf16 copy that
 * every write through the backend (copy_to_device, copy, fill_zero, adamw)
 * keeps current, and activations are rounded to bf16 on their way into a
 * GEMM: by the kernel that produces them, as a second bf16 output, or once
 * per activation by a conversion that the following GEMMs on it share. Everything else (norm statistics, softmax, wkv state and decay,
 * master weights, Adam moments) stays fp32. FP32 math uses fp32 GEMMs
 * (no TF32): the twin of the CPU backend to ~1e-6, for tests. */
#ifndef RP_CUDA_BACKEND_H
#define RP_CUDA_BACKEND_H

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { RP_CUDA_MATH_BF16 = 0, RP_CUDA_MATH_FP32 = 1 } rp_cuda_math;

/* "bf16" / "fp32". */
const char *rp_cuda_math_name(rp_cuda_math math);
/* Parses "bf16" or "fp32"; -1 otherwise. */
int rp_cuda_math_parse(const char *text);

/* A backend on CUDA device `device` (the caller picked it: local rank). NULL
 * with err set when the device, the stream or cuBLAS cannot be set up. */
rp_backend *rp_cuda_backend_create(int device, rp_cuda_math math, rp_error *err);
void rp_cuda_backend_destroy(rp_backend *be);
/* The device index and math of a CUDA backend. */
int rp_cuda_backend_device(const rp_backend *be);
rp_cuda_math rp_cuda_backend_math(const rp_backend *be);
/* Tests: 0 turns off the bf16 activation copies (every GEMM converts its
 * activation operands itself, as before issue 15); 1 (the default) on. */
void rp_cuda_backend_set_act16(rp_backend *be, int on);
/* Tests: the f32 device array p [n] becomes its bf16 values (round to
 * nearest even) in place, recorded as a bf16-writing kernel leaves its
 * output, so that the ops that read such an input in bf16 (the fused
 * groupnorm + bonus/gate on WKV7's y) read it so. 0 after a failure. */
int rp_cuda_backend_store_bf16_inplace(rp_backend *be, float *p, size_t n);

#ifdef __cplusplus
}
#endif

#endif
