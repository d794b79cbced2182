"""Model folders in the shapes people fine-tune, with random weights, for ``bench/gpu_check.sh``.

Throughput and memory depend on a model's shape only, so a folder with the
published config and random weights (built on the GPU in bfloat16, saved as
safetensors) measures what the real model would, with no download. The
tokenizer is SmolLM2's (its ids fit every vocabulary here).

    python -m bench.gpu_shapes OUT_DIR [--shapes smollm2-135m,qwen2.5-0.5b,...] [--device cuda] [--tiny]
                               [--json SHAPES.json] [--dry-run]

``--tiny`` keeps each config's family and proportions but shrinks it to 2 layers
and a small width: the ``--dry-run`` on a CPU checks the plumbing with it.
Shapes are built smallest first, and ``--json FILE`` is rewritten after each one
(``{shape: {"path", "parameters", "config"}}``), so a build stopped by the time
budget keeps the shapes it finished. Prints one JSON line per shape as it is built.
``--dry-run`` builds nothing: it prints the configs (parameters counted on the meta
device), for checking the shapes and the plumbing without weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# published configs (the fields that set the shape), Llama- and Qwen2-style
SHAPES: dict[str, dict] = {
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def shape_config(name: str, tiny: bool = False):
    """The transformers config of a shape (``tiny``: 2 layers, width / 8, vocabulary 49152)."""
    from transformers import AutoConfig

    values = dict(SHAPES[name])
    model_type = values.pop("model_type")
    if tiny:
        heads, kv = values["num_attention_heads"], values["num_key_value_heads"]
        head_dim = 16
        values.update(num_hidden_layers=2, hidden_size=heads * head_dim, intermediate_size=values["intermediate_size"] // 8 // 16 * 16,
                      vocab_size=49152, num_key_value_heads=kv)
    values.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return AutoConfig.for_model(model_type, **values)


def build(name: str, out: Path, tokenizer_dir: Path, device: str = "cuda", tiny: bool = False) -> dict:
    """Write ``out/<name>``: config, random bfloat16 weights, SmolLM2's tokenizer. Reuses a complete folder."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = out / (name + ("-tiny" if tiny else ""))
    config = shape_config(name, tiny)
    done = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if not any(p.exists() for p in done):
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        parameters = sum(p.numel() for p in model.parameters())
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    else:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).exists():
            shutil.copy(tokenizer_dir / file, folder / file)
    return {"path": str(folder), "parameters": parameters, "config": {k: v for k, v in SHAPES[name].items()}}


def parameters(name: str, tiny: bool = False) -> int:
    """The shape's parameter count, from its config alone (meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(shape_config(name, tiny)).parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokenizer", type=Path, help="a folder with SmolLM2's tokenizer files (not for --dry-run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path, help="rewritten after each shape with every shape built so far")
    parser.add_argument("--dry-run", action="store_true", help="count parameters only; write no weights")
    args = parser.parse_args(argv)
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    if not args.dry_run and args.tokenizer is None:
        parser.error("--tokenizer is needed to build model folders")
    # smallest first: the budget that stops the build stops it at the largest
    names.sort(key=lambda n: parameters(n, args.tiny))
    built: dict[str, dict] = {}
    for name in names:
        if args.dry_run:
            built[name] = {"path": None, "parameters": parameters(name, args.tiny), "config": dict(SHAPES[name])}
        else:
            built[name] = build(name, args.out, args.tokenizer, args.device, args.tiny)
        if args.json:
            partial = args.json.with_name(args.json.name + ".tmp")
            partial.write_text(json.dumps(built, indent=1))
            partial.replace(args.json)
        print(json.dumps({name: built[name]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
