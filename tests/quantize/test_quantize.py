"""Merge and quantization: refusals with reasons, merged logits, every variant loads and answers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mactuner.chat import GenerationSettings, chat, load_chat_model
from mactuner.export.merge import merge_adapter
from mactuner.quantize import METHODS, VARIANT_FILE, load_variant, quantize, supported_methods, unsupported_reason
from mactuner.quantize.compare import compare_variants, model_memory_bytes, perplexity

TEXT = (
    "The Nile is a major north-flowing river in northeastern Africa. It flows into the Mediterranean Sea. "
    "The Nile is among the longest rivers in the world, about 6,650 kilometres long."
)
QUESTION = [{"role": "user", "content": "Where does the Nile flow?"}]
CPU_METHODS = ["int8-dynamic", "int8-weight-only", "int4-weight-only"]


def test_methods_refused_with_reasons():
    assert supported_methods("cpu") == CPU_METHODS
    assert "CUDA" in unsupported_reason("bnb-4bit", "cpu")
    assert "MPS" in unsupported_reason("int8-weight-only", "mps")
    assert "unknown method" in unsupported_reason("gptq", "cpu")
    assert set(METHODS) >= set(CPU_METHODS) | {"bnb-8bit", "bnb-4bit"}
    with pytest.raises(ValueError, match="CUDA"):
        quantize(None, "bnb-8bit", device="cpu")


def test_merged_model_logits_equal_base_plus_adapter(varied_model_dir, tiny_adapter, mactuner_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = merge_adapter(tiny_adapter, base=str(varied_model_dir))
    assert folder.parent == mactuner_home / "exports"
    assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # plain transformers, no peft
    base = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(tiny_adapter)).eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5, 60]])
    with torch.inference_mode():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", CPU_METHODS)
def test_each_variant_is_saved_reloads_and_answers(varied_model_dir, method, tmp_path):
    folder = quantize(str(varied_model_dir), method, tmp_path / method, device="cpu")
    assert json.loads((folder / VARIANT_FILE).read_text())["method"] == method
    variant = load_variant(folder, device="cpu")
    text, stats = chat(variant, QUESTION, GenerationSettings(temperature=0, max_new_tokens=12))
    assert stats.new_tokens == 12 and text.strip()
    # the quantized model still computes (nearly) the same function as the original
    original = load_chat_model(str(varied_model_dir), device="cpu", dtype=torch.float32)
    ids = torch.tensor([[1, 20, 300, 4000, 5, 60]])
    with torch.inference_mode():
        a = variant.model(ids).logits.float().flatten()
        b = original.model(ids).logits.float().flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
    ppl, tokens = perplexity(variant, TEXT)
    assert math.isfinite(ppl) and tokens > 20
    if method != "int8-dynamic":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(folder)  # a standard transformers folder


def test_compare_variants_reports_every_method(varied_model_dir, tiny_adapter, tmp_path):
    report = compare_variants(
        str(varied_model_dir), ["int8-weight-only", "bnb-4bit"], adapter=tiny_adapter, device="cpu",
        text=TEXT, out_dir=tmp_path / "variants",
    )
    names = [v.name for v in report.variants]
    assert names == ["merged", "int8-weight-only", "bnb-4bit"]
    merged, int8, bnb = report.variants
    assert merged.error is None and int8.error is None
    assert int8.size_bytes < merged.size_bytes
    assert int8.memory_bytes < merged.memory_bytes
    assert merged.tokens_per_second > 0 and math.isfinite(int8.perplexity)
    assert "CUDA" in bnb.error
    saved = json.loads((tmp_path / "variants" / "report.json").read_text())
    assert [v["name"] for v in saved["variants"]] == names
    assert report.table()[1]["variant"] == "int8-weight-only"


def test_memory_counts_quantized_weights(varied_model_dir, tmp_path):
    original = load_chat_model(str(varied_model_dir), device="cpu", dtype=torch.float32)
    folder = quantize(str(varied_model_dir), "int8-weight-only", tmp_path / "q", device="cpu")
    fp32 = model_memory_bytes(original.model)
    assert fp32 == pytest.approx(original.num_parameters * 4, rel=0.05)
    assert model_memory_bytes(load_variant(folder, device="cpu").model) < fp32 / 2


@pytest.mark.slow
def test_real_model_int8_still_knows_paris(smollm2_path, tmp_path):
    folder = quantize(None, "int8-weight-only", tmp_path / "int8", device="cpu")
    variant = load_variant(folder, device="cpu")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    text, _ = chat(variant, question, GenerationSettings(temperature=0, max_new_tokens=20))
    assert "Paris" in text


def test_merge_and_quantize_commands(varied_model_dir, tiny_adapter, tmp_path, capsys):
    from mactuner.cli import main

    assert main(["merge", "--adapter", str(tiny_adapter), "--model", str(varied_model_dir),
                 "--out", str(tmp_path / "merged"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(tmp_path / "merged")
    assert main(["quantize", "--list", "--json", "--device", "cpu"]) == 0
    listed = {m["method"]: m["refused"] for m in json.loads(capsys.readouterr().out)["methods"]}
    assert listed["int8-weight-only"] is None and "CUDA" in listed["bnb-8bit"]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["quantize", "--model", str(tmp_path / "merged"), "--method", "int8-dynamic", "--device", "cpu",
                 "--text-file", str(text), "--out", str(tmp_path / "variants")]) == 0
    out = capsys.readouterr().out
    assert "int8-dynamic" in out and "perplexity" in out
    assert main(["quantize", "--method", "gptq", "--device", "cpu"]) == 2


# --- output folders: never delete what MacTuner did not create (issue 9 rows 1-2) -----------


def personal_folder(path):
    """A folder of the person's own files, as `--out ~/my_documents` would name."""
    path.mkdir(parents=True)
    (path / "thesis.docx").write_bytes(b"years of work")
    (path / "notes").mkdir()
    (path / "notes" / "todo.txt").write_text("call mum")
    return path


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_merge_refuses_a_folder_of_the_persons_files_unless_overwrite(varied_model_dir, tiny_adapter, tmp_path, capsys):
    from mactuner.cli import main
    from mactuner.fileio import MARKER_FILE, OutputNotOurs

    docs = personal_folder(tmp_path / "my_documents")
    before = files_under(docs)
    with pytest.raises(OutputNotOurs, match="did not create.*--overwrite"):
        merge_adapter(tiny_adapter, docs, base=str(varied_model_dir))
    assert main(["merge", "--adapter", str(tiny_adapter), "--model", str(varied_model_dir), "--out", str(docs)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert files_under(docs) == before and (docs / "thesis.docx").read_bytes() == b"years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    # a file in the way is refused too, and a symbolic link even with overwrite (its target is never replaced)
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(OutputNotOurs, match="is a file"):
        merge_adapter(tiny_adapter, tmp_path / "a-file", base=str(varied_model_dir))
    (tmp_path / "link").symlink_to(docs)
    with pytest.raises(OutputNotOurs, match="symbolic link"):
        merge_adapter(tiny_adapter, tmp_path / "link", base=str(varied_model_dir), overwrite=True)
    assert files_under(docs) == before

    # confirmed: the folder is replaced by the merged model, marked as MacTuner's…
    assert main(["merge", "--adapter", str(tiny_adapter), "--model", str(varied_model_dir), "--out", str(docs),
                 "--overwrite"]) == 0
    assert (docs / "model.safetensors").exists() and (docs / MARKER_FILE).exists()
    assert not (docs / "thesis.docx").exists()
    # …so merging there again needs no confirmation
    assert merge_adapter(tiny_adapter, docs, base=str(varied_model_dir)) == docs


def test_default_merge_folders_are_unique_per_run_and_step(varied_model_dir, tiny_adapter, mactuner_home):
    import shutil

    from mactuner import paths

    folders = []
    for run in ("20260101-000000-alpha", "20260101-000001-beta"):
        step_50 = paths.runs_dir() / run / "checkpoints" / "step-00000050"
        shutil.copytree(tiny_adapter, step_50)
        folders.append(merge_adapter(step_50, base=str(varied_model_dir)))
    assert [f.name for f in folders] == ["20260101-000000-alpha-step-00000050-merged",
                                         "20260101-000001-beta-step-00000050-merged"]
    assert all((f / "model.safetensors").exists() for f in folders)


def test_quantize_out_refuses_the_persons_folder_before_any_work(varied_model_dir, tmp_path, capsys):
    from mactuner.cli import main
    from mactuner.fileio import OutputNotOurs

    docs = personal_folder(tmp_path / "my_documents")
    before = files_under(docs)
    with pytest.raises(OutputNotOurs):
        quantize(str(varied_model_dir), "int8-dynamic", docs, device="cpu")
    assert main(["quantize", "--model", str(varied_model_dir), "--method", "int8-dynamic", "--device", "cpu",
                 "--out", str(docs)]) == 1
    assert "did not create" in capsys.readouterr().err
    assert files_under(docs) == before
