"""Background runs: run folders read back right, dead and recycled processes
caught, metrics tailed incrementally, one run per device, and real trainer
processes started, cancelled into a checkpoint, resumed and exported."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from mactuner import paths, runs


def make_run(
    run_id: str,
    state: str,
    *,
    pid: int | None = None,
    create_time: float | None = None,
    device: str = "cpu",
    metrics: list[dict] | None = None,
    log: str = "",
    step: int = 0,
    total_steps: int | None = 10,
) -> Path:
    """A run folder as the trainer leaves it (status, config, metrics, log)."""
    path = paths.runs_dir() / run_id
    path.mkdir(parents=True)
    now = time.time()
    status = {"state": state, "pid": pid, "step": step, "total_steps": total_steps,
              "started_at": now - 60, "updated_at": now, "message": None}
    (path / "status.json").write_text(json.dumps(status))
    (path / "config.yaml").write_text(f"model: tiny\ndataset: demo.jsonl\nmethod: lora\ndevice: {device}\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics or []))
    (path / "log.txt").write_text(log)
    if pid is not None:
        (path / "process.json").write_text(json.dumps({"pid": pid, "create_time": create_time}))
    return path


def train_record(step: int, loss: float, t: float, total: int = 10) -> dict:
    return {"type": "train", "step": step, "total_steps": total, "loss": loss, "lr": 1e-4, "grad_norm": 1.0,
            "tokens_per_second": 100.0, "tokens": 64 * step, "memory_bytes": 1_000_000 + step, "time": t}


@pytest.fixture(autouse=True)
def stop_left_runs():
    """A test that fails half-way leaves no trainer running behind it."""
    yield
    for run in runs.list_runs():
        if run.is_running and run.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGKILL)


@pytest.fixture
def sleeper():
    """A live process standing in for a trainer whose pid a run folder names."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def test_finished_run_reads_back_with_its_last_metrics():
    metrics = [train_record(s, 3.0 - 0.1 * s, 1000.0 + s) for s in range(1, 11)] + [
        {"type": "eval", "step": 10, "val_loss": 2.5, "time": 1011.0}
    ]
    make_run("r1", "finished", pid=999_999, step=10, metrics=metrics)
    [info] = runs.list_runs()
    assert (info.id, info.state, info.step, info.total_steps, info.device) == ("r1", "finished", 10, 10, "cpu")
    assert info.last_metrics["step"] == 10 and info.last_metrics["loss"] == pytest.approx(2.0)
    assert info.last_eval["val_loss"] == 2.5
    assert info.progress == 1.0


def test_running_run_whose_process_died_is_failed_with_its_log_tail():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    log = "".join(f"line {i}\n" for i in range(50)) + "RuntimeError: boom\n"
    make_run("r2", "running", pid=dead.pid, create_time=time.time() - 5, log=log)
    info = runs.get_run("r2")
    assert info.state == "failed"
    assert "RuntimeError: boom" in info.message and str(dead.pid) in info.message
    assert info.log_tail.splitlines()[-1] == "RuntimeError: boom"
    assert len(info.log_tail.splitlines()) == runs.LOG_TAIL_LINES
    status_file = paths.runs_dir() / "r2" / "status.json"
    # get_run only reads; the runs list records the verdict, so every tab and a restarted app agree
    assert json.loads(status_file.read_text())["state"] == "running"
    [listed] = runs.list_runs()
    assert listed.state == "failed" and json.loads(status_file.read_text())["state"] == "failed"


def test_recycled_pid_is_not_taken_for_the_run(sleeper):
    # the pid is alive but belongs to a process created long after the run's own
    real = psutil.Process(sleeper.pid).create_time()
    make_run("old", "running", pid=sleeper.pid, create_time=real - 3600)
    make_run("live", "running", pid=sleeper.pid, create_time=real)
    states = {r.id: r.state for r in runs.list_runs()}
    assert states == {"old": "failed", "live": "running"}


def test_run_started_elsewhere_is_checked_against_its_start_time(sleeper):
    # no process.json (a trainer started from the command line): the process
    # must be older than the status's started_at
    path = make_run("cli", "running", pid=sleeper.pid)
    (path / "process.json").unlink()
    status = json.loads((path / "status.json").read_text())
    for started_at, state in [(time.time(), "running"), (psutil.Process(sleeper.pid).create_time() - 600, "failed")]:
        status["started_at"] = started_at
        (path / "status.json").write_text(json.dumps(status))
        assert runs.get_run("cli").state == state


def test_a_run_being_launched_is_not_failed_yet():
    make_run("launching", "running", pid=None)
    assert runs.get_run("launching").state == "running"


