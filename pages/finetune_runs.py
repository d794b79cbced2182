"""UI-only part of the fine-tune page: the runs list and the live view of one run.

Kept apart from ``pages/finetune.py`` (the set-up) so each stays short; all the
logic is in :mod:`mactuner.runs`. Not a page itself.
"""

from datetime import datetime
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from mactuner import runs
from mactuner.run_names import run_display_name, set_run_name
from pages.common import memory_monitor
from pages.eval_ui import compare_ui, evaluate_ui

MAX_POINTS = 1000  # per chart trace: a long run's charts stay light to redraw every second
LIVE_REFRESH_S = 1.0  # while a run trains
IDLE_REFRESH_S = 3.0  # otherwise: only to notice a run started in another tab (each redraw costs server CPU)


def chart(title: str, traces: dict[str, tuple[list, list]], key: str, x_title: str = "step") -> None:
    """One small plotly line chart; ``traces`` maps a name to (xs, ys).

    Redrawn every second, so built cheaply (as the dashboard's): numpy arrays go
    out as compact binary, and the layout is given to the constructor (plotly's
    ``update_layout`` validation costs several times more).
    """
    data = [go.Scatter(x=np.asarray(x, dtype=float), y=np.asarray(y, dtype=float), name=name, mode="lines+markers")
            for name, (x, y) in traces.items()]
    layout = {"title": {"text": title}, "height": 260, "margin": {"t": 40, "b": 30}, "xaxis": {"title": {"text": x_title}},
              "showlegend": len(traces) > 1, "uirevision": key}  # uirevision keeps zoom across redraws
    st.plotly_chart(go.Figure(data=data, layout=layout), key=key)


def charts_ui(tail: runs.MetricsTail) -> None:
    """Loss and validation loss, learning rate, gradient norm, tokens/s and memory of one run."""
    series = lambda name, kind="train": tail.series(name, kind, max_points=MAX_POINTS)  # noqa: E731
    chart("Loss", {"train": series("loss"), "validation": series("val_loss", "eval")}, "finetune_chart_loss")
    left, right = st.columns(2)
    with left:
        chart("Learning rate", {"lr": series("lr")}, "finetune_chart_lr")
        chart("Tokens / s", {"tokens/s": series("tokens_per_second")}, "finetune_chart_tps")
    with right:
        chart("Gradient norm", {"grad norm": series("grad_norm")}, "finetune_chart_grad")
        chart("Memory (MiB)", {"memory": tail.memory_series(MAX_POINTS)}, "finetune_chart_mem", "seconds")


def actions_ui(run: runs.RunInfo) -> None:
    """Cancel, resume, delete, download, as the run's state allows."""
    cols = st.columns(4)
    try:
        if run.is_running and cols[0].button("Cancel (saves a checkpoint)", key="finetune_cancel"):
            runs.cancel_run(run.id)
            st.toast(f"Asked {run.id} to stop; it saves a checkpoint first.")
        if run.state in ("cancelled", "failed") and cols[0].button("Resume", key="finetune_resume"):
            runs.resume_run(run.id, force=st.session_state.get("finetune_force", False))
            st.toast(f"Resuming {run.id}.")
        if not run.is_running:
            with cols[1].popover("Delete run"):
                if st.button(f"Delete {run.id} and its checkpoints", key="finetune_delete"):
                    runs.delete_run(run.id)
                    st.rerun()
    except runs.RunConflict as exc:
        st.warning(f"{exc} Tick 'Start even if another run is training on this device' above to resume anyway.")
    except runs.RunError as exc:
        st.warning(str(exc))
    if (run.path / "adapter").is_dir():
        cols[2].download_button("Download adapter (.zip)", lambda: runs.export_adapter_zip(run.id).read_bytes(),
                                file_name=f"{run.id}-adapter.zip", mime="application/zip", on_click="ignore")


def checkpoints_ui(run: runs.RunInfo) -> None:
    """The run's complete checkpoints: step, loss, size and time; deletable once the run stopped."""
    found = runs.run_checkpoints(run.id)
    if not found:
        st.caption("No checkpoint yet.")
        return
    rows = [{"step": c.step, "loss": c.loss, "val loss": c.val_loss, "size (MB)": round(c.size_bytes / 1e6, 1),
             "saved": datetime.fromtimestamp(c.created)} for c in found]
    st.dataframe(rows, hide_index=True, key="finetune_checkpoints")
    if not run.is_running:
        left, right = st.columns([1, 3])
        step = left.selectbox("Checkpoint", [c.step for c in found], index=len(found) - 1, key="finetune_ckpt",
                              format_func=lambda s: f"step {s}", label_visibility="collapsed")
        if right.button("Delete checkpoint", key="finetune_ckpt_delete"):
            try:
                runs.delete_checkpoint(run.id, step)
            except (runs.RunError, ValueError, OSError) as exc:
                st.warning(str(exc))
            else:
                st.rerun()


