"""Chat conversations kept on disk, one per model choice, so a page reload finds them again.

A conversation is a list of turns, as the chat page keeps it::

    {"role": "user", "content": "What is the capital of Quenmark?"}
    {"role": "assistant", "answers": {"base": "…", "fine-tuned": "…"},
     "stats": {"base": ChatStats.to_dict(), "fine-tuned": {…}}}

One user turn is followed by one assistant turn holding every model's answer
(two in Compare mode). Each model sees only its *own* earlier answers
(:func:`conversation`): in Compare mode the base model never reads what the
fine-tuned one said, so the comparison stays honest.

The file for a choice of base model, adapter and mode is
``MACTUNER_HOME/chat/<key>.json`` (:func:`history_file`), written atomically
(:mod:`mactuner.fileio`) as soon as each side has answered (:class:`ChatTurn`), including
an answer stopped half-way: in Compare mode the first side's answer is on disk while the
second side still answers, so a reload, a closed tab or a server that goes away keeps it.

Several writers may share that file: two browser tabs with the same model
choice, and, in one tab, the script run a Stop click interrupted and the run the
click started. So a writer never rewrites the file from the conversation it
loaded earlier: :func:`save_turn` merges *its* question and the answers of its
reply, by the id the pair shares (:func:`new_turn`), into what the file holds now,
under a lock.
:class:`AnswersInFlight` lets the next script run of a tab wait until the
answers its interrupted runs were writing are saved (see its docstring).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mactuner import fileio, paths
from mactuner.fileio import write_json_atomic

SAVE_LOCK_TIMEOUT = 30.0  # seconds a writer waits for another tab's write of the same conversation

Message = dict[str, str]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ChatChoice:
    """Who answers on the chat page: the base model, a fine-tuned one, or both side by side.

    Attributes:
        model: the base model (the built-in name, a hub id or a folder).
        adapter: what makes the fine-tuned model (an adapter, an exported model or a
            ``.gguf`` file); ``""`` for none.
        compare: both answer every question side by side. Only with an adapter: without
            one there is nothing to compare, and the flag is dropped.
    """

    model: str
    adapter: str = ""
    compare: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter", str(self.adapter or ""))
        object.__setattr__(self, "compare", bool(self.compare and self.adapter))

    @property
    def sides(self) -> list[str]:
        """Who answers, in order: ``["base", "fine-tuned"]`` in Compare mode, else the one model."""
        return ["base", "fine-tuned"] if self.compare else ["fine-tuned" if self.adapter else "base"]

    def adapter_of(self, who: str) -> str:
        """The adapter the side ``who`` answers with: ``""`` for the base model."""
        return self.adapter if who == "fine-tuned" else ""

    @property
    def key(self) -> str:
        """This choice's conversation key (:func:`history_key`)."""
        return history_key(self.model, self.adapter, self.compare)

    def to_dict(self) -> dict[str, Any]:
        """``model``, ``adapter`` and ``compare``, as :func:`save_turn` stores them beside the conversation."""
        return {"model": self.model, "adapter": self.adapter, "compare": self.compare}


def history_key(model: str, adapter: str = "", compare: bool = False) -> str:
    """A file-safe, stable name for one model choice (readable part + a hash of the whole choice)."""
    choice = json.dumps([model or "", str(adapter or ""), bool(compare)])
    digest = hashlib.sha256(choice.encode()).hexdigest()[:12]
    # the adapter's run id says most about it ("RUN/adapter", "RUN/checkpoints/step-N")
    adapter_path = Path(str(adapter)) if adapter else None
    if adapter_path is not None:
        run = adapter_path.parent.parent if adapter_path.parent.name == "checkpoints" else adapter_path.parent
        readable = f"{run.name}-{adapter_path.name}"
    else:
        readable = Path(model or "default").name
    readable = fileio.slug(readable, default="chat", max_chars=60)
    return f"{readable}{'-compare' if compare else ''}-{digest}"


def history_dir() -> Path:
    """Folder of the saved conversations."""
    return paths.home() / "chat"


