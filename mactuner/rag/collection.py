"""Collections: named sets of documents with their chunks and embeddings, persisted under one folder.

A *collection* is a folder under ``paths.rag_dir()``::

    COLLECTION/collection.json               name, IndexSettings, embedding model and dimension
    COLLECTION/documents/DOC_ID/document.json   one document: its (safe) name, size, sha256, chunk count
    COLLECTION/documents/DOC_ID/chunks.jsonl    one JSON object per chunk: text and position
    COLLECTION/documents/DOC_ID/embeddings.npy  float32 [chunks, dim], unit length, row i = chunk i
    COLLECTION/documents/DOC_ID/<safe name>     a copy of the original file
    COLLECTION/ivf_centroids.npy                partition centroids of a large collection (a cache:
                                                checked on load, rebuilt from the embeddings when stale
                                                or damaged)

Every document is written to a hidden staging folder and renamed into place
(:func:`mactuner.fileio.write_folder_atomically`), so a crash never leaves half
a document; staging folders a crash left behind are removed when the collection
is next opened. Adding a document never touches (or re-embeds) the others, and
removing one deletes its folder. Nothing is pickled.

A ``Collection`` object keeps its search index in memory (rebuilt only when the
list of documents changes, whoever changed it): a UI keeps one object per
collection (the RAG page caches them with ``st.cache_resource``) instead of
re-reading the vectors on every rerun.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from mactuner import paths
from mactuner.devices.memory import format_bytes
from mactuner.fileio import (
    STAGING_PREFIX,
    atomic_open,
    write_folder_atomically,
    write_json_atomic,
)
from mactuner.fileio import (
    inside as fileio_inside,
)
from mactuner.rag.base import Progress, RagError
from mactuner.rag.chunking import split_text
from mactuner.rag.embedder import DEFAULT_EMBEDDING_MODEL, Embedder
from mactuner.rag.extract import (
    SUPPORTED_SUFFIXES,
    DocumentError,
    extract_text,
    safe_collection_name,
    safe_filename,
)
from mactuner.rag.index import VectorIndex

STAGING_GRACE_SECONDS = 3600.0  # a staging folder this old is a crash's leftover even if its pid is alive again
CENTROIDS_FILE = "ivf_centroids.npy"


@dataclass
class IndexSettings:
    """How a collection cuts and indexes its documents (stored in ``collection.json``)."""

    chunk_size: int = field(default=800, metadata={"help": "characters per chunk; larger keeps more context per hit, "
                                                            "but past ~1100 MiniLM's 256-piece window truncates it"})
    chunk_overlap: int = field(default=120, metadata={"help": "characters shared by neighbouring chunks, so a fact "
                                                               "cut at a boundary is whole in one of them"})
    embedding_model: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "sentence-transformers model: "
                                                                            "the built-in name, a folder or a hub id"})
    max_file_bytes: int = field(default=50 * 1024 * 1024, metadata={"help": "larger files are refused with a message"})
    ivf_threshold: int = field(default=20_000, metadata={"help": "chunk count from which search uses the IVF index "
                                                                "instead of an exact scan"})
    nprobe: int | None = field(default=None, metadata={"help": "IVF partitions scanned per query; None = chosen "
                                                               "from the collection size (more: better recall, slower)"})

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 50:
            raise ValueError(f"chunk_size must be an integer of at least 50 characters, got {self.chunk_size!r}")
        if not isinstance(self.chunk_overlap, int) or not 0 <= self.chunk_overlap <= self.chunk_size // 2:
            raise ValueError(
                f"chunk_overlap must be between 0 and half the chunk size ({self.chunk_size // 2}), got {self.chunk_overlap!r}"
            )
        if not isinstance(self.max_file_bytes, int) or self.max_file_bytes <= 0:
            raise ValueError(f"max_file_bytes must be positive, got {self.max_file_bytes!r}")
        if not isinstance(self.ivf_threshold, int) or self.ivf_threshold < 1:
            raise ValueError(f"ivf_threshold must be a positive integer, got {self.ivf_threshold!r}")
        if self.nprobe is not None and (not isinstance(self.nprobe, int) or self.nprobe < 1):
            raise ValueError(f"nprobe must be a positive integer or None, got {self.nprobe!r}")
        if not self.embedding_model or not isinstance(self.embedding_model, str):
            raise ValueError(f"embedding_model must name a model, got {self.embedding_model!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSettings:
        """Inverse of :meth:`to_dict`; unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown index settings: {', '.join(unknown)}")
        return cls(**data)


