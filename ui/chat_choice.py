"""UI-only helper of the Chat page: the model choice put back before the pickers are drawn (a reload,
another page in between, or "Open in Chat" on a finished run). Not a page itself."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from mactuner.chat.history import ChatChoice
from mactuner.chat.recent import SavedConversation, recent_conversations
from mactuner.models import DEFAULT_MODEL
from ui.export_ui import CHAT_OPEN, CHAT_OPEN_ADAPTER

RESTORED = "chat_restored"  # the saved conversation restore_ui reopened, said once under the pickers
RECENT = "chat_recent"  # the "Recent conversations" picker


def restore_ui(adapters: dict[str, str]) -> None:
    """Put back a model choice before the pickers are drawn: the adapter "Open in Chat" on a run sent here,
    or, when the pickers are new (a reload, or back from another page), the latest saved conversation's."""
    if opened := st.session_state.pop(CHAT_OPEN_ADAPTER, None):
        choice = ChatChoice(st.session_state.get("chat_model", DEFAULT_MODEL), opened)
    elif "chat_adapter" not in st.session_state and (recent := recent_conversations(1)):
        choice = recent[0].choice
        st.session_state[RESTORED] = recent[0]
    else:
        return
    apply_choice(choice, adapters)


def apply_choice(choice: ChatChoice, adapters: dict[str, str]) -> None:
    """Set the pickers (not drawn yet in this run) to ``choice``; ``adapters`` maps the adapter picker's
    labels to paths."""
    label = next((label for label, path in adapters.items() if path == choice.adapter), None)
    if choice.adapter and label is None:
        st.session_state[CHAT_OPEN] = choice.adapter  # an exported model: its picker selects it
    st.session_state["chat_model"] = choice.model
    st.session_state["chat_adapter"] = label or "(none)"
    if label is not None:
        st.session_state["chat_exported"] = "(none)"
    st.session_state["chat_compare"] = choice.compare


def restored_note() -> str | None:
    """Once after :func:`restore_ui` reopened a conversation: a line saying which."""
    restored = st.session_state.pop(RESTORED, None)
    if restored is None:
        return None
    questions = f"{restored.questions} question{'' if restored.questions == 1 else 's'}"
    return (f"Reopened your last conversation ({questions}, the last: “{restored.last_question[:60]}”). "
            "Pick another model to start another.")


def recent_ui(adapters: dict[str, str]) -> None:
    """The conversations saved lately, when there are two or more: picking one puts its model choice back
    (and so shows that conversation)."""
    recent = recent_conversations(6)
    if len(recent) < 2:
        return
    names = {path: label for label, path in adapters.items()}
    options = {describe(saved, names): saved.choice for saved in recent}
    st.selectbox("Recent conversations", [None, *options], key=RECENT, on_change=_reopen, args=(options, adapters),
                 format_func=lambda option: option or "Reopen a recent conversation…")


def describe(saved: SavedConversation, names: dict[str, str]) -> str:
    """A saved conversation in one line: who answered, and its last question."""
    choice = saved.choice
    who = names.get(choice.adapter) or (Path(choice.adapter).name if choice.adapter else "base model")
    on = "" if choice.model == DEFAULT_MODEL else f" on {Path(choice.model).name}"
    questions = f"{saved.questions} question{'' if saved.questions == 1 else 's'}"
    return f"{who}{' · compare' if choice.compare else ''}{on} · {questions}, the last: “{saved.last_question[:40]}”"


def _reopen(options: dict[str, ChatChoice], adapters: dict[str, str]) -> None:
    # the picker's callback: runs before the script, so the pickers are set before they are drawn
    if (picked := st.session_state.get(RECENT)) in options:
        apply_choice(options[picked], adapters)
    st.session_state[RECENT] = None
