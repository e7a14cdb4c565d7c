#!/usr/bin/env python3
"""Compares an `rwkvpipe logits` output file with a golden file (stdlib only).

usage: check_logits.py OUT.safetensors GOLDEN.safetensors [--tol 1e-4]
       check_logits.py --tokens GOLDEN.safetensors   (prints its tokens: 1,2,3)

Checks that `tokens` are equal and that `logits`, `state.att_x_prev`,
`state.ffn_x_prev` and `state.wkv` have the golden shapes and
max|out - ref| <= tol * max|ref| each. Prints one line per tensor; exits 1 on
the first mismatch. Called by tests/test_cli.sh.
"""
import array
import json
import struct
import sys

FLOAT_TENSORS = ("logits", "state.att_x_prev", "state.ffn_x_prev", "state.wkv")
TYPECODES = {"F32": "f", "I32": "i"}


def read_safetensors(path):
    """Returns {name: (dtype, shape, values)} for the F32/I32 tensors of path."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: {len(blob)} bytes, too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if 8 + header_len > len(blob):
        raise ValueError(f"{path}: header length {header_len} runs past the file")
    header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    data = blob[8 + header_len:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = entry["dtype"], entry["shape"]
        begin, end = entry["data_offsets"]
        if dtype not in TYPECODES:
            continue
        values = array.array(TYPECODES[dtype])
        values.frombytes(data[begin:end])
        if sys.byteorder != "little":
            values.byteswap()
        numel = 1
        for d in shape:
            numel *= d
        if len(values) != numel:
            raise ValueError(f"{path}: tensor {name} has {len(values)} values, shape {shape}")
        tensors[name] = (dtype, shape, values)
    return tensors


def main(argv):
    args = list(argv[1:])
    tol = 1e-4
    if "--tol" in args:
        i = args.index("--tol")
        tol = float(args[i + 1])
        del args[i:i + 2]
    grads_mode = "--grads" in args
    if grads_mode:
        args.remove("--grads")
    if len(args) == 2 and args[0] == "--tokens":
        print(",".join(str(t) for t in read_safetensors(args[1])["tokens"][2]))
        return 0
    if len(args) != 2:
        print("\n".join(__doc__.strip().splitlines()[2:4]), file=sys.stderr)
        return 2
    out_path, ref_path = args
    out, ref = read_safetensors(out_path), read_safetensors(ref_path)

    # --grads: REF is a golden gradient file; compare `loss` and every
    # parameter gradient it holds (tensors that are 0 there must be 0 here).
    names = ("tokens",) + FLOAT_TENSORS
    if grads_mode:
        names = tuple(n for n in ref if n not in ("input_tokens", "target_tokens", "__metadata__"))
    for name in names:
        if name not in out:
            print(f"FAIL: {out_path} has no tensor '{name}'")
            return 1
        if name not in ref:
            print(f"FAIL: {ref_path} has no tensor '{name}'")
            return 1
        (odt, oshape, ovals), (rdt, rshape, rvals) = out[name], ref[name]
        if odt != rdt or oshape != rshape:
            print(f"FAIL: {name}: {odt} {oshape} in {out_path}, expected {rdt} {rshape}")
            return 1
        if name == "tokens":
            if list(ovals) != list(rvals):
                print(f"FAIL: tokens {list(ovals)} != golden {list(rvals)}")
                return 1
            print(f"ok: tokens equal ({len(ovals)})")
            continue
        max_ref = max((abs(v) for v in rvals), default=0.0) or 1e-30
        if grads_mode:
            max_ref = max(max_ref, 1e-4)  # an all-zero reference gradient: absolute floor
        max_diff = 0.0
        for a, b in zip(ovals, rvals):
            d = abs(a - b)
            if not d <= max_diff:  # NaN fails below
                max_diff = d
        rel = max_diff / max_ref
        if not rel <= tol:
            print(f"FAIL: {name}: max|diff| / max|ref| = {rel:.3g} > {tol:g}")
            return 1
        print(f"ok: {name} {oshape}: relative error {rel:.3g} <= {tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