DOCUMENT_ID = re.compile(r"[0-9a-f]{12}")  # what _add_document names a document (and its folder)


@dataclass
class DocumentInfo:
    """One indexed document (``document.json``)."""

    id: str
    name: str  # the safe display name (also the stored file's name)
    original_name: str  # as uploaded; shown, never used as a path
    kind: str  # text, pdf or html
    size: int  # bytes
    sha256: str
    characters: int
    chunks: int
    added_at: float
    pages: int | None = None


@dataclass
class SearchHit:
    """One retrieved chunk with its cosine similarity to the question."""

    score: float
    document_id: str
    file: str
    chunk: int  # index of the chunk within its document
    start: int  # character offsets in the document's text
    end: int
    line: int  # 1-based line of the chunk's start
    page: int | None  # 1-based PDF page, else None
    text: str

    @property
    def position(self) -> str:
        """Where the chunk is, in words: ``"page 3, chunk 7"`` or ``"line 12, chunk 0"``."""
        where = f"page {self.page}" if self.page else f"line {self.line}"
        return f"{where}, chunk {self.chunk}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``position`` included."""
        return {**asdict(self), "position": self.position}


@dataclass
class AddReport:
    """What :meth:`Collection.add` did: the documents added and the files skipped, with reasons."""

    added: list[DocumentInfo] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, message)
    chunks_embedded: int = 0


Source = Path | str | tuple[str, bytes]  # a file or folder path, or an upload: (name, bytes)

def sources_to_index(uploads: list[tuple[str, bytes]], folder: str | None = None) -> list[Source]:
    """What to hand :meth:`Collection.add`: the uploads (name, bytes), then ``folder`` when one is named.

    Raises:
        ValueError: ``folder`` names no folder on this machine.
    """
    sources: list[Source] = list(uploads)
    if folder:
        if not Path(folder).expanduser().is_dir():
            raise ValueError(f"No folder at {folder}.")
        sources.append(Path(folder))
    return sources


def document_rows(docs: list[DocumentInfo]) -> list[dict[str, Any]]:
    """One row per document for the documents table: its name as uploaded, type, chunks, size in KB and id."""
    return [{"document": d.original_name, "type": d.kind, "chunks": d.chunks, "KB": round(d.size / 1024, 1), "id": d.id}
            for d in docs]


def documents_summary(docs: list[DocumentInfo], settings: IndexSettings) -> str:
    """``3 documents · 41 chunks · chunks of 800 characters, overlap 120``."""
    from mactuner.display import plural

    return (f"{plural(len(docs), 'document')} · {plural(sum(d.chunks for d in docs), 'chunk')} · chunks of "
            f"{settings.chunk_size} characters, overlap {settings.chunk_overlap}")


