"""Chat: talk to the base model or a fine-tuned adapter, or compare both side by side, with TTFT and tokens/s.

Each model choice keeps its own conversation on disk (:mod:`mactuner.chat.history`), so a reload finds
it again; in Compare mode each side sees only its own earlier answers, and each side's answer is saved
as soon as it ends (``ChatTurn``). Stop ends the answer being written.
A click while an answer streams starts the next run while the stopped one still finishes its token
(Streamlit's fast reruns): the next run waits for it (``AnswersInFlight``), and turns are merged into
the file by id (``save_turn``), so no run or tab drops another's turns.
"""

import streamlit as st

from mactuner.chat import GenerationSettings, parse_stop_strings
from mactuner.chat.history import (
    AnswersInFlight,
    ChatChoice,
    ChatTurn,
    clear_history,
    finish_note,
    load_history,
    stats_caption,
)
from mactuner.devices import dtype_name, get_optimal_dtype
from mactuner.models import DEFAULT_MODEL, ModelSourceError
from mactuner.runs.views import list_adapters
from mactuner.safe_text import safe_markdown
from ui.chat_choice import recent_ui, restore_ui, restored_note
from ui.chat_compare import compare_answers
from ui.chat_models import answer_stream, loaded_model, release_on_device_switch
from ui.common import device_or_stop, ensure_frame
from ui.export_ui import chat_source_ui
from ui.model_text import show_model_text, stream_model_text

ensure_frame()  # opened by its URL on a fresh server: run inside app.py's frame

HISTORY = "chat_history"  # this session's copy of the saved conversation of the model choice (turns as in chat_history)
NOTES = "chat_history_notes"  # what load_history said about a damaged conversation file
IN_FLIGHT = "chat_answers_in_flight"  # this session's AnswersInFlight
CONVERSATION_PX = 520  # the conversation's box: the page around it stays about one window high
STOP_WAIT_S = 30.0  # how long the run after a Stop waits for the stopped answer to be saved


def answers_in_flight() -> AnswersInFlight:
    """This browser session's answers still being written (shared by its overlapping script runs)."""
    return st.session_state.setdefault(IN_FLIGHT, AnswersInFlight())


def model_ui() -> ChatChoice:
    """Base model, adapter and compare mode (as last used, see :func:`restore_ui`)."""
    adapters = {choice.label: str(choice.path) for choice in list_adapters()}
    restore_ui(adapters)
    left, right = st.columns(2)
    st.session_state.setdefault("chat_model", DEFAULT_MODEL)  # a value, not a default: restore_ui may set it
    model = left.text_input("Base model", key="chat_model",
                            help="The built-in model, a Hugging Face id or a local folder.")
    label = right.selectbox("Fine-tuned adapter", ["(none)", *adapters], key="chat_adapter",
                            help="A finished run's adapter or one of its checkpoints.")
    adapter = chat_source_ui() or adapters.get(label, "")  # an exported model replaces the adapter
    compare = st.toggle("Compare base and fine-tuned side by side", key="chat_compare", disabled=not adapter)
    recent_ui(adapters)
    if note := restored_note():
        st.caption(note)
    return ChatChoice(model, adapter, compare)


def settings_ui() -> GenerationSettings:
    """System prompt, sampling, length and stop strings."""
    with st.expander("Generation settings"):
        system = st.text_area("System prompt", key="chat_system", placeholder="You are a helpful assistant.")
        a, b, c = st.columns(3)
        temperature = a.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="chat_temperature", help="0 = greedy")
        top_p = b.slider("Top-p", 0.05, 1.0, 0.9, 0.05, key="chat_top_p")
        max_new = c.slider("Max new tokens", 8, 1024, 256, 8, key="chat_max_new_tokens")
        stops = st.text_input("Stop strings (separate with |, \\n for a new line)", key="chat_stop")
    return GenerationSettings(max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                              stop=parse_stop_strings(stops), system_prompt=system or None)


def answer_footer(stats: dict) -> None:
    """The answer's figures, and a note when it was stopped or cut at the token limit."""
    st.caption(stats_caption(stats))
    if note := finish_note(stats):
        st.caption(f":orange[{note}]")


def side_columns(names: list[str]) -> list:
    """One column per answering model in Compare mode, else the message itself."""
    return st.columns(len(names)) if len(names) > 1 else [st.container()]


