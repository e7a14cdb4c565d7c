#!/usr/bin/env python3
"""Test client for `rwkvpipe serve` (tests/test_serve.sh), standard library only.

Each subcommand checks one behaviour of a running server and exits 0 (prints
"ok: ...") or 1 (prints what differed). Texts are compared as the server
returns them: JSON strings, where bytes that are not UTF-8 are U+FFFD (the
policy of bytes.decode("utf-8", "replace")).

  serve_client.py same SPEC SPEC          two texts are equal (SPEC: see text_of)
  serve_client.py sse FILE                prints {text, finish_reason, usage} of an SSE reply
  serve_client.py stops URL               stop strings (engine token and text match), stream too
  serve_client.py concurrent URL N        N greedy requests at once = each alone
  serve_client.py sessions URL            session turns = whole history; save/delete/load
  serve_client.py disconnect URL          a client gone mid-stream frees its slot
  serve_client.py unsupported URL MODEL_ID  unimplemented fields get 400s naming them
  serve_client.py remote-tokenizer URL    /tokenizer_info, /tokenize, /detokenize as lm-eval calls them
  serve_client.py busy URL                --slots 1 --max-queue 1: the third request gets 429
  serve_client.py same-server URL URL     the same greedy requests give the same text on both
  serve_client.py fuzz URL N              N mutated requests: all answered below 500
"""
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

API_KEY = os.environ.get("RP_API_KEY")
TIMEOUT = 60
LAST_HEADERS = {}  # the headers of the last request()'s reply


def request(url, path, body=None, method=None, key=API_KEY):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data else "GET"))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", "Bearer " + key)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            raw = r.read()
            status = r.status
            ctype = r.headers.get("Content-Type", "")
            LAST_HEADERS.clear()
            LAST_HEADERS.update(r.headers.items())
    except urllib.error.HTTPError as e:
        raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
        LAST_HEADERS.clear()
        LAST_HEADERS.update(e.headers.items())
    if "json" in ctype:
        return status, json.loads(raw)
    return status, raw


def parse_sse(raw):
    """SSE bytes -> (text, last chunk, number of chunks); checks the framing."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    events = raw.split("\n\n")
    if events[-1] != "":
        raise AssertionError("SSE reply does not end with a blank line: %r" % raw[-80:])
    events = events[:-1]
    if not events or events[-1] != "data: [DONE]":
        raise AssertionError("SSE reply does not end with 'data: [DONE]': %r" % raw[-120:])
    text, last, n = [], None, 0
    for ev in events[:-1]:
        if not ev.startswith("data: "):
            raise AssertionError("SSE event without 'data: ': %r" % ev[:80])
        chunk = json.loads(ev[6:])
        if "error" in chunk:
            raise AssertionError("SSE error event: %r" % chunk)
        choice = chunk["choices"][0]
        if "delta" in choice:
            text.append(choice["delta"].get("content", ""))
        else:
            text.append(choice["text"])
        last, n = chunk, n + 1
    if last is None or last["choices"][0]["finish_reason"] is None:
        raise AssertionError("the last SSE chunk has no finish_reason")
    return "".join(text), last, n


def stream(url, path, body):
    status, raw = request(url, path, dict(body, stream=True))
    if status != 200:
        raise AssertionError("stream: HTTP %d %r" % (status, raw))
    return parse_sse(raw)


def complete(url, body, chat=False):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, r = request(url, path, body)
    if status != 200:
        raise AssertionError("%s: HTTP %d %r" % (path, status, r))
    c = r["choices"][0]
    return (c["message"]["content"] if chat else c["text"]), r


def text_of(spec):
    """json:FILE:a.0.b  -> the field of a JSON file; sse:FILE -> an SSE reply's
    text; gen:FILE -> `rwkvpipe generate` output (last newline dropped);
    genchat:FILE -> the same without the reply's leading space."""
    kind, _, rest = spec.partition(":")
    if kind == "json":
        path, _, fields = rest.partition(":")
        v = json.load(open(path, encoding="utf-8"))
        for f in fields.split(".") if fields else []:
            v = v[int(f)] if isinstance(v, list) else v[f]
        return v
    if kind == "sse":
        return parse_sse(open(rest, "rb").read())[0]
    if kind in ("gen", "genchat"):
        b = open(rest, "rb").read()
        if b.endswith(b"\n"):
            b = b[:-1]
        t = b.decode("utf-8", "replace")
        if kind == "genchat" and t.startswith(" "):
            t = t[1:]
        return t
    raise SystemExit("unknown text spec " + spec)


