"""What this machine offers the suite, read from the machine itself (never from MacTuner's own probes).

A test that needs a feature calls :func:`require` (or uses :func:`requires` as a mark). Locally a
missing feature skips the test and says how to get it; under ``CI=true`` it fails the test: a broken
set-up must not go green by skipping. ``conftest.py`` also fails a ``CI=true`` session that skipped
anything not marked optional (a reason starting with ``optional:``).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MACTUNER_CHROMIUM", "/usr/bin/chromium")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel lists them (``/proc/cpuinfo``); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _exact_int8_cpu() -> bool:
    # oneDNN's int8 matmul is exact with VNNI (x86) or on Arm with dot-product instructions
    flags = cpu_flags()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) or (platform.machine() in ("aarch64", "arm64") and "asimddp" in flags)


def _torch_op(name: str) -> bool:
    import torch

    return hasattr(torch.ops.aten, name)


FEATURES = {
    # name: (is it here, how to get it)
    "browser": (lambda: Path(CHROMIUM).exists() and importlib.util.find_spec("playwright") is not None,
                f"Debian's chromium at {CHROMIUM} and Playwright's Python package: `make browser setup`"),
    "llama_cpp": (lambda: importlib.util.find_spec("llama_cpp") is not None,
                  "llama-cpp-python, built from source by `make setup` (about 8 minutes on 2 cores)"),
    "gguf_converter": (lambda: (Path(".venv") / "gguf-converter").is_dir() or bool(os.environ.get("MACTUNER_GGUF_CONVERTER")),
                       "llama.cpp's converter, installed by `make setup` into .venv/gguf-converter"),
    "compiler": (lambda: shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None,
                 "a C++ compiler for TorchInductor (`apt-get install g++`)"),
    "int8_kernels": (lambda: _exact_int8_cpu() and _torch_op("_int_mm"),
                     "a CPU with VNNI (avx512_vnni / avx_vnni / amx_int8) or Arm dot-product: exact int8 matmuls"),
    "int8_weight_only": (lambda: _torch_op("_weight_int8pack_mm"), "a torch build with the CPU int8 weight-only kernel"),
    "int4_weight_only": (lambda: _torch_op("_weight_int4pack_mm_for_cpu"), "a torch build with the CPU int4 weight-only kernel"),
    "onednn": (lambda: __import__("torch").backends.mkldnn.is_available(), "a torch build with oneDNN"),
    "mlx": (lambda: importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None,
            '`pip install "mlx[cpu]==0.32.4" mlx-lm==0.32.2` (Linux) or `mlx==0.32.4 mlx-lm==0.32.2` (Apple silicon); '
            "`make setup` installs them from requirements.txt"),
}


def available(feature: str) -> bool:
    """Whether ``feature`` is on this machine."""
    present, _ = FEATURES[feature]
    return bool(present())


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(feature: str) -> None:
    """Skip the calling test locally, fail it under ``CI=true``, when ``feature`` is missing."""
    if available(feature):
        return
    message = f"required feature missing: {feature} — install {FEATURES[feature][1]}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def requires(*features: str):
    """A mark for tests (or ``pytestmark``) that need ``features``: see :func:`require`."""
    return pytest.mark.requires(*features)
