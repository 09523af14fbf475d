# Shared by the bench scripts that load a server while something happens to it and count every
# request that fails (soak.sh, chaos.sh): their options, the bookkeeping that stops every process
# they started by pid, the capture of a server's output with arrival times, starting hello and the
# seed's Node cluster.js, running wrk or ab and reading their results, and the report's common
# parts. Sourced, never run: bash reads a sourced file whole before running any of it, so editing
# this file during a run cannot change what the run executes.
#
# The sourcing script sets bench_name (soak, chaos: its messages and temporary directory),
# bench_script (its own path, for --help) and ALL_CASES (what --only accepts), then calls
# bench_options "$@", sets its durations and ready_timeout (and ab_requests), and calls bench_setup.
# Variables cross between this file and the script both ways (the L_* results of parse_load...).
# shellcheck shell=bash disable=SC2034,SC2154

export LC_ALL=C  # $EPOCHREALTIME with a '.', and the tools' output in the words parsed below

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/../.." && pwd)

# ----------------------------------------------------------------------------------------------
# Options

usage() {
  awk -v start="^#   tests/bench/$bench_name.sh" '$0 ~ start { p = 1 } p && !/^#/ { exit }
    p { sub(/^# ?/, ""); print }' "$bench_script"
}
die() { printf '%s.sh: %s\n' "$bench_name" "$*" >&2; exit 2; }
note() { printf '[%s %s] %s\n' "$bench_name" "$(date '+%H:%M:%S')" "$*" >&2; }

# [BUILD_DIR] [--quick] [--only CASE[,CASE...]] [--out FILE] [--keep-logs]: sets build_dir, quick,
# out_file, keep_logs and the cases wanted (see wanted).
bench_options() {
  local only="" c picked
  build_dir="$ROOT/build" quick=0 out_file="" keep_logs=0
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
  declare -gA want=()
  if [[ -z $only ]]; then
    for c in "${ALL_CASES[@]}"; do want[$c]=1; done
    return 0
  fi
  IFS=, read -ra picked <<<"${only#,}"
  for c in "${picked[@]}"; do
    [[ " ${ALL_CASES[*]} " == *" $c "* ]] || die "--only: '$c' is not one of: ${ALL_CASES[*]}"
    want[$c]=1
  done
}
wanted() { [[ -n ${want[$1]:-} ]]; }

# The binaries and tools; then a temporary directory, the traps that stop everything on exit, and
# a copy of hello that every run uses, so a rebuild during the run cannot mix two versions. (An
# upgrade execs the binary on disk: this copy, so old and new master run the same code here.)
bench_setup() {
  hello_source=${HELLO:-$build_dir/examples/hello}
  [[ -x $hello_source ]] ||
    die "$hello_source not found: build it first (cmake --preset release && cmake --build --preset release), or set HELLO="
  hello_source=$(cd "$(dirname "$hello_source")" && pwd)/$(basename "$hello_source")
  local tool
  for tool in curl ab wrk awk mkfifo pgrep; do
    command -v "$tool" >/dev/null || die "$tool is missing (tests/deps.sh installs it)"
  done
  node_bin=${NODE:-node}
  have_node=0 node_exe=""
  if command -v "$node_bin" >/dev/null && "$node_bin" --version >/dev/null 2>&1; then
    have_node=1
    node_exe=$(readlink -f "$(command -v "$node_bin")")
  fi
  ((have_node)) || note "node not found: its rows print n/a"

  tmp=$(mktemp -d "${TMPDIR:-/tmp}/prefork-$bench_name.XXXXXX")
  started=()      # servers (the masters started here) and load generators
  stampers=()     # the loops that copy a server's output to its logs
  server_logs=()  # every server's log: cleanup also stops the masters and workers it names
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  hello_stamp=$(date -r "$hello_source" '+%Y-%m-%d %H:%M:%S'; sha256sum "$hello_source" | cut -c1-12)
  cp "$hello_source" "$tmp/hello"
  hello="$tmp/hello"
}

# ----------------------------------------------------------------------------------------------
# Processes: everything started here is recorded and stopped by pid, never by name.

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

srv_quiet=0    # the server's workers print no "Started process" line (Node with QUIET=1)

count_started() { grep -c '^Started process' "$srv_log" 2>/dev/null || true; }

# The workers of the server alive now: its master's children (hello's master and Node's primary
# start no other process), zombies left out.
live_workers() {
  local p
  for p in $(pgrep -P "$srv_pid" || true); do
    if alive "$p"; then echo "$p"; fi
  done
}

# Polls until $1 workers have printed "Started process" (with srv_quiet: are running) and the
# server answers, or fails.
wait_ready() {
  local want_started=$1 deadline=$(($(date +%s) + ready_timeout)) body up
  while :; do
    if ! alive "$srv_pid"; then
      wait "$srv_pid" 2>/dev/null || true
      return 1
    fi
    if ((srv_quiet)); then up=$(live_workers | wc -l); else up=$(count_started); fi
    if ((up >= want_started)) &&
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
  srv_quiet=0
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

# The seed's cluster.js with 2 workers; $1 names its logs, $2 = WORK, $3 = CRASH_MS (empty: none),
# $4 = QUIET (optional; 1: the workers print nothing).
start_node() {
  local name=$1 work=$2 crash=$3 quiet=${4:-}
  srv_quiet=$([[ -n $quiet ]] && echo 1 || echo 0)
  for _ in 1 2 3; do
    srv_port=$(free_port)
    run_no=$((run_no + 1))
    start_capture "$run_no-$name"
    WORKERS=2 PORT=$srv_port HOST=127.0.0.1 WORK=$work CRASH_MS=$crash QUIET=$quiet \
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

# hello with 2 workers and --work 0, or the seed's cluster.js with WORK=0 (QUIET=$3, optional),
# for run $1 of server $2 (hello|node).
start_no_work() {
  if [[ $2 == hello ]]; then start_hello "$1-hello" 2 --work 0; else start_node "$1-node" 0 "" "${3:-}"; fi
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
# Load

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


# Sleeps until $1, a time in microseconds on $EPOCHREALTIME's clock; returns at once if it passed.
sleep_until() {
  local left=$(($1 - ${EPOCHREALTIME/./}))
  ((left > 0)) || return 0
  sleep "$((left / 1000000)).$(printf '%06d' $((left % 1000000)))"
}

# Waits for the load generator to end; returns its exit status.
wait_load() {
  local rc=0
  wait "$load_pid" || rc=$?
  forget "$load_pid"
  return "$rc"
}
load_only() {  # $1 output, $2 wrk|ab, $3 seconds
  start_load "$@"
  wait_load
}

# Parses a wrk or ab output ($1 tool, $2 file; $3 the server's log). Sets L_requests (responses),
# L_ok, L_failed (non-2xx + socket errors, + responses cut short for ab), L_sock (socket errors by
# kind), L_sock_n, L_non2xx, L_note. Returns 1 when the tool printed no result.
parse_load() {
  local tool=$1 out=$2 log=$3 c r w t e e_only l complete short counted
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
  # With -r, ab 2.3 counts a connection reset in the middle of a request three times: a receive
  # error, a "Length" failure, and an exception (the same poll() event also has POLLERR, which
  # its loop counts after read_connection() has). 10 resets out of 100 requests print "Failed
  # requests: 30 (Connect: 0, Receive: 10, Length: 10, Exceptions: 10)". So only exceptions
  # beyond the receive errors are failures of their own.
  ((e > r)) && e_only=$((e - r)) || e_only=0
  L_requests=$complete
  L_sock_n=$((c + r + w + e_only))
  L_sock="connect $c, receive $r, write $w, other exceptions $e_only"
  ((counted > 0)) && L_sock+=", cut short $counted"
  L_failed=$((L_sock_n + L_non2xx + counted))
  L_ok=$((complete - r - w - L_non2xx - counted))
  return 0
}


# ----------------------------------------------------------------------------------------------
# Results and the report's common parts

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


server_label() { [[ $1 == hello ]] && echo "hello" || echo "Node cluster.js"; }

target_row() {  # $1 target, $2 measured, $3 0/1 reached (empty: not measured)
  local verdict="not measured"
  [[ $3 == 1 ]] && verdict="reached"
  [[ $3 == 0 ]] && verdict="NOT reached"
  echo "| $1 | $2 | $verdict |"
}

# The report's first lines: date, machine, binaries and tools. $1: what ran, for the "runs" line.
report_header() {
  local cpu_model kernel
  cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
  kernel=$(uname -srm)
  echo "- date: $(date '+%Y-%m-%d %H:%M:%S %Z')"
  echo "- machine: $(nproc) CPUs ($cpu_model), $kernel; load generator on the same cores, loopback"
  echo "- hello: $hello_source (built $(head -n 1 <<<"$hello_stamp"), sha256 $(tail -n 1 <<<"$hello_stamp"))"
  echo "- node: $( ((have_node)) && "$node_bin" --version || echo n/a), $(wrk --version 2>&1 | head -n 1 | awk '{ print $1, $2 }'), $(ab -V | head -n 1 | sed 's/This is //; s/, Version / /; s/ <.*//')"
  echo "- runs: $1$( ((quick)) && echo '; QUICK (smoke run)')"
  ((busy_runs)) && echo "- WARNING: before $busy_runs run(s) the machine stayed under 90% idle for 10 s (other load)"
  return 0
}

# The report's notes, then the head of its table of targets.
report_notes_and_targets() {
  local n
  if ((${#notes[@]})); then
    echo
    echo "## Notes"
    echo
    for n in "${notes[@]}"; do echo "- $n"; done
  fi
  echo
  echo "## Targets (hello)"
  echo
  echo "| target | measured | |"
  echo "|---|---|---|"
}

# Prints the report written to $tmp/report.md, and copies it to --out's file if one was given.
emit_report() {
  cat "$tmp/report.md"
  if [[ -n $out_file ]]; then
    cp "$tmp/report.md" "$out_file"
    note "report written to $out_file"
  fi
}
