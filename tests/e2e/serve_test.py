#!/usr/bin/env python3
"""End-to-end test of `cachette serve` over real HTTP (stdlib only).

Starts the built binary on a free loopback port with the bundled model and checks: streaming and
non-streaming chat, concurrent clients, exact cached_tokens on repeated and extended prompts,
tenant isolation, bad input (each a 4xx while the server keeps serving), a client leaving
mid-stream frees its sequence, the admin API, 429 on a full queue, and a clean SIGTERM drain.

Usage: serve_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from e2e_util import FAILURES, Server, check, free_port, report  # noqa: F401 (re-exported)


def chat_body(text, **kw):
    b = {"model": "cachette-tiny-q8_0", "messages": [{"role": "user", "content": text}],
         "max_tokens": 16, "temperature": 0}
    b.update(kw)
    return b


def test_chat(s):
    status, r = s.post("/v1/chat/completions", chat_body("What is a cat?"))
    check(status == 200, "non-streaming chat: status %s %s" % (status, r))
    msg = r["choices"][0]["message"]
    check(msg["role"] == "assistant" and isinstance(msg["content"], str), "chat message shape")
    u = r["usage"]
    check(u["completion_tokens"] >= 1 and u["prompt_tokens"] > 0, "chat usage counts")
    check("cached_tokens" in u["prompt_tokens_details"], "usage.prompt_tokens_details")
    check("memory" in u["cachette"]["cached_tokens_by_tier"], "usage.cachette per tier")
    check(r["choices"][0]["finish_reason"] in ("stop", "length"), "finish_reason")

    status, events, done = s.stream("/v1/chat/completions", chat_body(
        "What is a dog?", stream=True, stream_options={"include_usage": True}))
    check(status == 200 and done, "streaming chat ends with data: [DONE]")
    deltas = [e for e in events if e.get("choices")]
    check(deltas and deltas[0]["choices"][0]["delta"].get("role") == "assistant",
          "first chunk carries the role")
    check(deltas[-1]["choices"][0]["finish_reason"] in ("stop", "length"),
          "last chunk carries finish_reason")
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in deltas)
    usage = [e for e in events if e.get("usage")]
    check(len(usage) == 1 and usage[0]["choices"] == [], "include_usage chunk")
    n_content = sum(1 for e in deltas if "content" in e["choices"][0]["delta"])
    check(usage and usage[0]["usage"]["completion_tokens"] == n_content,
          "one content chunk per generated token")
    check(isinstance(text, str), "streamed text")

    status, r = s.get("/v1/models")
    check(status == 200 and r["data"][0]["id"] == "cachette-tiny-q8_0", "/v1/models")


def test_concurrent(s):
    results = [None] * 8

    def client(i):
        body = chat_body("Tell me about topic number %d." % i, max_tokens=12)
        if i % 2:
            body["stream"] = True
            status, events, done = s.stream("/v1/chat/completions", body)
            results[i] = status == 200 and done
        else:
            status, r = s.post("/v1/chat/completions", body)
            results[i] = status == 200 and r["usage"]["completion_tokens"] >= 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(all(results), "8 concurrent clients all served: %s" % results)


DOC = ("The kernel documentation describes how to configure the build of modules for a system "
       "with many devices and drivers, how to read the logs when something fails, and where "
       "to look for the options that control memory, scheduling and power.\n")


def completion(s, prompt, salt, max_tokens=1):
    status, r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                           "temperature": 0, "cache_salt": salt})
    check(status == 200, "completion status %s %s" % (status, r))
    return r["usage"]


def test_cached_tokens(s):
    salt = "e2e-cache-%d" % os.getpid()
    u1 = completion(s, DOC, salt)  # one token: nothing generated is fed back into the KV
    p = u1["prompt_tokens"]
    check(u1["prompt_tokens_details"]["cached_tokens"] == 0, "cold prompt: 0 cached")
    u2 = completion(s, DOC, salt)
    check(u2["prompt_tokens_details"]["cached_tokens"] == p - 1,
          "repeated prompt: cached %d, want %d (all but the recomputed last token)"
          % (u2["prompt_tokens_details"]["cached_tokens"], p - 1))
    check(u2["cachette"]["cached_tokens_by_tier"]["memory"] == p - 1, "per-tier memory count")
    extended = DOC + "More text follows here about the scheduler."
    status, look = s.post("/v1/cache/lookup", {"prompt": extended, "cache_salt": salt})
    check(status == 200 and look["cached_tokens"] == p and look["tiers"]["memory"] == p,
          "lookup of the extended prompt: %s, want %d" % (look, p))
    u3 = completion(s, extended, salt, max_tokens=4)
    check(u3["prompt_tokens_details"]["cached_tokens"] == p,
          "extended prompt: cached %d, want %d" % (u3["prompt_tokens_details"]["cached_tokens"], p))
    check(u3["prompt_tokens"] > p, "extended prompt is longer")


def test_tenants(s):
    prompt = "Tenant secret: the launch code is in the blue folder on the third shelf.\n"
    a = "tenant-a-%d" % os.getpid()
    b = "tenant-b-%d" % os.getpid()
    completion(s, prompt, a)
    ua = completion(s, prompt, a)
    check(ua["prompt_tokens_details"]["cached_tokens"] == ua["prompt_tokens"] - 1,
          "tenant A hits its own prompt")
    ub = completion(s, prompt, b)
    check(ub["prompt_tokens_details"]["cached_tokens"] == 0,
          "tenant B never hits tenant A's prompt (cached %d)"
          % ub["prompt_tokens_details"]["cached_tokens"])


def test_bad_inputs(s):
    long_prompt = "word " * 2500
    cases = [
        ("malformed JSON", "/v1/chat/completions", None, b'{"messages": [', 400),
        ("wrong type", "/v1/chat/completions", chat_body("x", max_tokens="5"), None, 400),
        ("messages not an array", "/v1/chat/completions", {"messages": "hi"}, None, 400),
        ("unknown model", "/v1/chat/completions", chat_body("x", model="gpt-17"), None, 404),
        ("prompt longer than the context", "/v1/completions",
         {"prompt": long_prompt, "max_tokens": 1}, None, 400),
        ("max_tokens too large", "/v1/completions", {"prompt": "hi", "max_tokens": 100000},
         None, 400),
        ("invalid UTF-8", "/v1/completions", None, b'{"prompt": "\xff\xfe bad", "max_tokens": 2}',
         400),
        ("token id out of range", "/v1/completions", {"prompt": [1, 10 ** 7]}, None, 400),
        ("unknown role", "/v1/chat/completions",
         {"messages": [{"role": "wizard", "content": "x"}]}, None, 400),
    ]
    for name, path, body, raw, want in cases:
        status, r = s.post(path, body=body, raw=raw)
        ok = status == want and isinstance(r, dict) and "message" in r.get("error", {})
        check(ok, "%s: got %s %s, want %d with an error object" % (name, status, r, want))
        check(s.healthy(), "server still healthy after %s" % name)
    status, r = s.post("/v1/completions", {"prompt": "still serving", "max_tokens": 2})
    check(status == 200, "serves after bad input")


def test_kv_policy(s):
    """KV budget policies per request: kept size reported, errors name the field, StreamingLLM
    reads and generates past the context, and the prompt's exact KV stays reusable."""
    salt = "e2e-policy-%d" % os.getpid()
    body = {"prompt": DOC * 4, "max_tokens": 6, "temperature": 0, "cache_salt": salt,
            "kv_policy": {"name": "snapkv", "budget": 0.25}}
    status, r = s.post("/v1/completions", body)
    check(status == 200, "snapkv request: %s %s" % (status, r))
    if status == 200:
        p = r["usage"]["prompt_tokens"]
        kept = r["usage"]["cachette"].get("kv_tokens_kept")
        check(kept is not None and kept <= (p + 3) // 4 + 16,
              "snapkv@0.25 keeps about a quarter of %d tokens: kv_tokens_kept %s" % (p, kept))
        # The prompt entered the prefix cache before eviction: a full-KV request hits it.
        status, r2 = s.post("/v1/completions", dict(body, kv_policy=None, max_tokens=1))
        cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"] if status == 200 else -1
        check(cached >= p - 48, "full-KV request after a policy one: cached %d of %d" % (cached, p))
        check("kv_tokens_kept" not in r2["usage"]["cachette"], "no kv_tokens_kept without policy")
    status, r = s.post("/v1/chat/completions", chat_body("hi", kv_policy="streamingllm"))
    check(status == 200 and "kv_tokens_kept" in r["usage"]["cachette"],
          "a policy named by a string: %s %s" % (status, r))
    long_prompt = "word " * 2500  # past the model's 2048-token context
    status, r = s.post("/v1/completions", {"prompt": long_prompt, "max_tokens": 4,
                                           "kv_policy": {"name": "streamingllm", "budget": 512}})
    check(status == 200 and r["usage"]["prompt_tokens"] > 2048 and
          r["usage"]["cachette"]["kv_tokens_kept"] <= 512 + 16,
          "streamingllm past the context: %s %s" % (status, str(r)[:300]))
    for name, pol, want in [
            ("unknown policy", {"name": "snapk"}, "kv_policy.name"),
            ("zero budget", {"name": "h2o", "budget": 0}, "kv_policy.budget"),
            ("budget not a number", {"name": "h2o", "budget": "x"}, "kv_policy.budget"),
            ("unknown field", {"name": "h2o", "window": 3}, "unknown field"),
            ("cascade not a boolean", {"name": "cake", "cascade": "yes"}, "kv_policy.cascade"),
            ("not an object", 7, "kv_policy"),
            ("positions kept past the context", {"name": "snapkv"}, "context")]:
        prompt = long_prompt if name.startswith("positions") else "hi"
        status, r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 2,
                                               "kv_policy": pol})
        msg = r.get("error", {}).get("message", "") if isinstance(r, dict) else ""
        check(status == 400 and want in msg, "%s: got %s %s, want 400 naming %s"
              % (name, status, r, want))


