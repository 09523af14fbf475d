#!/usr/bin/env bash
# prefork's operations benchmark (issue 7): what asking a running cluster costs, next to PM2 (the
# seed's server.js (tests/bench/node/server.js) run by `pm2 start -i 2`, PM2 from the npm registry) in one run on
# this machine. For each: the wall time of the CLI, median of RUNS (`hello ctl status` against
# `pm2 jlist`, `hello ctl reload` against `pm2 reload`), then, for hello only, status requests on
# one open control connection (the protocol without a process start) and keep-alive throughput
# with and without a status request every 10 ms. Prints a Markdown report; builds nothing and
# never runs in CI: timings from a shared runner compare noise.
#
#   tests/bench/control.sh [BUILD_DIR] [--runs N]
#
#   BUILD_DIR  a built tree (default: build); needs BUILD_DIR/examples/hello.
#   --runs N   CLI calls per operation and program (default 20; reloads: N/4, at least 3).
#
# Needs node and npm (PM2 is installed into a temporary directory; without it the PM2 column says
# n/a), python3, wrk, and the anchor: SERVER_JS=/path/to/server.js, by default
# tests/bench/node/server.js in this repository.
set -euo pipefail

{

bench_name=control
bench_script=${BASH_SOURCE[0]}
# note, die, free_port, fmt_int; LC_ALL=C, BENCH_DIR and ROOT.
# shellcheck source=tests/bench/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

build_dir="$ROOT/build" runs=20
while (($#)); do
  case "$1" in
    --runs) (($# > 1)) || die "--runs needs a number"; runs=$2; shift ;;
    --runs=*) runs=${1#--runs=} ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) build_dir=$1 ;;
  esac
  shift
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs: '$runs' is not a positive number"
hello="$build_dir/examples/hello"
[[ -x $hello ]] || die "$hello is not built (cmake --build --preset release --target hello)"
server_js=${SERVER_JS:-$BENCH_DIR/node/server.js}
for tool in python3 wrk; do command -v "$tool" >/dev/null || die "needs $tool"; done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/prefork-control.XXXXXX")
hello_pid="" pm2=""
finish() {
  [[ -n $hello_pid ]] && kill -TERM "$hello_pid" 2>/dev/null && wait "$hello_pid" 2>/dev/null
  [[ -n $pm2 ]] && PM2_HOME="$tmp/pm2" "$pm2" kill >/dev/null 2>&1
  rm -rf "$tmp"
}
trap finish EXIT

# The median wall time, in ms, of `"$@"` run $1 times (stdout and stderr dropped; a failure
# stops the benchmark).
median_ms() {
  local n=$1 i t0 t1
  shift
  local times=()
  for ((i = 0; i < n; i++)); do
    t0=$EPOCHREALTIME
    "$@" >/dev/null 2>&1 || die "failed: $*"
    t1=$EPOCHREALTIME
    times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) * 1000 }')")
  done
  printf '%s\n' "${times[@]}" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.1fx", b / a; else print "n/a" }'; }

# ---- hello
port=$(free_port)
socket="$tmp/hello.sock"
"$hello" --workers 2 --work 0 --port "$port" --control "$socket" >"$tmp/hello.log" 2>&1 &
hello_pid=$!
for ((i = 0; i < 200; i++)); do
  [[ $(grep -c '^Started process' "$tmp/hello.log" || true) -ge 2 ]] && break
  kill -0 "$hello_pid" 2>/dev/null || die "hello exited: $(cat "$tmp/hello.log")"
  sleep 0.05
done
reloads=$((runs / 4 < 3 ? 3 : runs / 4))
note "hello: ctl status x$runs, ctl reload x$reloads"
h_status=$(median_ms "$runs" "$hello" ctl status --control "$socket")
h_reload=$(median_ms "$reloads" "$hello" ctl reload --control "$socket")

# The protocol alone: 2,000 status requests on one connection, each answered (the master asks
# both workers for their counters) before the next is sent.
h_rtt=$(python3 - "$socket" <<'EOF'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
times = []
for _ in range(2000):
    t = time.perf_counter()
    f.write(b'{"command":"status"}\n'); f.flush()
    line = f.readline()
    times.append(time.perf_counter() - t)
    assert line.startswith(b'{"ok":true'), line
times.sort()
print("%.0f %.0f" % (times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6))
EOF
)

# Keep-alive throughput, then the same with a status request every 10 ms from another process.
load() { wrk -t2 -c100 -d8s "http://127.0.0.1:$port/" | awk '/^Requests\/sec/ { printf "%d", $2 }'; }
h_plain=$(load)
python3 - "$socket" "$tmp/poll.count" <<'EOF' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
n = 0
end = time.monotonic() + 9
while time.monotonic() < end:
    f.write(b'{"command":"status"}\n'); f.flush(); f.readline(); n += 1
    time.sleep(0.01)
open(sys.argv[2], "w").write(str(n))
EOF
poller=$!
h_polled=$(load)
wait "$poller"
polls=$(cat "$tmp/poll.count")
kill -TERM "$hello_pid"
wait "$hello_pid" || true
hello_pid=""

# ---- PM2
p_status=n/a p_reload=n/a pm2_version=n/a
if [[ -f $server_js ]] && command -v npm >/dev/null &&
  npm install --prefix "$tmp/npm" --no-audit --no-fund --silent pm2@5 >"$tmp/npm.log" 2>&1; then
  pm2="$tmp/npm/node_modules/.bin/pm2"
  export PM2_HOME="$tmp/pm2"
  pm2_version=$("$pm2" --version 2>/dev/null | tail -n 1)
  PORT=$(free_port) WORK=0 QUIET=1 "$pm2" start "$server_js" -i 2 --name seed >/dev/null 2>&1 ||
    die "pm2 start failed"
  note "PM2 $pm2_version: jlist x$runs, reload x$reloads"
  p_status=$(median_ms "$runs" "$pm2" jlist)
  p_reload=$(median_ms "$reloads" "$pm2" reload seed)
else
  note "PM2 not measured (npm install pm2 failed or no anchor at $server_js)"
fi

cat <<EOF
## Operations: hello's control socket next to PM2

$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, hello and the seed's server.js with 2 workers each, \`--work 0\`; PM2 $pm2_version, node $(node --version 2>/dev/null || echo n/a).

| operation (CLI wall time, median) | hello | PM2 | PM2 / hello |
|---|---:|---:|---:|
| status (\`hello ctl status\`, \`pm2 jlist\`), ms | $h_status | $p_status | $(ratio "$h_status" "$p_status") |
| rolling restart, returns when done (\`hello ctl reload\`, \`pm2 reload\`), ms | $h_reload | $p_reload | $(ratio "$h_reload" "$p_reload") |

- One control connection, 2,000 status requests (each asks both workers for their counters):
  p50 ${h_rtt% *} µs, p99 ${h_rtt#* } µs.
- Keep-alive throughput (\`wrk -t2 -c100 -d8s\`): $(fmt_int "$h_plain") req/s; with a status
  request every 10 ms ($polls answered): $(fmt_int "$h_polled") req/s.
EOF

}
