#!/usr/bin/env bash
# ptxas resource report of every CUDA kernel for sm_90 (H100), run by
# launch/check in its CUDA step: compiles each cuda/*.cu with `-Xptxas -v`,
# prints registers, spills, shared memory and the blocks per SM they allow,
# and FAILS (exit 1) on any spill store/load. No GPU needed, only nvcc.
#
#   tests/gpu/ptxas_report.sh [BUILDDIR]     compile (BUILDDIR: build/cuda, for config.h)
#   tests/gpu/ptxas_report.sh --parse LOG [SOURCES...]
#                                            only parse a saved `ptxas -v` log, block
#                                            sizes from SOURCES (default cuda/*.cu; tests)
#
# Block sizes come from the launches in cuda/*.cu (`<<<grid, BLOCK, SMEM, ...>>>`,
# the macros and local variables they name); docs/gpu.md keeps the table.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

log=""
sources=(cuda/*.cu)
if [ "${1:-}" = "--parse" ]; then
    log="${2:?usage: ptxas_report.sh --parse LOG [SOURCES...]}"
    [ -f "$log" ] || { echo "ptxas_report.sh: no log '$log'" >&2; exit 2; }
    shift 2
    [ $# -gt 0 ] && sources=("$@")
else
    builddir="${1:-build/cuda}"
    nvcc="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
    [ -x "$nvcc" ] || { echo "ptxas_report.sh: nvcc not found (set NVCC=...)" >&2; exit 77; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    log="$tmp/ptxas.log"
    : >"$log"
    for cu in cuda/*.cu; do
        echo "ptxas_report.sh: compiling $cu for sm_90" >&2
        # -Xptxas -v prints one block per kernel ("Compiling entry function",
        # "spill stores", "Used N registers ... smem") on stderr.
        if ! "$nvcc" -gencode=arch=compute_90,code=sm_90 -Xptxas -v -O3 -std=c++17 \
            -Isrc -Icuda -I"$builddir" -c "$cu" -o "$tmp/$(basename "$cu" .cu).o" >>"$log" 2>&1; then
            cat "$log" >&2
            echo "ptxas_report.sh: nvcc failed on $cu" >&2
            exit 1
        fi
    done
fi

exec python3 - "$log" "${sources[@]}" <<'EOF'
import re, subprocess, sys

# H100 (sm_90) per-SM limits.
REGS_SM, SMEM_SM, THREADS_SM, BLOCKS_SM, WARPS_SM = 65536, 228 * 1024, 2048, 32, 64
SMEM_RESERVED = 1024  # per block, reserved by the system on sm_8x/9x
# Helpers that compute a block size at run time: their largest result.
HELPER_MAX = {"row_threads": 256}

log, sources = sys.argv[1], sys.argv[2:]

# ---- ptxas -v ----
kernels, cur = [], None
for line in open(log, errors="replace"):
    m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
    if m:
        cur = {"mangled": m.group(1), "regs": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
        kernels.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["spill_st"], cur["spill_ld"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        cur["smem"] = int(m.group(1)) if m else 0
if not kernels:
    sys.exit(f"ptxas_report: no kernels found in {log} (was -Xptxas -v passed?)")
try:
    names = subprocess.run(["c++filt"], input="\n".join(k["mangled"] for k in kernels),
                           capture_output=True, text=True, check=True).stdout.split("\n")
except (OSError, subprocess.CalledProcessError):
    names = [k["mangled"] for k in kernels]
for k, n in zip(kernels, names):
    k["name"] = n.strip() or k["mangled"]
    k["base"] = re.split(r"[<(]", k["name"])[0].split("::")[-1].split(" ")[-1]

# ---- launches in the sources: kernel -> (block, dynamic smem) ----
macros, launches, texts = {}, {}, {}
for path in sources:
    try:
        text = open(path).read()
    except OSError:
        continue
    text = text.replace("\\\n", " ")  # join #define continuation lines
    texts[path] = text
    for m in re.finditer(r"^\s*#define\s+(\w+)\s+(.+)$", text, re.M):
        macros.setdefault(m.group(1), m.group(2).split("//")[0].strip())
BOUNDED = [False]  # set when a block size is a run-time value's upper bound

def evaluate(expr, local="", depth=0):
    """The value of a C size expression, or None."""
    if expr is None or depth > 8:
        return None
    e = expr.strip()
    e = re.sub(r"sizeof\s*\(\s*(float|int|uint32_t|unsigned)\s*\)", "4", e)
    e = re.sub(r"sizeof\s*\(\s*(__nv_bfloat16|__half|uint16_t)\s*\)", "2", e)
    e = re.sub(r"\((?:const\s+)?(?:int|unsigned|size_t|long|unsigned int)\)", "", e)
    m = re.fullmatch(r"(\w+)\s*\((.*)\)", e)
    if m and m.group(1) in HELPER_MAX:
        BOUNDED[0] = True
        return HELPER_MAX[m.group(1)]
    m = re.fullmatch(r"[^?]+\?([^:]+):(.+)", e)
    if m:  # a clamp such as `t > MAX ? MAX : t`: its largest known branch
        vals = [v for v in (evaluate(g, local, depth + 1) for g in m.groups()) if v is not None]
        BOUNDED[0] = True
        return max(vals) if vals else None
    m = re.fullmatch(r"(?:dim3\s*)?\(?\s*([^,()]+)\s*,\s*([^,()]+)\s*(?:,\s*([^,()]+))?\s*\)?", e)
    if m and "," in e:
        parts = [evaluate(g, local, depth + 1) for g in m.groups() if g]
        return None if None in parts else eval("*".join(map(str, parts)))
    def sub(mm):
        w = mm.group(0)
        if w in macros:
            v = evaluate(macros[w], local, depth + 1)
            return "None" if v is None else str(v)
        d = re.search(r"\bdim3\s+(?:\w+\([^)]*\),\s*)*" + w + r"\s*\(([^)]*)\)", local)
        if d:
            v = evaluate(d.group(1), local, depth + 1)
            return "None" if v is None else str(v)
        d = list(re.finditer(r"\b" + w + r"\s*=\s*([^;]+);", local))
        if d:
            v = evaluate(d[-1].group(1), local, depth + 1)
            return "None" if v is None else str(v)
        return "None"
    e = re.sub(r"[A-Za-z_]\w*", sub, e)
    if "None" in e or not re.fullmatch(r"[\d\s+\-*/()]+", e):
        return None
    try:
        return int(eval(e.replace("/", "//")))
    except Exception:
        return None

