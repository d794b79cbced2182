"""The dataset as training units: read, split, tokenize, drop untrainable rows, make units.

One function for every engine (:class:`~mactuner.training.trainer.Trainer` on torch,
:class:`~mactuner.training.mlx_engine.MLXTrainer` on MLX), so both read the same
formats, apply the same chat template and max-length rules and train on the same
token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mactuner.config import TrainConfig
from mactuner.data import IGNORE_INDEX
from mactuner.training.batching import Unit, make_units
from mactuner.training.errors import TrainingError


@dataclass
class PreparedData:
    """The training and validation units of a run, and the dataset's format."""

    format: str
    train_units: list[Unit]
    val_units: list[Unit]


def prepare_units(
    config: TrainConfig,
    tokenizer: Any,
    info: Callable[[str], None],
    stage: Callable[[str, str], None],
    extra_train_examples: Callable[[], list] | None = None,
) -> PreparedData:
    """Read ``config.dataset``, split off validation, tokenize and build the units.

    Args:
        config: the run's settings (dataset, format, split, max_length, assistant_only_loss, packing, seed).
        tokenizer: the model's transformers tokenizer (its chat template formats conversations).
        info: receives a message for the person (skipped rows, rows left out).
        stage: receives ``("tokenising", message)`` when tokenization starts.
        extra_train_examples: more training examples, asked for after the split (the torch trainer's
            replay rows: general questions answered by the base model itself).

    Raises:
        TrainingError: the dataset cannot be read or leaves no training row; the message says why.
    """
    from mactuner.data import DatasetError, load_dataset_file, tokenize_examples, train_validation_split

    try:
        load = load_dataset_file(config.dataset, config.dataset_format)
    except DatasetError as error:
        raise TrainingError(f"The dataset cannot be used: {error}") from error
    stage("tokenising", f"Tokenising {len(load.examples):,} rows of {Path(config.dataset).name}…")
    for problem in load.problems[:20]:
        info(f"Skipped a row: {problem}")
    if len(load.problems) > 20:
        info(f"… and {len(load.problems) - 20} more unusable rows ({len(load.problems)} in all).")
    train_examples, val_examples = train_validation_split(load.examples, config.val_fraction, config.seed)
    problems: list = []
    train_rows = tokenize_examples(train_examples, tokenizer, config.max_length, config.assistant_only_loss, problems)
    val_rows = tokenize_examples(val_examples, tokenizer, config.max_length, config.assistant_only_loss, problems)
    if extra_train_examples is not None:
        extra = extra_train_examples()
        train_rows += tokenize_examples(extra, tokenizer, config.max_length, config.assistant_only_loss, problems)
    for problem in problems[:20]:
        info(f"Skipped a row: {problem}")

    def trained(rows):
        kept = [r for r in rows if any(x != IGNORE_INDEX for x in r["labels"][1:])]
        return kept, len(rows) - len(kept)

    train_rows, dropped_train = trained(train_rows)
    val_rows, dropped_val = trained(val_rows)
    if dropped_train + dropped_val:
        info(
            f"{dropped_train + dropped_val} rows have no trained token left after truncation to "
            f"{config.max_length} tokens and are left out; raise max_length to keep them."
        )
    if not train_rows:
        raise TrainingError(f"{config.dataset}: no usable training rows ({len(load.problems)} unusable).")
    return PreparedData(
        format=load.format,
        train_units=make_units(train_rows, config.packing, config.max_length, config.seed),
        val_units=make_units(val_rows, config.packing, config.max_length, config.seed),
    )


def replay_rows(count: int, model: Any, tokenizer: Any, base_key: dict[str, Any], info: Callable[[str], None],
                stage: Callable[[str, str], None], answer: Any = None) -> list:
    """``count`` general questions answered by the base model itself, as training examples, for either engine
    (:func:`mactuner.evaluation.replay.replay_examples`: ``answer``, an ``Answerer``, asks an MLX model, else
    the torch ``model`` does); said as a stage and an info line. A tokenizer without a chat template gives none, with the reason."""
    from mactuner.evaluation.replay import replay_examples

    stage("replaying", f"Answering {count} general questions with the base model, to train on beside the new rows "
          "(keeps what it knew; cached for the next run)…")
    try:
        rows = replay_examples(model, tokenizer, count, base_key, answer=answer)
    except ValueError as error:  # no chat template
        info(f"No replay rows: {error}.")
        return []
    info(f"{len(rows)} replay rows (general questions with the base model's own answers) train beside the dataset's rows.")
    return rows
