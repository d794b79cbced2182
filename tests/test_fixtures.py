"""The shared fixtures load: the default model converts and the tiny model answers."""

from mactuner.models import load_model


def test_tiny_model_loads_and_runs(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    ids = loaded.tokenizer("hello world", return_tensors="pt").input_ids
    out = loaded.model(ids)
    assert out.logits.shape[-1] == len(loaded.tokenizer)
    assert loaded.num_parameters < 5_000_000
