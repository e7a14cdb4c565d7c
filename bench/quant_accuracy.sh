#!/usr/bin/env bash
# Accuracy of the low-precision CPU weights (issue 20, docs/perf/cpu.md): a
# tiny byte-level model trained on this repository's docs, scored on held-out
# text it never saw in f32, bf16 and int8. Two paths per format: prefill
# (`eval` over all held-out windows: many rows per call: the vdpbf16ps GEMM
# with x rounded to bf16, for bf16 and int8 W) and decode (`logits --mode step` over the first 2048 held-out bytes:
# one row per call, the kernel the CPU picks: bf16dot rounds x to bf16, vnni
# quantizes x per block of 32), plus both with the widening kernels only
# (RP_CPU_ISA=avx512, x stays f32); int8row (one scale per W row) the same
# two ways (its vnni kernel quantizes x per 128-k group). Prints loss, perplexity, its change and
# the next-token agreement with f32. A benchmark, not a test: training takes
# a few minutes.
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
head -c 2048 "$T/heldout.txt" | python3 -c \
    'import sys; print(",".join(str(b) for b in sys.stdin.buffer.read()))' >"$T/toks"

run() { # NAME ENV...: prefill eval of the held-out text, step-mode logits of its start
    local name="$1"; shift
    echo "scoring $name..." >&2
    env "$@" "$bin" eval --model "$T/model.safetensors" --data "$T/heldout.txt" --ctx-len 128 \
        ${W:+--weights-dtype "$W"} >"$T/$name.eval" 2>&1
    env "$@" "$bin" logits --model "$T/model.safetensors" --tokens-file "$T/toks" --mode step \
        ${W:+--weights-dtype "$W"} -o "$T/$name.st" >/dev/null 2>&1
}
W=""; run f32 RP_QA=1
for W in bf16 int8 int8row; do
    run "$W" RP_QA=1
    run "$W-widen" RP_CPU_ISA=avx512
done
python3 - "$T" <<'PY'
import json, math, re, struct, sys
T = sys.argv[1]
def eval_loss(name):
    return float(re.search(r"loss[^0-9]*([0-9.]+)", open(f"{T}/{name}.eval").read()).group(1))
def tensor(name, key):
    raw = open(f"{T}/{name}.st", "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    t = json.loads(raw[8:8 + n])[key]
    a, b = t["data_offsets"]
    fmt = {"F32": "f", "I32": "i"}[t["dtype"]]
    vals = struct.unpack(f"<{(b - a) // 4}{fmt}", raw[8 + n + a:8 + n + b])
    if len(t["shape"]) == 1: return list(vals)
    V = t["shape"][-1]
    return [vals[i:i + V] for i in range(0, len(vals), V)]
def step_loss(rows, toks):
    tot = 0.0
    for r, nxt in zip(rows, toks[1:]):
        m = max(r)
        tot += m + math.log(sum(math.exp(x - m) for x in r)) - r[nxt]
    return tot / (len(toks) - 1)
toks = tensor("f32", "tokens")
ref = tensor("f32", "logits")
ref_eval, ref_step = eval_loss("f32"), step_loss(ref, toks)
print("| weights | prefill (eval, all held-out) loss / ppl change | decode kernel | decode (step, 2048 bytes) loss / ppl change | next-token agreement | max abs logit diff |")
print("| --- | --- | --- | --- | --- | --- |")
print(f"| f32 | {ref_eval:.6f} / - | - | {ref_step:.6f} / - | - | - |")
pct = lambda l, r: (math.exp(l - r) - 1) * 100
for name, kern in [("bf16", "bf16dot (x rounded to bf16)"), ("bf16-widen", "avx512 widening (x f32)"),
                   ("int8", "vnni (x quantized per block of 32)"), ("int8-widen", "avx512 widening (x f32)"),
                   ("int8row", "vnni (x quantized per 128-k group)"), ("int8row-widen", "avx512 widening (x f32)")]:
    le = eval_loss(name); rows = tensor(name, "logits"); ls = step_loss(rows, toks)
    agree = sum(max(range(len(r)), key=r.__getitem__) == max(range(len(q)), key=q.__getitem__)
                for r, q in zip(rows, ref))
    diff = max(abs(x - y) for r, q in zip(rows, ref) for x, y in zip(r, q))
    print(f"| {name.split('-')[0]} | {le:.6f} / {pct(le, ref_eval):+.3f}% | {kern} | {ls:.6f} / "
          f"{pct(ls, ref_step):+.3f}% | {100 * agree / len(ref):.2f}% ({agree}/{len(ref)}) | {diff:.3f} |")
PY
