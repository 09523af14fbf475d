# Compiles the first ```cpp block of README.md as a reader would copy it, with our warnings as
# errors: the test fails when the README's opening example stops compiling (it once called a
# count() that nothing declared). The block is written to OUTPUT so that a failure can be read.
# Then each block announced by `<!-- verbatim: PATH -->` on the line before it must appear, as
# it is, in PATH (relative to the README): a listing of an example cannot drift from the code
# that the build compiles and the tests run.
#
# cmake -DCOMPILER=<c++> -DINCLUDE_DIR=<dir> -DREADME=<README.md> -DOUTPUT=<file.cpp> -P readme_block.cmake
cmake_minimum_required(VERSION 3.20)  # a script has no project: without it, while(TRUE) is old-style
foreach(_var COMPILER INCLUDE_DIR README OUTPUT)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "readme_block.cmake: -D${_var}=... is required")
  endif()
endforeach()

file(READ "${README}" _readme)
set(_fence "```")

# The code of the block whose opening fence starts `text` (its first line is the fence):
# in `out_code`; what follows the closing fence in `out_rest`.
function(split_block text out_code out_rest)
  string(FIND "${text}" "\n" _open)
  math(EXPR _open "${_open} + 1")
  string(SUBSTRING "${text}" ${_open} -1 _text)
  string(FIND "${_text}" "\n${_fence}" _length)
  if(_length EQUAL -1)
    message(FATAL_ERROR "${README}: a ${_fence}cpp block is not closed")
  endif()
  math(EXPR _length "${_length} + 1")
  string(SUBSTRING "${_text}" 0 ${_length} _code)
  string(SUBSTRING "${_text}" ${_length} -1 _rest)
  set(${out_code} "${_code}" PARENT_SCOPE)
  set(${out_rest} "${_rest}" PARENT_SCOPE)
endfunction()

string(FIND "${_readme}" "${_fence}cpp\n" _start)
if(_start EQUAL -1)
  message(FATAL_ERROR "${README} has no ${_fence}cpp block")
endif()
string(SUBSTRING "${_readme}" ${_start} -1 _rest)
split_block("${_rest}" _block _rest)
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

get_filename_component(_readme_dir "${README}" DIRECTORY)
set(_marker "<!-- verbatim: ")
set(_text "${_readme}")
set(_listings 0)
while(TRUE)
  string(FIND "${_text}" "${_marker}" _at)
  if(_at EQUAL -1)
    break()
  endif()
  string(LENGTH "${_marker}" _skip)
  math(EXPR _at "${_at} + ${_skip}")
  string(SUBSTRING "${_text}" ${_at} -1 _text)
  string(FIND "${_text}" " -->\n${_fence}cpp\n" _end)
  if(_end EQUAL -1)
    message(FATAL_ERROR "${README}: a `${_marker}PATH -->` line must come right before a ${_fence}cpp block")
  endif()
  string(SUBSTRING "${_text}" 0 ${_end} _path)
  math(EXPR _end "${_end} + 5")
  string(SUBSTRING "${_text}" ${_end} -1 _text)
  split_block("${_text}" _listing _text)
  if(NOT EXISTS "${_readme_dir}/${_path}")
    message(FATAL_ERROR "${README}: `${_marker}${_path} -->` names a file that does not exist")
  endif()
  file(READ "${_readme_dir}/${_path}" _source)
  string(FIND "${_source}" "${_listing}" _found)
  if(_found EQUAL -1)
    message("${_listing}")
    message(FATAL_ERROR "${README}: the listing above is not in ${_path} as it is: copy it again")
  endif()
  math(EXPR _listings "${_listings} + 1")
endwhile()
message(STATUS "${_listings} verbatim listing(s) of ${README} match their files")
