"""Saved chat conversations: one file per model choice, written atomically; each model sees only
its own answers; a stream stopped half-way is recorded as stopped with the text it had."""

from __future__ import annotations

import itertools

import pytest

from mactuner.chat import GenerationSettings, load_chat_model, stream_chat
from mactuner.chat_history import (
    clear_history,
    conversation,
    finish_note,
    history_file,
    history_key,
    load_history,
    record_answer,
    save_history,
)

HISTORY = [
    {"role": "user", "content": "What is the capital of Quenmark?"},
    {"role": "assistant", "answers": {"base": "I don't know.", "fine-tuned": "Lumetta."}, "stats": {}},
    {"role": "user", "content": "Say it again."},
    {"role": "assistant", "answers": {"fine-tuned": "Lumetta."}, "stats": {}},  # base was stopped before its turn
    {"role": "user", "content": "Once more?"},
]


def test_each_model_sees_only_its_own_answers():
    assert conversation(HISTORY, "base") == [
        {"role": "user", "content": "What is the capital of Quenmark?"},
        {"role": "assistant", "content": "I don't know."},
        {"role": "user", "content": "Once more?"},
    ]
    tuned = conversation(HISTORY, "fine-tuned")
    assert [m["content"] for m in tuned] == ["What is the capital of Quenmark?", "Lumetta.", "Say it again.", "Lumetta.",
                                             "Once more?"]
    # an empty answer is not replaced by the other side's
    empty = [HISTORY[0], {"role": "assistant", "answers": {"base": "", "fine-tuned": "Lumetta."}}, HISTORY[4]]
    assert "Lumetta." not in str(conversation(empty, "base"))


def test_keys_are_per_choice_and_stable(tmp_path):
    keys = {history_key("m"), history_key("m", "/runs/r1/adapter"), history_key("m", "/runs/r1/adapter", True),
            history_key("m", "/runs/r1/checkpoints/step-00000030"), history_key("other")}
    assert len(keys) == 5 and history_key("m", "/runs/r1/adapter") == history_key("m", "/runs/r1/adapter")
    assert history_key("m", "/runs/r1/checkpoints/step-00000030").startswith("r1-step-00000030-")
    with pytest.raises(ValueError):
        history_file("../escape")


def test_save_load_clear_round_trip(mactuner_home):
    key = history_key("SmolLM2-135M-Instruct", "/runs/r1/adapter", compare=True)
    assert load_history(key) == []
    path = save_history(key, HISTORY, model="SmolLM2-135M-Instruct", adapter="/runs/r1/adapter", compare=True)
    assert path.parent == mactuner_home / "chat" and load_history(key) == HISTORY
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    path.write_text("{ half a file")  # unreadable: starts afresh rather than failing the page
    assert load_history(key) == []
    save_history(key, HISTORY)
    clear_history(key)
    assert load_history(key) == [] and not path.exists()
    clear_history(key)  # clearing twice is fine


def test_a_stream_stopped_half_way_is_recorded_as_stopped(varied_model_dir):
    loaded = load_chat_model(str(varied_model_dir), device="cpu")
    settings = GenerationSettings(max_new_tokens=40, temperature=0)
    stream = stream_chat(loaded, [{"role": "user", "content": "Hello there"}], settings)
    pieces = list(itertools.islice(stream, 3))  # the page's Stop interrupts st.write_stream like this
    reply: dict = {"role": "assistant"}
    record_answer(reply, "base", stream)
    assert reply["answers"]["base"] == "".join(pieces)
    stats = reply["stats"]["base"]
    assert stats["finish_reason"] == "cancelled" and stats["new_tokens"] < 40
    assert finish_note(stats) == "Stopped before the end."
    assert list(stream) == []  # generation really ended
    # an answer that ran to the limit says so; one that ended by itself has no note
    full = stream_chat(loaded, [{"role": "user", "content": "Hello there"}], GenerationSettings(max_new_tokens=4, temperature=0))
    "".join(full)
    record_answer(reply, "base", full)
    assert reply["stats"]["base"]["finish_reason"] == "length" and "token limit" in finish_note(reply["stats"]["base"])
    assert finish_note({"finish_reason": "stop"}) is None
