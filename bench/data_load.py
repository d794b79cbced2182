"""Dataset loading time: a JSON array against the same rows as JSONL, as the file grows.

Issue 9 row 14: a JSON-array dataset growing 2.5k -> 10k rows took 0.43 s -> 6.0 s
(each row's line number was counted from the start of the file: quadratic) while
the same rows as JSONL took 0.14 s. A linear reader keeps the "x2.5k" column near
the row ratio (2, 4) and the JSON/JSONL column near a constant.

Rows are Alpaca records written with ``json.dump(indent=2)`` (as most tools save
them); each time is the best of ``--repeat`` loads with :func:`mactuner.data.load_dataset_file`.

    .venv/bin/python -m bench.data_load [--sizes 2500 5000 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mactuner.data import load_dataset_file


def rows(count: int) -> list[dict]:
    return [
        {"instruction": f"Question {i}: what does the Quenmark almanac say about day {i}?",
         "input": "" if i % 3 else f"Context for {i}: " + "lorem ipsum " * 20,
         "output": f"On day {i} the almanac records fair weather and {i % 7} ships in Lumetta harbour."}
        for i in range(count)
    ]


def best_of(path: Path, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        load = load_dataset_file(path)
        best = min(best, time.perf_counter() - started)
    assert load.problems == [], load.problems[:3]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            data = rows(size)
            array = Path(folder, f"rows-{size}.json")
            array.write_text(json.dumps(data, indent=2))
            lines = Path(folder, f"rows-{size}.jsonl")
            lines.write_text("".join(json.dumps(r) + "\n" for r in data))
            results.append((size, best_of(array, args.repeat), best_of(lines, args.repeat)))
    base_size, base_array, base_lines = results[0]
    print(f"{'rows':>7}  {'JSON array (s)':>14}  {'JSONL (s)':>9}  {'JSON/JSONL':>10}  "
          f"{'array x' + str(base_size):>12}  {'JSONL x' + str(base_size):>12}")
    for size, array_s, lines_s in results:
        print(f"{size:>7}  {array_s:>14.3f}  {lines_s:>9.3f}  {array_s / lines_s:>10.2f}  "
              f"{array_s / base_array:>12.2f}  {lines_s / base_lines:>12.2f}")


if __name__ == "__main__":
    main()
