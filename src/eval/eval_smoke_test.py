#!/usr/bin/env python3
"""CI smoke test of `cachette eval`: ppl on 2 KB of text and retrieval on 4 questions (and 3
synthetic tasks), rag on 2 multi-document questions in every reuse mode, with the bundled
model, checking the JSON fields; bad input gets a clear
error. Seconds, not minutes. Usage: eval_smoke_test.py --binary B --model M --shared DIR"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile


def run(cmd, want_rc=0):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    if p.returncode != want_rc:
        sys.exit(f"FAIL: {' '.join(cmd)}: exit {p.returncode}, want {want_rc}\n{p.stderr[-2000:]}")
    return p


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--shared", required=True)
    a = ap.parse_args()
    b, m = a.binary, a.model
    text = os.path.join(a.shared, "eval", "heldout-text.txt")

    j = json.loads(run([b, "eval", "ppl", "-m", m, "-f", text, "--bytes", "2048", "--ctx", "128",
                        "--kv-codec", "raw,int8", "--json", "-q"]).stdout)
    for k in ["eval", "model", "ctx", "n_windows", "n_scored", "scoring", "results", "seconds"]:
        check(k in j, f"ppl JSON has '{k}'")
    check(j["eval"] == "ppl" and j["scoring"] == "second-half", "ppl JSON kind and scoring")
    check(j["n_windows"] >= 2 and j["n_scored"] == j["n_windows"] * 63, "ppl window counts")
    rows = {r["codec"]: r for r in j["results"]}
    check(list(rows) == ["none", "raw", "int8"], f"ppl rows {list(rows)}")
    base = rows["none"]["ppl"]
    check(math.isfinite(base) and 1 < base < 1000, f"baseline ppl {base}")
    check(rows["raw"]["ppl"] == base, "raw codec ppl equals the baseline exactly")
    check(abs(rows["int8"]["ppl"] - base) < 0.02 * base, "int8 ppl within 2%")
    check(rows["int8"]["bytes_per_token"] < 0.6 * rows["none"]["bytes_per_token"], "int8 bytes")

    j = json.loads(run([b, "eval", "retrieval", "-m", m, "--n", "4", "--kv-codec", "int8",
                        "--json", "--details", "-q"]).stdout)
    for k in ["eval", "source", "n_items", "n_scored", "n_skipped", "results", "items"]:
        check(k in j, f"retrieval JSON has '{k}'")
    check(j["n_items"] == 4 and j["n_scored"] + j["n_skipped"] == 4, "retrieval counts")
    check([r["codec"] for r in j["results"]] == ["none", "int8"], "retrieval rows")
    for r in j["results"]:
        all_ = r["kinds"]["all"]
        check(all_["n"] == j["n_scored"] and 0 <= all_["correct"] <= all_["n"], "kinds.all")
        check(abs(r["accuracy"] - all_["correct"] / max(1, all_["n"])) < 1e-9, "accuracy")
    check(all("answers" in it or it["skipped"] for it in j["items"]), "per-item answers")

    j = json.loads(run([b, "eval", "retrieval", "-m", m, "--synthetic", "5", "--n", "3",
                        "--synthetic-chars", "800", "--json", "-q"]).stdout)
    check(j["n_items"] == 3 and "synthetic" in j["source"], "synthetic tasks")
    check(set(j["results"][0]["kinds"]) == {"all", "kv", "needle", "facts"}, "synthetic kinds")

    with tempfile.TemporaryDirectory() as d:
        bad = os.path.join(d, "bad.jsonl")
        with open(bad, "w") as f:
            f.write('{"kind": "kv", "prompt": "a", "answer": "b"}\n{"kind": "kv", "prompt": \n')
        p = run([b, "eval", "retrieval", "-m", m, "--data", bad, "-q"], want_rc=1)
        check("bad.jsonl:2: not valid JSON" in p.stderr, f"malformed line named: {p.stderr}")
    p = run([b, "eval", "ppl", "-m", m, "-f", text, "--bytes", "2048", "--kv-codec", "int3"],
            want_rc=1)
    check("int3" in p.stderr, f"unknown codec named: {p.stderr}")

    # KV budget policies against full KV: a budget above every window keeps everything, so it
    # must equal the baseline exactly; a small one evicts and costs something.
    j = json.loads(run([b, "eval", "ppl", "-m", m, "-f", text, "--bytes", "4096", "--ctx", "256",
                        "--kv-policy", "snapkv,streamingllm", "--budget", "0.25,4096",
                        "--json", "-q"]).stdout)
    rows = {(r["kv_policy"], r["budget"]): r for r in j["results"]}
    check(list(rows) == [("full", None), ("snapkv", 0.25), ("snapkv", 4096),
                         ("streamingllm", 0.25), ("streamingllm", 4096)], f"policy rows {list(rows)}")
    base = rows[("full", None)]["ppl"]
    for name in ("snapkv", "streamingllm"):
        check(rows[(name, 4096)]["ppl"] == base, f"{name}@4096 keeps everything: equals full KV")
        small = rows[(name, 0.25)]
        check(small["ppl"] >= base * 0.98 and small["peak_kv_tokens"] <= 256,
              f"{name}@0.25: ppl {small['ppl']} vs {base}, peak {small['peak_kv_tokens']}")
        check(small["mean_kv_tokens"] <= 128 * 0.25 + 16 + 1, f"{name}@0.25 mean kept {small}")
    j = json.loads(run([b, "eval", "retrieval", "-m", m, "--n", "3", "--kv-policy", "h2o",
                        "--budget", "0.5", "--json", "-q"]).stdout)
    check([r["kv_policy"] for r in j["results"]] == ["full", "h2o"], "retrieval policy rows")
    j = json.loads(run([b, "eval", "stream", "-m", m, "-f", text, "--tokens", "600", "--cache",
                        "128", "--step", "32", "--report", "256", "--json"]).stdout)
    check(j["n_scored"] == 600 - 32 and  # the first step is the prompt, not scored
          j["max_kv_tokens"] <= 128, f"stream: {j['n_scored']} scored, "
          f"at most {j['max_kv_tokens']} KV tokens")
    check(all(math.isfinite(w["ppl"]) and math.isfinite(w["full_restart_ppl"])
              for w in j["windows"]), "stream windows")
    p = run([b, "eval", "ppl", "-m", m, "-f", text, "--bytes", "2048", "--kv-policy", "snapk"],
            want_rc=1)
    check("kv_policy.name" in p.stderr, f"unknown policy named: {p.stderr}")
    # Segment reuse on multi-document QA: every mode in one run, full prefill beside them.
    j = json.loads(run([b, "eval", "rag", "-m", m, "--n", "2", "--ratio", "0.15,1", "--json",
                        "-q"]).stdout)
    rows = {r["config"]: r for r in j["results"]}
    check(list(rows) == ["full", "prefix", "naive", "blend@0.15", "blend@1", "cachecraft@0.2",
                         "ape"], f"rag rows {list(rows)}")
    check(j["n_items"] == 2 and j["n_scored"] + j["n_skipped"] == 2, "rag counts")
    for name, r in rows.items():
        for k in ("accuracy", "groups", "ttft_median_s", "reused_tokens", "recomputed_share",
                  "agreement_with_full", "first_token_kl_vs_full"):
            check(k in r, f"rag row {name} has '{k}'")
    check(rows["blend@1"]["recomputed_share"] == 1.0 and
          rows["blend@1"]["agreement_with_full"] == 1.0, f"blend@1 is full prefill {rows['blend@1']}")
    check(rows["naive"]["recomputed_share"] == 0 and rows["naive"]["reused_tokens"] > 0,
          "naive reuses without recompute")
    p = run([b, "eval", "rag", "-m", m, "--mode", "blend,shuffle"], want_rc=1)
    check("shuffle" in p.stderr and "--mode" in p.stderr, f"unknown mode named: {p.stderr}")
    p = run([b, "eval", "rag", "-m", m, "--ratio", "1.5"], want_rc=1)
    check("--ratio" in p.stderr, f"bad ratio named: {p.stderr}")
    print("eval smoke: ok")


if __name__ == "__main__":
    main()
