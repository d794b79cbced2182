"""Issue 9, the runs rows: one run per device and one trainer per run folder across
tabs (threads) and processes, a resume that never blames the previous launch,
resume refusing changed data, polls and downloads that never trip over each
other, and a cancel that ends in a hard stop keeping what was saved.

Every concurrency test runs with threads (tabs of one app) and with real
processes (two apps, or the command line beside the app); the run folders come
from the real trainer.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from mactuner import checkpoints, fileio, fingerprint, paths, runs
from mactuner.config import TrainConfig
from tests.locations import ROOT
from tests.train_support import tiny_config, write_fact_dataset


@pytest.fixture(autouse=True)
def stop_left_runs():
    """No trainer outlives its test."""
    yield
    for run in runs.store._list_runs(runs.get_run):
        # alive, verified to be the run's own process, and not this test process (some tests write its pid)
        if run.is_running and run.pid and run.pid != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGKILL)


def long_config(model_dir: Path, dataset: Path, **changes) -> TrainConfig:
    # long enough that a started trainer is still training when the test looks
    return tiny_config(model_dir, dataset, max_steps=400, val_fraction=0.0, **changes)


@pytest.fixture(scope="session")
def cancelled_run_template(tiny_model_dir, tmp_path_factory):
    """A run folder left by the real trainer: cancelled after step 2 with a complete checkpoint."""
    from mactuner.train import Trainer, TrainingCallback

    folder = tmp_path_factory.mktemp("cancelled-run")
    dataset = write_fact_dataset(folder / "facts.jsonl")
    run_dir = folder / "template"

    class StopAfterTwo(TrainingCallback):
        def on_train_report(self, info):
            if info["step"] >= 2:
                trainer.request_stop()

    trainer = Trainer(long_config(tiny_model_dir, dataset), run_dir=run_dir, callbacks=[StopAfterTwo()])
    result = trainer.run()
    assert result.state == "cancelled" and [c.step for c in checkpoints.list_checkpoints(run_dir)] == [2]
    return run_dir


def resumable_run(template: Path, tmp_path: Path, run_id: str = "20260101-000000-facts") -> Path:
    """A copy of the cancelled run under this test's runs_dir(), with its own dataset file and a
    process.json of its previous launch: a dead pid that had been asked to cancel."""
    path = paths.runs_dir() / run_id
    shutil.copytree(template, path)
    dataset = write_fact_dataset(tmp_path / f"{run_id}.jsonl")
    config = TrainConfig.load(path / "config.yaml")
    config.dataset = str(dataset)
    config.save(path / "config.yaml")
    fingerprint.record(path, config)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fileio.write_json_atomic(path / "process.json", {"pid": dead.pid, "create_time": time.time() - 100,
                                                     "started_at": time.time() - 100, "device": "cpu",
                                                     "cancel_requested": time.time() - 50})
    status = json.loads((path / "status.json").read_text())
    assert status["state"] == "cancelled"
    status["pid"] = dead.pid
    fileio.write_json_atomic(path / "status.json", status)
    return path


def python(code: str, *args: str) -> subprocess.Popen:
    """A real second process (another app, or the command line) on the same MACTUNER_HOME."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def released_together(count: int, action):
    """Run ``action()`` in ``count`` threads released at the same instant (tabs pressing a button)."""
    barrier = threading.Barrier(count)

    def press(_):
        barrier.wait()
        try:
            return action()
        except runs.RunError as exc:  # RunConflict included
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(press, range(count)))


# --- row 3: one run per device ---------------------------------------------------------------


def test_ten_tabs_pressing_start_at_once_start_one_run(tiny_model_dir, tmp_path):
    config = long_config(tiny_model_dir, write_fact_dataset(tmp_path / "facts.jsonl"))
    results = released_together(10, lambda: runs.start_run(config, name="tab"))
    started = [r for r in results if isinstance(r, runs.RunInfo)]
    conflicts = [r for r in results if isinstance(r, runs.RunConflict)]
    assert len(started) == 1 and len(conflicts) == 9, results
    assert all(c.running.id == started[0].id for c in conflicts)
    assert [r.id for r in runs.list_runs() if r.is_running] == [started[0].id]
    assert len(list(paths.runs_dir().iterdir())) == 1  # the refused ones left no folder behind


