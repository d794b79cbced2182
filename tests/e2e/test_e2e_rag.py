"""The RAG page in a real browser, with the real models: create a collection, index a folder of
Wikipedia articles with the built-in MiniLM, ask a question, and see the streamed answer and its sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from mactuner import rag
from tests.browser import browser_page, running_app, wait_for_app
from tests.locations import WIKI_DEMO

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WIKI = WIKI_DEMO


def write_articles(folder: Path) -> None:
    """Three articles' openings from wiki_demo.txt (Albedo, Austin, Andre Agassi), one file each."""
    lines = WIKI.read_text(encoding="utf-8").split("\n")
    folder.mkdir()
    for name, line in (("albedo.txt", 3), ("austin.txt", 27), ("agassi.txt", 30)):
        text = lines[line - 1]
        (folder / name).write_text(text[: text.rfind(". ", 0, 1500) + 1], encoding="utf-8")


def test_index_and_ask_shows_sources(tmp_path, smollm2_path):
    docs = tmp_path / "articles"
    write_articles(docs)
    home = tmp_path / "home"
    with running_app({"MACTUNER_HOME": str(home)}) as url, browser_page(default_timeout_ms=120_000) as page:
        page.goto(url + "/rag")
        wait_for_app(page)
        page.get_by_label("Name").fill("wiki")
        page.get_by_role("button", name="Create collection").click()
        wait_for_app(page)
        page.get_by_label("…or a folder on this machine").fill(str(docs))
        page.get_by_label("…or a folder on this machine").press("Enter")
        wait_for_app(page)
        page.get_by_role("button", name="Index").click()
        page.get_by_text("Indexed 3 document(s)").wait_for(timeout=180_000)
        assert rag.Collection.open("wiki", root=home / "rag").chunk_count >= 3

        page.get_by_label("Question").fill("What is the capital city of Texas?")
        page.get_by_label("Question").press("Enter")
        wait_for_app(page)
        page.get_by_role("button", name="Ask").click()
        first_source = page.get_by_text("[1] austin.txt · line 1, chunk 0 · score")
        first_source.wait_for(timeout=240_000)
        wait_for_app(page, timeout_ms=120_000)
        # the answer was streamed into the page above the sources, and each source opens to its text
        assert page.get_by_text("Sources", exact=True).is_visible()
        # only the text above the "Sources" heading is the answer (the evidence below it names Austin anyway)
        answer = page.evaluate("""() => {
            const sources = [...document.querySelectorAll('h1,h2,h3,h4,h5,h6,p,strong,span')]
                .find(e => e.textContent.trim() === 'Sources');
            return [...document.querySelectorAll('[data-testid="stMarkdownContainer"]')]
                .filter(e => sources && (e.compareDocumentPosition(sources) & Node.DOCUMENT_POSITION_FOLLOWING))
                .map(e => e.innerText).join('\\n');
        }""")
        assert "Austin" in answer, f"the streamed answer does not name Austin: {answer[-300:]!r}"
        first_source.click()
        page.get_by_text("Austin is the capital of Texas").first.wait_for()
