"""Preference training end to end: it learns a rule the base model does not follow (checked
independently with torch + peft), from the CLI too; resume, OOM back-off and full fine-tuning
keep working."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mactuner.train import Trainer, TrainingCallback, train
from tests.preference_support import COLOURS, preference_pairs, write_jsonl
from tests.train_support import read_metrics, tiny_config, train_losses
from tests.training.test_train import _allocate_impossibly

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def preference_accuracy(model_dir, adapter_dir, pairs, relative_to_base: bool = False) -> float:
    """Share of pairs whose chosen answer the model (base + adapter) gives the higher log-probability
    (``relative_to_base``: the higher gain in log-probability over the base model, DPO's and KTO's
    implicit reward).

    Independent of MacTuner: transformers, peft and the tokenizer's chat template only.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()

    def logp(prompt: str, answer: str) -> float:
        messages = [{"role": "user", "content": prompt}]
        before = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        prompt_ids = tokenizer(before, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(before):], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        picked = logprobs.gather(1, targets[:, None]).squeeze(1)
        return picked[len(prompt_ids) - 1 :].sum().item()

    scores = [(logp(p["prompt"], p["chosen"]), logp(p["prompt"], p["rejected"])) for p in pairs]
    if relative_to_base:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        scores = [(c - logp(p["prompt"], p["chosen"]), r - logp(p["prompt"], p["rejected"]))
                  for (c, r), p in zip(scores, pairs)]
    return sum(c > r for c, r in scores) / len(scores)


@pytest.mark.parametrize("objective", ["orpo", "kto"])
def test_orpo_and_kto_learn_a_rule_the_base_model_does_not_follow(tiny_model_dir, tmp_path, objective):
    held_out = preference_pairs(40, seed=99)
    # ORPO ranks by the model's own log-probabilities; KTO learns a reward relative to the base
    relative = objective == "kto"
    before = preference_accuracy(tiny_model_dir, None, held_out, relative)
    assert before < 0.6, before
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(96, seed=0))
    config = tiny_config(tiny_model_dir, data, objective=objective, max_steps=24, batch_size=8, learning_rate=1e-2 if objective == "orpo" else 3e-3,
                         val_fraction=0.1, eval_every=12, beta=0.5)
    run = tmp_path / "run"
    result = train(config, run)
    assert result.state == "finished"
    after = preference_accuracy(tiny_model_dir, run / "adapter", held_out, relative)
    assert after >= 0.9, (before, after)
    records = read_metrics(run)
    trains = [r for r in records if r["type"] == "train"]
    assert all("rewards/chosen" in r and "rewards/rejected" in r and "rewards/margin" in r for r in trains)
    assert trains[-1]["rewards/margin"] > trains[0]["rewards/margin"]
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and all("val_rewards/margin" in r for r in evals)


def test_cli_dpo_on_an_unseen_preference_file(tiny_model_dir, tmp_path):
    """The issue's check: a preference file in LLaMA-Factory's format, a rule (colours, " Cheers!" after them) never used
    elsewhere; exit 0, a rising preference accuracy, and the adapter ranks chosen first on held-out pairs."""
    rows = preference_pairs(120, seed=5, words=COLOURS, suffix=" Cheers!")
    data = tmp_path / "unseen.json"
    data.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": r["prompt"]}], "chosen": {"from": "gpt", "value": r["chosen"]},
         "rejected": {"from": "gpt", "value": r["rejected"]}} for r in rows
    ]))
    held_out = preference_pairs(40, seed=77, words=COLOURS, suffix=" Cheers!")
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "mactuner", "train", "--dataset", str(data), "--model", str(tiny_model_dir),
        "--objective", "dpo", "--beta", "0.1", "--device", "cpu", "--max-steps", "24", "--batch-size", "8",
        "--learning-rate", "5e-3", "--warmup-steps", "0", "--lr-scheduler", "constant", "--eval-every", "8",
        "--save-every", "0", "--val-fraction", "0.1", "--max-length", "96", "--compile", "off",
        "--target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head", "--run-dir", str(run), "--quiet",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    trains = [r for r in read_metrics(run) if r["type"] == "train"]
    accuracy = [r["rewards/accuracy"] for r in trains]
    assert sum(accuracy[-4:]) / 4 > sum(accuracy[:4]) / 4 and sum(accuracy[-4:]) / 4 >= 0.9, accuracy
    evals = [r for r in read_metrics(run) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16, 24] and evals[-1]["val_rewards/accuracy"] >= 0.9
    assert preference_accuracy(tiny_model_dir, None, held_out) < 0.6
    assert preference_accuracy(tiny_model_dir, run / "adapter", held_out) >= 0.9


