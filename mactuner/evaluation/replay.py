"""Replay: keep what the base model knew by training on its own answers beside the new facts.

A small dataset says the same few things many times; training on it alone pulls the model's
answers to *any* similar question toward it (the demo once answered "What is the capital of
France?" with a word from its own facts). Mixing in general questions answered by the base
model itself (self-distillation, "rehearsal") gives the optimizer a reason to leave the rest of
what it knew alone. The questions are MacTuner's own (``mactuner/demo/general_replay.jsonl``),
none of them in the forgetting check's set, so the check still measures what was *not*
rehearsed. The base answers are generated once per base model, dtype and device kind (greedy,
with the adapter at its zero start) and cached under ``MACTUNER_HOME/forgetting``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mactuner.evaluation.forgetting import Answerer

REPLAY_QUESTIONS = Path(__file__).resolve().parent.parent / "demo" / "general_replay.jsonl"
REPLAY_MAX_NEW_TOKENS = 48
# questions in the shipped set: replay_rows beyond it get the whole set
REPLAY_SET_SIZE = 32


def replay_questions(count: int) -> list[str]:
    """The first ``count`` replay questions (at most the whole shipped set)."""
    lines = REPLAY_QUESTIONS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["question"] for line in lines if line.strip()][:count]


def replay_examples(model, tokenizer, count: int, base_key: dict[str, Any], answer: Answerer | None = None) -> list:
    """``count`` (at most the set's size) general questions with the base model's own greedy answers,
    as training :class:`mactuner.data.Example` rows. ``model`` must answer as the base does (LoRA at
    its zero start). Answers cut off mid-sentence end at their last full sentence.

    ``answer`` asks the questions greedily for an engine other than torch (the MLX engine's:
    :data:`mactuner.evaluation.forgetting.Answerer`); by default the torch ``model`` does."""
    from mactuner.data import Example
    from mactuner.evaluation.forgetting import cached_base_answers, record_base_answers, torch_answerer

    questions = replay_questions(count)
    key = {**base_key, "replay": questions, "max_new_tokens": REPLAY_MAX_NEW_TOKENS}
    answers = cached_base_answers(key)
    if answers is None:
        answers = (answer or torch_answerer(model, tokenizer))(questions, REPLAY_MAX_NEW_TOKENS)
        record_base_answers(key, answers)
    rows = []
    for question, answer in zip(questions, answers):
        # a cut answer would teach the model to stop mid-sentence
        end = max(answer.rfind("."), answer.rfind("!"), answer.rfind("?"))
        answer = answer[: end + 1] if end > 0 else answer
        if answer.strip():
            rows.append(Example(messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]))
    return rows
