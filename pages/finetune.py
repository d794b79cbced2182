"""Fine-tune: set up a run, start it in the background, watch it live, manage its checkpoints."""

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from mactuner import data, paths, runs
from mactuner.config import TrainConfig
from mactuner.models import DEFAULT_MODEL
from pages.common import selected_device
from pages.finetune_runs import runs_ui

SHARED_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data"


def model_ui() -> str:
    """The model to fine-tune: the built-in default, a hub id, or a local folder / .gguf file."""
    kind = st.radio("Model", ["Built-in (offline)", "Hugging Face hub id", "Local folder or .gguf file"], horizontal=True, key="finetune_model_kind")
    if kind.startswith("Built-in"):
        st.caption(f"{DEFAULT_MODEL}: ships with MacTuner, no download.")
        return DEFAULT_MODEL
    local = kind.startswith("Local")
    source = st.text_input("Path" if local else "Hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)", key="finetune_model_path").strip()
    if local and source and not Path(source).expanduser().exists():
        st.error(f"There is no folder or file at {source}.")
        return ""
    return str(Path(source).expanduser()) if local and source else source


def dataset_ui() -> Path | None:
    """The dataset file: a demo, a shared sample, or an upload (saved under MACTUNER_HOME)."""
    choices = {f"Demo: {name}": path for name, path in data.DEMO_DATASETS.items()}
    for path in sorted(SHARED_SAMPLES.rglob("*")) if SHARED_SAMPLES.is_dir() else []:
        if path.suffix in data.EXTENSIONS:
            choices[f"Sample: {path.relative_to(SHARED_SAMPLES)}"] = path
    choice = st.selectbox("Dataset", [*choices, "Upload a file…"], key="finetune_dataset")
    if choice in choices:
        return choices[choice]
    upload = st.file_uploader("Dataset file", type=[e.lstrip(".") for e in data.EXTENSIONS])
    if upload is None:
        return None
    target = paths.home() / "uploads" / Path(upload.name).name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(upload.getvalue())
    return target


@st.cache_resource(show_spinner="Loading the tokenizer…")
def tokenizer_for(model: str):
    from transformers import AutoTokenizer

    from mactuner.models import default_model_path

    if model == DEFAULT_MODEL:
        return AutoTokenizer.from_pretrained(default_model_path())
    if model.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(Path(model).parent, gguf_file=Path(model).name)
    return AutoTokenizer.from_pretrained(model)


@st.cache_data(show_spinner="Reading the dataset…")
def summarize(path: str, model: str, max_length: int, mtime: float) -> data.DatasetSummary:
    return data.summarize_dataset(data.load_dataset_file(path), tokenizer_for(model), max_length)


def summary_ui(summary: data.DatasetSummary) -> None:
    """Row count, format, token lengths (histogram) and truncation of the dataset."""
    cols = st.columns(4)
    cols[0].metric("Rows", f"{summary.rows} / {summary.total_rows}", help="usable / in the file")
    cols[1].metric("Format", summary.format)
    cols[2].metric("Tokens (median / p95)", f"{summary.median_tokens:.0f} / {summary.p95_tokens}")
    cols[3].metric("Truncated rows", summary.truncated_rows, help=f"rows longer than {summary.max_length} tokens")
    figure = go.Figure(go.Histogram(x=summary.token_lengths, nbinsx=40))
    figure.add_vline(x=summary.max_length, line_dash="dash", annotation_text="max length")
    figure.update_layout(height=220, margin=dict(t=10, b=30), xaxis_title="tokens per row", yaxis_title="rows")
    st.plotly_chart(figure, key="finetune_histogram")
    for problem in summary.problems[:5]:
        st.warning(problem)



def settings_ui(defaults: TrainConfig) -> dict:
    """Editable training settings, starting from ``defaults``; returns the TrainConfig fields chosen."""
    help_ = TrainConfig.help()
    cols = st.columns(4)
    chosen = {
        "batch_size": cols[0].number_input("Batch size", 1, 512, defaults.batch_size, help=help_["batch_size"]),
        "grad_accum": cols[1].number_input("Gradient accumulation", 1, 512, defaults.grad_accum, help=help_["grad_accum"]),
        "max_length": cols[2].number_input("Max length", 16, 32768, defaults.max_length, help=help_["max_length"]),
        "learning_rate": cols[3].number_input("Learning rate", 1e-7, 0.1, defaults.learning_rate, format="%.1e", help=help_["learning_rate"]),
        "epochs": cols[0].number_input("Epochs", 0.1, 100.0, float(defaults.epochs), help=help_["epochs"]),
        "max_steps": cols[1].number_input("Max steps (0: from epochs)", 0, 10**6, defaults.max_steps or 0, help=help_["max_steps"]) or None,
        "save_every": cols[2].number_input("Checkpoint every (steps)", 0, 10**6, defaults.save_every, help=help_["save_every"]),
        "eval_every": cols[3].number_input("Validate every (steps)", 0, 10**6, defaults.eval_every, help=help_["eval_every"]),
    }  # fmt: skip
    if defaults.method != "full":
        chosen["lora_rank"] = cols[0].number_input("LoRA rank", 1, 1024, defaults.lora_rank, help=help_["lora_rank"])
        chosen["lora_alpha"] = cols[1].number_input("LoRA alpha", 0.5, 4096.0, float(defaults.lora_alpha), help=help_["lora_alpha"])
    chosen["gradient_checkpointing"] = cols[2].checkbox("Gradient checkpointing", defaults.gradient_checkpointing, help=help_["gradient_checkpointing"])
    return chosen


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
    """Model, dataset and its summary, method, settings; then the start button."""
    device = str(selected_device())
    model, dataset = model_ui(), dataset_ui()
    method = st.radio("Method", ["lora", "qlora", "full"], horizontal=True, key="finetune_method",
                      format_func={"lora": "LoRA", "qlora": "QLoRA (4-bit, CUDA)", "full": "Full fine-tuning"}.get)  # fmt: skip
    if not model or dataset is None:
        st.info("Choose a model and a dataset to see the recommended settings.")
        return
    settings = settings_ui(TrainConfig(model=model, dataset=str(dataset), method=method, device=device))
    try:
        summary = summarize(str(dataset), model, int(settings["max_length"]), Path(dataset).stat().st_mtime)
        config = TrainConfig(model=model, dataset=str(dataset), method=method, device=device, **settings)
    except (data.DatasetError, OSError, ValueError) as exc:
        st.error(str(exc))
        st.stop()
    summary_ui(summary)
    start_ui(config, Path(dataset).stem)


st.title("Fine-tune")
setup_box = st.expander("Set up a new run", expanded=True)
st.subheader("Runs")
runs_ui()
with setup_box:
    setup_ui()
