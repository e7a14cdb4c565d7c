#!/bin/bash
# Failures of a pipelined training job end it quickly and lose nothing
# (docs/parallelism.md):
# - a rank killed by a signal mid-run makes mpirun exit non-zero within 30 s,
#   and the last complete checkpoint still verifies and resumes;
# - a stage that stops answering (SIGSTOP) makes its peer give up after
#   --comm-timeout with a message naming the transfer it waited for;
# - a stage that stops itself (RWKVPIPE_TEST_STOP) in `logits --pp 2 --grads`
#   or before sending its weights at the end of `train --pp 2 -o`, or at its
#   checkpoint, ends the job within --comm-timeout + 25 s, the peer's message
#   naming that stage or the checkpoint collective it waited for;
# - a stage killed while writing its checkpoint shard leaves the previous
#   checkpoint as `latest`, and resuming from it gives the uninterrupted run.
# Run by `make check` (env: top_srcdir, top_builddir, MPIRUN, PYTHON3).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun"
    exit 77
fi
BIN="$(cd "$top_builddir" && pwd)/rwkvpipe"
COMPARE="$top_srcdir/tests/st_compare.py"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_pipeline_faults.XXXXXX") || exit 99
JOB=""
cleanup() {
    [ -n "$JOB" ] && kill -9 "$JOB" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT

. "$top_srcdir/tests/check_report.sh"

COMMON=(train --model-config L4-C64-V64 --data mqar --ctx-len 16 --batch 8 --micro-batch 2
        --warmup 2 --lr 3e-3 --eval-interval 0 --eval-batches 1 --log-interval 1
        --seed 3 --init-seed 5 --threads 1 --pp 2)

# Every rank this script starts carries this id, so rank_pid never picks a
# rank of another test's job running at the same time (make check -j).
export RP_FAULT_TEST_ID="$$.$RANDOM.$(date +%s%N)"

# rank_pid N: the pid of the rwkvpipe process of MPI rank N started by job $JOB.
rank_pid() {
    local p env
    for p in $(pgrep -f "$BIN (train|logits)" || true); do
        env="$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null)"
        if grep -qx "RP_FAULT_TEST_ID=$RP_FAULT_TEST_ID" <<<"$env" &&
            grep -qx "OMPI_COMM_WORLD_RANK=$1" <<<"$env"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# wait_for FILE SECONDS
wait_for() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [ -e "$1" ] && return 0
        sleep 0.1
    done
    return 1
}

check "a rank killed by SIGKILL mid-run ends the job within 30 s; the last checkpoint survives"
"$MPIRUN" -np 2 -x RP_FAULT_TEST_ID "$BIN" "${COMMON[@]}" --steps 1000000 --checkpoint-interval 20 \
    --checkpoint-dir "$T/ck_kill" >"$T/stdout" 2>"$T/stderr" &
JOB=$!
wait_for "$T/ck_kill/latest" 120 || fail "no checkpoint within 120 s"
pid=$(rank_pid 1) || fail "cannot find rank 1's process"
kill -9 "$pid"
start=$(date +%s)
for ((i = 0; i < 300; i++)); do kill -0 "$JOB" 2>/dev/null || break; sleep 0.1; done
kill -0 "$JOB" 2>/dev/null && fail "mpirun still runs 30 s after rank 1 was killed"
wait "$JOB"
rc=$?
JOB=""
took=$(($(date +%s) - start))
[ "$rc" -ne 0 ] || fail "mpirun exited 0 after a rank was killed"
"$BIN" info "$T/ck_kill" --verify >"$T/stdout" 2>"$T/stderr" ||
    fail "the last checkpoint does not verify after the crash"
ok "mpirun exit status $rc after ${took} s; $(cat "$T/ck_kill/latest") verifies"

check "a stage that stops answering: its peer gives up after --comm-timeout, naming the transfer"
"$MPIRUN" -np 2 -x RP_FAULT_TEST_ID "$BIN" "${COMMON[@]}" --steps 1000000 --comm-timeout 3 \
    >"$T/stdout" 2>"$T/stderr" &
JOB=$!
for ((i = 0; i < 600; i++)); do grep -q "^step " "$T/stderr" && break; sleep 0.1; done
pid=$(rank_pid 1) || fail "cannot find rank 1's process"
kill -STOP "$pid"
start=$(date +%s)
for ((i = 0; i < 300; i++)); do kill -0 "$JOB" 2>/dev/null || break; sleep 0.1; done
kill -0 "$JOB" 2>/dev/null && { kill -9 "$pid"; fail "the job still runs 30 s after rank 1 stopped"; }
wait "$JOB"
rc=$?
JOB=""
[ "$rc" -ne 0 ] || fail "mpirun exited 0"
grep -q "stage 0\]: error: .*waited [0-9]* s (--comm-timeout) \(to receive the .* of micro-batch [0-9]* from stage 1\|for the \)" "$T/stderr" ||
    fail "no watchdog message naming the transfer"
ok "$(grep -m1 'comm-timeout' "$T/stderr" | sed 's/^.*error: //')"

# stopped_stage_ends_job WHAT STOP_SPEC WANT ARGS...: runs mpirun -np 2 ARGS
# with RWKVPIPE_TEST_STOP=STOP_SPEC (a stage sends itself SIGSTOP there); the
# job must end non-zero within 5 s (--comm-timeout in ARGS) + 25 s, and
# stderr must match the regex WANT.
stopped_stage_ends_job() {
    local what="$1" spec="$2" want="$3" i start rc pid
    shift 3
    check "$what"
    start=$(date +%s)
    RWKVPIPE_TEST_STOP="$spec" "$MPIRUN" -np 2 -x RP_FAULT_TEST_ID -x RWKVPIPE_TEST_STOP "$@" \
        >"$T/stdout" 2>"$T/stderr" &
    JOB=$!
    for ((i = 0; i < 300; i++)); do kill -0 "$JOB" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$JOB" 2>/dev/null; then
        for r in 0 1; do pid=$(rank_pid $r) && kill -9 "$pid"; done
        fail "the job still runs $(($(date +%s) - start)) s after a stage stopped (--comm-timeout 5)"
    fi
    wait "$JOB"
    rc=$?
    JOB=""
    for r in 0 1; do pid=$(rank_pid $r) && { kill -9 "$pid"; fail "rank $r outlived the job"; }; done
    [ "$rc" -ne 0 ] || fail "mpirun exited 0"
    grep -q "$want" "$T/stderr" || fail "no message matching '$want'"
    ok "exit $rc after $(($(date +%s) - start)) s: $(grep -m1 'comm-timeout' "$T/stderr" | sed 's/^.*error: //')"
}
"$BIN" init --model-config L4-C64-V64 --seed 9 -o "$T/m4.st" >"$T/stdout" 2>"$T/stderr" || fail "init"
LOGITS=(logits --pp 2 --model "$T/m4.st" --tokens "$(seq -s, 3 1 42)" --grads --threads 1
        --comm-timeout 5 -o "$T/stopped.st")
stopped_stage_ends_job "logits --pp 2 --grads: stage 1 stops before its gradients -> stage 0 gives up naming stage 1" \
    logits-grads:1 "stage 0\]: error: stage 0 waited [0-9]* s (--comm-timeout) to receive the .* of micro-batch 0 from stage 1" \
    "$BIN" "${LOGITS[@]}"
stopped_stage_ends_job "logits --pp 2 --grads: stage 0 stops -> stage 1 gives up naming stage 0" \
    logits-grads:0 "stage 1\]: error: stage 1 waited [0-9]* s (--comm-timeout) to receive the .* of micro-batch 0 from stage 0" \
    "$BIN" "${LOGITS[@]}"
stopped_stage_ends_job "train --pp 2 -o: stage 1 stops before sending its weights -> stage 0 gives up naming stage 1" \
    save-weights:1 "stage 0\]: error: stage 0 waited [0-9]* s (--comm-timeout) for stage 1's layer weights" \
    "$BIN" "${COMMON[@]}" --steps 2 --comm-timeout 5 -o "$T/stopped_train.st"
[ -e "$T/stopped_train.st" ] && fail "a failed save left $T/stopped_train.st"
stopped_stage_ends_job "train --pp 2: stage 1 stops at its checkpoint -> stage 0 gives up naming the checkpoint collective" \
    ckpt-start:1 "stage 0\]: error: stage 0 waited [0-9]* s (--comm-timeout) for the checkpoint .*; a rank did not join" \
    "$BIN" "${COMMON[@]}" --steps 2 --comm-timeout 5 --checkpoint-dir "$T/ck_stopped"
[ -e "$T/ck_stopped/latest" ] && fail "a checkpoint a stage never wrote was committed"

check "a stage killed while writing its checkpoint shard: the previous checkpoint stays latest"
"$MPIRUN" -np 2 "$BIN" "${COMMON[@]}" --steps 6 -o "$T/full.st" >"$T/stdout" 2>"$T/stderr" ||
    fail "uninterrupted run"
if RWKVPIPE_TEST_CRASH=ckpt-shard:1:4 "$MPIRUN" -np 2 -x RWKVPIPE_TEST_CRASH "$BIN" "${COMMON[@]}" \
    --steps 6 --checkpoint-interval 2 --checkpoint-dir "$T/ck_save" >"$T/stdout" 2>"$T/stderr"; then
    fail "the job survived a crash during its checkpoint"
fi
[ "$(cat "$T/ck_save/latest")" = "step-00000002" ] ||
    fail "latest is '$(cat "$T/ck_save/latest")', expected step-00000002"
[ -e "$T/ck_save/step-00000004/manifest.pb" ] && fail "the interrupted step-00000004 has a manifest"
"$BIN" info "$T/ck_save" --verify >"$T/stdout" 2>"$T/stderr" || fail "step 2 does not verify"
"$MPIRUN" -np 2 "$BIN" "${COMMON[@]}" --steps 6 --resume "$T/ck_save" -o "$T/resumed.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "resume after the crash"
"$PYTHON3" "$COMPARE" "$T/full.st" "$T/resumed.st" --tol 1e-5 >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "the resumed run differs from the uninterrupted one"; }
ok "step 4 was left incomplete; resumed from step 2 to the same weights"
check "SIGUSR1 to mpirun (preemption): every rank stops at the same step with a checkpoint, exit 75; --resume auto continues to the uninterrupted result"
"$MPIRUN" -np 2 "$BIN" "${COMMON[@]}" --steps 400 -o "$T/full400.st" >"$T/stdout" 2>"$T/stderr" ||
    fail "uninterrupted 400-step run"
