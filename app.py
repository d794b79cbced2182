"""MacTuner: the picture frame. Navigation and the app-wide device picker; nothing else."""

import streamlit as st

from pages.common import device_picker

st.set_page_config(page_title="MacTuner", page_icon="🛠️", layout="wide")

# one st.Page per page; the dashboard is the default ("/" and "/dashboard")
pg = st.navigation(
    [
        st.Page("pages/dashboard.py", title="Dashboard", icon="📊", url_path="dashboard", default=True),
    ]
)

with st.sidebar:
    device_picker()

pg.run()
