#!/usr/bin/env bash
# A small cluster on this machine for the multi-node tests (docs/cluster.md,
# "testing a cluster on one machine"): N nodes, each a network namespace with
# its own hostname (rpnode1...) and hosts file, joined by veth pairs on a
# bridge in a private subnet. Needs root. Run `cluster.sh --help` for usage.
set -euo pipefail

STATE="${RP_CLUSTER_DIR:-/run/rwkvpipe-cluster}"
BRIDGE=rpbr0
PREFIX=rpnode  # node names, network namespace names and hostnames
VETH=rpveth    # root-side veth of node i: rpveth<i>; inside the node it is eth0

usage() {
    cat <<'EOF'
usage: tests/cluster/cluster.sh COMMAND [ARGS]
  start N           start N nodes (2-4): rpnode1..rpnodeN, a bridge, a subnet
  stop              stop every process in the nodes, delete namespaces, links, bridge
  status            nodes, addresses, link states, processes; exit 1 if none runs
  exec NODE CMD...  run CMD inside NODE (its network, hostname and hosts file),
                    in the current directory; NODE is 1..N or rpnodeI
  kill NODE [SIG]   send SIG (default KILL) to every process in NODE but its holder
  pids NODE         the pids of the processes in NODE but its holder
  link NODE up|down set NODE's veth (the root-side end) up or down
  hostfile          print the path of an Open MPI hostfile (one slot per node)
  subnet            print the subnet (CIDR), for btl_tcp_if_include
Environment: RP_CLUSTER_DIR (state, default /run/rwkvpipe-cluster). One
cluster at a time: start refuses while another one runs.
EOF
}

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

# node_index NODE: 1..N from "2" or "rpnode2"; dies on anything else.
node_index() {
    local i="${1#"$PREFIX"}"
    [[ "$i" =~ ^[1-9][0-9]*$ ]] || die "no such node '$1' (use 1..N or ${PREFIX}I)"
    [ -f "$STATE/$PREFIX$i.pid" ] || die "node '$1' is not running (cluster.sh status)"
    echo "$i"
}

holder_pid() {
    cat "$STATE/$PREFIX$1.pid"
}

# node_pids I: every process whose UTS namespace is node I's, but the holder.
# The UTS namespace (not the network one) identifies them: a process that
# nsenter put in the node has both, and nothing else on the machine has it.
node_pids() {
    local holder uts p
    holder="$(holder_pid "$1")"
    uts="$(readlink "/proc/$holder/ns/uts" 2>/dev/null)" || return 0
    # One find for all processes (a readlink per process took a minute on a
    # busy machine).
    find /proc -mindepth 3 -maxdepth 3 -path '/proc/[0-9]*/ns/uts' -printf '%h %l\n' 2>/dev/null |
        awk -v uts="$uts" -v holder="$holder" '$2 == uts { split($1, d, "/"); if (d[3] != holder) print d[3] }'
    return 0
}

# pick_subnet: the first of a few private /24s that no address or route here uses.
pick_subnet() {
    local used net
    used="$(ip -4 addr show; ip -4 route show)"
    for net in 10.213.77 10.213.78 172.31.213 198.18.213; do
        if ! grep -q -F " $net." <<<"$used"; then
            echo "$net"
            return 0
        fi
    done
    die "every candidate test subnet is in use here (10.213.77/78, 172.31.213, 198.18.213)"
}

