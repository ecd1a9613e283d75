#!/usr/bin/env python3
"""Slow steps in a B5 latency dump, and whether they come alone or in runs.

    STEPFLOW_BENCH_LATENCY_DUMP=/tmp/b5.txt build/bench/bench/latency_bench \\
        --benchmark_filter='B5_latency/stepflow/period_us:50/'
    scripts/latency_runs.py /tmp/b5.txt --slow-us 5

A slow step alone is one unlucky wake-up; hundreds in a row are a state that lasted (on the
machines this project measures on: stretches where the virtual CPUs run several times slower).
"""

import argparse
import signal
import sys


def main() -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quietly, when piped into head
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump", help="file written through STEPFLOW_BENCH_LATENCY_DUMP")
    p.add_argument("--slow-us", type=float, default=5.0, help="a step slower than this is slow")
    p.add_argument("--gap", type=int, default=3,
                   help="fast steps allowed inside one run of slow steps")
    args = p.parse_args()

    steps = [tuple(map(int, line.split())) for line in open(args.dump) if line.strip()]
    if not steps:
        print("no steps in the dump")
        return 1
    latencies = sorted(lat for _, lat in steps)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] / 1e3

    print(f"{len(steps)} steps: p50 {pct(50):.1f} us, p90 {pct(90):.1f} us, p99 {pct(99):.1f} us")
    slow = [i for i, (_, lat) in enumerate(steps) if lat > args.slow_us * 1e3]
    runs: list[tuple[int, int]] = []
    for i in slow:
        if runs and i - runs[-1][1] <= args.gap + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    print(f"{len(slow)} steps over {args.slow_us} us, in {len(runs)} runs")
    for first, last in sorted(runs, key=lambda r: r[0] - r[1])[:10]:
        span_ms = (steps[last][0] - steps[first][0]) / 1e6
        inside = sorted(lat for _, lat in steps[first:last + 1])
        print(f"  steps {first}-{last} ({last - first + 1} steps, {span_ms:.1f} ms): "
              f"median {inside[len(inside) // 2] / 1e3:.1f} us, max {inside[-1] / 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
