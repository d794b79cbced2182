"""UI-only part of the fine-tune page: choosing the model and dataset, the dataset's
summary, the recommended settings (editable) and their memory estimate.

The computing is in :mod:`mactuner.data`, :mod:`mactuner.models` and
:mod:`mactuner.recommend`; here it is only cached and rendered. Not a page itself.
"""

from pathlib import Path

import streamlit as st

from mactuner import data
from mactuner.config import COMPILE_CHOICES, ENGINES, TrainConfig
from mactuner.devices import optimal_dtype_reason
from mactuner.evaluation.replay import REPLAY_SET_SIZE
from mactuner.models import DEFAULT_MODEL, model_footprint, model_path
from mactuner.recommend import estimate_for_config, free_memory_bytes, reasons_markdown, recommend_hyperparameters
from mactuner.runs.views import effective_batch_text
from mactuner.training.engines import choose_engine

SUMMARY_MAX_LENGTH = 1_000_000  # summarize untruncated; truncation is counted for the chosen max length
INPUT_WIDTH = 190  # px per setting: rows of inputs wrap to fit the window (two per row at 800 px, +/- kept)
DTYPES = ("auto", "bfloat16", "float16", "float32")  # the Precision choices, in this order


def model_ui() -> str:
    """The model to fine-tune: the built-in default, a hub id, or a local folder / .gguf file."""
    kind = st.radio("Model", ["Built-in (offline)", "Hugging Face hub id", "Local folder or .gguf file"],
                    horizontal=True, key="finetune_model_kind")
    if kind.startswith("Built-in"):
        st.caption(f"{DEFAULT_MODEL}: ships with MacTuner, no download.")
        return DEFAULT_MODEL
    local = kind.startswith("Local")
    label = "Path" if local else "Hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)"
    source = st.text_input(label, key="finetune_model_path").strip()
    return str(Path(source).expanduser()) if local and source else source


def dataset_ui() -> Path | None:
    """The dataset file: a demo, an earlier upload, or a new upload (saved under MACTUNER_HOME)."""
    choices = data.dataset_choices()
    choice = st.selectbox("Dataset", [*choices, "Upload a file…"], key="finetune_dataset")
    if choice in choices:
        return choices[choice]
    upload = st.file_uploader("Dataset file", type=[e.lstrip(".") for e in data.EXTENSIONS])
    return None if upload is None else saved_upload(upload)


def saved_upload(upload) -> Path | None:
    """The upload's file under MACTUNER_HOME, saved once per content, not on every rerun (:class:`data.SavedUploads`)."""
    uploads = st.session_state.setdefault("finetune_uploads", data.SavedUploads())  # this session's, by content
    try:
        return uploads.save(upload.file_id, upload.name, upload.getvalue)
    except (OSError, data.DatasetError) as exc:
        st.error(f"Could not keep the upload: {exc}")
        return None


@st.cache_resource(show_spinner="Loading the tokenizer…")
def tokenizer_for(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(model)[1])


@st.cache_data(show_spinner="Reading the dataset…")
def summarize(path: str, model: str, mtime: float) -> data.DatasetSummary:
    return data.summarize_dataset(data.load_dataset_file(path), tokenizer_for(model), SUMMARY_MAX_LENGTH)


@st.cache_resource(show_spinner="Reading the model's size…")
def footprint_for(model: str):
    return model_footprint(model)


@st.cache_data(show_spinner="Recommending settings…", ttl=600)
def recommend(model: str, dataset: str, device: str, mtime: float, gpus: int = 1):
    """Recommended settings for this model, dataset, device and GPUs (free memory read now, kept 10 min)."""
    return recommend_hyperparameters(model, device=device, footprint=footprint_for(model),
                                     summary=summarize(dataset, model, mtime), gpus=gpus)


def summary_ui(summary: data.DatasetSummary, max_length: int) -> None:
    """Row count, format, token lengths (histogram) and truncation at ``max_length``."""
    with st.container(horizontal=True, wrap=True):
        st.metric("Rows", f"{summary.rows} / {summary.total_rows}", help="usable / in the file", width=INPUT_WIDTH)
        st.metric("Format", summary.format, width=INPUT_WIDTH)
        st.metric("Tokens per row", f"{summary.median_tokens:.0f} / {summary.p95_tokens}", width=INPUT_WIDTH,
                  help="median / 95th percentile")
        st.metric("Truncated rows", summary.rows_longer_than(max_length), width=INPUT_WIDTH,
                  help=f"rows longer than the max length ({max_length} tokens)")
    if summary.sampled_rows:
        st.caption(f"Token lengths from an even sample of {summary.sampled_rows:,} rows; counts scaled to the file.")
    st.plotly_chart(data.token_length_figure(summary, max_length), key="finetune_histogram")
    for problem in summary.problems[:5]:
        st.warning(problem)


