#!/bin/bash
# The rwkvpipe command line end to end: help and version texts, `logits`
# against the official reference (sequence and step mode, token file),
# reproducible `init` and `generate` (also under mpirun -np 1), --stop,
# encode/decode round trips, and bad input that must fail with a message
# (never a crash, never a partial output file).
# Run by `make check` (env: top_srcdir, top_builddir, MPIRUN, RP_TEST_DATA,
# RP_SHARED_DIR, PYTHON3). Prints each check; exits 1 at the first failure.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
: "${RP_SHARED_DIR:=$top_srcdir/../shared}"

BIN="$top_builddir/rwkvpipe"
WEIGHTS="$RP_TEST_DATA/tiny_L2_C128_V256_s1.weights.safetensors"
GOLDEN="$RP_TEST_DATA/tiny_L2_C128_V256_s1.golden.safetensors"
CHECK_LOGITS="$top_srcdir/tests/check_logits.py"
for f in "$BIN" "$WEIGHTS" "$GOLDEN" "$CHECK_LOGITS"; do
    [ -e "$f" ] || { echo "FAIL: missing $f"; exit 1; }
done

T=$(mktemp -d "${TMPDIR:-/tmp}/test_cli.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT

check() { echo "check: $*"; }
ok() { echo "  ok${1:+: $1}"; }
fail() {
    echo "FAIL: $*"
    if [ -s "$T/stderr" ]; then sed 's/^/  stderr: /' "$T/stderr" | head -n 20; fi
    exit 1
}

# run CMD...: stdout -> $T/stdout, stderr -> $T/stderr, exit status -> $rc.
run() {
    "$@" >"$T/stdout" 2>"$T/stderr"
    rc=$?
}

# A sanitizer report is a failure even when the exit status looks right.
no_sanitizer_report() {
    if grep -q -E 'runtime error:|Sanitizer|LeakSanitizer' "$T/stderr"; then
        fail "$1: sanitizer report"
    fi
}

# expect_ok LABEL CMD...: exit 0.
expect_ok() {
    local label=$1
    shift
    run "$@"
    [ $rc -eq 0 ] || fail "$label: exit $rc, expected 0"
    no_sanitizer_report "$label"
}

# expect_fail LABEL PATTERN CMD...: exits non-zero without a crash (no
# signal, no sanitizer report) and prints an error line (one saying "error",
# "unknown" or "unrecognized") that contains PATTERN, a fixed string.
expect_fail() {
    local label=$1 pattern=$2 line
    shift 2
    run "$@"
    [ $rc -ne 0 ] || fail "$label: exit 0, expected an error"
    [ $rc -lt 126 ] || fail "$label: exit $rc (crash or signal), expected an error message"
    no_sanitizer_report "$label"
    line=$(grep -F -- "$pattern" "$T/stderr" | grep -E 'error|unknown|unrecognized' | head -n 1)
    [ -n "$line" ] || fail "$label: no error message on stderr mentions '$pattern'"
    ok "exit $rc: $line"
}

COMMANDS="generate logits info init tokenize train eval encode decode serve schedule"

# ---------------------------------------------------------------- help, version
check "rwkvpipe --help exits 0 and lists every command"
expect_ok "--help" "$BIN" --help
grep -q '^usage: rwkvpipe COMMAND' "$T/stdout" || fail "--help: no usage line on stdout"
# it describes what the program does now, not plans
grep -q 'as they land' "$T/stdout" && fail "--help still promises features 'as they land'"
grep -q 'serve' "$T/stdout" || fail "--help does not mention serve"
for c in $COMMANDS; do
    grep -q "^  $c " "$T/stdout" || fail "--help does not list '$c'"
done
ok

for c in $COMMANDS; do
    check "rwkvpipe $c --help exits 0 and prints its usage"
    expect_ok "$c --help" "$BIN" "$c" --help
    grep -q "^usage: rwkvpipe $c" "$T/stdout" || fail "$c --help: no 'usage: rwkvpipe $c' on stdout"
    ok
done

check "rwkvpipe --version exits 0 and names the version"
expect_ok "--version" "$BIN" --version
grep -q -E '^rwkvpipe [0-9]+\.[0-9]+' "$T/stdout" || fail "--version: printed '$(head -n 1 "$T/stdout")'"
ok "$(head -n 1 "$T/stdout")"

check "no command, an unknown command and unknown options exit non-zero"
run "$BIN"
[ $rc -ne 0 ] && [ $rc -lt 126 ] || fail "no command: exit $rc"
grep -q 'usage:' "$T/stderr" || fail "no command: no usage on stderr"
expect_fail "unknown command" "unknown command 'frobnicate'" "$BIN" frobnicate
for c in $COMMANDS; do
    expect_fail "$c --no-such-option" "no-such-option" "$BIN" "$c" --no-such-option
done

# ---------------------------------------------------------------- logits
TOKENS=$("$PYTHON3" "$CHECK_LOGITS" --tokens "$GOLDEN") || fail "cannot read the golden tokens"
[ -n "$TOKENS" ] || fail "no golden tokens"

check "logits (sequence mode) of the golden tokens match the reference logits and state"
expect_ok "logits" "$BIN" logits --model "$WEIGHTS" --tokens "$TOKENS" -o "$T/seq.safetensors"
"$PYTHON3" "$CHECK_LOGITS" "$T/seq.safetensors" "$GOLDEN" >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "logits (sequence mode) differ from the reference"; }
sed 's/^/  /' "$T/cmp"

