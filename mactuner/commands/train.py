"""``python -m mactuner train CONFIG.yaml [--run-dir RUN] [--resume] [--max-steps N …]``.

Trains in the foreground, writing the run folder (see ARCHITECTURE.md). Every
``TrainConfig`` field can be overridden on the command line
(``--learning-rate 1e-4``, ``--no-packing``, ``--device cpu``). The same entry point
runs under ``torchrun --nproc_per_node N -m mactuner train …`` (one process per
device; gloo on CPU, NCCL on CUDA).

Exit codes: 0 finished or cancelled (SIGTERM saves a checkpoint first), 1 the
training failed (the message says why), 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

HELP = "fine-tune a model from a YAML config (LoRA, QLoRA or full)"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file, the run folder, --resume, and one override per TrainConfig field."""
    from mactuner.config import TrainConfig

    parser.add_argument("config", nargs="?", help="YAML config (optional with --resume: the run's own config.yaml)")
    parser.add_argument("--run-dir", help="run folder (default: a new folder under MACTUNER_HOME/runs)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last complete checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stdout")
    overrides = parser.add_argument_group("overrides (any config field)")
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help")
        if f.type == "bool":
            overrides.add_argument(_option(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "target_modules":
            overrides.add_argument(_option(f.name), dest=f.name, default=None, help=help_text + " (comma-separated)")
        else:
            overrides.add_argument(_option(f.name), dest=f.name, default=None, metavar="VALUE", help=help_text)


def _convert(name: str, type_name: str, text: str):
    if text.lower() in ("none", "null") and "None" in type_name:
        return None
    if name == "target_modules":
        return text if text == "all-linear" else [m.strip() for m in text.split(",") if m.strip()]
    if type_name.startswith("int"):
        return int(text)
    if type_name.startswith("float"):
        return float(text)
    return text


def build_config(args: argparse.Namespace):
    """The TrainConfig from the YAML file (or the run's config.yaml) with the overrides applied."""
    from mactuner.config import TrainConfig

    source = args.config
    if source is None and args.resume and args.run_dir:
        source = Path(args.run_dir) / "config.yaml"
    if source is None:
        raise ValueError("give a config file (or --run-dir RUN --resume to continue a run)")
    values = TrainConfig.load(source).to_dict()
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is None:
            continue
        try:
            values[f.name] = given if isinstance(given, bool) else _convert(f.name, f.type, given)
        except ValueError:
            raise ValueError(f"{_option(f.name)}: cannot read {given!r} as {f.type}") from None
    return TrainConfig.from_dict(values)


def _new_run_dir(config) -> Path:
    from mactuner import paths

    name = Path(config.model.rstrip("/")).name.replace(".gguf", "")
    base = paths.runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{config.method}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run(args: argparse.Namespace) -> int:
    """Train; the exit code says how it ended."""
    try:
        config = build_config(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from mactuner.train import Trainer, TrainingError

    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.resume:
        print("error: --resume needs --run-dir", file=sys.stderr)
        return 2
    else:
        run_dir = _new_run_dir(config)
        # every torchrun process must agree on the folder: only a single process invents one
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print("error: under torchrun give --run-dir so all processes share one folder", file=sys.stderr)
            return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Run folder: {run_dir}", flush=True)
    try:
        result = Trainer(config, run_dir, resume=args.resume, verbose=not args.quiet).run()
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - recorded in status.json by the trainer; say it plainly here
        print(f"error: training failed: {type(error).__name__}: {error}", file=sys.stderr)
        import traceback

        traceback.print_exc()
        return 1
    if result.adapter_path is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"Adapter: {result.adapter_path}", flush=True)
    return 0
