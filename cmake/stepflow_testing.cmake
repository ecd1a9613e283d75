# stepflow's test helpers. Included from tests/CMakeLists.txt.
#
#   stepflow_add_test(<name>
#                     [SOURCES <file>...]     # default: ${CMAKE_CURRENT_SOURCE_DIR}/<name>.cpp
#                     [LABELS <label>...]     # default: unit   (kinds: unit, stress, example, consumer)
#                     [TIMEOUT <seconds>]     # default: 120, per discovered test case
#                     [LIBRARIES <target>...] # extra libraries, e.g. GTest::gmock
#                     [NO_TEST_WATCHDOG])     # tests that bound themselves (the stress test's
#                                             # budget); the others each run under a watchdog
#
# Builds the executable <name>, links it to stepflow::stepflow, GoogleTest (with gtest_main) and
# Threads, and registers every TEST/TEST_P in it with CTest through gtest_discover_tests. Discovery
# runs when the tests run (DISCOVERY_MODE PRE_TEST), so a sanitizer build whose executable cannot
# even list its tests fails as a test, not as a build.

include_guard(GLOBAL)

include(GoogleTest)
find_package(GTest REQUIRED)
find_package(Threads REQUIRED)

function(stepflow_add_test name)
  cmake_parse_arguments(PARSE_ARGV 1 arg "NO_TEST_WATCHDOG" "TIMEOUT" "SOURCES;LABELS;LIBRARIES")
  if(arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "stepflow_add_test(${name}): unknown arguments: ${arg_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT arg_SOURCES)
    set(arg_SOURCES "${CMAKE_CURRENT_SOURCE_DIR}/${name}.cpp")
  endif()
  if(NOT arg_LABELS)
    set(arg_LABELS unit)
  endif()
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 120)
  endif()

  if(NOT arg_NO_TEST_WATCHDOG)
    # Every test of the binary runs under a watchdog (tests/support/watchdog_listener.cpp).
    list(APPEND arg_SOURCES "${PROJECT_SOURCE_DIR}/tests/support/watchdog_listener.cpp")
  endif()
  add_executable(${name} ${arg_SOURCES})
  target_link_libraries(${name} PRIVATE
    stepflow::stepflow GTest::gtest GTest::gtest_main Threads::Threads ${arg_LIBRARIES})
  if(TARGET stepflow_warnings)
    target_link_libraries(${name} PRIVATE stepflow_warnings)
  endif()

  gtest_discover_tests(${name}
    TEST_LIST ${name}_TESTS
    PROPERTIES TIMEOUT ${arg_TIMEOUT}
    DISCOVERY_TIMEOUT 60
    DISCOVERY_MODE PRE_TEST)

  # Labels are applied by a script CTest runs right after discovery: CMake 3.25's
  # gtest_discover_tests(PROPERTIES ...) flattens a list value, so `LABELS "unit;stress"` would not
  # survive it. ${name}_TESTS (the TEST_LIST above) holds the discovered test names by then.
  set(labels_script "${CMAKE_CURRENT_BINARY_DIR}/${name}_labels.cmake")
  file(WRITE "${labels_script}"
    "if(${name}_TESTS)\n"
    "  set_tests_properties(\${${name}_TESTS} PROPERTIES LABELS [==[${arg_LABELS}]==])\n"
    "endif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${labels_script}")
endfunction()
