"""What every part of :mod:`mactuner.rag` shares: the error type and the progress callback's type.

Kept in its own module (rather than in ``__init__``) so that the submodules can
import it without importing the package that re-exports them: no import circle.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, float | None], None]  # (message, fraction done or None)


class RagError(Exception):
    """A collection cannot do what was asked; the message says why and what to do."""
