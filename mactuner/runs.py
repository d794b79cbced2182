"""Background training runs: one process and one folder per run.

A run is ``python -m mactuner train RUN/config.yaml --run-dir RUN`` started as a
detached process (its own session, output into ``RUN/log.txt``), so it keeps
training when the browser tab closes or the app itself stops. Everything the UI
needs is read back from the run folder (see ARCHITECTURE.md):

```
RUN/config.yaml      the TrainConfig
RUN/status.json      state, pid, step, total_steps, started_at, updated_at, message
RUN/metrics.jsonl    one JSON record per line (train / eval / info)
RUN/log.txt          the process's stdout and stderr
RUN/process.json     written here: pid and process create time of the last launch
RUN/checkpoints/     complete checkpoints (mactuner.checkpoints)
RUN/adapter/         the final adapter
```

A run whose status says ``running`` but whose process is gone is reported (and
recorded) as ``failed`` with the last lines of its log. The process is matched
by pid *and* create time, so a recycled pid never passes for a live run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from mactuner import paths

STATES = ("running", "finished", "failed", "cancelled")
LOG_TAIL_LINES = 20
# a run folder whose status says running but has no process recorded yet is
# being launched; after this long without a process it is considered failed
_LAUNCH_GRACE_S = 30.0
# process create times are derived from boot time and clock ticks: allow jitter
_CREATE_TIME_SLACK_S = 1.0

# processes started by this app process, kept so their exit is reaped (no zombies)
_children: dict[int, subprocess.Popen] = {}


class RunError(Exception):
    """A run operation that cannot be done; the message says why and what to do."""


class RunConflict(RunError):
    """Another run is already training on the same device (see ``start_run(force=True)``)."""

    def __init__(self, message: str, running: RunInfo):
        super().__init__(message)
        self.running = running


@dataclass
class RunInfo:
    """What a run folder says about its run, with the process state checked.

    ``state`` is one of ``running``, ``finished``, ``failed``, ``cancelled``.
    Times are seconds since the epoch. ``last_metrics`` is the latest ``train``
    record of ``metrics.jsonl`` and ``last_eval`` the latest ``eval`` record.
    """

    id: str
    path: Path
    state: str
    pid: int | None = None
    step: int = 0
    total_steps: int | None = None
    started_at: float | None = None
    updated_at: float | None = None
    message: str | None = None
    device: str | None = None
    model: str | None = None
    method: str | None = None
    last_metrics: dict[str, Any] | None = None
    last_eval: dict[str, Any] | None = None
    log_tail: str = ""
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def progress(self) -> float:
        """Fraction of the steps done, 0..1 (0 while the total is unknown)."""
        if not self.total_steps:
            return 0.0
        return max(0.0, min(1.0, self.step / self.total_steps))

    @property
    def is_running(self) -> bool:
        return self.state == "running"


# --- small file helpers ------------------------------------------------------


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    # a reader polling every second must never see a half-written file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _as_epoch(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO-8601 string; None if neither."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        from datetime import datetime

        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def tail_lines(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64_000) -> str:
    """The last ``lines`` lines of a text file ("" if it does not exist), reading only its end."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


# --- metrics -----------------------------------------------------------------


@dataclass
class MetricsChunk:
    """Records read from ``metrics.jsonl`` and the byte offset to continue from."""

    records: list[dict[str, Any]]
    offset: int


def read_metrics(run: str | os.PathLike, offset: int = 0) -> MetricsChunk:
    """Read the complete lines of a run's ``metrics.jsonl`` from byte ``offset`` on.

    Only lines ending in a newline are read, so a line the trainer is writing
    right now is left for the next call (the returned offset stops before it).
    Lines that are not JSON objects are skipped. Polling with the returned
    offset reads each byte once, so a 1 s refresh stays cheap on long runs.

    Args:
        run: a run id or a run folder.
        offset: where the previous call stopped (0 for the whole file).
    """
    path = run_path(run) / "metrics.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return MetricsChunk([], 0)
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


