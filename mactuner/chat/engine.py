"""Chat with a model (base, or base + a LoRA adapter) on the selected device, streaming the answer.

The engine is a token loop in the caller's thread (one forward pass per token
with the KV cache, greedy or temperature/top-k/top-p sampling as ``generate``
does), decoded into word-safe pieces by transformers' ``TextStreamer`` logic;
the caller iterates over the pieces as they are made (``st.write_stream`` in the
UI, ``print`` in the command line). See :class:`ChatStream` for why it is not
``generate`` in a worker thread.

What makes it fast on a CPU (measured with ``bench/generate.py``):

- bfloat16 weights where the CPU computes them natively (``get_optimal_dtype``):
  decoding one token reads every weight once, so half the bytes is close to
  half the time;
- ``torch.inference_mode`` (no autograd bookkeeping);
- an adapter is merged into the weights at load time, so a fine-tuned model
  costs no more per token than the base one;
- on a CPU, Linear weights stored narrow for decoding (:func:`decode_plan` decides):
  by default 4-bit body layers in groups of 32 (:class:`Int4Linear`) and an int8
  LM head (:class:`Int8Linear`), ~0.7 byte per weight against float32's 4; PyTorch's
  weight-only kernels widen to float32 inside, so this works on CPUs without native
  bfloat16 too. ``decode_weights="int8"`` or ``"exact"`` choose more bytes and fewer
  changes to the logits (tested tolerance: >= 90 % same next token on the demo prompts);
- where the int8 kernel is missing, on a bfloat16 CPU, bfloat16 Linear weights
  pre-packed for oneDNN (:class:`PackedLinear`): PyTorch's plain bfloat16
  matmul for one row is slower than float32 here;
- on a CPU shared with other work, fewer OpenMP threads than cores: a thread
  that the OS deschedules stalls every other thread at each barrier, which made
  a 2-thread decode 4-20x slower than a 1-thread one on a busy 2-core machine.

Caching loaded models is the UI layer's job (``st.cache_resource``); this module
only loads, generates and frees.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mactuner.adapters import apply_adapter, base_model_for, check_adapter
from mactuner.devices import get_optimal_dtype, resolve_device
from mactuner.devices.cpu_threads import CpuThreads
from mactuner.models import LoadedModel, Progress, load_model
from mactuner.quantize.kernels import decode_plan, pack_linear_weights, quantize_linear_weights, quantize_linear_weights_int4

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


@dataclass
class GenerationSettings:
    """How an answer is generated."""

    max_new_tokens: int = field(default=256, metadata={"help": "most tokens in one answer; longer answers cost time"})
    temperature: float = field(
        default=0.7, metadata={"help": "0 = greedy (always the likeliest token); higher = more varied answers"}
    )
    top_p: float = field(default=0.9, metadata={"help": "sample only from the smallest token set holding this much probability"})
    stop: list[str] = field(default_factory=list, metadata={"help": "strings that end the answer (not included in it)"})
    system_prompt: str | None = field(default=None, metadata={"help": "instructions placed before the conversation"})

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be between 0 and 5, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {self.system_prompt!r}")
        if self.system_prompt is not None and not self.system_prompt.strip():
            self.system_prompt = None

    @property
    def greedy(self) -> bool:
        """Whether the answer is deterministic (temperature 0)."""
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        """Inverse of :meth:`to_dict`; unknown keys are an error, naming them."""
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown generation settings: {sorted(unknown)}")
        return cls(**data)


def parse_stop_strings(text: str) -> list[str]:
    """Stop strings as the chat page takes them: separated by ``|``, a typed ``\\n`` for a new line, empty ones dropped.

    ``###|\\nUser:`` (typed as shown) gives ``###`` and a new line followed by ``User:``.
    """
    return [s.replace("\\n", "\n") for s in text.split("|") if s]


@dataclass
class ChatStats:
    """Figures of one answer, filled in while it streams.

    ``tokens_per_second`` is the decoding speed after the first token (the
    figure a reader feels while text scrolls); ``time_to_first_token`` covers
    templating, tokenizing and the prompt's forward pass.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float | None = None  # seconds from the call to the first generated token
    total_seconds: float | None = None
    tokens_per_second: float | None = None
    finish_reason: str | None = None  # "stop" (end token or stop string), "length", "cancelled", "error"
    threads: int | None = None  # CPU threads used (None on GPUs)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)



