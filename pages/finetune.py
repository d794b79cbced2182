"""Fine-tune: set up a run, start it in the background, watch it live, manage its checkpoints.

The set-up widgets live in ``pages/finetune_setup.py`` and the runs view in
``pages/finetune_runs.py``; the work is done by :mod:`mactuner.runs` and the
trainer process it starts.
"""

from pathlib import Path

import streamlit as st

from mactuner import data, runs
from mactuner.config import TrainConfig
from mactuner.models import ModelSourceError
from pages.common import device_or_stop
from pages.finetune_runs import runs_ui
from pages.finetune_setup import dataset_ui, memory_ui, model_ui, recommend, settings_ui, summarize, summary_ui

METHODS = {"lora": "LoRA", "qlora": "QLoRA (4-bit, CUDA)", "full": "Full fine-tuning"}


def start_ui(config: TrainConfig, name: str) -> None:
    """The start button: starts the run in the background and returns at once."""
    force = st.checkbox("Start even if another run is training on this device", key="finetune_force")
    if st.button("Start training", type="primary", key="finetune_start"):
        try:
            run = runs.start_run(config, name=name, force=force)
        except runs.RunConflict as exc:
            st.warning(f"{exc} Tick the box above to start anyway.")
        except (runs.RunError, OSError) as exc:
            st.error(f"Could not start the run: {exc}")
        else:
            st.session_state["finetune_select"] = run.id  # the runs list picks it at its next refresh
            st.toast(f"Started {run.id}; it trains in the background.")


def setup_ui() -> None:
    """Model, dataset and its summary, method, recommended settings and their memory; then the start button."""
    device = str(device_or_stop())
    model, dataset = model_ui(), dataset_ui()
    if not model or dataset is None:
        st.info("Choose a model and a dataset to see the recommended settings.")
        return
    try:
        mtime = Path(dataset).stat().st_mtime
        # the model's footprint first: its errors say best what is wrong with the model
        recommended = recommend(model, str(dataset), device, mtime)
        summary = summarize(str(dataset), model, mtime)
    except (ModelSourceError, data.DatasetError, OSError, ValueError) as exc:
        st.error(str(exc))
        st.stop()
    for warning in recommended.warnings:
        st.warning(warning)
    method = st.radio("Method", list(METHODS), index=list(METHODS).index(recommended.method), horizontal=True,
                      format_func=METHODS.get, help=recommended.reasons.get("method"))
    defaults = {**TrainConfig().to_dict(), **recommended.train_config_values()}
    settings = settings_ui(defaults, recommended.reasons, method, device)
    summary_ui(summary, settings["max_length"])
    try:
        config = TrainConfig(**{**defaults, **settings, "model": model, "dataset": str(dataset), "method": method,
                                "device": device})
    except ValueError as exc:
        st.error(str(exc))
        st.stop()
    memory_ui(config, summary, device)
    start_ui(config, Path(dataset).stem)


st.title("Fine-tune")
setup_box = st.expander("Set up a new run", expanded=True)
st.subheader("Runs")
runs_ui()
with setup_box:
    setup_ui()
