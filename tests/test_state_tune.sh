#!/bin/bash
# State tuning (docs/training.md, State tuning): `train --tune state` on the
# tiny model learns a fixed format from its initial WKV states alone: every
# sample starts "\nAhoy! "; in 60 steps the loss falls from about 6.5 to
# below 3.5 (by more than 3 nats); the weights stay bit for bit; the
# state-tuning file (blocks.L.att.time_state) loads in the server as a
# session, and a greedy completion of "\n" from it starts with "Ahoy!" (from
# the zero state it does not). --pp 2 (each stage tunes its layers' states)
# writes the states of one process. Checkpoints carry the tuned states and
# their moments: stop + resume equals an uninterrupted run, bit for bit.
# Run by `make check` (env: top_srcdir, top_builddir, MPIRUN, PYTHON3).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
if ! command -v curl >/dev/null 2>&1; then
    echo "skip: curl is not installed (launch/deps installs it)"
    exit 77
fi
BIN="$top_builddir/rwkvpipe"
COMPARE="$top_srcdir/tests/st_compare.py"
TINY="$top_srcdir/tests/data/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_state_tune.XXXXXX") || exit 99
SERVE_TEST_SECONDS=400
. "$top_srcdir/tests/serve_test_lib.sh"

# 3000 records of 32 bytes, each a window of --ctx-len 32: "\nAhoy! " and
# three random words, padded with dots (tests/make_pirate.py).
"$PYTHON3" "$top_srcdir/tests/make_pirate.py" "$T/pirate.txt" || exit 99
TUNE=(train --init-from "$TINY" --data "$T/pirate.txt" --ctx-len 32 --batch 16 --steps 60
      --lr 0.05 --lr-final 0.01 --warmup 2 --eval-interval 0 --eval-batches 1
      --log-interval 1 --threads 1 --tune state -q)

if "$BIN" "${TUNE[@]}" --metrics "$T/m.jsonl" --state-out "$T/pirate.state" -o "$T/w.st" \
    >"$T/out" 2>&1; then
    expect "the loss falls by more than 3 nats in 60 steps, to below 3.5" \
        "$PYTHON3" -c 'import json, sys
l = [json.loads(x)["loss"] for x in open(sys.argv[1])]
print("loss %.3f -> %.3f" % (l[0], l[-1]))
assert len(l) == 60 and l[0] - l[-1] > 3 and l[-1] < 3.5, l' "$T/m.jsonl"
    expect "the weights are frozen (bit for bit)" "$PYTHON3" "$COMPARE" "$TINY" "$T/w.st"
    expect "the file holds blocks.L.att.time_state [2,64,64] for both layers" \
        "$PYTHON3" -c 'import json, struct, sys
b = open(sys.argv[1], "rb").read()
h = json.loads(b[8:8 + struct.unpack("<Q", b[:8])[0]])
for l in range(2):
    assert h["blocks.%d.att.time_state" % l]["shape"] == [2, 64, 64], h
    assert h["blocks.%d.att.time_state" % l]["dtype"] == "F32", h' "$T/pirate.state"
else
    bad "train --tune state"
    tail -n 15 "$T/out"
fi

expect "--tune state without --state-out is refused" \
    sh -c '! "$@" >"$0/e.out" 2>&1 && grep -q "needs --state-out" "$0/e.out"' "$T" \
    "$BIN" "${TUNE[@]}"
# Checkpoints: the tuned states and their AdamW moments are in them; a run
# stopped after step 5 and resumed to step 10 ends with the states of a
# 10-step run that never stopped, bit for bit.
SHORT=(--data "$T/pirate.txt" --ctx-len 32 --batch 4 --steps 10 --lr 0.05 --warmup 2
       --eval-interval 0 --eval-batches 1 --threads 1 --tune state -q)
"$BIN" train --init-from "$TINY" "${SHORT[@]}" --state-out "$T/once.state" >"$T/out" 2>&1 ||
    bad "train --tune state (10 steps)"
