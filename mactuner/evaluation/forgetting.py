"""The forgetting check: "kept N of M things the base model knew".

A fine-tune that teaches a small model a handful of new facts can overwrite what it knew
before (the demo once answered "What is the capital of France?" with a word from its own
facts). MacTuner ships a small general-knowledge set written for it
(:data:`GENERAL_KNOWLEDGE`: capitals, arithmetic, common facts, each with the key phrase a
right answer contains) and asks it greedily, in batches, of the base model and of the tuned
one. Only the questions the base model gets right count: M is what the base knew, N what the
tuned model still knows. A run that keeps less than ``1 - FORGETTING_LIMIT`` of it says so,
with advice.

The trainer runs the check in its own process after the last step (the model is in memory,
the base model's answers come from the same weights with the adapter switched off) and
writes ``RUN/forgetting.json``; Evaluate and ``mactuner eval`` show it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mactuner.evaluation.matching import phrase_match

# asks questions greedily: (questions, max_new_tokens) -> answers
Answerer = Callable[[list[str], int], list[str]]
GENERAL_KNOWLEDGE = Path(__file__).resolve().parent.parent / "demo" / "general_knowledge.jsonl"
FORGETTING_FILE = "forgetting.json"
# a run that loses more than this share of what the base model knew is flagged
FORGETTING_LIMIT = 0.10
# short answers are enough: every expected phrase of the set comes in the first sentence
MAX_NEW_TOKENS = 24
BATCH_SIZE = 16

ADVICE = ("Train less hard: fewer epochs or steps, a lower learning rate or LoRA rank; or add varied rows "
          "(general questions with their usual answers) beside your facts.")


@dataclass(frozen=True)
class GeneralQuestion:
    """One question of the general set and the key phrases a right answer contains (any one)."""

    question: str
    expected: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError("a question must not be empty")
        if not self.expected or not all(isinstance(e, str) and e.strip() for e in self.expected):
            raise ValueError(f"{self.question!r}: expected needs at least one key phrase")


def load_general_set(path: str | os.PathLike | None = None) -> list[GeneralQuestion]:
    """The questions of a general set (JSONL: ``{"question": …, "expected": [phrase, …]}`` a line)."""
    path = Path(path) if path is not None else GENERAL_KNOWLEDGE
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            expected = row["expected"]
            questions.append(GeneralQuestion(row["question"], tuple([expected] if isinstance(expected, str) else expected)))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a question line ({error})") from None
    return questions


@dataclass
class ForgettingResult:
    """What the tuned model kept of what the base model knew.

    Attributes:
        asked: questions in the set.
        base_knew: questions the base model answered right (M).
        kept: of those, questions the tuned model still answers right (N).
        lost: the questions it forgot: question, expected, base answer, tuned answer.
        seconds: time the check took.
        rule: how an answer is judged.
    """

    asked: int
    base_knew: int
    kept: int
    lost: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    rule: str = "right when an expected key phrase appears in the answer (normalised words, greedy decoding)"
    created: float = 0.0

    @property
    def kept_share(self) -> float | None:
        """N / M, or ``None`` when the base model knew nothing of the set."""
        return self.kept / self.base_knew if self.base_knew else None

    @property
    def forgot_too_much(self) -> bool:
        """It lost more than :data:`FORGETTING_LIMIT` of what the base knew."""
        share = self.kept_share
        return share is not None and share < 1 - FORGETTING_LIMIT

    def headline(self) -> str:
        """One line: "Kept 24 of 25 things the base model knew (96 %)." and advice when too much was lost."""
        if not self.base_knew:
            return f"Forgetting check: the base model answered none of the {self.asked} general questions, so nothing to forget."
        line = f"Kept {self.kept} of {self.base_knew} things the base model knew ({100 * self.kept_share:.0f} %)."
        if self.forgot_too_much:
            line += (f" It forgot more than {100 * FORGETTING_LIMIT:.0f} % of them (e.g. "
                     f"{self.lost[0]['question']!r} → {self.lost[0]['tuned_answer'][:60]!r}). {ADVICE}")
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the share and the headline."""
        return {**asdict(self), "kept_share": self.kept_share, "forgot_too_much": self.forgot_too_much,
                "headline": self.headline()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForgettingResult:
        """Inverse of :meth:`to_dict` (derived and unknown keys ignored)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def greedy_answers(model, tokenizer, questions: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = BATCH_SIZE) -> list[str]:
    """Each question asked alone through the chat template, answered greedily; batched, left-padded.

    Raises:
        ValueError: the tokenizer has no chat template (the set is made of chat questions).
    """
    return greedy_chat(model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                       max_new_tokens=max_new_tokens, batch_size=batch_size)


def greedy_chat(model, tokenizer, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = MAX_NEW_TOKENS,
                batch_size: int = BATCH_SIZE) -> list[str]:
    """Greedy answers to whole conversations (each through the chat template); batched, left-padded.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    import torch

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template: chat questions cannot be asked")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
                       for c in conversations[start : start + batch_size]]
            longest = max(len(p) for p in prompts)
            ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad_id, use_cache=True, temperature=None, top_p=None, top_k=None)
            answers += [tokenizer.decode(row[longest:], skip_special_tokens=True).strip() for row in out]
    finally:
        model.train(was_training)
    return answers


