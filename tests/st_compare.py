#!/usr/bin/env python3
"""Compare two safetensors files tensor by tensor (test helper, stdlib only).

usage: st_compare.py A B [--tol T] [--skip REGEX] [--expect-dtype DT] [--bf16-rne]

  default        same names, same shapes; values equal exactly after converting
                 both to float (so F32 vs BF16-widened compare by value); tensors
                 of the same dtype are compared byte for byte.
  --tol T        values may differ by T * max(1, |a|) instead.
  --skip REGEX   ignore tensors whose name matches REGEX (in either file).
  --expect-dtype DT   every tensor of B must have dtype DT.
  --bf16-rne     A is F32, B is BF16 and B's bits must equal
                 (u + 0x7FFF + ((u >> 16) & 1)) >> 16 of A's bits u, element by
                 element (independent reference for the converter's rounding).

Exit status 0 when they match, 1 with a list of differences otherwise, 2 on
unreadable input.
"""

import argparse
import json
import math
import re
import struct
import sys

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4,
            "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FMT = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h",
       "I8": "b", "U8": "B", "BOOL": "?"}


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        tensors[name] = (info["dtype"], list(info["shape"]), data[base + a:base + b])
    return tensors, meta


def values(dtype, raw):
    if dtype == "BF16":
        n = len(raw) // 2
        u = struct.unpack("<%dH" % n, raw)
        return struct.unpack("<%df" % n, struct.pack("<%dI" % n, *[x << 16 for x in u]))
    return struct.unpack("<%d%s" % (len(raw) // ITEMSIZE[dtype], FMT[dtype]), raw)


def rne_bf16(u):
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return 0x7FC0
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tol", type=float, default=0.0)
    p.add_argument("--skip", default=None)
    p.add_argument("--expect-dtype", default=None)
    p.add_argument("--bf16-rne", action="store_true")
    args = p.parse_args()
    try:
        ta, _ = load(args.a)
        tb, _ = load(args.b)
    except (OSError, ValueError, KeyError, struct.error) as e:
        print("st_compare: cannot read input: %s" % e)
        return 2
    skip = re.compile(args.skip) if args.skip else None
    names_a = {n for n in ta if not (skip and skip.search(n))}
    names_b = {n for n in tb if not (skip and skip.search(n))}
    errs = []
    for n in sorted(names_a - names_b):
        errs.append("only in A: %s" % n)
    for n in sorted(names_b - names_a):
        errs.append("only in B: %s" % n)
    checked = 0
    for n in sorted(names_a & names_b):
        da, sa, ra = ta[n]
        db, sb, rb = tb[n]
        if sa != sb:
            errs.append("%s: shape %s vs %s" % (n, sa, sb))
            continue
        if args.expect_dtype and db != args.expect_dtype:
            errs.append("%s: dtype %s, expected %s" % (n, db, args.expect_dtype))
            continue
        checked += 1
        if args.bf16_rne:
            if da != "F32" or db != "BF16":
                errs.append("%s: --bf16-rne needs F32 vs BF16, got %s vs %s" % (n, da, db))
                continue
            k = len(ra) // 4
            ua = struct.unpack("<%dI" % k, ra)
            ub = struct.unpack("<%dH" % k, rb)
            bad = [i for i in range(k) if rne_bf16(ua[i]) != ub[i]]
            if bad:
                i = bad[0]
                errs.append("%s: %d element(s) not RNE-rounded, first [%d]: f32 0x%08x "
                            "-> 0x%04x, expected 0x%04x" % (n, len(bad), i, ua[i], ub[i],
                                                            rne_bf16(ua[i])))
            continue
        if da == db and args.tol == 0.0:
            if ra != rb:
                errs.append("%s: bytes differ (%s)" % (n, da))
            continue
        va, vb = values(da, ra), values(db, rb)
        nbad, first = 0, None
        for i, (x, y) in enumerate(zip(va, vb)):
            if x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)):
                continue
            if args.tol > 0 and abs(x - y) <= args.tol * max(1.0, abs(x)):
                continue
            nbad += 1
            if first is None:
                first = (i, x, y)
        if nbad:
            errs.append("%s: %d value(s) differ (%s vs %s), first [%d]: %r vs %r"
                        % ((n, nbad, da, db) + first))
    if errs:
        print("st_compare: %s vs %s: %d difference(s)" % (args.a, args.b, len(errs)))
        for e in errs[:30]:
            print("  " + e)
        return 1
    print("st_compare: %d tensors match (%s)" % (checked, "bf16 RNE" if args.bf16_rne else
                                                 "tol %g" % args.tol if args.tol else "exact"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
