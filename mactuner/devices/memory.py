"""Memory readings as typed snapshots in bytes, cache clearing, heap trimming and out-of-memory checks.

A value the platform cannot give is ``None``, never an exception. Gigabytes (2**30 bytes) appear only in
JSON and on screen.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
from typing import Any, NamedTuple

import psutil
import torch

GB = 1024**3  # memory is shown in GB = 2**30 bytes, as the original API's "24.0GB" for a 24 GiB card


def to_gb(value: int | float | None, digits: int = 2) -> float | None:
    """Bytes to GB (2**30), rounded; ``None`` stays ``None``."""
    return None if value is None else round(value / GB, digits)

# --------------------------------------------------------------------------- #
# memory snapshots (bytes)
# --------------------------------------------------------------------------- #


class CpuMemory(NamedTuple):
    """Host memory, in bytes."""

    process_rss: int | None  # this process's resident memory
    system_used: int | None
    system_available: int | None
    system_total: int | None


class CudaMemory(NamedTuple):
    """One CUDA GPU's memory, in bytes. ``used``/``free``/``total`` are device-wide
    (NVML, or ``mem_get_info``), so other processes' use shows."""

    allocated: int | None  # live tensors of this process (torch caching allocator)
    reserved: int | None  # held by this process's allocator, including its cache
    used: int | None
    free: int | None
    total: int | None


class MpsMemory(NamedTuple):
    """Apple-silicon GPU memory, in bytes. Unified memory *is* host memory, so the
    system's figures are the honest "free" (not the other way round)."""

    allocated: int | None  # torch.mps.current_allocated_memory(): live tensors
    driver_allocated: int | None  # torch.mps.driver_allocated_memory(): Metal's share incl. cache
    recommended_max: int | None  # torch.mps.recommended_max_memory(): Metal's working-set limit
    system_total: int | None
    system_available: int | None


MemorySnapshot = CpuMemory | CudaMemory | MpsMemory


def read_or_none(read, *args):
    """Call ``read(*args)``; ``None`` when the platform cannot answer (gpustat's ``safenvml``)."""
    try:
        return read(*args)
    except Exception:  # noqa: BLE001 - an unsupported metric is None, never a crash
        return None


def cpu_memory() -> CpuMemory:
    """Host memory now: this process's RSS and the system's used/available/total."""
    rss = read_or_none(lambda: psutil.Process().memory_info().rss)
    vm = read_or_none(psutil.virtual_memory)
    if vm is None:
        return CpuMemory(rss, None, None, None)
    return CpuMemory(rss, vm.total - vm.available, vm.available, vm.total)


@functools.lru_cache(maxsize=1)
def nvml():
    """The initialised ``pynvml`` module, or ``None`` (not installed, no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def cuda_uuid(index: int) -> str | None:
    """The GPU's UUID as NVML spells it (``GPU-…``), read from torch's device properties.

    Reading properties does not create a CUDA context. ``None`` where torch cannot say.
    """
    uuid = getattr(read_or_none(torch.cuda.get_device_properties, index), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def nvml_handle(index: int):
    """NVML's handle of torch's ``cuda:index``, or ``None``.

    Matched by UUID: CUDA orders GPUs fastest first (``CUDA_DEVICE_ORDER=FASTEST_FIRST``
    by default) while NVML orders them by PCI bus, so on a machine with mixed GPUs
    the same index can name two different cards. Falls back to torch's own
    NVML index mapping when the UUID is unknown.
    """
    lib = nvml()
    if lib is None:
        return None
    uuid = cuda_uuid(index)
    if uuid is not None:
        handle = read_or_none(lib.nvmlDeviceGetHandleByUUID, uuid)
        if handle is not None:
            return handle
    nvml_index = read_or_none(torch.cuda._get_nvml_device_index, index) if os.environ.get("CUDA_VISIBLE_DEVICES") else index
    if nvml_index is None:
        return None
    return read_or_none(lib.nvmlDeviceGetHandleByIndex, nvml_index)


# the names used before (kept for importers)


def cuda_memory(device: str | torch.device | int = 0, *, init: bool = True) -> CudaMemory:
    """One CUDA GPU's memory now.

    Args:
        device: ``"cuda:1"``, a ``torch.device`` or an index.
        init: whether reading may create a CUDA context on the device when NVML
            is missing (``mem_get_info`` costs a few hundred MB of GPU memory
            the first time). The background monitor passes ``False``.
    """
    index = device if isinstance(device, int) else (torch.device(device).index or 0)
    # torch's counters are 0 until this process touches CUDA; they never initialise it
    allocated = read_or_none(torch.cuda.memory_allocated, index)
    reserved = read_or_none(torch.cuda.memory_reserved, index)
    used = free = total = None
    handle = nvml_handle(index)
    info = read_or_none(nvml().nvmlDeviceGetMemoryInfo, handle) if handle is not None else None
    if info is not None:
        used, free, total = int(info.used), int(info.free), int(info.total)
    elif init or read_or_none(torch.cuda.is_initialized):
        got = read_or_none(torch.cuda.mem_get_info, index)
        if got is not None:
            free, total = int(got[0]), int(got[1])
            used = total - free
    if total is None:
        props = read_or_none(torch.cuda.get_device_properties, index)
        total = getattr(props, "total_memory", None)
    return CudaMemory(allocated, reserved, used, free, total)


def mps_memory() -> MpsMemory:
    """The Mac GPU's memory now (torch's MPS counters plus the system's)."""
    mps = getattr(torch, "mps", None)
    vm = read_or_none(psutil.virtual_memory)
    return MpsMemory(
        allocated=read_or_none(mps.current_allocated_memory) if mps else None,
        driver_allocated=read_or_none(mps.driver_allocated_memory) if mps else None,
        # recommended_max_memory arrived in torch 2.5; older builds leave it None
        recommended_max=read_or_none(mps.recommended_max_memory) if mps and hasattr(mps, "recommended_max_memory") else None,
        system_total=vm.total if vm else None,
        system_available=vm.available if vm else None,
    )


