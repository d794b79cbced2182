"""Cheap checks of model files before a library that trusts them reads them.

A ``.gguf`` file's header and a ``.safetensors`` file's header say how long the strings,
arrays and tensors that follow are. A crafted (or cut) file makes the readers behind
MacTuner fail with ``struct.error`` or ``SafetensorError`` tracebacks, or hands a C++
loader sizes no file could hold. These checks walk the headers with every length
checked against the file's real size and raise :class:`DamagedFile` (a ``ValueError``)
naming the file and what is wrong, so a page or a command says it in one line.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
MAX_GGUF_TENSORS = 1_000_000
MAX_GGUF_KEYS = 100_000
MAX_GGUF_HEADER_BYTES = 512 * 2**20  # metadata and tensor descriptions (vocabularies included)
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9
MAX_SAFETENSORS_HEADER = 100 * 2**20
_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                       "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class DamagedFile(ValueError):
    """A model file whose header cannot be true; the message names the file and the problem."""


class _Reader:
    """Bounded reads from a file: every length is checked against what is left of it."""

    def __init__(self, handle, size: int, name: str, limit: int):
        self.handle, self.size, self.name, self.limit = handle, size, name, limit
        self.pos = 0

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.pos + count > min(self.size, self.limit):
            raise DamagedFile(f"{self.name} is damaged or not a complete GGUF file: its {what} runs past the end "
                              f"of the file ({self.size:,} bytes).")
        data = self.handle.read(count)
        self.pos += count
        return data

    def skip(self, count: int, what: str) -> None:
        if count < 0 or self.pos + count > min(self.size, self.limit):
            self.take(count, what)  # raises the same message
        self.handle.seek(count, os.SEEK_CUR)
        self.pos += count

    def number(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]


def check_gguf_header(path: str | os.PathLike) -> None:
    """Walk a GGUF file's header (metadata and tensor descriptions) with every length bounded.

    Raises:
        DamagedFile: not a GGUF file, a version MacTuner cannot read, or a header that claims more than the file holds.
        OSError: the file cannot be read.
    """
    path = Path(path)
    name = path.name
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        reader = _Reader(handle, size, name, MAX_GGUF_HEADER_BYTES)
        if size < 24:
            raise DamagedFile(f"{name} is damaged or not a complete GGUF file: {size} bytes, shorter than a GGUF header.")
        if reader.take(4, "magic") != GGUF_MAGIC:
            raise DamagedFile(f"{name} is not a GGUF file (it does not start with the GGUF magic bytes).")
        version = reader.number("I", "version")
        if version not in GGUF_VERSIONS:
            raise DamagedFile(f"{name} is GGUF version {version}; MacTuner reads versions 2 and 3 (or the file is damaged).")
        tensors, keys = reader.number("Q", "tensor count"), reader.number("Q", "metadata count")
        if tensors > MAX_GGUF_TENSORS or keys > MAX_GGUF_KEYS:
            raise DamagedFile(f"{name} is damaged: its header claims {tensors:,} tensors and {keys:,} metadata "
                              "entries, more than any model has.")
        for _ in range(keys):
            _skip_string(reader, "metadata key")
            _skip_value(reader, reader.number("I", "metadata type"), 0)
        for _ in range(tensors):
            _skip_string(reader, "tensor name")
            dims = reader.number("I", "tensor dimensions")
            if dims > 8:
                raise DamagedFile(f"{name} is damaged: a tensor with {dims} dimensions.")
            reader.skip(8 * dims + 4 + 8, "tensor description")


def _skip_string(reader: _Reader, what: str) -> None:
    reader.skip(reader.number("Q", f"{what} length"), what)


def _skip_value(reader: _Reader, kind: int, depth: int) -> None:
    if kind in _GGUF_SCALARS:
        reader.skip(_GGUF_SCALARS[kind], "metadata value")
    elif kind == _GGUF_STRING:
        _skip_string(reader, "metadata string")
    elif kind == _GGUF_ARRAY and depth < 4:
        item, count = reader.number("I", "array type"), reader.number("Q", "array length")
        if item in _GGUF_SCALARS:
            reader.skip(count * _GGUF_SCALARS[item], "metadata array")
        else:
            if count > reader.size:  # every element takes at least one byte
                reader.skip(count, "metadata array")
            for _ in range(count):
                _skip_value(reader, item, depth + 1)
    else:
        raise DamagedFile(f"{reader.name} is damaged or not a GGUF file MacTuner can read: metadata of unknown type {kind}.")


def check_safetensors(path: str | os.PathLike) -> None:
    """Check a ``.safetensors`` file's header: its length, its JSON, and every tensor's bytes inside the file.

    Raises:
        DamagedFile: the header or a tensor's extent cannot be true. OSError: the file cannot be read.
    """
    path = Path(path)
    name = path.name

    def damaged(why: str) -> DamagedFile:
        return DamagedFile(f"{path.parent.name}/{name} is damaged ({why}); save the adapter again or pick another one.")

    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise damaged(f"{size} bytes, shorter than a safetensors header")
        length = int.from_bytes(handle.read(8), "little")
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise damaged(f"its header claims {length:,} bytes, the file has {size:,}")
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise damaged(f"its header is not valid JSON: {str(error)[:80]}") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a table of tensors")
    data = size - 8 - length
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            width = _SAFETENSORS_DTYPES[info["dtype"]]
            start, end = (int(x) for x in info["data_offsets"])
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise damaged(f"tensor {tensor[:60]!r} is described wrongly") from None
        if not 0 <= start <= end <= data or end - start != count * width:
            raise damaged(f"tensor {tensor[:60]!r} claims bytes {start:,}–{end:,}; the file holds {data:,}")


def check_adapter_files(folder: str | os.PathLike) -> None:
    """:func:`check_safetensors` on every ``*.safetensors`` file of an adapter (or model) folder."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(file)
