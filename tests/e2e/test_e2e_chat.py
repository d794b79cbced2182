"""The chat page in a real browser with the real model: ask a question and watch the answer
arrive token by token, then see its time to first token and tokens/s; after the demo fine-tune,
Compare mode asked the same question twice never has the base model state the tuned fact, and
Stop ends a long answer half-way (both sides: they answer at once), and the page drawn by the click
shows it."""

from __future__ import annotations

import re
import time

import pytest

from tests.browser import browser_page, running_app, wait_for_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_chat_streams_tokens(tmp_path, smollm2_path):
    with running_app({"MACTUNER_HOME": str(tmp_path / "home")}) as url, browser_page(default_timeout_ms=120_000) as page:
        page.goto(url + "/chat")
        wait_for_app(page)
        page.get_by_role("heading", name="Chat").wait_for()
        box = page.get_by_placeholder("Ask something")
        box.fill("Tell me about the city of Paris in a few sentences.")
        box.press("Enter")

        answer = page.locator('[data-testid="stChatMessage"]').nth(1)
        answer.wait_for(timeout=120_000)  # includes loading the model
        seen: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            text = answer.inner_text().strip()
            if text and (not seen or text != seen[-1]):
                seen.append(text)
            if "tokens/s" in text:
                break
            time.sleep(0.05)
        assert "tokens/s" in seen[-1] and "first token" in seen[-1], seen[-3:]
        # (the model's loading progress shows in the message first: "base: Loading …")
        partial = [s for s in seen if "tokens/s" not in s and "base: " not in s]
        # tokens arrived in several steps, each one extending the text before it
        assert len(partial) >= 3, partial
        assert all(later.startswith(earlier[:-1]) for earlier, later in zip(partial, partial[1:])), partial
        assert "Paris" in seen[-1]


# --- Compare mode after the README demo --------------------------------------------------------

QUESTION = "What is the capital of Quenmark?"


def set_slider(page, key: str, *keys: str) -> None:
    """Move a slider with the keyboard, as a person can (Home: its minimum; ArrowRight: one step up)."""
    handle = page.locator(f".st-key-{key} input")
    handle.focus()
    for name in keys:
        handle.press(name)
    wait_for_app(page)


def ask_and_wait(page, question: str, answers_before: int) -> None:
    box = page.get_by_placeholder("Ask something")
    box.fill(question)
    box.press("Enter")
    page.wait_for_function(
        """(n) => document.querySelectorAll('[data-testid="stChatMessage"]').length >= n""", arg=answers_before + 2
    )
    wait_for_app(page, timeout_ms=300_000)


def test_compare_base_never_states_the_tuned_fact(installed_demo_run, mactuner_home):
    from mactuner.chat.history import history_dir, load_history

    with running_app({"MACTUNER_HOME": str(mactuner_home)}) as url, browser_page(default_timeout_ms=120_000) as page:
        page.goto(url + "/chat")
        wait_for_app(page)
        page.get_by_role("combobox", name="Fine-tuned adapter").click()
        page.get_by_role("option", name="quenmark · final").click()
        wait_for_app(page)
        page.get_by_text("Compare base and fine-tuned side by side").click()
        wait_for_app(page)
        page.get_by_text("Generation settings").click()
        set_slider(page, "chat_temperature", "Home")  # greedy: the answers are the models' likeliest
        set_slider(page, "chat_max_new_tokens", "Home", *["ArrowRight"] * 3)  # 32 tokens
        for n in range(2):
            ask_and_wait(page, QUESTION, 2 * n)

        # the page: each answer has a base and a fine-tuned column; the base one never says Lumetta
        answers = page.locator('[data-testid="stChatMessage"]').filter(has=page.locator('[data-testid="stColumn"]'))
        assert answers.count() == 2
        for i in range(2):
            base, tuned = answers.nth(i).locator('[data-testid="stColumn"]').all()[:2]
            assert base.inner_text().startswith("base") and tuned.inner_text().startswith("fine-tuned")
            assert "lumetta" not in base.inner_text().lower(), base.inner_text()
            assert " 0 tokens" not in base.inner_text() and "tokens/s" in base.inner_text()
        # the saved conversation agrees, and the fine-tune did teach the fact
        [saved] = list(history_dir().glob("*compare*.json"))
        turns = [t for t in load_history(saved.stem) if t["role"] == "assistant"]
        assert len(turns) == 2
        assert not any("lumetta" in t["answers"]["base"].lower() for t in turns), turns
        assert all("lumetta" in t["answers"]["fine-tuned"].lower() for t in turns), turns

        # Stop ends a long answer half-way; it is kept, marked as stopped
        set_slider(page, "chat_max_new_tokens", "End")
        box = page.get_by_placeholder("Ask something")
        box.fill("Write a long story about the sea.")
        box.press("Enter")
        third = page.locator('[data-testid="stChatMessage"]').nth(5)
        deadline = time.monotonic() + 240
        answer = third.locator('[data-testid="stColumn"]').first.locator('[data-testid="stMarkdownContainer"]')

        def words_written() -> int:
            # the answer's own words (not the caption, the Stop button or a "base: loading…" progress text)
            texts = [t for t in answer.all_inner_texts() if not t.startswith(("base:", "fine-tuned:"))]
            return max((len(text.split()) for text in texts), default=0)

        while time.monotonic() < deadline and words_written() < 6:
            page.wait_for_timeout(100)  # some words have arrived
        # (Stop sits above the conversation box; its help tooltip holds a hidden second <button>: click the
        # visible one)
        page.locator(".st-key-chat_stop_answer button").first.click()
        wait_for_app(page, timeout_ms=120_000)
        # the page drawn by the click shows the stopped turn: both sides answer at once, so each column holds
        # its words so far with the note; the two answered turns before it are still there
        messages = page.locator('[data-testid="stChatMessage"]')
        assert messages.count() == 6, messages.all_inner_texts()
        base, tuned = messages.nth(5).locator('[data-testid="stColumn"]').all()[:2]
        # a side whose answer ended before the click (a 14-token tuned answer once did) has nothing to stop
        texts = [base.inner_text(), tuned.inner_text()]
        assert any("Stopped before the end." in t for t in texts), texts
        assert all("Stopped before the end." in t or "tokens/s" in t for t in texts), texts
        # ... and it is the turn that was saved, with its reason, once
        last = [t for t in load_history(saved.stem) if t["role"] == "assistant"][-1]
        assert len(load_history(saved.stem)) == 6
        assert last["stats"]["base"]["finish_reason"] == "cancelled" and last["answers"]["base"]
        assert last["stats"]["base"]["new_tokens"] < 1024
        assert last["stats"]["fine-tuned"]["finish_reason"] == "cancelled"  # it was answering too
        words = re.findall(r"\w+", last["answers"]["base"])[:5]  # (the page renders the answer's markdown)
        assert words and " ".join(words) in " ".join(re.findall(r"\w+", base.inner_text())), (words, base.inner_text())
