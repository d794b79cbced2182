"""Shared test set-up: every test gets its own MacTuner home; the converted
model cache is shared across the session so the default model converts once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.features import in_ci, require
from tests.locations import ROOT

# fixtures shared by every test module (faked hardware, the tiny RAG embedder)
pytest_plugins = ["tests.fake_hardware", "tests.rag_fixtures"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MACTUNER_MODEL_CACHE", str(ROOT / ".cache" / "models"))


@pytest.fixture(autouse=True)
def mactuner_home(tmp_path, monkeypatch):
    """A fresh ``MACTUNER_HOME`` per test: settings, runs and collections never leak."""
    home = tmp_path / "mactuner-home"
    monkeypatch.setenv("MACTUNER_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real default model, converted once into the shared model cache."""
    from mactuner.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path) -> Path:
    """A tiny Llama (2 layers, hidden 64) with SmolLM2's real tokenizer and chat
    template, saved as a local folder: fast unit tests of everything model-shaped."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama re-initialised with larger weights: its greedy answers are
    varied text (the default init repeats one newline), so comparisons mean something."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("varied-llama")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_adapter(varied_model_dir, tmp_path_factory):
    """A LoRA adapter made with peft directly, with non-zero B so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    folder = tmp_path_factory.mktemp("tiny-adapter")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def quenmark_demo_run(smollm2_path, tmp_path_factory) -> Path:
    """The Quenmark demo fine-tune, trained once per test session (30 LoRA steps of the built-in
    model, a checkpoint at step 30 and the final adapter); tests copy it with ``install_demo_run``."""
    from tests.demo_support import train_demo_run

    run_dir = tmp_path_factory.mktemp("demo-run") / "quenmark"
    train_demo_run(run_dir)
    return run_dir


@pytest.fixture
def installed_demo_run(quenmark_demo_run, mactuner_home) -> Path:
    """The session's demo run copied into this test's MACTUNER_HOME, as a finished run the pages list."""
    import shutil

    target = mactuner_home / "runs" / quenmark_demo_run.name
    shutil.copytree(quenmark_demo_run, target)
    return target


@pytest.fixture
def facts_file(tmp_path) -> Path:
    """A small fact dataset (tests.train_support.write_fact_dataset) for the trainer tests."""
    from tests.train_support import write_fact_dataset

    return write_fact_dataset(tmp_path / "facts.jsonl")


def pytest_runtest_setup(item):
    """``@requires(feature)``: skip locally, fail under CI=true, when the machine lacks the feature."""
    for mark in item.iter_markers("requires"):
        for feature in mark.args:
            require(feature)


_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not getattr(report, "wasxfail", None):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not reason.removeprefix("Skipped: ").startswith("optional:"):
            _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skip of anything not marked optional fails the run: a suite cannot pass by skipping."""
    if in_ci() and _skipped and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if in_ci() and _skipped:
        terminalreporter.section("skipped under CI=true (each one fails the run)")
        for line in _skipped:
            terminalreporter.write_line(line)
