#!/usr/bin/env bash
# A real Slurm test of launch/train.sbatch on this machine: installs Slurm and
# MUNGE (launch/deps-slurm), starts munged, slurmctld and slurmd on a one-node
# cluster whose configuration, state and logs live in a temporary directory,
# then checks a complete training job, two preempted ones (SIGUSR1 ->
# checkpoint -> exit 75 -> requeue -> resume -> done, with srun and with
# mpirun) and one stopped by its time-limit warning. Called by launch/check
# after the CPU suite; not part of `make check`. Needs root (or sudo) for
# slurmd. Exit 0: passed; 77: skipped (Slurm cannot be installed); else failed.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=conf_common.sh
. "$root/tests/slurm/conf_common.sh"

usage() {
    cat <<'EOF'
usage: tests/slurm/run.sh
Runs rwkvpipe training jobs through a real one-node Slurm cluster started for
the test (slurmctld, slurmd and munged under a temporary directory; all three
are stopped and the directory removed at exit). About 2-3 minutes.
Environment:
  RWKVPIPE        the binary to train with (default build/cpu/rwkvpipe)
  RP_SLURM_KEEP=1 keep the temporary directory (configuration, daemon and job logs)
Exit status: 0 passed, 77 skipped (the Slurm packages cannot be installed), 1 failed.
EOF
}
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

say() { printf 'slurm test: %s\n' "$*"; }
skip() { say "SKIP: $*"; exit 77; }

bin="${RWKVPIPE:-$root/build/cpu/rwkvpipe}"
if [ ! -x "$bin" ]; then
    say "FAIL: no rwkvpipe binary at $bin (run launch/build first)"
    exit 1
fi
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

if [ "$(id -u)" -ne 0 ]; then
    # slurmd must be root to start jobs; re-run the whole test under sudo.
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        exec sudo -n --preserve-env=RWKVPIPE,RP_SLURM_KEEP,OPENBLAS_CORETYPE \
            RWKVPIPE="$bin" "$0" "$@"
    fi
    skip "not root and no password-less sudo: slurmd and the package install need root"
fi

say "installing Slurm and MUNGE if missing (launch/deps-slurm)"
if ! deps_log="$("$root/launch/deps-slurm" 2>&1)"; then
    printf '%s\n' "$deps_log" | tail -n 20
    skip "launch/deps-slurm could not install slurm-wlm and munge (no network or no apt-get?)"
fi
printf '%s\n' "$deps_log" | tail -n 1
for cmd in munged slurmctld slurmd sbatch squeue sinfo scontrol scancel; do
    command -v "$cmd" >/dev/null || skip "$cmd is missing after launch/deps-slurm"
done

