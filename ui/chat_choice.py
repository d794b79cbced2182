"""UI-only helper of the Chat page: the model choice put back before the pickers are drawn (a reload,
another page in between, or "Open in Chat" on a finished run). Not a page itself."""

from __future__ import annotations

import streamlit as st

from mactuner.chat.history import ChatChoice
from mactuner.chat.recent import recent_conversations
from mactuner.models import DEFAULT_MODEL
from ui.export_ui import CHAT_OPEN, CHAT_OPEN_ADAPTER

RESTORED = "chat_restored"  # the saved conversation restore_ui reopened, said once under the pickers


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
