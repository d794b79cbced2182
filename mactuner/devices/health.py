"""The diagnosis behind ``mactuner devices health``: versions, backends, a compute probe, advice.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from typing import Any

import torch

from mactuner.devices import memory
from mactuner.devices import probe as probing
from mactuner.devices.dtype import dtype_name, get_optimal_dtype
from mactuner.devices.memory import OOM_ADVICE, read_or_none
from mactuner.devices.probe import DeviceInfo, detect_devices

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
    cuda_ok = bool(read_or_none(torch.cuda.is_available))
    mps_built, mps_ok = bool(read_or_none(torch.backends.mps.is_built)), bool(read_or_none(torch.backends.mps.is_available))
    backends = {
        "cuda": {
            "built": torch.version.cuda is not None,
            "version": torch.version.cuda,
            "available": cuda_ok,
            "device_count": read_or_none(torch.cuda.device_count) if cuda_ok else 0,
            "cudnn": read_or_none(torch.backends.cudnn.version) if cuda_ok else None,
            "nvml": memory.nvml() is not None,
        },
        "mps": {"built": mps_built, "available": mps_ok, "macos": platform.mac_ver()[0] or None},
        "cpu": {
            "name": probing.cpu_name(),
            "native_bfloat16": probing.cpu_supports_bfloat16(),
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
