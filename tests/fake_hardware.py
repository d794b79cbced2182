"""Named hardware scenarios for tests (gpustat-style fixtures): a CPU-only box,
two CUDA GPUs of different capability, an MPS Mac.

Only what this machine lacks is faked: torch's CUDA/MPS queries and the tiny
probe allocation on the absent device. The CPU is always the real one.
Use ``fake_cpu_only(monkeypatch)`` etc., or the fixtures of the same names
(import them into a test module: ``from fake_hardware import two_cuda_gpus``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mactuner.devices as devices

GiB = 1024**3
REAL_PROBE = devices.probe_device

GPUS = [
    # an Ampere card (bfloat16) and a Turing card (float16 only)
    SimpleNamespace(name="NVIDIA RTX 3090", total_memory=24 * GiB, major=8, minor=6, multi_processor_count=82),
    SimpleNamespace(name="NVIDIA T4", total_memory=15 * GiB, major=7, minor=5, multi_processor_count=40),
]


def _index(device) -> int:
    if isinstance(device, int):
        return device
    if device is None:
        return 0
    return torch.device(device).index or 0


def _probe_only(allowed_types: set[str]):
    def probe(device: torch.device) -> None:
        if device.type in allowed_types:
            return  # the faked device "answers"
        REAL_PROBE(device)

    return probe


def _no_mps(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)


def _no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def fake_cpu_only(monkeypatch) -> None:
    """No GPU of any kind."""
    _no_cuda(monkeypatch)
    _no_mps(monkeypatch)
    monkeypatch.setattr(devices, "probe_device", REAL_PROBE)


def fake_two_cuda_gpus(monkeypatch, allocated: int = 2 * GiB, reserved: int = 3 * GiB) -> dict:
    """cuda:0 = RTX 3090 (8.6, 24 GiB), cuda:1 = T4 (7.5, 15 GiB); no NVML.

    Returns a dict recording ``mem_get_info`` and ``empty_cache`` calls.
    """
    calls = {"mem_get_info": [], "empty_cache": 0}
    _no_mps(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(GPUS))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: GPUS[_index(d)])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: reserved)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def mem_get_info(d=None):
        calls["mem_get_info"].append(_index(d))
        total = GPUS[_index(d)].total_memory
        return total - 5 * GiB, total  # (free, total): another process holds 2 GiB more than ours

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(devices, "_nvml", lambda: None)
    monkeypatch.setattr(devices, "probe_device", _probe_only({"cuda"}))
    return calls


def fake_mps_mac(monkeypatch, recommended_max: int = 16 * GiB) -> None:
    """An Apple-silicon Mac: MPS available, no CUDA."""
    _no_cuda(monkeypatch)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: recommended_max, raising=False)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 1 * GiB)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 3 * GiB)
    monkeypatch.setattr(devices, "_sysctl", {"machdep.cpu.brand_string": "Apple M2 Pro"}.get)
    monkeypatch.setattr(devices, "probe_device", _probe_only({"mps"}))


class FakeNVML:
    """NVML as the driver answers it: device-wide memory, including other processes."""

    def __init__(self, used_by_pid: dict[int, int]):
        self.used_by_pid = used_by_pid

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        total = [24, 15][handle] * GiB
        used = sum(self.used_by_pid.values()) if handle == 0 else 0
        return type("Memory", (), {"total": total, "used": used, "free": total - used})()

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if handle != 0:
            return []
        return [type("Proc", (), {"pid": pid, "usedGpuMemory": used})() for pid, used in self.used_by_pid.items()]


@pytest.fixture
def cpu_only(monkeypatch):
    fake_cpu_only(monkeypatch)


@pytest.fixture
def two_cuda_gpus(monkeypatch):
    return fake_two_cuda_gpus(monkeypatch)


@pytest.fixture
def mps_mac(monkeypatch):
    fake_mps_mac(monkeypatch)
