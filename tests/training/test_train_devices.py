"""The trainer on the devices this machine lacks, faked where they can be (no GPU, no Mac here):
the process group's backend and device, several processes on MPS refused, MPS's memory cap,
MPS out-of-memory messages backing off, the peak memory per report, and QLoRA's model and dtypes.

Machine facts these tests depend on: none beyond a CPU; CUDA and MPS are faked
(``tests/fake_hardware.py``), and Linux's ``/proc/self/clear_refs`` is used where present.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mactuner.train import Distributed, PeakMemory, Trainer, TrainingError, init_distributed, limit_mps_memory, train
from mactuner.training import distributed, memory, qlora
from tests.fake_hardware import GiB, fake_mps_mac, fake_two_cuda_gpus
from tests.train_support import read_metrics, tiny_config

# --- process groups ---------------------------------------------------------------


class FakeProcessGroup:
    """``torch.distributed`` as a launcher would set it up, without any network.

    ``all_reduce`` behaves like NCCL: it accepts only tensors on the backend's device
    (here the ``device`` given), and it is a group of one, so a sum leaves values as they are.
    """

    def __init__(self, monkeypatch, device: torch.device, rank: int = 0, world_size: int = 1):
        import torch.distributed as dist

        self.device = device
        self.init_calls: list[dict] = []
        self.reduced: list[tuple[str, int]] = []  # (op, elements) per all-reduce
        self.initialized = False
        monkeypatch.setattr(dist, "init_process_group", self._init)
        monkeypatch.setattr(dist, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: world_size)
        monkeypatch.setattr(dist, "all_reduce", self._all_reduce)
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
        monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: setattr(self, "initialized", False))

    def _init(self, backend=None, **kwargs):
        self.init_calls.append({"backend": backend, **kwargs})
        self.initialized = True

    def _all_reduce(self, tensor, op=None, **kwargs):
        if tensor.device != self.device:
            # NCCL's own words for a CPU tensor
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        self.reduced.append((str(op), tensor.numel()))


def _torchrun_env(monkeypatch, world_size: int, rank: int) -> None:
    for name, value in {
        "WORLD_SIZE": world_size, "RANK": rank, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world_size,
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "test",
    }.items():
        monkeypatch.setenv(name, str(value))


def test_cuda_processes_join_nccl_with_gloo_for_cpu_tensors_and_use_their_gpu(monkeypatch):
    fake_two_cuda_gpus(monkeypatch)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    _torchrun_env(monkeypatch, world_size=2, rank=1)
    group = FakeProcessGroup(monkeypatch, torch.device("cuda", 1), rank=1, world_size=2)

    dist = init_distributed("cuda")
    assert group.init_calls == [{"backend": "cpu:gloo,cuda:nccl"}]
    assert dist.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert (dist.rank, dist.world_size, dist.enabled, dist.is_main) == (1, 2, True, False)


def test_cpu_processes_join_gloo_and_a_lone_process_joins_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert init_distributed("cpu") == Distributed()  # no launcher: no group
    _torchrun_env(monkeypatch, world_size=1, rank=0)
    group = FakeProcessGroup(monkeypatch, torch.device("cpu"))
    dist = init_distributed("cpu")
    # a 1-process torchrun joins too, so its collectives are exercised
    assert group.init_calls == [{"backend": "gloo"}] and dist.enabled and dist.device == torch.device("cpu")


def test_every_collective_of_a_run_uses_the_backends_device_and_changes_no_result(tiny_model_dir, facts_file, monkeypatch):
    config = tiny_config(tiny_model_dir, facts_file, dtype="float32", max_steps=3, eval_every=2, val_fraction=0.25)
    alone = train(config)

    trainer = Trainer(config)
    trainer.setup()
    group = FakeProcessGroup(monkeypatch, trainer.device)
    trainer.dist = Distributed(joined=True, device=trainer.device)
    grouped = trainer.run()

    assert grouped.losses == pytest.approx(alone.losses, abs=1e-6) and grouped.val_loss == pytest.approx(alone.val_loss, abs=1e-6)
    sums = [n for op, n in group.reduced if "MAX" not in op.upper()]
    # per step one flat sum of every gradient, the loss, the out-of-memory and stop flags and each
    # process's memory (nothing else: no separate agreement); per evaluation one of two numbers
    step_buffer = sum(p.numel() for p in trainer.trainable) + 1 + 2 + trainer.dist.world_size
    assert sums.count(step_buffer) == 3 and sums.count(2) == 2 and len(sums) == len(group.reduced) == 5


def test_several_processes_on_mps_are_refused_with_the_reason(tiny_model_dir, facts_file, tmp_path, monkeypatch):
    fake_mps_mac(monkeypatch)
    _torchrun_env(monkeypatch, world_size=2, rank=0)
    with pytest.raises(TrainingError, match="a Mac has one GPU.*single process"):
        train(tiny_config(tiny_model_dir, facts_file, device="mps"), tmp_path / "run")
    assert not (tmp_path / "run" / "status.json").exists() and not (tmp_path / "run" / "config.yaml").exists()


# --- MPS memory --------------------------------------------------------------------


def _free_ram(monkeypatch, available: int) -> None:
    import collections

    import psutil

    vm = collections.namedtuple("svmem", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(32 * GiB, available))


def test_mps_training_is_capped_at_the_recommended_working_set(monkeypatch):
    fake_mps_mac(monkeypatch, recommended_max=16 * GiB)
    _free_ram(monkeypatch, 20 * GiB)
    fractions = []
    monkeypatch.setattr(torch.mps, "set_per_process_memory_fraction", fractions.append)
    monkeypatch.delenv(memory.MPS_WATERMARK_ENV, raising=False)
    assert limit_mps_memory() == 16 * GiB and fractions == [1.0]
    # a person's own setting wins
    monkeypatch.setenv(memory.MPS_WATERMARK_ENV, "1.2")
    assert limit_mps_memory() is None and fractions == [1.0]


def test_mps_training_is_capped_at_the_memory_free_when_that_is_less(monkeypatch):
    # 16 GiB recommended, but other programs leave 6 GiB free (+ the 3 GiB Metal holds for us):
    # above 9 GiB the Mac would swap instead of raising out-of-memory
    fake_mps_mac(monkeypatch, recommended_max=16 * GiB)
    _free_ram(monkeypatch, 6 * GiB)
    fractions = []
    monkeypatch.setattr(torch.mps, "set_per_process_memory_fraction", fractions.append)
    monkeypatch.delenv(memory.MPS_WATERMARK_ENV, raising=False)
    assert limit_mps_memory() == 9 * GiB and fractions == [9 / 16]


def test_the_trainer_caps_mps_memory_before_loading_the_model(tiny_model_dir, facts_file, tmp_path, monkeypatch):
    fake_mps_mac(monkeypatch)
    _free_ram(monkeypatch, 20 * GiB)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(memory.MPS_WATERMARK_ENV, raising=False)
    calls = []
    monkeypatch.setattr(torch.mps, "set_per_process_memory_fraction", lambda f: calls.append(("cap", f)))
    from mactuner import models

    def load_model(*args, **kwargs):
        calls.append(("load", kwargs.get("device")))
        raise RuntimeError("no MPS device on this machine")

    monkeypatch.setattr(models, "load_model", load_model)
    with pytest.raises(RuntimeError, match="no MPS device"):
        train(tiny_config(tiny_model_dir, facts_file, device="mps"), tmp_path / "run")
    assert [c[0] for c in calls] == ["cap", "load"] and calls[0][1] == 1.0
    infos = [r["message"] for r in read_metrics(tmp_path / "run") if r["type"] == "info"]
    assert any("MPS memory capped" in m and "16.0 GiB" in m for m in infos)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


@pytest.mark.parametrize(
    "message",
    [
        "MPS backend out of memory (MPS allocated: 17.20 GB, other allocations: 1.02 GB, max allowed: 18.13 GB).",
        "Invalid buffer size: 21.50 GB",
    ],
)
def test_mps_out_of_memory_errors_halve_the_micro_batch(tiny_model_dir, facts_file, message):
    """The MPS allocator's errors, raised where a too-large batch would raise them, trigger the back-off."""
    config = tiny_config(tiny_model_dir, facts_file, dtype="float32", batch_size=4, max_steps=2, val_fraction=0.0)
    reference = train(config)
    trainer = Trainer(config)
    trainer.setup()
    layer = trainer.causal_lm.base_model.layers[0]
    original = layer.forward

    def forward(hidden_states, *args, **kwargs):
        if hidden_states.shape[0] > 1:
            raise RuntimeError(message)
        return original(hidden_states, *args, **kwargs)

    layer.forward = forward
    result = trainer.run()
    assert result.micro_batch_size == 1 and result.losses == pytest.approx(reference.losses, abs=1e-5)


