"""Recommended training settings, each with a one-line reason, from the model, the device and the data.

:func:`recommend_hyperparameters` runs the rules of :mod:`mactuner.recommend.rules` in order (dtype → max length →
LoRA shape → method → batch and memory → schedule) against the device's free memory.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mactuner.models import ModelFootprint
from mactuner.recommend import rules
from mactuner.recommend.estimate import MemoryEstimate


@dataclass
class Recommendation:
    """Recommended settings for one model, dataset and device, each with its reason.

    Attributes:
        model: the model named.
        device: the device the settings are for.
        dtype: compute dtype name (``bfloat16``…).
        method: ``lora``, ``qlora`` or ``full``.
        batch_size: rows per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_length: longest sequence in tokens.
        lora_rank, lora_alpha: LoRA size and scaling.
        target_modules: the linear layers given adapters.
        learning_rate: peak AdamW learning rate.
        epochs: passes over the data.
        gradient_checkpointing: recompute activations to save memory.
        val_fraction: share of rows held out for the validation loss (0 below
            ``SMALL_DATASET_ROWS``: a small dataset needs every row to learn from).
        eval_every, save_every: steps between validation losses / checkpoints, scaled
            to the run's length so a run gets several of each (0: only at the end).
        gpus: GPUs training together (effective batch = batch_size x grad_accum x gpus).
        replay_rows: general questions with the base model's own answers mixed into the
            training rows so the model keeps what it knew (about half the rows of a small dataset, at most
            32; 0 for a large one: see ``rules.choose_schedule``).
        reasons: one line per setting, keyed by the setting's name.
        memory: the estimate for these settings.
        free_memory: bytes free on the device when recommending (``None`` if unknown).
        num_parameters: the model's parameters.
        trainable_parameters: parameters trained with these settings.
        dataset_rows: usable rows in the dataset (``None`` without a dataset).
        warnings: what the person should know (e.g. it does not fit).
    """

    model: str
    device: str
    dtype: str
    method: str
    batch_size: int
    grad_accum: int
    max_length: int
    lora_rank: int
    lora_alpha: float
    target_modules: list[str] | str
    learning_rate: float
    epochs: float
    gradient_checkpointing: bool
    reasons: dict[str, str]
    memory: MemoryEstimate
    free_memory: int | None
    num_parameters: int
    trainable_parameters: int
    dataset_rows: int | None = None
    warnings: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    eval_every: int = 50
    save_every: int = 100
    gpus: int = 1
    replay_rows: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("lora", "qlora", "full"):
            raise ValueError(f"method must be lora, qlora or full, got {self.method!r}")
        for name in ("batch_size", "grad_accum", "max_length", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def use_qlora(self) -> bool:
        """Whether the base model is quantized to 4 bits (QLoRA)."""
        return self.method == "qlora"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the memory estimate in bytes and GB)."""
        data = asdict(self)
        data["memory"] = self.memory.to_dict()
        data["use_qlora"] = self.use_qlora
        return data

    def train_config_values(self) -> dict[str, Any]:
        """The settings as :class:`mactuner.config.TrainConfig` field values."""
        return {
            "method": self.method,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_length": self.max_length,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
            "gradient_checkpointing": self.gradient_checkpointing,
            "val_fraction": self.val_fraction,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
            "gpus": self.gpus,
            "replay_rows": self.replay_rows,
        }


def free_memory_bytes(device: str | torch.device) -> tuple[int | None, int | None]:
    """``(available, total)`` bytes on ``device`` (``None`` where unknown)."""
    from mactuner.devices import memory_axes, memory_snapshot

    axes = memory_axes(memory_snapshot(device))
    return axes.get("available"), axes.get("total")


def reasons_markdown(reasons: dict[str, str]) -> str:
    """The reasons as a markdown list, one ``- **setting name**: reason`` line per setting."""
    return "\n".join(f"- **{name.replace('_', ' ')}**: {reason}" for name, reason in reasons.items())



