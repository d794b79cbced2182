"""The trainer: LoRA, QLoRA and full fine-tuning of a causal LM, one readable loop.

``Trainer(config, run_dir).run()`` goes setup → train → cleanup:

- **setup** loads the model in the device's precision, wraps it (LoRA / QLoRA) or
  not (full), tokenizes and splits the data, plans the batches, builds AdamW and
  the schedule, and restores the last checkpoint when resuming.
- **train** runs optimizer steps. Each step is a fixed *global batch* of rows,
  cut into micro-batches (and across processes under ``torchrun``). The loss is
  the sum over every trained token divided by the number of trained tokens in
  the whole global batch, so the gradient is the same however the batch is cut:
  one process or two, micro-batch 4 or 1 after an out-of-memory back-off.
- **cleanup** writes the final adapter (``RUN/adapter``, a standard PEFT folder)
  and the final state.

Precision. Frozen base weights are held in the device's compute dtype
(``get_optimal_dtype``: bfloat16 on this CPU, ~3.7x faster matmuls than float32).
The adapter computes in that dtype too, but AdamW updates float32 *master*
copies of its weights, copied back after each step: a small update added to a
bfloat16 number (8 bits of mantissa) would vanish. (Keeping the adapter itself
in float32 would make every adapted layer keep a float32 copy of its input for
the backward pass: a quarter more activation memory and slower.) Gradients are
summed over micro-batches in float32. Checkpoints and the final adapter hold
the float32 master weights. Full fine-tuning keeps float32 weights and runs
the forward pass under autocast for the same reason. The cross-entropy is
computed in float32.

No padding waste. Rows of similar length are grouped into the same micro-batch
(or, with ``packing``, several rows share one sequence with position ids that
restart, which transformers turns into a block-diagonal mask). Batches are
right-padded and run without an attention mask: under a causal mask a real
token never sees the padding after it, so the fast causal attention path is
exact. Logits are computed only where a token is trained (the LM head over the
49k-token vocabulary is the largest single matrix of a small model).

Progress goes to callbacks (:class:`TrainingCallback`, mlx-lm style) and, when a
run folder is given, to ``RUN/metrics.jsonl`` and ``RUN/status.json`` (see
ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from mactuner import checkpoints
from mactuner.cpu_threads import CpuThreads
from mactuner.config import TrainConfig
from mactuner.devices import (  # noqa: F401 - is_out_of_memory, memory_in_use re-exported
    empty_device_cache,
    get_optimal_dtype,
    is_out_of_memory,
    memory_in_use,
    resolve_device,
)

IGNORE_INDEX = -100
# rows are shuffled, then sorted by length inside windows of this many global
# batches: batches hold similar lengths while the order stays random
_GROUPING_WINDOW = 64


class TrainingError(Exception):
    """Training cannot start or go on; the message says why and what to do."""


class OutOfMemory(TrainingError):
    """Even a micro-batch of one row does not fit in the device's memory."""


# --- progress ---------------------------------------------------------------


