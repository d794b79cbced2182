"""What every page shares: the cached device manager and memory monitor, the
sidebar device picker, and the selected device from ``st.session_state``.
Not a page itself (``app.py`` does not list it).

The manager and the monitor are started once per app process
(``st.cache_resource``); each browser session keeps its own choice of device
under ``st.session_state["device"]``, so two tabs may compute on different devices.
"""

from __future__ import annotations

import contextlib
import logging
import runpy
import sys
import threading
from pathlib import Path

import streamlit as st
import torch

from mactuner.devices import DeviceManager, DeviceUnavailableError, resolve_device
from mactuner.devices.monitor import MemoryMonitor
from mactuner.settings import load_settings, remember_device

DEVICE_KEY = "device"  # st.session_state key holding the chosen device, e.g. "cpu", "cuda:0"
MONITOR_INTERVAL = 1.0  # seconds between memory samples; ~0.05 % of one core (bench/monitor_overhead.py)


APP_SCRIPT = Path(__file__).resolve().parents[1] / "app.py"
_frame = threading.local()  # each browser session's script runs in a thread of its own


@contextlib.contextmanager
def frame():
    """``app.py`` runs the chosen page inside this: the page then knows it has the frame (sidebar, device picker)."""
    _frame.active = True
    try:
        yield
    finally:
        _frame.active = False


def ensure_frame() -> None:
    """Make sure this page runs inside ``app.py``'s frame; pages call it first.

    Until ``st.navigation`` has been called once in the server process, Streamlit follows the old
    ``pages/`` folder convention: the first request of a fresh server that opens a page by its URL
    (``/quantize``) runs ``pages/quantize.py`` alone, without the frame. Then this runs ``app.py``,
    whose ``st.navigation`` (public API) switches Streamlit to the frame for good and runs the page
    the URL names inside it, and stops the frameless run.
    """
    if getattr(_frame, "active", False):
        return
    runpy.run_path(str(APP_SCRIPT), run_name="__main__")
    st.stop()


def device_manager() -> DeviceManager:
    """The app-wide :class:`DeviceManager`; detection is logged at start-up, as the original did."""
    return _device_manager()


def memory_monitor() -> MemoryMonitor:
    """The app-wide :class:`MemoryMonitor`, already sampling."""
    return _memory_monitor()


@st.cache_resource(show_spinner="Detecting devices…")
def _device_manager() -> DeviceManager:
    logger = logging.getLogger("mactuner")
    if not logger.handlers:  # streamlit configures only its own loggers
        handler = logging.StreamHandler(sys.__stderr__)  # the real stderr, not a test capture that closes
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    manager = DeviceManager()
    manager.detect_devices()
    manager.auto_select_device()
    return manager


@st.cache_resource(show_spinner=False, on_release=MemoryMonitor.stop)
def _memory_monitor() -> MemoryMonitor:
    return MemoryMonitor(_device_manager(), interval=MONITOR_INTERVAL).start()


def available_devices() -> list[str]:
    """Keys of the devices this machine can use, best first (``["mps", "cpu"]``, ``["cuda:0", "cuda:1", "cpu"]``)."""
    return [info.key for info in device_manager().get_available_devices() if info.is_available]


def default_device(options: list[str]) -> str:
    """A new session's device: the remembered default if it is still there, else the auto-selected one."""
    remembered = load_settings().default_device
    if remembered in options:
        return remembered
    current = str(device_manager().get_current_device())
    return current if current in options else options[-1]


def selected_device() -> torch.device:
    """The device this browser session picked in the sidebar (probed).

    Raises:
        RuntimeError: the device stopped working; pages show the message with ``st.error``.
    """
    if not st.session_state.get(DEVICE_KEY):
        st.session_state[DEVICE_KEY] = default_device(available_devices())
    return resolve_device(st.session_state[DEVICE_KEY])


def device_or_stop() -> torch.device:
    """:func:`selected_device` for a page: a device that stopped working ends the page with the reason."""
    try:
        return selected_device()
    except RuntimeError as exc:
        st.error(f"{exc} Pick another device in the sidebar.")
        st.stop()


def _device_label(key: str) -> str:
    return next(i for i in device_manager().get_available_devices() if i.key == key).label  # fixed: see DeviceInfo.label


def _remember_choice() -> None:
    # the last choice becomes the default for new sessions and for `python -m mactuner` commands
    remember_device(st.session_state[DEVICE_KEY])


def device_picker() -> None:
    """Sidebar picker storing the choice in ``st.session_state[DEVICE_KEY]``; its explicit key keeps it across pages."""
    options = available_devices()
    if st.session_state.get(DEVICE_KEY) not in options:
        st.session_state[DEVICE_KEY] = default_device(options)
    st.selectbox(
        "Compute device",
        options,
        key=DEVICE_KEY,
        format_func=_device_label,
        on_change=_remember_choice,
        help="Every page computes on this device. Your choice is remembered for new sessions.",
    )
    if caption := memory_monitor().free_memory_text(options):
        st.caption(caption)
    try:
        selected_device()
    except (DeviceUnavailableError, RuntimeError) as exc:
        st.error(f"{exc} Pick another device.")
