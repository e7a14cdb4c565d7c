# shellcheck shell=bash
# Sourced by tests/test_cluster_slurm.sh (after test_lib.sh): a multi-node
# Slurm on the namespace cluster (tests/cluster/cluster.sh). munged runs in
# the machine's own namespaces (its socket is a path, which every node's
# mount namespace sees), slurmctld on rpnode1 (the head node, at its address),
# one slurmd per node in that node's namespaces, so every job step runs with
# the node's hostname and network. Config, state, spool and logs live in $SL.
# After slurm_start: SLURM_CONF exported; sl CMD... runs a client command on
# rpnode1 (the only place from which slurmctld's address is reachable).

# shellcheck source=../slurm/conf_common.sh
. "$top_srcdir/tests/slurm/conf_common.sh"

SL_PIDS=()  # munged, slurmctld, slurmd... in start order (stopped in reverse)

sl() { "$C" exec 1 "$@"; }

# slurm_require: skips unless the Slurm daemons and MUNGE are installed.
slurm_require() {
    local cmd
    if ! "$top_srcdir/launch/deps-slurm" --check >/dev/null 2>&1; then
        "$top_srcdir/launch/deps-slurm" >/dev/null 2>&1 ||
            skip "Slurm and MUNGE are not installed and launch/deps-slurm cannot install them"
    fi
    for cmd in munged slurmctld slurmd sbatch squeue sinfo scontrol scancel srun; do
        command -v "$cmd" >/dev/null 2>&1 || skip "no '$cmd' command (launch/deps-slurm installs it)"
    done
}

# sl_wait SECONDS WHAT COMMAND...: polls COMMAND every half second.
sl_wait() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@"; do
        [ "$SECONDS" -ge "$deadline" ] && { sl_logs; fail "timed out after $limit s waiting for $what"; }
        sleep 0.5
    done
}

# sl_logs: the last lines of the daemons' logs (on a failure).
sl_logs() {
    local f
    for f in "$SL"/slurmctld.log "$SL"/slurmd-*.log "$SL"/munged.log; do
        [ -f "$f" ] || continue
        echo "---- $f"
        tail -n 15 "$f"
    done
}

# slurm_start N: the cluster's N nodes (started by the caller) join one Slurm.
slurm_start() {
    local n=$1 i cpus mem_mb key
    SL="$T/slurm"
    mkdir -p "$SL/state"
    chmod 755 "$SL"
    key="$SL/munge.key"
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    chmod 400 "$key"
    munged --foreground --force --key-file="$key" --socket="$SL/munge.socket" \
        --pid-file="$SL/munged.pid" --log-file="$SL/munged.log" \
        --seed-file="$SL/munged.seed" >"$SL/munged.out" 2>&1 &
    SL_PIDS+=($!)
    sl_wait 10 "munged's socket" test -S "$SL/munge.socket"
    cpus=$(nproc)
    mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / n))
    export SLURM_CONF="$SL/slurm.conf"
    mkdir -p "$SL/pmix"
    echo "PMIxCliTmpDirBase=$SL/pmix" >"$SL/mpi.conf"
    {
        cat <<EOF
# $n-node test cluster written by tests/cluster/slurm_lib.sh. %n is the node
# name: every slurmd has its own spool, pid file and log.
ClusterName=rpcluster
SlurmctldHost=rpnode1($(node_addr 1))
StateSaveLocation=$SL/state
SlurmdSpoolDir=$SL/spool-%n
SlurmctldPidFile=$SL/slurmctld.pid
SlurmdPidFile=$SL/slurmd-%n.pid
SlurmctldLogFile=$SL/slurmctld.log
SlurmdLogFile=$SL/slurmd-%n.log
# A node that stops answering is marked DOWN, and its jobs requeued, no sooner
# than 2/3 SlurmdTimeout after it died (see the node-death check in
# tests/test_cluster_slurm.sh): 120 keeps that past the check's 60 s, so the
# ranks' own exit is what it sees (30 raced it: DOWN 20-50 s after the kill).
SlurmdTimeout=120
EOF
        slurm_conf_common "$SL/munge.socket"
        for ((i = 1; i <= n; i++)); do
            echo "NodeName=rpnode$i NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        done
        echo "PartitionName=test Nodes=rpnode[1-$n] Default=YES MaxTime=30 State=UP"
    } >"$SLURM_CONF"
    for ((i = 1; i <= n; i++)); do
        mkdir -p "$SL/spool-rpnode$i" "$SL/pmix-rpnode$i"
        node_cgroups "$i"
        # PMIx's per-node client directory must differ per node, but the
        # nodes share /tmp and mpi.conf takes one path: the same path, with
        # each node's own directory bound over it in its mount namespace.
        "$C" exec "$i" mount --bind "$SL/pmix-rpnode$i" "$SL/pmix" ||
            fail "cannot bind $SL/pmix-rpnode$i over $SL/pmix in rpnode$i"
    done
    # cluster.sh exec ends in exec nsenter, which execs the daemon: $! is its pid.
    "$C" exec 1 slurmctld -D -c -f "$SLURM_CONF" >"$SL/slurmctld.out" 2>&1 &
    SL_PIDS+=($!)
    sl_wait 30 "slurmctld to answer" ctld_up
    for ((i = 1; i <= n; i++)); do
        "$C" exec "$i" slurmd -D -f "$SLURM_CONF" -N "rpnode$i" >"$SL/slurmd-rpnode$i.out" 2>&1 &
        SL_PIDS+=($!)
        # A test may kill a node (slurmd too): no "Killed" job report from bash.
        disown $!
    done
    sl_wait 60 "$n nodes to be idle" nodes_idle_slurm "$n"
}

