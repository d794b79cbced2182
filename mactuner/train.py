"""The trainer's public names, where they have always been importable from.

The code lives in the :mod:`mactuner.training` package (one module per concern);
this module only re-exports it, so ``from mactuner.train import Trainer, train,
TrainingCallback, TrainResult, TrainingError, OutOfMemory`` keeps working.
"""

from mactuner.data import IGNORE_INDEX
from mactuner.devices import empty_device_cache, get_optimal_dtype, is_out_of_memory, memory_in_use, resolve_device
from mactuner.fileio import write_json_atomic
from mactuner.training.batching import GROUPING_WINDOW, MicroBatch, Unit, collate, make_units, plan_epoch
from mactuner.training.callbacks import PrintProgress, RunFolderWriter, TrainingCallback
from mactuner.training.distributed import Distributed, init_distributed
from mactuner.training.errors import NonFiniteLoss, OutOfMemory, RunFolderBusy, TrainingError
from mactuner.training.losses import LOSS_CHUNK_TOKENS, ChunkedLinearCrossEntropy, linear_cross_entropy, lr_factor
from mactuner.training.master_weights import MasterWeights
from mactuner.training.memory import PeakMemory, limit_mps_memory
from mactuner.training.trainer import NON_FINITE_STEPS, StepOutcome, Trainer, TrainResult, train

# the names these had before the split
_GROUPING_WINDOW = GROUPING_WINDOW
_PrintProgress = PrintProgress
_Distributed = Distributed
_init_distributed = init_distributed

__all__ = [
    "IGNORE_INDEX", "LOSS_CHUNK_TOKENS", "NON_FINITE_STEPS", "ChunkedLinearCrossEntropy", "MasterWeights", "MicroBatch",
    "NonFiniteLoss", "OutOfMemory", "PeakMemory", "RunFolderBusy", "RunFolderWriter", "StepOutcome", "TrainResult",
    "Trainer", "TrainingCallback", "TrainingError", "Unit", "collate", "empty_device_cache", "get_optimal_dtype",
    "is_out_of_memory", "limit_mps_memory", "linear_cross_entropy", "lr_factor", "make_units", "memory_in_use",
    "plan_epoch", "resolve_device", "train", "write_json_atomic",
]
