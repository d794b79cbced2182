"""YAML for MacTuner's configs: plain values only, bounded, every refusal with its line.

``yaml.safe_load`` already refuses Python objects (``!!python/object/apply``), but with a
traceback, and it expands anchors and aliases: a 510-byte "billion laughs" config grows to
gigabytes (and any message that shows the value grows with it). A config needs neither, so
:func:`load_yaml` refuses anchors, aliases and non-standard tags with a message naming the line,
and refuses files past :data:`MAX_CONFIG_BYTES` before parsing.
"""

from __future__ import annotations

import errno
import os
import reprlib
from pathlib import Path
from typing import Any

import yaml

MAX_CONFIG_BYTES = 1_000_000  # a config is a few hundred bytes; anything this large is not one


class ConfigFileError(ValueError):
    """A config file that is not plain YAML; the message names the file, the line and the fix."""


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases (nothing to expand)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise ConfigFileError(
                f"line {mark.line + 1}: anchors (&name) and aliases (*name) are not allowed in a MacTuner config; "
                "write each value out."
            )
        return super().compose_node(parent, index)


_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6
_short.maxlevel = 2
SHORT_REPR_CHARS = 160


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to at most :data:`SHORT_REPR_CHARS` (a message never grows with the value it names)."""
    text = _short.repr(value)
    return text if len(text) <= SHORT_REPR_CHARS else text[: SHORT_REPR_CHARS - 3] + "..."


def load_yaml(text: str, where: str = "config") -> Any:
    """Parse ``text`` (plain YAML: mappings, lists, scalars) and return it.

    Raises:
        ConfigFileError: anchors or aliases, a tag YAML's safe schema does not know (such as
            ``!!python/object/apply``), or a syntax error; the message starts with ``where`` and the line.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"{where}: {len(text):,} characters; a config holds at most {MAX_CONFIG_BYTES:,}.")
    try:
        return yaml.load(text, Loader=_PlainLoader)
    except ConfigFileError as error:
        raise ConfigFileError(f"{where} {error}") from None
    except yaml.constructor.ConstructorError as error:
        mark = error.problem_mark
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigFileError(
            f"{where}{line}: {error.problem or 'a value MacTuner cannot read'}; a config holds plain values only "
            "(text, numbers, true/false, lists)."
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigFileError(f"{where}{line}: not valid YAML ({problem}).") from None


def load_yaml_file(path: str | os.PathLike) -> Any:
    """:func:`load_yaml` of a file; a file past :data:`MAX_CONFIG_BYTES` is refused before it is read."""
    from mactuner.fileio import read_regular_bytes

    path = Path(path)
    try:
        # a regular file only (a named pipe would block), at most MAX_CONFIG_BYTES
        data = read_regular_bytes(path, MAX_CONFIG_BYTES)
    except OSError as error:
        if error.errno == errno.EFBIG:
            raise ConfigFileError(f"{path}: a config holds at most {MAX_CONFIG_BYTES:,} bytes.") from None
        raise
    return load_yaml(data.decode("utf-8", errors="replace"), str(path))
