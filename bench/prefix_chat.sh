#!/bin/bash
# The prefix state cache benchmark (issue 14; not a test): a TURNS-turn chat
# through the HTTP API that resends its whole history every turn, against a
# server with the cache (default size) and one without (--prefix-cache-mb 0).
# Per turn: the prompt tokens, the tokens new since the previous reply, the
# tokens the engine prefilled (/metrics), the tokens the cache saved, and the
# time to the first streamed token. Results: docs/perf/serving.md.
#   bench/prefix_chat.sh [BUILD_DIR] [MODEL_CONFIG] [TURNS]
# (defaults build/cpu, L12-C768-V65536 = the 0.1B shape, 20). Byte vocabulary.
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/cpu}"
config="${2:-L12-C768-V65536}"
turns="${3:-20}"
T=$(mktemp -d "${TMPDIR:-/tmp}/bench_prefix_chat.XXXXXX") || exit 1
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT
serve() {  # serve NAME ARGS...: starts a server, sets URL
    local name=$1
    shift
    "$build/rwkvpipe" serve --model-config "$config" --vocab bytes --port 0 "$@" \
        >"$T/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 600); do grep -q "listening on" "$T/$name.log" && break; sleep 0.1; done
    URL=$(grep -m1 -o 'http://[^ ]*' "$T/$name.log") || { cat "$T/$name.log"; exit 1; }
}
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) CPUs;" \
     "load average: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "model: --model-config $config (official init), byte vocabulary, $turns turns, 32 tokens per reply"
for mode in on off; do
    if [ $mode = on ]; then serve on; else serve off --prefix-cache-mb 0; fi
    echo "== prefix cache $mode"
    python3 "$root/tests/serve_prefix_client.py" bench "$URL" "$turns"
    kill -TERM "${pids[-1]}" 2>/dev/null
    wait "${pids[-1]}" 2>/dev/null
done
