"""Every quantization path in one place.

    kernels.py   the CPU int8/int4 weight-only Linear layers (and pre-packed bfloat16) the chat engine decodes with
    methods.py   quantize a model folder (torch dynamic int8, torchao, bitsandbytes) and reload any variant
    compare.py   measure variants (size, memory, speed, perplexity, a probe answer) and judge them

``kernels`` and ``methods`` are re-exported here. ``compare`` sits above the chat engine (it generates),
which itself imports ``kernels``: import it as ``mactuner.quantize.compare``. QLoRA's training-time int8
base is ``mactuner.training.int8_base``.
"""

from mactuner.quantize.kernels import (
    INT4_GROUP,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    decode_plan,
    int4_kernel_available,
    int8_kernel_available,
    pack_linear_weights,
    quantize_linear_weights,
    quantize_linear_weights_int4,
)
from mactuner.quantize.methods import (
    DYNAMIC_STATE_FILE,
    HELD_OUT_TEXT,
    METHODS,
    PROBE,
    VARIANT_FILE,
    QuantMethod,
    load_variant,
    quantize,
    supported_methods,
    unsupported_reason,
)

__all__ = [
    "DYNAMIC_STATE_FILE",
    "HELD_OUT_TEXT",
    "INT4_GROUP",
    "Int4Linear",
    "Int8Linear",
    "METHODS",
    "PROBE",
    "PackedLinear",
    "QuantMethod",
    "VARIANT_FILE",
    "decode_plan",
    "int4_kernel_available",
    "int8_kernel_available",
    "load_variant",
    "pack_linear_weights",
    "quantize",
    "quantize_linear_weights",
    "quantize_linear_weights_int4",
    "supported_methods",
    "unsupported_reason",
]
