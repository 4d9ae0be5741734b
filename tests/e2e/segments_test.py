#!/usr/bin/env python3
"""End-to-end test of segment reuse (issue 11) through `cachette serve` (stdlib only).

Two documents are precomputed (POST /v1/cache/segments) in tenant A. A completion whose
`segments` are [doc2, doc1, question] then gives, at temperature 0:
  - in `blend` with blend_ratio 1 (every placed token recomputed), the same text as `prefix`
    mode (full prefill; run in another tenant so that it shares nothing);
  - in `naive`, usage reporting the placed segment tokens as reused and none recomputed.
Another cache_salt gets no segment reuse. Chat content parts and --segment-separator make
segments too; /v1/cache/stats and /metrics count them. Every bad input is a 400 naming its
field. APE lays the precomputed documents out in parallel. With --relay, a completion's output
quoted as a segment by a later prompt is placed from the KV its request kept (RelayCaching).
With a disk and a Redis tier, precomputed segments survive a restart (precompute finds them
cached) and another server on the same Redis places them without computing them, answering
exactly as the server that computed them; a tenant's clear removes them from every tier.

Usage: segments_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
"""
import argparse
import os
import sys
import tempfile
import time

from e2e_util import SlowRedisProxy, Server, check, graceful_stop, report, start_redis

DOC1 = ("The lighthouse on the northern cape was built in 1871 from granite quarried on the "
        "island itself. Its lamp burned whale oil until 1904, then kerosene, and it was "
        "electrified in 1951.")
DOC2 = ("The harbour town below the cape lived from herring fishing. Every spring the boats "
        "left before dawn and came back at noon, and the whole town gathered on the quay to "
        "salt the catch.")
QUESTION = " Question: when was the lighthouse electrified? Answer:"
SEP = "\n\n"


def complete(s, segments, mode, salt, **kw):
    body = {"segments": segments, "kv_reuse": mode, "cache_salt": salt, "max_tokens": 12,
            "temperature": 0}
    body.update(kw)
    return s.post("/v1/completions", body)


def reuse(usage):
    ext = usage.get("cachette", {})
    r = ext.get("reused_tokens", {})
    return r.get("prefix"), r.get("segment"), ext.get("recomputed_tokens")


def test_precompute(s):
    st, body = s.post("/v1/cache/segments", {"segments": [DOC1, DOC2], "cache_salt": "A"})
    if not check(st == 200, "precompute: 200, got %s %s" % (st, body)):
        return None
    segs = body["segments"]
    check(len(segs) == 2 and all(x["tokens"] > 10 and not x["cached"] for x in segs),
          "precompute: two segments computed: %s" % body)
    check(body["context_tokens"] >= 1, "precompute: the context holds BOS: %s" % body)
    st, again = s.post("/v1/cache/segments", {"segments": [DOC1], "cache_salt": "A"})
    check(st == 200 and again["segments"][0]["cached"], "precompute again: cached: %s" % again)
    return segs[0]["tokens"], segs[1]["tokens"]


def test_reuse(s, doc1_tokens):
    segments = [DOC2, DOC1, QUESTION]
    st, ref = complete(s, segments, "prefix", "ref")
    if not check(st == 200, "prefix mode: 200, got %s %s" % (st, ref)):
        return
    ref_text = ref["choices"][0]["text"]
    check(reuse(ref["usage"])[1] == 0, "prefix mode reuses no segment: %s" % ref["usage"])

    st, blend = complete(s, segments, "blend", "A", blend_ratio=1)
    if check(st == 200, "blend: 200, got %s %s" % (st, blend)):
        check(blend["choices"][0]["text"] == ref_text,
              "blend with ratio 1 gives full prefill's text: %r vs %r" %
              (blend["choices"][0]["text"], ref_text))
        check(blend["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"],
              "blend: the same prompt tokens as prefix mode: %s vs %s" %
              (blend["usage"], ref["usage"]))
        prefix, seg, recomputed = reuse(blend["usage"])
        check(seg is not None and seg >= doc1_tokens, "blend: doc1 placed: %s" % blend["usage"])
        # The question was not precomputed: this request computed it on its own, then placed
        # it, so it is recomputed too without counting as reused.
        check(recomputed is not None and recomputed >= seg,
              "blend ratio 1 recomputes every placed token: %s" % blend["usage"])

    st, naive = complete(s, segments, "naive", "A")
    if check(st == 200, "naive: 200, got %s %s" % (st, naive)):
        u = naive["usage"]
        prefix, seg, recomputed = reuse(u)
        check(seg is not None and seg >= doc1_tokens, "naive: segment tokens reused: %s" % u)
        check(recomputed == 0, "naive: nothing recomputed: %s" % u)
        check(u["prompt_tokens_details"]["cached_tokens"] == prefix + seg,
              "naive: cached_tokens = prefix + segment: %s" % u)
        check(u["cachette"]["cached_tokens_by_tier"].get("segment", 0) > 0,
              "naive: a 'segment' tier in cached_tokens_by_tier: %s" % u)
        check(len(naive["choices"][0]["text"]) > 0, "naive: some text")

    st, other = complete(s, segments, "naive", "B")
    if check(st == 200, "tenant B: 200, got %s %s" % (st, other)):
        prefix, seg, recomputed = reuse(other["usage"])
        check(seg == 0 and other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0,
              "another cache_salt reuses nothing of tenant A's: %s" % other["usage"])

    st, cachecraft = complete(s, segments, "cachecraft", "A", blend_ratio=0.5)
    check(st == 200 and reuse(cachecraft["usage"])[1] > 0,
          "cachecraft: 200 with segment reuse: %s %s" % (st, cachecraft))


