"""Uploaded dataset files: kept under MACTUNER_HOME with safe, unique names; listed for the pickers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from mactuner.data.base import DEMO_DATASETS, EXTENSIONS, DatasetError

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
