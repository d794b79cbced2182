"""Run folders: where a run lives, what state it is in, listing, reconciling, deleting, zipping its adapter.

A run whose status says ``running`` but whose process is gone is reported as ``failed`` with the last lines of
its log. The process is matched by pid *and* create time, so a recycled pid never passes for a live run, and a
trainer that holds the run's lock (:mod:`mactuner.locks`) is alive whatever its pid says. :func:`get_run` only
reads; recording a dead run's verdict is :func:`reconcile_run`'s job (under the launch lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from mactuner import fileio, locks, paths, run_folder, safe_yaml

STATES = ("running", "finished", "failed", "cancelled")
LOG_TAIL_LINES = 20
# a run folder whose status says running but has no process recorded yet is
# being launched; after this long without a process it is considered failed
_LAUNCH_GRACE_S = 30.0
# process create times are derived from boot time and clock ticks: allow jitter
_CREATE_TIME_SLACK_S = 1.0
# seconds a cancelled trainer gets to finish its step and save a checkpoint before it is killed
CANCEL_GRACE_S = 120.0
# the live view keeps about this many points per series; older ones are thinned

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
    # a reader polling every second never sees half a file, and two writers
    # (tabs are threads of one process) never share a temporary file
    fileio.write_json_atomic(path, data)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = fileio.read_regular_json(path, max_bytes=1_000_000)  # never a pipe (it would block), never huge
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
        with fileio.open_regular(path) as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])



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


def new_run_folder(label: str | None = None) -> Path:
    """Create and return a new, empty run folder: ``<YYYYmmdd-HHMMSS>-<label>[-N]`` under ``runs_dir()``.

    The one rule for run-folder names (the fine-tune page and ``mactuner train`` alike). Creating the
    folder is the claim: two processes asking at the same second get different folders.
    """
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{fileio.slug(label or 'run', default='run', max_chars=40)}"
    paths.runs_dir().mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = paths.runs_dir() / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            n += 1
            continue
        run_folder.mark_run_folder(candidate)  # MacTuner's own: a trainer may write there
        return candidate


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
        data = safe_yaml.load_yaml_file(file)
    except (OSError, ValueError):
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


def _current_launch(status: dict[str, Any], launch: dict[str, Any]) -> dict[str, Any]:
    """The launch record if it belongs to the launch the status describes, else ``{}``.

    start/resume write a fresh ``launch_id`` into status.json first and into
    process.json once the process exists: in between, process.json still names
    the previous (dead) launch, which must not be blamed. A status the trainer
    wrote itself carries no launch_id; its own pid decides then.
    """
    wanted = status.get("launch_id")
    if wanted is None or launch.get("launch_id") == wanted:
        return launch
    return {}


@dataclass
class _Verdict:
    state: str
    message: str | None
    pid: int | None
    dead: bool = False  # recorded as running, but its process is gone
    overdue_cancel: bool = False  # cancelled long ago and still alive: to be killed
    log_tail: str = ""


def _judge(path: Path, status: dict[str, Any], launch: dict[str, Any]) -> _Verdict:
    """What a run's files and process say its state is (reads only)."""
    state = status.get("state") if status.get("state") in STATES else "failed"
    current = _current_launch(status, launch)
    pid = status.get("pid") or current.get("pid")
    message = status.get("message")
    if state != "running":
        return _Verdict(state, message, pid)
    started_at = _as_epoch(status.get("started_at")) or _as_epoch(current.get("started_at"))
    # the launch record belongs to the pid it names; a trainer started some
    # other way (torchrun, by hand) only has its status pid
    create_time = current.get("create_time") if current.get("pid") == pid else None
    cancel_at = current.get("cancel_requested") if current.get("pid") == pid else None
    # the pid first: probing the run lock holds it for an instant, and a poll must not
    # collide with a trainer taking it at start-up
    if _process_alive(pid, create_time, started_at) or locks.run_is_locked(path):
        kill_after = current.get("kill_after", CANCEL_GRACE_S)
        overdue = bool(cancel_at) and kill_after is not None and time.time() - cancel_at > kill_after
        return _Verdict("running", message, pid, overdue_cancel=overdue)
    updated = _as_epoch(status.get("updated_at")) or started_at or 0.0
    if not pid and time.time() - updated < _LAUNCH_GRACE_S:
        return _Verdict("running", message, pid)  # being launched
    if cancel_at:
        # SIGTERM came before the trainer listened for it, or it was stopped hard
        found = run_checkpoints(path)
        message = (f"Cancelled; resume continues from the checkpoint of step {found[-1].step}." if found
                   else "Cancelled before the first checkpoint; start it again to train.")
        return _Verdict("cancelled", message, pid, dead=True)
    log_tail = tail_lines(path / "log.txt")
    last_line = next((ln for ln in reversed(log_tail.splitlines()) if ln.strip()), "")
    if pid:
        message = f"The training process (pid {pid}) stopped without finishing."
    else:
        message = "The training process never started."
    message += f" Last log line: {last_line.strip()}" if last_line else ""
    return _Verdict("failed", message, pid, dead=True, log_tail=log_tail)


