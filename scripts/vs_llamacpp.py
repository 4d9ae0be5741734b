#!/usr/bin/env python3
"""cachette against llama.cpp on the same GGUF files: issue 10's targets in one command.

For each round and weight type, llama.cpp's llama-bench (prompt 512, then 128 tokens decoded
from an empty context, 3 repetitions each) and right after it cachette's `bench engine` (prompt
512, then 128 tokens decoded after 16 tokens of context, the median of 3 repetitions each), so
both see the same minute of a noisy machine. The models are the qwen2.5-0.5b shape, synthesized
once per weight type with `cachette model synth` (any GGUF both read would do). With --depth N,
one more pass measures decode after N tokens of context: `bench engine --ctx-depth N` against
`llama-batched-bench -npp N` (minutes at 16K: llama.cpp reads the context at ~50 tok/s on 2
cores).

Prints one Markdown table: the median over rounds of each figure, the median of the per-round
ratios with their range, cachette's prefill against the FMA peak of its threads measured in
the same run (bench engine's prefill_share_of_fma_peak; float weights only, as Q8_0 and Q4_0
multiply in 8-bit integers, which that peak does not bound), and the decode's share of the memory
read bandwidth that bench engine measured in the same run: paired (the median over its
repetitions of each one's weight-read rate against a probe pass right after it, the figure the
target is judged on) and against the best of the probe's five passes after all repetitions
(stricter: a quiet moment's bandwidth against the median repetition); then each of issue 10's
targets as met or not met. Ratios of
figures taken minutes apart on a shared VM swing by 10-20%; read the medians of 3 or more
rounds.

llama.cpp is built beside the project, never inside it (docs/benchmarks.md "Model runtime"):
  cmake -S /tmp/llama -B /tmp/llama/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
  cmake --build /tmp/llama/build -j2 --target llama-bench llama-batched-bench

With --q8-orders rows,step, each round also decodes the Q8_0 model with each order of the AVX2
level's Q8_0 decode tile (CACHETTE_Q8_DECODE: the 8 rows one after another, or block by block in
step), right after the default run, and prints which was faster: the default is step
(src/kernels/kernels.cc, DefaultQ8DecodeOrder), faster on Zen 3 and Zen 5, the processors
measured. The orders give the same bits; at the AVX-512 level they change nothing.

With --rows-layout, each round also decodes the Q8_0 and Q4_0 models with their rows as the file
has them (CACHETTE_WEIGHT_LAYOUT=rows) right after the default run, which at the AVX2 level with
the weights on huge pages interleaves them by 8 (docs/kernels.md), and prints the default's
speed against that. The layouts give the same bits.

Usage: scripts/vs_llamacpp.py --llama-bin /tmp/llama/build/bin [--isa avx2] [--rounds 3]
       [--threads 2] [--types q8_0,q4_0,f16] [--models-dir /tmp] [--depth 16384]
       [--q8-orders rows,step] [--rows-layout] [--binary build/release/src/cli/cachette]
       [--json out.json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT, GEN, REPS = 512, 128, 3
# Issue 10's targets: prefill and decode at least 1.0x llama.cpp's, decode of these weight types
# at least 85% of the measured read bandwidth, decode at depth at least 0.9x llama.cpp's.
SHARE_TYPES = ("q8_0", "f16")
SHARE_TARGET, SPEED_TARGET, DEPTH_TARGET = 0.85, 1.0, 0.9


def fail(msg):
    sys.exit("vs_llamacpp: " + msg)


def run(cmd, env=None):
    """Runs cmd, returns its stdout; exits with its stderr's tail if it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        fail("`%s` exited with %d:\n%s" % (" ".join(cmd), p.returncode, tail))
    return p.stdout


