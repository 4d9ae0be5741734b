#!/usr/bin/env python3
"""End-to-end tests of `cachette serve` with the tiered chunk store (stdlib only).

  - a restarted server finds its disk tier: the same prompt hits on disk and answers the same;
  - a session restored from disk after a restart continues with the same tokens as an
    uninterrupted server (raw codec);
  - two servers sharing a Redis server share chunks;
  - killing Redis fails no request (it becomes a miss and a counter).

Usage: tiers_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_test import FAILURES, Server, check, free_port  # noqa: E402

LONG = " ".join(["The history of the world is long and full of stories about kings and "
                 "queens, of rivers and of the cities built beside them."] * 10)


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


def graceful_stop(s):
    s.proc.send_signal(signal.SIGTERM)
    try:
        s.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        s.stop()
    check(s.proc.returncode == 0, "SIGTERM exit code %s" % s.proc.returncode)


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


def test_session_restored_from_disk(binary, model, tmp):
    turn1 = LONG + "\nQuestion: what is long?\nAnswer:"
    # Uninterrupted: both turns on one server with the prefix cache in memory.
    u = Server(binary, model)
    try:
        a1, _ = complete(u, turn1, 16, session_id="s1")
        turn2 = turn1 + a1 + "\nQuestion: and what is full?\nAnswer:"
        want, _ = complete(u, turn2, 16, session_id="s1")
    finally:
        u.stop()
    d = os.path.join(tmp, "disk2")
    r1 = Server(binary, model, "--disk-dir", d, "--chunk-tokens", "64", "--codec", "raw")
    got1, _ = complete(r1, turn1, 16, session_id="s1")
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


class Redis:
    def __init__(self, tmp):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(dir=tmp)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            if subprocess.call(["redis-cli", "-p", str(self.port), "ping"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def url(self):
        return "redis://127.0.0.1:%d" % self.port

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_redis_shared_and_dead(binary, model, tmp):
    if shutil.which("redis-server") is None:
        check(False, "redis-server is not installed (scripts/setup.sh installs it)")
        return
    redis = Redis(tmp)
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--model", required=True)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="cachette-tiers-")
    tests = [test_restart_hits_disk, test_session_restored_from_disk, test_redis_shared_and_dead]
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
