/* The analytic H100 cost model of the CUDA backend (bench_gpu --model-only,
 * bench_gpu_model): per kernel of a decode step and of a training step, the
 * bytes moved, FLOPs and launches from the model shapes (rp_config_builtin),
 * and the predicted time, decode floor ratio and training MFU. No GPU. */
#ifndef RP_BENCH_GPU_MODEL_H
#define RP_BENCH_GPU_MODEL_H

#include <stdio.h>

#include "model/config.h"

/* Prints the model's markdown tables; returns 0, or 1 when a built-in shape
 * is missing (its message on stderr). */
int gpu_model_print(FILE *out);

/* The wave model's predicted seconds of wkv7_forward_train and wkv7_backward
 * over B sequences of T tokens, width C (heads of 64), on an H100. */
void gpu_model_wkv7(int B, int T, int C, double *fwd_s, double *bwd_s);

/* One kernel row of the model: its name (stable: tests key on it), launches
 * and HBM bytes moved (read + written), over all its launches in the step. */
typedef struct {
    const char *name;
    double launches, bytes;
} gpu_model_row;

/* The rows of one training step (forward, backward, AdamW) of config c over
 * R rows in S sequences, as the tables print them, into rows[0 ..
 * max_rows - 1]; returns how many there are (more than max_rows: the rest
 * left out). tests/cuda_emu/test_model_bytes.c holds them to the bytes the
 * emulated kernels move. */
int gpu_model_train_rows(const rp_config *c, int R, int S, gpu_model_row *rows, int max_rows);

#endif
