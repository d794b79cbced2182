"""Quantize a model folder, and reload any variant MacTuner wrote.

Methods and where they run (checked on torch 2.13 / torchao 0.18):

=====================  ======  ===========================================================
method                 device  on disk
=====================  ======  ===========================================================
``int8-dynamic``       CPU     torch's dynamic int8 Linear (fbgemm/x86, qnnpack on Arm):
                               int8 weights, activations quantized per call. Saved as
                               ``quantized_state_dict.pt`` + ``config.json`` + tokenizer;
                               reloaded by rebuilding the model from its config,
                               quantizing it the same way and loading the state dict
                               (``torch.load(weights_only=True)``).
``int8-weight-only``   CPU,    torchao ``Int8WeightOnlyConfig`` through transformers'
                       CUDA    ``TorchAoConfig``: a standard transformers folder
                               (safetensors + ``quantization_config``) that plain
                               ``AutoModelForCausalLM.from_pretrained`` reloads.
``int4-weight-only``   CPU,    torchao, same folder form. On CUDA from capability 8.0:
                       CUDA    ``Int4WeightOnlyConfig(group 32, tile_packed_to_4d)``, real
                               4-bit storage and torch's tinygemm kernel (bfloat16). On
                               CPU (and older GPUs) torchao 0.18 has no packed int4
                               kernel (plain ``Int4WeightOnlyConfig`` needs the ``mslk``
                               package), so ``IntxWeightOnlyConfig(int4, group 32)``
                               stores the 4-bit values one per byte: 4-bit quality at
                               8-bit size.
``bnb-8bit``,          CUDA    bitsandbytes ``load_in_8bit`` / NF4 ``load_in_4bit`` (computing
``bnb-4bit``                   in the GPU's precision: bfloat16 from 8.0, float16 before);
                               standard transformers folder.
=====================  ======  ===========================================================

Every variant folder also holds ``mactuner_variant.json`` (method, source), and :func:`load_variant` reloads
any of them. Output folders are never someone else's (:func:`mactuner.fileio.write_output_folder`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mactuner import fileio, paths
from mactuner.devices import get_optimal_dtype, resolve_device
from mactuner.models import LoadedModel, Progress, loadable_path, release_model

VARIANT_FILE = "mactuner_variant.json"
DYNAMIC_STATE_FILE = "quantized_state_dict.pt"
HELD_OUT_TEXT = Path(__file__).resolve().parents[1] / "demo" / "held_out.txt"  # Wikipedia text via LLaMA-Factory (demo/NOTICE.md)
PROBE = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True)
class QuantMethod:
    """A quantization method and the devices it runs on."""

    name: str
    devices: tuple[str, ...]  # torch device types
    description: str


METHODS: dict[str, QuantMethod] = {
    m.name: m
    for m in [
        QuantMethod("int8-dynamic", ("cpu",), "int8 weights, activations quantized on the fly (torch, CPU)"),
        QuantMethod("int8-weight-only", ("cpu", "cuda"), "int8 weights, bf16 compute (torchao)"),
        QuantMethod("int4-weight-only", ("cpu", "cuda"), "4-bit weights in groups of 32 (torchao; stored in int8 on CPU)"),
        QuantMethod("bnb-8bit", ("cuda",), "bitsandbytes LLM.int8 (CUDA)"),
        QuantMethod("bnb-4bit", ("cuda",), "bitsandbytes NF4 (CUDA)"),
    ]
}


def unsupported_reason(method: str, device: str | torch.device) -> str | None:
    """Why ``method`` cannot run on ``device`` (``None`` when it can)."""
    if method not in METHODS:
        return f"unknown method {method!r}; choose one of: {', '.join(METHODS)}"
    device = torch.device(device)
    spec = METHODS[method]
    if device.type not in spec.devices:
        where = " or ".join(d.upper() for d in spec.devices)
        extra = ""
        if device.type == "mps":
            extra = (" This method's quantized kernels (torchao, bitsandbytes, PyTorch's int8) do not run on MPS; on a Mac, "
                     "export the merged model to GGUF (llama.cpp runs it on Metal), or train QLoRA with the MLX engine "
                     "(a 4-bit MLX base).")
        return f"{method} needs {where}; the selected device is {device}.{extra}"
    if method.startswith("bnb-"):
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return f"{method} needs the bitsandbytes package: pip install bitsandbytes"
    if method in ("int8-weight-only", "int4-weight-only"):
        import importlib.util

        if importlib.util.find_spec("torchao") is None:
            return f"{method} needs the torchao package: pip install torchao"
    return None


def supported_methods(device: str | torch.device) -> list[str]:
    """The methods that run on ``device``."""
    return [m for m in METHODS if unsupported_reason(m, device) is None]



# ---------------------------------------------------------------- quantize


def quantize(
    source: str | None,
    method: str,
    out_dir: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Quantize a model folder (base or merged) with ``method`` and save it (see the module table for the form).

    Raises:
        ValueError: the method is unknown or does not run on ``device`` (the message says why).
        mactuner.fileio.OutputNotOurs: ``out_dir`` holds someone else's files and ``overwrite`` is False.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    reason = unsupported_reason(method, device)
    if reason:
        raise ValueError(reason)
    path = loadable_path(source)
    if out_dir is None:
        out_dir = paths.exports_dir() / fileio.slug(f"{Path(path).name}-{method}")
    out_dir = fileio.prepare_output(out_dir, overwrite)  # refuse before the work, not after
    if progress:
        progress(f"Quantizing {Path(path).name} with {method}…", None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if method == "int8-dynamic":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model = _dynamic_int8(model)
    else:
        if device.type == "cuda":
            # bitsandbytes and torchao quantize on the current device: make it the chosen GPU
            torch.cuda.set_device(device)
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=_transformers_quant_config(method, device), **_load_kwargs(method, device)
        )

    def write(staging: Path) -> None:
        if method == "int8-dynamic":
            model.config.save_pretrained(staging)
            torch.save(model.state_dict(), staging / DYNAMIC_STATE_FILE)
        else:
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / VARIANT_FILE).write_text(json.dumps({"method": method, "source": path}, indent=2))

    try:
        fileio.write_output_folder(out_dir, write, overwrite=overwrite, what=f"{method} variant of {path}")
    finally:
        model = None  # the last reference: release_model can free its memory
        release_model()
    if progress:
        progress(f"Saved {out_dir}.", 1.0)
    return out_dir


def _dynamic_int8(model):
    import warnings

    with warnings.catch_warnings():
        # torch marks eager-mode quantization deprecated but it is still the one CPU int8 path with fast kernels here
        warnings.simplefilter("ignore")
        # per-channel weight scales: lower perplexity than per-tensor (measured 63.5 vs 74.6 on SmolLM2)
        spec = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def int4_uses_tinygemm(device: torch.device) -> bool:
    """Whether ``int4-weight-only`` gets torchao's packed CUDA int4 kernel (tinygemm, in torch itself) on
    ``device``: a CUDA GPU of capability 8.0 or later (the kernel computes in bfloat16)."""
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _transformers_quant_config(method: str, device: torch.device):
    if method.startswith("bnb-"):
        from transformers import BitsAndBytesConfig

        if method == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        # computes in the device's precision: bfloat16 from Ampere on, float16 on a T4 or V100 (no bfloat16 there)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=get_optimal_dtype(device))
    import torchao.quantization as ao
    from transformers import TorchAoConfig

    if method == "int8-weight-only":
        return TorchAoConfig(ao.Int8WeightOnlyConfig())
    if int4_uses_tinygemm(device):
        # real 4-bit storage, two values a byte, and torch's own int4 matmul (_weight_int4pack_mm)
        return TorchAoConfig(ao.Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d"))
    from torchao.quantization.granularity import PerGroup

    # no packed int4 kernel here (a CPU, or a GPU before Ampere): 4-bit values stored one per byte
    return TorchAoConfig(ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


def _load_kwargs(method: str, device: torch.device) -> dict[str, Any]:
    if method.startswith("bnb-"):
        return {"device_map": {"": device.index or 0}}
    if int4_uses_tinygemm(device) and method == "int4-weight-only":
        return {"dtype": torch.bfloat16, "device_map": {"": str(device)}}  # the kernel's own precision
    return {"dtype": get_optimal_dtype(device) if device.type != "cpu" else torch.bfloat16, "device_map": {"": str(device)}}


def load_variant(folder: str | os.PathLike, *, device: str | torch.device | None = None) -> LoadedModel:
    """Load a saved variant (merged, quantized, or any plain model folder) for answering and measuring."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    device = resolve_device(device)
    info = json.loads((folder / VARIANT_FILE).read_text()) if (folder / VARIANT_FILE).exists() else {}
    method = info.get("method", "none")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if method == "int8-dynamic":
        reason = unsupported_reason(method, device)
        if reason:
            raise ValueError(reason)
        from transformers.initialization import no_init_weights

        with no_init_weights():  # every weight is overwritten by the state dict
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
        model = _dynamic_int8(model.eval())
        model.load_state_dict(torch.load(folder / DYNAMIC_STATE_FILE, weights_only=True), strict=True)
        dtype = torch.float32
    elif method in METHODS:
        reason = unsupported_reason(method, device)
        if reason:
            raise ValueError(reason)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # bitsandbytes layers run on the current device
        model = AutoModelForCausalLM.from_pretrained(folder, **_load_kwargs(method, device))
        dtype = _load_kwargs(method, device).get("dtype", get_optimal_dtype(device))
    else:
        dtype = get_optimal_dtype(device)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()
    count = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, tokenizer, str(folder), str(folder), device, dtype, count)
