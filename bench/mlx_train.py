"""The MLX engine's glue overhead: MacTuner's MLX trainer against mlx-lm's own LoRA loop, same work.

Both train the same tiny Llama (built from a config, a small byte-level vocabulary: mlx[cpu]
multiplies slowly) on the same rows (the test facts as ``messages`` JSONL, every token trained),
with the same LoRA (rank 8, scale 20, every linear layer of every block), batch size and steps.
mlx-lm's side is ``mlx_lm.lora.train_model`` (what ``python -m mlx_lm lora`` runs after loading),
with a callback reading its reports; MacTuner's side is
:class:`mactuner.training.mlx_engine.MLXTrainer` with a run folder (status, metrics, a checkpoint at
the end). Each side runs in its own process; the first report (compilation) is left out.
The figure is optimizer steps per second (both count tokens differently: mlx-lm the predicted
tokens, MacTuner every token of the rows), and the ratio MacTuner / mlx-lm (goal: >= 0.9).

    .venv/bin/python -m bench.mlx_train [--hidden 256] [--layers 4] [--steps 40] [--report 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
RANK, SCALE = 8, 20.0


def prepare(folder: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    from tests.mlx_support import build_small_vocab_model
    from tests.train_support import write_fact_dataset

    model = build_small_vocab_model(folder / "model", CHATML, hidden_size=hidden, layers=layers)
    data = folder / "data"
    data.mkdir()
    write_fact_dataset(data / "train.jsonl", repeat=4)
    write_fact_dataset(data / "valid.jsonl", repeat=1)
    return model, data


def run_mlx_lm(model: Path, data: Path, steps: int, report: int, batch: int, out: Path) -> list[dict]:
    import types

    import mlx.core as mx
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.tuner.trainer import TrainingCallback
    from mlx_lm.utils import load

    reports = []

    class Reports(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    args = dict(CONFIG_DEFAULTS)
    args.update(model=str(model), train=True, data=str(data), iters=steps, steps_per_report=report, batch_size=batch,
                num_layers=-1, steps_per_eval=10**9, val_batches=1, save_every=10**9, adapter_path=str(out),
                lora_parameters={"rank": RANK, "dropout": 0.0, "scale": SCALE}, learning_rate=1e-4, max_seq_length=512)
    args = types.SimpleNamespace(**args)
    mx.random.seed(0)
    loaded, tokenizer = load(str(model))
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    train_model(args, loaded, train_set, valid_set, Reports())
    return [{"step": r["iteration"], "steps_per_second": r["iterations_per_second"],
             "tokens_per_second": r["tokens_per_second"]} for r in reports]


def run_mactuner(model: Path, data: Path, steps: int, report: int, batch: int, out: Path) -> list[dict]:
    from mactuner.config import TrainConfig
    from mactuner.training.mlx_engine import MLXTrainer

    config = TrainConfig(
        model=str(model), dataset=str(data / "train.jsonl"), engine="mlx", device="cpu", batch_size=batch,
        max_steps=steps, log_every=report, eval_every=0, save_every=0, val_fraction=0.0, learning_rate=1e-4,
        lora_rank=RANK, lora_alpha=RANK * SCALE, target_modules="all-linear", assistant_only_loss=False,
        max_length=512, warmup_steps=0, lr_scheduler="constant",
    )
    MLXTrainer(config, out).run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    reports, previous = [], 0
    for r in train:
        seconds = (r["tokens"] - previous) / r["tokens_per_second"]
        reports.append({"step": r["step"], "steps_per_second": report / seconds, "tokens_per_second": r["tokens_per_second"]})
        previous = r["tokens"]
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--report", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating; the best counts")
    parser.add_argument("--side", choices=["mlx-lm", "mactuner"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        folder = Path(args.folder)
        run = run_mlx_lm if args.side == "mlx-lm" else run_mactuner
        reports = run(folder / "model", folder / "data", args.steps, args.report, args.batch, folder / args.side)
        print("REPORTS " + json.dumps(reports))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, args.hidden, args.layers)
        results: dict[str, tuple[float, float, float]] = {}
        # the sides alternate (A B A B …) and each keeps its best round: a shared machine's load hits both
        for _ in range(args.rounds):
            for side in ("mlx-lm", "mactuner"):
                started = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "bench.mlx_train", "--side", side, "--folder", str(folder), "--steps",
                     str(args.steps), "--report", str(args.report), "--batch", str(args.batch)],
                    capture_output=True, text=True, check=True)
                wall = time.perf_counter() - started
                shutil.rmtree(folder / side, ignore_errors=True)
                reports = json.loads(done.stdout.split("REPORTS ", 1)[1].splitlines()[0])
                steady = reports[1:] or reports  # the first report includes compiling the step
                result = (sum(r["steps_per_second"] for r in steady) / len(steady),
                          sum(r["tokens_per_second"] for r in steady) / len(steady), wall)
                if side not in results or result[0] > results[side][0]:
                    results[side] = result
    import mlx.core as mx

    print(f"MLX {mx.__version__} on {mx.default_device()} ({platform.machine()}, {platform.system()}); tiny Llama hidden "
          f"{args.hidden}, {args.layers} layers; {args.steps} steps of {args.batch} rows, reports every {args.report}")
    print(f"best of {args.rounds} alternating rounds per side")
    print(f"{'side':>10}  {'steps/s':>8}  {'tokens/s (own count)':>20}  {'wall s':>7}")
    for side, (sps, tps, wall) in results.items():
        print(f"{side:>10}  {sps:8.2f}  {tps:20.0f}  {wall:7.1f}")
    ratio = results["mactuner"][0] / results["mlx-lm"][0]
    print(f"MacTuner / mlx-lm steps per second: {ratio:.2f}  (goal >= 0.90)")


if __name__ == "__main__":
    main()
