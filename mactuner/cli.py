"""The command line: ``python -m mactuner COMMAND …``.

Each command lives in its own module under :mod:`mactuner.commands` and is
imported only when used, so ``devices list`` does not pay for importing
transformers. A command module defines ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code) and a one-line ``HELP``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under mactuner.commands
COMMANDS = {
    "devices": "devices",
    "train": "train",
    "recommend": "recommend",
    "chat": "chat",
    "rag": "rag",
    "merge": "merge",
    "quantize": "quantize",
}


def _load(name: str):
    return importlib.import_module(f"mactuner.commands.{COMMANDS[name]}")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m mactuner",
        description="MacTuner: fine-tune small language models on the device you pick.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
            sub.add_parser(name, add_help=False)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    return int(args._run(args) or 0)
