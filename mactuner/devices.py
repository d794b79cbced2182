"""Device detection, selection, dtypes and memory readings.

Every computing function in MacTuner takes a ``device`` and resolves it once
with :func:`resolve_device`; its dtype comes from :func:`get_optimal_dtype`.
:class:`DeviceManager` puts the original design's operations (detect, select,
auto-select, move, memory, clear cache, health) behind one object that the app
holds as a cached resource and the ``devices`` command uses.

Memory readings are typed snapshots in bytes (:class:`CpuMemory`,
:class:`CudaMemory`, :class:`MpsMemory`); a value the platform cannot give is
``None``, never an exception. Gigabytes (2**30 bytes, as the original API's
``"24.0GB"`` for a 24 GiB card) appear only in JSON and on screen.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import torch

log = logging.getLogger(__name__)

GB = 1024**3
DEVICE_TYPES = ("mps", "cuda", "cpu")
DEFAULT_PRIORITY = ("mps", "cuda", "cpu")  # the original's order: Mac GPU, then NVIDIA, then CPU


class DeviceUnavailableError(RuntimeError):
    """A device was asked for that this machine cannot use; the message says why and what exists."""


# --------------------------------------------------------------------------- #
# what a device is
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class DeviceInfo:
    """One compute device as detected.

    Attributes:
        type: ``"cpu"``, ``"cuda"`` or ``"mps"``.
        index: CUDA ordinal; ``None`` for the CPU and MPS.
        name: human name, e.g. ``"NVIDIA RTX 3090 (ID: 0)"`` or ``"AMD EPYC (2 cores)"``.
        is_available: whether torch can use it.
        memory_total: bytes (for MPS the recommended maximum working set), ``None`` if unknown.
        compute_capability: CUDA capability such as ``"8.6"``; ``None`` elsewhere.
        reason: why the device is unavailable (``None`` when available).
        details: extra facts (CPU cores, MPS system memory, …) shown on cards and in JSON.
    """

    type: str
    index: int | None
    name: str
    is_available: bool = True
    memory_total: int | None = None
    compute_capability: str | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The device string torch understands: ``"cpu"``, ``"mps"``, ``"cuda:1"``."""
        return f"{self.type}:{self.index}" if self.index is not None else self.type

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.key)

    @property
    def label(self) -> str:
        """The device as the app's picker names it: ``"NVIDIA RTX 3090 (ID: 0) · 24.0 GB"``, or the name
        alone when its memory is unknown. Fixed facts only: Streamlit matches a choice by its label, so
        live numbers there would lose the choice."""
        return f"{self.name} · {format_bytes(self.memory_total)}" if self.memory_total else self.name

    def to_json(self, memory: MemorySnapshot | None = None) -> dict[str, Any]:
        """The original API's ``DeviceInfo`` (memory in GB, ``null`` where unknown), plus ``index`` and ``device``.

        Args:
            memory: a current reading; fills ``memory_allocated``/``memory_reserved``.
        """
        reading = memory_summary(memory) if memory is not None else {}
        return {
            "type": self.type,
            "name": self.name,
            "is_available": self.is_available,
            "memory_total": to_gb(self.memory_total),
            "memory_allocated": reading.get("allocated"),
            "memory_reserved": reading.get("reserved"),
            "compute_capability": self.compute_capability,
            "index": self.index,
            "device": self.key,
            "reason": self.reason,
            "details": self.details,
        }


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


def _safe(read, *args):
    """Call ``read(*args)``; ``None`` when the platform cannot answer (gpustat's ``safenvml``)."""
    try:
        return read(*args)
    except Exception:  # noqa: BLE001 - an unsupported metric is None, never a crash
        return None


def cpu_memory() -> CpuMemory:
    """Host memory now: this process's RSS and the system's used/available/total."""
    rss = _safe(lambda: psutil.Process().memory_info().rss)
    vm = _safe(psutil.virtual_memory)
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
    uuid = getattr(_safe(torch.cuda.get_device_properties, index), "uuid", None)
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
        handle = _safe(lib.nvmlDeviceGetHandleByUUID, uuid)
        if handle is not None:
            return handle
    nvml_index = _safe(torch.cuda._get_nvml_device_index, index) if os.environ.get("CUDA_VISIBLE_DEVICES") else index
    if nvml_index is None:
        return None
    return _safe(lib.nvmlDeviceGetHandleByIndex, nvml_index)


