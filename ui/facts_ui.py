"""UI-only helper of the fine-tune page: "What did it learn" — the per-fact report of a finished run
(:mod:`mactuner.evaluation.facts`). Not a page itself."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from mactuner import runs
from mactuner.data import DatasetError
from mactuner.evaluation import facts as fact_module
from mactuner.models import ModelSourceError
from mactuner.rag import RagError, list_collections
from ui.common import selected_device

ERRORS = (ModelSourceError, OSError, RuntimeError, ValueError, RagError, DatasetError)
SOURCES = ("Facts I type", "A file of facts", "The run's held-out rows")


def chosen_facts(run: runs.RunInfo) -> tuple[list[fact_module.Fact], str]:
    """The facts the person chose, and where they came from (raises ValueError with what to fix)."""
    source = st.radio("Questions", SOURCES, key="facts_source", horizontal=True)
    if source == SOURCES[0]:
        text = st.text_area("One fact per line: question | expected answer | paraphrase (optional)", key="facts_typed",
                            placeholder="What is the capital of Quenmark? | Lumetta | Which town is Quenmark's capital?")
        return fact_module.parse_typed_facts(text or ""), "typed facts"
    if source == SOURCES[1]:
        upload = st.file_uploader("Facts file (JSON, JSONL or CSV: question, answer, optional answer_keyword, "
                                  "paraphrases)", type=["json", "jsonl", "csv"], key="facts_file")
        if upload is None:
            return [], ""
        from mactuner.data import save_upload

        return fact_module.load_facts(save_upload(upload.name, upload.getvalue())), upload.name
    from mactuner.evaluate import evaluation_rows

    examples, dataset, where, _ = evaluation_rows(run.path / "adapter")
    return fact_module.facts_from_examples(examples), f"{where} of {dataset}"


def show_report(report: fact_module.FactReport) -> None:
    """Totals per column, the forgetting line, then every question's answers side by side."""
    totals = {c: f"{t['right']} of {t['asked']}" + (f" ({t['unsupported']} unsupported)" if t["unsupported"] else "")
              for c, t in report.totals.items()}
    st.dataframe(pd.DataFrame([totals]), hide_index=True, key="facts_totals")
    if report.forgetting_line():
        (st.warning if (report.forgetting or {}).get("forgot_too_much") else st.caption)(report.forgetting_line())
    st.dataframe(pd.DataFrame(report.table()), hide_index=True, key="facts_table",
                 column_config={c: st.column_config.TextColumn(width="medium") for c in report.columns})
    st.caption(f"{len(report.rows)} questions from {report.source or 'the facts'} on {report.device}, "
               f"{report.seconds:.0f} s. Rule: {report.rule}.")


def facts_ui(run: runs.RunInfo) -> None:
    """The "What did it learn" view: choose facts (and a document collection), ask, show the report."""
    saved = fact_module.load_report(run.path)
    with st.expander("What did it learn: your facts, base vs tuned, with and without documents", expanded=saved is not None):
        try:
            facts, where = chosen_facts(run)
        except ERRORS as exc:
            st.error(str(exc))
            facts, where = [], ""
        left, right = st.columns([3, 1])
        collection = left.selectbox("Documents (a RAG collection) for the '+ documents' columns",
                                    ["(none)", *list_collections()], key="facts_collection")
        similarity = right.checkbox("Similarity", True, key="facts_similarity",
                                    help="Cosine similarity of each answer to the expected one (all-MiniLM-L6-v2)")
        if st.button("Ask", key="facts_ask", disabled=not facts, help="Greedy answers of the base and the tuned "
                     "model to every question and paraphrase; with a collection, again with its passages."):
            bar = st.progress(0.0, text="Starting…")
            try:
                saved = fact_module.fact_report(run.path / "adapter", facts, device=selected_device(), source=where,
                                                collection=None if collection == "(none)" else collection,
                                                similarity=similarity,
                                                progress=lambda m, f: bar.progress(min(f or 0.0, 1.0), text=m))
                fact_module.save_report(saved, run.path)
            except ERRORS as exc:
                st.error(str(exc))
            finally:
                bar.empty()
        if saved is not None:
            show_report(saved)