def _read_state(path: Path) -> tuple[dict[str, Any], dict[str, Any], _Verdict]:
    status_file = path / "status.json"
    if not status_file.is_file():  # missing (deleted meanwhile), or a pipe or folder: not a run's status
        raise RunError(f"{path} is not a training run (no status.json).")
    status = _read_json(status_file)
    launch = _read_json(path / "process.json")
    verdict = _judge(path, status, launch)
    if verdict.dead:
        # read again: the trainer may have written its final state just before exiting
        again = _read_json(status_file)
        if again.get("state") != "running" or again.get("launch_id") != status.get("launch_id"):
            status, launch = again, _read_json(path / "process.json")
            verdict = _judge(path, status, launch)
    return status, launch, verdict


def get_run(run: str | os.PathLike) -> RunInfo:
    """Read one run folder and check its process (reads only: never writes).

    A run recorded as running whose process is gone is returned as ``failed``
    (or ``cancelled`` when a cancel was asked for); :func:`reconcile_run`
    records that verdict so every viewer agrees.

    Raises:
        RunError: the folder is not a run.
    """
    _reap_children()
    path = run_path(run)
    status, launch, verdict = _read_state(path)
    return _info(path, status, launch, verdict)


def _info(path: Path, status: dict[str, Any], launch: dict[str, Any], verdict: _Verdict) -> RunInfo:
    current = _current_launch(status, launch)
    started_at = _as_epoch(status.get("started_at")) or _as_epoch(current.get("started_at"))
    log_tail = verdict.log_tail
    if verdict.state == "failed" and not log_tail:
        log_tail = tail_lines(path / "log.txt")
    config = _load_config_dict(path)
    train, evaluation = _last_records(path)
    total = status.get("total_steps") or (train or {}).get("total_steps")
    return RunInfo(
        id=path.name,
        path=path,
        state=verdict.state,
        pid=verdict.pid,
        step=int(status.get("step") or (train or {}).get("step") or 0),
        total_steps=int(total) if total else None,
        started_at=started_at,
        updated_at=_as_epoch(status.get("updated_at")),
        message=verdict.message,
        device=_normal_device(config.get("device") or launch.get("device")),
        model=config.get("model"),
        method=config.get("method"),
        last_metrics=train,
        last_eval=evaluation,
        log_tail=log_tail,
        config=config,
    )


def _record_verdict(path: Path) -> RunInfo:
    """Record a dead run's verdict and stop an overdue cancel; the caller holds the launch lock."""
    status, launch, verdict = _read_state(path)
    if verdict.overdue_cancel:
        current = _current_launch(status, launch)
        if _hard_stop(verdict.pid, current.get("create_time")):
            wait_for_exit(verdict.pid, 2.0)
        status, launch, verdict = _read_state(path)
    if verdict.dead and status.get("state") == "running":
        status.update(state=verdict.state, message=verdict.message, updated_at=time.time())
        _write_json_atomic(path / "status.json", status)
    return _info(path, status, launch, verdict)


