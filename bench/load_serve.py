#!/usr/bin/env python3
"""Load test of `rwkvpipe serve` (issue 5): N concurrent streaming clients for
a fixed time against a running server, loopback only, stdlib only.

usage: bench/load_serve.py URL [--clients 32] [--seconds 60] [--max-tokens 64]
                           [--pid PID ...]

Each client loops: POST /v1/completions with stream true (a prompt of random
length, greedy or seeded sampling), reads the Server-Sent Events to the end and
checks the stream: every event parses, the last one has a finish_reason, and
`data: [DONE]` closes it. A response that is not 200, a broken or truncated
stream, or a connection error counts as failed. While it runs, the resident
memory (VmRSS) of the given server pids is sampled every second, so "memory
flat" can be checked. Prints a table; exit status 1 if any request failed.
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse


def rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def client(url, deadline, max_tokens, seed, stats, lock):
    rng = random.Random(seed)
    u = urllib.parse.urlparse(url)
    while time.time() < deadline:
        words = rng.randint(3, 60)
        prompt = " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "dog"])
                          for _ in range(words))
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 1 << 30)}
        ok, tokens, err = False, 0, ""
        t0 = time.time()
        first = None
        try:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                err = "status %d" % r.status
            else:
                finish, done = None, False
                for raw in r:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    ev = json.loads(data)
                    ch = ev["choices"][0]
                    if ch.get("text"):
                        tokens += 1
                        if first is None:
                            first = time.time() - t0
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
                        usage = ev.get("usage")
                        if usage:
                            tokens = usage.get("completion_tokens", tokens)
                ok = done and finish in ("stop", "length")
                if not ok:
                    err = "truncated stream (finish %s, [DONE] %s)" % (finish, done)
            conn.close()
        except Exception as e:  # noqa: BLE001 - every failure is counted
            err = repr(e)
        with lock:
            if ok:
                stats["ok"] += 1
                stats["tokens"] += tokens
                stats["latency"].append(time.time() - t0)
                if first is not None:
                    stats["first"].append(first)
            else:
                stats["failed"] += 1
                stats["errors"].append(err)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--pid", type=int, action="append", default=[])
    a = ap.parse_args()
    stats = {"ok": 0, "failed": 0, "tokens": 0, "latency": [], "first": [], "errors": []}
    lock = threading.Lock()
    deadline = time.time() + a.seconds
    threads = [threading.Thread(target=client, args=(a.url, deadline, a.max_tokens, i, stats, lock))
               for i in range(a.clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    rss = []
    while any(t.is_alive() for t in threads):
        rss.append([rss_kib(p) for p in a.pid])
        time.sleep(1)
    for t in threads:
        t.join()
    wall = time.time() - t0
    lat = sorted(stats["latency"])
    first = sorted(stats["first"])
    pct = lambda v, q: v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")
    print("| clients | seconds | requests ok | failed | requests/s | tokens/s | p50 latency s "
          "| p95 latency s | p50 first token s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("| %d | %.0f | %d | %d | %.2f | %.1f | %.2f | %.2f | %.3f |" % (
        a.clients, wall, stats["ok"], stats["failed"], stats["ok"] / wall,
        stats["tokens"] / wall, pct(lat, 0.5), pct(lat, 0.95), pct(first, 0.5)))
    for i, p in enumerate(a.pid):
        series = [r[i] for r in rss if r[i] is not None]
        if len(series) >= 4:
            q = len(series) // 4
            early = sum(series[q:2 * q]) / max(1, q)
            late = sum(series[-q:]) / max(1, q)
            print("pid %d VmRSS: first %d KiB, max %d KiB, last %d KiB; 2nd-quarter mean %.0f "
                  "vs last-quarter mean %.0f KiB (%+.1f%%)" % (
                      p, series[0], max(series), series[-1], early, late,
                      100.0 * (late - early) / early if early else 0.0))
    for e in stats["errors"][:10]:
        print("error:", e)
    sys.exit(1 if stats["failed"] else 0)


if __name__ == "__main__":
    main()
