"""The rules behind a recommendation, one function per setting group, each testable alone.

Every rule takes what it needs (the device, the model's footprint, the dataset's summary, the memory budget) and
returns its choice with a one-line reason per setting; :func:`mactuner.recommend.recommend_hyperparameters` runs
them in order: dtype → max length → LoRA shape → method → batch and memory → schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mactuner.devices import dtype_name
from mactuner.evaluation.replay import REPLAY_SET_SIZE
from mactuner.models import ModelFootprint
from mactuner.recommend.estimate import DEFAULT_TARGET_MODULES, GB, MemoryEstimate, estimate_memory

# below this many rows, holding rows out for validation costs facts the model never sees:
# the recommendation trains on every row and turns the validation split off (and says so)
SMALL_DATASET_ROWS = 100
# a run gets about this many checkpoints and validation losses, whatever its length
CHECKPOINTS_PER_RUN = 4
# replay (mactuner.evaluation.replay) for a small dataset: general questions answered by the base model itself,
# trained beside the rows, about half as many as the person's rows and at most the whole shipped set. Measured on
# the demo (docs/benchmarks.md#forgetting, bench/forgetting.py): without replay the tuned model kept 3 of the 23
# things the base knew ("the capital of France is Lumetta"); with 32 replay rows it kept 22 and still stated all
# 10 facts.


@dataclass
class Choice:
    """What a rule chose: its settings, one reason per setting, and warnings for the person."""

    values: dict[str, Any]
    reasons: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def method_available(method: str, device_type: str = "cuda") -> bool:
    """Whether ``method`` can train on ``device_type`` here (:func:`mactuner.training.qlora.qlora_problem`
    says why QLoRA cannot: bitsandbytes missing on CUDA, no exact int8 matmul on a CPU, MPS)."""
    from mactuner.training.qlora import qlora_problem

    return method != "qlora" or qlora_problem(device_type) is None


def memory_budget(free_memory: int | None) -> int | None:
    """Bytes to plan with: 80 % of what is free (the estimate's margin and other programs' growth)."""
    return int(free_memory * 0.8) if free_memory else None


def choose_dtype(device: torch.device, compute: torch.dtype) -> Choice:
    """The compute dtype is the device's best (:func:`mactuner.devices.get_optimal_dtype`); the reason says why."""
    name = dtype_name(compute)
    reason = {
        "bfloat16": f"bfloat16: {device.type.upper()} computes it natively, half the memory of float32 at the same range",
        "float16": "float16: the fastest precision this GPU supports (loss scaling keeps small gradients)",
        "float32": "float32: this device has no fast half-precision arithmetic",
    }[name]
    return Choice({"dtype": name}, {"dtype": reason})


def _round_up(value: int, step: int) -> int:
    return int(math.ceil(value / step) * step)


def choose_max_length(summary: Any, model_limit: int | None) -> Choice:
    """The longest row rounded up to 64 tokens, or the 95th percentile when rows are longer than 2048."""
    limit = model_limit or 4096
    if summary is None:
        value = min(512, limit)
        return Choice({"max_length": value}, {"max_length": f"{value} tokens: a common default without a dataset to measure"})
    longest, p95 = summary.max_tokens, summary.p95_tokens
    if _round_up(longest, 64) <= min(2048, limit):
        value = _round_up(longest, 64)
        return Choice({"max_length": value}, {"max_length": f"{value} tokens: the longest row has {longest}, so nothing is truncated"})
    value = min(_round_up(p95, 64), 2048, limit)
    cut = sum(1 for n in summary.token_lengths if n > value)
    return Choice({"max_length": value}, {"max_length": (
        f"{value} tokens: covers 95 % of rows (p95 {p95}, longest {longest}); {cut} longer rows are truncated "
        "rather than paying their memory in every batch"
    )})


def trained_per_row(summary: Any, max_length: int) -> int | None:
    """The most trained tokens of any row after truncation (bounds the logits' memory)."""
    if summary is None or not getattr(summary, "trained_lengths", None):
        return None
    return max(min(n, max_length) for n in summary.trained_lengths)


def choose_lora_shape(rows: int | None, footprint: ModelFootprint) -> Choice:
    """LoRA rank, alpha and target modules: the adapter's size grows with how much there is to learn."""
    if rows is None or rows < 2000:
        rank = 8 if rows is None or rows >= 200 else 16
    elif rows < 20000:
        rank = 16
    else:
        rank = 32
    target_modules: list[str] | str = "all-linear" if footprint.num_parameters < 3e9 else list(DEFAULT_TARGET_MODULES)
    return Choice(
        {"lora_rank": rank, "lora_alpha": float(2 * rank), "target_modules": target_modules},
        {
            "lora_rank": f"{rank}: " + (f"enough adapter capacity for {rows} rows" if rows else
                                        "a safe start without a dataset to size it by"),
            "lora_alpha": f"{2 * rank}: twice the rank, the common choice that keeps the update's scale steady",
            "target_modules": (
                "all linear layers: adapting the MLP as well as attention learns more per step at little cost on a small model"
                if target_modules == "all-linear"
                else "attention projections only: keeps a large model's adapter and activations small"
            ),
        },
    )