check "logits --mode step matches the reference too"
expect_ok "logits --mode step" "$BIN" logits --model "$WEIGHTS" --tokens "$TOKENS" --mode step \
    -o "$T/step.safetensors"
"$PYTHON3" "$CHECK_LOGITS" "$T/step.safetensors" "$GOLDEN" >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "logits (step mode) differ from the reference"; }
sed 's/^/  /' "$T/cmp"

check "logits --tokens-file (space and newline separated) matches the reference"
echo "$TOKENS" | awk -F, '{ for (i = 1; i <= NF; i++) printf "%s%s", $i, (i % 4 ? " " : "\n") }' \
    >"$T/tokens.txt"
expect_ok "logits --tokens-file" "$BIN" logits --model "$WEIGHTS" --tokens-file "$T/tokens.txt" \
    -o "$T/file.safetensors"
"$PYTHON3" "$CHECK_LOGITS" "$T/file.safetensors" "$GOLDEN" >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "logits (--tokens-file) differ from the reference"; }
ok

check "logits with a token outside the vocabulary fails and leaves no output file"
mkdir "$T/oov"
expect_fail "out-of-vocab token" "vocabulary" "$BIN" logits --model "$WEIGHTS" --tokens 1,2,256 \
    -o "$T/oov/out.safetensors"
[ -z "$(ls -A "$T/oov")" ] || fail "out-of-vocab token: left $(ls -A "$T/oov") behind"

# ---------------------------------------------------------------- init, info
check "init --seed 7 twice gives byte-identical files; --seed 8 differs"
expect_ok "init seed 7" "$BIN" init --model-config tiny --seed 7 -o "$T/a.safetensors"
expect_ok "init seed 7 again" "$BIN" init --model-config tiny --seed 7 -o "$T/b.safetensors"
expect_ok "init seed 8" "$BIN" init --model-config tiny --seed 8 -o "$T/c.safetensors"
cmp -s "$T/a.safetensors" "$T/b.safetensors" || fail "init: same seed, different files"
if cmp -s "$T/a.safetensors" "$T/c.safetensors"; then fail "init: seeds 7 and 8 give the same file"; fi
ok

check "info on the init'ed file prints n_layer 2"
expect_ok "info" "$BIN" info "$T/a.safetensors"
grep -q -E '^n_layer *: *2$' "$T/stdout" || { cat "$T/stdout"; fail "info: no 'n_layer : 2' line"; }
ok "$(grep -E '^n_layer' "$T/stdout")"

# ---------------------------------------------------------------- generate
GEN=("$BIN" generate --model-config tiny --prompt hi --max-tokens 20 -q)

check "generate with the same --seed twice prints the same text"
expect_ok "generate seed 5" "${GEN[@]}" --seed 5
cp "$T/stdout" "$T/gen5a"
expect_ok "generate seed 5 again" "${GEN[@]}" --seed 5
cmp -s "$T/gen5a" "$T/stdout" || fail "generate: same seed, different text"
n=$(wc -c <"$T/gen5a")
[ "$n" -le 21 ] || fail "generate: $n bytes for 20 byte-level tokens (+ newline)"
ok "$n bytes"

check "generate --temperature 0 is deterministic and ignores --seed"
expect_ok "greedy seed 1" "${GEN[@]}" --temperature 0 --seed 1
cp "$T/stdout" "$T/greedy1"
expect_ok "greedy seed 2" "${GEN[@]}" --temperature 0 --seed 2
cmp -s "$T/greedy1" "$T/stdout" || fail "generate --temperature 0: output depends on the seed"
ok

