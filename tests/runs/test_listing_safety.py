"""Issue 21, the rows about listing runs: a full disk (row 10), a named pipe planted as a
run's files (row 11), and files that vanish while the list is drawn (row 13). Each test
works on its own temporary MACTUNER_HOME."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from mactuner import checkpoints, fileio, paths, runs
from mactuner.runs import views as run_views


def run_folder(run_id: str, state: str = "finished", **status):
    path = paths.runs_dir() / run_id
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model: tiny\ndevice: cpu\n")
    fileio.write_json_atomic(path / "status.json", {"state": state, "pid": None, "step": 1, "total_steps": 2, **status})
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- row 10: the runs list on a full disk ----------------------------------------------------------------


def test_the_runs_list_on_a_full_disk_shows_the_run_and_the_reason(monkeypatch):
    run_folder("dead", state="running", pid=dead_pid(), started_at=time.time() - 600, updated_at=time.time() - 600)
    run_folder("done")
    with monkeypatch.context() as full:
        full.setattr(os, "fsync", no_space)  # every atomic write fails as on a full disk
        listed = {r.id: r for r in runs.list_runs()}
    assert set(listed) == {"dead", "done"}
    assert listed["dead"].state == "failed" and "No space left on device" in listed["dead"].message
    # nothing could be recorded: it is reported again next time, and recorded once there is room
    assert fileio.read_regular_json(paths.runs_dir() / "dead" / "status.json")["state"] == "running"
    assert {r.id: r.state for r in runs.list_runs()}["dead"] == "failed"
    assert fileio.read_regular_json(paths.runs_dir() / "dead" / "status.json")["state"] == "failed"


def test_the_runs_tab_on_a_full_disk_draws_the_run_not_a_traceback(monkeypatch):
    from tests.app_pages import open_app_page

    run_folder("dead", state="running", pid=dead_pid(), started_at=time.time() - 600, updated_at=time.time() - 600)
    monkeypatch.setattr(os, "fsync", no_space)
    at = open_app_page("pages/finetune.py")
    at.session_state["finetune_tab"] = "Runs"  # as a click on the tab does
    at.run()
    assert not at.exception, at.exception
    shown = " ".join(str(e.value) for e in at.error) + " ".join(str(c.value) for c in at.caption)
    assert "No space left on device" in shown


# --- row 11: a named pipe as a run's file never blocks the list -------------------------------------------


def test_a_named_pipe_as_status_or_any_run_file_does_not_block_the_list():
    run_folder("ok")
    for name in ("status.json", "process.json", "config.yaml", "metrics.jsonl", "log.txt", "name.json", "eval.json"):
        path = run_folder(f"pipe-{name.split('.')[0]}", state="failed")
        (path / name).unlink(missing_ok=True)
        os.mkfifo(path / name)
    result: dict = {}

    def listing():
        try:
            found = runs.list_runs()
            result["ids"] = sorted(r.id for r in found)
            result["rows"] = run_views.runs_table(found)
            result["labels"] = [run_views.run_label(r) for r in found]
            result["metrics"] = [len(runs.MetricsTail(r.path).eval) + runs.MetricsTail(r.path).update() for r in found]
        except Exception as error:  # noqa: BLE001 - reported below
            result["error"] = error

    thread = threading.Thread(target=listing, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the runs list blocked on a named pipe"
    assert "error" not in result, result.get("error")
    # a status.json that is a pipe is not a run's status: that folder is left out, the rest is listed
    assert "ok" in result["ids"] and "pipe-status" not in result["ids"] and len(result["ids"]) == 7


def test_reading_a_named_pipe_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError, match="not a regular file"):
        fileio.read_regular_bytes(tmp_path / "pipe")
    (tmp_path / "file").write_bytes(b"x" * 100)
    assert fileio.read_regular_bytes(tmp_path / "file") == b"x" * 100
    with pytest.raises(OSError, match="larger than"):
        fileio.read_regular_bytes(tmp_path / "file", max_bytes=10)


# --- row 13: files vanish while the list is drawn -------------------------------------------------------------


def checkpoint(run_path, step: int):
    folder = run_path / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / checkpoints.STATE_JSON).write_text('{"loss": 1.0}')
    (folder / checkpoints.STATE_TENSORS).write_bytes(b"\0" * 64)
    for n in range(20):
        (folder / f"part-{n}.bin").write_bytes(b"\0" * 16)


def test_listing_runs_while_checkpoints_runs_and_folders_vanish():
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn():
        n = 0
        while not stop.is_set():
            n += 1
            path = run_folder(f"run-{n}")
            for step in range(1, 4):
                checkpoint(path, step)
            (path / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 1.0}\n')
            (path / "name.json").write_text('{"name": "x"}')
            shutil.rmtree(path / "checkpoints" / "step-00000001")  # a prune, the plain way
            checkpoints.prune_checkpoints(path, 1)
            if n % 2:
                runs.delete_run(path.name)
            else:
                shutil.rmtree(path)  # removed behind MacTuner's back

    def redraw():
        while not stop.is_set():
            try:
                found = runs.list_runs()
                run_views.runs_table(found)
                for run in found:
                    run_views.run_label(run)
                    runs.run_checkpoints(run.path)
                    run_views.checkpoint_table(runs.run_checkpoints(run.path))
                    runs.MetricsTail(run.path).update()
            except BaseException as error:  # noqa: BLE001 - collected and reported
                errors.append(error)

    workers = [threading.Thread(target=churn), threading.Thread(target=redraw), threading.Thread(target=redraw)]
    for worker in workers:
        worker.start()
    time.sleep(20)
    stop.set()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors[:5]]
