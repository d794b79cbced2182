"""What a dataset looks like to a tokenizer (lengths, truncation, a plotly histogram), and the train/validation split.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mactuner.data.base import IGNORE_INDEX, DatasetLoad
from mactuner.data.templates import encode_examples

# ---------------------------------------------------------------------------
# summary and split

SUMMARY_SAMPLE_ROWS = 20_000  # a larger dataset's summary (token lengths, truncation) comes from this many rows


@dataclass
class DatasetSummary:
    """What a dataset looks like to a given tokenizer and max length.

    Attributes:
        path: the file.
        format: the format used.
        rows: usable rows.
        total_rows: rows in the file, usable or not.
        problems: the unusable rows (as ``str(DataProblem)``).
        max_length: the max length the truncation count refers to.
        token_lengths: the token length of every usable row (for a histogram).
        min_tokens, mean_tokens, median_tokens, p95_tokens, max_tokens: their statistics.
        truncated_rows: rows longer than ``max_length``.
        trained_lengths: tokens that take the loss in every usable row, after truncation.
        trained_tokens: tokens that take the loss, after truncation.
        rows_without_trained_tokens: rows whose trained part is cut off entirely by
            the truncation (they teach nothing; raise the max length).
        sampled_rows: for a dataset of more than :data:`SUMMARY_SAMPLE_ROWS` rows, how many
            (evenly spaced) were tokenised: the lists and statistics are the sample's, the
            counts (rows, truncated, trained tokens) are scaled to the whole file.
    """

    path: str
    format: str
    rows: int
    total_rows: int
    problems: list[str]
    max_length: int
    token_lengths: list[int]
    min_tokens: int
    mean_tokens: float
    median_tokens: float
    p95_tokens: int
    max_tokens: int
    truncated_rows: int
    trained_lengths: list[int]
    trained_tokens: int
    rows_without_trained_tokens: int
    sampled_rows: int | None = None  # rows tokenised for the statistics when the dataset is larger than that

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def rows_longer_than(self, max_length: int) -> int:
        """Usable rows that a max length of ``max_length`` tokens would truncate (scaled up from a sample)."""
        count = sum(1 for n in self.token_lengths if n > max_length)
        return round(count * self.rows / len(self.token_lengths)) if self.sampled_rows and self.token_lengths else count


def token_length_figure(summary: DatasetSummary, max_length: int):
    """A plotly histogram of the rows' token lengths, with a dashed line at ``max_length``
    (rows to its right are truncated)."""
    import plotly.graph_objects as go

    figure = go.Figure(go.Histogram(x=summary.token_lengths, nbinsx=40))
    figure.add_vline(x=max_length, line_dash="dash", annotation_text="max length")
    figure.update_layout(height=220, margin=dict(t=10, b=30), xaxis_title="tokens per row", yaxis_title="rows")
    return figure


def percentile(values: Sequence[int], q: float) -> int:
    """The ``q`` (0–100) percentile by the nearest-rank method (an actual row length)."""
    if not values:
        return 0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return int(ordered[int(rank) - 1])


def summarize_dataset(
    load: DatasetLoad, tokenizer: Any, max_length: int, assistant_only_loss: bool = True
) -> DatasetSummary:
    """Row count, format, token-length statistics and truncation for ``load`` under ``tokenizer``."""
    problems = list(load.problems)
    examples, sampled = load.examples, None
    if len(examples) > SUMMARY_SAMPLE_ROWS:
        # tokenising every row of a large file would hold the page for minutes: an even sample tells the same
        step = len(examples) / SUMMARY_SAMPLE_ROWS
        examples, sampled = [examples[int(i * step)] for i in range(SUMMARY_SAMPLE_ROWS)], SUMMARY_SAMPLE_ROWS
    encoded = encode_examples(examples, tokenizer, assistant_only_loss, problems)
    for p in problems:
        p.file = p.file or load.path.name
    lengths = [len(ids) for ids, _ in encoded]
    trained_lengths = [sum(1 for x in labels[:max_length] if x != IGNORE_INDEX) for _ids, labels in encoded]
    scale = len(load.examples) / len(examples) if examples else 1.0

    def scaled(count: int) -> int:
        return round(count * scale)

    return DatasetSummary(
        path=str(load.path),
        format=load.format,
        rows=scaled(len(encoded)),
        total_rows=load.total_rows,
        problems=[str(p) for p in problems],
        max_length=max_length,
        token_lengths=lengths,
        min_tokens=min(lengths, default=0),
        mean_tokens=round(statistics.fmean(lengths), 1) if lengths else 0.0,
        median_tokens=float(statistics.median(lengths)) if lengths else 0.0,
        p95_tokens=percentile(lengths, 95),
        max_tokens=max(lengths, default=0),
        truncated_rows=scaled(sum(1 for n in lengths if n > max_length)),
        trained_lengths=trained_lengths,
        trained_tokens=scaled(sum(trained_lengths)),
        rows_without_trained_tokens=scaled(sum(1 for n in trained_lengths if n == 0)),
        sampled_rows=sampled,
    )


def train_validation_split(
    items: Sequence[Any], validation_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """Shuffle ``items`` reproducibly and split off a validation part.

    Args:
        items: examples or tokenized rows.
        validation_fraction: share held out, in [0, 1); with at least two items and a
            positive fraction, the validation part holds at least one item and the
            training part keeps at least one.
        seed: the shuffle's seed (same seed, same split).

    Returns:
        ``(train, validation)``.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if validation_fraction > 0 and len(items) >= 2:
        n_val = min(len(items) - 1, max(1, round(len(items) * validation_fraction)))
    val_idx = set(order[:n_val])
    train = [items[i] for i in range(len(items)) if i not in val_idx]
    val = [items[i] for i in sorted(val_idx)]
    return train, val
