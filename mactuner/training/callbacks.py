"""Progress out of the trainer: callbacks (mlx-lm style), the run folder's files, stdout lines.

The trainer calls every callback with plain dicts; :class:`RunFolderWriter` is
the callback that keeps ``RUN/metrics.jsonl`` and ``RUN/status.json`` (see
docs/architecture.md), :class:`PrintProgress` the one that prints a line per report.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from mactuner.fileio import write_json_atomic


class TrainingCallback:
    """Receives progress. Override what you need; every method gets a plain dict.

    ``on_train_report`` gets the ``train`` record of metrics.jsonl (step, total_steps,
    epoch, loss, lr, grad_norm, tokens_per_second, tokens, memory_bytes, memory_kind,
    time), ``on_eval_report`` the ``eval`` record (step, val_loss, time), ``on_info`` an
    ``info`` record (message, time; ``stage`` while the run starts up: ``loading``,
    ``tokenising``, ``warming_up``), ``on_checkpoint`` the saved checkpoint (step,
    path, loss, val_loss), ``on_train_end`` how it ended (state, step, message).
    """

    def on_train_begin(self, info: dict[str, Any]) -> None: ...

    def on_train_report(self, info: dict[str, Any]) -> None: ...

    def on_eval_report(self, info: dict[str, Any]) -> None: ...

    def on_info(self, info: dict[str, Any]) -> None: ...

    def on_checkpoint(self, info: dict[str, Any]) -> None: ...

    def on_train_end(self, info: dict[str, Any]) -> None: ...


class RunFolderWriter(TrainingCallback):
    """Writes ``metrics.jsonl`` (one JSON record per line) and ``status.json`` of a run folder.

    ``status.json`` is replaced atomically on every change; its ``message`` follows
    the start-up stages (an ``info`` record with a ``stage``), then the steps.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.status: dict[str, Any] = {
            "state": "running",
            "pid": os.getpid(),
            "step": 0,
            "total_steps": None,
            "started_at": now,
            "updated_at": now,
            "message": "Starting…",
        }
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1, encoding="utf-8")

    def write_status(self, **changes: Any) -> None:
        """Update the status and replace ``status.json`` atomically."""
        self.status.update(changes, updated_at=time.time())
        write_json_atomic(self.run_dir / "status.json", self.status)

    def _append(self, record: dict[str, Any]) -> None:
        if self._metrics.closed:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def on_train_begin(self, info):
        self.write_status(step=info["step"], total_steps=info["total_steps"], message=info["message"])

    def on_train_report(self, info):
        self._append(info)
        self.write_status(step=info["step"], total_steps=info["total_steps"], message=f"Step {info['step']}/{info['total_steps']}")

    def on_eval_report(self, info):
        self._append(info)

    def on_info(self, info):
        self._append(info)
        if info.get("stage"):
            self.write_status(message=info["message"])

    def on_train_end(self, info):
        if info["state"] == "failed":
            # the metrics tell why too (the status message is replaced by later runs' stages)
            self._append({"type": "info", "message": info["message"], "time": time.time()})
        self.write_status(state=info["state"], step=info["step"], message=info["message"])
        self.close()

    def close(self) -> None:
        """Close metrics.jsonl (later records are dropped)."""
        self._metrics.close()


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


class PrintProgress(TrainingCallback):
    """One line per report on stdout (it lands in RUN/log.txt for background runs)."""

    def on_train_report(self, info):
        print(
            f"step {info['step']}/{info['total_steps']}  loss {_number(info['loss'], '.4f')}  lr {info['lr']:.2e}  "
            f"grad_norm {_number(info['grad_norm'], '.3f')}  {info['tokens_per_second']:.0f} tok/s  "
            f"peak mem {info['memory_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )

    def on_eval_report(self, info):
        print(f"step {info['step']}  val_loss {_number(info['val_loss'], '.4f')}", flush=True)

    def on_info(self, info):
        print(info["message"], flush=True)

    def on_checkpoint(self, info):
        print(f"checkpoint {info['path']}", flush=True)

    def on_train_end(self, info):
        if info["state"] != "failed":  # a failure is reported by whoever catches it (the CLI prints it)
            print(info["message"], flush=True)
