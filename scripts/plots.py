#!/usr/bin/python3
"""Turns cachette's JSON output into PNG figures (Debian python3-matplotlib).

    /usr/bin/python3 scripts/plots.py --out docs/img ppl.json retrieval.json ...

(/usr/bin/python3: Debian's interpreter, the one python3-matplotlib is installed for.)

Each input file holds one JSON object per line (a file with one object is the common case).
Recognized today (one figure per kind of data present; nothing is drawn for data not given):
  - `cachette eval ppl --json`       -> eval-ppl-vs-bytes.png: perplexity vs KV bytes/token
  - `cachette eval retrieval --json` -> eval-accuracy-vs-bytes.png: accuracy vs KV bytes/token,
                                        overall and per task kind
  - `cachette bench workload|serve --out FILE` lines (one per request)
                                     -> workload-ttft-cdf.png: TTFT CDF per file and server
                                     -> workload-hit-rate.png: cumulative hit rate over time
  - `cachette bench cache --json` at several -p
                                     -> cache-ttft-vs-context.png: TTFT vs prompt length, cold
                                        and restored from each tier
Other objects are reported as skipped.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths):
    objs = []
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    objs.append((path, json.loads(line)))
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{n}: not valid JSON ({e})")
    return objs


def series_label(j):
    return f"{os.path.basename(j['model'])}, {j['kv_type']} KV"


def annotate(ax, rows, xkey, ykey):
    # Alternate above and below, so neighbours (X and zstd+X share a quality) stay legible.
    for i, r in enumerate(rows):
        ax.annotate(r["codec"] if not r["baseline"] else "exact", (r[xkey], r[ykey]),
                    textcoords="offset points", xytext=(4, 5 if i % 2 == 0 else -12),
                    fontsize=8)


def plot_ppl(runs, out):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j in runs:
        rows = sorted(j["results"], key=lambda r: r["bytes_per_token"])
        ax.plot([r["bytes_per_token"] for r in rows], [r["ppl"] for r in rows], "o-",
                label=f"{series_label(j)}, ctx {j['ctx']}, {j['n_scored']} tokens")
        annotate(ax, rows, "bytes_per_token", "ppl")
        base = next(r for r in j["results"] if r["baseline"])
        ax.axhline(base["ppl"], color="grey", lw=0.6, ls="--")
    ax.set_xlabel("KV bytes per token (encoded, all layers, K+V)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity vs KV bytes/token per codec")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_accuracy(runs, out):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j in runs:
        rows = sorted(j["results"], key=lambda r: r["bytes_per_token"])
        x = [r["bytes_per_token"] for r in rows]
        kinds = sorted(k for k in rows[0]["kinds"] if k != "all")
        ax.plot(x, [100 * r["accuracy"] for r in rows], "o-", lw=2,
                label=f"all ({rows[0]['kinds']['all']['n']}), {series_label(j)}")
        for r in rows:
            r["pct"] = 100 * r["accuracy"]
        annotate(ax, rows, "bytes_per_token", "pct")
        for k in kinds:
            ax.plot(x, [100 * r["kinds"][k]["accuracy"] for r in rows], ".--", lw=0.8,
                    label=f"{k} ({rows[0]['kinds'][k]['n']})")
    ax.set_xlabel("KV bytes per token (encoded, all layers, K+V)")
    ax.set_ylabel("exact-match accuracy, %")
    ax.set_ylim(-2, 102)
    ax.set_title("Long-context QA accuracy vs KV bytes/token per codec")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1, 0.12))  # the empty band
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def workload_series(objs):
    # (file, server) -> records in arrival order; only measured, successful requests.
    series = {}
    for path, j in objs:
        if j.get("status") != "ok" or not j.get("measured", True):
            continue
        key = f"{os.path.basename(path)}: {j.get('target', '?')}"
        series.setdefault(key, []).append(j)
    for rows in series.values():
        rows.sort(key=lambda r: r["arrival_s"])
    return series


def plot_ttft_cdf(series, out):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, rows in sorted(series.items()):
        t = sorted(r["ttft_ms"] for r in rows)
        ax.step(t, [(i + 1) / len(t) for i in range(len(t))], where="post", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution per workload and server")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_hit_rate(series, out):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, rows in sorted(series.items()):
        cached = prompt = 0
        xs, ys = [], []
        for r in rows:
            cached += r.get("cached_tokens", 0)
            prompt += r.get("prompt_tokens", 0)
            xs.append(r["arrival_s"])
            ys.append(100.0 * cached / max(prompt, 1))
        ax.plot(xs, ys, label=key)
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("cumulative hit rate (% of prompt tokens cached)")
    ax.set_title("Prefix hit rate over time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_cache_ttft(runs, out):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    runs = sorted(runs, key=lambda j: j["n_prompt"])
    xs = [j["n_prompt"] for j in runs]
    ax.plot(xs, [j["cold_ttft_ms"] for j in runs], "o-", label="cold prefill")
    for tier in ("ram", "disk", "redis"):
        pts = [(j["n_prompt"], j["restored"][tier]["ttft_ms"]) for j in runs
               if tier in j.get("restored", {})]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"restored from {tier}")
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms, log scale)")
    ax.set_title(f"TTFT vs context: {os.path.basename(runs[0]['model'])}, codec {runs[0]['codec']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/img", help="folder for the PNG files")
    ap.add_argument("inputs", nargs="+", help="JSON or JSON-lines files")
    a = ap.parse_args()
    objs = load(a.inputs)
    ppl = [j for _, j in objs if isinstance(j, dict) and j.get("eval") == "ppl"]
    ret = [j for _, j in objs if isinstance(j, dict) and j.get("eval") == "retrieval"]
    work = [(p, j) for p, j in objs if isinstance(j, dict) and "ttft_ms" in j and "arrival_s" in j]
    cache = [j for _, j in objs if isinstance(j, dict) and "cold_ttft_ms" in j]
    skipped = len(objs) - len(ppl) - len(ret) - len(work) - len(cache)
    os.makedirs(a.out, exist_ok=True)
    written = []
    if ppl:
        written.append(os.path.join(a.out, "eval-ppl-vs-bytes.png"))
        plot_ppl(ppl, written[-1])
    if ret:
        written.append(os.path.join(a.out, "eval-accuracy-vs-bytes.png"))
        plot_accuracy(ret, written[-1])
    if work:
        series = workload_series(work)
        written.append(os.path.join(a.out, "workload-ttft-cdf.png"))
        plot_ttft_cdf(series, written[-1])
        written.append(os.path.join(a.out, "workload-hit-rate.png"))
        plot_hit_rate(series, written[-1])
    if cache:
        written.append(os.path.join(a.out, "cache-ttft-vs-context.png"))
        plot_cache_ttft(cache, written[-1])
    for w in written:
        print(w)
    if skipped:
        print(f"skipped {skipped} objects with no plot yet", file=sys.stderr)
    if not written:
        sys.exit("no plottable data in the inputs")


if __name__ == "__main__":
    main()
