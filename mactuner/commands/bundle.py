"""``python -m mactuner bundle RUN_OR_CONFIG --out DIR [--with-model] [--nnodes N] [--gpus G] [--endpoint HOST:PORT]``.

Writes a self-contained hand-off of a run (or a config) for other machines: the config,
the dataset (copied, with its SHA-256), the base model's reference (its files with
``--with-model``), the latest checkpoint if the run has one, this MacTuner's code, a
``launch.sh`` that runs ``torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d
--rdzv-endpoint HOST:PORT -m mactuner train …`` on each machine, and a SkyPilot task
(see :mod:`mactuner.runs.bundle`). ``python -m mactuner import DIR`` brings the trained run back.
Exit codes: 0 written, 1 failed (the message says why).
"""

from __future__ import annotations

import argparse
import sys

HELP = "write a self-contained hand-off of a run for torchrun on other machines (launch.sh, SkyPilot task)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The run or config, the output folder and the machines."""
    parser.add_argument("source", metavar="RUN_OR_CONFIG", help="a run id or folder, or a YAML config")
    parser.add_argument("--out", required=True, help="the bundle folder to write")
    parser.add_argument("--with-model", action="store_true", help="copy the base model's files (default: its reference)")
    parser.add_argument("--nnodes", type=int, default=1, help="machines launch.sh expects (default 1)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (processes) per machine (default: the config's gpus)")
    parser.add_argument("--endpoint", default=None, help="HOST:PORT of the first machine (default localhost:29500)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if it holds files MacTuner did not create")


def run(args: argparse.Namespace) -> int:
    """Write the bundle and say how to launch it."""
    from mactuner.fileio import OutputNotOurs
    from mactuner.runs.bundle import BundleError, describe, write_bundle

    try:
        info = write_bundle(args.source, args.out, with_model=args.with_model, nnodes=args.nnodes, gpus=args.gpus,
                            endpoint=args.endpoint, overwrite=args.overwrite)
    except (BundleError, OutputNotOurs, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(describe(info))
    return 0
