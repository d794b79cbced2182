"""Chat: talk to the base model or a fine-tuned adapter, or compare both side by side, with TTFT and tokens/s."""

import streamlit as st

from mactuner.chat import GenerationSettings, list_adapters
from mactuner.devices import dtype_name, get_optimal_dtype
from mactuner.models import DEFAULT_MODEL, ModelSourceError
from pages.chat_models import answer_stream, loaded_model, release_on_device_switch
from pages.common import device_or_stop
from pages.export_ui import chat_source_ui

HISTORY = "chat_history"  # [{"role": "user", "content"} | {"role": "assistant", "answers": {who: text}, "stats": {who: dict}}]


def model_ui():
    """Base model, adapter and compare mode."""
    left, right = st.columns(2)
    model = left.text_input("Base model", DEFAULT_MODEL, key="chat_model",
                            help="The built-in model, a Hugging Face id or a local folder.")
    adapters = {choice.label: str(choice.path) for choice in list_adapters()}
    label = right.selectbox("Fine-tuned adapter", ["(none)", *adapters], key="chat_adapter",
                            help="A finished run's adapter or one of its checkpoints.")
    adapter = chat_source_ui() or adapters.get(label, "")  # an exported model replaces the adapter
    compare = st.toggle("Compare base and fine-tuned side by side", key="chat_compare", disabled=not adapter)
    return model, adapter, compare and bool(adapter)


def settings_ui() -> GenerationSettings:
    """System prompt, sampling, length and stop strings."""
    with st.expander("Generation settings"):
        system = st.text_area("System prompt", key="chat_system", placeholder="You are a helpful assistant.")
        a, b, c = st.columns(3)
        temperature = a.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="chat_temperature", help="0 = greedy")
        top_p = b.slider("Top-p", 0.05, 1.0, 0.9, 0.05, key="chat_top_p")
        max_new = c.slider("Max new tokens", 8, 1024, 256, 8, key="chat_max_new_tokens")
        stops = st.text_input("Stop strings (separate with |, \\n for a new line)", key="chat_stop")
    stop = [s.replace("\\n", "\n") for s in stops.split("|") if s]
    return GenerationSettings(max_new_tokens=max_new, temperature=temperature, top_p=top_p, stop=stop,
                              system_prompt=system or None)


def stats_caption(stats: dict) -> str:
    ttft, tps = stats.get("time_to_first_token"), stats.get("tokens_per_second")
    return (f"first token {ttft:.2f} s · " if ttft is not None else "") + (
        f"{tps:.1f} tokens/s · " if tps is not None else "") + f"{stats.get('new_tokens', 0)} tokens"


def conversation(history: list[dict], who: str) -> list[dict]:
    """The history as one model saw it: its own answers (another model's where it had none, e.g. after a mode switch)."""
    def answer(m: dict) -> str:
        return m["answers"].get(who) or next(iter(m["answers"].values()), "")

    return [m if m["role"] == "user" else {"role": "assistant", "content": answer(m)} for m in history]


def show_history(history: list[dict], names: list[str]) -> None:
    for message in history:
        with st.chat_message(message["role"]):
            if message["role"] == "user":
                st.markdown(message["content"])
                continue
            columns = st.columns(len(names)) if len(names) > 1 else [st.container()]
            for column, who in zip(columns, names):
                with column:
                    if len(names) > 1:
                        st.caption(who)
                    st.markdown(message["answers"].get(who, ""))
                    st.caption(stats_caption(message["stats"].get(who, {})))


st.title("Chat")
device = device_or_stop()
release_on_device_switch(device)
st.caption(f"Answers are generated on **{device}** in {dtype_name(get_optimal_dtype(device))}.")
try:
    model, adapter, compare = model_ui()
    settings = settings_ui()
except ValueError as exc:
    st.error(str(exc))
    st.stop()
names = ["base", "fine-tuned"] if compare else ["fine-tuned" if adapter else "base"]
sources = {"base": "", "fine-tuned": adapter}
history = st.session_state.setdefault(HISTORY, [])
show_history(history, names)
if prompt := st.chat_input("Ask something", key="chat_input"):
    history.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    reply = {"role": "assistant", "answers": {}, "stats": {}}
    with st.chat_message("assistant"):
        columns = st.columns(len(names)) if len(names) > 1 else [st.container()]
        for column, who in zip(columns, names):
            with column:
                if len(names) > 1:
                    st.caption(who)
                try:
                    loaded = loaded_model(model, sources[who], device, who)
                    stream = answer_stream(loaded, conversation(history, who), settings)
                    st.write_stream(stream)
                except (ModelSourceError, OSError, RuntimeError, ValueError) as exc:
                    history.pop()
                    st.error(str(exc))
                    st.stop()
                reply["answers"][who], reply["stats"][who] = stream.text, stream.stats.to_dict()
                st.caption(stats_caption(reply["stats"][who]))
    history.append(reply)
st.button("Clear history", key="chat_clear", disabled=not history, on_click=history.clear)
