"""Chat engines side by side: MacTuner's torch engine vs llama.cpp (llama-cpp-python) on the same prompts.

The torch engine is ``load_chat_model`` + ``stream_chat`` on the model folder; the
llama.cpp engine is ``load_gguf_chat_model`` + ``stream_gguf_chat`` on the same model
exported to GGUF (f16 and q8_0 by default, exported once into a temporary folder,
or ``--gguf FILE`` for your own). Both answer greedily with the same token budget
(answers that stop early are timed over what they made); the engines run in
alternation, prompt by prompt, so a load spike from other processes hits all of
them. The table shows medians of time to first token and decode tokens/s, and each
engine's ratio to the torch engine.

On a shared machine these figures are noisy (other jobs take the cores): compare
the ratios of one run, not the absolute numbers across runs.

    .venv/bin/python -m bench.generate_engines [--model M] [--tokens 64] [--rounds 2] [--gguf FILE …]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mactuner.chat import GenerationSettings, load_chat_model, stream_chat
from mactuner.models import DEFAULT_MODEL, default_model_path

PROMPTS = [
    [{"role": "user", "content": "Write a long story about a young dragon who guards an old library high in the snowy mountains."}],
    [{"role": "user", "content": "Explain how a bicycle gear system works, step by step, for a curious child."}],
    [{"role": "user", "content": "What is the capital of France? Then list five famous places to visit there."}],
]


def measure(stream) -> tuple[float | None, float | None, int]:
    """Run one answer to the end: (time to first token, tokens/s, new tokens)."""
    for _ in stream:
        pass
    return stream.stats.time_to_first_token, stream.stats.tokens_per_second, stream.stats.new_tokens


def main() -> None:
    """Export (unless given), then time each engine on each prompt in alternation and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gguf", action="append", help="a GGUF file to time (repeatable); default: export f16 and q8_0")
    args = parser.parse_args()

    from mactuner.chat.llamacpp import llama_cpp_missing_reason, load_gguf_chat_model, stream_gguf_chat
    from mactuner.export import export_gguf

    if reason := llama_cpp_missing_reason():
        sys.exit(reason)
    folder = str(default_model_path()) if args.model == DEFAULT_MODEL else args.model
    scratch = tempfile.TemporaryDirectory()
    files = [Path(f) for f in args.gguf or []]
    if not files:
        for outtype in ("f16", "q8_0"):
            print(f"exporting {outtype}…", file=sys.stderr)
            files.append(export_gguf(merged=folder, outtype=outtype, out=Path(scratch.name) / f"model-{outtype}.gguf").path)
    settings = GenerationSettings(max_new_tokens=args.tokens, temperature=0.0)
    engines = {"torch": (load_chat_model(folder, device="cpu"), stream_chat)}
    for file in files:
        engines[f"llama.cpp {file.name}"] = (load_gguf_chat_model(file), stream_gguf_chat)
    results: dict[str, list[tuple]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for prompt in PROMPTS:
            for name, (loaded, stream) in engines.items():
                results[name].append(measure(stream(loaded, prompt, settings)))

    def median(values) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    base_ttft = median(r[0] for r in results["torch"])
    base_tps = median(r[1] for r in results["torch"])
    print(f"model {args.model}; {len(PROMPTS)} prompts x {args.rounds} rounds, greedy, up to {args.tokens} tokens; "
          f"CPU threads as the chat engine picks them. Noisy on a shared machine: compare ratios.")
    print(f"{'engine':38} {'TTFT (s)':>9} {'x torch':>8} {'tokens/s':>9} {'x torch':>8} {'tokens':>7}")
    for name, rows in results.items():
        ttft, tps = median(r[0] for r in rows), median(r[1] for r in rows)
        print(f"{name:38} {ttft or 0:9.3f} {(ttft or 0) / (base_ttft or 1):8.2f} {tps or 0:9.1f} "
              f"{(tps or 0) / (base_tps or 1):8.2f} {median(r[2] for r in rows) or 0:7.0f}")
    scratch.cleanup()


if __name__ == "__main__":
    main()
