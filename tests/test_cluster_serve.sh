#!/bin/bash
# Serving and checkpoints across nodes, on the cluster of network namespaces
# (tests/cluster/cluster.sh; docs/cluster.md): `serve --pp 2` with a stage
# per node answers as one process; a session saved across nodes loads into
# one process and continues the same (and back); a stage node killed or its
# link cut while a stream is open ends the stream, /health and the job within
# 60 s (the link case with an engine_failed event naming stage 1); a node
# killed during a checkpoint save leaves the previous checkpoint valid.
# Needs root and namespaces (else
# exit 77). Run by launch/check after tests/test_cluster.sh (env as it; KEEP=1
# keeps the scratch directory; under build/asan set ASAN_OPTIONS=detect_leaks=0
# as make check does).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
. "$top_srcdir/tests/cluster/test_lib.sh"
cluster_test_require curl
TINY="$top_srcdir/tests/data/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_cluster_serve.XXXXXX") || exit 99
chmod 755 "$T"
PIDS=()
export RP_CLUSTER_OWNER=$$
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    "$C" stop
    [ -n "${KEEP:-}" ] && echo "kept $T" || rm -rf "$T"
}
trap cleanup EXIT

. "$top_srcdir/tests/check_report.sh"
. "$top_srcdir/tests/serve_start.sh"

# node1_curl ARGS...: curl from inside rpnode1, where the server listens.
node1_curl() { "$C" exec 1 curl -s "$@"; }

# text_of FILE: the first choice's text of a completion reply.
text_of() {
    "$PYTHON3" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["choices"][0]["text"]))' "$1"
}

# ended_within S PID: PID is gone within S seconds (sets took).
ended_within() {
    local i start
    start=$(date +%s)
    for ((i = 0; i < $1 * 10; i++)); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
    took=$(($(date +%s) - start))
    ! kill -0 "$2" 2>/dev/null
}

check "serve --pp 2, a stage on each of 2 nodes: greedy completions = one process"
start_cluster 2
fast_tcp_failure 2
mkdir -p "$T/sessions"
chmod 700 "$T/sessions"
serve_start CL mpi_cmd 2 "$BIN" serve --model "$TINY" --pp 2 --port 0 --threads 1 \
    --comm-timeout 20 --max-tokens-limit 1000000000 --session-dir "$T/sessions" ||
    { cp "$T/CL.log" "$T/stderr"; fail "serve --pp 2 across 2 nodes did not start"; }
grep -q "rank 1/2 on rpnode2 .*stage 1" "$T/CL.log" ||
    { cp "$T/CL.log" "$T/stderr"; fail "no start-up line of stage 1 on rpnode2"; }
serve_start ONE "$BIN" serve --model "$TINY" --port 0 --threads 1 --session-dir "$T/sessions" ||
    { cp "$T/ONE.log" "$T/stderr"; fail "one-process serve did not start"; }
for P in "The quick brown fox" "hello"; do
    body="{\"prompt\": \"$P\", \"max_tokens\": 48, \"temperature\": 0}"
    code=$(node1_curl -o "$T/cl.json" -w '%{http_code}' --max-time 60 "$URL_CL/v1/completions" -d "$body")
    [ "$code" = 200 ] || fail "2 nodes: completion status $code: $(head -c 300 "$T/cl.json")"
    code=$(curl -s -o "$T/one.json" -w '%{http_code}' --max-time 60 "$URL_ONE/v1/completions" -d "$body")
    [ "$code" = 200 ] || fail "one process: completion status $code"
    [ "$(text_of "$T/cl.json")" = "$(text_of "$T/one.json")" ] ||
        fail "'$P': 2 nodes $(text_of "$T/cl.json") != one process $(text_of "$T/one.json")"
    "$PYTHON3" -c 'import json,sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
assert a["usage"] == b["usage"] and a["usage"]["completion_tokens"] == 48, (a["usage"], b["usage"])' \
        "$T/cl.json" "$T/one.json" || fail "'$P': token counts differ"
done
ok "2 prompts x 48 tokens: same text and token counts"

check "a session saved on 2 nodes (--pp 2) loads into one process and continues the same"
turn() {  # URL SESSION PROMPT OUT [curl-prefix]
    local fn=${5:-curl}
    local code
    [ "$fn" = curl ] && fn="curl -s"
    code=$($fn -o "$4" -w '%{http_code}' --max-time 60 "$1/v1/completions" \
        -d "{\"prompt\": \"$3\", \"max_tokens\": 24, \"temperature\": 0, \"session\": \"$2\"}")
    [ "$code" = 200 ] || fail "turn on $1 session $2: status $code: $(head -c 300 "$4")"
}
turn "$URL_CL" s1 "Once upon a time" "$T/t1.json" node1_curl
code=$(node1_curl -o "$T/save.json" -w '%{http_code}' --max-time 60 "$URL_CL/v1/sessions/s1/save" \
    -d '{"path": "s1.state"}')
