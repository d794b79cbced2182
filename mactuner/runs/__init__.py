"""Background training runs: one process and one folder per run.

A run is ``python -m mactuner train RUN/config.yaml --run-dir RUN`` started as a detached process (its own
session, output into ``RUN/log.txt``), so it keeps training when the browser tab closes or the app stops.
Everything the UI needs is read back from the run folder:

```
RUN/config.yaml      the TrainConfig
RUN/status.json      state, pid, step, total_steps, started_at, updated_at, message
RUN/metrics.jsonl    one JSON record per line (train / eval / info)
RUN/log.txt          the process's stdout and stderr
RUN/process.json     pid and process create time of the last launch
RUN/checkpoints/     complete checkpoints (mactuner.checkpoints)
RUN/adapter/         the final adapter
```

The modules, in reading order:

    store.py    run folders: paths, state, reconcile, list, delete, zip (the only reader of status.json)
    launch.py   start, resume, cancel the trainer process (under the launch lock)
    metrics.py  metrics.jsonl read back incrementally, the live tail, the ETA
    names.py    a person's name for a run
    views.py    what the fine-tune page shows of runs: table rows, picker label, headline, charts

Every public name of store, launch and metrics is importable from ``mactuner.runs``.
"""

from mactuner.runs.launch import (
    cancel_run,
    package_root,
    resume_run,
    start_run,
)
from mactuner.runs.metrics import (
    TAIL_MAX_INFO,
    TAIL_MAX_POINTS,
    MetricsChunk,
    MetricsTail,
    eta_seconds,
    format_duration,
    read_metrics,
)
from mactuner.runs.store import (
    CANCEL_GRACE_S,
    LOG_TAIL_LINES,
    STATES,
    RunConflict,
    RunError,
    RunInfo,
    delete_checkpoint,
    delete_run,
    export_adapter_zip,
    get_run,
    list_runs,
    new_run_folder,
    reconcile_run,
    run_checkpoints,
    run_path,
    running_on,
    sync_monitor,
    tail_lines,
    wait_for_exit,
)

__all__ = [
    "CANCEL_GRACE_S",
    "LOG_TAIL_LINES",
    "MetricsChunk",
    "MetricsTail",
    "RunConflict",
    "RunError",
    "RunInfo",
    "STATES",
    "TAIL_MAX_INFO",
    "TAIL_MAX_POINTS",
    "cancel_run",
    "delete_checkpoint",
    "delete_run",
    "eta_seconds",
    "export_adapter_zip",
    "format_duration",
    "get_run",
    "list_runs",
    "new_run_folder",
    "package_root",
    "read_metrics",
    "reconcile_run",
    "resume_run",
    "run_checkpoints",
    "run_path",
    "running_on",
    "start_run",
    "sync_monitor",
    "tail_lines",
    "wait_for_exit",
]