def test_read_metrics_is_incremental_and_leaves_a_half_written_line():
    path = make_run("m", "running", metrics=[train_record(1, 3.0, 1.0)])
    chunk = runs.read_metrics("m")
    assert [r["step"] for r in chunk.records] == [1]
    with open(path / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(train_record(2, 2.9, 2.0)) + "\n")
        handle.write('{"type": "train", "step": 3, "lo')  # the trainer is mid-write
    chunk2 = runs.read_metrics("m", chunk.offset)
    assert [r["step"] for r in chunk2.records] == [2]
    with open(path / "metrics.jsonl", "a") as handle:
        handle.write('ss": 2.8, "time": 3.0}\nnot json\n')
    chunk3 = runs.read_metrics("m", chunk2.offset)
    assert [r["step"] for r in chunk3.records] == [3]
    assert chunk3.offset == (path / "metrics.jsonl").stat().st_size
    assert runs.read_metrics("m", chunk3.offset).records == []


def test_metrics_tail_keeps_latest_record_per_step_across_a_resume():
    path = make_run("t", "running", metrics=[train_record(s, 3.0 - 0.1 * s, 100.0 + s) for s in range(1, 6)])
    tail = runs.MetricsTail("t")
    assert tail.update() == 5
    # resumed from the step-3 checkpoint: steps 4 and 5 are recorded again, later
    with open(path / "metrics.jsonl", "a") as handle:
        for s in range(4, 8):
            handle.write(json.dumps(train_record(s, 1.0, 500.0 + 2 * s)) + "\n")
        handle.write(json.dumps({"type": "eval", "step": 7, "val_loss": 1.5, "time": 515.0}) + "\n")
    assert tail.update() == 5
    assert [r["step"] for r in tail.train] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in tail.train][3:] == [1.0, 1.0, 1.0, 1.0]
    assert [r["step"] for r in tail.eval] == [7]
    # the ETA uses the resumed session's pace (2 s a step), not the gap across the resume
    assert runs.eta_seconds(tail.train, 10, since=500.0) == pytest.approx(6.0)
    assert runs.eta_seconds(tail.train, 10) == pytest.approx(3 * (514 - 101) / 6)
    assert tail.update() == 0


def test_eta_and_duration_formatting():
    assert runs.eta_seconds([], 10) is None
    assert runs.eta_seconds([train_record(1, 1, 0.0)], 10) is None
    assert runs.eta_seconds([train_record(1, 1, 0.0), train_record(3, 1, 4.0)], 103) == pytest.approx(200.0)
    assert runs.format_duration(None) == "–"
    assert runs.format_duration(42.4) == "42 s"
    assert runs.format_duration(185) == "3 min 05 s"
    assert runs.format_duration(3720) == "1 h 02 min"


def test_delete_refuses_a_running_run_and_removes_a_finished_one(sleeper):
    make_run("busy", "running", pid=sleeper.pid, create_time=psutil.Process(sleeper.pid).create_time())
    make_run("done", "finished")
    with pytest.raises(runs.RunError, match="still training"):
        runs.delete_run("busy")
    runs.delete_run("done")
    assert [r.id for r in runs.list_runs()] == ["busy"]


def test_export_adapter_zip_holds_the_adapter_folder():
    path = make_run("z", "finished")
    with pytest.raises(runs.RunError, match="no final adapter"):
        runs.export_adapter_zip("z")
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_config.json").write_text("{}")
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    with zipfile.ZipFile(runs.export_adapter_zip("z")) as archive:
        assert sorted(archive.namelist()) == ["z-adapter/adapter_config.json", "z-adapter/adapter_model.safetensors"]


# --- real trainer processes ----------------------------------------------------


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def tiny_config(model_dir: Path, **changes):
    from mactuner.config import TrainConfig
    from mactuner.data import DEMO_DATASETS

    values = dict(model=str(model_dir), dataset=str(DEMO_DATASETS["quenmark-alpaca"]), device="cpu",
                  batch_size=4, max_length=128, save_every=0, eval_every=0, log_every=1, compile="off")
    values.update(changes)
    return TrainConfig(**values)


