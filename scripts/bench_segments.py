#!/usr/bin/env python3
"""Segments from the tiers (issue 11, docs/benchmarks.md "Segments from disk"), one run on loopback.

A RAG prompt of --docs documents of about --doc-words words each, then a question, is sent as
`segments` with kv_reuse blend, max_tokens 1 (so latency is time to first token), in these
situations, each measured --reps times on the same prompt:
  full       kv_reuse prefix in a fresh tenant of a server without tiers: full prefill (baseline)
  computed   blend, every document missing: the request computes each one on its own first
  ram        blend, documents in the segment cache (precomputed)
  disk-whole blend, a server restarted on the disk tier that filed them: read back from disk
             (one restart per repetition, so the segment cache is empty every time; a full
             prefill of the same prompt in another tenant first, so the server is warm), the
             whole load before the prefill (--no-segment-pipeline)
  disk       the same, pipelined (the default): the prefill computes each layer while the
             next band of layers loads (CacheBlend's pipeline)
  disk+ctl   pipelined with CacheBlend's loading controller (--blend-controller): blend
             recomputes above its ratio as much as hides under the load
  redis-*    the same three from a Redis tier (--redis URL), the disk tier off
It prints the median of each, its ratio to full prefill, and the recomputed tokens.

Usage: scripts/bench_segments.py [--binary build/release/src/cli/cachette]
       [--model models/cachette-tiny-q8_0.gguf] [--docs 8] [--doc-words 150] [--reps 3]
       [--redis redis://127.0.0.1:6390]
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from e2e_util import Server, graceful_stop  # noqa: E402

WORDS = ("river city stone harbour lamp winter market bridge tower forest garden road field "
         "north island boat school letter mountain valley king queen bread salt iron copper "
         "wheel clock bell window door table summer morning evening light").split()


def documents(n, words, seed=7):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        docs.append("Document %d. %s.\n\n" % (i + 1, body.capitalize()))
    return docs


def timed(server, segments, mode, salt):
    body = {"segments": segments, "kv_reuse": mode, "cache_salt": salt, "max_tokens": 1,
            "temperature": 0}
    t0 = time.perf_counter()
    st, r = server.post("/v1/completions", body)
    ms = (time.perf_counter() - t0) * 1000
    if st != 200:
        raise RuntimeError("request failed: %s %s" % (st, r))
    return ms, r["usage"]


def warm_up(server, segments):
    """A full prefill of the same prompt in another tenant, so the timed request finds the
    weights paged in and the KV pages and scratch buffers touched (a fresh server's first long
    prefill is slower by about the time the tiers take here); then a pause for its write-behind."""
    st, r = server.post("/v1/completions", {"prompt": "".join(segments), "max_tokens": 1,
                                            "cache_salt": "warm-up", "temperature": 0})
    if st != 200:
        raise RuntimeError("warm-up failed: %s %s" % (st, r))
    time.sleep(0.5)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=os.path.join(ROOT, "build/release/src/cli/cachette"))
    p.add_argument("--model", default=os.path.join(ROOT, "models/cachette-tiny-q8_0.gguf"))
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--doc-words", type=int, default=150)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-tokens", default="256")
    p.add_argument("--redis", default="", help="a Redis URL: also measure loads from Redis")
    a = p.parse_args()
    docs = documents(a.docs, a.doc_words)
    segments = docs + ["Question: which document names the copper bell first? Answer:"]
    kinds = ("whole", "", "ctl")
    flags = {"whole": ("--no-segment-pipeline",), "": (), "ctl": ("--blend-controller",)}
    tiers_of = {"disk": ("disk",)}
    if a.redis:
        tiers_of["redis"] = ("redis",)
    rows = ["full", "computed", "ram"] + ["%s%s" % (t, ("-" + k if k == "whole" else
                                                         "+" + k if k else ""))
                                          for t in tiers_of for k in kinds]
    results = {k: [] for k in rows}
    recomputed = {k: [] for k in rows}
    prompt_tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        plain = Server(a.binary, a.model, "--segment-cache-mb", "1024")
        try:
            for i in range(a.reps):
                ms, u = timed(plain, segments, "prefix", "full-%d" % i)
                results["full"].append(ms)
                prompt_tokens = u["prompt_tokens"]
                ms, _ = timed(plain, segments, "blend", "computed-%d" % i)
                results["computed"].append(ms)
        finally:
            plain.close()
        for tier in tiers_of:
            where = os.path.join(tmp, tier)
            if tier == "disk":
                tiers = ("--disk-dir", where)
            else:
                tiers = ("--redis", a.redis)
            tiers += ("--chunk-tokens", a.chunk_tokens, "--segment-cache-mb", "1024")
            salt = "T-%d" % os.getpid()
            s = Server(a.binary, a.model, *tiers)
            st, pre = s.post("/v1/cache/segments", {"segments": segments, "cache_salt": salt})
            if st != 200:
                raise RuntimeError("precompute failed: %s %s" % (st, pre))
            if tier == "disk":
                for _ in range(a.reps):
                    ms, u = timed(s, segments, "blend", salt)
                    results["ram"].append(ms)
                    recomputed["ram"].append(u.get("cachette", {}).get("recomputed_tokens", 0))
            graceful_stop(s)
            for _ in range(a.reps):
                for k in kinds:
                    row = "%s%s" % (tier, "-" + k if k == "whole" else "+" + k if k else "")
                    s = Server(a.binary, a.model, *tiers, *flags[k])
                    warm_up(s, segments)
                    ms, u = timed(s, segments, "blend", salt)
                    results[row].append(ms)
                    recomputed[row].append(u.get("cachette", {}).get("recomputed_tokens", 0))
                    st, stats = s.get("/v1/cache/stats")
                    seg = stats.get("segments", {})
                    if seg.get("tier_hits", 0) < len(segments):
                        raise RuntimeError("expected every segment from %s, got %s" % (tier, seg))
                    graceful_stop(s)
    base = statistics.median(results["full"])
    print("%d documents of ~%d words, %d prompt tokens, %s, %d reps (median ms, ratio to full)" %
          (a.docs, a.doc_words, prompt_tokens, os.path.basename(a.model), a.reps))
    for k, v in results.items():
        m = statistics.median(v)
        r = recomputed[k]
        print("  %-12s %9.1f ms  %6.3fx  recomputed %s" %
              (k, m, m / base, int(statistics.median(r)) if r else "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
