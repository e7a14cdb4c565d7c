#!/bin/bash
# ZeRO-1 (train --zero 1, docs/parallelism.md): the Adam moments sharded
# over the data replicas give the weights and moments of the unsharded run
# byte for byte (-np 2 = 2 replicas; -np 4 --pp 2 = 2 stages x 2 replicas;
# -np 3 = 3 replicas, uneven shard boundaries), with gradient clipping on so
# the global norm matters; a --zero 1 checkpoint holds the whole moments and
# resumes on another DP x PP and without --zero, continuing the same run;
# the start-up memory line shows the optimizer memory per rank divided by DP.
# The same on device memory (RWKVPIPE_TEST_FAKE_DEVICE=1: the CPU's
# arithmetic on memory the host cannot touch, so every host access to a
# moment, gradient or weight faults): the moments' shards, the collectives
# (staged through host buffers over MPI) and the AdamW step stay on the
# device, with the CPU run's bytes. (The NCCL path: tests/test_nccl_mock.sh.)
# Run by `make check` (env: top_srcdir, top_builddir, MPIRUN, PYTHON3).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun"
    exit 77
fi
BIN="$top_builddir/rwkvpipe"
COMPARE="$top_srcdir/tests/st_compare.py"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_zero.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT

. "$top_srcdir/tests/check_report.sh"

# A 4-layer model, 6 steps of MQAR; --grad-clip 0.05 clips every step, so a
# norm that is not the global one changes the weights.
COMMON=(train --model-config L4-C64-V64 --data mqar --ctx-len 16 --steps 6
        --warmup 2 --lr 3e-3 --grad-clip 0.05 --eval-interval 0 --eval-batches 1
        --log-interval 1 --loss-on all --seed 3 --init-seed 5 --threads 1)

# train NAME NP [ARGS...]: weights in $T/NAME.st, checkpoints in $T/NAME.ck,
# standard error in $T/NAME.err
train() {
    local name=$1 np=$2
    shift 2
    if ! env ${TRAIN_ENV:-} timeout 300 "$MPIRUN" -np "$np" "$BIN" "${COMMON[@]}" -o "$T/$name.st" \
        --checkpoint-dir "$T/$name.ck" "$@" >"$T/stdout" 2>"$T/stderr"; then
        fail "$name: mpirun -np $np rwkvpipe ${COMMON[*]} $* failed"
    fi
    cp "$T/stderr" "$T/$name.err"
}

# same_bytes A B: the final weights and every safetensors file of the last
# checkpoints (weights and both moments, every stage's shard) are identical
same_bytes() {
    cmp -s "$T/$1.st" "$T/$2.st" || {
        "$PYTHON3" "$COMPARE" "$T/$1.st" "$T/$2.st" >"$T/cmp" 2>&1
        head -5 "$T/cmp"
        fail "$2: final weights are not byte for byte those of $1"
    }
    local a="$T/$1.ck/$(cat "$T/$1.ck/latest")" b="$T/$2.ck/$(cat "$T/$2.ck/latest")" n=0
    for f in "$a"/*.safetensors; do
        cmp -s "$f" "$b/$(basename "$f")" ||
            fail "$2: checkpoint file $(basename "$f") differs from $1's"
        n=$((n + 1))
    done
    [ "$n" -ge 3 ] || fail "$1: only $n checkpoint files in $a"
    [ "$(ls "$b"/*.safetensors | wc -l)" -eq "$n" ] || fail "$2: not the $n files of $1"
    echo "  ok: $2 = $1 byte for byte (weights and $n checkpoint files)"
}

# optimizer_bytes NAME: the optimizer bytes of rank 0's start-up memory line
optimizer_bytes() {
    sed -n 's/^memory per rank.*optimizer [0-9.]* MiB (\([0-9]*\) bytes.*/\1/p' "$T/$1.err" |
        head -1
}

