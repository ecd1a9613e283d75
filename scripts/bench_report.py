#!/usr/bin/env python3
"""Runs stepflow's benchmarks (issue 5) and turns their Google Benchmark JSON into the tables of
docs/benchmarks.md and the B4 scaling plot (docs/benchmarks-b4.png, drawn by gnuplot).

Usage (from the repository root):
  cmake --workflow --preset bench               # Release build in build/bench
  python3 scripts/bench_report.py --run         # run all, then update docs + plot
  python3 scripts/bench_report.py               # only regenerate docs + plot from bench-results/

The benchmark binaries are build/bench/bench/<name>; each writes bench-results/<name>.json
(--benchmark_out, JSON, 3 repetitions, aggregates only: the report uses the median). The tables
are written between `<!-- report:<id> -->` and `<!-- /report:<id> -->` markers in the document,
so the prose around them survives regeneration; a missing document gets a skeleton.

Python 3 standard library only. The plot needs gnuplot (Debian: gnuplot-nox); without it the
plot is skipped with a warning.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Binary name -> what it holds. Order = run order.
BINARIES = [
    ("machine_probe_bench", "machine"),
    ("sync_step_bench", "B1"),
    ("async_bench", "B2"),
    ("handoff_floor_bench", "B2"),
    ("producer_bench", "B3"),
    ("scaling_bench", "B4"),
    ("latency_bench", "B5"),
    ("lockstep_bench", "B6"),
    ("alloc_bench", "B7"),
]

SECTIONS = ["machine", "commands", "targets", "B1", "B2", "B3", "B4", "B5", "B6", "B7",
            "metrics"]


# --- running ---------------------------------------------------------------------------------

def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # without guest time, already counted in user
    return total - idle, total


def busy_fraction(seconds: float) -> float:
    b0, t0 = cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


def wait_until_quiet(limit: float, max_wait: float) -> None:
    """Waits (up to max_wait s) until other processes use at most `limit` of all CPUs."""
    start = time.monotonic()
    while True:
        busy = busy_fraction(1.0)
        if busy <= limit:
            return
        if time.monotonic() - start > max_wait:
            print(f"== machine still {busy:.0%} busy after {max_wait:.0f} s; running anyway",
                  flush=True)
            return
        print(f"== machine {busy:.0%} busy, waiting for it to calm down", flush=True)
        time.sleep(4)


def run_benchmarks(build_dir: Path, results: Path, repetitions: int, min_time: float | None,
                   only: list[str] | None, extra: list[str], quiet_limit: float,
                   retries: int) -> None:
    """Runs each binary; one that ran while other processes used more than `quiet_limit` of the
    CPUs is run again (up to `retries` times) and the quietest attempt is kept."""
    results.mkdir(parents=True, exist_ok=True)
    bench_dir = build_dir / "bench"
    total_start = time.monotonic()
    interference = {"_run": {"library": git_revision()}}
    # A build older than the sources measures some other library: say so rather than guess.
    newest_source = max(p.stat().st_mtime for d in ("src", "include")
                        for p in (ROOT / d).rglob("*") if p.is_file())
    binaries = [bench_dir / n for n, _ in BINARIES if (bench_dir / n).exists()]
    if binaries and min(b.stat().st_mtime for b in binaries) < newest_source:
        print("bench_report: WARNING: src/ or include/ changed after the benchmarks were built; "
              "rebuild (cmake --build build/bench) to measure the current library",
              file=sys.stderr)
        interference["_run"]["library"] += " (STALE BUILD: sources newer than the binaries)"
    ticks = os.sysconf("SC_CLK_TCK")
    for name, bid in BINARIES:
        if only and name not in only and bid not in only:
            continue
        exe = bench_dir / name
        if not exe.exists():
            sys.exit(f"bench_report: {exe} not found; build first: cmake --workflow --preset bench")
        out = results / f"{name}.json"
        # Random interleaving: the repetitions of all benchmarks of a binary run in random order,
        # so a slow phase of the machine hits stepflow and its baselines alike.
        cmd = [str(exe), f"--benchmark_repetitions={repetitions}",
               "--benchmark_report_aggregates_only=true",
               f"--benchmark_out={out}", "--benchmark_out_format=json",
               "--benchmark_enable_random_interleaving=true"]
        if min_time is not None:
            cmd.append(f"--benchmark_min_time={min_time}")
        cmd += extra
        best = None
        for attempt in range(1, retries + 2):
            if quiet_limit < 1.0:
                wait_until_quiet(quiet_limit, 600)
            attempt_out = results / f"{name}.attempt{attempt}.json"
            cmd[3] = f"--benchmark_out={attempt_out}"
            print(f"== {bid}: {' '.join(cmd)}", flush=True)
            start = time.monotonic()
            busy0, total0 = cpu_jiffies()
            proc = subprocess.Popen(cmd)
            _, status, usage = os.wait4(proc.pid, 0)
            busy1, total1 = cpu_jiffies()
            elapsed = time.monotonic() - start
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"bench_report: {name} failed")
            # CPU time the rest of the machine used while this binary ran, as a share of all
            # CPUs: the noise indicator recorded next to the results.
            own = (usage.ru_utime + usage.ru_stime) * ticks
            other = max(0.0, (busy1 - busy0) - own) / max(1, total1 - total0)
            print(f"== {bid}: {elapsed:.0f} s, other processes used {other:.0%} of the CPUs",
                  flush=True)
            if best is None or other < best[0]:
                if best is not None:
                    best[1].unlink()
                best = (other, attempt_out, elapsed, attempt)
            else:
                attempt_out.unlink()
            if other <= quiet_limit:
                break
            if attempt <= retries:
                print(f"== {bid}: too noisy (limit {quiet_limit:.0%}), running again", flush=True)
        best[1].replace(out)
        interference[name] = {"seconds": round(best[2], 1), "other_cpu_share": round(best[0], 3),
                              "attempts": attempt}
    print(f"== all: {time.monotonic() - total_start:.0f} s", flush=True)
    meta = results / "run_meta.json"
    old = json.loads(meta.read_text()) if meta.exists() else {}
    old.update(interference)
    meta.write_text(json.dumps(old, indent=1))


# --- reading ---------------------------------------------------------------------------------

class Result:
    """One benchmark's median aggregate: family (B2_async), impl (stepflow), args {k: int}."""

    def __init__(self, entry: dict):
        self.entry = entry
        parts = entry["run_name"].split("/")
        self.family = parts[0]
        self.impl = parts[1]
        self.args: dict[str, int] = {}
        for p in parts[2:]:
            if ":" in p:
                k, v = p.split(":", 1)
                if k != "iterations":
                    self.args[k] = int(v)

    def __getitem__(self, counter: str) -> float:
        return float(self.entry[counter])

    def get(self, counter: str, default=None):
        v = self.entry.get(counter)
        return default if v is None else float(v)


