"""``python -m mactuner export (--adapter DIR | --merged DIR | --model M) --format gguf --outtype T [--out FILE.gguf]``.

Writes one GGUF file for llama.cpp, Ollama and LM Studio, converted by llama.cpp's own
converter, and an Ollama Modelfile beside it (``NAME.Modelfile``). Progress goes to
stderr; the file's path (or ``--json``: what was written) to stdout. An existing file
that MacTuner did not write is refused unless ``--overwrite``.

Every export writes ``NAME.receipt.json`` beside the file (``--no-receipt`` skips it): the same
prompts greedily through the torch model and through llama.cpp on the file, perplexity of both,
sizes, versions (:mod:`mactuner.export_receipt`). An export whose file diverges beyond the
receipt's stated threshold exits 1 (the file stays, marked failed in its receipt).

Exit codes: 0 done, 1 failed (the message says why), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "export a fine-tuned (or base) model as a GGUF file for llama.cpp / Ollama / LM Studio, with a Modelfile"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """What to export, the format and type, and where."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--adapter", help="a run's adapter/ or checkpoints/step-N folder (merged into its base first)")
    what.add_argument("--merged", help="a plain transformers model folder (a merge or a full fine-tune)")
    parser.add_argument("--model", help="base model (default: the one recorded in the adapter; alone: exported as it is)")
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="output format (gguf)")
    parser.add_argument("--outtype", default="f16", choices=["f16", "bf16", "q8_0"],
                        help="weights: f16 (default) / bf16, or q8_0 (8-bit blocks, about half the size; check its "
                             "answers: llama.cpp's 8-bit path garbles the built-in 135M model's)")
    parser.add_argument("--out", help="the .gguf file (default: MACTUNER_HOME/exports/gguf/RUN-STEP-TYPE.gguf)")
    parser.add_argument("--system", help="SYSTEM prompt for the Modelfile (default: the run's own, if it used one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file MacTuner did not write")
    parser.add_argument("--no-receipt", action="store_true",
                        help="skip the receipt (NAME.receipt.json: the file in llama.cpp against the torch model)")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")


def run(args: argparse.Namespace) -> int:
    """Export and print the file's path."""
    from mactuner.export import ExportError, export_gguf
    from mactuner.models import ModelSourceError

    def progress(message: str, fraction: float | None) -> None:
        print(f"[{'   ' if fraction is None else f'{100 * fraction:3.0f}'}%] {message}", file=sys.stderr)

    try:
        result = export_gguf(args.adapter, merged=args.merged, model=args.model, outtype=args.outtype, out=args.out,
                             overwrite=args.overwrite, system_prompt=args.system, receipt=not args.no_receipt,
                             progress=progress)
    except (ExportError, ModelSourceError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.path)
        print(f"Ollama: ollama create my-model -f {result.modelfile}", file=sys.stderr)
    if result.receipt:
        receipt = result.receipt
        print(f"Receipt: {receipt['verdict']}" + (f", first tokens identical {receipt['prompts_identical']} prompts, "
              f"perplexity torch {receipt['perplexity']['torch']} / llama.cpp {receipt['perplexity']['llama_cpp']}"
              if "perplexity" in receipt else "") + "".join(f"\n  {p}" for p in receipt.get("problems", [])),
              file=sys.stderr)
    if result.failed:
        print("error: the exported file does not answer as the torch model does (see its .receipt.json)", file=sys.stderr)
        return 1
    return 0
