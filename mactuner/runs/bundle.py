"""Beyond one machine: a run handed to torchrun elsewhere, and brought back.

:func:`write_bundle` (``python -m mactuner bundle RUN_OR_CONFIG --out DIR``) writes a
self-contained folder that trains on other machines (a GPU workstation, rented cloud
nodes) with PyTorch's own launcher:

```
DIR/config.yaml        the run's TrainConfig; dataset: data/<file>; model: the base model's reference
                       (a hub id, the built-in model, a path) or model/ with --with-model
DIR/data/<file>        the dataset, copied; its SHA-256 in bundle.json (launch.sh checks it)
DIR/model/             the base model's files (only with --with-model)
DIR/run/               the run folder to train into; with the latest checkpoint when the run had one
                       (launch.sh then resumes from it)
DIR/code/              this MacTuner's source (mactuner/, requirements.txt): every machine runs the same code
DIR/launch.sh          on each machine: torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d
                       --rdzv-endpoint HOST:PORT -m mactuner train config.yaml --run-dir run [--resume]
DIR/skypilot.yaml      the same as a SkyPilot task (https://docs.skypilot.co), for cloud machines
DIR/bundle.json        what the bundle holds: sources, hashes, nodes, GPUs, MacTuner and torch versions
```

Only global rank 0 writes ``run/`` (status, metrics, checkpoints, adapter), on its own
machine: that machine's ``DIR`` is the one to bring back. A resume needs the latest
checkpoint on every machine (a shared folder, or copy ``run/checkpoints`` to each first).

:func:`import_bundle` (``python -m mactuner import DIR``) copies the trained ``run/`` into
this machine's runs (``MACTUNER_HOME/runs``) with its dataset, and points its config and
adapter back at the base model's original reference when it exists here, so the run
appears in the Runs list and is chatted with, evaluated and exported like a local one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mactuner import fileio, paths

BUNDLE_FILE = "bundle.json"
DEFAULT_PORT = 29500
# a run folder's files that belong to the machine that ran it, not to the hand-off
_LOCAL_ONLY = {".trainer.lock", "process.json", "log.txt"}


class BundleError(ValueError):
    """A bundle cannot be written or imported; the message says why and what to do."""


@dataclass
class BundleInfo:
    """What :func:`write_bundle` wrote."""

    path: Path
    config: Path
    dataset_sha256: str
    checkpoint: str | None
    with_model: bool


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source(run_or_config: str | os.PathLike) -> tuple[Any, Path | None]:
    """``(TrainConfig, run folder or None)`` from a run id/folder or a YAML config."""
    from mactuner.config import TrainConfig
    from mactuner.runs.store import run_path

    given = Path(run_or_config)
    if given.is_file():
        return TrainConfig.load(given), None
    folder = run_path(run_or_config)
    if (folder / "config.yaml").is_file():
        return TrainConfig.load(folder / "config.yaml"), folder
    raise BundleError(f"{run_or_config} is neither a run (a folder with config.yaml, or a run id) nor a config file.")


def _model_files(source: str) -> Path:
    """The local folder of ``source`` (converted from GGUF, or the built-in model's), for --with-model."""
    from mactuner.models import ModelSourceError, model_path

    try:
        _resolved, path = model_path(source)
    except ModelSourceError as error:
        raise BundleError(str(error)) from error
    if not Path(path).is_dir():
        raise BundleError(f"--with-model copies a local model; {source} is a hub id: leave --with-model out, "
                          "the other machines download it by that id.")
    return Path(path)


def _copy_code(target: Path) -> None:
    """This MacTuner's source (the package and requirements.txt), without caches."""
    from mactuner.training.multi_gpu import package_root

    root = package_root()
    shutil.copytree(root / "mactuner", target / "mactuner", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("requirements.txt", "pyproject.toml"):
        if (root / name).is_file():
            shutil.copy(root / name, target / name)


def _launch_script(nnodes: int, gpus: int, endpoint: str, run_id: str, resume: bool, sha: str, data_name: str) -> str:
    resume_flag = " --resume" if resume else ""
    return f"""#!/usr/bin/env bash
# Train this bundle with PyTorch's torchrun, on each of the NNODES machines (the same command everywhere):
#   NNODES={nnodes} GPUS={gpus} ENDPOINT={endpoint} bash launch.sh
# ENDPOINT is HOST:PORT of the first machine (reachable from the others); torchrun's c10d rendezvous
# gathers the machines there, so no node rank is needed. MODEL=... overrides the base model reference
# (e.g. a local path on these machines). PYTHON or TORCHRUN pick the interpreter / launcher.
# Global rank 0 writes run/ on its own machine: bring that machine's folder back (mactuner import DIR).
set -euo pipefail
cd "$(dirname "$0")"
NNODES=${{NNODES:-{nnodes}}}
GPUS=${{GPUS:-{gpus}}}
ENDPOINT=${{ENDPOINT:-{endpoint}}}
RUN_ID=${{RUN_ID:-{run_id}}}
PYTHON=${{PYTHON:-python3}}
TORCHRUN=${{TORCHRUN:-torchrun}}
# the same data on every machine: its SHA-256 as bundled
echo "{sha}  data/{data_name}" | sha256sum -c --quiet - || {{ echo "data/{data_name} differs from the bundled file"; exit 2; }}
# the bundled MacTuner, so that every machine runs the same code
export PYTHONPATH="$PWD/code${{PYTHONPATH:+:$PYTHONPATH}}"
export PYTORCH_CUDA_ALLOC_CONF=${{PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}}
EXTRA=()
[ -n "${{MODEL:-}}" ] && EXTRA+=(--model "$MODEL")
RESUME="{resume_flag.strip()}"
# a checkpoint written meanwhile (a stopped run): continue from it
ls run/checkpoints/step-* >/dev/null 2>&1 && RESUME=--resume
exec $TORCHRUN --nnodes "$NNODES" --nproc-per-node "$GPUS" --rdzv-backend c10d --rdzv-endpoint "$ENDPOINT" \\
    --rdzv-id "$RUN_ID" -m mactuner train config.yaml --run-dir run --gpus "$GPUS" $RESUME "${{EXTRA[@]}}" "$@"
"""


def _skypilot_task(nnodes: int, gpus: int, run_id: str, port: int) -> str:
    return f"""# A SkyPilot task for this bundle (https://docs.skypilot.co): SkyPilot rents the machines, copies this
# folder to each (workdir) and runs launch.sh on every node; torchrun does the rest.
#   pip install skypilot && sky launch -c {run_id} skypilot.yaml
#   (then, from the first node: rsync its run/ back and `python -m mactuner import DIR`)
# Not required by MacTuner: launch.sh works the same on machines you reach yourself.
name: {run_id}
num_nodes: {nnodes}
resources:
  accelerators: {{L4:{gpus}, A10G:{gpus}, A100:{gpus}, H100:{gpus}}}  # any of these; edit to taste
workdir: .
setup: |
  pip install -r code/requirements.txt
run: |
  FIRST=$(echo "$SKYPILOT_NODE_IPS" | head -n1)
  NNODES=$SKYPILOT_NUM_NODES GPUS=$SKYPILOT_NUM_GPUS_PER_NODE ENDPOINT=$FIRST:{port} bash launch.sh
"""


def write_bundle(
    run_or_config: str | os.PathLike,
    out: str | os.PathLike,
    *,
    with_model: bool = False,
    nnodes: int = 1,
    gpus: int | None = None,
    endpoint: str | None = None,
    overwrite: bool = False,
) -> BundleInfo:
    """Write a bundle of a run or a config into ``out`` (see the module docstring).

    Args:
        run_or_config: a run id or folder (its latest checkpoint travels too), or a YAML config.
        with_model: copy the base model's files (else only its reference).
        nnodes, gpus: machines and GPUs per machine launch.sh starts (gpus: the config's by default).
        endpoint: ``HOST:PORT`` of the first machine (default ``localhost:29500``: one machine).
        overwrite: replace ``out`` even if it holds files MacTuner did not create.

    Raises:
        BundleError: the source or its dataset cannot be found, or a bad argument.
        fileio.OutputNotOurs: ``out`` holds someone else's files.
    """
    from mactuner.checkpoints import latest_checkpoint

    config, run_dir = _source(run_or_config)
    if nnodes < 1 or (gpus is not None and gpus < 1):
        raise BundleError(f"nnodes and gpus must be at least 1, got {nnodes} and {gpus}")
    gpus = gpus or config.gpus
    endpoint = endpoint or f"localhost:{DEFAULT_PORT}"
    if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d+", endpoint):
        raise BundleError(f"endpoint must be HOST:PORT, got {endpoint!r}")
    dataset = Path(config.dataset)
    if run_dir is not None and not dataset.is_absolute():
        dataset = (run_dir / dataset) if (run_dir / dataset).is_file() else dataset
    if not dataset.is_file():
        raise BundleError(f"The dataset {config.dataset} is not here: a bundle carries a copy of it.")
    checkpoint = latest_checkpoint(run_dir) if run_dir is not None else None
    model_folder = _model_files(config.model) if with_model else None
    sha = sha256_file(dataset)
    run_id = re.sub(r"[^A-Za-z0-9-]+", "-", (run_dir.name if run_dir else Path(str(out)).name))[:40].strip("-") or "mactuner"
    port = int(endpoint.rsplit(":", 1)[1])

    def write(staging: Path) -> None:
        (staging / "data").mkdir()
        shutil.copy(dataset, staging / "data" / dataset.name)
        if model_folder is not None:
            shutil.copytree(model_folder, staging / "model", ignore=shutil.ignore_patterns(".*"))
        bundled = config.to_dict() | {"dataset": f"data/{dataset.name}", "gpus": gpus,
                                      "model": "model" if model_folder is not None else config.model}
        type(config).from_dict(bundled).save(staging / "config.yaml")
        (staging / "run").mkdir()
        if run_dir is not None and checkpoint is not None:
            # the run as far as it went: its settings, fingerprint, metrics and the latest checkpoint
            for name in ("config.yaml", "fingerprint.json", "metrics.jsonl", "status.json", "name.json"):
                if (run_dir / name).is_file():
                    shutil.copy(run_dir / name, staging / "run" / name)
            shutil.copytree(checkpoint.path, staging / "run" / "checkpoints" / checkpoint.path.name)
            # the bundle's own dataset and model paths (a resume checks the data's content, not its path)
            type(config).from_dict(bundled).save(staging / "run" / "config.yaml")
            prints_file = staging / "run" / "fingerprint.json"
            if prints_file.is_file():
                prints = json.loads(prints_file.read_text())
                prints.setdefault("config", {})["model"] = bundled["model"]
                fileio.write_json_atomic(prints_file, prints)
        _copy_code(staging / "code")
        launch = staging / "launch.sh"
        launch.write_text(_launch_script(nnodes, gpus, endpoint, run_id, checkpoint is not None, sha, dataset.name))
        launch.chmod(0o755)
        (staging / "skypilot.yaml").write_text(_skypilot_task(nnodes, gpus, run_id, port))
        fileio.write_json_atomic(staging / BUNDLE_FILE, {
            "version": 1,
            "created_at": time.time(),
            "source": str(run_dir or Path(run_or_config).resolve()),
            "run_id": run_id,
            "model_reference": config.model,
            "with_model": model_folder is not None,
            "dataset": {"file": f"data/{dataset.name}", "sha256": sha, "size": dataset.stat().st_size,
                        "source": str(dataset.resolve())},
            "checkpoint": checkpoint.path.name if checkpoint is not None else None,
            "nnodes": nnodes,
            "gpus_per_node": gpus,
            "endpoint": endpoint,
            "versions": _versions(),
        })

    path = fileio.write_output_folder(out, write, overwrite=overwrite, what="a MacTuner bundle")
    return BundleInfo(path, path / "config.yaml", sha, checkpoint.path.name if checkpoint else None, model_folder is not None)


def _versions() -> dict[str, str | None]:
    import importlib.metadata as metadata

    found = {}
    for name in ("torch", "transformers", "peft"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def launch_command(bundle: str | os.PathLike) -> list[str]:
    """The command that runs a bundle's launch.sh (bash, from anywhere)."""
    return ["bash", str(Path(bundle) / "launch.sh")]


def import_bundle(bundle: str | os.PathLike, *, name: str | None = None) -> Path:
    """Bring a trained bundle's run into this machine's runs; returns the new run folder.

    The run keeps its metrics, checkpoints and adapter; its dataset is copied beside it;
    its config and adapter name the base model by the original reference when that exists
    here (else the bundled model/ folder, copied too).

    Raises:
        BundleError: not a bundle, nothing trained in it, or a run still training there.
    """
    from mactuner.config import TrainConfig

    bundle = Path(bundle)
    meta_file = bundle / BUNDLE_FILE
    if not meta_file.is_file():
        raise BundleError(f"{bundle} is not a MacTuner bundle (no {BUNDLE_FILE}); write one with `mactuner bundle`.")
    meta = json.loads(meta_file.read_text())
    source_run = bundle / "run"
    status_file = source_run / "status.json"
    if not status_file.is_file():
        raise BundleError(f"{bundle} holds no trained run yet (run/status.json is missing): run launch.sh first.")
    status = json.loads(status_file.read_text())
    if status.get("state") == "running":
        raise BundleError(f"The run in {bundle} says it is still training (step {status.get('step')}); "
                          "import it once it has finished or stopped.")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name or f"imported-{meta.get('run_id', bundle.name)}").strip("-")[:60]
    target = paths.runs_dir() / f"{stamp}-{slug}"
    n = 1
    while target.exists():
        n += 1
        target = paths.runs_dir() / f"{stamp}-{slug}-{n}"

    def keep(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _LOCAL_ONLY or n.startswith(".")} if Path(folder) == source_run else set()

    staging = paths.runs_dir() / f".importing-{target.name}"
    shutil.copytree(source_run, staging, ignore=keep)
    try:
        data = bundle / meta["dataset"]["file"]
        (staging / "data").mkdir(exist_ok=True)
        shutil.copy(data, staging / "data" / data.name)
        reference = meta.get("model_reference")
        model = reference if reference and _available_here(reference) else None
        if model is None and (bundle / "model").is_dir():
            shutil.copytree(bundle / "model", staging / "model")
            model = str(target / "model")
        config = TrainConfig.load(staging / "config.yaml" if (staging / "config.yaml").is_file() else bundle / "config.yaml")
        values = config.to_dict() | {"dataset": str(target / "data" / data.name)}
        if model is not None:
            values["model"] = model
        TrainConfig.from_dict(values).save(staging / "config.yaml")
        if model is not None:
            for adapter_config in staging.glob("**/adapter_config.json"):
                recorded = json.loads(adapter_config.read_text())
                recorded["base_model_name_or_path"] = model
                fileio.write_json_atomic(adapter_config, recorded)
        fileio.write_json_atomic(staging / "imported.json", {"from": str(bundle.resolve()), "at": time.time(),
                                                             "bundle": meta})
        # the remote trainer's process means nothing here: the state stays, its pid goes
        status.pop("pid", None)
        status.pop("launch_id", None)
        fileio.write_json_atomic(staging / "status.json", status)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _available_here(reference: str) -> bool:
    """Whether a model reference can be loaded here: the built-in model, an existing path, or a hub id."""
    from mactuner.models import DEFAULT_MODEL

    if reference == DEFAULT_MODEL or Path(reference).expanduser().exists():
        return True
    # "org/name": a hub id (offline it must be in the cache; loading says so if it is not)
    return not reference.startswith(("/", ".", "~")) and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", reference))


def describe(info: BundleInfo) -> str:
    """What a person is told after writing a bundle."""
    return (f"Bundle written: {info.path}\n"
            f"  dataset sha256 {info.dataset_sha256[:16]}…, "
            + (f"resumes from {info.checkpoint}, " if info.checkpoint else "a new run, ")
            + ("model files included" if info.with_model else "base model by reference") + "\n"
            f"  on each machine: {shlex.join(['bash', 'launch.sh'])}  (NNODES, GPUS, ENDPOINT to change)\n"
            f"  back here: python -m mactuner import {info.path}")