def torch_answerer(model, tokenizer) -> Answerer:
    """The :data:`Answerer` of a torch model: :func:`greedy_answers`."""
    return lambda questions, max_new_tokens: greedy_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens)


def check_forgetting(model, tokenizer, *, base_answers: list[str] | None = None,
                     questions: list[GeneralQuestion] | None = None, base_context=None,
                     max_new_tokens: int = MAX_NEW_TOKENS, answer: Answerer | None = None) -> ForgettingResult:
    """Ask the general set of the base model and of the tuned ``model``; count what was kept.

    Args:
        model: the tuned model (a PEFT model, or a whole model).
        tokenizer: its tokenizer (with a chat template).
        base_answers: the base model's answers if already known; else they are asked of ``model``
            inside ``base_context`` (default for a PEFT model: ``model.disable_adapter()``).
        questions: the set; default :data:`GENERAL_KNOWLEDGE`.
        max_new_tokens: longest answer.
        answer: asks questions greedily of a model that is not torch (the MLX engine's): ``answer(questions,
            max_new_tokens)``; ``base_context`` must then switch its adapter off. Default: ``model`` in torch.

    Raises:
        ValueError: no way to get the base model's answers, or no chat template.
    """
    started = time.perf_counter()
    questions = questions if questions is not None else load_general_set()
    texts = [q.question for q in questions]
    answer = answer or torch_answerer(model, tokenizer)
    if base_answers is None:
        if base_context is None:
            if not hasattr(model, "disable_adapter"):
                raise ValueError("give base_answers (or base_context) for a model that is not a PEFT model")
            base_context = model.disable_adapter()
        with base_context if base_context is not None else contextlib.nullcontext():
            base_answers = answer(texts, max_new_tokens)
    knew = known_by_base(questions, base_answers)
    # only what the base knew is asked again: that is all the check counts
    tuned = answer([texts[i] for i in knew], max_new_tokens) if knew else []
    return score_forgetting(questions, base_answers, dict(zip(knew, tuned)), seconds=time.perf_counter() - started)


def known_by_base(questions: list[GeneralQuestion], base_answers: list[str]) -> list[int]:
    """Indexes of the questions the base model answered right."""
    return [i for i, q in enumerate(questions) if phrase_match(base_answers[i], q.expected)]


def score_forgetting(questions: list[GeneralQuestion], base_answers: list[str], tuned_answers,
                     *, seconds: float = 0.0) -> ForgettingResult:
    """Count what the tuned model kept: ``tuned_answers`` is a list (every question) or a dict
    ``{index: answer}`` holding at least the questions the base answered right."""
    if isinstance(tuned_answers, list):
        tuned_answers = dict(enumerate(tuned_answers))
    knew = known_by_base(questions, base_answers)
    lost = [{"question": questions[i].question, "expected": list(questions[i].expected),
             "base_answer": base_answers[i], "tuned_answer": tuned_answers[i]}
            for i in knew if not phrase_match(tuned_answers[i], questions[i].expected)]
    return ForgettingResult(asked=len(questions), base_knew=len(knew), kept=len(knew) - len(lost), lost=lost,
                            seconds=round(seconds, 2), created=time.time())


