"""MLflow tracking of a training run against a real `mlflow server`, and the run's provenance tags."""
from __future__ import annotations

import json
import socket
import subprocess

import pytest
import torch

from ssd.cli import main as cli_main
from ssd.tracking import dataset_tags, flatten_params, read_run_file
from tiny_data import make_project


def test_training_run_is_recorded_on_the_tracking_server(tmp_path, monkeypatch, mlflow_server):
    import mlflow

    project = make_project(tmp_path / "p")
    (project / "data/raw/manifest.json").write_text(json.dumps({"resolved_source": "synthetic", "sha1": "abc123"}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "params.yaml"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "p"], cwd=project, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert cli_main(["train"]) == 0

    info = read_run_file()
    assert info["tracking_uri"] == mlflow_server
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(info["run_id"])
    params, tags = run.data.params, run.data.tags
    assert params["train.lr"] == "0.2" and params["train.batch_size"] == "4" and params["train.epochs"] == "2"
    assert params["data.image_size"] == "64" and params["model.ratios"] == "[1, 2, 0.5]" and params["base.seed"] == "0"
    assert tags["data_source"] == "synthetic" and tags["data_hash"] == "sha1:abc123"
    assert tags["device"] == "cpu" and tags["world_size"] == "1" and tags["precision"] == "fp32"
    assert tags["git_commit"] == commit
    for key in ("class_err", "bbox_mae", "loss", "examples_per_sec"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert run.info.status == "FINISHED"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "train_curve.png"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.pt"]
    local = client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path))
    assert torch.load(local, weights_only=True)["epoch"] == 2
    png = client.download_artifacts(run.info.run_id, "train_curve.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_unreachable_tracking_server_refuses_to_start(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    project = make_project(tmp_path / "p", images=4)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert cli_main(["train"]) == 1
    err = capsys.readouterr().err
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in err
    assert not (project / "models").exists() and not (project / "reports").exists()


def test_flatten_params():
    flat = flatten_params({"train": {"lr": 0.2, "nested": {"a": [1, 2]}}, "base": {"seed": 0}})
    assert flat == {"train.lr": "0.2", "train.nested.a": "[1, 2]", "base.seed": "0"}


def test_dataset_tags_prefer_dvc_lock(tmp_path):
    raw = tmp_path / "data/raw"
    assert dataset_tags(raw, tmp_path / "dvc.lock") == {"data_hash": "unknown", "data_source": "unknown"}
    raw.mkdir(parents=True)
    (raw / "manifest.json").write_text(json.dumps({"resolved_source": "d2l", "sha1": "5de2"}))
    assert dataset_tags(raw, tmp_path / "dvc.lock") == {"data_hash": "sha1:5de2", "data_source": "d2l"}
    (tmp_path / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  fetch:\n    cmd: ssd fetch\n    outs:\n    - path: {raw}\n      md5: f00d.dir\n")
    assert dataset_tags(raw, tmp_path / "dvc.lock")["data_hash"] == "dvc-md5:f00d.dir"


@pytest.mark.parametrize("uri", ["sqlite:///x.db", "file:///tmp/mlruns"])
def test_store_uris_need_no_server(uri):
    from ssd.tracking import ensure_reachable

    assert ensure_reachable(uri) == uri
