#!/usr/bin/python3
"""Turns cachette's JSON output into PNG figures (Debian python3-matplotlib).

    /usr/bin/python3 scripts/plots.py --out docs/img ppl.json retrieval.json ...

(/usr/bin/python3: Debian's interpreter, the one python3-matplotlib is installed for.)

Each input file holds one JSON object per line (a file with one object is the common case).
Recognized today (one figure per kind of data present; nothing is drawn for data not given):
  - `cachette eval ppl --json`       -> eval-ppl-vs-bytes.png: perplexity vs KV bytes/token
    (rows with "codec")
  - `cachette eval retrieval --json` -> eval-accuracy-vs-bytes.png: accuracy vs KV bytes/token,
    (rows with "codec")                 overall and per task kind
  - `cachette eval ppl --json`       -> kv-policy-ppl-vs-budget.png: perplexity as a ratio to
    (rows with "kv_policy")             full KV vs budget, one line per policy
  - `cachette eval retrieval --json` -> kv-policy-accuracy-vs-budget.png: accuracy vs budget
    (rows with "kv_policy")             per policy, full KV as a horizontal line; one panel
                                        for all questions and one per task kind
  - `cachette eval stream --json`    -> kv-policy-streaming.png: perplexity per window with the
                                        policy and with full KV restarting at each window
  - `cachette bench workload|serve --out FILE` lines (one per request)
                                     -> workload-ttft-cdf.png: TTFT CDF per file and server
                                     -> workload-hit-rate.png: cumulative hit rate over time
  - `cachette bench cache --json` at several -p
                                     -> cache-ttft-vs-context.png: TTFT vs prompt length, cold
                                        and restored from each tier
  - `cachette eval rag --json`       -> rag-vs-recompute.png: accuracy, agreement with full
                                        prefill and first-token KL vs the recomputed share of
                                        the reused tokens, per reuse mode
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


# KV budget policies (`--kv-policy`): rows carry "kv_policy" and "budget" in place of "codec".
# One colour and marker per policy, in the order of kv_policy.h, so the figures agree.
POLICY_ORDER = ["streamingllm", "h2o", "snapkv", "pyramidkv", "cake", "lacache", "elastic",
                "blockwise"]
MARKERS = "os^vDP*X"


def is_policy_run(j):
    return any("kv_policy" in r for r in j.get("results", []))


def policy_style(name):
    i = POLICY_ORDER.index(name) if name in POLICY_ORDER else len(POLICY_ORDER)
    return {"color": plt.get_cmap("tab10")(i % 10), "marker": MARKERS[i % len(MARKERS)]}


def policy_rows(j):
    # policy -> its rows sorted by budget; the full-KV baseline apart.
    by_policy = {}
    for r in j["results"]:
        if not r["baseline"]:
            by_policy.setdefault(r["kv_policy"], []).append(r)
    for rows in by_policy.values():
        rows.sort(key=lambda r: r["budget"])
    order = sorted(by_policy, key=lambda n: (POLICY_ORDER.index(n) if n in POLICY_ORDER
                                             else len(POLICY_ORDER), n))
    base = next(r for r in j["results"] if r["baseline"])
    return [(n, by_policy[n]) for n in order], base


def budget_axis(ax, runs):
    # Budgets below 1 are fractions of each prompt (drawn as %), 1 or more token counts.
    budgets = {r["budget"] for j in runs for r in j["results"] if not r["baseline"]}
    ax.set_xscale("log")
    if all(b < 1 for b in budgets):
        ticks = sorted(budgets)
        ax.set_xticks(ticks, [f"{100 * b:g}%" for b in ticks])
        ax.minorticks_off()
        ax.set_xlabel("KV budget (share of the prompt kept)")
    else:
        ax.set_xlabel("KV budget (tokens per layer and head; below 1: share of the prompt)")


def run_note(j, extra):
    return f"{os.path.basename(j['model'])}, {j['kv_type']} KV, {extra}"


def plot_policy_ppl(runs, out):
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, j in enumerate(runs):
        rows_by_policy, base = policy_rows(j)
        prefix = f"run {k + 1}: " if len(runs) > 1 else ""
        for name, rows in rows_by_policy:
            ax.plot([r["budget"] for r in rows], [r["ppl_ratio"] for r in rows], lw=1.2,
                    ms=5, label=prefix + name, **policy_style(name))
    ax.axhline(1.0, color="black", lw=0.8, ls="--",
               label="full KV" if len(runs) > 1 else f"full KV (ppl {base['ppl']:.2f})")
    budget_axis(ax, runs)
    ax.set_ylabel("perplexity / full-KV perplexity (lower is better)")
    j = runs[0]
    ax.set_title(f"Perplexity vs KV budget per policy\n"
                 f"{run_note(j, 'ctx %d, %d tokens scored' % (j['ctx'], j['n_scored']))}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_policy_accuracy(runs, out):
    # One panel for all questions, then one per task kind present in the runs.
    kinds = sorted({k for j in runs for r in j["results"] for k in r["kinds"] if k != "all"})
    panels = ["all"] + kinds
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 3.3 * nrow), squeeze=False)
    for i, (ax, kind) in enumerate(zip(axes.flat, panels)):
        n = 0
        for k, j in enumerate(runs):
            rows_by_policy, base = policy_rows(j)
            if kind not in base["kinds"]:
                continue
            prefix = f"run {k + 1}: " if len(runs) > 1 else ""
            for name, rows in rows_by_policy:
                ax.plot([r["budget"] for r in rows],
                        [100 * r["kinds"][kind]["accuracy"] for r in rows], lw=1.2, ms=4,
                        label=prefix + name, **policy_style(name))
            ax.axhline(100 * base["kinds"][kind]["accuracy"], color="black", lw=0.8, ls="--",
                       label=prefix + "full KV")
            n = base["kinds"][kind]["n"]
        ax.set_title(f"{kind} ({n} questions)", fontsize=10)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3, which="both")
        budget_axis(ax, runs)
        if i + ncol < len(panels):  # a panel below carries the axis title
            ax.set_xlabel("")
        if i % ncol == 0:
            ax.set_ylabel("exact-match accuracy, %")
    spare = list(axes.flat)[len(panels):]
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:
        for ax in spare:
            ax.axis("off")
        spare[0].legend(handles, labels, loc="center", fontsize=9, ncol=2)
    else:
        axes.flat[0].legend(handles, labels, fontsize=7, ncol=2)
    j = runs[0]
    fig.suptitle(f"Long-context QA accuracy vs KV budget per policy "
                 f"({run_note(j, '%d questions scored' % j['n_scored'])})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_streaming(runs, out):
    # Top: perplexity per window, which moves with the text itself; bottom: the policy's over
    # the restarting baseline's on the same tokens, which does not.
    fig, (ax, rax) = plt.subplots(2, 1, figsize=(6.4, 5.4), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.3]})
    for k, j in enumerate(runs):
        w = j["windows"]
        # x: the window's last scored token, so the axis reads as tokens read so far.
        x = [r["first_token"] + r["n_scored"] for r in w]
        prefix = f"run {k + 1}: " if len(runs) > 1 else ""
        line, = ax.plot(x, [r["ppl"] for r in w], "o-",
                        label=f"{prefix}{j['kv_policy']}, KV <= {j['max_kv_tokens']} tokens")
        ax.axhline(w[0]["ppl"] * 1.1, color=line.get_color(), lw=0.6, ls=":",
                   label=f"{prefix}its first window + 10%")
        if all("full_restart_ppl" in r for r in w):
            ax.plot(x, [r["full_restart_ppl"] for r in w], "s--", lw=0.9, ms=4,
                    label=f"{prefix}full KV, context restarting at each window")
            rax.plot(x, [r["ppl"] / r["full_restart_ppl"] for r in w], "o-", ms=4,
                     color=line.get_color())
    rax.axhline(1.0, color="black", lw=0.6, ls="--")
    rax.set_ylabel("policy / restart")
    rax.set_xlabel("tokens read (end of each window)")
    rax.grid(alpha=0.3)
    ax.set_ylabel("perplexity per window (lower is better)")
    j = runs[0]
    rss = max(r["peak_rss_bytes"] for r in j["windows"]) / 2**20
    ax.set_title(f"Streaming past the context: {j['kv_policy']}, cache {j['cache']}\n"
                 f"{run_note(j, '%d tokens, peak RSS %.0f MiB' % (j['n_scored'], rss))}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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


def plot_rag(runs, out):
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for j in runs:
        rows = j["results"]
        label = series_label(j)
        full = next((r for r in rows if r["mode"] == "full"), None)
        panels = [("accuracy", "exact-match accuracy (%)", 100),
                  ("agreement_with_full", "answers equal to full prefill's (%)", 100),
                  ("first_token_kl_vs_full", "KL(full || mode), first answer token (nats)", 1)]
        for ax, (key, ylabel, scale) in zip(axes, panels):
            if full is not None and full.get(key) is not None:
                ax.axhline(full[key] * scale, color="k", lw=1, ls="--", label="full prefill")
            for mode, style in (("blend", "o-"), ("cachecraft", "s-")):
                pts = sorted((r["recomputed_share"] * 100, r[key] * scale) for r in rows
                             if r["mode"] == mode and r.get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                            label=f"{mode}, {label}" if len(runs) > 1 else mode)
            for mode, marker in (("naive", "x"), ("ape", "^"), ("prefix", "D")):
                for r in rows:
                    if r["mode"] == mode and r.get(key) is not None:
                        ax.plot([r["recomputed_share"] * 100], [r[key] * scale], marker,
                                markersize=9, label=mode)
            ax.set_xlabel("recomputed share of the reused document tokens (%)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
    j = runs[0]
    fig.suptitle(f"Documents reused anywhere in the prompt: {os.path.basename(j['model'])}, "
                 f"{j['kv_type']} KV, {j['n_scored']} questions of {os.path.basename(j['source'])}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/img", help="folder for the PNG files")
    ap.add_argument("inputs", nargs="+", help="JSON or JSON-lines files")
    a = ap.parse_args()
    objs = load(a.inputs)
    evals = [j for _, j in objs if isinstance(j, dict) and j.get("eval") in ("ppl", "retrieval")]
    ppl = [j for j in evals if j["eval"] == "ppl" and not is_policy_run(j)]
    ret = [j for j in evals if j["eval"] == "retrieval" and not is_policy_run(j)]
    policy_ppl = [j for j in evals if j["eval"] == "ppl" and is_policy_run(j)]
    policy_ret = [j for j in evals if j["eval"] == "retrieval" and is_policy_run(j)]
    stream = [j for _, j in objs if isinstance(j, dict) and j.get("eval") == "stream"]
    work = [(p, j) for p, j in objs if isinstance(j, dict) and "ttft_ms" in j and "arrival_s" in j]
    cache = [j for _, j in objs if isinstance(j, dict) and "cold_ttft_ms" in j]
    rag = [j for _, j in objs if isinstance(j, dict) and j.get("eval") == "rag"]
    skipped = len(objs) - len(evals) - len(stream) - len(work) - len(cache) - len(rag)
    os.makedirs(a.out, exist_ok=True)
    series = workload_series(work) if work else {}
    plots = [  # (input objects, file, plotter), in the order they are written
        (ppl, "eval-ppl-vs-bytes.png", plot_ppl),
        (ret, "eval-accuracy-vs-bytes.png", plot_accuracy),
        (policy_ppl, "kv-policy-ppl-vs-budget.png", plot_policy_ppl),
        (policy_ret, "kv-policy-accuracy-vs-budget.png", plot_policy_accuracy),
        (stream, "kv-policy-streaming.png", plot_streaming),
        (work, "workload-ttft-cdf.png", lambda _, path: plot_ttft_cdf(series, path)),
        (work, "workload-hit-rate.png", lambda _, path: plot_hit_rate(series, path)),
        (cache, "cache-ttft-vs-context.png", plot_cache_ttft),
        (rag, "rag-vs-recompute.png", plot_rag),
    ]
    written = []
    for data, name, plot in plots:
        if data:
            written.append(os.path.join(a.out, name))
            plot(data, written[-1])
    for w in written:
        print(w)
    if skipped:
        print(f"skipped {skipped} objects with no plot yet", file=sys.stderr)
    if not written:
        sys.exit("no plottable data in the inputs")


if __name__ == "__main__":
    main()
