"""Examples → token ids and labels through the tokenizer's own chat template.

The loss is taken on the assistant replies only (switchable). The assistant spans are found by rendering the
conversation prefix by prefix — which works with any template, whether or not it supports ``{% generation %}`` —
and mapped onto tokens with the fast tokenizer's character offsets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mactuner.data.base import IGNORE_INDEX, DataProblem, DatasetError, Example

# a generic ChatML template for tokenizers that ship none (base models)
_FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)



# ---------------------------------------------------------------------------
# tokenization


def _template_for(tokenizer: Any) -> str | None:
    return None if getattr(tokenizer, "chat_template", None) else _FALLBACK_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: list[dict[str, str]], tools: list | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=_template_for(tokenizer),
        add_generation_prompt=generation_prompt,
        tokenize=False,
    )


def _with_tools_in_system(messages: list[dict[str, str]], tools: list) -> list[dict[str, str]]:
    """For templates that ignore ``tools``: describe the tools in the system message instead."""
    description = "You can call these tools (answer with a JSON function call):\n" + "\n".join(
        json.dumps(t, ensure_ascii=False) for t in tools
    )
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + description}] + messages[1:]
    return [{"role": "system", "content": description}] + messages


def _template_uses_tools(tokenizer: Any) -> bool:
    cached = getattr(tokenizer, "_mactuner_uses_tools", None)
    if cached is None:
        probe = [{"role": "user", "content": "x"}]
        tool = [{"name": "probe_tool_xyz", "description": "d", "parameters": {"type": "object", "properties": {}}}]
        try:
            cached = "probe_tool_xyz" in _render(tokenizer, probe, tool, False)
        except Exception:  # noqa: BLE001 - a template that breaks on tools does not use them
            cached = False
        try:
            tokenizer._mactuner_uses_tools = cached
        except AttributeError:
            pass
    return cached


def render_example(example: Example, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The example's full text and the character spans of its assistant replies.

    The spans are found prefix by prefix: the text of the conversation up to a
    reply (with the generation prompt) is where the reply starts, the text up to
    and including it is where it ends — so the end-of-turn token that teaches the
    model to stop is inside the span.
    """
    if example.text is not None:
        return example.text, [(0, len(example.text))]
    messages = example.messages or []
    tools = example.tools
    if tools and not _template_uses_tools(tokenizer):
        messages, tools = _with_tools_in_system(messages, tools), None
    full = _render(tokenizer, messages, tools, False)
    spans: list[tuple[int, int]] = []
    search_from = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], tools, True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], tools, False)
        if full.startswith(upto) and upto.startswith(before) and len(upto) > len(before):
            start, end = len(before), len(upto)
            # templates that ignore add_generation_prompt leave the role header in
            # the span: start at the reply itself where it can be found
            content = message["content"].strip()
            found = full.rfind(content, start, end) if content else -1
            if found > start:
                start = found
        else:
            # a template that renders a prefix differently from the whole: find the reply itself
            start = full.find(message["content"], search_from)
            if start < 0:
                continue
            end = start + len(message["content"])
        spans.append((start, end))
        search_from = end
    return full, spans


def encode_examples(examples: Sequence[Example], tokenizer: Any, assistant_only_loss: bool, problems: list | None):
    """Full-length (untruncated) ids and labels for every example that renders."""
    texts, spans, kept = [], [], []
    for index, example in enumerate(examples):
        try:
            text, example_spans = render_example(example, tokenizer)
        except Exception as exc:
            where = f"line {example.line}" if example.line is not None else f"example {index + 1}"
            message = f"the chat template cannot render it ({exc})"
            if problems is None:
                raise DatasetError(f"{where}: {message}") from exc
            problems.append(DataProblem("", example.line, message))
            continue
        texts.append(text)
        spans.append(example_spans)
        kept.append(example)
    if not texts:
        return []
    fast = getattr(tokenizer, "is_fast", False)
    # the rendered text already holds the template's special tokens (BOS included where
    # the template writes it): adding them again would double them
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
    eos = tokenizer.eos_token_id
    results = []
    for i, (example, example_spans) in enumerate(zip(kept, spans)):
        ids = list(encoded["input_ids"][i])
        if example.text is not None:
            # plain text: learn where a document ends
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            results.append((ids, list(ids)))
            continue
        if not assistant_only_loss:
            results.append((ids, list(ids)))
            continue
        if fast:
            offsets = encoded["offset_mapping"][i]
            labels = [IGNORE_INDEX] * len(ids)
            for t, (a, b) in enumerate(offsets):
                if b <= a:
                    continue
                # a token that holds any character of a reply is trained (a
                # word piece such as " a" can start just before the reply)
                for s, e in example_spans:
                    if a < e and b > s:
                        labels[t] = ids[t]
                        break
        else:
            labels = _labels_by_prefix(texts[i], example_spans, tokenizer, ids)
        results.append((ids, labels))
    return results


def _labels_by_prefix(text: str, spans: list[tuple[int, int]], tokenizer: Any, ids: list[int]) -> list[int]:
    """Slow tokenizers have no offsets: count the tokens of each prefix instead."""
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in spans:
        a = len(tokenizer(text[:s], add_special_tokens=False)["input_ids"])
        b = len(tokenizer(text[:e], add_special_tokens=False)["input_ids"])
        for t in range(a, min(b, len(ids))):
            labels[t] = ids[t]
    return labels


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    assistant_only_loss: bool = True,
    problems: list[DataProblem] | None = None,
) -> list[dict[str, list[int]]]:
    """Token ids and labels for training.

    Args:
        examples: from :func:`load_dataset_file`.
        tokenizer: the model's tokenizer; conversations use its chat template
            (a plain ChatML template where it has none).
        max_length: longer rows are truncated to this many tokens.
        assistant_only_loss: take the loss on the assistant replies only
            (``True``), or on every token of the conversation (``False``).
            Plain-text examples always train on every token.
        problems: where to report examples the chat template cannot render; when
            ``None`` such an example raises :class:`DatasetError`.

    Returns:
        One ``{"input_ids", "labels"}`` per rendered example; ``labels`` is
        ``-100`` on tokens that take no loss.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    return [
        {"input_ids": ids[:max_length], "labels": labels[:max_length]}
        for ids, labels in encode_examples(examples, tokenizer, assistant_only_loss, problems)
    ]
