"""Merge an adapter into its base model: a full model folder that chat, quantize and export read.

Default names carry the run and the step (``<run>-step-00000050-merged``), so two runs never share one; an
existing folder that is not MacTuner's is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mactuner import fileio, paths
from mactuner.adapters import base_model_for, check_adapter
from mactuner.devices import parse_dtype
from mactuner.models import Progress, loadable_path
from mactuner.quantize.methods import VARIANT_FILE

# ---------------------------------------------------------------- merge




def adapter_label(adapter: str | os.PathLike) -> str:
    """A name for an adapter that is unique per run and step: ``<run>-step-00000050`` or ``<run>-adapter``."""
    adapter = Path(adapter)
    if adapter.parent.name == "checkpoints":  # RUN/checkpoints/step-N
        return f"{adapter.parent.parent.name}-{adapter.name}"
    return f"{adapter.parent.name}-{adapter.name}"




def merge_adapter(
    adapter: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    base: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Merge a LoRA adapter into its base model and save a plain transformers folder (safetensors).

    The merge is done in float32 (no rounding of the sum), then the weights are
    stored in the base model's own dtype. The folder loads with plain
    ``AutoModelForCausalLM.from_pretrained`` — no peft needed.

    Args:
        adapter: a PEFT adapter folder (a run's ``adapter/`` or a ``checkpoints/step-N``).
        out_dir: where to write; default ``exports_dir()/<run>-step-N-merged`` (or ``<run>-adapter-merged``).
        base: the base model; default the one recorded in the adapter (else the built-in model).
        overwrite: replace ``out_dir`` even if it holds files MacTuner did not create.
        progress: ``(message, fraction or None)`` callback.

    Returns:
        The merged model's folder.

    Raises:
        mactuner.fileio.OutputNotOurs: ``out_dir`` holds someone else's files (checked
            before any work and again before the rename).
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter_path = check_adapter(adapter)
    base_path = loadable_path(base_model_for(base, adapter_path))
    if out_dir is None:
        out_dir = paths.exports_dir() / fileio.slug(f"{adapter_label(adapter_path)}-merged")
    out_dir = fileio.prepare_output(out_dir, overwrite)  # refuse before minutes of work, not after
    if progress:
        progress(f"Loading base model {base_path}…", 0.1)
    stored_dtype = getattr(AutoConfig.from_pretrained(base_path), "dtype", None) or torch.float32
    if isinstance(stored_dtype, str):
        stored_dtype = parse_dtype(stored_dtype)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if progress:
        progress("Merging the adapter…", 0.5)
    merged = PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
    merged.to(stored_dtype)
    if progress:
        progress(f"Saving to {out_dir}…", 0.8)

    def write(staging: Path) -> None:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / VARIANT_FILE).write_text(
            json.dumps({"method": "merged", "base": base_path, "adapter": str(adapter_path)}, indent=2)
        )

    fileio.write_output_folder(out_dir, write, overwrite=overwrite, what=f"merged model of {adapter_path}")
    if progress:
        progress("Merged.", 1.0)
    return out_dir