def load_chat_model(
    source: str | None = None,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    decode_weights: str | None = None,
) -> LoadedModel:
    """Load a model for chatting, optionally with a LoRA adapter merged in.

    Args:
        source: base model (``DEFAULT_MODEL``, a hub id or a local folder). ``None``
            means the adapter's recorded base if it is available offline, else the default model.
        adapter: a PEFT adapter folder: a finished run's ``RUN/adapter`` or a
            checkpoint ``RUN/checkpoints/step-N``.
        device: where to run; resolved once with ``resolve_device``.
        dtype: weights' dtype; default ``get_optimal_dtype(device)`` (bfloat16 on this CPU).
        progress: ``(message, fraction or None)`` callback.
        decode_weights: how the Linear weights are stored for decoding (see
            :func:`decode_plan`): ``"int4"`` (4-bit body, int8 LM head; ~30 % fewer bytes
            than int8), ``"int8"`` (a quarter of float32's bytes per token) — with either,
            greedy answers can part from the unquantized model's after some tokens —,
            ``"exact"`` (as loaded; bfloat16 ones pre-packed on a CPU), or ``None``:
            when ``dtype`` was left to the device, int4 on a CPU (int8 with an adapter,
            whose small weight changes 4 bits blur), else exact.

    Returns:
        A ``LoadedModel`` whose ``source`` reads ``"base + adapter"`` when an adapter was merged.

    Raises:
        FileNotFoundError: the adapter folder is not a PEFT adapter.
        RuntimeError: the device is not available.
    """
    device = resolve_device(device)
    if decode_weights not in (None, "int8", "int4", "exact"):
        raise ValueError(f"decode_weights must be 'int8', 'int4', 'exact' or None, got {decode_weights!r}")
    adapter_path = check_adapter(adapter) if adapter else None
    if decode_weights is None:
        # a merged adapter's small weight changes are what 4 bits blur (measured: a 30-step run's
        # facts were all lost at int4), so a fine-tuned model gets int8
        decode_weights = "exact" if dtype is not None else ("int8" if adapter_path is not None else "int4")
    dtype = dtype or get_optimal_dtype(device)
    base = base_model_for(source, adapter_path)
    loaded = load_model(base, device=device, dtype=dtype, progress=progress)
    if adapter_path is not None:
        if progress:
            progress(f"Applying adapter {adapter_path.name}…", None)
        # merged weights decode as fast as the base model's (no extra LoRA matmuls per token)
        loaded.model = apply_adapter(loaded.model, adapter_path)
        loaded.model.eval()
        loaded.source = f"{loaded.source} + {adapter_path}"
    plan = decode_plan(loaded.device, loaded.dtype, decode_weights)
    if plan in ("int8", "int4"):
        if progress:
            progress(f"Storing weights as {plan} for decoding…", None)
        (quantize_linear_weights if plan == "int8" else quantize_linear_weights_int4)(loaded.model)
    elif plan == "packed-bfloat16":
        pack_linear_weights(loaded.model)
    if progress:
        progress("Model ready.", 1.0)
    return loaded



# ---------------------------------------------------------------- CPU threads


_threads = CpuThreads(min_window=1.0)  # judged per answer


def generation_threads(device: torch.device) -> int | None:
    """CPU threads for the next answer (``None`` on GPUs).

    ``MACTUNER_CPU_THREADS`` fixes it; otherwise every core torch would use,
    minus the cores other processes kept busy lately (at least one).
    """
    if device.type != "cpu":
        return None
    return _threads.choose()


# ---------------------------------------------------------------- generation


def build_messages(messages: list[Message], settings: GenerationSettings) -> list[Message]:
    """The conversation as sent to the chat template: the settings' system prompt first."""
    for message in messages:
        if message.get("role") not in {"system", "user", "assistant"} or not isinstance(message.get("content"), str):
            raise ValueError(f"a message needs a role (system/user/assistant) and text content, got {message!r}")
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
    if settings.system_prompt:
        out.insert(0, {"role": "system", "content": settings.system_prompt})
    return out


