"""The per-fact report: did the fine-tune learn *these* facts, and would documents have done it?

For each question (from a file of questions and expected answers, a run's held-out rows, or
facts typed on the page) up to four answers, greedy, side by side:

- ``base``: the base model alone;
- ``tuned``: the fine-tuned model alone;
- ``base + documents`` and ``tuned + documents``: the same models given the passages a RAG
  collection retrieves for the question (:mod:`mactuner.rag`, the Chat page's prompt).

Each answer is marked right or wrong by one stated rule (:data:`RULE`,
:func:`mactuner.evaluation.matching.phrase_match`): right when an expected key phrase appears in
it after normalising. Beside it, the cosine similarity of the answer to the expected answer under
the offline all-MiniLM-L6-v2 embedder (a hint for answers that say it in other words: it does not
change the mark). An answer is flagged *unsupported* when most of its own content words (those
not already in the question) occur neither in the expected answer nor in the retrieved passages
(:func:`mactuner.rag.overlaps_source`): it states something nothing given supports. Paraphrased
questions are asked too, and count in the totals as their own rows. Totals per column; the
forgetting line (:mod:`mactuner.evaluation.forgetting`) comes with the report.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mactuner.evaluation.matching import normalise, phrase_match

RULE = ("right = an expected key phrase appears in the answer (lower case, punctuation and spacing ignored, "
        "number words = digits); similarity = cosine of answer and expected answer (all-MiniLM-L6-v2), shown "
        "beside, never changes the mark; unsupported = most of the answer's own content words are in neither "
        "the expected answer nor the retrieved passages")
COLUMNS = ("base", "tuned", "base + documents", "tuned + documents")
FACTS_FILE = "facts_report.json"

_QUESTION_KEYS = ("question", "prompt", "instruction", "q")
_ANSWER_KEYS = ("answer", "expected", "reference", "output", "response", "a")
_KEYWORD_KEYS = ("answer_keyword", "keyword", "keywords", "key_phrase", "key_phrases", "expected_phrase")
_PARAPHRASE_KEYS = ("paraphrases", "paraphrase", "unseen_question", "unseen_questions")


@dataclass(frozen=True)
class Fact:
    """A question, its expected answer, the key phrases a right answer contains, and its paraphrases."""

    question: str
    expected: str
    keywords: tuple[str, ...] = ()
    paraphrases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError("a fact needs a question")
        if not self.expected.strip() and not self.keywords:
            raise ValueError(f"{self.question!r}: a fact needs an expected answer or a key phrase")

    @property
    def key_phrases(self) -> tuple[str, ...]:
        """What a right answer must contain: the given key phrases, else the expected answer's words that the
        question does not already hold (stop words aside), else the whole expected answer."""
        if self.keywords:
            return self.keywords
        from mactuner.evaluate import reference_keywords

        words = reference_keywords(self.expected, self.question)
        return (" ".join(words),) if words else (self.expected,)


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    lowered = {str(k).strip().lower(): v for k, v in row.items()}
    for key in keys:
        value = lowered.get(key)
        if value not in (None, "", []):
            return value
    return None


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split("|") if p.strip())
    return tuple(str(v).strip() for v in value if str(v).strip())


def fact_from_row(row: dict[str, Any], where: str = "") -> Fact:
    """A :class:`Fact` from a dict with a question and an answer (and optional key phrases, paraphrases).

    Raises:
        ValueError: a question or answer is missing (``where`` names the row).
    """
    question, answer = _pick(row, _QUESTION_KEYS), _pick(row, _ANSWER_KEYS)
    keywords = _as_tuple(_pick(row, _KEYWORD_KEYS))
    if not isinstance(question, str) or not (isinstance(answer, str) or keywords):
        raise ValueError(f"{where}needs a question and an expected answer (columns such as question, answer; "
                         f"optional answer_keyword and paraphrases), got keys {sorted(map(str, row))}")
    return Fact(question.strip(), str(answer or "").strip(), keywords, _as_tuple(_pick(row, _PARAPHRASE_KEYS)))


def load_facts(path: str | os.PathLike) -> list[Fact]:
    """Facts from a JSON list, a JSONL file or a CSV with a header (question, answer[, answer_keyword, paraphrases]).

    Several key phrases or paraphrases go in a list, or in one text separated by ``|``.

    Raises:
        ValueError: the file cannot be read as facts (the message names the row).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    elif path.suffix.lower() == ".jsonl":
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as error:
            raise ValueError(f"{path} is not JSON lines: {error}") from None
    else:
        try:
            rows = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path} is not JSON (or use .jsonl / .csv): {error}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} holds no facts: expected a list of rows with a question and an answer")
    return [fact_from_row(row if isinstance(row, dict) else {}, f"{path.name} row {n}: ") for n, row in enumerate(rows, 1)]


