# Runs one compile_fail case: the program must NOT compile, and the compiler's diagnostics must
# contain the word named on the file's first line (`// expect-error: WORD`), so the test fails
# both when the misuse compiles and when it is rejected for some unrelated reason.
#
# cmake -DCOMPILER=<c++> -DINCLUDE_DIR=<dir> -DSOURCE=<file.cpp> [-DEXTRA_FLAGS=a;b] -P compile_fail.cmake
foreach(_var COMPILER INCLUDE_DIR SOURCE)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "compile_fail.cmake: -D${_var}=... is required")
  endif()
endforeach()

file(STRINGS "${SOURCE}" _first_line LIMIT_COUNT 1)
if(NOT _first_line MATCHES "^//[ \t]*expect-error:[ \t]*([^ \t].*[^ \t]|[^ \t])[ \t]*$")
  message(FATAL_ERROR
    "${SOURCE}: the first line must be `// expect-error: WORD`, found `${_first_line}`")
endif()
set(_expected "${CMAKE_MATCH_1}")
# An optional second line `// flags: F...` adds compiler flags after -std=c++20 (a later -std
# wins: `// flags: -std=c++17` compiles the case as C++17).
file(STRINGS "${SOURCE}" _first_lines LIMIT_COUNT 2)
list(LENGTH _first_lines _count)
if(_count EQUAL 2)
  list(GET _first_lines 1 _second_line)
  if(_second_line MATCHES "^//[ \t]*flags:[ \t]*(.*)$")
    separate_arguments(_case_flags UNIX_COMMAND "${CMAKE_MATCH_1}")
    list(APPEND EXTRA_FLAGS ${_case_flags})
  endif()
endif()

execute_process(
  COMMAND "${COMPILER}" -std=c++20 -fsyntax-only ${EXTRA_FLAGS} "-I${INCLUDE_DIR}" "${SOURCE}"
  RESULT_VARIABLE _result
  OUTPUT_VARIABLE _output
  ERROR_VARIABLE _output)

if(_result EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must not (expected an error naming `${_expected}`)")
endif()
# Literal match: escape regex metacharacters in WORD.
string(REGEX REPLACE "([][+.*?()^$|\\\\{}])" "\\\\\\1" _expected_regex "${_expected}")
if(NOT _output MATCHES "${_expected_regex}")
  message("${_output}")
  message(FATAL_ERROR "${SOURCE} failed to compile as expected, but no diagnostic mentions `${_expected}`")
endif()
message(STATUS "${SOURCE}: rejected as expected; the diagnostics mention `${_expected}`")
