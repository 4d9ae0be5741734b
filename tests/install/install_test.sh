#!/usr/bin/env bash
# Installs and packages cachette from an already built tree, and uses the result as an operator
# and an engine author would, outside the source tree (issue 15):
#   1. `cmake --install BUILD --prefix TMP`: every promised file, a versioned SONAME, public
#      headers that include only each other and compile alone;
#   2. a C program built with nothing but `pkg-config --cflags --libs cachette` (and once against
#      libcachette.a with `--static`): open a cache on a disk directory, put, close, reopen, get
#      back byte for byte (tests/install/kv_roundtrip.c, the example of docs/c-api.md, whose
#      excerpts must match it);
#   3. a CMake project with find_package(cachette): the C++ API on the shared library, the C
#      example on the static one;
#   4. the installed binary: --help of every subcommand (cachette(1) is made of them), the
#      installed model found from any working directory, the default service config served
#      (and every key it shows commented out valid), a missing, unreadable or invalid config a
#      clear message and a non-zero exit;
#   5. `cpack -G DEB` from BUILD: three packages, their file lists (dpkg-deb -c), their Depends
#      (dpkg-shlibdeps), the service's conffile and maintainer scripts.
# Usage: install_test.sh BUILD_DIR SOURCE_DIR. Exits 0 when everything holds.
set -euo pipefail

build=$(realpath "$1")
src=$(realpath "$2")
tmp=$(mktemp -d /tmp/cachette-install-test.XXXXXX)
tmp=$(realpath "$tmp")
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
unset CACHETTE_MODEL
prefix=$tmp/prefix
# The library directory of this build's install layout (lib, unless configured otherwise).
libdir=$(sed -n 's/^CMAKE_INSTALL_LIBDIR:PATH=//p' "$build/CMakeCache.txt")
libdir=${libdir:-lib}
start=$SECONDS

fail() {
  echo "install_test: FAIL: $*" >&2
  exit 1
}
step() { echo "install_test: [$((SECONDS - start)) s] $*"; }
must_exist() {
  for f in "$@"; do [ -e "$prefix/$f" ] || fail "not installed: $f"; done
}

# --- 1. Install -------------------------------------------------------------------------------
step "cmake --install $build --prefix $prefix"
cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" || {
  cat "$tmp/install.log"
  fail "cmake --install"
}
must_exist bin/cachette share/cachette/models/cachette-tiny-q8_0.gguf share/man/man1/cachette.1
grep -q '^\.SS "cachette serve"' "$prefix/share/man/man1/cachette.1" ||
  fail "cachette(1) has no section for cachette serve"
for f in libcachette.so libcachette.so.0 libcachette.a pkgconfig/cachette.pc \
  cmake/cachette/cachetteConfig.cmake cmake/cachette/cachetteConfigVersion.cmake \
  cmake/cachette/cachetteTargets.cmake; do
  must_exist "$libdir/$f"
