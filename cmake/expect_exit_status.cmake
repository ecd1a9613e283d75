# Runs a program and passes only if it exits with the expected status and prints the expected
# text (CTest alone can check one or the other, not both).
#   cmake -DPROGRAM=<path> -DARGS=<;-list> -DSTATUS=<n> -DOUTPUT=<regex> -P expect_exit_status.cmake
execute_process(COMMAND "${PROGRAM}" ${ARGS}
                RESULT_VARIABLE status
                OUTPUT_VARIABLE out
                ERROR_VARIABLE err)
message("${out}${err}")
if(NOT status STREQUAL "${STATUS}")
  message(FATAL_ERROR "${PROGRAM} exited with '${status}', expected ${STATUS}")
endif()
if(NOT "${out}${err}" MATCHES "${OUTPUT}")
  message(FATAL_ERROR "${PROGRAM}'s output does not match '${OUTPUT}'")
endif()
