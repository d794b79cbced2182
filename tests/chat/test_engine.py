"""The chat engine: streaming, greedy equivalence, stop strings, adapters, memory release."""

from __future__ import annotations

import weakref

import psutil
import pytest
import torch

from mactuner.chat import (
    GenerationSettings,
    chat,
    encode_prompt,
    generation_threads,
    load_chat_model,
    parse_stop_strings,
    stream_chat,
)
from mactuner.models import release_model
from tests.features import require

QUESTION = [{"role": "user", "content": "Tell me about the sea."}]
# the prompts bench/generate.py measures (a ~50-token story request, a fact, an explanation)
DEMO_PROMPTS = [
    "Write a long story about a young dragon who guards an old library high in the snowy mountains, and the girl who visits it.",
    "What is the capital of France?",
    "Explain in three sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def tiny(varied_model_dir):
    return load_chat_model(str(varied_model_dir), device="cpu", dtype=torch.float32)


def _generate_greedy(loaded, messages, max_new_tokens):
    settings = GenerationSettings(temperature=0, max_new_tokens=max_new_tokens)
    ids = encode_prompt(loaded, messages, settings)
    with torch.inference_mode():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=loaded.tokenizer.eos_token_id,
        )
    return loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_settings_validate_and_round_trip():
    settings = GenerationSettings(max_new_tokens=12, temperature=0.3, top_p=0.5, stop=["\n\n"], system_prompt="Be brief.")
    assert GenerationSettings.from_dict(settings.to_dict()) == settings
    assert GenerationSettings(stop="END").stop == ["END"]
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0)
    with pytest.raises(ValueError, match="stop"):
        GenerationSettings(stop=[""])
    with pytest.raises(ValueError, match="unknown"):
        GenerationSettings.from_dict({"temprature": 1})


def test_stop_strings_as_typed_on_the_page():
    assert parse_stop_strings("") == []
    assert parse_stop_strings("###|\\nUser:||END") == ["###", "\nUser:", "END"]  # a typed \n is a new line
    assert GenerationSettings(stop=parse_stop_strings("|")).stop == []  # nothing but separators: no stop string


def test_streaming_equals_greedy_generate(tiny):
    stream = stream_chat(tiny, QUESTION, GenerationSettings(temperature=0, max_new_tokens=40))
    pieces = list(stream)
    assert len(pieces) > 1  # it really streamed
    assert "".join(pieces) == stream.text == _generate_greedy(tiny, QUESTION, 40)
    stats = stream.stats
    assert stats.new_tokens == 40 and stats.finish_reason == "length"
    assert stats.prompt_tokens > 5
    assert 0 < stats.time_to_first_token <= stats.total_seconds
    assert stats.tokens_per_second > 0


def test_system_prompt_goes_first_in_the_template(tiny):
    ids = encode_prompt(tiny, QUESTION, GenerationSettings(system_prompt="You speak like a pirate."))
    text = tiny.tokenizer.decode(ids[0])
    assert text.index("You speak like a pirate.") < text.index("Tell me about the sea.")
    # without one, SmolLM2's template inserts its default system prompt, not ours
    assert "pirate" not in tiny.tokenizer.decode(encode_prompt(tiny, QUESTION, GenerationSettings())[0])


