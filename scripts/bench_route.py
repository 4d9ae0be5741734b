#!/usr/bin/env python3
"""The routing benchmark of issue 14 (docs/benchmarks.md "Routing"), one run on loopback:

  1. Three `cachette serve` backends (bundled model, --kv-events, a KV pool that holds about a
     third of the workload's conversations) behind `cachette route`, and
     `cachette bench workload --kind multi-round-qa` with more users than one backend's KV holds;
     for each --policy (kv, approx, round-robin, least-loaded) on fresh backends: hit rate, TTFT
     p50/p99, requests/s, and the router's predicted vs the backends' reported cached tokens.
  2. The same with --policy kv while one backend is killed (SIGKILL) mid-run: failed requests.
  3. The router's own cost: sequential one-token requests direct to a backend and through the
     router (added latency p50), concurrent ones (requests/s both ways, and the router's CPU
     time per request: its capacity per core), and the router's decision time p50 (its
     /metrics).

Usage: scripts/bench_route.py [--binary build/release/src/cli/cachette] [--users 24] [--rounds 8]
       [--qps 4] [--kv-budget 24MiB] [--json out.json]
"""
import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from e2e_util import Process, free_port  # noqa: E402


def get(url, path):
    host, port = url[len("http://"):].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", path)
    return c.getresponse().read().decode()


def backends(a, logdir, n=3):
    out = []
    for _ in range(n):
        ev = free_port(pair=True)
        out.append(Process([a.binary, "serve", "--kv-budget", a.kv_budget, "--threads", "1",
                            "--max-running", "8", "--kv-events", "tcp://127.0.0.1:%d" % ev],
                           "backend", logdir, timeout=60))
    return out


def router(a, urls, policy, logdir):
    args = [a.binary, "route", "--policy", policy, "--health-interval-ms", "200"]
    for u in urls:
        args += ["--backend", u]
    r = Process(args, "route-" + policy, logdir, timeout=60)
    if policy == "kv":  # wait for the event subscriptions' snapshots
        deadline = time.time() + 10
        while time.time() < deadline:
            bs = json.loads(get(r.url, "/v1/router/backends"))["backends"]
            if all(b.get("events", {}).get("synced") for b in bs):
                break
            time.sleep(0.05)
    return r


def workload(a, url, extra=()):
    args = [a.binary, "bench", "workload", "--kind", "multi-round-qa", "--url", url,
            "--users", str(a.users), "--rounds", str(a.rounds), "--qps", str(a.qps),
            "--system-tokens", str(a.system_tokens), "--question-tokens", str(a.question_tokens),
            "--max-tokens", str(a.max_tokens), "--seed", "7", "--json"] + list(extra)
    p = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError("bench workload failed: " + p.stderr[-2000:])
    return json.loads(p.stdout)["runs"][0]["summary"]