def history_file(key: str) -> Path:
    """The file holding the conversation of ``key`` (see :func:`history_key`)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", key) or key.startswith("."):
        raise ValueError(f"not a conversation key: {key!r}; make one with history_key()")
    return history_dir() / f"{key}.json"


def load_history(key: str, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The saved conversation of ``key``; empty when there is none.

    A file that cannot be read whole (cut mid-line by a disk error, a sync program, a hand
    edit) is never dropped: it is copied to ``KEY.damaged-TIME.json`` beside it, the turns
    that can still be read are kept and written back, and a sentence saying so is appended
    to ``notes`` (the page shows it).
    """
    turns, damaged = _read_history(key)
    if not damaged:
        return turns
    with _locked(key):
        return _repair(key, notes)


def _read_history(key: str) -> tuple[list[dict[str, Any]], bool]:
    """The conversation's turns, and whether the file was damaged (then: the turns that could be read)."""
    try:
        text = history_file(key).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], False
    except OSError:
        return [], False  # unreadable right now (a folder, no permission): not ours to copy
    try:
        data = json.loads(text)
    except ValueError:
        return _readable_turns(text), True
    turns = data.get("history") if isinstance(data, dict) else None
    if not isinstance(turns, list):
        return [], True
    return [t for t in turns if _is_turn(t)], False


def _readable_turns(text: str) -> list[dict[str, Any]]:
    """The whole turns at the start of a damaged file's ``"history"`` list."""
    decoder = json.JSONDecoder()
    start = text.find('"history"')
    start = text.find("[", start) if start >= 0 else -1
    turns: list[dict[str, Any]] = []
    if start < 0:
        return turns
    at = start + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        try:
            turn, at = decoder.raw_decode(text, at)
        except ValueError:
            return turns
        if _is_turn(turn):
            turns.append(turn)


def _repair(key: str, notes: list[str] | None) -> list[dict[str, Any]]:
    """Under the conversation's lock: keep a copy of a damaged file and write back what could be read."""
    turns, damaged = _read_history(key)
    if not damaged:
        return turns  # another tab repaired it meanwhile
    file = history_file(key)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    copy, n = file.with_name(f"{key}.damaged-{stamp}.json"), 1
    while copy.exists():
        n += 1
        copy = file.with_name(f"{key}.damaged-{stamp}-{n}.json")
    shutil.copy2(file, copy)
    text = file.read_text(encoding="utf-8", errors="replace")
    choice = {}
    for name in ("model", "adapter"):
        if found := re.search(rf'"{name}":\s*("(?:[^"\\\\]|\\\\.)*")', text[: max(text.find('"history"'), 0)]):
            with contextlib.suppress(ValueError):
                choice[name] = json.loads(found.group(1))
    save_history(key, turns, **choice)
    asked = sum(1 for t in turns if t.get("role") == "user")
    if notes is not None:
        kept = f"{asked} of its turns were recovered" if asked else "no turn could be read"
        notes.append(f"The saved conversation was damaged (cut short or edited); {kept}. "
                     f"The damaged file is kept as {copy.name} in {copy.parent}.")
    return turns


def save_history(key: str, history: list[dict[str, Any]], **choice: Any) -> Path:
    """Write the conversation of ``key`` atomically; ``choice`` (model, adapter…) is stored beside it for people."""
    data = {"version": FORMAT_VERSION, **{k: str(v) if isinstance(v, Path) else v for k, v in choice.items()},
            "history": history}
    return write_json_atomic(history_file(key), data)


def clear_history(key: str, in_flight: AnswersInFlight | None = None, timeout: float | None = None) -> None:
    """Forget the conversation of ``key`` (the "New chat" button).

    With ``in_flight`` (the tab's :class:`AnswersInFlight`), first wait up to ``timeout``
    seconds for the answers its runs are still writing: a stopped answer saved after the
    clear would bring the old conversation back.
    """
    if in_flight is not None:
        in_flight.wait(timeout)
    with _locked(key):
        history_file(key).unlink(missing_ok=True)


