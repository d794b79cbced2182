"""Which folders MacTuner may use as a run folder.

A trainer writes ``config.yaml``, ``status.json``, ``checkpoints/`` and ``adapter/`` into its
run folder and replaces what is there: a folder of the person's own files given as
``--run-dir`` would lose them. So a run folder must be missing, empty, or MacTuner's:
it carries :data:`RUN_MARKER` (written when MacTuner creates a run) or, for runs written
before the marker existed, a ``status.json`` that is a run's status. A folder holding only a
``config.yaml`` that is a MacTuner training config is a run being set up
(``train RUN/config.yaml --run-dir RUN``): training there rewrites that config, nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_MARKER = ".mactuner-run"
RUN_STATES = ("running", "finished", "failed", "cancelled")


class NotARunFolder(FileExistsError):
    """The folder holds files MacTuner did not write as a run; the message says what to do."""


def mark_run_folder(folder: str | os.PathLike) -> None:
    """Mark ``folder`` (created now) as a MacTuner run folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / RUN_MARKER
    if not marker.exists():
        marker.write_text("a training run written by MacTuner\n", encoding="utf-8")


def _has_run_status(folder: Path) -> bool:
    status = folder / "status.json"
    try:
        if not status.is_file() or status.stat().st_size > 1_000_000:
            return False
        data = json.loads(status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("state") in RUN_STATES


def is_run_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is missing, empty, or a MacTuner run folder (so training there loses nothing)."""
    folder = Path(folder)
    if folder.is_symlink():
        return False
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    if (folder / RUN_MARKER).is_file() or _has_run_status(folder):
        return True
    names = [p.name for p in folder.iterdir()]
    return not names or (names == ["config.yaml"] and _is_train_config(folder / "config.yaml"))


def _is_train_config(path: Path) -> bool:
    from mactuner.config import TrainConfig

    try:
        TrainConfig.load(path)
    except (OSError, ValueError, TypeError):
        return False
    return True


def check_run_folder(folder: str | os.PathLike) -> Path:
    """Return ``folder`` if a trainer may write there, else raise :class:`NotARunFolder` saying why."""
    folder = Path(folder)
    if folder.is_symlink():
        raise NotARunFolder(f"{folder} is a symbolic link; give a real folder (or leave out --run-dir for a new one).")
    if folder.exists() and not folder.is_dir():
        raise NotARunFolder(f"{folder} is not a folder; give a new or empty folder (or leave out --run-dir).")
    if is_run_folder(folder):
        return folder
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise NotARunFolder(
        f"{folder} is not a MacTuner run folder (it holds {shown}); training there would overwrite "
        "config.yaml, status.json and adapter/. Give a new or empty folder, or leave out --run-dir for a new run."
    )
