"""QLoRA on a CPU: the frozen base's Linear weights in int8, their matmuls in integers.

bitsandbytes' 4-bit kernels run on CUDA only. On a CPU, MacTuner's QLoRA keeps every frozen
Linear weight inside the decoder layers as int8 with one float32 scale per output row (1 byte
per weight instead of 2 in bfloat16 or 4 in float32), and runs both matmuls that touch it — the
forward ``x·Wᵀ`` and the backward's input gradient ``g·W`` — as integer matmuls
(``torch._int_mm``) on rows of ``x`` and ``g`` quantized to int8 on the fly, one scale per row.
That is SwitchBack's scheme (Wortsman et al., 2023, "Stable and low-precision training for
large-scale vision-language models") on weights that take no gradient: the base has no weight
gradient at all, and the adapter's own small matmuls stay in the compute dtype.

Why: a float32-only CPU (AVX-512 without bfloat16) spends most of a LoRA step in float32
matmuls; with VNNI (or AMX-INT8) its int8 matmuls run several times faster. What it costs: the
base the adapter trains against is rounded to int8 (as QLoRA's is rounded to 4 bits), so the loss
is not bit-equal to LoRA's; the adapter is saved as plain PEFT and applied to the full-precision
base afterwards, as QLoRA's is. The embeddings, the LM head and the norms keep the compute dtype.
"""

from __future__ import annotations

import functools

import torch


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D) as int8 rows and the float32 scale of each row (``x ≈ q * scale``).

    Symmetric, no zero point: each row's largest magnitude maps to 127. (The 127s are literals:
    torch.compile mistraces a module-level constant inside an autograd.Function.)
    """
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    return (x / scale).round_().clamp_(-127.0, 127.0).to(torch.int8), scale


@functools.cache
def int8_matmul_available(device_type: str = "cpu") -> bool:
    """Whether ``torch._int_mm`` runs on ``device_type`` and gives the exact integer product (probed once).

    Exact is not a given: without VNNI or AMX (e.g. an AVX-512 Skylake server), oneDNN sums
    pairs of int8 products in int16 and saturates, so products of large values come out wrong.
    The probe multiplies rows of extreme values (±127) and random ones.
    """
    if device_type != "cpu":
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (6, 64), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 64), generator=generator, dtype=torch.int8)
    a[0], a[1], b[0], b[1] = 127, -127, 127, -127
    try:
        product = torch._int_mm(a, b.t())
    except (RuntimeError, NotImplementedError):
        return False
    return torch.equal(product, a.int() @ b.int().t())


class _Int8Matmul(torch.autograd.Function):
    """``x·Wᵀ`` for 2-D ``x`` with ``W`` frozen in int8; the input gradient ``g·W`` is an int8 matmul too.

    Shapes are handled by the caller (reshapes inside an autograd.Function trip torch.compile
    with dynamic shapes).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        rows, row_scale = quantize_rows(x)
        return (torch._int_mm(rows, weight.t()).float() * row_scale * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight, scale = ctx.saved_tensors
        # the weight's row scales belong to the gradient's columns: fold them in before quantizing
        rows, row_scale = quantize_rows(grad.float() * scale)
        return (torch._int_mm(rows, weight).float() * row_scale).to(grad.dtype), None, None


class Int8BaseLinear(torch.nn.Module):
    """A frozen ``nn.Linear`` stored as int8 rows with float32 scales; computes in its input's dtype.

    ``weight_int8`` and ``weight_scale`` are buffers, not parameters: nothing trains them and no
    adapter file holds them. The bias, if any, stays a frozen parameter in its dtype.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_int8", weight)
        self.register_buffer("weight_scale", scale.reshape(-1))
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Int8Matmul.apply(x.reshape(-1, self.in_features), self.weight_int8, self.weight_scale)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer computes with (for tests and error measurements)."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows"


def quantize_frozen_linears(layers: torch.nn.Module, keep: torch.nn.Module | None = None) -> int:
    """Replace every frozen ``nn.Linear`` under ``layers`` but ``keep`` by an :class:`Int8BaseLinear`.

    Returns how many were replaced. ``layers`` is the decoder's stack of layers, or the whole
    model with its LM head as ``keep`` (the head and the embeddings stay as they are). A
    LoRA-wrapped layer's ``base_layer`` is frozen and is replaced; the adapter's own Linear
    layers train and are left alone.
    """
    swaps = [
        (parent, name, child)
        for parent in layers.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and not child.weight.requires_grad and child is not keep
    ]
    for parent, name, child in swaps:
        setattr(parent, name, Int8BaseLinear(child))
    return len(swaps)
