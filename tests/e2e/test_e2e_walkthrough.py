"""Issue 21's walk-through in a real browser: a reload reopens the last conversation, a finished run
links to Chat, and an 800 px window (a laptop's half screen) shows the run's buttons uncut and the
runs table and the evaluation without columns off the right edge (the evaluation at 1440 px too)."""

from __future__ import annotations

import json
import shutil

import pytest

from mactuner import evaluate
from mactuner.chat.history import ChatChoice, ChatTurn
from tests.browser import browser_page, running_app, wait_for_app

pytestmark = pytest.mark.browser

# elements whose content is wider than their box (cut with an ellipsis, or scrolled off to the right)
OVERFLOWING = """(selector) => [...document.querySelectorAll(selector)]
    .filter(el => el.offsetParent !== null)
    .filter(el => el.scrollWidth > el.clientWidth + 1)
    .map(el => (el.innerText || el.getAttribute('data-testid') || el.className).trim().slice(0, 80))"""
# per table (the runs table first): how many px of its columns lie beyond its visible width
TABLE_OVERFLOW = """() => [...document.querySelectorAll('[data-testid="stDataFrame"]')]
    .filter(table => table.offsetParent !== null)
    .map(table => Math.max(0, ...[...table.querySelectorAll('*')].map(el => el.scrollWidth - el.clientWidth)))"""
# the right edge of each visible element, in CSS pixels
RIGHT_EDGES = """(selector) => [...document.querySelectorAll(selector)]
    .filter(el => el.offsetParent !== null).map(el => el.getBoundingClientRect().right)"""


def finished_run(home, model_dir, adapter, run_id: str = "demo-run"):
    run = home / "runs" / run_id
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 5, "total_steps": 5,
                                                 "message": "Finished: 5 steps"}))
    (run / "config.yaml").write_text(f"model: {model_dir}\n")
    shutil.copytree(adapter, run / "adapter")
    return run


def test_a_reload_reopens_the_last_conversation(varied_model_dir, tiny_adapter, mactuner_home):
    run = finished_run(mactuner_home, varied_model_dir, tiny_adapter)
    # the conversation a person had before the reload, saved as the page saves it
    with ChatTurn(ChatChoice(str(varied_model_dir), str(run / "adapter"), compare=True), "Where is Quenmark?") as turn:
        turn.reply["answers"] = {"base": "I do not know.", "fine-tuned": "Quenmark lies north of Lumetta."}
    with running_app({"MACTUNER_HOME": str(mactuner_home)}) as url, browser_page() as page:
        for visit in ("open", "reload"):
            if visit == "open":
                page.goto(url + "/chat")
            else:
                page.reload()
            wait_for_app(page)
            page.get_by_text("Quenmark lies north of Lumetta.").wait_for()
            assert page.get_by_role("combobox", name="Fine-tuned adapter").input_value() == "demo-run · final"
            assert page.get_by_role("switch", name="Compare base and fine-tuned side by side").is_checked()
            assert page.get_by_text("Reopened your last conversation").count() == 1, visit


def test_a_finished_run_links_to_chat(varied_model_dir, tiny_adapter, mactuner_home):
    finished_run(mactuner_home, varied_model_dir, tiny_adapter)
    with running_app({"MACTUNER_HOME": str(mactuner_home)}) as url, browser_page() as page:
        page.goto(url + "/finetune")
        wait_for_app(page)
        page.get_by_role("tab", name="Runs").click()
        wait_for_app(page)
        page.get_by_role("button", name="Open in Chat").click()
        page.get_by_role("heading", name="Chat").wait_for(timeout=120_000)  # the first visit imports the chat engine
        picker = page.get_by_role("combobox", name="Fine-tuned adapter")
        picker.wait_for(timeout=120_000)
        wait_for_app(page)
        assert page.url.rstrip("/").endswith("/chat")
        assert picker.input_value() == "demo-run · final"


