#!/usr/bin/env python3
"""Drives `rwkvpipe serve` with response_format (docs/serving.md, Structured output) and checks
that every answer is a valid document, at temperature 1 on a model with random weights:

  serve_json_client.py URL

json_object and a json_schema (nested objects, an enum, an array with minItems/maxItems, an
integer, a string with maxLength, an optional property, $defs) over many seeds, n > 1, a batch
of prompts, streaming and chat: each reply parses with json.loads and validates against the
schema (the small validator below covers the subset). max_tokens too small for a document ends
with finish_reason "length" and a cut document, as OpenAI does. A schema keyword the server
does not support is a 400 naming it. Exit status 0 when every check passes."""
import json
import sys
import urllib.error
import urllib.request

URL = sys.argv[1]
SEEDS = int(sys.argv[2]) if len(sys.argv) > 2 else 24
failed = 0


def check(what, cond, detail=""):
    global failed
    print(("ok - " if cond else "FAIL - ") + what + ("" if cond else ": " + str(detail)[:2000]))
    failed += 0 if cond else 1


def post(path, body):
    req = urllib.request.Request(URL + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def validate(v, s, root, path="$"):
    """Errors of value v against schema s (the subset the server follows)."""
    if s is True or s == {}:
        return []
    if "$ref" in s:
        _, where, name = s["$ref"].split("/")
        return validate(v, root[where][name], root, path)
    for key in ("anyOf", "oneOf"):
        if key in s:
            ok = [a for a in s[key] if not validate(v, a, root, path)]
            return [] if ok else ["%s: matches no alternative" % path]
    if "enum" in s:
        return [] if any(v == e and type(v) is type(e) for e in s["enum"]) else ["%s: %r not in enum" % (path, v)]
    if "const" in s:
        return [] if v == s["const"] else ["%s: %r is not the const" % (path, v)]
    t = s.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if t in types and not isinstance(v, types[t]):
        return ["%s: %r is not a %s" % (path, v, t)]
    if t == "integer" and (not isinstance(v, int) or isinstance(v, bool)):
        return ["%s: %r is not an integer" % (path, v)]
    if t == "number" and (not isinstance(v, (int, float)) or isinstance(v, bool)):
        return ["%s: %r is not a number" % (path, v)]
    errs = []
    if t == "object":
        props = s.get("properties", {})
        for r in s.get("required", []):
            if r not in v:
                errs.append("%s: lacks %s" % (path, r))
        for k, x in v.items():
            if k in props:
                errs += validate(x, props[k], root, path + "." + k)
            elif s.get("additionalProperties") is False or (props and "additionalProperties" not in s):
                errs.append("%s: extra key %s" % (path, k))
    if t == "array":
        if len(v) < s.get("minItems", 0) or len(v) > s.get("maxItems", 1 << 30):
            errs.append("%s: %d items" % (path, len(v)))
        for i, x in enumerate(v):
            errs += validate(x, s.get("items", True), root, "%s[%d]" % (path, i))
    if t == "string" and not (s.get("minLength", 0) <= len(v) <= s.get("maxLength", 1 << 30)):
        errs.append("%s: %r has %d characters" % (path, v, len(v)))
    return errs


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "kind": {"enum": ["cat", "dog", "fish", 7, None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                 "minItems": 1, "maxItems": 3},
        "owner": {"type": "object",
                  "properties": {"id": {"type": "integer"}, "vip": {"type": "boolean"},
                                 "home": {"$ref": "#/$defs/place"}},
                  "required": ["id", "vip", "home"], "additionalProperties": False},
        "score": {"type": "number"},
        "note": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
    },
    "required": ["name", "age", "kind", "tags", "owner"],
    "additionalProperties": False,
    "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                         "zip": {"type": "integer"}},
                        "required": ["city"]}},
}
RF_SCHEMA = {"type": "json_schema", "json_schema": {"name": "pet", "strict": True, "schema": SCHEMA}}
RF_OBJECT = {"type": "json_object"}
BIG = 3000


def judge(what, text, finish, schema):
    """A finished choice must be a whole valid document."""
    if finish != "stop":
        check(what + ": finished with stop", False, "finish_reason %s, text %r" % (finish, text))
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        check(what + ": parses", False, "%s: %r" % (e, text))
        return None
    errs = validate(doc, schema, schema) if schema else ([] if isinstance(doc, dict) else ["not an object"])
    if errs:
        check(what + ": validates", False, "%s: %r" % (errs, text))
        return None
    return doc


