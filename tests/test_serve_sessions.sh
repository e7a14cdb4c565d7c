#!/bin/bash
# rwkvpipe serve: session files and request paths are safe on a network
# (docs/serving.md, "Sessions"). Session files live in their own directory
# (default ./sessions, made 0700 at the first save) under names NAME.state;
# a save never replaces the model, a file that is not a session file, a
# symbolic link, a hidden file or anything in a subdirectory (unless
# --session-overwrite, and then only regular files); a load error names the
# problem without quoting the file; a FIFO under a session name is refused
# at once and never stalls the server; a path encoding a control character
# (%00, %0d%0a) is refused before routing; -v log lines escape what the
# client sent; --max-session-files bounds how many files clients can create. Run by `make check` (env: top_srcdir, top_builddir, PYTHON3,
# RP_TEST_DATA; KEEP=1 keeps the scratch directory).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
if ! command -v curl >/dev/null 2>&1; then
    echo "skip: curl is not installed (launch/deps installs it)"
    exit 77
fi
# absolute: server A runs in its own working directory
BIN="$(cd "$top_builddir" && pwd)/rwkvpipe"
TINY="$(cd "$RP_TEST_DATA" && pwd)/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_serve_sessions.XXXXXX") || exit 99
SERVE_TEST_SECONDS=170
. "$top_srcdir/tests/serve_test_lib.sh"

# http FILE METHOD URL [CURL-ARGS]: body to FILE, prints the status code
http() {
    local file=$1 method=$2 url=$3
    shift 3
    curl -s -o "$file" -w '%{http_code}' --max-time 20 -X "$method" "$@" "$url"
}
sum() { sha256sum "$1" 2>/dev/null | cut -c1-64; }
# raw METHOD TARGET [BODY]: one request with the target sent byte for byte
# (curl would normalise it); prints the status code
raw() {
    "$PYTHON3" - "$HOSTPORT" "$@" <<'EOF'
import os, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
method, target = sys.argv[2], os.fsencode(sys.argv[3])
body = sys.argv[4].encode() if len(sys.argv) > 4 else b""
s = socket.create_connection((host, int(port)), timeout=20)
s.sendall(method.encode() + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
          + b"Content-Length: %d\r\n\r\n" % len(body) + body)
reply = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    reply += b
print(reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "none")
EOF
}

# ---- server A: default session directory, in its own working directory ----
RUN="$T/run"
mkdir -p "$RUN"
cp "$TINY" "$RUN/tiny.safetensors"
MODEL_SUM=$(sum "$RUN/tiny.safetensors")
start A bash -c 'cd "$1" && shift && exec "$@"' _ "$RUN" "$BIN" serve --model tiny.safetensors \
    --port 0 --threads 1 -v