class MetricsTail:
    """All metrics of one run so far, kept up to date by reading only what was appended.

    A resumed run re-records the steps after its checkpoint; ``train`` and
    ``eval`` keep the latest record per step so charts do not zig-zag.
    """

    def __init__(self, run: str | os.PathLike):
        self.path = run_path(run)
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self._train: dict[int, dict[str, Any]] = {}
        self._train_sorted: list[dict[str, Any]] = []
        self._dirty = False  # a step was recorded again (resume): re-sort
        self._eval: dict[int, dict[str, Any]] = {}
        self.info: list[dict[str, Any]] = []

    def update(self) -> int:
        """Read what was appended since the last call; returns the number of new records."""
        try:
            size = (self.path / "metrics.jsonl").stat().st_size
        except FileNotFoundError:
            size = 0
        if size < self.offset:  # the file was replaced by a shorter one: start over
            self._reset()
        chunk = read_metrics(self.path, self.offset)
        self.offset = chunk.offset
        for record in chunk.records:
            kind = record.get("type")
            step = record.get("step")
            if kind == "train" and isinstance(step, int):
                self._dirty = self._dirty or step in self._train
                self._train[step] = record
            elif kind == "eval" and isinstance(step, int):
                self._eval[step] = record
            elif kind == "info":
                self.info.append(record)
        return len(chunk.records)

    @property
    def train(self) -> list[dict[str, Any]]:
        """Train records, one per step, by step."""
        if len(self._train_sorted) != len(self._train) or self._dirty:
            self._train_sorted = [self._train[s] for s in sorted(self._train)]
            self._dirty = False
        return self._train_sorted

    @property
    def eval(self) -> list[dict[str, Any]]:
        """Eval records, one per step, by step."""
        return [self._eval[s] for s in sorted(self._eval)]

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


# --- process checks ----------------------------------------------------------


def _reap_children() -> None:
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]


def _process_alive(pid: int | None, create_time: float | None, started_at: float | None) -> bool:
    """Whether ``pid`` is still the run's process (not a zombie, not a recycled pid)."""
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # exists, owned by someone else: cannot prove it is not ours
    if create_time is not None:
        return abs(created - create_time) <= _CREATE_TIME_SLACK_S
    if started_at is not None:
        # no launch record (started from the command line): the process must
        # have existed before it wrote its start time
        return created <= started_at + _CREATE_TIME_SLACK_S
    return True


def _normal_device(device: Any) -> str | None:
    if device is None:
        return None
    text = str(device)
    return "cuda:0" if text == "cuda" else text


# --- run folders -------------------------------------------------------------


def run_path(run: str | os.PathLike) -> Path:
    """The folder of a run given its id (a name under ``runs_dir()``) or its path."""
    path = Path(run)
    if path.is_absolute() or len(path.parts) > 1:
        return path
    return paths.runs_dir() / str(run)


_config_cache: dict[Path, tuple[float, dict[str, Any]]] = {}


def _load_config_dict(path: Path) -> dict[str, Any]:
    # parsed once per change: the runs list is read every second
    file = path / "config.yaml"
    try:
        mtime = file.stat().st_mtime
        cached = _config_cache.get(file)
        if cached and cached[0] == mtime:
            return cached[1]
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    data = data if isinstance(data, dict) else {}
    _config_cache[file] = (mtime, data)
    return data