def test_chat_parts(s):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": DOC1},
                                                      {"type": "text", "text": QUESTION}]}],
            "kv_reuse": "naive", "cache_salt": "chat", "max_tokens": 4, "temperature": 0}
    st, first = s.post("/v1/chat/completions", body)
    check(st == 200, "chat parts: 200, got %s %s" % (st, first))
    st, second = s.post("/v1/chat/completions", body)
    if check(st == 200, "chat parts again: 200, got %s %s" % (st, second)):
        check(reuse(second["usage"])[1] > 0, "chat parts: the second request reuses its "
              "segments: %s" % second["usage"])
    body["kv_reuse"] = "prefix"
    st, plain = s.post("/v1/chat/completions", body)
    check(st == 200 and plain["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"],
          "chat parts in prefix mode: the same tokens: %s" % plain)


def test_separator(s):
    before = s.get("/v1/cache/stats")[1]["segments"]["computed_tokens"]
    st, r = s.post("/v1/completions", {"prompt": DOC2 + SEP + DOC1 + SEP + QUESTION,
                                       "kv_reuse": "naive", "cache_salt": "sep",
                                       "max_tokens": 2, "temperature": 0})
    check(st == 200, "separator: 200, got %s %s" % (st, r))
    after = s.get("/v1/cache/stats")[1]["segments"]["computed_tokens"]
    check(after > before, "separator: a string prompt's segments were computed: %d -> %d" %
          (before, after))
    st, r2 = s.post("/v1/completions", {"prompt": DOC2 + SEP + DOC1 + SEP + QUESTION,
                                        "kv_reuse": "naive", "cache_salt": "sep",
                                        "max_tokens": 2, "temperature": 0})
    check(st == 200 and reuse(r2["usage"])[1] > 0,
          "separator: the second request places cached segments: %s" % r2)


def test_stats(s):
    st, stats = s.get("/v1/cache/stats")
    if check(st == 200, "stats: 200"):
        seg = stats.get("segments", {})
        check(seg.get("entries", 0) >= 3 and seg.get("hits", 0) > 0 and seg.get("bytes", 0) > 0,
              "stats: segment cache entries, bytes and hits: %s" % seg)
        check(stats.get("reused_tokens", {}).get("segment", 0) > 0,
              "stats: reused segment tokens: %s" % stats.get("reused_tokens"))
    st, text = s.get("/metrics")
    line = [l for l in text.splitlines()
            if l.startswith('cachette_reused_tokens_total{kind="segment"}')]
    check(line and float(line[0].split()[-1]) > 0, "metrics: reused segment tokens: %s" % line)
    check("cachette_recomputed_tokens_total" in text and "cachette_segment_cache_entries" in text,
          "metrics: recomputed tokens and segment cache families")


