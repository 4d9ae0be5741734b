#!/usr/bin/env bash
# End-to-end checks of the `cachette` binary: the main commands work on the bundled model and
# on a synthesized one, and bad input gets a clear error (exit 1, a message naming the
# problem), never a crash. Usage: cli_test.sh BINARY SHARED_DIR
set -u
bin=$1
shared=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0

check() {  # check NAME WANT_EXIT WANT_TEXT -- command...
  local name=$1 want_exit=$2 want_text=$3
  shift 4
  local out
  out=$("$@" 2>&1)
  local rc=$?
  if [ "$rc" -eq "$want_exit" ] && grep -qF -- "$want_text" <<<"$out"; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    echo "FAIL: $name (exit $rc, want $want_exit; want text '$want_text')"
    echo "$out" | tail -n 5
  fi
}

check "run bundled model" 0 '"generated_ids"' -- "$bin" run -p "The history of the" -n 8 --json
check "run q4_0 kv" 0 '"generated_ids"' -- "$bin" run -p "The history of the" -n 8 --kv-type q4_0 \
  --json
check "run prompt ids" 0 '"prompt_ids":[8191,464,2106,286,262]' -- \
  "$bin" run --prompt-ids 8191,464,2106,286,262 -n 4 --json
check "tokenize ids" 0 '[464, 2106, 286, 262]' -- "$bin" tokenize --ids -p "The history of the"
check "tokenize with bos" 0 '[8191, 464' -- "$bin" tokenize --ids --bos -p "The history"
# An environment setting the kernels do not know is named in a warning, not silently dropped.
check "bad CACHETTE_ISA" 0 'CACHETTE_ISA=AVX2 is not one of scalar, avx2, avx512, amx' -- \
  env CACHETTE_ISA=AVX2 "$bin" tokenize --ids -p "The history"
check "bad CACHETTE_Q8_DECODE" 0 'CACHETTE_Q8_DECODE=row is not one of rows, step' -- \
  env CACHETTE_Q8_DECODE=row "$bin" tokenize --ids -p "The history"
check "bad CACHETTE_LOG" 0 'CACHETTE_LOG=verbose is not one of debug, info, warning, error' -- \
  env CACHETTE_LOG=verbose "$bin" tokenize --ids -p "The history"
check "synth tiny" 0 'wrote' -- "$bin" model synth --shape tiny --type q8_0 -o "$tmp/tiny.gguf"
check "info synth" 0 'arch llama' -- "$bin" model info -m "$tmp/tiny.gguf"
check "run synth" 0 '"finish_reason"' -- "$bin" run -m "$tmp/tiny.gguf" -p "hello" -n 4 --json
# Where the weights live: either way the same tokens; a value it does not know is an error.
check "weights mmap" 0 '(q8_0 weights on mmap, ' -- \
  env CACHETTE_WEIGHTS=mmap "$bin" bench engine -m "$tmp/tiny.gguf" -p 8 -n 2 --reps 1
check "weights huge pages" 0 '(q8_0 weights on huge pages, ' -- \
  env CACHETTE_WEIGHTS=huge-pages "$bin" bench engine -m "$tmp/tiny.gguf" -p 8 -n 2 --reps 1
# The bundled model (14 MB: huge pages, not the heap that takes files under 2 MiB).
mmap_ids=$(CACHETTE_WEIGHTS=mmap "$bin" run -p "The history of the" -n 12 --json |
  grep -o '"generated_ids":\[[0-9,]*\]')
huge_ids=$(CACHETTE_WEIGHTS=huge-pages "$bin" run -p "The history of the" -n 12 --json |
  grep -o '"generated_ids":\[[0-9,]*\]')
check "weights same tokens" 0 '"generated_ids":[' -- \
  bash -c '[ "$1" = "$2" ] && echo "$1"' _ "$mmap_ids" "$huge_ids"
# Q8_0 rows interleaved by 8 in memory at the AVX2 level (where the processor has it): the
# same tokens as the file's layout; a layout it does not know is named in a warning.
if grep -qw avx2 /proc/cpuinfo; then
  check "weights interleaved" 0 'huge pages, rows interleaved by 8, ' -- \
    env CACHETTE_WEIGHTS=huge-pages CACHETTE_ISA=avx2 "$bin" bench engine -m "$tmp/tiny.gguf" \
    -p 8 -n 2 --reps 1
  rows_ids=$(CACHETTE_WEIGHTS=huge-pages CACHETTE_ISA=avx2 CACHETTE_WEIGHT_LAYOUT=rows \
    "$bin" run -m "$tmp/tiny.gguf" -p "The history of the" -n 12 --json |
    grep -o '"generated_ids":\[[0-9,]*\]')
  inter_ids=$(CACHETTE_WEIGHTS=huge-pages CACHETTE_ISA=avx2 \
    "$bin" run -m "$tmp/tiny.gguf" -p "The history of the" -n 12 --json |
    grep -o '"generated_ids":\[[0-9,]*\]')
  check "interleaved same tokens" 0 '"generated_ids":[' -- \
    bash -c '[ "$1" = "$2" ] && echo "$1"' _ "$rows_ids" "$inter_ids"