def reconcile_run(run: str | os.PathLike, lock_timeout: float = 2.0) -> RunInfo:
    """Make a run's status.json agree with its process, and return the run as :func:`get_run` does.

    The one place that records a dead run (``failed``, or ``cancelled`` after a
    cancel request) and hard-stops a trainer that outlived its cancel grace
    (SIGKILL). It holds the launch lock, so it never judges a run half-way
    through a (re)launch; when another tab holds the lock for longer than
    ``lock_timeout`` seconds it writes nothing and only reports.
    """
    _reap_children()
    path = run_path(run)
    status, launch, verdict = _read_state(path)
    if status.get("state") != "running" or not (verdict.dead or verdict.overdue_cancel):
        return _info(path, status, launch, verdict)
    try:
        with locks.launch_lock(timeout=lock_timeout):
            return _record_verdict(path)
    except locks.LockBusy:
        return _info(path, status, launch, verdict)
    except OSError as error:
        # a full disk (or a read-only one) must not hide the run: report the verdict, say why it is not
        # recorded; the next listing with room records it
        if not path.is_dir():
            raise RunError(f"{path} was deleted meanwhile.") from None
        verdict.message = (f"{verdict.message or ''} MacTuner could not record this in status.json: "
                           f"{error.strerror or error}.").strip()
        return _info(path, status, launch, verdict)


def list_runs() -> list[RunInfo]:
    """Every run under ``runs_dir()``, newest first, each reconciled with its process (:func:`reconcile_run`)."""
    return _list_runs(lambda path: reconcile_run(path))