if "$BIN" train --init-from "$TINY" "${SHORT[@]}" --state-out "$T/x.state" \
    --checkpoint-dir "$T/ck" --stop-after 5 >"$T/out" 2>&1 &&
    "$BIN" train "${SHORT[@]}" --state-out "$T/resumed.state" --resume "$T/ck" >"$T/out2" 2>&1
then
    expect "the checkpoint holds the tuned states and their moments" "$PYTHON3" -c 'import json, struct, sys
b = open(sys.argv[1], "rb").read()
h = json.loads(b[8:8 + struct.unpack("<Q", b[:8])[0]])
for l in range(2):
    for s in ("", "_adam_m", "_adam_v"):
        assert h["blocks.%d.att.time_state%s" % (l, s)]["shape"] == [2, 64, 64], h' \
        "$T/ck/step-00000005/tuned.safetensors"
    expect "stop after 5 + resume to 10 = 10 steps without a stop (bit for bit)" \
        "$PYTHON3" "$COMPARE" "$T/once.state" "$T/resumed.state"
else
    bad "train --tune state with --checkpoint-dir / --resume"
    tail -n 5 "$T/out" "$T/out2"
fi
expect "a state-tuning checkpoint resumed without --tune state is refused" \
    sh -c '! "$@" >"$0/e.out" 2>&1 && grep -q "resume it with --tune state" "$0/e.out"' "$T" \
    "$BIN" train --data "$T/pirate.txt" --ctx-len 32 --batch 4 --steps 10 -q --resume "$T/ck"

mkdir -p "$T/sessions"
cp "$T/pirate.state" "$T/sessions/pirate.state" 2>/dev/null
start A "$BIN" serve --model "$TINY" --port 0 --threads 1 --session-dir "$T/sessions"
complete() {  # complete SESSION-JSON-OR-EMPTY: greedy completion of "\n", the text
    curl -s --max-time 60 "$URL_A/v1/completions" -d "{$1 \"prompt\": \"\\n\", \
\"max_tokens\": 8, \"temperature\": 0}" | "$PYTHON3" -c 'import json, sys
print(json.load(sys.stdin)["choices"][0]["text"])'
}
expect "the server loads the state-tuning file as a session" \
    sh -c 'curl -s --max-time 60 "$0/v1/sessions/pirate/load" -d "{\"path\": \"pirate.state\"}" |
grep -q "\"loaded\":true"' "$URL_A"
tuned=$(complete '"initial_state": "pirate",')
plain=$(complete '')
expect "a greedy completion from the tuned state starts with 'Ahoy!' (got '$tuned')" \
    test "${tuned:0:5}" = "Ahoy!"
expect "from the zero state it does not (got '$plain')" test "${plain:0:5}" != "Ahoy!"

if [ -n "$MPIRUN" ] && command -v "$MPIRUN" >/dev/null 2>&1; then
    if timeout 300 "$MPIRUN" -np 2 "$BIN" "${TUNE[@]}" --pp 2 --state-out "$T/pp2.state" \
        >"$T/out" 2>&1; then
        expect "--pp 2 tunes the states of one process (1e-5)" \
            "$PYTHON3" "$COMPARE" "$T/pirate.state" "$T/pp2.state" --tol 1e-5
        if timeout 300 "$MPIRUN" -np 2 "$BIN" train "${SHORT[@]}" --pp 2 \
            --state-out "$T/pp2r.state" --resume "$T/ck/step-00000005" \
            --checkpoint-dir "$T/ck2" >"$T/out" 2>&1; then
            expect "--pp 2 resumes the one-process checkpoint (1e-5)" \
                "$PYTHON3" "$COMPARE" "$T/once.state" "$T/pp2r.state" --tol 1e-5
        else
            bad "train --tune state --pp 2 --resume"
            tail -n 15 "$T/out"
        fi
    else
        bad "train --tune state --pp 2"
        tail -n 15 "$T/out"
    fi
else
    echo "skip: no mpirun (the --pp 2 check)"
fi
serve_test_end