cmd_start() {
    local n="${1:-}" i net pid
    [[ "$n" =~ ^[2-9]$ ]] || die "start needs a node count from 2 to 9, not '${n}'"
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, veth, bridge)"
    mkdir -p "$(dirname "$STATE")"
    # mkdir is atomic: the one that creates the directory owns the cluster.
    if ! mkdir "$STATE" 2>/dev/null; then
        local owner
        owner="$(cat "$STATE/owner" 2>/dev/null || true)"
        if [ -n "$owner" ] && kill -0 "$owner" 2>/dev/null; then
            die "a cluster is already running (state $STATE, started by pid $owner); stop it first"
        fi
        echo "cluster.sh: removing a stale cluster left by pid ${owner:-?}" >&2
        cmd_stop
        mkdir "$STATE" || die "cannot create $STATE"
    fi
    echo "${RP_CLUSTER_OWNER:-$PPID}" >"$STATE/owner"
    net="$(pick_subnet)"
    echo "$net.0/24" >"$STATE/subnet"
    echo "$n" >"$STATE/nodes"
    # If anything below fails (set -e or die), undo what was made.
    started=0
    trap 'if [ "$started" = 0 ]; then cmd_stop >/dev/null 2>&1; fi' EXIT

    {
        echo "127.0.0.1 localhost"
        for ((i = 1; i <= n; i++)); do echo "$net.$((10 + i)) $PREFIX$i"; done
    } >"$STATE/hosts"
    : >"$STATE/hostfile"
    for ((i = 1; i <= n; i++)); do echo "$PREFIX$i slots=1" >>"$STATE/hostfile"; done

    ip link add "$BRIDGE" type bridge
    echo "$BRIDGE" >>"$STATE/links"
    ip link set "$BRIDGE" up
    for ((i = 1; i <= n; i++)); do
        ip netns add "$PREFIX$i"
        echo "$PREFIX$i" >>"$STATE/netns"
        ip link add "$VETH$i" type veth peer name "${VETH}p$i"
        echo "$VETH$i" >>"$STATE/links"
        ip link set "${VETH}p$i" netns "$PREFIX$i"
        ip -n "$PREFIX$i" link set "${VETH}p$i" name eth0
        ip -n "$PREFIX$i" addr add "$net.$((10 + i))/24" dev eth0
        ip -n "$PREFIX$i" link set eth0 up
        ip -n "$PREFIX$i" link set lo up
        ip link set "$VETH$i" master "$BRIDGE"
        ip link set "$VETH$i" up
        # The holder keeps the node's UTS and mount namespaces (hostname,
        # /etc/hosts bound over by the private hosts file) alive for nsenter.
        # ip netns exec, unshare and sh all exec, so $! is the sleep itself.
        setsid ip netns exec "$PREFIX$i" unshare --uts --mount --propagation private -- \
            sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec sleep infinity' \
            sh "$PREFIX$i" "$STATE/hosts" </dev/null >/dev/null 2>&1 &
        pid=$!
        echo "$pid" >"$STATE/$PREFIX$i.pid"
    done
    # Wait until every holder has its hostname, then until the nodes reach each other.
    for ((i = 1; i <= n; i++)); do
        pid="$(holder_pid "$i")"
        local tries=0
        until [ "$(nsenter -t "$pid" -u hostname 2>/dev/null)" = "$PREFIX$i" ]; do
            kill -0 "$pid" 2>/dev/null || die "the holder of $PREFIX$i exited at start"
            ((++tries > 100)) && die "$PREFIX$i did not get its hostname within 10 s"
            sleep 0.1
        done
    done
    for ((i = 2; i <= n; i++)); do
        local tries=0
        until reaches 1 "$PREFIX$i"; do
            ((++tries > 10)) && die "${PREFIX}1 cannot reach $PREFIX$i over $BRIDGE"
        done
    done
    started=1
    echo "cluster.sh: $n nodes ${PREFIX}1..$PREFIX$n in $net.0/24 on bridge $BRIDGE (state $STATE)"
}

# reaches I HOST: node I gets an answer from HOST over TCP. No ping here: a
# connection to the closed discard port is refused at once when HOST answers
# and times out when it does not.
reaches() {
    local out
    out="$(exec_in "$1" timeout 2 bash -c "exec 3<>/dev/tcp/$2/9" 2>&1)" && return 0
    grep -q 'refused' <<<"$out"
}

