"""Issue 21, the rows about what MacTuner reads: a chat history cut mid-line (row 4), RAG
collections and folders that point outside (rows 5, 6), datasets and PDFs that expand
without bound (rows 7, 8), YAML aliases (row 9) and crafted files that used to end in a
traceback (row 14). Each test works on its own temporary MACTUNER_HOME."""

from __future__ import annotations

import json

import pytest

# --- row 4: a chat history cut mid-line keeps a copy and its readable turns ------------------------


def saved_conversation(turns: int):
    from mactuner.chat.history import history_file, history_key, new_turn, save_history
    from mactuner.models import DEFAULT_MODEL

    key = history_key(DEFAULT_MODEL)
    history = []
    for n in range(turns):
        question, reply = new_turn(f"question {n}")
        reply["answers"]["base"] = f"answer {n}"
        history += [question, reply]
    save_history(key, history, model=DEFAULT_MODEL)
    file = history_file(key)
    text = file.read_text()
    cut = text[: text.index('"question 15"') + 5]  # cut inside turn 15's question
    file.write_text(cut)
    return key, file, cut


def test_a_damaged_history_is_copied_and_its_readable_turns_recovered():
    from mactuner.chat.history import history_dir, load_history, new_turn, save_turn

    key, file, cut = saved_conversation(20)
    notes: list[str] = []
    history = load_history(key, notes=notes)
    assert [t["content"] for t in history if t["role"] == "user"] == [f"question {n}" for n in range(15)]
    [copy] = history_dir().glob(f"{key}.damaged-*.json")
    assert copy.read_text() == cut  # the damaged file, byte for byte
    assert len(notes) == 1 and copy.name in notes[0] and "15 of its turns" in notes[0]
    # the next answer adds to the recovered turns instead of starting over
    question, reply = new_turn("one more")
    reply["answers"]["base"] = "ok"
    assert len(save_turn(key, question, reply)) == 32
    assert len(load_history(key)) == 32 and len(list(history_dir().glob("*.damaged-*"))) == 1
    # unreadable from the first byte: still copied, nothing recovered, and said so
    file.write_text("\0\0garbage")
    notes = []
    assert load_history(key, notes=notes) == []
    assert len(list(history_dir().glob("*.damaged-*"))) == 2 and "no turn could be read" in notes[0]


def test_chat_page_says_the_history_was_damaged():
    from tests.app_pages import open_app_page

    key, _, _ = saved_conversation(20)
    at = open_app_page("pages/chat.py")
    warnings = [w.value for w in at.warning]
    assert any("damaged" in w and ".damaged-" in w for w in warnings), warnings
    assert len(at.chat_message) == 30


# --- rows 5, 6: a collection never reaches outside its folder ---------------------------------------


@pytest.fixture(scope="module")
def tiny_embedder(tiny_embedder_dir):
    import torch

    from mactuner.rag import load_embedder

    return load_embedder(str(tiny_embedder_dir), device="cpu", dtype=torch.float32)


def new_collection(name, tiny_embedder_dir):
    from mactuner.rag import Collection, IndexSettings

    return Collection.create(name, IndexSettings(chunk_size=200, chunk_overlap=40, embedding_model=str(tiny_embedder_dir)))


def test_remove_never_follows_a_document_id_out_of_the_collection(tmp_path, tiny_embedder, tiny_embedder_dir):
    from mactuner.rag import Collection, RagError

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    collection = new_collection("c", tiny_embedder_dir)
    collection.add([("otters.txt", b"Otters hold hands while they sleep.")], tiny_embedder)
    [doc] = collection.documents()
    meta = collection.folder / "documents" / doc.id / "document.json"
    for planted in (str(victim), "../../../../" + str(victim.relative_to(victim.anchor)), "..", ""):
        data = json.loads(meta.read_text())
        data["id"] = planted
        meta.write_text(json.dumps(data))
        again = Collection.open("c")
        assert again.documents() == []  # not MacTuner's id: left out…
        assert again.search("otters", tiny_embedder) == []
        assert any("document.json" in p and doc.id in p for p in again.problems)  # …and named
        with pytest.raises(RagError, match="no document"):
            again.remove("otters.txt")
        assert (victim / "precious.txt").read_text() == "keep me"
    # its own id back: removed from its own folder
    data["id"] = doc.id
    meta.write_text(json.dumps(data))
    Collection.open("c").remove("otters.txt")
    assert not (collection.folder / "documents" / doc.id).exists() and victim.is_dir()


