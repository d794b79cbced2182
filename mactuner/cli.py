"""The command line: ``python -m mactuner COMMAND …``.

Each command lives in its own module under :mod:`mactuner.commands` and is
imported only when used, so ``devices list`` does not pay for importing
transformers. A command module defines ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code) and a one-line ``HELP``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator

# command name -> module under mactuner.commands (each command's own HELP is shown once it is loaded;
# these one-liners keep `--help` fast, without importing every command)
COMMANDS = {
    "devices": "list, select and read the compute devices (list|select|current|auto-select|memory|clear-cache|health)",
    "train": "fine-tune a model from a YAML config (LoRA, QLoRA or full)",
    "recommend": "recommended training settings and a memory estimate for a model, dataset and device",
    "chat": "chat with a model, optionally with a fine-tuned adapter",
    "rag": "index documents into a collection and ask questions over them",
    "merge": "merge an adapter into its base model and save a plain transformers folder",
    "quantize": "quantize a model and compare size, memory, speed and perplexity",
    "export": "export a model as a GGUF file for llama.cpp / Ollama / LM Studio, with an Ollama Modelfile",
    "eval": "evaluate a fine-tune: base vs tuned loss, perplexity and answers side by side",
}


def _load(name: str):
    return importlib.import_module(f"mactuner.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the process exit code."""
    from mactuner import quiet_third_party_loggers

    quiet_third_party_loggers()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m mactuner",
        description="MacTuner: fine-tune small language models on the device you pick.",
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    # only the command actually asked for is imported; the others get a stub
    # parser so that --help still lists them
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name in COMMANDS:
        if name == wanted:
            module = _load(name)
            command_parser = sub.add_parser(name, help=getattr(module, "HELP", None))
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
        else:
            sub.add_parser(name, add_help=False, help=COMMANDS[name])
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    if args.command == "train":  # the trainer saves a checkpoint on SIGTERM itself
        return int(args._run(args) or 0)
    with _exit_on_sigterm():
        return int(args._run(args) or 0)


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """While a command runs, SIGTERM ends it as an exception, so every ``finally`` runs: temporary
    files and the converter's child process are cleaned up instead of left in the person's folder."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        print("error: stopped (SIGTERM); removing its temporary files.", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main_exit() -> None:
    """Entry point of the ``mactuner`` console script (exits with :func:`main`'s code)."""
    sys.exit(main())