def memory_snapshot(device: str | torch.device, *, init: bool = True) -> MemorySnapshot:
    """The typed memory reading for ``device`` (no probing, no exceptions for missing metrics)."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_memory(device, init=init)
    if device.type == "mps":
        return mps_memory()
    return cpu_memory()


def memory_summary(snapshot: MemorySnapshot) -> dict[str, Any]:
    """:func:`memory_axes` in GB (the original API's unit)."""
    return {name: to_gb(value) for name, value in memory_axes(snapshot).items()}


def memory_axes(snapshot: MemorySnapshot) -> dict[str, int | None]:
    """Bring any snapshot onto the original API's axes, in bytes.

    ``allocated``: this process's live memory (CPU: its RSS). ``reserved``: what
    this process's allocator holds (MPS: the driver's share). ``used``: the
    whole device's use. ``total``/``available``: capacity and what is left. On
    MPS "total" is Metal's recommended working set and "available" the smaller
    of what Metal and the system still have: unified memory is host memory.
    """
    if isinstance(snapshot, CudaMemory):
        values = {
            "allocated": snapshot.allocated,
            "reserved": snapshot.reserved,
            "used": snapshot.used,
            "total": snapshot.total,
            "available": snapshot.free,
        }
    elif isinstance(snapshot, MpsMemory):
        total = snapshot.recommended_max or snapshot.system_total
        candidates = [snapshot.system_available]
        if snapshot.recommended_max is not None and snapshot.driver_allocated is not None:
            candidates.append(max(snapshot.recommended_max - snapshot.driver_allocated, 0))
        known = [c for c in candidates if c is not None]
        # unified memory: "used" is what the whole Mac uses (a training run in another
        # process included); this app's own Metal share is "reserved"
        system_used = (
            snapshot.system_total - snapshot.system_available
            if snapshot.system_total is not None and snapshot.system_available is not None
            else None
        )
        values = {
            "allocated": snapshot.allocated,
            "reserved": snapshot.driver_allocated,
            "used": system_used,
            "total": total,
            "available": min(known) if known else None,
        }
    else:
        values = {
            "allocated": snapshot.process_rss,
            "reserved": None,
            "used": snapshot.system_used,
            "total": snapshot.system_total,
            "available": snapshot.system_available,
        }
    return values


def memory_json(device: str | torch.device, snapshot: MemorySnapshot) -> dict[str, Any]:
    """The original ``GET devices/memory`` answer, plus ``used`` and the raw snapshot in bytes."""
    return {
        "device": str(torch.device(device)),
        **memory_summary(snapshot),
        "bytes": snapshot._asdict(),
        "kind": type(snapshot).__name__,
    }



# --------------------------------------------------------------------------- #
# cache clearing and health
# --------------------------------------------------------------------------- #


class CacheClearResult(NamedTuple):
    """What ``clear_cache`` did. ``freed`` is bytes actually given back (never negative)."""

    device: str
    freed: int | None
    before: MemorySnapshot
    after: MemorySnapshot
    collected_objects: int

    def to_json(self) -> dict[str, Any]:
        return {
            "success": True,
            "device": self.device,
            "freed": to_gb(self.freed, 4),
            "freed_bytes": self.freed,
            "collected_objects": self.collected_objects,
            "before": memory_summary(self.before),
            "after": memory_summary(self.after),
            "message": self.message,
        }

    @property
    def message(self) -> str:
        if self.freed is None:
            return f"Cache cleared on {self.device} ({self.collected_objects} objects collected); freed memory unknown."
        return f"Freed {format_bytes(self.freed)} on {self.device} ({self.collected_objects} objects collected)."


def format_bytes(value: int | float | None) -> str:
    """``1536 * 2**20`` -> ``"1.5 GB"``; ``None`` -> ``"unknown"``."""
    if value is None:
        return "unknown"
    for unit, size in (("GB", GB), ("MB", 1024**2), ("KB", 1024)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def _held_bytes(snapshot: MemorySnapshot) -> int | None:
    # what clearing can give back: the allocator's cache (CUDA), Metal's share (MPS), the RSS (CPU)
    if isinstance(snapshot, CudaMemory):
        return snapshot.reserved
    if isinstance(snapshot, MpsMemory):
        return snapshot.driver_allocated
    return snapshot.process_rss


def trim_host_heap() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise, so the RSS would not drop)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# glibc's malloc raises its mmap threshold after every large free, up to 32 MiB, so a training
# step's many 1-30 MiB activations end up in the heap, where freed blocks stay resident and
# fragment: the process's peak RSS measured 2.79 GiB for a LoRA step whose live tensors peak
# near 1.2 GiB (SmolLM2-135M, float32, batch 4 x 512, checkpointing). A fixed threshold sends
# every allocation above it to mmap, which returns it to the system when freed: 1.78 GiB.
# But each such allocation is a fresh mapping whose pages fault in on first touch: at 1 MiB a
# 2-thread float32 LoRA step (batch 4 x <=512) spent 63 s of system time against 10-16 s at
# 4-16 MiB, and ran 1.45x slower. 4 MiB keeps the memory win (peak RSS 1.64 GiB for the
# checkpointed step above; every estimate test within +-25 %) at the speed of the larger values.
HOST_MMAP_THRESHOLD = 4 << 20  # bytes
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def limit_host_heap_growth(threshold: int = HOST_MMAP_THRESHOLD) -> bool:
    """Keep a CPU training process's resident memory close to its live tensors (Linux glibc).

    Fixes malloc's mmap threshold at ``threshold`` bytes (and so turns off its dynamic
    growth): allocations above it are mapped and unmapped on their own instead of
    fragmenting the heap. Returns whether it took effect (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def empty_device_cache(device: str | torch.device | None = None) -> None:
    """Collect garbage, trim the host heap and empty the allocator cache of ``device``.

    ``None`` empties every backend that is already in use. A CUDA context is never
    created just to empty it.
    """
    device = None if device is None else torch.device(device)
    gc.collect()
    trim_host_heap()
    if (device is None or device.type == "cuda") and read_or_none(torch.cuda.is_initialized):
        torch.cuda.empty_cache()
    if (device is None or device.type == "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means the device (CUDA, MPS) or the CPU allocator ran out of memory."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, RuntimeError):
        text = str(error).lower()
        # MPS: "MPS backend out of memory" or "Invalid buffer size" (a single allocation over the
        # limit); CPU: "DefaultCPUAllocator: can't allocate memory"
        return any(
            marker in text
            for marker in ("out of memory", "can't allocate memory", "cannot allocate memory", "invalid buffer size")
        )
    return False


def memory_in_use(device: str | torch.device) -> int:
    """Bytes in use now: the device's allocated memory, or the process's resident memory on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    return int(psutil.Process().memory_info().rss)


def tensor_memory_in_use(device: str | torch.device) -> int | None:
    """The allocator's exact count of tensor bytes on a GPU; ``None`` on the CPU (no such counter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    return None


def clear_cache(device: str | torch.device) -> CacheClearResult:
    """Garbage-collect, empty the device's cache and report the bytes actually freed."""
    device = torch.device(device)
    before = memory_snapshot(device, init=False)
    collected = gc.collect()
    if device.type == "cuda" and read_or_none(torch.cuda.is_initialized):
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
    elif device.type == "mps":
        torch.mps.synchronize()
        torch.mps.empty_cache()
    trim_host_heap()
    after = memory_snapshot(device, init=False)
    held_before, held_after = _held_bytes(before), _held_bytes(after)
    freed = None if held_before is None or held_after is None else max(held_before - held_after, 0)
    return CacheClearResult(str(device), freed, before, after, collected)



OOM_ADVICE = (
    "Out of memory? Clear the cache, lower the batch size (raise gradient "
    "accumulation to keep the effective batch), turn on gradient checkpointing, "
    "shorten the maximum sequence length, or use LoRA/QLoRA instead of full fine-tuning."
)