def test_background_runs_with_a_real_trainer(tiny_model_dir):
    run = runs.start_run(tiny_config(tiny_model_dir, max_steps=400), name="demo data")
    # start_run returns while the trainer is still setting up (how fast is bench/'s business, not a test's)
    assert run.state == "running" and run.id.endswith("demo-data") and runs.get_run(run.id).step in (None, 0)
    assert (run.path / "config.yaml").exists() and (run.path / "log.txt").exists()

    # a second run on the same device is refused, naming the first…
    with pytest.raises(runs.RunConflict, match=run.id) as refused:
        runs.start_run(tiny_config(tiny_model_dir, max_steps=2))
    assert refused.value.running.id == run.id
    assert len(runs.list_runs()) == 1
    # …unless confirmed; that one finishes beside the first, with a downloadable adapter
    second = runs.start_run(tiny_config(tiny_model_dir, max_steps=2), force=True)
    assert runs.wait_for_exit(second.pid, 120)
    done = runs.get_run(second.id)
    assert done.state == "finished" and done.step == done.total_steps == 2, done.log_tail
    with zipfile.ZipFile(runs.export_adapter_zip(second.id)) as archive:
        assert f"{second.id}-adapter/adapter_config.json" in archive.namelist()
    with pytest.raises(runs.RunError, match="only cancelled or failed"):
        runs.resume_run(second.id)

    # cancel: the trainer saves a checkpoint at the step it stopped at
    tail = runs.MetricsTail(run.id)
    wait_until(lambda: tail.update() >= 0 and len(tail.train) >= 3, 90, "three train records")
    cancelled = runs.cancel_run(run.id, timeout=60)
    assert cancelled.state == "cancelled", cancelled.log_tail
    [*_, checkpoint] = runs.run_checkpoints(run.id)
    assert checkpoint.step == cancelled.step >= 3
    with pytest.raises(runs.RunError, match="not running"):
        runs.cancel_run(run.id)

    # resume continues from that checkpoint, not from step 1
    resumed = runs.resume_run(run.id)
    assert resumed.state == "running"
    wait_until(lambda: tail.update() >= 0 and tail.train[-1]["step"] > checkpoint.step + 1, 90, "resumed steps")
    runs.cancel_run(run.id, timeout=60)
    final = runs.get_run(run.id)
    assert final.state == "cancelled" and final.step > checkpoint.step
    resumed_steps = [r["step"] for r in tail.train if r["time"] >= final.started_at]
    assert resumed_steps[0] == checkpoint.step + 1
    assert runs.eta_seconds(tail.train, final.total_steps, since=final.started_at) > 0


def test_cancel_while_the_trainer_starts_up_is_cancelled_not_failed(tiny_model_dir):
    run = runs.start_run(tiny_config(tiny_model_dir, max_steps=400))
    cancelled = runs.cancel_run(run.id, timeout=60)  # long before the first step
    assert cancelled.state == "cancelled", (cancelled.message, cancelled.log_tail)
    assert runs.run_checkpoints(run.id) == []
    with pytest.raises(runs.RunError, match="no complete checkpoint"):
        runs.resume_run(run.id)


def test_series_are_thinned_for_charts_but_keep_the_latest_point():
    make_run("long", "running", metrics=[train_record(s, 1.0 / s, float(s)) for s in range(1, 2501)])
    tail = runs.MetricsTail("long")
    tail.update()
    steps, losses = tail.series("loss", max_points=1000)
    assert 800 <= len(steps) <= 1001 and steps[0] == 1 and steps[-1] == 2500
    assert losses[-1] == pytest.approx(1 / 2500)
    # the tail itself is bounded: older steps thinned, the newest half kept whole
    all_steps = tail.series("loss")[0]
    assert len(all_steps) <= runs.TAIL_MAX_POINTS and all_steps[0] == 1 and all_steps[-1] == 2500
    assert all_steps[-runs.TAIL_MAX_POINTS // 2 :] == list(range(2501 - runs.TAIL_MAX_POINTS // 2, 2501))
    seconds, mib = tail.memory_series(max_points=100)
    assert seconds[0] == 0.0 and seconds[-1] == 2499.0 and len(seconds) <= 101


def test_sync_monitor_watches_running_runs_and_drops_ended_ones(sleeper):
    from mactuner.devices import DeviceManager
    from mactuner.devices.monitor import MemoryMonitor

    monitor = MemoryMonitor(DeviceManager(), interval=60)  # not started: sampled by hand below
    make_run("live", "running", pid=sleeper.pid, create_time=psutil.Process(sleeper.pid).create_time())
    runs.sync_monitor(monitor)
    assert monitor.watched() == {sleeper.pid: "run live"}
    monitor.sample_once()
    assert monitor.process_history(sleeper.pid)[sleeper.pid][-1].rss > 0
    sleeper.kill()
    sleeper.wait()
    runs.sync_monitor(monitor)  # the run is now failed: its process is no longer watched
    assert monitor.watched() == {}
