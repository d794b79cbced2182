"""The chat page in AppTest: asking streams an answer with its figures, a conversation that
survives a reload and a "New chat" that forgets it, the note on an answer cut at the token limit,
compare mode where each side sees only its own answers, and a bad model shown as an error."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1 import app_test as app_test_module
from streamlit.testing.v1.element_tree import ElementTree
from streamlit.testing.v1.local_script_runner import LocalScriptRunner

from mactuner.chat.history import history_dir, history_key, load_history
from tests.app_pages import open_app_page


def open_page() -> AppTest:
    return open_app_page("pages/chat.py")


def ask(at: AppTest, model: Path, question: str) -> AppTest:
    at.text_input(key="chat_model").input(str(model))
    at.slider(key="chat_temperature").set_value(0.0)
    at.slider(key="chat_max_new_tokens").set_value(8)
    at.chat_input(key="chat_input").set_value(question).run()
    assert not at.exception, at.exception
    return at


def captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption]


def test_ask_shows_answer_and_figures_then_new_chat(varied_model_dir):
    at = open_page()
    assert at.title[0].value == "Chat"
    ask(at, varied_model_dir, "Hello there")
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert any("tokens/s" in c and "first token" in c and "8 tokens" in c for c in captions(at))
    history = at.session_state["chat_history"]
    assert history[0]["content"] == "Hello there" and history[1]["answers"]["base"]
    at.button(key="chat_new").click().run()
    assert not at.exception, at.exception
    assert not at.chat_message and at.session_state["chat_history"] == []
    assert load_history(history_key(str(varied_model_dir))) == []


def test_conversation_survives_a_reload(varied_model_dir):
    at = ask(open_page(), varied_model_dir, "Hello there")
    answer = at.session_state["chat_history"][1]["answers"]["base"]
    [saved] = list(history_dir().glob("*.json"))
    assert load_history(saved.stem) == at.session_state["chat_history"]
    # a reload is a new session: the same model choice finds its conversation again
    again = open_page()
    again.text_input(key="chat_model").input(str(varied_model_dir)).run()
    assert [m.name for m in again.chat_message] == ["user", "assistant"]
    assert again.session_state["chat_history"][1]["answers"]["base"] == answer
    assert any(answer.strip()[:20] in m.value for m in again.markdown if answer.strip())


def test_an_answer_cut_at_the_token_limit_says_so(varied_model_dir):
    at = ask(open_page(), varied_model_dir, "Hello there")  # 8 new tokens at most
    stats = at.session_state["chat_history"][1]["stats"]["base"]
    assert stats["finish_reason"] == "length" and stats["new_tokens"] == 8
    assert any("token limit" in c and "Max new tokens" in c for c in captions(at))


def finished_run_with_adapter(home: Path, model_dir: Path, adapter: Path) -> None:
    import shutil

    run = home / "runs" / "demo-run"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 5, "total_steps": 5}))
    (run / "config.yaml").write_text(f"model: {model_dir}\n")
    shutil.copytree(adapter, run / "adapter")


def test_adapters_are_listed_by_the_run_name_a_person_gave(varied_model_dir, tiny_adapter, mactuner_home):
    from mactuner.runs.names import set_run_name

    finished_run_with_adapter(mactuner_home, varied_model_dir, tiny_adapter)
    set_run_name("demo-run", "Lighthouse facts")
    at = open_page()
    # the id stays beside the name: two runs may carry the same name
    assert "Lighthouse facts (demo-run) · final" in at.selectbox(key="chat_adapter").options
    assert "demo-run · final" not in at.selectbox(key="chat_adapter").options


def test_compare_mode_each_side_keeps_its_own_conversation(varied_model_dir, tiny_adapter, mactuner_home):
    from transformers import AutoTokenizer

    finished_run_with_adapter(mactuner_home, varied_model_dir, tiny_adapter)
    at = open_page()
    assert "demo-run · final" in at.selectbox(key="chat_adapter").options
    at.selectbox(key="chat_adapter").set_value("demo-run · final").run()
    at.toggle(key="chat_compare").set_value(True)
    ask(at, varied_model_dir, "Hello there")
    at.chat_input(key="chat_input").set_value("And then?").run()
    assert not at.exception, at.exception
    history = at.session_state["chat_history"]
    first, second = history[1], history[3]
    assert set(first["answers"]) == set(second["answers"]) == {"base", "fine-tuned"}
    assert first["answers"]["base"] != first["answers"]["fine-tuned"]  # the adapter changes the answer
    assert {"base", "fine-tuned"} <= set(captions(at))
    assert not any(c.endswith(" 0 tokens") or c == "0 tokens" for c in captions(at))  # no empty turn
    # each side's second prompt held its own first answer, never the other side's
    tokenizer = AutoTokenizer.from_pretrained(varied_model_dir)
    for who in ("base", "fine-tuned"):
        own = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first["answers"][who]},
               {"role": "user", "content": "And then?"}]
        expected = len(tokenizer.apply_chat_template(own, add_generation_prompt=True, return_dict=True)["input_ids"])
        assert second["stats"][who]["prompt_tokens"] == expected, who


def test_bad_model_is_an_error(tmp_path):
    at = open_page()
    ask(at, tmp_path / "no-such-model", "Hello")
    assert at.error and "no-such-model" in at.error[0].value
    assert at.session_state["chat_history"] == []


def test_each_model_choice_has_its_own_conversation(varied_model_dir, tiny_adapter, mactuner_home):
    finished_run_with_adapter(mactuner_home, varied_model_dir, tiny_adapter)
    at = open_page()
    ask(at, varied_model_dir, "Hello there")
    at.selectbox(key="chat_adapter").set_value("demo-run · final").run()
    assert at.session_state["chat_history"] == [] and not at.chat_message  # the adapter's own, new conversation
    at.chat_input(key="chat_input").set_value("And then?").run()
    assert not at.exception, at.exception
    history = at.session_state["chat_history"]
    assert [m["role"] for m in history] == ["user", "assistant"] and set(history[1]["answers"]) == {"fine-tuned"}
    # back to the base model: its conversation is still there
    at.selectbox(key="chat_adapter").set_value("(none)").run()
    base = at.session_state["chat_history"]
    assert [m.get("content") for m in base[::2]] == ["Hello there"] and set(base[1]["answers"]) == {"base"}


# --- Stop while an answer streams ---------------------------------------------------------------
# A click while the script runs makes Streamlit (runner.fastReruns, on by default) ask the running
# script to stop and start the next run at once, in a new thread: the interrupted run only notices
# at its next yield point (its next token) and saves the stopped answer after that. The harness
# below does exactly that with AppTest's own runners: request_stop() on the answering run, then the
# next run at once, without waiting for the old one.

LONG_SYSTEM_PROMPT = " ".join(["You are a careful assistant who answers questions about the sea."] * 120)


class RecordingRunner(LocalScriptRunner):
    """AppTest's script runner, keeping each run's runner and element tree (runs may overlap here)."""

    runs: list[RecordingRunner] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree = None
        RecordingRunner.runs.append(self)

    def run(self, *args, **kwargs):
        self.tree = super().run(*args, **kwargs)
        return self.tree


def stop_while_answering(at: AppTest, question: str, after: float) -> ElementTree:
    """Ask ``question``; ``after`` seconds after the Stop button is drawn, click Stop the way a browser
    does under fast reruns; return the element tree of the run that the click started."""
    RecordingRunner.runs.clear()
    at.chat_input(key="chat_input").set_value(question)
    answering = threading.Thread(target=at.run, daemon=True)
    answering.start()
    deadline = time.monotonic() + 120
    while not (RecordingRunner.runs and any("chat_stop_answer" in str(m) for m in RecordingRunner.runs[0].forward_msgs())):
        assert time.monotonic() < deadline, "the answer never started"
        time.sleep(0.02)
    time.sleep(after)
    old = RecordingRunner.runs[0]
    at.chat_input(key="chat_input").set_value(None)  # the question was sent once; the click sends none
    old.request_stop()  # what AppSession does on a click under fast reruns ...
    at.run()  # ... and the next run starts at once
    answering.join(timeout=120)
    assert not answering.is_alive()
    new = RecordingRunner.runs[-1]
    assert new is not old and new.tree is not None
    return new.tree


@pytest.mark.slow  # the real model: its reading of a long prompt is what makes the old run slow to stop
def test_the_page_right_after_stop_shows_the_stopped_answer(monkeypatch, mactuner_home):
    monkeypatch.setattr(app_test_module, "LocalScriptRunner", RecordingRunner)
    at = open_page()
    at.text_area(key="chat_system").input(LONG_SYSTEM_PROMPT)
    at.slider(key="chat_temperature").set_value(0.0)
    at.slider(key="chat_max_new_tokens").set_value(8)
    at.chat_input(key="chat_input").set_value("Hello").run()  # loads the model; times reading the prompt
    assert not at.exception, at.exception
    reading = at.session_state["chat_history"][1]["stats"]["base"]["time_to_first_token"]
    at.button(key="chat_new").click().run()
    at.slider(key="chat_max_new_tokens").set_value(1024).run()

    # Stop while the model still reads the prompt, a stretch without a yield point: the old run saves
    # its turn only after that, while the run the click started is already drawing the page
    tree = stop_while_answering(at, "Write a long story about the sea.", after=reading / 4)
    # the file holds the stopped turn ...
    [saved] = list(history_dir().glob("*.json"))
    turns = load_history(saved.stem)
    assert [t["role"] for t in turns] == ["user", "assistant"], turns
    answer, stats = turns[1]["answers"].get("base", ""), turns[1]["stats"].get("base", {})
    assert stats.get("finish_reason") == "cancelled" and stats["new_tokens"] < 1024, stats
    # ... and the page drawn by the Stop click shows it, with its note and its words
    assert not tree.exception, tree.exception
    assert [m.name for m in tree.chat_message] == ["user", "assistant"]
    assert any("Stopped before the end." in c.value for c in tree.caption), [c.value for c in tree.caption]
    assert answer.strip() and any(answer.strip() in m.value for m in tree.markdown)

    # asked again at once: nothing lost, nothing doubled
    at.slider(key="chat_max_new_tokens").set_value(8)
    at.chat_input(key="chat_input").set_value("A short one, please.")
    at.run()
    assert not at.exception, at.exception
    turns = load_history(saved.stem)
    assert [t.get("content") for t in turns[::2]] == ["Write a long story about the sea.", "A short one, please."]
    assert [m.name for m in at.chat_message] == ["user", "assistant"] * 2


# --- Compare mode: each side is saved as soon as it has answered ---------------------------------

class PacedStream:
    """A real chat stream handing out its pieces at most one per 20 ms, as a slower model would."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __iter__(self):
        for piece in self.stream:
            time.sleep(0.02)
            yield piece

    @property
    def text(self):
        return self.stream.text

    @property
    def stats(self):
        return self.stream.stats

    def close(self):
        self.stream.close()


