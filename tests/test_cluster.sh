#!/bin/bash
# Pipelined jobs across nodes, on a cluster of network namespaces on this
# machine (tests/cluster/cluster.sh; docs/cluster.md, "testing a cluster on
# one machine"): Open MPI over TCP between rpnode1..N gives bit for bit what
# the same layout gives on one host; the start-up lines name the nodes; a
# node killed, a link down, a link down for half a second each end the job
# or leave it unchanged as docs/cluster.md's failure table says.
# Needs root and network namespaces (else exit 77 with the reason). Run by
# launch/check after the one-host suite, or `make check TESTS=tests/test_cluster.sh`
# (env: top_srcdir, top_builddir, MPIRUN, PYTHON3; defaults: this tree, build/cpu).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
. "$top_srcdir/tests/cluster/test_lib.sh"
cluster_test_require
T=$(mktemp -d "${TMPDIR:-/tmp}/test_cluster.XXXXXX") || exit 99
chmod 755 "$T"
JOB=""
export RP_CLUSTER_OWNER=$$
cleanup() {
    [ -n "$JOB" ] && kill -9 "$JOB" 2>/dev/null
    "$C" stop
    rm -rf "$T"
}
trap cleanup EXIT

. "$top_srcdir/tests/check_report.sh"

# one_host NP ARGS...: what mpi (tests/cluster/test_lib.sh) runs, on this machine's own network (shared memory).
one_host() {
    local np=$1
    shift
    timeout 300 "$MPIRUN" -np "$np" "$@" >"$T/stdout" 2>"$T/stderr"
}

# same_bits NAME: losses (as printed) and weights of NAME equal ref_NAME's exactly.
same_bits() {
    "$PYTHON3" - "$T/ref_$1.jsonl" "$T/$1.jsonl" <<'PY' || fail "$1: losses differ from one host"
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
assert len(a) == len(b) > 0, (len(a), len(b))
assert a == b, [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y][:3]
PY
    "$PYTHON3" "$COMPARE" "$T/ref_$1.st" "$T/$1.st" >"$T/cmp" 2>&1 ||
        { cat "$T/cmp"; fail "$1: final weights differ from one host"; }
}

veth_bytes() {
    echo $(($(cat "/sys/class/net/rpveth$1/statistics/rx_bytes") +
        $(cat "/sys/class/net/rpveth$1/statistics/tx_bytes")))
}

TRAIN=(train --model-config L4-C64-V64 --data mqar --ctx-len 16 --batch 8 --warmup 2 --lr 3e-3
       --eval-interval 0 --eval-batches 1 --log-interval 1 --loss-on all --seed 3 --init-seed 5
       --threads 1)

check "2 nodes: mpirun -np 2 hostname runs one rank on each node"
start_cluster 2
mpi 2 hostname || fail "mpirun hostname across the nodes"
[ "$(sort "$T/stdout" | tr '\n' ' ')" = "rpnode1 rpnode2 " ] ||
    fail "hostnames: '$(tr '\n' ' ' <"$T/stdout")', expected rpnode1 and rpnode2"
ok "$(tr '\n' ' ' <"$T/stdout")"

check "train --pp 2 across 2 nodes (TCP over veth) = on one host, bit for bit; start-up lines name the nodes"
one_host 2 "$BIN" "${TRAIN[@]}" --steps 10 --pp 2 --micro-batch 2 --metrics "$T/ref_pp2.jsonl" \
    -o "$T/ref_pp2.st" || fail "one host: train --pp 2"
before=$(veth_bytes 2)
mpi 2 "$BIN" "${TRAIN[@]}" --steps 10 --pp 2 --micro-batch 2 --metrics "$T/pp2.jsonl" \
    -o "$T/pp2.st" || fail "2 nodes: train --pp 2"
moved=$(($(veth_bytes 2) - before))
same_bits pp2
grep -q "rank 0/2 on rpnode1 .*stage 0" "$T/stderr" || fail "no start-up line of rank 0 naming rpnode1"
grep -q "rank 1/2 on rpnode2 .*stage 1" "$T/stderr" || fail "no start-up line of rank 1 naming rpnode2"
grep -q "host rpnode2 *rank *1 *stage *1" "$T/stderr" || fail "the rank map does not show stage 1 on rpnode2"
# 10 steps x 4 micro-batches x 2 x 16 x 64 floats each way is 640 KiB.
[ "$moved" -gt 600000 ] || fail "only $moved bytes crossed rpnode2's veth"
ok "10 steps: same losses and weights; $moved bytes over rpnode2's link"

check "logits --pp 2 across 2 nodes = one process, bit for bit"
MODEL="$top_srcdir/tests/data/tiny_L2_C128_V256_s1.weights.safetensors"
TOKENS=5,17,200,3,99,42,7,250,1,64
"$BIN" logits --model "$MODEL" --tokens $TOKENS --threads 1 -o "$T/logits1.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "one process: logits"
mpi 2 "$BIN" logits --pp 2 --model "$MODEL" --tokens $TOKENS --threads 1 -o "$T/logits2.st" ||
    fail "2 nodes: logits --pp 2"
"$PYTHON3" "$COMPARE" "$T/logits1.st" "$T/logits2.st" >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "logits --pp 2 across nodes differ from one process"; }
ok

# Failure detection as a cluster would tune it (tests/cluster/test_lib.sh).
fast_tcp_failure 2

# nodes_idle: waits (up to 30 s) until no MPI daemon or rank of an earlier
# job is left on nodes 1 and 2: a daemon still tearing down after a fault
# can make the next job's start fail ("ORTE daemon failed to start").
nodes_idle() {
    local i n p busy
    for ((i = 0; i < 300; i++)); do
        busy=0
        for n in 1 2; do
            for p in $("$C" pids $n); do
                case "$(cat "/proc/$p/comm" 2>/dev/null)" in orted|rwkvpipe|mpirun) busy=1 ;; esac
            done
        done
        [ $busy -eq 0 ] && return 0
        sleep 0.1
    done
    fail "processes of an earlier job are still on the nodes 30 s after it ended"
}

# start_job ARGS...: train in the background on the cluster; waits for step 5.
start_job() {
    nodes_idle
    rm -f "$T/stderr" "$T/rc"
    (mpi 2 "$BIN" "${TRAIN[@]}" --pp 2 --micro-batch 2 "$@"; echo $? >"$T/rc") &
    JOB=$!
    for ((i = 0; i < 1200; i++)); do grep -qs "^step 5/" "$T/stderr" && return 0; sleep 0.1; done
    fail "the job did not reach step 5 within 120 s"
}

# ends_within S: the job ended within S seconds, non-zero, and no rwkvpipe
# process is left on any node; sets rc and took.
ends_within() {
    local i start
    start=$(date +%s)
    for ((i = 0; i < $1 * 10; i++)); do [ -s "$T/rc" ] && break; sleep 0.1; done
    took=$(($(date +%s) - start))
    [ -s "$T/rc" ] || { "$C" link 2 up; fail "the job still runs $1 s after the fault"; }
    wait "$JOB"
    JOB=""
    rc=$(cat "$T/rc")
    [ "$rc" -ne 0 ] || fail "mpirun exited 0 after the fault"
    for n in 1 2; do
        for p in $("$C" pids $n); do
            [ "$(cat "/proc/$p/comm" 2>/dev/null)" = rwkvpipe ] && fail "rwkvpipe pid $p still runs on rpnode$n"
        done
    done
    return 0
}

check "a link down for half a second mid-run: TCP retransmits, the job finishes with unchanged results"
one_host 2 "$BIN" "${TRAIN[@]}" --steps 300 --pp 2 --micro-batch 2 --metrics "$T/ref_blip.jsonl" \
    -o "$T/ref_blip.st" || fail "one host: 300 steps"
start_job --steps 300 --comm-timeout 20 --metrics "$T/blip.jsonl" -o "$T/blip.st"
"$C" link 2 down
sleep 0.5
"$C" link 2 up
[ -s "$T/rc" ] && fail "the job ended before the link came back (too fast for the test: more steps)"
wait "$JOB"
JOB=""
[ "$(cat "$T/rc")" -eq 0 ] || fail "the job failed after a 0.5 s link outage"
same_bits blip
ok "300 steps, same losses and weights as on one host"

check "a link down mid-step: the watchdog (--comm-timeout 5) ends every rank, mpirun exits within 60 s"
start_job --steps 1000000 --comm-timeout 5
"$C" link 2 down
ends_within 60
"$C" link 2 up
# Rank 0 waits either for a transfer from stage 1 or for the step's loss.
grep -q "rank 0/2, stage 0\]: error: .*waited 5 s (--comm-timeout) \(to receive the .* of micro-batch [0-9]* from stage 1\|for the \)" "$T/stderr" ||
    fail "no watchdog message from rank 0 naming the transfer"
