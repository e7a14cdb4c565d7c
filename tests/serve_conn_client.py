#!/usr/bin/env python3
"""Connection-handling checks for `rwkvpipe serve` (tests/test_serve_conn.sh),
standard library only. Each subcommand exits 0 (prints "ok: ...") or 1
(prints what went wrong).

  serve_conn_client.py flood URL N_SLOW N_IDLE REQUEST_TIMEOUT
      N_SLOW half-sent requests trickling a header line every second and
      N_IDLE silent sockets (together more than --max-connections): a new
      client's /health is still answered within 15 s, and each trickling
      request is cut near the request deadline, not before
  serve_conn_client.py per-client URL CAP EXTRA
      CAP + EXTRA silent sockets from 127.0.0.2: EXTRA are refused, the CAP
      others stay open (and /metrics counts them), and 127.0.0.1 is answered
      at once
  serve_conn_client.py many URL N_STREAM N_PLAIN
      N_STREAM streamed and N_PLAIN plain greedy requests at once each give
      the text the same request gives alone; then 200 short requests in a
      row are each answered within 10 s
  serve_conn_client.py half-close URL
      a client that sends a whole request then shutdown(SHUT_WR) still gets
      the whole reply, plain and streamed
  serve_conn_client.py drain URL PID DRAIN_SECONDS
      SIGTERM to PID while a stream runs and a keep-alive connection is
      open: during the drain new connections, the keep-alive one and /health
      get 503 with Retry-After, the stream ends with its cancelled final
      event; prints "signalled at T" (time.time()) for the caller
"""
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

TIMEOUT = 60


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def hostport(url):
    u = urlparse(url)
    return u.hostname, u.port


def get(url, path, timeout=TIMEOUT, body=None):
    """(status, headers, raw body) of one request on a new connection."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def metric(url, name):
    _, _, raw = get(url, "/metrics")
    for line in raw.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    fail("metric %s missing" % name)


def closed_by_peer(sock, wait):
    """Whether the server closed sock within `wait` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def read_http(sock, deadline):
    """Reads one whole HTTP/1.1 reply from sock: (status, headers, body)."""
    buf = b""

    def more():
        nonlocal buf
        sock.settimeout(max(0.1, deadline - time.time()))
        b = sock.recv(65536)
        if not b:
            raise EOFError("connection closed after %d bytes: %r" % (len(buf), buf[-200:]))
        buf += b

    while b"\r\n\r\n" not in buf:
        more()
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                more()
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                more()
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                break
    else:
        n = int(headers.get("content-length", "0"))
        while len(buf) < n:
            more()
        body = buf[:n]
    return status, headers, body


def raw_request(url, method, path, body, extra=""):
    data = json.dumps(body).encode() if body is not None else b""
    host, port = hostport(url)
    return ("%s %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n%s\r\n" % (method, path, host, port, len(data), extra)).encode() + data


def dechunk(buf):
    """The body of a chunked reply, or None while its last chunk is missing."""
    body = b""
    while True:
        if b"\r\n" not in buf:
            return None
        size_line, buf = buf.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if len(buf) < size + 2:
            return None
        body += buf[:size]
        buf = buf[size + 2:]
        if size == 0:
            return body


def sse_events(body):
    text = body.decode("utf-8")
    check(text.endswith("data: [DONE]\n\n"), "the stream does not end with [DONE]: %r" % text[-200:])
    events = [e for e in text.split("\n\n") if e]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    out = "".join(c["choices"][0].get("text", "") for c in chunks if "choices" in c)
    return out, chunks[-1]


def cmd_flood(url, n_slow, n_idle, request_timeout):
    n_slow, n_idle, request_timeout = int(n_slow), int(n_idle), float(request_timeout)
    host, port = hostport(url)
    t0 = time.time()
    closed_at = {}
    stop = threading.Event()

    def trickle(i):
        s = socket.create_connection((host, port), timeout=10)
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            k = 0
            while not stop.is_set():
                if closed_by_peer(s, 1.0):
                    closed_at[i] = time.time() - t0
                    return
                s.sendall(b"X-Slow-%d: %d\r\n" % (k, k))
                k += 1
        except OSError:
            closed_at[i] = time.time() - t0
        finally:
            s.close()

    threads = [threading.Thread(target=trickle, args=(i,), daemon=True) for i in range(n_slow)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(n_idle)]
    t1 = time.time()
    try:
        status, _, body = get(url, "/health", timeout=15)
    except Exception as e:  # timeout or reset: the lock-out this test is about
        fail("with %d idle and %d half-sent connections, /health got no answer within "
             "15 s: %r" % (n_idle, n_slow, e))
    waited = time.time() - t1
    check(status == 200, "/health: %d %r" % (status, body))
    for t in threads:
        t.join(request_timeout + 20)
    stop.set()
    for s in idle:
        s.close()
    check(len(closed_at) == n_slow, "%d of %d trickling requests were never cut" %
          (n_slow - len(closed_at), n_slow))
    early = min(closed_at.values())
    late = max(closed_at.values())
    # each was cut by the request deadline, not by the (shorter) idle timeout
    check(early >= request_timeout - 0.5,
          "a trickling request was cut after %.1f s, before --request-timeout %g" %
          (early, request_timeout))
    check(late <= request_timeout + 10,
          "a trickling request was cut only after %.1f s (--request-timeout %g)" %
          (late, request_timeout))
    print("ok: /health answered in %.1f s past %d idle and %d half-sent connections; "
          "trickling requests cut after %.1f to %.1f s" % (waited, n_idle, n_slow, early, late))


