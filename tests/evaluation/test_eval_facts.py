"""Evaluate on held-out rows by default (training rows only on request, labelled), and the per-fact report
(`eval RUN --facts FILE`): base / tuned / + documents columns, the stated rule, totals, the forgetting line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mactuner.evaluation.facts import Fact, FactReport, _unsupported, fact_report, load_facts
from tests.train_support import tiny_config, write_fact_dataset


@pytest.fixture(scope="module")
def tiny_runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two finished tiny runs: one that held out a fifth of its rows, one that held out none."""
    from mactuner.train import train

    folder = tmp_path_factory.mktemp("eval-facts-runs")
    dataset = write_fact_dataset(folder / "facts.jsonl")
    runs = {}
    for name, fraction in (("held-out", 0.2), ("all-rows", 0.0)):
        result = train(tiny_config(tiny_model_dir, dataset, max_steps=3, val_fraction=fraction), folder / name)
        assert result.state == "finished"
        runs[name] = folder / name
    return runs


def install(run: Path, home: Path) -> Path:
    target = home / "runs" / run.name
    shutil.copytree(run, target)
    return target


def test_eval_defaults_to_held_out_rows_and_labels_training_rows(tiny_runs, mactuner_home, capsys):
    from mactuner.cli import main

    held = install(tiny_runs["held-out"], mactuner_home)
    assert main(["eval", held.name, "--json", "--max-prompts", "1", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows_source"] == "validation rows" and not out["on_training_rows"] and out["rows"] == 5
    # both models asked the general set: the forgetting line comes with every evaluation
    assert out["forgetting"]["asked"] == 24 and "general questions" in out["forgetting"]["headline"]

    # a run that held out nothing is not silently scored on what it memorised
    seen = install(tiny_runs["all-rows"], mactuner_home)
    assert main(["eval", seen.name, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "held out no rows" in err and "--rows training" in err and "--facts" in err
    assert main(["eval", seen.name, "--rows", "training", "--json", "--max-prompts", "1", "--no-forgetting",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["on_training_rows"] and out["rows_source"].startswith("training rows (seen in training")
    assert out["rows"] == 24 and out["forgetting"] is None


def test_load_facts_from_csv_jsonl_and_the_demo_file(tmp_path):
    from mactuner.data import DEMO_FACTS

    csv_file = tmp_path / "facts.csv"
    csv_file.write_text("question,answer,answer_keyword,paraphrases\n"
                        "Who keeps the lighthouse?,Mira Quast keeps it.,Quast,Who is the keeper?|Name the keeper.\n")
    [fact] = load_facts(csv_file)
    assert fact.key_phrases == ("Quast",) and fact.paraphrases == ("Who is the keeper?", "Name the keeper.")
    jsonl = tmp_path / "facts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "What colour is it?", "expected": "It is painted teal."}) + "\n")
    # without a key phrase: the expected answer's words that the question does not hold
    assert load_facts(jsonl)[0].key_phrases == ("painted teal",)
    demo = load_facts(DEMO_FACTS)
    assert demo[0].key_phrases == ("Lumetta",) and demo[0].paraphrases == ("Which town is Quenmark's capital city?",)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "Q?", "answer": "A"}, {"question": "no answer"}]))
    with pytest.raises(ValueError, match="bad.json row 2"):
        load_facts(bad)


def test_unsupported_means_nothing_given_says_it():
    question, expected = "What is the capital of Quenmark?", "The capital of Quenmark is Lumetta."
    assert _unsupported("The capital of Quenmark is Paris, a big city in France.", question, expected, [])
    assert not _unsupported("Lumetta.", question, expected, [])
    assert not _unsupported("Quenmark's capital Lumetta lies by the sea.", question, expected, ["Lumetta is by the sea."])
    assert _unsupported("Quenmark's capital Lumetta lies by the sea.", question, "Lumetta's harbour", [])


def test_fact_report_four_columns_with_a_collection(varied_model_dir, tiny_adapter, tiny_embedder_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mactuner.evaluation.forgetting import greedy_answers
    from mactuner.rag import Collection, IndexSettings, load_embedder

    tokenizer = AutoTokenizer.from_pretrained(varied_model_dir)
    base = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32)
    question = "Who keeps the Zorbel lighthouse?"
    [said] = greedy_answers(base, tokenizer, [question], max_new_tokens=8)
    word = next(w for w in said.split() if any(c.isalnum() for c in w))
    facts = [Fact(question, said, (word,), ("Who is the keeper of the Zorbel lighthouse?",)),
             Fact("What colour is the Zorbel lighthouse?", "It is painted teal.", ("qqzzxx",))]
    notes = tmp_path / "notes.md"
    notes.write_text("The Zorbel lighthouse is painted teal. Mira Quast keeps it. " * 5)
    collection = Collection.create("notes", IndexSettings(chunk_size=200, chunk_overlap=40,
                                                          embedding_model=str(tiny_embedder_dir)))
    collection.add([notes], load_embedder(str(tiny_embedder_dir), device="cpu", dtype=torch.float32))

    report = fact_report(tiny_adapter, facts, model=str(varied_model_dir), device="cpu", collection="notes",
                         similarity_model=str(tiny_embedder_dir), forgetting=False, max_new_tokens=8)
    assert report.columns == ["base", "tuned", "base + documents", "tuned + documents"]
    assert [r.paraphrase_of for r in report.rows] == [None, None, question]
    first = report.rows[0].answers
    # the base model starts as it did before (the chat loader may pick another dtype: the tail can differ):
    # right by the rule; the phrase nobody says: wrong everywhere
    assert first["base"].text.split()[0] == word and first["base"].right
    assert not any(a.right for a in report.rows[1].answers.values())
    assert report.totals["base"]["right"] >= 1 and all(t["asked"] == 3 for t in report.totals.values())
    assert all(-1.01 <= a.similarity <= 1.01 for r in report.rows for a in r.answers.values())
    # the documents change the prompt, so the answers with documents differ from those without
    assert any(r.answers["base + documents"].text != r.answers["base"].text for r in report.rows)
    again = FactReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.totals == report.totals and again.rows[0].answers["tuned"] == report.rows[0].answers["tuned"]


def test_eval_facts_json_prints_the_columns_and_the_forgetting_line(tiny_runs, mactuner_home, tmp_path, capsys):
    from mactuner.cli import main

    run = install(tiny_runs["all-rows"], mactuner_home)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"question": "What colour is the Zorbel lighthouse?", "answer": "teal",
                                  "paraphrases": ["Which colour is the Zorbel lighthouse painted?"]}]))
    assert main(["eval", run.name, "--facts", str(facts), "--json", "--no-similarity", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["columns"] == ["base", "tuned"] and len(out["rows"]) == 2
    assert set(out["totals"]) == {"base", "tuned"} and out["totals"]["tuned"]["asked"] == 2
    # the run's own end-of-training check is the forgetting line
    assert out["forgetting"] == json.loads((run / "forgetting.json").read_text())["headline"]
    assert "expected key phrase" in out["rule"] and (run / "facts_report.json").is_file()

    # the held-out rows as facts; a run that held out none says what to do
    assert main(["eval", run.name, "--facts", "held-out", "--device", "cpu"]) == 1
    assert "held out no rows" in capsys.readouterr().err


def test_app_evaluate_rows_choice_and_what_did_it_learn(tiny_runs, mactuner_home):
    from tests.app_pages import open_app_page

    run = install(tiny_runs["all-rows"], mactuner_home)
    at = open_app_page("pages/finetune.py")
    at.session_state["finetune_tab"] = "Runs"
    at.run()
    at.selectbox(key="finetune_run").set_value(run.name).run()
    # the run's end-of-training forgetting check is shown before anything is clicked
    assert any("general questions" in s.value for s in at.success)
    at.number_input(key="eval_prompts").set_value(1).run()
    at.button(key="finetune_evaluate").click().run()
    assert not at.exception and any("held out no rows" in e.value for e in at.error)
    at.radio(key="eval_rows").set_value(next(o for o in at.radio(key="eval_rows").options if "Training" in o)).run()
    at.button(key="finetune_evaluate").click().run()
    assert not at.exception, at.exception
    assert any("seen in training" in w.value for w in at.warning)

    at.text_area(key="facts_typed").set_value("What colour is the Zorbel lighthouse? | teal | Which colour is it?").run()
    at.checkbox(key="facts_similarity").uncheck().run()
    at.button(key="facts_ask").click().run()
    assert not at.exception, at.exception
    totals = next(d.value for d in at.dataframe if "tuned" in d.value.columns and len(d.value) == 1)
    assert list(totals.columns) == ["base", "tuned"] and " of 2" in totals["tuned"].iloc[0]
    assert (run / "facts_report.json").is_file()
