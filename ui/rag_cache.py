"""What the RAG page keeps between reruns and tabs: the embedding model and the open collections.
Not a page itself.

The library keeps a collection's search index inside its ``Collection`` object
(rebuilt only when the documents change); caching the objects here is what lets
a rerun search 100k chunks without re-reading and re-partitioning them.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from mactuner import paths, rag


@st.cache_resource(show_spinner="Loading the embedding model…", max_entries=2)
def embedder(model: str, device: str) -> rag.Embedder:
    """The embedding model on ``device``, loaded once per process."""
    return rag.load_embedder(model, device=device)


@st.cache_resource(show_spinner=False, max_entries=8)
def _open(folder: str, stamp: tuple[int, int, int]) -> rag.Collection:
    # ``folder`` and ``stamp`` are only the cache key: a collection deleted and created again under
    # the same name has a new collection.json, so a new stamp, so a fresh object with its own settings
    return rag.Collection.open(Path(folder).name, root=Path(folder).parent)


def open_collection(name: str) -> rag.Collection:
    """The shared ``Collection`` object for ``name`` (raises ``RagError`` if there is none)."""
    folder = paths.rag_dir() / rag.safe_collection_name(name)
    try:
        stat = (folder / "collection.json").stat()
    except FileNotFoundError:
        return rag.Collection.open(name)  # raises the library's message, naming the collections there are
    return _open(str(folder), (stat.st_ino, stat.st_mtime_ns, stat.st_size))
