#!/bin/bash
# rwkvpipe serve with response_format (docs/serving.md, Structured output): json_object and a
# json_schema over many seeds at temperature 1 on the tiny random model, n > 1, a batch of
# prompts, streaming and chat give documents that parse and validate; max_tokens cuts a
# document with finish_reason "length"; an unsupported schema keyword is a 400 naming it. On
# one process and on --pp 2 (the last stage masks the tokens). Driven by
# tests/serve_json_client.py. Run by `make check`.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
BIN="$top_builddir/rwkvpipe"
CLIENT=("$PYTHON3" "$top_srcdir/tests/serve_json_client.py")
TINY="$RP_TEST_DATA/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_serve_json.XXXXXX") || exit 99
SERVE_TEST_SECONDS=300
. "$top_srcdir/tests/serve_test_lib.sh"

start A "$BIN" serve --model "$TINY" --port 0 --threads 1
expect "one process: every response_format reply is a valid document" "${CLIENT[@]}" "$URL_A" 24

if [ -n "$MPIRUN" ] && command -v "$MPIRUN" >/dev/null 2>&1; then
    start D "$MPIRUN" -np 2 "$BIN" serve --model "$TINY" --pp 2 --port 0 --threads 1
    expect "--pp 2: every response_format reply is a valid document" "${CLIENT[@]}" "$URL_D" 8
    kill -TERM "$PID_D"
    wait "$JOB_D"
    expect "--pp 2 server: SIGTERM exits 0" test "$?" = 0
else
    echo "skip: no mpirun for the --pp 2 server"
fi

serve_test_end