def choose_method(device: torch.device, compute: torch.dtype, footprint: ModelFootprint,
                  budget: int | None, free_memory: int | None, *, seq_len: int = 512, rank: int = 8,
                  target_modules: list[str] | str = DEFAULT_TARGET_MODULES, trained_tokens: int | None = None) -> Choice:
    """LoRA when its smallest run fits (a micro-batch of 1 with gradient checkpointing), else QLoRA (base
    4-bit on CUDA, int8 on a CPU): a quantized base costs a dequantization per matmul, so on a 24 GB GPU a
    7B model trains faster as bfloat16 LoRA with checkpointing than as 4-bit QLoRA."""
    name = dtype_name(compute)
    weights = footprint.weight_bytes(compute)
    warnings: list[str] = []

    def smallest_run(kind: str) -> int:
        return estimate_memory(
            footprint, method=kind, dtype=compute, batch_size=1, seq_len=seq_len, lora_rank=rank,
            target_modules=target_modules, gradient_checkpointing=True, trained_tokens_per_row=trained_tokens,
            device_type=device.type,
        ).total

    if budget is not None and smallest_run("lora") > budget:
        cuda = device.type == "cuda"
        qlora_weights = footprint.weight_bytes(compute, quantized_4bit=cuda, quantized_8bit=not cuda)
        qlora_runs = method_available("qlora", device.type)
        if qlora_runs and smallest_run("qlora") <= budget:
            return Choice({"method": "qlora"}, {"method": (
                f"QLoRA: the {name} weights ({weights / GB:.1f} GB) leave too little of the "
                f"{free_memory / GB:.1f} GB free; {'4-bit' if cuda else 'int8'} weights take {qlora_weights / GB:.1f} GB"
            )})
        if cuda and not qlora_runs and smallest_run("qlora") <= budget:
            warnings.append("QLoRA (4-bit weights) would fit but needs the bitsandbytes package: "
                            "pip install 'mactuner[cuda]' (or pip install bitsandbytes), then recommend again.")
        warnings.append(
            f"The weights alone take {weights / GB:.1f} GB in {name} with {free_memory / GB:.1f} GB free: "
            + (f"even {'4-bit' if cuda else 'int8'} QLoRA does not fit; choose a smaller model." if qlora_runs
               else "choose a smaller model.")
        )
        return Choice({"method": "lora"}, {"method": "LoRA: the smallest training footprint available on this device"},
                      warnings)
    if budget is not None and weights > 0.6 * budget:
        return Choice({"method": "lora"}, {"method": (
            f"LoRA: the {name} weights ({weights / GB:.1f} GB) and a micro-batch fit in the {free_memory / GB:.1f} GB "
            "free with gradient checkpointing; it trains faster than QLoRA, whose quantized base is dequantized "
            "at every matmul"
        )})
    reason = (
        "LoRA: trains a small adapter (a fraction of a percent of the weights) at nearly full fine-tuning quality, "
        "with a fraction of the memory; the base model stays untouched"
    )
    if device.type == "cpu" and method_available("qlora", "cpu"):
        # measured (docs/benchmarks.md): 1.36x MacTuner's LoRA on an emulated float32 CPU with VNNI;
        # on a bfloat16 CPU the README demo took 94 s with QLoRA against 73 s with LoRA
        reason += (
            ". On this float32 CPU, QLoRA (int8 base) trains faster: its base matmuls run in int8 "
            "(the numerics differ slightly, as with any QLoRA)" if compute == torch.float32 else
            ". QLoRA (int8 base) would take less memory for the weights but train slower on this "
            "bfloat16 CPU"
        )
    return Choice({"method": "lora"}, {"method": reason})


