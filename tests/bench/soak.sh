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
# while a run is in progress cannot change what the run executes; lib.sh holds what chaos.sh
# shares (see its header).
{

bench_name=soak
bench_script="${BASH_SOURCE[0]}"
ALL_CASES=(keepalive-reload close-reload upgrade upgrade-close crash)
# shellcheck source=tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_options "$@"

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

bench_setup

# ----------------------------------------------------------------------------------------------
# Load, with signals on a timed schedule

# Runs the load ($1 output, $2 wrk|ab, $3 seconds) and sends signal $4 to pid $5 at $6 s after the
# load started, then every $7 s (0: once), never at or after the load's end. Each signal's time
# goes to $srv_signals. Returns the load generator's exit status.
load_with_signals() {
  local out=$1 tool=$2 secs=$3 sig=$4 target=$5 at=$6 every=$7 t0
  start_load "$out" "$tool" "$secs"
  t0=${EPOCHREALTIME/./}  # microseconds
  while ((at < secs)); do
    sleep_until $((t0 + at * 1000000))
    alive "$load_pid" || break
    if ! alive "$target"; then note "pid $target (the master) is gone: no more SIG$sig"; break; fi
    echo "$EPOCHREALTIME" >>"$srv_signals"
    kill -"$sig" "$target" 2>/dev/null || true
    ((every > 0)) || break
    at=$((at + every))
  done
  wait_load
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

# A rolling-restart case: $1 case, $2 server (hello|node), $3 tool.
run_reload() {
  local case_name=$1 server=$2 tool=$3 key="$1,$2" out signals done_ms own_ms sent ended failures
  local replaced
  local label="$case_name $server"
  settle
  start_no_work "$case_name" "$server" || {
    row[$key]="| $(server_label "$server") | $tool | did not start: $srv_error | | | | | | | |"
    stop_run; return 0; }
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


# ----------------------------------------------------------------------------------------------
# Report

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
  local s
  echo "# prefork soak test (issue 4: zero downtime)"
  echo
  report_header "restarts ${reload_secs} s with SIGUSR2 every ${reload_every} s; upgrade ${upgrade_secs} s with SIGUSR1 at ${upgrade_at} s; crash ${crash_secs} s, workers exit within ${crash_ms} ms"

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

  report_notes_and_targets
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
emit_report
exit 0
}
