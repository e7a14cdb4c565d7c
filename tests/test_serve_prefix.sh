#!/bin/bash
# rwkvpipe serve: the prefix state cache (docs/serving.md, "Prefix state
# cache"). A chat that resends its history every turn and completions that
# repeat or extend a prompt give the same text with the cache (1 process,
# and --pp 2 where each stage keeps its own layers' states) as without it
# (--prefix-cache-mb 0), greedy and seeded; /metrics shows the hits and the
# tokens saved; n > 1 and prompts from a stored state (initial_state) resume
# from it too. Run by `make check` (env: top_srcdir, top_builddir, MPIRUN,
# PYTHON3, RP_TEST_DATA; KEEP=1 keeps the scratch directory).
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u
. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
BIN="$top_builddir/rwkvpipe"
TINY="$RP_TEST_DATA/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_serve_prefix.XXXXXX") || exit 99
SERVE_TEST_SECONDS=240
. "$top_srcdir/tests/serve_test_lib.sh"
CLIENT=("$PYTHON3" "$top_srcdir/tests/serve_prefix_client.py")
TURNS=6

start A "$BIN" serve --model "$TINY" --port 0 --threads 1 --prefix-cache-mb 0
start B "$BIN" serve --model "$TINY" --port 0 --threads 1
"${CLIENT[@]}" run "$URL_A" $TURNS >"$T/a.json" 2>"$T/a.err" || { cat "$T/a.err"; exit 1; }
"${CLIENT[@]}" run "$URL_B" $TURNS >"$T/b.json" 2>"$T/b.err" || { cat "$T/b.err"; exit 1; }
expect "the replies have text" grep -q '[a-z]' "$T/a.json"
expect "with the prefix cache the replies are the same, byte for byte" cmp "$T/a.json" "$T/b.json"
"${CLIENT[@]}" metrics "$URL_A" >"$T/ma.json"
"${CLIENT[@]}" metrics "$URL_B" >"$T/mb.json"
# every chat turn after the first and every repeated or extended completion hits
check_metrics() {
    "$PYTHON3" - "$1" "$2" "$3" <<'PY'
import json, sys
off, on, min_hits = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[3])
assert off["prefix_cache_hits_total"] == 0 and off["prefix_cache_bytes"] == 0, off
assert on["prefix_cache_hits_total"] >= min_hits, (on, min_hits)
assert on["prefix_cache_tokens_saved_total"] > 0 and on["prefix_cache_bytes"] > 0, on
# what was saved is not read: the prefills add up
assert on["tokens_prefilled_total"] + on["prefix_cache_tokens_saved_total"] == \
    off["tokens_prefilled_total"], (on, off)
PY
}
MIN_HITS=$((TURNS - 1 + 10 + 1 + 2))
expect "/metrics: hits, tokens saved, bytes; prefilled + saved = prefilled without the cache" \
    check_metrics "$T/ma.json" "$T/mb.json" $MIN_HITS
# usage.prompt_tokens_details.cached_tokens, as OpenAI reports its own cache:
# a repeated prompt resumes all but its last token (the cache stores
# prompts less their last token), also with n > 1 and from a stored state,
# and nothing without the cache.
check_cached() {
    "$PYTHON3" - "$1" "$2" <<'PY'
import json, sys
want_hit = sys.argv[2] == "on"
out = json.load(open(sys.argv[1]))
# sent twice: the second resumes all but the last token (plain, n > 1, from
# a stored state); a stored state written again is another origin (nothing
# resumed); a session that goes on is its own cache (nothing resumed)
for label in ("plain", "n", "initial_state"):
    first, second = out[label]
    assert first["cached_tokens"] == 0, (label, first)
    n = second["prompt_tokens"]
    assert second["cached_tokens"] == (n - 1 if want_hit else 0), (label, second, want_hit)
assert out["initial_state_new_version"][0]["cached_tokens"] == 0, out
assert all(r["cached_tokens"] == 0 for r in out["session"]), out
PY
}
"${CLIENT[@]}" cached "$URL_A" >"$T/ca.json" 2>&1
"${CLIENT[@]}" cached "$URL_B" >"$T/cb.json" 2>&1
expect "usage: cached_tokens 0 without the cache" check_cached "$T/ca.json" off
expect "usage: a repeated prompt reports its cached tokens" check_cached "$T/cb.json" on

if [ -n "$MPIRUN" ] && command -v "$MPIRUN" >/dev/null 2>&1; then
    start C "$MPIRUN" -np 2 "$BIN" serve --model "$TINY" --pp 2 --port 0 --threads 1
    "${CLIENT[@]}" run "$URL_C" $TURNS >"$T/c.json" 2>"$T/c.err" || { cat "$T/c.err"; exit 1; }
    expect "--pp 2 with the prefix cache: the same replies as one process without it" \
        cmp "$T/a.json" "$T/c.json"
    "${CLIENT[@]}" metrics "$URL_C" >"$T/mc.json"
    expect "--pp 2 /metrics: hits and tokens saved" check_metrics "$T/ma.json" "$T/mc.json" $MIN_HITS
else
    echo "skip: no mpirun for the --pp 2 server"
fi
serve_test_end