class Results:
    def __init__(self, results_dir: Path):
        self.contexts: dict[str, dict] = {}
        self.items: list[Result] = []
        self.files: list[Path] = []
        meta = results_dir / "run_meta.json"
        self.meta: dict = json.loads(meta.read_text()) if meta.exists() else {}
        for name, _ in BINARIES:
            path = results_dir / f"{name}.json"
            if not path.exists():
                continue
            data = json.loads(path.read_text())
            self.files.append(path)
            self.contexts[name] = data.get("context", {})
            for e in data.get("benchmarks", []):
                # Median aggregates; a run without repetitions has only iteration entries.
                if e.get("run_type") == "aggregate" and e.get("aggregate_name") != "median":
                    continue
                if e.get("error_occurred"):
                    print(f"bench_report: {e['name']} failed: {e.get('error_message')}",
                          file=sys.stderr)
                    continue
                self.items.append(Result(e))

    def find(self, family: str, impl: str, **args) -> Result | None:
        for r in self.items:
            if r.family == family and r.impl == impl and all(
                    r.args.get(k) == v for k, v in args.items()):
                return r
        return None

    def all(self, family: str, impl: str) -> list[Result]:
        return [r for r in self.items if r.family == family and r.impl == impl]

    def context(self) -> dict:
        for c in self.contexts.values():
            return c
        return {}


# --- formatting helpers ------------------------------------------------------------------------

def ns(r: Result | None, counter: str = "ns_per_closure") -> float | None:
    return None if r is None else r.get(counter)


def fmt_num(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def fmt_ratio(baseline: float | None, ours: float | None) -> str:
    if baseline is None or ours is None or ours == 0:
        return "n/a"
    return f"{baseline / ours:.2f}×"


def us(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1000:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**PASS**" if ok else "**MISS**")


# --- sections ----------------------------------------------------------------------------------

def section_machine(res: Results) -> str:
    ctx = res.context()
    model = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(
            (k.strip(), v.strip()) for k, v in
            (line.split(":", 1) for line in lscpu.splitlines() if ":" in line))
        model = fields.get("Model name", model)
        cpus = fields.get("CPU(s)", "?")
        threads = fields.get("Thread(s) per core", "?")
        hyper = fields.get("Hypervisor vendor")
    except OSError:
        cpus = threads = "?"
        hyper = None
    mhz = ctx.get("mhz_per_cpu")
    bench_version = "unknown"
    if shutil.which("dpkg-query"):
        q = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libbenchmark-dev"],
                           capture_output=True, text=True)
        if q.returncode == 0:
            bench_version = q.stdout.strip()
    rows = [
        ["CPU", f"{model}" + (f" ({mhz} MHz reported)" if mhz else "")],
        ["cores", f"{cpus} CPUs, {threads} thread(s) per core"
                  + (f", virtual machine ({hyper})" if hyper else "")],
        ["kernel", platform.release()],
        ["compiler", ctx.get("compiler", "unknown")],
        ["build", f"CMAKE_BUILD_TYPE=Release (-O3 -DNDEBUG), assertions "
                  f"{ctx.get('assertions', '?')}"],
        ["oneTBB", f"{ctx.get('tbb_version', '?')} (runtime {ctx.get('tbb_runtime_version', '?')}, "
                   f"default concurrency {ctx.get('tbb_default_concurrency', '?')})"],
        ["fmt", ctx.get("fmt_version", "?")],
        ["Google Benchmark", bench_version],
        ["stepflow", f"{ctx.get('stepflow_version', '?')}, "
                     f"{res.meta.get('_run', {}).get('library') or git_revision()}"],
        ["run", f"{ctx.get('date', '?')}; load average at start "
                f"{', '.join(f'{x:.2f}' for x in ctx.get('load_avg', [])) or '?'}"],
    ]
    probe = res.find("machine", "probe")
    if probe is not None:
        rows.append(["CPU steadiness (`machine_probe_bench`: a fixed loop on every CPU for 1 s; "
                     "1 ms windows whose median pass took over 1.8x the run's median)",
                     f"{probe.get('slow_window_pct', 0):.1f}% of windows slow, longest slow "
                     f"stretch {probe.get('longest_slow_ms', 0):.0f} ms (median of the runs)"])
    locked = res.find("machine", "locked_add")
    if locked is not None:
        rows.append(["one locked read-modify-write (`machine/locked_add`: `lock xadd`, one "
                     "thread, back to back)", f"{fmt_num(locked.get('real_time'))} ns"])
    if res.meta:
        noise = ", ".join(
            f"{name} {m['other_cpu_share']:.0%} ({m['seconds']:.0f} s)"
            for name, m in res.meta.items() if isinstance(m, dict) and "other_cpu_share" in m)
        rows.append(["other processes' share of the CPUs while each binary ran", noise])
    return table(["", ""], rows)


def git_revision() -> str:
    """The library's commit, with `+ local changes` when src/ or include/ differ from it."""
    if shutil.which("git") is None:
        return "commit unknown"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode != 0:
        return "commit unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src",
                            "include"], capture_output=True, text=True).stdout.strip()
    return f"commit {head.stdout.strip()}" + (" + local changes in src/ or include/" if dirty else "")


