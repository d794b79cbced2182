"""Measured preflight: will this run fit, and how long will it take? Measured, not estimated.

:func:`preflight` runs a few real optimizer steps (:data:`PREFLIGHT_STEPS`) of the run's own
settings on the **longest** rows of its dataset, in a child process (``python -m
mactuner.training.preflight CONFIG.yaml``: its memory is the run's alone, and a crash or an
out-of-memory cannot take the caller down), and reports:

- the peak memory of those steps (the same reading a run records: on the CPU and MPS the
  process's resident memory, on CUDA the device memory) against what is free now;
- seconds per step, from the steps after the first (the first pays warm-up), and the ETA of the
  whole run: the run's tokens (from the real length distribution of its rows, times epochs or
  steps) divided by the measured tokens per second;
- when it does not fit: the largest micro-batch that would (through gradient accumulation the
  effective batch stays), or gradient checkpointing, or a shorter max length, scaled from the
  measurement with the static estimate's shape (:func:`mactuner.recommend.estimate_for_config`).

The static estimate stays the instant first guess; the result says which figure was measured.
Nothing is written anywhere: the child trains without a run folder and with no forgetting check.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PREFLIGHT_STEPS = 3
# a suggestion plans with this share of the free memory (other programs grow too)
FIT_MARGIN = 0.9


@dataclass
class PreflightResult:
    """What a few real steps measured, and what follows for the whole run.

    Attributes:
        peak_bytes: measured peak memory of the steps (``memory_kind`` says which reading).
        free_bytes: memory free on the device now (``None`` where unknown).
        estimate_bytes: the static estimate for the same settings, for comparison.
        seconds_per_step: measured, steps after the first.
        tokens_per_second: measured over those steps.
        total_steps, total_tokens: the whole run's, from its rows' lengths.
        eta_seconds: total_tokens / tokens_per_second (the whole run's training time).
        fits: peak_bytes <= free_bytes (``None`` where free memory is unknown).
        suggestion: settings that would fit (``{}`` when it fits), with ``reason``.
        steps_measured, rows_per_step, longest_tokens: what was run.
        seconds: the preflight's own wall time, child start included.
    """

    peak_bytes: int
    memory_kind: str | None
    free_bytes: int | None
    estimate_bytes: int
    seconds_per_step: float
    tokens_per_second: float
    total_steps: int
    total_tokens: int
    eta_seconds: float
    fits: bool | None
    suggestion: dict[str, Any]
    steps_measured: int
    rows_per_step: int
    longest_tokens: int
    device: str
    seconds: float = 0.0
    measured: tuple[str, ...] = ("peak_bytes", "seconds_per_step", "tokens_per_second")
    estimated: tuple[str, ...] = ("estimate_bytes", "eta_seconds", "suggestion")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (bytes, and GB beside them)."""
        data = asdict(self)
        for name in ("peak_bytes", "free_bytes", "estimate_bytes"):
            value = data[name]
            data[name.replace("_bytes", "_gb")] = None if value is None else round(value / 2**30, 3)
        return data

    def headline(self) -> str:
        """One paragraph for the page and the command line."""
        free = f" of {self.free_bytes / 2**30:.1f} GB free" if self.free_bytes else ""
        line = (f"Measured: peak {self.peak_bytes / 2**30:.2f} GB{free} (the estimate said "
                f"{self.estimate_bytes / 2**30:.2f} GB), {self.seconds_per_step:.2f} s per step on the longest rows. "
                f"ETA of the run: {_duration(self.eta_seconds)} for {self.total_steps} steps "
                f"({self.total_tokens:,} tokens at {self.tokens_per_second:.0f} tokens/s).")
        if self.fits is False:
            line += f" It does not fit: {self.suggestion.get('reason', 'lower the batch size or max length')}."
        return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- the child: real steps


def measure(config, steps: int = PREFLIGHT_STEPS) -> dict[str, Any]:
    """Run ``steps`` optimizer steps of ``config`` on its longest rows in this process; the raw figures.

    The run's schedule, batch and settings are kept; only the rows are the longest ones (the
    memory peak of a run is at its longest micro-batch) and nothing is written.
    """
    from mactuner.evaluation.replay import replay_questions
    from mactuner.training.callbacks import TrainingCallback
    from mactuner.training.trainer import Trainer

    # replay rows are counted, not made: answering them with the base model takes longer than the steps
    # (the run makes them once per base model and caches them); they are the person's rows' length on average
    replay = len(replay_questions(config.replay_rows)) if config.replay_rows and config.objective == "sft" else 0
    trial = dataclasses.replace(config, eval_every=0, save_every=0, log_every=1,
                                forgetting_check=False, compile="off", replay_rows=0)

    class Clock(TrainingCallback):
        def __init__(self):
            self.reports: list[tuple[float, int, int]] = []

        def on_train_report(self, info):
            self.reports.append((time.perf_counter(), info["tokens"], info["memory_bytes"]))

    clock = Clock()
    trainer = Trainer(trial, None, callbacks=[clock])
    trainer.setup()
    all_units = trainer.train_units
    lengths = sorted((len(u.input_ids) for u in all_units), reverse=True)
    total_steps, steps_per_epoch = trainer.total_steps, trainer.steps_per_epoch
    tokens_per_epoch = sum(lengths) + replay * sum(lengths) / max(1, len(lengths))
    if replay:
        steps_per_epoch = math.ceil((len(all_units) + replay) / trainer.global_batch)
        total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    epochs = total_steps / max(1, steps_per_epoch)
    longest = sorted(all_units, key=lambda u: len(u.input_ids), reverse=True)
    per_step = trainer.global_batch
    trainer.train_units = [longest[i % len(longest)] for i in range(per_step * steps)]
    trainer.steps_per_epoch = steps
    trainer.total_steps = steps
    trainer._plans = {}
    started = time.perf_counter()
    result = trainer.train()
    trainer.cleanup()
    times = [started] + [t for t, _, _ in clock.reports]
    tokens = [0] + [n for _, n, _ in clock.reports]
    # the first step pays the warm-up: measure the others (all of them when only one ran)
    first = 1 if len(times) > 2 else 0
    seconds = times[-1] - times[first]
    measured_tokens = tokens[-1] - tokens[first]
    return {
        "peak_bytes": int(result.peak_memory_bytes or 0),
        "memory_kind": result.memory_kind,
        "seconds_per_step": seconds / max(1, len(times) - 1 - first),
        "tokens_per_second": measured_tokens / seconds if seconds > 0 else 0.0,
        "total_steps": int(total_steps),
        "total_tokens": int(round(tokens_per_epoch * epochs)),
        "steps_measured": len(clock.reports),
        "rows_per_step": per_step,
        "longest_tokens": lengths[0] if lengths else 0,
        "longest_trained": max((u.trained_tokens for u in all_units), default=0),
        "device": str(trainer.device),
    }


# ---------------------------------------------------------------- the parent: a child process, then advice


def preflight(config, *, steps: int = PREFLIGHT_STEPS, timeout: float = 600) -> PreflightResult:
    """Measure ``config`` in a child process and judge it against the free memory now.

    Raises:
        RuntimeError: the child failed (its last error line is in the message).
    """
    from mactuner.recommend import estimate_for_config, free_memory_bytes

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mactuner-preflight-") as folder:
        path = Path(folder) / "config.yaml"
        config.save(path)
        # the child imports this very package (as mactuner.runs starts trainers)
        package_root = Path(__file__).resolve().parents[2]
        done = subprocess.run([sys.executable, "-m", "mactuner.training.preflight", str(path), str(steps)],
                              cwd=package_root, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    figures = None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            figures = json.loads(line)
            break
    if done.returncode != 0 or figures is None or "error" in figures:
        reason = (figures or {}).get("error") or (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"The preflight could not run {steps} steps: {reason}")
    device = figures["device"]
    free, _ = free_memory_bytes(device)
    # the static estimate of the same settings, with the rows' real longest lengths
    shape = SimpleNamespace(max_tokens=figures["longest_tokens"], trained_lengths=[figures["longest_trained"]])
    # the rows measured: the person's longest, without replay rows (counted in the ETA, not made): the estimate alike
    estimate = estimate_for_config(dataclasses.replace(config, replay_rows=0), shape, device)
    fits = None if not free else figures["peak_bytes"] <= free
    suggestion = {} if fits is not False else suggest_fit(config, figures["peak_bytes"], free, device, shape)
    tps = figures["tokens_per_second"]
    return PreflightResult(
        peak_bytes=figures["peak_bytes"], memory_kind=figures["memory_kind"], free_bytes=free,
        estimate_bytes=estimate.total, seconds_per_step=round(figures["seconds_per_step"], 3),
        tokens_per_second=round(tps, 1), total_steps=figures["total_steps"], total_tokens=figures["total_tokens"],
        eta_seconds=round(figures["total_tokens"] / tps, 1) if tps > 0 else math.inf, fits=fits, suggestion=suggestion,
        steps_measured=figures["steps_measured"], rows_per_step=figures["rows_per_step"],
        longest_tokens=figures["longest_tokens"], device=device, seconds=round(time.perf_counter() - started, 1),
    )


def suggest_fit(config, measured_peak: int, free: int, device: str, shape=None) -> dict[str, Any]:
    """The largest micro-batch that fits ``free`` (then gradient checkpointing, then a shorter max length).

    The static estimate gives how the peak changes with a setting, the measurement where it stands: a
    setting's predicted peak is its estimate plus what the estimate missed for the measured settings
    (the runtime's own memory, mostly, which no setting changes).
    """
    from mactuner.recommend import estimate_for_config

    budget = free * FIT_MARGIN
    missed = measured_peak - estimate_for_config(config, shape, device).total

    def predicted(**changes) -> float:
        return estimate_for_config(dataclasses.replace(config, **changes), shape, device).total + missed

    effective = config.batch_size * config.grad_accum
    for checkpointing in ([False, True] if not config.gradient_checkpointing else [True]):
        batch = config.batch_size
        while batch >= 1:
            if predicted(batch_size=batch, gradient_checkpointing=checkpointing) <= budget:
                changes = {"batch_size": batch, "grad_accum": max(1, math.ceil(effective / batch)),
                           "gradient_checkpointing": checkpointing}
                reason = f"micro-batch {batch} with gradient accumulation {changes['grad_accum']}"
                if checkpointing and not config.gradient_checkpointing:
                    reason += " and gradient checkpointing"
                return {**changes, "reason": reason + f" (predicted {predicted(**{k: v for k, v in changes.items() if k != 'grad_accum'}) / 2**30:.2f} GB)"}
            batch //= 2
    length = config.max_length
    while length > 64:
        length //= 2
        if predicted(batch_size=1, gradient_checkpointing=True, max_length=length) <= budget:
            return {"batch_size": 1, "grad_accum": effective, "gradient_checkpointing": True, "max_length": length,
                    "reason": f"micro-batch 1, gradient checkpointing and max length {length}"}
    return {"reason": "nothing smaller fits: close other programs or choose a smaller model"}


def _child(argv: list[str]) -> int:
    """``python -m mactuner.training.preflight CONFIG.yaml [STEPS]``: one JSON line on stdout."""
    from mactuner.config import TrainConfig
    from mactuner.training.errors import TrainingError

    try:
        figures = measure(TrainConfig.load(argv[0]), int(argv[1]) if len(argv) > 1 else PREFLIGHT_STEPS)
    except TrainingError as error:  # out of memory, bad data: said plainly
        print(json.dumps({"error": str(error)}), flush=True)
        return 1
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
