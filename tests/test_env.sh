# shellcheck shell=bash
# Sourced first by the shell tests in tests/: what `make check` passes them
# (AM_TESTS_ENVIRONMENT), with defaults for a run by hand from the source
# tree, and Open MPI allowed to run as root and to oversubscribe the cores
# (CI runs as root on 2 cores). A test sources it with
#   . "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"
: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${top_builddir:=.}"
: "${PYTHON3:=python3}"
: "${MPIRUN:=}"
: "${RP_TEST_DATA:=$top_srcdir/tests/data}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
