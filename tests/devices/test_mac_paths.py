"""The torch path on Apple silicon (issue 20's table): M1/M2 GPUs that emulate bfloat16 get float16
where it is faster, llama.cpp offloads to the GPU where it can, the Makefile checks the Python version,
and what the device health and the quantize page say about MPS is true."""

from __future__ import annotations

import importlib

import pytest
import torch

from mactuner import devices
from mactuner.devices import dtype as dtypes
from tests.fake_hardware import fake_mps_mac


def test_llama_cpp_offloads_every_layer_on_mps_or_cuda_when_the_build_can():
    from mactuner.chat.llamacpp import gpu_layers

    assert gpu_layers("mps", supports_offload=True) == -1
    assert gpu_layers("cuda:1", supports_offload=True) == -1
    assert gpu_layers("cpu", supports_offload=True) == 0
    assert gpu_layers("mps", supports_offload=False) == 0  # a CPU-only build (like this machine's)
    assert gpu_layers(None, supports_offload=True) == 0


def test_a_gguf_chat_on_mps_asks_llama_cpp_for_all_layers(monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")
    from mactuner.chat.llamacpp import load_gguf_chat_model
    from mactuner.models import _smollm2_gguf

    # this machine's build is CPU-only; a Metal build answers True here
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    offloaded = load_gguf_chat_model(_smollm2_gguf(), n_ctx=256, device="mps")
    try:
        assert offloaded.llama.model_params.n_gpu_layers == 0x7FFFFFFF  # llama-cpp-python's "-1: all"
        assert offloaded.device.startswith("mps (llama.cpp")
    finally:
        offloaded.close()
    on_cpu = load_gguf_chat_model(_smollm2_gguf(), n_ctx=256, device="cpu")
    try:
        assert on_cpu.llama.model_params.n_gpu_layers == 0 and on_cpu.device == "cpu (llama.cpp)"
    finally:
        on_cpu.close()


@pytest.mark.parametrize("macos, dtype", [("14.5", "bfloat16"), ("13.6", "float16")])
def test_device_health_says_the_mps_dtype_it_uses(monkeypatch, macos, dtype):
    fake_mps_mac(monkeypatch, macos=macos)
    report = devices.health(probe=False)
    text = " ".join(report["advice"] + report["tips"])
    assert "MPS uses float16 by default" not in text and "prefer float16" not in text
    assert f"MPS computes in {dtype} by default here" in text and "engine: mlx" in text


def test_the_quantize_methods_say_what_a_mac_can_do_instead():
    from mactuner.quantize import METHODS, unsupported_reason

    reasons = [unsupported_reason(m, "mps") for m in METHODS]
    told = [r for r in reasons if r]
    assert told and all("GGUF" in r and "MLX" in r for r in told)
    assert not any("no quantized kernels for MPS" in r for r in told)


def test_without_llama_cpp_the_gguf_chat_says_how_to_get_it(monkeypatch):
    import builtins

    from mactuner.chat.llamacpp import llama_cpp_missing_reason

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    reason = llama_cpp_missing_reason()
    assert "make llamacpp" in reason and "works without it" in reason


def test_make_checks_the_python_version_before_installing(tmp_path):
    import subprocess
    import sys

    from tests.locations import ROOT

    def check(python: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", "python-version", f"PYTHON={python}"], cwd=ROOT,
                              capture_output=True, text=True)

    assert check(sys.executable).returncode == 0
    # macOS's own python3 is 3.9: no torch wheel; the check stops with the fix
    old = tmp_path / "python3.9"
    old.write_text(f"""#!/bin/sh
exec {sys.executable} -c "import sys; sys.version_info = (3, 9, 6, 'final', 0); sys.version = '3.9.6'; exec(sys.argv[1])" "$2"
""")
    old.chmod(0o755)
    done = check(str(old))
    assert done.returncode != 0
    assert "needs Python 3.10 to 3.13" in done.stdout and "3.9.6" in done.stdout and "make PYTHON=python3.11" in done.stdout


@pytest.fixture
def fresh_mps_probe():
    dtypes.mps_half_dtype_by_probe.cache_clear()
    dtypes.MPS_PROBE_TIMES.clear()
    yield
    dtypes.mps_half_dtype_by_probe.cache_clear()
    dtypes.MPS_PROBE_TIMES.clear()


def _fake_matmul_times(monkeypatch, bf16: float, fp16: float) -> list:
    timed = []

    def time_matmul(device, dtype, size=256, repeats=5):
        timed.append((str(device), dtype))
        return {torch.bfloat16: bf16, torch.float16: fp16}[dtype]

    monkeypatch.setattr(importlib.import_module("mactuner.devices.health"), "time_matmul", time_matmul)
    return timed


def test_an_m1_or_m2_gpu_that_emulates_bfloat16_gets_float16_when_the_probe_finds_it_faster(monkeypatch, fresh_mps_probe):
    fake_mps_mac(monkeypatch, macos="14.5")  # an Apple M2 Pro
    timed = _fake_matmul_times(monkeypatch, bf16=0.004, fp16=0.001)
    assert devices.get_optimal_dtype("mps") == torch.float16
    reason = devices.optimal_dtype_reason("mps")
    assert "Apple M2 Pro GPU emulates bfloat16" in reason and "float16 1.00 ms, bfloat16 4.00 ms" in reason
    devices.get_optimal_dtype("mps")
    assert len(timed) == 2, "the probe runs once per process"


def test_an_m2_where_bfloat16_is_as_fast_keeps_it_and_a_float16_checkpoint_stays_float16(monkeypatch, fresh_mps_probe):
    fake_mps_mac(monkeypatch, macos="14.5")
    _fake_matmul_times(monkeypatch, bf16=0.001, fp16=0.001)
    assert devices.get_optimal_dtype("mps") == torch.bfloat16
    assert devices.get_optimal_dtype("mps", checkpoint_dtype=torch.float16) == torch.float16


def test_an_m3_computes_bfloat16_without_a_probe(monkeypatch, fresh_mps_probe):
    fake_mps_mac(monkeypatch, macos="14.5")
    monkeypatch.setattr(devices.probe, "_sysctl", {"machdep.cpu.brand_string": "Apple M3 Max"}.get)
    timed = _fake_matmul_times(monkeypatch, bf16=0.004, fp16=0.001)
    assert devices.get_optimal_dtype("mps") == torch.bfloat16 and timed == []
    assert "macOS 14 or later computes bfloat16" in devices.optimal_dtype_reason("mps")


def test_the_mps_memory_estimate_counts_the_attention_kept_for_backward():
    from mactuner.models import ModelFootprint
    from mactuner.recommend import estimate_memory

    footprint = ModelFootprint(
        source="x", model_type="llama", num_parameters=135_000_000, num_layers=30, hidden_size=576,
        intermediate_size=1536, vocab_size=49152, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, tie_word_embeddings=True,
        linear_shapes={"q_proj": [(576, 576)] * 30, "k_proj": [(576, 192)] * 30, "v_proj": [(576, 192)] * 30,
                       "o_proj": [(576, 576)] * 30},
    )

    def peak(device_type, checkpointing):
        return estimate_memory(footprint, dtype="float16", batch_size=4, seq_len=1024, device_type=device_type,
                               gradient_checkpointing=checkpointing).total

    per_layer = 4 * 9 * 1024 * 1024 * 2  # batch x heads x seq^2, float16
    assert peak("mps", False) - peak("cpu", False) == 30 * per_layer  # 2.1 GiB the estimate used to miss
    assert peak("mps", True) - peak("cpu", True) == per_layer


def test_on_an_m2_the_trainer_keeps_a_float16_checkpoint_in_float16(monkeypatch, fresh_mps_probe, tiny_model_dir, tmp_path):
    """A float16 checkpoint on a GPU that emulates bfloat16: float16 without a probe, said in the run's message."""
    import shutil

    from transformers import AutoModelForCausalLM

    from mactuner.config import TrainConfig
    from mactuner.train import Trainer

    folder = tmp_path / "fp16-model"
    shutil.copytree(tiny_model_dir, folder)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16).save_pretrained(folder)
    fake_mps_mac(monkeypatch, macos="14.5")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    timed = _fake_matmul_times(monkeypatch, bf16=0.001, fp16=0.002)  # the probe would keep bfloat16
    trainer = Trainer(TrainConfig(model=str(folder), dataset=str(tmp_path / "none.jsonl"), device="mps"))
    monkeypatch.setattr(torch.mps, "set_per_process_memory_fraction", lambda f: None)
    with pytest.raises(Exception):
        trainer.setup()
    assert trainer.compute_dtype == torch.float16 and timed == []
