#!/usr/bin/env bash
# prefork's soak test (issue 4, zero downtime): build/examples/hello under load while its workers
# are replaced one by one (SIGUSR2 every 2 s), while its master hands over to a new master
# (SIGUSR1), and while its workers crash at random, next to the seed's Node cluster.js under the
# same load and the same restarts. Prints a Markdown report: requests served and failed, socket
# errors by kind, reload and upgrade times, availability under crashes, and whether issue 4's
# targets were reached. It builds nothing and never runs in CI.
#
#   tests/bench/soak.sh [BUILD_DIR] [--quick] [--only CASE[,CASE...]] [--out FILE] [--keep-logs]
#
#   BUILD_DIR   a configured and built tree (default: build, next to tests/); needs
#               BUILD_DIR/examples/hello. HELLO=/path/to/hello tests another binary instead.
#   --quick     6 s runs, restarts every 2 s, the upgrade at 2 s: checks the script, proves little.
#   --only      keepalive-reload  wrk -t2 -c200 -d20s (keep-alive), hello --workers 2 --work 0 and
#                                 Node cluster.js (WORK=0), SIGUSR2 to the master every 2 s
#               close-reload      ab -c200 -t20 -r (a new connection per request), the same restarts
#               upgrade           wrk -t2 -c200 -d10s, SIGUSR1 (master upgrade) to hello at 3 s;
#                                 then the new master must serve and the old one must have exited.
#                                 Node has no equivalent (n/a).
#               upgrade-close     the same with ab -c200 -t10 -r
#               crash             --work 10000000, each worker exits (status 1) at a random time
#                                 below 2 s and is replaced, ab -c200 -t20 -r: hello --crash-ms 2000,
#                                 Node cluster.js with CRASH_MS=2000 (read by the bench's server.js)
#               Default: all of them.
#   --out FILE  also write the final Markdown report to FILE.
#   --keep-logs keep the temporary directory (server logs with arrival times, wrk/ab output, the
#               times the signals were sent) and print its path.
#
# Needs curl, ab (apache2-utils) and wrk; node is optional (its rows print "n/a"), NODE=/path/to/node
# picks another one. Every server is bound to 127.0.0.1, on a port from --port 0 (hello) or a free
# port the kernel picked (Node); every process started here, including a new master started by an
# upgrade, is stopped by pid on exit.
set -euo pipefail

# The whole script is one compound command, parsed before any of it runs, so editing this file
# while a run is in progress cannot change what the run executes.
{

export LC_ALL=C  # $EPOCHREALTIME with a '.', and the tools' output in the words parsed below

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/../.." && pwd)

ALL_CASES=(keepalive-reload close-reload upgrade upgrade-close crash)

# ----------------------------------------------------------------------------------------------
# Options

build_dir="$ROOT/build"
quick=0
out_file=""
keep_logs=0
only=""

usage() {
  awk '/^#   tests\/bench\/soak.sh/ { p = 1 } p && !/^#/ { exit } p { sub(/^# ?/, ""); print }' \
    "${BASH_SOURCE[0]}"
}
die() { printf 'soak.sh: %s\n' "$*" >&2; exit 2; }
note() { printf '[soak %s] %s\n' "$(date '+%H:%M:%S')" "$*" >&2; }

while (($#)); do
  case "$1" in
    --quick) quick=1 ;;
    --only) (($# > 1)) || die "--only needs a case"; only="$only,$2"; shift ;;
    --only=*) only="$only,${1#--only=}" ;;
    --out) (($# > 1)) || die "--out needs a file"; out_file=$2; shift ;;
    --out=*) out_file=${1#--out=} ;;
    --keep-logs) keep_logs=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) build_dir=$1 ;;
  esac
  shift
done

declare -A want=()
if [[ -z $only ]]; then
  for c in "${ALL_CASES[@]}"; do want[$c]=1; done
else
  IFS=, read -ra picked <<<"${only#,}"
  for c in "${picked[@]}"; do
    case "$c" in
      keepalive-reload | close-reload | upgrade | upgrade-close | crash) want[$c]=1 ;;
      *) die "--only: '$c' is not keepalive-reload, close-reload, upgrade, upgrade-close or crash" ;;
    esac
  done
fi
wanted() { [[ -n ${want[$1]:-} ]]; }

if ((quick)); then
  reload_secs=6 upgrade_secs=6 upgrade_at=2 crash_secs=6
else
  reload_secs=20 upgrade_secs=10 upgrade_at=3 crash_secs=20
fi
reload_every=2        # seconds between two SIGUSR2: the load pattern, not a synchronisation
crash_ms=2000         # each worker exits at a random time below this
cpu_work=10000000     # the seed's loop, for the crash case (about 1.4 ms per request in hello)
ab_requests=2000000   # ab -n: only a bound (-t ends the run); ab allocates 32 bytes per request
ready_timeout=15      # seconds a server may take to print its pids and answer
exit_timeout=20       # seconds an old master may take to drain and exit after an upgrade
                      # (drain_timeout 10 s, then kill_timeout 5 s, and a margin)

hello_source=${HELLO:-$build_dir/examples/hello}
[[ -x $hello_source ]] ||
  die "$hello_source not found: build it first (cmake --preset release && cmake --build --preset release), or set HELLO="
