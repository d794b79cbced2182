"""Inter-process locks: one launch at a time, one trainer per run folder.

Streamlit serves every browser tab from threads of one process and each
training run is its own process, so "check that the device is free, then
launch" and "this run folder is mine" must hold across threads *and*
processes. The locks are ``filelock`` locks (``flock`` on POSIX): the operating
system releases them when the holder dies, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from mactuner import paths

RUN_LOCK_FILE = ".trainer.lock"  # inside a run folder, held by its trainer for its whole life


class LockBusy(RuntimeError):
    """Another tab or process holds the lock."""


def _locks_dir() -> Path:
    folder = paths.home() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def launch_lock(timeout: float = 30.0) -> Iterator[None]:
    """Held around "check which runs use the device, then start one" (all devices, all tabs).

    Raises:
        LockBusy: another launch held the lock for longer than ``timeout`` seconds.
    """
    lock = FileLock(str(_locks_dir() / "launch.lock"), is_singleton=False)
    try:
        lock.acquire(timeout=timeout)
    except Timeout as exc:
        raise LockBusy("Another run is being started right now; try again in a moment.") from exc
    try:
        yield
    finally:
        lock.release()


class RunLock:
    """The lock a trainer holds on its run folder for its lifetime.

    A second trainer on the same folder fails at :meth:`acquire` before it
    touches anything (checkpoints, status, metrics).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / RUN_LOCK_FILE
        self._lock = FileLock(str(self.path), is_singleton=False)

    def acquire(self, timeout: float = 2.0) -> RunLock:
        """Take the lock within ``timeout`` seconds or raise :class:`LockBusy`.

        The short wait covers :func:`run_is_locked`, which holds the lock for an
        instant while it probes; a real second trainer holds it for its whole life.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=timeout)
        except Timeout as exc:
            raise LockBusy(
                f"Another trainer is already working in {self.path.parent}; "
                "wait for it to finish or cancel it before resuming this run."
            ) from exc
        return self

    def release(self) -> None:
        """Let go of the lock (also happens when the process exits)."""
        if self._lock.is_locked:
            self._lock.release(force=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_is_locked(run_dir: str | os.PathLike) -> bool:
    """Whether a trainer holds ``run_dir`` right now (a cheap, non-blocking probe)."""
    path = Path(run_dir) / RUN_LOCK_FILE
    if not path.exists():
        return False
    probe = FileLock(str(path), is_singleton=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return False  # the run folder was deleted meanwhile (or is read-only): nobody holds it
    probe.release()
    return False