check "generate under \$MPIRUN -np 1 prints the same text as without mpirun"
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "  skip: no MPIRUN"
else
    expect_ok "mpirun -np 1 generate" $MPIRUN -np 1 "${GEN[@]}" --seed 5
    cmp -s "$T/gen5a" "$T/stdout" || fail "generate under mpirun -np 1 differs from a plain run"
    ok
fi

check "generate --stop prints exactly the text before the first occurrence of the stop string"
expect_ok "greedy 60 tokens" "$BIN" generate --model-config tiny --prompt hi --max-tokens 60 \
    --temperature 0 --ban-eot -q
cp "$T/stdout" "$T/greedy60"
# Pick 3 bytes from the middle (no newline or NUL, so they survive argv) that
# first occur after the start; write the stop string and the expected output.
"$PYTHON3" - "$T/greedy60" "$T/stop.bin" "$T/expected.bin" <<'EOF' || fail "no usable stop string in the greedy output"
import sys
data = open(sys.argv[1], "rb").read()
assert data.endswith(b"\n"), "generate output must end with a newline"
text = data[:-1]
mid = len(text) // 2
for delta in range(len(text)):
    for start in (mid + delta, mid - delta):
        stop = text[start:start + 3]
        if len(stop) == 3 and b"\n" not in stop and b"\0" not in stop and text.find(stop) > 0:
            open(sys.argv[2], "wb").write(stop)
            open(sys.argv[3], "wb").write(text[:text.find(stop)] + b"\n")
            print("  stop string %r first at byte %d of %d" % (stop, text.find(stop), len(text)))
            sys.exit(0)
sys.exit(1)
EOF
stop=$(cat "$T/stop.bin")
expect_ok "generate --stop" "$BIN" generate --model-config tiny --prompt hi --max-tokens 60 \
    --temperature 0 --ban-eot -q --stop "$stop"
cmp -s "$T/expected.bin" "$T/stdout" ||
    fail "generate --stop: got $(od -c "$T/stdout" | head -n 3), expected $(od -c "$T/expected.bin" | head -n 3)"
ok

# ---------------------------------------------------------------- encode, decode
check "encode/decode --vocab bytes round trip UTF-8 text with a newline"
printf 'h\xc3\xa9llo w\xc3\xb6rld \xe2\x9c\x93 \xe6\x97\xa5\xe6\x9c\xac\nsecond line' >"$T/text.txt"
expected_ids=$("$PYTHON3" -c 'import sys; print(",".join(str(b) for b in open(sys.argv[1], "rb").read()))' "$T/text.txt")
expect_ok "encode (argument)" "$BIN" encode --vocab bytes "$(cat "$T/text.txt")"
ids=$(cat "$T/stdout")
[ "$ids" = "$expected_ids" ] || fail "encode --vocab bytes: '$ids', expected the byte values '$expected_ids'"
expect_ok "encode (stdin)" "$BIN" encode --vocab bytes <"$T/text.txt"
[ "$(cat "$T/stdout")" = "$expected_ids" ] || fail "encode from stdin differs from encode of the argument"
expect_ok "decode" "$BIN" decode --vocab bytes "$ids"
cmp -s "$T/stdout" "$T/text.txt" || fail "decode(encode(text)) != text"
ok "$(wc -c <"$T/text.txt") bytes"

WORLD_VOCAB="$RP_SHARED_DIR/vocab/rwkv_vocab_v20230424.txt"
WORLD_CASES="$RP_SHARED_DIR/vocab/world_tokenizer_cases.jsonl"
if [ -f "$WORLD_VOCAB" ]; then
    for text in "Hello world" "Hello, world!"; do
        check "encode --vocab World of '$text'"
        expect_ok "encode World" "$BIN" encode --vocab "$WORLD_VOCAB" "$text"
        ids=$(cat "$T/stdout")
        want=""
        if [ -f "$WORLD_CASES" ]; then
            want=$("$PYTHON3" - "$WORLD_CASES" "$text" <<'EOF'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    case = json.loads(line)
    if case["text"] == sys.argv[2]:
        print(",".join(str(i) for i in case["ids"]))
        break
EOF
)
        fi
        if [ -n "$want" ]; then
            [ "$ids" = "$want" ] || fail "encode World '$text': $ids, expected $want (world_tokenizer_cases.jsonl)"
            ok "ids $ids as in world_tokenizer_cases.jsonl"
        else
            ok "ids $ids (no reference case; round trip only)"
        fi
        expect_ok "decode World" "$BIN" decode --vocab "$WORLD_VOCAB" "$ids"
        [ "$(cat "$T/stdout")" = "$text" ] || fail "World decode(encode('$text')) = '$(cat "$T/stdout")'"
        ok "round trip"
    done
