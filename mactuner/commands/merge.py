"""``python -m mactuner merge --adapter DIR [--out DIR] [--model BASE] [--overwrite]``.

Merges a LoRA adapter into its base model and saves a standard transformers
folder (safetensors) that plain ``AutoModelForCausalLM.from_pretrained`` loads.
Prints the folder. An existing ``--out`` folder holding files MacTuner did not
create is refused (nothing is deleted) unless ``--overwrite`` is given.
Exit codes: 0 done, 1 failed (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "merge a LoRA adapter into its base model and save a plain transformers folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adapter, output folder and (optional) base model."""
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (a run's adapter/ or checkpoints/step-N)")
    parser.add_argument("--out", help="output folder (default: under MACTUNER_HOME/exports)")
    parser.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files MacTuner did not create (they are deleted)")
    parser.add_argument("--json", action="store_true", help='print {"path": …} as JSON')


def run(args: argparse.Namespace) -> int:
    """Merge and save."""
    from mactuner.export.merge import merge_adapter
    from mactuner.models import ModelSourceError

    quiet = args.json
    try:
        folder = merge_adapter(
            args.adapter, args.out, base=args.model, overwrite=args.overwrite,
            progress=None if quiet else (lambda message, _fraction: print(message, file=sys.stderr)),
        )
    except (ModelSourceError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"path": str(folder)}) if args.json else folder)
    return 0
