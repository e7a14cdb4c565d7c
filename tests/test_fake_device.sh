#!/bin/bash
# No code outside the backends may touch backend memory on the host (on a GPU
# it is device memory): every move goes through copy_to_host/copy_to_device
# and MPI sees host buffers only. RWKVPIPE_TEST_FAKE_DEVICE=1 makes rwkvpipe
# use the fake-device backend (src/cpu/cpu_fake_device.c: the CPU arithmetic
# on addresses the host cannot dereference, is_host_memory = 0), so a stray
# host access is a crash here instead of on the GPU machine. Each command runs
# once on the CPU backend and once on the fake device; the outputs must be
# identical bit for bit (same thread count): logits (1 process, --pp 2
# --grads), train (--pp 2 1F1B with M > 1; interleaved 1F1B; -np 4 --pp 2
# with 2 replicas,
# checkpoints, --resume on 4 and on 1 process; GPipe; a NaN gradient),
# generate (1 process, --pp 2), eval, and serve (completions and sessions,
# 1 process and --pp 2). For a wider sweep, the other rwkvpipe scripts
# (test_pipeline.sh, test_pipeline_faults.sh, test_serve.sh, test_cli.sh) can
# run with RWKVPIPE_TEST_FAKE_DEVICE=1 in the environment.
# Run by `make check` (env: top_srcdir, top_builddir, MPIRUN, PYTHON3, RP_TEST_DATA).

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
unset RWKVPIPE_TEST_FAKE_DEVICE
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun"
    exit 77