def _list_runs(read) -> list[RunInfo]:
    runs = []
    try:
        entries = list(paths.runs_dir().iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        # hidden names are folders being deleted; links are not MacTuner's own runs
        if not path.name.startswith(".") and path.is_dir() and not path.is_symlink() and (path / "status.json").is_file():
            try:
                runs.append(read(path))
            except (RunError, FileNotFoundError):
                continue  # not a run, or deleted while it was read (another tab, a person)

    def created(run: RunInfo) -> float:
        try:
            return (run.path / "config.yaml").stat().st_mtime
        except OSError:
            return 0.0

    # newest first by creation (config.yaml is written once, at the start), so a resumed run keeps its place
    runs.sort(key=lambda r: (created(r), r.id), reverse=True)
    return runs


def running_on(device: Any) -> list[RunInfo]:
    """Runs training right now on ``device`` (``"cuda"`` and ``"cuda:0"`` are the same)."""
    wanted = _normal_device(device)
    return [r for r in list_runs() if r.is_running and r.device == wanted]


def sync_monitor(monitor: Any, all_runs: list[RunInfo] | None = None) -> None:
    """Have a memory monitor sample every running run's process, and stop sampling runs that ended.

    Args:
        monitor: a :class:`mactuner.devices.monitor.MemoryMonitor` (``watched``,
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



def run_checkpoints(run: str | os.PathLike) -> list:
    """The run's complete checkpoints (``mactuner.checkpoints.CheckpointInfo``), oldest first."""
    from mactuner.checkpoints import list_checkpoints

    return sorted(list_checkpoints(run_path(run)), key=lambda c: c.step)


def _own_run_folder(run: str | os.PathLike) -> Path:
    """A run folder that MacTuner may change: a real folder directly inside ``runs_dir()``.

    Raises:
        RunError: ``run`` is a symlink, or resolves outside ``runs_dir()``
            (``../../x``, an absolute path elsewhere).
    """
    path = run_path(run)
    root = paths.runs_dir().resolve()
    if path.is_symlink():
        raise RunError(f"{path} is a symbolic link, not a run folder; MacTuner does not change what it points to.")
    if path.resolve().parent != root:
        raise RunError(f"{run} is not a run under {root}; MacTuner only changes its own run folders.")
    return path


def delete_checkpoint(run: str | os.PathLike, step: int) -> None:
    """Delete one checkpoint of a run that is not training (the trainer prunes its own while it runs).

    Raises:
        RunError: the run is running, outside ``runs_dir()``, or has no checkpoint at that step.
    """
    path = _own_run_folder(run)
    info = reconcile_run(path)
    if info.is_running:
        raise RunError(f"Run {info.id} is training; cancel it before deleting checkpoints.")
    from mactuner.checkpoints import delete_checkpoint as delete_folder

    match = [c for c in run_checkpoints(info.path) if c.step == step]
    if not match:
        raise RunError(f"Run {info.id} has no checkpoint at step {step}.")
    delete_folder(match[0].path)



def delete_run(run: str | os.PathLike) -> None:
    """Delete a run folder and everything in it.

    Only a real folder directly inside ``runs_dir()`` is deleted: ids such as
    ``../../x``, absolute paths elsewhere and symbolic links are refused.

    Raises:
        RunError: the run is still training (cancel it first), or is not one of MacTuner's run folders.
    """
    path = _own_run_folder(run)
    with _launching():  # no resume can start in it while it goes
        info = _record_verdict(path)
        if info.is_running or locks.run_is_locked(path):
            raise RunError(f"Run {info.id} is still training; cancel it before deleting it.")
        # renamed first: a half-deleted folder is never listed as a run
        trash = path.with_name(f"{fileio.STAGING_PREFIX}deleting-{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _regular_files(folder: Path) -> list[Path]:
    """Regular files under ``folder``, sorted; symbolic links (to files or folders) are skipped, never followed."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
        for name in files:
            file = Path(root, name)
            try:
                mode = os.lstat(file).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode):
                found.append(file)
    return sorted(found)


def export_adapter_zip(run: str | os.PathLike) -> Path:
    """Zip the run's final adapter into ``exports_dir()`` and return the zip's path.

    The zip holds the files of ``RUN/adapter/`` under a folder named after the
    run, so unpacking it gives a folder that ``PeftModel.from_pretrained`` loads.
    Only regular files are packed: a symbolic link inside the adapter folder is
    skipped (its target's content never leaves the machine this way). Each call
    writes its own temporary file, so downloads from several tabs at once never
    trip over each other.

    Raises:
        RunError: the run has no final adapter (yet), or its adapter folder is a symbolic link.
    """
    path = run_path(run)
    adapter = path / "adapter"
    if adapter.is_symlink():
        raise RunError(f"{adapter} is a symbolic link; MacTuner only exports an adapter folder it wrote.")
    files = _regular_files(adapter) if adapter.is_dir() else []
    if not files:
        raise RunError(f"Run {path.name} has no final adapter; it appears when the run finishes.")
    target = paths.exports_dir() / f"{path.name}-adapter.zip"
    with fileio.atomic_open(target, "wb") as handle, zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            try:
                # O_NOFOLLOW: a file swapped for a link after the walk is refused, not followed
                fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            with os.fdopen(fd, "rb") as source:
                if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
                    continue
                info = zipfile.ZipInfo.from_file(file, Path(f"{path.name}-adapter") / file.relative_to(adapter))
                info.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(info, "w") as dest:
                    shutil.copyfileobj(source, dest, 1 << 20)
    return target


# --- stopping processes ------------------------------------------------------


@contextlib.contextmanager
def _launching():
    """The launch lock, with a busy lock reported as a RunError (the page shows it)."""
    try:
        with locks.launch_lock():
            yield
    except locks.LockBusy as exc:
        raise RunError(str(exc)) from exc


def _hard_stop(pid: int | None, create_time: float | None) -> bool:
    """SIGKILL the trainer ``pid`` (its whole session) if it still is the process created at ``create_time``."""
    if not pid or not _process_alive(pid, create_time, None):
        return False
    try:
        if os.getpgid(pid) == pid:  # the trainer leads its own session: take its helpers too
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


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
