#!/usr/bin/env bash
# The GPU verification of the CUDA backend, in two halves:
#
#   tests/gpu/run.sh prepare   here (nvcc, no GPU): builds the CUDA variant for
#                              sm_90 (+ compute_90 PTX), packs the programs, their
#                              libraries and Open MPI into .gpukit/ with
#                              ../shared/device/gpu-kit.sh, and the test data
#                              (tests/data travels with the tree; the larger
#                              golden set is copied into .gpukit/data).
#   tests/gpu/run.sh device    on the GPU machine (device run, carry .gpucarry,
#                              the packed kit):
#                              every check below, the log under $OUT (or
#                              build/gpu-run); each result is printed (and
#                              appended to $OUT/summary.txt) as it comes, the
#                              table again at the end, also when cut short.
#   RP_GPU_RUN_DEVICE=cpu tests/gpu/run.sh device
#                              the dry run, here: the same script on the CPU
#                              backend with build/cpu's programs; GPU-only steps
#                              SKIP and it exits 0 (tests/test_gpu_run_dry.sh).
#
# One overall deadline (RP_GPU_RUN_BUDGET, 480 s): every step's time limit is
# cut to what is left, so one hang cannot eat the device time.
# Checks (docs/gpu.md explains each):
#   1. library resolution of the kit's programs and the nvidia-smi line
#   2. every backend op against its CPU twin on fresh random inputs
#      (tests/gpu/test_cuda_ops: fp32 kernels 1e-5, bf16 GEMM paths 1e-2),
#      then compute-sanitizer --tool racecheck and --tool memcheck on
#      test_cuda_ops --quick, 90 s each (SKIP where the machine has no sanitizer)
#   3. golden logits and gradients of the official RWKV-7 on the GPU
#      (fp32 math 1e-4 like the CPU; bf16 math 3e-2)
#   4. 20 training steps on the GPU against the CPU trainer
#   5. two ranks on the one GPU through the MPI fallback (--pp 2) = one rank;
#      one-rank NCCL self send/recv (tests/gpu/test_nccl)
#   6. timings: bench/bench_gpu --profile (ceilings, decode, wkv7, training MFU,
#      then the time of every backend op in a decode and a training step)
# Budget: about 8 minutes on one H100.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
mode="${1:-}"

case "$mode" in
prepare)
    set -e
    export CUDA_ARCH_FLAGS="${CUDA_ARCH_FLAGS:--gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90}"
    launch/build cuda
    make -C build/cuda -j"$(nproc)" tests/gpu/test_cuda_ops tests/gpu/test_nccl bench/bench_gpu >/dev/null
    kit="$root/../shared/device/gpu-kit.sh"
    [ -x "$kit" ] || { echo "tests/gpu/run.sh: $kit not found (it comes with the workplace)" >&2; exit 2; }
    "$kit" build/cuda/rwkvpipe build/cuda/tests/gpu/test_cuda_ops build/cuda/tests/gpu/test_nccl \
        build/cuda/bench/bench_gpu
    mkdir -p .gpukit/data
    golden="$root/../shared/golden/rwkv7"
    # The larger set's gradients (15 MB) stay behind: the carry limit is 64 MiB.
    for f in small_L4_C256_V1024_s2.weights.safetensors small_L4_C256_V1024_s2.golden.safetensors; do
        [ -f "$golden/$f" ] && cp "$golden/$f" .gpukit/data/
    done
    cp tests/check_logits.py tests/st_compare.py .gpukit/data/
    # Compressed, the kit fits beside the tree in the 64 MiB a device run carries.
    mkdir -p .gpucarry
    grep -qx '/.gpucarry/' .git/info/exclude 2>/dev/null || echo '/.gpucarry/' >>.git/info/exclude
    echo "tests/gpu/run.sh: packing .gpukit into .gpucarry/gpukit.tar.xz (about a minute)"
    tar -cf - .gpukit | xz -T0 -6 >.gpucarry/gpukit.tar.xz
    du -sh .gpucarry/gpukit.tar.xz | awk '{print "tests/gpu/run.sh: the packed kit is " $1 " (the tree travels with a 64 MiB limit)"}'
    echo "tests/gpu/run.sh: ready; on the GPU machine run (carry .gpucarry):"
    echo "    bash tests/gpu/run.sh device"
    exit 0
    ;;
