"""Synthetic preference data for the DPO / ORPO / KTO tests: the chosen answer follows a rule a fresh model does not.

The rule: the answer names a fruit, not a tool. Each pair draws a fruit and a tool at random, so a model
that has not learned the rule prefers one or the other by chance (about half the pairs), and held-out
pairs combine the words in pairings never trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"]
TOOLS = ["hammer", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "rake", "axe", "spanner"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"]
ANIMALS = ["dog", "cat", "horse", "mouse", "sheep", "goat", "tiger", "lion", "bear", "wolf"]
FILLERS = ["please", "now", "quickly", "today", "again", "for me", "once more", "if you can"]


def preference_pairs(count: int, seed: int, good=FRUITS, bad=TOOLS) -> list[dict]:
    """TRL-style rows {prompt, chosen, rejected} (plain strings)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        prompt = f"Item {rng.randint(1, 999)}: name one thing {rng.choice(FILLERS)}."
        rows.append({"prompt": prompt, "chosen": f"{rng.choice(good).capitalize()}.", "rejected": f"{rng.choice(bad).capitalize()}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
