"""The export receipt: proof that a GGUF file answers as the torch model it came from.

After :func:`mactuner.export.export_gguf` writes ``NAME.gguf``, :func:`make_receipt` runs the
same prompts greedily through the merged torch model (float32, transformers) and through
llama.cpp on the file (llama-cpp-python), and writes ``NAME.receipt.json`` beside it. For a
16-bit file (f16, bf16) the torch model's weights are first rounded to that type, as the file
stores them: the comparison then finds what the conversion changed, not the rounding the person
chose (on the demo's f16 file: 16/16 tokens on all 4 prompts against the rounded weights, one
prompt parting at token 11 against the float32 ones, a near-tie):

- for each of :data:`RECEIPT_PROMPTS` (chat questions through the model's template): the first
  ``k`` greedy token ids of both, and how many of them agree from the start;
- the perplexity of both on validation rows (the run's held-out rows when the adapter is in a
  run that held some out, else MacTuner's held-out text ``mactuner/demo/held_out.txt``);
- the quantisation type, the file's size and the torch weights' size, the versions used;
- whether the Ollama Modelfile's TEMPLATE (with its SYSTEM) renders the same prompt as the
  model's chat template (:func:`render_ollama_template`);
- the verdict: ``failed`` when llama.cpp, fed the torch model's own greedy tokens, picks the same
  next token in fewer than :data:`MIN_AGREEMENT` of the choices (a near-tie flipped by rounding
  does not cascade this way), or its perplexity exceeds torch's by more than
  :data:`MAX_PERPLEXITY_RATIO` for the file's type, or the Modelfile's prompt differs; else ``ok``.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

RECEIPT_PROMPTS = ("What is the capital of France?", "Tell me about the sea.", "Who wrote Romeo and Juliet?",
                   "Give me three tips for staying healthy.")
RECEIPT_TOKENS = 16
# share of the k next-token choices (both runtimes fed the torch model's greedy tokens) that must agree:
# one near-tie flipped by rounding must not fail a file, a file that computes something else must
MIN_AGREEMENT = {"f16": 0.9, "bf16": 0.85, "q8_0": 0.75}
# llama.cpp's perplexity / torch's, at most (16-bit files compute nearly alike; 8-bit blocks lose a little)
MAX_PERPLEXITY_RATIO = {"f16": 1.02, "bf16": 1.05, "q8_0": 1.10}
# the file types that store every weight in a 16-bit float (the reference model's weights are rounded alike)
STORED_DTYPES = {"f16": "float16", "bf16": "bfloat16"}
PERPLEXITY_ROWS = 4
PERPLEXITY_TOKENS = 256


def receipt_path(gguf_path: str | os.PathLike) -> Path:
    """``NAME.receipt.json`` beside ``NAME.gguf``."""
    path = Path(gguf_path)
    return path.with_name(path.name[: -len(".gguf")] + ".receipt.json")


# ---------------------------------------------------------------- the Modelfile's template


_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def render_ollama_template(template: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """Render an Ollama (Go text/template) TEMPLATE of the ChatML kind: ``{{ .System }}``, ``{{ if .X }}``,
    ``{{ range .Messages }}`` with ``{{ .Role }}`` / ``{{ .Content }}``, ``{{ end }}``, and the ``{{-``/``-}}``
    whitespace trims. Enough to check what Ollama will send; an action outside this subset raises ValueError."""
    # text and actions in order, with the trims applied to the text beside them
    parts: list[tuple[str, str]] = []
    position = 0
    for match in _ACTION.finditer(template):
        before = template[position : match.start()]
        parts.append(("text", before.rstrip() if match.group(1) else before))
        parts.append(("action", match.group(2)))
        position = match.end()
        if match.group(3):
            while position < len(template) and template[position].isspace():
                position += 1
    parts.append(("text", template[position:]))

    def run(index: int, scope: dict[str, Any], out: list[str]) -> int:
        while index < len(parts):
            kind, value = parts[index]
            if kind == "text":
                out.append(value)
                index += 1
                continue
            if value == "end":
                return index + 1
            if value.startswith("if "):
                inner: list[str] = []
                after = run(index + 1, scope, inner)
                if scope.get(value[3:].strip().lstrip(".")):
                    out.extend(inner)
                index = after
            elif value.startswith("range "):
                items = scope.get(value[6:].strip().lstrip("."), [])
                after = None
                for item in items or [None]:
                    inner = []
                    after = run(index + 1, {**scope, **(item or {})}, inner)
                    if item is not None:
                        out.extend(inner)
                index = after
            elif value.startswith("."):
                out.append(str(scope.get(value[1:], "")))
                index += 1
            else:
                raise ValueError(f"template action {value!r} is not supported by this renderer")
        return index

    out: list[str] = []
    scope = {"System": system or "", "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    run(0, scope, out)
    return "".join(out)


def modelfile_parts(text: str) -> tuple[str | None, str | None]:
    """``(TEMPLATE, SYSTEM)`` of a Modelfile written by MacTuner (``None`` where absent)."""
    template = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""', text, re.S | re.M)
    return (template.group(1) if template else None), (system.group(1) if system else None)


def modelfile_matches(modelfile: str, tokenizer) -> bool | None:
    """Whether the Modelfile's TEMPLATE and SYSTEM render a conversation as the tokenizer's chat template does
    (``None`` when the Modelfile has no TEMPLATE: Ollama then reads the template from the GGUF itself)."""
    template, system = modelfile_parts(modelfile)
    if template is None:
        return None
    messages = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "What is the capital of France?"}]
    theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return render_ollama_template(template, system, messages) == theirs


# ---------------------------------------------------------------- both runtimes


def _torch_greedy(model, ids: list[int], k: int) -> list[int]:
    """k greedy tokens (the end-of-text token included when it is the likeliest: no early stop)."""
    import torch

    tokens: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(k):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def _llama_greedy(llama, ids: list[int], k: int) -> list[int]:
    import numpy as np

    llama.reset()
    llama.eval(ids)
    tokens: list[int] = []
    for _ in range(k):
        token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
        tokens.append(token)
        llama.eval([token])
    return tokens


def _llama_forced(llama, ids: list[int], tokens: list[int]) -> list[int]:
    """llama.cpp's greedy choice at each of ``tokens``' positions, fed ``tokens`` (not its own choices)."""
    import numpy as np

    llama.reset()
    llama.eval(ids + tokens[:-1])
    return [int(np.argmax(llama.scores[len(ids) - 1 + i])) for i in range(len(tokens))]


def _log_softmax_nll(logits, targets) -> float:
    import numpy as np

    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def _perplexities(model, llama, rows: list[list[int]]) -> tuple[float, float]:
    import numpy as np
    import torch

    torch_nll = llama_nll = 0.0
    count = 0
    for ids in rows:
        if len(ids) < 2:
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().numpy()
        targets = np.array(ids[1:])
        torch_nll += _log_softmax_nll(logits, targets)
        llama.reset()
        llama.eval(ids)
        llama_nll += _log_softmax_nll(np.array(llama.scores[: len(ids) - 1]), targets)
        count += len(targets)
    if not count:
        return math.nan, math.nan
    return math.exp(torch_nll / count), math.exp(llama_nll / count)


def _validation_texts(tokenizer, adapter: Path | None) -> tuple[list[list[int]], str]:
    """Token rows to measure perplexity on, and what they are."""
    if adapter is not None:
        from mactuner.data import DatasetError
        from mactuner.evaluate import evaluation_rows, run_folder_of

        if run_folder_of(adapter) is not None:
            try:
                examples, dataset, source, _ = evaluation_rows(adapter)
                texts = [tokenizer.apply_chat_template(e.messages, tokenize=False) for e in examples if e.messages]
                if texts:
                    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:PERPLEXITY_TOKENS] for t in texts]
                    return rows[:PERPLEXITY_ROWS], f"{source} of {Path(dataset).name}"
            except (ValueError, OSError, DatasetError):
                pass  # no held-out rows (or the dataset is gone): the held-out text below
    from mactuner.data import DEMO_DIR

    text = (DEMO_DIR / "held_out.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [ids[i : i + PERPLEXITY_TOKENS] for i in range(0, len(ids), PERPLEXITY_TOKENS)][:PERPLEXITY_ROWS]
    return rows, "mactuner/demo/held_out.txt (Wikipedia text, not trained on)"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or sum(p.stat().st_size for p in folder.glob("*.bin"))


def make_receipt(gguf_path: str | os.PathLike, torch_dir: str | os.PathLike, *, outtype: str,
                 adapter: str | os.PathLike | None = None, modelfile: str | os.PathLike | None = None,
                 k: int = RECEIPT_TOKENS, prompts: tuple[str, ...] = RECEIPT_PROMPTS) -> dict[str, Any]:
    """Compare the GGUF in llama.cpp with the torch model in ``torch_dir``; the receipt as a dict (not written).

    Raises:
        RuntimeError: llama.cpp is missing (the message says how to install it).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mactuner.chat.llamacpp import llama_cpp_missing_reason
    from mactuner.devices import parse_dtype

    if reason := llama_cpp_missing_reason():
        raise RuntimeError(reason)
    import llama_cpp

    started = time.perf_counter()
    gguf_path, torch_dir = Path(gguf_path), Path(torch_dir)
    tokenizer = AutoTokenizer.from_pretrained(torch_dir)
    model = AutoModelForCausalLM.from_pretrained(torch_dir, dtype=torch.float32).eval()
    stored = STORED_DTYPES.get(outtype)
    if stored is not None:
        rounded = parse_dtype(stored)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.to(rounded).to(torch.float32))
    reference = f"torch float32, weights rounded to {outtype} as the file stores them" if stored else "torch float32"
    rows, rows_source = _validation_texts(tokenizer, Path(adapter) if adapter else None)
    n_ctx = max(512, max((len(r) for r in rows), default=0) + 8)
    llama = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, verbose=False,
                            n_threads=max(1, min(4, os.cpu_count() or 1)))
    try:
        compared = []
        for question in prompts:
            ids = list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                     return_dict=True)["input_ids"])
            ours, theirs = _torch_greedy(model, ids, k), _llama_greedy(llama, ids, k)
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), k)
            agree = sum(a == b for a, b in zip(ours, _llama_forced(llama, ids, ours)))
            compared.append({"prompt": question, "identical_tokens": same, "agreeing_choices": agree,
                             "torch_tokens": ours, "llama_cpp_tokens": theirs,
                             "torch_text": tokenizer.decode(ours, skip_special_tokens=True),
                             "llama_cpp_text": tokenizer.decode(theirs, skip_special_tokens=True)})
        torch_ppl, llama_ppl = _perplexities(model, llama, rows)
    finally:
        llama.close()
    full = sum(c["identical_tokens"] == k for c in compared)
    agreement = sum(c["agreeing_choices"] for c in compared) / max(1, k * len(compared))
    needed = MIN_AGREEMENT.get(outtype, 0.75)
    ratio = llama_ppl / torch_ppl if torch_ppl and not math.isnan(torch_ppl) else math.nan
    template_ok = modelfile_matches(Path(modelfile).read_text(encoding="utf-8"), tokenizer) if modelfile else None
    limit = MAX_PERPLEXITY_RATIO.get(outtype, 1.10)
    problems = []
    if agreement < needed:
        problems.append(f"llama.cpp picks the torch model's next token in only {agreement:.0%} of "
                        f"{k * len(compared)} choices (at least {needed:.0%} for {outtype})")
    if not math.isnan(ratio) and ratio > limit:
        problems.append(f"llama.cpp's perplexity is {ratio:.3f}x torch's (at most {limit}x for {outtype})")
    if template_ok is False:
        problems.append("the Ollama Modelfile's TEMPLATE renders another prompt than the model's chat template")
    return {
        "verdict": "failed" if problems else "ok",
        "problems": problems,
        "rule": (f"failed when llama.cpp, fed the torch model's greedy tokens, picks the same next token in fewer "
                 f"than the type's share of the choices ({MIN_AGREEMENT}), or its perplexity exceeds torch's by more "
                 f"than the type's limit ({MAX_PERPLEXITY_RATIO}), or the Modelfile's template renders another prompt"),
        "reference": reference,
        "agreement": round(agreement, 4),
        "k": k,
        "prompts_identical": f"{full}/{len(compared)}",
        "first_k_identical": f"{min((c['identical_tokens'] for c in compared), default=0)}/{k}",
        "prompts": compared,
        "perplexity": {"torch": round(torch_ppl, 4), "llama_cpp": round(llama_ppl, 4),
                       "ratio": None if math.isnan(ratio) else round(ratio, 4), "rows": len(rows),
                       "rows_source": rows_source, "max_ratio": limit},
        "modelfile_template_matches": template_ok,
        "quant_type": outtype,
        "gguf_file": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        "torch_bytes": _folder_bytes(torch_dir),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "converter": _converter_pin()},
        "seconds": round(time.perf_counter() - started, 1),
        "created": time.time(),
    }


def _converter_pin() -> str:
    from mactuner.export.convert import CONVERTER_PIN

    return CONVERTER_PIN


def write_receipt(gguf_path: str | os.PathLike, receipt: dict[str, Any]) -> Path:
    """Write ``NAME.receipt.json`` beside the file (atomically)."""
    from mactuner import fileio

    return fileio.write_json_atomic(receipt_path(gguf_path), receipt)


def load_receipt(gguf_path: str | os.PathLike) -> dict[str, Any] | None:
    """The receipt beside ``NAME.gguf``, or ``None``."""
    import json

    try:
        return json.loads(receipt_path(gguf_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
