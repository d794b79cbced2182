"""``python -m mactuner train CONFIG.yaml [--run-dir RUN] [--resume] [--max-steps N …]``
or, without a YAML file, ``python -m mactuner train --dataset FILE [--model M] [--device D] --recommended``.

Trains in the foreground, writing the run folder (see docs/architecture.md). Every
``TrainConfig`` field can be overridden on the command line
(``--learning-rate 1e-4``, ``--no-packing``, ``--device cpu``). Without a config
file the run starts from ``TrainConfig``'s defaults, or with ``--recommended``
from :func:`mactuner.recommend.recommend_hyperparameters`' settings for the
model, dataset and device; the overrides apply on top either way. The same entry point
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
from pathlib import Path

HELP = "fine-tune a model from a YAML config, or from --dataset with --recommended settings (LoRA, QLoRA or full)"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file, the run folder, --resume, and one override per TrainConfig field."""
    from mactuner.config import TrainConfig

    parser.add_argument(
        "config", nargs="?",
        help="YAML config (optional with --resume: the run's own config.yaml; optional with --dataset FILE)",
    )
    parser.add_argument("--run-dir", help="run folder (default: a new folder under MACTUNER_HOME/runs)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last complete checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stdout")
    parser.add_argument(
        "--recommended", action="store_true",
        help="start from the recommended settings for --model, --dataset and --device (see `recommend`) "
        "instead of a config file; other options still override them",
    )
    overrides = parser.add_argument_group("overrides (any config field)")
    for f in dataclasses.fields(TrainConfig):
        # argparse formats help with %: a literal one ("30% slower") must be doubled
        help_text = (f.metadata.get("help") or "").replace("%", "%%")
        if f.type == "bool":
            overrides.add_argument(_option(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name in ("target_modules", "report_to"):
            overrides.add_argument(_option(f.name), dest=f.name, default=None, help=help_text + " (comma-separated)")
        else:
            overrides.add_argument(_option(f.name), dest=f.name, default=None, metavar="VALUE", help=help_text)


def _convert(name: str, type_name: str, text: str):
    if text.lower() in ("none", "null") and "None" in type_name:
        return None
    if name == "target_modules":
        return text if text == "all-linear" else [m.strip() for m in text.split(",") if m.strip()]
    if name == "report_to":  # one tracker, or several comma-separated
        listed = [m.strip() for m in text.split(",") if m.strip()]
        return listed[0] if len(listed) == 1 else listed
    if type_name.startswith("int"):
        return int(text)
    if type_name.startswith("float"):
        return float(text)
    return text


def recommended_values(model: str | None, dataset: str, device: str | None) -> dict:
    """TrainConfig values: the defaults, then the recommended settings for this model, dataset and device."""
    from mactuner.config import TrainConfig
    from mactuner.models import DEFAULT_MODEL
    from mactuner.recommend import recommend_hyperparameters

    recommendation = recommend_hyperparameters(model, dataset, device)
    for warning in recommendation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return {**TrainConfig().to_dict(), **recommendation.train_config_values(),
            "model": model or DEFAULT_MODEL, "dataset": str(dataset), "device": recommendation.device}


def build_config(args: argparse.Namespace):
    """The TrainConfig from the YAML file (or the run's config.yaml, or the recommended
    settings with ``--recommended``, or the defaults with ``--dataset``) with the overrides applied."""
    from mactuner.config import TrainConfig

    source = args.config
    recommended = getattr(args, "recommended", False)
    if recommended and (source is not None or args.resume):
        raise ValueError("--recommended builds a new config: leave out the config file and --resume")
    if source is None and args.resume and args.run_dir:
        source = Path(args.run_dir) / "config.yaml"
    if source is not None:
        values = TrainConfig.load(source).to_dict()
    elif args.dataset:
        values = recommended_values(args.model, args.dataset, args.device) if recommended else TrainConfig().to_dict()
    else:
        raise ValueError(
            "give a config file, or --dataset FILE (with --recommended for the recommended settings), "
            "or --run-dir RUN --resume to continue a run"
        )
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is None:
            continue
        try:
            values[f.name] = given if isinstance(given, bool) else _convert(f.name, f.type, given)
        except ValueError:
            raise ValueError(f"{_option(f.name)}: cannot read {given!r} as {f.type}") from None
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    """Train; the exit code says how it ended."""
    from mactuner.data import DatasetError
    from mactuner.models import ModelSourceError

    try:
        config = build_config(args)
    except (OSError, ValueError, DatasetError, ModelSourceError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from mactuner.train import TrainingError
    from mactuner.training.engines import make_trainer

    if args.run_dir:
        from mactuner.run_folder import NotARunFolder, check_run_folder

        run_dir = Path(args.run_dir)
        try:
            check_run_folder(run_dir)
        except NotARunFolder as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    elif args.resume:
        print("error: --resume needs --run-dir", file=sys.stderr)
        return 2
    else:
        from mactuner.runs import new_run_folder

        run_dir = new_run_folder(f"{Path(config.model.rstrip('/')).name.removesuffix('.gguf')}-{config.method}")
        # every torchrun process must agree on the folder: only a single process invents one
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print("error: under torchrun give --run-dir so all processes share one folder", file=sys.stderr)
            return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Run folder: {run_dir}", flush=True)
    try:
        result = make_trainer(config, run_dir, resume=args.resume, verbose=not args.quiet).run()
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
