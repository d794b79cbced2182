"""bench/gpu_check.sh without a GPU: its order and pins, and its Python parts on the CPU (the dry run's way)."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_the_script_parses_and_checks_correctness_before_speed():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    body = text[text.index('echo "== 0.'):]
    order = [body.index(marker) for marker in ("gpu_correctness torchrun", "gpu_correctness float16",
                                               "gpu_correctness gguf", "bench.train_throughput")]
    assert order == sorted(order)
    # pinned, and within ten minutes
    assert re.search(r"BNB_VERSION=\$\{BNB_VERSION:-\d+\.\d+\.\d+\}", text) and 'bitsandbytes==$BNB_VERSION' in text
    assert re.search(r"BUDGET=\$\{BUDGET:-(\d+)\}; LIMIT=\$\{LIMIT:-\d+\}; fi", text).group(1) == "570"


def test_the_peak_is_over_all_steps_on_both_sides_after_a_reset_at_train_begin():
    text = (ROOT / "bench" / "train_throughput.py").read_text()
    hf = text[text.index("def _hf_worker"):text.index("def worker_hf_default")]
    ours = text[text.index("def worker_mactuner("):text.index("def worker_mactuner_compiled")]
    for side in (hf, ours):
        assert "_begin_training(args.device)" in side and "_now(args.device)" in side
    assert "max(p for p, _ in peaks)" in ours  # the intervals' peaks, not the last one's


def test_shapes_are_written_smallest_first_after_each_one(tmp_path):
    from bench.gpu_shapes import main

    out = tmp_path / "shapes.json"
    assert main([str(tmp_path), "--shapes", "qwen2.5-7b,smollm2-135m,qwen2.5-0.5b", "--dry-run", "--json", str(out)]) == 0
    shapes = json.loads(out.read_text())
    assert list(shapes) == ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-7b"]
    assert 7e9 < shapes["qwen2.5-7b"]["parameters"] < 8e9 and 1.3e8 < shapes["smollm2-135m"]["parameters"] < 1.4e8


def test_the_float16_check_skips_the_forced_step_and_trains_on(tiny_model_dir, facts_file, tmp_path, capsys):
    from bench.gpu_correctness import main

    code = main(["float16", "--model", str(tiny_model_dir), "--data", str(facts_file), "--out", str(tmp_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((tmp_path / "correctness-float16.json").read_text())
    assert result["passed"] and result["facts"]["scaler"] and result["facts"]["losses"][1] == "nan"
    assert all(math.isfinite(x) for i, x in enumerate(result["facts"]["losses"]) if i != 1)


def test_the_torchrun_check_evaluates_and_resumes(tiny_model_dir, facts_file, tmp_path, capsys):
    from bench.gpu_correctness import main

    code = main(["torchrun", "--model", str(tiny_model_dir), "--data", str(facts_file), "--out", str(tmp_path),
                 "--device", "cpu", "--gpus", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    facts = json.loads((tmp_path / "correctness-torchrun.json").read_text())["facts"]
    assert facts["state"] == "finished" and facts["step"] == 6 and [s for s, _ in facts["evals"]] == [2, 4, 6]
