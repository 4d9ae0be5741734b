#!/usr/bin/env python3
"""End-to-end tests of `cachette serve` with the tiered chunk store (stdlib only).

  - a restarted server finds its disk tier: the same prompt hits on disk and answers the same;
  - a session restored from disk after a restart continues with the same tokens as an
    uninterrupted server (raw codec);
  - a session in 4-bit KV (--kv-type q4_0, or --session-kv-type q4: a q4_0 pool for sessions
    beside f16 for the rest) survives a restart: the server registers it again from its
    journal before any request, `cachette cache ls` lists it, its next turn restores its 4-bit
    chunks from disk (no prefill) and answers as an uninterrupted server does, and a
    conversation whose prefix changed restores only the part before the change;
  - a session in KIVI-style 4-bit KV (--kv-type kivi4), or in q4_0 with an f16 window
    (--kv-recent 64), reuses its quantized pages and restores them from disk after a restart,
    and the features a window cannot serve refuse it at start-up;
  - two servers sharing a Redis server share chunks;
  - killing Redis fails no request (it becomes a miss and a counter);
  - clearing a tenant removes its KV from every tier, across a restart and across servers;
  - a frozen Redis (SIGSTOP) stalls no running stream, and requests restoring from it answer
    like cold ones once their load deadline passes.

Usage: tiers_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_util import (FAILURES, RedisProxy, Server, check, free_port,  # noqa: E402
                      graceful_stop, start_redis)

LONG = " ".join(["The history of the world is long and full of stories about kings and "
                 "queens, of rivers and of the cities built beside them."] * 10)
# A session's first turn; its second follows the answer (uninterrupted_turns).
TURN1 = LONG + "\nQuestion: what is long?\nAnswer:"


def complete(s, prompt, max_tokens=12, **kw):
    body = {"model": "cachette-tiny-q8_0", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0}
    body.update(kw)
    status, r = s.post("/v1/completions", body)
    if not check(status == 200, "completion status %s: %s" % (status, r)):
        return "", {}
    return r["choices"][0]["text"], r["usage"]


def by_tier(usage):
    return usage.get("cachette", {}).get("cached_tokens_by_tier", {})


def test_restart_hits_disk(binary, model, tmp):
    d = os.path.join(tmp, "disk1")
    a = Server(binary, model, "--disk-dir", d, "--chunk-tokens", "64")
    cold_text, u0 = complete(a, LONG)
    check(u0.get("prompt_tokens_details", {}).get("cached_tokens") == 0, "first request is cold")
    graceful_stop(a)
    b = Server(binary, model, "--disk-dir", d, "--chunk-tokens", "64")
    try:
        text, u = complete(b, LONG)
        tiers = by_tier(u)
        check(tiers.get("disk", 0) >= 64, "restarted server hits its disk tier: %s" % tiers)
        check(u["prompt_tokens_details"]["cached_tokens"] == sum(tiers.values()),
              "cached_tokens equals the sum over tiers: %s" % u)
        check(text == cold_text, "disk-restored answer %r equals the cold one %r" % (text, cold_text))
        status, metrics = b.get("/metrics")
        check(status == 200 and "cachette_cache_" in metrics and 'tier="disk"' in metrics,
              "/metrics exports the chunk store's per-tier families")
    finally:
        b.stop()


def uninterrupted_turns(binary, model, session_id, *args):
    """Both turns of a session on one server that keeps it in memory, the reference for a
    restored one: the first answer, the second turn's prompt and its answer."""
    u = Server(binary, model, *args)
    try:
        a1, _ = complete(u, TURN1, 16, session_id=session_id)
        turn2 = TURN1 + a1 + "\nQuestion: and what is full?\nAnswer:"
        want, _ = complete(u, turn2, 16, session_id=session_id)
    finally:
        u.stop()
    return a1, turn2, want


def test_session_restored_from_disk(binary, model, tmp):
    a1, turn2, want = uninterrupted_turns(binary, model, "s1")
    d = os.path.join(tmp, "disk2")
    r1 = Server(binary, model, "--disk-dir", d, "--chunk-tokens", "64", "--codec", "raw")
    got1, _ = complete(r1, TURN1, 16, session_id="s1")
    check(got1 == a1, "turn 1 matches across servers")
    graceful_stop(r1)
    r2 = Server(binary, model, "--disk-dir", d, "--chunk-tokens", "64", "--codec", "raw")
    try:
        got2, usage = complete(r2, turn2, 16, session_id="s1")
        check(by_tier(usage).get("disk", 0) > 0, "turn 2 restored from disk: %s" % usage)
        check(got2 == want, "restored session continues like the uninterrupted one: %r vs %r" %
              (got2, want))
    finally:
        r2.stop()


