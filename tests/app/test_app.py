"""The app frame and the dashboard, driven by Streamlit's AppTest."""

from __future__ import annotations

import re

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from mactuner.settings import load_settings, remember_device
from tests.locations import ROOT

APP = str(ROOT / "app.py")
# every page app.py registers (others add theirs as their issues land)
PAGES = list(dict.fromkeys(re.findall(r'"(pages/\w+\.py)"', (ROOT / "app.py").read_text())))


@pytest.fixture(autouse=True)
def fresh_resources():
    """Each test detects its own (possibly faked) hardware: drop the cached manager and monitor."""
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()  # stops the monitor thread (on_release)


def start() -> AppTest:
    return AppTest.from_file(APP, default_timeout=120).run()


def markdown(at: AppTest) -> str:
    return "\n".join(str(m.value) for m in at.markdown)


def test_dashboard_shows_the_cpu_card_chart_and_health(cpu_only):
    at = start()
    assert not at.exception
    assert [t.value for t in at.title] == ["Dashboard"]
    assert at.session_state["device"] == "cpu"
    # the picker sits in the sidebar and offers exactly the devices of this (faked CPU-only) machine
    picker = at.sidebar.selectbox(key="device")
    assert picker.value == "cpu" and len(picker.options) == 1 and "GB" in picker.options[0]
    assert "CPU" in markdown(at) and "selected" in markdown(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Total"].endswith("GB") and metrics["Free"].endswith("GB")
    assert at.get("plotly_chart"), "the memory chart is missing"
    assert any("Devices not tested yet" in i.value for i in at.info)
    assert not at.error
    at.button(key="health_test").click().run()
    assert any("All devices passed their test" in s.value for s in at.success)
    probes = at.dataframe[0].value
    assert list(probes["device"]) == ["cpu"] and probes["test"][0] == "passed" and " ms per test product" in probes["float32 speed"][0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="optional: a real GPU would pass the compute test")
def test_a_broken_device_is_reported_in_plain_words(two_cuda_gpus):
    # the faked GPUs answer queries but cannot compute: the device test must say so, not crash
    at = start()
    at.button(key="health_test").click().run()
    assert not at.exception
    assert any("A device failed its test" in e.value for e in at.error)
    assert any("cuda:0 failed its test" in w.value for w in at.warning)


def test_clear_cache_button_reports_what_it_freed(cpu_only):
    at = start()
    at.button(key="clear_cache").click().run()
    assert not at.exception
    assert any(re.match(r"Freed [\d.]+ [KMG]?B on cpu", s.value) for s in at.success)


def test_choosing_a_device_updates_session_state_and_is_remembered(two_cuda_gpus):
    at = start()
    assert not at.exception
    picker = at.selectbox(key="device")
    assert picker.options[0].startswith("NVIDIA RTX 3090 (ID: 0)")
    assert at.session_state["device"] == "cuda:0"  # auto-selected: CUDA before CPU
    assert "NVIDIA T4" in markdown(at) and "compute capability 7.5" in "\n".join(c.value for c in at.caption)
    picker.set_value("cuda:1").run()
    assert not at.exception
    assert at.session_state["device"] == "cuda:1"
    assert any("**cuda:1** in **float16**" in c.value for c in at.caption)
    assert load_settings().default_device == "cuda:1"  # the default for new sessions


def test_new_sessions_start_on_the_remembered_device(two_cuda_gpus):
    remember_device("cuda:1")
    assert start().session_state["device"] == "cuda:1"
    remember_device("cuda:7")  # gone since: fall back to the automatic choice
    assert start().session_state["device"] == "cuda:0"


def test_two_sessions_keep_their_own_device(two_cuda_gpus):
    first, second = start(), start()
    first.selectbox(key="device").set_value("cpu").run()
    second.run()
    assert first.session_state["device"] == "cpu"
    assert second.session_state["device"] == "cuda:0"


def test_the_choice_survives_switching_pages(two_cuda_gpus):
    at = start()
    at.selectbox(key="device").set_value("cpu").run()
    for page in [*PAGES, PAGES[0]]:
        at.switch_page(page).run()
        assert not at.exception, f"{page}: {at.exception}"
        assert at.session_state["device"] == "cpu", page
        assert at.selectbox(key="device").value == "cpu", page
