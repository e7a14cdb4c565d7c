#!/bin/sh
# make check: the twin test with the kernels and the test compiled with
# -ffp-contract=fast -mfma, as nvcc contracts a*b+c into FMAs: the twin
# tolerances must hold under contraction too (tests/cuda_emu/README.md).
if ! grep -qw fma /proc/cpuinfo 2>/dev/null; then
    echo "skip: this CPU has no FMA instructions (the build has them)"
    exit 77
fi
exec "$top_builddir/tests/cuda_emu/test_cuda_ops_fma" $RP_EMU_ARGS
