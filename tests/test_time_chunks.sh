#!/bin/bash
# Time chunks (docs/training.md, Long sequences): a sequence trained as K
# consecutive chunks that carry the recurrent state, with full BPTT across
# them, has the gradients of one pass over the whole sequence; --tbptt
# (no state gradient between chunks) does not; 2 pipeline stages give the
# chunked gradients of one process (and 3 stages its weights, bit for bit);
# `train --seq-len` runs and its losses equal the one-pass run's; a stage
# past the first does not grow with the sequence.
# Run by `make check` (env: top_srcdir, top_builddir, MPIRUN, PYTHON3).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
BIN="$top_builddir/rwkvpipe"
COMPARE="$top_srcdir/tests/st_compare.py"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_time_chunks.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT

. "$top_srcdir/tests/check_report.sh"

# The trained tiny model: its state carries enough that truncating its
# gradient moves the parameter gradients by more than 1e-3 (a random init's
# by less than 1e-5).
cp "$top_srcdir/tests/data/tiny_L2_C128_V256_s1.weights.safetensors" "$T/m.st" || exit 99
# 129 tokens: 128 inputs = 4 chunks of 32 (two WKV chunks of 16 each).
TOKENS=$(seq -s, 1 129 | awk -F, '{for(i=1;i<=NF;i++) printf "%s%d", (i>1?",":""), ($i*37)%256}')

check "4 time chunks (full BPTT) give the gradients of one 4 x ctx pass within 1e-5"
"$BIN" logits --model "$T/m.st" --tokens "$TOKENS" --grads --threads 1 -o "$T/one.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "logits --grads"
"$BIN" logits --model "$T/m.st" --tokens "$TOKENS" --grads --time-chunks 4 --threads 1 \
    -o "$T/chunks.st" >"$T/stdout" 2>"$T/stderr" || fail "logits --grads --time-chunks 4"
"$PYTHON3" "$COMPARE" "$T/one.st" "$T/chunks.st" --tol 1e-5 >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "4 time chunks differ from one pass"; }
ok

check "--tbptt (no state gradient between chunks) moves gradients by > 1e-3 (same loss)"
"$BIN" logits --model "$T/m.st" --tokens "$TOKENS" --grads --time-chunks 4 --tbptt --threads 1 \
    -o "$T/tbptt.st" >"$T/stdout" 2>"$T/stderr" || fail "logits --grads --time-chunks 4 --tbptt"
"$PYTHON3" "$COMPARE" "$T/one.st" "$T/tbptt.st" --tol 1e-3 >"$T/cmp" 2>&1 &&
    fail "--tbptt gave the full-BPTT gradients"
"$PYTHON3" "$COMPARE" "$T/one.st" "$T/tbptt.st" --tol 1e-5 --skip '^(?!loss$)' >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "--tbptt changed the loss"; }
ok

check "--time-chunks is refused without --grads or when T-1 is not a multiple"
"$BIN" logits --model "$T/m.st" --tokens 1,2,3,4,5,6 --grads --time-chunks 4 -o "$T/x.st" \
    >"$T/stdout" 2>"$T/stderr" && fail "5 inputs in 4 chunks accepted"
grep -q "multiple" "$T/stderr" || fail "no clear error for 5 inputs in 4 chunks"
ok

# train: 6 steps of 4 sequences of 64 tokens (2 micro-batches), one pass
# vs 4 chunks of 16; losses, eval loss and weights within 1e-5.
COMMON=(train --model-config L2-C64-V64 --data mqar --batch 4 --micro-batch 2 --steps 6
        --warmup 1 --lr 3e-3 --eval-interval 3 --eval-batches 1 --log-interval 1 --loss-on all
        --seed 3 --init-seed 5 --threads 1 -q)
same_run() {
    "$PYTHON3" - "$T/$1.jsonl" "$T/$2.jsonl" <<'PY' || fail "$2: losses differ from $1"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b) == 6, (len(a), len(b))
for x, y in zip(a, b):
    for k in ("loss", "eval_loss"):
        if k in x or k in y:
            assert abs(x[k] - y[k]) <= 1e-5 * max(1, abs(x[k])), (k, x, y)
PY
    "$PYTHON3" "$COMPARE" "$T/$1.st" "$T/$2.st" --tol 1e-5 >"$T/cmp" 2>&1 ||
        { cat "$T/cmp"; fail "$2: weights differ from $1"; }
}
check "train --seq-len 64 --ctx-len 16 (4 chunks) trains like --ctx-len 64 (1e-5)"
"$BIN" "${COMMON[@]}" --ctx-len 64 --metrics "$T/one.jsonl" -o "$T/one.st" >"$T/stdout" \
    2>"$T/stderr" || fail "train --ctx-len 64"