def new_turn(question: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A question and its reply (no answers yet), sharing a fresh ``id`` that :func:`save_turn` matches on."""
    turn_id = uuid.uuid4().hex
    return ({"role": "user", "content": question, "id": turn_id},
            {"role": "assistant", "answers": {}, "stats": {}, "id": turn_id})


def save_turn(key: str, question: dict[str, Any], reply: dict[str, Any], **choice: Any) -> list[dict[str, Any]]:
    """Merge one question and its reply into the saved conversation of ``key``; return the conversation saved.

    A pair with the same ``id`` already saved (the same turn saved again: after each Compare side,
    at the end of the answer) is updated in place, side by side: the answers and figures of the
    sides ``reply`` holds replace the saved ones, and a side only the file holds (saved by another
    writer of the same turn) is kept. Otherwise the pair is appended. Turns other writers saved
    meanwhile (another tab, a stopped run finishing late) are kept: the file is read, changed and
    written under a lock, never rewritten from a copy loaded earlier. ``choice`` is stored beside
    the conversation as in :func:`save_history`.

    Raises:
        TimeoutError: another writer held the conversation for longer than ``SAVE_LOCK_TIMEOUT``.
    """
    turn_id = question.get("id")
    if not turn_id or reply.get("id") != turn_id:
        raise ValueError("a question and its reply must share an id; make them with new_turn()")
    with _locked(key):
        history = _repair(key, None)
        at = next((i for i, turn in enumerate(history) if turn.get("role") == "user" and turn.get("id") == turn_id), None)
        if at is None:
            history += [question, reply]
        else:
            end = at + 2 if at + 1 < len(history) and history[at + 1].get("role") == "assistant" else at + 1
            saved = history[at + 1] if end == at + 2 else {}
            merged = {**reply, "answers": {**saved.get("answers", {}), **reply.get("answers", {})},
                      "stats": {**saved.get("stats", {}), **reply.get("stats", {})}}
            history[at:end] = [question, merged]
        save_history(key, history, **choice)
    return history


class ChatTurn:
    """One question on the chat page, answered by each side of a :class:`ChatChoice` in turn and
    saved into the choice's conversation as soon as each side has answered.

    Use it as a context manager around the whole answer: leaving it saves the question even when
    no side began (a Stop while a model loads, an error), and writes nothing more when each side
    already saved::

        with ChatTurn(choice, "What is the capital of Quenmark?") as turn:
            for who in choice.sides:
                stream = stream_chat(model_of(who), turn.conversation(history, who), settings)
                try:
                    consume(stream)  # drawn piece by piece; a Stop interrupts it
                finally:
                    turn.record(who, stream)  # saved now, stopped or not

    Attributes:
        choice: who answers, and which conversation the turn belongs to (``choice.key``).
        question, reply: the pair as :func:`new_turn` makes it; ``reply`` fills in side by side.
    """

    def __init__(self, choice: ChatChoice, question: str) -> None:
        self.choice = choice
        self.question, self.reply = new_turn(question)
        self._saved: str | None = None  # the reply as last saved (JSON), to skip a write that changes nothing

    def conversation(self, history: list[dict[str, Any]], who: str) -> list[Message]:
        """What ``who`` is asked: ``history`` as it had it (:func:`conversation`), then this question."""
        return conversation([*history, self.question], who)

    def record(self, who: str, stream: Any) -> dict[str, Any]:
        """Store ``who``'s answer from its ended (or stopped) stream (:func:`record_answer`), save the turn
        at once, and return the answer's figures."""
        record_answer(self.reply, who, stream)
        self.save()
        return self.reply["stats"][who]

    def save(self) -> None:
        """Merge the turn as it is now into the saved conversation (:func:`save_turn`)."""
        state = json.dumps(self.reply, sort_keys=True)
        save_turn(self.choice.key, self.question, self.reply, **self.choice.to_dict())
        self._saved = state

    @property
    def pair(self) -> list[dict[str, Any]]:
        """The question and its reply, as they follow the earlier turns of a conversation."""
        return [self.question, self.reply]

    def __enter__(self) -> ChatTurn:
        return self

    def __exit__(self, *exc: object) -> None:
        # however the answer ended: the question is kept, and whatever was recorded since the last save
        if self._saved != json.dumps(self.reply, sort_keys=True):
            self.save()


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    # one writer of a conversation at a time, across tabs (threads) and processes
    folder = history_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f".{key}.lock"), is_singleton=False)
    try:
        lock.acquire(timeout=SAVE_LOCK_TIMEOUT)
    except Timeout as exc:
        raise TimeoutError(f"Another tab kept the conversation {key} locked for {SAVE_LOCK_TIMEOUT:.0f} s; "
                           "ask again in a moment.") from exc
    try:
        yield
    finally:
        lock.release()


