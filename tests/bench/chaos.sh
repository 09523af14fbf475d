#!/usr/bin/env bash
# prefork's chaos test (issue 5, supervision that survives faults): build/examples/hello under load
# while a random worker is killed with SIGKILL every 0.5 s, next to the seed's Node cluster.js
# under the same load and the same kills. Prints a Markdown report: requests served and failed,
# socket errors by kind, kills sent, the failures per kill next to the connections the killed
# workers held, and whether issue 5's targets were reached. It builds nothing and never runs in CI.
#
#   tests/bench/chaos.sh [BUILD_DIR] [--quick] [--only CASE[,CASE...]] [--out FILE] [--keep-logs]
#
#   BUILD_DIR   a configured and built tree (default: build, next to tests/); needs
#               BUILD_DIR/examples/hello. HELLO=/path/to/hello tests another binary instead.
#   --quick     6 s runs: checks the script, proves little.
#   --only      keepalive  wrk -t2 -c200 -d20s (keep-alive), hello --workers 2 --work 0 and Node
#                          cluster.js (WORKERS=2 WORK=0 QUIET=1), SIGKILL to a random worker every
#                          0.5 s
#               close      ab -c200 -t20 -r (a new connection per request), the same kills
#               Default: both.
#   --out FILE  also write the final Markdown report to FILE.
#   --keep-logs keep the temporary directory (server logs, wrk/ab output, each kill's time, pid
#               and the connections the pid held) and print its path.
#
# Needs curl, ab (apache2-utils), wrk and pgrep; node is optional (its rows print "n/a"),
# NODE=/path/to/node picks another one. Every server is bound to 127.0.0.1, on a port from
# --port 0 (hello) or a free port the kernel picked (Node); the workers to kill are the master's
# children (pgrep -P), and every process started here is stopped by pid on exit.
set -euo pipefail

