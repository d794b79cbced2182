"""How long the built-in model takes to load: the converted safetensors folder against the GGUF.

The GGUF file is dequantized at every load (transformers' ``gguf_file=``); MacTuner converts
it once into a plain transformers folder in its model cache. This prints both load times
(median of ``--repeats``, alternating so that load from other processes hits both) and their
ratio, with the machine's description.

    python -m bench.model_load [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mactuner.devices import cpu_name, cpu_supports_bfloat16
from mactuner.models import _smollm2_gguf, default_model_path, load_model


def _load_gguf_directly(gguf) -> None:
    # what transformers does with a GGUF at every load: dequantize every tensor
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = default_model_path()  # converts once if needed (not timed)
    gguf = _smollm2_gguf()
    times: dict[str, list[float]] = {"converted folder": [], "GGUF (dequantized each load)": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        load_model(str(folder), device="cpu", dtype=torch.float32)
        times["converted folder"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _load_gguf_directly(gguf)
        times["GGUF (dequantized each load)"].append(time.perf_counter() - start)
    print(f"machine: {cpu_name()}, native bfloat16: {cpu_supports_bfloat16()}, torch threads {torch.get_num_threads()}")
    base = statistics.median(times["GGUF (dequantized each load)"])
    print(f"{'source':32} {'median s':>9} {'vs GGUF':>8}")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:32} {median:9.2f} {base / median:7.1f}x")


if __name__ == "__main__":
    main()
