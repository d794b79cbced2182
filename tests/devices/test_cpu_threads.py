"""The CPU thread choice gives up a thread only for sustained load from other processes,
not for the app's short bursts (faked CPU-time readings: the load is set exactly)."""

from __future__ import annotations

import pytest

from mactuner.devices.cpu_threads import CpuThreads, CpuTimes


class FakeCpu:
    """CPU times advancing by the loads a test sets: ``others`` cores of other processes, ``own`` of ours."""

    def __init__(self):
        self.now = CpuTimes(0.0, 0.0, 0.0)

    def run(self, seconds: float, others: float, own: float = 2.0) -> None:
        clock, busy, mine = self.now
        self.now = CpuTimes(clock + seconds, busy + (others + own) * seconds, mine + own * seconds)

    def __call__(self) -> CpuTimes:
        return self.now


@pytest.fixture(autouse=True)
def no_fixed_threads(monkeypatch):
    monkeypatch.delenv("MACTUNER_CPU_THREADS", raising=False)


def steps(threads: CpuThreads, cpu: FakeCpu, seconds: float, others: float, step: float = 0.5) -> list[int]:
    """The choices made at each step of ``step`` seconds while others use ``others`` cores."""
    chosen = []
    for _ in range(round(seconds / step)):
        cpu.run(step, others)
        chosen.append(threads.choose())
    return chosen


def test_an_idle_app_and_short_bursts_keep_every_thread():
    cpu = FakeCpu()
    threads = CpuThreads(default=2, read=cpu)
    # the app redrawing the live view: ~0.4 of a core on average, in bursts of a full core
    chosen = []
    for _ in range(12):
        cpu.run(0.3, others=1.0)
        chosen.append(threads.choose())
        cpu.run(0.7, others=0.15)
        chosen.append(threads.choose())
    assert chosen == [2] * len(chosen)
    assert 0.3 < threads.others < 0.6


def test_a_core_held_by_another_process_is_given_up_and_taken_back():
    cpu = FakeCpu()
    threads = CpuThreads(default=2, read=cpu)
    assert steps(threads, cpu, 4.0, others=0.0) == [2] * 8
    # another program keeps a core busy: after the window shows it, one thread
    busy = steps(threads, cpu, 6.0, others=1.0)
    assert busy[-1] == 1 and busy.count(1) >= 6
    # it ends: every thread again once the window no longer holds it
    assert steps(threads, cpu, 6.0, others=0.0)[-1] == 2


def test_the_threshold_is_a_sustained_share_of_a_core():
    for others, expected in [(0.5, 2), (0.7, 2), (0.8, 1), (1.5, 1), (1.8, 1)]:
        cpu = FakeCpu()
        threads = CpuThreads(default=2, read=cpu)
        assert steps(threads, cpu, 6.0, others=others)[-1] == expected, others
    cpu = FakeCpu()
    four = CpuThreads(default=4, read=cpu)
    assert steps(four, cpu, 6.0, others=2.9)[-1] == 1


def test_readings_closer_than_min_window_keep_the_last_choice_and_the_env_fixes_it(monkeypatch):
    cpu = FakeCpu()
    threads = CpuThreads(default=2, read=cpu, min_window=1.0)
    cpu.run(5.0, others=1.0)
    assert threads.choose() == 1
    cpu.run(0.1, others=0.0)
    assert threads.choose() == 1  # too soon to judge again
    monkeypatch.setenv("MACTUNER_CPU_THREADS", "3")
    assert threads.choose() == 3


def test_a_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        CpuThreads(threshold=0.0, read=FakeCpu())