class TrainingCallback:
    """Receives progress. Override what you need; every method gets a plain dict.

    ``on_train_report`` gets the ``train`` record of metrics.jsonl (step, total_steps,
    epoch, loss, lr, grad_norm, tokens_per_second, tokens, memory_bytes, time),
    ``on_eval_report`` the ``eval`` record (step, val_loss, time), ``on_info`` an
    ``info`` record (message, time), ``on_checkpoint`` the saved checkpoint
    (step, path, loss, val_loss).
    """

    def on_train_begin(self, info: dict[str, Any]) -> None: ...

    def on_train_report(self, info: dict[str, Any]) -> None: ...

    def on_eval_report(self, info: dict[str, Any]) -> None: ...

    def on_info(self, info: dict[str, Any]) -> None: ...

    def on_checkpoint(self, info: dict[str, Any]) -> None: ...

    def on_train_end(self, info: dict[str, Any]) -> None: ...


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunFolderWriter(TrainingCallback):
    """Writes ``metrics.jsonl`` (one JSON record per line) and ``status.json`` of a run folder."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.status: dict[str, Any] = {
            "state": "running",
            "pid": os.getpid(),
            "step": 0,
            "total_steps": None,
            "started_at": time.time(),
            "updated_at": time.time(),
            "message": "Starting…",
        }
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def write_status(self, **changes: Any) -> None:
        self.status.update(changes, updated_at=time.time())
        write_json_atomic(self.run_dir / "status.json", self.status)

    def _append(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def on_train_begin(self, info):
        self.write_status(step=info["step"], total_steps=info["total_steps"], message=info["message"])

    def on_train_report(self, info):
        self._append(info)
        self.write_status(step=info["step"], total_steps=info["total_steps"], message=f"Step {info['step']}/{info['total_steps']}")

    def on_eval_report(self, info):
        self._append(info)

    def on_info(self, info):
        self._append(info)

    def on_train_end(self, info):
        self.write_status(state=info["state"], step=info["step"], message=info["message"])
        self._metrics.close()


class _PrintProgress(TrainingCallback):
    """One line per report on stdout (it lands in RUN/log.txt for background runs)."""

    def on_train_report(self, info):
        print(
            f"step {info['step']}/{info['total_steps']}  loss {info['loss']:.4f}  lr {info['lr']:.2e}  "
            f"grad_norm {info['grad_norm']:.3f}  {info['tokens_per_second']:.0f} tok/s  "
            f"mem {info['memory_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )

    def on_eval_report(self, info):
        print(f"step {info['step']}  val_loss {info['val_loss']:.4f}", flush=True)

    def on_info(self, info):
        print(info["message"], flush=True)

    def on_checkpoint(self, info):
        print(f"checkpoint {info['path']}", flush=True)

    def on_train_end(self, info):
        print(info["message"], flush=True)


# --- results ----------------------------------------------------------------


@dataclass
class TrainResult:
    """How a training ended."""

    state: str  # "finished" or "cancelled"
    step: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    run_dir: Path | None
    adapter_path: Path | None
    micro_batch_size: int
    losses: list[float] = field(default_factory=list)  # per step, this process's session only
    message: str = ""


# --- out of memory ------------------------------------------------------------


# --- batches ----------------------------------------------------------------


@dataclass
class Unit:
    """What fills one row of a micro-batch: a tokenized row, or several packed together."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None  # only when packed: restarts at 0 for each row

    @property
    def trained_tokens(self) -> int:
        # the first label is never predicted (nothing comes before it)
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def make_units(rows: list[dict[str, list[int]]], packing: bool, max_length: int, seed: int) -> list[Unit]:
    """Rows as units; with ``packing``, rows shuffled and packed first-fit into sequences of ``max_length``."""
    if not packing:
        return [Unit(list(r["input_ids"]), list(r["labels"]), None) for r in rows]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    # first-fit decreasing over the shuffled rows: few, nearly full sequences
    order.sort(key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    units = []
    for b in bins:
        ids, labels, positions = [], [], []
        for i in b:
            row_labels = list(rows[i]["labels"])
            # a row's first token must not be learned from the previous row's last
            row_labels[0] = IGNORE_INDEX
            ids += rows[i]["input_ids"]
            labels += row_labels
            positions += range(len(rows[i]["input_ids"]))
        units.append(Unit(ids, labels, positions))
    return units


def plan_epoch(units: list[Unit], global_batch: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The global batches of one epoch, as lists of unit indices; the same for every process.

    Units are shuffled by ``seed`` and ``epoch``; when grouping, they are sorted
    by length within windows of global batches, and the batches shuffled again,
    so each batch holds similar lengths in a random order of batches.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(units)))
    rng.shuffle(order)
    if group_by_length:
        window = global_batch * _GROUPING_WINDOW
        grouped = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk.sort(key=lambda i: -len(units[i].input_ids))
            grouped += chunk
        order = grouped
    batches = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [rows, length], right-padded
    position_ids: torch.Tensor | None
    loss_mask: torch.Tensor  # [rows, length-1] bool: positions whose next token is trained
    targets: torch.Tensor  # [trained tokens] the trained next tokens, in order
    real_tokens: int  # non-padding tokens


def collate(units: list[Unit], pad_id: int, device: torch.device) -> MicroBatch:
    """Right-pad units into one micro-batch on ``device``."""
    length = max(len(u.input_ids) for u in units)
    ids = torch.full((len(units), length), pad_id, dtype=torch.long)
    labels = torch.full((len(units), length), IGNORE_INDEX, dtype=torch.long)
    positions = None
    if units[0].position_ids is not None:
        # padding continues as one more "row" so it never joins a real one
        positions = torch.zeros((len(units), length), dtype=torch.long)
    for r, u in enumerate(units):
        n = len(u.input_ids)
        ids[r, :n] = torch.tensor(u.input_ids)
        labels[r, :n] = torch.tensor(u.labels)
        if positions is not None:
            positions[r, :n] = torch.tensor(u.position_ids)
            positions[r, n:] = torch.arange(length - n)
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return MicroBatch(
        input_ids=ids.to(device),
        position_ids=None if positions is None else positions.to(device),
        loss_mask=mask.to(device),
        targets=shifted[mask].to(device),
        real_tokens=sum(len(u.input_ids) for u in units),
    )


