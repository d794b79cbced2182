"""RAG: collections of documents, indexing with progress, questions answered with their sources."""

import pandas as pd
import streamlit as st

from mactuner import rag
from mactuner.chat import GenerationSettings
from mactuner.models import DEFAULT_MODEL
from mactuner.runs.views import list_adapters
from ui.chat_models import loaded_model, release_on_device_switch
from ui.common import device_or_stop, ensure_frame
from ui.model_text import show_model_text, stream_model_text
from ui.rag_cache import embedder, open_collection

ensure_frame()  # opened by its URL on a fresh server: run inside app.py's frame

UPLOAD_TYPES = sorted(suffix.lstrip(".") for suffix in rag.SUPPORTED_SUFFIXES)


def collection_ui() -> rag.Collection | None:
    """Pick a collection, or create one with its chunking settings."""
    names = rag.list_collections()
    with st.expander("New collection", expanded=not names):
        name = st.text_input("Name", key="rag_new_name", placeholder="e.g. handbook")
        left, right = st.columns(2)
        size = left.number_input("Chunk size (characters)", 100, 4000, 800, 50, key="rag_chunk_size")
        overlap = right.number_input("Overlap (characters)", 0, 2000, 120, 10, key="rag_overlap")
        if st.button("Create collection", key="rag_create"):
            try:
                if not name.strip():
                    raise ValueError("Type a name for the new collection first (letters or digits, e.g. handbook).")
                created = rag.Collection.create(name, rag.IndexSettings(chunk_size=int(size),
                                                                        chunk_overlap=int(overlap)))
            except (ValueError, rag.RagError) as exc:  # an unusable or taken name: say so, keep the page
                st.error(str(exc))
            else:
                st.session_state["rag_collection"] = created.name
                names = rag.list_collections()
    if not names:
        st.info("Create a collection to start.")
        return None
    chosen = st.selectbox("Collection", names, key="rag_collection")
    collection = open_collection(chosen)
    for problem in collection.problems:
        st.warning(problem)
    return collection


def index_ui(collection: rag.Collection, device) -> None:
    """Upload files or name a folder, then index them with a progress bar."""
    uploads = st.file_uploader("Upload documents", type=UPLOAD_TYPES, accept_multiple_files=True, key="rag_uploads")
    folder = st.text_input("…or a folder on this machine", key="rag_folder", placeholder="/path/to/docs")
    if not st.button("Index", key="rag_index", type="primary"):
        return
    if not uploads and not folder:
        st.warning("Choose files to upload or name a folder first.")
        return
    try:
        sources = rag.sources_to_index([(f.name, f.getvalue()) for f in uploads or []], folder)
    except ValueError as exc:  # no such folder: said here, in the tab
        st.error(str(exc))
        st.stop()
    bar = st.progress(0.0, text="Starting…")
    report = collection.add(sources, embedder(collection.settings.embedding_model, str(device)),
                            progress=lambda message, fraction: bar.progress(fraction or 0.0, text=message))
    if report.added:
        st.success(f"Indexed {len(report.added)} document(s), {report.chunks_embedded} chunks.")
    for _, reason in report.skipped:
        st.warning(f"Skipped {reason}")


def documents_ui(collection: rag.Collection) -> None:
    """The collection's documents, and removing one."""
    docs = collection.documents()
    st.caption(rag.documents_summary(docs, collection.settings))
    if not docs:
        return
    st.dataframe(pd.DataFrame(rag.document_rows(docs)), hide_index=True, width="stretch")
    left, right = st.columns([3, 1])
    doomed = left.selectbox("Remove a document", [d.id for d in docs], key="rag_remove_choice",
                            format_func=lambda i: next(d.original_name for d in docs if d.id == i))
    if right.button("Remove", key="rag_remove"):
        collection.remove(doomed)
        st.rerun()


def answer_settings_ui() -> tuple[str, str, int, int]:
    """Model, adapter, top-k and answer length."""
    with st.expander("Answer settings"):
        adapters = {str(choice.path): choice.label for choice in list_adapters()}
        model = st.text_input("Base model", DEFAULT_MODEL, key="rag_model", help="built-in, a hub id or a folder")
        adapter = st.selectbox("Fine-tuned adapter", ["", *adapters], key="rag_adapter",
                               format_func=lambda a: adapters.get(a, "none (base model)"))
        top_k = st.slider("Chunks retrieved (top-k)", 1, 10, 4, key="rag_top_k")
        max_new = st.slider("Max new tokens", 16, 512, 200, 16, key="rag_max_new_tokens")
    return model, adapter, top_k, max_new


def show_warning(last: dict, slot=None) -> None:
    """Before the answer: that it does not state its top source, with that source's sentence closest to the
    question (``slot``: the place kept above an answer that was streamed before it could be checked)."""
    if warning := rag.answer_warning(last):
        (slot or st).warning(warning, icon=":material/report:")


def show_note(last: dict) -> None:
    """Under the answer: where its words come from, when it states its top source and cites none."""
    if note := rag.support_note(last):
        st.caption(note)


def show_sources(sources: list[dict]) -> None:
    """Each source the model was given, its text folded under its heading."""
    st.markdown("**Sources**")
    for number, hit in enumerate(sources, start=1):
        with st.expander(rag.source_title(number, hit)):
            st.text(hit["text"])


st.title("Ask your documents")
device = device_or_stop()
release_on_device_switch(device)
st.caption(f"Embeddings and answers run on **{device}**.")

try:
    collection = collection_ui()
    if collection is None:
        st.stop()
    index_tab, docs_tab = st.tabs(["Add documents", "Documents"])
    with index_tab:
        index_ui(collection, device)
    with docs_tab:
        documents_ui(collection)
    st.subheader("Ask")
    model, adapter, top_k, max_new = answer_settings_ui()
    question = st.text_input("Question", key="rag_question", placeholder="What does the handbook say about…?")
    asked = st.button("Ask", key="rag_ask", type="primary")
    if asked and not (question.strip() and collection.chunk_count):
        st.warning("Add documents and type a question first.")
    elif asked:
        answer = rag.ask(collection, question, embedder(collection.settings.embedding_model, str(device)),
                         loaded_model(model, adapter, device, "Chat model"), top_k=top_k,
                         settings=GenerationSettings(max_new_tokens=max_new, temperature=0.0))
        slot = st.empty()  # the check goes above the answer, once the answer is complete
        stream_model_text(answer)
        st.session_state["rag_last"] = last = answer.to_record()
        show_warning(last, slot)
        show_note(last)
        show_sources(last["sources"])
    elif last := st.session_state.get("rag_last"):
        show_model_text(f"**{last['question']}**")
        show_warning(last)
        show_model_text(last["answer"])
        show_note(last)
        show_sources(last["sources"])
except (rag.RagError, ValueError, RuntimeError, OSError) as exc:
    st.error(str(exc))
    st.stop()
