"""The fine-tune page in AppTest: empty, with a running, a finished and a failed
run (folders made here from one real tiny training), starting a run (the page lands on
its live view), the trainer's stage shown before the first step, and renaming a run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from streamlit.testing.v1 import AppTest

from mactuner import paths, runs
from mactuner.config import TrainConfig
from mactuner.data import DEMO_DATASETS, uploads_dir
from tests.app_pages import open_app_page
from tests.locations import ROOT

DEMO = str(DEMO_DATASETS["quenmark-alpaca"])


def tiny_config(model_dir: Path, **changes) -> TrainConfig:
    """A run of a few seconds: the tiny model on the demo data, a checkpoint every 2 steps."""
    values = dict(model=str(model_dir), dataset=DEMO, device="cpu", max_steps=4, batch_size=4, max_length=128,
                  save_every=2, eval_every=2, log_every=1)
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One real, finished run folder of the tiny model (trained once per session)."""
    run_dir = tmp_path_factory.mktemp("finished-run") / "run"
    run_dir.mkdir()
    tiny_config(tiny_model_dir).save(run_dir / "config.yaml")
    command = [sys.executable, "-m", "mactuner", "train", str(run_dir / "config.yaml"), "--run-dir", str(run_dir)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return run_dir


def copy_run(template: Path, run_id: str, **status) -> Path:
    """A copy of the trained run under this test's runs folder, its status changed."""
    path = paths.runs_dir() / run_id
    shutil.copytree(template, path)
    data = json.loads((path / "status.json").read_text())
    data.update(status)
    (path / "status.json").write_text(json.dumps(data))
    (path / "process.json").unlink(missing_ok=True)
    return path


def open_page() -> AppTest:
    return open_app_page("pages/finetune.py")


def by_label(widgets, label: str):
    """The widget whose label starts with ``label``."""
    return next(w for w in widgets if w.label.startswith(label))


def open_tab(at: AppTest, tab: str) -> AppTest:
    """Open the "New run" or "Runs" tab, as a click on it does."""
    at.session_state["finetune_tab"] = tab
    at.run()
    assert not at.exception, at.exception
    return at


def progress_texts(at: AppTest) -> list[str]:
    return [e.proto.text for e in at.get("progress")]


def select_run(at: AppTest, run_id: str) -> AppTest:
    at.selectbox(key="finetune_run").set_value(run_id).run()
    assert not at.exception, at.exception
    return at


def estimate_gb(at: AppTest) -> float:
    [text] = [m.value for m in at.markdown if "Estimated peak memory" in m.value]
    return float(text.split("Estimated peak memory: ")[1].split(" GB")[0])


def test_page_renders_with_no_runs_and_recommends_settings():
    at = open_page()
    assert not at.get("dataframe"), "the Runs tab runs only when it is open"
    # the default set-up (built-in model, demo data) shows the dataset summary…
    assert {m.label: m.value for m in at.metric}["Format"] == "alpaca"
    assert at.get("plotly_chart"), "the token-length histogram is missing"
    # …and recommended settings, each saying why, with their memory estimate
    batch = by_label(at.number_input, "Batch size")
    assert batch.value >= 1 and "micro-batch" in batch.help
    assert "tokens" in by_label(at.number_input, "Max length").help
    # the demo's 63 rows get 32 replay rows (the base model's own answers), shown and changeable
    replay = by_label(at.number_input, "Replay rows")
    assert replay.value == 32 and "keeps what it knew" in replay.help
    first = estimate_gb(at)
    assert 0.1 < first < 100
    assert not at.warning
    # the estimate follows the settings; one that cannot fit is warned about
    batch.set_value(512).run()
    assert estimate_gb(at) > 10 * first
    [text] = [m.value for m in at.markdown if "Estimated peak memory" in m.value]
    free_gb = float(text.split(" of ")[1].split(" GB free")[0])
    warned = any("lower the batch size" in w.value for w in at.warning)
    assert warned == (estimate_gb(at) > free_gb)
    assert at.button(key="finetune_start")
    assert any("No runs yet" in info.value for info in open_tab(at, "Runs").info)


def test_qlora_says_before_start_where_it_cannot_run(monkeypatch):
    from mactuner.training import int8_base

    at = open_page()
    by_label(at.radio, "Method").set_value("qlora").run()
    if int8_base.int8_matmul_available("cpu"):
        # this CPU multiplies int8 exactly: QLoRA's int8 base can train here
        assert not at.error and at.button(key="finetune_start")
    # a CPU whose int8 matmul saturates (no VNNI): said before Start, with the alternative
    monkeypatch.setattr(int8_base, "int8_matmul_available", lambda device_type: False)
    at.run()
    assert not at.exception
    assert any("VNNI or AMX" in e.value and "method: lora" in e.value for e in at.error), [e.value for e in at.error]
    assert "finetune_start" not in [b.key for b in at.button]


def test_an_uploaded_dataset_is_saved_once_and_offered_again():
    at = open_page()
    demo_rows = {m.label: m.value for m in at.metric}["Rows"]
    at.selectbox(key="finetune_dataset").set_value("Upload a file…").run()
    assert not at.exception, at.exception
    content = Path(DEMO).read_bytes()
    at.get("file_uploader")[0].upload("my facts.json", content, "application/json")
    at.run()
    assert not at.exception, at.exception
    saved = uploads_dir() / "my facts.json"
    assert saved.read_bytes() == content
    assert {m.label: m.value for m in at.metric}["Rows"] == demo_rows  # summarised from the saved copy
    mtime = saved.stat().st_mtime_ns
    by_label(at.number_input, "Batch size").set_value(2).run()  # any rerun hands the page the same upload again
    assert not at.exception, at.exception
    assert saved.stat().st_mtime_ns == mtime and sorted(p.name for p in uploads_dir().iterdir()) == ["my facts.json"]
    assert "Uploaded: my facts.json" in at.selectbox(key="finetune_dataset").options


def test_page_shows_running_finished_and_failed_runs(trained_run):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        copy_run(trained_run, "a-finished")
        running = copy_run(trained_run, "b-running", state="running", pid=sleeper.pid, step=2,
                           started_at=time.time(), message="Step 2/4")
        (running / "adapter").rename(running / "adapter-not-yet")
        (running / "process.json").write_text(
            json.dumps({"pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time()})
        )
        failed = copy_run(trained_run, "c-failed", state="running", pid=dead.pid, started_at=time.time())
        (failed / "log.txt").write_text("loading…\nRuntimeError: the trainer broke\n")

        at = open_page()  # a run is training: the page opens on the Runs tab
        options = at.selectbox(key="finetune_run").options
        assert len(options) == 3
        assert any("b-running" in o and "running" in o for o in options)
        assert any("c-failed" in o and "failed" in o for o in options)

        at = select_run(at, "b-running")
        assert at.button(key="finetune_cancel")  # a running run can be cancelled…
        assert not at.get("download_button")  # …and has no final adapter yet

        at = select_run(at, "a-finished")
        [checkpoints] = [d.value for d in at.dataframe if "size (MB)" in d.value.columns]
        assert list(checkpoints["step"]) == [c.step for c in runs.run_checkpoints("a-finished")]
        assert at.get("download_button")

        at = select_run(at, "c-failed")
        assert any("stopped without finishing" in e.value for e in at.error)
        assert any("RuntimeError: the trainer broke" in c.value for c in at.code)
        assert at.button(key="finetune_resume")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_checkpoints_and_runs_are_deleted_from_the_page(trained_run):
    copy_run(trained_run, "done")
    steps = [c.step for c in runs.run_checkpoints("done")]
    assert len(steps) >= 2
    at = open_tab(open_page(), "Runs")
    assert at.selectbox(key="finetune_ckpt").value == steps[-1]  # the latest is preselected
    at.selectbox(key="finetune_ckpt").set_value(steps[0]).run()
    at.button(key="finetune_ckpt_delete").click().run()
    assert not at.exception, at.exception
    assert [c.step for c in runs.run_checkpoints("done")] == steps[1:]
    at.button(key="finetune_delete").click().run()
    assert not at.exception, at.exception
    assert runs.list_runs() == [] and not (paths.runs_dir() / "done").exists()
    assert any("No runs yet" in info.value for info in at.info)


def test_start_lands_on_the_new_runs_live_view_and_it_trains(tiny_model_dir):
    at = open_page()
    at.radio(key="finetune_model_kind").set_value("Local folder or .gguf file").run()
    at.text_input(key="finetune_model_path").set_value(str(tiny_model_dir)).run()
    by_label(at.number_input, "Max steps").set_value(400).run()
    by_label(at.number_input, "Max length").set_value(128).run()
    at.button(key="finetune_start").click().run()
    assert not at.exception, at.exception
    [run_dir] = list(paths.runs_dir().iterdir())
    try:
        config = TrainConfig.load(run_dir / "config.yaml")
        assert (config.model, config.max_steps, config.device) == (str(tiny_model_dir), 400, "cpu")
        info = runs.get_run(run_dir.name)
        assert info.state == "running" and psutil.pid_exists(info.pid)
        # the same rerun shows the Runs tab with the new run selected and its live view; nothing says "no runs"
        assert at.session_state["finetune_tab"] == "Runs"
        assert at.selectbox(key="finetune_run").value == run_dir.name
        assert any(run_dir.name in m.value and "Started" in m.value for m in at.success)
        assert not any("No runs yet" in i.value for i in at.info) and not at.get("toast")
        [progress] = progress_texts(at)
        assert progress.startswith("running · ")
        # a second start explains what is running
        open_tab(at, "New run").button(key="finetune_start").click().run()
        assert any(run_dir.name in w.value and "already training" in w.value for w in at.warning)
        assert at.session_state["finetune_tab"] == "New run" and len(list(paths.runs_dir().iterdir())) == 1
        # it trains: steps are recorded
        deadline = time.monotonic() + 90
        while runs.get_run(run_dir.name).step < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert runs.get_run(run_dir.name).step >= 1, runs.get_run(run_dir.name).log_tail
    finally:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(runs.get_run(run_dir.name).pid, signal.SIGKILL)


def test_before_the_first_step_the_live_view_shows_the_trainers_stage(trained_run):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        path = copy_run(trained_run, "loading", state="running", pid=sleeper.pid, step=0, total_steps=64,
                        started_at=time.time(), message="Loading the model…")
        (path / "metrics.jsonl").write_text("")
        (path / "process.json").write_text(
            json.dumps({"pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time()})
        )
        at = open_page()
        assert progress_texts(at) == ["running · Loading the model…"]
        # once it steps, the bar counts steps
        status = json.loads((path / "status.json").read_text())
        (path / "status.json").write_text(json.dumps({**status, "step": 3, "message": "Step 3/64"}))
        at.run()
        [text] = progress_texts(at)
        assert text.startswith("running · step 3/64 · ETA")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_runs_can_be_renamed_and_list_and_picker_agree(trained_run):
    copy_run(trained_run, "a-finished")
    copy_run(trained_run, "b-cancelled", state="cancelled")
    at = select_run(open_tab(open_page(), "Runs"), "b-cancelled")
    at.text_input(key="finetune_name_b-cancelled").input("Quenmark, first try").run()
    assert not at.exception, at.exception
    assert runs_names()["b-cancelled"] == "Quenmark, first try"
    [table] = [d.value for d in at.dataframe if "state" in d.value.columns]
    shown = dict(zip(table["id"], zip(table["run"], table["state"])))
    assert shown["b-cancelled"] == ("Quenmark, first try", "cancelled")
    labels = dict(zip(table["id"], at.selectbox(key="finetune_run").options))  # same order: one listing
    for run_id, (name, state) in shown.items():
        assert labels[run_id].startswith(f"{name} · {state} ·"), labels  # the list and the picker agree
    # the chat's adapter list still finds the run under its id
    assert (paths.runs_dir() / "b-cancelled" / "name.json").is_file()


def runs_names() -> dict[str, str]:
    from mactuner.runs.names import run_display_name

    return {r.id: run_display_name(r.id) for r in runs.list_runs()}


def test_the_engine_choice_says_what_auto_picks_and_mlx_offers_qlora(monkeypatch):
    from mactuner.training import int8_base

    at = open_page()
    engine = at.radio(key="finetune_engine")
    assert engine.value == "auto" and "not an Apple-silicon Mac" in engine.help
    assert any("PyTorch: this is not an Apple-silicon Mac" in c.value for c in at.caption)
    # where PyTorch cannot run QLoRA, the MLX engine can (a 4-bit base)
    monkeypatch.setattr(int8_base, "int8_matmul_available", lambda device_type: False)
    by_label(at.radio, "Method").set_value("qlora").run()
    assert any("VNNI or AMX" in e.value for e in at.error)
    at.radio(key="finetune_engine").set_value("mlx").run()
    assert not at.exception and not at.error
    assert any("MLX, as asked" in c.value for c in at.caption) and at.button(key="finetune_start")
    by_label(at.radio, "Method").set_value("full").run()
    assert any("MLX engine trains LoRA and QLoRA" in e.value for e in at.error)
    assert "finetune_start" not in [b.key for b in at.button]
