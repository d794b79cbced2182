"""Model text on a page: shown as Markdown with every image, link and HTML neutralised
(:func:`mactuner.safe_text.safe_markdown`), so showing an answer never makes the browser
fetch an address the model wrote. Not a page itself."""

from __future__ import annotations

from collections.abc import Iterable

import streamlit as st

from mactuner.safe_text import safe_markdown


def show_model_text(text: str) -> None:
    """``text`` (an answer, a quoted document) as safe Markdown."""
    st.markdown(safe_markdown(text))


def stream_model_text(stream: Iterable[str]) -> str:
    """Draw an answer as it arrives, each redraw safe Markdown (``st.write_stream`` would render it raw).

    Every piece is a Streamlit call, so Stop (or any click) interrupts the answer at its next piece,
    as with ``st.write_stream``. Returns the text drawn.
    """
    placeholder = st.empty()
    text = ""
    for piece in stream:
        text += str(piece)
        placeholder.markdown(safe_markdown(text))
    return text
