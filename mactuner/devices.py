"""Device detection, selection and memory readings.

STUB SECTION (to be completed by the device-manager work): only
``resolve_device`` and ``get_optimal_dtype`` are final and may be used by other
modules now.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``None`` (auto) into a probed ``torch.device``.

    Raises:
        RuntimeError: the device is not available on this machine (the message says why).
    """
    if device is None:
        if torch.backends.mps.is_available():
            device = "mps"
        elif torch.cuda.is_available():
            device = "cuda"
        else:
            device = "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    try:
        torch.empty(0, device=device)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        raise RuntimeError(f"The device {device} is not available on this machine: {exc}") from exc
    return device


@functools.lru_cache(maxsize=1)
def cpu_supports_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def get_optimal_dtype(device: str | torch.device) -> torch.dtype:
    """Best compute dtype for ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bfloat16() else torch.float32
