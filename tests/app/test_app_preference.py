"""The fine-tune page with preference data: the objective selector, the pair summary with its
chosen/rejected histograms, the objective's settings, the trackers' commands, and a DPO run's
reward charts in the live view."""

from __future__ import annotations

from mactuner import data, paths
from mactuner.config import TrainConfig
from mactuner.train import train
from tests.app.test_app_finetune import by_label, estimate_gb, open_tab, select_run
from tests.app_pages import open_app_page
from tests.locations import DPO_DEMO
from tests.preference_support import preference_pairs, write_jsonl
from tests.train_support import tiny_config


def _choose_upload(at, path):
    saved = data.save_upload(path.name, path.read_bytes())
    at.run()
    at.selectbox(key="finetune_dataset").set_value(f"Uploaded: {saved.name}").run()
    assert not at.exception, at.exception
    return at


def test_a_preference_file_gets_dpo_its_pair_summary_and_its_settings():
    at = open_app_page("pages/finetune.py")
    assert by_label(at.radio, "Objective").value == "sft"  # the demo's question/answer rows
    sft_estimate = estimate_gb(at)
    _choose_upload(at, DPO_DEMO)
    objective = by_label(at.radio, "Objective")
    assert objective.value == "dpo" and objective.options == ["SFT", "DPO", "ORPO", "KTO"]
    assert any("chosen and a rejected answer" in c.value for c in at.caption)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Pairs"] == "30 / 30" and metrics["Format"] == "sharegpt_preference"
    [figure] = [c for c in at.get("plotly_chart") if "chosen" in c.proto.spec]
    assert '"rejected"' in figure.proto.spec
    assert by_label(at.number_input, "Beta").value == 0.1 and by_label(at.selectbox, "DPO loss").value == "sigmoid"
    # two sequences per pair and the reference pass: more memory than SFT on the same settings
    assert estimate_gb(at) > sft_estimate
    objective.set_value("kto").run()
    assert not at.exception, at.exception
    assert by_label(at.number_input, "Good answers' weight").value == 1.0
    assert {m.label: m.value for m in at.metric}["Good / bad answers"] == "30 / 30"


def test_trackers_show_the_command_that_opens_them():
    at = open_app_page("pages/finetune.py")
    at.multiselect(key="finetune_trackers").set_value(["tensorboard", "mlflow"]).run()
    assert not at.exception, at.exception
    captions = " ".join(c.value for c in at.caption)
    assert f"tensorboard --logdir {paths.home() / 'runs'}" in captions
    assert f"mlflow ui --backend-store-uri sqlite:///{paths.home() / 'mlruns' / 'mlflow.db'}" in captions


def test_a_dpo_runs_live_view_charts_its_rewards_and_accuracy(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(24, seed=0))
    config: TrainConfig = tiny_config(tiny_model_dir, pairs, objective="dpo", max_steps=3, eval_every=3)
    run_dir = paths.runs_dir() / "dpo-run"
    train(config, run_dir)
    at = open_tab(open_app_page("pages/finetune.py"), "Runs")
    select_run(at, "dpo-run")
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any('"Rewards"' in s and '"margin"' in s for s in specs)
    assert any('"Preference accuracy"' in s for s in specs)
