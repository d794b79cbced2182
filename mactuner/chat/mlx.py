"""Chat through MLX (Apple silicon), with the torch engine's interface.

:func:`load_mlx_chat_model` loads a base model with mlx-lm (``mlx_lm.utils.load_model`` on the
same local folder the torch engine reads) and applies an adapter: the ``mlx/`` files an MLX run
writes beside its PEFT adapter, or any PEFT LoRA folder (converted: PEFT's ``lora_A.weight``
(r, in) / ``lora_B.weight`` (out, r) transposed into mlx-lm's ``lora_a`` / ``lora_b``, scale
alpha / r). :func:`stream_mlx_chat` answers a conversation as an :class:`MLXChatStream`, an iterator
of text pieces with ``.text``, ``.stats`` (:class:`mactuner.chat.ChatStats`) and ``.close()``,
exactly like :class:`mactuner.chat.ChatStream`. The prompt is built by the torch engine's own code
(chat template, system prompt, oldest turns dropped when too long), generation is mlx-lm's
``stream_generate``: greedy at temperature 0, else temperature, top-k 50 and top-p.

The Chat page uses it where ``engine: auto`` picks MLX (an Apple-silicon Mac with MLX installed);
the torch engine stays the default elsewhere.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mactuner.adapters import base_model_for, check_adapter
from mactuner.chat.engine import ChatStats, GenerationSettings, Message, _fit_history, _render_ids, build_messages
from mactuner.chat.llamacpp import _StopStrings


def mlx_chat_wanted() -> bool:
    """Whether chat runs on MLX here: where ``engine: auto`` trains with MLX (Apple silicon, MLX installed)."""
    from mactuner.training.engines import choose_engine

    return choose_engine("auto", "lora").engine == "mlx"


@dataclass
class MLXChatModel:
    """A model loaded with MLX for chatting (adapter applied)."""

    model: Any  # mlx.nn.Module
    tokenizer: Any  # the transformers tokenizer (the torch engine's)
    source: str
    path: Path
    max_positions: int
    eos_ids: set[int]
    device: str = "mlx"

    def close(self) -> None:
        """Drop the weights now."""
        self.model = None


def load_mlx_chat_model(source: str | None = None, adapter: str | os.PathLike | None = None,
                        *, trust_remote_code: bool = False) -> MLXChatModel:
    """Load ``source`` (or the adapter's recorded base) with MLX, with ``adapter`` applied.

    Raises:
        FileNotFoundError: the adapter folder is not a PEFT adapter.
        ValueError: MLX cannot build the model, or the adapter is not a LoRA adapter of it.
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    from mactuner.models import model_path

    adapter_path = check_adapter(adapter) if adapter else None
    base = base_model_for(source, adapter_path)
    resolved, folder = model_path(base)
    if resolved.kind == "hub":
        from huggingface_hub import snapshot_download

        folder = snapshot_download(folder)
    folder = Path(folder)
    model, config = load_model(folder, trust_remote_code=trust_remote_code)
    label = resolved.source
    if adapter_path is not None:
        mlx_files = adapter_path / "mlx"
        if (mlx_files / "adapters.safetensors").is_file():
            from mlx_lm.tuner.utils import load_adapters

            load_adapters(model, str(mlx_files))
        else:
            load_peft_adapter(model, adapter_path)
        label = f"{label} + {adapter_path}"
    model.eval()
    mx.eval(model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    eos = config.get("eos_token_id")
    eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
    if tokenizer.eos_token_id is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    return MLXChatModel(model, tokenizer, label, folder, int(config.get("max_position_embeddings") or 1 << 30), eos_ids,
                        device=f"mlx ({mx.default_device()})")


def load_peft_adapter(model: Any, folder: Path) -> None:
    """Apply a PEFT LoRA adapter folder to an mlx-lm model (as mlx-lm LoRA layers)."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{folder}: only plain LoRA adapters can be used with MLX (this one is {config.get('peft_type')}).")
    weights = mx.load(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model."
    converted, names = {}, set()
    for key, value in weights.items():
        path, kind = key[len(prefix):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        converted[f"{path}.{ {'lora_A': 'lora_a', 'lora_B': 'lora_b'}[kind] }"] = value.T
        names.add(path)
    layer_keys = {p.split(".", 3)[3] for p in names if p.startswith("model.layers.")}
    top_keys = {p for p in names if not p.startswith("model.layers.")}
    rank = int(config["r"])
    linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": float(config["lora_alpha"]) / rank,
                                                     "dropout": 0.0, "keys": sorted(layer_keys | top_keys)})
    model.load_weights(list(converted.items()), strict=False)


class MLXChatStream:
    """An answer being generated by MLX: iterate for text pieces; ``stats`` fills in as it goes
    (the contract of :class:`mactuner.chat.ChatStream`)."""

    def __init__(self, loaded: MLXChatModel, messages: list[Message], settings: GenerationSettings):
        if loaded.model is None:
            raise RuntimeError("this MLX model was closed; load it again")
        self.settings = settings
        self.stats = ChatStats()
        self.text = ""
        self.token_ids: list[int] = []
        self._started = time.perf_counter()
        self._loaded = loaded
        self._ids = encode_mlx_prompt(loaded, messages, settings)
        self.stats.prompt_tokens = len(self._ids)
        self._pieces = self._generate()

    def _generate(self) -> Iterator[str]:
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        loaded, stats, settings = self._loaded, self.stats, self.settings
        sampler = make_sampler(0.0 if settings.greedy else float(settings.temperature), top_p=float(settings.top_p), top_k=50)
        wrapper = TokenizerWrapper(loaded.tokenizer, eos_token_ids=sorted(loaded.eos_ids))
        stops = _StopStrings(settings.stop)
        first_at = last_at = None
        responses = stream_generate(loaded.model, wrapper, self._ids, max_tokens=settings.max_new_tokens, sampler=sampler)
        try:
            for response in responses:
                last_at = time.perf_counter()
                if first_at is None:
                    first_at = last_at
                    stats.time_to_first_token = first_at - self._started
                stats.new_tokens = response.generation_tokens
                # the last response carries the end token ("stop", not part of the answer) or the last one ("length")
                if response.finish_reason in (None, "length"):
                    self.token_ids.append(int(response.token))
                piece = stops.feed(response.text, end=response.finish_reason is not None)
                if piece:
                    self.text += piece
                    yield piece
                if stops.stopped:
                    stats.finish_reason = "stop"
                    break
                if response.finish_reason is not None:
                    stats.finish_reason = response.finish_reason
        finally:
            responses.close()
            stats.total_seconds = time.perf_counter() - self._started
            if first_at is not None and last_at is not None and stats.new_tokens > 1 and last_at > first_at:
                stats.tokens_per_second = (stats.new_tokens - 1) / (last_at - first_at)
            if stats.finish_reason is None:
                stats.finish_reason = "cancelled"

    def __iter__(self) -> MLXChatStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (the answer so far stays in ``text``)."""
        self._pieces.close()


def encode_mlx_prompt(loaded: MLXChatModel, messages: list[Message], settings: GenerationSettings) -> list[int]:
    """The torch engine's prompt ids (chat template, system prompt, oldest turns dropped when too long)."""
    conversation = build_messages(messages, settings)
    if not conversation:
        raise ValueError("there is no message to answer")
    budget = loaded.max_positions - settings.max_new_tokens
    ids = _render_ids(loaded.tokenizer, conversation)
    if len(ids) > budget and len(conversation) > 1:
        ids = _fit_history(loaded.tokenizer, conversation, budget)
    return ids[-max(budget, 1):] if len(ids) > budget else list(ids)


def stream_mlx_chat(loaded: MLXChatModel, messages: list[Message], settings: GenerationSettings | None = None) -> MLXChatStream:
    """Start answering ``messages`` with MLX; iterate the stream for text pieces."""
    return MLXChatStream(loaded, messages, settings or GenerationSettings())