def recommend_hyperparameters(
    model: str | None = None,
    dataset: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    footprint: ModelFootprint | None = None,
    summary: Any = None,
    free_memory: int | None = None,
    trust_remote_code: bool = False,
    gpus: int = 1,
) -> Recommendation:
    """Settings that fit ``device`` for fine-tuning ``model`` on ``dataset``.

    Args:
        model: a model source (see :func:`mactuner.models.load_model`); None: the default.
        dataset: a dataset file; its token lengths set the max length and the steps.
        device: the device to train on; None picks the best one.
        footprint: the model's footprint if already known (skips reading the config).
        summary: a :class:`mactuner.data.DatasetSummary` if already computed.
        free_memory: bytes to plan with instead of reading the device's free memory.
        trust_remote_code: allow the model's own code when reading its config.
        gpus: GPUs training together (data parallel): each holds the whole model and a
            micro-batch, so the memory is per GPU; the effective batch is kept at the
            target by accumulating fewer micro-batches (the learning rate then stays).
    """
    from mactuner.devices import get_optimal_dtype, resolve_device
    from mactuner.models import DEFAULT_MODEL, model_footprint

    device = resolve_device(device)
    model = model or DEFAULT_MODEL
    footprint = footprint or model_footprint(model, trust_remote_code=trust_remote_code)
    if summary is None and dataset is not None:
        summary = _summarize(model, dataset, trust_remote_code)
    if free_memory is None:
        free_memory, _ = free_memory_bytes(device)
    compute = get_optimal_dtype(device)
    budget = rules.memory_budget(free_memory)
    rows = summary.rows if summary is not None else None

    dtype = rules.choose_dtype(device, compute)
    length = rules.choose_max_length(summary, footprint.max_position_embeddings)
    max_length = length.values["max_length"]
    seq_len = min(max_length, summary.max_tokens) if summary is not None else max_length
    shape = rules.choose_lora_shape(rows, footprint)
    trained = rules.trained_per_row(summary, max_length)
    method = rules.choose_method(device, compute, footprint, budget, free_memory, seq_len=seq_len,
                                 rank=shape.values["lora_rank"], target_modules=shape.values["target_modules"],
                                 trained_tokens=trained)
    batch = rules.choose_batch(
        device, compute, footprint, method=method.values["method"], rank=shape.values["lora_rank"],
        target_modules=shape.values["target_modules"], seq_len=seq_len,
        trained_tokens=trained, rows=rows, budget=budget, free_memory=free_memory, gpus=gpus,
    )
    schedule = rules.choose_schedule(rows, batch.values["batch_size"], batch.values["grad_accum"], gpus)

    choices = (dtype, length, shape, method, batch, schedule)
    reasons = {key: reason for choice in choices for key, reason in choice.reasons.items()}
    # the order a person reads them in
    order = ("dtype", "max_length", "lora_rank", "lora_alpha", "target_modules", "method", "batch_size", "grad_accum",
             "gradient_checkpointing", "gpus", "learning_rate", "epochs", "replay_rows", "val_fraction", "save_every",
             "eval_every")
    reasons = {key: reasons[key] for key in order if key in reasons}
    values = {key: value for choice in choices for key, value in choice.values.items()}
    return Recommendation(
        model=str(model),
        device=str(device),
        free_memory=free_memory,
        num_parameters=footprint.num_parameters,
        trainable_parameters=footprint.lora_parameters(values["lora_rank"], values["target_modules"]),
        dataset_rows=rows,
        reasons=reasons,
        warnings=[warning for choice in choices for warning in choice.warnings],
        **values,
    )


def _summarize(model: str, dataset: str | os.PathLike, trust_remote_code: bool):
    """The dataset's summary under the model's tokenizer (loads the tokenizer only)."""
    from transformers import AutoTokenizer

    from mactuner.data import DatasetError, load_dataset_file, summarize_dataset
    from mactuner.data.preference import as_dataset_summary, is_preference_file, load_preference_file, summarize_preferences
    from mactuner.models import model_path

    _, path = model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if is_preference_file(dataset):
        # pairs (or labelled answers): a row holds both sequences of a pair
        try:
            load = load_preference_file(dataset, "dpo")
        except DatasetError:  # labelled single answers
            load = load_preference_file(dataset, "kto")
        return as_dataset_summary(summarize_preferences(load, tokenizer, 1_000_000))
    return summarize_dataset(load_dataset_file(dataset), tokenizer, max_length=1_000_000)

