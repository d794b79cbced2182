"""RAG under bad input and crashes (issue 9, rows 10-12): a hostile PDF fails alone, a damaged index file is
rebuilt from the stored embeddings, and what a killed writer leaves behind is cleaned up, never a live writer's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from mactuner.fileio import STAGING_PREFIX, unique_temp_name
from mactuner.rag import CENTROIDS_FILE, Collection, IndexSettings, load_embedder
from tests.locations import ROOT
from tests.rag_fixtures import pdf_file


@pytest.fixture(scope="module")
def tiny_embedder(tiny_embedder_dir):
    return load_embedder(str(tiny_embedder_dir), device="cpu", dtype=torch.float32)


def pdf_with_stream(stream: bytes, filters: str = "") -> bytes:
    """A one-page PDF whose page content is ``stream`` (raw bytes, e.g. deflated), with a valid xref table."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length " + str(len(stream)).encode() + filters.encode() + b" >>\nstream\n" + stream
               + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    return pdf_file(objects)


# ---------------------------------------------------------------- row 10: bad documents fail alone


def test_a_decompression_bomb_and_broken_pdfs_fail_alone(tiny_embedder, tiny_embedder_dir):
    # 80 MB of page content deflated to ~80 KB: pypdf stops at its 75 MB limit with LimitReachedError
    bomb = pdf_with_stream(zlib.compress(b"BT /F1 12 Tf 72 720 Td (x) Tj ET\n" + b" " * 80_000_000, 9),
                           " /Filter /FlateDecode")
    assert len(bomb) < 200_000
    good_pdf = pdf_with_stream(b"BT /F1 12 Tf 72 720 Td (Herons nest in tall trees.) Tj ET")
    broken_stream = pdf_with_stream(b"x\x9c not deflate data at all", " /Filter /FlateDecode")
    collection = Collection.create("batch", IndexSettings(chunk_size=200, chunk_overlap=40,
                                                          embedding_model=str(tiny_embedder_dir)))
    report = collection.add([
        ("before.txt", b"Otters hold hands while they sleep."),
        ("bomb.pdf", bomb),
        ("truncated.pdf", good_pdf[: len(good_pdf) // 2]),
        ("bad-stream.pdf", broken_stream),
        ("herons.pdf", good_pdf),
        ("after.md", b"Beavers build dams from branches and mud."),
    ], tiny_embedder)
    reasons = dict(report.skipped)
    # the rest of the batch, before and after the bad files, is indexed
    assert sorted(d.name for d in report.added) == ["after.md", "before.txt", "herons.pdf"]
    assert set(reasons) <= {"bomb.pdf", "truncated.pdf", "bad-stream.pdf"} and "bomb.pdf" in reasons
    assert reasons["bomb.pdf"].startswith("bomb.pdf: refused: the PDF inflates past pypdf's safety limit")
    for name, reason in reasons.items():
        assert reason.startswith(f"{name}: "), reason  # each message names its document
    assert collection.search("Beavers build dams", tiny_embedder, top_k=1)[0].file == "after.md"
    assert collection.search("Herons nest in tall trees.", tiny_embedder, top_k=1)[0].file == "herons.pdf"


# ---------------------------------------------------------------- row 11: damaged index files


def _ivf_collection(tiny_embedder, tiny_embedder_dir) -> tuple[Collection, list[str]]:
    settings = IndexSettings(chunk_size=60, chunk_overlap=0, embedding_model=str(tiny_embedder_dir), ivf_threshold=100)
    collection = Collection.create("big", settings)
    lines = [f"Fact number {i}: the {word} of item {i} is {i * 7 % 13}." for i, word in
             zip(range(240), ["colour", "weight", "size", "price"] * 60)]
    collection.add([("facts.txt", "\n".join(lines).encode())], tiny_embedder)
    assert collection.index("cpu").kind == "ivf"
    return collection, lines


@pytest.mark.parametrize("damage", ["truncated", "wrong shape", "not numpy"])
def test_a_damaged_centroid_file_is_rebuilt_and_search_works(tiny_embedder, tiny_embedder_dir, damage):
    collection, lines = _ivf_collection(tiny_embedder, tiny_embedder_dir)
    path = collection.folder / CENTROIDS_FILE
    good = np.load(path)
    if damage == "truncated":  # as a kill during the write of an older version could leave it
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "wrong shape":
        np.save(path, np.ones((5, 7), np.float32))
    else:
        path.write_bytes(b"\x00" * 100)
    # a new process (a new object) opens the collection: the query works and the file is whole again
    reopened = Collection.open("big")
    hits = reopened.search(lines[123], tiny_embedder, top_k=3)
    assert hits[0].text == lines[123] and hits[0].line == 124
    rebuilt = np.load(path, allow_pickle=False)
    assert rebuilt.shape[1] == good.shape[1] and np.allclose(np.linalg.norm(rebuilt, axis=1), 1, atol=1e-4)
    assert any(CENTROIDS_FILE in problem and "rebuilt" in problem for problem in reopened.problems)
    # and the next object finds nothing to repair
    again = Collection.open("big")
    assert [h.text for h in again.search(lines[123], tiny_embedder, top_k=3)] == [h.text for h in hits]
    assert again.problems == []


def test_a_damaged_document_is_left_out_and_named(tiny_embedder, tiny_embedder_dir):
    collection = Collection.create("mixed", IndexSettings(chunk_size=200, chunk_overlap=40,
                                                          embedding_model=str(tiny_embedder_dir)))
    report = collection.add([("good.txt", b"Walruses use their tusks to climb onto ice."),
                             ("bad.txt", b"Narwhals have one long spiral tusk.")], tiny_embedder)
    bad = next(d for d in report.added if d.name == "bad.txt")
    vectors = collection.folder / "documents" / bad.id / "embeddings.npy"
    vectors.write_bytes(vectors.read_bytes()[:50])
    reopened = Collection.open("mixed")
    hits = reopened.search("tusks", tiny_embedder, top_k=5)
    assert [h.file for h in hits] == ["good.txt"]
    assert len(reopened.problems) == 1 and "'bad.txt'" in reopened.problems[0]
    assert "remove it and add it again" in reopened.problems[0]
    reopened.remove("bad.txt")
    assert reopened.search("tusks", tiny_embedder, top_k=5)[0].file == "good.txt" and reopened.problems == []
    # an unreadable document.json leaves that document out, not the collection
    good = reopened.documents()[0]
    (collection.folder / "documents" / good.id / "document.json").write_text('{"id": "trunc')
    reopened.add([("seals.txt", b"Seals have tusks? No, walruses have tusks.")], tiny_embedder)
    again = Collection.open("mixed")
    assert [h.file for h in again.search("walruses tusks", tiny_embedder, top_k=5)] == ["seals.txt"]
    assert len(again.problems) == 1 and f"documents/{good.id}/document.json cannot be read" in again.problems[0]


# ---------------------------------------------------------------- row 12: what a killed writer leaves

WRITER = """
import sys, time
from pathlib import Path
from mactuner.fileio import write_folder_atomically

def fill(staging):
    (staging / "embeddings.npy").write_bytes(b"x" * 1_000_000)
    print(staging, flush=True)
    time.sleep(600)  # killed here, mid-write

write_folder_atomically(Path(sys.argv[1]), fill, replace=False)
"""


def test_a_killed_writers_staging_folder_is_removed_but_a_live_one_is_kept(tiny_embedder, tiny_embedder_dir):
    collection = Collection.create("crash", IndexSettings(embedding_model=str(tiny_embedder_dir)))
    collection.add([("kept.txt", b"A document that was written whole.")], tiny_embedder)
    documents = collection.folder / "documents"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(documents / "abcdef123456")],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        staging = documents / os.path.basename(writer.stdout.readline().strip())
        assert staging.name.startswith(STAGING_PREFIX) and staging.is_dir()
        # the writer is alive: opening the collection (another tab, another process) leaves its folder alone
        assert Collection.open("crash").documents()[0].name == "kept.txt"
        assert staging.is_dir()
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    # kill -9 mid-write: the staging folder stays behind until the collection is next opened
    assert staging.is_dir()
    reopened = Collection.open("crash")
    assert not staging.exists()
    assert [d.name for d in reopened.documents()] == ["kept.txt"]
    assert sorted(p.name for p in documents.iterdir()) == [reopened.documents()[0].id]


def test_staging_leftovers_without_an_owner_go_after_the_grace_period(tiny_embedder_dir):
    collection = Collection.create("old", IndexSettings(embedding_model=str(tiny_embedder_dir)))
    documents = collection.folder / "documents"
    legacy_old = documents / ".staging-0123456789ab"  # the pre-fileio name: no pid in it
    legacy_new = documents / ".staging-ba9876543210"
    for folder in (legacy_old, legacy_new):
        folder.mkdir()
        (folder / "chunks.jsonl").write_text("{}\n")
    two_hours_ago = time.time() - 7200
    os.utime(legacy_old, (two_hours_ago, two_hours_ago))
    # a temporary file of an atomic write whose writer is dead (a pid that exited), and one of this process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    ours = unique_temp_name(collection.folder / "collection.json")
    theirs = collection.folder / ours.name.replace(f".{os.getpid()}-", f".{dead_pid}-")
    ours.write_text("{")
    theirs.write_text("{")
    removed = Collection.open("old").clean_stale_staging()
    assert removed == []  # open() already cleaned: a second pass finds nothing
    assert not legacy_old.exists() and not theirs.exists()
    assert legacy_new.is_dir() and ours.exists()  # too young to judge / a live writer's
    # past the grace period even a live pid's leftover goes (the pid may have been reused)
    removed = Collection.open("old").clean_stale_staging(grace_seconds=0)
    assert sorted(removed) == sorted([legacy_new, ours]) and not ours.exists()
