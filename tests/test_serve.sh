#!/bin/bash
# rwkvpipe serve end to end (docs/serving.md): real servers on free loopback
# ports, driven with curl and tests/serve_client.py. Greedy completions equal
# `rwkvpipe generate --temperature 0`, streamed or not, alone or 16 at once,
# on one process and on 2 pipeline stages; seeded sampling repeats; stop
# strings, max_tokens, usage; chat format; sessions continue exactly and
# survive save/delete/load; every bad request gets its 4xx; a client gone
# mid-stream frees its slot; a full queue answers 429 (with Retry-After); SIGTERM ends the
# server (and its in-flight stream, as cancelled) with exit status 0.
# Run by `make check` (env: top_srcdir, top_builddir, MPIRUN, PYTHON3, RP_TEST_DATA).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
if ! command -v curl >/dev/null 2>&1; then
    echo "skip: curl is not installed (launch/deps installs it)"
    exit 77
fi
BIN="$top_builddir/rwkvpipe"
CLIENT=("$PYTHON3" "$top_srcdir/tests/serve_client.py")
TINY="$RP_TEST_DATA/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_serve.XXXXXX") || exit 99
SERVE_TEST_SECONDS=420
. "$top_srcdir/tests/serve_test_lib.sh"

# http FILE METHOD URL [DATA]: body to FILE, prints the status code
http() {
    local file=$1 method=$2 url=$3
    shift 3
    curl -s -o "$file" -w '%{http_code}' --max-time 60 -X "$method" "$@" "$url"
}
field() { "$PYTHON3" -c 'import json,sys
v = json.load(open(sys.argv[1]))
for f in sys.argv[2].split(".") if sys.argv[2] else []:
    v = v[int(f)] if isinstance(v, list) else v[f]
print(v if isinstance(v, str) else json.dumps(v))' "$1" "$2"; }

mkdir -p "$T/sessions"
start A "$BIN" serve --model "$TINY" --port 0 --threads 1 --max-prompt-tokens 300 \
    --session-dir "$T/sessions"
A=$URL_A

# ---- basics --------------------------------------------------------------
expect "GET /health is ok" test "$(http "$T/h.json" GET "$A/health")" = 200 -a \
    "$(field "$T/h.json" status)" = ok
code=$(http "$T/m.json" GET "$A/v1/models")
expect "GET /v1/models names the model file, owner and shape" test "$code" = 200 -a \
    "$(field "$T/m.json" data.0.id)" = tiny_L2_C128_V256_s1.weights.safetensors -a \
    "$(field "$T/m.json" data.0.owned_by)" = rwkvpipe -a "$(field "$T/m.json" data.0.n_layer)" = 2 -a \
    "$(field "$T/m.json" data.0.vocab_size)" = 256

# ---- greedy = rwkvpipe generate, streamed or not ----------------------------
P="The quick brown fox"
"$BIN" generate --model "$TINY" --prompt "$P" --temperature 0 --max-tokens 48 --threads 1 -q \
    >"$T/gen.out" 2>"$T/gen.err" || { echo "FAIL: generate"; cat "$T/gen.err"; exit 1; }
code=$(http "$T/c1.json" POST "$A/v1/completions" \
    -d "{\"prompt\": \"$P\", \"max_tokens\": 48, \"temperature\": 0}")
expect "greedy completion is 200" test "$code" = 200
expect "greedy completion = rwkvpipe generate --temperature 0" \
    "${CLIENT[@]}" same "json:$T/c1.json:choices.0.text" "gen:$T/gen.out"
fin=$(field "$T/c1.json" choices.0.finish_reason)
if [ "$fin" = length ]; then
    expect "max_tokens ends with finish_reason length and usage 19 + 48 = 67" test \
        "$(field "$T/c1.json" usage)" = '{"prompt_tokens": 19, "completion_tokens": 48, "total_tokens": 67, "prompt_tokens_details": {"cached_tokens": 0}}'
else
    bad "greedy completion: finish_reason '$fin', expected length (the tiny model never samples 0 here)"
fi
expect "the reply has a timing object" "$PYTHON3" -c 'import json,sys
t = json.load(open(sys.argv[1]))["timing"]
assert set(t) == {"queue_ms", "time_to_first_token_ms", "tokens_per_second"}, t' "$T/c1.json"
curl -s -N --max-time 60 "$A/v1/completions" \
    -d "{\"prompt\": \"$P\", \"max_tokens\": 48, \"temperature\": 0, \"stream\": true}" >"$T/s1.sse"
expect "streamed chunks end with [DONE] and concatenate to the same text" \
    "${CLIENT[@]}" same "sse:$T/s1.sse" "json:$T/c1.json:choices.0.text"
expect "the last chunk has finish_reason length and the usage" "$PYTHON3" -c 'import json,sys
r = json.loads(sys.argv[1])
assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 48, r' \
    "$("${CLIENT[@]}" sse "$T/s1.sse")"

# ---- sampling --------------------------------------------------------------
S='{"prompt": "Once upon a time", "max_tokens": 40, "temperature": 1.0, "top_p": 0.9, "seed": 1234}'
http "$T/r1.json" POST "$A/v1/completions" -d "$S" >/dev/null
http "$T/r2.json" POST "$A/v1/completions" -d "$S" >/dev/null
curl -s -N --max-time 60 "$A/v1/completions" -d "${S%\}}, \"stream\": true}" >"$T/r3.sse"
expect "seeded sampling gives the same text twice" \
    "${CLIENT[@]}" same "json:$T/r1.json:choices.0.text" "json:$T/r2.json:choices.0.text"
expect "seeded sampling streamed gives it too" \
    "${CLIENT[@]}" same "json:$T/r1.json:choices.0.text" "sse:$T/r3.sse"
expect "stop strings (text match and single token), streamed or not" "${CLIENT[@]}" stops "$A"

# ---- chat ------------------------------------------------------------------
"$BIN" generate --model "$TINY" --prompt $'User: hi there\n\nAssistant:' --temperature 0 \
    --max-tokens 32 --stop $'\n\n' --ban-eot --threads 1 -q >"$T/genchat.out" 2>/dev/null
code=$(http "$T/chat.json" POST "$A/v1/chat/completions" -d '{"messages": [{"role": "user",
    "content": "  hi there "}], "max_tokens": 32, "temperature": 0, "presence_penalty": 0,
    "frequency_penalty": 0}')
