"""``python -m mactuner train CONFIG.yaml [--run-dir RUN] [--resume] [--max-steps N …]``
or, without a YAML file, ``python -m mactuner train --dataset FILE [--model M] [--device D] --recommended``.

Trains in the foreground, writing the run folder (see docs/architecture.md). Every
``TrainConfig`` field can be overridden on the command line
(``--learning-rate 1e-4``, ``--no-packing``, ``--device cpu``). Without a config
file the run starts from ``TrainConfig``'s defaults, or with ``--recommended``
from :func:`mactuner.recommend.recommend_hyperparameters`' settings for the
model, dataset and device; the overrides apply on top either way. The same entry point
runs under ``torchrun --nproc_per_node N -m mactuner train …`` (one process per
device; gloo on CPU, NCCL on CUDA); with ``--gpus N`` (or ``gpus: N`` in the config)
it starts that torchrun itself: ``torchrun --standalone --nproc-per-node N``.

With ``--preflight [--json]`` it does not train: it runs a few real optimizer steps on the
longest rows in a child process and prints the measured peak memory against the free
memory, seconds per step and the run's ETA, and settings that would fit when it does not
(:mod:`mactuner.training.preflight`).

Exit codes: 0 finished or cancelled (SIGTERM saves a checkpoint first), 1 the
training failed (the message says why), 2 bad arguments or config, 3 (``--preflight``)
it does not fit in the free memory.
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
        "--preflight", action="store_true",
        help="do not train: run a few real steps on the longest rows in a child process and report the measured "
        "peak memory against the free memory, seconds per step, the run's ETA and, when it does not fit, what would",
    )
    parser.add_argument("--json", action="store_true", help="with --preflight: print the result as JSON")
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


def recommended_values(model: str | None, dataset: str, device: str | None, gpus: int = 1) -> dict:
    """TrainConfig values: the defaults, then the recommended settings for this model, dataset, device and GPUs."""
    from mactuner.config import TrainConfig
    from mactuner.models import DEFAULT_MODEL
    from mactuner.recommend import recommend_hyperparameters

    recommendation = recommend_hyperparameters(model, dataset, device, gpus=gpus)
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
        gpus = int(args.gpus) if getattr(args, "gpus", None) else 1
        values = recommended_values(args.model, args.dataset, args.device, gpus) if recommended else TrainConfig().to_dict()
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
    if getattr(args, "preflight", False):
        return _preflight(config, args.json)
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
    from mactuner.training.distributed import launched_by_torchrun

    if config.gpus > 1 and not launched_by_torchrun():
        return _launch_processes(config, args, run_dir)
    # against fragmentation by batches of varying length (unless the person configured the allocator)
    from mactuner.devices.cuda_support import ALLOC_CONF, ALLOC_CONF_ENV

    os.environ.setdefault(ALLOC_CONF_ENV, ALLOC_CONF)
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


def _launch_processes(config, args: argparse.Namespace, run_dir: Path) -> int:
    """``gpus: N``: run this same command under ``torchrun --standalone --nproc-per-node N``."""
    import subprocess

    from mactuner.devices import resolve_device
    from mactuner.devices.cuda_support import trainer_environment
    from mactuner.training.multi_gpu import gpus_problem, package_root, torchrun_command

    try:
        device = config.device or resolve_device(None).type
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    problem = gpus_problem(config.gpus, device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    arguments = list(getattr(args, "_argv", None) or sys.argv[1:])
    if not args.run_dir:
        # every process must write to the same folder: name it once, here
        arguments += ["--run-dir", str(run_dir)]
    if not config.device:
        arguments += ["--device", device]
    env = trainer_environment()
    # the processes import this same mactuner, wherever they are started from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root()), env.get("PYTHONPATH")) if p)
    command = torchrun_command(config.gpus, arguments)
    print(f"Starting {config.gpus} training processes: {' '.join(command)}", flush=True)
    return subprocess.call(command, env=env)


def _preflight(config, as_json: bool) -> int:
    """``--preflight``: measure a few real steps (mactuner.training.preflight) and print what follows."""
    import json

    from mactuner.training.preflight import preflight

    try:
        result = preflight(config)
    except (RuntimeError, OSError, subprocess_error()) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.headline())
        if result.suggestion:
            print("Settings that fit: " + ", ".join(f"{k}={v}" for k, v in result.suggestion.items() if k != "reason"))
    return 0 if result.fits is not False else 3


def subprocess_error():
    import subprocess

    return subprocess.TimeoutExpired