# The whole script is one compound command, parsed before any of it runs, so editing this file
# while a run is in progress cannot change what the run executes; lib.sh holds what soak.sh
# shares (see its header).
{

bench_name=chaos
bench_script="${BASH_SOURCE[0]}"
ALL_CASES=(keepalive close)
# shellcheck source=tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_options "$@"

if ((quick)); then chaos_secs=6; else chaos_secs=20; fi
kill_every_ms=500     # between two kills: the load pattern, not a synchronisation
ab_requests=2000000   # ab -n: only a bound (-t ends the run); ab allocates 32 bytes per request
ready_timeout=15      # seconds a server may take to print its pids and answer

bench_setup

# ----------------------------------------------------------------------------------------------
# Load, with a random worker killed on a timed schedule

# Established TCP connections that process $1 holds (its socket descriptors found in
# /proc/net/tcp and tcp6 in state 01): the requests a kill of that process can cut in the middle.
tcp_connections() {
  local inodes
  inodes=$(find "/proc/$1/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n')
  [[ -n $inodes ]] || { echo 0; return 0; }
  awk 'FNR == NR { held[$1] = 1; next } FNR > 1 && $4 == "01" && ($10 in held) { n++ }
       END { print n + 0 }' - /proc/net/tcp /proc/net/tcp6 <<<"$inodes"
}

# Runs the load ($1 output, $2 wrk|ab, $3 seconds) and every kill_every_ms, from then until the
# load ends, sends SIGKILL to a worker picked at random among those alive. The worker is stopped
# (SIGSTOP) first, so that the connections it holds can be counted as they are when it dies. Each
# kill goes to $srv_signals as "<time> <pid> <TCP connections it held>", or "<time> - 0" when no
# worker was alive; every worker seen goes to $1.workers as "Started process <pid>" (Node's QUIET
# workers print no such line; parse_load needs their pids). Returns the load generator's exit
# status.
load_with_kills() {
  local out=$1 tool=$2 secs=$3 t0 at=$kill_every_ms workers victim held
  start_load "$out" "$tool" "$secs"
  t0=${EPOCHREALTIME/./}  # microseconds
  while ((at < secs * 1000)); do
    sleep_until $((t0 + at * 1000))
    alive "$load_pid" || break
    if ! alive "$srv_pid"; then note "pid $srv_pid (the master) is gone: no more kills"; break; fi
    mapfile -t workers < <(live_workers)
    printf 'Started process %s\n' "${workers[@]}" >>"$out.workers"
    if ((${#workers[@]})); then
      victim=${workers[RANDOM % ${#workers[@]}]}
      if kill -STOP "$victim" 2>/dev/null; then
        held=$(tcp_connections "$victim")
        kill -KILL "$victim" 2>/dev/null || true
        echo "$EPOCHREALTIME $victim $held" >>"$srv_signals"
      fi
    else
      echo "$EPOCHREALTIME - 0" >>"$srv_signals"
    fi
    at=$((at + kill_every_ms))
  done
  wait_load
}

# ----------------------------------------------------------------------------------------------
# Results: one table row per run, and the figures the targets need.

declare -A row=() success_of=() failed_of=() held_of=()
notes=()

# A chaos case: $1 case, $2 server (hello|node), $3 tool.
run_chaos() {
  local case_name=$1 server=$2 tool=$3 key="$1,$2" out kills idle held per_kill held_per_kill
  local label="$1 $2" replaced="n/a" died="n/a"
  settle
  start_no_work "$case_name" "$server" 1 || {
    row[$key]="| $(server_label "$server") | $tool | did not start: $srv_error | | | | | | | |"
    stop_run; return 0; }
  out="$tmp/$run_no-$case_name-$server.$tool"
  note "$label: $tool for $chaos_secs s, SIGKILL to a random worker every $kill_every_ms ms (port $srv_port)"
  load_with_kills "$out" "$tool" "$chaos_secs" ||
    note "$label: $tool exited with an error (see its output)"
  check_alive "$label" || true
  kills=$(awk '$2 != "-"' "$srv_signals" | wc -l)
  idle=$(awk '$2 == "-"' "$srv_signals" | wc -l)
  held=$(awk '$2 != "-" { n += $3 } END { print n + 0 }' "$srv_signals")
  ((idle == 0)) || add_note "$label: no worker was alive at $idle of the kill times (nothing killed)"
  if [[ $server == hello ]]; then
    died=$(grep -c '^Worker [0-9]* died' "$srv_log" || true)
    replaced=$(($(count_started) - 2))
    if grep -q 'keep crashing' "$srv_log"; then
      add_note "$label: $(grep 'keep crashing' "$srv_log" | sort -u | tr '\n' ' ')(the restart policy gave up on a slot)"
    fi
  fi
  live_workers | sed 's/^/Started process /' >>"$out.workers"
  if ! parse_load "$tool" "$out" "$out.workers"; then
    add_note "$label: $tool printed no result: $(tail -n 2 "$out" | tr '\n' ' ')"
    row[$key]="| $(server_label "$server") | $tool | no result | | | | $kills | | $(fmt_int "$held") | $died / $replaced |"
    stop_run; return 0
  fi
  [[ -n $L_note ]] && add_note "$label: $L_note"
  success_of[$key]=$(percent "$L_ok" $((L_ok + L_failed)))
  failed_of[$key]=$L_failed
  held_of[$key]=$held
  per_kill=$(awk -v f="$L_failed" -v k="$kills" 'BEGIN { if (k > 0) printf "%.1f", f / k; else print "n/a" }')
  held_per_kill=$(awk -v h="$held" -v k="$kills" 'BEGIN { if (k > 0) printf "%.1f", h / k; else print "n/a" }')
  row[$key]="| $(server_label "$server") | $tool | $(fmt_int "$L_ok") | $(fmt_int "$L_failed") | ${success_of[$key]}% | $L_sock | $kills | $per_kill | $held_per_kill | $died / $replaced |"
  note "$label: $L_ok served, $L_failed failed (${success_of[$key]}%; $L_sock); $kills kills, $per_kill failed and $held_per_kill connections held per kill"
  stop_run
}

# ----------------------------------------------------------------------------------------------
# Report

report() {
  local s k pct
  echo "# prefork chaos test (issue 5: supervision that survives faults)"
  echo
  report_header "${chaos_secs} s each, SIGKILL to a random worker every ${kill_every_ms} ms, 2 workers, --work 0"
  echo
  echo "## SIGKILL to a random worker every ${kill_every_ms} ms under load"
  echo
  echo "wrk -t2 -c200 -d${chaos_secs}s keeps connections alive; ab -c200 -t${chaos_secs} -r opens one per"
  echo "request. Served: 2xx responses. Failed = non-2xx + socket errors (+ for ab, responses cut"
  echo "short; ab also counts each reset connection as an exception, which is not counted twice)."
  echo "Kills: SIGKILLs sent, to a worker picked at random among the master's live children."
  echo "Held per kill: the established TCP connections the killed worker had open when it died"
  echo "(stopped with SIGSTOP and counted from /proc, then killed), on average: the requests a kill"
  echo "can cut in the middle. Deaths /"
  echo "replacements: hello's \"Worker N died\" lines and \"Started process\" lines after the first 2"
  echo "(Node's cluster.js prints neither with QUIET=1)."
  echo
  echo "| server | load | served | failed | success | socket errors | kills | failed per kill | held per kill | deaths / replacements |"
  echo "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"
  for s in keepalive close; do
    wanted "$s" || continue
    echo "${row[$s,hello]:-| hello | | n/a | | | | | | | |}"
    echo "${row[$s,node]:-| Node cluster.js | | n/a | | | | | | | |}"
  done

  report_notes_and_targets
  for s in keepalive close; do
    wanted "$s" || continue
    k="$s,hello"
    pct=${success_of[$k]:-}
    if [[ -n $pct && $pct != n/a ]]; then
      target_row "$s: >= 99.9% of requests succeed" "$pct%" "$(awk -v p="$pct" 'BEGIN { print (p >= 99.9) ? 1 : 0 }')"
      target_row "$s: failures only requests in flight on the killed workers (failed <= connections they held)" \
        "$(fmt_int "${failed_of[$k]}") failed, $(fmt_int "${held_of[$k]}") held" \
        "$( ((failed_of[$k] <= held_of[$k])) && echo 1 || echo 0)"
    else
      target_row "$s: >= 99.9% of requests succeed" "n/a" ""
    fi
  done
}

# ----------------------------------------------------------------------------------------------

note "hello: $hello_source; cases: $(for c in "${ALL_CASES[@]}"; do wanted "$c" && printf '%s ' "$c"; done | sed 's/ $//'); logs in $tmp"
if wanted keepalive; then
  run_chaos keepalive hello wrk
  if ((have_node)); then run_chaos keepalive node wrk; fi
fi
if wanted close; then
  run_chaos close hello ab
  if ((have_node)); then run_chaos close node ab; fi
fi

report >"$tmp/report.md"
emit_report
exit 0
}
