"""The loss and the learning-rate schedule: plain functions of tensors and numbers.

The LM head of a small model is its largest matrix (SmolLM2: 49k tokens x 576),
and its float32 logits, their softmax and its gradient are the largest
activations of a training step (~0.6 MB per trained token). So the trainer
computes logits only where a token is trained, and then only chunk by chunk:
:func:`linear_cross_entropy` never holds more than ``LOSS_CHUNK_TOKENS`` rows of
logits, and computes each chunk's gradients right away in the forward pass (no
FLOP is spent twice: the backward pass only scales them).
"""

from __future__ import annotations

import functools
import math

import torch

# trained tokens per chunk of the fused LM-head loss: 1024 x 49k vocabulary x 4 bytes = 200 MB at most
LOSS_CHUNK_TOKENS = 1024


def loss_and_logit_gradient(logits: torch.Tensor, targets: torch.Tensor,
                            grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy (float32) and its gradient d(loss)/d(logits) in ``grad_dtype``.

    The gradient is ``softmax(logits) - one_hot(targets)``, computed in float32 whatever the
    logits' dtype.
    """
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    loss = (log_z - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    # in place: eagerly, one float32 chunk of logits becomes the gradient (compiled, one fused pass)
    probs = logits.sub_(log_z[:, None]).exp_()
    probs[torch.arange(targets.shape[0], device=targets.device), targets] -= 1.0
    return loss, probs.to(grad_dtype)


@functools.cache
def _compiled_loss_and_probs():
    """:func:`loss_and_logit_gradient` compiled once per process (TorchInductor).

    Compiled, the float32 logits never exist in memory: the logsumexp reads the 16-bit logits
    and one fused pass writes the gradient. With bfloat16 logits of 1,024 tokens x 49k
    vocabulary that was ~10 % of a compiled SmolLM2 step on a CPU (the float32 copies alone).
    """
    return torch.compile(loss_and_logit_gradient, dynamic=True)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    ``forward(hidden [N, H], weight [V, H], targets [N], chunk)`` returns the float32
    sum of the N token losses. The gradients of ``hidden`` (and of ``weight``, when it
    requires one: a trained head) are computed chunk by chunk in the forward pass,
    with the logits in float32; the logits are freed after each chunk. Call it
    through :func:`linear_cross_entropy`, which skips the gradient work when no
    gradient is wanted (evaluation).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                fused: bool = False) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            # the inputs already hold the dtypes to compute in; autocast would recast the float32 sums
            return ChunkedLinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk, fused)

    @staticmethod
    def _forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                 fused: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # the weight's gradient adds up over chunks: float32, cast once at the end
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        # d(loss)/d(logits) feeds the hidden gradient's matmul in the weight's dtype, or the
        # weight's float32 gradient
        probs_dtype = torch.float32 if need_weight else weight.dtype
        loss_and_probs = _compiled_loss_and_probs() if fused else loss_and_logit_gradient
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            loss, probs = loss_and_probs(h @ weight.T, targets[start : start + chunk], probs_dtype)
            total += loss
            if need_hidden:
                grad_hidden[start : start + chunk] = probs.to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(probs.T, h.float())
            del probs
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK_TOKENS,
    fused: bool = False,
) -> torch.Tensor:
    """Summed (float32) cross-entropy of the logits ``hidden @ weight.T`` against ``targets``.

    Equal to ``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` in value and
    gradients, with at most ``chunk`` rows of logits alive at a time.

    Args:
        hidden: ``[N, H]`` hidden states at the trained positions.
        weight: ``[V, H]`` the LM head's weight (no bias).
        targets: ``[N]`` the next tokens.
        chunk: rows of logits computed at a time.
        fused: compute each chunk's loss and logit gradient with TorchInductor (the trainer
            does when it compiles its layers): the same values, less memory traffic.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, fused)
    # no gradient wanted (evaluation): the value alone, still chunk by chunk
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start : start + chunk] @ weight.T).float()
        t = targets[start : start + chunk]
        total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
    return total


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (never 0: the first step of any run
    trains), then ``kind``: ``constant``, ``linear`` or ``cosine`` decay towards 0
    at ``total_steps`` (the last step itself still trains).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
