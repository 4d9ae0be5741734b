#!/usr/bin/env bash
# Installs every Debian package cachette needs, then configures and builds the release preset.
# Idempotent: packages already present are skipped by apt, and the build is incremental.
# Usage: scripts/setup.sh [preset...]   (default: release)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake pkg-config git ca-certificates
  clang libclang-rt-14-dev libfuzzer-14-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libxxhash-dev libzstd-dev nlohmann-json3-dev libcpp-httplib-dev libcli11-dev
  libhiredis-dev redis-server liburing-dev libtomlplusplus-dev
  libzmq3-dev libmsgpack-dev
  python3 python3-matplotlib
  dpkg-dev file
  libicu-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
# Debian installs redis-server as a service; tests start their own instances on loopback ports.

presets=("$@")
((${#presets[@]})) || presets=(release)
jobs=$(nproc)
for preset in "${presets[@]}"; do
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
done