expect "chat reply = generate on 'User: hi there\\n\\nAssistant:' (stop \\n\\n, token 0 banned)" \
    "${CLIENT[@]}" same "json:$T/chat.json:choices.0.message.content" "genchat:$T/genchat.out"
expect "chat reply is a chat.completion from the assistant" test \
    "$(field "$T/chat.json" object)" = chat.completion -a \
    "$(field "$T/chat.json" choices.0.message.role)" = assistant
curl -s -N --max-time 60 "$A/v1/chat/completions" -d '{"messages": [{"role": "user",
    "content": "hi there"}], "max_tokens": 32, "temperature": 0, "presence_penalty": 0,
    "frequency_penalty": 0, "stream": true}' >"$T/chat.sse"
expect "streamed chat deltas concatenate to the same reply" \
    "${CLIENT[@]}" same "sse:$T/chat.sse" "json:$T/chat.json:choices.0.message.content"

# ---- concurrency, sessions -----------------------------------------------------
expect "16 concurrent greedy requests each give their text alone" "${CLIENT[@]}" concurrent "$A" 16
expect "sessions: turns = whole history; save/delete/load; initial_state" \
    "${CLIENT[@]}" sessions "$A"
expect "session files are written under --session-dir" test -s "$T/sessions/conv-turn1.state"

# ---- errors ------------------------------------------------------------------
# expect_status CODE DESCRIPTION CURL-ARGS...: status and a JSON error object
expect_status() {
    local want=$1 what=$2
    shift 2
    local code
    code=$(http "$T/err.json" "$@")
    if [ "$code" = "$want" ] && "$PYTHON3" -c 'import json,sys
e = json.load(open(sys.argv[1]))["error"]
assert e["message"] and e["type"] and e["code"]' "$T/err.json" 2>/dev/null; then
        ok "$what: $want"
    else
        bad "$what: got $code, expected $want"
        head -c 300 "$T/err.json" | sed 's/^/    /'
        echo
    fi
}
C="$A/v1/completions"
expect_status 400 "invalid JSON" POST "$C" -d '{"prompt": "x",'
expect_status 400 "a body that is not an object" POST "$C" -d '[1, 2]'
expect_status 400 "a field of the wrong type" POST "$C" -d '{"prompt": "x", "temperature": "hot"}'
expect_status 400 "max_tokens not an integer" POST "$C" -d '{"prompt": "x", "max_tokens": 1.5}'
expect_status 400 "stop not a string" POST "$C" -d '{"prompt": "x", "stop": [1]}'
expect_status 400 "a token id outside the vocabulary" POST "$C" -d '{"prompt": "x", "ban_token_ids": [256]}'
expect_status 400 "no prompt" POST "$C" -d '{"max_tokens": 3}'
expect_status 400 "an empty prompt" POST "$C" -d '{"prompt": ""}'
expect_status 400 "a chat message with an unknown role" POST "$A/v1/chat/completions" \
    -d '{"messages": [{"role": "wizard", "content": "x"}]}'
