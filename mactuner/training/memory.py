"""Memory during training: the peak of each report interval, and MPS's limit.

Peak, not a reading after the step: the "memory" a person compares with the
estimated peak must be the step's high point. What the peak means depends on the
device, and each report says which (``memory_kind``):

- ``cuda_peak_allocated``: ``torch.cuda.max_memory_allocated`` since the interval
  began (the peak counter is reset at the first step of each interval).
- ``rss_peak`` (Linux CPU): the process's peak resident set size since the interval
  began (the kernel's high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs``).
- ``rss_sampled`` (other CPUs): the largest resident set size seen at the samples
  (after each micro-batch's forward pass, the activation peak, and at the report).
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
from pathlib import Path

import psutil
import torch

# the cap of a training process on MPS, as a fraction of the recommended working set
MPS_MEMORY_FRACTION = 1.0
MPS_WATERMARK_ENV = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def limit_mps_memory(fraction: float = MPS_MEMORY_FRACTION) -> int | None:
    """Cap this process's MPS allocations at ``fraction`` of the recommended working set.

    A person's own ``PYTORCH_MPS_HIGH_WATERMARK_RATIO`` wins: then nothing changes.

    Returns:
        The cap in bytes, or None when it was left alone.
    """
    if os.environ.get(MPS_WATERMARK_ENV):
        return None
    torch.mps.set_per_process_memory_fraction(float(fraction))
    recommended = getattr(torch.mps, "recommended_max_memory", None)
    return int(recommended() * fraction) if recommended is not None else None


def _hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """The peak memory of ``device`` over report intervals.

    Call :meth:`start` at the first step of an interval (it resets the peak),
    :meth:`sample` where memory peaks (cheap; only used where no counter exists),
    and :meth:`read` at the report. Nothing is reset after a read, so whoever reads
    the device's own peak counters after training still sees the last steps.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._peak = 0
        self._open = False
        if self.device.type == "cuda":
            self.kind = "cuda_peak_allocated"
        elif self.device.type == "mps":
            self.kind = "mps_driver_sampled"
        elif _hwm_bytes() is not None and _reset_hwm():
            self.kind = "rss_peak"
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
        elif self.kind == "rss_peak":
            _reset_hwm()
        else:
            self._peak = self._now()

    def sample(self) -> None:
        """Note the memory in use now (only where the device keeps no peak itself)."""
        if self.kind in ("rss_sampled", "mps_driver_sampled"):
            self._peak = max(self._peak, self._now())

    def read(self) -> int:
        """The peak in bytes since :meth:`start`; closes the interval."""
        self._open = False
        if self.kind == "cuda_peak_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss_peak":
            return _hwm_bytes() or self._now()
        self.sample()
        return self._peak
