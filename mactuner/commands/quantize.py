"""``python -m mactuner quantize [--model M | --adapter DIR] [--method NAME …] [--device D] [--json]``.

Makes the quantized variants of a model (or of an adapter merged into its base)
under ``MACTUNER_HOME/exports`` and measures each one against the unquantized
reference: size on disk, memory after load, tokens/s, perplexity on held-out
text (default: 8,000 characters of ``mactuner/demo/held_out.txt``; ``--text-file``
for your own). A method the device cannot run is listed with the reason.
``--list`` shows the methods and whether this device supports them. An existing
``--out`` folder holding files MacTuner did not create is refused (nothing is
deleted) unless ``--overwrite`` is given.

Exit codes: 0 done (even if some method was refused), 1 failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "quantize a base or merged model and compare the variants (size, memory, speed, perplexity)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model or adapter, methods, device, text and output."""
    parser.add_argument("--model", help="base model: a hub id, a local folder or a .gguf file (default: the built-in model)")
    parser.add_argument("--adapter", help="adapter to merge first; the merged model is then quantized")
    parser.add_argument(
        "--method", action="append", dest="methods",
        help="int8-dynamic, int8-weight-only, int4-weight-only, bnb-8bit, bnb-4bit (repeatable; default: all the device supports)",
    )
    parser.add_argument("--device", help="cpu, mps, cuda or cuda:N (default: remembered, else automatic)")
    parser.add_argument("--text-file", help="held-out text for perplexity (default: 8,000 characters of mactuner/demo/held_out.txt)")
    parser.add_argument("--out", help="output folder for the variants (default: MACTUNER_HOME/exports/MODEL-variants)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds files MacTuner did not create")
    parser.add_argument("--list", action="store_true", help="list the methods and exit")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _device(args) -> str | None:
    if args.device:
        return args.device
    from mactuner.settings import load_settings

    return load_settings().default_device


def run(args: argparse.Namespace) -> int:
    """Quantize, measure and print the table (or JSON)."""
    from mactuner.devices import resolve_device
    from mactuner.models import ModelSourceError
    from mactuner.quantize import METHODS, unsupported_reason
    from mactuner.quantize.compare import compare_variants

    try:
        device = resolve_device(_device(args))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.list:
        rows = [{"method": m.name, "description": m.description, "refused": unsupported_reason(m.name, device)} for m in METHODS.values()]
        if args.json:
            print(json.dumps({"device": str(device), "methods": rows}, indent=2))
        else:
            for row in rows:
                print(f"{row['method']:18} {'ok' if not row['refused'] else 'refused: ' + row['refused']}")
        return 0
    unknown = [m for m in args.methods or [] if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        text = Path(args.text_file).read_text(encoding="utf-8", errors="replace") if args.text_file else None
        report = compare_variants(
            args.model, args.methods, adapter=args.adapter, device=device, text=text, out_dir=args.out, overwrite=args.overwrite,
            progress=None if args.json else (lambda message, _fraction: print(message, file=sys.stderr)),
        )
    except (ModelSourceError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"device {report.device}; perplexity on {report.text_tokens} tokens of {report.text_source}")
    header = ["variant", "size (MB)", "memory (MB)", "tokens/s", "perplexity", "answer"]
    rows = [[str(row[h]) if row[h] is not None else "-" for h in header] for row in report.table()]
    widths = [max(len(h), *(len(r[i][:60]) for r in rows)) for i, h in enumerate(header)]
    for line in [header, *rows]:
        print("  ".join(cell[:60].ljust(w) for cell, w in zip(line, widths)))
    return 0
