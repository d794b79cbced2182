"""The trainer, in parts that can be read alone.

``trainer`` (setup → train → cleanup) uses the plain parts: ``batching`` (rows to
micro-batches), ``losses`` (the chunked LM-head cross-entropy, the schedule),
``master_weights`` (float32 copies of 16-bit adapters), ``memory`` (peak per
report, the MPS cap), ``distributed`` (torchrun process groups and collectives),
``callbacks`` (progress, the run folder's files), ``qlora`` (the 4-bit base on CUDA), ``int8_base`` (QLoRA's int8 base on a CPU) and
``errors``. None of them imports ``trainer``; ``mactuner.train`` re-exports all.
"""

from mactuner.training.batching import GROUPING_WINDOW, MicroBatch, Unit, collate, make_units, plan_epoch
from mactuner.training.callbacks import PrintProgress, RunFolderWriter, TrainingCallback
from mactuner.training.distributed import Distributed, init_distributed
from mactuner.training.errors import NonFiniteLoss, OutOfMemory, RunFolderBusy, TrainingError
from mactuner.training.losses import LOSS_CHUNK_TOKENS, ChunkedLinearCrossEntropy, linear_cross_entropy, lr_factor
from mactuner.training.master_weights import MasterWeights
from mactuner.training.memory import PeakMemory, limit_mps_memory
from mactuner.training.trainer import NON_FINITE_STEPS, StepOutcome, Trainer, TrainResult, train

__all__ = [
    "GROUPING_WINDOW", "LOSS_CHUNK_TOKENS", "NON_FINITE_STEPS", "ChunkedLinearCrossEntropy", "Distributed",
    "MasterWeights", "MicroBatch", "NonFiniteLoss", "OutOfMemory", "PeakMemory", "PrintProgress", "RunFolderBusy",
    "RunFolderWriter", "StepOutcome", "TrainResult", "Trainer", "TrainingCallback", "TrainingError", "Unit", "collate",
    "init_distributed", "limit_mps_memory", "linear_cross_entropy", "lr_factor", "make_units", "plan_epoch", "train",
]
