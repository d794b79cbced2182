"""Generation speed: MacTuner's chat engine vs ``model.generate`` with the device's best dtype, at equal threads.

Same model, same device, same ~50-token prompt, same thread count, one process.

- **generate**: ``from_pretrained(dtype=get_optimal_dtype(device))`` (bfloat16 on a
  CPU computing it natively, else float32) then greedy ``model.generate``: what a
  script that reads the docs does.
- **engine**: ``load_chat_model`` + ``stream_chat`` (temperature 0) with its
  defaults: on a CPU, 4-bit body + int8 LM head (``mactuner.chat.decode_plan``).
- **engine int8**: ``decode_weights="int8"``.
- **engine exact**: the same engine with ``decode_weights="exact"`` (the
  device dtype's own weights; bfloat16 ones pre-packed): separates the token
  loop's gain from the narrower weights'.

Sides run in alternation (A, B, C, A, B, C, …) so load from other processes on a
shared machine hits each alike; the table shows medians, the ratios to
``generate``, time to first token, and whether the greedy text matched
``generate``'s (exact side: must; narrow sides: how many tokens before they part).
``--emulate-float32-cpu`` re-runs the bench in a child process with oneDNN capped
to AVX512_CORE (no AVX512-BF16/AMX: bfloat16 matmuls become slow) and the CPU
reported as float32-only, which is how this project measures the float32-only
case on a bfloat16 machine: an emulation, not a real such CPU.

    .venv/bin/python -m bench.generate [--tokens 64] [--rounds 3] [--threads N] [--emulate-float32-cpu] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMULATION_ISA = "AVX512_CORE"  # AVX-512 without BF16/AMX: what a float32-only server CPU offers oneDNN
# with SmolLM2's template (and its default system prompt) this is ~50 tokens
PROMPT = [{"role": "user", "content": "Write a long story about a young dragon who guards an old library high in the snowy mountains, and the girl who visits it."}]


def _emulate_float32_cpu() -> None:
    """In this process: report the CPU as float32-only (the ISA cap must already be in the environment)."""
    import mactuner.devices

    mactuner.devices.probe.cpu_supports_bfloat16 = lambda: False


def generate_round(model, inputs, tokens: int):
    """(time to first token, decode tokens/s, new token ids) of greedy ``generate``."""
    import torch

    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - t
    new = out[0, inputs["input_ids"].shape[1]:]
    # same definition as ChatStats: tokens after the first over the time after the first
    return ttft, (len(new) - 1) / max(total - ttft, 1e-9), new.tolist()


def engine_round(loaded, tokens: int):
    """(time to first token, decode tokens/s, text) through ``stream_chat``; no early stop (min length as generate's)."""
    from mactuner.chat import GenerationSettings, stream_chat

    stream = stream_chat(loaded, PROMPT, GenerationSettings(temperature=0, max_new_tokens=tokens))
    for _ in stream:
        pass
    s = stream.stats
    return s.time_to_first_token, s.tokens_per_second, stream.text, s.new_tokens


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(args) -> dict:
    """Measure in this process; returns the JSON-ready result."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.machine import describe_machine, machine_line
    from mactuner.chat import GenerationSettings, encode_prompt, load_chat_model
    from mactuner.devices import get_optimal_dtype, resolve_device
    from mactuner.models import DEFAULT_MODEL, default_model_path
    from mactuner.quantize import decode_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    os.environ["MACTUNER_CPU_THREADS"] = str(threads)  # equal threads: the engine would otherwise adapt to load
    device = resolve_device(args.device)
    dtype = get_optimal_dtype(device)
    path = str(default_model_path()) if args.model == DEFAULT_MODEL else args.model
    machine = describe_machine(threads)

    engine = load_chat_model(args.model, device=device)
    int8 = load_chat_model(args.model, device=device, decode_weights="int8")
    exact = load_chat_model(args.model, device=device, dtype=dtype, decode_weights="exact")
    peer = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = encode_prompt(engine, PROMPT, GenerationSettings(temperature=0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(f"model {args.model} on {device}; prompt {ids.shape[1]} tokens; {args.tokens} new tokens; {args.rounds} rounds; "
          f"{threads} threads on every side", flush=True)
    print(f"machine: {machine_line(machine)}", flush=True)

    # warm every side (first calls allocate and pick kernels)
    generate_round(peer, inputs, 4)
    engine_round(engine, 4)
    engine_round(int8, 4)
    engine_round(exact, 4)
    sides = {"generate": [], "engine": [], "engine int8": [], "engine exact": []}
    loads, reference = [], None
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        ttft, tps, new = generate_round(peer, inputs, args.tokens)
        reference = new
        sides["generate"].append({"ttft": ttft, "tps": tps})
        for name, loaded in (("engine", engine), ("engine int8", int8), ("engine exact", exact)):
            ttft, tps, text, count = engine_round(loaded, args.tokens)
            tokens = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            sides[name].append({"ttft": ttft, "tps": tps, "text": text, "new_tokens": count, "token_ids": tokens})
    loads.append(os.getloadavg()[0])

    reference_text = engine.tokenizer.decode(reference, skip_special_tokens=True)
    med = statistics.median
    base_tps = med(r["tps"] for r in sides["generate"])
    rows = []
    for name, runs in sides.items():
        tps, ttft = med(r["tps"] for r in runs), med(r["ttft"] for r in runs)
        if name == "generate":
            same, detail = "reference", ""
        else:
            text = runs[-1]["text"]
            same = "same text" if text == reference_text else "differs"
            # re-tokenizing the text can merge tokens; the shared prefix is counted on generate's tokens
            prefix = _common_prefix(reference, engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            detail = f"{prefix} of {len(reference)} tokens equal"
        label = {"generate": f"model.generate ({str(dtype).removeprefix('torch.')})",
                 "engine": f"MacTuner engine ({decode_plan(device, dtype, 'int4')}, default)",
                 "engine int8": f"MacTuner engine ({decode_plan(device, dtype, 'int8')})",
                 "engine exact": f"MacTuner engine exact ({decode_plan(device, dtype, 'exact')})"}[name]
        rows.append({"side": name, "label": label, "tokens_per_second": tps, "ratio": tps / base_tps,
                     "time_to_first_token": ttft, "greedy_text": same, "greedy_detail": detail,
                     "all_tokens_per_second": [r["tps"] for r in runs]})

    print(f"\n{'':42} {'tokens/s':>9} {'vs generate':>11} {'TTFT s':>7}  greedy text vs generate")
    for r in rows:
        print(f"{r['label']:42} {r['tokens_per_second']:9.1f} {r['ratio']:10.2f}x {r['time_to_first_token']:7.3f}  "
              f"{r['greedy_text']} {r['greedy_detail']}")
    print("rounds (tokens/s): " + "; ".join(f"{r['side']} " + " ".join(f"{x:.1f}" for x in r["all_tokens_per_second"]) for r in rows))
    print(f"load average per round: {' '.join(f'{x:.1f}' for x in loads)} ({os.cpu_count()} logical cores)")
    return {
        "bench": "generate", "model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": int(ids.shape[1]), "new_tokens": args.tokens, "rounds": args.rounds, "threads": threads,
        "rows": rows, "load_average_per_round": loads, "reference_text": reference_text,
        "machine": machine,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: torch's)")
    parser.add_argument("--emulate-float32-cpu", action="store_true",
                        help=f"measure as on a float32-only CPU (oneDNN capped to {EMULATION_ISA}; an emulation)")
    parser.add_argument("--quick", action="store_true", help="24 tokens, 2 rounds: a minute or two")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds = min(args.tokens, 24), min(args.rounds, 2)

    if args.emulate_float32_cpu and os.environ.get("ONEDNN_MAX_CPU_ISA") != EMULATION_ISA:
        # oneDNN reads the cap once, at start-up: run in a fresh process with it set
        env = dict(os.environ, ONEDNN_MAX_CPU_ISA=EMULATION_ISA)
        return subprocess.call([sys.executable, "-m", "bench.generate", *(argv if argv is not None else sys.argv[1:])], env=env,
                               cwd=ROOT)
    if args.emulate_float32_cpu:
        _emulate_float32_cpu()

    from bench.machine import write_result

    result = run(args)
    if not args.no_save:
        name = "generate-fp32-emulated" if args.emulate_float32_cpu else "generate"
        print(f"result: {write_result(name, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
