"""``DeviceManager``: the original design's operations behind one object the app caches.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from mactuner.devices.dtype import get_optimal_dtype
from mactuner.devices.health import health
from mactuner.devices.memory import GB, CacheClearResult, MemorySnapshot, clear_cache, memory_snapshot
from mactuner.devices.probe import (
    DEFAULT_PRIORITY,
    DEVICE_TYPES,
    DeviceInfo,
    DeviceUnavailableError,
    auto_device,
    check_device,
    detect_devices,
    parse_device,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- #
# the manager
# --------------------------------------------------------------------------- #


class DeviceManager:
    """Detects devices and serves the selected one (the original design's core).

    One instance is shared by the whole app (``st.cache_resource``), so its own
    "current device" is only the default for callers that pass none; the app
    keeps each browser session's choice in ``st.session_state`` and passes it
    explicitly. Methods are thread-safe.

    Args:
        priority: device types in auto-select order (default MPS > CUDA > CPU).
    """

    def __init__(self, priority: tuple[str, ...] | list[str] = DEFAULT_PRIORITY):
        unknown = [kind for kind in priority if kind not in DEVICE_TYPES]
        if unknown:
            raise ValueError(f"priority may hold only {', '.join(DEVICE_TYPES)}, got {unknown}")
        self.priority = tuple(priority)
        self._lock = threading.RLock()
        self._devices: list[DeviceInfo] | None = None
        self._current: torch.device | None = None

    # -- detection --------------------------------------------------------- #

    def detect_devices(self) -> list[DeviceInfo]:
        """Detect every device again and log what was found, as the original did."""
        log.info("Detecting system devices...")
        devices = detect_devices()
        for info in devices:
            if not info.is_available:
                log.info("%s found but unavailable: %s", info.name, info.reason)
            elif info.type == "mps":
                log.info("MPS (Mac GPU) detected")
            elif info.type == "cuda":
                log.info("CUDA GPU detected: %s (%.1fGB)", info.name, (info.memory_total or 0) / GB)
            else:
                log.info("CPU detected: %s, %.1fGB RAM", info.name, (info.memory_total or 0) / GB)
        log.info("%d devices detected", len(devices))
        with self._lock:
            self._devices = devices
        return devices

    def get_available_devices(self) -> list[DeviceInfo]:
        """Detected devices (detecting on first use); unavailable ones carry their ``reason``."""
        with self._lock:
            if self._devices is None:
                self.detect_devices()
            return list(self._devices)

    def get_device_info(self, device: str | torch.device | None = None) -> DeviceInfo:
        """The :class:`DeviceInfo` of ``device`` (default: the current one)."""
        key = str(self._target(device))
        for info in self.get_available_devices():
            if info.key == key:
                return info
        raise DeviceUnavailableError(f"{key} was not detected. Detected: {', '.join(i.key for i in self._devices)}.")

    # -- selection --------------------------------------------------------- #

    def select_device(self, device_type: str | torch.device) -> torch.device:
        """Probe and select ``"cpu"``, ``"mps"``, ``"cuda"`` or ``"cuda:N"``.

        Raises:
            DeviceUnavailableError: the device is unknown, absent or broken.
        """
        device = check_device(device_type)
        with self._lock:
            self._current = device
        log.info("Device selected: %s", device)
        return device

    def auto_select_device(self, priority: tuple[str, ...] | list[str] | None = None) -> torch.device:
        """Select the best device by ``priority`` (default: this manager's, MPS > CUDA > CPU)."""
        log.info("Auto-selecting the best device...")
        device = auto_device(priority or self.priority)
        with self._lock:
            self._current = device
        log.info("Device selected: %s", device)
        return device

    def get_current_device(self) -> torch.device:
        """The selected device; auto-selected on first use."""
        with self._lock:
            if self._current is None:
                return self.auto_select_device()
            return self._current

    def _target(self, device: str | torch.device | None) -> torch.device:
        return self.get_current_device() if device is None else parse_device(device)

    # -- moving and dtypes ------------------------------------------------- #

    def move_model_to_device(self, model: torch.nn.Module, device: str | torch.device | None = None):
        """Move ``model`` to ``device`` (default: the current one); returns the model."""
        return model.to(self._target(device))

    def move_tensor_to_device(self, tensor: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
        """Move ``tensor`` to ``device`` (default: the current one)."""
        return tensor.to(self._target(device))

    def get_optimal_dtype(self, device: str | torch.device | None = None) -> torch.dtype:
        """See :func:`get_optimal_dtype`."""
        return get_optimal_dtype(self._target(device))

    # -- memory ------------------------------------------------------------ #

    def get_device_memory_info(self, device: str | torch.device | None = None, *, init: bool = True) -> MemorySnapshot:
        """A typed memory snapshot (bytes) of ``device`` (default: the current one)."""
        return memory_snapshot(self._target(device), init=init)

    def clear_cache(self, device: str | torch.device | None = None) -> CacheClearResult:
        """Garbage-collect and empty ``device``'s cache; see :func:`clear_cache`."""
        return clear_cache(self._target(device))

    def health(self, *, probe: bool = True) -> dict[str, Any]:
        """See :func:`health`."""
        return health(self.get_available_devices(), probe=probe)
