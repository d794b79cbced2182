"""Training throughput: MacTuner's trainer vs transformers ``Trainer`` + peft, default and informed.

Same model (SmolLM2-135M-Instruct by default), same data (the first N rows of
LLaMA-Factory's ``alpaca_en_demo.json``, tokenized the same way, max length 512),
same device, same threads, same LoRA (r=8, alpha 16, q/k/v/o), micro-batch 4.
Rows in one run:

- **HF default**: what a script does with default settings: ``from_pretrained``
  (the checkpoint's float32), ``get_peft_model``, ``Trainer`` with
  ``DataCollatorForSeq2Seq`` (pads each random batch to its longest row).
- **HF informed**: what a user who reads the docs sets: length grouping
  (``train_sampling_strategy="group_by_length"``, transformers 5.x's name for the
  old ``group_by_length=True``) and, where the device computes bfloat16 natively
  (``mactuner.devices.get_optimal_dtype``), the weights loaded in bfloat16 plus
  ``bf16=True``; float32 elsewhere.
- **MacTuner**: ``mactuner.train.Trainer`` with its defaults (device dtype,
  float32 adapter, length grouping, logits only where trained; ``compile: auto``,
  which compiles only when the run is long enough to pay the compile back).
- **MacTuner+comp**: the same with ``compile: on`` (decoder layers compiled by
  TorchInductor before the first step). Its "whole run" column includes the
  compile: by default each worker gets an empty TorchInductor cache (a first
  compile on this machine); ``--compile-cache DIR`` shares one cache folder,
  as a second run on the same machine does (run once to fill it).
- **HF QLoRA (bnb)**: the informed peer's QLoRA, peft's documented recipe
  (``BitsAndBytesConfig`` 4-bit NF4, ``prepare_model_for_kbit_training``) — on a
  CPU too, where bitsandbytes ≥ 0.46 runs; skipped when bitsandbytes is missing.
- **QLoRA-int8+comp** (CPU only, not a like-for-like row: it changes the numerics as
  QLoRA does): MacTuner's ``method: qlora`` on a CPU — the frozen base in int8, its
  forward and input-gradient matmuls in integers (``mactuner.training.int8_base``) —
  with ``compile: on``.

Each measurement runs in its own process so peak memory (``ru_maxrss``: peak
resident set of the process, model loading included) is separable. Rounds
alternate (peak, default, informed, MacTuner, …) so load from other processes
on a shared machine hits every side alike; the table shows medians, the load
average during each side, and ratios against the informed peer.

tokens/s counts real tokens only (no padding), over the steps after a warm-up.
Model FLOPs utilisation: MFU = 6 · N · tokens/s / peak, with N = the weights a
token's forward pass multiplies through (every weight; the tied embedding
counted once, as the LM head's matmul), 6 = 2 (forward) + 4 (backward) FLOPs per
weight, attention's own FLOPs left out; peak = a 2048×2048 matmul **in the dtype
that side computes in** (float32 and bfloat16 measured separately, same threads).
6N is the usual convention, but LoRA's frozen weights take no weight gradient,
so the table also shows the FLOPs each trainer actually executes (4 per weight
per position it runs, padding included; MacTuner runs the LM head only at
trained tokens) against the same peak.

``--emulate-float32-cpu`` runs every worker with oneDNN capped to AVX512_CORE
(no AVX512-BF16/AMX) and the CPU reported as float32-only: how this project
measures the float32-only case on a bfloat16 machine (an emulation, not a real
such CPU). Results also go to ``bench/results/train_throughput-<time>.json``
with the machine's description (``bench/machine.py``).

    .venv/bin/python -m bench.train_throughput [--quick] [--rows 400] [--steps 20] [--warmup 2] [--rounds 1]
        [--threads N] [--emulate-float32-cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALPACA = ROOT / "tests" / "data" / "third_party" / "llama-factory" / "alpaca_en_demo.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EMULATION_ISA = "AVX512_CORE"  # AVX-512 without BF16/AMX: what a float32-only server CPU offers oneDNN
VNNI_ISA = "AVX512_CORE_VNNI"  # AVX-512 with int8 VNNI, still no BF16/AMX (Cascade Lake, 2019)
SIDES = ("hf_default", "hf_informed", "mactuner", "mactuner_compiled", "hf_qlora", "mactuner_int8")
LABELS = {"hf_default": "HF default", "hf_informed": "HF informed", "mactuner": "MacTuner",
          "mactuner_compiled": "MacTuner+comp", "hf_qlora": "HF QLoRA (bnb)", "mactuner_int8": "QLoRA-int8+comp"}


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
    """N: weights multiplied per token (a tied embedding is counted once, as the LM head).

    QLoRA's int8 base weights on a CPU are buffers, not parameters: they are counted too; a
    bitsandbytes 4-bit weight packs two weights per element: counted by its layer's shape.
    """
    from mactuner.training.int8_base import Int8BaseLinear

    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, Int8BaseLinear):
            total += module.weight_int8.numel()
        elif getattr(getattr(module, "weight", None), "quant_state", None) is not None:
            total += module.in_features * module.out_features - module.weight.numel()
    return total


def _head_weights(model) -> int:
    """Weights of the LM head's matmul (vocabulary x hidden)."""
    return model.get_output_embeddings().weight.numel()