expect_status 400 "chat without messages" POST "$A/v1/chat/completions" -d '{"messages": []}'
# Fields this server does not implement: a 400 naming the field, never a
# silent 200; the developer role; GET /v1/models/{id} (one client process: cheap).
expect "unimplemented fields and the tool role: 400 unsupported_field naming them; developer = system; GET /v1/models/{id}" \
    "${CLIENT[@]}" unsupported "$A" tiny_L2_C128_V256_s1.weights.safetensors
expect_status 404 "GET /v1/models/{another id}" GET "$A/v1/models/gpt-4"
expect "the tokenizer endpoints (byte tokenizer)" "${CLIENT[@]}" remote-tokenizer "$A"
expect_status 400 "max_tokens above --max-tokens-limit" POST "$C" -d '{"prompt": "x", "max_tokens": 5000}'
"$PYTHON3" -c 'import json; print(json.dumps({"prompt": "y" * 301}))' >"$T/long.json"
expect_status 400 "more prompt tokens than --max-prompt-tokens" POST "$C" --data-binary "@$T/long.json"
# One length check (src/serve/http_request.c) for every kind of prompt: text,
# token ids and chat messages get the same 400 object, naming the count.
"$PYTHON3" -c 'import json; print(json.dumps({"prompt": [121] * 301}))' >"$T/long_ids.json"
"$PYTHON3" -c 'import json
print(json.dumps({"messages": [{"role": "user", "content": "y" * 290}]}))' >"$T/long_chat.json"
long_codes="$(http "$T/long_text.err" POST "$C" --data-binary "@$T/long.json")"
long_codes="$long_codes $(http "$T/long_ids.err" POST "$C" --data-binary "@$T/long_ids.json")"
long_codes="$long_codes $(http "$T/long_chat.err" POST "$A/v1/chat/completions" \
    --data-binary "@$T/long_chat.json")"
expect "an over-long prompt gets the same 400 context_length_exceeded via completions (text, ids) and chat" \
    "$PYTHON3" -c 'import json, re, sys
codes, files = sys.argv[1].split(), sys.argv[2:]
assert codes == ["400"] * 3, codes
counts = []
for f in files:
    body = json.load(open(f))
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message", "type"], body
    e = body["error"]
    assert e["type"] == "invalid_request_error" and e["code"] == "context_length_exceeded", (f, e)
    m = re.fullmatch(r"the prompt has (\d+) tokens: this server allows at most 300", e["message"])
    assert m, (f, e["message"])
    counts.append(int(m.group(1)))
# text and ids: 301 bytes = 301 tokens; chat: 290 bytes and the chat format around them
assert counts[0] == 301 and counts[1] == 301 and counts[2] > 300, counts' "$long_codes" \
    "$T/long_text.err" "$T/long_ids.err" "$T/long_chat.err"
head -c 1100000 /dev/zero | tr '\0' ' ' >"$T/huge.json"
expect_status 413 "a body over 1 MiB" POST "$C" -H 'Content-Type: application/json' \
    --data-binary "@$T/huge.json"
expect_status 404 "an unknown path" GET "$A/v1/nothing"
expect_status 404 "an unknown model" POST "$C" -d '{"prompt": "x", "model": "gpt-4"}'
expect_status 404 "an unknown session (delete)" DELETE "$A/v1/sessions/nobody"
expect_status 404 "an unknown session (save)" POST "$A/v1/sessions/nobody/save" -d '{"path": "f"}'
expect_status 400 "a bad session name" POST "$C" -d '{"prompt": "x", "session": "../etc"}'
expect_status 405 "a wrong method" GET "$C"
expect "300 mutated requests are all answered below 500" "${CLIENT[@]}" fuzz "$A" 300
code=$(http "$T/ok.json" POST "$C" -d '{"prompt": "x", "max_tokens": 2, "model": "tiny_L2_C128_V256_s1.weights.safetensors", "unknown_field": {"a": 1}}')
expect "the served model's name is accepted, unknown fields are ignored" test "$code" = 200
expect "the server still answers after all that" test "$(http "$T/h.json" GET "$A/health")" = 200

# ---- metrics -------------------------------------------------------------------
http "$T/metrics.txt" GET "$A/metrics" >/dev/null
missing=""
for m in rwkvpipe_requests_total rwkvpipe_requests_active rwkvpipe_requests_queued \
    rwkvpipe_tokens_generated_total rwkvpipe_tokens_prefilled_total rwkvpipe_tokens_per_second \
    rwkvpipe_slots_total rwkvpipe_slots_active 'rwkvpipe_stage_busy_ratio{stage="0"}' \
    rwkvpipe_sessions_stored rwkvpipe_http_responses_total; do
    grep -q "^$m" "$T/metrics.txt" || missing="$missing $m"
done
expect "GET /metrics has every metric${missing:+ (missing:$missing)}" test -z "$missing"
expect "metrics count the generated tokens" test "$(awk '/^rwkvpipe_tokens_generated_total/ {print ($2 > 100)}' "$T/metrics.txt")" = 1

