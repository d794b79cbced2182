"""Preference datasets (DPO, ORPO, KTO): files → pairs or labelled answers → token ids.

Formats, detected from the columns like :mod:`mactuner.data`'s:

- ``preference`` (TRL): ``prompt`` / ``chosen`` / ``rejected``, each a plain string or
  a list of messages; without ``prompt``, ``chosen`` and ``rejected`` are whole
  conversations whose shared beginning is the prompt.
- ``sharegpt_preference`` (LLaMA-Factory): ``conversations`` (ShareGPT or OpenAI
  turns, ending with the user's) + ``chosen`` + ``rejected`` (one assistant turn each,
  or a string), optional ``system``.
- ``kto``: single answers with a boolean ``label`` (True: desirable): ``prompt`` /
  ``completion`` / ``label`` (TRL), or ``messages`` / ``conversations`` ending with the
  assistant's answer + ``label`` (LLaMA-Factory also writes ``kto_tag``).

For an instruct model, plain-string rows become one user turn and one assistant reply
in the model's chat template (as ``prompt``/``completion`` rows do for SFT), so the
model learns the preference in the form it answers in. A pair file trains KTO too
(chosen → desirable, rejected → undesirable, as TRL does); single answers cannot
train DPO or ORPO (the message says to use ``kto``).

Bad rows are reported with their line (:class:`mactuner.data.DataProblem`): a missing
``rejected``, ``chosen`` equal to ``rejected``, empty turns, a label that is not a
boolean.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mactuner.data import readers as _data
from mactuner.data.base import IGNORE_INDEX, DataProblem, DatasetError
from mactuner.data.templates import _template_for

PREFERENCE_FORMATS = ("preference", "sharegpt_preference", "kto")
"""Formats understood by :func:`load_preference_file`."""

PAIRED_OBJECTIVES = ("dpo", "orpo")


@dataclass
class PreferenceExample:
    """One pair (``chosen`` and ``rejected``) or one labelled answer (``completion`` and ``label``).

    Attributes:
        prompt: the conversation before the answer (system and user turns, earlier replies).
        chosen, rejected: the preferred and the dispreferred answer (assistant turns).
        completion, label: a single answer and whether it is desirable (KTO).
        line: where the row came from in its file.
    """

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]] | None = None
    rejected: list[dict[str, str]] | None = None
    completion: list[dict[str, str]] | None = None
    label: bool | None = None
    line: int | None = None

    @property
    def paired(self) -> bool:
        """True for a chosen/rejected pair, False for a labelled single answer."""
        return self.chosen is not None


@dataclass
class PreferenceLoad:
    """What :func:`load_preference_file` read (as :class:`mactuner.data.DatasetLoad`)."""

    examples: list[PreferenceExample]
    format: str
    path: Path
    problems: list[DataProblem] = field(default_factory=list)
    total_rows: int = 0


def is_preference_file(path: str | os.PathLike) -> bool:
    """True when the file's first rows look like preference data (pairs or labelled answers)."""
    try:
        rows = _data._read_rows(Path(path), [])
    except (DatasetError, OSError):
        return False
    return detect_preference_format(rows) is not None


def detect_preference_format(rows: Sequence[Any]) -> str | None:
    """The preference format most of the first rows look like, or None."""
    votes: dict[str, int] = {}
    for row in rows[:50]:
        value = getattr(row, "value", row)
        if not isinstance(value, dict):
            continue
        keys = set(value)
        if "chosen" in keys or "rejected" in keys:
            fmt = "sharegpt_preference" if ("conversations" in keys or "messages" in keys) and "prompt" not in keys else "preference"
        elif "label" in keys or "kto_tag" in keys:
            fmt = "kto"
        else:
            continue
        votes[fmt] = votes.get(fmt, 0) + 1
    return max(votes, key=votes.get) if votes else None


_RowError = _data._RowError


