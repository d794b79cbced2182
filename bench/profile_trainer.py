"""Where a training step's CPU time goes: MacTuner's trainer or the informed HF peer, under ``torch.profiler``.

Runs a few LoRA steps (same data and settings as ``bench/train_throughput.py``)
and profiles the steps after the first, then groups the operators' self time
into kinds (matmuls, attention, dtype conversions, elementwise, optimizer, …)
and prints the top operators. The groups say which lever can pay: a step that
is 80 % matmuls in the fastest dtype can only gain by doing fewer FLOPs.

    .venv/bin/python -m bench.profile_trainer [--side mactuner|hf_informed] [--steps 3] [--rows 64] [--threads 1] [--compile on] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GROUPS = [  # (group, substrings of operator names), first match wins
    ("matmul", ("mm", "linear", "matmul", "_linear_pointwise", "baddbmm", "addmm", "bmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
    ("dtype conversion / copies", ("_to_copy", "copy_", "to", "clone", "contiguous", "cat", "index", "masked")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "sqrt", "clip", "norm")),
    ("elementwise", ("mul", "add", "silu", "pow", "mean", "rsqrt", "neg", "div", "sub", "sum", "exp", "log", "embedding",
                     "dropout", "bernoulli", "fill", "zero", "where", "cross_entropy", "nll")),
]


def group_of(name: str) -> str:
    key = name.lower().removeprefix("aten::").removeprefix("mkldnn::")
    for group, needles in GROUPS:
        if any(n in key for n in needles):
            return group
    return "other"


def summarize(profiler, steps: int, wall: float) -> dict:
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "steps": steps, "wall_seconds_per_step": wall / steps, "operator_seconds_per_step": total / 1e6 / steps,
        "groups": {g: {"share": t / total, "seconds_per_step": t / 1e6 / steps} for g, t in sorted(groups.items(), key=lambda x: -x[1])},
        "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in top],
    }


def profile_mactuner(args):
    from torch.profiler import ProfilerActivity, profile

    from bench.train_throughput import TARGETS, _data_file
    from mactuner.config import TrainConfig
    from mactuner.train import Trainer, TrainingCallback

    prof = profile(activities=[ProfilerActivity.CPU])
    marks = []

    class Window(TrainingCallback):
        def on_train_report(self, info):
            marks.append(time.perf_counter())
            if info["step"] == 1:
                prof.start()
            elif info["step"] == 1 + args.steps:
                prof.stop()

    config = TrainConfig(model=args.model, dataset=str(_data_file(args.rows)), device="cpu", max_length=512, batch_size=4,
                         lora_rank=8, lora_alpha=16, target_modules=TARGETS, max_steps=1 + args.steps, val_fraction=0.0,
                         eval_every=0, save_every=0, compile=args.compile, dtype=args.dtype)
    Trainer(config, callbacks=[Window()]).run()
    return prof, marks[-1] - marks[0]


def profile_hf(args):
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from bench.train_throughput import _hf_worker

    prof = profile(activities=[ProfilerActivity.CPU])
    marks = []

    class Window(TrainerCallback):
        def on_step_end(self, a, state, c, **k):
            marks.append(time.perf_counter())
            if state.global_step == 1:
                prof.start()
            elif state.global_step == 1 + args.steps:
                prof.stop()

    # the informed peer exactly as bench.train_throughput runs it: one step, then the profiled ones
    side = argparse.Namespace(model=args.model, device="cpu", method="lora", rows=args.rows, data=None,
                              max_length=512, warmup=1, steps=args.steps)
    _hf_worker(side, informed=True, callbacks=(Window(),))
    return prof, marks[-1] - marks[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", default="mactuner", choices=["mactuner", "hf_informed"])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one unprofiled step)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", default="off", choices=["auto", "on", "off"],
                        help="MacTuner's compile setting (on: compiled before step 1, outside the profiled steps)")
    parser.add_argument("--dtype", default="auto", help="MacTuner's compute dtype (e.g. float32 with ONEDNN_MAX_CPU_ISA=AVX512_CORE)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["MACTUNER_CPU_THREADS"] = str(args.threads)
    load = os.getloadavg()[0]
    prof, wall = (profile_mactuner if args.side == "mactuner" else profile_hf)(args)
    result = summarize(prof, args.steps, wall)
    result.update(side=args.side, threads=torch.get_num_threads(), load_average=[load, os.getloadavg()[0]])
    print(f"{args.side}: {result['wall_seconds_per_step']:.2f} s/step wall, {result['operator_seconds_per_step']:.2f} s/step in operators; "
          f"{result['threads']} threads; load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for group, g in result["groups"].items():
        print(f"  {group:28} {g['share']:6.1%}  {g['seconds_per_step']:.3f} s/step")
    for t in result["top"]:
        print(f"    {t['op']:52} {t['share']:6.1%}  {t['calls_per_step']:.0f} calls/step")
    print(json.dumps(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
