"""The memory monitor: live sampling, bounded history, watched processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from mactuner.devices import DeviceManager, format_bytes
from mactuner.devices.monitor import MemoryMonitor, memory_figure

MB = 1024**2


def wait_until(condition, timeout=10.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


@pytest.fixture
def monitor():
    monitor = MemoryMonitor(DeviceManager(), interval=0.05, maxlen=50)
    yield monitor
    monitor.stop()


def test_samples_the_cpu_in_the_background(monitor):
    monitor.start()
    assert monitor.running
    assert wait_until(lambda: len(monitor.history("cpu")) >= 5)
    samples = monitor.history("cpu")
    times = [s.time for s in samples]
    assert times == sorted(times) and len(set(times)) == len(times)
    latest = monitor.latest("cpu")
    assert latest.device == "cpu"
    assert latest.used + latest.available == latest.total
    assert 0 < latest.allocated < latest.total  # this process's RSS
    assert monitor.cpu_seconds > 0
    since = samples[-2].time
    assert monitor.history("cpu", since=since) == [s for s in monitor.history("cpu") if s.time > since]
    monitor.stop()
    assert not monitor.running
    count = monitor.samples_taken
    time.sleep(0.2)
    assert monitor.samples_taken == count  # really stopped


def test_history_is_bounded(monitor):
    for _ in range(80):
        monitor.sample_once()
    assert len(monitor.history("cpu")) == 50
    assert monitor.samples_taken == 80


def test_reading_while_sampling_is_safe(monitor):
    monitor.start()
    errors = []

    def read():
        try:
            for _ in range(300):
                rows = monitor.history("cpu")
                assert all(row.device == "cpu" for row in rows)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert errors == []


def test_interval_is_checked_and_changeable(monitor):
    with pytest.raises(ValueError, match="interval must be at least"):
        MemoryMonitor(DeviceManager(), interval=0)
    with pytest.raises(ValueError, match="maxlen must be at least 1"):
        MemoryMonitor(DeviceManager(), maxlen=0)
    monitor.interval = 0.5
    assert monitor.interval == 0.5


def test_watches_a_training_like_process_until_it_ends(monitor):
    # a child that holds ~80 MB, then exits when told to
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; x = bytearray(80 * 1024**2); x[::4096] = b'1' * len(x[::4096]); sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        monitor.watch_process(child.pid, "run-1")
        assert monitor.watched() == {child.pid: "run-1"}
        monitor.start()
        assert wait_until(lambda: any((s.rss or 0) > 80 * MB for s in monitor.process_history(child.pid)[child.pid]))
        child.stdin.close()
        child.wait(timeout=10)
        assert wait_until(lambda: not monitor.watched())
        rows = monitor.process_history(child.pid)[child.pid]
        assert rows[-1].alive is False and rows[-1].rss is None
        assert all(row.label == "run-1" for row in rows)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_watch_and_unwatch(monitor):
    with pytest.raises(ValueError, match="no process with id"):
        monitor.watch_process(2**22 + 12345, "ghost")
    import os

    monitor.watch_process(os.getpid(), "me")
    monitor.sample_once()
    monitor.unwatch_process(os.getpid())
    monitor.sample_once()
    rows = monitor.process_history(os.getpid())[os.getpid()]
    assert len(rows) == 1 and rows[0].alive and rows[0].rss > 0


def test_samples_every_gpu_without_touching_it(two_cuda_gpus):
    monitor = MemoryMonitor(DeviceManager(), interval=1.0)
    assert monitor.devices == ["cuda:0", "cuda:1", "cpu"]
    monitor.sample_once()
    assert monitor.latest("cuda:1").total == 15 * 1024**3
    assert monitor.latest("cuda:0").allocated == 2 * 1024**3
    assert two_cuda_gpus["mem_get_info"] == []  # no CUDA context created for watching


def test_free_memory_text_names_only_what_is_known(two_cuda_gpus):
    monitor = MemoryMonitor(DeviceManager(), interval=1.0)
    assert monitor.free_memory_text(["cuda:0", "cpu"]) == ""  # nothing sampled yet
    monitor.sample_once()
    cpu, gpu = monitor.latest("cpu"), monitor.latest("cuda:0")
    assert cpu.available is not None and gpu.available is None  # no NVML: a GPU's free memory is unknown
    # the GPU is left out rather than shown as 0 or "unknown", and so is a device never sampled
    assert monitor.free_memory_text(["cuda:0", "cpu", "mps"]) == f"cpu: {format_bytes(cpu.available)} free"


def test_memory_figure_has_a_line_per_series(monitor):
    import os

    monitor.watch_process(os.getpid(), "me")
    for _ in range(3):
        monitor.sample_once()
    figure = memory_figure(monitor.history("cpu"), monitor.process_history(), title="Memory")
    names = [trace.name for trace in figure.data]
    assert names == ["device used", "this app", "total", "me (RAM)"]
    assert all(len(trace.x) == 3 for trace in figure.data)
    assert figure.layout.yaxis.title.text == "GB"
    assert 0 < max(figure.data[0].y) < max(figure.data[2].y)


def test_memory_figure_shows_local_wall_clock_time(monitor):
    import datetime

    monitor.sample_once()
    sample = monitor.latest("cpu")
    figure = memory_figure([sample])
    assert figure.layout.xaxis.type == "date"
    # the axis shows epoch milliseconds as UTC; they must read as local time, as a person reads a clock
    shown = datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=float(figure.data[0].x[0]))
    expected = datetime.datetime.fromtimestamp(sample.time)
    assert abs(shown - expected) < datetime.timedelta(seconds=1)


def test_watched_process_gpu_memory_comes_from_nvml(two_cuda_gpus, monkeypatch):
    import os

    import mactuner.devices as devices
    from tests.fake_hardware import FakeNVML

    monkeypatch.setattr(devices.memory, "nvml", lambda: FakeNVML({os.getpid(): 5 * 1024**3}))
    monitor = MemoryMonitor(DeviceManager(), interval=1.0)
    monitor.watch_process(os.getpid(), "trainer")
    monitor.sample_once()
    (row,) = monitor.process_history(os.getpid())[os.getpid()]
    assert row.gpu == 5 * 1024**3 and row.rss > 0
    assert monitor.latest("cuda:0").used == 5 * 1024**3
