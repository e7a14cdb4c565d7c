#!/bin/bash
# The cross-node pipeline benchmark (docs/perf/pipeline.md, "Across nodes"):
# bench/bench_pipeline with 2 stages as 2 ranks on this host (shared memory)
# and as one rank on each of 2 namespace nodes (TCP over veth, the cluster of
# tests/cluster/cluster.sh), then one table: step time and ratio, bytes each
# stage sends per step (computed from the shape, and measured on rpnode2's
# veth), and from bench_pipeline's trace how long stage 1 waits for the
# activations of micro-batches 1..M-1 (about 0: they arrived while it computed
# the one before, the transfer overlaps compute). Needs root and namespaces.
# Not a test. usage: bench/cluster_pipeline.sh [bench_pipeline options]
# (defaults below; env: top_builddir, default build/cpu).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u
top_srcdir="$(cd "$(dirname "$0")/.." && pwd)"
: "${top_builddir:=$top_srcdir/build/cpu}"
. "$top_srcdir/tests/cluster/test_lib.sh"
cluster_test_require
BENCH="$(cd "$top_builddir" && pwd)/bench/bench_pipeline"
[ -x "$BENCH" ] || { echo "no $BENCH (make -C $top_builddir bench/bench_pipeline)"; exit 1; }
T=$(mktemp -d "${TMPDIR:-/tmp}/cluster_pipeline.XXXXXX") || exit 1
chmod 755 "$T"
export RP_CLUSTER_OWNER=$$
trap '"$C" stop; rm -rf "$T"' EXIT
fail() { echo "cluster_pipeline: $*" >&2; [ -s "$T/stderr" ] && tail -n 20 "$T/stderr" >&2; exit 1; }

MODEL=0.1b CTX=32 SEQS=1 M=4 STEPS=3
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--model-config "$MODEL" --ctx-len "$CTX" --micro-batch-seqs "$SEQS"
    --micro-batches "$M" --schedules 1f1b --steps "$STEPS" --warmup 1 --trace "$M")
opt() {  # opt NAME DEFAULT: the value of --NAME in ARGS
    local i
    for ((i = 0; i < ${#ARGS[@]} - 1; i++)); do
        [ "${ARGS[$i]}" = "--$1" ] && { echo "${ARGS[$((i + 1))]}"; return; }
    done
    echo "$2"
}
M="$(opt micro-batches 4)"
CTX="$(opt ctx-len 64)"
SEQS="$(opt micro-batch-seqs 4)"

echo "cluster_pipeline: one host, 2 ranks (shared memory)"
timeout 1200 "$MPIRUN" -np 2 "$BENCH" "${ARGS[@]}" >"$T/one.md" 2>"$T/stderr" || fail "one host"
"$C" stop
"$C" start 2 >/dev/null 2>"$T/stderr" || fail "cluster.sh start 2"
echo "cluster_pipeline: 2 namespace nodes, 1 rank each (TCP over veth)"
veth() { echo $(($(cat /sys/class/net/rpveth2/statistics/rx_bytes) + $(cat /sys/class/net/rpveth2/statistics/tx_bytes))); }
before=$(veth)
mpi_cmd 2 "$BENCH" "${ARGS[@]}" >"$T/two.md" 2>"$T/stderr" || fail "2 nodes"
moved=$(($(veth) - before))

"$PYTHON3" - "$T/one.md" "$T/two.md" "$moved" "$M" "$CTX" "$SEQS" <<'PY'
import re, sys
one, two, moved, M, T, S = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:])
C = int(re.search(r"\(L\d+ C(\d+) V", open(one).read()).group(1))

def parse(path):
    text = open(path).read()
    rows = [l for l in text.splitlines() if re.match(r"\| (gpipe|1f1b) \|", l)]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    steps = int(re.search(r"then (\d+) timed steps", text).group(1))
    warm = int(re.search(r"(\d+) warm-up steps", text).group(1))
    waits = []
    for line in text.splitlines():
        if line.startswith("- stage 1:"):
            for m, a, b in re.findall(r"RECV_ACT(\d+) ([0-9.]+)-([0-9.]+)", line):
                if int(m) >= 1: waits.append(float(b) - float(a))
    head = re.search(r"^## bench_pipeline: (.*)$", text, re.M).group(1)
    return dict(step=float(cells[2]), busy=cells[3], bubble=cells[5], waits=waits,
                steps=steps + warm, head=head)

a, b = parse(one), parse(two)
per_mb = S * T * C * 4            # one fp32 tensor of a micro-batch: S x T x C
sent = M * 2 * per_mb             # x + v_first forward (stage 0), dx + dv_first back (stage 1)
# Every case runs warm-up + timed steps, plus the trace step; the veth counts both ways.
runs = b["steps"] + 1
print(f"## {a['head']}\n")
print("| layout | step ms | ratio | busy ms per stage | bubble | sent per stage per step (computed) | measured on rpnode2's veth per step, both ways | stage 1's wait for the activations of micro-batches 1..M-1 (trace), ms |")
print("|---|---:|---:|---|---:|---:|---:|---|")
def w(x): return " / ".join(f"{v:.1f}" for v in x["waits"]) or "-"
print(f"| 2 ranks, one host (shared memory) | {a['step']:.1f} | 1.00 | {a['busy']} | {a['bubble']} | {sent/1024:.0f} KiB | - | {w(a)} |")
print(f"| 2 nodes (TCP over veth) | {b['step']:.1f} | {b['step']/a['step']:.2f} | {b['busy']} | {b['bubble']} | {sent/1024:.0f} KiB | {moved/runs/1024:.0f} KiB | {w(b)} |")
print(f"\nper micro-batch: x and v_first forward, dx and dv_first backward, {S} x {T} x {C} fp32 = {per_mb/1024:.0f} KiB each; "
      f"{M} micro-batches per step; measured = all bytes through rpnode2's veth / {runs} steps (incl. MPI headers, TCP/IP, ACKs)")
PY