def _last_records(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Latest train and eval records, from the end of metrics.jsonl only."""
    # the end of the file is enough: a run shows its latest loss, and an eval
    # record further back than this is shown in the live view, not the list
    text = tail_lines(path / "metrics.jsonl", lines=100, max_bytes=32_000)
    train = evaluation = None
    for line in reversed(text.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if train is None and record.get("type") == "train":
            train = record
        elif evaluation is None and record.get("type") == "eval":
            evaluation = record
        if train is not None and evaluation is not None:
            break
    return train, evaluation


def get_run(run: str | os.PathLike) -> RunInfo:
    """Read one run folder and check its process.

    A run recorded as running whose process is gone is returned as ``failed``,
    and that verdict is written to its ``status.json`` so every viewer agrees.

    Raises:
        RunError: the folder is not a run.
    """
    _reap_children()
    path = run_path(run)
    status_file = path / "status.json"
    if not status_file.exists():
        raise RunError(f"{path} is not a training run (no status.json).")
    status = _read_json(status_file)
    launch = _read_json(path / "process.json")
    state = status.get("state") if status.get("state") in STATES else "failed"
    started_at = _as_epoch(status.get("started_at")) or _as_epoch(launch.get("started_at"))
    pid = status.get("pid") or launch.get("pid")
    message = status.get("message")
    log_tail = ""
    if state == "running":
        # the launch record belongs to the pid it names; a trainer started some
        # other way (torchrun, by hand) only has its status pid
        create_time = launch.get("create_time") if launch.get("pid") == pid else None
        updated = _as_epoch(status.get("updated_at")) or started_at or status_file.stat().st_mtime
        launching = not pid and time.time() - updated < _LAUNCH_GRACE_S
        if not launching and not _process_alive(pid, create_time, started_at):
            # read again: the trainer may have written its final state just before exiting
            status = _read_json(status_file)
            if status.get("state") == "running" and launch.get("cancel_requested") and launch.get("pid") == pid:
                # SIGTERM arrived before the trainer was listening for it (still starting up)
                status.update(state="cancelled", updated_at=time.time(),
                              message="Cancelled before the first checkpoint; start it again to train.")
                _write_json_atomic(status_file, status)
            elif status.get("state") == "running":
                log_tail = tail_lines(path / "log.txt")
                last_line = next((ln for ln in reversed(log_tail.splitlines()) if ln.strip()), "")
                message = f"The training process (pid {pid}) stopped without finishing." + (
                    f" Last log line: {last_line.strip()}" if last_line else ""
                )
                status.update(state="failed", message=message, updated_at=time.time())
                _write_json_atomic(status_file, status)
            state = status.get("state", "failed")
            message = status.get("message")
    if state == "failed" and not log_tail:
        log_tail = tail_lines(path / "log.txt")
    config = _load_config_dict(path)
    train, evaluation = _last_records(path)
    total = status.get("total_steps") or (train or {}).get("total_steps")
    return RunInfo(
        id=path.name,
        path=path,
        state=state,
        pid=pid,
        step=int(status.get("step") or (train or {}).get("step") or 0),
        total_steps=int(total) if total else None,
        started_at=started_at,
        updated_at=_as_epoch(status.get("updated_at")),
        message=message,
        device=_normal_device(config.get("device") or launch.get("device")),
        model=config.get("model"),
        method=config.get("method"),
        last_metrics=train,
        last_eval=evaluation,
        log_tail=log_tail,
        config=config,
    )


def list_runs() -> list[RunInfo]:
    """Every run under ``runs_dir()``, newest first, each with its process checked."""
    runs = []
    for path in paths.runs_dir().iterdir():
        if path.is_dir() and (path / "status.json").exists():
            try:
                runs.append(get_run(path))
            except RunError:
                continue
    # newest first by creation (config.yaml is written once, at the start), so a resumed run keeps its place
    runs.sort(key=lambda r: ((r.path / "config.yaml").stat().st_mtime if (r.path / "config.yaml").exists() else 0.0, r.id),
              reverse=True)
    return runs


def running_on(device: Any) -> list[RunInfo]:
    """Runs training right now on ``device`` (``"cuda"`` and ``"cuda:0"`` are the same)."""
    wanted = _normal_device(device)
    return [r for r in list_runs() if r.is_running and r.device == wanted]


def sync_monitor(monitor: Any, all_runs: list[RunInfo] | None = None) -> None:
    """Have a memory monitor sample every running run's process, and stop sampling runs that ended.

    Args:
        monitor: a :class:`mactuner.monitor.MemoryMonitor` (``watched``,
            ``watch_process``, ``unwatch_process``).
        all_runs: the runs as just listed (saves listing them again); None lists them.
    """
    watched = monitor.watched()
    for run in list_runs() if all_runs is None else all_runs:
        if run.is_running and run.pid and run.pid not in watched:
            try:
                monitor.watch_process(run.pid, f"run {run.id}")
            except ValueError:
                pass  # it ended in the meantime
        elif not run.is_running and run.pid in watched:
            monitor.unwatch_process(run.pid)


def _new_run_id(name: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", (name or "run").strip()).strip("-._")[:40] or "run"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    candidate, n = base, 1
    while (paths.runs_dir() / candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _spawn(path: Path, resume: bool, device: str | None) -> int:
    """Start the trainer for ``path`` in the background and record its pid and create time."""
    command = [sys.executable, "-m", "mactuner", "train", str(path / "config.yaml"), "--run-dir", str(path)]
    if resume:
        command.append("--resume")
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # the log is read live
    # the package must be importable from the child whatever the app's cwd is
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(path / "log.txt", "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        # its own session: no signal aimed at the app (Ctrl+C, its process group) reaches it
        child = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[child.pid] = child
    try:
        create_time = psutil.Process(child.pid).create_time()
    except psutil.Error:
        create_time = None  # already gone; get_run will report it failed with its log
    _write_json_atomic(
        path / "process.json",
        {"pid": child.pid, "create_time": create_time, "started_at": time.time(), "device": device, "command": command},
    )
    status = _read_json(path / "status.json")
    if status.get("state") == "running" and not status.get("pid"):
        status["pid"] = child.pid
        _write_json_atomic(path / "status.json", status)
    return child.pid


def _check_device_free(device: str | None, force: bool) -> None:
    busy = running_on(device) if device else []
    if busy and not force:
        run = busy[0]
        raise RunConflict(
            f"Run {run.id} is already training on {run.device} (step {run.step}/{run.total_steps or '?'}). "
            "Two runs on one device share its memory and each goes slower; cancel it first, "
            "or confirm to start anyway.",
            run,
        )


def start_run(config: Any, *, name: str | None = None, force: bool = False) -> RunInfo:
    """Write a new run folder for ``config`` and start training it in the background.

    Returns as soon as the process is started; the run then reports through
    its folder (:func:`get_run`, :class:`MetricsTail`).

    Args:
        config: a ``mactuner.config.TrainConfig`` (anything with ``save(path)``
            and a ``device`` attribute).
        name: a short label for the run id (e.g. the dataset's name).
        force: start even if another run is training on the same device.

    Raises:
        RunConflict: another run is training on the config's device and ``force`` is False.
    """
    device = _normal_device(getattr(config, "device", None))
    _check_device_free(device, force)
    path = paths.runs_dir() / _new_run_id(name)
    path.mkdir(parents=True)
    config.save(path / "config.yaml")
    now = time.time()
    _write_json_atomic(
        path / "status.json",
        {"state": "running", "pid": None, "step": 0, "total_steps": None, "started_at": now, "updated_at": now,
         "message": "Starting…"},
    )
    _spawn(path, resume=False, device=device)
    return get_run(path)


def cancel_run(run: str | os.PathLike, timeout: float | None = None) -> RunInfo:
    """Ask a running run to stop: SIGTERM, on which the trainer saves a checkpoint and records ``cancelled``.

    Args:
        run: the run id or folder.
        timeout: if given, wait up to this many seconds for the process to end.

    Raises:
        RunError: the run is not running.
    """
    info = get_run(run)
    if not info.is_running:
        raise RunError(f"Run {info.id} is not running (it is {info.state}).")
    launch = _read_json(info.path / "process.json")
    if launch.get("pid") == info.pid:
        # remembered so that a trainer killed by the signal while still starting
        # up is reported as cancelled, not failed
        launch["cancel_requested"] = time.time()
        _write_json_atomic(info.path / "process.json", launch)
    if info.pid:
        try:
            os.kill(info.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if timeout is not None and info.pid:
        wait_for_exit(info.pid, timeout)
    return get_run(run)


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to end; True if it did."""
    child = _children.get(pid)
    if child is not None:
        try:
            child.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def checkpoints(run: str | os.PathLike) -> list:
    """The run's complete checkpoints (``mactuner.checkpoints.CheckpointInfo``), oldest first."""
    from mactuner.checkpoints import list_checkpoints

    return sorted(list_checkpoints(run_path(run)), key=lambda c: c.step)


def delete_checkpoint(run: str | os.PathLike, step: int) -> None:
    """Delete one checkpoint of a run that is not training (the trainer prunes its own while it runs).

    Raises:
        RunError: the run is running or has no checkpoint at that step.
    """
    info = get_run(run)
    if info.is_running:
        raise RunError(f"Run {info.id} is training; cancel it before deleting checkpoints.")
    from mactuner.checkpoints import delete_checkpoint as delete_folder

    match = [c for c in checkpoints(info.path) if c.step == step]
    if not match:
        raise RunError(f"Run {info.id} has no checkpoint at step {step}.")
    delete_folder(match[0].path)


def resume_run(run: str | os.PathLike, *, force: bool = False) -> RunInfo:
    """Continue a cancelled or failed run from its last complete checkpoint, in the background.

    Raises:
        RunError: the run is running or finished, or has no complete checkpoint.
        RunConflict: another run trains on the same device and ``force`` is False.
    """
    info = get_run(run)
    if info.state not in ("cancelled", "failed"):
        raise RunError(f"Run {info.id} is {info.state}; only cancelled or failed runs can be resumed.")
    found = checkpoints(info.path)
    if not found:
        raise RunError(f"Run {info.id} has no complete checkpoint to resume from; start it again as a new run.")
    _check_device_free(info.device, force)
    status = _read_json(info.path / "status.json")
    status.update(state="running", pid=None, updated_at=time.time(), message=f"Resuming from step {found[-1].step}…")
    _write_json_atomic(info.path / "status.json", status)
    _spawn(info.path, resume=True, device=info.device)
    return get_run(info.path)


def delete_run(run: str | os.PathLike) -> None:
    """Delete a run folder and everything in it.

    Raises:
        RunError: the run is still training (cancel it first).
    """
    info = get_run(run)
    if info.is_running:
        raise RunError(f"Run {info.id} is still training; cancel it before deleting it.")
    shutil.rmtree(info.path)


def export_adapter_zip(run: str | os.PathLike) -> Path:
    """Zip the run's final adapter into ``exports_dir()`` and return the zip's path.

    The zip holds the files of ``RUN/adapter/`` under a folder named after the
    run, so unpacking it gives a folder that ``PeftModel.from_pretrained`` loads.

    Raises:
        RunError: the run has no final adapter (yet).
    """
    path = run_path(run)
    adapter = path / "adapter"
    if not adapter.is_dir() or not any(adapter.iterdir()):
        raise RunError(f"Run {path.name} has no final adapter; it appears when the run finishes.")
    target = paths.exports_dir() / f"{path.name}-adapter.zip"
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(staging, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(adapter.rglob("*")):
            if file.is_file():
                archive.write(file, Path(f"{path.name}-adapter") / file.relative_to(adapter))
    os.replace(staging, target)
    return target
