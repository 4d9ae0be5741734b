#!/usr/bin/env python3
"""End-to-end test of `cachette serve` under overload, with access control and input limits.

Checks, against the real binary on loopback:
  (i)   --max-running 1 --max-queue 2 and 12 concurrent slow streams: the 9 extra requests get
        429 at once, while /health and /metrics keep answering in < 100 ms (p50/max printed);
  (ii)  a non-streaming client that disconnects mid-generation is cancelled (the scheduler
        stats count it) and the next request runs at once;
  (iii) --api-key / --admin-key: 401 with an OpenAI error body without or with a wrong key, 200
        with the right one, /health open; /v1/cache/* needs the admin key; without an admin key
        the admin API serves 127.0.0.1; the stats show namespace ids, never salts or sessions;
  (iv)  a 300-byte cache_salt or session_id and an oversize prompt get 400 naming the field;
  (v)   `cachette serve --help` groups its flags by area.

Usage: overload_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_test import FAILURES, Server, check, report  # noqa: E402

SLOW = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True,
        "temperature": 0}


def call(s, method, path, body=None, key=None, timeout=30):
    """One request on a fresh connection: (status, parsed JSON or text, seconds)."""
    c = s.conn(timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = "Bearer " + key
    t = time.time()
    try:
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers=headers)
        r = c.getresponse()
        data = r.read()
        elapsed = time.time() - t
    finally:
        c.close()
    try:
        return r.status, json.loads(data), elapsed
    except ValueError:
        return r.status, data.decode(errors="replace"), elapsed


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def test_overload(s):
    """(i) 12 streams against 1 running + 2 queued."""
    results = []  # (status, seconds to the status line)
    lock = threading.Lock()
    stop = threading.Event()

    def streamer():
        c = s.conn(timeout=30)
        t = time.time()
        try:
            c.request("POST", "/v1/completions", body=json.dumps(dict(SLOW, stream=True)),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            with lock:
                results.append((r.status, time.time() - t))
            if r.status == 200:
                stop.wait(20)  # hold the slot while the probes run
            else:
                r.read()
        except OSError as e:
            with lock:
                results.append(("error %r" % e, time.time() - t))
        finally:
            try:
                c.sock and c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    # The first one runs before the others arrive (in one burst the scheduler counts a request
    # as queued until its loop admits it).
    threads = [threading.Thread(target=streamer) for _ in range(12)]
    threads[0].start()
    deadline = time.time() + 10
    while time.time() < deadline:
        if call(s, "GET", "/v1/cache/stats")[1]["scheduler"]["running"] == 1:
            break
        time.sleep(0.02)
    for t in threads[1:]:
        t.start()
    deadline = time.time() + 10
    while time.time() < deadline and len(results) < 12:
        time.sleep(0.02)
    # Read right away: the running request generates its 1,500 tokens in about a second on a
    # fast machine (its stream fills the socket buffers, unread), after which a queued one runs.
    during = call(s, "GET", "/v1/cache/stats")[1]
    lat = {"/health": [], "/metrics": []}
    probe_until = time.time() + 1.5
    while time.time() < probe_until:
        for path in lat:
            status, _, sec = call(s, "GET", path)
            check(status == 200, "%s answers under load (%s)" % (path, status))
            lat[path].append(sec)
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    codes = [r[0] for r in results]
    rejected = [sec for st, sec in results if st == 429]
    print("    statuses %s; 429s within %.0f ms" % (sorted(codes, key=str),
                                                    1e3 * max(rejected or [0])))
    check(codes.count(200) == 3 and codes.count(429) == 9,
          "1 running + 2 queued get 200, the 9 others 429: %s" % codes)
    check(rejected and max(rejected) < 1.0, "the 429s come at once: %s" % rejected)
    check(during["scheduler"]["running"] == 1 and during["scheduler"]["queued"] == 2,
          "the scheduler runs 1 and queues 2 meanwhile: %s" % during["scheduler"])
    for path, xs in lat.items():
        print("    %-8s n=%d p50=%.1f ms max=%.1f ms" % (path, len(xs), 1e3 * pct(xs, 0.5),
                                                       1e3 * max(xs)))
        # Behind a queue inside the HTTP library these wait for a generation to end (seconds);
        # the margin covers a loaded 2-core CI machine running other tests beside this one.
        check(pct(xs, 0.5) < 0.05 and max(xs) < 0.25,
              "%s answers in milliseconds under load (p50 %.0f ms, max %.0f ms)" %
              (path, 1e3 * pct(xs, 0.5), 1e3 * max(xs)))
    # Every cancelled stream frees its slot: the server is idle again soon.
    deadline = time.time() + 10
    while time.time() < deadline:
        st = call(s, "GET", "/v1/cache/stats")[1]["scheduler"]
        if st["running"] == 0 and st["queued"] == 0:
            break
        time.sleep(0.05)
    check(st["running"] == 0 and st["queued"] == 0, "idle after the streams left: %s" % st)


def test_nonstreaming_disconnect(s):
    """(ii) a non-streaming client leaves mid-generation."""
    before = call(s, "GET", "/v1/cache/stats")[1]["scheduler"]
    sock = socket.create_connection(("127.0.0.1", s.port))
    body = json.dumps(SLOW).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.time() + 10
    while time.time() < deadline:
        if call(s, "GET", "/v1/cache/stats")[1]["scheduler"]["running"] == 1:
            break
        time.sleep(0.02)
    time.sleep(0.2)
    sock.close()
    t = time.time()
    after = before
    while time.time() < t + 5:
        after = call(s, "GET", "/v1/cache/stats")[1]["scheduler"]
        if after["running"] == 0:
            break
        time.sleep(0.02)
    print("    cancelled %.0f ms after the client left" % (1e3 * (time.time() - t)))
    check(after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1,
          "the disconnected request is cancelled: %s -> %s" % (before, after))
    status, r, sec = call(s, "POST", "/v1/completions",
                          {"prompt": "next", "max_tokens": 2, "temperature": 0})
    check(status == 200 and sec < 2.0, "the next request runs at once (%s in %.2f s)"
          % (status, sec))


def test_auth(binary, model):
    """(iii) API and admin keys; (iv) limits."""
    s = Server(binary, model, "--api-key", "key-one", "--api-key", "key-two",
               "--admin-key", "adm-secret")
    try:
        status, r, _ = call(s, "GET", "/health")
        check(status == 200, "/health is open with keys configured")
        for what, key in (("no key", None), ("a wrong key", "key-three")):
            for method, path, body in (("GET", "/v1/models", None),
                                       ("POST", "/v1/completions", {"prompt": "hi"})):
                status, r, _ = call(s, method, path, body, key=key)
                check(status == 401 and isinstance(r, dict) and
                      r.get("error", {}).get("code") == "invalid_api_key" and
                      "message" in r["error"] and "type" in r["error"],
                      "%s %s with %s: 401 with an OpenAI error body (%s %s)"
                      % (method, path, what, status, r))
        status, r, _ = call(s, "GET", "/v1/models", key="key-two")
        check(status == 200 and r["data"][0]["id"], "/v1/models with a right key")
        salt, session = "salt-secret-7f3a", "session-secret-9c1d"
        status, r, _ = call(s, "POST", "/v1/completions",
                            {"prompt": "Once upon a time there was", "max_tokens": 2,
                             "cache_salt": salt, "session_id": session}, key="key-one")
        check(status == 200, "a completion with a right key (%s %s)" % (status, r))
        for key in (None, "key-one"):
            status, r, _ = call(s, "GET", "/v1/cache/stats", key=key)
            check(status == 401, "/v1/cache/stats with %s: 401 (%s)" % (key, status))
        status, r, _ = call(s, "GET", "/v1/cache/stats", key="adm-secret")
        check(status == 200, "/v1/cache/stats with the admin key")
        text = json.dumps(r)
        check(salt not in text and session not in text,
              "the stats never show a salt or a session id")
        check(r.get("pins") and all(len(p.get("ns", "")) == 32 for p in r["pins"]),
              "pins are named by namespace id: %s" % r.get("pins"))

        # (iv) limits: 400 naming the field, before any tokenization.
        cases = [("cache_salt", {"prompt": "hi", "cache_salt": "s" * 300}),
                 ("session_id", {"prompt": "hi", "session_id": "s" * 300}),
                 ("prompt", {"prompt": "word " * 200000})]
        for field, body in cases:
            status, r, sec = call(s, "POST", "/v1/completions", body, key="key-one")
            err = r.get("error", {}) if isinstance(r, dict) else {}
            check(status == 400 and err.get("param") == field,
                  "an oversize %s: 400 naming it (%s %s)" % (field, status, str(r)[:200]))
        status, r, _ = call(s, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1},
                            key="key-one")
        check(status == 200, "serves after the limits")
    finally:
        s.stop()


def test_help(binary):
    """(v) flag groups."""
    out = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    for group in ("Cache store", "Scheduler", "Access control", "Network and limits"):
        check(group in text, "serve --help shows the group '%s'" % group)
    for flag in ("--policy", "--admit-after-hits", "--redis-write", "--redis-ttl",
                 "--tenant-quota", "--load-deadline-ms", "--queue-timeout", "--max-pinned",
                 "--api-key", "--admin-key"):
        check(flag in text, "serve --help lists %s" % flag)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    t0 = time.time()
    test_help(a.binary)
    s = Server(a.binary, a.model, "--kv-budget", "64MiB", "--max-running", "1",
               "--max-queue", "2")
    try:
        for test in (test_overload, test_nonstreaming_disconnect):
            t = time.time()
            try:
                test(s)
            except Exception as e:  # a crash in one check must not hide the others
                check(False, "%s raised %r" % (test.__name__, e))
            print("%-28s %.2f s" % (test.__name__, time.time() - t), flush=True)
    finally:
        s.close()
    t = time.time()
    try:
        test_auth(a.binary, a.model)
    except Exception as e:
        check(False, "test_auth raised %r" % e)
    print("%-28s %.2f s" % ("test_auth", time.time() - t), flush=True)
    return report(t0)


if __name__ == "__main__":
    sys.exit(main())