def session_pins(s):
    status, st = s.get("/v1/cache/stats")
    check(status == 200, "stats answer: %s" % status)
    return [p for p in st["pins"] if p["session"] is not None]


def test_q4_session_survives_restart(binary, model, tmp):
    """Every KV in q4_0 (--kv-type q4_0), and f16 KV with a 4-bit pool for sessions
    (--session-kv-type q4): the same life of a session."""
    for q4 in (("--kv-type", "q4_0"), ("--session-kv-type", "q4")):
        print("   " + " ".join(q4), flush=True)
        q4_session(binary, model, tmp, q4)


def q4_session(binary, model, tmp, q4):
    pool = q4[0] == "--session-kv-type"
    a1, turn2, want = uninterrupted_turns(binary, model, "agent-7", *q4)
    d = os.path.join(tmp, "disk-q4" + ("-pool" if pool else ""))
    args = ("--disk-dir", d, "--chunk-tokens", "64", "--codec", "raw") + q4
    r1 = Server(binary, model, *args)
    got1, u1 = complete(r1, TURN1, 16, session_id="agent-7")
    check(got1 == a1, "turn 1 matches across servers")
    pins = session_pins(r1)
    check(len(pins) == 1 and not pins[0]["restored"], "one live session: %s" % pins)
    digest = pins[0]["session"] if pins else ""
    if pool:
        # The session's KV is in the session pool, 4-bit; a request without a session_id goes
        # to the main pool, f16, and answers as a server without a session pool does.
        status, st = r1.get("/v1/cache/stats")
        sk, kv = st.get("session_kv") or {}, st.get("kv", {})
        check(status == 200 and sk.get("kv_type") == "q4_0" and sk.get("pages_pinned", 0) > 0
              and kv.get("kv_type") == "f16" and kv.get("pages_used") == 0,
              "the session holds pages of the q4_0 session pool only: %s" % st)
        check(kv.get("budget_bytes", 0) + sk.get("budget_bytes", 0) <= 512 << 20 and
              sk.get("budget_bytes", 0) >= 255 << 20,
              "the two pools share --kv-budget, half each by default: %s %s" % (kv, sk))
        # The admin lookup finds the session in its pool when given its session_id.
        status, look = r1.post("/v1/cache/lookup", {"prompt": TURN1, "session_id": "agent-7"})
        check(status == 200 and look["pool"] == "session" and
              look["tiers"]["memory"] >= u1["prompt_tokens"] - 16,
              "lookup with the session_id reads the session pool: %s" % look)
        status, look = r1.post("/v1/cache/lookup", {"prompt": TURN1})
        check(status == 200 and look["pool"] == "main" and look["tiers"]["memory"] == 0,
              "lookup without it reads the main pool: %s" % look)
        status, look = r1.post("/v1/cache/lookup", {"prompt": TURN1, "session_id": 7})
        check(status == 400 and "session_id" in str(look), "a session_id that is not a "
              "string is a 400 naming it: %s %s" % (status, look))
        status, pin = r1.post("/v1/cache/pin", {"prompt": TURN1, "session_id": "agent-7"})
        check(status == 400 and pin.get("error", {}).get("param") == "session_id",
              "the admin pin refuses a session_id (turns pin sessions): %s %s" % (status, pin))
        plain, _ = complete(r1, TURN1, 16)
        _, st = r1.get("/v1/cache/stats")
        check(st["kv"]["pages_used"] > 0, "a request without a session uses the main pool")
        _, metrics = r1.get("/metrics")
        check('cachette_session_kv_pages{state="pinned"}' in metrics,
              "/metrics has the session pool's pages")
    graceful_stop(r1)
    if pool:
        f16 = Server(binary, model)
        try:
            ref, _ = complete(f16, TURN1, 16)
            check(plain == ref, "outside sessions the server answers in f16: %r vs %r" %
                  (plain, ref))
        finally:
            f16.stop()

    ls = subprocess.run([binary, "cache", "ls", "--dir", d, "--sessions"], capture_output=True,
                        text=True, timeout=60)
    rows = [line.split() for line in ls.stdout.splitlines()[1:] if line.strip()]
    check(ls.returncode == 0 and len(rows) == 1 and rows[0][0] == digest,
          "`cache ls --sessions` lists the session by its digest: %r" % ls.stdout)
    if rows:
        # The session holds the tokens whose KV was computed: the prompt and the reply, less
        # a last reply token that was sampled but never fed (a reply cut by max_tokens; one
        # ended by end-of-text has fed every counted token).
        n = u1["prompt_tokens"] + u1["completion_tokens"]
        held = int(rows[0][2])
        check(held in (n - 1, n) and int(rows[0][3]) == held // 64 * 64,
              "its conversation (%d or %d tokens) and the part whose chunks are on disk: %r" %
              (n - 1, n, rows[0]))

    r2 = Server(binary, model, *args)
    try:
        pins = session_pins(r2)
        check(len(pins) == 1 and pins[0]["restored"] and pins[0]["session"] == digest,
              "the restarted server registered the session again before any turn: %s" % pins)
        got2, usage = complete(r2, turn2, 16, session_id="agent-7")
        check(by_tier(usage).get("disk", 0) >= 256, "turn 2 restored from disk: %s" % usage)
        check(got2 == want, "the restored 4-bit session continues like the uninterrupted one: "
              "%r vs %r" % (got2, want))
        pins = session_pins(r2)
        check(len(pins) == 1 and not pins[0]["restored"], "its turn took the session over: %s" %
              pins)
    finally:
        graceful_stop(r2)
    # A conversation changed after its first 120 words restores only the chunks before that.
    r3 = Server(binary, model, *args)
    try:
        words = turn2.split(" ")
        changed = " ".join(words[:120] + ["Meanwhile"] + words[120:])
        _, usage = complete(r3, changed, 4, session_id="agent-7")
        cached = by_tier(usage).get("disk", 0)
        check(64 <= cached < 256, "a changed prefix restores only the part before it: %s" % usage)
    finally:
        graceful_stop(r3)
    clear = subprocess.run([binary, "cache", "clear", "--dir", d], capture_output=True,
                           text=True, timeout=60)
    check(clear.returncode == 0 and "removed 1 sessions" in clear.stdout,
          "`cache clear` removes the session too: %r" % clear.stdout)
    r4 = Server(binary, model, *args)
    try:
        check(session_pins(r4) == [], "nothing restored after the clear")
    finally:
        r4.stop()
    if pool:
        for extra in (("--kv-policy", "snapkv"), ("--kv-reuse", "blend"),
                      ("--session-kv-budget", "1GiB")):  # all of the default 512 MiB
            bad = subprocess.run([binary, "serve", "-m", model, "--port", str(free_port())] +
                                 list(q4 + extra), capture_output=True, text=True, timeout=60)
            check(bad.returncode != 0 and extra[0] in bad.stderr,
                  "serve %s with a session pool is refused by name: %r" %
                  (extra[0], bad.stderr[-300:]))
        # A session pool of the main pool's type (f16 by default) would share its namespaces;
        # an unknown type is named too.
        for t, word in (("f16", "of its own"), ("q3", "q3")):
            bad = subprocess.run([binary, "serve", "-m", model, "--port", str(free_port()),
                                  "--session-kv-type", t], capture_output=True, text=True,
                                 timeout=60)
            check(bad.returncode != 0 and "--session-kv-type" in bad.stderr and
                  word in bad.stderr, "serve --session-kv-type %s is refused: %r" %
                  (t, bad.stderr[-300:]))