START_IN_PROCESS = """
import json, sys, time
from pathlib import Path
from mactuner import runs
from mactuner.config import TrainConfig
config = TrainConfig.load(sys.argv[1])
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
try:
    print(json.dumps({"started": runs.start_run(config, name="proc").id}))
except runs.RunConflict as exc:
    print(json.dumps({"conflict": exc.running.id}))
"""


def test_ten_processes_starting_at_once_start_one_run(tiny_model_dir, tmp_path):
    config = long_config(tiny_model_dir, write_fact_dataset(tmp_path / "facts.jsonl"))
    config.save(tmp_path / "config.yaml")
    go = tmp_path / "go"
    processes = [python(START_IN_PROCESS, str(tmp_path / "config.yaml"), str(go)) for _ in range(10)]
    time.sleep(3)  # let them all import and wait at the line
    go.touch()
    answers = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        answers.append(json.loads(out.strip().splitlines()[-1]))
    started = [a["started"] for a in answers if "started" in a]
    assert len(started) == 1, answers
    assert all(a.get("conflict") == started[0] for a in answers if "conflict" in a)
    assert [r.id for r in runs.list_runs()] == started


# --- row 4: one trainer per run folder ---------------------------------------------------------


def test_ten_tabs_pressing_resume_at_once_resume_once(cancelled_run_template, tmp_path):
    path = resumable_run(cancelled_run_template, tmp_path)
    results = released_together(10, lambda: runs.resume_run(path.name, force=True))
    resumed = [r for r in results if isinstance(r, runs.RunInfo)]
    refused = [r for r in results if isinstance(r, runs.RunError)]
    assert len(resumed) == 1 and len(refused) == 9, results
    assert all("running" in str(r) or "held by a trainer" in str(r) for r in refused)
    trainers = [p for p in psutil.process_iter(["cmdline"]) if str(path) in " ".join(p.info["cmdline"] or [])]
    assert len(trainers) == 1


RESUME_IN_PROCESS = """
import json, sys, time
from pathlib import Path
from mactuner import runs
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
try:
    print(json.dumps({"resumed": runs.resume_run(sys.argv[1], force=True).pid}))
except runs.RunError as exc:
    print(json.dumps({"refused": str(exc)}))
"""


def test_processes_pressing_resume_at_once_resume_once(cancelled_run_template, tmp_path):
    path = resumable_run(cancelled_run_template, tmp_path)
    go = tmp_path / "go"
    processes = [python(RESUME_IN_PROCESS, path.name, str(go)) for _ in range(6)]
    time.sleep(3)
    go.touch()
    answers = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in processes]
    assert sum("resumed" in a for a in answers) == 1, answers
    assert runs.get_run(path.name).state == "running"


def test_resume_refuses_a_folder_a_trainer_holds(cancelled_run_template, tmp_path):
    from mactuner import locks

    path = resumable_run(cancelled_run_template, tmp_path)
    holder = python("import sys, time\nfrom mactuner.locks import RunLock\nheld = RunLock(sys.argv[1]).acquire()\n"
                    "print('held', flush=True)\ntime.sleep(60)", str(path))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.run_is_locked(path)
        with pytest.raises(runs.RunError, match="held by a trainer|still training|running"):
            runs.resume_run(path.name, force=True)
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((path / "status.json").read_text())["state"] == "cancelled"


# --- row 5: a poll during a resume never blames the previous launch ------------------------------


POLL_IN_PROCESS = """
import json, sys, time
from pathlib import Path
from mactuner import runs
seen = []
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    seen.append([r.state for r in runs.list_runs()][0])
print(json.dumps(seen))
"""


