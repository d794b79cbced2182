"""Documents to text: safe names for files and collections, and text from .txt/.md, .html and .pdf files.

A file that cannot be read raises :class:`DocumentError` naming it; the caller
(:meth:`mactuner.rag.Collection.add`) skips that one file and indexes the rest.
PDF parsing is the riskiest part (hostile files, decompression bombs): every
error pypdf can raise, its own and the plain Python ones it lets escape, becomes
a ``DocumentError``.
"""

from __future__ import annotations

import html
import html.parser
import io
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from mactuner.fileio import slug
from mactuner.rag.base import RagError

SUPPORTED_SUFFIXES = {".txt": "text", ".md": "text", ".markdown": "text", ".pdf": "pdf", ".html": "html", ".htm": "html"}


class DocumentError(RagError):
    """One file cannot be indexed (too large, unreadable, unsupported); the others go on."""


_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_filename(name: str, default: str = "document") -> str:
    """A file name that is safe to create inside a folder: no folders, no ``..``, no odd characters.

    Only the last component of ``name`` is kept (``/`` and ``\\`` both count as
    separators), accents are folded to ASCII, anything outside ``A-Z a-z 0-9 . _ -
    space`` becomes ``_``, leading dots and spaces go (no hidden files, no ``..``),
    and the result is at most 120 characters with its suffix kept.
    """
    base = str(name).replace("\\", "/").split("/")[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    base = _UNSAFE.sub("_", base).strip(" ._") if base.strip(" .") else ""
    base = re.sub(r"_+", "_", base)
    if not base or set(base) <= {"_", "-"}:
        base = default
    if len(base) > 120:
        stem, dot, suffix = base.rpartition(".")
        base = (stem[: 119 - len(suffix)] + dot + suffix) if dot and len(suffix) <= 10 else base[:120]
    return base


def safe_collection_name(name: str) -> str:
    """The folder name of a collection: letters, digits, ``-`` and ``_`` only.

    Raises:
        ValueError: nothing usable is left of ``name``.
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii").strip()
    text = slug(text, default="", max_chars=80, allowed="A-Za-z0-9_-")
    if not text:
        raise ValueError(f"a collection name needs letters or digits (e.g. handbook), got {name!r}")
    return text


@dataclass
class ExtractedText:
    """A document's text and where its pages begin (PDF only)."""

    text: str
    page_starts: list[int] = field(default_factory=list)  # character offset of each page, PDF only


def _decode_text(data: bytes, name: str) -> str:
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{name}: this looks like a binary file, not text")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        text = data.decode("latin-1")
    controls = sum(1 for ch in text[:8192] if ord(ch) < 32 and ch not in "\n\r\t\f")
    if controls > 0.05 * max(1, min(len(text), 8192)):
        raise DocumentError(f"{name}: this looks like a binary file, not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: scripts and styles dropped, block elements on their own lines."""

    BLOCKS = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer",
              "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "title", "hr", "dd", "dt"}
    HIDDEN = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self._hidden += 1
        if tag == "title":
            self._in_title = True
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN and self._hidden:
            self._hidden -= 1
        if tag == "title":
            self._in_title = False
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        # the <title> sits in <head>, but it names the page: keep it
        if not self._hidden or self._in_title:
            self.parts.append(data)


def _html_to_text(data: bytes, name: str) -> str:
    parser = _HTMLText()
    parser.feed(_decode_text(data, name))
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# what reading a hostile or broken PDF can raise: pypdf's own errors (its base class covers
# LimitReachedError, the decompression-bomb guard, and every parse error) and the plain
# Python ones its parser lets escape on malformed objects
_PDF_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, AssertionError,
               ArithmeticError, RecursionError, MemoryError, zlib.error, UnicodeError)


MAX_PDF_PAGES = 5_000  # a PDF with more pages is refused before any is read
MAX_DOCUMENT_CHARACTERS = 10_000_000  # text extracted from one PDF (about 5,000 dense pages)
# and at most this many characters per byte of the file beyond the first million characters: compressed
# text is ~3-5 characters a byte, so a small file whose pages reuse one stream stops early
MAX_CHARACTERS_PER_BYTE = 20


def pdf_character_cap(size: int) -> int:
    """How many characters of text MacTuner extracts at most from a PDF of ``size`` bytes."""
    return min(MAX_DOCUMENT_CHARACTERS, max(1_000_000, MAX_CHARACTERS_PER_BYTE * size))


def _pdf_to_text(data: bytes, name: str) -> ExtractedText:
    from pypdf import PdfReader
    from pypdf.errors import LimitReachedError, PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(f"{name}: the PDF is encrypted; save an unprotected copy and add that")
        count = len(reader.pages)
        if count > MAX_PDF_PAGES:
            raise DocumentError(f"{name}: {count:,} pages; MacTuner indexes PDFs of at most {MAX_PDF_PAGES:,} pages. "
                                "Split it and add the parts.")
        cap = pdf_character_cap(len(data))
        pages, starts, offset = [], [], 0
        for number, page in enumerate(reader.pages, start=1):
            text = (page.extract_text() or "").strip()
            starts.append(offset)
            pages.append(text)
            offset += len(text) + 2  # the "\n\n" joining pages
            if offset > cap:  # pages may share one stream: a small file, endless text
                raise DocumentError(
                    f"{name}: refused: its text runs past {cap:,} characters by page {number} of {count:,}, "
                    f"the most MacTuner extracts from a {len(data) / 1e3:,.0f} KB PDF. Split it, or add the "
                    "pages you need.")
    except DocumentError:
        raise
    except LimitReachedError as exc:
        raise DocumentError(f"{name}: refused: the PDF inflates past pypdf's safety limit (a decompression "
                            f"bomb, or a very large stream): {exc}") from exc
    except PyPdfError as exc:
        raise DocumentError(f"{name}: cannot read this PDF ({type(exc).__name__}: {exc})") from exc
    except _PDF_ERRORS as exc:
        raise DocumentError(f"{name}: cannot read this PDF ({type(exc).__name__}: {exc})") from exc
    return ExtractedText("\n\n".join(pages), starts)


def extract_text(data: bytes, name: str) -> ExtractedText:
    """The text of a document from its bytes; the kind comes from the name's suffix.

    Raises:
        DocumentError: unsupported type, binary or corrupt content, or no text at all.
    """
    kind = SUPPORTED_SUFFIXES.get(Path(name).suffix.lower())
    if kind is None:
        raise DocumentError(
            f"{name}: unsupported file type; add {', '.join(sorted(SUPPORTED_SUFFIXES))} files"
        )
    if kind == "pdf":
        extracted = _pdf_to_text(data, name)
    elif kind == "html":
        extracted = ExtractedText(_html_to_text(data, name))
    else:
        extracted = ExtractedText(_decode_text(data, name))
    if not extracted.text.strip():
        hint = " (a scanned PDF has images, not text)" if kind == "pdf" else ""
        raise DocumentError(f"{name}: no text found{hint}")
    return extracted
