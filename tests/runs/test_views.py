"""What the fine-tune page shows of runs: table rows, picker labels, the progress headline and
the note under it, checkpoint rows, the one metrics tail a tab keeps, and the metric charts."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from mactuner import paths
from mactuner.checkpoints import CheckpointInfo
from mactuner.runs import MetricsTail, RunInfo
from mactuner.runs import views as run_views
from mactuner.runs.names import set_run_name


def run_folder(run_id: str, metrics: list[dict] | None = None) -> Path:
    """An empty run folder with these metrics records (all the views read from the folder)."""
    path = paths.runs_dir() / run_id
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics or []))
    return path


def train_record(step: int, t: float) -> dict:
    return {"type": "train", "step": step, "loss": 2.0 / step, "time": t}


def test_table_rows_and_picker_labels_use_the_name_a_person_gave():
    named = RunInfo(id="20261128-1-quenmark", path=run_folder("20261128-1-quenmark"), state="finished", step=40,
                    total_steps=40, started_at=1_800_000_000.0, device="cpu", model="/models/SmolLM2-135M",
                    method="lora", last_metrics={"loss": 0.5}, last_eval={"val_loss": 0.7})
    set_run_name(named.id, "First try")
    plain = RunInfo(id="20261128-2-alpaca", path=run_folder("20261128-2-alpaca"), state="running", step=3)
    assert run_views.run_label(named) == "First try · finished · step 40/40 (20261128-1-quenmark)"
    assert run_views.run_label(plain) == "20261128-2-alpaca · running · step 3/?"  # no name: no id repeated
    first, second = run_views.runs_table([named, plain])
    assert first == {"run": "First try", "state": "finished", "step": "40/40", "loss": 0.5, "val loss": 0.7,
                     "device": "cpu", "model": "SmolLM2-135M", "method": "lora",
                     "started": datetime.fromtimestamp(1_800_000_000.0), "id": "20261128-1-quenmark"}
    assert second["run"] == "20261128-2-alpaca" and second["step"] == "3/?"
    assert second["loss"] is None and second["val loss"] is None and second["model"] == "?" and second["started"] is None


def test_headline_shows_the_stage_then_step_and_eta():
    path = run_folder("r", [train_record(s, 1000.0 + 2 * s) for s in range(1, 6)])
    tail = MetricsTail(path)
    tail.update()
    loading = RunInfo(id="r", path=path, state="running", step=0, total_steps=10, message="Loading the model…")
    assert run_views.progress_headline(loading, tail) == "running · Loading the model…"
    assert run_views.progress_headline(RunInfo(id="r", path=path, state="running"), tail) == "running · Starting…"
    # 2 s a step, 5 steps left: 10 s
    training = RunInfo(id="r", path=path, state="running", step=5, total_steps=10, started_at=1000.0)
    assert run_views.progress_headline(training, tail) == "running · step 5/10 · ETA 10 s"
    # records from before the latest (re)start do not count: no pace yet, no ETA
    resumed = RunInfo(id="r", path=path, state="running", step=5, total_steps=10, started_at=2000.0)
    assert run_views.progress_headline(resumed, tail) == "running · step 5/10 · ETA –"
    stopped = RunInfo(id="r", path=path, state="cancelled", step=5, total_steps=None)
    assert run_views.progress_headline(stopped, tail) == "cancelled · step 5/?"  # no "ETA –" on a stopped run


@pytest.mark.parametrize(("state", "step", "message", "note"), [
    ("running", 0, "Loading the model…", None),  # already the headline
    ("running", 4, "Step 4/10", None),  # repeats the step count
    ("running", 4, "Validating…", "Validating…"),
    ("failed", 4, "Out of memory: lower the batch size.", "Out of memory: lower the batch size."),
    ("failed", 0, "The model could not be read.", "The model could not be read."),  # not running: not the stage
    ("finished", 10, None, None),
])
def test_status_note_shows_only_what_the_headline_does_not(state, step, message, note):
    run = RunInfo(id="r", path=Path("r"), state=state, step=step, total_steps=10, message=message)
    assert run_views.status_note(run) == note


def test_checkpoint_rows_in_megabytes_and_local_time():
    saved = time.time()
    rows = run_views.checkpoint_table([CheckpointInfo(Path("c"), 20, 1.25, None, 12_345_678, saved)])
    assert rows == [{"step": 20, "loss": 1.25, "val loss": None, "size (MB)": 12.3, "saved": datetime.fromtimestamp(saved)}]


def test_a_tab_keeps_one_tail_and_reads_only_what_was_appended():
    first = RunInfo(id="a", path=run_folder("a", [train_record(1, 1.0)]), state="running")
    second = RunInfo(id="b", path=run_folder("b", [train_record(1, 1.0), train_record(2, 2.0)]), state="running")
    tails: dict = {}
    tail = run_views.follow_run(tails, first)
    assert list(tails) == ["a"] and [r["step"] for r in tail.train] == [1]
    with open(first.path / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(train_record(2, 2.0)) + "\n")
    assert run_views.follow_run(tails, first) is tail and [r["step"] for r in tail.train] == [1, 2]
    other = run_views.follow_run(tails, second)
    assert list(tails) == ["b"] and [r["step"] for r in other.train] == [1, 2]  # the first run's history is let go
    assert run_views.follow_run(tails, first) is not tail  # coming back reads it afresh


def test_metric_figure_has_a_line_per_trace_and_keeps_zoom_by_key():
    figure = run_views.metric_figure("Loss", {"train": ([1, 2, 3], [2.0, 1.5, 1.0]), "validation": ([3], [1.2])},
                                     "finetune_chart_loss")
    assert [trace.name for trace in figure.data] == ["train", "validation"]
    assert list(figure.data[0].y) == [2.0, 1.5, 1.0] and list(figure.data[1].x) == [3.0]
    assert figure.layout.showlegend and figure.layout.uirevision == "finetune_chart_loss"
    assert figure.layout.title.text == "Loss" and figure.layout.xaxis.title.text == "step"
    single = run_views.metric_figure("Memory (MiB)", {"memory": ([0.0, 1.5], [100.0, 120.0])}, "mem", "seconds")
    assert not single.layout.showlegend and single.layout.xaxis.title.text == "seconds"
