#!/usr/bin/env python3
"""Drives `rwkvpipe serve` with the request shapes of lm-evaluation-harness and
the OpenAI SDKs (docs/serving.md, Logprobs) and checks real values:

  serve_logprobs_client.py URL LOGITS.safetensors TOKENS CTXLEN

lm-eval's loglikelihood request {prompt: context+continuation (token ids),
max_tokens: 1, logprobs: 1, echo: true, temperature: 0}, parsed as
lm_eval/models/openai_completions.py parse_logprobs does (token_logprobs
[ctxlen:-1]), must equal the log-softmax of `rwkvpipe logits` (row t predicts
token t+1) within 1e-4, with is_greedy alike; so must max_tokens 0; streamed
chunks carry the same logprobs; chat logprobs have OpenAI's shape.
Exit status 0 when every check passes; prints one line per check."""
import json
import math
import struct
import sys
import urllib.error
import urllib.request

URL, LOGITS, TOKENS, CTXLEN = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
failed = 0


def check(what, cond, detail=""):
    global failed
    print(("ok - " if cond else "FAIL - ") + what + ("" if cond else ": " + str(detail)))
    failed += 0 if cond else 1


def post(path, body):
    req = urllib.request.Request(URL + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def read_logits(path):
    """logits [T, V] (f32) of a safetensors file, with the stdlib."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        info = header["logits"]
        t, v = info["shape"]
        f.seek(base + info["data_offsets"][0])
        data = struct.unpack("<%df" % (t * v), f.read(4 * t * v))
    return [data[i * v:(i + 1) * v] for i in range(t)]


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


tokens = [int(x) for x in TOKENS.split(",")]
ref = [log_softmax(r) for r in read_logits(LOGITS)]
# the reference: token t+1's logprob from row t; greedy when it is the row's argmax
want = [ref[t][tokens[t + 1]] for t in range(len(tokens) - 1)]
want_sum = sum(want[CTXLEN - 1:])
want_greedy = all(ref[t][tokens[t + 1]] == max(ref[t]) for t in range(CTXLEN - 1, len(tokens) - 1))


def parse_logprobs(out, ctxlens):
    """lm_eval/models/openai_completions.py LocalCompletionsAPI.parse_logprobs"""
    res = []
    if isinstance(ctxlens, int):
        ctxlens = [ctxlens]
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        lp = choice["logprobs"]
        logprobs = sum(lp["token_logprobs"][ctxlen:-1])
        is_greedy = True
        for tok, top in zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]):
            if tok != max(top.values()):
                is_greedy = False
                break
        res.append((logprobs, is_greedy))
    return res


# lm-eval's exact loglikelihood request (tokenized_requests: token ids)
body = {"model": None, "prompt": tokens, "temperature": 0, "max_tokens": 1, "logprobs": 1,
        "seed": 1234, "echo": True}
code, text = post("/v1/completions", body)
check("lm-eval loglikelihood request: 200", code == 200, text[:300])
out = json.loads(text) if code == 200 else {"choices": []}
if code == 200:
    ch = out["choices"][0]
    lp = ch["logprobs"]
    n = len(tokens)
    check("echo: one entry per prompt token and one generated",
          len(lp["tokens"]) == n + 1 and len(lp["token_logprobs"]) == n + 1 and
          len(lp["top_logprobs"]) == n + 1 and len(lp["text_offset"]) == n + 1,
          {k: len(v) for k, v in lp.items()})
    check("the first prompt token's logprob and top_logprobs are null",
          lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None, lp["token_logprobs"][:2])
    diffs = [abs(lp["token_logprobs"][t + 1] - want[t]) for t in range(n - 1)]
    check("every prompt token's logprob = log-softmax of `rwkvpipe logits` within 1e-4",
          max(diffs) < 1e-4, max(diffs))
    tops_ok = all(len(lp["top_logprobs"][t]) == 1 and
                  abs(list(lp["top_logprobs"][t].values())[0] - max(ref[t - 1])) < 1e-4
                  for t in range(1, n))
    check("top_logprobs: one entry, the row's maximum", tops_ok, lp["top_logprobs"][1:3])
    offs = lp["text_offset"]
    check("text_offset counts characters of the echoed text",
          offs[0] == 0 and all(offs[i] <= offs[i + 1] for i in range(n)) and
          ch["text"].startswith("".join(lp["tokens"][:1])), offs[:5])
    # the generated token: greedy, and its logprob is the last row's maximum
    last = lp["token_logprobs"][n]
    check("the generated token's logprob is the last row's maximum (temperature 0)",
          out["usage"]["completion_tokens"] <= 1 and abs(last - max(ref[n - 1])) < 1e-4,
          (last, max(ref[n - 1])))
    (got_sum, got_greedy), = parse_logprobs(out, CTXLEN)
    check("lm-eval's parse_logprobs: the continuation's sum = eval within 1e-4 (%.6f vs %.6f)"
          % (got_sum, want_sum), abs(got_sum - want_sum) < 1e-4, (got_sum, want_sum))
    check("lm-eval's parse_logprobs: is_greedy as the reference (%s)" % want_greedy,
          got_greedy == want_greedy, got_greedy)

# max_tokens 0 with echo scores the prompt only
body0 = dict(body, max_tokens=0, logprobs=3)
code, text = post("/v1/completions", body0)
if code == 200:
    lp0 = json.loads(text)["choices"][0]["logprobs"]
    d = max(abs(lp0["token_logprobs"][t + 1] - want[t]) for t in range(len(tokens) - 1))
    check("max_tokens 0 + echo: exactly the prompt's tokens, same logprobs, 3 alternatives",
          len(lp0["tokens"]) == len(tokens) and d < 1e-4 and
          all(len(x) == 3 for x in lp0["top_logprobs"][1:]), (len(lp0["tokens"]), d))
    tops = lp0["top_logprobs"][1]
    check("top_logprobs are the 3 most likely, in order",
          sorted(tops.values(), reverse=True) == list(tops.values()) and
          abs(list(tops.values())[0] - max(ref[0])) < 1e-4, tops)
else:
    check("max_tokens 0 + echo: 200", False, text[:300])

# streamed: the chunks' logprobs concatenate to the same lists
code, text = post("/v1/completions", dict(body, stream=True, max_tokens=4))
if code == 200:
    toks, lps = [], []
    for line in text.split("\n"):
        if line.startswith("data: {"):
            c = json.loads(line[6:])["choices"][0]
            if c.get("logprobs"):
                toks += c["logprobs"]["tokens"]
                lps += c["logprobs"]["token_logprobs"]
    d = max(abs(lps[t + 1] - want[t]) for t in range(len(tokens) - 1)) if len(lps) >= len(tokens) else 1
    check("stream: the chunks carry the prompt's and the generated tokens' logprobs",
          len(toks) == len(lps) and len(toks) >= len(tokens) + 1 and lps[0] is None and d < 1e-4,
          (len(toks), d))
else:
    check("stream with logprobs: 200", False, text[:300])

# chat: logprobs true, top_logprobs k -> choices[0].logprobs.content
code, text = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 5, "temperature": 0, "logprobs": True,
                                            "top_logprobs": 2, "stop": []})
if code == 200:
    c = json.loads(text)["choices"][0]
    content = c["logprobs"]["content"]
    shape = all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} and
                len(e["top_logprobs"]) == 2 and
                all(set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"]) and
                e["logprob"] <= 0 and abs(e["top_logprobs"][0]["logprob"] - e["logprob"]) < 1e-6
                for e in content)
    check("chat logprobs: content[] of {token, logprob, bytes, top_logprobs[2]}, greedy = top",
          len(content) >= 1 and shape, content[:1])
    joined = bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace")
    check("chat logprobs: the tokens' bytes spell the reply (and its format space)",
          joined.lstrip(" ") == c["message"]["content"] or joined == " " + c["message"]["content"],
          (joined, c["message"]["content"]))
else:
    check("chat with logprobs: 200", False, text[:300])
code, text = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 4, "temperature": 0, "logprobs": True,
                                            "stream": True, "stop": []})
n_entries = sum(len((json.loads(l[6:])["choices"][0].get("logprobs") or {}).get("content", []))
                for l in text.split("\n") if l.startswith("data: {") and '"choices"' in l)
check("chat stream: chunks carry logprobs.content (4 tokens)", code == 200 and n_entries == 4,
      (code, n_entries))
# logit_bias: +100 on 'x' forces it at temperature 0 (and at temperature 1);
# the reported logprobs stay the model's (unbiased)
for temp in (0, 1):
    code, text = post("/v1/completions", {"prompt": "The", "max_tokens": 6, "temperature": temp,
                                          "seed": 7, "logit_bias": {"120": 100},
                                          "return_token_ids": True, "logprobs": 0})
    ok = code == 200
    if ok:
        c = json.loads(text)["choices"][0]
        ok = c["token_ids"] == [120] * 6 and c["text"] == "xxxxxx" and \
            min(c["logprobs"]["token_logprobs"]) < -0.5
    check("logit_bias {\"120\": 100} forces 'x' at temperature %d, logprobs unbiased" % temp, ok,
          text[:300])
code, text = post("/v1/completions", {"prompt": "The", "max_tokens": 6, "temperature": 0,
                                      "logit_bias": {"120": 100}, "return_token_ids": True,
                                      "stop_token_ids": []})
code2, text2 = post("/v1/completions", {"prompt": "The", "max_tokens": 6, "temperature": 0,
                                        "logit_bias": {"120": -100, "0": -100},
                                        "return_token_ids": True})
check("logit_bias -100 bans a token", code2 == 200 and
      120 not in json.loads(text2)["choices"][0]["token_ids"], text2[:200])
for bad, name in (({"256": 1}, "'256'"), ({"-1": 1}, "'-1'"), ({"5": 101}, "'5'"),
                  ({"x": 1}, "'x'"), ({"5": "1"}, "'5'")):
    code, text = post("/v1/completions", {"prompt": "a", "max_tokens": 1, "logit_bias": bad})
    check("logit_bias %s -> 400 naming %s" % (json.dumps(bad), name),
          code == 400 and name in text and "logit_bias" in text, (code, text[:200]))
# batched prompts (lm-eval's batch_size > 1 with token lists, LangChain's
# generate([...])): one choice per prompt, each equal bit for bit to the
# same prompt sent alone (temperature 0), usage summed
ctx2 = tokens[:CTXLEN - 5]
batch_body = {"prompt": [tokens, ctx2], "temperature": 0, "max_tokens": 1, "logprobs": 1,
              "seed": 1234, "echo": True}
code, text = post("/v1/completions", batch_body)
check("batch of two token lists: 200", code == 200, text[:300])
if code == 200:
    out = json.loads(text)
    alone = [json.loads(post("/v1/completions", dict(batch_body, prompt=p))[1]) for p in (tokens, ctx2)]
    check("batch: choices in order, each equal to its prompt alone (text and logprobs, bit for bit)",
          [c["index"] for c in out["choices"]] == [0, 1] and
          all(out["choices"][i]["text"] == alone[i]["choices"][0]["text"] and
              out["choices"][i]["logprobs"] == alone[i]["choices"][0]["logprobs"] for i in range(2)),
          text[:300])
    check("batch: usage is the sum", out["usage"]["prompt_tokens"] == len(tokens) + len(ctx2) and
          out["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone),
          out["usage"])
    res = parse_logprobs(out, [CTXLEN, CTXLEN - 6])
    check("batch: lm-eval's parse_logprobs gives the reference sum for the first prompt",
          abs(res[0][0] - want_sum) < 1e-4, res)
texts = ["The quick", "brown fox", "jumps"]
body_t = {"prompt": texts, "temperature": 0, "max_tokens": 8}
code, text = post("/v1/completions", body_t)
alone = [post("/v1/completions", dict(body_t, prompt=t))[1] for t in texts]
check("batch of strings: each choice's text equals its prompt alone",
      code == 200 and [c["text"] for c in json.loads(text)["choices"]] ==
      [json.loads(a)["choices"][0]["text"] for a in alone], text[:300])
code, text = post("/v1/completions", {"prompt": ["ok", [1, 2, 300]], "max_tokens": 1})
check("batch: a bad prompt is a 400 naming it", code == 400 and "prompt 1 of the batch" in text,
      (code, text[:200]))
code, text = post("/v1/completions", {"prompt": ["ok", 5], "max_tokens": 1})
check("batch: a prompt that is neither text nor ids is a 400 naming it",
      code == 400 and "'prompt'[1]" in text, (code, text[:200]))

# n > 1: choice j uses seed + j (reproducible), choices differ, prompt-major with a batch
body_n = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "top_p": 1.0,
          "seed": 42, "n": 3}
def prefilled():
    with urllib.request.urlopen(URL + "/metrics", timeout=60) as r:
        for line in r.read().decode().split("\n"):
            if line.startswith("rwkvpipe_tokens_prefilled_total "):
                return int(float(line.split()[1]))


before = prefilled()
code, text = post("/v1/completions", body_n)
after = prefilled()
check("n 3: the prompt is prefilled once (all but its last token, which each choice reads)",
      after - before == len("Once upon a time") - 1, (before, after))
code2, text2 = post("/v1/completions", body_n)
ok = code == 200 and code2 == 200
if ok:
    a, b = json.loads(text), json.loads(text2)
    ta = [c["text"] for c in a["choices"]]
    check("n 3 with a seed: the same choices again", ta == [c["text"] for c in b["choices"]], (ta,))
    check("n 3: the choices differ", len(set(ta)) == 3, ta)
    single = [json.loads(post("/v1/completions", dict(body_n, n=1, seed=42 + j))[1])["choices"][0]["text"]
              for j in range(3)]
    check("n 3: choice j = the same request with seed + j", single == ta, (single, ta))
    check("n 3: usage counts the prompt once and every choice's tokens",
          a["usage"]["completion_tokens"] == 36 and a["usage"]["prompt_tokens"] == len("Once upon a time"),
          a["usage"])
else:
    check("n 3: 200", False, text[:300])
code, text = post("/v1/completions", dict(body_n, prompt=["Once upon a time", "The end"], n=2))
if code == 200:
    ch = json.loads(text)["choices"]
    alone2 = json.loads(post("/v1/completions", dict(body_n, prompt="The end", n=2))[1])["choices"]
    check("batch x n: prompt-major indexes, each prompt's choices as with that prompt alone",
          [c["index"] for c in ch] == [0, 1, 2, 3] and ch[0]["text"] == ta[0] and
          ch[1]["text"] == ta[1] and [c["text"] for c in ch[2:]] == [c["text"] for c in alone2],
          [c["text"] for c in ch])
else:
    check("batch x n: 200", False, text[:300])
code, text = post("/v1/completions", dict(body_n, stream=True))
idx = {}
for line in text.split("\n"):
    if line.startswith("data: {"):
        for c in json.loads(line[6:])["choices"]:
            idx[c["index"]] = idx.get(c["index"], "") + c["text"]
check("n 3 streamed: the chunks of each index concatenate to the same texts",
      code == 200 and [idx.get(i) for i in range(3)] == ta, (idx, ta))
code, text = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 6, "n": 2, "seed": 3,
                                            "temperature": 1.0, "stop": []})
check("chat n 2: two choices", code == 200 and
      [c["index"] for c in json.loads(text)["choices"]] == [0, 1], text[:300])
code, text = post("/v1/completions", {"prompt": "a", "n": 2, "session": "s1"})
check("n 2 with a session: 400 naming session", code == 400 and "'session'" in text, text[:200])
code, text = post("/v1/completions", {"prompt": "a", "n": 65})
check("n 65: 400 naming n", code == 400 and "'n'" in text, text[:200])
# bad values name the field
for bad, name in (({"logprobs": 21}, "logprobs"), ({"logprobs": "1"}, "logprobs"),
                  ({"echo": 1}, "echo"), ({"top_logprobs": 2}, "top_logprobs")):
    code, text = post("/v1/completions", dict({"prompt": "a", "max_tokens": 1}, **bad))
    check("completions %s -> 400 naming it" % json.dumps(bad), code == 400 and name in text,
          (code, text[:200]))
sys.exit(1 if failed else 0)