def section_commands(args) -> str:
    rel_results = os.path.relpath(args.results, ROOT)
    lines = [
        "```sh",
        "scripts/install-deps.sh --with-plots        # once: compilers, TBB, fmt, benchmark, gnuplot",
        "cmake --workflow --preset bench             # Release build of the benchmarks in build/bench",
        "python3 scripts/bench_report.py --run       # run all (3 repetitions, medians), write",
        f"                                            # {rel_results}/*.json, these tables and the plot",
        "python3 scripts/bench_report.py             # only regenerate tables and plot from the JSON",
        "```",
        "",
        "One benchmark by hand, e.g. B2 (every binary takes the usual Google Benchmark flags):",
        "",
        "```sh",
        "build/bench/bench/async_bench --benchmark_repetitions=3 \\",
        "    --benchmark_report_aggregates_only=true --benchmark_enable_random_interleaving=true \\",
        f"    --benchmark_out={rel_results}/async_bench.json --benchmark_out_format=json",
        "```",
    ]
    return "\n".join(lines)


def b1_rows(res: Results):
    rows = []
    for capture in (16, 48):
        for n in (1, 10, 100, 1000):
            ours = ns(res.find("B1_sync", "stepflow", capture=capture, n=n))
            base = ns(res.find("B1_sync", "vector_function", capture=capture, n=n))
            rows.append([f"{capture} B", str(n), fmt_num(ours), fmt_num(base),
                         fmt_ratio(base, ours)])
    return rows


def section_b1(res: Results) -> str:
    return table(["capture", "N per step", "stepflow ns/closure",
                  "vector<std::function> ns/closure", "speed-up"], b1_rows(res))


def b2_step_size_sweep(res: Results) -> str:
    """The diagnosis rows with other step sizes: B2's cost split into per step and per closure."""
    sizes = (10, 100, 1000, 10000)
    rows = []
    for capture in (16, 48):
        cost = {}
        for per_step in sizes:
            bound = max(per_step, 100)
            cost[per_step] = ns(res.find("B2_async", "stepflow", capture=capture,
                                         per_step=per_step, bound=bound))
        if all(cost[k] is None for k in (10, 1000, 10000)):
            continue
        # cost(k) = per_closure + per_step / k, fitted through the 10 and 100 rows.
        split = ["n/a", "n/a"]
        if cost[10] is not None and cost[100] is not None:
            step_ns = (cost[10] - cost[100]) / (1 / 10 - 1 / 100)
            split = [fmt_num(step_ns, 0), fmt_num(cost[100] - step_ns / 100)]
        rows.append([f"{capture} B"] + [fmt_num(cost[k]) for k in sizes] + split)
    if not rows:
        return ""
    transfer = ns(res.find("B2_floor", "line_transfer"), "ns_per_transfer")
    text = ("\n\nDiagnosis (not a target): the same 1e6 closures in steps of other sizes (bound: "
            "one step, at least 100), stepflow ns/closure. The last two columns fit cost = "
            "per closure + per step / step size through the 10 and 100 rows")
    if transfer is not None:
        text += (f"; for scale, handing one cache line from one core to the other took "
                 f"{fmt_num(transfer)} ns in this run (`B2_floor/line_transfer`)")
    return text + ":\n\n" + table(
        ["capture", "10 per step", "100", "1,000", "10,000", "fit: ns per step",
         "fit: ns per closure"], rows)


