"""Compare mode's two answers are generated at the same time (issue 21: one side used to wait for the
other to finish), each ends on its own, and a stop ends both after their next token."""

from __future__ import annotations

import threading

from mactuner.chat import GenerationSettings, load_chat_model, stream_chat
from mactuner.chat.history import record_answer
from mactuner.chat.parallel import ParallelAnswers

WAIT_S = 60.0


class WaitsForTheOther:
    """A real chat stream whose first piece waits until the other side has produced one: answered one
    after the other, the first side would wait in vain (and this records that it did)."""

    def __init__(self, stream, mine: threading.Event, other: threading.Event) -> None:
        self.stream, self.mine, self.other = stream, mine, other
        self.waited_in_vain = False

    def __iter__(self):
        for piece in self.stream:
            self.mine.set()
            if not self.other.wait(WAIT_S):
                self.waited_in_vain = True
            yield piece

    @property
    def text(self):
        return self.stream.text

    @property
    def stats(self):
        return self.stream.stats

    def close(self):
        self.stream.close()


def test_both_sides_answer_at_the_same_time(varied_model_dir, tiny_adapter):
    base = load_chat_model(str(varied_model_dir), device="cpu")
    tuned = load_chat_model(str(varied_model_dir), str(tiny_adapter), device="cpu")
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0)
    question = [{"role": "user", "content": "Hello there"}]
    first, second = threading.Event(), threading.Event()
    streams = {"base": WaitsForTheOther(stream_chat(base, question, settings), first, second),
               "fine-tuned": WaitsForTheOther(stream_chat(tuned, question, settings), second, first)}
    seen = []
    with ParallelAnswers(streams) as answers:
        for ended in answers.updates(0.05):
            seen += ended
    assert not any(s.waited_in_vain for s in streams.values()), "one side waited for the other to finish"
    assert sorted(seen) == ["base", "fine-tuned"] and not answers.errors
    # each answer is the model's own, as it is alone
    alone = {"base": stream_chat(base, question, settings), "fine-tuned": stream_chat(tuned, question, settings)}
    for who, stream in alone.items():
        assert "".join(stream) == streams[who].text and streams[who].stats.new_tokens == stream.stats.new_tokens


def test_a_stop_ends_both_sides_after_their_next_token(varied_model_dir):
    base = load_chat_model(str(varied_model_dir), device="cpu")
    settings = GenerationSettings(max_new_tokens=200, temperature=0.0)
    question = [{"role": "user", "content": "Hello there"}]
    streams = {who: stream_chat(base, question, settings) for who in ("a", "b")}
    with ParallelAnswers(streams) as answers:
        next(answers.updates(0.01))
        answers.stop()
        assert answers.ended() == {"a", "b"}
    reply: dict = {}
    for who, stream in streams.items():
        record_answer(reply, who, stream)  # closes a stream its thread has left: no "generator already executing"
        assert reply["stats"][who]["new_tokens"] < 200 and reply["stats"][who]["finish_reason"] == "cancelled"
