"""torch.compile of the decoder layers: the same training as eager, a plain PEFT adapter,
``auto`` deciding from measured costs, and a broken compiler that never ends a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mactuner.train import Trainer
from mactuner.training.compiled import LayerCompiler, compile_dir, decoder_layers, missing_compiler
from tests.features import requires
from tests.locations import ROOT
from tests.train_support import InfoLines, tiny_config, train_losses


@pytest.fixture
def inductor_cache(tmp_path, monkeypatch):
    """A cold TorchInductor cache of this test's own, and Dynamo's in-process cache emptied: a decoder layer
    compiled by an earlier test of this process is otherwise reused without tracing, and writes nothing here."""
    folder = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
    torch._dynamo.reset()
    yield folder
    torch._dynamo.reset()


def test_the_decoder_stack_is_found(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert decoder_layers(model) is model.model.layers
    assert decoder_layers(torch.nn.Linear(2, 2)) is None


def test_mps_and_a_missing_compiler_are_named(monkeypatch):
    assert "MPS" in missing_compiler("mps")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "C++ compiler" in missing_compiler("cpu")
    assert missing_compiler("cuda") is None


def test_the_eager_context_changes_nothing_until_entered():
    """The last CI run: a forgetting check that returned before entering ``eager()`` left the whole process's
    compiles running eagerly (``torch.compiler.set_stance`` called alone is global)."""
    from torch._dynamo import eval_frame

    before = eval_frame._stance.stance
    unused = LayerCompiler.eager()
    assert eval_frame._stance.stance == before
    with unused:
        assert eval_frame._stance.stance == "force_eager"
    assert eval_frame._stance.stance == before


def test_auto_leaves_a_short_run_eager_and_says_why(tiny_model_dir, facts_file):
    infos = InfoLines()
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, max_steps=4, compile="auto"), callbacks=[infos])
    trainer.run()
    assert not trainer._compiler.compiled
    assert any(line.startswith("Layers not compiled: the 2 steps left would save") for line in infos.lines), infos.lines


@requires("compiler")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_compiled_layers_train_like_eager_and_save_a_plain_adapter(
    tiny_model_dir, facts_file, tmp_path, inductor_cache, checkpointing
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = dict(max_steps=6, gradient_checkpointing=checkpointing, eval_every=3, dtype="float32")
    eager = Trainer(tiny_config(tiny_model_dir, facts_file, **settings), tmp_path / "eager")
    eager.run()

    # auto, told by an earlier record that compiling costs nothing here: it compiles after step 2
    compiled_run = tmp_path / "compiled"
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, compile="auto", **settings), compiled_run)
    trainer.setup()
    (compile_dir() / f"{trainer._compiler.key}.json").write_text(json.dumps({"compile_seconds": 0.0}))
    infos = InfoLines()
    trainer.callbacks.append(infos)
    trainer.run()
    assert trainer._compiler.compiled
    assert any("Compiling the 2 decoder layers" in line for line in infos.lines), infos.lines
    # the compile cost was measured and kept for the next run's decision: the planted record is replaced by a
    # measured one (with the step-time saving). The cost itself is ~0 when an earlier test of this process
    # compiled the same graphs (TorchInductor's in-process cache), so only its sign is checked.
    record = json.loads((compile_dir() / f"{trainer._compiler.key}.json").read_text())
    assert "saving" in record and record["compile_seconds"] >= 0 and 0 <= record["saving"] < 1
    assert any(inductor_cache.rglob("*")), "TorchInductor wrote nothing: the layers did not compile"

    expected, got = train_losses(tmp_path / "eager"), train_losses(compiled_run)
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=2e-3, abs=2e-3), (step, expected, got)
    val = [json.loads(line)["val_loss"] for line in (compiled_run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(val) == 2 and all(v == v for v in val)

    # the adapter is a plain PEFT adapter whose logits match the compiled model's
    input_ids = torch.tensor([trainer.train_units[0].input_ids])
    with torch.no_grad(), LayerCompiler.eager():
        ours = trainer.model.eval()(input_ids=input_ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, compiled_run / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=input_ids).logits, ours)


def test_a_compiler_that_fails_is_reported_and_the_run_goes_on(tiny_model_dir, facts_file, tmp_path):
    """A real failing compiler (``CXX=/bin/false``): the run ends as an eager one would, with a note."""
    config_file = tiny_config(tiny_model_dir, facts_file, max_steps=4, compile="on").save(tmp_path / "c.yaml")
    run_dir = tmp_path / "run"
    env = dict(os.environ, CXX="/bin/false", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), MACTUNER_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [sys.executable, "-m", "mactuner", "train", str(config_file), "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "torch.compile failed" in output and "goes on without compiling" in output, output
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    eager = Trainer(tiny_config(tiny_model_dir, facts_file, max_steps=4), tmp_path / "eager")
    eager.run()
    assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-5)


@pytest.mark.parametrize(
    ("dtype", "record", "compiles"),
    [
        ("torch.float32", {"compile_seconds": 10, "saving": 0.5}, True),
        ("torch.float32", {"compile_seconds": 60, "saving": 0.2}, False),
        ("torch.float32", None, False),
        ("torch.bfloat16", {"compile_seconds": 10}, True),
        ("torch.bfloat16", None, False),
    ],
    ids=["pays-back", "does-not", "cold-float32", "warm-bfloat16-guess", "cold-bfloat16"],
)
def test_auto_weighs_the_saving_against_the_compile_time(tiny_model_dir, dtype, record, compiles):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lines = []
    compiler = LayerCompiler("auto", model, "cpu", {"model": "tiny", "dtype": dtype}, lines.append, lambda stage, message: None)
    if record is not None:
        (compile_dir() / f"{compiler.key}.json").write_text(json.dumps(record))
    compiler.after_step(99, 1.0, 100)
    assert not compiler.decided  # step 1 carries one-off costs: no decision from it
    # a step of 1 s with 98 steps left saves 49 s at 50 %, 19.6 s at 20 %, 7.8 s at float32's guessed 8 %
    # and 14.7 s at bfloat16's guessed 15 %; without a record compiling is guessed to cost 60 s
    compiler.after_step(98, 1.0, 100)
    assert compiler.decided and compiler.compiled is compiles
    assert any(line.startswith("Compiling the 2 decoder layers" if compiles else "Layers not compiled") for line in lines), lines
    compiler.uncompile()
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
