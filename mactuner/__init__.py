"""MacTuner: fine-tune, chat with, search with and quantize small language models
on the device you pick (Apple MPS, an NVIDIA GPU, or the CPU).

The library never imports streamlit: the UI lives in ``app.py`` and ``pages/``.
"""

__version__ = "0.1.0"


def _quiet_third_party_import_noise() -> None:
    # transformers imports torchao when it is installed; on a machine without a
    # Hopper GPU torchao warns that its GPU-only kernels don't load, and torch
    # warns about torchao's enum registrations. Neither matters to the person
    # running MacTuner, and both printed on every command.
    import logging

    class _DropGpuKernelNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Failed to load")

    logging.getLogger("torchao").addFilter(_DropGpuKernelNotice())
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


_quiet_third_party_import_noise()
