"""The MLX engine: LoRA and QLoRA with Apple's MLX, writing the same run folder as the torch trainer.

Built on mlx-lm: the model comes from ``mlx_lm.utils.load_model`` (a local transformers
folder, safetensors), QLoRA quantizes it to 4 bits on load with ``mlx_lm.utils.quantize_model``
(or reads an MLX-quantized folder as it is), and the adapter layers are mlx-lm's
(``mlx_lm.tuner.utils.linear_to_lora_layers``). The optimizer is ``mlx.optimizers.AdamW``
(with bias correction, like torch's), gradients are clipped with
``mlx.optimizers.clip_grad_norm``. MacTuner drives the loop itself so that a run is the
same whichever engine trained it:

- the data are read, split, tokenized (chat template, ``assistant_only_loss``, max length)
  and batched by the very code of the torch trainer (:mod:`mactuner.training.rows`,
  :func:`~mactuner.training.batching.plan_epoch`): MLX gets the same token ids, in the same
  global batches, and the loss is the same sum over trained tokens divided by the global
  batch's trained tokens;
- ``RUN/status.json`` and ``RUN/metrics.jsonl`` come from the same
  :class:`~mactuner.training.callbacks.RunFolderWriter` (peak memory from MLX's own
  counter, ``mx.get_peak_memory``, reset at each report: ``memory_kind: mlx_peak``);
- checkpoints go through :func:`mactuner.checkpoints.save_checkpoint`: a PEFT adapter folder
  with mlx-lm's files in ``mlx/``, the optimizer state (AdamW moments and step) in
  ``training_state.pt``; resuming continues exactly (the dropout randomness is seeded per
  step, so it needs no saved state);
- ``RUN/adapter`` is a PEFT folder that ``peft.PeftModel.from_pretrained`` loads (mlx-lm's
  ``lora_a`` (in, r) and ``lora_b`` (r, out) are transposed into PEFT's ``lora_A.weight``
  (r, in) and ``lora_B.weight`` (out, r); mlx-lm's scale is PEFT's alpha / r), so merge,
  evaluation, chat and GGUF export work unchanged; ``RUN/adapter/mlx`` holds mlx-lm's own
  ``adapters.safetensors`` + ``adapter_config.json`` for MLX chat;
- SIGTERM (Cancel) stops after the step with a checkpoint, non-finite losses skip the step
  and ``NON_FINITE_STEPS`` in a row fail the run with the fix, out of memory halves the
  micro-batch and at one row fails with advice.

Precision: ``dtype: auto`` keeps the checkpoint's dtype (as mlx-lm does); float32, bfloat16
or float16 cast the base. The adapter weights and their optimizer state are float32.
Not supported (the run stops at once saying so): full fine-tuning and ``packing`` (mlx-lm's
models take no position ids, so packed rows would see each other).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mactuner import checkpoints, fingerprint
from mactuner.config import TrainConfig
from mactuner.data import IGNORE_INDEX
from mactuner.locks import LockBusy, RunLock
from mactuner.run_folder import NotARunFolder, check_run_folder, mark_run_folder
from mactuner.training.batching import Unit, plan_epoch
from mactuner.training.callbacks import PrintProgress, RunFolderWriter, TrainingCallback
from mactuner.training.errors import NonFiniteLoss, OutOfMemory, RunFolderBusy, RunFolderNotOurs, TrainingError
from mactuner.training.losses import lr_factor
from mactuner.training.mlx_support import MLX_INSTALL, mlx_installed
from mactuner.training.trainer import NON_FINITE_STEPS, StepOutcome, TrainResult

ENGINE = "mlx"
MLX_ADAPTER_DIR = "mlx"  # mlx-lm's own adapter files, inside a PEFT adapter folder
MLX_ADAPTER_FILE = "adapters.safetensors"
QLORA_BITS = 4
QLORA_GROUP_SIZE = 64
# micro-batches are padded to a multiple of this many tokens, so the compiled step sees few shapes
PAD_MULTIPLE = 32
MEMORY_KIND = "mlx_peak"  # mx.get_peak_memory since the report interval began
_OOM = re.compile(r"out of memory|outofmemory|insufficient memory|bad_alloc|maximum allowed buffer size|\[malloc", re.I)


def is_mlx_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is MLX running out of memory (Metal or host allocation)."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and bool(_OOM.search(str(error))))


def peft_key(mlx_key: str) -> str:
    """PEFT's name for an mlx-lm LoRA weight: ``model.layers.0.self_attn.q_proj.lora_a`` →
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    path, leaf = mlx_key.rsplit(".", 1)
    return f"base_model.model.{path}.{ {'lora_a': 'lora_A', 'lora_b': 'lora_B'}[leaf] }.weight"


