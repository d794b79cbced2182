"""The preference settings: validation, YAML round trip, the CLI flags, the memory estimate."""

from __future__ import annotations

import argparse

import pytest

from mactuner.config import TrainConfig


def test_objective_settings_round_trip_exactly(tmp_path):
    config = TrainConfig(objective="dpo", beta=0.3, dpo_loss="ipo", kto_desirable_weight=1.5,
                         kto_undesirable_weight=0.5, report_to=["tensorboard", "mlflow"], mlflow_tracking_uri="file:///x")
    config.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == config
    assert TrainConfig().objective == "sft" and not TrainConfig().preference and TrainConfig().trackers == []
    assert config.preference and config.trackers == ["tensorboard", "mlflow"]
    assert "chosen" in TrainConfig.help()["objective"]


@pytest.mark.parametrize("changes, message", [
    ({"objective": "ppo"}, "objective must be one of sft, dpo, orpo, kto, got 'ppo'"),
    ({"dpo_loss": "hinge"}, "dpo_loss must be one of sigmoid, ipo"),
    ({"beta": 0}, "beta must be a positive number"),
    ({"kto_desirable_weight": -1.0}, "kto_desirable_weight must be a positive number"),
    ({"report_to": "wandb"}, "report_to must be one of none, tensorboard, mlflow"),
    ({"report_to": ["none", "mlflow"]}, "cannot list none with a tracker"),
])
def test_bad_preference_settings_name_the_value(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_cli_flags_set_the_objective_and_the_trackers():
    from mactuner.commands.train import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--dataset", "d.jsonl", "--objective", "kto", "--beta", "0.2",
                              "--kto-undesirable-weight", "1.33", "--report-to", "tensorboard,mlflow"])
    config = build_config(args)
    assert (config.objective, config.beta, config.kto_undesirable_weight) == ("kto", 0.2, 1.33)
    assert config.report_to == ["tensorboard", "mlflow"]
    assert build_config(parser.parse_args(["--dataset", "d", "--report-to", "mlflow"])).report_to == "mlflow"


def test_memory_estimate_counts_two_sequences_per_pair_and_the_reference(tiny_model_dir):
    from mactuner.recommend import estimate_for_config

    sft = TrainConfig(model=str(tiny_model_dir), batch_size=2, max_length=128, dtype="float32", device="cpu")
    twice = TrainConfig(**{**sft.to_dict(), "batch_size": 4})
    orpo = TrainConfig(**{**sft.to_dict(), "objective": "orpo"})
    dpo = TrainConfig(**{**sft.to_dict(), "objective": "dpo"})
    assert estimate_for_config(orpo).total == estimate_for_config(twice).total
    assert estimate_for_config(dpo).activations > estimate_for_config(orpo).activations
    assert estimate_for_config(dpo).weights == estimate_for_config(orpo).weights  # LoRA: the adapter is disabled
    full_dpo = estimate_for_config(TrainConfig(**{**dpo.to_dict(), "method": "full"}))
    full_orpo = estimate_for_config(TrainConfig(**{**orpo.to_dict(), "method": "full"}))
    # full fine-tuning: a frozen copy of the weights
    from mactuner.models import model_footprint

    assert full_dpo.weights - full_orpo.weights == model_footprint(str(tiny_model_dir)).num_parameters * 4


def test_recommended_settings_read_a_preference_file(tiny_model_dir):
    from mactuner.recommend import recommend_hyperparameters
    from tests.locations import DPO_DEMO, KTO_DEMO

    pairs = recommend_hyperparameters(str(tiny_model_dir), DPO_DEMO, "cpu", free_memory=8 * 2**30)
    single = recommend_hyperparameters(str(tiny_model_dir), KTO_DEMO, "cpu", free_memory=8 * 2**30)
    assert pairs.max_length >= 64 and single.max_length >= 64
    assert not pairs.warnings or all("row" not in w or "unusable" not in w for w in pairs.warnings)


def test_evaluating_a_preference_run_says_where_its_scores_are(tmp_path):
    from mactuner.evaluate import evaluate

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    TrainConfig(dataset=str(tmp_path / "pairs.jsonl"), objective="dpo").save(run / "config.yaml")
    with pytest.raises(ValueError, match="objective dpo.*preference accuracy.*--dataset FILE"):
        evaluate(run / "adapter", device="cpu")