def stats(s):
    status, r = s.get("/v1/cache/stats")
    check(status == 200, "/v1/cache/stats")
    return r


def test_disconnect(s):
    c = s.conn()
    c.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True,
         "temperature": 0, "stream": True}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    got = 0
    while got < 3:
        line = r.fp.readline()
        if line.startswith(b"data: "):
            got += 1
    during = stats(s)
    check(during["scheduler"]["running"] >= 1 and during["kv"]["pages_active"] >= 1,
          "a streaming sequence holds pages: %s" % during["kv"])
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.time() + 10
    after = during
    while time.time() < deadline:
        after = stats(s)
        if after["scheduler"]["running"] == 0 and after["kv"]["pages_active"] == 0:
            break
        time.sleep(0.05)
    check(after["scheduler"]["running"] == 0 and after["kv"]["pages_active"] == 0,
          "disconnect frees the sequence: %s %s" % (after["scheduler"], after["kv"]))
    check(after["scheduler"]["cancelled"] >= 1, "the request counts as cancelled")
    status, m = s.get("/metrics")
    check('cachette_kv_pages{state="active"} 0' in m, "metrics: no active pages")
    check("cachette_requests_cancelled_total" in m, "metrics: cancelled counter")


def test_admin_and_sessions(s):
    salt = "admin-%d" % os.getpid()
    status, r = s.post("/v1/cache/pin", {"prompt": DOC, "cache_salt": salt, "ttl_s": 60})
    check(status == 200 and r["pin_id"] > 0 and r["pinned_tokens"] == r["prompt_tokens"],
          "pin prefills and pins the whole prompt: %s" % r)
    pin_id = r.get("pin_id", 0)
    check(stats(s)["kv"]["pages_pinned"] > 0, "pinned pages show in stats")
    status, _ = s.post("/v1/cache/unpin", {"pin_id": pin_id})
    check(status == 200, "unpin")
    status, _ = s.post("/v1/cache/unpin", {"pin_id": pin_id})
    check(status == 404, "unpin twice is 404")
    body = chat_body("Remember the number 42.", session_id="sess-%d" % os.getpid(),
                     cache_salt=salt, max_tokens=4)
    status, r = s.post("/v1/chat/completions", body)
    check(status == 200, "chat with session_id")
    check(stats(s)["sessions"] >= 1, "the session is pinned")
    status, r = s.post("/v1/chat/completions", chat_body(
        "x", cache_control={"type": "ephemeral", "ttl": "5m"}, cache_salt=salt, max_tokens=2))
    check(status == 200 and r["usage"]["cachette"].get("pin_id", 0) > 0, "cache_control pins")
    status, r = s.post("/v1/cache/clear", {"cache_salt": salt})
    check(status == 200, "clear a tenant")
    status, look = s.post("/v1/cache/lookup", {"prompt": DOC, "cache_salt": salt})
    check(status == 200 and look["cached_tokens"] == 0, "cleared tenant has nothing cached")


