#!/usr/bin/env python3
"""Multi-round QA workload against any OpenAI-compatible server (stdlib only).

N users share one system prompt; each has a private, growing history (its questions and the
server's answers). Requests arrive as a Poisson process at --qps; each arrival sends the next
round of a user whose previous round has finished. Streams every response and reports TTFT
p50/p99, inter-token latency, throughput and the prompt-cache hit rate (from
usage.prompt_tokens_details.cached_tokens), one line per run.

  multi_round_qa.py --url http://127.0.0.1:8080 --users 8 --rounds 4 --qps 2 [--json]
"""
import argparse
import http.client
import json
import random
import threading
import time
import urllib.parse

WORDS = ("system kernel memory page cache driver module device process thread signal file "
         "socket buffer queue lock timer clock power network packet route table index tree "
         "value key record chunk tier disk store restore policy budget pin session token").split()


def text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def pct(v, p):
    if not v:
        return 0.0
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def one_round(url, model, messages, max_tokens):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.time()
    c.request("POST", "/v1/chat/completions", body=json.dumps(body),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError("HTTP %d: %s" % (r.status, r.read()[:200]))
    first, last, gaps, answer, usage = None, None, [], "", {}
    while True:
        line = r.fp.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        ev = json.loads(payload)
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices", []):
            piece = ch.get("delta", {}).get("content")
            if piece is None:
                continue
            now = time.time()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
            answer += piece
    c.close()
    return {"ttft": (first or time.time()) - t0, "gaps": gaps, "answer": answer,
            "usage": usage, "end": time.time()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--qps", type=float, default=2.0)
    ap.add_argument("--system-words", type=int, default=600)
    ap.add_argument("--question-words", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    model = a.model
    if not model:
        u = urllib.parse.urlparse(a.url)
        c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
        c.request("GET", "/v1/models")
        model = json.loads(c.getresponse().read())["data"][0]["id"]
        c.close()
    system = "You answer questions about systems. " + text(rng, a.system_words)
    histories = [[{"role": "system", "content": system}] for _ in range(a.users)]
    rounds_left = [a.rounds] * a.users
    busy = [False] * a.users
    lock = threading.Lock()
    results, errors, threads = [], [], []

    def run(user, messages):
        try:
            res = one_round(a.url, model, messages, a.max_tokens)
            with lock:
                results.append(res)
                histories[user] = messages + [{"role": "assistant", "content": res["answer"]}]
        except Exception as e:  # counted, not fatal: the run goes on
            with lock:
                errors.append(repr(e))
        finally:
            with lock:
                busy[user] = False

    start = time.time()
    total = a.users * a.rounds
    sent = 0
    while sent < total:
        time.sleep(rng.expovariate(a.qps))
        with lock:
            ready = [u for u in range(a.users) if not busy[u] and rounds_left[u] > 0]
            if not ready:
                continue
            user = rng.choice(ready)
            busy[user] = True
            rounds_left[user] -= 1
            messages = histories[user] + [{"role": "user",
                                           "content": text(rng, a.question_words)}]
        t = threading.Thread(target=run, args=(user, messages))
        t.start()
        threads.append(t)
        sent += 1
    for t in threads:
        t.join()
    wall = time.time() - start
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    prompt = sum(r["usage"].get("prompt_tokens", 0) for r in results)
    cached = sum(r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
                 for r in results)
    gen = sum(r["usage"].get("completion_tokens", 0) for r in results)
    out = {"label": a.label, "users": a.users, "rounds": a.rounds, "qps": a.qps,
           "requests": len(results), "errors": len(errors),
           "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
           "itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3,
           "prompt_tokens": prompt, "cached_tokens": cached,
           "hit_rate": cached / prompt if prompt else 0.0,
           "gen_tok_s": gen / wall, "prompt_tok_s": prompt / wall, "wall_s": wall}
    if a.json:
        print(json.dumps(out))
    else:
        print("%-10s users=%d rounds=%d qps=%.1f req=%d err=%d | TTFT p50 %.1f ms p99 %.1f ms | "
              "ITL p50 %.2f ms p99 %.2f ms | hit %.1f%% | %.0f gen tok/s, %.0f prompt tok/s"
              % (a.label, a.users, a.rounds, a.qps, len(results), len(errors),
                 out["ttft_p50_ms"], out["ttft_p99_ms"], out["itl_p50_ms"], out["itl_p99_ms"],
                 100 * out["hit_rate"], out["gen_tok_s"], out["prompt_tok_s"]))
    if errors:
        print("first error: " + errors[0])
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
