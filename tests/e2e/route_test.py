#!/usr/bin/env python3
"""End-to-end test of `cachette route` (issue 14) over three real `cachette serve` backends that
publish KV events, on loopback ports, with the bundled model (stdlib only).

Checks: the backends advertise their events (GET /v1/cache/events); with --policy kv a second
turn goes to the backend that holds the first (cached_tokens reported, /v1/router/explain ranks
it first) while round-robin misses; tenants (cache_salt) never share; answers through the router
equal answers from a backend directly (greedy); a backend killed while the router still thinks
it is up costs no request (retried before any byte was sent), streamed or not; a stream whose
backend dies mid-way ends with an error event and no [DONE]; requests in flight to a backend that
freezes end as soon as its health check fails, not at their timeout; SIGHUP re-reads
--backends-file; /metrics and /v1/router/backends say what happened.

Usage: route_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
"""
import argparse
import http.client
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
from e2e_util import Process, Server, check, free_port, report  # noqa: E402

MODEL_ID = "cachette-tiny-q8_0"


def backend(binary, model):
    p = free_port(pair=True)
    return Server(binary, model, "--kv-budget", "32MiB", "--max-running", "4",
                  "--kv-events", "tcp://127.0.0.1:%d" % p)


class Router(Process):
    """`cachette route` in front of `urls`, on a free port."""

    def __init__(self, binary, model, urls=(), *extra):
        cmd = [binary, "route", "-m", model, "--health-interval-ms", "100"]
        for u in urls:
            cmd += ["--backend", u]
        super().__init__(cmd + list(extra), "cachette-route")

    def backends(self):
        return self.get("/v1/router/backends")[1]["backends"]

    def wait_synced(self, n, timeout=10):
        """Until n backends are up and their event subscriptions synchronised."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            bs = self.backends()
            if sum(1 for b in bs if b["up"] and b.get("events", {}).get("synced")) >= n:
                return True
            time.sleep(0.05)
        return False


def doc(k, words=220):
    return " ".join("doc%d word%d is here" % (k, i) for i in range(words // 4))


def chat(text, **kw):
    b = {"model": MODEL_ID, "messages": [{"role": "user", "content": text}],
         "max_tokens": 4, "temperature": 0}
    b.update(kw)
    return b


def cached(resp):
    return resp["usage"]["prompt_tokens_details"]["cached_tokens"]


def requests_by_backend(router):
    return {b["url"]: b["requests"] for b in router.backends()}


def explain(router, body):
    return router.post("/v1/router/explain", body)[1]


def settle(router, body, timeout=5):
    """Waits until the router's index shows some backend holding `body`'s prompt (the events of
    the request just answered arrive asynchronously)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        e = explain(router, body)
        if e["order"] and e["order"][0]["held_tokens"] > 0:
            return e
        time.sleep(0.05)
    return explain(router, body)


def test_events_info(backends):
    st, info = backends[0].get("/v1/cache/events")
    check(st == 200 and info.get("enabled"), "backend advertises its events: %s" % info)
    check(info.get("endpoint", "").startswith("tcp://127.0.0.1:"), "events endpoint: %s" % info)
    check(info.get("page_tokens") == 16 and len(info.get("namespace", "")) == 32,
          "page size and namespace advertised: %s" % info)
    st, info = backends[0].get("/health")
    check(st == 200, "backend healthy")


