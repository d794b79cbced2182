"""DPO, ORPO and KTO against the reference implementation (TRL 1.16's trainers) on the same tiny
model and the same batch, and learning a preference the base model does not have."""

from __future__ import annotations

import pytest
import torch

from mactuner.data.preference import PreferenceRow
from mactuner.train import Trainer
from mactuner.training.objectives import pair_units
from tests.preference_support import preference_pairs, require, write_jsonl
from tests.train_support import tiny_config

trl = require("trl")  # the reference implementation, a test extra
datasets = require("datasets")

TOLERANCE = 1e-4


def _conversational(rows):
    return [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in rows
    ]


def _randomize_adapter(model) -> None:
    """Random LoRA B matrices (of the trained adapter only), so that policy != reference.

    Called after TRL's trainer is built: given a PEFT model, TRL's DPO and KTO trainers copy its
    adapter as the reference ("ref"), which is the base model only while B is still zero.
    """
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name and ".default." in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.fixture
def lora_trainer(varied_model_dir, tmp_path):
    """Our trainer set up on the varied tiny Llama (LoRA on q and v)."""

    def make(objective, **changes):
        data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(8, 1))
        config = tiny_config(varied_model_dir, data, objective=objective, val_fraction=0.0, batch_size=4,
                             target_modules=["q_proj", "v_proj"], max_length=96,
                             # float32: TRL's ORPOTrainer takes log-softmax in the model's dtype
                             dtype="float32", **changes)
        trainer = Trainer(config)
        trainer.setup()
        return trainer

    return make


def _ours(trainer, units):
    objective = trainer.objective
    objective.begin_step(units)
    loss_sum = objective.loss_sum(units)
    objective.end_step()
    return loss_sum.item() / len(units), objective.pop_stats()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_matches_trl(lora_trainer, tmp_path, loss_type):
    from trl import DPOConfig, DPOTrainer

    trainer = lora_trainer("dpo", dpo_loss=loss_type, beta=0.2)
    reference = DPOTrainer(
        model=trainer.model,
        args=DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.2, loss_type=[loss_type],
                       report_to="none", use_cpu=True, bf16=False, max_length=96),
        train_dataset=datasets.Dataset.from_list(_conversational(preference_pairs(8, 1))),
        processing_class=trainer.tokenizer,
    )
    _randomize_adapter(trainer.model)
    rows = [reference.train_dataset[i] for i in range(4)]
    # the same token ids as TRL's own tokenization of the same conversations
    from mactuner.data.preference import PreferenceExample, tokenize_preferences

    mine = tokenize_preferences(
        [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows], trainer.tokenizer, 96
    )
    assert [(m.prompt_ids, m.chosen_ids, m.rejected_ids) for m in mine] == [
        (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows
    ]
    trl_loss = reference.compute_loss(reference.model, reference.data_collator(rows)).item()
    metrics = {k: v[-1] for k, v in reference._metrics["train"].items()}
    loss, stats = _ours(trainer, pair_units(mine))
    assert abs(metrics["rewards/margins"]) > 1e-2  # policy and reference differ: the comparison means something
    assert loss == pytest.approx(trl_loss, abs=TOLERANCE)
    assert stats["rewards/chosen"] == pytest.approx(metrics["rewards/chosen"], abs=TOLERANCE)
    assert stats["rewards/rejected"] == pytest.approx(metrics["rewards/rejected"], abs=TOLERANCE)
    assert stats["rewards/margin"] == pytest.approx(metrics["rewards/margins"], abs=TOLERANCE)
    assert stats["rewards/accuracy"] == pytest.approx(metrics["rewards/accuracies"], abs=TOLERANCE)


def test_orpo_matches_trl(lora_trainer, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    # TRL's ORPOTrainer takes the NLL over the prompt too: ours does with assistant_only_loss off
    trainer = lora_trainer("orpo", beta=0.25, assistant_only_loss=False)
    reference = ORPOTrainer(
        model=trainer.model,
        args=ORPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.25, report_to="none",
                        use_cpu=True, bf16=False, max_length=96),
        train_dataset=datasets.Dataset.from_list(_conversational(preference_pairs(8, 1))),
        processing_class=trainer.tokenizer,
    )
    _randomize_adapter(trainer.model)
    rows = [reference.train_dataset[i] for i in range(4)]
    trl_loss, metrics = reference.get_batch_loss_metrics(reference.model, reference.data_collator(rows))
    units = []
    for r in rows:
        prompt = r["prompt_input_ids"]
        assert r["chosen_input_ids"][: len(prompt)] == prompt and r["rejected_input_ids"][: len(prompt)] == prompt
        units.append(PreferenceRow(prompt, r["chosen_input_ids"][len(prompt):], r["rejected_input_ids"][len(prompt):]))
    loss, stats = _ours(trainer, pair_units(units))
    assert loss == pytest.approx(trl_loss.item(), abs=TOLERANCE)
    assert stats["rewards/chosen"] == pytest.approx(metrics["rewards/chosen"], abs=TOLERANCE)
    assert stats["rewards/rejected"] == pytest.approx(metrics["rewards/rejected"], abs=TOLERANCE)
    assert stats["rewards/margin"] == pytest.approx(metrics["rewards/margins"], abs=TOLERANCE)
    assert stats["rewards/accuracy"] == pytest.approx(metrics["rewards/accuracies"], abs=TOLERANCE)
    assert stats["log_odds_ratio"] == pytest.approx(metrics["log_odds_ratio"], abs=TOLERANCE)


def test_kto_matches_trl(lora_trainer, tmp_path):
    from trl import KTOConfig, KTOTrainer

    trainer = lora_trainer("kto", beta=0.3, kto_desirable_weight=1.5, kto_undesirable_weight=0.7)
    pairs = _conversational(preference_pairs(8, 1))
    # mixed labels within the batch that is compared
    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(pairs)]
    reference = KTOTrainer(
        model=trainer.model,
        args=KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.3, desirable_weight=1.5,
                       undesirable_weight=0.7, report_to="none", use_cpu=True, bf16=False, max_length=96),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=trainer.tokenizer,
    )
    _randomize_adapter(trainer.model)
    batch_rows = [reference.train_dataset[i] for i in range(4)]
    # TRL pairs each prompt with the previous row's answer for its KL estimate, as ours does
    assert [r["KL_completion_ids"] for r in batch_rows] == [batch_rows[i - 1]["completion_ids"] for i in range(4)]
    trl_loss = reference.compute_loss(reference.model, reference.data_collator(batch_rows)).item()
    metrics = {k: v[-1] for k, v in reference._metrics["train"].items()}
    units = pair_units([PreferenceRow(r["prompt_ids"], completion_ids=r["completion_ids"], label=r["label"]) for r in batch_rows])
    loss, stats = _ours(trainer, units)
    assert loss == pytest.approx(trl_loss, abs=TOLERANCE)
    assert stats["kl"] == pytest.approx(metrics["kl"], abs=TOLERANCE)
    assert stats["rewards/chosen"] == pytest.approx(metrics["rewards/chosen"], abs=TOLERANCE)
    assert stats["rewards/rejected"] == pytest.approx(metrics["rewards/rejected"], abs=TOLERANCE)
    assert stats["rewards/margin"] == pytest.approx(metrics["rewards/margins"], abs=TOLERANCE)
