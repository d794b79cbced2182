"""CPU cost of the memory monitor: CPU seconds per minute and share of one core.

Runs the real :class:`mactuner.devices.monitor.MemoryMonitor` on this machine's devices
for a fixed time at each interval while the main thread sleeps, and reads the
sampling thread's CPU time from the kernel (the thread's own CPU clock,
``pthread_getcpuclockid``, nanosecond resolution). The whole process's CPU
time (10 ms ticks) is shown too, against a baseline of the same length with no
monitor; the "vs 1 s" column compares each run's cost with the 1 s monitor.

Target: at most 1 % of one core at a 1 s interval.

    .venv/bin/python -m bench.monitor_overhead [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import psutil

from mactuner.devices import DeviceManager
from mactuner.devices.monitor import MemoryMonitor

TARGET_SHARE = 0.01  # of one core, at a 1 s interval


def thread_cpu(ident: int) -> float:
    """CPU seconds one thread of this process has used, from its own CPU clock (ns resolution)."""
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def process_cpu() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def measure(manager: DeviceManager, interval: float | None, seconds: float, watch: list[int]) -> dict:
    """Run a monitor (or nothing, for the baseline) for ``seconds``; return its CPU use."""
    process_before, wall_before = process_cpu(), time.perf_counter()
    if interval is None:
        time.sleep(seconds)
        wall = time.perf_counter() - wall_before
        return {"wall": wall, "thread": None, "own_clock": None, "process": process_cpu() - process_before, "samples": 0}
    monitor = MemoryMonitor(manager, interval=interval)
    for pid in watch:
        monitor.watch_process(pid, f"child {pid}")
    monitor.start()
    ident = monitor._thread.ident
    thread_before = thread_cpu(ident)
    time.sleep(seconds)
    thread_after = thread_cpu(ident)
    wall = time.perf_counter() - wall_before
    process_used = process_cpu() - process_before
    monitor.stop()
    return {
        "wall": wall,
        "thread": thread_after - thread_before,
        "own_clock": monitor.cpu_seconds,
        "process": process_used,
        "samples": monitor.samples_taken,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measurement (default 20)")
    args = parser.parse_args()

    manager = DeviceManager()
    devices = [info.key for info in manager.get_available_devices() if info.is_available]
    # two idle child processes stand in for training runs the fine-tune page registers
    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]) for _ in range(2)]
    try:
        runs = [
            ("baseline (no monitor)", None, []),
            ("monitor, 1 s", 1.0, []),
            ("monitor, 0.25 s", 0.25, []),
            ("monitor, 1 s + 2 watched processes", 1.0, [c.pid for c in children]),
        ]
        results = [(name, interval, measure(manager, interval, args.seconds, watch)) for name, interval, watch in runs]
    finally:
        for child in children:
            child.kill()
            child.wait()

    print(f"memory monitor CPU cost on {os.uname().machine}, {psutil.cpu_count()} CPUs; devices sampled: {', '.join(devices)}")
    print(f"each run {args.seconds:g} s; '% of 1 core' = CPU time of the sampling thread / wall time\n")
    header = (
        f"{'run':<36} {'samples':>7} {'ms/sample':>9} {'CPU s/min':>9} {'% of 1 core':>11} {'vs 1 s':>7}"
        f" {'process % core':>14}"
    )
    print(header)
    print("-" * len(header))
    baseline_share = results[0][2]["process"] / results[0][2]["wall"]
    one_second = results[1][2]
    reference = one_second["thread"] / one_second["wall"]
    verdict = None
    for name, interval, r in results:
        process_share = r["process"] / r["wall"]
        if r["thread"] is None:
            print(f"{name:<36} {'-':>7} {'-':>9} {'-':>9} {'-':>11} {'-':>7} {process_share * 100:>13.3f}%")
            continue
        share = r["thread"] / r["wall"]
        per_sample_ms = r["own_clock"] / max(r["samples"], 1) * 1000
        print(
            f"{name:<36} {r['samples']:>7} {per_sample_ms:>9.3f} {share * 60:>9.3f} {share * 100:>10.3f}% "
            f"{share / reference:>6.2f}x {process_share * 100:>13.3f}%"
        )
        if interval == 1.0 and verdict is None:
            verdict = share
    print(f"\nbaseline process share (idle, no monitor): {baseline_share * 100:.3f}% of one core")
    ok = verdict is not None and verdict <= TARGET_SHARE
    print(f"target <= {TARGET_SHARE * 100:g}% of one core at 1 s: {'met' if ok else 'NOT met'} ({verdict * 100:.3f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
