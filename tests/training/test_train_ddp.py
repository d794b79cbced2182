"""Data-parallel training under torchrun (gloo on CPU) matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mactuner.train import train
from tests.locations import ROOT
from tests.train_support import tiny_config, train_losses, write_fact_dataset


def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    facts = write_fact_dataset(tmp_path / "facts.jsonl")
    # float32 so that the only difference left is the order of additions
    common = dict(dtype="float32", max_steps=4, eval_every=2, save_every=2, lr_scheduler="cosine", warmup_steps=1)
    one = train(tiny_config(tiny_model_dir, facts, batch_size=4, **common), tmp_path / "one")

    config_file = tiny_config(tiny_model_dir, facts, batch_size=2, **common).save(tmp_path / "two.yaml")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mactuner", "train", str(config_file), "--run-dir", str(tmp_path / "two"), "--quiet"],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    two = train_losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step, loss in enumerate(one.losses, start=1):
        assert two[step] == pytest.approx(loss, abs=1e-4), (step, two[step], loss)
    evals = lambda run: [r["val_loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    assert evals("two") == pytest.approx(evals("one"), abs=1e-4)
    # one process wrote the folder: one status, finished
    assert json.loads((tmp_path / "two" / "status.json").read_text())["state"] == "finished"

    from safetensors.torch import load_file

    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert all((a[k] - b[k]).abs().max() < 1e-4 for k in a)
