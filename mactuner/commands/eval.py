"""``python -m mactuner eval --adapter RUN/adapter [--dataset FILE] [--json] [--max-prompts N]``.

Compares the base model and the tuned one on the run's validation rows (or FILE):
loss and perplexity over the answer tokens, and up to N prompts answered by both
beside the reference, with exact-match / keyword-hit rates when the references are
short. The result is saved as ``RUN/eval.json`` when the adapter is inside a run.

Exit codes: 0 done, 1 failed (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "evaluate a fine-tune: base vs tuned loss, perplexity and answers on validation rows or a file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adapter, rows, model, device and output."""
    parser.add_argument("--adapter", required=True, help="a run's adapter/ or checkpoints/step-N (or a full fine-tune's folder)")
    parser.add_argument("--dataset", help="rows to evaluate on (default: the run's validation rows)")
    parser.add_argument("--model", help="base model (default: the one the adapter or run recorded)")
    parser.add_argument("--device", help="cpu, mps, cuda or cuda:N (default: remembered, else automatic)")
    parser.add_argument("--max-prompts", type=int, default=8, help="prompts both models answer (default 8)")
    parser.add_argument("--max-rows", type=int, default=200, help="most rows whose loss is measured (default 200)")
    parser.add_argument("--no-save", action="store_true", help="do not write RUN/eval.json")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Evaluate, save and print."""
    from mactuner.data import DatasetError
    from mactuner.evaluate import evaluate, save_eval
    from mactuner.models import ModelSourceError

    device = args.device
    if device is None:
        from mactuner.settings import load_settings

        device = load_settings().default_device
    quiet = args.json
    try:
        result = evaluate(args.adapter, args.dataset, model=args.model, device=device, max_prompts=max(0, args.max_prompts),
                          max_rows=max(1, args.max_rows),
                          progress=None if quiet else (lambda message, _f: print(message, file=sys.stderr)))
        saved = None if args.no_save else save_eval(result)
    except (ModelSourceError, DatasetError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.to_dict(), "saved": None if saved is None else str(saved)}, indent=2))
        return 0
    print(f"{result.rows} {result.rows_source} of {result.dataset} on {result.device}")
    for row in result.summary()["rows"]:
        print("  ".join(f"{k}: {v}" for k, v in row.items() if v is not None))
    for row in result.answers:
        print(f"\nQ: {row.prompt}\n  reference: {row.reference}\n  base:      {row.base_answer}\n  tuned:     {row.tuned_answer}")
    if saved:
        print(f"\nSaved {saved}", file=sys.stderr)
    return 0