# ---- temporary cluster, cleaned up on every exit ------------------------------
tmp="$(mktemp -d /tmp/rwkvpipe-slurm.XXXXXX)"
chmod 755 "$tmp"   # slurmstepd and the job read and write under it
pids=()            # daemons started here, stopped in reverse order
watchdog_pid=""
failed=1
stop_daemons() {
    # Jobs first, so no slurmstepd outlives its slurmd.
    if [ -n "${SLURM_CONF:-}" ] && command -v squeue >/dev/null; then
        if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
            # shellcheck disable=SC2046 # one argument per job id
            scancel --full $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
            for _ in $(seq 1 30); do
                [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
                sleep 1
            done
        fi
    fi
    local i pid
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid="${pids[$i]}"
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
on_exit() {
    local status=$?
    trap - EXIT TERM INT
    [ -n "$watchdog_pid" ] && kill "$watchdog_pid" 2>/dev/null
    if [ "$failed" = 1 ]; then
        say "FAILED; the last lines of the logs:"
        for f in "$tmp"/slurmctld.log "$tmp"/slurmd.log "$tmp"/munge/munged.log "$tmp"/job-*.log; do
            [ -f "$f" ] || continue
            echo "---- $f"
            tail -n 25 "$f"
        done
    fi
    stop_daemons
    if [ "${RP_SLURM_KEEP:-0}" = 1 ]; then
        say "kept $tmp"
    else
        rm -rf "$tmp"
    fi
    [ "$failed" = 1 ] && [ "$status" = 0 ] && status=1
    exit "$status"
}
trap on_exit EXIT
trap 'say "FAIL: interrupted or timed out (the whole test is limited to 280 s)"; exit 1' TERM INT
# The whole test must end within 5 minutes, whatever hangs.
# (Its sleep dies with it and it holds no output pipe open, so a caller
# reading our output is not kept waiting after we exit.)
test_pid=$$
(
    trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
    sleep 280 &
    sleep_pid=$!
    wait "$sleep_pid" && kill -TERM "$test_pid" 2>/dev/null
) </dev/null >/dev/null 2>&1 &
watchdog_pid=$!

fail() { say "FAIL: $*"; exit 1; }

# wait_for SECONDS WHAT COMMAND...: polls COMMAND every half second.
wait_for() {
    local limit_s="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + limit_s))
    until "$@"; do
        [ "$SECONDS" -ge "$deadline" ] && fail "timed out after ${limit_s} s waiting for $what"
        sleep 0.5
    done
}

# ---- munged -------------------------------------------------------------------
mkdir -m 755 "$tmp/munge"
key="$tmp/munge/munge.key"
if [ ! -f "$key" ]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$key"
    else
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chmod 400 "$key"
fi
socket="$tmp/munge/munge.socket"
munged --foreground --force --key-file="$key" --socket="$socket" \
    --pid-file="$tmp/munge/munged.pid" --log-file="$tmp/munge/munged.log" \
    --seed-file="$tmp/munge/munged.seed" >"$tmp/munge/munged.out" 2>&1 &
pids+=($!)
wait_for 10 "munged's socket" test -S "$socket"
say "munged running (pid ${pids[0]}, socket $socket)"

# ---- slurm.conf ---------------------------------------------------------------
host="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
# Two free TCP ports, so an existing Slurm on this machine is not disturbed.
read -r ctld_port slurmd_port < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
mkdir -p "$tmp/state" "$tmp/spool"
export SLURM_CONF="$tmp/slurm.conf"
{
    cat <<EOF
# One-node test cluster written by tests/slurm/run.sh.
ClusterName=rwkvpipe-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd.log
EOF
    slurm_conf_common "$socket"
    echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    echo "PartitionName=test Nodes=$host Default=YES MaxTime=30 State=UP"
} >"$SLURM_CONF"

slurmctld -D -c -f "$SLURM_CONF" >"$tmp/slurmctld.out" 2>&1 &
pids+=($!)
ctld_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }
wait_for 20 "slurmctld to answer" ctld_up
slurmd -D -f "$SLURM_CONF" -N "$host" >"$tmp/slurmd.out" 2>&1 &
pids+=($!)
node_idle() {
    local state
    state="$(sinfo -h -n "$host" -o %t 2>/dev/null || true)"
    case "$state" in
        idle) return 0 ;;
        drain*|down*|fail*) fail "node $host is $state: $(sinfo -h -R -o '%E' 2>/dev/null)" ;;
    esac
    return 1
}
wait_for 40 "node $host to be idle" node_idle
say "slurmctld (pid ${pids[1]}, port $ctld_port) and slurmd (pid ${pids[2]}, port $slurmd_port)" \
    "up: node $host, $cpus CPUs, ${mem_mb} MB; srun MPI types: $(srun --mpi=list 2>&1 | tr -s '\n\t ' ' ')"

# ---- jobs ---------------------------------------------------------------------
# Open MPI refuses root unless told, and this machine may have fewer cores
# than ranks; the template itself needs neither.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
export RWKVPIPE="$bin" PP=2 DATA=mqar CKPT_INTERVAL=5 RWKVPIPE_LAUNCH_DIR="$root/launch"

job_field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
job_finished() {
    case "$(job_field "$1" JobState)" in
        COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) return 0 ;;
    esac
    return 1
}
# submit NAME [sbatch options...]: prints the job id.
submit() {
    local name="$1"
    shift
    sbatch --parsable --job-name="$name" --chdir="$tmp" --output="$tmp/job-$name-%j.log" \
        --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=5 "$@" \
        "$root/launch/train.sbatch" | cut -d';' -f1
}
expect_in_log() {
    local log="$1" pattern="$2" what="$3"
    grep -Eq -- "$pattern" "$log" || fail "$what: no line matching '$pattern' in $log"
}
expect_completed() {
    local id="$1" state exit_code
    state="$(job_field "$id" JobState)"
    exit_code="$(job_field "$id" ExitCode)"
    if [ "$state" != COMPLETED ] || [ "$exit_code" != 0:0 ]; then
        fail "job $id ended $state with exit code $exit_code, expected COMPLETED 0:0"
    fi
}
verify_checkpoint() {
    local dir="$1" steps="$2" out
    out="$("$bin" info "$dir" --verify 2>&1)" || fail "rwkvpipe info $dir --verify failed: $out"
    grep -q "verified" <<<"$out" || fail "rwkvpipe info $dir --verify did not verify: $out"
    [ "$(cat "$dir/latest")" = "$(printf 'step-%08d' "$steps")" ] ||
        fail "$dir/latest is $(cat "$dir/latest"), expected step $steps"
}

