"""What the fine-tune page shows of its runs, as plain values: the runs table, the picker's
label, the progress headline, the checkpoint table and the metric charts.

``ui/finetune_runs.py`` only renders these (Streamlit stays out of this module), so
what a person reads about a run is decided, and tested, here.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mactuner.adapters import is_adapter
from mactuner.checkpoints import list_checkpoints
from mactuner.runs.metrics import MetricsTail, eta_seconds, format_duration
from mactuner.runs.names import run_display_name
from mactuner.runs.store import RunInfo, list_runs


def steps_text(run: RunInfo) -> str:
    """``12/40``, or ``12/?`` while the total is not known yet."""
    return f"{run.step}/{run.total_steps or '?'}"


def run_label(run: RunInfo) -> str:
    """A run as the picker shows it: its name, state and step, and its id when the name differs."""
    name = run_display_name(run.path)
    return f"{name} · {run.state} · step {steps_text(run)}" + (f" ({run.id})" if name != run.id else "")


def runs_table(all_runs: Sequence[RunInfo]) -> list[dict[str, Any]]:
    """One row per run for the runs table: name, state, step, last losses, device, model, method, start, id."""
    return [{"run": run_display_name(r.path), "state": r.state, "step": steps_text(r),
             "loss": (r.last_metrics or {}).get("loss"), "val loss": (r.last_eval or {}).get("val_loss"),
             "device": r.device, "model": Path(r.model or "?").name, "method": r.method,
             "started": datetime.fromtimestamp(r.started_at) if r.started_at else None, "id": r.id}
            for r in all_runs]


# what the runs table shows at a glance (narrow enough for an 800 px window beside the sidebar); the rest of
# each row is in run_details, under the picker, for the selected run
RUNS_TABLE_SHOWN = ("run", "state", "step", "loss", "val loss")


def run_details(run: RunInfo) -> str:
    """The selected run's facts the runs table leaves out: method, device, model, start time and folder,
    e.g. ``lora on cpu · SmolLM2-135M · started 2026-12-06 20:14 · folder 20261206-1-quenmark``."""
    parts = [f"{run.method or '?'} on {run.device or '?'}", Path(run.model or "?").name]
    if run.started_at:
        parts.append(f"started {datetime.fromtimestamp(run.started_at):%Y-%m-%d %H:%M}")
    parts.append(f"folder {run.id}")
    return " · ".join(parts)


def progress_headline(run: RunInfo, tail: MetricsTail) -> str:
    """The live view's headline: the trainer's stage ("Loading the model…") until the first step, then step and ETA.

    The ETA comes from the pace of ``tail``'s latest train records since the run last
    (re)started; a run that is not training shows no ETA.
    """
    if run.is_running and not run.step:
        return f"{run.state} · {run.message or 'Starting…'}"
    if not run.is_running:  # a run that is not training has no time left to show
        return f"{run.state} · step {steps_text(run)}"
    eta = format_duration(eta_seconds(tail.train, run.total_steps, since=run.started_at))
    return f"{run.state} · step {steps_text(run)} · ETA {eta}"


def status_note(run: RunInfo) -> str | None:
    """The run's message to show under the progress bar, or None when the headline already says it.

    A running run's stage before its first step is in the headline, and "Step …" messages
    only repeat the step count.
    """
    if not run.message or run.message.startswith("Step ") or (run.is_running and not run.step):
        return None
    return run.message


def checkpoint_table(checkpoints: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per checkpoint (``mactuner.checkpoints.CheckpointInfo``): step, losses, size in MB, time saved."""
    return [{"step": c.step, "loss": c.loss, "val loss": c.val_loss, "size (MB)": round(c.size_bytes / 1e6, 1),
             "saved": datetime.fromtimestamp(c.created)} for c in checkpoints]


def follow_run(tails: MutableMapping[str, MetricsTail], run: RunInfo) -> MetricsTail:
    """``run``'s metrics brought up to date, keeping in ``tails`` (run id -> tail) only this run's tail.

    A :class:`~mactuner.runs.MetricsTail` holds about ``runs.TAIL_MAX_POINTS`` points per
    series whatever the run's length; dropping the other runs' tails means a browser tab that
    looked at many runs does not hold all their histories. Each call reads only what the
    trainer appended since the last one.
    """
    for other in [key for key in tails if key != run.id]:
        del tails[other]
    tail = tails.get(run.id)
    if tail is None:
        tail = tails[run.id] = MetricsTail(run.path)
    tail.update()
    return tail


def metric_figure(title: str, traces: dict[str, tuple[Sequence[float], Sequence[float]]], revision: str,
                  x_title: str = "step"):
    """A small plotly line chart of one or more metrics; ``traces`` maps a name to ``(xs, ys)``.

    Redrawn every second while a run trains, so built cheaply (as
    :func:`mactuner.devices.monitor.memory_figure`): numpy arrays go out as compact binary, and
    the layout is given to the constructor (plotly's ``update_layout`` validation costs
    several times more). ``revision`` is the layout's ``uirevision``: the same value
    keeps the person's zoom across redraws. The legend shows only with several traces.
    """
    import numpy as np
    import plotly.graph_objects as go

    data = [go.Scatter(x=np.asarray(x, dtype=float), y=np.asarray(y, dtype=float), name=name, mode="lines+markers")
            for name, (x, y) in traces.items()]
    layout = {"title": {"text": title}, "height": 260, "margin": {"t": 40, "b": 30},
              "xaxis": {"title": {"text": x_title}}, "showlegend": len(traces) > 1, "uirevision": revision}
    return go.Figure(data=data, layout=layout)


@dataclass
class AdapterChoice:
    """An adapter a person can chat with: a finished run's final adapter or one of its checkpoints."""

    label: str  # "run-id · final" or "run-id · step 50"
    path: Path
    run_id: str
    base_model: str | None  # the run's configured model, if known
    step: int | None  # None for the final adapter


def list_adapters() -> list[AdapterChoice]:
    """Adapters found under ``paths.runs_dir()``: each run's final ``adapter/`` (finished runs) then its checkpoints, newest run first."""
    choices = []
    for run in list_runs():
        # the person's name for the run, with the id when it has one (names need not be unique)
        name = run_display_name(run.path)
        shown = run.id if name == run.id else f"{name} ({run.id})"
        final = run.path / "adapter"
        has_final = run.state == "finished" and is_adapter(final)
        if has_final:
            choices.append(AdapterChoice(f"{shown} · final", final, run.id, run.model, None))
        for checkpoint in reversed(list_checkpoints(run.path)):
            if is_adapter(checkpoint.path):
                label = f"{shown} · step {checkpoint.step}"
                if has_final and checkpoint.step == run.step:  # saved at the last step: what final/ holds
                    label += " (same weights as final)"
                choices.append(AdapterChoice(label, checkpoint.path, run.id, run.model, checkpoint.step))
    return choices