fi
BIN="$top_builddir/rwkvpipe"
CLIENT=("$PYTHON3" "$top_srcdir/tests/serve_client.py")
TINY="$RP_TEST_DATA/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_fake_device.XXXXXX") || exit 99
PIDS=()
cleanup() {
    # TERM first (rank 0 then stops its pipeline), KILL what is left after 3 s
    local p _
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
    done
    wait 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT

FAIL_STDERR_LINES=25
. "$top_srcdir/tests/check_report.sh"

# both NAME COMMAND...: runs COMMAND on the CPU backend (stdout $T/NAME.cpu.out)
# and on the fake device (stdout $T/NAME.fake.out); the word @ in the command
# becomes cpu or fake (output paths). A crash on the fake device is a host
# access to backend memory.
both() {
    local name=$1
    shift
    local mode
    for mode in cpu fake; do
        local args=("${@//@/$mode}")
        local fake=0
        [ "$mode" = fake ] && fake=1
        if ! RWKVPIPE_TEST_FAKE_DEVICE=$fake timeout 120 "${args[@]}" >"$T/$name.$mode.out" \
            2>"$T/stderr"; then
            [ "$mode" = fake ] && echo "  (a crash here is a host access to backend memory)"
            fail "$name ($mode backend): ${args[*]}"
        fi
    done
}

# same FILE_CPU FILE_FAKE WHAT: identical bytes
same() {
    cmp -s "$1" "$2" || fail "$3: the fake device's output differs from the CPU backend's ($1, $2)"
}

# same_metrics NAME: losses, learning rates, gradient norms and evals of every
# step equal (everything but the timings)
same_metrics() {
    "$PYTHON3" "$top_srcdir/tests/same_metrics.py" "$T/$1.cpu.jsonl" "$T/$1.fake.jsonl" ||
        fail "$1: metrics differ"
}

# same_checkpoint DIR_CPU DIR_FAKE: every shard (weights, Adam moments) equal
same_checkpoint() {
    local n=0 f
    for f in "$1"/*.safetensors; do
        [ -e "$f" ] || fail "no shards in $1"
        same "$f" "$2/$(basename "$f")" "checkpoint shard $(basename "$f")"
        n=$((n + 1))
    done
    [ -s "$2/manifest.pb" ] || fail "no manifest in $2"
    echo "  $n checkpoint shards equal"
}

"$BIN" init --model-config L4-C64-V256 --seed 9 -o "$T/m4.st" >/dev/null 2>"$T/stderr" || fail "init"
TOKENS=$(seq -s, 3 1 42)

check "the hook reaches every MPI rank (start-up lines name the fake device)"
RWKVPIPE_TEST_FAKE_DEVICE=1 timeout 60 "$MPIRUN" -np 2 "$BIN" train --model-config L2-C64-V64 \
    --data mqar --ctx-len 16 --batch 2 --steps 1 --eval-batches 1 --threads 1 -q --pp 2 \
    >/dev/null 2>"$T/stderr" || fail "train --pp 2 on the fake device"
[ "$(grep -c "device fake-device" "$T/stderr")" = 2 ] ||
    fail "the start-up lines do not show 2 ranks on the fake device"
ok

check "logits: 1 process (--grads) and --pp 2 (--grads; step mode)"
both logits1 "$BIN" logits --model "$T/m4.st" --tokens "$TOKENS" --grads --threads 2 \
    -o "$T/logits1.@.st"
same "$T/logits1.cpu.st" "$T/logits1.fake.st" "logits --grads"
both logits2 "$MPIRUN" -np 2 "$BIN" logits --pp 2 --model "$T/m4.st" --tokens "$TOKENS" --grads \
    --threads 1 -o "$T/logits2.@.st"
same "$T/logits2.cpu.st" "$T/logits2.fake.st" "logits --pp 2 --grads"
both step2 "$MPIRUN" -np 2 "$BIN" logits --pp 2 --mode step --chunk 7 --model "$T/m4.st" \
    --tokens "$TOKENS" --threads 1 -o "$T/step2.@.st"
same "$T/step2.cpu.st" "$T/step2.fake.st" "logits --pp 2 --mode step"
ok

TRAIN=(train --model-config L4-C64-V256 --data mqar --ctx-len 16 --batch 8 --warmup 2 --lr 3e-3
       --eval-interval 2 --eval-batches 1 --log-interval 1 --loss-on all --seed 3 --init-seed 5
       --threads 1 -q)

check "train: one process, micro-batches of 2, evaluation during the run"
both train1 "$BIN" "${TRAIN[@]}" --steps 3 --micro-batch 2 --metrics "$T/train1.@.jsonl" \
    -o "$T/train1.@.st"
same "$T/train1.cpu.st" "$T/train1.fake.st" "train (1 process) weights"
same_metrics train1
ok

check "train: -np 2 --pp 2, 1F1B with 4 micro-batches, checkpoints"
both pp2 "$MPIRUN" -np 2 "$BIN" "${TRAIN[@]}" --steps 4 --pp 2 --pp-schedule 1f1b \
    --micro-batch 2 --metrics "$T/pp2.@.jsonl" -o "$T/pp2.@.st" --checkpoint-dir "$T/ck_pp2.@"
same "$T/pp2.cpu.st" "$T/pp2.fake.st" "train --pp 2 weights"
same_metrics pp2
same_checkpoint "$T/ck_pp2.cpu/step-00000004" "$T/ck_pp2.fake/step-00000004"
ok

check "train: -np 2 --pp 2 --pp-schedule interleaved (2 chunks per stage), checkpoints"
both ilv "$MPIRUN" -np 2 "$BIN" "${TRAIN[@]}" --steps 4 --pp 2 --pp-schedule interleaved \
    --micro-batch 1 --metrics "$T/ilv.@.jsonl" -o "$T/ilv.@.st" --checkpoint-dir "$T/ck_ilv.@"
same "$T/ilv.cpu.st" "$T/ilv.fake.st" "train --pp-schedule interleaved weights"
same_metrics ilv
same_checkpoint "$T/ck_ilv.cpu/step-00000004" "$T/ck_ilv.fake/step-00000004"
ok

check "train: -np 4 --pp 2 (2 data replicas), stopped at step 2, then --resume to step 4"
both dp2 "$MPIRUN" -np 4 "$BIN" "${TRAIN[@]}" --steps 4 --stop-after 2 --pp 2 --micro-batch 2 \
    --metrics "$T/dp2.@.jsonl" -o "$T/dp2.@.st" --checkpoint-dir "$T/ck_dp2.@"
same "$T/dp2.cpu.st" "$T/dp2.fake.st" "train -np 4 --pp 2 weights"
same_metrics dp2
same_checkpoint "$T/ck_dp2.cpu/step-00000002" "$T/ck_dp2.fake/step-00000002"
both resume "$MPIRUN" -np 4 "$BIN" "${TRAIN[@]}" --steps 4 --pp 2 --micro-batch 2 \
    --metrics "$T/resume.@.jsonl" -o "$T/resume.@.st" --resume "$T/ck_dp2.@"
same "$T/resume.cpu.st" "$T/resume.fake.st" "resumed weights"
same_metrics resume
same_checkpoint "$T/ck_dp2.cpu/step-00000004" "$T/ck_dp2.fake/step-00000004"
ok

check "train: that checkpoint resumed on 1 process; GPipe --stage-layers 1,3 from --init-from"
cp -r "$T/ck_dp2.cpu" "$T/ck_r1.cpu" && cp -r "$T/ck_dp2.fake" "$T/ck_r1.fake" || fail "cp"
both resume1 "$BIN" "${TRAIN[@]}" --steps 4 --micro-batch 2 -o "$T/resume1.@.st" \
    --resume "$T/ck_r1.@/step-00000002"
same "$T/resume1.cpu.st" "$T/resume1.fake.st" "resumed on 1 process"
both gpipe "$MPIRUN" -np 2 "$BIN" "${TRAIN[@]}" --steps 2 --pp 2 --pp-schedule gpipe \
    --stage-layers 1,3 --micro-batch 4 --init-from "$T/pp2.cpu.st" -o "$T/gpipe.@.st"
same "$T/gpipe.cpu.st" "$T/gpipe.fake.st" "train --pp-schedule gpipe --stage-layers 1,3"
ok

check "train: a NaN gradient ends the job with its message, or --no-halt-on-nan skips the step"
cp "$T/m4.st" "$T/nan.st"
"$PYTHON3" - "$T/nan.st" <<'PY' || fail "cannot poison the model"
import json, struct, sys
with open(sys.argv[1], "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    begin = json.loads(f.read(n))["head.weight"]["data_offsets"][0]
    f.seek(8 + n + begin)
    f.write(struct.pack("<f", float("nan")))
PY
if RWKVPIPE_TEST_FAKE_DEVICE=1 timeout 60 "$MPIRUN" -np 2 "$BIN" "${TRAIN[@]}" --steps 2 --pp 2 \
    --init-from "$T/nan.st" >/dev/null 2>"$T/stderr"; then
    fail "training on a NaN loss succeeded on the fake device"
fi
grep -q "error: step 1: the gradient norm is nan" "$T/stderr" ||
    fail "the fake device did not end the NaN run with its message"
both nan "$MPIRUN" -np 2 "$BIN" "${TRAIN[@]}" --steps 2 --pp 2 --init-from "$T/nan.st" \
    --no-halt-on-nan -o "$T/nan.@.st"
same "$T/nan.cpu.st" "$T/nan.fake.st" "--no-halt-on-nan weights"
ok

check "generate: 1 process and --pp 2 (sampling with penalties, chunked prompt)"
GEN=(generate --model "$T/pp2.cpu.st" --vocab bytes --prompt "hello there, general" --max-tokens 24
     --seed 3 --temperature 0.8 --top-k 20 --presence-penalty 0.3 --frequency-penalty 0.3
     --ban-eot --chunk 5 -q --threads 1)
both gen1 "$BIN" "${GEN[@]}"
same "$T/gen1.cpu.out" "$T/gen1.fake.out" "generate"
[ -s "$T/gen1.cpu.out" ] || fail "generate printed nothing"
both gen2 "$MPIRUN" -np 2 "$BIN" "${GEN[@]}" --pp 2
same "$T/gen2.cpu.out" "$T/gen2.fake.out" "generate --pp 2"
ok

check "eval: MQAR and a text file (per example)"
both evalq "$BIN" eval --model "$T/pp2.cpu.st" --data mqar --ctx-len 16 --batches 2 --threads 2
same "$T/evalq.cpu.out" "$T/evalq.fake.out" "eval mqar"
for i in $(seq 1 30); do echo "The quick brown fox jumps over the lazy dog, number $i."; done >"$T/text.txt"
both evalt "$BIN" eval --model "$T/pp2.cpu.st" --data "$T/text.txt" --ctx-len 32 --batch 4 \
    --per-example --threads 2
same "$T/evalt.cpu.out" "$T/evalt.fake.out" "eval text --per-example"
ok

# start NAME COMMAND...: serve_start (tests/serve_start.sh), failing with the
# server's log when it does not come up.
. "$top_srcdir/tests/serve_start.sh"
start() {
    serve_start "$@" || {
        cp "$T/$1.log" "$T/stderr"
        fail "server $1 did not start"
    }
}

# client NAME ARGS...: tests/serve_client.py, failing with the server's log
client() {
    local name=$1
    shift
    if ! timeout 60 "${CLIENT[@]}" "$@" >"$T/client.out" 2>&1; then
        cat "$T/client.out"
        cp "$T/$name.log" "$T/stderr"
        fail "serve_client.py $* (server $name)"
    fi
    sed 's/^/  /' "$T/client.out"
}

check "serve: greedy texts, concurrent requests and sessions (1 process and --pp 2)"
mkdir -p "$T/sess_cpu" "$T/sess_fake" "$T/sess_fake2"
start cpu "$BIN" serve --model "$TINY" --port 0 --threads 1 --session-dir "$T/sess_cpu"
RWKVPIPE_TEST_FAKE_DEVICE=1 start fake "$BIN" serve --model "$TINY" --port 0 --threads 1 \
    --session-dir "$T/sess_fake"
RWKVPIPE_TEST_FAKE_DEVICE=1 start fake2 "$MPIRUN" -np 2 "$BIN" serve --model "$TINY" --pp 2 \
    --port 0 --threads 1 --session-dir "$T/sess_fake2"
client fake same-server "$URL_cpu" "$URL_fake"
client fake2 same-server "$URL_cpu" "$URL_fake2"
client fake concurrent "$URL_fake" 4
client cpu sessions "$URL_cpu"
client fake sessions "$URL_fake"
client fake2 sessions "$URL_fake2"
same "$T/sess_cpu/conv-turn1.state" "$T/sess_fake/conv-turn1.state" "a saved session state"
same "$T/sess_cpu/conv-turn1.state" "$T/sess_fake2/conv-turn1.state" \
    "a saved session state (--pp 2)"
ok

echo "all fake-device checks passed"
