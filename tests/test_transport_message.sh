#!/bin/bash
# Runs tests/test_transport_message (cmocka) on two ranks; see that file.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
: "${top_builddir:=.}"
: "${MPIRUN:=}"
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun"
    exit 77
fi
exec timeout 120 "$MPIRUN" -np 2 "$top_builddir/tests/test_transport_message"
