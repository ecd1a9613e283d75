# Builds and runs a consumer project against stepflow, as a CTest test. Run with `cmake -P`.
#
# Modes:
#   MODE=find_package      installs the stepflow build tree STEPFLOW_BINARY_DIR into
#                          WORK_DIR/prefix, then builds CONSUMER_SOURCE_DIR with
#                          CMAKE_PREFIX_PATH pointing there (find_package(stepflow)).
#   MODE=add_subdirectory  builds CONSUMER_SOURCE_DIR with -DSTEPFLOW_ROOT=STEPFLOW_SOURCE_DIR
#                          (the consumer does add_subdirectory(${STEPFLOW_ROOT} stepflow-build)).
# Then runs the consumer executable `consumer`, which must exit 0 and print "consumer OK".
#
# The outer build's toolchain is passed through so the consumer is built consistently with it
# (a sanitized static stepflow only links into an equally sanitized program):
#   GENERATOR MAKE_PROGRAM CXX_COMPILER BUILD_TYPE CXX_FLAGS EXE_LINKER_FLAGS SHARED_LINKER_FLAGS
#   BUILD_SHARED_LIBS TBB_DIR fmt_DIR PREFIX_PATH (a CMAKE_PREFIX_PATH with `|` for `;`).
# WORK_DIR is wiped first: every run configures from scratch.

cmake_minimum_required(VERSION 3.25)

foreach(_required IN ITEMS MODE CONSUMER_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${_required} OR "${${_required}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer_test.cmake: -D${_required}=... is required")
  endif()
endforeach()

set(_build_dir "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

set(_prefix_path "")
if(DEFINED PREFIX_PATH AND NOT PREFIX_PATH STREQUAL "")
  string(REPLACE "|" ";" _prefix_path "${PREFIX_PATH}")
endif()

set(_config_args "")
if(MODE STREQUAL "find_package")
  if(NOT STEPFLOW_BINARY_DIR)
    message(FATAL_ERROR "run_consumer_test.cmake: MODE=find_package needs -DSTEPFLOW_BINARY_DIR=...")
  endif()
  set(_install_prefix "${WORK_DIR}/prefix")
  set(_install_cmd "${CMAKE_COMMAND}" --install "${STEPFLOW_BINARY_DIR}" --prefix "${_install_prefix}")
  if(BUILD_TYPE)
    list(APPEND _install_cmd --config "${BUILD_TYPE}")
  endif()
  message(STATUS "consumer(find_package): installing stepflow into ${_install_prefix}")
  execute_process(COMMAND ${_install_cmd} OUTPUT_QUIET COMMAND_ERROR_IS_FATAL ANY)
  list(PREPEND _prefix_path "${_install_prefix}")
elseif(MODE STREQUAL "add_subdirectory")
  if(NOT STEPFLOW_SOURCE_DIR)
    message(FATAL_ERROR "run_consumer_test.cmake: MODE=add_subdirectory needs -DSTEPFLOW_SOURCE_DIR=...")
  endif()
  list(APPEND _config_args "-DSTEPFLOW_ROOT=${STEPFLOW_SOURCE_DIR}")
else()
  message(FATAL_ERROR "run_consumer_test.cmake: unknown MODE '${MODE}'")
endif()

# Pass a list through execute_process as one argument: `;` must stay inside it.
string(REPLACE ";" "\\;" _prefix_path_arg "${_prefix_path}")
list(APPEND _config_args
  -G "${GENERATOR}"
  "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
  "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
  "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}"
  "-DCMAKE_EXE_LINKER_FLAGS=${EXE_LINKER_FLAGS}"
  "-DCMAKE_SHARED_LINKER_FLAGS=${SHARED_LINKER_FLAGS}"
  "-DCMAKE_PREFIX_PATH=${_prefix_path_arg}")
if(MAKE_PROGRAM)
  list(APPEND _config_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(DEFINED BUILD_SHARED_LIBS AND NOT BUILD_SHARED_LIBS STREQUAL "")
  list(APPEND _config_args "-DBUILD_SHARED_LIBS=${BUILD_SHARED_LIBS}")
endif()
# Use the very packages the outer build found, not whatever else is on the system.
foreach(_pkg IN ITEMS TBB fmt)
  if(${_pkg}_DIR)
    list(APPEND _config_args "-D${_pkg}_DIR=${${_pkg}_DIR}")
  endif()
endforeach()

message(STATUS "consumer(${MODE}): configuring ${CONSUMER_SOURCE_DIR}")
execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE_DIR}" -B "${_build_dir}" ${_config_args}
  COMMAND_ERROR_IS_FATAL ANY)

message(STATUS "consumer(${MODE}): building")
set(_build_cmd "${CMAKE_COMMAND}" --build "${_build_dir}")
if(BUILD_TYPE)
  list(APPEND _build_cmd --config "${BUILD_TYPE}")
endif()
execute_process(COMMAND ${_build_cmd} COMMAND_ERROR_IS_FATAL ANY)

# Single-config generators put the program in the build dir, multi-config ones in <config>/.
set(_exe "")
foreach(_candidate IN ITEMS
    "${_build_dir}/consumer" "${_build_dir}/consumer.exe"
    "${_build_dir}/${BUILD_TYPE}/consumer" "${_build_dir}/${BUILD_TYPE}/consumer.exe")
  if(EXISTS "${_candidate}" AND NOT IS_DIRECTORY "${_candidate}")
    set(_exe "${_candidate}")
    break()
  endif()
endforeach()
if(NOT _exe)
  message(FATAL_ERROR "consumer(${MODE}): built, but no `consumer` executable in ${_build_dir}")
endif()

message(STATUS "consumer(${MODE}): running ${_exe}")
execute_process(
  COMMAND "${_exe}"
  OUTPUT_VARIABLE _out
  ERROR_VARIABLE _out
  RESULT_VARIABLE _rc)
message("${_out}")
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "consumer(${MODE}): `consumer` exited with ${_rc}")
endif()
if(NOT _out MATCHES "consumer OK")
  message(FATAL_ERROR "consumer(${MODE}): `consumer` did not print \"consumer OK\"")
endif()
message(STATUS "consumer(${MODE}): passed")
