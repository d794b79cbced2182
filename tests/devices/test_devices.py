"""The device manager on three faked machines (CPU-only, two CUDA GPUs, an MPS
Mac) and on the real CPU of the test machine."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mactuner.devices as devices
from mactuner.devices import (
    CpuMemory,
    CudaMemory,
    DeviceInfo,
    DeviceManager,
    DeviceUnavailableError,
    MpsMemory,
    get_optimal_dtype,
    memory_json,
    resolve_device,
)
from mactuner.settings import remember_device
from tests.fake_hardware import GPUS, REAL_PROBE, FakeNVML, GiB

DEVICE_INFO_KEYS = {
    "type", "name", "is_available", "memory_total", "memory_allocated",
    "memory_reserved", "compute_capability", "index",
}


def keys(found) -> list[str]:
    return [info.key for info in found]


# --------------------------------------------------------------------------- #
# a CPU-only box
# --------------------------------------------------------------------------- #


def test_cpu_only_box(cpu_only):
    manager = DeviceManager()
    found = manager.get_available_devices()
    assert keys(found) == ["cpu"]
    cpu = found[0]
    assert cpu.is_available and cpu.memory_total > 1 * GiB
    assert cpu.details["logical_cores"] >= 1
    # the real model name from /proc/cpuinfo, not a placeholder
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert cpu.details["cpu_name"] in cpuinfo
    assert manager.auto_select_device() == torch.device("cpu")
    assert manager.get_current_device() == torch.device("cpu")

    data = cpu.to_json()
    assert DEVICE_INFO_KEYS <= data.keys()
    assert data["type"] == "cpu" and data["index"] is None and data["compute_capability"] is None
    assert data["memory_total"] == round(cpu.memory_total / GiB, 2)
    json.dumps(data)  # serialisable as is

    with pytest.raises(DeviceUnavailableError, match=r"cuda:5 is not available.*Available: cpu"):
        manager.select_device("cuda:5")
    with pytest.raises(DeviceUnavailableError, match="mps is not available"):
        manager.select_device("mps")
    with pytest.raises(DeviceUnavailableError, match="Unknown device 'tpu'"):
        manager.select_device("tpu")
    # a refused selection leaves the current device alone
    assert manager.get_current_device() == torch.device("cpu")


def test_cpu_dtype_follows_the_cpu_capability(cpu_only, monkeypatch):
    flags = Path("/proc/cpuinfo").read_text()
    native = any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))
    assert devices.cpu_supports_bfloat16() is native
    assert get_optimal_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setattr(devices.probe, "cpu_supports_bfloat16", lambda: False)
    assert get_optimal_dtype("cpu") == torch.float32


def test_bfloat16_detection_on_macos_uses_sysctl(monkeypatch):
    # no /proc/cpuinfo on macOS: the Arm feature flag from sysctl decides
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) == "/proc/cpuinfo":
            raise FileNotFoundError(self)
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    devices.cpu_supports_bfloat16.cache_clear()
    try:
        monkeypatch.setattr(devices.probe, "_sysctl", {"hw.optional.arm.FEAT_BF16": "1"}.get)
        assert devices.cpu_supports_bfloat16() is True
        devices.cpu_supports_bfloat16.cache_clear()
        monkeypatch.setattr(devices.probe, "_sysctl", {"hw.optional.arm.FEAT_BF16": "0"}.get)
        assert devices.cpu_supports_bfloat16() is False
    finally:
        devices.cpu_supports_bfloat16.cache_clear()


# --------------------------------------------------------------------------- #
# two CUDA GPUs of different capability
# --------------------------------------------------------------------------- #


def test_two_cuda_gpus(two_cuda_gpus):
    manager = DeviceManager()
    found = manager.get_available_devices()
    assert keys(found) == ["cuda:0", "cuda:1", "cpu"]
    ampere, turing = found[0], found[1]
    assert ampere.to_json() | {"details": None, "reason": None} == {
        "type": "cuda",
        "name": "NVIDIA RTX 3090 (ID: 0)",
        "is_available": True,
        "memory_total": 24.0,
        "memory_allocated": None,
        "memory_reserved": None,
        "compute_capability": "8.6",
        "index": 0,
        "device": "cuda:0",
        "details": None,
        "reason": None,
    }
    assert turing.compute_capability == "7.5" and turing.to_json()["memory_total"] == 15.0
    # the picker's label: name and total memory, fixed facts only (a live figure would lose the choice)
    assert ampere.label == "NVIDIA RTX 3090 (ID: 0) · 24.0 GB" and turing.label == "NVIDIA T4 (ID: 1) · 15.0 GB"
    assert DeviceInfo("cuda", 2, "Broken GPU", is_available=False).label == "Broken GPU"  # memory unknown: the name

    assert manager.auto_select_device() == torch.device("cuda:0")
    assert get_optimal_dtype("cuda:0") == torch.bfloat16
    assert get_optimal_dtype("cuda:1") == torch.float16
    assert manager.select_device("cuda") == torch.device("cuda:0")
    assert manager.select_device("cuda:1") == torch.device("cuda:1")
    assert manager.get_optimal_dtype() == torch.float16  # the current device is cuda:1 now
    with pytest.raises(DeviceUnavailableError) as refused:
        manager.select_device("cuda:5")
    message = str(refused.value)
    assert "cuda:5" in message and "2 CUDA GPUs" in message and "cuda:0, cuda:1, cpu" in message
    assert manager.get_current_device() == torch.device("cuda:1")
    # the priority can be overridden
    assert manager.auto_select_device(["cpu", "cuda"]) == torch.device("cpu")
    assert DeviceManager(priority=("cpu",)).auto_select_device() == torch.device("cpu")


def test_cuda_memory_is_device_wide_and_in_bytes(two_cuda_gpus):
    snapshot = DeviceManager().get_device_memory_info("cuda:1")
    assert snapshot == CudaMemory(allocated=2 * GiB, reserved=3 * GiB, used=5 * GiB, free=10 * GiB, total=15 * GiB)
    data = memory_json("cuda:1", snapshot)
    assert {k: data[k] for k in ("device", "allocated", "reserved", "total", "available")} == {
        "device": "cuda:1",
        "allocated": 2.0,
        "reserved": 3.0,
        "total": 15.0,
        "available": 10.0,
    }


def test_monitoring_reads_never_create_a_cuda_context(two_cuda_gpus):
    # without NVML, mem_get_info would create a context (~300 MB) on an unused GPU
    snapshot = devices.memory_snapshot("cuda:0", init=False)
    assert two_cuda_gpus["mem_get_info"] == []
    assert snapshot.total == 24 * GiB and snapshot.used is None and snapshot.allocated == 2 * GiB


@pytest.mark.skipif(torch.cuda.is_available(), reason="optional: a real GPU would pass the compute test")
def test_health_finds_devices_that_cannot_compute(two_cuda_gpus):
    # the fake GPUs answer queries but cannot run a matrix product: health must say so
    report = DeviceManager().health()
    by_device = {probe["device"]: probe for probe in report["devices"]}
    assert report["status"] == "degraded"
    assert not by_device["cuda:0"]["ok"] and by_device["cuda:0"]["error"]
    assert by_device["cpu"]["ok"]
    assert any("cuda:0 failed its test" in advice for advice in report["advice"])


def test_remembered_device_is_the_default(two_cuda_gpus):
    assert resolve_device(None) == torch.device("cuda:0")  # nothing remembered: priority order
    remember_device("cuda:1")
    assert resolve_device(None) == torch.device("cuda:1")
    remember_device("cuda:5")  # a GPU that went away: fall back instead of failing
    assert resolve_device(None) == torch.device("cuda:0")


def test_start_up_log_matches_the_original(two_cuda_gpus, caplog):
    caplog.set_level(logging.INFO, logger="mactuner.devices")
    manager = DeviceManager()
    manager.detect_devices()
    manager.auto_select_device()
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "Detecting system devices..."
    assert "CUDA GPU detected: NVIDIA RTX 3090 (ID: 0) (24.0GB)" in lines
    assert "CUDA GPU detected: NVIDIA T4 (ID: 1) (15.0GB)" in lines
    assert any(line.startswith("CPU detected: ") for line in lines)
    assert "3 devices detected" in lines
    assert lines[-2:] == ["Auto-selecting the best device...", "Device selected: cuda:0"]


# --------------------------------------------------------------------------- #
# an MPS Mac
# --------------------------------------------------------------------------- #


def test_mps_mac(mps_mac):
    manager = DeviceManager()
    found = manager.get_available_devices()
    assert keys(found) == ["mps", "cpu"]
    mps = found[0]
    assert mps.name == "Apple M2 Pro GPU (MPS)"
    assert mps.memory_total == 16 * GiB  # the recommended working set, not the RAM
    assert mps.to_json()["type"] == "mps" and mps.to_json()["index"] is None
    assert manager.auto_select_device() == torch.device("mps")
    assert get_optimal_dtype("mps") == torch.bfloat16  # macOS 14.5: Metal computes bfloat16
    with pytest.raises(DeviceUnavailableError, match=r"cuda:5 is not available.*Available: mps, cpu"):
        manager.select_device("cuda:5")
    assert manager.auto_select_device(["cuda", "cpu"]) == torch.device("cpu")


def test_mps_memory_uses_unified_memory_honestly(mps_mac):
    snapshot = DeviceManager().get_device_memory_info("mps")
    assert isinstance(snapshot, MpsMemory)
    assert snapshot.allocated == 1 * GiB and snapshot.driver_allocated == 3 * GiB
    assert snapshot.recommended_max == 16 * GiB and snapshot.system_total > 0
    data = memory_json("mps", snapshot)
    assert data["total"] == 16.0 and data["allocated"] == 1.0 and data["reserved"] == 3.0
    # free is what is left, never what is used (LLaMA-Factory's mix-up)
    expected_free = min(snapshot.system_available, 13 * GiB)
    assert data["available"] == round(expected_free / GiB, 2)


# --------------------------------------------------------------------------- #
# the real CPU: memory, moving, clearing, health
# --------------------------------------------------------------------------- #


def test_cpu_memory_snapshot_adds_up():
    snapshot = devices.cpu_memory()
    assert isinstance(snapshot, CpuMemory)
    assert 0 < snapshot.process_rss < snapshot.system_total
    assert snapshot.system_used + snapshot.system_available == snapshot.system_total


def test_move_model_and_tensor_to_the_selected_device(cpu_only):
    manager = DeviceManager()
    manager.select_device("cpu")
    model = manager.move_model_to_device(torch.nn.Linear(4, 2))
    tensor = manager.move_tensor_to_device(torch.ones(3))
    assert next(model.parameters()).device == torch.device("cpu") and tensor.device == torch.device("cpu")


def test_clear_cache_reports_the_memory_it_freed():
    # ~120 MB in small heap blocks kept alive only by a reference cycle: only a
    # garbage collection frees them, and only trimming the heap returns them to the OS
    blocks = [bytearray(64 * 1024) for _ in range(1900)]
    holder = {"blocks": blocks}
    holder["self"] = holder
    del blocks, holder
    result = DeviceManager().clear_cache("cpu")
    assert result.collected_objects >= 1
    assert result.freed >= 60 * 1024**2, result.message
    assert result.after.process_rss < result.before.process_rss
    data = result.to_json()
    assert data["success"] is True and data["device"] == "cpu" and data["freed"] > 0.05
    assert data["message"].startswith("Freed ")


def test_health_on_this_machine():
    report = DeviceManager().health()
    assert report["status"] == "ok"
    assert report["versions"]["torch"] == torch.__version__
    cpu = next(probe for probe in report["devices"] if probe["device"] == "cpu")
    assert cpu["ok"] and cpu["float32_ms"] > 0
    assert cpu["dtype"] == devices.dtype_name(get_optimal_dtype("cpu"))
    assert "PYTORCH_ENABLE_MPS_FALLBACK" in report["environment"]
    assert any("gradient checkpointing" in tip for tip in report["tips"])
    json.dumps(report)


def test_quick_health_touches_no_device(two_cuda_gpus):
    report = DeviceManager().health(probe=False)
    assert report["tested"] is False and report["status"] == "ok"
    assert [p["device"] for p in report["devices"]] == ["cuda:0", "cuda:1", "cpu"]
    assert all("float32_ms" not in p for p in report["devices"])
    assert two_cuda_gpus["mem_get_info"] == []


def test_nvml_shows_other_processes_use(two_cuda_gpus, monkeypatch):
    # another program holds 6 GiB on cuda:0; torch in this process knows only its own 2 GiB
    monkeypatch.setattr(devices.memory, "nvml", lambda: FakeNVML({4242: 6 * GiB, 4243: 3 * GiB}))
    snapshot = devices.memory_snapshot("cuda:0", init=False)
    assert snapshot.used == 9 * GiB and snapshot.free == 15 * GiB and snapshot.total == 24 * GiB
    assert snapshot.allocated == 2 * GiB
    assert two_cuda_gpus["mem_get_info"] == []  # NVML needs no CUDA context


def test_mps_advice(mps_mac, monkeypatch):
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    advice = " ".join(DeviceManager().health(probe=False)["advice"])
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in advice and "float32" in advice


# --------------------------------------------------------------------------- #
# issue 13: what a real GPU machine does differently
# --------------------------------------------------------------------------- #


def test_nvml_readings_are_matched_by_uuid_not_index(two_cuda_gpus, monkeypatch):
    # CUDA lists the RTX 3090 first (fastest first), NVML lists the T4 first (PCI bus order):
    # matching by index would show the T4's numbers on the 3090's card
    monkeypatch.setattr(devices.memory, "nvml", lambda: FakeNVML({4242: 6 * GiB}))
    assert devices.cuda_uuid(0) == f"GPU-{GPUS[0].uuid}"
    first = devices.memory_snapshot("cuda:0", init=False)
    second = devices.memory_snapshot("cuda:1", init=False)
    assert first.total == 24 * GiB and first.used == 6 * GiB
    assert second.total == 15 * GiB and second.used == 0


def test_selecting_a_cuda_gpu_creates_no_cuda_context(two_cuda_gpus, monkeypatch):
    # the real probe, on the faked GPUs: an allocation on CUDA would create a context
    allocations = []
    real_empty = torch.empty

    def empty(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            allocations.append(device)
            raise AssertionError("allocated on CUDA just to probe")
        return real_empty(*args, device=device, **kwargs)

    monkeypatch.setattr(devices.probe, "probe_device", REAL_PROBE)
    monkeypatch.setattr(torch, "empty", empty)
    manager = DeviceManager()
    assert manager.select_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert allocations == [] and two_cuda_gpus["mem_get_info"] == []


def test_mps_dtype_follows_macos(monkeypatch):
    from tests.fake_hardware import fake_mps_mac

    fake_mps_mac(monkeypatch, macos="13.6")
    assert get_optimal_dtype("mps") == torch.float16
    assert "macOS 14" in devices.optimal_dtype_reason("mps")
    fake_mps_mac(monkeypatch, macos="15.1")
    assert get_optimal_dtype("mps") == torch.bfloat16


def test_mps_card_shows_the_whole_macs_use(mps_mac, monkeypatch):
    # unified memory: a training run in another process uses the same RAM; the app's Metal share is separate
    monkeypatch.setattr(devices.memory.psutil, "virtual_memory", lambda: SimpleNamespace(total=32 * GiB, available=20 * GiB))
    axes = devices.memory_axes(devices.memory_snapshot("mps"))
    assert axes["used"] == 12 * GiB  # system use, not this process's 3 GiB
    assert axes["reserved"] == 3 * GiB  # this app's own share, labelled as such
    assert axes["total"] == 16 * GiB


def test_cpu_dtype_follows_the_cpu_flags(either_cpu):
    assert devices.dtype_name(get_optimal_dtype("cpu")) == either_cpu
    assert devices.optimal_dtype_reason("cpu").startswith(either_cpu)


def test_invalid_buffer_size_counts_as_out_of_memory():
    assert devices.is_out_of_memory(RuntimeError("Invalid buffer size: 12.50 GB"))
    assert devices.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))


# --------------------------------------------------------------------------- #
# CPU kinds, faked both ways: the flags decide bfloat16, and `dtype: auto` follows every device
# --------------------------------------------------------------------------- #

CPU_KINDS = {
    # name: (/proc/cpuinfo flags or None for macOS, sysctl FEAT_BF16, native bfloat16)
    "sapphire-rapids-amx": ("fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile", None, True),
    "zen4-avx512-bf16": ("fpu avx2 avx512f avx512_vnni avx512_bf16", None, True),
    "amx-only-flag": ("fpu avx2 amx_bf16", None, True),
    "cascade-lake-vnni": ("fpu avx2 avx512f avx512_vnni", None, False),
    "skylake-avx512": ("fpu avx2 avx512f avx512bw", None, False),
    "haswell-avx2": ("fpu sse4_2 avx avx2 fma", None, False),
    "graviton3-arm-bf16": ("fp asimd asimddp sve i8mm bf16", None, True),
    "graviton2-arm": ("fp asimd asimddp", None, False),
    "apple-m2-feat-bf16": (None, "1", True),
    "apple-m1": (None, "0", False),
}


@pytest.mark.parametrize("kind", CPU_KINDS, ids=list(CPU_KINDS))
def test_bfloat16_and_the_auto_dtype_follow_the_cpu_flags(kind, monkeypatch):
    from mactuner.devices import resolve_dtype

    flags, feat_bf16, native = CPU_KINDS[kind]
    monkeypatch.setattr(devices.probe, "cpu_flags", lambda: None if flags is None else set(flags.split()))
    monkeypatch.setattr(devices.probe, "_sysctl", {"hw.optional.arm.FEAT_BF16": feat_bf16}.get)
    devices.cpu_supports_bfloat16.cache_clear()
    try:
        assert devices.cpu_supports_bfloat16() is native
        expected = torch.bfloat16 if native else torch.float32
        assert get_optimal_dtype("cpu") == resolve_dtype("auto", "cpu") == expected
        assert resolve_dtype("float32", "cpu") == torch.float32  # an explicit dtype is kept whatever the CPU
    finally:
        devices.cpu_supports_bfloat16.cache_clear()


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch):
    real_read_text = Path.read_text
    text = "processor\t: 0\nflags\t\t: fpu avx512_bf16\nprocessor\t: 1\nFeatures\t: asimd bf16\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if str(self) == "/proc/cpuinfo" else real_read_text(self, *a, **k))
    assert devices.probe.cpu_flags() == {"fpu", "avx512_bf16", "asimd", "bf16"}


@pytest.mark.parametrize(
    "device_kind, expected",
    [("cuda-8.6", torch.bfloat16), ("cuda-7.5", torch.float16), ("mps-macos-14", torch.bfloat16),
     ("mps-macos-13", torch.float16), ("cpu-bf16", torch.bfloat16), ("cpu-fp32", torch.float32)],
)
def test_dtype_auto_for_each_faked_device(device_kind, expected, monkeypatch):
    """``dtype: auto`` in a TrainConfig becomes the device's best dtype, on every kind of device."""
    from mactuner.config import TrainConfig
    from mactuner.devices import resolve_dtype
    from tests.fake_hardware import fake_cpu_dtype, fake_mps_mac, fake_two_cuda_gpus

    if device_kind.startswith("cuda"):
        fake_two_cuda_gpus(monkeypatch)
        device = "cuda:0" if device_kind == "cuda-8.6" else "cuda:1"
        capability = torch.cuda.get_device_properties(device)
        assert (capability.major, capability.minor) == ((8, 6) if device_kind == "cuda-8.6" else (7, 5))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (capability.major, capability.minor))
    elif device_kind.startswith("mps"):
        fake_mps_mac(monkeypatch, macos="14.5" if device_kind == "mps-macos-14" else "13.6")
        device = "mps"
    else:
        fake_cpu_dtype(monkeypatch, bfloat16=device_kind == "cpu-bf16")
        device = "cpu"
    config = TrainConfig(dtype="auto", device=device)
    assert resolve_dtype(config.dtype, device) == expected
