"""Chat models shared by the chat and RAG pages: one copy of a model in memory,
released when the person switches device. Not a page itself."""

from __future__ import annotations

import streamlit as st

from mactuner.chat import load_chat_model, release_model
from mactuner.devices import dtype_name, get_optimal_dtype

MAX_MODELS = 2  # chat and RAG models held at once: base + fine-tuned for compare mode


@st.cache_resource(show_spinner=False)
def model_cache() -> dict:
    """App-wide loaded models by (model, adapter, device, dtype), oldest first.

    A plain dict held by st.cache_resource rather than a cached loader: the
    loader draws a progress bar, and a cached function may not draw.
    """
    return {}


def loaded_model(model: str, adapter: str, device, label: str):
    """The cached model, loaded with a progress bar the first time; the oldest is dropped past MAX_MODELS."""
    cache = model_cache()
    key = (model, adapter, str(device), dtype_name(get_optimal_dtype(device)))
    if key not in cache:
        bar = st.progress(0.0, text=f"{label}: loading…")
        try:
            loaded = load_chat_model(model or None, adapter or None, device=device,
                                     progress=lambda message, f: bar.progress(0.5 if f is None else f, text=f"{label}: {message}"))
        finally:
            bar.empty()
        while len(cache) >= MAX_MODELS:
            release_model(cache.pop(next(iter(cache))))
        cache[key] = loaded
    return cache[key]


def release_on_device_switch(device) -> None:
    """Drop every cached model when the device changes, so the old copies' memory goes back."""
    if st.session_state.get("models_device") not in (None, str(device)):
        cache = model_cache()
        while cache:
            release_model(cache.pop(next(iter(cache))))
    st.session_state["models_device"] = str(device)