def section_b2(res: Results) -> str:
    rows = []
    for capture in (16, 48):
        ours = ns(res.find("B2_async", "stepflow", capture=capture, per_step=100, bound=100))
        a = ns(res.find("B2_async", "tbb_task_per_closure", capture=capture))
        b = ns(res.find("B2_async", "torch_port", capture=capture))
        rate = None if ours in (None, 0) else 1e9 / ours / 1e6
        rows.append([f"{capture} B", fmt_num(ours), fmt_num(rate), fmt_num(a), fmt_num(b),
                     fmt_ratio(a, ours), fmt_ratio(b, ours)])
    out = table(["capture", "stepflow ns/closure", "stepflow M closures/s",
                 "(a) task per closure ns", "(b) torch port ns", "vs (a)", "vs (b)"], rows)
    wide = res.find("B2_async", "stepflow", capture=48, per_step=100, bound=1000)
    if wide is not None:
        out += ("\n\nDiagnosis (not a target): stepflow, 48 B, with a queue bound of 1000 instead "
                f"of 100: {fmt_num(ns(wide))} ns/closure.")
    out += b2_step_size_sweep(res)
    loaded = [res.find("B2_loaded", impl, capture=48)
              for impl in ("stepflow", "tbb_task_per_closure", "torch_port")]
    if any(r is not None for r in loaded):
        ours, a, b = (ns(r) for r in loaded)
        out += ("\n\nUnder load (not a target): the 48 B row while one busy thread per CPU "
                "competes for the CPUs (`B2_loaded`):\n\n"
                + table(["stepflow ns/closure", "(a) task per closure ns", "(b) torch port ns",
                         "vs (a)", "vs (b)"],
                        [[fmt_num(ours), fmt_num(a), fmt_num(b), fmt_ratio(a, ours),
                          fmt_ratio(b, ours)]]))
    floor_rows = []
    for size in (24, 56, 64):
        for r in sorted(res.all("B2_floor", f"spsc_{size}B_records"),
                        key=lambda r: (r.args.get("in_flight", 0), r.args.get("ring", 0))):
            floor_rows.append([f"{size} B", f"{r.args['ring']:,}", f"{r.args['in_flight']:,}",
                               str(r.args["per_step"]), fmt_num(ns(r))])
        for r in res.all("B2_floor", f"spsc_{size}B_records_locked_yield"):
            floor_rows.append([f"{size} B, with a locked instruction per step and yielding polls",
                               f"{r.args['ring']:,}", f"{r.args['in_flight']:,}",
                               str(r.args["per_step"]), fmt_num(ns(r))])
    if floor_rows:
        out += ("\n\nThe machine's floor (`handoff_floor_bench`, not stepflow): handing records "
                "(one closure each: 24 B is a closure with 16-byte captures, 56 B one with "
                "48-byte captures) from one thread to another through a bare single-producer "
                "ring, a step at a time, nothing else shared:\n\n"
                + table(["record", "ring slots", "records in flight at most", "per step",
                         "ns per record"], floor_rows))
    return out


def section_b3(res: Results) -> str:
    rows = []
    for capture in (16, 48):
        for per_step in (100, 1000):
            ours = ns(res.find("B3_producer", "stepflow", capture=capture, per_step=per_step))
            b = ns(res.find("B3_producer", "torch_port", capture=capture, per_step=per_step))
            rows.append([f"{capture} B", str(per_step), fmt_num(ours), fmt_num(b),
                         fmt_ratio(b, ours)])
    return table(["capture", "closures per step", "stepflow ns/closure",
                  "(b) torch port ns/closure", "speed-up"], rows)


def b4_data(res: Results):
    devices = sorted(res.all("B4_scaling", "stepflow_devices"), key=lambda r: r.args["devices"])
    steps = sorted((r for r in res.all("B4_scaling", "stepflow_steps") if r.args.get("bound")),
                   key=lambda r: r.args["steps"])
    unbounded = [r for r in res.all("B4_scaling", "stepflow_steps") if r.args.get("bound") == 0]
    return devices, steps, unbounded


def section_b4(res: Results) -> str:
    devices, steps, unbounded = b4_data(res)
    out = []
    if devices:
        base = devices[0]["ns_per_closure"]
        rows = [[str(r.args["devices"]), fmt_num(r["ns_per_closure"]),
                 f"{(r['ns_per_closure'] / base - 1) * 100:+.0f}%",
                 fmt_num(r.get("peak_growth_kib"), 0)] for r in devices]
        out.append("Devices sweep (1e6 closures in total per iteration, 100 per device step):\n")
        out.append(table(["devices", "ns/closure", "vs 1 device", "peak RSS growth KiB"], rows))
    if steps:
        base = steps[0]["ns_per_closure"]
        rows = [[f"{r.args['steps']:,}", f"{r.args['steps'] * 100:,}",
                 fmt_num(r["ns_per_closure"]), f"{(r['ns_per_closure'] / base - 1) * 100:+.0f}%",
                 fmt_num(r.get("peak_rss_kib"), 0), fmt_num(r.get("peak_growth_kib"), 0)]
                for r in steps]
        for r in unbounded:
            rows.append([f"{r.args['steps']:,} (unbounded queue, for contrast)",
                         f"{r.args['steps'] * 100:,}", fmt_num(r["ns_per_closure"]), "",
                         fmt_num(r.get("peak_rss_kib"), 0), fmt_num(r.get("peak_growth_kib"), 0)])
        out.append("\nSteps sweep (1 device, 100 closures per step, queue bound 100):\n")
        out.append(table(["steps", "closures", "ns/closure", "vs 1e3 steps", "peak RSS KiB",
                          "peak RSS growth KiB"], rows))
    out.append("\n![B4 scaling](benchmarks-b4.png)")
    return "\n".join(out)


