"""Chat with a model (base, or base + a LoRA adapter) on the selected device, streaming the answer.

The engine is transformers' ``generate`` running in a worker thread and feeding a
``TextIteratorStreamer``; the caller iterates over text pieces as they are made
(``st.write_stream`` in the UI, ``print`` in the command line).

What makes it fast on a CPU (measured with ``bench/generate.py``):

- bfloat16 weights where the CPU computes them natively (``get_optimal_dtype``):
  decoding one token reads every weight once, so half the bytes is close to
  half the time;
- ``torch.inference_mode`` (no autograd bookkeeping);
- an adapter is merged into the weights at load time, so a fine-tuned model
  costs no more per token than the base one;
- on a CPU shared with other work, fewer OpenMP threads than cores: a thread
  that the OS deschedules stalls every other thread at each barrier, which made
  a 2-thread decode 4-20x slower than a 1-thread one on a busy 2-core machine.

Caching loaded models is the UI layer's job (``st.cache_resource``); this module
only loads, generates and frees.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from mactuner.devices import get_optimal_dtype, resolve_device
from mactuner.models import DEFAULT_MODEL, LoadedModel, Progress, load_model

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


# ---------------------------------------------------------------- loading


def adapter_base_model(adapter: str | os.PathLike) -> str | None:
    """The base model an adapter folder was trained on (``base_model_name_or_path``), if recorded."""
    config = Path(adapter) / "adapter_config.json"
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path") or None
    except (OSError, ValueError):
        return None


def _check_adapter(adapter: str | os.PathLike) -> Path:
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not an adapter folder (no adapter_config.json). "
            "Pick a finished run's adapter/ folder or one of its checkpoints/step-N folders."
        )
    return path


def _base_for(source: str | None, adapter: Path | None) -> str:
    if source:
        return source
    if adapter is not None:
        recorded = adapter_base_model(adapter)
        # a recorded hub id or missing folder would need the network: fall back to the built-in model
        if recorded and (recorded == DEFAULT_MODEL or Path(recorded).is_dir()):
            return recorded
    return DEFAULT_MODEL


def load_chat_model(
    source: str | None = None,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
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

    Returns:
        A ``LoadedModel`` whose ``source`` reads ``"base + adapter"`` when an adapter was merged.

    Raises:
        FileNotFoundError: the adapter folder is not a PEFT adapter.
        RuntimeError: the device is not available.
    """
    device = resolve_device(device)
    dtype = dtype or get_optimal_dtype(device)
    adapter_path = _check_adapter(adapter) if adapter else None
    base = _base_for(source, adapter_path)
    loaded = load_model(base, device=device, dtype=dtype, progress=progress)
    if adapter_path is not None:
        from peft import PeftModel

        if progress:
            progress(f"Applying adapter {adapter_path.name}…", None)
        peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_path))
        # merged weights decode as fast as the base model's (no extra LoRA matmuls per token)
        loaded.model = peft_model.merge_and_unload()
        loaded.model.eval()
        loaded.source = f"{loaded.source} + {adapter_path}"
    if progress:
        progress("Model ready.", 1.0)
    return loaded


@dataclass
class AdapterChoice:
    """An adapter a person can chat with: a finished run's final adapter or one of its checkpoints."""

    label: str  # "run-id · final" or "run-id · step 50"
    path: Path
    run_id: str
    base_model: str | None  # the run's configured model, if known
    step: int | None  # None for the final adapter


def list_adapters() -> list[AdapterChoice]:
    """Adapters found under ``paths.runs_dir()``: each run's final ``adapter/`` (finished runs) then its checkpoints, newest run first."""
    from mactuner.checkpoints import list_checkpoints
    from mactuner.runs import list_runs

    choices = []
    for run in list_runs():
        final = run.path / "adapter"
        if run.state == "finished" and (final / "adapter_config.json").is_file():
            choices.append(AdapterChoice(f"{run.id} · final", final, run.id, run.model, None))
        for checkpoint in reversed(list_checkpoints(run.path)):
            if (checkpoint.path / "adapter_config.json").is_file():
                label = f"{run.id} · step {checkpoint.step}"
                choices.append(AdapterChoice(label, checkpoint.path, run.id, run.model, checkpoint.step))
    return choices


