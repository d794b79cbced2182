"""``python -m mactuner chat [--model M] [--adapter DIR] [--device D] [--prompt "…"]``.

With ``--prompt`` it answers once and exits; without, it opens a small REPL
(``/clear`` forgets the conversation, ``/quit`` or Ctrl-D leaves). Answers
stream as they are generated, followed by a line with time to first token
and tokens/s. The device defaults to the one remembered by ``devices select``.

Exit codes: 0 done, 1 the model could not be loaded or generation failed.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "chat with the base model or a fine-tuned adapter (streams the answer)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, adapter, device, one-shot prompt and generation settings."""
    parser.add_argument("--model", help="base model: the built-in default, a hub id, a local folder or a .gguf file")
    parser.add_argument("--adapter", help="PEFT adapter folder (a run's adapter/ or checkpoints/step-N)")
    parser.add_argument("--device", help="cpu, mps, cuda or cuda:N (default: remembered, else automatic)")
    parser.add_argument("--prompt", help="answer this once and exit (no REPL)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep the likeliest tokens up to this probability (default 0.9)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="with --prompt: print {answer, stats} as JSON")


def _device(args) -> str | None:
    if args.device:
        return args.device
    from mactuner.settings import load_settings

    return load_settings().default_device


def _answer(loaded, messages, settings, as_json: bool) -> str:
    from mactuner.chat import stream_chat

    stream = stream_chat(loaded, messages, settings)
    if as_json:
        for _ in stream:
            pass
        print(json.dumps({"answer": stream.text, "stats": stream.stats.to_dict()}, indent=2))
        return stream.text
    for piece in stream:
        print(piece, end="", flush=True)
    s = stream.stats
    ttft = f"{s.time_to_first_token:.2f} s" if s.time_to_first_token is not None else "-"
    tps = f"{s.tokens_per_second:.1f}" if s.tokens_per_second is not None else "-"
    print(f"\n[{s.new_tokens} tokens · first token {ttft} · {tps} tokens/s · {s.finish_reason}]", file=sys.stderr)
    return stream.text


def run(args: argparse.Namespace) -> int:
    """Load the model, then answer the prompt or run the REPL."""
    from mactuner.chat import GenerationSettings, load_chat_model
    from mactuner.models import ModelSourceError

    try:
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            stop=args.stop, system_prompt=args.system,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        loaded = load_chat_model(
            args.model, args.adapter, device=_device(args),
            progress=None if args.json else (lambda message, _fraction: print(message, file=sys.stderr)),
        )
    except (ModelSourceError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.prompt is not None:
            _answer(loaded, [{"role": "user", "content": args.prompt}], settings, args.json)
            return 0
        print(f"Chatting with {loaded.source} on {loaded.device}. /clear forgets, /quit leaves.", file=sys.stderr)
        history: list[dict[str, str]] = []
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line == "/clear":
                history.clear()
                print("(conversation cleared)", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            print("model> ", end="", flush=True)
            history.append({"role": "assistant", "content": _answer(loaded, history, settings, False)})
            print()
    except RuntimeError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
