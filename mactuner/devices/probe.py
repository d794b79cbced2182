"""What a device is, which devices this machine has, and how one is chosen and checked.

Probing a CUDA device reads its properties and never allocates (no CUDA context in the app process).
"""

from __future__ import annotations

import functools
import logging
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from mactuner.devices.memory import MemorySnapshot, format_bytes, memory_summary, read_or_none, to_gb

log = logging.getLogger(__name__)

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


def cpu_flags() -> set[str] | None:
    """The CPU's capability flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); ``None`` without one (macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return flags


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
    flags = cpu_flags()
    if flags is None:
        return _sysctl("hw.optional.arm.FEAT_BF16") == "1"
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _detect_cpu() -> DeviceInfo:
    cores = psutil.cpu_count(logical=False)
    threads = psutil.cpu_count(logical=True)
    total = read_or_none(lambda: psutil.virtual_memory().total)
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
    if not read_or_none(torch.cuda.is_available):
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
    built = read_or_none(torch.backends.mps.is_built)
    available = read_or_none(torch.backends.mps.is_available)
    if not built and not available:
        return None  # not a Mac build of torch: nothing to show
    chip = _sysctl("machdep.cpu.brand_string") or "Apple silicon"
    system_total = read_or_none(lambda: psutil.virtual_memory().total)
    recommended = None
    if available and hasattr(torch.mps, "recommended_max_memory"):
        recommended = read_or_none(torch.mps.recommended_max_memory)
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


def parse_device(device: str | torch.device) -> torch.device:
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
    parsed = parse_device(device)
    if parsed.type == "cuda":
        if not read_or_none(torch.cuda.is_available):
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
    elif parsed.type == "mps" and not read_or_none(torch.backends.mps.is_available):
        why = (
            "this torch build has no MPS support (MPS exists only on macOS)"
            if not read_or_none(torch.backends.mps.is_built)
            else "MPS needs macOS 12.3 or later with a Metal GPU"
        )
        raise DeviceUnavailableError(f"mps is not available on this machine: {why}. Available: {_existing()}.")
    try:
        probe_device(parsed)
    except Exception as exc:
        raise DeviceUnavailableError(f"The device {parsed} is not available on this machine: {exc}") from exc
    return parsed


def auto_device(priority: tuple[str, ...] | list[str] = DEFAULT_PRIORITY) -> torch.device:
    """The first device type in ``priority`` that exists and passes its probe (the CPU as last resort)."""
    for kind in priority:
        if kind == "mps" and not read_or_none(torch.backends.mps.is_available):
            continue
        if kind == "cuda" and not read_or_none(torch.cuda.is_available):
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

        remembered = read_or_none(lambda: load_settings().default_device)
        if remembered:
            try:
                return check_device(remembered)
            except DeviceUnavailableError as exc:
                log.warning("Remembered device %s is not usable (%s); choosing automatically.", remembered, exc)
        return auto_device()
    return check_device(device)
