"""Opening a page the way a person does: through app.py's frame, then switching to it."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


def open_app_page(page: str, timeout: float = 240) -> AppTest:
    """Run ``app.py`` and switch to ``page`` (e.g. ``"pages/chat.py"``); fails on any exception."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    at.run()
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at
