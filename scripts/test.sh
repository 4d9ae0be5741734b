#!/usr/bin/env bash
# Sets everything up and runs all tests: a bounded libFuzzer run of each fuzz target, the
# ASan+UBSan build of the unit tests, a TSan build of the concurrent components' tests, then
# every release test (unit and end to end, against real Redis servers on loopback). Ends with
# ctest's summary line and a non-zero exit on any failure.
# Environment: FUZZ_SECONDS (default 10 per target), SKIP_ASAN=1, SKIP_TSAN=1, SKIP_FUZZ=1.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh release || exit 1
# The sanitizer build needs only what the unit tests run (not the CLI, the man page, packages).
if [ "${SKIP_ASAN:-0}" != 1 ]; then
  cmake --preset asan >/dev/null &&
    cmake --build --preset asan -j "$(nproc)" --target cachette_unit_tests || exit 1
fi
if [ "${SKIP_FUZZ:-0}" != 1 ]; then
  cmake --preset fuzz >/dev/null && cmake --build --preset fuzz -j "$(nproc)" --target fuzzers || exit 1
fi
# The components with threads of their own (the compute thread pool, paged KV manager, chunk
# store, Redis tier, scheduler, the scheduler-store bridge): their tests under ThreadSanitizer.
# The pool's tests only of core_test, and the bridge's engine-free test only (its model tests
# would take minutes under TSan).
TSAN_TESTS=(src/core/core_test src/kv/kv_test src/cache/cache_store_test src/cache/redis/redis_test
            src/sched/sched_test src/sched/tier_bridge_test)
if [ "${SKIP_TSAN:-0}" != 1 ]; then
  cmake --preset tsan >/dev/null &&
    cmake --build --preset tsan -j "$(nproc)" --target "${TSAN_TESTS[@]##*/}" || exit 1
fi

# Real Redis for the Redis tier tests: a standalone server and a 3-master cluster on loopback
# (scripts/redis.sh), stopped when this script exits.
bash scripts/redis.sh start || exit 1
trap 'bash scripts/redis.sh stop' EXIT
export CACHETTE_REDIS_URL=redis://127.0.0.1:6390
export CACHETTE_REDIS_CLUSTER_URL=redis+cluster://127.0.0.1:7001

# Runs `fn arg` for each arg, nproc at a time (libFuzzer targets are one single-threaded process
# each); non-zero if any failed. Each fn prints its own result.
run_parallel() {
  local fn=$1 status=0 running=0
  shift
  for arg in "$@"; do
    if ((running >= $(nproc))); then
      wait -n || status=1
      running=$((running - 1))
    fi
    "$fn" "$arg" &
    running=$((running + 1))
  done
  while ((running > 0)); do
    wait -n || status=1
    running=$((running - 1))
  done
  return $status
}

failed=0
echo "== builds done after ${SECONDS}s"
if [ "${SKIP_FUZZ:-0}" != 1 ]; then
  # Every target, each for FUZZ_SECONDS, nproc at a time (10 s each keeps the total under a
  # minute on 2 cores). Seeds come from fuzz/corpus/<name without fuzz_>/ and
  # are copied, so the committed corpus never grows; a crashing input is kept as
  # /tmp/<name>-crash-* and named in the log.
  fuzz_one() {
    local target=$1 name corpus
    name=$(basename "$target")
    corpus=$(mktemp -d)
    cp fuzz/corpus/"${name#fuzz_}"/* "$corpus"/ 2>/dev/null || true
    echo "fuzz: $name for ${FUZZ_SECONDS:-10}s"
    if ! "$target" -max_total_time="${FUZZ_SECONDS:-10}" -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="/tmp/$name-" -print_final_stats=0 "$corpus" >"/tmp/$name.log" 2>&1; then
      echo "fuzz: $name FAILED"; tail -n 40 "/tmp/$name.log"; rm -rf "$corpus"; return 1
    fi
    rm -rf "$corpus"
  }
  targets=()
  for target in build/fuzz/fuzz/fuzz_*; do
    [ -f "$target" ] && [ -x "$target" ] && targets+=("$target")
  done
  run_parallel fuzz_one "${targets[@]}" || failed=1
fi
if [ "${SKIP_ASAN:-0}" != 1 ]; then
  echo "== ASan+UBSan unit tests (${SECONDS}s)"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build/asan --output-on-failure -j "$(nproc)" -L unit || failed=1
fi
if [ "${SKIP_TSAN:-0}" != 1 ]; then
  echo "== TSan tests (${SECONDS}s)"
  # One at a time: the scheduler's test alone takes most of this, with threads of its own.
  for t in "${TSAN_TESTS[@]}"; do
    filter="*"
    [ "${t##*/}" = tier_bridge_test ] && filter="TierBridgeBytesTest.*"
    [ "${t##*/}" = core_test ] && filter="ThreadPoolTest.*"
    if ! TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" "build/tsan/$t" \
        --gtest_brief=1 --gtest_filter="$filter" >"/tmp/tsan_${t##*/}.log" 2>&1; then
      echo "tsan: ${t##*/} FAILED"; tail -n 60 "/tmp/tsan_${t##*/}.log"; failed=1
    else
      echo "tsan: ${t##*/} passed"
    fi
  done
fi
echo "== release tests (${SECONDS}s)"
ctest --test-dir build/release --output-on-failure -j "$(nproc)" || failed=1
exit $failed