hello_source=$(cd "$(dirname "$hello_source")" && pwd)/$(basename "$hello_source")
for tool in curl ab wrk awk mkfifo; do
  command -v "$tool" >/dev/null || die "$tool is missing (tests/deps.sh installs it)"
done
node_bin=${NODE:-node}
have_node=0 node_exe=""
if command -v "$node_bin" >/dev/null && "$node_bin" --version >/dev/null 2>&1; then
  have_node=1
  node_exe=$(readlink -f "$(command -v "$node_bin")")
fi
((have_node)) || note "node not found: its rows print n/a"

# ----------------------------------------------------------------------------------------------
# Processes: everything started here is recorded and stopped by pid, never by name.

tmp=$(mktemp -d "${TMPDIR:-/tmp}/prefork-soak.XXXXXX")
started=()      # servers (the masters started here) and load generators
stampers=()     # the loops that copy a server's output to its logs
server_logs=()  # every server's log: cleanup also stops the masters and workers it names

# A zombie is not alive: an orphan (a new master after the old one exited, a worker whose master
# died) is reaped by pid 1, which may take its time, and kill -0 succeeds on a zombie.
alive() {
  local s
  { read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }
  [[ ${s:0:1} != Z ]]
}

# Polls (every 50 ms) until every pid given has exited, at most $1 seconds. Returns 1 on timeout.
wait_gone() {
  local deadline=$(($(date +%s) + $1)) p left
  shift
  while :; do
    left=0
    for p in "$@"; do alive "$p" && left=1; done
    ((left)) || return 0
    (($(date +%s) >= deadline)) && return 1
    sleep 0.05
  done
}

# Whether pid $1 runs one of the binaries started here (the copy of hello, node): a pid read from
# a log may have been reused by another program since.
ours() {
  local exe
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}
  [[ $exe == "$hello" || (-n $node_exe && $exe == "$node_exe") ]]
}

# Stops a process started here, or named in a server's log: SIGTERM (hello's master drains its
# workers, Node's primary takes its workers down with it), SIGKILL to it and its children after 10 s.
stop_server() {
  local pid=$1 kids
  alive "$pid" || { wait "$pid" 2>/dev/null || true; forget "$pid"; return 0; }
  kids=$(pgrep -P "$pid" || true)
  kill -TERM "$pid" 2>/dev/null || true
  # shellcheck disable=SC2086 # kids is a list of pids
  if ! wait_gone 10 "$pid" $kids; then
    note "pid $pid did not stop within 10 s of SIGTERM; sending SIGKILL"
    # shellcheck disable=SC2086
    kill -KILL "$pid" $kids 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

# Drops a pid that has been stopped and reaped, so that cleanup never signals a reused pid.
forget() {
  local p kept=()
  for p in "${started[@]}"; do [[ $p == "$1" ]] || kept+=("$p"); done
  started=("${kept[@]}")
}

# The masters ("Master PID: N", a new master too) and then the workers ("Started process N") named
# in log $1 that still run one of our binaries: a new master is not a child of this shell, and the
# workers of a master that died are nobody's.
stop_named() {
  local pid
  for pid in $(awk '/^Master PID: [0-9]+$/ { print $3 }' "$1") \
    $(awk '/^Started process [0-9]+$/ { print $3 }' "$1"); do
    if alive "$pid" && ours "$pid"; then stop_server "$pid"; fi
  done
  return 0
}

# A server's output goes through a FIFO to a loop that writes each line to its log as it is and to
# a second log after its arrival time ($EPOCHREALTIME), from which the report times a reload or an
# upgrade (signal to the line announcing its end). The loop ends when the last writer (the master,
# its workers, a new master) has closed the FIFO.
stamp_lines() {
  local line
  exec 3>>"$1" 4>>"$2"
  while IFS= read -r line || [[ -n $line ]]; do
    printf '%s\n' "$line" >&3
    printf '%s %s\n' "$EPOCHREALTIME" "$line" >&4
  done
}
start_capture() {  # $1 name; sets srv_log, srv_stamped, srv_signals, srv_fifo, srv_stamper
  srv_log="$tmp/$1.log"
  srv_stamped="$tmp/$1.stamped"
  srv_signals="$tmp/$1.signals"
  srv_fifo="$tmp/$1.fifo"
  : >"$srv_log"
  : >"$srv_stamped"
  : >"$srv_signals"
  mkfifo "$srv_fifo"
  stamp_lines "$srv_log" "$srv_stamped" <"$srv_fifo" &
  srv_stamper=$!
  stampers+=("$srv_stamper")
  server_logs+=("$srv_log")
}
stop_capture() {  # $1 the stamper's pid
  wait_gone 5 "$1" || kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  local pid log
  for pid in "${started[@]}"; do stop_server "$pid"; done  # (a copy: stop_server edits it)
  for log in "${server_logs[@]}"; do stop_named "$log"; done
  for pid in "${stampers[@]}"; do stop_capture "$pid"; done
  if ((keep_logs)); then note "logs kept in $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Every run uses one copy of the binary, so a rebuild during the run cannot mix two versions. An
# upgrade execs the binary on disk: this copy, so old and new master run the same code here.
hello_stamp=$(date -r "$hello_source" '+%Y-%m-%d %H:%M:%S'; sha256sum "$hello_source" | cut -c1-12)
cp "$hello_source" "$tmp/hello"
hello="$tmp/hello"

# A port nobody listens on, chosen by the kernel (bind to port 0, read it, close). Another process
# could take it before Node binds it; start_node then sees EADDRINUSE and tries again.
free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  else
    local p
    while :; do
      p=$((20000 + RANDOM % 10000))
      (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
  fi
}

# ----------------------------------------------------------------------------------------------
# Servers

srv_pid=""     # the master (hello) or the primary (Node)
srv_port=""
srv_error=""   # why a start failed, for the report
run_no=0

count_started() { grep -c '^Started process' "$srv_log" 2>/dev/null || true; }

# Polls until $1 workers have printed "Started process" and the server answers, or fails.
wait_ready() {
  local want_started=$1 deadline=$(($(date +%s) + ready_timeout)) body
  while :; do
    if ! alive "$srv_pid"; then
      wait "$srv_pid" 2>/dev/null || true
      return 1
    fi
    if (($(count_started) >= want_started)) &&
      body=$(curl -fsS --max-time 2 "http://127.0.0.1:$srv_port/" 2>/dev/null) &&
      [[ $body == "Handled by process "* ]]; then
      return 0
    fi
    (($(date +%s) >= deadline)) && { note "server $srv_pid not ready within $ready_timeout s"; return 1; }
    sleep 0.05
  done
}
start_failed() {
  srv_error=$({ grep -v '^usage:\|^  ' "$srv_log" || true; } | tail -n 2 | tr '\n' ' ' |
    sed 's/ *$//; s/|/\\|/g')
  [[ -n $srv_error ]] || srv_error="no output"
  note "server did not start: $srv_error"
  return 1
}

# hello --host 127.0.0.1 --port 0 --workers $2 and the arguments after $2; $1 names its logs.
start_hello() {
  local name=$1 workers=$2 master
  shift 2
  run_no=$((run_no + 1))
  start_capture "$run_no-$name"
  "$hello" --host 127.0.0.1 --port 0 --workers "$workers" "$@" >"$srv_fifo" 2>&1 &
  srv_pid=$!
  started+=("$srv_pid")
  srv_port=""
  local deadline=$(($(date +%s) + ready_timeout))
  while [[ -z $srv_port ]]; do
    srv_port=$(sed -n 's/^Listening on .*:\([0-9][0-9]*\)$/\1/p' "$srv_log" | head -n 1)
    [[ -n $srv_port ]] && break
    if ! alive "$srv_pid" || (($(date +%s) >= deadline)); then start_failed; return 1; fi
    sleep 0.05
  done
  wait_ready "$workers" || { start_failed; return 1; }
  master=$(sed -n 's/^Master PID: \([0-9][0-9]*\)$/\1/p' "$srv_log" | head -n 1)
  [[ $master == "$srv_pid" ]] || { srv_error="printed Master PID '$master', started $srv_pid"; return 1; }
}

# The seed's cluster.js with 2 workers; $1 names its logs, $2 = WORK, $3 = CRASH_MS (empty: none).
start_node() {
  local name=$1 work=$2 crash=$3
  for _ in 1 2 3; do
    srv_port=$(free_port)
    run_no=$((run_no + 1))
    start_capture "$run_no-$name"
    WORKERS=2 PORT=$srv_port HOST=127.0.0.1 WORK=$work CRASH_MS=$crash \
      "$node_bin" "$BENCH_DIR/node/cluster.js" >"$srv_fifo" 2>&1 &
    srv_pid=$!
    started+=("$srv_pid")
    wait_ready 2 && return 0
    stop_server "$srv_pid"
    grep -q EADDRINUSE "$srv_log" || { start_failed; return 1; }
    note "port $srv_port was taken before Node bound it; trying another"
  done
  start_failed
}

# Stops the server of the run that ends, and whatever its log names (a new master), then waits
# for the capture to see the end of its output.
stop_run() {
  stop_server "$srv_pid"
  stop_named "$srv_log"
  stop_capture "$srv_stamper"
}

# Waits, at most 10 s, until the machine is at least 90% idle over 200 ms, so that one run's tail
# (the previous server's exit, the kernel tearing down sockets) does not land in the next run.
busy_runs=0
settle() {
  local deadline=$(($(date +%s) + 10)) a b
  while :; do
    read -ra a < <(grep '^cpu ' /proc/stat)
    sleep 0.2
    read -ra b < <(grep '^cpu ' /proc/stat)
    local total=0 i idle
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    idle=$((b[4] + b[5] - a[4] - a[5]))
    ((total > 0 && idle * 100 >= total * 90)) && return 0
    if (($(date +%s) >= deadline)); then
      busy_runs=$((busy_runs + 1))
      note "the machine is busy (under 90% idle for 10 s) before this run: other load?"
      return 0
    fi
  done
}

# ----------------------------------------------------------------------------------------------
# Load, with signals on a timed schedule

# wrk -t2 -c200 (keep-alive) or ab -c200 -r (a new connection per request: ab sends HTTP/1.0
# without keep-alive) for $3 seconds, in the background; output to $1. Sets load_pid. ab runs
# without -l: a response shorter than the first one (a connection closed before the whole response)
# is then a "Length" failure, which is what a drain that closes too early looks like to ab.
start_load() {
  local out=$1 tool=$2 secs=$3
  if [[ $tool == wrk ]]; then
    wrk -t2 -c200 -d"${secs}s" "http://127.0.0.1:$srv_port/" >"$out" 2>&1 &
  else
    # -t before -n: ab's -t sets the request count to 50,000, which -n then raises.
    ab -q -r -c 200 -t "$secs" -n "$ab_requests" "http://127.0.0.1:$srv_port/" >"$out" 2>&1 &
  fi
  load_pid=$!
  started+=("$load_pid")
}

# Runs the load ($1 output, $2 wrk|ab, $3 seconds) and sends signal $4 to pid $5 at $6 s after the
# load started, then every $7 s (0: once), never at or after the load's end. Each signal's time
# goes to $srv_signals. Returns the load generator's exit status.
load_with_signals() {
  local out=$1 tool=$2 secs=$3 sig=$4 target=$5 at=$6 every=$7 t0 left rc=0
  start_load "$out" "$tool" "$secs"
  t0=${EPOCHREALTIME/./}  # microseconds
  while ((at < secs)); do
    left=$((t0 + at * 1000000 - ${EPOCHREALTIME/./}))
    if ((left > 0)); then sleep "$((left / 1000000)).$(printf '%06d' $((left % 1000000)))"; fi
    alive "$load_pid" || break
    if ! alive "$target"; then note "pid $target (the master) is gone: no more SIG$sig"; break; fi
    echo "$EPOCHREALTIME" >>"$srv_signals"
    kill -"$sig" "$target" 2>/dev/null || true
    ((every > 0)) || break
    at=$((at + every))
  done
  wait "$load_pid" || rc=$?
  forget "$load_pid"
  return "$rc"
}
load_only() {  # $1 output, $2 wrk|ab, $3 seconds
  local rc=0
  start_load "$@"
  wait "$load_pid" || rc=$?
  forget "$load_pid"
  return "$rc"
}

# Parses a wrk or ab output ($1 tool, $2 file; $3 the server's log). Sets L_requests (responses),
# L_ok, L_failed (non-2xx + socket errors, + responses cut short for ab), L_sock (socket errors by
# kind), L_sock_n, L_non2xx, L_note. Returns 1 when the tool printed no result.
parse_load() {
  local tool=$1 out=$2 log=$3 c r w t e l complete short counted
  L_requests=0 L_ok=0 L_failed=0 L_sock="" L_sock_n=0 L_non2xx=0 L_note=""
  if [[ $tool == wrk ]]; then
    grep -q ' requests in ' "$out" || return 1
    L_requests=$(sed -n 's/^ *\([0-9][0-9]*\) requests in .*/\1/p' "$out")
    read -r c r w t < <(awk '/Socket errors:/ { gsub(/,/, ""); print $4, $6, $8, $10; f = 1 }
                             END { if (!f) print 0, 0, 0, 0 }' "$out")
    L_non2xx=$(awk '/Non-2xx or 3xx responses:/ { n = $NF } END { print n + 0 }' "$out")
    L_sock_n=$((c + r + w + t))
    L_sock="connect $c, read $r, write $w, timeout $t"
    L_failed=$((L_non2xx + L_sock_n))
    L_ok=$((L_requests - L_non2xx))
    return 0
  fi
  if ! grep -q '^Complete requests:' "$out"; then
    # ab stops after 10 failed connects even with -r ("Test aborted after 10 failures").
    grep -q 'requests completed\|aborted' "$out" || return 1
    L_requests=$(sed -n 's/^Total of \([0-9]*\) requests completed.*/\1/p' "$out")
    L_requests=${L_requests:-0} L_ok=$L_requests L_failed=11 L_sock_n=11
    L_sock="ab aborted: $(grep -m 1 '^apr_' "$out" || echo '?')"
    L_note="ab aborted the run after more than 10 failed connects"
    return 0
  fi
  complete=$(awk '/^Complete requests:/ { print $3 }' "$out")
  read -r c r l e < <(awk '/^ *\(Connect: / { gsub(/[(),]/, ""); print $2, $4, $6, $8; f = 1 }
                           END { if (!f) print 0, 0, 0, 0 }' "$out")
  L_non2xx=$(awk '/^Non-2xx responses:/ { n = $3 } END { print n + 0 }' "$out")
  w=$(awk '/^Write errors:/ { n = $3 } END { print n + 0 }' "$out")
  # ab counts a receive error or a failed send as a "Length" failure too (the response read, none,
  # is shorter than the first); the rest are responses that ended early, unless worker pids of
  # different lengths served: the body names the pid, so its length changes with the pid's digits.
  short=$((l - r - w))
  ((short > 0)) || short=0
  counted=$short
  if ((short > 0)) && [[ $(awk '/^Started process [0-9]+$/ { d[length($3)] = 1 }
                                END { n = 0; for (k in d) n++; print n }' "$log") -gt 1 ]]; then
    counted=0
    L_note="$short responses of another length than the first not counted: worker pids of different lengths served"
  fi
  L_requests=$complete
  L_sock_n=$((c + r + w + e))
  L_sock="connect $c, receive $r, write $w, exceptions $e"
  ((counted > 0)) && L_sock+=", cut short $counted"
  L_failed=$((L_sock_n + L_non2xx + counted))
  L_ok=$((complete - r - w - L_non2xx - counted))
  return 0
}

# ----------------------------------------------------------------------------------------------
# Statistics over the logs

# Milliseconds from each signal (file $1) to the line of the stamped log $2 that ends what it
# started, one per signal, "-" when none came: the lines that match the awk regex $3 after the
# first signal, in order. In order, because a restart may end after the next signal (Node's
# primary then runs two at once; hello runs one more pass after the current one).
signal_to_line() {
  [[ -s $1 ]] || return 0
  awk -v re="$3" 'FNR == NR { s[++n] = $1; next }
    { line = $0; sub(/^[^ ]* /, "", line); if (line ~ re) d[++m] = $1 }
    END {
      j = 1
      while (j <= m && d[j] <= s[1]) j++
      for (i = 1; i <= n; i++) {
        if (j <= m) printf "%.0f\n", (d[j++] - s[i]) * 1000
        else print "-"
      }
    }' "$1" "$2"
}

# "median / max" of the numbers on stdin (lines that are not numbers are ignored), or "n/a".
median_max() {
  { grep -E '^[0-9]+(\.[0-9]+)?$' || true; } | sort -g |
    awk '{ v[NR] = $1 } END {
      if (!NR) { print "n/a"; exit }
      m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "%.0f / %.0f ms\n", m, v[NR] }'
}
max_of() { { grep -E '^[0-9]+$' || true; } | sort -n | tail -n 1; }

# hello's own figure per rolling restart: its "Reload done: N workers replaced in MS ms" lines, or,
# from a hello that does not print them, the library's "rolling restart done: ... in MS ms" log.
hello_reload_ms() {
  if grep -q '^Reload done: ' "$1"; then
    sed -n 's/^Reload done: [0-9]* workers replaced in \([0-9]*\) ms$/\1/p' "$1"
  else
    sed -n 's/.*rolling restart done: [0-9]* workers replaced in \([0-9]*\) ms$/\1/p' "$1"
  fi
}
hello_reload_failures() {
  local n
  n=$(grep -c '^Reload failed: ' "$1" || true)
  ((n > 0)) || n=$(grep -c 'rolling restart stopped: ' "$1" || true)
  echo "$n"
}
# The line that ends a rolling restart: hello's own, or the library's log from a hello that does
# not print it (not both: a hello may print both for one restart).
done_re() {  # $1 hello|node, $2 log
  if [[ $1 == node ]]; then
    echo '^reload done$'
  elif grep -qE '^Reload (done|failed)' "$2"; then
    echo '^Reload (done|failed)'
  else
    echo 'rolling restart (done|stopped)'
  fi
}

# ----------------------------------------------------------------------------------------------
# Results: one table row per run, and the figures the targets need.

declare -A row=() failed_of=() sock_of=() ok_of=() success_of=() reload_max=()
notes=()

fmt_int() {
  [[ -z $1 ]] && { echo "n/a"; return; }
  printf '%.0f' "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta'
}
percent() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a * 100 / b; else print "n/a" }'; }
add_note() { notes+=("$*"); note "$*"; }

# After a run: the master must still be there and the server must still answer.
check_alive() {  # $1 label
  local body deadline=$(($(date +%s) + 5))
  if ! alive "$srv_pid"; then
    local rc=0
    wait "$srv_pid" 2>/dev/null || rc=$?
    add_note "$1: the master (pid $srv_pid) exited during the run (status $rc)"
    return 1
  fi
  while ! body=$(curl -fsS --max-time 2 "http://127.0.0.1:$srv_port/" 2>/dev/null) ||
    [[ $body != "Handled by process "* ]]; do
    (($(date +%s) >= deadline)) && { add_note "$1: the server no longer answers after the run"; return 1; }
    sleep 0.1
  done
}

# A rolling-restart case: $1 case, $2 server (hello|node), $3 tool.
run_reload() {
  local case_name=$1 server=$2 tool=$3 key="$1,$2" out signals done_ms own_ms sent ended failures
  local replaced
  local label="$case_name $server"
  settle
  if [[ $server == hello ]]; then
    start_hello "$case_name-hello" 2 --work 0 || {
      row[$key]="| hello | $tool | did not start: $srv_error | | | | | | | |"
      stop_run; return 0; }
  else
    start_node "$case_name-node" 0 "" || {
      row[$key]="| Node cluster.js | $tool | did not start: $srv_error | | | | | | | |"
      stop_run; return 0; }
  fi
  out="$tmp/$run_no-$case_name-$server.$tool"
  note "$label: $tool for $reload_secs s, SIGUSR2 to $srv_pid every $reload_every s (port $srv_port)"
  load_with_signals "$out" "$tool" "$reload_secs" USR2 "$srv_pid" "$reload_every" "$reload_every" ||
    note "$label: $tool exited with an error (see its output)"
  # The last restart may still be running: give it up to 5 s to end before reading the logs.
  local deadline=$(($(date +%s) + 5))
  while [[ $(signal_to_line "$srv_signals" "$srv_stamped" "$(done_re "$server" "$srv_log")" |
    tail -n 1) == - ]] && (($(date +%s) < deadline)); do sleep 0.1; done
  check_alive "$label" || true
  signals=$(signal_to_line "$srv_signals" "$srv_stamped" "$(done_re "$server" "$srv_log")")
  sent=$(wc -l <"$srv_signals")
  replaced=$(($(count_started) - 2))
  ended=$(grep -cv '^-$' <<<"$signals" || true)
  [[ -n $signals ]] || ended=0
  done_ms=$(median_max <<<"$signals")
  if [[ $server == hello ]]; then
    own_ms=$(hello_reload_ms "$srv_log" | median_max)
    reload_max[$key]=$(hello_reload_ms "$srv_log" | max_of)
    [[ -n ${reload_max[$key]} ]] || reload_max[$key]=$(max_of <<<"$signals")
    failures=$(hello_reload_failures "$srv_log")
  else
    own_ms="n/a"
    failures="n/a"
  fi
  if ! parse_load "$tool" "$out" "$srv_log"; then
    add_note "$label: $tool printed no result: $(tail -n 2 "$out" | tr '\n' ' ')"
    row[$key]="| $(server_label "$server") | $tool | no result | | | | $sent / $ended / $failures | $replaced | $own_ms | $done_ms |"
    stop_run; return 0
  fi
  [[ -n $L_note ]] && add_note "$label: $L_note"
  row[$key]="| $(server_label "$server") | $tool | $(fmt_int "$L_ok") | $(fmt_int "$L_failed") | $(fmt_int "$L_non2xx") | $L_sock | $sent / $ended / $failures | $replaced | $own_ms | $done_ms |"
  failed_of[$key]=$L_failed
  sock_of[$key]=$L_sock
  note "$label: $L_ok served, $L_failed failed ($L_sock); restarts sent/ended $sent/$ended, $replaced workers replaced; server's time $own_ms; signal to done $done_ms"
  stop_run
}

# A master upgrade case: $1 case, $2 tool. hello only.
run_upgrade() {
  local case_name=$1 tool=$2 key="$1,hello" out old new upgrade_ms old_rc=0 serving="no" exited="no"
  local body pid ppid verdict="" reason="" deadline
  settle
  start_hello "$case_name-hello" 2 --work 0 || {
    row[$key]="| hello | $tool | did not start: $srv_error | | | | | | |"
    stop_run; return 0; }
  old=$srv_pid
  out="$tmp/$run_no-$case_name-hello.$tool"
  note "$case_name: $tool for $upgrade_secs s, SIGUSR1 to $old at $upgrade_at s (port $srv_port)"
  load_with_signals "$out" "$tool" "$upgrade_secs" USR1 "$old" "$upgrade_at" 0 ||
    note "$case_name: $tool exited with an error (see its output)"
  # The old master exits once its workers have drained; then a new master must be serving.
  wait_gone "$exit_timeout" "$old" || true
  if alive "$old"; then
    reason="the old master $old still runs $exit_timeout s after SIGUSR1"
  else
    wait "$old" 2>/dev/null || old_rc=$?
    forget "$old"
    exited="yes (status $old_rc)"
  fi
  new=$(awk -v old="$old" '/^Master PID: [0-9]+$/ && $3 != old { p = $3 } END { print p }' "$srv_log")
  [[ -n $new ]] && alive "$new" && ours "$new" && started+=("$new")
  upgrade_ms=$(signal_to_line "$srv_signals" "$srv_stamped" '^Upgrade (done|failed)' | median_max |
    sed 's/ \/ .*/ ms/')
  if grep -q '^Upgrade failed: ' "$srv_log"; then
    reason="$(grep -m 1 '^Upgrade failed: ' "$srv_log")"
  elif ! grep -q '^Upgrade done: new master [0-9]* is serving' "$srv_log"; then
    [[ -n $reason ]] || reason="no 'Upgrade done' line from the old master"
  fi
  if [[ -n $new ]] && alive "$new"; then
    # Served by a worker of the new master: ask a few times (a reply may come from an old worker
    # that is still draining when the old master has not exited).
    deadline=$(($(date +%s) + 5))
    while (($(date +%s) < deadline)); do
      if body=$(curl -fsS --max-time 2 "http://127.0.0.1:$srv_port/" 2>/dev/null) &&
        [[ $body =~ ^Handled\ by\ process\ ([0-9]+) ]]; then
        pid=${BASH_REMATCH[1]}
        ppid=$(awk '{ s = $0; sub(/.*\) /, "", s); split(s, f, " "); print f[2] }' "/proc/$pid/stat" 2>/dev/null || true)
        if [[ $ppid == "$new" ]]; then serving="yes (pid $new, worker $pid)"; break; fi
      fi
      sleep 0.1
    done
    [[ $serving == no ]] && serving="no (pid $new runs, but no reply from its workers)"
  elif [[ -n $new ]]; then
    serving="no (pid $new has exited)"
  else
    serving="no (no second 'Master PID' line)"
  fi
  if ! alive "$old" && [[ $exited == no ]]; then exited="yes"; fi
  if [[ $serving != yes* && -z $reason ]]; then reason="the new master is not serving"; fi
  if [[ $exited != "yes (status 0)" && -z $reason ]]; then reason="the old master did not exit with status 0"; fi
  [[ -n $reason ]] && add_note "$case_name: $reason"
  if ! parse_load "$tool" "$out" "$srv_log"; then
    add_note "$case_name: $tool printed no result: $(tail -n 2 "$out" | tr '\n' ' ')"
    row[$key]="| hello | $tool | no result | | | | $upgrade_ms | $serving | $exited |"
    failed_of[$key]=""
    stop_run; return 0
  fi
  [[ -n $L_note ]] && add_note "$case_name: $L_note"
  row[$key]="| hello | $tool | $(fmt_int "$L_ok") | $(fmt_int "$L_failed") | $(fmt_int "$L_non2xx") | $L_sock | $upgrade_ms | $serving | $exited |"
  failed_of[$key]=$L_failed
  sock_of[$key]=$L_sock
  [[ -z $reason ]] && ok_of[$key]=1 || ok_of[$key]=0
  note "$case_name: $L_ok served, $L_failed failed ($L_sock); upgrade $upgrade_ms; new master serving: $serving; old master exited: $exited"
  srv_pid=${new:-$old}
  stop_run  # and the old master, if it still runs: its log names it
}

# Random worker crashes: $1 server (hello|node).
run_crash() {
  local server=$1 key="crash,$1" out replaced crashes
  settle
  if [[ $server == hello ]]; then
    start_hello "crash-hello" 2 --work "$cpu_work" --crash-ms "$crash_ms" || {
      row[$key]="| hello | did not start: $srv_error | | | | |"
      stop_run; return 0; }
  else
    start_node "crash-node" "$cpu_work" "$crash_ms" || {
      row[$key]="| Node cluster.js | did not start: $srv_error | | | | |"
      stop_run; return 0; }
  fi
  out="$tmp/$run_no-crash-$server.ab"
  note "crash $server: ab for $crash_secs s, workers exit within $crash_ms ms (port $srv_port)"
  load_only "$out" ab "$crash_secs" ||
    note "crash $server: ab exited with an error (see its output)"
  check_alive "crash $server" || true
  replaced=$(($(count_started) - 2))
  if [[ $server == hello ]]; then
    crashes=$(grep -c '^Worker [0-9]* died' "$srv_log" || true)
    grep -q 'keep crashing' "$srv_log" && add_note "crash hello: $(grep -m 1 'keep crashing' "$srv_log")"
  else
    crashes="n/a"
  fi
  if ! parse_load ab "$out" "$srv_log"; then
    add_note "crash $server: ab printed no result: $(tail -n 2 "$out" | tr '\n' ' ')"
    row[$key]="| $(server_label "$server") | no result | | | | $crashes / $replaced |"
    stop_run; return 0
  fi
  [[ -n $L_note ]] && add_note "crash $server: $L_note"
  success_of[$key]=$(percent "$L_ok" $((L_ok + L_failed)))
  row[$key]="| $(server_label "$server") | $(fmt_int "$L_ok") | $(fmt_int "$L_failed") | ${success_of[$key]}% | $L_sock | $crashes / $replaced |"
  note "crash $server: $L_ok ok, $L_failed failed (${success_of[$key]}%); $L_sock; crashes/replacements $crashes/$replaced"
  stop_run
}

server_label() { [[ $1 == hello ]] && echo "hello" || echo "Node cluster.js"; }

# ----------------------------------------------------------------------------------------------
# Report

target_row() {  # $1 target, $2 measured, $3 0/1 reached (empty: not measured)
  local verdict="not measured"
  [[ $3 == 1 ]] && verdict="reached"
  [[ $3 == 0 ]] && verdict="NOT reached"
  echo "| $1 | $2 | $verdict |"
}
zero_target() {  # $1 target text, $2 key; reached when 0 failed (and the upgrade checks passed)
  local f=${failed_of[$2]:-} reached=""
  if [[ -n $f ]]; then
    reached=0
    ((f == 0)) && [[ ${ok_of[$2]:-1} == 1 ]] && reached=1
    target_row "$1" "$(fmt_int "$f") failed (${sock_of[$2]})$([[ ${ok_of[$2]:-1} == 0 ]] && echo '; upgrade checks failed, see notes')" "$reached"
  else
    target_row "$1" "n/a" ""
  fi
}

report() {
  local cpu_model kernel s
  cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
  kernel=$(uname -srm)
  echo "# prefork soak test (issue 4: zero downtime)"
  echo
  echo "- date: $(date '+%Y-%m-%d %H:%M:%S %Z')"
  echo "- machine: $(nproc) CPUs ($cpu_model), $kernel; load generator on the same cores, loopback"
  echo "- hello: $hello_source (built $(head -n 1 <<<"$hello_stamp"), sha256 $(tail -n 1 <<<"$hello_stamp"))"
  echo "- node: $( ((have_node)) && "$node_bin" --version || echo n/a), $(wrk --version 2>&1 | head -n 1 | awk '{ print $1, $2 }'), $(ab -V | head -n 1 | sed 's/This is //; s/, Version / /; s/ <.*//')"
  echo "- runs: restarts ${reload_secs} s with SIGUSR2 every ${reload_every} s; upgrade ${upgrade_secs} s with SIGUSR1 at ${upgrade_at} s; crash ${crash_secs} s, workers exit within ${crash_ms} ms$( ((quick)) && echo '; QUICK (smoke run)')"
  ((busy_runs)) && echo "- WARNING: before $busy_runs run(s) the machine stayed under 90% idle for 10 s (other load)"

  if wanted keepalive-reload || wanted close-reload; then
    echo
    echo "## Rolling restarts under load: 2 workers, --work 0, SIGUSR2 to the master every ${reload_every} s"
    echo
    echo "wrk -t2 -c200 -d${reload_secs}s keeps connections alive; ab -c200 -t${reload_secs} -r opens one per request."
    echo "Served: 2xx responses. Failed = non-2xx + socket errors (+ for ab, responses cut short)."
    echo "Restarts: signals sent / restarts that ended / that hello reported failed; workers replaced:"
    echo "\"Started process\" lines after the first 2. Reload time: hello's own figure (\"Reload"
    echo "done: N workers replaced in MS ms\"). Signal to done: from each signal to the arrival of the"
    echo "line that ends a restart (hello: \"Reload done\", Node: \"reload done\"), the n-th line for"
    echo "the n-th signal, as this script read them (a few ms late on a busy machine)."
    echo
    echo "| server | load | served | failed | non-2xx | socket errors | restarts sent / ended / failed | workers replaced | reload time (median / max) | signal to done (median / max) |"
    echo "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"
    for s in keepalive-reload close-reload; do
      wanted "$s" || continue
      echo "${row[$s,hello]:-| hello | | n/a | | | | | | | |}"
      echo "${row[$s,node]:-| Node cluster.js | | n/a | | | | | | | |}"
    done
  fi

  if wanted upgrade || wanted upgrade-close; then
    echo
    echo "## Master upgrade under load: SIGUSR1 to hello's master at ${upgrade_at} s of ${upgrade_secs} s"
    echo
    echo "The old master execs a new master that inherits the listening sockets; once the new"
    echo "master's workers listen, the old master drains its workers and exits. Node's cluster has no"
    echo "equivalent. Upgrade time: from the signal to the old master's \"Upgrade done\" line."
    echo
    echo "| server | load | served | failed | non-2xx | socket errors | upgrade time | new master serving | old master exited |"
    echo "|---|---|---:|---:|---:|---|---:|---|---|"
    for s in upgrade upgrade-close; do
      wanted "$s" || continue
      echo "${row[$s,hello]:-| hello | | n/a | | | | | | |}"
    done
    echo "| Node cluster.js | | n/a | n/a | n/a | n/a | n/a | n/a | n/a |"
  fi

  if wanted crash; then
    echo
    echo "## Worker crashes: --work $cpu_work, each worker exits (status 1) within ${crash_ms} ms, ab -c200 -t${crash_secs} -r"
    echo
    echo "| server | served | failed | success | socket errors | crashes / replacements |"
    echo "|---|---:|---:|---:|---|---:|"
    echo "${row[crash,hello]:-| hello | n/a | | | | |}"
    echo "${row[crash,node]:-| Node cluster.js | n/a | | | | |}"
    echo
    echo "Success: served / (served + failed). Crashes: hello's \"Worker N died\" lines (Node's"
    echo "cluster.js prints none); replacements: \"Started process\" lines after the first 2."
  fi

  if ((${#notes[@]})); then
    echo
    echo "## Notes"
    echo
    for s in "${notes[@]}"; do echo "- $s"; done
  fi

  echo
  echo "## Targets (hello)"
  echo
  echo "| target | measured | |"
  echo "|---|---|---|"
  if wanted keepalive-reload; then
    zero_target "rolling restarts, keep-alive: 0 failed, 0 socket errors" keepalive-reload,hello
  fi
  if wanted close-reload; then
    zero_target "rolling restarts, new connection per request: 0 failed, 0 socket errors" close-reload,hello
  fi
  if wanted upgrade; then
    zero_target "master upgrade, keep-alive: 0 failed, new master serving, old master gone" upgrade,hello
  fi
  if wanted upgrade-close; then
    zero_target "master upgrade, new connection per request: 0 failed, new master serving, old master gone" upgrade-close,hello
  fi
  if wanted crash; then
    local pct=${success_of[crash,hello]:-}
    if [[ -n $pct && $pct != n/a ]]; then
      target_row "availability with crashing workers >= 99.9%" "$pct%" "$(awk -v p="$pct" 'BEGIN { print (p >= 99.9) ? 1 : 0 }')"
    else
      target_row "availability with crashing workers >= 99.9%" "n/a" ""
    fi
  fi
  if wanted keepalive-reload || wanted close-reload; then
    local m="" k
    for k in keepalive-reload,hello close-reload,hello; do
      [[ -n ${reload_max[$k]:-} ]] || continue
      if [[ -z $m ]] || ((reload_max[$k] > m)); then m=${reload_max[$k]}; fi
    done
    if [[ -n $m ]]; then
      target_row "rolling restart of 2 workers < 1 s (slowest of all restarts)" "$m ms" "$( ((m < 1000)) && echo 1 || echo 0)"
    else
      target_row "rolling restart of 2 workers < 1 s (slowest of all restarts)" "n/a" ""
    fi
  fi
}

# ----------------------------------------------------------------------------------------------

note "hello: $hello_source; cases: $(for c in "${ALL_CASES[@]}"; do wanted "$c" && printf '%s ' "$c"; done | sed 's/ $//'); logs in $tmp"
if wanted keepalive-reload; then
  run_reload keepalive-reload hello wrk
  if ((have_node)); then run_reload keepalive-reload node wrk; fi
fi
if wanted close-reload; then
  run_reload close-reload hello ab
  if ((have_node)); then run_reload close-reload node ab; fi
fi
if wanted upgrade; then run_upgrade upgrade wrk; fi
if wanted upgrade-close; then run_upgrade upgrade-close ab; fi
if wanted crash; then
  run_crash hello
  if ((have_node)); then run_crash node; fi
fi

report >"$tmp/report.md"
cat "$tmp/report.md"
if [[ -n $out_file ]]; then
  cp "$tmp/report.md" "$out_file"
  note "report written to $out_file"
fi
exit 0
}