def test_queue_full(binary, model):
    s = Server(binary, model, "--max-running", "1", "--max-queue", "1")
    try:
        codes = []
        lock = threading.Lock()

        def client():
            st, _ = s.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 64,
                                               "ignore_eos": True})
            with lock:
                codes.append(st)

        threads = [threading.Thread(target=client) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        check(429 in codes and 200 in codes, "a full queue answers 429: %s" % codes)
        check(s.healthy(), "healthy after 429s")
    finally:
        s.stop()


def test_sigterm(s):
    # A long stream is in flight when SIGTERM arrives: it must finish, then the process exits 0.
    c = s.conn()
    c.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "The history of the", "max_tokens": 600, "stream": True, "ignore_eos": True,
         "temperature": 0}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first = r.fp.readline()
    while first and not first.startswith(b"data: "):  # chunk-size lines of the raw body
        first = r.fp.readline()
    check(first.startswith(b"data: "), "stream started before SIGTERM")
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    try:
        status, _ = s.post("/v1/completions", {"prompt": "late", "max_tokens": 1})
        check(status == 503, "a request during the drain gets 503 (got %s)" % status)
    except OSError:
        pass  # the listener may already be closed
    done, chunks = False, 1
    while True:
        line = r.fp.readline()
        if not line:
            break
        if line.startswith(b"data: [DONE]"):
            done = True
            break
        chunks += line.startswith(b"data: ")
    c.close()
    check(done and chunks > 100, "the in-flight request finished during the drain (%d chunks)"
          % chunks)
    try:
        rc = s.proc.wait(20)
    except subprocess.TimeoutExpired:
        rc = None
    check(rc == 0, "SIGTERM exits cleanly (rc %s)" % rc)
    logs = s.logs()
    check("draining" in logs and "stopped:" in logs, "drain is logged")
    check("request cmpl-" in logs and "ttft=" in logs and "tok/s" in logs,
          "one log line per request")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    t0 = time.time()
    s = Server(a.binary, a.model, "--kv-budget", "64MiB", "--max-running", "8")
    try:
        for test in (test_chat, test_concurrent, test_cached_tokens, test_tenants,
                     test_bad_inputs, test_kv_policy, test_disconnect, test_admin_and_sessions):
            t = time.time()
            try:
                test(s)
            except Exception as e:  # a crash in one check must not hide the others
                check(False, "%s raised %r" % (test.__name__, e))
            print("%-26s %.2f s" % (test.__name__, time.time() - t), flush=True)
        test_queue_full(a.binary, a.model)
        test_sigterm(s)
    finally:
        s.close()
    return report(t0)


if __name__ == "__main__":
    sys.exit(main())