def show_history(history: list[dict], names: list[str]) -> None:
    """The conversation so far; a side that did not answer a turn (stopped before it) says so."""
    for message in history:
        with st.chat_message(message["role"]):
            if message["role"] == "user":
                show_model_text(message["content"])
                continue
            for column, who in zip(side_columns(names), names):
                with column:
                    if len(names) > 1:
                        st.caption(who)
                    if who not in message["answers"]:
                        st.caption("No answer: stopped before this side's turn.")
                        continue
                    show_model_text(message["answers"][who])
                    answer_footer(message["stats"].get(who, {}))


def history_ui(choice: ChatChoice) -> list[dict]:
    """This model choice's conversation, as saved (it survives a reload).

    Loaded once the answer a click interrupted is saved, so the page right after Stop shows it.
    """
    if not answers_in_flight().wait(STOP_WAIT_S):
        st.caption(":orange[The answer you stopped is still being saved; it shows at your next click.]")
    notes = st.session_state.setdefault(NOTES, [])  # a repaired file is said for the rest of the session
    st.session_state[HISTORY] = load_history(choice.key, notes=notes)
    for note in notes:
        st.warning(note, icon=":material/warning:")
    return st.session_state[HISTORY]


def answer_one(turn: ChatTurn, history: list[dict], choice: ChatChoice, device, settings) -> None:
    """The one model of ``choice`` answers, streamed; saved however it ends."""
    [who] = choice.sides
    stream = None
    try:
        loaded = loaded_model(choice.model, choice.adapter_of(who), device, who)
        stream = answer_stream(loaded, turn.conversation(history, who), settings)
        stream_model_text(stream)
    except (ModelSourceError, OSError, RuntimeError, ValueError) as exc:  # e.g. out of memory
        st.error(str(exc))
        st.stop()
    finally:
        if stream is not None:
            turn.record(who, stream)  # saved now, stopped or not
    answer_footer(turn.reply["stats"][who])


def answer_ui(prompt: str, history: list[dict], choice: ChatChoice, device, settings, stop) -> None:
    """Ask every model of ``choice`` (in Compare mode both at once, :func:`compare_answers`), with a Stop
    button in ``stop`` (an ``st.empty`` above the conversation); each side's answer is saved as soon as it
    ends, and the question however the run ends.

    Stop (or any click) interrupts this run at its next Streamlit call (each piece the
    answer draws) with Streamlit's stop or rerun exception: the side's ``finally`` records its answer so far
    as stopped and merges it into the file, while :func:`answers_in_flight` holds the next run.
    """
    with answers_in_flight().writing(), ChatTurn(choice, prompt) as turn:
        with st.chat_message("user"):
            show_model_text(prompt)
        with st.chat_message("assistant"):
            stop.button("Stop", key="chat_stop_answer", icon=":material/stop_circle:",
                        help="End the answer being written.")
            if choice.compare:
                compare_answers(turn, history, choice, device, settings, answer_footer,
                                lambda slot, text: slot.markdown(safe_markdown(text)))
            else:
                answer_one(turn, history, choice, device, settings)
            stop.empty()
    history += turn.pair


st.title("Chat")
device = device_or_stop()
release_on_device_switch(device)
st.caption(f"Answers are generated on **{device}** in {dtype_name(get_optimal_dtype(device))}.")
try:
    choice = model_ui()
    settings = settings_ui()
except ValueError as exc:
    st.error(str(exc))
    st.stop()
history = history_ui(choice)
prompt = st.chat_input("Ask something", key="chat_input")  # drawn pinned to the window's bottom
# Stop and the conversation sit right under the pickers, in a box of its own height that follows the newest
# answer: changing the adapter higher up never leaves the answer being written below the fold
controls = st.container(horizontal=True)
stop = controls.empty()
controls.button("New chat", key="chat_new", disabled=not (history or prompt), on_click=clear_history,
                args=(choice.key, answers_in_flight(), STOP_WAIT_S),  # after any answer still being saved
                help="Forget this conversation (it is kept per model choice, across reloads).")
with st.container(height=CONVERSATION_PX if history or prompt else "content", key="chat_conversation"):
    show_history(history, choice.sides)
    if prompt:
        answer_ui(prompt, history, choice, device, settings, stop)
