#!/bin/bash
# Interleaved 1F1B (docs/parallelism.md): `rwkvpipe schedule --kind
# interleaved --virtual-stages v` prints the lists with their chunks and the
# simulated bubble (P-1)/(v*M+P-1); bad shapes are refused naming the fix.
# `train --pp-schedule interleaved` (each stage holding v chunks of layers)
# trains the same weights as 1F1B and one process byte for byte, with data
# replicas too, on the fake device too (backend memory), with --zero 1 the
# bytes of the run without it, with --tune state and --tune lora 1F1B's
# tuned states and adapters, and its checkpoints resume on a plain --pp run and the other
# way round, continuing the same run byte for byte. Run by `make check` (env:
# top_srcdir, top_builddir, MPIRUN; the training checks need mpirun).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
BIN="$top_builddir/rwkvpipe"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_interleaved.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT

. "$top_srcdir/tests/check_report.sh"

# refused WHAT EXPECTED ARGS...: rwkvpipe ARGS fails and says EXPECTED
refused() {
    local what=$1 expected=$2
    shift 2
    check "$what"
    if "$BIN" "$@" >"$T/stdout" 2>"$T/stderr"; then fail "rwkvpipe $* was accepted"; fi
    grep -qF -- "$expected" "$T/stderr" || fail "the message does not say '$expected'"
    ok
}

check "schedule --kind interleaved prints chunks and the theory's bubble"
if ! "$BIN" schedule --pp 4 --micro-batches 8 --kind interleaved --virtual-stages 2 \
    >"$T/stdout" 2>"$T/stderr"; then
    fail "rwkvpipe schedule --kind interleaved failed"
fi
for want in "4 stages x 2 virtual stages" "bubble fraction 0.1579" \
    "theory (P-1)/(v*M+P-1) = 3/19" "F0.1:" "stage 0: busy 32"; do
    grep -qF -- "$want" "$T/stdout" || fail "the output lacks '$want': $(head -c 2000 "$T/stdout")"
done
ok

check "the default is 2 virtual stages"
"$BIN" schedule --pp 2 --micro-batches 2 --kind interleaved >"$T/stdout" 2>"$T/stderr" ||
    fail "rwkvpipe schedule --kind interleaved without --virtual-stages failed"
grep -qF "2 stages x 2 virtual stages" "$T/stdout" || fail "not 2 virtual stages"
ok

refused "M not a multiple of P is refused" "multiple of the stages" \
    schedule --pp 4 --micro-batches 6 --kind interleaved
refused "one virtual stage is refused" "1 virtual stages" \
    schedule --pp 2 --micro-batches 4 --kind interleaved --virtual-stages 1
refused "--virtual-stages without --kind interleaved is refused" "only --kind interleaved" \
    schedule --pp 2 --micro-batches 4 --kind 1f1b --virtual-stages 2
TRAIN=(train --model-config L4-C64-V64 --data mqar --ctx-len 16 --steps 1)
refused "--virtual-stages without --pp-schedule interleaved is refused" \
    "--virtual-stages is for --pp-schedule interleaved only" \
    "${TRAIN[@]}" --pp-schedule 1f1b --virtual-stages 2 -o "$T/never.st"
refused "train --pp-schedule interleaved on one stage is refused" "needs --pp 2 or more" \
    "${TRAIN[@]}" --pp-schedule interleaved -o "$T/never.st"
[ -e "$T/never.st" ] && fail "train wrote $T/never.st"

if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: the training checks need mpirun"
    echo "all interleaved checks passed"
    exit 0
fi

# 6 steps of 8 (or 12) sequences of 16 tokens; warmup 2 so the LR moves.
COMMON=(train --data mqar --ctx-len 16 --steps 6 --warmup 2 --lr 3e-3 --eval-interval 0
        --eval-batches 1 --log-interval 1 --loss-on all --seed 3 --init-seed 5 --threads 1)
