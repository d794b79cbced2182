"""MacTuner: fine-tune, chat with, search with and quantize small language models
on the device you pick (Apple MPS, an NVIDIA GPU, or the CPU).

The library never imports streamlit: the UI lives in ``app.py`` and ``pages/``.
"""

__version__ = "0.1.0"
