"""The conversations saved lately, newest first, with the model choice each belongs to.

The chat page reopens the latest one when a person comes back to it (a reload, or another page in
between: Streamlit forgets the pickers then), so a saved conversation never looks lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mactuner.chat import history as chat_history
from mactuner.chat.history import ChatChoice

MAX_FILES_READ = 20  # the newest files looked at: enough to skip a few stale ones, never a whole folder


@dataclass(frozen=True)
class SavedConversation:
    """A conversation on disk and the model choice it belongs to."""

    choice: ChatChoice
    updated: float  # when it was last saved (seconds since the epoch)
    questions: int
    last_question: str


def recent_conversations(limit: int = 5) -> list[SavedConversation]:
    """The ``limit`` conversations saved last, newest first.

    Left out: files that cannot be read, that record no model choice or one that does not match the
    file's name (a copy kept aside, a hand-made file), empty conversations, and those whose adapter or
    exported model is no longer on disk.
    """
    folder = chat_history.history_dir()
    try:
        files = [p for p in folder.glob("*.json") if p.is_file()]
    except OSError:
        return []
    files.sort(key=_mtime, reverse=True)
    found: list[SavedConversation] = []
    for path in files[:MAX_FILES_READ]:
        saved = _read(path)
        if saved is not None:
            found.append(saved)
            if len(found) >= limit:
                break
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _read(path: Path) -> SavedConversation | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        choice = ChatChoice(str(data["model"]), str(data.get("adapter") or ""), bool(data.get("compare")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if choice.key != path.stem or (choice.adapter and not Path(choice.adapter).exists()):
        return None
    questions = [t["content"] for t in chat_history.load_history(choice.key) if t.get("role") == "user"]
    if not questions:
        return None
    return SavedConversation(choice, _mtime(path), len(questions), questions[-1])