def peft_state_dict(lora_weights: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm LoRA weights (name → mx.array) as PEFT's state dict (name → float32 torch tensor, transposed)."""
    import mlx.core as mx
    import numpy as np
    import torch

    out = {}
    for key, value in lora_weights.items():
        array = np.array(value.astype(mx.float32), copy=True)
        out[peft_key(key)] = torch.from_numpy(np.ascontiguousarray(array.T))
    return out


class MLXAdapterWriter:
    """Writes a run's adapter as a PEFT folder, with mlx-lm's own files in ``mlx/``.

    It has ``save_pretrained(folder, safe_serialization=True)``, so
    :func:`mactuner.checkpoints.save_checkpoint` and the final save treat it like a PEFT model.
    """

    def __init__(self, trainer: MLXTrainer):
        self.trainer = trainer

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True) -> None:
        import mlx.core as mx
        from peft import LoraConfig
        from safetensors.torch import save_file

        t = self.trainer
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = t.lora_weights()
        lora = LoraConfig(
            r=t.config.lora_rank,
            lora_alpha=t.config.lora_alpha,
            lora_dropout=t.config.lora_dropout,
            target_modules=sorted(t.lora_targets),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=t.config.model,
        )
        lora.save_pretrained(str(folder))
        save_file(peft_state_dict(weights), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        mlx_folder = folder / MLX_ADAPTER_DIR
        mlx_folder.mkdir(exist_ok=True)
        mx.save_safetensors(str(mlx_folder / MLX_ADAPTER_FILE), weights)
        from mactuner.fileio import write_json_atomic

        write_json_atomic(mlx_folder / "adapter_config.json", t.mlx_adapter_config())


class MLXTrainer:
    """Fine-tunes ``config.model`` with MLX; the same interface and run folder as
    :class:`~mactuner.training.trainer.Trainer` (see the module docstring).

    Args:
        config: the run's settings (``method``: lora or qlora).
        run_dir: the run folder; None trains without writing anything.
        callbacks: progress receivers, called in order.
        resume: continue from the last complete checkpoint in ``run_dir``.
        verbose: also print progress lines on stdout.
        reason: why this engine trains (said in the run's first info record).
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike | None = None,
        callbacks: Iterable[TrainingCallback] = (),
        resume: bool = False,
        verbose: bool = False,
        reason: str = "MLX, as asked (engine: mlx).",
    ):
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.callbacks = list(callbacks)
        self.verbose = verbose
        self.reason = reason
        self._stop = threading.Event()
        self.model = None
        self.tokenizer = None
        self.micro_batch_size = config.batch_size
        self.step = 0
        self.losses: list[float] = []
        self.last_val_loss: float | None = None
        self.tokens_seen = 0
        self.peak_memory_bytes: int | None = None
        self._lock: RunLock | None = None
        self._ended = False
        self._non_finite: list[int] = []
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
        self._take_run_lock()
        if self.run_dir is not None:
            if self.resume and checkpoints.latest_checkpoint(self.run_dir) is None:
                raise TrainingError(f"Nothing to resume in {self.run_dir}: it has no complete checkpoint.")
            if not self.resume and checkpoints.list_checkpoints(self.run_dir):
                raise TrainingError(f"{self.run_dir} already holds checkpoints: resume it (--resume) or pick a new run folder.")
            if self.resume:
                try:
                    fingerprint.check(self.run_dir, config)
                except fingerprint.FingerprintMismatch as error:
                    raise TrainingError(str(error)) from error
            checkpoints.remove_staging(self.run_dir)
            config.save(self.run_dir / "config.yaml")
            if not self.resume or not (self.run_dir / fingerprint.FINGERPRINT_FILE).exists():
                fingerprint.record(self.run_dir, config)
            self.callbacks.insert(0, RunFolderWriter(self.run_dir))
        if self.verbose:
            self.callbacks.append(PrintProgress())

        if not mlx_installed():
            raise TrainingError(f"The MLX engine needs mlx and mlx-lm: {MLX_INSTALL}; or set engine: torch.")
        if not config.dataset:
            raise TrainingError("No dataset: set `dataset` to the path of a JSON, JSONL, CSV, Parquet or TXT file.")
        if config.method == "full":
            raise TrainingError("The MLX engine trains LoRA and QLoRA adapters: for full fine-tuning set engine: torch.")
        if getattr(config, "objective", "sft") != "sft":
            raise TrainingError(
                f"The MLX engine trains supervised fine-tuning (objective: sft); {config.objective} runs on the PyTorch "
                "engine: set engine: torch."
            )
        if config.packing:
            raise TrainingError(
                "packing is not available with the MLX engine (its models take no position ids, so packed rows "
                "would see each other): set packing: false, or engine: torch."
            )
        self._info(f"Engine: {self.reason}")

        import mlx.core as mx

        if config.device == "cpu":
            mx.set_default_device(mx.cpu)
        self.device_name = str(mx.default_device())
        self._stage("loading", f"Loading {config.model} with MLX ({config.method} on {self.device_name})…")
        self._load_model()
        self._prepare_data()
        self._build_optimizer()
        if self.resume:
            self._restore(checkpoints.latest_checkpoint(self.run_dir) if self.run_dir is not None else None)
        self._set_up = True

    def _take_run_lock(self) -> None:
        """As the torch trainer: a folder of the person's own files is never written into; then the lock."""
        if self.run_dir is None:
            return
        try:
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

    def _model_folder(self) -> Path:
        """A local transformers folder for ``config.model`` (the default and .gguf files are converted once)."""
        from mactuner.models import ModelSourceError, model_path

        try:
            resolved, path = model_path(self.config.model)
            if resolved.kind == "hub":
                from huggingface_hub import snapshot_download

                path = snapshot_download(path)
        except ModelSourceError as error:
            raise TrainingError(str(error)) from error
        except Exception as error:
            raise TrainingError(
                f"{self.config.model} is not available locally ({type(error).__name__}: {error}); download it once "
                "while online, or name a local model folder."
            ) from error
        return Path(path)

    def _load_model(self) -> None:
        import mlx.core as mx
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm.utils import load_model, quantize_model
        from transformers import AutoTokenizer

        config = self.config
        folder = self._model_folder()
        if not any(folder.glob("model*.safetensors")):
            raise TrainingError(
                f"{config.model}: MLX loads safetensors weights and this model has none ({folder}); "
                "convert it with transformers' save_pretrained, or set engine: torch."
            )
        try:
            model, model_config = load_model(folder, trust_remote_code=config.trust_remote_code)
        except ValueError as error:
            raise TrainingError(
                f"MLX cannot build {config.model}: {error} Set engine: torch to train it with PyTorch."
            ) from error
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model_path = str(folder)

        if config.dtype != "auto":
            model.set_dtype(getattr(mx, config.dtype))
        self.compute_dtype = _parameter_dtype(model)
        self.quantized = "quantization" in model_config
        if config.method == "qlora" and not self.quantized:
            model, model_config = quantize_model(model, model_config, QLORA_GROUP_SIZE, QLORA_BITS)
            self.quantized = True
            self._info(
                f"QLoRA with MLX: the base's linear layers and embeddings are quantized to {QLORA_BITS} bits on load "
                f"(groups of {QLORA_GROUP_SIZE}); the adapter trains in float32."
            )
        model.freeze()
        self.lora_targets, keys = self._lora_keys(model)
        self.lora_keys = sorted(keys)
        # the adapter's initial weights come from the seed
        mx.random.seed(self.config.seed)
        linear_to_lora_layers(model, len(model.layers), self._lora_parameters())
        model.train()
        self.model = model
        trainable = self.lora_weights()
        self.num_trainable = sum(v.size for v in trainable.values())
        from mlx.utils import tree_flatten

        self.num_parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
        if not trainable:
            raise TrainingError(f"No weight is trainable: target_modules {config.target_modules} matched no layer of {config.model}.")
        if config.gradient_checkpointing:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])

    def _lora_keys(self, model) -> tuple[set[str], set[str]]:
        """(the module names that get an adapter, the paths mlx-lm's ``keys`` wants).

        Paths inside a decoder layer (``self_attn.q_proj``) for the layers, ``lm_head`` for an untied head.
        """
        import mlx.nn as nn

        targets = self.config.target_modules
        linear = (nn.Linear, nn.QuantizedLinear)

        def wanted(path: str) -> bool:
            name = path.rsplit(".", 1)[-1]
            return targets == "all-linear" or name in targets

        keys = {path for path, m in model.layers[0].named_modules() if isinstance(m, linear) and wanted(path)}
        names = {k.rsplit(".", 1)[-1] for k in keys}
        if targets != "all-linear" and "lm_head" in targets:
            head = dict(model.named_modules()).get("lm_head")
            if isinstance(head, linear):
                keys.add("lm_head")
                names.add("lm_head")
            else:
                self._info("lm_head is tied to the embeddings in this model: the MLX engine trains no adapter on it.")
        return names, keys

    def _lora_parameters(self) -> dict[str, Any]:
        config = self.config
        return {
            "rank": config.lora_rank,
            "scale": config.lora_alpha / config.lora_rank,  # PEFT's scaling (not rsLoRA)
            "dropout": config.lora_dropout,
            "keys": self.lora_keys,
        }

    def mlx_adapter_config(self) -> dict[str, Any]:
        """mlx-lm's ``adapter_config.json`` (``mlx_lm.utils.load(model, adapter_path=...)`` reads it)."""
        return {
            "fine_tune_type": "lora",
            "num_layers": len(self.model.layers),
            "lora_parameters": self._lora_parameters(),
            "model": self.config.model,
            "quantized_base": self.quantized,
        }

    def lora_weights(self) -> dict[str, Any]:
        """The adapter's weights by mlx-lm name (``…q_proj.lora_a``)."""
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.model.trainable_parameters()))

    def _base_key(self) -> dict[str, Any]:
        """What makes two MLX runs' base models answer alike (their cached base answers are shared)."""
        return {"model": str(self.config.model), "engine": "mlx", "device": self.device_name, "quantized": self.quantized}

    def _replay_examples(self) -> list:
        """``replay_rows`` general questions answered greedily by the base model with MLX (the adapter is at its
        zero start), as the torch engine does."""
        from mactuner.training.rows import replay_rows

        return replay_rows(self.config.replay_rows, self.model, self.tokenizer, self._base_key(), self._info, self._stage,
                           answer=self._greedy_answers)

    def _greedy_answers(self, questions: list[str], max_new_tokens: int) -> list[str]:
        """Each question alone through the chat template, answered greedily by the MLX model (dropout off)."""
        from mlx_lm.generate import generate
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template: chat questions cannot be asked")
        wrapper, greedy = TokenizerWrapper(self.tokenizer), make_sampler(0.0)
        answers = []
        self.model.eval()
        try:
            for question in questions:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                         add_generation_prompt=True, return_dict=True)["input_ids"]
                answers.append(generate(self.model, wrapper, list(ids), max_tokens=max_new_tokens, sampler=greedy).strip())
        finally:
            self.model.train()
        return answers

    @contextlib.contextmanager
    def _adapter_off(self):
        """The base model's answers: every LoRA layer's update scaled to zero, then restored."""
        from mlx_lm.tuner.lora import LoRALinear

        layers = [m for _, m in self.model.named_modules() if isinstance(m, LoRALinear)]
        scales = [layer.scale for layer in layers]
        for layer in layers:
            layer.scale = 0.0
        try:
            yield
        finally:
            for layer, scale in zip(layers, scales):
                layer.scale = scale

    def _check_forgetting(self) -> str | None:
        """After the last step, as the torch engine: what the tuned model kept of what the base knew
        (``RUN/forgetting.json``); its headline, or None when not checked. Never fails the run."""
        if self.run_dir is None or not self.config.forgetting_check:
            return None
        from mactuner.evaluation.forgetting import end_of_run_check

        return end_of_run_check(self.model, self.tokenizer, self.run_dir, base_key=self._base_key(), peft=True,
                                info=self._info, stage=self._stage, answer=self._greedy_answers,
                                adapter_off=self._adapter_off())

    def _prepare_data(self) -> None:
        from mactuner.training.rows import prepare_units

        config = self.config
        data = prepare_units(config, self.tokenizer, self._info, self._stage,
                             self._replay_examples if config.replay_rows else None)
        self.data_format = data.format
        self.train_units = data.train_units
        self.val_units = data.val_units
        self.global_batch = config.batch_size * config.grad_accum
        self.steps_per_epoch = math.ceil(len(self.train_units) / self.global_batch)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.warmup_steps = (
            config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * self.total_steps)
        )
        self._plans: dict[int, list[list[int]]] = {}

    def _build_optimizer(self) -> None:

        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim

        config = self.config
        self.optimizer = optim.AdamW(
            learning_rate=config.learning_rate, betas=[0.9, 0.999], eps=1e-8,
            weight_decay=config.weight_decay, bias_correction=True,
        )
        self.optimizer.init(self.model.trainable_parameters())

        def loss_mean(model, inputs, targets, mask, divisor):
            # float32 cross-entropy summed over the trained positions, divided by the global batch's trained tokens
            logits = model(inputs).astype(mx.float32)
            return (nn.losses.cross_entropy(logits, targets) * mask).sum() / divisor

        self._loss_mean = loss_mean
        self._compile_steps()

    def _compile_steps(self) -> None:
        """The compiled functions of a step (again after a restore: they hold the optimizer's state tree)."""
        from functools import partial

        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        model, optimizer, loss_mean = self.model, self.optimizer, self._loss_mean
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        value_and_grad = nn.value_and_grad(model, loss_mean)
        state = [model.state, mx.random.state]
        full_state = [model.state, optimizer.state, mx.random.state]

        def apply(loss, grads, lr):
            # clip, then update only if the loss and the gradient norm are finite: decided inside the graph,
            # so the step needs one wait for the device, at its end (as mlx-lm's)
            grads, norm = optim.clip_grad_norm(grads, max_norm)
            finite = mx.logical_and(mx.isfinite(loss), mx.isfinite(norm))
            before_params = model.trainable_parameters()
            before_state = tree_map(lambda x: x, optimizer.state)
            optimizer.learning_rate = lr
            optimizer.update(model, grads)
            model.update(tree_map(lambda new, old: mx.where(finite, new, old), model.trainable_parameters(), before_params))
            _where_in_place(optimizer.state, before_state, finite)
            return norm

        # compiled like mlx-lm's step; the random state is an input and an output (LoRA dropout)
        @partial(mx.compile, inputs=state, outputs=state)
        def micro_step(inputs, targets, mask, divisor):
            return value_and_grad(model, inputs, targets, mask, divisor)

        @partial(mx.compile, inputs=full_state, outputs=full_state)
        def whole_step(inputs, targets, mask, divisor, lr):
            loss, grads = value_and_grad(model, inputs, targets, mask, divisor)
            return loss, apply(loss, grads, lr)

        @partial(mx.compile, inputs=full_state, outputs=full_state)
        def apply_step(loss, grads, lr):
            return apply(loss, grads, lr)

        @partial(mx.compile, inputs=state)
        def eval_sum(inputs, targets, mask):
            return loss_mean(model, inputs, targets, mask, mx.array(1.0, mx.float32))

        self._micro_step, self._whole_step, self._apply_step, self._eval_sum = micro_step, whole_step, apply_step, eval_sum

    def _restore(self, info: checkpoints.CheckpointInfo | None) -> None:
        """Load adapter, optimizer state and position from a checkpoint."""
        import mlx.core as mx
        import numpy as np
        from mlx.utils import tree_flatten, tree_unflatten

        if info is None:
            raise TrainingError("Nothing to resume: no complete checkpoint.")
        state, tensors = checkpoints.load_checkpoint_state(info.path)
        if tensors.get("engine") != ENGINE:
            raise TrainingError(
                f"{info.path.name} was written by the PyTorch engine: resume this run with engine: torch."
            )
        weights = mx.load(str(info.path / MLX_ADAPTER_DIR / MLX_ADAPTER_FILE))
        expected = self.lora_weights()
        if set(weights) != set(expected):
            raise TrainingError(f"{info.path.name}: its adapter does not match this model's LoRA layers.")
        self.model.load_weights(list(weights.items()), strict=False)
        fresh = dict(tree_flatten(self.optimizer.state))
        saved = tensors["optimizer"]
        if set(saved) != set(fresh):
            raise TrainingError(f"{info.path.name}: its optimizer state does not match this model's LoRA layers.")
        restored = [(k, mx.array(np.asarray(saved[k].numpy())).astype(fresh[k].dtype)) for k in fresh]
        self.optimizer.state = tree_unflatten(restored)
        self.optimizer.init(self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.optimizer.state)
        self._compile_steps()
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
        import mlx.core as mx

        if not self._set_up:
            self.setup()
        config = self.config
        restore_handler = self._install_sigterm()
        begin = {
            "step": self.step,
            "total_steps": self.total_steps,
            "message": (
                f"Training {config.model} with MLX ({config.method}, {self.num_trainable:,} of {self.num_parameters:,} "
                f"weights trainable) on {self.device_name} in {self.compute_dtype}: "
                f"{len(self.train_units)} training units, {len(self.val_units)} validation, "
                f"{self.total_steps} steps of {self.global_batch}."
            ),
        }
        self._emit("on_train_begin", begin)
        self._info(begin["message"])
        if self.step < self.total_steps:
            self._stage("warming_up", f"Warming up: step {self.step + 1} of {self.total_steps} (the first one compiles)…")
        report_tokens, report_seconds = 0, 0.0
        mx.reset_peak_memory()
        state = "finished"
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                outcome = self._train_step()
                seconds = time.perf_counter() - started
                report_seconds += seconds
                self.step += 1
                self.losses.append(outcome.loss)
                self.tokens_seen += outcome.real_tokens
                report_tokens += outcome.real_tokens
                if self.step % config.log_every == 0 or self.step == self.total_steps or outcome.skipped:
                    peak = int(mx.get_peak_memory())
                    mx.reset_peak_memory()
                    self.peak_memory_bytes = max(self.peak_memory_bytes or 0, peak)
                    record = {
                        "type": "train",
                        "step": self.step,
                        "total_steps": self.total_steps,
                        "epoch": round(self.step / self.steps_per_epoch, 4),
                        "loss": outcome.loss,
                        "lr": outcome.lr,
                        "grad_norm": outcome.grad_norm,
                        "tokens_per_second": report_tokens / report_seconds if report_seconds > 0 else 0.0,
                        "tokens": self.tokens_seen,
                        "memory_bytes": peak,
                        "memory_kind": MEMORY_KIND,
                        "micro_batch_size": self.micro_batch_size,
                        "engine": ENGINE,
                        "time": time.time(),
                    }
                    if outcome.skipped:
                        record["skipped"] = True
                    self._emit("on_train_report", record)
                    report_tokens, report_seconds = 0, 0.0
                self._check_finite(outcome)
                last = self.step == self.total_steps
                stopping = self._stop.is_set()
                if self.val_units and ((config.eval_every and self.step % config.eval_every == 0) or last):
                    self.last_val_loss = self.evaluate()
                    self._emit("on_eval_report", {"type": "eval", "step": self.step, "val_loss": self.last_val_loss, "time": time.time()})
                if (config.save_every and self.step % config.save_every == 0) or last or stopping:
                    self._save_checkpoint()
                if stopping:
                    state = "cancelled"
                    break
            adapter = self._save_final() if self.step >= self.total_steps else None
            forgetting = None
            if self.step >= self.total_steps:
                state = "finished"
                forgetting = self._check_forgetting()
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
            memory_kind=MEMORY_KIND,
        )

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.train_units, self.global_batch, self.config.seed, epoch, True)}
        return self._plans[epoch]

    def _batch(self, units: list[Unit]):
        """Right-padded ``(inputs, targets, mask)`` for MLX: position c predicts token c + 1 where it is trained."""
        import mlx.core as mx
        import numpy as np

        length = max(len(u.input_ids) for u in units)
        # one more than a multiple of PAD_MULTIPLE: inputs and targets are one shorter (as mlx-lm pads)
        padded = 1 + PAD_MULTIPLE * math.ceil((length - 1) / PAD_MULTIPLE)
        ids = np.full((len(units), padded), self.pad_id, dtype=np.int32)
        labels = np.full((len(units), padded), IGNORE_INDEX, dtype=np.int64)
        for r, u in enumerate(units):
            ids[r, : len(u.input_ids)] = u.input_ids
            labels[r, : len(u.labels)] = u.labels
        shifted = labels[:, 1:]
        mask = shifted != IGNORE_INDEX
        targets = np.where(mask, shifted, 0).astype(np.int32)
        return mx.array(ids[:, :-1]), mx.array(targets), mx.array(mask.astype(np.float32))

    def _train_step(self) -> StepOutcome:
        """One optimizer step over the global batch for ``self.step``; halves the micro-batch on out of memory."""
        import mlx.core as mx
        from mlx.utils import tree_map

        config = self.config
        epoch, index = divmod(self.step, self.steps_per_epoch)
        units = [self.train_units[i] for i in self._plan(epoch)[index]]
        trained_tokens = sum(u.trained_tokens for u in units)
        real_tokens = sum(len(u.input_ids) for u in units)
        divisor = mx.array(float(max(1, trained_tokens)), mx.float32)
        lr = config.learning_rate * lr_factor(self.step, self.total_steps, self.warmup_steps, config.lr_scheduler)
        lr_array = mx.array(lr, mx.float32)
        while True:
            # the dropout masks of a step depend on the seed and the step only: a resumed run draws the same
            mx.random.seed(config.seed * 1_000_003 + self.step)
            try:
                if len(units) <= self.micro_batch_size:
                    # the whole global batch in one pass: forward, backward, clip and update in one compiled graph
                    loss, norm = self._whole_step(*self._batch(units), divisor, lr_array)
                else:
                    loss, grads = None, None
                    for start in range(0, len(units), self.micro_batch_size):
                        inputs, targets, mask = self._batch(units[start : start + self.micro_batch_size])
                        value, micro_grads = self._micro_step(inputs, targets, mask, divisor)
                        loss = value if loss is None else loss + value
                        grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
                        mx.eval(loss, grads)
                    norm = self._apply_step(loss, grads, lr_array)
                # the step's one wait for the device: the update, the loss and the gradient norm
                mx.eval(self.model.trainable_parameters(), self.optimizer.state, loss, norm)
                break
            except Exception as error:
                if not is_mlx_out_of_memory(error):
                    raise
                message = str(error).split("\n")[0]
                loss = grads = None
                mx.clear_cache()
                if self.micro_batch_size == 1:
                    raise OutOfMemory(
                        f"Out of memory with MLX even with a micro-batch of 1 row ({config.max_length} tokens max). "
                        "Lower max_length, turn on gradient_checkpointing, use QLoRA (a 4-bit base: method: qlora), "
                        f"use a smaller model, or close other programs using the Mac's memory. ({message})"
                    ) from None
                old = self.micro_batch_size
                self.micro_batch_size = max(1, old // 2)
                self._info(
                    f"Out of memory at step {self.step + 1} with a micro-batch of {old}: micro-batch halved to "
                    f"{self.micro_batch_size}; the effective batch stays {self.global_batch} rows through gradient accumulation."
                )
        loss_value, norm_value = float(loss.item()), float(norm.item())
        # (a step that is not finite changed nothing: the graph kept the old weights and optimizer state)
        skipped = not math.isfinite(loss_value) or not math.isfinite(norm_value)
        return StepOutcome(loss=loss_value, grad_norm=norm_value, real_tokens=real_tokens, lr=lr, skipped=skipped)

    def evaluate(self) -> float | None:
        """Mean loss per trained token over the validation units."""
        import mlx.core as mx

        if not self.val_units:
            return None
        self.model.eval()
        units = sorted(self.val_units, key=lambda u: len(u.input_ids))
        total = mx.array(0.0, mx.float32)
        count = 0
        for start in range(0, len(units), self.micro_batch_size):
            chunk = units[start : start + self.micro_batch_size]
            total = total + self._eval_sum(*self._batch(chunk))
            mx.eval(total)
            count += sum(u.trained_tokens for u in chunk)
        self.model.train()
        return float(total.item()) / max(1, count)

    def loss_on(self, units: list[Unit]) -> float:
        """Mean loss per trained token of ``units`` as one batch, dropout off (tests compare it with torch)."""
        self.model.eval()
        value = self._eval_sum(*self._batch(units))
        self.model.train()
        return float(value.item()) / max(1, sum(u.trained_tokens for u in units))

    def _check_finite(self, outcome: StepOutcome) -> None:
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
        dtype = self.compute_dtype
        if dtype == "float16":
            advice = (
                "The model overflows float16: train in bfloat16 (dtype: bfloat16) where the device supports it, "
                "or in float32 (dtype: float32)."
            )
        elif dtype == "bfloat16":
            advice = "Train in float32 (dtype: float32), or lower the learning rate."
        else:
            advice = "Lower the learning rate or set max_grad_norm, and check the dataset for broken rows."
        first = self._non_finite[0]
        raise NonFiniteLoss(
            f"Stopped at step {self.step}: the loss was not a finite number for {NON_FINITE_STEPS} steps in a row "
            f"(steps {first}–{self.step}, computing in {dtype} with MLX), so those steps were skipped and nothing "
            f"was learned from them. {advice} The weights are as after step {first - 1}."
        )

    # -- saving

    def _save_checkpoint(self) -> None:
        if self.run_dir is None:
            return
        import mlx.core as mx
        import numpy as np
        import torch
        from mlx.utils import tree_flatten

        optimizer = {}
        for key, value in tree_flatten(self.optimizer.state):
            array = np.array(value.astype(mx.float32) if value.dtype == mx.bfloat16 else value, copy=True)
            if array.dtype == np.uint64:
                array = array.astype(np.int64)
            optimizer[key] = torch.from_numpy(np.ascontiguousarray(array))
        info = checkpoints.save_checkpoint(
            self.run_dir,
            self.step,
            model=MLXAdapterWriter(self),
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
                "engine": ENGINE,
            },
            tensors={"engine": ENGINE, "optimizer": optimizer},
        )
        checkpoints.prune_checkpoints(self.run_dir, self.config.keep_last)
        self._emit("on_checkpoint", {"step": self.step, "path": str(info.path), "loss": info.loss, "val_loss": info.val_loss})

    def _save_final(self) -> Path | None:
        if self.run_dir is None:
            return None
        target = self.run_dir / checkpoints.ADAPTER_DIR
        writer = MLXAdapterWriter(self)

        def write(folder: Path) -> None:
            writer.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)

        checkpoints.write_folder_atomically(target, write)
        return target

    # -- signals and reporting

    def _install_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def _emit(self, method: str, info: dict[str, Any]) -> None:
        for callback in self.callbacks:
            getattr(callback, method)(info)

    def _info(self, message: str) -> None:
        self._emit("on_info", {"type": "info", "message": message, "time": time.time()})

    def _stage(self, stage: str, message: str) -> None:
        self._emit("on_info", {"type": "info", "stage": stage, "message": message, "time": time.time()})

    def _end(self, state: str, message: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._emit("on_train_end", {"state": state, "step": self.step, "message": message})

    def _record_failure(self, error: BaseException) -> None:
        if isinstance(error, (RunFolderBusy, RunFolderNotOurs)):
            return
        if isinstance(error, KeyboardInterrupt):
            message = "Interrupted."
        elif isinstance(error, TrainingError):
            message = str(error)
        else:
            message = f"{type(error).__name__}: {error}"
        self._end("failed", message)

    def cleanup(self) -> None:
        """Release the run folder."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _where_in_place(tree: Any, old: Any, keep_new: Any) -> None:
    """``tree``'s arrays become ``where(keep_new, new, old)``, in the same containers (a compiled step holds them)."""
    import mlx.core as mx

    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in list(items):
        if isinstance(value, (dict, list)):
            _where_in_place(value, old[key], keep_new)
        else:
            tree[key] = mx.where(keep_new, value, old[key])


def _parameter_dtype(model) -> str:
    """The dtype name of the model's floating-point base weights (``float32``, ``bfloat16``, ``float16``)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, value in tree_flatten(model.parameters()):
        if value.dtype in (mx.float32, mx.bfloat16, mx.float16):
            return str(value.dtype).replace("mlx.core.", "")
    return "float32"