def last_json(text, what):
    """The last line of text that parses as a JSON value (llama.cpp prints logs around it)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            try:
                return json.loads(line)
            except ValueError:
                continue
    try:
        return json.loads(text)
    except ValueError:
        fail("no JSON in %s's output:\n%s" % (what, text[-2000:]))


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni",
                                                "avx_vnni", "avx512_bf16", "amx_tile")
                                    if x in have)
    except OSError:
        pass
    return "unknown"


class Bench:
    def __init__(self, args):
        self.a = args
        self.env = dict(os.environ)
        if args.isa:
            self.env["CACHETTE_ISA"] = args.isa
        self.llama_bench = os.path.join(args.llama_bin, "llama-bench")
        self.batched = os.path.join(args.llama_bin, "llama-batched-bench")
        for exe in (args.binary, self.llama_bench):
            if not os.access(exe, os.X_OK):
                fail("%s is not an executable (see --help for how to build it)" % exe)
        if args.depth and not os.access(self.batched, os.X_OK):
            fail("--depth needs %s" % self.batched)

    def model(self, wtype):
        path = os.path.join(self.a.models_dir, "vs-llamacpp-qwen05-%s.gguf" % wtype)
        if not os.path.exists(path):
            print("synthesizing %s" % path, file=sys.stderr)
            run([self.a.binary, "model", "synth", "--shape", "qwen2.5-0.5b", "--type", wtype,
                 "-o", path])
        return path

    def llama(self, m):
        rows = last_json(run([self.llama_bench, "-m", m, "-t", str(self.a.threads), "-p",
                              str(PROMPT), "-n", str(GEN), "-r", str(REPS), "-o", "json"]),
                         "llama-bench")
        pp = [r["avg_ts"] for r in rows if r["n_prompt"] == PROMPT and r["n_gen"] == 0]
        tg = [r["avg_ts"] for r in rows if r["n_prompt"] == 0 and r["n_gen"] == GEN]
        if not pp or not tg:
            fail("llama-bench gave no pp%d/tg%d rows" % (PROMPT, GEN))
        return pp[0], tg[0]

    def engine(self, m, *flags, env=None):
        return last_json(run([self.a.binary, "bench", "engine", "-m", m, "--threads",
                              str(self.a.threads), "--json", *flags], env=env or self.env),
                         "bench engine")

    def decode(self, m, env=None):
        """bench engine's decode run (GEN tokens after 16 of context) and its paired share."""
        dec = self.engine(m, "-p", "16", "-n", str(GEN), "--reps", str(REPS), env=env)
        return dec, dec.get("decode_share_paired_median", 0) or float("nan")

    def q8_order(self, m, order):
        """Decode tok/s and paired share with the Q8_0 decode tile's order forced."""
        dec, paired = self.decode(m, env=dict(self.env, CACHETTE_Q8_DECODE=order))
        return dec["decode_tok_s"], paired

    def rows_layout(self, m):
        """Decode tok/s and paired share with the weights in the file's row layout."""
        dec, paired = self.decode(m, env=dict(self.env, CACHETTE_WEIGHT_LAYOUT="rows"))
        return dec["decode_tok_s"], paired

    def cachette(self, m):
        pre = self.engine(m, "-p", str(PROMPT), "-n", "0", "--reps", str(REPS))
        dec, paired = self.decode(m)
        bw = dec["mem_read_gb_s"]
        best = dec["decode_gb_s"] / bw if bw > 0 else float("nan")
        # The float FMA peak is no ceiling of the quantized types' 8-bit integer products.
        fma = (pre.get("prefill_share_of_fma_peak", float("nan"))
               if pre.get("fma_peak_is_prefill_ceiling") else float("nan"))
        return pre["prefill_tok_s"], fma, dec["decode_tok_s"], (paired, best), dec

    def depth(self, m):
        d = self.a.depth
        js = self.engine(m, "--ctx-depth", str(d), "-n", "32", "--kv-type", "f16")
        ours = [x for x in js["decode"] if x["config"] == "full" and x["depth"] == d]
        out = run([self.batched, "-m", m, "-c", str(d + 256), "-b", "2048", "-ub", "512",
                   "-npp", str(d), "-ntg", "32", "-npl", "1", "-t", str(self.a.threads),
                   "--output-format", "jsonl"])
        theirs = last_json(out, "llama-batched-bench")
        if not ours:
            fail("bench engine gave no decode at depth %d" % d)
        return ours[0]["decode_tok_s"], ours[0]["attention_share"], theirs["speed_tg"]


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def share_cell(xs):
    """cell() of percentages, or "-" where there are none (NaN: not measured or not a ceiling)."""
    xs = [x for x in xs if x == x]
    return cell(xs, "%.0f%%") if xs else "-"


