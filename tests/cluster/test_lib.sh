# Sourced by the cluster tests (tests/test_cluster.sh, tests/test_cluster_serve.sh):
# the environment they share, and the checks that end a test with exit 77
# and the reason when this machine cannot build the namespace cluster.
# After it: BIN, C (cluster.sh), AGENT (rsh-agent), COMPARE (st_compare.py),
# mpi_cmd and mpi.

: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${top_builddir:=$top_srcdir/build/cpu}"
: "${PYTHON3:=python3}"
: "${MPIRUN:=mpirun}"
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1

skip() {
    echo "skip: $*"
    exit 77
}

# cluster_test_require [COMMAND...]: skips unless mpirun, the extra commands,
# root, network namespaces and UTS/mount namespaces are all available.
cluster_test_require() {
    local tool probe out
    command -v "$MPIRUN" >/dev/null 2>&1 || skip "no mpirun"
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || skip "no '$tool' command (launch/deps installs it)"
    done
    [ "$(id -u)" -eq 0 ] || skip "not root: the cluster needs network namespaces, veth and a bridge"
    for tool in ip nsenter unshare setsid; do
        command -v "$tool" >/dev/null 2>&1 || skip "no '$tool' command (iproute2 / util-linux)"
    done
    probe="rpprobe$$"
    if ! out="$(ip netns add "$probe" 2>&1)"; then
        skip "this machine forbids network namespaces: ip netns add: $out"
    fi
    ip netns del "$probe"
    if ! out="$(unshare --uts --mount --propagation private true 2>&1)"; then
        skip "this machine forbids UTS or mount namespaces: unshare: $out"
    fi
    BIN="$(cd "$top_builddir" && pwd)/rwkvpipe"
    [ -x "$BIN" ] || { echo "FAIL: no rwkvpipe at $BIN"; exit 1; }
    C="$top_srcdir/tests/cluster/cluster.sh"
    AGENT="$top_srcdir/tests/cluster/rsh-agent"
    COMPARE="$top_srcdir/tests/st_compare.py"
}

# mpi_cmd NP ARGS...: mpirun on rpnode1 over every node of the cluster, TCP
# only, restricted to the test subnet; output to the caller's.
mpi_cmd() {
    local np=$1 subnet
    shift
    subnet="$("$C" subnet)"
    # Every node sees the machine's cores and Open MPI binds each node's first
    # rank to core 0: on namespace nodes they would all share one core (2.1x
    # slower steps in bench/cluster_pipeline.sh). --bind-to none lets the
    # kernel spread them, as separate machines would.
    # Remote ranks get a fresh environment (as over ssh): pass what the tests set.
    local pass=(-x OPENBLAS_CORETYPE) v
    for v in ASAN_OPTIONS UBSAN_OPTIONS; do [ -n "${!v:-}" ] && pass+=(-x "$v"); done
    "$C" exec 1 timeout 300 "$MPIRUN" -np "$np" --hostfile "$("$C" hostfile)" \
        --bind-to none --mca plm_rsh_agent "$AGENT" --mca btl tcp,self \
        --mca btl_tcp_if_include "$subnet" --mca oob_tcp_if_include "$subnet" \
        --mca oob_tcp_keepalive_time 5 --mca oob_tcp_keepalive_intvl 2 \
        --mca oob_tcp_keepalive_probes 3 "${pass[@]}" "$@"
}

# mpi NP ARGS...: mpi_cmd with stdout and stderr in $T/stdout, $T/stderr.
mpi() { mpi_cmd "$@" >"$T/stdout" 2>"$T/stderr"; }

# start_cluster N: a fresh N-node cluster; waits (up to 10 min) while another
# test's cluster runs. Needs fail (tests/check_report.sh) and $T.
start_cluster() {
    local i
    "$C" stop
    for ((i = 0; i < 120; i++)); do
        "$C" start "$1" >"$T/stdout" 2>"$T/stderr" && return 0
        grep -q "already running" "$T/stderr" || fail "cluster.sh start $1"
        sleep 5
    done
    fail "another cluster ran for 10 minutes (cluster.sh status)"
}

# fast_tcp_failure N: failure detection as a cluster would tune it: TCP on
# nodes 1..N gives up on unanswered data after ~13 s instead of ~15 min
# (net.ipv4.tcp_retries2 is per network namespace), so MPI notices a node
# that vanished.
fast_tcp_failure() {
    local i
    for ((i = 1; i <= $1; i++)); do
        "$C" exec $i sysctl -q -w net.ipv4.tcp_retries2=5 || fail "sysctl tcp_retries2 in rpnode$i"
    done
}
