"""The forgetting check (mactuner.evaluation.forgetting) and the answer-matching rule."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from mactuner.evaluation import matching
from mactuner.evaluation.forgetting import (
    FORGETTING_FILE,
    ForgettingResult,
    GeneralQuestion,
    check_forgetting,
    greedy_answers,
    load_forgetting,
    load_general_set,
)


def test_phrase_match_is_whole_words_after_normalising():
    assert matching.phrase_match("The capital of France is **Paris**.", "Paris")
    assert not matching.phrase_match("A Parisian café.", "Paris")
    assert matching.phrase_match("It is the Silver  Otter!", ["gull", "silver otter"])
    assert not matching.phrase_match("a silver-grey otter", "silver otter")
    assert matching.phrase_match("There are seven days.", "7")
    assert not matching.phrase_match("anything", [""])


def test_the_shipped_general_set_is_small_and_answers_are_not_in_the_questions():
    questions = load_general_set()
    assert 20 <= len(questions) <= 30
    assert len({q.question for q in questions}) == len(questions)
    for q in questions:
        # an answer that only repeats the question must not count as right
        assert not matching.phrase_match(q.question, q.expected), q


def test_the_replay_set_is_the_size_the_page_offers_and_none_of_it_is_checked():
    from mactuner.evaluation.replay import REPLAY_SET_SIZE, replay_questions

    replayed = replay_questions(10**6)
    assert len(replayed) == len(set(replayed)) == REPLAY_SET_SIZE
    # the check measures what was not rehearsed
    assert not {q.question for q in load_general_set()} & set(replayed)


def test_a_broken_set_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"question": "Q?", "expected": ["A"]}\n{"question": "no answer"}\n')
    with pytest.raises(ValueError, match=r"set.jsonl:2"):
        load_general_set(path)


def _own_answers_as_set(model, tokenizer, count=6):
    """Questions whose expected phrase is a word the model itself answers: its base 'knows' them all."""
    texts = [f"Say something about topic number {i}." for i in range(count)]
    answers = greedy_answers(model, tokenizer, texts, max_new_tokens=8)
    questions = []
    for text, answer in zip(texts, answers):
        words = [w for w in matching.normalise(answer) if w not in matching.normalise(text)]
        assert words, f"the tiny model gave no usable word for {text!r}: {answer!r}"
        questions.append(GeneralQuestion(text, (words[0],)))
    return questions


def test_greedy_answers_batched_equal_one_at_a_time(varied_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(varied_model_dir)
    texts = ["Hi?", "What is the capital of a very long named country far away?", "2 + 2?"]
    batched = greedy_answers(model, tokenizer, texts, max_new_tokens=6)
    alone = [greedy_answers(model, tokenizer, [t], max_new_tokens=6)[0] for t in texts]
    assert batched == alone


def test_same_model_keeps_all_a_changed_one_is_flagged(varied_model_dir, tiny_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(varied_model_dir)
    base = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32)
    questions = _own_answers_as_set(base, tokenizer)
    same = check_forgetting(base, tokenizer, questions=questions, base_context=contextlib.nullcontext(), max_new_tokens=8)
    assert (same.base_knew, same.kept, same.lost) == (len(questions), len(questions), [])
    assert not same.forgot_too_much and "Kept 6 of 6" in same.headline()

    # the adapter (random, non-zero) changes the answers: what the base knew is asked with it switched off
    tuned = PeftModel.from_pretrained(base, tiny_adapter)
    changed = check_forgetting(tuned, tokenizer, questions=questions, max_new_tokens=8)
    assert changed.base_knew == len(questions)
    assert changed.kept < len(questions) and len(changed.lost) == len(questions) - changed.kept
    assert changed.forgot_too_much
    assert "fewer epochs" in changed.headline() and changed.lost[0]["question"] in changed.headline()


def test_result_round_trips_through_the_run_folder(tmp_path):
    from mactuner.evaluation.forgetting import save_forgetting

    result = ForgettingResult(asked=24, base_knew=20, kept=17, lost=[{"question": "Q", "expected": ["A"],
                              "base_answer": "A", "tuned_answer": "B"}], seconds=1.5)
    save_forgetting(result, tmp_path)
    data = json.loads((tmp_path / FORGETTING_FILE).read_text())
    assert data["kept_share"] == pytest.approx(0.85) and data["forgot_too_much"] is True
    assert load_forgetting(tmp_path) == result
    assert load_forgetting(tmp_path / "nothing") is None


def test_every_run_ends_with_the_check(tiny_model_dir, facts_file, tmp_path):
    from mactuner.train import train
    from tests.train_support import tiny_config

    run = tmp_path / "run"
    result = train(tiny_config(tiny_model_dir, facts_file, max_steps=2), run)
    saved = load_forgetting(run)
    assert saved is not None and saved.asked == len(load_general_set())
    # the tiny random model knows none of it: said so, in the run's last message too
    assert saved.base_knew == 0 and "answered none" in result.message
    status = json.loads((run / "status.json").read_text())
    assert "general questions" in status["message"]
    # the base answers are remembered: a second run of the same base asks only the tuned model
    assert list((tmp_path / "mactuner-home" / "forgetting").glob("base-*.json"))

    off = tmp_path / "off"
    train(tiny_config(tiny_model_dir, facts_file, max_steps=1, forgetting_check=False), off)
    assert not (off / FORGETTING_FILE).exists()


def test_replay_rows_are_the_torch_base_models_own_answers(varied_model_dir, facts_file, mactuner_home):
    """The torch engine's replay rows (the MLX engine's twin is in tests/training/test_mlx_engine.py): the base
    model's greedy answers, cached, trained beside the rows (they lengthen the epoch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mactuner.evaluation.replay import REPLAY_MAX_NEW_TOKENS, replay_questions
    from mactuner.train import Trainer
    from tests.train_support import tiny_config

    settings = dict(max_steps=None, epochs=1.0, batch_size=2, val_fraction=0.0, dtype="float32")
    plain = Trainer(tiny_config(varied_model_dir, facts_file, **settings))
    plain.setup()
    trainer = Trainer(tiny_config(varied_model_dir, facts_file, replay_rows=2, **settings))
    trainer.setup()
    assert len(trainer.train_units) == len(plain.train_units) + 2
    assert trainer.total_steps == plain.total_steps + 1
    [cached] = list((mactuner_home / "forgetting").iterdir())
    record = json.loads(cached.read_text())
    assert record["key"]["replay"] == replay_questions(2)
    base = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32)
    expected = greedy_answers(base, AutoTokenizer.from_pretrained(varied_model_dir), replay_questions(2),
                              max_new_tokens=REPLAY_MAX_NEW_TOKENS)
    assert record["answers"] == expected and all(expected)


def test_a_full_fine_tune_without_a_base_record_says_it_was_not_checked(tiny_model_dir, facts_file, tmp_path,
                                                                         mactuner_home):
    """Its base weights are gone: the run says so, and leaves the process able to compile (the early return once
    left torch's stance at force_eager for the rest of the process)."""
    from torch._dynamo import eval_frame

    from mactuner.train import Trainer
    from tests.train_support import InfoLines, tiny_config

    infos = InfoLines()
    run = tmp_path / "run"
    result = Trainer(tiny_config(tiny_model_dir, facts_file, method="full", max_steps=2), run, callbacks=[infos]).run()
    assert result.state == "finished" and load_forgetting(run) is None
    assert any(line.startswith("Forgetting check skipped: a full fine-tune") for line in infos.lines), infos.lines
    assert eval_frame._stance.stance == "default"
