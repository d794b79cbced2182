"""Evaluation: a tiny model trained a few steps on a fact set has a lower loss than its base on the run's
validation rows (`eval --json`), answers both ways side by side, saved as RUN/eval.json; scoring rules;
comparing runs; the Evaluate button and the Compare view on the fine-tune page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mactuner import evaluate
from mactuner.evaluate import exact_match, keyword_hit, reference_keywords
from tests.train_support import tiny_config, write_fact_dataset


@pytest.fixture(scope="module")
def fact_runs(tiny_model_dir, tmp_path_factory) -> list[Path]:
    """Two finished runs of the tiny model on the fact set (different learning rates), trained once."""
    from mactuner.train import train

    folder = tmp_path_factory.mktemp("eval-runs")
    dataset = write_fact_dataset(folder / "facts.jsonl")
    made = []
    for name, rate in (("facts-fast", 1e-2), ("facts-slow", 3e-3)):
        result = train(tiny_config(tiny_model_dir, dataset, max_steps=10, learning_rate=rate), folder / name)
        assert result.state == "finished"
        made.append(folder / name)
    return made


def install(run: Path, home: Path) -> Path:
    """A copy of a trained run under this test's MACTUNER_HOME."""
    target = home / "runs" / run.name
    shutil.copytree(run, target)
    return target


def test_scoring_rules():
    question = "What is the capital of Quenmark?"
    reference = "The capital of Quenmark is Lumetta."
    assert reference_keywords(reference, question) == ["lumetta"]
    assert keyword_hit("It is Lumetta, of course.", reference, question)
    assert not keyword_hit("The capital of Quenmark is Paris.", reference, question)
    assert exact_match("the capital of quenmark is  LUMETTA", reference)
    assert not exact_match("Lumetta", reference)


def test_eval_command_shows_the_tuned_loss_below_the_base_loss(fact_runs, mactuner_home, capsys):
    from mactuner.cli import main

    run = install(fact_runs[0], mactuner_home)
    assert main(["eval", "--adapter", str(run / "adapter"), "--json", "--max-prompts", "2", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows_source"] == "validation rows" and out["rows"] == 5  # 20 % of the 24 rows, as the trainer split
    assert out["tuned_loss"] < out["base_loss"] * 0.8, (out["base_loss"], out["tuned_loss"])
    assert out["tuned_perplexity"] < out["base_perplexity"]
    assert len(out["answers"]) == 2 and all(a["reference"] and a["prompt"] for a in out["answers"])
    assert out["short_references"] and out["tuned_keyword_hit"] is not None
    saved = json.loads((run / "eval.json").read_text())
    assert out["saved"] == str(run / "eval.json") and saved["tuned_loss"] == out["tuned_loss"]
    assert evaluate.load_eval(run).tuned_loss == out["tuned_loss"]


def test_eval_on_a_given_file_outside_a_run(tiny_adapter, varied_model_dir, tmp_path, capsys):
    from mactuner.cli import main

    dataset = write_fact_dataset(tmp_path / "facts.jsonl")
    code = main(["eval", "--adapter", str(tiny_adapter), "--model", str(varied_model_dir), "--dataset", str(dataset),
                 "--json", "--max-prompts", "0", "--max-rows", "6", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["rows_source"] == "file" and out["rows"] == 6 and out["saved"] is None
    assert out["base_loss"] != out["tuned_loss"]  # the adapter changes the model


def test_eval_without_a_run_or_dataset_says_what_to_pass(tiny_adapter, capsys):
    from mactuner.cli import main

    assert main(["eval", "--adapter", str(tiny_adapter), "--device", "cpu"]) == 1
    assert "--dataset" in capsys.readouterr().err


def test_compare_runs_rows_and_curves(fact_runs, mactuner_home):
    ids = [install(r, mactuner_home).name for r in fact_runs]
    rows = evaluate.compare_runs(ids)
    assert [r["run"] for r in rows] == ids
    assert [r["learning_rate"] for r in rows] == [1e-2, 3e-3]
    assert all(r["final loss"] is not None and r["eval tuned loss"] is None for r in rows)
    figure = evaluate.loss_curves_figure(ids)
    assert {t.name for t in figure.data} >= {f"{i} train" for i in ids}


def frame(at, column: str):
    """The first dataframe on the page that has ``column`` (AppTest finds dataframes by position only)."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_app_evaluate_button_and_compare_view(fact_runs, mactuner_home):
    from tests.app_pages import open_app_page

    ids = [install(r, mactuner_home).name for r in fact_runs]
    at = open_app_page("pages/finetune.py")
    at.session_state["finetune_tab"] = "Runs"  # as a click on the Runs tab does
    at.run()
    at.selectbox(key="finetune_run").set_value(ids[0]).run()
    at.number_input(key="eval_prompts").set_value(1).run()
    at.button(key="finetune_evaluate").click().run()
    assert not at.exception, at.exception
    summary = frame(at, "perplexity")
    assert summary["model"].tolist() == ["base", "tuned"]
    assert summary["loss"].iloc[1] < summary["loss"].iloc[0]
    # one prompt, its base and tuned answers side by side as wrapping text (ui.eval_ui.answers_ui)
    assert [c.value.split(" ·")[0] for c in at.caption if c.value.split(" ·")[0] in ("base", "tuned")] == ["base", "tuned"]
    assert (mactuner_home / "runs" / ids[0] / "eval.json").is_file()

    at.multiselect(key="finetune_compare").set_value(ids).run()
    assert not at.exception, at.exception
    table = frame(at, ids[1])
    assert list(table.columns) == ids and "learning rate" in table.index  # keys in words, no snake_case
    assert table.loc["eval tuned loss", ids[0]] != "—" and table.loc["eval tuned loss", ids[1]] == "—"
    assert at.get("plotly_chart")