class StopAt(TrainingCallback):
    def __init__(self, step):
        self.step, self.trainer = step, None

    def on_train_report(self, info):
        if info["step"] == self.step:
            self.trainer.request_stop()


def test_dpo_resumes_to_the_same_losses_and_rewards(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(48, seed=0))
    config = tiny_config(tiny_model_dir, data, objective="dpo", lora_dropout=0.1, max_steps=6, save_every=3,
                         batch_size=4, learning_rate=5e-3)
    straight = tmp_path / "straight"
    train(config, straight)
    interrupted = tmp_path / "interrupted"
    stop = StopAt(2)
    trainer = Trainer(config, interrupted, callbacks=[stop])
    stop.trainer = trainer
    assert trainer.run().state == "cancelled"
    assert train(config, interrupted, resume=True).state == "finished"
    expected, got = train_losses(straight), train_losses(interrupted)
    assert sorted(got) == list(range(1, 7))
    assert all(abs(got[s] - expected[s]) <= 1e-4 for s in got), (got, expected)
    margins = {r["step"]: r["rewards/margin"] for r in read_metrics(interrupted) if r["type"] == "train"}
    straight_margins = {r["step"]: r["rewards/margin"] for r in read_metrics(straight) if r["type"] == "train"}
    assert margins[6] == pytest.approx(straight_margins[6], abs=1e-4)


def test_dpo_out_of_memory_halves_the_pairs_and_keeps_the_math(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(32, seed=0))
    config = tiny_config(tiny_model_dir, data, objective="dpo", dtype="float32", batch_size=4, max_steps=3,
                         val_fraction=0.0, learning_rate=5e-3)
    reference = train(config)
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    # 4 pairs are 8 sequences in one forward: allow 4 sequences, i.e. 2 pairs
    _allocate_impossibly(trainer.causal_lm.base_model.layers[0], max_rows=4)
    result = trainer.run()
    assert result.state == "finished" and result.micro_batch_size == 2
    assert result.losses == pytest.approx(reference.losses, abs=1e-5)


def test_full_fine_tuning_dpo_starts_at_the_reference(tiny_model_dir, tmp_path):
    """Full fine-tuning keeps a frozen copy as the reference: the first loss is log 2 and it falls."""
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(32, seed=0))
    config = tiny_config(tiny_model_dir, data, objective="dpo", method="full", dtype="float32", batch_size=8,
                         max_steps=4, val_fraction=0.0, learning_rate=1e-3)
    result = train(config)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert result.losses[-1] < result.losses[0] - 0.01, result.losses


def test_qlora_dpo_on_a_cpu_disables_the_adapter_over_the_int8_base(tiny_model_dir, tmp_path):
    from mactuner.training.int8_base import int8_matmul_available

    if not int8_matmul_available("cpu"):
        pytest.skip("QLoRA on a CPU needs an exact int8 matmul (VNNI or AMX); this CPU has none")
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(32, seed=0))
    config = tiny_config(tiny_model_dir, data, objective="dpo", method="qlora", batch_size=8, max_steps=4,
                         val_fraction=0.0, learning_rate=5e-3)
    result = train(config)
    # the reference is the int8 base itself: the fresh adapter (B = 0) starts exactly there
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert result.losses[-1] < result.losses[0] - 0.01, result.losses