[ "$code" = 200 ] || fail "save across nodes: status $code: $(head -c 300 "$T/save.json")"
turn "$URL_CL" s1 " there lived" "$T/t2_cl.json" node1_curl
code=$(curl -s -o "$T/load.json" -w '%{http_code}' --max-time 60 "$URL_ONE/v1/sessions/s2/load" \
    -d '{"path": "s1.state"}')
[ "$code" = 200 ] || fail "load into one process: status $code: $(head -c 300 "$T/load.json")"
turn "$URL_ONE" s2 " there lived" "$T/t2_one.json"
[ "$(text_of "$T/t2_cl.json")" = "$(text_of "$T/t2_one.json")" ] ||
    fail "continuation: 2 nodes $(text_of "$T/t2_cl.json") != one process $(text_of "$T/t2_one.json")"
# and back: saved by one process, loaded across the nodes
code=$(curl -s -o "$T/save1.json" -w '%{http_code}' --max-time 60 "$URL_ONE/v1/sessions/s2/save" \
    -d '{"path": "s2.state"}')
[ "$code" = 200 ] || fail "save in one process: status $code"
code=$(node1_curl -o "$T/load2.json" -w '%{http_code}' --max-time 60 "$URL_CL/v1/sessions/s3/load" \
    -d '{"path": "s2.state"}')
[ "$code" = 200 ] || fail "load across nodes: status $code: $(head -c 300 "$T/load2.json")"
turn "$URL_ONE" s2 " a dragon" "$T/t3_one.json"
turn "$URL_CL" s3 " a dragon" "$T/t3_cl.json" node1_curl
[ "$(text_of "$T/t3_cl.json")" = "$(text_of "$T/t3_one.json")" ] ||
    fail "continuation: 2 nodes $(text_of "$T/t3_cl.json") != one process $(text_of "$T/t3_one.json")"
ok "both ways: $(text_of "$T/t2_one.json")"

# stream_fault NAME FAULT...: opens a stream on server NAME from rpnode1, runs
# FAULT once 5 chunks came; the stream must end (not hang), /health answer
# 503 or refuse, the job exit non-zero, all within 60 s. Sets stream_took,
# health, rc, took_all.
stream_fault() {
    local name=$1 url_var="URL_$1" job_var="JOB_$1" t0 i
    shift
    local url=${!url_var} job=${!job_var}
    node1_curl -N --max-time 120 "$url/v1/completions" -d '{"prompt": "stream until stopped",
        "max_tokens": 1000000000, "ban_token_ids": [0], "temperature": 0, "stream": true}' \
        >"$T/$name.sse" 2>&1 &
    local curl=$!
    PIDS+=("$curl")
    for ((i = 0; i < 300; i++)); do [ "$(grep -c '^data:' "$T/$name.sse")" -ge 5 ] && break; sleep 0.1; done
    [ "$(grep -c "^data:" "$T/$name.sse")" -ge 5 ] ||
        fail "$name: the stream gave no 5 chunks within 30 s: $(head -c 300 "$T/$name.sse")"
    "$@"
    t0=$(date +%s)
    ended_within 60 "$curl" || fail "$name: the stream is still open 60 s after the fault"
    stream_took=$took
    if grep -q '\[DONE\]' "$T/$name.sse" && ! grep -q '"error"' "$T/$name.sse"; then
        fail "$name: the stream ended with [DONE] and no error, as if the completion had finished"
    fi
    health=$(node1_curl -o /dev/null -w '%{http_code}' --max-time 10 "$url/health")
    [ "$health" = 503 ] || [ "$health" = 000 ] || fail "$name: /health answers $health after the fault"
    ended_within $((60 - ($(date +%s) - t0))) "$job" ||
        { cp "$T/$name.log" "$T/stderr"; fail "$name: serve still runs 60 s after the fault"; }
    wait "$job"
    rc=$?
    took_all=$(($(date +%s) - t0))
    [ "$rc" -ne 0 ] || { cp "$T/$name.log" "$T/stderr"; fail "$name: the job exited 0 after the fault"; }
}

check "rpnode2 SIGKILLed while a stream is open: the stream closes, /health refuses, mpirun ends every rank non-zero within 60 s naming the failure"
stream_fault CL "$C" kill 2 KILL
# mpirun sees rpnode2's daemon die and kills rank 0 within seconds, before
# any engine timeout: the message is Open MPI's (which one is a race).
grep -q "unable to reliably start one or more daemons\|lost communication with a remote daemon\|Peer host: *rpnode2\|rpnode2.*exited on signal" "$T/CL.log" ||
    { cp "$T/CL.log" "$T/stderr"; fail "no message from Open MPI reports the lost daemon or peer"; }
ok "stream closed after ${stream_took} s ($(tail -c 120 "$T/CL.sse" | tr '\n' ' ')), /health $health, exit status $rc after $took_all s"