. "$top_srcdir/tests/train_test_lib.sh"   # train NAME NP [ARGS...]

# same_losses A B: identical losses and eval losses in the metrics files
same_losses() {
    for key in loss eval_loss; do
        diff <(grep -o "\"$key\":[^,}]*" "$T/$1.jsonl") <(grep -o "\"$key\":[^,}]*" "$T/$2.jsonl") \
            >/dev/null || fail "$2: ${key}es differ from $1's"
    done
}

# same_bits A B: byte-identical weights, identical losses and eval losses
same_bits() {
    cmp "$T/$1.st" "$T/$2.st" >/dev/null || fail "$2: weights differ from $1's"
    same_losses "$1" "$2"
    grep -q '"eval_loss"' "$T/$1.jsonl" || fail "$1: no metrics"
    ok "$2"
}

# stash_is_peak PP V M: after an interleaved run ($T/stderr), every stage
# holds as many activation stash slots, shared by its chunks, as the
# schedule's peak of (micro-batch, chunk) pairs between FWD and BWD there
# (the simulator's count), not V times a chunk's slots.
stash_is_peak() {
    local pp=$1 v=$2 m=$3 s want got
    "$BIN" schedule --pp "$pp" --micro-batches "$m" --kind interleaved --virtual-stages "$v" \
        >"$T/sched" 2>&1 || fail "rwkvpipe schedule --pp $pp --micro-batches $m failed"
    for ((s = 0; s < pp; s++)); do
        want=$(sed -n "s/^stage $s: busy .*, peak stash \([0-9]*\),.*/\1/p" "$T/sched")
        got=$(sed -n "s/^stage $s: \([0-9]*\) activation stash slots shared by $v chunks$/\1/p" \
              "$T/stderr")
        [ -n "$want" ] || fail "no peak stash for stage $s in: $(tail -5 "$T/sched")"
        [ "$got" = "$want" ] ||
            fail "stage $s holds '$got' stash slots, the schedule's peak is $want"
    done
}

# "NP PP V MODEL BATCH MICRO-BATCH": M = BATCH / (MICRO-BATCH x NP/PP)
# micro-batches per replica, a multiple of PP.
for layout in "2 2 2 L4 8 1" "2 2 2 L4 8 2" "4 2 2 L4 8 1" "6 2 2 L4 12 1" \
              "3 3 2 L6 12 2" "2 2 3 L6 8 1"; do
    set -- $layout
    check "-np $1 --pp $2 --virtual-stages $3 ($4, batch $5, micro-batch $6): interleaved equals 1f1b bit for bit"
    name="np$1_pp$2_v$3_$4_b$5_mb$6"
    SHAPE=(--model-config "$4-C64-V64" --batch "$5" --micro-batch "$6")
    train "${name}_1f1b" "$1" --pp "$2" --pp-schedule 1f1b "${SHAPE[@]}"
    train "${name}_inter" "$1" --pp "$2" --pp-schedule interleaved --virtual-stages "$3" \
        "${SHAPE[@]}"
    stash_is_peak "$2" "$3" $(( $5 / ($6 * ($1 / $2)) ))
    if [ "$3" = 3 ]; then
        grep -q "stage  0  layers 0-0, 2-2, 4-4  +embedding" "$T/stderr" ||
            fail "the start-up map does not show stage 0 holding layers 0, 2 and 4"
    fi
    same_bits "${name}_1f1b" "${name}_inter"
done

# Chunks of unequal size: the stash slots and the recurrent state are sized
# for the stage's largest chunk, and each instruction uses its own chunk's
# part of them (stage 1 holds model chunks of 1 and 2 layers).
check "--stage-layers 2,1,1,2 (chunks of 2 and 1 layers): interleaved equals 1f1b bit for bit"
SHAPE=(--model-config L6-C64-V64 --batch 8 --micro-batch 1)
train uneven_1f1b 2 --pp 2 --pp-schedule 1f1b "${SHAPE[@]}"
train uneven_inter 2 --pp 2 --pp-schedule interleaved --stage-layers 2,1,1,2 "${SHAPE[@]}"
same_bits uneven_1f1b uneven_inter

