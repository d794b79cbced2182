"""The MLX engine (mactuner.training.mlx_engine) on mlx[cpu]: it trains, writes the same run folder
as the torch trainer, resumes exactly, stops on Cancel and on non-finite losses, and its adapter is a
PEFT adapter that torch+peft loads to the same logits and loss."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mactuner.checkpoints import list_checkpoints
from mactuner.train import NON_FINITE_STEPS, NonFiniteLoss, TrainingCallback
from tests.locations import ROOT
from tests.mlx_support import build_small_vocab_model, require_mlx
from tests.train_support import read_metrics, tiny_config, train_losses, write_fact_dataset

pytestmark = pytest.mark.mlx

# a plain ChatML template (SmolLM2's, without its default system prompt)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _mlx():
    require_mlx()


@pytest.fixture(scope="session")
def mlx_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 64, 2 layers, 477-token byte-level vocabulary, float32 safetensors)."""
    return build_small_vocab_model(tmp_path_factory.mktemp("mlx-llama"), CHATML)


@pytest.fixture
def facts(tmp_path) -> Path:
    return write_fact_dataset(tmp_path / "facts.jsonl")


def mlx_config(model_dir: Path, dataset: Path, **changes):
    # the end-of-run forgetting check asks 24 questions twice: mlx[cpu] is slow, one test below runs it
    values = dict(engine="mlx", max_length=128, target_modules=TARGETS, max_steps=6, val_fraction=0.25,
                  forgetting_check=False)
    values.update(changes)
    return tiny_config(model_dir, dataset, **values)


def _trainer(config, run_dir=None, **kwargs):
    from mactuner.training.mlx_engine import MLXTrainer

    return MLXTrainer(config, run_dir, **kwargs)


# --- training and the run folder ---------------------------------------------------------------------


