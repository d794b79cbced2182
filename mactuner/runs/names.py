"""A person's name for a training run, kept in the run folder beside its id.

A run's id is its folder's name (``20261128-231500-quenmark_alpaca``) and never
changes: checkpoints, adapters and chat histories refer to it. The name shown in
the app is a free text stored in ``RUN/name.json`` (``{"name": "…"}``, written
atomically), so renaming touches nothing else.
"""

from __future__ import annotations

import os

from mactuner.fileio import read_regular_json, write_json_atomic
from mactuner.runs.store import run_path

NAME_FILE = "name.json"
MAX_NAME_LENGTH = 80


def set_run_name(run: str | os.PathLike, name: str) -> str:
    """Give ``run`` (an id or a folder) a display name; an empty name goes back to the id.

    Returns:
        The name now shown (:func:`run_display_name`).

    Raises:
        ValueError: the name is longer than 80 characters or spans several lines.
        FileNotFoundError: there is no such run folder.
    """
    path = run_path(run)
    if not path.is_dir():
        raise FileNotFoundError(f"no run folder {path}")
    if "\n" in (name or ""):
        raise ValueError("a run name is one line of text")
    name = " ".join((name or "").split())
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"a run name has at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    if not name:
        (path / NAME_FILE).unlink(missing_ok=True)
    else:
        write_json_atomic(path / NAME_FILE, {"name": name})
    return run_display_name(path)


def run_display_name(run: str | os.PathLike) -> str:
    """The name a person gave ``run``, or its id when it has none."""
    path = run_path(run)
    try:
        name = read_regular_json(path / NAME_FILE, max_bytes=100_000).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return name.strip() if isinstance(name, str) and name.strip() else path.name
