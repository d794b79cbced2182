"""Fine-tune: set up a run, start it in the background, watch it live, manage its checkpoints.

Two tabs, "New run" and "Runs"; only the open one runs. Start switches to "Runs" with the new run
selected, so its live view is what the person sees next. The set-up widgets live in
``ui/finetune_setup.py`` and the runs view in ``ui/finetune_runs.py``; the work is done by
:mod:`mactuner.runs` and the trainer process it starts.
"""

from pathlib import Path

import streamlit as st

from mactuner import data, runs
from mactuner.config import TrainConfig
from mactuner.models import ModelSourceError
from mactuner.training.engines import choose_engine
from mactuner.training.multi_gpu import cuda_count, gpus_problem
from mactuner.training.qlora import qlora_problem
from ui import finetune_preference as preference
from ui.common import device_or_stop, ensure_frame
from ui.finetune_runs import runs_ui
from ui.finetune_setup import (
    dataset_ui,
    engine_ui,
    footprint_for,
    memory_ui,
    model_ui,
    recommend,
    settings_ui,
    summarize,
    summary_ui,
    tokenizer_for,
)
from ui.preflight_ui import check_fit_ui

ensure_frame()  # opened by its URL on a fresh server: run inside app.py's frame

METHODS = {"lora": "LoRA", "qlora": "QLoRA (4-bit on CUDA and MLX, int8 on CPU)", "full": "Full fine-tuning"}
TABS = ("New run", "Runs")
TAB_KEY = "finetune_tab"
START_PROBLEM = "finetune_start_problem"  # why the last Start did not start, shown under the button


def gpus_ui(device: str) -> int:
    """"Use N GPUs" where this machine has several CUDA GPUs (1 elsewhere); a refused choice stops the page."""
    count = cuda_count() if device.startswith("cuda") else 0
    if count < 2:
        return 1
    gpus = st.number_input("Use N GPUs", 1, count, 1, key="finetune_gpus",
                           help=TrainConfig.help()["gpus"] + " Each GPU holds the whole model: the memory shown is per GPU.")
    if problem := gpus_problem(int(gpus), device):
        st.error(problem)
        st.stop()
    return int(gpus)


def start_run(config: TrainConfig, name: str) -> None:
    """Start button callback: start the run, then open the Runs tab on it (before the page reruns)."""
    try:
        run = runs.start_run(config, name=name, force=st.session_state.get("finetune_force", False))
    except runs.RunConflict as exc:
        st.session_state[START_PROBLEM] = ("warning", f"{exc} Tick the box above to start anyway.")
    except (runs.RunError, OSError) as exc:
        st.session_state[START_PROBLEM] = ("error", f"Could not start the run: {exc}")
    else:
        st.session_state.pop(START_PROBLEM, None)
        st.session_state["finetune_select"] = run.id  # the runs view selects it
        st.session_state["finetune_started"] = run.id  # and says it started, once
        st.session_state[TAB_KEY] = "Runs"


def start_ui(config: TrainConfig, name: str) -> None:
    """The start button: starts the run in the background and lands on its live view."""
    st.checkbox("Start even if another run is training on this device", key="finetune_force")
    st.button("Start training", type="primary", key="finetune_start", on_click=start_run, args=(config, name))
    if problem := st.session_state.pop(START_PROBLEM, None):
        getattr(st, problem[0])(problem[1])


def tabs_ui() -> tuple:
    """The "New run" and "Runs" tabs; a session opens on "Runs" while a run trains, else on "New run"."""
    if "finetune_tab_default" not in st.session_state:
        st.session_state["finetune_tab_default"] = "Runs" if any(r.is_running for r in runs.list_runs()) else "New run"
    return st.tabs(TABS, key=TAB_KEY, on_change="rerun", default=st.session_state["finetune_tab_default"])


def setup_ui() -> None:
    """Model, dataset and its summary, method, recommended settings and their memory; then the start button."""
    device = str(device_or_stop())
    model, dataset = model_ui(), dataset_ui()
    if not model or dataset is None:
        st.info("Choose a model and a dataset to see the recommended settings.")
        return
    objective = preference.objective_ui(str(dataset))
    gpus = gpus_ui(device)
    if gpus > 1:
        device = "cuda"  # one process on each of cuda:0 … cuda:N-1
    try:
        mtime = Path(dataset).stat().st_mtime
        # the model's footprint first: its errors say best what is wrong with the model
        if objective == "sft":
            recommended = recommend(model, str(dataset), device, mtime, gpus)
            summary = summarize(str(dataset), model, mtime)
        else:
            recommended = preference.recommend(model, str(dataset), device, mtime, footprint_for(model))
            summary = preference.summarize(str(dataset), model, objective, mtime, tokenizer_for(model))
    except (ModelSourceError, data.DatasetError, OSError, ValueError) as exc:
        st.error(str(exc))
        st.stop()
    for warning in recommended.warnings:
        st.warning(warning)
    method = st.radio("Method", list(METHODS), index=list(METHODS).index(recommended.method), horizontal=True,
                      format_func=METHODS.get, help=recommended.reasons.get("method"))
    engine = engine_ui(method)
    mlx = choose_engine(engine, method).engine == "mlx"  # MLX's QLoRA is a 4-bit base on any Mac
    if mlx and method == "full":
        st.error("The MLX engine trains LoRA and QLoRA adapters: for full fine-tuning choose the PyTorch engine.")
        st.stop()
    if method == "qlora" and not mlx and (problem := qlora_problem(device.split(":")[0])):
        st.error(problem)
        st.stop()
    defaults = {**TrainConfig().to_dict(), **recommended.train_config_values()}
    settings = settings_ui(defaults, recommended.reasons, method, device)
    if objective != "sft":
        settings.update(objective=objective, **preference.settings_ui(objective))
        preference.summary_ui(summary, settings["max_length"])
    else:
        summary_ui(summary, settings["max_length"])
    settings.update(preference.trackers_ui())
    try:
        config = TrainConfig(**{**defaults, **settings, "model": model, "dataset": str(dataset), "method": method,
                                "device": device, "gpus": gpus, "engine": engine})
    except ValueError as exc:
        st.error(str(exc))
        st.stop()
    memory_ui(config, summary, device)
    fitting = check_fit_ui(config)
    if fitting is not None:  # the person chose the settings that fit: start with them
        start_run(fitting, Path(dataset).stem)
        st.rerun()
    start_ui(config, Path(dataset).stem)


st.title("Fine-tune")
setup_tab, runs_tab = tabs_ui()
if setup_tab.open:
    with setup_tab:
        setup_ui()
if runs_tab.open:
    with runs_tab:
        runs_ui()