check "rpnode2's link down while a stream is open: the engine's watchdog (--comm-timeout 5) names stage 1, the stream gets an engine_failed error event, /health 503 or closed, every rank exits within 60 s"
serve_start LNK mpi_cmd 2 "$BIN" serve --model "$TINY" --pp 2 --port 0 --threads 1 \
    --comm-timeout 5 --max-tokens-limit 1000000000 --session-dir "$T/sessions" ||
    { cp "$T/LNK.log" "$T/stderr"; fail "serve --pp 2 across 2 nodes did not start (again)"; }
stream_fault LNK "$C" link 2 down
"$C" link 2 up
grep -q '"engine_failed".*stage 1\|stage 1.*"engine_failed"' "$T/LNK.sse" ||
    fail "the stream got no engine_failed event naming stage 1: $(tail -c 300 "$T/LNK.sse")"
grep -q "rank 0/2, stage 0\]: error: .*waited 5 s (--comm-timeout).*stage 1" "$T/LNK.log" ||
    { cp "$T/LNK.log" "$T/stderr"; fail "rank 0 does not name stage 1 and the timeout"; }
ok "stream ended after ${stream_took} s ($(tail -c 160 "$T/LNK.sse" | tr '\n' ' ')), /health $health, exit status $rc after $took_all s"
grep "error" "$T/LNK.log" | head -n 3 | sed 's/^/    /'
kill -TERM "$PID_ONE" 2>/dev/null
wait "$JOB_ONE" 2>/dev/null

check "rpnode2 SIGKILLed while stage 1 writes its checkpoint shard: the previous checkpoint verifies and resumes on rpnode1"
# Wide layers (C 1024: ~150 MB of weights and Adam moments per stage) so that
# a save lasts long enough to be caught in the middle of stage 1's shard.
CK=(train --model-config L2-C1024-V64 --data mqar --ctx-len 16 --batch 8 --warmup 2 --lr 3e-3
    --eval-interval 0 --eval-batches 1 --log-interval 1 --loss-on all --seed 3 --init-seed 5
    --threads 1 --micro-batch 4)
start_cluster 2
fast_tcp_failure 2
(mpi_cmd 2 "$BIN" "${CK[@]}" --pp 2 --steps 1000000 --comm-timeout 20 --checkpoint-interval 2 \
    --checkpoint-dir "$T/ck" >"$T/ck.out" 2>"$T/ck.err"; echo $? >"$T/ck.rc") &
JOB=$!
PIDS+=("$JOB")
for ((i = 0; i < 1800; i++)); do [ -e "$T/ck/latest" ] && break; sleep 0.1; done
[ -e "$T/ck/latest" ] || { cp "$T/ck.err" "$T/stderr"; fail "no checkpoint within 180 s"; }
first=$(cat "$T/ck/latest")
# the next save, caught while stage 1's shard is a temporary file
caught=
for ((i = 0; i < 6000; i++)); do
    for f in "$T"/ck/step-*/.*00001-of-00002*.tmp-*; do
        [ -e "$f" ] || continue
        [ "$(basename "$(dirname "$f")")" = "$(cat "$T/ck/latest")" ] && continue
        caught=$f
        break 2
    done
    sleep 0.02
done
[ -n "$caught" ] || { cp "$T/ck.err" "$T/stderr"; fail "no save of stage 1 caught within 120 s"; }
"$C" kill 2 KILL
ended_within 60 "$JOB" || { cp "$T/ck.err" "$T/stderr"; fail "the job still runs 60 s after the node died"; }
rc=$(cat "$T/ck.rc")
[ "$rc" -ne 0 ] || fail "the job exited 0 after the node died"
cut=$(basename "$(dirname "$caught")")
last=$(cat "$T/ck/latest")
[ "$last" != "$cut" ] || fail "latest names $cut, the save that was interrupted"
[ ! -e "$T/ck/$cut/manifest.pb" ] || fail "the interrupted $cut has a manifest"
"$BIN" info "$T/ck" --verify >"$T/stdout" 2>"$T/stderr" || fail "the previous checkpoint $last does not verify"
"$BIN" info "$T/ck/$cut" --verify >"$T/stdout" 2>"$T/stderr" &&
    fail "the interrupted $cut verifies as a checkpoint"
grep -q "incomplete checkpoint\|manifest" "$T/stderr" || fail "info on $cut does not say it is incomplete"
step=$(sed -n 's/^step-0*//p' "$T/ck/latest")
"$C" exec 1 "$BIN" "${CK[@]}" --steps $((step + 1)) --resume "$T/ck" \
    >"$T/stdout" 2>"$T/stderr" || fail "resume on rpnode1 alone"
grep -q "resumed from .* at step $step " "$T/stderr" || fail "the run did not resume from step $step"
ok "killed in $cut (exit status $rc after $took s); $last verifies and resumes (first checkpoint $first)"

echo "all cluster serve checks passed"