def test_windowed_session_survives_restart(binary, model, tmp):
    """KIVI-style 4-bit KV (--kv-type kivi4), and q4_0 with an f16 window (--kv-recent 64): a
    session's pages, its f16 window sealed into them when its turn ends, are reused by its next
    turn, go to disk in whole chunks and come back after a restart. Features that rewrite single
    slots refuse both at start-up."""
    for kv in (("--kv-type", "kivi4"), ("--kv-type", "q4_0", "--kv-recent", "64")):
        print("   " + " ".join(kv), flush=True)
        windowed_session(binary, model, tmp, kv)


def windowed_session(binary, model, tmp, kivi):
    d = os.path.join(tmp, "disk-" + kivi[1])
    args = ("--disk-dir", d, "--chunk-tokens", "64", "--codec", "raw") + kivi
    r1 = Server(binary, model, *args)
    try:
        a1, u1 = complete(r1, TURN1, 16, session_id="agent-k")
        check(len(a1) > 0, "turn 1 answers")
        turn2 = TURN1 + a1 + "\nQuestion: and what is full?\nAnswer:"
        want, u2 = complete(r1, turn2, 16, session_id="agent-k")
        n1 = u1.get("prompt_tokens", 0) + u1.get("completion_tokens", 0)
        cached = u2.get("prompt_tokens_details", {}).get("cached_tokens", -1)
        # The window was sealed into the pages when turn 1 ended: turn 2 reuses all of it but
        # kivi4's key group in progress (and what re-tokenizing the answer changes).
        check(n1 - 40 <= cached <= n1 and (kivi[1] != "kivi4" or cached % 32 == 0),
              "turn 2 reuses turn 1's quantized tokens (%d of %d): %s" % (cached, n1, u2))
    finally:
        graceful_stop(r1)
    r2 = Server(binary, model, *args)
    try:
        got2, usage = complete(r2, turn2, 16, session_id="agent-k")
        disk = by_tier(usage).get("disk", 0)
        check(disk >= 256 and disk % 64 == 0, "turn 2 restored from disk: %s" % usage)
        check(len(got2) > 0, "the restored session answers: %r (uninterrupted: %r)" %
              (got2, want))
        status, st = r2.get("/v1/cache/stats")
        check(status == 200 and st.get("kv", {}).get("page_tokens") ==
              (32 if kivi[1] == "kivi4" else 16),
              "kivi4 pages hold whole key groups (32 tokens), others keep 16: %s" % st.get("kv"))
        # A request asking for a KV budget policy is a 400 naming it, not a crash.
        status, r = r2.post("/v1/completions", {"model": "cachette-tiny-q8_0", "prompt": LONG,
                                                "max_tokens": 2,
                                                "kv_policy": {"name": "snapkv", "budget": 0.5}})
        check(status == 400 and "kv_policy" in json.dumps(r) and kivi[1] in json.dumps(r),
              "a per-request kv_policy is refused by name: %s %s" % (status, r))
        check(r2.healthy(), "the server is still up after it")
    finally:
        graceful_stop(r2)
    for extra in (("--kv-policy", "snapkv"), ("--relay",)):
        bad = subprocess.run([binary, "serve", "-m", model, "--port", str(free_port())] +
                             list(kivi + extra), capture_output=True, text=True, timeout=60)
        check(bad.returncode != 0 and kivi[1] in bad.stderr and extra[0] in bad.stderr,
              "serve %s with %s is refused by name: %r" % (extra[0], kivi, bad.stderr[-300:]))