def release_model(loaded: LoadedModel | None = None) -> None:
    """Free what a dropped model held: collect garbage and return cached device memory.

    Call it after the last reference to a model is gone (e.g. after clearing the
    UI's model cache when the person switches device); a model still referenced
    somewhere cannot be freed. If ``loaded`` is given its weights are dropped
    first, so even a lingering reference to the ``LoadedModel`` holds no memory.
    """
    device = None
    if loaded is not None:
        device = loaded.device
        loaded.model = None
    gc.collect()
    _trim_host_heap()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available() and (device is None or device.type == "mps"):
        torch.mps.empty_cache()


def _trim_host_heap() -> None:
    # glibc keeps freed tensor memory in its heap for reuse (its mmap threshold
    # rises after large frees), so the process's RSS would not drop; malloc_trim
    # hands the free pages back to the system
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- CPU threads


class _CpuContention:
    """How many cores other processes kept busy since the previous answer.

    Measured from system-wide and this process's CPU times (no sampling pause):
    the window runs from the previous answer, or from this module's import
    (which precedes loading the model) for the first one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, float, float] | None = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        import psutil

        sys_times = psutil.cpu_times()
        busy = sum(sys_times) - sys_times.idle - getattr(sys_times, "iowait", 0.0)
        proc = psutil.Process().cpu_times()
        return time.monotonic(), busy, proc.user + proc.system

    def other_busy_cores(self) -> float | None:
        with self._lock:
            now = self._snapshot()
            last, self._last = self._last, now
        if last is None or now[0] - last[0] < 0.2:
            return None
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))


_contention = _CpuContention()
_DEFAULT_THREADS = torch.get_num_threads()


def generation_threads(device: torch.device) -> int | None:
    """CPU threads for the next answer (``None`` on GPUs).

    ``MACTUNER_CPU_THREADS`` fixes it; otherwise every core torch would use,
    minus the cores other processes kept busy lately (at least one).
    """
    if device.type != "cpu":
        return None
    fixed = os.environ.get("MACTUNER_CPU_THREADS")
    if fixed:
        return max(1, int(fixed))
    others = _contention.other_busy_cores()
    if others is None:
        return _DEFAULT_THREADS
    return max(1, min(_DEFAULT_THREADS, round(_DEFAULT_THREADS - others)))


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


def encode_prompt(loaded: LoadedModel, messages: list[Message], settings: GenerationSettings) -> torch.Tensor:
    """Token ids of the templated conversation, ready for the assistant's turn (1 x N, on the model's device).

    When the conversation is longer than the model's context allows, the oldest
    turns after any system message are dropped (the newest question is kept).
    """
    tokenizer = loaded.tokenizer
    conversation = build_messages(messages, settings)
    if not conversation:
        raise ValueError("there is no message to answer")
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or 1 << 30
    budget = limit - settings.max_new_tokens
    while True:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
        else:
            # a base model without a template: plain text, the turns one per line
            text = "\n".join(m["content"] for m in conversation)
            ids = tokenizer(text)["input_ids"]
        first = 1 if conversation[0]["role"] == "system" else 0
        if len(ids) <= budget or len(conversation) - first <= 1:
            break
        del conversation[first]
    if len(ids) > budget:
        ids = ids[-max(budget, 1) :]
    return torch.tensor([ids], device=loaded.device)


class _ChatStreamer:
    """Builds on ``TextIteratorStreamer``: counts tokens, times them, and applies stop strings.

    Everything here runs in the generation thread, so the stop check sees text
    as soon as it is decoded and the stopping criterion can end ``generate`` at once.
    """

    def __new__(cls, *args, **kwargs):  # the transformers import waits until a chat starts
        from transformers import TextIteratorStreamer

        class ChatStreamer(TextIteratorStreamer):
            def __init__(self, tokenizer, stop: list[str], stats: ChatStats, started: float):
                super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
                self.stop = stop
                self.stats = stats
                self.started = started
                self.first_token_at: float | None = None
                self.last_token_at: float | None = None
                self.stopped = False  # a stop string was seen
                self.cancelled = False  # the reader went away
                self.held = ""  # text that may be the start of a stop string
                self.emitted = ""

            def put(self, value):
                if not self.next_tokens_are_prompt:
                    now = time.perf_counter()
                    if self.first_token_at is None:
                        self.first_token_at = now
                        self.stats.time_to_first_token = now - self.started
                    self.last_token_at = now
                    self.stats.new_tokens += int(value.numel())
                if self.stopped:
                    return
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False):
                if self.stopped:
                    if stream_end:
                        super().on_finalized_text("", stream_end=True)
                    return
                text = self.held + text
                self.held = ""
                if self.stop:
                    cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
                    if cut >= 0:
                        self.stopped = True
                        text, stream_end = text[:cut], True
                    elif not stream_end:
                        # keep back a tail that could grow into a stop string
                        keep = max(
                            (k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                            default=0,
                        )
                        if keep:
                            text, self.held = text[:-keep], text[-keep:]
                self.emitted += text
                super().on_finalized_text(text, stream_end=stream_end)

        return ChatStreamer(*args, **kwargs)


class ChatStream:
    """An answer being generated: iterate for text pieces; ``stats`` fills in as it goes.

    Generation runs in a worker thread. Breaking out of the loop (or ``close()``)
    stops it after the current token; an error in the worker is raised here.
    """

    def __init__(self, loaded: LoadedModel, messages: list[Message], settings: GenerationSettings):
        from transformers import StoppingCriteria, StoppingCriteriaList

        self.settings = settings
        self.stats = ChatStats()
        self.text = ""
        started = time.perf_counter()
        self._started = started
        input_ids = encode_prompt(loaded, messages, settings)
        self.stats.prompt_tokens = int(input_ids.shape[1])
        tokenizer = loaded.tokenizer
        self._streamer = streamer = _ChatStreamer(tokenizer, settings.stop, self.stats, started)

        class _StopWhenStreamerSays(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = streamer.stopped or streamer.cancelled
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=settings.max_new_tokens,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopWhenStreamerSays()]),
            pad_token_id=pad,
        )
        if settings.greedy:
            # explicit None: a model's generation_config may carry sampling defaults
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=float(settings.temperature), top_p=float(settings.top_p))
        self._error: BaseException | None = None
        self._threads = generation_threads(loaded.device)
        self.stats.threads = self._threads
        self._thread = threading.Thread(target=self._generate, args=(loaded.model, kwargs), daemon=True)
        self._thread.start()
        self._iterator = iter(streamer)
        self._closed = False

    def _generate(self, model, kwargs) -> None:
        previous = torch.get_num_threads()
        try:
            if self._threads is not None and self._threads != previous:
                torch.set_num_threads(self._threads)
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who raises it
            self._error = exc
            self._streamer.on_finalized_text("", stream_end=True)
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        piece = ""
        while not piece:  # the streamer also emits "" (special tokens, held-back text)
            try:
                piece = next(self._iterator)
            except StopIteration:
                self._finish()
                raise
        self.text += piece
        return piece

    def _finish(self) -> None:
        self._closed = True
        self._thread.join()
        streamer, stats = self._streamer, self.stats
        end = streamer.last_token_at or time.perf_counter()
        stats.total_seconds = time.perf_counter() - self._started
        if streamer.first_token_at is not None and stats.new_tokens > 1 and end > streamer.first_token_at:
            stats.tokens_per_second = (stats.new_tokens - 1) / (end - streamer.first_token_at)
        if self._error is not None:
            stats.finish_reason = "error"
            raise RuntimeError(f"generation failed: {self._error}") from self._error
        if streamer.cancelled:
            stats.finish_reason = "cancelled"
        elif streamer.stopped or stats.new_tokens < self.settings.max_new_tokens:
            stats.finish_reason = "stop"
        else:
            stats.finish_reason = "length"

    def close(self) -> None:
        """Stop generating (after the current token) and wait for the worker."""
        if self._closed:
            return
        self._streamer.cancelled = True
        for _ in self._iterator:  # drain so the worker is never blocked on the queue
            pass
        self._finish()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


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
