#!/bin/sh
# Tests of rwkvpipe-convert (tools/rwkvpipe-convert.py) against the golden
# checkpoints copied into tests/data: .pth (fp32 and bf16) -> safetensors bit for bit, bf16
# rounding, HF/fla naming round trip, and refusal of bad / malicious input.
# Run by `make check` (env: top_srcdir, top_builddir, PYTHON3, RP_TEST_DATA).

set -u

. "${top_srcdir:-$(dirname "$0")/..}/tests/test_env.sh"

G="$RP_TEST_DATA"
NAME=tiny_L2_C128_V256_s1
if [ ! -f "$G/$NAME.fp32.pth" ] || [ ! -f "$G/$NAME.bf16.pth" ] ||
   [ ! -f "$G/$NAME.weights.safetensors" ]; then
    echo "FAIL: test data missing under $G"
    exit 1
fi
WEIGHTS="$G/$NAME.weights.safetensors"

if [ -f "$top_builddir/rwkvpipe-convert" ]; then
    CONV="$top_builddir/rwkvpipe-convert"
    run_conv() { "$CONV" "$@"; }
else
    CONV="$top_srcdir/tools/rwkvpipe-convert.py"
    run_conv() { "$PYTHON3" "$CONV" "$@"; }
fi
echo "using $CONV"
CMP="$PYTHON3 $top_srcdir/tests/st_compare.py"
MKHF="$PYTHON3 $top_srcdir/tests/make_hf_names.py"

T=$(mktemp -d "${TMPDIR:-/tmp}/test_convert.XXXXXX") || exit 99
trap 'rm -rf "$T"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { echo "ok: $*"; }

# Run a conversion that must succeed: conv_ok LABEL ARGS...
conv_ok() {
    label=$1; shift
    if run_conv "$@" >"$T/log" 2>&1; then
        ok "$label"
    else
        cat "$T/log"; fail "$label (exit $?)"
    fi
}

# Compare: cmp_ok LABEL ARGS-TO-st_compare...
cmp_ok() {
    label=$1; shift
    if $CMP "$@" >"$T/cmplog" 2>&1; then
        ok "$label: $(tail -n 1 "$T/cmplog")"
    else
        cat "$T/cmplog"; fail "$label"
    fi
}

# A conversion that must fail cleanly: conv_bad LABEL PATTERN INPUT [ARGS...]
# non-zero exit, PATTERN in the message, no traceback, no output or temp file.
conv_bad() {
    label=$1; pat=$2; shift 2
    rm -rf "$T/badout"; mkdir "$T/badout"
    run_conv "$@" -o "$T/badout/out.safetensors" >"$T/log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        fail "$label: exit 0, expected an error"
    elif grep -q Traceback "$T/log"; then
        cat "$T/log"; fail "$label: printed a traceback"
    elif ! grep -q -- "$pat" "$T/log"; then
        cat "$T/log"; fail "$label: message does not contain '$pat'"
    elif [ -n "$(ls -A "$T/badout")" ]; then
        ls -la "$T/badout"; fail "$label: left a file behind"
    else
        ok "$label (exit $rc: $(head -n 1 "$T/log"))"
    fi
}

# ---- 1. fp32 .pth -> safetensors, bit-identical to the golden weights
conv_ok "fp32.pth -> safetensors" "$G/$NAME.fp32.pth" -o "$T/fp32.st"
cmp_ok "fp32.pth matches golden" "$WEIGHTS" "$T/fp32.st" --expect-dtype F32
if grep -a -q '"converted_by":"rwkvpipe-convert"' "$T/fp32.st" &&
   grep -a -q "\"source\":\"$NAME.fp32.pth\"" "$T/fp32.st" &&
   grep -a -q '"format":"pt"' "$T/fp32.st"; then
    ok "metadata"
else
    fail "metadata missing in $T/fp32.st"
fi

# ---- 2. bf16 .pth (keep) -> BF16, equal to the golden rounded with RNE
conv_ok "bf16.pth -> safetensors (keep)" "$G/$NAME.bf16.pth" -o "$T/bf16.st"
cmp_ok "bf16.pth is RNE of golden" "$WEIGHTS" "$T/bf16.st" --bf16-rne
# golden F32 --dtype bf16 gives exactly the bf16 .pth's bytes
conv_ok "golden --dtype bf16" "$WEIGHTS" -o "$T/g_bf16.st" --dtype bf16
cmp_ok "f32->bf16 == bf16.pth" "$T/bf16.st" "$T/g_bf16.st" --expect-dtype BF16
# and the same from the fp32 .pth
conv_ok "fp32.pth --dtype bf16" "$G/$NAME.fp32.pth" -o "$T/p_bf16.st" --dtype bf16
cmp_ok "fp32.pth->bf16 == bf16.pth" "$T/bf16.st" "$T/p_bf16.st" --expect-dtype BF16
# widening bf16 -> f32 is exact
conv_ok "bf16.pth --dtype f32" "$G/$NAME.bf16.pth" -o "$T/bf16_f32.st" --dtype f32
cmp_ok "bf16 widened exactly" "$T/bf16.st" "$T/bf16_f32.st" --expect-dtype F32
# f16
conv_ok "fp32.pth --dtype f16" "$G/$NAME.fp32.pth" -o "$T/f16.st" --dtype f16
cmp_ok "f16 close to golden" "$WEIGHTS" "$T/f16.st" --expect-dtype F16 --tol 1e-3

