#!/bin/bash
# tests/gpu/test_nccl.c runs only on a GPU machine, so its stream ordering is
# checked here from the source: every cudaMemset or host-to-device cudaMemcpy
# (legacy default stream) must be followed by a synchronization before the
# next NCCL operation (rp_nccl_group_* / rp_transport_*), because NCCL runs on
# non-blocking streams the legacy stream is not ordered with. Run by make check.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u
: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
command -v python3 >/dev/null || { echo "skip: no python3"; exit 77; }
exec python3 - "$top_srcdir/tests/gpu/test_nccl.c" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().split("\n")
write = re.compile(r"cudaMemset\s*\(|cudaMemcpyHostToDevice")
nccl = re.compile(r"\brp_(nccl_group_(sendrecv|allreduce_sum)|transport_(post_send|post_recv|send|recv))\s*\(")
sync = re.compile(r"legacy_stream_done\s*\(|cudaDeviceSynchronize\s*\(|cudaStreamSynchronize\s*\(")
bad, writes = [], 0
for i, line in enumerate(lines):
    if not write.search(line):
        continue
    writes += 1
    for j in range(i + 1, len(lines)):
        if sync.search(lines[j]):
            break
        if nccl.search(lines[j]) or re.match(r"^}", lines[j]):
            if nccl.search(lines[j]):
                bad.append(f"test_nccl.c:{i + 1}: a legacy-stream write reaches the NCCL call on "
                           f"line {j + 1} unsynchronized")
            break
if writes < 4:
    sys.exit(f"FAIL: only {writes} cudaMemset/upload lines found; the check lost its anchors")
for b in bad:
    print("FAIL: " + b)
if bad:
    sys.exit(1)
print(f"PASS: all {writes} legacy-stream writes in test_nccl.c are synchronized before NCCL")
PY
