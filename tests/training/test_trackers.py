"""Trackers: a run's config, loss curve, rewards and final adapter read back through TensorBoard's and
MLflow's own readers."""

from __future__ import annotations

import pytest

from mactuner.train import train
from tests.preference_support import preference_pairs, require, write_jsonl
from tests.train_support import read_metrics, tiny_config


@pytest.fixture
def tracked_run(tiny_model_dir, tmp_path):
    def run(report_to):
        data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(24, seed=0))
        config = tiny_config(tiny_model_dir, data, objective="dpo", max_steps=3, eval_every=3, report_to=report_to,
                             learning_rate=5e-3)
        run_dir = tmp_path / "run"
        assert train(config, run_dir).state == "finished"
        return run_dir, {r["step"]: r for r in read_metrics(run_dir) if r["type"] == "train"}

    return run


def test_tensorboard_event_files_hold_the_loss_curve_and_rewards(tracked_run):
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics = tracked_run("tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert loss == pytest.approx({s: r["loss"] for s, r in metrics.items()}, abs=1e-6)
    assert [e.step for e in events.Scalars("train/rewards/accuracy")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/val_loss")] == [3]
    assert {"config/text_summary", "adapter/text_summary"} <= set(tags["tensors"])


def test_mlflow_store_holds_the_run_its_curve_and_the_adapter(tracked_run, mactuner_home):
    require("mlflow")
    from mlflow import MlflowClient

    from mactuner.training.trackers import EXPERIMENT, default_mlflow_uri

    run_dir, metrics = tracked_run("mlflow")
    client = MlflowClient(default_mlflow_uri())
    assert default_mlflow_uri().endswith(str(mactuner_home / "mlruns" / "mlflow.db"))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["objective"] == "dpo" and run.data.params["beta"] == "0.1"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx({s: r["loss"] for s, r in metrics.items()}, abs=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "rewards/margin")] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts and "adapter/adapter_config.json" in artifacts


def test_a_missing_tracker_package_stops_the_run_with_the_fix(tiny_model_dir, facts_file, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    from mactuner.train import TrainingError

    with pytest.raises(TrainingError, match=r"mlflow, which is not installed.*pip install"):
        train(tiny_config(tiny_model_dir, facts_file, report_to="mlflow", max_steps=1), tmp_path / "run")
