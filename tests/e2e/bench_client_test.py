#!/usr/bin/env python3
"""End-to-end test of the benchmark client (`cachette bench serve|workload`) against a real
`cachette serve` on a free loopback port with the bundled model (stdlib only).

Runs each workload kind in a smoke size and checks the JSON summary and the per-request JSON
lines; a repeated multi-round workload must show cached tokens; comparison mode must print
ratios; an unreachable URL must fail cleanly.

Usage: bench_client_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_test import FAILURES, Server, check, free_port, report  # noqa: E402,F401


SUMMARY_FIELDS = ("requests", "ok", "errors", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
                  "itl_p50_ms", "req_per_s", "gen_tok_per_s", "prompt_tokens", "cached_tokens",
                  "hit_rate", "cached_tokens_by_tier", "by_tag")
RECORD_FIELDS = ("arrival_s", "ttft_ms", "itl_mean_ms", "prompt_tokens", "completion_tokens",
                 "cached_tokens", "cached_tokens_by_tier", "status", "tag", "target")

# Smoke sizes: each kind runs in a few seconds on 2 cores with the tiny model.
SMOKE = {
    "multi-round-qa": ["--users", "3", "--rounds", "2", "--qps", "20", "--system-tokens", "80",
                       "--question-tokens", "10"],
    "long-doc-qa": ["--documents", "2", "--document-tokens", "150", "--queries", "4",
                    "--hit-miss", "1:1", "--question-tokens", "8"],
    "agentic": ["--programs", "2", "--turns", "3", "--tool-ms", "50", "--qps", "20",
                "--system-tokens", "60", "--tool-output-tokens", "20"],
    "rag": ["--requests", "4", "--chunks", "8", "--chunk-tokens", "40", "--qps", "20",
            "--system-tokens", "60"],
}


def bench(binary, sub, url, args, out):
    cmd = [binary, "bench"] + sub + ["--url", url, "--max-tokens", "4", "--seed", "3", "--json",
                                      "--out", out] + args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if not check(p.returncode == 0, "%s exited %d: %s" % (" ".join(sub), p.returncode,
                                                         p.stderr[-2000:])):
        return None, []
    summary = json.loads(p.stdout)
    with open(out) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return summary, records


def check_run(name, summary, records, n_expected):
    run = summary["runs"][0]["summary"]
    for k in SUMMARY_FIELDS:
        check(k in run, "%s: summary has %s" % (name, k))
    check(run["errors"] == 0, "%s: no errors (%s)" % (name, run.get("first_errors")))
    check(len(records) == n_expected, "%s: %d records, want %d" % (name, len(records),
                                                                     n_expected))
    for r in records:
        for k in RECORD_FIELDS:
            check(k in r, "%s: record has %s" % (name, k))
        check(r["status"] == "ok", "%s: record status %s %s" % (name, r["status"],
                                                                 r.get("error")))
        check(r["ttft_ms"] is not None and r["ttft_ms"] > 0, "%s: ttft > 0" % name)
        check(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0, "%s: tokens" % name)
    check(run["ttft_p50_ms"] <= run["ttft_p99_ms"], "%s: p50 <= p99" % name)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="cachette-bench-client-")
    out = os.path.join(tmp, "requests.jsonl")
    s = Server(a.binary, a.model, "--kv-budget", "64MiB", "--max-running", "8")
    try:
        expected = {"multi-round-qa": 6, "long-doc-qa": 6, "agentic": 6, "rag": 4}
        for kind, args in SMOKE.items():
            t = time.time()
            summary, records = bench(a.binary, ["workload", "--kind", kind], s.url, args, out)
            if summary is None:
                continue
            check(summary["workload"]["kind"] == kind, kind + ": workload echoed")
            run = check_run(kind, summary, records, expected[kind])
            if kind == "multi-round-qa":
                # Round 2 extends round 1's conversation: its prefix is cached.
                check(run["cached_tokens"] > 0, "multi-round-qa: cached tokens > 0")
                check(run["by_tag"]["round-2"]["hit_rate"] > 0.5, "round 2 mostly cached")
                check(run["cached_tokens_by_tier"].get("memory", 0) > 0, "memory tier counted")
            if kind == "long-doc-qa":
                check(sum(1 for r in records if not r["measured"]) == 2, "two warm-up reads")
                check(run["requests"] == 4, "the summary counts only the query round")
                check(run["by_tag"]["hit"]["hit_rate"] > run["by_tag"]["miss"]["hit_rate"],
                      "long-doc-qa: hits hit more than misses")
            print("%-16s %.2f s  ttft p50 %.1f ms  hit rate %.2f" % (
                kind, time.time() - t, run["ttft_p50_ms"], run["hit_rate"]), flush=True)

        # The same seed run again (bench serve = multi-round-qa), compared with itself: B sees
        # the prefixes A left in the cache, and every figure has a ratio.
        summary, records = bench(a.binary, ["serve"], s.url, SMOKE["multi-round-qa"] +
                                 ["--compare-url", s.url], out)
        if summary is not None:
            check(len(summary["runs"]) == 2, "compare: two runs")
            check("ttft_p50_ms" in summary.get("ratio", {}), "compare: ratios")
            b = summary["runs"][1]["summary"]
            check(b["by_tag"]["round-1"]["hit_rate"] > 0.5,
                  "a repeated workload hits from its first round")
            check(sorted({r["target"] for r in records}) == ["A", "B"], "records per target")
        p = subprocess.run([a.binary, "bench", "serve", "--compare-url", s.url, "--url",
                            s.url, "--users", "1", "--rounds", "1", "--max-tokens", "2"],
                           capture_output=True, text=True, timeout=120)
        check(p.returncode == 0 and "B/A" in p.stdout, "compare table printed: " + p.stdout)

        # An unreachable server is one clean error, not a hang or a crash.
        p = subprocess.run([a.binary, "bench", "serve", "--url",
                            "http://127.0.0.1:%d" % free_port()],
                           capture_output=True, text=True, timeout=60)
        check(p.returncode == 1 and "error" in p.stderr, "unreachable URL: " + p.stderr)
    finally:
        s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return report(t0)


if __name__ == "__main__":
    sys.exit(main())
