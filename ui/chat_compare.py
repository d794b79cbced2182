"""UI-only helper of the Chat page: Compare mode's two answers, generated at the same time.

Each side's stream is drained by its own thread (:class:`mactuner.chat.parallel.ParallelAnswers`);
this script run redraws both columns as they grow and saves each side's answer as soon as it ends
(``ChatTurn.record``). A Stop (or any click) interrupts the redraw with Streamlit's stop or rerun
exception: both sides are asked to stop after their next token, their threads are joined, and every
side not saved yet is saved as stopped. Not a page itself.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from mactuner.chat.history import ChatChoice, ChatTurn
from mactuner.chat.parallel import ParallelAnswers
from mactuner.models import ModelSourceError
from ui.chat_models import answer_stream, loaded_model

ERRORS = (ModelSourceError, OSError, RuntimeError, ValueError)
REDRAW_S = 0.1  # how often the growing answers are redrawn


def compare_answers(turn: ChatTurn, history: list[dict], choice: ChatChoice, device, settings,
                    footer: Callable[[dict], None], draw: Callable[[object, str], None]) -> None:
    """Both sides of ``choice`` answer ``turn``'s question at once, side by side.

    ``footer(stats)`` draws an ended answer's figures; ``draw(slot, text)`` draws an answer's text so far
    into ``slot`` (an ``st.empty``).
    """
    columns = dict(zip(choice.sides, st.columns(len(choice.sides))))
    slots, models, streams = {}, {}, {}
    try:
        for who, column in columns.items():
            with column:
                st.caption(who)
                models[who] = loaded_model(choice.model, choice.adapter_of(who), device, who)  # its bar here
                slots[who] = st.empty()
        # both models are loaded before either begins
        streams = {who: answer_stream(models[who], turn.conversation(history, who), settings) for who in models}
    except ERRORS as exc:  # e.g. out of memory while loading the second model
        st.error(str(exc))
        st.stop()
    saved: set[str] = set()
    drawn = dict.fromkeys(streams, "")
    try:
        with ParallelAnswers(streams) as answers:
            for ended in answers.updates(REDRAW_S):
                for who, text in answers.texts().items():
                    if text != drawn[who]:  # each redraw is a message to the browser: only what grew
                        draw(slots[who], text)
                        drawn[who] = text
                for who in ended:
                    turn.record(who, streams[who])  # saved now: the other side may still be answering
                    saved.add(who)
                    with columns[who]:
                        if who in answers.errors:
                            st.error(str(answers.errors[who]))
                        footer(turn.reply["stats"][who])
    finally:
        for who in streams.keys() - saved:  # stopped (or failed) before its end: saved as it is
            turn.record(who, streams[who])
