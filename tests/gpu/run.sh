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
#                              build/gpu-run), and a summary table printed last.
#
# Checks (docs/gpu.md explains each):
#   1. gpukit-check (library resolution) and the nvidia-smi line
#   2. every backend op against its CPU twin on fresh random inputs
#      (tests/gpu/test_cuda_ops: fp32 kernels 1e-5, bf16 GEMM paths 1e-2)
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
if [ ! -d .gpukit ] && [ -f .gpucarry/gpukit.tar.xz ]; then
    echo "tests/gpu/run.sh: unpacking the kit"
    xz -dc .gpucarry/gpukit.tar.xz | tar -xf - || { echo "cannot unpack .gpucarry/gpukit.tar.xz" >&2; exit 2; }
fi
[ -f .gpukit/env.sh ] || { echo "tests/gpu/run.sh: no .gpukit: run 'tests/gpu/run.sh prepare' first and carry .gpucarry" >&2; exit 2; }
out="${OUT:-$root/build/gpu-run}"
mkdir -p "$out"
log="$out/gpu-run.log"
work="$(mktemp -d)"
: >"$log"
# shellcheck disable=SC1091
source .gpukit/env.sh
# env.sh's mpirun is a shell function, which `timeout` cannot run.
mpirun_cmd=("$root/.gpukit/ompi/usr/bin/orterun" --allow-run-as-root --oversubscribe)
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
data="$root/tests/data"
kitdata="$root/.gpukit/data"
py="$(command -v python3 || true)"
bin=rwkvpipe
# RP_GPU_RUN_DEVICE=cpu runs every check on the CPU backend instead: a dry run
# of this script's own logic on a machine without a GPU.
device="${RP_GPU_RUN_DEVICE:-cuda}"
detail=""
declare -a summary=()
failures=0

note() { echo "$*" | tee -a "$log"; }
# record NAME STATUS DETAIL
record() {
    summary+=("$(printf '%-44s %-5s %s' "$1" "$2" "$3")")
    [ "$2" = FAIL ] && failures=$((failures + 1))
    note "== $1: $2 $3"
}
# run SECONDS CMD...: runs with a time limit, output to the log; returns its status
run() {
    local limit=$1
    shift
    echo "\$ $*" >>"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
}

note "# rwkvpipe GPU run, $(date -u '+%Y-%m-%d %H:%M UTC')"
note "## 1. libraries and card"
if gpukit-check >>"$log" 2>&1; then
    record "gpukit-check" PASS "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
else
    record "gpukit-check" FAIL "a library is missing (see the log)"
fi
nvidia-smi >>"$log" 2>&1 || true
"$bin" --version >>"$log" 2>&1 || true

note "## 2. CPU/GPU twin test of every op"
run 180 test_cuda_ops --seed "$(date +%s)"
rc=$?
case $rc in
0) result=PASS ;;
77) result=SKIP ;;
*) result=FAIL ;;
esac
record "twin test (every op, fp32 + bf16)" "$result" "$(grep -a 'twin test' "$log" | tail -1)"

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
run 120 "${mpirun_cmd[@]}" -np 1 test_nccl
rc=$?
case $rc in
0) record "NCCL self send/recv (1 rank)" PASS "$(grep -a 'PASS' "$log" | tail -1)" ;;
77) record "NCCL self send/recv (1 rank)" SKIP "no GPU, or built without NCCL" ;;
*) record "NCCL self send/recv (1 rank)" FAIL "exit $rc (see the log)" ;;
esac

note "## 6. timings"
echo "\$ bench_gpu --profile" >>"$log"
timeout --kill-after=10 300 bench_gpu --profile >"$out/bench_gpu.txt" 2>>"$log"
rc=$?
cat "$out/bench_gpu.txt" >>"$log"
if [ $rc -eq 0 ]; then
    record "bench_gpu" PASS "table below"
elif [ $rc -eq 77 ]; then
    record "bench_gpu" SKIP "no CUDA device"
else
    record "bench_gpu" FAIL "exit status $rc (see the log)"
fi

{
    echo
    echo "## bench_gpu"
    cat "$out/bench_gpu.txt" 2>/dev/null || true
    echo
    echo "## summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
    printf '%-44s %-5s %s\n' check result detail
    for line in "${summary[@]}"; do echo "$line"; done
    echo "failures: $failures"
} | tee -a "$log"
rm -rf "$work"
[ "$failures" -eq 0 ]
