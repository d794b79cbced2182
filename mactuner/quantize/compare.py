"""Measure what each variant costs and gives (size, memory, speed, perplexity, a probe answer) and judge it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mactuner import fileio, paths
from mactuner.chat.engine import GenerationSettings, stream_chat
from mactuner.devices import resolve_device, tensor_memory_in_use
from mactuner.export.merge import adapter_label, merge_adapter
from mactuner.models import LoadedModel, Progress, loadable_path, release_model
from mactuner.quantize.methods import HELD_OUT_TEXT, PROBE, load_variant, quantize, supported_methods, unsupported_reason

# ---------------------------------------------------------------- measure


@dataclass
class VariantResult:
    """What one variant costs and how well it does."""

    name: str  # "base", "merged", or the quantization method
    path: str
    size_bytes: int  # on disk
    memory_bytes: int | None  # after loading: allocator delta on GPUs, weight + buffer bytes on CPU
    tokens_per_second: float | None
    time_to_first_token: float | None
    perplexity: float | None  # on the held-out text; lower is better
    answer: str  # its greedy answer to a fixed question
    load_seconds: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


@dataclass
class QuantizeReport:
    """All variants measured in one go, on one device, on one text."""

    device: str
    text_source: str
    text_tokens: int
    variants: list[VariantResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return {**asdict(self), "variants": [v.to_dict() for v in self.variants]}

    def table(self) -> list[dict[str, Any]]:
        """One row per variant with display units (MB, rounded figures) and its verdict."""
        verdicts = report_verdicts(self)
        return [
            {
                "variant": v.name,
                "size (MB)": round(v.size_bytes / 1e6, 1),
                "memory (MB)": None if v.memory_bytes is None else round(v.memory_bytes / 1e6, 1),
                "tokens/s": None if v.tokens_per_second is None else round(v.tokens_per_second, 1),
                "perplexity": None if v.perplexity is None else round(v.perplexity, 2),
                "answer": v.answer if v.error is None else f"error: {v.error}",
                "verdict": verdicts[v.name].text,
            }
            for v in self.variants
        ]


# the verdict's limits (stated on the page and in the README). Quality: perplexity of a variant over its
# reference's; speed: its tokens/s over the reference's; size: the reference's bytes on disk over its own.
VERDICT_THRESHOLDS = ((1.05, "good"), (1.25, "acceptable"), (1.5, "worse"))
SPEED_MARGIN = 1.1  # faster or slower only beyond 10 %: one short answer's timing is noisy
SIZE_MARGIN = 1.2  # smaller or larger only beyond 20 %


@dataclass(frozen=True)
class Verdict:
    """Whether a variant is worth using against the unquantized reference, weighing quality, speed and size.

    ``level`` is one of ``"reference"``, ``"recommended"`` (as good, and faster or smaller without being
    slower), ``"trade-off"`` (faster or smaller, paid for in speed or a little quality), ``"check its
    answers"`` (quality clearly worse), ``"not recommended"`` (quality far worse, whatever it gains),
    ``"no gain"`` (neither faster nor smaller), ``"failed"`` or ``"unknown"``. ``favoured`` names what the
    variant gains (``"speed"``, ``"size"``) and ``costs`` what it pays (``"speed"``, ``"quality"``).
    """

    level: str
    text: str  # e.g. "perplexity +3 %, 2.0× smaller, 1.7× slower: a trade-off: favours size over speed"
    ratio: float | None = None  # variant perplexity / reference perplexity
    favoured: tuple[str, ...] = ()
    costs: tuple[str, ...] = ()


def _quality(ratio: float) -> str:
    return next((level for limit, level in VERDICT_THRESHOLDS if ratio <= limit), "poor")


def _speed_text(speed: float | None) -> str | None:
    if speed is None:
        return None
    if speed >= SPEED_MARGIN:
        return f"{speed:.1f}× faster"
    return f"{1 / speed:.1f}× slower" if speed <= 1 / SPEED_MARGIN else "same speed"


def _size_text(size: float | None) -> str | None:
    if size is None:
        return None
    if size >= SIZE_MARGIN:
        return f"{size:.1f}× smaller"
    return f"{1 / size:.1f}× larger" if size <= 1 / SIZE_MARGIN else "same size"


def variant_verdict(variant: VariantResult, reference: VariantResult | None) -> Verdict:
    """A one-line verdict for ``variant`` against ``reference`` that weighs quality, speed and size, and says
    which it favoured.

    Quality is the perplexity ratio: within 5 % *good*, within 25 % *acceptable*, within 50 % *worse*,
    beyond *poor*. Speed counts beyond ±10 % of the reference's tokens/s, size beyond ±20 % of its bytes.
    A variant that gains neither speed nor size is *no gain*; poor quality is *not recommended* and worse
    quality *check its answers* whatever it gains; good quality with no speed lost is *recommended*;
    anything else that gains is a *trade-off*. The text gives the figures, the verdict and what it
    favours over what (e.g. "favours size over speed").
    """
    if variant.error:
        return Verdict("failed", f"not made: {variant.error}")
    if reference is None or variant is reference:
        return Verdict("reference", "the reference the others are compared with")
    if variant.perplexity is None or not reference.perplexity:
        return Verdict("unknown", "no perplexity measured")
    ratio = variant.perplexity / reference.perplexity
    speed = (variant.tokens_per_second / reference.tokens_per_second
             if variant.tokens_per_second and reference.tokens_per_second else None)
    size = reference.size_bytes / variant.size_bytes if variant.size_bytes and reference.size_bytes else None
    quality = _quality(ratio)
    favoured = tuple(name for name, gain, margin in (("speed", speed, SPEED_MARGIN), ("size", size, SIZE_MARGIN))
                     if gain is not None and gain >= margin)
    costs = tuple(name for name, lost in (("speed", speed is not None and speed <= 1 / SPEED_MARGIN),
                                          ("size", size is not None and size <= 1 / SIZE_MARGIN),
                                          ("quality", quality != "good")) if lost)
    if not favoured:
        level = "no gain"
    elif quality == "poor":
        level = "not recommended"
    elif quality == "worse":
        level = "check its answers"
    elif costs:
        level = "trade-off"
    else:
        level = "recommended"
    change = f"{(ratio - 1) * 100:+.0f} %" if ratio < 1.5 else f"{ratio:.1f}× worse"
    figures = ", ".join(t for t in (f"perplexity {change}", _size_text(size), _speed_text(speed)) if t)
    if not favoured:
        why = f"neither faster nor smaller than {reference.name}"
    elif not costs:
        why = f"favours {' and '.join(favoured)} at no cost"
    else:
        why = f"favours {' and '.join(favoured)} over {' and '.join(costs)}"
    advice = {"trade-off": "a trade-off"}.get(level, level)
    return Verdict(level, f"{figures}: {advice}: {why}", ratio, favoured, costs)


def report_verdicts(report: QuantizeReport) -> dict[str, Verdict]:
    """Variant name → verdict, against the report's first (unquantized) variant."""
    reference = report.variants[0] if report.variants and report.variants[0].error is None else None
    return {v.name: variant_verdict(v, reference) for v in report.variants}


