"""Measured preflight (mactuner.training.preflight, `train --preflight --json`): real steps on the longest rows
in a child process; its peak matches the run's recorded peak; advice when it does not fit."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mactuner.training.preflight import preflight, suggest_fit
from tests.train_support import read_metrics, tiny_config


def run_peak(config, folder) -> int:
    """The recorded peak of a real run of ``config``: its own process, as the fine-tune page starts one (the
    test process's memory would be counted otherwise)."""
    import subprocess
    import sys

    from tests.locations import ROOT

    path = folder / "run-config.yaml"
    config.save(path)
    run = folder / "run"
    subprocess.run([sys.executable, "-m", "mactuner", "train", str(path), "--run-dir", str(run), "--quiet"], cwd=ROOT,
                   check=True, capture_output=True)
    return max(r["memory_bytes"] for r in read_metrics(run) if r["type"] == "train")


def test_preflight_peak_matches_the_runs_recorded_peak(tiny_model_dir, facts_file, tmp_path):
    config = tiny_config(tiny_model_dir, facts_file, max_steps=None, epochs=2.0, batch_size=8, val_fraction=0.0)
    result = preflight(config)
    assert result.steps_measured == 3 and result.rows_per_step == 8 and result.memory_kind
    assert result.seconds_per_step > 0 and result.tokens_per_second > 0
    # the run's own length: 24 rows, 3 steps an epoch, 2 epochs; its tokens from the real row lengths (the ETA is
    # rounded to 0.1 s, which a fast machine's sub-second ETA shows)
    assert result.total_steps == 6 and result.eta_seconds == pytest.approx(result.total_tokens / result.tokens_per_second, rel=0.01, abs=0.05)
    assert result.fits is True and result.suggestion == {}
    assert result.measured == ("peak_bytes", "seconds_per_step", "tokens_per_second")

    recorded = run_peak(dataclasses.replace(config, forgetting_check=False), tmp_path)
    assert abs(result.peak_bytes - recorded) <= 0.15 * recorded, (result.peak_bytes, recorded)


def test_replay_rows_count_in_the_preflights_length_without_being_made(tiny_model_dir, facts_file, mactuner_home):
    """The replay rows lengthen each epoch (24 + 8 rows: 4 steps, not 3); answering them with the base model
    would cost more than the 3 steps, so the preflight counts them and leaves them to the run."""
    config = tiny_config(tiny_model_dir, facts_file, max_steps=None, epochs=2.0, batch_size=8, val_fraction=0.0,
                         replay_rows=8)
    result = preflight(config)
    assert result.total_steps == 8 and result.steps_measured == 3
    assert not (mactuner_home / "forgetting").exists() or not any((mactuner_home / "forgetting").iterdir())


def test_when_it_does_not_fit_the_largest_batch_that_does(tiny_model_dir, facts_file):
    from mactuner.recommend import estimate_for_config

    config = tiny_config(tiny_model_dir, facts_file, batch_size=16, max_length=1024)
    full = estimate_for_config(config, None, "cpu").total
    half = estimate_for_config(dataclasses.replace(config, batch_size=8), None, "cpu").total
    step = (full - half) / 8  # the estimate grows by this per row of the micro-batch
    # free memory for the estimate of batch 12.5: batch 8 fits, batch 16 does not
    free = int((half + 4.5 * step) / 0.9)
    advice = suggest_fit(config, full, free, "cpu")
    assert advice["batch_size"] == 8 and advice["grad_accum"] == 2 and "micro-batch 8" in advice["reason"]
    # measured 8 rows' worth above the estimate: the same free memory now holds batch 4
    assert suggest_fit(config, int(full + 8 * step), free, "cpu")["batch_size"] == 4
    assert "smaller model" in suggest_fit(config, full, 1, "cpu")["reason"]


def test_train_preflight_json_prints_the_figures_and_writes_no_run(tiny_model_dir, facts_file, tmp_path, mactuner_home,
                                                                    capsys):
    from mactuner.cli import main

    path = tmp_path / "config.yaml"
    tiny_config(tiny_model_dir, facts_file).save(path)
    assert main(["train", str(path), "--preflight", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_bytes"] > 0 and out["free_bytes"] > 0 and out["seconds_per_step"] > 0 and out["eta_seconds"] > 0
    assert out["total_steps"] == 8 and out["fits"] is True
    assert not (mactuner_home / "runs").exists() or not any((mactuner_home / "runs").iterdir())


def test_preflight_of_an_unusable_dataset_says_why(tiny_model_dir, tmp_path, capsys):
    from mactuner.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"messages": []}\n')
    path = tmp_path / "config.yaml"
    tiny_config(tiny_model_dir, empty).save(path)
    assert main(["train", str(path), "--preflight"]) == 1
    assert "preflight could not run" in capsys.readouterr().err


def test_app_check_fit_shows_measured_figures_beside_the_estimate(tiny_model_dir):
    from tests.app_pages import open_app_page

    at = open_app_page("pages/finetune.py")
    at.radio(key="finetune_model_kind").set_value("Local folder or .gguf file").run()
    at.text_input(key="finetune_model_path").set_value(str(tiny_model_dir)).run()
    next(n for n in at.number_input if n.label == "Max length").set_value(128).run()
    assert any("Check fit measures it" in c.value for c in at.caption)
    at.button(key="finetune_check_fit").click().run()
    assert not at.exception, at.exception
    labels = {m.label: m.value for m in at.metric}
    assert labels["Peak memory (measured)"].endswith("GB") and "Seconds per step (measured)" in labels
    assert any(s.value.startswith("Measured: peak") and "the estimate said" in s.value for s in at.success)
