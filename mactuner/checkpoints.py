"""Atomic training checkpoints: save, list, prune, delete, resume.

A checkpoint is ``RUN/checkpoints/step-00000050/``. Its root is a standard PEFT
adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``; a full
fine-tune holds ``config.json`` + ``model.safetensors`` instead), so any
checkpoint can be loaded or chatted with directly. Beside the weights:

```
trainer_state.json     step, epoch, losses, micro-batch, tokens seen (readable; written last)
training_state.pt      optimizer, scheduler and RNG states (tensors and plain values only,
                       read back with torch.load(weights_only=True): no pickle runs)
```

Atomic: everything is written into a hidden staging folder
(``checkpoints/.staging-step-…``), each file and the folder are fsynced, then the
folder is renamed to its final name in one step (:func:`mactuner.fileio.write_folder_atomically`). A process killed mid-save
leaves only a staging folder, which is never listed, never resumed from and
removed by the next run that starts in the folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mactuner.fileio import STAGING_PREFIX, fsync_dir, unique_temp_name, write_folder_atomically

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "training_state.pt"
_NAME = re.compile(r"^step-(\d{8})$")
_STAGING_PREFIX = STAGING_PREFIX  # the name it had
# fault injection for the tests: sleep this long in the middle of a save, after the
# weights are written and before the checkpoint is complete, so a test can kill it there
PAUSE_ENV = "MACTUNER_CHECKPOINT_PAUSE_S"


@dataclass
class CheckpointInfo:
    """A complete checkpoint. ``created`` is seconds since the epoch."""

    path: Path
    step: int
    loss: float | None
    val_loss: float | None
    size_bytes: int
    created: float


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """``RUN/checkpoints`` (not created)."""
    return Path(run_dir) / CHECKPOINTS_DIR


def _folder_size(path: Path) -> int:
    total = 0
    for folder, _, names in os.walk(path):  # tolerates a checkpoint pruned while it is measured
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo | None:
    """The checkpoint at ``path``, or None if it is not a complete checkpoint."""
    path = Path(path)
    match = _NAME.match(path.name)
    state_file = path / STATE_JSON
    if not match or not path.is_dir() or not state_file.is_file() or not (path / STATE_TENSORS).is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
        created = float(state.get("created") or state_file.stat().st_mtime)
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # pruned or deleted while read, or not a checkpoint's state
    return CheckpointInfo(
        path=path,
        step=int(match.group(1)),
        loss=state.get("loss"),
        val_loss=state.get("val_loss"),
        size_bytes=_folder_size(path),
        created=created,
    )


def list_checkpoints(run_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest step first (staging folders are never listed)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []  # the run was deleted meanwhile
    infos = [read_checkpoint(p) for p in entries if _NAME.match(p.name)]
    return sorted((i for i in infos if i is not None), key=lambda i: i.step)


def latest_checkpoint(run_dir: str | os.PathLike) -> CheckpointInfo | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def best_checkpoint(run_dir: str | os.PathLike) -> CheckpointInfo | None:
    """The complete checkpoint with the lowest validation loss, or None if none has one."""
    scored = [c for c in list_checkpoints(run_dir) if c.val_loss is not None]
    return min(scored, key=lambda c: (c.val_loss, -c.step)) if scored else None


def delete_checkpoint(path: str | os.PathLike) -> None:
    """Delete one checkpoint folder.

    Raises:
        ValueError: ``path`` is not a checkpoint folder (refused, so a slip never
            deletes something else).
    """
    path = Path(path)
    if not _NAME.match(path.name) or path.parent.name != CHECKPOINTS_DIR or not path.is_dir():
        raise ValueError(f"{path} is not a checkpoint folder (RUN/checkpoints/step-NNNNNNNN)")
    # rename first so a half-deleted folder is never listed as a checkpoint
    trash = unique_temp_name(path, prefix=f"{STAGING_PREFIX}deleting-")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the last ``keep_last`` checkpoints and the best by validation loss.

    The latest checkpoint is always kept (a run resumes from it), even with ``keep_last=0``.

    Returns:
        The deleted folders.
    """
    found = list_checkpoints(run_dir)
    keep = {c.path for c in found[-max(keep_last, 1):]}
    best = best_checkpoint(run_dir)
    if best is not None:
        keep.add(best.path)
    deleted = []
    for info in found:
        if info.path not in keep:
            delete_checkpoint(info.path)
            deleted.append(info.path)
    return deleted


def remove_staging(run_dir: str | os.PathLike) -> list[Path]:
    """Remove leftovers of saves that a crash interrupted: staging folders of checkpoints and of
    the final adapter (only the trainer writes those).

    Call it only while holding the run folder's lock (:class:`mactuner.locks.RunLock`): then no save
    can be in progress.
    """
    removed = []
    folder = checkpoints_dir(run_dir)
    found = list(folder.iterdir()) if folder.is_dir() else []
    if Path(run_dir).is_dir():
        ours = (f"{STAGING_PREFIX}{ADAPTER_DIR}.", f"{STAGING_PREFIX}old-{ADAPTER_DIR}.")
        found += [p for p in Path(run_dir).iterdir() if p.name.startswith(ours)]
    for p in found:
        if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: Any,
    state: dict[str, Any],
    tensors: dict[str, Any],
    tokenizer: Any = None,
) -> CheckpointInfo:
    """Write a complete checkpoint of ``step`` atomically.

    Args:
        run_dir: the run folder.
        step: optimizer steps done.
        model: a PEFT model (saves the adapter) or a transformers model (saves all weights);
            anything with ``save_pretrained(folder, safe_serialization=True)``.
        state: plain JSON values for ``trainer_state.json`` (``loss`` and ``val_loss`` are listed).
        tensors: optimizer / scheduler / RNG states for ``training_state.pt``; tensors,
            numbers, strings, lists and dicts only, so it loads with ``weights_only=True``.
        tokenizer: saved too when given, so the folder loads on its own.

    Returns:
        The new checkpoint.
    """
    import torch

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        torch.save(tensors, staging / STATE_TENSORS)
        pause = float(os.environ.get(PAUSE_ENV) or 0)
        if pause > 0:
            time.sleep(pause)
        # written last: a folder without it is not a checkpoint (the whole folder is synced before its rename)
        (staging / STATE_JSON).write_text(json.dumps({**state, "step": step, "created": time.time()}, indent=2))

    path = write_folder_atomically(checkpoints_dir(run_dir) / checkpoint_name(step), write)
    info = read_checkpoint(path)
    assert info is not None  # just written complete
    return info


def load_checkpoint_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainer_state.json, training_state.pt)`` of a checkpoint, loaded without unpickling."""
    import torch

    path = Path(path)
    if read_checkpoint(path) is None:
        raise ValueError(f"{path} is not a complete checkpoint")
    state = json.loads((path / STATE_JSON).read_text())
    tensors = torch.load(path / STATE_TENSORS, map_location="cpu", weights_only=True)
    return state, tensors


def load_adapter_weights(model: Any, path: str | os.PathLike) -> None:
    """Load the weights saved in checkpoint ``path`` into ``model`` (PEFT adapter or full model)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    adapter_file = path / "adapter_model.safetensors"
    if adapter_file.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter_file))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{path}: adapter weights do not match the model ({len(unexpected)} unexpected keys)")
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds neither an adapter nor model weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied weights (lm_head = embeddings) are saved once and legitimately "missing"
    missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: model weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