def _data_file(rows: int, source: str | None = None) -> Path:
    data = json.loads(Path(source or ALPACA).read_text())[:rows]
    path = Path(tempfile.gettempdir()) / f"mactuner-bench-alpaca-{rows}-{os.getpid()}.json"
    path.write_text(json.dumps(data))
    return path


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- workers (each in its own process) ---------------------------------------


def worker_peak(args) -> dict:
    """Best matmul FLOP/s of float32 and bfloat16 with this process's threads."""
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
        for _ in range(3 if args.quick else 5):
            t = time.perf_counter()
            for _ in range(3):
                a @ b
            sync()
            best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t))
        result[_dtype_name(dtype)] = best
    return result


def _hf_worker(args, informed: bool, callbacks: tuple = (), method: str | None = None) -> dict:
    """One HF side: transformers ``Trainer`` + peft (``callbacks`` join its own, e.g. a profiler window).

    ``method`` (default ``args.method``): ``qlora`` loads the base in 4-bit NF4 with bitsandbytes,
    on CUDA or on a CPU (bitsandbytes ≥ 0.46 has CPU kernels)."""
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
    from mactuner.devices import get_optimal_dtype

    path = _model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    bf16 = informed and get_optimal_dtype(args.device) == torch.bfloat16
    # default: the checkpoint's dtype (float32); informed: bfloat16 weights where the device computes them natively
    method = method or args.method
    load = {"dtype": torch.bfloat16} if bf16 else {}
    if method == "qlora":
        # the QLoRA recipe of peft's docs, with MacTuner's quantization settings and checkpointing choice
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        compute = get_optimal_dtype(args.device)
        load = {"dtype": compute, "device_map": {"": 0}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)}
        load["device_map"] = {"": 0 if args.device.startswith("cuda") else "cpu"}
        bf16 = informed and compute == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, **load)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
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
    began: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a, **k):
            began.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    extra = {}
    if informed:
        extra["train_sampling_strategy"] = "group_by_length"  # transformers < 5: group_by_length=True
        extra["bf16"] = bf16
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
                **extra,
            ),
            train_dataset=dataset,
            data_collator=collate,
            callbacks=[StepTimes(), *callbacks],
            processing_class=tokenizer if informed else None,
        )
        trainer.train()
    measured = real_tokens[args.warmup : args.warmup + args.steps]
    padded = sum(padded_tokens[args.warmup : args.warmup + args.steps])
    seconds = marks[-1] - marks[args.warmup - 1] if args.warmup else marks[-1] - marks[0]
    return {
        "tokens_per_second": sum(measured) / seconds,
        "whole_run_tokens_per_second": sum(real_tokens[: args.warmup + args.steps]) / (marks[-1] - began[0]),
        # frozen weights need no weight gradient: forward 2 + input gradient 2 FLOPs per weight,
        # on every position the model runs, padding included; the LM head too
        "executed_flops_per_second": 4 * _forward_weights(model) * padded / seconds,
        "padding": 1 - sum(measured) / padded,
        "head_weights": _head_weights(model),
        "peak_rss": _peak_rss(),
        "peak_device": _peak_device(args.device),
        "dtype": ("bfloat16" if bf16 else _dtype_name(next(model.parameters()).dtype)) + ("/nf4" if method == "qlora" else ""),
        "n_forward": _forward_weights(model),
        "threads": torch.get_num_threads(),
        "settings": ("train_sampling_strategy=group_by_length" + (", bfloat16 weights, bf16=True" if bf16 else "")
                     + (", 4-bit NF4 base (bitsandbytes), prepare_model_for_kbit_training" if method == "qlora" else ""))
        if informed else "defaults",
    }


