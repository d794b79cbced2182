"""``python -m mactuner eval RUN [--facts FILE] [--collection NAME] [--rows validation|training] [--json]``
(or ``--adapter PATH`` for an adapter outside a run).

Without ``--facts``: compares the base model and the tuned one on the run's held-out
(validation) rows, or FILE with ``--dataset``: loss and perplexity over the answer tokens,
and up to N prompts answered by both beside the reference, with exact-match / keyword-hit
rates when the references are short; also the forgetting line ("kept N of M things the
base model knew"). Training rows only with ``--rows training`` (labelled so). Saved as
``RUN/eval.json`` when the adapter is inside a run.

With ``--facts FILE`` (question + expected answer per row; JSON, JSONL or CSV; optional key
phrases and paraphrases) or ``--facts held-out`` (the run's validation rows): the per-fact
report, four answers per question (base, tuned, and with ``--collection`` both again with
the collection's passages), each marked right or wrong by the stated rule, with totals per
column and the forgetting line. Saved as ``RUN/facts_report.json``.

Exit codes: 0 done, 1 failed (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "evaluate a fine-tune: held-out rows (loss, answers), a per-fact report (--facts), what it forgot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Run or adapter, rows or facts, model, device and output."""
    parser.add_argument("run", nargs="?", help="a run's id or folder (its adapter/ is evaluated)")
    parser.add_argument("--adapter", help="an adapter/ or checkpoints/step-N folder (or a full fine-tune's folder)")
    parser.add_argument("--dataset", help="rows to evaluate on (default: the run's held-out validation rows)")
    parser.add_argument("--rows", choices=("validation", "training"), default="validation",
                        help="the run's rows to use: validation (held out, default) or training (seen in training: "
                        "the result says so)")
    parser.add_argument("--facts", help="per-fact report: a file of question + expected answer (JSON, JSONL, CSV), "
                        "or 'held-out' for the run's validation rows")
    parser.add_argument("--collection", help="with --facts: a RAG collection; adds base + documents, tuned + documents")
    parser.add_argument("--no-similarity", action="store_true", help="with --facts: skip the embedding similarity")
    parser.add_argument("--model", help="base model (default: the one the adapter or run recorded)")
    parser.add_argument("--device", help="cpu, mps, cuda or cuda:N (default: remembered, else automatic)")
    parser.add_argument("--max-prompts", type=int, default=8, help="prompts both models answer (default 8)")
    parser.add_argument("--max-rows", type=int, default=200, help="most rows whose loss is measured (default 200)")
    parser.add_argument("--no-forgetting", action="store_true", help="skip the general-knowledge (forgetting) check")
    parser.add_argument("--no-save", action="store_true", help="do not write RUN/eval.json or RUN/facts_report.json")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def adapter_of(args: argparse.Namespace) -> Path:
    """The adapter to evaluate: ``--adapter``, else RUN's ``adapter/`` (RUN: an id under the runs folder or a path).

    Raises:
        ValueError: neither was given, or RUN has no finished adapter.
    """
    if args.adapter:
        return Path(args.adapter)
    if not args.run:
        raise ValueError("name a run (mactuner eval RUN) or an adapter (--adapter PATH)")
    from mactuner.runs import run_path

    run = run_path(args.run)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{args.run} is not a run (no {run / 'config.yaml'}); `mactuner train` lists where runs go")
    if not (run / "adapter").is_dir():
        raise ValueError(f"{run} has no adapter/ yet (unfinished run?): pass --adapter RUN/checkpoints/step-N")
    return run / "adapter"


def run(args: argparse.Namespace) -> int:
    """Evaluate, save and print."""
    from mactuner.data import DatasetError
    from mactuner.models import ModelSourceError
    from mactuner.rag import RagError

    device = args.device
    if device is None:
        from mactuner.settings import load_settings

        device = load_settings().default_device
    progress = None if args.json else (lambda message, _f: print(message, file=sys.stderr))
    try:
        adapter = adapter_of(args)
        if args.facts:
            return _facts(args, adapter, device, progress)
        from mactuner.evaluate import evaluate, save_eval

        result = evaluate(adapter, args.dataset, model=args.model, device=device, max_prompts=max(0, args.max_prompts),
                          max_rows=max(1, args.max_rows), rows=args.rows, forgetting=not args.no_forgetting,
                          progress=progress)
        saved = None if args.no_save else save_eval(result)
    except (ModelSourceError, OSError, RuntimeError, ValueError, RagError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.to_dict(), "saved": None if saved is None else str(saved)}, indent=2))
        return 0
    print(f"{result.rows} {result.rows_source} of {result.dataset} on {result.device}")
    for row in result.summary()["rows"]:
        print("  ".join(f"{k}: {v}" for k, v in row.items() if v is not None))
    if result.forgetting:
        print(result.forgetting["headline"])
    for row in result.answers:
        print(f"\nQ: {row.prompt}\n  reference: {row.reference}\n  base:      {row.base_answer}\n  tuned:     {row.tuned_answer}")
    if saved:
        print(f"\nSaved {saved}", file=sys.stderr)
    return 0


def _facts(args: argparse.Namespace, adapter: Path, device, progress) -> int:
    from mactuner.evaluate import evaluation_rows, run_folder_of
    from mactuner.evaluation.facts import fact_report, facts_from_examples, load_facts, save_report

    if args.facts == "held-out":
        examples, dataset, source, _ = evaluation_rows(adapter, args.dataset, args.rows)
        facts, where = facts_from_examples(examples), f"{source} of {dataset}"
    else:
        facts, where = load_facts(args.facts), str(args.facts)
    report = fact_report(adapter, facts, model=args.model, device=device, collection=args.collection,
                         similarity=not args.no_similarity, forgetting=not args.no_forgetting, source=where,
                         progress=progress)
    run_dir = run_folder_of(adapter)
    saved = save_report(report, run_dir) if run_dir and not args.no_save else None
    if args.json:
        data = report.to_dict()
        print(json.dumps({"columns": data["columns"], "totals": data["totals"], "rule": data["rule"],
                          "forgetting": data["forgetting_line"], "rows": data["rows"], "source": where,
                          "seconds": data["seconds"], "saved": None if saved is None else str(saved)}, indent=2))
        return 0
    print(f"{len(report.rows)} questions from {where} on {report.device}\n")
    for row in report.rows:
        print(f"Q: {row.question}{'  (paraphrase)' if row.paraphrase_of else ''}\n  expected: {row.expected}")
        for column in report.columns:
            a = row.answers[column]
            sim = "" if a.similarity is None else f" sim {a.similarity:.2f}"
            print(f"  {column:>18}: {'right' if a.right else 'wrong'}{sim}{' UNSUPPORTED' if a.unsupported else ''}  {a.text}")
    print()
    for column, total in report.totals.items():
        print(f"{column:>18}: {total['right']} of {total['asked']} right" +
              (f", {total['unsupported']} unsupported" if total["unsupported"] else ""))
    if report.forgetting_line():
        print(report.forgetting_line())
    print(f"\nRule: {report.rule}")
    if saved:
        print(f"Saved {saved}", file=sys.stderr)
    return 0
