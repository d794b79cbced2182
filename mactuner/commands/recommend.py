"""``python -m mactuner recommend [--model M] [--dataset FILE] [--device D] [--json] [--write CONFIG.yaml]``.

Prints the recommended training settings for a model, dataset and device, each
with its reason, and the memory estimate broken down. Rows of the dataset that
cannot be used are reported exactly as ``train`` reports them ("Skipped a row:
FILE line N: …"). ``--write`` saves the settings as a ``TrainConfig`` YAML that
``python -m mactuner train CONFIG.yaml`` runs as it is. Exit codes: 0 done, 1 the
model or dataset cannot be used (the message says why), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "recommend training settings and estimate memory for a model, dataset and device"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --dataset, --device, --free-memory-gb, --trust-remote-code, --json."""
    parser.add_argument("--model", default=None, help="hub id, local folder or .gguf file (default: the built-in model)")
    parser.add_argument("--dataset", default=None, help="dataset file whose token lengths shape the settings")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: remembered, else the best available)")
    parser.add_argument("--free-memory-gb", type=float, default=None, help="plan for this much free memory instead of measuring it")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    parser.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    parser.add_argument("--write", metavar="CONFIG.yaml", default=None,
                        help="also save the settings as a training config (needs --dataset); "
                        "run it with `python -m mactuner train CONFIG.yaml`")

# the trainer's own wording (mactuner.train), so both commands report a broken row alike
SKIPPED_SHOWN = 20


def skipped_rows_lines(problems: list) -> list[str]:
    """The unusable rows as ``train`` reports them: the first 20, then how many more."""
    lines = [f"Skipped a row: {problem}" for problem in problems[:SKIPPED_SHOWN]]
    if len(problems) > SKIPPED_SHOWN:
        lines.append(f"… and {len(problems) - SKIPPED_SHOWN} more unusable rows ({len(problems)} in all).")
    return lines


def dataset_summary(model: str | None, dataset: str, trust_remote_code: bool = False):
    """The dataset's summary under the model's tokenizer (rows, token lengths, unusable rows)."""
    from transformers import AutoTokenizer

    from mactuner.data import load_dataset_file, summarize_dataset
    from mactuner.models import DEFAULT_MODEL, model_path

    _, path = model_path(model or DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return summarize_dataset(load_dataset_file(dataset), tokenizer, max_length=1_000_000)


def write_config(rec, dataset: str, path: str):
    """Save the recommendation for ``dataset`` as a TrainConfig YAML at ``path``; returns the config."""
    from mactuner.config import TrainConfig

    values = {**rec.train_config_values(), "model": rec.model, "dataset": str(Path(dataset).resolve()),
              "device": rec.device}
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **values})
    config.save(path)
    return config


def run(args: argparse.Namespace) -> int:
    """Recommend and print; errors are one plain line on stderr and exit code 1."""
    from mactuner.data import DatasetError
    from mactuner.models import ModelSourceError
    from mactuner.recommend import GB, recommend_hyperparameters

    if args.write and not args.dataset:
        print("error: --write needs --dataset FILE: a training config names its dataset", file=sys.stderr)
        return 2
    free = int(args.free_memory_gb * GB) if args.free_memory_gb is not None else None
    try:
        summary = dataset_summary(args.model, args.dataset, args.trust_remote_code) if args.dataset else None
        rec = recommend_hyperparameters(
            args.model, args.dataset, args.device, summary=summary, free_memory=free,
            trust_remote_code=args.trust_remote_code,
        )
        config = write_config(rec, args.dataset, args.write) if args.write else None
    except (ModelSourceError, DatasetError, RuntimeError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    skipped = skipped_rows_lines(summary.problems) if summary is not None else []
    if args.json:
        data = rec.to_dict()
        if summary is not None:
            data.update(dataset_total_rows=summary.total_rows, skipped_rows=summary.problems)
        print(json.dumps(data, indent=2))
        for line in skipped:  # on stderr, so stdout stays one JSON document
            print(line, file=sys.stderr)
    else:
        print("\n".join(skipped + [""]) if skipped else "", end="")
        print(format_recommendation(rec, summary))
    if config is not None:
        print(f"Wrote {args.write}; train with: python -m mactuner train {args.write}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def format_recommendation(rec, summary=None) -> str:
    """The recommendation as aligned text lines (with the dataset's summary: usable and skipped rows)."""
    from mactuner.recommend import GB

    free = f"{rec.free_memory / GB:.1f} GB free" if rec.free_memory else "free memory unknown"
    lines = [
        f"Model   {rec.model}: {rec.num_parameters / 1e6:.1f}M parameters, {rec.trainable_parameters / 1e6:.2f}M trained",
        f"Device  {rec.device} ({free})",
    ]
    if summary is not None and summary.problems:
        lines.append(f"Data    {summary.rows} of {summary.total_rows} rows usable "
                     f"({len(summary.problems)} skipped, listed above)")
    elif rec.dataset_rows is not None:
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
