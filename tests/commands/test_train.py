"""``python -m mactuner train`` / ``recommend`` without writing YAML by hand: ``train --dataset
--recommended``, ``recommend --write``, skipped rows reported alike by both, and clean ``--help``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mactuner.cli import COMMANDS, main
from mactuner.config import TrainConfig
from mactuner.data import DEMO_FACTS, load_dataset_file, train_validation_split
from mactuner.recommend import recommend_hyperparameters

NESTED = {"rag": ["index", "ask", "search", "list", "remove"]}  # commands with sub-commands of their own


def write_facts(path: Path, count: int = 4, broken_line: int | None = None) -> Path:
    """A JSONL file of ``count`` Quenmark facts (alpaca rows); optionally one broken line at ``broken_line``."""
    facts = json.loads(DEMO_FACTS.read_text())[:count]
    lines = [json.dumps({"instruction": f["question"], "output": f["answer"]}) for f in facts]
    if broken_line is not None:
        lines.insert(broken_line - 1, '{"instruction": "cut off')
    path.write_text("\n".join(lines) + "\n")
    return path


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0, argv
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_help_is_clean(command, capsys):
    """argparse formats help with %: an unescaped "30% slower" printed its internal dict."""
    argvs = [[command, "--help"]] + [[command, sub, "--help"] for sub in NESTED.get(command, [])]
    for argv in argvs:
        text = help_text(capsys, argv)
        assert "usage:" in text and "{'" not in text, (argv, text)
    if command == "train":
        assert "about 30% slower" in text and "--recommended" in text


def skipped_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("Skipped a row:", "… and"))]


def test_recommend_reports_skipped_rows_as_train_does(tiny_model_dir, tmp_path, capsys):
    dataset = write_facts(tmp_path / "facts.jsonl", broken_line=2)
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(["recommend", "--dataset", str(dataset), *model]) == 0
    recommended = capsys.readouterr().out
    assert main(["train", "--dataset", str(dataset), *model, "--max-steps", "1", "--run-dir", str(tmp_path / "run")]) == 0
    trained = capsys.readouterr().out
    assert skipped_lines(recommended) == skipped_lines(trained) == [
        f"Skipped a row: facts.jsonl line 2: {load_dataset_file(dataset).problems[0].message}"
    ]
    assert "4 of 5 rows usable (1 skipped" in recommended


def test_recommend_write_saves_a_config_that_train_runs(tiny_model_dir, tmp_path, capsys):
    dataset = write_facts(tmp_path / "facts.jsonl")
    config_path = tmp_path / "config.yaml"
    argv = ["recommend", "--dataset", str(dataset), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main([*argv, "--write", str(config_path)]) == 0
    assert "python -m mactuner train" in capsys.readouterr().out
    config = TrainConfig.load(config_path)
    recommended = recommend_hyperparameters(str(tiny_model_dir), dataset, "cpu").train_config_values()
    assert {k: getattr(config, k) for k in recommended} == recommended
    assert (config.model, Path(config.dataset), config.device) == (str(tiny_model_dir), dataset.resolve(), "cpu")
    # train accepts it as it is (a short run: --max-steps still overrides)
    run = tmp_path / "run"
    assert main(["train", str(config_path), "--max-steps", "2", "--run-dir", str(run), "--quiet"]) == 0
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert TrainConfig.load(run / "config.yaml") == TrainConfig.from_dict({**config.to_dict(), "max_steps": 2})
    # --write names its dataset
    assert main(["recommend", "--model", str(tiny_model_dir), "--write", str(tmp_path / "x.yaml")]) == 2


def train_recommended(tiny_model_dir, dataset: Path, run: Path, *extra: str) -> TrainConfig:
    argv = ["train", "--dataset", str(dataset), "--model", str(tiny_model_dir), "--device", "cpu", "--recommended",
            "--run-dir", str(run), "--quiet", *extra]
    assert main(argv) == 0
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert (run / "adapter" / "adapter_config.json").is_file()
    return TrainConfig.load(run / "config.yaml")


def test_train_recommended_needs_no_yaml_and_overrides_still_apply(tiny_model_dir, tmp_path):
    dataset = write_facts(tmp_path / "facts.jsonl")
    config = train_recommended(tiny_model_dir, dataset, tmp_path / "run", "--max-steps", "3", "--lora-rank", "4")
    recommended = recommend_hyperparameters(str(tiny_model_dir), dataset, "cpu").train_config_values()
    expected = {**recommended, "max_steps": 3, "lora_rank": 4}
    assert {k: getattr(config, k) for k in expected} == expected
    assert json.loads((tmp_path / "run" / "status.json").read_text())["step"] == 3
    # a config file and --recommended together are refused, saying why
    assert main(["train", str(tmp_path / "run" / "config.yaml"), "--recommended"]) == 2


def test_recommended_run_on_four_facts_trains_on_every_row(tiny_model_dir, tmp_path):
    """A 4-fact file with the recommended settings: no fact may be held out for validation
    (the issue: 3 of 4 learned). Needs the recommender's small-dataset rule."""
    dataset = write_facts(tmp_path / "facts.jsonl", count=4)
    config = train_recommended(tiny_model_dir, dataset, tmp_path / "run")
    load = load_dataset_file(config.dataset, config.dataset_format)
    trained, _validation = train_validation_split(load.examples, config.val_fraction, config.seed)
    assert len(trained) == len(load.examples) == 4


@pytest.mark.slow
def test_four_facts_with_the_recommended_settings_are_all_learned(smollm2_path, tmp_path):
    """The issue's check: a 4-row fact file, `train --recommended` on the real model, and the
    tuned model states all four facts (the base model states none of them)."""
    from mactuner.chat import GenerationSettings, chat, load_chat_model
    from mactuner.models import release_model

    dataset = write_facts(tmp_path / "facts.jsonl", count=4)
    facts = json.loads(DEMO_FACTS.read_text())[:4]
    run = tmp_path / "run"
    argv = ["train", "--dataset", str(dataset), "--device", "cpu", "--recommended", "--run-dir", str(run), "--quiet"]
    assert main(argv) == 0
    settings = GenerationSettings(temperature=0, max_new_tokens=24)

    def keywords_stated(adapter) -> list[bool]:
        loaded = load_chat_model(adapter=adapter, device="cpu")
        replies = [chat(loaded, [{"role": "user", "content": f["question"]}], settings)[0] for f in facts]
        release_model(loaded)
        return [f["answer_keyword"].lower() in reply.lower() for f, reply in zip(facts, replies)]

    assert keywords_stated(None) == [False] * 4
    assert keywords_stated(run / "adapter") == [True] * 4
