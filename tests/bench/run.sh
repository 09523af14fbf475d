#!/usr/bin/env bash
# prefork's benchmarks: runs build/examples/hello and its anchors (the seed's Node server.js and
# cluster.js, nginx with 2 workers) one after another in one run on this machine, and prints
# Markdown tables of throughput, fairness, master CPU and the ratios between them. It builds
# nothing and never runs in CI: numbers from a shared CI runner would compare noise.
#
#   tests/bench/run.sh [BUILD_DIR] [--quick] [--only CASE[,CASE...]] [--repeat N] [--out FILE]
#                      [--retries N] [--keep-logs]
#
#   BUILD_DIR   a configured and built tree (default: build, next to tests/); needs
#               BUILD_DIR/examples/hello. Build it with
#               `cmake --preset release && cmake --build --preset release`.
#   --quick     3 s runs and 5,000-request fairness runs: a smoke test of the script, not a measure.
#   --only      cpu        CPU-bound (--work 10000000), ab -c200 -t10: 1 vs 2 workers, Node too
#               close      --work 0, new connection per request (wrk -t2 -c200 -d10s
#                          -H 'Connection: close'), every policy, Node cluster, nginx; the same
#                          runs measure the master's CPU time per 10,000 connections
#               dispatch   another name for close
#               keepalive  --work 0, keep-alive (wrk -t2 -c200 -d10s)
#               fairness   connections per worker (max/min) per policy, 20,000 requests at
#                          concurrency 50, new connection per request
#               Default: all of them.
#   --repeat N  measure each throughput figure N times (servers restarted in between, servers
#               interleaved so that drift hits all of them alike) and report the median.
#   --retries N measure a figure again, up to N times (default 2), when other processes used more
#               than 10% of the machine during its run; the least disturbed attempt is kept and
#               figures still above 10% are marked (!) in the report.
#   --out FILE  also write the final Markdown report to FILE.
#   --keep-logs keep the temporary directory (server logs, wrk/ab output) and print its path.
#
# Needs: curl, ab (apache2-utils), wrk; node and nginx are optional (their columns print "n/a");
# NODE=/path/to/node and NGINX=/path/to/nginx pick other binaries.
# Every server is bound to 127.0.0.1, on a port from --port 0 (hello) or a free port the kernel
# picked (Node, nginx); every process started here is stopped by pid on exit.
set -euo pipefail

