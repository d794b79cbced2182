"""Saved chat conversations: one file per model choice, written atomically; each model sees only
its own answers; a stream stopped half-way is recorded as stopped with the text it had; writers that
overlap (two tabs, a stopped run finishing late) never drop each other's turns, and the run after a
Stop can wait until the stopped answer is saved. In Compare mode each side's answer is saved as soon
as it ends, into the same turn."""

from __future__ import annotations

import copy
import itertools
import threading
import time

import pytest

from mactuner.chat import GenerationSettings, load_chat_model, stream_chat
from mactuner.chat.history import (
    AnswersInFlight,
    ChatChoice,
    ChatTurn,
    clear_history,
    conversation,
    finish_note,
    history_file,
    history_key,
    load_history,
    new_turn,
    record_answer,
    save_history,
    save_turn,
    stats_caption,
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


def test_a_chat_choice_names_who_answers_with_what_and_where_it_is_kept():
    base = ChatChoice("SmolLM2-135M-Instruct")
    assert base.sides == ["base"] and base.adapter_of("base") == "" and base.key == history_key("SmolLM2-135M-Instruct")
    tuned = ChatChoice("SmolLM2-135M-Instruct", "/runs/r1/adapter")
    assert tuned.sides == ["fine-tuned"] and tuned.adapter_of("fine-tuned") == "/runs/r1/adapter"
    both = ChatChoice("SmolLM2-135M-Instruct", "/runs/r1/adapter", compare=True)
    assert both.sides == ["base", "fine-tuned"]
    assert [both.adapter_of(who) for who in both.sides] == ["", "/runs/r1/adapter"]  # the base side has no adapter
    assert len({base.key, tuned.key, both.key}) == 3
    assert both.key == history_key("SmolLM2-135M-Instruct", "/runs/r1/adapter", True)
    # nothing to compare without an adapter: the toggle is dropped, and so is its conversation
    alone = ChatChoice("SmolLM2-135M-Instruct", "", compare=True)
    assert not alone.compare and alone.sides == ["base"] and alone.key == base.key
    assert both.to_dict() == {"model": "SmolLM2-135M-Instruct", "adapter": "/runs/r1/adapter", "compare": True}


def test_stats_caption_says_what_the_answer_measured():
    assert stats_caption({"time_to_first_token": 0.1234, "tokens_per_second": 41.46, "new_tokens": 37}) == (
        "first token 0.12 s · 41.5 tokens/s · 37 tokens")
    assert stats_caption({"new_tokens": 0, "tokens_per_second": None}) == "0 tokens"  # stopped before its first token
    assert stats_caption({}) == "0 tokens"


def test_new_chat_waits_for_a_stopped_answer_so_it_does_not_come_back(mactuner_home):
    key, in_flight = history_key("m"), AnswersInFlight()
    question, reply = new_turn("Hello")
    writing = threading.Event()

    def stopped_run() -> None:  # the run a Stop click interrupted: it saves its turn a moment later
        with in_flight.writing():
            writing.set()
            time.sleep(0.3)
            save_turn(key, question, reply)

    old = threading.Thread(target=stopped_run)
    old.start()
    assert writing.wait(10)
    clear_history(key, in_flight, timeout=10)  # New chat
    old.join()
    assert load_history(key) == []  # cleared after the late save, not before it


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


def test_turns_are_merged_by_id_so_no_writer_drops_another(mactuner_home):
    key = history_key("m")
    save_history(key, HISTORY[:2])  # a conversation saved before turns had ids stays as it is
    # two tabs (or a stopped run and the run after it) each loaded the file before the other saved
    tab_a, tab_b = new_turn("From tab A"), new_turn("From tab B")
    save_turn(key, *tab_a)  # A's question, its answer still being written
    save_turn(key, *tab_b)
    tab_a[1]["answers"]["base"] = "A's answer"
    save_turn(key, *tab_a)  # the same turn again (the next side of Compare, the end of the answer)
    saved = load_history(key)
    assert [t.get("content") for t in saved[::2]] == ["What is the capital of Quenmark?", "From tab A", "From tab B"]
    assert saved[2:4] == list(tab_a) and saved[3]["answers"] == {"base": "A's answer"}
    assert [t["role"] for t in saved] == ["user", "assistant"] * 3
    with pytest.raises(ValueError, match="new_turn"):
        save_turn(key, {"role": "user", "content": "no id"}, {"role": "assistant", "answers": {}})


def test_many_tabs_saving_at_once_keep_every_turn(mactuner_home):
    key = history_key("m", "/runs/r1/adapter", compare=True)
    start = threading.Barrier(6)

    def tab(n: int) -> None:
        start.wait()
        for i in range(5):
            question, reply = new_turn(f"tab {n} question {i}")
            save_turn(key, question, reply)
            reply["answers"]["base"] = f"answer {n}.{i}"
            save_turn(key, question, reply)

    tabs = [threading.Thread(target=tab, args=(n,)) for n in range(6)]
    for thread in tabs:
        thread.start()
    for thread in tabs:
        thread.join()
    saved = load_history(key)
    questions = [t["content"] for t in saved if t["role"] == "user"]
    assert sorted(questions) == sorted(f"tab {n} question {i}" for n in range(6) for i in range(5))
    assert all(t["role"] == "assistant" and t["answers"]["base"].startswith("answer ") for t in saved[1::2])


class StopRequested(Exception):
    """What Streamlit raises inside the interrupted script run at its next call (StopException)."""


def test_the_run_after_stop_waits_for_the_stopped_answer(varied_model_dir, mactuner_home):
    loaded = load_chat_model(str(varied_model_dir), device="cpu")
    key, in_flight = history_key(str(varied_model_dir)), AnswersInFlight()
    clicked = threading.Event()

    def interrupted_run() -> None:
        question, reply = new_turn("Hello there")
        with in_flight.writing():
            stream = stream_chat(loaded, [{"role": "user", "content": "Hello there"}],
                                 GenerationSettings(max_new_tokens=200, temperature=0))
            try:
                for n, _ in enumerate(stream):
                    if n == 3:
                        clicked.set()  # Stop: the next run starts now ...
                        time.sleep(0.5)  # ... while this one computes its next token
                        raise StopRequested
            except StopRequested:
                pass
            finally:
                record_answer(reply, "base", stream)
                save_turn(key, question, reply)

    old = threading.Thread(target=interrupted_run)
    old.start()
    assert clicked.wait(60)
    assert in_flight.busy() and not in_flight.wait(timeout=0.05)
    assert load_history(key) == []  # what the next run loaded before it waited: no stopped turn yet
    assert in_flight.wait(timeout=30)
    [question, reply] = load_history(key)  # what it loads after waiting
    assert question["content"] == "Hello there" and reply["answers"]["base"]
    assert reply["stats"]["base"]["finish_reason"] == "cancelled"
    old.join()
    assert not in_flight.busy() and in_flight.wait(timeout=0)


def test_a_compare_turn_is_saved_as_soon_as_each_side_ends(varied_model_dir, mactuner_home):
    loaded = load_chat_model(str(varied_model_dir), device="cpu")  # answers for both sides: what is saved when counts
    choice = ChatChoice(str(varied_model_dir), "/runs/r1/adapter", compare=True)
    settings = GenerationSettings(max_new_tokens=40, temperature=0)
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "answers": {"base": "Hello."}, "stats": {}}]
    save_history(choice.key, earlier)
    with pytest.raises(StopRequested), ChatTurn(choice, "Hello there") as turn:
        assert turn.conversation(earlier, "base")[-1] == {"role": "user", "content": "Hello there"}
        assert turn.conversation(earlier, "fine-tuned") == [{"role": "user", "content": "Hello there"}]
        base = stream_chat(loaded, turn.conversation(earlier, "base"), GenerationSettings(max_new_tokens=6, temperature=0))
        "".join(base)
        assert turn.record("base", base)["finish_reason"] == "length"
        # the base answer is on disk while the fine-tuned side answers
        saved = load_history(choice.key)
        assert saved[:2] == earlier and saved[2:] == turn.pair and set(saved[3]["answers"]) == {"base"}
        tuned = stream_chat(loaded, turn.conversation(earlier, "fine-tuned"), settings)
        try:
            for n, _ in enumerate(tuned):
                if n == 2:
                    raise StopRequested  # Stop while the fine-tuned side answers
        finally:
            turn.record("fine-tuned", tuned)
            written = history_file(choice.key).stat()
    saved = load_history(choice.key)
    assert [t["role"] for t in saved] == ["user", "assistant"] * 2 and saved[2:] == turn.pair  # one turn, both sides
    assert saved[3]["answers"]["base"] == base.text and saved[3]["answers"]["fine-tuned"] == tuned.text
    assert saved[3]["stats"]["fine-tuned"]["finish_reason"] == "cancelled"
    # leaving the turn wrote nothing more (each write replaces the file); leaving one that no side answered
    # (an error, a Stop while a model loads) keeps the question
    assert (history_file(choice.key).stat().st_ino, history_file(choice.key).stat().st_mtime_ns) == (
        written.st_ino, written.st_mtime_ns)
    with ChatTurn(choice, "Never answered"):
        pass
    with pytest.raises(StopRequested), ChatTurn(choice, "Stopped while a model loads") as stopped:
        raise StopRequested
    saved = load_history(choice.key)
    assert [t.get("content") for t in saved[::2]] == ["Hi", "Hello there", "Never answered", "Stopped while a model loads"]
    assert saved[-2:] == stopped.pair and saved[-1]["answers"] == {}


