"""Chat with a GGUF file through llama.cpp (``llama-cpp-python``), with the torch engine's interface.

:func:`load_gguf_chat_model` opens a ``.gguf`` (one MacTuner exported, or the person's
own) and :func:`stream_gguf_chat` answers a conversation as a :class:`GGUFChatStream`:
an iterator of text pieces with ``.text``, ``.stats`` (:class:`mactuner.chat.ChatStats`)
and ``.close()``, exactly like :class:`mactuner.chat.ChatStream`, so the Chat page's
streaming, figures and compare mode work with either engine.

The prompt is rendered with the chat template stored in the file's own metadata
(``tokenizer.chat_template``, as llama.cpp's chat handlers do), so what is tested
here is what Ollama, LM Studio and ``llama-cli`` see. Sampling follows the torch
engine: greedy at temperature 0, else temperature, top-k 50 and top-p, no repeat
penalty. On an MPS or CUDA device, every layer is offloaded to the GPU (``n_gpu_layers=-1``)
where the llama.cpp build supports it (``llama_supports_gpu_offload()``: the macOS wheel
build of llama-cpp-python uses Metal by default; for CUDA build it with
``CMAKE_ARGS="-DGGML_CUDA=on"``); a CPU-only build, like the Linux set-up's, runs on the CPU.
"""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mactuner.chat.engine import ChatStats, GenerationSettings, Message, build_messages, generation_threads

DEFAULT_CONTEXT = 4096  # tokens; the file's own training context when that is smaller


def llama_cpp_missing_reason() -> str | None:
    """Why llama.cpp cannot be used here (``None`` when ``llama_cpp`` imports)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return (f"Chatting with a .gguf file needs llama.cpp (llama-cpp-python is not importable: {exc}). Build it with "
                "`make llamacpp` in MacTuner's folder, or: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install "
                "llama-cpp-python==0.3.36 (builds llama.cpp from source, ~10 min; on a Mac it uses Metal). The rest "
                "of MacTuner works without it.")
    return None


@dataclass
class GGUFModel:
    """A GGUF file opened by llama.cpp, with the chat template from its metadata."""

    llama: Any  # llama_cpp.Llama
    path: Path
    source: str
    template: str | None  # tokenizer.chat_template from the file, if any
    n_ctx: int
    bos_token: str
    eos_token: str
    device: str = "cpu (llama.cpp)"

    def close(self) -> None:
        """Free llama.cpp's model and context now rather than at garbage collection."""
        if self.llama is not None:
            self.llama.close()
            self.llama = None


def gpu_layers(device: Any = None, supports_offload: bool | None = None) -> int:
    """``n_gpu_layers`` for llama.cpp: all (-1) on an MPS or CUDA device when the build can offload, else 0."""
    kind = str(device or "cpu").split(":")[0]
    if kind not in ("mps", "cuda"):
        return 0
    if supports_offload is None:
        import llama_cpp

        supports_offload = bool(llama_cpp.llama_supports_gpu_offload())
    return -1 if supports_offload else 0


def load_gguf_chat_model(path: str | os.PathLike, *, n_ctx: int | None = None, n_threads: int | None = None,
                         seed: int = 0, device: Any = None) -> GGUFModel:
    """Open a ``.gguf`` file with llama.cpp for chatting.

    Args:
        path: the GGUF file.
        n_ctx: context length; default the file's training context, at most :data:`DEFAULT_CONTEXT`.
        n_threads: CPU threads; default chosen per answer like the torch engine.
        seed: the sampler's seed (answers at temperature > 0 repeat with the same seed).
        device: the selected device; on ``mps`` or ``cuda`` the layers are offloaded to the GPU
            where the llama.cpp build supports it (:func:`gpu_layers`).

    Raises:
        RuntimeError: llama-cpp-python is missing (the message says how to install it).
        FileNotFoundError: no such file.
        ValueError: llama.cpp cannot load the file (not a GGUF, an unknown architecture, …).
    """
    reason = llama_cpp_missing_reason()
    if reason:
        raise RuntimeError(reason)
    from llama_cpp import Llama

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pick a .gguf file.")
    from mactuner.file_checks import check_gguf_header

    check_gguf_header(path)  # lengths no file could hold are refused here, not handed to llama.cpp
    threads = n_threads or generation_threads(_cpu()) or 1
    offload = gpu_layers(device)
    try:
        llama = Llama(model_path=str(path), n_ctx=n_ctx or DEFAULT_CONTEXT, n_threads=threads, n_threads_batch=threads,
                      seed=seed, verbose=False, n_gpu_layers=offload)
    except ValueError as exc:
        raise ValueError(f"llama.cpp could not load {path}: {exc}") from exc
    train_ctx = int(llama.metadata.get(f"{llama.metadata.get('general.architecture', 'llama')}.context_length", 0) or 0)
    if n_ctx is None and train_ctx and train_ctx < llama.n_ctx():
        llama.close()
        llama = Llama(model_path=str(path), n_ctx=train_ctx, n_threads=threads, n_threads_batch=threads,
                      seed=seed, verbose=False, n_gpu_layers=offload)
    model = llama._model
    eos, bos = llama.token_eos(), llama.token_bos()
    return GGUFModel(
        llama, path, str(path), llama.metadata.get("tokenizer.chat_template"), llama.n_ctx(),
        model.token_get_text(bos) if bos != -1 else "", model.token_get_text(eos) if eos != -1 else "",
        device=f"{str(device).split(':')[0]} (llama.cpp, all layers offloaded)" if offload else "cpu (llama.cpp)",
    )