# The whole script is one compound command, parsed before any of it runs, so editing this file
# (a checkout, a commit) while a run is in progress cannot change what the run executes.
{

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/../.." && pwd)

POLICIES=(round-robin least-connections ip-hash shared reuse-port)
ALL_CASES=(cpu close keepalive fairness)

# ----------------------------------------------------------------------------------------------
# Options

build_dir="$ROOT/build"
quick=0
repeat=1
out_file=""
keep_logs=0
only=""
retries=2

usage() { awk 'NR >= 7 && !/^#/ { exit } NR >= 7 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 2; }
note() { printf '[bench %s] %s\n' "$(date '+%H:%M:%S')" "$*" >&2; }

while (($#)); do
  case "$1" in
    --quick) quick=1 ;;
    --only) (($# > 1)) || die "--only needs a case"; only="$only,$2"; shift ;;
    --only=*) only="$only,${1#--only=}" ;;
    --repeat) (($# > 1)) || die "--repeat needs a number"; repeat=$2; shift ;;
    --repeat=*) repeat=${1#--repeat=} ;;
    --out) (($# > 1)) || die "--out needs a file"; out_file=$2; shift ;;
    --out=*) out_file=${1#--out=} ;;
    --keep-logs) keep_logs=1 ;;
    --retries) (($# > 1)) || die "--retries needs a number"; retries=$2; shift ;;
    --retries=*) retries=${1#--retries=} ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) build_dir=$1 ;;
  esac
  shift
done
[[ $repeat =~ ^[1-9][0-9]*$ ]] || die "--repeat: '$repeat' is not a positive number"
[[ $retries =~ ^[0-9]+$ ]] || die "--retries: '$retries' is not a number"

declare -A want=()
if [[ -z $only ]]; then
  for c in "${ALL_CASES[@]}"; do want[$c]=1; done
else
  IFS=, read -ra picked <<<"${only#,}"
  for c in "${picked[@]}"; do
    case "$c" in
      cpu | close | keepalive | fairness) want[$c]=1 ;;
      dispatch) want[close]=1 ;;
      *) die "--only: '$c' is not cpu, close, dispatch, keepalive or fairness" ;;
    esac
  done
fi
wanted() { [[ -n ${want[$1]:-} ]]; }

if ((quick)); then
  duration=3          # seconds per measured run
  fair_requests=5000
else
  duration=10
  fair_requests=20000
fi
warmup=1              # seconds of the same load before each measured run, discarded (Node's JIT,
                      # first-touch page faults, the listen backlog reaching its working size)
ready_timeout=15      # seconds a server may take to print its pids and answer

hello="$build_dir/examples/hello"
[[ -x $hello ]] || die "$hello not found: build it first (cmake --preset release && cmake --build --preset release)"
hello=$(cd "$(dirname "$hello")" && pwd)/hello
for tool in curl ab wrk awk; do
  command -v "$tool" >/dev/null || die "$tool is missing (tests/deps.sh installs it)"
done
# NODE and NGINX name other binaries (a newer Node, an nginx built elsewhere).
node_bin=${NODE:-node}
have_node=0; command -v "$node_bin" >/dev/null && "$node_bin" --version >/dev/null 2>&1 && have_node=1
have_nginx=0; nginx_bin=${NGINX:-$(command -v nginx || true)}
[[ -z $nginx_bin && -x /usr/sbin/nginx ]] && nginx_bin=/usr/sbin/nginx  # sbin: not in a user's PATH
[[ -n $nginx_bin ]] && "$nginx_bin" -v >/dev/null 2>&1 && have_nginx=1
((have_node)) || note "node not found: its columns print n/a"
((have_nginx)) || note "nginx not found: its columns print n/a (apt-get install nginx-light or nginx)"

clk_tck=$(getconf CLK_TCK)

# ----------------------------------------------------------------------------------------------
# Processes: everything started here is recorded and stopped by pid, never by name.

tmp=$(mktemp -d "${TMPDIR:-/tmp}/prefork-bench.XXXXXX")
started=()

alive() { kill -0 "$1" 2>/dev/null; }

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

# Stops a server started by this script: SIGTERM to the master (hello drains its workers, nginx
# stops its workers, Node's workers exit when their IPC channel closes), then the master's own
# children if any outlived it, then SIGKILL to whatever is left after 10 s.
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

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  local pid
  for pid in "${started[@]}"; do stop_server "$pid"; done  # (a copy: stop_server edits it)
  if ((keep_logs)); then note "logs kept in $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Every run uses one copy of the binary, so a rebuild during the run cannot mix two versions.
hello_source=$hello
hello_stamp=$(date -r "$hello_source" '+%Y-%m-%d %H:%M:%S'; sha256sum "$hello_source" | cut -c1-12)
cp "$hello_source" "$tmp/hello"
hello="$tmp/hello"

# A port nobody listens on, chosen by the kernel (bind to port 0, read it, close). Another process
# could take it before the server binds it; start_* then sees the server fail and tries again.
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

# Server state set by the start_* functions.
srv_pid=""      # the master (hello), the primary (Node) or the master (nginx)
srv_port=""
srv_log=""
srv_workers=""  # worker pids, space-separated

count_started() { grep -c '^Started process' "$srv_log" 2>/dev/null || true; }

# Polls until the server has printed what $1 says it prints and answers a request, or fails.
#   $1: workers expected ("Started process" lines; 0 = do not look at the log)
#   $2: children expected (pgrep -P; 0 = do not look)
wait_ready() {
  local want_started=$1 want_children=$2 deadline=$(($(date +%s) + ready_timeout)) body
  while :; do
    if ! alive "$srv_pid"; then
      wait "$srv_pid" 2>/dev/null || true
      return 1
    fi
    if [[ -n $srv_port ]] && (($(count_started) >= want_started)) &&
      (($(pgrep -c -P "$srv_pid" || true) >= want_children)) &&
      body=$(curl -fsS --max-time 2 "http://127.0.0.1:$srv_port/" 2>/dev/null) &&
      [[ $body == "Handled by process "* ]]; then
      return 0
    fi
    if (($(date +%s) >= deadline)); then
      note "server $srv_pid not ready within $ready_timeout s; log:"
      tail -n 20 "$srv_log" >&2
      return 1
    fi
    sleep 0.05
  done
}

# hello with $1 workers, policy $2, $3 iterations of work per request.
start_hello() {
  local workers=$1 balance=$2 work=$3
  srv_log="$tmp/hello-$balance-w$workers-$RANDOM.log"
  : >"$srv_log"  # before the job starts: the job opens it after fork, maybe after the first read
  "$hello" --host 127.0.0.1 --port 0 --workers "$workers" --work "$work" --balance "$balance" \
    >"$srv_log" 2>&1 &
  srv_pid=$!
  started+=("$srv_pid")
  srv_port=""
  local deadline=$(($(date +%s) + ready_timeout))
  while [[ -z $srv_port ]]; do
    srv_port=$(sed -n 's/^Listening on .*:\([0-9][0-9]*\)$/\1/p' "$srv_log")
    [[ -n $srv_port ]] && break
    if ! alive "$srv_pid" || (($(date +%s) >= deadline)); then tail -n 20 "$srv_log" >&2; return 1; fi
    sleep 0.05
  done
  wait_ready "$workers" 0 || { tail -n 20 "$srv_log" >&2; return 1; }
  local master
  master=$(sed -n 's/^Master PID: \([0-9][0-9]*\)$/\1/p' "$srv_log")
  [[ $master == "$srv_pid" ]] || { note "hello printed Master PID '$master', started $srv_pid"; return 1; }
  srv_workers=$(sed -n 's/^Started process \([0-9][0-9]*\)$/\1/p' "$srv_log" | tr '\n' ' ')
}

# The seed's server.js (mode single) or cluster.js with 2 workers (mode cluster).
start_node() {
  local mode=$1 work=$2 script want_started
  if [[ $mode == single ]]; then script=server.js want_started=1; else script=cluster.js want_started=2; fi
  for _ in 1 2 3; do
    srv_port=$(free_port)
    srv_log="$tmp/node-$mode-$RANDOM.log"
    : >"$srv_log"
    WORKERS=2 PORT=$srv_port HOST=127.0.0.1 WORK=$work "$node_bin" "$BENCH_DIR/node/$script" \
      >"$srv_log" 2>&1 &
    srv_pid=$!
    started+=("$srv_pid")
    if wait_ready "$want_started" 0; then
      srv_workers=$(sed -n 's/^Started process \([0-9][0-9]*\)$/\1/p' "$srv_log" | tr '\n' ' ')
      return 0
    fi
    stop_server "$srv_pid"
    grep -q EADDRINUSE "$srv_log" || { tail -n 20 "$srv_log" >&2; return 1; }
    note "port $srv_port was taken before Node bound it; trying another"
  done
  return 1
}

start_nginx() {
  local dir user_line=""
  if (($(id -u) == 0)); then user_line="user $(id -un) $(id -gn);"; fi
  for _ in 1 2 3; do
    dir=$(mktemp -d "$tmp/nginx.XXXXXX")
    srv_port=$(free_port)
    srv_log="$dir/stdout.log"
    : >"$srv_log"
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$srv_port|g" -e "s|@USER@|$user_line|g" \
      "$BENCH_DIR/nginx.conf.in" >"$dir/nginx.conf"
    # -e: the error log before the configuration is read (the compiled-in one is under /var/log);
    # daemon off: the pid started here is the master.
    "$nginx_bin" -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" >"$srv_log" 2>&1 &
    srv_pid=$!
    started+=("$srv_pid")
    if wait_ready 0 2; then
      srv_workers=$(pgrep -P "$srv_pid" | tr '\n' ' ')
      return 0
    fi
    stop_server "$srv_pid"
    grep -q 'Address already in use' "$dir/error.log" "$srv_log" 2>/dev/null ||
      { cat "$dir/error.log" "$srv_log" >&2 2>/dev/null; return 1; }
    note "port $srv_port was taken before nginx bound it; trying another"
  done
  return 1
}

# Starts server $1: hello-<policy>[-w<workers>], node-single, node-cluster or nginx; $2 = work.
start_server() {
  local name=$1 work=$2 rest policy workers=2
  case "$name" in
    hello-*)
      rest=${name#hello-}
      if [[ $rest =~ ^(.*)-w([0-9]+)$ ]]; then policy=${BASH_REMATCH[1]}; workers=${BASH_REMATCH[2]}; else policy=$rest; fi
      start_hello "$workers" "$policy" "$work" ;;
    node-single) start_node single "$work" ;;
    node-cluster) start_node cluster "$work" ;;
    nginx) start_nginx ;;
    *) die "internal: unknown server $name" ;;
  esac
}

