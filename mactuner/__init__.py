"""MacTuner: fine-tune, chat with, search with and quantize small language models
on the device you pick (Apple MPS, an NVIDIA GPU, or the CPU).

The library never imports streamlit: the UI lives in ``app.py`` and ``pages/``.
Importing it changes no logger of any other library: the entry points
(``mactuner.cli.main`` and ``app.py``) call :func:`quiet_third_party_loggers`.
"""

__version__ = "0.2.0"


def quiet_third_party_loggers() -> None:
    """Silence import-time notices of other libraries that mean nothing to a MacTuner user.

    transformers imports torchao when it is installed; on a machine without a
    Hopper GPU torchao warns that its GPU-only kernels don't load, and torch warns
    about torchao's enum registrations. Called by the entry points only, so a
    program that imports ``mactuner`` as a library keeps its logging as it was.
    """
    import logging

    class _DropGpuKernelNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Failed to load")

    torchao = logging.getLogger("torchao")
    if not any(type(f).__name__ == "_DropGpuKernelNotice" for f in torchao.filters):  # idempotent
        torchao.addFilter(_DropGpuKernelNotice())
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
