#!/bin/bash
# tests/gpu/ptxas_report.sh (the sm_90 resource report of launch/check's CUDA
# step) on saved `ptxas -v` logs, so it is checked without nvcc: the blocks per
# SM it derives from registers, shared memory (static + dynamic, through
# macros) and the launch's block size, and that any spill fails it naming the
# kernel. Run by `make check` (env: top_srcdir).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u
: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
top_srcdir="$(cd "$top_srcdir" && pwd)"
command -v python3 >/dev/null || { echo "skip: no python3"; exit 77; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
report="$top_srcdir/tests/gpu/ptxas_report.sh"

cat >"$work/k.cu" <<'CU'
#define THREADS 256
#define BIG_FLOATS \
    (25000)
static void launch() {
    const int smem = (int)(BIG_FLOATS * sizeof(float));
    int threads = (C + 31) / 32 * 32;
    threads = threads > THREADS ? THREADS : threads;
    gemm_kernel<<<grid, THREADS, 0, stream>>>(a);
    big_kernel<1><<<grid, 128, smem, stream>>>(a);
    row_kernel<<<R, threads, 0, stream>>>(a);
}
CU
entry() {  # MANGLED REGS SMEM SPILL_ST SPILL_LD
    echo "ptxas info    : Compiling entry function '$1' for 'sm_90'"
    echo "ptxas info    : Function properties for $1"
    echo "    0 bytes stack frame, $4 bytes spill stores, $5 bytes spill loads"
    echo "ptxas info    : Used $2 registers, used 1 barriers, $3 bytes smem, 400 bytes cmem[0]"
}
{
    entry _Z11gemm_kernelPf 64 0 0 0
    entry _Z10big_kernelILi1EEvPf 32 1024 0 0
    entry _Z10row_kernelPf 40 0 0 0
} >"$work/clean.log"

out=$("$report" --parse "$work/clean.log" "$work/k.cu" 2>&1) || fail "a clean log failed: $out"
echo "$out"
# 64 regs x 32 lanes = 2048 per warp: 32 warps = 4 blocks of 8 warps.
echo "$out" | grep -q '^| gemm_kernel | 64 | 0/0 | 0 | 256 | 4 | 228 | 8 | 4 (regs) | 50% |$' ||
    fail "gemm_kernel: expected 4 blocks/SM limited by registers"
# 1024 static + 100000 dynamic + 1024 reserved: 233472 / 102048 = 2 blocks.
echo "$out" | grep -q '^| big_kernel<1> | 32 | 0/0 | 1024+100000 | 128 | 16 | 2 | 16 | 2 (smem) | 12% |$' ||
    fail "big_kernel: expected 2 blocks/SM limited by shared memory"
# a run-time block size counts its clamp
echo "$out" | grep -q '^| row_kernel | 40 | 0/0 | 0 | <=256 | 6 | 228 | 8 | 6 (regs) | 75% |$' ||
    fail "row_kernel: expected the clamped block size <=256"
echo "$out" | grep -q 'no spills' || fail "no 'no spills' line"

{
    cat "$work/clean.log"
    entry _Z12spill_kernelPf 255 0 48 52
} >"$work/spill.log"
if out=$("$report" --parse "$work/spill.log" "$work/k.cu" 2>&1); then
    fail "a log with spills passed: $out"
fi
echo "$out" | grep -q 'FAIL: register spills' || fail "no spill message: $out"
echo "$out" | grep -q 'spill_kernel: 48 bytes spill stores, 52 bytes spill loads' ||
    fail "the spill message does not name the kernel: $out"
echo "PASS: ptxas_report derives blocks/SM and fails on spills"