device) ;;
*)
    echo "usage: tests/gpu/run.sh prepare|device   (see the header of this file)" >&2
    exit 2
    ;;
esac

# ---- on the GPU machine ----
# RP_GPU_RUN_DEVICE=cpu runs every check on the CPU backend instead: a dry run
# of this script's own logic on a machine without a GPU (make check runs it:
# tests/test_gpu_run_dry.sh). Without a kit it takes the programs from
# RP_GPU_RUN_BUILD (default build/cpu); the GPU-only steps (nvidia-smi, the
# twin test, the sanitizers, NCCL, bench_gpu) then SKIP, and it exits 0.
device="${RP_GPU_RUN_DEVICE:-cuda}"
dry=0
[ "$device" = cpu ] && dry=1
# One overall deadline, so a hang in one step cannot eat the device budget:
# every step's time limit is cut to what is left of it.
budget="${RP_GPU_RUN_BUDGET:-480}"
deadline=$((SECONDS + budget))
if [ ! -d .gpukit ] && [ -f .gpucarry/gpukit.tar.xz ]; then
    echo "tests/gpu/run.sh: unpacking the kit"
    xz -dc .gpucarry/gpukit.tar.xz | tar -xf - || { echo "cannot unpack .gpucarry/gpukit.tar.xz" >&2; exit 2; }
fi
have_kit=0
[ -f .gpukit/env.sh ] && have_kit=1
if [ $have_kit -eq 0 ] && [ $dry -eq 0 ]; then
    echo "tests/gpu/run.sh: no .gpukit: run 'tests/gpu/run.sh prepare' first and carry .gpucarry" >&2
    exit 2
fi
out="${OUT:-$root/build/gpu-run}"
mkdir -p "$out"
log="$out/gpu-run.log"
sumfile="$out/summary.txt"
work="$(mktemp -d)"
: >"$log"
: >"$sumfile"
if [ $have_kit -eq 1 ]; then
    # shellcheck disable=SC1091
    source .gpukit/env.sh
    # env.sh's mpirun is a shell function, which `timeout` cannot run.
    mpirun_cmd=("$root/.gpukit/ompi/usr/bin/orterun" --allow-run-as-root --oversubscribe)
    kitdata="$root/.gpukit/data"
else
    build="${RP_GPU_RUN_BUILD:-$root/build/cpu}"
    [ -x "$build/rwkvpipe" ] || { echo "tests/gpu/run.sh: dry run: no $build/rwkvpipe (launch/build cpu, or set RP_GPU_RUN_BUILD)" >&2; exit 2; }
    PATH="$build:$build/tests/gpu:$build/bench:$PATH"
    mpirun_cmd=("$(command -v mpirun || echo mpirun)" --allow-run-as-root --oversubscribe)
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    kitdata="$root/tests"
fi
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
data="$root/tests/data"
py="$(command -v python3 || true)"
bin=rwkvpipe
detail=""
declare -a summary=()
failures=0
last_rc=0
card="no GPU (dry run on the CPU backend)"

