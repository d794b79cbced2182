"""Trackers: a run also logged to TensorBoard and/or MLflow (``report_to``), with the packages themselves.

- **TensorBoard**: event files in ``RUN/tensorboard/`` (``torch.utils.tensorboard``, which needs the
  ``tensorboard`` package): the config as text, every number of each ``train`` and ``eval`` record as a
  scalar (``train/loss``, ``train/rewards/chosen``, ``eval/val_loss`` …), and where the final adapter is.
  ``tensorboard --logdir MACTUNER_HOME/runs`` shows every run side by side.
- **MLflow**: an MLflow run in the experiment ``MacTuner`` of the tracking store ``mlflow_tracking_uri``,
  by default a local one in ``MACTUNER_HOME/mlruns/`` (SQLite, ``mlflow.db``, and artifacts beside it):
  the config as parameters (and ``config.yaml`` as an artifact), the metrics by step, the final adapter
  as the artifact folder ``adapter``, and the run's end state. A resumed run continues its MLflow run
  (its id is kept in ``RUN/mlflow_run.json``).

Both are optional extras (``pip install mactuner[trackers]``); asking for one that is not installed
stops the run before it starts, with the command that installs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mactuner import paths
from mactuner.fileio import write_json_atomic
from mactuner.training.callbacks import TrainingCallback

EXPERIMENT = "MacTuner"
TENSORBOARD_DIR = "tensorboard"  # in the run folder
MLFLOW_RUN_FILE = "mlflow_run.json"  # in the run folder: the MLflow run a resume continues
INSTALL = "pip install 'mactuner[trackers]' (or: pip install tensorboard mlflow)"


class TrackerMissing(RuntimeError):
    """A tracker was asked for whose package is not installed; the message says how to install it."""


def mlflow_home() -> Path:
    """The local MLflow store's folder: ``MACTUNER_HOME/mlruns``."""
    return paths.home() / "mlruns"


def default_mlflow_uri() -> str:
    """The local store's tracking URI (SQLite in ``mlflow_home()``)."""
    return f"sqlite:///{mlflow_home() / 'mlflow.db'}"


def open_commands(mlflow_uri: str | None = None) -> dict[str, str]:
    """The command that opens each tracker's view of MacTuner's runs."""
    uri = mlflow_uri or default_mlflow_uri()
    return {
        "tensorboard": f"tensorboard --logdir {paths.home() / 'runs'}",
        "mlflow": f"mlflow ui --backend-store-uri {uri}" if uri.startswith(("sqlite:", "file:", "/")) else f"open {uri}",
    }


def tracker_callbacks(config: Any, run_dir: str | os.PathLike, resume: bool = False) -> list[TrainingCallback]:
    """The callbacks that log a run to ``config.trackers``.

    Raises:
        TrackerMissing: a tracker's package is not installed.
    """
    callbacks: list[TrainingCallback] = []
    for tracker in config.trackers:
        if tracker == "tensorboard":
            callbacks.append(TensorBoardLogger(config, run_dir))
        elif tracker == "mlflow":
            callbacks.append(MlflowLogger(config, run_dir, resume))
    return callbacks


def _numbers(record: dict[str, Any], skip=("step", "total_steps", "time", "type")) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger(TrainingCallback):
    """Event files in ``RUN/tensorboard``: the config, the scalars of every report, the adapter's place."""

    def __init__(self, config: Any, run_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise TrackerMissing(f"report_to lists tensorboard, which is not installed: {INSTALL}") from error
        import yaml

        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "```", 0)
        self.writer.flush()

    def on_train_report(self, info: dict[str, Any]) -> None:
        for key, value in _numbers(info).items():
            self.writer.add_scalar(f"train/{key}", value, info["step"])
        self.writer.flush()

    def on_eval_report(self, info: dict[str, Any]) -> None:
        for key, value in _numbers(info).items():
            self.writer.add_scalar(f"eval/{key}", value, info["step"])
        self.writer.flush()

    def on_train_end(self, info: dict[str, Any]) -> None:
        adapter = self.run_dir / "adapter"
        if info.get("state") == "finished" and adapter.is_dir():
            self.writer.add_text("adapter", f"The final adapter (a PEFT folder): `{adapter}`", info.get("step", 0))
        self.writer.add_text("end", f"{info.get('state')}: {info.get('message', '')}", info.get("step", 0))
        self.writer.close()


class MlflowLogger(TrainingCallback):
    """An MLflow run: parameters, metrics by step, the final adapter as an artifact, the end state."""

    def __init__(self, config: Any, run_dir: str | os.PathLike, resume: bool = False):
        try:
            from mlflow import MlflowClient
        except ImportError as error:
            raise TrackerMissing(f"report_to lists mlflow, which is not installed: {INSTALL}") from error
        self.run_dir = Path(run_dir)
        uri = config.mlflow_tracking_uri or default_mlflow_uri()
        if config.mlflow_tracking_uri is None:
            mlflow_home().mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        if resume:
            try:
                self.run_id = json.loads((self.run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            except (OSError, ValueError, KeyError):
                self.run_id = None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                location = (mlflow_home() / "artifacts").as_uri() if config.mlflow_tracking_uri is None else None
                experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=location)
            run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                         tags={"mactuner.run_dir": str(self.run_dir)})
            self.run_id = run.info.run_id
            write_json_atomic(self.run_dir / MLFLOW_RUN_FILE, {"run_id": self.run_id, "tracking_uri": uri})
            for key, value in config.to_dict().items():
                self.client.log_param(self.run_id, key, str(value)[:6000])
            if (self.run_dir / "config.yaml").exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))

    def _log(self, prefix: str, info: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        timestamp = int(info.get("time", 0) * 1000)
        metrics = [Metric(f"{prefix}{k}", v, timestamp, int(info["step"])) for k, v in _numbers(info).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_train_report(self, info: dict[str, Any]) -> None:
        self._log("", info)

    def on_eval_report(self, info: dict[str, Any]) -> None:
        self._log("", info)

    def on_train_end(self, info: dict[str, Any]) -> None:
        adapter = self.run_dir / "adapter"
        if info.get("state") == "finished" and adapter.is_dir():
            self.client.log_artifacts(self.run_id, str(adapter), "adapter")
        status = {"finished": "FINISHED", "cancelled": "KILLED"}.get(info.get("state"), "FAILED")
        self.client.set_terminated(self.run_id, status)
