"""What a person reads: no None, no snake_case, no 19-digit floats, no absolute paths of MacTuner's own
files, singular counts, and the device test in words (issue 21's "internals on screen")."""

from __future__ import annotations

from pathlib import Path

from mactuner import paths
from mactuner.display import MISSING, health_rows, plural, table_for_people, value_for_people


def test_values_and_keys_read_as_people_expect():
    assert value_for_people(1.7340123456789012345) == 1.734  # the Compare runs table showed all 19 digits
    assert value_for_people(0.021345678) == 0.02135 and value_for_people(12345.678) == 12350.0
    assert value_for_people(None) == MISSING and value_for_people(float("nan")) == MISSING
    assert value_for_people(3) == 3 and value_for_people("lora") == "lora"
    rows = table_for_people([{"lora_rank": 8, "final loss": 1.2345678, "val_loss": None},
                             {"lora_rank": 16, "final loss": 0.5, "val_loss": 0.9876543}])
    assert rows == [{"lora rank": 8, "final loss": 1.235, "val loss": MISSING},
                    {"lora rank": 16, "final loss": 0.5, "val loss": "0.9877"}]


def test_counts_are_singular_for_one():
    assert plural(1, "sample") == "1 sample" and plural(2, "sample") == "2 samples" and plural(0, "chunk") == "0 chunks"


def test_paths_of_mactuners_files_read_relative(mactuner_home):
    assert paths.display_path(mactuner_home / "exports" / "x") == "$MACTUNER_HOME/exports/x"
    assert paths.display_path(Path.home() / "docs" / "a.txt") == "~/docs/a.txt"
    assert paths.display_path("/srv/data/a.txt") == "/srv/data/a.txt"  # a folder the person named stays as it is


def test_the_device_test_reads_in_words():
    probes = [{"name": "CPU", "device": "cpu", "ok": True, "error": None, "dtype": "bfloat16", "float32_ms": 3.7,
               "float32_gflops": 9.1, "bfloat16_ms": 0.051, "speedup_vs_float32": 72.52},
              {"name": "GPU", "device": "cuda:0", "ok": False, "error": "RuntimeError: no kernel"}]
    assert health_rows(probes) == [
        {"device": "cpu", "test": "passed", "float32 speed": "3.7 ms per test product, 9.1 billion operations a second",
         "bfloat16 speed": "72.52× faster than float32"},
        {"device": "cuda:0", "test": "failed: RuntimeError: no kernel"}]
