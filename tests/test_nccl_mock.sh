#!/bin/bash
# The NCCL stage transport (src/pipe/transport_nccl.c) and the executor's
# grouped exchanges under the mock NCCL (tests/nccl_mock/README.md), whose
# default mode runs one NCCL kernel per rank at a time, in issue order, so a
# schedule that needs two communicators to progress together hangs:
# - tests/gpu/test_nccl.c (the GPU machine's NCCL check) on 1 and 2 ranks;
# - training with --pp 2 and --pp 3, GPipe and 1F1B, several micro-batches,
#   time chunks on 2 and 3 stages, and interleaved 1F1B on 2, 3 and 4,
#   on rwkvpipe_nccl_mock (RWKVPIPE_TEST_FAKE_DEVICE=1: the CPU backend marked
#   device memory, so activations and gradients go over the NCCL links from
#   step 2 on) must finish within a generous wall-clock deadline, with the
#   same weights and metrics as the MPI transport (RWKVPIPE_NCCL=0);
# - test_nccl_mock_order: a receive posted on its own ahead of the send its
#   peer needs (the executor's way before grouped exchanges) must hang in the
#   mock and be ended by the --comm-timeout watchdog naming the transfer,
#   while the same exchange as one group passes. (The code before grouped
#   exchanges, one communicator per direction and receives posted early, hung
#   the same way under the serial mock and passed with RP_NCCL_MOCK=
#   concurrent: it relied on NCCL progressing two communicators at once.)
# - train --zero 1 on the mock's device memory: the data replicas' reduce-
#   scatter and all-gather as grouped ncclSend/ncclRecv on the data group's
#   communicator (-np 2, -np 3 with uneven ranges, and -np 4 --pp 2 where
#   the stage links and the data group both carry traffic, 1F1B and
#   interleaved) finish under the
#   serial mock and give the CPU run's weights without --zero, byte for byte.
# - the same with the CUDA backend's bf16 weight copies mocked
#   (RWKVPIPE_TEST_BF16_WEIGHTS=1, tests/nccl_mock/cpu_as_device.c): the
#   all-gather refreshes the received ranges' copies (refresh_weights), so
#   the losses and weights equal the run without --zero, and the converted
#   floats show a ranged refresh, not a whole-stage re-registration per step;
#   and the GEMM matrices travel as bf16 straight into the copies (the mock
#   counts bf16 bytes, RP_NCCL_MOCK_STATS=1), so the fp32 of the other
#   ranges is stale until the checkpoint's or -o's gather: the step-2
#   checkpoint equals the run without --zero byte for byte, and resuming it
#   continues that run byte for byte.
# Run by `make check` in CPU builds (env: top_srcdir, top_builddir, MPIRUN, PYTHON3).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
unset RWKVPIPE_TEST_FAKE_DEVICE RWKVPIPE_NCCL RP_NCCL_MOCK
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun"
    exit 77
fi
BIN="$top_builddir/tests/nccl_mock/rwkvpipe_nccl_mock"
ORDER="$top_builddir/tests/nccl_mock/test_nccl_mock_order"
GPU_TEST="$top_builddir/tests/nccl_mock/test_nccl_on_mock"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_nccl_mock.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT

fail() {
    echo "FAIL: $*"
    [ -s "$T/stderr" ] && sed 's/^/  | /' "$T/stderr" | tail -20
    exit 1
}
check() { printf '%s ... ' "$1"; }
ok() { echo ok; }

# The deadline is wall-clock and generous (a loaded machine); a hang in the
# mock would otherwise be ended by --comm-timeout first.
DEADLINE=240
TRAIN=(train --model-config L4-C64-V256 --data mqar --ctx-len 16 --batch 8 --warmup 2 --lr 3e-3
       --log-interval 1 --loss-on all --seed 3 --init-seed 5 --threads 1 --steps 3
       --comm-timeout 60)

