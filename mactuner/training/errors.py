"""Why a training run cannot start or go on. Every message says what to do."""

from __future__ import annotations


class TrainingError(Exception):
    """Training cannot start or go on; the message says why and what to do."""


class OutOfMemory(TrainingError):
    """Even a micro-batch of one row does not fit in the device's memory."""


class NonFiniteLoss(TrainingError):
    """The loss was not a finite number for several optimizer steps in a row."""


class RunFolderBusy(TrainingError):
    """Another trainer holds the run folder; nothing was changed."""


class RunFolderNotOurs(TrainingError):
    """The run folder holds files MacTuner did not write as a run; nothing was changed."""