else
    echo "check: World vocabulary: skip (no $WORLD_VOCAB)"
fi

# ---------------------------------------------------------------- bad input
check "bad generate options fail with a message naming the option"
expect_fail "--max-tokens -1" "--max-tokens" "${GEN[@]}" --max-tokens -1
expect_fail "--temperature abc" "--temperature: 'abc'" "${GEN[@]}" --temperature abc
expect_fail "--top-p 2" "--top-p" "${GEN[@]}" --top-p 2
expect_fail "--stop of 300 bytes" "stop string 0 has 300 bytes: expected 1 to 256" \
    "${GEN[@]}" --stop "$(printf 'a%.0s' $(seq 300))"
expect_fail "no model" "--model" "$BIN" generate --prompt hi -q
# serve --max-batch: sequences per decode step, 1..4096 (refused before the model loads)
expect_fail "serve --max-batch 0" "--max-batch: 0 is out of range [1, 4096]" \
    "$BIN" serve --model "$WEIGHTS" --port 0 --max-batch 0
expect_fail "serve --max-batch 5000" "--max-batch: 5000 is out of range [1, 4096]" \
    "$BIN" serve --model "$WEIGHTS" --port 0 --max-batch 5000
expect_fail "serve --max-batch x" "--max-batch: 'x' is not an integer" \
    "$BIN" serve --model "$WEIGHTS" --port 0 --max-batch x
# serve --prefill-prompts: prompts per prefill unit, 0..4096 (0: up to --max-batch)
expect_fail "serve --prefill-prompts -1" "--prefill-prompts: -1 is out of range [0, 4096]" \
    "$BIN" serve --model "$WEIGHTS" --port 0 --prefill-prompts -1
expect_fail "serve --prefill-prompts 5000" "--prefill-prompts: 5000 is out of range [0, 4096]" \
    "$BIN" serve --model "$WEIGHTS" --port 0 --prefill-prompts 5000
expect_fail "serve --prefill-prompts x" "--prefill-prompts: 'x' is not an integer" \
    "$BIN" serve --model "$WEIGHTS" --port 0 --prefill-prompts x
expect_fail "logits without --model" "--model" "$BIN" logits --tokens 1,2 -o "$T/x.safetensors"

check "--device and --gpu-math: bad values are refused; cuda without CUDA (or a GPU) says how to fix it"
expect_fail "--device gpu" "--device: 'gpu'" "${GEN[@]}" --device gpu
expect_fail "--gpu-math fp16" "--gpu-math: 'fp16'" "${GEN[@]}" --gpu-math fp16
if "$BIN" --version | grep -q 'CUDA: no'; then
    expect_fail "--device cuda in a CPU build" "built without CUDA" "${GEN[@]}" --device cuda
else
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 ||
        expect_fail "--device cuda without a GPU" "no CUDA device is visible" "${GEN[@]}" --device cuda
fi
expect_ok "--device cpu" "${GEN[@]}" --device cpu --gpu-math fp32

check "a nonexistent or truncated model file fails with a message naming it"
expect_fail "generate nonexistent model" "$T/no_such_model.safetensors" \
    "$BIN" generate --model "$T/no_such_model.safetensors" --prompt hi -q
expect_fail "logits nonexistent model" "$T/no_such_model.safetensors" \
    "$BIN" logits --model "$T/no_such_model.safetensors" --tokens 1 -o "$T/x.safetensors"
head -c 1000 "$WEIGHTS" >"$T/truncated.safetensors"
expect_fail "generate truncated model" "$T/truncated.safetensors" \
    "$BIN" generate --model "$T/truncated.safetensors" --prompt hi -q
expect_fail "info truncated model" "$T/truncated.safetensors" "$BIN" info "$T/truncated.safetensors"
expect_fail "logits truncated model" "$T/truncated.safetensors" \
    "$BIN" logits --model "$T/truncated.safetensors" --tokens 1 -o "$T/x.safetensors"
[ ! -e "$T/x.safetensors" ] || fail "a failed logits run left $T/x.safetensors"

