"""Starting, resuming and cancelling the background trainer process of a run.

:func:`start_run` and :func:`resume_run` hold :func:`mactuner.locks.launch_lock` across "check the device is free,
then launch": one run per device across tabs and processes. :func:`cancel_run` sends SIGTERM (the trainer saves a
checkpoint and stops); a trainer still alive ``kill_after`` seconds later is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

import mactuner
from mactuner import fileio, fingerprint, locks
from mactuner.runs.store import (  # the package's own helpers
    CANCEL_GRACE_S,
    RunConflict,
    RunError,
    RunInfo,
    _children,
    _current_launch,
    _hard_stop,
    _launching,
    _list_runs,
    _load_config_dict,
    _normal_device,
    _read_json,
    _record_verdict,
    _write_json_atomic,
    get_run,
    new_run_folder,
    reconcile_run,
    run_checkpoints,
    run_path,
    wait_for_exit,
)


def package_root() -> Path:
    """The folder that holds the imported ``mactuner`` package: the trainer runs there, so it imports this same code."""
    return Path(mactuner.__file__).resolve().parent.parent


def _spawn(path: Path, resume: bool, device: str | None, launch_id: str) -> int:
    """Start the trainer for ``path`` in the background and record its pid and create time."""
    command = [sys.executable, "-m", "mactuner", "train", str(path / "config.yaml"), "--run-dir", str(path)]
    if resume:
        command.append("--resume")
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # the log is read live
    with open(path / "log.txt", "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        # `python -m` puts its working folder first on sys.path: started in the folder that
        # holds this package, the child imports the same mactuner as the app, with no
        # PYTHONPATH set. Its own session: no signal aimed at the app (Ctrl+C) reaches it.
        child = subprocess.Popen(
            command,
            cwd=package_root(),
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
        {"pid": child.pid, "create_time": create_time, "started_at": time.time(), "device": device,
         "command": command, "launch_id": launch_id},
    )
    status = _read_json(path / "status.json")
    if status.get("state") == "running" and not status.get("pid") and status.get("launch_id") == launch_id:
        status["pid"] = child.pid
        _write_json_atomic(path / "status.json", status)
    return child.pid




def _check_device_free(device: str | None, force: bool, exclude: Path | None = None) -> None:
    """Refuse when another run trains on ``device``; the caller holds the launch lock."""
    if not device:
        return
    busy = [r for r in _list_runs(_record_verdict) if r.is_running and r.device == device and r.path != exclude]
    if busy and not force:
        run = busy[0]
        raise RunConflict(
            f"Run {run.id} is already training on {run.device} (step {run.step}/{run.total_steps or '?'}). "
            "Two runs on one device share its memory and each goes slower; cancel it first, "
            "or confirm to start anyway.",
            run,
        )


def _absolute_paths(config: Any) -> Any:
    """The config with its dataset (and a local model folder) as absolute paths: the trainer runs elsewhere."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return config
    changes = {}
    for name in ("dataset", "model"):
        value = getattr(config, name, None)
        if isinstance(value, str) and value and not Path(value).is_absolute() and Path(value).exists():
            changes[name] = str(Path(value).resolve())
    return dataclasses.replace(config, **changes) if changes else config


def start_run(config: Any, *, name: str | None = None, force: bool = False) -> RunInfo:
    """Write a new run folder for ``config`` and start training it in the background.

    Returns as soon as the process is started; the run then reports through
    its folder (:func:`get_run`, :class:`MetricsTail`). "Is the device free?" and
    the launch happen under the launch lock: of two tabs (or processes) pressing
    Start at once, one starts and the other gets :class:`RunConflict`.

    Args:
        config: a ``mactuner.config.TrainConfig`` (anything with ``save(path)``,
            ``to_dict()`` and a ``device`` attribute).
        name: a short label for the run id (e.g. the dataset's name).
        force: start even if another run is training on the same device.

    Raises:
        RunConflict: another run is training on the config's device and ``force`` is False.
    """
    config = _absolute_paths(config)
    device = _normal_device(getattr(config, "device", None))
    prints = fingerprint.compute(config)  # hashing the dataset is done before taking the lock
    with _launching():
        _check_device_free(device, force)
        path = new_run_folder(name)
        config.save(path / "config.yaml")
        fileio.write_json_atomic(path / fingerprint.FINGERPRINT_FILE, prints)
        now = time.time()
        launch_id = uuid.uuid4().hex
        _write_json_atomic(
            path / "status.json",
            {"state": "running", "pid": None, "step": 0, "total_steps": None, "started_at": now, "updated_at": now,
             "message": "Starting…", "launch_id": launch_id},
        )
        _spawn(path, resume=False, device=device, launch_id=launch_id)
    return get_run(path)




