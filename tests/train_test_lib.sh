# Sourced by the multi-rank training tests (test_pipeline.sh, test_zb_h1.sh)
# after check_report.sh. train NAME NP [ARGS...] runs
# `mpirun -np NP rwkvpipe ${COMMON[@]} ARGS` with its metrics in
# $T/NAME.jsonl and its weights in $T/NAME.st, and fails the test (with the
# job's stderr) when the job fails. The caller sets BIN, COMMON, T, MPIRUN.
train() {
    local name=$1 np=$2
    shift 2
    if ! timeout 300 "$MPIRUN" -np "$np" "$BIN" "${COMMON[@]}" --metrics "$T/$name.jsonl" \
        -o "$T/$name.st" "$@" >"$T/stdout" 2>"$T/stderr"; then
        fail "$name: mpirun -np $np rwkvpipe ${COMMON[*]} $* failed"
    fi
}
