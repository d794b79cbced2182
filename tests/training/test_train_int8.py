"""QLoRA on a CPU: an int8 base whose matmuls (forward and input gradient) run in integers,
an adapter that trains as LoRA's does and loads in plain ``peft`` on the full-precision base."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mactuner.train import Trainer, TrainingError, train
from mactuner.training import int8_base
from mactuner.training.int8_base import Int8BaseLinear, quantize_frozen_linears, quantize_rows
from tests.fake_hardware import fake_mps_mac
from tests.features import requires
from tests.locations import ROOT
from tests.train_support import InfoLines, tiny_config, train_losses

pytestmark = requires("int8_kernels")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_rows_round_to_int8_with_one_scale_each():
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.0, -2.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 1)
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2, 0] == 127
    assert torch.allclose(q.float() * scale, x, atol=float(scale.max()) / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_an_int8_layer_computes_what_the_float_layer_does_forward_and_backward(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True).to(dtype).requires_grad_(False)
    layer = Int8BaseLinear(linear)
    assert layer.weight_int8.dtype == torch.int8 and not list(p for p in layer.parameters() if p.requires_grad)
    x = torch.randn(3, 7, 96, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    out = layer(x)
    want = linear(x_ref)
    assert out.dtype == dtype and out.shape == want.shape
    assert _relative_error(out, want) < 0.03
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    assert x.grad.dtype == dtype and _relative_error(x.grad, x_ref.grad) < 0.03
    # the weight it computes with is the float weight rounded per row
    assert _relative_error(layer.dequantized_weight(), linear.weight) < 0.01


def test_an_input_that_takes_no_gradient_gets_none():
    layer = Int8BaseLinear(torch.nn.Linear(16, 8).requires_grad_(False))
    adapter = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    (layer(x) + adapter(x)).sum().backward()
    assert adapter.weight.grad is not None and x.grad is None


def test_only_the_frozen_base_of_the_layers_becomes_int8(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    lm = model.get_base_model()
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    count = quantize_frozen_linears(lm.model.layers)
    layers = len(lm.model.layers)
    # q, k, v, o, gate, up, down in each layer; the head's base (outside the layers) is kept
    assert count == 7 * layers
    assert sum(isinstance(m, Int8BaseLinear) for m in model.modules()) == 7 * layers
    assert type(lm.lm_head.base_layer) is torch.nn.Linear
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    # the whole model with its head kept: nothing more to swap
    assert quantize_frozen_linears(lm, keep=lm.lm_head.base_layer) == 0


def test_qlora_on_a_cpu_trains_on_an_int8_base_and_saves_a_plain_adapter(
    tiny_model_dir, facts_file, tmp_path, either_cpu
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora_run, qlora_run = tmp_path / "lora", tmp_path / "qlora"
    Trainer(tiny_config(tiny_model_dir, facts_file), lora_run).run()
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, method="qlora"), qlora_run)
    infos = InfoLines()
    trainer.callbacks.append(infos)
    result = trainer.run()

    assert trainer.compute_dtype == getattr(torch, either_cpu)
    assert any("int8" in line and "QLoRA on a CPU" in line for line in infos.lines), infos.lines
    quantized = [m for m in trainer.model.modules() if isinstance(m, Int8BaseLinear)]
    assert len(quantized) == 7 * len(trainer.causal_lm.model.layers)
    assert result.losses[-1] < result.losses[0] - 1.0
    # it learns as LoRA does: the int8 base moves each loss by a little
    lora, qlora = train_losses(lora_run), train_losses(qlora_run)
    assert qlora[1] == pytest.approx(lora[1], rel=0.05)
    assert qlora[8] == pytest.approx(lora[8], rel=0.25)

    # plain peft applies the adapter to the full-precision base, and it learned the data there too
    batch = torch.tensor([trainer.train_units[0].input_ids])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_loss = base(input_ids=batch, labels=batch).loss
    plain = PeftModel.from_pretrained(base, qlora_run / "adapter").eval()
    with torch.no_grad():
        adapted_loss = plain(input_ids=batch, labels=batch).loss
    assert adapted_loss < base_loss - 0.5


def test_qlora_on_mps_is_refused_with_the_alternative(tiny_model_dir, facts_file, tmp_path, monkeypatch):
    fake_mps_mac(monkeypatch)
    with pytest.raises(TrainingError, match="QLoRA with PyTorch runs on an NVIDIA GPU.*or a CPU.*engine: mlx.*method: lora"):
        train(tiny_config(tiny_model_dir, facts_file, method="qlora", device="mps"), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_a_torch_without_int8_matmul_is_told_what_to_do(tiny_model_dir, facts_file, tmp_path, monkeypatch):
    monkeypatch.setattr(int8_base, "int8_matmul_available", lambda device_type: False)
    with pytest.raises(TrainingError, match=r"exact int8 matmul.*VNNI or AMX.*method: lora"):
        train(tiny_config(tiny_model_dir, facts_file, method="qlora"), tmp_path / "run")


def test_the_int8_probe_says_no_off_the_cpu():
    assert int8_base.int8_matmul_available("cpu") and not int8_base.int8_matmul_available("mps")


def test_a_cpu_without_vnni_is_found_out_by_the_probe():
    """oneDNN capped below VNNI (as on a Skylake server) saturates int8 products: QLoRA must not run there."""
    probe = "from mactuner.training.int8_base import int8_matmul_available as f; print(f('cpu'))"
    answers = {}
    for isa in ("AVX2", "AVX2_VNNI"):
        env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa)
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
        answers[isa] = done.stdout.strip()
    assert answers["AVX2"] == "False", answers
    # with AVX-VNNI (where this CPU has it) the same probe passes
    if "avx_vnni" in _cpu_flags():
        assert answers["AVX2_VNNI"] == "True", answers


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


@requires("compiler")
def test_compiled_int8_layers_train_like_eager_ones(tiny_model_dir, facts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    settings = dict(method="qlora", max_steps=6, dtype="float32")
    Trainer(tiny_config(tiny_model_dir, facts_file, **settings), tmp_path / "eager").run()
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, compile="on", **settings), tmp_path / "compiled")
    trainer.run()
    assert trainer._compiler.compiled
    expected, got = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(got) == list(range(1, 7))
    # fused rounding may move a row's int8 rounding by one step: close, not bit-equal
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=2e-2, abs=2e-2), (step, expected, got)


@pytest.mark.slow
def test_qlora_on_a_cpu_teaches_the_demo_facts_to_the_real_model(smollm2_path, tmp_path, mactuner_home):
    """The int8 base is close enough: 30 QLoRA steps teach SmolLM2 the demo facts, stated by the
    full-precision base with the adapter (as a chat of the run does)."""
    from mactuner.chat import GenerationSettings, chat, load_chat_model
    from tests.demo_support import demo_facts, train_demo_run

    run = tmp_path / "qlora-demo"
    result = train_demo_run(run, method="qlora")
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    facts = demo_facts(3)
    tuned = load_chat_model(adapter=run / "adapter", device="cpu")
    settings = GenerationSettings(max_new_tokens=24, temperature=0)
    replies = [chat(tuned, [{"role": "user", "content": f["question"]}], settings)[0] for f in facts]
    assert sum(f["answer_keyword"].lower() in r.lower() for f, r in zip(facts, replies)) >= len(facts) - 1, replies
