"""Narrow weights for decoding on a CPU: int8 and int4 weight-only Linear layers, pre-packed bfloat16.

The chat engine stores a model's Linear weights this way after loading (see :func:`decode_plan`); PyTorch's
weight-only kernels widen to float32 inside, so this works on CPUs without native bfloat16 too.
"""

from __future__ import annotations

import functools

import torch

from mactuner.devices import probe


class PackedLinear(torch.nn.Module):
    """A bfloat16 ``nn.Linear`` whose weight is pre-packed for oneDNN, for CPU inference.

    PyTorch's plain bfloat16 matmul with one input row (decoding one token) is
    slower than float32 on this CPU; oneDNN's packed-weight kernel is not
    (measured per layer: 60 µs plain bf16, 49 µs fp32, 34 µs packed bf16; the
    whole model decodes ~1.35x faster, with identical logits).
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # batch size 1 hint: decoding feeds one row at a time
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)


def pack_linear_weights(model: torch.nn.Module) -> int:
    """Swap a CPU bfloat16 model's ``nn.Linear`` layers for :class:`PackedLinear` (inference only).

    Each layer is checked against the original on a probe input and left as it
    was if oneDNN is missing or the result differs. Returns how many were packed.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    packed = 0
    with torch.inference_mode():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is not torch.nn.Linear or child.weight.dtype != torch.bfloat16 or child.weight.device.type != "cpu":
                    continue
                try:
                    replacement = PackedLinear(child)
                    probe = torch.ones(2, child.in_features, dtype=torch.bfloat16)
                    if not torch.allclose(replacement(probe).float(), child(probe).float(), rtol=1e-2, atol=1e-2):
                        continue
                except (RuntimeError, AttributeError):
                    return packed  # no usable oneDNN kernel here: keep the plain layers
                setattr(module, name, replacement)
                packed += 1
    return packed


@functools.cache
def int8_kernel_available() -> bool:
    """Whether this torch has a working CPU int8 weight-only matmul (``aten._weight_int8pack_mm``); probed once."""
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 64, generator=generator).to(torch.bfloat16)
        w = torch.randint(-127, 128, (24, 64), generator=generator, dtype=torch.int8)
        scale = torch.rand(24, generator=generator).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x, w, scale).float()
        reference = (x.float() @ w.float().T) * scale.float()
        return bool(torch.allclose(y, reference, rtol=2e-2, atol=2e-2 * float(reference.abs().max())))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def decode_plan(device: torch.device, dtype: torch.dtype, decode_weights: str = "int4") -> str:
    """How a chat model's Linear weights are stored for decoding on ``device``.

    Decoding one token reads every weight once, so on a CPU the bytes per token
    set the speed. Returns:

    - ``"int8"``: asked for (or int4 asked for without its kernel) and the int8 kernel exists.
      The kernel widens the weights to float32 inside, so it is fast on CPUs with
      and without native bfloat16 (:func:`mactuner.devices.cpu_supports_bfloat16`):
      there the model's other layers run in bfloat16, here in float32, and only the
      Linear layers' inputs are rounded to bfloat16 for the kernel.
    - ``"int4"``: asked for (the default on a CPU) and the int4 kernel exists: body Linear layers in
      4 bits (groups of 32), the LM head in int8 — about 30 % fewer bytes than int8,
      with a larger (still tested) change of the logits.
    - ``"packed-bfloat16"``: bfloat16 weights on a CPU computing bfloat16
      natively, pre-packed for oneDNN (exact, when int8 is refused or missing).
    - ``"as-loaded"``: anything else (GPUs, MPS, float32 on a CPU without the int8 kernel).
    """

    if device.type != "cpu":
        return "as-loaded"
    if decode_weights == "int4" and dtype in (torch.float32, torch.bfloat16) and int4_kernel_available():
        return "int4"
    if decode_weights in ("int8", "int4") and dtype in (torch.float32, torch.bfloat16) and int8_kernel_available():
        return "int8"
    if dtype == torch.bfloat16 and probe.cpu_supports_bfloat16():
        return "packed-bfloat16"
    return "as-loaded"


