"""Memory during training: the peak of each report interval, and MPS's limit.

Peak, not a reading after the step: the "memory" a person compares with the
estimated peak must be the step's high point. What the peak means depends on the
device, and each report says which (``memory_kind``):

- ``cuda_peak_allocated``: ``torch.cuda.max_memory_allocated`` since the interval
  began (the trainer resets CUDA's peak counter at the first step of each interval).
  Tensors only: the caching allocator holds more (``max_memory_reserved``, also
  reported, as ``memory_reserved_bytes``), and the process holds more again on the
  device (its CUDA context, cuBLAS workspaces: what nvidia-smi shows, 0.5–1 GB above
  the tensors), reported as ``memory_process_bytes`` where NVML can say.
- ``rss_sampled`` (CPU): the process's resident set size, the largest seen at the
  samples (after each micro-batch's forward pass, where the activations peak, after
  its backward pass, and after the optimizer step); when the process's lifetime peak
  (``ru_maxrss``) rose during the interval, that peak, which is then exact. The
  kernel's peak counter is never reset: other readers of it (benchmarks, the
  estimator's test) keep a whole-process peak.
- ``mps_driver_sampled``: the largest Metal driver allocation seen at the same samples
  (MPS has no peak counter).

MPS. PyTorch lets an MPS process allocate up to 1.7x the GPU's *recommended*
working set, which on a typical Mac is more than its RAM: the Mac swaps long
before an out-of-memory error, and the trainer's batch-halving back-off never
fires. :func:`limit_mps_memory` caps the training process at the recommended
working set, so an allocation beyond it raises instead.
"""

from __future__ import annotations

import os
import sys

import psutil
import torch

# the cap of a training process on MPS, as a fraction of the recommended working set
MPS_MEMORY_FRACTION = 1.0
MPS_WATERMARK_ENV = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"


def limit_mps_memory(fraction: float = MPS_MEMORY_FRACTION) -> int | None:
    """Cap this process's MPS allocations at ``fraction`` of the recommended working set, or at the
    memory free now (RAM available plus what Metal already holds for this process) when that is less:
    past the RAM that is free, a Mac swaps instead of failing, and the micro-batch never halves.

    A person's own ``PYTORCH_MPS_HIGH_WATERMARK_RATIO`` wins: then nothing changes.

    Returns:
        The cap in bytes, or None when it was left alone.
    """
    if os.environ.get(MPS_WATERMARK_ENV):
        return None
    recommended = getattr(torch.mps, "recommended_max_memory", None)
    if recommended is None:
        torch.mps.set_per_process_memory_fraction(float(fraction))
        return None
    working_set = int(recommended())
    free = psutil.virtual_memory().available + int(torch.mps.driver_allocated_memory())
    cap = min(int(working_set * fraction), free)
    torch.mps.set_per_process_memory_fraction(cap / working_set)
    return cap


def lifetime_peak_rss() -> int | None:
    """The process's peak resident set size so far (``ru_maxrss``), in bytes; None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


class PeakMemory:
    """The peak memory of ``device`` over report intervals.

    Call :meth:`start` at the first step of an interval, :meth:`sample` where memory
    peaks (cheap: a host call, no device sync; unused on CUDA, which counts itself),
    and :meth:`read` at the report. Nothing is reset after a read, so whoever reads
    CUDA's peak counter after training still sees the last steps.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.reserved: int | None = None  # CUDA: the allocator's peak reservation at the last read
        self.process: int | None = None  # CUDA: the process's whole use of the device (NVML) at the last read
        self._peak = 0
        self._lifetime = None
        self._open = False
        if self.device.type == "cuda":
            self.kind = "cuda_peak_allocated"
        elif self.device.type == "mps":
            self.kind = "mps_driver_sampled"
        else:
            self.kind = "rss_sampled"

    def _now(self) -> int:
        if self.device.type == "mps":
            return int(torch.mps.driver_allocated_memory())
        return int(psutil.Process().memory_info().rss)

    def start(self) -> None:
        """Begin an interval (if none is open): the peak restarts from what is in use now."""
        if self._open:
            return
        self._open = True
        if self.kind == "cuda_peak_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._peak = self._now()
        if self.kind == "rss_sampled":
            self._lifetime = lifetime_peak_rss()

    def sample(self) -> None:
        """Note the memory in use now (only where the device keeps no peak itself)."""
        if self.kind != "cuda_peak_allocated":
            self._peak = max(self._peak, self._now())

    def read(self) -> int:
        """The peak in bytes since :meth:`start`; closes the interval."""
        self._open = False
        if self.kind == "cuda_peak_allocated":
            self.reserved = int(torch.cuda.max_memory_reserved(self.device))
            self.process = process_device_memory(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        self.sample()
        if self.kind == "rss_sampled" and self._lifetime is not None:
            lifetime = lifetime_peak_rss()
            if lifetime is not None and lifetime > self._lifetime:
                # the process's all-time peak was reached in this interval: that is its peak, exactly
                self._peak = max(self._peak, lifetime)
        return self._peak


def process_device_memory(device: torch.device | str, pid: int | None = None) -> int | None:
    """What process ``pid`` (this one by default) holds on a CUDA device, context included, as the
    driver counts it (NVML, nvidia-smi's figure); None without NVML or where the driver will not say."""
    from mactuner.devices import memory as device_memory

    lib = device_memory.nvml()
    if lib is None:
        return None
    handle = device_memory.nvml_handle(torch.device(device).index or 0)
    if handle is None:
        return None
    try:
        processes = lib.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # noqa: BLE001 - unsupported on some drivers (and in containers): unknown
        return None
    pid = os.getpid() if pid is None else pid
    used = [proc.usedGpuMemory for proc in processes if proc.pid == pid and proc.usedGpuMemory is not None]
    return int(sum(used)) if used else None