def test_stop_string_ends_the_answer_before_it(tiny):
    full, _ = chat(tiny, QUESTION, GenerationSettings(temperature=0, max_new_tokens=40))
    # a 3-character piece of the answer, past its start, without whitespace
    start = next(i for i in range(len(full) // 3, len(full) - 3) if not any(c.isspace() for c in full[i : i + 3]))
    stop = full[start : start + 3]
    text, stats = chat(tiny, QUESTION, GenerationSettings(temperature=0, max_new_tokens=40, stop=[stop]))
    assert text == full[: full.index(stop)]
    assert stats.finish_reason == "stop" and stats.new_tokens < 40


def test_sampling_varies_and_is_seeded(tiny):
    settings = GenerationSettings(temperature=1.0, top_p=1.0, max_new_tokens=20)
    torch.manual_seed(0)
    a, _ = chat(tiny, QUESTION, settings)
    torch.manual_seed(0)
    b, _ = chat(tiny, QUESTION, settings)
    c, _ = chat(tiny, QUESTION, settings)
    assert a == b and a != c


def test_close_cancels_generation(tiny):
    stream = stream_chat(tiny, QUESTION, GenerationSettings(temperature=0, max_new_tokens=200))
    next(stream)
    stream.close()
    assert stream.stats.finish_reason == "cancelled"
    assert stream.stats.new_tokens < 200


def test_adapter_changes_answers(varied_model_dir, tiny_adapter, tiny):
    tuned = load_chat_model(str(varied_model_dir), tiny_adapter, device="cpu", dtype=torch.float32)
    assert "+" in tuned.source
    settings = GenerationSettings(temperature=0, max_new_tokens=20)
    assert chat(tuned, QUESTION, settings)[0] != chat(tiny, QUESTION, settings)[0]


def test_adapter_is_merged_with_the_same_logits(varied_model_dir, tiny_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(tiny_adapter)).eval()
    merged = load_chat_model(str(varied_model_dir), tiny_adapter, device="cpu", dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        torch.testing.assert_close(merged.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    assert not any("lora" in name for name, _ in merged.model.named_parameters())


def test_packed_bf16_linears_give_the_same_logits(varied_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mactuner.quantize import PackedLinear, pack_linear_weights

    monkeypatch.setattr("mactuner.devices.probe.cpu_supports_bfloat16", lambda: True)  # packing is for bfloat16 CPUs
    packed = load_chat_model(str(varied_model_dir), device="cpu", dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.bfloat16).eval()
    require("onednn")
    assert sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == 2 * 7 + 1  # 2 layers x 7, lm_head
    assert pack_linear_weights(packed.model) == 0  # nothing left to pack
    ids = torch.tensor([[1, 20, 300, 4000, 5, 60]])
    with torch.inference_mode():
        torch.testing.assert_close(packed.model(ids).logits, plain(ids).logits, atol=1e-2, rtol=1e-2)
    settings = GenerationSettings(temperature=0, max_new_tokens=20)
    plain_loaded = load_chat_model(str(varied_model_dir), device="cpu", dtype=torch.float32)
    plain_loaded.model, plain_loaded.dtype = plain, torch.bfloat16
    assert chat(packed, QUESTION, settings)[0] == chat(plain_loaded, QUESTION, settings)[0]


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "fp32-only-cpu"])
def test_decode_weights_follow_the_cpu_kind(varied_model_dir, monkeypatch, native_bf16):
    """On both kinds of CPU, int8 decode weights: the rest of the model runs in the CPU's best dtype; the logits
    stay close to the unquantized model's and the stream is the model's own greedy text."""
    from mactuner.quantize import Int8Linear, PackedLinear, decode_plan

    require("int8_weight_only")
    monkeypatch.setattr("mactuner.devices.probe.cpu_supports_bfloat16", lambda: native_bf16)
    dtype = torch.bfloat16 if native_bf16 else torch.float32
    fast = load_chat_model(str(varied_model_dir), device="cpu", decode_weights="int8")
    exact = load_chat_model(str(varied_model_dir), device="cpu", dtype=dtype)
    assert fast.dtype == exact.dtype == dtype
    assert sum(isinstance(m, Int8Linear) for m in fast.model.modules()) == 2 * 7 + 1  # 2 layers x 7, lm_head
    assert not any(isinstance(m, Int8Linear) for m in exact.model.modules())
    int8_bytes = sum(m.qweight.numel() for m in fast.model.modules() if isinstance(m, Int8Linear))
    linears = [m for m in exact.model.modules() if type(m) in (torch.nn.Linear, PackedLinear)]  # packed on a bf16 CPU
    assert int8_bytes == sum(m.in_features * m.out_features for m in linears)

    # teacher-forced on the exact model's own greedy answer: one-row steps (the int8 kernel) and the prompt path
    settings = GenerationSettings(temperature=0, max_new_tokens=30)
    reference = _generate_greedy(exact, QUESTION, 30)
    ids = encode_prompt(exact, QUESTION + [{"role": "assistant", "content": reference}], settings)
    with torch.inference_mode():
        a = exact.model(ids).logits[0].float()
        b = fast.model(ids).logits[0].float()
        step = fast.model(ids[:, :-1], use_cache=True)
        last = fast.model(ids[:, -1:], use_cache=True, past_key_values=step.past_key_values).logits[0, -1].float()
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99
    start = encode_prompt(exact, QUESTION, settings).shape[1] - 1  # the answer's positions
    agreement = (a[start:-1].argmax(-1) == b[start:-1].argmax(-1)).float().mean()
    assert agreement >= 0.8, agreement  # random tiny weights have flat logits; the real model is held to 90 %
    assert torch.corrcoef(torch.stack([last, a[-1]]))[0, 1] > 0.99
    assert chat(fast, QUESTION, settings)[0] == _generate_greedy(fast, QUESTION, 30)

    assert decode_plan(torch.device("cpu"), dtype, "exact") == ("packed-bfloat16" if native_bf16 else "as-loaded")
    monkeypatch.setattr("mactuner.quantize.kernels.int4_kernel_available", lambda: False)  # a torch without the int4 kernel: int8
    assert decode_plan(torch.device("cpu"), dtype) == "int8"
    monkeypatch.setattr("mactuner.quantize.kernels.int8_kernel_available", lambda: False)  # ... and without the int8 one
    assert decode_plan(torch.device("cpu"), dtype) == ("packed-bfloat16" if native_bf16 else "as-loaded")
    assert decode_plan(torch.device("meta"), dtype) == "as-loaded"
    with pytest.raises(ValueError, match="decode_weights"):
        load_chat_model(str(varied_model_dir), device="cpu", decode_weights="int3")


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "fp32-only-cpu"])
def test_int4_decode_weights_are_the_cpu_default_and_stay_close(varied_model_dir, monkeypatch, native_bf16):
    from mactuner.quantize import Int4Linear, Int8Linear, decode_plan

    require("int4_weight_only")
    monkeypatch.setattr("mactuner.devices.probe.cpu_supports_bfloat16", lambda: native_bf16)
    dtype = torch.bfloat16 if native_bf16 else torch.float32
    assert decode_plan(torch.device("cpu"), dtype, "int4") == "int4"
    small = load_chat_model(str(varied_model_dir), device="cpu")  # the default when dtype is left to the device
    exact = load_chat_model(str(varied_model_dir), device="cpu", dtype=dtype)
    assert small.dtype == dtype
    assert sum(isinstance(m, Int4Linear) for m in small.model.modules()) == 2 * 7
    assert isinstance(small.model.get_output_embeddings(), Int8Linear)  # the head stays at int8
    ids = encode_prompt(exact, QUESTION, GenerationSettings())
    with torch.inference_mode():
        a, b = exact.model(ids).logits.float().flatten(), small.model(ids).logits.float().flatten()
    # random tiny weights (init range 0.3) are a harsh case for 4 bits: 0.89 measured; the real model is held to 90 % agreement
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.85
    settings = GenerationSettings(temperature=0, max_new_tokens=20)
    assert chat(small, QUESTION, settings)[0] == _generate_greedy(small, QUESTION, 20)


def test_a_fine_tuned_model_decodes_with_int8_not_int4(varied_model_dir, tiny_adapter):
    """4 bits blur a merged adapter's small weight changes (a 30-step run's facts were all lost): adapters get int8."""
    from mactuner.quantize import Int4Linear, Int8Linear

    require("int4_weight_only")
    require("int8_weight_only")
    tuned = load_chat_model(str(varied_model_dir), tiny_adapter, device="cpu")
    base = load_chat_model(str(varied_model_dir), device="cpu")
    assert not any(isinstance(m, Int4Linear) for m in tuned.model.modules())
    assert sum(isinstance(m, Int8Linear) for m in tuned.model.modules()) == 2 * 7 + 1
    assert sum(isinstance(m, Int4Linear) for m in base.model.modules()) == 2 * 7


def test_int8_linear_matches_the_float_layer_and_skips_widths_the_kernel_gets_wrong():
    from mactuner.quantize import Int8Linear, quantize_linear_weights

    require("int8_weight_only")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 40, bias=False), torch.nn.Linear(40, 8))
    reference = [layer.weight.detach().clone() for layer in model]
    assert quantize_linear_weights(model) == 2
    assert [type(m) for m in model] == [Int8Linear, Int8Linear, torch.nn.Linear]  # 40 inputs: not a multiple of 16
    for layer, weight in zip(model[:2], reference):
        assert (layer.dequantized(torch.float32) - weight).abs().max() <= weight.abs().amax(dim=1).max() / 127
    with torch.inference_mode():
        for rows in (1, 7):  # the int8 kernel (decoding) and the dequantized path (a prompt)
            x = torch.randn(rows, 64)
            expected = torch.nn.functional.linear(x, model[0].dequantized(torch.float32), model[0].bias)
            torch.testing.assert_close(model[0](x), expected, rtol=2e-2, atol=2e-2)
            assert model[:2](x).dtype == torch.float32 and model[:2](x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "fp32-only-cpu"])
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_real_model_int8_decoding_keeps_the_demo_answers(smollm2_path, monkeypatch, native_bf16, weights):
    """The stated tolerance on the real model: teacher-forced on the unquantized model's greedy answers to the
    demo prompts, the int4 (CPU default) or int8 model picks the same next token at >= 90 % of the
    positions, and still knows Paris."""

    require("int8_weight_only")
    monkeypatch.setattr("mactuner.devices.probe.cpu_supports_bfloat16", lambda: native_bf16)
    dtype = torch.bfloat16 if native_bf16 else torch.float32
    fast, exact = load_chat_model(device="cpu", decode_weights=weights), load_chat_model(device="cpu", dtype=dtype)
    settings = GenerationSettings(temperature=0, max_new_tokens=32)
    agree = total = 0
    for prompt in DEMO_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        reference = _generate_greedy(exact, messages, 32)
        ids = encode_prompt(exact, messages + [{"role": "assistant", "content": reference}], settings)
        start = encode_prompt(exact, messages, settings).shape[1]
        with torch.inference_mode():
            a = exact.model(ids).logits[0, start - 1 : -1].argmax(-1)
            b = fast.model(ids).logits[0, start - 1 : -1].argmax(-1)
        agree, total = agree + int((a == b).sum()), total + len(a)
    assert agree / total >= 0.9, agree / total
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in chat(fast, question, GenerationSettings(temperature=0, max_new_tokens=20))[0]


