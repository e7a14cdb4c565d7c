#!/bin/bash
# Runs tests/test_engine on 1, 2 and 3 ranks (the engine's results must not
# depend on the number of pipeline stages); the L3 model lets 3 stages
# each own a layer.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u
: "${top_builddir:=.}"
: "${RP_TEST_DATA:=$(dirname "$0")/data}"
: "${MPIRUN:=}"
BIN="$top_builddir/tests/test_engine"
echo "== one process"
"$BIN" || exit 1
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun for the multi-stage runs"
    exit 0
fi
T=$(mktemp -d "${TMPDIR:-/tmp}/test_engine.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT
"$top_builddir/rwkvpipe" init --model-config L3-C64-V256 --seed 4 -o "$T/l3.st" >/dev/null 2>&1 ||
    { echo "FAIL: init"; exit 1; }
for np in 1 2 3; do
    echo "== mpirun -np $np (L3-C64-V256)"
    RP_ENGINE_SESSION_DIR="$T" timeout 300 "$MPIRUN" -np $np -x RP_ENGINE_SESSION_DIR "$BIN" \
        "$T/l3.st" || exit 1
done
echo "== mpirun -np 2 (tiny golden model)"
timeout 300 "$MPIRUN" -np 2 "$BIN" || exit 1
echo "== rwkvpipe generate: one process and --pp 2, --pp 3 print the same text"
GEN=(generate --model "$T/l3.st" --vocab bytes --prompt "hello there" --max-tokens 40 --seed 3
     --temperature 0.8 --presence-penalty 0.3 --frequency-penalty 0.3 -q --threads 1)
"$top_builddir/rwkvpipe" "${GEN[@]}" >"$T/gen1" || { echo "FAIL: generate"; exit 1; }
for np in 2 3; do
    timeout 120 "$MPIRUN" -np $np "$top_builddir/rwkvpipe" "${GEN[@]}" --pp $np >"$T/gen$np" ||
        { echo "FAIL: generate --pp $np"; exit 1; }
    cmp -s "$T/gen1" "$T/gen$np" || { echo "FAIL: generate --pp $np printed other text"; exit 1; }
done
echo "  ok"
