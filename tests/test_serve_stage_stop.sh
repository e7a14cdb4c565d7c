#!/bin/bash
# rwkvpipe serve --pp 2: a stage that stops (SIGSTOP) while a session is
# saved or loaded ends the job, it does not hang it. The session state moves
# between stages through the engine's transfers, under --comm-timeout: the
# client gets an error reply (503 engine_failed) naming the stage, and every
# rank exits non-zero within the timeout plus a margin; a stream open at the
# stop gets that error as its last event. Run by `make check`
# (env: top_srcdir, top_builddir, MPIRUN, RP_TEST_DATA); skipped without mpirun.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun"
    exit 77
fi
if ! command -v curl >/dev/null 2>&1; then
    echo "skip: curl is not installed (launch/deps installs it)"
    exit 77
fi
BIN="$(cd "$top_builddir" && pwd)/rwkvpipe"
TINY="$RP_TEST_DATA/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_serve_stage_stop.XXXXXX") || exit 99
STOPPED=
# a stopped stage is resumed first, so that TERM and KILL can end it
serve_test_extra_cleanup() { [ -n "$STOPPED" ] && kill -CONT "$STOPPED" 2>/dev/null; }
SERVE_TEST_SECONDS=170
. "$top_srcdir/tests/serve_test_lib.sh"

TIMEOUT=3

# scenario NAME OPERATION: a server on 2 stages with session s1 stored (and
# saved as s1.state); stage 1 is stopped, then OPERATION (save|load) runs.
scenario() {
    local name=$1 op=$2
    serve_start "$name" "$MPIRUN" -np 2 "$BIN" serve --model "$TINY" --pp 2 --port 0 --threads 1 \
        --comm-timeout "$TIMEOUT" --session-dir "$T/sessions" || {
        bad "$name: the server did not start"
        sed 's/^/    /' "$T/$name.log" | tail -n 20
        return
    }
    local url_var="URL_$name" job_var="JOB_$name"
    local url=${!url_var} job=${!job_var}
    curl -s -o /dev/null --max-time 30 "$url/v1/completions" \
        -d '{"prompt": "hello", "max_tokens": 3, "temperature": 0, "session": "s1"}'
    local code
    code=$(curl -s -o "$T/$name.pre" -w '%{http_code}' --max-time 30 "$url/v1/sessions/s1/save" \
        -d '{"path": "s1.state"}')
    expect "$name: session s1 saved before the stop ($code)" test "$code" = 200
    # rank 1 = stage 1: the rank of the job whose environment says so
    local stage1
    stage1=$(own_rank_pids 1 | head -n 1)
    if [ -z "$stage1" ]; then
        bad "$name: stage 1's process not found"
        return
    fi
    kill -STOP "$stage1"
    STOPPED=$stage1
    local t0=$SECONDS
    if [ "$op" = save ]; then
        code=$(curl -s -o "$T/$name.json" -w '%{http_code}' --max-time 60 \
            "$url/v1/sessions/s1/save" -d '{"path": "again.state"}')
    else
        code=$(curl -s -o "$T/$name.json" -w '%{http_code}' --max-time 60 \
            "$url/v1/sessions/s2/load" -d '{"path": "s1.state"}')
    fi
    expect "$name: the client gets 503 engine_failed ($code, $(head -c 300 "$T/$name.json"))" \
        test "$code" = 503 -a -n "$(grep -o engine_failed "$T/$name.json")"
    expect "$name: the reply names stage 1" grep -q "stage 1" "$T/$name.json"
    # every rank exits (mpirun ends the stopped one when rank 0 aborts)
    local waited=0
    while kill -0 "$job" 2>/dev/null && [ "$waited" -lt 300 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    local took=$((SECONDS - t0))
    local alive=no
    kill -0 "$job" 2>/dev/null && alive=yes
    expect "$name: mpirun and every rank exited within --comm-timeout + 30 s ($took s)" \
        test "$alive" = no -a "$took" -le $((TIMEOUT + 30))
    wait "$job"
    local rc=$?
    expect "$name: the job's exit status is non-zero ($rc)" test "$rc" -ne 0
    expect "$name: rank 0's message names the stage and the timeout" \
        grep -q "waited $TIMEOUT s.*stage 1" "$T/$name.log"
    kill -CONT "$stage1" 2>/dev/null
    STOPPED=
}

scenario SAVE save
scenario LOAD load

# A stream open when stage 1 stops: its last event is the engine_failed error
# naming stage 1 (before the fix: finish_reason "cancelled" and [DONE], as if
# the server had been stopped on request).
serve_start STREAM "$MPIRUN" -np 2 "$BIN" serve --model "$TINY" --pp 2 --port 0 --threads 1 \
    --comm-timeout "$TIMEOUT" --max-tokens-limit 1000000000 --session-dir "$T/sessions" || {
    bad "STREAM: the server did not start"
    sed 's/^/    /' "$T/STREAM.log" | tail -n 20
}
if [ -n "${URL_STREAM:-}" ]; then
    curl -s -N --max-time 60 "$URL_STREAM/v1/completions" -d '{"prompt": "stream until stopped",
        "max_tokens": 1000000000, "ban_token_ids": [0], "temperature": 0, "stream": true}' \
        >"$T/stream.sse" 2>&1 &
    reader=$!
    for _ in $(seq 1 300); do [ "$(grep -c '^data:' "$T/stream.sse")" -ge 5 ] && break; sleep 0.1; done
    stage1=$(own_rank_pids 1 | head -n 1)
    if [ -n "$stage1" ]; then
        kill -STOP "$stage1"
        STOPPED=$stage1
    fi
    wait "$reader"
    expect "STREAM: the stream's last event is engine_failed naming stage 1 ($(tail -c 200 "$T/stream.sse" | tr '\n' ' '))" \
        grep -q '"engine_failed".*stage 1\|stage 1.*"engine_failed"' "$T/stream.sse"
    expect "STREAM: no finish_reason cancelled" test -z "$(grep -o '"finish_reason":"cancelled"' "$T/stream.sse")"
    wait "$JOB_STREAM"
    expect "STREAM: the job's exit status is non-zero" test $? -ne 0
    [ -n "$stage1" ] && kill -CONT "$stage1" 2>/dev/null
    STOPPED=
fi

serve_test_end