for layout in "2 --batch 8 --micro-batch 2" "4 --pp 2 --batch 8 --micro-batch 2" \
              "3 --batch 6 --micro-batch 1"; do
    set -- $layout
    np=$1
    shift
    tag="np${np}$(echo "$*" | tr -d ' -')"
    check "-np $np $*: --zero 1 gives the unsharded run's bytes"
    train "full_$tag" "$np" "$@"
    train "zero_$tag" "$np" "$@" --zero 1
    same_bytes "full_$tag" "zero_$tag"
    grep -q "zero: optimizer state sharded over" "$T/zero_$tag.err" ||
        fail "zero_$tag: no line saying the optimizer state is sharded"
    full=$(optimizer_bytes "full_$tag")
    zero=$(optimizer_bytes "zero_$tag")
    [ -n "$full" ] && [ -n "$zero" ] || fail "$tag: no start-up memory line (got '$full' '$zero')"
    case $layout in *"--pp 2"*) dp=$((np / 2)) ;; *) dp=$np ;; esac
    # Each buffer's range is n/DP rounded: at most 8 bytes per buffer off.
    "$PYTHON3" -c "import sys; f, z, d = $full, $zero, $dp; sys.exit(0 if d * z <= f <= d * z + 8 * d * 8 else 1)" ||
        fail "$tag: optimizer memory per rank $zero bytes with --zero 1 is not 1/$dp of $full"
    ok "optimizer memory per rank $full -> $zero bytes (DP $dp)"
    check "-np $np $*: --zero 1 on device memory (fake device) gives the CPU run's bytes"
    TRAIN_ENV=RWKVPIPE_TEST_FAKE_DEVICE=1 train "fdzero_$tag" "$np" "$@" --zero 1
    grep -q "zero: optimizer state sharded over" "$T/fdzero_$tag.err" ||
        fail "fdzero_$tag: no line saying the optimizer state is sharded"
    same_bytes "full_$tag" "fdzero_$tag"
    fdzero=$(optimizer_bytes "fdzero_$tag")
    [ "$fdzero" = "$zero" ] ||
        fail "$tag: optimizer memory per rank on the device $fdzero bytes, on the CPU $zero"
    ok "device optimizer memory per rank $full -> $fdzero bytes (DP $dp)"
done

check "a --zero 1 checkpoint (2 stages x 2 replicas) resumes elsewhere and continues the same run"
ZL=(--batch 8 --micro-batch 2)
train half 4 --pp 2 "${ZL[@]}" --zero 1 --stop-after 3
[ -d "$T/half.ck/step-00000003" ] || fail "no checkpoint at step 3: $(ls "$T/half.ck")"
"$BIN" info "$T/half.ck" --verify >"$T/stdout" 2>"$T/stderr" || fail "info --verify"
# The moments are stored whole: the same tensors, shapes and sizes as an
# unsharded run's checkpoint.
train half_plain 4 --pp 2 "${ZL[@]}" --stop-after 3
for f in "$T/half_plain.ck/step-00000003"/*.safetensors; do
    cmp -s "$f" "$T/half.ck/step-00000003/$(basename "$f")" ||
        fail "step-3 checkpoint file $(basename "$f") differs from the unsharded run's"
done
ok "the step-3 checkpoint equals the unsharded run's byte for byte"
# Same layout without --zero: bit for bit; other layouts: the same run
# within the summation order of another data-parallel split (1e-5).
# fd: on the fake device (the shards taken from the checkpoint by device copies).
for resume in "4 --pp 2:bytes" "4 --pp 2 --zero 1:bytes" "2 --pp 2:tol" "2 --zero 1:tol" \
              "1:tol" "4 --pp 2 --zero 1:bytes:fd" "2 --zero 1:tol:fd"; do
    envs=
    case $resume in *:fd) envs=RWKVPIPE_TEST_FAKE_DEVICE=1 resume=${resume%:fd} ;; esac
    how=${resume#*:}
    set -- ${resume%:*}
    np=$1
    shift
    name="resume_np${np}$(echo "$*" | tr -d ' -')${envs:+_fd}"
    cp -r "$T/half.ck" "$T/$name.ck"
    if ! env $envs timeout 300 "$MPIRUN" -np "$np" "$BIN" "${COMMON[@]}" "$@" "${ZL[@]}" \
        --resume "$T/$name.ck" -o "$T/$name.st" >"$T/stdout" 2>"$T/stderr"; then
        fail "resume on -np $np $*"
    fi
    if [ "$how" = bytes ]; then
        cmp -s "$T/zero_np4pp2batch8microbatch2.st" "$T/$name.st" ||
            fail "resumed on -np $np $*: weights are not those of the uninterrupted run byte for byte"
    else
        "$PYTHON3" "$COMPARE" "$T/zero_np4pp2batch8microbatch2.st" "$T/$name.st" --tol 1e-5 \
            >"$T/cmp" 2>&1 ||
            { cat "$T/cmp"; fail "resumed on -np $np $*: weights differ from the uninterrupted run"; }
    fi
    ok "-np $np $* ($how${envs:+, fake device})"
done

check "--zero is refused where it cannot run"
if "$BIN" "${COMMON[@]}" --batch 2 --zero 2 >"$T/stdout" 2>"$T/stderr"; then
    fail "--zero 2 was accepted"
fi
grep -q -- "--zero" "$T/stderr" || fail "no message naming --zero"
ok "$(grep -m1 -- '--zero' "$T/stderr" | sed 's/^.*error: //')"

echo "all zero checks passed"