def test_polling_while_resuming_never_records_failed_or_cancelled(cancelled_run_template, tmp_path):
    path = resumable_run(cancelled_run_template, tmp_path)
    status_file = path / "status.json"
    stop = threading.Event()

    def poll(seen: list[str]):
        # what a read reports, what the runs list (the writing path) reports, what the file holds
        while not stop.is_set():
            seen.append(runs.get_run(path.name).state)
            seen.append(runs.list_runs()[0].state)
            seen.append(json.loads(status_file.read_text())["state"])

    poller_process = python(POLL_IN_PROCESS, str(path.name), "8")
    time.sleep(1.5)  # it is polling
    sequences: list[list[str]] = [[] for _ in range(3)]
    pollers = [threading.Thread(target=poll, args=(seen,)) for seen in sequences]
    for thread in pollers:
        thread.start()
    time.sleep(0.5)
    resumed = runs.resume_run(path.name)
    assert resumed.state == "running"
    time.sleep(4)  # the trainer starts up under the polls
    stop.set()
    for thread in pollers:
        thread.join()
    sequences.append(json.loads(poller_process.communicate(timeout=60)[0]))

    # each poller saw: cancelled before the resume, then running only (never failed, never cancelled again)
    for seen in sequences:
        first_running = seen.index("running")
        assert set(seen[:first_running]) <= {"cancelled"} and set(seen[first_running:]) == {"running"}, seen
    assert json.loads(status_file.read_text())["state"] == "running"
    assert "cancel_requested" not in json.loads((path / "process.json").read_text())


# --- row 6: resume checks what it resumes ------------------------------------------------------------


def test_resume_refuses_a_changed_dataset_or_setting_and_names_it(cancelled_run_template, tmp_path):
    path = resumable_run(cancelled_run_template, tmp_path)
    config = TrainConfig.load(path / "config.yaml")
    dataset = Path(config.dataset)
    original = dataset.read_bytes()
    dataset.write_bytes(b"".join(original.splitlines(keepends=True)[:4]))  # replaced by a shorter file
    with pytest.raises(runs.RunError, match=r"dataset file changed since this run started \(24 lines.*4 lines"):
        runs.resume_run(path.name)
    # a same-size edit is caught by the hash
    dataset.write_bytes(original.replace(b"teal", b"pink"))
    with pytest.raises(runs.RunError, match="start a new run instead"):
        runs.resume_run(path.name)
    dataset.write_bytes(original)
    config.learning_rate = 0.5
    config.save(path / "config.yaml")
    with pytest.raises(runs.RunError, match=r"learning_rate 0\.01 → 0\.5"):
        runs.resume_run(path.name)
    assert json.loads((path / "status.json").read_text())["state"] == "cancelled"  # nothing was launched
    dataset.unlink()
    with pytest.raises(runs.RunError, match="is gone"):
        runs.resume_run(path.name)


def test_fingerprint_ignores_settings_that_do_not_change_the_training(tmp_path):
    dataset = write_fact_dataset(tmp_path / "d.jsonl")
    config = TrainConfig(dataset=str(dataset), device="cpu")
    fingerprint.record(tmp_path, config)
    moved = tmp_path / "moved.jsonl"
    shutil.copy(dataset, moved)
    fingerprint.check(tmp_path, {**config.to_dict(), "dataset": str(moved), "device": "cuda",
                                 "save_every": 7, "eval_every": 3, "gradient_checkpointing": True})
    with pytest.raises(fingerprint.FingerprintMismatch, match="batch_size 4 → 8"):
        fingerprint.check(tmp_path, {**config.to_dict(), "batch_size": 8})
    fingerprint.check(tmp_path / "no-record", config)  # a run from before fingerprints: not checked


# --- row 7: concurrent polls and downloads ---------------------------------------------------------------


def finished_run(run_id: str = "done") -> Path:
    path = paths.runs_dir() / run_id
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(200_000))
    (path / "config.yaml").write_text("model: tiny\ndevice: cpu\n")
    fileio.write_json_atomic(path / "status.json", {"state": "finished", "pid": None, "step": 10, "total_steps": 10})
    return path


def test_800_polls_from_threads_while_the_trainer_writes_never_fail():
    path = finished_run()
    stop = threading.Event()

    def trainer_writes():  # as the trainer's status writes, as fast as it can
        step = 0
        while not stop.is_set():
            step += 1
            fileio.write_json_atomic(path / "status.json", {"state": "running", "pid": os.getpid(), "step": step,
                                                            "total_steps": 10**6, "started_at": time.time()})

    def polls(_):
        states = set()
        for _ in range(100):
            states.add(runs.get_run("done").state)
            states.add(runs.list_runs()[0].state)
            tail = runs.MetricsTail("done")
            tail.update()
        return states

    writers = [threading.Thread(target=trainer_writes) for _ in range(2)]  # two writers in one process
    for writer in writers:
        writer.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            states = set().union(*pool.map(polls, range(8)))  # raises if any poll failed
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert states <= {"running", "finished"}
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]