note() { echo "$*" | tee -a "$log"; }
print_summary() {
    printf '%-44s %-5s %s\n' check result detail
    for line in "${summary[@]}"; do echo "$line"; done
    echo "failures: $failures"
}
# record NAME STATUS DETAIL: the summary grows as the run goes (printed and in
# $OUT/summary.txt), so a run cut short still says what passed.
record() {
    local line detail=$3
    # A step whose program ran out of time says so, whatever it reports.
    if [ "$2" = FAIL ] && [ "${3#timed out}" = "$3" ]; then
        case $last_rc in 124 | 137) detail="timed out (limit or the ${budget} s deadline): $3" ;; esac
    fi
    last_rc=0
    line="$(printf '%-44s %-5s %s' "$1" "$2" "$detail")"
    summary+=("$line")
    [ "$2" = FAIL ] && failures=$((failures + 1))
    echo "$line" >>"$sumfile"
    note "== $1: $2 $3"
}
left() { echo $((deadline - SECONDS)); }
# run SECONDS CMD...: runs with a time limit (cut to the overall deadline),
# output to the log; returns its status, 124 on a timeout.
run() {
    local limit=$1 rest
    shift
    rest=$(left)
    [ "$rest" -lt "$limit" ] && limit=$rest
    if [ "$limit" -le 0 ]; then
        echo "\$ $* (not run: the ${budget} s deadline has passed)" >>"$log"
        last_rc=124
        return 124
    fi
    echo "\$ $*   (limit ${limit} s)" >>"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    last_rc=$?
    return $last_rc
}
# A step that did not finish: a timeout is a failure that says so.
why() {  # STATUS -> words
    case $1 in
    124 | 137) echo "timed out (limit or the ${budget} s deadline)" ;;
    127) echo "program not found" ;;
    *) echo "exit status $1" ;;
    esac
}
on_exit() {
    local rc=$?
    rm -rf "$work"
    if [ "${finished:-0}" -ne 1 ]; then
        echo "tests/gpu/run.sh: stopped before the end (status $rc); the summary so far:" | tee -a "$log"
        print_summary | tee -a "$log"
    fi
}
trap on_exit EXIT
trap 'exit 143' TERM INT

