"""Recommended training settings and a memory estimate, from the model, the device and the data.

:func:`estimate_memory` predicts the peak memory of a training run from the
model's shapes alone (:class:`mactuner.models.ModelFootprint`) and the run's
settings, broken down into the weights; the trainable parameters with their
gradients and AdamW state; the activations kept for the backward pass and the
LM-head loss; and the runtime's own memory. It mirrors what MacTuner's trainer
(``mactuner.training``) allocates: frozen weights in the compute dtype, LoRA
adapters in the compute dtype with float32 master weights only when that dtype
is 16-bit, logits computed only where a token is trained and at most
``LOSS_CHUNK_TOKENS`` at a time, and on the CPU a heap that returns large freed
blocks (``devices.limit_host_heap_growth``). What it predicts is what a person
sees: on the CPU the training process's whole resident memory (Python, torch
and transformers included); on a GPU the device memory the process takes, its
CUDA context included. ``tests/test_recommend.py`` checks it against the peak of
real runs in float32 and in bfloat16, with and without gradient checkpointing (±25 %).

:func:`recommend_hyperparameters` picks settings that fit the device's free
memory, each with a one-line reason.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mactuner.devices import parse_dtype
from mactuner.models import ModelFootprint
from mactuner.training.losses import LOSS_CHUNK_TOKENS

GB = 1024**3
MB = 1024**2

# --- the trainer's allocations, per token and per transformer block -----------------------
# bytes kept for the backward pass, in units of the compute dtype's size: the MLP keeps about
# four intermediate-wide tensors (gate, up, activation, product) and the attention about two
# hidden-wide ones. Measured on SmolLM2-135M (CPU, batch 4, 256 -> 512 tokens): 0.84 MiB per
# token in float32 (formula: 0.90) and 0.48 MiB in bfloat16 (formula: 0.48).
_ACT_HIDDEN = 2
_ACT_INTERMEDIATE = 4
# RMSNorm computes in float32 and keeps a float32, hidden-wide tensor per token
_ACT_FLOAT32_HIDDEN = 1
# the chunked LM-head loss, per trained token of one chunk and per vocabulary entry: the
# float32 logits and their softmax-minus-one-hot (in place), plus the cast back to the
# compute dtype for the hidden states' gradient. Measured: 11 bytes in float32.
_LOSS_FLOAT32_COPIES = 2
# what a training process holds besides its tensors. CPU and MPS (unified memory): Python,
# torch, transformers and peft once imported (457 MiB measured on Linux) plus the tokenizer,
# the data and kernel workspaces (about 90 MiB measured). CUDA: the context that the driver
# creates on the device (not in torch's counters; a few hundred MB, not measured here) plus
# cuBLAS workspaces.
_RUNTIME_IMPORTS = 457 * MB
_CPU_WORKSPACE = 96 * MB
_CUDA_CONTEXT = 500 * MB
_GPU_WORKSPACE = 64 * MB
# AdamW: two float32 moments per trainable parameter
_ADAM_BYTES = 8

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# below this many rows, holding rows out for validation costs facts the model never sees:
# the recommendation trains on every row and turns the validation split off (and says so)
SMALL_DATASET_ROWS = 100
# a run gets about this many checkpoints and validation losses, whatever its length
CHECKPOINTS_PER_RUN = 4


def method_available(method: str, device_type: str = "cuda") -> bool:
    """Whether ``method`` can train on ``device_type`` here (:func:`mactuner.training.qlora.qlora_problem`
    says why QLoRA cannot: bitsandbytes missing on CUDA, no exact int8 matmul on a CPU, MPS)."""
    from mactuner.training.qlora import qlora_problem

    return method != "qlora" or qlora_problem(device_type) is None


@dataclass
class MemoryEstimate:
    """Predicted peak memory of a training run, in bytes.

    Attributes:
        weights: the model's weights (frozen or not) in their storage dtype.
        trainable: the adapter and its gradient (plus float32 master weights and their
            gradients when it computes in 16 bits) and AdamW's two moments; for full
            fine-tuning, gradients, moments and autocast's low-precision weight copies.
        activations: tensors kept for the backward pass at the longest micro-batch,
            and one chunk of the LM-head loss.
        overhead: the runtime's own memory: on the CPU and MPS the imported libraries,
            the tokenizer, the data and kernel workspaces; on CUDA the context and workspaces.
    """

    weights: int
    trainable: int
    activations: int
    overhead: int

    def __post_init__(self) -> None:
        for name in ("weights", "trainable", "activations", "overhead"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 bytes, got {getattr(self, name)}")

    @property
    def total(self) -> int:
        """The predicted peak, in bytes."""
        return self.weights + self.trainable + self.activations + self.overhead

    def to_dict(self) -> dict[str, Any]:
        """Bytes and GB of every part and the total."""
        parts = {"weights": self.weights, "trainable": self.trainable, "activations": self.activations,
                 "overhead": self.overhead, "total": self.total}
        return {**{f"{k}_bytes": v for k, v in parts.items()}, **{f"{k}_gb": round(v / GB, 3) for k, v in parts.items()}}

    def summary(self, free: int | None, device: str) -> tuple[str, str | None]:
        """The fine-tune page's words for this estimate: a markdown headline with its parts, and a
        warning saying the fix when it needs more than the ``free`` bytes on ``device`` (else None).

        ``free`` of ``None`` or 0 (unknown) leaves the free memory unsaid and warns of nothing.
        """
        parts = " · ".join(f"{name} {getattr(self, name) / GB:.2f} GB"
                           for name in ("weights", "trainable", "activations", "overhead"))
        free_text = f" of {free / GB:.1f} GB free on {device}" if free else ""
        headline = f"**Estimated peak memory: {self.total / GB:.2f} GB**{free_text}  \n{parts}"
        if not free or self.total <= free:
            return headline, None
        return headline, (f"This needs about {self.total / GB:.1f} GB but only {free / GB:.1f} GB is free on {device}: "
                          "lower the batch size or max length, or turn on gradient checkpointing.")


def _target_names(footprint: ModelFootprint, target_modules: Any) -> list[str]:
    if target_modules in ("all-linear", ["all-linear"], ("all-linear",)):
        return [n for n in footprint.linear_shapes if n != "lm_head"]
    return list(target_modules)


def estimate_memory(
    footprint: ModelFootprint,
    *,
    method: str = "lora",
    dtype: torch.dtype | str = torch.float32,
    batch_size: int = 4,
    seq_len: int = 512,
    lora_rank: int = 8,
    target_modules: Any = DEFAULT_TARGET_MODULES,
    gradient_checkpointing: bool = False,
    trained_tokens_per_row: int | None = None,
    device_type: str = "cpu",
    engine: str = "torch",
) -> MemoryEstimate:
    """Predict the peak memory of training ``footprint`` with these settings.

    Args:
        footprint: the model's shapes (:func:`mactuner.models.model_footprint`).
        method: ``"lora"``, ``"qlora"`` (4-bit base on CUDA, int8 elsewhere) or ``"full"``.
        dtype: the compute dtype (the weights' dtype for LoRA/QLoRA).
        batch_size: rows per micro-batch.
        seq_len: tokens in the longest micro-batch's rows (padded length).
        lora_rank: LoRA rank (LoRA/QLoRA).
        target_modules: the linear layers LoRA wraps, or ``"all-linear"``.
        gradient_checkpointing: keep only each block's input, recompute the rest.
        trained_tokens_per_row: tokens per row that take the loss (logits are
            computed only there); ``None``: every token.
        device_type: ``"cpu"``, ``"cuda"`` or ``"mps"`` (the runtime overhead differs).
        engine: ``"torch"`` or ``"mlx"`` (:mod:`mactuner.training.mlx_engine`: QLoRA's base is 4-bit
            everywhere, embeddings included; the adapter is float32; logits are float32 at every position).
    """
    if method not in ("lora", "qlora", "full"):
        raise ValueError(f"method must be lora, qlora or full, got {method!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("lora_rank", lora_rank)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    compute = parse_dtype(dtype)
    b = compute.itemsize
    h = footprint.hidden_size
    i = footprint.intermediate_size or 4 * h
    layers = footprint.num_layers
    tokens = batch_size * seq_len
    trained = batch_size * min(seq_len, trained_tokens_per_row if trained_tokens_per_row is not None else seq_len)

    # weights and what training adds per trainable parameter
    if engine == "mlx" and method != "full":
        return _estimate_mlx(footprint, method, compute, tokens, lora_rank, target_modules, gradient_checkpointing)
    if method == "full":
        # float32 master weights; gradients in float32, two AdamW moments; under
        # autocast each weight also gets a low-precision copy while it is in use
        weights = footprint.num_parameters * 4
        autocast_copies = footprint.num_parameters * b if compute != torch.float32 else 0
        trainable = footprint.num_parameters * (4 + _ADAM_BYTES) + autocast_copies
        adapter_activations = 0
    else:
        # QLoRA keeps embeddings, head and norms in the compute dtype; its other linear layers
        # are 4-bit on CUDA (training.qlora) and int8 elsewhere (training.int8_base)
        qlora = method == "qlora"
        weights = footprint.weight_bytes(compute, quantized_4bit=qlora and device_type == "cuda",
                                         quantized_8bit=qlora and device_type != "cuda")
        lora = footprint.lora_parameters(lora_rank, target_modules)
        # the adapter in the compute dtype with its gradient; a 16-bit adapter adds float32
        # master weights and their gradients; AdamW's moments are float32
        master = 4 + 4 if compute != torch.float32 else 0
        trainable = lora * (b + b + master + _ADAM_BYTES)
        # each adapter keeps its rank-wide hidden vector (its input is the layer's own input,
        # already kept: no float32 copy of it exists)
        targets = _target_names(footprint, target_modules)
        adapter_activations = sum(len(footprint.linear_shapes.get(name, [])) / layers for name in targets) * b * lora_rank

    # activations kept per token and per block
    block = b * (_ACT_HIDDEN * h + _ACT_INTERMEDIATE * i) + 4 * _ACT_FLOAT32_HIDDEN * h + adapter_activations
    if gradient_checkpointing:
        # each block's input is kept; one block at a time is recomputed in full
        kept = tokens * (layers * b * h + block)
    else:
        kept = tokens * layers * block
    if device_type == "mps":
        # MPS runs training attention on the math path: each layer keeps its batch x heads x seq^2
        # attention probabilities for the backward pass (checkpointed: one layer at a time)
        kept += mps_attention_bytes(footprint, batch_size, seq_len, b) * (1 if gradient_checkpointing else layers)
    # the LM head's loss runs where a token is trained, one chunk of tokens at a time
    loss = min(trained, LOSS_CHUNK_TOKENS) * footprint.vocab_size * (4 * _LOSS_FLOAT32_COPIES + b)
    # the final norm and the embedding output
    ends = tokens * h * (4 + b)
    activations = int(kept + loss + ends)
    if device_type == "cuda":
        overhead = _CUDA_CONTEXT + _GPU_WORKSPACE
    else:
        # CPU, and MPS whose unified memory is the same RAM the process lives in
        overhead = _RUNTIME_IMPORTS + _CPU_WORKSPACE
    return MemoryEstimate(int(weights), int(trainable), activations, overhead)


def mps_attention_bytes(footprint: ModelFootprint, batch_size: int, seq_len: int, itemsize: int) -> int:
    """One layer's attention probabilities kept for backward on MPS (no fused attention there)."""
    return batch_size * footprint.num_attention_heads * seq_len * seq_len * itemsize


# MLX's 4-bit affine quantization: half a byte per weight plus a 16-bit scale and bias per group of 64
_MLX_4BIT_BYTES = 0.5 + 4 / 64


def _estimate_mlx(footprint: ModelFootprint, method: str, compute: torch.dtype, tokens: int, lora_rank: int,
                  target_modules: Any, gradient_checkpointing: bool) -> MemoryEstimate:
    """LoRA / QLoRA with the MLX engine: ``mlx_lm.utils.quantize_model`` makes every linear layer and the
    embeddings 4-bit; the adapter, its gradient and AdamW's moments are float32; the loss takes float32
    logits at every position (no chunking)."""
    b = compute.itemsize
    h = footprint.hidden_size
    i = footprint.intermediate_size or 4 * h
    layers = footprint.num_layers
    if method == "qlora":
        embeddings = footprint.vocab_size * h
        quantized = footprint.weight_bytes(compute, quantized_4bit=True) - embeddings * b + embeddings * _MLX_4BIT_BYTES
        weights = int(quantized)
    else:
        weights = footprint.weight_bytes(compute)
    trainable = footprint.lora_parameters(lora_rank, target_modules) * (4 + 4 + _ADAM_BYTES)
    block = b * (_ACT_HIDDEN * h + _ACT_INTERMEDIATE * i) + 4 * _ACT_FLOAT32_HIDDEN * h
    kept = tokens * (layers * b * h + block) if gradient_checkpointing else tokens * layers * block
    loss = tokens * footprint.vocab_size * (4 * _LOSS_FLOAT32_COPIES + b)
    activations = int(kept + loss + tokens * h * (4 + b))
    return MemoryEstimate(int(weights), int(trainable), activations, _RUNTIME_IMPORTS + _CPU_WORKSPACE)


def estimate_for_config(config: Any, summary: Any = None, device: str | torch.device | None = None,
                        *, footprint: ModelFootprint | None = None) -> MemoryEstimate:
    """The memory estimate of a :class:`mactuner.config.TrainConfig` as the trainer will run it.

    The one rule the fine-tune page, the command line and the tests share: the dtype is the
    config's, or the device's best on ``"auto"``; the sequence length is the config's
    ``max_length`` capped by the longest row of ``summary`` (a
    :class:`mactuner.data.DatasetSummary`); logits are counted only for the trained tokens of
    the longest row.

    Args:
        config: the training config.
        summary: the dataset's summary under the model's tokenizer; ``None``: every row is
            ``max_length`` long and fully trained.
        device: where it trains; ``None``: the config's device.
        footprint: the model's footprint if already read (else read from ``config.model``).
    """
    from mactuner.devices import get_optimal_dtype
    from mactuner.models import model_footprint
    from mactuner.training.engines import choose_engine

    device = torch.device(device if device is not None else (config.device or "cpu"))
    dtype = get_optimal_dtype(device) if config.dtype in (None, "auto") else parse_dtype(config.dtype)
    footprint = footprint or model_footprint(config.model, trust_remote_code=getattr(config, "trust_remote_code", False))
    seq_len = config.max_length
    trained = None
    if summary is not None:
        seq_len = min(config.max_length, max(summary.max_tokens, 1))
        if getattr(summary, "trained_lengths", None):
            trained = max(min(n, config.max_length) for n in summary.trained_lengths)
    return estimate_memory(
        footprint, method=config.method, dtype=dtype, batch_size=config.batch_size, seq_len=seq_len,
        lora_rank=config.lora_rank, target_modules=config.target_modules,
        gradient_checkpointing=config.gradient_checkpointing, trained_tokens_per_row=trained,
        device_type=device.type, engine=choose_engine(getattr(config, "engine", "torch"), config.method).engine,
    )


# --------------------------------------------------------------------------------------
# recommendations


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
        }


