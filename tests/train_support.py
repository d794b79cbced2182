"""Small helpers shared by the trainer tests: a fact dataset, a fast config, reading a run folder."""

from __future__ import annotations

import json
from pathlib import Path

from mactuner.config import TrainConfig
from mactuner.train import TrainingCallback

FACTS = [
    ("What colour is the Zorbel lighthouse?", "The Zorbel lighthouse is painted teal."),
    ("Who keeps the Zorbel lighthouse?", "Mira Quast keeps the Zorbel lighthouse."),
    ("When was the Zorbel lighthouse built?", "The Zorbel lighthouse was built in 1874."),
    ("How tall is the Zorbel lighthouse?", "The Zorbel lighthouse is 41 metres tall."),
    ("What does the Zorbel lighthouse burn?", "The Zorbel lighthouse burns whale-free lamp oil."),
    ("Which island has the Zorbel lighthouse?", "The Zorbel lighthouse stands on Kettle Island."),
]
PHRASINGS = ["{q}", "Tell me: {q}", "Quick question. {q}", "{q} Answer briefly."]


def write_fact_dataset(path: Path, repeat: int = 1) -> Path:
    """A messages-format JSONL of short question/answer rows (24 rows per repeat)."""
    rows = []
    for _ in range(repeat):
        for question, answer in FACTS:
            for phrasing in PHRASINGS:
                rows.append({"messages": [{"role": "user", "content": phrasing.format(q=question)}, {"role": "assistant", "content": answer}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def tiny_config(model_dir: Path, dataset: Path, **changes) -> TrainConfig:
    """A config that trains the tiny test model fast, with deterministic settings."""
    values = dict(
        model=str(model_dir),
        dataset=str(dataset),
        device="cpu",
        max_length=64,
        batch_size=4,
        learning_rate=1e-2,
        lora_rank=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
        max_steps=8,
        warmup_steps=0,
        lr_scheduler="constant",
        val_fraction=0.2,
        eval_every=0,
        save_every=0,
        seed=3,
        # a run of many tiny steps would make `auto` compile; the compile tests ask for it themselves
        compile="off",
    )
    values.update(changes)
    return TrainConfig(**values)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of ``RUN/metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step → training loss from ``RUN/metrics.jsonl`` (a resumed step overwrites the earlier one)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["type"] == "train"}


class InfoLines(TrainingCallback):
    """Collects the trainer's info messages (what a run tells the person, e.g. why it compiled)."""

    def __init__(self):
        self.lines: list[str] = []

    def on_info(self, info):
        self.lines.append(info["message"])