def _turns(value: Any, column: str, default_role: str) -> list[dict[str, str]]:
    """A string (one turn of ``default_role``), one message object, or a list of messages."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        messages = _data._parse_turns(value, column)
    else:
        messages = [{"role": default_role, "content": _data._string(value, column)}]
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise _RowError(f"'{column}' turn {i + 1} is empty")
    return messages


def _answer(value: Any, column: str) -> list[dict[str, str]]:
    if value is None:
        raise _RowError(f"missing '{column}'")
    messages = _turns(value, column, "assistant")
    if messages[-1]["role"] != "assistant":
        raise _RowError(f"'{column}' should end with an assistant reply, got a {messages[-1]['role']} turn")
    return messages


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise _RowError(f"'label' should be true or false, got {value!r}")


def _system(value: dict) -> list[dict[str, str]]:
    system = value.get("system")
    return [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []


def _split_shared_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit prompt: the turns both conversations share, then each one's own."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _row_to_example(value: Any, fmt: str) -> PreferenceExample:
    if not isinstance(value, dict):
        raise _RowError(f"expected an object with columns, got {type(value).__name__}")
    if fmt == "kto":
        label = _label(value["label"] if "label" in value else value.get("kto_tag"))
        if "prompt" in value or "completion" in value:
            prompt = _system(value) + _turns(value.get("prompt"), "prompt", "user")
            completion = _answer(value.get("completion"), "completion")
        else:
            column = "messages" if "messages" in value else "conversations"
            if column not in value:
                raise _RowError("missing 'prompt'/'completion' or 'messages'")
            turns = _system(value) + _turns(value[column], column, "user")
            if turns[-1]["role"] != "assistant" or len(turns) < 2:
                raise _RowError(f"'{column}' should end with the assistant's answer that 'label' judges")
            prompt, completion = turns[:-1], turns[-1:]
        return PreferenceExample(prompt=prompt, completion=completion, label=label)
    for column in ("chosen", "rejected"):
        if column not in value or value[column] in (None, "", []):
            raise _RowError(f"missing '{column}' (a pair needs both a chosen and a rejected answer)")
    if fmt == "sharegpt_preference":
        column = "conversations" if "conversations" in value else "messages"
        prompt = _system(value) + _turns(value.get(column), column, "user")
        chosen, rejected = _answer(value["chosen"], "chosen"), _answer(value["rejected"], "rejected")
    elif "prompt" in value:
        prompt = _system(value) + _turns(value["prompt"], "prompt", "user")
        chosen, rejected = _answer(value["chosen"], "chosen"), _answer(value["rejected"], "rejected")
    else:
        if not (isinstance(value["chosen"], list) and isinstance(value["rejected"], list)):
            raise _RowError("missing 'prompt' (without one, 'chosen' and 'rejected' must be whole conversations)")
        prompt, chosen, rejected = _split_shared_prefix(
            _turns(value["chosen"], "chosen", "user"), _turns(value["rejected"], "rejected", "user")
        )
        prompt = _system(value) + prompt
        if not prompt:
            raise _RowError("'chosen' and 'rejected' share no prompt turn")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise _RowError("'chosen' and 'rejected' should end with an assistant reply")
    if not any(m["role"] == "user" for m in prompt):
        raise _RowError("the prompt has no user turn")
    if chosen == rejected:
        raise _RowError("'chosen' is the same as 'rejected': the pair teaches nothing")
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected)


def load_preference_file(
    path: str | os.PathLike, objective: str = "dpo", format: str | None = None
) -> PreferenceLoad:
    """Read a preference dataset file.

    Args:
        path: a ``.json``, ``.jsonl``, ``.csv`` or ``.parquet`` file.
        objective: ``dpo`` or ``orpo`` (pairs needed) or ``kto`` (pairs become two labelled answers).
        format: one of :data:`PREFERENCE_FORMATS`, or None to detect it.

    Raises:
        DatasetError: the file cannot be used at all, or holds no preference data; the message says
            what it holds and what to do.
    """
    path = Path(path)
    if format is not None and format not in PREFERENCE_FORMATS:
        raise DatasetError(
            f"{objective} trains on preference data: the dataset format must be one of "
            f"{', '.join(PREFERENCE_FORMATS)} (or detected), got {format!r}"
        )
    if not path.exists():
        raise DatasetError(f"{path}: no such file.")
    if path.is_dir():
        raise DatasetError(f"{path} is a folder; choose a dataset file.")
    problems: list[DataProblem] = []
    rows = _data._read_rows(path, problems)
    total = len(rows) + len(problems)
    if not rows:
        raise DatasetError(f"{path.name} holds no readable rows" + (f"; first problem: {problems[0]}" if problems else "."))
    fmt = format or detect_preference_format(rows)
    if fmt is None:
        first = rows[0].value
        columns = ", ".join(repr(k) for k in first) if isinstance(first, dict) else type(first).__name__
        raise DatasetError(
            f"{path.name} is not preference data (its columns: {columns}). {objective.upper()} needs "
            "prompt/chosen/rejected (TRL), conversations/chosen/rejected (LLaMA-Factory)"
            + (", or prompt/completion/label" if objective == "kto" else "")
            + "; for question/answer rows use objective sft."
        )
    if fmt == "kto" and objective in PAIRED_OBJECTIVES:
        raise DatasetError(
            f"{path.name} holds single answers labelled good or bad, not pairs: {objective.upper()} needs a chosen "
            "and a rejected answer per prompt. Train it with objective kto, which learns from labelled answers."
        )
    examples: list[PreferenceExample] = []
    for row in rows:
        try:
            example = _row_to_example(row.value, fmt)
        except _RowError as exc:
            problems.append(DataProblem(path.name, row.line, str(exc)))
            continue
        if objective == "kto" and example.paired:
            examples.append(PreferenceExample(example.prompt, completion=example.chosen, label=True, line=row.line))
            examples.append(PreferenceExample(example.prompt, completion=example.rejected, label=False, line=row.line))
            continue
        example.line = row.line
        examples.append(example)
    problems.sort(key=lambda p: (p.line is None, p.line or 0))
    if not examples:
        raise DatasetError(f"{path.name}: no usable row in the {fmt} format. First problem: {problems[0]}")
    return PreferenceLoad(examples=examples, format=fmt, path=path, problems=problems, total_rows=total)


# ---------------------------------------------------------------------------
# tokenization


def _render_answer(tokenizer: Any, prompt: list[dict], answer: list[dict]) -> tuple[str, str]:
    """The prompt's text (with the generation prompt) and the answer's text that follows it."""
    template = _template_for(tokenizer)
    before = tokenizer.apply_chat_template(prompt, chat_template=template, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + answer, chat_template=template, add_generation_prompt=False, tokenize=False)
    if full.startswith(before):
        return before, full[len(before):]
    # a template that renders a prefix differently: the prompt without the generation prompt
    plain = tokenizer.apply_chat_template(prompt, chat_template=template, add_generation_prompt=False, tokenize=False)
    if full.startswith(plain):
        return plain, full[len(plain):]
    raise ValueError("the chat template renders the answer's conversation differently from its prompt")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class PreferenceRow:
    """One tokenized pair (``chosen_ids``, ``rejected_ids``) or labelled answer (``completion_ids``, ``label``)."""

    prompt_ids: list[int]
    chosen_ids: list[int] | None = None
    rejected_ids: list[int] | None = None
    completion_ids: list[int] | None = None
    label: bool | None = None
    truncated: bool = False
    line: int | None = None


def _fit(prompt: list[int], answers: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Cut prompt + each answer to ``max_length``: the prompt keeps its end (at least half the room),
    answers keep their beginning."""
    longest = max(len(a) for a in answers)
    if len(prompt) + longest <= max_length:
        return prompt, answers, False
    room = max(max_length // 2, max_length - longest)
    prompt = prompt[-room:] if len(prompt) > room else prompt
    return prompt, [a[: max_length - len(prompt)] for a in answers], True


def tokenize_preferences(
    examples: Sequence[PreferenceExample], tokenizer: Any, max_length: int, problems: list[DataProblem] | None = None
) -> list[PreferenceRow]:
    """Token ids of every example's prompt and answers (truncated to ``max_length`` per sequence).

    An example the chat template cannot render is reported in ``problems`` (or raises
    :class:`DatasetError` when ``problems`` is None).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    rows = []
    for index, example in enumerate(examples):
        try:
            answers = [example.chosen, example.rejected] if example.paired else [example.completion]
            texts = [_render_answer(tokenizer, example.prompt, a) for a in answers]
        except Exception as exc:
            message = f"the chat template cannot render it ({exc})"
            if problems is None:
                raise DatasetError(f"line {example.line or index + 1}: {message}") from exc
            problems.append(DataProblem("", example.line, message))
            continue
        prompt_ids = _ids(tokenizer, texts[0][0])
        answer_ids = [_ids(tokenizer, answer) for _prompt, answer in texts]
        prompt_ids, answer_ids, cut = _fit(prompt_ids, answer_ids, max_length)
        if example.paired:
            rows.append(PreferenceRow(prompt_ids, answer_ids[0], answer_ids[1], truncated=cut, line=example.line))
        else:
            rows.append(PreferenceRow(prompt_ids, completion_ids=answer_ids[0], label=example.label, truncated=cut, line=example.line))
    return rows


def sequence(prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
    """Input ids and labels of prompt + answer: only the answer's tokens are trained (the prompt is masked)."""
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)