# ---- limits, disconnects, authentication, SIGTERM (server B) -----------------------
start B "$BIN" serve --model "$TINY" --port 0 --threads 1 --slots 1 --max-queue 1 \
    --max-tokens-limit 1000000000 --api-key s3cret
B=$URL_B
expect_status 401 "no API key" GET "$B/v1/models"
expect_status 401 "a wrong API key" GET "$B/v1/models" -H 'Authorization: Bearer nope'
code=$(http "$T/k.json" GET "$B/v1/models" -H 'Authorization: Bearer s3cret')
expect "the right API key" test "$code" = 200
expect "/health needs no key" test "$(http "$T/h.json" GET "$B/health")" = 200
expect "clients gone mid-stream free their slots (metrics back to 0)" \
    env RP_API_KEY=s3cret "${CLIENT[@]}" disconnect "$B"
expect "a full queue answers 429" env RP_API_KEY=s3cret "${CLIENT[@]}" busy "$B"
curl -s -N --max-time 60 -H 'Authorization: Bearer s3cret' "$B/v1/completions" \
    -d '{"prompt": "stream until stopped", "max_tokens": 1000000000, "ban_token_ids": [0],
        "stream": true}' >"$T/term.sse" &
CURL=$!
for _ in $(seq 1 100); do [ -s "$T/term.sse" ] && break; sleep 0.05; done
kill -TERM "$PID_B"
wait "$JOB_B"
rc=$?
wait "$CURL"
expect "SIGTERM: the server exits with status 0" test "$rc" = 0
expect "SIGTERM: the stream in flight ends as cancelled with [DONE]" "$PYTHON3" -c 'import json,sys
r = json.loads(sys.argv[1])
assert r["finish_reason"] == "cancelled", r' "$("${CLIENT[@]}" sse "$T/term.sse" 2>&1)"

# ---- pipeline: one process and --pp 2 give the same text -----------------------------
if [ -n "$MPIRUN" ] && command -v "$MPIRUN" >/dev/null 2>&1; then
    "$BIN" init --model-config L4-C64-V256 --seed 3 -o "$T/l4.st" >/dev/null 2>&1 ||
        { echo "FAIL: init"; exit 1; }
    # C reads one prompt per prefill unit, D up to a decode group's (the
    # default): the same texts, and concurrent requests equal to alone on both
    start C "$MPIRUN" -np 1 "$BIN" serve --model "$T/l4.st" --port 0 --threads 1 \
        --prefill-prompts 1
    start D "$MPIRUN" -np 2 "$BIN" serve --model "$T/l4.st" --pp 2 --port 0 --threads 1 \
        --session-dir "$T/sessions"
    expect "mpirun -np 1 and -np 2 --pp 2 servers give the same greedy texts" \
        "${CLIENT[@]}" same-server "$URL_C" "$URL_D"
    expect "the --pp 2 server: 8 concurrent requests each equal to alone" \
        "${CLIENT[@]}" concurrent "$URL_D" 8
    expect "the --prefill-prompts 1 server: 8 concurrent requests each equal to alone" \
        "${CLIENT[@]}" concurrent "$URL_C" 8
    http "$T/pm.txt" GET "$URL_D/metrics" >/dev/null
    expect "the --pp 2 server reports 2 stages" grep -q '^rwkvpipe_stage_busy_ratio{stage="1"}' "$T/pm.txt"
    expect "the --pp 2 server: sessions continue exactly across stages" "${CLIENT[@]}" sessions "$URL_D"
    for s in C D; do
        pid=PID_$s job=JOB_$s
        kill -TERM "${!pid}"
        wait "${!job}"
        rc=$?
        expect "SIGTERM to rank 0 of the mpirun $s server: exit 0" test "$rc" = 0
    done
else
    echo "skip: no mpirun for the --pp 2 server"
fi

# Admission by state memory: 1 MiB holds 15 states of the tiny model (2 layers
# x (2 x 128 + 2 x 64 x 64) floats = 67.6 KB each), so 16 slots become 15.
# --max-queue 0 refuses only requests that find no free slot.
start E "$BIN" serve --model "$TINY" --vocab bytes --port 0 --state-budget-mb 1 --max-queue 0
expect "--state-budget-mb 1 limits the tiny model to 15 slots" \
    grep -q "holds 15 generations' state .*: 15 slots instead of 16" "$T/E.log"
http "$T/e.json" GET "$URL_E/health" >/dev/null
expect "/health reports 15 slots" test "$(field "$T/e.json" slots_total)" = 15
expect "--max-queue 0: 8 concurrent requests with 15 free slots all run" \
    "${CLIENT[@]}" concurrent "$URL_E" 8
kill -TERM "$PID_E"
wait "$JOB_E"

serve_test_end
