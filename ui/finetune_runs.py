"""UI-only part of the fine-tune page: the runs list and the live view of one run.

Kept apart from ``pages/finetune.py`` (the set-up) so each stays short; all the
logic is in :mod:`mactuner.runs` and :mod:`mactuner.runs.views`. Not a page itself.
"""

import streamlit as st

from mactuner import runs
from mactuner.display import table_for_people
from mactuner.runs import views as run_views
from mactuner.runs.names import run_display_name, set_run_name
from ui.common import memory_monitor
from ui.eval_ui import compare_ui, evaluate_ui
from ui.export_ui import CHAT_OPEN_ADAPTER
from ui.finetune_preference import reward_charts_ui

MAX_POINTS = 1000  # per chart trace: a long run's charts stay light to redraw every second
LIVE_REFRESH_S = 1.0  # while a run trains
# px: the shown columns fit an 800 px window beside the sidebar (a long run name is cut; the picker has it whole)
RUNS_TABLE_WIDTHS = {"run": st.column_config.Column(width=150), "state": st.column_config.Column(width=75),
                     "step": st.column_config.Column(width=55), "loss": st.column_config.Column(width=60),
                     "val loss": st.column_config.Column(width=65)}
IDLE_REFRESH_S = 3.0  # otherwise: only to notice a run started in another tab (each redraw costs server CPU)


def chart(title: str, traces: dict[str, tuple[list, list]], key: str, x_title: str = "step") -> None:
    """One small line chart (:func:`run_views.metric_figure`); ``key`` also keeps its zoom across redraws."""
    st.plotly_chart(run_views.metric_figure(title, traces, key, x_title), key=key)


def charts_ui(tail: runs.MetricsTail) -> None:
    """Loss and validation loss, learning rate, gradient norm, tokens/s and memory of one run."""
    series = lambda name, kind="train": tail.series(name, kind, max_points=MAX_POINTS)
    chart("Loss", {"train": series("loss"), "validation": series("val_loss", "eval")}, "finetune_chart_loss")
    left, right = st.columns(2)
    with left:
        chart("Learning rate", {"lr": series("lr")}, "finetune_chart_lr")
        chart("Tokens / s", {"tokens/s": series("tokens_per_second")}, "finetune_chart_tps")
    with right:
        chart("Gradient norm", {"grad norm": series("grad_norm")}, "finetune_chart_grad")
        chart("Memory (MiB)", {"memory": tail.memory_series(MAX_POINTS)}, "finetune_chart_mem", "seconds")
    reward_charts_ui(tail, chart, MAX_POINTS)  # DPO / ORPO / KTO runs


def actions_ui(run: runs.RunInfo) -> None:
    """Cancel, resume, delete, download and Open in Chat, as the run's state allows: one row of buttons,
    each as wide as its label (they wrap in a narrow window instead of cutting their labels)."""
    row = st.container(horizontal=True)
    try:
        if run.is_running and row.button("Cancel (saves a checkpoint)", key="finetune_cancel"):
            runs.cancel_run(run.id)
            st.toast(f"Asked {run.id} to stop; it saves a checkpoint first.")
        if run.state in ("cancelled", "failed") and row.button("Resume", key="finetune_resume"):
            runs.resume_run(run.id, force=st.session_state.get("finetune_force", False))
            st.toast(f"Resuming {run.id}.")
        if not run.is_running:
            with row.popover("Delete run"):
                if st.button(f"Delete {run.id} and its checkpoints", key="finetune_delete"):
                    runs.delete_run(run.id)
                    st.rerun()
    except runs.RunConflict as exc:
        st.warning(f"{exc} Tick 'Start even if another run is training on this device' above to resume anyway.")
    except runs.RunError as exc:
        st.warning(str(exc))
    if (run.path / "adapter").is_dir():
        row.download_button("Download adapter (.zip)", lambda: runs.export_adapter_zip(run.id).read_bytes(),
                            file_name=f"{run.id}-adapter.zip", mime="application/zip", on_click="ignore",
                            key="finetune_download")
    if run.state == "finished" and (run.path / "adapter" / "adapter_config.json").is_file():
        if row.button("Open in Chat", key="finetune_open_chat", icon=":material/chat:",
                      help="Chat with this run's final adapter."):
            st.session_state[CHAT_OPEN_ADAPTER] = str(run.path / "adapter")  # the Chat page selects it
            st.switch_page("pages/chat.py")


def checkpoints_ui(run: runs.RunInfo) -> None:
    """The run's complete checkpoints: step, loss, size and time; deletable once the run stopped."""
    found = runs.run_checkpoints(run.id)
    if not found:
        st.caption("No checkpoint yet.")
        return
    st.dataframe(table_for_people(run_views.checkpoint_table(found)), hide_index=True, key="finetune_checkpoints")
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
    tail = run_views.follow_run(st.session_state.setdefault("finetune_tails", {}), run)  # one bounded tail per tab
    st.progress(run.progress, text=run_views.progress_headline(run, tail))
    if note := run_views.status_note(run):
        (st.error if run.state == "failed" else st.caption)(note)
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
    st.dataframe(table_for_people(run_views.runs_table(all_runs)), hide_index=True, key="finetune_runs_table",
                 column_order=run_views.RUNS_TABLE_SHOWN, column_config=RUNS_TABLE_WIDTHS)
    if st.session_state.get("finetune_select") in by_id:
        st.session_state["finetune_run"] = st.session_state.pop("finetune_select")
    if st.session_state.get("finetune_run") not in by_id:  # a new session (a reload): the training run first
        st.session_state["finetune_run"] = next((r.id for r in all_runs if r.is_running), all_runs[0].id)
    run_id = st.selectbox("Runs", list(by_id), key="finetune_run", format_func=lambda i: run_views.run_label(by_id[i]))
    st.caption(run_views.run_details(by_id[run_id]))
    run_ui(by_id[run_id])
