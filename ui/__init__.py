"""Streamlit helpers the pages share (not pages: the sidebar lists only what app.py registers from pages/)."""