server_available() {
  case "$1" in
    node-*) ((have_node)) ;;
    nginx) ((have_nginx)) ;;
    *) return 0 ;;
  esac
}

# Waits, at most 15 s, until the machine is at least 90% idle over 200 ms. Not for synchronisation
# (readiness is polled above) but so that one run's tail - the previous server's exit, the kernel
# tearing down a few hundred thousand sockets - does not run on the cores the next run measures.
busy_runs=0
settle() {
  local deadline=$(($(date +%s) + 15)) a b
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
      note "the machine is busy (under 90% idle for 15 s) before this run: other load?"
      return 0
    fi
  done
}

# utime + stime of a process, in clock ticks (proc(5): fields 14 and 15 of /proc/<pid>/stat;
# the command name, field 2, may hold spaces, so count from the last ')').
cpu_ticks() {
  local s f
  s=$(<"/proc/$1/stat")
  s=${s##*) }
  read -ra f <<<"$s"
  echo $((f[11] + f[12]))
}

# CPU that neither the server under test nor the load generator used during a measured run:
# busy time in /proc/stat minus the server's processes (master and its children, from their
# /proc/<pid>/stat) minus the load generator (this shell's reaped children, from `times`). Some
# kernel work on their behalf (softirq outside their context) lands here too, so a quiet machine
# shows a few percent; a figure measured with more than $foreign_limit% is marked as suspect.
foreign_limit=10
declare -A foreign=()

machine_ticks() {  # "busy total" jiffies over all CPUs
  local f
  read -ra f < <(grep '^cpu ' /proc/stat)
  echo "$((f[1] + f[2] + f[3] + f[6] + f[7] + f[8])) $((f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7] + f[8]))"
}
server_ticks() {  # the server's master and its children, alive now
  local p n=0 t
  for p in "$srv_pid" $(pgrep -P "$srv_pid" || true); do
    t=$(cpu_ticks "$p" 2>/dev/null) || continue
    n=$((n + t))
  done
  echo "$n"
}
# user+sys of this shell's reaped children, in clock ticks. `times` must run in this shell, not
# in a $(...) subshell: a subshell's own children are the only ones it would count.
children_ticks_to() {  # $1 = variable to set
  times >"$tmp/times"
  printf -v "$1" '%s' "$(tail -n 1 "$tmp/times" | awk -v h="$clk_tck" '{
    n = 0
    for (i = 1; i <= 2; i++) { split($i, a, "m"); sub(/s$/, "", a[2]); n += (a[1] * 60 + a[2]) * h }
    printf "%.0f\n", n }')"
}
m_children0=0
measure_begin() {
  read -r m_busy0 m_total0 < <(machine_ticks)
  m_server0=$(server_ticks)
  children_ticks_to m_children0
}
# Sets m_share: the other load, in percent, since measure_begin. Not in a $(...) subshell.
measure_end() {
  local busy total server children
  read -r busy total < <(machine_ticks)
  server=$(server_ticks)
  children_ticks_to children
  m_share=$(awk -v b=$((busy - m_busy0)) -v t=$((total - m_total0)) -v s=$((server - m_server0)) \
    -v c=$((children - m_children0)) 'BEGIN { f = t > 0 ? (b - s - c) * 100 / t : 0; printf "%.0f", f < 0 ? 0 : f }')
}
# A figure for the tables: the median of key $1, marked when other load was above the limit.
show() {
  local v
  v=$(value "$1")
  printf '%s' "$(fmt_int "$v")"
  suspect "$1" && printf ' (!)'
  return 0
}