# decoding feeds one row per step; a prompt (many rows) is faster through the dequantized weight
_INT8_KERNEL_MAX_ROWS = 4
# aten._weight_int8pack_mm (torch 2.13, CPU) is only correct when the input width is a multiple of 16
_INT8_KERNEL_K_MULTIPLE = 16


class Int8Linear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is stored as int8 with one scale per output row, for CPU inference.

    Symmetric per-row quantization (``scale = max|w| / 127``), the usual
    weight-only int8 scheme. One-row inputs (decoding) go through
    ``aten._weight_int8pack_mm`` with bfloat16 inputs (it accumulates in
    float32); longer inputs (the prompt) through the weight dequantized to the
    input's dtype, which is faster for many rows. The output has the input's dtype.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        qweight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)
        self.bias = linear.bias

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as ``dtype`` (what the int8 values and scales stand for)."""
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.shape[0] <= _INT8_KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.qweight, self.scale).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            y = torch.nn.functional.linear(rows, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)


INT4_GROUP = 32  # weights per (scale, zero) pair along the input dimension (64 measured too coarse)


class Int4Linear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is stored as 4-bit integers (groups of 32 inputs share a scale and zero).

    Asymmetric per-group quantization into ``aten._weight_int4pack_mm_for_cpu``'s
    packed layout: half of int8's bytes per token; it moves the logits more than int8
    does (see :func:`quantize_linear_weights_int4`). The output has the input's dtype.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n, k = linear.weight.shape
        groups = linear.weight.detach().float().reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
        # the kernel computes (q - 8) * scale + zero, so zero is the value of q = 8
        zero = low + 8 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        scales_and_zeros = torch.stack([scale.reshape(n, -1).T, zero.reshape(n, -1).T], dim=-1).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16), persistent=False)
        self.bias = linear.bias

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        """Whether the kernel takes this layer's shape."""
        return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


@functools.cache
def int4_kernel_available() -> bool:
    """Whether this torch has a working CPU int4 weight-only matmul; probed once against a float reference."""
    try:
        generator = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(64, 32, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(32, 64, generator=generator))
        x = torch.randn(1, 64, generator=generator)
        reference = linear(x)
        error = (Int4Linear(linear)(x) - reference).abs().max() / reference.abs().max()
        return bool(error < 0.2)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def quantize_linear_weights_int4(model: torch.nn.Module) -> int:
    """Swap a CPU model's body ``nn.Linear`` layers for :class:`Int4Linear`, its LM head for :class:`Int8Linear`.

    The LM head stays at int8: measured on SmolLM2-135M, an int4 head (groups of 64)
    dropped the teacher-forced next-token agreement with the unquantized model to 79 %,
    int4 body + int8 head kept it at 97 % (int8 everywhere: 96 %). Layers whose shape the
    int4 kernel does not take get int8 (or stay as they are). Returns how many layers were swapped.
    """
    if not int4_kernel_available():
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swapped = 0
    with torch.inference_mode():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is not torch.nn.Linear or child.weight.device.type != "cpu":
                    continue
                if child is not head and Int4Linear.fits(child):
                    setattr(module, name, Int4Linear(child))
                elif int8_kernel_available() and child.in_features % _INT8_KERNEL_K_MULTIPLE == 0:
                    setattr(module, name, Int8Linear(child))
                else:
                    continue
                swapped += 1
    return swapped


def quantize_linear_weights(model: torch.nn.Module) -> int:
    """Swap a CPU model's ``nn.Linear`` layers (the LM head too) for :class:`Int8Linear` (inference only).

    A tied LM head gets its own int8 copy; the embedding lookup keeps the
    original table. Layers whose input width is not a multiple of 16 stay as they
    are (the kernel is wrong there). Returns how many layers were swapped (0 without the kernel).
    """
    if not int8_kernel_available():
        return 0
    swapped = 0
    with torch.inference_mode():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is not torch.nn.Linear or child.weight.device.type != "cpu":
                    continue
                if child.in_features % _INT8_KERNEL_K_MULTIPLE:
                    continue  # the kernel reads past the row otherwise (measured: garbage for K=24, 40, 100)
                setattr(module, name, Int8Linear(child))
                swapped += 1
    return swapped