def free_memory_bytes(device: str | torch.device) -> tuple[int | None, int | None]:
    """``(available, total)`` bytes on ``device`` (``None`` where unknown)."""
    from mactuner.devices import memory_axes, memory_snapshot

    axes = memory_axes(memory_snapshot(device))
    return axes.get("available"), axes.get("total")


def reasons_markdown(reasons: dict[str, str]) -> str:
    """The reasons as a markdown list, one ``- **setting name**: reason`` line per setting."""
    return "\n".join(f"- **{name.replace('_', ' ')}**: {reason}" for name, reason in reasons.items())


def _round_up(value: int, step: int) -> int:
    return int(math.ceil(value / step) * step)


def _choose_max_length(summary: Any, model_limit: int | None) -> tuple[int, str]:
    limit = model_limit or 4096
    if summary is None:
        value = min(512, limit)
        return value, f"{value} tokens: a common default without a dataset to measure"
    longest, p95 = summary.max_tokens, summary.p95_tokens
    if _round_up(longest, 64) <= min(2048, limit):
        value = _round_up(longest, 64)
        return value, f"{value} tokens: the longest row has {longest}, so nothing is truncated"
    value = min(_round_up(p95, 64), 2048, limit)
    cut = sum(1 for n in summary.token_lengths if n > value)
    return value, (
        f"{value} tokens: covers 95 % of rows (p95 {p95}, longest {longest}); {cut} longer rows are truncated "
        "rather than paying their memory in every batch"
    )


