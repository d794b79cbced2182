"""The fine-tune page in a real browser: Start lands on the new run's live view; the run trains in
the background, its loss chart grows live, it survives a page reload and the
app process being killed, and cancelling it leaves a checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

from mactuner import runs
from tests.browser import browser_page, running_app, wait_for_app

pytestmark = pytest.mark.browser

LOSS_POINTS = ".st-key-finetune_chart_loss .scatterlayer .trace:first-child .points path"


def loss_points(page) -> int:
    return page.locator(LOSS_POINTS).count()


def wait_for_more_points(page, than: int, timeout: float = 60.0) -> int:
    """Wait until the live loss chart shows more than ``than`` points; return how many."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = loss_points(page)
        if count > than:
            return count
        page.wait_for_timeout(500)
    raise AssertionError(f"the loss chart stayed at {loss_points(page)} points (wanted more than {than})")


def selected_run_label(page) -> str:
    """The runs selector's shown value: "RUN-ID · state · step N/M"."""
    return page.get_by_role("combobox", name="Runs").input_value()


def wait_for_state(page, state: str, timeout: float = 60.0) -> str:
    """Wait until the selected run is shown in ``state``; return its label."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the selector is redrawn every second
            label = selected_run_label(page)
            if f"· {state} ·" in label:
                return label
        page.wait_for_timeout(300)
    raise AssertionError(f"the selected run is not shown as {state}")


def kill_app(url: str) -> None:
    """SIGKILL the streamlit server serving ``url``: the app dies without any clean-up."""
    port = urlparse(url).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            server = psutil.Process(conn.pid)
            server.kill()
            # it is the test's child: dead means a zombie until running_app reaps it
            deadline = time.monotonic() + 10
            while server.is_running() and server.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                time.sleep(0.1)
            return
    raise AssertionError(f"no process listens on port {port}")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """One MACTUNER_HOME shared by the test, both app processes and the run; runs left are stopped."""
    home = tmp_path / "home"
    monkeypatch.setenv("MACTUNER_HOME", str(home))
    yield home
    for run in runs.list_runs():
        if run.is_running and run.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGKILL)


def test_run_trains_live_survives_reload_and_app_restart_then_cancels(home, tiny_model_dir):
    env = {"MACTUNER_HOME": str(home)}
    with running_app(env) as url, browser_page() as page:
        page.goto(url + "/finetune")
        wait_for_app(page)
        page.get_by_text("Local folder or .gguf file").click()
        path_box = page.get_by_role("textbox", name="Path")
        path_box.fill(str(tiny_model_dir))
        path_box.press("Enter")
        wait_for_app(page)
        steps_box = page.get_by_role("spinbutton", name="Max steps")
        steps_box.fill("5000")  # far more than the test lets it run: it is cancelled
        steps_box.press("Enter")
        wait_for_app(page)
        page.get_by_role("button", name="Start training").click()
        wait_for_state(page, "running", 30)
        # Start lands on the run: its live view is in the window, without scrolling, and nothing says "no runs"
        live = page.locator('[data-testid="stProgress"]').first.bounding_box()
        assert live is not None and 0 <= live["y"] < page.viewport_size["height"], live
        assert not page.get_by_text("No runs yet").is_visible()

        first = wait_for_more_points(page, 1)
        second = wait_for_more_points(page, first)

        page.reload()
        wait_for_app(page)
        [run] = runs.list_runs()
        assert run.id in selected_run_label(page) and run.is_running
        wait_for_more_points(page, second)

        kill_app(url)

    assert runs.get_run(run.id).is_running, "the run died with the app"
    steps_before = runs.get_run(run.id).step
    with running_app(env) as url, browser_page() as page:
        page.goto(url + "/finetune")
        wait_for_app(page)
        assert run.id in selected_run_label(page)
        shown = wait_for_more_points(page, 0)
        wait_for_more_points(page, shown)
        assert runs.get_run(run.id).step > steps_before

        page.get_by_role("button", name="Cancel (saves a checkpoint)").click()
        wait_for_state(page, "cancelled", 60)
        cancelled = runs.get_run(run.id)
        [checkpoint] = runs.run_checkpoints(run.id)[-1:]
        assert cancelled.state == "cancelled" and checkpoint.step == cancelled.step
        # the page offers it (the checkpoint picker starts at the latest)
        picker = page.get_by_role("combobox", name="Checkpoint")
        picker.wait_for()
        assert picker.input_value() == f"step {checkpoint.step}"
        assert json.loads((Path(cancelled.path) / "status.json").read_text())["state"] == "cancelled"
