"""Taking a model out of MacTuner: merge an adapter into its base, write a GGUF with an Ollama Modelfile.

    merge.py      an adapter merged into its base model: a full model folder
    convert.py    llama.cpp's converter, run in a child process (``python -m mactuner.export.convert``)
    modelfile.py  the Ollama Modelfile: chat template, stop words, system prompt
    gguf.py       export_gguf: merge if needed, convert, tag the file as MacTuner's, write the Modelfile

Public names of ``merge``, ``modelfile`` and ``gguf`` are importable from ``mactuner.export``.
"""

from mactuner.export.gguf import (
    CONVERTER_EXTRAS,
    CONVERTER_PIN,
    GGUF_DIR,
    OUTTYPES,
    ChatSource,
    ExportError,
    GGUFExport,
    chat_sources,
    converter_dir,
    converter_missing_reason,
    default_gguf_path,
    export_gguf,
    export_label,
    folder_zip_bytes,
    gguf_metadata,
    gguf_tag,
    modelfile_path,
)
from mactuner.export.merge import (
    adapter_label,
    merge_adapter,
)
from mactuner.export.modelfile import (
    CHATML_TEMPLATE,
    MODELFILE_HEADER,
    is_chatml,
    modelfile_text,
    run_system_prompt,
    template_default_system,
)

__all__ = [
    "CHATML_TEMPLATE",
    "CONVERTER_EXTRAS",
    "CONVERTER_PIN",
    "ChatSource",
    "ExportError",
    "GGUFExport",
    "GGUF_DIR",
    "MODELFILE_HEADER",
    "OUTTYPES",
    "adapter_label",
    "chat_sources",
    "converter_dir",
    "converter_missing_reason",
    "default_gguf_path",
    "export_gguf",
    "export_label",
    "folder_zip_bytes",
    "gguf_metadata",
    "gguf_tag",
    "is_chatml",
    "merge_adapter",
    "modelfile_path",
    "modelfile_text",
    "run_system_prompt",
    "template_default_system",
]
