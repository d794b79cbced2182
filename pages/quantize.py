"""Export: merge an adapter into its base model, quantize, and compare the variants' size, memory, speed and quality."""

import pandas as pd
import streamlit as st

from mactuner import paths, quantize
from mactuner.display import table_for_people
from mactuner.export import merge_adapter
from mactuner.models import DEFAULT_MODEL, ModelSourceError
from mactuner.quantize import compare as quantize_compare
from mactuner.runs.views import list_adapters
from ui.common import device_or_stop, ensure_frame
from ui.export_ui import export_section, variants_ui

ensure_frame()  # opened by its URL on a fresh server: run inside app.py's frame

ERRORS = (ModelSourceError, OSError, RuntimeError, ValueError)


def source_ui() -> tuple[str, str]:
    """Base model, and optionally an adapter to merge first."""
    left, right = st.columns(2)
    model = left.text_input("Base model", DEFAULT_MODEL, key="quant_model",
                            help="The built-in model, a Hugging Face id or a local folder.")
    adapters = {choice.label: str(choice.path) for choice in list_adapters()}
    label = right.selectbox("Fine-tuned adapter to merge first", ["(none)", *adapters], key="quant_adapter")
    return model, adapters.get(label, "")


def methods_ui(device) -> list[str]:
    """The methods to try; the ones this device cannot run are listed with the reason."""
    supported = quantize.supported_methods(device)
    chosen = st.multiselect("Quantization methods", supported, default=supported, key="quant_methods",
                            format_func=lambda m: f"{m} — {quantize.METHODS[m].description}")
    refused = {m: quantize.unsupported_reason(m, device) for m in quantize.METHODS if m not in supported}
    if refused:
        st.caption("Not on this device: " + " · ".join(f"**{m}**: {why}" for m, why in refused.items()))
    return chosen


def text_ui() -> str | None:
    """Held-out text for perplexity: the default slice of wiki_demo.txt, or the person's own."""
    own = st.text_area("Held-out text for perplexity (empty: a slice of wiki_demo.txt)", key="quant_text", height=100)
    return own if own.strip() else None


def show_report(report: quantize_compare.QuantizeReport) -> None:
    st.caption(f"Measured on {report.device}; perplexity over {report.text_tokens} tokens of "
               f"{paths.display_path(report.text_source) if '/' in report.text_source else report.text_source}.")
    st.dataframe(pd.DataFrame(table_for_people(report.table())), hide_index=True, width="stretch")
    for variant in report.variants:
        if variant.error:
            st.warning(f"{variant.name}: {variant.error}")
    st.plotly_chart(quantize_compare.report_figure(report), key="quant_chart")
    variants_ui(report)


st.title("Quantize and export")
device = device_or_stop()
st.caption(f"Quantizing and measuring on **{device}**. Files go to `{paths.display_path(paths.exports_dir())}`.")

model, adapter = source_ui()
merge_col, run_col = st.columns(2)
if merge_col.button("Merge adapter only", key="quant_merge", disabled=not adapter):
    try:
        with st.spinner("Merging…"):
            folder = merge_adapter(adapter, base=model if model != DEFAULT_MODEL else None)
    except ERRORS as exc:
        st.error(str(exc))
        st.stop()
    st.success(f"Merged model saved to `{paths.display_path(folder)}` — loads with plain `AutoModelForCausalLM.from_pretrained`.")

methods = methods_ui(device)
text = text_ui()
if run_col.button("Quantize and compare", key="quant_run", type="primary"):
    bar = st.progress(0.0, text="Starting…")
    try:
        report = quantize_compare.compare_variants(
            model if model != DEFAULT_MODEL or not adapter else None, methods, adapter=adapter or None,
            device=device, text=text, progress=lambda message, f: bar.progress(min(f or 0.0, 1.0), text=message),
        )
    except ERRORS as exc:
        st.error(str(exc))
        st.stop()
    finally:
        bar.empty()
    st.session_state["quant_report"] = report

report = st.session_state.get("quant_report")
if report is None and (saved := quantize_compare.saved_reports()):
    report = quantize_compare.load_report(saved[0])
if report is not None:
    st.subheader("Variants")
    show_report(report)
else:
    st.info("Pick what to quantize and press **Quantize and compare**.")
export_section(model, adapter)
