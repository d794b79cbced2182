"""Every page in an 800 px wide window (a laptop's half screen): number inputs keep their
+/- buttons and no widget label is cut off ("Gradi…")."""

from __future__ import annotations

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.browser import browser_page, running_app, wait_for_app

pytestmark = pytest.mark.browser

WIDTH, HEIGHT = 800, 900
PAGES = ["dashboard", "finetune", "rag", "chat", "quantize"]

# labels whose text is wider than their box (Streamlit cuts them with an ellipsis)
LABELS = '[data-testid="stWidgetLabel"], [data-testid="stMetricLabel"], [data-testid="stCheckbox"] label'
# (a checkbox's visually hidden <input> is 1 px wide on purpose: inputs and hidden helpers are left out)
CUT_LABELS = """() => [...document.querySelectorAll('LABELS')]
    .filter(label => label.offsetParent !== null)
    .flatMap(label => [label, ...label.querySelectorAll('*')].map(el => [label, el]))
    .filter(([label, el]) => el.tagName !== 'INPUT' && el.clientWidth > 2 && (el.textContent || '').trim())
    .filter(([label, el]) => el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflow !== 'visible')
    .map(([label, el]) => label.innerText.trim())""".replace("LABELS", LABELS)

# number inputs drawn without their step buttons (Streamlit drops them when the box is narrow)
NUMBERS_WITHOUT_STEPS = """() => [...document.querySelectorAll('[data-testid="stNumberInput"]')]
    .filter(box => box.offsetParent !== null)
    .filter(box => !box.querySelector('[data-testid="stNumberInputStepUp"]')
                   || box.querySelector('[data-testid="stNumberInputStepUp"]').offsetParent === null)
    .map(box => (box.closest('[data-testid="stNumberInputContainer"]') || box).innerText.trim()
                 || box.parentElement.innerText.trim())"""


def open_everything(page) -> None:
    """Open the expanders, so the widgets inside them are measured too."""
    for summary in page.locator('[data-testid="stExpander"] summary').all():
        if summary.is_visible():
            summary.click()
    wait_for_app(page)


def test_pages_fit_an_800px_window(tmp_path):
    problems: dict[str, dict] = {}
    numbers_seen = 0
    with running_app({"MACTUNER_HOME": str(tmp_path / "home")}) as url, browser_page(width=WIDTH, height=HEIGHT) as page:
        for name in PAGES:
            page.goto(f"{url}/{name}")
            wait_for_app(page)
            try:
                page.locator("h1").first.wait_for(state="attached")
            except PlaywrightTimeout:
                page.screenshot(path=f"/tmp/ux/fail-{name}.png")
                raise AssertionError(f"{name}: no title") from None
            if name == "finetune":  # the settings appear once the dataset is read and the settings recommended
                page.get_by_text("Estimated peak memory").wait_for(timeout=120_000)
            open_everything(page)
            page.wait_for_timeout(500)  # layout settles after the last run
            numbers_seen += page.locator('[data-testid="stNumberInput"]').count()
            cut, stepless = page.evaluate(CUT_LABELS), page.evaluate(NUMBERS_WITHOUT_STEPS)
            if cut or stepless:
                problems[name] = {"labels cut": cut, "number inputs without +/-": stepless}
    assert numbers_seen >= 8, "the fine-tune settings were not measured"
    assert not problems, problems


def test_a_page_opened_by_its_url_on_a_fresh_server_has_the_frame(tmp_path):
    """The first request of a fresh server opens /quantize: the page runs inside app.py's frame (the
    navigation by title and the device picker), through public Streamlit API only (ui.common.ensure_frame)."""
    with running_app({"MACTUNER_HOME": str(tmp_path / "home")}) as url, browser_page() as page:
        page.goto(f"{url}/quantize")
        wait_for_app(page, timeout_ms=120_000)
        page.get_by_role("heading", name="Quantize and export").wait_for()
        sidebar = page.locator('[data-testid="stSidebar"]')
        sidebar.get_by_text("Compute device").wait_for()
        assert sidebar.get_by_text("Fine-tune", exact=True).is_visible()
        assert sidebar.get_by_text("finetune", exact=True).count() == 0  # not the bare pages/ folder listing
