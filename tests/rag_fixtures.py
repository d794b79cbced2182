"""Fixtures shared by the RAG tests: a tiny real sentence-transformers embedder.

``tests/conftest.py`` registers these fixtures for every test module (``pytest_plugins``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory) -> Path:
    """A 1-layer, 32-wide BERT with MiniLM's real tokenizer, mean pooling and normalisation, saved as a
    sentence-transformers folder: a real embedder that loads and runs in a blink."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mactuner.rag import default_embedding_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_embedding_model_path())
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=512))
    raw = tmp_path_factory.mktemp("tiny-bert")
    bert.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    model = SentenceTransformer(modules=[Transformer(str(raw), max_seq_length=256), Pooling(32, "mean"), Normalize()],
                                device="cpu")
    folder = tmp_path_factory.mktemp("tiny-embedder")
    model.save(str(folder))
    return folder


def pdf_file(objects: list[bytes]) -> bytes:
    """A PDF file from its numbered objects' bodies (object 1 is the catalog), with a valid xref table."""
    import io

    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()
