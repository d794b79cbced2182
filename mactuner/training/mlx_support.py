"""Whether the MLX engine can run here, and how to install it (no import of MLX itself)."""

from __future__ import annotations

import importlib.util

MLX_INSTALL = 'pip install "mlx==0.32.4" "mlx-lm==0.32.2" (on Linux, for tests: "mlx[cpu]==0.32.4")'


def mlx_installed() -> bool:
    """Whether ``mlx`` and ``mlx-lm`` can be imported (found, not imported: no cost)."""
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
