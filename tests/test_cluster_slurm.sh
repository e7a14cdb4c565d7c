#!/bin/bash
# Slurm across nodes, on the cluster of network namespaces (tests/cluster/
# cluster.sh and slurm_lib.sh; docs/cluster.md, "Slurm on the namespace
# cluster"): slurmctld on rpnode1, a slurmd per node. `sbatch --nodes=2
# launch/train.sbatch` (a stage per node, srun --mpi=pmix) gives the weights
# and final loss of the same layout on one host; a job preempted with USR1
# while its nodes are drained requeues, resumes on the other two nodes
# (mpirun launcher) and ends the same; a node killed mid-run ends the job
# with rank 0 naming that node, rank and transfer; serve.sbatch over 2 nodes
# answers as one process and stops cleanly on scancel.
# Needs root, namespaces and Slurm (launch/deps-slurm), else exit 77 with the
# reason. Run by launch/check after the other cluster tests (env as
# tests/test_cluster.sh; KEEP=1 keeps the scratch directory). About 4 minutes.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
. "$top_srcdir/tests/cluster/test_lib.sh"
cluster_test_require curl
. "$top_srcdir/tests/cluster/slurm_lib.sh"
slurm_require
TINY="$top_srcdir/tests/data/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_cluster_slurm.XXXXXX") || exit 99
chmod 755 "$T"
PIDS=()
export RP_CLUSTER_OWNER=$$
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    slurm_stop
    "$C" stop
    [ -n "${KEEP:-}" ] && echo "kept $T" || rm -rf "$T"
}
trap cleanup EXIT

. "$top_srcdir/tests/check_report.sh"
. "$top_srcdir/tests/serve_start.sh"

check "a 4-node Slurm: slurmctld on rpnode1, one slurmd per node namespace"
start_cluster 4
fast_tcp_failure 4
slurm_start 4
ok "$(sl sinfo -h -o '%P %D %t %N' | tr '\n' ' ')"

# What train.sbatch runs (its fixed options, then TRAIN_ARGS), for the
# one-host reference.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export RWKVPIPE="$BIN" PP=2 DATA=mqar CKPT_INTERVAL=5 RWKVPIPE_LAUNCH_DIR="$top_srcdir/launch"
STEPS=60
MODEL_ARGS="--model-config L4-C64-V64 --ctx-len 16 --batch 8 --micro-batch 2 --log-interval 5 --steps $STEPS"

# submit NAME SCRIPT [sbatch options...]: prints the job id; log $T/job-NAME.log.
submit() {
    local name=$1 script=$2
    shift 2
    sl sbatch --parsable --job-name="$name" --chdir="$T" --output="$T/job-$name.log" \
        --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --time=5 "$@" \
        "$top_srcdir/launch/$script" | cut -d';' -f1
}
final_loss() { sed -n 's/.*done: .* final loss \([0-9.]*\),.*/\1/p' "$1" | tail -n 1; }
in_log() { grep -Eq -- "$2" "$1" || { cp "$1" "$T/stderr"; fail "$3: no line matching '$2' in $1"; }; }
completed() {
    local state code
    state="$(job_field "$1" JobState)"
    code="$(job_field "$1" ExitCode)"
    if [ "$state" != COMPLETED ] || [ "$code" != 0:0 ]; then
        cp "$2" "$T/stderr"; fail "job $1 ended $state, exit code $code; expected COMPLETED 0:0"
    fi
}
# same_result LOG ST: the job's final loss and weights equal the one-host run's.
same_result() {
    local loss
    loss="$(final_loss "$1")"
    if [ -z "$loss" ] || [ "$loss" != "$ref_loss" ]; then
        cp "$1" "$T/stderr"
        fail "final loss '$loss', one host $ref_loss"
    fi
    "$PYTHON3" "$COMPARE" "$T/ref.st" "$2" >"$T/cmp" 2>&1 ||
        { cat "$T/cmp"; fail "final weights of $2 differ from one host"; }
}

check "sbatch --nodes=2 train.sbatch (srun --mpi=pmix, a stage per node) = the same layout on one host"
# shellcheck disable=SC2086 # MODEL_ARGS is a list of options
timeout 300 "$MPIRUN" -np 2 "$BIN" train --pp 2 --checkpoint-dir "$T/ck-ref" \
    --checkpoint-interval 5 --resume auto --data mqar --threads 1 $MODEL_ARGS -o "$T/ref.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "one host: mpirun -np 2 train --pp 2"
