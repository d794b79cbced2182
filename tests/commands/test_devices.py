"""``python -m mactuner devices …``: the original API's JSON shapes, exit codes,
and the remembered default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mactuner.cli import main
from mactuner.settings import load_settings
from tests.locations import ROOT


def run_json(capsys, *argv) -> tuple[int, dict]:
    code = main(["devices", *argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_list_on_two_gpus(two_cuda_gpus, capsys):
    code, data = run_json(capsys, "list")
    assert code == 0
    assert data["count"] == 3 and len(data["devices"]) == 3
    assert [d["device"] for d in data["devices"]] == ["cuda:0", "cuda:1", "cpu"]
    first = data["devices"][0]
    assert first["name"] == "NVIDIA RTX 3090 (ID: 0)" and first["memory_total"] == 24.0
    assert first["compute_capability"] == "8.6" and first["is_available"] is True
    assert {"memory_allocated", "memory_reserved", "type", "index"} <= first.keys()


def test_list_as_a_table(two_cuda_gpus, capsys):
    assert main(["devices", "list"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA T4 (ID: 1)" in out and "7.5" in out and "float16" in out and "3 devices" in out


def test_select_remembers_the_device(two_cuda_gpus, capsys):
    code, data = run_json(capsys, "select", "cuda")
    assert code == 0
    assert data["success"] is True
    assert data["selected_device"] == "cuda" and data["current_device"] == "cuda:0"
    assert data["message"]
    assert load_settings().default_device == "cuda:0"

    code, data = run_json(capsys, "select", "cuda:1")
    assert data["current_device"] == "cuda:1" and data["dtype"] == "float16"
    code, current = run_json(capsys, "current")
    assert code == 0
    assert current["device"] == "cuda:1" and current["source"] == "settings"
    assert current["memory_allocated"] == 2.0 and current["memory_reserved"] == 3.0
    code, memory = run_json(capsys, "memory")
    assert {k: memory[k] for k in ("device", "allocated", "reserved", "total", "available")} == {
        "device": "cuda:1",
        "allocated": 2.0,
        "reserved": 3.0,
        "total": 15.0,
        "available": 10.0,
    }


def test_select_refuses_a_missing_gpu(two_cuda_gpus, capsys):
    code = main(["devices", "select", "cuda:5"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "cuda:5" in lines[0] and "2 CUDA GPUs" in lines[0]
    assert load_settings().default_device is None  # nothing remembered


def test_auto_select_with_priority(mps_mac, capsys):
    code, data = run_json(capsys, "auto-select")
    assert code == 0 and data["current_device"] == "mps" and data["dtype"] == "bfloat16"
    assert load_settings().default_device == "mps"
    code, data = run_json(capsys, "auto-select", "--priority", "cuda,cpu")
    assert data["current_device"] == "cpu"
    code = main(["devices", "auto-select", "--priority", "tpu"])
    assert code == 1 and "tpu" in capsys.readouterr().err


def test_memory_clear_cache_and_health_on_the_cpu(cpu_only, capsys):
    code, memory = run_json(capsys, "memory", "--device", "cpu")
    assert code == 0 and memory["device"] == "cpu" and memory["total"] > 0
    assert memory["allocated"] > 0 and memory["available"] > 0

    # ~120 MB kept alive only by a reference cycle: the command must collect it and say how much it freed
    blocks = [bytearray(64 * 1024) for _ in range(1900)]
    holder = {"blocks": blocks}
    holder["self"] = holder
    del blocks, holder
    code, cleared = run_json(capsys, "clear-cache")
    assert code == 0 and cleared["success"] is True and cleared["device"] == "cpu"
    assert cleared["freed_bytes"] >= 60 * 1024**2 and cleared["message"].startswith("Freed ")

    code, report = run_json(capsys, "health")
    assert code == 0 and report["status"] == "ok"
    assert report["devices"][0]["device"] == "cpu" and report["devices"][0]["ok"]
    assert main(["devices", "health"]) == 0
    assert "troubleshooting:" in capsys.readouterr().out


def test_real_process_exit_code_and_stderr(tmp_path):
    # the real command line as a person runs it, on this machine
    env = {**os.environ, "MACTUNER_HOME": str(tmp_path / "home")}
    bad = subprocess.run(
        [sys.executable, "-m", "mactuner", "devices", "select", "cuda:5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 1 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "cuda:5 is not available" in bad.stderr
    good = subprocess.run(
        [sys.executable, "-m", "mactuner", "devices", "list", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert good.returncode == 0
    data = json.loads(good.stdout)
    assert data["count"] == len(data["devices"]) >= 1 and data["devices"][-1]["type"] == "cpu"


def test_select_without_a_device_says_what_to_do(capsys):
    assert main(["devices", "select"]) == 1
    assert "say which device" in capsys.readouterr().err


def test_unknown_action_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["devices", "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
