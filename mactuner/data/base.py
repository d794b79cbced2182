"""What every part of the data package shares: the example types, the problem reports, the formats and the demo files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # label value on tokens that take no loss (PyTorch's CrossEntropyLoss default)

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
"""Dataset formats understood by :func:`load_dataset_file`."""

EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")
"""File types understood by :func:`load_dataset_file`."""

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEMO_DATASETS: dict[str, Path] = {
    "quenmark-alpaca": DEMO_DIR / "quenmark_alpaca.json",
    "quenmark-messages": DEMO_DIR / "quenmark_messages.jsonl",
    "quenmark-csv": DEMO_DIR / "quenmark.csv",
}
"""The demo datasets shipped with MacTuner: facts about the fictional island of Quenmark."""
DEMO_FACTS = DEMO_DIR / "facts.json"
"""``[{"question", "answer", "answer_keyword"}]``: what a model fine-tuned on the demo data should state."""


class DatasetError(Exception):
    """A dataset file that cannot be used at all; the message says where and why."""


@dataclass
class DataProblem:
    """One unusable row, reported instead of silently dropped.

    Attributes:
        file: the file's name.
        line: the 1-based line of the row in the file (JSONL, JSON, CSV, TXT) or its
            1-based row number (Parquet); ``None`` where the problem is not tied to a row.
        message: what is wrong, in plain words.
    """

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file} line {self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class Example:
    """One training example: a conversation or a plain text (exactly one of them).

    Attributes:
        messages: ``[{"role", "content"}]`` with roles ``system``, ``user``,
            ``assistant`` or ``tool``.
        text: a plain text trained on in full (pre-training style).
        tools: tool (function) definitions the conversation may call, as JSON schemas.
        line: where the example came from in its file (see :class:`DataProblem`).
    """

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    tools: list[Any] | None = None
    line: int | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError(
                f"an Example needs exactly one of messages or text, got messages={self.messages!r}, text={self.text!r}"
            )


@dataclass
class DatasetLoad:
    """What :func:`load_dataset_file` read.

    Attributes:
        examples: the usable examples, in file order.
        format: the format used (one of :data:`FORMATS`), detected or forced.
        path: the file read.
        problems: every row that could not be used, with where and why.
        total_rows: rows in the file, usable or not (``len(examples) + len(problems)``
            unless a problem concerns the whole file).
    """

    examples: list[Example]
    format: str
    path: Path
    problems: list[DataProblem] = field(default_factory=list)
    total_rows: int = 0