class AnswersInFlight:
    """The answers one browser tab's script runs are still writing, so that its next run can wait for them.

    When a person clicks (Stop, or any widget) while an answer streams, Streamlit
    (``runner.fastReruns``, on by default) starts the next script run at once in a
    new thread and only *asks* the running one to stop; that one stops at its next
    yield point (the next token, or the end of reading a long prompt) and saves the
    stopped answer then. A next run that loaded the conversation before that save
    would draw the page without the stopped turn, and nothing redraws it later.
    So the answering run holds :meth:`writing` until its turn is saved, and the
    next run calls :meth:`wait` before it loads the conversation.

    Keep one per browser session (the page keeps it in its session state). Safe to
    use from several threads.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._writing = 0

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held by a script run from the question until its turn is saved (however the run ends)."""
        with self._changed:
            self._writing += 1
        try:
            yield
        finally:
            with self._changed:
                self._writing -= 1
                self._changed.notify_all()

    def busy(self) -> bool:
        """Whether a run of this tab is still writing an answer."""
        with self._changed:
            return self._writing > 0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no run of this tab is writing an answer; ``False`` if ``timeout`` seconds passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._writing == 0, timeout)


def _is_turn(turn: Any) -> bool:
    if not isinstance(turn, dict):
        return False
    if turn.get("role") == "user":
        return isinstance(turn.get("content"), str)
    return turn.get("role") == "assistant" and isinstance(turn.get("answers"), dict)


def conversation(history: list[dict[str, Any]], who: str) -> list[Message]:
    """The conversation as the model ``who`` had it: each question with *its own* answer.

    A question ``who`` did not answer (it was stopped before its turn, or the
    answer was empty) is left out together with its turn, so no model ever
    reads another model's answer. A final question without an answer (the one
    being asked) is kept.
    """
    out: list[Message] = []
    pending: dict[str, Any] | None = None
    for turn in history:
        if turn.get("role") == "user":
            pending = turn
        elif turn.get("role") == "assistant":
            answer = turn.get("answers", {}).get(who)
            if pending is not None and answer:
                out += [{"role": "user", "content": pending["content"]}, {"role": "assistant", "content": answer}]
            pending = None
    if pending is not None:
        out.append({"role": "user", "content": pending["content"]})
    return out


def record_answer(reply: dict[str, Any], who: str, stream: Any) -> None:
    """Store what a :class:`mactuner.chat.ChatStream` produced as ``who``'s answer in ``reply``.

    Call it once the stream ended, however it ended: a stream stopped before its
    end (the page's Stop button) is closed here and recorded as ``"cancelled"``
    with the text it had produced.
    """
    stream.close()
    stats = stream.stats.to_dict()
    if stats.get("finish_reason") is None:
        stats["finish_reason"] = "cancelled"  # closed before it generated anything
    reply.setdefault("answers", {})[who] = stream.text
    reply.setdefault("stats", {})[who] = stats


def stats_caption(stats: dict[str, Any]) -> str:
    """An answer's figures in one line: ``first token 0.12 s · 41.5 tokens/s · 37 tokens``
    (a figure the stats lack is left out; the token count is always there)."""
    ttft, tps = stats.get("time_to_first_token"), stats.get("tokens_per_second")
    return (f"first token {ttft:.2f} s · " if ttft is not None else "") + (
        f"{tps:.1f} tokens/s · " if tps is not None else "") + f"{stats.get('new_tokens', 0)} tokens"


def finish_note(stats: dict[str, Any]) -> str | None:
    """A line for an answer that did not end on its own: stopped, or cut at the token limit."""
    reason = stats.get("finish_reason")
    if reason == "length":
        return (f"Cut off at the token limit ({stats.get('new_tokens', 0)} tokens): raise *Max new tokens* "
                "under Generation settings for longer answers.")
    if reason == "cancelled":
        return "Stopped before the end."
    return None
