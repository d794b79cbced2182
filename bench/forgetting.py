"""What the demo keeps and what it learns, for several settings: the table behind docs/benchmarks.md#forgetting.

Each setting trains the README demo (``train --dataset mactuner/demo/quenmark_alpaca.json
--recommended``) with the overrides given, in its own process, on the CPU. The run's own
forgetting check gives "kept N of M" (the general questions the base model answered right); the
tuned model is then asked the 10 demo facts as trained and paraphrased, greedily. The first row
is always the recommendation unchanged: the baseline the others are read against.

    .venv/bin/python -m bench.forgetting "learning_rate=7e-4" "replay_rows=64,max_steps=80" ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def flags(setting: str) -> list[str]:
    """``a=1,b_c=2`` as CLI flags: ``--a 1 --b-c 2``."""
    out = []
    for pair in filter(None, setting.split(",")):
        name, value = pair.split("=", 1)
        out += [f"--{name.strip().replace('_', '-')}", value.strip()]
    return out


def measure(setting: str, folder: Path) -> dict:
    from mactuner.chat import load_chat_model
    from mactuner.data import DEMO_DATASETS, DEMO_FACTS
    from mactuner.evaluation.forgetting import greedy_answers, load_forgetting
    from mactuner.evaluation.matching import phrase_match
    from mactuner.models import release_model

    run = folder / (setting.replace(",", "_").replace("=", "-") or "recommended")
    argv = [sys.executable, "-m", "mactuner", "train", "--dataset", str(DEMO_DATASETS["quenmark-alpaca"]),
            "--recommended", "--device", "cpu", "--run-dir", str(run), "--quiet", *flags(setting)]
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    kept = load_forgetting(run)
    facts = json.loads(DEMO_FACTS.read_text())
    loaded = load_chat_model(None, run / "adapter", device="cpu", decode_weights="exact")
    try:
        answers = greedy_answers(loaded.model, loaded.tokenizer,
                                 [f["question"] for f in facts] + [f["unseen_question"] for f in facts], max_new_tokens=32)
    finally:
        release_model(loaded)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return {
        "setting": setting or "recommended",
        "kept": f"{kept.kept}/{kept.base_knew} ({kept.kept_share:.0%})",
        "facts": f"{sum(phrase_match(a, f['answer_keyword']) for a, f in zip(answers, facts))}/{len(facts)}",
        "paraphrased": f"{sum(phrase_match(a, f['answer_keyword']) for a, f in zip(answers[len(facts):], facts))}/{len(facts)}",
        "steps": len(steps),
        "seconds": round(seconds),
        "lost": [f"{q['question']} -> {q['tuned_answer'][:50]}" for q in kept.lost],
        "answers": answers,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", help="overrides of the recommendation, e.g. learning_rate=7e-4,replay_rows=64")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    from bench.machine import describe_machine, machine_line

    print(machine_line(describe_machine()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="mactuner-forgetting-") as folder:
        print("| settings | kept | facts | paraphrased | steps | seconds |\n|---|---|---|---|---|---|", flush=True)
        for setting in ["", *args.settings]:
            row = measure(setting, Path(folder))
            rows.append(row)
            print(f"| {row['setting']} | {row['kept']} | {row['facts']} | {row['paraphrased']} | {row['steps']} | "
                  f"{row['seconds']} |", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
