"""The compute dtype per device, and the one parser and namer of dtypes.
"""

from __future__ import annotations

import functools
import platform
import re

import torch

from mactuner.devices import probe


def get_optimal_dtype(device: str | torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """Best compute dtype for ``device`` (``checkpoint_dtype``: the model's stored dtype, where known).

    - CUDA: bfloat16 from compute capability 8.0 (Ampere) on, where it is native
      and keeps float32's range; float16 on 7.x (Volta/Turing have fast
      float16 tensor cores but no bfloat16); float32 below 7.0 (Pascal consumer
      cards run float16 at a small fraction of their float32 rate).
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
        if major < 7:
            # Pascal and older: float16 without tensor cores runs at a fraction of float32 on consumer cards
            return torch.float32
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "mps":
        if not mps_supports_bfloat16():
            return torch.float16
        if mps_emulates_bfloat16():
            return torch.float16 if checkpoint_dtype == torch.float16 else mps_half_dtype_by_probe(mac_chip())
        return torch.bfloat16
    return torch.bfloat16 if probe.cpu_supports_bfloat16() else torch.float32


def mac_chip() -> str:
    """The Mac's chip, e.g. ``"Apple M2 Pro"`` (empty where unknown)."""
    return probe._sysctl("machdep.cpu.brand_string") or ""


def mps_emulates_bfloat16(chip: str | None = None) -> bool:
    """M1 and M2 GPUs have no bfloat16 arithmetic: Metal emulates it, slower than float16 (M3 on have it)."""
    return bool(re.match(r"Apple M[12]\b", mac_chip() if chip is None else chip))


@functools.lru_cache(maxsize=4)
def mps_half_dtype_by_probe(chip: str) -> torch.dtype:
    """float16 or bfloat16, whichever multiplies faster on this Mac's GPU (timed once per process).

    A probe that cannot run (no MPS) keeps bfloat16 (its range is float32's: no overflow).
    """
    import importlib

    # the module (the package's attribute `health` is the function of that name)
    health = importlib.import_module("mactuner.devices.health")
    try:
        bf16 = health.time_matmul(torch.device("mps"), torch.bfloat16, 512)
        fp16 = health.time_matmul(torch.device("mps"), torch.float16, 512)
    except Exception:  # noqa: BLE001 - no usable MPS: nothing to time
        return torch.bfloat16
    MPS_PROBE_TIMES[chip] = (bf16, fp16)
    return torch.float16 if fp16 < bf16 else torch.bfloat16


MPS_PROBE_TIMES: dict[str, tuple[float, float]] = {}  # chip -> (bfloat16 s, float16 s) per 512x512 product


def resolve_dtype(setting: str | torch.dtype | None, device: str | torch.device,
                  checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a run computes in: ``"auto"`` (or ``None``) is the device's best (:func:`get_optimal_dtype`),
    anything else is parsed (:func:`parse_dtype`). The one rule the trainer and the memory estimate share."""
    if setting is None or setting == "auto":
        return get_optimal_dtype(device, checkpoint_dtype)
    return parse_dtype(setting)


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
                + ("computes bfloat16 natively (8.0 and later)" if chosen == "bfloat16"
                   else "has no bfloat16; float16 is its fast type" if chosen == "float16"
                   else "has no tensor cores (below 7.0): float16 runs at a fraction of float32's speed there"))
    if device.type == "mps":
        if mps_supports_bfloat16() and mps_emulates_bfloat16():
            times = MPS_PROBE_TIMES.get(mac_chip())
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