fi
check "bad CACHETTE_WEIGHT_LAYOUT" 0 'CACHETTE_WEIGHT_LAYOUT=row is not one of rows, interleaved' \
  -- env CACHETTE_WEIGHT_LAYOUT=row CACHETTE_WEIGHTS=huge-pages "$bin" run -m "$tmp/tiny.gguf" \
  -p hi -n 2
check "bad CACHETTE_WEIGHTS" 1 'CACHETTE_WEIGHTS=huge is not one of mmap, huge-pages' -- \
  env CACHETTE_WEIGHTS=huge "$bin" run -m "$tmp/tiny.gguf" -p hi -n 2
# Heads of 40 do not fill the 32-element blocks of the q8_0/q4_0 KV types: refused, f16 fine.
check "synth hd40" 0 'wrote' -- "$bin" model synth --shape tiny-hd40 --type q8_0 -o "$tmp/hd40.gguf"
check "hd40 q4_0 kv" 1 'head_dim is 40 (use f16)' -- "$bin" run -m "$tmp/hd40.gguf" -p hi -n 2 \
  --kv-type q4_0
check "hd40 q8_0 kv serve" 1 'head_dim is 40 (use f16)' -- "$bin" serve -m "$tmp/hd40.gguf" \
  --port 0 --kv-type q8_0
check "hd40 f16 kv" 0 '"finish_reason"' -- "$bin" run -m "$tmp/hd40.gguf" -p hi -n 2 --json
check "bench engine" 0 '"decode_tok_s"' -- "$bin" bench engine -m "$tmp/tiny.gguf" -p 16 -n 4 \
  --reps 1 --json
# Each decode repetition is paired with a probe pass right after it.
check "bench engine paired" 0 'paired: each repetition against a probe pass right after it' -- \
  "$bin" bench engine -m "$tmp/tiny.gguf" -p 16 -n 4 --reps 2
# Prefill against the FMA peak of the threads, measured in the same run: the ceiling of f16
# weights, not of q8_0's integer products.
check "synth tiny f16" 0 'wrote' -- "$bin" model synth --shape tiny --type f16 -o "$tmp/tiny16.gguf"
check "bench engine fma peak" 0 'of the measured FMA peak of 2 threads' -- \
  "$bin" bench engine -m "$tmp/tiny16.gguf" -p 16 -n 4 --reps 1 --threads 2
check "bench engine int8 prefill" 0 'is not their ceiling' -- \
  "$bin" bench engine -m "$tmp/tiny.gguf" -p 16 -n 4 --reps 1 --threads 2
# bench cache with adaptive disk levels over a prompt of three chunks: the levels are in the
# JSON, RAM and disk both restore the whole prompt, and each chunk's record on disk has its two
# level files beside it (every store the bench opens over the directory keeps them).
check "bench cache disk levels" 0 'bench cache ok' -- python3 -c '
import glob, json, subprocess, sys
binary, d = sys.argv[1], sys.argv[2]
p = subprocess.run([binary, "bench", "cache", "-p", "96", "--chunk-tokens", "32", "--reps", "1",
                    "--tp-chunks", "0", "--disk-levels", "int8,int4", "--disk-dir", d, "--json"],
                   capture_output=True, text=True, timeout=120)
assert p.returncode == 0, p.stderr
j = json.loads(p.stdout)
assert j["disk_levels"] == ["int8", "int4"] and j["redis_levels"] == [], j
assert j["n_prompt"] == 96 and j["chunk_tokens"] == 32 and j["cold_ttft_ms"] > 0, j
assert sorted(j["restored"]) == ["disk", "ram"], j
for tier, r in j["restored"].items():
    assert r["restored_tokens"] == 96 and r["ttft_ms"] > 0, (tier, r)
files = glob.glob(d + "/chunks/*/*.ctk")
assert len(files) == 3 * 3, files
print("bench cache ok")
' "$bin" "$tmp/bench-cache"