check "interleaved equals one process bit for bit"
train one 1 --model-config L4-C64-V64 --batch 8 --micro-batch 1
same_bits one np2_pp2_v2_L4_b8_mb1_inter

# Device backends: the fake device (RWKVPIPE_TEST_FAKE_DEVICE=1, the CPU
# arithmetic on memory the host cannot touch) moves every activation,
# gradient, weight and checkpoint byte through the backend; the same bits as
# the CPU's 1F1B, with data replicas too (their all-reduce staged through
# host memory). The NCCL links: tests/test_nccl_mock.sh.
check "interleaved on the fake device equals 1f1b on the CPU bit for bit (-np 2, -np 4 --pp 2)"
RWKVPIPE_TEST_FAKE_DEVICE=1 train fake_inter 2 --model-config L4-C64-V64 --batch 8 \
    --micro-batch 1 --pp 2 --pp-schedule interleaved
grep -q "device fake-device" "$T/stderr" || fail "the run did not use the fake device"
same_bits np2_pp2_v2_L4_b8_mb1_1f1b fake_inter
RWKVPIPE_TEST_FAKE_DEVICE=1 train fake_inter_dp2 4 --model-config L4-C64-V64 --batch 8 \
    --micro-batch 1 --pp 2 --pp-schedule interleaved
same_bits np4_pp2_v2_L4_b8_mb1_1f1b fake_inter_dp2

# Checkpoints hold every layer under its own name whatever the layout: an
# interleaved run's resumes on plain 1F1B stages and the other way round,
# continuing the uninterrupted run byte for byte.
CK=(--model-config L4-C64-V64 --batch 8 --micro-batch 1 --pp 2)
check "an interleaved checkpoint resumes on a plain --pp run"
train ck_inter 2 "${CK[@]}" --pp-schedule interleaved --stop-after 3 --checkpoint-dir "$T/ck_inter.ck"
[ -d "$T/ck_inter.ck/step-00000003" ] || fail "no checkpoint at step 3: $(ls "$T/ck_inter.ck")"
"$BIN" info "$T/ck_inter.ck" --verify >"$T/stdout" 2>"$T/stderr" ||
    fail "info --verify: $(cat "$T/stderr")"
train ck_inter_to_1f1b 2 "${CK[@]}" --pp-schedule 1f1b --resume "$T/ck_inter.ck"
cmp "$T/np2_pp2_v2_L4_b8_mb1_1f1b.st" "$T/ck_inter_to_1f1b.st" >/dev/null ||
    fail "resumed on 1f1b: weights are not those of the uninterrupted run"
ok

check "a plain --pp checkpoint resumes on an interleaved run"
train ck_plain 2 "${CK[@]}" --pp-schedule 1f1b --stop-after 3 --checkpoint-dir "$T/ck_plain.ck"
train ck_plain_to_inter 2 "${CK[@]}" --pp-schedule interleaved --resume "$T/ck_plain.ck"
cmp "$T/np2_pp2_v2_L4_b8_mb1_1f1b.st" "$T/ck_plain_to_inter.st" >/dev/null ||
    fail "resumed on interleaved: weights are not those of the uninterrupted run"
ok

