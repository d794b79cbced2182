"""Several GPUs in one box (``gpus: N``): refused with the reason where it cannot work (faked GPUs), and
on the CPU with gloo, the same launch a GPU box gets: the CLI and the background runs start torchrun,
Stop, resume and the non-finite stop hold across the processes. Checkpoints move between devices."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from mactuner.training.multi_gpu import gpus_problem
from tests.fake_hardware import GPUS, fake_two_cuda_gpus
from tests.train_support import read_metrics, tiny_config, train_losses
from tests.training.test_train_safety import float16_overflow_model  # noqa: F401 - the fixture

TWIN = SimpleNamespace(**{**vars(GPUS[0]), "uuid": "3090bbbb-0000-0000-0000-000000000000"})


def test_mixed_gpus_are_refused_with_the_reason(two_cuda_gpus, tiny_model_dir, facts_file, capsys):
    from mactuner import runs
    from mactuner.cli import main

    problem = gpus_problem(2, "cuda")
    assert "These GPUs differ" in problem and "RTX 3090" in problem and "T4" in problem
    assert "slowest" in problem and "CUDA_VISIBLE_DEVICES" in problem
    assert "more GPUs than this machine has (2" in gpus_problem(3, "cuda")
    assert gpus_problem(1, "cuda") is None and gpus_problem(2, "mps").startswith("A Mac has one GPU")
    with pytest.raises(runs.RunError, match="These GPUs differ"):
        runs.start_run(tiny_config(tiny_model_dir, facts_file, device="cuda", gpus=2))
    config = tiny_config(tiny_model_dir, facts_file).save(facts_file.parent / "c.yaml")
    assert main(["train", str(config), "--device", "cuda", "--gpus", "2", "--run-dir", str(facts_file.parent / "r")]) == 2
    assert "These GPUs differ" in capsys.readouterr().err


def test_matching_gpus_are_accepted(monkeypatch):
    fake_two_cuda_gpus(monkeypatch, gpus=[GPUS[0], TWIN])
    assert gpus_problem(2, "cuda") is None


@pytest.fixture
def fresh_streamlit_caches():
    """The app's cached devices and recommendations are made on faked GPUs here: none outlives the test."""
    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    st.cache_resource.clear()  # stops the monitor thread (on_release)
    st.cache_data.clear()


def test_the_page_offers_n_gpus_and_shows_the_effective_batch(monkeypatch, fresh_streamlit_caches):
    from tests.app_pages import open_app_page

    fake_two_cuda_gpus(monkeypatch, gpus=[GPUS[0], TWIN])
    at = open_app_page("pages/finetune.py")
    [gpus] = [w for w in at.number_input if w.label == "Use N GPUs"]
    gpus.set_value(2).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    batch = next(w.value for w in at.number_input if w.label.startswith("Batch size"))
    accum = next(w.value for w in at.number_input if w.label.startswith("Gradient accumulation"))
    captions = [c.value for c in at.caption]
    assert f"Effective batch: {batch} x {accum} x 2 GPUs = {batch * accum * 2} rows per step" in captions
    assert any("(per GPU)" in m.value for m in at.markdown)
    # mixed cards: refused on the page, with the reason
    fake_two_cuda_gpus(monkeypatch)
    at.run()
    assert any("These GPUs differ" in e.value for e in at.error)


