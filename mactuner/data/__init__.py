"""Dataset files → training examples → token ids, with precise reports of bad data.

Read in the order the data flows:

    base.py       Example, DataProblem, DatasetLoad, DatasetError, FORMATS, IGNORE_INDEX, the demo files
    readers.py    a file (JSON, JSONL, CSV, Parquet, TXT) → rows → Examples in one of five formats
    uploads.py    uploaded files kept under MACTUNER_HOME with safe, unique names
    templates.py  Examples → token ids and labels through the tokenizer's chat template
    summary.py    lengths, truncation and a histogram for a tokenizer; the train/validation split

Every public name is importable from ``mactuner.data``.
"""

from mactuner.data.base import (
    DEMO_DATASETS,
    DEMO_DIR,
    DEMO_FACTS,
    EXTENSIONS,
    FORMATS,
    IGNORE_INDEX,
    DataProblem,
    DatasetError,
    DatasetLoad,
    Example,
)
from mactuner.data.readers import (
    MAX_DATASET_BYTES,
    MAX_DATASET_ROWS,
    load_dataset_file,
)
from mactuner.data.summary import (
    SUMMARY_SAMPLE_ROWS,
    DatasetSummary,
    percentile,
    summarize_dataset,
    token_length_figure,
    train_validation_split,
)
from mactuner.data.templates import (
    encode_examples,
    render_example,
    tokenize_examples,
)
from mactuner.data.uploads import (
    MAX_UPLOAD_NAME_BYTES,
    UPLOADS_DIR,
    SavedUploads,
    dataset_choices,
    safe_upload_name,
    save_upload,
    uploads_dir,
)

__all__ = [
    "DEMO_DATASETS",
    "DEMO_DIR",
    "DEMO_FACTS",
    "DataProblem",
    "DatasetError",
    "DatasetLoad",
    "DatasetSummary",
    "EXTENSIONS",
    "Example",
    "FORMATS",
    "IGNORE_INDEX",
    "MAX_DATASET_BYTES",
    "MAX_DATASET_ROWS",
    "MAX_UPLOAD_NAME_BYTES",
    "SUMMARY_SAMPLE_ROWS",
    "SavedUploads",
    "UPLOADS_DIR",
    "dataset_choices",
    "encode_examples",
    "load_dataset_file",
    "percentile",
    "render_example",
    "safe_upload_name",
    "save_upload",
    "summarize_dataset",
    "token_length_figure",
    "tokenize_examples",
    "train_validation_split",
    "uploads_dir",
]