# node_cgroups I: slurmd needs /sys/fs/cgroup, which `ip netns exec` hid
# under the node's own sysfs: mount there what is mounted here (the node's
# mount namespace is private, so the machine's mounts are not touched).
node_cgroups() {
    local mounts
    mounts="$(awk '$2 ~ /^\/sys\/fs\/cgroup/ { print $3, $4, $1, $2 }' /proc/self/mounts)"
    [ -n "$mounts" ] || return 0
    # shellcheck disable=SC2016 # expanded by the node's shell
    "$C" exec "$1" sh -c '
        mount | grep -q " /sys/fs/cgroup " && exit 0
        while read -r type opts src dir; do
            mkdir -p "$dir" && mount -t "$type" -o "$opts" "$src" "$dir" || exit 1
        done' sh <<<"$mounts" || fail "cannot mount the cgroup file systems in rpnode$1"
}

node_addr() { awk -v h="rpnode$1" '$2 == h { print $1 }' "${RP_CLUSTER_DIR:-/run/rwkvpipe-cluster}/hosts"; }
ctld_up() { sl scontrol ping 2>/dev/null | grep -q "is UP"; }
nodes_idle_slurm() {
    [ "$(sl sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" -eq "$1" ]
}

# slurm_stop: jobs first (no slurmstepd outlives its slurmd), then the daemons by pid.
slurm_stop() {
    local i pid ids
    [ ${#SL_PIDS[@]} -eq 0 ] && return 0
    if [ ${#SL_PIDS[@]} -gt 1 ]; then
        ids="$(sl squeue -h -o %i 2>/dev/null || true)"
        if [ -n "$ids" ]; then
            # shellcheck disable=SC2086 # one argument per job id
            sl scancel --full $ids 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [ -z "$(sl squeue -h -o %i 2>/dev/null)" ] && break
                sleep 1
            done
        fi
    fi
    for ((i = ${#SL_PIDS[@]} - 1; i >= 0; i--)); do
        pid="${SL_PIDS[$i]}"
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    SL_PIDS=()
}

# Job helpers (the test's job ids are slurmctld's).
job_field() { sl scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
job_finished() {
    case "$(job_field "$1" JobState)" in
        COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) return 0 ;;
    esac
    return 1
}