# run NAME NP ARGS...: once over the mock NCCL links, once over MPI; same
# weights and metrics, and the NCCL run said it used NCCL.
run() {
    local name=$1 np=$2
    shift 2
    local mode
    for mode in nccl mpi; do
        local use=1
        [ "$mode" = mpi ] && use=0
        if ! RWKVPIPE_TEST_FAKE_DEVICE=1 RWKVPIPE_NCCL=$use timeout $DEADLINE "$MPIRUN" -np "$np" \
            "$BIN" "${TRAIN[@]}" "$@" --metrics "$T/$name.$mode.jsonl" -o "$T/$name.$mode.st" \
            >"$T/$name.$mode.out" 2>&1; then
            cp "$T/$name.$mode.out" "$T/stderr"
            fail "$name over $mode (exit 124: over the ${DEADLINE} s deadline, a hang): $*"
        fi
    done
    grep -q "stage transport: NCCL" "$T/$name.nccl.out" ||
        fail "$name: the run did not use the NCCL links"
    cmp -s "$T/$name.nccl.st" "$T/$name.mpi.st" ||
        fail "$name: the weights after NCCL differ from those after MPI"
    "$PYTHON3" "$top_srcdir/tests/same_metrics.py" "$T/$name.nccl.jsonl" "$T/$name.mpi.jsonl" \
        --rows 3 || fail "$name: metrics differ"
}

check "exchange as one group passes under the serial mock"
timeout $DEADLINE "$MPIRUN" -np 2 "$ORDER" grouped 30 >"$T/out" 2>"$T/stderr" ||
    fail "grouped exchange"
[ "$(grep -c "3 exchanges (grouped) checked" "$T/out")" = 2 ] || fail "grouped: $(cat "$T/out")"
ok

check "a receive posted alone ahead of its peer's send hangs; the watchdog names it"
if timeout $DEADLINE "$MPIRUN" -np 2 "$ORDER" early 3 >"$T/out" 2>"$T/stderr"; then
    fail "the early receive did not hang under the serial mock: the mock lets two streams progress"
fi
grep -Eq "waited [0-9]+ s \(--comm-timeout\) to (receive|send) the (activations|activation gradients) of micro-batch 0 (from|to) stage [01] over NCCL" \
    "$T/stderr" || fail "no watchdog message naming the transfer"
ok

check "tests/gpu/test_nccl.c on the mock: 1 rank (self send/receive), 2 ranks (the link)"
timeout $DEADLINE "$MPIRUN" -np 1 "$GPU_TEST" >"$T/out" 2>"$T/stderr" || fail "test_nccl -np 1"
grep -q "^PASS: NCCL self send/recv" "$T/out" || fail "test_nccl -np 1: $(cat "$T/out")"
timeout $DEADLINE "$MPIRUN" -np 2 "$GPU_TEST" >"$T/out" 2>"$T/stderr" || fail "test_nccl -np 2"
grep -q "^two-rank NCCL link: a gradient and an activation receive in one group" "$T/out" ||
    fail "test_nccl -np 2 did not run the link check: $(cat "$T/out")"
ok

check "train --pp 2: 1F1B and GPipe, 4 micro-batches"
run pp2_1f1b 2 --pp 2 --pp-schedule 1f1b --micro-batch 2
run pp2_gpipe 2 --pp 2 --pp-schedule gpipe --micro-batch 2
ok

check "train --pp 3: 1F1B with 4 and 2 micro-batches, GPipe with 4"
run pp3_1f1b 3 --pp 3 --pp-schedule 1f1b --micro-batch 2 --stage-layers 1,2,1
run pp3_1f1b_m2 3 --pp 3 --pp-schedule 1f1b --micro-batch 4 --stage-layers 2,1,1
run pp3_gpipe 3 --pp 3 --pp-schedule gpipe --micro-batch 2 --stage-layers 1,1,2
ok
# zero NAME NP ARGS...: --zero 1 over the mock NCCL data group = the plain
# CPU run (no fake device, no --zero) byte for byte.
zero() {
    local name=$1 np=$2
    shift 2
    RWKVPIPE_TEST_FAKE_DEVICE=1 RWKVPIPE_NCCL=1 timeout $DEADLINE "$MPIRUN" -np "$np" "$BIN" \
        "${TRAIN[@]}" "$@" --zero 1 -o "$T/$name.zero.st" >"$T/$name.zero.out" 2>&1 || {
        cp "$T/$name.zero.out" "$T/stderr"
        fail "$name --zero 1 over NCCL (exit 124: over the ${DEADLINE} s deadline, a hang): $*"
    }
    timeout $DEADLINE "$MPIRUN" -np "$np" "$BIN" "${TRAIN[@]}" "$@" -o "$T/$name.cpu.st" \
        >"$T/$name.cpu.out" 2>&1 || {
        cp "$T/$name.cpu.out" "$T/stderr"
        fail "$name on the CPU: $*"
    }
    grep -q "zero: optimizer state sharded over .* data replicas (NCCL)" "$T/$name.zero.out" || {
        cp "$T/$name.zero.out" "$T/stderr"
        fail "$name: the --zero 1 run did not use the NCCL data group"
    }
    cmp -s "$T/$name.zero.st" "$T/$name.cpu.st" ||
        fail "$name: the weights after --zero 1 over NCCL differ from the CPU run's"
    # fp32 GEMM math (no bf16 copies) reads the whole fp32: nothing given back.
    grep -Eq "^fp32 weights per rank \(rank 0, stage 0\): ([0-9]+) of \1 bytes backed, GEMM matrices ([0-9]+) of \2 bytes; whole \(fp32 GEMM math" \
        "$T/$name.zero.out" || {
        cp "$T/$name.zero.out" "$T/stderr"
        fail "$name: the start-up line does not say the fp32 weights stay whole in fp32 math"
    }
}

