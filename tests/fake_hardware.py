"""Named hardware scenarios for tests (gpustat-style fixtures): a CPU-only box,
two CUDA GPUs of different capability, an MPS Mac, and the two kinds of CPU
(with native bfloat16, and float32-only).

Only what this machine lacks is faked: torch's CUDA/MPS queries, the tiny
probe on the absent device, and the CPU's capability flags (the CPU itself
always computes for real, in whatever dtype the test's scenario chooses).
Use ``fake_cpu_only(monkeypatch)`` etc., or the fixtures of the same names,
which ``tests/conftest.py`` registers for every test module.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mactuner.devices as devices

GiB = 1024**3
REAL_PROBE = devices.probe_device

GPUS = [
    # an Ampere card (bfloat16) and a Turing card (float16 only); CUDA lists the faster card first,
    # NVML (by PCI bus) lists the T4 first: the UUIDs tell them apart
    SimpleNamespace(name="NVIDIA RTX 3090", total_memory=24 * GiB, major=8, minor=6, multi_processor_count=82,
                    uuid="3090aaaa-0000-0000-0000-000000000000"),
    SimpleNamespace(name="NVIDIA T4", total_memory=15 * GiB, major=7, minor=5, multi_processor_count=40,
                    uuid="7474bbbb-0000-0000-0000-000000000000"),
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
    monkeypatch.setattr(devices.probe, "probe_device", REAL_PROBE)


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
    monkeypatch.setattr(devices.memory, "nvml", lambda: None)
    monkeypatch.setattr(devices.probe, "probe_device", _probe_only({"cuda"}))
    return calls


def fake_mps_mac(monkeypatch, recommended_max: int = 16 * GiB, macos: str = "14.5") -> None:
    """An Apple-silicon Mac on ``macos``: MPS available, no CUDA."""
    _no_cuda(monkeypatch)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: recommended_max, raising=False)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 1 * GiB)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 3 * GiB)
    monkeypatch.setattr(devices.probe, "_sysctl", {"machdep.cpu.brand_string": "Apple M2 Pro"}.get)
    monkeypatch.setattr(devices.probe, "probe_device", _probe_only({"mps"}))
    monkeypatch.setattr(devices.probe.platform, "mac_ver", lambda: (macos, ("", "", ""), "arm64"))


def fake_cpu_dtype(monkeypatch, bfloat16: bool) -> None:
    """A CPU that computes bfloat16 natively (AVX512-BF16 / AMX / Arm BF16) or one that does not.

    What depends on it: ``get_optimal_dtype("cpu")`` (bfloat16 or float32), hence the
    recommender's dtype and memory estimate, the trainer's and chat engine's dtype on "auto".
    """
    monkeypatch.setattr(devices.probe, "cpu_supports_bfloat16", lambda: bfloat16)


class FakeNVML:
    """NVML as the driver answers it: device-wide memory, including other processes.

    Handles are CUDA's indices here; ``nvmlDeviceGetHandleByIndex`` uses NVML's own (PCI bus)
    order, which on this fake machine is the reverse of CUDA's (T4 first).
    """

    def __init__(self, used_by_pid: dict[int, int]):
        self.used_by_pid = used_by_pid

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for index, gpu in enumerate(GPUS):
            if uuid == f"GPU-{gpu.uuid}":
                return index
        raise LookupError(uuid)

    def nvmlDeviceGetHandleByIndex(self, index):
        return len(GPUS) - 1 - index

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


@pytest.fixture
def float32_cpu(monkeypatch):
    """A CPU without native bfloat16 (e.g. an Intel Xeon with AVX512F only): float32 is its best dtype."""
    fake_cpu_dtype(monkeypatch, bfloat16=False)


@pytest.fixture
def bfloat16_cpu(monkeypatch):
    """A CPU with native bfloat16 (AVX512-BF16 / AMX): bfloat16 is its best dtype."""
    fake_cpu_dtype(monkeypatch, bfloat16=True)


@pytest.fixture(params=["float32-cpu", "bfloat16-cpu"])
def either_cpu(request, monkeypatch):
    """Runs the test twice: on a float32-only CPU and on a CPU with native bfloat16. Yields the dtype name."""
    bfloat16 = request.param == "bfloat16-cpu"
    fake_cpu_dtype(monkeypatch, bfloat16=bfloat16)
    return "bfloat16" if bfloat16 else "float32"