ok "exit status $rc after ${took} s: $(grep -m1 'comm-timeout' "$T/stderr" | sed 's/^.*error: //')"

check "rpnode2's processes SIGKILLed mid-run: every rank exits within 60 s; the last checkpoint verifies and resumes on rpnode1 with --pp 1"
start_job --steps 1000000 --comm-timeout 30 --checkpoint-interval 10 --checkpoint-dir "$T/ck"
for ((i = 0; i < 600; i++)); do [ -e "$T/ck/latest" ] && break; sleep 0.1; done
[ -e "$T/ck/latest" ] || fail "no checkpoint within 60 s"
"$C" kill 2 KILL
ends_within 60
cp "$T/stderr" "$T/kill.err"
grep -q -i "rpnode2\|lost communication\|stage 1\|killed" "$T/kill.err" ||
    fail "no message names the lost node or stage"
"$BIN" info "$T/ck" --verify >"$T/stdout" 2>"$T/stderr" || fail "the last checkpoint does not verify"
last=$(sed -n 's/^step-0*//p' "$T/ck/latest")
"$C" exec 1 "$BIN" "${TRAIN[@]}" --micro-batch 2 --steps $((last + 2)) --resume "$T/ck" \
    >"$T/stdout" 2>"$T/stderr" || fail "resume on rpnode1 alone"
grep -q "resumed from .* at step $last " "$T/stderr" || fail "the run did not resume from step $last"
ok "exit status $rc after ${took} s; $(cat "$T/ck/latest") verifies and resumes on one node"
grep -v "^step \|^checkpoint " "$T/kill.err" | tail -n 12 | sed 's/^/    /'

check "4 nodes: train --pp 2 x 2 replicas = one host bit for bit and one process within 1e-5; logits --pp 4 = one process, bit for bit"
start_cluster 4
one_host 4 "$BIN" "${TRAIN[@]}" --steps 5 --pp 2 --micro-batch 2 --metrics "$T/ref_dp.jsonl" \
    -o "$T/ref_dp.st" || fail "one host: train --pp 2 -np 4"
mpi 4 "$BIN" "${TRAIN[@]}" --steps 5 --pp 2 --micro-batch 2 --metrics "$T/dp.jsonl" \
    -o "$T/dp.st" || fail "4 nodes: train --pp 2 -np 4"
same_bits dp
for n in 1 2 3 4; do
    grep -q "rank $((n - 1))/4 on rpnode$n " "$T/stderr" || fail "no start-up line of rank $((n - 1)) on rpnode$n"
done
# and = ONE process (no pipeline, no replicas) within test_pipeline.sh's 1e-5
"$BIN" "${TRAIN[@]}" --steps 5 --micro-batch 2 --metrics "$T/ref1_dp.jsonl" -o "$T/ref1_dp.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "one process: train"
"$PYTHON3" - "$T/ref1_dp.jsonl" "$T/dp.jsonl" <<'PY' || fail "4 nodes: losses differ from one process"
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
assert len(a) == len(b) == 5, (len(a), len(b))
worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
print("  losses vs one process: max relative difference %.2e" % worst)
sys.exit(0 if worst <= 1e-5 else 1)
PY
"$PYTHON3" "$COMPARE" "$T/ref1_dp.st" "$T/dp.st" --tol 1e-5 >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "4 nodes: final weights differ from one process beyond 1e-5"; }
"$BIN" init --model-config L4-C64-V64 --seed 5 -o "$T/m4.st" >"$T/stdout" 2>"$T/stderr" || fail "init"
"$BIN" logits --model "$T/m4.st" --tokens 1,2,3,4,5,6,7,8 --threads 1 -o "$T/l4_1.st" \
    >"$T/stdout" 2>"$T/stderr" || fail "one process: logits of the 4-layer model"
mpi 4 "$BIN" logits --pp 4 --model "$T/m4.st" --tokens 1,2,3,4,5,6,7,8 --threads 1 -o "$T/l4_4.st" ||
    fail "4 nodes: logits --pp 4"
"$PYTHON3" "$COMPARE" "$T/l4_1.st" "$T/l4_4.st" >"$T/cmp" 2>&1 ||
    { cat "$T/cmp"; fail "logits --pp 4 across 4 nodes differ from one process"; }
ok

echo "all cluster checks passed"
