"""UI-only helper of the fine-tune page: "Check fit", the measured preflight
(:mod:`mactuner.training.preflight`) of the chosen settings before Start. Not a page itself."""

from __future__ import annotations

import dataclasses
import json

import streamlit as st

from mactuner.config import TrainConfig
from mactuner.training.preflight import preflight

RESULT = "finetune_preflight"  # (settings as JSON, PreflightResult) of the last check


def check_fit_ui(config: TrainConfig) -> TrainConfig | None:
    """The Check fit button and its measured figures beside the estimate. Returns the settings that fit
    when the check found the chosen ones do not, and the person chose to start with them."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if st.button("Check fit (a few real steps)", key="finetune_check_fit",
                 help="Runs 3 real optimizer steps of these settings on the longest rows, in a separate process: "
                 "measured peak memory against the free memory, seconds per step and the run's ETA."):
        with st.spinner("Measuring 3 steps on the longest rows…"):
            try:
                st.session_state[RESULT] = (key, preflight(config))
            except (RuntimeError, OSError) as exc:
                st.error(str(exc))
                return None
    saved = st.session_state.get(RESULT)
    if not saved or saved[0] != key:
        st.caption("The memory above is an estimate; Check fit measures it.")
        return None
    result = saved[1]
    peak, speed, eta = st.columns(3)
    peak.metric("Peak memory (measured)", f"{result.peak_bytes / 2**30:.2f} GB",
                f"estimate {result.estimate_bytes / 2**30:.2f} GB", delta_color="off")
    speed.metric("Seconds per step (measured)", f"{result.seconds_per_step:.2f}",
                 f"{result.tokens_per_second:.0f} tokens/s", delta_color="off")
    eta.metric("ETA (from the measured speed)", f"{result.eta_seconds / 60:.1f} min",
               f"{result.total_steps} steps", delta_color="off")
    if result.fits is False:
        st.error(result.headline())
        changes = {k: v for k, v in result.suggestion.items() if k != "reason"}
        if changes and st.button(f"Use {result.suggestion['reason']}", key="finetune_apply_fit"):
            return dataclasses.replace(config, **changes)
    else:
        st.success(result.headline())
    return None
