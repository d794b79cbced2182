"""Dataset files → training examples → token ids, with precise reports of bad data.

A dataset file (JSON, JSONL, CSV, Parquet or TXT) is read into a list of
:class:`Example` — a conversation (``messages``) or a plain ``text`` — whatever
its format (Alpaca, ShareGPT, OpenAI ``messages``, prompt/completion, plain
text). Formats are detected from the columns and can be forced.

Bad data never crashes and is never dropped silently: a row that cannot be used
becomes a :class:`DataProblem` (file, line or row, what is wrong) in
``DatasetLoad.problems``; a file that cannot be read at all raises
:class:`DatasetError` whose message says where and why.

Tokenization renders conversations with the tokenizer's own chat template and
takes the loss on the assistant replies only (switchable). The assistant spans
are found by rendering the conversation prefix by prefix — which works with any
template, whether or not it supports ``{% generation %}`` — and mapped onto
tokens with the fast tokenizer's character offsets.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import os
import random
import re
import stat
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # label value on tokens that take no loss (PyTorch's CrossEntropyLoss default)

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
"""Dataset formats understood by :func:`load_dataset_file`."""

EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")
# what one dataset may hold: the app reads it into the process that serves every tab, so a small
# file that expands (an 84 KB Parquet file of one repeated row held 800,000 rows, 1.7 GB) is refused
# from what it says about itself before it is read
MAX_DATASET_ROWS = 200_000
MAX_DATASET_BYTES = 256 * 2**20  # the text (or a Parquet file's uncompressed data)
SUMMARY_SAMPLE_ROWS = 20_000  # a larger dataset's summary (token lengths, truncation) comes from this many rows
"""File types understood by :func:`load_dataset_file`."""

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_DATASETS: dict[str, Path] = {
    "quenmark-alpaca": DEMO_DIR / "quenmark_alpaca.json",
    "quenmark-messages": DEMO_DIR / "quenmark_messages.jsonl",
    "quenmark-csv": DEMO_DIR / "quenmark.csv",
}
"""The demo datasets shipped with MacTuner: facts about the fictional island of Quenmark."""
DEMO_FACTS = DEMO_DIR / "facts.json"
"""``[{"question", "answer", "answer_keyword"}]``: what a model fine-tuned on the demo data should state."""

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

# a generic ChatML template for tokenizers that ship none (base models)
_FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DatasetError(Exception):
    """A dataset file that cannot be used at all; the message says where and why."""


@dataclass
class DataProblem:
    """One unusable row, reported instead of silently dropped.

    Attributes:
        file: the file's name.
        line: the 1-based line of the row in the file (JSONL, JSON, CSV, TXT) or its
            1-based row number (Parquet); ``None`` where the problem is not tied to a row.
        message: what is wrong, in plain words.
    """

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file} line {self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class Example:
    """One training example: a conversation or a plain text (exactly one of them).

    Attributes:
        messages: ``[{"role", "content"}]`` with roles ``system``, ``user``,
            ``assistant`` or ``tool``.
        text: a plain text trained on in full (pre-training style).
        tools: tool (function) definitions the conversation may call, as JSON schemas.
        line: where the example came from in its file (see :class:`DataProblem`).
    """

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    tools: list[Any] | None = None
    line: int | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError(
                f"an Example needs exactly one of messages or text, got messages={self.messages!r}, text={self.text!r}"
            )


@dataclass
class DatasetLoad:
    """What :func:`load_dataset_file` read.

    Attributes:
        examples: the usable examples, in file order.
        format: the format used (one of :data:`FORMATS`), detected or forced.
        path: the file read.
        problems: every row that could not be used, with where and why.
        total_rows: rows in the file, usable or not (``len(examples) + len(problems)``
            unless a problem concerns the whole file).
    """

    examples: list[Example]
    format: str
    path: Path
    problems: list[DataProblem] = field(default_factory=list)
    total_rows: int = 0


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
# uploads

UPLOADS_DIR = "uploads"  # under MACTUNER_HOME
MAX_UPLOAD_NAME_BYTES = 150  # file systems allow 255; room left for " (NN)" and the suffix


def uploads_dir() -> Path:
    """Where uploaded dataset files are kept: ``MACTUNER_HOME/uploads`` (not created)."""
    from mactuner import paths

    return paths.home() / UPLOADS_DIR


def safe_upload_name(name: str) -> str:
    """A plain file name for an uploaded file's name: no folders, no hidden or empty name, no
    control characters, at most :data:`MAX_UPLOAD_NAME_BYTES` bytes, its suffix kept."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip().lstrip(".").strip()
    stem, suffix = os.path.splitext(base)
    if not re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix):
        stem, suffix = base, ""
    stem = stem.encode("utf-8")[:MAX_UPLOAD_NAME_BYTES].decode("utf-8", "ignore").strip() or "upload"
    return stem + suffix.lower()


