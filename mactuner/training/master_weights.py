"""Float32 master copies of weights that compute in a 16-bit dtype.

A small update added to a bfloat16 number (8 bits of mantissa) vanishes, so an
adapter that computes in bfloat16 or float16 is *optimized* in float32: AdamW
updates these float32 copies and they are copied back into the 16-bit weights
after each step. (Keeping the adapter itself in float32 would make every adapted
layer keep a float32 copy of its input for the backward pass: a quarter more
activation memory and slower.) Gradients add up over micro-batches in float32.
When the model already trains in float32 there is no master copy at all
(:meth:`MasterWeights.needed`): no second copy of the weights, no copies per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class MasterWeights:
    """Float32 copies of ``params``, which are cast to ``compute_dtype``.

    Args:
        params: the trainable weights (float32 as created, e.g. by peft).
        compute_dtype: the 16-bit dtype they compute in from now on.
    """

    def __init__(self, params: Sequence[torch.Tensor], compute_dtype: torch.dtype):
        self.params = list(params)
        self.compute_dtype = compute_dtype
        self.master = [p.detach().float().clone() for p in self.params]
        for p in self.params:
            p.data = p.data.to(compute_dtype)

    @staticmethod
    def needed(method: str, compute_dtype: torch.dtype) -> bool:
        """Whether a run of ``method`` computing in ``compute_dtype`` needs master copies.

        Full fine-tuning keeps float32 weights and autocasts instead; float32 compute needs none.
        """
        return method != "full" and compute_dtype != torch.float32

    def collect_gradients(self) -> None:
        """Add the 16-bit gradients of the last backward pass into the float32 master gradients."""
        fresh, adding = [], []
        for p, m in zip(self.params, self.master):
            if p.grad is not None:
                (fresh if m.grad is None else adding).append((p, m))
        for p, m in fresh:
            m.grad = p.grad.float()
        if adding:
            # one multi-tensor kernel for every weight (a GPU would otherwise launch one add per tensor)
            torch._foreach_add_([m.grad for _, m in adding], [p.grad for p, _ in adding])
        for p, _ in fresh + adding:
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Copy the (just updated) master weights into the model's 16-bit weights."""
        torch._foreach_copy_(self.params, self.master)

    @torch.no_grad()
    def load(self, values: Sequence[torch.Tensor]) -> None:
        """Set the master weights (e.g. from a checkpoint) and the model's weights with them."""
        for m, value in zip(self.master, values):
            m.copy_(value)
        self.copy_to_model()

    @contextlib.contextmanager
    def in_model(self) -> Iterator[None]:
        """Let the model hold the float32 master weights meanwhile (for saving; nothing may train)."""
        for p, m in zip(self.params, self.master):
            p.data = m
        try:
            yield
        finally:
            for p, m in zip(self.params, self.master):
                p.data = m.to(self.compute_dtype)
