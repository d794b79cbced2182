"""QLoRA's base model: 4-bit NF4 weights (bitsandbytes, CUDA only) under a LoRA adapter.

The model is found exactly as :func:`mactuner.models.load_model` finds it (the
built-in default, a hub id, a folder, a ``.gguf`` file or a folder holding one, a
``~/`` path), through the same resolver. The layers that stay unquantized
(embeddings, LM head, norms) keep the compute dtype: peft's
``prepare_model_for_kbit_training`` would cast them to float32, which makes every
activation float32 and QLoRA use more memory than LoRA on a small model. The
frozen base needs no such cast (no optimizer touches it; the norms compute in
float32 internally), and gradient checkpointing is turned on by the trainer
without re-entrant autograd, so no input needs ``requires_grad`` either.
"""

from __future__ import annotations

from typing import Any

import torch

from mactuner.training.errors import TrainingError


def qlora_problem(device_type: str) -> str | None:
    """Why QLoRA cannot train on ``device_type`` here, with the fix; ``None`` when it can.

    CUDA needs bitsandbytes (a 4-bit base); a CPU needs an exact int8 matmul (an int8 base,
    :mod:`mactuner.training.int8_base`); other devices (MPS) have neither.
    """
    import importlib.util

    from mactuner.training.int8_base import int8_matmul_available

    if device_type == "cuda":
        if importlib.util.find_spec("bitsandbytes") is None:
            return "QLoRA needs the bitsandbytes package: pip install bitsandbytes (CUDA only). Or use method: lora."
        return None
    if device_type == "cpu":
        if not int8_matmul_available("cpu"):
            return ("QLoRA on a CPU needs an exact int8 matmul (torch._int_mm with VNNI or AMX instructions); on this "
                    "CPU or PyTorch build it is missing or rounds wrong. Use method: lora: it trains at the same quality.")
        return None
    if device_type == "mps":
        return ("QLoRA with PyTorch runs on an NVIDIA GPU (4-bit base, bitsandbytes) or a CPU (int8 base), not on MPS. "
                "On a Mac, train it with the MLX engine (engine: mlx; a 4-bit base on the Mac's GPU), "
                "or use method: lora: on a small model it fits in memory and trains at the same quality.")
    return (f"QLoRA runs on an NVIDIA GPU (4-bit base, bitsandbytes) or a CPU (int8 base); this run is on {device_type}. "
            "Use method: lora instead: on a small model it fits in memory and trains at the same quality.")


def unquantized_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype QLoRA keeps its embeddings, head and norms in (for memory estimates)."""
    return compute_dtype


def resolve_model_folder(source: str) -> str:
    """What transformers loads for ``source``: the models module's own resolution (GGUF converted once).

    Raises:
        TrainingError: the source cannot be found or used (the message says why).
    """
    from mactuner.models import ModelSourceError, model_path

    try:
        _resolved, path = model_path(source)
    except ModelSourceError as error:
        raise TrainingError(str(error)) from error
    return path


def freeze_for_training(model: Any) -> Any:
    """Freeze every base weight, keeping each in its dtype (4-bit stays 4-bit, the rest the compute dtype)."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_4bit(source: str, device: torch.device, compute_dtype: torch.dtype, trust_remote_code: bool = False):
    """Load ``source`` with NF4 weights on ``device``; returns ``(model, tokenizer, path)``.

    Raises:
        TrainingError: bitsandbytes is missing, or the model cannot be found.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise TrainingError(
            "QLoRA needs the bitsandbytes package: pip install bitsandbytes (CUDA only). Or use method: lora."
        ) from error
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if device.type == "cuda":
        # bitsandbytes quantizes on, and queries, the *current* device: make it this run's GPU
        torch.cuda.set_device(device)
    path = resolve_model_folder(source)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization,
        dtype=compute_dtype,
        device_map={"": device.index or 0},
        trust_remote_code=trust_remote_code,
    )
    return freeze_for_training(model), tokenizer, path
