"""The correctness checks of ``bench/gpu_check.sh``, run first, each one bounded and self-judging.

    python -m bench.gpu_correctness torchrun --model FOLDER --data FILE --out DIR [--device cuda] [--gpus N]
    python -m bench.gpu_correctness gguf     --gguf FILE    --data FILE --out DIR [--device cuda]
    python -m bench.gpu_correctness float16  --model FOLDER --data FILE --out DIR [--device cuda]

- ``torchrun``: the trainer under ``torchrun --standalone`` (NCCL on CUDA, gloo on a CPU) with a
  validation split, evaluation and checkpoints, stopped at step 4 and resumed to step 6: it must
  finish at step 6 with validation losses and resume from the step-4 checkpoint.
- ``gguf``: QLoRA from a ``.gguf`` file copied to a path of its own (so it is converted from GGUF
  here, not mapped to the built-in model's converted folder): 3 steps, a finished run, an adapter.
- ``float16``: a float16 run (loss scaling on a GPU) whose step 2 is forced non-finite: step 2 is
  skipped, the weights stay as after step 1, the run goes on and finishes with finite losses.

Each prints ``PASS name: …`` or ``FAIL name: …`` and writes ``OUT/correctness-NAME.json``;
the exit code is 0 only on PASS. On a CPU (``--device cpu``) the same checks run with gloo and
the CPU's own QLoRA (int8 base): the ``--dry-run`` of gpu_check.sh, and the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config(model: str, data: str, device: str, **changes):
    from mactuner.config import TrainConfig

    values = dict(model=model, dataset=data, device=device, max_length=128, batch_size=2, grad_accum=1,
                  learning_rate=1e-3, lora_rank=8, target_modules=["q_proj", "v_proj"], max_steps=4,
                  warmup_steps=0, lr_scheduler="constant", val_fraction=0.2, eval_every=2, save_every=2,
                  compile="off", seed=1)
    values.update(changes)
    return TrainConfig(**values)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check_torchrun(args) -> tuple[bool, str, dict]:
    """torchrun with eval and checkpoints, then a resume; judged from the run folder."""
    from mactuner.checkpoints import list_checkpoints
    from mactuner.training.multi_gpu import torchrun_command

    run_dir = Path(args.out) / "torchrun-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config_file = _config(args.model, args.data, args.device).save(Path(args.out) / "torchrun.yaml")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = torchrun_command(args.gpus, ["train", str(config_file), "--run-dir", str(run_dir), "--quiet"])
    done = subprocess.run(first, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        return False, f"first run exited {done.returncode}: {(done.stderr or done.stdout)[-800:]}", {}
    resume = torchrun_command(args.gpus, ["train", "--run-dir", str(run_dir), "--resume", "--max-steps", "6", "--quiet"])
    again = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if again.returncode != 0:
        return False, f"resume exited {again.returncode}: {(again.stderr or again.stdout)[-800:]}", {}
    status = json.loads((run_dir / "status.json").read_text())
    records = _records(run_dir)
    evals = [r for r in records if r["type"] == "eval"]
    resumed = [r["message"] for r in records if r["type"] == "info" and r["message"].startswith("Resumed from")]
    steps = [c.step for c in list_checkpoints(run_dir)]
    facts = {"state": status["state"], "step": status["step"], "evals": [(r["step"], r["val_loss"]) for r in evals],
             "resumed": resumed, "checkpoints": steps, "processes": args.gpus}
    ok = (status["state"] == "finished" and status["step"] == 6 and len(evals) >= 3
          and all(math.isfinite(v) for _, v in facts["evals"]) and resumed == ["Resumed from step-00000004 (step 4)."]
          and (run_dir / "adapter" / "adapter_model.safetensors").exists())
    return ok, f"{args.gpus} process(es), finished at step {status['step']}, {len(evals)} evaluations, {resumed}", facts


def check_gguf(args) -> tuple[bool, str, dict]:
    """QLoRA from a copied .gguf file: converted from GGUF here, trained 3 steps."""
    from mactuner.train import train

    source = Path(args.gguf)
    copy = Path(args.out) / "copied-model" / source.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    if not copy.exists():
        shutil.copy(source, copy)
    run_dir = Path(args.out) / "gguf-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = train(_config(str(copy), args.data, args.device, method="qlora", max_steps=3, val_fraction=0.0,
                           eval_every=0, save_every=0), run_dir)
    facts = {"state": result.state, "losses": result.losses, "gguf": str(copy),
             "memory_bytes": result.peak_memory_bytes, "memory_kind": result.memory_kind}
    ok = (result.state == "finished" and len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
          and result.adapter_path is not None and (result.adapter_path / "adapter_config.json").exists())
    return ok, f"QLoRA from {copy.name}: {result.state}, losses {[round(x, 4) for x in result.losses]}", facts


def check_float16(args) -> tuple[bool, str, dict]:
    """float16 with step 2 forced non-finite: skipped, weights kept, the run finishes."""
    import torch

    from mactuner.train import Trainer, TrainingCallback

    trainer = Trainer(_config(args.model, args.data, args.device, dtype="float16", max_steps=4, val_fraction=0.0,
                              eval_every=0, save_every=0))
    trainer.setup()
    if trainer._scaler is None:
        # a CPU (the dry run, the tests): the GPU's loss scaling, on CPU tensors, so its path runs too
        trainer._scaler = torch.amp.GradScaler("cpu")
    original = trainer._loss_sum
    trainer._loss_sum = lambda batch: original(batch) * (float("nan") if trainer.step + 1 == 2 else 1.0)
    snapshots = {}

    class Snap(TrainingCallback):
        def on_train_report(self, info):
            snapshots[info["step"]] = [p.detach().float().clone() for p in trainer.trainable]

    trainer.callbacks.append(Snap())
    result = trainer.run()
    losses = result.losses
    kept = all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    moved = not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    facts = {"state": result.state, "losses": [x if math.isfinite(x) else str(x) for x in losses],
             "scaler": trainer._scaler is not None, "dtype": str(trainer.compute_dtype)}
    ok = (result.state == "finished" and math.isnan(losses[1]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 1)
          and kept and moved)
    return ok, (f"float16 ({'with' if facts['scaler'] else 'without'} loss scaling): step 2 skipped={kept}, "
                f"later steps train={moved}, {result.state}"), facts


CHECKS = {"torchrun": check_torchrun, "gguf": check_gguf, "float16": check_float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=CHECKS)
    parser.add_argument("--model", help="a model folder (torchrun, float16)")
    parser.add_argument("--gguf", help="a .gguf file (gguf)")
    parser.add_argument("--data", required=True, help="a dataset file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", type=int, default=1, help="torchrun processes")
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        ok, text, facts = CHECKS[args.check](args)
    except Exception as error:  # noqa: BLE001 - a check that crashes is a failed check, said in one line
        ok, text, facts = False, f"{type(error).__name__}: {error}", {}
    (Path(args.out) / f"correctness-{args.check}.json").write_text(
        json.dumps({"check": args.check, "passed": ok, "summary": text, "facts": facts, "device": args.device}, indent=2))
    print(f"{'PASS' if ok else 'FAIL'} {args.check}: {text}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