ref_loss="$(final_loss "$T/stderr")"
[ -n "$ref_loss" ] || fail "one host: no final loss"
id="$(CKPT_DIR="$T/ck-a" TRAIN_ARGS="$MODEL_ARGS -o $T/a.st" submit a train.sbatch)"
[ -n "$id" ] || fail "sbatch train.sbatch"
sl_wait 180 "job $id to finish" job_finished "$id"
completed "$id" "$T/job-a.log"
in_log "$T/job-a.log" "^train.sbatch: job $id \(restart 0\) on 2 node\(s\) \[rpnode\[1-2\]\].*launcher srun --mpi=pmix" "job a"
in_log "$T/job-a.log" "rank 0/2 on rpnode1 .*stage 0" "job a"
in_log "$T/job-a.log" "rank 1/2 on rpnode2 .*stage 1" "job a"
same_result "$T/job-a.log" "$T/a.st"
ok "job $id on rpnode[1-2]: COMPLETED, final loss $ref_loss and weights as on one host"

check "preempted (USR1) while rpnode1-2 are drained: requeued, resumes on rpnode3-4 (mpirun launcher), same result"
id="$(LAUNCHER=mpirun CKPT_DIR="$T/ck-b" TRAIN_ARGS="$MODEL_ARGS -o $T/b.st" submit b train.sbatch)"
sl_wait 120 "job $id's first checkpoint" test -f "$T/ck-b/latest"
sl scontrol update NodeName=rpnode1,rpnode2 State=DRAIN Reason=test-maintenance ||
    fail "scontrol: drain rpnode1,rpnode2"
sl scancel --batch --signal=USR1 "$id" || fail "scancel --batch --signal=USR1 $id"
sl_wait 60 "job $id to be requeued" grep -qs "requeueing job $id" "$T/job-b.log"
sl_wait 180 "requeued job $id to finish" job_finished "$id"
completed "$id" "$T/job-b.log"
[ "$(job_field "$id" Restarts)" = 1 ] || fail "job $id: Restarts=$(job_field "$id" Restarts), expected 1"
in_log "$T/job-b.log" "^train.sbatch: job $id \(restart 0\) on 2 node\(s\) \[rpnode\[1-2\]\].*launcher mpirun" "job b, first run"
in_log "$T/job-b.log" "^train.sbatch: stopped with status 75; checkpoint step-0*([0-9]+); requeueing" "job b"
stopped="$(sed -n 's/.*stopped with status 75; checkpoint step-0*\([0-9]*\);.*/\1/p' "$T/job-b.log")"
in_log "$T/job-b.log" "^train.sbatch: job $id \(restart 1\) on 2 node\(s\) \[rpnode\[3-4\]\]" "job b, requeued run"
in_log "$T/job-b.log" "^resumed from $T/ck-b/step-0*$stopped at step $stopped " "job b, requeued run"
in_log "$T/job-b.log" "rank 0/2 on rpnode3 .*stage 0" "job b, requeued run"
in_log "$T/job-b.log" "rank 1/2 on rpnode4 .*stage 1" "job b, requeued run"
same_result "$T/job-b.log" "$T/b.st"
sl scontrol update NodeName=rpnode1,rpnode2 State=RESUME || fail "scontrol: resume rpnode1,rpnode2"
ok "job $id stopped after step $stopped on rpnode[1-2], resumed on rpnode[3-4]: final loss and weights as on one host"

check "sbatch --nodes=2 serve.sbatch: a completion equal to one process; scancel stops every rank cleanly"
sl_wait 30 "rpnode1-2 to be idle again" nodes_idle_slurm 4
serve_start ONE "$BIN" serve --model "$TINY" --port 0 --threads 1 ||
    { cp "$T/ONE.log" "$T/stderr"; fail "one-process serve did not start"; }
