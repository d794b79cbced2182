"""Asking a collection: the prompt a small chat model follows, the streamed answer, and its evidence.

The prompt (see ``docs/benchmarks.md``, "RAG answers", for the measurements behind it) is built
for models as small as the built-in SmolLM2-135M-Instruct: a short system
instruction, then one user turn holding the numbered sources, the question and a
one-line cue to answer from the sources. Small models copy long instructions and
talk about "the sources" in their answers, so the instruction is two sentences
and says nothing the model could parrot as a fact.

Retrieved text is data, never instructions: the system prompt is fixed and
separate, and every document is escaped (:func:`escape_document`) so it cannot
open a chat turn or close its ``<source>`` block.

A small model can still answer beside its sources. :class:`RagAnswer` therefore
checks, once the answer is complete, whether it shares its content words with
the top source; when it does not, ``RagAnswer.evidence`` is the top source's
sentence that best matches the question, for the UI to show under the answer.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from mactuner.rag.chunking import split_sentences
from mactuner.rag.collection import Collection, SearchHit
from mactuner.rag.embedder import Embedder
from mactuner.safe_text import safe_markdown

RAG_SYSTEM_PROMPT = (
    "Answer the question in one or two sentences, using only the sources. "
    "Cite the source you used by its number, like [1]."
)
# the line after the question: without it SmolLM2-135M answers from its own memory far more often
# (docs/benchmarks.md: 1 of 6 hard questions right without it, 3 of 5 with it). Re-measured on 34 questions
# against the old prompt and eight other short layouts (docs/benchmarks.md, `python -m bench.rag_answers
# --variants all`): 22/34 right, the old prompt 20/34, none of the others more than one question better.
ANSWER_CUE = "Answer from the sources above."


def escape_document(text: str, special_tokens: Iterable[str] = ()) -> str:
    """Make retrieved text inert inside the prompt.

    ``<``, ``>`` and ``&`` become HTML entities, so no chat-template marker such as
    ``<|im_start|>`` and no ``</source>`` delimiter can appear; any other special
    token of the tokenizer (e.g. ``[INST]``) is broken with a zero-width space.
    """
    escaped = html.escape(text, quote=False)
    for token in special_tokens:
        if token and len(token) > 1 and token in escaped:
            escaped = escaped.replace(token, token[0] + "\u200b" + token[1:])
    return escaped


def tokenizer_special_tokens(tokenizer) -> list[str]:
    """Every special or added token string of ``tokenizer`` (the ones a chat template is built from)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(str(t) for t in decoder.values())
    return sorted(tokens, key=len, reverse=True)


