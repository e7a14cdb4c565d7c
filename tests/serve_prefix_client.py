#!/usr/bin/env python3
"""Client for the prefix state cache tests and benchmark (tests/test_serve_prefix.sh,
bench/prefix_chat.sh), standard library only.

  serve_prefix_client.py run URL TURNS      a chat resending its history every turn, and
                                            completions that repeat / extend a prompt
                                            (greedy and seeded); prints the replies as JSON
  serve_prefix_client.py metrics URL        prints the prefix cache metrics as JSON
  serve_prefix_client.py bench URL TURNS    the 20-turn chat benchmark: per turn, the new
                                            prompt tokens, the tokens prefilled (/metrics),
                                            and the time to the first streamed token
"""
import json
import sys
import time
import urllib.request

TIMEOUT = 120


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return json.loads(r.read())


def metrics(url):
    with urllib.request.urlopen(url + "/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


USER = ["Tell me about the sea.", "Why is it blue?", "And the sky?", "Write a short poem.",
        "Thanks. What is a wave?", "How deep is the ocean?", "Name a fish.", "Go on."]


def chat(url, turns, max_tokens, stream=False):
    """A chat resending the whole history each turn; returns the replies (and with
    stream, the seconds to the first streamed content of each turn)."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    replies, ttft = [], []
    for t in range(turns):
        messages.append({"role": "user", "content": USER[t % len(USER)] + " (turn %d)" % t})
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if not stream:
            r = post(url, "/v1/chat/completions", body)
            text = r["choices"][0]["message"]["content"]
        else:
            body["stream"] = True
            req = urllib.request.Request(url + "/v1/chat/completions",
                                         data=json.dumps(body).encode(), method="POST")
            req.add_header("Content-Type", "application/json")
            t0 = time.monotonic()
            first = None
            text = ""
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                for line in r:
                    line = line.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    d = json.loads(line[6:])
                    piece = d["choices"][0]["delta"].get("content") if d["choices"] else None
                    if piece and first is None:
                        first = time.monotonic() - t0
                    text += piece or ""
            ttft.append(first if first is not None else time.monotonic() - t0)
        replies.append(text)
        messages.append({"role": "assistant", "content": text})
    return (replies, ttft) if stream else replies


def run(url, turns):
    out = {"chat": chat(url, turns, 12), "completions": []}
    base = "Once upon a time, in a quiet village by the sea, there lived"
    for params in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 5}):
        prompt = base
        for _ in range(3):
            r = post(url, "/v1/completions", dict(prompt=prompt, max_tokens=10, **params))
            text = r["choices"][0]["text"]
            out["completions"].append(text)
            # the same prompt again (a regenerate), then the prompt extended
            r = post(url, "/v1/completions", dict(prompt=prompt, max_tokens=10, **params))
            out["completions"].append(r["choices"][0]["text"])
            prompt = prompt + text + " and then"
    # n > 1 (the prompt read once, its state copied), sent twice: the second
    # resumes from the cache
    for _ in range(2):
        r = post(url, "/v1/completions", dict(prompt=base + " two sisters", max_tokens=8, n=3,
                                              temperature=0.9, seed=11))
        out["completions"] += [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
    # a stored state (session), prompts that start from it (initial_state),
    # the state overwritten (a new version), the same prompt again
    for persona in ("You are a pirate.", "You are a poet."):
        post(url, "/v1/completions", dict(prompt=persona, max_tokens=2, temperature=0,
                                          session="persona"))
        for _ in range(2):
            r = post(url, "/v1/completions", dict(prompt=" Tell me about ships.", max_tokens=8,
                                                  temperature=0, initial_state="persona"))
            out["completions"].append(r["choices"][0]["text"])
    print(json.dumps(out, indent=1))


def prefix_metrics(url):
    m = metrics(url)
    print(json.dumps({k: m.get("rwkvpipe_" + k, -1) for k in (
        "prefix_cache_hits_total", "prefix_cache_tokens_saved_total", "prefix_cache_bytes",
        "tokens_prefilled_total")}))


def cached(url):
    """usage.prompt_tokens_details.cached_tokens of prompts sent twice: plain, with
    n > 1, from a stored state (initial_state; then the state overwritten and the
    prompt sent once more), and a session continued turn by turn."""
    prompt = "A prompt sent twice, to see the second one resumed from the cache:"
    out = {}

    def send(label, **body):
        r = post(url, "/v1/completions", dict(dict(max_tokens=4, temperature=0), **body))
        u = r["usage"]
        out.setdefault(label, []).append({
            "prompt_tokens": u["prompt_tokens"],
            "cached_tokens": u["prompt_tokens_details"]["cached_tokens"]})
    for _ in range(2):
        send("plain", prompt=prompt)
    for _ in range(2):
        send("n", prompt="Three choices from one prompt read once:", n=3, seed=3,
             temperature=0.8)
    post(url, "/v1/completions", dict(prompt="Remember this.", max_tokens=2, session="st"))
    for _ in range(2):
        send("initial_state", prompt=" " + prompt, initial_state="st")
    post(url, "/v1/completions", dict(prompt=" And this.", max_tokens=2, session="st"))
    send("initial_state_new_version", prompt=" " + prompt, initial_state="st")
    for t in range(2):
        send("session", prompt=" Turn %d of a session that goes on." % t, session="go")
    print(json.dumps(out))


def bench(url, turns):
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    rows = []
    prev_prompt_tokens = 0
    for t in range(turns):
        messages.append({"role": "user", "content": USER[t % len(USER)] + " (turn %d)" % t})
        m0 = metrics(url)
        body = {"messages": messages, "max_tokens": 32, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        req = urllib.request.Request(url + "/v1/chat/completions",
                                     data=json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        t0 = time.monotonic()
        first, text, usage = None, "", None
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if d.get("usage"):
                    usage = d["usage"]
                piece = d["choices"][0]["delta"].get("content") if d.get("choices") else None
                if piece and first is None:
                    first = time.monotonic() - t0
                text += piece or ""
        total = time.monotonic() - t0
        m1 = metrics(url)
        prompt_tokens = usage["prompt_tokens"] if usage else -1
        rows.append({
            "turn": t + 1, "prompt_tokens": prompt_tokens,
            "new_tokens": prompt_tokens - prev_prompt_tokens,
            "prefilled": int(m1["rwkvpipe_tokens_prefilled_total"] -
                             m0["rwkvpipe_tokens_prefilled_total"]),
            "saved": int(m1["rwkvpipe_prefix_cache_tokens_saved_total"] -
                         m0["rwkvpipe_prefix_cache_tokens_saved_total"]),
            "ttft_ms": round(1000 * (first if first is not None else total), 1),
        })
        prev_prompt_tokens = prompt_tokens + (usage["completion_tokens"] if usage else 0)
        messages.append({"role": "assistant", "content": text})
    print("turn prompt_tokens new_since_last_reply prefilled saved ttft_ms")
    for r in rows:
        print("%4d %13d %20d %9d %5d %7.1f" % (r["turn"], r["prompt_tokens"], r["new_tokens"],
                                               r["prefilled"], r["saved"], r["ttft_ms"]))
    print(json.dumps({"ttft_ratio_last_first": rows[-1]["ttft_ms"] / max(rows[0]["ttft_ms"], 1e-3)}))


if __name__ == "__main__":
    cmd, url = sys.argv[1], sys.argv[2]
    if cmd == "run":
        run(url, int(sys.argv[3]))
    elif cmd == "metrics":
        prefix_metrics(url)
    elif cmd == "cached":
        cached(url)
    elif cmd == "bench":
        bench(url, int(sys.argv[3]))
    else:
        sys.exit("unknown command " + cmd)
