#!/bin/bash
# ZB-H1 (the backward split into BWD_B and a deferred BWD_W, docs/parallelism.md)
# trains the same weights as 1F1B bit for bit: the same layouts and data
# with --pp-schedule 1f1b and zb-h1 write byte-identical weight files and
# the same losses (every weight gradient is summed by the same GEMMs in the
# same micro-batch order). Run by `make check` (env: top_srcdir,
# top_builddir, MPIRUN).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun"
    exit 77
fi
BIN="$top_builddir/rwkvpipe"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_zb_h1.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT

. "$top_srcdir/tests/check_report.sh"

# 4 layers, 6 steps of 8 sequences of 16 tokens; warmup 2 so the LR moves.
COMMON=(train --model-config L4-C64-V64 --data mqar --ctx-len 16 --batch 8 --steps 6
        --warmup 2 --lr 3e-3 --eval-interval 0 --eval-batches 1 --log-interval 1
        --loss-on all --seed 3 --init-seed 5 --threads 1)

. "$top_srcdir/tests/train_test_lib.sh"   # train NAME NP [ARGS...]

# same_bits A B: byte-identical weights, identical losses
same_bits() {
    cmp "$T/$1.st" "$T/$2.st" >/dev/null || fail "$2: weights differ from $1's"
    diff <(grep -o '"loss":[^,}]*' "$T/$1.jsonl") <(grep -o '"loss":[^,}]*' "$T/$2.jsonl") \
        >/dev/null || fail "$2: losses differ from $1's"
    [ -s "$T/$1.jsonl" ] || fail "$1: no metrics"
    ok "$2"
}

# "NP PP MICRO-BATCH": M = 8 micro-batches per step (4 with --micro-batch 2,
# and per replica on 4 ranks with --pp 2); the later stages' held-back
# BWD_Ws run at the end of the step.
for layout in "1 1 1" "2 2 1" "2 2 2" "3 3 1" "4 2 1"; do
    set -- $layout
    check "-np $1 --pp $2 --micro-batch $3: zb-h1 equals 1f1b bit for bit"
    name="np$1_pp$2_mb$3"
    train "${name}_1f1b" "$1" --pp "$2" --pp-schedule 1f1b --micro-batch "$3"
    train "${name}_zb" "$1" --pp "$2" --pp-schedule zb-h1 --micro-batch "$3"
    same_bits "${name}_1f1b" "${name}_zb"
done

check "an unknown --pp-schedule is refused naming the choices"
if "$BIN" "${COMMON[@]}" --pp-schedule zb-h2 -o "$T/bad.st" >"$T/stdout" 2>"$T/stderr"; then
    fail "--pp-schedule zb-h2 was accepted"
fi
grep -q "zb-h1" "$T/stderr" || fail "the message does not name zb-h1: $(cat "$T/stderr")"
ok

echo "all zb-h1 checks passed"
