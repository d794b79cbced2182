"""MLX chat (mactuner.chat.mlx) on mlx[cpu]: it streams, and its greedy tokens are torch+peft's, with an
MLX run's adapter (its mlx/ files) and with a plain PEFT adapter (converted)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mactuner.chat import GenerationSettings
from tests.mlx_support import build_small_vocab_model, require_mlx
from tests.train_support import write_fact_dataset
from tests.training.test_mlx_engine import CHATML, mlx_config

pytestmark = pytest.mark.mlx


@pytest.fixture(autouse=True)
def _mlx():
    require_mlx()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A varied tiny Llama (larger initial weights: greedy answers are not one repeated token) and an
    adapter trained on it by the MLX engine."""
    from mactuner.training.mlx_engine import MLXTrainer

    folder = tmp_path_factory.mktemp("chat")
    model = build_small_vocab_model(folder / "model", CHATML, initializer_range=0.3)
    facts = write_fact_dataset(folder / "facts.jsonl")
    result = MLXTrainer(mlx_config(model, facts, max_steps=4, val_fraction=0.0), folder / "run").run()
    return model, result.adapter_path


def _torch_greedy(model_dir: Path, adapter: Path, prompt: list[int], count: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        out = tuned.generate(torch.tensor([prompt]), max_new_tokens=count, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=count)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("files", ["mlx", "peft-only"])
def test_mlx_chat_streams_torch_peft_greedy_tokens(trained, tmp_path, files):
    from mactuner.chat.mlx import encode_mlx_prompt, load_mlx_chat_model, stream_mlx_chat

    model_dir, adapter = trained
    if files == "peft-only":  # a torch run's adapter: PEFT files only, converted on load
        adapter = shutil.copytree(adapter, tmp_path / "adapter", ignore=shutil.ignore_patterns("mlx"))
    loaded = load_mlx_chat_model(str(model_dir), adapter)
    messages = [{"role": "user", "content": "Who keeps the Zorbel lighthouse?"}]
    settings = GenerationSettings(temperature=0, max_new_tokens=12)
    stream = stream_mlx_chat(loaded, messages, settings)
    pieces = list(stream)

    prompt = encode_mlx_prompt(loaded, messages, settings)
    assert stream.stats.prompt_tokens == len(prompt) and stream.stats.new_tokens >= 1
    assert stream.stats.finish_reason in ("stop", "length") and stream.stats.time_to_first_token > 0
    assert len(pieces) >= 2 and "".join(pieces) == stream.text
    expected = _torch_greedy(model_dir, adapter, prompt, len(stream.token_ids))
    assert stream.token_ids == expected and len(expected) >= 4
    assert stream.text == loaded.tokenizer.decode(stream.token_ids)


def test_closing_the_stream_stops_it(trained):
    from mactuner.chat.mlx import load_mlx_chat_model, stream_mlx_chat

    loaded = load_mlx_chat_model(str(trained[0]), trained[1])
    stream = stream_mlx_chat(loaded, [{"role": "user", "content": "Tell me: what colour is it?"}],
                             GenerationSettings(temperature=0.7, max_new_tokens=50))
    next(stream)
    stream.close()
    assert stream.stats.finish_reason == "cancelled" and stream.stats.new_tokens < 50


def test_the_chat_page_answers_with_mlx_on_apple_silicon(trained, monkeypatch):
    """On an Apple-silicon Mac with MLX (faked platform; MLX is real here) the page's base + adapter
    chat runs on MLX, not on the torch engine."""
    import platform

    import ui.chat_models
    from mactuner.chat.mlx import load_mlx_chat_model, stream_mlx_chat
    from tests.app.test_app_chat import ask, open_page

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")

    def no_torch(*args, **kwargs):
        raise AssertionError("the torch engine was used")

    monkeypatch.setattr(ui.chat_models, "load_chat_model", no_torch)
    ui.chat_models.model_cache().clear()
    at = ask(open_page(), trained[0], "Who keeps the Zorbel lighthouse?")
    answer = at.session_state["chat_history"][1]["answers"]["base"]

    expected = stream_mlx_chat(load_mlx_chat_model(str(trained[0])), [{"role": "user", "content": "Who keeps the Zorbel lighthouse?"}],
                               GenerationSettings(temperature=0, max_new_tokens=8))
    assert answer == "".join(expected) and answer
    ui.chat_models.model_cache().clear()
