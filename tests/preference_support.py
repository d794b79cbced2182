"""Synthetic preference data for the DPO / ORPO / KTO tests: the chosen answer follows a rule a fresh model does not.

The rule: the chosen answer is the rejected one made polite (" Thank you!" or another courtesy after it,
or "Sure! " before it); the word answered is drawn at random for each pair. A fresh model gives a longer answer a lower
log-probability, so it ranks (almost) no pair right; held-out pairs use prompts and words never trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"]
TOOLS = ["hammer", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "rake", "axe", "spanner"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"]
FILLERS = ["please", "now", "quickly", "today", "again", "for me", "once more", "if you can"]


def preference_pairs(count: int, seed: int, words=FRUITS + TOOLS, polite: str = "suffix",
                     suffix: str = " Thank you!") -> list[dict]:
    """TRL-style rows {prompt, chosen, rejected} (plain strings).

    ``polite``: ``suffix`` (chosen = answer + ``suffix``) or ``prefix`` (chosen = "Sure! " + answer).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = f"Item {rng.randint(1, 999)}: name one thing {rng.choice(FILLERS)}."
        answer = f"{rng.choice(words).capitalize()}."
        chosen = f"{answer}{suffix}" if polite == "suffix" else f"Sure! {answer}"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": answer})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def require(module: str):
    """Import an optional test dependency (trl, tensorboard, mlflow): skipped where it is not installed,
    except under CI=true, where its absence fails the test."""
    import importlib
    import os

    import pytest

    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is a test extra: pip install -e '.[test,trackers]'")
