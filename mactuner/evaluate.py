"""Evaluate a fine-tune: what changed between the base model and the tuned one, and compare runs.

:func:`evaluate` measures, on the same rows, the loss and perplexity of the base
model and of the tuned model (taken over the answer tokens only, as the trainer's
validation loss is), then asks both models up to ``max_prompts`` of the rows'
questions greedily and puts their answers beside the reference answer. When the
references are short (at most :data:`SHORT_REFERENCE_WORDS` words) it also scores
them: *exact match* (the same words, ignoring case and punctuation) and *keyword hit*
(every word of the reference that the question does not already contain, stop words
aside, appears in the answer: "The capital of Quenmark is Lumetta." asked as "What
is the capital of Quenmark?" needs "Lumetta").

The rows are the run's own validation rows (the same split the trainer made, from
the run's config) unless a dataset file is given; a run trained without a validation
split is evaluated on its training rows, and the result says so.

:func:`save_eval` writes ``RUN/eval.json`` atomically; :func:`compare_runs` gathers
settings, final losses and eval results of several runs for the Compare view.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mactuner import fileio
from mactuner.adapters import is_adapter
from mactuner.models import Progress

EVAL_FILE = "eval.json"
SHORT_REFERENCE_WORDS = 16
STOP_WORDS = frozenset(
    "a an the of in on at to for and or is are was were be been by with as it its this that these those from "
    "what which who whom whose when where why how do does did i you he she we they me my your our their".split()
)


@dataclass
class AnswerRow:
    """One prompt asked to both models."""

    prompt: str
    reference: str
    base_answer: str
    tuned_answer: str
    base_exact: bool | None = None
    tuned_exact: bool | None = None
    base_keyword: bool | None = None
    tuned_keyword: bool | None = None


@dataclass
class EvalResult:
    """Base versus tuned on the same rows; lower loss and perplexity are better."""

    adapter: str
    base: str
    dataset: str
    rows_source: str  # "validation rows", "training rows (…)" or "file"
    rows: int  # rows whose loss was measured
    base_loss: float
    tuned_loss: float
    base_perplexity: float
    tuned_perplexity: float
    answers: list[AnswerRow] = field(default_factory=list)
    short_references: bool = False
    base_exact_match: float | None = None  # shares of the asked prompts (None when references are long)
    tuned_exact_match: float | None = None
    base_keyword_hit: float | None = None
    tuned_keyword_hit: float | None = None
    device: str = ""
    seconds: float = 0.0
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict` (unknown keys are ignored: older or newer files still read)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["answers"] = [AnswerRow(**a) for a in known.get("answers", [])]
        return cls(**known)

    def summary(self) -> dict[str, Any]:
        """The headline figures, one row per model."""
        rows = []
        for who in ("base", "tuned"):
            rows.append({
                "model": who,
                "loss": round(getattr(self, f"{who}_loss"), 4),
                "perplexity": round(getattr(self, f"{who}_perplexity"), 2),
                "exact match": _pct(getattr(self, f"{who}_exact_match")),
                "keyword hit": _pct(getattr(self, f"{who}_keyword_hit")),
            })
        return {"rows": rows}


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.0f} %"


# ---------------------------------------------------------------- scoring


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def exact_match(answer: str, reference: str) -> bool:
    """The same words in the same order, ignoring case, punctuation and spacing."""
    return _words(answer) == _words(reference)


def reference_keywords(reference: str, prompt: str) -> list[str]:
    """The reference's words that carry the answer: not in the prompt, not stop words."""
    asked = set(_words(prompt))
    return [w for w in dict.fromkeys(_words(reference)) if w not in asked and w not in STOP_WORDS]


def keyword_hit(answer: str, reference: str, prompt: str) -> bool:
    """Every keyword of the reference appears in the answer (exact match when it has none)."""
    keywords = reference_keywords(reference, prompt)
    if not keywords:
        return exact_match(answer, reference)
    said = set(_words(answer))
    return all(k in said for k in keywords)


# ---------------------------------------------------------------- rows


def run_folder_of(adapter: str | os.PathLike) -> Path | None:
    """The run folder holding ``adapter`` (``RUN/adapter`` or ``RUN/checkpoints/step-N``), if it is one."""
    path = Path(adapter).expanduser().resolve()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run if (run / "config.yaml").is_file() else None


