"""GGUF export, checked in the runtimes people use: llama.cpp (llama-cpp-python) loads the file with the
chat template from its own metadata and answers as the merged torch model does; transformers loads it back
with ``gguf_file=``; a file MacTuner did not write is never replaced without --overwrite."""

from __future__ import annotations

import json

import pytest
import torch

from mactuner.chat import GenerationSettings
from mactuner.export import (
    ExportError,
    export_gguf,
    export_label,
    gguf_metadata,
    gguf_tag,
    is_chatml,
    modelfile_text,
    template_default_system,
)
from mactuner.fileio import STAGING_PREFIX
from tests.features import requires

needs_llama_cpp = requires("llama_cpp")
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = GenerationSettings(max_new_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def merged_dir(varied_model_dir, tiny_adapter, tmp_path_factory):
    """The tiny adapter merged into the varied tiny model (the torch reference)."""
    from mactuner.export.merge import merge_adapter

    return merge_adapter(tiny_adapter, tmp_path_factory.mktemp("merged") / "merged", base=str(varied_model_dir))


@pytest.fixture(scope="module")
def f16_export(varied_model_dir, tiny_adapter, tmp_path_factory):
    """The tiny adapter exported as f16 over a file that was not MacTuner's: refused, then --overwrite."""
    folder = tmp_path_factory.mktemp("gguf")
    target = folder / "tiny-f16.gguf"
    target.write_bytes(b"my own notes")
    with pytest.raises(ExportError, match="not written by MacTuner"):
        export_gguf(tiny_adapter, model=str(varied_model_dir), outtype="f16", out=target)
    assert target.read_bytes() == b"my own notes"
    steps, messages = [], []
    result = export_gguf(tiny_adapter, model=str(varied_model_dir), outtype="f16", out=target, overwrite=True,
                         progress=lambda message, fraction: (steps.append(fraction), messages.append(message)))
    assert [f for f in steps if f is not None] == sorted(f for f in steps if f is not None) and steps[-1] == 1.0
    # what the page shows while it works: no hidden staging folder's name (issue 21), no absolute path
    assert not [m for m in messages if STAGING_PREFIX in m or str(folder) in m], messages
    return result


def test_default_names_are_unique_per_run_and_step(tmp_path):
    run = tmp_path / "runs" / "quenmark-1"
    assert export_label(run / "adapter") == "quenmark-1-final"
    assert export_label(run / "checkpoints" / "step-00000050") == "quenmark-1-step-50"
    assert export_label(tmp_path / "runs" / "other" / "checkpoints" / "step-00000050") == "other-step-50"
    assert export_label(model="HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"


def test_a_foreign_modelfile_is_not_replaced(varied_model_dir, tmp_path):
    target = tmp_path / "model.gguf"
    (tmp_path / "model.Modelfile").write_text("FROM llama3\n")
    with pytest.raises(ExportError, match="not written by MacTuner"):
        export_gguf(merged=varied_model_dir, outtype="q8_0", out=target)
    assert (tmp_path / "model.Modelfile").read_text() == "FROM llama3\n" and not target.exists()
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(ExportError, match="is a folder"):
        export_gguf(merged=varied_model_dir, outtype="q8_0", out=tmp_path / "folder.gguf")
    with pytest.raises(ExportError, match="must end in .gguf"):
        export_gguf(merged=varied_model_dir, outtype="q8_0", out=tmp_path / "model.bin")
    assert not list(tmp_path.glob("*.tmp"))


def test_modelfile_for_a_chatml_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert is_chatml(tokenizer)
    default = template_default_system(tokenizer)
    assert default and "SmolLM" in default  # SmolLM2's template adds this system turn when there is none
    text = modelfile_text("run-final-q8_0.gguf", tokenizer, system_prompt='Answer "briefly".')
    assert text.splitlines()[2] == "FROM ./run-final-q8_0.gguf"
    assert '{{ range .Messages }}' in text.replace("{{- range", "{{ range") and "<|im_start|>assistant" in text
    assert 'SYSTEM """Answer "briefly"."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    # without the run's own prompt, the template's default keeps what the model was trained with
    assert f'SYSTEM """{default}"""' in modelfile_text("x.gguf", tokenizer)


def test_exported_file_carries_template_tag_and_modelfile(f16_export, tiny_model_dir):
    from transformers import AutoTokenizer

    meta = gguf_metadata(f16_export.path)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 1  # MOSTLY_F16
    assert meta["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    tag = gguf_tag(f16_export.path)
    assert tag["outtype"] == "f16" and "adapter" in tag["source"]
    assert f16_export.modelfile.read_text().splitlines()[2] == f"FROM ./{f16_export.path.name}"
    assert not list(f16_export.path.parent.glob(".*.tmp"))


@needs_llama_cpp
def test_llama_cpp_answers_as_the_merged_model(f16_export, merged_dir):
    """The f16 file in llama.cpp, prompted with its own metadata's template: the same prompt tokens and the
    same greedy tokens as the merged float32 torch model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mactuner.chat.llamacpp import encode_gguf_prompt, load_gguf_chat_model, stream_gguf_chat

    expected = AutoTokenizer.from_pretrained(merged_dir).apply_chat_template(QUESTION, add_generation_prompt=True,
                                                                             return_dict=True)["input_ids"]
    model = load_gguf_chat_model(f16_export.path)
    try:
        assert encode_gguf_prompt(model, QUESTION, GREEDY) == list(expected)
        stream = stream_gguf_chat(model, QUESTION, GREEDY)
        text = "".join(stream)
    finally:
        model.close()
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.tensor([expected])
    with torch.inference_mode():
        theirs = reference.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    assert text.strip() and stream.stats.finish_reason == "length" and stream.stats.new_tokens == 16
    assert stream.token_ids == theirs.tolist()
    assert stream.stats.tokens_per_second > 0 and stream.stats.prompt_tokens == len(expected)


def test_transformers_loads_the_f16_file_back(f16_export, merged_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = f16_export.path.parent, f16_export.path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(merged_dir).apply_chat_template(QUESTION, add_generation_prompt=True,
                                                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"] == ids[0].tolist()
    with torch.inference_mode():
        ours = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        theirs = reference.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()


@needs_llama_cpp
def test_export_command_q8_0_of_a_model_folder(varied_model_dir, mactuner_home, capsys):
    """The command line, default name: the q8_0 file loads in llama.cpp and the Modelfile sits beside it."""
    from mactuner.chat.llamacpp import gguf_chat, load_gguf_chat_model
    from mactuner.cli import main

    assert main(["export", "--merged", str(varied_model_dir), "--format", "gguf", "--outtype", "q8_0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    path = mactuner_home / "exports" / "gguf" / f"{varied_model_dir.name}-q8_0.gguf"
    assert out["path"] == str(path) and path.stat().st_size == out["size_bytes"]
    assert gguf_metadata(path)["general.file_type"] == 7  # MOSTLY_Q8_0
    assert (mactuner_home / "exports" / "gguf" / ".mactuner-output").is_file()
    model = load_gguf_chat_model(path)
    try:
        text, stats = gguf_chat(model, QUESTION, GREEDY)
    finally:
        model.close()
    assert stats.new_tokens == 16 and text.strip()


@pytest.mark.slow
@needs_llama_cpp
def test_demo_run_exports_state_the_tuned_fact_in_llama_cpp(installed_demo_run, mactuner_home, capsys):
    """The Quenmark demo, trained, exported as q8_0 and f16: llama.cpp (the chat template from the file's
    metadata) states the demo facts; the f16 file loaded back in transformers gives the merged model's
    first 32 greedy tokens; `eval --json` shows the tuned loss below the base loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mactuner.chat.llamacpp import gguf_chat, load_gguf_chat_model
    from mactuner.cli import main
    from mactuner.export.merge import merge_adapter
    from tests.demo_support import demo_facts

    facts = demo_facts(3)
    run = installed_demo_run
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    exports = {t: export_gguf(run / "adapter", outtype=t) for t in ("q8_0", "f16")}
    assert exports["q8_0"].path.name == "quenmark-final-q8_0.gguf"
    # issue 22: the f16 file's receipt, llama.cpp against the merged torch model, greedy: the first K tokens of
    # every prompt identical
    receipt = exports["f16"].receipt
    print(f"demo f16 receipt: first {receipt['first_k_identical']} tokens identical, prompts {receipt['prompts_identical']}, "
          f"perplexity ratio {receipt['perplexity']['ratio']}, agreement {receipt['agreement']}")
    assert receipt["verdict"] == "ok" and receipt["first_k_identical"] == f"{receipt['k']}/{receipt['k']}", receipt
    assert exports["q8_0"].receipt["verdict"] == "ok", exports["q8_0"].receipt["problems"]
    for outtype, result in exports.items():
        model = load_gguf_chat_model(result.path)
        try:
            replies = [gguf_chat(model, [{"role": "user", "content": f["question"]}], settings)[0] for f in facts]
        finally:
            model.close()
        stated = [f["answer_keyword"] for f, r in zip(facts, replies) if f["answer_keyword"].lower() in r.lower()]
        assert len(stated) >= len(facts) - 1, (outtype, replies)

    merged = merge_adapter(run / "adapter", mactuner_home / "merged")
    question = [{"role": "user", "content": facts[0]["question"]}]
    ids = AutoTokenizer.from_pretrained(merged).apply_chat_template(question, add_generation_prompt=True,
                                                                    return_tensors="pt", return_dict=True)["input_ids"]
    f16 = exports["f16"].path
    reloaded = AutoModelForCausalLM.from_pretrained(f16.parent, gguf_file=f16.name, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.inference_mode():
        ours = reloaded.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
        theirs = reference.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()
    assert facts[0]["answer_keyword"] in AutoTokenizer.from_pretrained(merged).decode(theirs)

    capsys.readouterr()
    # the demo run holds no rows out: evaluate on its training rows, as asked (the result says so)
    assert main(["eval", "--adapter", str(run / "adapter"), "--rows", "training", "--json", "--max-prompts", "3",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tuned_loss"] < out["base_loss"] / 2, (out["base_loss"], out["tuned_loss"])
    assert out["tuned_keyword_hit"] > out["base_keyword_hit"]
