"""Issue 9, the cost rows: the live view's memory stays bounded on a very long run,
and chat history trimming does work linear in the history (counted, not timed)."""

from __future__ import annotations

import json
import math
import time
import tracemalloc

import pytest

from mactuner import paths, runs


def write_long_metrics(count: int) -> None:
    path = paths.runs_dir() / "long"
    path.mkdir(parents=True)
    (path / "status.json").write_text(json.dumps({"state": "running", "pid": None, "step": count}))
    line = ('{{"type": "train", "step": {s}, "total_steps": {n}, "epoch": 0.5, "loss": {l:.6f}, "lr": 0.0002, '
            '"grad_norm": 1.25, "tokens_per_second": 812.5, "tokens": {t}, "memory_bytes": 123456789, '
            '"time": {s}.5}}\n')
    with open(path / "metrics.jsonl", "w") as handle:
        for start in range(1, count + 1, 10_000):
            handle.write("".join(line.format(s=s, n=count, l=1 / s, t=64 * s)
                                 for s in range(start, min(start + 10_000, count + 1))))
            if start % 50_000 == 1:
                handle.write(json.dumps({"type": "eval", "step": start, "val_loss": 1.0, "time": start}) + "\n")
                handle.write(json.dumps({"type": "info", "message": "micro-batch halved", "time": start}) + "\n")


def test_live_view_of_a_200k_step_run_holds_bounded_memory():
    write_long_metrics(200_000)
    tracemalloc.start()
    try:
        tail = runs.MetricsTail("long")
        assert tail.update() == 200_000 + 2 * 4
        _, peak = tracemalloc.get_traced_memory()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    steps = [r["step"] for r in tail.train]
    # a bounded, downsampled history: the first and the newest steps, the recent ones whole
    assert len(steps) <= runs.TAIL_MAX_POINTS and steps[0] == 1 and steps[-1] == 200_000
    assert steps == sorted(steps) and steps[-1000:] == list(range(199_001, 200_001))
    assert len(tail.info) <= runs.TAIL_MAX_INFO
    # all 200k records in memory took ~335 MB per tab (issue 9 row 15); now a few MB
    assert held < 20 * 2**20 and peak < 40 * 2**20, (held / 2**20, peak / 2**20)
    chart_steps, losses = tail.series("loss", max_points=1000)
    assert len(chart_steps) <= 1001 and losses[-1] == pytest.approx(1 / 200_000)


def test_a_resumed_step_replaces_its_record_even_after_thinning():
    write_long_metrics(5_000)
    tail = runs.MetricsTail("long", max_points=500)
    tail.update()
    with open(paths.runs_dir() / "long" / "metrics.jsonl", "a") as handle:
        for step in range(4_990, 5_011):  # resumed from step 4989
            handle.write(json.dumps({"type": "train", "step": step, "loss": 9.0, "time": time.time()}) + "\n")
    tail.update()
    steps = [r["step"] for r in tail.train]
    assert len(steps) <= 500 and steps[-1] == 5_010 and len(set(steps)) == len(steps)
    assert [r["loss"] for r in tail.train if r["step"] >= 4_990] == [9.0] * 21


class CountingTokenizer:
    """The real tokenizer, counting what chat-template rendering it is asked to do."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.renders = 0
        self.messages_rendered = 0

    def apply_chat_template(self, conversation, **kwargs):
        self.renders += 1
        self.messages_rendered += len(conversation)
        return self._tokenizer.apply_chat_template(conversation, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_trimming_a_600_turn_chat_does_linear_work(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mactuner.chat import GenerationSettings, encode_prompt
    from mactuner.models import LoadedModel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # a 1024-token context
    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    loaded = LoadedModel(model, tokenizer, "tiny", str(tiny_model_dir), "cpu", model.dtype, 0)
    turns = []
    for i in range(300):
        turns.append({"role": "user", "content": f"Question {i}: what is {i} plus {i}?"})
        turns.append({"role": "assistant", "content": f"{i} plus {i} is {2 * i}, as every pupil knows."})
    turns.append({"role": "user", "content": "And the newest question?"})
    settings = GenerationSettings(max_new_tokens=256, system_prompt="Be brief.")

    ids = encode_prompt(loaded, turns, settings)[0].tolist()
    budget = model.config.max_position_embeddings - settings.max_new_tokens
    text = tokenizer.decode(ids)
    assert len(ids) <= budget and "Be brief." in text and text.rstrip().endswith("assistant")
    assert "And the newest question?" in text and "Question 0:" not in text
    # the work: one render of the whole chat, then about 2 log2(turns) renders near the budget's size;
    # dropping one turn at a time rendered ~600 conversations of ~300 turns each (~180,000 messages)
    assert tokenizer.renders <= 2 * math.log2(len(turns)) + 3, tokenizer.renders
    assert tokenizer.messages_rendered <= 3 * len(turns), tokenizer.messages_rendered
    # and the most history that fits was kept: one more user turn would not fit
    kept_from = next(i for i, t in enumerate(turns) if t["content"] in text and t["role"] == "user")
    earlier = max(i for i in range(kept_from) if turns[i]["role"] == "user")
    longer = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *turns[earlier:]],
                                           add_generation_prompt=True, return_dict=True)["input_ids"]
    assert len(longer) > budget
