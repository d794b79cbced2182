"""UI-only part of the fine-tune page for preference tuning (DPO, ORPO, KTO) and the trackers.

The objective selector, the preference dataset's summary (pairs, chosen/rejected lengths), the
objective's own settings, the trackers a run also logs to and how to open them, and the reward
charts of a run. The computing is in :mod:`mactuner.data.preference`, :mod:`mactuner.recommend`
and :mod:`mactuner.trackers`. Not a page itself.
"""

from __future__ import annotations

import streamlit as st

from mactuner.config import DPO_LOSSES, TrainConfig
from mactuner.data import preference as preference_data
from mactuner.recommend import recommend_hyperparameters
from mactuner.training.trackers import open_commands

OBJECTIVES = {
    "sft": "SFT: learn the answers in the file (question/answer rows).",
    "dpo": "DPO: pairs of a chosen and a rejected answer; learns the preference and stays near the base model.",
    "orpo": "ORPO: pairs too; learns the chosen answer and the preference in one pass, no reference model (cheaper).",
    "kto": "KTO: single answers labelled good or bad (or pairs, split); when you have ratings, not pairs.",
}
INPUT_WIDTH = 190


def objective_ui(dataset: str) -> str:
    """The objective: SFT for question/answer files, DPO by default for preference files."""
    preference = preference_data.is_preference_file(dataset)
    choice = st.radio("Objective", list(OBJECTIVES), index=1 if preference else 0, horizontal=True,
                      format_func=str.upper, key=f"finetune_objective_{preference}", help=TrainConfig.help()["objective"])
    st.caption(OBJECTIVES[choice] + " Preference objectives train with the torch engine (CPU, CUDA, MPS); "
               "the MLX engine trains SFT only.")
    return choice


@st.cache_data(show_spinner="Reading the preference data…")
def summarize(path: str, model: str, objective: str, mtime: float, _tokenizer) -> preference_data.PreferenceSummary:
    load = preference_data.load_preference_file(path, objective)
    return preference_data.summarize_preferences(load, _tokenizer, 1_000_000, objective)


@st.cache_data(show_spinner="Recommending settings…", ttl=600)
def recommend(model: str, dataset: str, device: str, mtime: float, _footprint):
    """Recommended settings for the model, the preference file (a pair's two sequences as one row) and device."""
    return recommend_hyperparameters(model, dataset, device=device, footprint=_footprint)


def summary_ui(summary: preference_data.PreferenceSummary, max_length: int) -> None:
    """Pair (or labelled answer) counts, the chosen/rejected lengths, truncation, bad rows."""
    with st.container(horizontal=True, wrap=True):
        if summary.pairs:
            st.metric("Pairs", f"{summary.pairs} / {summary.total_rows}", help="usable / rows in the file", width=INPUT_WIDTH)
        else:
            st.metric("Good / bad answers", f"{summary.desirable} / {summary.undesirable}", width=INPUT_WIDTH)
        st.metric("Format", summary.format, width=INPUT_WIDTH)
        st.metric("Answer tokens", f"{summary.mean_chosen_tokens:.0f} / {summary.mean_rejected_tokens:.0f}",
                  help="mean chosen / rejected (desirable / undesirable)", width=INPUT_WIDTH)
        longer = sum(1 for p, a in zip(summary.prompt_lengths, summary.chosen_lengths + summary.rejected_lengths)
                     if p + a > max_length)
        st.metric("Truncated", longer, help=f"rows whose prompt + answer exceed {max_length} tokens", width=INPUT_WIDTH)
    st.plotly_chart(preference_data.preference_length_figure(summary), key="finetune_preference_histogram")
    for problem in summary.problems[:5]:
        st.warning(problem)


def settings_ui(objective: str) -> dict:
    """beta, the DPO loss and the KTO weights, as the objective uses them."""
    why = TrainConfig.help()
    row = st.container(horizontal=True, wrap=True)
    chosen = {"beta": row.number_input("Beta", 0.001, 100.0, 0.1, help=why["beta"], width=INPUT_WIDTH)}
    if objective == "dpo":
        chosen["dpo_loss"] = row.selectbox("DPO loss", DPO_LOSSES, help=why["dpo_loss"], width=INPUT_WIDTH)
    if objective == "kto":
        chosen["kto_desirable_weight"] = row.number_input("Good answers' weight", 0.01, 100.0, 1.0,
                                                          help=why["kto_desirable_weight"], width=INPUT_WIDTH)
        chosen["kto_undesirable_weight"] = row.number_input("Bad answers' weight", 0.01, 100.0, 1.0,
                                                            help=why["kto_undesirable_weight"], width=INPUT_WIDTH)
    return chosen


def trackers_ui() -> dict:
    """Where else the run logs (TensorBoard, MLflow), and the command that opens each."""
    trackers = st.multiselect("Also log to", ["tensorboard", "mlflow"], key="finetune_trackers",
                              help=TrainConfig.help()["report_to"])
    for tracker in trackers:
        st.caption(f"Open in {'TensorBoard' if tracker == 'tensorboard' else 'MLflow'}: `{open_commands()[tracker]}`")
    return {"report_to": trackers or "none"}


def reward_charts_ui(tail, chart, max_points: int) -> None:
    """Rewards of chosen and rejected answers and the preference accuracy, where a run records them."""
    series = lambda name, kind="train": tail.series(name, kind, max_points=max_points)
    if not series("rewards/chosen")[0]:
        return
    left, right = st.columns(2)
    with left:
        chart("Rewards", {"chosen": series("rewards/chosen"), "rejected": series("rewards/rejected"),
                          "margin": series("rewards/margin")}, "finetune_chart_rewards")
    with right:
        chart("Preference accuracy", {"train": series("rewards/accuracy"),
                                      "validation": series("val_rewards/accuracy", "eval")}, "finetune_chart_accuracy")