done
[ -x "$prefix/bin/cachette" ] || fail "bin/cachette is not executable"
[ ! -e "$prefix/etc" ] || fail "a plain install wrote etc/ (the service component is package-only)"
soname=$(readelf -d "$prefix/$libdir/libcachette.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = libcachette.so.0 ] || fail "SONAME is '$soname', expected libcachette.so.0"
[ "$(readlink "$prefix/$libdir/libcachette.so")" = libcachette.so.0 ] ||
  fail "libcachette.so does not link to libcachette.so.0"
# (Outputs are captured before grep -q: under pipefail, grep leaving early fails the pipe.)
dynsyms=$(nm -D --defined-only "$prefix/$libdir/libcachette.so")
for sym in ct_cache_open ct_cache_put ct_cache_get ct_load_chunk ct_status_name; do
  grep -qw "$sym" <<<"$dynsyms" || fail "libcachette.so does not export $sym"
done
grep -q 'cachette::Cache::Open' <<<"$(nm -C --defined-only "$prefix/$libdir/libcachette.a" 2>&1)" ||
  fail "libcachette.a lacks cachette::Cache::Open"

# The public headers: exactly these, each including only <system> and "cachette/..." headers,
# each compiling on its own with the pkg-config flags alone.
headers=$(cd "$prefix/include" && find . -type f | sort | tr '\n' ' ')
expected=""
for h in cache cachette chunk hash status types; do expected+="./cachette/$h.h "; done
[ "$headers" = "$expected" ] || fail "installed headers: '$headers', expected '$expected'"
if grep -n '#include "' "$prefix"/include/cachette/*.h | grep -v '#include "cachette/'; then
  fail "an installed header includes a header that is not installed"
fi
export PKG_CONFIG_LIBDIR=$prefix/$libdir/pkgconfig PKG_CONFIG_PATH=
read -ra cflags <<<"$(pkg-config --cflags cachette)"
read -ra libs <<<"$(pkg-config --libs cachette)"
version=$(sed -n 's/^Version: //p' "$prefix/$libdir/pkgconfig/cachette.pc")
[ "$(pkg-config --modversion cachette)" = "$version" ] || fail "pkg-config --modversion cachette"
step "headers alone (cflags: ${cflags[*]})"
for h in "$prefix"/include/cachette/*.h; do
  echo "#include <cachette/$(basename "$h")>" |
    c++ -std=c++20 -Wall -Wextra -Werror "${cflags[@]}" -x c++ -fsyntax-only - ||
    fail "cachette/$(basename "$h") does not compile on its own"
done
echo '#include <cachette/cachette.h>' |
  cc -std=c99 -Wall -Wextra -Werror -pedantic "${cflags[@]}" -x c -fsyntax-only - ||
  fail "cachette/cachette.h is not C99"

# --- 2. A C program with pkg-config only, outside the source tree ------------------------------
# docs/c-api.md walks through this program: every line of its C blocks must be one of its lines.
awk '/^```c$/ { on = 1; next } /^```/ { on = 0 } on && NF' "$src/docs/c-api.md" |
  while IFS= read -r line; do
    grep -qxF -- "$line" "$src/tests/install/kv_roundtrip.c" ||
      fail "docs/c-api.md quotes a line kv_roundtrip.c does not have: $line"
  done
mkdir -p "$tmp/work"
cp "$src/tests/install/kv_roundtrip.c" "$tmp/work/"
cd "$tmp/work"
step "cc kv_roundtrip.c \$(pkg-config --cflags --libs cachette)"
cc -std=c11 -Wall -Wextra -Werror kv_roundtrip.c "${cflags[@]}" "${libs[@]}" -o kv_roundtrip
# The linker took the installed library (no rpath: the loader is told where it is).
loaded=$(LD_LIBRARY_PATH=$prefix/$libdir ldd ./kv_roundtrip)
grep -q "$prefix/$libdir/libcachette.so.0" <<<"$loaded" ||
  fail "kv_roundtrip does not load $prefix/$libdir/libcachette.so.0"
LD_LIBRARY_PATH=$prefix/$libdir ./kv_roundtrip "$tmp/cache-c" || fail "kv_roundtrip (shared)"
[ -n "$(ls -A "$tmp/cache-c")" ] || fail "kv_roundtrip left nothing in its disk directory"
# Rerun on the same directory: the program must see the chunks already there and refuse.
if LD_LIBRARY_PATH=$prefix/$libdir ./kv_roundtrip "$tmp/cache-c" 2>/dev/null; then
  fail "kv_roundtrip did not find the chunks of its previous run"
fi
# Static: the Libs.private of cachette.pc are enough to link libcachette.a.
read -ra static_libs <<<"$(pkg-config --static --libs cachette |
  sed 's/-lcachette/-Wl,-Bstatic -lcachette -Wl,-Bdynamic/')"
cc -std=c11 kv_roundtrip.c "${cflags[@]}" "${static_libs[@]}" -o kv_roundtrip_static
if grep -q libcachette <<<"$(ldd ./kv_roundtrip_static)"; then
  fail "kv_roundtrip_static loads libcachette.so"
fi
./kv_roundtrip_static "$tmp/cache-c-static" || fail "kv_roundtrip (static)"

# --- 3. A CMake project with find_package(cachette) ---------------------------------------------
step "find_package(cachette) project"
cp -r "$src/tests/install/consumer" "$tmp/consumer"
cp "$src/tests/install/kv_roundtrip.c" "$tmp/consumer/"
cmake -S "$tmp/consumer" -B "$tmp/consumer-build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_BUILD_TYPE=Release >"$tmp/consumer.log" 2>&1 || {
  cat "$tmp/consumer.log"
  fail "configuring the find_package(cachette) project"
}
cmake --build "$tmp/consumer-build" -j 2 >>"$tmp/consumer.log" 2>&1 || {
  cat "$tmp/consumer.log"
  fail "building the find_package(cachette) project"
}
LD_LIBRARY_PATH=$prefix/$libdir "$tmp/consumer-build/cpp_roundtrip" "$tmp/cache-cpp" ||
  fail "cpp_roundtrip"
"$tmp/consumer-build/c_roundtrip_static" "$tmp/cache-cmake-static" || fail "c_roundtrip_static"

# --- 4. The installed binary ---------------------------------------------------------------------
cd /
bin=$prefix/bin/cachette
step "--help of every subcommand"
# Every subcommand, found from the Subcommands: section of its parent's --help, recursively.
help_all() {
  local out subs s
  out=$("$bin" "$@" --help) || fail "cachette $* --help exits non-zero"
  grep -q '^Options:' <<<"$out" || fail "cachette $* --help lists no options"
  subs=$(awk '/^Subcommands:/ { on = 1; next }
              on && /^  [a-z]/ { print $1 }
              on && /^$/ { on = 0 }' <<<"$out")
  for s in $subs; do help_all "$@" "$s"; done
  n_help=$((n_help + 1))
}
n_help=0
help_all
[ "$n_help" -ge 20 ] || fail "only $n_help commands have --help (expected every subcommand, >= 20)"
echo "install_test: $n_help commands print --help"

step "the service's config, missing and invalid configs"
if "$bin" serve --config "$tmp/missing.toml" >"$tmp/out" 2>&1; then
  fail "a missing config was accepted"
fi
grep -q "missing.toml" "$tmp/out" || fail "the message does not name the config: $(cat "$tmp/out")"
# Unreadable (root reads anything, so only checked as another user).
if [ "$(id -u)" != 0 ]; then
  printf 'port = 0\n' >"$tmp/unreadable.toml"
  chmod 000 "$tmp/unreadable.toml"
  if "$bin" serve --config "$tmp/unreadable.toml" >"$tmp/out" 2>&1; then
    fail "an unreadable config was accepted"
  fi
  grep -q "unreadable.toml: cannot be read" "$tmp/out" ||
    fail "the message does not say the config cannot be read: $(cat "$tmp/out")"
fi
printf 'port = 0\nno_such_key = 1\n' >"$tmp/bad.toml"
if "$bin" serve --config "$tmp/bad.toml" >"$tmp/out" 2>&1; then
  fail "an invalid config was accepted"
fi
grep -q "no_such_key" "$tmp/out" || fail "the message does not name the bad key: $(cat "$tmp/out")"

# Starts `cachette serve --config $1` (logging to $2), waits until it is ready, stops it with
# SIGTERM and expects exit status 0.
serve_smoke() {
  "$bin" serve --config "$1" --threads 1 >"$2" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 300); do
    grep -q 'ready: model' "$2" && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  grep -q 'ready: model' "$2" || {
    cat "$2"
    fail "serve --config $1 did not get ready"
  }
  kill -TERM "$server_pid"
  wait "$server_pid" || fail "serve --config $1 did not exit 0 after SIGTERM"
  server_pid=""
}

# The packaged default config, with a free port and a temporary disk tier: it must parse, and
# the server must load the installed model (found through /proc/self/exe, not the source tree).
sed -e 's|^port = 8080|port = 0|' -e "s|^disk_dir = .*|disk_dir = \"$tmp/cache-serve\"|" \
  "$src/packaging/serve.toml" >"$tmp/serve.toml"
grep -q '^port = 0' "$tmp/serve.toml" || fail "packaging/serve.toml has no 'port = 8080' line"
serve_smoke "$tmp/serve.toml" "$tmp/serve.log"
model=$prefix/share/cachette/models/cachette-tiny-q8_0.gguf
grep -q "loading model $model" "$tmp/serve.log" || {
  cat "$tmp/serve.log"
  fail "the installed binary did not load the installed model"
}
grep -q "disk $tmp/cache-serve" "$tmp/serve.log" || fail "the disk tier of the config is not on"
# Every key the config shows commented out is a real key with a valid value (all uncommented,
# but for those that need a file or a server).
sed -E -e 's/^# ([a-z_]+ = )/\1/' -e '/^(model|redis|api_key_file) = /d' \
  -e 's|^port = 8080|port = 0|' -e "s|^disk_dir = .*|disk_dir = \"$tmp/cache-keys\"|" \
  "$src/packaging/serve.toml" >"$tmp/serve-keys.toml"
n_keys=$(grep -c '^[a-z_]* = ' "$tmp/serve-keys.toml")
[ "$n_keys" -ge 30 ] || fail "only $n_keys keys in packaging/serve.toml"
serve_smoke "$tmp/serve-keys.toml" "$tmp/serve-keys.log"

# --- 5. Debian packages --------------------------------------------------------------------------
step "cpack -G DEB"
cpack --config "$build/CPackConfig.cmake" -G DEB -B "$tmp/deb" >"$tmp/cpack.log" 2>&1 || {
  cat "$tmp/cpack.log"
  fail "cpack -G DEB"
}
arch=$(dpkg --print-architecture)
deb() { echo "$tmp/deb/$1_${version}-1_${arch}.deb"; }
for p in cachette libcachette0 libcachette-dev; do [ -f "$(deb $p)" ] || fail "no $(deb $p)"; done
# Each package holds exactly its files (the list, without directories and dates).
contents() { dpkg-deb -c "$(deb "$1")" | awk '$1 !~ /^d/ { print $6 }' | sort | tr '\n' ' '; }
so=libcachette.so.$version
check_contents() {
  local got
  got=$(contents "$1")
  [ "$got" = "$2" ] || fail "$1 holds '$got', expected '$2'"
}
check_contents cachette "./etc/cachette/serve.toml ./usr/bin/cachette \
./usr/lib/systemd/system/cachette.service ./usr/share/cachette/models/cachette-tiny-q8_0.gguf \
./usr/share/man/man1/cachette.1 "
check_contents libcachette0 "./usr/$libdir/libcachette.so.0 ./usr/$libdir/$so "
# CMake's per-configuration targets file: cachetteTargets-<build type>.cmake.
config=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build/CMakeCache.txt" |
  tr '[:upper:]' '[:lower:]')
inc=./usr/include/cachette
cm=./usr/$libdir/cmake/cachette
check_contents libcachette-dev "$inc/cache.h $inc/cachette.h $inc/chunk.h $inc/hash.h \
$inc/status.h $inc/types.h $cm/cachetteConfig.cmake $cm/cachetteConfigVersion.cmake \
$cm/cachetteTargets-${config:-noconfig}.cmake $cm/cachetteTargets.cmake \
./usr/$libdir/libcachette.a ./usr/$libdir/libcachette.so ./usr/$libdir/pkgconfig/cachette.pc "
# Depends: what dpkg-shlibdeps found in the ELF files (the runtime libraries they link).
depends() { dpkg-deb -f "$(deb "$1")" Depends; }
for lib in libc6 libstdc++6 libzstd1 libhiredis libxxhash0; do
  grep -q "$lib" <<<"$(depends cachette)" ||
    fail "cachette does not depend on $lib: $(depends cachette)"
  grep -q "$lib" <<<"$(depends libcachette0)" ||
    fail "libcachette0 does not depend on $lib: $(depends libcachette0)"
done
grep -qF "libcachette0 (= ${version}-1)" <<<"$(depends libcachette-dev)" ||
  fail "libcachette-dev does not depend on libcachette0: $(depends libcachette-dev)"
# The service: conffile, maintainer scripts, and the unit's command and user.
dpkg-deb -e "$(deb cachette)" "$tmp/control"
grep -qx /etc/cachette/serve.toml "$tmp/control/conffiles" || fail "serve.toml is not a conffile"
for script in postinst prerm postrm; do
  [ -x "$tmp/control/$script" ] || fail "cachette has no executable $script"
  sh -n "$tmp/control/$script" || fail "$script is not valid sh"
done
dpkg-deb -e "$(deb libcachette0)" "$tmp/control-lib"
grep -q '^libcachette 0 libcachette0' "$tmp/control-lib/shlibs" || fail "libcachette0 has no shlibs"
dpkg-deb -x "$(deb cachette)" "$tmp/root"
unit=$tmp/root/usr/lib/systemd/system/cachette.service
grep -qx 'ExecStart=/usr/bin/cachette serve --config /etc/cachette/serve.toml' "$unit" ||
  fail "the unit does not run serve --config /etc/cachette/serve.toml"
grep -qx 'User=cachette' "$unit" || fail "the unit does not run as the cachette user"
grep -qx 'CacheDirectory=cachette' "$unit" || fail "the unit has no /var/cache/cachette"
cmp -s "$tmp/root/etc/cachette/serve.toml" "$src/packaging/serve.toml" ||
  fail "the packaged serve.toml differs from packaging/serve.toml"
# The packaged binary is stripped but the same program: it runs from the package's tree.
"$tmp/root/usr/bin/cachette" --help >/dev/null || fail "the packaged binary does not run"
# systemd's own check of the unit (it prints what it ignores: unknown keys, bad values), on a
# copy that starts the packaged binary where it was unpacked.
if command -v systemd-analyze >/dev/null 2>&1; then
  mkdir -p "$tmp/unit"
  sed "s|^ExecStart=/usr/bin/cachette|ExecStart=$tmp/root/usr/bin/cachette|" "$unit" \
    >"$tmp/unit/cachette.service"
  verify=$(systemd-analyze verify "$tmp/unit/cachette.service" 2>&1) ||
    fail "systemd-analyze verify cachette.service: $verify"
  [ -z "$verify" ] || fail "systemd-analyze verify cachette.service: $verify"
fi

step "OK"