final_loss() { sed -n 's/.*done: .* final loss \([0-9.]*\),.*/\1/p' "$1" | tail -n 1; }
# check_resumes LOG CKPT: every "stopped ... after step N" is followed by a
# requeued run that "resumed from CKPT/step-N"; prints the stop steps.
check_resumes() {
    local log="$1" ckpt="$2" stops resumes
    stops="$(sed -n 's/.*stopped by signal 10 .* after step \([0-9]*\); checkpoint in .*/\1/p' "$log" |
        paste -sd ' ')"
    resumes="$(sed -n "s|^resumed from $ckpt/step-0*\([0-9][0-9]*\) at step .*|\1|p" "$log" |
        paste -sd ' ')"
    [ -n "$stops" ] || fail "$log: no 'stopped by signal 10 ... after step N; checkpoint in' line"
    [ "$stops" = "$resumes" ] ||
        fail "$log: the runs stopped after steps [$stops] but resumed from [$resumes] ($ckpt/step-N)"
    echo "$stops"
}

# 1. A complete run: 2 ranks = 2 pipeline stages, 60 steps, a checkpoint every
# 5; its final loss is the reference for the interrupted runs below.
steps=60
small_model="--model-config L4-C64-V64 --log-interval 5"
say "job 1: a complete run (2 tasks, --pp 2, $steps steps)"
job1="$(CKPT_DIR="$tmp/ckpt-1" TRAIN_ARGS="$small_model --steps $steps" submit complete)"
wait_for 120 "job $job1 to finish" job_finished "$job1"
log1="$tmp/job-complete-$job1.log"
expect_completed "$job1"
expect_in_log "$log1" "^train.sbatch: job $job1 \(restart 0\) on 1 node\(s\) \[$host\], 2 tasks" "job 1 start line"
expect_in_log "$log1" "grid: 2 ranks = 2 pipeline stages x 1 data replica" "job 1 rank map"
expect_in_log "$log1" "rank +0 +stage +0 +layers" "job 1 rank map"
expect_in_log "$log1" "rank +1 +stage +1 +layers" "job 1 rank map"
expect_in_log "$log1" "^step $steps/$steps " "job 1 steps"
expect_in_log "$log1" "training finished" "job 1 end"
verify_checkpoint "$tmp/ckpt-1" "$steps"
reference_loss="$(final_loss "$log1")"
[ -n "$reference_loss" ] || fail "job 1: no final loss in $log1"
say "job 1 ($(sed -n 's/.*launcher \([^,]*\),.*/\1/p' "$log1" | head -n 1)): COMPLETED, exit 0," \
    "rank map and $steps steps logged, checkpoint step $steps verifies, final loss $reference_loss"

# 2. Preemption: SIGUSR1 to the batch shell once a checkpoint exists -> the
# ranks checkpoint and exit 75 -> the script requeues the job -> the requeued
# run resumes from that checkpoint and finishes with the same final loss as
# the uninterrupted job 1 (resuming is exact).
preempt_test() {
    local label="$1" launcher="$2" id log stopped loss
    local ckpt="$tmp/ckpt-$label"
    say "job $label: preemption with LAUNCHER=$launcher (2 tasks, --pp 2, $steps steps)"
    id="$(LAUNCHER="$launcher" CKPT_DIR="$ckpt" TRAIN_ARGS="$small_model --steps $steps" \
        submit "$label")"
    wait_for 60 "job $id's first checkpoint" test -f "$ckpt/latest"
    scancel --batch --signal=USR1 "$id"
    say "job $label ($id): has $(cat "$ckpt/latest"); sent SIGUSR1 to its batch shell"
    log="$tmp/job-$label-$id.log"
    wait_for 60 "job $id to be requeued" grep -qs "requeueing job $id" "$log"
    wait_for 120 "requeued job $id to finish" job_finished "$id"
    expect_completed "$id"
    [ "$(job_field "$id" Restarts)" = 1 ] ||
        fail "job $id: Restarts=$(job_field "$id" Restarts), expected 1"
    expect_in_log "$log" "^train.sbatch: SIGUSR1: asking the ranks to checkpoint" "job $id signal"
    expect_in_log "$log" "stopped with status 75; checkpoint step-[0-9]+; requeueing job $id" "job $id exit 75"
    expect_in_log "$log" "^train.sbatch: job $id \(restart 1\)" "job $id requeued run"
    stopped="$(check_resumes "$log" "$ckpt")"
    expect_in_log "$log" "^checkpoint $ckpt/step-0*$stopped( |$)" "job $id checkpoint at the stop"
    expect_in_log "$log" "^step $steps/$steps " "job $id steps"
    expect_in_log "$log" "training finished" "job $id end"
    verify_checkpoint "$ckpt" "$steps"
    loss="$(final_loss "$log")"
    [ "$loss" = "$reference_loss" ] ||
        fail "job $id ended with final loss '$loss', the uninterrupted job 1 with $reference_loss"
    say "job $label ($id): checkpoint at the stop (step $stopped), exit 75, requeued," \
        "resumed from step-$(printf '%08d' "$stopped"), COMPLETED at step $steps," \
        "checkpoint verifies, final loss $loss as job 1"
}
preempt_test preempt-srun auto
preempt_test preempt-mpirun mpirun

