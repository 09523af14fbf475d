#!/bin/sh
# Installs the Debian (12, bookworm) packages prefork needs, with apt-get (through sudo when not
# root). Fast on re-runs: does nothing when all are installed.
# Usage: tests/deps.sh           what building and running the examples needs
#        tests/deps.sh --tests   that, plus what the tests, the other builds and the benchmarks
#                                need (what .ci/run uses)
set -eu

case "${1:-}" in
  "") with_tests=0 ;;
  --tests) with_tests=1 ;;
  *) echo "usage: tests/deps.sh [--tests]" >&2; exit 2 ;;
esac

# The build set. g++, cmake, ninja-build: the compiler and the build (the presets use Ninja).
# catch2: Catch2 v2, found when the presets configure the tests (otherwise fetched with git).
# nlohmann-json3-dev, libasio-dev, libhiredis-dev: the examples json_codec, asio_hello and
# sessions' --store redis (each is skipped, or built without its Redis option, when missing).
# curl: to try the examples as the README says.
packages="
  g++
  cmake
  ninja-build
  catch2
  nlohmann-json3-dev
  libasio-dev
  libhiredis-dev
  curl
  ca-certificates
"
# The test set. clang: the second compiler (the `clang` preset); libclang-rt-14-dev: clang's
# ASan/UBSan/LSan runtimes. meson: the Meson build. pkg-config, make: the pkg-config consumer
# (tests/consumers). apache2-utils (ab), wrk: the benchmarks' clients. redis-server,
# redis-tools (redis-cli), nginx: examples/deploy/run.sh (two sessions instances behind nginx
# sharing sessions in Redis, a CI stage) and the Redis store tests; they start their own Redis
# and nginx on free ports. procps (ps, pgrep), psmisc (killall, fuser), iproute2 (ss), lsof:
# inspecting workers and descriptors.
test_packages="
  clang
  libclang-rt-14-dev
  meson
  pkg-config
  make
  apache2-utils
  wrk
  redis-server
  redis-tools
  nginx
  procps
  psmisc
  iproute2
  lsof
"
# Installing nginx and redis-server would start system services on ports 80 and 6379 and enable
# them at boot. Nothing here needs them: while this script installs, a policy-rc.d (unless the
# system has one) tells the package scripts not to start any service (invoke-rc.d(8),
# deb-systemd-invoke), and the units of the services this script installed are then disabled.
services="nginx redis-server"

[ "$with_tests" -eq 1 ] && packages="$packages $test_packages"

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

policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  # Exit status 101: "action forbidden by policy" (the Debian policy-rc.d interface).
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  own_policy=1
  trap '$sudo rm -f "$policy"' EXIT
  trap 'exit 1' INT TERM
fi

echo "deps.sh: installing:$missing"
$sudo apt-get update
# shellcheck disable=SC2086 # word splitting of the package list is intended
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing

for s in $services; do
  case " $missing " in
    *" $s "*)
      if [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now "$s.service" >/dev/null 2>&1 || true
        echo "deps.sh: $s installed; its service is stopped and disabled (the tests start their own)"
      fi
      ;;
  esac
done
[ "$own_policy" -eq 1 ] && echo "deps.sh: no service was started during the installation"
exit 0
