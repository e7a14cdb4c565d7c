#!/bin/bash
# rwkvpipe serve's connection handling (docs/serving.md, "Connections" and
# "Stopping"), on real servers on free loopback ports driven by
# tests/serve_conn_client.py: idle and trickling connections beyond
# --max-connections do not lock a new client out (--connection-timeout,
# --request-timeout); --max-connections-per-client caps one address and not
# the others; 40 streams and 8 plain requests at once on 2 HTTP threads all
# complete right (no handler blocks a thread), and 200 short requests in a
# row are all answered (no wake-up is lost); a half-closed client gets its
# reply; SIGTERM drains (503 + Retry-After to new, keep-alive and /health
# requests, the running stream ends cancelled), then exit 0, also under
# mpirun --pp 2.
# Run by `make check` (env: top_srcdir, top_builddir, MPIRUN, PYTHON3, RP_TEST_DATA).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
BIN="$top_builddir/rwkvpipe"
CLIENT=("$PYTHON3" "$top_srcdir/tests/serve_conn_client.py")
TINY="$RP_TEST_DATA/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_serve_conn.XXXXXX") || exit 99
SERVE_TEST_SECONDS=200
. "$top_srcdir/tests/serve_test_lib.sh"
# drain_check NAME DRAIN: SIGTERM to server NAME during a stream (client
# `drain`), then its exit status is 0, no sooner than the drain and at most
# 6 s after it.
drain_check() {
    local name=$1 drain=$2 pid url job out t0 rc elapsed
    pid=PID_$name url=URL_$name job=JOB_$name
    out=$("${CLIENT[@]}" drain "${!url}" "${!pid}" "$drain" 2>&1)
    rc=$?
    t0=$(echo "$out" | sed -n 's/^signalled at //p')
    if [ "$rc" = 0 ]; then ok "server $name, SIGTERM: ${out##*$'\n'}"; else
        bad "server $name, SIGTERM: the drain"
        echo "$out" | sed 's/^/    /' | tail -n 15
    fi
    wait "${!job}"
    rc=$?
    elapsed=$("$PYTHON3" -c 'import sys,time; print("%.1f" % (time.time() - float(sys.argv[1])))' "${t0:-0}")
    expect "server $name exits with status 0 (got $rc)" test "$rc" = 0
    expect "server $name exits ${elapsed} s after SIGTERM: within --drain-seconds $drain + 6 s, not before" \
        "$PYTHON3" -c 'import sys; e, d = float(sys.argv[1]), float(sys.argv[2]); assert d - 0.5 <= e <= d + 6' \
        "$elapsed" "$drain"
}

# ---- timeouts: idle and trickling connections beyond the limit ----------------
start A "$BIN" serve --model "$TINY" --port 0 --threads 1 --max-connections 8 \
    --max-connections-per-client 0 --connection-timeout 2 --request-timeout 5 --http-threads 2
expect "8 trickling + 8 idle connections (--max-connections 8): a new client is answered" \
    "${CLIENT[@]}" flood "$URL_A" 8 8 5
grep -q "did not arrive within 5 s" "$T/A.log" && ok "the server logs the connections it cut" ||
    bad "the server logs the connections it cut"
expect "a half-closed client gets its reply, plain and streamed" "${CLIENT[@]}" half-close "$URL_A"

# ---- the per-client cap -------------------------------------------------------------
start B "$BIN" serve --model "$TINY" --port 0 --threads 1 --max-connections 16 \
    --max-connections-per-client 4 --http-threads 2
expect "--max-connections-per-client 4: 127.0.0.2 is capped, 127.0.0.1 is not" \
    "${CLIENT[@]}" per-client "$URL_B" 4 4

# ---- many generations on a pool of 2 threads; the drain --------------------------------
start C "$BIN" serve --model "$TINY" --port 0 --threads 1 --slots 16 --http-threads 2 \
    --max-tokens-limit 1000000000 --drain-seconds 4
expect "40 streamed + 8 plain requests at once on 2 HTTP threads: each = its text alone; 200 short ones in a row" \
    "${CLIENT[@]}" many "$URL_C" 40 8
drain_check C 4

if [ -n "$MPIRUN" ] && command -v "$MPIRUN" >/dev/null 2>&1; then
    start D "$MPIRUN" -np 2 "$BIN" serve --model "$TINY" --pp 2 --port 0 --threads 1 \
        --max-tokens-limit 1000000000 --drain-seconds 3
    # mpirun and its 2 ranks: this test's processes whose command has --pp 2
    ranks=$(for p in $(own_rank_pids); do
        tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- '--pp 2' && echo "$p"
    done | tr '\n' ' ')
    drain_check D 3
    left=""
    for p in $ranks; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
    expect "--pp 2: mpirun and both ranks ($ranks) have exited${left:+ (left:$left)}" \
        test -n "$ranks" -a -z "$left"
else
    echo "skip: no mpirun for the --pp 2 drain"
fi

serve_test_end