def parse_typed_facts(text: str) -> list[Fact]:
    """Facts typed one per line: ``question | expected answer | paraphrase | …`` (blank lines skipped).

    Raises:
        ValueError: a line without both a question and an expected answer (the message names it).
    """
    facts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ValueError(f"line {number}: write 'question | expected answer' (then optional '| paraphrase'), "
                             f"got {line.strip()!r}")
        facts.append(Fact(parts[0], parts[1], paraphrases=tuple(p for p in parts[2:] if p)))
    return facts


def facts_from_examples(examples) -> list[Fact]:
    """Facts from dataset rows (``mactuner.data.Example``): the last user turn and the assistant's answer."""
    facts = []
    for example in examples:
        messages = example.messages or []
        if not messages or messages[-1]["role"] != "assistant":
            continue
        question = next((m["content"] for m in reversed(messages[:-1]) if m["role"] == "user"), "")
        if question.strip() and messages[-1]["content"].strip():
            facts.append(Fact(question, messages[-1]["content"]))
    return facts


@dataclass
class FactAnswer:
    """One model's answer to one question."""

    text: str
    right: bool
    similarity: float | None = None
    unsupported: bool = False


@dataclass
class FactRow:
    """One question asked of every column."""

    question: str
    expected: str
    key_phrases: list[str]
    paraphrase_of: str | None  # the original question when this row is a paraphrase
    answers: dict[str, FactAnswer]


@dataclass
class FactReport:
    """Every question's answers per column, the totals, the rule, and the forgetting line."""

    columns: list[str]
    rows: list[FactRow]
    rule: str = RULE
    collection: str | None = None
    forgetting: dict[str, Any] | None = None
    adapter: str = ""
    base: str = ""
    source: str = ""  # where the questions came from
    device: str = ""
    seconds: float = 0.0
    created: float = 0.0

    @property
    def totals(self) -> dict[str, dict[str, int]]:
        """Per column: right answers, questions asked, unsupported answers."""
        return {c: {"right": sum(r.answers[c].right for r in self.rows), "asked": len(self.rows),
                    "unsupported": sum(r.answers[c].unsupported for r in self.rows)} for c in self.columns}

    def forgetting_line(self) -> str | None:
        """"Kept N of M things the base model knew …" (None when not checked)."""
        return None if self.forgetting is None else self.forgetting.get("headline")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the totals and the forgetting line."""
        return {**asdict(self), "totals": self.totals, "forgetting_line": self.forgetting_line()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactReport:
        """Inverse of :meth:`to_dict`."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["rows"] = [FactRow(**{**r, "answers": {c: FactAnswer(**a) for c, a in r["answers"].items()}})
                         for r in known.get("rows", [])]
        return cls(**known)

    def table(self) -> list[dict[str, Any]]:
        """One flat dict per question for a table: each column's answer, its mark and similarity."""
        out = []
        for row in self.rows:
            line: dict[str, Any] = {"question": row.question + (" (paraphrase)" if row.paraphrase_of else ""),
                                    "expected": row.expected}
            for column in self.columns:
                answer = row.answers[column]
                mark = "✓" if answer.right else "✗"
                if answer.unsupported:
                    mark += " unsupported"
                similarity = "" if answer.similarity is None else f" · sim {answer.similarity:.2f}"
                line[column] = f"{mark}{similarity} — {answer.text}"
            out.append(line)
        return out