check "NaN weights: generate says the logits are not finite (not that every token is banned)"
"$PYTHON3" - "$WEIGHTS" "$T/nan_head.safetensors" <<'PY' || fail "building a NaN model"
import json, struct, sys
b = bytearray(open(sys.argv[1], "rb").read())
n = struct.unpack("<Q", b[:8])[0]
t = json.loads(b[8:8 + n])["head.weight"]
a, e = t["data_offsets"]
assert t["dtype"] == "F32"
b[8 + n + a:8 + n + e] = struct.pack("<f", float("nan")) * ((e - a) // 4)
open(sys.argv[2], "wb").write(b)
PY
expect_fail "generate with a NaN head" \
    "the logits are not finite at generated token 0 (256 NaN or infinite values" \
    "$BIN" generate --model "$T/nan_head.safetensors" --prompt hi -q --max-tokens 3
grep -q "check the model file or the session state" "$T/stderr" || fail "no hint what to check"
grep -q "banned" "$T/stderr" && fail "NaN logits reported as banned tokens"
ok

check "crafted model headers (sparse files): info and logits fail from the header, before allocating"
# Headers copied from the tiny model and edited; the data section is a hole
# of the size the header claims, so a file that claims gigabytes costs nothing.
"$PYTHON3" - "$WEIGHTS" "$T" <<'PY' || fail "building crafted model files"
import json, struct, sys
src, out = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
def write(name, change=None, skip=None):
    h, off = {}, 0
    for k, v in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                       key=lambda kv: kv[1]["data_offsets"][0]):
        if k == skip:
            continue
        v = dict(v)
        if change and k == change[0]:
            v["shape"], v["dtype"] = change[1], change[2]
        size = {"F32": 4, "U8": 1}[v["dtype"]]
        nbytes = size
        for d in v["shape"]:
            nbytes *= d
        v["data_offsets"] = [off, off + nbytes]
        off += nbytes
        h[k] = v
    text = json.dumps(h).encode()
    with open("%s/%s" % (out, name), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + off)
write("no_head.safetensors", ("emb.weight", [1 << 24, 128], "F32"), skip="head.weight")
write("vocab_2e32.safetensors", ("emb.weight", [(1 << 32) + 256, 128], "U8"))
write("head_255.safetensors", ("head.weight", [255, 128], "F32"))
PY
expect_fail "info without head.weight" "missing tensor 'head.weight'" "$BIN" info "$T/no_head.safetensors"
expect_fail "logits without head.weight (vocab 2^24 embedding)" "missing tensor 'head.weight'" \
    "$BIN" logits --model "$T/no_head.safetensors" --tokens 1 -o "$T/x.safetensors"
expect_fail "info with a vocabulary of 2^32+256" "vocab_size would be 4294967552: out of range" \
    "$BIN" info "$T/vocab_2e32.safetensors"
grep -q "vocab_size   : 256" "$T/stdout" && fail "info printed vocab 256 for 2^32+256"
expect_fail "info with head [255,128]" "'head.weight' has shape [255,128], expected [256,128]" \
    "$BIN" info "$T/head_255.safetensors"
[ ! -e "$T/x.safetensors" ] || fail "a failed logits run left $T/x.safetensors"

# ---------------------------------------------------------------- logits --grads
check "logits --grads writes the loss and every parameter gradient of the reference"
expect_ok "logits --grads" "$BIN" logits --model "$WEIGHTS" --tokens "$TOKENS" --grads \
    -o "$T/grads.safetensors"
"$PYTHON3" "$CHECK_LOGITS" --grads "$T/grads.safetensors" \
    "$RP_TEST_DATA/tiny_L2_C128_V256_s1.grads.safetensors" >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "logits --grads differs from the reference gradients"; }
ok "$(grep -c '^ok' "$T/cmp") tensors within 1e-4"
expect_fail "logits --grads one token" "at least 2 tokens" \
    "$BIN" logits --model "$WEIGHTS" --tokens 5 --grads -o "$T/g1.safetensors"

# ---------------------------------------------------------------- train, checkpoints, resume
check "train on token shards: stop + resume from the checkpoint equals one run (byte-identical weights)"
seq 1 600 >"$T/numbers.txt"
expect_ok "tokenize numbers" "$BIN" tokenize --vocab bytes "$T/numbers.txt" -o "$T/num" -q
TRAIN_ARGS="--model-config tiny --data $T/num-00000.tok --ctx-len 16 --batch 4 --steps 6 --warmup 2 -q"
expect_ok "train straight" "$BIN" train $TRAIN_ARGS -o "$T/straight.safetensors"
expect_ok "train first half" "$BIN" train $TRAIN_ARGS --stop-after 3 --checkpoint-dir "$T/ckpt" \
    -o "$T/half.safetensors"
[ -f "$T/ckpt/latest" ] && [ -f "$T/ckpt/step-00000003/manifest.pb" ] ||
    fail "no checkpoint step-00000003 with a manifest"