def test_kv_routing_follows_the_cache(kv, rr, backends):
    # Turn 1 of six documents through the kv router; turn 2 must go where turn 1 went and hit.
    hits_kv = hits_rr = 0
    for k in range(6):
        first = chat(doc(k))
        st, r1 = kv.post("/v1/chat/completions", first)
        check(st == 200, "kv turn 1 of doc %d: %s" % (k, r1))
        second = chat(doc(k) + " and then a follow-up question %d" % k)
        e = settle(kv, second)
        order = e["order"]
        check(order[0]["held_tokens"] >= 160 and all(c["held_tokens"] == 0 for c in order[1:]),
              "explain: one backend holds doc %d's prefix: %s" % (k, order))
        before = requests_by_backend(kv)
        st, r2 = kv.post("/v1/chat/completions", second)
        check(st == 200, "kv turn 2 of doc %d" % k)
        after = requests_by_backend(kv)
        went = [u for u in after if after[u] != before.get(u, 0)]
        check(went == [order[0]["backend"]], "turn 2 went to the predicted backend %s (%s)" %
              (order[0]["backend"], went))
        hits_kv += cached(r2)
        check(cached(r2) >= 160, "kv turn 2 of doc %d hit: %d cached" % (k, cached(r2)))
    # The same through round-robin (other documents, so nothing is cached yet).
    for k in range(100, 106):
        st, _ = rr.post("/v1/chat/completions", chat(doc(k)))
        st, r2 = rr.post("/v1/chat/completions", chat(doc(k) + " and then a follow-up %d" % k))
        check(st == 200, "rr turn 2")
        hits_rr += cached(r2)
    print("cached tokens of the second turns: kv %d, round-robin %d" % (hits_kv, hits_rr))
    check(hits_kv > 2 * hits_rr, "kv routing hits more than round-robin: %d vs %d cached tokens" %
          (hits_kv, hits_rr))
    m = kv.get("/metrics")[1]
    for series in ("cachette_route_backend_requests_total", "cachette_route_decision_seconds",
                   "cachette_route_backend_cached_tokens_total",
                   "cachette_route_backend_predicted_hit_tokens_total",
                   "cachette_route_index_blocks"):
        check(series in m, "router /metrics has " + series)


def test_tenants_never_share(kv):
    body = chat(doc(0))  # cached on some backend by the previous test
    # settle: a backend that missed a health check on a loaded machine comes back with its
    # index rebuilt from a snapshot, which takes a moment.
    e = settle(kv, body)
    check(e["order"][0]["held_tokens"] > 0, "the shared namespace holds doc 0: %s" % e["order"])
    e = explain(kv, chat(doc(0), cache_salt="tenant-b"))
    check(all(c["held_tokens"] == 0 for c in e["order"]),
          "another cache_salt holds nothing of it: %s" % e["order"])


def test_answers_equal_direct(kv, backends):
    body = chat("Tell me about the quiet river and the old mill.", max_tokens=16)
    st, direct = backends[2].post("/v1/chat/completions", body)
    st2, routed = kv.post("/v1/chat/completions", body)
    check(st == 200 and st2 == 200, "both answered")
    check(direct["choices"][0]["message"]["content"] == routed["choices"][0]["message"]["content"],
          "greedy answer through the router equals the backend's")
    st, events, done = kv.stream("/v1/chat/completions", dict(body, stream=True))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
    check(st == 200 and done and text == direct["choices"][0]["message"]["content"],
          "streamed through the router: same text and [DONE]")


def test_killed_backend_costs_no_request(kv, backends):
    # Put a document on some backend, then kill that backend before the router notices.
    body = chat(doc(42))
    kv.post("/v1/chat/completions", body)
    second = chat(doc(42) + " and a question after the crash")
    order = settle(kv, second)["order"]
    victim = next(b for b in backends if b.url == order[0]["backend"])
    victim.stop()  # SIGKILL: no drain, connections refused from now on
    st, r = kv.post("/v1/chat/completions", second)
    check(st == 200, "request whose backend died is answered by another: %s %s" % (st, r))
    st, events, done = kv.stream("/v1/chat/completions", dict(second, stream=True))
    check(st == 200 and done, "a streamed one too")
    bs = {b["url"]: b for b in kv.backends()}
    check(not bs[victim.url]["up"], "the dead backend is marked down")
    m = kv.get("/metrics")[1]
    check("cachette_route_failures_total 0" in m, "no request failed")
    # Ten more requests: none fails while one backend is gone.
    ok = sum(kv.post("/v1/chat/completions", chat(doc(200 + i)))[0] == 200 for i in range(10))
    check(ok == 10, "10/10 answered with a backend down (%d)" % ok)
    return victim