# Bad input.
check "missing model" 1 'cannot open' -- "$bin" run -m "$tmp/nope.gguf" -p hi
printf 'GGUX\3\0\0\0' >"$tmp/magic.gguf"
check "bad magic" 1 'magic' -- "$bin" run -m "$tmp/magic.gguf" -p hi
head -c 5000 "$tmp/tiny.gguf" >"$tmp/trunc.gguf"
check "truncated" 1 'GGUF' -- "$bin" run -m "$tmp/trunc.gguf" -p hi
check "vocab only" 1 "unknown architecture 'gpt2'" -- "$bin" run -m "$shared/testdata/tokenizer/ggml-vocab-gpt-2.gguf" -p hi
check "bad token id" 1 'outside the vocabulary' -- "$bin" run --prompt-ids 1,999999 -n 2
check "bad id text" 1 'is not a token id' -- "$bin" run --prompt-ids 1,x -n 2
long=$(python3 -c 'print(",".join(["464"] * 2100))')
check "prompt longer than context" 1 'context' -- "$bin" run --prompt-ids "$long" -n 2
check "bad kv type" 1 'unknown KV type' -- "$bin" run -p hi --kv-type q3
check "run kivi4 kv" 0 '"generated_ids"' -- "$bin" run -p "The history of the" -n 8 \
  --kv-type kivi4 --json
check "run q4_1 kv, window" 0 '"generated_ids"' -- "$bin" run -p "The history of the" -n 8 \
  --kv-type q4_1 --kv-recent 32 --json
check "window on f16" 1 'f16 KV has nothing to keep' -- "$bin" run -p hi --kv-type f16 \
  --kv-recent 64
check "hd40 kivi4 kv" 1 'head_dim is 40 (use f16)' -- "$bin" run -m "$tmp/hd40.gguf" -p hi -n 2 \
  --kv-type kivi4
check "bad temperature" 1 'temperature' -- "$bin" run -p hi --temp -1
check "bad synth type" 1 'unknown weight type' -- "$bin" model synth --type q5 -o "$tmp/x.gguf"
check "bad shape" 1 'unknown shape' -- "$bin" model synth --shape huge -o "$tmp/x.gguf"
check "bad budget" 1 'byte size' -- "$bin" bench prefix --kv-budget lots -p 16
# bench kv-pages on the trained model: per-layer budgets hold the pages of their total (fewer
# than the longest layer's), CAKE's cascade peaks well below full KV, the one-shot read at it.
check "bench kv-pages" 0 'kv pages ok' -- python3 -c '
import json, subprocess, sys
p = subprocess.run([sys.argv[1], "bench", "kv-pages", "-p", "768", "--json",
                    "--kv-policy", "snapkv,pyramidkv,cake", "--kv-policy-budget", "0.1"],
                   capture_output=True, text=True, timeout=300)
assert p.returncode == 0, p.stderr
c = {x["label"]: x for x in json.loads(p.stdout)["configs"]}
full = c["full"]["pages"]
for name in ("pyramidkv", "cake"):
    assert c[name]["pages"] < c[name]["whole_page_layout_pages"], c[name]
    assert c[name]["pages"] <= c["snapkv"]["pages"] + 1, (c[name], c["snapkv"])
assert c["cake"]["peak_pages"] < full / 2, (c["cake"], full)
assert c["cake (whole)"]["peak_pages"] == full, c["cake (whole)"]
print("kv pages ok")
' "$bin"
check "kv-pages bad policy" 1 'kv_policy.name' -- "$bin" bench kv-pages -p 64 --kv-policy snapk
# bench segment-load from a disk tier: the whole load, the pipelined blend and the controller
# all find every document and recompute what blend asks for (a disk read is faster than any
# recompute it could hide), with the same logits (the KL to full prefill is one figure).
check "bench segment-load" 0 'segment load ok' -- python3 -c '
import json, subprocess, sys
p = subprocess.run([sys.argv[1], "bench", "segment-load", "--docs", "3", "--doc-tokens", "96",
                    "--reps", "1", "--json", "--disk-dir", sys.argv[2]],
                   capture_output=True, text=True, timeout=300)
assert p.returncode == 0, p.stderr
j = json.loads(p.stdout)
assert j["prompt_tokens"] > 3 * 96 and j["tier"] == "disk", j
rows = {r["label"]: r for r in j["links"][0]["rows"]}
mem = rows["blend, in memory"]
for name in ("whole", "pipelined"):
    assert rows[name]["recomputed"] == mem["recomputed"] > 0, rows[name]
    assert rows[name]["kl"] == mem["kl"], (rows[name], mem)
assert rows["whole"]["load_ms"] > 0, rows["whole"]
assert rows["controller"]["ratio"] >= 0.15, rows["controller"]
print("segment load ok")
' "$bin" "$tmp/segment-load"
check "segment-load link without redis" 1 '--link-mbps needs --redis' -- "$bin" bench \
  segment-load --docs 1 --doc-tokens 8 --link-mbps 100
check "bad redis level" 1 '--redis-levels: unknown codec "int3"' -- "$bin" serve --port 0 \
  --redis redis://127.0.0.1:1 --redis-levels int3
check "bad disk level" 1 '--disk-levels: unknown codec "int3"' -- "$bin" serve --port 0 \
  --disk-dir "$tmp/levels" --disk-levels int3
check "disk levels without disk" 1 '--disk-levels' -- "$bin" serve --port 0 --disk-levels int8

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
