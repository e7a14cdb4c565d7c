/* WKV7 with bf16 I/O on the CUDA backend (cuda/cuda_wkv7.cu): the official
 * RWKV-7 kernel's dtypes, for bench_gpu and the twin test. Inputs are device
 * arrays of bf16 [R,C]; state, checkpoints and the state gradient stay fp32,
 * as do the sums inside. The model reaches the same kernels through the
 * vtable when bf16 copies of all inputs exist (BF16 math). C linkage. */
#ifndef RP_CUDA_WKV7_H
#define RP_CUDA_WKV7_H
#include <stddef.h>

#include "backend.h"
#ifdef __cplusplus
extern "C" {
#endif
/* Device pointers to bf16 [R,C] arrays: the forward's six inputs. */
typedef struct {
    const void *r, *w_raw, *k, *v, *kk, *a;
} rp_wkv7_bf16;

/* wkv7_forward_train on bf16 inputs; y [R,C] is bf16 when y_bf16, else fp32.
 * Returns 1, or 0 once the backend holds an error. */
int rp_cuda_wkv7_forward_train_bf16(rp_backend *be, void *y, int y_bf16, const rp_wkv7_bf16 *in,
                                    float *state_base, size_t state_stride, float *checkpoints,
                                    const rp_batch *batch, int C, int N);
/* wkv7_backward_beta on bf16 dy and inputs; grads = {dr, dw_raw, dk, dv, dkk,
 * da}, bf16 when grads_bf16 (beta != 0: dr, dk, dv added onto, one rounding). */
int rp_cuda_wkv7_backward_bf16(rp_backend *be, void *const grads[6], int grads_bf16,
                               float *dstate_base, size_t state_stride, const void *dy,
                               const rp_wkv7_bf16 *in, const float *checkpoints,
                               const rp_batch *batch, int C, int N, float beta);
/* Forward calls whose longest sequence has at least this many tokens use the
 * chunked (fla-style) kernel; INT_MAX: never, 0: always (tests, bench_gpu). */
extern int rp_cuda_wkv7_chunked_min_t;
/* The per-token forward's blocks per (sequence, head): 0 (default) picks 1, 2
 * or 4 from the grid and the SM count; 1, 2, 4 force it (tests, bench_gpu).
 * Every split gives the same bits (each block owns whole value rows). */
extern int rp_cuda_wkv7_rows_split;
/* dst [n] bf16 = round(src [n]) / dst [n] = src [n] bf16 widened, on the
 * backend's stream (device pointers). */
int rp_cuda_bf16_from_f32(rp_backend *be, void *dst, const float *src, size_t n);
int rp_cuda_f32_from_bf16(rp_backend *be, float *dst, const void *src, size_t n);
#ifdef __cplusplus
}
#endif
#endif
