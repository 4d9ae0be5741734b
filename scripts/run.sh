#!/usr/bin/env bash
# Sets everything up and runs the main job: `cachette serve` on the bundled model, an
# OpenAI-compatible server on http://127.0.0.1:8080 with the paged prefix cache in memory and a
# RAM + disk chunk store behind it (disk tier in ${XDG_CACHE_HOME:-~/.cache}/cachette, so a
# restarted server finds its cache). Extra arguments go to `cachette serve` (e.g. -m MODEL.gguf,
# --port 9000, --redis redis://host:6379). Stop it with Ctrl-C (it drains and flushes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh release
cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/cachette"
mkdir -p "$cache_dir"
cat <<TXT
cachette is starting on http://127.0.0.1:${PORT:-8080}. Try, from another terminal:
  curl -s http://127.0.0.1:${PORT:-8080}/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model":"cachette-tiny-q8_0","prompt":"The history of the","max_tokens":32}'
  (run it twice: the second answer reports cached prompt tokens in usage)
TXT
exec ./build/release/src/cli/cachette serve --port "${PORT:-8080}" --ram-budget 1GiB \
  --disk-dir "$cache_dir" --disk-budget 4GiB "$@"
