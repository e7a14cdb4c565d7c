#!/usr/bin/env python3
"""rwkvpipe-convert: RWKV-7 checkpoints -> safetensors with official names.

Standard library only (no torch, no numpy); runs on Python 3.9+.

Inputs (the format is detected from the content, not the file name):
  * official RWKV-LM ``.pth`` (torch >= 1.6 zip + pickle), read with a
    restricted unpickler that never executes code from the file;
  * ``.safetensors`` with HF / fla names (model.layers.N.attn.r_proj.weight,
    ..._lora.lora.0.weight, lm_head.weight ...), renamed and reshaped to the
    official RWKV-LM names and shapes (docs/rwkv7-spec.md section 4.2);
  * ``.safetensors`` with official names (only re-typed, if asked).

Output: one safetensors file with official names, in official order, written
atomically (temp file in the same directory, fsync, rename).

See docs/convert.md and ``rwkvpipe-convert --help``.
"""

import argparse
import io
import json
import os
import pickle
import re
import struct
import sys
import tempfile
import zipfile
import zlib
from array import array

PROG = "rwkvpipe-convert"
VERSION = "1.0"

# safetensors dtype name -> item size in bytes
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
DTYPE_ARG = {"f32": "F32", "bf16": "BF16", "f16": "F16"}

# Bytes per read/convert step: bounds memory (one chunk of input plus its
# conversion) whatever the tensor size.
CHUNK_BYTES = 1 << 22


class ConvertError(Exception):
    """An error about the input or output, reported without a traceback."""


def warn(msg):
    sys.stderr.write("%s: warning: %s\n" % (PROG, msg))


# ---------------------------------------------------------------------------
# dtype conversion on raw little-endian bytes, chunk by chunk
# ---------------------------------------------------------------------------

_LANE_CONSTS = {}


def _lane_consts(n):
    """Per-64-bit-lane constants for n lanes, as big integers."""
    c = _LANE_CONSTS.get(n)
    if c is None:
        if len(_LANE_CONSTS) > 8:
            _LANE_CONSTS.clear()

        def rep(v):
            return int.from_bytes(v.to_bytes(8, "little") * n, "little")
        c = (rep(1), rep(0x7FFF), rep(0x7FFFFFFF), rep(0x007FFFFF))
        _LANE_CONSTS[n] = c
    return c


def f32_to_bf16(b):
    """float32 bytes -> bfloat16 bytes, round to nearest, ties to even.

    Exactly ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16`` on the float32 bits u
    (what torch's ``.to(torch.bfloat16)`` does); NaN becomes 0x7FC0 as in
    torch. Vectorised without numpy: every u32 is placed in its own 64-bit
    lane of one big Python integer, so the additions never carry into the
    next element, and the whole chunk is handled by a few big-int operations.
    """
    n = len(b) // 4
    if n == 0:
        return b""
    wide = bytearray(8 * n)
    for i in range(4):
        wide[i::8] = b[i::4]
    u = int.from_bytes(wide, "little")
    del wide
    ones, k7fff, m7fffffff, k7fffff = _lane_consts(n)
    r = (u + k7fff + ((u >> 16) & ones)) >> 16
    rb = r.to_bytes(8 * n, "little")
    del r
    out = bytearray(2 * n)
    out[0::2] = rb[0::8]
    out[1::2] = rb[1::8]
    del rb
    # NaN: (u & 0x7FFFFFFF) > 0x7F800000  <=>  bit 31 of (that + 0x7FFFFF)
    nan = (((u & m7fffffff) + k7fffff) >> 31) & ones
    if nan:
        nb = nan.to_bytes(8 * n, "little")
        pos = nb.find(1)
        while pos >= 0:
            i = pos // 8
            out[2 * i:2 * i + 2] = b"\xc0\x7f"
            pos = nb.find(1, 8 * (i + 1))
    return bytes(out)


def bf16_to_f32(b):
    """bfloat16 bytes -> float32 bytes (exact: bits << 16)."""
    n = len(b) // 2
    out = bytearray(4 * n)
    out[2::4] = b[0::2]
    out[3::4] = b[1::2]
    return bytes(out)


def _pack_floats(fmt_char, values, what):
    """struct-pack floats, turning overflow into +-inf (as a C cast would)."""
    try:
        return struct.pack("<%d%s" % (len(values), fmt_char), *values)
    except OverflowError:
        pass
    inf = float("inf")
    fixed = []
    n_over = 0
    one = struct.Struct("<" + fmt_char)
    for v in values:
        try:
            one.pack(v)
            fixed.append(v)
        except OverflowError:
            fixed.append(inf if v > 0 else -inf)
            n_over += 1
    warn("%d value(s) out of range for %s became +-inf" % (n_over, what))
    return struct.pack("<%d%s" % (len(fixed), fmt_char), *fixed)


