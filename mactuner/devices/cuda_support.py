"""What this torch build can run on an NVIDIA GPU, without creating a CUDA context.

A torch wheel carries compiled kernels (``sm_XY``) and sometimes PTX (``compute_XY``)
for a list of compute capabilities (``torch.cuda.get_arch_list()``, read from the
library, no context). A GPU outside that list is listed by ``torch.cuda`` like any
other, but its first kernel launch fails ("no kernel image is available"): the torch
2.13 wheels for CUDA 12.9/13.x start at 7.5, so Pascal (6.x) and Volta (7.0) cards
are selected and die. :func:`kernel_problem` says so up front, with torch's own advice
(reinstall the same version from a CUDA build that has kernels for the card).

The allocator: a fine-tune's batches vary in length, which fragments CUDA's caching
allocator (reserved memory far above allocated). ``expandable_segments:True`` lets its
segments grow instead; :func:`trainer_environment` sets it for training processes
unless the person set ``PYTORCH_CUDA_ALLOC_CONF`` themselves.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping

import torch

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
ALLOC_CONF = "expandable_segments:True"

# the capabilities each torch 2.13 CUDA build was compiled for (x86_64), as torch lists them
# (torch.cuda.PYTORCH_RELEASES_CODE_CC); used only when this torch does not carry the table
_RELEASES_FALLBACK = {
    "12.6": {50, 60, 70, 75, 80, 86, 90},
    "12.9": {75, 80, 86, 90, 100, 120},
    "13.0": {75, 80, 86, 90, 100, 120},
}
# cubins built for these run on no other capability of their major (Jetson / integrated parts)
_ONLY_ITSELF = {53, 62, 72, 87, 101}
_NOT_ON = {50: {53}, 52: {53}, 60: {62}, 61: {62}, 70: {72}, 80: {87}, 86: {87}, 100: {101}}


def _arch_number(arch: str) -> tuple[str, int] | None:
    """``"sm_86"`` -> ``("sm", 86)``; ``"compute_90a"`` -> ``("compute", 90)``; None if unreadable."""
    kind, _, number = arch.partition("_")
    digits = number.rstrip("abf")
    if kind not in ("sm", "compute") or not digits.isdigit():
        return None
    return kind, int(digits)


def code_runs_on(capability: int, kind: str, code: int) -> bool:
    """Whether code built for ``code`` (e.g. 86) runs on a GPU of ``capability`` (e.g. 89).

    A cubin (``sm``) runs on the same major version at an equal or higher minor; PTX
    (``compute``) is compiled by the driver for any later capability.
    """
    if code in _ONLY_ITSELF:
        return capability == code
    if capability in _NOT_ON.get(code, ()):
        return False
    if kind == "compute":
        return capability >= code
    return capability // 10 == code // 10 and capability >= code


def kernel_problem(major: int, minor: int, name: str = "this GPU", arch_list: list[str] | None = None) -> str | None:
    """Why this torch build cannot run on a GPU of capability ``major.minor``; None when it can.

    Args:
        arch_list: ``torch.cuda.get_arch_list()`` (read when None). An empty list (a
            build that does not say) is taken as "it can".
    """
    archs = torch.cuda.get_arch_list() if arch_list is None else arch_list
    parsed = [p for p in (_arch_number(a) for a in archs) if p is not None]
    if not parsed:
        return None
    capability = 10 * major + minor
    if any(code_runs_on(capability, kind, code) for kind, code in parsed):
        return None
    built = ", ".join(sorted({f"{code // 10}.{code % 10}" for _, code in parsed}, key=lambda s: float(s)))
    return (
        f"{name} (compute capability {major}.{minor}) has no kernels in this PyTorch build "
        f"(torch {torch.__version__}, built for {built}): its first operation would fail. "
        + reinstall_hint(capability)
    )


def reinstall_hint(capability: int) -> str:
    """torch's advice for a GPU its build has no kernels for: the same version from a CUDA build that has them."""
    releases = getattr(torch.cuda, "PYTORCH_RELEASES_CODE_CC", None)
    arch = "aarch64" if platform.machine().lower() in ("aarch64", "arm64") else "x86_64"
    if releases:
        table = {cuda: by_arch.get(arch, set()) for cuda, by_arch in releases.items()}
    else:
        table = _RELEASES_FALLBACK if arch == "x86_64" else {}
    fits = [cuda for cuda, codes in table.items() if any(code_runs_on(capability, "sm", c) for c in codes)]
    version = torch.__version__.split("+")[0]
    if fits:
        tag = "cu" + fits[0].replace(".", "")
        return (f"Reinstall the same version from a CUDA {fits[0]} build, which has kernels for it: "
                f"pip install torch=={version} --index-url https://download.pytorch.org/whl/{tag}")
    return ("No PyTorch build of this release supports this GPU: see https://pytorch.org/get-started/locally/ "
            "for an older release that does, or train on the CPU.")


def trainer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a training process: ``base`` (default ``os.environ``) plus the CUDA
    allocator's ``expandable_segments:True``, unless ``PYTORCH_CUDA_ALLOC_CONF`` is already set."""
    env = dict(os.environ if base is None else base)
    env.setdefault(ALLOC_CONF_ENV, ALLOC_CONF)
    return env