note "# rwkvpipe GPU run, $(date -u '+%Y-%m-%d %H:%M UTC'), deadline ${budget} s$([ $dry -eq 1 ] && echo ', DRY RUN on the CPU backend')"
note "## 1. libraries and card"
if [ $have_kit -eq 1 ]; then
    for f in .gpukit/bin/*; do echo "== $f"; ldd "$f" 2>&1; done >"$work/ldd.txt"
    cat "$work/ldd.txt" >>"$log"
    if ! grep -q 'not found' "$work/ldd.txt"; then
        record "libraries (ldd of the kit's programs)" PASS "every library resolves"
    else
        record "libraries (ldd of the kit's programs)" FAIL "a library is missing (see the log)"
    fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    if card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>>"$log" | head -1) &&
        [ -n "$card" ]; then
        record "nvidia-smi" PASS "$card"
        nvidia-smi >>"$log" 2>&1 || true
    else
        record "nvidia-smi" FAIL "nvidia-smi sees no GPU (see the log)"
        card="no GPU visible"
    fi
elif [ $dry -eq 1 ]; then
    record "nvidia-smi" SKIP "not installed (dry run)"
else
    record "nvidia-smi" FAIL "not installed: this machine has no NVIDIA driver"
    card="no NVIDIA driver"
fi
"$bin" --version >>"$log" 2>&1 || true

# gpu_step NAME SECONDS CMD...: a GPU-only program; 77 (no device) and, in the
# dry run, a program that is not built are SKIP.
gpu_step() {
    local name=$1 limit=$2 rc
    shift 2
    if ! command -v "$1" >/dev/null 2>&1; then
        if [ $dry -eq 1 ]; then record "$name" SKIP "$1 not built (dry run)"; else record "$name" FAIL "$1 not in the kit"; fi
        return
    fi
    run "$limit" "$@"
    rc=$?
    case $rc in
    0) record "$name" PASS "${detail:-}" ;;
    77) record "$name" SKIP "no CUDA device, or not built for it" ;;
    *) record "$name" FAIL "$(why $rc) (see the log)" ;;
    esac
}

note "## 2. CPU/GPU twin test of every op"
detail="see 'twin test' in the log"
gpu_step "twin test (every op, fp32 + bf16)" 180 test_cuda_ops --seed "$(date +%s)"

note "## 2b. compute-sanitizer racecheck and memcheck (test_cuda_ops --quick)"
sanitizer="$(command -v compute-sanitizer || true)"
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
for tool in racecheck memcheck; do
    if [ $dry -eq 1 ]; then
        record "compute-sanitizer $tool" SKIP "GPU only (dry run)"
    elif [ -z "$sanitizer" ]; then
        record "compute-sanitizer $tool" SKIP "compute-sanitizer not installed on this machine"
    elif ! command -v test_cuda_ops >/dev/null 2>&1; then
        record "compute-sanitizer $tool" FAIL "test_cuda_ops not in the kit"
    else
        # --error-exitcode: a hazard or a bad access fails the step even where
        # the test's own comparisons pass.
        run 90 "$sanitizer" --tool "$tool" --error-exitcode 3 "$(command -v test_cuda_ops)" --quick --seed 1
        rc=$?
        case $rc in
        0) record "compute-sanitizer $tool" PASS "no hazards or errors" ;;
        77) record "compute-sanitizer $tool" SKIP "no CUDA device" ;;
        3) record "compute-sanitizer $tool" FAIL "the sanitizer reported errors (see the log)" ;;
        *) record "compute-sanitizer $tool" FAIL "$(why $rc) (see the log)" ;;
        esac
    fi
done

note "## 3. golden logits and gradients on the GPU"
golden_check() {  # NAME MODEL GOLDEN MATH TOL [--grads]
    local name=$1 model=$2 golden=$3 math=$4 tol=$5 grads=${6:-}
    [ -f "$model" ] && [ -f "$golden" ] || { record "$name" SKIP "no $golden"; return; }
    local tokens
    tokens=$("$py" "$kitdata/check_logits.py" --tokens "${golden%.*.safetensors}.golden.safetensors")
    if run 120 "${mpirun_cmd[@]}" -np 1 "$bin" logits --device "$device" --gpu-math "$math" --model "$model" \
        --tokens "$tokens" $grads -o "$work/${name// /_}.safetensors" &&
        run 60 "$py" "$kitdata/check_logits.py" $grads --tol "$tol" "$work/${name// /_}.safetensors" "$golden"; then
        record "$name" PASS "tol $tol"
    else
        record "$name" FAIL "tol $tol (see the log)"
    fi
}
for size in tiny_L2_C128_V256_s1 small_L4_C256_V1024_s2; do
    d="$data"
    [ -f "$d/$size.weights.safetensors" ] || d="$kitdata"
    for math in fp32 bf16; do
        tol=1e-4
        [ "$math" = bf16 ] && tol=3e-2
        golden_check "golden logits $size $math" "$d/$size.weights.safetensors" \
            "$d/$size.golden.safetensors" "$math" "$tol"
    done
    golden_check "golden gradients $size fp32" "$d/$size.weights.safetensors" \
        "$d/$size.grads.safetensors" fp32 1e-4 --grads
done

note "## 4. 20 training steps: GPU against the CPU trainer"
train_run() {  # NAME NP DEVICE MATH [extra args]
    local name=$1 np=$2 device=$3 math=$4
    shift 4
    run 300 "${mpirun_cmd[@]}" -np "$np" "$bin" train --model-config tiny --data mqar --mqar-pairs 8 \
        --ctx-len 64 --batch 16 --micro-batch 8 --steps 20 --lr 3e-3 --seed 7 --log-interval 5 \
        --device "$device" --gpu-math "$math" --metrics "$work/$name.jsonl" \
        -o "$work/$name.safetensors" "$@"
}
compare_losses() {  # A B TOL -> prints max relative difference, fails above TOL
    "$py" - "$1" "$2" "$3" <<'EOF'
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1]) if '"loss"' in l]
b = [json.loads(l)["loss"] for l in open(sys.argv[2]) if '"loss"' in l]
if len(a) != len(b) or not a:
    print(f"steps differ: {len(a)} vs {len(b)}"); sys.exit(1)
worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
print(f"max relative loss difference over {len(a)} steps: {worst:.2e} (first {a[0]:.6f} / {b[0]:.6f}, last {a[-1]:.6f} / {b[-1]:.6f})")
sys.exit(0 if worst <= float(sys.argv[3]) else 1)
EOF
}
train_run cpu 1 cpu fp32 --threads 8
for math in fp32 bf16; do
    tol=1e-3
    [ "$math" = bf16 ] && tol=3e-2
    detail=""
    if train_run "gpu-$math" 1 "$device" "$math" && detail=$(compare_losses "$work/gpu-$math.jsonl" "$work/cpu.jsonl" "$tol"); then
        record "20 train steps GPU $math vs CPU" PASS "$detail"
    else
        record "20 train steps GPU $math vs CPU" FAIL "${detail:-the run failed (see the log)}"
    fi
    echo "$detail" >>"$log"
done

note "## 5. two ranks on one GPU (MPI fallback) and NCCL"
detail=""
if train_run "pp2" 2 "$device" fp32 --pp 2 && detail=$(compare_losses "$work/pp2.jsonl" "$work/gpu-fp32.jsonl" 1e-6) &&
    run 60 "$py" "$kitdata/st_compare.py" --tol 1e-6 "$work/pp2.safetensors" "$work/gpu-fp32.safetensors"; then
    record "2 ranks, 1 GPU, --pp 2 (MPI staging) = 1 rank" PASS "$detail; weights within 1e-6"
else
    record "2 ranks, 1 GPU, --pp 2 (MPI staging) = 1 rank" FAIL "${detail:-see the log}"
fi
if command -v test_nccl >/dev/null 2>&1; then
    run 120 "${mpirun_cmd[@]}" -np 1 "$(command -v test_nccl)"
    rc=$?
    case $rc in
    0) record "NCCL self send/recv (1 rank)" PASS "$(grep -a '^PASS' "$log" | tail -1)" ;;
    77) record "NCCL self send/recv (1 rank)" SKIP "no GPU, or built without NCCL" ;;
    *) record "NCCL self send/recv (1 rank)" FAIL "$(why $rc) (see the log)" ;;
    esac
elif [ $dry -eq 1 ]; then
    record "NCCL self send/recv (1 rank)" SKIP "test_nccl not built (dry run)"
else
    record "NCCL self send/recv (1 rank)" FAIL "test_nccl not in the kit"
fi

note "## 6. timings"
if ! command -v bench_gpu >/dev/null 2>&1; then
    if [ $dry -eq 1 ]; then record "bench_gpu" SKIP "not built (dry run)"; else record "bench_gpu" FAIL "bench_gpu not in the kit"; fi
else
    rest=$(left)
    [ "$rest" -gt 300 ] && rest=300
    echo "\$ bench_gpu --profile   (limit ${rest} s)" >>"$log"
    if [ "$rest" -gt 0 ]; then
        timeout --kill-after=10 "$rest" bench_gpu --profile >"$out/bench_gpu.txt" 2>>"$log"
        rc=$?
    else
        rc=124
    fi
    cat "$out/bench_gpu.txt" >>"$log" 2>/dev/null
    case $rc in
    0) record "bench_gpu" PASS "table below" ;;
    77) record "bench_gpu" SKIP "no CUDA device" ;;
    *) record "bench_gpu" FAIL "$(why $rc) (see the log)" ;;
    esac
fi

finished=1
{
    echo
    echo "## bench_gpu"
    cat "$out/bench_gpu.txt" 2>/dev/null || true
    echo
    echo "## summary ($card; $SECONDS s of the ${budget} s deadline)"
    print_summary
} | tee -a "$log"
[ "$failures" -eq 0 ]
