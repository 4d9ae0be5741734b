#!/usr/bin/python3
"""Turns cachette's JSON output into PNG figures (Debian python3-matplotlib).

    /usr/bin/python3 scripts/plots.py --out docs/img ppl.json retrieval.json ...

(/usr/bin/python3: Debian's interpreter, the one python3-matplotlib is installed for.)

Each input file holds one JSON object per line (a file with one object is the common case).
Recognized today (one figure per kind of data present; nothing is drawn for data not given):
  - `cachette eval ppl --json`       -> eval-ppl-vs-bytes.png: perplexity vs KV bytes/token
  - `cachette eval retrieval --json` -> eval-accuracy-vs-bytes.png: accuracy vs KV bytes/token,
                                        overall and per task kind
Other objects are reported as skipped, so workload JSON lines can be added here as their
plots are written.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/img", help="folder for the PNG files")
    ap.add_argument("inputs", nargs="+", help="JSON or JSON-lines files")
    a = ap.parse_args()
    objs = load(a.inputs)
    ppl = [j for _, j in objs if isinstance(j, dict) and j.get("eval") == "ppl"]
    ret = [j for _, j in objs if isinstance(j, dict) and j.get("eval") == "retrieval"]
    skipped = len(objs) - len(ppl) - len(ret)
    os.makedirs(a.out, exist_ok=True)
    written = []
    if ppl:
        written.append(os.path.join(a.out, "eval-ppl-vs-bytes.png"))
        plot_ppl(ppl, written[-1])
    if ret:
        written.append(os.path.join(a.out, "eval-accuracy-vs-bytes.png"))
        plot_accuracy(ret, written[-1])
    for w in written:
        print(w)
    if skipped:
        print(f"skipped {skipped} objects with no plot yet", file=sys.stderr)
    if not written:
        sys.exit("no plottable data in the inputs")


if __name__ == "__main__":
    main()