B5_REGIMES = [
    ((50, 0), "step every 50 µs, training thread busy (worker awake)", 5000),
    ((2000, 0), "step every 2 ms, training thread busy (worker asleep)", 60000),
    ((2000, 1), "step every 2 ms, training thread asleep (worker asleep)", 60000),
]
B5_IMPLS = [("stepflow", "stepflow"),
            ("stepflow_linger_5ms", "stepflow, worker_linger 5 ms (a CPU polls between steps)"),
            ("tbb_task_per_closure", "(a) task per closure"),
            ("torch_port", "(b) torch port"),
            ("wake_floor", "floor: a thread woken from a futex (no scheduler)"),
            ("spin_floor", "floor: a thread spinning, never asleep (no scheduler)")]


def section_b5(res: Results) -> str:
    rows = []
    for (period, gap), label, _ in B5_REGIMES:
        for impl, impl_label in B5_IMPLS:
            r = res.find("B5_latency", impl, period_us=period, gap=gap)
            if r is None:
                continue
            rows.append([label, impl_label, us(r.get("p50_ns")), us(r.get("p90_ns")),
                         us(r.get("p99_ns")), us(r.get("max_ns")), fmt_num(r.get("samples"), 0)])
    return table(["regime", "implementation", "p50 µs", "p90 µs", "p99 µs", "max µs",
                  "samples"], rows)


# B6: (producer threads, table label, target label) and closures per device step; 8 devices.
B6_PRODUCERS = [(1, "1 (devices in turn)", "one thread ends every device's step in turn"),
                (8, "8 (one per device)", "one thread per device")]
B6_PER_STEP = (1, 10, 100)


def b6_pairs(res: Results, producers: int) -> list[tuple[int, Result | None, Result | None]]:
    """(closures per device step, per_device result, lockstep result), for each measured size."""
    out = []
    for per_step in B6_PER_STEP:
        pd = res.find("B6_lockstep", "stepflow_per_device", producers=producers, per_step=per_step)
        ls = res.find("B6_lockstep", "stepflow_lockstep", producers=producers, per_step=per_step)
        if pd is not None or ls is not None:
            out.append((per_step, pd, ls))
    return out


def section_b6(res: Results) -> str:
    rows = []
    for producers, label, _ in B6_PRODUCERS:
        for per_step, pd, ls in b6_pairs(res, producers):
            rows.append([
                label, str(per_step), str(8 * per_step),
                fmt_num(ns(pd, "ns_per_step")), fmt_num(ns(ls, "ns_per_step")),
                fmt_ratio(ns(ls, "ns_per_step"), ns(pd, "ns_per_step")),
                f"{us(ns(pd, 'blocked_ns_per_step'))} / {us(ns(ls, 'blocked_ns_per_step'))}",
            ])
    return table(["producer threads", "closures per device step", "closures per global step",
                  "per_device ns/step", "lockstep ns/step", "lockstep / per_device",
                  "step ends blocked per global step (sum of 8 devices), per_device / lockstep µs"],
                 rows)


# B7's step sizes: the issue's 100; 1,000, where a step spans several lane chunks; 10,000, more
# chunks than a fixed pool of spares kept before the eighth session.
B7_PER_STEP = (100, 1000, 10000)


def section_b7(res: Results) -> str:
    rows = []
    for mode, ours_impl, base_impl, base_label in (
            ("sync", "stepflow_sync", "vector_function", "vector<std::function>"),
            ("async", "stepflow_async", "torch_port", "(b) torch port")):
        for per_step in B7_PER_STEP:
            for capture in (16, 48):
                ours = res.find("B7_alloc", ours_impl, capture=capture, per_step=per_step)
                base = res.find("B7_alloc", base_impl, capture=capture, per_step=per_step)
                if ours is None and base is None:
                    continue
                rows.append([
                    mode, f"{capture} B", str(per_step),
                    fmt_num(ours.get("closures"), 0) if ours else "n/a",
                    fmt_num(ours.get("news"), 0) if ours else "n/a",
                    fmt_num(ours.get("new_per_closure"), 7) if ours else "n/a",
                    fmt_num(ours.get("malloc_per_closure"), 7) if ours else "n/a",
                    f"{base_label}: {fmt_num(base.get('new_per_closure'), 4)}" if base else "",
                ])
    return table(["mode", "capture", "closures per step", "closures measured",
                  "stepflow operator new calls", "stepflow new / closure",
                  "stepflow malloc / closure", "baseline new / closure"], rows)


def overhead(off: float | None, on: float | None) -> str:
    """What measuring run time adds to the default's time, in percent."""
    return "n/a" if off in (None, 0) or on is None else f"{(on / off - 1) * 100:+.0f}%"