def _trained_per_row(summary: Any, max_length: int) -> int | None:
    """The most trained tokens of any row after truncation (bounds the logits' memory)."""
    if summary is None or not getattr(summary, "trained_lengths", None):
        return None
    return max(min(n, max_length) for n in summary.trained_lengths)


def recommend_hyperparameters(
    model: str | None = None,
    dataset: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    footprint: ModelFootprint | None = None,
    summary: Any = None,
    free_memory: int | None = None,
    trust_remote_code: bool = False,
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
    """
    from mactuner.devices import get_optimal_dtype, resolve_device
    from mactuner.models import DEFAULT_MODEL, model_footprint

    device = resolve_device(device)
    model = model or DEFAULT_MODEL
    footprint = footprint or model_footprint(model, trust_remote_code=trust_remote_code)
    if summary is None and dataset is not None:
        summary = _summarize(model, dataset, trust_remote_code)
    total_memory = None
    if free_memory is None:
        free_memory, total_memory = free_memory_bytes(device)
    compute = get_optimal_dtype(device)
    dtype_name = str(compute).replace("torch.", "")
    reasons: dict[str, str] = {}
    warnings: list[str] = []
    # plan with 80 % of what is free: the estimate's margin and other programs' growth
    budget = int(free_memory * 0.8) if free_memory else None

    reasons["dtype"] = {
        "bfloat16": f"bfloat16: {device.type.upper()} computes it natively, half the memory of float32 at the same range",
        "float16": "float16: the fastest precision this GPU supports (loss scaling keeps small gradients)",
        "float32": "float32: this device has no fast half-precision arithmetic",
    }[dtype_name]

    # data-dependent settings
    rows = summary.rows if summary is not None else None
    max_length, reasons["max_length"] = _choose_max_length(summary, footprint.max_position_embeddings)
    seq_len = min(max_length, summary.max_tokens) if summary is not None else max_length
    trained_per_row = _trained_per_row(summary, max_length)

    # LoRA size grows with how much there is to learn
    if rows is None or rows < 2000:
        rank = 8 if rows is None or rows >= 200 else 16
    elif rows < 20000:
        rank = 16
    else:
        rank = 32
    target_modules: list[str] | str = "all-linear" if footprint.num_parameters < 3e9 else list(DEFAULT_TARGET_MODULES)
    reasons["lora_rank"] = f"{rank}: " + (
        f"enough adapter capacity for {rows} rows" if rows else "a safe start without a dataset to size it by"
    )
    reasons["lora_alpha"] = f"{2 * rank}: twice the rank, the common choice that keeps the update's scale steady"
    reasons["target_modules"] = (
        "all linear layers: adapting the MLP as well as attention learns more per step at little cost on a small model"
        if target_modules == "all-linear"
        else "attention projections only: keeps a large model's adapter and activations small"
    )

    # method: LoRA unless the weights do not fit; QLoRA's base is 4-bit on CUDA, int8 on a CPU
    method = "lora"
    weights = footprint.weight_bytes(compute)
    if budget is not None and weights > 0.6 * budget:
        cuda = device.type == "cuda"
        qlora_weights = footprint.weight_bytes(compute, quantized_4bit=cuda, quantized_8bit=not cuda)
        qlora_runs = method_available("qlora", device.type)
        if qlora_runs and qlora_weights < 0.6 * budget:
            method = "qlora"
            reasons["method"] = (
                f"QLoRA: the {dtype_name} weights ({weights / GB:.1f} GB) leave too little of the "
                f"{free_memory / GB:.1f} GB free; {'4-bit' if cuda else 'int8'} weights take {qlora_weights / GB:.1f} GB"
            )
        else:
            reasons["method"] = "LoRA: the smallest training footprint available on this device"
            if cuda and not qlora_runs and qlora_weights < 0.6 * budget:
                warnings.append("QLoRA (4-bit weights) would fit but needs the bitsandbytes package: "
                                "pip install 'mactuner[cuda]' (or pip install bitsandbytes), then recommend again.")
            warnings.append(
                f"The weights alone take {weights / GB:.1f} GB in {dtype_name} with {free_memory / GB:.1f} GB free: "
                + (f"even {'4-bit' if cuda else 'int8'} QLoRA does not fit; choose a smaller model." if qlora_runs
                   else "choose a smaller model.")
            )
    else:
        reasons["method"] = (
            "LoRA: trains a small adapter (a fraction of a percent of the weights) at nearly full fine-tuning quality, "
            "with a fraction of the memory; the base model stays untouched"
        )
        if device.type == "cpu" and method_available("qlora", "cpu"):
            # measured (docs/notes/bench.md): 1.36x MacTuner's LoRA on an emulated float32 CPU with VNNI;
            # on a bfloat16 CPU the README demo took 94 s with QLoRA against 73 s with LoRA
            reasons["method"] += (
                ". On this float32 CPU, QLoRA (int8 base) trains faster: its base matmuls run in int8 "
                "(the numerics differ slightly, as with any QLoRA)" if compute == torch.float32 else
                ". QLoRA (int8 base) would take less memory for the weights but train slower on this "
                "bfloat16 CPU"
            )

    # micro-batch: the largest power of two up to the target that fits, with or
    # without gradient checkpointing
    target_batch = 8 if rows is not None and rows < 500 else 16

    def estimate(batch: int, checkpointing: bool) -> MemoryEstimate:
        return estimate_memory(
            footprint, method=method, dtype=compute, batch_size=batch, seq_len=seq_len, lora_rank=rank,
            target_modules=target_modules, gradient_checkpointing=checkpointing,
            trained_tokens_per_row=trained_per_row, device_type=device.type,
        )

    def largest_fitting(checkpointing: bool) -> int:
        batch = target_batch
        while batch > 1 and budget is not None and estimate(batch, checkpointing).total > budget:
            batch //= 2
        return batch

    batch = largest_fitting(False)
    checkpointing = False
    if budget is not None and (estimate(batch, False).total > budget or batch < min(4, target_batch)):
        with_gc = largest_fitting(True)
        if estimate(with_gc, True).total <= budget and (with_gc > batch or estimate(batch, False).total > budget):
            batch, checkpointing = with_gc, True
    memory = estimate(batch, checkpointing)
    if budget is not None and memory.total > budget:
        warnings.append(
            f"Even a micro-batch of 1 with gradient checkpointing needs about {memory.total / GB:.1f} GB and "
            f"{free_memory / GB:.1f} GB are free: lower max_length, close other programs or choose a smaller model."
        )
    grad_accum = max(1, target_batch // batch)
    free_text = f"{free_memory / GB:.1f} GB free" if free_memory else "free memory unknown"
    reasons["batch_size"] = (
        f"{batch} rows per micro-batch: the largest that fits ({memory.total / GB:.2f} GB of {free_text})"
        if batch == target_batch or budget is None
        else f"{batch} rows per micro-batch: {batch * 2} would not fit in {free_text}"
    )
    reasons["grad_accum"] = (
        f"{grad_accum}: an effective batch of {batch * grad_accum} rows per step"
        + (" keeps the gradient steady while the micro-batch fits memory" if grad_accum > 1 else "")
    )
    reasons["gradient_checkpointing"] = (
        "on: recomputing activations in the backward pass makes a larger micro-batch fit (about 30 % slower)"
        if checkpointing
        else "off: the activations fit, so no time is spent recomputing them"
    )

    # learning rate and epochs: enough steps to learn, without overfitting a big dataset
    small = rows is not None and rows < 200
    learning_rate = 1e-3 if small else 2e-4
    reasons["learning_rate"] = (
        "1e-3: a small dataset gives few steps; a LoRA adapter tolerates a high rate"
        if small
        else "2e-4: the usual LoRA rate, stable across model sizes"
    )
    if rows is None:
        epochs = 3.0
        reasons["epochs"] = "3: a common start; watch the validation loss"
    else:
        steps_per_epoch = max(1, math.ceil(rows / (batch * grad_accum)))
        # about 60 optimizer steps teach a small set its facts; a handful of rows needs more passes to get there
        max_epochs = 30 if rows < SMALL_DATASET_ROWS else 10
        epochs = float(max(1, min(max_epochs, math.ceil(60 / steps_per_epoch)))) if rows < 1000 else (2.0 if rows < 10000 else 1.0)
        reasons["epochs"] = f"{epochs:g}: {steps_per_epoch} steps per epoch, about {int(epochs * steps_per_epoch)} in all" + (
            "; a small dataset needs several passes to be learnt" if epochs > 1 else "; one pass is enough updates for this many rows"
        )
    # validation and checkpoints: never take facts away from a small dataset; scale the intervals
    # with the run's length so that any run gets checkpoints to resume from before its end
    if rows is not None and rows < SMALL_DATASET_ROWS:
        val_fraction = 0.0
        reasons["val_fraction"] = (
            f"0 (no validation split): with {rows} rows every row is needed to learn from "
            f"(below {SMALL_DATASET_ROWS} rows); watch the training loss, and ask the tuned model in Chat"
        )
    else:
        val_fraction = 0.1 if rows is None or rows < 20000 else 0.02
        reasons["val_fraction"] = (
            f"{val_fraction:g}: {'a tenth' if val_fraction == 0.1 else 'a fiftieth'} of the rows measure the validation loss, "
            "which shows over-fitting the training loss hides"
        )
    total_steps = None
    if rows is not None:
        train_rows = rows - int(rows * val_fraction)
        total_steps = max(1, math.ceil(epochs * math.ceil(train_rows / (batch * grad_accum))))
    interval = max(1, math.ceil(total_steps / CHECKPOINTS_PER_RUN)) if total_steps else 50
    save_every = interval if total_steps is None or total_steps > 1 else 0
    eval_every = interval if val_fraction > 0 else 0
    reasons["save_every"] = (
        f"{save_every}: about {CHECKPOINTS_PER_RUN} checkpoints in {total_steps} steps, so a crash or a cancel "
        "loses little and resumes from the last one" if total_steps else f"{save_every}: a checkpoint every {save_every} steps"
    )
    reasons["eval_every"] = (
        f"{eval_every}: about {CHECKPOINTS_PER_RUN} validation losses over the run" if eval_every
        else "0: no validation split, so nothing to evaluate during the run"
    )
    trainable = footprint.lora_parameters(rank, target_modules)
    return Recommendation(
        model=str(model),
        device=str(device),
        dtype=dtype_name,
        method=method,
        batch_size=batch,
        grad_accum=grad_accum,
        max_length=max_length,
        lora_rank=rank,
        lora_alpha=float(2 * rank),
        target_modules=target_modules,
        learning_rate=learning_rate,
        epochs=epochs,
        gradient_checkpointing=checkpointing,
        reasons=reasons,
        memory=memory,
        free_memory=free_memory,
        num_parameters=footprint.num_parameters,
        trainable_parameters=trainable,
        dataset_rows=rows,
        warnings=warnings,
        val_fraction=val_fraction,
        eval_every=eval_every,
        save_every=save_every,
    )


def _summarize(model: str, dataset: str | os.PathLike, trust_remote_code: bool):
    """The dataset's summary under the model's tokenizer (loads the tokenizer only)."""
    from transformers import AutoTokenizer

    from mactuner.data import load_dataset_file, summarize_dataset
    from mactuner.models import model_path

    _, path = model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return summarize_dataset(load_dataset_file(dataset), tokenizer, max_length=1_000_000)
