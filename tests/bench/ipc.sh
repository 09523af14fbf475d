#!/usr/bin/env bash
# prefork's IPC benchmark (issue 6): master -> worker one-way throughput of small messages and
# ping-pong round trip, measured by ipc_bench (tests/bench/ipc_bench.cpp, with StringCodec and with
# PodCodec) and by the seed's Node anchor (tests/bench/node/ipc.js, cluster IPC), interleaved in one run
# on this machine; then, for ipc_bench only (Node's cluster has neither), request/response round
# trips both ways and shared-store get and increment from the worker. Prints a Markdown report:
# medians, ratios to Node, and whether issue 6's targets were reached. It builds nothing and never runs in CI: timings from a shared runner compare noise.
#
#   tests/bench/ipc.sh [BUILD_DIR] [--runs N] [--quick] [--out FILE]
#
#   BUILD_DIR   a configured and built tree (default: build, next to tests/); needs
#               BUILD_DIR/tests/bench/ipc_bench (`cmake --build --preset release --target
#               ipc_bench`). IPC_BENCH=/path/to/ipc_bench runs another binary.
#   --runs N    runs of each program, interleaved so that drift hits all alike (default 5);
#               every figure is the median of its runs.
#   --quick     one run with N=20000, RTT=2000: checks the script, measures nothing.
#   --out FILE  also write the report to FILE.
#
# N (default 200000 messages one way) and RTT (default 20000 round trips) in the environment set
# the counts of both programs, as ipc.js reads them; ipc_bench does RTT operations in each of its
# request and store modes too. Needs node (NODE=/path/to/node picks another)
# and the anchor: IPC_JS=/path/to/ipc.js, by default tests/bench/node/ipc.js in this repository. Each program runs under `timeout 120`; nothing outlives the script.
set -euo pipefail