def metric(text, series):
    m = re.search(r"^" + re.escape(series) + r" ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def sum_metric(text, name):
    return sum(float(v) for v in re.findall(r"^" + re.escape(name) + r"\{[^}]*\} ([0-9.eE+-]+)$",
                                             text, re.M))


def one_request(url, body):
    host, port = url[len("http://"):].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    t = time.perf_counter()
    c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    dt = time.perf_counter() - t
    c.close()
    return r.status, dt


def overhead(a, logdir):
    b = backends(a, logdir, 1)[0]
    r = router(a, [b.url], "kv", logdir)
    try:
        body = json.dumps({"model": "cachette-tiny-q8_0", "prompt": "The quick brown fox " * 20,
                           "max_tokens": 1, "temperature": 0})
        for _ in range(20):  # warm both paths (the prompt gets cached on the backend)
            one_request(b.url, body)
            one_request(r.url, body)
        direct, routed = [], []
        for _ in range(a.overhead_requests):  # interleaved, so drift hits both alike
            direct.append(one_request(b.url, body)[1])
            routed.append(one_request(r.url, body)[1])
        out = {"direct_p50_ms": statistics.median(direct) * 1e3,
               "routed_p50_ms": statistics.median(routed) * 1e3}
        out["added_p50_ms"] = out["routed_p50_ms"] - out["direct_p50_ms"]

        def rate(url, n, threads=16):
            done = [0]
            lock = threading.Lock()

            def worker():
                while True:
                    with lock:
                        if done[0] >= n:
                            return
                        done[0] += 1
                    one_request(url, body)

            t = time.perf_counter()
            ts = [threading.Thread(target=worker) for _ in range(threads)]
            for x in ts:
                x.start()
            for x in ts:
                x.join()
            return n / (time.perf_counter() - t)

        def cpu_s(proc):  # user + system CPU seconds of a process so far
            f = open("/proc/%d/stat" % proc.proc.pid).read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

        n = 600
        out["direct_req_per_s"] = rate(b.url, n)
        before = cpu_s(r)
        out["routed_req_per_s"] = rate(r.url, n)
        # The router's own capacity: its CPU time per request (the rates above are bounded by
        # the backend and the Python client sharing the same cores).
        out["router_cpu_ms_per_request"] = (cpu_s(r) - before) / n * 1e3
        m = get(r.url, "/metrics")
        out["decision_p50_us"] = metric(m, 'cachette_route_decision_seconds{quantile="0.5"}') * 1e6
        return out
    finally:
        r.stop()
        b.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "build/release/src/cli/cachette"))
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--qps", type=float, default=4)
    ap.add_argument("--system-tokens", type=int, default=100)
    ap.add_argument("--question-tokens", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kv-budget", default="24MiB")
    ap.add_argument("--policies", default="kv,approx,round-robin,least-loaded")
    ap.add_argument("--kill-after-s", type=float, default=15)
    ap.add_argument("--overhead-requests", type=int, default=300)
    ap.add_argument("--json", help="write every figure here")
    a = ap.parse_args()
    logdir = tempfile.mkdtemp(prefix="cachette-bench-route-")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    print("# cachette route benchmark: %s, %d cores; 3 backends x --kv-budget %s, %d users x %d "
          "rounds at %.1f rounds/s (system %d, question %d, answer %d tokens); logs in %s" %
          (cpu, os.cpu_count(), a.kv_budget, a.users, a.rounds, a.qps, a.system_tokens,
           a.question_tokens, a.max_tokens, logdir), flush=True)
    results = {"cpu": cpu, "args": vars(a), "policies": {}}
    print("| policy | hit rate | TTFT p50 ms | TTFT p99 ms | req/s | errors | predicted / reported "
          "cached tokens |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for policy in a.policies.split(","):
        bs = backends(a, logdir)
        r = router(a, [b.url for b in bs], policy, logdir)
        try:
            s = workload(a, r.url)
            m = get(r.url, "/metrics")
            pred = sum_metric(m, "cachette_route_backend_predicted_hit_tokens_total")
            rep = sum_metric(m, "cachette_route_backend_cached_tokens_total")
            results["policies"][policy] = dict(s, predicted=pred, reported=rep)
            print("| %s | %.3f | %.0f | %.0f | %.2f | %d | %d / %d |" %
                  (policy, s["hit_rate"], s["ttft_p50_ms"], s["ttft_p99_ms"], s["req_per_s"],
                   s["errors"], pred, rep), flush=True)
        finally:
            r.stop()
            for b in bs:
                b.stop()
    p = results["policies"]
    if "kv" in p and "round-robin" in p:
        rr, kv = p["round-robin"], p["kv"]
        print("\nkv vs round-robin: hit rate %.2fx, TTFT p50 %.2fx lower, p99 %.2fx lower" %
              (kv["hit_rate"] / max(rr["hit_rate"], 1e-9),
               rr["ttft_p50_ms"] / max(kv["ttft_p50_ms"], 1e-9),
               rr["ttft_p99_ms"] / max(kv["ttft_p99_ms"], 1e-9)), flush=True)

    # 2. A backend killed mid-run.
    bs = backends(a, logdir)
    r = router(a, [b.url for b in bs], "kv", logdir)
    try:
        killer = threading.Timer(a.kill_after_s, bs[1].stop)
        killer.start()
        s = workload(a, r.url)
        killer.join()
        m = get(r.url, "/metrics")
        results["killed"] = dict(s, router_failures=metric(m, "cachette_route_failures_total"),
                                 retries=sum_metric(m, "cachette_route_backend_retries_total"),
                                 stream_errors=sum_metric(
                                     m, "cachette_route_backend_stream_errors_total"))
        k = results["killed"]
        print("\nkv with one backend killed after %.0f s: %d requests, %d failed (%d streams cut "
              "mid-way, %d retried before any byte), hit rate %.3f, TTFT p50 %.0f ms" %
              (a.kill_after_s, k["requests"], k["errors"], k["stream_errors"], k["retries"],
               k["hit_rate"], k["ttft_p50_ms"]), flush=True)
    finally:
        r.stop()
        for b in bs:
            b.stop()

    # 3. The router's own cost.
    o = overhead(a, logdir)
    results["overhead"] = o
    print("\nrouter overhead (1 backend, one-token completions): p50 %.2f ms direct, %.2f ms "
          "routed (+%.2f ms); decision p50 %.0f us; %.0f req/s direct, %.0f routed (%.2fx); "
          "router CPU %.3f ms per request (%.0f req/s per core)" %
          (o["direct_p50_ms"], o["routed_p50_ms"], o["added_p50_ms"], o["decision_p50_us"],
           o["direct_req_per_s"], o["routed_req_per_s"],
           o["routed_req_per_s"] / max(o["direct_req_per_s"], 1e-9),
           o["router_cpu_ms_per_request"], 1e3 / max(o["router_cpu_ms_per_request"], 1e-9)),
          flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
