#!/usr/bin/env python3
"""Compare one benchmark between two builds, alternating them, on a noisy machine.

A change worth a few percent is invisible between two separate runs here (the same build moves
10-30% from one minute to the next), so each repetition runs build A's binary and then build B's,
and the medians (with min-max) of one counter are printed side by side.

    # build A: a worktree of the commit before, built with the bench preset
    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && cmake --workflow --preset bench)
    scripts/bench_ab.py /tmp/before/build/bench . lockstep_bench 'producers:1/per_step:1/' \\
        --repetitions 5 --counter ns_per_step

Build directories are the bench preset's (they hold bench/<binary>); the counter is any of the
benchmark's user counters (ns_per_closure, ns_per_step, p99_ns, ...) or real_time.
"""

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def run(build_dir: Path, binary: str, filter_: str, min_time: str | None) -> list[dict]:
    exe = build_dir / "bench" / binary
    cmd = [str(exe), f"--benchmark_filter={filter_}", "--benchmark_format=json"]
    if min_time is not None:
        cmd.append(f"--benchmark_min_time={min_time}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["benchmarks"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="build directory A (e.g. the commit before)")
    p.add_argument("b", type=Path, help="build directory B; '.' means ./build/bench")
    p.add_argument("binary", help="benchmark binary, e.g. lockstep_bench")
    p.add_argument("filter", help="--benchmark_filter regular expression")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--counter", default="real_time")
    p.add_argument("--min-time", help="--benchmark_min_time for every run (seconds); shorter runs "
                   "allow more repetitions in the same time")
    args = p.parse_args()
    dirs = [args.a, Path("build/bench") if str(args.b) == "." else args.b]

    values: list[dict[str, list[float]]] = [defaultdict(list), defaultdict(list)]
    names: list[str] = []
    for _ in range(args.repetitions):
        for side, build_dir in enumerate(dirs):
            for bench in run(build_dir, args.binary, args.filter, args.min_time):
                if bench["name"] not in names:
                    names.append(bench["name"])
                values[side][bench["name"]].append(float(bench[args.counter]))

    print(f"{args.counter}: median [min-max] of {args.repetitions} alternating runs")
    print(f"{'benchmark':<84} {'A: ' + str(dirs[0]):>30} {'B: ' + str(dirs[1]):>30}")
    for name in names:
        cells = []
        for side in (0, 1):
            v = values[side].get(name)
            cells.append(f"{statistics.median(v):,.2f} [{min(v):,.2f}-{max(v):,.2f}]" if v else "-")
        print(f"{name:<84} {cells[0]:>30} {cells[1]:>30}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
