"""Recommended training settings and a memory estimate, from the model, the device and the data.

    estimate.py        the memory estimate (estimate_memory, estimate_for_config), checked against real runs
    rules.py           one rule per setting group: dtype, max length, LoRA shape, method, batch, schedule
    recommendation.py  recommend_hyperparameters runs the rules in order; Recommendation holds the result

Every public name is importable from ``mactuner.recommend``.
"""

from mactuner.recommend.estimate import (
    DEFAULT_TARGET_MODULES,
    GB,
    MB,
    MemoryEstimate,
    estimate_for_config,
    estimate_memory,
)
from mactuner.recommend.recommendation import (
    Recommendation,
    free_memory_bytes,
    reasons_markdown,
    recommend_hyperparameters,
)
from mactuner.recommend.rules import (
    CHECKPOINTS_PER_RUN,
    SMALL_DATASET_ROWS,
    Choice,
    choose_batch,
    choose_dtype,
    choose_lora_shape,
    choose_max_length,
    choose_method,
    choose_schedule,
    memory_budget,
    method_available,
    trained_per_row,
)

__all__ = [
    "CHECKPOINTS_PER_RUN",
    "Choice",
    "DEFAULT_TARGET_MODULES",
    "GB",
    "MB",
    "MemoryEstimate",
    "Recommendation",
    "SMALL_DATASET_ROWS",
    "choose_batch",
    "choose_dtype",
    "choose_lora_shape",
    "choose_max_length",
    "choose_method",
    "choose_schedule",
    "estimate_for_config",
    "estimate_memory",
    "free_memory_bytes",
    "memory_budget",
    "method_available",
    "reasons_markdown",
    "recommend_hyperparameters",
    "trained_per_row",
]