# ---- 3. official safetensors in: names kept
conv_ok "official safetensors (keep)" "$WEIGHTS" -o "$T/off.st"
cmp_ok "official safetensors unchanged" "$WEIGHTS" "$T/off.st" --expect-dtype F32

# ---- 4. HF/fla naming round trip
# The converter's name table is the C loader's, row for row (one map, two
# languages: neither may gain or change a name alone).
"$top_builddir/rwkvpipe" info --hf-names > "$T/hf_names.c.tsv" 2>&1 ||
    fail "rwkvpipe info --hf-names: $(cat "$T/hf_names.c.tsv")"
run_conv --hf-names > "$T/hf_names.py.tsv" 2>&1 ||
    fail "rwkvpipe-convert --hf-names: $(cat "$T/hf_names.py.tsv")"
if [ "$(wc -l < "$T/hf_names.c.tsv")" -ge 39 ] &&
   diff "$T/hf_names.c.tsv" "$T/hf_names.py.tsv" > "$T/hf_names.diff"; then
    ok "HF name tables of the converter and the loader are equal"
else
    fail "HF name tables differ (C <, Python >): $(cat "$T/hf_names.diff")"
fi
if $MKHF "$WEIGHTS" "$T/hf.st"; then ok "make HF file"; else fail "make_hf_names"; fi
conv_ok "HF -> official" "$T/hf.st" -o "$T/from_hf.st"
cmp_ok "HF round trip (block 0 v* dropped by fla)" "$WEIGHTS" "$T/from_hf.st" \
    --skip '^blocks\.0\.att\.v[012]$' --expect-dtype F32
if $CMP "$WEIGHTS" "$T/from_hf.st" >/dev/null 2>&1; then
    fail "HF output should lack blocks.0.att.v0/v1/v2"
fi
if $MKHF "$WEIGHTS" "$T/hf2.st" --keep-layer0-v --fuse-x; then ok "make HF file (x_x)"; else fail "make_hf_names --fuse-x"; fi
conv_ok "HF (x_x, layer-0 v_lora) -> official" "$T/hf2.st" -o "$T/from_hf2.st"
cmp_ok "HF round trip (x_x)" "$WEIGHTS" "$T/from_hf2.st"
conv_ok "HF -> official --dtype bf16" "$T/hf.st" -o "$T/from_hf_bf16.st" --dtype bf16
cmp_ok "HF bf16 == bf16.pth" "$T/bf16.st" "$T/from_hf_bf16.st" \
    --skip '^blocks\.0\.att\.v[012]$' --expect-dtype BF16
# output order is the official one: identical data section to the golden file
if "$PYTHON3" - "$WEIGHTS" "$T/from_hf2.st" <<'EOF'
import struct, sys
def data(p):
    b = open(p, "rb").read()
    return b[8 + struct.unpack("<Q", b[:8])[0]:]
sys.exit(0 if data(sys.argv[1]) == data(sys.argv[2]) else 1)
EOF
then ok "official tensor order"; else fail "output data not in official order"; fi

# ---- 5. --help, --dry-run
if run_conv --help >"$T/help" 2>&1 && grep -q -- "--dtype" "$T/help" &&
   grep -q "refused" "$T/help"; then
    ok "--help"
else
    fail "--help"
fi
if run_conv "$G/$NAME.bf16.pth" --dry-run >"$T/dry" 2>&1 &&
   grep -q "blocks.1.att.r_k" "$T/dry" && grep -q "L=2 C=128 V=256 H=2 N=64" "$T/dry"; then
    ok "--dry-run"
else
    cat "$T/dry"; fail "--dry-run"
fi

# ---- 6. bad and malicious input
"$PYTHON3" - "$G/$NAME.bf16.pth" "$T" <<'EOF'
import sys, zipfile
src, out = sys.argv[1], sys.argv[2]
zin = zipfile.ZipFile(src)
entries = [(i.filename, zin.read(i.filename)) for i in zin.infolist()]
pkl_name = [n for n, _ in entries if n.endswith("/data.pkl")][0]
prefix = pkl_name[:-len("data.pkl")]

