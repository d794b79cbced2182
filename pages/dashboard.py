"""Dashboard: the devices as cards, live memory over time, clear cache, health."""

import time

import pandas as pd
import streamlit as st

from mactuner.devices import DeviceInfo, dtype_name, format_bytes, get_optimal_dtype
from mactuner.devices.monitor import DeviceSample, memory_figure
from mactuner.display import health_rows, plural, table_for_people
from mactuner.runs import sync_monitor
from ui.common import device_manager, device_or_stop, ensure_frame, memory_monitor

ensure_frame()  # opened by its URL on a fresh server: run inside app.py's frame

CHART_WINDOW_S = 600  # the chart shows the last ten minutes
CARDS_PER_ROW = 3
REFRESH_S = 2.0  # cards and chart redraw this often (each redraw costs the server CPU per open tab)
ICONS = {"cpu": ":material/memory:", "cuda": ":material/developer_board:", "mps": ":material/laptop_mac:"}

st.title("Dashboard")
manager, monitor = device_manager(), memory_monitor()
device = device_or_stop()
st.caption(
    f"This session computes on **{device}** in **{dtype_name(get_optimal_dtype(device))}**. "
    "Choose another device in the sidebar."
)


def device_card(info: DeviceInfo, sample: DeviceSample | None, selected: bool) -> None:
    """One bordered card: type, name, memory total/used/free, capability, status."""
    with st.container(border=True):
        badge = " · :green-badge[selected]" if selected else ""
        st.markdown(f"**{ICONS.get(info.type, '')} {info.type.upper()}** `{info.key}`{badge}")
        st.markdown(info.name)
        if not info.is_available:
            st.error(f"Unavailable: {info.reason}")
            return
        total = sample.total if sample else info.memory_total
        left, middle, right = st.columns(3)
        left.metric("Total", format_bytes(total))
        middle.metric("Used", format_bytes(sample.used if sample else None))
        right.metric("Free", format_bytes(sample.available if sample else None))
        facts = [f"this app: {format_bytes(sample.allocated if sample else None)}"]
        if info.compute_capability:
            facts.append(f"compute capability {info.compute_capability}")
        if info.type == "cpu":
            facts.append(f"{info.details.get('logical_cores')} threads")
        facts.append(f"dtype {dtype_name(get_optimal_dtype(info.key))}")
        st.caption(" · ".join(facts))


@st.fragment(run_every=REFRESH_S)
def live_memory() -> None:
    """Cards and chart, redrawn every REFRESH_S from the monitor's history (no new readings here)."""
    sync_monitor(monitor)  # training runs started before an app restart show up here too
    devices = manager.get_available_devices()
    for row in range(0, len(devices), CARDS_PER_ROW):  # an 8-GPU server gets rows, not slivers
        for column, info in zip(st.columns(CARDS_PER_ROW if len(devices) > 1 else 1), devices[row : row + CARDS_PER_ROW]):
            with column:
                device_card(info, monitor.latest(info.key), info.key == str(device))
    history = monitor.history(str(device), since=time.time() - CHART_WINDOW_S)
    processes = {pid: rows for pid, rows in monitor.process_history().items() if rows[-1].time > time.time() - CHART_WINDOW_S}
    st.plotly_chart(memory_figure(history, processes, title=f"Memory of {device} over time"), key="memory_chart")
    st.caption(f"{plural(len(history), 'sample')}, one every {monitor.interval:g} s")
    if monitor.last_error:
        st.warning(f"The memory monitor could not read everything: {monitor.last_error}")


live_memory()

st.subheader("Cache")
if st.button("Clear cache", key="clear_cache", help="Garbage-collect and give cached memory back to the system"):
    try:
        result = manager.clear_cache(device)
    except Exception as exc:  # noqa: BLE001 - show any failure in plain words instead of a traceback
        st.error(f"Could not clear the cache on {device}: {exc}")
    else:
        st.success(result.message)

st.subheader("Health")
# the quick report touches no GPU; the device test runs a timed matrix product on each device
if st.button("Test each device", key="health_test", help="A small timed matrix product per device finds broken ones"):
    with st.spinner("Testing each device with a small matrix product…"):
        st.session_state["health_report"] = manager.health(probe=True)
report = st.session_state.get("health_report") or manager.health(probe=False)
if not report["tested"]:
    st.info("Devices not tested yet: press **Test each device** to run a timed matrix product on each.")
elif report["status"] == "ok":
    st.success("All devices passed their test.")
else:
    st.error("A device failed its test: see the advice below.")
if report["tested"]:
    st.dataframe(pd.DataFrame(table_for_people(health_rows(report["devices"]))), hide_index=True, key="health_table")
    st.caption("The test times a small matrix product (the core of every model) on each device, in float32 and "
               "in the number type MacTuner uses there; fewer milliseconds is faster.")
for advice in report["advice"]:
    st.warning(advice)
with st.expander("Troubleshooting"):
    for tip in report["tips"]:
        st.markdown(f"- {tip}")
with st.expander("Versions, backends and environment"):
    st.json({key: report[key] for key in ("versions", "backends", "environment")}, expanded=True)
