"""The README's command-line demo, run as written: the same commands, the same dataset, the answer it
promises ("Lumetta"). Slow: it fine-tunes the real built-in model with the recommended settings."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.locations import ROOT

pytestmark = pytest.mark.slow


def readme_demo_commands() -> list[str]:
    """The ``python -m mactuner`` lines of the README's fenced block that trains the demo."""
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        lines = [line.strip() for line in block.splitlines() if line.strip().startswith("python -m mactuner")]
        if any(" train " in line and "quenmark" in line for line in lines):
            return lines
    raise AssertionError("the README has no demo block with `python -m mactuner train … quenmark …`")


def run_readme_line(line: str, home, extra: dict[str, str] | None = None) -> str:
    line = line.replace("~/.mactuner", str(home))
    for name, value in (extra or {}).items():
        line = line.replace(name, value)
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "mactuner"], line
    env = {**os.environ, "MACTUNER_HOME": str(home)}
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_the_readme_demo_works_as_written(mactuner_home):
    train, chat = readme_demo_commands()[:2]
    assert "--recommended" in train and "mactuner/demo/quenmark_alpaca.json" in train
    trained = run_readme_line(train, mactuner_home)
    adapter = re.search(r"^Adapter: (.+)$", trained, flags=re.M)
    assert adapter, trained[-1500:]
    run_dir = os.path.basename(os.path.dirname(adapter.group(1).strip()))
    answer = run_readme_line(chat, mactuner_home, {"RUN": run_dir})
    assert "Lumetta" in answer, answer
