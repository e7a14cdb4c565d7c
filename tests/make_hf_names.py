#!/usr/bin/env python3
"""Test helper: rewrite an official-named RWKV-7 safetensors with HF/fla names.

usage: make_hf_names.py IN.safetensors OUT.safetensors [--keep-layer0-v] [--fuse-x]

Follows docs/rwkv7-spec.md section 4.2 (the layout of fla-hub/rwkv7-* files):
LoRA matrices transposed, w0/a0/v0, k_k, k_a and ffn.x_k squeezed to [C],
x_r..x_g kept [1,1,C], blocks.0.att.v0/v1/v2 dropped (unless --keep-layer0-v).
--fuse-x writes attn.x_r..x_g as one attn.x_x [6, C] tensor (the other fla
flavour). Tensors are written in sorted name order, as HF tools do.
Stdlib only; used by tests/test_convert.sh, not installed.
"""

import argparse
import json
import re
import struct
import sys
from array import array

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}


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
    for name, info in header.items():
        a, b = info["data_offsets"]
        dt, shape, raw = info["dtype"], info["shape"], data[base + a:base + b]
        m = re.match(r"blocks\.(\d+)\.(.+)\Z", name)
        if name == "emb.weight":
            out["model.embeddings.weight"] = (dt, shape, raw)
        elif name == "head.weight":
            out["lm_head.weight"] = (dt, shape, raw)
        elif name.startswith("ln_out."):
            out["model.norm." + name[7:]] = (dt, shape, raw)
        elif m:
            i, rest = int(m.group(1)), m.group(2)
            L = "model.layers.%d." % i
            mm = re.match(r"att\.([wavg])([012])\Z", rest)
            if mm and i == 0 and mm.group(1) == "v" and not args.keep_layer0_v:
                continue
            if rest.startswith("ln0."):
                out[L + "pre_norm." + rest[4:]] = (dt, shape, raw)
            elif rest.startswith("ln1."):
                out[L + "attn_norm." + rest[4:]] = (dt, shape, raw)
            elif rest.startswith("ln2."):
                out[L + "ffn_norm." + rest[4:]] = (dt, shape, raw)
            elif re.match(r"att\.x_[rwkvag]\Z", rest):
                if args.fuse_x:
                    xparts.setdefault(i, {})[rest[-1]] = (dt, raw)
                else:
                    out[L + "attn." + rest[4:]] = (dt, shape, raw)
            elif mm:
                x, k = mm.group(1), mm.group(2)
                if k == "0":
                    out[L + "attn.%s_lora.lora.2.bias" % x] = (dt, [shape[-1]], raw)
                else:
                    r, c = shape
                    hf = L + "attn.%s_lora.lora.%s.weight" % (x, "0" if k == "1" else "2")
                    out[hf] = (dt, [c, r], transpose(raw, r, c, ITEMSIZE[dt]))
            elif rest in ("att.k_k", "att.k_a"):
                out[L + "attn." + rest[4:]] = (dt, [shape[-1]], raw)
            elif rest == "att.r_k":
                out[L + "attn.r_k"] = (dt, shape, raw)
            elif re.match(r"att\.(receptance|key|value|output)\.weight\Z", rest):
                out[L + "attn.%s.weight" % PROJ[rest.split(".")[1]]] = (dt, shape, raw)
            elif rest.startswith("att.ln_x."):
                out[L + "attn.g_norm." + rest[9:]] = (dt, shape, raw)
            elif rest == "ffn.x_k":
                out[L + "ffn.x_k"] = (dt, [shape[-1]], raw)
            elif rest.startswith("ffn."):
                out[L + rest] = (dt, shape, raw)
            else:
                sys.exit("make_hf_names: unexpected tensor %s" % name)
        else:
            sys.exit("make_hf_names: unexpected tensor %s" % name)
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