def save_forgetting(result: ForgettingResult, run_dir: str | os.PathLike) -> Path:
    """Write ``RUN/forgetting.json`` atomically."""
    from mactuner import fileio

    return fileio.write_json_atomic(Path(run_dir) / FORGETTING_FILE, result.to_dict())


def load_forgetting(run_dir: str | os.PathLike) -> ForgettingResult | None:
    """The run's forgetting check, or ``None`` when it has none (or it cannot be read)."""
    try:
        return ForgettingResult.from_dict(json.loads((Path(run_dir) / FORGETTING_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


# ---------------------------------------------------------------- the trainer's check


def _base_cache_file(key: dict[str, Any]) -> Path:
    import hashlib

    from mactuner import paths

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return paths.home() / "forgetting" / f"base-{digest}.json"


def cached_base_answers(key: dict[str, Any]) -> list[str] | None:
    """The base model's answers recorded under ``key`` by an earlier run (same model, dtype, set)."""
    try:
        data = json.loads(_base_cache_file(key).read_text(encoding="utf-8"))
        return data["answers"] if data.get("key") == json.loads(json.dumps(key, default=str)) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_base_answers(key: dict[str, Any], answers: list[str]) -> None:
    """Remember the base model's answers under ``key`` (the next run of the same base skips them)."""
    from mactuner import fileio

    path = _base_cache_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_json_atomic(path, {"key": json.loads(json.dumps(key, default=str)), "answers": answers})


def forgetting_after_training(model, tokenizer, run_dir: str | os.PathLike, *, base_key: dict[str, Any],
                              peft: bool, eager=None, answer: Answerer | None = None,
                              adapter_off=None) -> ForgettingResult | None:
    """The trainer's end-of-run check: ask, compare, write ``RUN/forgetting.json``.

    The base model's answers come from ``model`` with its adapter switched off (LoRA, QLoRA), or from
    an earlier run of the same base (``base_key``: model, dtype, device kind, the set's content);
    a full fine-tune without such a record returns ``None`` (its base weights are gone). Another
    engine's model (MLX) gives ``answer`` (see :func:`check_forgetting`) and ``adapter_off``, a
    context manager that switches its adapter off.
    """
    questions = load_general_set()
    key = {**base_key, "set": [asdict(q) for q in questions], "max_new_tokens": MAX_NEW_TOKENS}
    base_answers = cached_base_answers(key)
    if base_answers is None and not peft:
        return None
    with eager if eager is not None else contextlib.nullcontext():
        if base_answers is None:
            with adapter_off if adapter_off is not None else model.disable_adapter():
                base_answers = (answer or torch_answerer(model, tokenizer))([q.question for q in questions], MAX_NEW_TOKENS)
            record_base_answers(key, base_answers)
        result = check_forgetting(model, tokenizer, base_answers=base_answers, questions=questions, answer=answer)
    save_forgetting(result, run_dir)
    return result


def end_of_run_check(model, tokenizer, run_dir: str | os.PathLike, *, base_key: dict[str, Any], peft: bool,
                     info: Callable[[str], None], stage: Callable[[str, str], None], eager=None,
                     answer: Answerer | None = None, adapter_off=None) -> str | None:
    """Either engine's last stage (:func:`forgetting_after_training`), said as a stage and an info line; the
    headline, or None when not checked. Never raises: a check that cannot run must not fail a finished run."""
    stage("checking", "Checking what the tuned model kept of what the base model knew (general questions)…")
    try:
        result = forgetting_after_training(model, tokenizer, run_dir, base_key=base_key, peft=peft, eager=eager,
                                           answer=answer, adapter_off=adapter_off)
    except Exception as error:  # noqa: BLE001 - a check that cannot run must not fail a finished run
        info(f"The forgetting check could not run: {type(error).__name__}: {error}")
        return None
    if result is None:
        info("Forgetting check skipped: a full fine-tune has no base weights left to compare with "
             "(Evaluate compares it with the base model).")
        return None
    info(result.headline())
    return result.headline()