# One compound command, parsed before any of it runs: editing the file during a run changes nothing.
{

bench_name=ipc
bench_script=${BASH_SOURCE[0]}
# settle, note, die, usage and fmt_int; LC_ALL=C, BENCH_DIR and ROOT.
# shellcheck source=tests/bench/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

build_dir="$ROOT/build" runs=5 quick=0 out_file=""
while (($#)); do
  case "$1" in
    --runs) (($# > 1)) || die "--runs needs a number"; runs=$2; shift ;;
    --runs=*) runs=${1#--runs=} ;;
    --quick) quick=1 ;;
    --out) (($# > 1)) || die "--out needs a file"; out_file=$2; shift ;;
    --out=*) out_file=${1#--out=} ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) build_dir=$1 ;;
  esac
  shift
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs: '$runs' is not a positive number"
if ((quick)); then
  runs=1
  export N=${N:-20000} RTT=${RTT:-2000}
fi
export N=${N:-200000} RTT=${RTT:-20000}

ipc_bench=${IPC_BENCH:-$build_dir/tests/bench/ipc_bench}
[[ -x $ipc_bench ]] ||
  die "$ipc_bench not found: build it first (cmake --build --preset release --target ipc_bench), or set IPC_BENCH="
ipc_js=${IPC_JS:-$BENCH_DIR/node/ipc.js}
node_bin=${NODE:-node}
have_node=0
if [[ -f $ipc_js ]] && command -v "$node_bin" >/dev/null && "$node_bin" --version >/dev/null 2>&1; then
  have_node=1
else
  note "node or $ipc_js not found: the Node row prints n/a"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/prefork-ipc.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# A copy, so that a rebuild during the run cannot mix two versions.
cp "$ipc_bench" "$tmp/ipc_bench"
ipc_stamp="$(date -r "$ipc_bench" '+%Y-%m-%d %H:%M:%S'), sha256 $(sha256sum "$ipc_bench" | cut -c1-12)"

PROGRAMS=(string pod node)
label() {
  case "$1" in
    string) echo "prefork ipc_bench, StringCodec" ;;
    pod) echo "prefork ipc_bench, PodCodec<{u64 seq, u64 users}>" ;;
    node) echo "Node cluster IPC (ipc.js)" ;;
  esac
}

# ipc_bench's modes after one-way and rtt, each printing "<mode> us p50=A p99=B".
LATENCY_MODES=(request worker-request store-get store-incr)

# One run of program $1; appends its figures to $tmp/<program>.{oneway,p50,p99} and, for
# ipc_bench, $tmp/<program>.<mode>.{p50,p99}. A run missing any figure counts as failed and
# adds none of them.
busy_runs=0
failed_runs=0
run_one() {
  local prog=$1 out="$tmp/out" rc=0 modes
  modes=$(IFS=,; echo "one-way,rtt,${LATENCY_MODES[*]}")
  settle
  case "$prog" in
    string | pod) timeout 120 "$tmp/ipc_bench" --codec "$prog" --mode "$modes" >"$out" 2>&1 || rc=$? ;;
    node) timeout 120 "$node_bin" "$ipc_js" >"$out" 2>&1 || rc=$? ;;
  esac
  local ow p50 p99 m missing=0 summary=""
  declare -A mp50=() mp99=()
  ow=$(sed -n 's/^one-way: .* = \([0-9.]*\) msg\/s$/\1/p' "$out")
  read -r p50 p99 < <(sed -n 's/^rtt us p50=\([0-9.]*\) p99=\([0-9.]*\)$/\1 \2/p' "$out") || true
  [[ -z $ow || -z ${p50:-} || -z ${p99:-} ]] && missing=1
  if [[ $prog != node ]]; then
    for m in "${LATENCY_MODES[@]}"; do
      read -r "mp50[$m]" "mp99[$m]" < <(sed -n "s/^$m us p50=\([0-9.]*\) p99=\([0-9.]*\)\$/\1 \2/p" "$out") || true
      [[ -z ${mp50[$m]:-} || -z ${mp99[$m]:-} ]] && missing=1
    done
  fi
  if ((rc != 0 || missing)); then
    failed_runs=$((failed_runs + 1))
    note "$(label "$prog"): run failed (status $rc): $(tail -n 2 "$out" | tr '\n' ' ')"
    return 0
  fi
  echo "$ow" >>"$tmp/$prog.oneway"
  echo "$p50" >>"$tmp/$prog.p50"
  echo "$p99" >>"$tmp/$prog.p99"
  if [[ $prog != node ]]; then
    for m in "${LATENCY_MODES[@]}"; do
      echo "${mp50[$m]}" >>"$tmp/$prog.$m.p50"
      echo "${mp99[$m]}" >>"$tmp/$prog.$m.p99"
      summary+=", $m p50 ${mp50[$m]} us"
    done
  fi
  note "$(label "$prog"): $ow msg/s one way, rtt p50 $p50 us, p99 $p99 us$summary"
}