def check(cond, what):
    if not cond:
        print("FAIL: " + what)
        sys.exit(1)


def cmd_same(a, b):
    ta, tb = text_of(a), text_of(b)
    check(ta == tb, "texts differ:\n  %s: %r\n  %s: %r" % (a, ta, b, tb))
    print("ok: %d characters equal" % len(ta))


def cmd_sse(path):
    text, last, n = parse_sse(open(path, "rb").read())
    print(json.dumps({"text": text, "finish_reason": last["choices"][0]["finish_reason"],
                      "usage": last.get("usage"), "chunks": n}))


GREEDY = {"temperature": 0}


def cmd_stops(url):
    base, r = complete(url, dict(GREEDY, prompt="Stop strings: ", max_tokens=64))
    # a two-character stop (text matching over tokens) and a one-character stop
    # (one token of the byte vocabulary: the engine stops on it)
    safe = [i for i in range(3, len(base) - 1)
            if all(c.isascii() and c.isprintable() for c in base[i:i + 2])]
    check(safe, "no printable ASCII pair in the greedy text %r" % base)
    for stop in (base[safe[0]:safe[0] + 2], base[safe[0]]):
        want = base[:base.index(stop)]
        body = dict(GREEDY, prompt="Stop strings: ", max_tokens=64, stop=["never-there", stop])
        got, r = complete(url, body)
        check(got == want, "stop %r: %r, expected %r" % (stop, got, want))
        check(r["choices"][0]["finish_reason"] == "stop", "stop %r: finish_reason %r" % (
            stop, r["choices"][0]["finish_reason"]))
        check(r["usage"]["completion_tokens"] <= len(want.encode()) + len(stop) + 4,
              "stop %r: usage %r" % (stop, r["usage"]))
        got, last, _ = stream(url, "/v1/completions", body)
        check(got == want, "streamed, stop %r: %r, expected %r" % (stop, got, want))
        check(last["choices"][0]["finish_reason"] == "stop", "streamed finish_reason")
        got, _ = complete(url, dict(body, stop=stop))
        check(got == want, "stop given as a string")
    print("ok: stop strings end the text before them, streamed or not")


def prompts(n):
    return [("Prompt number %d: " % i + "abc " * (i % 5), 5 + 7 * i) for i in range(n)]