def worker_hf_default(args) -> dict:
    return _hf_worker(args, informed=False)


def worker_hf_informed(args) -> dict:
    return _hf_worker(args, informed=True)


def worker_hf_qlora(args) -> dict:
    """The informed peer's QLoRA: peft's recipe on a bitsandbytes 4-bit base (the row to hold QLoRA-int8 against)."""
    return _hf_worker(args, informed=True, method="qlora")


def _executed_positions(trainer, warmup: int, steps: int) -> tuple[int, int] | None:
    """(padded positions through the body, trained positions through the head) in the measured steps.

    Reads the trainer's batching plan; None if its internals moved (the FLOPs column is then left out).
    """
    try:
        padded = trained = 0
        for step in range(warmup, warmup + steps):
            epoch, index = divmod(step, trainer.steps_per_epoch)
            units = [trainer.train_units[i] for i in trainer._plan(epoch)[index]]
            for k in range(0, len(units), trainer.micro_batch_size):
                chunk = units[k : k + trainer.micro_batch_size]
                padded += len(chunk) * max(len(u.input_ids) for u in chunk)
                trained += sum(u.trained_tokens for u in chunk)
        return padded, trained
    except (AttributeError, TypeError, IndexError):
        return None


def worker_mactuner(args, compile: str = "auto", method: str | None = None) -> dict:
    import torch

    from mactuner.config import TrainConfig
    from mactuner.train import Trainer, TrainingCallback

    marks: list[tuple[float, int]] = []
    began: list[float] = []

    class StepTimes(TrainingCallback):
        def on_train_begin(self, info):
            began.append(time.perf_counter())

        def on_train_report(self, info):
            marks.append((time.perf_counter(), info["tokens"]))

    config = TrainConfig(
        model=args.model,
        method=method or args.method,
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
        compile=compile,
    )
    trainer = Trainer(config, callbacks=[StepTimes()])
    trainer.run()
    start = marks[args.warmup - 1] if args.warmup else (marks[0][0], 0)
    end = marks[-1]
    seconds = end[0] - start[0]
    tokens = end[1] - start[1]
    n, head = _forward_weights(trainer.model), _head_weights(trainer.model)
    positions = _executed_positions(trainer, args.warmup, args.steps)
    return {
        "tokens_per_second": tokens / seconds,
        # from the first step's start: the compile (when there is one) is paid inside
        "whole_run_tokens_per_second": end[1] / (end[0] - began[0]),
        "compiled": trainer._compiler.compiled,
        "executed_flops_per_second": (4 * (n - head) * positions[0] + 4 * head * positions[1]) / seconds if positions else None,
        "padding": 1 - tokens / positions[0] if positions else None,
        "head_weights": head,
        "peak_rss": _peak_rss(),
        "peak_device": _peak_device(args.device),
        "dtype": _dtype_name(trainer.compute_dtype) + _base_suffix(trainer.config.method, args.device),
        "n_forward": n,
        "threads": torch.get_num_threads(),
        "settings": ("defaults" if compile == "auto" else f"compile: {compile}") + (", method: qlora" if method else ""),
    }


def worker_mactuner_compiled(args) -> dict:
    return worker_mactuner(args, compile="on")


def worker_mactuner_int8(args) -> dict:
    """QLoRA on a CPU (the frozen base in int8, its matmuls in integers), compiled."""
    if not args.device.startswith("cpu"):
        raise SystemExit("the mactuner_int8 side is QLoRA on a CPU; on CUDA use --method qlora (4-bit) for every side")
    return worker_mactuner(args, compile="on", method="qlora")


def _base_suffix(method: str, device: str) -> str:
    if method != "qlora":
        return ""
    return "/nf4" if device.startswith("cuda") else "/int8"


WORKERS = {"peak": worker_peak, "hf_default": worker_hf_default, "hf_informed": worker_hf_informed,
           "mactuner": worker_mactuner, "mactuner_compiled": worker_mactuner_compiled,
           "hf_qlora": worker_hf_qlora, "mactuner_int8": worker_mactuner_int8}


# --- the orchestrator --------------------------------------------------------


