"""Preference data: the TRL, LLaMA-Factory and KTO formats, bad rows by line, the summary."""

from __future__ import annotations

import json

import pytest

from mactuner.data import DatasetError
from mactuner.data.preference import (
    is_preference_file,
    load_preference_file,
    preference_length_figure,
    summarize_preferences,
    tokenize_preferences,
)
from tests.locations import ALPACA_DEMO, DPO_DEMO, KTO_DEMO


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_llama_factory_preference_sharegpt_is_detected():
    load = load_preference_file(DPO_DEMO, "dpo")
    assert load.format == "sharegpt_preference" and len(load.examples) == 30 and not load.problems
    first = load.examples[0]
    assert first.prompt[-1]["role"] == "user" and first.chosen[0]["role"] == "assistant"
    assert first.chosen != first.rejected
    assert is_preference_file(DPO_DEMO) and not is_preference_file(ALPACA_DEMO)


def test_kto_messages_with_labels_are_detected_and_refused_for_dpo():
    load = load_preference_file(KTO_DEMO, "kto")
    assert load.format == "kto" and len(load.examples) == 30
    assert sum(e.label for e in load.examples) == 19 and all(e.completion[0]["role"] == "assistant" for e in load.examples)
    with pytest.raises(DatasetError, match="not pairs.*objective kto"):
        load_preference_file(KTO_DEMO, "dpo")


def test_trl_strings_and_conversations_and_implicit_prompts(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Meh."}]},
    ])
    load = load_preference_file(path, "dpo")
    assert load.format == "preference" and not load.problems
    # a plain-string row is one user turn and one assistant reply
    assert [e.prompt for e in load.examples] == [[{"role": "user", "content": "Hi?"}]] * 3
    assert [e.chosen for e in load.examples] == [[{"role": "assistant", "content": "Hello!"}]] * 3


def test_bad_rows_are_reported_with_their_line(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Missing?", "chosen": "Yes."},
        {"prompt": "Same?", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Empty turn?", "chosen": [{"role": "assistant", "content": "  "}], "rejected": "No."},
    ])
    load = load_preference_file(path, "dpo")
    assert len(load.examples) == 1
    problems = {p.line: p.message for p in load.problems}
    assert sorted(problems) == [2, 3, 4, 5]
    assert "missing 'rejected'" in problems[2]
    assert "same as 'rejected'" in problems[3]
    assert "empty" in problems[4] and "empty" in problems[5]
    assert str(load.problems[0]).startswith("p.jsonl line 2:")


def test_pairs_train_kto_as_labelled_answers(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}])
    examples = load_preference_file(path, "kto").examples
    assert [(e.completion[0]["content"], e.label) for e in examples] == [("Good.", True), ("Bad.", False)]


def test_sft_data_is_not_preference_data():
    with pytest.raises(DatasetError, match="not preference data.*prompt/chosen/rejected.*objective sft"):
        load_preference_file(ALPACA_DEMO, "dpo")


def test_tokenized_pairs_share_the_prompt_in_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    load = load_preference_file(DPO_DEMO, "dpo")
    rows = tokenize_preferences(load.examples[:3], tokenizer, 10_000)
    for example, row in zip(load.examples, rows):
        text = tokenizer.decode(row.prompt_ids + row.chosen_ids)
        assert text.endswith(example.chosen[0]["content"].strip() + "<|im_end|>\n")
        assert tokenizer.decode(row.prompt_ids).rstrip().endswith("<|im_start|>assistant")
    # truncation: every sequence fits, the prompt keeps its end
    short = tokenize_preferences(load.examples[:3], tokenizer, 64)
    assert all(len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) <= 64 for r in short)
    assert all(r.truncated for r in short)


def test_summary_counts_pairs_and_draws_both_lengths(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    summary = summarize_preferences(load_preference_file(DPO_DEMO, "dpo"), tokenizer, 512, "dpo")
    assert summary.pairs == 30 and summary.rows == 30 and len(summary.chosen_lengths) == 30 == len(summary.rejected_lengths)
    assert summary.truncated_rows == sum(
        1 for p, c, r in zip(summary.prompt_lengths, summary.chosen_lengths, summary.rejected_lengths) if p + max(c, r) > 512
    )
    figure = preference_length_figure(summary)
    assert [t.name for t in figure.data] == ["chosen", "rejected"]
    kto = summarize_preferences(load_preference_file(KTO_DEMO, "kto"), tokenizer, 512, "kto")
    assert (kto.pairs, kto.desirable, kto.undesirable) == (0, 19, 11)
