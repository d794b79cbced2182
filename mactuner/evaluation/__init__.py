"""What a fine-tune learned and what it broke, measured with the models themselves.

- :mod:`mactuner.evaluation.matching`: the stated rule that marks an answer right or wrong.
- :mod:`mactuner.evaluation.forgetting`: "kept N of M things the base model knew", on a small
  general-knowledge set shipped with MacTuner (``mactuner/demo/general_knowledge.jsonl``).
- :mod:`mactuner.evaluation.facts`: the per-fact report: base, tuned, base + documents,
  tuned + documents for each question.
"""

from mactuner.evaluation.forgetting import (
    FORGETTING_FILE,
    FORGETTING_LIMIT,
    GENERAL_KNOWLEDGE,
    ForgettingResult,
    GeneralQuestion,
    check_forgetting,
    greedy_answers,
    load_forgetting,
    load_general_set,
)
from mactuner.evaluation.matching import normalise, phrase_match

__all__ = [
    "FORGETTING_FILE",
    "FORGETTING_LIMIT",
    "GENERAL_KNOWLEDGE",
    "ForgettingResult",
    "GeneralQuestion",
    "check_forgetting",
    "greedy_answers",
    "load_forgetting",
    "load_general_set",
    "normalise",
    "phrase_match",
]
