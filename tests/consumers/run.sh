#!/usr/bin/env bash
# Builds and runs the projects in tests/consumers, each of which gets prefork the way a user's
# project would: add_subdirectory, FetchContent, find_package after `cmake --install`, a Meson
# subproject, and a Makefile with pkg-config. Each project is copied to a temporary directory,
# as a user would copy it, and built there; the checkout itself is only read (its working tree,
# uncommitted changes included). Prints one line per consumer, then "consumers: N passed";
# exits 1 if any failed, after printing the end of that consumer's log.
#
#   tests/consumers/run.sh [NAME...]    NAME: add_subdirectory fetch_content find_package
#                                             meson_subproject pkg_config separate_compilation
#                                             (default: all)
# Environment: CXX picks the compiler (CMake, Meson and make all read it; default c++);
# KEEP=1 keeps the temporary directory and says where it is.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
all=(add_subdirectory fetch_content find_package meson_subproject pkg_config separate_compilation)
# The program has its own 20 s deadline; this one only catches a master that ignores it.
run_timeout=60

for tool in cmake ninja meson pkg-config make timeout; do
  command -v "$tool" >/dev/null || { echo "consumers: $tool is not installed (tests/deps.sh --tests)" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/prefork-consumers.XXXXXX")
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "consumers: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Each consumer is built and run in a subshell with errexit, so its first failing command ends
# it. Every command's output goes to that consumer's log, and `step` records what was running,
# for the failure message.
log=/dev/null
step() { echo "$*" >"$work/$name.step"; }
quiet() { "$@" >>"$log" 2>&1; }

# A consumer must compile its own main.cpp and nothing else: prefork's tests, examples and
# header checks stay off when prefork is not the top-level project. And nothing of prefork's
# own flags (-Werror) may reach a consumer's compile commands.
check_compile_commands() {
  local db=$1
  local files
  files=$(grep -c '"file"' "$db" || true)
  if [ "$files" != 1 ] || ! grep -q '"file": *"[^"]*main\.cpp"' "$db"; then
    echo "expected main.cpp to be the only source compiled, $db lists $files:" >>"$log"
    grep '"file"' "$db" >>"$log" || true
    return 1
  fi
  if grep -q -- '-Werror' "$db"; then
    echo "prefork's -Werror leaked into the consumer's compile command ($db)" >>"$log"
    return 1
  fi
}

cmake_configure() {  # source build args...
  local src=$1 bin=$2
  shift 2
  quiet cmake -S "$src" -B "$bin" -G Ninja -DCMAKE_EXPORT_COMPILE_COMMANDS=ON "$@"
}

# `cmake --install` of the checkout, shared by find_package and pkg_config. Configured for the
# default prefix and installed elsewhere, as a packager does: both the CMake package and the
# .pc file must find the headers relative to where they were installed.
prefix="$work/prefix"
install_prefork() {
  if [ -e "$work/installed" ]; then return 0; fi
  step "install prefork (cmake --install)"
  cmake_configure "$root" "$work/prefork-build" -DPREFORK_BUILD_TESTS=OFF -DPREFORK_BUILD_EXAMPLES=OFF
  quiet cmake --install "$work/prefork-build" --prefix "$prefix"
  : >"$work/installed"
}

# FetchContent downloads an archive of the working tree (what `git ls-files` lists, tracked and
# untracked-but-not-ignored, so no build directories), through a file:// URL: no network.
archive="$work/prefork-src.tar.gz"
make_archive() {
  step "archive the checkout"
  if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z --cached --others --exclude-standard) |
      while IFS= read -r -d '' f; do
        # A file deleted but not yet committed is still listed.
        if [ -e "$root/$f" ] || [ -L "$root/$f" ]; then printf '%s\0' "$f"; fi
      done >"$work/archive.list"
    quiet tar -C "$root" --null -T "$work/archive.list" -czf "$archive"
  else
    quiet tar -C "$root" --exclude-vcs --exclude='./build' --exclude='./build-*' \
      --exclude='./builddir' -czf "$archive" .
  fi
}

# Each build_NAME builds the copy in $dir and sets `program` to the path of what it built.
build_add_subdirectory() {
  step "cmake configure"
  cmake_configure "$dir" "$dir/build" -DPREFORK_SOURCE_DIR="$root"
  step "cmake build"
  quiet cmake --build "$dir/build"
  step "check the compile commands"
  check_compile_commands "$dir/build/compile_commands.json"
  program="$dir/build/consumer"
}

build_fetch_content() {
  make_archive
  local url="file://$archive"
  step "cmake configure (FetchContent from $url)"
  cmake_configure "$dir" "$dir/build" -DPREFORK_URL="$url"
  step "cmake build"
  quiet cmake --build "$dir/build"
  step "check the compile commands"
  check_compile_commands "$dir/build/compile_commands.json"
  program="$dir/build/consumer"
}

