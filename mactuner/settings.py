"""The small settings file, ``$MACTUNER_HOME/settings.json``.

It remembers choices across commands and app sessions — today the default
device that ``python -m mactuner devices select`` and the app's device picker
store. Keys this version does not know are kept untouched, so older and newer
MacTuners can share the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from mactuner import fileio, paths

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """Remembered choices.

    Attributes:
        default_device: device for new app sessions and commands run without
            ``--device`` (``"cpu"``, ``"mps"``, ``"cuda:0"``…); ``None`` means
            choose automatically (MPS > CUDA > CPU).
        extra: keys from the file that this version does not know; written back as they were.
    """

    default_device: str | None = field(default=None, metadata={"help": "device new sessions start on"})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "unknown keys, kept as they were"})

    def __post_init__(self):
        if self.default_device is not None and (not isinstance(self.default_device, str) or not self.default_device):
            raise ValueError(f"default_device must be a device name such as 'cpu' or 'cuda:0', got {self.default_device!r}")

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object (unknown keys included)."""
        return {**self.extra, "default_device": self.default_device}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Build from the file's JSON object; unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{key: value for key, value in data.items() if key in known},
            extra={key: value for key, value in data.items() if key not in known},
        )


def load_settings() -> Settings:
    """Read the settings file; defaults when it is missing or unreadable (logged, never fatal)."""
    path = paths.settings_file()
    if not path.exists():
        return Settings()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("the file does not hold a JSON object")
        return Settings.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("Ignoring unreadable settings file %s: %s", path, exc)
        return Settings()


def save_settings(settings: Settings) -> None:
    """Write the settings file atomically (a crash never leaves half a file)."""
    fileio.write_json_atomic(paths.settings_file(), settings.to_dict(), sort_keys=True)


def remember_device(device: str | None) -> Settings:
    """Store ``device`` (e.g. ``"cuda:0"``; ``None`` to forget) as the default device."""
    settings = load_settings()
    settings.default_device = None if device is None else str(device)
    save_settings(settings)
    return settings
