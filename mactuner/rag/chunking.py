"""Cutting a document's text into overlapping chunks that follow its paragraphs and sentences.

Chunks are measured in **characters** (not tokens): ``chunk_size=800`` is about
170 MiniLM word pieces, inside the model's 256-piece window. Chunk ends prefer a
paragraph break, then a line break, then a sentence end, then a space.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass


@dataclass
class TextSpan:
    """One chunk's place in its document's text: ``text == full[start:end].strip()``."""

    start: int
    end: int
    text: str


# paragraph breaks: blank lines; in a text with none (one article or record per line), every line break
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
_LINE_BREAK = re.compile(r"\n\s*")
# inside a paragraph, best first: a line break, a sentence end, a space
_BOUNDARIES = (
    re.compile(r"\n\s*"),
    re.compile(r"(?<=[.!?。])[\"'”’)\]]*\s+"),
    re.compile(r"\s+"),
)


def _paragraphs(text: str) -> list[tuple[int, int]]:
    separator = _BLANK_LINE if _BLANK_LINE.search(text) else _LINE_BREAK
    out, start = [], 0
    for match in separator.finditer(text):
        out.append((start, match.start()))
        start = match.end()
    out.append((start, len(text)))
    return [(a, b) for a, b in out if text[a:b].strip()]


def _split_long(text: str, start: int, stop: int, chunk_size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows over ``text[start:stop]`` (one paragraph) ending at the best boundary in each window's second half."""
    piece = text[start:stop]
    levels = [[start + m.end() for m in pattern.finditer(piece)] for pattern in _BOUNDARIES]
    windows = []
    while True:
        if stop - start <= chunk_size:
            if windows and stop - start < chunk_size // 2:
                # a short tail would be a weak chunk: back the last window up to full size instead
                back = stop - chunk_size
                i = bisect.bisect_left(levels[2], back)
                start = max(start if i >= len(levels[2]) else min(levels[2][i], start), windows[-1][0] + 1)
            windows.append((start, stop))
            return windows
        limit = start + chunk_size
        end = None
        for cuts in levels:
            i = bisect.bisect_right(cuts, limit) - 1
            if i >= 0 and cuts[i] > start + chunk_size // 2:
                end = cuts[i]
                break
        end = end or limit
        windows.append((start, end))
        next_start = end
        if overlap:
            # the sentence start nearest to `overlap` before the end (up to twice that far back),
            # else the first word start inside the overlap
            target = end - overlap
            low = bisect.bisect_left(levels[1], end - 2 * overlap)
            high = bisect.bisect_left(levels[1], end - overlap // 4)
            candidates = [c for c in levels[1][low:high] if c > start]
            if candidates:
                next_start = min(candidates, key=lambda c: abs(c - target))
            else:
                i = bisect.bisect_left(levels[2], target)
                if i < len(levels[2]) and levels[2][i] < end:
                    next_start = levels[2][i]
        start = max(next_start, start + 1)


def split_text(text: str, chunk_size: int = 800, overlap: int = 120) -> list[TextSpan]:
    """Cut ``text`` into chunks of at most ``chunk_size`` characters.

    Paragraphs (blank-line separated; in a text without blank lines, lines) are
    kept whole where they fit, short neighbours packed together, and a chunk
    never runs from the end of one long paragraph into the next. A long paragraph
    is cut at the best boundary in each window's second half (line break, then
    sentence end, then space; only a run with no space is cut mid-word), and its
    pieces share ``overlap`` characters, starting at a sentence (or word) start.
    """
    if chunk_size < 1 or overlap < 0 or overlap >= chunk_size:
        raise ValueError(f"need chunk_size > overlap >= 0, got chunk_size={chunk_size}, overlap={overlap}")
    windows: list[tuple[int, int]] = []
    group: tuple[int, int] | None = None  # short paragraphs packed so far
    for start, stop in _paragraphs(text):
        if group and stop - group[0] <= chunk_size:
            group = (group[0], stop)
            continue
        if group:
            windows.append(group)
            group = None
        if stop - start <= chunk_size:
            group = (start, stop)
        else:
            windows.extend(_split_long(text, start, stop, chunk_size, overlap))
    if group:
        windows.append(group)
    spans = []
    for start, end in windows:
        raw = text[start:end]
        piece = raw.strip()
        if piece:
            lead = start + len(raw) - len(raw.lstrip())
            spans.append(TextSpan(lead, lead + len(piece), piece))
    return spans


# a sentence ends at . ! ? (and closing quotes) before a space and a capital or digit, or glued to the next
# capitalised word after a lowercase letter or digit ("radiation.Surface", as text taken from web pages often is)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[A-Z0-9\"“‘(])|(?<=[a-z0-9][.!?])(?=[A-Z][a-z])")


def split_sentences(text: str, *, max_chars: int = 400) -> list[str]:
    """The sentences of ``text`` (a chunk), in order, whitespace collapsed; a line break always ends one,
    and a very long one is cut at a space near ``max_chars``."""
    sentences = []
    parts = [part for line in _LINE_BREAK.split(text) for part in _SENTENCE_END.split(line)]
    for part in parts:
        part = " ".join(part.split())
        while len(part) > max_chars:
            cut = part.rfind(" ", max_chars // 2, max_chars)
            cut = cut if cut > 0 else max_chars
            sentences.append(part[:cut].strip())
            part = part[cut:].strip()
        if len(part) > 1:
            sentences.append(part)
    return sentences