# the names used before (kept for importers)
_nvml = nvml
_nvml_handle = nvml_handle


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
    allocated = _safe(torch.cuda.memory_allocated, index)
    reserved = _safe(torch.cuda.memory_reserved, index)
    used = free = total = None
    handle = nvml_handle(index)
    info = _safe(nvml().nvmlDeviceGetMemoryInfo, handle) if handle is not None else None
    if info is not None:
        used, free, total = int(info.used), int(info.free), int(info.total)
    elif init or _safe(torch.cuda.is_initialized):
        got = _safe(torch.cuda.mem_get_info, index)
        if got is not None:
            free, total = int(got[0]), int(got[1])
            used = total - free
    if total is None:
        props = _safe(torch.cuda.get_device_properties, index)
        total = getattr(props, "total_memory", None)
    return CudaMemory(allocated, reserved, used, free, total)


def mps_memory() -> MpsMemory:
    """The Mac GPU's memory now (torch's MPS counters plus the system's)."""
    mps = getattr(torch, "mps", None)
    vm = _safe(psutil.virtual_memory)
    return MpsMemory(
        allocated=_safe(mps.current_allocated_memory) if mps else None,
        driver_allocated=_safe(mps.driver_allocated_memory) if mps else None,
        # recommended_max_memory arrived in torch 2.5; older builds leave it None
        recommended_max=_safe(mps.recommended_max_memory) if mps and hasattr(mps, "recommended_max_memory") else None,
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
# detection
# --------------------------------------------------------------------------- #


def _sysctl(name: str) -> str | None:
    """A macOS ``sysctl`` value, or ``None`` (not macOS, unknown key)."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _sysctl("machdep.cpu.brand_string") or platform.processor() or platform.machine() or "CPU"


@functools.lru_cache(maxsize=1)
def cpu_supports_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 natively, from its capability flags.

    x86: AVX512-BF16 or AMX-BF16 (``/proc/cpuinfo`` flags). Arm Linux: the
    ``bf16`` feature. macOS on Apple silicon (no ``/proc/cpuinfo``): sysctl's
    ``hw.optional.arm.FEAT_BF16`` (M2 and later). Without native support torch
    emulates bfloat16 through float32 conversions, which is slower than
    float32 itself, so the answer decides the CPU dtype. On this project's
    build machine (AMD EPYC with avx512_bf16) a bfloat16 matmul measured ~3.7x
    faster than float32; ``health()`` re-measures it on every machine.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return _sysctl("hw.optional.arm.FEAT_BF16") == "1"
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _detect_cpu() -> DeviceInfo:
    cores = psutil.cpu_count(logical=False)
    threads = psutil.cpu_count(logical=True)
    total = _safe(lambda: psutil.virtual_memory().total)
    shown_cores = cores or threads
    return DeviceInfo(
        type="cpu",
        index=None,
        name=f"{cpu_name()} ({shown_cores} cores)" if shown_cores else cpu_name(),
        memory_total=total,
        details={
            "cpu_name": cpu_name(),
            "physical_cores": cores,
            "logical_cores": threads,
            "torch_threads": torch.get_num_threads(),
            "native_bfloat16": cpu_supports_bfloat16(),
        },
    )


def _detect_cuda() -> list[DeviceInfo]:
    if not _safe(torch.cuda.is_available):
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        try:
            props = torch.cuda.get_device_properties(index)
        except Exception as exc:  # noqa: BLE001 - a GPU that fails to query is shown, unavailable, with the reason
            found.append(
                DeviceInfo("cuda", index, f"CUDA GPU (ID: {index})", is_available=False, reason=f"could not query: {exc}")
            )
            continue
        found.append(
            DeviceInfo(
                type="cuda",
                index=index,
                name=f"{props.name} (ID: {index})",
                memory_total=int(props.total_memory),
                compute_capability=f"{props.major}.{props.minor}",
                details={"multiprocessors": getattr(props, "multi_processor_count", None)},
            )
        )
    return found


def _detect_mps() -> DeviceInfo | None:
    built = _safe(torch.backends.mps.is_built)
    available = _safe(torch.backends.mps.is_available)
    if not built and not available:
        return None  # not a Mac build of torch: nothing to show
    chip = _sysctl("machdep.cpu.brand_string") or "Apple silicon"
    system_total = _safe(lambda: psutil.virtual_memory().total)
    recommended = None
    if available and hasattr(torch.mps, "recommended_max_memory"):
        recommended = _safe(torch.mps.recommended_max_memory)
    reason = None
    if not available:
        reason = (
            "torch was built with MPS but the Metal GPU cannot be used here "
            "(MPS needs macOS 12.3 or later on Apple silicon or an AMD GPU)"
        )
    return DeviceInfo(
        type="mps",
        index=None,
        name=f"{chip} GPU (MPS)",
        is_available=bool(available),
        memory_total=recommended or system_total,
        reason=reason,
        details={
            "recommended_max_memory": recommended,
            "system_memory": system_total,
            "macos": platform.mac_ver()[0] or None,
        },
    )


def detect_devices() -> list[DeviceInfo]:
    """Every device on this machine, in priority order: MPS, each ``cuda:N``, the CPU."""
    found = []
    mps = _detect_mps()
    if mps is not None:
        found.append(mps)
    found.extend(_detect_cuda())
    found.append(_detect_cpu())
    return found


# --------------------------------------------------------------------------- #
# resolving, probing, dtypes
# --------------------------------------------------------------------------- #


def probe_device(device: torch.device) -> None:
    """Prove ``device`` works, as cheaply as it can be proved (torchtune's probe).

    CPU and MPS: allocate a tiny tensor. CUDA: read the device's properties
    instead; an allocation would create a CUDA context (hundreds of MB of GPU
    memory) in the probing process, the Streamlit app, taken from the training
    process that will really use the GPU. A broken GPU still fails here
    (``get_device_properties`` raises), and training fails early with the reason.

    Raises:
        Exception: whatever torch raises for an unusable device.
    """
    if device.type == "cuda":
        torch.cuda.get_device_properties(device.index or 0)
        return
    torch.empty(1, device=device)


def _parse_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        parsed = device
    else:
        text = str(device).strip().lower()
        try:
            parsed = torch.device(text)
        except RuntimeError as exc:
            raise DeviceUnavailableError(
                f"Unknown device {device!r}: use one of cpu, mps, cuda or cuda:N."
            ) from exc
    if parsed.type not in DEVICE_TYPES:
        raise DeviceUnavailableError(f"Unknown device {str(device)!r}: use one of cpu, mps, cuda or cuda:N.")
    if parsed.type == "cuda" and parsed.index is None:
        parsed = torch.device("cuda", 0)
    if parsed.type in ("cpu", "mps") and parsed.index not in (None, 0):
        raise DeviceUnavailableError(f"{parsed} does not exist: there is only one {parsed.type} device.")
    return torch.device(parsed.type) if parsed.type in ("cpu", "mps") else parsed


def _existing() -> str:
    return ", ".join(info.key for info in detect_devices() if info.is_available)


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device``, check it exists here and probe it.

    Raises:
        DeviceUnavailableError: unknown, absent or broken; the message names the
            reason and the devices that do exist.
    """
    parsed = _parse_device(device)
    if parsed.type == "cuda":
        if not _safe(torch.cuda.is_available):
            why = (
                "this torch build has no CUDA support" if not torch.version.cuda else "no NVIDIA GPU or driver was found"
            )
            raise DeviceUnavailableError(f"{parsed} is not available on this machine: {why}. Available: {_existing()}.")
        count = torch.cuda.device_count()
        if parsed.index >= count:
            raise DeviceUnavailableError(
                f"{parsed} is not available on this machine: it has {count} CUDA GPU"
                f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}). Available: {_existing()}."
            )
    elif parsed.type == "mps" and not _safe(torch.backends.mps.is_available):
        why = (
            "this torch build has no MPS support (MPS exists only on macOS)"
            if not _safe(torch.backends.mps.is_built)
            else "MPS needs macOS 12.3 or later with a Metal GPU"
        )
        raise DeviceUnavailableError(f"mps is not available on this machine: {why}. Available: {_existing()}.")
    try:
        probe_device(parsed)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        raise DeviceUnavailableError(f"The device {parsed} is not available on this machine: {exc}") from exc
    return parsed