# --- the loss -------------------------------------------------------------------

# trained tokens per chunk of the fused LM-head loss: 1024 x 49k vocabulary x 4 bytes = 200 MB at most
LOSS_CHUNK_TOKENS = 1024


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    The logits of a small model's 49k-token vocabulary are its largest activation
    (float32 logits, their softmax and its gradient: ~0.6 MB per trained token).
    With a frozen LM head the only gradient needed is the hidden states', so each
    chunk's gradient is computed right away in the forward pass and its logits
    freed: memory stays at one chunk, and no FLOP is spent twice.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.T).float()
            log_z = torch.logsumexp(logits, dim=-1)
            total += (log_z - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad:
                # d(sum of losses)/d(logits) = softmax - one_hot(target)
                probs = torch.exp(logits.sub_(log_z[:, None]))
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad_hidden[start : start + chunk] = probs.to(weight.dtype) @ weight
            del logits
        ctx.save_for_backward(grad_hidden if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None


# --- learning-rate schedule ---------------------------------------------------


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then decay to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- distributed --------------------------------------------------------------


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_type: str) -> _Distributed:
    """Join the process group when started by torchrun / accelerate launch (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if device_type == "cpu":
        # processes on one machine share its cores: do not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return _Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# --- the trainer ----------------------------------------------------------------


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
        self.model = None
        self.tokenizer = None
        self.micro_batch_size = config.batch_size
        self.step = 0
        self.losses: list[float] = []
        self.last_val_loss: float | None = None
        self.tokens_seen = 0
        self._writer: RunFolderWriter | None = None
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
            if self._writer is not None and self._writer.status.get("state") == "running":
                self._writer.write_status(state="failed", step=self.step, message=_describe(error))
            raise
        finally:
            self.cleanup()

    # -- setup

    def setup(self) -> None:
        """Load the model and data, build the optimizer; restore the last checkpoint when resuming."""
        config = self.config
        self.dist = _init_distributed(_device_type(config.device))
        device = resolve_device(config.device)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.compute_dtype = get_optimal_dtype(device) if config.dtype == "auto" else getattr(torch, config.dtype)

        if self.run_dir is not None and self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resume and checkpoints.latest_checkpoint(self.run_dir) is None:
                raise TrainingError(f"Nothing to resume in {self.run_dir}: it has no complete checkpoint.")
            if not self.resume and checkpoints.list_checkpoints(self.run_dir):
                raise TrainingError(f"{self.run_dir} already holds checkpoints: resume it (--resume) or pick a new run folder.")
            checkpoints.remove_staging(self.run_dir)
            config.save(self.run_dir / "config.yaml")
            self._writer = RunFolderWriter(self.run_dir)
            self.callbacks.insert(0, self._writer)
            self._writer.write_status(message="Loading the model…")
        if self.verbose and self.dist.is_main:
            self.callbacks.append(_PrintProgress())

        if not config.dataset:
            raise TrainingError("No dataset: set `dataset` to the path of a JSON, JSONL, CSV, Parquet or TXT file.")
        if config.method == "qlora" and device.type != "cuda":
            raise TrainingError(
                f"QLoRA needs an NVIDIA GPU (bitsandbytes 4-bit kernels run on CUDA only); this run is on {device}. "
                "Use method: lora instead: on a small model it fits in memory and trains at the same quality."
            )

        torch.manual_seed(config.seed)
        self._load_model()
        self._prepare_data()
        self._build_optimizer()
        if self.resume:
            self._restore(checkpoints.latest_checkpoint(self.run_dir) if self.run_dir is not None else None)
        else:
            # the adapter's initial weights used the seed; dropout starts from it too
            torch.manual_seed(config.seed)
        self._threads = CpuThreads() if device.type == "cpu" else None
        self._set_up = True

    def _load_model(self) -> None:
        config = self.config
        from mactuner.models import load_model

        self._autocast = False
        if config.method == "qlora":
            model, tokenizer = self._load_4bit()
        else:
            # full fine-tuning keeps float32 weights and autocasts (see the module docstring)
            weights_dtype = torch.float32 if config.method == "full" else self.compute_dtype
            self._autocast = config.method == "full" and self.compute_dtype != torch.float32
            loaded = load_model(
                config.model, device=self.device, dtype=weights_dtype, trust_remote_code=config.trust_remote_code
            )
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
        # float32 master weights for an adapter computing in a 16-bit dtype (see the module docstring)
        self.master: list[torch.Tensor] | None = None
        if config.method != "full" and self.compute_dtype != torch.float32:
            self.master = [p.detach().float().clone() for p in self.trainable]
            for p in self.trainable:
                p.data = p.data.to(self.compute_dtype)
        self.num_trainable = sum(p.numel() for p in self.trainable)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        # computing logits only at trained positions needs the plain "norm → lm_head" ending
        lm_config = self.causal_lm.config
        self._head_only_where_trained = not any(
            getattr(lm_config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        )

    def _load_4bit(self):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise TrainingError(
                "QLoRA needs the bitsandbytes package: pip install bitsandbytes (CUDA only). "
                "Or use method: lora."
            ) from error
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from mactuner.models import DEFAULT_MODEL, default_model_path

        config = self.config
        path = str(default_model_path()) if config.model == DEFAULT_MODEL else config.model
        self.model_path = path
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=self.compute_dtype,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization,
            dtype=self.compute_dtype,
            device_map={"": self.device.index or 0},
            trust_remote_code=config.trust_remote_code,
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
        return model, tokenizer

    def _prepare_data(self) -> None:
        from mactuner.data import DatasetError, load_dataset_file, tokenize_examples, train_validation_split

        config = self.config
        try:
            load = load_dataset_file(config.dataset, config.dataset_format)
        except DatasetError as error:
            raise TrainingError(f"The dataset cannot be used: {error}") from error
        for problem in load.problems[:20]:
            self._info(f"Skipped a row: {problem}")
        if len(load.problems) > 20:
            self._info(f"… and {len(load.problems) - 20} more unusable rows ({len(load.problems)} in all).")
        train_examples, val_examples = train_validation_split(load.examples, config.val_fraction, config.seed)
        problems: list = []
        train_rows = tokenize_examples(train_examples, self.tokenizer, config.max_length, config.assistant_only_loss, problems)
        val_rows = tokenize_examples(val_examples, self.tokenizer, config.max_length, config.assistant_only_loss, problems)
        for problem in problems[:20]:
            self._info(f"Skipped a row: {problem}")

        def trained(rows):
            kept = [r for r in rows if any(x != IGNORE_INDEX for x in r["labels"][1:])]
            return kept, len(rows) - len(kept)

        train_rows, dropped_train = trained(train_rows)
        val_rows, dropped_val = trained(val_rows)
        if dropped_train + dropped_val:
            self._info(
                f"{dropped_train + dropped_val} rows have no trained token left after truncation to "
                f"{config.max_length} tokens and are left out; raise max_length to keep them."
            )
        if not train_rows:
            raise TrainingError(f"{config.dataset}: no usable training rows ({len(load.problems)} unusable).")
        self.data_format = load.format
        self.train_units = make_units(train_rows, config.packing, config.max_length, config.seed)
        self.val_units = make_units(val_rows, config.packing, config.max_length, config.seed)
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
        return self.master if self.master is not None else self.trainable

    def _build_optimizer(self) -> None:
        config = self.config
        # no weight decay on biases and norms (standard practice; LoRA has neither)
        decay = [p for p in self._optimized if p.ndim >= 2]
        no_decay = [p for p in self._optimized if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8)
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
        checkpoints.load_adapter_weights(self.model, info.path)
        if self.master is not None:
            saved = tensors.get("master") or [p.detach().float() for p in self.trainable]
            for m, p, value in zip(self.master, self.trainable, saved):
                m.copy_(value)
                p.data.copy_(m)
        self.optimizer.load_state_dict(tensors["optimizer"])
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
        """Run optimizer steps until ``total_steps`` or a stop request; returns how it ended."""
        if not self._set_up:
            self.setup()
        config = self.config
        restore_handler = self._install_sigterm()
        begin = {
            "step": self.step,
            "total_steps": self.total_steps,
            "message": (
                f"Training {config.model} ({config.method}, {self.num_trainable:,} of {self.num_parameters:,} "
                f"weights trainable) on {self.device} in {str(self.compute_dtype).removeprefix('torch.')}: "
                f"{len(self.train_units)} training units, {len(self.val_units)} validation, "
                f"{self.total_steps} steps of {self.global_batch}."
            ),
        }
        self._emit("on_train_begin", begin)
        self._emit("on_info", {"type": "info", "message": begin["message"], "time": time.time()})
        # throughput counts training time only, not evaluations or checkpoints
        report_tokens, report_seconds = 0, 0.0
        state = "finished"
        try:
            while self.step < self.total_steps:
                threads = self._threads.update() if self._threads is not None else None
                started = time.perf_counter()
                loss, grad_norm, real_tokens = self._train_step()
                report_seconds += time.perf_counter() - started
                self.step += 1
                self.losses.append(loss)
                self.tokens_seen += real_tokens
                report_tokens += real_tokens
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    elapsed = report_seconds
                    self._emit(
                        "on_train_report",
                        {
                            "type": "train",
                            "step": self.step,
                            "total_steps": self.total_steps,
                            "epoch": round(self.step / self.steps_per_epoch, 4),
                            "loss": loss,
                            "lr": self.scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm,
                            "tokens_per_second": report_tokens / elapsed if elapsed > 0 else 0.0,
                            "tokens": self.tokens_seen,
                            "memory_bytes": memory_in_use(self.device),
                            "micro_batch_size": self.micro_batch_size,
                            "cpu_threads": threads,
                            "time": time.time(),
                        },
                    )
                    report_tokens, report_seconds = 0, 0.0
                last = self.step == self.total_steps
                stopping = self._agree_to_stop()
                if self.val_units and ((config.eval_every and self.step % config.eval_every == 0) or last):
                    self.last_val_loss = self.evaluate()
                    self._emit("on_eval_report", {"type": "eval", "step": self.step, "val_loss": self.last_val_loss, "time": time.time()})
                if (config.save_every and self.step % config.save_every == 0) or last or stopping:
                    self._save_checkpoint()
                if stopping:
                    state = "cancelled"
                    break
            if self.step >= self.total_steps:
                state = "finished"
                adapter = self._save_final()
            else:
                adapter = None
        finally:
            restore_handler()
        if state == "finished":
            message = f"Finished: {self.step} steps"
            if self.losses:
                message += f", final loss {self.losses[-1]:.4f}"
            if self.last_val_loss is not None:
                message += f", validation loss {self.last_val_loss:.4f}"
            message += "."
        else:
            message = f"Stopped at step {self.step} of {self.total_steps}; a checkpoint was saved, resume to continue."
        self._emit("on_train_end", {"state": state, "step": self.step, "message": message})
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
        )

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {
                epoch: plan_epoch(self.train_units, self.global_batch, self.config.seed, epoch, not self.config.packing)
            }
        return self._plans[epoch]

    def _train_step(self) -> tuple[float, float, int]:
        """One optimizer step over the global batch for ``self.step``; halves the micro-batch on OOM."""
        epoch, index = divmod(self.step, self.steps_per_epoch)
        global_batch = [self.train_units[i] for i in self._plan(epoch)[index]]
        # every process knows the whole global batch, so the normaliser needs no communication
        trained_tokens = sum(u.trained_tokens for u in global_batch)
        # this process's share: interleaved so that each gets similar lengths
        mine = global_batch[self.dist.rank :: self.dist.world_size]
        rng_state = torch.get_rng_state()
        while True:
            try:
                loss_sum, real_tokens = self._accumulate(mine, trained_tokens)
                failed = False
            except Exception as error:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                if not is_out_of_memory(error):
                    raise
                failed = True
                # keep the words only: the exception's traceback would keep the step's tensors alive
                oom_message = str(error).split("\n")[0]
            # all processes must agree before the gradient all-reduce, or one would wait forever
            if not self._any_process(failed):
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

        stats = torch.tensor([loss_sum, float(real_tokens)], dtype=torch.float64)
        self._all_reduce_gradients(stats)
        loss = stats[0].item() / max(1, trained_tokens)
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._optimized, self.config.max_grad_norm).item()
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in self._optimized if p.grad is not None])
            ).item()
        if self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.master is not None:
            with torch.no_grad():
                for p, m in zip(self.trainable, self.master):
                    p.copy_(m)
        # flush the gradients as soon as we can, no need for this memory anymore
        self._zero_grad()
        return loss, grad_norm, int(stats[1].item())

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.trainable:
            p.grad = None

    def _move_gradients_to_master(self) -> None:
        """Add the 16-bit gradients of the last backward pass into the float32 master gradients."""
        if self.master is None:
            return
        for p, m in zip(self.trainable, self.master):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    def _accumulate(self, units: list[Unit], trained_tokens: int) -> tuple[float, int]:
        """Forward and backward over ``units`` in micro-batches; gradients add up in ``.grad``."""
        loss_total, real_tokens = 0.0, 0
        for start in range(0, len(units), self.micro_batch_size):
            batch = collate(units[start : start + self.micro_batch_size], self.pad_id, self.device)
            loss_sum = self._loss_sum(batch)
            # dividing by the global batch's trained tokens (not this micro-batch's mean) makes
            # the sum of the gradients over micro-batches and processes the exact gradient
            loss = loss_sum / trained_tokens
            if self._scaler is not None:
                loss = self._scaler.scale(loss)
            loss.backward()
            self._move_gradients_to_master()
            loss_total += loss_sum.item()
            real_tokens += batch.real_tokens
            del batch, loss_sum, loss
        return loss_total, real_tokens

    def _loss_sum(self, batch: MicroBatch) -> torch.Tensor:
        """Summed cross-entropy over the batch's trained tokens (float32)."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.compute_dtype) if self._autocast else contextlib.nullcontext()
        )
        with autocast:
            if not self._head_only_where_trained:
                logits = self.causal_lm(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
                return F.cross_entropy(logits[:, :-1][batch.loss_mask].float(), batch.targets, reduction="sum")
            backbone = self.causal_lm.base_model
            hidden = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)[0]
            # the next token is predicted only where it is trained: the LM head runs there alone
            hidden = hidden[:, :-1][batch.loss_mask]
            head = self.causal_lm.get_output_embeddings()
            if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
                weight = head.weight if not self._autocast else head.weight.to(self.compute_dtype)
                return ChunkedLinearCrossEntropy.apply(hidden.to(weight.dtype), weight, batch.targets, LOSS_CHUNK_TOKENS)
            # a trained (full fine-tuning) or adapted head: the plain route
            return F.cross_entropy(head(hidden).float(), batch.targets, reduction="sum")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per trained token over the validation units (all processes together)."""
        if not self.val_units:
            return None
        self.model.eval()
        units = sorted(self.val_units, key=lambda u: len(u.input_ids))
        mine = units[self.dist.rank :: self.dist.world_size]
        total, count = 0.0, 0
        for start in range(0, len(mine), self.micro_batch_size):
            chunk = mine[start : start + self.micro_batch_size]
            total += self._loss_sum(collate(chunk, self.pad_id, self.device)).item()
            count += sum(u.trained_tokens for u in chunk)
        self.model.train()
        stats = torch.tensor([total, float(count)], dtype=torch.float64)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.all_reduce(stats)
        return stats[0].item() / max(1.0, stats[1].item())

    # -- distributed helpers

    def _any_process(self, flag: bool) -> bool:
        if not self.dist.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _agree_to_stop(self) -> bool:
        return self._any_process(self._stop.is_set())

    def _all_reduce_gradients(self, stats: torch.Tensor) -> None:
        """Sum gradients (and ``stats``) over processes: one all-reduce per optimizer step.

        Done by hand rather than with DistributedDataParallel: with the loss already
        divided by the global token count, a plain sum is the exact gradient, and one
        flat buffer per step is all a few million adapter weights need.
        """
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        params = self._optimized
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        # loss sums and token counts in float64: exact counts, comparable losses
        dist.all_reduce(stats)

    # -- saving

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
        self._barrier()

    def _write_checkpoint(self, rng: dict[str, Any]) -> checkpoints.CheckpointInfo:
        tensors = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng}
        if self.master is not None:
            tensors["master"] = self.master
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

    @contextlib.contextmanager
    def _master_weights_in_model(self):
        """Let the model hold the float32 master weights while it is saved (nothing runs meanwhile)."""
        if self.master is None:
            yield
            return
        for p, m in zip(self.trainable, self.master):
            p.data = m
        try:
            yield
        finally:
            for p, m in zip(self.trainable, self.master):
                p.data = m.to(self.compute_dtype)

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
        self._barrier()
        return target

    def _barrier(self) -> None:
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()

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

    def cleanup(self) -> None:
        """Release the process group (the model stays for inspection until the trainer is dropped)."""
        if getattr(self, "dist", None) is not None and self.dist.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


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
