#!/usr/bin/env bash
# Runs a GoogleTest binary over and over, two copies at a time, until one hangs or fails; on a
# hang it saves every thread's stack (gdb) before killing the process.
#
# Why: the suite's watchdogs turn a hang into a failure, but a race that hangs one run in a few
# hundred shows up in CI only now and then, and the watchdog's abort loses the stacks. Running
# two copies keeps both CPUs busy, which is how CI runs the tests (ctest -j2).
#
# Usage: scripts/hunt_hang.sh <test binary> [gtest filter] [runs per copy] [seconds before a
#        run counts as hung]
#   scripts/hunt_hang.sh build/dev/tests/step_graph_test '*' 600 8
# Stacks of a hung run go to hang-<copy>.txt in the current directory. Exit status 1 if any copy
# hung or failed.
set -uo pipefail

binary=${1:?usage: scripts/hunt_hang.sh <test binary> [filter] [runs] [seconds]}
filter=${2:-*}
runs=${3:-300}
limit=${4:-8}

hunt() {
  local copy=$1
  for ((i = 1; i <= runs; i++)); do
    "$binary" --gtest_filter="$filter" >"hunt-$copy.log" 2>&1 &
    local pid=$!
    local waited=0
    while kill -0 "$pid" 2>/dev/null && ((waited < limit * 10)); do
      sleep 0.1
      ((waited++))
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "copy $copy: run $i hung; stacks in hang-$copy.txt"
      gdb -p "$pid" -batch -ex "thread apply all bt" >"hang-$copy.txt" 2>&1
      kill -9 "$pid"
      return 1
    fi
    if ! wait "$pid"; then
      echo "copy $copy: run $i failed; output in hunt-$copy.log"
      return 1
    fi
  done
  echo "copy $copy: $runs runs passed"
  rm -f "hunt-$copy.log"
}

hunt 1 &
first=$!
hunt 2
second=$?
wait "$first"
first=$?
((first == 0 && second == 0))
