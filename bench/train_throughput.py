"""Training throughput: MacTuner's trainer vs a plain transformers ``Trainer`` + peft.

Same model (SmolLM2-135M-Instruct by default), same data (the first 400 rows of
LLaMA-Factory's ``alpaca_en_demo.json``, tokenized the same way, max length 512),
same device, same LoRA (r=8, alpha 16, q/k/v/o), micro-batch 4.

- **baseline**: what a script does with default settings: ``from_pretrained``
  (the checkpoint's float32), ``get_peft_model``, ``Trainer`` with
  ``DataCollatorForSeq2Seq`` (pads each random batch to its longest row).
- **mactuner**: ``mactuner.train.Trainer`` with its defaults (device dtype,
  float32 adapter, length grouping, logits only where trained).

Each measurement runs in its own process so peak memory (``ru_maxrss``: peak
resident set of the process, model loading included) is separable. Rounds
alternate (peak, baseline, mactuner, …) so load from other processes on a shared
machine hits every side alike; the table shows medians.

tokens/s counts real tokens only (no padding), over the steps after a warm-up.
Model FLOPs utilisation: MFU = 6 · N · tokens/s / peak, with N = the weights a
token's forward pass multiplies through (every weight; the tied embedding
counted once, as the LM head's matmul, since the lookup costs nothing), 6 =
2 (forward) + 4 (backward) FLOPs per weight, attention's own FLOPs left out; peak
= a 2048×2048 bfloat16 matmul measured in the same run with the same threads.
6N is the usual convention, but LoRA's frozen weights take no weight gradient,
so the table also shows the FLOPs each trainer actually executes (4 per weight
per position it runs, padding included; MacTuner runs the LM head only at
trained tokens), which is the honest measure of how busy the matmul units are.

    .venv/bin/python bench/train_throughput.py [--steps 20] [--warmup 2] [--rounds 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALPACA = ROOT / "tests" / "data" / "third_party" / "llama-factory" / "alpaca_en_demo.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _peak_device(device: str) -> int | None:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return None


def _model_path(model: str) -> str:
    from mactuner.models import DEFAULT_MODEL, default_model_path

    return str(default_model_path()) if model == DEFAULT_MODEL else model


def _forward_weights(model) -> int:
    """N: weights multiplied per token (a tied embedding is counted once, as the LM head)."""
    return sum(p.numel() for p in model.parameters())


def _head_weights(model) -> int:
    """Weights of the LM head's matmul (vocabulary x hidden)."""
    return model.get_output_embeddings().weight.numel()


def _data_file(rows: int, source: str | None = None) -> Path:
    data = json.loads(Path(source or ALPACA).read_text())[:rows]
    path = Path(tempfile.gettempdir()) / f"mactuner-bench-alpaca-{rows}.json"
    path.write_text(json.dumps(data))
    return path


# --- workers (each in its own process) ---------------------------------------


def worker_peak(args) -> dict:
    import torch

    result = {}
    on_gpu = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for dtype in (torch.bfloat16, torch.float32):
        n = 8192 if on_gpu else 2048
        a, b = torch.randn(n, n, dtype=dtype, device=args.device), torch.randn(n, n, dtype=dtype, device=args.device)
        for _ in range(2):
            a @ b
        sync()
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(3):
                a @ b
            sync()
            best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t))
        result[str(dtype).removeprefix("torch.")] = best
    return result