# --- peak memory -----------------------------------------------------------------------


def test_a_new_lifetime_peak_is_the_intervals_exact_peak_even_unsampled():
    meter = PeakMemory("cpu")
    assert meter.kind == "rss_sampled"
    meter.start()
    baseline = meter._now()
    # enough to take the process above anything it held before, freed before the report
    block = torch.ones((memory.lifetime_peak_rss() - baseline + 128 * 2**20) // 4, dtype=torch.float32)
    size = block.numel() * 4
    del block
    assert meter._now() < baseline + size / 2  # gone by the report
    assert meter.read() >= baseline + size - 16 * 2**20


def test_below_the_lifetime_peak_the_samples_catch_a_transient_allocation():
    meter = PeakMemory("cpu")
    high = torch.ones(256 * 2**18, dtype=torch.float32)  # 256 MiB: the lifetime peak is above what follows
    del high
    meter.start()
    baseline = meter._now()
    block = torch.ones(128 * 2**18, dtype=torch.float32)  # 128 MiB, touched
    meter.sample()
    del block
    assert meter.read() >= baseline + 120 * 2**20
    # a new interval starts from what is in use now, not from the old peak
    meter.start()
    assert meter.read() < baseline + 64 * 2**20


def test_cuda_peak_counter_is_reset_at_an_intervals_start_only(monkeypatch):
    fake_two_cuda_gpus(monkeypatch)
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 5 * GiB)
    meter = PeakMemory("cuda:1")
    assert meter.kind == "cuda_peak_allocated"
    meter.start()
    meter.start()  # the next step of the same interval
    # reset once per interval, at its start; nothing is reset after the read
    assert meter.read() == 5 * GiB and resets == [torch.device("cuda", 1)]


