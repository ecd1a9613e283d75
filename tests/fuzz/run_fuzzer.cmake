# fuzz.short_run: fuzzes for SECONDS on a fresh copy of the corpus, so the source tree never
# changes. Run by CTest as: cmake -DFUZZER=... -DCORPUS=... -DWORK_DIR=... -DSECONDS=... [-DSEED=n] -P <this>
foreach(_var IN ITEMS FUZZER CORPUS WORK_DIR SECONDS)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "run_fuzzer.cmake: -D${_var}=... is required")
  endif()
endforeach()

if(NOT DEFINED SEED)
  set(SEED 0)
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}/corpus" "${WORK_DIR}/artifacts")
file(COPY "${CORPUS}/" DESTINATION "${WORK_DIR}/corpus")

# -timeout: one input over 20 s is a hang (the target's own watchdog says the same);
# a crash, a leak or a timeout leaves its input in artifacts/.
execute_process(
  COMMAND "${FUZZER}" -max_total_time=${SECONDS} -seed=${SEED} -timeout=20 -print_final_stats=1
          "-artifact_prefix=${WORK_DIR}/artifacts/" "${WORK_DIR}/corpus"
  RESULT_VARIABLE _rc)

file(GLOB _artifacts "${WORK_DIR}/artifacts/*")
if(NOT _rc EQUAL 0 OR _artifacts)
  message(FATAL_ERROR "fuzzer exited with ${_rc}; artifacts: ${_artifacts}\n"
                      "reproduce: step_closures_fuzz_replay <artifact> (or step_closures_fuzz <artifact>)")
endif()
