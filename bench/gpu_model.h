/* The analytic H100 cost model of the CUDA backend (bench_gpu --model-only,
 * bench_gpu_model): per kernel of a decode step and of a training step, the
 * bytes moved, FLOPs and launches from the model shapes (rp_config_builtin),
 * and the predicted time, decode floor ratio and training MFU. No GPU. */
#ifndef RP_BENCH_GPU_MODEL_H
#define RP_BENCH_GPU_MODEL_H

#include <stdio.h>

/* Prints the model's markdown tables; returns 0, or 1 when a built-in shape
 * is missing (its message on stderr). */
int gpu_model_print(FILE *out);

#endif
