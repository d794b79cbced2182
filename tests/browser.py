"""Shared support for real-browser tests (``tests/test_e2e_*.py``).

``running_app()`` starts ``streamlit run app.py`` on a free local port with its
own ``MACTUNER_HOME`` and yields the base URL; ``browser_page()`` yields a
Playwright page in Debian's chromium (Playwright's own browser download does not
work on this offline machine). Both clean up after themselves.

Use::

    pytestmark = pytest.mark.browser

    def test_something(tmp_path):
        with running_app() as url, browser_page() as page:
            page.goto(url + "/dashboard")
            wait_for_app(page)
            page.get_by_text("CPU").first.wait_for()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.features import require

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MACTUNER_CHROMIUM", "/usr/bin/chromium")
# flags this headless, offline, root-run machine needs; the background-service
# ones keep chromium from trying to reach Google at start-up
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"streamlit exited with code {process.returncode} before serving:\n{log_path.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"streamlit did not answer at {url} within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def running_app(env: dict[str, str] | None = None, *, timeout: float = 90.0) -> Iterator[str]:
    """Run ``streamlit run app.py`` on a free port; yield its base URL (no trailing slash).

    Args:
        env: extra environment variables for the app (they override the defaults).
            ``MACTUNER_HOME`` defaults to a fresh temporary folder, so the app
            never sees the developer's settings or runs.
        timeout: seconds to wait for the server to answer its health check.

    The server's output goes to a log file; if it fails to start, the error
    message includes the log's tail.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="mactuner-e2e-"))
    log_path = workdir / "streamlit.log"
    child_env = dict(os.environ)
    child_env.update(
        {
            "MACTUNER_HOME": str(workdir / "home"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    child_env.update(env or {})
    command = [
        sys.executable, "-m", "streamlit", "run", "app.py",
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
    ]
    with open(log_path, "wb") as log:
        # own process group, so the app and anything it started (training
        # runs) are stopped together at the end
        process = subprocess.Popen(
            command, cwd=ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_healthy(url, process, log_path, timeout)
        yield url
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def browser_page(*, width: int = 1400, height: int = 1000, default_timeout_ms: int = 30_000):
    """Yield a Playwright ``Page`` in headless Debian chromium.

    Skips the test (with the reason) when chromium is not installed; ``make
    browser`` installs it.
    """
    require("browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.set_default_timeout(default_timeout_ms)
            yield page
        finally:
            browser.close()


def wait_for_app(page, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit has finished its current script run on ``page``.

    Streamlit marks the app container ``data-test-script-state="running"``
    while a script runs (``initial`` before the first one); the page is ready
    when the app view is there and no run is in progress.
    """
    page.wait_for_selector('[data-testid="stAppViewContainer"]', timeout=timeout_ms)
    page.wait_for_function(
        """() => {
            const app = document.querySelector('[data-testid="stApp"]');
            const state = app && app.getAttribute('data-test-script-state');
            return state && state !== 'running' && state !== 'initial';
        }""",
        timeout=timeout_ms,
    )
