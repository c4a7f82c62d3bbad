"""ssd.data.fetch with a dataset folder as the source (either layout) and the leftovers of killed fetches.

The folders are made here (tiny generated images); a real `ssd fetch` is killed mid-download.
"""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from archive_helpers import TINY, good_zip, tree_hash
from ssd.data.checks import run_validation
from ssd.data.fetch import fetch
from ssd.data.source import check_source
from ssd.data.workdir import _host, _process_start, remove_leftovers, work_prefix
from ssd.util.settings import DataSettings, Settings
from tiny_data import write_dataset, write_split

ROOT = Path(__file__).resolve().parents[2]


def data_settings(**data) -> DataSettings:
    base = {"source": "auto", "url": "http://unused.invalid/x.zip", "sha1": "0" * 40, "image_size": 64,
            "classes": ["banana"], "synthetic": dict(TINY)}
    return Settings.from_params({"data": {**base, **data}}).data


def banana_folder(root: Path) -> Path:
    """``root/banana-detection/bananas_{train,val}``: 6 + 3 images of 64 px."""
    write_dataset(root, train=6, val=3, size=64)
    return root


def train_val_folder(root: Path) -> Path:
    """``root/train`` and ``root/val``, the label file named ``labels.csv`` in one, and stray files."""
    write_split(root / "train", 6, size=64)
    write_split(root / "val", 3, size=64, seed=1)
    (root / "val" / "label.csv").rename(root / "val" / "labels.csv")
    (root / "train" / "images" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # a Finder file: not an image
    (root / "README.md").write_text("photos of my bananas\n")
    return root


@pytest.mark.parametrize("layout", ["banana", "banana, inner folder", "train/val"])
def test_a_folder_source_goes_through_fetch_and_validate(layout, tmp_path):
    source = tmp_path / "mine"
    if layout == "train/val":
        train_val_folder(source)
    else:
        banana_folder(source)
        source = source / "banana-detection" if layout == "banana, inner folder" else source
    before = tree_hash(source)
    project = tmp_path / "project"
    check = check_source(str(source), data_settings(source=str(source)), project / "data" / "source.json",
                         project / "data" / "raw")
    manifest = fetch(None, None, project / "data" / "raw", data_settings(source=str(source)), progress=False,
                     fingerprint=check["fingerprint"])
    assert manifest["resolved_source"] == "folder" and manifest["path"] == str(source.resolve())
    assert manifest["tree_sha256"] == check["fingerprint"]["tree_sha256"]
    assert manifest["source_fingerprint"] == check["fingerprint"]  # the next `ssd source` sees it as current
    assert manifest["files"] == {"bananas_train": {"images": 6, "label_rows": 6},
                                 "bananas_val": {"images": 3, "label_rows": 3}}
    data = project / "data" / "raw" / "banana-detection"
    assert sorted(p.name for p in data.iterdir()) == ["bananas_train", "bananas_val"]
    assert sorted(p.name for p in (data / "bananas_val").iterdir()) == ["images", "label.csv"]
    report = run_validation(project / "data" / "raw", project / "data" / "reports", 64, ["banana"])
    assert report["splits"]["train"]["images"] == 6 and report["splits"]["val"]["label_rows"] == 3
    assert tree_hash(source) == before  # the source is only read
    assert sorted(p.name for p in (project / "data").iterdir()) == ["raw", "reports", "source.json"]
    # Fetching again replaces the copy whole (a removed image disappears from it too).
    inner = {"banana": "banana-detection/bananas_train", "banana, inner folder": "bananas_train",
             "train/val": "train"}[layout]
    (source / inner / "images" / "0.png").unlink()
    fetch(str(source), None, project / "data" / "raw", data_settings(), progress=False)
    assert sorted(p.name for p in (data / "bananas_train" / "images").iterdir()) == [f"{i}.png" for i in range(1, 6)]


def test_a_folder_in_neither_layout_is_refused_naming_what_is_missing(tmp_path):
    source = tmp_path / "photos"
    write_split(source / "train", 2, size=32)
    (source / "val" / "images").mkdir(parents=True)  # val without its label file
    out = tmp_path / "data" / "raw"
    fetch(str(good_zip(tmp_path / "good.zip")), None, out, data_settings(), progress=False)
    before = tree_hash(out)
    with pytest.raises(ValueError) as info:
        fetch(str(source), None, out, data_settings(), progress=False)
    message = str(info.value)
    assert "\n" not in message and f"source folder {source} has neither dataset layout" in message
    assert "banana layout: missing bananas_train/images, bananas_val/images, bananas_train/label.csv, " \
           "bananas_val/label.csv" in message
    assert "train/val layout: missing val/label.csv" in message
    assert tree_hash(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["raw"]


def test_a_sha1_for_a_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="a SHA-1 checks an archive"):
        fetch(str(banana_folder(tmp_path / "mine")), "0" * 40, tmp_path / "raw", data_settings(), progress=False)


# ---------------------------------------------------------------------------------------------
# leftovers of killed fetches

def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    parent = tmp_path / "data"
    parent.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = _process_start(sleeper.pid)
        host = _host()
        folders = {
            "dead": f".tmp-fetch-{dead_pid()}-{start}-{host}-abc123",
            "live": f".tmp-fetch-{sleeper.pid}-{start}-{host}-def456",
            # the live pid, but a process started at another time: the pid was reused, so it is a leftover
            "reused": f".tmp-fetch-{sleeper.pid}-{start + 1}-{host}-ghi789",
            "other host": f".tmp-fetch-{dead_pid()}-{start}-{host}x-jkl012",  # cannot be checked from here
            "old style": ".tmp-fetch-mno345",  # no pid in the name: not known to be ours
            "other prefix": f".tmp-raw-{dead_pid()}",
        }
        for name in folders.values():
            (parent / name / "new").mkdir(parents=True)
            (parent / name / "new" / "file").write_bytes(b"x")
        (parent / f".tmp-fetch-{dead_pid()}-{start}-{host}-file").write_bytes(b"a file, not a folder")
        removed = remove_leftovers(parent)
        assert sorted(p.name for p in removed) == sorted([folders["dead"], folders["reused"]])
        left = {p.name for p in parent.iterdir()}
        assert folders["live"] in left and folders["other host"] in left and folders["old style"] in left
        assert folders["other prefix"] in left and folders["dead"] not in left and folders["reused"] not in left
    finally:
        sleeper.kill()
        sleeper.wait()


def test_own_work_folder_name_is_recognised_as_live(tmp_path):
    (tmp_path / (work_prefix() + "xyz")).mkdir()
    assert remove_leftovers(tmp_path) == []


class _StallingHandler(http.server.BaseHTTPRequestHandler):
    """Sends the headers and a little of a large body, then waits until the test releases it."""
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(10 << 20))
        self.end_headers()
        self.wfile.write(b"PK" + b"\0" * 4096)
        self.wfile.flush()
        self.release.wait(60)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_a_killed_fetch_leaves_a_work_folder_that_the_next_fetch_removes(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ssd", "fetch", "--source",
                             f"http://127.0.0.1:{server.server_address[1]}/big.zip", "--out", str(data / "raw"),
                             "--quiet", "--params", str(ROOT / "params.yaml")], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not list(data.glob(".tmp-fetch-*/big.zip")):
            assert proc.poll() is None and time.monotonic() < deadline, "fetch ended before it got going"
            time.sleep(0.1)
        proc.kill()
        proc.wait()
    finally:
        _StallingHandler.release.set()
        server.shutdown()
    (leftover,) = data.glob(".tmp-fetch-*")
    assert leftover.name.startswith(f".tmp-fetch-{proc.pid}-")
    fetch(str(good_zip(tmp_path / "good.zip")), None, data / "raw", data_settings(), progress=False)
    assert sorted(p.name for p in data.iterdir()) == ["raw"]
