"""Atomic file and folder writes, safe with many writers at once.

Every file MacTuner writes that another thread or process may read (status,
settings, configs, metrics summaries, RAG collection files, checkpoints,
exports) goes through here. The recipe is always the same: write to a temporary
name that is unique to this writer (pid, thread and a random part: two browser
tabs are two threads of one process), flush and fsync it, ``os.replace`` it over
the target, then fsync the folder so that the rename itself survives a crash.
A reader therefore sees either the old file or the new one, never half of one,
and two writers never trip over each other's temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

STAGING_PREFIX = ".staging-"  # hidden folders being filled; never listed, removed when found stale
MARKER_FILE = ".mactuner-output"  # written into every folder MacTuner creates for a person (exports, merges)


def unique_temp_name(target: str | os.PathLike, prefix: str = ".") -> Path:
    """A hidden sibling name for ``target`` that no other writer (process or thread) uses."""
    target = Path(target)
    tag = f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"
    return target.with_name(f"{prefix}{target.name}.{tag}.tmp")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where the file system cannot sync folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under ``folder``, deepest first, then ``folder`` itself."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a unique temporary file; on a clean exit it replaces ``path`` atomically.

    On an error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp_name(path)
    binary = "b" in mode
    handle = open(tmp, mode, encoding=None if binary else encoding)
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, path)
    except BaseException:
        handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a reader never sees half a file)."""
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
        handle.write("\n")
    return Path(path)


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], None], *, replace: bool = True) -> Path:
    """Have ``write(staging)`` fill a hidden staging folder, sync it, then rename it to ``target``.

    Args:
        target: the folder to create.
        write: fills the staging folder it is given.
        replace: whether an existing ``target`` may be replaced (it is moved aside first, then
            deleted). Callers that did not create ``target`` themselves must check
            :func:`owned_by_mactuner` first.

    Raises:
        FileExistsError: ``target`` exists and ``replace`` is False.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists")
    staging = unique_temp_name(target, prefix=STAGING_PREFIX)
    staging.mkdir()
    try:
        write(staging)
        fsync_tree(staging)
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            old = unique_temp_name(target, prefix=STAGING_PREFIX + "old-")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    return target


def mark_as_ours(folder: str | os.PathLike, what: str = "") -> None:
    """Leave MacTuner's marker in a folder it created, so a later overwrite knows it may."""
    Path(folder, MARKER_FILE).write_text((what or "created by MacTuner") + "\n", encoding="utf-8")


def owned_by_mactuner(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is missing, empty, or carries MacTuner's marker (so writing over it loses nothing)."""
    folder = Path(folder)
    if folder.is_symlink():
        return False
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    if (folder / MARKER_FILE).is_file():
        return True
    return not any(folder.iterdir())


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, with every symlink resolved, lies inside ``root``."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


class OutputNotOurs(FileExistsError):
    """The output folder holds files MacTuner did not create; the message says how to proceed."""


def prepare_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that MacTuner may write its output folder at ``path``, and return it.

    A missing or empty folder, or one carrying MacTuner's marker (:data:`MARKER_FILE`,
    left in everything it exports) is fine. Anything else — a folder of the person's
    own files, a file, a symbolic link — is refused unless ``overwrite`` is True
    (a symbolic link is refused even then: what it points to is never replaced).
    Merge, quantize and export all check their output through here.

    Raises:
        OutputNotOurs: the path holds something MacTuner did not create.
    """
    path = Path(path)
    if path.is_symlink():
        raise OutputNotOurs(f"{path} is a symbolic link; choose a real folder for the output.")
    if overwrite or owned_by_mactuner(path):
        return path
    what = "is a file" if path.exists() and not path.is_dir() else "holds files MacTuner did not create"
    raise OutputNotOurs(
        f"{path} {what}; writing there would delete them. Choose a new or empty folder, "
        "or pass --overwrite (overwrite=True) to replace it."
    )


def write_output_folder(
    path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False, what: str = ""
) -> Path:
    """Write an output folder (a merged or quantized model, an export) safely, and return it.

    ``write(staging)`` fills a hidden staging folder next to ``path``; the folder is
    marked as MacTuner's (:func:`mark_as_ours`), ``path`` is checked again with
    :func:`prepare_output` (something may have appeared meanwhile) and the staging
    folder is renamed over it. A failure leaves ``path`` as it was.

    Raises:
        OutputNotOurs: ``path`` holds something MacTuner did not create and ``overwrite`` is False.
    """
    path = prepare_output(path, overwrite)
    if path.exists() and not path.is_dir():
        path.unlink()  # a file, and overwrite was asked for

    def fill(staging: Path) -> None:
        write(staging)
        mark_as_ours(staging, what)
        prepare_output(path, overwrite)

    return write_folder_atomically(path, fill, replace=True)


def slug(text: str, default: str = "model", max_chars: int = 80, allowed: str = "A-Za-z0-9._-") -> str:
    """``text`` as a file or folder name: each run of characters outside ``allowed`` becomes ``-``.

    The one rule for names MacTuner derives from a label (run ids, export and variant folders, chat
    history files, collection folders): never a hidden name or ``..``, at most ``max_chars`` characters,
    ``default`` when nothing is left.
    """
    return re.sub(rf"[^{allowed}]+", "-", text).strip("-._")[:max_chars].strip("-._") or default
