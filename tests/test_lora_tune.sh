#!/bin/bash
# LoRA fine-tuning (docs/training.md, LoRA): `train --tune lora` on the tiny
# model learns a fixed format with adapters on the time mix's four
# projections, base frozen: every sample starts "\nAhoy! "; in 60 steps the
# loss falls by more than 3 nats. The adapter file holds
# blocks.L.att.<proj>.lora_A [r,C] / lora_B [C,r] with rank/alpha/targets
# metadata; `merge-lora` of it into the base equals the weights the training
# ran on (train -o, W + s B A by the backend) and their logits within 1e-5;
# `serve --lora` completes "\n" greedily with "Ahoy!" (the base does not).
# --pp 2 trains the adapters of one process (1e-5). Checkpoints resume
# exactly. Bad input is refused.
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
T=$(mktemp -d "${TMPDIR:-/tmp}/test_lora_tune.XXXXXX") || exit 99
SERVE_TEST_SECONDS=900
. "$top_srcdir/tests/serve_test_lib.sh"

"$PYTHON3" "$top_srcdir/tests/make_pirate.py" "$T/pirate.txt" || exit 99
TUNE=(train --init-from "$TINY" --data "$T/pirate.txt" --ctx-len 32 --batch 16 --steps 60
      --lr 1e-2 --lr-final 2e-3 --warmup 2 --eval-interval 0 --eval-batches 1
      --log-interval 1 --threads 1 --tune lora --lora-rank 4 --lora-alpha 8 -q)

if "$BIN" "${TUNE[@]}" --metrics "$T/m.jsonl" --lora-out "$T/pirate.lora" -o "$T/trained.st" \
    >"$T/out" 2>&1; then
    expect "the loss falls by more than 3 nats in 60 steps" \
        "$PYTHON3" -c 'import json, sys
l = [json.loads(x)["loss"] for x in open(sys.argv[1])]
print("loss %.3f -> %.3f" % (l[0], l[-1]))
assert len(l) == 60 and l[0] - l[-1] > 3, l' "$T/m.jsonl"
    expect "the adapter file holds lora_A [4,128] / lora_B [128,4] of the four att projections" \
        "$PYTHON3" -c 'import json, struct, sys
b = open(sys.argv[1], "rb").read()
h = json.loads(b[8:8 + struct.unpack("<Q", b[:8])[0]])
m = h.pop("__metadata__")
assert m == {"format": "rwkvpipe-lora", "lora_rank": "4", "lora_alpha": "8",
             "lora_targets": "att.receptance,att.key,att.value,att.output"}, m
assert len(h) == 16, sorted(h)
for l in range(2):
    for p in ("receptance", "key", "value", "output"):
        assert h["blocks.%d.att.%s.lora_A" % (l, p)]["shape"] == [4, 128], h
        assert h["blocks.%d.att.%s.lora_B" % (l, p)]["shape"] == [128, 4], h' "$T/pirate.lora"
    if "$BIN" merge-lora "$TINY" "$T/pirate.lora" -o "$T/merged.st" >"$T/merge.out" 2>&1; then
        expect "merge-lora reports its progress (8 matrices)" \
            grep -q "merged blocks.1.att.value.weight (8/8)" "$T/merge.out"
        expect "the merged model equals the weights the training ran on (1e-6)" \
            "$PYTHON3" "$COMPARE" "$T/trained.st" "$T/merged.st" --tol 1e-6
        expect "only the adapted matrices differ from the base" \
            "$PYTHON3" "$COMPARE" "$TINY" "$T/merged.st" \
            --skip 'att\.(receptance|key|value|output)\.weight'
        expect "... and those do" sh -c '! "$@" >/dev/null' _ "$PYTHON3" "$COMPARE" "$TINY" \
            "$T/merged.st"
        TOKS="10,65,104,111,121,33,32,99,97,116,32,100,111,103,46,46"
        "$BIN" logits --model "$T/merged.st" --tokens "$TOKS" -o "$T/lm.st" >/dev/null 2>&1
        "$BIN" logits --model "$T/trained.st" --tokens "$TOKS" -o "$T/lt.st" >/dev/null 2>&1
        expect "merged logits equal base + adapter logits within 1e-5" \
            "$PYTHON3" "$COMPARE" "$T/lt.st" "$T/lm.st" --tol 1e-5
    else
        bad "merge-lora"
        tail -n 5 "$T/merge.out"
    fi
else
    bad "train --tune lora"
    tail -n 15 "$T/out"
fi

