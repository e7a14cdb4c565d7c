# Sourced by the shell tests of `rwkvpipe serve` (test_serve.sh,
# test_serve_conn.sh, test_serve_sessions.sh, test_serve_stage_stop.sh) once
# they have set T (their scratch directory) and top_srcdir. It gives them:
# - the cleanup at exit: every server in PIDS gets TERM (rank 0 then stops
#   its pipeline), what is left KILL; T is removed unless KEEP=1; a test may
#   define serve_test_extra_cleanup to run first;
# - a watchdog that ends the test after SERVE_TEST_SECONDS (a hung server
#   must not hang `make check`);
# - the reporter: ok, bad, expect DESCRIPTION COMMAND... (passes when the
#   command succeeds; shows its output when not), serve_test_end;
# - start NAME COMMAND...: serve_start (tests/serve_start.sh), ending the
#   test with the server's log when it does not come up;
# - own_rank_pids [N]: the pids of this test's rwkvpipe ranks (rank N only
#   with N), never those of another test's job (make check -j runs tests
#   side by side with the same model and options): every process this script
#   starts carries RP_SERVE_TEST_ID in its environment.
export RP_SERVE_TEST_ID="$$.$RANDOM.$(date +%s%N)"
own_rank_pids() {
    local p env
    for p in $(pgrep -f "rwkvpipe serve" || true); do
        env="$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null)"
        grep -qx "RP_SERVE_TEST_ID=$RP_SERVE_TEST_ID" <<<"$env" || continue
        [ -z "${1:-}" ] || grep -qx "OMPI_COMM_WORLD_RANK=$1" <<<"$env" || continue
        echo "$p"
    done
}
PIDS=()
WATCHDOG=
serve_test_cleanup() {
    [ -n "$WATCHDOG" ] && kill -TERM "$WATCHDOG" 2>/dev/null
    if declare -F serve_test_extra_cleanup >/dev/null; then serve_test_extra_cleanup; fi
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    wait 2>/dev/null
    [ -n "${KEEP:-}" ] || rm -rf "$T"
}
trap serve_test_cleanup EXIT
if [ "${SERVE_TEST_SECONDS:-0}" -gt 0 ]; then
    (
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        sleep "$SERVE_TEST_SECONDS" >/dev/null 2>&1 &
        nap=$!
        wait "$nap"
        echo "FAIL: $(basename "$0") took over $SERVE_TEST_SECONDS s" >&2
        kill -TERM $$
    ) &
    WATCHDOG=$!
fi

passed=0
failed=0
ok() { echo "ok - $1 [$SECONDS s]"; passed=$((passed + 1)); }
bad() {
    echo "FAIL - $1"
    failed=$((failed + 1))
}
expect() {
    local what=$1
    shift
    if out=$("$@" 2>&1); then ok "$what"; else bad "$what"; echo "$out" | sed 's/^/    /' | tail -n 15; fi
}
serve_test_end() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

. "$top_srcdir/tests/serve_start.sh"
start() {
    serve_start "$@" || {
        echo "FAIL: server $1 did not start:"
        sed 's/^/    /' "$T/$1.log" | tail -n 20
        exit 1
    }
}
