#!/usr/bin/env python3
"""Mutation fuzzer for the .pth/safetensors reader of tools/rwkvpipe-convert.py.

libFuzzer cannot drive Python and PyPI (atheris) is not reachable, so this is
a small stdlib-only fuzzer: it mutates the seed files (raw bytes, and the
data.pkl pickle inside a torch zip, re-zipped so the CRC stays valid), runs
the converter in-process on each input (run() with -o into a scratch dir,
--no-check) and reports a finding on:
  * an exception outside the converter's documented error path (ConvertError,
    and the OSError / MemoryError that main() reports as errors);
  * a hang: an input running longer than --timeout seconds;
  * any object resolved by the unpickler that is not on its allow-list, any
    new module imported, or any process/exec/system call while loading
    (an audit hook watches; the converter must never run code from a file).
Inputs giving a new outcome (exception type + message shape) join the corpus.
Usage: fuzz_pth.py [--time S] [--timeout S] [--artifact-prefix P] CORPUS_DIR
       fuzz_pth.py --reproduce FILE
Prints libFuzzer-style stat:: lines that launch/fuzz reads."""
import argparse
import contextlib
import hashlib
import importlib.util
import io
import os
import random
import re
import resource
import signal
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location(
    "rwkvpipe_convert", os.path.join(ROOT, "tools", "rwkvpipe-convert.py"))
conv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv)

EXPECTED = (conv.ConvertError, OSError, MemoryError)
ALLOWED_OBJECTS = list(conv._ALLOWED.values())


class Hang(BaseException):
    """Raised by the per-input alarm; a BaseException so that no `except
    Exception` in the converter can swallow it."""


class Violation(BaseException):
    """The unpickler let something outside its allow-list through."""


# ---- the watch: allow-list and audit hook ----------------------------------

_loading = False      # inside run(): no process may start
_unpickling = False   # inside RestrictedUnpickler.load(): nothing may be imported or run
_violations = []
FORBIDDEN_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                    "subprocess.Popen", "ctypes.", "socket.")
# zipfile and codecs import stdlib encodings lazily; only the unpickler must
# import nothing at all.
UNPICKLING_EVENTS = ("import", "exec", "compile", "builtins.input", "open")


def _audit(event, args):
    if not _loading:
        return
    if event.startswith(FORBIDDEN_EVENTS) or (_unpickling and event in UNPICKLING_EVENTS):
        _violations.append("audit event %s%r while %s" % (
            event, tuple(str(x)[:60] for x in args[:2]),
            "unpickling" if _unpickling else "converting"))


_find_class = conv.RestrictedUnpickler.find_class


def _checked_find_class(self, module, name):
    obj = _find_class(self, module, name)
    if not any(obj is a for a in ALLOWED_OBJECTS):
        raise Violation("find_class(%r, %r) returned %r, not an allow-listed stand-in"
                        % (module, name, obj))
    return obj


conv.RestrictedUnpickler.find_class = _checked_find_class
_load = conv.RestrictedUnpickler.load


def _watched_load(self):
    global _unpickling
    _unpickling = True
    try:
        return _load(self)
    finally:
        _unpickling = False


conv.RestrictedUnpickler.load = _watched_load


# ---- running one input -----------------------------------------------------

def _alarm(signum, frame):
    raise Hang()


def run_one(data, scratch, timeout):
    """Returns (finding or None, outcome signature)."""
    global _loading
    in_path = os.path.join(scratch, "input.pth")
    out_path = os.path.join(scratch, "out.safetensors")
    with open(in_path, "wb") as f:
        f.write(data)
    args = conv.parse_args([in_path, "-o", out_path, "--no-check", "--quiet"])
    del _violations[:]
    signal.setitimer(signal.ITIMER_REAL, timeout)
    _loading = True
    finding, outcome = None, "ok"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            conv.run(args)
    except Hang:
        finding = "hang: over %.1f s" % timeout
    except Violation as e:
        finding = "allow-list violation: %s" % e
    except EXPECTED as e:
        # The outcome shape: the type and the first words of the message
        # (without names and numbers that echo the input).
        msg = re.sub(r"'[^']*'|\"[^\"]*\"|\([^)]*\)|\S*[/.]\S*", "", str(e).replace(in_path, ""))
        outcome = "%s: %s" % (type(e).__name__, " ".join(re.findall(r"[a-z]{3,}", msg)[:2]))
    except Exception as e:  # outside the documented error path
        finding = "unexpected %s: %s" % (type(e).__name__, e)
    finally:
        _loading = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        for p in (in_path, out_path):
            with contextlib.suppress(OSError):
                os.unlink(p)
    if finding is None and _violations:
        finding = "audit: " + "; ".join(_violations[:3])
    return finding, outcome


# ---- mutation ------------------------------------------------------------

PICKLE_TOKENS = [b"cos\nsystem\n", b"cbuiltins\neval\n", b"cposix\nsystem\n",
                 b"ctorch\nFloatStorage\n", b"ctorch\nBFloat16Storage\n",
                 b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch._utils\n_rebuild_parameter\n",
                 b"ccollections\nOrderedDict\n", b"R", b"b", b"Q", b"t", b"(", b")", b"u", b"s",
                 b"\x85", b"\x86", b"\x87", b"\x88", b"\x89", b"N", b"K\xff", b"J\xff\xff\xff\x7f",
                 b"M\x00\x80", b"X\x05\x00\x00\x00hello", b"\x8a\x08" + b"\xff" * 8, b"0", b"2",
                 b"\x93", b"\x94", b"h\x00", b"q\x00", b"r\x00\x00\x00\x00", b"\x95" + b"\x00" * 8,
                 b"}", b"]", b"e", b"a", b"c__main__\nHang\n", b"\x80\x05", b"."]
INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
               b"\x00\x00\x00\x80", b"\xff\xff\xff\xff\xff\xff\xff\x7f"]


def mutate_bytes(rng, b, corpus):
    b = bytearray(b)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 2:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:
            del b[pos:pos + rng.randint(1, 16)]
        elif op == 4:
            b[pos:pos + rng.randint(0, 8)] = rng.choice(INTERESTING + PICKLE_TOKENS)
        elif op == 5 and corpus:
            other = rng.choice(corpus)
            s = rng.randrange(len(other) + 1)
            b[pos:] = other[s:s + rng.randint(1, 256)] + b[pos:]
        elif op == 6 and b:
            s = rng.randrange(len(b))
            b[pos:pos] = b[s:s + rng.randint(1, 32)]
    return bytes(b)


def mutate_zip(rng, data, corpus):
    """Mutates one member (the pickle most often), re-zipped with a valid CRC."""
    try:
        zin = zipfile.ZipFile(io.BytesIO(data))
        members = [(i.filename, zin.read(i.filename)) for i in zin.infolist()]
    except Exception:
        return None
    if not members:
        return None
    pkl = [i for i, (n, _) in enumerate(members) if n.endswith("data.pkl")]
    k = rng.choice(pkl) if pkl and rng.random() < 0.8 else rng.randrange(len(members))
    name, body = members[k]
    action = rng.randrange(10)
    if action == 0:
        del members[k]
    elif action == 1:
        members.append((name if rng.random() < 0.5 else "x/data.pkl", body))
    elif action == 2:
        members[k] = (name[:-1] + rng.choice("0123456789"), body)
    else:
        members[k] = (name, mutate_bytes(rng, body, [m for _, m in members]))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for n, d in members:
            z.writestr(n, d)
    return out.getvalue()


def next_input(rng, corpus):
    seed = rng.choice(corpus)
    if seed[:2] == b"PK" and rng.random() < 0.7:
        m = mutate_zip(rng, seed, corpus)
        if m is not None:
            return m
    return mutate_bytes(rng, seed, corpus)


# ---- main ----------------------------------------------------------------

def save_finding(prefix, data, finding):
    name = "%scrash-%s" % (prefix, hashlib.sha1(data).hexdigest())
    with open(name, "wb") as f:
        f.write(data)
    with open(name + ".txt", "w") as f:
        f.write(finding + "\n")
    return name


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("corpus", nargs="?")
    p.add_argument("--time", type=float, default=60)
    p.add_argument("--timeout", type=float, default=10)
    p.add_argument("--artifact-prefix", default="./")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--rss-limit-mb", type=int, default=2048)
    p.add_argument("--reproduce", metavar="FILE")
    a = p.parse_args()
    # Runaway allocations become MemoryError (documented) instead of the OOM killer.
    limit = a.rss_limit_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit + (512 << 20), resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, _alarm)
    sys.setrecursionlimit(10000)
    sys.addaudithook(_audit)
    scratch = tempfile.mkdtemp(prefix="rp-fuzz-pth-")
    try:
        if a.reproduce:
            finding, outcome = run_one(open(a.reproduce, "rb").read(), scratch, a.timeout)
            print(finding or "no finding (%s)" % outcome)
            return 1 if finding else 0
        if not a.corpus:
            p.error("CORPUS_DIR is required")
        corpus = []
        for n in sorted(os.listdir(a.corpus)):
            with open(os.path.join(a.corpus, n), "rb") as f:
                corpus.append(f.read())
        if not corpus:
            p.error("%s holds no seed files" % a.corpus)
        rng = random.Random(a.seed)
        seen, runs, added, findings = set(), 0, 0, 0
        for data in corpus:  # the seeds themselves first
            finding, outcome = run_one(data, scratch, a.timeout)
            runs += 1
            seen.add(outcome)
            if finding:
                findings += 1
                print("FINDING in a seed: %s -> %s" % (finding, save_finding(a.artifact_prefix, data, finding)))
        start = time.monotonic()
        while time.monotonic() - start < a.time and not findings:
            data = next_input(rng, corpus)
            finding, outcome = run_one(data, scratch, a.timeout)
            runs += 1
            if finding:
                findings += 1
                print("FINDING: %s -> %s" % (finding, save_finding(a.artifact_prefix, data, finding)))
            elif outcome not in seen:
                seen.add(outcome)
                corpus.append(data)
                added += 1
                with open(os.path.join(a.corpus, hashlib.sha1(data).hexdigest()), "wb") as f:
                    f.write(data)
        elapsed = max(time.monotonic() - start, 1e-9)
        print("stat::number_of_executed_units: %d" % runs)
        print("stat::average_exec_per_sec:     %d" % (runs / elapsed))
        print("stat::new_units_added:          %d" % added)
        print("outcomes seen: %d" % len(seen))
        for o in sorted(seen):
            print("  " + o)
        return 1 if findings else 0
    finally:
        for n in os.listdir(scratch):
            os.unlink(os.path.join(scratch, n))
        os.rmdir(scratch)


if __name__ == "__main__":
    sys.exit(main())