def test_compare_sides_saved_at_the_same_moment_by_many_tabs_keep_every_answer(mactuner_home):
    choice = ChatChoice("m", "/runs/r1/adapter", compare=True)
    tabs, questions = 6, 4
    start = threading.Barrier(tabs)
    shared = ChatTurn(choice, "asked in one tab, its sides saved by two writers")  # e.g. a retry of the save

    def tab(n: int) -> None:
        start.wait()
        for i in range(questions):
            with ChatTurn(choice, f"tab {n} question {i}") as turn:
                for who in choice.sides:
                    turn.reply["answers"][who] = f"{who} {n}.{i}"
                    turn.save()
        # two writers of one turn save different sides at once: neither side is lost
        writer = copy.deepcopy(shared)
        writer.reply["answers"][choice.sides[n % 2]] = f"from writer {n}"
        start.wait()
        writer.save()

    threads = [threading.Thread(target=tab, args=(n,)) for n in range(tabs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    saved = load_history(choice.key)
    asked = [t["content"] for t in saved if t["role"] == "user"]
    assert len(asked) == len(set(asked)) == tabs * questions + 1  # every turn once
    assert [t["role"] for t in saved] == ["user", "assistant"] * (tabs * questions + 1)
    for n in range(tabs):  # each tab's turns in the order it asked them, each with both answers
        mine = [i for i, t in enumerate(saved) if t.get("content", "").startswith(f"tab {n} ")]
        assert [saved[i]["content"] for i in mine] == [f"tab {n} question {i}" for i in range(questions)]
        assert [saved[i + 1]["answers"] for i in mine] == [
            {who: f"{who} {n}.{i}" for who in choice.sides} for i in range(questions)]
    [both] = [saved[i + 1] for i, t in enumerate(saved) if t["role"] == "user" and t.get("id") == shared.question["id"]]
    assert set(both["answers"]) == set(choice.sides)