expect_ok "train resumed" "$BIN" train $TRAIN_ARGS --resume "$T/ckpt" -o "$T/resumed.safetensors"
cmp -s "$T/straight.safetensors" "$T/resumed.safetensors" ||
    fail "resumed weights differ from the uninterrupted run"
cmp -s "$T/straight.safetensors" "$T/half.safetensors" && fail "the half run did not stop early"
ok
check "--resume of a checkpoint at or past --steps is refused (explicit) or nothing to do (auto), and -o is not written"
expect_fail "resume below the checkpoint" "step-00000006 is already at step 6 and --steps is 4: nothing to train" \
    "$BIN" train $TRAIN_ARGS --steps 4 --resume "$T/ckpt" -o "$T/below.safetensors"
expect_fail "resume at the checkpoint" "is already at step 6 and --steps is 6" \
    "$BIN" train $TRAIN_ARGS --resume "$T/ckpt" -o "$T/below.safetensors"
grep -q "final loss" "$T/stderr" && fail "a refused resume printed a final loss"
expect_ok "resume auto of a complete run" "$BIN" train $TRAIN_ARGS --checkpoint-dir "$T/ckpt" \
    --resume auto -o "$T/below.safetensors"
grep -q "nothing to train: .*step-00000006 is at step 6 and --steps is 6, so the run is complete; not writing $T/below.safetensors" \
    "$T/stderr" || fail "--resume auto of a complete run does not say there is nothing to do: $(cat "$T/stderr")"
[ ! -e "$T/below.safetensors" ] || fail "-o was written by a run that trained nothing"
ok
check "explicit model dimensions: --model-config L3-C128-V512-F256"
expect_ok "info explicit dims" "$BIN" info --model-config L3-C128-V512-F256
grep -q "n_layer      : 3" "$T/stdout" && grep -q "vocab_size   : 512" "$T/stdout" &&
    grep -q "dim_ffn      : 256" "$T/stdout" || fail "explicit dimensions not applied"
ok
expect_fail "bad explicit dims" "multiple of 64" "$BIN" info --model-config L2-C100

check "train --tokens sets the run length in tokens (rounded up to whole steps)"
expect_ok "train --tokens" "$BIN" train --tokens 100 --ctx-len 16 --batch 2 --eval-batches 1
grep -q "4 steps of 2 x 16 tokens" "$T/stderr" || fail "--tokens 100 with 32 tokens per step is not 4 steps"
ok

check "train --data on a plain text file tokenizes it first and leaves no temporary files"
mkdir -p "$T/tmp"
expect_ok "train on text" env TMPDIR="$T/tmp" "$BIN" train --data "$T/numbers.txt" --ctx-len 16 \
    --batch 4 --steps 2 -q -o "$T/from_text.safetensors"
[ -f "$T/from_text.safetensors" ] || fail "no weights written"
# (Open MPI keeps its own session directory there; only ours must be gone.)
[ -z "$(ls -A "$T/tmp" | grep rwkvpipe)" ] || fail "temporary files left in \$TMPDIR: $(ls "$T/tmp")"
ok
check "info CHECKPOINT --verify; a corrupted checkpoint file is named"
expect_ok "info ckpt" "$BIN" info "$T/ckpt" --verify
grep -q "step         6" "$T/stdout" || fail "info does not show step 6 of the resumed run"
f="$T/ckpt/step-00000006/adam_v.safetensors"
printf 'X' | dd of="$f" bs=1 seek=200 conv=notrunc 2>/dev/null
expect_fail "info corrupted ckpt" "adam_v.safetensors" "$BIN" info "$T/ckpt" --verify
expect_fail "resume corrupted ckpt" "adam_v.safetensors" "$BIN" train $TRAIN_ARGS --steps 8 --resume "$T/ckpt"

check "a shard truncated while training: an error naming the shard, exit != 0, the last checkpoint verifies"
cp "$T/num-00000.tok" "$T/cut.tok"
"$BIN" train --model-config tiny --data "$T/cut.tok" --ctx-len 16 --batch 4 --steps 100000 \
    --warmup 2 -q --checkpoint-dir "$T/cut_ckpt" --checkpoint-interval 1 --keep-last 2 \
    >"$T/stdout" 2>"$T/stderr" &
train_pid=$!
# Generous deadlines (a loaded machine): the first checkpoint, then the failure.
for _ in $(seq 1 1200); do
    [ -f "$T/cut_ckpt/latest" ] || ! kill -0 $train_pid 2>/dev/null && break
    sleep 0.1