# The previous run's "step 5/" must not be mistaken for this one's.
rm -f "$T/stderr"
"$MPIRUN" -np 2 "$BIN" "${COMMON[@]}" --steps 400 --checkpoint-dir "$T/ck_sig" --resume auto \
    -o "$T/sig.st" >"$T/stdout" 2>"$T/stderr" &
JOB=$!
for ((i = 0; i < 600; i++)); do grep -qs "^step 5/" "$T/stderr" && break; sleep 0.1; done
kill -USR1 "$JOB"
wait "$JOB"
rc=$?
JOB=""
[ "$rc" -eq 75 ] || fail "exit status $rc after SIGUSR1, expected 75"
grep -q "stopped by signal 10 (User defined signal 1) after step [0-9]*; checkpoint in" "$T/stderr" ||
    fail "no stop message"
stopped=$(sed -n 's/.*after step \([0-9]*\);.*/\1/p' "$T/stderr")
[ "$(cat "$T/ck_sig/latest")" = "$(printf 'step-%08d' "$stopped")" ] ||
    fail "latest is $(cat "$T/ck_sig/latest"), the run stopped after step $stopped"
[ -e "$T/sig.st" ] && fail "a stopped run wrote its final weights"
"$MPIRUN" -np 2 "$BIN" "${COMMON[@]}" --steps 400 --checkpoint-dir "$T/ck_sig" --resume auto \
    -o "$T/sig.st" >"$T/stdout" 2>"$T/stderr" || fail "--resume auto after the stop"
