"""The settings file: exact round trip, unknown keys kept, damage tolerated."""

from __future__ import annotations

import json

import pytest

from mactuner import paths
from mactuner.settings import Settings, load_settings, remember_device, save_settings


def test_missing_file_gives_defaults():
    assert not paths.settings_file().exists()
    assert load_settings() == Settings(default_device=None)


def test_round_trip_is_exact():
    settings = Settings(default_device="cuda:1", extra={"theme": "dark", "nested": {"a": [1, 2]}})
    assert Settings.from_dict(settings.to_dict()) == settings
    save_settings(settings)
    assert load_settings() == settings


def test_remember_device_keeps_keys_it_does_not_know():
    # another (newer) MacTuner wrote a key this version does not know
    paths.settings_file().write_text(json.dumps({"default_device": "cpu", "future_option": 3}))
    remember_device("mps")
    on_disk = json.loads(paths.settings_file().read_text())
    assert on_disk == {"default_device": "mps", "future_option": 3}
    remember_device(None)
    assert load_settings().default_device is None


def test_damaged_file_is_ignored_not_fatal(caplog):
    paths.settings_file().write_text("{not json")
    assert load_settings() == Settings()
    assert "Ignoring unreadable settings file" in caplog.text
    paths.settings_file().write_text("[1, 2]")
    assert load_settings() == Settings()


def test_save_leaves_no_temporary_files():
    save_settings(Settings(default_device="cpu"))
    save_settings(Settings(default_device="cuda:0"))
    assert sorted(p.name for p in paths.home().iterdir()) == ["settings.json"]


def test_bad_value_is_named():
    with pytest.raises(ValueError, match="default_device must be a device name.*got 3"):
        Settings(default_device=3)