def list_collections(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the collections under ``root`` (default ``paths.rag_dir()``), sorted."""
    root = Path(root) if root else paths.rag_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "collection.json").is_file())


class Collection:
    """A named set of documents with their chunks and embeddings, persisted under one folder.

    Open or create one with :meth:`open` / :meth:`create`;
    a new ``Collection`` object on the same folder (another process, after a
    restart) sees exactly what was saved.
    """

    def __init__(self, folder: Path, name: str, settings: IndexSettings, dimension: int | None):
        self.folder = folder
        self.name = name
        self.settings = settings
        self.dimension = dimension
        self._rows: list[dict[str, Any]] | None = None  # chunk records, aligned with _matrix
        self._matrix: np.ndarray | None = None
        self._index: VectorIndex | None = None
        self._signature: tuple | None = None  # what _index was built from
        self._loaded_docs: tuple[str, ...] | None = None  # the documents _rows/_matrix hold
        self._lock = threading.RLock()  # one object may serve several threads (browser tabs)
        self.problems: list[str] = []  # damaged documents left out of search, and repairs made, in words
        self._unreadable: set[str] = set()  # folders under documents/ whose document.json cannot be read

    # -- opening

    @staticmethod
    def _folder(name: str, root) -> Path:
        root = Path(root) if root else paths.rag_dir()
        return root / safe_collection_name(name)

    @classmethod
    def create(cls, name: str, settings: IndexSettings | None = None, *, root=None) -> Collection:
        """Make a new, empty collection. Raises ``RagError`` if it exists."""
        folder = cls._folder(name, root)
        if (folder / "collection.json").exists():
            raise RagError(f"a collection named {folder.name!r} already exists")
        settings = settings or IndexSettings()
        (folder / "documents").mkdir(parents=True, exist_ok=True)
        collection = cls(folder, folder.name, settings, None)
        collection._save_meta()
        return collection

    @classmethod
    def open(cls, name: str, *, root=None) -> Collection:
        """Open an existing collection. Raises ``RagError`` if there is none by that name."""
        folder = cls._folder(name, root)
        meta_file = folder / "collection.json"
        if not meta_file.is_file():
            known = ", ".join(list_collections(root)) or "none yet"
            raise RagError(f"no collection named {folder.name!r} (collections: {known})")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        collection = cls(folder, meta["name"], IndexSettings.from_dict(meta["settings"]), meta.get("dimension"))
        collection.clean_stale_staging()
        return collection

    def _save_meta(self) -> None:
        write_json_atomic(self.folder / "collection.json", {
            "name": self.name, "settings": self.settings.to_dict(), "dimension": self.dimension,
        })

    def delete(self) -> None:
        """Remove the whole collection from disk."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- documents

    def documents(self) -> list[DocumentInfo]:
        """The documents, oldest first."""
        docs = []
        for meta in (self.folder / "documents").glob("*/document.json"):
            if meta.parent.name.startswith("."):  # a document still being written (or left by a crash)
                continue
            try:
                info = DocumentInfo(**json.loads(meta.read_text(encoding="utf-8")))
                # the id names the folder that Remove deletes: only MacTuner's own ids, equal to the
                # folder's own name, are believed (a planted "../../elsewhere" is not a document)
                if not (DOCUMENT_ID.fullmatch(meta.parent.name) and info.id == meta.parent.name):
                    raise ValueError("the id is not its folder's name")
                docs.append(info)
            except (OSError, ValueError, TypeError):  # unreadable: left out, and named by the next load
                self._unreadable.add(meta.parent.name)
        return sorted(docs, key=lambda d: (d.added_at, d.id))

    @property
    def chunk_count(self) -> int:
        """How many chunks the collection holds."""
        return sum(d.chunks for d in self.documents())

    def add(self, sources: Iterable[Source], embedder: Embedder, *, progress: Progress | None = None) -> AddReport:
        """Index files, folders (recursively) and uploads; existing documents are left as they are.

        A file that is too large, of an unsupported type, unreadable or already in
        the collection is skipped with a message in ``AddReport.skipped``; the rest go on.

        Raises:
            RagError: ``embedder`` is not the model this collection was indexed with.
        """
        self.check_embedder(embedder)
        report = AddReport()
        items = list(self._expand(sources, report))
        known = {(d.sha256, d.name) for d in self.documents()}
        for number, (display, loader) in enumerate(items):
            step = f"[{number + 1}/{len(items)}] {display}"

            def scaled(message: str, fraction: float | None, _n=number) -> None:
                if progress:
                    done = None if fraction is None else (_n + fraction) / len(items)
                    progress(f"[{_n + 1}/{len(items)}] {message}", done)

            try:
                if progress:
                    progress(f"{step}: reading", number / len(items))
                data = loader()
                name = safe_filename(display)
                digest = hashlib.sha256(data).hexdigest()
                if (digest, name) in known:
                    raise DocumentError(f"{display}: already in the collection")
                info = self._add_document(display, name, data, digest, embedder, scaled)
            except DocumentError as exc:
                report.skipped.append((display, str(exc)))
                continue
            known.add((info.sha256, info.name))
            report.added.append(info)
            report.chunks_embedded += info.chunks
        if progress:
            progress(f"Done: {len(report.added)} added, {len(report.skipped)} skipped", 1.0)
        return report

    def _expand(self, sources: Iterable[Source], report: AddReport) -> Iterator[tuple[str, Callable[[], bytes]]]:
        """``(display name, read bytes)`` for every file to add; folders are walked, odd entries reported."""
        limit = self.settings.max_file_bytes

        def reader(path: Path, display: str) -> Callable[[], bytes]:
            def read() -> bytes:
                size = path.stat().st_size
                if size > limit:
                    raise DocumentError(f"{display}: {format_bytes(size)} is over the {format_bytes(limit)} limit")
                try:
                    return path.read_bytes()
                except OSError as exc:
                    raise DocumentError(f"{display}: cannot read the file ({exc.strerror or exc})") from exc
            return read

        for source in sources:
            if isinstance(source, tuple):
                upload_name, data = source

                def upload(d=data, n=upload_name) -> bytes:
                    if len(d) > limit:
                        raise DocumentError(f"{n}: {format_bytes(len(d))} is over the {format_bytes(limit)} limit")
                    return bytes(d)
                yield str(upload_name), upload
                continue
            path = Path(source).expanduser()
            if path.is_dir():
                for file in _folder_files(path, report):
                    display = str(file.relative_to(path))
                    if file.suffix.lower() not in SUPPORTED_SUFFIXES:
                        report.skipped.append((display, f"{display}: unsupported file type, skipped"))
                        continue
                    yield display, reader(file, display)
            elif path.is_file():
                yield path.name, reader(path, path.name)
            else:
                report.skipped.append((str(source), f"{source}: no such file or folder"))

    def _add_document(self, display: str, name: str, data: bytes, digest: str, embedder: Embedder,
                      progress: Progress) -> DocumentInfo:
        if len(data) > self.settings.max_file_bytes:
            raise DocumentError(f"{display}: {format_bytes(len(data))} is over the {format_bytes(self.settings.max_file_bytes)} limit")
        try:
            extracted = extract_text(data, display)
        except DocumentError:
            raise
        except Exception as exc:
            raise DocumentError(f"{display}: cannot read this file ({type(exc).__name__}: {exc})") from exc
        text = extracted.text
        spans = split_text(text, self.settings.chunk_size, self.settings.chunk_overlap)
        if not spans:
            raise DocumentError(f"{display}: no text found")
        kind = SUPPORTED_SUFFIXES[Path(display).suffix.lower()]
        vectors = embedder.embed([s.text for s in spans], progress=progress, label=f"embedding {display}")
        newlines = [m.start() for m in re.finditer("\n", text)]
        doc_id = uuid.uuid4().hex[:12]
        info = DocumentInfo(
            id=doc_id, name=name, original_name=display, kind=kind, size=len(data), sha256=digest,
            characters=len(text), chunks=len(spans), added_at=time.time(),
            pages=len(extracted.page_starts) if kind == "pdf" else None,
        )
        rows = []
        for i, span in enumerate(spans):
            page = bisect.bisect_right(extracted.page_starts, span.start) if extracted.page_starts else None
            rows.append({"chunk": i, "start": span.start, "end": span.end,
                         "line": bisect.bisect_left(newlines, span.start) + 1, "page": page, "text": span.text})
        # everything goes into a hidden staging folder first (named with this writer's pid, so a
        # crash's leftover can be told from a live writer's), then one rename makes it visible
        def fill(staging: Path) -> None:
            stored = (staging / name).resolve()
            if stored.parent != staging.resolve():  # belt and braces: the safe name cannot leave the folder
                raise DocumentError(f"{display}: refused file name")
            stored.write_bytes(data)
            with open(staging / "chunks.jsonl", "w", encoding="utf-8") as out:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            with open(staging / "embeddings.npy", "wb") as out:
                np.save(out, vectors, allow_pickle=False)
            write_json_atomic(staging / "document.json", asdict(info))

        write_folder_atomically(self.folder / "documents" / doc_id, fill, replace=False)
        if self.dimension is None:
            self.dimension = int(vectors.shape[1])
            self._save_meta()
        with self._lock:
            if self._rows is not None:  # keep the in-memory copy current without reloading the others
                # new objects, not in-place changes: a search in another thread may hold the old ones
                self._rows = self._rows + [{**row, "document_id": doc_id, "file": name} for row in rows]
                self._matrix = np.concatenate([self._matrix, vectors]) if len(self._matrix) else vectors
                self._loaded_docs = (*(self._loaded_docs or ()), doc_id)
                self._index = None
        return info

    def remove(self, document: str) -> DocumentInfo:
        """Remove a document by id or by name; its chunks and vectors go with it.

        Raises:
            RagError: no document has that id or name, or the name is ambiguous.
        """
        docs = self.documents()
        matches = [d for d in docs if d.id == document] or [d for d in docs if document in (d.name, d.original_name)]
        if not matches:
            raise RagError(f"no document {document!r} in collection {self.name!r}")
        if len(matches) > 1:
            raise RagError(f"{len(matches)} documents are named {document!r}; remove one by id "
                           f"({', '.join(d.id for d in matches)})")
        folder = self.folder / "documents" / matches[0].id
        if folder.is_symlink() or folder.resolve().parent != (self.folder / "documents").resolve():
            raise RagError(f"{matches[0].name}: its folder is not inside collection {self.name!r}; nothing removed")
        shutil.rmtree(folder)
        with self._lock:
            self._rows = self._matrix = self._index = None
        return matches[0]

    # -- search

    def check_embedder(self, embedder: Embedder) -> None:
        """Refuse an embedder other than the one this collection was indexed with (name and dimension)."""
        if embedder.name != self.settings.embedding_model:
            raise RagError(f"collection {self.name!r} is indexed with {self.settings.embedding_model!r}, "
                           f"not {embedder.name!r}; load that embedding model")
        if self.dimension is not None and embedder.dimension != self.dimension:
            raise RagError(f"collection {self.name!r} holds {self.dimension}-dimensional vectors, "
                           f"the embedder makes {embedder.dimension}")

    def _load(self) -> tuple[str, ...]:
        """Read every document's chunks and vectors; a damaged document is left out and named in ``problems``."""
        self._unreadable = set()
        rows, blocks, problems, docs = [], [], [], self.documents()
        problems.extend(f"documents/{folder}/document.json cannot be read; the document is left out of search "
                        f"(delete that folder and add the file again)" for folder in sorted(self._unreadable))
        for doc in docs:
            folder = self.folder / "documents" / doc.id
            try:
                vectors = np.load(folder / "embeddings.npy", allow_pickle=False)
                with open(folder / "chunks.jsonl", encoding="utf-8") as lines:
                    chunk_rows = [json.loads(line) for line in lines]
                if vectors.ndim != 2 or len(chunk_rows) != vectors.shape[0] or (
                        blocks and vectors.shape[1] != blocks[0].shape[1]):
                    raise ValueError(f"{len(chunk_rows)} chunks but vectors of shape {tuple(vectors.shape)}")
            except (OSError, ValueError, EOFError) as exc:
                problems.append(f"document {doc.original_name!r} ({doc.id}) is damaged and left out of search "
                                f"({exc}); remove it and add it again")
                continue
            rows.extend({**row, "document_id": doc.id, "file": doc.name} for row in chunk_rows)
            blocks.append(vectors.astype(np.float32, copy=False))
        self._rows = rows
        self._matrix = np.concatenate(blocks) if blocks else np.zeros((0, self.dimension or 0), np.float32)
        self.problems = problems
        return tuple(d.id for d in docs)

    def _saved_centroids(self, dimension: int) -> np.ndarray | None:
        """The saved IVF centroids, or None when missing or unusable (truncated, wrong shape, not unit length)."""
        path = self.folder / CENTROIDS_FILE
        if not path.exists():
            return None
        try:
            centroids = np.load(path, allow_pickle=False)
            if centroids.ndim != 2 or centroids.shape[1] != dimension or not len(centroids):
                raise ValueError(f"shape {tuple(centroids.shape)}, expected (k, {dimension})")
            if not np.isfinite(centroids).all() or not np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-3):
                raise ValueError("the rows are not unit vectors")
        except (OSError, ValueError, EOFError) as exc:
            self.problems.append(f"{CENTROIDS_FILE} was damaged ({exc}); rebuilt from the stored embeddings")
            return None
        return centroids

    def index(self, device: str | torch.device = "cpu") -> VectorIndex:
        """The search index over every chunk, built (or reused) for ``device``.

        The object keeps the index it built and reuses it until the list of
        documents on disk changes (an add or remove by anyone, another process
        included), so keep one ``Collection`` object per collection (a UI caches
        it) rather than opening a new one per query. IVF centroids are saved next
        to the documents; a missing, stale or damaged centroid file is rebuilt
        from the stored embeddings.
        """
        return self._current(device)[1]

    def _current(self, device: str | torch.device) -> tuple[list[dict[str, Any]], VectorIndex]:
        """The chunk rows and the index built over them, taken together (consistent under concurrent adds)."""
        device = torch.device(device)
        docs = tuple(d.id for d in self.documents())
        signature = (docs, self.settings.ivf_threshold, self.settings.nprobe)
        with self._lock:
            if self._index is not None and self._index.device == device and self._signature == signature:
                return self._rows, self._index
            if self._rows is None or self._loaded_docs != docs:
                self._loaded_docs = self._load()
            dimension = int(self._matrix.shape[1]) if self._matrix.ndim == 2 else 0
            centroids = self._saved_centroids(dimension) if len(self._matrix) >= self.settings.ivf_threshold else None
            index = VectorIndex(self._matrix, ivf_threshold=self.settings.ivf_threshold,
                                nprobe=self.settings.nprobe, centroids=centroids, device=device)
            if index.kind == "ivf" and (centroids is None or len(centroids) != len(index.centroids)
                                        or not np.array_equal(centroids, index.centroids.numpy())):
                # k-means takes seconds at 100k chunks: keep the centroids for the next load
                with atomic_open(self.folder / CENTROIDS_FILE, "wb") as out:
                    np.save(out, index.centroids.numpy(), allow_pickle=False)
            self._index, self._signature = index, signature
            return self._rows, index

    def search(self, query: str, embedder: Embedder, top_k: int = 5) -> list[SearchHit]:
        """The ``top_k`` chunks most similar to ``query``, best first, with cosine scores."""
        self.check_embedder(embedder)
        return self.search_vector(embedder.embed_query(query), top_k, device=embedder.device)

    def search_vector(self, vector: np.ndarray, top_k: int = 5, *, device: str | torch.device = "cpu"
                      ) -> list[SearchHit]:
        """Like :meth:`search`, for a query already embedded (a unit vector from the collection's embedder)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        rows, index = self._current(device)
        if index.size == 0:
            return []
        scores, ids = index.search(vector, top_k)
        hits = []
        for score, row_id in zip(scores[0].tolist(), ids[0].tolist()):
            if row_id < 0:
                continue
            row = rows[row_id]
            hits.append(SearchHit(score=float(score), document_id=row["document_id"], file=row["file"],
                                  chunk=row["chunk"], start=row["start"], end=row["end"], line=row["line"],
                                  page=row["page"], text=row["text"]))
        return hits

    # -- crash leftovers

    def clean_stale_staging(self, *, grace_seconds: float = STAGING_GRACE_SECONDS) -> list[Path]:
        """Remove staging folders and temporary files that a killed writer left behind; returns what went.

        A leftover is removed when the process named in it (writers put their pid
        in the name) is no longer running, or when it is older than
        ``grace_seconds`` whoever owns it (a pid can be reused). A younger one of a
        running process is a writer at work (another tab, another process) and
        is kept. Called by :meth:`open`.
        """
        removed = []
        now = time.time()
        for folder in (self.folder, self.folder / "documents"):
            try:
                entries = list(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                if not _is_leftover(entry.name):
                    continue
                try:
                    age = now - entry.lstat().st_mtime
                except OSError:
                    continue  # gone already: its writer finished
                pid = _writer_pid(entry.name)
                alive = pid is not None and _pid_alive(pid)
                if alive and age < grace_seconds:
                    continue
                if pid is None and age < grace_seconds:
                    continue  # no owner named: only age tells
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed


def _folder_files(root: Path, report: AddReport) -> list[Path]:
    """The files under ``root`` (hidden names left out), sorted; a link is followed only when it stays inside.

    A link to a file or folder outside ``root`` would copy a file the person did not choose into
    the collection (and into answers): it is skipped and listed in ``report.skipped``.
    """
    files = []
    for folder, subfolders, names in os.walk(root, followlinks=False):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names) + [d for d in subfolders if Path(folder, d).is_symlink()]:
            if name.startswith("."):
                continue
            path = Path(folder, name)
            display = str(path.relative_to(root))
            if path.is_symlink():
                if not fileio_inside(path, root):
                    report.skipped.append((display, f"{display}: a link that leaves the folder, skipped"))
                    continue
                if path.is_dir():
                    continue  # a link to a folder inside: its files are listed from where they are
            if path.is_file():
                files.append(path)
    return sorted(files, key=lambda p: str(p.relative_to(root)))


# what fileio's unique_temp_name puts in a name: ".<pid>-<thread id>-<8 hex>.tmp"
_WRITER_TAG = re.compile(r"\.(\d+)-\d+-[0-9a-f]{8}\.tmp$")


def _is_leftover(name: str) -> bool:
    return name.startswith(STAGING_PREFIX) or (name.startswith(".") and _WRITER_TAG.search(name) is not None)


def _writer_pid(name: str) -> int | None:
    match = _WRITER_TAG.search(name)
    return int(match.group(1)) if match else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        return psutil.pid_exists(pid)
    except (OSError, psutil.Error):
        return True  # cannot tell: keep it (the grace period still applies)