def worker_baseline(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from mactuner.data import load_dataset_file, tokenize_examples

    path = _model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)  # default: the checkpoint's dtype
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    rows = tokenize_examples(load_dataset_file(_data_file(args.rows, args.data)).examples, tokenizer, args.max_length)

    dataset = rows  # a list is a map-style dataset: no `datasets` needed
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True)
    real_tokens: list[int] = []
    padded_tokens: list[int] = []

    def collate(features):
        batch = pad(features)
        real_tokens.append(int(batch["attention_mask"].sum()))
        padded_tokens.append(int(batch["input_ids"].numel()))
        return batch

    marks: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=4,
                max_steps=args.warmup + args.steps,
                save_strategy="no",
                report_to=[],
                logging_steps=10**6,
                use_cpu=args.device == "cpu",
                dataloader_num_workers=0,
                disable_tqdm=True,
                remove_unused_columns=False,
            ),
            train_dataset=dataset,
            data_collator=collate,
            callbacks=[StepTimes()],
        )
        trainer.train()
    measured = real_tokens[args.warmup : args.warmup + args.steps]
    padded = sum(padded_tokens[args.warmup : args.warmup + args.steps])
    seconds = marks[-1] - marks[args.warmup - 1] if args.warmup else marks[-1] - marks[0]
    head = _head_weights(model)
    return {
        "tokens_per_second": sum(measured) / seconds,
        # frozen weights need no weight gradient: forward 2 + input gradient 2 FLOPs per weight,
        # on every position the model runs, padding included; the LM head too
        "executed_flops_per_second": 4 * _forward_weights(model) * padded / seconds,
        "padding": 1 - sum(measured) / padded,
        "head_weights": head,
        "peak_rss": _peak_rss(),
        "peak_device": _peak_device(args.device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "n_forward": _forward_weights(model),
        "threads": torch.get_num_threads(),
    }


def worker_mactuner(args) -> dict:
    import torch

    from mactuner.config import TrainConfig
    from mactuner.train import Trainer, TrainingCallback

    marks: list[tuple[float, int]] = []

    class StepTimes(TrainingCallback):
        def on_train_report(self, info):
            marks.append((time.perf_counter(), info["tokens"]))

    config = TrainConfig(
        model=args.model,
        method=args.method,
        dataset=str(_data_file(args.rows, args.data)),
        device=args.device,
        max_length=args.max_length,
        batch_size=4,
        lora_rank=8,
        lora_alpha=16,
        target_modules=TARGETS,
        max_steps=args.warmup + args.steps,
        val_fraction=0.0,
        eval_every=0,
        save_every=0,
    )
    trainer = Trainer(config, callbacks=[StepTimes()])
    trainer.run()
    start = marks[args.warmup - 1] if args.warmup else (marks[0][0], 0)
    end = marks[-1]
    seconds = end[0] - start[0]
    # what ran in the measured steps: padded positions through the body, trained positions through the head
    padded = trained = 0
    for step in range(args.warmup, args.warmup + args.steps):
        epoch, index = divmod(step, trainer.steps_per_epoch)
        units = [trainer.train_units[i] for i in trainer._plan(epoch)[index]]
        for k in range(0, len(units), trainer.micro_batch_size):
            chunk = units[k : k + trainer.micro_batch_size]
            padded += len(chunk) * max(len(u.input_ids) for u in chunk)
            trained += sum(u.trained_tokens for u in chunk)
    n, head = _forward_weights(trainer.model), _head_weights(trainer.model)
    return {
        "tokens_per_second": (end[1] - start[1]) / seconds,
        "executed_flops_per_second": (4 * (n - head) * padded + 4 * head * trained) / seconds,
        "padding": 1 - (end[1] - start[1]) / padded,
        "head_weights": head,
        "peak_rss": _peak_rss(),
        "peak_device": _peak_device(args.device),
        "dtype": str(trainer.compute_dtype).removeprefix("torch.") + ("/nf4" if args.method == "qlora" else ""),
        "n_forward": _forward_weights(trainer.model),
        "threads": torch.get_num_threads(),
    }


WORKERS = {"peak": worker_peak, "baseline": worker_baseline, "mactuner": worker_mactuner}


# --- the orchestrator --------------------------------------------------------


def run_worker(kind: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", kind] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker" and v is not None
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="lora", choices=["lora", "qlora"], help="MacTuner side's method")
    parser.add_argument("--data", default=None, help=f"alpaca-format JSON (default {ALPACA})")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and not measured")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians are shown)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every side (default: torch's)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
            # MacTuner adapts its threads to other processes' load unless told a number
            os.environ["MACTUNER_CPU_THREADS"] = str(args.threads)
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    results: dict[str, list[dict]] = {k: [] for k in WORKERS}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for kind in WORKERS:
            results[kind].append(run_worker(kind, args))
            print(f"round {r + 1}: {kind} done ({results[kind][-1]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]

    med = lambda kind, key: statistics.median(x[key] for x in results[kind])  # noqa: E731
    peak_bf16 = med("peak", "bfloat16")
    peak_fp32 = med("peak", "float32")
    rows = []
    for kind in ("baseline", "mactuner"):
        tps = med(kind, "tokens_per_second")
        n = results[kind][0]["n_forward"]
        rows.append((kind, results[kind][0]["dtype"], results[kind][0]["threads"], tps, med(kind, "peak_rss"), 6 * n * tps,
                     med(kind, "executed_flops_per_second"), med(kind, "padding")))
    base, ours = rows
    print(f"\nmodel {args.model}, {args.rows} alpaca rows, max length {args.max_length}, micro-batch 4, LoRA r=8 q/k/v/o, "
          f"{args.steps} measured steps after {args.warmup}, {args.rounds} round(s), device {args.device}, MacTuner method {args.method}")
    print(f"matmul peak ({'8192' if args.device.startswith('cuda') else '2048'}², same threads): bfloat16 {peak_bf16 / 1e9:.0f} GFLOP/s, float32 {peak_fp32 / 1e9:.0f} GFLOP/s")
    print(f"machine load average: {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} cores)\n")
    on_gpu = args.device.startswith("cuda")
    mem_label = "peak GPU" if on_gpu else "peak RSS"
    mem = {kind: med(kind, "peak_device") if on_gpu else med(kind, "peak_rss") for kind in ("baseline", "mactuner")}
    print(f"{'':10} {'dtype':>9} {'threads':>7} {'padding':>7} {'tokens/s':>9} {mem_label:>9} {'6N FLOP/s':>10} {'MFU(6N)':>8} {'executed':>10} {'of peak':>8}")
    for kind, dtype, threads, tps, rss, flops, executed, padding in rows:
        print(f"{kind:10} {dtype:>9} {threads:>7} {padding:7.0%} {tps:9.1f} {mem[kind] / 2**30:8.2f}G {flops / 1e9:9.1f}G "
              f"{flops / peak_bf16:8.1%} {executed / 1e9:9.1f}G {executed / peak_bf16:8.1%}")
    print(f"{'ratio':10} {'':>9} {'':>7} {'':>7} {ours[3] / base[3]:8.2f}x {mem['mactuner'] / mem['baseline']:8.2f}x")
    head = results["baseline"][0]["head_weights"]
    print(f"\nN = {base[5] / 6 / base[3] / 1e6:.1f}M weights (LM head {head / 1e6:.1f}M). 6N FLOP/s = 6 · N · real tokens/s, "
          "the usual model-FLOPs count; it exceeds what LoRA needs, as frozen weights take no weight gradient.\n"
          "executed = 4 · N per position the trainer actually runs (forward 2 + input gradient 2; padding included; "
          "MacTuner's LM head only at trained tokens); attention's own FLOPs left out of both.")
    print(json.dumps({k: v for k, v in results.items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
