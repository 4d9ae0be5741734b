#!/usr/bin/env bash
# Sets everything up and runs the main job: a greedy continuation on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh release
exec ./build/release/src/cli/cachette run -p "${PROMPT:-The history of the}" -n "${N:-64}" "$@"