# --zero 1: each chunk's moments sharded over the data replicas as a
# stage's are (reduce-scatter, AdamW on the own ranges, all-gather, chunk by
# chunk); the global norm adds the replicas' per-chunk partials in the
# unsharded run's order. --grad-clip 0.05 clips every step, so a norm off by
# a bit changes the weights. Same weights, losses and checkpoint files as
# without --zero; the checkpoint resumes with --zero and continues the run.
# same_ck A B STEP: every safetensors file of A's step STEP checkpoint in B's
same_ck() {
    local a="$T/$1.ck/step-0000000$3" b="$T/$2.ck/step-0000000$3" n=0 f
    for f in "$a"/*.safetensors; do
        [ -e "$f" ] || fail "no checkpoint in $a"
        cmp -s "$f" "$b/$(basename "$f")" || fail "$2: checkpoint file $(basename "$f") differs"
        n=$((n + 1))
    done
    [ "$n" -ge 12 ] || fail "$1: only $n checkpoint files (weights and moments of 4 chunks)"
}
ZSHAPE=(--model-config L4-C64-V64 --micro-batch 1 --pp 2 --pp-schedule interleaved --grad-clip 0.05)
for layout in "4 8" "6 12"; do
    set -- $layout
    check "--zero 1 with interleaved: -np $1 --pp 2 ($(($1 / 2)) replicas) equals the unsharded run"
    train "zoff_np$1" "$1" "${ZSHAPE[@]}" --batch "$2" --checkpoint-dir "$T/zoff_np$1.ck" \
        --checkpoint-interval 3
    train "zon_np$1" "$1" "${ZSHAPE[@]}" --batch "$2" --zero 1 --checkpoint-dir "$T/zon_np$1.ck" \
        --checkpoint-interval 3
    grep -q "zero: optimizer state sharded over $(($1 / 2)) data replicas" "$T/stderr" ||
        fail "no start-up line of the sharded optimizer"
    same_ck "zoff_np$1" "zon_np$1" 6
    same_bits "zoff_np$1" "zon_np$1"
done
check "--zero 1 with interleaved on the fake device equals the CPU run"
RWKVPIPE_TEST_FAKE_DEVICE=1 train zon_fake 4 "${ZSHAPE[@]}" --batch 8 --zero 1 \
    --checkpoint-dir "$T/zon_fake.ck" --checkpoint-interval 3
same_ck zoff_np4 zon_fake 6
same_bits zoff_np4 zon_fake
check "an interleaved --zero 1 checkpoint resumes with --zero 1 and continues the run"
train zhalf 4 "${ZSHAPE[@]}" --batch 8 --zero 1 --stop-after 3 --checkpoint-dir "$T/zhalf.ck"
same_ck zoff_np4 zhalf 3
train zresumed 4 "${ZSHAPE[@]}" --batch 8 --zero 1 --resume "$T/zhalf.ck"
cmp "$T/zoff_np4.st" "$T/zresumed.st" >/dev/null ||
    fail "resumed with --zero 1: weights are not those of the uninterrupted run"
ok

# --tune state: each chunk's tuned WKV states (one buffer per stage, the
# chunks' layers one after the other); every sequence starts each chunk from
# its own, its gradient accumulates in micro-batch order per chunk as in
# 1F1B. The states file, losses and evaluations equal 1F1B's and one
# process's byte for byte, with data replicas and on the fake device too;
# a checkpoint (one "tuned" file per model chunk) resumes on 1F1B and the
# other way round, continuing the run.
TS=(--model-config L4-C64-V64 --batch 8 --micro-batch 1 --tune state --lr 3e-2 --eval-interval 2)
# same_state A B: same tuned states file, losses and evaluations
same_state() {
    cmp "$T/$1.state" "$T/$2.state" >/dev/null || fail "$2: tuned states differ from $1's"
    same_losses "$1" "$2"
    ok "$2"
}
check "--tune state with interleaved equals 1f1b and one process bit for bit"
train ts_one 1 "${TS[@]}" --state-out "$T/ts_one.state"
train ts_1f1b 2 "${TS[@]}" --pp 2 --pp-schedule 1f1b --state-out "$T/ts_1f1b.state"
train ts_inter 2 "${TS[@]}" --pp 2 --pp-schedule interleaved --state-out "$T/ts_inter.state"
same_state ts_1f1b ts_inter
same_state ts_one ts_inter
RWKVPIPE_TEST_FAKE_DEVICE=1 train ts_fake 2 "${TS[@]}" --pp 2 --pp-schedule interleaved \
    --state-out "$T/ts_fake.state"
same_state ts_1f1b ts_fake
train ts_1f1b_dp2 4 "${TS[@]}" --pp 2 --pp-schedule 1f1b --state-out "$T/ts_1f1b_dp2.state"
train ts_inter_dp2 4 "${TS[@]}" --pp 2 --pp-schedule interleaved --state-out "$T/ts_inter_dp2.state"
same_state ts_1f1b_dp2 ts_inter_dp2
check "--tune state checkpoints move between interleaved and 1f1b"
train ts_half_inter 2 "${TS[@]}" --pp 2 --pp-schedule interleaved --stop-after 3 \
    --state-out "$T/x.state" --checkpoint-dir "$T/ts_half_inter.ck"
ls "$T/ts_half_inter.ck/step-00000003" | grep -q "^tuned-00003-of-00004" ||
    fail "no tuned file per model chunk: $(ls "$T/ts_half_inter.ck/step-00000003")"
train ts_to_1f1b 2 "${TS[@]}" --pp 2 --pp-schedule 1f1b --resume "$T/ts_half_inter.ck" \
    --state-out "$T/ts_to_1f1b.state"
cmp "$T/ts_1f1b.state" "$T/ts_to_1f1b.state" >/dev/null ||
    fail "resumed on 1f1b: the tuned states are not those of the uninterrupted run"
train ts_half_1f1b 2 "${TS[@]}" --pp 2 --pp-schedule 1f1b --stop-after 3 \
    --state-out "$T/x.state" --checkpoint-dir "$T/ts_half_1f1b.ck"
train ts_to_inter 2 "${TS[@]}" --pp 2 --pp-schedule interleaved --resume "$T/ts_half_1f1b.ck" \
    --state-out "$T/ts_to_inter.state"
cmp "$T/ts_1f1b.state" "$T/ts_to_inter.state" >/dev/null ||
    fail "resumed on interleaved: the tuned states are not those of the uninterrupted run"
ok

# --tune lora: one set of adapters per chunk (each adapter's start depends
# on its tensor's name only); the optimizer steps each chunk's. The adapter
# file, the merged weights (-o), losses and evaluations equal 1F1B's and one
# process's byte for byte, with replicas and on the fake device; a
# checkpoint (a "lora" file per model chunk) resumes on 1F1B and the other
# way round, continuing the run.
TL=(--model-config L4-C64-V64 --batch 8 --micro-batch 1 --tune lora --lora-rank 4 --lr 3e-2
    --eval-interval 2)
# same_lora A B: same adapter file, merged weights, losses and evaluations
same_lora() {
    cmp "$T/$1.lora" "$T/$2.lora" >/dev/null || fail "$2: LoRA adapters differ from $1's"
    cmp "$T/$1.st" "$T/$2.st" >/dev/null || fail "$2: merged weights differ from $1's"
    same_losses "$1" "$2"
    ok "$2"
}
check "--tune lora with interleaved equals 1f1b and one process bit for bit"
train tl_one 1 "${TL[@]}" --lora-out "$T/tl_one.lora"
train tl_1f1b 2 "${TL[@]}" --pp 2 --pp-schedule 1f1b --lora-out "$T/tl_1f1b.lora"
train tl_inter 2 "${TL[@]}" --pp 2 --pp-schedule interleaved --lora-out "$T/tl_inter.lora"
same_lora tl_1f1b tl_inter
same_lora tl_one tl_inter
RWKVPIPE_TEST_FAKE_DEVICE=1 train tl_fake 2 "${TL[@]}" --pp 2 --pp-schedule interleaved \
    --lora-out "$T/tl_fake.lora"
same_lora tl_1f1b tl_fake
train tl_1f1b_dp2 4 "${TL[@]}" --pp 2 --pp-schedule 1f1b --lora-out "$T/tl_1f1b_dp2.lora"
train tl_inter_dp2 4 "${TL[@]}" --pp 2 --pp-schedule interleaved --lora-out "$T/tl_inter_dp2.lora"
same_lora tl_1f1b_dp2 tl_inter_dp2
check "--tune lora checkpoints move between interleaved and 1f1b"
train tl_half_inter 2 "${TL[@]}" --pp 2 --pp-schedule interleaved --stop-after 3 \
    --lora-out "$T/x.lora" --checkpoint-dir "$T/tl_half_inter.ck"
ls "$T/tl_half_inter.ck/step-00000003" | grep -q "^lora-00003-of-00004" ||
    fail "no lora file per model chunk: $(ls "$T/tl_half_inter.ck/step-00000003")"
train tl_to_1f1b 2 "${TL[@]}" --pp 2 --pp-schedule 1f1b --resume "$T/tl_half_inter.ck" \
    --lora-out "$T/tl_to_1f1b.lora"
cmp "$T/tl_1f1b.lora" "$T/tl_to_1f1b.lora" >/dev/null && cmp "$T/tl_1f1b.st" "$T/tl_to_1f1b.st" \
    >/dev/null || fail "resumed on 1f1b: not the adapters and weights of the uninterrupted run"
train tl_half_1f1b 2 "${TL[@]}" --pp 2 --pp-schedule 1f1b --stop-after 3 \
    --lora-out "$T/x.lora" --checkpoint-dir "$T/tl_half_1f1b.ck"
train tl_to_inter 2 "${TL[@]}" --pp 2 --pp-schedule interleaved --resume "$T/tl_half_1f1b.ck" \
    --lora-out "$T/tl_to_inter.lora"
cmp "$T/tl_1f1b.lora" "$T/tl_to_inter.lora" >/dev/null && cmp "$T/tl_1f1b.st" "$T/tl_to_inter.st" \
    >/dev/null || fail "resumed on interleaved: not the adapters and weights of the uninterrupted run"
ok

# mpirun_refused WHAT EXPECTED NP ARGS...: the job fails and says EXPECTED
mpirun_refused() {
    local what=$1 expected=$2 np=$3
    shift 3
    check "$what"
    if timeout 300 "$MPIRUN" -np "$np" "$BIN" "$@" >"$T/stdout" 2>"$T/stderr"; then
        fail "mpirun -np $np rwkvpipe $* was accepted"
    fi
    grep -qF -- "$expected" "$T/stderr" || fail "the message does not say '$expected': $(tail -5 "$T/stderr")"
    ok
}
mpirun_refused "fewer layers than --pp x --virtual-stages chunks is refused" \
    "--pp 2 x --virtual-stages 3 = 6 model chunks, but the model has 4 layers" 2 \
    "${TRAIN[@]}" --pp 2 --pp-schedule interleaved --virtual-stages 3 --batch 2 -o "$T/never.st"
mpirun_refused "micro-batches not a multiple of the stages are refused" \
    "multiple of the stages" 2 \
    "${TRAIN[@]}" --pp 2 --pp-schedule interleaved --batch 3 --micro-batch 1 -o "$T/never.st"
mpirun_refused "interleaved with --seq-len time chunks is refused" \
    "does not run --seq-len time chunks yet" 2 \
    "${TRAIN[@]}" --pp 2 --pp-schedule interleaved --batch 2 --seq-len 32 -o "$T/never.st"
mpirun_refused "--stage-layers with interleaved takes one count per model chunk" \
    "one count per model chunk" 2 \
    "${TRAIN[@]}" --pp 2 --pp-schedule interleaved --batch 2 --stage-layers 2,2 -o "$T/never.st"
[ -e "$T/never.st" ] && fail "train wrote $T/never.st"

echo "all interleaved checks passed"
