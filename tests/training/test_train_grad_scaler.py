"""float16 training with a GradScaler (CUDA/MPS in float16: macOS 13 Macs, T4/V100/RTX 20xx): a step
skipped for a non-finite loss must still let the scaler finish its step (``update()``), or the next
step's ``unscale_()`` raises "unscale_() has already been called on this optimizer since the last
update()". Reproduced on the CPU with torch.amp.GradScaler("cpu")."""

from __future__ import annotations

import math

import torch

from mactuner.train import NON_FINITE_STEPS, NonFiniteLoss, Trainer
from tests.train_support import tiny_config


def _inject_nan(trainer: Trainer, steps: set[int]) -> None:
    original = trainer._loss_sum

    def loss_sum(batch):
        loss = original(batch)
        return loss * float("nan") if trainer.step + 1 in steps else loss

    trainer._loss_sum = loss_sum


def _float16_trainer_with_a_scaler(tiny_model_dir, facts_file, **changes) -> Trainer:
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, dtype="float16", val_fraction=0.0,
                                  target_modules=["q_proj", "v_proj"], **changes))
    trainer.setup()
    # what the trainer builds for float16 on CUDA and MPS, on the CPU
    trainer._scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return trainer


def test_two_non_finite_steps_under_a_grad_scaler_are_skipped_and_training_goes_on(tiny_model_dir, facts_file):
    trainer = _float16_trainer_with_a_scaler(tiny_model_dir, facts_file, max_steps=5)
    _inject_nan(trainer, {2, 3})
    result = trainer.run()

    assert result.state == "finished" and result.step == 5
    assert [math.isnan(x) for x in result.losses] == [False, True, True, False, False]
    # each skipped step lowered the scale (the scaler saw the overflow), and training went on from there
    assert trainer._scaler.get_scale() < 2.0**10
    assert all(p.isfinite().all() for p in trainer.trainable)


def test_non_finite_steps_under_a_grad_scaler_still_stop_the_run_with_the_fix(tiny_model_dir, facts_file):
    trainer = _float16_trainer_with_a_scaler(tiny_model_dir, facts_file, max_steps=8)
    _inject_nan(trainer, set(range(2, 9)))
    try:
        trainer.run()
    except NonFiniteLoss as error:
        assert f"for {NON_FINITE_STEPS} steps in a row" in str(error) and "dtype: bfloat16" in str(error)
    else:
        raise AssertionError("the run should have failed")
