#!/bin/bash
# The analytic H100 model (bench/bench_gpu_model = bench_gpu --model-only,
# bench/gpu_model.c) without a GPU: its numbers must follow from the shapes
# in src/model/config.c. The weight floor is recomputed here from the
# parameter formula, the launches per decode token from rp_block_forward's op
# count (6 per layer with the fused decode ops and the LN prologue in the
# GEMVs at batch 1, layer 0 too, + embedding,
# ln0, ln_out, head, + the step-input copy; the head reads decode rows in
# place, no gather), the
# graph column at least one graph launch plus 1 us per node, the graph + PDL
# column between the bound and the graph and at least 0.5 us per node, and
# every predicted time must be at or above its bound (the WKV7 section's too).
# Run by make check.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u
: "${top_builddir:=.}"
prog="$top_builddir/bench/bench_gpu_model"
[ -x "$prog" ] || { echo "FAIL: $prog not built"; exit 1; }
command -v python3 >/dev/null || { echo "skip: no python3"; exit 77; }
out="$("$prog")" || { echo "FAIL: bench_gpu_model exited $?"; exit 1; }
echo "$out" | head -30
echo "$out" | python3 -c '
import re, sys
text = sys.stdin.read()
shapes = {"0.1b": (12, 768, 65536, 64, 64, 32, 128), "0.4b": (24, 1024, 65536, 64, 64, 32, 128),
          "1.5b": (24, 2048, 65536, 96, 96, 64, 256)}
bad = []
for name, (L, C, V, *ranks) in shapes.items():
    F = 4 * C
    nonemb = L * (19 * C + 4 * C * C + 2 * C * sum(ranks) + 2 * F * C) + 4 * C
    wbytes = 2 * (nonemb + V * C)
    floor_us = wbytes / 3.35e12 * 1e6
    m = re.search(r"^\| %s \(L%d C%d\) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$"
                  % (re.escape(name), L, C), text, re.M)
    if not m:
        bad.append(f"no decode row for {name}"); continue
    launches, wmb, floor, plain, xp, graph, xg, bound, pdl, xpdl = m.groups()
    # kernels + copies: 6 per layer (ln_shift_mix inside the GEMV groups) +
    # embedding, ln0, ln_out, head + the step-input copy (no head row
    # gather: decode rows are read in place)
    if int(launches) != 6 * L + 5:
        bad.append(f"{name}: {launches} launches per token, expected {6 * L + 5}")
    if abs(float(wmb) - wbytes / 1e6) > 0.06:
        bad.append(f"{name}: weight MB {wmb}, expected {wbytes / 1e6:.1f}")
    if abs(float(floor) - floor_us) > 0.06:
        bad.append(f"{name}: floor {floor} us, expected {floor_us:.1f}")
    if not float(bound) >= float(floor) - 0.05 or not float(graph) >= float(bound) or not float(plain) >= float(graph):
        bad.append(f"{name}: times out of order: floor {floor} bound {bound} graph {graph} plain {plain}")
    # a graph step: one cudaGraphLaunch (5 us) + at least 1 us per node
    if float(graph) < 5 + int(launches) - 0.5:
        bad.append(f"{name}: graph {graph} us is below one 5 us graph launch + 1 us x {launches} nodes")
    # PDL (issue 15): never slower than the graph, never under its bound, and
    # at least one graph launch + 0.5 us (PDL_NODE_S) per node
    if not float(bound) <= float(pdl) <= float(graph):
        bad.append(f"{name}: graph + PDL {pdl} us not between the bound {bound} and the graph {graph}")
    if float(pdl) < 5 + 0.5 * int(launches) - 0.5:
        bad.append(f"{name}: graph + PDL {pdl} us is below 5 us + 0.5 us x {launches} nodes")
    # every launch costs at least 5 us without graphs
    if float(plain) < 5 * int(launches) - 0.5:
        bad.append(f"{name}: {plain} us is below 5 us x {launches} launches")
    t = re.search(r"^\| %s \| (\d+) \|.*\| ([\d.]+)%% \|$" % re.escape(name), text, re.M)
    if not t or not 1.0 < float(t.group(2)) < 100.0:
        bad.append(f"{name}: no training row with an MFU in (1%%, 100%%)")
# WKV7 alone (the wave model): each kernel at or above its roofline, the
# step-back backward cheaper than the recomputing one it replaced
wkv = dict((m.group(1), (float(m.group(2)), float(m.group(3)))) for m in re.finditer(
    r"^\| (wkv7_\S+[^|]*?) \| [\d.]+ \| \d+ \| \d+ \| ([\d.]+) \| ([\d.]+) \|$", text, re.M))
if len(wkv) != 12:
    bad.append(f"WKV7 section: {len(wkv)} kernel rows, expected 12 (forward per token, "
               "rows over 2 and 4 blocks, chunked, chunked bf16, chunked on mma, on mma "
               "with fp32 I/O; backward, bf16, rows over 2 blocks, before, chunked on mma)")
for name, (roof, pred) in wkv.items():
    if pred < roof - 0.005:
        bad.append(f"WKV7 {name}: predicted {pred} ms below its roofline {roof} ms")
new_bwd = [p for n, (r, p) in wkv.items() if n.startswith("wkv7_backward, step-back")]
old_bwd = [p for n, (r, p) in wkv.items() if n.startswith("wkv7_backward, before")]
if not new_bwd or not old_bwd or not new_bwd[0] < old_bwd[0]:
    bad.append(f"WKV7: step-back backward {new_bwd} not below the recomputing one {old_bwd}")
mma_bwd = [p for n, (r, p) in wkv.items() if n.startswith("wkv7_backward chunked, bf16 math")]
if not mma_bwd or not new_bwd or not mma_bwd[0] < new_bwd[0]:
    bad.append(f"WKV7: chunked mma backward {mma_bwd} not below the step-back one {new_bwd}")
# The per-token forward by grid: the split wkv_rows_split picks is never
# predicted slower than one block per head, and some grid gains from it
splits = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([124]) \|$",
                    text, re.M)
if len(splits) < 4:
    bad.append(f"WKV7 rows split table: {len(splits)} rows")
gained = False
for heads, load, t1, t2, t4, pick in splits:
    t = {"1": float(t1), "2": float(t2), "4": float(t4)}
    if t[pick] > t["1"]:
        bad.append(f"WKV7 rows split: {heads} blocks pick split {pick} at {t[pick]} ms, "
                   f"slower than unsplit {t1} ms")
    gained = gained or t[pick] < t["1"]
    if min(t.values()) < t[pick]:
        bad.append(f"WKV7 rows split: {heads} blocks pick split {pick} at {t[pick]} ms, "
                   f"the model has {min(t.values())} ms")
if splits and not gained:
    bad.append("WKV7 rows split: no grid gains from the split")
for b in bad:
    print("FAIL: " + b)
sys.exit(1 if bad else 0)
' || exit 1
echo "PASS: the GPU model follows the shapes"