def test_redis_shared_and_dead(binary, model, tmp):
    redis = start_redis(tmp)
    if redis is None:
        return
    a = b = None
    try:
        a = Server(binary, model, "--redis", redis.url(), "--chunk-tokens", "64")
        text_a, _ = complete(a, LONG)
        graceful_stop(a)  # flushes write-behind
        a = None
        b = Server(binary, model, "--redis", redis.url(), "--chunk-tokens", "64")
        text_b, u = complete(b, LONG)
        check(by_tier(u).get("redis", 0) >= 64, "a second server hits the shared Redis: %s" % u)
        check(text_a == text_b, "Redis-restored answer equals the cold one")
        redis.kill()
        for i in range(4):
            t0 = time.time()
            _, u = complete(b, LONG + " variation %d" % i)
            check(time.time() - t0 < 10, "request with Redis dead finished in time")
        check(b.healthy(), "server healthy after Redis died")
    finally:
        redis.kill()
        for s in (a, b):
            if s is not None:
                s.stop()


def test_redis_levels(binary, model, tmp):
    """--redis-levels writes each chunk to Redis once per level; a second server (nothing
    measured yet, a generous deadline) restores the best level: the answer is the cold one."""
    redis = start_redis(tmp)
    if redis is None:
        return
    a = b = None
    try:
        args = ("--redis", redis.url(), "--chunk-tokens", "64", "--redis-levels", "int4")
        a = Server(binary, model, *args)
        text_a, u = complete(a, LONG)
        graceful_stop(a)
        a = None
        keys = subprocess.run(["redis-cli", "-p", str(redis.port), "--scan", "--pattern", "ct:*"],
                              capture_output=True, text=True, timeout=30).stdout.split()
        heads = [k for k in keys if k.endswith("}")]
        chunks = u["prompt_tokens"] // 64
        # (The finished turn's chunks: its prompt's and those its reply completed.)
        check(len(heads) % 2 == 0 and len(heads) >= 2 * chunks,
              "every chunk (%d of the prompt) written at 2 levels: %d records" %
              (chunks, len(heads)))
        b = Server(binary, model, *args)
        text_b, u = complete(b, LONG)
        check(by_tier(u).get("redis", 0) == chunks * 64, "restored from Redis: %s" % u)
        check(text_b == text_a, "at the best level the answer is the cold one")
        status, st = b.get("/v1/cache/stats")
        tiers = st.get("tiers", {}) if status == 200 else {}
        check(tiers.get("remote_lower_level_chunks") == 0 and
              tiers.get("remote_recompute_chunks") == 0,
              "no lower level and no recompute: %s" % {k: v for k, v in tiers.items()
                                                       if k.startswith("remote")})
    finally:
        redis.kill()
        for s in (a, b):
            if s is not None:
                s.stop()