def report_highlights(report: QuantizeReport) -> str | None:
    """One line naming the fastest, the smallest and the best-perplexity variant (made ones only), e.g.
    ``fastest: int8-dynamic (51.2 tokens/s) · smallest: int4-weight-only (98 MB) · best perplexity: merged
    (23.30)``; None when fewer than two variants were measured."""
    made = [v for v in report.variants if v.error is None]
    if len(made) < 2:
        return None
    parts = []
    timed = [v for v in made if v.tokens_per_second]
    if timed:
        fast = max(timed, key=lambda v: v.tokens_per_second)
        parts.append(f"fastest: {fast.name} ({fast.tokens_per_second:.1f} tokens/s)")
    small = min(made, key=lambda v: v.size_bytes or float("inf"))
    parts.append(f"smallest: {small.name} ({small.size_bytes / 1e6:.0f} MB)")
    measured = [v for v in made if v.perplexity is not None]
    if measured:
        best = min(measured, key=lambda v: v.perplexity)
        parts.append(f"best perplexity: {best.name} ({best.perplexity:.2f})")
    return " · ".join(parts)


def folder_size(folder: str | os.PathLike) -> int:
    """Bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def held_out_text(max_chars: int = 8000) -> str:
    """The default held-out text: 8,000 characters of Wikipedia shipped in ``mactuner/demo/held_out.txt``."""
    if not HELD_OUT_TEXT.is_file():
        raise FileNotFoundError(f"held-out text not found at {HELD_OUT_TEXT}; pass your own text")
    text = HELD_OUT_TEXT.read_text(encoding="utf-8", errors="replace")
    return text[-max_chars:]


@torch.inference_mode()
def perplexity(loaded: LoadedModel, text: str, *, max_tokens: int = 1024, window: int = 512) -> tuple[float, int]:
    """Perplexity of ``text`` (its first ``max_tokens`` tokens) in non-overlapping windows: ``(ppl, tokens)``."""
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(loaded.device)
    if ids.shape[1] < 2:
        raise ValueError("the held-out text is too short to measure perplexity")
    total, count = 0.0, 0
    for start in range(0, ids.shape[1], window):
        chunk = ids[:, start : start + window]
        if chunk.shape[1] < 2:
            break
        logits = loaded.model(chunk).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total += loss.item()
        count += chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count))), int(ids.shape[1])


def _flat_tensors(value: Any):
    if isinstance(value, torch.Tensor):
        if hasattr(value, "__tensor_flatten__") and type(value) is not torch.nn.Parameter:
            names, _ = value.__tensor_flatten__()
            for name in names:
                yield from _flat_tensors(getattr(value, name))
        elif type(value) is torch.nn.Parameter and hasattr(value.data, "__tensor_flatten__"):
            yield from _flat_tensors(value.data)
        else:
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _flat_tensors(item)


def model_memory_bytes(model) -> int:
    """Bytes held by a model's weights and buffers, quantized ones included (shared storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for value in model.state_dict(keep_vars=True).values():
        for tensor in _flat_tensors(value):
            if tensor.is_quantized:
                key, size = (tensor.data_ptr(), 0), tensor.numel() * tensor.element_size()
            else:
                storage = tensor.untyped_storage()
                key, size = (storage.data_ptr(), storage.nbytes()), storage.nbytes()
            if key not in seen:
                seen.add(key)
                total += size
    return total


