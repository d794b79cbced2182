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
import errno
import json
import os
import re
import shutil
import stat
import threading
import time
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


class NotARegularFile(OSError):
    """A path that is a named pipe, a device or a folder where a file was expected."""


def open_regular(path: str | os.PathLike, mode: str = "rb") -> IO[Any]:
    """Open an existing *regular* file for reading, never blocking.

    A named pipe planted where MacTuner expects one of its files would block a plain
    ``open`` until someone writes to it (every runs list would hang); a device could be
    read forever. The file is opened non-blocking and checked with ``fstat`` first.

    Raises:
        NotARegularFile: ``path`` is not a regular file. FileNotFoundError and other
        ``OSError``: as ``open``.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`), refusing one larger than ``max_bytes``."""
    with open_regular(path) as handle:
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"larger than {max_bytes:,} bytes", str(path))
    return data


def read_regular_json(path: str | os.PathLike, max_bytes: int = 16 * 2**20) -> Any:
    """JSON from a regular file of at most ``max_bytes`` (OSError or ValueError otherwise)."""
    return json.loads(read_regular_bytes(path, max_bytes).decode("utf-8"))


# what unique_temp_name puts at the end of a name: ".<pid>-<thread id>-<8 hex>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.(\d+)-\d+-[0-9a-f]{8}\.tmp$")
STALE_TEMP_GRACE_S = 60.0  # a temporary file younger than this is kept even if its pid is gone (pids are reused)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def sweep_stale_temps(folder: str | os.PathLike, grace_seconds: float = STALE_TEMP_GRACE_S) -> list[Path]:
    """Remove the temporary files and staging folders that writers which died left in ``folder``.

    Only names :func:`unique_temp_name` makes (hidden, ending in ``.<pid>-<thread>-<hex>.tmp``) are
    considered, and only when that pid is no longer running and the entry is older than
    ``grace_seconds``: a live writer's file, and anything the person named, are never touched.
    Returns what was removed.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        try:
            if now - entry.lstat().st_mtime < grace_seconds:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # gone already, or not ours to remove after all
        removed.append(entry)
    return removed


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


def _listing(folder: Path) -> dict[str, int | None]:
    """Every entry under ``folder`` (the marker left out): relative name → size (None for a folder or link)."""
    listing: dict[str, int | None] = {}
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if name == MARKER_FILE:
            continue
        try:
            regular = path.is_file() and not path.is_symlink()
            listing[name] = path.stat().st_size if regular else None
        except OSError:
            continue  # vanished while listed
    return listing


def mark_as_ours(folder: str | os.PathLike, what: str = "", *, listing: bool = True) -> None:
    """Leave MacTuner's marker in a folder it created, so a later overwrite knows it may.

    The marker lists every file MacTuner wrote there (name and size): a file the person
    added or changed later makes the folder theirs again (:func:`foreign_entries`).
    ``listing=False`` marks a folder MacTuner adds to over time but never replaces
    whole (the exports folder, a variants folder holding marked sub-folders).
    """
    folder = Path(folder)
    record = {"written_by": "MacTuner", "what": what or "created by MacTuner",
              "files": _listing(folder) if listing else None}
    Path(folder, MARKER_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def foreign_entries(folder: str | os.PathLike) -> list[str] | None:
    """What in a marked ``folder`` MacTuner did not write (added, or changed in size), sorted.

    None when ``folder`` carries no marker. A marker without a list (written before the
    list existed, or a folder that is only added to) lists nothing as foreign.
    """
    folder = Path(folder)
    marker = folder / MARKER_FILE
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # a marker of an earlier version: plain text
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return []
    now = _listing(folder)
    return sorted(name for name, size in now.items() if name not in files or files[name] != size)


def owned_by_mactuner(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is missing, empty, or MacTuner's own (marked, and nothing in it added or changed since)."""
    folder = Path(folder)
    if folder.is_symlink():
        return False
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    foreign = foreign_entries(folder)
    if foreign is not None:
        return not foreign
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
    foreign = foreign_entries(path) if path.is_dir() else None
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputNotOurs(
            f"{path} was written by MacTuner, but files appeared or changed there since: {shown}. Replacing the "
            "folder would delete them. Move them out, choose another folder, or pass --overwrite "
            "(overwrite=True) to replace it anyway."
        )
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
    sweep_stale_temps(path.parent)  # what a killed merge or quantize left beside it
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