def cmd_per_client(url, cap, extra):
    cap, extra = int(cap), int(extra)
    host, port = hostport(url)
    socks = []
    for _ in range(cap + extra):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.2", 0))
        s.connect((host, port))
        socks.append(s)
        time.sleep(0.01)
    t0 = time.time()
    try:
        status, _, _ = get(url, "/health", timeout=5)
    except Exception as e:
        fail("127.0.0.1 got no answer while 127.0.0.2 held %d connections: %r" % (cap + extra, e))
    waited = time.time() - t0
    check(status == 200 and waited < 3, "/health from 127.0.0.1: %d after %.1f s" % (status, waited))
    time.sleep(1.0)  # the refused ones are closed at once
    refused = sum(closed_by_peer(s, 0.05) for s in socks)
    check(refused == extra, "%d of %d connections from 127.0.0.2 were refused, expected %d "
          "(--max-connections-per-client %d)" % (refused, cap + extra, extra, cap))
    # the metrics request is one more open connection
    open_now = metric(url, "rwkvpipe_http_connections")
    check(open_now == cap + 1, "rwkvpipe_http_connections is %g, expected %d" % (open_now, cap + 1))
    for s in socks:
        s.close()
    print("ok: 127.0.0.2 held %d connections, %d more were refused, 127.0.0.1 answered in %.2f s"
          % (cap, extra, waited))


PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground", "Hello"]


def cmd_many(url, n_stream, n_plain):
    n_stream, n_plain = int(n_stream), int(n_plain)
    want = {}
    for p in PROMPTS:
        try:
            status, _, raw = get(url, "/v1/completions", timeout=10,
                                 body={"prompt": p, "max_tokens": 40, "temperature": 0})
        except Exception as e:
            fail("%r alone got no reply: %r" % (p, e))
        check(status == 200, "alone: %d %r" % (status, raw))
        want[p] = json.loads(raw)["choices"][0]["text"]
    results, errors = {}, []

    def one(i, stream):
        p = PROMPTS[i % len(PROMPTS)]
        try:
            status, _, raw = get(url, "/v1/completions", body={"prompt": p, "max_tokens": 40,
                                                                "temperature": 0, "stream": stream})
            if status != 200:
                errors.append("request %d: %d %r" % (i, status, raw[:200]))
                return
            if stream:
                text, last = sse_events(raw)
                fin = last["choices"][0]["finish_reason"]
            else:
                r = json.loads(raw)
                text, fin = r["choices"][0]["text"], r["choices"][0]["finish_reason"]
            results[i] = (p, text, fin)
        except Exception as e:
            errors.append("request %d: %r" % (i, e))

    threads = [threading.Thread(target=one, args=(i, i < n_stream)) for i in range(n_stream + n_plain)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    check(not errors, "; ".join(errors[:5]))
    check(len(results) == n_stream + n_plain, "%d of %d requests finished" %
          (len(results), n_stream + n_plain))
    for i, (p, text, fin) in sorted(results.items()):
        check(text == want[p], "request %d (%r): %r differs from alone %r" % (i, p, text, want[p]))
        check(fin == "length", "request %d: finish_reason %s" % (i, fin))
    # short requests one after another: a wake-up lost between the last
    # tokens, the end of the job and the suspension would hang one of them
    t1 = time.time()
    for i in range(200):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 1 + i % 6, "temperature": 0,
                "stream": i % 2 == 1}
        try:
            status, _, raw = get(url, "/v1/completions", timeout=10, body=body)
        except Exception as e:
            fail("short request %d %r got no reply: %r" % (i, body, e))
        check(status == 200, "short request %d: %d %r" % (i, status, raw[:200]))
    print("ok: %d streamed and %d plain requests at once gave their texts alone in %.1f s; "
          "200 short ones in a row in %.1f s" % (n_stream, n_plain, t1 - t0, time.time() - t1))