def cell(xs, fmt):
    """The median of xs, and their range in parentheses when there are several."""
    m = fmt % med(xs)
    return m if len(xs) < 2 else "%s (%s-%s)" % (m, fmt % min(xs), fmt % max(xs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bin", required=True, help="folder with llama-bench")
    ap.add_argument("--binary", default=os.path.join(ROOT, "build/release/src/cli/cachette"))
    ap.add_argument("--isa", default="", help="CACHETTE_ISA for cachette (e.g. avx2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="q8_0,q4_0,f16")
    ap.add_argument("--models-dir", default="/tmp")
    ap.add_argument("--depth", type=int, default=0, help="also decode after this many tokens")
    ap.add_argument("--q8-orders", default="",
                    help="also decode Q8_0 with each of these tile orders (rows,step)")
    ap.add_argument("--rows-layout", action="store_true",
                    help="also decode Q8_0 and Q4_0 with the file's row layout")
    ap.add_argument("--json", default="", help="write every figure to this file")
    a = ap.parse_args()
    if a.rounds < 1 or a.threads < 1 or a.depth < 0:
        fail("--rounds and --threads must be at least 1, --depth at least 0")
    types = [t for t in a.types.split(",") if t]
    for t in types:
        if t not in ("q8_0", "q4_0", "f16", "bf16", "f32"):
            fail("unknown weight type %r (q8_0, q4_0, f16, bf16, f32)" % t)
    orders = [o for o in a.q8_orders.split(",") if o]
    for o in orders:
        if o not in ("rows", "step"):
            fail("unknown Q8_0 decode order %r (rows, step)" % o)
    if orders and "q8_0" not in types:
        fail("--q8-orders needs q8_0 among --types")
    b = Bench(a)
    models = {t: b.model(t) for t in types}
    res = {t: [] for t in types}
    by_order = {o: [] for o in orders}  # (tok/s, paired share) per round
    layout_types = [t for t in types if a.rows_layout and t in ("q8_0", "q4_0")]
    by_layout = {t: [] for t in layout_types}  # (tok/s, paired share) per round, row layout
    interleaved = {}
    info = {}
    for r in range(a.rounds):
        for t in types:
            lpp, ltg = b.llama(models[t])
            cpp, cfma, ctg, share, dec = b.cachette(models[t])
            info = {"cpu": dec.get("cpu", "?"), "isa": dec.get("isa", "?")}
            interleaved[t] = dec.get("weights_interleaved", False)
            res[t].append({"llama_pp": lpp, "llama_tg": ltg, "pp": cpp, "pp_fma": cfma,
                           "tg": ctg,
                           "share": share[0], "share_best": share[1],
                           "bw_gb_s": dec["mem_read_gb_s"],
                           "bw_paired_gb_s": dec.get("mem_read_paired_gb_s", [])})
            print("round %d %-5s prefill %7.1f / %7.1f  decode %6.1f / %6.1f  share %3.0f%% "
                  "(best pass %3.0f%%)" % (r + 1, t, cpp, lpp, ctg, ltg, 100 * share[0],
                                           100 * share[1]), file=sys.stderr)
            if t in by_layout:
                by_layout[t].append(b.rows_layout(models[t]))
                print("round %d %-5s decode in the row layout %6.1f, share %3.0f%%"
                      % (r + 1, t, by_layout[t][-1][0], 100 * by_layout[t][-1][1]),
                      file=sys.stderr)
            if t == "q8_0":
                for o in orders:
                    by_order[o].append(b.q8_order(models[t], o))
                    print("round %d q8_0  decode with the %s order %6.1f, share %3.0f%%"
                          % (r + 1, o, by_order[o][-1][0], 100 * by_order[o][-1][1]),
                          file=sys.stderr)
    deep = {}
    if a.depth:
        for t in types:
            deep[t] = b.depth(models[t])
            print("depth %d %-5s decode %6.1f / %6.1f" % (a.depth, t, deep[t][0], deep[t][2]),
                  file=sys.stderr)

    print("%s, %d threads, cachette kernels: %s; CPU flags: %s; llama.cpp: %s; %s, %d rounds"
          % (info.get("cpu"), a.threads, info.get("isa"), cpu_flags(), a.llama_bin,
             time.strftime("%Y-%m-%d"), a.rounds))
    print()
    print("| weights | prefill %d tok/s: cachette / llama.cpp | ratio (range) "
          "| cachette's prefill share of the FMA peak (range) "
          "| decode tok/s: cachette / llama.cpp | ratio (range) | decode share of read "
          "bandwidth, paired (range) | against the best pass (range) |" % PROMPT)
    print("|---|---|---:|---:|---|---:|---:|---:|")
    verdicts = []
    for t in types:
        xs = res[t]
        rp = [x["pp"] / x["llama_pp"] for x in xs]
        rt = [x["tg"] / x["llama_tg"] for x in xs]
        sh = [100 * x["share"] for x in xs]
        sb = [100 * x["share_best"] for x in xs]
        print("| %s | %.1f / %.1f | %s | %s | %.1f / %.1f | %s | %s | %s |"
              % (t.upper(), med([x["pp"] for x in xs]), med([x["llama_pp"] for x in xs]),
                 cell(rp, "%.2fx"), share_cell([100 * x["pp_fma"] for x in xs]),
                 med([x["tg"] for x in xs]),
                 med([x["llama_tg"] for x in xs]), cell(rt, "%.2fx"), cell(sh, "%.0f%%"),
                 cell(sb, "%.0f%%")))
        verdicts.append(("%s prefill >= %.1fx llama.cpp" % (t, SPEED_TARGET), med(rp),
                         med(rp) >= SPEED_TARGET))
        verdicts.append(("%s decode >= %.1fx llama.cpp" % (t, SPEED_TARGET), med(rt),
                         med(rt) >= SPEED_TARGET))
        if t in SHARE_TYPES:
            verdicts.append(("%s decode >= %d%% of read bandwidth" % (t, 100 * SHARE_TARGET),
                             med(sh) / 100, med(sh) / 100 >= SHARE_TARGET))
    if deep:
        print()
        print("| weights | decode at depth %d tok/s: cachette / llama.cpp | ratio "
              "| cachette's attention share |" % a.depth)
        print("|---|---|---:|---:|")
        for t, (ours, att, theirs) in deep.items():
            print("| %s | %.1f / %.1f | %.2fx | %.0f%% |"
                  % (t.upper(), ours, theirs, ours / theirs, 100 * att))
            verdicts.append(("%s decode at depth %d >= %.1fx llama.cpp"
                             % (t, a.depth, DEPTH_TARGET), ours / theirs,
                             ours / theirs >= DEPTH_TARGET))
    if orders:
        print()
        print("| Q8_0 decode tile order (CACHETTE_Q8_DECODE) | decode tok/s (range) "
              "| against the default run of the same round (range) | paired share (range) |")
        print("|---|---:|---:|---:|")
        for o in orders:
            tps = [x[0] for x in by_order[o]]
            rel = [x[0] / y["tg"] for x, y in zip(by_order[o], res["q8_0"])]
            print("| %s | %s | %s | %s |" % (o, cell(tps, "%.1f"), cell(rel, "%.2fx"),
                                             cell([100 * x[1] for x in by_order[o]], "%.0f%%")))
        print()
        if info.get("isa") != "avx2":
            print("The orders are the AVX2 level's; this run's kernels were %s, where they "
                  "change nothing (add --isa avx2)." % info.get("isa"))
        elif len(orders) > 1:
            best = max(orders, key=lambda o: med([x[0] for x in by_order[o]]))
            print("Faster Q8_0 decode order here: %s (the default run uses step; "
                  "DefaultQ8DecodeOrder in src/kernels/kernels.cc)." % best)
    if by_layout:
        print()
        print("| weights | default layout | decode tok/s in the row layout (range) "
              "| default run against it (range) | paired share in the row layout (range) |")
        print("|---|---|---:|---:|---:|")
        for t, v in by_layout.items():
            tps = [x[0] for x in v]
            rel = [y["tg"] / x[0] for x, y in zip(v, res[t])]
            print("| %s | %s | %s | %s | %s |"
                  % (t.upper(), "rows interleaved by 8" if interleaved.get(t) else "rows",
                     cell(tps, "%.1f"), cell(rel, "%.2fx"),
                     cell([100 * x[1] for x in v], "%.0f%%")))
    print()
    for what, value, ok in verdicts:
        print("- %s: %.2f, %s" % (what, value, "met" if ok else "NOT met"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "threads": a.threads, "isa_env": a.isa,
                       "llama_bin": a.llama_bin, "rounds": res,
                       "q8_orders": {o: [{"tok_s": x[0], "share_paired": x[1]} for x in v]
                                     for o, v in by_order.items()},
                       "rows_layout": {t: [{"tok_s": x[0], "share_paired": x[1]} for x in v]
                                       for t, v in by_layout.items()},
                       "weights_interleaved": interleaved,
                       "depth": {t: {"tok_s": v[0], "attention_share": v[1],
                                     "llama_tok_s": v[2]} for t, v in deep.items()},
                       "targets": [{"target": w, "value": v, "met": ok}
                                   for w, v, ok in verdicts]}, f, indent=1)


if __name__ == "__main__":
    main()