def cancel_run(run: str | os.PathLike, timeout: float | None = None, *, kill_after: float = CANCEL_GRACE_S) -> RunInfo:
    """Ask a running run to stop: SIGTERM, on which the trainer saves a checkpoint and records ``cancelled``.

    A trainer still alive ``kill_after`` seconds later is stopped hard
    (SIGKILL): by this call when it waits that long, else by the next
    :func:`reconcile_run` (every runs list does one). A hard stop keeps every
    complete checkpoint (they are renamed into place only when whole); the run
    is recorded ``cancelled`` and resumes from the last one.

    Args:
        run: the run id or folder.
        timeout: if given, wait up to this many seconds for the process to end.
        kill_after: seconds of grace (its current step and a checkpoint) before SIGKILL.

    Raises:
        RunError: the run is not running.
    """
    path = run_path(run)
    with _launching():
        info = get_run(path)
        if not info.is_running:
            raise RunError(f"Run {info.id} is not running (it is {info.state}).")
        status = _read_json(path / "status.json")
        launch = _read_json(path / "process.json")
        current = _current_launch(status, launch)
        create_time = current.get("create_time")
        if current and current.get("pid") == info.pid:
            # remembered so that a trainer killed by the signal while still starting
            # up, or stopped hard, is reported as cancelled, not failed
            current.update(cancel_requested=time.time(), kill_after=kill_after)
            _write_json_atomic(path / "process.json", current)
        if info.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, signal.SIGTERM)
    if timeout is not None and info.pid:
        if not wait_for_exit(info.pid, min(timeout, kill_after)) and kill_after <= timeout:
            _hard_stop(info.pid, create_time)
            wait_for_exit(info.pid, max(1.0, timeout - kill_after))
    return reconcile_run(path)





def resume_run(run: str | os.PathLike, *, force: bool = False) -> RunInfo:
    """Continue a cancelled or failed run from its last complete checkpoint, in the background.

    Under the launch lock: the run must not be held by a trainer
    (:func:`mactuner.locks.run_is_locked`) nor be running, its dataset and
    settings must be those it started with (:func:`mactuner.fingerprint.check`),
    and the device must be free (unless ``force``). A stale cancel request of the
    previous launch is cleared, so it is never applied to the new one.

    Raises:
        RunError: the run is running or finished, has no complete checkpoint, or its
            dataset or settings changed (the message names what).
        RunConflict: another run trains on the same device and ``force`` is False.
    """
    path = run_path(run)
    with _launching():
        info = _record_verdict(path)
        if locks.run_is_locked(path):
            raise RunError(f"Run {info.id} is held by a trainer right now; wait for it to stop before resuming.")
        if info.state not in ("cancelled", "failed"):
            raise RunError(f"Run {info.id} is {info.state}; only cancelled or failed runs can be resumed.")
        found = run_checkpoints(path)
        if not found:
            raise RunError(f"Run {info.id} has no complete checkpoint to resume from; start it again as a new run.")
        try:
            fingerprint.check(path, _load_config_dict(path))
        except fingerprint.FingerprintMismatch as exc:
            raise RunError(str(exc)) from None
        _check_device_free(info.device, force, exclude=path)
        launch = _read_json(path / "process.json")
        if launch.pop("cancel_requested", None) is not None:
            launch.pop("kill_after", None)
            _write_json_atomic(path / "process.json", launch)
        launch_id = uuid.uuid4().hex
        status = _read_json(path / "status.json")
        status.update(state="running", pid=None, updated_at=time.time(), launch_id=launch_id,
                      message=f"Resuming from step {found[-1].step}…")
        _write_json_atomic(path / "status.json", status)
        _spawn(path, resume=True, device=info.device, launch_id=launch_id)
    return get_run(path)