grep -q "resumed from .*step-" "$T/stderr" || fail "--resume auto did not resume"
"$PYTHON3" "$COMPARE" "$T/full400.st" "$T/sig.st" --tol 1e-5 >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "stopped + resumed differs from the uninterrupted run"; }
ok "stopped after step $stopped, resumed, same weights as 400 steps at once"

check "a NaN loss: rank 0 alone reports it and ends the job; --no-halt-on-nan skips the steps"
"$BIN" init --model-config L4-C64-V64 -o "$T/nan.st" >"$T/stdout" 2>"$T/stderr" || fail "init"
# One NaN in the head makes every logit, loss and gradient NaN.
"$PYTHON3" - "$T/nan.st" <<'PY' || fail "cannot poison the model"
import json, struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    begin = header["head.weight"]["data_offsets"][0]
    f.seek(8 + n + begin)
    f.write(struct.pack("<f", float("nan")))
PY
start=$(date +%s)
if timeout 60 "$MPIRUN" -np 2 "$BIN" "${COMMON[@]}" --steps 5 --init-from "$T/nan.st" \
    >"$T/stdout" 2>"$T/stderr"; then
    fail "training on a NaN loss succeeded"
fi
[ "$(grep -c 'error:' "$T/stderr")" -eq 1 ] || fail "expected exactly one error message"
grep -q "rank 0/2, stage 0\]: error: step 1: the gradient norm is nan" "$T/stderr" ||
    fail "the message does not name rank, stage and cause"
ok "$(grep 'error:' "$T/stderr") ($(($(date +%s) - start)) s)"
"$MPIRUN" -np 2 "$BIN" "${COMMON[@]}" --steps 3 --init-from "$T/nan.st" --no-halt-on-nan \
    >"$T/stdout" 2>"$T/stderr" || fail "--no-halt-on-nan stopped the job"
grep -q "3 steps were skipped" "$T/stderr" || fail "no summary of the skipped steps"
ok "--no-halt-on-nan: 3 steps skipped"

echo "all pipeline fault checks passed"