def test_indexing_a_folder_skips_links_that_leave_it(tmp_path, tiny_embedder, tiny_embedder_dir):
    secret = tmp_path / "secret.txt"
    secret.write_text("The vault code is 4711.")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "diary.md").write_text("Dear diary, the key is under the mat.")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "herons.txt").write_text("Herons nest in tall trees.")
    (docs / "sub" / "same.txt").symlink_to(docs / "herons.txt")  # a link that stays inside: fine
    (docs / "notes.txt").symlink_to(secret)
    (docs / "more").symlink_to(tmp_path / "private")
    collection = new_collection("d", tiny_embedder_dir)
    report = collection.add([str(docs)], tiny_embedder)
    skipped = dict(report.skipped)
    assert "leaves the folder" in skipped["notes.txt"] and "leaves the folder" in skipped["more"]
    assert sorted(d.original_name for d in report.added) == ["herons.txt", "sub/same.txt"]
    texts = " ".join(hit.text for hit in collection.search("vault code key", tiny_embedder, top_k=5))
    assert "4711" not in texts and "diary" not in texts


# --- row 7: a dataset that expands past a stated cap is refused before it is read ----------------------


def test_a_parquet_file_of_many_repeated_rows_is_refused_from_its_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mactuner.data import MAX_DATASET_ROWS, DatasetError, load_dataset_file

    rows = MAX_DATASET_ROWS + 100_000
    prompt = pa.array(["What is the capital of Quenmark? " * 8]).take(pa.array([0] * rows))
    table = pa.table({"prompt": prompt, "completion": pa.array(["Lumetta."]).take(pa.array([0] * rows))})
    path = tmp_path / "bomb.parquet"
    pq.write_table(table, path, compression="zstd")
    del table, prompt
    assert path.stat().st_size < 200_000
    before = pa.total_allocated_bytes()
    with pytest.raises(DatasetError, match=rf"{rows:,} rows.*at most {MAX_DATASET_ROWS:,}"):
        load_dataset_file(path)
    assert pa.total_allocated_bytes() - before < 16 * 2**20  # the rows were never read


def test_text_datasets_past_the_size_cap_are_refused_before_reading(tmp_path, monkeypatch):
    from mactuner import data
    from mactuner.data import readers

    monkeypatch.setattr(readers, "MAX_DATASET_BYTES", 10_000)
    path = tmp_path / "big.jsonl"
    path.write_text((json.dumps({"prompt": "a" * 90, "completion": "b"}) + "\n") * 200)
    with pytest.raises(data.DatasetError, match=r"big\.jsonl.*MB.*at most"):
        data.load_dataset_file(path)
    monkeypatch.setattr(readers, "MAX_DATASET_BYTES", 10_000_000)
    monkeypatch.setattr(readers, "MAX_DATASET_ROWS", 150)
    with pytest.raises(data.DatasetError, match=r"200 rows.*at most 150"):
        data.load_dataset_file(path)
    path.write_text((json.dumps({"prompt": "a", "completion": "b"}) + "\n") * 150)
    assert len(data.load_dataset_file(path).examples) == 150


# --- row 8: a PDF whose pages reuse one big stream is capped, and skipped with a message ---------------