def caption_bodies(runner: LocalScriptRunner) -> list[str]:
    """The captions a script run has drawn so far (its forward messages, as the browser receives them)."""
    return [m.delta.new_element.markdown.body for m in runner.forward_msgs()
            if m.HasField("delta") and m.delta.new_element.HasField("markdown")
            and m.delta.new_element.markdown.element_type == m.delta.new_element.markdown.CAPTION]


def test_compare_mode_saves_each_side_as_soon_as_it_has_answered(monkeypatch, varied_model_dir, tiny_adapter,
                                                                 mactuner_home):
    """While the fine-tuned side still answers, the file already holds the question and the base answer,
    so a reload (or the server going away) then keeps them; the finished turn is saved once, both sides."""
    monkeypatch.setattr(app_test_module, "LocalScriptRunner", RecordingRunner)
    # both sides answer at once (ui.chat_compare): the fine-tuned side is paced so that the base side
    # surely ends first, and the file can be read while the fine-tuned side still answers
    import ui.chat_compare

    streams = []

    def paced_tuned_side(loaded, messages, settings):
        streams.append(real_answer_stream(loaded, messages, settings))
        return PacedStream(streams[-1]) if len(streams) % 2 == 0 else streams[-1]  # base first, then fine-tuned

    real_answer_stream = ui.chat_compare.answer_stream
    monkeypatch.setattr(ui.chat_compare, "answer_stream", paced_tuned_side)
    finished_run_with_adapter(mactuner_home, varied_model_dir, tiny_adapter)

    def compare_page() -> AppTest:
        at = open_page()
        at.text_input(key="chat_model").input(str(varied_model_dir))
        at.selectbox(key="chat_adapter").set_value("demo-run · final").run()
        at.toggle(key="chat_compare").set_value(True).run()
        assert not at.exception, at.exception
        return at

    at = compare_page()
    at.slider(key="chat_temperature").set_value(0.0)
    at.slider(key="chat_max_new_tokens").set_value(512)  # a long fine-tuned answer to look in on
    RecordingRunner.runs.clear()
    at.chat_input(key="chat_input").set_value("Hello there")
    answering = threading.Thread(target=at.run, daemon=True)
    answering.start()
    deadline = time.monotonic() + 120
    while not (RecordingRunner.runs and [c for c in caption_bodies(RecordingRunner.runs[0]) if c.endswith(" tokens")]):
        assert time.monotonic() < deadline and answering.is_alive(), "no side ended"
        time.sleep(0.005)
    [run] = RecordingRunner.runs
    key = history_key(str(varied_model_dir), str(mactuner_home / "runs" / "demo-run" / "adapter"), compare=True)
    while_tuned_answers = load_history(key)
    footers = [c for c in caption_bodies(run) if c.endswith(" tokens")]
    assert len(footers) == 1, "the fine-tuned side ended before the file was read; make its answer longer"
    # a reload now: a new session, drawn from the file while the fine-tuned side still answers
    reloaded = compare_page()
    answering.join(timeout=120)
    assert not answering.is_alive() and not at.exception, at.exception

    final = load_history(key)
    assert [t["role"] for t in final] == ["user", "assistant"] and final[0]["content"] == "Hello there"
    assert set(final[1]["answers"]) == {"base", "fine-tuned"}, final[1]
    # the question and the base answer were saved before the fine-tuned side finished, the same turn
    assert [t["role"] for t in while_tuned_answers] == ["user", "assistant"], while_tuned_answers
    assert while_tuned_answers[0] == final[0]
    assert while_tuned_answers[1]["answers"]["base"] == final[1]["answers"]["base"]
    assert while_tuned_answers[1]["stats"]["base"] == final[1]["stats"]["base"]
    # and the reloaded page showed them
    assert [m.name for m in reloaded.chat_message] == ["user", "assistant"]
    base = final[1]["answers"]["base"].strip()
    assert base and any(base[:20] in m.value for m in reloaded.markdown)