def section_metrics(res: Results) -> str:
    """stepflow's defaults (run time not measured) beside `options::measure_run_time` on, from
    the `*_run_time` rows that B1, B2 and B6 run in the same binary run."""
    rows = []
    for capture in (16, 48):
        for n in (1, 10, 100, 1000):
            off = ns(res.find("B1_sync", "stepflow", capture=capture, n=n))
            on = ns(res.find("B1_sync", "stepflow_run_time", capture=capture, n=n))
            rows.append([f"B1 sync, {capture} B, {n} per step", "ns/closure", fmt_num(off),
                         fmt_num(on), overhead(off, on)])
    for capture in (16, 48):
        off = ns(res.find("B2_async", "stepflow", capture=capture, per_step=100, bound=100))
        on = ns(res.find("B2_async", "stepflow_run_time", capture=capture, per_step=100,
                         bound=100))
        rows.append([f"B2 async, {capture} B, 100 per step", "ns/closure", fmt_num(off),
                     fmt_num(on), overhead(off, on)])
    for impl, label in (("stepflow_lockstep", "lockstep"), ("stepflow_per_device", "per_device")):
        for per_step in B6_PER_STEP:
            off = ns(res.find("B6_lockstep", impl, producers=1, per_step=per_step), "ns_per_step")
            on = ns(res.find("B6_lockstep", f"{impl}_run_time", producers=1, per_step=per_step),
                    "ns_per_step")
            rows.append([f"B6 {label}, one driver, {per_step} per device step", "ns/global step",
                         fmt_num(off, 0), fmt_num(on, 0), overhead(off, on)])
    return table(["benchmark row", "unit", "defaults (run time not measured)",
                  "options::measure_run_time = true", "cost of measuring"], rows)


def run_time_note(baseline: float | None, on: float | None, text: str) -> str:
    """`text`, then the same row with run time measured against `baseline`, when it ran."""
    return text if on is None else f"{text}; with run time measured: {fmt_num(on)} ns, " \
                                   f"{fmt_ratio(baseline, on)}"


# --- targets -----------------------------------------------------------------------------------

