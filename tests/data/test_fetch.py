"""ssd.data.fetch: real archives over real HTTP (127.0.0.1) and from files; every refusal keeps the old data."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archive_helpers import (TINY, closed_port_url, good_zip, layout_members, serve, sha1_of, tree_hash,
                             zip_with)
from ssd.data.download import download
from ssd.data.fetch import fetch
from ssd.util.settings import DataSettings, Settings


def data_settings(**data) -> DataSettings:
    base = {"source": "auto", "url": "http://unused.invalid/x.zip", "sha1": "0" * 40, "image_size": 256,
            "classes": ["banana"], "synthetic": dict(TINY)}
    return Settings.from_params({"data": {**base, **data}}).data


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return good_zip(tmp_path_factory.mktemp("zips") / "banana-detection.zip")


def assert_layout(out: Path, train: int = 8, val: int = 4) -> None:
    for split, n in (("bananas_train", train), ("bananas_val", val)):
        d = out / "banana-detection" / split
        assert len(list((d / "images").glob("*.png"))) == n
        assert (d / "label.csv").read_text().splitlines()[0] == "img_name,label,xmin,ymin,xmax,ymax"


def test_http_download_is_verified_extracted_and_recorded(good, tmp_path):
    out = tmp_path / "data" / "raw"
    with serve(good.parent) as base:
        manifest = fetch(f"{base}/{good.name}", sha1_of(good), out, data_settings(), progress=False)
    assert_layout(out)
    assert manifest["resolved_source"] == "url" and manifest["verified"] and not manifest["synthetic_fallback"]
    assert manifest["sha1"] == sha1_of(good)
    assert manifest["files"] == {"bananas_train": {"images": 8, "label_rows": 8},
                                 "bananas_val": {"images": 4, "label_rows": 4}}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]  # no temporary leftovers


def test_d2l_source_takes_url_and_sha1_from_params(good, tmp_path):
    with serve(good.parent) as base:
        manifest = fetch("d2l", None, tmp_path / "raw", data_settings(url=f"{base}/{good.name}", sha1=sha1_of(good)),
                         progress=False)
    assert manifest["resolved_source"] == "d2l" and manifest["expected_sha1"] == sha1_of(good)
    assert_layout(tmp_path / "raw")


def test_zip_path_without_sha1_records_computed_sha1(good, tmp_path):
    manifest = fetch(str(good), None, tmp_path / "raw", data_settings(), progress=False)
    assert manifest["resolved_source"] == "file" and not manifest["verified"]
    assert manifest["sha1"] == sha1_of(good) and manifest["expected_sha1"] is None


def test_auto_falls_back_to_synthetic_when_network_unreachable(tmp_path, capsys):
    start = time.monotonic()
    manifest = fetch("auto", None, tmp_path / "raw", data_settings(url=closed_port_url()), progress=False)
    assert time.monotonic() - start < 10  # a refused connection is not retried
    assert manifest["synthetic_fallback"] and manifest["resolved_source"] == "synthetic"
    assert "cannot reach" in manifest["fallback_reason"]
    assert manifest["expected_sha1"] is None and len(manifest["sha1"]) == 40
    assert_layout(tmp_path / "raw")
    assert "SYNTHETIC" in capsys.readouterr().err
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text())["synthetic_fallback"] is True


def test_synthetic_source_is_deterministic(tmp_path):
    a = fetch("synthetic", None, tmp_path / "a", data_settings(), progress=False)
    b = fetch("synthetic", None, tmp_path / "b", data_settings(), progress=False)
    c = fetch("synthetic", None, tmp_path / "c", data_settings(synthetic={**TINY, "seed": 1}), progress=False)
    assert a["sha1"] == b["sha1"] != c["sha1"]
    assert not a["synthetic_fallback"] and a["resolved_source"] == "synthetic"
    assert tree_hash(tmp_path / "a" / "banana-detection") == tree_hash(tmp_path / "b" / "banana-detection")


def _bad_archive(kind: str, tmp: Path, good: Path) -> tuple[str, str | None]:
    """``(source, sha1)`` for one kind of bad input."""
    if kind == "sha1 mismatch":
        return str(good), "f" * 40
    if kind == "truncated":
        data = good.read_bytes()
        (tmp / "t.zip").write_bytes(data[: len(data) // 2])
        return str(tmp / "t.zip"), None
    if kind == "dotdot":
        return str(zip_with(tmp / "z.zip", layout_members() + [("banana-detection/../../evil.txt", b"pwned")])), None
    if kind == "absolute":
        return str(zip_with(tmp / "z.zip", layout_members() + [(str(tmp / "abs-evil.txt"), b"pwned")])), None
    if kind == "symlink":
        return str(zip_with(tmp / "z.zip", layout_members(), {"banana-detection/link": "/etc/passwd"})), None
    if kind == "zip bomb":
        return str(zip_with(tmp / "z.zip", layout_members() + [("banana-detection/bomb.bin", bytes(30 << 20))])), None
    if kind == "wrong layout":
        return str(zip_with(tmp / "z.zip", layout_members("other-name"))), None
    raise AssertionError(kind)


REFUSALS = {
    "sha1 mismatch": "SHA-1 mismatch",
    "truncated": "not a readable zip",
    "dotdot": r"'\.\.' in path",
    "absolute": "absolute path",
    "symlink": "symlink",
    "zip bomb": "zip bomb",
    "wrong layout": "banana layout",
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_refusals_keep_previous_data(kind, good, tmp_path):
    out = tmp_path / "data" / "raw"
    fetch(str(good), None, out, data_settings(), progress=False)
    before = tree_hash(out)
    source, sha1 = _bad_archive(kind, tmp_path, good)
    with pytest.raises(ValueError, match=REFUSALS[kind]):
        fetch(source, sha1, out, data_settings(), progress=False)
    assert tree_hash(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()
    assert not (tmp_path / "abs-evil.txt").exists()


def test_refusal_with_no_previous_data_leaves_nothing(tmp_path):
    bad = zip_with(tmp_path / "z.zip", layout_members() + [("../evil.txt", b"x")])
    with pytest.raises(ValueError, match="unsafe"):
        fetch(str(bad), None, tmp_path / "data" / "raw", data_settings(), progress=False)
    assert list((tmp_path / "data").iterdir()) == []


def test_checksum_mismatch_in_auto_is_an_error_not_a_fallback(good, tmp_path):
    with serve(good.parent) as base:
        with pytest.raises(ValueError, match="SHA-1 mismatch"):
            fetch("auto", None, tmp_path / "raw", data_settings(url=f"{base}/{good.name}", sha1="a" * 40), progress=False)
    assert not (tmp_path / "raw").exists()


def test_http_error_is_not_a_fallback(good, tmp_path):
    with serve(good.parent) as base:
        with pytest.raises(RuntimeError, match="HTTP 404"):
            fetch("auto", None, tmp_path / "raw", data_settings(url=f"{base}/missing.zip"), progress=False)


def test_transient_server_errors_are_retried(good, tmp_path):
    calls = []

    class Flaky(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            calls.append(self.path)
            if len(calls) < 3:
                self.send_error(503, "try later")
            else:
                super().do_GET()

    with serve(good.parent, Flaky) as base:
        sha1 = download(f"{base}/{good.name}", tmp_path / "x.zip", backoff=0.01, progress=False)
    assert sha1 == sha1_of(good) and len(calls) == 3
    with serve(good.parent, Flaky) as base:
        calls.clear()
        with pytest.raises(RuntimeError, match="after 2 attempts"):
            download(f"{base}/{good.name}", tmp_path / "y.zip", retries=1, backoff=0.01, progress=False)


def test_cli_exits_nonzero_with_message(good, tmp_path):
    (tmp_path / "params.yaml").write_text((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-m", "ssd", "fetch", "--source", str(good), "--sha1", "b" * 40,
                          "--out", "raw"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "SHA-1 mismatch" in run.stderr and not (tmp_path / "raw").exists()
    run = subprocess.run([sys.executable, "-m", "ssd", "fetch", "--source", str(good), "--out", "raw", "--quiet"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "8 images" in run.stdout and (tmp_path / "raw" / "manifest.json").is_file()
