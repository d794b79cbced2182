"""How many CPU threads the next piece of work should use.

torch splits each CPU operation across threads that wait for one another, so
when another program holds a core, every operation waits for the thread that
lost it. Measured on a shared 2-core machine: a LoRA step on 2 threads with the
other core busy ran ~10x slower than on 1 thread, and generation 4-20x slower.
So the trainer (every step) and the chat engine (every answer) take torch's
default thread count minus the cores other processes kept busy since the last
look, read from the system's CPU times (no sampling pause).
``MACTUNER_CPU_THREADS`` fixes the number instead.
"""

from __future__ import annotations

import os
import threading
import time

import torch


class CpuThreads:
    """Threads for the next CPU step or answer.

    Args:
        min_window: seconds of CPU times needed to judge the load; a shorter
            window (steps or answers back to back) keeps the last judgement.
    """

    def __init__(self, min_window: float = 0.2) -> None:
        self.default = torch.get_num_threads()
        self.min_window = min_window
        self._lock = threading.Lock()
        self._last = self._snapshot()
        self._previous: int | None = None

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        import psutil

        system = psutil.cpu_times()
        busy = sum(system) - system.idle - getattr(system, "iowait", 0.0)
        own = psutil.Process().cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def choose(self) -> int:
        """The thread count for the next piece of work (does not change torch's setting)."""
        fixed = os.environ.get("MACTUNER_CPU_THREADS")
        if fixed:
            return max(1, int(fixed))
        with self._lock:
            now = self._snapshot()
            elapsed = now[0] - self._last[0]
            if elapsed < self.min_window:
                return self._previous if self._previous is not None else self.default
            last, self._last = self._last, now
            others = max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / elapsed)
            self._previous = max(1, min(self.default, round(self.default - others)))
            return self._previous

    def update(self) -> int:
        """Choose the thread count and set it for torch; returns it."""
        threads = self.choose()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads
