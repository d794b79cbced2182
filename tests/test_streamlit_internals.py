"""Canary: the Streamlit internals that pages/common.py patches still exist.

pages/common.py keeps a page opened by its URL inside the frame (app.py) by patching two
internals of Streamlit 1.67. It imports them lazily and skips the patch where they are gone,
so an upgrade would not crash the app but would silently bring back the bug; this test fails
first. pyproject.toml bounds streamlit for the same reason.
"""

from pages.common import streamlit_internals


def test_the_patched_streamlit_internals_exist():
    missing = [name for name, owner in streamlit_internals().items() if owner is None]
    assert not missing, f"Streamlit no longer has {missing}: revisit pages/common.ensure_frame and the upper bound"


def test_the_script_runner_patch_is_installed():
    runner = streamlit_internals()["script_runner._mpa_v1"]
    assert getattr(runner._mpa_v1, "runs_app_script", False)