def test_mlx_training_lowers_the_loss_and_writes_the_torch_run_contract(mlx_model_dir, facts, tmp_path):
    run_dir = tmp_path / "run"
    trainer = _trainer(mlx_config(mlx_model_dir, facts, max_steps=10, eval_every=5, save_every=5, keep_last=1), run_dir)
    trainer.setup()
    before = trainer.evaluate()
    result = trainer.run()

    assert result.state == "finished" and result.step == 10
    assert result.val_loss < before - 0.3, (before, result.val_loss)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == status["total_steps"] == 10
    records = read_metrics(run_dir)
    steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 11))
    for r in steps:
        assert math.isfinite(r["loss"]) and r["lr"] == pytest.approx(1e-2) and r["tokens_per_second"] > 0
        assert r["memory_bytes"] > 0 and r["memory_kind"] == "mlx_peak" and r["engine"] == "mlx"
    assert [r["step"] for r in records if r["type"] == "eval"] == [5, 10]
    assert any(r.get("stage") == "loading" for r in records if r["type"] == "info")
    # checkpoints: PEFT folders with the optimizer state; the best by validation loss is kept
    kept = list_checkpoints(run_dir)
    assert [c.step for c in kept] == [10] or [c.step for c in kept] == [5, 10]
    state = torch.load(kept[-1].path / "training_state.pt", weights_only=True)
    assert state["engine"] == "mlx" and any(k.endswith(".m") for k in state["optimizer"])
    assert any(k.endswith(".v") for k in state["optimizer"]) and int(state["optimizer"]["step"]) == 10
    for folder in (kept[-1].path, run_dir / "adapter"):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert (folder / "mlx" / "adapters.safetensors").is_file() and (folder / "mlx" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_replay_rows_are_the_mlx_base_models_own_answers(facts, tmp_path, mactuner_home):
    """The recommendation's replay rows (issue 22) on the MLX engine too: the base model's greedy answers made with
    MLX (the torch engine's answers, token for token), cached, trained beside the rows (they lengthen the epoch).
    The model's weights are drawn wide, so that it answers something other than newlines."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mactuner.evaluation.forgetting import greedy_answers
    from mactuner.evaluation.replay import REPLAY_MAX_NEW_TOKENS, replay_questions

    model_dir = build_small_vocab_model(tmp_path / "varied", CHATML, initializer_range=0.5, seed=1)
    plain = _trainer(mlx_config(model_dir, facts, max_steps=None, epochs=1.0, batch_size=2))
    plain.setup()
    trainer = _trainer(mlx_config(model_dir, facts, max_steps=None, epochs=1.0, batch_size=2, replay_rows=2))
    trainer.setup()
    assert len(trainer.train_units) == len(plain.train_units) + 2
    assert trainer.total_steps == plain.total_steps + 1
    [cached] = list((mactuner_home / "forgetting").iterdir())
    record = json.loads(cached.read_text())
    assert record["key"]["engine"] == "mlx" and record["key"]["replay"] == replay_questions(2)
    torch_answers = greedy_answers(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                                   replay_questions(2), max_new_tokens=REPLAY_MAX_NEW_TOKENS)
    assert record["answers"] == torch_answers and all(torch_answers)


def test_an_mlx_run_ends_with_the_forgetting_check_of_its_base(facts, tmp_path, mactuner_home):
    """As the torch engine: the run's last message says what it kept, ``forgetting.json`` is written, and the base
    answers come from the trained model with its adapter switched off: the torch base model's answers, token for
    token (the wide-weight model of the replay test, so that they are not empty)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mactuner.evaluation.forgetting import MAX_NEW_TOKENS, greedy_answers, load_forgetting, load_general_set

    model_dir = build_small_vocab_model(tmp_path / "varied", CHATML, initializer_range=0.5, seed=1)
    run_dir = tmp_path / "run"
    result = _trainer(mlx_config(model_dir, facts, max_steps=2, forgetting_check=True), run_dir).run()
    kept = load_forgetting(run_dir)
    assert result.state == "finished" and kept is not None and kept.asked == len(load_general_set())
    assert kept.headline() in json.loads((run_dir / "status.json").read_text())["message"]
    [cached] = list((mactuner_home / "forgetting").iterdir())
    record = json.loads(cached.read_text())
    assert record["key"]["engine"] == "mlx"
    torch_base = greedy_answers(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                                [q.question for q in load_general_set()], max_new_tokens=MAX_NEW_TOKENS)
    assert record["answers"] == torch_base


def test_the_mlx_engine_trains_on_the_torch_engines_token_ids(mlx_model_dir, tmp_path):
    """Same reader, chat template, max length and assistant-only rule: identical units (CSV, both loss modes)."""
    import csv

    from mactuner.training.trainer import Trainer
    from tests.train_support import FACTS

    path = tmp_path / "facts.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "output"])
        writer.writerows(FACTS * 2)
    for assistant_only in (True, False):
        config = mlx_config(mlx_model_dir, path, max_length=24, assistant_only_loss=assistant_only)
        mlx_trainer = _trainer(config)
        mlx_trainer.setup()
        torch_trainer = Trainer(config)
        torch_trainer.setup()
        assert mlx_trainer.train_units == torch_trainer.train_units
        assert mlx_trainer.val_units == torch_trainer.val_units
        assert any(len(u.input_ids) == 24 for u in mlx_trainer.train_units)  # truncated the same way
        trained = sum(u.trained_tokens for u in mlx_trainer.train_units)
        total = sum(len(u.input_ids) - 1 for u in mlx_trainer.train_units)
        assert (trained < total) == assistant_only


# --- one adapter format ---------------------------------------------------------------------------------


def test_the_adapter_is_plain_peft_with_mlxs_logits_and_training_loss(mlx_model_dir, facts, tmp_path):
    import mlx.core as mx
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    trainer = _trainer(mlx_config(mlx_model_dir, facts, max_steps=6, lora_alpha=24.0), run_dir)
    result = trainer.run()
    assert result.state == "finished"

    base = AutoModelForCausalLM.from_pretrained(mlx_model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    assert tuned.peft_config["default"].lora_alpha / tuned.peft_config["default"].r == 3.0
    ids = trainer.train_units[0].input_ids
    with torch.no_grad():
        torch_logits = tuned(torch.tensor([ids])).logits[0].numpy()
    trainer.model.eval()
    mlx_logits = np.array(trainer.model(mx.array([ids]))[0])
    assert np.abs(torch_logits - mlx_logits).max() <= 1e-3
    # the adapter moved the logits (it is not zero)
    with torch.no_grad(), tuned.disable_adapter():
        base_logits = tuned(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(base_logits - mlx_logits).max() > 1e-2

    # plain torch+peft reproduces MLX's loss on the training rows
    units = trainer.train_units[:4]
    mlx_loss = trainer.loss_on(units)
    total, count = 0.0, 0
    with torch.no_grad():
        for u in units:
            logits = tuned(torch.tensor([u.input_ids])).logits[0, :-1]
            labels = torch.tensor(u.labels[1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert total / count == pytest.approx(mlx_loss, abs=1e-4)


# --- resume, cancel, non-finite ---------------------------------------------------------------------------


class StopAt(TrainingCallback):
    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_train_report(self, info):
        if info["step"] == self.step:
            self.trainer.request_stop()


def test_a_cancelled_mlx_run_resumes_to_the_uninterrupted_losses(mlx_model_dir, facts, tmp_path):
    # dropout on: the resumed steps must draw the same masks
    config = mlx_config(mlx_model_dir, facts, max_steps=7, lora_dropout=0.1, grad_accum=2, batch_size=2, eval_every=0)
    straight = _trainer(config, tmp_path / "straight").run()

    run_dir = tmp_path / "stopped"
    trainer = _trainer(config, run_dir)
    trainer.callbacks.append(StopAt(trainer, 3))
    stopped = trainer.run()
    assert stopped.state == "cancelled" and stopped.step == 3
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "cancelled" and "resume" in status["message"]
    assert [c.step for c in list_checkpoints(run_dir)] == [3] and not (run_dir / "adapter").exists()

    resumed = _trainer(config, run_dir, resume=True).run()
    assert resumed.state == "finished" and resumed.step == 7
    losses = train_losses(run_dir)
    assert [losses[s] for s in range(1, 8)] == pytest.approx(straight.losses, abs=1e-4)
    assert resumed.val_loss == pytest.approx(straight.val_loss, abs=1e-4)


@pytest.fixture(scope="module")
def float16_overflow_model(mlx_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a final norm weight of 1e5: beyond float16's range."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("overflow")
    shutil.copytree(mlx_model_dir, folder, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(mlx_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(1e5)
    model.save_pretrained(folder)
    return folder


def test_non_finite_mlx_losses_stop_the_run_with_the_fix(float16_overflow_model, facts, tmp_path):
    run_dir = tmp_path / "run"
    trainer = _trainer(mlx_config(float16_overflow_model, facts, dtype="float16", max_steps=10, save_every=1), run_dir)
    trainer.setup()
    before = {k: np.array(v) for k, v in trainer.lora_weights().items()}
    with pytest.raises(NonFiniteLoss, match="float16.*dtype: bfloat16"):
        trainer.run()
    # the skipped steps changed no weight (the update is dropped inside the compiled step)
    after = trainer.lora_weights()
    assert all(np.array_equal(before[k], np.array(after[k])) for k in before)
    assert int(trainer.optimizer.state["step"]) == 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == NON_FINITE_STEPS and "not a finite number" in status["message"]
    steps = [r for r in read_metrics(run_dir) if r["type"] == "train"]
    assert all(r["skipped"] and not math.isfinite(r["loss"]) for r in steps)
    # (as with torch) the skipped steps before the last are checkpointed; the step that failed the run is not
    assert NON_FINITE_STEPS not in [c.step for c in list_checkpoints(run_dir)] and not (run_dir / "adapter").exists()


def test_unsupported_settings_stop_before_training_with_the_fix(mlx_model_dir, facts, tmp_path):
    from mactuner.train import TrainingError

    with pytest.raises(TrainingError, match="packing: false"):
        _trainer(mlx_config(mlx_model_dir, facts, packing=True), tmp_path / "a").run()
    with pytest.raises(TrainingError, match="engine: torch"):
        _trainer(mlx_config(mlx_model_dir, facts, method="full"), tmp_path / "b").run()
    assert json.loads((tmp_path / "b" / "status.json").read_text())["state"] == "failed"


def test_out_of_memory_is_recognised_and_told_with_advice(mlx_model_dir, facts):
    from mactuner.train import OutOfMemory
    from mactuner.training.mlx_engine import is_mlx_out_of_memory

    metal = RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")
    assert is_mlx_out_of_memory(metal) and is_mlx_out_of_memory(MemoryError())
    assert not is_mlx_out_of_memory(RuntimeError("shapes do not match"))
    trainer = _trainer(mlx_config(mlx_model_dir, facts, batch_size=2, max_steps=2))
    trainer.setup()
    original, sizes = trainer._micro_step, []

    def failing(inputs, *rest):
        sizes.append(inputs.shape[0])
        raise metal  # what Metal raises when the step does not fit

    trainer._micro_step = trainer._whole_step = failing
    with pytest.raises(OutOfMemory, match="gradient_checkpointing.*QLoRA"):
        trainer.run()
    assert sizes == [2, 1] and original is not None


# --- QLoRA: LoRA on a 4-bit MLX base ----------------------------------------------------------------------


def test_qlora_trains_an_adapter_on_a_4_bit_base(mlx_model_dir, facts, tmp_path):
    import mlx.nn as nn

    trainer = _trainer(mlx_config(mlx_model_dir, facts, method="qlora", max_steps=8, target_modules=["q_proj", "v_proj", "up_proj"]), tmp_path / "run")
    trainer.setup()
    quantized = [m for _, m in trainer.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) >= 2 * 7 and all(m.bits == 4 for m in quantized)
    # the memory estimate knows the 4-bit base: its weight bytes are the quantized model's
    from mlx.utils import tree_flatten

    from mactuner.recommend import estimate_for_config

    base_bytes = sum(v.nbytes for k, v in tree_flatten(trainer.model.parameters()) if ".lora_" not in k)
    as_float32 = dict(dtype="float32", target_modules=["q_proj", "v_proj", "up_proj"])
    estimate = estimate_for_config(mlx_config(mlx_model_dir, facts, method="qlora", **as_float32), device="cpu")
    lora_estimate = estimate_for_config(mlx_config(mlx_model_dir, facts, method="lora", **as_float32), device="cpu")
    assert estimate.weights == pytest.approx(base_bytes, rel=0.1)
    assert lora_estimate.weights > 4 * estimate.weights
    before = trainer.evaluate()
    result = trainer.run()
    assert result.state == "finished" and result.val_loss < before - 0.2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


# --- through the CLI ------------------------------------------------------------------------------------------


def test_cli_engine_mlx_trains_on_a_facts_csv(mlx_model_dir, tmp_path):
    from tests.train_support import FACTS

    path = tmp_path / "facts.csv"
    path.write_text("prompt,completion\n" + "".join(f'"{q}","{a}"\n' for q, a in FACTS * 4))
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "mactuner", "train", "--model", str(mlx_model_dir), "--dataset", str(path), "--engine", "mlx",
         "--device", "cpu", "--max-steps", "8", "--learning-rate", "1e-2", "--warmup-steps", "0", "--lr-scheduler", "constant",
         "--target-modules", "q_proj,v_proj,o_proj,up_proj,down_proj", "--max-length", "96", "--val-fraction", "0.2",
         "--run-dir", str(run_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Engine: MLX, as asked" in done.stdout and "Adapter:" in done.stdout
    losses = train_losses(run_dir)
    assert len(losses) == 8 and sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and "validation loss" in status["message"]
    from mactuner.config import TrainConfig

    assert TrainConfig.load(run_dir / "config.yaml").engine == "mlx"


def test_merge_and_evaluate_work_on_an_mlx_run_unchanged(mlx_model_dir, facts, tmp_path):
    import mlx.core as mx
    from transformers import AutoModelForCausalLM

    from mactuner.evaluate import evaluate
    from mactuner.export import merge_adapter

    run_dir = tmp_path / "run"
    trainer = _trainer(mlx_config(mlx_model_dir, facts, max_steps=6), run_dir)
    result = trainer.run()
    merged = merge_adapter(run_dir / "adapter", tmp_path / "merged")
    ids = trainer.val_units[0].input_ids
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    trainer.model.eval()
    assert np.abs(merged_logits - np.array(trainer.model(mx.array([ids]))[0])).max() <= 1e-3

    report = evaluate(run_dir / "adapter", device="cpu", max_prompts=0)
    assert report.rows_source == "validation rows" and report.rows == len(trainer.val_units)
    assert report.tuned_loss < report.base_loss
    assert report.tuned_loss == pytest.approx(result.val_loss, rel=0.02)  # torch (the device's dtype) vs MLX float32
