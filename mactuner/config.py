"""The settings of one training run: :class:`TrainConfig`.

One dataclass holds everything a run needs, each field documented in its
``metadata["help"]`` (the fine-tune page shows these as tooltips). It checks
itself when built and names the bad value, and it round-trips exactly through
``to_dict``/``from_dict`` and YAML (``save``/``load``), so ``RUN/config.yaml`` is
the whole truth about a run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mactuner.safe_yaml import short_repr

# kept in sync with mactuner.models.DEFAULT_MODEL; not imported from there so that
# reading a config does not import torch
DEFAULT_MODEL = "SmolLM2-135M-Instruct"

METHODS = ("lora", "qlora", "full")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_CHOICES = ("auto", "on", "off")
ENGINES = ("auto", "torch", "mlx")
OBJECTIVES = ("sft", "dpo", "orpo", "kto")
DPO_LOSSES = ("sigmoid", "ipo")
TRACKERS = ("none", "tensorboard", "mlflow")


@dataclass
class TrainConfig:
    """Everything one fine-tuning run needs. See ``configs/example.yaml`` for the trade-offs."""

    # what to train on
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Model to fine-tune: the built-in default, a Hugging Face hub id, a local folder or a .gguf file."},
    )
    dataset: str = field(
        default="",
        metadata={"help": "Path of the dataset file (JSON, JSONL, CSV, Parquet or TXT)."},
    )
    dataset_format: str | None = field(
        default=None,
        metadata={"help": "Dataset format (alpaca, sharegpt, messages, prompt_completion, text); None detects it."},
    )
    val_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the rows held out for validation loss (0 turns validation off)."},
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Longest sequence in tokens; longer rows are truncated. Memory grows with it."},
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Learn only from the assistant's tokens (True) or from the whole conversation (False)."},
    )
    replay_rows: int = field(
        default=0,
        metadata={
            "help": "Mix this many general questions, answered by the base model itself, into the training rows: "
            "they keep what the base knew while a small dataset teaches its facts (0: off; answers made once per base "
            "model and cached)."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several rows into each max_length sequence (no padding at all, rows still never see "
            "each other); False groups rows of similar length into each batch instead."
        },
    )

    # what to learn: supervised answers or preferences between answers
    objective: str = field(
        default="sft",
        metadata={
            "help": "sft (learn the answers), dpo (prefer the chosen answer of each pair over the rejected one, "
            "against the base model), orpo (learn the chosen answer and prefer it, no reference pass) or kto "
            "(single answers labelled good or bad)."
        },
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "Preference strength (dpo, orpo, kto): higher keeps closer to the base model (dpo, kto) "
                  "or weighs the preference more against learning the chosen answer (orpo)."},
    )
    dpo_loss: str = field(
        default="sigmoid",
        metadata={"help": "DPO loss: sigmoid (the DPO paper's) or ipo (squared, per-token log-ratios; less prone to overfitting)."},
    )
    kto_desirable_weight: float = field(
        default=1.0, metadata={"help": "KTO: weight of the answers labelled good (raise it when they are fewer)."}
    )
    kto_undesirable_weight: float = field(
        default=1.0, metadata={"help": "KTO: weight of the answers labelled bad (raise it when they are fewer)."}
    )

    # how to train
    method: str = field(
        default="lora",
        metadata={"help": "lora (small adapter), qlora (adapter on a quantized base: 4-bit on CUDA, int8 on a CPU) or full (every weight)."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank: higher learns more, costs more memory."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: the update is scaled by alpha/rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input; regularises small datasets."})
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Layers that get an adapter: a list of module names or 'all-linear'."},
    )
    batch_size: int = field(default=4, metadata={"help": "Micro-batch: rows per forward pass. Memory grows with it."})
    grad_accum: int = field(
        default=1,
        metadata={"help": "Micro-batches per optimizer step; effective batch = batch_size x grad_accum x processes."},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training rows (ignored when max_steps is set)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps to run; None derives them from epochs."})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Share of the steps spent ramping the learning rate up from 0."}
    )
    warmup_steps: int | None = field(default=None, metadata={"help": "Warm-up steps; when set it overrides warmup_ratio."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "Learning-rate decay after warm-up: cosine, linear or constant."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the gradient norm to this; None turns clipping off."}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass: much less memory, about 30% slower."},
    )
    compile: str = field(
        default="auto",
        metadata={
            "help": "torch.compile the decoder layers: auto (on a CPU, when the rest of the run saves more time than "
            "compiling costs, judged after step 2), on, or off."
        },
    )

    engine: str = field(
        default="auto",
        metadata={
            "help": "What trains: auto (MLX on an Apple-silicon Mac where mlx is installed, PyTorch elsewhere), "
            "torch (PyTorch on the chosen device) or mlx (Apple's MLX: LoRA and QLoRA on a 4-bit base)."
        },
    )

    # evaluation and checkpoints
    eval_every: int = field(default=50, metadata={"help": "Steps between validation losses (0: only at the end)."})
    save_every: int = field(default=100, metadata={"help": "Steps between checkpoints (0: only at the end)."})
    keep_last: int = field(default=2, metadata={"help": "Checkpoints kept besides the best one by validation loss."})
    log_every: int = field(default=1, metadata={"help": "Steps between progress reports."})
    forgetting_check: bool = field(
        default=True,
        metadata={
            "help": "After training, ask the base and the tuned model MacTuner's general-knowledge questions and report "
            "how many of the things the base model knew the tuned one kept (RUN/forgetting.json; a few seconds)."
        },
    )

    # where and how precisely
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:N or mps; None: the remembered device, else the best one (MPS > CUDA > CPU)."})
    gpus: int = field(
        default=1,
        metadata={
            "help": "GPUs to train on together (data parallel, one process each under torchrun --standalone): "
            "effective batch = batch_size x grad_accum x gpus. 1 trains in one process."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Compute precision: auto (the device's best), float32, bfloat16 or float16."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for the split, the data order, the adapter's initial weights and dropout."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped with the model. Only for models whose authors you trust."},
    )

    # where else the run shows up
    report_to: list[str] | str = field(
        default="none",
        metadata={"help": "Trackers that also log the run: none, tensorboard, mlflow, or a list of them."},
    )
    mlflow_tracking_uri: str | None = field(
        default=None,
        metadata={"help": "MLflow tracking URI; None logs to mlruns/ under MacTuner's data folder."},
    )

    def __post_init__(self) -> None:
        """Check every value; the error names the field, the bad value and what is allowed."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must name a model, got {short_repr(self.model)}")
        if not isinstance(self.dataset, str):
            raise ValueError(f"dataset must be a file path, got {short_repr(self.dataset)}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {short_repr(self.method)}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {short_repr(self.lr_scheduler)}")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {short_repr(self.compile)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {short_repr(self.engine)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {short_repr(self.objective)}")
        if self.dpo_loss not in DPO_LOSSES:
            raise ValueError(f"dpo_loss must be one of {', '.join(DPO_LOSSES)}, got {short_repr(self.dpo_loss)}")
        for name in ("beta", "kto_desirable_weight", "kto_undesirable_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a positive number, got {short_repr(value)}")
        trackers = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not (isinstance(trackers, list) and trackers and all(t in TRACKERS for t in trackers)):
            raise ValueError(f"report_to must be one of {', '.join(TRACKERS)} or a list of them, got {short_repr(self.report_to)}")
        if "none" in trackers and len(trackers) > 1:
            raise ValueError(f"report_to cannot list none with a tracker, got {short_repr(self.report_to)}")
        if self.mlflow_tracking_uri is not None and not (isinstance(self.mlflow_tracking_uri, str) and self.mlflow_tracking_uri.strip()):
            raise ValueError(f"mlflow_tracking_uri must be None or a URI, got {short_repr(self.mlflow_tracking_uri)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {short_repr(self.dtype)}")
        for name in ("lora_rank", "max_length", "batch_size", "grad_accum", "log_every", "gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {short_repr(value)}")
        for name in ("eval_every", "save_every", "keep_last", "seed", "replay_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {short_repr(value)}")
        for name in ("max_steps", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_steps" else 0)):
                raise ValueError(f"{name} must be None or a whole number >= {1 if name == 'max_steps' else 0}, got {short_repr(value)}")
        if not _is_number(self.learning_rate) or not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be between 0 and 1, got {short_repr(self.learning_rate)}")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {short_repr(self.lora_alpha)}")
        if not _is_number(self.epochs) or self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {short_repr(self.epochs)}")
        for name in ("lora_dropout", "val_fraction", "warmup_ratio"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {short_repr(value)}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {short_repr(self.weight_decay)}")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise ValueError(f"max_grad_norm must be None or positive, got {short_repr(self.max_grad_norm)}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                raise ValueError(f"target_modules must be a list of module names or 'all-linear', got {short_repr(self.target_modules)}")
        elif not (
            isinstance(self.target_modules, list)
            and self.target_modules
            and all(isinstance(m, str) and m for m in self.target_modules)
        ):
            raise ValueError(f"target_modules must be a list of module names or 'all-linear', got {short_repr(self.target_modules)}")
        if self.device is not None and not (isinstance(self.device, str) and self.device.split(":")[0] in ("cpu", "cuda", "mps")):
            raise ValueError(f"device must be None, cpu, cuda, cuda:N or mps, got {short_repr(self.device)}")
        if self.gpus > 1 and isinstance(self.device, str) and self.device.startswith("mps"):
            raise ValueError(f"gpus must be 1 on mps (a Mac has one GPU), got {self.gpus}")
        if self.gpus > 1 and isinstance(self.device, str) and self.device.startswith("cuda:") and self.device != "cuda:0":
            raise ValueError(
                f"gpus={self.gpus} trains on cuda:0 to cuda:{self.gpus - 1}; set device to cuda, not {short_repr(self.device)} "
                "(pick other cards with CUDA_VISIBLE_DEVICES)"
            )
        for name in ("assistant_only_loss", "packing", "gradient_checkpointing", "trust_remote_code", "forgetting_check"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {short_repr(getattr(self, name))}")

    @property
    def trackers(self) -> list[str]:
        """The trackers to log to (``report_to`` as a list, without ``none``)."""
        listed = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [t for t in listed if t != "none"]

    @property
    def preference(self) -> bool:
        """True when the objective learns from preferences (dpo, orpo, kto) rather than answers (sft)."""
        return self.objective != "sft"

    @property
    def effective_batch_size(self) -> int:
        """Rows per optimizer step: micro-batch x accumulation x GPUs (processes)."""
        return self.batch_size * self.grad_accum * self.gpus

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (lists copied), ready for YAML or JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; an unknown key is an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {short_repr(', '.join(map(str, unknown)))}; known settings: {', '.join(sorted(known))}")
        values = dict(values)
        # YAML reads 2e-4 as a string (YAML 1.1 wants a dot); accept what a person naturally writes
        for f in dataclasses.fields(cls):
            if f.name in values and isinstance(values[f.name], str) and f.type in ("float", "float | None"):
                try:
                    values[f.name] = float(values[f.name])
                except ValueError:
                    pass
        return cls(**values)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as YAML (atomically: a half-written config is never read)."""
        from mactuner.fileio import write_text_atomic

        return write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML config written by :meth:`save` or by hand (unset keys keep their defaults)."""
        from mactuner.safe_yaml import load_yaml_file

        path = Path(path)
        values = load_yaml_file(path) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config must be a mapping of settings, got {type(values).__name__}")
        return cls.from_dict(values)

    @classmethod
    def help(cls, reasons: dict[str, str] | None = None) -> dict[str, str]:
        """Field name -> its one-line help text, or the reason ``reasons`` gives for it (e.g. a
        :class:`mactuner.recommend.Recommendation`'s reasons for the values it chose)."""
        reasons = reasons or {}
        return {f.name: reasons.get(f.name) or f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
