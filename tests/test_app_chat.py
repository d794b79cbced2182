"""The chat page in AppTest: asking streams an answer with its figures, clear history,
compare mode with an adapter from a run, and a bad model shown as an error."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

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


def test_ask_shows_answer_and_figures_then_clear(varied_model_dir):  # noqa: F811
    at = open_page()
    assert at.title[0].value == "Chat"
    ask(at, varied_model_dir, "Hello there")
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert any("tokens/s" in c and "first token" in c and "8 tokens" in c for c in captions(at))
    history = at.session_state["chat_history"]
    assert history[0]["content"] == "Hello there" and history[1]["answers"]["base"]
    at.button(key="chat_clear").click().run()
    assert not at.exception, at.exception
    assert not at.chat_message and at.session_state["chat_history"] == []


def test_compare_mode_answers_with_base_and_adapter(varied_model_dir, tiny_adapter, mactuner_home):  # noqa: F811
    import shutil

    run = mactuner_home / "runs" / "demo-run"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 5, "total_steps": 5}))
    (run / "config.yaml").write_text(f"model: {varied_model_dir}\n")
    shutil.copytree(tiny_adapter, run / "adapter")
    at = open_page()
    assert "demo-run · final" in at.selectbox(key="chat_adapter").options
    at.selectbox(key="chat_adapter").set_value("demo-run · final").run()
    at.toggle(key="chat_compare").set_value(True)
    ask(at, varied_model_dir, "Hello there")
    answers = at.session_state["chat_history"][1]["answers"]
    assert set(answers) == {"base", "fine-tuned"}
    assert answers["base"] != answers["fine-tuned"]  # the adapter changes the answer
    assert {"base", "fine-tuned"} <= set(captions(at))


def test_bad_model_is_an_error(tmp_path):
    at = open_page()
    ask(at, tmp_path / "no-such-model", "Hello")
    assert at.error and "no-such-model" in at.error[0].value
    assert at.session_state["chat_history"] == []


def test_switching_to_an_adapter_keeps_the_conversation(varied_model_dir, tiny_adapter, mactuner_home):  # noqa: F811
    import shutil

    run = mactuner_home / "runs" / "demo-run"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    shutil.copytree(tiny_adapter, run / "adapter")
    at = open_page()
    ask(at, varied_model_dir, "Hello there")
    at.selectbox(key="chat_adapter").set_value("demo-run · final").run()
    at.chat_input(key="chat_input").set_value("And then?").run()
    assert not at.exception, at.exception
    history = at.session_state["chat_history"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert set(history[1]["answers"]) == {"base"} and set(history[3]["answers"]) == {"fine-tuned"}
