# Compiles the first ```cpp block of README.md as a reader would copy it, with our warnings as
# errors: the test fails when the README's opening example stops compiling (it once called a
# count() that nothing declared). The block is written to OUTPUT so that a failure can be read.
#
# cmake -DCOMPILER=<c++> -DINCLUDE_DIR=<dir> -DREADME=<README.md> -DOUTPUT=<file.cpp> -P readme_block.cmake
foreach(_var COMPILER INCLUDE_DIR README OUTPUT)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "readme_block.cmake: -D${_var}=... is required")
  endif()
endforeach()

file(READ "${README}" _readme)
set(_fence "```")
string(FIND "${_readme}" "${_fence}cpp\n" _start)
if(_start EQUAL -1)
  message(FATAL_ERROR "${README} has no ${_fence}cpp block")
endif()
math(EXPR _start "${_start} + 7")
string(SUBSTRING "${_readme}" ${_start} -1 _rest)
string(FIND "${_rest}" "\n${_fence}" _length)
if(_length EQUAL -1)
  message(FATAL_ERROR "${README}: the first ${_fence}cpp block is not closed")
endif()
math(EXPR _length "${_length} + 1")
string(SUBSTRING "${_rest}" 0 ${_length} _block)
file(WRITE "${OUTPUT}" "${_block}")

execute_process(
  COMMAND "${COMPILER}" -std=c++20 -Wall -Wextra -Wpedantic -Werror "-I${INCLUDE_DIR}"
          -c "${OUTPUT}" -o "${OUTPUT}.o"
  RESULT_VARIABLE _result
  OUTPUT_VARIABLE _output
  ERROR_VARIABLE _output)
if(NOT _result EQUAL 0)
  message("${_output}")
  message(FATAL_ERROR "the first ${_fence}cpp block of ${README} (written to ${OUTPUT}) does not compile")
endif()
message(STATUS "the first ${_fence}cpp block of ${README} compiles (${OUTPUT})")