# ---------------------------------------------------------------------------
# summary


@dataclass
class PreferenceSummary:
    """What a preference dataset looks like to a tokenizer: counts and the lengths of prompts and answers.

    ``pairs`` counts chosen/rejected pairs; for KTO data ``desirable`` and ``undesirable`` count the
    labelled answers. The ``*_lengths`` lists hold tokens per row (for histograms); ``chosen_lengths``
    holds the desirable answers' and ``rejected_lengths`` the undesirable answers' for KTO data.
    """

    path: str
    format: str
    objective: str
    pairs: int
    desirable: int
    undesirable: int
    total_rows: int
    problems: list[str]
    max_length: int
    prompt_lengths: list[int]
    chosen_lengths: list[int]
    rejected_lengths: list[int]
    truncated_rows: int
    mean_chosen_tokens: float
    mean_rejected_tokens: float

    @property
    def rows(self) -> int:
        """Usable training rows: pairs, or labelled answers."""
        return self.pairs or self.desirable + self.undesirable

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def summarize_preferences(load: PreferenceLoad, tokenizer: Any, max_length: int, objective: str = "dpo") -> PreferenceSummary:
    """Pair counts, prompt/chosen/rejected token lengths and truncation for ``load`` under ``tokenizer``."""
    problems = list(load.problems)
    # untruncated lengths: the histogram shows what max_length would cut
    rows = tokenize_preferences(load.examples, tokenizer, 10**9, problems)
    for p in problems:
        p.file = p.file or load.path.name
    paired = [r for r in rows if r.chosen_ids is not None]
    single = [r for r in rows if r.chosen_ids is None]
    chosen = [len(r.chosen_ids) for r in paired] + [len(r.completion_ids) for r in single if r.label]
    rejected = [len(r.rejected_ids) for r in paired] + [len(r.completion_ids) for r in single if not r.label]
    truncated = sum(
        1 for r in rows
        if len(r.prompt_ids) + max(len(x) for x in (r.chosen_ids, r.rejected_ids, r.completion_ids) if x is not None) > max_length
    )
    return PreferenceSummary(
        path=str(load.path),
        format=load.format,
        objective=objective,
        pairs=len(paired),
        desirable=sum(1 for r in single if r.label),
        undesirable=sum(1 for r in single if not r.label),
        total_rows=load.total_rows,
        problems=[str(p) for p in problems],
        max_length=max_length,
        prompt_lengths=[len(r.prompt_ids) for r in rows],
        chosen_lengths=chosen,
        rejected_lengths=rejected,
        truncated_rows=truncated,
        mean_chosen_tokens=round(statistics.fmean(chosen), 1) if chosen else 0.0,
        mean_rejected_tokens=round(statistics.fmean(rejected), 1) if rejected else 0.0,
    )