def settings_ui(recommended: dict, reasons: dict, method: str, device: str = "cpu") -> dict:
    """Editable settings starting from the recommended ones (each input's help says why); TrainConfig fields.

    The inputs sit in a wrapping row (not fixed columns), so a narrow window gets fewer per row
    and every input keeps its +/- buttons and its whole label.
    """
    why = TrainConfig.help(reasons)
    why["max_steps"] += " Here 0 means: from the epochs."
    row = st.container(horizontal=True, wrap=True)

    def number(label: str, name: str, lo, hi, **kwargs):
        # the value takes the bounds' type: streamlit refuses an int value with float bounds
        return row.number_input(label, lo, hi, type(lo)(recommended[name] or 0), help=why[name], width=INPUT_WIDTH,
                                **kwargs)

    chosen = {
        "batch_size": number("Batch size", "batch_size", 1, 512),
        "grad_accum": number("Gradient accumulation", "grad_accum", 1, 512),
        "max_length": number("Max length", "max_length", 16, 131072),
        "learning_rate": number("Learning rate", "learning_rate", 1e-7, 0.5, format="%.1e"),
        "epochs": number("Epochs", "epochs", 0.1, 100.0),
        "max_steps": number("Max steps", "max_steps", 0, 10**6) or None,
        "save_every": number("Checkpoint every", "save_every", 0, 10**6),
        "eval_every": number("Validate every", "eval_every", 0, 10**6),
        # general questions the base model answers itself, trained beside the rows (mactuner.evaluation.replay)
        "replay_rows": number("Replay rows", "replay_rows", 0, REPLAY_SET_SIZE),
    }
    if method != "full":
        chosen["lora_rank"] = number("LoRA rank", "lora_rank", 1, 1024)
        chosen["lora_alpha"] = number("LoRA alpha", "lora_alpha", 0.5, 4096.0)
    chosen["gradient_checkpointing"] = st.checkbox("Gradient checkpointing", recommended["gradient_checkpointing"],
                                                   help=why["gradient_checkpointing"])
    chosen["dtype"] = dtype_ui(row, device)
    chosen["compile"] = row.selectbox("Compile layers", COMPILE_CHOICES, key="finetune_compile", help=why["compile"],
                                      width=INPUT_WIDTH)
    with st.expander("Why these settings"):
        st.markdown(reasons_markdown(reasons))
    return chosen


def engine_ui(method: str) -> str:
    """Which engine trains: ``auto`` (shown with what it picks here and why), ``torch`` or ``mlx``."""
    auto = choose_engine("auto", method)
    engine = st.radio("Engine", ENGINES, horizontal=True, key="finetune_engine", help=f"auto = {auto.reason}",
                      format_func=lambda e: f"auto ({'MLX' if auto.engine == 'mlx' else 'PyTorch'})" if e == "auto" else
                      {"torch": "PyTorch", "mlx": "MLX"}[e])
    st.caption(choose_engine(engine, method).reason)
    return engine


def dtype_ui(row, device: str) -> str:
    """Precision: ``auto`` (the device's best, with the reason) or a fixed dtype."""
    reason = optimal_dtype_reason(device)
    return row.selectbox(
        "Precision", DTYPES, key="finetune_dtype", format_func=lambda d: f"auto ({reason.split(':')[0]})" if d == "auto" else d,
        help=f"auto = {reason}. float16 can overflow on models trained in bfloat16 (the run then stops with "
             "advice); float32 is the safe, slower fallback.", width=INPUT_WIDTH,
    )


def memory_ui(config: TrainConfig, summary: data.DatasetSummary, device: str) -> None:
    """The memory estimate of ``config`` (recomputed as settings change), warned about when it exceeds free memory."""
    estimate = estimate_for_config(config, summary, device, footprint=footprint_for(config.model))
    headline, warning = estimate.summary(free_memory_bytes(device)[0], device)
    st.markdown(headline + (" (per GPU)" if config.gpus > 1 else ""))
    st.caption(effective_batch_text(config.batch_size, config.grad_accum, config.gpus))
    if warning:
        st.warning(warning)

