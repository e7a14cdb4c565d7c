#!/bin/bash
# rwkvpipe serve for evaluation harnesses and SDK batch use (docs/serving.md,
# Logprobs): lm-evaluation-harness's exact loglikelihood request (echo +
# logprobs over token ids) gives the log-softmax of `rwkvpipe logits` within
# 1e-4, on one process and on --pp 2, with a prompt over several prefill
# chunks; max_tokens 0 scores the prompt only; streamed and chat logprobs;
# logit_bias forces and bans tokens; bad values get a 400 naming them.
# Driven by tests/serve_logprobs_client.py. Run by `make check`.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
BIN="$top_builddir/rwkvpipe"
CLIENT=("$PYTHON3" "$top_srcdir/tests/serve_logprobs_client.py")
TINY="$RP_TEST_DATA/tiny_L2_C128_V256_s1.weights.safetensors"
T=$(mktemp -d "${TMPDIR:-/tmp}/test_serve_logprobs.XXXXXX") || exit 99
SERVE_TEST_SECONDS=300
. "$top_srcdir/tests/serve_test_lib.sh"

# context + continuation as lm-eval sends them (byte tokens); the reference
# logits of the same tokens from a zero state
CTX="The quick brown fox jumps over"
TOKS=$("$PYTHON3" -c 'import sys; print(",".join(str(b) for b in (sys.argv[1] + " the lazy dog").encode()))' "$CTX")
CTXLEN=${#CTX}
"$BIN" logits --model "$TINY" --tokens "$TOKS" -o "$T/ref.st" --threads 1 >"$T/logits.log" 2>&1 ||
    { echo "FAIL: rwkvpipe logits"; cat "$T/logits.log"; exit 1; }

# --prefill-chunk 16: the 39-token prompt is scored over three chunks
start A "$BIN" serve --model "$TINY" --port 0 --threads 1 --prefill-chunk 16
expect "one process: lm-eval's requests and logprobs equal rwkvpipe logits" \
    "${CLIENT[@]}" "$URL_A" "$T/ref.st" "$TOKS" "$CTXLEN"

if [ -n "$MPIRUN" ] && command -v "$MPIRUN" >/dev/null 2>&1; then
    start D "$MPIRUN" -np 2 "$BIN" serve --model "$TINY" --pp 2 --port 0 --threads 1 \
        --prefill-chunk 16
    expect "--pp 2: lm-eval's requests and logprobs equal rwkvpipe logits" \
        "${CLIENT[@]}" "$URL_D" "$T/ref.st" "$TOKS" "$CTXLEN"
    kill -TERM "$PID_D"
    wait "$JOB_D"
    expect "--pp 2 server: SIGTERM exits 0" test "$?" = 0
else
    echo "skip: no mpirun for the --pp 2 server"
fi

serve_test_end
