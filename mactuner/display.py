"""How figures and names read on screen: no ``None``, no snake_case keys, no 19-digit floats.

The pages pass their tables through :func:`table_for_people` before drawing them; the library's
own records keep full precision and their keys (JSON, CSV and the CLI read those).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

MISSING = "—"  # a figure that is not known (yet)
SIGNIFICANT_DIGITS = 4


def value_for_people(value: Any) -> Any:
    """``None`` and NaN become :data:`MISSING`; a float keeps 4 significant digits (``1.734``, ``0.0213``,
    ``1235``); anything else is returned as it is."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float) and not isinstance(value, bool):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return value


def key_for_people(key: str) -> str:
    """A record's key as a column or row heading: ``lora_rank`` → ``lora rank``."""
    return str(key).replace("_", " ")


def table_for_people(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their keys as headings and their values as people read them (see :func:`value_for_people`).

    A column with no missing value keeps its values' types (numbers sort as numbers); a column with a
    missing value holds text (figures and times formatted, :data:`MISSING` where unknown), since a
    table column holds one kind of value.
    """
    rows = [{key_for_people(k): value_for_people(v) for k, v in row.items()} for row in rows]
    columns = {k for row in rows for k in row}
    for column in columns:
        if any(row.get(column) == MISSING for row in rows):
            for row in rows:
                if column in row and not isinstance(row[column], str):
                    row[column] = _as_text(row[column])
    return rows


def _as_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 sample``, ``2 samples`` (``many`` for an irregular plural)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def health_rows(probes: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The device test's results (``devices.health(probe=True)["devices"]``) in words: whether each device
    passed, how fast its float32 matrix product ran, and how much faster its own number type is."""
    rows = []
    for probe in probes:
        row = {"device": str(probe.get("device", "?")),
               "test": "passed" if probe.get("ok") else f"failed: {probe.get('error') or 'unknown error'}"}
        if probe.get("float32_ms") is not None:
            gflops = probe.get("float32_gflops")
            speed = f", {gflops:g} billion operations a second" if gflops is not None else ""
            row["float32 speed"] = f"{probe['float32_ms']:g} ms per test product{speed}"
        dtype, speedup = probe.get("dtype"), probe.get("speedup_vs_float32")
        if dtype and speedup is not None and dtype != "float32":
            row[f"{dtype} speed"] = (f"{speedup:g}× faster than float32" if speedup >= 1
                                     else f"{1 / speedup:.2g}× slower than float32")
        rows.append(row)
    return rows
