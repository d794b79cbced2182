"""The dashboard in a real browser: Debian chromium drives `streamlit run app.py`."""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.browser import browser_page, running_app, wait_for_app

pytestmark = pytest.mark.browser

from tests.locations import ROOT  # noqa: E402

# url paths of every page app.py registers (pages are added as their issues land);
# the default page is served at "/" whatever its url_path says
URL_PATHS = [
    match.group(1)
    for line in (ROOT / "app.py").read_text().splitlines()
    if "default=True" not in line and (match := re.search(r'url_path="([^"]+)"', line))
]
PICKER = '[data-testid="stSidebar"] [data-testid="stSelectbox"]'


def chart_points(page) -> int:
    """Points in the memory chart's first series, read from plotly's own data."""
    return page.evaluate(
        """() => {
            const plot = document.querySelector('.js-plotly-plot');
            // _fullData holds the decoded arrays (data keeps the compact binary spec)
            return plot && plot._fullData && plot._fullData.length ? plot._fullData[0].x.length : 0;
        }"""
    )


def wait_for(condition, timeout=30.0, step=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return condition()


def test_dashboard_live_memory_pages_by_url_and_clear_cache():
    with running_app() as url, browser_page() as page:
        page.goto(url + "/dashboard")
        page.locator(PICKER).wait_for()  # the frame (app.py) is there, not the bare page
        wait_for_app(page)
        page.get_by_role("heading", name="Dashboard").wait_for()
        card = page.locator('[data-testid="stVerticalBlockBorderWrapper"], [data-testid="stVerticalBlock"]').filter(
            has_text=re.compile(r"CPU")
        )
        card.first.wait_for()
        page.get_by_text("selected", exact=True).first.wait_for()
        page.get_by_text("Total", exact=True).first.wait_for()

        # the live chart gains points without any interaction
        page.locator(".js-plotly-plot").first.wait_for()
        first = wait_for(lambda: chart_points(page))
        assert first >= 1
        later = wait_for(lambda: chart_points(page) >= first + 2 and chart_points(page), timeout=20)
        assert later >= first + 2, f"the chart did not grow: {first} -> {later} points"

        # clear the cache and see what it freed
        page.get_by_role("button", name="Clear cache").click()
        freed = page.get_by_text(re.compile(r"Freed [\d.]+ [KMG]?B on cpu"))
        freed.wait_for()
        assert page.locator('[data-testid="stException"]').count() == 0

        if os.environ.get("MACTUNER_SCREENSHOT"):
            page.set_viewport_size({"width": 1400, "height": 1050})
            page.mouse.move(5, 5)  # no tooltip in the picture
            page.wait_for_timeout(2500)  # a few more points on the chart
            page.screenshot(path=os.environ["MACTUNER_SCREENSHOT"])

        # every registered page opens by its URL, inside the frame (a fresh tab, a query string)
        for url_path in ["", *URL_PATHS, "dashboard?from=e2e"]:
            tab = page.context.new_page()
            tab.goto(f"{url}/{url_path}")
            tab.locator(PICKER).wait_for()
            wait_for_app(tab)
            assert tab.locator('[data-testid="stException"]').count() == 0, url_path
            assert "Page not found" not in tab.content(), url_path
            tab.close()
