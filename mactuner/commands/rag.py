"""``python -m mactuner rag …``: document collections and questions over them, without the browser.

::

    rag index COLLECTION FILES_OR_FOLDERS... [--device D] [--chunk-size N] [--overlap N] [--max-file-mb M]
    rag ask COLLECTION "question" [--top-k K] [--model M] [--adapter DIR] [--device D] [--json]
    rag search COLLECTION "query" [--top-k K] [--json]
    rag list [COLLECTION] [--json]
    rag remove COLLECTION DOCUMENT

The device defaults to the one remembered by ``devices select`` (else automatic).
Errors exit with 1 and a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "RAG: index documents into collections and ask questions with sources"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands ``index``, ``ask``, ``search``, ``list`` and ``remove``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    index = sub.add_parser("index", help="add files and folders (.txt .md .pdf .html) to a collection")
    index.add_argument("collection")
    index.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER")
    index.add_argument("--device", help="device for the embedding model: cpu, mps, cuda or cuda:N (default: remembered, else automatic)")
    index.add_argument("--chunk-size", type=int, help="characters per chunk (new collections; default 800)")
    index.add_argument("--overlap", type=int, help="characters shared by neighbouring chunks (default 120)")
    index.add_argument("--max-file-mb", type=float, help="refuse larger files (default 50)")
    index.add_argument("--embedding-model", help="sentence-transformers model (default: built-in all-MiniLM-L6-v2)")

    for name, helptext in (("ask", "answer a question from a collection, citing sources"),
                           ("search", "show the chunks most similar to a query")):
        action = sub.add_parser(name, help=helptext)
        action.add_argument("collection")
        action.add_argument("question")
        action.add_argument("--top-k", type=int, default=4, help="chunks retrieved (default 4)")
        action.add_argument("--device", help="device for the embedder" + (" and the chat model" if name == "ask" else "")
                            + " (default: remembered, else automatic)")
        action.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "ask":
            action.add_argument("--model", help="base model: the built-in default, a hub id, a local folder or a .gguf file")
            action.add_argument("--adapter", help="a fine-tuned adapter folder (RUN/adapter or a checkpoint)")
            action.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
            action.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")

    listing = sub.add_parser("list", help="list collections, or the documents of one")
    listing.add_argument("collection", nargs="?")
    listing.add_argument("--json", action="store_true", help="print JSON")

    remove = sub.add_parser("remove", help="remove a document (by name or id) from a collection")
    remove.add_argument("collection")
    remove.add_argument("document")


def run(args: argparse.Namespace) -> int:
    """Run one ``rag`` action; returns the exit code."""
    from mactuner.rag import RagError

    try:
        return {"index": _index, "ask": _ask, "search": _search, "list": _list, "remove": _remove}[args.action](args)
    except (RagError, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _device(args) -> str | None:
    if getattr(args, "device", None):
        return args.device
    from mactuner.settings import load_settings

    return load_settings().default_device


def _progress(message: str, fraction: float | None) -> None:
    percent = "" if fraction is None else f"{fraction * 100:5.1f}% "
    print(f"\r{percent}{message[:100]:<100}", end="", file=sys.stderr, flush=True)


def _index(args) -> int:
    from mactuner.rag import Collection, IndexSettings, list_collections, load_embedder, safe_collection_name

    wanted = {key: value for key, value in {
        "chunk_size": args.chunk_size, "chunk_overlap": args.overlap,
        "max_file_bytes": int(args.max_file_mb * 1024 * 1024) if args.max_file_mb else None,
        "embedding_model": args.embedding_model,
    }.items() if value is not None}
    if safe_collection_name(args.collection) in list_collections():
        collection = Collection.open(args.collection)
        fixed = {k: v for k, v in wanted.items() if k != "max_file_bytes" and getattr(collection.settings, k) != v}
        if fixed:
            raise ValueError(f"collection {collection.name!r} already uses "
                             + ", ".join(f"{k}={getattr(collection.settings, k)!r}" for k in fixed)
                             + "; these are fixed per collection (create a new one to change them)")
        if "max_file_bytes" in wanted:  # a limit for this run only, not stored
            collection.settings.max_file_bytes = wanted["max_file_bytes"]
    else:
        collection = Collection.create(args.collection, IndexSettings(**wanted))
    embedder = load_embedder(collection.settings.embedding_model, device=_device(args))
    report = collection.add(args.paths, embedder, progress=_progress)
    print(file=sys.stderr)
    for doc in report.added:
        print(f"added    {doc.original_name}: {doc.chunks} chunks ({doc.characters} characters)")
    for name, reason in report.skipped:
        print(f"skipped  {reason}")
    print(f"{collection.name}: {len(collection.documents())} documents, {collection.chunk_count} chunks "
          f"(embedded {report.chunks_embedded} new chunks on {embedder.device})")
    return 0 if report.added or not report.skipped else 1


def _search(args) -> int:
    from mactuner.rag import Collection, load_embedder

    collection = Collection.open(args.collection)
    embedder = load_embedder(collection.settings.embedding_model, device=_device(args))
    hits = collection.search(args.question, embedder, args.top_k)
    if args.json:
        print(json.dumps({"query": args.question, "sources": [h.to_dict() for h in hits]}, indent=2))
        return 0
    for number, hit in enumerate(hits, start=1):
        print(f"[{number}] {hit.score:.3f}  {hit.file}, {hit.position}\n    {hit.text[:300]}")
    return 0


def _ask(args) -> int:
    from mactuner.chat import GenerationSettings, load_chat_model
    from mactuner.rag import Collection, ask, load_embedder

    collection = Collection.open(args.collection)
    device = _device(args)
    embedder = load_embedder(collection.settings.embedding_model, device=device)
    loaded = load_chat_model(args.model, args.adapter, device=embedder.device)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    answer = ask(collection, args.question, embedder, loaded, top_k=args.top_k, settings=settings)
    for piece in answer:
        if not args.json:
            print(piece, end="", flush=True)
    if args.json:
        evidence = answer.evidence
        print(json.dumps({"question": args.question, "answer": answer.text, "citations": answer.citations,
                          "supported_by": answer.supported_by, "quoted": answer.quoted,
                          "evidence": evidence.to_dict() if evidence else None,
                          "sources": [h.to_dict() for h in answer.sources],
                          "model": loaded.source, "device": str(embedder.device),
                          "stats": answer.stream.stats.to_dict()}, indent=2))
        return 0
    if answer.evidence:
        e = answer.evidence
        print(f"\n\nEvidence [{e.source}] {e.file}, {e.position} (the answer does not repeat the top source):"
              f"\n    {e.sentence}")
    print("\n\nSources:")
    for number, hit in enumerate(answer.sources, start=1):
        print(f"[{number}] {hit.file}, {hit.position} (score {hit.score:.3f}): {hit.text[:160]}…")
    return 0


def _list(args) -> int:
    from mactuner.rag import Collection, list_collections

    if args.collection:
        collection = Collection.open(args.collection)
        docs = collection.documents()
        if args.json:
            from dataclasses import asdict

            print(json.dumps({"collection": collection.name, "settings": collection.settings.to_dict(),
                              "documents": [asdict(d) for d in docs]}, indent=2))
            return 0
        print(f"{collection.name}: {len(docs)} documents, {sum(d.chunks for d in docs)} chunks "
              f"(chunks of {collection.settings.chunk_size} characters, overlap {collection.settings.chunk_overlap})")
        for doc in docs:
            print(f"  {doc.id}  {doc.original_name}  {doc.kind}  {doc.size} bytes  {doc.chunks} chunks")
        return 0
    rows = []
    for name in list_collections():
        collection = Collection.open(name)
        docs = collection.documents()
        rows.append({"name": name, "documents": len(docs), "chunks": sum(d.chunks for d in docs)})
    if args.json:
        print(json.dumps({"collections": rows, "count": len(rows)}, indent=2))
    elif not rows:
        print("no collections yet: python -m mactuner rag index NAME FILES...")
    for row in rows if not args.json else []:
        print(f"{row['name']}: {row['documents']} documents, {row['chunks']} chunks")
    return 0


def _remove(args) -> int:
    from mactuner.rag import Collection

    removed = Collection.open(args.collection).remove(args.document)
    print(f"removed {removed.original_name} ({removed.chunks} chunks) from {args.collection}")
    return 0
