#!/usr/bin/env python3
"""Two `train --metrics` files hold the same steps (test helper, stdlib only).

usage: same_metrics.py A.jsonl B.jsonl [--rows N]

Every row equal (losses, learning rates, gradient norms, evals) except the
timings (tokens_per_s, elapsed_s), and at least one row; with --rows N,
exactly N rows. Exit status 0 when they match, 1 (with both listed) when not.
"""
import json
import sys


def load(path):
    rows = [json.loads(line) for line in open(path)]
    for row in rows:
        for key in ("tokens_per_s", "elapsed_s"):
            row.pop(key, None)
    return rows


def main(argv):
    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--rows"):
        sys.exit(__doc__)
    a, b = load(argv[0]), load(argv[1])
    want = int(argv[3]) if len(argv) == 4 else None
    if not a or a != b or (want is not None and len(a) != want):
        print(f"metrics differ: {argv[0]} ({len(a)} rows) vs {argv[1]} ({len(b)} rows)"
              + (f", {want} rows wanted" if want is not None else ""), file=sys.stderr)
        for x, y in zip(a, b):
            if x != y:
                print(f"  first difference: {x}\n                vs {y}", file=sys.stderr)
                break
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
