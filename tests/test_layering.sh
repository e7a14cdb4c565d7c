#!/bin/bash
# The layering of docs/architecture.md, enforced: every #include "..." line in
# src/ and cuda/ must point at the file's own folder or at a folder below it
# (cli -> serve -> infer/train -> pipe -> optim/model/text -> backend -> core).
# Usage: test_layering.sh [ROOT] (default: $top_srcdir). Without ROOT it first
# checks itself on a scratch tree with an upward include, which must fail.
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
fi

if ! check_tree "$root"; then
    echo "FAIL: includes against the layer order (docs/architecture.md)"
    exit 1
fi
echo "PASS: every include in $root/src and $root/cuda follows the layer order"