def test_errors(s):
    def bad(path, body, field, words=None):
        st, r = s.post(path, body)
        err = r.get("error", {}) if isinstance(r, dict) else {}
        ok = st == 400 and err.get("param") == field
        if words:
            ok = ok and words in err.get("message", "")
        check(ok, "%s %s: 400 naming %s, got %s %s" % (path, body, field, st, r))

    c = "/v1/completions"
    bad(c, {"segments": [DOC1], "prompt": DOC1}, "segments")
    bad(c, {"segments": []}, "segments")
    bad(c, {"segments": "text"}, "segments")
    bad(c, {"segments": [DOC1, 7]}, "segments")
    bad(c, {"segments": [DOC1], "kv_reuse": "bogus"}, "kv_reuse")
    bad(c, {"segments": [DOC1], "kv_reuse": 3}, "kv_reuse")
    bad(c, {"segments": [DOC1], "kv_reuse": "ape"}, "kv_reuse", "document")
    bad(c, {"segments": [DOC1, QUESTION], "kv_reuse": "ape", "ape_scale": 0}, "ape_scale")
    bad(c, {"segments": [DOC1, QUESTION], "kv_reuse": "ape", "ape_temperature": "x"},
        "ape_temperature")
    bad(c, {"segments": [DOC1], "blend_ratio": 1.5}, "blend_ratio")
    bad(c, {"segments": [DOC1], "blend_ratio": -0.1}, "blend_ratio")
    bad(c, {"segments": [DOC1], "blend_ratio": "x"}, "blend_ratio")
    bad("/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        "messages", "content")
    bad("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                 "segments": ["x"]}, "segments")
    p = "/v1/cache/segments"
    bad(p, {}, "segments")
    bad(p, {"segments": []}, "segments")
    bad(p, {"segments": [1]}, "segments")
    bad(p, {"segments": [""]}, "segments")
    bad(p, {"segments": [DOC1], "prefix": 5}, "prefix")
    bad(p, {"segments": [DOC1], "ttl_s": 0}, "ttl_s")
    bad(p, {"segments": [DOC1], "cache_salt": 1}, "cache_salt")


def test_ape(s, counts):
    # APE: the precomputed documents (tenant A, after BOS) laid out in parallel, only the
    # question computed; decoding goes on with APE's attention.
    st, r = complete(s, [DOC2, DOC1, QUESTION], "ape", "A", ape_temperature=0.9, ape_scale=0.9)
    if not check(st == 200, "ape: 200, got %s %s" % (st, r)):
        return
    _, segment, recomputed = reuse(r["usage"])
    check(segment == counts[0] + counts[1] and not recomputed,
          "ape: both documents reused, none recomputed: %s" % r["usage"])
    check(r["usage"]["completion_tokens"] > 0, "ape: generated: %s" % r["usage"])


def test_relay(s):
    # Agent A answers; agent B's prompt quotes A's answer as a segment after other text. With
    # --relay, A's output KV was kept when A finished, so B places it instead of computing it.
    st, a = s.post("/v1/completions", {"prompt": "Write one line about the harbour town:",
                                       "max_tokens": 12, "temperature": 0, "cache_salt": "R"})
    if not check(st == 200, "relay: A answered: %s %s" % (st, a)):
        return
    answer = a["choices"][0]["text"]
    st, b = complete(s, ["Another agent wrote:", answer, " Is that so? Answer:"], "naive", "R")
    if not check(st == 200, "relay: B answered: %s %s" % (st, b)):
        return
    _, segment, recomputed = reuse(b["usage"])
    check(segment is not None and segment >= a["usage"]["completion_tokens"] - 1 and
          recomputed == 0, "relay: B placed A's output (%s tokens): %s" %
          (a["usage"]["completion_tokens"], b["usage"]))
    st, stats = s.get("/v1/cache/stats")
    seg = stats.get("segments", {})
    check(seg.get("relay_saved", 0) >= 1 and seg.get("relay_hits", 0) >= 1,
          "relay: stats count saved outputs and hits: %s" % seg)


def stats_segments(s):
    st, stats = s.get("/v1/cache/stats")
    return stats.get("segments", {}) if st == 200 else {}


def test_segments_in_tiers(binary, model, tmp):
    redis = start_redis(tmp)
    if redis is None:
        return
    disk = os.path.join(tmp, "segments-disk")
    tiers = ("--disk-dir", disk, "--redis", redis.url(), "--chunk-tokens", "32")
    segments = [DOC2, DOC1, QUESTION]
    a = b = c = slow = None
    try:
        a = Server(binary, model, *tiers)
        st, pre = a.post("/v1/cache/segments", {"segments": [DOC1, DOC2], "cache_salt": "T"})
        check(st == 200 and not any(x["cached"] for x in pre["segments"]),
              "tiers: the first server computes both documents: %s %s" % (st, pre))
        st, want = complete(a, segments, "blend", "T")
        if not check(st == 200, "tiers: blend on the first server: %s %s" % (st, want)):
            return
        graceful_stop(a)  # write-behind reaches disk and Redis
        a = None

        b = Server(binary, model, *tiers)  # restarted: its disk tier holds them
        st, again = b.post("/v1/cache/segments", {"segments": [DOC1, DOC2], "cache_salt": "T"})
        check(st == 200 and all(x["cached"] for x in again["segments"]),
              "tiers: after a restart, precompute finds both documents cached: %s" % again)
        seg = stats_segments(b)
        check(seg.get("tier_hits", 0) >= 2 and seg.get("computed_tokens", -1) == 0,
              "tiers: read back from the tiers, not computed: %s" % seg)
        b.stop()
        b = None

        # No disk, and a far Redis: each read of records waits 50 ms, so the later layers are
        # still arriving when the prefill starts, however fast or loaded this machine is (with
        # Redis on loopback the whole load could end first, leaving nothing to overlap with).
        slow = SlowRedisProxy(redis, 0.05)
        c = Server(binary, model, "--redis", slow.url(), "--chunk-tokens", "32",
                   "--load-deadline-ms", "30000")
        st, got = complete(c, segments, "blend", "T")
        if check(st == 200, "tiers: blend on another server: %s %s" % (st, got)):
            check(got["choices"][0]["text"] == want["choices"][0]["text"],
                  "tiers: segments from Redis answer as where they were computed: %r vs %r" %
                  (got["choices"][0]["text"], want["choices"][0]["text"]))
            _, placed, _ = reuse(got["usage"])
            check(placed is not None and placed >= pre["segments"][0]["tokens"],
                  "tiers: the documents were placed, not computed: %s" % got["usage"])
        seg = stats_segments(c)
        check(seg.get("tier_hits", 0) >= 3 and seg.get("computed_tokens", -1) == 0,
              "tiers: all three segments came from Redis: %s" % seg)
        print("tiers: %d reads of Redis held 50 ms each; segment stats %s" % (slow.delayed, seg))
        check(seg.get("pipelined_prefills", 0) == 1 and slow.delayed > 0,
              "tiers: the prefill computed while the later layers loaded (%d reads held): %s" %
              (slow.delayed, seg))
        # Loaded whole before the prefill (--no-segment-pipeline): the same answer.
        d = Server(binary, model, "--redis", redis.url(), "--chunk-tokens", "32",
                   "--no-segment-pipeline")
        try:
            st, whole = complete(d, segments, "blend", "T")
            if check(st == 200, "tiers: blend loaded whole: %s %s" % (st, whole)):
                check(whole["choices"][0]["text"] == want["choices"][0]["text"],
                      "tiers: loaded whole, the same answer: %r" % whole["choices"][0]["text"])
            sd = stats_segments(d)
            check(sd.get("tier_hits", 0) >= 3 and sd.get("pipelined_prefills", -1) == 0,
                  "tiers: --no-segment-pipeline waits for the whole load: %s" % sd)
        finally:
            d.close()
        st, metrics = c.get("/metrics")
        check(st == 200 and "cachette_segment_tier_hits_total %d" % seg.get("tier_hits", 0)
              in metrics, "tiers: /metrics counts the tier hits")
        st, other = complete(c, segments, "blend", "U")
        check(st == 200 and stats_segments(c).get("tier_hits") == seg.get("tier_hits"),
              "tiers: another tenant finds none of them: %s" % stats_segments(c))
        st, _ = c.post("/v1/cache/clear", {"cache_salt": "T"})
        check(st == 200, "tiers: tenant T cleared")
        c.stop()
        c = Server(binary, model, "--redis", redis.url(), "--chunk-tokens", "32")
        st, pre = c.post("/v1/cache/segments", {"segments": [DOC1, DOC2], "cache_salt": "T"})
        check(st == 200 and not any(x["cached"] for x in pre["segments"]),
              "tiers: after the clear, Redis holds none of T's segments: %s" % pre)
    finally:
        redis.kill()
        for x in (a, b, c, slow):
            if x is not None:
                x.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--model", required=True)
    a = p.parse_args()
    t0 = time.time()
    s = Server(a.binary, a.model, "--segment-cache-mb", "64", "--segment-separator", SEP,
               "--relay")
    try:
        counts = test_precompute(s)
        if counts is not None:
            test_reuse(s, counts[0])
            test_ape(s, counts)
        test_chat_parts(s)
        test_separator(s)
        test_stats(s)
        test_relay(s)
        test_errors(s)
    finally:
        s.close()
    with tempfile.TemporaryDirectory() as tmp:
        test_segments_in_tiers(a.binary, a.model, tmp)
    return report(t0)


if __name__ == "__main__":
    sys.exit(main())