def live_history(run: runs.RunInfo) -> runs.MetricsTail:
    """The selected run's metrics, brought up to date: one bounded tail per tab.

    A :class:`runs.MetricsTail` keeps about ``runs.TAIL_MAX_POINTS`` points per
    series whatever the run's length, and only the run on screen keeps one (a tab
    that looked at many runs does not hold all their histories).
    """
    tails = st.session_state.setdefault("finetune_tails", {})
    for other in [key for key in tails if key != run.id]:
        del tails[other]
    tail = tails.get(run.id)
    if tail is None:
        tail = tails[run.id] = runs.MetricsTail(run.path)
    tail.update()
    return tail


def progress_text(run: runs.RunInfo, tail: runs.MetricsTail) -> str:
    """The live view's headline: the trainer's stage ("Loading the model…") until the first step, then step and ETA."""
    if run.is_running and not run.step:
        return f"{run.state} · {run.message or 'Starting…'}"
    eta = runs.format_duration(runs.eta_seconds(tail.train, run.total_steps, since=run.started_at)) if run.is_running else "–"
    return f"{run.state} · step {run.step}/{run.total_steps or '?'} · ETA {eta}"


def rename_ui(run: runs.RunInfo) -> None:
    """A text box naming the run (kept in the run folder; the id stays as it is)."""
    def rename() -> None:
        try:
            set_run_name(run.id, st.session_state[f"finetune_name_{run.id}"])
        except (ValueError, OSError) as exc:
            st.session_state["finetune_name_problem"] = str(exc)

    st.text_input("Run name", run_display_name(run.id), key=f"finetune_name_{run.id}", max_chars=80, on_change=rename,
                  help=f"Shown in the runs list and the run picker; the run's folder stays {run.id}.")
    if problem := st.session_state.pop("finetune_name_problem", None):
        st.warning(problem)


def run_ui(run: runs.RunInfo) -> None:
    """Progress, state and charts of the selected run."""
    tail = live_history(run)
    st.progress(run.progress, text=progress_text(run, tail))
    at_work = run.is_running and not run.step  # the progress bar already shows the stage
    if run.message and not run.message.startswith("Step ") and not at_work:  # nor repeat which step
        (st.error if run.state == "failed" else st.caption)(run.message)
    if run.state == "failed" and run.log_tail:
        st.code(run.log_tail, language=None)
    actions_ui(run)
    charts_ui(tail)
    checkpoints_ui(run)
    rename_ui(run)
    evaluate_ui(run)


def runs_ui() -> None:
    """Every run and the live view of the selected one: redrawn every second while a run trains, else every few."""
    if started := st.session_state.pop("finetune_started", None):
        st.success(f"Started {run_display_name(started)}: it trains in the background; its live view is below.")
    live = any(r.is_running for r in runs.list_runs())
    st.fragment(run_every=LIVE_REFRESH_S if live else IDLE_REFRESH_S)(runs_view)(live)
    compare_ui()


def run_label(run: runs.RunInfo) -> str:
    """A run as the picker shows it: its name and state (from the same listing as the table)."""
    name = run_display_name(run.path)
    return f"{name} · {run.state} · step {run.step}/{run.total_steps or '?'}" + (f" ({run.id})" if name != run.id else "")


def runs_view(live: bool) -> None:
    """The runs table, the picker and the selected run's live view, all from one listing per redraw."""
    all_runs = runs.list_runs()  # the one source of every state shown below in this redraw
    if any(r.is_running for r in all_runs) != live:
        st.rerun()  # a run started or stopped (maybe in another tab): the whole page re-registers its refresh rate
    runs.sync_monitor(memory_monitor(), all_runs)  # the dashboard's chart shows training memory too
    if not all_runs:
        st.info("No runs yet: set one up in the New run tab and start it.")
        return
    by_id = {r.id: r for r in all_runs}
    st.dataframe([{"run": run_display_name(r.path), "state": r.state, "step": f"{r.step}/{r.total_steps or '?'}",
                   "loss": (r.last_metrics or {}).get("loss"), "val loss": (r.last_eval or {}).get("val_loss"),
                   "device": r.device, "model": Path(r.model or "?").name, "method": r.method,
                   "started": datetime.fromtimestamp(r.started_at) if r.started_at else None, "id": r.id}
                  for r in all_runs], hide_index=True, key="finetune_runs_table")
    if st.session_state.get("finetune_select") in by_id:
        st.session_state["finetune_run"] = st.session_state.pop("finetune_select")
    run_id = st.selectbox("Runs", list(by_id), key="finetune_run", format_func=lambda i: run_label(by_id[i]))
    run_ui(by_id[run_id])
