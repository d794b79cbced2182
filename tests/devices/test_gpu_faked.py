"""The CUDA path, checked on faked hardware (no GPU here): what the wheel can run, the current
device, the per-step overhead, the peak-memory fields, the recommender's choices on a GPU.

Each test names the fact of the GPU it fakes (tests/fake_hardware.py); the CPU computes for real.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from mactuner import devices
from mactuner.devices.cuda_support import code_runs_on, kernel_problem, trainer_environment
from tests.fake_hardware import FakeNVML, GiB
from tests.train_support import tiny_config

GB = 1024**3


# --- 1. a GPU the wheel has no kernels for; float32 below 7.0 --------------------------------


def test_a_gpu_the_wheel_has_no_kernels_for_is_unavailable_with_the_reinstall_hint(pascal_gpu):
    [gpu] = [d for d in devices.detect_devices() if d.type == "cuda"]
    assert not gpu.is_available
    assert "6.1" in gpu.reason and "no kernels" in gpu.reason
    assert "pip install torch==" in gpu.reason and "download.pytorch.org/whl/cu126" in gpu.reason
    with pytest.raises(devices.DeviceUnavailableError, match="no kernels in this PyTorch build"):
        devices.check_device("cuda:0")
    # the automatic choice passes over it
    assert devices.auto_device().type == "cpu"
    # and nothing that creates a CUDA context was called to find out (the wheel's list is read from the library)
    assert pascal_gpu["mem_get_info"] == [] and pascal_gpu["set_device"] == []


def test_float32_below_capability_7_and_the_usual_types_above(pascal_gpu, monkeypatch):
    assert devices.get_optimal_dtype("cuda:0") == torch.float32
    assert "tensor cores" in devices.optimal_dtype_reason("cuda:0")


def test_gpus_the_wheel_supports_stay_available(two_cuda_gpus):
    found = [d for d in devices.detect_devices() if d.type == "cuda"]
    assert [d.is_available for d in found] == [True, True]
    assert devices.get_optimal_dtype("cuda:0") == torch.bfloat16 and devices.get_optimal_dtype("cuda:1") == torch.float16


def test_which_code_runs_on_which_capability():
    assert code_runs_on(89, "sm", 86) and not code_runs_on(89, "sm", 90) and not code_runs_on(90, "sm", 86)
    assert code_runs_on(121, "compute", 120) and not code_runs_on(75, "compute", 80)
    assert not code_runs_on(87, "sm", 80)  # Jetson Orin: its own cubins only
    assert kernel_problem(7, 0, arch_list=["sm_75", "sm_80"]) is not None  # Volta on a 2.13 wheel
    assert kernel_problem(7, 0, arch_list=[]) is None  # a build that does not say: no refusal


# --- 2. the current device ----------------------------------------------------------------------


class _Loaded(Exception):
    pass


def test_the_trainer_makes_its_gpu_the_current_device_before_loading(two_cuda_gpus, tiny_model_dir, facts_file, monkeypatch):
    from mactuner.train import Trainer

    seen = []

    def load(self):
        seen.append(list(two_cuda_gpus["set_device"]))
        raise _Loaded

    monkeypatch.setattr(Trainer, "_load_model", load)
    with pytest.raises(_Loaded):
        Trainer(tiny_config(tiny_model_dir, facts_file, device="cuda:1")).setup()
    assert seen == [[1]]


# --- 3. per-step overhead -------------------------------------------------------------------------


def test_status_json_is_written_at_most_once_a_second_while_steps_report(tmp_path, monkeypatch):
    import json

    from mactuner.training import callbacks

    writes = []
    real = callbacks.write_json_atomic
    monkeypatch.setattr(callbacks, "write_json_atomic", lambda path, data: (writes.append(data["step"]), real(path, data)))
    now = [100.0]
    writer = callbacks.RunFolderWriter(tmp_path, clock=lambda: now[0])
    writer.on_train_begin({"step": 0, "total_steps": 90, "message": "go"})
    for step in range(1, 13):  # steps of 250 ms
        now[0] += 0.25
        writer.on_train_report({"type": "train", "step": step, "total_steps": 90})
    # the start, then once a second (not an atomic write with an fsync at every step)
    assert writes == [0, 4, 8, 12]
    for step in range(13, 61):  # steps of 10 ms: at most one write a second
        now[0] += 0.01
        writer.on_train_report({"type": "train", "step": step, "total_steps": 90})
    assert writes == [0, 4, 8, 12]
    writer.on_train_end({"state": "finished", "step": 60, "message": "Finished"})
    assert writes[-1] == 60
    assert json.loads((tmp_path / "status.json").read_text())["step"] == 60
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 60  # every record is kept


def test_a_micro_batch_travels_in_one_pinned_non_blocking_copy(monkeypatch):
    from mactuner.training import batching

    units = batching.make_units(
        [{"input_ids": list(range(1, 9)), "labels": [-100] * 4 + list(range(5, 9))},
         {"input_ids": list(range(1, 6)), "labels": [-100, 2, 3, 4, 5]}], packing=False, max_length=16, seed=0)
    copies, pinned = [], []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (torch.device, str)) and torch.device(target).type == "cuda":
            copies.append(kwargs.get("non_blocking", False))
            return self  # the faked GPU: the tensor stays where it is
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: (pinned.append(True), self)[1])
    batch = batching.collate(units, 0, torch.device("cuda", 1))
    assert copies == [True] and pinned == [True]  # one copy of one pinned buffer, not five pageable ones
    assert batch.input_ids.tolist()[1] == [1, 2, 3, 4, 5, 0, 0, 0]
    assert batch.targets.tolist() == [5, 6, 7, 8, 2, 3, 4, 5]
    on_cpu = batching.collate(units, 0, torch.device("cpu"))
    assert torch.equal(on_cpu.positions, batch.positions) and not hasattr(on_cpu, "loss_mask")


def test_master_gradients_add_up_with_one_multi_tensor_kernel(monkeypatch):
    from mactuner.training.master_weights import MasterWeights

    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    master = MasterWeights(params, torch.bfloat16)
    grads = [[torch.randn(4, 3).bfloat16(), torch.randn(5).bfloat16()] for _ in range(3)]
    calls = []
    real = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for micro in grads:
        for p, g in zip(params, micro):
            p.grad = g.clone()
        master.collect_gradients()
    assert len(calls) == 2  # one per later micro-batch, whatever the number of tensors
    for i, m in enumerate(master.master):
        assert torch.allclose(m.grad, sum(g[i].float() for g in grads))
        assert params[i].grad is None


def test_adamw_is_fused_on_cuda(tiny_model_dir, facts_file):
    from mactuner.train import Trainer
    from mactuner.training.trainer import adamw_options

    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, max_steps=1))
    trainer.setup()
    assert not trainer.optimizer.defaults.get("fused")
    # the same trainer's optimizer as it is built for a GPU (fused AdamW also runs on CPU tensors)
    trainer.device = torch.device("cuda", 0)
    trainer._build_optimizer()
    assert trainer.optimizer.defaults["fused"] is True and adamw_options(torch.device("cpu")) == {}
    # that optimizer trains (its fused kernel exists for CPU tensors too)
    trainer.device = torch.device("cpu")
    assert trainer.run().state == "finished"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_all_reduce_per_step_under_torchrun(tiny_model_dir, facts_file, monkeypatch):
    """A process group of one (as torchrun --nproc-per-node 1 makes): every collective runs."""
    import torch.distributed as dist

    from mactuner.train import Trainer

    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                            WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", TORCHELASTIC_RUN_ID="test").items():
        monkeypatch.setenv(name, value)
    reduces = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: (reduces.append(tensor.numel()), real(tensor, *a, **k))[1])
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(tiny_config(tiny_model_dir, facts_file, max_steps=3, val_fraction=0.0))
        result = trainer.run()
    finally:
        torch.set_num_threads(threads)
    assert result.state == "finished" and trainer.dist.world_size == 1
    # the gradients, the loss, the out-of-memory and stop flags and the memory: one all-reduce a step
    assert len(reduces) == 3
    assert not dist.is_initialized()


# --- 4. peak memory ------------------------------------------------------------------------------


def test_the_cuda_peak_reports_reserved_and_the_process_use(two_cuda_gpus, monkeypatch):
    from mactuner.training.memory import PeakMemory

    monkeypatch.setattr(devices.memory, "nvml", lambda: FakeNVML({os.getpid(): 7 * GiB, 4242: 9 * GiB}))
    peak = PeakMemory("cuda:0")
    peak.start()
    two_cuda_gpus["peak"].update(allocated=5 * GiB, reserved=6 * GiB)
    assert peak.read() == 5 * GiB
    assert peak.reserved == 6 * GiB and peak.process == 7 * GiB  # the context: 1 GiB above the reservation
    assert two_cuda_gpus["reset_peak_memory_stats"] == [0]
    monkeypatch.setattr(devices.memory, "nvml", lambda: None)
    peak.start()
    peak.read()
    assert peak.process is None  # unknown without NVML, not a guess


def test_training_processes_get_expandable_segments_unless_set():
    assert trainer_environment({})["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert trainer_environment(mine)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_a_background_run_starts_with_expandable_segments(tiny_model_dir, facts_file, monkeypatch):
    import subprocess

    from mactuner import runs
    from mactuner.runs import launch

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    started = []
    real = subprocess.Popen

    def popen(command, **kwargs):
        started.append((command, kwargs["env"]))
        return real(command, **kwargs)

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    run = runs.start_run(tiny_config(tiny_model_dir, facts_file, max_steps=1))
    assert runs.wait_for_exit(run.pid, 120)
    [(command, env)] = started
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert runs.get_run(run.id).state == "finished"


# --- 5. the recommender and the quantize page on a GPU -----------------------------------------------


def test_a_7b_model_on_a_24_gb_gpu_gets_bf16_lora_with_checkpointing_not_qlora(two_cuda_gpus, monkeypatch):
    from mactuner.recommend import recommend_hyperparameters
    from tests.recommend.test_recommend import big_footprint

    monkeypatch.setattr("mactuner.recommend.rules.method_available", lambda method, device_type="cuda": True)
    rec = recommend_hyperparameters(footprint=big_footprint(), device="cuda:0", free_memory=22 * GB)
    assert rec.dtype == "bfloat16" and rec.method == "lora" and rec.gradient_checkpointing
    assert "faster than QLoRA" in rec.reasons["method"] and rec.memory.total <= 0.8 * 22 * GB
    # where LoRA's smallest run does not fit, QLoRA it is
    small = recommend_hyperparameters(footprint=big_footprint(), device="cuda:0", free_memory=12 * GB)
    assert small.method == "qlora"


def test_two_gpus_keep_the_effective_batch_by_accumulating_less(two_cuda_gpus, tiny_model_dir):
    from mactuner.models import model_footprint
    from mactuner.recommend import recommend_hyperparameters

    footprint = model_footprint(str(tiny_model_dir))
    one = recommend_hyperparameters(footprint=footprint, device="cuda:0", free_memory=1 * GB)
    two = recommend_hyperparameters(footprint=footprint, device="cuda:0", free_memory=1 * GB, gpus=2)
    assert two.gpus == 2 and two.train_config_values()["gpus"] == 2
    assert two.batch_size * two.grad_accum * 2 == one.batch_size * one.grad_accum
    assert two.learning_rate == one.learning_rate and "stays" in two.reasons["gpus"]


def test_quantizing_on_a_gpu_computes_in_its_precision_with_the_real_int4_kernel(two_cuda_gpus):
    pytest.importorskip("torchao")
    from mactuner.quantize.methods import _transformers_quant_config

    # a T4 has no bfloat16: bitsandbytes' 4-bit layers compute in float16 there, bfloat16 on a 3090
    assert _transformers_quant_config("bnb-4bit", torch.device("cuda", 1)).bnb_4bit_compute_dtype == torch.float16
    assert _transformers_quant_config("bnb-4bit", torch.device("cuda", 0)).bnb_4bit_compute_dtype == torch.bfloat16
    on_3090 = _transformers_quant_config("int4-weight-only", torch.device("cuda", 0)).quant_type
    assert type(on_3090).__name__ == "Int4WeightOnlyConfig" and on_3090.group_size == 32
    assert str(on_3090.int4_packing_format).lower().endswith("tile_packed_to_4d")
    # before Ampere (and on a CPU) no packed int4 kernel: 4-bit values stored in int8
    assert type(_transformers_quant_config("int4-weight-only", torch.device("cuda", 1)).quant_type).__name__ == "IntxWeightOnlyConfig"
