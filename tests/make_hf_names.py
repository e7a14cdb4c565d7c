#!/usr/bin/env python3
"""Test helper: rewrite an official-named RWKV-7 safetensors with HF/fla names.

usage: make_hf_names.py IN.safetensors OUT.safetensors [--keep-layer0-v] [--fuse-x]

Follows docs/rwkv7-spec.md section 4.2 (the layout of fla-hub/rwkv7-* files):
LoRA matrices transposed, w0/a0/v0, k_k, k_a and ffn.x_k squeezed to [C],
x_r..x_g kept [1,1,C], blocks.0.att.v0/v1/v2 dropped (unless --keep-layer0-v).
--fuse-x writes attn.x_r..x_g as one attn.x_x [6, C] tensor (the other fla
flavour). Tensors are written in sorted name order, as HF tools do.
The names come from the converter's table (HF_NAMES in
tools/rwkvpipe-convert.py, checked equal to the C loader's), so the three
cannot drift apart. Stdlib only; used by tests/test_convert.sh and
tests/test_cli.sh, not installed.
"""

import argparse
import importlib.util
import json
import os
import re
import struct
import sys
from array import array

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def load_name_table():
    """official -> (HF name, kind) for global rows, suffix -> ... for layers."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tools",
                        "rwkvpipe-convert.py")
    spec = importlib.util.spec_from_file_location("rwkvpipe_convert", path)
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    glob = {o: (h, k) for scope, o, h, k in conv.HF_NAMES if scope == "global"}
    layer = {o: (h, k) for scope, o, h, k in conv.HF_NAMES if scope == "layer"}
    return glob, layer


def transpose(raw, rows, cols, isz):
    code = {2: "H", 4: "I" if array("I").itemsize == 4 else "L", 8: "Q"}[isz]
    a = array(code)
    a.frombytes(raw)
    out = array(code)
    for j in range(cols):
        out.extend(a[j::cols])
    return out.tobytes()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--keep-layer0-v", action="store_true")
    p.add_argument("--fuse-x", action="store_true")
    args = p.parse_args()
    with open(args.input, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}  # name -> (dtype, shape, bytes)
    xparts = {}
    glob, layer_names = load_name_table()
    for name, info in header.items():
        a, b = info["data_offsets"]
        dt, shape, raw = info["dtype"], info["shape"], data[base + a:base + b]
        m = re.match(r"blocks\.(\d+)\.(.+)\Z", name)
        if name in glob:
            hf, kind = glob[name]
        elif m and m.group(2) in layer_names:
            i, rest = int(m.group(1)), m.group(2)
            if i == 0 and rest in ("att.v0", "att.v1", "att.v2") and not args.keep_layer0_v:
                continue
            hf, kind = layer_names[rest]
            hf = "model.layers.%d.%s" % (i, hf)
            if re.match(r"att\.x_[rwkvag]\Z", rest):
                # fla keeps these [1,1,C] (or fuses them into attn.x_x [6, C])
                if args.fuse_x:
                    xparts.setdefault(i, {})[rest[-1]] = (dt, raw)
                    continue
                kind = "same"
        else:
            sys.exit("make_hf_names: unexpected tensor %s" % name)
        if kind == "reshape":  # fla squeezes the other [1,1,C] vectors to [C]
            out[hf] = (dt, [shape[-1]], raw)
        elif kind == "transpose":
            r, c = shape
            out[hf] = (dt, [c, r], transpose(raw, r, c, ITEMSIZE[dt]))
        else:
            out[hf] = (dt, shape, raw)
    for i, parts in xparts.items():
        dts = {d for d, _ in parts.values()}
        raw = b"".join(parts[x][1] for x in "rwkvag")
        c = len(parts["r"][1]) // ITEMSIZE[dts.pop()]
        out["model.layers.%d.attn.x_x" % i] = (parts["r"][0], [6, c], raw)

    hdr = {"__metadata__": {"format": "pt"}}
    off = 0
    names = sorted(out)
    for name in names:
        dt, shape, raw = out[name]
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    hj = json.dumps(hdr).encode()
    hj += b" " * (-len(hj) % 8)
    with open(args.output, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for name in names:
            f.write(out[name][2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
