"""No silent failure and no crossed runs: a loss that is not finite stops the run as failed
with the fix, and a second trainer on a run folder stops before changing anything."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mactuner.checkpoints import list_checkpoints
from mactuner.train import NON_FINITE_STEPS, NonFiniteLoss, RunFolderBusy, Trainer, TrainingCallback, train
from tests.locations import ROOT
from tests.train_support import read_metrics, tiny_config, train_losses, write_fact_dataset


@pytest.fixture(scope="module")
def float16_overflow_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a final norm weight of 1e5: beyond float16's range (65504), as a model
    trained in bfloat16 can be; in float32 or bfloat16 it is an ordinary (badly scaled) model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(1e5)
    folder = tmp_path_factory.mktemp("overflow-llama")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mactuner", "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# --- a loss that is not finite ------------------------------------------------------


def test_float16_overflow_fails_the_run_with_the_fix_through_the_cli(float16_overflow_model, facts_file, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(float16_overflow_model, facts_file, dtype="float16", max_steps=20, target_modules=["q_proj", "v_proj"])
    done = _cli(str(config.save(tmp_path / "c.yaml")), "--run-dir", str(run_dir), "--quiet")

    assert done.returncode == 1, done.stdout + done.stderr
    assert "not a finite number" in done.stderr and "dtype: bfloat16" in done.stderr and "dtype: float32" in done.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == NON_FINITE_STEPS
    assert "dtype: bfloat16" in status["message"] and "float16" in status["message"]
    steps = [r for r in read_metrics(run_dir) if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, NON_FINITE_STEPS + 1))
    assert all(r["skipped"] and math.isnan(r["loss"]) for r in steps)
    assert not (run_dir / "adapter").exists()

    # the same model in float32 is not the problem: it trains, every loss finite
    result = train(tiny_config(float16_overflow_model, facts_file, dtype="float32", max_steps=3, target_modules=["q_proj", "v_proj"]))
    assert result.state == "finished" and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]


def _inject_nan(trainer: Trainer, steps: set[int]) -> None:
    """Make the loss NaN at the given (1-based) steps, as an overflow would."""
    original = trainer._loss_sum

    def loss_sum(batch):
        loss = original(batch)
        return loss * float("nan") if trainer.step + 1 in steps else loss

    trainer._loss_sum = loss_sum


class WeightsPerStep(TrainingCallback):
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.after: dict[int, list[torch.Tensor]] = {0: [p.detach().clone() for p in trainer.trainable]}

    def on_train_report(self, info):
        self.after[info["step"]] = [p.detach().clone() for p in self.trainer.trainable]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_step_with_a_nan_loss_is_skipped_and_a_finite_one_resets_the_count(tiny_model_dir, facts_file, dtype):
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, dtype=dtype, max_steps=6, val_fraction=0.0))
    trainer.setup()
    _inject_nan(trainer, {2, 3, 5})
    weights = WeightsPerStep(trainer)
    trainer.callbacks.append(weights)
    result = trainer.run()

    # two in a row, then a finite step: the run goes on to the end
    assert result.state == "finished" and result.step == 6
    assert [math.isnan(x) for x in result.losses] == [False, True, True, False, True, False]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    for step in range(1, 7):
        assert same(weights.after[step], weights.after[step - 1]) == (step in {2, 3, 5}), step
    assert all(p.isfinite().all() for p in trainer.trainable)


def test_nan_losses_in_a_row_stop_the_run_as_failed(tiny_model_dir, facts_file, tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, dtype="float32", max_steps=10, save_every=1), run_dir)
    trainer.setup()
    _inject_nan(trainer, set(range(3, 11)))
    with pytest.raises(NonFiniteLoss, match="steps 3–5.*float32.*Lower the learning rate"):
        trainer.run()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 5 and "not a finite number" in status["message"]
    assert any("not a finite number" in r["message"] for r in read_metrics(run_dir) if r["type"] == "info")
    # the good steps' checkpoints remain; none is written for the step that failed the run
    assert [c.step for c in list_checkpoints(run_dir)][-1] == 4
    assert not (run_dir / "adapter").exists()


# --- one trainer per run folder ----------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_second_trainer_thread_on_a_busy_folder_changes_nothing(tiny_model_dir, facts_file, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_model_dir, facts_file, max_steps=2, save_every=1)
    first = Trainer(config, run_dir)
    first.setup()  # holds the folder from here on
    # a save in progress, as the first trainer would have one: the second must not clear it
    staging = run_dir / "checkpoints" / ".staging-step-00000009.in-progress.tmp"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"half written")
    before = _snapshot(run_dir)

    errors: list[BaseException] = []

    def second() -> None:
        try:
            train(config, run_dir)
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            errors.append(error)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(timeout=120)
    assert len(errors) == 1 and isinstance(errors[0], RunFolderBusy), errors
    assert "Another trainer is already working" in str(errors[0]) and "without changing anything" in str(errors[0])
    assert _snapshot(run_dir) == before and staging.exists()

    result = first.run()
    assert result.state == "finished" and [c.step for c in list_checkpoints(run_dir)] == [1, 2]
    # released at the end: the folder can be resumed by the next trainer
    assert train(config.__class__(**{**config.to_dict(), "max_steps": 3}), run_dir, resume=True).step == 3


def test_a_second_trainer_process_exits_non_zero_and_the_first_carries_on(tiny_model_dir, facts_file, tmp_path):
    run_dir = tmp_path / "run"
    config_file = tiny_config(tiny_model_dir, facts_file, max_steps=100000, log_every=1).save(tmp_path / "c.yaml")
    first = subprocess.Popen(
        [sys.executable, "-m", "mactuner", "train", str(config_file), "--run-dir", str(run_dir), "--quiet"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not ((run_dir / "metrics.jsonl").exists() and train_losses(run_dir)):
            assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() is not None else "timeout"
            time.sleep(0.5)
        config_stamp = (run_dir / "config.yaml").stat().st_mtime_ns

        # --resume: without the lock it would fail differently ("nothing to resume") or clear the first's saves
        second = _cli("--run-dir", str(run_dir), "--resume", "--quiet", timeout=180)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "Another trainer is already working" in second.stderr
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "running" and status["pid"] == first.pid
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config_stamp
        assert first.poll() is None
    finally:
        first.terminate()
        output, _ = first.communicate(timeout=120)
    assert first.returncode == 0, output
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "cancelled" and status["pid"] == first.pid


# --- a resume checks what it resumes ------------------------------------------------


def test_resume_on_a_replaced_dataset_is_refused_before_anything_changes(tiny_model_dir, facts_file, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_model_dir, facts_file, max_steps=4, save_every=2)
    assert train(config, run_dir=run_dir).state == "finished"
    saved = [c.step for c in list_checkpoints(run_dir)]
    # the person replaces the file between Cancel and Resume (fewer rows, same name)
    write_fact_dataset(facts_file)
    facts_file.write_text("\n".join(facts_file.read_text().splitlines()[:6]) + "\n")
    with pytest.raises(Exception, match="dataset") as caught:
        Trainer(config, run_dir=run_dir, resume=True).run()
    assert "new run" in str(caught.value)
    assert [c.step for c in list_checkpoints(run_dir)] == saved  # nothing touched
    # the same data resumes fine
    write_fact_dataset(facts_file)
    more = tiny_config(tiny_model_dir, facts_file, max_steps=4, save_every=2)
    assert Trainer(more, run_dir=run_dir, resume=True).run().state == "finished"
