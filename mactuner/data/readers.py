"""Dataset files (JSON, JSONL, CSV, Parquet, TXT) → rows → :class:`Example` in any of the five formats.

Formats are detected from the columns and can be forced. Bad data never crashes and is never dropped silently:
a row that cannot be used becomes a :class:`DataProblem` (file, line or row, what is wrong) in
``DatasetLoad.problems``; a file that cannot be read at all raises :class:`DatasetError` saying where and why.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mactuner.data.base import EXTENSIONS, FORMATS, DataProblem, DatasetError, DatasetLoad, Example

# what one dataset may hold: the app reads it into the process that serves every tab, so a small
# file that expands (an 84 KB Parquet file of one repeated row held 800,000 rows, 1.7 GB) is refused
# from what it says about itself before it is read
MAX_DATASET_ROWS = 200_000
MAX_DATASET_BYTES = 256 * 2**20  # the text (or a Parquet file's uncompressed data)

# ShareGPT speaker names → chat roles
_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    # a tool call is something the assistant says: it is trained on
    "function_call": "assistant",
    # what the tool answered comes from outside: never trained on
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


# ---------------------------------------------------------------------------
# reading files into rows


@dataclass
class _Row:
    """A raw record of a file with where it came from."""

    line: int
    value: Any


# byte-order marks, longest first (UTF-32-LE's starts with UTF-16-LE's)
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _read_text(path: Path) -> str:
    """The file's text: UTF-8 (with or without a BOM), or UTF-16/32 with a BOM (as Windows tools
    save "Unicode" text); binary and other encodings raise a DatasetError saying so."""
    data = path.read_bytes()
    if not data.strip():
        raise DatasetError(f"{path.name} is empty: it holds no rows.")
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(encoding)  # the codec reads and drops the BOM
            except UnicodeDecodeError:
                raise DatasetError(
                    f"{path.name}: starts like {encoding.upper()} text but cannot be decoded as it. "
                    "Re-save the file with UTF-8 encoding."
                ) from None
            if not text.strip():
                raise DatasetError(f"{path.name} is empty: it holds no rows.")
            return text
    if b"\x00" in data[:8192]:
        raise DatasetError(
            f"{path.name} looks like a binary file, not text (it contains NUL bytes). "
            f"Expected a {path.suffix or 'text'} file of training rows "
            "(UTF-16 text without a byte-order mark also looks like this: re-save it as UTF-8)."
        )
    try:
        return data.decode("utf-8-sig")  # utf-8-sig: tolerate the BOM that spreadsheet tools write
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"{path.name} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} cannot be decoded). "
            "Re-save the file with UTF-8 encoding."
        ) from None


def _json_error(path: Path, exc: json.JSONDecodeError, line_offset: int = 0) -> str:
    return f"{path.name} line {exc.lineno + line_offset}: invalid JSON ({exc.msg}: column {exc.colno})"


def _read_jsonl(path: Path, text: str, problems: list[DataProblem]) -> list[_Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(DataProblem(path.name, number, f"invalid JSON ({exc.msg}: column {exc.colno})"))
            continue
        rows.append(_Row(number, value))
    return rows


def _read_json(path: Path, text: str, problems: list[DataProblem]) -> list[_Row]:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        # one object per line saved as .json: read it as JSONL
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":
                return _read_jsonl(path, text, problems)
            raise DatasetError(_json_error(path, exc)) from None
        lists = [v for v in value.values() if isinstance(v, list)] if isinstance(value, dict) else []
        if len(lists) == 1 and all(isinstance(v, dict) for v in lists[0]):
            # {"data": [...]} or {"train": [...]}: the one list is the rows
            return [_Row(i + 1, v) for i, v in enumerate(lists[0])]
        return [_Row(1, value)]
    if not stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(_json_error(path, exc)) from None
        raise DatasetError(f"{path.name}: expected a JSON list of rows, found a single {type(json.loads(text)).__name__}.")
    # walk the array element by element so every row keeps its line number
    decoder = json.JSONDecoder()
    rows: list[_Row] = []
    pos = text.index("[") + 1
    length = len(text)
    # line numbers are counted forward from the previous row only: counting from the
    # start of the file for every row made a 10k-row array quadratic (6 s instead of 0.1 s)
    counted_to, line_no = 0, 1

    def line_of(i: int) -> int:
        nonlocal counted_to, line_no
        line_no += text.count("\n", counted_to, i)
        counted_to = i
        return line_no

    def skip_ws(i: int) -> int:
        while i < length and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < length and text[pos] == "]":
        return rows
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DatasetError(_json_error(path, exc)) from None
        rows.append(_Row(line_of(pos), value))
        pos = skip_ws(end)
        if pos < length and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < length and text[pos] == "]":
            tail = text[pos + 1 :].strip()
            if tail:
                raise DatasetError(f"{path.name} line {line_of(pos + 1)}: invalid JSON (extra data after the closing ']')")
            return rows
        line = line_of(pos)
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        found = "end of file" if pos >= length else repr(text[pos])
        raise DatasetError(f"{path.name} line {line}: invalid JSON (expected ',' or ']' but found {found}: column {column})")


def _read_csv(path: Path, text: str, problems: list[DataProblem]) -> list[_Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"{path.name} is empty: it holds no rows.") from None
    header = [h.strip() for h in header]
    if not any(header):
        raise DatasetError(f"{path.name} line 1: the header row is empty; the first line must name the columns.")
    rows = []
    start = reader.line_num + 1
    for record in reader:
        line = start
        start = reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            problems.append(
                DataProblem(path.name, line, f"has {len(record)} fields but the header names {len(header)} columns")
            )
            continue
        rows.append(_Row(line, dict(zip(header, record))))
    return rows


def _too_many(path: Path, rows: int) -> DatasetError:
    return DatasetError(
        f"{path.name} holds {rows:,} rows; MacTuner reads at most {MAX_DATASET_ROWS:,} rows from one dataset. "
        "Keep a sample of the rows in a smaller file (or split it) and choose that."
    )


def _too_big(path: Path, size: int, what: str) -> DatasetError:
    return DatasetError(
        f"{path.name} holds {size / 1e6:,.1f} MB of {what}; MacTuner reads at most {MAX_DATASET_BYTES / 1e6:,.0f} MB "
        "from one dataset. Keep a sample of the rows in a smaller file (or split it) and choose that."
    )


def _read_parquet(path: Path) -> list[_Row]:
    import pyarrow.parquet as pq

    try:
        # the footer says how many rows and how many bytes the file expands to: checked before reading
        metadata = pq.ParquetFile(path).metadata
        if metadata.num_rows > MAX_DATASET_ROWS:
            raise _too_many(path, metadata.num_rows)
        size = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        if size > MAX_DATASET_BYTES:
            raise _too_big(path, size, "data once uncompressed")
        table = pq.read_table(path)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DatasetError(f"{path.name}: not a readable Parquet file ({exc}).") from None
    return [_Row(i + 1, row) for i, row in enumerate(table.to_pylist())]


def _read_txt(path: Path, text: str) -> list[_Row]:
    # one example per non-empty line (as LLaMA-Factory's text datasets)
    return [_Row(n, {"text": line}) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _read_rows(path: Path, problems: list[DataProblem]) -> list[_Row]:
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DatasetError(f"{path.name}: unsupported file type {suffix or '(none)'}; use one of {', '.join(EXTENSIONS)}.")
    if suffix == ".parquet":
        if path.stat().st_size == 0:
            raise DatasetError(f"{path.name} is empty: it holds no rows.")
        return _read_parquet(path)
    size = path.stat().st_size
    if size > MAX_DATASET_BYTES:
        raise _too_big(path, size, "text")
    text = _read_text(path)
    if suffix == ".jsonl":
        rows = _read_jsonl(path, text, problems)
    elif suffix == ".json":
        rows = _read_json(path, text, problems)
    elif suffix == ".csv":
        rows = _read_csv(path, text, problems)
    else:
        rows = _read_txt(path, text)
    if len(rows) + len(problems) > MAX_DATASET_ROWS:
        raise _too_many(path, len(rows) + len(problems))
    return rows



# ---------------------------------------------------------------------------
# formats


def _detect_format(rows: Sequence[_Row]) -> str | None:
    """The format most of the first rows look like, or None."""
    votes: dict[str, int] = {}
    for row in rows[:50]:
        if not isinstance(row.value, dict):
            continue
        keys = set(row.value)
        if "messages" in keys and _looks_sharegpt(row.value["messages"]):
            fmt = "sharegpt"
        elif "messages" in keys:
            fmt = "messages"
        elif "conversations" in keys:
            fmt = "sharegpt"
        elif "instruction" in keys and "output" in keys:
            fmt = "alpaca"
        elif "prompt" in keys and "completion" in keys:
            fmt = "prompt_completion"
        elif "text" in keys:
            fmt = "text"
        else:
            continue
        votes[fmt] = votes.get(fmt, 0) + 1
    return max(votes, key=votes.get) if votes else None


def _looks_sharegpt(turns: Any) -> bool:
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


_REQUIRED = {
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


class _RowError(ValueError):
    """A row that cannot be used (the message says why)."""


def _string(value: Any, name: str, *, allow_empty: bool = False) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (pandas/CSV gaps)
        value = ""
    if not isinstance(value, str):
        if isinstance(value, (int, float)):
            value = str(value)
        else:
            raise _RowError(f"'{name}' should be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _RowError(f"'{name}' is empty")
    return value


def _parse_turns(turns: Any, column: str) -> list[dict[str, str]]:
    """ShareGPT (from/value) or OpenAI (role/content) turns → messages."""
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)  # a CSV cell holding JSON
        except json.JSONDecodeError as exc:
            raise _RowError(f"'{column}' is not a list of messages (invalid JSON: {exc.msg})") from None
    if not isinstance(turns, list) or not turns:
        raise _RowError(f"'{column}' should be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _RowError(f"'{column}' message {i + 1} is not an object")
        speaker = turn.get("from", turn.get("role"))
        if speaker is None:
            raise _RowError(f"'{column}' message {i + 1} has no 'from' or 'role'")
        role = _ROLE_ALIASES.get(str(speaker).lower())
        if role is None:
            raise _RowError(f"'{column}' message {i + 1} has an unknown role {speaker!r}")
        content = turn.get("value", turn.get("content"))
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is None and turn.get("tool_calls"):
            content = json.dumps([c.get("function", c) for c in turn["tool_calls"]], ensure_ascii=False)
        content = _string(content, f"{column}' message {i + 1} '{'value' if 'value' in turn else 'content'}", allow_empty=True)
        messages.append({"role": role, "content": content})
    return messages


def _check_conversation(messages: list[dict[str, str]]) -> None:
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _RowError("the conversation has no assistant reply to learn from")


def _parse_tools(value: Any) -> list[Any] | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _RowError(f"'tools' is not valid JSON ({exc.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise _RowError(f"'tools' should be a list of tool definitions, got {type(value).__name__}")
    return value


def _row_to_example(value: Any, fmt: str) -> Example:
    if not isinstance(value, dict):
        raise _RowError(f"expected an object with columns, got {type(value).__name__}")
    missing = [c for c in _REQUIRED[fmt] if c not in value]
    if fmt == "sharegpt" and "messages" in value:
        missing = []  # ShareGPT turns under a "messages" column
    if missing:
        raise _RowError(f"missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}")
    if fmt == "text":
        return Example(text=_string(value["text"], "text"))
    messages: list[dict[str, str]] = []
    tools = _parse_tools(value.get("tools"))
    system = value.get("system")
    if fmt == "alpaca":
        if system not in (None, "") and not (isinstance(system, float) and system != system):
            messages.append({"role": "system", "content": _string(system, "system")})
        history = value.get("history") or []
        if isinstance(history, str):
            try:
                history = json.loads(history)
            except json.JSONDecodeError as exc:
                raise _RowError(f"'history' is not valid JSON ({exc.msg})") from None
        if not isinstance(history, list):
            raise _RowError("'history' should be a list of [instruction, response] pairs")
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise _RowError(f"'history' item {i + 1} should be an [instruction, response] pair")
            messages.append({"role": "user", "content": _string(pair[0], f"history {i + 1} instruction")})
            messages.append({"role": "assistant", "content": _string(pair[1], f"history {i + 1} response")})
        instruction = _string(value["instruction"], "instruction")
        extra = _string(value.get("input"), "input", allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": _string(value["output"], "output")})
    elif fmt == "prompt_completion":
        prompt, completion = value["prompt"], value["completion"]
        if isinstance(prompt, list):  # conversational prompt/completion (TRL style)
            messages += _parse_turns(prompt, "prompt")
            messages += _parse_turns(completion, "completion") if isinstance(completion, list) else [
                {"role": "assistant", "content": _string(completion, "completion")}
            ]
        else:
            messages.append({"role": "user", "content": _string(prompt, "prompt")})
            messages.append({"role": "assistant", "content": _string(completion, "completion")})
    else:
        column = "conversations" if fmt == "sharegpt" and "conversations" in value else "messages"
        if isinstance(system, str) and system.strip():
            messages.append({"role": "system", "content": system})
        messages += _parse_turns(value[column], column)
    _check_conversation(messages)
    return Example(messages=messages, tools=tools)


def load_dataset_file(path: str | os.PathLike, format: str | None = None) -> DatasetLoad:
    """Read a dataset file into examples.

    Args:
        path: a ``.json``, ``.jsonl``, ``.csv``, ``.parquet`` or ``.txt`` file.
        format: one of :data:`FORMATS`, or ``None`` to detect it from the columns.

    Returns:
        The usable examples and, in ``problems``, every row that could not be used.

    Raises:
        DatasetError: the file cannot be used at all (missing, empty, binary, not
            UTF-8, broken JSON array, no row in the asked-for format); the message
            names the file, the line where it applies and the fix.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
    if not path.exists():
        raise DatasetError(f"{path}: no such file.")
    if path.is_dir():
        raise DatasetError(f"{path} is a folder; choose a dataset file ({', '.join(EXTENSIONS)}).")
    problems: list[DataProblem] = []
    rows = _read_rows(path, problems)
    total = len(rows) + len(problems)
    if not rows:
        if problems:
            raise DatasetError(
                f"{path.name}: none of its {total} rows could be read; first problem: {problems[0]}"
            )
        raise DatasetError(f"{path.name} is empty: it holds no rows.")
    fmt = format or _detect_format(rows)
    if fmt is None:
        first = rows[0].value
        columns = ", ".join(repr(k) for k in first) if isinstance(first, dict) else type(first).__name__
        raise DatasetError(
            f"{path.name}: cannot tell the dataset format from its columns ({columns}). Expected one of: "
            "instruction/input/output (Alpaca), conversations (ShareGPT), messages (OpenAI), "
            "prompt/completion, or text."
        )
    examples = []
    for row in rows:
        try:
            example = _row_to_example(row.value, fmt)
        except _RowError as exc:
            problems.append(DataProblem(path.name, row.line, str(exc)))
            continue
        example.line = row.line
        examples.append(example)
    problems.sort(key=lambda p: (p.line is None, p.line or 0))
    if not examples:
        needed = " and ".join(repr(c) for c in _REQUIRED[fmt])
        first = rows[0].value
        columns = ", ".join(repr(k) for k in first) if isinstance(first, dict) else type(first).__name__
        raise DatasetError(
            f"{path.name}: no usable row in the {fmt} format (it needs {needed}; the first row has {columns}). "
            f"First problem: {problems[0]}"
        )
    return DatasetLoad(examples=examples, format=fmt, path=path, problems=problems, total_rows=total)
