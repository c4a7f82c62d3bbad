"""Retraining means new data, and a fair champion gate (issue 11, items 2 and 3).

* The source's fingerprint (``ssd source``, the always-run DVC stage before fetch): a zip's SHA-256,
  a folder's tree hash, a URL's ETag/Last-Modified from HEAD (its body's hash when the server gives
  neither), stable for generated and offline data; fetch reruns exactly when it changes, under real
  DVC and under the Prefect flow, whose summary says why.
* The champion is re-scored on the candidate's validation split when its stored figure came from
  another one, against a real ``mlflow server``; a champion that cannot be loaded stops registration.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
import zipfile
from typing import Iterator

import pytest
import torch

from archive_helpers import closed_port_url, good_zip
from ssd.data.fetch import fetch
from ssd.data.source import (check_source, describe_change, fetch_reason, fetched_fingerprint, read_fingerprint,
                             source_fingerprint)
from ssd.data.synthetic import generate_archive
from ssd.util.settings import DataSettings, Settings
from test_flows import TINY, make_project, prefect_api  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]


def params(**data) -> DataSettings:
    base = {"source": "auto", "url": "http://unused.invalid/x.zip", "sha1": None, "image_size": 150,
            "classes": ["banana"], "synthetic": {"seed": 0, "train": 4, "val": 2}}
    return Settings.from_params({"data": {**base, **data}}).data


class ArchiveServer:
    """An archive at ``/data.zip`` on 127.0.0.1 whose bytes the test replaces (``content``).

    ``validators``: answer with ETag and Last-Modified (else only Content-Length); ``head``: serve
    HEAD at all (else 501, as Python's bare handler does). ``log`` lists ``(method, path)``.
    """

    def __init__(self, content: bytes, *, validators: bool = True, head: bool = True):
        self.content, self.log, self.modified = content, [], 1_700_000_000
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _headers(self) -> bytes | None:
                outer.log.append((self.command, self.path))
                if self.path != "/data.zip":
                    self.send_error(404)
                    return None
                self.send_response(200)
                if validators:
                    self.send_header("ETag", f'"{hashlib.md5(outer.content).hexdigest()}"')
                    self.send_header("Last-Modified", self.date_time_string(outer.modified))
                self.send_header("Content-Length", str(len(outer.content)))
                self.end_headers()
                return outer.content

            def do_HEAD(self) -> None:
                if not head:
                    outer.log.append((self.command, self.path))
                    self.send_error(501)
                    return
                self._headers()

            def do_GET(self) -> None:
                body = self._headers()
                if body is not None:
                    self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/data.zip"

    def replace(self, content: bytes) -> None:
        self.content, self.modified = content, self.modified + 60

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def archive_server(content: bytes, **options) -> Iterator[ArchiveServer]:
    server = ArchiveServer(content, **options)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> dict[str, Path]:
    """Two different archives in the banana layout (8 train + 4 val images each)."""
    folder = tmp_path_factory.mktemp("zips")
    return {"a": good_zip(folder / "a.zip", seed=0), "b": good_zip(folder / "b.zip", seed=1)}


# ----------------------------------------------------------------------------------------------
# the fingerprint

def test_zip_fingerprint_is_its_content(zips, tmp_path):
    source = tmp_path / "data.zip"
    source.write_bytes(zips["a"].read_bytes())
    first = source_fingerprint(str(source), params())
    assert first == {"source": str(source), "kind": "file", "bytes": source.stat().st_size,
                     "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    os.utime(source, (0, 0))  # touched, same bytes: same fingerprint
    assert source_fingerprint(str(source), params()) == first
    source.write_bytes(zips["b"].read_bytes())  # a new archive at the same path
    assert source_fingerprint(str(source), params())["sha256"] != first["sha256"]


def test_folder_fingerprint_is_a_tree_hash(tmp_path):
    folder = tmp_path / "photos"
    (folder / "images").mkdir(parents=True)
    (folder / "label.csv").write_text("img_name,label,xmin,ymin,xmax,ymax\n0.png,0,1,1,5,5\n")
    (folder / "images" / "0.png").write_bytes(b"png 0")
    first = source_fingerprint(str(folder), params())
    assert first["kind"] == "folder" and first["files"] == 2 and len(first["tree_sha256"]) == 64
    assert source_fingerprint(str(folder), params()) == first
    (folder / "images" / "1.png").write_bytes(b"png 1")  # more labelled images
    second = source_fingerprint(str(folder), params())
    assert second["files"] == 3 and second["tree_sha256"] != first["tree_sha256"]
    (folder / "images" / "1.png").write_bytes(b"png 2")  # same names, other bytes
    assert source_fingerprint(str(folder), params())["tree_sha256"] != second["tree_sha256"]
    # One split's folder is neither dataset layout: fetch says so rather than guessing.
    with pytest.raises(ValueError, match="has neither dataset layout"):
        fetch(str(folder), None, tmp_path / "raw", params(), progress=False)


def test_synthetic_and_offline_auto_fingerprints_are_stable(tmp_path):
    synthetic = source_fingerprint("synthetic", params())
    assert synthetic == source_fingerprint("synthetic", params())
    assert synthetic != source_fingerprint("synthetic", params(synthetic={"seed": 1, "train": 4, "val": 2}))
    offline = params(url=closed_port_url())
    started = time.monotonic()
    unreachable = source_fingerprint("auto", offline)
    assert time.monotonic() - started < 5  # a refused connection is not retried
    assert unreachable["kind"] == "unreachable" and unreachable["synthetic"] == offline.synthetic.as_dict()
    assert source_fingerprint("auto", offline) == unreachable
    # check_source writes the file once; an unchanged check leaves it (and its mtime) alone.
    out = tmp_path / "source.json"
    assert check_source("auto", offline, out, tmp_path / "raw")["written"]
    stamp = out.stat().st_mtime_ns
    again = check_source("auto", offline, out, tmp_path / "raw")
    assert not again["written"] and out.stat().st_mtime_ns == stamp and read_fingerprint(out) == unreachable
    assert again["change"].startswith("no data fetched from a recorded source yet")


def test_url_fingerprint_uses_head_validators(zips):
    with archive_server(zips["a"].read_bytes()) as server:
        first = source_fingerprint(server.url, params())
        assert first["kind"] == "url" and first["etag"] and first["last_modified"]
        assert first["content_length"] == zips["a"].stat().st_size
        assert source_fingerprint(server.url, params()) == first
        server.replace(zips["b"].read_bytes())
        second = source_fingerprint(server.url, params())
        assert second["etag"] != first["etag"]
        assert {method for method, _ in server.log} == {"HEAD"}  # the archive itself was never downloaded
        assert describe_change(first, second) == (f"source changed: ETag {first['etag']}, Last-Modified "
                                                  f"{first['last_modified']}, {first['content_length']} bytes -> "
                                                  f"ETag {second['etag']}, Last-Modified {second['last_modified']}, "
                                                  f"{second['content_length']} bytes")


@pytest.mark.parametrize("options", [{"validators": False}, {"head": False}], ids=["no-validators", "no-head"])
def test_url_without_validators_is_hashed(zips, options):
    with archive_server(zips["a"].read_bytes(), **options) as server:
        first = source_fingerprint(server.url, params())
        assert first["sha256"] == hashlib.sha256(zips["a"].read_bytes()).hexdigest()
        assert first["bytes"] == zips["a"].stat().st_size
        server.replace(zips["b"].read_bytes())
        assert source_fingerprint(server.url, params())["sha256"] == hashlib.sha256(zips["b"].read_bytes()).hexdigest()
        assert ("GET", "/data.zip") in server.log


def test_outage_keeps_the_previous_fingerprint_and_http_errors_are_recorded(zips, capsys):
    with archive_server(zips["a"].read_bytes()) as server:
        real = source_fingerprint("auto", params(url=server.url))
        assert real["kind"] == "d2l"
        missing = server.url.replace("data.zip", "gone.zip")
        assert source_fingerprint(missing, params())["error"] == "HTTP 404"  # fetch reruns and fails on it
    # The server is gone: the data fetched from it stays (no new fingerprint, no synthetic fallback).
    assert source_fingerprint("auto", params(url=server.url), previous=real) == real
    assert "Cannot tell whether" in capsys.readouterr().err
    assert source_fingerprint("auto", params(url=server.url))["kind"] == "unreachable"  # nothing fetched before


def test_fetch_records_the_fingerprint_and_refuses_an_archive_changed_since(zips, tmp_path):
    source = tmp_path / "data.zip"
    source.write_bytes(zips["a"].read_bytes())
    fingerprint = source_fingerprint(str(source), params())
    manifest = fetch(str(source), None, tmp_path / "raw", params(), progress=False, fingerprint=fingerprint)
    assert manifest["source_fingerprint"] == fingerprint == fetched_fingerprint(tmp_path / "raw")
    assert manifest["sha256"] == fingerprint["sha256"]
    source.write_bytes(zips["b"].read_bytes())  # replaced between the check and the fetch
    with pytest.raises(ValueError, match="changed between the source check"):
        fetch(str(source), None, tmp_path / "raw", params(), progress=False, fingerprint=fingerprint)
    assert fetched_fingerprint(tmp_path / "raw") == fingerprint  # the previous data is kept
    # A check that reached the d2l URL forbids the synthetic fallback when fetch cannot reach it.
    offline = params(url=closed_port_url())
    reached = {"source": "auto", "kind": "d2l", "url": offline.url, "etag": '"x"'}
    with pytest.raises(RuntimeError, match="cannot reach"):
        fetch("auto", None, tmp_path / "raw2", offline, progress=False, fingerprint=reached)


def test_fetch_reason():
    a = {"source": "s.zip", "kind": "file", "sha256": "a1" * 32, "bytes": 1}
    b = {"source": "s.zip", "kind": "file", "sha256": "c3" * 32, "bytes": 1}
    assert fetch_reason(a, a, "skipped") == {"fetched": False, "reason": "source unchanged: skipped", "fingerprint": a}
    assert fetch_reason(a, b, "ran")["reason"] == "source changed: sha256 a1a1a1a1a1a1… -> sha256 c3c3c3c3c3c3…"
    assert fetch_reason(a, b, "restored")["reason"].endswith("(restored from DVC's run cache)")
    assert "params or code changed" in fetch_reason(a, a, "ran")["reason"]
    assert fetch_reason(None, a, "ran")["reason"].startswith("no data fetched from a recorded source yet: s.zip")
    other = {"source": "synthetic", "kind": "synthetic", "synthetic": {"seed": 0, "train": 4, "val": 2},
             "image_size": 150}
    assert fetch_reason(a, other, "ran")["reason"] == ("source changed: s.zip (sha256 a1a1a1a1a1a1…) -> synthetic "
                                                       "(generated, seed 0, 4+2 images of 150 px)")


def test_summary_says_why_and_shows_both_gate_figures():
    from flows.retrain import summary_markdown

    gate = {"val_digest": "dvc-md5:" + "b" * 32 + ".dir", "candidate_map_50": 0.5, "champion_version": 1,
            "champion_stored_map_50": 0.9, "champion_stored_val_digest": "dvc-md5:" + "a" * 32 + ".dir", "rescored": True,
            "champion_rescored_map_50": 0.25, "champion_map_50": 0.25}
    results = {"registration": {"model_name": "tinyssd", "version": 2, "aliases": ["champion"],
                                "decision": "promoted", "gate": gate}}
    data = {"fetched": True, "reason": "source changed: sha256 a1… -> sha256 c3…"}
    markdown = summary_markdown(results, {"fetch": "ran", "register": "ran"}, [], data)
    assert "**Data** fetched again: source changed: sha256 a1… -> sha256 c3…" in markdown
    assert ("**Champion gate** on validation split `dvc-md5:bbbbbbbbbbbb…`: candidate map_50 0.5 vs champion "
            "version 1 0.25, re-scored on this split (its stored map_50 0.9 was computed on "
            "`dvc-md5:aaaaaaaaaaaa…`)") in markdown
    same = {**gate, "champion_stored_val_digest": gate["val_digest"], "rescored": False,
            "champion_rescored_map_50": None, "champion_map_50": 0.9}
    results["registration"]["gate"] = same
    markdown = summary_markdown(results, {"fetch": "skipped", "register": "ran"}, [],
                                {"fetched": False, "reason": "source unchanged: skipped"})
    assert "**Data** not fetched again: source unchanged: skipped" in markdown
    assert "vs champion version 1 0.9 (its stored map_50, computed on this same split)" in markdown


# ----------------------------------------------------------------------------------------------
# under real DVC and the Prefect flow

def _dvc_env(monkeypatch) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.mark.slow
def test_url_source_refetches_only_when_its_etag_changes(zips, tmp_path, monkeypatch):
    """`dvc repro fetch` (the flow's fetch task) on a URL: HEAD-only when unchanged, fetch when the ETag moves."""
    from flows import retrain as rt

    _dvc_env(monkeypatch)
    project = make_project(tmp_path / "project")
    with archive_server(zips["a"].read_bytes()) as server:
        rt.write_params(project / "params.yaml", TINY + [f'data.source="{server.url}"'])

        def run() -> tuple[str, dict, float]:
            before, started = fetched_fingerprint(project / rt.RAW_DIR), time.monotonic()
            outcome = rt.run_stage("fetch", project, log=lambda line: None)
            seconds = time.monotonic() - started
            return outcome, fetch_reason(before, read_fingerprint(project / "data/source.json"), outcome), seconds

        outcome, data, _ = run()
        assert (outcome, data["fetched"]) == ("ran", True)
        server.log.clear()
        outcome, data, seconds = run()
        assert (outcome, data["reason"]) == ("skipped", "source unchanged: skipped")
        assert server.log == [("HEAD", "/data.zip")] and seconds < 30, (server.log, seconds)
        old_etag = data["fingerprint"]["etag"]
        server.replace(zips["b"].read_bytes())
        outcome, data, _ = run()
        assert (outcome, data["fetched"]) == ("ran", True)
        new_etag = f'"{hashlib.md5(zips["b"].read_bytes()).hexdigest()}"'
        assert data["reason"].startswith(f"source changed: ETag {old_etag}, Last-Modified ")
        assert f"-> ETag {new_etag}, Last-Modified " in data["reason"]
        assert json.loads((project / "data/raw/manifest.json").read_text())["sha256"] == \
            hashlib.sha256(zips["b"].read_bytes()).hexdigest()


@pytest.mark.slow
def test_flow_retrains_when_the_zip_changes_and_rescores_the_champion(prefect_api, mlflow_server, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    """The whole flow three times on a zip path, against a real `mlflow server`: first run; nothing
    changed (every stage skipped); a new archive at the same path (another validation split too):
    fetch and train run again, and the champion is re-scored on the new split before the gate."""
    import mlflow

    from flows import retrain as rt
    from ssd.mlops.provenance import split_digest
    from ssd.mlops.registry import rescore_version
    from ssd.util.params import load_settings
    from test_flows import artifact

    _dvc_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = "tinyssd-retrain-data"
    project = make_project(tmp_path / "project")
    archive = tmp_path / "bananas.zip"
    generate_archive(archive, seed=0, train=16, val=8, image_size=160)
    overrides = TINY + [f"registry.model_name={name}"]
    seconds = {}

    def val_split(label: str) -> Path:
        """The archive's validation split as the runs read it (their workspaces are gone)."""
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp_path / label)
        return tmp_path / label / "banana-detection/bananas_val"

    def run(label: str) -> tuple[dict, str]:
        started = time.monotonic()
        state = rt.retrain(project_dir=str(project), overrides=overrides, source=str(archive), return_state=True)
        seconds[label] = round(time.monotonic() - started, 1)
        assert state.is_completed(), state
        return state.result(), artifact(state.state_details.flow_run_id).data

    first, _ = run("first")
    assert first["stages"] == {s: "ran" for s in rt.STAGES} and first["data"]["fetched"]
    digest_a = split_digest(val_split("a"))
    assert first["registration"]["val_digest"] == digest_a and first["registration"]["gate"] is None

    second, markdown = run("unchanged")
    assert second["stages"] == {s: "skipped" for s in rt.STAGES}
    assert second["data"] == {"fetched": False, "reason": "source unchanged: skipped",
                              "fingerprint": first["data"]["fingerprint"]}
    assert "**Data** not fetched again: source unchanged: skipped" in markdown

    old_sha = first["data"]["fingerprint"]["sha256"]
    generate_archive(archive, seed=1, train=16, val=8, image_size=160)  # new data, same path
    third, markdown = run("new archive")
    new_sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert third["stages"]["fetch"] == third["stages"]["train"] == "ran", third["stages"]
    assert third["data"]["reason"] == f"source changed: sha256 {old_sha[:12]}… -> sha256 {new_sha[:12]}…"
    assert f"**Data** fetched again: {third['data']['reason']}" in markdown

    # The gate: version 1 was scored on split A; version 2 on split B. Version 1 was re-scored on B
    # (independently checked here with the same function), and that figure decided.
    reg, digest_b = third["registration"], split_digest(val_split("b"))
    gate = reg["gate"]
    assert digest_b != digest_a and reg["version"] == 2 and gate["val_digest"] == digest_b
    assert gate["rescored"] and gate["champion_version"] == 1 and gate["champion_stored_val_digest"] == digest_a
    assert gate["champion_stored_map_50"] == pytest.approx(first["eval"]["map_50"])
    assert gate["candidate_map_50"] == pytest.approx(third["eval"]["map_50"])
    run_params = tmp_path / "run-params.yaml"  # the params the runs had: the project's plus the overrides
    run_params.write_text(subprocess.run(["git", "show", f"{third['experiment']['rev']}:params.yaml"], cwd=project,
                                         capture_output=True, text=True, check=True).stdout)
    settings = load_settings(run_params)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    rescored = rescore_version(name, 1, val_split("b"), settings.data, settings.evaluate)["map_50"]
    assert gate["champion_rescored_map_50"] == pytest.approx(rescored, abs=1e-9) == gate["champion_map_50"]
    assert (reg["decision"] == "promoted") == (gate["candidate_map_50"] > rescored)
    assert "**Champion gate**" in markdown and "re-scored on this split" in markdown and digest_a[:19] in markdown
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    assert client.get_model_version(name, "2").tags["val_digest"] == digest_b
    print(f"flow wall times (s): {seconds}")


# ----------------------------------------------------------------------------------------------
# the champion gate, figure by figure

def _candidate(folder: Path, uri: str, map_50: float, seed: int = 0, weights: bytes | None = None) -> dict:
    """What train and evaluate leave for register: weights (a fresh TinySSD, or ``weights``), a run, eval.json."""
    import mlflow

    from ssd.core.model import TinySSD, save_model
    from ssd.mlops.tracking import write_run_file

    folder.mkdir(parents=True)
    if weights is None:
        torch.manual_seed(seed)
        save_model(TinySSD(1), folder / "model.pt")
    else:
        (folder / "model.pt").write_bytes(weights)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        pass
    write_run_file(run.info.run_id, uri, folder / "mlflow_run.json")
    (folder / "eval.json").write_text(json.dumps({"map_50": map_50}))
    return {"model_path": folder / "model.pt", "eval_file": folder / "eval.json",
            "run_file": folder / "mlflow_run.json", "out": folder / "registration.json"}


@pytest.mark.slow
def test_gate_rescores_champion_on_the_new_split(mlflow_server, tmp_path):
    """Stored figures that would keep the champion; the re-scored one (an untrained champion on the
    new split) lets the challenger in. Same split again: the stored figure counts, no re-scoring."""
    import mlflow

    from ssd.core.model import load_model
    from ssd.engine.evaluation import load_validation, score
    from ssd.mlops.provenance import split_digest
    from ssd.stages.register import register
    from ssd.util.params import load_settings
    from tiny_data import write_dataset

    name = "tinyssd-gate-test"
    settings = load_settings(ROOT / "params.yaml", ["data.image_size=64", f"registry.model_name={name}"])
    split_a = write_dataset(tmp_path / "A", train=1, val=4, size=64, seed=0)
    split_b = write_dataset(tmp_path / "B", train=1, val=4, size=64, seed=10)  # other validation images
    digest_a, digest_b = (split_digest(s / "bananas_val") for s in (split_a, split_b))
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)

    champion = _candidate(tmp_path / "v1", mlflow_server, map_50=0.9)
    assert register(settings, **champion, data_dir=split_a)["decision"] == "promoted"
    assert client.get_model_version(name, "1").tags["val_digest"] == digest_a

    record = register(settings, **_candidate(tmp_path / "v2", mlflow_server, map_50=0.5, seed=1), data_dir=split_b)
    expected = score(load_model(champion["model_path"]), load_validation(settings.data, split_b),
                     settings.evaluate).metrics["map_50"]
    assert expected < 0.5  # an untrained champion on B; on A it claimed 0.9
    assert record["gate"] == {"val_digest": digest_b, "candidate_map_50": 0.5, "champion_version": 1,
                              "champion_stored_map_50": 0.9, "champion_stored_val_digest": digest_a,
                              "rescored": True, "champion_rescored_map_50": pytest.approx(expected, abs=1e-9),
                              "champion_map_50": pytest.approx(expected, abs=1e-9)}
    assert record["decision"] == "promoted" and record["champion_version"] == 2  # 0.9 stored would have kept v1
    assert "re-scored on this validation split" in record["reason"] and "stored map_50 0.9000" in record["reason"]
    assert json.loads((tmp_path / "v2" / "registration.json").read_text())["gate"]["rescored"] is True

    record = register(settings, **_candidate(tmp_path / "v3", mlflow_server, map_50=0.45, seed=2), data_dir=split_b)
    assert record["gate"]["rescored"] is False and record["gate"]["champion_map_50"] == 0.5
    assert record["decision"] == "kept" and record["gate"]["champion_rescored_map_50"] is None


@pytest.mark.slow
def test_champion_that_cannot_be_loaded_stops_registration(mlflow_server, tmp_path, capsys, monkeypatch):
    """A champion whose weights do not load (no alias moves to such a version by itself, but a person
    may set one) makes re-scoring fail loudly, through `ssd register` too: exit 1, no record, the
    champion alias unchanged."""
    import mlflow

    from ssd.cli import main as cli_main
    from ssd.stages.register import register
    from ssd.util.params import load_settings
    from tiny_data import write_dataset

    name = "tinyssd-broken-champion"
    settings = load_settings(ROOT / "params.yaml", ["data.image_size=64", f"registry.model_name={name}"])
    split_a = write_dataset(tmp_path / "A", train=1, val=2, size=64, seed=0)
    split_b = write_dataset(tmp_path / "B", train=1, val=2, size=64, seed=10)
    with pytest.raises(RuntimeError, match="does not load"):  # registered, but no alias moves to it
        register(settings, **_candidate(tmp_path / "v1", mlflow_server, map_50=0.1, weights=b"not a model"),
                 data_dir=split_a)
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    # A person makes it champion anyway in the UI (as `ssd promote` or an older release could).
    client.set_registered_model_alias(name, "champion", "1")
    challenger = _candidate(tmp_path / "v2", mlflow_server, map_50=0.9)
    with pytest.raises(RuntimeError, match=rf"cannot re-score models:/{name}/1 .*could not be loaded"):
        register(settings, **challenger, data_dir=split_b)
    assert not challenger["out"].exists()
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    # `ssd register` reads data/raw from where it runs: there, split B.
    write_dataset(tmp_path / "cwd" / "data" / "raw", train=1, val=2, size=64, seed=10)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    rc = cli_main(["register", "--params", str(ROOT / "params.yaml"), "-S", "data.image_size=64",
                   "-S", f"registry.model_name={name}", "--model", str(challenger["model_path"]),
                   "--eval", str(challenger["eval_file"]), "--run-file", str(challenger["run_file"]),
                   "--out", str(challenger["out"])])
    assert rc == 1 and "cannot re-score" in capsys.readouterr().err and not challenger["out"].exists()
    assert client.get_model_version_by_alias(name, "champion").version == "1"
