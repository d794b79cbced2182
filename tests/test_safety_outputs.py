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


def test_merge_again_keeps_a_file_the_person_added(varied_model_dir, tiny_adapter, tmp_path, capsys):  # noqa: F811
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
