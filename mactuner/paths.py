"""Where MacTuner keeps its files.

Everything lives under one home folder, ``$MACTUNER_HOME`` (default
``~/.mactuner``): the settings file, the converted-model cache, training runs and
RAG collections. Tests point ``MACTUNER_HOME`` at a temporary folder. The model
cache can be shared on its own through ``$MACTUNER_MODEL_CACHE`` so that a test
run converts the default model once, not once per test.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The MacTuner home folder, created on first use."""
    path = Path(os.environ.get("MACTUNER_HOME") or Path.home() / ".mactuner").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def settings_file() -> Path:
    """The small JSON file that remembers choices such as the default device."""
    return home() / "settings.json"


def model_cache() -> Path:
    """Folder of models converted once into plain transformers folders."""
    env = os.environ.get("MACTUNER_MODEL_CACHE")
    path = Path(env).expanduser() if env else home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Folder holding one sub-folder per training run."""
    path = home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def rag_dir() -> Path:
    """Folder holding one sub-folder per RAG collection."""
    path = home() / "rag"
    path.mkdir(parents=True, exist_ok=True)
    return path


def exports_dir() -> Path:
    """Folder for merged and quantized models."""
    path = home() / "exports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def display_path(path: str | os.PathLike) -> str:
    """``path`` as a person should read it on screen: ``~/…`` under their home folder, ``$MACTUNER_HOME/…``
    under a MacTuner home kept elsewhere, otherwise as given (a folder the person named themselves).

    Reads nothing and creates nothing (unlike :func:`home`).
    """
    target = Path(path).expanduser()
    ours = Path(os.environ.get("MACTUNER_HOME") or Path.home() / ".mactuner").expanduser()
    for base, shown in ((ours, "$MACTUNER_HOME"), (Path.home(), "~")):
        # a MacTuner home inside the person's home folder reads best as ~/…
        if _inside(target, base) and not (shown != "~" and _inside(ours, Path.home())):
            relative = target.absolute().relative_to(base.absolute()).as_posix()
            return shown if relative == "." else f"{shown}/{relative}"
    return str(path)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.absolute().relative_to(folder.absolute())
    except ValueError:
        return False
    return True