# 3. The time limit: the template's own mechanism, --signal=B:USR1@SECONDS,
# here with a 1-minute limit and the warning 20 s before it (Slurm checks
# every 30 s, so it may come well before that); the run is longer than
# the whole limit (70 s at job 1's speed), so it is stopped and requeued
# until it is done, never killed.
job1_s="$(sed -n 's/.*done: [0-9]* steps in \([0-9.]*\) s;.*/\1/p' "$log1" | tail -n 1)"
tl_steps="$(awk -v s="${job1_s:-20}" -v n="$steps" 'BEGIN { t = int(n / s * 70) + 1; print (t < 150 ? 150 : t) }')"
ckpt="$tmp/ckpt-timelimit"
say "job timelimit: --time=1 --signal=B:USR1@20, $tl_steps steps (stopped and requeued at each warning)"
id="$(CKPT_DIR="$ckpt" TRAIN_ARGS="$small_model --steps $tl_steps" \
    submit timelimit --time=1 --signal=B:USR1@20)"
wait_for 150 "job $id to finish" job_finished "$id"
log="$tmp/job-timelimit-$id.log"
expect_completed "$id"
restarts="$(job_field "$id" Restarts)"
[ "${restarts:-0}" -ge 1 ] || fail "job $id: Restarts=$restarts; the time-limit warning never stopped it"
stops="$(check_resumes "$log" "$ckpt")"
[ "$(wc -w <<<"$stops")" = "$restarts" ] ||
    fail "job $id: $restarts restarts but stops after steps [$stops]"
expect_in_log "$log" "^step $tl_steps/$tl_steps " "job $id steps"
verify_checkpoint "$ckpt" "$tl_steps"
say "job timelimit ($id): stopped by the time-limit warning after steps [$stops], requeued" \
    "$restarts time(s), resumed each time, COMPLETED at step $tl_steps, checkpoint verifies"

# 4. serve.sbatch: the HTTP server on 2 stages; a completion over loopback,
# then scancel stops it gracefully (exit 0).
"$bin" init --model-config L4-C64-V256 -o "$tmp/serve-model.st" >/dev/null 2>&1 ||
    fail "rwkvpipe init for the serve job"
port=$((20000 + RANDOM % 20000))
say "job serve: launch/serve.sbatch, 2 tasks, --pp 2, port $port"
id="$(MODEL="$tmp/serve-model.st" PORT="$port" sbatch --parsable --job-name=serve --chdir="$tmp" \
    --output="$tmp/job-serve-%j.log" --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=5 \
    "$root/launch/serve.sbatch" | cut -d';' -f1)"
log="$tmp/job-serve-$id.log"
wait_for 60 "job $id's server to listen" grep -qs "listening on http://127.0.0.1:$port" "$log"
reply="$(curl -s -m 30 "http://127.0.0.1:$port/v1/completions" \
    -d '{"prompt": "hello", "max_tokens": 8, "temperature": 0}')" ||
    fail "job $id: the completion request failed"
grep -q '"finish_reason": *"length"' <<<"$reply" || fail "job $id: unexpected reply: $reply"
grep -q '"completion_tokens": *8' <<<"$reply" || fail "job $id: usage is wrong: $reply"
scancel "$id"
wait_for 60 "job $id to stop" job_finished "$id"
expect_in_log "$log" "^serve.sbatch: SIGTERM: stopping the server" "job $id stop"
expect_in_log "$log" "^serve.sbatch: the server exited with status 0" "job $id clean exit"
say "job serve ($id): listened on port $port with 2 stages, answered a completion, stopped" \
    "cleanly on scancel"

failed=0
say "PASS ($SECONDS s)"
