# shellcheck shell=bash
# Sourced by launch/train.sbatch and launch/serve.sbatch (not run): picks how
# to start the MPI ranks inside a Slurm allocation and fills two variables:
#   launcher       array: the command to put before the rwkvpipe binary
#   launcher_name  text for the logs
# Inputs (environment): LAUNCHER (auto|srun|mpirun), SRUN_MPI (pmix, pmi2 or
# empty = pick from `srun --mpi=list`), MPIRUN_ARGS, SLURM_NTASKS,
# SLURM_CPUS_PER_TASK; NCCL_* variables are passed to every rank.
# Returns non-zero (with a message on stderr) when LAUNCHER cannot be honoured.

pick_srun_mpi() {
    local list
    list="$(srun --mpi=list 2>&1)" || return 1
    for type in pmix pmi2; do
        if grep -Eq "(^|[[:space:]:])${type}([[:space:]]|$)" <<<"$list"; then
            echo "$type"
            return 0
        fi
    done
    return 1
}

slurm_pick_launcher() {
    local who="$1"
    launcher=()
    case "${LAUNCHER:-auto}" in
        auto|srun)
            if command -v srun >/dev/null; then
                [ -z "${SRUN_MPI:-}" ] && SRUN_MPI="$(pick_srun_mpi || true)"
            fi
            if [ -n "${SRUN_MPI:-}" ]; then
                launcher=(srun "--mpi=$SRUN_MPI" --kill-on-bad-exit=1)
                # Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch.
                [ -n "${SLURM_CPUS_PER_TASK:-}" ] &&
                    launcher+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
            elif [ "${LAUNCHER:-auto}" = srun ]; then
                echo "$who: LAUNCHER=srun but srun lists no pmix or pmi2 MPI type" \
                    "(srun --mpi=list); set SRUN_MPI or use LAUNCHER=mpirun" >&2
                return 2
            fi
            ;;
        mpirun) ;;
        *) echo "$who: LAUNCHER must be auto, srun or mpirun, not '$LAUNCHER'" >&2; return 2 ;;
    esac
    launcher_name="srun --mpi=${SRUN_MPI:-}"
    if [ ${#launcher[@]} -eq 0 ]; then
        launcher_name=mpirun
        # mpirun reads the Slurm allocation (nodes and tasks per node) itself.
        launcher=(mpirun -np "${SLURM_NTASKS:?sbatch sets SLURM_NTASKS}")
        local cpus="${SLURM_CPUS_PER_TASK:-1}"
        if [ "$cpus" -gt 1 ]; then
            # Each rank on its own CPUs of the allocation (Slurm counts hardware
            # threads as CPUs, hence --use-hwthread-cpus).
            launcher+=(--use-hwthread-cpus --map-by "slot:PE=$cpus" --bind-to hwthread)
        fi
        # Remote ranks get the variables named with -x (OMPI_MCA_* travel anyway).
        local name
        while IFS= read -r name; do
            launcher+=(-x "$name")
        done < <(compgen -e | grep -E '^NCCL_' || true)
        # shellcheck disable=SC2206
        [ -n "${MPIRUN_ARGS:-}" ] && launcher+=($MPIRUN_ARGS)
    fi
    return 0
}
