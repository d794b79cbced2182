"""PEFT adapters: find, validate, load and describe one. The only reader of ``adapter_config.json``.

An adapter folder is what a LoRA/QLoRA run writes as ``RUN/adapter`` and in each
``RUN/checkpoints/step-N``: ``adapter_config.json`` + ``adapter_model.safetensors``,
loadable by plain ``peft.PeftModel.from_pretrained``. Chat, Evaluate, merge and export all
go through this module to tell an adapter from a model folder, to find the base model an
adapter was trained on, and to apply it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mactuner.file_checks import check_adapter_files
from mactuner.models import DEFAULT_MODEL

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter folder (holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter: str | os.PathLike) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a dict; ``{}`` when it is missing or unreadable."""
    try:
        config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def adapter_base_model(adapter: str | os.PathLike) -> str | None:
    """The base model an adapter folder was trained on (``base_model_name_or_path``), if recorded."""
    return read_adapter_config(adapter).get("base_model_name_or_path") or None


def describe_adapter(adapter: str | os.PathLike) -> dict[str, Any]:
    """What a person wants to know of an adapter: its kind, rank, alpha, target modules and base model."""
    config = read_adapter_config(adapter)
    return {
        "peft_type": config.get("peft_type"),
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "base_model": config.get("base_model_name_or_path"),
    }


def check_adapter(adapter: str | os.PathLike) -> Path:
    """The adapter folder as a path; ``FileNotFoundError`` when it is not a PEFT adapter,
    :class:`mactuner.file_checks.DamagedFile` (a ``ValueError``) when its weights file cannot be read."""
    path = Path(adapter).expanduser()
    if not is_adapter(path):
        raise FileNotFoundError(
            f"{path} is not an adapter folder (no {ADAPTER_CONFIG}). "
            "Pick a finished run's adapter/ folder or one of its checkpoints/step-N folders."
        )
    check_adapter_files(path)  # a damaged or crafted weights file: a message, not a SafetensorError
    return path


def base_model_for(source: str | None, adapter: Path | None) -> str:
    """The base model to load: ``source`` if given, else the adapter's recorded base if available, else the default."""
    if source:
        return source
    if adapter is not None:
        recorded = adapter_base_model(adapter)
        # a recorded hub id or missing folder would need the network: fall back to the built-in model
        if recorded and (recorded == DEFAULT_MODEL or Path(recorded).is_dir()):
            return recorded
    return DEFAULT_MODEL


def apply_adapter(model, adapter: str | os.PathLike, *, merge: bool = True):
    """``model`` with the adapter at ``adapter`` applied; merged into its weights unless ``merge=False``.

    A merged model decodes as fast as the base one (no extra LoRA matmuls per token).
    """
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(check_adapter(adapter)))
    return peft_model.merge_and_unload() if merge else peft_model