def test_gpus_n_in_the_cli_starts_torchrun_and_a_non_finite_stop_ends_every_process(float16_overflow_model, facts_file, tmp_path, capsys):  # noqa: F811
    from mactuner.cli import main
    from mactuner.train import NON_FINITE_STEPS

    run_dir = tmp_path / "run"
    config = tiny_config(float16_overflow_model, facts_file, dtype="float16", max_steps=20, target_modules=["q_proj", "v_proj"])
    code = main(["train", str(config.save(tmp_path / "c.yaml")), "--gpus", "2", "--run-dir", str(run_dir), "--quiet"])
    out = capsys.readouterr().out
    assert code != 0 and "Starting 2 training processes" in out and "torch.distributed.run --standalone --nproc-per-node 2" in out
    status = json.loads((run_dir / "status.json").read_text())
    # both processes saw the same summed loss and stopped at the same step; rank 0 wrote why
    assert status["state"] == "failed" and status["step"] == NON_FINITE_STEPS and "not a finite number" in status["message"]
    assert [r["step"] for r in read_metrics(run_dir) if r["type"] == "train"] == list(range(1, NON_FINITE_STEPS + 1))
    assert any("2 processes" in r["message"] for r in read_metrics(run_dir) if r["type"] == "info")


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_a_background_run_on_two_processes_stops_and_resumes(tiny_model_dir, facts_file):
    from mactuner import runs

    run = runs.start_run(tiny_config(tiny_model_dir, facts_file, gpus=2, max_steps=400, save_every=0, log_every=1,
                                     val_fraction=0.0))
    launch = json.loads((run.path / "process.json").read_text())
    assert launch["command"][1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _wait(lambda: len(train_losses(run.path)) >= 2 if (run.path / "metrics.jsonl").exists() else False, 180, "two steps")
    stopped = runs.cancel_run(run.id, timeout=90)
    assert stopped.state == "cancelled", stopped.log_tail
    [*_, checkpoint] = runs.run_checkpoints(run.id)
    assert checkpoint.step == stopped.step >= 2  # every process stopped after the same step
    runs.resume_run(run.id)
    _wait(lambda: max(train_losses(run.path)) > checkpoint.step, 180, "a resumed step")
    final = runs.cancel_run(run.id, timeout=90)
    assert final.state == "cancelled" and final.step > checkpoint.step, final.log_tail
    resumed = [r for r in read_metrics(run.path) if r["type"] == "train" and r["step"] > checkpoint.step]
    assert resumed[0]["step"] == checkpoint.step + 1 and resumed[0]["memory_bytes_per_rank"] is not None


def test_a_checkpoint_from_a_gpu_run_resumes_on_the_cpu(tiny_model_dir, facts_file, tmp_path, monkeypatch):
    """What a CUDA run saves (a fused AdamW's groups, CUDA's RNG state) resumes on a CPU, and back."""
    from mactuner import checkpoints
    from mactuner.train import Trainer

    common = dict(dtype="float32", max_steps=4, save_every=2, val_fraction=0.0, lr_scheduler="constant", warmup_steps=0)
    whole = Trainer(tiny_config(tiny_model_dir, facts_file, **common))
    whole.run()

    # "on the GPU": the optimizer as CUDA builds it (fused), stopped after its step-2 checkpoint
    gpu = Trainer(tiny_config(tiny_model_dir, facts_file, **(common | {"max_steps": 2})), tmp_path / "run")
    gpu.setup()
    gpu.device = torch.device("cuda", 0)
    gpu._build_optimizer()
    gpu.device = torch.device("cpu")
    gpu.run()
    path = checkpoints.latest_checkpoint(tmp_path / "run").path
    state = torch.load(path / checkpoints.STATE_TENSORS, weights_only=True)
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # CUDA's generator state, as a GPU run saves it
    torch.save(state, path / checkpoints.STATE_TENSORS)

    cpu = Trainer(tiny_config(tiny_model_dir, facts_file, **common), tmp_path / "run", resume=True)
    result = cpu.run()
    assert result.state == "finished" and cpu.step == 4
    assert all(not group.get("fused") for group in cpu.optimizer.param_groups)  # this device's AdamW
    assert cpu.losses == pytest.approx(whole.losses[2:], abs=1e-4)


def test_the_runs_view_says_the_effective_batch_and_each_gpus_memory(tmp_path):
    from mactuner.runs import MetricsTail
    from mactuner.runs.views import effective_batch_text, rank_memory_note

    assert effective_batch_text(4, 2, 2) == "Effective batch: 4 x 2 x 2 GPUs = 16 rows per step"
    assert effective_batch_text(4, 2) == "Effective batch: 4 x 2 = 8 rows per step"
    run = tmp_path / "run"
    run.mkdir()
    records = [{"type": "train", "step": 1, "time": 1.0, "memory_bytes": 5 * 2**30, "memory_bytes_per_rank": None},
               {"type": "train", "step": 2, "time": 2.0, "memory_bytes": 5 * 2**30,
                "memory_bytes_per_rank": [5 * 2**30, int(5.5 * 2**30)]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tail = MetricsTail(run)
    tail.update()
    assert rank_memory_note(tail) == "Peak memory per GPU: GPU 0: 5.00 GB · GPU 1: 5.50 GB"
    (run / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    alone = MetricsTail(run)
    alone.update()
    assert rank_memory_note(alone) is None


def test_a_run_on_two_gpus_holds_both(monkeypatch, tiny_model_dir, facts_file):
    """A run training on cuda:0 and cuda:1 refuses a new run on cuda:1, as one on cuda:1 would."""
    import subprocess
    import sys

    from mactuner import paths, runs

    fake_two_cuda_gpus(monkeypatch, gpus=[GPUS[0], TWIN])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = paths.runs_dir() / "both-gpus"
        path.mkdir(parents=True)
        (path / "status.json").write_text(json.dumps({"state": "running", "pid": sleeper.pid, "step": 3,
                                                       "total_steps": 10, "started_at": time.time()}))
        tiny_config(tiny_model_dir, facts_file, device="cuda", gpus=2).save(path / "config.yaml")
        (path / "process.json").write_text(json.dumps({"pid": sleeper.pid, "device": "cuda:0"}))
        with pytest.raises(runs.RunConflict, match="both-gpus"):
            runs.start_run(tiny_config(tiny_model_dir, facts_file, device="cuda:1"))
    finally:
        sleeper.kill()
        sleeper.wait()
