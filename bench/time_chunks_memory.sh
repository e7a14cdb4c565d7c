#!/bin/bash
# Time chunks benchmark (docs/perf/cpu.md, Time chunks): peak RSS and
# training throughput of `train --seq-len L --ctx-len T` as L grows, on the
# CPU backend, one process, --threads 1. Memory should stay flat (one chunk's
# activations; per chunk only its start state is kept) and tokens/s within
# 10%. Throughput is tokens per CPU-second of the steps alone: the CPU time
# (user + sys) of a 4-step run minus that of a 1-step run, over 3 x L
# tokens (start-up, data and the final evaluation cancel out), so other
# jobs on a shared machine do not move it; wall-clock tokens/s (best of
# steps 2-4) is shown too.
# usage: [PP=P] bench/time_chunks_memory.sh BUILD_DIR [T] [L...]
# (default T 512, L 4096 16384 65536). PP=P (P > 1) runs `--pp P` under
# mpirun -np P: peak RSS per rank (each rank its own /usr/bin/time), CPU
# time summed over the ranks.
set -u
PP=${PP:-1}
BIN="${1:?usage: $0 BUILD_DIR [T] [L...]}/rwkvpipe"
T=${2:-512}
shift 2 2>/dev/null || shift $#
LENS=("$@")
[ ${#LENS[@]} -eq 0 ] && LENS=(4096 16384 65536)
W=$(mktemp -d "${TMPDIR:-/tmp}/time_chunks_bench.XXXXXX") || exit 1
trap 'rm -rf "$W"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
run() {  # run L STEPS: CPU seconds to $W/cpu, peak RSS KiB per rank to $W/rss
    local args=(train --data copy --ctx-len "$T" --seq-len "$1" --batch 1 --steps "$2"
                --warmup 0 --eval-interval 0 --eval-batches 1 --log-interval 1 --threads 1
                --metrics "$W/m.jsonl" -q)
    rm -f "$W"/time.*
    if [ "$PP" -gt 1 ]; then
        mpirun -np "$PP" sh -c '/usr/bin/time -f "%U %S %M" -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' \
            "$W/time" "$BIN" "${args[@]}" --pp "$PP" >/dev/null 2>"$W/err" ||
            { cat "$W/err"; exit 1; }
    else
        /usr/bin/time -f "%U %S %M" -o "$W/time.0" "$BIN" "${args[@]}" >/dev/null 2>"$W/err" ||
            { cat "$W/err"; exit 1; }
    fi
    local cpu=0 rss=""
    for r in $(seq 0 $((PP - 1))); do
        read -r u s k <"$W/time.$r"
        cpu=$(echo "$cpu + $u + $s" | bc -l)
        rss="$rss${rss:+ / }$(printf "%.1f" "$(echo "$k / 1024" | bc -l)")"
    done
    echo "$cpu" >"$W/cpu"
    echo "$rss" >"$W/rss"
}
ranks=""
[ "$PP" -gt 1 ] && for r in $(seq 0 $((PP - 1))); do ranks="$ranks${ranks:+ /} rank $r"; done
printf "| seq-len | chunks of %d | peak RSS (MiB%s) | tokens per CPU-second | wall tokens/s |\n" \
    "$T" "${ranks:+,$ranks}"
printf "|---:|---:|---:|---:|---:|\n"
for L in "${LENS[@]}"; do
    run "$L" 1
    cpu1=$(cat "$W/cpu")
    run "$L" 4
    cpu4=$(cat "$W/cpu")
    tps=$(sed -n 2,4p "$W/m.jsonl" | sed 's/.*"tokens_per_s": \([0-9.]*\).*/\1/' | sort -g | tail -1)
    printf "| %d | %d | %s | %.0f | %.0f |\n" "$L" $((L / T)) "$(cat "$W/rss")" \
        "$(echo "3 * $L / ($cpu4 - $cpu1)" | bc -l)" "$tps"
done