check "train --zero 1 over the NCCL data group: -np 2, -np 3 (uneven), -np 4 --pp 2"
zero zero_np2 2 --micro-batch 2 --grad-clip 0.05
zero zero_np3 3 --batch 6 --micro-batch 1 --grad-clip 0.05
zero zero_np4pp2 4 --pp 2 --micro-batch 2 --grad-clip 0.05
zero zero_np4pp2_ilv 4 --pp 2 --pp-schedule interleaved --micro-batch 1 --grad-clip 0.05
ok

# The CUDA backend's bf16 weight copies (RWKVPIPE_TEST_BF16_WEIGHTS=1:
# tests/nccl_mock/cpu_as_device.c): the GEMMs read the registered weights'
# bf16 copies, which the mock NCCL's writes leave stale. ZeRO-1's all-gather
# must refresh the ranges it received (backend.h refresh_weights), so the
# losses and the weights equal those of the run without --zero (whose AdamW
# writes every copy through the backend), and only those ranges are
# converted: no whole-stage re-registration per step (register_weights
# converts as much as without --zero), and each rank's refresh converts the
# other replicas' share per step: less than the 3 steps' whole re-
# registrations (what the code before refresh_weights converted).
check "train --zero 1 with bf16 weight copies: ranged refresh = the run without --zero"
zero_bf16() {
    local name=$1 np=$2
    shift 2
    local mode
    for mode in zero plain; do
        # Without --zero the data replicas all-reduce, which the mock NCCL
        # cannot (one rank only): the plain run takes MPI through host memory.
        local z=() nccl=0
        [ "$mode" = zero ] && z=(--zero 1) nccl=1
        RWKVPIPE_TEST_FAKE_DEVICE=1 RWKVPIPE_TEST_BF16_WEIGHTS=1 RWKVPIPE_NCCL=$nccl \
            RP_NCCL_MOCK_STATS=1 timeout $DEADLINE "$MPIRUN" -np "$np" "$BIN" "${TRAIN[@]}" "$@" "${z[@]}" \
            --metrics "$T/$name.$mode.jsonl" -o "$T/$name.$mode.st" \
            >"$T/$name.$mode.out" 2>&1 || {
            cp "$T/$name.$mode.out" "$T/stderr"
            fail "$name ($mode, bf16 weight copies) over NCCL: $*"
        }
        # the ranks share one output stream: a line may start after another rank's progress line
        [ "$(grep -o "bf16 weight copies: [0-9]* floats" "$T/$name.$mode.out" | wc -l)" = "$np" ] || {
            cp "$T/$name.$mode.out" "$T/stderr"
            fail "$name ($mode): not every rank ran with bf16 weight copies"
        }
    done
    grep -q "zero: optimizer state sharded over .* data replicas (NCCL; the GEMM matrices' "\
"weights all-gathered as bf16)" "$T/$name.zero.out" ||
        fail "$name: the --zero 1 run did not use the NCCL data group with the bf16 all-gather"
    # The bf16 all-gather: every rank of the data group sent bf16 (the
    # matrices' ranges into the other replicas' copies); the weights above
    # equal the plain run's only if the fp32 shards were gathered for -o.
    "$PYTHON3" - "$T/$name.zero.out" "$np" <<'PY' ||
import re, sys
rows = [(int(m.group(1)), int(m.group(2)), int(m.group(3))) for m in re.finditer(
    r"nccl mock: communicator of (\d+) ranks, rank \d+ sent (\d+) fp32 bytes, (\d+) bf16",
    open(sys.argv[1]).read())]
data = [r for r in rows if r[0] == int(sys.argv[2])]
assert len(data) == int(sys.argv[2]) and all(r[2] > 0 for r in data), rows
PY
        fail "$name: the weight all-gather sent no bf16 over the data group"
    cmp -s "$T/$name.zero.st" "$T/$name.plain.st" ||
        fail "$name: the weights after --zero 1 differ from those without it (bf16 copies)"
    "$PYTHON3" "$top_srcdir/tests/same_metrics.py" "$T/$name.zero.jsonl" "$T/$name.plain.jsonl" \
        --rows 3 ||
        fail "$name: the losses with --zero 1 differ from those without it (stale bf16 copies?)"
    # Converted floats: register_weights at load in both runs, and with
    # --zero 1 once more for the buffers moved into sparse buffers (at most
    # the load's again; a per-step re-registration would be 3 more),
    # refresh_weights only with --zero 1, and per step and stage the other
    # replicas' ranges: less than a whole re-registration.
    "$PYTHON3" - "$T/$name.zero.out" "$T/$name.plain.out" <<'PY' ||
import re, sys
def counts(p):
    rows = [tuple(int(x) for x in m.groups()) for m in re.finditer(
        r"bf16 weight copies: (\d+) floats converted by register_weights, (\d+) by "
        r"refresh_weights", open(p).read())]
    return sorted(rows)
z, p = counts(sys.argv[1]), counts(sys.argv[2])
assert len(z) == len(p) and all(b[0] <= a[0] <= 2 * b[0] for a, b in zip(z, p)), \
    ("register_weights", z, p)
assert all(r[1] == 0 for r in p), ("refresh without --zero", p)
assert all(0 < r[1] < 3 * r[0] for r in z), ("refresh per step not below a whole stage", z)
PY
        fail "$name: the bf16 copies were not refreshed by range (see the counts in the logs)"
}
zero_bf16 zero_bf16_np2 2 --micro-batch 2 --grad-clip 0.05
zero_bf16 zero_bf16_np3 3 --batch 6 --micro-batch 1 --grad-clip 0.05
# The mode is live: bf16 weight copies change the weights of the fp32 run.
cmp -s "$T/zero_bf16_np2.zero.st" "$T/zero_np2.cpu.st" &&
    fail "bf16 weight copies left the weights of the fp32 run: the mode did nothing"
