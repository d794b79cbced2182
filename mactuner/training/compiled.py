"""``torch.compile`` for the decoder layers, switched on only when it pays for itself.

On a CPU a LoRA step of a small model spends a third of its time in elementwise
work (RMSNorm, RoPE, SiLU, LoRA scaling, dtype casts) done one operator at a time;
compiling each decoder layer with TorchInductor fuses it (measured on a 2-core
bfloat16 Xeon, whole LoRA steps: 1.19x faster in bfloat16 and 1.08x in float32 at
2 threads, 1.76x and 1.18x at 1 thread). The price is the compile itself: about 45 s the first time on 2
cores, about 8 s once TorchInductor's cache (kept under ``MACTUNER_HOME/compile``)
holds the same layers.

So ``compile: auto`` (the default) measures before it decides: after the second
step it knows what an eager step costs here, and compiles when the expected saving
over the rest of the run is larger than the expected compile time (the last one
measured on this machine for the same layers, else a cold guess). ``on`` compiles
before the first step, ``off`` never. Compiling needs a C++ compiler on a CPU and
is not attempted on MPS; ``auto`` also leaves CUDA alone (not measured on a GPU yet).
A compile that fails is reported and the run goes on eagerly: it never ends a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mactuner.config import COMPILE_CHOICES

# what auto assumes before it has measured this machine
COLD_COMPILE_SECONDS = 60.0
WARM_COMPILE_SECONDS = 15.0
# share of an eager step's time that compiling removes, until measured here. Measured on a 2-core Xeon
# (SmolLM2-135M, LoRA q/k/v/o, bench.train_throughput, 2 threads): 0.16 in bfloat16, 0.08 in float32
# (oneDNN capped to AVX512_CORE); at 1 thread 0.43 and 0.16. The guesses are the 2-thread figures.
EXPECTED_SAVING = {"bfloat16": 0.15, "float16": 0.15, "float32": 0.08}
DECIDE_AFTER_STEP = 2  # the first step carries one-off costs; the second is what a step costs
MEASURED_STEPS = 3  # compiled steps after the compiling one that measure the compiled speed


def compile_dir() -> Path:
    """``MACTUNER_HOME/compile``: TorchInductor's cache and what each compile cost."""
    from mactuner.paths import home

    path = home() / "compile"
    path.mkdir(parents=True, exist_ok=True)
    return path


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers: its largest ``ModuleList`` of one module class."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    return best


def missing_compiler(device_type: str) -> str | None:
    """Why compiling cannot work on ``device_type`` here, or None when it can."""
    if device_type == "mps":
        return "torch.compile is not used on MPS (TorchInductor's Metal backend is experimental)"
    if device_type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(name) for name in names):
            return (
                "torch.compile needs a C++ compiler on a CPU and none was found "
                "(install gcc, or Xcode's command-line tools on a Mac)"
            )
    return None


