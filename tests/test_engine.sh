#!/bin/bash
# Runs tests/test_engine on 1, 2 and 3 ranks (the engine's results must not
# depend on the number of pipeline stages); the L4 model lets up to 4
# stages each own a layer.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u
: "${top_builddir:=.}"
: "${RP_TEST_DATA:=$(dirname "$0")/data}"
: "${MPIRUN:=}"
BIN="$top_builddir/tests/test_engine"
echo "== one process"
"$BIN" || exit 1
# The prefix state cache: every check again with it on (room for all
# states, and for one: the LRU evicts at every store).
for mode in big tiny; do
    echo "== one process, prefix cache $mode"
    RP_TEST_PREFIX_CACHE=$mode "$BIN" || exit 1
done
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun for the multi-stage runs"
    exit 0
fi
T=$(mktemp -d "${TMPDIR:-/tmp}/test_engine.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT
# A 4-layer model for up to 4 stages: the official small reference model when
# ../shared is there, else a freshly initialised one (its zero att.output makes
# the state-sensitivity check moot; the program is told so).
SMALL="${RP_SHARED_DIR:-$(dirname "$0")/../../shared}/golden/rwkv7/small_L4_C256_V1024_s2.weights.safetensors"
if [ -r "$SMALL" ]; then
    cp "$SMALL" "$T/l4.st"
    KIND=reference
else
    "$top_builddir/rwkvpipe" init --model-config L4-C64-V256 --seed 4 -o "$T/l4.st" >/dev/null 2>&1 ||
        { echo "FAIL: init"; exit 1; }
    KIND=init
fi
for np in 1 2 3 4; do
    echo "== mpirun -np $np (4-layer $KIND model)"
    RP_ENGINE_SESSION_DIR="$T" timeout 300 "$MPIRUN" -np $np -x RP_ENGINE_SESSION_DIR "$BIN" \
        "$T/l4.st" $KIND || exit 1
done
echo "== mpirun -np 2 (tiny golden model)"
timeout 300 "$MPIRUN" -np 2 "$BIN" || exit 1
for mode in big tiny; do
    echo "== mpirun -np 2 (tiny golden model), prefix cache $mode"
    RP_TEST_PREFIX_CACHE=$mode timeout 300 "$MPIRUN" -np 2 -x RP_TEST_PREFIX_CACHE "$BIN" || exit 1
done
echo "== rwkvpipe generate: one process, --pp 2 and --pp 4 print the same text"
GEN=(generate --model "$T/l4.st" --vocab bytes --prompt "hello there" --max-tokens 40 --seed 3
     --temperature 0.8 --presence-penalty 0.3 --frequency-penalty 0.3 -q --threads 1)
"$top_builddir/rwkvpipe" "${GEN[@]}" >"$T/gen1" || { echo "FAIL: generate"; exit 1; }
for np in 2 4; do
    timeout 120 "$MPIRUN" -np $np "$top_builddir/rwkvpipe" "${GEN[@]}" --pp $np >"$T/gen$np" ||
        { echo "FAIL: generate --pp $np"; exit 1; }
    cmp -s "$T/gen1" "$T/gen$np" || { echo "FAIL: generate --pp $np printed other text"; exit 1; }
done
echo "  ok"