def build_rag_messages(question: str, hits: Sequence[SearchHit], *, special_tokens: Iterable[str] = (),
                       max_context_chars: int = 6000) -> list[dict[str, str]]:
    """The conversation for the chat model: the fixed system prompt, then one user turn: sources, then the question.

    Each source is an escaped, numbered ``<source id="N" file="…">`` block (see
    :func:`escape_document`); sources past ``max_context_chars`` are left out so
    the prompt fits a small model's context. The question comes after the
    sources, followed only by the one-line :data:`ANSWER_CUE`.
    """
    special_tokens = list(special_tokens)
    blocks, used = [], 0
    for number, hit in enumerate(hits, start=1):
        body = escape_document(hit.text, special_tokens)
        if blocks and used + len(body) > max_context_chars:
            break
        used += len(body)
        file = escape_document(hit.file, special_tokens).replace('"', "&quot;")
        blocks.append(f'<source id="{number}" file="{file}">\n{body}\n</source>')
    context = "\n\n".join(blocks) if blocks else "(no sources found)"
    user = f"{context}\n\nQuestion: {escape_document(' '.join(question.split()), special_tokens)}\n{ANSWER_CUE}"
    return [{"role": "system", "content": RAG_SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- grounding and evidence

_STOPWORDS = frozenset(
    "the and for are was were has had have with from that this these those which who whom whose what when where "
    "why how its his her their our your you they them she him not but also can could would should will shall may "
    "might does did done been being into onto than then there here about above below over under after before "
    "one two all any some such only very more most other source sources question answer cite number".split()
)


def content_words(text: str) -> set[str]:
    """Lower-case words that carry content: 3+ letters or any number, stop-words dropped, a plural ``s`` trimmed."""
    words = set()
    for word in re.findall(r"[^\W_]+", text.lower()):
        if word in _STOPWORDS or (len(word) < 3 and not word.isdigit()):
            continue
        words.add(word[:-1] if len(word) > 4 and word.endswith("s") and not word.endswith("ss") else word)
    return words


def overlaps_source(answer: str, source: str, question: str = "", *, threshold: float = 0.5) -> bool:
    """Whether ``answer`` states what ``source`` says: at least ``threshold`` of the answer's own content words
    (those not already in ``question``) occur in ``source``. An answer that only repeats the question does not."""
    own = content_words(re.sub(r"\[\d+\]", " ", answer)) - content_words(question)
    if not own:
        return False
    return len(own & content_words(source)) / len(own) >= threshold


QUOTE_WORDS = 5  # consecutive words an answer must share with a source, in order, to "quote" it


def _plain_words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", re.sub(r"\[\d+\]", " ", text).lower())


def quotes_source(answer: str, source: str, *, min_words: int = QUOTE_WORDS) -> bool:
    """Whether ``answer`` repeats ``min_words`` consecutive words of ``source`` word for word (case, punctuation
    and ``[n]`` citations aside); a shorter answer must appear whole. An answer under 3 words quotes nothing.

    This says where the answer's words come from, not whether it answers the question.
    """
    words = _plain_words(answer)
    if len(words) < 3:
        return False
    n = min(min_words, len(words))
    text = f" {' '.join(_plain_words(source))} "
    return any(f" {' '.join(words[i:i + n])} " in text for i in range(len(words) - n + 1))


@dataclass
class Evidence:
    """The sentence of a source that best matches the question."""

    source: int  # 1-based number of the source in the prompt (as the answer cites it: [1])
    file: str
    position: str
    sentence: str
    score: float  # cosine similarity of the sentence to the question

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def best_sentence(question_vector: np.ndarray, hit: SearchHit, embedder: Embedder, *, source: int = 1
                  ) -> Evidence | None:
    """The sentence of ``hit`` closest to the question (by the collection's embedder), or None if it has none."""
    sentences = split_sentences(hit.text)
    if not sentences:
        return None
    scores = embedder.embed(sentences) @ np.asarray(question_vector, dtype=np.float32)
    best = int(np.argmax(scores))
    return Evidence(source=source, file=hit.file, position=hit.position, sentence=sentences[best],
                    score=float(scores[best]))


@dataclass
class RagAnswer:
    """An answer being generated (iterate ``stream`` for text pieces), the sources it was given and its evidence.

    Read ``citations``, ``grounded`` and ``evidence`` once the stream is exhausted
    (before that they describe the answer so far).
    """

    question: str
    sources: list[SearchHit]
    messages: list[dict[str, str]]
    stream: Any  # mactuner.chat.ChatStream: an iterator of str with .text and .stats
    support: Evidence | None = None  # the top source's sentence that best matches the question

    def __iter__(self) -> Iterator[str]:
        return iter(self.stream)

    @property
    def text(self) -> str:
        """The answer so far (all of it once the stream is exhausted)."""
        return self.stream.text

    @property
    def citations(self) -> list[int]:
        """The source numbers the answer cites as ``[n]`` (only numbers of sources it was given), in order."""
        cited = (int(n) for n in re.findall(r"\[(\d+)\]", self.text))
        return list(dict.fromkeys(n for n in cited if 1 <= n <= len(self.sources)))

    @property
    def supported_by(self) -> list[int]:
        """The numbers of the sources whose text the answer states (see :func:`overlaps_source`), best first.

        Small models often leave out the ``[n]`` they were asked for; this says which sources the answer
        matches whether or not it cites them (MacTuner's check, not the model's claim).
        """
        return [n for n, hit in enumerate(self.sources, start=1) if overlaps_source(self.text, hit.text, self.question)]

    @property
    def grounded(self) -> bool:
        """Whether the answer states what the top source says (see :func:`overlaps_source`)."""
        return bool(self.sources) and overlaps_source(self.text, self.sources[0].text, self.question)

    @property
    def evidence(self) -> Evidence | None:
        """The top source's best sentence when the answer does not overlap the top source, else None.

        This is what a person should read under an answer a small model made up
        or copied from the wrong place: the retrieved fact itself.
        """
        return None if self.grounded else self.support

    @property
    def quoted(self) -> list[int]:
        """The numbers of the sources the answer repeats word for word (see :func:`quotes_source`)."""
        return [n for n, hit in enumerate(self.sources, start=1) if quotes_source(self.text, hit.text)]

    def to_record(self) -> dict[str, Any]:
        """The answer as a JSON-ready record, read once the stream is exhausted: ``question``, ``answer``
        (the text), ``evidence`` (:meth:`Evidence.to_dict` or None), ``citations``, ``supported_by``,
        ``quoted`` and ``sources`` (each :meth:`SearchHit.to_dict`). The RAG page keeps it to show the answer
        again."""
        return {"question": self.question, "answer": self.text,
                "evidence": self.evidence.to_dict() if self.evidence else None, "citations": self.citations,
                "supported_by": self.supported_by, "quoted": self.quoted,
                "sources": [hit.to_dict() for hit in self.sources]}


def _numbers(numbers: list[int]) -> str:
    return ", ".join(f"[{n}]" for n in numbers)


def support_note(record: dict[str, Any]) -> str | None:
    """A line under an answer (a :meth:`RagAnswer.to_record`) that states its top source, saying where its
    words come from, or None.

    "Quotes source [1]" only when it repeats the source word for word (:func:`quotes_source`); an answer
    that shares the top source's words without quoting it "uses the words of" it. Neither is a verdict that
    the answer is right, and the note says so. None for an answer that does not state its top source (see
    :func:`answer_warning`, shown before such an answer instead).
    """
    if record.get("evidence") or not record.get("supported_by"):
        return None
    quoted = record.get("quoted") or []
    if quoted:
        return (f"Quotes source {_numbers(quoted)} word for word (checked by MacTuner; whether it answers "
                "the question is for you to judge)")
    return (f"Uses the words of source {_numbers(record['supported_by'])} without quoting it (checked by "
            "MacTuner, which compares words, not facts)")


def answer_warning(record: dict[str, Any]) -> str | None:
    """For an answer that does not state what its top source says (a record with ``evidence``): Markdown to
    show *before* the answer, saying so and giving the top source's sentence closest to the question.
    None for an answer that states its top source.

    A small model often answers from the wrong chunk or from its own memory, confidently; the person
    should read the retrieved fact first, not after the answer.
    """
    evidence = record.get("evidence")
    if not evidence:
        return None
    elsewhere = [n for n in record.get("quoted") or [] if n != evidence["source"]]
    if elsewhere:
        headline = (f"**Not what the top source says: check the evidence.** The answer below quotes source "
                    f"{_numbers(elsewhere)}, which matched the question less well.")
    else:
        headline = ("**Not found in the sources: check the evidence.** The answer below does not state what "
                    f"the top source [{evidence['source']}] says.")
    return f"{headline}\n\n{evidence_note(evidence)}"


def evidence_note(evidence: dict[str, Any]) -> str:
    """Markdown showing an :meth:`Evidence.to_dict`: the top source's sentence closest to the question."""
    # the sentence and the file name are the documents' own text: shown, never fetched or linked
    sentence = " ".join(safe_markdown(str(evidence["sentence"])).split())
    return (f"Evidence from source [{evidence['source']}] {safe_markdown(str(evidence['file']))} · "
            f"{evidence['position']} (its sentence closest to the question):\n\n> {sentence}")


def source_title(number: int, hit: dict[str, Any]) -> str:
    """A source's heading: ``[1] handbook.md · line 12, chunk 0 · score 0.734`` (``hit`` a :meth:`SearchHit.to_dict`)."""
    # an expander's label is Markdown: the file name (the documents' own) is shown, never fetched or linked
    return f"[{number}] {safe_markdown(str(hit['file']))} · {hit['position']} · score {hit['score']:.3f}"


def ask(collection: Collection, question: str, embedder: Embedder, loaded, *, top_k: int = 4,
        settings=None, max_context_chars: int = 6000) -> RagAnswer:
    """Retrieve the ``top_k`` chunks for ``question`` and start answering with the chat model.

    Args:
        collection: the documents to search.
        question: the person's question.
        embedder: the collection's embedding model (see :func:`mactuner.rag.load_embedder`).
        loaded: a chat model from ``mactuner.chat.load_chat_model`` (base or with an adapter).
        top_k: chunks retrieved and shown to the model.
        settings: ``mactuner.chat.GenerationSettings``; its system prompt is replaced by the fixed RAG one.
        max_context_chars: cap on the source text put into the prompt.

    Returns:
        A :class:`RagAnswer`: iterate it for the streamed answer; ``sources`` are the chunks the model saw,
        ``evidence`` (after the stream) the top source's best sentence when the answer strays from it.
    """
    from mactuner.chat import GenerationSettings, stream_chat

    if not question or not question.strip():
        raise ValueError("ask a question: the text is empty")
    collection.check_embedder(embedder)
    query = embedder.embed_query(question)
    hits = collection.search_vector(query, top_k, device=embedder.device)
    messages = build_rag_messages(question, hits, special_tokens=tokenizer_special_tokens(loaded.tokenizer),
                                  max_context_chars=max_context_chars)
    used = hits[: messages[1]["content"].count('<source id="')]
    support = best_sentence(query, used[0], embedder) if used else None
    # the system turn is ours alone: the settings' own system prompt is not used here
    settings = replace(settings or GenerationSettings(temperature=0.0), system_prompt=None)
    stream = stream_chat(loaded, messages, settings)
    return RagAnswer(question=question, sources=used, messages=messages, stream=stream, support=support)