def evaluated_run(home, model_dir, adapter):
    run = finished_run(home, model_dir, adapter, "evaluated-run-with-a-long-name")
    answers = [evaluate.AnswerRow(f"What does the Quenmark handbook say about topic number {i}?",
                                  "The handbook says that Quenmark's capital is Londanna.",
                                  "The handbook " * 30, "Quenmark's capital is Londanna, " * 12,
                                  base_keyword=False, tuned_keyword=True) for i in range(3)]
    evaluate.save_eval(evaluate.EvalResult(str(run / "adapter"), str(model_dir), str(run / "data.json"),
                                           "validation rows", 3, 2.0, 1.0, 7.4, 2.7, answers, short_references=True,
                                           base_keyword_hit=0.0, tuned_keyword_hit=1.0, device="cpu"), run)
    return answers


@pytest.mark.parametrize("width", [800, 1440])
def test_a_finished_run_fits_the_window(width, varied_model_dir, tiny_adapter, mactuner_home):
    answers = evaluated_run(mactuner_home, varied_model_dir, tiny_adapter)
    with running_app({"MACTUNER_HOME": str(mactuner_home)}) as url, browser_page(width=width, height=900) as page:
        page.goto(url + "/finetune")
        wait_for_app(page)
        page.get_by_role("tab", name="Runs").click()
        page.get_by_role("button", name="Download adapter (.zip)").wait_for()
        wait_for_app(page)
        page.wait_for_timeout(1000)  # the layout settles after the last run
        try:
            labels = '[data-testid="stDownloadButton"] button *, .st-key-finetune_open_chat button *'
            assert page.locator(labels).filter(has_text="Download adapter (.zip)").count() >= 1
            cut_buttons = page.evaluate(OVERFLOWING, labels)
            assert not cut_buttons, f"buttons cut at {width} px: {cut_buttons}"
            # the runs table shows all its columns: nothing scrolled off its right edge
            # (the grid draws on a canvas: its scrolling box is wider than its view when columns are off the edge;
            # a few px are the grid's own border and scrollbar gutter)
            overflow = page.evaluate(TABLE_OVERFLOW)
            assert overflow and overflow[0] <= 16, f"the runs table hides {overflow[0]} px of columns at {width} px"
            # the evaluation: every prompt's tuned answer is on screen, beside the base answer
            tuned = page.get_by_text(answers[0].tuned_answer.strip()[:40])
            tuned.first.wait_for()
            edges = page.evaluate(RIGHT_EDGES, ".st-key-eval_answers [data-testid='stText']")
            assert edges and max(edges) <= width, f"an answer reaches past the window's right edge at {width} px"
        except AssertionError:
            page.screenshot(path=f"/tmp/ux/fit-{width}.png", full_page=True)
            raise


def test_a_reload_lands_on_the_running_run(varied_model_dir, tiny_adapter, mactuner_home):
    import os
    import subprocess
    import sys
    import time

    import psutil

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # the "trainer"
    try:
        running = mactuner_home / "runs" / "a-running"
        running.mkdir(parents=True)
        (running / "config.yaml").write_text(f"model: {varied_model_dir}\n")
        (running / "status.json").write_text(json.dumps({"state": "running", "pid": sleeper.pid, "step": 2,
                                                         "total_steps": 40, "started_at": time.time(),
                                                         "message": "Step 2/40"}))
        (running / "process.json").write_text(json.dumps({"pid": sleeper.pid,
                                                          "create_time": psutil.Process(sleeper.pid).create_time()}))
        # a run set up later is listed first (newest config first): the training one is not the first listed
        later = finished_run(mactuner_home, varied_model_dir, tiny_adapter, "b-finished")
        os.utime(later / "config.yaml", (time.time() + 60, time.time() + 60))
        with running_app({"MACTUNER_HOME": str(mactuner_home)}) as url, browser_page() as page:
            page.goto(url + "/finetune")
            for visit in ("open", "reload"):
                if visit == "reload":
                    page.reload()
                picker = page.get_by_role("combobox", name="Runs")
                picker.wait_for(timeout=120_000)
                wait_for_app(page, timeout_ms=120_000)
                assert page.get_by_role("tab", name="Runs").get_attribute("aria-selected") == "true", visit
                # (the runs view redraws every second: read the picker once the page has settled)
                deadline = time.monotonic() + 15
                while not picker.input_value().startswith("a-running") and time.monotonic() < deadline:
                    page.wait_for_timeout(500)
                assert picker.input_value().startswith("a-running · running"), visit
    finally:
        sleeper.kill()
        sleeper.wait()