def measure_variant(
    name: str, folder: str | os.PathLike, *, device: str | torch.device | None = None, text: str, new_tokens: int = 32
) -> VariantResult:
    """Load a variant, read the memory it added, time an answer and compute perplexity; then free it."""
    device = resolve_device(device)
    release_model()
    before = tensor_memory_in_use(device)
    started = time.perf_counter()
    loaded = load_variant(folder, device=device)
    load_seconds = time.perf_counter() - started
    after = tensor_memory_in_use(device)
    memory = model_memory_bytes(loaded.model) if before is None or after is None else max(0, after - before)
    try:
        # a short warm-up answer first: the first forward passes pick kernels and allocate
        "".join(stream_chat(loaded, PROBE, GenerationSettings(temperature=0, max_new_tokens=2)))
        stream = stream_chat(loaded, PROBE, GenerationSettings(temperature=0, max_new_tokens=new_tokens))
        answer = "".join(stream).strip()
        ppl, _ = perplexity(loaded, text)
        return VariantResult(
            name, str(folder), folder_size(folder), memory, stream.stats.tokens_per_second,
            stream.stats.time_to_first_token, ppl, answer, load_seconds,
        )
    finally:
        release_model(loaded)
        del loaded
        release_model()


def compare_variants(
    source: str | None = None,
    methods: list[str] | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    text: str | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> QuantizeReport:
    """Make and measure the variants of a model: reference, then each quantization method.

    With ``adapter`` the adapter is merged first and the merged model is the
    reference that gets quantized. A method the device cannot run is recorded
    as a row with its reason, not raised. The report is also written to
    ``out_dir/report.json``.

    Args:
        source: base model (default: the built-in one) or a model folder.
        methods: quantization methods; default every method the device supports.
        adapter: optional adapter folder to merge first.
        device: where to quantize and measure.
        text: held-out text for perplexity; default a slice of ``wiki_demo.txt``.
        out_dir: folder for the variants; default ``exports_dir()/<model>-variants`` (for an adapter,
            ``<run>-step-N-variants``).
        overwrite: write into ``out_dir`` even if it holds files MacTuner did not create.
        progress: ``(message, fraction or None)`` callback.

    Raises:
        mactuner.fileio.OutputNotOurs: ``out_dir`` holds someone else's files and ``overwrite`` is False.
    """
    device = resolve_device(device)
    methods = list(methods) if methods is not None else supported_methods(device)
    text_source = "given text" if text is not None else str(HELD_OUT_TEXT)
    text = text if text is not None else held_out_text()
    if out_dir is None:
        label = adapter_label(adapter) if adapter else Path(loadable_path(source)).name
        out_dir = paths.exports_dir() / fileio.slug(f"{label}-variants")
    out_dir = fileio.prepare_output(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / fileio.MARKER_FILE).exists():
        fileio.mark_as_ours(out_dir, "quantized variants and their report", listing=False)
    steps = 1 + len(methods)

    def step(i: int, message: str) -> None:
        if progress:
            progress(message, i / steps)

    if adapter:
        step(0, "Merging the adapter…")
        reference_name, reference = "merged", merge_adapter(adapter, out_dir / "merged", base=source, overwrite=overwrite)
    else:
        reference_name, reference = "base", Path(loadable_path(source))
    report = QuantizeReport(str(device), text_source, 0)
    step(0, f"Measuring the {reference_name} model…")
    report.variants.append(measure_variant(reference_name, reference, device=device, text=text))
    for i, method in enumerate(methods, start=1):
        reason = unsupported_reason(method, device)
        if reason:
            report.variants.append(VariantResult(method, "", 0, None, None, None, None, "", 0.0, error=reason))
            continue
        step(i, f"Quantizing with {method}…")
        try:
            folder = quantize(str(reference), method, out_dir / method, device=device, overwrite=overwrite)
            step(i, f"Measuring {method}…")
            report.variants.append(measure_variant(method, folder, device=device, text=text))
        except Exception as exc:  # noqa: BLE001 - one failing method is a row in the table, not the end
            report.variants.append(VariantResult(method, "", 0, None, None, None, None, "", 0.0, error=str(exc)))
    with torch.inference_mode():
        report.text_tokens = len(_tokenizer_for(reference)(text)["input_ids"][:1024])
    fileio.write_json_atomic(out_dir / "report.json", report.to_dict())
    step(steps, "Done.")
    return report


def _tokenizer_for(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_report(path: str | os.PathLike) -> QuantizeReport:
    """Read a ``report.json`` written by :func:`compare_variants`."""
    data = json.loads(Path(path).read_text())
    variants = [VariantResult(**v) for v in data.pop("variants", [])]
    return QuantizeReport(**data, variants=variants)


def saved_reports() -> list[Path]:
    """``report.json`` files under ``exports_dir()``, newest first."""
    found = list(paths.exports_dir().glob("*/report.json"))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def report_figure(report: QuantizeReport):
    """A plotly figure: one bar panel per measure (size, memory, tokens/s, perplexity), one bar per variant."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = [v for v in report.variants if v.error is None]
    names = [v.name for v in rows]
    panels = [
        ("size on disk (MB)", [v.size_bytes / 1e6 for v in rows]),
        ("memory (MB)", [None if v.memory_bytes is None else v.memory_bytes / 1e6 for v in rows]),
        ("tokens/s (higher is better)", [v.tokens_per_second for v in rows]),
        ("perplexity (lower is better)", [v.perplexity for v in rows]),
    ]
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=[title for title, _ in panels])
    for column, (title, values) in enumerate(panels, start=1):
        figure.add_trace(
            go.Bar(x=names, y=values, name=title, text=[None if y is None else f"{y:.1f}" for y in values],
                   textposition="auto", showlegend=False),
            row=1, col=column,
        )
    figure.update_layout(height=360, margin=dict(l=20, r=20, t=40, b=20))
    return figure