def evaluation_rows(adapter: str | os.PathLike, dataset: str | os.PathLike | None = None):
    """``(examples, dataset path, rows_source, max_length)`` to evaluate on.

    Raises:
        ValueError: no dataset was given and the adapter is not inside a run folder.
    """
    from mactuner.config import TrainConfig
    from mactuner.data import load_dataset_file, train_validation_split

    run = run_folder_of(adapter)
    config = TrainConfig.load(run / "config.yaml") if run else None
    max_length = config.max_length if config else 512
    if dataset is not None:
        load = load_dataset_file(dataset)
        return load.examples, str(dataset), "file", max_length
    if config is None:
        raise ValueError(f"{adapter} is not inside a run folder (no config.yaml beside it); pass --dataset FILE.")
    if config.preference:
        raise ValueError(
            f"This run trained with objective {config.objective} on preference pairs, which have no single answer to "
            "compare losses on: its held-out rewards and preference accuracy are in the run's validation records (the "
            "Preference accuracy chart). To compare answers, evaluate on a question/answer file (--dataset FILE)."
        )
    load = load_dataset_file(config.dataset, config.dataset_format)
    train, validation = train_validation_split(load.examples, config.val_fraction, config.seed)
    if validation:
        return validation, config.dataset, "validation rows", max_length
    return train, config.dataset, "training rows (the run had no validation split)", max_length


# ---------------------------------------------------------------- measuring


def answer_loss(loaded, rows: list[dict[str, list[int]]]) -> float:
    """Mean cross-entropy per trained token over tokenized rows (``labels`` -100 where no loss is taken)."""
    import torch

    from mactuner.data import IGNORE_INDEX

    total, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=loaded.device)
            labels = torch.tensor([row["labels"]], device=loaded.device)
            logits = loaded.model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            keep = target != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    if count == 0:
        raise ValueError("no row has answer tokens to measure a loss on")
    return total / count


def _load_tuned(adapter: Path, base: str | None, device):
    from mactuner.chat import load_chat_model
    from mactuner.quantize import load_variant

    if is_adapter(adapter):
        # exact weights on both sides: the comparison measures the fine-tune, not the chat engine's storage
        return load_chat_model(base, adapter, device=device, decode_weights="exact")
    if (adapter / "config.json").is_file():  # a full fine-tuning run's folder: a whole model
        return load_variant(adapter, device=device)
    raise FileNotFoundError(f"{adapter} is neither an adapter (adapter_config.json) nor a model folder (config.json).")


def _base_source(adapter: Path, model: str | None) -> str | None:
    from mactuner.adapters import base_model_for
    from mactuner.config import TrainConfig

    if model:
        return model
    if is_adapter(adapter):
        return base_model_for(None, adapter)
    run = run_folder_of(adapter)
    return TrainConfig.load(run / "config.yaml").model if run else None


def evaluate(
    adapter: str | os.PathLike,
    dataset: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    device=None,
    max_prompts: int = 8,
    max_rows: int = 200,
    max_new_tokens: int = 48,
    progress: Progress | None = None,
) -> EvalResult:
    """Base versus tuned: loss, perplexity and answers on the run's validation rows (or ``dataset``).

    Args:
        adapter: ``RUN/adapter``, ``RUN/checkpoints/step-N``, or a full fine-tuning run's model folder.
        dataset: rows to evaluate on instead of the run's validation rows.
        model: the base model; default the one the adapter (or run) recorded.
        device: where to run; resolved once.
        max_prompts: prompts asked to both models for the side-by-side table (0: none).
        max_rows: most rows whose loss is measured.
        max_new_tokens: longest answer per prompt.
        progress: ``(message, fraction or None)`` callback.
    """
    from mactuner.chat import GenerationSettings, chat, load_chat_model
    from mactuner.data import tokenize_examples
    from mactuner.devices import resolve_device
    from mactuner.models import release_model

    started = time.perf_counter()
    device = resolve_device(device)
    adapter = Path(adapter).expanduser()
    from mactuner.file_checks import check_adapter_files

    check_adapter_files(adapter)  # a damaged weights file is said before minutes of work, not after
    examples, dataset_name, rows_source, max_length = evaluation_rows(adapter, dataset)
    examples = examples[:max_rows]
    if not examples:
        raise ValueError(f"{dataset_name} has no rows to evaluate on")
    asked = [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"][:max_prompts]
    base_source = _base_source(adapter, model)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    figures: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}
    for index, who in enumerate(("base", "tuned")):
        if progress:
            progress(f"Loading the {who} model…", index / 2)
        loaded = (load_chat_model(base_source, device=device, decode_weights="exact") if who == "base"
                  else _load_tuned(adapter, model, device))
        try:
            rows = tokenize_examples(examples, loaded.tokenizer, max_length, True, [])
            if progress:
                progress(f"Measuring the {who} model's loss on {len(rows)} rows…", index / 2 + 0.1)
            figures[who] = answer_loss(loaded, rows)
            answers[who] = []
            for i, example in enumerate(asked):
                if progress:
                    progress(f"{who} model answers prompt {i + 1} of {len(asked)}…", index / 2 + 0.2 + 0.3 * i / max(1, len(asked)))
                answers[who].append(chat(loaded, example.messages[:-1], settings)[0].strip())
        finally:
            release_model(loaded)
            del loaded
    table = []
    for i, example in enumerate(asked):
        prompt = next((m["content"] for m in reversed(example.messages[:-1]) if m["role"] == "user"), "")
        table.append(AnswerRow(prompt, example.messages[-1]["content"], answers["base"][i], answers["tuned"][i]))
    short = bool(table) and all(len(_words(r.reference)) <= SHORT_REFERENCE_WORDS for r in table)
    result = EvalResult(
        adapter=str(adapter), base=str(base_source), dataset=dataset_name, rows_source=rows_source, rows=len(examples),
        base_loss=figures["base"], tuned_loss=figures["tuned"], base_perplexity=math.exp(min(figures["base"], 50)),
        tuned_perplexity=math.exp(min(figures["tuned"], 50)), answers=table, short_references=short,
        device=str(device), created=time.time(),
    )
    if short:
        for row in table:
            row.base_exact, row.tuned_exact = exact_match(row.base_answer, row.reference), exact_match(row.tuned_answer, row.reference)
            row.base_keyword = keyword_hit(row.base_answer, row.reference, row.prompt)
            row.tuned_keyword = keyword_hit(row.tuned_answer, row.reference, row.prompt)
        n = len(table)
        result.base_exact_match = sum(r.base_exact for r in table) / n
        result.tuned_exact_match = sum(r.tuned_exact for r in table) / n
        result.base_keyword_hit = sum(r.base_keyword for r in table) / n
        result.tuned_keyword_hit = sum(r.tuned_keyword for r in table) / n
    result.seconds = time.perf_counter() - started
    if progress:
        progress("Done.", 1.0)
    return result


