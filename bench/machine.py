"""The machine a benchmark ran on, and where its results go.

Every bench writes ``bench/results/<name>-<UTC timestamp>.json`` holding its
figures and :func:`describe_machine`'s answer, so runs on different machines can
be compared: the CPU model and the flags that decide the dtype (native
bfloat16 or not), cores and torch threads, torch's version, the load average
(other processes share the CPU), oneDNN's ISA cap if one is set (how this
project emulates a float32-only CPU on a bfloat16 one), and the GPU if any.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# x86 / Arm flags that decide which dtypes a CPU computes fast
DTYPE_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8",
               "bf16", "fphp", "asimdhp", "i8mm")


def cpu_flags() -> list[str]:
    """The dtype-relevant flags of this CPU, as ``/proc/cpuinfo`` lists them (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in DTYPE_FLAGS if f in flags]


def describe_machine(threads: int | None = None) -> dict[str, Any]:
    """What a benchmark figure depends on, JSON-ready.

    Args:
        threads: the torch threads the bench used, if it fixed them.
    """
    import torch

    from mactuner.devices import cpu_name, cpu_supports_bfloat16

    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    flags = cpu_flags()
    # from the flags themselves: a bench emulating a float32-only CPU patches cpu_supports_bfloat16
    native_bf16 = bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags)) or (not flags and cpu_supports_bfloat16())
    machine: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_flags": flags,
        "cpu_native_bfloat16": native_bf16,
        "reported_bfloat16": cpu_supports_bfloat16(),  # what MacTuner decided from (False when emulating float32-only)
        # the cap hides AVX512-BF16/AMX from oneDNN: bfloat16 matmuls then run like on a float32-only CPU
        "onednn_max_cpu_isa": isa_cap,
        "emulated_float32_only_cpu": bool(isa_cap) and native_bf16 and not cpu_supports_bfloat16()
        and "AMX" not in isa_cap.upper() and "BF16" not in isa_cap.upper(),
        "cores_logical": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": None,
    }
    try:
        import transformers

        machine["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "count": torch.cuda.device_count(),
                          "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return machine


def machine_line(machine: dict[str, Any]) -> str:
    """One line for a table's heading."""
    kind = "bfloat16-native" if machine["cpu_native_bfloat16"] else "float32-only"
    if machine.get("emulated_float32_only_cpu"):
        kind = f"float32-only EMULATED (ONEDNN_MAX_CPU_ISA={machine['onednn_max_cpu_isa']} on a bfloat16 CPU)"
    gpu = f"; GPU {machine['gpu']['name']}" if machine.get("gpu") else ""
    load = machine["load_average"]
    return (f"{machine['cpu']} ({machine['cores_logical']} logical cores, {kind}; flags {' '.join(machine['cpu_flags'])}); "
            f"torch {machine['torch']}, {machine['torch_threads']} threads; load average {load[0]:.1f}{gpu}")


def write_result(name: str, result: dict[str, Any], folder: Path | None = None) -> Path:
    """Write ``result`` (plus the machine, if missing) to ``bench/results/<name>-<timestamp>.json``; returns the path."""
    from mactuner.fileio import write_json_atomic

    result = dict(result)
    result.setdefault("machine", describe_machine())
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result.setdefault("time", stamp)
    folder = Path(folder or os.environ.get("MACTUNER_BENCH_RESULTS") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{stamp}.json"
    write_json_atomic(path, result)
    return path


if __name__ == "__main__":
    import json

    print(json.dumps(describe_machine(), indent=2))
