"""Chat with a model (base, or base + an adapter) on the selected device, streaming the answer.

    engine.py    load a model for chatting, the token loop, ChatStream (torch)
    llamacpp.py  the same stream interface over llama.cpp for a .gguf file
    history.py   conversations per model choice, saved so they survive reloads; ChatTurn

The CPU int8/int4 decoding weights live with every other quantization path in
``mactuner.quantize.kernels``. Public names of ``engine`` are importable from ``mactuner.chat``.
"""

from mactuner.chat.engine import (
    ChatStats,
    ChatStream,
    GenerationSettings,
    Message,
    build_messages,
    chat,
    encode_prompt,
    generation_threads,
    load_chat_model,
    parse_stop_strings,
    stream_chat,
)

__all__ = [
    "ChatStats",
    "ChatStream",
    "GenerationSettings",
    "Message",
    "build_messages",
    "chat",
    "encode_prompt",
    "generation_threads",
    "load_chat_model",
    "parse_stop_strings",
    "stream_chat",
]
