"""Checkpoints: a resumed run equals an uninterrupted one step for step, a kill in the
middle of a save leaves the last good checkpoint, pruning keeps the last K and the best."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mactuner import checkpoints
from mactuner.checkpoints import delete_checkpoint, list_checkpoints, load_checkpoint_state, save_checkpoint
from mactuner.train import Trainer, TrainingCallback, TrainingError, train
from tests.features import require
from tests.train_support import tiny_config, train_losses

ROOT = Path(__file__).resolve().parents[1]


class StopAt(TrainingCallback):
    """Asks the trainer to stop after ``step``, as SIGTERM does."""

    def __init__(self, step: int):
        self.step = step
        self.trainer: Trainer | None = None

    def on_train_report(self, info):
        if info["step"] == self.step:
            self.trainer.request_stop()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_resumed_run_reaches_the_same_losses_step_for_step(tiny_model_dir, facts_file, tmp_path, method):
    # dropout on, so the RNG state has to come back too; bfloat16 compute as on this CPU;
    # QLoRA: the resumed run quantizes the base to the same int8 rows
    if method == "qlora":
        require("int8_kernels")
    config = tiny_config(
        tiny_model_dir, facts_file, lora_dropout=0.1, max_steps=8, save_every=4, eval_every=4, lr_scheduler="cosine",
        warmup_steps=2, method=method,
    )
    straight = tmp_path / "straight"
    train(config, straight)

    interrupted = tmp_path / "interrupted"
    stop = StopAt(3)
    trainer = Trainer(config, interrupted, callbacks=[stop])
    stop.trainer = trainer
    first = trainer.run()
    assert first.state == "cancelled" and first.step == 3
    assert [c.step for c in list_checkpoints(interrupted)] == [3]

    resumed = train(config, interrupted, resume=True)
    assert resumed.state == "finished" and resumed.step == 8

    expected, got = train_losses(straight), train_losses(interrupted)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - expected[step]) <= 1e-4, (step, got[step], expected[step])
    # and the adapters they end with are the same
    from safetensors.torch import load_file

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(interrupted / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_kill_in_the_middle_of_a_save_leaves_the_last_good_checkpoint(tiny_model_dir, facts_file, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_model_dir, facts_file, max_steps=2, save_every=2)
    train(config, run_dir)
    assert [c.step for c in list_checkpoints(run_dir)] == [2]

    # resume towards step 4 in another process that stalls inside its next save; kill it there
    env = dict(os.environ, **{checkpoints.PAUSE_ENV: "120"})
    process = subprocess.Popen(
        [sys.executable, "-m", "mactuner", "train", "--run-dir", str(run_dir), "--resume", "--max-steps", "4", "--quiet"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        staging = []
        while time.time() < deadline and not staging:
            assert process.poll() is None, "the trainer ended before the save it should stall in"
            staging = [p for p in (run_dir / "checkpoints").glob(".staging-step-00000004.*") if (p / checkpoints.STATE_TENSORS).exists()]
            time.sleep(0.3)
        assert staging, "no save in progress was seen"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

    # the half-written step 4 is not a checkpoint; step 2 still is, and resumes
    assert [c.step for c in list_checkpoints(run_dir)] == [2]
    assert staging[0].exists() and (staging[0] / "adapter_model.safetensors").exists()
    result = train(config.__class__(**{**config.to_dict(), "max_steps": 4}), run_dir, resume=True)
    assert result.state == "finished" and result.step == 4 and len(result.losses) == 2
    assert not staging[0].exists()  # leftovers are cleared when a run starts
    assert [c.step for c in list_checkpoints(run_dir)] == [2, 4]


def test_checkpoints_are_peft_folders_and_prune_keeps_last_and_best(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    run_dir = tmp_path / "run"
    val_losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: None}
    for step, val in val_losses.items():
        save_checkpoint(
            run_dir,
            step,
            model=model,
            state={"loss": 10.0 - step, "val_loss": val},
            tensors={"optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}},
        )
        checkpoints.prune_checkpoints(run_dir, keep_last=2)
    found = list_checkpoints(run_dir)
    # the last two, plus step 2: the best validation loss
    assert [c.step for c in found] == [2, 4, 5]
    assert found[0].val_loss == 1.0 and found[0].loss == 8.0 and found[0].size_bytes > 0 and found[0].created > 0
    assert checkpoints.best_checkpoint(run_dir).step == 2 and checkpoints.latest_checkpoint(run_dir).step == 5

    # every checkpoint is a plain PEFT adapter folder, and its state loads without unpickling
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), found[0].path)
    assert loaded.peft_config["default"].r == 4
    state, tensors = load_checkpoint_state(found[0].path)
    assert state["step"] == 2 and tensors["rng"]["torch"].dtype == torch.uint8
    assert tensors["optimizer"]["param_groups"][0]["lr"] == optimizer.param_groups[0]["lr"]

    delete_checkpoint(found[1].path)
    assert [c.step for c in list_checkpoints(run_dir)] == [2, 5]
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        delete_checkpoint(run_dir)
    # a folder without its state file (an interrupted copy, say) is never listed
    (run_dir / "checkpoints" / "step-00000009").mkdir()
    assert [c.step for c in list_checkpoints(run_dir)] == [2, 5]


def test_resume_needs_a_checkpoint_and_a_fresh_run_refuses_a_used_folder(tiny_model_dir, facts_file, tmp_path):
    config = tiny_config(tiny_model_dir, facts_file, max_steps=1)
    with pytest.raises(TrainingError, match="Nothing to resume"):
        train(config, tmp_path / "empty", resume=True)
    train(config, tmp_path / "used")
    with pytest.raises(TrainingError, match="already holds checkpoints.*--resume"):
        train(config, tmp_path / "used")


def test_leftovers_of_interrupted_saves_are_removed_and_nothing_else(tmp_path):
    """What a crash mid-save leaves (staging folders of a checkpoint and of the final adapter) goes;
    complete checkpoints, the adapter and other hidden files stay."""
    from mactuner.fileio import unique_temp_name

    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    complete = folder / "step-00000002"
    complete.mkdir(parents=True)
    (complete / checkpoints.STATE_JSON).write_text("{}")
    (complete / checkpoints.STATE_TENSORS).write_bytes(b"x")
    (run_dir / "adapter").mkdir()
    leftovers = [
        unique_temp_name(folder / "step-00000004", prefix=".staging-"),
        unique_temp_name(run_dir / "adapter", prefix=".staging-"),
        unique_temp_name(run_dir / "adapter", prefix=".staging-old-"),
    ]
    for path in leftovers:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"half")
    others = [run_dir / ".trainer.lock", run_dir / ".process.json.1-2-abc.tmp", run_dir / ".staging-export"]
    others[0].write_text("")
    others[1].write_text("{}")
    others[2].mkdir()

    removed = checkpoints.remove_staging(run_dir)
    assert sorted(removed) == sorted(leftovers) and not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in others) and complete.is_dir() and (run_dir / "adapter").is_dir()
    assert [c.step for c in list_checkpoints(run_dir)] == [2]