id="$(MODEL="$TINY" PORT=8123 submit serve serve.sbatch)"
sl_wait 90 "job $id's server to listen" grep -qs "listening on http://127.0.0.1:8123" "$T/job-serve.log"
in_log "$T/job-serve.log" "rank 1/2 on rpnode2 .*stage 1" "serve job"
body='{"prompt": "The quick brown fox", "max_tokens": 32, "temperature": 0}'
code=$("$C" exec 1 curl -s -o "$T/cl.json" -w '%{http_code}' --max-time 60 \
    http://127.0.0.1:8123/v1/completions -d "$body")
[ "$code" = 200 ] || fail "serve job: completion status $code: $(head -c 300 "$T/cl.json")"
curl -s -o "$T/one.json" --max-time 60 "$URL_ONE/v1/completions" -d "$body" || fail "one process: completion"
"$PYTHON3" - "$T/cl.json" "$T/one.json" <<'PY' || fail "serve job: the completion differs from one process"
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
assert a["choices"][0]["text"] == b["choices"][0]["text"], (a["choices"][0]["text"], b["choices"][0]["text"])
assert a["usage"] == b["usage"] and a["usage"]["completion_tokens"] == 32, (a["usage"], b["usage"])
PY
sl scancel "$id" || fail "scancel $id"
sl_wait 60 "job $id to stop" job_finished "$id"
in_log "$T/job-serve.log" "^serve.sbatch: the server exited with status 0" "serve job"
for n in 1 2; do
    for p in $("$C" pids $n); do
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = rwkvpipe ] && fail "rwkvpipe pid $p still runs on rpnode$n"
    done
done
ok "job $id: same text and usage as one process; exit 0 on scancel, no rank left"

check "rpnode2 dies (every process SIGKILLed) mid-run: the job ends within 60 s; rank 0's error names rpnode2, rank 1 and the transfer"
# Last: rpnode2's slurmd dies with it.
sl_wait 30 "rpnode1-2 to be idle again" nodes_idle_slurm 4
# Two things end this job, whichever comes first: the ranks (rank 0's
# watchdog after --comm-timeout 10, then srun's KillWait 10 + 2 s for the dead
# node's task: ~22 s after the kill), or slurmctld marking rpnode2 DOWN, which
# requeues the job (--requeue) and kills the batch script before its last line.
# slurmctld pings a node whose last answer is over SlurmdTimeout/3 old, every
# SlurmdTimeout/3 s, and marks it DOWN on the round after the one that found
# that answer over SlurmdTimeout old: the answer may be 2/3 SlurmdTimeout old
# at the kill, so DOWN comes 2/3 SlurmdTimeout after it at the earliest. With
# SlurmdTimeout=30 that was 20 s: the check failed now and then, by timing
# alone. It checks the ranks' exit, so slurmctld must not win inside 60 s.
sdt="$(sl scontrol show config | sed -n 's/^SlurmdTimeout *= *\([0-9]*\) sec.*/\1/p')"
[ -n "$sdt" ] && [ $((sdt * 2 / 3)) -gt 60 ] ||
    fail "SlurmdTimeout='$sdt' s: slurmctld may mark a killed node DOWN (and requeue its job)" \
        "$((${sdt:-0} * 2 / 3)) s after the kill, inside this check's 60 s; raise it in tests/cluster/slurm_lib.sh"
id="$(CKPT_DIR="$T/ck-k" TRAIN_ARGS="${MODEL_ARGS% --steps*} --steps 1000000 --comm-timeout 10" \
    submit kill train.sbatch)"
sl_wait 120 "job $id to reach step 10" grep -qs "^step 10/" "$T/job-kill.log"
"$C" kill 2 KILL
start=$SECONDS
# The batch script's last line: the ranks and srun have ended. (The job's
# state leaves COMPLETING only when slurmctld gives up on rpnode2's slurmd.)
script_ended() { grep -Eqs "^train.sbatch: .*not requeueing" "$T/job-kill.log"; }
node_failed() { grep -qs "requeue job JobId=$id due to failure of node" "$SL/slurmctld.log"; }
kill_outcome() { script_ended || node_failed; }
sl_wait 60 "job $id's batch script to end after rpnode2 died" kill_outcome
took=$((SECONDS - start))
script_ended || { sl_logs; fail "slurmctld marked rpnode2 DOWN and requeued job $id ${took} s" \
    "after the kill, before its ranks ended it (SlurmdTimeout=$sdt s)"; }
# Before ranks ignored SIGPIPE, rank 0 died of it in silence ("srun: error:
# rpnode1: task 0: Broken pipe") and nothing named rpnode2.
# Rank 0's watchdog, or the guard behind it when an MPI call in the wait did
# not return (rank 0 stuck after Open MPI's failed write to the dead node).
rank0_error='(rank 0/2, stage 0\]|^rwkvpipe): error: .*stage.*\(rank 1 on rpnode2\)'
in_log "$T/job-kill.log" "$rank0_error" "job kill"
ok "job $id's script ended ${took} s after the kill: $(grep -m1 -E "$rank0_error" "$T/job-kill.log" | sed 's/^.*error: //')"

echo "all Slurm cluster checks passed"
