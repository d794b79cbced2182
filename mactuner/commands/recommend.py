"""``python -m mactuner recommend [--model M] [--dataset FILE] [--device D] [--json]``.

Prints the recommended training settings for a model, dataset and device, each
with its reason, and the memory estimate broken down. Exit codes: 0 done, 1 the
model or dataset cannot be used (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "recommend training settings and estimate memory for a model, dataset and device"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --dataset, --device, --free-memory-gb, --trust-remote-code, --json."""
    parser.add_argument("--model", default=None, help="hub id, local folder or .gguf file (default: the built-in model)")
    parser.add_argument("--dataset", default=None, help="dataset file whose token lengths shape the settings")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    parser.add_argument("--free-memory-gb", type=float, default=None, help="plan for this much free memory instead of measuring it")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    parser.add_argument("--json", action="store_true", help="print the recommendation as JSON")


def run(args: argparse.Namespace) -> int:
    """Recommend and print; errors are one plain line on stderr and exit code 1."""
    from mactuner.data import DatasetError
    from mactuner.models import ModelSourceError
    from mactuner.recommend import GB, recommend_hyperparameters

    free = int(args.free_memory_gb * GB) if args.free_memory_gb is not None else None
    try:
        rec = recommend_hyperparameters(
            args.model, args.dataset, args.device, free_memory=free, trust_remote_code=args.trust_remote_code
        )
    except (ModelSourceError, DatasetError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rec.to_dict(), indent=2))
        return 0
    print(format_recommendation(rec))
    return 0


def format_recommendation(rec) -> str:
    """The recommendation as aligned text lines."""
    from mactuner.recommend import GB

    free = f"{rec.free_memory / GB:.1f} GB free" if rec.free_memory else "free memory unknown"
    lines = [
        f"Model   {rec.model}: {rec.num_parameters / 1e6:.1f}M parameters, {rec.trainable_parameters / 1e6:.2f}M trained",
        f"Device  {rec.device} ({free})",
    ]
    if rec.dataset_rows is not None:
        lines.append(f"Data    {rec.dataset_rows} rows")
    lines.append("")
    values = rec.train_config_values()
    width = max(len(k) for k in values)
    for key, value in values.items():
        shown = ",".join(value) if isinstance(value, list) else value
        reason = rec.reasons.get(key, "")
        lines.append(f"{key:<{width}}  {shown!s:<12}  {reason}")
    m = rec.memory
    lines += [
        "",
        "Memory estimate (peak):",
        f"  weights                           {m.weights / GB:6.2f} GB",
        f"  trainable + gradients + optimizer {m.trainable / GB:6.2f} GB",
        f"  activations (with logits)         {m.activations / GB:6.2f} GB",
        f"  runtime overhead                  {m.overhead / GB:6.2f} GB",
        f"  total                             {m.total / GB:6.2f} GB",
    ]
    for warning in rec.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