def _same_content(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a regular file (not a link) holding exactly ``data``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False  # missing, a symbolic link (ELOOP), unreadable
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size != len(data):
            return False
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.digest() == hashlib.sha256(data).digest()


def save_upload(name: str, data: bytes, folder: str | os.PathLike | None = None) -> Path:
    """Keep an uploaded file under ``uploads_dir()`` and return its path.

    The name is made safe (:func:`safe_upload_name`: ``.``, ``..``, NUL, folders and
    over-long names cannot escape or break anything). Nothing is ever overwritten
    and no symbolic link is followed: the bytes go to a new private file that is
    then hard-linked to the name, which fails if anything (a file, a planted link)
    is there. Uploading the same bytes under the same name again returns the
    existing file (two tabs, or a rerun, share it); different bytes get the next
    free name (``data (2).jsonl``).

    Raises:
        DatasetError: the uploads folder is a symbolic link, or no free name was found.
    """
    from mactuner import fileio

    folder = Path(folder) if folder is not None else uploads_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink():
        raise DatasetError(f"{folder} is a symbolic link; uploads are only written into a real folder.")
    base = safe_upload_name(name)
    stem, suffix = os.path.splitext(base)
    tmp = fileio.unique_temp_name(folder / base)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(tmp, flags, 0o600), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        for n in range(1, 1000):
            candidate = folder / (base if n == 1 else f"{stem} ({n}){suffix}")
            try:
                os.link(tmp, candidate, follow_symlinks=False)  # atomic, and never over anything
            except FileExistsError:
                if _same_content(candidate, data):
                    return candidate
                continue
            except OSError:
                # no hard links on this file system: create the name exclusively instead
                try:
                    with os.fdopen(os.open(candidate, flags, 0o600), "wb") as handle:
                        handle.write(data)
                except FileExistsError:
                    if _same_content(candidate, data):
                        return candidate
                    continue
            fileio.fsync_dir(folder)
            return candidate
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    raise DatasetError(f"No free name for {base} in {folder}; remove some uploads.")


def dataset_choices(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """The datasets a person can pick: ``"Demo: NAME"`` for each demo, then ``"Uploaded: FILE"``
    for each earlier upload in ``folder`` (default :func:`uploads_dir`), by name.

    Only regular files of a known type (:data:`EXTENSIONS`) count; links are never offered, and
    an uploads folder that is missing or a link offers nothing.
    """
    choices = {f"Demo: {name}": path for name, path in DEMO_DATASETS.items()}
    uploads = Path(folder) if folder is not None else uploads_dir()
    for path in sorted(uploads.iterdir()) if uploads.is_dir() and not uploads.is_symlink() else []:
        if path.suffix in EXTENSIONS and path.is_file() and not path.is_symlink():
            choices[f"Uploaded: {path.name}"] = path
    return choices


class SavedUploads:
    """The uploads one browser session saved with :func:`save_upload`, each content written once.

    The fine-tune page is handed the same upload again on every rerun. Keyed by the
    upload's id, then by its content's sha256, a rerun, or the same bytes uploaded again,
    finds the saved file without writing it again, so its mtime (the dataset summary's
    cache key) stays and the dataset is not re-read and re-tokenised. A saved file that
    was deleted since is saved again.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = folder
        self._digests: dict[str, str] = {}  # upload id -> sha256 of its bytes
        self._paths: dict[str, Path] = {}  # sha256 -> the saved file

    def save(self, upload_id: str, name: str, read: Callable[[], bytes]) -> Path:
        """The saved file of upload ``upload_id`` named ``name``; ``read()`` gives its bytes,
        called only when the upload is new or its file must be written again.

        Raises:
            DatasetError, OSError: as :func:`save_upload`.
        """
        digest = self._digests.get(upload_id)
        if digest is None:
            digest = self._digests[upload_id] = hashlib.sha256(read()).hexdigest()
        path = self._paths.get(digest)
        if path is None or not path.is_file():
            path = self._paths[digest] = save_upload(name, read(), self.folder)
        return path


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


# ---------------------------------------------------------------------------
# tokenization


def _template_for(tokenizer: Any) -> str | None:
    return None if getattr(tokenizer, "chat_template", None) else _FALLBACK_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: list[dict[str, str]], tools: list | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=_template_for(tokenizer),
        add_generation_prompt=generation_prompt,
        tokenize=False,
    )


def _with_tools_in_system(messages: list[dict[str, str]], tools: list) -> list[dict[str, str]]:
    """For templates that ignore ``tools``: describe the tools in the system message instead."""
    description = "You can call these tools (answer with a JSON function call):\n" + "\n".join(
        json.dumps(t, ensure_ascii=False) for t in tools
    )
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + description}] + messages[1:]
    return [{"role": "system", "content": description}] + messages


def _template_uses_tools(tokenizer: Any) -> bool:
    cached = getattr(tokenizer, "_mactuner_uses_tools", None)
    if cached is None:
        probe = [{"role": "user", "content": "x"}]
        tool = [{"name": "probe_tool_xyz", "description": "d", "parameters": {"type": "object", "properties": {}}}]
        try:
            cached = "probe_tool_xyz" in _render(tokenizer, probe, tool, False)
        except Exception:  # noqa: BLE001 - a template that breaks on tools does not use them
            cached = False
        try:
            tokenizer._mactuner_uses_tools = cached
        except AttributeError:
            pass
    return cached


def render_example(example: Example, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The example's full text and the character spans of its assistant replies.

    The spans are found prefix by prefix: the text of the conversation up to a
    reply (with the generation prompt) is where the reply starts, the text up to
    and including it is where it ends — so the end-of-turn token that teaches the
    model to stop is inside the span.
    """
    if example.text is not None:
        return example.text, [(0, len(example.text))]
    messages = example.messages or []
    tools = example.tools
    if tools and not _template_uses_tools(tokenizer):
        messages, tools = _with_tools_in_system(messages, tools), None
    full = _render(tokenizer, messages, tools, False)
    spans: list[tuple[int, int]] = []
    search_from = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], tools, True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], tools, False)
        if full.startswith(upto) and upto.startswith(before) and len(upto) > len(before):
            start, end = len(before), len(upto)
            # templates that ignore add_generation_prompt leave the role header in
            # the span: start at the reply itself where it can be found
            content = message["content"].strip()
            found = full.rfind(content, start, end) if content else -1
            if found > start:
                start = found
        else:
            # a template that renders a prefix differently from the whole: find the reply itself
            start = full.find(message["content"], search_from)
            if start < 0:
                continue
            end = start + len(message["content"])
        spans.append((start, end))
        search_from = end
    return full, spans