def targets(res: Results) -> list[list[str]]:
    rows = []

    def add(target: str, measured: str, ok: bool | None):
        rows.append([target, measured, verdict(ok)])

    # B1
    for capture, need, text in ((48, 1.5, "≥ 1.5× faster than vector<std::function>"),
                                (16, 1.0, "no slower than vector<std::function>")):
        ours = ns(res.find("B1_sync", "stepflow", capture=capture, n=100))
        base = ns(res.find("B1_sync", "vector_function", capture=capture, n=100))
        timed = ns(res.find("B1_sync", "stepflow_run_time", capture=capture, n=100))
        ok = None if ours is None or base is None else base / ours >= need
        add(f"B1 sync, N = 100, {capture}-byte captures: {text}",
            run_time_note(base, timed, f"{fmt_num(ours)} vs {fmt_num(base)} ns/closure = "
                                       f"{fmt_ratio(base, ours)}"), ok)
    # B2
    for capture in (48, 16):
        ours = ns(res.find("B2_async", "stepflow", capture=capture, per_step=100, bound=100))
        a = ns(res.find("B2_async", "tbb_task_per_closure", capture=capture))
        b = ns(res.find("B2_async", "torch_port", capture=capture))
        add(f"B2 async end to end, {capture} B: ≥ 30× faster than (a) task per closure",
            f"{fmt_ratio(a, ours)} ({fmt_num(a)} vs {fmt_num(ours)} ns)",
            None if None in (a, ours) else a / ours >= 30)
        add(f"B2 async end to end, {capture} B: ≥ 30× faster than (b) torch port",
            f"{fmt_ratio(b, ours)} ({fmt_num(b)} vs {fmt_num(ours)} ns)",
            None if None in (b, ours) else b / ours >= 30)
        # The bare ring's floor for records of this size with B2's bound (200 in flight).
        floor = ns(res.find("B2_floor", f"spsc_{capture + 8}B_records", ring=200,
                            in_flight=200))
        floor_text = "" if floor is None else \
            f" (a bare ring's floor for these records: {fmt_num(floor)} ns)"
        add(f"B2 async end to end, {capture} B: ≤ 10 ns per closure",
            f"{fmt_num(ours)} ns{floor_text}", None if ours is None else ours <= 10)
    # B3
    for capture in (48, 16):
        ours = ns(res.find("B3_producer", "stepflow", capture=capture, per_step=100))
        add(f"B3 producer, {capture} B, 100 per step: ≤ 10 ns per closure in run_step_closures",
            f"{fmt_num(ours)} ns", None if ours is None else ours <= 10)
    # B4
    devices, steps, _ = b4_data(res)
    if devices:
        base = devices[0]["ns_per_closure"]
        dev = [r["ns_per_closure"] / base - 1 for r in devices]
        worst = max(dev, key=abs)
        add("B4 per-closure cost within ±25% from 1 to 64 devices",
            f"worst {worst * 100:+.0f}% ({', '.join(fmt_num(r['ns_per_closure']) for r in devices)}"
            f" ns for {', '.join(str(r.args['devices']) for r in devices)} devices)",
            all(abs(d) <= 0.25 for d in dev))
    if steps:
        base = steps[0]["ns_per_closure"]
        dev = [r["ns_per_closure"] / base - 1 for r in steps]
        worst = max(dev, key=abs)
        add("B4 per-closure cost within ±25% from 1e3 to 1e6 steps",
            f"worst {worst * 100:+.0f}% ({', '.join(fmt_num(r['ns_per_closure']) for r in steps)}"
            f" ns for 1e3…1e6 steps)",
            all(abs(d) <= 0.25 for d in dev))
        first, last = steps[0].get("peak_growth_kib"), steps[-1].get("peak_growth_kib")
        ok = None if first is None or last is None or last < 0 else last <= first + 1024
        add("B4 peak memory does not grow with the number of steps (bounded queue; "
            "tolerance 1 MiB)",
            f"peak RSS growth {fmt_num(first, 0)} KiB at 1e3 steps, {fmt_num(last, 0)} KiB at "
            f"1e6 steps", ok)
    # B5
    for (period, gap), label, limit in B5_REGIMES:
        r = res.find("B5_latency", "stepflow", period_us=period, gap=gap)
        p99 = None if r is None else r.get("p99_ns")
        floor = res.find("B5_latency", "wake_floor", period_us=period, gap=gap)
        floor_text = "" if floor is None else \
            f"; a bare futex wake: p99 {us(floor.get('p99_ns'))} µs"
        lingering = res.find("B5_latency", "stepflow_linger_5ms", period_us=period, gap=gap)
        if lingering is not None:
            floor_text += f"; with worker_linger 5 ms: p99 {us(lingering.get('p99_ns'))} µs"
        add(f"B5 latency, {label}: p99 ≤ {limit // 1000} µs",
            f"p99 {us(p99)} µs (p50 {us(r.get('p50_ns')) if r else 'n/a'} µs{floor_text})",
            None if p99 is None else p99 <= limit)
    # B6
    for producers, _, label in B6_PRODUCERS:
        pairs = [(k, ns(pd, "ns_per_step"), ns(ls, "ns_per_step"))
                 for k, pd, ls in b6_pairs(res, producers)]
        target = f"B6 lockstep ≤ 2× per_device per step, 8 devices, {label}"
        ratios = [(k, ls / pd) for k, pd, ls in pairs if pd and ls is not None]
        if not ratios:
            add(target, "not measured (no lockstep_bench results)", None)
            continue
        worst = max(r for _, r in ratios)
        # A missing size can only turn a PASS into n/a, never a MISS into one.
        ok = False if worst > 2 else (True if len(ratios) == len(B6_PER_STEP) else None)
        timed = []
        for k, _ in ratios:
            pd = ns(res.find("B6_lockstep", "stepflow_per_device_run_time", producers=producers,
                             per_step=k), "ns_per_step")
            ls = ns(res.find("B6_lockstep", "stepflow_lockstep_run_time", producers=producers,
                             per_step=k), "ns_per_step")
            if pd and ls is not None:
                timed.append(f"{ls / pd:.2f}×")
        timed_text = f"; with run time measured: {', '.join(timed)}" if timed else ""
        add(target,
            f"worst {worst:.2f}× ({', '.join(f'{r:.2f}×' for _, r in ratios)} for "
            f"{', '.join(str(k) for k, _ in ratios)} closures per device step{timed_text})", ok)
    # B7
    for per_step in B7_PER_STEP:
        for impl, mode in (("stepflow_sync", "sync"), ("stepflow_async", "async")):
            for capture in (16, 48):
                r = res.find("B7_alloc", impl, capture=capture, per_step=per_step)
                if r is None:
                    continue
                news, per = r.get("news"), r.get("new_per_closure")
                add(f"B7 zero heap allocations per closure, {mode}, {capture} B, {per_step} per "
                    "step (steady state)",
                    f"{fmt_num(per, 7)} per closure ({fmt_num(news, 0)} operator new calls in "
                    f"{fmt_num(r.get('closures'), 0)} closures)",
                    None if news is None else news == 0)
    return rows


def section_targets(res: Results) -> str:
    return table(["target (issue 5)", "measured (median of 3)", "result"], targets(res))


# --- plot --------------------------------------------------------------------------------------

