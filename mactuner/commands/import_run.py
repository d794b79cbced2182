"""``python -m mactuner import BUNDLE_DIR [--name NAME]``.

Brings a run trained from a bundle (``python -m mactuner bundle``, then ``launch.sh`` on
other machines) back into this machine's runs: it then shows in the Runs list, and is
chatted with, evaluated and exported like a run trained here. Prints the run folder.
Exit codes: 0 imported, 1 failed (the message says why).
"""

from __future__ import annotations

import argparse
import sys

HELP = "bring a run trained from a bundle back into the Runs list"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bundle folder and an optional name."""
    parser.add_argument("bundle", metavar="BUNDLE_DIR", help="a bundle folder whose launch.sh has run")
    parser.add_argument("--name", default=None, help="a label for the run id (default: imported-<bundle's run>)")


def run(args: argparse.Namespace) -> int:
    """Import and print the run folder."""
    from mactuner.runs.bundle import BundleError, import_bundle

    try:
        folder = import_bundle(args.bundle, name=args.name)
    except (BundleError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0
