#!/bin/bash
# Interleaved 1F1B from the command line (docs/parallelism.md): `rwkvpipe
# schedule --kind interleaved --virtual-stages v` prints the lists with their
# chunks and the simulated bubble (P-1)/(v*M+P-1); bad shapes are refused
# naming the fix; `train --pp-schedule interleaved` is refused, since only the
# simulator runs it. No MPI. Run by `make check` (env: top_srcdir, top_builddir).

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
refused "train --pp-schedule interleaved is refused" \
    "the executor does not run interleaved schedules yet: use 1f1b, gpipe or zb-h1" \
    train --model-config L4-C64-V64 --data mqar --ctx-len 16 --steps 1 --pp-schedule interleaved \
    -o "$T/never.st"
[ -e "$T/never.st" ] && fail "train wrote $T/never.st"

echo "all interleaved checks passed"
