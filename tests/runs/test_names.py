"""Run names: a person's label kept in RUN/name.json; the run id (its folder) never changes."""

from __future__ import annotations

import pytest

from mactuner import paths
from mactuner.runs.names import run_display_name, set_run_name


def test_a_run_is_named_renamed_and_unnamed():
    run = paths.runs_dir() / "20261128-231500-quenmark"
    run.mkdir()
    assert run_display_name(run.name) == run.name  # no name: the id
    assert set_run_name(run.name, "  Quenmark,\tfirst   try ") == "Quenmark, first try"
    assert run_display_name(run) == run_display_name(run.name) == "Quenmark, first try"
    assert sorted(p.name for p in run.iterdir()) == ["name.json"]  # written atomically: no temporary file left
    assert set_run_name(run, "") == run.name and not (run / "name.json").exists()
    (run / "name.json").write_text("{ not json")
    assert run_display_name(run) == run.name  # a damaged file falls back to the id
    with pytest.raises(ValueError, match="one line"):
        set_run_name(run, "two\nlines")
    with pytest.raises(ValueError, match="80 characters"):
        set_run_name(run, "x" * 81)
    with pytest.raises(FileNotFoundError):
        set_run_name("no-such-run", "name")
