#!/bin/bash
# The session-pool comparison of docs/benchmarks.md ("A 4-bit pool for sessions"): one
# multi-round-qa workload whose users are sessions, against four servers of the same
# --kv-budget (f16; a q4_0 session pool, without and with an f16 window; every request q4_0),
# ROUNDS times, interleaved. Prints each run's summary lines.
#
#   scripts/bench_session_pool.sh [ROUNDS]     (B=binary M=model BUDGET SBUDGET PORT override)
set -euo pipefail
ROUNDS=${1:-3}
B=${B:-build/release/src/cli/cachette}
M=${M:-models/cachette-tiny-q8_0.gguf}
BUDGET=${BUDGET:-8MiB}
SBUDGET=${SBUDGET:-7MiB}
PORT=${PORT:-18602}
W=(--kind multi-round-qa --users 16 --rounds 4 --system-tokens 400 --question-tokens 40
   --max-tokens 32 --qps 4 --session-ids)

run() {  # label, server flags...
  local label=$1
  shift
  "$B" serve -m "$M" --port "$PORT" --kv-budget "$BUDGET" "$@" \
    > "/tmp/bench_session_$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do
    curl -sf "localhost:$PORT/health" > /dev/null && break
    sleep 0.2
  done
  echo "== $label: $*"
  "$B" bench workload --url "http://127.0.0.1:$PORT" "${W[@]}" --label "$label" 2>&1 |
    grep -E 'TTFT|hit rate|round-|pages'
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

for _ in $(seq "$ROUNDS"); do
  run f16
  run session-q4 --session-kv-type q4 --session-kv-budget "$SBUDGET"
  run session-q4-r64 --session-kv-type q4 --session-kv-budget "$SBUDGET" --kv-recent 64
  run all-q4 --kv-type q4_0
done