# ----------------------------------------------------------------------------------------------
# Load generators

url() { echo "http://127.0.0.1:$srv_port/"; }

# wrk; $1 = output file, $2 = close|keepalive, $3 = seconds. Returns wrk's status.
run_wrk() {
  local out=$1 mode=$2 secs=$3 hdr=()
  [[ $mode == close ]] && hdr=(-H 'Connection: close')
  wrk -t2 -c200 -d"${secs}s" "${hdr[@]}" "$(url)" >"$out" 2>&1
}
wrk_rps() { sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' "$1"; }
wrk_requests() { sed -n 's/^ *\([0-9][0-9]*\) requests in .*/\1/p' "$1"; }
# Socket errors plus non-2xx responses, as one number.
wrk_errors() {
  awk '/Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 }
       /Non-2xx or 3xx responses:/ { n += $NF }
       END { print n + 0 }' "$1"
}

# ab (the anchor's CPU-bound tool); -r: a receive error is counted, not fatal; -l: bodies differ in
# length when pids do (Node's 4-digit vs 5-digit pids), which ab would otherwise count as failures.
run_ab() {
  local out=$1 secs=$2
  ab -q -r -l -c 200 -t "$secs" "$(url)" >"$out" 2>&1
}
ab_rps() { sed -n 's/^Requests per second: *\([0-9.]*\).*/\1/p' "$1"; }
ab_errors() {
  awk '/^Failed requests:/ { n += $3 } /^Non-2xx responses:/ { n += $3 } END { print n + 0 }' "$1"
}

# ----------------------------------------------------------------------------------------------
# Results: space-separated samples per key, reduced to a median for the tables.

declare -A samples=() clean=() errors=() ticks=() conns=() fair=()

# $1 key, $2 value, $3 other load (%) during its run. Samples with other load above the limit
# are kept apart: a figure is the median of the clean ones, or of all when none is clean.
add_sample() {
  samples[$1]="${samples[$1]:-}$2 "
  ((${3:-0} <= foreign_limit)) && clean[$1]="${clean[$1]:-}$2 "
  return 0
}
add_errors() { errors[$1]=$((${errors[$1]:-0} + $2)); }

median() {
  [[ -z ${1// /} ]] && { echo ""; return; }
  tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g |
    awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
value() { if suspect "$1"; then median "${samples[$1]:-}"; else median "${clean[$1]:-}"; fi; }
suspect() { [[ -n ${samples[$1]:-} && -z ${clean[$1]:-} ]]; }

fmt_int() {
  [[ -z $1 ]] && { echo "n/a"; return; }
  printf '%.0f' "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta'
}
ratio() {
  [[ -z $1 || -z $2 ]] && { echo "n/a"; return; }
  awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2fx", a / b }'
}
# 1 if $1 / $2 >= $3
meets() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { exit !(b > 0 && a / b >= t) }'; }

# ----------------------------------------------------------------------------------------------
# Cases

run_failed() { note "$1: FAILED (see $tmp; rerun with --keep-logs to keep it)"; }

# One measured figure for the running server: a warm-up, then the load, repeated (up to
# $retries more times, after settle) while other processes used more than $foreign_limit% of the
# machine; the attempt with the least other load is kept.
#   $1 key (case,server)  $2 ab|close|keepalive  $3 run number
measure() {
  local key=$1 kind=$2 r=$3 attempt out best="" best_share="" before after
  local case_name=${key%%,*} server=${key#*,}
  for ((attempt = 0; attempt <= retries; attempt++)); do
    out="$tmp/$case_name-$server-$r-$attempt.out"
    if [[ $kind == ab ]]; then
      run_ab "$out.warmup" "$warmup" || true
    else
      run_wrk "$out.warmup" "$kind" "$warmup" || true
    fi
    measure_begin
    before=$(cpu_ticks "$srv_pid")
    if [[ $kind == ab ]]; then run_ab "$out" "$duration"; else run_wrk "$out" "$kind" "$duration"; fi ||
      { run_failed "$key ($kind)"; return 0; }
    after=$(cpu_ticks "$srv_pid")
    measure_end
    echo "$((after - before))" >"$out.master-ticks"
    if [[ -z $best_share ]] || ((m_share < best_share)); then best=$out best_share=$m_share; fi
    ((m_share <= foreign_limit)) && break
    if ((attempt < retries)); then
      note "$key: other load $m_share% during the run; measuring again"
      settle
    fi
  done
  if [[ -z ${foreign[$key]:-} ]] || ((best_share > ${foreign[$key]})); then foreign[$key]=$best_share; fi
  if [[ $kind == ab ]]; then
    add_sample "$key" "$(ab_rps "$best")" "$best_share"
    add_errors "$key" "$(ab_errors "$best")"
    note "$key: $(ab_rps "$best") req/s (other load $best_share%)"
  else
    add_sample "$key" "$(wrk_rps "$best")" "$best_share"
    add_errors "$key" "$(wrk_errors "$best")"
    note "$key: $(wrk_rps "$best") req/s, master $(<"$best.master-ticks") ticks (other load $best_share%)"
    if [[ $kind == close ]]; then
      ticks[$server]=$((${ticks[$server]:-0} + $(<"$best.master-ticks")))
      conns[$server]=$((${conns[$server]:-0} + $(wrk_requests "$best")))
    fi
  fi
}

case_cpu() {
  local servers=(hello-round-robin-w1 hello-round-robin-w2 node-single node-cluster) r s
  for ((r = 1; r <= repeat; r++)); do
    for s in "${servers[@]}"; do
      server_available "$s" || continue
      settle
      start_server "$s" 10000000 || { run_failed "cpu $s"; stop_server "$srv_pid"; continue; }
      measure "cpu,$s" ab "$r"
      stop_server "$srv_pid"
    done
  done
}

http_servers() {
  local p
  for p in "${POLICIES[@]}"; do echo "hello-$p"; done
  echo node-cluster
  echo nginx
}

case_http() {
  local r s
  for ((r = 1; r <= repeat; r++)); do
    for s in $(http_servers); do
      server_available "$s" || continue
      settle
      start_server "$s" 0 || { run_failed "http $s"; stop_server "$srv_pid"; continue; }
      if wanted close; then measure "close,$s" close "$r"; fi
      if wanted keepalive; then measure "keepalive,$s" keepalive "$r"; fi
      stop_server "$srv_pid"
    done
  done
}

# Responses per worker pid over $fair_requests new-connection-per-request requests, concurrency 50.
case_fairness() {
  local s p out markers wrk_pid deadline counts pid n
  for s in $(for p in "${POLICIES[@]}"; do echo "hello-$p"; done; echo node-cluster); do
    server_available "$s" || continue
    settle
    start_server "$s" 0 || { run_failed "fairness $s"; stop_server "$srv_pid"; continue; }
    markers=$(mktemp -d "$tmp/fair-markers.XXXXXX")
    out="$tmp/fairness-$s.wrk"
    # -d60s is only an upper bound: the script stops each thread after its share of requests
    # and leaves a marker; wrk's SIGINT handler then ends its wait and prints the counts.
    wrk -t2 -c50 -d60s -H 'Connection: close' -s "$BENCH_DIR/count_pids.lua" "$(url)" \
      -- "$fair_requests" "$markers" 2 >"$out" 2>&1 &
    wrk_pid=$!
    started+=("$wrk_pid")
    deadline=$(($(date +%s) + 70))
    while alive "$wrk_pid" && (($(find "$markers" -type f | wc -l) < 2)) &&
      (($(date +%s) < deadline)); do
      sleep 0.05
    done
    kill -INT "$wrk_pid" 2>/dev/null || true
    wait "$wrk_pid" 2>/dev/null || true
    forget "$wrk_pid"
    # Every worker the server started, with 0 for those that got nothing (ip-hash from one
    # client address sends everything to one worker).
    counts=""
    for pid in $srv_workers; do
      n=$(awk -v p="$pid" '$1 == "pid" && $2 == p { print $3 }' "$out")
      counts="$counts${n:-0} "
    done
    n=$(awk '$1 == "pid" { n += $3 } END { print n + 0 }' "$out")
    fair[$s]="$counts"
    note "fairness $s: per worker ${counts}(total $n)"
    stop_server "$srv_pid"
  done
}

# ----------------------------------------------------------------------------------------------
# Report

label() {
  case "$1" in
    hello-*-w1) echo "hello ${1#hello-}" | sed 's/-w1$/, 1 worker/' ;;
    hello-*-w2) echo "hello ${1#hello-}" | sed 's/-w2$/, 2 workers/' ;;
    hello-*) echo "hello --balance ${1#hello-}" ;;
    node-single) echo "Node server.js (1 process)" ;;
    node-cluster) echo "Node cluster.js (2 workers)" ;;
    nginx) echo "nginx (2 workers)" ;;
  esac
}
errs() { local e=${errors[$1]:-}; [[ -z $e || $e == 0 ]] && echo 0 || echo "$e"; }

