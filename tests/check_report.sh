# Sourced by the test scripts that report in "check: / ok / FAIL:" lines:
# check WHAT announces a check, ok [DETAIL] passes it, fail MESSAGE ends the
# script with status 1 after the last FAIL_STDERR_LINES (default 20) lines
# of $T/stderr, the captured standard error of the command that failed.
check() { echo "check: $*"; }
ok() { echo "  ok${1:+: $1}"; }
fail() {
    echo "FAIL: $*"
    [ -s "$T/stderr" ] && sed 's/^/  stderr: /' "$T/stderr" | tail -n "${FAIL_STDERR_LINES:-20}"
    exit 1
}
