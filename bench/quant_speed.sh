#!/usr/bin/env bash
# Whole-model speed of the low-precision CPU weights (issue 20): the 0.1B
# shape (official init; speed does not depend on the values) as f32, bf16,
# int8 and int8row files (`rwkvpipe quantize`), each run through bench_engine (the
# serving engine without HTTP) for decode batch 1, decode batch 8 and a
# 512-token prefill, at 1 and 2 threads. The formats alternate inside each
# round, so the ratios to f32 are taken within a round; the table has the
# median of ROUNDS rounds. Goals (issue 20): decode batch 1 bf16 >= 1.8x and
# int8 >= 3.2x f32; prefill >= 1.0x f32; batch 8 >= 4x batch 1.
# usage: bench/quant_speed.sh [BUILD_DIR [SHAPE [ROUNDS]]]  (build/cpu 0.1b 3)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/cpu}"
shape="${2:-0.1b}"
rounds="${3:-3}"
bin="$build/rwkvpipe"
engine="$build/bench/bench_engine"
for x in "$bin" "$engine"; do
    [ -x "$x" ] || { echo "quant_speed: no $x (build first: launch/build cpu)" >&2; exit 1; }
done
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
echo "quant_speed: writing the $shape model as f32, bf16, int8 and int8row..." >&2
"$bin" init --model-config "$shape" -o "$T/f32.st" >/dev/null 2>&1
"$bin" quantize "$T/f32.st" -o "$T/bf16.st" --type bf16 -q
"$bin" quantize "$T/f32.st" -o "$T/int8.st" --type int8 -q
"$bin" quantize "$T/f32.st" -o "$T/int8row.st" --type int8row -q
: >"$T/rows"
for r in $(seq "$rounds"); do
    for t in 1 2; do
        for w in f32 bf16 int8 int8row; do
            echo "quant_speed: round $r, $t thread(s), $w..." >&2
            "$engine" --model "$T/$w.st" --threads "$t" --concurrency 1,8 --contexts 512 \
                --decode-tokens 64 >"$T/out" 2>&1 || { cat "$T/out" >&2; exit 1; }
            # rows: "| 1 | s | tok/s | ..." (concurrency) and "| 512 | s | tok/s | ms |" (prefill)
            b1=$(awk -F'|' '$2 ~ /^ *1 *$/ {gsub(/ /, "", $4); print $4; exit}' "$T/out")
            b8=$(awk -F'|' '$2 ~ /^ *8 *$/ {gsub(/ /, "", $4); print $4; exit}' "$T/out")
            pp=$(awk -F'|' '$2 ~ /^ *512 *$/ {gsub(/ /, "", $4); print $4; exit}' "$T/out")
            echo "$r $t $w $b1 $b8 $pp" >>"$T/rows"
        done
    done
done
head -6 "$T/out" | grep -E "machine|date|OpenBLAS:" || true
python3 - "$T/rows" "$shape" "$rounds" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
shape, rounds = sys.argv[2], sys.argv[3]
data = {}
for r, t, w, b1, b8, pp in rows:
    data.setdefault((int(t), w), []).append((int(r), float(b1), float(b8), float(pp)))
print(f"\n{shape}, medians of {rounds} rounds (ratios to f32 within each round)\n")
print("| threads | weights | decode b1 tok/s | b1 vs f32 | decode b8 tok/s | b8 / b1 | prefill 512 tok/s | prefill vs f32 |")
print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for t in (1, 2):
    base = {r: (b1, pp) for r, b1, b8, pp in data[(t, "f32")]}
    for w in ("f32", "bf16", "int8", "int8row"):
        v = data[(t, w)]
        b1 = st.median(x[1] for x in v); b8 = st.median(x[2] for x in v)
        pp = st.median(x[3] for x in v)
        r_b1 = st.median(x[1] / base[x[0]][0] for x in v)
        r_pp = st.median(x[3] / base[x[0]][1] for x in v)
        r_b8 = st.median(x[2] / x[1] for x in v)
        print(f"| {t} | {w} | {b1:.1f} | {r_b1:.2f}x | {b8:.1f} | {r_b8:.2f}x | {pp:.0f} | {r_pp:.2f}x |")
PY
