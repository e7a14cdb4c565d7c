#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/corpus/TARGET/.

Seeds come from the tests' own cases and tests/data (a shrunk tiny model,
the hand-made vocab, the converter's bad .pth inputs) plus small hand-built
files. Deterministic; stdlib only. Run it again after changing a format:
  python3 tests/fuzz/make_corpus.py
"""
import io
import json
import os
import struct
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "tests", "data")
TINY = os.path.join(DATA, "tiny_L2_C128_V256_s1.weights.safetensors")
OUT = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- safetensors --------------------------------------------------------

def st_read(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    meta = h.pop("__metadata__", None)
    out = {}
    for k, v in h.items():
        s, e = v["data_offsets"]
        out[k] = (v["dtype"], v["shape"], b[8 + n + s:8 + n + e])
    return out, meta


def st_bytes(tensors, meta=None):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    h, off, blobs = {}, 0, []
    for name, dtype, shape, raw in tensors:
        h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    if meta is not None:
        h["__metadata__"] = meta
    hj = json.dumps(h, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    return struct.pack("<Q", len(hj)) + hj + b"".join(blobs)


def f32_to_bf16(raw):
    return b"".join(raw[i + 2:i + 4] for i in range(0, len(raw), 4))


def f32_to_f16(raw):
    vals = struct.unpack("<%df" % (len(raw) // 4), raw)
    return struct.pack("<%de" % len(vals), *vals)


def slice_leading(raw, shape, new_shape, item):
    """The leading sub-block new_shape of a row-major tensor."""
    if not shape:
        return raw[:item]
    if len(shape) == 1:
        return raw[:new_shape[0] * item]
    row = item
    for d in shape[1:]:
        row *= d
    return b"".join(slice_leading(raw[i * row:(i + 1) * row], shape[1:], new_shape[1:], item)
                    for i in range(new_shape[0]))


def shrunk_model():
    """tiny (L2 C128 V256 F512) -> L1 C64 V16 F128, BF16: a valid model of ~90 KB."""
    tensors, _ = st_read(TINY)
    out = []
    for name, (dtype, shape, raw) in tensors.items():
        if name.startswith("blocks.1."):
            continue
        if name.endswith("att.r_k"):
            new = [1, 64]
        elif name in ("emb.weight", "head.weight"):
            new = [16, 64]
        else:
            new = [{128: 64, 512: 128}.get(d, d) for d in shape]
        out.append((name, "BF16", new, f32_to_bf16(slice_leading(raw, shape, new, 4))))
    return out


def safetensors_seeds():
    tensors, meta = st_read(TINY)
    ln = tensors["blocks.0.ln0.weight"][2]
    xr = tensors["blocks.0.att.x_r"][2]
    put("safetensors", "f32_meta.st", st_bytes(
        [("blocks.0.ln0.weight", "F32", [128], ln), ("blocks.0.att.x_r", "F32", [1, 1, 128], xr)],
        meta))
    put("safetensors", "dtypes.st", st_bytes([
        ("a.f16", "F16", [4, 2], f32_to_f16(ln[:32])),
        ("b.bf16", "BF16", [8], f32_to_bf16(ln[:32])),
        ("c.f64", "F64", [2], struct.pack("<2d", 1.5, -2.0)),
        ("d.i32", "I32", [3], struct.pack("<3i", 1, -1, 7)),
        ("e.i64", "I64", [1], struct.pack("<q", 1 << 40)),
        ("f.u8", "U8", [2, 2], b"\x00\x01\xfe\xff"),
        ("g.scalar", "F32", [], struct.pack("<f", 3.0)),
        ("h.empty", "F32", [0, 5], b""),
    ], {"note": "every dtype, a scalar and an empty tensor"}))
    put("safetensors", "empty_header.st", st_bytes([]))
    put("safetensors", "only_meta.st", st_bytes([], {"k": "v", "format": "pt"}))
    # Near misses from test_safetensors: overlapping and out-of-range offsets.
    h = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' \
        b'"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}'
    put("safetensors", "overlap.st", struct.pack("<Q", len(h)) + h + bytes(12))
    h = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    put("safetensors", "short_data.st", struct.pack("<Q", len(h)) + h + bytes(8))
    put("model_load", "L1_C64_V16_bf16.st", st_bytes(shrunk_model(), {"format": "pt"}))


# ---- protobuf (hand-encoded; proto/rwkvpipe.proto) -----------------------

def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def pb_int(field, v):
    return varint(field << 3) + varint(v)


def pb_bytes(field, b):
    if isinstance(b, str):
        b = b.encode()
    return varint(field << 3 | 2) + varint(len(b)) + b


def pb_float(field, f):
    return varint(field << 3 | 5) + struct.pack("<f", f)


def model_config(L=2, C=128, V=256, F=512):
    return (pb_bytes(1, "rwkv7") + pb_int(2, L) + pb_int(3, C) + pb_int(4, 64) + pb_int(5, V)
            + pb_int(6, F) + pb_int(7, 16) + pb_int(8, 24) + pb_int(9, 8) + pb_int(10, 32))


def checkpoint_file(name, role, size, sha, lb, le, embed, head, index=0, count=1):
    return (pb_bytes(1, name) + pb_int(2, size) + pb_bytes(3, sha) + pb_bytes(4, role)
            + pb_int(5, lb) + pb_int(6, le) + pb_int(7, embed) + pb_int(8, head)
            + pb_int(9, index) + pb_int(10, count))


def manifest(files, optim=True, extra=True):
    m = (pb_int(1, 1) + pb_bytes(2, model_config()) + pb_int(3, 10) + pb_int(4, 5120)
         + pb_int(5, 10) + pb_int(6, 1)
         + pb_bytes(7, pb_int(1, 0) + pb_int(2, 3) + pb_int(3, 40) + pb_int(4, 20)))
    for f in files:
        m += pb_bytes(8, f)
    m += pb_bytes(9, "rwkvpipe 0.1.0") + pb_int(10, 1764892800)
    if extra:
        m += pb_bytes(11, pb_bytes(1, "note") + pb_bytes(2, "fuzz seed"))
    if optim:
        m += pb_bytes(12, pb_bytes(1, "cosine") + pb_float(2, 6e-4) + pb_float(3, 6e-5)
                      + pb_int(4, 10) + pb_int(5, 1000) + pb_float(6, 0.9) + pb_float(7, 0.99)
                      + pb_float(8, 1e-8) + pb_float(9, 0.1) + pb_float(10, 1.0))
    return m


def checkpoint_seeds():
    sha = "0123456789abcdef" * 4
    one = [checkpoint_file("weights.safetensors", "weights", 2026576, sha, 0, 2, 1, 1)]
    put("checkpoint_manifest", "weights_only.pb", manifest(one, optim=False, extra=False))
    full = [checkpoint_file("%s.safetensors" % r, r, 2026576, sha, 0, 2, 1, 1)
            for r in ("weights", "adam_m", "adam_v")]
    put("checkpoint_manifest", "full.pb", manifest(full))
    sharded = [checkpoint_file("%s-%05d-of-00002.safetensors" % (r, i), r, 1013288, sha,
                               i, i + 1, int(i == 0), int(i == 1), i, 2)
               for r in ("weights", "adam_m", "adam_v") for i in range(2)]
    put("checkpoint_manifest", "pp2.pb", manifest(sharded))


# ---- session states -------------------------------------------------------

def session_seeds():
    zeros = lambda n: bytes(2 * n)  # F16 zeros
    hdr = pb_bytes(1, model_config()) + pb_int(2, 16) + pb_bytes(3, "rwkvpipe 0.1.0")
    put("session_file", "session_f16.st", st_bytes([
        ("state.att_x_prev", "F16", [2, 128], zeros(256)),
        ("state.ffn_x_prev", "F16", [2, 128], zeros(256)),
        ("state.wkv", "F16", [2, 2, 64, 64], zeros(2 * 2 * 64 * 64)),
    ], {"rwkvpipe.session": hdr.hex()}))
    put("session_file", "time_state_bf16.st", st_bytes([
        ("blocks.%d.att.time_state" % l, "BF16", [2, 64, 64], zeros(2 * 64 * 64))
        for l in range(2)]))


# ---- token shards and tokenize input ---------------------------------------

def shard(tokens, n_ids, kind=0, u32=False, docs=None):
    fmt = "<%d%s" % (len(tokens), "I" if u32 else "H")
    docs = tokens.count(0) if docs is None else docs
    return (b"RWKVTOK1" + struct.pack("<IIIIQQ", 1, kind, n_ids, int(u32), len(tokens), docs)
            + bytes(24) + struct.pack(fmt, *tokens))


def shard_seeds():
    text = [b for b in b"Hello, world!"] + [0] + [b for b in b"second"] + [0]
    put("shard", "bytes_u16.tok", shard(text, 256))
    put("shard", "world_u32.tok", shard([65529, 1, 0, 300, 0], 65536 + 1, kind=1, u32=True))
    put("shard", "empty.tok", shard([], 256))


def tokenize_seeds():
    # First byte: bit 0 = kind (0 JSONL, 1 text), the rest = chunk size - 1.
    jl = (b'{"text": "Hello, world"}\n\n{"text": "caf\\u00e9 \\ud83d\\ude00", "id": 2}\n'
          b'{"text": ""}\n{"text": "tab\\tnul\\u0000end"}\n')
    put("tokenize_jsonl", "jsonl_chunk4.bin", bytes([3 << 1]) + jl)
    put("tokenize_jsonl", "jsonl_no_final_newline.bin", bytes([0]) + b'{"text": "x"}')
    put("tokenize_jsonl", "text_chunk8.bin", bytes([7 << 1 | 1]) +
        "plain text, caf\u00e9 \u4e2d\u6587\n".encode())
    cases = os.path.join(ROOT, "..", "shared", "vocab", "world_tokenizer_cases.jsonl")
    if os.path.exists(cases):
        put("tokenize_jsonl", "world_cases_head.bin", bytes([16 << 1]) + open(cases, "rb").read()[:2048])


# ---- vocab and UTF-8 ------------------------------------------------------

def vocab_seeds():
    hand = open(os.path.join(DATA, "vocab_handmade.txt"), "rb").read()
    put("vocab", "handmade.txt", hand)
    world = os.path.join(ROOT, "..", "shared", "vocab", "rwkv_vocab_v20230424.txt")
    if os.path.exists(world):
        lines = open(world, "rb").read().splitlines(keepends=True)
        put("vocab", "world_head.txt", b"".join(lines[:300]))
        put("vocab", "world_tail.txt", b"".join(lines[-40:]))
    put("vocab", "escapes.txt", "1 'a' 1\n2 b'\\x00' 1\n3 '\\u00e9' 2\n4 \"\\\"q\" 2\n"
        "5 b'\\377\\n' 2\n6 '\u4e2d' 3\n7 '\\U0001F600' 4\n".encode())
    for name, s in (("ascii.txt", "Hello, world"), ("mixed.txt", "caf\u00e9 \u4e2d\u6587 \U0001F600")):
        put("utf8_stream", name, b"\x02" + s.encode())
    put("utf8_stream", "invalid.bin", b"\x00\xc3(\xa0\xa1\xe2\x28\xa1\xf0\x90\x28\xbc\xed\xa0\x80\xff")


# ---- .pth (converter) ------------------------------------------------------

def pkl_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def pkl_int(v):
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def pkl_tuple(items):
    return b"(" + b"".join(items) + b"t"


def tensor_pickle(entries):
    """A torch state_dict pickle (protocol 2, as torch.save writes it).
    entries: (name, storage type, key, numel, size, stride)."""
    p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01("
    for name, stype, key, numel, size, stride in entries:
        p += pkl_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        p += pkl_tuple([pkl_str("storage"), b"ctorch\n" + stype.encode() + b"\n",
                        pkl_str(key), pkl_str("cpu"), pkl_int(numel)]) + b"Q"
        p += pkl_int(0) + pkl_tuple([pkl_int(d) for d in size])
        p += pkl_tuple([pkl_int(d) for d in stride])
        p += b"\x89ccollections\nOrderedDict\n)Rt" + b"R"
    return p + b"u."


def pth_zip(pkl, blobs, prefix="archive/"):
    # A fixed date per member: the seeds are the same bytes on every run.
    def put_member(z, name, data):
        z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        put_member(z, prefix + "data.pkl", pkl)
        put_member(z, prefix + "byteorder", b"little")
        for k, v in blobs.items():
            put_member(z, prefix + "data/" + k, v)
        put_member(z, prefix + "version", b"3\n")
    return buf.getvalue()


def pth_seeds():
    tensors, _ = st_read(TINY)
    ln = tensors["blocks.0.ln0.weight"][2]
    pkl = tensor_pickle([
        ("blocks.0.ln0.weight", "FloatStorage", "0", 128, [128], [1]),
        ("blocks.0.att.r_k", "BFloat16Storage", "1", 16, [2, 8], [8, 1]),
        ("blocks.0.att.x_r", "HalfStorage", "2", 8, [1, 1, 8], [8, 8, 1]),
    ])
    blobs = {"0": ln, "1": f32_to_bf16(ln[:64]), "2": f32_to_f16(ln[:32])}
    put("pth", "small_state_dict.pth", pth_zip(pkl, blobs))
    # The converter test's malicious pickles (tests/test_convert.sh).
    evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x85R."
    put("pth", "evil_os.pth", pth_zip(evil, {}, "evil/"))
    evil = b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R."
    put("pth", "evil_eval.pth", pth_zip(evil, {}, "evil/"))
    put("pth", "evil_inner.pth", pth_zip(pkl.replace(b"ctorch\nHalfStorage\n", b"cposix\nsystem\n"),
                                         blobs))
    # A safetensors input goes down the converter's other path.
    put("pth", "official.safetensors", st_bytes(shrunk_model()[:6], {"format": "pt"}))


def http_request_seeds():
    # Request bodies of the API (docs/serving.md, tests/test_serve.sh).
    bodies = {
        "completion.json": {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "stop": ["\n"],
                            "seed": 7, "stream": True, "return_token_ids": True},
        "completion_ids.json": {"prompt": [72, 101, 108, 299], "max_tokens": 4, "top_k": 5,
                                "top_p": 0.5, "ban_token_ids": [1, 2], "stop_token_ids": [3]},
        "chat.json": {"model": "fuzz", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                         {"type": "text", "text": " there"}]},
            {"role": "assistant", "content": ""}],
            "session": "s1", "initial_state": "base", "presence_penalty": 0.5,
            "frequency_penalty": 0.5, "penalty_decay": 0.99, "max_completion_tokens": 3},
        "session_file.json": {"path": "chat-1.state"},
    }
    for name, body in bodies.items():
        put("http_request", name, json.dumps(body).encode())


def main():
    http_request_seeds()
    safetensors_seeds()
    checkpoint_seeds()
    session_seeds()
    shard_seeds()
    tokenize_seeds()
    vocab_seeds()
    pth_seeds()
    total = 0
    for d, _, files in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    print("make_corpus: %s, %d bytes in all" % (OUT, total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