def completions(rf, schema, label):
    good = 0
    lengths = []
    for seed in range(SEEDS):
        st, body = post("/v1/completions", {"prompt": "Here is the record as JSON:\n", "max_tokens": BIG,
                                            "temperature": 1.0, "top_p": 1.0, "seed": seed,
                                            "response_format": rf})
        if st != 200:
            check("%s seed %d: 200" % (label, seed), False, body)
            continue
        c = json.loads(body)["choices"][0]
        if judge("%s seed %d" % (label, seed), c["text"], c["finish_reason"], schema) is not None:
            good += 1
            lengths.append(len(c["text"]))
    check("%s: %d of %d seeds at temperature 1 parse and validate (lengths %s)" %
          (label, good, SEEDS, sorted(lengths)[:3] + ["..."] + sorted(lengths)[-2:]), good == SEEDS)


completions(RF_OBJECT, None, "completions json_object")
completions(RF_SCHEMA, SCHEMA, "completions json_schema")

# n > 1 and a batch of prompts: every choice has its own document
st, body = post("/v1/completions", {"prompt": ["A pet:", "Another pet:"], "n": 3, "max_tokens": BIG,
                                    "temperature": 1.0, "top_p": 1.0, "seed": 5, "response_format": RF_SCHEMA})
choices = json.loads(body)["choices"] if st == 200 else []
docs = [judge("batch x n choice %d" % c["index"], c["text"], c["finish_reason"], SCHEMA) for c in choices]
check("batch of 2 prompts x n 3: 6 valid documents", st == 200 and len(docs) == 6 and None not in docs, body[:500])
check("the choices differ (each samples its own document)", len(set(json.dumps(d) for d in docs)) > 1, docs)

# streaming: the deltas join into a valid document
req = urllib.request.Request(URL + "/v1/completions", data=json.dumps(
    {"prompt": "JSON:", "max_tokens": BIG, "temperature": 1.0, "top_p": 1.0, "seed": 11, "stream": True,
     "response_format": RF_SCHEMA}).encode(), headers={"Content-Type": "application/json"})
text, finish = "", None
with urllib.request.urlopen(req, timeout=300) as r:
    for line in r.read().decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            ch = json.loads(line[6:])["choices"]
            if ch:
                text += ch[0].get("text") or ""
                finish = ch[0].get("finish_reason") or finish
check("streamed json_schema document is valid", judge("stream", text, finish, SCHEMA) is not None, text)

# chat: the reply's content is the document (and may hold blank lines: no "\n\n" stop)
for seed in range(4):
    st, body = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Describe a pet."}],
                                             "max_tokens": BIG, "temperature": 1.0, "top_p": 1.0, "seed": seed,
                                             "response_format": RF_SCHEMA})
    m = json.loads(body)["choices"][0] if st == 200 else None
    check("chat json_schema seed %d is valid" % seed,
          m is not None and judge("chat", m["message"]["content"], m["finish_reason"], SCHEMA) is not None, body[:500])
st, body = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": BIG,
                                         "temperature": 1.0, "seed": 3, "response_format": RF_OBJECT})
m = json.loads(body)["choices"][0] if st == 200 else None
check("chat json_object is a valid object",
      m is not None and judge("chat object", m["message"]["content"], m["finish_reason"], None) is not None, body[:500])

# max_tokens cuts a document: finish_reason "length", the text a prefix that does not parse
st, body = post("/v1/completions", {"prompt": "JSON:", "max_tokens": 6, "temperature": 1.0, "seed": 1,
                                    "response_format": RF_SCHEMA})
c = json.loads(body)["choices"][0] if st == 200 else {}
cut = c.get("text", "")
parses = True
try:
    json.loads(cut)
except ValueError:
    parses = False
check("max_tokens 6: finish_reason length and a cut document", st == 200 and c.get("finish_reason") == "length"
      and cut.lstrip().startswith("{") and not parses, body)

# a schema keyword the server cannot follow: 400 naming it
bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "email"}}}
st, body = post("/v1/completions", {"prompt": "x", "response_format": bad})
check("unsupported keyword: 400 naming it", st == 400 and "\"format\"" in json.loads(body)["error"]["message"], body)
st, body = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                         "response_format": {"type": "yaml"}})
check("unknown response_format type: 400", st == 400 and "yaml" in body, body)

print("%d check(s) failed" % failed if failed else "all checks passed")
sys.exit(1 if failed else 0)
