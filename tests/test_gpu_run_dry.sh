#!/bin/bash
# The dry run of the GPU verification script (RP_GPU_RUN_DEVICE=cpu
# tests/gpu/run.sh device): every check on the CPU backend with this build's
# programs, the GPU-only steps (nvidia-smi, the twin test, compute-sanitizer,
# NCCL, bench_gpu) SKIP, and it exits 0 with "failures: 0". Then with a 1 s
# overall deadline: the steps left are not run, each is a FAIL that says
# "timed out", the summary is still printed and the exit status is non-zero.
# Run by make check (env: top_srcdir, top_builddir).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u
: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${top_builddir:=.}"
top_builddir="$(cd "$top_builddir" && pwd)"
command -v mpirun >/dev/null || { echo "skip: no mpirun"; exit 77; }
command -v python3 >/dev/null || { echo "skip: no python3"; exit 77; }
[ -d "$top_srcdir/.gpukit" ] && { echo "skip: a .gpukit is unpacked here; the dry run would use it"; exit 77; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
export OPENBLAS_NUM_THREADS=1

OUT="$work/full" RP_GPU_RUN_DEVICE=cpu RP_GPU_RUN_BUILD="$top_builddir" \
    bash "$top_srcdir/tests/gpu/run.sh" device >"$work/full.txt" 2>&1
rc=$?
cat "$work/full.txt"
[ $rc -eq 0 ] || fail "the dry run exited $rc"
grep -q '^failures: 0$' "$work/full.txt" || fail "no 'failures: 0' line"
grep -q '^nvidia-smi  *SKIP  not installed (dry run)' "$work/full.txt" ||
    command -v nvidia-smi >/dev/null || fail "nvidia-smi is not a SKIP in the dry run"
grep -q '^compute-sanitizer racecheck  *SKIP' "$work/full.txt" || fail "racecheck not a SKIP"
grep -q '^golden logits tiny_L2_C128_V256_s1 fp32  *PASS' "$work/full.txt" ||
    fail "the golden check did not run on the CPU backend"
grep -q '^20 train steps GPU fp32 vs CPU  *PASS' "$work/full.txt" || fail "training check"
# The summary is written as it goes.
[ "$(wc -l <"$work/full/summary.txt")" -ge 10 ] || fail "summary.txt has fewer than 10 results"

OUT="$work/late" RP_GPU_RUN_DEVICE=cpu RP_GPU_RUN_BUILD="$top_builddir" RP_GPU_RUN_BUDGET=1 \
    bash "$top_srcdir/tests/gpu/run.sh" device >"$work/late.txt" 2>&1
rc=$?
cat "$work/late.txt"
[ $rc -ne 0 ] || fail "a run past its deadline exited 0"
grep -q 'FAIL  timed out' "$work/late.txt" || fail "no 'timed out' FAIL after the deadline"
grep -q '^failures: [1-9]' "$work/late.txt" || fail "no failure count after the deadline"
echo "PASS: the dry run exits 0 with GPU-only steps skipped; the deadline cuts the run short"