report() {
  local cpu_model kernel s v p
  cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
  kernel=$(uname -srm)
  echo "# prefork benchmarks"
  echo
  echo "- date: $(date '+%Y-%m-%d %H:%M:%S %Z')"
  echo "- machine: $(nproc) CPUs ($cpu_model), $kernel; load generator on the same cores, loopback"
  echo "- hello: $hello_source (built $(head -n 1 <<<"$hello_stamp"), sha256 $(tail -n 1 <<<"$hello_stamp"))"
  echo "- node: $( ((have_node)) && "$node_bin" --version || echo n/a), nginx: $( ((have_nginx)) && "$nginx_bin" -v 2>&1 | sed 's/^nginx version: //' || echo n/a), $(wrk --version 2>&1 | head -n 1 | awk '{ print $1, $2 }'), $(ab -V | head -n 1 | sed 's/This is //; s/, Version / /; s/ <.*//')"
  if ((busy_runs)); then
    echo "- WARNING: before $busy_runs run(s) the machine stayed under 90% idle for 15 s (other load)"
  fi
  local k worst=0 marked=0
  for k in "${!foreign[@]}"; do ((foreign[$k] > worst)) && worst=${foreign[$k]}; done
  for k in "${!samples[@]}"; do suspect "$k" && marked=$((marked + 1)); done
  echo "- other load (CPU used by neither the server nor the load generator): at most $worst% of the machine in a kept run; each figure is the median of its runs with at most $foreign_limit%; figures with no such run: $marked, marked (!)"
  echo "- runs: ${duration} s each after a ${warmup} s warm-up, median of $repeat; fairness: $fair_requests requests at concurrency 50$( ((quick)) && echo '; QUICK (smoke run, not a measurement)')"

  if wanted cpu; then
    local h1 h2 n1 n2
    h1=$(value cpu,hello-round-robin-w1); h2=$(value cpu,hello-round-robin-w2)
    n1=$(value cpu,node-single); n2=$(value cpu,node-cluster)
    echo
    echo "## CPU-bound: 10,000,000 iterations per request, ab -c200 -t$duration (req/s)"
    echo
    echo "| server | single process | cluster, 2 workers | cluster/single | failed (single / cluster) |"
    echo "|---|---:|---:|---:|---:|"
    echo "| hello (C++) | $(show cpu,hello-round-robin-w1) | $(show cpu,hello-round-robin-w2) | $(ratio "$h2" "$h1") | $(errs cpu,hello-round-robin-w1) / $(errs cpu,hello-round-robin-w2) |"
    echo "| Node server.js / cluster.js | $(show cpu,node-single) | $(show cpu,node-cluster) | $(ratio "$n2" "$n1") | $(errs cpu,node-single) / $(errs cpu,node-cluster) |"
  fi

  if wanted close || wanted keepalive; then
    echo
    echo "## hello --work 0, wrk -t2 -c200 -d${duration}s (req/s)"
    echo
    echo "New connection per request: \`-H 'Connection: close'\`. Errors: socket errors + non-2xx."
    echo
    local head="| server |" rule="|---|" cn ck gn gk c k row
    if wanted close; then head+=" new conn/request | vs Node cluster | vs nginx | errors |"; rule+="---:|---:|---:|---:|"; fi
    if wanted keepalive; then head+=" keep-alive | vs Node cluster | vs nginx | errors |"; rule+="---:|---:|---:|---:|"; fi
    echo "$head"
    echo "$rule"
    cn=$(value close,node-cluster); ck=$(value keepalive,node-cluster)
    gn=$(value close,nginx); gk=$(value keepalive,nginx)
    for s in $(http_servers); do
      c=$(value "close,$s"); k=$(value "keepalive,$s")
      row="| $(label "$s") |"
      if wanted close; then row+=" $(show "close,$s") | $(ratio "$c" "$cn") | $(ratio "$c" "$gn") | $(errs "close,$s") |"; fi
      if wanted keepalive; then row+=" $(show "keepalive,$s") | $(ratio "$k" "$ck") | $(ratio "$k" "$gk") | $(errs "keepalive,$s") |"; fi
      echo "$row"
    done
  fi

  if wanted fairness; then
    echo
    echo "## Fairness: responses per worker, $fair_requests requests, wrk -t2 -c50, new connection per request"
    echo
    echo "| server | per worker | max/min |"
    echo "|---|---|---:|"
    for s in $(for p in "${POLICIES[@]}"; do echo "hello-$p"; done; echo node-cluster); do
      server_available "$s" || { echo "| $(label "$s") | n/a | n/a |"; continue; }
      v=${fair[$s]:-}
      if [[ -z $v ]]; then echo "| $(label "$s") | n/a | n/a |"; continue; fi
      echo "| $(label "$s") | $(sed 's/ *$//; s/ / \/ /g' <<<"$v") | $(fairness_ratio "$v") |"
    done
    echo
    echo "Every client here is 127.0.0.1, so ip-hash is meant to send all to one worker: its row"
    echo "measures stickiness (connections that went elsewhere), not balance."
  fi

  if wanted close; then
    echo
    echo "## Master CPU time (utime+stime of the master/primary) per 10,000 connections"
    echo
    echo "Measured over the new-connection-per-request runs above; /proc/<pid>/stat, $clk_tck ticks/s."
    echo "With shared and reuse-port the kernel dispatches, so what a master spends there is other"
    echo "traffic with its workers; profile_master.sh shows which system calls."
    echo
    echo "| server | master CPU | connections | ms per 10k connections |"
    echo "|---|---:|---:|---:|"
    for s in $(http_servers); do
      if [[ -z ${conns[$s]:-} ]]; then echo "| $(label "$s") master | n/a | n/a | n/a |"; continue; fi
      echo "| $(label "$s") master | $(awk -v t="${ticks[$s]}" -v h="$clk_tck" 'BEGIN { printf "%.0f ms", t * 1000 / h }') | $(fmt_int "${conns[$s]}") | $(ms_per_10k "$s") |"
    done
  fi

  targets
}