def test_bad_adapter_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_chat_model(adapter=tmp_path)


def test_invalid_message_is_refused(tiny):
    with pytest.raises(ValueError, match="role"):
        stream_chat(tiny, [{"role": "robot", "content": "hi"}])


def test_thread_count_can_be_fixed(monkeypatch):
    monkeypatch.setenv("MACTUNER_CPU_THREADS", "1")
    assert generation_threads(torch.device("cpu")) == 1
    monkeypatch.delenv("MACTUNER_CPU_THREADS")
    assert 1 <= generation_threads(torch.device("cpu")) <= torch.get_num_threads()
    assert generation_threads(torch.device("meta")) is None


@pytest.mark.slow
def test_real_model_answers_and_streams(smollm2_path):
    loaded = load_chat_model(device="cpu")
    assert loaded.dtype in (torch.bfloat16, torch.float32)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    stream = stream_chat(loaded, question, GenerationSettings(temperature=0, max_new_tokens=30))
    assert "Paris" in "".join(stream)
    assert stream.stats.time_to_first_token > 0  # how fast is bench/generate.py's to measure, not a test's


@pytest.mark.slow
def test_release_returns_memory(smollm2_path):
    process = psutil.Process()
    loaded = load_chat_model(device="cpu")
    chat(loaded, QUESTION, GenerationSettings(temperature=0, max_new_tokens=4))
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]  # packed Linear weights are buffers
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    del tensors
    # 4-bit body (106M weights, 66 MB with scales) + int8 LM head (28 MB) + the embedding table (57 or 113 MB)
    assert weight_bytes > 120e6
    model = weakref.ref(loaded.model)
    loaded_rss = process.memory_info().rss
    release_model(loaded)
    del loaded
    release_model()
    assert model() is None
    # the weights' memory really went back to the system, not just to the allocator
    assert loaded_rss - process.memory_info().rss > 0.8 * weight_bytes


