"""Issue 21, the rows about folders MacTuner writes into: a run folder that is a person's
folder (row 1), an output folder a person added files to (row 2), and temporary files
left by an export stopped with SIGTERM (row 12). Each test works on its own MACTUNER_HOME."""

from __future__ import annotations

import json

import pytest

from mactuner import fileio


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def personal_folder(path):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("my: own settings\n")
    (path / "adapter").mkdir()
    (path / "adapter" / "notes.txt").write_text("my notes")
    return path


# --- row 1: `train --run-dir` refuses a folder of the person's files ---------------------------------


def test_train_refuses_a_run_dir_that_is_not_a_mactuner_run(tmp_path, capsys):
    from mactuner.cli import main

    dataset = tmp_path / "data.jsonl"
    dataset.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    docs = personal_folder(tmp_path / "docs")
    before = files_under(docs)
    code = main(["train", "--dataset", str(dataset), "--model", str(tmp_path / "no-model"), "--device", "cpu",
                 "--max-steps", "1", "--run-dir", str(docs), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "not a MacTuner run folder" in err and "config.yaml" in err and "Traceback" not in err
    assert files_under(docs) == before  # not even a lock file
    assert (docs / "config.yaml").read_text() == "my: own settings\n"
    # the trainer itself refuses too (the page and torchrun go through it, not the CLI's check)
    from mactuner.config import TrainConfig
    from mactuner.train import Trainer, TrainingError

    config = TrainConfig(model=str(tmp_path / "no-model"), dataset=str(dataset), device="cpu", max_steps=1)
    with pytest.raises(TrainingError, match="not a MacTuner run folder"):
        Trainer(config, docs).run()
    assert files_under(docs) == before


def test_a_run_folder_is_recognised_by_its_marker_or_its_status(tmp_path):
    from mactuner.run_folder import NotARunFolder, check_run_folder, is_run_folder, mark_run_folder

    assert is_run_folder(tmp_path / "missing") and is_run_folder(tmp_path)  # missing or empty
    mine = tmp_path / "mine"
    mine.mkdir()
    mark_run_folder(mine)
    (mine / "config.yaml").write_text("model: x\n")
    assert is_run_folder(mine)
    # a run written before the marker existed: its status.json says so
    old = tmp_path / "old"
    old.mkdir()
    (old / "status.json").write_text(json.dumps({"state": "finished", "step": 3}))
    assert is_run_folder(old)
    # a folder of someone's files, even with a status.json that is not a run's
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "status.json").write_text('{"mood": "fine"}')
    with pytest.raises(NotARunFolder, match="status.json"):
        check_run_folder(theirs)
    # a new folder holding only the MacTuner config it is trained from: a run being set up
    setup = tmp_path / "setup"
    setup.mkdir()
    (setup / "config.yaml").write_text("model: tiny\ndataset: data.jsonl\n")
    assert is_run_folder(setup)
    (setup / "config.yaml").write_text("my: own settings\n")  # not a training config: the person's file
    assert not is_run_folder(setup)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotARunFolder, match="not a folder"):
        check_run_folder(tmp_path / "file")
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(NotARunFolder, match="symbolic link"):
        check_run_folder(tmp_path / "link")


# --- row 2: the ownership marker lists what MacTuner wrote -----------------------------------------------


def test_an_output_folder_with_a_file_added_is_not_replaced(tmp_path):
    target = tmp_path / "NEW"

    def write(folder):
        (folder / "model.safetensors").write_bytes(b"\0" * 32)
        (folder / "sub").mkdir()
        (folder / "sub" / "tokenizer.json").write_text("{}")

    fileio.write_output_folder(target, write)
    assert fileio.owned_by_mactuner(target)
    fileio.write_output_folder(target, write)  # its own output is replaced without asking
    (target / "my-notes.txt").write_text("the person's file")
    with pytest.raises(fileio.OutputNotOurs, match=r"my-notes\.txt.*--overwrite"):
        fileio.write_output_folder(target, write)
    assert (target / "my-notes.txt").read_text() == "the person's file"
    # a file MacTuner wrote, then changed by the person, is theirs too
    (target / "my-notes.txt").unlink()
    (target / "sub" / "tokenizer.json").write_text('{"edited": true}')
    with pytest.raises(fileio.OutputNotOurs, match="tokenizer.json"):
        fileio.prepare_output(target)
    fileio.write_output_folder(target, write, overwrite=True)  # asked for: replaced
    assert (target / "sub" / "tokenizer.json").read_text() == "{}"


def test_merge_again_keeps_a_file_the_person_added(varied_model_dir, tiny_adapter, tmp_path, capsys):
    from mactuner.cli import main

    out = tmp_path / "NEW"
    argv = ["merge", "--adapter", str(tiny_adapter), "--model", str(varied_model_dir), "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0  # MacTuner's own merge is replaced
    (out / "README.md").write_text("what I learned")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "README.md" in err and "--overwrite" in err
    assert (out / "README.md").read_text() == "what I learned"


# --- row 12: SIGTERM while the converter writes leaves no temporary file; stale ones are swept ----------------


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_sigterm_during_export_leaves_no_temporary_file(varied_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from mactuner.export import converter_missing_reason
    from tests.locations import ROOT

    assert converter_missing_reason() is None
    out = tmp_path / "exports"
    out.mkdir()
    (out / "mine.txt").write_text("the person's file")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MACTUNER_CONVERT_PAUSE_S": "120"}
    export = subprocess.Popen([sys.executable, "-m", "mactuner", "export", "--merged", str(varied_model_dir),
                               "--out", str(out / "model.gguf")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(name.endswith(".tmp") for name in hidden(out)) and time.monotonic() < deadline:
        assert export.poll() is None, export.communicate()
        time.sleep(0.2)
    temp = [out / n for n in hidden(out)]
    assert temp and all(p.stat().st_size > 0 for p in temp), temp  # the converter is writing
    converters = psutil.Process(export.pid).children(recursive=True)
    export.send_signal(signal.SIGTERM)
    _, err = export.communicate(timeout=60)
    assert export.returncode == 128 + signal.SIGTERM
    assert "stopped" in err and "Traceback" not in err
    assert hidden(out) == [] and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert not [c for c in converters if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_stale_temporary_files_of_dead_processes_are_swept(tmp_path):
    import os
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead, alive = child.pid, os.getpid()
    folder = tmp_path / "exports"
    folder.mkdir()
    old = time.time() - 3600
    names = {
        f".export.gguf.{dead}-1-0123abcd.tmp": True,  # a killed export's file: swept
        f"{fileio.STAGING_PREFIX}merge.{dead}-1-0123abcd.tmp": True,  # a killed merge's folder: swept
        f".export.gguf.{alive}-1-0123abcd.tmp": False,  # a live writer's: kept
        ".notes.tmp": False,  # the person's own hidden file: kept
        "model.gguf": False,
    }
    for name in names:
        if "staging" in name:
            (folder / name).mkdir()
            (folder / name / "model.safetensors").write_bytes(b"\0" * 8)
        else:
            (folder / name).write_bytes(b"\0" * 8)
        os.utime(folder / name, (old, old))
    fresh = folder / f".export.gguf.{dead}-2-0123abcd.tmp"  # just written: a pid may be reused, so age counts too
    fresh.write_bytes(b"\0")
    removed = fileio.sweep_stale_temps(folder)
    assert sorted(p.name for p in removed) == sorted(n for n, swept in names.items() if swept)
    assert sorted(p.name for p in folder.iterdir()) == sorted([fresh.name] + [n for n, s in names.items() if not s])