def auto_device(priority: tuple[str, ...] | list[str] = DEFAULT_PRIORITY) -> torch.device:
    """The first device type in ``priority`` that exists and passes its probe (the CPU as last resort)."""
    for kind in priority:
        if kind == "mps" and not _safe(torch.backends.mps.is_available):
            continue
        if kind == "cuda" and not _safe(torch.cuda.is_available):
            continue
        try:
            return check_device(kind)
        except DeviceUnavailableError as exc:
            log.warning("Skipping %s: %s", kind, exc)
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``None`` into a probed ``torch.device``.

    ``None`` means: the default remembered in the settings file (``devices
    select`` / the app's picker) if it still works, else the best device by the
    original priority (MPS > CUDA > CPU).

    Raises:
        RuntimeError: the device is not available on this machine (the message says why).
    """
    if device is None:
        from mactuner.settings import load_settings  # settings imports nothing from here at import time

        remembered = _safe(lambda: load_settings().default_device)
        if remembered:
            try:
                return check_device(remembered)
            except DeviceUnavailableError as exc:
                log.warning("Remembered device %s is not usable (%s); choosing automatically.", remembered, exc)
        return auto_device()
    return check_device(device)


def get_optimal_dtype(device: str | torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """Best compute dtype for ``device`` (``checkpoint_dtype``: the model's stored dtype, where known).

    - CUDA: bfloat16 from compute capability 8.0 (Ampere) on, where it is native
      and keeps float32's range; float16 on older GPUs (Volta/Turing have fast
      float16 tensor cores but no bfloat16).
    - MPS: bfloat16 on macOS 14 and later (Metal gained it there), float16
      before. bfloat16 keeps float32's range, so models trained in bfloat16
      (Qwen, Llama 3 and most recent ones) do not overflow as they can in
      float16; float32 stays the safe fallback the original advised when an op
      is missing or MPS is slow (callers can always pass ``dtype=torch.float32``).
      M1 and M2 GPUs emulate bfloat16: there float16 is chosen when the
      checkpoint is float16, or when a timed matrix product (the health probe's,
      :func:`mps_half_dtype_by_probe`) finds it faster.
    - CPU: bfloat16 when the CPU computes it natively (see
      :func:`cpu_supports_bfloat16`), else float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "mps":
        if not mps_supports_bfloat16():
            return torch.float16
        if mps_emulates_bfloat16():
            return torch.float16 if checkpoint_dtype == torch.float16 else mps_half_dtype_by_probe(mac_chip())
        return torch.bfloat16
    return torch.bfloat16 if cpu_supports_bfloat16() else torch.float32


def mac_chip() -> str:
    """The Mac's chip, e.g. ``"Apple M2 Pro"`` (empty where unknown)."""
    return _sysctl("machdep.cpu.brand_string") or ""


def mps_emulates_bfloat16(chip: str | None = None) -> bool:
    """M1 and M2 GPUs have no bfloat16 arithmetic: Metal emulates it, slower than float16 (M3 on have it)."""
    return bool(re.match(r"Apple M[12]\b", mac_chip() if chip is None else chip))


@functools.lru_cache(maxsize=4)
def mps_half_dtype_by_probe(chip: str) -> torch.dtype:
    """float16 or bfloat16, whichever multiplies faster on this Mac's GPU (timed once per process).

    A probe that cannot run (no MPS) keeps bfloat16 (its range is float32's: no overflow).
    """
    try:
        bf16 = time_matmul(torch.device("mps"), torch.bfloat16, 512)
        fp16 = time_matmul(torch.device("mps"), torch.float16, 512)
    except Exception:  # noqa: BLE001 - no usable MPS: nothing to time
        return torch.bfloat16
    _MPS_PROBE_TIMES[chip] = (bf16, fp16)
    return torch.float16 if fp16 < bf16 else torch.bfloat16


_MPS_PROBE_TIMES: dict[str, tuple[float, float]] = {}  # chip -> (bfloat16 s, float16 s) per 512x512 product


def mps_supports_bfloat16() -> bool:
    """Whether Metal computes bfloat16 here: macOS 14 (Sonoma) or later."""
    version = platform.mac_ver()[0]
    try:
        return int(version.split(".")[0]) >= 14
    except ValueError:
        return False


def optimal_dtype_reason(device: str | torch.device) -> str:
    """One line saying why :func:`get_optimal_dtype` picks what it picks on ``device``."""
    device = torch.device(device)
    chosen = dtype_name(get_optimal_dtype(device))
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (f"{chosen}: compute capability {major}.{minor} "
                + ("computes bfloat16 natively (8.0 and later)" if chosen == "bfloat16" else "has no bfloat16; float16 is its fast type"))
    if device.type == "mps":
        if mps_supports_bfloat16() and mps_emulates_bfloat16():
            times = _MPS_PROBE_TIMES.get(mac_chip())
            timed = f" (a matrix product: float16 {times[1] * 1e3:.2f} ms, bfloat16 {times[0] * 1e3:.2f} ms)" if times else ""
            return (f"{chosen}: the {mac_chip()} GPU emulates bfloat16{timed}; "
                    + ("float16 is faster here (a model trained in bfloat16 can overflow it: the run then stops with advice)"
                       if chosen == "float16" else "bfloat16 measured as fast, and it keeps float32's range"))
        return (f"{chosen}: " + ("macOS 14 or later computes bfloat16 on the GPU, with float32's range"
                                 if chosen == "bfloat16" else "bfloat16 needs macOS 14; float16 is Metal's fast type before it"))
    return (f"{chosen}: " + ("this CPU computes bfloat16 natively (AVX512-BF16/AMX or Arm BF16)"
                             if chosen == "bfloat16" else "this CPU has no native bfloat16, so float32 is its fastest type"))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``.

    Raises:
        ValueError: not a torch dtype name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


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
    if (device is None or device.type == "cuda") and _safe(torch.cuda.is_initialized):
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
    if device.type == "cuda" and _safe(torch.cuda.is_initialized):
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


RELEVANT_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ENABLE_MPS_FALLBACK",
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "HF_HUB_OFFLINE",
    "MACTUNER_HOME",
)