"$BIN" "${COMMON[@]}" --ctx-len 16 --seq-len 64 --metrics "$T/ch.jsonl" -o "$T/ch.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "train --seq-len 64 --ctx-len 16"
same_run one ch
"$BIN" "${COMMON[@]}" --ctx-len 16 --seq-len 64 --tbptt --metrics "$T/tb.jsonl" -o "$T/tb.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "train --tbptt"
"$PYTHON3" "$COMPARE" "$T/one.st" "$T/tb.st" --tol 1e-5 >"$T/cmp" 2>&1 &&
    fail "train --tbptt gave the full-BPTT weights"
"$BIN" "${COMMON[@]}" --ctx-len 16 --seq-len 60 -o "$T/x.st" >"$T/stdout" 2>"$T/stderr" &&
    fail "--seq-len 60 --ctx-len 16 accepted"
grep -q "multiple of --ctx-len" "$T/stderr" || fail "no clear error for --seq-len 60"
ok

if [ -n "$MPIRUN" ] && command -v "$MPIRUN" >/dev/null 2>&1; then
    check "train --pp 2 --seq-len 64 --ctx-len 16 trains like one process (1e-5)"
    "$MPIRUN" -np 2 "$BIN" "${COMMON[@]}" --pp 2 --ctx-len 16 --seq-len 64 \
        --metrics "$T/pp2.jsonl" -o "$T/pp2.st" >"$T/stdout" 2>"$T/stderr" ||
        fail "train --pp 2 --seq-len 64"
    same_run ch pp2
    ok
fi

if [ -n "$MPIRUN" ] && command -v "$MPIRUN" >/dev/null 2>&1; then
    # The recomputed activations a stage gets in a chunk's backward phase
    # (RECV_RECOMP) are the bytes of its first forward's, so the weights
    # are those of one process bit for bit, on 3 stages too.
    check "train --pp 3 --seq-len 64 --ctx-len 16 gives one process's weights bit for bit"
    "$BIN" "${COMMON[@]}" --model-config L3-C64-V64 --ctx-len 16 --seq-len 64 -o "$T/l3.st" \
        >"$T/stdout" 2>"$T/stderr" || fail "train L3 --seq-len 64"
    "$MPIRUN" -np 3 "$BIN" "${COMMON[@]}" --model-config L3-C64-V64 --pp 3 --ctx-len 16 \
        --seq-len 64 -o "$T/l3pp3.st" >"$T/stdout" 2>"$T/stderr" || fail "train --pp 3 --seq-len 64"
    cmp -s "$T/l3.st" "$T/l3pp3.st" || fail "--pp 3 weights differ from one process's"
    ok

    # A stage past the first keeps nothing per chunk but its start state
    # (2 x (2C + H N N) floats a layer: 33 KiB a chunk here), so its peak
    # memory does not grow with the sequence; keeping each chunk's input
    # (8 C bytes a token: 16 MiB at 32K tokens) would.
    # (Not in a sanitizer build: ASan's quarantine keeps freed memory and
    # its shadow is in the RSS, so the peak grows with the work done.)
    if [ -x /usr/bin/time ] && ! ldd "$BIN" 2>/dev/null | grep -q 'libasan\|libtsan'; then
        check "--pp 2: the last stage's peak RSS grows < 6 MiB from 4K to 32K tokens"
        for L in 4096 32768; do
            "$MPIRUN" -np 2 sh -c '/usr/bin/time -f %M -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' \
                "$T/rss$L" "$BIN" train --model-config L2-C64-V64 --data copy --ctx-len 256 \
                --seq-len $L --batch 1 --steps 1 --warmup 0 --eval-interval 0 --threads 1 \
                --pp 2 -q >"$T/stdout" 2>"$T/stderr" || fail "train --pp 2 --seq-len $L"
        done
        a=$(tail -1 "$T/rss4096.1") b=$(tail -1 "$T/rss32768.1")
        echo "  rank 1 peak RSS: $a KiB at 4096 tokens, $b KiB at 32768"
        [ $((b - a)) -lt $((6 * 1024)) ] || fail "rank 1 grew by $((b - a)) KiB"
        ok
    fi

    check "--pp 2: 4 time chunks over 2 stages give the chunked gradients of one process, bit for bit"
    "$MPIRUN" -np 2 "$BIN" logits --pp 2 --model "$T/m.st" --tokens "$TOKENS" --grads \
        --time-chunks 4 --threads 1 -o "$T/pp2.st" >"$T/stdout" 2>"$T/stderr" ||
        fail "logits --pp 2 --time-chunks 4"
    "$PYTHON3" "$COMPARE" "$T/chunks.st" "$T/pp2.st" >"$T/cmp" 2>&1 ||
        { cat "$T/cmp"; fail "--pp 2 differs from one process"; }
    ok
else
    echo "skip: no mpirun (the --pp 2 check)"
fi
exit 0