class StreamInBackground(threading.Thread):
    """One streamed request to `server`, read on its own thread: `result` is (status, events,
    saw_done) once it ends, `ended` when, `last_event` when its last event came; `started` is set
    after `after` events (or at the end)."""

    def __init__(self, server, body, after=10):
        super().__init__(daemon=True)
        self.server, self.body, self.after = server, body, after
        self.result, self.ended, self.last_event = (0, [], False), None, None
        self.started = threading.Event()
        self.count = 0
        self.start()

    def on_event(self, _):
        self.last_event = time.time()
        self.count += 1
        if self.count >= self.after:
            self.started.set()

    def run(self):
        try:
            self.result = self.server.stream("/v1/chat/completions", self.body, self.on_event)
        except OSError as e:
            print("stream raised %r" % e)
        finally:
            self.ended = time.time()
            self.started.set()


def test_mid_stream_failure_is_visible(binary, model, tmp):
    b = backend(binary, model)
    r = Router(binary, model, [b.url])
    try:
        if not check(r.wait_synced(1), "router synced with its one backend"):
            return
        s = StreamInBackground(r, chat("Write a long story.", max_tokens=1900, ignore_eos=True,
                                       stream=True))
        check(s.started.wait(30), "the long stream started")
        b.stop()  # SIGKILL while it streams
        s.join(60)
        st, events, done = s.result
        print("stream cut after %d events; last: %s" % (len(events), events[-1:]))
        check(st == 200 and not done, "a stream cut by its backend has no [DONE]")
        check(any("error" in e for e in events),
              "and ends with an error event: %s" % (events[-1:] if events else events))
    finally:
        r.close()
        b.close()


def test_frozen_backend_is_abandoned_when_its_health_check_fails(binary, model):
    """A backend that freezes (SIGSTOP: its kernel still accepts connections, nothing answers)
    with requests in flight: once the router's health check gets no answer (2 s), they are
    aborted at once, retried on the other backend where nothing was sent to the client yet,
    else ended with an error event, well before the router's --read-timeout (60 s here)."""
    bs = [backend(binary, model) for _ in range(2)]
    r = None
    try:
        r = Router(binary, model, [b.url for b in bs], "--read-timeout", "60")
        if not check(r.wait_synced(2), "router synced with both backends: %s" % r.backends()):
            return
        st, _ = r.post("/v1/chat/completions", chat(doc(300)))
        check(st == 200, "the document's first turn")
        question = chat(doc(300) + " and a question while it is frozen")
        order = settle(r, question)["order"]
        frozen = next(b for b in bs if b.url == order[0]["backend"])
        # A stream under way there when it freezes (it holds the document: it gets this too).
        long = StreamInBackground(r, chat(doc(300) + " Write a long story.", max_tokens=1500,
                                          ignore_eos=True, stream=True))
        check(long.started.wait(30), "the long stream started")
        check(explain(r, question)["order"][0]["backend"] == frozen.url,
              "the question still goes to the backend that holds its document")
        frozen.proc.send_signal(signal.SIGSTOP)
        t0 = time.time()
        # A whole and a streamed request sent there now, before the health check notices.
        whole = {"v": (0, None), "ended": float("inf")}

        def ask():
            try:
                whole["v"] = r.post("/v1/chat/completions", question)
            finally:
                whole["ended"] = time.time()

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        streamed = StreamInBackground(r, dict(question, stream=True), after=1)
        for t in (asker, streamed, long):
            t.join(90)
        bound = 15
        # (The raw reader of a cut stream sees its end only when the router closes the idle
        # connection: the error event's arrival is what counts.)
        cut = (long.last_event or float("inf")) - t0
        print("after the freeze: whole answered in %.1f s, stream retried in %.1f s, stream under "
              "way cut in %.1f s" % (whole["ended"] - t0, streamed.ended - t0, cut))
        st, resp = whole["v"]
        check(st == 200 and whole["ended"] - t0 < bound,
              "a request in flight to the frozen backend is answered by the other in %.1f s "
              "(< %d): %s %s" % (whole["ended"] - t0, bound, st, resp))
        st, events, done = streamed.result
        check(st == 200 and done and streamed.ended - t0 < bound,
              "a stream that had sent nothing yet is retried too, in %.1f s: %s %s" %
              (streamed.ended - t0, st, events[-1:]))
        st, events, done = long.result
        check(st == 200 and not done and events and "error" in events[-1] and cut < bound,
              "the stream under way ends with an error event and no [DONE] in %.1f s: %s" %
              (cut, events[-1:]))
        b = next(b for b in r.backends() if b["url"] == frozen.url)
        check(not b["up"] and b.get("down_reason", "").startswith("/health"),
              "the frozen backend is down for its health check: %s" % b)
        check(b["retries"] == 2, "both requests were in flight there and moved: %s" % b)
        m = r.get("/metrics")[1]
        check("cachette_route_failures_total 0" in m, "no request failed")
    finally:
        if r is not None:
            r.close()
        for b in bs:
            b.close()  # SIGKILL ends a stopped process too