build_find_package() {
  install_prefork
  step "cmake configure (find_package, CMAKE_PREFIX_PATH=$prefix)"
  cmake_configure "$dir" "$dir/build" -DCMAKE_PREFIX_PATH="$prefix"
  step "cmake build"
  quiet cmake --build "$dir/build"
  program="$dir/build/consumer"
}

build_meson_subproject() {
  mkdir "$dir/subprojects"
  ln -s "$root" "$dir/subprojects/prefork"
  step "meson setup (subproject)"
  # Insist on the subproject even where an installed prefork.pc could be found.
  quiet meson setup --force-fallback-for=prefork "$dir/build" "$dir"
  step "meson compile"
  quiet meson compile -C "$dir/build"
  step "check the compile commands"
  check_compile_commands "$dir/build/compile_commands.json"
  program="$dir/build/consumer"
}

build_pkg_config() {
  install_prefork
  local pcdir="$prefix/share/pkgconfig"
  step "pkg-config --validate prefork ($pcdir)"
  PKG_CONFIG_PATH="$pcdir" quiet pkg-config --validate prefork
  PKG_CONFIG_PATH="$pcdir" quiet pkg-config --cflags prefork
  step "make"
  PKG_CONFIG_PATH="$pcdir" quiet make -C "$dir"
  program="$dir/consumer"
}

# Two translation units that include prefork.hpp, linked together and run: with CMake
# header-only and with PREFORK_SEPARATE_COMPILATION=ON, then as a Meson subproject with
# separate_compilation=true (the program run_consumer runs).
build_separate_compilation() {
  local mode
  for mode in OFF ON; do
    step "cmake configure (PREFORK_SEPARATE_COMPILATION=$mode)"
    cmake_configure "$dir" "$dir/build-$mode" -DPREFORK_SOURCE_DIR="$root" \
      -DPREFORK_SEPARATE_COMPILATION="$mode"
    step "cmake build (PREFORK_SEPARATE_COMPILATION=$mode)"
    quiet cmake --build "$dir/build-$mode"
    if grep -q -- '-Werror' "$dir/build-$mode/compile_commands.json"; then
      echo "prefork's -Werror leaked into the consumer's compile commands" >>"$log"
      return 1
    fi
  done
  step "run the header-only build"
  (cd "$dir" && timeout -k 5 "$run_timeout" "$dir/build-OFF/consumer") >>"$log" 2>&1
  step "run the CMake build with PREFORK_SEPARATE_COMPILATION=ON"
  (cd "$dir" && timeout -k 5 "$run_timeout" "$dir/build-ON/consumer") >>"$log" 2>&1
  mkdir "$dir/subprojects"
  ln -s "$root" "$dir/subprojects/prefork"
  step "meson setup (subproject, -Dprefork:separate_compilation=true)"
  quiet meson setup --force-fallback-for=prefork -Dprefork:separate_compilation=true \
    "$dir/build-meson" "$dir"
  step "meson compile"
  quiet meson compile -C "$dir/build-meson"
  program="$dir/build-meson/consumer"
}

run_consumer() {
  set -e
  step "copy the project"
  # -L: the project's main.cpp is a symlink to common/main.cpp; a user's copy has the file.
  cp -RL "$here/$name" "$dir"
  "build_$name"
  step "run $program"
  (cd "$dir" && timeout -k 5 "$run_timeout" "$program") >"$work/$name.out" 2>>"$log"
}

names=("$@")
if [ ${#names[@]} -eq 0 ]; then names=("${all[@]}"); fi
for name in "${names[@]}"; do
  if [ ! -d "$here/$name" ] || [ "$name" = common ]; then
    echo "consumers: no consumer named '$name' (have: ${all[*]})" >&2
    exit 2
  fi
done

passed=0
failed=()
for name in "${names[@]}"; do
  started=$SECONDS
  log="$work/$name.log"
  dir="$work/$name"
  : >"$log"
  # Not `if (...)`: errexit is ignored inside a condition, even where set again.
  set +e
  (run_consumer)
  status=$?
  set -e
  took=$((SECONDS - started))
  if [ $status -eq 0 ]; then
    passed=$((passed + 1))
    echo "consumers/$name: passed in $took s: $(tail -n 1 "$work/$name.out")"
  else
    failed+=("$name")
    cat "$work/$name.out" >>"$log" 2>/dev/null || true
    echo "consumers/$name: FAILED after $took s (step: $(cat "$work/$name.step")); the end of its log:"
    tail -n 60 "$log" | sed 's/^/  | /'
  fi
done

if [ ${#failed[@]} -ne 0 ]; then
  echo "consumers: $passed passed, ${#failed[@]} failed (${failed[*]})"
  exit 1
fi
echo "consumers: $passed passed"
