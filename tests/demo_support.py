"""The Quenmark demo run shared by slow tests: the built-in model taught the demo facts in 30 LoRA steps
(the settings of tests/chat/test_engine.py's slow demo test), and the facts to ask about."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mactuner.data import DEMO_DATASETS, DEMO_FACTS


def demo_facts(count: int = 3) -> list[dict]:
    """The first ``count`` demo facts: question, unseen_question, answer, answer_keyword."""
    return json.loads(DEMO_FACTS.read_text())[:count]


def train_demo_run(run_dir: Path, steps: int = 30, **changes):
    """Train the built-in model on the Quenmark demo into ``run_dir`` (one thread: steadier on a shared CPU).

    ``changes`` override the config's fields (e.g. ``method="qlora"``)."""
    from mactuner.config import TrainConfig
    from mactuner.train import train

    config = TrainConfig(dataset=str(DEMO_DATASETS["quenmark-messages"]), device="cpu", max_steps=steps, batch_size=8,
                         learning_rate=2e-3, lora_rank=16, lora_alpha=32, warmup_steps=2, val_fraction=0.0,
                         save_every=steps, max_length=128, compile="off", **changes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(config, run_dir)
    finally:
        torch.set_num_threads(threads)
    assert result.state == "finished", result.message
    return result
