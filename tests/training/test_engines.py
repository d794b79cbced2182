"""Which engine trains (mactuner.training.engines): MLX on an Apple-silicon Mac with mlx installed,
torch elsewhere, with the reason; the config key and the CLI option."""

from __future__ import annotations

import pytest

from mactuner.config import TrainConfig
from mactuner.training.engines import choose_engine, is_apple_silicon, make_trainer


def test_auto_picks_mlx_on_an_apple_silicon_mac_with_mlx(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert is_apple_silicon()
    choice = choose_engine("auto", "lora", mlx_available=True)
    assert choice.engine == "mlx" and "Apple-silicon Mac" in choice.reason and "4-bit" in choice.reason
    assert choose_engine("auto", "qlora", mlx_available=True).engine == "mlx"
    # full fine-tuning is torch's; a Mac without mlx says how to get it
    full = choose_engine("auto", "full", mlx_available=True)
    assert full.engine == "torch" and "full fine-tuning" in full.reason
    missing = choose_engine("auto", "lora", mlx_available=False)
    assert missing.engine == "torch" and "pip install" in missing.reason and "mlx" in missing.reason


@pytest.mark.parametrize("system, machine", [("Linux", "x86_64"), ("Linux", "aarch64"), ("Darwin", "x86_64"), ("Windows", "AMD64")])
def test_auto_picks_torch_anywhere_else_even_with_mlx_installed(monkeypatch, system, machine):
    import platform

    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    choice = choose_engine("auto", "lora", mlx_available=True)
    assert choice.engine == "torch" and "not an Apple-silicon Mac" in choice.reason


def test_an_explicit_engine_is_kept_and_make_trainer_follows_it(tmp_path):
    from mactuner.training.trainer import Trainer

    assert choose_engine("torch", system="Darwin", machine="arm64", mlx_available=True).engine == "torch"
    assert choose_engine("mlx", system="Linux", machine="x86_64").engine == "mlx"
    assert type(make_trainer(TrainConfig(dataset="d.jsonl", engine="torch"))) is Trainer
    mlx = make_trainer(TrainConfig(dataset="d.jsonl", engine="mlx"))
    assert type(mlx).__name__ == "MLXTrainer" and "as asked" in mlx.reason


def test_engine_is_a_checked_config_key_that_round_trips(tmp_path):
    assert TrainConfig().engine == "auto"
    with pytest.raises(ValueError, match="engine must be one of auto, torch, mlx, got 'metal'"):
        TrainConfig(engine="metal")
    config = TrainConfig(dataset="d.jsonl", engine="mlx")
    assert TrainConfig.load(config.save(tmp_path / "c.yaml")) == config
    assert "MLX" in TrainConfig.help()["engine"]


def test_the_cli_takes_engine(tmp_path):
    import argparse

    from mactuner.commands import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--dataset", "d.jsonl", "--engine", "mlx"])
    assert train.build_config(args).engine == "mlx"
