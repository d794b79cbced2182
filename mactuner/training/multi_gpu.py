"""Several GPUs in one box: one training process per GPU, started by torchrun.

``gpus: N`` in a config (``--gpus N`` on the command line, "Use N GPUs" on the
fine-tune page) runs ``torchrun --standalone --nproc-per-node N -m mactuner train …``:
torchrun (PyTorch's own launcher) starts the N processes, gives each its rank, and
the trainer (:mod:`mactuner.training.distributed`) joins them in one process group
(NCCL on CUDA). Each process holds the whole model and trains on its share of every
global batch, so the effective batch is ``batch_size x grad_accum x gpus`` rows and
the memory is per GPU. Rank 0 alone writes the run folder (status, metrics,
checkpoints, adapter); Stop (SIGTERM, which torchrun passes to every process), the
out-of-memory back-off and the non-finite stop are agreed in the step's all-reduce,
so every process stops at the same step.

Mixed GPUs are refused: data parallelism waits for the slowest card at every step
and must fit the smallest card's memory, so a 3090 beside a T4 trains at T4 speed
with T4 memory; the refusal says so and how to pick matching cards.

On a CPU, ``gpus: N`` starts N processes (gloo): it exists for the tests, which
check on a machine without GPUs that N processes train exactly as one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def gpus_problem(gpus: int, device: str | None) -> str | None:
    """Why ``gpus`` processes cannot train on ``device`` here; None when they can.

    Reads device properties only (no CUDA context).
    """
    if gpus <= 1:
        return None
    kind = (device or "").split(":")[0]
    if kind == "mps":
        return "A Mac has one GPU: train with gpus: 1 on mps."
    if kind != "cuda":
        return None  # processes on the CPU (gloo): the tests' way of checking data parallelism
    from mactuner.devices import detect_devices

    cards = [d for d in detect_devices() if d.type == "cuda"]
    if gpus > len(cards):
        return (f"gpus: {gpus} asks for more GPUs than this machine has ({len(cards)}: "
                + (", ".join(d.key for d in cards) or "none") + "). Lower the number of GPUs.")
    used = cards[:gpus]
    unusable = [d for d in used if not d.is_available]
    if unusable:
        return f"{unusable[0].key} cannot train: {unusable[0].reason}"
    kinds = {(d.name.split(" (ID")[0], d.compute_capability, d.memory_total) for d in used}
    if len(kinds) > 1:
        listed = "; ".join(f"{d.key} {d.label}" + (f" (capability {d.compute_capability})" if d.compute_capability else "")
                           for d in used)
        return (f"These GPUs differ ({listed}). Training on several GPUs waits for the slowest at every step and "
                "must fit the smallest's memory, so the faster card would idle. Train on one card (gpus: 1, "
                "device: cuda:N), or choose matching cards with CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=0,2).")
    return None


def torchrun_command(gpus: int, arguments: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m mactuner ARGUMENTS``.

    (``python -m torch.distributed.run`` is ``torchrun`` itself, run by this interpreter.)
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
            "-m", "mactuner", *arguments]


def effective_batch(batch_size: int, grad_accum: int, gpus: int) -> int:
    """Rows per optimizer step: every GPU adds its micro-batches."""
    return batch_size * grad_accum * gpus


def cuda_count() -> int:
    """CUDA GPUs torch sees (0 without CUDA); no context is created."""
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver: none usable
        return 0


def rank_memory_text(per_rank: list[float | int | None] | None) -> str | None:
    """``"GPU 0: 5.2 GB · GPU 1: 5.1 GB"`` from a report's ``memory_bytes_per_rank``."""
    if not per_rank:
        return None
    return " · ".join(f"GPU {i}: {value / 1024**3:.2f} GB" if value else f"GPU {i}: ?" for i, value in enumerate(per_rank))


def package_root() -> Path:
    """The folder holding the imported mactuner package (the launched processes run there)."""
    import mactuner

    return Path(mactuner.__file__).resolve().parent.parent
