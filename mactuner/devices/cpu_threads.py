"""How many CPU threads the next piece of work should use.

torch splits each CPU operation across threads that wait for one another, so
when another program holds a core, every operation waits for the thread that
lost it. Measured on a shared 2-core machine: a LoRA step on 2 threads with the
other core busy ran ~10x slower than on 1 thread, and generation 4-20x slower.
So the trainer (every step) and the chat engine (every answer) take torch's
default thread count minus the cores that *other* processes keep busy, read
from the system's CPU times (no sampling pause). ``MACTUNER_CPU_THREADS`` fixes
the number instead.

Only sustained load counts. A core is taken from the count when other processes
used at least ``threshold`` (default 0.75) of a core on average over the last
``window`` seconds (default 3). Short bursts, such as the Streamlit app's own
threads redrawing a page once a second or a browser painting it, average well
below that and leave every thread to the work: giving up half the cores for a
burst costs more than the burst does. Until ``window`` seconds of readings exist,
the default stands.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import torch


class CpuTimes(NamedTuple):
    """A reading of CPU times, in seconds."""

    clock: float  # time.monotonic()
    busy: float  # all processes, all cores: non-idle time
    own: float  # this process


def read_cpu_times() -> CpuTimes:
    """The system's and this process's CPU times now."""
    import psutil

    system = psutil.cpu_times()
    busy = sum(system) - system.idle - getattr(system, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return CpuTimes(time.monotonic(), busy, own.user + own.system)


class CpuThreads:
    """Threads for the next CPU step or answer.

    Args:
        min_window: seconds between two readings; asked sooner (steps or answers back
            to back), it keeps the last judgement.
        window: seconds over which other processes' load is averaged.
        threshold: share of a core that other processes must use on average over the
            window before a thread is given up for it.
        default: the most threads to use (torch's setting when None).
        read: where CPU times come from (tests pass a fake).
    """

    def __init__(
        self,
        min_window: float = 0.2,
        *,
        window: float = 3.0,
        threshold: float = 0.75,
        default: int | None = None,
        read: Callable[[], CpuTimes] = read_cpu_times,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be a share of one core in (0, 1], got {threshold}")
        self.default = default or torch.get_num_threads()
        self.min_window = min_window
        self.window = max(window, min_window)
        self.threshold = threshold
        self._read = read
        self._lock = threading.Lock()
        self._history: deque[CpuTimes] = deque([read()])
        self._previous: int | None = None
        self.others = 0.0  # the last judged load of other processes, in cores

    def choose(self) -> int:
        """The thread count for the next piece of work (does not change torch's setting)."""
        fixed = os.environ.get("MACTUNER_CPU_THREADS")
        if fixed:
            return max(1, int(fixed))
        with self._lock:
            now = self._read()
            if now.clock - self._history[-1].clock < self.min_window:
                return self._previous if self._previous is not None else self.default
            self._history.append(now)
            # keep one reading at or before the window's start, none older
            while len(self._history) > 2 and now.clock - self._history[1].clock >= self.window:
                self._history.popleft()
            start = self._history[0]
            elapsed = now.clock - start.clock
            if elapsed < self.window:
                # too short a view to tell a burst from a busy core
                return self._previous if self._previous is not None else self.default
            self.others = max(0.0, ((now.busy - start.busy) - (now.own - start.own)) / elapsed)
            # cores held by others: a core counts from `threshold` of it on average
            taken = math.floor(self.others + 1.0 - self.threshold)
            self._previous = max(1, min(self.default, self.default - taken))
            return self._previous

    def update(self) -> int:
        """Choose the thread count and set it for torch; returns it."""
        threads = self.choose()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads
