"""Retrieval-augmented generation: document collections, a persistent vector index, and asking with sources.

The package reads top to bottom in the order the data flows (each module imports
only the ones above it; none imports this ``__init__``):

    base.py        RagError, the Progress callback type
    extract.py     file bytes → text (txt/md, html, pdf), safe file and collection names
    chunking.py    text → overlapping chunks (TextSpan) and sentences
    embedder.py    chunks → unit vectors (Embedder, the built-in all-MiniLM-L6-v2)
    index.py       exact / IVF inner-product search (VectorIndex, kmeans)
    collection.py  the folder on disk: documents, chunks, vectors, search (Collection)
    prompt.py      the prompt, the streamed answer and its evidence (ask, RagAnswer)

Every public name is importable from ``mactuner.rag`` as before the split.
"""

from mactuner.rag.base import Progress, RagError
from mactuner.rag.chunking import TextSpan, split_sentences, split_text
from mactuner.rag.collection import (
    CENTROIDS_FILE,
    STAGING_GRACE_SECONDS,
    AddReport,
    Collection,
    DocumentInfo,
    IndexSettings,
    SearchHit,
    Source,
    document_rows,
    documents_summary,
    list_collections,
    sources_to_index,
)
from mactuner.rag.embedder import (
    DEFAULT_EMBEDDING_MODEL,
    Embedder,
    default_embedding_model_path,
    load_embedder,
)
from mactuner.rag.extract import (
    SUPPORTED_SUFFIXES,
    DocumentError,
    ExtractedText,
    extract_text,
    safe_collection_name,
    safe_filename,
)
from mactuner.rag.index import VectorIndex, kmeans
from mactuner.rag.prompt import (
    ANSWER_CUE,
    RAG_SYSTEM_PROMPT,
    Evidence,
    RagAnswer,
    answer_warning,
    ask,
    best_sentence,
    build_rag_messages,
    content_words,
    escape_document,
    evidence_note,
    overlaps_source,
    quotes_source,
    source_title,
    support_note,
    tokenizer_special_tokens,
)

__all__ = [
    "ANSWER_CUE", "CENTROIDS_FILE", "DEFAULT_EMBEDDING_MODEL", "RAG_SYSTEM_PROMPT", "STAGING_GRACE_SECONDS", "SUPPORTED_SUFFIXES",
    "AddReport", "Collection", "DocumentError", "DocumentInfo", "Embedder", "Evidence", "ExtractedText",
    "IndexSettings", "Progress", "RagAnswer", "RagError", "SearchHit", "Source", "TextSpan", "VectorIndex",
    "ask", "best_sentence", "build_rag_messages", "content_words", "default_embedding_model_path", "document_rows",
    "answer_warning", "documents_summary", "escape_document", "evidence_note", "extract_text", "kmeans", "list_collections", "load_embedder",
    "overlaps_source", "safe_collection_name", "safe_filename", "source_title", "sources_to_index", "split_sentences",
    "quotes_source", "split_text", "support_note", "tokenizer_special_tokens",
]
