"""What every page shares: the cached device manager and memory monitor, and the
selected device from ``st.session_state``. Not a page itself.

STUB SECTION (to be completed by the device-manager work): ``selected_device()``
is final and may be used by every page now.
"""

from __future__ import annotations

import streamlit as st
import torch

from mactuner.devices import resolve_device

DEVICE_KEY = "device"  # st.session_state key holding the chosen device, e.g. "cpu", "cuda:0"


def selected_device() -> torch.device:
    """The device this browser session picked in the sidebar."""
    return resolve_device(st.session_state.get(DEVICE_KEY) or "cpu")


def device_picker() -> None:
    """Sidebar picker that stores the choice in ``st.session_state[DEVICE_KEY]``."""
    st.selectbox("Device", ["cpu"], key=DEVICE_KEY)
