"""The Ollama Modelfile written beside an exported GGUF: its chat template, stop words and system prompt."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

MODELFILE_HEADER = "# Ollama Modelfile written by MacTuner"


# ---------------------------------------------------------------- Ollama


# Ollama's Go template for ChatML (<|im_start|>role\ncontent<|im_end|>), the form SmolLM2, Qwen and many
# others use: the system prompt first, each message, then the assistant's turn.
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def _render_template(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def template_default_system(tokenizer) -> str | None:
    """The system message a chat template inserts when the conversation has none (SmolLM2 has one)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MACTUNER-PROBE-7f3a"
    text = _render_template(tokenizer, [{"role": "user", "content": marker}])
    match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text.split(marker)[0], re.S)
    return match.group(1) if match else None


def is_chatml(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders ChatML exactly as :data:`CHATML_TEMPLATE` does."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"
    try:
        return _render_template(tokenizer, messages) == expected
    except Exception:  # noqa: BLE001 - a template that cannot render this conversation is not ChatML
        return False


def _quote(text: str) -> str:
    return text.replace('"""', '" " "')


def modelfile_text(gguf_name: str, tokenizer, system_prompt: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF, the chat template as TEMPLATE, SYSTEM, and the stop tokens.

    TEMPLATE is written for ChatML templates (checked by rendering the tokenizer's own
    template); for any other template it is left out and Ollama reads the template from
    the GGUF's metadata. SYSTEM is the run's system prompt, else the one the model's
    template inserts by default (the model was trained with it, and Ollama's template
    only adds a system turn when SYSTEM is set).
    """
    lines = [MODELFILE_HEADER, f"# ollama create my-model -f {gguf_name[:-5]}.Modelfile && ollama run my-model",
             f"FROM ./{gguf_name}"]
    chatml = is_chatml(tokenizer)
    if chatml:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
    system = system_prompt or template_default_system(tokenizer)
    if system:
        lines.append(f'SYSTEM """{_quote(system)}"""')
    stops = ["<|im_end|>", "<|im_start|>"] if chatml else []
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos and eos not in stops:
        stops.append(eos)
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def run_system_prompt(adapter: str | os.PathLike | None) -> str | None:
    """The system prompt a run trained with: its config's ``system_prompt`` if it has one, else the
    system message every row of its dataset starts with (``None`` when rows differ or have none)."""
    if not adapter:
        return None
    path = Path(adapter).expanduser().resolve()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    config_file = run / "config.yaml"
    if not config_file.is_file():
        return None
    try:
        from mactuner.safe_yaml import load_yaml_file

        config = load_yaml_file(config_file) or {}
        if isinstance(config.get("system_prompt"), str) and config["system_prompt"].strip():
            return config["system_prompt"]
        from mactuner.data import load_dataset_file

        load = load_dataset_file(config["dataset"], config.get("dataset_format"))
    except Exception:  # noqa: BLE001 - the dataset moved or changed: no system prompt to carry over
        return None
    firsts = {ex.messages[0]["content"] if ex.messages and ex.messages[0]["role"] == "system" else None
              for ex in load.examples}
    return firsts.pop() if len(firsts) == 1 else None