done
[ -f "$T/cut_ckpt/latest" ] || { kill $train_pid 2>/dev/null; wait $train_pid; fail "no first checkpoint"; }
truncate -s 64 "$T/cut.tok"   # the header alone: every window now lies past the end
for _ in $(seq 1 1200); do
    kill -0 $train_pid 2>/dev/null || break
    sleep 0.1
done
if kill -0 $train_pid 2>/dev/null; then
    kill $train_pid; wait $train_pid; fail "train kept running on a truncated shard"
fi
wait $train_pid
rc=$?
[ $rc -ne 0 ] && [ $rc -lt 126 ] || fail "train on a truncated shard: exit $rc, expected an error (not a signal)"
grep -q "shard $T/cut.tok was truncated to 64 bytes while training (it had" "$T/stderr" ||
    fail "the error does not name the truncated shard and its sizes"
ok "exit $rc: $(grep -m1 truncated "$T/stderr")"
expect_ok "info --verify after the failure" "$BIN" info "$T/cut_ckpt" --verify
grep -q "^verified" "$T/stdout" || fail "the last checkpoint does not verify"
ok

check "eval scores every window of the shards: loss, perplexity = exp(loss), accuracy"
expect_ok "eval shards" "$BIN" eval --model "$T/straight.safetensors" --data "$T/num-00000.tok" --ctx-len 16
"$PYTHON3" - "$T/stdout" "$T/num-00000.tok" <<'PY' || fail "eval output is wrong"
import math, re, struct, sys
out = open(sys.argv[1]).read()
n_tokens = struct.unpack_from("<Q", open(sys.argv[2], "rb").read(), 24)[0]
scored = int(re.search(r"scored\s+: (\d+) tokens", out).group(1))
assert scored == (n_tokens - 1) // 16 * 16, (scored, n_tokens)
loss = float(re.search(r"loss\s+: ([0-9.]+)", out).group(1))
ppl = float(re.search(r"perplexity\s+: ([0-9.]+)", out).group(1))
assert abs(ppl - math.exp(loss)) <= 1e-3 * ppl, (loss, ppl)
assert 0 < loss < 10, loss
PY
ok
cp "$T/stdout" "$T/eval_shard.out"
expect_ok "eval text file" "$BIN" eval --model "$T/straight.safetensors" --data "$T/numbers.txt" --ctx-len 16
cmp -s "$T/stdout" "$T/eval_shard.out" || fail "eval of the text file differs from eval of its shard"
expect_fail "eval without data" "--data" "$BIN" eval --model "$T/straight.safetensors"

check "eval --last-word and --choice: log-likelihoods equal those from the logits command"
printf '{"text": "1 2 3 4 5"}\n{"text": "10 11 12"}\n' >"$T/lw.jsonl"
printf '{"context": "1 2 3", "choices": [" 4", " xyz"], "label": 0}\n' >"$T/mc.jsonl"
expect_ok "eval last word" "$BIN" eval --model "$WEIGHTS" --last-word "$T/lw.jsonl" --per-example
cp "$T/stdout" "$T/lw.out"
expect_ok "eval choice" "$BIN" eval --model "$WEIGHTS" --choice "$T/mc.jsonl" --per-example
cp "$T/stdout" "$T/mc.out"
# Reference: [0] + context + target through `logits`, log-softmax in Python.
ref_logp() {  # CONTEXT TARGET -> summed log p(target | [0] + context)
    local ids
    ids=$(printf '%s%s' "$1" "$2" | "$PYTHON3" -c 'import sys; print(",".join(["0"] + [str(b) for b in sys.stdin.buffer.read()]))')
    "$BIN" logits --model "$WEIGHTS" --tokens "$ids" -o "$T/ref.safetensors" 2>/dev/null || return 1
    "$PYTHON3" - "$T/ref.safetensors" "${#1}" "$2" <<'PY'
import math, sys
sys.path.insert(0, __import__("os").environ["top_srcdir"] + "/tests")
from check_logits import read_safetensors
dt, shape, vals = read_safetensors(sys.argv[1])["logits"]
V, n_ctx, tgt = shape[1], int(sys.argv[2]), sys.argv[3].encode()
total = 0.0
for j, t in enumerate(tgt):
    row = vals[(n_ctx + j) * V:(n_ctx + j + 1) * V]
    m = max(row)
    total += row[t] - m - math.log(sum(math.exp(z - m) for z in row))
print("%.6f" % total)
PY
}
close() { "$PYTHON3" -c 'import sys; sys.exit(abs(float(sys.argv[1]) - float(sys.argv[2])) > 2e-4)' "$1" "$2"; }
want=$(ref_logp "1 2 3 4" " 5") || fail "reference logits failed"
got=$(awk '$1 == 0 {print $3}' "$T/lw.out")
close "$got" "$want" || fail "last-word log p $got, reference $want"
want=$(ref_logp "1 2 3" " xyz") || fail "reference logits failed"
got=$(awk '$1 == 0 {print $6}' "$T/mc.out")
close "$got" "$want" || fail "choice 1 log p $got, reference $want"
grep -q "examples     : 2" "$T/lw.out" || fail "last-word examples count"
ok "log p $got = reference $want"
printf '{"text": "nospace"}\n' >"$T/bad.jsonl"
expect_fail "eval bad last-word line" "bad.jsonl:1" "$BIN" eval --model "$WEIGHTS" --last-word "$T/bad.jsonl"