def save_eval(result: EvalResult, run_dir: str | os.PathLike | None = None) -> Path | None:
    """Write ``RUN/eval.json`` (atomically) for the run holding the adapter; ``None`` outside a run."""
    run = Path(run_dir) if run_dir else run_folder_of(result.adapter)
    if run is None:
        return None
    return fileio.write_json_atomic(run / EVAL_FILE, result.to_dict())


def load_eval(run_dir: str | os.PathLike) -> EvalResult | None:
    """The run's saved evaluation, or ``None`` when it has none (or it cannot be read)."""
    try:
        return EvalResult.from_dict(fileio.read_regular_json(Path(run_dir) / EVAL_FILE))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


# ---------------------------------------------------------------- comparing runs


COMPARED_SETTINGS = ("model", "method", "dataset", "learning_rate", "lora_rank", "lora_alpha", "batch_size",
                     "grad_accum", "max_steps", "epochs", "max_length", "lr_scheduler", "val_fraction", "seed")


def compare_runs(run_ids: list[str]) -> list[dict[str, Any]]:
    """One row per run: its settings, final train and validation loss, and its eval results (if saved)."""
    from mactuner import runs

    rows = []
    for run_id in run_ids:
        run = runs.get_run(run_id)
        try:
            from mactuner.safe_yaml import load_yaml_file

            config = load_yaml_file(run.path / "config.yaml") or {}
        except (OSError, ValueError):
            config = {}
        config = config if isinstance(config, dict) else {}
        result = load_eval(run.path)
        row: dict[str, Any] = {"run": run.id, "state": run.state, "steps": run.step}
        row.update({name: config.get(name) for name in COMPARED_SETTINGS})
        row["dataset"] = Path(str(row.get("dataset") or "")).name or None
        row["model"] = Path(str(row.get("model") or "")).name or None
        row["final loss"] = (run.last_metrics or {}).get("loss")
        row["final val loss"] = (run.last_eval or {}).get("val_loss")
        row["eval base loss"] = None if result is None else round(result.base_loss, 4)
        row["eval tuned loss"] = None if result is None else round(result.tuned_loss, 4)
        row["eval keyword hit"] = None if result is None else _pct(result.tuned_keyword_hit)
        rows.append(row)
    return rows


def loss_curves_figure(run_ids: list[str], max_points: int = 500):
    """Plotly figure: training loss (solid) and validation loss (dotted) of each run against its step."""
    import plotly.graph_objects as go

    from mactuner import runs

    figure = go.Figure()
    for run_id in run_ids:
        tail = runs.MetricsTail(runs.run_path(run_id))
        tail.update()
        xs, ys = tail.series("loss", "train", max_points=max_points)
        figure.add_trace(go.Scatter(x=xs, y=ys, name=f"{run_id} train", mode="lines"))
        vx, vy = tail.series("val_loss", "eval", max_points=max_points)
        if vx:
            figure.add_trace(go.Scatter(x=vx, y=vy, name=f"{run_id} validation", mode="lines+markers", line={"dash": "dot"}))
    figure.update_layout(height=360, margin=dict(l=20, r=20, t=40, b=20), title="Loss by step",
                         xaxis_title="step", yaxis_title="loss")
    return figure