def _cpu():
    import torch

    return torch.device("cpu")


def render_prompt(loaded: GGUFModel, messages: list[Message]) -> str:
    """The conversation rendered with the file's own chat template, ready for the assistant's turn."""
    if not loaded.template:
        return "\n".join(m["content"] for m in messages)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=loaded.template, eos_token=loaded.eos_token, bos_token=loaded.bos_token)
    return formatter(messages=messages).prompt


def encode_gguf_prompt(loaded: GGUFModel, messages: list[Message], settings: GenerationSettings) -> list[int]:
    """Token ids of the templated conversation; the oldest turns after a system message go first when too long."""
    conversation = build_messages(messages, settings)
    if not conversation:
        raise ValueError("there is no message to answer")
    budget = max(1, loaded.n_ctx - settings.max_new_tokens)
    while True:
        # the template writes the special tokens itself (llama.cpp's chat handlers tokenize the same way)
        ids = loaded.llama.tokenize(render_prompt(loaded, conversation).encode("utf-8"),
                                    add_bos=not loaded.template, special=True)
        first = 1 if conversation[0]["role"] == "system" else 0
        if len(ids) <= budget or len(conversation) - first <= 1:
            break
        del conversation[first]
    return ids[-budget:]


class _StopStrings:
    """Cuts the answer at the first stop string, holding back a tail that may grow into one."""

    def __init__(self, stop: list[str]):
        self.stop, self.held, self.stopped = stop, "", False

    def feed(self, text: str, end: bool = False) -> str:
        if self.stopped:
            return ""
        text, self.held = self.held + text, ""
        if self.stop:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                return text[:cut]
            if not end:
                keep = max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                           default=0)
                if keep:
                    text, self.held = text[:-keep], text[-keep:]
        return text


class GGUFChatStream:
    """An answer being generated by llama.cpp: iterate for text pieces; ``stats`` fills in as it goes.

    The same contract as :class:`mactuner.chat.ChatStream`: ``text`` is the answer so
    far, ``stats`` a :class:`ChatStats` (``finish_reason`` "stop", "length" or
    "cancelled"), ``close()`` stops generating.
    """

    def __init__(self, loaded: GGUFModel, messages: list[Message], settings: GenerationSettings):
        if loaded.llama is None:
            raise RuntimeError("this GGUF model was closed; load it again")
        self.settings = settings
        self.stats = ChatStats()
        self.text = ""
        self.token_ids: list[int] = []  # the answer's tokens (the end-of-generation token excluded)
        self._started = time.perf_counter()
        self._loaded = loaded
        self._ids = encode_gguf_prompt(loaded, messages, settings)
        self.stats.prompt_tokens = len(self._ids)
        self.stats.threads = generation_threads(_cpu())
        self._tokens = self._generate()

    def _generate(self) -> Iterator[str]:
        import llama_cpp

        loaded, stats, settings = self._loaded, self.stats, self.settings
        llama = loaded.llama
        if stats.threads:
            llama_cpp.llama_set_n_threads(llama.ctx, stats.threads, stats.threads)
        vocab = llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = _StopStrings(settings.stop)
        first_at = last_at = None
        greedy = settings.greedy
        tokens = llama.generate(self._ids, temp=0.0 if greedy else float(settings.temperature), top_k=50,
                                top_p=float(settings.top_p), min_p=0.0, repeat_penalty=1.0, reset=True)
        try:
            for token in tokens:
                last_at = time.perf_counter()
                if first_at is None:
                    first_at = last_at
                    stats.time_to_first_token = first_at - self._started
                stats.new_tokens += 1
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    stats.finish_reason = "stop"
                    break
                self.token_ids.append(int(token))
                piece = stops.feed(decoder.decode(llama.detokenize([token])))
                if piece:
                    self.text += piece
                    yield piece
                if stops.stopped:
                    stats.finish_reason = "stop"
                    break
                if stats.new_tokens >= settings.max_new_tokens:
                    stats.finish_reason = "length"
                    break
            if not stops.stopped:
                piece = stops.feed(decoder.decode(b"", final=True), end=True)
                if piece:
                    self.text += piece
                    yield piece
        finally:
            tokens.close()
            stats.total_seconds = time.perf_counter() - self._started
            if first_at is not None and last_at is not None and stats.new_tokens > 1 and last_at > first_at:
                stats.tokens_per_second = (stats.new_tokens - 1) / (last_at - first_at)
            if stats.finish_reason is None:
                stats.finish_reason = "cancelled"

    def __iter__(self) -> GGUFChatStream:
        return self

    def __next__(self) -> str:
        return next(self._tokens)

    def close(self) -> None:
        """Stop generating; ``stats.finish_reason`` becomes ``"cancelled"`` unless the answer had ended."""
        self._tokens.close()


def stream_gguf_chat(loaded: GGUFModel, messages: list[Message], settings: GenerationSettings | None = None) -> GGUFChatStream:
    """Answer the conversation with llama.cpp, yielding text pieces as they are generated."""
    return GGUFChatStream(loaded, messages, settings or GenerationSettings())


def gguf_chat(loaded: GGUFModel, messages: list[Message], settings: GenerationSettings | None = None) -> tuple[str, ChatStats]:
    """Answer in one piece: ``(text, stats)``."""
    stream = stream_gguf_chat(loaded, messages, settings)
    for _ in stream:
        pass
    return stream.text, stream.stats
