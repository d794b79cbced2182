"""The memory estimate: the peak memory of a training run, predicted from the model's shapes and the run's settings.

:func:`estimate_memory` breaks the peak down into the weights; the trainable parameters with their gradients and
AdamW state; the activations kept for the backward pass and the LM-head loss; and the runtime's own memory. It
mirrors what MacTuner's trainer (``mactuner.training``) allocates: frozen weights in the compute dtype, LoRA
adapters in the compute dtype with float32 master weights only when that dtype is 16-bit, logits computed only
where a token is trained and at most ``LOSS_CHUNK_TOKENS`` at a time, and on the CPU a heap that returns large
freed blocks (``devices.limit_host_heap_growth``). What it predicts is what a person sees: on the CPU the training
process's whole resident memory; on a GPU the device memory the process takes, its CUDA context included.
``tests/recommend/test_recommend.py`` checks it against the peak of real runs (±25 %).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mactuner.devices import parse_dtype, resolve_dtype
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
# a CPU run whose micro-batches vary in length grows its resident memory past one step's peak: glibc's
# heap keeps the freed blocks (below the 4 MiB mmap threshold, devices.limit_host_heap_growth) of every
# shape it met. Measured on the README demo (SmolLM2-135M, bfloat16, batch 8 x 28-65 tokens, 64 steps,
# 2-core AMD EPYC): one step on the longest rows 1.28-1.29 GiB, the whole run 1.56 GiB, 0.27 GiB more for
# 0.35 GiB of estimated activations. Trimming the heap after every step kept 0.1 GiB of it, 10 % slower.
_CPU_HEAP_GROWTH = 0.75
# a replay row: a general question and the base model's answer of at most 48 tokens; with SmolLM2's
# template (its default system turn included) the 32 demo replay rows measured 55-89 tokens, 73 on average
_REPLAY_ROW_TOKENS = 90
_REPLAY_TRAINED_TOKENS = 50
# AdamW: two float32 moments per trainable parameter
_ADAM_BYTES = 8

# the attention projections: the LoRA targets of a large model (small ones adapt every linear layer)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")



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
        heap: on the CPU, what the process's heap keeps over a run whose micro-batches vary in
            length (freed blocks of one shape do not fit the next); 0 for one step or one shape.
    """

    weights: int
    trainable: int
    activations: int
    overhead: int
    heap: int = 0

    def __post_init__(self) -> None:
        for name in ("weights", "trainable", "activations", "overhead", "heap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 bytes, got {getattr(self, name)}")

    @property
    def total(self) -> int:
        """The predicted peak, in bytes."""
        return self.weights + self.trainable + self.activations + self.overhead + self.heap

    def to_dict(self) -> dict[str, Any]:
        """Bytes and GB of every part and the total."""
        parts = {"weights": self.weights, "trainable": self.trainable, "activations": self.activations,
                 "overhead": self.overhead, "heap": self.heap, "total": self.total}
        return {**{f"{k}_bytes": v for k, v in parts.items()}, **{f"{k}_gb": round(v / GB, 3) for k, v in parts.items()}}

    def summary(self, free: int | None, device: str) -> tuple[str, str | None]:
        """The fine-tune page's words for this estimate: a markdown headline with its parts, and a
        warning saying the fix when it needs more than the ``free`` bytes on ``device`` (else None).

        ``free`` of ``None`` or 0 (unknown) leaves the free memory unsaid and warns of nothing.
        """
        parts = " · ".join(f"{name} {getattr(self, name) / GB:.2f} GB"
                           for name in ("weights", "trainable", "activations", "overhead", "heap")
                           if name != "heap" or self.heap)
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
        weights = int(footprint.weight_bytes(compute, quantized_4bit=True) - embeddings * b + embeddings * _MLX_4BIT_BYTES)
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
    the longest row; on the CPU, rows of several lengths add the heap's growth over a run.

    Args:
        config: the training config.
        summary: the dataset's summary under the model's tokenizer; ``None``: every row is
            ``max_length`` long and fully trained.
        device: where it trains; ``None``: the config's device.
        footprint: the model's footprint if already read (else read from ``config.model``).
    """
    from mactuner.models import model_footprint
    from mactuner.training.engines import choose_engine

    device = torch.device(device if device is not None else (config.device or "cpu"))
    dtype = resolve_dtype(config.dtype, device)
    footprint = footprint or model_footprint(config.model, trust_remote_code=getattr(config, "trust_remote_code", False))
    seq_len = config.max_length
    trained = None
    objective = getattr(config, "objective", "sft")
    if summary is not None and getattr(summary, "chosen_lengths", None) is not None:
        # a preference summary (mactuner.data.preference): prompt + the longer answer
        answers = max(summary.chosen_lengths + summary.rejected_lengths, default=1)
        seq_len = min(config.max_length, max(summary.prompt_lengths, default=0) + answers)
        trained = min(answers, config.max_length)
    elif summary is not None:
        seq_len = min(config.max_length, max(summary.max_tokens, 1))
        if getattr(summary, "trained_lengths", None):
            trained = max(min(n, config.max_length) for n in summary.trained_lengths)
    if getattr(config, "replay_rows", 0) and objective == "sft":
        # replay rows (mactuner.evaluation.replay) are a general question and the base model's answer
        if seq_len < config.max_length:
            seq_len = min(config.max_length, max(seq_len, _REPLAY_ROW_TOKENS))
        trained = None if trained is None else min(config.max_length, max(trained, _REPLAY_TRAINED_TOKENS))
    # DPO and ORPO run a pair's two sequences in one forward pass: twice the rows
    sequences = config.batch_size * (2 if objective in ("dpo", "orpo") else 1)
    engine = choose_engine(getattr(config, "engine", "torch"), config.method).engine
    estimate = estimate_memory(
        footprint, method=config.method, dtype=dtype, batch_size=sequences, seq_len=seq_len,
        lora_rank=config.lora_rank, target_modules=config.target_modules,
        gradient_checkpointing=config.gradient_checkpointing, trained_tokens_per_row=trained,
        device_type=device.type, engine=engine,
    )
    if objective in ("dpo", "kto"):
        # the reference pass (no gradient: one layer's activations at a time, and its log-probabilities);
        # full fine-tuning also holds a frozen copy of the weights in the compute dtype
        b = dtype.itemsize
        h, i = footprint.hidden_size, footprint.intermediate_size or 4 * footprint.hidden_size
        reference = sequences * seq_len * (2 * h + i) * b
        copy = footprint.num_parameters * b if config.method == "full" else 0
        estimate = dataclasses.replace(estimate, weights=estimate.weights + copy,
                                       activations=estimate.activations + int(reference))
    shortest = getattr(summary, "min_tokens", None)
    if device.type == "cpu" and engine == "torch" and shortest is not None and shortest < seq_len:
        # rows of several lengths: micro-batches of several shapes over the run (see _CPU_HEAP_GROWTH)
        estimate = dataclasses.replace(estimate, heap=int(_CPU_HEAP_GROWTH * estimate.activations))
    return estimate


# --------------------------------------------------------------------------------------
# recommendations
