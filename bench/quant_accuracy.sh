#!/usr/bin/env bash
# Accuracy of the low-precision CPU weights (issue 20, docs/perf/cpu.md): a
# tiny byte-level model trained on this repository's docs, scored on held-out
# text it never saw in f32, bf16 and int8, with the kernels the CPU picks and
# with the widening kernels only (RP_CPU_ISA=avx512: x stays f32). Prints
# loss, perplexity and its change, and the next-token agreement with f32
# over the first 1024 held-out bytes. A benchmark, not a test: training
# takes a few minutes.
# usage: bench/quant_accuracy.sh [BUILD_DIR [STEPS]]   (default build/cpu 600)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/cpu}"
steps="${2:-600}"
bin="$build/rwkvpipe"
[ -x "$bin" ] || { echo "quant_accuracy: no $bin (build first: launch/build cpu)" >&2; exit 1; }
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT

# Held out: two docs the training text does not contain.
cat "$root/docs/rwkv7.md" "$root/docs/formats.md" >"$T/heldout.txt"
for f in "$root"/README.md "$root"/docs/*.md; do
    case "$f" in */rwkv7.md | */formats.md) ;; *) cat "$f" ;; esac
done >"$T/train.txt"
echo "training the tiny model for $steps steps on $(wc -c <"$T/train.txt") bytes..." >&2
"$bin" train --model-config tiny --data "$T/train.txt" --ctx-len 128 --batch 8 \
    --steps "$steps" --lr 3e-3 --lr-final 1e-4 -o "$T/model.safetensors" -q >&2
head -c 1024 "$T/heldout.txt" | python3 -c \
    'import sys; print(",".join(str(b) for b in sys.stdin.buffer.read()))' >"$T/toks"

score() { # NAME ENV... -- ARGS: eval loss and logits of the first 1024 bytes
    local name="$1"; shift
    env "$@" "$bin" eval --model "$T/model.safetensors" --data "$T/heldout.txt" --ctx-len 128 \
        $W >"$T/$name.eval" 2>&1
    env "$@" "$bin" logits --model "$T/model.safetensors" --tokens-file "$T/toks" $W \
        -o "$T/$name.st" >/dev/null 2>&1
}
W=""; score f32 RP_QA=1
for dt in bf16 int8; do
    W="--weights-dtype $dt"; score "$dt" RP_QA=1
    W="--weights-dtype $dt"; score "$dt-widen" RP_CPU_ISA=avx512
done
python3 - "$T" <<'PY'
import json, math, re, struct, sys
T = sys.argv[1]
def loss(name):
    text = open(f"{T}/{name}.eval").read()
    m = re.search(r"loss[^0-9]*([0-9.]+)", text)
    return float(m.group(1))
def logits(name):
    raw = open(f"{T}/{name}.st", "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    t = head["logits"]; a, b = t["data_offsets"]
    data = raw[8 + n + a: 8 + n + b]
    vals = struct.unpack(f"<{len(data)//4}f", data)
    V = t["shape"][-1]
    return [vals[i:i + V] for i in range(0, len(vals), V)]
ref_loss, ref = loss("f32"), logits("f32")
print(f"| weights | kernels | loss (nats/token) | perplexity | vs f32 | next-token agreement | max abs logit diff |")
print(f"| --- | --- | --- | --- | --- | --- | --- |")
print(f"| f32 | - | {ref_loss:.6f} | {math.exp(ref_loss):.4f} | - | - | - |")
for name, kern in [("bf16", "chosen (bf16dot: x rounded to bf16)"), ("bf16-widen", "widening (x f32)"),
                   ("int8", "chosen (vnni: x quantized per block of 32)"), ("int8-widen", "widening (x f32)")]:
    l = loss(name); rows = logits(name)
    agree = sum(max(range(len(r)), key=r.__getitem__) == max(range(len(q)), key=q.__getitem__)
                for r, q in zip(rows, ref))
    diff = max(abs(x - y) for r, q in zip(rows, ref) for x, y in zip(r, q))
    d = (math.exp(l) / math.exp(ref_loss) - 1) * 100
    print(f"| {name.split('-')[0]} | {kern} | {l:.6f} | {math.exp(l):.4f} | {d:+.3f}% | "
          f"{100*agree/len(ref):.2f}% ({agree}/{len(ref)}) | {diff:.3f} |")
PY
