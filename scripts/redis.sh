#!/usr/bin/env bash
# Loopback Redis servers for the tests: a standalone server on 6390 and a 3-master cluster on
# 7001-7003, each daemonized in its own directory under $CACHETTE_REDIS_DIR
# (default ${TMPDIR:-/tmp}/cachette-redis), with a pid file, no persistence.
#
#   scripts/redis.sh start    start whatever is not running yet (idempotent); the servers then
#                             stay up until `stop`
#   scripts/redis.sh stop     kill the servers started here and remove their directories
#   scripts/redis.sh acquire  for test programs run in parallel (ctest -j): start the servers if
#                             needed and take a lease
#   scripts/redis.sh release  drop a lease; the last release stops the servers, unless they
#                             were brought up by `start` (then `stop` owns them)
#   scripts/redis.sh status   print what is running
#
# Why leases: ctest runs every test case of redis_test as its own process; each process must
# see live servers, and the last one out (not the first) must stop them.
set -uo pipefail

STANDALONE_PORT=6390
CLUSTER_PORTS=(7001 7002 7003)
BASE=${CACHETTE_REDIS_DIR:-${TMPDIR:-/tmp}/cachette-redis}
LOCK=${BASE}.lock

ping_port() { [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]; }

cluster_ok() {
  local p
  for p in "${CLUSTER_PORTS[@]}"; do
    redis-cli -h 127.0.0.1 -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' ||
      return 1
  done
}

start_server() {  # port [extra redis-server args...]
  local port=$1; shift
  local dir=$BASE/$port
  if ping_port "$port"; then return 0; fi
  rm -rf "$dir" && mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --dir "$dir" \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --save "" --appendonly no "$@" 9>&- ||
    { echo "redis.sh: redis-server on $port failed to start" >&2; return 1; }
  local i
  for i in $(seq 1 100); do ping_port "$port" && return 0; sleep 0.05; done
  echo "redis.sh: redis-server on $port does not answer" >&2
  tail -n 20 "$dir/redis.log" >&2 2>/dev/null
  return 1
}

do_start() {
  mkdir -p "$BASE"
  start_server "$STANDALONE_PORT" || return 1
  local p
  for p in "${CLUSTER_PORTS[@]}"; do
    start_server "$p" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 5000 || return 1
  done
  cluster_ok && return 0
  # Only fresh nodes without slots can form the cluster; a half-formed one is reset first.
  for p in "${CLUSTER_PORTS[@]}"; do
    redis-cli -h 127.0.0.1 -p "$p" flushall >/dev/null 2>&1
    redis-cli -h 127.0.0.1 -p "$p" cluster reset hard >/dev/null 2>&1
  done
  local nodes=()
  for p in "${CLUSTER_PORTS[@]}"; do nodes+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    >"$BASE/create.log" 2>&1 9>&- ||
    { echo "redis.sh: cluster create failed" >&2; cat "$BASE/create.log" >&2; return 1; }
  local i
  for i in $(seq 1 200); do cluster_ok && return 0; sleep 0.05; done
  echo "redis.sh: cluster_state is not ok" >&2
  return 1
}

# A daemonized server is not our child; where PID 1 does not reap orphans it lingers as a
# zombie, which `kill -0` still sees. Zombies count as gone.
alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state:0:1}" != Z ]
}

do_stop() {
  local p pid i pids=()
  for p in "$STANDALONE_PORT" "${CLUSTER_PORTS[@]}"; do
    [ -f "$BASE/$p/redis.pid" ] || continue
    pid=$(cat "$BASE/$p/redis.pid")
    # Nothing to save (no persistence), so no graceful shutdown to wait for.
    if [ -n "$pid" ] && alive "$pid"; then kill -9 "$pid" 2>/dev/null; pids+=("$pid"); fi
  done
  for pid in "${pids[@]}"; do
    for i in $(seq 1 100); do alive "$pid" || break; sleep 0.02; done
  done
  rm -rf "$BASE"
}

with_lock() {  # runs "$@" holding the lock file, so parallel test processes take turns
  mkdir -p "$(dirname "$LOCK")"
  exec 9>"$LOCK"
  flock -w 60 9 || { echo "redis.sh: lock $LOCK busy" >&2; return 1; }
  "$@"
}

owner_file() { echo "$BASE/.owner"; }
lease_file() { echo "$BASE/.leases"; }

cmd_start() {
  do_start || return 1
  echo start >"$(owner_file)"
}

cmd_acquire() {
  do_start || return 1
  [ -f "$(owner_file)" ] || echo acquire >"$(owner_file)"
  local n=0
  [ -f "$(lease_file)" ] && n=$(cat "$(lease_file)")
  echo $((n + 1)) >"$(lease_file)"
}

cmd_release() {
  [ -d "$BASE" ] || return 0
  local n=0
  [ -f "$(lease_file)" ] && n=$(cat "$(lease_file)")
  n=$((n - 1))
  if [ "$n" -le 0 ]; then
    rm -f "$(lease_file)"
    [ "$(cat "$(owner_file)" 2>/dev/null)" = acquire ] && do_stop
  else
    echo "$n" >"$(lease_file)"
  fi
  return 0
}

cmd_status() {
  local p
  for p in "$STANDALONE_PORT" "${CLUSTER_PORTS[@]}"; do
    if ping_port "$p"; then echo "$p up"; else echo "$p down"; fi
  done
  if cluster_ok; then echo "cluster ok"; else echo "cluster not ok"; fi
}

case "${1:-}" in
  start) with_lock cmd_start ;;
  stop) with_lock do_stop ;;
  acquire) with_lock cmd_acquire ;;
  release) with_lock cmd_release ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|acquire|release|status" >&2; exit 2 ;;
esac