def choose_batch(device: torch.device, compute: torch.dtype, footprint: ModelFootprint, *, method: str, rank: int,
                 target_modules: list[str] | str, seq_len: int, trained_tokens: int | None, rows: int | None,
                 budget: int | None, free_memory: int | None, gpus: int = 1) -> Choice:
    """The largest power-of-two micro-batch up to the target that fits, with or without gradient checkpointing;
    gradient accumulation keeps the effective batch, every GPU adding its micro-batch (``gpus``: the memory is
    per GPU). ``values["memory"]`` is the estimate for the choice."""
    target_batch = 8 if rows is not None and rows < 500 else 16

    def estimate(batch: int, checkpointing: bool) -> MemoryEstimate:
        return estimate_memory(
            footprint, method=method, dtype=compute, batch_size=batch, seq_len=seq_len, lora_rank=rank,
            target_modules=target_modules, gradient_checkpointing=checkpointing,
            trained_tokens_per_row=trained_tokens, device_type=device.type,
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
    warnings = []
    if budget is not None and memory.total > budget:
        warnings.append(
            f"Even a micro-batch of 1 with gradient checkpointing needs about {memory.total / GB:.1f} GB and "
            f"{free_memory / GB:.1f} GB are free: lower max_length, close other programs or choose a smaller model."
        )
    # every GPU adds a micro-batch to each step: accumulate fewer to keep the effective batch
    grad_accum = max(1, target_batch // (batch * gpus))
    effective = batch * grad_accum * gpus
    free_text = f"{free_memory / GB:.1f} GB free" if free_memory else "free memory unknown"
    reasons = {
        "batch_size": (
            f"{batch} rows per micro-batch: the largest that fits ({memory.total / GB:.2f} GB of {free_text})"
            if batch == target_batch or budget is None
            else f"{batch} rows per micro-batch: {batch * 2} would not fit in {free_text}"
        ),
        "grad_accum": (
            f"{grad_accum}: an effective batch of {effective} rows per step"
            + (f" ({batch} x {grad_accum} x {gpus} GPUs)" if gpus > 1 else "")
            + (" keeps the gradient steady while the micro-batch fits memory" if grad_accum > 1 else "")
        ),
        "gpus": "1: one training process on one device" if gpus == 1 else (
            f"{gpus}: one process per GPU (torchrun), each with the whole model and its own micro-batch; "
            + (f"accumulation lowered to {grad_accum} so the effective batch stays {effective} rows and the "
               "learning rate needs no change" if effective <= target_batch else
               f"the effective batch grows to {effective} rows (above the {target_batch} planned), so the "
               "learning rate is scaled up by its square root")
        ),
        "gradient_checkpointing": (
            "on: recomputing activations in the backward pass makes a larger micro-batch fit (about 30 % slower)"
            if checkpointing
            else "off: the activations fit, so no time is spent recomputing them"
        ),
    }
    values = {"batch_size": batch, "grad_accum": grad_accum, "gradient_checkpointing": checkpointing, "memory": memory,
              "gpus": gpus}
    return Choice(values, reasons, warnings)


def batch_growth(batch: int, grad_accum: int, gpus: int, rows: int | None) -> float:
    """How much larger the effective batch is than the one planned (1.0 when not): the GPUs' micro-batches
    alone can exceed it, and the learning rate then follows the square root of the growth."""
    target_batch = 8 if rows is not None and rows < 500 else 16
    return max(1.0, batch * grad_accum * gpus / target_batch)


def choose_schedule(rows: int | None, batch: int, grad_accum: int, gpus: int = 1) -> Choice:
    """Learning rate, epochs, the validation split and the checkpoint/validation intervals (``gpus``: each adds
    its micro-batches to every step; a batch grown past the plan gets the square root of its growth in rate)."""
    reasons: dict[str, str] = {}
    # learning rate and epochs: enough steps to learn, without overfitting a big dataset
    small = rows is not None and rows < 200
    learning_rate = 1e-3 if small else 2e-4
    reasons["learning_rate"] = (
        "1e-3: a small dataset gives few steps; a LoRA adapter tolerates a high rate"
        if small
        else "2e-4: the usual LoRA rate, stable across model sizes"
    )
    replay_rows = min(REPLAY_SET_SIZE, -(-rows // 2)) if small else 0
    reasons["replay_rows"] = (
        f"{replay_rows}: general questions answered by the base model itself train beside your rows, so the model "
        "keeps what it knew (on the demo: 22 of 23 things kept with them, 3 of 23 without); each epoch grows by "
        "them, so your rows get the same passes" if replay_rows else
        "0: a dataset this large varies enough on its own; set replay_rows (e.g. 32) if the end-of-run forgetting "
        "check says the model lost what it knew"
    )
    growth = batch_growth(batch, grad_accum, gpus, rows)
    if growth > 1:
        # square-root scaling with the batch (the usual rule for Adam)
        learning_rate = float(f"{min(learning_rate * math.sqrt(growth), 5e-3):.2g}")
        reasons["learning_rate"] = (f"{learning_rate:g}: " + reasons["learning_rate"].split(": ", 1)[1]
                                    + f", times {math.sqrt(growth):.2f} (the square root of the batch's growth)")
    batch = batch * gpus  # rows per micro-batch round over every GPU, for the step counts below
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
        ) + (f" (the replay rows add about {int(epochs * replay_rows / (batch * grad_accum))} steps)" if replay_rows else "")
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
        train_rows = rows - int(rows * val_fraction) + replay_rows
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
    values = {"learning_rate": learning_rate, "epochs": epochs, "val_fraction": val_fraction,
              "save_every": save_every, "eval_every": eval_every, "replay_rows": replay_rows}
    return Choice(values, reasons)