fairness_ratio() {
  awk -v v="$1" 'BEGIN { n = split(v, a, " "); mx = 0; mn = -1
    for (i = 1; i <= n; i++) { if (a[i] > mx) mx = a[i]; if (mn < 0 || a[i] < mn) mn = a[i] }
    if (n == 0) print "n/a"; else if (mn == 0) print "inf (one worker got none)"; else printf "%.3f", mx / mn }'
}
ms_per_10k() {
  awk -v t="${ticks[$1]}" -v h="$clk_tck" -v c="${conns[$1]}" 'BEGIN { printf "%.1f", t * 1000 / h / c * 10000 }'
}

target_row() {  # $1 target, $2 measured, $3 0/1 reached (empty: not measured)
  local verdict="not measured"
  [[ $3 == 1 ]] && verdict="reached"
  [[ $3 == 0 ]] && verdict="NOT reached"
  echo "| $1 | $2 | $verdict |"
}

check() {  # $1 a, $2 b, $3 threshold -> echoes 1/0, or nothing when either is missing
  [[ -z $1 || -z $2 ]] && return 0
  meets "$1" "$2" "$3" && echo 1 || echo 0
}

# " (!)" when any of the figures named is suspect (measured under other load).
sus() { local k; for k in "$@"; do suspect "$k" && { printf ' (!)'; return 0; }; done; return 0; }