class LayerCompiler:
    """Compiles a model's decoder layers when the ``compile`` setting and the run's length say so.

    Args:
        choice: ``auto``, ``on`` or ``off``.
        model: the model being trained (its decoder layers are compiled in place;
            parameters and ``state_dict`` keys are unchanged).
        device_type: ``cpu``, ``cuda`` or ``mps``.
        key: what makes two runs' layers the same compile (model shape, dtype, LoRA, …);
            its ``dtype`` (e.g. ``torch.bfloat16``) picks the saving expected before one is measured.
        info: receives one line per decision, for the run's log.
        stage: receives ``(stage, message)`` while compiling.
    """

    def __init__(
        self,
        choice: str,
        model: torch.nn.Module,
        device_type: str,
        key: dict[str, Any],
        info: Callable[[str], None],
        stage: Callable[[str, str], None],
    ):
        if choice not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
        self.choice = choice
        self.layers = decoder_layers(model)
        self.device_type = device_type
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self._default_saving = EXPECTED_SAVING.get(str(key.get("dtype", "")).removeprefix("torch."), 0.08)
        self._info = info
        self._stage = stage
        self.compiled = False
        self.decided = choice == "off"
        self._first_compiled_step = False
        self._steps_run = 0  # steps done by this process (a resumed run starts again at 0)
        self._eager_rate: float | None = None  # seconds per token, eager (measured at DECIDE_AFTER_STEP)
        self._compiling_step: tuple[float, int] | None = None  # (seconds, tokens) of the step that compiled
        self._compiled_steps: list[tuple[float, int]] = []

    # -- the record of earlier compiles on this machine

    def _record_file(self) -> Path:
        return compile_dir() / f"{self.key}.json"

    def _record(self) -> dict[str, Any]:
        try:
            record = json.loads(self._record_file().read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def expected_compile_seconds(self) -> float:
        """The last measured compile time of these layers here, else a cold guess."""
        value = self._record().get("compile_seconds")
        return float(value) if isinstance(value, (int, float)) and value >= 0 else COLD_COMPILE_SECONDS

    def expected_saving(self) -> float:
        """The share of an eager step's time that compiling saved here last time, else a guess."""
        value = self._record().get("saving")
        return float(value) if isinstance(value, (int, float)) and 0 <= value < 1 else self._default_saving

    def _remember(self) -> None:
        """Keep what this compile cost and saved, for the next run's decision."""
        from mactuner.fileio import write_json_atomic

        seconds = sum(s for s, _ in self._compiled_steps)
        tokens = sum(t for _, t in self._compiled_steps)
        if tokens <= 0 or self._compiling_step is None:
            return
        compiled_rate = seconds / tokens
        first_seconds, first_tokens = self._compiling_step
        record = self._record()
        record["compile_seconds"] = round(max(0.0, first_seconds - first_tokens * compiled_rate), 2)
        if self._eager_rate:
            record["saving"] = round(min(0.95, max(0.0, 1 - compiled_rate / self._eager_rate)), 3)
        record["time"] = time.time()
        try:
            write_json_atomic(self._record_file(), record)
        except OSError:
            pass  # only a better guess next time is lost

    # -- decisions

    def before_step(self) -> None:
        """Compile before this process's first step when the choice is ``on``."""
        if self.choice == "on" and not self.decided:
            self.decided = True
            self._compile("on")

    def after_step(self, steps_left: int, seconds: float, tokens: int) -> None:
        """Measure (compile cost, saving); let ``auto`` decide after this process's step ``DECIDE_AFTER_STEP``.

        ``seconds`` and ``tokens`` are what the step just done took; ``steps_left`` how many follow it.
        Steps are counted in this process, so a resumed run also judges by a step without one-off costs.
        """
        self._steps_run += 1
        if self.compiled:
            if self._first_compiled_step:
                self._first_compiled_step = False
                self._compiling_step = (seconds, tokens)
            elif len(self._compiled_steps) < MEASURED_STEPS:
                self._compiled_steps.append((seconds, tokens))
                if len(self._compiled_steps) == MEASURED_STEPS or steps_left == 0:
                    self._remember()
            return
        if self.decided or self._steps_run < DECIDE_AFTER_STEP:
            return
        self.decided = True
        self._eager_rate = seconds / max(1, tokens)
        why_not = self._why_not_auto()
        remaining = steps_left
        saving = self.expected_saving() * seconds * remaining
        cost = self.expected_compile_seconds()
        if why_not is None and saving <= cost:
            why_not = (
                f"the {remaining} steps left would save about {saving:.0f} s, less than compiling costs here (about {cost:.0f} s)"
            )
        if why_not is not None:
            self._info(f"Layers not compiled: {why_not}.")
            return
        self._compile(f"auto: about {saving:.0f} s saved over {remaining} steps for about {cost:.0f} s of compiling")

    def _why_not_auto(self) -> str | None:
        if self.layers is None:
            return "no stack of decoder layers was found in this model"
        if self.device_type == "cuda":
            return "auto compiles on a CPU only (not measured on a GPU yet; set compile: on to try it)"
        return missing_compiler(self.device_type)

    def _compile(self, reason: str) -> None:
        why_not = missing_compiler(self.device_type) if self.layers is not None else "no stack of decoder layers was found"
        if why_not is not None:
            self._info(f"Layers not compiled: {why_not}. Training goes on without compiling.")
            return
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_dir() / "inductor"))
        for layer in self.layers:
            layer.compile(dynamic=True)
        self.compiled = True
        self._first_compiled_step = True
        cost = self.expected_compile_seconds()
        self._info(f"Compiling the {len(self.layers)} decoder layers with torch.compile ({reason}).")
        self._stage("compiling", f"Compiling the model's layers (once; about {cost:.0f} s here)…")

    def uncompile(self) -> None:
        """Back to eager layers (after a failed compile)."""
        if self.layers is not None:
            for layer in self.layers:
                layer._compiled_call_impl = None
        self.compiled = False
        self._first_compiled_step = False

    def run_step(self, step_fn: Callable[[], Any], reset: Callable[[], None]) -> Any:
        """``step_fn()``; if the step that compiles fails in the compiler, report it, ``reset()`` and run it eagerly."""
        if not self._first_compiled_step:
            return step_fn()
        try:
            return step_fn()
        except Exception as error:
            if not is_compile_failure(error):
                raise
            self.uncompile()
            reset()
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self._info(f"torch.compile failed ({first_line[:300]}); this run goes on without compiling.")
            return step_fn()

    @staticmethod
    @contextlib.contextmanager
    def eager():
        """A context in which compiled layers run eagerly (evaluation: no second compile for no_grad).

        The stance changes on entering, not on the call: ``torch.compiler.set_stance`` called alone sets the
        process's stance for good, so a context made and never entered (a check that returned early) left
        every later compile of the process running eagerly."""
        with torch.compiler.set_stance("force_eager"):
            yield


def is_compile_failure(error: BaseException) -> bool:
    """Whether ``error`` came from TorchDynamo / TorchInductor (not from the model or the data)."""
    from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException

    if isinstance(error, (BackendCompilerFailed, TorchDynamoException)):
        return True
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch"))