def cmd_concurrent(url, n):
    n = int(n)
    cases = prompts(n)
    alone = [complete(url, dict(GREEDY, prompt=p, max_tokens=m))[0] for p, m in cases]
    results = [None] * n
    errors = []

    def run(i):
        try:
            p, m = cases[i]
            if i % 2:
                results[i] = stream(url, "/v1/completions", dict(GREEDY, prompt=p, max_tokens=m))[0]
            else:
                results[i] = complete(url, dict(GREEDY, prompt=p, max_tokens=m))[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append("request %d: %s" % (i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors, "; ".join(errors))
    for i in range(n):
        check(results[i] == alone[i], "request %d: %r together, %r alone" % (i, results[i], alone[i]))
    print("ok: %d concurrent requests (half streamed) each equal to their text alone" % n)


def cmd_same_server(url_a, url_b):
    for p, m in prompts(6):
        a = complete(url_a, dict(GREEDY, prompt=p, max_tokens=m))[0]
        b = complete(url_b, dict(GREEDY, prompt=p, max_tokens=m))[0]
        check(a == b, "%r: %r on %s, %r on %s" % (p, a, url_a, b, url_b))
    print("ok: both servers give the same greedy texts")


def byte_ids(s):
    return list(s.encode())


def cmd_sessions(url):
    common = dict(GREEDY, max_tokens=16, return_token_ids=True)
    # Completions: turn 1 stores the state, turn 2 continues it; the same
    # tokens sent at once without a session give the same text.
    p1, p2 = "User: first question\n\nAssistant:", "\n\nUser: second one\n\nAssistant:"
    t1, r1 = complete(url, dict(common, prompt=p1, session="conv"))
    check(r1.get("session") == "conv", "the reply names its session")
    ids1 = r1["choices"][0]["token_ids"]
    check(len(ids1) == r1["usage"]["completion_tokens"], "token_ids match usage")
    status, saved = request(url, "/v1/sessions/conv/save", {"path": "conv-turn1.state"})
    check(status == 200 and saved.get("saved") is True, "save: %d %r" % (status, saved))
    t2, r2 = complete(url, dict(common, prompt=p2, session="conv"))
    whole, _ = complete(url, dict(common, prompt=byte_ids(p1) + ids1 + byte_ids(p2)))
    check(t2 == whole, "session turn 2 %r, whole history %r" % (t2, whole))
    check(r2["usage"]["prompt_tokens"] == len(p2.encode()), "turn 2 prompt_tokens count new tokens")
    # delete, then load the state saved after turn 1 and continue again
    status, r = request(url, "/v1/sessions/conv", method="DELETE")
    check(status == 200, "delete: %d %r" % (status, r))
    status, r = request(url, "/v1/sessions/conv", method="DELETE")
    check(status == 404, "delete twice: %d %r" % (status, r))
    status, r = request(url, "/v1/sessions/conv/save", {"path": "x.state"})
    check(status == 404, "save of a deleted session: %d %r" % (status, r))
    status, r = request(url, "/v1/sessions/conv/load", {"path": "conv-turn1.state"})
    check(status == 200 and r.get("loaded") is True, "load: %d %r" % (status, r))
    t2b, _ = complete(url, dict(common, prompt=p2, session="conv"))
    check(t2b == t2, "after save/delete/load: %r, before %r" % (t2b, t2))
    # a loaded state used read-only: the same again, and it is not changed
    status, r = request(url, "/v1/sessions/fixed/load", {"path": "conv-turn1.state"})
    check(status == 200, "load as 'fixed': %d %r" % (status, r))
    for _ in range(2):
        t, _ = complete(url, dict(common, prompt=p2, initial_state="fixed"))
        check(t == t2, "initial_state: %r, expected %r" % (t, t2))
    status, r = request(url, "/v1/completions", dict(common, prompt="x", initial_state="nope"))
    check(status == 404, "unknown initial_state: %d %r" % (status, r))
    for bad in ({"path": "../escape"}, {"path": "/abs"}, {"path": 3}, {}):
        status, r = request(url, "/v1/sessions/fixed/save", bad)
        check(status == 400, "save with %r: %d %r" % (bad, status, r))
    status, r = request(url, "/v1/sessions/fixed/load", {"path": "missing.state"})
    check(status in (400, 404), "load of a missing file: %d %r" % (status, r))

    # Chat: turn 2 through the session equals turn 2 after the whole history
    # sent as tokens (the reply's exact bytes); and equals the history sent as
    # messages when the reply is plain text starting with the space the
    # format puts after "Assistant:".
    chat = dict(GREEDY, max_tokens=12, presence_penalty=0, frequency_penalty=0,
                return_token_ids=True)
    c1, cr1 = complete(url, dict(chat, messages=[{"role": "user", "content": "hello"}],
                                 session="chat"), chat=True)
    ids_c1 = cr1["choices"][0]["token_ids"]
    c2, _ = complete(url, dict(chat, messages=[{"role": "user", "content": "and then?"}],
                               session="chat"), chat=True)
    raw1 = bytes(ids_c1)
    sep = b"" if raw1.endswith(b"\n\n") else b"\n" if raw1.endswith(b"\n") else b"\n\n"
    history = b"User: hello\n\nAssistant:" + raw1 + sep + b"User: and then?\n\nAssistant:"
    w, _ = complete(url, dict(chat, prompt=list(history), stop="\n\n", ban_token_ids=[0]))
    check(c2 == (w[1:] if w.startswith(" ") else w),
          "chat turn 2 via session %r, via the whole history %r" % (c2, w))
    if raw1.startswith(b" ") and raw1.decode("utf-8", "replace") == " " + c1:
        msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": c1},
                {"role": "user", "content": "and then?"}]
        m2, _ = complete(url, dict(chat, messages=msgs), chat=True)
        check(m2 == c2, "chat history as messages %r, via session %r" % (m2, c2))
        print("ok: chat history as messages = session (checked)")
    status, r = request(url, "/v1/sessions/chat", method="GET")
    check(status == 200 and r.get("exists") is True, "GET session: %d %r" % (status, r))
    print("ok: sessions continue exactly; save, delete, load, initial_state")


def metric(url, name):
    status, raw = request(url, "/metrics")
    for line in raw.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError("metric %s missing" % name)


def wait_idle(url, seconds=10.0):
    end = time.time() + seconds
    while time.time() < end:
        if metric(url, "rwkvpipe_slots_active") == 0 and metric(url, "rwkvpipe_requests_queued") == 0:
            return True
        time.sleep(0.05)
    return False


def open_stream(url, body):
    """Sends a streamed completion on a raw socket without waiting for the
    reply (a queued request gets its first bytes only when it runs)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    data = json.dumps(dict(body, stream=True)).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n" \
           "Content-Length: %d\r\n" % (host, len(data))
    if API_KEY:
        head += "Authorization: Bearer %s\r\n" % API_KEY
    sock.sendall((head + "\r\n").encode() + data)
    return sock


def cmd_disconnect(url):
    check(wait_idle(url), "server busy before the test")
    # token 0 (end of text) banned: nothing ends these before the clients leave
    long = {"max_tokens": 1000000000, "ban_token_ids": [0]}
    running = open_stream(url, dict(long, prompt="running"))
    check(running.recv(64).startswith(b"HTTP/1.1 200"), "the first stream runs")
    queued = open_stream(url, dict(long, prompt="queued"))
    # A wall-clock deadline generous enough for a loaded machine (the queued
    # request may take seconds to be read and tokenized there).
    end = time.time() + 60
    while metric(url, "rwkvpipe_requests_queued") < 1 and time.time() < end:
        time.sleep(0.02)
    active, queued_n = metric(url, "rwkvpipe_slots_active"), metric(url, "rwkvpipe_requests_queued")
    check(active == 1 and queued_n == 1,
          "one generation runs and one waits (--slots 1): slots_active %g, requests_queued %g"
          % (active, queued_n))
    t0 = time.time()
    queued.close()
    running.close()
    check(wait_idle(url), "slots still active after the clients left: %g" %
          metric(url, "rwkvpipe_slots_active"))
    print("ok: clients gone mid-stream (running or queued) free their slots in %.2f s" %
          (time.time() - t0))


def cmd_busy(url):
    check(wait_idle(url), "server busy before the test")
    long = {"prompt": "busy", "max_tokens": 1000000000, "ban_token_ids": [0]}
    first = open_stream(url, long)
    check(first.recv(64).startswith(b"HTTP/1.1 200"), "the first stream runs")
    # the second waits in the queue (its headers come only when it runs)
    second = threading.Thread(target=lambda: request(url, "/v1/completions", dict(long, max_tokens=3)))
    second.start()
    end = time.time() + 60
    while metric(url, "rwkvpipe_requests_queued") < 1 and time.time() < end:
        time.sleep(0.02)
    status, r = request(url, "/v1/completions", dict(long, max_tokens=3))
    check(status == 429, "third request: %d %r" % (status, r))
    check(r["error"]["type"] == "rate_limit_error", "429 error type %r" % r)
    retry = LAST_HEADERS.get("Retry-After", "")
    check(retry.isdigit() and 1 <= int(retry) <= 60, "429 Retry-After %r" % retry)
    first.close()
    second.join(TIMEOUT)
    check(wait_idle(url), "slots still active")
    print("ok: a full queue answers 429")


def cmd_fuzz(url, n):
    """Bounded random mutations of valid requests: every answer is a status
    below 500 with a JSON body, and the server keeps answering."""
    import random
    rng = random.Random(7)
    bases = [{"prompt": "x", "max_tokens": 2, "temperature": 0.5, "stop": ["a"], "seed": 1},
             {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}]
    values = [None, True, -1, 0, 1.5, 1e308, -1e308, 2 ** 63, "", "x" * 300, [], {}, [1, "a"],
              {"role": "user"}, "\u0000", "\ud800", [[[[[]]]]]]
    keys = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
            "stream", "session", "initial_state", "stop_token_ids", "ban_token_ids", "n",
            "presence_penalty", "frequency_penalty", "penalty_decay", "model", "return_token_ids",
            "logprobs", "echo", "logit_bias", "top_logprobs"]
    for i in range(int(n)):
        chat = i % 2 == 1
        body = json.loads(json.dumps(bases[i % 2]))
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(keys)] = rng.choice(values)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        raw = json.dumps(body).encode()
        if i % 7 == 0:  # broken bytes
            cut = rng.randint(0, len(raw))
            raw = raw[:cut] + bytes([rng.randint(0, 255)]) + raw[cut + 1:]
        req = urllib.request.Request(url + path, raw, {"Content-Type": "application/json"})
        if API_KEY:
            req.add_header("Authorization", "Bearer " + API_KEY)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                status, out = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, out = e.code, e.read()
        check(status < 500, "request %r: HTTP %d %r" % (raw[:200], status, out[:200]))
        if not body.get("stream") is True or status != 200:
            json.loads(out)
    status, r = request(url, "/health")
    check(status == 200, "health after fuzzing: %d" % status)
    print("ok: %s mutated requests, all answered below 500" % n)


def cmd_unsupported(url, model_id):
    """Every field the server does not implement is a 400 unsupported_field
    naming it; the developer role is the system role; GET /v1/models/{id}."""
    tool = [{"type": "function", "function": {"name": "f"}}]
    chat = {"tools": tool, "tool_choice": "auto"}
    completion = {"best_of": 2, "suffix": "end", "tools": tool, "top_logprobs": 2}
    cases = [("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}],
                                           **{k: v}), k) for k, v in chat.items()]
    cases += [("/v1/completions", {"prompt": "x", k: v}, k) for k, v in completion.items()]
    cases.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"},
                                                        {"role": "tool", "content": "y"}]},
                  "role is 'tool'"))
    for path, body, name in cases:
        status, r = request(url, path, body)
        check(status == 400 and r["error"]["code"] == "unsupported_field" and
              name in r["error"]["message"], "%s %r: %d %r" % (path, body, status, r))
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    dev_msgs = [dict(sys_msgs[0], role="developer"), sys_msgs[1]]
    a = request(url, "/v1/chat/completions", dict(GREEDY, messages=sys_msgs, max_tokens=8))
    b = request(url, "/v1/chat/completions", dict(GREEDY, messages=dev_msgs, max_tokens=8))
    check(a[0] == b[0] == 200 and a[1]["choices"][0]["message"] == b[1]["choices"][0]["message"]
          and all(a[1]["usage"][k] == b[1]["usage"][k] for k in ("prompt_tokens",
                                                                 "completion_tokens")),
          "developer vs system: %r %r" % (a, b))  # (b may resume a's prompt from the cache)
    status, m = request(url, "/v1/models/" + model_id)
    check(status == 200 and m["object"] == "model" and m["id"] == model_id, "model %r" % m)
    print("ok: %d unimplemented fields refused by name; developer = system; GET /v1/models/{id}"
          % len(cases))


def cmd_remote_tokenizer(url):
    """What lm-evaluation-harness's RemoteTokenizer (lm_eval/utils.py) does:
    check_remote_tokenizer_support, then encode / decode / eos_token_id."""
    status, info = request(url, "/tokenizer_info")
    check(status == 200 and isinstance(info, dict) and "eos_token" in info, "info %r" % info)
    status, r = request(url, "/tokenize", {"prompt": "test", "add_special_tokens": False})
    check(status == 200 and isinstance(r.get("tokens"), list), "tokenize 'test': %r" % r)
    text = "The quick brown fox, \u00e9t\u00e9 \u2603."
    status, r = request(url, "/tokenize", {"prompt": text, "add_special_tokens": False})
    check(status == 200 and r["count"] == len(r["tokens"]) > 0, "tokenize: %r" % r)
    ids = r["tokens"]
    # the same ids as a generation request reads: the usage counts them
    status, c = request(url, "/v1/completions", {"prompt": text, "max_tokens": 0})
    check(status == 200 and c["usage"]["prompt_tokens"] == len(ids),
          "/tokenize gives %d ids, a completion reads %r" % (len(ids), c.get("usage")))
    status, r = request(url, "/detokenize", {"tokens": ids})
    check(status == 200 and r.get("prompt") == text, "detokenize: %r" % r)
    status, r = request(url, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    check(status == 200 and r["tokens"][:1] == [info["eos_token_id"]] == [0],
          "encode(eos_token)[0]: %r (info %r)" % (r, info))
    status, r = request(url, "/detokenize", {"tokens": [0]})
    check(status == 200 and r["prompt"] == info["eos_token"], "decode([eot]): %r" % r)
    status, r = request(url, "/detokenize", {"tokens": [1 << 20]})
    check(status == 400 and r["error"]["code"] == "invalid_value", "an id outside: %r" % r)
    print("ok: tokenizer_info, tokenize, detokenize as lm-eval's RemoteTokenizer uses them")


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmds = {"same": cmd_same, "sse": cmd_sse, "stops": cmd_stops, "concurrent": cmd_concurrent,
            "sessions": cmd_sessions, "disconnect": cmd_disconnect, "busy": cmd_busy,
            "same-server": cmd_same_server, "fuzz": cmd_fuzz,
            "remote-tokenizer": cmd_remote_tokenizer, "unsupported": cmd_unsupported}
    if argv[1] not in cmds:
        print(__doc__)
        return 2
    try:
        cmds[argv[1]](*argv[2:])
    except AssertionError as e:
        print("FAIL: %s" % e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
