"""Model sources (default, folder, GGUF, hub id), footprints before loading, clear errors."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from mactuner.models import (
    DEFAULT_MODEL,
    ModelFootprint,
    ModelSourceError,
    _smollm2_gguf,
    gguf_cache_path,
    load_config,
    load_model,
    model_footprint,
    resolve_model_source,
)


def test_footprint_matches_the_loaded_model(tiny_model_dir):
    footprint = model_footprint(str(tiny_model_dir))
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    assert footprint.num_parameters == loaded.num_parameters
    assert (footprint.num_layers, footprint.hidden_size, footprint.intermediate_size) == (2, 64, 128)
    assert footprint.num_key_value_heads == 2 and footprint.head_dim == 16
    assert footprint.vocab_size == len(loaded.tokenizer)
    assert footprint.tie_word_embeddings
    assert footprint.weight_bytes(torch.float32) == sum(p.numel() * 4 for p in loaded.model.parameters())
    assert footprint.weight_bytes("bfloat16") == footprint.num_parameters * 2
    # 4-bit keeps the embeddings and norms, shrinks the block's linear layers
    linear = sum(i * o for name, shapes in footprint.linear_shapes.items() if name != "lm_head" for i, o in shapes)
    assert footprint.weight_bytes(torch.bfloat16, quantized_4bit=True) == int(
        (footprint.num_parameters - linear) * 2 + linear * (0.5 + 4 / 64)
    )


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_parameter_count_matches_peft(tiny_model_dir, targets):
    from peft import LoraConfig, get_peft_model

    footprint = model_footprint(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32).model
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert footprint.lora_parameters(4, targets) == trainable
    with pytest.raises(ValueError, match=r"target modules \['wq'\] are not linear layers of this model"):
        footprint.lora_parameters(4, ["wq"])


def test_footprint_round_trips_to_json(tiny_model_dir):
    import json

    data = json.loads(json.dumps(model_footprint(str(tiny_model_dir)).to_dict()))
    assert data["num_layers"] == 2 and data["linear_shapes"]["q_proj"] == [[64, 64], [64, 64]]
    with pytest.raises(ValueError, match="num_parameters must be positive, got 0"):
        ModelFootprint("x", "llama", 0, 1, 1, 1, 1, 1, 1, 1, None, False)


def test_load_model_reports_progress_and_sets_a_pad_token(tiny_model_dir):
    messages = []
    loaded = load_model(str(tiny_model_dir), device="cpu", progress=lambda m, f: messages.append((m, f)))
    fractions = [f for _, f in messages if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert messages[-1][0].startswith("Loaded ")
    assert loaded.tokenizer.pad_token is not None
    assert loaded.device == torch.device("cpu") and loaded.path == str(tiny_model_dir.resolve())
    assert next(loaded.model.parameters()).dtype == loaded.dtype
    assert not loaded.model.training


def test_source_kinds(tiny_model_dir, tmp_path):
    assert resolve_model_source(None).kind == "default"
    assert resolve_model_source(DEFAULT_MODEL).kind == "default"
    assert resolve_model_source(str(tiny_model_dir)).kind == "folder"
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # an empty but complete header (a cut one is refused)
    assert resolve_model_source(str(gguf)).kind == "gguf"
    # a folder with one .gguf and no config.json means that file
    assert resolve_model_source(str(tmp_path)).gguf_file == str(gguf.resolve())


def test_gguf_cache_key_follows_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("MACTUNER_MODEL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF v1")
    first = gguf_cache_path(gguf)
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    assert gguf_cache_path(gguf) == first
    os.utime(gguf, ns=(1_000_000_000, 1_000_000_000))
    assert gguf_cache_path(gguf) != first
    copy = tmp_path / "other" / "m.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    assert gguf_cache_path(copy) != gguf_cache_path(gguf)


@pytest.mark.parametrize(
    "source, message",
    [
        ("/no/such/model", r"No such model file or folder: /no/such/model"),
        ("./missing-model", r"No such model file or folder"),
        ("not a model!!", r"neither an existing file or folder nor a Hugging Face hub id"),
    ],
)
def test_missing_sources_say_so(source, message):
    with pytest.raises(ModelSourceError, match=message):
        load_model(source, device="cpu")


def test_folder_without_a_model_and_a_file_that_is_not_gguf(tmp_path):
    with pytest.raises(ModelSourceError, match="is a folder but holds no model: a transformers model folder has a config.json"):
        model_footprint(str(tmp_path))
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(ModelSourceError, match="is a file but not a .gguf model"):
        load_model(str(text), device="cpu")


def test_unknown_hub_id_offline_says_offline_and_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as error:
        model_footprint("someone/certainly-not-cached-model")
    text = str(error.value)
    assert "not in the local Hugging Face cache and MacTuner is offline (HF_HUB_OFFLINE is set)" in text
    assert "connect to the internet" in text and DEFAULT_MODEL in text
    with pytest.raises(ModelSourceError, match="MacTuner is offline"):
        load_model("someone/certainly-not-cached-model", device="cpu")


def test_remote_code_is_refused_unless_allowed(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "mactuner_custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}'
    )
    (tmp_path / "configuration_custom.py").write_text(
        "from transformers import PretrainedConfig\n\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'mactuner_custom'\n"
    )
    with pytest.raises(ModelSourceError, match="ships its own Python code.*trust_remote_code=True"):
        load_config(str(tmp_path))
    assert type(load_config(str(tmp_path), trust_remote_code=True)).__name__ == "CustomConfig"


# --- the real default model ------------------------------------------------------------


@pytest.mark.slow
def test_default_model_footprint_loads_fast_and_answers(smollm2_path):
    footprint = model_footprint()
    assert footprint.num_parameters == 134_515_008 and footprint.num_layers == 30
    # float32 weights as saved (the safetensors header is a few kB)
    assert 0 < (smollm2_path / "model.safetensors").stat().st_size - footprint.weight_bytes(torch.float32) < 200_000
    loaded = load_model(device="cpu", dtype=torch.float32)
    # loaded from the converted safetensors folder, not dequantized from the GGUF again (how fast
    # that is, is measured by bench/model_load.py, not asserted here)
    assert not getattr(loaded.model.config, "quantization_config", None)
    assert not any(path.suffix == ".gguf" for path in smollm2_path.iterdir())
    assert loaded.num_parameters == footprint.num_parameters and loaded.path == str(smollm2_path)
    tok = loaded.tokenizer
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    output = loaded.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_the_builtin_gguf_file_uses_the_converted_default(smollm2_path):
    # any other .gguf converts once into gguf_cache_path(file) with the same convert_gguf
    # that made the default folder; the built-in file itself reuses that folder
    gguf = _smollm2_gguf()
    assert resolve_model_source(str(gguf)).kind == "gguf"
    assert model_footprint(str(gguf)).num_parameters == 134_515_008
    messages = []
    loaded = load_model(str(gguf), device="cpu", progress=lambda m, f: messages.append(m))
    assert loaded.path == str(smollm2_path) and loaded.source == str(gguf)
    assert not any("Converting" in m for m in messages)
    assert not hasattr(loaded.model.config, "quantization_config")  # the marker that blocks training is gone