# $1 target text, $2 and $3 the keys of a ratio, $4 its threshold.
ratio_target() {
  local a b
  a=$(value "$2"); b=$(value "$3")
  target_row "$1" "$(ratio "$a" "$b")$(sus "$2" "$3")" "$(check "$a" "$b" "$4")"
}

targets() {
  echo
  echo "## Targets"
  echo
  echo "| target | measured | |"
  echo "|---|---|---|"
  local p r
  if wanted cpu; then
    ratio_target "CPU-bound, hello cluster/single >= 1.9" cpu,hello-round-robin-w2 cpu,hello-round-robin-w1 1.9
  fi
  if wanted close; then
    ratio_target "round-robin, new conn/request >= 2.5x Node cluster" close,hello-round-robin close,node-cluster 2.5
    ratio_target "round-robin, new conn/request >= 0.8x nginx" close,hello-round-robin close,nginx 0.8
    for p in shared reuse-port; do
      ratio_target "$p (kernel dispatch), new conn/request >= 0.95x nginx" "close,hello-$p" close,nginx 0.95
    done
  fi
  if wanted keepalive; then
    for p in "${POLICIES[@]}"; do
      ratio_target "$p, keep-alive >= 0.9x nginx" "keepalive,hello-$p" keepalive,nginx 0.9
    done
  fi
  if wanted fairness; then
    r=$(fairness_ratio "${fair[hello-round-robin]:-}")
    if [[ $r =~ ^[0-9.]+$ ]]; then
      target_row "round-robin, max/min connections per worker <= 1.1" "$r" "$(awk -v r="$r" 'BEGIN { print (r <= 1.1) ? 1 : 0 }')"
    else
      target_row "round-robin, max/min connections per worker <= 1.1" "$r" "$([[ -n ${fair[hello-round-robin]:-} ]] && echo 0)"
    fi
  fi
}

# ----------------------------------------------------------------------------------------------

note "hello: $hello_source; cases: $(for c in "${ALL_CASES[@]}"; do wanted "$c" && printf '%s ' "$c"; done | sed 's/ $//'); ${duration} s runs, repeat $repeat; logs in $tmp"
wanted cpu && case_cpu
if wanted close || wanted keepalive; then case_http; fi
wanted fairness && case_fairness

report >"$tmp/report.md"
cat "$tmp/report.md"
if [[ -n $out_file ]]; then
  cp "$tmp/report.md" "$out_file"
  note "report written to $out_file"
fi
exit 0
}
