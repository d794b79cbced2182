"""TrainConfig: defaults, validation naming the bad value, exact round trips, the example config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mactuner.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

NON_DEFAULT = dict(
    model="some/model",
    dataset="data/train.jsonl",
    dataset_format="sharegpt",
    val_fraction=0.25,
    max_length=1024,
    assistant_only_loss=False,
    replay_rows=16,
    packing=True,
    method="full",
    lora_rank=32,
    lora_alpha=64.0,
    lora_dropout=0.1,
    target_modules="all-linear",
    batch_size=2,
    grad_accum=8,
    learning_rate=1.5e-5,
    epochs=2.5,
    max_steps=123,
    warmup_ratio=0.1,
    warmup_steps=7,
    lr_scheduler="linear",
    weight_decay=0.01,
    max_grad_norm=None,
    gradient_checkpointing=True,
    compile="off",
    engine="mlx",
    eval_every=0,
    save_every=25,
    keep_last=0,
    log_every=5,
    forgetting_check=False,
    device="cuda",
    gpus=2,
    dtype="bfloat16",
    seed=7,
    trust_remote_code=True,
    objective="dpo",
    beta=0.25,
    dpo_loss="ipo",
    kto_desirable_weight=1.33,
    kto_undesirable_weight=0.75,
    report_to=["tensorboard", "mlflow"],
    mlflow_tracking_uri="http://localhost:5000",
)


def test_defaults_are_valid_and_name_the_built_in_model():
    from mactuner.models import DEFAULT_MODEL

    config = TrainConfig()
    assert config.model == DEFAULT_MODEL
    assert config.method == "lora" and config.dtype == "auto" and config.trust_remote_code is False


def test_every_field_is_documented():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert set(TrainConfig.help()) == {f.name for f in dataclasses.fields(TrainConfig)}
    # a recommendation's reasons replace the help of the settings it chose; the rest keep theirs
    why = TrainConfig.help({"batch_size": "4 rows fit in the free memory.", "unknown": "ignored", "epochs": ""})
    assert why["batch_size"] == "4 rows fit in the free memory."
    assert why["epochs"] == TrainConfig.help()["epochs"] and "unknown" not in why


def test_non_default_values_cover_every_field():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in NON_DEFAULT.items():
        assert getattr(TrainConfig(), name) != value, name


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["defaults", "every-field-changed"])
def test_dict_and_yaml_round_trips_are_exact(values, tmp_path):
    config = TrainConfig(**values)
    assert TrainConfig.from_dict(config.to_dict()) == config
    path = config.save(tmp_path / "config.yaml")
    loaded = TrainConfig.load(path)
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()
    # types survive too (1.5e-05 stays a float, 2.0 alpha stays 2.0)
    for name, value in config.to_dict().items():
        assert type(getattr(loaded, name)) is type(value), name


def test_to_dict_is_a_copy():
    config = TrainConfig()
    config.to_dict()["target_modules"].append("gate_proj")
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_yaml_as_people_write_it(tmp_path):
    # YAML 1.1 reads "2e-4" (no dot) as a string; the config accepts it as the number it is
    path = tmp_path / "c.yaml"
    path.write_text("dataset: d.json\nlearning_rate: 2e-4\nmax_steps: 10\n")
    config = TrainConfig.load(path)
    assert config.learning_rate == pytest.approx(2e-4) and config.max_steps == 10
    assert config.batch_size == TrainConfig().batch_size  # unset keys keep defaults


@pytest.mark.parametrize(
    "name, value",
    [
        ("method", "dora"),
        ("lora_rank", 0),
        ("lora_rank", 8.5),
        ("lora_alpha", -1),
        ("lora_dropout", 1.0),
        ("batch_size", 0),
        ("grad_accum", -2),
        ("max_length", True),
        ("learning_rate", 0),
        ("learning_rate", "fast"),
        ("epochs", 0),
        ("max_steps", 0),
        ("warmup_steps", -1),
        ("warmup_ratio", 1.5),
        ("lr_scheduler", "exponential"),
        ("val_fraction", 1.0),
        ("keep_last", -1),
        ("dtype", "float8"),
        ("device", "tpu"),
        ("target_modules", []),
        ("target_modules", "all"),
        ("max_grad_norm", 0),
        ("packing", "yes"),
        ("model", ""),
    ],
)
def test_bad_values_are_refused_naming_field_and_value(name, value):
    with pytest.raises(ValueError) as error:
        TrainConfig(**{name: value})
    message = str(error.value)
    assert name in message and repr(value) in message


def test_unknown_keys_are_refused_with_the_known_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: d.json\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat.*known settings:.*learning_rate"):
        TrainConfig.load(path)


def test_example_config_sets_every_key_with_a_comment():
    text = (ROOT / "configs" / "example.yaml").read_text()
    values = yaml.safe_load(text)
    assert set(values) == {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig.from_dict(values)
    # the example's values are the defaults, apart from naming a dataset
    assert dataclasses.replace(config, dataset="") == TrainConfig()
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            assert "#" in line, f"example.yaml key without its trade-off: {line}"


def test_concurrent_saves_never_fail_or_leave_half_a_file(tmp_path):
    """Tabs are threads of one process: many saves of one path at once each land whole."""
    import threading

    target = tmp_path / "run" / "config.yaml"
    configs = [TrainConfig(dataset=f"data/{i}.jsonl", lora_rank=i + 1) for i in range(8)]
    errors: list[BaseException] = []

    def save(config: TrainConfig) -> None:
        try:
            for _ in range(20):
                config.save(target)
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            errors.append(error)

    threads = [threading.Thread(target=save, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert TrainConfig.load(target) in configs
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind
