#!/bin/bash
# Runs tests/test_transport (cmocka) on two ranks; see that file.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
: "${top_builddir:=.}"
: "${MPIRUN:=}"
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun"
    exit 77
fi
# A wait whose MPI_Test never returns (as Open MPI's did after a failed write
# to a dead node) ends the rank through the --comm-timeout guard: status 1
# and the guard's message, timeout 1 s + 5 s after the wait began. Without
# the guard it hangs until this timeout.
start=$SECONDS
out="$(timeout 60 "$MPIRUN" -np 2 "$top_builddir/tests/test_transport" --stuck-mpi 2>&1)"
rc=$?
took=$((SECONDS - start))
if [ "$rc" = 0 ] || [ "$rc" = 124 ] || [ "$took" -gt 30 ] ||
    ! grep -q "stage 1 waited 6 s (--comm-timeout 1 + 5) for activation gradients of micro-batch 3, peer stage 0.*inside an MPI call that did not return" <<<"$out"; then
    echo "FAIL: a wait stuck inside MPI_Test: status $rc after $took s (want 1 within 30 s, the guard's message); output:"
    echo "$out"
    exit 1
fi
echo "ok: a wait stuck inside MPI_Test ended the rank after $took s: $(grep -m1 'did not return' <<<"$out")"
exec timeout 120 "$MPIRUN" -np 2 "$top_builddir/tests/test_transport"
