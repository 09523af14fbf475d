#!/bin/sh
# Installs every Debian (12, bookworm) package needed to build prefork, run its tests and run the
# examples and their documented load tests. Fast on re-runs: does nothing when all are installed.
# Usage: tests/deps.sh   (as root, or as a user with sudo)
set -eu

packages="
  g++
  clang
  libclang-rt-14-dev
  cmake
  ninja-build
  meson
  pkg-config
  make
  catch2
  nlohmann-json3-dev
  libasio-dev
  curl
  apache2-utils
  wrk
  redis-server
  redis-tools
  libhiredis-dev
  nginx
  procps
  psmisc
  iproute2
  lsof
  ca-certificates
"
# clang: second compiler (the `clang` preset); libclang-rt-14-dev: clang's ASan/UBSan/LSan
# runtimes. catch2: Catch2 v2 (CMake package and catch2.pc). nlohmann-json3-dev: the example
# that plugs a JSON library into a codec. libasio-dev: standalone asio for examples/asio_hello. make: the pkg-config consumer (tests/consumers). curl, apache2-utils (ab), wrk: clients the examples'
# instructions and the benchmarks use. redis-server, redis-tools (redis-cli), libhiredis-dev, nginx:
# examples/deploy/run.sh (two sessions instances behind nginx sharing sessions in Redis, a CI
# stage) and sessions' --store redis; the script starts its own Redis and nginx on free ports,
# so the services these packages start on a machine with systemd (ports 6379 and 80) are not
# needed. procps (ps, pgrep), psmisc (killall, fuser), iproute2
# (ss), lsof: inspecting workers and descriptors.

missing=""
for p in $packages; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done

if [ -z "$missing" ]; then
  echo "deps.sh: all packages already installed"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=""
else
  sudo="sudo"
fi

echo "deps.sh: installing:$missing"
$sudo apt-get update
# shellcheck disable=SC2086 # word splitting of the package list is intended
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
