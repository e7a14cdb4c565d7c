# Sourced by the shell tests that run `rwkvpipe serve` (test_serve.sh,
# test_fake_device.sh); they keep the PIDS array their cleanup stops and T.
#
# serve_start NAME COMMAND...: runs a server in the background, output to
# $T/NAME.log, and waits up to 30 s for its "listening on URL (pid N)" line;
# sets URL_<NAME>, PID_<NAME> (the serving process: rank 0 under mpirun) and
# JOB_<NAME> (what was started), and adds both pids to PIDS. Returns 1 when
# the server never said it was listening (the log says why).
serve_start() {
    local name=$1
    shift
    "$@" >"$T/$name.log" 2>&1 &
    local job=$!
    PIDS+=("$job")
    for _ in $(seq 1 300); do
        grep -q "listening on" "$T/$name.log" && break
        kill -0 "$job" 2>/dev/null || break
        sleep 0.1
    done
    local line
    line=$(grep -m1 "listening on" "$T/$name.log") || return 1
    printf -v "URL_$name" '%s' "$(echo "$line" | grep -o 'http://[^ ]*')"
    printf -v "PID_$name" '%s' "$(echo "$line" | sed -n 's/.*(pid \([0-9]*\)).*/\1/p')"
    printf -v "JOB_$name" '%s' "$job"
    PIDS+=("$(echo "$line" | sed -n 's/.*(pid \([0-9]*\)).*/\1/p')")
}
