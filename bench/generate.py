"""Generation speed: MacTuner's chat engine vs plain ``model.generate`` with default settings.

Same model, same device, same ~50-token prompt, one process. The baseline is
what a script would do: ``from_pretrained(dtype=float32)`` then
``model.generate(**inputs, max_new_tokens=N)`` with torch's default threads.
The engine is ``load_chat_model`` + ``stream_chat`` (temperature 0).

The two are run in alternation (baseline, engine, baseline, engine, …) so a
load spike from other processes on a shared machine hits both; the table shows
medians and the ratio engine / baseline.

    .venv/bin/python bench/generate.py [--model M] [--device cpu] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mactuner.chat import GenerationSettings, encode_prompt, load_chat_model, stream_chat  # noqa: E402
from mactuner.devices import resolve_device  # noqa: E402
from mactuner.models import DEFAULT_MODEL, default_model_path  # noqa: E402

# with SmolLM2's template (and its default system prompt) this is ~50 tokens
PROMPT = [{"role": "user", "content": "Write a long story about a young dragon who guards an old library high in the snowy mountains, and the girl who visits it."}]


def baseline_round(model, inputs, tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of plain ``generate`` with default settings."""
    threads = torch.get_num_threads()
    t = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, min_new_tokens=1)
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens)
    total = time.perf_counter() - t
    new = out.shape[1] - inputs["input_ids"].shape[1]
    assert torch.get_num_threads() == threads
    # same definition as ChatStats: tokens after the first over the time after the first
    return ttft, (new - 1) / max(total - ttft, 1e-9)


def same_threads_round(model, inputs, tokens: int, threads: int) -> tuple[float, float]:
    """The baseline again with the engine's thread count: separates the thread choice from the rest."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return baseline_round(model, inputs, tokens)
    finally:
        torch.set_num_threads(default)


def engine_round(loaded, tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s, threads) through ``stream_chat``."""
    stream = stream_chat(loaded, PROMPT, GenerationSettings(temperature=0, max_new_tokens=tokens))
    for _ in stream:
        pass
    s = stream.stats
    return s.time_to_first_token, s.tokens_per_second, s.threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    device = resolve_device(args.device)
    path = str(default_model_path()) if args.model == DEFAULT_MODEL else args.model
    loaded = load_chat_model(args.model, device=device)
    baseline = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    ids = encode_prompt(loaded, PROMPT, GenerationSettings(temperature=0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(f"model {args.model} on {device}; prompt {ids.shape[1]} tokens; {args.tokens} new tokens; "
          f"{args.rounds} rounds; torch threads {torch.get_num_threads()}; load avg {os.getloadavg()[0]:.1f}")

    # warm both (first calls allocate and pick kernels)
    baseline_round(baseline, inputs, 4)
    engine_round(loaded, 4)
    base_ttft, base_tps, eng_ttft, eng_tps, eng_threads, same_ttft, same_tps = [], [], [], [], [], [], []
    for _ in range(args.rounds):
        a, b = baseline_round(baseline, inputs, args.tokens)
        base_ttft.append(a)
        base_tps.append(b)
        a, b, n = engine_round(loaded, args.tokens)
        eng_ttft.append(a)
        eng_tps.append(b)
        eng_threads.append(n)
        if device.type == "cpu":
            a, b = same_threads_round(baseline, inputs, args.tokens, n)
            same_ttft.append(a)
            same_tps.append(b)

    med = statistics.median
    rows = [
        ("", "model.generate fp32 (default)", f"MacTuner engine ({str(loaded.dtype).removeprefix('torch.')})", "ratio"),
        ("tokens/s (median)", f"{med(base_tps):.1f}", f"{med(eng_tps):.1f}", f"{med(eng_tps) / med(base_tps):.2f}x"),
        ("tokens/s (all rounds)", " ".join(f"{x:.1f}" for x in base_tps), " ".join(f"{x:.1f}" for x in eng_tps), ""),
        ("time to first token (s, median)", f"{med(base_ttft):.3f}", f"{med(eng_ttft):.3f}",
         f"{med(base_ttft) / med(eng_ttft):.2f}x faster"),
        ("CPU threads", str(torch.get_num_threads()), " ".join(str(n) for n in eng_threads), ""),
    ]
    if same_tps:
        rows.append((f"model.generate fp32 with the engine's threads: tokens/s", f"{med(same_tps):.1f}", "",
                     f"engine {med(eng_tps) / med(same_tps):.2f}x"))
        rows.append(("  ... time to first token (s)", f"{med(same_ttft):.3f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"load avg after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