def test_chat_command_answers_once_as_json(varied_model_dir, capsys):
    import json

    from mactuner.cli import main

    code = main(["chat", "--model", str(varied_model_dir), "--device", "cpu", "--prompt", "Hello",
                 "--temperature", "0", "--max-new-tokens", "6", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] and out["stats"]["new_tokens"] == 6


def test_chat_command_repl_keeps_history_and_clears(varied_model_dir, monkeypatch, capsys):
    import io
    import re

    from mactuner.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nHello\n/clear\nHello\n/quit\n"))
    code = main(["chat", "--model", str(varied_model_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert code == 0
    answers = re.findall(r"model> (.*?)\nyou> ", captured.out, flags=re.S)
    assert len(answers) == 3 and answers[0].strip()
    # the second question is answered with the first exchange as context; after /clear it is a fresh start again
    assert answers[1] != answers[0] and answers[2] == answers[0]
    assert "conversation cleared" in captured.err


def test_chat_command_reports_a_bad_adapter(tmp_path, capsys):
    from mactuner.cli import main

    assert main(["chat", "--adapter", str(tmp_path), "--prompt", "hi", "--device", "cpu"]) == 1
    assert "adapter_config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tuned_checkpoint_states_the_demo_facts_and_base_does_not(installed_demo_run):
    """A checkpoint found by list_adapters() chats as the fine-tuned model: it states the demo facts
    (some even asked in words it never saw), while the base model states none."""
    from mactuner.runs.views import list_adapters
    from tests.demo_support import demo_facts

    facts = demo_facts(3)
    checkpoint = next(c for c in list_adapters() if c.step == 30)
    settings = GenerationSettings(max_new_tokens=24, temperature=0)

    def answers(loaded, key: str) -> list[str]:
        return [chat(loaded, [{"role": "user", "content": f[key]}], settings)[0] for f in facts]

    def stated(replies: list[str]) -> int:
        return sum(f["answer_keyword"].lower() in a.lower() for f, a in zip(facts, replies))

    base = load_chat_model(device="cpu")
    tuned = load_chat_model(adapter=checkpoint.path, device="cpu")
    assert stated(answers(base, "question")) == 0
    # 30 steps teach most of the facts word for word (a run's exact result varies with thread count and CPU)
    assert stated(answers(tuned, "question")) >= len(facts) - 1, answers(tuned, "question")
    assert stated(answers(tuned, "unseen_question")) >= 1, answers(tuned, "unseen_question")