def _encode_all(examples: Sequence[Example], tokenizer: Any, assistant_only_loss: bool, problems: list | None):
    """Full-length (untruncated) ids and labels for every example that renders."""
    texts, spans, kept = [], [], []
    for index, example in enumerate(examples):
        try:
            text, example_spans = render_example(example, tokenizer)
        except Exception as exc:  # noqa: BLE001 - jinja raises anything a template author chose
            where = f"line {example.line}" if example.line is not None else f"example {index + 1}"
            message = f"the chat template cannot render it ({exc})"
            if problems is None:
                raise DatasetError(f"{where}: {message}") from exc
            problems.append(DataProblem("", example.line, message))
            continue
        texts.append(text)
        spans.append(example_spans)
        kept.append(example)
    if not texts:
        return []
    fast = getattr(tokenizer, "is_fast", False)
    # the rendered text already holds the template's special tokens (BOS included where
    # the template writes it): adding them again would double them
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
    eos = tokenizer.eos_token_id
    results = []
    for i, (example, example_spans) in enumerate(zip(kept, spans)):
        ids = list(encoded["input_ids"][i])
        if example.text is not None:
            # plain text: learn where a document ends
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            results.append((ids, list(ids)))
            continue
        if not assistant_only_loss:
            results.append((ids, list(ids)))
            continue
        if fast:
            offsets = encoded["offset_mapping"][i]
            labels = [IGNORE_INDEX] * len(ids)
            for t, (a, b) in enumerate(offsets):
                if b <= a:
                    continue
                # a token that holds any character of a reply is trained (a
                # word piece such as " a" can start just before the reply)
                for s, e in example_spans:
                    if a < e and b > s:
                        labels[t] = ids[t]
                        break
        else:
            labels = _labels_by_prefix(texts[i], example_spans, tokenizer, ids)
        results.append((ids, labels))
    return results


