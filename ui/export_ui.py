"""UI-only helpers of the Quantize page: the GGUF Export section and each variant's verdict, folder,
download and "Open in Chat". The work is done by :mod:`mactuner.export` and :mod:`mactuner.quantize`.
Not a page itself."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from mactuner import export, paths
from mactuner.models import DEFAULT_MODEL, ModelSourceError
from mactuner.quantize import compare as quantize_compare

CHAT_OPEN = "chat_open"  # session key: a model path the Chat page selects on its next run
CHAT_OPEN_ADAPTER = "chat_open_adapter"  # session key: a run's adapter the Chat page selects on its next run
ERRORS = (export.ExportError, ModelSourceError, OSError, RuntimeError, ValueError)
OUTTYPE_HELP = {"f16": "f16 — 16-bit, the reference quality", "bf16": "bf16 — 16-bit, bfloat16 weights",
                "q8_0": "q8_0 — 8-bit, half the size; check its answers (llama.cpp garbles the built-in 135M model's)"}


def open_in_chat(path: str | Path) -> None:
    """Select ``path`` (a .gguf, a variant folder or a model folder) on the Chat page and go there."""
    st.session_state[CHAT_OPEN] = str(path)
    st.switch_page("pages/chat.py")


def export_section(model: str, adapter: str) -> None:
    """GGUF export of the chosen adapter (merged first) or base model, with progress, download and commands."""
    st.subheader("Export for llama.cpp, Ollama and LM Studio (GGUF)")
    reason = export.converter_missing_reason()
    if reason:
        st.info(reason)
        return
    base = model if model != DEFAULT_MODEL else None
    label = export.export_label(adapter or None, None, None if adapter else model)
    left, right = st.columns(2)
    outtype = left.radio("Weights", export.OUTTYPES, key="export_outtype", format_func=OUTTYPE_HELP.get)
    out = right.text_input("Save as (a .gguf path; empty: the default below)", key="export_out")
    overwrite = right.checkbox("Overwrite", key="export_overwrite",
                               help="Replace an existing file MacTuner did not write (never done without this).")
    st.caption(f"Default file: `{paths.display_path(export.default_gguf_path(label, outtype))}` — unique per run and step; "
               "an Ollama Modelfile is written beside it.")
    if st.button("Export GGUF", key="export_run", type="primary"):
        bar = st.progress(0.0, text="Starting…")
        try:
            result = export.export_gguf(adapter or None, model=base if adapter else (base or model), outtype=outtype,
                                        out=out.strip() or None, overwrite=overwrite,
                                        progress=lambda m, f: bar.progress(min(f or 0.0, 1.0), text=m))
        except ERRORS as exc:
            st.error(str(exc))
            return
        finally:
            bar.empty()
        st.session_state["export_result"] = result.to_dict()
    done = st.session_state.get("export_result")
    if done and Path(done["path"]).is_file():
        exported_ui(done)


def exported_ui(done: dict) -> None:
    """Where the export was saved, its downloads, how to run it elsewhere, and Open in Chat."""
    path, modelfile = Path(done["path"]), Path(done["modelfile"])
    st.success(f"Saved to `{paths.display_path(path)}` ({done['size_bytes'] / 1e6:.0f} MB, {done['outtype']}, {done['seconds']:.0f} s).")
    cols = st.columns(3)
    cols[0].download_button("Download .gguf", lambda: path.read_bytes(), file_name=path.name,
                            mime="application/octet-stream", on_click="ignore", key="export_download")
    cols[1].download_button("Download Modelfile", lambda: modelfile.read_bytes(), file_name=modelfile.name,
                            mime="text/plain", on_click="ignore", key="export_download_modelfile")
    if cols[2].button("Open in Chat", key="export_open_chat"):
        open_in_chat(path)
    st.code(f"cd {paths.display_path(path.parent)}\nollama create my-model -f {modelfile.name} && ollama run my-model\n"
            f"llama-cli -m {path.name} -cnv    # llama.cpp; LM Studio: lms import {path.name}", language="bash")


# a verdict's level as a text badge (no emoji: they render as empty boxes without an emoji font)
BADGE_COLOURS = {"recommended": "green", "trade-off": "blue", "check its answers": "orange",
                 "not recommended": "red", "no gain": "gray", "failed": "red"}


def verdict_badge(verdict: quantize_compare.Verdict) -> str:
    """Markdown for a verdict's level as a coloured text badge, e.g. ``:green-badge[recommended]``."""
    colour = BADGE_COLOURS.get(verdict.level)
    return f":{colour}-badge[{verdict.level}]" if colour else ""


