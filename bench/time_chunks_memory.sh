#!/bin/bash
# Time chunks benchmark (docs/perf/cpu.md, Long sequences): peak RSS and
# training tokens/s of `train --seq-len L --ctx-len T` as L grows, on the CPU
# backend, one process. Memory should stay flat (one chunk's activations;
# per chunk only its start state is kept) and tokens/s within 10%.
# usage: bench/time_chunks_memory.sh BUILD_DIR [T] [L...]
# (default T 512, L 4096 16384 65536; --threads 1; tokens/s: the best of
# steps 2-4, the first warms up, on a shared machine the best is the least
# disturbed; evaluation is outside the timed steps).
set -u
BIN="${1:?usage: $0 BUILD_DIR [T] [L...]}/rwkvpipe"
T=${2:-512}
shift 2 2>/dev/null || shift $#
LENS=("$@")
[ ${#LENS[@]} -eq 0 ] && LENS=(4096 16384 65536)
W=$(mktemp -d "${TMPDIR:-/tmp}/time_chunks_bench.XXXXXX") || exit 1
trap 'rm -rf "$W"' EXIT
printf "| seq-len | chunks of %d | peak RSS (MiB) | tokens/s (best of steps 2-4) |\n|---:|---:|---:|---:|\n" "$T"
for L in "${LENS[@]}"; do
    /usr/bin/time -f "%M" -o "$W/rss" "$BIN" train --data copy --ctx-len "$T" --seq-len "$L" \
        --batch 1 --steps 4 --warmup 0 --eval-interval 0 --eval-batches 1 --log-interval 1 \
        --threads 1 --metrics "$W/m.jsonl" -q >/dev/null 2>"$W/err" || { cat "$W/err"; exit 1; }
    tps=$(sed -n 2,4p "$W/m.jsonl" | sed 's/.*"tokens_per_s": \([0-9.]*\).*/\1/' | sort -g | tail -1)
    printf "| %d | %d | %.1f | %.0f |\n" "$L" $((L / T)) "$(echo "$(cat "$W/rss") / 1024" | bc -l)" "$tps"
done
