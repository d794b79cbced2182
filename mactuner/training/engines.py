"""Which engine trains a run: PyTorch (:class:`~mactuner.training.trainer.Trainer`) or MLX
(:class:`~mactuner.training.mlx_engine.MLXTrainer`), and why.

``engine: auto`` picks MLX on an Apple-silicon Mac (macOS on arm64) where ``mlx`` and
``mlx-lm`` are installed, for LoRA and QLoRA: MLX trains on the Mac's GPU with a 4-bit
base (QLoRA), which PyTorch's MPS backend cannot. Everywhere else, and for full
fine-tuning, it picks PyTorch. Both engines write the same run folder.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mactuner.config import TrainConfig
from mactuner.training.mlx_support import MLX_INSTALL, mlx_installed


@dataclass(frozen=True)
class EngineChoice:
    """The engine that trains (``torch`` or ``mlx``) and the reason, in words for the person."""

    engine: str
    reason: str


def is_apple_silicon(system: str | None = None, machine: str | None = None) -> bool:
    """macOS on an arm64 CPU (M1 and later)."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    return system == "Darwin" and machine == "arm64"


def choose_engine(
    requested: str = "auto",
    method: str = "lora",
    *,
    system: str | None = None,
    machine: str | None = None,
    mlx_available: bool | None = None,
) -> EngineChoice:
    """The engine for ``requested`` (auto | torch | mlx) and ``method`` on this machine.

    Args:
        requested: the config's ``engine``.
        method: the config's ``method`` (MLX trains adapters: lora and qlora).
        system, machine: ``platform.system()`` / ``platform.machine()`` (given by tests).
        mlx_available: whether mlx and mlx-lm are installed (default: look).
    """
    if requested == "torch":
        return EngineChoice("torch", "PyTorch, as asked (engine: torch).")
    if requested == "mlx":
        return EngineChoice("mlx", "MLX, as asked (engine: mlx).")
    if requested != "auto":
        raise ValueError(f"engine must be auto, torch or mlx, got {requested!r}")
    if not is_apple_silicon(system, machine):
        return EngineChoice("torch", "PyTorch: this is not an Apple-silicon Mac (MLX trains on Apple silicon).")
    if method == "full":
        return EngineChoice("torch", "PyTorch: full fine-tuning (the MLX engine trains LoRA and QLoRA adapters).")
    available = mlx_installed() if mlx_available is None else mlx_available
    if not available:
        return EngineChoice(
            "torch",
            f"PyTorch on MPS: MLX is not installed. MLX trains faster on a Mac and runs QLoRA on a 4-bit base; "
            f"install it with {MLX_INSTALL}.",
        )
    return EngineChoice(
        "mlx",
        "MLX: an Apple-silicon Mac with MLX installed. MLX trains on the Mac's GPU without PyTorch's MPS "
        "fallbacks and runs QLoRA on a 4-bit base.",
    )


def make_trainer(
    config: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    callbacks: Iterable[Any] = (),
    resume: bool = False,
    verbose: bool = False,
):
    """The trainer of ``config``'s engine (``.run()`` → ``TrainResult``; the same run folder either way)."""
    choice = choose_engine(config.engine, config.method)
    if choice.engine == "mlx" and config.engine == "auto" and getattr(config, "objective", "sft") != "sft":
        # preference tuning (DPO, ORPO, KTO) is the torch trainer's
        choice = EngineChoice("torch", f"PyTorch: {config.objective} preference tuning runs on the PyTorch engine.")
    if choice.engine == "mlx":
        from mactuner.training.mlx_engine import MLXTrainer

        return MLXTrainer(config, run_dir, callbacks, resume, verbose, reason=choice.reason)
    from mactuner.training.trainer import Trainer

    return Trainer(config, run_dir, callbacks, resume, verbose)
