#!/bin/bash
# Pipeline-parallel training is the same training run as one process
# (docs/parallelism.md): for one global batch, seed and data, every layout
# (stages x data replicas) and schedule gives the losses of every step and
# the final weights of `-np 1` within 1e-5 relative. Also: checkpoints
# written by 4 stages resume on 2 stages or 1 and continue exactly like an
# uninterrupted run; a bad --stage-layers map is refused.
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
T=$(mktemp -d "${TMPDIR:-/tmp}/test_pipeline.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT

. "$top_srcdir/tests/check_report.sh"

# A 4-layer model, 10 steps of 8 sequences of 16 tokens of MQAR; --loss-on all
# so every position has a target; warmup 2 so the LR moves.
COMMON=(train --model-config L4-C64-V64 --data mqar --ctx-len 16 --batch 8 --steps 10
        --warmup 2 --lr 3e-3 --eval-interval 0 --eval-batches 1 --log-interval 1
        --loss-on all --seed 3 --init-seed 5 --threads 1)

. "$top_srcdir/tests/train_test_lib.sh"   # train NAME NP [ARGS...]

# same_run NAME: losses and weights equal the reference within 1e-5 relative
same_run() {
    "$PYTHON3" - "$T/ref.jsonl" "$T/$1.jsonl" <<'PY' || fail "$1: losses differ from -np 1"
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
assert len(a) == len(b) == 10, (len(a), len(b))
worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
print("  losses: max relative difference %.2e over %d steps" % (worst, len(a)))
sys.exit(0 if worst <= 1e-5 else 1)
PY
    "$PYTHON3" "$COMPARE" "$T/ref.st" "$T/$1.st" --tol 1e-5 >"$T/cmp" 2>&1 ||
        { cat "$T/cmp"; fail "$1: final weights differ from -np 1"; }
    ok "$1"
}

check "reference: one process, micro-batches of 2 and of 8 agree"
train ref 1 --micro-batch 2
train ref_mb8 1 --micro-batch 8
same_run ref_mb8

for kind in gpipe 1f1b; do
    for m in 1 4; do
        check "$kind, M=$m: -np 2 --pp 2, -np 3 --pp 3, -np 4 --pp 4, -np 4 --pp 2 (2 replicas)"
        train "pp2_${kind}_$m" 2 --pp 2 --pp-schedule $kind --micro-batch $((8 / m))
        same_run "pp2_${kind}_$m"
        train "pp3_${kind}_$m" 3 --pp 3 --pp-schedule $kind --micro-batch $((8 / m))
        same_run "pp3_${kind}_$m"
        train "pp4_${kind}_$m" 4 --pp 4 --pp-schedule $kind --micro-batch $((8 / m))
        same_run "pp4_${kind}_$m"
        train "pp2dp2_${kind}_$m" 4 --pp 2 --pp-schedule $kind --micro-batch $((4 / m))
        same_run "pp2dp2_${kind}_$m"
    done
done

check "an uneven explicit split (--stage-layers 1,3), the printed map and per-rank logs"
train uneven 2 --pp 2 --stage-layers 1,3 --micro-batch 2 --log-dir "$T/logs"
same_run uneven
grep -q "stage  1  layers  1-3" "$T/stderr" || fail "the rank map does not show stage 1 = layers 1-3"
grep -q "rank 0/2 on .*: stage 0 (layers 0-0), replica 0, device cpu, 1 thread, .*MPI" "$T/stderr" ||
    fail "no start-up line of rank 0"
grep -q "rank 1/2 on .*: stage 1 (layers 1-3)" "$T/logs/rank-00001.log" ||
    fail "rank 1's start-up line is not in its log"
grep -q "^step 10/10" "$T/logs/rank-00000.log" || fail "rank 0's log lacks the progress lines"
ok "map, start-up lines and --log-dir files"

check "a map that does not cover every layer exactly once is refused"
for bad in 2,1 2,3 4 1,1,2 0,4; do
    if "$MPIRUN" -np 2 "$BIN" "${COMMON[@]}" --pp 2 --stage-layers $bad >"$T/stdout" 2>"$T/stderr"; then
        fail "--stage-layers $bad was accepted"
    fi
    grep -q "stage-layers" "$T/stderr" || fail "--stage-layers $bad: no message naming the option"
done
ok "$(grep -m1 'stage-layers' "$T/stderr" | sed 's/^.*error: //')"

check "--pp that does not divide the ranks is refused"
if "$MPIRUN" -np 3 "$BIN" "${COMMON[@]}" --pp 2 >"$T/stdout" 2>"$T/stderr"; then
    fail "-np 3 --pp 2 was accepted"
fi
grep -q "does not divide" "$T/stderr" || fail "no message for -np 3 --pp 2"
ok

check "checkpoints of 4 stages resume on 2 stages and on 1, continuing the same run"
train full 1 --micro-batch 2 --checkpoint-dir "$T/ck_full"
train half4 4 --pp 4 --micro-batch 2 --stop-after 5 --checkpoint-dir "$T/ck4"
ls "$T/ck4/step-00000005" | grep -q "weights-00003-of-00004" ||
    fail "no per-stage weight shards in $T/ck4/step-00000005: $(ls "$T/ck4/step-00000005")"
"$BIN" info "$T/ck4" --verify >"$T/stdout" 2>"$T/stderr" || fail "info --verify on the 4-stage checkpoint"
for layout in "2 --pp 2" "1"; do
    set -- $layout
    name="resume_np$1"
    cp -r "$T/ck4" "$T/ck_$name"
    if ! timeout 300 "$MPIRUN" -np "$1" "$BIN" "${COMMON[@]}" "${@:2}" --micro-batch 2 \
        --resume "$T/ck_$name" -o "$T/$name.st" >"$T/stdout" 2>"$T/stderr"; then
        fail "resume with -np $layout"
    fi
    "$PYTHON3" "$COMPARE" "$T/full.st" "$T/$name.st" --tol 1e-5 >"$T/cmp" 2>&1 ||
        { cat "$T/cmp"; fail "resumed with -np $layout: weights differ from the uninterrupted run"; }
    ok "-np $layout"
done
check "logits --pp P [--grads] writes the file of one process (same thread count: bit for bit)"
"$BIN" init --model-config L4-C64-V64 --seed 9 -o "$T/m4.st" >"$T/stdout" 2>"$T/stderr" || fail "init"
TOKENS=$(seq -s, 3 1 42)
"$BIN" logits --model "$T/m4.st" --tokens "$TOKENS" --grads --threads 1 -o "$T/logits1.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "logits -np 1"
for np in 2 3 4; do
    "$MPIRUN" -np $np "$BIN" logits --pp $np --model "$T/m4.st" --tokens "$TOKENS" --grads \
        --threads 1 -o "$T/logits$np.st" >"$T/stdout" 2>"$T/stderr" || fail "logits --pp $np"
    "$PYTHON3" "$COMPARE" "$T/logits1.st" "$T/logits$np.st" >"$T/cmp" 2>&1 ||
        { cat "$T/cmp"; fail "logits --pp $np --grads differs from one process"; }
done
"$BIN" logits --model "$T/m4.st" --tokens "$TOKENS" --mode step --threads 1 -o "$T/step1.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "logits --mode step"
"$MPIRUN" -np 2 "$BIN" logits --pp 2 --stage-layers 3,1 --mode step --model "$T/m4.st" \
    --tokens "$TOKENS" --threads 1 -o "$T/step2.st" >"$T/stdout" 2>"$T/stderr" ||
    fail "logits --pp 2 --stage-layers 3,1 --mode step"
"$PYTHON3" "$COMPARE" "$T/step1.st" "$T/step2.st" >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "step mode on 2 stages differs"; }
if "$MPIRUN" -np 2 "$BIN" logits --pp 3 --model "$T/m4.st" --tokens 1,2 -o "$T/bad.st" \
    >"$T/stdout" 2>"$T/stderr"; then
    fail "logits --pp 3 on 2 ranks was accepted"
fi
grep -q "needs exactly 3 ranks" "$T/stderr" || fail "no message for --pp 3 on 2 ranks"
[ -e "$T/bad.st" ] && fail "a refused run left an output file"
ok "--pp 2, 3, 4 (--grads) and 3,1 (step mode) equal one process"

echo "all pipeline checks passed"
