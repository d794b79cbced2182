"""The trainer: LoRA, QLoRA and full fine-tuning of a causal LM, one readable loop.

``Trainer(config, run_dir).run()`` goes setup → train → cleanup:

- **setup** takes the run folder's lock first (a second trainer on the folder stops
  there, having changed nothing), then loads the model in the device's precision,
  wraps it (LoRA / QLoRA) or not (full), tokenizes and splits the data, plans the
  batches, builds AdamW and the schedule, and restores the last checkpoint when
  resuming. Each stage is announced (status message and an ``info`` record), so
  progress shows from the first second.
- **train** runs optimizer steps. Each step is a fixed *global batch* of rows,
  cut into micro-batches (and across processes under ``torchrun``). The loss is
  the sum over every trained token divided by the number of trained tokens in
  the whole global batch, so the gradient is the same however the batch is cut:
  one process or two, micro-batch 4 or 1 after an out-of-memory back-off. The
  host waits for the device once per step (the loss and gradient norm are read
  together); a step whose loss is not finite is skipped, and
  ``NON_FINITE_STEPS`` of them in a row stop the run as failed, with the fix.
- **cleanup** releases the process group and the run folder's lock; the final
  adapter (``RUN/adapter``, a standard PEFT folder) and the final state are
  written at the end of ``train``.

Precision. Frozen base weights are held in the device's compute dtype
(``get_optimal_dtype``: bfloat16 on a CPU with AVX512-BF16, ~3.7x faster matmuls
than float32). The adapter computes in that dtype too, with float32 master
weights (:class:`~mactuner.training.master_weights.MasterWeights`) when that dtype
is 16-bit. Checkpoints and the final adapter hold the float32 weights. Full
fine-tuning keeps float32 weights and runs the forward pass under autocast. The
cross-entropy is computed in float32, with logits only where a token is trained
(:mod:`mactuner.training.losses`).

Progress goes to callbacks (:class:`~mactuner.training.callbacks.TrainingCallback`)
and, when a run folder is given, to ``RUN/metrics.jsonl`` and ``RUN/status.json``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mactuner import checkpoints, fingerprint
from mactuner.config import TrainConfig
from mactuner.devices import (
    dtype_name,
    empty_device_cache,
    is_out_of_memory,
    limit_host_heap_growth,
    resolve_device,
    resolve_dtype,
    trim_host_heap,
)
from mactuner.devices.cpu_threads import CpuThreads
from mactuner.locks import LockBusy, RunLock
from mactuner.run_folder import NotARunFolder, check_run_folder, mark_run_folder
from mactuner.training.batching import MicroBatch, Unit, collate, plan_epoch
from mactuner.training.callbacks import PrintProgress, RunFolderWriter, TrainingCallback
from mactuner.training.compiled import LayerCompiler, decoder_layers
from mactuner.training.distributed import Distributed, init_distributed
from mactuner.training.errors import NonFiniteLoss, OutOfMemory, RunFolderBusy, RunFolderNotOurs, TrainingError
from mactuner.training.int8_base import quantize_frozen_linears
from mactuner.training.losses import LOSS_CHUNK_TOKENS, linear_cross_entropy, lr_factor
from mactuner.training.master_weights import MasterWeights
from mactuner.training.memory import PeakMemory, limit_mps_memory
from mactuner.training.qlora import qlora_problem

# a run stops, marked failed, after this many optimizer steps in a row whose loss is not finite
NON_FINITE_STEPS = 3


@dataclass
class TrainResult:
    """How a training ended."""

    state: str  # "finished" or "cancelled" (a failure raises instead)
    step: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    run_dir: Path | None
    adapter_path: Path | None
    micro_batch_size: int
    losses: list[float] = field(default_factory=list)  # per step, this process's session only
    message: str = ""
    peak_memory_bytes: int | None = None  # the largest memory_bytes reported in this session
    memory_kind: str | None = None  # what it measures (see mactuner.training.memory)


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    loss: float  # mean loss per trained token of the global batch
    grad_norm: float
    real_tokens: int  # non-padding tokens of the global batch
    lr: float  # the learning rate this step used
    skipped: bool  # not applied: the loss or the gradients were not finite


class Trainer:
    """Fine-tunes ``config.model`` on ``config.dataset``; see the module docstring.

    Args:
        config: the run's settings.
        run_dir: the run folder (config, status, metrics, checkpoints, adapter);
            None trains without writing anything (tests, quick experiments).
        callbacks: progress receivers, called in order.
        resume: continue from the last complete checkpoint in ``run_dir``.
        verbose: also print progress lines on stdout.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike | None = None,
        callbacks: Iterable[TrainingCallback] = (),
        resume: bool = False,
        verbose: bool = False,
    ):
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.callbacks = list(callbacks)
        self.verbose = verbose
        self._stop = threading.Event()
        self.dist = Distributed()
        self.model = None
        self.tokenizer = None
        self.master_weights: MasterWeights | None = None
        self.micro_batch_size = config.batch_size
        self.step = 0
        self.losses: list[float] = []
        self.last_val_loss: float | None = None
        self.tokens_seen = 0
        self.peak_memory_bytes: int | None = None
        self._writer: RunFolderWriter | None = None
        self._lock: RunLock | None = None
        self._ended = False
        self._non_finite: list[int] = []  # the steps of the current run of non-finite losses
        self.objective = None  # a PreferenceObjective for dpo / orpo / kto (set up with the model)
        self.eval_extras: dict[str, float] = {}  # held-out reward statistics of the last evaluation
        self._stop_agreed = False  # whether any process asked to stop (read in the step's all-reduce)
        self._last_memory: int | None = None  # this process's last reported peak memory
        self._rank_memory: list[int] | None = None  # every process's, as of the last step's all-reduce
        self._set_up = False

    # -- public controls

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (it saves a checkpoint first)."""
        self._stop.set()

    def run(self) -> TrainResult:
        """setup → train → cleanup, with the run folder's status kept true on failure."""
        try:
            if not self._set_up:
                self.setup()
            return self.train()
        except BaseException as error:
            self._record_failure(error)
            raise
        finally:
            self.cleanup()

    @property
    def master(self) -> list[torch.Tensor] | None:
        """The float32 master weights, or None when the model trains its own weights."""
        return self.master_weights.master if self.master_weights is not None else None

    # -- setup

    def setup(self) -> None:
        """Lock the run folder, load the model and data, build the optimizer; restore when resuming.

        Raises:
            RunFolderBusy: another trainer holds ``run_dir`` (nothing was changed).
            TrainingError: anything else that stops the run; the message says what to do.
        """
        try:
            self._setup()
        except BaseException as error:
            self._record_failure(error)
            self.cleanup()
            raise

    def _setup(self) -> None:
        config = self.config
        # first of all: a second trainer on this folder must stop before touching anything
        self._take_run_lock()
        self.dist = init_distributed(_device_type(config.device))
        device = resolve_device(config.device)
        if device.type == "cuda" and self.dist.enabled:
            device = self.dist.device
        self.device = device
        if device.type == "cuda":
            # what acts on "the current device" (bitsandbytes, Triton kernels under compile, the peak
            # counters, new tensors without a device) must act on this run's GPU, not on cuda:0
            torch.cuda.set_device(device)
        self.compute_dtype = resolve_dtype(config.dtype, device, _checkpoint_dtype(config) if device.type == "mps" else None)
        # from now on, so that the first steps are judged over the seconds of loading
        self._threads = CpuThreads() if device.type == "cpu" else None
        if device.type == "cpu":
            # large freed activations go back to the system instead of fragmenting the heap
            limit_host_heap_growth()

        if self.run_dir is not None and self.dist.is_main:
            if self.resume and checkpoints.latest_checkpoint(self.run_dir) is None:
                raise TrainingError(f"Nothing to resume in {self.run_dir}: it has no complete checkpoint.")
            if not self.resume and checkpoints.list_checkpoints(self.run_dir):
                raise TrainingError(f"{self.run_dir} already holds checkpoints: resume it (--resume) or pick a new run folder.")
            # resume only what this run started on: the same dataset content and training settings
            if self.resume:
                try:
                    fingerprint.check(self.run_dir, config)
                except fingerprint.FingerprintMismatch as error:
                    raise TrainingError(str(error)) from error
            # leftovers of a save that a crash interrupted (no save can be running: the lock is ours)
            checkpoints.remove_staging(self.run_dir)
            config.save(self.run_dir / "config.yaml")
            if not self.resume or not (self.run_dir / fingerprint.FINGERPRINT_FILE).exists():
                fingerprint.record(self.run_dir, config)
            self._writer = RunFolderWriter(self.run_dir)
            self.callbacks.insert(0, self._writer)
            if config.trackers:
                # TensorBoard / MLflow (training.trackers): a missing package stops the run here, with the fix
                from mactuner.training.trackers import TrackerMissing, tracker_callbacks

                try:
                    self.callbacks += tracker_callbacks(config, self.run_dir, self.resume)
                except TrackerMissing as error:
                    raise TrainingError(str(error)) from error
        if self.verbose and self.dist.is_main:
            self.callbacks.append(PrintProgress())
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        if config.gpus != local:
            self._info(
                f"The config asks for {config.gpus} GPU process{'es' if config.gpus > 1 else ''} on this machine and "
                f"{local} {'are' if local > 1 else 'is'} running: the effective batch is "
                f"{config.batch_size * config.grad_accum * self.dist.world_size} rows per step. "
                "(python -m mactuner train starts torchrun itself when gpus > 1.)"
            )

        if not config.dataset:
            raise TrainingError("No dataset: set `dataset` to the path of a JSON, JSONL, CSV, Parquet or TXT file.")
        if config.method == "qlora" and device.type != "cuda" and (problem := qlora_problem(device.type)):
            # (on CUDA, loading the 4-bit base names what is missing)
            raise TrainingError(problem)
        if device.type == "mps":
            cap = limit_mps_memory()
            if cap is not None:
                self._info(
                    f"MPS memory capped at {cap / 2**30:.1f} GiB (the GPU's recommended working set, or the memory "
                    "free at the start when that is less), so running out "
                    "of memory halves the micro-batch instead of swapping."
                )

        self._stage("loading", f"Loading {config.model} ({config.method}, {dtype_name(self.compute_dtype)} on {device})…")
        torch.manual_seed(config.seed)
        self._load_model()
        # dpo / orpo / kto: the loss of a micro-batch comes from the objective (training.objectives)
        self.objective = None
        if config.preference:
            from mactuner.training.objectives import PreferenceObjective

            self.objective = PreferenceObjective(config, self)
        self._compiler = LayerCompiler(
            config.compile, self.causal_lm, device.type, self._compile_key(), self._info, self._stage
        )
        self._prepare_data()
        self._build_optimizer()
        if self.resume:
            self._restore(checkpoints.latest_checkpoint(self.run_dir) if self.run_dir is not None else None)
        else:
            # the adapter's initial weights used the seed; dropout starts from it too
            torch.manual_seed(config.seed)
        self._memory = PeakMemory(device)
        self._set_up = True

    def _take_run_lock(self) -> None:
        """Hold ``RUN/.trainer.lock`` (rank 0 only: the processes of one torchrun share a folder)."""
        if self.run_dir is None or int(os.environ.get("RANK", "0")) != 0:
            return
        try:
            # a folder of the person's own files is never written into (not even a lock file)
            check_run_folder(self.run_dir)
        except NotARunFolder as error:
            raise RunFolderNotOurs(str(error)) from None
        lock = RunLock(self.run_dir)
        try:
            lock.acquire()
        except LockBusy as error:
            raise RunFolderBusy(f"{error} This trainer stopped without changing anything.") from None
        self._lock = lock
        mark_run_folder(self.run_dir)

    def _load_model(self) -> None:
        config = self.config
        from mactuner.models import ModelSourceError, load_model

        self._autocast = False
        if config.method == "qlora" and self.device.type == "cuda":
            from mactuner.training.qlora import load_4bit

            model, tokenizer, self.model_path = load_4bit(config.model, self.device, self.compute_dtype, config.trust_remote_code)
        else:
            # full fine-tuning keeps float32 weights and autocasts (see the module docstring)
            weights_dtype = torch.float32 if config.method == "full" else self.compute_dtype
            self._autocast = config.method == "full" and self.compute_dtype != torch.float32
            try:
                loaded = load_model(
                    config.model, device=self.device, dtype=weights_dtype, trust_remote_code=config.trust_remote_code
                )
            except ModelSourceError as error:
                raise TrainingError(str(error)) from error
            model, tokenizer = loaded.model, loaded.tokenizer
            self.model_path = loaded.path
        model.config.use_cache = False
        if config.gradient_checkpointing:
            # non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads needed)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.method in ("lora", "qlora"):
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.target_modules,
                bias="none",
                task_type="CAUSAL_LM",
            )
            # the adapter is initialised in float32 (it becomes the master copy below)
            try:
                model = get_peft_model(model, lora, autocast_adapter_dtype=True)
            except ValueError as error:
                raise TrainingError(f"LoRA cannot be applied to {config.model}: {error}") from error
            self.causal_lm = model.get_base_model()
        else:
            self.causal_lm = model
            for p in model.parameters():
                p.requires_grad_(True)
        model.train()
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise TrainingError(f"No weight is trainable: target_modules {config.target_modules} matched no layer of {config.model}.")
        if MasterWeights.needed(config.method, self.compute_dtype):
            self.master_weights = MasterWeights(self.trainable, self.compute_dtype)
        self.num_trainable = sum(p.numel() for p in self.trainable)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        if config.method == "qlora" and self.device.type == "cpu":
            self._quantize_base_int8()
        # computing logits only at trained positions needs the plain "norm → lm_head" ending
        lm_config = self.causal_lm.config
        self._head_only_where_trained = not any(
            getattr(lm_config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        )

    def _quantize_base_int8(self) -> None:
        """QLoRA on a CPU: the frozen Linear weights of the decoder layers become int8 (training.int8_base)."""
        layers = decoder_layers(self.causal_lm)
        count = quantize_frozen_linears(layers if layers is not None else self.causal_lm,
                                        keep=self.causal_lm.get_output_embeddings())
        # The float weights replaced were read from the checkpoint's memory-mapped file, whose pages
        # stay resident while any tensor still maps it: the frozen weights left (embeddings, norms)
        # get their own memory so the file's mapping closes, and freed heap goes back to the system.
        for param in self.model.parameters():
            if not param.requires_grad:
                param.data = param.data.clone()
        trim_host_heap()
        if count == 0:
            raise TrainingError(f"QLoRA found no frozen Linear layer to quantize in {self.config.model}; use method: lora.")
        self._info(
            f"QLoRA on a CPU: the {count} frozen Linear layers of the base hold int8 weights (1 byte each; 4-bit "
            "needs CUDA), and their matmuls run in int8. The adapter trains in "
            f"{dtype_name(self.compute_dtype)} and is saved as a plain PEFT adapter."
        )

    def _compile_key(self) -> dict[str, Any]:
        """What makes two runs compile the same layers (the compile cost recorded for one holds for the other)."""
        config = self.config
        return {
            "model": self.causal_lm.config.to_dict(),
            "dtype": str(self.compute_dtype),
            "device": self.device.type,
            "method": config.method,
            "lora": [config.lora_rank, config.target_modules, config.lora_dropout > 0],
            "checkpointing": config.gradient_checkpointing,
            "torch": torch.__version__,
        }

    def _prepare_data(self) -> None:
        from mactuner.training.rows import prepare_units

        config = self.config
        if self.objective is not None:
            self._prepare_preference_data()
            return
        data = prepare_units(config, self.tokenizer, self._info, self._stage,
                             self._replay_examples if config.replay_rows else None)
        self.data_format = data.format
        self.train_units = data.train_units
        self.val_units = data.val_units
        self._plan_steps()

    def _prepare_preference_data(self) -> None:
        """Pairs (DPO, ORPO) or labelled answers (KTO) as units (see training.objectives)."""
        from mactuner.data import DatasetError, train_validation_split
        from mactuner.data.preference import load_preference_file

        config = self.config
        try:
            load = load_preference_file(config.dataset, config.objective, config.dataset_format)
        except DatasetError as error:
            raise TrainingError(f"The dataset cannot be used for {config.objective}: {error}") from error
        self._stage("tokenising", f"Tokenising {len(load.examples):,} {config.objective} rows of {Path(config.dataset).name}…")
        for problem in load.problems[:20]:
            self._info(f"Skipped a row: {problem}")
        if len(load.problems) > 20:
            self._info(f"… and {len(load.problems) - 20} more unusable rows ({len(load.problems)} in all).")
        if config.packing:
            self._info(f"packing is for sft: {config.objective} keeps each pair's sequences apart.")
        if config.objective == "kto" and config.batch_size < 2:
            raise TrainingError("KTO estimates its KL term from mismatched answers of a micro-batch: set batch_size to 2 or more.")
        train_examples, val_examples = train_validation_split(load.examples, config.val_fraction, config.seed)
        self.train_units, self.val_units, problems, dropped = self.objective.prepare(load, train_examples, val_examples)
        for problem in problems[:20]:
            self._info(f"Skipped a row: {problem}")
        if dropped:
            self._info(f"{dropped} rows have no answer token left after truncation to {config.max_length} tokens; raise max_length to keep them.")
        if not self.train_units:
            raise TrainingError(f"{config.dataset}: no usable training rows ({len(load.problems)} unusable).")
        self.data_format = load.format
        self._plan_steps()

    def _plan_steps(self) -> None:
        config = self.config
        self.global_batch = config.batch_size * config.grad_accum * self.dist.world_size
        self.steps_per_epoch = math.ceil(len(self.train_units) / self.global_batch)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.warmup_steps = (
            config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * self.total_steps)
        )
        self._plans: dict[int, list[list[int]]] = {}

    @property
    def _optimized(self) -> list[torch.Tensor]:
        """The tensors AdamW updates: the float32 master weights, or the weights themselves."""
        return self.master_weights.master if self.master_weights is not None else self.trainable

    def _build_optimizer(self) -> None:
        config = self.config
        # no weight decay on biases and norms (standard practice; LoRA has neither)
        decay = [p for p in self._optimized if p.ndim >= 2]
        no_decay = [p for p in self._optimized if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                           **adamw_options(self.device))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.total_steps, self.warmup_steps, config.lr_scheduler),
        )
        self._scaler = None
        if self.compute_dtype == torch.float16 and self.device.type in ("cuda", "mps"):
            # float16 gradients underflow without loss scaling
            self._scaler = torch.amp.GradScaler(self.device.type)

    def _restore(self, info: checkpoints.CheckpointInfo | None) -> None:
        """Load adapter, optimizer, scheduler, RNG and position from a checkpoint (every process)."""
        if info is None:
            raise TrainingError("Nothing to resume: no complete checkpoint.")
        state, tensors = checkpoints.load_checkpoint_state(info.path)
        if tensors.get("engine") == "mlx":
            raise TrainingError(f"{info.path.name} was written by the MLX engine: resume this run with engine: mlx.")
        checkpoints.load_adapter_weights(self.model, info.path)
        if self.master_weights is not None:
            saved = tensors.get("master") or [p.detach().float() for p in self.trainable]
            self.master_weights.load(saved)
        self.optimizer.load_state_dict(tensors["optimizer"])
        # the saved groups carry the saving device's implementation (fused on CUDA): use this device's
        for group in self.optimizer.param_groups:
            for key in ("fused", "foreach"):
                group[key] = self.optimizer.defaults.get(key)
        self.scheduler.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in tensors["rng"]:
            torch.cuda.set_rng_state(tensors["rng"]["cuda"], self.device)
        self.step = int(state["step"])
        self.micro_batch_size = int(state.get("micro_batch_size", self.config.batch_size))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.last_val_loss = state.get("val_loss")
        self._info(f"Resumed from {info.path.name} (step {self.step}).")

    # -- train

    def train(self) -> TrainResult:
        """Run optimizer steps until ``total_steps`` or a stop request; returns how it ended.

        Raises:
            NonFiniteLoss: the loss was not finite for ``NON_FINITE_STEPS`` steps in a row.
            OutOfMemory: even a micro-batch of one row does not fit.
        """
        if not self._set_up:
            self.setup()
        config = self.config
        restore_handler = self._install_sigterm()
        begin = {
            "step": self.step,
            "total_steps": self.total_steps,
            "message": (
                f"Training {config.model} ({config.method}, {self.num_trainable:,} of {self.num_parameters:,} "
                f"weights trainable) on {self.device} in {dtype_name(self.compute_dtype)}: "
                f"{len(self.train_units)} training units, {len(self.val_units)} validation, "
                f"{self.total_steps} steps of {self.global_batch}"
                + (f" rows ({config.batch_size} x {config.grad_accum} x {self.dist.world_size} processes)."
                   if self.dist.world_size > 1 else ".")
            ),
        }
        self._emit("on_train_begin", begin)
        self._info(begin["message"])
        if self.step < self.total_steps:
            self._stage("warming_up", f"Warming up: step {self.step + 1} of {self.total_steps} (the first one is the slowest)…")
        # throughput counts training time only, not evaluations or checkpoints
        report_tokens, report_seconds = 0, 0.0
        state = "finished"
        try:
            while self.step < self.total_steps:
                threads = self._threads.update() if self._threads is not None else None
                self._memory.start()
                self._compiler.before_step()
                started = time.perf_counter()
                outcome = self._compiler.run_step(self._train_step, self._zero_grad)
                seconds = time.perf_counter() - started
                report_seconds += seconds
                self._compiler.after_step(self.total_steps - self.step - 1, seconds, outcome.real_tokens)
                self.step += 1
                self.losses.append(outcome.loss)
                self.tokens_seen += outcome.real_tokens
                report_tokens += outcome.real_tokens
                if self.step % config.log_every == 0 or self.step == self.total_steps or outcome.skipped:
                    elapsed = report_seconds
                    record = {
                        "type": "train",
                        "step": self.step,
                        "total_steps": self.total_steps,
                        "epoch": round(self.step / self.steps_per_epoch, 4),
                        "loss": outcome.loss,
                        "lr": outcome.lr,
                        "grad_norm": outcome.grad_norm,
                        "tokens_per_second": report_tokens / elapsed if elapsed > 0 else 0.0,
                        "tokens": self.tokens_seen,
                        "memory_bytes": self._note_peak(self._memory.read()),
                        "memory_kind": self._memory.kind,
                        # CUDA: the allocator's reservation and the process's whole use (context included)
                        "memory_reserved_bytes": self._memory.reserved,
                        "memory_process_bytes": self._memory.process,
                        # under torchrun: each process's peak (as of its previous report)
                        "memory_bytes_per_rank": self._rank_memory,
                        "micro_batch_size": self.micro_batch_size,
                        "cpu_threads": threads,
                        "time": time.time(),
                    }
                    if outcome.skipped:
                        record["skipped"] = True
                    if self.objective is not None:
                        record.update(self.objective.pop_stats())
                    self._emit("on_train_report", record)
                    report_tokens, report_seconds = 0, 0.0
                self._check_finite(outcome)
                last = self.step == self.total_steps
                stopping = self._agree_to_stop()
                if self.val_units and ((config.eval_every and self.step % config.eval_every == 0) or last):
                    self.last_val_loss = self.evaluate()
                    self._emit("on_eval_report", {"type": "eval", "step": self.step, "val_loss": self.last_val_loss,
                                                  **self.eval_extras, "time": time.time()})
                if (config.save_every and self.step % config.save_every == 0) or last or stopping:
                    self._save_checkpoint()
                if stopping:
                    state = "cancelled"
                    break
            if self.step >= self.total_steps:
                state = "finished"
                adapter = self._save_final()
                forgetting = self._check_forgetting()
            else:
                adapter = forgetting = None
        finally:
            restore_handler()
        if state == "finished":
            message = f"Finished: {self.step} steps"
            if self.losses:
                message += f", final loss {self.losses[-1]:.4f}"
            if self.last_val_loss is not None:
                message += f", validation loss {self.last_val_loss:.4f}"
            message += "."
            if forgetting:
                message += " " + forgetting
        else:
            message = f"Stopped at step {self.step} of {self.total_steps}; a checkpoint was saved, resume to continue."
        self._end(state, message)
        return TrainResult(
            state=state,
            step=self.step,
            total_steps=self.total_steps,
            train_loss=self.losses[-1] if self.losses else None,
            val_loss=self.last_val_loss,
            run_dir=self.run_dir,
            adapter_path=adapter,
            micro_batch_size=self.micro_batch_size,
            losses=list(self.losses),
            message=message,
            peak_memory_bytes=self.peak_memory_bytes,
            memory_kind=self._memory.kind,
        )

    def _base_key(self) -> dict[str, Any]:
        """What makes two runs' base models answer alike (their cached base answers are shared)."""
        return {"model": str(self.model_path), "dtype": str(self.compute_dtype), "device": self.device.type,
                "method": self.config.method, "torch": torch.__version__}

    def _replay_examples(self) -> list:
        """``replay_rows`` general questions answered by the base model itself (:mod:`mactuner.evaluation.replay`);
        the adapter is still at its zero start, so the model answers as the base does."""
        from mactuner.training.rows import replay_rows

        return replay_rows(self.config.replay_rows, self.model, self.tokenizer, self._base_key(), self._info, self._stage)

    def _check_forgetting(self) -> str | None:
        """After the last step: what the tuned model kept of what the base model knew (``RUN/forgetting.json``,
        :mod:`mactuner.evaluation.forgetting`); its headline, or None when not checked. Never fails the run."""
        if self.run_dir is None or self.dist.enabled or not self.config.forgetting_check:
            return None
        from mactuner.evaluation.forgetting import end_of_run_check

        return end_of_run_check(self.model, self.tokenizer, self.run_dir, base_key=self._base_key(),
                                peft=self.config.method != "full", info=self._info, stage=self._stage,
                                eager=LayerCompiler.eager())

    def _note_peak(self, value: int) -> int:
        self.peak_memory_bytes = max(self.peak_memory_bytes or 0, value)
        self._last_memory = value
        return value

    def _check_finite(self, outcome: StepOutcome) -> None:
        """Count skipped steps in a row; stop the run when there are ``NON_FINITE_STEPS`` of them."""
        if not outcome.skipped:
            self._non_finite = []
            return
        self._non_finite.append(self.step)
        self._info(
            f"Step {self.step}: the loss is not a finite number ({outcome.loss}); the update was skipped "
            f"({len(self._non_finite)} of {NON_FINITE_STEPS} in a row before the run stops)."
        )
        if len(self._non_finite) < NON_FINITE_STEPS:
            return
        dtype = dtype_name(self.compute_dtype)
        if self.compute_dtype == torch.float16:
            advice = (
                "The model overflows float16: train in bfloat16 (dtype: bfloat16) where the device supports it, "
                "or in float32 (dtype: float32)."
            )
        elif self.compute_dtype == torch.bfloat16:
            advice = "Train in float32 (dtype: float32), or lower the learning rate."
        else:
            advice = "Lower the learning rate or set max_grad_norm, and check the dataset for broken rows."
        first = self._non_finite[0]
        raise NonFiniteLoss(
            f"Stopped at step {self.step}: the loss was not a finite number for {NON_FINITE_STEPS} steps in a row "
            f"(steps {first}–{self.step}, computing in {dtype}), so those steps were skipped and nothing was learned "
            f"from them. {advice} The weights are as after step {first - 1}."
        )

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            # KTO's batches must mix its labels (its KL estimate pairs answers of a micro-batch), and
            # length grouping would sort the (often longer) good answers away from the bad ones
            grouped = (not self.config.packing or self.objective is not None) and self.config.objective != "kto"
            self._plans = {epoch: plan_epoch(self.train_units, self.global_batch, self.config.seed, epoch, grouped)}
        return self._plans[epoch]

    def _train_step(self) -> StepOutcome:
        """One optimizer step over the global batch for ``self.step``; halves the micro-batch on OOM."""
        epoch, index = divmod(self.step, self.steps_per_epoch)
        global_batch = [self.train_units[i] for i in self._plan(epoch)[index]]
        # every process knows the whole global batch, so the normaliser and the token count need no communication
        trained_tokens = sum(u.trained_tokens for u in global_batch)
        real_tokens = sum(len(u.input_ids) for u in global_batch)
        # this process's share: interleaved so that each gets similar lengths
        mine = global_batch[self.dist.rank :: self.dist.world_size]
        rng_state = torch.get_rng_state()
        oom_message = "another process ran out of memory"
        while True:
            if self.objective is not None:
                self.objective.begin_step(global_batch)
            try:
                loss_sum = self._accumulate(mine, trained_tokens)
                failed = False
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                failed = True
                loss_sum = None
                # keep the words only: the exception's traceback would keep the step's tensors alive
                oom_message = str(error).split("\n")[0]
            # one all-reduce per step carries the gradients, the loss and what every process must agree
            # on (an out-of-memory here, a stop request there); one read of the device gets them all
            loss_sum, flags = self._all_reduce_step(loss_sum, failed)
            # (a float16 scaler unscales once per step: its norm waits until the step is known to stand)
            grad_norm = self._grad_norm() if self._scaler is None and not failed else None
            parts = [loss_sum.float().reshape(1)]
            if grad_norm is not None:
                parts.append(grad_norm.float().reshape(1).to(loss_sum.device))
            if flags is not None:
                parts.append(flags)
            values = torch.cat(parts).tolist()
            loss_value = values[0]
            norm_value = values[1] if grad_norm is not None else None
            if flags is not None:
                agreed = values[-len(flags):]
                failed, self._stop_agreed = agreed[0] > 0, agreed[1] > 0
                self._rank_memory = [int(v) for v in agreed[2:]]
            if not failed:
                break
            self._zero_grad()
            loss_sum = None
            empty_device_cache(self.device)
            if self.micro_batch_size == 1:
                raise OutOfMemory(
                    f"Out of memory on {self.device} even with a micro-batch of 1 row "
                    f"({self.config.max_length} tokens max). Lower max_length, turn on gradient_checkpointing, "
                    + ("use a smaller model or LoRA instead of full fine-tuning, " if self.config.method == "full" else "use a smaller model, ")
                    + "or close other programs using the device's memory."
                    + (f" ({oom_message})" if failed else "")
                )
            old = self.micro_batch_size
            self.micro_batch_size = max(1, old // 2)
            self._info(
                f"Out of memory at step {self.step + 1} with a micro-batch of {old}: micro-batch halved to "
                f"{self.micro_batch_size}; the effective batch stays {self.global_batch} rows through gradient accumulation."
            )
            # the retried step draws the same dropout masks as a step that fitted
            torch.set_rng_state(rng_state)

        lr = self.scheduler.get_last_lr()[0]
        if norm_value is None:
            norm_value = float(self._grad_norm())
        loss = loss_value / max(1, trained_tokens)
        # a float16 scaler skips steps with infinite gradients itself (and lowers its scale)
        skipped = not math.isfinite(loss) or (self._scaler is None and not math.isfinite(norm_value))
        if skipped:
            # no update from a non-finite loss; the gradients are dropped below. The scaler's step still
            # ends: update() lowers the scale after the overflow and resets unscale_()'s per-step record
            # (without it the next step's unscale_() raises "already been called ... since the last update()")
            if self._scaler is not None:
                self._scaler.update()
        elif self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        # the schedule follows the step count either way
        self.scheduler.step()
        if self.master_weights is not None and not skipped:
            self.master_weights.copy_to_model()
        if self.objective is not None and not skipped:
            self.objective.end_step()
        self._memory_sample()  # the optimizer's state is allocated at its first step
        # flush the gradients as soon as we can, no need for this memory anymore
        self._zero_grad()
        return StepOutcome(loss=loss, grad_norm=norm_value, real_tokens=real_tokens, lr=lr, skipped=skipped)

    def _grad_norm(self) -> torch.Tensor:
        """Unscale (float16) and clip the summed gradients; returns their norm as a device tensor (no sync)."""
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            return torch.nn.utils.clip_grad_norm_(self._optimized, self.config.max_grad_norm)
        grads = [p.grad for p in self._optimized if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.trainable:
            p.grad = None

    def _accumulate(self, units: list[Unit], trained_tokens: int) -> torch.Tensor:
        """Forward and backward over ``units`` in micro-batches; gradients add up in ``.grad``.

        Returns the summed loss as a float32 tensor on the device (read by the caller, once per step).
        """
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        for start in range(0, len(units), self.micro_batch_size):
            chunk = units[start : start + self.micro_batch_size]
            if self.objective is not None:
                batch, loss_sum = None, self.objective.loss_sum(chunk)
            else:
                batch = collate(chunk, self.pad_id, self.device)
                loss_sum = self._loss_sum(batch)
            # the activations are all alive here: the step's memory peak
            self._memory_sample()
            # dividing by the global batch's trained tokens (not this micro-batch's mean) makes
            # the sum of the gradients over micro-batches and processes the exact gradient
            loss = loss_sum / trained_tokens
            if self._scaler is not None:
                loss = self._scaler.scale(loss)
            loss.backward()
            self._memory_sample()
            if self.master_weights is not None:
                self.master_weights.collect_gradients()
            loss_total += loss_sum.detach()
            del batch, chunk, loss_sum, loss
        return loss_total

    def _memory_sample(self) -> None:
        memory = getattr(self, "_memory", None)
        if memory is not None:
            memory.sample()

    def _loss_sum(self, batch: MicroBatch) -> torch.Tensor:
        """Summed cross-entropy over the batch's trained tokens (float32)."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.compute_dtype) if self._autocast else contextlib.nullcontext()
        )
        positions = batch.positions
        with autocast:
            if not self._head_only_where_trained:
                logits = self.causal_lm(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
                trained = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
                return F.cross_entropy(trained.float(), batch.targets, reduction="sum")
            backbone = self.causal_lm.base_model
            hidden = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)[0]
            # the next token is predicted only where it is trained: the LM head runs there alone
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
            head = self.causal_lm.get_output_embeddings()
            if type(head) is torch.nn.Linear and head.bias is None:
                weight = head.weight if not self._autocast else head.weight.to(self.compute_dtype)
                return linear_cross_entropy(hidden.to(weight.dtype), weight, batch.targets, LOSS_CHUNK_TOKENS,
                                            fused=self._compiler.compiled)
            # an adapted head (LoRA on lm_head): the plain route
            return F.cross_entropy(head(hidden).float(), batch.targets, reduction="sum")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per trained token over the validation units (all processes together)."""
        if not self.val_units:
            return None
        self.model.eval()
        units = sorted(self.val_units, key=lambda u: len(u.input_ids))
        mine = units[self.dist.rank :: self.dist.world_size]
        if self.objective is not None:
            return self._evaluate_preferences(mine)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        count = 0
        # compiled layers would compile again for no_grad: evaluation runs them eagerly
        with LayerCompiler.eager():
            for start in range(0, len(mine), self.micro_batch_size):
                chunk = mine[start : start + self.micro_batch_size]
                total += self._loss_sum(collate(chunk, self.pad_id, self.device))
                count += sum(u.trained_tokens for u in chunk)
        self.model.train()
        stats = torch.stack([total, torch.tensor(float(count), device=self.device)])
        self.dist.sum_(stats)
        loss_sum, tokens = stats.tolist()
        return loss_sum / max(1.0, tokens)

    def _evaluate_preferences(self, mine: list) -> float:
        """Validation loss per row; the held-out rewards and accuracy go to ``self.eval_extras``."""
        from mactuner.training.objectives import stats_means

        with LayerCompiler.eager():
            stats = self.objective.evaluate(mine, self.micro_batch_size)
        self.model.train()
        keys = sorted(stats)
        flat = torch.cat([stats[k].reshape(-1).float() for k in keys])
        self.dist.sum_(flat)
        summed = dict(zip(keys, flat.reshape(len(keys), 2)))
        loss_sum, rows = summed.pop("loss_sum").tolist()
        self.eval_extras = {f"val_{k}": v for k, v in stats_means(summed).items()}
        return loss_sum / max(1.0, rows)

    # -- distributed helpers

    def _agree_to_stop(self) -> bool:
        """Whether to stop after this step: every process saw the same answer in the step's all-reduce."""
        if not self.dist.enabled:
            return self._stop.is_set()
        return self._stop_agreed

    def _all_reduce_step(self, loss_sum: torch.Tensor | None, failed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sum the step's gradients, loss and flags over processes: one flat all-reduce per optimizer step.

        Returns:
            The summed loss (a zero when this process ran out of memory) and the summed flags
            ``[processes out of memory, processes asked to stop, each process's last peak memory…]``
            (every process fills its own slot of the last); None when training alone.
        """
        if loss_sum is None:
            loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        if not self.dist.enabled:
            return loss_sum, None
        stop = self._stop.is_set()
        params = self._optimized
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flags = torch.zeros(2 + self.dist.world_size, dtype=torch.float32)
        flags[0], flags[1] = float(failed), float(stop)
        flags[2 + self.dist.rank] = float(self._last_memory or 0)
        flags = flags.to(loss_sum.device)
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads] + [loss_sum.reshape(1).float(), flags])
        self.dist.sum_(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            # float32 weights take views of the buffer (no copy); 16-bit ones a cast
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[offset], flat[offset + 1 :]

    # -- saving

    def _master_weights_in_model(self):
        """Let the model hold the float32 master weights while it is saved (nothing runs meanwhile)."""
        return self.master_weights.in_model() if self.master_weights is not None else contextlib.nullcontext()

    def _save_checkpoint(self) -> None:
        if self.run_dir is None:
            return
        if self.dist.is_main:
            rng = {"torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            with self._master_weights_in_model():
                info = self._write_checkpoint(rng)
            checkpoints.prune_checkpoints(self.run_dir, self.config.keep_last)
            self._emit("on_checkpoint", {"step": self.step, "path": str(info.path), "loss": info.loss, "val_loss": info.val_loss})
        self.dist.barrier()

    def _write_checkpoint(self, rng: dict[str, Any]) -> checkpoints.CheckpointInfo:
        tensors = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng}
        if self.master_weights is not None:
            tensors["master"] = self.master_weights.master
        return checkpoints.save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            tokenizer=self.tokenizer,
            state={
                "step": self.step,
                "total_steps": self.total_steps,
                "epoch": self.step / self.steps_per_epoch,
                "loss": self.losses[-1] if self.losses else None,
                "val_loss": self.last_val_loss,
                "micro_batch_size": self.micro_batch_size,
                "tokens_seen": self.tokens_seen,
                "method": self.config.method,
                "model": self.config.model,
            },
            tensors=tensors,
        )

    def _save_final(self) -> Path | None:
        if self.run_dir is None:
            return None
        target = self.run_dir / checkpoints.ADAPTER_DIR
        if self.dist.is_main:

            def write(folder: Path) -> None:
                self.model.save_pretrained(folder, safe_serialization=True)
                self.tokenizer.save_pretrained(folder)

            with self._master_weights_in_model():
                checkpoints.write_folder_atomically(target, write)
        self.dist.barrier()
        return target

    # -- signals and reporting

    def _install_sigterm(self):
        """SIGTERM → stop after the current step (with a checkpoint). Returns the undo function."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def _emit(self, method: str, info: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        for callback in self.callbacks:
            getattr(callback, method)(info)

    def _info(self, message: str) -> None:
        self._emit("on_info", {"type": "info", "message": message, "time": time.time()})

    def _stage(self, stage: str, message: str) -> None:
        """A start-up stage: an ``info`` record with ``stage``, and the status message."""
        self._emit("on_info", {"type": "info", "stage": stage, "message": message, "time": time.time()})

    def _end(self, state: str, message: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._emit("on_train_end", {"state": state, "step": self.step, "message": message})

    def _record_failure(self, error: BaseException) -> None:
        """Tell the callbacks (and so status.json) that the run failed, once; a busy folder is left untouched."""
        if isinstance(error, (RunFolderBusy, RunFolderNotOurs)):
            return
        self._end("failed", _describe(error))

    def cleanup(self) -> None:
        """Leave the process group and release the run folder (the model stays for inspection)."""
        self.dist.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def adamw_options(device: torch.device) -> dict[str, Any]:
    """AdamW's implementation for ``device``: on CUDA the fused kernel (one launch for every
    tensor; GradScaler supports it too, so float16 runs keep it), elsewhere torch's default."""
    return {"fused": True} if device.type == "cuda" else {}


def _checkpoint_dtype(config: TrainConfig) -> torch.dtype | None:
    """The dtype the model's weights are stored in (config.json), where it says; None otherwise."""
    from mactuner.models import ModelSourceError, load_config

    try:
        stored = getattr(load_config(config.model, trust_remote_code=config.trust_remote_code), "dtype", None)
    except ModelSourceError:
        return None
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


def _device_type(device: str | None) -> str:
    if device:
        return device.split(":")[0]
    return resolve_device(None).type


def _describe(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "Interrupted."
    return f"{type(error).__name__}: {error}" if not isinstance(error, TrainingError) else str(error)


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    callbacks: Iterable[TrainingCallback] = (),
    resume: bool = False,
    verbose: bool = False,
) -> TrainResult:
    """Train with ``config`` (see :class:`Trainer`); returns how it ended."""
    return Trainer(config, run_dir, callbacks, resume, verbose).run()