def _labels_by_prefix(text: str, spans: list[tuple[int, int]], tokenizer: Any, ids: list[int]) -> list[int]:
    """Slow tokenizers have no offsets: count the tokens of each prefix instead."""
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in spans:
        a = len(tokenizer(text[:s], add_special_tokens=False)["input_ids"])
        b = len(tokenizer(text[:e], add_special_tokens=False)["input_ids"])
        for t in range(a, min(b, len(ids))):
            labels[t] = ids[t]
    return labels


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    assistant_only_loss: bool = True,
    problems: list[DataProblem] | None = None,
) -> list[dict[str, list[int]]]:
    """Token ids and labels for training.

    Args:
        examples: from :func:`load_dataset_file`.
        tokenizer: the model's tokenizer; conversations use its chat template
            (a plain ChatML template where it has none).
        max_length: longer rows are truncated to this many tokens.
        assistant_only_loss: take the loss on the assistant replies only
            (``True``), or on every token of the conversation (``False``).
            Plain-text examples always train on every token.
        problems: where to report examples the chat template cannot render; when
            ``None`` such an example raises :class:`DatasetError`.

    Returns:
        One ``{"input_ids", "labels"}`` per rendered example; ``labels`` is
        ``-100`` on tokens that take no loss.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    return [
        {"input_ids": ids[:max_length], "labels": labels[:max_length]}
        for ids, labels in _encode_all(examples, tokenizer, assistant_only_loss, problems)
    ]


# ---------------------------------------------------------------------------
# summary and split


@dataclass
class DatasetSummary:
    """What a dataset looks like to a given tokenizer and max length.

    Attributes:
        path: the file.
        format: the format used.
        rows: usable rows.
        total_rows: rows in the file, usable or not.
        problems: the unusable rows (as ``str(DataProblem)``).
        max_length: the max length the truncation count refers to.
        token_lengths: the token length of every usable row (for a histogram).
        min_tokens, mean_tokens, median_tokens, p95_tokens, max_tokens: their statistics.
        truncated_rows: rows longer than ``max_length``.
        trained_lengths: tokens that take the loss in every usable row, after truncation.
        trained_tokens: tokens that take the loss, after truncation.
        rows_without_trained_tokens: rows whose trained part is cut off entirely by
            the truncation (they teach nothing; raise the max length).
        sampled_rows: for a dataset of more than :data:`SUMMARY_SAMPLE_ROWS` rows, how many
            (evenly spaced) were tokenised: the lists and statistics are the sample's, the
            counts (rows, truncated, trained tokens) are scaled to the whole file.
    """

    path: str
    format: str
    rows: int
    total_rows: int
    problems: list[str]
    max_length: int
    token_lengths: list[int]
    min_tokens: int
    mean_tokens: float
    median_tokens: float
    p95_tokens: int
    max_tokens: int
    truncated_rows: int
    trained_lengths: list[int]
    trained_tokens: int
    rows_without_trained_tokens: int
    sampled_rows: int | None = None  # rows tokenised for the statistics when the dataset is larger than that

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def rows_longer_than(self, max_length: int) -> int:
        """Usable rows that a max length of ``max_length`` tokens would truncate (scaled up from a sample)."""
        count = sum(1 for n in self.token_lengths if n > max_length)
        return round(count * self.rows / len(self.token_lengths)) if self.sampled_rows and self.token_lengths else count


def token_length_figure(summary: DatasetSummary, max_length: int):
    """A plotly histogram of the rows' token lengths, with a dashed line at ``max_length``
    (rows to its right are truncated)."""
    import plotly.graph_objects as go

    figure = go.Figure(go.Histogram(x=summary.token_lengths, nbinsx=40))
    figure.add_vline(x=max_length, line_dash="dash", annotation_text="max length")
    figure.update_layout(height=220, margin=dict(t=10, b=30), xaxis_title="tokens per row", yaxis_title="rows")
    return figure


def percentile(values: Sequence[int], q: float) -> int:
    """The ``q`` (0–100) percentile by the nearest-rank method (an actual row length)."""
    if not values:
        return 0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return int(ordered[int(rank) - 1])


def summarize_dataset(
    load: DatasetLoad, tokenizer: Any, max_length: int, assistant_only_loss: bool = True
) -> DatasetSummary:
    """Row count, format, token-length statistics and truncation for ``load`` under ``tokenizer``."""
    problems = list(load.problems)
    examples, sampled = load.examples, None
    if len(examples) > SUMMARY_SAMPLE_ROWS:
        # tokenising every row of a large file would hold the page for minutes: an even sample tells the same
        step = len(examples) / SUMMARY_SAMPLE_ROWS
        examples, sampled = [examples[int(i * step)] for i in range(SUMMARY_SAMPLE_ROWS)], SUMMARY_SAMPLE_ROWS
    encoded = _encode_all(examples, tokenizer, assistant_only_loss, problems)
    for p in problems:
        p.file = p.file or load.path.name
    lengths = [len(ids) for ids, _ in encoded]
    trained_lengths = [sum(1 for x in labels[:max_length] if x != IGNORE_INDEX) for _ids, labels in encoded]
    scale = len(load.examples) / len(examples) if examples else 1.0

    def scaled(count: int) -> int:
        return round(count * scale)

    return DatasetSummary(
        path=str(load.path),
        format=load.format,
        rows=scaled(len(encoded)),
        total_rows=load.total_rows,
        problems=[str(p) for p in problems],
        max_length=max_length,
        token_lengths=lengths,
        min_tokens=min(lengths, default=0),
        mean_tokens=round(statistics.fmean(lengths), 1) if lengths else 0.0,
        median_tokens=float(statistics.median(lengths)) if lengths else 0.0,
        p95_tokens=percentile(lengths, 95),
        max_tokens=max(lengths, default=0),
        truncated_rows=scaled(sum(1 for n in lengths if n > max_length)),
        trained_lengths=trained_lengths,
        trained_tokens=scaled(sum(trained_lengths)),
        rows_without_trained_tokens=scaled(sum(1 for n in trained_lengths if n == 0)),
        sampled_rows=sampled,
    )


def train_validation_split(
    items: Sequence[Any], validation_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """Shuffle ``items`` reproducibly and split off a validation part.

    Args:
        items: examples or tokenized rows.
        validation_fraction: share held out, in [0, 1); with at least two items and a
            positive fraction, the validation part holds at least one item and the
            training part keeps at least one.
        seed: the shuffle's seed (same seed, same split).

    Returns:
        ``(train, validation)``.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if validation_fraction > 0 and len(items) >= 2:
        n_val = min(len(items) - 1, max(1, round(len(items) * validation_fraction)))
    val_idx = set(order[:n_val])
    train = [items[i] for i in range(len(items)) if i not in val_idx]
    val = [items[i] for i in sorted(val_idx)]
    return train, val

