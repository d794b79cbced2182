"""DPO throughput and peak memory: MacTuner's trainer vs TRL's ``DPOTrainer``, ratio printed in one run.

Same model (SmolLM2-135M-Instruct by default), same pairs (LLaMA-Factory's ``dpo_en_demo.json``, the
30-row subset in tests/data), same device and threads, same LoRA (r=8, alpha 16, q/k/v/o), same
pairs per micro-batch, same max length, beta 0.1, sigmoid loss, the reference = the base with the
adapter disabled on both sides. TRL is configured as a competent user would: the weights loaded in
the device's best dtype (bfloat16 where the CPU computes it natively, ``mactuner.devices.get_optimal_dtype``)
with ``bf16=True`` then, ``peft_config`` (so TRL's reference is the adapter-free base, no copy), and
``padding_free=False`` (padding-free needs a flash-attention kernel, absent on a CPU).

Each side runs in its own process, so the peak resident memory (``ru_maxrss``, model loading included)
is its own; ``--rounds`` alternates the sides (load on a shared machine hits both alike) and the table
shows medians. tokens/s counts real tokens (chosen + rejected sequences, prompt included, no padding)
over the steps after ``--warmup``.

    .venv/bin/python -m bench.dpo_throughput [--steps 8] [--warmup 2] [--batch 2] [--max-length 256] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "third_party" / "llama-factory" / "dpo_en_demo.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rate(times: list[float], tokens: list[int], warmup: int) -> float:
    return sum(tokens[warmup:]) / max(1e-9, sum(times[warmup:]))


def worker_mactuner(args) -> dict:
    from mactuner.config import TrainConfig
    from mactuner.train import Trainer, TrainingCallback

    times, tokens = [], []

    class Steps(TrainingCallback):
        def on_train_report(self, info):
            tokens.append(info["tokens"] - sum(tokens))
            times.append(tokens[-1] / info["tokens_per_second"] if info["tokens_per_second"] else 0.0)

    config = TrainConfig(model=args.model, dataset=str(DATA), objective="dpo", beta=0.1, device=args.device,
                         batch_size=args.batch, max_length=args.max_length, max_steps=args.steps, val_fraction=0.0,
                         learning_rate=5e-5, warmup_steps=0, lr_scheduler="constant", target_modules=TARGETS,
                         eval_every=0, save_every=0, log_every=1, compile="off")
    trainer = Trainer(config, callbacks=[Steps()])
    trainer.run()
    return {"tokens_per_second": _rate(times, tokens, args.warmup), "peak_rss": _peak_rss(),
            "dtype": str(trainer.compute_dtype).replace("torch.", "")}


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mactuner.data.preference import load_preference_file
    from mactuner.devices import get_optimal_dtype
    from mactuner.models import model_path

    path = model_path(args.model)[1]
    dtype = get_optimal_dtype(torch.device(args.device))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}
            for e in load_preference_file(DATA, "dpo").examples]
    times, tokens = [], []

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.started)

    args_trl = DPOConfig(
        output_dir=str(Path(args.scratch) / "trl"), per_device_train_batch_size=args.batch, max_length=args.max_length,
        max_steps=args.steps, learning_rate=5e-5, beta=0.1, loss_type=["sigmoid"], bf16=dtype == torch.bfloat16,
        use_cpu=args.device == "cpu", report_to="none", logging_steps=1, save_strategy="no", lr_scheduler_type="constant",
        padding_free=False, dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args_trl, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"),
                         callbacks=[Steps()])
    original = trainer.compute_loss

    def counting(model, inputs, *a, **k):
        if model.training:
            tokens.append(int(inputs["attention_mask"].sum()))
        return original(model, inputs, *a, **k)

    trainer.compute_loss = counting
    trainer.train()
    return {"tokens_per_second": _rate(times, tokens, args.warmup), "peak_rss": _peak_rss(),
            "dtype": str(dtype).replace("torch.", "")}


def _run_side(side: str, args) -> dict:
    command = [sys.executable, "-m", "bench.dpo_throughput", "--worker", side, "--model", args.model,
               "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--max-length", str(args.max_length), "--scratch", args.scratch]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scratch", default="/tmp/mactuner-bench-dpo")
    parser.add_argument("--worker", choices=["mactuner", "trl"])
    args = parser.parse_args()
    if args.worker:
        result = worker_mactuner(args) if args.worker == "mactuner" else worker_trl(args)
        print(json.dumps(result))
        return
    results: dict[str, list[dict]] = {"trl": [], "mactuner": []}
    for _ in range(args.rounds):
        for side in ("trl", "mactuner"):
            results[side].append(_run_side(side, args))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_second", "peak_rss")}
           for side, rs in results.items()}
    print(f"DPO, {args.model} LoRA r=8 q/k/v/o, {args.batch} pairs x {args.max_length} tokens max, {args.steps} steps "
          f"({args.warmup} warm-up), {args.device}, {args.rounds} round(s), medians")
    print(f"{'side':<10} {'dtype':<9} {'tokens/s':>9} {'peak RSS (GiB)':>15} {'speed vs TRL':>13} {'memory vs TRL':>14}")
    for side, label in (("trl", "TRL"), ("mactuner", "MacTuner")):
        m = med[side]
        print(f"{label:<10} {results[side][0]['dtype']:<9} {m['tokens_per_second']:>9.1f} {m['peak_rss'] / 2**30:>15.2f} "
              f"{m['tokens_per_second'] / med['trl']['tokens_per_second']:>12.2f}x "
              f"{m['peak_rss'] / med['trl']['peak_rss']:>13.2f}x")


if __name__ == "__main__":
    main()