def _unpack(fmt_char, size, b):
    return struct.unpack("<%d%s" % (len(b) // size, fmt_char), b)


def to_f32(b, src):
    if src == "F32":
        return b
    if src == "BF16":
        return bf16_to_f32(b)
    if src == "F16":
        return struct.pack("<%df" % (len(b) // 2), *_unpack("e", 2, b))
    if src == "F64":
        return _pack_floats("f", _unpack("d", 8, b), "F32")
    raise ConvertError("cannot convert %s to a float type" % src)


def convert_bytes(b, src, dst):
    """Convert a chunk of raw little-endian elements from src to dst dtype."""
    if src == dst:
        return b
    if dst == "F64":
        if src == "F32":
            return struct.pack("<%dd" % (len(b) // 4), *_unpack("f", 4, b))
        return convert_bytes(to_f32(b, src), "F32", "F64")
    if src == "F64" and dst == "F16":
        # direct double -> half (one rounding)
        return _pack_floats("e", _unpack("d", 8, b), "F16")
    f = to_f32(b, src)
    if dst == "F32":
        return f
    if dst == "BF16":
        return f32_to_bf16(f)
    if dst == "F16":
        return _pack_floats("e", _unpack("f", 4, f), "F16")
    raise ConvertError("cannot convert %s to %s" % (src, dst))


def _array_code(itemsize):
    for code in ("B", "H", "I", "L", "Q"):
        if array(code).itemsize == itemsize:
            return code
    raise ConvertError("no array type of %d bytes" % itemsize)


def transpose2d(b, rows, cols, itemsize):
    """Raw bytes of a row-major [rows, cols] matrix -> [cols, rows]."""
    if rows <= 1 or cols <= 1:
        return b
    a = array(_array_code(itemsize))
    a.frombytes(b)
    out = array(a.typecode)
    for j in range(cols):
        out.extend(a[j::cols])
    return out.tobytes()


# ---------------------------------------------------------------------------
# data sources: a byte range inside a zip entry or a plain file
# ---------------------------------------------------------------------------

# What zipfile raises for a damaged member: ValueError covers a local header
# name that does not decode, zlib.error a corrupt deflate stream, OSError a
# seek to the negative offset of a bad central directory.
ZIP_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError,
                   NotImplementedError, RuntimeError, ValueError, zlib.error, OSError)


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


class ZipSource:
    """Bytes [start, start+nbytes) of one (stored) zip entry."""

    def __init__(self, zf, entry, start, nbytes, path):
        self.zf, self.entry, self.start, self.nbytes = zf, entry, start, nbytes
        self.path = path

    def sub(self, off, n):
        return ZipSource(self.zf, self.entry, self.start + off, n, self.path)

    def chunks(self, size):
        try:
            with self.zf.open(self.entry) as f:
                skip = self.start
                while skip > 0:
                    got = f.read(min(skip, size))
                    if not got:
                        raise ConvertError("%s: blob %s is truncated"
                                           % (self.path, self.entry))
                    skip -= len(got)
                left = self.nbytes
                while left > 0:
                    got = f.read(min(left, size))
                    if not got:
                        raise ConvertError("%s: blob %s is truncated"
                                           % (self.path, self.entry))
                    left -= len(got)
                    yield got
                if self.start == 0:
                    # read to the end so zipfile checks the CRC
                    while f.read(size):
                        pass
        except ZIP_READ_ERRORS as e:
            raise ConvertError("%s: cannot read blob %s: %s"
                               % (self.path, self.entry, e))


class FileSource:
    """Bytes [start, start+nbytes) of a plain file."""

    def __init__(self, fh, start, nbytes, path):
        self.fh, self.start, self.nbytes, self.path = fh, start, nbytes, path

    def sub(self, off, n):
        return FileSource(self.fh, self.start + off, n, self.path)

    def chunks(self, size):
        self.fh.seek(self.start)
        left = self.nbytes
        while left > 0:
            got = self.fh.read(min(left, size))
            if not got:
                raise ConvertError("%s: file is truncated" % self.path)
            left -= len(got)
            yield got


class Tensor:
    """One input tensor: dtype, shape and where its bytes are."""

    def __init__(self, name, dtype, shape, src):
        self.name, self.dtype, self.shape, self.src = name, dtype, list(shape), src


class OutTensor:
    """One output tensor: name, shape and how to produce it."""

    def __init__(self, name, shape, tensor, transpose=False, origin=None):
        self.name = name
        self.shape = list(shape)
        self.tensor = tensor
        self.transpose = transpose
        self.origin = origin or tensor.name
        self.dtype = tensor.dtype  # output dtype, set by choose_dtypes

    def chunks(self):
        t = self.tensor
        isz = ITEMSIZE[t.dtype]
        step = max(isz, CHUNK_BYTES // isz * isz)
        if self.transpose:
            data = b"".join(t.src.chunks(step))
            data = transpose2d(data, t.shape[0], t.shape[1], isz)
            for i in range(0, len(data), step):
                yield convert_bytes(data[i:i + step], t.dtype, self.dtype)
            return
        for c in t.src.chunks(step):
            if len(c) % isz:
                raise ConvertError("%s: short read in %s" % (t.src.path, t.name))
            yield convert_bytes(c, t.dtype, self.dtype)


# ---------------------------------------------------------------------------
# .pth reading: zip + restricted unpickler
# ---------------------------------------------------------------------------

class _Inert:
    """Base of the unpickler's stand-ins: a pickle BUILD cannot modify them."""
    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError("unexpected BUILD on %s" % type(self).__name__)


class _StorageType(_Inert):
    """What torch.<X>Storage unpickles to: a dtype tag, not a callable."""
    __slots__ = ("dtype", "qualname")

    def __init__(self, dtype, qualname):
        self.dtype, self.qualname = dtype, qualname


class _StorageRef(_Inert):
    __slots__ = ("dtype", "key", "numel", "location")

    def __init__(self, dtype, key, numel, location):
        self.dtype, self.key, self.numel, self.location = dtype, key, numel, location


class _SafeCall(_Inert):
    """An allowed rebuild function, wrapped so BUILD cannot patch it."""
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class _TensorRef(_Inert):
    """A tensor view description: storage, element offset, size, stride."""
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _StateDict(dict):
    """collections.OrderedDict stand-in (dicts keep order in Python 3.7+).

    state_dict() pickles carry a BUILD that sets the ``_metadata``
    attribute (module versions); it is accepted and ignored."""

    def __setstate__(self, state):
        pass


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _int_tuple(v, what):
    if not isinstance(v, (tuple, list)) or not all(_is_int(x) for x in v):
        raise pickle.UnpicklingError("bad tensor %s: %r" % (what, v))
    return tuple(v)


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor storage is not a persistent storage")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise pickle.UnpicklingError("bad storage offset %r" % (storage_offset,))
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride) or any(d < 0 for d in size):
        raise pickle.UnpicklingError("bad tensor size %r / stride %r" % (size, stride))
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    return data


_STORAGES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "DoubleStorage": "F64", "LongStorage": "I64", "IntStorage": "I32",
    "ByteStorage": "U8",
}
_ALLOWED = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _SafeCall(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _SafeCall(_rebuild_parameter),
}
for _n, _d in _STORAGES.items():
    _ALLOWED[("torch", _n)] = _StorageType(_d, "torch." + _n)


class RefusedClass(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state_dict without running any code from the file.

    Only the names in _ALLOWED resolve; they map to local, inert stand-ins.
    Tensor data is not read here: persistent_load only records the storage
    key, dtype and size."""

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and isinstance(name, str) and name.endswith("Storage"):
            raise RefusedClass("unknown storage type torch.%s (supported: %s)"
                               % (name, ", ".join(sorted(_STORAGES))))
        raise RefusedClass("refusing to unpickle %s.%s: not a tensor checkpoint"
                           % (module, name))

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5
                or pid[0] not in ("storage", b"storage")):
            raise pickle.UnpicklingError("unsupported persistent id %r" % (pid[:1],)
                                         if isinstance(pid, tuple) else
                                         "unsupported persistent id")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError("unknown storage type %r" % (stype,))
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise pickle.UnpicklingError("bad storage reference %r" % (pid[2:],))
        return _StorageRef(stype.dtype, key, numel, location)


def _contiguous(size, stride):
    expect = 1
    for d, s in zip(reversed(size), reversed(stride)):
        if d == 0:
            return True
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def _zip_read(zf, entry, path):
    """A whole (small) member; a damaged archive is a ConvertError, as in
    ZipSource (the central directory can be intact while a member is not)."""
    try:
        return zf.read(entry)
    except ZIP_READ_ERRORS as e:
        raise ConvertError("%s: cannot read %s: %s (truncated or corrupt?)"
                           % (path, entry, e))


def read_pth(path, zf):
    names = zf.namelist()
    pkls = [n for n in names if n.rsplit("/", 1)[-1] == "data.pkl"]
    if not pkls:
        raise ConvertError("%s: no data.pkl in the zip; not a torch checkpoint" % path)
    if len(pkls) > 1:
        raise ConvertError("%s: several data.pkl entries (%s); ambiguous checkpoint"
                           % (path, ", ".join(pkls[:4])))
    prefix = pkls[0][:-len("data.pkl")]
    if prefix + "byteorder" in names:
        bo = _zip_read(zf, prefix + "byteorder", path).decode("ascii", "replace").strip()
        if bo != "little":
            raise ConvertError("%s: byteorder is %r; only little-endian "
                               "checkpoints are supported" % (path, bo))
    data = _zip_read(zf, pkls[0], path)
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedClass as e:
        raise ConvertError("%s: %s" % (path, e))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, OverflowError,
            UnicodeDecodeError, MemoryError, RecursionError) as e:
        raise ConvertError("%s: data.pkl is not a valid tensor checkpoint (%s: %s)"
                           % (path, type(e).__name__, e))
    del data
    sd = _find_state_dict(path, obj)

    tensors = []
    storages = {}
    for name, t in sd.items():
        st = t.storage
        if not _contiguous(t.size, t.stride):
            raise ConvertError("%s: tensor %s is not contiguous (size %s, stride %s); "
                               "only contiguous tensors are supported"
                               % (path, name, list(t.size), list(t.stride)))
        n = _numel(t.size)
        if t.offset + n > st.numel:
            raise ConvertError("%s: tensor %s needs elements [%d, %d) but its "
                               "storage %s has only %d" % (path, name, t.offset,
                                                           t.offset + n, st.key, st.numel))
        seen = storages.get(st.key)
        if seen is None:
            storages[st.key] = (st.dtype, st.numel)
            entry = prefix + "data/" + st.key
            try:
                zi = zf.getinfo(entry)
            except KeyError:
                raise ConvertError("%s: missing blob %s (storage of %s)"
                                   % (path, entry, name))
            want = st.numel * ITEMSIZE[st.dtype]
            if zi.file_size != want:
                raise ConvertError("%s: blob size mismatch for %s: %d bytes, "
                                   "expected %d (%d x %s)" % (path, entry, zi.file_size,
                                                              want, st.numel, st.dtype))
        elif seen != (st.dtype, st.numel):
            raise ConvertError("%s: storage %s is declared twice with different "
                               "types/sizes" % (path, st.key))
        isz = ITEMSIZE[st.dtype]
        src = ZipSource(zf, prefix + "data/" + st.key, t.offset * isz, n * isz, path)
        tensors.append(Tensor(name, st.dtype, t.size, src))
    return tensors


def _find_state_dict(path, obj):
    def is_sd(d):
        return (isinstance(d, dict) and d
                and all(isinstance(k, str) and isinstance(v, _TensorRef)
                        for k, v in d.items()))
    if is_sd(obj):
        return obj
    if isinstance(obj, dict):
        for k in ("state_dict", "model", "module"):
            if is_sd(obj.get(k)):
                warn("%s: using the nested state_dict under key %r" % (path, k))
                return obj[k]
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, _TensorRef):
                raise ConvertError("%s: not a flat state_dict: entry %r is a %s, "
                                   "not a tensor" % (path, k, type(v).__name__))
        raise ConvertError("%s: the checkpoint holds no tensors" % path)
    raise ConvertError("%s: not a state_dict (top-level object is a %s)"
                       % (path, type(obj).__name__))


# ---------------------------------------------------------------------------
# safetensors reading / writing
# ---------------------------------------------------------------------------

ST_MAX_HEADER = 100 * 1000 * 1000


def _shown(value):
    """A header value as JSON, cut short: for messages."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _header_fields(path, name, info):
    """dtype, shape and data_offsets of one header entry, each of the JSON
    type the format requires; anything else is named with the tensor, the
    field and the value found (a list where a string belongs would otherwise
    surface as an unexpected TypeError)."""
    if not isinstance(info, dict):
        raise ConvertError("%s: header entry of tensor %s is %s, expected an object with "
                           "dtype, shape and data_offsets" % (path, name, _shown(info)))
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise ConvertError("%s: tensor %s: field %r is missing" % (path, name, field))
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise ConvertError("%s: tensor %s: field 'dtype' is a %s (%s), expected a string "
                           "such as \"F32\"" % (path, name, type(dtype).__name__,
                                                 _shown(dtype)))
    if not isinstance(shape, list):
        raise ConvertError("%s: tensor %s: field 'shape' is a %s (%s), expected a list of "
                           "integers" % (path, name, type(shape).__name__, _shown(shape)))
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise ConvertError("%s: tensor %s: field 'data_offsets' is %s, expected "
                           "[begin, end]" % (path, name, _shown(offsets)))
    return dtype, shape, offsets


def read_safetensors(path, fh):
    fh.seek(0, 2)
    fsize = fh.tell()
    fh.seek(0)
    raw = fh.read(8)
    if len(raw) < 8:
        raise ConvertError("%s: too short for safetensors" % path)
    hlen = struct.unpack("<Q", raw)[0]
    if hlen > ST_MAX_HEADER or 8 + hlen > fsize:
        raise ConvertError("%s: bad safetensors header length %d (file is %d bytes)"
                           % (path, hlen, fsize))
    try:
        header = json.loads(fh.read(hlen).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError("%s: bad safetensors JSON header: %s" % (path, e))
    if not isinstance(header, dict):
        raise ConvertError("%s: safetensors header is not a JSON object" % path)
    base = 8 + hlen
    dsize = fsize - base
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (a, b) = _header_fields(path, name, info)
        if dtype not in ITEMSIZE:
            raise ConvertError("%s: tensor %s has unsupported dtype %r"
                               % (path, name, dtype))
        if (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
                or not _is_int(a) or not _is_int(b) or not 0 <= a <= b <= dsize):
            raise ConvertError("%s: bad shape/offsets for %s" % (path, name))
        if b - a != _numel(shape) * ITEMSIZE[dtype]:
            raise ConvertError("%s: tensor %s: %d bytes for shape %s %s"
                               % (path, name, b - a, shape, dtype))
        tensors.append(Tensor(name, dtype, shape, FileSource(fh, base + a, b - a, path)))
    tensors.sort(key=lambda t: t.src.start)
    return tensors


def write_safetensors(out_path, outs, metadata, verbose=False):
    header = {"__metadata__": metadata}
    off = 0
    for o in outs:
        n = _numel(o.shape) * ITEMSIZE[o.dtype]
        header[o.name] = {"dtype": o.dtype, "shape": o.shape,
                          "data_offsets": [off, off + n]}
        off += n
    hj = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hj += b" " * (-len(hj) % 8)

    out_dir = os.path.dirname(os.path.abspath(out_path))
    base = os.path.basename(out_path)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + base + ".", suffix=".tmp", dir=out_dir)
    except OSError as e:
        raise ConvertError("cannot write %s: %s" % (out_path, e.strerror or e))
    ok = False
    try:
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.fchmod(fd, 0o666 & ~umask)
        except (OSError, AttributeError):
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hj)))
            f.write(hj)
            for o in outs:
                want = _numel(o.shape) * ITEMSIZE[o.dtype]
                got = 0
                for c in o.chunks():
                    f.write(c)
                    got += len(c)
                if got != want:
                    raise ConvertError("internal: %s produced %d bytes, expected %d"
                                       % (o.name, got, want))
                if verbose:
                    sys.stderr.write("  %-40s %-5s %s\n" % (o.name, o.dtype, o.shape))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
        ok = True
    except OSError as e:
        raise ConvertError("cannot write %s: %s" % (out_path, e.strerror or e))
    finally:
        if not ok:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    try:
        dfd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return 8 + len(hj) + off


# ---------------------------------------------------------------------------
# naming: HF/fla -> official, official order, model check
# ---------------------------------------------------------------------------

# The official <-> HF/fla name map: the same rows as src/model/model.c
# (rp_hf_names); tests/test_convert.sh checks the two equal through
# `rwkvpipe info --hf-names` and `rwkvpipe-convert --hf-names`, and
# tests/make_hf_names.py reads this one. (scope, official, HF, kind): a
# "layer" row names the suffixes after blocks.N. / model.layers.N.; "reshape"
# keeps the elements in another shape, "transpose" swaps a matrix's axes.
HF_NAMES = [
    ("global", "emb.weight", "model.embeddings.weight", "same"),
    ("global", "blocks.0.ln0.weight", "model.layers.0.pre_norm.weight", "same"),
    ("global", "blocks.0.ln0.bias", "model.layers.0.pre_norm.bias", "same"),
    ("global", "ln_out.weight", "model.norm.weight", "same"),
    ("global", "ln_out.bias", "model.norm.bias", "same"),
    ("global", "head.weight", "lm_head.weight", "same"),
    ("layer", "ln1.weight", "attn_norm.weight", "same"),
    ("layer", "ln1.bias", "attn_norm.bias", "same"),
    ("layer", "ln2.weight", "ffn_norm.weight", "same"),
    ("layer", "ln2.bias", "ffn_norm.bias", "same"),
] + [
    ("layer", "att.x_" + x, "attn.x_" + x, "reshape") for x in "rwkvag"
] + [
    ("layer", "att.w0", "attn.w_lora.lora.2.bias", "reshape"),
    ("layer", "att.w1", "attn.w_lora.lora.0.weight", "transpose"),
    ("layer", "att.w2", "attn.w_lora.lora.2.weight", "transpose"),
    ("layer", "att.a0", "attn.a_lora.lora.2.bias", "reshape"),
    ("layer", "att.a1", "attn.a_lora.lora.0.weight", "transpose"),
    ("layer", "att.a2", "attn.a_lora.lora.2.weight", "transpose"),
    ("layer", "att.v0", "attn.v_lora.lora.2.bias", "reshape"),
    ("layer", "att.v1", "attn.v_lora.lora.0.weight", "transpose"),
    ("layer", "att.v2", "attn.v_lora.lora.2.weight", "transpose"),
    ("layer", "att.g1", "attn.g_lora.lora.0.weight", "transpose"),
    ("layer", "att.g2", "attn.g_lora.lora.2.weight", "transpose"),
    ("layer", "att.k_k", "attn.k_k", "reshape"),
    ("layer", "att.k_a", "attn.k_a", "reshape"),
    ("layer", "att.r_k", "attn.r_k", "same"),
    ("layer", "att.receptance.weight", "attn.r_proj.weight", "same"),
    ("layer", "att.key.weight", "attn.k_proj.weight", "same"),
    ("layer", "att.value.weight", "attn.v_proj.weight", "same"),
    ("layer", "att.output.weight", "attn.o_proj.weight", "same"),
    ("layer", "att.ln_x.weight", "attn.g_norm.weight", "same"),
    ("layer", "att.ln_x.bias", "attn.g_norm.bias", "same"),
    ("layer", "ffn.x_k", "ffn.x_k", "reshape"),
    ("layer", "ffn.key.weight", "ffn.key.weight", "same"),
    ("layer", "ffn.value.weight", "ffn.value.weight", "same"),
]
_HF_GLOBAL = {hf: (off, kind) for scope, off, hf, kind in HF_NAMES if scope == "global"}
_HF_LAYER = {hf: (off, kind) for scope, off, hf, kind in HF_NAMES if scope == "layer"}
_HF_LAYER_RX = re.compile(r"model\.layers\.(\d+)\.(.+)\Z")


def hf_name_to_official(name):
    """(official name, kind) of an HF/fla name; kind "split6" for the fused
    attn.x_x [6, C] of some fla files; None when the name is unknown."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _HF_LAYER_RX.match(name)
    if not m:
        return None
    layer, rest = m.groups()
    if rest == "attn.x_x":
        return "blocks.%s.att.x_" % layer, "split6"
    if rest in _HF_LAYER:
        off, kind = _HF_LAYER[rest]
        return "blocks.%s.%s" % (layer, off), kind
    return None


def is_hf_naming(names):
    return any(n.startswith("model.") or n == "lm_head.weight" for n in names)


def hf_to_official(tensors, path):
    outs = []
    for t in tensors:
        found = hf_name_to_official(t.name)
        if found is None:
            warn("%s: unknown HF tensor %s kept under its own name" % (path, t.name))
            outs.append(OutTensor(t.name, t.shape, t))
            continue
        name, tr = found
        n = _numel(t.shape)
        if tr == "same":
            outs.append(OutTensor(name, t.shape, t))
        elif tr == "reshape":
            outs.append(OutTensor(name, [1, 1, n], t))
        elif tr == "transpose":
            if len(t.shape) != 2:
                raise ConvertError("%s: %s should be 2-D, has shape %s"
                                   % (path, t.name, t.shape))
            outs.append(OutTensor(name, [t.shape[1], t.shape[0]], t, transpose=True))
        elif tr == "split6":
            if n % 6 or not t.shape or t.shape[0] != 6:
                raise ConvertError("%s: %s should have shape [6, ...], has %s"
                                   % (path, t.name, t.shape))
            c = n // 6
            isz = ITEMSIZE[t.dtype]
            for i, x in enumerate("rwkvag"):
                part = Tensor(t.name, t.dtype, [c], t.src.sub(i * c * isz, c * isz))
                outs.append(OutTensor(name + x, [1, 1, c], part, origin=t.name))
    return outs


_BLOCK_ORDER = (
    ["ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"]
    + ["att.x_" + x for x in "rwkvag"]
    + ["att.w0", "att.w1", "att.w2", "att.a0", "att.a1", "att.a2",
       "att.v0", "att.v1", "att.v2", "att.g1", "att.g2",
       "att.k_k", "att.k_a", "att.r_k",
       "att.receptance.weight", "att.key.weight", "att.value.weight",
       "att.output.weight", "att.ln_x.weight", "att.ln_x.bias",
       "ffn.x_k", "ffn.key.weight", "ffn.value.weight"])
_BLOCK_POS = {n: i for i, n in enumerate(_BLOCK_ORDER)}
_BLOCK_RX = re.compile(r"blocks\.(\d+)\.(.+)\Z")
_VEC111 = {"att.x_" + x for x in "rwkvag"} | {"att.w0", "att.a0", "att.v0",
                                              "att.k_k", "att.k_a", "ffn.x_k"}
_VECC = {"ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight",
         "ln2.bias", "att.ln_x.weight", "att.ln_x.bias"}


def official_sort_key(name, idx):
    if name == "emb.weight":
        return (0, 0, 0, idx)
    m = _BLOCK_RX.match(name)
    if m and m.group(2) in _BLOCK_POS:
        return (1, int(m.group(1)), _BLOCK_POS[m.group(2)], idx)
    tail = {"ln_out.weight": 0, "ln_out.bias": 1, "head.weight": 2}
    if name in tail:
        return (2, tail[name], 0, idx)
    return (3, 0, 0, idx)  # unknown names: at the end, in input order


def check_model(outs):
    """Errors (list of str) if this is not a complete RWKV-7 model; warns on extras."""
    shapes = {o.name: o.shape for o in outs}
    errs = []
    old = [n for n in shapes if ".time_" in n or n.endswith("ffn.receptance.weight")]
    if old and "blocks.0.att.k_k" not in shapes:
        return ["looks like an RWKV-4/5/6 checkpoint (e.g. %s), not RWKV-7" % old[0]]
    blocks = set()
    extras = []
    for n in shapes:
        m = _BLOCK_RX.match(n)
        if m and m.group(2) in _BLOCK_POS:
            blocks.add(int(m.group(1)))
        elif n not in ("emb.weight", "ln_out.weight", "ln_out.bias", "head.weight"):
            extras.append(n)
    L = len(blocks)
    if blocks != set(range(L)):
        errs.append("block numbers are not 0..%d: %s" % (L - 1, sorted(blocks)))

    def need(n, shape=None):
        if n not in shapes:
            errs.append("missing tensor %s" % n)
        elif shape is not None and shapes[n] != shape:
            errs.append("tensor %s has shape %s, expected %s" % (n, shapes[n], shape))

    need("emb.weight")
    need("blocks.0.ln0.weight")
    need("blocks.0.ln0.bias")
    if L == 0:
        errs.append("no blocks.N.* tensors")
    emb = shapes.get("emb.weight")
    if not emb or len(emb) != 2:
        errs.append("emb.weight must be [V, C]")
        for n in ("ln_out.weight", "ln_out.bias", "head.weight"):
            need(n)
        return errs
    V, C = emb
    need("ln_out.weight", [C])
    need("ln_out.bias", [C])
    need("head.weight", [V, C])
    for i in sorted(blocks):
        p = "blocks.%d." % i
        for s in _BLOCK_ORDER:
            if s.startswith("ln0.") and i != 0:
                if p + s in shapes:
                    errs.append("unexpected %s%s (ln0 is block 0 only)" % (p, s))
                continue
            if s.startswith("att.v") and i == 0 and p + s not in shapes:
                continue  # block 0's v0/v1/v2 are unused and may be absent
            if s in _VEC111:
                need(p + s, [1, 1, C])
            elif s in _VECC:
                need(p + s, [C])
            elif s.endswith(".weight") and s.startswith("att."):
                need(p + s, [C, C])
            else:
                need(p + s)
        for x in "wavg":
            s1, s2 = shapes.get(p + "att.%s1" % x), shapes.get(p + "att.%s2" % x)
            if s1 is None or s2 is None:
                continue
            if len(s1) != 2 or len(s2) != 2 or s1[0] != C or s2[1] != C or s1[1] != s2[0]:
                errs.append("LoRA %satt.%s1/%s2 shapes %s/%s are not [C,D]/[D,C] (C=%d)"
                            % (p, x, x, s1, s2, C))
        rk = shapes.get(p + "att.r_k")
        if rk is not None and (len(rk) != 2 or rk[0] * rk[1] != C):
            errs.append("%satt.r_k has shape %s, expected [H, N] with H*N = %d" % (p, rk, C))
        fk, fv = shapes.get(p + "ffn.key.weight"), shapes.get(p + "ffn.value.weight")
        if fk is not None and fv is not None:
            if len(fk) != 2 or fk[1] != C or fv != [C, fk[0]]:
                errs.append("%sffn.key/value shapes %s/%s are not [F,C]/[C,F]" % (p, fk, fv))
    if extras:
        warn("%d tensor(s) that are not RWKV-7 parameters are kept: %s%s"
             % (len(extras), ", ".join(extras[:8]), " ..." if len(extras) > 8 else ""))
    return errs


def model_summary(outs):
    shapes = {o.name: o.shape for o in outs}
    try:
        V, C = shapes["emb.weight"]
        L = len([n for n in shapes if re.match(r"blocks\.\d+\.ln1\.weight\Z", n)])
        H, N = shapes["blocks.0.att.r_k"]
        return "L=%d C=%d V=%d H=%d N=%d" % (L, C, V, H, N)
    except (KeyError, ValueError, TypeError):
        return "not a complete RWKV-7 model"


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

HELP_EPILOG = """\
input formats (detected from the content):
  .pth          official RWKV-LM checkpoint (torch >= 1.6 zip). Read with a
                restricted unpickler: only collections.OrderedDict,
                torch._utils._rebuild_tensor_v2 / _rebuild_parameter and
                torch.{Float,Half,BFloat16,Double,Long,Int,Byte}Storage may be
                referenced; anything else (e.g. os.system) is refused and
                nothing from the file is ever executed. Tensors must be
                contiguous. Legacy pre-zip torch files are not supported.
  .safetensors  HF/fla naming (model.layers.N.attn.r_proj.weight, lm_head...):
                renamed to official names; LoRA matrices transposed; w0/a0/v0,
                k_k, k_a, x_*, ffn.x_k reshaped to [1,1,C]; attn.x_x split.
  .safetensors  official naming: names kept, only re-typed.

output:
  safetensors with official RWKV-LM names and shapes, in official order,
  __metadata__ {"format": "pt", "converted_by": "rwkvpipe-convert",
  "source": <input file name>}. Written to a temporary file in the output
  directory, fsynced, then renamed: an error never leaves a partial file.

dtypes (--dtype applies to floating-point tensors; integer tensors are kept):
  keep  as stored (released .pth files are bf16)
  f32   exact from bf16/f16
  bf16  from f32: round to nearest, ties to even (as torch .to(bfloat16))
  f16   round to nearest even; out-of-range values become +-inf (warning)

checks:
  the result must be a complete RWKV-7 model (emb.weight, blocks.N.* with
  consistent shapes, ln_out, head.weight), else error (skip: --no-check).
  Unknown extra tensors give a warning and are kept.

exit status: 0 success, 1 error (message on stderr), 2 bad usage.

examples:
  rwkvpipe-convert rwkv7-g1a-0.1b-20250728-ctx4096.pth -o g1a-0.1b.safetensors
  rwkvpipe-convert model.pth -o model.f32.safetensors --dtype f32
  rwkvpipe-convert fla-rwkv7-0.1B/model.safetensors -o official.safetensors
"""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert RWKV-7 checkpoints (official .pth, HF/fla or official "
                    "safetensors) to safetensors with official RWKV-LM names. "
                    "Pure Python, no torch needed.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="input .pth or .safetensors file")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output .safetensors file (required unless --dry-run)")
    p.add_argument("--dtype", choices=("keep", "f32", "bf16", "f16"), default="keep",
                   help="dtype of floating-point tensors in the output (default: keep)")
    p.add_argument("--no-check", action="store_true",
                   help="do not require a complete RWKV-7 model (e.g. state files)")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="read and check the input, list the output tensors, write nothing")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list every tensor as it is written")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no summary line on success")
    p.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    a = p.parse_args(argv)
    if not a.dry_run and not a.output:
        p.error("-o OUT is required (or use --dry-run)")
    return a


def detect_format(path, fh):
    head = fh.read(16)
    fh.seek(0)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x80\x02" and head[2:3] == b"\x8a":
        raise ConvertError("%s: legacy (pre-1.6, non-zip) torch format is not "
                           "supported; re-save it with a recent torch" % path)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if path.endswith((".pth", ".pt", ".zip")):
        return "zip"  # let zipfile give the specific error
    raise ConvertError("%s: neither a torch zip checkpoint nor safetensors" % path)


def run(args):
    in_path = args.input
    try:
        fh = open(in_path, "rb")
    except OSError as e:
        raise ConvertError("cannot open %s: %s" % (in_path, e.strerror or e))
    with fh:
        if os.path.isdir(in_path):
            raise ConvertError("%s is a directory" % in_path)
        if args.output:
            if os.path.isdir(args.output):
                raise ConvertError("output %s is a directory" % args.output)
            try:
                if os.path.exists(args.output) and os.path.samefile(in_path, args.output):
                    raise ConvertError("output %s is the input file" % args.output)
            except OSError:
                pass
        fmt = detect_format(in_path, fh)
        zf = None
        try:
            if fmt == "zip":
                try:
                    zf = zipfile.ZipFile(fh)
                except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError,
                        ValueError, OSError, NotImplementedError) as e:
                    raise ConvertError("%s: not a readable zip / torch checkpoint "
                                       "(truncated or corrupt?): %s" % (in_path, e))
                tensors = read_pth(in_path, zf)
                kind = "torch .pth"
                outs = [OutTensor(t.name, t.shape, t) for t in tensors]
            else:
                tensors = read_safetensors(in_path, fh)
                if is_hf_naming([t.name for t in tensors]):
                    kind = "HF/fla safetensors"
                    outs = hf_to_official(tensors, in_path)
                else:
                    kind = "official safetensors"
                    outs = [OutTensor(t.name, t.shape, t) for t in tensors]

            seen = {}
            for o in outs:
                if o.name in seen:
                    raise ConvertError("%s: %s and %s both map to %s"
                                       % (in_path, seen[o.name], o.origin, o.name))
                seen[o.name] = o.origin
            order = {o.name: i for i, o in enumerate(outs)}
            outs.sort(key=lambda o: official_sort_key(o.name, order[o.name]))

            errs = check_model(outs)
            if errs:
                msg = "%s: not a complete RWKV-7 model:\n  %s%s" % (
                    in_path, "\n  ".join(errs[:10]),
                    "\n  ... (%d more)" % (len(errs) - 10) if len(errs) > 10 else "")
                if not args.no_check:
                    raise ConvertError(msg + "\n(use --no-check to convert anyway)")
                warn(msg)

            target = DTYPE_ARG.get(args.dtype)
            for o in outs:
                if target and o.tensor.dtype in FLOAT_DTYPES:
                    o.dtype = target
                else:
                    o.dtype = o.tensor.dtype

            if args.dry_run:
                for o in outs:
                    extra = "" if o.origin == o.name else "   <- " + o.origin
                    if o.transpose:
                        extra += " (transposed)"
                    print("%-40s %-5s %s%s" % (o.name, o.dtype, o.shape, extra))
                print("# %s, %d tensors, %s" % (kind, len(outs), model_summary(outs)))
                return 0

            meta = {"format": "pt", "converted_by": PROG,
                    "source": os.path.basename(in_path)}
            size = write_safetensors(args.output, outs, meta, args.verbose)
        finally:
            if zf is not None:
                zf.close()
    if not args.quiet:
        dts = sorted({o.dtype for o in outs})
        print("%s: wrote %s (%s -> %d tensors, %s, %s, %.1f MiB)"
              % (PROG, args.output, kind, len(outs), "/".join(dts),
                 model_summary(outs), size / 1048576.0))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--hf-names"]:  # hidden: the name table, for tests/test_convert.sh
        for row in HF_NAMES:
            print("\t".join(row))
        return 0
    args = parse_args(argv)
    try:
        return run(args)
    except ConvertError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("%s: interrupted\n" % PROG)
        return 130
    except MemoryError:
        sys.stderr.write("%s: error: out of memory\n" % PROG)
        return 1
    except OSError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return 1
    except Exception as e:  # never a bare traceback for bad input
        if os.environ.get("RWKVPIPE_DEBUG"):
            raise
        sys.stderr.write("%s: error: unexpected %s: %s (set RWKVPIPE_DEBUG=1 for "
                         "a traceback)\n" % (PROG, type(e).__name__, e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
