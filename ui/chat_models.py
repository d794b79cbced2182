"""Chat models shared by the chat and RAG pages: one copy of a model in memory,
released when the person switches device. Not a page itself.

Base + adapter runs on the torch engine, or on MLX where ``engine: auto`` picks MLX (an
Apple-silicon Mac with MLX installed, :mod:`mactuner.chat.mlx`). A chat "adapter" may also be a ``.gguf`` file
(answered by llama.cpp, :mod:`mactuner.chat.llamacpp`), a merged or quantized variant
folder, or a full fine-tuning run's model folder (both through ``quantize.load_variant``).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from mactuner.adapters import is_adapter
from mactuner.chat import load_chat_model, stream_chat
from mactuner.chat.mlx import mlx_chat_wanted
from mactuner.devices import dtype_name, get_optimal_dtype
from mactuner.models import release_model

MAX_MODELS = 2  # chat and RAG models held at once: base + fine-tuned for compare mode


@st.cache_resource(show_spinner=False)
def model_cache() -> dict:
    """App-wide loaded models by (model, adapter, device, dtype), oldest first.

    A plain dict held by st.cache_resource rather than a cached loader: the
    loader draws a progress bar, and a cached function may not draw.
    """
    return {}


def _load(model: str, adapter: str, device, progress):
    path = Path(adapter) if adapter else None
    if path is not None and path.suffix.lower() == ".gguf":
        from mactuner.chat.llamacpp import load_gguf_chat_model

        progress("loading the GGUF file in llama.cpp…", None)
        return load_gguf_chat_model(path, device=device)
    if path is not None and path.is_dir() and not is_adapter(path):
        from mactuner.quantize import load_variant

        progress(f"loading {path.name}…", None)
        return load_variant(path, device=device)
    if mlx_chat_wanted():
        from mactuner.chat.mlx import load_mlx_chat_model

        progress("loading the model with MLX…", None)
        return load_mlx_chat_model(model or None, adapter or None)
    return load_chat_model(model or None, adapter or None, device=device, progress=progress)


def _release(loaded) -> None:
    from mactuner.chat.llamacpp import GGUFModel
    from mactuner.chat.mlx import MLXChatModel

    if isinstance(loaded, (GGUFModel, MLXChatModel)):
        loaded.close()  # llama.cpp frees its model and context at once; MLX drops its arrays
    else:
        release_model(loaded)


def loaded_model(model: str, adapter: str, device, label: str):
    """The cached model, loaded with a progress bar the first time; the one used least lately is dropped past
    MAX_MODELS (so Compare's two models, taken one after the other, never drop each other)."""
    cache = model_cache()
    key = (model, adapter, str(device), dtype_name(get_optimal_dtype(device)))
    if key in cache:
        cache[key] = cache.pop(key)  # now the latest used
    else:
        bar = st.progress(0.0, text=f"{label}: loading…")
        try:
            loaded = _load(model, adapter, device,
                           progress=lambda message, f: bar.progress(0.5 if f is None else f, text=f"{label}: {message}"))
        finally:
            bar.empty()
        while len(cache) >= MAX_MODELS:
            _release(cache.pop(next(iter(cache))))
        cache[key] = loaded
    return cache[key]


def answer_stream(loaded, messages, settings):
    """A streaming answer from either engine (the same ``text`` / ``stats`` / ``close()`` interface)."""
    from mactuner.chat.llamacpp import GGUFModel, stream_gguf_chat
    from mactuner.chat.mlx import MLXChatModel, stream_mlx_chat

    if isinstance(loaded, GGUFModel):
        return stream_gguf_chat(loaded, messages, settings)
    if isinstance(loaded, MLXChatModel):
        return stream_mlx_chat(loaded, messages, settings)
    return stream_chat(loaded, messages, settings)


def release_on_device_switch(device) -> None:
    """Drop every cached model when the device changes, so the old copies' memory goes back."""
    if st.session_state.get("models_device") not in (None, str(device)):
        cache = model_cache()
        while cache:
            _release(cache.pop(next(iter(cache))))
    st.session_state["models_device"] = str(device)