def preference_length_figure(summary: PreferenceSummary):
    """Plotly histograms of the chosen and rejected answers' token lengths, overlaid."""
    import plotly.graph_objects as go

    good, bad = ("chosen", "rejected") if summary.pairs else ("desirable", "undesirable")
    figure = go.Figure()
    figure.add_trace(go.Histogram(x=summary.chosen_lengths, name=good, opacity=0.6, nbinsx=40))
    figure.add_trace(go.Histogram(x=summary.rejected_lengths, name=bad, opacity=0.6, nbinsx=40))
    figure.update_layout(
        barmode="overlay", height=240, margin=dict(t=10, b=30),
        xaxis_title="answer tokens", yaxis_title="rows", legend=dict(orientation="h", y=1.1),
    )
    return figure


def as_dataset_summary(summary: PreferenceSummary):
    """The preference summary as a :class:`mactuner.data.DatasetSummary` whose rows are pairs of both
    sequences (their lengths added), for the recommender: its batch and memory reasoning then counts
    both sequences of a pair."""
    from mactuner.data.summary import DatasetSummary, percentile

    if summary.pairs:
        answers = [c + r for c, r in zip(summary.chosen_lengths, summary.rejected_lengths)]
        lengths = [2 * p + a for p, a in zip(summary.prompt_lengths, answers)]
    else:
        answers = summary.chosen_lengths + summary.rejected_lengths
        lengths = [p + a for p, a in zip(summary.prompt_lengths, answers)]
    return DatasetSummary(
        path=summary.path, format=summary.format, rows=len(lengths), total_rows=summary.total_rows,
        problems=summary.problems, max_length=summary.max_length, token_lengths=lengths,
        min_tokens=min(lengths, default=0), mean_tokens=round(statistics.fmean(lengths), 1) if lengths else 0.0,
        median_tokens=float(statistics.median(lengths)) if lengths else 0.0, p95_tokens=percentile(lengths, 95),
        max_tokens=max(lengths, default=0), truncated_rows=summary.truncated_rows, trained_lengths=answers,
        trained_tokens=sum(answers), rows_without_trained_tokens=0,
    )