def run_worker(kind: str, args) -> dict:
    command = [sys.executable, "-m", "bench.train_throughput", "--worker", kind] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k not in ("worker", "quick", "emulate_float32_cpu", "no_save", "sides") and v is not None
    ]
    command += ["--quick"] if args.quick else []
    command += [f"--emulate-float32-cpu={args.emulate_float32_cpu}"] if args.emulate_float32_cpu else []
    env = dict(os.environ, **({"ONEDNN_MAX_CPU_ISA": args.emulate_float32_cpu} if args.emulate_float32_cpu else {}))
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mactuner-bench-inductor-") as cold:
        # an empty TorchInductor cache unless one is shared on purpose: the compile is paid as on a first run
        env["TORCHINDUCTOR_CACHE_DIR"] = args.compile_cache or cold
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    result["load_average"] = (load + os.getloadavg()[0]) / 2  # 1-minute load, start and end of this side
    return result


def _peak_for(dtype: str, peaks: dict) -> float:
    return peaks["bfloat16"] if dtype.startswith("bfloat16") else peaks["float32"]


def summarize(results: dict[str, list[dict]], args) -> dict:
    """Medians per side, ratios against the informed peer, MFU against each side's own dtype's peak."""
    med = lambda kind, key: statistics.median(x[key] for x in results[kind])
    peaks = {"bfloat16": med("peak", "bfloat16"), "float32": med("peak", "float32")}
    on_gpu = args.device.startswith("cuda")
    rows = {}
    for kind in (k for k in SIDES if k in results):
        first = results[kind][0]
        tps = med(kind, "tokens_per_second")
        memory = med(kind, "peak_device") if on_gpu else med(kind, "peak_rss")
        peak = _peak_for(first["dtype"], peaks)
        executed = None if first["executed_flops_per_second"] is None else med(kind, "executed_flops_per_second")
        rows[kind] = {
            "label": LABELS[kind], "settings": first["settings"], "dtype": first["dtype"], "threads": first["threads"],
            "padding": None if first["padding"] is None else med(kind, "padding"),
            "tokens_per_second": tps, "whole_run_tokens_per_second": med(kind, "whole_run_tokens_per_second"),
            "compiled": any(x.get("compiled") for x in results[kind]), "memory_bytes": memory, "memory_kind": "peak GPU" if on_gpu else "peak RSS",
            "peak_flops_used": peak, "mfu_6n": 6 * first["n_forward"] * tps / peak,
            "executed_flops_per_second": executed, "executed_of_peak": None if executed is None else executed / peak,
            "load_average": [x["load_average"] for x in results[kind]],
            "all_tokens_per_second": [x["tokens_per_second"] for x in results[kind]],
            "n_forward": first["n_forward"], "head_weights": first["head_weights"],
        }
    informed = rows["hf_informed"]
    for row in rows.values():
        row["speed_vs_informed"] = row["tokens_per_second"] / informed["tokens_per_second"]
        row["whole_run_vs_informed"] = row["whole_run_tokens_per_second"] / informed["whole_run_tokens_per_second"]
        row["memory_vs_informed"] = row["memory_bytes"] / informed["memory_bytes"]
        if "hf_default" in rows:
            row["speed_vs_default"] = row["tokens_per_second"] / rows["hf_default"]["tokens_per_second"]
    return {"peaks": peaks, "rows": rows}


