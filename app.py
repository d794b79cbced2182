"""MacTuner: the picture frame. Navigation and the app-wide device picker; nothing else."""

import streamlit as st

from mactuner import quiet_third_party_loggers
from ui.common import device_picker, frame

quiet_third_party_loggers()

st.set_page_config(page_title="MacTuner", page_icon="🛠️", layout="wide")

DASHBOARD = "pages/dashboard.py"

# one st.Page per page, url_path = the file's name (so a page opens by its URL)
pg = st.navigation(
    [
        st.Page(DASHBOARD, title="Dashboard", icon=":material/monitoring:", url_path="home", default=True),
        # the default page is served at "/" only; this hidden twin makes "/dashboard" work too
        st.Page(DASHBOARD, title="Dashboard", url_path="dashboard", visibility="hidden"),
        st.Page("pages/finetune.py", title="Fine-tune", icon=":material/model_training:", url_path="finetune"),
        st.Page("pages/rag.py", title="Ask documents", icon=":material/find_in_page:", url_path="rag"),
        st.Page("pages/chat.py", title="Chat", icon=":material/chat:", url_path="chat"),
        st.Page("pages/quantize.py", title="Quantize", icon=":material/compress:", url_path="quantize"),
    ]
)

with st.sidebar:
    device_picker()

with frame():
    pg.run()