refused() {  # refused WHAT PATTERN CMD...: CMD fails and says PATTERN
    local what=$1 pat=$2
    shift 2
    expect "$what" sh -c '! "$@" >"$0/e.out" 2>&1 && grep -q "$1" "$0/e.out" ||
{ cat "$0/e.out"; exit 1; }' "$T" "$pat" "$@"
}
refused "--tune lora without --lora-out is refused" "needs --lora-out" "$BIN" "${TUNE[@]}"
refused "--lora-targets with an unknown layer is refused" "att.gate" \
    "$BIN" "${TUNE[@]}" --lora-out "$T/x.lora" --lora-targets att.key,att.gate
refused "--lora-rank without --tune lora is refused" "need --tune lora" \
    "$BIN" train --lora-rank 4 --steps 1
refused "merge-lora of a weights file as adapters is refused" "not a LoRA adapter file" \
    "$BIN" merge-lora "$TINY" "$TINY" -o "$T/x.st"
refused "merge-lora onto its own input is refused" "would overwrite an input" \
    "$BIN" merge-lora "$TINY" "$T/pirate.lora" -o "$TINY"
expect "a refused merge wrote nothing" test ! -e "$T/x.st"

# Checkpoints: the base weights (not W'), the adapters and their moments; a
# run stopped after step 3 and resumed to step 6 ends with the adapters of
# a 6-step run that never stopped, bit for bit.
SHORT=("${TUNE[@]}" --steps 6 --batch 4)
RESUME=(train "${TUNE[@]:3}" --steps 6 --batch 4)   # without --init-from
"$BIN" "${SHORT[@]}" --lora-out "$T/once.lora" >"$T/out" 2>&1 || bad "train --tune lora (6 steps)"
if "$BIN" "${SHORT[@]}" --lora-out "$T/x.lora" --checkpoint-dir "$T/ck" --stop-after 3 \
    >"$T/out" 2>&1 &&
    "$BIN" "${RESUME[@]}" --lora-out "$T/resumed.lora" --resume "$T/ck" \
    >"$T/out2" 2>&1; then
    expect "the checkpoint holds the base weights, bit for bit" \
        "$PYTHON3" "$COMPARE" "$TINY" "$T/ck/step-00000003/weights.safetensors"
    expect "stop after 3 + resume to 6 = 6 steps without a stop (bit for bit)" \
        "$PYTHON3" "$COMPARE" "$T/once.lora" "$T/resumed.lora"
else
    bad "train --tune lora with --checkpoint-dir / --resume"
    tail -n 5 "$T/out" "$T/out2"
fi
refused "resuming with another --lora-rank is refused" "rank=4 alpha=8" \
    "$BIN" "${RESUME[@]}" --lora-rank 2 --lora-out "$T/y.lora" \
    --resume "$T/ck/step-00000003"
refused "a LoRA checkpoint resumed without --tune lora is refused" "resume it with --tune lora" \
    "$BIN" train --data "$T/pirate.txt" --ctx-len 32 --batch 4 --steps 6 -q \
    --resume "$T/ck/step-00000003"

start A "$BIN" serve --model "$TINY" --lora "$T/pirate.lora" --port 0 --threads 1
start B "$BIN" serve --model "$TINY" --port 0 --threads 1
complete() {  # complete URL: greedy completion of "\n", the text
    curl -s --max-time 60 "$1/v1/completions" -d '{"prompt": "\n", "max_tokens": 8,
"temperature": 0}' | "$PYTHON3" -c 'import json, sys
print(json.load(sys.stdin)["choices"][0]["text"])'
}
tuned=$(complete "$URL_A")
plain=$(complete "$URL_B")
expect "serve --lora completes '\\n' with 'Ahoy!' (got '$tuned')" test "${tuned:0:5}" = "Ahoy!"
expect "the base model does not (got '$plain')" test "${plain:0:5}" != "Ahoy!"

if [ -n "$MPIRUN" ] && command -v "$MPIRUN" >/dev/null 2>&1; then
    if timeout 300 "$MPIRUN" -np 2 "$BIN" "${TUNE[@]}" --steps 5 --pp 2 \
        --lora-out "$T/pp2.lora" >"$T/out" 2>&1 &&
        "$BIN" "${TUNE[@]}" --steps 5 --lora-out "$T/pp1.lora" >"$T/out1" 2>&1; then
        expect "--pp 2 trains the adapters of one process (1e-5)" \
            "$PYTHON3" "$COMPARE" "$T/pp1.lora" "$T/pp2.lora" --tol 1e-5
    else
        bad "train --tune lora --pp 2"
        tail -n 15 "$T/out"
    fi
else
    echo "skip: no mpirun (the --pp 2 check)"
fi
serve_test_end
