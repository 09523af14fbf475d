#!/usr/bin/env bash
# Where a hello master's time goes under new-connection-per-request load: system calls per
# connection (perf stat on the syscall tracepoints; strace -c when perf cannot), CPU per
# connection, and with --record the call graph (perf record -g). A diagnostic, not a benchmark:
# the numbers feed the findings next to run.sh's tables. Builds nothing; never run in CI.
#
#   tests/bench/profile_master.sh [BUILD_DIR] [--balance POLICY] [--seconds N] [--record]
#
#   BUILD_DIR  default: build, next to tests/ (needs BUILD_DIR/examples/hello)
#   --balance  round-robin (default), least-connections, ip-hash, shared, reuse-port
#   --seconds  load duration, default 5 (wrk -t2 -c200 -H 'Connection: close')
#   --record   also perf record -g the master and print the heaviest call chains
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build_dir="$BENCH_DIR/../../build"
balance=round-robin
seconds=5
record=0
die() { printf 'profile_master.sh: %s\n' "$*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --balance) (($# > 1)) || die "--balance needs a policy"; balance=$2; shift ;;
    --seconds) (($# > 1)) || die "--seconds needs a number"; seconds=$2; shift ;;
    --record) record=1 ;;
    -h | --help) sed -n '7,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) die "unknown option '$1'" ;;
    *) build_dir=$1 ;;
  esac
  shift
done
hello="$build_dir/examples/hello"
[[ -x $hello ]] || die "$hello not found: build it first"
command -v wrk >/dev/null || die "wrk is missing"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/prefork-profile.XXXXXX")
master=""
tool_pid=""
record_pid=""
cleanup() {
  if [[ -n $tool_pid ]]; then kill -INT "$tool_pid" 2>/dev/null; wait "$tool_pid" 2>/dev/null; fi
  if [[ -n $record_pid ]]; then kill -INT "$record_pid" 2>/dev/null; wait "$record_pid" 2>/dev/null; fi
  if [[ -n $master ]] && kill -0 "$master" 2>/dev/null; then
    kill -TERM "$master" 2>/dev/null || true
    wait "$master" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT

"$hello" --host 127.0.0.1 --port 0 --workers 2 --work 0 --balance "$balance" >"$tmp/hello.log" 2>&1 &
master=$!
deadline=$(($(date +%s) + 15))
port=""
until [[ -n $port ]] && (($(grep -c '^Started process' "$tmp/hello.log" || true) >= 2)) &&
  curl -fsS --max-time 2 "http://127.0.0.1:$port/" >/dev/null 2>&1; do
  if ! kill -0 "$master" 2>/dev/null || (($(date +%s) >= deadline)); then
    cat "$tmp/hello.log" >&2
    die "hello did not start"
  fi
  port=$(sed -n 's/^Listening on .*:\([0-9][0-9]*\)$/\1/p' "$tmp/hello.log")
  sleep 0.05
done

events=accept4,sendmsg,recvmsg,close,epoll_wait,epoll_ctl,read,write,writev,sendto,recvfrom
perf_events="raw_syscalls:sys_enter,task-clock,context-switches"
for e in ${events//,/ }; do perf_events="$perf_events,syscalls:sys_enter_$e"; done

# perf starts disabled (-D -1) and is switched on and off through --control fifos; each command
# is acknowledged, so the counted window is exactly the load's, with no sleep to guess it.
# strace -c has no such switch: it counts from its "attached" line to the SIGINT after the load.
mode=""
record_pid=""
if command -v perf >/dev/null &&
  perf stat -e syscalls:sys_enter_close -p "$master" -o "$tmp/probe" -- true >/dev/null 2>&1; then
  mode=perf
  mkfifo "$tmp/stat.ctl" "$tmp/stat.ack"
  perf stat -D -1 --control "fifo:$tmp/stat.ctl,$tmp/stat.ack" -e "$perf_events" -p "$master" \
    -o "$tmp/stat.txt" 2>/dev/null &
  tool_pid=$!
  exec 7>"$tmp/stat.ctl" 8<"$tmp/stat.ack"
  if ((record)); then
    mkfifo "$tmp/rec.ctl" "$tmp/rec.ack"
    perf record -D -1 --control "fifo:$tmp/rec.ctl,$tmp/rec.ack" -F 2000 -g -p "$master" \
      -o "$tmp/perf.data" 2>"$tmp/record.err" &
    record_pid=$!
    exec 5>"$tmp/rec.ctl" 6<"$tmp/rec.ack"
  fi
elif command -v strace >/dev/null; then
  mode=strace
  strace -c -f -p "$master" -o "$tmp/stat.txt" 2>"$tmp/strace.err" &
  tool_pid=$!
  until grep -q attached "$tmp/strace.err" 2>/dev/null; do sleep 0.05; done
else
  die "neither perf nor strace is usable"
fi
perf_switch() {  # enable|disable
  [[ $mode == perf ]] || return 0
  local ack=""
  echo "$1" >&7; read -r -t 10 -u 8 ack || true
  [[ $ack == ack ]] || die "perf stat did not acknowledge '$1'"
  if [[ -n $record_pid ]]; then
    ack=""
    echo "$1" >&5; read -r -t 10 -u 6 ack || true
    [[ $ack == ack ]] || die "perf record did not acknowledge '$1'"
  fi
}

cpu_ticks() { awk '{ sub(/.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' "/proc/$1/stat"; }
perf_switch enable
ticks_before=$(cpu_ticks "$master")
wrk -t2 -c200 -d"${seconds}s" -H 'Connection: close' "http://127.0.0.1:$port/" >"$tmp/wrk.txt"
ticks_after=$(cpu_ticks "$master")
perf_switch disable
recorded=0
if [[ -n $record_pid ]]; then kill -INT "$record_pid"; wait "$record_pid" || true; record_pid=""; recorded=1; fi
kill -INT "$tool_pid"; wait "$tool_pid" || true; tool_pid=""

conns=$(sed -n 's/^ *\([0-9][0-9]*\) requests in .*/\1/p' "$tmp/wrk.txt")
echo "hello --balance $balance, wrk -t2 -c200 -d${seconds}s -H 'Connection: close': $conns connections, $(sed -n 's/^Requests\/sec: *//p' "$tmp/wrk.txt") req/s"
awk -v t=$((ticks_after - ticks_before)) -v h="$(getconf CLK_TCK)" -v c="$conns" \
  'BEGIN { printf "master CPU: %.0f ms, %.2f us per connection\n", t * 1000 / h, t * 1e6 / h / c }'
echo "system calls per connection ($mode):"
if [[ $mode == perf ]]; then
  awk -v c="$conns" '$2 ~ /^(syscalls|raw_syscalls):/ || $2 == "context-switches" {
      gsub(/,/, "", $1); name = $2; sub(/.*sys_enter_?/, "", name); if (name == "") name = "all"
      if ($1 > 0) printf "  %-16s %10d  %6.3f\n", name, $1, $1 / c }' "$tmp/stat.txt"
else
  awk -v c="$conns" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ { printf "  %-16s %10d  %6.3f\n", $NF, $4, $4 / c }' "$tmp/stat.txt"
fi
if ((recorded)); then
  echo "heaviest call chains in the master (perf report --children):"
  perf report -i "$tmp/perf.data" --children --sort sym --stdio -g none 2>/dev/null |
    grep -E '^ +[0-9]' | head -n 25 || true  # head may close the pipe early
fi