def print_table(summary: dict, args, machine_text: str) -> None:
    peaks, rows = summary["peaks"], summary["rows"]
    print(f"\nmodel {args.model}, {args.rows} alpaca rows, max length {args.max_length}, micro-batch 4, LoRA r=8 q/k/v/o, "
          f"{args.steps} measured steps after {args.warmup}, {args.rounds} round(s), device {args.device}, MacTuner method {args.method}")
    print(f"machine: {machine_text}")
    size = "8192" if args.device.startswith("cuda") else "2048"
    print(f"matmul peak ({size}², same threads): bfloat16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s, float32 {peaks['float32'] / 1e9:.0f} GFLOP/s")
    mem_label = next(iter(rows.values()))["memory_kind"]
    print(f"\n{'':15} {'dtype':>13} {'thr':>3} {'padding':>7} {'tokens/s':>9} {'vs informed':>11} {'whole run':>9} {'vs inf':>7} "
          f"{mem_label:>9} {'mem vs inf':>10} {'MFU(6N)':>8} {'executed':>9} {'load':>5}")
    for row in rows.values():
        padding = "" if row["padding"] is None else f"{row['padding']:.0%}"
        executed = "" if row["executed_of_peak"] is None else f"{row['executed_of_peak']:.1%}"
        load = statistics.median(row["load_average"])
        print(f"{row['label']:15} {row['dtype']:>13} {row['threads']:>3} {padding:>7} {row['tokens_per_second']:9.1f} "
              f"{row['speed_vs_informed']:10.2f}x {row['whole_run_tokens_per_second']:9.1f} {row['whole_run_vs_informed']:6.2f}x "
              f"{row['memory_bytes'] / 2**30:8.2f}G {row['memory_vs_informed']:9.2f}x "
              f"{row['mfu_6n']:8.1%} {executed:>9} {load:5.1f}")
    print(f"\nHF informed = {rows['hf_informed']['settings']}. MFU(6N) = 6·N·real tokens/s over the matmul peak of the "
          "dtype that side computes in; executed = 4·N per position actually run (padding included; MacTuner's LM head "
          "only at trained tokens), same peak. Whole run = real tokens of every step (warm-up included) over the time "
          "from the first step's start to the last step's end: a compile is paid inside it. The int8 row's MFU is against the "
          "float peak of its compute dtype (its matmuls run in int8, so it can pass 100 %). Load = 1-minute load average during that side "
          f"({os.cpu_count()} logical cores): on a shared machine the figures are noisy.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="lora", choices=["lora", "qlora"], help="every side's method (qlora: CUDA + bitsandbytes)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)} (hf_informed is required)")
    parser.add_argument("--data", default=None, help=f"alpaca-format JSON (default {ALPACA})")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and not measured")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians are shown)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every side (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="64 rows, 4 steps after 1: a few minutes")
    parser.add_argument("--emulate-float32-cpu", nargs="?", const=EMULATION_ISA, default=None, metavar="ISA",
                        help=f"measure as on a float32-only CPU: oneDNN capped to ISA (default {EMULATION_ISA}, a Skylake-SP; "
                             f"{VNNI_ISA} is a Cascade Lake: int8 VNNI, no bfloat16); an emulation")
    parser.add_argument("--compile-cache", default=None,
                        help="a TorchInductor cache folder shared by the workers (default: an empty one each: cold compiles)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and not args.worker:
        args.rows, args.steps, args.warmup = min(args.rows, 64), min(args.steps, 4), min(args.warmup, 1)

    if args.worker:
        if args.emulate_float32_cpu:
            import mactuner.devices

            mactuner.devices.probe.cpu_supports_bfloat16 = lambda: False  # the ISA cap came with the environment
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
            # MacTuner adapts its threads to other processes' load unless told a number
            os.environ["MACTUNER_CPU_THREADS"] = str(args.threads)
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    from bench.machine import describe_machine, machine_line, write_result

    if args.emulate_float32_cpu:
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.emulate_float32_cpu  # recorded in the machine description
        import mactuner.devices

        mactuner.devices.probe.cpu_supports_bfloat16 = lambda: False
    machine = describe_machine(args.threads)
    sides = ["peak"] + [s for s in SIDES if s in args.sides.split(",")]
    if "hf_informed" not in sides:
        raise SystemExit("--sides must include hf_informed: every ratio is against it")
    if "hf_qlora" in sides and importlib.util.find_spec("bitsandbytes") is None:
        print("hf_qlora skipped: bitsandbytes is not installed (pip install bitsandbytes; CPU kernels since 0.46)",
              file=sys.stderr)
        sides.remove("hf_qlora")
    results: dict[str, list[dict]] = {k: [] for k in sides}
    # MACTUNER_BENCH_PEAKS=FILE: measure the matmul peaks once, reuse them in later runs on the same machine
    peaks_file = os.environ.get("MACTUNER_BENCH_PEAKS")
    if peaks_file and Path(peaks_file).is_file():
        results["peak"] = [json.loads(Path(peaks_file).read_text())]
        sides.remove("peak")
    for r in range(args.rounds):
        for kind in sides:
            results[kind].append(run_worker(kind, args))
            if kind == "peak" and peaks_file:
                Path(peaks_file).write_text(json.dumps(results["peak"][-1]))
            print(f"round {r + 1}: {kind} done ({results[kind][-1]['wall_s']:.0f} s, load {results[kind][-1]['load_average']:.1f})",
                  file=sys.stderr, flush=True)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarize(results, args)
    print_table(summary, args, machine_line(machine))
    if not args.no_save:
        name = "train_throughput-fp32-emulated" if args.emulate_float32_cpu else "train_throughput"
        settings = {k: v for k, v in vars(args).items() if k != "worker"}
        path = write_result(name, {"bench": "train_throughput", "settings": settings, "machine": machine,
                                   "summary": summary, "raw": results})
        print(f"result: {path}")


if __name__ == "__main__":
    main()
