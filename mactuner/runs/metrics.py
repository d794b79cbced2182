"""A run's metrics.jsonl read back incrementally: chunks, the bounded tail the live view draws, the ETA.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from typing import Any

from mactuner import fileio
from mactuner.runs.store import run_path

TAIL_MAX_POINTS = 2000
TAIL_MAX_INFO = 200  # info records (OOM back-off notes…) kept per run
_READ_CHUNK = 1 << 20  # metrics.jsonl is read in pieces of this many bytes


# --- metrics -----------------------------------------------------------------


@dataclass
class MetricsChunk:
    """Records read from ``metrics.jsonl`` and the byte offset to continue from."""

    records: list[dict[str, Any]]
    offset: int


def read_metrics(run: str | os.PathLike, offset: int = 0, max_bytes: int | None = None) -> MetricsChunk:
    """Read the complete lines of a run's ``metrics.jsonl`` from byte ``offset`` on.

    Only lines ending in a newline are read, so a line the trainer is writing
    right now is left for the next call (the returned offset stops before it).
    Lines that are not JSON objects are skipped. Polling with the returned
    offset reads each byte once, so a 1 s refresh stays cheap on long runs.

    Args:
        run: a run id or a run folder.
        offset: where the previous call stopped (0 for the whole file).
        max_bytes: read about this much at most (whole lines; a longer single line
            is still read whole), so a huge file is taken in bounded pieces.
    """
    path = run_path(run) / "metrics.jsonl"
    try:
        with fileio.open_regular(path) as handle:
            handle.seek(offset)
            data = handle.read(max_bytes if max_bytes else -1)
            if max_bytes and len(data) == max_bytes and b"\n" not in data:
                # one line longer than max_bytes: read on to its end
                while (more := handle.read(max_bytes)) and b"\n" not in more:
                    data += more
                data += more
    except FileNotFoundError:
        return MetricsChunk([], 0)
    except OSError:
        return MetricsChunk([], offset)  # not a regular file (a planted pipe), or unreadable right now
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return MetricsChunk(records, offset + end)


class _StepSeries:
    """Records by step, sorted, at most about ``max_points`` of them.

    The latest record of a step wins (a resumed run records steps again). When
    the series outgrows ``max_points``, the older part is thinned (every second
    record dropped, the first kept) while the newest ``max_points // 2`` stay
    whole: a long run keeps its recent detail and a coarser view of its start,
    in bounded memory.
    """

    def __init__(self, max_points: int):
        self.max_points = max(8, max_points)
        self.steps: list[int] = []
        self.records: list[dict[str, Any]] = []

    def add(self, step: int, record: dict[str, Any]) -> None:
        if not self.steps or step > self.steps[-1]:
            self.steps.append(step)
            self.records.append(record)
        else:
            i = bisect.bisect_left(self.steps, step)
            if i < len(self.steps) and self.steps[i] == step:
                self.records[i] = record
            else:
                self.steps.insert(i, step)
                self.records.insert(i, record)
        if len(self.steps) > self.max_points:
            self._thin_older()

    def _thin_older(self) -> None:
        keep_whole = self.max_points // 2
        cut = len(self.steps) - keep_whole
        kept = [0, *range(1, cut, 2)] if cut > 0 else []
        kept = sorted(set(kept))
        self.steps = [self.steps[i] for i in kept] + self.steps[cut:]
        self.records = [self.records[i] for i in kept] + self.records[cut:]


class MetricsTail:
    """The metrics of one run so far, kept up to date by reading only what was appended.

    A resumed run re-records the steps after its checkpoint; ``train`` and
    ``eval`` keep the latest record per step so charts do not zig-zag. Memory is
    bounded whatever the run's length: each series holds about ``max_points``
    records (older steps downsampled, the newest whole), info records the last
    :data:`TAIL_MAX_INFO`, and the file is read in pieces.
    """

    def __init__(self, run: str | os.PathLike, max_points: int = TAIL_MAX_POINTS):
        self.path = run_path(run)
        self.max_points = max_points
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self._train = _StepSeries(self.max_points)
        self._eval = _StepSeries(self.max_points)
        self.info: list[dict[str, Any]] = []

    def update(self) -> int:
        """Read what was appended since the last call; returns the number of new records."""
        try:
            size = (self.path / "metrics.jsonl").stat().st_size
        except OSError:
            size = 0
        if size < self.offset:  # the file was replaced by a shorter one: start over
            self._reset()
        count = 0
        while True:
            chunk = read_metrics(self.path, self.offset, max_bytes=_READ_CHUNK)
            if chunk.offset == self.offset:
                break
            self.offset = chunk.offset
            count += len(chunk.records)
            for record in chunk.records:
                kind = record.get("type")
                step = record.get("step")
                if kind == "train" and isinstance(step, int):
                    self._train.add(step, record)
                elif kind == "eval" and isinstance(step, int):
                    self._eval.add(step, record)
                elif kind == "info":
                    self.info.append(record)
            del self.info[:-TAIL_MAX_INFO]
        return count

    @property
    def train(self) -> list[dict[str, Any]]:
        """Train records, one per step, by step (older steps thinned on long runs)."""
        return self._train.records

    @property
    def eval(self) -> list[dict[str, Any]]:
        """Eval records, one per step, by step."""
        return self._eval.records

    def series(self, name: str, kind: str = "train", max_points: int | None = None) -> tuple[list[int], list[float]]:
        """Steps and values of one metric (``loss``, ``lr``, ``val_loss`` with kind ``eval``…), where recorded.

        Args:
            name: the record field.
            kind: ``train`` or ``eval`` records.
            max_points: keep about this many points, evenly spaced, plus the latest
                (a chart redrawn every second need not carry every step of a long run).
        """
        records = self.train if kind == "train" else self.eval
        pairs = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        pairs = _thin(pairs, max_points)
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def memory_series(self, max_points: int | None = None) -> tuple[list[float], list[float]]:
        """Seconds since the first record and the run's memory then, in MiB."""
        records = [r for r in self.train if isinstance(r.get("memory_bytes"), (int, float)) and "time" in r]
        start = records[0]["time"] if records else 0.0
        pairs = _thin([(r["time"] - start, r["memory_bytes"] / 2**20) for r in records], max_points)
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _thin(items: list, max_points: int | None) -> list:
    """Every k-th item so that about ``max_points`` remain, always ending with the last."""
    if not max_points or len(items) <= max_points:
        return items
    stride = -(-len(items) // max_points)
    thinned = items[::stride]
    return thinned if thinned[-1] is items[-1] else [*thinned, items[-1]]


def eta_seconds(
    records: list[dict[str, Any]], total_steps: int | None, since: float | None = None, window: int = 20
) -> float | None:
    """Seconds left, from the pace of the last ``window`` train records.

    Args:
        records: train records, by step.
        total_steps: the run's total; None gives None.
        since: only records written after this time count (the run's latest
            ``started_at``), so the pause before a resume is not taken for slowness.

    Returns None while fewer than two records qualify.
    """
    recent = [r for r in records[-window:] if isinstance(r.get("time"), (int, float))]
    if since is not None:
        recent = [r for r in recent if r["time"] >= since]
    if not total_steps or len(recent) < 2:
        return None
    steps = recent[-1]["step"] - recent[0]["step"]
    seconds = recent[-1]["time"] - recent[0]["time"]
    if steps <= 0 or seconds <= 0:
        return None
    return max(0.0, (total_steps - recent[-1]["step"]) * seconds / steps)


def format_duration(seconds: float | None) -> str:
    """``1 h 02 min``, ``3 min 05 s``, ``42 s`` or ``–`` for unknown."""
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"