cmd_stop() {
    local i n pid p tries
    [ -d "$STATE" ] || return 0
    n="$(cat "$STATE/nodes" 2>/dev/null || echo 0)"
    # The processes in the nodes first (SIGTERM, then SIGKILL), then the holders.
    for sig in TERM KILL; do
        for ((i = 1; i <= n; i++)); do
            [ -f "$STATE/$PREFIX$i.pid" ] || continue
            for p in $(node_pids "$i"); do kill "-$sig" "$p" 2>/dev/null || true; done
        done
        [ "$sig" = TERM ] && sleep 0.5
    done
    for ((i = 1; i <= n; i++)); do
        [ -f "$STATE/$PREFIX$i.pid" ] || continue
        pid="$(holder_pid "$i")"
        # Only a sleep in the node's namespace is ours to kill (pids are reused).
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = sleep ]; then
            kill -KILL "$pid" 2>/dev/null || true
            tries=0
            while kill -0 "$pid" 2>/dev/null && ((tries++ < 50)); do sleep 0.1; done
        fi
    done
    if [ -f "$STATE/links" ]; then
        while read -r p; do ip link del "$p" 2>/dev/null || true; done <"$STATE/links"
    fi
    if [ -f "$STATE/netns" ]; then
        while read -r p; do ip netns del "$p" 2>/dev/null || true; done <"$STATE/netns"
    fi
    rm -rf "$STATE"
}

cmd_status() {
    local n i pid
    [ -d "$STATE" ] || { echo "no cluster (state $STATE)"; return 1; }
    n="$(cat "$STATE/nodes")"
    echo "cluster: $n nodes, subnet $(cat "$STATE/subnet"), bridge $BRIDGE, owner pid $(cat "$STATE/owner")"
    for ((i = 1; i <= n; i++)); do
        pid="$(holder_pid "$i")"
        printf '  %s  holder %s %s  %s  veth %s %s  processes: %s\n' "$PREFIX$i" "$pid" \
            "$(kill -0 "$pid" 2>/dev/null && echo alive || echo DEAD)" \
            "$(grep " $PREFIX$i\$" "$STATE/hosts" | cut -d' ' -f1)" "$VETH$i" \
            "$(cat "/sys/class/net/$VETH$i/operstate" 2>/dev/null || echo missing)" \
            "$(node_pids "$i" | wc -l)"
    done
}

# cmd_exec NODE CMD...: nsenter joins the node's network, UTS and mount
# namespaces; the mount namespace is a copy of this one, so the same paths exist.
cmd_exec() {
    local i
    i="$(node_index "$1")"
    shift
    [ $# -gt 0 ] || die "exec needs a command"
    exec_in "$i" "$@"
}

exec_in() {
    local i="$1"
    shift
    exec nsenter -t "$(holder_pid "$i")" -n -u -m --wd="$PWD" -- "$@"
}

case "${1:-}" in
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    exec) shift; [ $# -gt 0 ] || die "exec needs a node"; i="$(node_index "$1")"; shift
          [ $# -gt 0 ] || die "exec needs a command"; exec_in "$i" "$@" ;;
    kill) i="$(node_index "${2:-}")"
          for p in $(node_pids "$i"); do kill "-${3:-KILL}" "$p" 2>/dev/null || true; done ;;
    pids) node_pids "$(node_index "${2:-}")" ;;
    link) i="$(node_index "${2:-}")"
          case "${3:-}" in
              down) ip link set "$VETH$i" down ;;
              # Returns once the node answers again, so a job started right
              # after finds its daemons' connections working.
              up) ip link set "$VETH$i" up
                  other=1; [ "$i" = 1 ] && other=2
                  tries=0
                  until reaches "$other" "$PREFIX$i"; do
                      ((++tries > 20)) && die "$PREFIX$i is not reachable 10 s after its link came up"
                      sleep 0.5
                  done ;;
              *) die "link needs up or down" ;;
          esac ;;
    hostfile) [ -f "$STATE/hostfile" ] || die "no cluster"; echo "$STATE/hostfile" ;;
    subnet) [ -f "$STATE/subnet" ] || die "no cluster"; cat "$STATE/subnet" ;;
    -h|--help) usage ;;
    *) usage >&2; exit 2 ;;
esac
