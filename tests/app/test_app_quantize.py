"""The quantize page in AppTest: refused methods shown with reasons, merge an adapter from a run,
quantize and compare with a table and a chart, a saved report shown again, a bad model as an error."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from tests.app_pages import open_app_page

TEXT = "The Nile is a major north-flowing river in northeastern Africa. It flows into the Mediterranean Sea."


def open_page() -> AppTest:
    return open_app_page("pages/quantize.py")


def make_run(home: Path, model: Path, adapter: Path) -> None:
    import shutil

    run = home / "runs" / "demo-run"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 5, "total_steps": 5}))
    (run / "config.yaml").write_text(f"model: {model}\n")
    shutil.copytree(adapter, run / "adapter")


def test_page_lists_methods_and_refusals():
    at = open_page()
    assert at.title[0].value == "Quantize and export"
    assert at.multiselect(key="quant_methods").value == ["int8-dynamic", "int8-weight-only", "int4-weight-only"]
    assert any("bnb-4bit" in c.value and "CUDA" in c.value for c in at.caption)
    assert at.info  # nothing measured yet


def test_merge_then_quantize_and_compare(varied_model_dir, tiny_adapter, mactuner_home):
    make_run(mactuner_home, varied_model_dir, tiny_adapter)
    at = open_page()
    at.selectbox(key="quant_adapter").set_value("demo-run · final").run()
    at.button(key="quant_merge").click().run()
    assert not at.exception, at.exception
    assert any("Merged model saved" in s.value for s in at.success)
    assert (mactuner_home / "exports" / "demo-run-adapter-merged" / "model.safetensors").exists()

    at.multiselect(key="quant_methods").set_value(["int8-weight-only"])
    at.text_area(key="quant_text").input(TEXT)
    at.button(key="quant_run").click().run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert table["variant"].tolist() == ["merged", "int8-weight-only"]
    assert table["size (MB)"].iloc[1] < table["size (MB)"].iloc[0]
    assert at.get("plotly_chart")

    # a new session shows the saved report
    again = open_page()
    assert again.dataframe[0].value["variant"].tolist() == ["merged", "int8-weight-only"]


def test_bad_model_is_an_error(tmp_path):
    at = open_page()
    at.text_input(key="quant_model").input(str(tmp_path / "missing-model"))
    at.multiselect(key="quant_methods").set_value(["int8-dynamic"])
    at.button(key="quant_run").click().run()
    assert at.error and "missing-model" in at.error[0].value
