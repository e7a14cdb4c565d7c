#!/bin/sh
# make check: the CPU/CUDA twin test of every backend op against the cuda/*.cu
# kernels compiled over the emulated CUDA runtime (tests/cuda_emu/README.md).
# RP_EMU_ARGS is --quick in the sanitizer build, where fibers run slowly.
exec "$top_builddir/tests/cuda_emu/test_cuda_ops_emu" $RP_EMU_ARGS