# Median of the numbers in file $1 (empty if there are none).
median() {
  [[ -s $1 ]] || return 0
  sort -g "$1" | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
range() {  # "min-max" of file $1
  [[ -s $1 ]] || return 0
  echo "$(fmt_int "$(sort -g "$1" | head -n 1)")-$(fmt_int "$(sort -g "$1" | tail -n 1)")"
}
# "median (min-max)" of the latencies in file $1, or n/a.
latency() {
  [[ -s $1 ]] || { echo n/a; return 0; }
  local lo hi
  lo=$(sort -g "$1" | head -n 1) hi=$(sort -g "$1" | tail -n 1)
  if [[ $lo == "$hi" ]]; then median "$1"; else echo "$(median "$1") ($lo-$hi)"; fi
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.1fx", a / b; else print "n/a" }'; }

note "N=$N one way, RTT=$RTT round trips, $runs run(s) of each program"
for ((r = 1; r <= runs; r++)); do
  for prog in "${PROGRAMS[@]}"; do
    [[ $prog == node ]] && ((!have_node)) && continue
    run_one "$prog"
  done
done

declare -A ow p50 p99
for prog in "${PROGRAMS[@]}"; do
  ow[$prog]=$(median "$tmp/$prog.oneway")
  p50[$prog]=$(median "$tmp/$prog.p50")
  p99[$prog]=$(median "$tmp/$prog.p99")
done
node_anchor=166100  # tests/bench/RESULTS.md: Node cluster IPC one way on the seed's 2-core machine

{
  echo "# IPC: prefork vs Node cluster"
  echo
  echo "- date: $(date '+%Y-%m-%d %H:%M:%S %Z')"
  echo "- machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), $(uname -srm)"
  echo "- ipc_bench: $ipc_bench (built $ipc_stamp)"
  echo "- node: $( ((have_node)) && "$node_bin" --version || echo n/a), $ipc_js"
  echo "- runs: $runs of each program, interleaved; N=$N messages one way, RTT=$RTT round trips; medians (one-way min-max)$( ((quick)) && echo '; QUICK (smoke run)')"
  ((busy_runs)) && echo "- WARNING: before $busy_runs run(s) the machine stayed under 90% idle for 10 s (other load)"
  ((failed_runs)) && echo "- WARNING: $failed_runs run(s) failed (see the notes on stderr)"
  echo
  echo "| program | one-way msg/s | (min-max) | vs Node | rtt p50 us | rtt p99 us | p50 vs Node |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for prog in "${PROGRAMS[@]}"; do
    echo "| $(label "$prog") | $(fmt_int "${ow[$prog]}") | $(range "$tmp/$prog.oneway") | $(ratio "${ow[$prog]}" "${ow[node]}") | ${p50[$prog]:-n/a} | ${p99[$prog]:-n/a} | $(ratio "${p50[node]}" "${p50[$prog]}") |"
  done
  echo
  echo "Request/response and the shared store, in µs (median of the runs' p50, min-max in"
  echo "parentheses; p99 likewise). request: master -> worker with Worker::request() and the Server's"
  echo "on_request; worker-request: worker -> master, timed in the worker; store-get / store-incr:"
  echo "the worker's store().get() of one of 10,000 keys / store().increment() of one counter."
  echo "Node's cluster has no request/response and no shared store: n/a."
  echo
  echo "| program | request p50 | request p99 | worker-request p50 | worker-request p99 | store-get p50 | store-get p99 | store-incr p50 | store-incr p99 |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for prog in "${PROGRAMS[@]}"; do
    row="| $(label "$prog") |"
    for m in "${LATENCY_MODES[@]}"; do
      row+=" $(latency "$tmp/$prog.$m.p50") | $(latency "$tmp/$prog.$m.p99") |"
    done
    echo "$row"
  done
  echo
  echo "## Targets (issue 6)"
  echo
  echo "| target | measured | |"
  echo "|---|---|---|"
  verdict() { [[ -z $2 ]] && echo "not measured" && return; awk -v v="$2" -v t="$3" -v op="$1" 'BEGIN { ok = op == ">=" ? v >= t : v <= t; print ok ? "reached" : "NOT reached" }'; }
  for prog in string pod; do
    x=$(awk -v a="${ow[$prog]}" -v b="${ow[node]:-0}" 'BEGIN { if (a != "" && b > 0) print a / b }')
    echo "| one-way >= 20x Node in this run, $(label "$prog") | $(ratio "${ow[$prog]}" "${ow[node]}") | $(verdict ">=" "$x" 20) |"
    x=$(awk -v a="${ow[$prog]}" -v b="$node_anchor" 'BEGIN { if (a != "") print a / b }')
    echo "| one-way >= 20x Node's anchor (166,100 msg/s), $(label "$prog") | $(ratio "${ow[$prog]}" "$node_anchor") | $(verdict ">=" "$x" 20) |"
    echo "| rtt p50 <= 20 us, $(label "$prog") | ${p50[$prog]:-n/a} us | $(verdict "<=" "${p50[$prog]}" 20) |"
    for m in request worker-request; do
      x=$(median "$tmp/$prog.$m.p50")
      echo "| $m p50 <= 20 us, $(label "$prog") | ${x:-n/a} us | $(verdict "<=" "$x" 20) |"
    done
    x=$(median "$tmp/$prog.store-get.p50")
    echo "| store-get p50 <= 30 us, $(label "$prog") | ${x:-n/a} us | $(verdict "<=" "$x" 30) |"
  done
  echo "| request / store-get, $(label node) | n/a | no equivalent |"
} >"$tmp/report.md"

cat "$tmp/report.md"
if [[ -n $out_file ]]; then
  cp "$tmp/report.md" "$out_file"
  note "report written to $out_file"
fi
exit 0
}
