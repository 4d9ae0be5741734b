#!/usr/bin/env python3
"""End-to-end test of `cachette batch` (stdlib only).

Runs the built binary on a small OpenAI Batch file: three groups of requests sharing a system
prompt (chat and completions), a singleton, a body with "stream": true, and bad lines (invalid
JSON, a wrong url and method, no custom_id, a repeated custom_id, an unknown model, a bad
field, a request the scheduler rejects for the KV pool), with greedy sampling and a KV pool
that holds only a few groups at once. Checks: one output line per request line, in order; the
errors name the problem and the line; the results under --order batchllm equal those under
--order fcfs (greedy decoding with exact prefix reuse is exact); cached_tokens shows each
group's prefix was reused under batchllm; no temporary file is left; a missing input fails.

Usage: batch_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

FAILURES = []

# Common words, one token each for the bundled model's tokenizer.
WORDS = ("the of and to in is was for that on as with by he at from his it an were are which "
         "this be or has had first one their its new after but who not they have her she two "
         "been other when there all also into during time more school only years may would over "
         "most can some people many where city about world three made such these later up team "
         "before used between state known out part game under then than both season film "
         "called while them since year house water small large number group system music river "
         "church family began war town history").split()
SYSTEM_WORDS = 120


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_lines():
    """Returns (file lines, {custom_id: group or None} of the good requests,
    {line number: (error code, word its message names)} of the bad ones)."""
    rng = random.Random(16)
    good, groups = [], {}
    for g in range(3):
        system = words(rng, SYSTEM_WORDS)
        for q in range(3 if g < 2 else 4):
            cid = "g%d-q%d" % (g, q)
            body = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
            if g == 1:  # one group through /v1/completions
                url = "/v1/completions"
                body["prompt"] = system + "\n\n" + words(rng, 8)
            else:
                url = "/v1/chat/completions"
                body["messages"] = [{"role": "system", "content": system},
                                    {"role": "user", "content": words(rng, 8)}]
            if cid == "g0-q1":
                body["stream"] = True  # ignored: results are whole
            good.append({"custom_id": cid, "method": "POST", "url": url, "body": body})
            groups[cid] = g
    good.append({"custom_id": "alone", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"messages": [{"role": "user", "content": "a short question"}],
                          "max_tokens": 12, "temperature": 0}})
    groups["alone"] = None
    rng.shuffle(good)
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hello"}]
    bad = [
        ("invalid_json_line", None, '{"custom_id": "broken", "method": '),
        ("invalid_url", "/v1/embeddings",
         json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings",
                     "body": {"input": "x"}})),
        ("invalid_method", "method",
         json.dumps({"custom_id": "bad-method", "method": "GET", "url": chat,
                     "body": {"messages": msgs}})),
        ("missing_custom_id", "custom_id",
         json.dumps({"method": "POST", "url": chat, "body": {"messages": msgs}})),
        ("duplicate_custom_id", "g0-q0",
         json.dumps({"custom_id": "g0-q0", "method": "POST", "url": chat,
                     "body": {"messages": msgs}})),
        ("model_not_found", "no-such-model",
         json.dumps({"custom_id": "bad-model", "method": "POST", "url": chat,
                     "body": {"model": "no-such-model", "messages": msgs}})),
        ("InvalidArgument", "temperature",
         json.dumps({"custom_id": "bad-field", "method": "POST", "url": chat,
                     "body": {"messages": msgs, "temperature": 5}})),
        # Fits the context (2048) but not the 2 MiB pool: the scheduler refuses it.
        ("InvalidArgument", "pages",
         json.dumps({"custom_id": "too-big", "method": "POST", "url": chat,
                     "body": {"messages": msgs, "max_tokens": 1900, "temperature": 0}})),
    ]
    entries = [(json.dumps(x), None) for x in good]
    for k, (code, word, text) in enumerate(bad):
        entries.insert(2 + 3 * k, (text, (code, word)))  # spread between the good lines
    entries.insert(5, ("", None))  # a blank line is not a request, but it counts in numbers
    lines = [text for text, _ in entries]
    expect = {n: e for n, (_, e) in enumerate(entries, start=1) if e is not None}
    return lines, groups, expect


def run(binary, model, path, out, order):
    cmd = [binary, "batch", "-m", model, "-i", path, "-o", out, "--order", order, "--json",
           "--threads", "2", "--kv-budget", "2MiB"]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print("%-9s %.2f s" % (order, time.time() - t), flush=True)
    if not check(p.returncode == 0, "%s exited %d:\n%s" % (order, p.returncode, p.stderr[-3000:])):
        return None, []
    summary = json.loads(p.stdout)
    with open(out) as f:
        results = [json.loads(l) for l in f]
    return summary, results


def content(r):
    choice = r["response"]["body"]["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    t0 = time.time()
    lines, groups, expect = make_lines()
    requests = [(n, t) for n, t in enumerate(lines, start=1) if t.strip()]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "requests.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        outs = {}
        for order in ("batchllm", "fcfs"):
            summary, results = run(a.binary, a.model, path, os.path.join(d, order + ".jsonl"),
                                   order)
            if summary is None:
                continue
            outs[order] = results
            check(summary["lines"] == len(requests), "%s: summary lines %d, want %d" %
                  (order, summary["lines"], len(requests)))
            check(summary["failed"] == len(expect), "%s: %d failed, want %d" %
                  (order, summary["failed"], len(expect)))
            check(summary["ok"] == len(groups), "%s: %d ok, want %d" %
                  (order, summary["ok"], len(groups)))
            check(len(results) == len(requests), "%s: %d output lines for %d requests" %
                  (order, len(results), len(requests)))
            check(summary["peak_window_pages"] <= summary["window_pages"],
                  "%s: the window held %d pages, more than its %d" %
                  (order, summary["peak_window_pages"], summary["window_pages"]))
            for (n, text), r in zip(requests, results):
                check(r["id"] == "batch_req_%d" % n, "%s: line %d has id %s" % (order, n, r["id"]))
                try:
                    cid = json.loads(text).get("custom_id")
                except ValueError:
                    cid = None
                if n in expect and expect[n][0] == "missing_custom_id":
                    cid = None
                check(r["custom_id"] == cid, "%s: line %d has custom_id %r, want %r" %
                      (order, n, r["custom_id"], cid))
                if n in expect:
                    code, word = expect[n]
                    err = r["error"] or {}
                    check(r["response"] is None and err.get("code") == code,
                          "%s: line %d: want error %s, got %r" % (order, n, code, r))
                    msg = err.get("message", "")
                    check(msg.startswith("line %d: " % n) and (word is None or word in msg),
                          "%s: line %d: message %r should name the line and %r" %
                          (order, n, msg, word))
                    continue
                resp = r["response"] or {}
                body = resp.get("body", {})
                check(r["error"] is None and resp.get("status_code") == 200 and
                      body.get("object") in ("chat.completion", "text_completion"),
                      "%s: line %d: want a result, got %r" % (order, n, r))
            leftovers = [x for x in os.listdir(d) if ".tmp-" in x]
            check(not leftovers, "%s left temporary files %s" % (order, leftovers))

        if "batchllm" in outs and "fcfs" in outs:
            for r1, r2 in zip(outs["batchllm"], outs["fcfs"]):
                if r1["response"] is None:
                    continue
                check(r2["response"] is not None and content(r1) == content(r2),
                      "%s: batchllm and fcfs differ: %r vs %r" %
                      (r1["custom_id"], content(r1), r2["response"] and content(r2)))
            for r in outs["batchllm"]:
                if r["response"] is None or groups.get(r["custom_id"]) is None:
                    continue
                usage = r["response"]["body"]["usage"]
                cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
                # Every member reuses its group's prefix: at least the system prompt's words.
                check(cached >= SYSTEM_WORDS,
                      "%s: %d cached tokens under batchllm, want >= %d (usage %r)" %
                      (r["custom_id"], cached, SYSTEM_WORDS, usage))

        # A missing input file is an error that names it; nothing is written.
        missing = os.path.join(d, "nope.jsonl")
        p = subprocess.run([a.binary, "batch", "-m", a.model, "-i", missing, "-o",
                            os.path.join(d, "x.jsonl")], capture_output=True, text=True,
                           timeout=60)
        check(p.returncode != 0 and "nope.jsonl" in p.stderr,
              "a missing input: exit %d, stderr %r" % (p.returncode, p.stderr))
        check(not os.path.exists(os.path.join(d, "x.jsonl")), "a failed batch wrote its output")
    print("%d failures in %.1f s" % (len(FAILURES), time.time() - t0))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