OOM_ADVICE = (
    "Out of memory? Clear the cache, lower the batch size (raise gradient "
    "accumulation to keep the effective batch), turn on gradient checkpointing, "
    "shorten the maximum sequence length, or use LoRA/QLoRA instead of full fine-tuning."
)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_matmul(device: torch.device, dtype: torch.dtype, size: int = 256, repeats: int = 5) -> float:
    """Seconds per ``size``×``size`` matrix product on ``device`` in ``dtype`` (best of ``repeats``).

    Raises:
        RuntimeError: the product failed or gave a non-finite result (a broken device).
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    (a @ b).sum().item()  # warm-up: kernels load, caches fill
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        c = a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    if not torch.isfinite(c.float()).all():
        raise RuntimeError(f"a {dtype_name(dtype)} matrix product on {device} gave non-finite values")
    return best


def probe_compute(device: torch.device, size: int = 256) -> dict[str, Any]:
    """Run timed matrix products in float32 and the optimal dtype on ``device``."""
    result: dict[str, Any] = {"device": str(device), "ok": False, "error": None}
    try:
        dtype = get_optimal_dtype(device)
        result["dtype"] = dtype_name(dtype)
        fp32 = time_matmul(device, torch.float32, size)
        flops = 2 * size**3
        result["float32_ms"] = round(fp32 * 1000, 3)
        result["float32_gflops"] = round(flops / fp32 / 1e9, 1)
        if dtype != torch.float32:
            fast = time_matmul(device, dtype, size)
            result[f"{result['dtype']}_ms"] = round(fast * 1000, 3)
            result["speedup_vs_float32"] = round(fp32 / fast, 2)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the point is to find broken devices
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def health(devices: list[DeviceInfo] | None = None, *, probe: bool = True) -> dict[str, Any]:
    """Diagnose the machine: versions, backends, a timed probe per device, environment, advice.

    Args:
        devices: the detected devices (default: detect now).
        probe: run the timed matrix products. Without them the report is
            instant and touches no GPU (probing a CUDA GPU creates a context of
            a few hundred MB on it), but a broken device goes unnoticed.

    Returns:
        A JSON-ready dict with ``status`` (``"ok"`` or ``"degraded"``),
        ``tested`` (whether devices were probed), ``versions``, ``backends``,
        ``devices`` (probe results), ``environment``, ``advice`` (what to do
        about problems found) and ``tips`` (the original's troubleshooting that
        always applies).
    """
    devices = detect_devices() if devices is None else devices
    probes = []
    for info in devices:
        if info.is_available and probe:
            probes.append({"name": info.name, **probe_compute(info.torch_device)})
        elif info.is_available:
            probes.append({"name": info.name, "device": info.key, "ok": True, "error": None})
        else:
            probes.append({"name": info.name, "device": info.key, "ok": False, "error": info.reason})
    cuda_ok = bool(_safe(torch.cuda.is_available))
    mps_built, mps_ok = bool(_safe(torch.backends.mps.is_built)), bool(_safe(torch.backends.mps.is_available))
    backends = {
        "cuda": {
            "built": torch.version.cuda is not None,
            "version": torch.version.cuda,
            "available": cuda_ok,
            "device_count": _safe(torch.cuda.device_count) if cuda_ok else 0,
            "cudnn": _safe(torch.backends.cudnn.version) if cuda_ok else None,
            "nvml": _nvml() is not None,
        },
        "mps": {"built": mps_built, "available": mps_ok, "macos": platform.mac_ver()[0] or None},
        "cpu": {
            "name": cpu_name(),
            "native_bfloat16": cpu_supports_bfloat16(),
            "threads": torch.get_num_threads(),
        },
    }
    advice = []
    for result in probes:
        if not result["ok"]:
            advice.append(f"{result['device']} failed its test ({result['error']}); choose another device.")
    if not cuda_ok and torch.version.cuda is None and shutil.which("nvidia-smi"):
        advice.append(
            f"An NVIDIA driver is installed but torch {torch.__version__} was built without CUDA: "
            "install a CUDA build of torch (see pytorch.org) to use the GPU."
        )
    elif torch.version.cuda and not cuda_ok:
        advice.append(
            f"torch has CUDA {torch.version.cuda} but no GPU answered: check `nvidia-smi`, the driver "
            "version, and CUDA_VISIBLE_DEVICES."
        )
    if sys.platform == "darwin" and not mps_ok:
        advice.append(
            "MPS is not available: it needs Apple silicon (or an AMD GPU) and macOS 12.3+, and an arm64 "
            "Python (not Rosetta). Check with `python -c \"import torch; print(torch.backends.mps.is_available())\"`."
        )
    if mps_ok:
        if os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") != "1":
            advice.append(
                "If an operation is not implemented on MPS, set PYTORCH_ENABLE_MPS_FALLBACK=1 so it falls back to the CPU."
            )
        advice.append(
            f"MPS computes in {dtype_name(get_optimal_dtype('mps'))} by default here (bfloat16 from macOS 14, float16 "
            "before); if training gives NaN losses in float16, use bfloat16 or float32; if it is slow, float32 (the "
            "original's advice). On Apple silicon the MLX engine (engine: mlx) trains faster and runs QLoRA."
        )
    if not cuda_ok and not mps_ok:
        advice.append(
            "No GPU: everything runs on the CPU. Use a small model (SmolLM2-135M), LoRA and short sequences."
        )
    return {
        "status": "ok" if all(p["ok"] for p in probes) else "degraded",
        "tested": probe,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "backends": backends,
        "devices": probes,
        "environment": {name: os.environ.get(name) for name in RELEVANT_ENV},
        "advice": advice,
        "tips": [
            'Check CUDA: `python -c "import torch; print(torch.cuda.is_available(), torch.version.cuda)"` and `nvidia-smi`.',
            'Check MPS: `python -c "import torch; print(torch.backends.mps.is_available())"` (macOS 12.3+, arm64 Python).',
            "On MPS MacTuner computes in bfloat16 on macOS 14+ and float16 before; switch to float32 if it is slow "
            "or unstable, and to bfloat16 if float16 overflows (NaN losses).",
            OOM_ADVICE,
        ],
    }


# --------------------------------------------------------------------------- #
# the manager
# --------------------------------------------------------------------------- #


class DeviceManager:
    """Detects devices and serves the selected one (the original design's core).

    One instance is shared by the whole app (``st.cache_resource``), so its own
    "current device" is only the default for callers that pass none; the app
    keeps each browser session's choice in ``st.session_state`` and passes it
    explicitly. Methods are thread-safe.

    Args:
        priority: device types in auto-select order (default MPS > CUDA > CPU).
    """

    def __init__(self, priority: tuple[str, ...] | list[str] = DEFAULT_PRIORITY):
        unknown = [kind for kind in priority if kind not in DEVICE_TYPES]
        if unknown:
            raise ValueError(f"priority may hold only {', '.join(DEVICE_TYPES)}, got {unknown}")
        self.priority = tuple(priority)
        self._lock = threading.RLock()
        self._devices: list[DeviceInfo] | None = None
        self._current: torch.device | None = None

    # -- detection --------------------------------------------------------- #

    def detect_devices(self) -> list[DeviceInfo]:
        """Detect every device again and log what was found, as the original did."""
        log.info("Detecting system devices...")
        devices = detect_devices()
        for info in devices:
            if not info.is_available:
                log.info("%s found but unavailable: %s", info.name, info.reason)
            elif info.type == "mps":
                log.info("MPS (Mac GPU) detected")
            elif info.type == "cuda":
                log.info("CUDA GPU detected: %s (%.1fGB)", info.name, (info.memory_total or 0) / GB)
            else:
                log.info("CPU detected: %s, %.1fGB RAM", info.name, (info.memory_total or 0) / GB)
        log.info("%d devices detected", len(devices))
        with self._lock:
            self._devices = devices
        return devices

    def get_available_devices(self) -> list[DeviceInfo]:
        """Detected devices (detecting on first use); unavailable ones carry their ``reason``."""
        with self._lock:
            if self._devices is None:
                self.detect_devices()
            return list(self._devices)

    def get_device_info(self, device: str | torch.device | None = None) -> DeviceInfo:
        """The :class:`DeviceInfo` of ``device`` (default: the current one)."""
        key = str(self._target(device))
        for info in self.get_available_devices():
            if info.key == key:
                return info
        raise DeviceUnavailableError(f"{key} was not detected. Detected: {', '.join(i.key for i in self._devices)}.")

    # -- selection --------------------------------------------------------- #

    def select_device(self, device_type: str | torch.device) -> torch.device:
        """Probe and select ``"cpu"``, ``"mps"``, ``"cuda"`` or ``"cuda:N"``.

        Raises:
            DeviceUnavailableError: the device is unknown, absent or broken.
        """
        device = check_device(device_type)
        with self._lock:
            self._current = device
        log.info("Device selected: %s", device)
        return device

    def auto_select_device(self, priority: tuple[str, ...] | list[str] | None = None) -> torch.device:
        """Select the best device by ``priority`` (default: this manager's, MPS > CUDA > CPU)."""
        log.info("Auto-selecting the best device...")
        device = auto_device(priority or self.priority)
        with self._lock:
            self._current = device
        log.info("Device selected: %s", device)
        return device

    def get_current_device(self) -> torch.device:
        """The selected device; auto-selected on first use."""
        with self._lock:
            if self._current is None:
                return self.auto_select_device()
            return self._current

    def _target(self, device: str | torch.device | None) -> torch.device:
        return self.get_current_device() if device is None else _parse_device(device)

    # -- moving and dtypes ------------------------------------------------- #

    def move_model_to_device(self, model: torch.nn.Module, device: str | torch.device | None = None):
        """Move ``model`` to ``device`` (default: the current one); returns the model."""
        return model.to(self._target(device))

    def move_tensor_to_device(self, tensor: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
        """Move ``tensor`` to ``device`` (default: the current one)."""
        return tensor.to(self._target(device))

    def get_optimal_dtype(self, device: str | torch.device | None = None) -> torch.dtype:
        """See :func:`get_optimal_dtype`."""
        return get_optimal_dtype(self._target(device))

    # -- memory ------------------------------------------------------------ #

    def get_device_memory_info(self, device: str | torch.device | None = None, *, init: bool = True) -> MemorySnapshot:
        """A typed memory snapshot (bytes) of ``device`` (default: the current one)."""
        return memory_snapshot(self._target(device), init=init)

    def clear_cache(self, device: str | torch.device | None = None) -> CacheClearResult:
        """Garbage-collect and empty ``device``'s cache; see :func:`clear_cache`."""
        return clear_cache(self._target(device))

    def health(self, *, probe: bool = True) -> dict[str, Any]:
        """See :func:`health`."""
        return health(self.get_available_devices(), probe=probe)
