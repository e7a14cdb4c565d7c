/* bench_gpu_model: `bench_gpu --model-only` in every build (bench_gpu needs
 * CUDA to link): prints the analytic H100 model of the CUDA backend
 * (bench/gpu_model.c) without a GPU. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "gpu_model.h"

int main(int argc, char **argv) {
    if (argc > 1) {
        fprintf(argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) ? stdout
                                                                                      : stderr,
                "usage: bench_gpu_model\n\nThe analytic H100 model of the CUDA backend, as "
                "bench_gpu --model-only prints it (no GPU needed).\n");
        return argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) ? 0 : 2;
    }
    return gpu_model_print(stdout);
}