def _render_ids(tokenizer, conversation: list[Message]) -> list[int]:
    """Token ids of ``conversation`` rendered for the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
    # a base model without a template: plain text, the turns one per line
    return tokenizer("\n".join(m["content"] for m in conversation))["input_ids"]


def _fit_history(tokenizer, conversation: list[Message], budget: int) -> list[int]:
    """Ids of the longest recent part of ``conversation`` that fits ``budget`` tokens.

    Keeps a leading system message and the newest turn, and starts the kept part at
    a user turn where possible (templates that insist on user/assistant turns
    stay happy). The cut is found by galloping from the newest end (keep 1, 2, 4…
    candidate starts) and then bisecting, so it renders about ``2 log2(turns)``
    short conversations, each at most twice the size that fits: linear in the
    history's length, where dropping one turn at a time re-rendered the whole
    history per turn (a 600-turn chat took 31.6 s to its first token).
    """
    head = conversation[:1] if conversation[0]["role"] == "system" else []
    turns = conversation[len(head):]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"] or list(range(len(turns)))
    if starts[-1] != len(turns) - 1 and turns[-1]["role"] != "assistant":
        starts.append(len(turns) - 1)
    n = len(starts)

    def render(count: int) -> list[int]:  # keep the newest `count` candidate starts
        return _render_ids(tokenizer, head + turns[starts[n - count]:])

    good, good_ids, bad = 0, None, None
    count = 1
    while True:
        ids = render(count)
        if len(ids) > budget:
            bad = count
            break
        good, good_ids = count, ids
        if count == n:
            return ids
        count = min(2 * count, n)
    if good_ids is None:
        return ids  # even the newest turn alone is too long: the caller keeps its end
    while bad - good > 1:
        mid = (good + bad) // 2
        ids = render(mid)
        if len(ids) <= budget:
            good, good_ids = mid, ids
        else:
            bad = mid
    return good_ids


def encode_prompt(loaded: LoadedModel, messages: list[Message], settings: GenerationSettings) -> torch.Tensor:
    """Token ids of the templated conversation, ready for the assistant's turn (1 x N, on the model's device).

    When the conversation is longer than the model's context allows, the oldest
    turns after any system message are dropped (the newest question is kept);
    finding the cut costs time linear in the history (see :func:`_fit_history`).
    """
    tokenizer = loaded.tokenizer
    conversation = build_messages(messages, settings)
    if not conversation:
        raise ValueError("there is no message to answer")
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or 1 << 30
    budget = limit - settings.max_new_tokens
    ids = _render_ids(tokenizer, conversation)
    if len(ids) > budget and len(conversation) > 1:
        ids = _fit_history(tokenizer, conversation, budget)
    if len(ids) > budget:
        ids = ids[-max(budget, 1) :]
    return torch.tensor([ids], device=loaded.device)


def _text_streamer(tokenizer, stop: list[str]):
    """transformers' ``TextStreamer`` decoding (word-safe pieces) plus stop strings, collecting pieces in a list."""
    from transformers import TextStreamer

    class ChatTextStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
            self.stop = stop
            self.stopped = False  # a stop string was seen
            self.held = ""  # text that may be the start of a stop string
            self.pieces: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if self.stopped:
                return
            text = self.held + text
            self.held = ""
            if self.stop:
                cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.stopped = True
                    text = text[:cut]
                elif not stream_end:
                    # keep back a tail that could grow into a stop string
                    keep = max(
                        (k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                        default=0,
                    )
                    if keep:
                        text, self.held = text[:-keep], text[-keep:]
            if text:
                self.pieces.append(text)

    return ChatTextStreamer()


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(loaded.model.generation_config, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def _accepts(model, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(model.forward).parameters


def _cache_argument(model) -> str:
    # transformers 5.2x names the KV cache ``cache``; earlier 5.x releases ``past_key_values``
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class ChatStream:
    """An answer being generated: iterate for text pieces; ``stats`` fills in as it goes.

    The tokens are made in the caller's thread, one forward pass per token with
    the model's KV cache, as ``generate`` does for greedy search and sampling
    (temperature, then top-k 50 and top-p, like ``generate``'s defaults). Not
    ``generate`` in a worker thread feeding a ``TextIteratorStreamer``: measured
    on an H200, that pattern alone cut decoding from 58 to 17 tokens/s for
    SmolLM2-135M, while this loop keeps the speed of plain ``generate``.
    Stopping iteration early (``close()``, or dropping the stream) stops generating.
    """

    def __init__(self, loaded: LoadedModel, messages: list[Message], settings: GenerationSettings):
        self.settings = settings
        self.stats = ChatStats()
        self.text = ""
        self._started = time.perf_counter()
        self._loaded = loaded
        self._input_ids = encode_prompt(loaded, messages, settings)
        self.stats.prompt_tokens = int(self._input_ids.shape[1])
        self._threads = generation_threads(loaded.device)
        self.stats.threads = self._threads
        self._tokens = self._generate()

    def _sampler(self):
        from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        settings = self.settings
        warpers = LogitsProcessorList([TemperatureLogitsWarper(float(settings.temperature)), TopKLogitsWarper(50)])
        if settings.top_p < 1:
            warpers.append(TopPLogitsWarper(float(settings.top_p)))
        return warpers

    def _generate(self) -> Iterator[str]:
        loaded, stats, settings = self._loaded, self.stats, self.settings
        model, ids = loaded.model, self._input_ids
        streamer = _text_streamer(loaded.tokenizer, settings.stop)
        eos = _eos_ids(loaded)
        warpers = None if settings.greedy else self._sampler()
        cache_arg = _cache_argument(model)
        # the prompt's pass needs the last position's logits only (as generate() asks for them)
        prompt_kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        previous_threads = torch.get_num_threads()
        if self._threads is not None and self._threads != previous_threads:
            torch.set_num_threads(self._threads)
        first_at = last_at = None
        try:
            with torch.inference_mode():
                out = model(input_ids=ids, use_cache=True, **prompt_kwargs)
                generated = ids
                for _ in range(settings.max_new_tokens):
                    # float32 logits, as generate() takes them
                    logits = out.logits[:, -1, :].to(dtype=torch.float32)
                    if warpers is None:
                        next_token = logits.argmax(dim=-1, keepdim=True)
                    else:
                        scores = warpers(generated, logits)
                        next_token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
                    token = int(next_token)
                    last_at = time.perf_counter()
                    if first_at is None:
                        first_at = last_at
                        stats.time_to_first_token = first_at - self._started
                    stats.new_tokens += 1
                    if token in eos:
                        stats.finish_reason = "stop"
                        break
                    if warpers is not None:
                        generated = torch.cat([generated, next_token], dim=-1)
                    streamer.put(next_token.cpu())
                    yield from self._drain(streamer)
                    if streamer.stopped:
                        stats.finish_reason = "stop"
                        break
                    out = model(input_ids=next_token, use_cache=True, **{cache_arg: _cache_of(out)})
                else:
                    stats.finish_reason = "length"
                if not streamer.stopped:
                    streamer.end()
                    yield from self._drain(streamer)
        finally:
            if torch.get_num_threads() != previous_threads:
                torch.set_num_threads(previous_threads)
            stats.total_seconds = time.perf_counter() - self._started
            if first_at is not None and last_at is not None and stats.new_tokens > 1 and last_at > first_at:
                stats.tokens_per_second = (stats.new_tokens - 1) / (last_at - first_at)
            if stats.finish_reason is None:
                stats.finish_reason = "cancelled"

    def _drain(self, streamer) -> Iterator[str]:
        pieces, streamer.pieces = streamer.pieces, []
        for piece in pieces:
            self.text += piece
            yield piece

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        return next(self._tokens)

    def close(self) -> None:
        """Stop generating; ``stats.finish_reason`` becomes ``"cancelled"`` unless the answer had ended."""
        self._tokens.close()


def stream_chat(loaded: LoadedModel, messages: list[Message], settings: GenerationSettings | None = None) -> ChatStream:
    """Answer the conversation, yielding text pieces as they are generated.

    Args:
        loaded: from :func:`load_chat_model` (or ``mactuner.models.load_model``).
        messages: the conversation so far, ending with the user's turn.
        settings: sampling, length, stop strings and system prompt.

    Returns:
        A :class:`ChatStream`: an iterator of strings with a ``stats`` attribute
        (:class:`ChatStats`) and the whole answer in ``text`` once done.
    """
    return ChatStream(loaded, messages, settings or GenerationSettings())


def chat(loaded: LoadedModel, messages: list[Message], settings: GenerationSettings | None = None) -> tuple[str, ChatStats]:
    """Answer in one piece: ``(text, stats)``."""
    stream = stream_chat(loaded, messages, settings)
    for _ in stream:
        pass
    return stream.text, stream.stats
