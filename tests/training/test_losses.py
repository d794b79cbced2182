"""The chunked LM-head cross-entropy equals torch's own, in value and gradients; the
learning-rate schedule never gives a step a zero learning rate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mactuner.data import IGNORE_INDEX
from mactuner.training.losses import linear_cross_entropy, lr_factor
from tests.features import requires

VOCAB, HIDDEN, ROWS = 97, 16, 23


def _problem(dtype: torch.dtype, seed: int = 0):
    """Hidden states of every position, an LM head, and labels of which about a third are ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(ROWS, HIDDEN, generator=g) * 2).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) / 2).to(dtype)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    labels[torch.rand(ROWS, generator=g) < 0.35] = IGNORE_INDEX
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).sum() > 5
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    """torch's cross-entropy over every position, ignored labels skipped: float32 logits."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logits = (h @ w.T).float()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _ours(hidden, weight, labels, chunk, train_weight=True, fused=False):
    """The trainer's way: only the trained positions go through the chunked loss."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(train_weight)
    trained = labels != IGNORE_INDEX
    loss = linear_cross_entropy(h[trained], w, labels[trained], chunk, fused=fused)
    # scaled like the trainer's loss (divided by the token count), to check the chain rule too
    (loss * 0.5).backward()
    return loss.detach(), h.grad * 2, (w.grad * 2 if train_weight else None)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_value_and_gradients_equal_torch_cross_entropy_in_float32(chunk):
    hidden, weight, labels = _problem(torch.float32)
    ref_loss, ref_h, ref_w = _reference(hidden, weight, labels)
    loss, grad_h, grad_w = _ours(hidden, weight, labels, chunk)

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-6)
    # ignored positions get no gradient at all
    assert grad_h[labels == IGNORE_INDEX].abs().max() == 0


@pytest.mark.parametrize("chunk", [2, 5, 1024])
def test_bfloat16_inputs_match_within_bfloat16_precision(chunk):
    hidden, weight, labels = _problem(torch.bfloat16, seed=1)
    ref_loss, ref_h, ref_w = _reference(hidden, weight, labels)
    loss, grad_h, grad_w = _ours(hidden, weight, labels, chunk)

    # the logits are bfloat16 products summed in float32 on both sides
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
    assert grad_h.dtype == torch.bfloat16 and grad_w.dtype == torch.bfloat16
    torch.testing.assert_close(grad_h.float(), ref_h.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_w.float(), ref_w.float(), rtol=2e-2, atol=2e-2)


def test_a_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden, weight, labels = _problem(torch.float32, seed=2)
    _ref_loss, ref_h, _ref_w = _reference(hidden, weight, labels)
    _loss, grad_h, grad_w = _ours(hidden, weight, labels, chunk=4, train_weight=False)
    assert grad_w is None
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-5, atol=1e-6)


@requires("compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("train_weight", [True, False], ids=["trained-head", "frozen-head"])
def test_the_fused_loss_compiled_gives_the_eager_values_and_gradients(tmp_path, monkeypatch, dtype, train_weight):
    """What the trainer runs once its layers are compiled: the same loss and gradients, chunk sizes varying."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    hidden, weight, labels = _problem(dtype, seed=4)
    ref_loss, ref_h, ref_w = _reference(hidden, weight, labels)
    for chunk in (3, 5, 64):  # chunks of different lengths: one dynamic-shape compile serves them
        loss, grad_h, grad_w = _ours(hidden, weight, labels, chunk, train_weight=train_weight, fused=True)
        eager_loss, eager_h, eager_w = _ours(hidden, weight, labels, chunk, train_weight=train_weight)
        tight = dtype == torch.float32
        assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-6 if tight else 1e-4)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5 if tight else 1e-3)
        assert grad_h.dtype == dtype
        torch.testing.assert_close(grad_h.float(), eager_h.float(), rtol=1e-5 if tight else 2e-2, atol=1e-6 if tight else 1e-2)
        torch.testing.assert_close(grad_h.float(), ref_h.float(), rtol=1e-4 if tight else 2e-2, atol=1e-5 if tight else 2e-2)
        if train_weight:
            torch.testing.assert_close(grad_w.float(), ref_w.float(), rtol=1e-4 if tight else 2e-2, atol=1e-5 if tight else 2e-2)
        else:
            assert grad_w is None


def test_without_gradients_the_value_is_the_same_and_nothing_is_recorded():
    hidden, weight, labels = _problem(torch.float32, seed=3)
    trained = labels != IGNORE_INDEX
    ref_loss, _, _ = _reference(hidden, weight, labels)
    weight = weight.clone().requires_grad_(True)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden[trained], weight, labels[trained], chunk=3)
    assert loss.grad_fn is None
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("total,warmup", [(1, 0), (1, 1), (2, 0), (10, 3), (100, 5)])
def test_every_step_trains_with_a_positive_learning_rate(kind, total, warmup):
    factors = [lr_factor(step, total, warmup, kind) for step in range(total)]
    assert all(0 < f <= 1 for f in factors), factors
    # the first step of a run without warm-up trains at the peak
    if warmup == 0:
        assert factors[0] == 1.0
