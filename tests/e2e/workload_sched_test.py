#!/usr/bin/env python3
"""End-to-end test of the scheduling workloads of `cachette bench workload` (issue 16, item 6)
against a real `cachette serve` on a free loopback port with the bundled model (stdlib only).

Runs shared-prefix, deadline-mix and agentic with named tools in smoke sizes and checks that
the requests carried the scheduling fields (as the JSON lines record them), that the summary
has the goodput, priority-class, program and tool figures, and that the server's /metrics was
read (preemptions known, KV pages sampled, --kv-timeline written). It checks shapes, not
speed: which scheduler the server runs is not this test's business.

Usage: workload_sched_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
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
from serve_test import FAILURES, Server, check, report  # noqa: E402,F401

SMOKE = {
    "shared-prefix": ["--groups", "2", "--prompts-per-group", "3", "--system-tokens", "120",
                      "--question-tokens", "8"],
    "deadline-mix": ["--requests", "8", "--qps", "20", "--deadline-ms", "60000",
                     "--deadline-priority", "--interactive-share", "0.5",
                     "--background-tokens", "150", "--background-max-tokens", "12",
                     "--question-tokens", "8"],
    "agentic": ["--programs", "2", "--turns", "3", "--tools", "search:30,code:60", "--qps", "20",
                "--system-tokens", "60", "--tool-output-tokens", "10"],
}
SCHED_FIELDS = ("met_objective", "goodput_req_per_s", "goodput_tok_per_s", "goodput_fraction",
                "by_priority", "programs_completed", "program_completion_p50_ms", "by_tool",
                "preemptions", "preemptions_known", "kv_used_peak", "kv_used_mean", "kv_total",
                "server_notes", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms")


def bench(binary, url, kind, args, out, timeline):
    cmd = [binary, "bench", "workload", "--kind", kind, "--url", url, "--max-tokens", "4",
           "--seed", "5", "--json", "--out", out, "--kv-timeline", timeline,
           "--metrics-every-ms", "10"] + args  # some runs take ~50 ms: sample them often
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not check(p.returncode == 0, "%s exited %d: %s" % (kind, p.returncode, p.stderr[-2000:])):
        return None, [], []
    summary = json.loads(p.stdout)
    with open(out) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(timeline) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    return summary["runs"][0]["summary"], records, samples


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="cachette-workload-sched-")
    out = os.path.join(tmp, "requests.jsonl")
    timeline = os.path.join(tmp, "kv.jsonl")
    s = Server(a.binary, a.model, "--kv-budget", "64MiB", "--max-running", "8")
    try:
        for kind, args in SMOKE.items():
            t = time.time()
            run, records, samples = bench(a.binary, s.url, kind, args, out, timeline)
            if run is None:
                continue
            for k in SCHED_FIELDS:
                check(k in run, "%s: summary has %s" % (kind, k))
            check(run["errors"] == 0, "%s: no errors (%s)" % (kind, run.get("first_errors")))
            check(all(r["status"] == "ok" for r in records), kind + ": every record ok")
            # /metrics of a cachette server has both series.
            check(run["preemptions_known"], "%s: preemptions read (%s)" % (kind,
                                                                           run["server_notes"]))
            check(run["kv_samples"] >= 1 and run["kv_total"] > 0, kind + ": KV pages sampled")
            check(run["kv_used_peak"] >= run["kv_used_mean"] > 0, kind + ": KV pages used")
            check(len(samples) >= 1 and all("used" in x and "t_s" in x for x in samples),
                  kind + ": --kv-timeline written")

            if kind == "shared-prefix":
                tags = [r["tag"] for r in records]
                check(sorted(tags) == ["group-0"] * 3 + ["group-1"] * 3,
                      "shared-prefix: 2 groups x 3 (%s)" % tags)
                check(run["met_objective"] == 6 and run["goodput_fraction"] == 1,
                      "shared-prefix: every request without a deadline counts when ok")
            elif kind == "deadline-mix":
                inter = [r for r in records if r["tag"] == "interactive"]
                back = [r for r in records if r["tag"] == "background"]
                check(len(inter) + len(back) == 8 and inter and back,
                      "deadline-mix: both classes (%d, %d)" % (len(inter), len(back)))
                check(all(r.get("deadline_ms") == 60000 and r.get("priority") == 1
                          for r in inter), "deadline-mix: interactive carry deadline, priority")
                check(all("deadline_ms" not in r and "priority" not in r for r in back),
                      "deadline-mix: background carry neither")
                check(run["with_deadline"] == len(inter), "deadline-mix: with_deadline")
                check(sorted(run["by_priority"]) == ["0", "1"], "deadline-mix: two classes")
                check(run["met_objective"] == 8, "deadline-mix: a 60 s objective is met")
            elif kind == "agentic":
                ids = {r["program_id"] for r in records}
                check(len(ids) == 2 and all(i.startswith("s5-p") for i in ids),
                      "agentic: one id per program with the seed (%s)" % ids)
                check(all(("tool" in r) == (r["turn"] < 2) for r in records),
                      "agentic: a tool on every turn but the last")
                check(all(r["tool"] in ("search", "code") for r in records if "tool" in r),
                      "agentic: tools from --tools")
                check(run["programs_completed"] == 2, "agentic: both programs completed")
                check(run["program_completion_p50_ms"] > 0, "agentic: completion time")
                calls = sum(t["calls"] for t in run["by_tool"].values())
                check(calls == 4, "agentic: 4 tool calls (%s)" % run["by_tool"])
            print("%-14s %.2f s  ttft p50 %.1f ms  goodput %.2f req/s  kv peak %s" % (
                kind, time.time() - t, run["ttft_p50_ms"], run["goodput_req_per_s"],
                run["kv_used_peak"]), flush=True)

        # Two runs of the same agentic seed never share a program id (the run nonce).
        first = {r["program_id"] for r in records} if records else set()
        run, records, _ = bench(a.binary, s.url, "agentic", SMOKE["agentic"], out, timeline)
        if run is not None:
            check(first.isdisjoint({r["program_id"] for r in records}),
                  "agentic: a second run uses fresh program ids")
    finally:
        s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return report(t0)


if __name__ == "__main__":
    sys.exit(main())