def write(name, items):
    with zipfile.ZipFile("%s/%s" % (out, name), "w", zipfile.ZIP_STORED) as z:
        for n, d in items:
            z.writestr(n, d)

def with_pkl(name, fn):
    write(name, [(n, fn(d) if n == pkl_name else d) for n, d in entries])

def cmd_pickle(module, func, arg):
    a = arg.encode()
    return (b"\x80\x02c" + module + b"\n" + func + b"\n" +
            b"X" + len(a).to_bytes(4, "little") + a + b"\x85R.")

marker = out + "/PWNED"
write("evil_os.pth", [("evil/data.pkl", cmd_pickle(b"os", b"system", "touch " + marker)),
                      ("evil/version", b"3\n")])
write("evil_eval.pth", [("evil/data.pkl", cmd_pickle(
    b"builtins", b"eval", "__import__('os').system('touch %s')" % marker))])
# a real state_dict whose last storage type is swapped for a call to os.system
with_pkl("evil_inner.pth", lambda d: d.replace(b"ctorch\nBFloat16Storage\n",
                                               b"cposix\nsystem\n", 1))
write("nopkl.pth", [(n, d) for n, d in entries if n != pkl_name])
write("twopkl.pth", entries + [("other/data.pkl", dict(entries)[pkl_name])])
write("noblob.pth", [(n, d) for n, d in entries if n != prefix + "data/5"])
write("badsize.pth", [(n, d[:-2] if n == prefix + "data/5" else d) for n, d in entries])
write("bigendian.pth", entries + [(prefix + "byteorder", b"big")])
with_pkl("short.pth", lambda d: d.replace(b"ctorch\nBFloat16Storage\n",
                                          b"ctorch\nShortStorage\n", 1))
