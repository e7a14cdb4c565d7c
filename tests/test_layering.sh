#!/bin/bash
# The layering of docs/architecture.md, enforced: every #include "..." line in
# src/ and cuda/ must point at the file's own folder or at a folder below it
# (cli -> serve -> infer/train -> pipe -> optim/model/text -> backend -> core).
# Also: MPI is called only in src/pipe/ (the transport, docs/parallelism.md)
# and in the start-up of src/cli (cli.c, cli.h, main.c): everything else
# moves data through the transport, with its checks and watchdog.
# Usage: test_layering.sh [ROOT] (default: $top_srcdir). Without ROOT it first
# checks itself on a scratch tree with an upward include and an MPI call
# outside src/pipe, which must fail.
set -u

# Folders each folder may include from (besides itself). backend = src/backend.h,
# the op interface; cpu and cuda implement it; generated = configure's config.h
# and protoc-c's rwkvpipe.pb-c.h (proto/), usable everywhere.
allowed() {
    case "$1" in
    core)    echo "core generated" ;;
    backend) echo "core generated" ;;
    cpu)     echo "backend core generated" ;;
    cuda)    echo "backend core generated" ;;
    model)   echo "backend core generated" ;;
    optim)   echo "model backend core generated" ;;
    text)    echo "core generated" ;;
    pipe)    echo "optim model text backend core generated" ;;
    train)   echo "pipe optim model text backend core generated" ;;
    infer)   echo "pipe optim model text backend core generated" ;;
    serve)   echo "infer pipe optim model text backend core generated" ;;
    cli)     echo "serve train infer pipe optim model text cpu cuda backend core generated" ;;
    *)       echo "" ;;
    esac
}

# The folder an include names: "dir/x.h" -> dir; unqualified names are the
# ones reached through -I src, -I cuda and the build tree.
target_of() {
    case "$1" in
    */*) echo "${1%%/*}" ;;
    backend.h) echo backend ;;
    cuda_*.h) echo cuda ;;
    config.h | rwkvpipe.pb-c.h) echo generated ;;
    *) echo "unknown" ;;
    esac
}

# The folder a source file belongs to.
folder_of() {
    case "$1" in
    src/backend.h) echo backend ;;
    src/*/*) local r="${1#src/}"; echo "${r%%/*}" ;;
    cuda/*) echo cuda ;;
    *) echo "unknown" ;;
    esac
}

# Prints one line per include that breaks the order; returns 1 if any.
check_tree() {
    local root="$1" bad=0 f rel from inc to
    while IFS= read -r f; do
        rel="${f#"$root"/}"
        from="$(folder_of "$rel")"
        if [ -z "$(allowed "$from")" ]; then
            echo "$rel: folder '$from' has no place in the layer order (add it to tests/test_layering.sh and docs/architecture.md)"
            bad=1
            continue
        fi
        while IFS= read -r inc; do
            to="$(target_of "$inc")"
            [ "$to" = "$from" ] && continue
            case " $(allowed "$from") " in
            *" $to "*) ;;
            *) echo "$rel: #include \"$inc\" points from $from/ to $to/, against the layer order"
               bad=1 ;;
            esac
        done < <(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$f")
    done < <(find "$root/src" "$root/cuda" -type f \( -name '*.c' -o -name '*.h' -o -name '*.cu' \) | sort)
    return $bad
}

# Files outside src/pipe/ that may name MPI_: the start-up of the CLI.
MPI_ALLOWED="src/cli/cli.c src/cli/cli.h src/cli/main.c"

# Prints one line per file outside src/pipe/ that names MPI_; returns 1 if any.
check_mpi() {
    local root="$1" bad=0 f rel ok pat
    while IFS= read -r f; do
        rel="${f#"$root"/}"
        ok=0
        for pat in $MPI_ALLOWED; do
            # shellcheck disable=SC2254
            case "$rel" in $pat) ok=1 ;; esac
        done
        [ $ok -eq 1 ] && continue
        echo "$rel: calls MPI (line $(grep -n -m1 'MPI_' "$f" | cut -d: -f1)); move data through the transport (src/pipe/transport.h)"
        bad=1
    done < <(grep -rl --include='*.c' --include='*.h' --include='*.cu' 'MPI_' "$root/src" "$root/cuda" 2>/dev/null |
             grep -v "^$root/src/pipe/" | sort)
    return $bad
}

root="${1:-${top_srcdir:-$(cd "$(dirname "$0")/.." && pwd)}}"

if [ $# -eq 0 ]; then
    # The check must be able to fail: an optimizer that includes the trainer
    # (upward) and a tokenizer that includes the model (sideways).
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    mkdir -p "$scratch/src/optim" "$scratch/src/text" "$scratch/src/train" "$scratch/cuda"
    printf '#include "core/error.h"\n#include "train/trainer.h"\n' > "$scratch/src/optim/o.c"
    printf '#include "model/model.h"\n' > "$scratch/src/text/t.h"
    printf '#include "optim/optim.h"\n#include "text/tokenizer.h"\n' > "$scratch/src/train/ok.c"
    out="$(check_tree "$scratch")" && { echo "FAIL: planted upward include not caught"; exit 1; }
    echo "$out" | grep -q 'src/optim/o.c: #include "train/trainer.h"' ||
        { echo "FAIL: upward include not named: $out"; exit 1; }
    echo "$out" | grep -q 'src/text/t.h: #include "model/model.h"' ||
        { echo "FAIL: sideways include not named: $out"; exit 1; }
    [ "$(echo "$out" | wc -l)" -eq 2 ] || { echo "FAIL: allowed includes flagged: $out"; exit 1; }
    # MPI outside src/pipe and the CLI start-up must be caught; inside, not.
    mkdir -p "$scratch/src/pipe" "$scratch/src/cli"
    printf 'void f(void) { MPI_Barrier(MPI_COMM_WORLD); }\n' > "$scratch/src/train/t.c"
    printf 'void g(void) { MPI_Barrier(MPI_COMM_WORLD); }\n' > "$scratch/src/pipe/p.c"
    printf 'void h(void) { MPI_Barrier(MPI_COMM_WORLD); }\n' > "$scratch/src/cli/main.c"
    printf 'void i(void) { MPI_Barrier(MPI_COMM_WORLD); }\n' > "$scratch/src/cli/cmd_x.c"
    out="$(check_mpi "$scratch")" && { echo "FAIL: planted MPI call not caught"; exit 1; }
    echo "$out" | grep -q '^src/train/t.c: calls MPI' || { echo "FAIL: MPI in train not named: $out"; exit 1; }
    echo "$out" | grep -q '^src/cli/cmd_x.c: calls MPI' || { echo "FAIL: MPI in a command not named: $out"; exit 1; }
    [ "$(echo "$out" | wc -l)" -eq 2 ] || { echo "FAIL: allowed MPI calls flagged: $out"; exit 1; }
fi

if ! check_tree "$root"; then
    echo "FAIL: includes against the layer order (docs/architecture.md)"
    exit 1
fi
if ! check_mpi "$root"; then
    echo "FAIL: MPI called outside src/pipe/ and the CLI start-up (docs/parallelism.md)"
    exit 1
fi
echo "PASS: every include in $root/src and $root/cuda follows the layer order; MPI only in src/pipe/ and the CLI start-up"