def test_sighup_rereads_backends(binary, model, backends, tmp):
    path = os.path.join(tmp, "backends.txt")
    with open(path, "w") as f:
        f.write("# two to start\n%s\n%s\n" % (backends[0].url, backends[1].url))
    r = Router(binary, model, [], "--backends-file", path)
    try:
        check(len(r.backends()) == 2, "two backends from the file")
        with open(path, "w") as f:
            f.write("%s\n" % backends[1].url)
        r.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 5
        while time.time() < deadline and len(r.backends()) != 1:
            time.sleep(0.05)
        check([b["url"] for b in r.backends()] == [backends[1].url], "SIGHUP dropped one")
        with open(path, "w") as f:
            f.write("not a url\n")
        r.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        check(r.proc.poll() is None and len(r.backends()) == 1,
              "a bad file on SIGHUP keeps the backends as they were")
    finally:
        r.close()


def test_kv_without_events_falls_back_to_its_own_record(binary, model):
    plain = [Server(binary, model, "--kv-budget", "32MiB") for _ in range(2)]  # no --kv-events
    r = None
    try:
        r = Router(binary, model, [b.url for b in plain])
        bs = r.backends()
        check(all(b["up"] and "events" not in b for b in bs), "two backends up, no events: %s" % bs)
        st, _ = r.post("/v1/chat/completions", chat(doc(7)))
        second = chat(doc(7) + " and a follow-up")
        order = explain(r, second)["order"]
        check(order[0]["held_tokens"] >= 160 and order[1]["held_tokens"] == 0,
              "the router's record says where doc 7 went: %s" % order)
        st, r2 = r.post("/v1/chat/completions", second)
        check(st == 200 and cached(r2) >= 160, "and the follow-up hits there: %s" % r2.get("usage"))
    finally:
        if r is not None:
            r.close()
        for b in plain:
            b.close()