# emb.weight stride (128, 1) -> (1, 128): a transposed view
with_pkl("noncontig.pth", lambda d: d.replace(b"K\x80K\x01\x86", b"K\x01K\x80\x86", 1))
# emb.weight storage numel 32768 -> 16384 (tensor needs 32768)
with_pkl("toosmall.pth", lambda d: d.replace(b"M\x00\x80t", b"M\x00@t", 1))
with_pkl("garbage.pth", lambda d: d[:len(d) // 3])
open(out + "/notzip.pth", "wb").write(b"this is not a checkpoint\n" * 10)
open(out + "/notzip.bin", "wb").write(b"this is not a checkpoint\n" * 10)
b = bytearray(open(src, "rb").read())
i = b.find(zin.read(prefix + "data/40")[:64])  # a blob read after others were written
b[i + 100] ^= 1
open(out + "/crc.pth", "wb").write(b)
b = open(src, "rb").read()
open(out + "/half.pth", "wb").write(b[:len(b) // 2])
# safetensors content (found by its bytes, whatever the name) whose header
# fields have the wrong JSON type: dtype a list, shape a string, offsets short
import json, struct
def st_header(name, entry):
    text = json.dumps({"emb.weight": entry}).encode()
    open(out + "/" + name, "wb").write(struct.pack("<Q", len(text)) + text + bytes(16))
st_header("dtype_as_list.pth", {"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]})
st_header("shape_as_string.pth", {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]})
st_header("offsets_short.pth", {"dtype": "F32", "shape": [2, 2], "data_offsets": [0]})
# data.pkl's local header damaged, the central directory intact (found by
# tests/fuzz/fuzz_pth.py: zipfile raised BadZipFile out of read_pth)
b = bytearray(open(src, "rb").read())
b[zin.getinfo(pkl_name).header_offset] ^= 0xFF
open(out + "/badlocal.pth", "wb").write(b)
# a central directory entry that needs zip version 7.6 to extract (fuzz_pth.py:
# NotImplementedError out of zipfile.ZipFile)
b = bytearray(open(src, "rb").read())
i = b.find(b"PK\x01\x02")
b[i + 6:i + 8] = (76).to_bytes(2, "little")
open(out + "/zipversion.pth", "wb").write(b)
# data.pkl's local header name is not UTF-8 while the central directory says
# it is (fuzz_pth.py: UnicodeDecodeError out of zipfile.open)
b = bytearray(open(src, "rb").read())
b[zin.getinfo(pkl_name).header_offset + 30] = 0x85
i = b.find(b"PK\x01\x02")
b[i + 8:i + 10] = (int.from_bytes(b[i + 8:i + 10], "little") | 0x800).to_bytes(2, "little")
open(out + "/badname.pth", "wb").write(b)
# the end record puts the central directory 4 KiB later than it is: members
# get negative offsets (fuzz_pth.py: a bare "[Errno 22] Invalid argument")
b = bytearray(open(src, "rb").read())
for sig, at, size in ((b"PK\x05\x06", 16, 4), (b"PK\x06\x06", 48, 8)):  # (zip64) end record
    i = b.rfind(sig)
    if i >= 0:
        v = int.from_bytes(b[i + at:i + at + size], "little")
        if v != 2 ** (8 * size) - 1:
            b[i + at:i + at + size] = (v + 4096).to_bytes(size, "little")
open(out + "/negoffset.pth", "wb").write(b)
EOF
[ $? -eq 0 ] && ok "built bad inputs" || fail "building bad inputs"

conv_bad "os.system pickle refused" "refusing to unpickle os.system: not a tensor checkpoint" "$T/evil_os.pth"
conv_bad "builtins.eval pickle refused" "refusing to unpickle builtins.eval" "$T/evil_eval.pth"
conv_bad "posix.system inside a state_dict refused" "refusing to unpickle posix.system" "$T/evil_inner.pth"
[ -e "$T/PWNED" ] && fail "malicious pickle executed code!"
conv_bad "truncated .pth" "truncated or corrupt" "$T/half.pth"
conv_bad "not a zip" "not a readable zip" "$T/notzip.pth"
conv_bad "unknown format" "neither a torch zip checkpoint nor safetensors" "$T/notzip.bin"
conv_bad "corrupt blob (CRC)" "Bad CRC-32" "$T/crc.pth"
conv_bad "missing data.pkl" "no data.pkl" "$T/nopkl.pth"
conv_bad "several data.pkl" "several data.pkl" "$T/twopkl.pth"
conv_bad "missing blob" "missing blob" "$T/noblob.pth"
conv_bad "blob size mismatch" "blob size mismatch" "$T/badsize.pth"
conv_bad "big-endian" "only little-endian" "$T/bigendian.pth"
conv_bad "unknown storage type" "unknown storage type torch.ShortStorage" "$T/short.pth"
conv_bad "non-contiguous tensor" "not contiguous" "$T/noncontig.pth"
conv_bad "storage too small" "has only 16384" "$T/toosmall.pth"
conv_bad "cut data.pkl" "not a valid tensor checkpoint" "$T/garbage.pth"
conv_bad "non-UTF-8 member name" "cannot read tiny_L2_C128_V256_s1.bf16/data.pkl" "$T/badname.pth"
conv_bad "negative member offset" "cannot read tiny_L2_C128_V256_s1.bf16/data.pkl" "$T/negoffset.pth"
conv_bad "zip version 7.6" "not a readable zip" "$T/zipversion.pth"
conv_bad "damaged data.pkl header" "cannot read tiny_L2_C128_V256_s1.bf16/data.pkl" "$T/badlocal.pth"
conv_bad "missing input" "cannot open" "$T/does-not-exist.pth"
conv_bad "dtype field is a list" \
    "dtype_as_list.pth: tensor emb.weight: field 'dtype' is a list (\\[\"F32\"\\]), expected a string" \
    "$T/dtype_as_list.pth"
conv_bad "shape field is a string" "field 'shape' is a str" "$T/shape_as_string.pth"
conv_bad "data_offsets of one number" "field 'data_offsets' is \[0\], expected \[begin, end\]" \
    "$T/offsets_short.pth"
# a model with a tensor missing / a wrong shape
$MKHF "$WEIGHTS" "$T/hf_bad.st" && "$PYTHON3" - "$T/hf_bad.st" <<'EOF'
import json, struct, sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
h["model.layers.1.attn.r_k_renamed"] = h.pop("model.layers.1.attn.r_k")
hj = json.dumps(h).encode()
hj += b" " * (-len(hj) % 8)
open(p, "wb").write(struct.pack("<Q", len(hj)) + hj + bytes(b[8 + n:]))
EOF
conv_bad "incomplete model" "missing tensor blocks.1.att.r_k" "$T/hf_bad.st"
if run_conv "$T/hf_bad.st" --no-check -o "$T/nocheck.st" >"$T/log" 2>&1 &&
   grep -q "r_k_renamed" "$T/log"; then
    ok "--no-check converts anyway and warns about the unknown key"
else
    cat "$T/log"; fail "--no-check"
fi
# output not writable: no such directory
if run_conv "$G/$NAME.bf16.pth" -o "$T/no/such/dir/out.st" >"$T/log" 2>&1; then
    fail "unwritable output: exit 0"
elif grep -q Traceback "$T/log" || ! grep -q "cannot write" "$T/log"; then
    cat "$T/log"; fail "unwritable output: bad message"
else
    ok "unwritable output ($(head -n 1 "$T/log"))"
fi
# no temp files left next to outputs
if ls -a "$T" | grep -q '\.tmp$'; then ls -a "$T"; fail "temp file left behind"; fi

echo "$failures failure(s)"
[ $failures -eq 0 ]