for text in texts.values():
    # enum constants (e.g. VEC_COUNT), counted as C does
    for m in re.finditer(r"\benum\s*\{([^}]*)\}", text):
        v = -1
        for item in m.group(1).split(","):
            item = item.strip()
            if not item:
                continue
            if "=" in item:
                name, expr = [x.strip() for x in item.split("=", 1)]
                v = evaluate(expr)
            else:
                name, v = item, (None if v is None else v + 1)
            if v is None:
                break
            macros.setdefault(name, str(v))

for path, text in texts.items():
    for m in re.finditer(r"\b(\w+)\s*(?:<[^<>;]*>)?\s*<<<(.*?)>>>", text, re.S):
        args = [a.strip() for a in re.split(r",(?![^()]*\))", m.group(2))]
        local = text[max(0, m.start() - 2500):m.start()]
        BOUNDED[0] = False
        block = evaluate(args[1], local) if len(args) > 1 else None
        bounded = BOUNDED[0]
        dyn = evaluate(args[2], local) if len(args) > 2 else 0
        expr = args[1] if len(args) > 1 else "?"
        prev = launches.get(m.group(1))
        if prev is None or (prev[0] is None and block is not None):
            launches[m.group(1)] = (block, dyn, ("<=" if bounded else "") + expr)
    for m in re.finditer(r"__launch_bounds__\(\s*(\w+)[^)]*\)\s*(?:\w+\s+)*?(\w+)\s*\(", text):
        b = evaluate(m.group(1))
        if m.group(2) not in launches and b:
            launches[m.group(2)] = (b, 0, "__launch_bounds__")

# ---- occupancy ----
def blocks_per_sm(regs, smem, block):
    warps = (block + 31) // 32
    regs_warp = ((max(regs, 1) * 32 + 255) // 256) * 256  # allocated per warp, 256 at a time
    by_regs = (REGS_SM // regs_warp) // warps
    by_smem = SMEM_SM // (smem + SMEM_RESERVED)
    by_threads = min(THREADS_SM // (warps * 32), BLOCKS_SM)
    return by_regs, by_smem, by_threads

spills = []
rows = []
for k in kernels:
    block, dyn, expr = launches.get(k["base"], (None, 0, "not launched"))
    smem = k["smem"] + (dyn or 0)
    if dyn is None:
        block = None
        expr = "dynamic shared memory unknown"
    if block:
        r, s, t = blocks_per_sm(k["regs"], smem, block)
        n = min(r, s, t)
        limit = "regs" if n == r else ("smem" if n == s else "threads")
        occ = f"{100 * n * ((block + 31) // 32) / WARPS_SM:.0f}%"
        cells = [("<=" if expr.startswith("<=") else "") + str(block), str(r), str(s), str(t), f"{n} ({limit})", occ]
    else:
        cells = [f"? ({expr})", "", "", "", "", ""]
    name = k["name"]
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    name = re.sub(r"^void ", "", name)
    rows.append([name, str(k["regs"]), f"{k['spill_st']}/{k['spill_ld']}",
                 str(k["smem"]) + (f"+{dyn}" if dyn else "")] + cells)
    if k["spill_st"] or k["spill_ld"]:
        spills.append(f"{name}: {k['spill_st']} bytes spill stores, {k['spill_ld']} bytes spill loads")

head = ["kernel (sm_90)", "regs", "spill st/ld B", "smem B", "block",
        "blk/SM regs", "blk/SM smem", "blk/SM thr", "blocks/SM", "occupancy"]
print("| " + " | ".join(head) + " |")
print("|" + "|".join(" --- " for _ in head) + "|")
for r in sorted(rows):
    print("| " + " | ".join(r) + " |")
print("\nblock: from the launch in cuda/*.cu; <=N: a run-time size, at most N (the table "
      "counts N); smem: static + dynamic bytes per block")
print(f"{len(rows)} kernels; H100 limits: {REGS_SM} registers, {SMEM_SM // 1024} KB shared "
      f"memory (+{SMEM_RESERVED} B reserved per block), {THREADS_SM} threads, {BLOCKS_SM} blocks per SM")
if spills:
    print("\nptxas_report: FAIL: register spills (a spill is local-memory traffic in the "
          "inner loop; cut registers or add __launch_bounds__):", file=sys.stderr)
    for s in spills:
        print("  " + s, file=sys.stderr)
    sys.exit(1)
print("ptxas_report: no spills")
EOF
