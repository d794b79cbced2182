"""Several chat answers generated at once, each in its own thread (Compare mode: base and fine-tuned).

A :class:`~mactuner.chat.engine.ChatStream` makes its tokens in the thread that iterates it. Compare
mode used to iterate one side to its end, then the other: the second answer started only once the first
was done. :class:`ParallelAnswers` drains each stream in a thread of its own, so both sides answer at
the same time, while the caller (the page) redraws their texts and records each side as soon as it
ends. A stop request is seen by every thread after its next token; :meth:`ParallelAnswers.stop` waits
for them, so a stopped stream is never closed while its thread still runs it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any


class ParallelAnswers:
    """Drain ``streams`` (name → stream with ``.text``, ``.stats`` and ``close()``) concurrently.

    Use it as a context manager; leaving it stops and joins every thread::

        with ParallelAnswers({"base": s1, "fine-tuned": s2}) as answers:
            for ended in answers.updates(interval=0.1):
                draw(answers.texts())          # a Stop click interrupts here
                for who in ended:
                    record(who, answers.streams[who])

    Attributes:
        streams: the streams, by name.
        errors: a side's exception (e.g. out of memory), by name; that side ends.
    """

    def __init__(self, streams: Mapping[str, Any]) -> None:
        self.streams = dict(streams)
        self.errors: dict[str, BaseException] = {}
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._ended: set[str] = set()
        self._reported: set[str] = set()
        self._threads = {who: threading.Thread(target=self._drain, args=(who,), name=f"answer-{who}", daemon=True)
                         for who in self.streams}

    def __enter__(self) -> ParallelAnswers:
        for thread in self._threads.values():
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _drain(self, who: str) -> None:
        stream = self.streams[who]
        try:
            for _ in stream:
                with self._changed:
                    self._changed.notify_all()
                if self._stop.is_set():
                    break
        except Exception as exc:  # noqa: BLE001 - handed to the page, which shows it for this side
            self.errors[who] = exc
        finally:
            with self._changed:
                self._ended.add(who)
                self._changed.notify_all()

    def texts(self) -> dict[str, str]:
        """Each side's answer so far."""
        return {who: stream.text for who, stream in self.streams.items()}

    def ended(self) -> set[str]:
        """The sides whose stream has ended (finished, stopped or failed)."""
        with self._changed:
            return set(self._ended)

    def updates(self, interval: float = 0.1) -> Iterator[list[str]]:
        """Yield at least every ``interval`` seconds while a side still answers (sooner when a token came),
        each time with the sides that ended since the last yield; the last yield holds the last ones."""
        while True:
            with self._changed:
                if len(self._ended) < len(self.streams):
                    self._changed.wait(interval)
                newly = sorted(self._ended - self._reported, key=list(self.streams).index)
                self._reported |= set(newly)
                done = len(self._ended) == len(self.streams)
            yield newly
            if done:
                return

    def stop(self, timeout: float | None = None) -> None:
        """Ask every side to stop after its next token and wait for their threads."""
        self._stop.set()
        for thread in self._threads.values():
            if thread.is_alive():
                thread.join(timeout)
