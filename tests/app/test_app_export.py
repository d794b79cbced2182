"""The Quantize page explains itself and exports: each variant's verdict, its own folder, a download and
"Open in Chat" (which loads the variant there); the GGUF Export section saves a file, and Chat answers with
it through llama.cpp beside the torch base model in compare mode."""

from __future__ import annotations

import re

from mactuner.quantize import compare as quantize_compare
from tests.app.test_app_quantize import TEXT, make_run
from tests.app_pages import open_app_page
from tests.features import requires
from ui.export_ui import verdict_badge


def ask(at, question: str, tokens: int = 8):
    at.slider(key="chat_temperature").set_value(0.0)
    at.slider(key="chat_max_new_tokens").set_value(tokens)
    at.chat_input(key="chat_input").set_value(question).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at.session_state["chat_history"][-1]


def test_variant_verdict_folder_download_and_open_in_chat(varied_model_dir, tiny_adapter, mactuner_home):
    make_run(mactuner_home, varied_model_dir, tiny_adapter)
    at = open_app_page("pages/quantize.py")
    at.selectbox(key="quant_adapter").set_value("demo-run · final").run()
    at.multiselect(key="quant_methods").set_value(["int8-dynamic"])
    at.text_area(key="quant_text").input(TEXT)
    at.button(key="quant_run").click().run()
    assert not at.exception, at.exception
    # the verdict shown is the one the library reaches from these measurements, as a text badge (no emoji)
    expected = quantize_compare.report_verdicts(at.session_state["quant_report"])["int8-dynamic"]
    verdict = next(m.value for m in at.markdown if m.value.startswith("**int8-dynamic**"))
    assert verdict == f"**int8-dynamic** {verdict_badge(expected)} {expected.text}" and expected.level in verdict
    assert ("favours" in expected.text) == bool(expected.favoured) and not re.search("[\U0001F000-\U0001FAFF\u2600-\u27BF]", verdict)
    assert any("within 5 % is as good" in c.value and "speed" in c.value for c in at.caption)  # the limits
    # the variant's own folder, relative to MacTuner's home (no absolute path on screen)
    assert any(c.value == "Saved under `$MACTUNER_HOME/exports/demo-run-adapter-variants/int8-dynamic`" for c in at.caption)
    assert len(at.get("download_button")) >= 2  # merged and int8-dynamic zips

    at.button(key="quant_chat_int8-dynamic").click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Chat"
    assert at.selectbox(key="chat_exported").value == "int8-dynamic · demo-run-adapter-variants/int8-dynamic"
    at.switch_page("pages/chat.py")  # AppTest's own page pointer stays on the page it ran first
    at.text_input(key="chat_model").input(str(varied_model_dir))
    reply = ask(at, "Hello there")
    assert reply["answers"]["fine-tuned"] and reply["stats"]["fine-tuned"]["new_tokens"] > 0


@requires("llama_cpp")
def test_export_section_then_chat_compares_torch_base_and_the_gguf(varied_model_dir, tiny_adapter, mactuner_home):
    make_run(mactuner_home, varied_model_dir, tiny_adapter)
    at = open_app_page("pages/quantize.py")
    at.selectbox(key="quant_adapter").set_value("demo-run · final").run()
    at.button(key="export_run").click().run()
    assert not at.exception, at.exception
    path = mactuner_home / "exports" / "gguf" / "demo-run-final-f16.gguf"
    assert path.is_file() and (mactuner_home / "exports" / "gguf" / "demo-run-final-f16.Modelfile").is_file()
    # MacTuner's own folder shown from its home, and the command names the Modelfile the download saves
    assert any("Saved to `$MACTUNER_HOME/exports/gguf/demo-run-final-f16.gguf`" in s.value for s in at.success)
    assert any("cd $MACTUNER_HOME/exports/gguf\nollama create my-model -f demo-run-final-f16.Modelfile" in c.value
               for c in at.code)

    at.button(key="export_open_chat").click().run()
    assert not at.exception, at.exception
    assert at.selectbox(key="chat_exported").value == "GGUF · demo-run-final-f16.gguf"
    at.switch_page("pages/chat.py")
    at.text_input(key="chat_model").input(str(varied_model_dir))
    at.toggle(key="chat_compare").set_value(True)
    reply = ask(at, "Hello there")
    assert set(reply["answers"]) == {"base", "fine-tuned"} and reply["answers"]["fine-tuned"]
    assert reply["stats"]["fine-tuned"]["new_tokens"] == 8 and reply["stats"]["fine-tuned"]["tokens_per_second"]