A=$URL_A
HOSTPORT=${A#http://}
S="$RUN/sessions"

expect "no session directory before the first save" test ! -e "$S"
code=$(http "$T/t.json" POST "$A/v1/completions" -d '{"prompt": "hello", "max_tokens": 4,
    "temperature": 0, "session": "s1"}')
expect "a turn stores session s1" test "$code" = 200
code=$(http "$T/s.json" POST "$A/v1/sessions/s1/save" -d '{"path": "first.state"}')
expect "save first.state: 200" test "$code" = 200
expect "the default directory is ./sessions, created at the first save" test -s "$S/first.state"
expect "the session directory is private (0700)" test "$(stat -c %a "$S")" = 700
code=$(http "$T/s.json" POST "$A/v1/sessions/s1/save" -d '{"path": "first.state"}')
expect "a save may replace a session file" test "$code" = 200
code=$(http "$T/l.json" POST "$A/v1/sessions/back/load" -d '{"path": "first.state"}')
expect "and it loads back" test "$code" = 200

# refused: the target must stay as it was
printf 'secret-text-file: not a session\n' >"$S/victim.state"
cp "$TINY" "$S/model.state"
ln -s ../tiny.safetensors "$S/link.state"
printf 'hidden\n' >"$S/.hidden.state"
mkdir -p "$S/sub"
printf 'in a subdirectory\n' >"$S/sub/x.state"
mkfifo "$S/fifo.state"
mkdir "$S/dir.state"
refused_save() {  # DESCRIPTION PATH-IN-JSON FILE-TO-WATCH
    local before after code
    before=$(sum "$3")
    code=$(http "$T/r.json" POST "$A/v1/sessions/s1/save" -d "{\"path\": \"$2\"}")
    after=$(sum "$3")
    if [ "${code:0:1}" = 4 ] && [ "$before" = "$after" ] && [ -n "$after" ]; then
        ok "save onto $1 is refused ($code) and the file is unchanged"
    else
        bad "save onto $1: status $code, sha256 $before -> $after"
        head -c 300 "$T/r.json" | sed 's/^/    /'
        echo
    fi
}
refused_save "the served model (by its name)" tiny.safetensors "$RUN/tiny.safetensors"
refused_save "the served model (../)" ../tiny.safetensors "$RUN/tiny.safetensors"
refused_save "a file that is not a session file" victim.state "$S/victim.state"
refused_save "a safetensors file that is not a session file" model.state "$S/model.state"
refused_save "a symbolic link (to the model)" link.state "$RUN/tiny.safetensors"
expect "the link is still a link" test -L "$S/link.state"
refused_save "a hidden file" .hidden.state "$S/.hidden.state"
refused_save "a file in a subdirectory" sub/x.state "$S/sub/x.state"
code=$(http "$T/r.json" POST "$A/v1/sessions/s1/save" -d '{"path": "dir.state"}')
expect "save onto a directory is refused ($code)" test "${code:0:1}" = 4 -a -d "$S/dir.state"
expect "the served model is unchanged" test "$(sum "$RUN/tiny.safetensors")" = "$MODEL_SUM"
leftovers=$(find "$S" -name '.*tmp*' | wc -l)
expect "no temporary files are left behind" test "$leftovers" = 0

# ---- load errors name the problem, never the file's bytes ---------------------
# the first 8 bytes read as the header length: "secret-t" little-endian
NUMBER=$("$PYTHON3" -c 'import struct; print(struct.unpack("<Q", b"secret-t")[0])')
printf 'secret-text-file: not a session\n' >"$S/notes.state"
code=$(http "$T/v.json" POST "$A/v1/sessions/v/load" -d '{"path": "notes.state"}')
expect "load of a text file: 400 'not a session file'" test "$code" = 400 -a \
    -n "$(grep -o 'not a session file' "$T/v.json")"
expect "the reply has no number read from the file" test -z "$(grep -o "$NUMBER" "$T/v.json")"
expect "the reply has no bytes of the file" test -z "$(grep -o 'secret' "$T/v.json")"
"$PYTHON3" -c 'import struct,sys
j = b"{\"secret-key\": oops}"
open(sys.argv[1], "wb").write(struct.pack("<Q", len(j)) + j)' "$S/badjson.state"
code=$(http "$T/j.json" POST "$A/v1/sessions/v/load" -d '{"path": "badjson.state"}')
expect "load of a file whose JSON header is broken: 400 without quoting it" test "$code" = 400 -a \
    -z "$(grep -o 'secret' "$T/j.json")" -a -n "$(grep -o 'not a session file' "$T/j.json")"
expect "the server log (-v) has the details, on one line" grep -q "header length $NUMBER" "$T/A.log"

# ---- control characters in the request path ----------------------------------------
code=$(http "$T/a.json" POST "$A/v1/completions" -d '{"prompt": "hi", "max_tokens": 2,
    "temperature": 0, "session": "a"}')
expect "session a is stored" test "$code" = 200
expect "DELETE /v1/sessions/a%00b: 400" test "$(raw DELETE '/v1/sessions/a%00b')" = 400
expect "session a still exists after it" test "$(http "$T/g.json" GET "$A/v1/sessions/a")" = 200
expect "POST /v1/sessions/a%00b/save: 400" \
    test "$(raw POST '/v1/sessions/a%00b/save' '{"path": "nul.state"}')" = 400
expect "and nothing was written" test ! -e "$S/nul.state"
expect "GET /v1/sessions/a%0d%0ab: 400" test "$(raw GET '/v1/sessions/a%0d%0ab')" = 400
expect "GET /v1/sessions/a%0Ab (upper case): 400" test "$(raw GET '/v1/sessions/a%0Ab')" = 400
expect "GET /health%00: 400" test "$(raw GET '/health%00')" = 400
expect "GET /health%7f: 400" test "$(raw GET '/health%7f')" = 400
expect "GET /health still 200" test "$(raw GET '/health')" = 200

# ---- log injection (-v) -----------------------------------------------------------
raw GET '/nothing%0d%0aFAKE-LOG-LINE: injected' >/dev/null
raw GET $'/esc\x1b[31mred\xff' >/dev/null
sleep 0.5
expect "a CR LF in the path forges no log line" test -z "$(grep '^FAKE-LOG-LINE' "$T/A.log")"
expect "the request is logged on one line" grep -q 'nothing%0d%0aFAKE-LOG-LINE: injected' "$T/A.log"
expect "raw control bytes are logged as \\xHH" grep -qF '/esc\x1b[31mred\xff' "$T/A.log"
expect "no raw escape byte reaches the log" test -z "$(grep -l $'\x1b' "$T/A.log")"

# ---- a FIFO or a directory under a session name stalls nothing --------------------
t0=$(date +%s.%N)
loaders=()
for i in 1 2 3; do
    curl -s -o "$T/fifo$i.json" -w '%{http_code}' --max-time 30 "$A/v1/sessions/f$i/load" \
        -d '{"path": "fifo.state"}' >"$T/fifo$i.code" &
    loaders+=($!)
done
# (bounds generous for a loaded machine: before the fix these waited forever)
code=$(http "$T/h.json" GET "$A/health" --max-time 30)
expect "/health answers while clients load a FIFO" test "$code" = 200
code=$(http "$T/c.json" POST "$A/v1/completions" --max-time 30 -d '{"prompt": "x", "max_tokens": 2}')
expect "a completion answers while clients load a FIFO" test "$code" = 200
wait "${loaders[@]}"
wait_fifo=$(date +%s.%N)
for i in 1 2 3; do
    expect "load of a FIFO ($i) is refused with 400" test "$(cat "$T/fifo$i.code")" = 400
done
fifo_s=$("$PYTHON3" -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$wait_fifo")
expect "all that within 30 s (${fifo_s%.*} s)" "$PYTHON3" -c "import sys; assert float(sys.argv[1]) < 30" "$fifo_s"
code=$(http "$T/d.json" POST "$A/v1/sessions/d/load" -d '{"path": "dir.state"}')
expect "load of a directory is refused with 400" test "$code" = 400
code=$(http "$T/d.json" POST "$A/v1/sessions/d/load" -d '{"path": "link.state"}')
expect "load through a symbolic link is refused with 400" test "$code" = 400

# rp_st_open itself (every file the CLI opens) does not wait for a writer
timeout 10 "$BIN" info "$S/fifo.state" >"$T/info.out" 2>&1
rc=$?
expect "rwkvpipe info on a FIFO fails at once (not a regular file)" test "$rc" != 124 -a "$rc" != 0 -a \
    -n "$(grep -o 'not a regular file' "$T/info.out")"

kill -TERM "$PID_A"
wait "$JOB_A"

# ---- --session-overwrite: regular files may be replaced ------------------------------
O="$T/over"
mkdir -p "$O"
printf 'not a session\n' >"$O/plain.state"
ln -s plain.state "$O/link.state"
start B "$BIN" serve --model "$TINY" --port 0 --threads 1 --session-dir "$O" --session-overwrite
B=$URL_B
http "$T/t.json" POST "$B/v1/completions" -d '{"prompt": "hello", "max_tokens": 4, "session": "s"}' >/dev/null
code=$(http "$T/o.json" POST "$B/v1/sessions/s/save" -d '{"path": "plain.state"}')
expect "--session-overwrite: a save replaces a file that is not a session file" test "$code" = 200
code=$(http "$T/o.json" POST "$B/v1/sessions/t/load" -d '{"path": "plain.state"}')
expect "--session-overwrite: and it is a session file now" test "$code" = 200
code=$(http "$T/o.json" POST "$B/v1/sessions/s/save" -d '{"path": "link.state"}')
expect "--session-overwrite: a symbolic link is still refused ($code)" test "${code:0:1}" = 4 -a -L "$O/link.state"
kill -TERM "$PID_B"
wait "$JOB_B"

# ---- --max-session-files: what clients can put on the disk is bounded -------------
C_DIR="$T/cap"
start C "$BIN" serve --model "$TINY" --port 0 --threads 1 --session-dir "$C_DIR" \
    --max-session-files 2
C=$URL_C
http "$T/t.json" POST "$C/v1/completions" -d '{"prompt": "hello", "max_tokens": 2, "session": "s"}' >/dev/null
expect "--max-session-files 2: a first file" test "$(http "$T/m.json" POST "$C/v1/sessions/s/save" -d '{"path": "a.state"}')" = 200
expect "--max-session-files 2: a second file" test "$(http "$T/m.json" POST "$C/v1/sessions/s/save" -d '{"path": "b.state"}')" = 200
code=$(http "$T/m.json" POST "$C/v1/sessions/s/save" -d '{"path": "c.state"}')
expect "--max-session-files 2: a third is refused with 507 ($code)" test "$code" = 507 -a ! -e "$C_DIR/c.state"
expect "--max-session-files 2: the reply names the option" grep -q 'max-session-files' "$T/m.json"
expect "--max-session-files 2: replacing a file is still allowed" test "$(http "$T/m.json" POST "$C/v1/sessions/s/save" -d '{"path": "a.state"}')" = 200
rm "$C_DIR/b.state"
expect "--max-session-files 2: after a file is removed, a new one fits" test "$(http "$T/m.json" POST "$C/v1/sessions/s/save" -d '{"path": "c.state"}')" = 200
kill -TERM "$PID_C"
wait "$JOB_C"

serve_test_end