def _unsupported(answer: str, question: str, expected: str, passages: list[str]) -> bool:
    from mactuner.rag import content_words, overlaps_source

    if phrase_match(answer, [expected]) or not (content_words(answer) - content_words(question)):
        return False
    return not overlaps_source(answer, "\n".join([expected, *passages]), question)


def fact_report(
    adapter: str | os.PathLike,
    facts: list[Fact],
    *,
    model: str | None = None,
    device=None,
    collection: str | None = None,
    top_k: int = 3,
    similarity: bool = True,
    similarity_model: str | None = None,
    forgetting: bool = True,
    max_new_tokens: int = 48,
    source: str = "",
    progress=None,
) -> FactReport:
    """Ask every fact (and its paraphrases) of the base and the tuned model, with and without documents.

    Args:
        adapter: the tuned adapter (``RUN/adapter``, a checkpoint) or a full fine-tune's model folder.
        facts: the questions with their expected answers.
        model: the base model; default the one the adapter (or run) recorded.
        device: where to run.
        collection: a RAG collection's name: adds the two ``+ documents`` columns.
        top_k: passages retrieved per question.
        similarity: add the embedding similarity beside each mark (loads all-MiniLM-L6-v2).
        similarity_model: another sentence-transformers model for the similarity (a folder or name).
        forgetting: ask both models the general set too (kept N of M); a run's saved check is reused.
        max_new_tokens: longest answer.
        source: where the facts came from (shown with the report).
        progress: ``(message, fraction or None)`` callback.

    Raises:
        ValueError: no facts; RagError: the collection cannot be opened.
    """
    from mactuner.chat import load_chat_model
    from mactuner.devices import resolve_device
    from mactuner.evaluate import _base_source, _load_tuned, run_folder_of
    from mactuner.evaluation.forgetting import greedy_answers, greedy_chat, load_forgetting, load_general_set, score_forgetting
    from mactuner.models import release_model

    if not facts:
        raise ValueError("no facts to ask: give questions with their expected answers")
    started = time.perf_counter()
    device = resolve_device(device)
    adapter = Path(adapter).expanduser()
    base_source = _base_source(adapter, model)
    report = lambda m, f: progress(m, f) if progress else None
    # every question asked: the facts, then their paraphrases
    asked: list[tuple[Fact, str, str | None]] = [(f, f.question, None) for f in facts]
    asked += [(f, p, f.question) for f in facts for p in f.paraphrases]
    passages: list[list[str]] = [[] for _ in asked]
    conversations_docs = None
    columns = ["base", "tuned"]
    retriever = None
    if collection:
        from mactuner.rag import Collection, load_embedder

        opened = Collection.open(collection)
        report(f"Loading {opened.settings.embedding_model} and retrieving passages from {collection}…", 0.03)
        retriever = load_embedder(opened.settings.embedding_model, device=device)
        conversations_docs = [opened.search(text, retriever, top_k=top_k) for _, text, _ in asked]
        passages = [[h.text for h in found] for found in conversations_docs]
        columns += ["base + documents", "tuned + documents"]
    scorer = None
    if similarity:
        from mactuner.rag import DEFAULT_EMBEDDING_MODEL, load_embedder

        wanted = similarity_model or DEFAULT_EMBEDDING_MODEL
        scorer = retriever if retriever is not None and retriever.name == wanted else None
        if scorer is None:
            report(f"Loading the embedder {Path(wanted).name} for the similarity…", 0.05)
            scorer = load_embedder(wanted, device=device)
    saved_forgetting = load_forgetting(run_folder_of(adapter)) if forgetting and run_folder_of(adapter) else None
    general = load_general_set() if forgetting and saved_forgetting is None else []
    answers: dict[str, list[str]] = {}
    general_answers: dict[str, list[str]] = {}
    for index, who in enumerate(("base", "tuned")):
        report(f"Loading the {who} model…", 0.1 + 0.4 * index)
        loaded = (load_chat_model(base_source, device=device, decode_weights="exact") if who == "base"
                  else _load_tuned(adapter, model, device))
        try:
            report(f"The {who} model answers {len(asked)} questions…", 0.2 + 0.4 * index)
            answers[who] = greedy_answers(loaded.model, loaded.tokenizer, [text for _, text, _ in asked],
                                          max_new_tokens=max_new_tokens)
            if conversations_docs is not None:
                from mactuner.rag import build_rag_messages, tokenizer_special_tokens

                special = tokenizer_special_tokens(loaded.tokenizer)
                report(f"The {who} model answers with the documents…", 0.3 + 0.4 * index)
                answers[f"{who} + documents"] = greedy_chat(
                    loaded.model, loaded.tokenizer,
                    [build_rag_messages(text, found, special_tokens=special)
                     for (_, text, _), found in zip(asked, conversations_docs)],
                    max_new_tokens=max_new_tokens, batch_size=4)
            if general:
                report(f"The {who} model answers the general questions…", 0.4 + 0.4 * index)
                general_answers[who] = greedy_answers(loaded.model, loaded.tokenizer, [q.question for q in general])
        finally:
            release_model(loaded)
            del loaded
    similarities: dict[str, list[float]] = {}
    if scorer is not None:
        report("Measuring similarity to the expected answers…", 0.92)
        expected_vectors = scorer.embed([f.expected or " ".join(f.key_phrases) for f, _, _ in asked])
        for column in columns:
            vectors = scorer.embed(answers[column])
            similarities[column] = [float(v) for v in (vectors * expected_vectors).sum(axis=1)]
    rows = []
    for i, (fact, text, original) in enumerate(asked):
        marked = {}
        for column in columns:
            answer = answers[column][i]
            docs = passages[i] if column.endswith("documents") else []
            marked[column] = FactAnswer(
                text=answer, right=phrase_match(answer, fact.key_phrases),
                similarity=round(similarities[column][i], 3) if column in similarities else None,
                unsupported=_unsupported(answer, text, fact.expected, docs),
            )
        rows.append(FactRow(text, fact.expected, list(fact.key_phrases), original, marked))
    if saved_forgetting is not None:
        forgetting_result = saved_forgetting.to_dict()
    elif general and len(general_answers) == 2:
        forgetting_result = score_forgetting(general, general_answers["base"], general_answers["tuned"]).to_dict()
    else:
        forgetting_result = None
    report("Done.", 1.0)
    return FactReport(columns=columns, rows=rows, collection=collection, forgetting=forgetting_result,
                      adapter=str(adapter), base=str(base_source), source=source, device=str(device),
                      seconds=round(time.perf_counter() - started, 2), created=time.time())


def save_report(report: FactReport, run_dir: str | os.PathLike) -> Path:
    """Write ``RUN/facts_report.json`` atomically."""
    from mactuner import fileio

    return fileio.write_json_atomic(Path(run_dir) / FACTS_FILE, report.to_dict())


def load_report(run_dir: str | os.PathLike) -> FactReport | None:
    """The run's last per-fact report, or ``None``."""
    try:
        return FactReport.from_dict(json.loads((Path(run_dir) / FACTS_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


__all__ = ["COLUMNS", "RULE", "Fact", "FactAnswer", "FactReport", "FactRow", "fact_from_row", "fact_report",
           "facts_from_examples", "load_facts", "parse_typed_facts", "load_report", "normalise", "save_report"]
