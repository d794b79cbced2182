"""What a run trains on, recorded at its start and checked before it resumes.

A resumed run continues from a checkpoint: its optimizer state, learning-rate
schedule and position in the data only make sense for the data and settings it
started with. If the dataset file was replaced, or a training setting edited,
between Cancel and Resume, the run would silently continue on something else
(a 87-step run became a 12-step one and reported "finished"). So the start of a
run records ``RUN/fingerprint.json``:

```
{"version": 1,
 "dataset": {"path", "sha256", "size", "lines"},   # the file's content, hashed once
 "config": {field: value, ...}}                      # the settings that change the training
```

and :func:`check` compares the dataset and the config a resume would use with
it, raising :class:`FingerprintMismatch` with a message that names what changed.
Both functions are pure (no hidden state) and cheap: one streaming pass over the
dataset file (about 0.3 s per 100 MB).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mactuner import fileio
from mactuner.devices.memory import format_bytes

FINGERPRINT_FILE = "fingerprint.json"
VERSION = 1

# settings whose change makes a checkpoint meaningless for the rest of the run (the data,
# the model, the optimization and the schedule); not: device, dtype, memory switches
# (gradient checkpointing), how often to log / evaluate / save, the dataset's path (a moved file
# with the same content is the same data: its content is checked instead), and the run's length
# (`max_steps`, `epochs`): "resume and train longer" is a deliberate request, not a silent change
TRAINING_FIELDS = (
    "model",
    "dataset_format",
    "val_fraction",
    "max_length",
    "assistant_only_loss",
    "packing",
    "method",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "batch_size",
    "grad_accum",
    "learning_rate",
    "warmup_ratio",
    "warmup_steps",
    "lr_scheduler",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "objective",
    "beta",
    "dpo_loss",
    "kto_desirable_weight",
    "kto_undesirable_weight",
)


class FingerprintMismatch(ValueError):
    """The dataset or the settings changed since the run started; the message names what changed."""


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected a TrainConfig or a dict of its fields, got {type(config).__name__}")


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """SHA-256, size in bytes and line count of a file, in one streaming pass.

    Returns ``{"path", "sha256": None, ...}`` when the file cannot be read (the
    trainer reports a missing dataset itself).
    """
    path = Path(path)
    digest, size, lines = hashlib.sha256(), 0, 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
    except OSError:
        return {"path": str(path), "sha256": None, "size": None, "lines": None}
    return {"path": str(path), "sha256": digest.hexdigest(), "size": size, "lines": lines}


def compute(config: Any) -> dict[str, Any]:
    """The fingerprint of a config (a ``TrainConfig`` or its dict): its dataset's content and training fields."""
    values = _as_dict(config)
    dataset = values.get("dataset")
    return {
        "version": VERSION,
        "dataset": describe_file(dataset) if dataset else None,
        "config": {name: values[name] for name in TRAINING_FIELDS if name in values},
    }


def record(run_dir: str | os.PathLike, config: Any) -> Path:
    """Write ``RUN/fingerprint.json`` for ``config`` (atomically); returns its path."""
    return fileio.write_json_atomic(Path(run_dir) / FINGERPRINT_FILE, compute(config))


def recorded(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The fingerprint recorded for a run, or None (a run started before fingerprints existed)."""
    import json

    try:
        data = json.loads((Path(run_dir) / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _file_text(info: dict[str, Any]) -> str:
    return f"{info.get('lines')} lines, {format_bytes(info.get('size'))}, sha256 {str(info.get('sha256'))[:12]}…"


def check(run_dir: str | os.PathLike, config: Any) -> None:
    """Refuse to resume on data or settings other than the run started with.

    Args:
        run_dir: the run folder (holding ``fingerprint.json``; a run without one is not checked).
        config: the config the resume would use (a ``TrainConfig`` or its dict).

    Raises:
        FingerprintMismatch: the dataset file's content or a training setting changed; the
            message names what, with the values then and now.
    """
    then = recorded(run_dir)
    if not then:
        return
    values = _as_dict(config)
    changes = []
    old_data = then.get("dataset") or {}
    dataset = values.get("dataset")
    if old_data.get("sha256") and dataset:
        path = Path(dataset)
        try:
            size = path.stat().st_size
        except OSError:
            raise FingerprintMismatch(
                f"The dataset file {path} is gone since this run started; put it back to resume, "
                "or start a new run instead."
            ) from None
        now = describe_file(path)  # one pass: hash, and the line count the message shows
        if size != old_data.get("size") or now.get("sha256") != old_data.get("sha256"):
            changes.append(
                f"the dataset file changed since this run started ({_file_text(old_data)} then; "
                f"{_file_text(now)} now)"
            )
    old_config = then.get("config") or {}
    for name, old in old_config.items():
        if name in values and values[name] != old:
            changes.append(f"{name} {old!r} → {values[name]!r}")
    if changes:
        raise FingerprintMismatch(
            f"Cannot resume {Path(run_dir).name}: " + "; ".join(changes) + ". A checkpoint only continues the "
            "training it came from: start a new run instead (or restore what changed)."
        )
