#!/bin/bash
# Memory at load (issue 20): loading weights must not keep the file's mapped
# pages resident beside the model's own copy. A model of the 0.1b shape with
# a 16384-token vocabulary (~440 MiB of f32 weights) is loaded by `rwkvpipe
# logits`; its peak RSS (/usr/bin/time -v) must stay within 1.1x the weights
# in their run-time format plus a fixed allowance for the binary, OpenMP,
# BLAS and the run's buffers, measured here as the tiny model's peak plus
# 48 MiB of slack. Before streaming with page release the peak was ~2x.
# The same for --weights-dtype bf16, int8 and int8row (converted while loading);
# WEIGHTS_DTYPES="f32" limits the run to one format.
# Run by `make check` (env: top_srcdir, top_builddir, MPIRUN).
set -u
: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${top_builddir:=.}"
BIN="$top_builddir/rwkvpipe"
TIME=/usr/bin/time
if [ ! -x "$TIME" ] || ! "$TIME" -v true >/dev/null 2>&1; then
    echo "skip: $TIME (GNU time with -v) is missing"
    exit 77
fi
if ldd "$BIN" 2>/dev/null | grep -q 'libasan\|libtsan'; then
    echo "skip: a sanitizer build: its shadow memory is in the RSS"
    exit 77
fi
T=$(mktemp -d "${TMPDIR:-/tmp}/test_load_memory.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# Peak RSS in KiB of one `rwkvpipe logits` run on $1 (extra args after it).
peak_kib() {
    local model="$1"; shift
    "$TIME" -v "$BIN" logits --model "$model" --tokens 1,2,3 -o "$T/out.safetensors" \
        --threads 1 "$@" 2>"$T/time.txt" >/dev/null || { cat "$T/time.txt"; fail "logits on $model"; }
    awk -F': ' '/Maximum resident set size/ {print $2}' "$T/time.txt"
}

"$BIN" init --model-config tiny -o "$T/tiny.safetensors" >/dev/null 2>&1 || fail "init tiny"
"$BIN" init --model-config 0.1b --vocab-size 16384 -o "$T/big.safetensors" >/dev/null 2>&1 ||
    fail "init 0.1b"
base=$(peak_kib "$T/tiny.safetensors")
allow=$((base + 48 * 1024))
echo "allowance: tiny model peak $((base / 1024)) MiB + 48 MiB"

# Bytes of the weights in a run-time format: the quantized matrices (att
# receptance/key/value/output, ffn key/value, head) at 4, 2 or 1 (+2/32 for
# the int8 scales) bytes, the LoRA factors bf16 in bf16/int8 models, every
# other tensor f32 (docs/perf/cpu.md).
weights_kib() {
    python3 - "$T/big.safetensors" "$1" <<'PY'
import json, struct, sys
path, fmt = sys.argv[1], sys.argv[2]
with open(path, 'rb') as f:
    n = struct.unpack('<Q', f.read(8))[0]
    hdr = json.loads(f.read(n))
q = ('att.receptance.weight', 'att.key.weight', 'att.value.weight', 'att.output.weight',
     'ffn.key.weight', 'ffn.value.weight')
per = {'f32': 4.0, 'bf16': 2.0, 'int8': 1.0 + 2.0 / 32, 'int8row': 1.0}
total = 0.0
for name, t in hdr.items():
    if name == '__metadata__': continue
    numel = 1
    for d in t['shape']: numel *= d
    quant = name == 'head.weight' or name.endswith(q)
    lora = fmt != 'f32' and name.split('.')[-1] in ('w1', 'w2', 'a1', 'a2', 'v1', 'v2', 'g1', 'g2')
    total += numel * (per[fmt] if quant else 2.0 if lora else 4.0)
print(int(total / 1024))
PY
}

for fmt in ${WEIGHTS_DTYPES:-f32 bf16 int8 int8row}; do
    args=()
    [ "$fmt" != f32 ] && args=(--weights-dtype "$fmt")
    w=$(weights_kib "$fmt")
    peak=$(peak_kib "$T/big.safetensors" "${args[@]}")
    bound=$((w * 11 / 10 + allow))
    echo "$fmt: weights $((w / 1024)) MiB, peak RSS $((peak / 1024)) MiB, bound $((bound / 1024)) MiB"
    [ "$peak" -le "$bound" ] || fail "$fmt: peak RSS $((peak / 1024)) MiB > $((bound / 1024)) MiB"
done
# Per pipeline stage: --pp 2 with 6 + 6 layers (each stage holds half the
# layers and one of the equal-sized embedding / head), under mpirun; GNU
# time reports the largest rank. Allowance: the tiny model the same way.
: "${MPIRUN:=}"
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: --pp 2 (no mpirun)"
else
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
    pp_peak_kib() {
        local model="$1" layers="$2"; shift 2
        "$TIME" -v $MPIRUN -np 2 "$BIN" logits --model "$model" --tokens 1,2,3 -o "$T/out.safetensors" \
            --threads 1 --pp 2 --stage-layers "$layers" "$@" 2>"$T/time.txt" >/dev/null ||
            { cat "$T/time.txt"; fail "logits --pp 2 on $model"; }
        awk -F': ' '/Maximum resident set size/ {print $2}' "$T/time.txt"
    }
    pp_allow=$(($(pp_peak_kib "$T/tiny.safetensors" 1,1) + 48 * 1024))
    for fmt in ${WEIGHTS_DTYPES:-f32 int8}; do  # bf16 lies between (time: mpirun is slow)
        args=()
        [ "$fmt" != f32 ] && args=(--weights-dtype "$fmt")
        w=$(($(weights_kib "$fmt") / 2))
        peak=$(pp_peak_kib "$T/big.safetensors" 6,6 "${args[@]}")
        bound=$((w * 11 / 10 + pp_allow))
        echo "$fmt --pp 2: weights per stage $((w / 1024)) MiB, largest rank's peak RSS" \
            "$((peak / 1024)) MiB, bound $((bound / 1024)) MiB"
        [ "$peak" -le "$bound" ] || fail "$fmt --pp 2: peak RSS $((peak / 1024)) MiB > $((bound / 1024)) MiB"
    done
fi
echo "ok"