ok

# The bf16 all-gather leaves each replica's fp32 of the other ranges'
# matrices stale; a checkpoint gathers them first, so it holds the whole
# fp32 weights of the run without --zero, byte for byte, and resuming it
# (with --zero 1 again) continues that run byte for byte.
check "train --zero 1, bf16 all-gather: checkpoint = the run without --zero; resume continues it"
CK=(train --model-config L4-C64-V256 --data mqar --ctx-len 16 --batch 8 --micro-batch 2
    --warmup 2 --lr 3e-3 --grad-clip 0.05 --log-interval 1 --loss-on all --seed 3
    --init-seed 5 --threads 1 --steps 4 --comm-timeout 60)
ck_run() {
    local name=$1 nccl=$2
    shift 2
    RWKVPIPE_TEST_FAKE_DEVICE=1 RWKVPIPE_TEST_BF16_WEIGHTS=1 RWKVPIPE_NCCL=$nccl \
        timeout $DEADLINE "$MPIRUN" -np 2 "$BIN" "${CK[@]}" "$@" >"$T/$name.out" 2>&1 || {
        cp "$T/$name.out" "$T/stderr"
        fail "$name: mpirun -np 2 ${CK[*]} $*"
    }
}
ck_run ck_zero 1 --zero 1 --stop-after 2 --checkpoint-dir "$T/ck_zero.ck"
ck_run ck_plain 0 --stop-after 2 --checkpoint-dir "$T/ck_plain.ck"
n=0
for f in "$T/ck_plain.ck/step-00000002"/*.safetensors; do
    cmp -s "$f" "$T/ck_zero.ck/step-00000002/$(basename "$f")" ||
        fail "step-2 checkpoint file $(basename "$f") with the bf16 all-gather differs from the run without --zero"
    n=$((n + 1))
done
[ "$n" -gt 0 ] || fail "no step-2 checkpoint: $(ls "$T/ck_plain.ck" 2>&1)"
ck_run ck_resume 1 --zero 1 --resume "$T/ck_zero.ck" -o "$T/ck_resume.st"
ck_run ck_whole 0 -o "$T/ck_whole.st"
cmp -s "$T/ck_resume.st" "$T/ck_whole.st" ||
    fail "resumed --zero 1 run (bf16 all-gather) differs from the uninterrupted run without --zero"
ok

# The memory: under the bf16 all-gather nothing reads the other replicas'
# fp32 of the GEMM matrices until a save, so each rank gives those pages
# back (backend.h release_range). The mock device drops them and makes them
# PROT_NONE: any later read or write kills the rank, so the byte-equal
# weights, losses and checkpoints above and here prove nothing reads them,
# and the saves gather from the owners. L2-C256-V256 on the host's 4 KiB
# pages: a 256 x 256 matrix spans 64 pages, so page rounding is small. Each
# matrix byte lies in exactly one replica's range: the backed matrix bytes,
# summed over the ranks (the mock prints each rank's bytes given back),
# must be the matrices' bytes (each backed once) plus page rounding (5%),
# i.e. 1/DP of them per rank on average, against all of them without --zero.
check "train --zero 1, bf16 all-gather: fp32 matrix memory per rank / DP, same weights"
MEM=(train --model-config L2-C256-V256 --data mqar --ctx-len 16 --batch 6 --micro-batch 1
     --warmup 2 --lr 3e-3 --grad-clip 0.05 --log-interval 1 --loss-on all --seed 3
     --init-seed 5 --threads 1 --steps 3 --comm-timeout 60)
zero_mem() {
    local name=$1 np=$2 mode
    for mode in zero plain; do
        local z=() nccl=0
        [ "$mode" = zero ] && z=(--zero 1) nccl=1
        RWKVPIPE_TEST_FAKE_DEVICE=1 RWKVPIPE_TEST_BF16_WEIGHTS=1 RWKVPIPE_NCCL=$nccl \
            timeout $DEADLINE "$MPIRUN" -np "$np" "$BIN" "${MEM[@]}" "${z[@]}" \
            --metrics "$T/$name.$mode.jsonl" -o "$T/$name.$mode.st" >"$T/$name.$mode.out" 2>&1 || {
            cp "$T/$name.$mode.out" "$T/stderr"
            fail "$name ($mode): mpirun -np $np ${MEM[*]} ${z[*]}"
        }
    done
    cmp -s "$T/$name.zero.st" "$T/$name.plain.st" ||
        fail "$name: the weights with the fp32 pages given back differ from the run without --zero"
    "$PYTHON3" "$top_srcdir/tests/same_metrics.py" "$T/$name.zero.jsonl" "$T/$name.plain.jsonl" \
        --rows 3 || fail "$name: the losses with the fp32 pages given back differ"
    "$PYTHON3" - "$T/$name.zero.out" "$T/$name.plain.out" "$np" <<'PY' || {
import re, sys
line = re.compile(r"^fp32 weights per rank \(rank 0, stage 0\): (\d+) of (\d+) bytes backed, "
                  r"GEMM matrices (\d+) of (\d+) bytes(.*)$", re.M)
zero, plain, dp = open(sys.argv[1]).read(), open(sys.argv[2]).read(), int(sys.argv[3])
(zb, zt, zmb, zmt, ztail), = line.findall(zero)
(pb, pt, pmb, pmt, ptail), = line.findall(plain)
zb, zt, zmb, zmt, pb, pt, pmb, pmt = map(int, (zb, zt, zmb, zmt, pb, pt, pmb, pmt))
assert (pb, pmb) == (pt, pmt) == (zt, zmt), ("without --zero every byte is backed", plain)
page = int(re.search(r"own 1/DP range, (\d+)-byte pages\); bf16 copies \d+ bytes", ztail).group(1))
back = [int(a) for a, p in re.findall(r"sparse buffers: (\d+) bytes given back \((\d+)-byte", zero)
        if int(p) == page]
assert len(back) == dp, ("every rank gives pages back", back)
# Rank 0's line: what it gave back is fp32 matrix bytes only.
assert zt - zb == zmt - zmb and zt - zb in back, ("rank 0's line", zb, zt, zmb, zmt, back)
summed = dp * zmt - sum(back)  # matrix bytes backed, all ranks
assert zmt <= summed <= 1.05 * zmt, ("backed matrix bytes over the ranks", summed, zmt, back)
print(f"fp32 matrix bytes per rank: {zmt} without --zero, {summed / dp:.0f} on average with "
      f"--zero 1 over {dp} replicas ({page}-byte pages; rank 0 {zmb})")
PY
        cp "$T/$name.zero.out" "$T/stderr"
        fail "$name: the fp32 matrix memory per rank did not drop by the DP factor"
    }
}
zero_mem mem_np2 2
zero_mem mem_np3 3
# Two stages: every rank gives pages back, and -o gathers each stage's host
# copy to rank 0 (the stages' slice gather) with the plain run's bytes.
for mode in zero plain; do
    z=() nccl=0
    [ "$mode" = zero ] && z=(--zero 1) nccl=1
    RWKVPIPE_TEST_FAKE_DEVICE=1 RWKVPIPE_TEST_BF16_WEIGHTS=1 RWKVPIPE_NCCL=$nccl timeout $DEADLINE \
        "$MPIRUN" -np 4 "$BIN" "${MEM[@]}" --pp 2 "${z[@]}" -o "$T/mem_pp2.$mode.st" \
        >"$T/mem_pp2.$mode.out" 2>&1 || {
        cp "$T/mem_pp2.$mode.out" "$T/stderr"
        fail "mem_pp2 ($mode): mpirun -np 4 ${MEM[*]} --pp 2 ${z[*]}"
    }
done
[ "$(grep -c "sparse buffers: [0-9]* bytes given back" "$T/mem_pp2.zero.out")" = 4 ] ||
    fail "mem_pp2: not every rank of -np 4 --pp 2 --zero 1 gave its fp32 pages back"
cmp -s "$T/mem_pp2.zero.st" "$T/mem_pp2.plain.st" ||
    fail "mem_pp2: the weights with the fp32 pages given back differ from the run without --zero"
# A checkpoint of the run with pages given back equals the run without
# --zero, and resuming it (pages given back again) continues that run.
RWKVPIPE_TEST_FAKE_DEVICE=1 RWKVPIPE_TEST_BF16_WEIGHTS=1 RWKVPIPE_NCCL=1 timeout $DEADLINE \
    "$MPIRUN" -np 2 "$BIN" "${MEM[@]}" --zero 1 --stop-after 2 \
    --checkpoint-dir "$T/mem.ck" >"$T/mem_ck.out" 2>&1 || {
    cp "$T/mem_ck.out" "$T/stderr"
    fail "mem_ck: --zero 1 --stop-after 2 with checkpoints"
}
RWKVPIPE_TEST_FAKE_DEVICE=1 RWKVPIPE_TEST_BF16_WEIGHTS=1 RWKVPIPE_NCCL=1 timeout $DEADLINE \
    "$MPIRUN" -np 2 "$BIN" "${MEM[@]}" --zero 1 --resume "$T/mem.ck" -o "$T/mem_resume.st" \
    >"$T/mem_resume.out" 2>&1 || {
    cp "$T/mem_resume.out" "$T/stderr"
    fail "mem_resume: --zero 1 --resume"
}
[ "$(grep -c "sparse buffers: [0-9]* bytes given back" "$T/mem_resume.out")" = 2 ] ||
    fail "the resumed --zero 1 run did not give its fp32 pages back again"
cmp -s "$T/mem_resume.st" "$T/mem_np2.plain.st" ||
    fail "the resumed --zero 1 run (pages given back) differs from the run without --zero"
ok

# Time chunks (docs/parallelism.md): the backward phase's exchanges
# (SEND_RECOMP with RECV_GRAD, SEND_GRAD with RECV_RECOMP) are grouped like
# 1F1B's.
check "train --pp 2 and --pp 3 with time chunks (--seq-len 64 --ctx-len 16)"
run pp2_chunks 2 --pp 2 --seq-len 64 --micro-batch 2
run pp3_chunks 3 --pp 3 --seq-len 64 --micro-batch 2 --stage-layers 1,2,1
ok

# Interleaved 1F1B: SEND_ACT with RECV_GRAD and SEND_GRAD with RECV_ACT are
# grouped as 1F1B's, over the neighbour links; the wrap from stage P-1's
# chunk c to stage 0's chunk c+1 (and its gradient back) has no link and
# goes over MPI through host memory.
check "train --pp-schedule interleaved: --pp 2 (v 2, 3), --pp 3, --pp 4"
run ilv_pp2 2 --pp 2 --pp-schedule interleaved --micro-batch 1
run ilv_pp2_v3 2 --pp 2 --pp-schedule interleaved --virtual-stages 3 --micro-batch 1 \
    --model-config L6-C64-V256
run ilv_pp3 3 --pp 3 --pp-schedule interleaved --micro-batch 2 --batch 12 \
    --model-config L6-C64-V256
run ilv_pp4 4 --pp 4 --pp-schedule interleaved --micro-batch 1 --model-config L8-C64-V256
ok
echo "PASS"