def test_polls_from_another_process_while_this_one_writes_never_fail():
    path = finished_run()
    code = ("from mactuner import runs\nfor _ in range(300):\n    runs.get_run('done'); runs.list_runs()\n"
            "print('ok')")
    pollers = [python(code) for _ in range(3)]
    while any(p.poll() is None for p in pollers):
        fileio.write_json_atomic(path / "status.json", {"state": "running", "pid": os.getpid(), "step": 1,
                                                        "total_steps": 10, "started_at": time.time()})
    for p in pollers:
        out, err = p.communicate()
        assert p.returncode == 0 and out.strip() == "ok", err


def test_ten_concurrent_adapter_downloads_all_succeed():
    path = finished_run()
    expected = {f.name: f.read_bytes() for f in (path / "adapter").iterdir()}
    results = released_together(10, lambda: runs.export_adapter_zip("done").read_bytes())
    for data in results:
        assert isinstance(data, bytes)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert {Path(n).name: archive.read(n) for n in archive.namelist()} == expected
    assert [p.name for p in paths.exports_dir().iterdir()] == ["done-adapter.zip"]  # no temp file left


# --- item 8: cancel escalates to a hard stop and keeps what was saved ----------------------------------


def test_cancel_of_a_trainer_stuck_in_a_save_ends_in_a_hard_stop_that_keeps_the_checkpoint(
    cancelled_run_template, tmp_path, monkeypatch
):
    path = resumable_run(cancelled_run_template, tmp_path)
    config = TrainConfig.load(path / "config.yaml")
    config.save_every = 2  # not a training setting: the fingerprint lets it change
    config.save(path / "config.yaml")
    # the resumed trainer hangs in the middle of its next save (weights written, not yet complete)
    monkeypatch.setenv(checkpoints.PAUSE_ENV, "120")
    run = runs.resume_run(path.name)
    staging = path / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".staging-") for p in staging.iterdir()):
        assert time.monotonic() < deadline, runs.get_run(path.name).log_tail
        time.sleep(0.2)
    # SIGTERM alone would wait out the 120 s pause inside the save: the hard stop after kill_after ends it,
    # so cancel_run returns with the process gone and no complete checkpoint of the interrupted save
    cancelled = runs.cancel_run(path.name, timeout=60, kill_after=2)
    assert not psutil.pid_exists(run.pid) or psutil.Process(run.pid).status() == psutil.STATUS_ZOMBIE
    assert cancelled.state == "cancelled" and "step 2" in cancelled.message
    assert json.loads((path / "status.json").read_text())["state"] == "cancelled"
    # the complete checkpoint survived; the half-written one is not listed
    assert [c.step for c in runs.run_checkpoints(path.name)] == [2]
    assert checkpoints.read_checkpoint(path / "checkpoints" / "step-00000002") is not None


def test_an_ignored_cancel_is_stopped_hard_by_the_next_poll(tmp_path):
    # a process that ignores SIGTERM, standing for a trainer stuck where it cannot stop
    path = paths.runs_dir() / "stuck"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model: tiny\ndevice: cpu\n")
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert stubborn.stdout.readline().strip() == "ready"
    created = psutil.Process(stubborn.pid).create_time()
    fileio.write_json_atomic(path / "process.json", {"pid": stubborn.pid, "create_time": created,
                                                     "started_at": time.time(), "device": "cpu"})
    fileio.write_json_atomic(path / "status.json", {"state": "running", "pid": stubborn.pid, "step": 3,
                                                    "total_steps": 10, "started_at": time.time()})
    assert runs.cancel_run("stuck", kill_after=1).state == "running"  # asked; still alive
    time.sleep(1.5)
    assert stubborn.poll() is None  # nobody killed it yet: a read does not
    assert runs.get_run("stuck").state == "running"
    runs.list_runs()  # the poll's reconciliation escalates
    stubborn.wait(10)  # it would have slept 120 s (its exit status was already collected by the poll's wait)
    assert not psutil.pid_exists(stubborn.pid)
    assert runs.list_runs()[0].state == "cancelled"
    assert json.loads((path / "status.json").read_text())["state"] == "cancelled"
