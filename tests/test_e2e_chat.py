"""The chat page in a real browser with the real model: ask a question and watch the answer
arrive token by token, then see its time to first token and tokens/s."""

from __future__ import annotations

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