def test_sessions_in_a_session_pool(binary, model):
    """Backends with a 4-bit session pool (--session-kv-type q4) publish its pages too; the
    router scores a request with a session_id in that pool's namespace, so a router that never
    saw the session (no sticky entry) still finds where its conversation is."""
    pooled = []
    for _ in range(2):
        p = free_port(pair=True)
        pooled.append(Server(binary, model, "--kv-budget", "32MiB", "--session-kv-type", "q4",
                             "--kv-events", "tcp://127.0.0.1:%d" % p))
    first = second = None
    try:
        st, info = pooled[0].get("/v1/cache/events")
        check(st == 200 and info.get("session_kv_type") == "q4_0" and
              len(info.get("session_namespace") or "") == 32 and
              info["session_namespace"] != info.get("namespace"),
              "a backend advertises its session pool and that pool's namespace: %s" % info)
        first = Router(binary, model, [b.url for b in pooled])
        check(first.wait_synced(2), "router subscribed to both: %s" % first.backends())
        check(all(b.get("session_kv_type") == "q4_0" for b in first.backends()),
              "the router knows both session pools: %s" % first.backends())
        turn1 = chat(doc(9), session_id="agent-9")
        before = requests_by_backend(first)
        st, _ = first.post("/v1/chat/completions", turn1)
        after = requests_by_backend(first)
        went = [u for u in after if after[u] != before.get(u, 0)]
        check(st == 200 and len(went) == 1, "turn 1 of the session answered by one backend")
        # A second router, which has not seen the session: only the KV events can tell.
        second = Router(binary, model, [b.url for b in pooled])
        check(second.wait_synced(2), "second router subscribed to both")
        turn2 = chat(doc(9) + " and a follow-up", session_id="agent-9")
        order = settle(second, turn2)["order"]
        check(order[0]["held_tokens"] >= 160 and order[0]["backend"] == went[0] and
              order[1]["held_tokens"] == 0,
              "the session's pages are found in its backend's session pool: %s" % order)
        plain = explain(second, chat(doc(9) + " and a follow-up"))["order"]
        check(all(c["held_tokens"] == 0 for c in plain),
              "without the session_id (main pool, f16) nothing is held: %s" % plain)
        st, r2 = second.post("/v1/chat/completions", turn2)
        check(st == 200 and cached(r2) >= 160, "turn 2 through the second router hits: %s" %
              r2.get("usage"))
    finally:
        for x in [first, second] + pooled:
            if x is not None:
                x.close()


def test_bad_flags(binary, model):
    for args, word in ((["--policy", "random", "--backend", "http://127.0.0.1:1"], "--policy"),
                       (["--backend", "ftp://x"], "http://"),
                       ([], "--backend")):
        p = subprocess.run([binary, "route", "-m", model, "--port", "0"] + args,
                           capture_output=True, text=True, timeout=60)
        check(p.returncode != 0 and word in p.stderr, "route %s fails naming %s: %s" %
              (args, word, p.stderr[-300:]))
    p = subprocess.run([binary, "serve", "-m", model, "--kv-events", "udp://x"],
                       capture_output=True, text=True, timeout=60)
    check(p.returncode != 0 and "--kv-events" in p.stderr,
          "serve --kv-events udp://x fails naming the flag: %s" % p.stderr[-300:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="cachette-route-")
    test_bad_flags(a.binary, a.model)
    backends = [backend(a.binary, a.model) for _ in range(3)]
    kv = rr = None
    try:
        urls = [b.url for b in backends]
        kv = Router(a.binary, a.model, urls)
        rr = Router(a.binary, a.model, urls, "--policy", "round-robin")
        check(kv.wait_synced(3), "kv router subscribed to all three backends: %s" % kv.backends())
        test_events_info(backends)
        test_kv_routing_follows_the_cache(kv, rr, backends)
        test_tenants_never_share(kv)
        test_answers_equal_direct(kv, backends)
        test_sighup_rereads_backends(a.binary, a.model, backends, tmp)
        test_killed_backend_costs_no_request(kv, backends)
        test_mid_stream_failure_is_visible(a.binary, a.model, tmp)
        test_frozen_backend_is_abandoned_when_its_health_check_fails(a.binary, a.model)
        test_kv_without_events_falls_back_to_its_own_record(a.binary, a.model)
        test_sessions_in_a_session_pool(a.binary, a.model)
    finally:
        for x in (kv, rr):
            if x is not None:
                x.close()
        for b in backends:
            b.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return report(t0)


if __name__ == "__main__":
    sys.exit(main())