def test_mps_peak_is_the_largest_driver_allocation_sampled(monkeypatch):
    fake_mps_mac(monkeypatch)
    readings = iter([2 * GiB, 7 * GiB, 3 * GiB])
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: next(readings))
    meter = PeakMemory("mps")
    assert meter.kind == "mps_driver_sampled"
    meter.start()
    meter.sample()
    assert meter.read() == 7 * GiB


# --- QLoRA -----------------------------------------------------------------------------------


def test_qlora_finds_models_as_load_model_does(tiny_model_dir, smollm2_path, tmp_path, monkeypatch):
    from mactuner.models import _smollm2_gguf, default_model_path

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    assert Path(qlora.resolve_model_folder("~/tiny")).resolve() == Path(tiny_model_dir).resolve()

    only_gguf = tmp_path / "downloaded"
    only_gguf.mkdir()
    (only_gguf / "SmolLM2.gguf").symlink_to(_smollm2_gguf())
    assert Path(qlora.resolve_model_folder(str(only_gguf))) == default_model_path()
    assert Path(qlora.resolve_model_folder(str(only_gguf / "SmolLM2.gguf"))) == default_model_path()

    with pytest.raises(TrainingError, match="No such model file or folder"):
        qlora.resolve_model_folder("~/missing-model")


def test_qlora_keeps_unquantized_layers_in_the_compute_dtype(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    qlora.freeze_for_training(model)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert qlora.unquantized_dtype(torch.bfloat16) == torch.bfloat16
    assert qlora.unquantized_dtype(torch.float16) == torch.float16


def test_qlora_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(TrainingError, match="pip install bitsandbytes.*method: lora"):
        qlora.load_4bit("SmolLM2-135M-Instruct", torch.device("cuda", 0), torch.bfloat16)


def test_backend_names():
    assert distributed.backend_for("cuda") == "cpu:gloo,cuda:nccl" and distributed.backend_for("cpu") == "gloo"
