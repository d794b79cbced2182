"""The RAG page in AppTest: no collection yet, creating one, indexing a folder, asking and seeing sources,
removing a document, and a library error shown as a message."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from mactuner import rag
from tests.app_pages import open_app_page


def open_page() -> AppTest:
    return open_app_page("pages/rag.py")


def button(at: AppTest, key: str):
    return next(b for b in at.button if b.key == key)


def test_empty_page_creates_a_collection():
    at = open_page()
    assert at.title[0].value == "Ask your documents"
    assert any("Create a collection" in i.value for i in at.info)
    at.text_input(key="rag_new_name").input("My Handbook")
    button(at, "rag_create").click().run()
    assert not at.exception, at.exception
    assert rag.list_collections() == ["My-Handbook"]
    assert at.selectbox(key="rag_collection").value == "My-Handbook"


def test_index_a_folder_ask_and_remove(tiny_embedder_dir, tiny_model_dir, tmp_path):
    rag.Collection.create("notes", rag.IndexSettings(chunk_size=200, chunk_overlap=40,
                                                     embedding_model=str(tiny_embedder_dir)))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "llamas.md").write_text("# Llamas\n\nLlamas are domesticated South American camelids.")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 not a real pdf")
    at = open_page()
    at.text_input(key="rag_folder").input(str(docs))
    button(at, "rag_index").click().run()
    assert not at.exception, at.exception
    assert any("Indexed 1 document" in s.value for s in at.success)
    assert any("broken.pdf" in w.value and "cannot read this PDF" in w.value for w in at.warning)
    assert at.dataframe[0].value["document"].tolist() == ["llamas.md"]

    at.text_input(key="rag_model").input(str(tiny_model_dir))
    at.slider(key="rag_max_new_tokens").set_value(16)
    at.text_input(key="rag_question").input("What are llamas?")
    button(at, "rag_ask").click().run()
    assert not at.exception, at.exception
    last = at.session_state["rag_last"]
    assert last["question"] == "What are llamas?" and last["answer"]
    assert last["sources"][0]["file"] == "llamas.md"
    labels = [e.label for e in at.expander]
    assert any(label.startswith("[1] llamas.md · line 1, chunk 0 · score") for label in labels)
    # the tiny random model's answer does not state what the source says: the page shows the source's
    # sentence that best matches the question as the answer's evidence
    assert last["evidence"]["source"] == 1 and last["evidence"]["sentence"] in last["sources"][0]["text"]
    # said before the answer, not after it (issue 21): the warning comes first on the page
    [warning] = [w for w in at.warning if "check the evidence" in w.value]
    assert last["evidence"]["sentence"] in warning.value and "Matches" not in warning.value
    texts = [str(getattr(e, "value", "")) for e in at.main if e.type in ("warning", "markdown")]
    answer_at = texts.index("**Sources**") - 1  # the streamed answer is drawn just above the sources
    assert texts.index(warning.value) < answer_at, "the evidence warning must come before the answer"

    at.selectbox(key="rag_remove_choice").select(rag.Collection.open("notes").documents()[0].id)
    button(at, "rag_remove").click().run()
    assert not at.exception, at.exception
    assert rag.Collection.open("notes").documents() == []


@pytest.mark.parametrize("name", ["", "   "])
def test_create_with_an_empty_name_says_so(name):
    at = open_page()
    at.text_input(key="rag_new_name").input(name)
    button(at, "rag_create").click().run()
    assert not at.exception, at.exception
    assert any("Type a name for the new collection" in e.value for e in at.error)
    assert rag.list_collections() == []


def test_library_errors_are_shown(tiny_embedder_dir):
    rag.Collection.create("other", rag.IndexSettings(embedding_model=str(tiny_embedder_dir)))
    at = open_page()
    at.text_input(key="rag_folder").input("/no/such/folder")
    button(at, "rag_index").click().run()
    assert not at.exception, at.exception
    assert any("No folder at /no/such/folder" in e.value for e in at.error)


@pytest.mark.parametrize("name", ["../../escape", "///"])
def test_odd_collection_names(name):
    at = open_page()
    at.text_input(key="rag_new_name").input(name)
    button(at, "rag_create").click().run()
    assert not at.exception, at.exception
    if name == "///":
        assert any("letters or digits" in e.value for e in at.error)
        # the message sits in the form; the rest of the page is still there
        assert any("Create a collection to start" in i.value for i in at.info) and rag.list_collections() == []
    else:
        assert rag.list_collections() == ["escape"]