def many_pages_one_stream(pages: int, line: bytes = b"(" + b"Quenmark " * 40 + b") Tj T*\n", lines: int = 600) -> bytes:
    import zlib

    from tests.rag_fixtures import pdf_file

    content = zlib.compress(b"BT /F1 10 Tf 12 TL 72 720 Td\n" + line * lines + b"ET", 9)
    kids = " ".join(f"{5 + i} 0 R" for i in range(pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
               b"<< /Length " + str(len(content)).encode() + b" /Filter /FlateDecode >>\nstream\n" + content
               + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R /Resources << /Font << /F1 4 0 R >> >> >>"
    return pdf_file(objects + [page] * pages)


def test_a_pdf_of_pages_reusing_one_stream_is_capped(tiny_embedder, tiny_embedder_dir):
    from mactuner.rag.extract import MAX_PDF_PAGES, DocumentError, extract_text, pdf_character_cap

    bomb = many_pages_one_stream(200)
    assert len(bomb) < 60_000
    assert pdf_character_cap(len(bomb)) == 1_000_000  # 43 MB of text in 200 pages: stopped by page 5
    with pytest.raises(DocumentError, match=r"bomb\.pdf: refused: its text runs past 1,000,000 characters by page 5 "):
        extract_text(bomb, "bomb.pdf")
    pages = many_pages_one_stream(MAX_PDF_PAGES + 1, line=b"(x) Tj\n", lines=1)
    with pytest.raises(DocumentError, match=rf"pages\.pdf: {MAX_PDF_PAGES + 1:,} pages.*at most {MAX_PDF_PAGES:,}"):
        extract_text(pages, "pages.pdf")
    # in a batch it is skipped with that message, and the rest is indexed
    collection = new_collection("p", tiny_embedder_dir)
    report = collection.add([("bomb.pdf", bomb), ("ok.pdf", many_pages_one_stream(2, lines=3))], tiny_embedder)
    assert [d.name for d in report.added] == ["ok.pdf"]
    assert "characters" in dict(report.skipped)["bomb.pdf"]


# --- row 9 (and 14's config): YAML aliases and Python tags are refused with their line ----------------

LAUGHS = """model: tiny
dataset: data.jsonl
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
target_modules: [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize("text, line, says", [
    (LAUGHS, 3, "aliases"),
    ("model: !!python/object/apply:os.system ['echo owned']\n", 1, "plain values"),
    ("model: tiny\nlora_rank: [1\n", 3, "not valid YAML"),
])
def test_a_config_with_aliases_or_python_tags_is_refused_with_its_line(tmp_path, capsys, text, line, says):
    from mactuner.cli import main
    from mactuner.config import TrainConfig

    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"config\.yaml line {line}: .*{says}"):
        TrainConfig.load(path)
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"line {line}" in err and "Traceback" not in err and len(err) < 500
    assert not (tmp_path / "run").exists()


def test_a_bad_value_is_named_in_a_bounded_message():
    from mactuner.config import TrainConfig

    with pytest.raises(ValueError) as caught:
        TrainConfig.from_dict({"target_modules": [["x" * 1000] * 1000] * 1000})
    assert "target_modules" in str(caught.value) and len(str(caught.value)) < 400
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_dict({"model": "m", "lora_rank": "r" * 100_000})
    assert "lora_rank" in str(caught.value) and len(str(caught.value)) < 400


def test_the_runs_list_reads_a_run_config_with_aliases_as_empty():
    from mactuner import fileio, paths, runs

    path = paths.runs_dir() / "laughs"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(LAUGHS)
    fileio.write_json_atomic(path / "status.json", {"state": "finished", "step": 1, "total_steps": 1})
    [run] = runs.list_runs()
    assert run.id == "laughs" and run.config == {}


# --- row 14: crafted files end in a one-line message, in the CLI and on the pages ----------------------------


def crafted_ggufs(folder):
    import struct

    header = b"GGUF" + struct.pack("<I", 3)
    files = {
        "cut.gguf": b"GGUF\x03\x00",  # cut inside the header
        "counts.gguf": header + struct.pack("<QQ", 2**60, 2**60),  # counts no file could hold
        "string.gguf": header + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 2**40) + b"ab",  # a 1 TB key
        "array.gguf": header + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**50),
        "type.gguf": header + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def test_crafted_gguf_headers_are_refused_with_a_message(tmp_path, capsys):
    from mactuner.cli import main
    from mactuner.models import ModelSourceError, load_model, model_footprint

    dataset = tmp_path / "data.jsonl"
    dataset.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    for path in crafted_ggufs(tmp_path):
        with pytest.raises(ModelSourceError, match=rf"{path.name}.*(damaged|not a complete GGUF)"):
            model_footprint(str(path))
        with pytest.raises(ModelSourceError, match="damaged|not a complete GGUF"):
            load_model(str(path), device="cpu")
        assert main(["recommend", "--model", str(path), "--dataset", str(dataset), "--device", "cpu"]) in (1, 2)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and path.name in err and "Traceback" not in err and len(err) < 600


def test_crafted_gguf_as_a_chat_model_is_refused_before_llama_cpp(tmp_path):
    from mactuner.chat.llamacpp import llama_cpp_missing_reason, load_gguf_chat_model

    assert llama_cpp_missing_reason() is None
    for path in crafted_ggufs(tmp_path):
        with pytest.raises(ValueError, match="damaged|not a complete GGUF"):
            load_gguf_chat_model(path)


def test_fine_tune_page_says_a_crafted_gguf_is_damaged(tmp_path):
    from tests.app_pages import open_app_page

    path = crafted_ggufs(tmp_path)[2]
    at = open_app_page("pages/finetune.py")
    at.radio(key="finetune_model_kind").set_value("Local folder or .gguf file").run()
    at.text_input(key="finetune_model_path").input(str(path)).run()
    assert not at.exception, at.exception
    assert any(path.name in e.value and "damaged" in e.value for e in at.error), [e.value for e in at.error]


def crafted_adapter(tiny_adapter, folder, header: bytes):
    import shutil

    shutil.copytree(tiny_adapter, folder)
    (folder / "adapter_model.safetensors").write_bytes(header)
    return folder


@pytest.mark.parametrize("weights", [
    b"\xff" * 8 + b"{}",  # a header length past the file
    (30).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape"',  # cut inside the header
    (60).to_bytes(8, "little") + b'{"w":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,4000000]}}'.ljust(60),
    b"abc",  # shorter than a header length
])
def test_a_crafted_adapter_file_is_refused_with_a_message(varied_model_dir, tiny_adapter, tmp_path, capsys, weights):
    from mactuner.chat import load_chat_model
    from mactuner.cli import main

    adapter = crafted_adapter(tiny_adapter, tmp_path / "adapter", weights)
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*damaged"):
        load_chat_model(str(varied_model_dir), str(adapter), device="cpu")
    for argv in (["merge", "--adapter", str(adapter), "--model", str(varied_model_dir), "--out", str(tmp_path / "m")],
                 ["eval", "--adapter", str(adapter), "--model", str(varied_model_dir), "--dataset", str(dataset),
                  "--device", "cpu", "--no-save"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("error: ") == 1, err
        assert err.strip().splitlines()[-1].startswith("error: ") and "damaged" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "m").exists()


def test_eval_on_a_dataset_with_no_usable_row_says_so(varied_model_dir, tiny_adapter, tmp_path, capsys):
    from mactuner.cli import main

    dataset = tmp_path / "rows.jsonl"
    dataset.write_text(json.dumps({"prompt": "only a prompt"}) + "\n")
    assert main(["eval", "--adapter", str(tiny_adapter), "--model", str(varied_model_dir), "--dataset", str(dataset),
                 "--device", "cpu", "--no-save"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rows.jsonl" in err and "Traceback" not in err


def test_a_large_dataset_is_summarised_from_an_even_sample(tmp_path, monkeypatch, tiny_model_dir):
    from transformers import AutoTokenizer

    from mactuner import data

    path = tmp_path / "rows.jsonl"
    # every third row is long: the sample keeps that mix
    rows = [{"prompt": f"question {n}", "completion": "word " * (200 if n % 3 == 0 else 2)} for n in range(3000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(data.summary, "SUMMARY_SAMPLE_ROWS", 300)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    summary = data.summarize_dataset(data.load_dataset_file(path), tokenizer, max_length=64)
    assert summary.sampled_rows == 300 and len(summary.token_lengths) == 300
    assert summary.rows == 3000 and summary.total_rows == 3000
    assert 900 <= summary.truncated_rows <= 1100 and 900 <= summary.rows_longer_than(64) <= 1100
