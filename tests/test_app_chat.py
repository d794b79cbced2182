"""The chat page in AppTest: asking streams an answer with its figures, a conversation that
survives a reload and a "New chat" that forgets it, the note on an answer cut at the token limit,
compare mode where each side sees only its own answers, and a bad model shown as an error."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from mactuner.chat_history import history_dir, history_key, load_history
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


def test_ask_shows_answer_and_figures_then_new_chat(varied_model_dir):  # noqa: F811
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


def test_compare_mode_each_side_keeps_its_own_conversation(varied_model_dir, tiny_adapter, mactuner_home):  # noqa: F811
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


def test_each_model_choice_has_its_own_conversation(varied_model_dir, tiny_adapter, mactuner_home):  # noqa: F811
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
