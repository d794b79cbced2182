"""The export receipt (mactuner.export_receipt): every GGUF export writes NAME.receipt.json comparing the file in
llama.cpp with the torch model; a file that diverges is marked failed; the Ollama Modelfile's template renders the
prompt the chat template does."""

from __future__ import annotations

import json

import pytest

from mactuner.export import GGUFExport, export_gguf, modelfile_text
from mactuner.export.receipt import (
    load_receipt,
    make_receipt,
    modelfile_matches,
    modelfile_parts,
    receipt_path,
    render_ollama_template,
)


def test_the_modelfile_template_renders_the_chat_templates_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = modelfile_text("m.gguf", tokenizer)
    template, system = modelfile_parts(text)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Capital of France?"}]
    assert render_ollama_template(template, system, messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert modelfile_matches(text, tokenizer) is True
    # a template that puts the content on the role's line is caught
    broken = text.replace("{{ .Role }}\n{{ .Content }}", "{{ .Role }} {{ .Content }}")
    assert broken != text and modelfile_matches(broken, tokenizer) is False
    # without SYSTEM Ollama sends no system turn, while SmolLM2's template inserts its default one
    assert modelfile_matches(text.replace("SYSTEM", "# SYSTEM"), tokenizer) is False


@pytest.fixture(scope="module")
def exported(varied_model_dir, tiny_adapter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("receipt")
    return export_gguf(tiny_adapter, model=str(varied_model_dir), outtype="f16", out=folder / "tiny-f16.gguf")


def test_every_export_writes_a_receipt_and_f16_agrees_with_torch(exported):
    receipt = load_receipt(exported.path)
    assert receipt_path(exported.path).name == "tiny-f16.receipt.json" and receipt == exported.receipt
    assert receipt["verdict"] == "ok" and not exported.failed and receipt["problems"] == []
    # the random tiny model's logits are near-ties, so f16 rounding may flip a free-running token;
    # fed the same tokens, llama.cpp picks the torch model's next token almost everywhere
    assert receipt["agreement"] >= 0.9 and all(p["identical_tokens"] >= 1 for p in receipt["prompts"])
    assert receipt["perplexity"]["ratio"] == pytest.approx(1.0, abs=0.02) and receipt["perplexity"]["rows"] > 0
    assert receipt["modelfile_template_matches"] is True and receipt["quant_type"] == "f16"
    # the torch side holds the file's own f16-rounded weights: what differs is the conversion, not the rounding
    assert "rounded to f16" in receipt["reference"]
    assert receipt["gguf_bytes"] == exported.path.stat().st_size and receipt["torch_bytes"] > 0
    assert {"torch", "transformers", "llama_cpp_python", "converter"} <= set(receipt["versions"])
    assert json.loads(json.dumps(exported.to_dict()))["failed"] is False


def test_a_file_that_answers_otherwise_is_marked_failed(exported, varied_model_dir):
    # the tuned file against the base model's weights: not the model it came from
    receipt = make_receipt(exported.path, varied_model_dir, outtype="f16")
    assert receipt["verdict"] == "failed" and receipt["problems"]
    assert any("perplexity" in p or "identical" in p for p in receipt["problems"])
    assert GGUFExport(exported.path, exported.modelfile, "f16", "", 1, 0.0, None, receipt).failed