def cmd_half_close(url):
    body = {"prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0}
    status, _, raw = get(url, "/v1/completions", body=body)
    check(status == 200, "normal request: %d" % status)
    want = json.loads(raw)["choices"][0]["text"]
    for stream in (False, True):
        s = socket.create_connection(hostport(url), timeout=10)
        s.sendall(raw_request(url, "POST", "/v1/completions", dict(body, stream=stream)))
        s.shutdown(socket.SHUT_WR)  # the whole request is sent; nothing more will come
        try:
            status, headers, reply = read_http(s, time.time() + 30)
        except (EOFError, OSError) as e:
            fail("half-closed client (%s): no whole reply: %s" %
                 ("streamed" if stream else "plain", e))
        finally:
            s.close()
        check(status == 200, "half-closed client: status %d %r" % (status, reply[:200]))
        if stream:
            text, last = sse_events(reply)
            check(last["choices"][0]["finish_reason"] == "length", "final event %r" % last)
        else:
            text = json.loads(reply)["choices"][0]["text"]
        check(text == want, "half-closed client (%s): %r, expected %r" %
              ("streamed" if stream else "plain", text, want))
    print("ok: a client that shut down its sending side gets the whole reply, plain and streamed")


def expect_503(what, status, headers, raw, code=None):
    check(status == 503, "%s: status %d %r, expected 503" % (what, status, raw[:200]))
    ra = headers.get("Retry-After") if hasattr(headers, "get") else None
    check(ra is not None and ra.isdigit() and int(ra) >= 1,
          "%s: 503 without a Retry-After of whole seconds (%r)" % (what, ra))
    j = json.loads(raw)
    if code:
        check(j["error"]["code"] == code, "%s: error code %r, expected %r" % (what, j, code))
    return j


def cmd_drain(url, pid, drain):
    pid, drain = int(pid), float(drain)
    host, port = hostport(url)
    keep = http.client.HTTPConnection(host, port, timeout=20)
    keep.request("GET", "/health")
    r = keep.getresponse()
    r.read()
    check(r.status == 200, "keep-alive /health before the signal: %d" % r.status)
    stream = socket.create_connection((host, port), timeout=20)
    stream.sendall(raw_request(url, "POST", "/v1/completions",
                               {"prompt": "stream until stopped", "max_tokens": 1000000000,
                                "ban_token_ids": [0], "stream": True}))
    first = b""
    while b"data: " not in first:
        b = stream.recv(4096)
        check(b, "the stream ended before its first event")
        first += b
    t0 = time.time()
    os.kill(pid, signal.SIGTERM)
    print("signalled at %.3f" % t0)
    time.sleep(0.3)

    def fresh(method, path, body=None):
        try:
            return get(url, path, timeout=10, body=body)
        except Exception as e:
            fail("%.1f s into the drain, a new connection for %s %s failed: %r (expected 503)" %
                 (time.time() - t0, method, path, e))

    status, headers, raw = fresh("GET", "/health")
    j = expect_503("new /health during the drain", status, headers, raw)
    check(j.get("status") == "stopping", "/health during the drain: %r" % j)
    status, headers, raw = fresh("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
    expect_503("new completion during the drain", status, headers, raw, "shutting_down")
    try:
        keep.request("GET", "/v1/models")
        r = keep.getresponse()
        raw = r.read()
    except Exception as e:
        fail("the keep-alive connection was cut during the drain: %r (expected 503)" % e)
    expect_503("keep-alive request during the drain", r.status, r.headers, raw, "shutting_down")
    keep.close()
    # the running stream gets its final event
    buf = first
    stream.settimeout(20)
    try:
        while dechunk(buf.split(b"\r\n\r\n", 1)[1]) is None:
            b = stream.recv(65536)
            check(b, "the stream was closed before its last chunk: %r" % buf[-300:])
            buf += b
    except OSError as e:
        fail("the stream was cut: %r" % e)
    stream.close()
    text, last = sse_events(dechunk(buf.split(b"\r\n\r\n", 1)[1]))
    check(last["choices"][0]["finish_reason"] == "cancelled", "the stream's last event %r" % last)
    # still listening late in the drain (unless a slow machine got here later)
    late = t0 + drain - 1.0
    if time.time() < late:
        time.sleep(late - time.time())
        status, headers, raw = fresh("GET", "/health")
        expect_503("/health late in the drain", status, headers, raw)
    print("ok: during the drain new, keep-alive and /health requests got 503 with Retry-After "
          "(the last %.1f s after the signal); the stream ended cancelled" % (time.time() - t0))


def main(argv):
    cmds = {"flood": cmd_flood, "per-client": cmd_per_client, "many": cmd_many,
            "half-close": cmd_half_close, "drain": cmd_drain}
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__)
        return 2
    cmds[argv[1]](*argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