def verdict_legend(reference: str) -> str:
    """How the verdicts are reached, with the limits the library uses."""
    good, acceptable, worse = (f"{(limit - 1) * 100:.0f} %" for limit, _ in quantize_compare.VERDICT_THRESHOLDS)
    return (f"Verdicts weigh quality (perplexity), speed (tokens/s) and size on disk against **{reference}**, and "
            f"say which the variant favours. Quality: within {good} is as good, within {acceptable} a little "
            f"worse, within {worse} check its answers, beyond that not recommended. Speed counts beyond "
            f"±{(quantize_compare.SPEED_MARGIN - 1) * 100:.0f} %, size beyond ±{(quantize_compare.SIZE_MARGIN - 1) * 100:.0f} %.")


def variants_ui(report: quantize_compare.QuantizeReport) -> None:
    """Each variant: its verdict, its own folder, a zip download and Open in Chat."""
    verdicts = quantize_compare.report_verdicts(report)
    st.caption(verdict_legend(report.variants[0].name))
    if highlights := quantize_compare.report_highlights(report):
        st.caption(highlights[0].upper() + highlights[1:] + ".")
    rows = [v for v in report.variants if v.error is None and v.path]
    for i, variant in enumerate(rows):
        verdict = verdicts[variant.name]
        with st.container(border=True):
            text, download, chat = st.columns([4, 1, 1])
            text.markdown(f"**{variant.name}** {verdict_badge(verdict)} {verdict.text}")
            shown = paths.display_path(variant.path)
            text.caption(f"Saved under `{shown}`" if i or variant.name != "base" else f"The base model itself: `{shown}`")
            if variant.name != "base" and Path(variant.path).is_dir():
                download.download_button("Download (.zip)", lambda p=variant.path: export.folder_zip_bytes(p),
                                         file_name=f"{Path(variant.path).name}.zip", mime="application/zip",
                                         on_click="ignore", key=f"quant_zip_{variant.name}")
            if Path(variant.path).is_dir() and chat.button("Open in Chat", key=f"quant_chat_{variant.name}"):
                open_in_chat(variant.path)



def chat_source_ui() -> str:
    """The Chat page's picker for exported models: a GGUF file (llama.cpp), a merged or quantized variant,
    a full fine-tuning run's model, or any .gguf by path. Returns the chosen path ("" for none)."""
    sources = {s.label: str(s.path) for s in export.chat_sources()}
    other = "A .gguf file by path…"
    opened = st.session_state.pop(CHAT_OPEN, None)
    if opened:  # "Open in Chat" on the Quantize page
        label = next((k for k, v in sources.items() if v == opened), None)
        if label is None:
            st.session_state["chat_gguf_path"] = opened
            label = other
        st.session_state["chat_exported"] = label
    label = st.selectbox("Or an exported / quantized / fully fine-tuned model", ["(none)", *sources, other],
                         key="chat_exported", help="Replaces the adapter above. GGUF files are answered by llama.cpp.")
    if label == other:
        path = st.text_input("Path of a .gguf file", key="chat_gguf_path").strip()
        if path and not path.lower().endswith(".gguf"):
            st.warning("That is not a .gguf file.")
            return ""
        if path.lower().endswith(".gguf"):
            from mactuner.chat.llamacpp import llama_cpp_missing_reason

            if reason := llama_cpp_missing_reason():
                st.warning(reason)
                return ""
        return path
    path = sources.get(label, "")
    if path.lower().endswith(".gguf"):
        from mactuner.chat.llamacpp import llama_cpp_missing_reason

        if reason := llama_cpp_missing_reason():
            st.warning(reason)
            return ""
    return path
