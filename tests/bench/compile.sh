#!/usr/bin/env bash
# Compile time of a Server program (issue 14's Targets): tests/bench/compile/server.cpp, a
# 90-line program on the default policies, compiled (-c, no link) with g++ -std=c++20 at -O0
# and -O2 as
#   base       header-only, with the headers of BASE (a commit: what `main` was before the change)
#   header     header-only, with this tree's headers
#   separate   this tree with -DPREFORK_SEPARATE_COMPILATION: the program's unit alone
#   std        a file that includes only the standard and system headers the library includes
# plus, once per level, src.cpp (the one unit that includes <prefork/impl/src.hpp>: compiled
# once per build, not per file). Each figure is the median of RUNS runs (default 3) of the
# compiler's CPU time, user + system (steadier than wall time on a shared machine; the wall
# time follows in parentheses); the variants are interleaved so that a change in the machine's
# load hits them alike. Prints a Markdown table, the load before and after, and the
# preprocessed size of each unit. Builds nothing else and is not part of CI.
#
#   tests/bench/compile.sh [BASE] [RUNS]     BASE: a commit or branch (default: main)
# Environment: CXX (default g++).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
base=${1:-main}
runs=${2:-3}
cxx=${CXX:-g++}
work=$(mktemp -d "${TMPDIR:-/tmp}/prefork-compile.XXXXXX")
trap 'rm -rf "$work"' EXIT

program="$root/tests/bench/compile/server.cpp"
git -C "$root" archive "$base" include | tar -x -C "$work" --transform 's|^include|base-include|'
base_commit=$(git -C "$root" rev-parse --short "$base")

# The standard and system headers the library's headers include, one unit.
grep -rhoE '^#include <[^>]+>' "$root/include" | grep -v '<prefork/' | sort -u >"$work/std.cpp"
printf '#include <prefork/impl/src.hpp>\n' >"$work/src.cpp"

variants=(base header separate std)
flags_of() {  # variant -> compiler flags and source
  case $1 in
    base) echo "-I$work/base-include $program" ;;
    header) echo "-I$root/include $program" ;;
    separate) echo "-DPREFORK_SEPARATE_COMPILATION -I$root/include $program" ;;
    std) echo "$work/std.cpp" ;;
    src) echo "-DPREFORK_SEPARATE_COMPILATION -I$root/include $work/src.cpp" ;;
  esac
}

# One compile; appends "cpu wall" to $work/<variant><level>.
measure() {  # variant level
  local out="$work/$1$2.times"
  # shellcheck disable=SC2046 # flags_of's words are separate arguments
  /usr/bin/time -f '%U %S %e' -o "$work/time" \
    "$cxx" -std=c++20 "$2" -c $(flags_of "$1") -o "$work/out.o"
  awk '{ printf "%.2f %.2f\n", $1 + $2, $3 }' "$work/time" >>"$out"
}

median() {  # file column -> the median of that column
  sort -n -k"$2" "$1" | awk -v c="$2" '{ v[NR] = $c } END { print v[int((NR + 1) / 2)] }'
}

cell() {  # variant level -> "cpu (wall)" medians
  local f="$work/$1$2.times"
  printf '%s s (%s s)' "$(median "$f" 1)" "$(median "$f" 2)"
}

echo "compile.sh: $cxx ($("$cxx" --version | head -n 1)), $runs runs, base $base ($base_commit)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"
for ((run = 1; run <= runs; run++)); do
  for level in -O0 -O2; do
    for v in "${variants[@]}" src; do measure "$v" "$level"; done
  done
  echo "  run $run of $runs done"
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

lines() {  # variant -> preprocessed lines
  # shellcheck disable=SC2046
  "$cxx" -std=c++20 -E $(flags_of "$1") | wc -l
}

echo
echo "| $(basename "$program"), g++ -std=c++20 -c | -O0 | -O2 | preprocessed lines |"
echo "|---|---|---|---|"
name_of() {
  case $1 in
    base) echo "header-only, base $base_commit" ;;
    header) echo "header-only, this tree" ;;
    separate) echo "separate compilation (the unit alone)" ;;
    std) echo "only the standard headers the library uses" ;;
    src) echo "src.cpp, once per build (separate compilation)" ;;
  esac
}
for v in "${variants[@]}" src; do
  echo "| $(name_of "$v") | $(cell "$v" -O0) | $(cell "$v" -O2) | $(lines "$v") |"
done
echo
echo "CPU time (user + system), median of $runs; wall time in parentheses."
echo "load after: $load_after"