# ---------------------------------------------------------------- tokenize
check "tokenize writes a shard whose tokens are the bytes of the text plus token 0"
printf 'hello\nworld\n' >"$T/corpus.txt"
expect_ok "tokenize" "$BIN" tokenize --vocab bytes "$T/corpus.txt" -o "$T/shard" -q
[ -f "$T/shard-00000.tok" ] || fail "tokenize did not write $T/shard-00000.tok"
"$PYTHON3" - "$T/shard-00000.tok" <<'PY' || fail "shard content is wrong"
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"RWKVTOK1", data[:8]
version, kind, n_ids, dtype, n_tokens, n_docs = struct.unpack_from("<IIIIQQ", data, 8)
assert (version, kind, n_ids, dtype, n_docs) == (1, 0, 256, 0, 1), (version, kind, n_ids, dtype, n_docs)
tokens = list(struct.unpack_from("<%dH" % n_tokens, data, 64))
assert tokens == list(b"hello\nworld\n") + [0], tokens
assert len(data) == 64 + 2 * n_tokens
PY
ok
expect_fail "tokenize existing output" "exist" \
    "$BIN" tokenize --vocab bytes "$T/corpus.txt" -o "$T/shard" -q
expect_fail "tokenize missing input" "no_such_file" \
    "$BIN" tokenize --vocab bytes "$T/no_such_file.txt" -o "$T/shard2" -q

# ---------------------------------------------------------------- schedule
check "schedule --pp 4 --micro-batches 8 --kind 1f1b prints the lists and a 3/11 bubble"
expect_ok "schedule --help" "$BIN" schedule --help
grep -q "^usage: rwkvpipe schedule" "$T/stdout" || fail "schedule --help: no usage line"
expect_ok "schedule" "$BIN" schedule --pp 4 --micro-batches 8 --kind 1f1b
grep -q "^schedule 1f1b: 4 stages, 8 micro-batches" "$T/stdout" || fail "schedule: no header line"
for s in 0 1 2 3; do
    grep -q "^stage $s (" "$T/stdout" || fail "schedule: no instruction list for stage $s"
done
grep -q "bubble fraction 0.2727" "$T/stdout" || fail "schedule: bubble fraction is not 0.2727 (3/11)"
ok "$(grep 'bubble fraction' "$T/stdout")"
expect_fail "schedule --pp 0" "--pp" "$BIN" schedule --pp 0 --micro-batches 8
expect_fail "schedule --kind" "zigzag" "$BIN" schedule --pp 2 --micro-batches 2 --kind zigzag

# ---------------------------------------------------------------- HF/fla names
# Last, so that a loader bug here does not hide the checks above.
MAKE_HF="$top_srcdir/tests/make_hf_names.py"
check "logits of an HF/fla-named copy of the weights match the reference"
if [ -f "$MAKE_HF" ]; then
    "$PYTHON3" "$MAKE_HF" "$WEIGHTS" "$T/hf.safetensors" >"$T/stderr" 2>&1 ||
        fail "make_hf_names.py could not write the HF-named copy"
    expect_ok "info HF copy" "$BIN" info "$T/hf.safetensors"
    grep -q 'HF/fla names' "$T/stdout" || fail "info does not report HF/fla names"
    expect_ok "logits HF copy" "$BIN" logits --model "$T/hf.safetensors" --tokens "$TOKENS" \
        -o "$T/hf_logits.safetensors"
    "$PYTHON3" "$CHECK_LOGITS" "$T/hf_logits.safetensors" "$GOLDEN" >"$T/cmp" 2>&1 ||
        { cat "$T/cmp"; fail "logits of the HF-named copy differ from the reference"; }
    sed 's/^/  /' "$T/cmp"
else
    echo "  skip: no $MAKE_HF"
fi

echo "PASS: all rwkvpipe CLI checks"
exit 0