class FreezingProxy(RedisProxy):
    """A proxy in front of a real Redis that stops it (SIGSTOP) at the moment the first GET of a
    record passes through once armed: the restore has looked its chunks up (EXISTS) and is
    reading them when Redis freezes, the worst moment for a loop that would wait."""

    def __init__(self, redis):
        super().__init__(redis)
        self.armed = False
        self.frozen_at = None

    def on_request(self, data):
        if self.armed and b"$3\r\nGET\r\n" in data:
            self.armed = False
            os.kill(self.redis.proc.pid, signal.SIGSTOP)
            self.frozen_at = time.time()


def test_frozen_redis_never_stalls_streams(binary, model, tmp):
    """Redis stopped (SIGSTOP) while requests restore from it, between the lookup of their chunks
    and the read: a running stream keeps its inter-token gap, and the restoring requests answer
    like cold ones once their load deadline passes."""
    redis = start_redis(tmp)
    if redis is None:
        return
    a = b = None
    docs = [LONG + " Document %d says:" % i for i in range(3)]
    try:
        a = Server(binary, model, "--redis", redis.url(), "--chunk-tokens", "32")
        cold = [complete(a, d)[0] for d in docs]
        graceful_stop(a)  # flushes write-behind to Redis
        a = None
        proxy = FreezingProxy(redis)
        b = Server(binary, model, "--redis", proxy.url(), "--chunk-tokens", "32",
                   "--load-deadline-ms", "1000")
        stamps = []  # arrival time of each streamed token of the long request

        def long_stream():
            c = b.conn()
            try:
                c.request("POST", "/v1/completions", body=json.dumps(
                    {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0,
                     "ignore_eos": True, "stream": True}),
                    headers={"Content-Type": "application/json"})
                r = c.getresponse()
                while True:
                    line = r.fp.readline()
                    if not line or line.startswith(b"data: [DONE]"):
                        break
                    if line.startswith(b"data: "):
                        stamps.append(time.time())
            finally:
                c.close()

        t = threading.Thread(target=long_stream)
        t.start()
        deadline = time.time() + 30
        while len(stamps) < 20 and time.time() < deadline:
            time.sleep(0.01)
        proxy.armed = True
        results = [None] * len(docs)

        def restore(i):
            results[i] = complete(b, docs[i])

        workers = [threading.Thread(target=restore, args=(i,)) for i in range(len(docs))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        thawed_at = time.time()
        frozen_at = proxy.frozen_at or thawed_at
        check(proxy.frozen_at is not None, "Redis was stopped while a restore read from it")
        os.kill(redis.proc.pid, signal.SIGCONT)
        t.join(120)
        before = [y - x for x, y in zip(stamps, stamps[1:]) if y < frozen_at]
        # Every gap that overlaps the window, including the one in progress when Redis froze.
        during = [y - x for x, y in zip(stamps, stamps[1:]) if y > frozen_at and x < thawed_at]
        normal = sorted(before)[len(before) // 2] if before else 0
        worst = max(during) if during else 0
        print("  inter-token gap: median %.1f ms before, worst %.1f ms while Redis was stopped "
              "(%d gaps over %.2f s)" % (normal * 1e3, worst * 1e3, len(during),
                                         thawed_at - frozen_at))
        check(len(during) >= 10, "the long stream ran while Redis was stopped (%d gaps)" %
              len(during))
        # A restore that waited on the loop thread would stall it for the whole 1 s load
        # deadline; batching the restoring requests' prefill (256 tokens a step) is the rest.
        check(worst < max(0.7, 10 * normal),
              "no stream stalls on a frozen Redis: worst gap %.0f ms (median before %.1f ms)" %
              (worst * 1e3, normal * 1e3))
        for i, r in enumerate(results):
            check(r is not None and r[0] == cold[i],
                  "request %d restoring from a frozen Redis answers like a cold one" % i)
        check(b.healthy(), "server healthy after Redis thawed")
    finally:
        try:
            os.kill(redis.proc.pid, signal.SIGCONT)
        except OSError:
            pass
        redis.kill()
        for s in (a, b):
            if s is not None:
                s.stop()


def test_clear_reaches_every_tier(binary, model, tmp):
    """POST /v1/cache/clear removes a tenant's KV from memory, RAM, disk and Redis: neither a
    restarted server nor another server sharing Redis restores it; other tenants keep theirs."""
    redis = start_redis(tmp)
    if redis is None:
        return
    d = os.path.join(tmp, "disk-clear")
    a = b = None
    try:
        args = ("--redis", redis.url(), "--disk-dir", d, "--chunk-tokens", "32")
        a = Server(binary, model, *args)
        cold_x, _ = complete(a, LONG, cache_salt="tenant-x")
        cold_y, _ = complete(a, LONG, cache_salt="tenant-y")
        graceful_stop(a)  # chunks reach disk and Redis
        a = Server(binary, model, *args)
        _, u = complete(a, LONG, cache_salt="tenant-x")
        check(u["prompt_tokens_details"]["cached_tokens"] > 0,
              "before the clear, a restarted server restores tenant-x: %s" % u)
        status, r = a.post("/v1/cache/clear", {"cache_salt": "tenant-x"})
        check(status == 200, "clear answers 200: %s %s" % (status, r))
        graceful_stop(a)
        a = Server(binary, model, *args)
        text, u = complete(a, LONG, cache_salt="tenant-x")
        check(u["prompt_tokens_details"]["cached_tokens"] == 0,
              "after the clear and a restart, tenant-x restores nothing: %s" % u)
        check(text == cold_x, "tenant-x answers like a cold run after the clear")
        graceful_stop(a)
        a = None
        # Another server sharing only Redis (its own empty disk): tenant-x was cleared there too
        # (the run above wrote it again, so clear once more, from this server), tenant-y not.
        b = Server(binary, model, "--redis", redis.url(), "--chunk-tokens", "32")
        status, _ = b.post("/v1/cache/clear", {"cache_salt": "tenant-x"})
        check(status == 200, "clear from a second server")
        _, ux = complete(b, LONG, cache_salt="tenant-x")
        check(by_tier(ux).get("redis", 0) == 0, "cleared tenant-x is gone from Redis: %s" % ux)
        text_y, uy = complete(b, LONG, cache_salt="tenant-y")
        check(by_tier(uy).get("redis", 0) >= 32, "tenant-y still restores from Redis: %s" % uy)
        check(text_y == cold_y, "tenant-y restored from Redis answers like a cold run")
    finally:
        redis.kill()
        for s in (a, b):
            if s is not None:
                s.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--model", required=True)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="cachette-tiers-")
    tests = [test_restart_hits_disk, test_session_restored_from_disk,
             test_q4_session_survives_restart, test_windowed_session_survives_restart,
             test_redis_shared_and_dead, test_redis_levels,
             test_frozen_redis_never_stalls_streams, test_clear_reaches_every_tier]
    failed = 0
    try:
        for t in tests:
            print("== " + t.__name__, flush=True)
            before = len(FAILURES)
            try:
                t(args.binary, args.model, tmp)
            except Exception as e:  # a crash of the test itself is a failure, not a skip
                check(False, "%s raised %r" % (t.__name__, e))
            failed += len(FAILURES) > before
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (len(tests) - failed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
