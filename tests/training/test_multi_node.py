"""Beyond one machine, without GPUs: two torchrun "nodes" on loopback (c10d rendezvous, gloo), and a
bundle's round trip (bundle → launch.sh → import → chat). Tiny model, few steps."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mactuner.train import train
from tests.locations import ROOT
from tests.train_support import read_metrics, tiny_config, train_losses

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # one thread per process: two "machines" share this one's cores
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def _two_nodes(arguments: list[str], port: int, run_id: str) -> None:
    """Run ``mactuner ARGUMENTS`` as two torchrun nodes of one process each, meeting at 127.0.0.1:port."""
    torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    command = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, "-m", "mactuner", *arguments]
    nodes = [subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)


def test_two_nodes_on_loopback_train_as_one_process_and_resume_mid_way(tiny_model_dir, facts_file, tmp_path):
    # float32, constant rate: the run's length does not change the steps, so 2 + a resume to 4 = 4
    common = dict(dtype="float32", eval_every=2, save_every=2, lr_scheduler="constant", warmup_steps=0, val_fraction=0.2)
    one = train(tiny_config(tiny_model_dir, facts_file, batch_size=4, max_steps=4, **common), tmp_path / "one")

    # the same effective batch: 2 rows on each of 2 machines
    config = tiny_config(tiny_model_dir, facts_file, batch_size=2, max_steps=2, **common).save(tmp_path / "two.yaml")
    run = tmp_path / "two"
    _two_nodes(["train", str(config), "--run-dir", str(run), "--quiet"], _free_port(), "first")
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    # mid-way: the checkpoint of step 2 is where the second launch starts
    _two_nodes(["train", "--run-dir", str(run), "--resume", "--max-steps", "4", "--quiet"], _free_port(), "second")

    two = train_losses(run)
    assert sorted(two) == [1, 2, 3, 4]
    for step, loss in enumerate(one.losses, start=1):
        assert two[step] == pytest.approx(loss, abs=1e-5), (step, two[step], loss)
    evals = lambda folder: {r["step"]: r["val_loss"] for r in read_metrics(folder) if r["type"] == "eval"}
    assert evals(run) == pytest.approx(evals(tmp_path / "one"), abs=1e-5) and sorted(evals(run)) == [2, 4]
    assert any(r["message"] == "Resumed from step-00000002 (step 2)." for r in read_metrics(run) if r["type"] == "info")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 4
    # global rank 0 alone wrote the folder: one train record per step and launch
    assert [r["step"] for r in read_metrics(run) if r["type"] == "train"] == [1, 2, 3, 4]


def test_a_bundle_trains_elsewhere_and_comes_back_to_chat(tiny_model_dir, facts_file, tmp_path):
    from mactuner import runs
    from mactuner.chat import GenerationSettings, load_chat_model, stream_chat
    from mactuner.cli import main
    from mactuner.runs.bundle import BUNDLE_FILE, import_bundle, sha256_file

    # a run that stopped at a checkpoint (step 2 of 4) on this machine
    config = tiny_config(tiny_model_dir, facts_file, dtype="float32", max_steps=2, save_every=2, val_fraction=0.0,
                         lr_scheduler="constant", warmup_steps=0)
    here = runs.run_path("local-run")
    train(config, here)
    bundle = tmp_path / "bundle"
    assert main(["bundle", str(here), "--out", str(bundle), "--endpoint", f"127.0.0.1:{_free_port()}"]) == 0
    meta = json.loads((bundle / BUNDLE_FILE).read_text())
    assert meta["dataset"]["sha256"] == sha256_file(facts_file) == sha256_file(bundle / "data" / "facts.jsonl")
    assert meta["checkpoint"] == "step-00000002" and (bundle / "run" / "checkpoints" / "step-00000002").is_dir()
    assert meta["model_reference"] == str(tiny_model_dir) and not (bundle / "model").exists()
    assert (bundle / "code" / "mactuner" / "train.py").is_file()
    launch = (bundle / "launch.sh").read_text()
    assert "--nnodes \"$NNODES\" --nproc-per-node \"$GPUS\" --rdzv-backend c10d --rdzv-endpoint \"$ENDPOINT\"" in launch
    assert "num_nodes: 1" in (bundle / "skypilot.yaml").read_text()
    # writing over someone else's folder is refused
    assert main(["bundle", str(here), "--out", str(tmp_path)]) == 1

    # "another machine": launch.sh from its own folder, resuming from the bundled checkpoint to step 4
    env = _env() | {"TORCHRUN": shutil.which("torchrun", path=str(BIN)) or "torchrun", "PYTHONPATH": ""}
    done = subprocess.run(["bash", str(bundle / "launch.sh"), "--max-steps", "4", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    remote = json.loads((bundle / "run" / "status.json").read_text())
    assert remote["state"] == "finished" and remote["step"] == 4

    # back here: in the Runs list, finished, and its adapter answers in chat
    folder = import_bundle(bundle)
    imported = {r.path: r for r in runs.list_runs()}[folder]
    assert imported.state == "finished" and imported.step == 4
    assert [r["step"] for r in read_metrics(folder) if r["type"] == "train"] == [1, 2, 3, 4]
    loaded = load_chat_model(None, folder / "adapter", device="cpu")
    assert Path(loaded.path) == tiny_model_dir  # the base by its reference on this machine
    stream = stream_chat(loaded, [{"role": "user", "content": "What colour is the Zorbel lighthouse?"}],
                         GenerationSettings(temperature=0, max_new_tokens=8))
    assert "".join(stream) == stream.text and stream.stats.new_tokens > 0


def test_a_bundle_with_the_model_carries_its_files_and_names_the_machines(tiny_model_dir, facts_file, tmp_path):
    import yaml

    from mactuner.runs.bundle import BundleError, write_bundle

    config = tiny_config(tiny_model_dir, facts_file).save(tmp_path / "c.yaml")
    info = write_bundle(config, tmp_path / "b", with_model=True, nnodes=3, gpus=2, endpoint="10.0.0.5:29600")
    assert info.with_model and info.checkpoint is None
    bundled = yaml.safe_load((info.path / "config.yaml").read_text())
    assert bundled["model"] == "model" and bundled["dataset"] == "data/facts.jsonl" and bundled["gpus"] == 2
    assert (info.path / "model" / "config.json").is_file() and (info.path / "model" / "model.safetensors").is_file()
    launch = (info.path / "launch.sh").read_text()
    assert "NNODES=${NNODES:-3}" in launch and "GPUS=${GPUS:-2}" in launch and "ENDPOINT=${ENDPOINT:-10.0.0.5:29600}" in launch
    assert subprocess.run(["bash", "-n", str(info.path / "launch.sh")]).returncode == 0
    sky = yaml.safe_load((info.path / "skypilot.yaml").read_text())
    assert sky["num_nodes"] == 3 and "launch.sh" in sky["run"] and sky["workdir"] == "."
    with pytest.raises(BundleError, match="HOST:PORT"):
        write_bundle(config, tmp_path / "b2", endpoint="no-port")
    with pytest.raises(BundleError, match="neither a run"):
        write_bundle(tmp_path / "nothing-here", tmp_path / "b3")