def plot_b4(res: Results, png: Path) -> bool:
    devices, steps, _ = b4_data(res)
    if not devices and not steps:
        print("bench_report: no B4 results, no plot", file=sys.stderr)
        return False
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        print("bench_report: gnuplot not found (apt-get install gnuplot-nox); no plot",
              file=sys.stderr)
        return False
    with tempfile.TemporaryDirectory() as tmp:
        d_dat = Path(tmp) / "devices.dat"
        s_dat = Path(tmp) / "steps.dat"
        d_dat.write_text("".join(f"{r.args['devices']} {r['ns_per_closure']}\n"
                                 for r in devices))
        s_dat.write_text("".join(
            f"{r.args['steps']} {r['ns_per_closure']} {r.get('peak_growth_kib', 0) / 1024}\n"
            for r in steps))
        d_base = devices[0]["ns_per_closure"] if devices else 1
        s_base = steps[0]["ns_per_closure"] if steps else 1
        script = f"""
set terminal pngcairo size 1200,480 font ",10"
set output '{png}'
set multiplot layout 1,2 title "B4 scaling: stepflow, asynchronous closures end to end (48-byte captures, queue bound 100, median of 3)"
set grid
set key top right opaque box
set offsets 0, 0, graph 0.35, 0
set logscale x 2
set xlabel "devices (1e6 closures in total, 100 per device step)"
set ylabel "ns per closure"
set yrange [0:*]
set xrange [0.8:80]
plot '{d_dat}' using 1:2 with linespoints lw 2 pt 7 title "ns per closure", \\
     {d_base * 1.25} with lines dt 2 lc rgb "gray" title "+25% of 1 device", \\
     {d_base * 0.75} with lines dt 2 lc rgb "gray" title "-25% of 1 device"
unset logscale x
set logscale x 10
set xrange [500:2e6]
set xlabel "steps (1 device, 100 closures per step)"
set ylabel "ns per closure"
set y2label "peak RSS growth (MiB)"
set y2tics
set ytics nomirror
set y2range [0:{max(4.0, max((r.get('peak_growth_kib', 0) or 0) / 1024 for r in steps) * 1.2) if steps else 4.0}]
set format x "10^{{%L}}"
plot '{s_dat}' using 1:2 with linespoints lw 2 pt 7 title "ns per closure", \\
     {s_base * 1.25} with lines dt 2 lc rgb "gray" title "+25% of 1e3 steps", \\
     {s_base * 0.75} with lines dt 2 lc rgb "gray" title "-25% of 1e3 steps", \\
     '{s_dat}' using 1:3 axes x1y2 with linespoints lw 2 pt 5 title "peak RSS growth (MiB)"
unset multiplot
"""
        subprocess.run([gnuplot], input=script, text=True, check=True)
    return True


# --- document ----------------------------------------------------------------------------------

def skeleton() -> str:
    parts = ["# Benchmarks\n"]
    for s in SECTIONS:
        parts.append(f"## {s}\n\n<!-- report:{s} -->\n<!-- /report:{s} -->\n")
    return "\n".join(parts)


def update_doc(doc: Path, sections: dict[str, str]) -> None:
    text = doc.read_text() if doc.exists() else skeleton()
    for sid, body in sections.items():
        pattern = re.compile(rf"(<!-- report:{re.escape(sid)} -->\n).*?(<!-- /report:{re.escape(sid)} -->)",
                             re.S)
        if not pattern.search(text):
            print(f"bench_report: no <!-- report:{sid} --> block in {doc}; section skipped",
                  file=sys.stderr)
            continue
        text = pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build-dir", type=Path, default=ROOT / "build" / "bench",
                   help="CMake build directory of the `bench` preset (default: build/bench)")
    p.add_argument("--results", type=Path, default=ROOT / "bench-results",
                   help="where the JSON files go / are read from (default: bench-results)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmarks-b4.png")
    p.add_argument("--run", action="store_true", help="run the benchmarks first")
    p.add_argument("--only", nargs="*", help="with --run: binaries or ids (e.g. B2 alloc_bench)")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--min-time", type=float, default=None,
                   help="--benchmark_min_time for every binary (default: Google Benchmark's)")
    p.add_argument("--quiet-limit", type=float, default=0.1,
                   help="before each binary, wait (up to 10 min) until the machine's CPUs are at "
                        "most this busy (default 0.1; 1 disables)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-runs of a binary during which other processes used more than "
                        "--quiet-limit of the CPUs (the quietest attempt is kept; default 2)")
    p.add_argument("--no-doc", action="store_true", help="print the tables, leave docs alone")
    p.add_argument("extra", nargs="*", help="extra flags for the benchmark binaries (after --)")
    args = p.parse_args()

    if args.run:
        run_benchmarks(args.build_dir, args.results, args.repetitions, args.min_time, args.only,
                       args.extra, args.quiet_limit, args.retries)
    res = Results(args.results)
    if not res.items:
        sys.exit(f"bench_report: no results in {args.results}; run with --run")

    sections = {
        "machine": section_machine(res),
        "commands": section_commands(args),
        "targets": section_targets(res),
        "B1": section_b1(res),
        "B2": section_b2(res),
        "B3": section_b3(res),
        "B4": section_b4(res),
        "B5": section_b5(res),
        "B6": section_b6(res),
        "B7": section_b7(res),
        "metrics": section_metrics(res),
    }
    print(sections["targets"])
    missing = [name for name, _ in BINARIES if not (args.results / f"{name}.json").exists()]
    if missing and not args.no_doc:
        # A partial set would turn every table of the missing binaries into n/a.
        sys.exit(f"bench_report: no results of {', '.join(missing)} in {args.results}: "
                 f"docs left alone (run them, or use --no-doc)")
    if args.no_doc:
        for sid, body in sections.items():
            print(f"\n## {sid}\n\n{body}")
        return 0
    update_doc(args.doc, sections)
    print(f"bench_report: wrote {os.path.relpath(args.doc, Path.cwd())}")
    if plot_b4(res, args.plot):
        print(f"bench_report: wrote {os.path.relpath(args.plot, Path.cwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
