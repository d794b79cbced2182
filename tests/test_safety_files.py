"""Issue 9, the file rows: no path or symlink escapes (delete, export, uploads),
output folders written whole or not at all, and a server that answers only to
its own host names. Each test works on its own temporary MACTUNER_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import tomllib

from mactuner import data, fileio, paths, runs
from tests.locations import ROOT


def run_folder(run_id: str, state: str = "finished", root=None):
    path = (root or paths.runs_dir()) / run_id
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model: tiny\ndevice: cpu\n")
    fileio.write_json_atomic(path / "status.json", {"state": state, "pid": None, "step": 1, "total_steps": 1})
    return path


# --- row 13: delete stays inside runs_dir() -------------------------------------------------------


def test_delete_run_refuses_paths_outside_the_runs_folder(tmp_path):
    victim = run_folder("victim", root=tmp_path / "elsewhere")  # has a status.json, like the probe's folder
    paths.runs_dir().mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(victim, paths.runs_dir())
    for run in (relative, str(victim), "../../x", "/"):
        with pytest.raises(runs.RunError, match="only changes its own run folders"):
            runs.delete_run(run)
    assert (victim / "status.json").exists()
    # a symbolic link in the runs folder is refused too: what it points to is never deleted
    (paths.runs_dir() / "linked").symlink_to(victim)
    with pytest.raises(runs.RunError, match="symbolic link"):
        runs.delete_run("linked")
    assert (victim / "status.json").exists() and [r.id for r in runs.list_runs()] == []
    # its own run is deleted, leaving nothing half-deleted behind
    run_folder("mine")
    runs.delete_run("mine")
    assert sorted(p.name for p in paths.runs_dir().iterdir()) == ["linked"]


# --- row 8: the adapter zip never carries a link's target ------------------------------------------


def test_adapter_zip_skips_symbolic_links(tmp_path):
    path = run_folder("z")
    adapter = path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    secret = tmp_path / "secret.txt"
    secret.write_text("the host's private file")
    (adapter / "hostname").symlink_to(secret)  # a link to a file
    (tmp_path / "secret-dir").mkdir()
    (tmp_path / "secret-dir" / "key").write_text("private key")
    (adapter / "more").symlink_to(tmp_path / "secret-dir")  # a link to a folder
    (adapter / "nested").mkdir()
    (adapter / "nested" / "ok.txt").write_text("fine")
    with zipfile.ZipFile(runs.export_adapter_zip("z")) as archive:
        names = sorted(archive.namelist())
        contents = b"".join(archive.read(n) for n in names)
    assert names == ["z-adapter/adapter_config.json", "z-adapter/adapter_model.safetensors", "z-adapter/nested/ok.txt"]
    assert b"private" not in contents
    # an adapter folder that is itself a link is refused
    (path / "adapter").rename(path / "real-adapter")
    (path / "adapter").symlink_to(path / "real-adapter")
    with pytest.raises(runs.RunError, match="symbolic link"):
        runs.export_adapter_zip("z")


# --- row 9: uploads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".", "..", "a\x00b.jsonl", "x" * 300 + ".jsonl", "../../escape.jsonl",
                                  "/etc/passwd", "C:\\Users\\me\\data.jsonl", ".bashrc", ""])
def test_upload_names_are_made_safe(name):
    saved = data.save_upload(name, b'{"text": "hello"}\n')
    assert saved.parent == data.uploads_dir() and saved.read_bytes() == b'{"text": "hello"}\n'
    assert not saved.name.startswith(".") and "\x00" not in saved.name and len(saved.name.encode()) <= 200
    assert fileio.inside(saved, data.uploads_dir())


def test_upload_never_follows_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.jsonl"
    victim.write_text("do not touch")
    data.uploads_dir().mkdir(parents=True)
    (data.uploads_dir() / "data.jsonl").symlink_to(victim)
    saved = data.save_upload("data.jsonl", b'{"text": "new"}\n')
    assert victim.read_text() == "do not touch"
    assert saved.name == "data (2).jsonl" and not saved.is_symlink() and saved.read_bytes() == b'{"text": "new"}\n'
    # a linked uploads folder is refused
    other = tmp_path / "uploads-link"
    other.symlink_to(tmp_path)
    with pytest.raises(data.DatasetError, match="symbolic link"):
        data.save_upload("x.jsonl", b"{}", folder=other)


def test_two_tabs_uploading_one_name_never_overwrite_each_other():
    same = b'{"text": "same"}\n'
    barrier = threading.Barrier(10)

    def upload(content):
        barrier.wait()
        return data.save_upload("data.jsonl", content)

    with ThreadPoolExecutor(10) as pool:
        saved = list(pool.map(upload, [same] * 8 + [b'{"text": "a"}\n', b'{"text": "b"}\n']))
    # identical bytes share one file; each different content got its own name, intact
    assert len({saved[i] for i in range(8)}) == 1
    assert sorted(p.name for p in data.uploads_dir().iterdir()) == ["data (2).jsonl", "data (3).jsonl", "data.jsonl"]
    assert {p.read_bytes() for p in data.uploads_dir().iterdir()} == {same, b'{"text": "a"}\n', b'{"text": "b"}\n'}
    assert data.save_upload("data.jsonl", b'{"text": "a"}\n') in saved  # uploaded again: the same file


def test_two_processes_uploading_one_name_never_overwrite_each_other(tmp_path):
    code = ("import sys, time\nfrom pathlib import Path\nfrom mactuner import data\n"
            "while not Path(sys.argv[2]).exists(): time.sleep(0.005)\n"
            "print(data.save_upload('data.jsonl', sys.argv[1].encode()))")
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", code, f'{{"text": "{i}"}}\n', str(go)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True) for i in range(4)]
    go.touch()
    saved = [p.communicate(timeout=60)[0].strip() for p in processes]
    assert len(set(saved)) == 4
    assert sorted(json.loads(p.read_text())["text"] for p in data.uploads_dir().iterdir()) == ["0", "1", "2", "3"]


# --- output folders: whole or nothing --------------------------------------------------------------------


def test_a_failed_output_write_leaves_the_previous_folder_whole(tmp_path):
    target = tmp_path / "merged"

    def good(folder):
        (folder / "model.safetensors").write_bytes(b"v1")

    fileio.write_output_folder(target, good)
    assert (target / fileio.MARKER_FILE).exists()

    def broken(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fileio.write_output_folder(target, broken)
    assert (target / "model.safetensors").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder left


def test_an_output_folder_filled_by_someone_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "out"

    def write(folder):
        (folder / "weights").write_bytes(b"w")
        target.mkdir()  # the person saves a file there while the merge runs
        (target / "their-file.txt").write_text("mine")

    with pytest.raises(fileio.OutputNotOurs):
        fileio.write_output_folder(target, write)
    assert (target / "their-file.txt").read_text() == "mine" and not (target / "weights").exists()


# --- row 17: the server answers only to its own names ---------------------------------------------------


def test_server_config_accepts_only_local_host_names():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    server = config["server"]
    assert server["address"] == "127.0.0.1"
    # the option name and shape as Streamlit 1.67 defines it (streamlit/config.py: a list of host names)
    assert sorted(server["allowedHosts"]) == ["127.0.0.1", "localhost"]
    assert server.get("enableXsrfProtection", True) is True
    assert server.get("enableCORS", True) is True


def test_streamlit_reads_allowed_hosts_from_the_config_and_refuses_other_hosts(monkeypatch):
    from streamlit import config as st_config
    from streamlit.web.server.starlette.starlette_websocket import is_host_allowed

    monkeypatch.chdir(ROOT)
    st_config.get_config_options(force_reparse=True)
    try:
        assert sorted(st_config.get_option("server.allowedHosts")) == ["127.0.0.1", "localhost"]
        assert is_host_allowed("localhost:8501") and is_host_allowed("127.0.0.1:8501")
        assert not is_host_allowed("attacker.example:8501")  # a DNS-rebinding page's Host header
    finally:
        st_config.get_config_options(force_reparse=True)
