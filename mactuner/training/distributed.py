"""Data parallelism under ``torchrun``: joining the process group and the few collectives.

Each process trains on its share of every global batch; once per optimizer step
the gradients (and the step's loss sum) are summed over processes in one flat
all-reduce. Done by hand rather than with DistributedDataParallel: the loss is
already divided by the global batch's token count, so a plain sum is the exact
gradient, and one flat buffer per step is all a few million adapter weights need.

Backends. On CUDA the group is ``cpu:gloo,cuda:nccl``: NCCL accepts CUDA tensors
only, so every collective here runs on tensors of :attr:`Distributed.device` (the
process's GPU), and a CPU tensor that slips through still finds gloo. On CPU the
group is gloo. Several processes on MPS are refused: a Mac has one GPU, and gloo
(the only backend there) cannot reduce MPS tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from mactuner.training.errors import TrainingError


@dataclass
class Distributed:
    """This process's place in the group (a group of one when not launched by torchrun).

    Attributes:
        rank, world_size, local_rank: as torchrun sets them.
        joined: whether a process group was joined (collectives run only then).
        device: where collective tensors must live for the group's backend.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        """Whether collectives run (the process joined a group, even a group of one)."""
        return self.joined

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and reports progress."""
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes in place; returns it (on its own device)."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        on_device = tensor if tensor.device == self.device else tensor.to(self.device)
        dist.all_reduce(on_device)
        if on_device is not tensor:
            tensor.copy_(on_device)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process (every process must call it)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait for every process."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.joined = False


def backend_for(device_type: str) -> str:
    """The process-group backend for training on ``device_type``."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher with its environment) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        "TORCHELASTIC_RUN_ID" in os.environ and "MASTER_ADDR" in os.environ
    )


def init_distributed(device_type: str) -> Distributed:
    """Join the process group when launched by torchrun; a group of one otherwise.

    A 1-process torchrun joins a group too, so its collectives (NCCL on CUDA) are
    exercised exactly as with several processes.

    Raises:
        TrainingError: several processes asked for on MPS.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_type == "mps" and world_size > 1:
        raise TrainingError(
            f"{world_size} training processes on MPS: a Mac has one GPU, which one process already uses in full, "
            "and PyTorch cannot exchange gradients between processes on MPS (gloo takes CPU tensors only). "
            "Run a single process: python -m mactuner train CONFIG --device mps (no torchrun)."
        )
    if not launched_by_torchrun():
        return Distributed()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device_type))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if device_type == "cpu":
        # processes on one machine share its cores: do not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, joined=True, device=device)
