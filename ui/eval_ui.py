"""UI-only helpers of the fine-tune page: evaluate a finished run (base vs tuned) and compare runs.
The work is done by :mod:`mactuner.evaluate`. Not a page itself."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from mactuner import evaluate, paths, runs
from mactuner.data import DatasetError
from mactuner.display import table_for_people
from mactuner.models import ModelSourceError
from ui.common import selected_device

ERRORS = (ModelSourceError, DatasetError, OSError, RuntimeError, ValueError)


def show_eval(result: evaluate.EvalResult) -> None:
    """The saved evaluation: loss / perplexity / hit rates of both models, then the answers side by side."""
    st.caption(f"{result.rows} {result.rows_source} of `{paths.display_path(result.dataset)}` on {result.device}; "
               f"loss and perplexity over the answer tokens (lower is better).")
    summary = pd.DataFrame(result.summary()["rows"]).dropna(axis=1, how="all").to_dict("records")
    summary = pd.DataFrame(table_for_people(summary))
    st.dataframe(summary, hide_index=True, key="eval_summary")
    if result.answers:
        answers_ui(result)


def answers_ui(result: evaluate.EvalResult) -> None:
    """Each prompt with the base and the tuned answer side by side in plain, wrapping text: every column
    stays on screen at any window width (a wide table hid the tuned answers off its right edge)."""
    st.markdown("**Answers** (greedy, on the same prompts)")
    with st.container(height=min(120 + 110 * len(result.answers), 560), key="eval_answers"):
        for number, row in enumerate(result.answers, start=1):
            prompt, base, tuned = st.columns([3, 4, 4])
            prompt.text(f"{number}. {row.prompt}")
            prompt.text("expected: " + " ".join(row.reference.split())[:300])
            for column, who, answer, hit in ((base, "base", row.base_answer, row.base_keyword),
                                             (tuned, "tuned", row.tuned_answer, row.tuned_keyword)):
                column.caption(who + ("" if hit is None else (" · keyword hit" if hit else " · keyword missed")))
                column.text(answer.strip() or "(empty answer)")
            st.divider()
    if result.short_references:
        st.caption("Keyword hit: every word of the reference that the question does not already contain "
                   "(stop words aside) appears in the answer.")


def evaluate_ui(run: runs.RunInfo) -> None:
    """An Evaluate button for a finished run, and its saved ``eval.json``."""
    if run.state != "finished" or not (run.path / "adapter").is_dir():
        return
    saved = evaluate.load_eval(run.path)
    with st.expander("Evaluation: base model vs tuned model", expanded=saved is not None):
        left, right = st.columns([1, 3])
        prompts = left.number_input("Prompts to answer", 0, 50, 8, key="eval_prompts")
        if right.button("Evaluate", key="finetune_evaluate", help="Loss, perplexity and answers of both models "
                        "on the run's validation rows (its training rows when it had none)."):
            bar = st.progress(0.0, text="Starting…")
            try:
                result = evaluate.evaluate(run.path / "adapter", device=selected_device(), max_prompts=int(prompts),
                                           progress=lambda m, f: bar.progress(min(f or 0.0, 1.0), text=m))
                evaluate.save_eval(result, run.path)
                saved = result
            except ERRORS as exc:
                st.error(str(exc))
            finally:
                bar.empty()
        if saved is not None:
            show_eval(saved)


def compare_ui() -> None:
    """Compare runs: settings, final losses, eval results and loss curves of two or more finished runs."""
    finished = [r.id for r in runs.list_runs() if r.state == "finished"]
    with st.expander("Compare runs"):
        chosen = st.multiselect("Finished runs to compare", finished, key="finetune_compare")
        if len(chosen) < 2:
            st.caption("Pick two or more finished runs.")
            return
        rows = table_for_people(evaluate.compare_runs(chosen))
        # one column per run, settings read across (as text: each row holds its own kind of value)
        table = pd.DataFrame(rows).set_index("run").T.map(str)
        st.dataframe(table, key="finetune_compare_table")
        st.plotly_chart(evaluate.loss_curves_figure(chosen), key="finetune_compare_chart")
