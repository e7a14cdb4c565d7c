#!/bin/sh
# make check: each mistake in emu_catches.cu must be reported by the emulated
# CUDA runtime (exit non-zero with the expected message), and its fixed
# variant must pass (tests/cuda_emu/README.md).
bin="$top_builddir/tests/cuda_emu/emu_catches"
fail=0
ulimit -c 0 2>/dev/null
# expect CASE REGEX [ENV...]: `bad` must fail with REGEX on stderr, `fixed` must pass.
expect() {
    name=$1 re=$2; shift 2
    if env "$@" "$bin" "$name" bad >/dev/null 2>"$tmp"; then
        echo "FAIL $name: the mistake was not reported"; fail=1
    elif ! grep -Eq "$re" "$tmp"; then
        echo "FAIL $name: reported without /$re/:"; sed 's/^/  /' "$tmp"; fail=1
    else
        echo "ok   $name: $(grep -E "$re" "$tmp" | head -1)"
    fi
    if ! env "$@" "$bin" "$name" fixed >/dev/null 2>"$tmp"; then
        echo "FAIL $name fixed: the correct variant fails:"; sed 's/^/  /' "$tmp"; fail=1
    fi
}
tmp=$(mktemp) || exit 1
trap 'rm -f "$tmp"' EXIT
expect host_read 'EMU FATAL: host read of pinned memory .* queued device-to-host copy still writes it'
expect pinned_reuse 'EMU FATAL: host write to pinned memory .* queued host-to-device copy still reads it'
expect free_queued 'EMU FATAL: cudaFree\(.*\) while queued work still uses it \(kernel fill\)'
expect freehost_queued 'EMU FATAL: cudaFreeHost\(.*\) while queued work still uses it'
expect legacy_order 'stale input' EMU_STREAM_ORDER=0
expect legacy_event 'stale input' EMU_STREAM_ORDER=0
expect graph_malloc 'EMU: cudaMalloc during stream capture: the capture is invalidated'
expect graph_sync 'EMU: cudaStreamSynchronize during stream capture: the capture is invalidated'
expect graph_pageable 'EMU: a copy from or to pageable host memory during stream capture'
# Checked kernel accesses need the -fsanitize=thread hooks, which ASan builds cannot add.
if [ "${RP_EMU_CHECKED:-1}" = 1 ]; then
    expect smem_race 'EMU FATAL: k block .*: shared-memory race on buf byte'
    expect warp_race 'EMU FATAL: k block .*: shared-memory race on buf byte'
    expect oob_after 'EMU FATAL: k block .*: out-of-bounds write of 4 bytes .* byte 256 of a 256-byte device allocation'
    expect oob_before 'EMU FATAL: k block .*: out-of-bounds write of 4 bytes .* 4 bytes before a 256-byte device allocation'
    expect pdl_early_read 'EMU FATAL: pdl_scale block .*: read of 4 bytes .* that a kernel it may overlap writes, before cudaGridDependencySynchronize'
    expect pdl_trigger_chain 'EMU FATAL: pdl_scale block .*: read of 4 bytes .* that a kernel it may overlap writes, before cudaGridDependencySynchronize'
else
    echo "skip smem_race, warp_race, oob_after, oob_before, pdl_early_read, pdl_trigger_chain: no checked accesses in the sanitizer build"
fi
expect barrier_sites 'EMU FATAL: k block .*: barrier divergence: thread .* waits at __syncthreads .*emu_catches.cu:[0-9]+ while thread .* waits at .*emu_catches.cu:[0-9]+'
expect barrier_exit 'EMU FATAL: k block .*: barrier divergence: 32 threads wait at __syncthreads .* while 32 threads of the block have exited'
expect wmma_lanes 'EMU FATAL: wmma_lanes: wmma::load_matrix_sync called by the lanes of warp 0 with different arguments'
exit $fail
