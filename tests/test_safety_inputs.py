"""Issue 21, the rows about what MacTuner reads: a chat history cut mid-line (row 4), RAG
collections and folders that point outside (rows 5, 6), datasets and PDFs that expand
without bound (rows 7, 8), YAML aliases (row 9) and crafted files that used to end in a
traceback (row 14). Each test works on its own temporary MACTUNER_HOME."""

from __future__ import annotations

import json

import pytest

# --- row 4: a chat history cut mid-line keeps a copy and its readable turns ------------------------


def saved_conversation(turns: int):
    from mactuner.chat_history import history_file, history_key, new_turn, save_history
    from mactuner.models import DEFAULT_MODEL

    key = history_key(DEFAULT_MODEL)
    history = []
    for n in range(turns):
        question, reply = new_turn(f"question {n}")
        reply["answers"]["base"] = f"answer {n}"
        history += [question, reply]
    save_history(key, history, model=DEFAULT_MODEL)
    file = history_file(key)
    text = file.read_text()
    cut = text[: text.index('"question 15"') + 5]  # cut inside turn 15's question
    file.write_text(cut)
    return key, file, cut


def test_a_damaged_history_is_copied_and_its_readable_turns_recovered():
    from mactuner.chat_history import history_dir, load_history, new_turn, save_turn

    key, file, cut = saved_conversation(20)
    notes: list[str] = []
    history = load_history(key, notes=notes)
    assert [t["content"] for t in history if t["role"] == "user"] == [f"question {n}" for n in range(15)]
    [copy] = history_dir().glob(f"{key}.damaged-*.json")
    assert copy.read_text() == cut  # the damaged file, byte for byte
    assert len(notes) == 1 and copy.name in notes[0] and "15 of its turns" in notes[0]
    # the next answer adds to the recovered turns instead of starting over
    question, reply = new_turn("one more")
    reply["answers"]["base"] = "ok"
    assert len(save_turn(key, question, reply)) == 32
    assert len(load_history(key)) == 32 and len(list(history_dir().glob("*.damaged-*"))) == 1
    # unreadable from the first byte: still copied, nothing recovered, and said so
    file.write_text("\0\0garbage")
    notes = []
    assert load_history(key, notes=notes) == []
    assert len(list(history_dir().glob("*.damaged-*"))) == 2 and "no turn could be read" in notes[0]


def test_chat_page_says_the_history_was_damaged():
    from tests.app_pages import open_app_page

    key, _, _ = saved_conversation(20)
    at = open_app_page("pages/chat.py")
    warnings = [w.value for w in at.warning]
    assert any("damaged" in w and ".damaged-" in w for w in warnings), warnings
    assert len(at.chat_message) == 30
