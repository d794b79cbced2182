"""Shared test set-up: every test gets its own MacTuner home; the converted
model cache is shared across the session so the default model converts once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "third_party"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MACTUNER_MODEL_CACHE", str(ROOT / ".cache" / "models"))


@pytest.fixture(autouse=True)
def mactuner_home(tmp_path, monkeypatch):
    """A fresh ``MACTUNER_HOME`` per test: settings, runs and collections never leak."""
    home = tmp_path / "mactuner-home"
    monkeypatch.setenv("MACTUNER_HOME", str(home))
    return home
