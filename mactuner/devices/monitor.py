"""A background memory monitor: samples every device, and any training
processes it is told about, into a bounded, thread-safe history.

One :class:`MemoryMonitor` runs per app process (the app holds it in
``st.cache_resource``). It samples *all* detected devices, not one "selected"
device, because two browser tabs may have chosen different devices; each page
then plots the device its session uses. A sample costs a few ``/proc`` reads
(and NVML calls on NVIDIA machines); ``bench/monitor_overhead.py`` measures the
thread's CPU time.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import psutil

from mactuner.devices import memory
from mactuner.devices.memory import GB, format_bytes, memory_axes

if TYPE_CHECKING:
    from mactuner.devices import DeviceManager

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.05  # seconds; faster sampling only burns CPU without showing more
CHILDREN_REFRESH_S = 10.0  # how often a watched process's children are listed again


class DeviceSample(NamedTuple):
    """One reading of one device, in bytes (``None`` where unknown)."""

    time: float  # seconds since the epoch
    device: str  # "cpu", "mps", "cuda:0", …
    used: int | None  # the whole device's use (CPU: the system's)
    allocated: int | None  # this app process's share (CPU: its RSS; CUDA/MPS: torch's live tensors)
    reserved: int | None  # what this process's allocator holds (CUDA), Metal's share (MPS)
    total: int | None
    available: int | None


class ProcessSample(NamedTuple):
    """One reading of a watched process (e.g. a training run), in bytes."""

    time: float
    pid: int
    label: str
    rss: int | None  # resident memory of the process and its children
    gpu: int | None  # CUDA memory it holds across GPUs (NVML), None where unknown
    alive: bool


class MemoryMonitor:
    """Samples memory in a daemon thread into bounded per-device and per-process histories.

    Args:
        manager: the :class:`~mactuner.devices.DeviceManager` whose devices are sampled.
        interval: seconds between samples (changeable later through ``interval``).
        maxlen: samples kept per device and per process (the oldest drop out);
            the default keeps an hour at one sample per second.
        devices: device strings to sample; default every available detected device.
    """

    def __init__(
        self,
        manager: DeviceManager,
        interval: float = 1.0,
        maxlen: int = 3600,
        devices: list[str] | None = None,
    ):
        if maxlen < 1:
            raise ValueError(f"maxlen must be at least 1, got {maxlen}")
        self.manager = manager
        self.maxlen = maxlen
        self.interval = interval
        self.devices = devices or [info.key for info in manager.get_available_devices() if info.is_available]
        self._lock = threading.Lock()
        self._device_history: dict[str, collections.deque[DeviceSample]] = {
            device: collections.deque(maxlen=maxlen) for device in self.devices
        }
        self._process_history: dict[int, collections.deque[ProcessSample]] = {}
        self._watched: dict[int, tuple[str, psutil.Process]] = {}
        self._children_cache: dict[int, tuple[float, list[psutil.Process]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples_taken = 0
        self.cpu_seconds = 0.0  # CPU time the sampling thread has used (its own thread clock)
        self.last_error: str | None = None

    # -- configuration ----------------------------------------------------- #

    @property
    def interval(self) -> float:
        """Seconds between samples; takes effect from the next sample."""
        return self._interval

    @interval.setter
    def interval(self, seconds: float) -> None:
        if not seconds >= MIN_INTERVAL:
            raise ValueError(f"interval must be at least {MIN_INTERVAL} s, got {seconds}")
        self._interval = float(seconds)

    # -- life cycle -------------------------------------------------------- #

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MemoryMonitor:
        """Start the sampling thread (no-op if it runs); returns ``self``."""
        if not self.running:
            self._stop.clear()
            self._sample_guarded()  # a first reading right away: pages drawn just after start have numbers
            self._thread = threading.Thread(target=self._run, name="mactuner-memory-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the sampling thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _sample_guarded(self) -> None:
        started_cpu = time.thread_time()
        try:
            self.sample_once()
        except Exception as exc:  # noqa: BLE001 - a failed sample must never kill the monitor
            if str(exc) != self.last_error:
                log.warning("Memory sample failed: %s", exc)
            self.last_error = str(exc)
        self.cpu_seconds += time.thread_time() - started_cpu

    def _run(self) -> None:
        # start() took the first sample; schedule by the clock, not by
        # sleep(interval), so the rate does not drift
        next_tick = time.monotonic() + self._interval
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            self._sample_guarded()
            next_tick += self._interval
            if next_tick < time.monotonic():  # fell behind (machine busy): skip ahead rather than burst
                next_tick = time.monotonic()

    # -- sampling ---------------------------------------------------------- #

    def sample_once(self) -> list[DeviceSample]:
        """Take one sample of every device and watched process now; returns the device samples."""
        now = time.time()
        samples = []
        for device in self.devices:
            # init=False: never create a CUDA context just to watch a GPU nobody uses
            axes = memory_axes(self.manager.get_device_memory_info(device, init=False))
            samples.append(
                DeviceSample(
                    now, device, axes["used"], axes["allocated"], axes["reserved"], axes["total"], axes["available"]
                )
            )
        processes = self._sample_processes(now)
        with self._lock:
            for sample in samples:
                self._device_history.setdefault(sample.device, collections.deque(maxlen=self.maxlen)).append(sample)
            for sample in processes:
                self._process_history.setdefault(sample.pid, collections.deque(maxlen=self.maxlen)).append(sample)
            self.samples_taken += 1
        return samples

    def _sample_processes(self, now: float) -> list[ProcessSample]:
        with self._lock:
            watched = dict(self._watched)
        if not watched:
            return []
        gpu_by_pid = _gpu_memory_by_pid(self.devices)
        samples = []
        for pid, (label, process) in watched.items():
            try:
                with process.oneshot():
                    if process.status() == psutil.STATUS_ZOMBIE:
                        # exited, not yet reaped by its parent: it holds no memory any more
                        raise psutil.NoSuchProcess(pid)
                    rss = process.memory_info().rss
                family = [process, *self._children(pid, process, now)]
                for child in family[1:]:
                    try:
                        rss += child.memory_info().rss
                    except psutil.Error:
                        pass  # a child that ended between listing and reading
                gpu = sum(gpu_by_pid.get(p.pid, 0) for p in family) if gpu_by_pid is not None else None
                samples.append(ProcessSample(now, pid, label, rss, gpu, True))
            except psutil.Error:
                # the run ended: record it once and stop watching
                samples.append(ProcessSample(now, pid, label, None, None, False))
                with self._lock:
                    self._watched.pop(pid, None)
                log.info("Watched process %s (%s) ended", pid, label)
        return samples

    def _children(self, pid: int, process: psutil.Process, now: float) -> list[psutil.Process]:
        # listing children scans every process on the machine (~ms), so refresh
        # the list only every CHILDREN_REFRESH_S; their memory is read every sample
        cached = self._children_cache.get(pid)
        if cached is None or now - cached[0] >= CHILDREN_REFRESH_S:
            try:
                cached = (now, process.children(recursive=True))
            except psutil.Error:
                cached = (now, [])
            self._children_cache[pid] = cached
        return cached[1]

    # -- watched processes ------------------------------------------------- #

    def watch_process(self, pid: int, label: str | None = None) -> None:
        """Also sample process ``pid`` (and its children), e.g. a background training run.

        Raises:
            ValueError: no process with that id exists.
        """
        try:
            process = psutil.Process(pid)  # remembers its start time, so a reused pid is not confused with it
        except psutil.NoSuchProcess as exc:
            raise ValueError(f"no process with id {pid} is running") from exc
        with self._lock:
            self._watched[pid] = (label or f"pid {pid}", process)

    def unwatch_process(self, pid: int) -> None:
        """Stop sampling process ``pid``; its history stays readable."""
        with self._lock:
            self._watched.pop(pid, None)

    def watched(self) -> dict[int, str]:
        """Watched process ids and their labels."""
        with self._lock:
            return {pid: label for pid, (label, _) in self._watched.items()}

    # -- reading the history ----------------------------------------------- #

    def history(self, device: str, since: float | None = None) -> list[DeviceSample]:
        """Samples of ``device`` (oldest first), optionally only those after ``since``."""
        with self._lock:
            samples = list(self._device_history.get(str(device), ()))
        return samples if since is None else [s for s in samples if s.time > since]

    def latest(self, device: str) -> DeviceSample | None:
        """The newest sample of ``device``, or ``None`` before the first."""
        with self._lock:
            history = self._device_history.get(str(device))
            return history[-1] if history else None

    def free_memory_text(self, devices: Iterable[str]) -> str:
        """``"cpu: 12.3 GB free · cuda:0: 20.1 GB free"`` from the newest samples of ``devices``; a device
        not sampled yet, or whose free memory is unknown, is left out (``""`` when none is known)."""
        parts = []
        for device in devices:
            sample = self.latest(device)
            if sample is not None and sample.available is not None:
                parts.append(f"{device}: {format_bytes(sample.available)} free")
        return " · ".join(parts)

    def process_history(self, pid: int | None = None) -> dict[int, list[ProcessSample]]:
        """Histories of watched (and formerly watched) processes, by pid; one pid if given."""
        with self._lock:
            items = self._process_history.items() if pid is None else [(pid, self._process_history.get(pid, ()))]
            return {key: list(value) for key, value in items}


def _gpu_memory_by_pid(devices: list[str]) -> dict[int, int] | None:
    """CUDA memory per process id across the sampled GPUs (NVML); ``None`` without NVML."""
    lib = memory.nvml()
    cuda = [d for d in devices if d.startswith("cuda")]
    if lib is None or not cuda:
        return None
    used: dict[int, int] = collections.defaultdict(int)
    for device in cuda:
        handle = memory.nvml_handle(int(device.split(":")[1]))
        if handle is None:
            continue
        try:
            processes = lib.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # noqa: BLE001 - unsupported on some drivers: unknown, not an error
            continue
        for proc in processes:
            used[proc.pid] += proc.usedGpuMemory or 0
    return used


def memory_figure(
    samples: list[DeviceSample],
    processes: dict[int, list[ProcessSample]] | None = None,
    title: str | None = None,
):
    """A plotly figure of memory over time, in GB: the device's use, this app's
    share, its capacity, and one line per watched process.

    The dashboard redraws it every second, so it is built cheaply: numpy arrays
    (sent as compact binary, not JSON number lists), times as epoch
    milliseconds on a date axis, and data and layout passed to the constructor
    (plotly's ``update_layout`` path validation cost ~5x more).
    """
    import numpy as np
    import plotly.graph_objects as go

    def times(rows):
        # a date axis shows milliseconds as UTC: shift them to local wall-clock time
        offset = time.localtime(rows[-1].time).tm_gmtoff
        return (np.array([row.time for row in rows], dtype=float) + offset) * 1000

    def gb(values):
        return np.array([np.nan if v is None else v for v in values], dtype=float) / GB

    data = []
    if samples:
        x = times(samples)
        data.append(go.Scatter(x=x, y=gb(s.used for s in samples), name="device used", mode="lines", fill="tozeroy"))
        data.append(go.Scatter(x=x, y=gb(s.allocated for s in samples), name="this app", mode="lines"))
        if any(s.total for s in samples):
            dashed = {"dash": "dash", "width": 1}
            data.append(go.Scatter(x=x, y=gb(s.total for s in samples), name="total", mode="lines", line=dashed))
    for rows in (processes or {}).values():
        rows = [row for row in rows if row.rss is not None]
        if rows:
            x = times(rows)
            data.append(go.Scatter(x=x, y=gb(r.rss for r in rows), name=f"{rows[-1].label} (RAM)", mode="lines"))
            if any(r.gpu for r in rows):
                data.append(go.Scatter(x=x, y=gb(r.gpu for r in rows), name=f"{rows[-1].label} (GPU)", mode="lines"))
    layout = {
        "title": {"text": title} if title else None,
        "xaxis": {"type": "date"},
        "yaxis": {"title": {"text": "GB"}, "rangemode": "tozero"},
        "height": 340,
        "margin": {"l": 10, "r": 10, "t": 40 if title else 10, "b": 40},
        "legend": {"orientation": "h", "y": -0.25},
        "uirevision": "memory",  # keep zoom and hidden series across live updates
    }
    return go.Figure(data=data, layout={key: value for key, value in layout.items() if value is not None})
