#!/usr/bin/env python3
"""Soak test of `cachette serve` (issue 9): the real binary under `cachette bench soak`.

Starts the server with the bundled model, a small KV budget, a RAM tier and a disk tier, then
runs `cachette bench soak` against it for $SOAK_SECONDS (45 by default) with 64 clients and the
server's pid, and checks: the soak exits 0 (no 5xx, no connection or stream errors, RSS never
above the KV and RAM budgets plus the model file plus a fixed overhead), the mix really ran
(2xx, 4xx and abandoned requests all counted), the server still answers /health afterwards, and
it exits 0 on SIGTERM. The RSS figures are printed for docs/benchmarks.md.

Usage: soak_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # importing serve_test must not leave __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_test import FAILURES, Server, check, report  # noqa: E402

MIB = 1 << 20
KV_BUDGET = 32 * MIB
RAM_BUDGET = 64 * MIB
# Threads, allocator arenas, the tokenizer, HTTP buffers, the disk tier's files in flight: what
# the server holds beyond its budgets and its weights. Measured peaks are far below (see
# docs/benchmarks.md); a leak of a few KiB per request over a long run is not.
FIXED_OVERHEAD = 256 * MIB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 45)))
    ap.add_argument("--clients", type=int, default=64)
    a = ap.parse_args()
    t0 = time.time()
    disk = tempfile.mkdtemp(prefix="cachette-soak-disk-")
    limit = KV_BUDGET + RAM_BUDGET + os.path.getsize(a.model) + FIXED_OVERHEAD
    s = Server(a.binary, a.model, "--kv-budget", "%dMiB" % (KV_BUDGET // MIB), "--ram-budget",
               "%dMiB" % (RAM_BUDGET // MIB), "--disk-dir", disk, "--disk-budget", "256MiB")
    try:
        cmd = [a.binary, "bench", "soak", "--url", s.url, "--duration", str(a.seconds),
               "--clients", str(a.clients), "--seed", "9", "--pid", str(s.proc.pid),
               "--rss-limit", str(limit), "--json"]
        print("$ " + " ".join(cmd), flush=True)
        soak = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds + 150)
        check(soak.returncode == 0, "bench soak exits 0 (rc %d): %s %s"
              % (soak.returncode, soak.stdout[-3000:], soak.stderr[-2000:]))
        try:
            r = json.loads(soak.stdout)
        except ValueError:
            r = None
        if check(r is not None, "bench soak prints one JSON object: %r" % soak.stdout[-500:]):
            t = r["tally"]
            c = t["classes"]
            print("requests %d in %.1f s (%.1f/s), classes %s, statuses %s"
                  % (t["requests"], r["wall_s"], r["requests_per_s"], c, t["statuses"]))
            rss = r["rss"] or {}
            if check(rss.get("samples", 0) >= a.seconds / 2, "RSS sampled every second: %s"
                     % rss):
                print("RSS start %.1f MiB, max %.1f MiB, end %.1f MiB, late slope %+.3f MiB/min,"
                      " limit %.1f MiB" % (rss["start_bytes"] / MIB, rss["max_bytes"] / MIB,
                                           rss["end_bytes"] / MIB,
                                           rss["late_slope_bytes_per_s"] * 60 / MIB,
                                           limit / MIB))
            print("metrics max %s end %s" % (r["metrics"]["max"], r["metrics"]["end"]))
            check(c["5xx"] == 0 and t["failures"] == 0, "no 5xx and no failures: %s %s"
                  % (c, t["failure_notes"]))
            check(not rss.get("over_limit", True), "RSS within %d MiB" % (limit // MIB))
            check(t["requests"] >= 50, "the soak sent requests: %d" % t["requests"])
            check(c["2xx"] > 0 and c["4xx"] > 0 and c["abandoned"] > 0,
                  "successes, refusals of malformed requests and disconnects all ran: %s" % c)
            check(r["metrics"]["reads"] >= a.seconds / 2, "/metrics read while soaking")
        check(s.healthy(), "the server answers /health after the soak")
        s.proc.send_signal(signal.SIGTERM)
        try:
            rc = s.proc.wait(60)
        except subprocess.TimeoutExpired:
            rc = None
        check(rc == 0, "SIGTERM after the soak exits cleanly (rc %s)" % rc)
    finally:
        s.close()
        shutil.rmtree(disk, ignore_errors=True)
    return report(t0)


if __name__ == "__main__":
    sys.exit(main())
