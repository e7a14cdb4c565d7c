#!/bin/bash
# Runs tests/test_transport_collective (cmocka) on two and on three ranks;
# see that file.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
: "${top_builddir:=.}"
: "${MPIRUN:=}"
if [ -z "$MPIRUN" ] || ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "skip: no mpirun"
    exit 77
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
for np in 2 3; do
    echo "== mpirun -np $np"
    timeout 180 "$MPIRUN" -np $np "$top_builddir/tests/test_transport_collective" ||
        exit 1
done
